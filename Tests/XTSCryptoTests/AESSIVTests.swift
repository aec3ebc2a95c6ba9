import XCTest
import XTSCrypto

final class AESSIVTests: XCTestCase {
    struct File: Decodable {
        struct Vector: Decodable { let name: String; let key: String; let associatedData: String; let plaintext: String; let sealed: String }
        let vectors: [Vector]
    }

    func testKnownAnswers() throws {
        let file = try Vectors.load("aessiv.json", as: File.self)
        XCTAssertEqual(file.vectors.count, 10)
        for v in file.vectors {
            let key = SecretBytes(copying: try hex(v.key))
            let ad = try hex(v.associatedData), plaintext = try hex(v.plaintext)
            let sealed = try AESSIV.seal(key: key, plaintext: plaintext, associatedData: ad)
            XCTAssertEqual(hexString(sealed), v.sealed, v.name)
            XCTAssertEqual(try AESSIV.open(key: key, sealed: try hex(v.sealed), associatedData: ad), plaintext, v.name)
        }
    }

    func testAES256RoundTripAndDeterminism() throws {
        let key = try SecretBytes.random(count: 64)
        for length in [0, 1, 15, 16, 17, 255] {
            let name = try Random.bytes(length)
            let ad = Array("directory-id".utf8)
            let sealed = try AESSIV.seal(key: key, plaintext: name, associatedData: ad)
            XCTAssertEqual(sealed.count, 16 + length)
            XCTAssertEqual(try AESSIV.seal(key: key, plaintext: name, associatedData: ad), sealed, "deterministic")
            XCTAssertEqual(try AESSIV.open(key: key, sealed: sealed, associatedData: ad), name)
        }
    }

    func testTamperingFailsAuthentication() throws {
        let key = try SecretBytes.random(count: 64)
        let ad: [UInt8] = [1, 2, 3]
        let sealed = try AESSIV.seal(key: key, plaintext: Array("report.pdf".utf8), associatedData: ad)
        for index in [0, 15, 16, sealed.count - 1] {
            var damaged = sealed
            damaged[index] ^= 0x80
            XCTAssertThrowsError(try AESSIV.open(key: key, sealed: damaged, associatedData: ad), "byte \(index)") { error in
                XCTAssertEqual(error as? CryptoError, .authenticationFailed)
            }
        }
        XCTAssertThrowsError(try AESSIV.open(key: key, sealed: sealed, associatedData: [1, 2, 4])) { error in
            XCTAssertEqual(error as? CryptoError, .authenticationFailed)
        }
        XCTAssertThrowsError(try AESSIV.open(key: key, sealed: sealed, associatedData: [])) { error in
            XCTAssertEqual(error as? CryptoError, .authenticationFailed)
        }
        XCTAssertThrowsError(try AESSIV.open(key: try SecretBytes.random(count: 64), sealed: sealed, associatedData: ad)) { error in
            XCTAssertEqual(error as? CryptoError, .authenticationFailed)
        }
        // An empty plaintext is authenticated too.
        let empty = try AESSIV.seal(key: key, plaintext: [], associatedData: ad)
        var damaged = empty
        damaged[3] ^= 1
        XCTAssertThrowsError(try AESSIV.open(key: key, sealed: damaged, associatedData: ad)) { error in
            XCTAssertEqual(error as? CryptoError, .authenticationFailed)
        }
    }

    func testInvalidInputs() throws {
        let key = try SecretBytes.random(count: 64)
        XCTAssertThrowsError(try AESSIV.open(key: key, sealed: [UInt8](repeating: 0, count: 15), associatedData: [])) { error in
            guard case .invalidInput = error as? CryptoError else { return XCTFail("got \(error)") }
        }
        XCTAssertThrowsError(try AESSIV.seal(key: try SecretBytes.random(count: 16), plaintext: [1], associatedData: [])) { error in
            XCTAssertEqual(error as? CryptoError, .invalidKeyLength)
        }
    }
}
