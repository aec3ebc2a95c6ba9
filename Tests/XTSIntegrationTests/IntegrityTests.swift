import Foundation
import Synchronization
import XCTest
import XTSSystem
#if canImport(Glibc)
import Glibc
#endif

/// The mount, differential and crash suites again, on integrity volumes.
/// (Each subclass declares a test of its own: Linux test discovery then lists the
/// inherited ones too.)
final class IntegrityMountTests: MountTests {
    override var initArguments: [String] { ["--integrity"] }

    func testStatusShowsTheFeature() {
        let r = Harness.run(["status", cipher])
        XCTAssertEqual(r.status, 0, r.stderr)
        XCTAssertTrue(r.stdout.contains("block-authentication, ghash-unit-tags"), r.stdout)
        let json = Harness.run(["status", cipher, "--json"])
        XCTAssertTrue(json.stdout.contains("block-authentication"), json.stdout)
        XCTAssertTrue(json.stdout.contains("ghash-unit-tags"), json.stdout)
    }

    /// fsck of an untouched integrity volume: clean.
    func testFsckOfAnIntegrityVolumeIsClean() throws {
        try write(mnt + "/f", pattern(10000, seed: 3))
        try write(mnt + "/empty", [])
        unmount()
        let r = Harness.run(["fsck", cipher, "--passfile", passfile])
        XCTAssertEqual(r.status, 0, r.stdout + r.stderr)
        mount()
    }
}

final class IntegrityDifferentialTests: DifferentialTests {
    override var initArguments: [String] { ["--integrity"] }

    func testSeed5() throws { try run(seed: 5, steps: 600) }
}

final class IntegrityCrashTests: CrashTests {
    override var initArguments: [String] { ["--integrity"] }

    /// Random in-place overwrites of whole pages, fsync'ed every 16 writes, until SIGKILL:
    /// afterwards no page reads as an error, and each holds a version at least as new as
    /// the last one fsync'ed (a write in flight may or may not have landed).
    func testKillDuringOverwritesNeverReadsAsEIO() throws {
        initVolume()
        mount()
        let pages = 300
        @Sendable func page(_ i: Int, _ v: Int) -> [UInt8] { pattern(4096, seed: UInt64(i * 100_000 + v)) }
        let path = mnt + "/overwritten"
        try write(path, (0..<pages).flatMap { page($0, 0) })
        let f0 = open(path, O_RDONLY); XCTAssertEqual(fsync(f0), 0); close(f0)
        let versions = Mutex<(written: [Int], synced: [Int])>(([Int](repeating: 0, count: pages), [Int](repeating: 0, count: pages)))
        let started = Atomic<Bool>(false)
        let writer = Thread {
            let fd = open(path, O_WRONLY)
            guard fd >= 0 else { return }
            defer { close(fd) }
            var rng = SystemRandomNumberGenerator()
            var n = 0
            while true {
                let i = Int.random(in: 0..<pages, using: &rng)
                let v = versions.withLock { $0.written[i] += 1; return $0.written[i] }
                let bytes = page(i, v)
                if bytes.withUnsafeBytes({ pwrite(fd, $0.baseAddress!, 4096, off_t(i * 4096)) }) != 4096 { return }
                n += 1
                if n % 16 == 0 {
                    let snapshot = versions.withLock { $0.written }
                    if fsync(fd) != 0 { return }
                    versions.withLock { $0.synced = snapshot }
                    started.store(true, ordering: .releasing)
                }
            }
        }
        writer.start()
        let deadline = Date().addingTimeInterval(20)
        while !started.load(ordering: .acquiring) && Date() < deadline { usleep(1000) }
        usleep(300_000)
        for pid in Harness.daemons(mnt) { kill(pid, SIGKILL) }
        while !writer.isFinished && Date() < deadline { usleep(1000) }
        Harness.forceUnmount(mnt)
        mount()
        let (written, synced) = versions.withLock { ($0.written, $0.synced) }
        XCTAssertGreaterThan(synced.reduce(0, +), 0)
        let after = try read(path)
        XCTAssertEqual(after.count, pages * 4096)
        for i in 0..<pages {
            let got = Array(after[i * 4096..<(i + 1) * 4096])
            let ok = (synced[i]...written[i]).contains { got == page(i, $0) }
            XCTAssertTrue(ok, "page \(i): not a version from \(synced[i]) to \(written[i])")
        }
    }
}

/// Changes made to CIPHERDIR behind the mount's back (FORMAT.md section 12.6): each one
/// reads as EIO, or, where the format says it cannot be detected, behaves as it says.
final class IntegrityTamperTests: VolumeTestCase {
    override var initArguments: [String] { ["--integrity"] }

    override func setUpWithError() throws {
        try super.setUpWithError()
        initVolume()
        mount()
    }

    /// Writes a file through the mount and returns its backing path.
    func create(_ name: String, _ bytes: [UInt8]) throws -> String {
        let before = Set(try FileManager.default.contentsOfDirectory(atPath: cipher))
        try write(mnt + "/" + name, bytes)
        let added = Set(try FileManager.default.contentsOfDirectory(atPath: cipher)).subtracting(before)
        XCTAssertEqual(added.count, 1)
        return cipher + "/" + added.first!
    }

    struct Errno: Error, Equatable { var code: Int32 }

    /// The file's bytes, or the errno of the first failing call.
    func attempt(_ name: String) -> Result<[UInt8], Errno> {
        let fd = open(mnt + "/" + name, O_RDONLY)
        guard fd >= 0 else { return .failure(Errno(code: errno)) }
        defer { close(fd) }
        var out: [UInt8] = []
        var buf = [UInt8](repeating: 0, count: 65536)
        while true {
            let n = buf.withUnsafeMutableBytes { Glibc.read(fd, $0.baseAddress!, $0.count) }
            if n < 0 { return .failure(Errno(code: errno)) }
            if n == 0 { return .success(out) }
            out += buf[0..<n]
        }
    }

    func assertEIO(_ name: String, _ why: String, file: StaticString = #filePath, line: UInt = #line) {
        switch attempt(name) {
        case .success(let b): XCTFail("\(why): read \(b.count) bytes instead of EIO", file: file, line: line)
        case .failure(let e): XCTAssertEqual(e.code, EIO, why, file: file, line: line)
        }
    }

    func patch(_ path: String, _ body: (inout [UInt8]) -> Void) throws {
        var b = try read(path)
        body(&b)
        try write(path, b)
    }

    // Offsets of FORMAT.md section 12.2 (group 0).
    func dataOffset(_ unit: Int) -> Int { (unit / 126) * 127 * 4096 + 4096 * (1 + unit % 126) }
    func entryOffset(_ unit: Int) -> Int { (unit / 126) * 127 * 4096 + 64 + 32 * (unit % 126) }

    let size = 10 * 4096 + 123

    func testBitFlipInDataTagAndHeader() throws {
        let a = try create("a", pattern(size, seed: 1))
        let b = try create("b", pattern(size, seed: 2))
        let c = try create("c", pattern(size, seed: 3))
        unmount()
        try patch(a) { $0[dataOffset(4) + 77] ^= 0x01 }
        try patch(b) { $0[entryOffset(4) + 5] ^= 0x01 }
        try patch(c) { $0[20] ^= 0x01 }
        mount()
        assertEIO("a", "bit flip in a unit")
        assertEIO("b", "bit flip in its tag")
        assertEIO("c", "bit flip in the file header")
    }

    /// fsck reads every unit of every file: tampered units, tags and cut files are
    /// reported (exit 4), a clean file is not, and --repair changes nothing.
    func testFsckReportsTamperedFilesAndRepairsNothing() throws {
        let a = try create("a", pattern(size, seed: 1))
        let b = try create("b", pattern(size, seed: 2))
        let c = try create("c", pattern(size, seed: 3))
        let cut = try create("cut", pattern(size, seed: 4))
        unmount()
        XCTAssertEqual(Harness.run(["fsck", cipher, "--passfile", passfile]).status, 0, "before tampering")
        // Three units of a, two of them adjacent: every one is named, not just the first.
        try patch(a) { $0[dataOffset(4) + 77] ^= 0x01; $0[dataOffset(7)] ^= 0x80; $0[dataOffset(8) + 4095] ^= 0x02 }
        try patch(b) { $0[entryOffset(4) + 5] ^= 0x01 }
        XCTAssertEqual(truncate(cut, off_t(dataOffset(8))), 0)
        let before = try [a, b, c, cut].map { try read($0) }
        for extra in [[], ["--repair"]] {
            let r = Harness.run(["fsck", cipher, "--json", "--passfile", passfile] + extra)
            XCTAssertEqual(r.status, 4, r.stdout + r.stderr)
            let json = try JSONSerialization.jsonObject(with: Data(r.stdout.utf8)) as? [String: Any]
            let findings = (json?["findings"] as? [[String: Any]]) ?? []
            func kinds(_ path: String) -> [String] {
                let name = (path as NSString).lastPathComponent
                return findings.filter { ($0["backingPath"] as? String)?.hasSuffix(name) == true }.compactMap { $0["kind"] as? String }
            }
            XCTAssertEqual(kinds(a), ["fileAuthenticationFailed"], "bit flip in a unit \(extra)")
            let detail = findings.first { ($0["backingPath"] as? String)?.hasSuffix((a as NSString).lastPathComponent) == true }?["detail"] as? String ?? ""
            XCTAssertTrue(detail.hasPrefix("3 units of its 11 fail their tags: units 4 (bytes 16384–20479), 7–8 (bytes 28672–36863);"), detail)
            XCTAssertEqual(kinds(b), ["fileAuthenticationFailed"], "bit flip in a tag \(extra)")
            XCTAssertEqual(kinds(cut), ["fileAuthenticationFailed"], "cut at a unit boundary \(extra)")
            XCTAssertEqual(kinds(c), [], "untouched file \(extra)")
            XCTAssertEqual(findings.count, 3, r.stdout)
        }
        XCTAssertEqual(try [a, b, c, cut].map { try read($0) }, before, "fsck --repair changed a tampered file")
        mount()
        assertEIO("a", "still EIO through the mount")
    }

    func testUnitMovedWithinAndBetweenFiles() throws {
        let a = try create("a", pattern(size, seed: 1))
        let b = try create("b", pattern(size, seed: 2))
        unmount()
        let bytesA = try read(a)
        try patch(a) { x in
            x.replaceSubrange(dataOffset(6)..<dataOffset(6) + 4096, with: bytesA[dataOffset(2)..<dataOffset(2) + 4096])
            x.replaceSubrange(entryOffset(6)..<entryOffset(6) + 32, with: bytesA[entryOffset(2)..<entryOffset(2) + 32])
        }
        try patch(b) { x in
            x.replaceSubrange(dataOffset(3)..<dataOffset(3) + 4096, with: bytesA[dataOffset(3)..<dataOffset(3) + 4096])
            x.replaceSubrange(entryOffset(3)..<entryOffset(3) + 32, with: bytesA[entryOffset(3)..<entryOffset(3) + 32])
        }
        mount()
        assertEIO("a", "unit moved to another position of the same file")
        assertEIO("b", "unit moved into another file")
    }

    func testTruncationAndExtensionAtAndOffUnitBoundaries() throws {
        let names = ["at-unit", "off-unit", "at-header", "inside-header", "to-tag-block"]
        var paths: [String] = []
        for (i, n) in names.enumerated() { paths.append(try create(n, pattern(size + i, seed: UInt64(i)))) }
        let extended = try create("extended", pattern(size, seed: 9))
        unmount()
        XCTAssertEqual(truncate(paths[0], off_t(dataOffset(8))), 0)
        XCTAssertEqual(truncate(paths[1], off_t(dataOffset(8) + 1000)), 0)
        XCTAssertEqual(truncate(paths[2], 64), 0)
        XCTAssertEqual(truncate(paths[3], 40), 0)
        XCTAssertEqual(truncate(paths[4], 4096), 0)
        try patch(extended) { $0 += pattern(50_000, seed: 10) }
        mount()
        for n in names { assertEIO(n, "backing file cut short: \(n)") }
        // Bytes past the committed length are never served: the file reads as it was.
        XCTAssertEqual(try? attempt("extended").get(), pattern(size, seed: 9))
        var st = stat()
        XCTAssertEqual(stat(mnt + "/extended", &st), 0)
        XCTAssertEqual(Int(st.st_size), size)
    }

    /// What reading never looks at, fsck does: an uncommitted tail is a warning that
    /// --repair cuts off (the file reads the same before and after), and non-zero reserved
    /// bytes of a later group are a warning left alone. Neither is an error (exit 0).
    func testFsckReportsUncommittedTailAndForeignReservedBytes() throws {
        let big = 130 * 4096 + 7
        let tail = try create("tail", pattern(size, seed: 11))
        let reserved = try create("reserved", pattern(big, seed: 12))
        let clean = try create("clean", pattern(big, seed: 13))
        unmount()
        let committed = try read(tail).count
        try patch(tail) { $0 += pattern(9000, seed: 14) }
        try patch(reserved) { $0[127 * 4096 + 50] = 0x5a }
        func findings(_ extra: [String]) throws -> (Int32, [[String: Any]]) {
            let r = Harness.run(["fsck", cipher, "--json", "--passfile", passfile] + extra)
            let json = try JSONSerialization.jsonObject(with: Data(r.stdout.utf8)) as? [String: Any]
            return (r.status, (json?["findings"] as? [[String: Any]]) ?? [])
        }
        func of(_ all: [[String: Any]], _ path: String) -> [[String: Any]] {
            all.filter { ($0["backingPath"] as? String)?.hasSuffix((path as NSString).lastPathComponent) == true }
        }
        var (status, all) = try findings([])
        XCTAssertEqual(status, 0, "\(all)")
        XCTAssertEqual(of(all, tail).compactMap { $0["kind"] as? String }, ["fileUncommittedTail"])
        XCTAssertEqual(of(all, tail).compactMap { $0["severity"] as? String }, ["warning"])
        XCTAssertEqual(of(all, reserved).compactMap { $0["kind"] as? String }, ["fileReservedBytesForeign"])
        XCTAssertEqual(of(all, clean).count, 0)
        XCTAssertEqual(try read(tail).count, committed + 9000, "a check changes nothing")
        (status, all) = try findings(["--repair"])
        XCTAssertEqual(of(all, tail).compactMap { $0["repaired"] as? String }, ["trimmedUncommittedTail"], "\(all)")
        XCTAssertEqual(try read(tail).count, committed, "cut back to the committed length")
        XCTAssertEqual(try read(reserved)[127 * 4096 + 50], 0x5a, "reserved bytes left alone")
        (status, all) = try findings([])
        XCTAssertEqual(of(all, tail).count, 0, "nothing left to report")
        mount()
        XCTAssertEqual(try? attempt("tail").get(), pattern(size, seed: 11))
        XCTAssertEqual(try? attempt("reserved").get(), pattern(big, seed: 12))
    }

    func testHeaderTransplantDoesNotOpenElsewhere() throws {
        let a = try create("a", pattern(size, seed: 1))
        let b = try create("b", pattern(size, seed: 2))
        unmount()
        let headerA = Array(try read(a)[0..<64])
        try patch(b) { $0.replaceSubrange(0..<64, with: headerA) }
        mount()
        assertEIO("b", "header copied from another file")
        // Nor can it be written through (that would reuse a's key and tweaks).
        let fd = open(mnt + "/b", O_WRONLY)
        if fd >= 0 {
            let n = pattern(4096, seed: 5).withUnsafeBytes { pwrite(fd, $0.baseAddress!, 4096, 4096) }
            let fsynced = fsync(fd)
            close(fd)
            XCTAssertTrue(n < 0 || fsynced != 0, "a write through a transplanted header must fail")
        }
        XCTAssertEqual(try? attempt("a").get(), pattern(size, seed: 1))
    }

    func testZeroedUnitIsNotAHole() throws {
        let a = try create("a", pattern(size, seed: 1))
        let b = try create("b", pattern(size, seed: 2))
        unmount()
        try patch(a) { x in for i in dataOffset(2)..<dataOffset(2) + 4096 { x[i] = 0 } }
        try patch(b) { x in
            for i in dataOffset(2)..<dataOffset(2) + 4096 { x[i] = 0 }
            for i in entryOffset(2)..<entryOffset(2) + 32 { x[i] = 0 }
        }
        mount()
        assertEIO("a", "unit zeroed to pass for a hole")
        assertEIO("b", "unit and its tags zeroed")
    }

    /// File roots (section 12.11): an older version of a unit put back, alone, with its tag
    /// entry, or with its whole tag block, reads as EIO, through a mount that has the file
    /// open (and cached what it verified) and after a remount, and fsck reports it; the
    /// whole file put back reads as the older file (documented). Whole files swapped by
    /// their backing names read as each other, and fsck reports the directory (12.10).
    func testReplayIsDetectedAndWholeFileSwapIsReported() throws {
        let big = 140 * 4096 + 5
        let a = try create("a", pattern(size, seed: 1))
        let b = try create("b", pattern(size, seed: 2))
        let c = try create("c", pattern(big, seed: 3))
        unmount()
        let oldA = try read(a), oldC = try read(c)
        mount()
        for (name, unit) in [("a", 3), ("c", 130)] {
            let fd = open(mnt + "/" + name, O_WRONLY)
            XCTAssertEqual(pattern(4096, seed: 7).withUnsafeBytes { pwrite(fd, $0.baseAddress!, 4096, off_t(4096 * unit)) }, 4096)
            close(fd)
        }
        unmount()
        let newA = try read(a), newC = try read(c)
        let block = 127 * 4096
        let cases: [(String, (inout [UInt8]) -> Void)] = [
            ("unit alone", { $0.replaceSubrange(self.dataOffset(130)..<self.dataOffset(130) + 4096, with: oldC[self.dataOffset(130)..<self.dataOffset(130) + 4096]) }),
            ("unit and entry", { x in
                x.replaceSubrange(self.dataOffset(130)..<self.dataOffset(130) + 4096, with: oldC[self.dataOffset(130)..<self.dataOffset(130) + 4096])
                x.replaceSubrange(self.entryOffset(130)..<self.entryOffset(130) + 32, with: oldC[self.entryOffset(130)..<self.entryOffset(130) + 32]) }),
            ("unit and tag block", { x in
                x.replaceSubrange(self.dataOffset(130)..<self.dataOffset(130) + 4096, with: oldC[self.dataOffset(130)..<self.dataOffset(130) + 4096])
                x.replaceSubrange(block..<block + 4096, with: oldC[block..<block + 4096]) }),
        ]
        for (what, change) in cases {
            try write(c, newC)
            try patch(c, change)
            mount()
            assertEIO("c", "replay: \(what), after a remount")
            unmount()
            let r = Harness.run(["fsck", cipher, "--json", "--passfile", passfile])
            XCTAssertEqual(r.status, 4, what + ": " + r.stdout)
            XCTAssertTrue(r.stdout.contains("fileAuthenticationFailed"), r.stdout)
        }
        // While the mount has the file open and verified: the next read sees the change.
        try write(c, newC)
        mount()
        let fd = open(mnt + "/c", O_RDONLY | 0o40000 /* O_DIRECT: past the page cache */)
        XCTAssertGreaterThanOrEqual(fd, 0)
        var buf = [UInt8](repeating: 0, count: 4096)
        XCTAssertEqual(buf.withUnsafeMutableBytes { pread(fd, $0.baseAddress!, 4096, off_t(4096 * 130)) }, 4096)
        XCTAssertEqual(buf, pattern(4096, seed: 7))
        try patch(c, cases[2].1)
        XCTAssertEqual(buf.withUnsafeMutableBytes { pread(fd, $0.baseAddress!, 4096, off_t(4096 * 130)) }, -1, "replay under an open file")
        XCTAssertEqual(errno, EIO)
        close(fd)
        unmount()
        // Group 0 shares its tag block with the header: the unit with its entry is detected.
        try patch(a) { x in
            x.replaceSubrange(self.dataOffset(3)..<self.dataOffset(3) + 4096, with: oldA[self.dataOffset(3)..<self.dataOffset(3) + 4096])
            x.replaceSubrange(self.entryOffset(3)..<self.entryOffset(3) + 32, with: oldA[self.entryOffset(3)..<self.entryOffset(3) + 32])
        }
        mount()
        assertEIO("a", "replay in group 0")
        unmount()
        // The whole file put back: an older file.
        try write(a, oldA)
        try write(c, oldC)
        XCTAssertEqual(rename(a, scratch + "/swap"), 0)
        XCTAssertEqual(rename(b, a), 0)
        XCTAssertEqual(rename(scratch + "/swap", b), 0)
        mount()
        XCTAssertEqual(try? attempt("c").get(), pattern(big, seed: 3), "the whole file put back reads as the older file")
        XCTAssertEqual(try? attempt("b").get(), pattern(size, seed: 1), "swapped files read as each other")
        XCTAssertEqual(try? attempt("a").get(), pattern(size, seed: 2), "swapped files read as each other")
        unmount()
        let r = Harness.run(["fsck", cipher, "--json", "--passfile", passfile])
        XCTAssertEqual(r.status, 4, r.stdout)
        XCTAssertTrue(r.stdout.contains("directoryListingMismatch"), r.stdout)
        _ = newA
        mount()
    }

    /// The same bit flip on a plain volume returns garbage without an error (section 10).
    func testPlainVolumeReturnsGarbage() throws {
        unmount()
        try FileManager.default.removeItem(atPath: cipher)
        let r = Harness.run(["init", cipher, "--passfile", passfile] + Self.cheapKDF)
        XCTAssertEqual(r.status, 0, r.stderr)
        mount()
        let a = try create("a", pattern(size, seed: 1))
        unmount()
        try patch(a) { $0[32 + 4096 * 4 + 77] ^= 0x01 }
        mount()
        guard case .success(let got) = attempt("a") else { return XCTFail("plain XTS authenticates nothing") }
        XCTAssertEqual(got.count, size)
        XCTAssertNotEqual(got, pattern(size, seed: 1))
        XCTAssertEqual(Array(got[0..<4096 * 4]), Array(pattern(size, seed: 1)[0..<4096 * 4]))
    }

    func testSparseFilesHardLinksAndFallocate() throws {
        let fd = open(mnt + "/sparse", O_RDWR | O_CREAT, 0o644)
        XCTAssertGreaterThanOrEqual(fd, 0)
        XCTAssertEqual(ftruncate(fd, 1 << 30), 0)
        XCTAssertEqual([UInt8](repeating: 7, count: 10).withUnsafeBytes { pwrite(fd, $0.baseAddress!, 10, 500_000_000) }, 10)
        XCTAssertNoThrow(try Sys.fallocate(fd, mode: 0x02 | 0x01, offset: 500_000_000, length: 4))   // PUNCH_HOLE | KEEP_SIZE
        XCTAssertNoThrow(try Sys.fallocate(fd, mode: 0, offset: (1 << 30) - 100, length: 5000))       // extends
        close(fd)
        var st = stat()
        XCTAssertEqual(stat(mnt + "/sparse", &st), 0)
        XCTAssertEqual(Int(st.st_size), (1 << 30) + 4900)
        XCTAssertEqual(link(mnt + "/sparse", mnt + "/sparse-link"), 0)
        unmount()
        mount()
        let h = open(mnt + "/sparse-link", O_RDONLY)
        var buf = [UInt8](repeating: 1, count: 16)
        XCTAssertEqual(buf.withUnsafeMutableBytes { pread(h, $0.baseAddress!, 16, 499_999_998) }, 16)
        XCTAssertEqual(buf, [0, 0, 0, 0, 0, 0, 7, 7, 7, 7, 7, 7, 0, 0, 0, 0])
        XCTAssertEqual(buf.withUnsafeMutableBytes { pread(h, $0.baseAddress!, 16, 12345) }, 16)
        XCTAssertEqual(buf, [UInt8](repeating: 0, count: 16))
        close(h)
        // The backing file stays sparse: its tag blocks and one data block, not a GiB.
        let backing = try FileManager.default.contentsOfDirectory(atPath: cipher).filter { !$0.hasPrefix("xtsfs.") }
        XCTAssertEqual(backing.count, 2, "two names of one backing inode")
        var bst = stat()
        XCTAssertEqual(stat(cipher + "/" + backing[0], &bst), 0)
        XCTAssertLessThan(Int(bst.st_blocks) * 512, 32 << 20)
    }
}
