import XCTest
import XTSCrypto
import XTSFormat
import XTSKeys
@testable import XTSContent

final class ContentFileTests: XCTestCase {
    let keys = try! KeySet.generate(generation: 1, volumeID: Array(repeating: 7, count: 16))

    func makeFile() -> (MemoryFile, ContentFile<MemoryFile>) {
        let m = MemoryFile()
        let k = keys
        return (m, ContentFile(file: m, currentKeys: k, unitTags: nil) { $0 == k.generation ? k : nil })
    }

    func readAll(_ c: ContentFile<MemoryFile>, _ crypto: FileCrypto?) throws -> [UInt8] {
        let size = Int(try c.plainSize())
        var out = [UInt8](repeating: 0, count: size + 100)
        let n = try out.withUnsafeMutableBytes { try c.read(into: $0, at: 0, crypto: crypto) }
        XCTAssertEqual(n, size)
        return Array(out[0..<n])
    }

    func write(_ c: ContentFile<MemoryFile>, _ data: [UInt8], at offset: Int64, _ crypto: FileCrypto?) throws -> FileCrypto {
        try data.withUnsafeBytes { try c.write($0, at: offset, crypto: crypto) }
    }

    func testEveryEdgeLengthRoundTripsAndIsLengthPreserving() throws {
        for n in [1, 2, 15, 16, 17, 31, 4095, 4096, 4097, 4110, 4111, 4112, 8191, 8192, 8193, 8207, 65536 + 5, 300_001] {
            let (m, c) = makeFile()
            let plain = try Random.bytes(n)
            let crypto = try write(c, plain, at: 0, nil)
            XCTAssertEqual(m.bytes.count, 32 + n, "length \(n)")
            XCTAssertEqual(try readAll(c, crypto), plain, "length \(n)")
            XCTAssertNotEqual(Array(m.bytes[32...]), plain, "length \(n): ciphertext equals plaintext")
            // A fresh reader (header from disk) sees the same.
            let loaded = try c.loadCrypto()
            XCTAssertEqual(loaded?.header, crypto.header)
            XCTAssertEqual(try readAll(c, loaded), plain, "length \(n) after reload")
        }
    }

    /// A size the backing filesystem refuses (EFBIG) leaves the file as it was: its size and
    /// every byte (the old last unit is not re-encrypted for a size that never comes).
    func testRefusedGrowthLeavesTheFileUnchanged() throws {
        for oldSize in [6000, 4100, 7, 8192] {
            let (m, c) = makeFile()
            let plain = try Random.bytes(oldSize)
            var crypto: FileCrypto? = try write(c, plain, at: 0, nil)
            let before = m.bytes
            m.maxSize = 1 << 20
            XCTAssertThrowsError(try write(c, [0x7a], at: 1 << 21, crypto), "pwrite far past the limit, from \(oldSize)")
            XCTAssertEqual(m.bytes, before, "pwrite from \(oldSize)")
            XCTAssertThrowsError(try c.truncate(to: 1 << 21, crypto: crypto), "truncate past the limit, from \(oldSize)")
            XCTAssertEqual(m.bytes, before, "truncate from \(oldSize)")
            // And the file still works.
            m.maxSize = .max
            crypto = try c.truncate(to: Int64(oldSize + 5000), crypto: crypto)
            XCTAssertEqual(try readAll(c, crypto), plain + [UInt8](repeating: 0, count: 5000))
        }
    }

    func testEmptyFileHasNoHeader() throws {
        let (m, c) = makeFile()
        XCTAssertNil(try c.loadCrypto())
        XCTAssertEqual(try readAll(c, nil), [])
        XCTAssertEqual(m.bytes.count, 0)
    }

    func testSameContentInTwoFilesEncryptsDifferently() throws {
        let plain = [UInt8](repeating: 0x41, count: 8192)
        let (m1, c1) = makeFile(), (m2, c2) = makeFile()
        _ = try write(c1, plain, at: 0, nil)
        _ = try write(c2, plain, at: 0, nil)
        XCTAssertNotEqual(m1.bytes[32...], m2.bytes[32...])
        // And equal blocks at different positions of one file differ too (tweak = unit number).
        XCTAssertNotEqual(m1.bytes[32..<4128], m1.bytes[4128..<8224])
    }

    func testTinyFileGetsFreshNonceOnEveryWrite() throws {
        let (m, c) = makeFile()
        var crypto = try write(c, Array("hello".utf8), at: 0, nil)
        let first = crypto.header.nonce
        let firstCipher = Array(m.bytes[32...])
        crypto = try write(c, Array("hello".utf8), at: 0, crypto)
        XCTAssertNotEqual(crypto.header.nonce, first)
        XCTAssertNotEqual(Array(m.bytes[32...]), firstCipher, "same tiny content must not give the same ciphertext")
        XCTAssertEqual(try readAll(c, crypto), Array("hello".utf8))
    }

    func testHolesReadAsZerosAndStaySparse() throws {
        let (m, c) = makeFile()
        var crypto = try write(c, [1, 2, 3], at: 0, nil)
        crypto = try write(c, [9], at: 3 * 4096 + 100, crypto)
        var expect = [UInt8](repeating: 0, count: 3 * 4096 + 101)
        expect[0] = 1; expect[1] = 2; expect[2] = 3; expect[3 * 4096 + 100] = 9
        XCTAssertEqual(try readAll(c, crypto), expect)
        // Block 1 and 2 were never written: still zeros in the backing file (a hole).
        XCTAssertTrue(m.bytes[(32 + 4096)..<(32 + 3 * 4096)].allSatisfy { $0 == 0 })
        // Truncating up leaves a hole too.
        let grown = try c.truncate(to: 10 * 4096, crypto: crypto)
        expect += [UInt8](repeating: 0, count: 10 * 4096 - expect.count)
        XCTAssertEqual(try readAll(c, grown), expect)
    }

    func testTruncateDownAndUpAcrossEveryBoundary() throws {
        let original = try Random.bytes(3 * 4096 + 40)
        for target in [0, 1, 15, 16, 17, 4095, 4096, 4097, 4111, 4112, 8192, 8200, 20000] {
            let (_, c) = makeFile()
            var crypto: FileCrypto? = try write(c, original, at: 0, nil)
            crypto = try c.truncate(to: Int64(target), crypto: crypto)
            var expect = Array(original.prefix(target))
            if target > original.count { expect += [UInt8](repeating: 0, count: target - original.count) }
            XCTAssertEqual(try readAll(c, crypto), expect, "truncate to \(target)")
            XCTAssertEqual(try readAll(c, try c.loadCrypto()), expect, "truncate to \(target), reloaded")
        }
    }

    func testDamagedHeaderIsAnErrorNotGarbage() throws {
        let (m, c) = makeFile()
        _ = try write(c, try Random.bytes(5000), at: 0, nil)
        m.bytes[10] ^= 1
        XCTAssertThrowsError(try c.loadCrypto())
        m.bytes[10] ^= 1
        XCTAssertNoThrow(try c.loadCrypto())
        m.bytes = Array(m.bytes.prefix(20))
        XCTAssertThrowsError(try c.loadCrypto())
    }

    func testReadsAtEveryOffsetMatch() throws {
        let (_, c) = makeFile()
        let plain = try Random.bytes(3 * 4096 + 7)
        let crypto = try write(c, plain, at: 0, nil)
        for (off, len) in [(0, 1), (1, 4096), (4095, 2), (4096, 4096), (8190, 5000), (12290, 10), (12295, 100), (20000, 10)] {
            var out = [UInt8](repeating: 0xee, count: len)
            let n = try out.withUnsafeMutableBytes { try c.read(into: $0, at: Int64(off), crypto: crypto) }
            let expect = off < plain.count ? Array(plain[off..<min(off + len, plain.count)]) : []
            XCTAssertEqual(Array(out.prefix(n)), expect, "read \(len) at \(off)")
        }
    }

    /// Random writes and truncates against a plain array model, every byte compared.
    func testRandomOperationsMatchAModel() throws {
        var rng = SplitMix(seed: 0x5eed)
        for round in 0..<20 {
            let (_, c) = makeFile()
            var model: [UInt8] = []
            var crypto: FileCrypto?
            for step in 0..<60 {
                if rng.next() % 5 == 0 {
                    let size = Int(rng.next() % 20000)
                    crypto = try c.truncate(to: Int64(size), crypto: crypto)
                    if size < model.count { model.removeLast(model.count - size) } else { model += [UInt8](repeating: 0, count: size - model.count) }
                } else {
                    let off = Int(rng.next() % 20000)
                    let len = Int(rng.next() % 9000) + 1
                    let data = (0..<len).map { _ in UInt8(truncatingIfNeeded: rng.next()) }
                    crypto = try write(c, data, at: Int64(off), crypto)
                    if model.count < off + len { model += [UInt8](repeating: 0, count: off + len - model.count) }
                    model.replaceSubrange(off..<off + len, with: data)
                }
                XCTAssertEqual(try readAll(c, crypto), model, "round \(round) step \(step)")
            }
        }
    }
}

/// Deterministic generator for reproducible random tests.
struct SplitMix {
    var state: UInt64
    init(seed: UInt64) { state = seed }
    mutating func next() -> UInt64 {
        state &+= 0x9E3779B97F4A7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58476D1CE4E5B9
        z = (z ^ (z >> 27)) &* 0x94D049BB133111EB
        return z ^ (z >> 31)
    }
}
