import XCTest
import XTSCrypto
import XTSFormat
import XTSKeys
@testable import XTSContent

/// The unit tags of both tag algorithms (FORMAT.md 12.4) against known answers computed
/// outside xtsfs by scripts/unit-tag-vectors.py: HKDF and AES from Python's
/// `cryptography` package, GHASH from its definition in SP 800-38D (checked there against
/// `cryptography`'s AES-GCM), HMAC from Python's `hmac`. DEK 00 01 … 3f, volume ID
/// a0 … af, file nonce 30 … 3f, ciphertext byte i = (7i + 3) mod 256.
final class UnitTagVectorTests: XCTestCase {
    static let dek = (0..<64).map { UInt8($0) }
    static let volumeID = (0xA0..<0xB0).map { UInt8($0) }
    static let nonce = (0x30..<0x40).map { UInt8($0) }
    static let ciphertext = (0..<4096).map { UInt8(truncatingIfNeeded: $0 * 7 + 3) }

    static let expected: [(unit: Int64, data: Bool, v2: String, v1: String)] = [
        (0, false, "9a67999831954655e9721591799a9ea4", "fdfd8375ffd0aad2cf32cbcd3d3abec1"),
        (5, true, "152ee96a811c8966fec0b14a7e114209", "66430b264e3cc45f41e51be70ec8ecb0"),
        ((1 << 40) + 3, true, "3449374848db07efe15200de93910c92", "005599b72435d5c1cb85f1dbced47ac3"),
    ]

    func file(_ tags: UnitTagAlgorithm) throws -> FileCrypto {
        let keys = try KeySet(dek: SecretBytes(copying: Self.dek), generation: 1, volumeID: Self.volumeID)
        XCTAssertEqual(keys.contentKey.withUnsafeBytes { hexString(Array($0)) },
                       "4734a8aecca67a8b2ea4e5689f59ab853f5fe9aea1f21feb37fe420ed1d9997c68d5f52cf59a3badb1efef6302793e440a4ed85c1cc7ba441408b9e7544f9ec5")
        return try FileCrypto(keys: keys, integrityHeader: IntegrityFileHeader(tags: tags, keyGeneration: 1, nonce: Self.nonce, plainLength: 0))
    }

    func tag(_ s: UnitTagSession, _ unit: Int64, _ data: Bool) throws -> String {
        var out = [UInt8](repeating: 0, count: 16)
        try Self.ciphertext.withUnsafeBytes { ct in
            try out.withUnsafeMutableBytes { try FileCrypto.tag(s, unit: unit, ciphertext: data ? ct : nil, into: $0) }
        }
        return hexString(out)
    }

    func testTagAlgorithm2MatchesIndependentComputation() throws {
        let f = try file(.ghashAES256)
        XCTAssertEqual(f.tagKey?.withUnsafeBytes { hexString(Array($0)) },
                       "132e035cd3e2d92d5e296e6d2d927ba384e8a8bc5db44858581aae591348ad467418531a06136dbd1e02df6ba89ac0fd4347c5037e5916294950fd3185efadc6")
        let s = try f.tagSession()
        for e in Self.expected { XCTAssertEqual(try tag(s, e.unit, e.data), e.v2, "unit \(e.unit)") }
    }

    func testTagAlgorithm1IsUnchanged() throws {
        let s = try file(.hmacSHA256).tagSession()
        for e in Self.expected { XCTAssertEqual(try tag(s, e.unit, e.data), e.v1, "unit \(e.unit)") }
    }

    /// The thread's GHASH and XTS contexts hold no key schedule once a session (a request)
    /// is over; two sessions alive at once on one thread each keep their own key.
    func testKeySchedulesDoNotOutliveTheRequest() throws {
        let f = try file(.ghashAES256)
        do {
            let s = try f.tagSession()
            XCTAssertTrue(try GHASHTagContext.forCurrentThread().holdsKey)
            XCTAssertEqual(try tag(s, 5, true), Self.expected[1].v2)
        }
        XCTAssertFalse(try GHASHTagContext.forCurrentThread().holdsKey, "the tag key schedule must not outlive the session")

        let keys = try KeySet.generate(generation: 1, volumeID: Self.volumeID)
        let other = try FileCrypto(keys: keys, integrityHeader: try IntegrityFileHeader.random(tags: .ghashAES256, keyGeneration: 1))
        try withExtendedLifetime(try f.tagSession()) { a in
            let otherTag = try withExtendedLifetime(try other.tagSession()) { b in try tag(b, 5, true) }
            XCTAssertNotEqual(otherTag, Self.expected[1].v2)
            XCTAssertEqual(try tag(a, 5, true), Self.expected[1].v2, "a session keys the context again after another used it")
        }
        XCTAssertFalse(try GHASHTagContext.forCurrentThread().holdsKey)

        var units = [UInt8](repeating: 0x41, count: 8192)
        try units.withUnsafeMutableBytes { try f.cryptWhole($0, firstUnit: 3, count: 2, encrypt: true) }
        XCTAssertFalse(try XTSContext.forCurrentThread().holdsKey, "the XTS key schedule must not outlive the request")
        try units.withUnsafeMutableBytes { try f.cryptWhole($0, firstUnit: 3, count: 2, encrypt: false) }
        XCTAssertEqual(units, [UInt8](repeating: 0x41, count: 8192))
    }

    /// The two algorithms' keys come from different labels: never the same bytes.
    func testTheTwoAlgorithmsHaveUnrelatedKeys() throws {
        let k1 = try XCTUnwrap(try file(.hmacSHA256).tagKey).withUnsafeBytes { Array($0) }
        let k2 = try XCTUnwrap(try file(.ghashAES256).tagKey).withUnsafeBytes { Array($0) }
        XCTAssertEqual(k1.count, 32)
        XCTAssertEqual(k2.count, 64)
        XCTAssertNotEqual(k1, Array(k2[0..<32]))
        XCTAssertNotEqual(k1, Array(k2[32...]))
    }

    func hexString(_ b: [UInt8]) -> String {
        b.map { ($0 < 16 ? "0" : "") + String($0, radix: 16) }.joined()
    }
}
