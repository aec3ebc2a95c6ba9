import XCTest
import XTSCrypto
import XTSFormat
import XTSKeys

/// The listing manifest codec and the element/accumulator arithmetic (FORMAT.md 12.10).
final class ListManifestTests: XCTestCase {
    let keys = try! KeySet.generate(generation: 3, volumeID: [UInt8](repeating: 7, count: 16))
    let dirID = [UInt8](repeating: 0xd1, count: 16)

    func element(_ name: String, _ id: UInt8, type: UInt8 = 8, dir: [UInt8]? = nil) throws -> [UInt8] {
        try ListingElement.element(key: keys.listElementKey, directoryID: dir ?? dirID, type: type, name: Array(name.utf8), identity: [UInt8](repeating: id, count: 16))
    }

    func testElementsBindEveryField() throws {
        let base = try element("a", 1)
        XCTAssertEqual(base.count, 16)
        XCTAssertEqual(try element("a", 1), base, "deterministic")
        XCTAssertNotEqual(try element("b", 1), base, "name")
        XCTAssertNotEqual(try element("a", 2), base, "identity")
        XCTAssertNotEqual(try element("a", 1, type: 4), base, "type")
        XCTAssertNotEqual(try element("a", 1, dir: [UInt8](repeating: 0xd2, count: 16)), base, "directory")
        // Name and identity are length-delimited: shifting bytes between them changes the element.
        XCTAssertNotEqual(try ListingElement.element(key: keys.listElementKey, directoryID: dirID, type: 8, name: [0x61, 1], identity: [UInt8](repeating: 1, count: 15) + [0]),
                          try ListingElement.element(key: keys.listElementKey, directoryID: dirID, type: 8, name: [0x61], identity: [UInt8](repeating: 1, count: 16)))
        let other = try KeySet.generate(generation: 4, volumeID: [UInt8](repeating: 7, count: 16))
        XCTAssertNotEqual(try ListingElement.element(key: other.listElementKey, directoryID: dirID, type: 8, name: [0x61], identity: [UInt8](repeating: 1, count: 16)), base, "key")
    }

    /// The accumulator is order-independent, a removal undoes an add, and a swap of the
    /// identities of two names changes it.
    func testAccumulator() throws {
        let a = try element("a", 1), b = try element("b", 2)
        let ab = ListingElement.xor(ListingElement.xor(ListingElement.zero, a), b)
        XCTAssertEqual(ab, ListingElement.xor(ListingElement.xor(ListingElement.zero, b), a))
        XCTAssertEqual(ListingElement.xor(ab, b), a)
        let swapped = ListingElement.xor(try element("a", 2), try element("b", 1))
        XCTAssertNotEqual(swapped, ab)
        // Sealing is a permutation: it round-trips, and a sealed value is not the accumulator.
        let sealed = try ListingElement.seal(key: keys.listSealKey, ab)
        XCTAssertNotEqual(sealed, ab)
        XCTAssertEqual(try ListingElement.open(key: keys.listSealKey, sealed), ab)
    }

    func testManifestRoundTripAndBinding() throws {
        let a = try ListingElement.seal(key: keys.listSealKey, ListingElement.zero)
        let b = try ListingElement.seal(key: keys.listSealKey, try element("x", 9))
        let m = ListManifest(keyGeneration: 3, slotA: a, slotB: b)
        let bytes = try m.encode(macKey: keys.listMACKey, directoryID: dirID)
        XCTAssertEqual(bytes.count, ListManifest.length)
        XCTAssertEqual(Array(bytes[0..<8]), Array("XTSFSLST".utf8))
        XCTAssertEqual(ListManifest.generation(of: bytes), 3)
        let back = try ListManifest.decode(bytes, macKey: keys.listMACKey, directoryID: dirID)
        XCTAssertEqual(back, m)
        XCTAssertTrue(back.pending)
        XCTAssertFalse(ListManifest(keyGeneration: 3, slotA: a, slotB: a).pending)
        // Another directory: the MAC fails (a manifest cannot be moved).
        XCTAssertThrowsError(try ListManifest.decode(bytes, macKey: keys.listMACKey, directoryID: [UInt8](repeating: 0, count: 16)))
        // Another key.
        XCTAssertThrowsError(try ListManifest.decode(bytes, macKey: keys.metadataMACKey, directoryID: dirID))
    }

    /// Hostile bytes: every length but 64, every single-bit flip, and random bytes are
    /// clean errors.
    func testHostileBytesAreCleanErrors() throws {
        let good = try ListManifest(keyGeneration: 3, slotA: [UInt8](repeating: 1, count: 16), slotB: [UInt8](repeating: 1, count: 16)).encode(macKey: keys.listMACKey, directoryID: dirID)
        for n in [0, 1, 8, 15, 16, 47, 48, 63, 65, 128, 4096] {
            let bytes = n <= 64 ? Array(good.prefix(n)) : good + [UInt8](repeating: 0, count: n - 64)
            XCTAssertThrowsError(try ListManifest.decode(bytes, macKey: keys.listMACKey, directoryID: dirID), "length \(n)")
            if n != 64 { XCTAssertNil(ListManifest.generation(of: bytes)) }
        }
        for bit in 0..<(64 * 8) {
            var b = good
            b[bit / 8] ^= UInt8(1 << (bit % 8))
            XCTAssertThrowsError(try ListManifest.decode(b, macKey: keys.listMACKey, directoryID: dirID), "bit \(bit)")
        }
        var rng = SystemRandomNumberGenerator()
        for _ in 0..<1000 {
            let b = (0..<64).map { _ in UInt8.random(in: 0...255, using: &rng) }
            XCTAssertThrowsError(try ListManifest.decode(b, macKey: keys.listMACKey, directoryID: dirID))
        }
        // Flags other than 0 and version other than 1, even with a valid MAC, are refused.
        var flagged = ListManifest(keyGeneration: 3, slotA: [UInt8](repeating: 1, count: 16), slotB: [UInt8](repeating: 1, count: 16))
        flagged.flags = 1
        XCTAssertThrowsError(try ListManifest.decode(try flagged.encode(macKey: keys.listMACKey, directoryID: dirID), macKey: keys.listMACKey, directoryID: dirID))
    }

    /// Bit 5 is known, and only with bit 0; the integrity file header carries the file ID
    /// under its MAC.
    func testFeatureBitAndFileID() throws {
        XCTAssertTrue(Features.known.contains(.listingManifests))
        XCTAssertEqual(Features.listingManifests.rawValue, 1 << 5)
        XCTAssertTrue(Features.contents(.ghashAES256).contains(.listingManifests))
        var h = try IntegrityFileHeader.random(tags: .ghashAES256, keyGeneration: 1)
        XCTAssertEqual(h.fileID, IntegrityFileHeader.noFileID)
        h.fileID = [UInt8](repeating: 0xab, count: 16)
        var bytes = try h.encode(macKey: keys.metadataMACKey)
        XCTAssertEqual(Array(bytes[32..<48]), h.fileID)
        XCTAssertEqual(try IntegrityFileHeader.decode(bytes, macKey: keys.metadataMACKey).fileID, h.fileID)
        bytes[40] ^= 1
        XCTAssertThrowsError(try IntegrityFileHeader.decode(bytes, macKey: keys.metadataMACKey), "the file ID is under the MAC")
    }
}
