import XCTest
import XTSCrypto
import XTSFormat
import XTSKeys
import XTSSystem
@testable import XTSContent

/// `openUnits` and `sealUnits` (what a DEK rekey does to an integrity file, one group at
/// a time) agree with the mount's own reads and writes: units a write made open, a
/// changed byte or a zeroed unit fails as a read fails, and a group sealed under another
/// generation's keys reads back through `ContentFile` with that generation.
final class IntegrityRekeyUnitTests: XCTestCase {
    typealias L = IntegrityLayout
    let old = try! KeySet.generate(generation: 1, volumeID: Array(repeating: 9, count: 16))
    let new = try! KeySet.generate(generation: 2, volumeID: Array(repeating: 9, count: 16))

    func content(_ f: MemoryFile, current: KeySet) -> ContentFile<MemoryFile> {
        let (o, n) = (old, new)
        return ContentFile(file: f, currentKeys: current, unitTags: .ghashAES256) { $0 == o.generation ? o : $0 == n.generation ? n : nil }
    }

    /// A file of 10 units of which unit 3 is a hole and unit 9 is partial, written through
    /// the mount's path under generation 1.
    func oldFile() throws -> (MemoryFile, [UInt8], FileCrypto) {
        let f = MemoryFile()
        let c = content(f, current: old)
        var x: UInt64 = 0x9E37_79B9_7F4A_7C15
        var plain = (0..<9 * 4096 + 100).map { _ -> UInt8 in x ^= x << 13; x ^= x >> 7; x ^= x << 17; return UInt8(truncatingIfNeeded: x) }
        for i in 3 * 4096..<4 * 4096 { plain[i] = 0 }
        var crypto = try plain.withUnsafeBytes { try c.write($0, at: 0, crypto: nil) }
        crypto = try c.zeroRange(3 * 4096..<4 * 4096, crypto: crypto) ?? crypto
        XCTAssertTrue(f.bytes[Int(L.dataOffset(unit: 3))..<Int(L.dataOffset(unit: 3)) + 4096].allSatisfy { $0 == 0 }, "unit 3 is a hole")
        return (f, plain, crypto)
    }

    func open(_ f: MemoryFile, _ crypto: FileCrypto, units: Int) throws -> (plain: [UInt8], tags: [UInt8]) {
        var data = Array(f.bytes[4096..<4096 + units * 4096])
        let entries = Array(f.bytes[64..<64 + units * 32])
        var tags = [UInt8](repeating: 0, count: units * 16)
        try entries.withUnsafeBytes { e in
            try data.withUnsafeMutableBytes { d in try tags.withUnsafeMutableBytes { t in try crypto.openUnits(firstUnit: 0, count: units, entries: e, data: d, tags: t) } }
        }
        return (data, tags)
    }

    func testOpenAgreesWithTheMountsWrites() throws {
        let (f, plain, crypto) = try oldFile()
        let (opened, tags) = try open(f, crypto, units: 10)
        XCTAssertEqual(Array(opened[0..<plain.count]), plain)
        // Each tag is the one in slot A or slot B of its entry.
        for i in 0..<10 {
            let t = Array(tags[i * 16..<(i + 1) * 16])
            let e = 64 + i * 32
            XCTAssertTrue(t == Array(f.bytes[e..<e + 16]) || t == Array(f.bytes[e + 16..<e + 32]), "unit \(i)")
        }
        // A changed byte, and a data unit zeroed, fail as a read does.
        for (at, what) in [(Int(L.dataOffset(unit: 6)) + 5, "a flipped byte"), (Int(L.dataOffset(unit: 7)), "a zeroed unit")] {
            let g = MemoryFile()
            g.bytes = f.bytes
            if what == "a zeroed unit" { for i in at..<at + 4096 { g.bytes[i] = 0 } } else { g.bytes[at] ^= 1 }
            XCTAssertThrowsError(try open(g, crypto, units: 10), what) { error in
                guard case ContentError.authentication(let why) = error else { return XCTFail("\(what): \(error)") }
                XCTAssertTrue(why.hasPrefix("unit \(what == "a zeroed unit" ? 7 : 6) "), why)
            }
        }
    }

    func testSealedGroupReadsBackUnderTheNewGeneration() throws {
        let (f, plain, crypto) = try oldFile()
        var (data, _) = try open(f, crypto, units: 10)
        let hole = (0..<10).map { $0 == 3 }
        var h = try IntegrityFileHeader.random(tags: .ghashAES256, keyGeneration: new.generation)
        h.plainLength = UInt64(plain.count)
        let to = try FileCrypto(keys: new, integrityHeader: h)
        var tags = [UInt8](repeating: 0, count: 10 * 16)
        try data.withUnsafeMutableBytes { d in try tags.withUnsafeMutableBytes { t in try to.sealUnits(firstUnit: 0, count: 10, data: d, hole: { hole[$0] }, tags: t) } }
        // The new file: header and slot A of each entry in the tag block, the new ciphertext after it.
        let g = MemoryFile()
        var tagBlock = try h.encode(macKey: new.metadataMACKey) + [UInt8](repeating: 0, count: 4096 - 64)
        for i in 0..<10 { tagBlock.replaceSubrange(64 + i * 32..<64 + i * 32 + 16, with: tags[i * 16..<(i + 1) * 16]) }
        g.bytes = tagBlock + data
        XCTAssertEqual(g.bytes.count, Int(L.backingSize(plainSize: Int64(plain.count))))
        XCTAssertTrue(g.bytes[Int(L.dataOffset(unit: 3))..<Int(L.dataOffset(unit: 3)) + 4096].allSatisfy { $0 == 0 }, "the hole stayed a hole")
        let c = content(g, current: new)
        var out = [UInt8](repeating: 0, count: plain.count + 10)
        let n = try out.withUnsafeMutableBytes { try c.read(into: $0, at: 0, crypto: nil) }
        XCTAssertEqual(Array(out[0..<n]), plain)
        XCTAssertEqual(try c.loadCrypto()?.keys.generation, 2)
        // And it opens under the new keys with the tags it was sealed with.
        let (again, tags2) = try open(g, to, units: 10)
        XCTAssertEqual(Array(again[0..<plain.count]), plain)
        XCTAssertEqual(tags2, tags)
    }
}
