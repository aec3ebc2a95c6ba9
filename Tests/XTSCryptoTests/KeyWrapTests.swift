import XCTest
import XTSCrypto

final class KeyWrapTests: XCTestCase {
    struct File: Decodable {
        struct Vector: Decodable { let name: String; let kek: String; let key: String; let wrapped: String }
        let vectors: [Vector]
    }

    func testRFC5649Vectors() throws {
        let file = try Vectors.load("keywrap_rfc5649.json", as: File.self)
        XCTAssertEqual(file.vectors.count, 3)
        for v in file.vectors {
            let kek = SecretBytes(copying: try hex(v.kek))
            let key = SecretBytes(copying: try hex(v.key))
            XCTAssertEqual(hexString(try KeyWrap.wrap(key, kek: kek)), v.wrapped, v.name)
            let unwrapped = try KeyWrap.unwrap(try hex(v.wrapped), kek: kek)
            XCTAssertTrue(unwrapped.constantTimeEquals(key), v.name)
        }
    }

    func testRoundTripAES256KEKWith64ByteKey() throws {
        let kek = try SecretBytes.random(count: 32)
        let key = try SecretBytes.random(count: 64)
        let wrapped = try KeyWrap.wrap(key, kek: kek)
        XCTAssertEqual(wrapped.count, 72)
        XCTAssertTrue(try KeyWrap.unwrap(wrapped, kek: kek).constantTimeEquals(key))
    }

    func testRoundTripOddLengths() throws {
        let kek = try SecretBytes.random(count: 32)
        for length in [1, 7, 8, 9, 15, 16, 17, 31, 33, 100] {
            let key = try SecretBytes.random(count: length)
            let wrapped = try KeyWrap.wrap(key, kek: kek)
            XCTAssertEqual(wrapped.count, (length + 7) / 8 * 8 + 8, "length \(length)")
            let back = try KeyWrap.unwrap(wrapped, kek: kek)
            XCTAssertEqual(back.count, length)
            XCTAssertTrue(back.constantTimeEquals(key), "length \(length)")
        }
    }

    func testWrongKEKFailsAuthentication() throws {
        let kek = try SecretBytes.random(count: 32)
        let other = try SecretBytes.random(count: 32)
        let wrapped = try KeyWrap.wrap(try SecretBytes.random(count: 64), kek: kek)
        XCTAssertThrowsError(try KeyWrap.unwrap(wrapped, kek: other)) { error in
            XCTAssertEqual(error as? CryptoError, .authenticationFailed)
        }
        // A short (single-block) wrap goes through a different code path in RFC 5649.
        let short = try KeyWrap.wrap(try SecretBytes.random(count: 5), kek: kek)
        XCTAssertEqual(short.count, 16)
        XCTAssertThrowsError(try KeyWrap.unwrap(short, kek: other)) { error in
            XCTAssertEqual(error as? CryptoError, .authenticationFailed)
        }
    }

    func testDamagedWrapFailsAuthentication() throws {
        let kek = try SecretBytes.random(count: 32)
        let wrapped = try KeyWrap.wrap(try SecretBytes.random(count: 64), kek: kek)
        for index in [0, 7, 8, 40, wrapped.count - 1] {
            var damaged = wrapped
            damaged[index] ^= 0x01
            XCTAssertThrowsError(try KeyWrap.unwrap(damaged, kek: kek), "byte \(index)") { error in
                XCTAssertEqual(error as? CryptoError, .authenticationFailed)
            }
        }
    }

    func testInvalidLengthsRejected() throws {
        let kek = try SecretBytes.random(count: 32)
        XCTAssertThrowsError(try KeyWrap.unwrap([UInt8](repeating: 0, count: 8), kek: kek)) { error in
            guard case .invalidInput = error as? CryptoError else { return XCTFail("got \(error)") }
        }
        XCTAssertThrowsError(try KeyWrap.unwrap([UInt8](repeating: 0, count: 25), kek: kek)) { error in
            guard case .invalidInput = error as? CryptoError else { return XCTFail("got \(error)") }
        }
        XCTAssertThrowsError(try KeyWrap.wrap(SecretBytes(count: 0), kek: kek)) { error in
            guard case .invalidInput = error as? CryptoError else { return XCTFail("got \(error)") }
        }
        XCTAssertThrowsError(try KeyWrap.wrap(try SecretBytes.random(count: 32), kek: try SecretBytes.random(count: 20))) { error in
            XCTAssertEqual(error as? CryptoError, .invalidKeyLength)
        }
    }
}
