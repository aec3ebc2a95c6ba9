import CCrypto
import XCTest
import XTSCrypto

final class XTSTests: XCTestCase {
    struct File: Decodable {
        struct Vector: Decodable {
            let name: String
            let key: String
            let unit: UInt64?
            let tweak: String
            let plaintext: String
            let ciphertext: String
        }
        let aes256: [Vector]
        let aes128CiphertextStealing: [Vector]
    }

    private func context(key: [UInt8], encrypt: Bool) throws -> XTSContext {
        let ctx = try XTSContext()
        try key.withUnsafeBytes { try ctx.setKey($0, encrypt: encrypt) }
        return ctx
    }

    private func run(_ ctx: XTSContext, unit: UInt64, _ input: [UInt8]) throws -> [UInt8] {
        var output = [UInt8](repeating: 0, count: input.count)
        try input.withUnsafeBytes { i in
            try output.withUnsafeMutableBytes { o in
                try ctx.crypt(unit: unit, input: i.baseAddress!, output: o.baseAddress!, count: input.count)
            }
        }
        return output
    }

    private func run(_ ctx: XTSContext, tweak: [UInt8], _ input: [UInt8]) throws -> [UInt8] {
        var output = [UInt8](repeating: 0, count: input.count)
        try input.withUnsafeBytes { i in
            try output.withUnsafeMutableBytes { o in
                try ctx.crypt(tweak: tweak, input: i.baseAddress!, output: o.baseAddress!, count: input.count)
            }
        }
        return output
    }

    // MARK: IEEE 1619-2007 vectors 10-14 (XTS-AES-256, 512-byte data units)

    func testIEEE1619AES256Vectors() throws {
        let file = try Vectors.load("xts_ieee1619.json", as: File.self)
        XCTAssertEqual(file.aes256.count, 5)
        let enc = try XTSContext()
        let dec = try XTSContext()
        for v in file.aes256 {
            let key = try hex(v.key), plaintext = try hex(v.plaintext), ciphertext = try hex(v.ciphertext)
            XCTAssertEqual(plaintext.count, 512, v.name)
            // The same context re-keyed per vector, as the file system does.
            try key.withUnsafeBytes { try enc.setKey($0, encrypt: true) }
            try key.withUnsafeBytes { try dec.setKey($0, encrypt: false) }
            let unit = try XCTUnwrap(v.unit, v.name)
            XCTAssertEqual(hexString(try run(enc, unit: unit, plaintext)), v.ciphertext, v.name)
            XCTAssertEqual(try run(dec, unit: unit, ciphertext), plaintext, v.name)
            // The raw-tweak form must agree with the unit-number form.
            XCTAssertEqual(hexString(try run(enc, tweak: try hex(v.tweak), plaintext)), v.ciphertext, v.name)
            XCTAssertEqual(try run(dec, tweak: try hex(v.tweak), ciphertext), plaintext, v.name)
        }
    }

    func testInPlaceOperation() throws {
        let file = try Vectors.load("xts_ieee1619.json", as: File.self)
        let v = file.aes256[0]
        let ctx = try context(key: try hex(v.key), encrypt: true)
        var buffer = try hex(v.plaintext)
        try buffer.withUnsafeMutableBytes { b in
            try ctx.crypt(unit: try XCTUnwrap(v.unit), input: b.baseAddress!, output: b.baseAddress!, count: b.count)
        }
        XCTAssertEqual(hexString(buffer), v.ciphertext)
    }

    // MARK: Ciphertext stealing
    //
    // IEEE 1619-2007 has ciphertext-stealing vectors (15-18) only for XTS-AES-128.
    // They validate the reference implementation below (written from the standard's
    // algorithm on top of plain AES-ECB); that reference then checks the AES-256
    // context at lengths that are not a multiple of 16.

    func testReferenceImplementationMatchesIEEE1619StealingVectors() throws {
        let file = try Vectors.load("xts_ieee1619.json", as: File.self)
        XCTAssertEqual(file.aes128CiphertextStealing.count, 4)
        for v in file.aes128CiphertextStealing {
            let out = try ReferenceXTS.encrypt(key: try hex(v.key), tweak: try hex(v.tweak), plaintext: try hex(v.plaintext))
            XCTAssertEqual(hexString(out), v.ciphertext, v.name)
        }
        // And on the full-block AES-256 vectors.
        for v in file.aes256 {
            let out = try ReferenceXTS.encrypt(key: try hex(v.key), tweak: try hex(v.tweak), plaintext: try hex(v.plaintext))
            XCTAssertEqual(hexString(out), v.ciphertext, v.name)
        }
    }

    func testAES256StealingAgreesWithReference() throws {
        let key = try Random.bytes(64)
        let enc = try context(key: key, encrypt: true)
        let dec = try context(key: key, encrypt: false)
        for length in [17, 18, 31, 33, 47, 100, 511, 513, 4095, 4097, 4111] {
            let plaintext = try Random.bytes(length)
            let unit: UInt64 = 0x0123_4567_89ab_cdef &+ UInt64(length)
            let ours = try run(enc, unit: unit, plaintext)
            var tweak = [UInt8](repeating: 0, count: 16)
            withUnsafeBytes(of: unit.littleEndian) { for i in 0..<8 { tweak[i] = $0[i] } }
            XCTAssertEqual(ours, try ReferenceXTS.encrypt(key: key, tweak: tweak, plaintext: plaintext), "length \(length)")
            XCTAssertEqual(try run(dec, unit: unit, ours), plaintext, "length \(length)")
        }
    }

    func testRoundTripAllLengths16To4111() throws {
        let key = try Random.bytes(64)
        let enc = try context(key: key, encrypt: true)
        let dec = try context(key: key, encrypt: false)
        let source = try Random.bytes(4111)
        for length in 16...4111 {
            let plaintext = Array(source[0..<length])
            let ciphertext = try run(enc, unit: UInt64(length), plaintext)
            XCTAssertNotEqual(ciphertext, plaintext)
            let back = try run(dec, unit: UInt64(length), ciphertext)
            if back != plaintext { XCTFail("round trip failed at length \(length)"); return }
        }
    }

    func testRoundTripSelectedLengths() throws {
        let key = try Random.bytes(64)
        let enc = try context(key: key, encrypt: true)
        let dec = try context(key: key, encrypt: false)
        for length in [16, 17, 4095, 4096, 4096 + 15, 16 << 20] {
            let plaintext = try Random.bytes(length)
            let ciphertext = try run(enc, unit: 7, plaintext)
            XCTAssertEqual(ciphertext.count, length)
            XCTAssertNotEqual(ciphertext, plaintext, "length \(length)")
            XCTAssertEqual(try run(dec, unit: 7, ciphertext), plaintext, "length \(length)")
        }
    }

    func testStealingChangesOnlyTheLastFullBlock() throws {
        // With a partial tail, XTS encrypts every block before the last full one
        // exactly as without the tail; the last full block and the tail differ.
        let key = try Random.bytes(64)
        let enc = try context(key: key, encrypt: true)
        let plaintext = try Random.bytes(4096 + 5)
        let whole = try run(enc, unit: 42, Array(plaintext[0..<4096]))
        let stolen = try run(enc, unit: 42, plaintext)
        XCTAssertEqual(Array(stolen[0..<4080]), Array(whole[0..<4080]))
        XCTAssertNotEqual(Array(stolen[4080..<4096]), Array(whole[4080..<4096]))
        // The tail is the stolen head of the last full block's normal encryption.
        XCTAssertEqual(Array(stolen[4096...]), Array(whole[4080..<4085]))
    }

    func testUnitNumberChangesCiphertext() throws {
        let enc = try context(key: try Random.bytes(64), encrypt: true)
        let plaintext = [UInt8](repeating: 0, count: 4096)
        let a = try run(enc, unit: 0, plaintext)
        let b = try run(enc, unit: 1, plaintext)
        let c = try run(enc, unit: 1 << 40, plaintext)
        XCTAssertNotEqual(a, b)
        XCTAssertNotEqual(a, c)
        XCTAssertNotEqual(b, c)
        XCTAssertEqual(try run(enc, unit: 1, plaintext), b, "deterministic per unit")
    }

    // MARK: Rejected keys and inputs

    func testEqualKeyHalvesRejected() throws {
        let half = try Random.bytes(32)
        let key = half + half
        for encrypt in [true, false] {
            let ctx = try XTSContext()
            XCTAssertThrowsError(try key.withUnsafeBytes { try ctx.setKey($0, encrypt: encrypt) }) { error in
                guard case .openssl = error as? CryptoError else { return XCTFail("expected .openssl, got \(error)") }
            }
            // A rejected key leaves the context unusable rather than keyed with it.
            var out = [UInt8](repeating: 0, count: 16)
            let input = [UInt8](repeating: 1, count: 16)
            XCTAssertThrowsError(try input.withUnsafeBytes { i in
                try out.withUnsafeMutableBytes { try ctx.crypt(unit: 0, input: i.baseAddress!, output: $0.baseAddress!, count: 16) }
            })
        }
    }

    func testWrongKeyLengthRejected() throws {
        let ctx = try XTSContext()
        for length in [0, 32, 63, 65] {
            let key = [UInt8](repeating: 7, count: length)
            XCTAssertThrowsError(try key.withUnsafeBytes { try ctx.setKey($0, encrypt: true) }) { error in
                XCTAssertEqual(error as? CryptoError, .invalidKeyLength)
            }
        }
    }

    func testShortAndOversizedUnitsRejected() throws {
        let ctx = try context(key: try Random.bytes(64), encrypt: true)
        var buffer = [UInt8](repeating: 0, count: 16)
        for count in [0, 1, 15] {
            XCTAssertThrowsError(try buffer.withUnsafeMutableBytes { b in
                try ctx.crypt(unit: 0, input: b.baseAddress!, output: b.baseAddress!, count: count)
            }) { error in
                guard case .invalidInput = error as? CryptoError else { return XCTFail("expected .invalidInput, got \(error)") }
            }
        }
        // Checked before any memory is touched, so a small buffer is safe here.
        XCTAssertThrowsError(try buffer.withUnsafeMutableBytes { b in
            try ctx.crypt(unit: 0, input: b.baseAddress!, output: b.baseAddress!, count: (16 << 20) + 1)
        })
        XCTAssertThrowsError(try buffer.withUnsafeMutableBytes { b in
            try ctx.crypt(tweak: [1, 2, 3], input: b.baseAddress!, output: b.baseAddress!, count: 16)
        })
    }

    func testUnkeyedContextRefuses() throws {
        let ctx = try XTSContext()
        var buffer = [UInt8](repeating: 0, count: 32)
        XCTAssertThrowsError(try buffer.withUnsafeMutableBytes { b in
            try ctx.crypt(unit: 0, input: b.baseAddress!, output: b.baseAddress!, count: 32)
        })
    }

    // MARK: Per-thread contexts

    func testForCurrentThreadIsPerThread() throws {
        let first = try XTSContext.forCurrentThread()
        XCTAssertTrue(first === (try XTSContext.forCurrentThread()), "same object on the same thread")

        final class Box: @unchecked Sendable { var id: ObjectIdentifier?; var ciphertext: [UInt8] = []; var error: Error? }
        let key = try Random.bytes(64)
        let plaintext = try Random.bytes(4096)
        let expected = try run(try context(key: key, encrypt: true), unit: 9, plaintext)
        let boxes = (0..<4).map { _ in Box() }
        let done = DispatchGroup()
        for box in boxes {
            done.enter()
            Thread.detachNewThread {
                defer { done.leave() }
                do {
                    let ctx = try XTSContext.forCurrentThread()
                    box.id = ObjectIdentifier(ctx)
                    try key.withUnsafeBytes { try ctx.setKey($0, encrypt: true) }
                    var out = [UInt8](repeating: 0, count: plaintext.count)
                    try plaintext.withUnsafeBytes { i in
                        try out.withUnsafeMutableBytes { try ctx.crypt(unit: 9, input: i.baseAddress!, output: $0.baseAddress!, count: i.count) }
                    }
                    box.ciphertext = out
                } catch {
                    box.error = error
                }
            }
        }
        XCTAssertEqual(done.wait(timeout: .now() + 60), .success)
        for box in boxes {
            XCTAssertNil(box.error)
            XCTAssertEqual(box.ciphertext, expected)
        }
        XCTAssertFalse(boxes.contains { $0.id == ObjectIdentifier(first) }, "other threads get their own context")
    }
}

/// XTS-AES written directly from IEEE 1619-2007 section 5.3 (including ciphertext
/// stealing, 5.3.2) over single-block AES-ECB, to check OpenSSL's stealing for
/// AES-256, for which the standard publishes no stealing vectors.
enum ReferenceXTS {
    struct Failure: Error {}

    static func aesECB(key: [UInt8], block: [UInt8]) throws -> [UInt8] {
        let name = key.count == 16 ? "AES-128-ECB" : "AES-256-ECB"
        guard let cipher = EVP_CIPHER_fetch(nil, name, nil) else { throw Failure() }
        defer { EVP_CIPHER_free(cipher) }
        guard let ctx = EVP_CIPHER_CTX_new() else { throw Failure() }
        defer { EVP_CIPHER_CTX_free(ctx) }
        guard EVP_CipherInit_ex2(ctx, cipher, key, nil, 1, nil) == 1, EVP_CIPHER_CTX_set_padding(ctx, 0) == 1 else { throw Failure() }
        var out = [UInt8](repeating: 0, count: 32)
        var n: Int32 = 0
        guard EVP_CipherUpdate(ctx, &out, &n, block, 16) == 1, n == 16 else { throw Failure() }
        return Array(out[0..<16])
    }

    /// Multiplication by the primitive element α in GF(2^128), little-endian bytes.
    static func timesAlpha(_ t: [UInt8]) -> [UInt8] {
        var r = [UInt8](repeating: 0, count: 16)
        var carry: UInt8 = 0
        for j in 0..<16 {
            r[j] = (t[j] << 1) | carry
            carry = t[j] >> 7
        }
        if carry != 0 { r[0] ^= 0x87 }
        return r
    }

    static func encryptBlock(key1: [UInt8], t: [UInt8], _ p: [UInt8]) throws -> [UInt8] {
        let pp = zip(p, t).map { $0 ^ $1 }
        let cc = try aesECB(key: key1, block: pp)
        return zip(cc, t).map { $0 ^ $1 }
    }

    static func encrypt(key: [UInt8], tweak: [UInt8], plaintext: [UInt8]) throws -> [UInt8] {
        let half = key.count / 2
        let key1 = Array(key[0..<half]), key2 = Array(key[half...])
        var t = try aesECB(key: key2, block: tweak)
        let m = plaintext.count / 16, b = plaintext.count % 16
        var out: [UInt8] = []
        let fullBlocksBeforeTail = b == 0 ? m : m - 1
        for j in 0..<fullBlocksBeforeTail {
            out += try encryptBlock(key1: key1, t: t, Array(plaintext[j * 16..<j * 16 + 16]))
            t = timesAlpha(t)
        }
        if b != 0 {
            let cc = try encryptBlock(key1: key1, t: t, Array(plaintext[(m - 1) * 16..<m * 16]))
            t = timesAlpha(t)
            let tail = Array(cc[0..<b])
            let pp = Array(plaintext[(m * 16)...]) + Array(cc[b...])
            out += try encryptBlock(key1: key1, t: t, pp)
            out += tail
        }
        return out
    }
}
