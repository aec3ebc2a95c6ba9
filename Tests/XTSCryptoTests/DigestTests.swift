import XCTest
import XTSCrypto

final class DigestTests: XCTestCase {
    struct File: Decodable {
        struct Hash: Decodable { let name: String; let message: String; let digest: String }
        struct MAC: Decodable { let name: String; let key: String; let data: String; let mac: String }
        let sha256: [Hash]
        let hmacSHA256: [MAC]
    }

    /// XXH64 against values of the reference implementation (the `xxhash` Python package):
    /// empty, shorter than a stripe, a rekey journal's unit head (4064 bytes) and tail (47).
    func testXXH64KnownAnswers() {
        XCTAssertEqual(XXH64.hash([]), 0xEF46_DB37_51D8_E999)
        XCTAssertEqual(XXH64.hash(Array("abc".utf8)), 0x44BC_2CF5_AD77_0999)
        let data = (0..<4064).map { UInt8(truncatingIfNeeded: $0 * 7 + 3) }
        XCTAssertEqual(XXH64.hash(data), 0xD5F0_6E1B_888F_6EF8)
        XCTAssertEqual(XXH64.hash(Array(data[0..<47])), 0xA7C5_465C_C5AD_205E)
    }

    func testSHA256KnownAnswers() throws {
        let file = try Vectors.load("digest.json", as: File.self)
        XCTAssertFalse(file.sha256.isEmpty)
        for v in file.sha256 {
            let message = try hex(v.message)
            XCTAssertEqual(hexString(SHA256.hash(message)), v.digest, v.name)
            let viaPointer = message.withUnsafeBytes { SHA256.hash($0) }
            XCTAssertEqual(hexString(viaPointer), v.digest, v.name)
        }
    }

    func testHMACSHA256KnownAnswers() throws {
        let file = try Vectors.load("digest.json", as: File.self)
        XCTAssertFalse(file.hmacSHA256.isEmpty)
        for v in file.hmacSHA256 {
            let key = SecretBytes(copying: try hex(v.key))
            let data = try hex(v.data)
            XCTAssertEqual(hexString(try HMACSHA256.mac(key: key, data: data)), v.mac, v.name)
            let viaPointer = try data.withUnsafeBytes { try HMACSHA256.mac(key: key, data: $0) }
            XCTAssertEqual(hexString(viaPointer), v.mac, v.name)
        }
    }

    func testHMACOfEmptyDataAndWithEmptyKey() throws {
        // Values computed independently (Python's hmac module): HMAC-SHA256 with an
        // empty key over empty data.
        let mac = try HMACSHA256.mac(key: SecretBytes(count: 0), data: [])
        XCTAssertEqual(hexString(mac), "b613679a0814d9ec772f95d778c35fc5ff1697c493715653c6c712144292c5ad")
    }

    func testConstantTimeEqual() {
        XCTAssertTrue(constantTimeEqual([], []))
        XCTAssertTrue(constantTimeEqual([1, 2, 3], [1, 2, 3]))
        XCTAssertFalse(constantTimeEqual([1, 2, 3], [1, 2, 4]))
        XCTAssertFalse(constantTimeEqual([1, 2, 3], [1, 2]))
    }
}
