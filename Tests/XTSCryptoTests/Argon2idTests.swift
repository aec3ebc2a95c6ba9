import XCTest
import XTSCrypto

final class Argon2idTests: XCTestCase {
    struct File: Decodable {
        struct Vector: Decodable {
            let name: String; let password: String; let salt: String; let secret: String; let associatedData: String
            let memoryKiB: UInt32; let iterations: UInt32; let parallelism: UInt32; let tag: String
        }
        let vectors: [Vector]
    }

    func testRFC9106Vector() throws {
        let file = try Vectors.load("argon2id_rfc9106.json", as: File.self)
        XCTAssertEqual(file.vectors.count, 1)
        for v in file.vectors {
            let parameters = Argon2idParameters(memoryKiB: v.memoryKiB, iterations: v.iterations, parallelism: v.parallelism)
            let tag = try Argon2id.derive(password: SecretBytes(copying: try hex(v.password)), salt: try hex(v.salt), parameters: parameters,
                                          secret: try hex(v.secret), associatedData: try hex(v.associatedData), count: 32)
            tag.withUnsafeBytes { XCTAssertEqual(hexString(Array($0)), v.tag, v.name) }
        }
    }

    func testSecretAndAssociatedDataMatter() throws {
        let password = SecretBytes(copying: Array("correct horse".utf8))
        let salt = [UInt8](repeating: 9, count: 16)
        let p = Argon2idParameters(memoryKiB: 64, iterations: 1, parallelism: 1)
        let plain = try Argon2id.derive(password: password, salt: salt, parameters: p, count: 32)
        XCTAssertTrue(plain.constantTimeEquals(try Argon2id.derive(password: password, salt: salt, parameters: p, count: 32)))
        XCTAssertFalse(plain.constantTimeEquals(try Argon2id.derive(password: password, salt: salt, parameters: p, secret: [1], count: 32)))
        XCTAssertFalse(plain.constantTimeEquals(try Argon2id.derive(password: password, salt: salt, parameters: p, associatedData: [1], count: 32)))
    }

    func testBadParametersReportArgon2Errors() throws {
        let password = SecretBytes(copying: Array("pw".utf8))
        let good = Argon2idParameters(memoryKiB: 64, iterations: 1, parallelism: 1)
        XCTAssertThrowsError(try Argon2id.derive(password: password, salt: [1, 2, 3], parameters: good, count: 32)) { error in
            guard case .argon2 = error as? CryptoError else { return XCTFail("got \(error)") }
        }
        XCTAssertThrowsError(try Argon2id.derive(password: password, salt: [UInt8](repeating: 0, count: 16),
                                                 parameters: Argon2idParameters(memoryKiB: 64, iterations: 0, parallelism: 1), count: 32)) { error in
            guard case .argon2 = error as? CryptoError else { return XCTFail("got \(error)") }
        }
        XCTAssertThrowsError(try Argon2id.derive(password: password, salt: [UInt8](repeating: 0, count: 16), parameters: good, count: 3)) { error in
            guard case .invalidInput = error as? CryptoError else { return XCTFail("got \(error)") }
        }
    }

    func testCalibrateScalesIterationsWithTheTarget() throws {
        // No wall-clock bounds (they flake on a busy machine): a 30 times longer target
        // must buy more iterations, at the memory and lanes asked for.
        let short = try Argon2id.calibrate(memoryKiB: 4 * 1024, parallelism: 2, targetMilliseconds: 20)
        let long = try Argon2id.calibrate(memoryKiB: 4 * 1024, parallelism: 2, targetMilliseconds: 600)
        for p in [short, long] {
            XCTAssertEqual(p.memoryKiB, 4 * 1024)
            XCTAssertEqual(p.parallelism, 2)
            XCTAssertGreaterThanOrEqual(p.iterations, 1)
        }
        XCTAssertGreaterThan(long.iterations, short.iterations, "short \(short), long \(long)")
    }

    func testCalibrateReturnsOneIterationWhenTargetIsTiny() throws {
        let p = try Argon2id.calibrate(memoryKiB: 16 * 1024, parallelism: 1, targetMilliseconds: 1)
        XCTAssertEqual(p, Argon2idParameters(memoryKiB: 16 * 1024, iterations: 1, parallelism: 1))
    }
}
