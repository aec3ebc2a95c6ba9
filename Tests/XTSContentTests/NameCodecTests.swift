import XCTest
import XTSCrypto
import XTSKeys
@testable import XTSContent

final class NameCodecTests: XCTestCase {
    let codec = NameCodec(keys: try! KeySet.generate(generation: 1, volumeID: Array(repeating: 1, count: 16)))
    let dirA = Array(repeating: UInt8(0xaa), count: 16)
    let dirB = Array(repeating: UInt8(0xbb), count: 16)

    func testRoundTripDeterministicPerDirectory() throws {
        for name in ["a", "hello.txt", "with space", "ünïcödé ✓", String(repeating: "x", count: 160), String(repeating: "y", count: 255)] {
            let bytes = Array(name.utf8)
            let a1 = try codec.encrypt(bytes, directoryID: dirA)
            let a2 = try codec.encrypt(bytes, directoryID: dirA)
            let b = try codec.encrypt(bytes, directoryID: dirB)
            XCTAssertEqual(a1, a2)
            XCTAssertNotEqual(a1, b)
            let encoded: String
            switch a1 {
            case .short(let s): encoded = s; XCTAssertLessThanOrEqual(s.utf8.count, 255)
            case .long(let h, let full): encoded = full; XCTAssertTrue(NameCodec.isLongName(h)); XCTAssertLessThan(h.utf8.count, 255)
            }
            XCTAssertFalse(encoded.contains("."))
            XCTAssertEqual(try codec.decrypt(encoded, directoryID: dirA), bytes)
            XCTAssertThrowsError(try codec.decrypt(encoded, directoryID: dirB))
        }
    }

    func testLongNameThreshold() throws {
        if case .long = try codec.encrypt(Array(repeating: 0x61, count: 160), directoryID: dirA) { XCTFail("160 bytes should be short") }
        guard case .long = try codec.encrypt(Array(repeating: 0x61, count: 161), directoryID: dirA) else { return XCTFail("161 bytes should be long") }
    }

    func testNonUTF8NamesSurvive() throws {
        let raw: [UInt8] = [0xff, 0xfe, 0x41, 0x80]
        guard case .short(let s) = try codec.encrypt(raw, directoryID: dirA) else { return XCTFail() }
        XCTAssertEqual(try codec.decrypt(s, directoryID: dirA), raw)
    }

    func testBadNamesRejected() {
        XCTAssertThrowsError(try codec.encrypt([], directoryID: dirA))
        XCTAssertThrowsError(try codec.encrypt(Array("a/b".utf8), directoryID: dirA))
        XCTAssertThrowsError(try codec.encrypt(Array(repeating: 0x61, count: 256), directoryID: dirA)) { XCTAssertEqual($0 as? NameError, .tooLong) }
        XCTAssertThrowsError(try codec.decrypt("not-base64!", directoryID: dirA))
        XCTAssertThrowsError(try codec.decrypt("AAAA", directoryID: dirA))
    }

    func testTamperedNameRejected() throws {
        guard case .short(var s) = try codec.encrypt(Array("secret".utf8), directoryID: dirA) else { return XCTFail() }
        let first = s.removeFirst()
        s.insert(first == "A" ? "B" : "A", at: s.startIndex)
        XCTAssertThrowsError(try codec.decrypt(s, directoryID: dirA))
    }

    func testSymlinkTargets() throws {
        let t = Array("../some/where/else".utf8)
        let e1 = try codec.encryptTarget(t), e2 = try codec.encryptTarget(t)
        XCTAssertNotEqual(e1, e2, "random nonce: equal targets must not show")
        XCTAssertEqual(try codec.decryptTarget(Array(e1.utf8)), t)
        // Up to 3039 bytes the encoded target fits a backing symlink; longer ones go to the link store.
        XCTAssertLessThanOrEqual(try codec.encryptTarget(Array(repeating: 0x61, count: 3039)).utf8.count, NameCodec.maxBackingTarget)
        XCTAssertGreaterThan(try codec.encryptTarget(Array(repeating: 0x61, count: 3040)).utf8.count, NameCodec.maxBackingTarget)
        XCTAssertEqual(try codec.decryptTarget(Array(try codec.encryptTarget(Array(repeating: 0x61, count: NameCodec.maxSymlinkTarget)).utf8)).count, 4095)
        XCTAssertThrowsError(try codec.encryptTarget(Array(repeating: 0x61, count: NameCodec.maxSymlinkTarget + 1)))
    }

    func testBase64URL() {
        for n in 0..<40 {
            let b = (0..<n).map { UInt8(truncatingIfNeeded: $0 &* 37 &+ 11) }
            XCTAssertEqual(Base64URL.decode(Base64URL.encode(b)), b)
        }
        XCTAssertEqual(Base64URL.encode(Array("foobar".utf8)), "Zm9vYmFy")
        XCTAssertEqual(Base64URL.encode([0xfb, 0xff]), "-_8")
        XCTAssertNil(Base64URL.decode("Zm9=")) // padding is not ours
        XCTAssertNil(Base64URL.decode("Zh")) // non-zero leftover bits: not canonical
    }
}
