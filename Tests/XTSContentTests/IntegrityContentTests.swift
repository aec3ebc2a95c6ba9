import XCTest
import XTSCrypto
import XTSFormat
import XTSKeys
import XTSSystem
@testable import XTSContent

/// A memory file that accepts `budget` more changes and then fails every call, as a
/// daemon killed by SIGKILL between two of its system calls: what was written stays.
final class DyingFile: BackingFile {
    let inner: MemoryFile
    var budget: Int
    init(_ inner: MemoryFile, budget: Int) { self.inner = inner; self.budget = budget }
    private func spend() throws(SystemError) {
        if budget <= 0 { throw SystemError(5, "killed") }
        budget -= 1
    }
    func read(into buffer: UnsafeMutableRawBufferPointer, at offset: Int64) throws(SystemError) -> Int { try inner.read(into: buffer, at: offset) }
    /// The write that meets the end of the budget is torn at the first page boundary, as a
    /// pwrite cut short by SIGKILL (the kernel copies page by page).
    func write(_ buffer: UnsafeRawBufferPointer, at offset: Int64) throws(SystemError) {
        if budget == 0 {
            let boundary = Int((offset / 4096 + 1) * 4096 - offset)
            if boundary < buffer.count { try inner.write(UnsafeRawBufferPointer(rebasing: buffer[0..<boundary]), at: offset) }
        }
        try spend()
        try inner.write(buffer, at: offset)
    }
    func size() throws(SystemError) -> Int64 { try inner.size() }
    func truncate(_ size: Int64) throws(SystemError) { try spend(); try inner.truncate(size) }
    func punchHole(at offset: Int64, length: Int64) throws(SystemError) { try spend(); try inner.punchHole(at: offset, length: length) }
}

final class IntegrityLayoutTests: XCTestCase {
    typealias L = IntegrityLayout

    func testGeometry() {
        XCTAssertEqual(L.unitsPerGroup, 126)
        XCTAssertEqual(L.groupLength, 520_192)
        XCTAssertEqual(L.entryOffset(unit: 0), 64)
        XCTAssertEqual(L.entryOffset(unit: 125), 64 + 125 * 32)
        XCTAssertEqual(L.entryOffset(unit: 126), 520_192 + 64)
        XCTAssertEqual(L.dataOffset(unit: 0), 4096)
        XCTAssertEqual(L.dataOffset(unit: 125), 126 * 4096)
        XCTAssertEqual(L.dataOffset(unit: 126), 520_192 + 4096)
        XCTAssertEqual(L.groupRuns(120..<260), [120..<126, 126..<252, 252..<260])
        XCTAssertEqual(L.units(overlapping: 4095..<4097), 0..<2)
        XCTAssertEqual(L.units(overlapping: 4096..<8192), 1..<2)
    }

    /// The worked sizes of FORMAT.md section 12.
    func testWorkedSizes() {
        let expected: [(Int64, Int64)] = [
            (0, 64), (1, 8192), (15, 8192), (4095, 8192), (4096, 8192), (4097, 12_288), (8192, 12_288),
            (516_096, 520_192), (516_097, 528_384), (1 << 20, 1_060_864), (1 << 30, 1_082_265_600),
        ]
        for (plain, backing) in expected {
            XCTAssertEqual(L.backingSize(plainSize: plain), backing, "plain \(plain)")
            if plain > 0 {
                XCTAssertEqual(L.largestPlainSize(backingSize: backing), L.unitCount(plain) * 4096, "plain \(plain)")
            }
        }
    }
}

/// Every test runs twice: with tag algorithm 2 (what new volumes use), then with tag
/// algorithm 1 (older volumes, still read and written).
final class IntegrityContentTests: XCTestCase {
    typealias L = IntegrityLayout
    let keys = try! KeySet.generate(generation: 1, volumeID: Array(repeating: 9, count: 16))
    var tagAlgorithm: UnitTagAlgorithm = .ghashAES256

    /// Runs `body` once per tag algorithm; a failure is followed by a line naming the
    /// algorithm it happened with.
    func bothAlgorithms(_ body: () throws -> Void) throws {
        for a in [UnitTagAlgorithm.ghashAES256Root, .ghashAES256, .hmacSHA256] {
            tagAlgorithm = a
            let before = testRun?.totalFailureCount ?? 0
            defer { if (testRun?.totalFailureCount ?? 0) > before { print("(the failure above is with unit tags \(a))") } }
            do { try body() } catch { throw Failure(algorithm: a, error: error) }
        }
    }

    struct Failure: Error, CustomStringConvertible {
        let algorithm: UnitTagAlgorithm
        let error: any Error
        var description: String { "with unit tags \(algorithm): \(error)" }
    }

    func content<F: BackingFile>(_ f: F, tags: UnitTagAlgorithm? = nil) -> ContentFile<F> {
        let k = keys
        return ContentFile(file: f, currentKeys: k, unitTags: tags ?? tagAlgorithm) { $0 == k.generation ? k : nil }
    }

    /// A file written under one tag algorithm, read on a volume of the other: its header is
    /// damage (EIO), for reads and writes, never data checked with the wrong algorithm.
    func testAFileOfTheOtherTagAlgorithmIsDamage() throws {
        try bothAlgorithms {
            let (m, c, plain) = try makeWritten()
            let other: UnitTagAlgorithm = tagAlgorithm == .ghashAES256 ? .hmacSHA256 : .ghashAES256
            XCTAssertEqual(Int(m.bytes[0]), Int(tagAlgorithm.rawValue), "the header's version is the tag algorithm")
            let wrong = content(m, tags: other)
            for what in ["size", "read", "write", "keys"] {
                XCTAssertThrowsError(try {
                    switch what {
                    case "size": _ = try wrong.plainSize()
                    case "read": _ = try readAll(wrong)
                    case "write": try write(wrong, [1, 2, 3], at: 10)
                    default: _ = try wrong.loadCrypto()
                    }
                }(), what) { e in
                    guard case .badHeader(let why) = e as? ContentError else { return XCTFail("\(what): \(e)") }
                    XCTAssertTrue(why.contains("version \(tagAlgorithm.rawValue)"), why)
                }
            }
            XCTAssertEqual(try readAll(c), plain, "nothing was changed by the refused write")
            // The version field is under the header's MAC: changing it is damage too.
            m.bytes[0] = UInt8(other.rawValue)
            assertTampered(c, "version changed")
            XCTAssertThrowsError(try readAll(wrong))
        }
    }

    func readAll<F: BackingFile>(_ c: ContentFile<F>, _ crypto: FileCrypto? = nil) throws -> [UInt8] {
        let size = Int(try c.plainSize())
        var out = [UInt8](repeating: 0, count: size + 100)
        let n = try out.withUnsafeMutableBytes { try c.read(into: $0, at: 0, crypto: crypto) }
        XCTAssertEqual(n, size)
        return Array(out[0..<n])
    }

    @discardableResult
    func write<F: BackingFile>(_ c: ContentFile<F>, _ data: [UInt8], at offset: Int64, _ crypto: FileCrypto? = nil) throws -> FileCrypto {
        try data.withUnsafeBytes { try c.write($0, at: offset, crypto: crypto) }
    }

    func assertTampered<F: BackingFile>(_ c: ContentFile<F>, _ message: String, file: StaticString = #filePath, line: UInt = #line) {
        XCTAssertThrowsError(try readAll(c), message, file: file, line: line) { e in
            guard let ce = e as? ContentError else { return XCTFail("\(e)", file: file, line: line) }
            switch ce {
            case .authentication, .badHeader: break
            default: XCTFail("\(message): \(ce)", file: file, line: line)
            }
        }
    }

    func testEdgeLengthsRoundTrip() throws {
        try bothAlgorithms {
            for n in [1, 15, 16, 4095, 4096, 4097, 8192, 516_096, 516_097, 1_100_001] {
                let m = MemoryFile(), c = content(m)
                let plain = try Random.bytes(n)
                try write(c, plain, at: 0)
                XCTAssertEqual(Int64(m.bytes.count), L.backingSize(plainSize: Int64(n)), "length \(n)")
                XCTAssertEqual(try c.plainSize(), Int64(n))
                XCTAssertEqual(try readAll(c), plain, "length \(n)")
                XCTAssertEqual(try readAll(c, try c.loadCrypto()), plain, "length \(n) after reload")
            }
        }
    }

    /// Random writes, truncates and hole punches against a model array.
    func testRandomOperationsMatchModel() throws {
        try bothAlgorithms {
            var rng = SystemRandomNumberGenerator()
            for round in 0..<6 {
                let m = MemoryFile(), c = content(m)
                var model: [UInt8] = []
                var crypto: FileCrypto?
                for step in 0..<40 {
                    let limit = round % 2 == 0 ? 20_000 : 700_000
                    switch Int.random(in: 0..<10, using: &rng) {
                    case 0...5:
                        let off = Int.random(in: 0...limit, using: &rng), n = Int.random(in: 1...20_000, using: &rng)
                        let d = try Random.bytes(n)
                        crypto = try write(c, d, at: Int64(off), crypto)
                        if model.count < off + n { model += [UInt8](repeating: 0, count: off + n - model.count) }
                        model.replaceSubrange(off..<off + n, with: d)
                    case 6, 7:
                        let s = Int.random(in: 0...limit, using: &rng)
                        crypto = try c.truncate(to: Int64(s), crypto: crypto)
                        if s < model.count { model.removeLast(model.count - s) } else { model += [UInt8](repeating: 0, count: s - model.count) }
                    default:
                        guard !model.isEmpty else { continue }
                        let a = Int.random(in: 0..<model.count, using: &rng), b = min(model.count, a + Int.random(in: 1...30_000, using: &rng))
                        crypto = try c.zeroRange(Int64(a)..<Int64(b), crypto: crypto)
                        for i in a..<b { model[i] = 0 }
                    }
                    XCTAssertEqual(try c.plainSize(), Int64(model.count), "round \(round) step \(step)")
                    XCTAssertEqual(try readAll(c, crypto), model, "round \(round) step \(step)")
                }
                XCTAssertEqual(try readAll(c, try c.loadCrypto()), model)
            }
        }
    }

    /// Reads of every shape: inside a unit, across units and groups, runs covered whole
    /// (decrypted in the caller's buffer) and in part (through scratch), to the end.
    func testReadsAtAnyOffsetAndLength() throws {
        try bothAlgorithms {
            let n = 3 * 126 * 4096 + 5000
            let (_, c, plain) = try makeWritten(n, seed: 9)
            let crypto = try c.loadCrypto()
            let B = 4096, G = 126 * 4096
            let cases: [(Int, Int)] = [(0, 1), (5, 100), (B - 1, 2), (0, B), (B, 3 * B), (0, G), (0, G + 1), (B, G),
                                       (G - B, 2 * B), (G, G), (100, 2 * G), (0, n), (0, n + 10_000), (n - 10, 100),
                                       (2 * G + 7, G), (n, 5), (n + 4096, 5)]
            for (off, len) in cases {
                var out = [UInt8](repeating: 0xCC, count: len)
                let got = try out.withUnsafeMutableBytes { try c.read(into: $0, at: Int64(off), crypto: crypto) }
                let want = off < n ? Array(plain[off..<min(n, off + len)]) : []
                XCTAssertEqual(got, want.count, "read \(len) at \(off)")
                XCTAssertTrue(Array(out[0..<got]) == want, "read \(len) at \(off)")
            }
        }
    }

    func testHolesStaySparseAndReadAsZeros() throws {
        try bothAlgorithms {
            let m = MemoryFile(), c = content(m)
            var crypto = try write(c, [1, 2, 3], at: 0)
            crypto = try c.truncate(to: 3 << 20, crypto: crypto)!
            var expected = [UInt8](repeating: 0, count: 3 << 20)
            expected[0] = 1; expected[1] = 2; expected[2] = 3
            XCTAssertEqual(try readAll(c, crypto), expected)
            // Every data block past unit 0 is zeros (a hole); only tag blocks were written.
            let second = Int(L.dataOffset(unit: 1))
            XCTAssertTrue(m.bytes[second..<second + 4096].allSatisfy { $0 == 0 })
            // Punching a written unit makes a hole too.
            crypto = try write(c, [UInt8](repeating: 0xAB, count: 8192), at: 8192, crypto)
            crypto = try c.zeroRange(8192..<16384, crypto: crypto)!
            let u2 = Int(L.dataOffset(unit: 2))
            XCTAssertTrue(m.bytes[u2..<u2 + 8192].allSatisfy { $0 == 0 })
            XCTAssertEqual(try readAll(c, crypto), expected)
        }
    }

    // MARK: - tampering

    func makeWritten(_ n: Int = 10 * 4096 + 100, seed: UInt8 = 1) throws -> (MemoryFile, ContentFile<MemoryFile>, [UInt8]) {
        let m = MemoryFile(), c = content(m)
        let plain = (0..<n).map { UInt8(truncatingIfNeeded: $0 * 31 + Int(seed)) }
        try write(c, plain, at: 0)
        return (m, c, plain)
    }

    func testBitFlipInDataIsDetected() throws {
        try bothAlgorithms {
            let (m, c, _) = try makeWritten()
            m.bytes[Int(L.dataOffset(unit: 3)) + 100] ^= 1
            assertTampered(c, "bit flip in a unit")
        }
    }

    func testBitFlipInTagIsDetected() throws {
        try bothAlgorithms {
            let (m, c, plain) = try makeWritten()
            // Written once: slot A holds the tag, slot B is empty. Flipping B changes nothing
            // the unit needs; with a file root, it changes the tag block the root commits to.
            m.bytes[Int(L.entryOffset(unit: 2)) + 16] ^= 1
            if tagAlgorithm.hasFileRoot { assertTampered(c, "bit flip in an empty slot") } else { XCTAssertEqual(try readAll(c), plain) }
            m.bytes[Int(L.entryOffset(unit: 2)) + 16] ^= 1
            m.bytes[Int(L.entryOffset(unit: 2)) + 3] ^= 1
            assertTampered(c, "bit flip in a tag")
        }
    }

    func testBitFlipInHeaderIsDetected() throws {
        try bothAlgorithms {
            for offset in [0, 5, 10, 24, 30, 40, 50, 63] {
                let (m, c, _) = try makeWritten()
                m.bytes[offset] ^= 0x10
                assertTampered(c, "bit flip in header byte \(offset)")
            }
        }
    }

    func testUnitMovedWithinFileIsDetected() throws {
        try bothAlgorithms {
            let (m, c, _) = try makeWritten()
            // Unit 1's ciphertext and entry copied over unit 4's.
            let d1 = Int(L.dataOffset(unit: 1)), d4 = Int(L.dataOffset(unit: 4))
            let e1 = Int(L.entryOffset(unit: 1)), e4 = Int(L.entryOffset(unit: 4))
            m.bytes.replaceSubrange(d4..<d4 + 4096, with: m.bytes[d1..<d1 + 4096])
            m.bytes.replaceSubrange(e4..<e4 + 32, with: m.bytes[e1..<e1 + 32])
            assertTampered(c, "unit moved within the file")
        }
    }

    func testUnitMovedBetweenFilesIsDetected() throws {
        try bothAlgorithms {
            let (ma, _, _) = try makeWritten(seed: 1)
            let (mb, cb, _) = try makeWritten(seed: 2)
            let d = Int(L.dataOffset(unit: 2)), e = Int(L.entryOffset(unit: 2))
            mb.bytes.replaceSubrange(d..<d + 4096, with: ma.bytes[d..<d + 4096])
            mb.bytes.replaceSubrange(e..<e + 32, with: ma.bytes[e..<e + 32])
            assertTampered(cb, "unit moved to another file at the same index")
        }
    }

    func testZeroedUnitIsDetected() throws {
        try bothAlgorithms {
            let (m, c, _) = try makeWritten()
            let d = Int(L.dataOffset(unit: 5)), e = Int(L.entryOffset(unit: 5))
            for i in d..<d + 4096 { m.bytes[i] = 0 }
            assertTampered(c, "unit zeroed (ciphertext only)")
            for i in e..<e + 32 { m.bytes[i] = 0 }
            assertTampered(c, "unit zeroed (ciphertext and entry)")
        }
    }

    func testTruncationAndExtension() throws {
        try bothAlgorithms {
            let (m, c, plain) = try makeWritten()
            let full = m.bytes
            // Cut at a unit boundary, at a tag block boundary, and inside a unit.
            for cut in [Int(L.dataOffset(unit: 10)), Int(L.dataOffset(unit: 7)), Int(L.dataOffset(unit: 7)) + 1000, 4096, 100] {
                m.bytes = Array(full.prefix(cut))
                assertTampered(c, "backing cut to \(cut) bytes")
            }
            // Extended: bytes past the committed length are never read as data.
            m.bytes = full + (try Random.bytes(20_000))
            XCTAssertEqual(try c.plainSize(), Int64(plain.count))
            XCTAssertEqual(try readAll(c), plain)
            // The length itself cannot be changed without the header MAC failing.
            m.bytes = full
            m.bytes[24] ^= 1
            assertTampered(c, "length field changed")
        }
    }

    func testHeaderTransplantIsDetected() throws {
        try bothAlgorithms {
            let (ma, _, _) = try makeWritten(seed: 1)
            let (mb, cb, _) = try makeWritten(seed: 2)
            mb.bytes.replaceSubrange(0..<64, with: ma.bytes[0..<64])
            assertTampered(cb, "header copied from another file")
            // Writing through the transplanted header is refused too: it would reuse A's key.
            XCTAssertThrowsError(try write(cb, [1, 2, 3], at: 5000, try cb.loadCrypto()))
            XCTAssertThrowsError(try write(cb, [UInt8](repeating: 1, count: 8192), at: 4096, try cb.loadCrypto()))
        }
    }

    /// Without a file root (FORMAT.md 12.7): a unit and its entry put back from an older
    /// copy of the same file, without the rest of the file, read as the older data. With a
    /// file root (12.11) it is detected, in group 0 (whose tag block shares the header's
    /// page) and in later groups, whether the unit comes back with its entry, with its whole
    /// tag block, or alone; only the whole file put back (header included) is not.
    func testReplayOfAnOlderUnitVersion() throws {
        try bothAlgorithms {
            for unit in [3, 130] {
                let (m, c, plain) = try makeWritten(140 * 4096 + 100)
                let d = Int(L.dataOffset(unit: Int64(unit))), e = Int(L.entryOffset(unit: Int64(unit)))
                let block = Int(L.tagBlockOffset(group: L.group(of: Int64(unit))))
                let old = m.bytes
                try write(c, [UInt8](repeating: 0xEE, count: 4096), at: Int64(unit) * 4096)
                let middle = m.bytes
                try write(c, [UInt8](repeating: 0xDD, count: 4096), at: Int64(unit) * 4096)
                let now = m.bytes
                var expected = plain
                expected.replaceSubrange(unit * 4096..<unit * 4096 + 4096, with: repeatElement(0xDD, count: 4096))
                XCTAssertEqual(try readAll(c), expected)
                for (what, from) in [("the first version", old), ("the version before the last", middle)] {
                    m.bytes = now
                    m.bytes.replaceSubrange(d..<d + 4096, with: from[d..<d + 4096])
                    if tagAlgorithm.hasFileRoot {
                        assertTampered(c, "unit \(unit): \(what) put back alone")
                    } else if from == middle {
                        XCTAssertEqual(try readAll(c)[unit * 4096], 0xEE, "unit \(unit): the previous version's tag is still in the other slot")
                    }
                    m.bytes.replaceSubrange(e..<e + 32, with: from[e..<e + 32])
                    if tagAlgorithm.hasFileRoot {
                        assertTampered(c, "unit \(unit): \(what) put back with its entry")
                        m.bytes.replaceSubrange(block..<block + 4096, with: from[block..<block + 4096])
                        // Group 0's tag block holds the header: put back whole, with nothing
                        // else changed since, it is the whole file put back (read below).
                        if block > 0 { assertTampered(c, "unit \(unit): \(what) put back with its whole tag block") }
                    } else {
                        XCTAssertNotEqual(try readAll(c), expected, "unit \(unit): replay is not detected (documented)")
                    }
                }
                // The whole file put back: an older file, which nothing in it can tell.
                m.bytes = old
                XCTAssertEqual(try readAll(c), plain)
                m.bytes = now
                XCTAssertEqual(try readAll(c), expected)
            }
        }
    }

    /// A backing file that claims `size` bytes (sparse: zeros past the real ones) and
    /// counts the reads made of it.
    final class SparseFile: BackingFile {
        let inner: MemoryFile
        let claimed: Int64
        var reads = 0
        init(_ inner: MemoryFile, claimed: Int64) { self.inner = inner; self.claimed = claimed }
        func read(into buffer: UnsafeMutableRawBufferPointer, at offset: Int64) throws(SystemError) -> Int {
            reads += 1
            guard offset < claimed else { return 0 }
            let n = Int(min(Int64(buffer.count), claimed - offset))
            buffer.baseAddress!.initializeMemory(as: UInt8.self, repeating: 0, count: n)
            if offset < Int64(inner.bytes.count) { _ = try inner.read(into: UnsafeMutableRawBufferPointer(rebasing: buffer[0..<n]), at: offset) }
            return n
        }
        func write(_ buffer: UnsafeRawBufferPointer, at offset: Int64) throws(SystemError) { throw SystemError(30, "read-only") }
        func size() throws(SystemError) -> Int64 { claimed }
        func truncate(_ size: Int64) throws(SystemError) { throw SystemError(30, "read-only") }
        func punchHole(at offset: Int64, length: Int64) throws(SystemError) { throw SystemError(30, "read-only") }
    }

    /// File roots: a planted header claiming a huge length over a sparse backing file (no
    /// key needed: the MAC can only be checked after the scan) stops the scan at the first
    /// tag block of zeros, and one claiming more than the largest file is refused before
    /// any tag block is read: the daemon never reads (or keeps) without bound.
    func testAPlantedHugeLengthIsRefusedWithoutAScan() throws {
        tagAlgorithm = .ghashAES256Root
        for (length, maxReads) in [(Int64(1) << 40, 8), (Int64(1) << 50, 4)] {
            let (m, _, _) = try makeWritten()
            for i in 0..<8 { m.bytes[24 + i] = UInt8(truncatingIfNeeded: length >> (8 * i)) }
            let sparse = SparseFile(m, claimed: L.backingSize(plainSize: length))
            XCTAssertThrowsError(try content(sparse).plainSize(), "length \(length)")
            XCTAssertLessThanOrEqual(sparse.reads, maxReads, "length \(length): reads")
        }
        // Growing a file past the largest one a file root covers fails, with nothing written.
        let (m, c, plain) = try makeWritten()
        let before = m.bytes
        XCTAssertThrowsError(try write(c, [1], at: 3 << 40)) { e in
            guard case .io(let s) = e as? ContentError else { return XCTFail("\(e)") }
            XCTAssertEqual(s.errno, 27, "EFBIG")
        }
        XCTAssertEqual(m.bytes, before)
        XCTAssertEqual(try readAll(c), plain)
    }

    // MARK: - crash consistency

    /// File roots: a change cut off after its tag block (both tags) and its ciphertext
    /// leaves the unit readable as the new version; the file's next change (here of
    /// another group) first keeps only the tag the unit has now, so the version from before
    /// the cut-off change cannot be put back afterwards.
    func testAChangeCutOffIsSettledByTheNextOne() throws {
        tagAlgorithm = .ghashAES256Root
        for next in ["write", "shrink"] {
            let (m, c, plain) = try makeWritten(140 * 4096 + 100)
            let d = Int(L.dataOffset(unit: 130))
            let before = Array(m.bytes[d..<d + 4096])
            // Tag block with both tags, then the ciphertext; the writer dies before the rest.
            XCTAssertThrowsError(try [UInt8](repeating: 0xAB, count: 4096).withUnsafeBytes {
                try content(DyingFile(m, budget: 2)).write($0, at: 130 * 4096, crypto: nil)
            })
            var expected = plain
            expected.replaceSubrange(130 * 4096..<131 * 4096, with: repeatElement(0xAB, count: 4096))
            XCTAssertEqual(try readAll(c), expected, "the new version, after the cut-off change")
            if next == "write" {
                try write(c, [7], at: 5)
                expected[5] = 7
            } else {
                _ = try c.truncate(to: 135 * 4096, crypto: nil)
                expected = Array(expected.prefix(135 * 4096))
            }
            XCTAssertEqual(try readAll(c), expected)
            m.bytes.replaceSubrange(d..<d + 4096, with: before)
            assertTampered(c, "the version from before the cut-off change put back after the next \(next)")
        }
    }

    /// A new file's first write, stopped anywhere: the file is empty or complete.
    func testFirstWriteStoppedAnywhereReadsEmptyOrWhole() throws {
        try bothAlgorithms {
            let data = (0..<(130 * 4096 + 5)).map { UInt8(truncatingIfNeeded: $0 &* 13) }
            var stop = 0
            while true {
                let m = MemoryFile()
                let dying = DyingFile(m, budget: stop)
                var finished = true
                do { _ = try data.withUnsafeBytes { try content(dying).write($0, at: 0, crypto: nil) } } catch { finished = false }
                let got = try readAll(content(m))
                XCTAssertTrue(got.isEmpty || (finished && got == data), "stopped after \(stop) writes: \(got.count) bytes")
                if finished { break }
                stop += 1
            }
            XCTAssertEqual(stop, 4, "data of group 0, entries and data of group 1, header with group 0's entries")
        }
    }

    /// Listing manifests (FORMAT.md 12.10): a file has its header with a file ID from its
    /// creation; emptying keeps the file ID with a new nonce (64 bytes), a file without a
    /// header is damage, and a file ID on a volume without manifests (or none on one with
    /// them) is damage. A first write into a header-only file, stopped anywhere, reads as
    /// empty or whole, and so does emptying.
    func testFileIDsAreKeptAndAFileWithoutAHeaderIsDamage() throws {
        let id = [UInt8](repeating: 0x5c, count: 16)
        func ids<F: BackingFile>(_ f: F) -> ContentFile<F> {
            let k = keys
            return ContentFile(file: f, currentKeys: k, unitTags: tagAlgorithm, fileIDs: true) { $0 == k.generation ? k : nil }
        }
        func fileID(_ m: MemoryFile) -> [UInt8] { Array(m.bytes[32..<48]) }
        let m = MemoryFile()
        _ = try ids(m).writeNewHeader(fileID: id)
        XCTAssertEqual(m.bytes.count, 64)
        XCTAssertEqual(try ids(m).plainSize(), 0)
        XCTAssertEqual(fileID(m), id)
        let data = (0..<(130 * 4096 + 5)).map { UInt8(truncatingIfNeeded: $0 &* 11) }
        try write(ids(m), data, at: 0)
        XCTAssertEqual(try readAll(ids(m)), data)
        XCTAssertEqual(fileID(m), id, "kept by writes")
        let nonce = Array(m.bytes[8..<24])
        _ = try ids(m).truncate(to: 0, crypto: nil)
        XCTAssertEqual(m.bytes.count, 64, "emptied to its header")
        XCTAssertEqual(fileID(m), id, "kept when emptied")
        XCTAssertNotEqual(Array(m.bytes[8..<24]), nonce, "a new nonce when emptied")
        XCTAssertEqual(try readAll(ids(m)), [])
        // The wrong kind of volume.
        XCTAssertThrowsError(try content(m).plainSize(), "a file ID without listing manifests")
        let plain = MemoryFile()
        try write(content(plain), [1, 2, 3], at: 0)
        XCTAssertThrowsError(try ids(plain).plainSize(), "no file ID with listing manifests")
        XCTAssertThrowsError(try ids(MemoryFile()).plainSize(), "0 bytes with listing manifests")
        let zeros = MemoryFile()
        zeros.bytes = [UInt8](repeating: 0, count: 64)
        XCTAssertThrowsError(try ids(zeros).plainSize(), "64 zero bytes with listing manifests")
        // Stopped anywhere: the first write into a header-only file, and emptying a file.
        var stop = 0
        while true {
            let f = MemoryFile()
            _ = try ids(f).writeNewHeader(fileID: id)
            var finished = true
            do { _ = try data.withUnsafeBytes { try ids(DyingFile(f, budget: stop)).write($0, at: 0, crypto: nil) } } catch { finished = false }
            let got = try readAll(ids(f))
            XCTAssertTrue(got.isEmpty || (finished && got == data), "first write stopped after \(stop) writes: \(got.count) bytes")
            XCTAssertEqual(fileID(f), id)
            if finished { break }
            stop += 1
        }
        XCTAssertEqual(stop, 4, "data of group 0, entries and data of group 1, header with group 0's entries")
        stop = 0
        while true {
            let f = MemoryFile()
            _ = try ids(f).writeNewHeader(fileID: id)
            try write(ids(f), data, at: 0)
            var finished = true
            do { _ = try ids(DyingFile(f, budget: stop)).truncate(to: 0, crypto: nil) } catch { finished = false }
            let got = try readAll(ids(f))
            XCTAssertTrue(got == data || got.isEmpty, "emptying stopped after \(stop) writes")
            XCTAssertEqual(fileID(f), id)
            if finished { XCTAssertEqual(f.bytes.count, 64); break }
            stop += 1
        }
    }

    /// Every operation stopped after each possible number of its writes: every unit still
    /// authenticates (nothing reads as an error), the size is the old or the new one, and
    /// bytes the operation did not touch are unchanged.
    func testEveryStopPointLeavesAReadableFile() throws {
        try bothAlgorithms {
            typealias Op = (ContentFile<DyingFile>, FileCrypto?) throws -> FileCrypto?
            let base = (0..<(130 * 4096 + 777)).map { UInt8(truncatingIfNeeded: $0 * 7 + 3) }
            let ops: [(String, Range<Int>?, Op)] = [
                ("overwrite inside", 5000..<300_000, { c, k in try [UInt8](repeating: 1, count: 295_000).withUnsafeBytes { try c.write($0, at: 5000, crypto: k) } }),
                ("append across a group", 130 * 4096..<140 * 4096, { c, k in
                    let d = [UInt8](repeating: 2, count: 10 * 4096 - 777)
                    return try d.withUnsafeBytes { try c.write($0, at: Int64(130 * 4096 + 777), crypto: k) } }),
                ("write far past the end", 130 * 4096..<900_000, { c, k in try [9, 9, 9].withUnsafeBytes { try c.write($0, at: 899_997, crypto: k) } }),
                ("shrink", 10_000..<base.count, { c, k in try c.truncate(to: 10_000, crypto: k) }),
                ("grow", base.count..<base.count, { c, k in try c.truncate(to: 2_000_000, crypto: k) }),
                ("punch", 4096..<200_000, { c, k in try c.zeroRange(4096..<200_000, crypto: k) }),
                ("empty", 0..<base.count, { c, k in try c.truncate(to: 0, crypto: k) }),
            ]
            for (name, touched, op) in ops {
                var stop = 0
                while true {
                    let m = MemoryFile()
                    try write(content(m), base, at: 0)
                    let dying = DyingFile(m, budget: stop)
                    let c = content(dying)
                    var finished = true
                    do { _ = try op(c, try c.loadCrypto()) } catch { finished = false }
                    let after = content(m)
                    let got: [UInt8]
                    do { got = try readAll(after) } catch { XCTFail("\(name), stopped after \(stop) writes: \(error)"); break }
                    for i in 0..<min(got.count, base.count) where !(touched?.contains(i) ?? false) {
                        if got[i] != base[i] { XCTFail("\(name), stopped after \(stop) writes: byte \(i) changed"); break }
                    }
                    if finished { break }
                    stop += 1
                    if stop > 1000 { XCTFail("\(name): never finishes"); break }
                }
                XCTAssertGreaterThan(stop, 0, name)
            }
        }
    }
}

