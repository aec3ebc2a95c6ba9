import Foundation
import Synchronization
import XCTest
import XTSCrypto
import XTSFormat
import XTSKeys
import XTSVolume
#if canImport(Glibc)
import Glibc
#endif

/// Authenticated directory listings (feature `listingManifests`, FORMAT.md 12.10) on a
/// fresh `init --integrity` volume: each change made behind the mount's back to the set of
/// a directory's entries is reported by fsck; heavy churn through the mount, and a kill -9
/// in the middle of it, leave the volume fsck-clean (or with warnings --repair settles).
final class ListingManifestTests: VolumeTestCase {
    override var initArguments: [String] { ["--integrity"] }

    struct Report: Decodable {
        struct Finding: Decodable {
            var kind: String
            var severity: String
            var backingPath: String
            var plaintextPath: String?
            var detail: String
            var repaired: String?
        }
        var findings: [Finding]
        var exitStatus: Int32
    }

    func fsck(_ extra: [String] = [], file: StaticString = #filePath, line: UInt = #line) throws -> Report {
        let r = Harness.run(["fsck", cipher, "--json", "--passfile", passfile] + extra)
        guard let report = try? JSONDecoder().decode(Report.self, from: Data(r.stdout.utf8)) else {
            XCTFail("fsck printed no report (status \(r.status)): \(r.stdout) \(r.stderr)", file: file, line: line)
            throw XCTSkip("no report")
        }
        XCTAssertEqual(report.exitStatus, r.status, file: file, line: line)
        return report
    }

    func kinds(_ r: Report) -> [String] { r.findings.map(\.kind) }

    /// Backing entries of a backing directory, without xtsfs's own files.
    func entries(_ dir: String) throws -> [String] {
        try FileManager.default.contentsOfDirectory(atPath: dir).filter { !$0.hasPrefix("xtsfs.") }.sorted()
    }

    /// A volume with a directory `d` holding files a, b, c and a subdirectory; returns the
    /// backing path of `d`.
    func populate() throws -> String {
        initVolume()
        mount()
        try FileManager.default.createDirectory(atPath: mnt + "/d/sub", withIntermediateDirectories: true)
        for (i, n) in ["a", "b", "c"].enumerated() { try write(mnt + "/d/" + n, pattern(5000 + i, seed: UInt64(i))) }
        unmount()
        XCTAssertTrue(FileManager.default.fileExists(atPath: cipher + "/xtsfs.list"), "the root has a manifest")
        let dirs = try entries(cipher).filter { var st = stat(); return lstat(cipher + "/" + $0, &st) == 0 && st.st_mode & S_IFMT == S_IFDIR }
        XCTAssertEqual(dirs.count, 1)
        let d = cipher + "/" + dirs[0]
        XCTAssertTrue(FileManager.default.fileExists(atPath: d + "/xtsfs.list"), "a new directory has a manifest")
        return d
    }

    /// Backing regular files of `dir`, by size.
    func files(_ dir: String) throws -> [String] {
        try entries(dir).filter { var st = stat(); return lstat(dir + "/" + $0, &st) == 0 && st.st_mode & S_IFMT == S_IFREG }
    }

    func assertMismatch(_ plain: String, _ why: String, file: StaticString = #filePath, line: UInt = #line) throws {
        let r = try fsck(file: file, line: line)
        XCTAssertEqual(r.exitStatus, FsckExit.uncorrected.rawValue, "\(why): \(r.findings)", file: file, line: line)
        let hit = r.findings.first { $0.kind == "directoryListingMismatch" }
        XCTAssertNotNil(hit, "\(why): \(kinds(r))", file: file, line: line)
        XCTAssertEqual(hit?.plaintextPath, plain, why, file: file, line: line)
        XCTAssertEqual(hit?.severity, "error", file: file, line: line)
        // --repair does not seal it.
        let again = try fsck(["--repair"], file: file, line: line)
        XCTAssertTrue(again.findings.contains { $0.kind == "directoryListingMismatch" && $0.repaired == nil }, why, file: file, line: line)
        XCTAssertTrue(try fsck(file: file, line: line).findings.contains { $0.kind == "directoryListingMismatch" }, "\(why): still reported after --repair", file: file, line: line)
    }

    func testFreshVolumeIsCleanAndStatusShowsTheFeature() throws {
        _ = try populate()
        XCTAssertEqual(try fsck().findings.count, 0)
        let s = Harness.run(["status", cipher])
        XCTAssertTrue(s.stdout.contains("listing-manifests"), s.stdout)
    }

    func testOlderEntryPutBackIsReported() throws {
        let d = try populate()
        mount()
        try write(mnt + "/d/x", pattern(100, seed: 9))
        unmount()
        let before = Set(try files(d))
        mount()
        XCTAssertEqual(unlink(mnt + "/d/x"), 0)
        unmount()
        let gone = try XCTUnwrap(before.subtracting(try files(d)).first)
        XCTAssertEqual(try fsck().findings.count, 0)
        // Put back from a copy taken before the unlink: its name decrypts, its header verifies.
        mount()
        try write(mnt + "/d/x", pattern(100, seed: 9))
        let keep = try read(d + "/" + gone)
        XCTAssertEqual(unlink(mnt + "/d/x"), 0)
        unmount()
        try write(d + "/" + gone, keep)
        try assertMismatch("/d", "an older entry put back")
    }

    func testDeletedEntryIsReported() throws {
        let d = try populate()
        let victim = try files(d)[0]
        XCTAssertEqual(unlink(d + "/" + victim), 0)
        try assertMismatch("/d", "an entry deleted")
    }

    func testSwappedFilesAreReported() throws {
        let d = try populate()
        let f = try files(d)
        XCTAssertEqual(rename(d + "/" + f[0], d + "/swap"), 0)
        XCTAssertEqual(rename(d + "/" + f[1], d + "/" + f[0]), 0)
        XCTAssertEqual(rename(d + "/swap", d + "/" + f[1]), 0)
        try assertMismatch("/d", "two files swapped by their backing names")
    }

    func testSwappedSubdirectoriesAreReported() throws {
        let d = try populate()
        mount()
        try FileManager.default.createDirectory(atPath: mnt + "/d/sub2", withIntermediateDirectories: true)
        unmount()
        let dirs = try entries(d).filter { var st = stat(); return lstat(d + "/" + $0, &st) == 0 && st.st_mode & S_IFMT == S_IFDIR }
        XCTAssertEqual(dirs.count, 2)
        XCTAssertEqual(RenameAt2.call(d + "/" + dirs[0], d + "/" + dirs[1], flags: RenameAt2.exchange), 0)
        try assertMismatch("/d", "two subdirectories swapped")
    }

    func testSwappedFileIDsAreReported() throws {
        let d = try populate()
        let f = try files(d)
        let a = try read(d + "/" + f[0]), b = try read(d + "/" + f[1])
        // Headers exchanged: each file's file ID is now the other's (and its units fail).
        try write(d + "/" + f[0], Array(b[0..<64]) + a[64...])
        try write(d + "/" + f[1], Array(a[0..<64]) + b[64...])
        let r = try fsck()
        XCTAssertTrue(kinds(r).contains("directoryListingMismatch"), "\(kinds(r))")
    }

    func testOlderManifestPutBackIsReported() throws {
        let d = try populate()
        let old = try read(d + "/xtsfs.list")
        mount()
        try write(mnt + "/d/new", pattern(10, seed: 1))
        unmount()
        XCTAssertNotEqual(try read(d + "/xtsfs.list"), old)
        try write(d + "/xtsfs.list", old)
        try assertMismatch("/d", "an older manifest put back")
    }

    func testMissingDamagedOrMovedManifestIsReported() throws {
        let d = try populate()
        let good = try read(d + "/xtsfs.list")
        XCTAssertEqual(good.count, 64)
        XCTAssertEqual(unlink(d + "/xtsfs.list"), 0)
        var r = try fsck()
        XCTAssertEqual(r.exitStatus, FsckExit.uncorrected.rawValue)
        XCTAssertEqual(r.findings.first { $0.kind == "listingManifestMissing" }?.plaintextPath, "/d", "\(kinds(r))")
        // The mount reads the directory but refuses to change it.
        mount()
        XCTAssertEqual(try read(mnt + "/d/a"), pattern(5000, seed: 0))
        XCTAssertEqual(open(mnt + "/d/new", O_CREAT | O_WRONLY, 0o644), -1)
        XCTAssertEqual(errno, EIO)
        unmount()
        let rootManifest = try read(cipher + "/xtsfs.list")
        for (bytes, why) in [(Array(good[0..<40]), "truncated"), (good + [0], "oversized"), (rootManifest, "moved from another directory"),
                             (good.enumerated().map { $0.offset == 20 ? $0.element ^ 1 : $0.element }, "bit flip")] {
            try write(d + "/xtsfs.list", bytes)
            r = try fsck()
            XCTAssertEqual(r.findings.first { $0.kind == "listingManifestDamaged" }?.plaintextPath, "/d", "\(why): \(kinds(r))")
            XCTAssertEqual(r.exitStatus, FsckExit.uncorrected.rawValue, why)
        }
        try write(d + "/xtsfs.list", good)
        XCTAssertEqual(try fsck().findings.count, 0)
    }

    /// A FIFO, a character device (as root) or a symlink planted as a directory's
    /// `xtsfs.list`: every change in that directory fails with EIO, within the deadline
    /// (the daemon neither blocks on the FIFO nor follows the symlink, which leads to a
    /// copy of the directory's own good manifest), the daemon goes on serving the rest, and
    /// fsck reports the manifest as damaged without hanging.
    func testPlantedFIFODeviceOrSymlinkManifestFailsChangesAndIsReported() throws {
        let d = try populate()
        let manifest = d + "/xtsfs.list"
        let good = try read(manifest)
        let outside = scratch + "/good-manifest-copy"
        try write(outside, good)
        var plants: [(String, () -> Int32)] = [("FIFO", { mkfifo(manifest, 0o666) }), ("symlink", { symlink(outside, manifest) })]
        if geteuid() == 0 { plants.insert(("character device", { mknod(manifest, S_IFCHR | 0o666, devNullNumbers) }), at: 1) }
        for (what, plant) in plants {
            XCTAssertEqual(unlink(manifest), 0, what)
            XCTAssertEqual(plant(), 0, "\(what): errno \(errno)")
            mount()
            let m = mnt, p = mnt + "/d/"
            let changes: [(String, @Sendable () -> Int32)] = [
                ("create", { let fd = open(p + "new", O_CREAT | O_WRONLY | O_EXCL, 0o644); if fd >= 0 { close(fd) }; return fd }),
                ("mkdir", { mkdir(p + "newdir", 0o755) }),
                ("symlink", { symlink("t", p + "newlink") }),
                ("mkfifo", { mkfifo(p + "newfifo", 0o644) }),
                ("link", { link(p + "a", p + "a-link") }),
                ("unlink", { unlink(p + "a") }),
                ("rmdir", { rmdir(p + "sub") }),
                ("rename within", { rename(p + "a", p + "a2") }),
                ("rename out", { rename(p + "b", m + "/b-out") }),
                ("rename in", { rename(m + "/in", p + "in") }),
            ]
            try write(mnt + "/in", [1])
            for (name, change) in changes {
                XCTAssertEqual(sys32(callDeadline, change), .failed(EIO), "\(what): \(name)")
            }
            // Reads of the directory are served, and the rest of the volume changes.
            XCTAssertEqual(readWithDeadline(p + "a").1, pattern(5000, seed: 0), what)
            XCTAssertEqual(listWithDeadline(p).1.map(\.name).sorted(), ["a", "b", "c", "sub"], what)
            XCTAssertEqual(sys32 { unlink(m + "/in") }, .ok(0), what)
            unmount()
            var st = stat()
            XCTAssertEqual(lstat(manifest, &st), 0, what)
            XCTAssertNotEqual(st.st_mode & S_IFMT, S_IFREG, "\(what): replaced by a regular file")
            XCTAssertEqual(try read(outside), good, "\(what): the symlink's target was written")
            let bounded = runWithTimeout([Harness.binary, "fsck", cipher, "--passfile", passfile], seconds: 60)
            XCTAssertNotEqual(bounded.status, 137, "\(what): fsck hung")
            guard bounded.status != 137 else { break }
            let r = try fsck()
            XCTAssertEqual(r.exitStatus, FsckExit.uncorrected.rawValue, "\(what): \(kinds(r))")
            let hit = r.findings.first { $0.kind == "listingManifestDamaged" || $0.kind == "listingManifestMissing" }
            XCTAssertEqual(hit?.kind, "listingManifestDamaged", "\(what): \(kinds(r))")
            XCTAssertEqual(hit?.plaintextPath, "/d", what)
            XCTAssertEqual(unlink(manifest), 0, what)
            try write(manifest, good)
        }
        XCTAssertEqual(try fsck().findings.count, 0)
    }

    /// A file emptied keeps its header (and file ID): 64 bytes, fsck-clean; a file cut to 0
    /// bytes behind the mount's back reads as EIO and is reported.
    func testEmptiedFileKeepsItsHeaderAndZeroBytesIsDamage() throws {
        let d = try populate()
        mount()
        let fd = open(mnt + "/d/a", O_WRONLY | O_TRUNC)
        XCTAssertGreaterThanOrEqual(fd, 0)
        close(fd)
        try write(mnt + "/d/empty", [])
        unmount()
        let sizes = try files(d).map { f -> Int in var st = stat(); lstat(d + "/" + f, &st); return Int(st.st_size) }
        XCTAssertEqual(sizes.filter { $0 == 64 }.count, 2, "\(sizes)")
        XCTAssertEqual(try fsck().findings.count, 0)
        let victim = try files(d).first { f in var st = stat(); lstat(d + "/" + f, &st); return st.st_size > 64 }!
        XCTAssertEqual(truncate(d + "/" + victim, 0), 0)
        let r = try fsck()
        XCTAssertEqual(r.exitStatus, FsckExit.uncorrected.rawValue, "\(kinds(r))")
        XCTAssertTrue(kinds(r).contains("directoryListingMismatch"), "\(kinds(r))")
    }

    /// Heavy namespace churn through the mount: creates, renames within and across
    /// directories (over existing files, RENAME_NOREPLACE, RENAME_EXCHANGE), hard links,
    /// unlinks, long names, symlinks (a long target too), FIFOs, mkdir/rmdir, emptied files.
    func testChurnLeavesTheVolumeFsckClean() throws {
        initVolume()
        mount()
        let long = String(repeating: "n", count: 200)
        for d in ["x", "y", "z"] { XCTAssertEqual(mkdir(mnt + "/" + d, 0o755), 0) }
        var rng = SystemRandomNumberGenerator()
        for i in 0..<300 {
            let d = ["x", "y", "z"].randomElement(using: &rng)!, e = ["x", "y", "z"].randomElement(using: &rng)!
            let n = i % 7 == 0 ? long + "\(i)" : "f\(i)"
            try write(mnt + "/\(d)/\(n)", pattern(i * 37 % 9000, seed: UInt64(i)))
            switch i % 6 {
            case 0: XCTAssertEqual(rename(mnt + "/\(d)/\(n)", mnt + "/\(e)/r\(i)"), 0)
            case 1: XCTAssertEqual(link(mnt + "/\(d)/\(n)", mnt + "/\(e)/l\(i)"), 0)
            case 2: XCTAssertEqual(unlink(mnt + "/\(d)/\(n)"), 0)
            case 3 where i > 10: _ = rename(mnt + "/\(d)/\(n)", mnt + "/\(e)/r\(i - 9)")  // over an existing one, or not
            case 4: XCTAssertEqual(symlink(i % 8 == 0 ? String(repeating: "t", count: 3500) : "target\(i)", mnt + "/\(e)/s\(i)"), 0)
            default: XCTAssertEqual(mkfifo(mnt + "/\(e)/p\(i)", 0o644), 0)
            }
        }
        XCTAssertEqual(mkdir(mnt + "/x/deep", 0o755), 0)
        XCTAssertEqual(mkdir(mnt + "/x/deep/er", 0o755), 0)
        try write(mnt + "/x/deep/er/f", pattern(10, seed: 1))
        XCTAssertEqual(rename(mnt + "/x/deep", mnt + "/y/moved"), 0)
        XCTAssertEqual(mkdir(mnt + "/z/gone", 0o755), 0)
        XCTAssertEqual(rmdir(mnt + "/z/gone"), 0)
        XCTAssertEqual(mkdir(mnt + "/z/empty", 0o755), 0)
        XCTAssertEqual(mkdir(mnt + "/z/over", 0o755), 0)
        XCTAssertEqual(rename(mnt + "/z/over", mnt + "/z/empty"), 0)
        try write(mnt + "/y/p", [1]); try write(mnt + "/z/q", [2])
        XCTAssertEqual(RenameAt2.call(mnt + "/y/p", mnt + "/z/q", flags: RenameAt2.exchange), 0)
        XCTAssertEqual(RenameAt2.call(mnt + "/y/p", mnt + "/z/q", flags: RenameAt2.noReplace), -1)
        let fd = open(mnt + "/y/p", O_WRONLY | O_TRUNC); close(fd)
        unmount()
        let r = try fsck()
        XCTAssertEqual(r.findings.map { "\($0.kind) \($0.plaintextPath ?? $0.backingPath): \($0.detail)" }, [])
        XCTAssertEqual(r.exitStatus, 0)
        mount()
        XCTAssertEqual(try read(mnt + "/y/moved/er/f"), pattern(10, seed: 1))
        unmount()
    }

    /// kill -9 of the daemon during create/rename/unlink churn in two directories: fsck
    /// finds at most interrupted changes (warnings), --repair settles them, and the volume
    /// mounts and every directory can be changed again.
    func testKillDuringChurnLeavesOnlySettleableChanges() throws {
        initVolume()
        mount()
        for d in ["a", "b"] { XCTAssertEqual(mkdir(mnt + "/" + d, 0o755), 0) }
        final class Counter: Sendable { let n = Atomic<Int>(0) }
        let started = Counter()
        let mountpoint = mnt
        let workers = (0..<2).map { w in
            Thread {
                var i = 0
                while true {
                    let n = "w\(w)-\(i)"
                    let fd = open(mountpoint + "/a/" + n, O_CREAT | O_WRONLY, 0o644)
                    if fd < 0 { return }
                    _ = [UInt8](repeating: 7, count: 100).withUnsafeBytes { Glibc.write(fd, $0.baseAddress!, 100) }
                    close(fd)
                    if rename(mountpoint + "/a/" + n, mountpoint + "/b/" + n) != 0 { return }
                    if i % 3 == 0, unlink(mountpoint + "/b/" + n) != 0 { return }
                    if i % 5 == 0, link(mountpoint + "/b/w\(w)-\(i - 5)", mountpoint + "/a/l\(w)-\(i)") != 0, errno == ENOTCONN { return }
                    i += 1
                    started.n.add(1, ordering: .relaxed)
                }
            }
        }
        for t in workers { t.start() }
        let deadline = Date().addingTimeInterval(30)
        while started.n.load(ordering: .relaxed) < 200 && Date() < deadline { usleep(2000) }
        for pid in Harness.daemons(mnt) { kill(pid, SIGKILL) }
        while workers.contains(where: { !$0.isFinished }) && Date() < deadline { usleep(1000) }
        Harness.forceUnmount(mnt)
        let r = try fsck()
        XCTAssertEqual(r.findings.filter { $0.severity == "error" }.map { "\($0.kind) \($0.plaintextPath ?? $0.backingPath): \($0.detail)" }, [])
        XCTAssertTrue(r.findings.allSatisfy { $0.kind == "listingChangeInterrupted" || $0.kind == "fileUncommittedTail" }, "\(kinds(r))")
        let repaired = try fsck(["--repair"])
        XCTAssertTrue(repaired.findings.allSatisfy { $0.kind != "listingChangeInterrupted" || $0.repaired == "settledListingManifest" }, "\(repaired.findings)")
        XCTAssertEqual(try fsck().findings.filter { $0.kind.hasPrefix("listing") || $0.kind == "directoryListingMismatch" }.count, 0)
        mount()
        for d in ["a", "b", ""] { try write(mnt + "/\(d)/after", [1, 2, 3]) }
        unmount()
        XCTAssertEqual(try fsck().findings.filter { $0.severity == "error" }.count, 0)
    }

    /// Two `-o shared` mounts of one CIPHERDIR (two "hosts") creating, renaming and
    /// removing entries in one directory at once: each change of the manifest is made under
    /// an OFD lock on it and from the manifest read under that lock, so none is lost and
    /// fsck finds the directory clean.
    func testTwoSharedMountsChangingOneDirectoryAtOnce() throws {
        initVolume()
        let mnt2 = scratch + "/mnt2"
        try FileManager.default.createDirectory(atPath: mnt2, withIntermediateDirectories: true)
        defer { Harness.forceUnmount(mnt2) }
        mount(["-o", "shared"])
        let r = Harness.run(["mount", cipher, mnt2, "--passfile", passfile, "-o", "shared"])
        XCTAssertEqual(r.status, 0, r.stderr)
        XCTAssertEqual(mkdir(mnt + "/dir", 0o755), 0)
        let failures = Mutex<[String]>([])
        let roots = [mnt + "/dir/", mnt2 + "/dir/"]
        DispatchQueue.concurrentPerform(iterations: 2) { side in
            let root = roots[side]
            for i in 0..<200 {
                let name = (side == 0 ? "a" : "b") + "\(i)"
                let fd = open(root + name, O_WRONLY | O_CREAT | O_EXCL, 0o644)
                guard fd >= 0 else { failures.withLock { $0.append("\(name): \(errno)") }; continue }
                close(fd)
                if rename(root + name, root + "r" + name) != 0 { failures.withLock { $0.append("rename \(name): \(errno)") } }
                if i % 3 == 0, unlink(root + "r" + name) != 0 { failures.withLock { $0.append("unlink \(name): \(errno)") } }
            }
        }
        XCTAssertEqual(failures.withLock { $0 }, [])
        XCTAssertEqual(Harness.run(["unmount", mnt2]).status, 0)
        unmount()
        let report = try fsck()
        XCTAssertEqual(report.findings.map { "\($0.kind) \($0.plaintextPath ?? $0.backingPath)" }, [])
    }

    /// fsck --repair quarantines an entry whose name is lost (here a file copied into the
    /// root from `d`: its name does not decrypt there) into /lost+found, made through the
    /// filesystem's own mkdir: both manifests follow, and the next fsck is clean.
    func testQuarantineKeepsTheManifestsTrue() throws {
        let d = try populate()
        let f = try files(d)[0]
        XCTAssertEqual(Harness.shell("cp '\(d)/\(f)' '\(cipher)/\(f)'"), 0)
        var r = try fsck()
        XCTAssertEqual(kinds(r), ["nameUndecryptable"], "an undecryptable name is not an entry of the listing")
        r = try fsck(["--repair"])
        XCTAssertEqual(r.findings.first?.repaired, "quarantined", "\(r.findings)")
        r = try fsck()
        XCTAssertEqual(r.findings.map { "\($0.kind) \($0.plaintextPath ?? $0.backingPath): \($0.detail)" }, [])
        mount()
        XCTAssertEqual(try FileManager.default.contentsOfDirectory(atPath: mnt + "/lost+found").count, 1)
        try write(mnt + "/lost+found/more", [1])
        unmount()
        XCTAssertEqual(try fsck().findings.count, 0)
    }

    /// The states a crash between the two manifest writes of a change leaves, made by hand
    /// (the manifest's slots A and B from before and after a change made through the
    /// mount): the mount settles each at the next change of the directory, and fsck
    /// reports it as a warning that --repair settles.
    func testInterruptedChangesAreSettledByTheMountAndByFsck() throws {
        let d = try populate()
        let provider = PassphraseProvider(passphrase: SecretBytes(copying: Array(Self.passphrase.utf8)))
        let keys = try Volume.unlock(cipher, provider: provider, audit: nil, operation: "test").keys
        let dirID = Array(try read(d + "/xtsfs.dir")[16..<32])
        func slotA() throws -> [UInt8] { Array(try read(d + "/xtsfs.list")[16..<32]) }
        func pending(_ a: [UInt8], _ b: [UInt8]) throws {
            try write(d + "/xtsfs.list", try ListManifest(keyGeneration: keys.generation, slotA: a, slotB: b).encode(macKey: keys.listMACKey, directoryID: dirID))
        }
        // 1. An unlink whose backing change happened: the listing matches B.
        let before = try slotA()
        mount()
        XCTAssertEqual(unlink(mnt + "/d/b"), 0)
        unmount()
        try pending(before, try slotA())
        var r = try fsck()
        XCTAssertEqual(r.findings.map(\.kind), ["listingChangeInterrupted"])
        XCTAssertEqual(r.findings.first?.severity, "warning")
        XCTAssertEqual(r.exitStatus, 0)
        mount()
        try write(mnt + "/d/more", [9])
        unmount()
        XCTAssertEqual(try fsck().findings.map(\.kind), [], "the mount settled it")
        // 2. A create cut off before its header: a file of 0 bytes, the listing without it
        // matches A. fsck --repair removes the file and settles the manifest.
        let beforeCreate = try slotA()
        let old = Set(try files(d))
        mount()
        try write(mnt + "/d/cut", pattern(10, seed: 3))
        unmount()
        let cut = try XCTUnwrap(Set(try files(d)).subtracting(old).first)
        XCTAssertEqual(truncate(d + "/" + cut, 0), 0)
        try pending(beforeCreate, try slotA())
        r = try fsck()
        XCTAssertEqual(r.findings.map(\.kind), ["listingChangeInterrupted"], "\(r.findings)")
        r = try fsck(["--repair"])
        XCTAssertEqual(r.findings.first?.repaired, "settledListingManifest")
        XCTAssertFalse(FileManager.default.fileExists(atPath: d + "/" + cut))
        XCTAssertEqual(try fsck().findings.map(\.kind), [])
        // 3. The same, settled by the mount.
        let beforeCreate2 = try slotA()
        mount()
        try write(mnt + "/d/cut2", pattern(10, seed: 4))
        unmount()
        let cut2 = try XCTUnwrap(Set(try files(d)).subtracting(old).first)
        XCTAssertEqual(truncate(d + "/" + cut2, 0), 0)
        try pending(beforeCreate2, try slotA())
        mount()
        try write(mnt + "/d/after", [1])
        var st = stat()
        XCTAssertEqual(stat(mnt + "/d/cut2", &st), -1, "the create cut off is gone")
        unmount()
        XCTAssertEqual(try fsck().findings.map(\.kind), [])
        // 4. Neither: a listing changed behind the mount's back while a change was pending:
        // the mount refuses to change the directory (EIO), never sealing it.
        let now = try slotA()
        XCTAssertEqual(unlink(d + "/" + (try files(d)[0])), 0)
        try pending(now, try ListingElement.seal(key: keys.listSealKey, [UInt8](repeating: 1, count: 16)))
        mount()
        XCTAssertEqual(open(mnt + "/d/refused", O_CREAT | O_WRONLY, 0o644), -1)
        XCTAssertEqual(errno, EIO)
        unmount()
        XCTAssertTrue(kinds(try fsck()).contains("directoryListingMismatch"))
    }

    /// A mkdir cut off before the new directory's header was written, and an rmdir cut off
    /// after it removed the header, leave an empty directory without a header: fsck reports
    /// the change as interrupted and --repair removes it; the mount does the same at the
    /// directory's next change.
    func testInterruptedMkdirAndRmdirAreSettled() throws {
        let d = try populate()
        let provider = PassphraseProvider(passphrase: SecretBytes(copying: Array(Self.passphrase.utf8)))
        let keys = try Volume.unlock(cipher, provider: provider, audit: nil, operation: "test").keys
        let dirID = Array(try read(d + "/xtsfs.dir")[16..<32])
        func slotA() throws -> [UInt8] { Array(try read(d + "/xtsfs.list")[16..<32]) }
        func pending(_ a: [UInt8], _ b: [UInt8]) throws {
            try write(d + "/xtsfs.list", try ListManifest(keyGeneration: keys.generation, slotA: a, slotB: b).encode(macKey: keys.listMACKey, directoryID: dirID))
        }
        func subdirs() throws -> Set<String> {
            Set(try entries(d).filter { var st = stat(); return lstat(d + "/" + $0, &st) == 0 && st.st_mode & S_IFMT == S_IFDIR })
        }
        // mkdir cut off: the new directory holds its manifest but no header; the manifest B.
        let old = try subdirs()
        let beforeMkdir = try slotA()
        mount()
        XCTAssertEqual(mkdir(mnt + "/d/mk", 0o755), 0, String(cString: strerror(errno)))
        unmount()
        let sub = try XCTUnwrap(try subdirs().subtracting(old).first)
        XCTAssertEqual(unlink(d + "/" + sub + "/xtsfs.dir"), 0)
        try pending(beforeMkdir, try slotA())
        var r = try fsck()
        XCTAssertEqual(r.findings.map(\.kind), ["listingChangeInterrupted"], "\(r.findings)")
        r = try fsck(["--repair"])
        XCTAssertEqual(r.findings.first?.repaired, "settledListingManifest")
        XCTAssertFalse(FileManager.default.fileExists(atPath: d + "/" + sub))
        XCTAssertEqual(try fsck().findings.map(\.kind), [])
        // rmdir cut off after the header went: an empty directory, the listing matches B;
        // the mount removes it at the next change.
        mount()
        XCTAssertEqual(mkdir(mnt + "/d/rm", 0o755), 0)
        unmount()
        let sub2 = try XCTUnwrap(try subdirs().subtracting(old).first)
        let beforeRmdir = try slotA()
        mount()
        XCTAssertEqual(rmdir(mnt + "/d/rm"), 0)
        unmount()
        XCTAssertEqual(mkdir(d + "/" + sub2, 0o700), 0)
        try pending(beforeRmdir, try slotA())
        mount()
        try write(mnt + "/d/after-rmdir", [1])
        var st = stat()
        XCTAssertEqual(stat(mnt + "/d/rm", &st), -1, "the rmdir cut off is finished")
        unmount()
        XCTAssertFalse(FileManager.default.fileExists(atPath: d + "/" + sub2))
        XCTAssertEqual(try fsck().findings.map(\.kind), [])
    }

    /// The DEK rekey verifies each directory's manifest under the old generation and seals
    /// it under the new one; a tampered listing stops it.
    func testDEKRekeyResealsManifestsAndStopsAtATamperedListing() throws {
        let d = try populate()
        mount()
        try FileManager.default.createSymbolicLink(atPath: mnt + "/d/link", withDestinationPath: String(repeating: "t", count: 3500))
        try write(mnt + "/d/" + String(repeating: "L", count: 200), [1])
        unmount()
        var r = Harness.run(["rekey", cipher, "--dek", "--passfile", passfile])
        XCTAssertEqual(r.status, 0, r.stderr)
        XCTAssertEqual(try fsck().findings.map(\.kind), [])
        // Tamper, then rekey again: it stops, naming the directory. (The rekey renamed
        // every backing entry to its new-generation name, `d` too.)
        _ = d
        let renamed = try XCTUnwrap(try entries(cipher).first { var st = stat(); return lstat(cipher + "/" + $0, &st) == 0 && st.st_mode & S_IFMT == S_IFDIR })
        XCTAssertEqual(unlink(cipher + "/" + renamed + "/" + (try files(cipher + "/" + renamed)[0])), 0)
        r = Harness.run(["rekey", cipher, "--dek", "--passfile", passfile])
        XCTAssertNotEqual(r.status, 0)
        XCTAssertTrue(r.stderr.contains("/d") && r.stderr.contains("does not match its manifest"), r.stderr)
    }
}
