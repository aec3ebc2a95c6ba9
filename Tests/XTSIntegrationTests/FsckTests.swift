import Foundation
import XCTest
import XTSCrypto
import XTSFormat
import XTSKeys
import XTSVolume
#if canImport(Glibc)
import Glibc
#endif

/// `xtsfs fsck`: findings, repairs and exit codes on real volumes.
final class FsckTests: VolumeTestCase {
    struct Report: Decodable {
        struct Finding: Decodable {
            var kind: String
            var severity: String
            var backingPath: String
            var plaintextPath: String?
            var shadows: String?
            var repaired: String?
        }
        var findings: [Finding]
        var keyUsed: Bool
        var exitStatus: Int32
        var notes: [String]
    }

    func fsck(_ extra: [String] = [], key: Bool = true, file: StaticString = #filePath, line: UInt = #line) throws -> (Int32, Report) {
        let r = Harness.run(["fsck", cipher, "--json"] + (key ? ["--passfile", passfile] : ["--no-key"]) + extra)
        guard let report = try? JSONDecoder().decode(Report.self, from: Data(r.stdout.utf8)) else {
            XCTFail("fsck printed no report (status \(r.status)): \(r.stdout) \(r.stderr)", file: file, line: line)
            throw XCTSkip("no report")
        }
        XCTAssertEqual(report.exitStatus, r.status, file: file, line: line)
        return (r.status, report)
    }

    /// A volume with one of everything: short and long names, a subdirectory, a long
    /// symlink target (link store), an extended attribute.
    func populate() throws {
        mount()
        try FileManager.default.createDirectory(atPath: mnt + "/dir/sub", withIntermediateDirectories: true)
        try write(mnt + "/dir/a.txt", pattern(5000, seed: 1))
        try write(mnt + "/tiny", Array("abc".utf8))
        try write(mnt + "/" + String(repeating: "L", count: 200), pattern(100, seed: 2))
        try write(mnt + "/dir/empty", [])
        try FileManager.default.createSymbolicLink(atPath: mnt + "/short-link", withDestinationPath: "dir/a.txt")
        try FileManager.default.createSymbolicLink(atPath: mnt + "/long-link", withDestinationPath: String(repeating: "t", count: 3500))
        XCTAssertEqual(Harness.shell("python3 -c \"import os; os.setxattr('\(mnt)/dir/a.txt', 'user.color', b'blue')\""), 0)
        unmount()
    }

    /// Backing entries of a backing directory, without xtsfs's own files.
    func entries(_ dir: String) throws -> [String] {
        try FileManager.default.contentsOfDirectory(atPath: dir).filter { !$0.hasPrefix("xtsfs.") }.sorted()
    }

    func backingDir(_ dir: String = "") throws -> String {
        let base = dir.isEmpty ? cipher : dir
        for e in try entries(base) {
            var st = stat()
            if lstat(base + "/" + e, &st) == 0, st.st_mode & S_IFMT == S_IFDIR, e != "xtsfs.links" { return base + "/" + e }
        }
        throw XCTSkip("no directory")
    }

    func testCleanVolumeIsCleanWithAndWithoutKey() throws {
        initVolume()
        try populate()
        let (status, report) = try fsck()
        XCTAssertEqual(status, FsckExit.clean.rawValue, "\(report.findings)")
        XCTAssertTrue(report.findings.isEmpty)
        XCTAssertTrue(report.keyUsed)
        let (s2, r2) = try fsck(key: false)
        XCTAssertEqual(s2, 0)
        XCTAssertFalse(r2.keyUsed)
        XCTAssertTrue(r2.notes.contains { $0.contains("no key") }, "\(r2.notes)")
        // Text output says the same.
        let text = Harness.run(["fsck", cipher, "--passfile", passfile])
        XCTAssertEqual(text.status, 0)
        XCTAssertTrue(text.stdout.contains("No problems found"), text.stdout)
    }

    /// The case: a header copy of another volume (same passphrase, higher sequence)
    /// in place of one copy. fsck names it, --repair moves it aside (never deletes it),
    /// restores the copy from the verified one, and the volume mounts.
    func testForeignHeaderCopyIsMovedAsideAndRestored() throws {
        initVolume()
        try populate()
        let other = scratch + "/other"
        XCTAssertEqual(Harness.run(["init", other, "--passfile", passfile] + Self.cheapKDF).status, 0)
        let a = try VolumeHeader.decode(try read(cipher + "/xtsfs.header"))
        var b = try VolumeHeader.decode(try read(other + "/xtsfs.header"))
        let (keysB, _) = try Keyring.unlock(b, with: PassphraseProvider(passphrase: SecretBytes(copying: Array(Self.passphrase.utf8))))
        b.sequence = a.sequence + 5
        b = try Keyring.seal(b, keys: keysB)
        let foreign = try b.encode()
        try write(cipher + "/xtsfs.header2", foreign)

        let (s1, r1) = try fsck()
        XCTAssertEqual(s1, FsckExit.uncorrected.rawValue)
        XCTAssertEqual(r1.findings.map(\.kind), ["headerCopyForeign"])
        // Without the key fsck cannot tell which copy is ours, and says so.
        let (s0, r0) = try fsck(key: false)
        XCTAssertEqual(s0, FsckExit.uncorrected.rawValue)
        XCTAssertEqual(r0.findings.map(\.kind), ["headerCopiesDisagree"])

        let (s2, r2) = try fsck(["--repair"])
        XCTAssertEqual(s2, FsckExit.corrected.rawValue, "\(r2.findings)")
        XCTAssertEqual(r2.findings.first?.repaired, "restoredHeaderCopy")
        XCTAssertEqual(try read(cipher + "/xtsfs.header2"), try read(cipher + "/xtsfs.header"))
        let aside = cipher + "/xtsfs.header2.foreign-" + b.volumeID.map { String(format: "%02x", $0) }.joined()
        XCTAssertEqual(try read(aside), foreign, "the other volume's header is kept, not deleted")

        let (s3, r3) = try fsck()
        XCTAssertEqual(s3, FsckExit.clean.rawValue, "\(r3.findings)")
        XCTAssertEqual(r3.findings.map(\.kind), ["foreignEntry"])
        mount()
        XCTAssertEqual(try read(mnt + "/dir/a.txt"), pattern(5000, seed: 1))
    }

    func testOrphansLeftoversAndUnreadableEntriesAreRepairedAndQuarantined() throws {
        initVolume()
        try populate()
        let dir = try backingDir()
        // An orphaned long-name record, .tmp leftovers, an orphaned link-store file.
        try write(cipher + "/xtsfs.long." + String(repeating: "A", count: 43) + ".name", Array("x".utf8))
        try write(dir + "/xtsfs.dir.tmp", Array("partial".utf8))
        try write(cipher + "/xtsfs.links/" + String(repeating: "B", count: 43), Array("y".utf8))
        // A name with one character changed: its entry can no longer be named.
        let victim = try entries(dir).first { !$0.hasPrefix("xtsfs.") && $0.count == 43 && FileManager.default.fileExists(atPath: dir + "/" + $0) && (try? FileManager.default.attributesOfItem(atPath: dir + "/" + $0)[.size] as? Int) == 5032 }!
        var chars = Array(victim)
        chars[5] = chars[5] == "A" ? "B" : "A"
        try FileManager.default.moveItem(atPath: dir + "/" + victim, toPath: dir + "/" + String(chars))
        // A file cut inside its header; a file header with one flipped bit.
        let tinyEntry = try entries(cipher).first { (try? FileManager.default.attributesOfItem(atPath: cipher + "/" + $0)[.size] as? Int) == 35 }!
        let tinyGood = try read(cipher + "/" + tinyEntry)
        var tiny = tinyGood
        tiny[12] ^= 0x10
        try write(cipher + "/" + tinyEntry, tiny)
        let emptyEntry = try entries(dir).first { (try? FileManager.default.attributesOfItem(atPath: dir + "/" + $0)[.size] as? Int) == 0 && !$0.hasPrefix("xtsfs") }!
        try write(dir + "/" + emptyEntry, Array(repeating: 7, count: 20))
        // A foreign file and a sync tool's conflict copy of the 5000-byte file's neighbour.
        try write(cipher + "/.DS_Store", [1, 2, 3])
        try write(cipher + "/" + tinyEntry + ".sync-conflict-20260101-120000-ABCDEFG", tinyGood)

        let (s1, r1) = try fsck()
        XCTAssertEqual(s1, FsckExit.uncorrected.rawValue)
        let kinds = Set(r1.findings.map(\.kind))
        for k in ["longNameRecordOrphan", "temporaryLeftover", "linkStoreOrphan", "nameUndecryptable", "fileHeaderDamaged", "fileTruncatedInHeader", "foreignEntry", "syncConflict"] {
            XCTAssertTrue(kinds.contains(k), "\(k) not found in \(r1.findings.map(\.kind))")
        }
        XCTAssertEqual(r1.findings.first { $0.kind == "syncConflict" }?.shadows, "/tiny")
        XCTAssertEqual(r1.findings.first { $0.kind == "fileHeaderDamaged" }?.plaintextPath, "/tiny")

        let (s2, r2) = try fsck(["--repair"])
        // 1 + 4: all corrected but the file cut inside its header, which is left visible
        // as an error rather than turned into an empty file.
        XCTAssertEqual(s2, FsckExit.corrected.rawValue | FsckExit.uncorrected.rawValue, "\(r2.findings)")
        XCTAssertEqual(r2.findings.filter { $0.severity == "error" && $0.repaired == nil }.map(\.kind), ["fileTruncatedInHeader"])
        XCTAssertEqual(r2.findings.first { $0.kind == "fileTruncatedInHeader" }?.plaintextPath, "/dir/empty")
        XCTAssertTrue(FileManager.default.fileExists(atPath: cipher + "/.DS_Store"), "foreign files are never removed")

        mount()
        XCTAssertThrowsError(try read(mnt + "/dir/empty"), "a file cut inside its header is an error, not data")
        try FileManager.default.removeItem(atPath: mnt + "/dir/empty")
        XCTAssertEqual(try read(mnt + "/tiny"), Array("abc".utf8), "a single flipped header bit is corrected")
        unmount()
        let (s3, r3) = try fsck()
        XCTAssertEqual(s3, FsckExit.clean.rawValue, "\(r3.findings)")
        mount()
        let lost = try FileManager.default.contentsOfDirectory(atPath: mnt + "/lost+found").sorted()
        XCTAssertEqual(lost.count, 2, "\(lost)")
        XCTAssertTrue(lost.contains("tiny (sync conflict)"), "\(lost)")
        let quarantined = lost.first { $0.hasPrefix("unreadable name") }!
        XCTAssertEqual(try read(mnt + "/lost+found/" + quarantined), pattern(5000, seed: 1), "a quarantined file keeps its contents")
        XCTAssertEqual(try read(mnt + "/" + String(repeating: "L", count: 200)), pattern(100, seed: 2))
    }

    func testLostDirectoryHeaderQuarantinesItsEntriesAndMakesTheDirectoryUsable() throws {
        initVolume()
        try populate()
        let dir = try backingDir()
        try FileManager.default.removeItem(atPath: dir + "/xtsfs.dir")
        let (s1, r1) = try fsck()
        XCTAssertEqual(s1, FsckExit.uncorrected.rawValue)
        XCTAssertEqual(r1.findings.first?.kind, "directoryHeaderMissing")
        XCTAssertEqual(r1.findings.first?.plaintextPath, "/dir")
        let (s2, r2) = try fsck(["--repair"])
        XCTAssertEqual(s2, FsckExit.corrected.rawValue, "\(r2.findings)")
        XCTAssertEqual(try fsck().0, FsckExit.clean.rawValue)
        mount()
        XCTAssertEqual(try FileManager.default.contentsOfDirectory(atPath: mnt + "/dir"), [])
        let lost = try FileManager.default.contentsOfDirectory(atPath: mnt + "/lost+found")
        XCTAssertEqual(lost.count, 3, "\(lost)")
        let contents = try lost.compactMap { name -> [UInt8]? in
            var st = stat()
            guard lstat(mnt + "/lost+found/" + name, &st) == 0, st.st_mode & S_IFMT == S_IFREG else { return nil }
            return try read(mnt + "/lost+found/" + name)
        }
        XCTAssertTrue(contents.contains(pattern(5000, seed: 1)))
    }

    func testHeaderCopyDamageAndBitFlippedDirectoryHeaderAreRepaired() throws {
        initVolume()
        try populate()
        let dir = try backingDir()
        var dh = try read(dir + "/xtsfs.dir")
        dh[20] ^= 0x04
        try FileManager.default.removeItem(atPath: dir + "/xtsfs.dir")
        try write(dir + "/xtsfs.dir", dh)
        try FileManager.default.removeItem(atPath: cipher + "/xtsfs.header")
        let (s1, r1) = try fsck()
        XCTAssertEqual(s1, FsckExit.uncorrected.rawValue)
        XCTAssertEqual(Set(r1.findings.map(\.kind)), ["headerCopyMissing", "directoryHeaderDamaged"])
        let (s2, r2) = try fsck(["--repair"])
        XCTAssertEqual(s2, FsckExit.corrected.rawValue, "\(r2.findings)")
        XCTAssertEqual(Set(r2.findings.compactMap(\.repaired)), ["restoredHeaderCopy", "correctedBitFlip"])
        XCTAssertEqual(try fsck().0, FsckExit.clean.rawValue)
        XCTAssertEqual(try read(cipher + "/xtsfs.header"), try read(cipher + "/xtsfs.header2"))
        mount()
        XCTAssertEqual(try read(mnt + "/dir/a.txt"), pattern(5000, seed: 1))
    }

    /// Two long names' side files swapped: each is put back where its content hashes to,
    /// so both names come back instead of both entries going to lost+found.
    func testSwappedLongNameSideFilesArePutBack() throws {
        initVolume()
        mount()
        let n1 = String(repeating: "p", count: 190), n2 = String(repeating: "q", count: 190)
        try write(mnt + "/" + n1, pattern(10, seed: 1))
        try write(mnt + "/" + n2, pattern(20, seed: 2))
        unmount()
        let records = try FileManager.default.contentsOfDirectory(atPath: cipher).filter { $0.hasSuffix(".name") }.sorted()
        XCTAssertEqual(records.count, 2)
        let a = try read(cipher + "/" + records[0]), b = try read(cipher + "/" + records[1])
        try FileManager.default.removeItem(atPath: cipher + "/" + records[0])
        try FileManager.default.removeItem(atPath: cipher + "/" + records[1])
        try write(cipher + "/" + records[0], b)
        try write(cipher + "/" + records[1], a)
        XCTAssertEqual(try fsck().0, FsckExit.uncorrected.rawValue)
        let (s2, r2) = try fsck(["--repair"])
        XCTAssertEqual(s2, FsckExit.corrected.rawValue, "\(r2.findings)")
        XCTAssertTrue(r2.findings.contains { $0.repaired == "putBack" }, "\(r2.findings)")
        XCTAssertEqual(try fsck().0, FsckExit.clean.rawValue)
        mount()
        XCTAssertEqual(try read(mnt + "/" + n1), pattern(10, seed: 1))
        XCTAssertEqual(try read(mnt + "/" + n2), pattern(20, seed: 2))
        XCTAssertFalse(FileManager.default.fileExists(atPath: mnt + "/lost+found"))
    }

    func testExitCodesAndRefusalWhileMounted() throws {
        initVolume()
        mount()
        let r = Harness.run(["fsck", cipher, "--repair", "--passfile", passfile])
        XCTAssertEqual(r.status, FsckExit.operationalError.rawValue, r.stderr)
        XCTAssertTrue(r.stderr.hasPrefix("xtsfs: ") && r.stderr.contains("mounted"), r.stderr)
        let ro = Harness.run(["fsck", cipher, "--passfile", passfile])
        XCTAssertEqual(ro.status, 0, ro.stderr)
        XCTAssertTrue(ro.stderr.contains("mounted"), ro.stderr)
        unmount()
        XCTAssertEqual(Harness.run(["fsck", scratch]).status, FsckExit.operationalError.rawValue)
        XCTAssertEqual(Harness.run(["fsck"]).status, FsckExit.usage.rawValue)
        XCTAssertEqual(Harness.run(["fsck", "", "--no-key"]).status, FsckExit.usage.rawValue)
        XCTAssertEqual(Harness.run(["fsck", cipher, "--bogus"]).status, FsckExit.usage.rawValue)
        let wrong = scratch + "/wrong"
        try "nope\n".write(toFile: wrong, atomically: true, encoding: .utf8)
        let w = Harness.run(["fsck", cipher, "--passfile", wrong])
        XCTAssertEqual(w.status, FsckExit.operationalError.rawValue)
        XCTAssertTrue(w.stderr.contains("wrong passphrase"), w.stderr)
    }
}
