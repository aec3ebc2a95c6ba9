import XCTest
import XTSCrypto

final class SecretBytesTests: XCTestCase {
    func testNeverPrintsItsBytes() throws {
        let secret = SecretBytes(copying: [0xde, 0xad, 0xbe, 0xef])
        XCTAssertEqual(secret.description, "<secret 4 bytes>")
        XCTAssertEqual(secret.debugDescription, "<secret 4 bytes>")
        XCTAssertEqual("\(secret)", "<secret 4 bytes>")
        XCTAssertEqual(String(reflecting: secret), "<secret 4 bytes>")
        for text in [secret.description, "\(secret)", String(reflecting: secret), "\([secret])"] {
            XCTAssertFalse(text.lowercased().contains("dead"), text)
            XCTAssertFalse(text.contains("222"), text)  // 0xde as decimal
        }
    }

    func testZeroFilledAndCopying() throws {
        let zero = SecretBytes(count: 48)
        XCTAssertEqual(zero.count, 48)
        zero.withUnsafeBytes { XCTAssertTrue($0.allSatisfy { $0 == 0 }) }
        let bytes: [UInt8] = [1, 2, 3, 4, 5]
        let copy = bytes.withUnsafeBytes { SecretBytes(copying: $0) }
        copy.withUnsafeBytes { XCTAssertEqual(Array($0), bytes) }
        XCTAssertEqual(SecretBytes(copying: [UInt8]()).count, 0)
    }

    func testRandomValuesDiffer() throws {
        let a = try SecretBytes.random(count: 32)
        let b = try SecretBytes.random(count: 32)
        XCTAssertEqual(a.count, 32)
        XCTAssertFalse(a.constantTimeEquals(b))
        a.withUnsafeBytes { XCTAssertFalse($0.allSatisfy { $0 == 0 }) }
        XCTAssertNotEqual(try Random.bytes(32), try Random.bytes(32))
        XCTAssertEqual(try Random.bytes(0), [])
        XCTAssertThrowsError(try Random.bytes(-1))
    }

    func testConstantTimeEqualsAndSlice() throws {
        let secret = SecretBytes(copying: Array(0..<64))
        XCTAssertTrue(secret.constantTimeEquals(SecretBytes(copying: Array(0..<64))))
        XCTAssertFalse(secret.constantTimeEquals(SecretBytes(copying: Array(0..<63))))
        XCTAssertTrue(SecretBytes(count: 0).constantTimeEquals(SecretBytes(count: 0)))
        let tail = secret.slice(32..<64)
        tail.withUnsafeBytes { XCTAssertEqual(Array($0), Array(32..<64)) }
        XCTAssertEqual(secret.slice(10..<10).count, 0)
        // The slice is a copy: changing it leaves the original alone.
        tail.withUnsafeMutableBytes { $0[0] = 0xff }
        secret.withUnsafeBytes { XCTAssertEqual($0[32], 32) }
    }

    func testErrorDescriptions() {
        XCTAssertEqual(CryptoError.authenticationFailed.description, "authentication failed (wrong key or damaged data)")
        XCTAssertTrue(CryptoError.openssl("x").description.contains("x"))
    }
}
