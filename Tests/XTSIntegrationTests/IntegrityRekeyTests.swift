import Foundation
import XCTest
import XTSCrypto
import XTSFormat
import XTSKeys
import XTSVolume
#if canImport(Glibc)
import Glibc
#endif

/// The DEK rekey of integrity volumes (FORMAT.md 13.2): every RekeyTests test again (the
/// tree with holes, a 64 MiB sparse file, multi-group files, hard links and empty files;
/// SIGKILL at every kind of step and every journal phase, mounted mid-rekey, rerun and
/// compared; journalled files mixed block by block), on a tree whose backing files also
/// hold a file that is only its header (length 0) and uncommitted tails; and a tampered
/// unit, which stops the rekey and is never sealed under the new key.
final class IntegrityRekeyTests: RekeyTests {
    override var initArguments: [String] { ["--integrity"] }

    var provider: PassphraseProvider { PassphraseProvider(passphrase: SecretBytes(copying: Array(Self.passphrase.utf8))) }

    /// Regular backing files of the tree (not the volume's own `xtsfs.*` files), with their sizes.
    func backingRegularFiles() -> [(path: String, size: Int)] {
        var out: [(String, Int)] = []
        let e = FileManager.default.enumerator(atPath: cipher)
        while let rel = e?.nextObject() as? String {
            let name = (rel as NSString).lastPathComponent
            if name.hasPrefix("xtsfs.") || rel.hasPrefix("xtsfs.") { continue }
            var st = stat()
            guard lstat(cipher + "/" + rel, &st) == 0, (st.st_mode & S_IFMT) == S_IFREG else { continue }
            out.append((cipher + "/" + rel, Int(st.st_size)))
        }
        return out
    }

    /// The key generation an integrity file header names (bytes 4–7).
    func generation(_ path: String) throws -> UInt32 {
        let b = try read(path)
        return b.count >= 8 ? (4..<8).reduce(UInt32(0)) { $0 | UInt32(b[$1]) << (8 * ($1 - 4)) } : 0
    }

    /// One empty file becomes a file of length 0 with a header (64 bytes: what a writer
    /// leaves when a file is made with a header and no data), and every one-unit file
    /// (8,192 backing bytes) gets an uncommitted tail of 4,096 bytes of garbage. Neither
    /// shows through the mount: the manifest is unchanged.
    override func prepareBackingForRekey() throws {
        let u = try Volume.unlock(cipher, provider: provider, audit: nil, operation: "test")
        let files = backingRegularFiles()
        // With listing manifests (every volume init --integrity makes now) empty files are
        // already their header alone.
        if let empty = files.first(where: { $0.size == 0 }) {
            // (init --integrity makes file roots: the root of no tag blocks.)
            let header = try IntegrityFileHeader(tags: .ghashAES256Root, keyGeneration: u.keys.generation, nonce: try Random.bytes(FileHeader.nonceLength), plainLength: 0)
                .encode(macKey: u.keys.metadataMACKey, root: IntegrityFileHeader.emptyRoot)
            try write(empty.path, header)
        } else if !files.contains(where: { $0.size == 64 }) { return XCTFail("no empty file in the tree") }
        var tails = 0
        for f in files where f.size == 8192 {
            let h = try XCTUnwrap(FileHandle(forWritingAtPath: f.path))
            h.seekToEndOfFile()
            h.write(Data(pattern(4096, seed: 77)))
            try h.close()
            tails += 1
        }
        XCTAssertGreaterThanOrEqual(tails, 3)
    }

    /// The planted states rekeyed: the header-only file has a header of the new generation
    /// (still 64 bytes), the tails are gone (backing sizes as the committed lengths give),
    /// and every file with a header is of the new generation; the tree reads back whole.
    func testDEKRekeyOfHeaderOnlyFileAndUncommittedTails() throws {
        initVolume()
        mount()
        try populateRekeyTree()
        let before = manifest(mnt)
        unmount()
        try prepareBackingForRekey()
        let headerOnly = backingRegularFiles().filter { $0.size == 64 }.count
        XCTAssertGreaterThanOrEqual(headerOnly, 1)
        let r = Harness.run(["rekey", cipher, "--dek", "--passfile", passfile])
        XCTAssertEqual(r.status, 0, r.stderr)
        let after = backingRegularFiles()
        XCTAssertEqual(after.filter { $0.size == 64 }.count, headerOnly, "the header-only files")
        XCTAssertTrue(after.allSatisfy { $0.size != 8192 + 4096 }, "an uncommitted tail was carried over: \(after.map(\.size))")
        for f in after where f.size >= 64 {
            XCTAssertEqual(try generation(f.path), 2, "\(f.path) (\(f.size) bytes)")
        }
        mount()
        XCTAssertEqual(manifest(mnt), before)
        unmount()
    }

    /// A file larger than a batch (1 MiB here) is rewritten in segments: a tampered unit in
    /// its last segment stops the rekey before its first segment is written (the whole
    /// file is checked first), so no journal is left and the file is as it was.
    func testTamperedUnitInALaterSegmentStopsTheRekeyBeforeTheFirst() throws {
        initVolume()
        mount()
        let size = 3 << 20
        try write(mnt + "/large", pattern(size, seed: 5))
        unmount()
        // 3 MiB: 768 units, groups 0-5 full and 12 units of group 6.
        let want = 6 * 520_192 + 4096 * 13
        let backing = backingRegularFiles().filter { $0.size == want }
        guard backing.count == 1, let victim = backing.first?.path else { return XCTFail("file not found: \(backingRegularFiles())") }
        let fd = open(victim, O_RDWR)
        let at: off_t = 5 * 520_192 + 4096 * 71 + 9   // unit 700 (group 5, its 70th)
        var byte: UInt8 = 0
        XCTAssertEqual(pread(fd, &byte, 1, at), 1)
        byte ^= 0x80
        XCTAssertEqual(pwrite(fd, &byte, 1, at), 1)
        close(fd)
        let tampered = try read(victim)
        let (status, err) = runEnv(["rekey", cipher, "--dek", "--passfile", passfile], env: ["XTSFS_REKEY_BATCH_BYTES": "1048576"])
        XCTAssertEqual(status, ExitStatus.failure.rawValue, err)
        XCTAssertTrue(err.contains("/large") && err.contains("unit 700") && err.contains("does not match its tag"), err)
        XCTAssertEqual(try read(victim), tampered, "a segment of the tampered file was rewritten")
        XCTAssertTrue(backingPaths(named: "xtsfs.rekey-journal", in: cipher).isEmpty)
        mount()
        let v = open(mnt + "/large", O_RDONLY)
        var buf = [UInt8](repeating: 0, count: 1 << 20)
        XCTAssertEqual(pread(v, &buf, buf.count, 0), buf.count)
        XCTAssertEqual(buf, Array(pattern(size, seed: 5)[0..<(1 << 20)]))
        close(v)
        unmount()
    }

    /// An interrupted rekey of an integrity volume has feature bit 4 (a build that does not
    /// know its journal records refuses the volume); the finished one has none of the
    /// rekey's bits.
    func testIntegrityRekeyFeatureBitWhileUnfinished() throws {
        initVolume()
        mount()
        try write(mnt + "/f", pattern(20_000, seed: 7))
        unmount()
        let (killed, err) = runEnv(["rekey", cipher, "--dek", "--passfile", passfile], env: ["XTSFS_REKEY_FAILPOINT": "3"])
        XCTAssertEqual(killed, -SIGKILL, err)
        let mid = Harness.run(["status", cipher]).stdout
        XCTAssertTrue(mid.contains("rekey-journal") && mid.contains("rekey-integrity-journal"), mid)
        let (status, out) = runEnv(["rekey", cipher, "--dek", "--passfile", passfile], env: [:])
        XCTAssertEqual(status, 0, out)
        let done = Harness.run(["status", cipher]).stdout
        XCTAssertTrue(done.contains("block-authentication") && !done.contains("rekey-"), done)
        mount()
        XCTAssertEqual(try read(mnt + "/f"), pattern(20_000, seed: 7))
        unmount()
    }

    /// A unit whose ciphertext was changed behind the volume's back (one byte, in the second
    /// group of a file): the rekey stops, naming the file by its plaintext path and the
    /// unit, before anything of that file is rewritten: its backing bytes stay as they
    /// were (the tampered unit still fails under the old key, never sealed under the new
    /// one). Mounted mid-rekey the file is EIO from that unit on, the others read; a rerun
    /// stops at it again; once it is removed, the rekey finishes.
    func testTamperedUnitStopsTheRekeyAndIsNeverSealedUnderTheNewKey() throws {
        initVolume()
        mount()
        XCTAssertEqual(Glibc.mkdir(mnt + "/dir", 0o755), 0)
        let size = 600_000
        try write(mnt + "/dir/victim", pattern(size, seed: 1))
        try write(mnt + "/good", pattern(10_000, seed: 2))
        try write(mnt + "/dir/also-good", pattern(700_000, seed: 3))
        unmount()
        let backing = backingRegularFiles().filter { $0.size == 520_192 + 4096 * 22 }
        // 600,000 bytes: 147 units, group 0 full and 21 units of group 1.
        guard backing.count == 1, let victim = backing.first?.path else { return XCTFail("victim not found: \(backingRegularFiles())") }
        let fd = open(victim, O_RDWR)
        XCTAssertGreaterThanOrEqual(fd, 0)
        let at = off_t(520_192 + 4096 * (1 + 4) + 100)   // unit 130 = group 1, unit 4 of it
        var byte: UInt8 = 0
        XCTAssertEqual(pread(fd, &byte, 1, at), 1)
        byte ^= 0x40
        XCTAssertEqual(pwrite(fd, &byte, 1, at), 1)
        close(fd)
        let tampered = try read(victim)

        for attempt in 1...2 {
            let (status, err) = runEnv(["rekey", cipher, "--dek", "--passfile", passfile], env: [:])
            XCTAssertEqual(status, ExitStatus.failure.rawValue, "attempt \(attempt): \(err)")
            XCTAssertTrue(err.contains("/dir/victim") && err.contains("unit 130") && err.contains("does not match its tag"), "attempt \(attempt): \(err)")
            XCTAssertEqual(try read(victim), tampered, "attempt \(attempt): the tampered file was rewritten")
            XCTAssertEqual(try generation(victim), 1)
            mount()
            XCTAssertEqual(try read(mnt + "/good"), pattern(10_000, seed: 2))
            XCTAssertEqual(try read(mnt + "/dir/also-good"), pattern(700_000, seed: 3))
            let v = open(mnt + "/dir/victim", O_RDONLY)
            XCTAssertGreaterThanOrEqual(v, 0)
            var buf = [UInt8](repeating: 0, count: 4096)
            XCTAssertEqual(pread(v, &buf, 4096, 0), 4096, "unit 0 is intact")
            XCTAssertEqual(buf, Array(pattern(size, seed: 1)[0..<4096]))
            XCTAssertEqual(pread(v, &buf, 4096, 130 * 4096), -1)
            XCTAssertEqual(errno, EIO)
            close(v)
            unmount()
        }
        // Stopped mid-rekey: fsck names the tampered unit and the file's plaintext path, and
        // nothing else as damage; --repair is refused.
        let (fsckStatus, report, out) = fsckMidRekey()
        XCTAssertEqual(fsckStatus, 4, out)
        XCTAssertEqual(report?.errors.map(\.kind), ["fileAuthenticationFailed"], out)
        XCTAssertTrue(out.contains("\"/dir/victim\"") && out.contains("unit 130 "), out)
        XCTAssertTrue(report?.notes.contains { $0.contains("middle of a DEK rekey") } ?? false, out)
        assertRepairRefused("stopped at a tampered unit")
        mount()
        XCTAssertEqual(unlink(mnt + "/dir/victim"), 0)
        unmount()
        let (status, err) = runEnv(["rekey", cipher, "--dek", "--passfile", passfile], env: [:])
        XCTAssertEqual(status, 0, err)
        XCTAssertTrue(Harness.run(["status", cipher]).stdout.contains("Key generation:  2"))
        mount()
        XCTAssertEqual(try read(mnt + "/good"), pattern(10_000, seed: 2))
        XCTAssertEqual(try read(mnt + "/dir/also-good"), pattern(700_000, seed: 3))
        unmount()
    }
}

/// The online rekey tests again, on integrity volumes (the daemon sweeps while a reader
/// loop compares the tree and a writer appends, renames and holds a file open); and a
/// tampered unit met by the daemon's sweep.
final class IntegrityOnlineRekeyTests: OnlineRekeyTests {
    override var initArguments: [String] { ["--integrity"] }

    func testOnlineRekeyStopsAtATamperedUnit() throws {
        initVolume()
        mount()
        try write(mnt + "/victim", pattern(20_000, seed: 1))
        try write(mnt + "/good", pattern(10_000, seed: 2))
        // Both units of the victim through a mount that is then dropped: its page cache
        // must not hide the tampering from the checks below.
        unmount()
        let victims = RekeyTests.sh("find '\(cipher)' -type f -size 24576c").split(separator: "\n").map(String.init)
        guard victims.count == 1 else { return XCTFail("victim not found: \(victims)") }
        let fd = open(victims[0], O_RDWR)
        var byte: UInt8 = 0
        XCTAssertEqual(pread(fd, &byte, 1, 4096 * 3 + 7), 1)   // unit 2
        byte ^= 1
        XCTAssertEqual(pwrite(fd, &byte, 1, 4096 * 3 + 7), 1)
        close(fd)
        mount()
        let r = Harness.run(["rekey", cipher, "--dek", "--passfile", passfile])
        XCTAssertEqual(r.status, 1, r.stderr)
        XCTAssertTrue(r.stderr.contains("online rekey stopped") && r.stderr.contains("/victim") && r.stderr.contains("unit 2"), r.stderr)
        XCTAssertEqual(try read(mnt + "/good"), pattern(10_000, seed: 2))
        XCTAssertEqual(unlink(mnt + "/victim"), 0)
        let again = Harness.run(["rekey", cipher, "--dek", "--passfile", passfile])
        XCTAssertEqual(again.status, 0, again.stderr)
        XCTAssertEqual(try read(mnt + "/good"), pattern(10_000, seed: 2))
        unmount()
        XCTAssertTrue(Harness.run(["status", cipher]).stdout.contains("Key generation:  2"))
    }
}
