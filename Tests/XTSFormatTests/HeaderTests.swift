import Foundation
import XCTest
import XTSCrypto
import XTSKeys
import XTSSystem
@testable import XTSFormat

final class HeaderTests: XCTestCase {
    /// A header with every field fixed, so its bytes never change unless the format does.
    static func fixedHeader() -> VolumeHeader {
        let params = PassphraseParameters(salt: Array(0..<32), argon2: Argon2idParameters(memoryKiB: 65536, iterations: 3, parallelism: 4))
        var slot = Keyslot(index: 0, provider: .passphrase, wrap: .aes256KWP, keyGeneration: 1, created: 1_790_000_000,
                           parameters: params.encode(), wrappedKey: Array(100..<172), keyDigest: Array(200..<232))
        slot.lastUsed = 1_790_000_100
        var h = VolumeHeader(sequence: 7, volumeID: Array(repeating: 0xab, count: 16), created: 1_790_000_000, keyGeneration: 1, keyslots: [slot])
        h.mac = Array(repeating: 0x5a, count: 32)
        return h
    }

    func golden(_ name: String) throws -> [UInt8]? {
        guard let url = Bundle.module.url(forResource: "Golden", withExtension: nil)?.appendingPathComponent(name),
              let text = try? String(contentsOf: url, encoding: .utf8) else { return nil }
        let hex = text.filter { !$0.isWhitespace }
        return stride(from: 0, to: hex.count, by: 2).map {
            UInt8(hex[hex.index(hex.startIndex, offsetBy: $0)..<hex.index(hex.startIndex, offsetBy: $0 + 2)], radix: 16)!
        }
    }

    func checkGolden(_ bytes: [UInt8], _ name: String, file: StaticString = #filePath, line: UInt = #line) throws {
        if ProcessInfo.processInfo.environment["XTSFS_WRITE_GOLDEN"] == "1" {
            let dir = URL(fileURLWithPath: #filePath).deletingLastPathComponent().appendingPathComponent("Golden")
            let hex = stride(from: 0, to: bytes.count, by: 32).map { bytes[$0..<min($0 + 32, bytes.count)].map { String(format: "%02x", $0) }.joined() }.joined(separator: "\n")
            try (hex + "\n").write(to: dir.appendingPathComponent(name), atomically: true, encoding: .utf8)
            return
        }
        guard let expected = try golden(name) else { return XCTFail("golden file \(name) missing", file: file, line: line) }
        XCTAssertEqual(bytes, expected, "\(name): the encoding changed; format v1 is frozen", file: file, line: line)
    }

    func testVolumeHeaderGoldenBytesAndRoundTrip() throws {
        let h = Self.fixedHeader()
        let bytes = try h.encode()
        XCTAssertEqual(bytes.count, 72 + (4 + 2 * 4 + 4 + 8 + 8 + 2 + 44 + 2 + 72 + 32) + 4 + 32 + 32)
        XCTAssertEqual(Array(bytes[0..<8]), Array("XTSFSHDR".utf8))
        try checkGolden(bytes, "volume-header-v1.hex")
        XCTAssertEqual(try VolumeHeader.decode(bytes), h)
    }

    func testFileAndDirectoryHeaderGoldenBytes() throws {
        let key = SecretBytes(copying: Array(0..<32))
        let fh = FileHeader(keyGeneration: 1, nonce: Array(16..<32))
        let fb = try fh.encode(macKey: key)
        XCTAssertEqual(fb.count, FileHeader.length)
        try checkGolden(fb, "file-header-v1.hex")
        XCTAssertEqual(try FileHeader.decode(fb, macKey: key), fh)
        let dh = DirHeader(keyGeneration: 1, directoryID: Array(32..<48))
        let db = try dh.encode(macKey: key)
        XCTAssertEqual(db.count, DirHeader.length)
        try checkGolden(db, "dir-header-v1.hex")
        XCTAssertEqual(try DirHeader.decode(db, macKey: key), dh)
        // A different key: the MAC says no.
        let other = SecretBytes(copying: Array(1..<33))
        XCTAssertThrowsError(try FileHeader.decode(fb, macKey: other))
        XCTAssertThrowsError(try DirHeader.decode(db, macKey: other))
    }

    func testEveryBitFlipAndTruncationIsDetected() throws {
        let bytes = try Self.fixedHeader().encode()
        for i in 0..<bytes.count {
            for bit in 0..<8 {
                var b = bytes
                b[i] ^= UInt8(1 << bit)
                XCTAssertThrowsError(try VolumeHeader.decode(b), "flip byte \(i) bit \(bit) went unnoticed")
            }
        }
        for n in 0..<bytes.count {
            XCTAssertThrowsError(try VolumeHeader.decode(Array(bytes.prefix(n))), "truncated to \(n)")
        }
        XCTAssertThrowsError(try VolumeHeader.decode(bytes + [0]))
    }

    /// A small fuzzer: random mutations with the checksum repaired, so the parser's deeper
    /// checks are reached. Every input must give a header or a FormatError, never a crash.
    func testMutatedHeadersWithValidChecksumNeverCrash() throws {
        let base = try Self.fixedHeader().encode()
        var rng: UInt64 = 0x1234_5678
        func next() -> Int { rng ^= rng << 13; rng ^= rng >> 7; rng ^= rng << 17; return Int(rng % 1_000_000_007) }
        var accepted = 0
        for _ in 0..<5000 {
            var b = Array(base.dropLast(32))
            for _ in 0..<(1 + next() % 4) {
                switch next() % 4 {
                case 0: b[8 + next() % (b.count - 8)] = UInt8(next() % 256)
                case 1: if b.count > 20 { b.remove(at: 16 + next() % (b.count - 16)) }
                case 2: b.insert(UInt8(next() % 256), at: 16 + next() % (b.count - 16))
                default: b[12 + next() % 4] = UInt8(next() % 256) // the length field
                }
            }
            b += SHA256.hash(b)
            do { _ = try VolumeHeader.decode(b); accepted += 1 } catch { _ = error.description } // typed: only FormatError can come out
        }
        XCTAssertLessThan(accepted, 5000, "mutations should mostly be refused")
    }

    func testUnknownVersionAndFeatureRefused() throws {
        var h = Self.fixedHeader()
        h.features = Features(rawValue: 1 << 40)
        XCTAssertThrowsError(try VolumeHeader.decode(try h.encode())) { XCTAssertEqual($0 as? FormatError, .unsupportedFeatures(1 << 40)) }
        h.features = []
        var b = try h.encode()
        b[8] = 9
        // A flipped version byte is damage, not a newer format: the checksum no longer matches.
        XCTAssertThrowsError(try VolumeHeader.decode(b)) {
            guard case .checksumMismatch = $0 as? FormatError else { return XCTFail("\($0)") }
        }
        // A newer xtsfs writes a whole header, checksum included.
        let body = Array(b[0..<(b.count - 32)])
        b = body + SHA256.hash(body)
        XCTAssertThrowsError(try VolumeHeader.decode(b)) { XCTAssertEqual($0 as? FormatError, .unsupportedVersion(9)) }
    }

    /// Bit 3 (tag algorithm 2) names the unit tags of an integrity volume; alone it is damage.
    func testUnitTagFeature() throws {
        XCTAssertNil(Features.contents(nil).unitTags)
        XCTAssertEqual(Features.contents(.hmacSHA256).rawValue, 1)
        // Tag algorithm 2 volumes are made with listing manifests (bit 5) since they exist.
        XCTAssertEqual(Features.contents(.ghashAES256).rawValue, 0b10_1001)
        // File roots (bit 6) since they exist.
        XCTAssertEqual(Features.contents(.ghashAES256Root).rawValue, 0b110_1001)
        for tags in UnitTagAlgorithm.allCases {
            var h = Self.fixedHeader()
            h.features = Features.contents(tags).union(.rekeyInProgress)
            XCTAssertEqual(try VolumeHeader.decode(try h.encode()).features.unitTags, tags)
        }
        var h = Self.fixedHeader()
        h.features = .ghashUnitTags
        XCTAssertThrowsError(try VolumeHeader.decode(try h.encode())) {
            guard case .invalid = $0 as? FormatError else { return XCTFail("\($0)") }
        }
        // Bit 6 (file roots) without bits 0 and 3 is damage.
        for f: Features in [.fileRoots, [.fileRoots, .blockAuthentication]] {
            h.features = f
            XCTAssertThrowsError(try VolumeHeader.decode(try h.encode())) {
                guard case .invalid = $0 as? FormatError else { return XCTFail("\($0)") }
            }
        }
        // Bit 5 (listing manifests) without bit 0 is damage too.
        h.features = .listingManifests
        XCTAssertThrowsError(try VolumeHeader.decode(try h.encode())) {
            guard case .invalid = $0 as? FormatError else { return XCTFail("\($0)") }
        }
    }

    /// The integrity file header's version is its tag algorithm: 1, 2 and 3 decode, others
    /// not. Version 3's MAC covers the file root: it needs one to be written and checked,
    /// and does not verify under another root.
    func testIntegrityFileHeaderVersions() throws {
        let key = SecretBytes(copying: [UInt8](repeating: 7, count: 32))
        let root = [UInt8](repeating: 0xA5, count: 16)
        for tags in UnitTagAlgorithm.allCases {
            let h = IntegrityFileHeader(tags: tags, keyGeneration: 3, nonce: [UInt8](repeating: 1, count: 16), plainLength: 12345)
            let bytes = try h.encode(macKey: key, root: tags.hasFileRoot ? root : nil)
            XCTAssertEqual(Array(bytes[0..<2]), [UInt8(tags.rawValue), 0])
            XCTAssertEqual(try IntegrityFileHeader.decode(bytes, macKey: key, root: tags.hasFileRoot ? root : nil).tags, tags)
            XCTAssertEqual(try IntegrityFileHeader.parse(bytes), try IntegrityFileHeader.decode(bytes, macKey: key, root: tags.hasFileRoot ? root : nil))
            if tags.hasFileRoot {
                XCTAssertThrowsError(try h.encode(macKey: key), "no root")
                XCTAssertThrowsError(try IntegrityFileHeader.decode(bytes, macKey: key), "no root")
                var other = root
                other[15] ^= 1
                XCTAssertThrowsError(try IntegrityFileHeader.decode(bytes, macKey: key, root: other)) {
                    XCTAssertEqual($0 as? FormatError, .checksumMismatch("integrity file header"))
                }
            }
        }
        var h = IntegrityFileHeader(tags: .ghashAES256, keyGeneration: 3, nonce: [UInt8](repeating: 1, count: 16), plainLength: 1)
        h.version = 4
        XCTAssertThrowsError(try IntegrityFileHeader.decode(try h.encode(macKey: key), macKey: key)) {
            XCTAssertEqual($0 as? FormatError, .unsupportedVersion(4))
        }
    }

    /// The reserved fields at offsets 10 and 70 are kept as stored and covered by the MAC:
    /// changing one (checksum recomputed) leaves a header that parses but does not verify.
    func testReservedFieldsAreAuthenticated() throws {
        let keys = try KeySet(dek: SecretBytes(copying: (0..<64).map { UInt8($0) }), generation: 1, volumeID: Array(repeating: 7, count: 16))
        let sealed = try Keyring.seal(Self.fixedHeader(), keys: keys)
        let good = try sealed.encode()
        XCTAssertNoThrow(try Keyring.verify(try VolumeHeader.decode(good), keys: keys))
        for offset in [10, 11, 70, 71] {
            var b = good
            b[offset] ^= 0x01
            let body = Array(b[0..<(b.count - 32)])
            b = body + SHA256.hash(body)
            let h = try VolumeHeader.decode(b)
            XCTAssertThrowsError(try Keyring.verify(h, keys: keys), "offset \(offset) must be covered by the MAC")
            XCTAssertEqual(try h.encode(), b, "offset \(offset): re-encoding keeps the bytes as stored")
        }
    }

    func testHeaderStoreChoosesNewestValidCopy() throws {
        var template = Array("/tmp/xtsfs-format-XXXXXX".utf8CString)
        let dir = String(cString: mkdtemp(&template)!)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let store = HeaderStore(directory: dir)
        XCTAssertThrowsError(try store.load()) { guard case .notAVolume = $0 as? HeaderStore.LoadError else { return XCTFail("\($0)") } }
        var h = Self.fixedHeader()
        try store.write(h)
        XCTAssertEqual(try store.load().candidates.count, 2)
        // Newer sequence in one copy only (a crash between the two writes): it wins.
        h.sequence = 8
        try Sys.atomicWrite(try h.encode(), to: store.path(0))
        XCTAssertEqual(try store.load().newest.sequence, 8)
        // Damage the newer one: the older copy still loads, and the damage is reported.
        var bad = try h.encode()
        bad[40] ^= 1
        try Sys.atomicWrite(bad, to: store.path(0))
        let loaded = try store.load()
        XCTAssertEqual(loaded.newest.sequence, 7)
        XCTAssertEqual(loaded.damaged.map(\.copy), [0])
        try Sys.atomicWrite(bad, to: store.path(1))
        XCTAssertThrowsError(try store.load()) { guard case .invalid = $0 as? HeaderStore.LoadError else { return XCTFail("\($0)") } }
    }

    func testHeaderStoreNeverOverwritesAnotherVolumesCopy() throws {
        var template = Array("/tmp/xtsfs-format-XXXXXX".utf8CString)
        let dir = String(cString: mkdtemp(&template)!)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let store = HeaderStore(directory: dir)
        var h = Self.fixedHeader()
        try store.write(h)
        // Same volume, newer: replaces both copies.
        h.sequence += 1
        try store.write(h)
        XCTAssertEqual(try store.load().candidates.map(\.header.sequence), [h.sequence, h.sequence])
        // A damaged copy is repaired.
        try Sys.atomicWrite([1, 2, 3], to: store.path(1))
        try store.write(h)
        XCTAssertEqual(try store.load().candidates.count, 2)
        // Another volume's valid header in one copy: nothing at all is written.
        var foreign = h
        foreign.volumeID = Array(repeating: 0xcd, count: 16)
        foreign.sequence = 99
        let foreignBytes = try foreign.encode()
        try Sys.atomicWrite(foreignBytes, to: store.path(1))
        let before = try Sys.readFile(store.path(0), limit: 1 << 16)
        h.sequence += 1
        XCTAssertThrowsError(try store.write(h)) { error in
            guard case .foreignCopy(let file, let id) = error as? HeaderStore.WriteError else { return XCTFail("\(error)") }
            XCTAssertEqual(file, store.path(1))
            XCTAssertEqual(id, foreign.volumeID)
        }
        XCTAssertEqual(try Sys.readFile(store.path(0), limit: 1 << 16), before)
        XCTAssertEqual(try Sys.readFile(store.path(1), limit: 1 << 16), foreignBytes)
    }

    func testHeaderStoreRefusesAWriteBasedOnAnOutdatedSequence() throws {
        var template = Array("/tmp/xtsfs-format-XXXXXX".utf8CString)
        let dir = String(cString: mkdtemp(&template)!)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let store = HeaderStore(directory: dir)
        var h = Self.fixedHeader()
        try store.write(h)
        // Based on what is on disk (7): written.
        h.sequence = 8
        try store.write(h, expectedSequence: 7)
        // Another host writes 9 meanwhile; a change made to 8 is refused, nothing written.
        var other = h
        other.sequence = 9
        other.keyslots = []
        try store.write(other, expectedSequence: 8)
        let before = try (0..<2).map { try Sys.readFile(store.path($0), limit: 1 << 16) }
        h.sequence = 9
        XCTAssertThrowsError(try store.write(h, expectedSequence: 8)) { error in
            guard case .concurrentChange(let expected, let found) = error as? HeaderStore.WriteError else { return XCTFail("\(error)") }
            XCTAssertEqual(expected, 8)
            XCTAssertEqual(found, 9)
            XCTAssertTrue("\(error)".contains("another host"))
        }
        XCTAssertEqual(try (0..<2).map { try Sys.readFile(store.path($0), limit: 1 << 16) }, before)
        XCTAssertEqual(try store.load().newest.keyslots.count, 0, "the other host's change stays")
        // Half-written (one copy newer after a crash): the newest copy is the base.
        h.sequence = 10
        try Sys.atomicWrite(try h.encode(), to: store.path(0))
        h.sequence = 11
        try store.write(h, expectedSequence: 10)
        XCTAssertEqual(try store.load().candidates.map(\.header.sequence), [11, 11])
        XCTAssertEqual(try FileManager.default.contentsOfDirectory(atPath: dir).sorted(), HeaderStore.fileNames, "no temporary left")
    }
}
