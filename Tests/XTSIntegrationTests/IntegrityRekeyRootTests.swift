import Foundation
import XCTest
import XTSVolume
#if canImport(Glibc)
import Glibc
#endif

/// The DEK rekey of files with a file root (header version 3, FORMAT.md 12.11 and 13.2):
/// the old header is checked against the root of the old tag blocks before anything of
/// the file is written (a unit put back with its tag block from an older version of the
/// file stops the rekey), and the new header commits to the root of the new tag blocks,
/// whether the file is rewritten in one segment or several, at once or interrupted and
/// finished from its journal.
extension IntegrityRekeyTests {
    static let groupLength = 127 * 4096

    /// Backing offset of the data block of unit `u`.
    static func dataOffset(_ u: Int) -> Int { (u / 126) * groupLength + 4096 + (u % 126) * 4096 }

    /// The file header version (bytes 0–1) of a backing file.
    func headerVersion(_ path: String) throws -> Int {
        let b = try read(path)
        return b.count >= 2 ? Int(b[0]) | Int(b[1]) << 8 : -1
    }

    /// The only backing file of `size` bytes.
    func backingFile(size: Int, file: StaticString = #filePath, line: UInt = #line) -> String? {
        let found = backingRegularFiles().filter { $0.size == size }
        guard found.count == 1 else { XCTFail("no single backing file of \(size) bytes: \(backingRegularFiles())", file: file, line: line); return nil }
        return found[0].path
    }

    /// A unit overwritten through the mount, then its old data block and its group's old
    /// tag block put back from a copy of the backing file taken before: every unit still
    /// matches its tag, only the file root tells. The rekey (a file in one segment, and in
    /// several: both ways of checking the old root) stops at the file, naming it, with
    /// nothing of it written; the mount refuses the unit, and its online rekey stops at
    /// the file too; once the file is removed, the rekey finishes.
    func testReplayedUnitAndTagBlockStopTheRekeyBeforeTheFileIsWritten() throws {
        initVolume()
        XCTAssertTrue(Harness.run(["status", cipher]).stdout.contains("file-roots"), "init --integrity makes file roots")
        mount()
        let size = 3 << 20
        try write(mnt + "/victim", pattern(size, seed: 11))
        try write(mnt + "/good", pattern(700_000, seed: 12))
        unmount()
        // 3 MiB: 768 units, groups 0-5 full and 12 units of group 6.
        guard let victim = backingFile(size: 6 * Self.groupLength + 4096 * 13) else { return }
        XCTAssertEqual(try headerVersion(victim), 3)
        let snapshot = try read(victim)
        // Unit 640 (group 5) overwritten through the mount.
        let unit = 640, group = unit / 126
        mount()
        let fd = open(mnt + "/victim", O_WRONLY)
        XCTAssertGreaterThanOrEqual(fd, 0)
        let fresh = pattern(4096, seed: 13)
        XCTAssertEqual(fresh.withUnsafeBytes { pwrite(fd, $0.baseAddress, 4096, off_t(unit * 4096)) }, 4096)
        close(fd)
        unmount()
        // The old data block and the old tag block put back.
        let now = try read(victim)
        let d = Self.dataOffset(unit), t = group * Self.groupLength
        XCTAssertNotEqual(Array(now[d..<d + 4096]), Array(snapshot[d..<d + 4096]), "the unit was rewritten")
        let h = open(victim, O_RDWR)
        XCTAssertGreaterThanOrEqual(h, 0)
        for at in [d, t] {
            XCTAssertEqual(Array(snapshot[at..<at + 4096]).withUnsafeBytes { pwrite(h, $0.baseAddress, 4096, off_t(at)) }, 4096)
        }
        close(h)
        let replayed = try read(victim)

        for env in [[:], ["XTSFS_REKEY_BATCH_BYTES": "1048576"]] {
            let (status, err) = runEnv(["rekey", cipher, "--dek", "--passfile", passfile], env: env)
            XCTAssertEqual(status, ExitStatus.failure.rawValue, "\(env): \(err)")
            XCTAssertTrue(err.contains("/victim") && err.contains("does not match the file's tag blocks") && err.contains("nothing of this file rewritten"),
                          "\(env): \(err)")
            XCTAssertEqual(try read(victim), replayed, "\(env): the replayed file was rewritten")
            XCTAssertEqual(try generation(victim), 1)
            XCTAssertTrue(backingPaths(named: "xtsfs.rekey-journal", in: cipher).isEmpty, "\(env)")
        }
        mount()
        XCTAssertEqual(try read(mnt + "/good"), pattern(700_000, seed: 12))
        let v = open(mnt + "/victim", O_RDONLY)
        if v >= 0 {
            var buf = [UInt8](repeating: 0, count: 4096)
            XCTAssertEqual(pread(v, &buf, 4096, off_t(unit * 4096)), -1, "the replayed unit reads")
            XCTAssertEqual(errno, EIO)
            close(v)
        } else {
            XCTAssertEqual(errno, EIO)
        }
        // Online the daemon's sweep stops at it too.
        let online = Harness.run(["rekey", cipher, "--dek", "--passfile", passfile])
        XCTAssertEqual(online.status, 1, online.stderr)
        XCTAssertTrue(online.stderr.contains("online rekey stopped") && online.stderr.contains("/victim") &&
                      online.stderr.contains("does not match the file's tag blocks"), online.stderr)
        XCTAssertEqual(try read(mnt + "/good"), pattern(700_000, seed: 12))
        XCTAssertEqual(unlink(mnt + "/victim"), 0)
        let again = Harness.run(["rekey", cipher, "--dek", "--passfile", passfile])
        XCTAssertEqual(again.status, 0, again.stderr)
        XCTAssertEqual(try read(mnt + "/good"), pattern(700_000, seed: 12))
        unmount()
        XCTAssertTrue(Harness.run(["status", cipher]).stdout.contains("Key generation:  2"))
        mount()
        XCTAssertEqual(try read(mnt + "/good"), pattern(700_000, seed: 12))
        unmount()
    }

    /// A volume with file roots rekeyed in 1 MiB batches: a small file, a two-group file,
    /// a sparse one and a 3 MiB file rewritten in segments, each killed in the middle of
    /// the large file (a segment half written, a segment done) and finished by a rerun,
    /// or read first by a mount that finishes the journal. Every header is of version 3
    /// and the new generation; the tree reads back byte for byte, and takes a write.
    func testFileRootVolumeRekeyedInSegmentsInterruptedAndFinished() throws {
        let env = ["XTSFS_REKEY_BATCH_BYTES": "1048576"]
        initVolume()
        XCTAssertTrue(Harness.run(["status", cipher]).stdout.contains("file-roots"), "init --integrity makes file roots")
        mount()
        let large = pattern(3 << 20 + 5000, seed: 21), two = pattern(600_000, seed: 22), small = pattern(10_000, seed: 23)
        try write(mnt + "/large", large)
        try write(mnt + "/two", two)
        try write(mnt + "/small", small)
        let fd = open(mnt + "/sparse", O_WRONLY | O_CREAT, 0o644)
        XCTAssertGreaterThanOrEqual(fd, 0)
        _ = pattern(5000, seed: 24).withUnsafeBytes { pwrite(fd, $0.baseAddress, $0.count, 3 << 20) }
        close(fd)
        let before = manifest(mnt)
        unmount()
        let template = scratch + "/template-roots"
        XCTAssertEqual(sh("cp -a '\(cipher)' '\(template)' && echo ok").trimmingCharacters(in: .whitespacesAndNewlines), "ok")
        let (traced, trace) = runEnv(["rekey", cipher, "--dek", "--passfile", passfile], env: env.merging(["XTSFS_REKEY_TRACE": "1"]) { $1 })
        XCTAssertEqual(traced, 0, trace)
        let steps = trace.split(separator: "\n").filter { $0.hasPrefix("rekey step ") }.map(String.init)
        func checkDone(_ what: String) throws {
            for f in backingRegularFiles() where f.size >= 64 {
                XCTAssertEqual(try headerVersion(f.path), 3, "\(what): \(f.path)")
                XCTAssertEqual(try generation(f.path), 2, "\(what): \(f.path)")
            }
            mount()
            XCTAssertEqual(manifest(mnt), before, what)
            XCTAssertEqual(try read(mnt + "/large"), large, what)
            // The rekeyed file takes a write (its new root is the mount's to keep).
            let w = open(mnt + "/large", O_WRONLY)
            XCTAssertGreaterThanOrEqual(w, 0)
            let patch = pattern(9000, seed: 25)
            XCTAssertEqual(patch.withUnsafeBytes { pwrite(w, $0.baseAddress, $0.count, 700_000) }, 9000)
            close(w)
            var want = large
            want.replaceSubrange(700_000..<709_000, with: patch)
            XCTAssertEqual(try read(mnt + "/large"), want, what)
            unmount()
            mount()
            XCTAssertEqual(try read(mnt + "/large"), want, "\(what), mounted again")
            unmount()
        }
        try checkDone("uninterrupted")
        // Killed where the large file is half rewritten: in a segment's overwrite, and
        // between two segments (its first, middle and last).
        let parts = steps.indices.filter { steps[$0].contains(": file part rewritten") }
        let halves = steps.indices.filter { steps[$0].contains(": file half rewritten") }
        XCTAssertGreaterThanOrEqual(parts.count, 3, trace)
        XCTAssertGreaterThanOrEqual(halves.count, 1, trace)
        var points = Set(parts.prefix(parts.count - 1).map { $0 + 1 })
        if let h = halves.first { points.insert(h + 1) }
        for (n, point) in points.sorted().enumerated() {
            guard rekeyKilled(at: point, from: template, env: env) != nil else { continue }
            if n % 2 == 0 {
                // The mount finishes the journal and goes on reading the rest old.
                mount()
                XCTAssertEqual(manifest(mnt), before, "mounted after point \(point) (\(steps[point - 1]))")
                unmount()
            }
            let (again, err) = runEnv(["rekey", cipher, "--dek", "--passfile", passfile], env: env)
            XCTAssertEqual(again, 0, "point \(point) (\(steps[point - 1])): \(err)")
            try checkDone("point \(point) (\(steps[point - 1]))")
        }
    }

    /// A rekey killed after the first segment of a large file, then a unit of a segment
    /// still to rewrite put back with its tag block from an older version of the file:
    /// it passes its old tag, and the rerun seals it, but the new header (made for the
    /// file as the first run read it) no longer matches: the rerun says so, naming the
    /// file, and the file reads as an error, never as the older data.
    func testUnitPutBackBetweenInterruptionAndRerunIsReported() throws {
        let env = ["XTSFS_REKEY_BATCH_BYTES": "1048576"]
        initVolume()
        mount()
        let size = 3 << 20
        try write(mnt + "/large", pattern(size, seed: 31))
        unmount()
        guard let victim = backingFile(size: 6 * Self.groupLength + 4096 * 13) else { return }
        let snapshot = try read(victim)
        let unit = 700, group = unit / 126
        mount()
        let fd = open(mnt + "/large", O_WRONLY)
        XCTAssertEqual(pattern(4096, seed: 32).withUnsafeBytes { pwrite(fd, $0.baseAddress, 4096, off_t(unit * 4096)) }, 4096)
        close(fd)
        unmount()
        let template = scratch + "/template-putback"
        XCTAssertEqual(sh("cp -a '\(cipher)' '\(template)' && echo ok").trimmingCharacters(in: .whitespacesAndNewlines), "ok")
        let (traced, trace) = runEnv(["rekey", cipher, "--dek", "--passfile", passfile], env: env.merging(["XTSFS_REKEY_TRACE": "1"]) { $1 })
        XCTAssertEqual(traced, 0, trace)
        let steps = trace.split(separator: "\n").filter { $0.hasPrefix("rekey step ") }.map(String.init)
        guard let first = steps.firstIndex(where: { $0.contains(": file part rewritten") }) else { return XCTFail(trace) }
        guard rekeyKilled(at: first + 1, from: template, env: env) != nil else { return }
        let h = open(victim, O_RDWR)
        XCTAssertGreaterThanOrEqual(h, 0)
        for at in [Self.dataOffset(unit), group * Self.groupLength] {
            XCTAssertEqual(Array(snapshot[at..<at + 4096]).withUnsafeBytes { pwrite(h, $0.baseAddress, 4096, off_t(at)) }, 4096)
        }
        close(h)
        let (again, err) = runEnv(["rekey", cipher, "--dek", "--passfile", passfile], env: env)
        XCTAssertEqual(again, 0, err)
        XCTAssertTrue(err.contains("its header does not match its tag blocks"), err)
        mount()
        let v = open(mnt + "/large", O_RDONLY)
        if v >= 0 {
            var buf = [UInt8](repeating: 0, count: 4096)
            XCTAssertEqual(pread(v, &buf, 4096, off_t(unit * 4096)), -1, "the unit put back reads")
            XCTAssertEqual(errno, EIO)
            close(v)
        } else {
            XCTAssertEqual(errno, EIO)
        }
        unmount()
    }
}
