import Foundation
import XCTest
import CSysShim
import XTSSystem
#if canImport(Glibc)
import Glibc
#endif

/// A real FUSE mount of a real volume, used through ordinary system calls.
class MountTests: VolumeTestCase {
    override func setUpWithError() throws {
        try super.setUpWithError()
        initVolume()
        mount()
    }

    func testEveryEdgeLengthRoundTripsAndSurvivesRemount() throws {
        let sizes = [0, 1, 15, 16, 17, 4095, 4096, 4097, 4111, 4112, 8191, 8192, 8193, 131072 + 1, 3 * 1024 * 1024 + 7]
        for n in sizes { try write(mnt + "/f\(n)", pattern(n, seed: UInt64(n))) }
        for n in sizes {
            XCTAssertEqual(try read(mnt + "/f\(n)"), pattern(n, seed: UInt64(n)), "size \(n)")
            var st = stat()
            XCTAssertEqual(stat(mnt + "/f\(n)", &st), 0)
            XCTAssertEqual(Int(st.st_size), n)
        }
        unmount()
        // Length-preserving but for the 32-byte header; nothing in clear.
        let backing = backingFiles().filter { !$0.path.hasPrefix("xtsfs.") }
        XCTAssertEqual(backing.map { $0.bytes.count }.sorted(), sizes.map { backingSize($0) }.sorted())
        mount()
        for n in sizes { XCTAssertEqual(try read(mnt + "/f\(n)"), pattern(n, seed: UInt64(n)), "size \(n) after remount") }
    }

    func testBackingHoldsNoPlaintextNamesOrContent() throws {
        let secretName = "quarterly-results-confidential"
        let secretText = Array("The merger with Initech closes on Friday.".utf8)
        try FileManager.default.createDirectory(atPath: mnt + "/" + secretName + "-dir", withIntermediateDirectories: false)
        try write(mnt + "/" + secretName + "-dir/" + secretName + ".txt", secretText + secretText)
        try FileManager.default.createSymbolicLink(atPath: mnt + "/link", withDestinationPath: secretName + "-target")
        unmount()
        for (path, bytes) in backingFiles() {
            XCTAssertFalse(path.contains("quarterly"), "plaintext name in backing path \(path)")
            XCTAssertFalse(bytes.contains(subsequence: Array("Initech".utf8)), "plaintext in \(path)")
        }
        let links = backingFiles().compactMap { try? FileManager.default.destinationOfSymbolicLink(atPath: cipher + "/" + $0.path) }
        XCTAssertEqual(links.count, 1)
        XCTAssertFalse(links[0].contains("quarterly"), "plaintext symlink target \(links[0])")
        mount()
        XCTAssertEqual(try FileManager.default.destinationOfSymbolicLink(atPath: mnt + "/link"), secretName + "-target")
    }

    func testRandomAccessWritesAndTruncates() throws {
        let path = mnt + "/rw"
        let fd = open(path, O_RDWR | O_CREAT, 0o644)
        XCTAssertGreaterThanOrEqual(fd, 0)
        defer { close(fd) }
        var model = [UInt8]()
        func pw(_ bytes: [UInt8], _ off: Int) {
            XCTAssertEqual(bytes.withUnsafeBytes { pwrite(fd, $0.baseAddress, $0.count, off_t(off)) }, bytes.count)
            if model.count < off + bytes.count { model += [UInt8](repeating: 0, count: off + bytes.count - model.count) }
            model.replaceSubrange(off..<off + bytes.count, with: bytes)
        }
        func tr(_ n: Int) {
            XCTAssertEqual(ftruncate(fd, off_t(n)), 0)
            if n < model.count { model.removeLast(model.count - n) } else { model += [UInt8](repeating: 0, count: n - model.count) }
        }
        pw(pattern(10, seed: 1), 0)
        pw(pattern(5000, seed: 2), 4090)
        pw(pattern(3, seed: 3), 100_000) // a hole in between
        tr(4097)
        tr(70_000)
        pw(pattern(1, seed: 4), 4096)
        tr(12)
        pw(pattern(20, seed: 5), 8)
        XCTAssertEqual(try read(path), model)
        // Sparse: a 1 GiB hole costs no disk (integrity volumes: its tags).
        tr(1 << 30)
        var st = stat()
        XCTAssertEqual(fstat(fd, &st), 0)
        XCTAssertEqual(Int(st.st_size), 1 << 30)
        XCTAssertLessThan(Int(st.st_blocks) * 512, (1 << 20) + holeOverhead(1 << 30), "truncate up must leave a hole")
        var buf = [UInt8](repeating: 1, count: 4096)
        XCTAssertEqual(pread(fd, &buf, 4096, off_t(1 << 29)), 4096)
        XCTAssertTrue(buf.allSatisfy { $0 == 0 })
    }

    func testOTruncAndAppend() throws {
        let path = mnt + "/t"
        try write(path, pattern(10000, seed: 1))
        let fd = open(path, O_WRONLY | O_TRUNC)
        XCTAssertGreaterThanOrEqual(fd, 0)
        close(fd)
        XCTAssertEqual(try read(path), [])
        try write(path, Array("abc".utf8))
        let a = open(path, O_WRONLY | O_APPEND)
        let tail = Array("defghijklmnopqrstuvwxyz".utf8)
        XCTAssertEqual(tail.withUnsafeBytes { Glibc.write(a, $0.baseAddress, $0.count) }, tail.count)
        close(a)
        XCTAssertEqual(String(decoding: try read(path), as: UTF8.self), "abcdefghijklmnopqrstuvwxyz")
    }

    func testNamespaceOperations() throws {
        let fm = FileManager.default
        try fm.createDirectory(atPath: mnt + "/a/b/c", withIntermediateDirectories: true)
        try write(mnt + "/a/b/c/file", Array("deep".utf8))
        // Rename a directory with content to another parent: children stay readable.
        try fm.moveItem(atPath: mnt + "/a/b", toPath: mnt + "/b-moved")
        XCTAssertEqual(try read(mnt + "/b-moved/c/file"), Array("deep".utf8))
        // Rename over an existing file replaces it.
        try write(mnt + "/x", Array("x".utf8))
        try write(mnt + "/y", Array("y".utf8))
        XCTAssertEqual(rename(mnt + "/x", mnt + "/y"), 0)
        XCTAssertEqual(try read(mnt + "/y"), Array("x".utf8))
        XCTAssertFalse(fm.fileExists(atPath: mnt + "/x"))
        // Rename a directory over an empty directory; not over a non-empty one.
        try fm.createDirectory(atPath: mnt + "/empty", withIntermediateDirectories: false)
        XCTAssertEqual(rename(mnt + "/b-moved", mnt + "/empty"), 0)
        XCTAssertEqual(try read(mnt + "/empty/c/file"), Array("deep".utf8))
        try fm.createDirectory(atPath: mnt + "/other", withIntermediateDirectories: false)
        XCTAssertEqual(rename(mnt + "/other", mnt + "/empty"), -1)
        XCTAssertEqual(errno, ENOTEMPTY)
        // rmdir: ENOTEMPTY, then works when empty.
        XCTAssertEqual(rmdir(mnt + "/empty/c"), -1)
        XCTAssertEqual(errno, ENOTEMPTY)
        XCTAssertEqual(unlink(mnt + "/empty/c/file"), 0)
        XCTAssertEqual(rmdir(mnt + "/empty/c"), 0)
        // Errors have the right errno.
        XCTAssertEqual(open(mnt + "/missing", O_RDONLY), -1)
        XCTAssertEqual(errno, ENOENT)
        XCTAssertEqual(mkdir(mnt + "/y", 0o755), -1)
        XCTAssertEqual(errno, EEXIST)
        XCTAssertEqual(unlink(mnt + "/missing"), -1)
        XCTAssertEqual(errno, ENOENT)
        let listing = try fm.contentsOfDirectory(atPath: mnt).sorted()
        XCTAssertEqual(listing, ["a", "empty", "other", "y"])
    }

    func testLongAndOddNames() throws {
        let names = [String(repeating: "n", count: 255), String(repeating: "é", count: 127), "with space", "-dash", ".hidden", "xtsfs.dir", "xtsfs.header", "a\u{1}b", String(repeating: "z", count: 161)]
        for (i, n) in names.enumerated() { try write(mnt + "/" + n, pattern(i + 1, seed: UInt64(i))) }
        XCTAssertEqual(try FileManager.default.contentsOfDirectory(atPath: mnt).sorted(), names.sorted())
        for (i, n) in names.enumerated() { XCTAssertEqual(try read(mnt + "/" + n), pattern(i + 1, seed: UInt64(i)), n) }
        // A 256-byte name is too long, as everywhere.
        XCTAssertEqual(open(mnt + "/" + String(repeating: "n", count: 256), O_CREAT | O_WRONLY, 0o644), -1)
        XCTAssertEqual(errno, ENAMETOOLONG)
        // Creating an existing long name fails without harming the existing entry.
        let longDir = mnt + "/" + String(repeating: "d", count: 200)
        XCTAssertEqual(mkdir(longDir, 0o755), 0)
        XCTAssertEqual(mkdir(longDir, 0o755), -1)
        XCTAssertEqual(errno, EEXIST)
        XCTAssertEqual(open(mnt + "/" + names[0], O_CREAT | O_EXCL | O_WRONLY, 0o644), -1)
        XCTAssertEqual(errno, EEXIST)
        XCTAssertEqual(symlink("x", mnt + "/" + names[0]), -1)
        XCTAssertEqual(try FileManager.default.contentsOfDirectory(atPath: mnt).sorted(), (names + [String(repeating: "d", count: 200)]).sorted())
        XCTAssertEqual(rmdir(longDir), 0)
        // Long names survive rename and unlink (their side files too).
        let long = mnt + "/" + String(repeating: "n", count: 255)
        XCTAssertEqual(rename(long, long.replacingOccurrences(of: "nnnn", with: "mmmm")), 0)
        XCTAssertEqual(unlink(long.replacingOccurrences(of: "nnnn", with: "mmmm")), 0)
        unmount()
        let leftovers = backingFiles().filter { $0.path.hasSuffix(".name") }
        XCTAssertEqual(leftovers.count, 2, "side files: one per long name still present (\(leftovers.map(\.path)))")
        mount()
    }

    func testMetadataOperations() throws {
        let path = mnt + "/meta"
        try write(path, pattern(100, seed: 1))
        XCTAssertEqual(chmod(path, 0o600), 0)
        XCTAssertEqual(chown(path, 1234, 5678), 0)
        var times = [timespec(tv_sec: 1_000_000_000, tv_nsec: 5), timespec(tv_sec: 1_500_000_000, tv_nsec: 7)]
        XCTAssertEqual(utimensat(AT_FDCWD, path, &times, 0), 0)
        var st = stat()
        XCTAssertEqual(stat(path, &st), 0)
        XCTAssertEqual(st.st_mode & 0o7777, 0o600)
        XCTAssertEqual(st.st_uid, 1234)
        XCTAssertEqual(st.st_gid, 5678)
        XCTAssertEqual(st.st_mtim.tv_sec, 1_500_000_000)
        XCTAssertEqual(st.st_atim.tv_sec, 1_000_000_000)
        XCTAssertEqual(mkfifo(mnt + "/fifo", 0o644), 0)
        XCTAssertEqual(lstat(mnt + "/fifo", &st), 0)
        XCTAssertEqual(st.st_mode & S_IFMT, S_IFIFO)
        var vfs = statvfs()
        XCTAssertEqual(statvfs(mnt, &vfs), 0)
        XCTAssertEqual(vfs.f_namemax, 255)
        XCTAssertGreaterThan(vfs.f_blocks, 0)
        let fd = open(path, O_RDWR)
        XCTAssertEqual(fsync(fd), 0)
        XCTAssertEqual(fdatasync(fd), 0)
        close(fd)
    }

    func testPermissionsEnforcedForOtherUsers() throws {
        // default_permissions: the kernel checks modes; as root the daemon adds allow_other.
        guard geteuid() == 0 else { throw XCTSkip("needs root to act as another user") }
        XCTAssertEqual(chmod(scratch, 0o755), 0) // mkdtemp made it 0700: let the other user reach the mount
        let path = mnt + "/private"
        try write(path, Array("owner only".utf8))
        XCTAssertEqual(chmod(path, 0o600), 0)
        XCTAssertEqual(chmod(mnt, 0o755), 0)
        let denied = Harness.shell("setpriv --reuid=65534 --regid=65534 --clear-groups cat '\(path)' >/dev/null 2>&1")
        XCTAssertNotEqual(denied, 0, "another user read a 0600 file")
        XCTAssertEqual(chmod(path, 0o644), 0)
        let allowed = Harness.shell("setpriv --reuid=65534 --regid=65534 --clear-groups cat '\(path)' >/dev/null 2>&1")
        XCTAssertEqual(allowed, 0, "another user could not read a 0644 file")
        // Files another user creates are theirs.
        XCTAssertEqual(chmod(mnt, 0o777), 0)
        XCTAssertEqual(Harness.shell("setpriv --reuid=65534 --regid=65534 --clear-groups sh -c 'echo hi > \(mnt)/theirs'"), 0)
        var st = stat()
        XCTAssertEqual(stat(mnt + "/theirs", &st), 0)
        XCTAssertEqual(st.st_uid, 65534)
    }

    func testOffsetsBeyondFourGiB() throws {
        // Sparse, so cheap: data at 5 GiB and 9 GiB + 1 must come back, zeros in between.
        let path = mnt + "/huge"
        let fd = open(path, O_RDWR | O_CREAT, 0o644)
        defer { close(fd) }
        let a = pattern(10000, seed: 11), b = pattern(4097, seed: 12)
        let offA = off_t(5) << 30, offB = (off_t(9) << 30) + 1
        XCTAssertEqual(a.withUnsafeBytes { pwrite(fd, $0.baseAddress, $0.count, offA) }, a.count)
        XCTAssertEqual(b.withUnsafeBytes { pwrite(fd, $0.baseAddress, $0.count, offB) }, b.count)
        var st = stat()
        XCTAssertEqual(fstat(fd, &st), 0)
        XCTAssertEqual(st.st_size, offB + off_t(b.count))
        var buf = [UInt8](repeating: 0, count: 10000)
        XCTAssertEqual(pread(fd, &buf, 10000, offA), 10000)
        XCTAssertEqual(buf, a)
        XCTAssertEqual(pread(fd, &buf, 4097, offB), 4097)
        XCTAssertEqual(Array(buf.prefix(4097)), b)
        XCTAssertEqual(pread(fd, &buf, 100, off_t(7) << 30), 100)
        XCTAssertTrue(buf.prefix(100).allSatisfy { $0 == 0 })
        // Past the maximum size: EFBIG, not a crashed daemon.
        XCTAssertEqual(ftruncate(fd, off_t.max - 10), -1)
        XCTAssertEqual(errno, EFBIG)
        XCTAssertEqual(pread(fd, &buf, 10, offA), 10, "the daemon is still serving")
    }

    func testOpenUnlinkedFileKeepsWorking() throws {
        let path = mnt + "/ghost"
        try write(path, pattern(5000, seed: 1))
        let fd = open(path, O_RDWR)
        XCTAssertGreaterThanOrEqual(fd, 0)
        defer { close(fd) }
        XCTAssertEqual(unlink(path), 0)
        let more = pattern(3000, seed: 2)
        XCTAssertEqual(more.withUnsafeBytes { pwrite(fd, $0.baseAddress, $0.count, 4000) }, 3000)
        XCTAssertEqual(fchmod(fd, 0o600), 0)
        XCTAssertEqual(ftruncate(fd, 6000), 0)
        var st = stat()
        XCTAssertEqual(fstat(fd, &st), 0)
        XCTAssertEqual(st.st_size, 6000)
        XCTAssertEqual(st.st_mode & 0o777, 0o600)
        var buf = [UInt8](repeating: 0, count: 6000)
        XCTAssertEqual(pread(fd, &buf, 6000, 0), 6000)
        XCTAssertEqual(buf, Array(pattern(5000, seed: 1).prefix(4000)) + Array(more.prefix(2000)))
        XCTAssertFalse(FileManager.default.fileExists(atPath: path))
    }

    func testRenameNoReplaceAndLargeDirectory() throws {
        try write(mnt + "/one", [1])
        try write(mnt + "/two", [2])
        XCTAssertThrowsError(try Sys.renameNoReplace(mnt + "/one", mnt + "/two")) { XCTAssertEqual(($0 as? SystemError)?.errno, EEXIST) }
        XCTAssertNoThrow(try Sys.renameNoReplace(mnt + "/one", mnt + "/three"))
        XCTAssertEqual(try read(mnt + "/two"), [2])
        // Enough entries that readdir takes several requests (offsets must resume correctly).
        let dir = mnt + "/many"
        XCTAssertEqual(mkdir(dir, 0o755), 0)
        let names = (0..<1500).map { "entry-\($0)-" + String(repeating: "x", count: $0 % 120) }
        for n in names { XCTAssertEqual(close(open(dir + "/" + n, O_CREAT | O_WRONLY, 0o644)), 0) }
        XCTAssertEqual(try FileManager.default.contentsOfDirectory(atPath: dir).sorted(), names.sorted())
        let ls = Harness.shell("test $(ls -a '\(dir)' | wc -l) -eq 1502")
        XCTAssertEqual(ls, 0, "ls -a shows every entry plus . and ..")
    }

    func testSymlinkEdgeCases() throws {
        let long = String(repeating: "t/", count: 1400) + "end" // 2803 bytes
        XCTAssertEqual(symlink(long, mnt + "/longlink"), 0)
        XCTAssertEqual(try Sys.readlink(mnt + "/longlink"), Array(long.utf8))
        var st = stat()
        XCTAssertEqual(lstat(mnt + "/longlink", &st), 0)
        XCTAssertEqual(Int(st.st_size), long.utf8.count, "lstat size of a symlink is its target's length")
        // As on ext4: targets up to 4095 bytes (past 3039 they live in the link store).
        let longest = String(repeating: "y/", count: 2047) + "z"
        XCTAssertEqual(symlink(longest, mnt + "/longest"), 0)
        XCTAssertEqual(try Sys.readlink(mnt + "/longest"), Array(longest.utf8))
        var lt = [timespec(tv_sec: 1_000_000, tv_nsec: 5), timespec(tv_sec: 2_000_000, tv_nsec: 7)]
        XCTAssertEqual(utimensat(AT_FDCWD, mnt + "/longest", &lt, AT_SYMLINK_NOFOLLOW), 0, "timestamps on a symlink")
        XCTAssertEqual(lstat(mnt + "/longest", &st), 0)
        XCTAssertEqual(st.st_mtim.tv_sec, 2_000_000)
        XCTAssertEqual(Int(st.st_size), 4095)
        XCTAssertEqual(symlink(String(repeating: "y", count: 4096), mnt + "/toolong"), -1)
        XCTAssertEqual(errno, ENAMETOOLONG)
        try write(mnt + "/target", Array("via link".utf8))
        XCTAssertEqual(symlink("target", mnt + "/rel"), 0)
        XCTAssertEqual(try read(mnt + "/rel"), Array("via link".utf8))
        XCTAssertEqual(rename(mnt + "/rel", mnt + "/rel2"), 0)
        XCTAssertEqual(try FileManager.default.destinationOfSymbolicLink(atPath: mnt + "/rel2"), "target")
    }

    func testNoXattrMountRefusesAttributes() throws {
        XCTAssertEqual(CSysShim.setxattr(mnt, "user.test", "v", 1, 0), 0, "attributes by default")
        unmount()
        mount(["-o", "noxattr"])
        errno = 0
        XCTAssertEqual(CSysShim.setxattr(mnt, "user.test", "v", 1, 0), -1)
        XCTAssertEqual(errno, EOPNOTSUPP)
        var buf = [CChar](repeating: 0, count: 16)
        XCTAssertEqual(CSysShim.getxattr(mnt, "user.test", &buf, buf.count), -1)
        XCTAssertEqual(errno, EOPNOTSUPP)
    }

    func testReadaheadRaisedForTheMount() throws {
        guard geteuid() == 0, let entry = MountEntry.fuse(at: mnt) else { throw XCTSkip("needs root and the mount table") }
        let path = "/sys/class/bdi/\(entry.device)/read_ahead_kb"
        var value = ""
        for _ in 0..<100 {
            value = (try? String(contentsOfFile: path, encoding: .utf8))?.trimmingCharacters(in: .whitespacesAndNewlines) ?? ""
            if value == "1024" { break }
            usleep(20_000)
        }
        XCTAssertEqual(value, "1024", "the daemon sets 1 MiB read-ahead after FUSE INIT")
    }

    func testSetgidDirectoryPassesGroupDown() throws {
        let d = mnt + "/shared"
        XCTAssertEqual(mkdir(d, 0o775), 0)
        XCTAssertEqual(chown(d, 0, 4242), 0)
        XCTAssertEqual(chmod(d, 0o2775), 0)
        try write(d + "/file", [1, 2, 3])
        XCTAssertEqual(mkdir(d + "/sub", 0o755), 0)
        var st = stat()
        XCTAssertEqual(stat(d + "/file", &st), 0)
        XCTAssertEqual(st.st_gid, 4242, "a file in a setgid directory takes the directory's group")
        XCTAssertEqual(stat(d + "/sub", &st), 0)
        XCTAssertEqual(st.st_gid, 4242)
        XCTAssertNotEqual(st.st_mode & S_ISGID, 0, "a subdirectory keeps the setgid bit")
    }

    func testConcurrentPartialWritersNeverLoseUpdates() throws {
        // Eight threads each own a 100-byte slice of every 4 KiB block of one file and write it
        // through their own descriptor, so every write is a read-modify-write of a shared block.
        let path = mnt + "/shared"
        let blocks = 16, writers = 8, rounds = 40
        try write(path, [UInt8](repeating: 0, count: blocks * 4096))
        DispatchQueue.concurrentPerform(iterations: writers) { w in
            let fd = open(path, O_WRONLY)
            defer { close(fd) }
            for r in 0..<rounds {
                let value = [UInt8](repeating: UInt8(w * 16 + r % 16), count: 100)
                for b in 0..<blocks {
                    _ = value.withUnsafeBytes { pwrite(fd, $0.baseAddress, 100, off_t(b * 4096 + w * 100 + 7)) }
                }
            }
        }
        let data = try read(path)
        for b in 0..<blocks {
            for w in 0..<writers {
                let slice = data[(b * 4096 + w * 100 + 7)..<(b * 4096 + w * 100 + 107)]
                XCTAssertTrue(slice.allSatisfy { $0 == UInt8(w * 16 + (rounds - 1) % 16) }, "block \(b) writer \(w): lost update")
            }
        }
    }

    func testReadOnlyMount() throws {
        try write(mnt + "/keep", Array("kept".utf8))
        unmount()
        let headerBefore = try read(cipher + "/xtsfs.header")
        mount(["-o", "ro"])
        XCTAssertEqual(try read(mnt + "/keep"), Array("kept".utf8))
        XCTAssertEqual(open(mnt + "/new", O_CREAT | O_WRONLY, 0o644), -1)
        XCTAssertEqual(errno, EROFS)
        XCTAssertEqual(try read(cipher + "/xtsfs.header"), headerBefore, "a read-only mount must not write the header")
    }

    func testDamagedCiphertextFileGivesEIONotGarbage() throws {
        try write(mnt + "/victim", pattern(5000, seed: 3))
        unmount()
        let victim = backingFiles().first { $0.bytes.count == backingSize(5000) }!
        var b = victim.bytes
        b[5] ^= 0x80 // inside the per-file header
        try write(cipher + "/" + victim.path, b)
        mount()
        let fd = open(mnt + "/victim", O_RDONLY)
        if fd >= 0 { close(fd) }
        XCTAssertEqual(fd, -1, "a damaged file header must not open")
        XCTAssertEqual(errno, EIO)
    }

    func testTruncatedBackingFileAndForeignEntries() throws {
        try write(mnt + "/short", pattern(100, seed: 1))
        try write(mnt + "/fine", pattern(9000, seed: 2)) // a backing size of its own in either mode
        unmount()
        let short = backingFiles().first { $0.bytes.count == backingSize(100) }!
        XCTAssertEqual(truncate(cipher + "/" + short.path, 20), 0) // shorter than its header
        // Things that are not xtsfs entries: a stray file, a name that is not base64.
        try write(cipher + "/not-an-encrypted-name.txt", Array("junk".utf8))
        try write(cipher + "/AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA", Array("junk".utf8))
        mount()
        let listing = try FileManager.default.contentsOfDirectory(atPath: mnt).sorted()
        XCTAssertTrue(listing.contains("fine"), "\(listing)")
        XCTAssertFalse(listing.contains { $0.contains("junk") || $0.contains("not-an-encrypted") }, "\(listing)")
        XCTAssertEqual(try read(mnt + "/fine"), pattern(9000, seed: 2))
        let names = listing.filter { $0 != "fine" }
        XCTAssertEqual(names, ["short"], "only the damaged file besides the good one")
        let fd = open(mnt + "/short", O_RDONLY)
        if fd >= 0 { close(fd) }
        XCTAssertEqual(fd, -1, "a header cut short is damage, not an empty file")
        XCTAssertEqual(errno, EIO)
        // Overwriting it works (emptying needs no key).
        try write(mnt + "/short", pattern(50, seed: 3))
        XCTAssertEqual(try read(mnt + "/short"), pattern(50, seed: 3))
    }

    /// Without the writeback cache (the default) every write(2) is a request: ENOSPC
    /// comes at the write.
    func testFullDiskGivesENOSPCAndKeepsData() throws {
        try fullDisk(options: [], atWrite: true)
    }

    /// With the writeback cache (-o writecache) ENOSPC comes at fsync or close.
    func testFullDiskWithWritebackCacheFailsFsyncOrClose() throws {
        try fullDisk(options: ["-o", "writecache"])
    }

    func fullDisk(options: [String], atWrite: Bool = false) throws {
        guard geteuid() == 0 else { throw XCTSkip("needs root to mount a small tmpfs") }
        unmount()
        // A fresh volume on a 2 MiB tmpfs.
        let small = scratch + "/small"
        try FileManager.default.createDirectory(atPath: small, withIntermediateDirectories: false)
        XCTAssertEqual(Harness.shell("mount -t tmpfs -o size=2m tmpfs '\(small)'"), 0)
        defer {
            Harness.forceUnmount(mnt)
            _ = Harness.shell("umount '\(small)'")
        }
        cipher = small + "/cipher"
        initVolume()
        mount(options)
        let kept = pattern(300_000, seed: 7)
        try write(mnt + "/kept", kept)
        let fd = open(mnt + "/filler", O_WRONLY | O_CREAT, 0o644)
        XCTAssertGreaterThanOrEqual(fd, 0)
        let chunk = pattern(64 * 1024, seed: 8)
        var lastErrno: Int32 = 0
        for i in 0..<100 {
            if chunk.withUnsafeBytes({ pwrite(fd, $0.baseAddress, $0.count, off_t(i * chunk.count)) }) < 0 { lastErrno = errno; break }
        }
        if atWrite { XCTAssertEqual(lastErrno, ENOSPC, "without the writeback cache the write itself fails") }
        // With the writeback cache (the default) the error comes with fsync (or close), as
        // on NFS: the writes went to the page cache first.
        if lastErrno == 0, fsync(fd) != 0 { lastErrno = errno }
        if close(fd) != 0, lastErrno == 0 { lastErrno = errno }
        XCTAssertEqual(lastErrno, ENOSPC, "writing past a full disk must fail with ENOSPC (at write, fsync or close)")
        XCTAssertEqual(try read(mnt + "/kept"), kept, "data written before the disk filled is intact")
        XCTAssertEqual(unlink(mnt + "/filler"), 0)
        try write(mnt + "/after", pattern(1000, seed: 9))
        XCTAssertEqual(try read(mnt + "/after"), pattern(1000, seed: 9))
        unmount()
        mount()
        XCTAssertEqual(try read(mnt + "/kept"), kept)
    }

    func testUnmountWithSignal() throws {
        let pids = Harness.daemons(mnt)
        XCTAssertEqual(pids.count, 1)
        kill(pids[0], SIGTERM)
        let deadline = Date().addingTimeInterval(10)
        while Harness.isMounted(mnt) && Date() < deadline { usleep(20_000) }
        XCTAssertFalse(Harness.isMounted(mnt), "SIGTERM should unmount")
    }
}
