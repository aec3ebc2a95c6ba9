import XCTest
import XTSCrypto

final class HKDFTests: XCTestCase {
    struct File: Decodable {
        struct Vector: Decodable { let name: String; let ikm: String; let salt: String; let info: String; let length: Int; let okm: String }
        let vectors: [Vector]
    }

    func testRFC5869Vectors() throws {
        let file = try Vectors.load("hkdf_rfc5869.json", as: File.self)
        XCTAssertEqual(file.vectors.count, 3)
        for v in file.vectors {
            let ikm = SecretBytes(copying: try hex(v.ikm))
            let okm = try HKDF.derive(key: ikm, salt: try hex(v.salt), info: try hex(v.info), count: v.length)
            XCTAssertEqual(okm.count, v.length)
            okm.withUnsafeBytes { XCTAssertEqual(hexString(Array($0)), v.okm, v.name) }

            // The pointer form, into caller memory.
            var out = [UInt8](repeating: 0, count: v.length)
            let ikmBytes = try hex(v.ikm)
            try ikmBytes.withUnsafeBytes { i in
                try out.withUnsafeMutableBytes { try HKDF.derive(ikm: i, salt: try hex(v.salt), info: try hex(v.info), into: $0) }
            }
            XCTAssertEqual(hexString(out), v.okm, v.name)
        }
    }

    func testEmptyInputs() throws {
        // Expected values from Python's hmac module, computing RFC 5869 directly.
        let empty = try HKDF.derive(key: SecretBytes(count: 0), salt: [], info: [], count: 32)
        empty.withUnsafeBytes { XCTAssertEqual(hexString(Array($0)), "eb70f01dede9afafa449eee1b1286504e1f62388b3f7dd4f956697b0e828fe18") }
        var out = [UInt8](repeating: 0, count: 32)
        try out.withUnsafeMutableBytes { o in
            try HKDF.derive(ikm: UnsafeRawBufferPointer(start: nil, count: 0), salt: Array("salt".utf8), info: Array("info".utf8), into: o)
        }
        XCTAssertEqual(hexString(out), "7aac7b8120501c2c8e1ee50e6cde135361e99ceb9d8d406ac528b9e9175614c0")
    }

    func testInvalidLengths() throws {
        let ikm = try SecretBytes.random(count: 32)
        XCTAssertThrowsError(try HKDF.derive(key: ikm, salt: [], info: [], count: 0))
        XCTAssertThrowsError(try HKDF.derive(key: ikm, salt: [], info: [], count: 255 * 32 + 1))
        XCTAssertEqual(try HKDF.derive(key: ikm, salt: [], info: [], count: 255 * 32).count, 255 * 32)
    }

    func testInfoSeparatesKeys() throws {
        let ikm = try SecretBytes.random(count: 32)
        let a = try HKDF.derive(key: ikm, salt: [1], info: Array("content".utf8), count: 64)
        let b = try HKDF.derive(key: ikm, salt: [1], info: Array("names".utf8), count: 64)
        XCTAssertFalse(a.constantTimeEquals(b))
    }
}
