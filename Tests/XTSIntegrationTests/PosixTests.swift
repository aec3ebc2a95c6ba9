import Foundation
import XCTest
#if canImport(Glibc)
import Glibc
#endif

/// What programs expect of a directory, checked on the mount and, where it makes sense,
/// against the same operations on a plain directory beside it in the scratch directory
/// (under /tmp, which on the development machine is ext4: its xattr space, fallocate
/// modes and errnos are the reference here).
final class PosixTests: VolumeTestCase {
    var plain = ""

    override func setUpWithError() throws {
        try super.setUpWithError()
        plain = scratch + "/plain"
        XCTAssertEqual(mkdir(plain, 0o755), 0)
        initVolume()
        mount()
    }

    func st(_ path: String, follow: Bool = true, file: StaticString = #filePath, line: UInt = #line) -> stat {
        var s = stat()
        let r = follow ? stat(path, &s) : lstat(path, &s)
        XCTAssertEqual(r, 0, "stat \(path): errno \(errno)", file: file, line: line)
        return s
    }

    func pwriteAll(_ fd: Int32, _ bytes: [UInt8], _ offset: Int, file: StaticString = #filePath, line: UInt = #line) {
        XCTAssertEqual(bytes.withUnsafeBytes { pwrite(fd, $0.baseAddress, $0.count, off_t(offset)) }, bytes.count, "pwrite errno \(errno)", file: file, line: line)
    }

    func preadAll(_ fd: Int32, _ count: Int, _ offset: Int) -> [UInt8] {
        var buf = [UInt8](repeating: 0, count: count)
        let n = pread(fd, &buf, count, off_t(offset))
        return n < 0 ? [] : Array(buf.prefix(n))
    }

    /// 0 or the errno of a call returning -1.
    func outcome(_ r: Int32) -> Int32 { r == 0 ? 0 : errno }
    func outcome(_ r: Int) -> Int32 { r >= 0 ? 0 : errno }

    // MARK: - hard links

    func testHardLinkCountsAndInodes() throws {
        for root in [plain, mnt] {
            try write(root + "/a", Array("one file, many names".utf8))
            XCTAssertEqual(mkdir(root + "/d", 0o755), 0)
            XCTAssertEqual(st(root + "/a").st_nlink, 1, root)
            XCTAssertEqual(link(root + "/a", root + "/b"), 0, "\(root): link in the same directory: errno \(errno)")
            XCTAssertEqual(st(root + "/a").st_nlink, 2, root)
            XCTAssertEqual(st(root + "/b").st_nlink, 2, root)
            XCTAssertEqual(st(root + "/a").st_ino, st(root + "/b").st_ino, "\(root): both names are one inode")
            XCTAssertEqual(link(root + "/b", root + "/d/c"), 0, "\(root): link across directories: errno \(errno)")
            XCTAssertEqual(st(root + "/a").st_nlink, 3, root)
            XCTAssertEqual(st(root + "/d/c").st_nlink, 3, root)
            XCTAssertEqual(st(root + "/d/c").st_ino, st(root + "/a").st_ino, root)
            let long = root + "/d/" + String(repeating: "L", count: 200)
            XCTAssertEqual(link(root + "/a", long), 0, "\(root): link to a long name: errno \(errno)")
            XCTAssertEqual(st(long).st_nlink, 4, root)
            XCTAssertEqual(unlink(long), 0)
            XCTAssertEqual(unlink(root + "/b"), 0)
            XCTAssertEqual(st(root + "/a").st_nlink, 2, root)
            XCTAssertEqual(unlink(root + "/a"), 0)
            XCTAssertEqual(st(root + "/d/c").st_nlink, 1, root)
            XCTAssertEqual(try read(root + "/d/c"), Array("one file, many names".utf8), root)
            XCTAssertEqual(try FileManager.default.contentsOfDirectory(atPath: root + "/d"), ["c"], root)
        }
    }

    func testHardLinkSharesContentWhileBothAreOpen() throws {
        for root in [plain, mnt] {
            try write(root + "/a", pattern(10000, seed: 1))
            XCTAssertEqual(link(root + "/a", root + "/b"), 0, "\(root): errno \(errno)")
            let fa = open(root + "/a", O_RDWR), fb = open(root + "/b", O_RDWR)
            XCTAssertGreaterThanOrEqual(fa, 0)
            XCTAssertGreaterThanOrEqual(fb, 0)
            defer { close(fa); close(fb) }
            // Read through b first so that its pages are cached, then change them through a.
            XCTAssertEqual(preadAll(fb, 10000, 0), pattern(10000, seed: 1), root)
            pwriteAll(fa, Array("written through a".utf8), 100)
            XCTAssertEqual(preadAll(fb, 17, 100), Array("written through a".utf8), "\(root): b sees a's write while both are open")
            pwriteAll(fb, pattern(5000, seed: 2), 9000) // grows the file through b
            var s = stat()
            XCTAssertEqual(fstat(fa, &s), 0)
            XCTAssertEqual(s.st_size, 14000, "\(root): a sees the size b grew to")
            XCTAssertEqual(preadAll(fa, 5000, 9000), pattern(5000, seed: 2), root)
            XCTAssertEqual(ftruncate(fa, 50), 0)
            XCTAssertEqual(st(root + "/b").st_size, 50, root)
            XCTAssertEqual(try read(root + "/b"), Array((Array(pattern(10000, seed: 1).prefix(100)) + Array("written through a".utf8)).prefix(50)), root)
            // Metadata is the inode's too.
            XCTAssertEqual(chmod(root + "/a", 0o640), 0)
            XCTAssertEqual(st(root + "/b").st_mode & 0o7777, 0o640, root)
        }
    }

    func testHardLinkUnlinkAndRenameKeepTheOtherName() throws {
        for root in [plain, mnt] {
            let content = pattern(7000, seed: 3)
            try write(root + "/a", content)
            XCTAssertEqual(mkdir(root + "/d", 0o755), 0)
            XCTAssertEqual(link(root + "/a", root + "/b"), 0, "\(root): errno \(errno)")
            XCTAssertEqual(unlink(root + "/a"), 0)
            XCTAssertEqual(try read(root + "/b"), content, "\(root): unlink of one name keeps the other")
            XCTAssertEqual(link(root + "/b", root + "/c"), 0)
            XCTAssertEqual(unlink(root + "/c"), 0, "unlink of the newer name")
            XCTAssertEqual(try read(root + "/b"), content, root)
            XCTAssertEqual(link(root + "/b", root + "/c"), 0)
            XCTAssertEqual(rename(root + "/c", root + "/d/e"), 0, "\(root): rename of a linked name")
            XCTAssertEqual(try read(root + "/b"), content, "\(root): rename of one name keeps the other")
            XCTAssertEqual(try read(root + "/d/e"), content, root)
            XCTAssertEqual(st(root + "/b").st_ino, st(root + "/d/e").st_ino, root)
            XCTAssertEqual(st(root + "/b").st_nlink, 2, root)
            // Renaming one name over the other is a no-op (same inode): both stay.
            XCTAssertEqual(rename(root + "/b", root + "/d/e"), 0)
            XCTAssertEqual(try read(root + "/d/e"), content, root)
            XCTAssertEqual(access(root + "/b", F_OK), 0, "\(root): rename between two links of one inode does nothing")
            // Renaming something else over a linked name drops one link.
            try write(root + "/other", [9])
            XCTAssertEqual(rename(root + "/other", root + "/b"), 0)
            XCTAssertEqual(st(root + "/d/e").st_nlink, 1, root)
            XCTAssertEqual(try read(root + "/d/e"), content, root)
        }
    }

    func testOpenHandleOutlivesAllNames() throws {
        for root in [plain, mnt] {
            try write(root + "/a", pattern(3000, seed: 4))
            XCTAssertEqual(link(root + "/a", root + "/b"), 0, "\(root): errno \(errno)")
            let fd = open(root + "/a", O_RDWR)
            XCTAssertGreaterThanOrEqual(fd, 0)
            defer { close(fd) }
            XCTAssertEqual(unlink(root + "/a"), 0)
            XCTAssertEqual(unlink(root + "/b"), 0)
            pwriteAll(fd, pattern(2000, seed: 5), 2500)
            XCTAssertEqual(preadAll(fd, 4500, 0), Array(pattern(3000, seed: 4).prefix(2500)) + pattern(2000, seed: 5), root)
            var s = stat()
            XCTAssertEqual(fstat(fd, &s), 0)
            XCTAssertEqual(s.st_size, 4500, root)
            XCTAssertEqual(s.st_nlink, 0, "\(root): no names left")
            XCTAssertEqual(try FileManager.default.contentsOfDirectory(atPath: root), [], root)
        }
    }

    /// One inode, two names; the name the kernel first looked the inode up by goes away
    /// (unlinked, or renamed into another directory), and then every path operation goes
    /// through the other name: the node must still find its backing inode.
    func testEveryOperationThroughTheSurvivingNameOfAHardLink() throws {
        for how in ["unlink", "rename away", "rename over"] {
            var results = [[String]]()
            for root in [plain, mnt] {
                let base = root + "/" + how.replacingOccurrences(of: " ", with: "-")
                XCTAssertEqual(mkdir(base, 0o755), 0)
                XCTAssertEqual(mkdir(base + "/d1", 0o755), 0)
                XCTAssertEqual(mkdir(base + "/d2", 0o755), 0)
                let first = base + "/d1/first", second = base + "/d2/" + String(repeating: "s", count: 180)
                try write(first, pattern(5000, seed: 70))
                var s0 = stat()
                XCTAssertEqual(stat(first, &s0), 0) // the kernel now knows the inode by this name
                XCTAssertEqual(link(first, second), 0, "\(root): errno \(errno)")
                switch how {
                case "unlink": XCTAssertEqual(unlink(first), 0)
                case "rename away": XCTAssertEqual(rename(first, base + "/elsewhere"), 0); XCTAssertEqual(unlink(base + "/elsewhere"), 0)
                default: try write(base + "/other", [9]); XCTAssertEqual(rename(base + "/other", first), 0)
                }
                var r = [String]()
                func note(_ what: String, _ ok: Bool) { r.append("\(what): \(ok ? "ok" : "errno \(errno)")") }
                note("chmod", chmod(second, 0o640) == 0)
                note("chown", chown(second, 1234, 5678) == 0)
                note("truncate", truncate(second, 3000) == 0)
                var times = [timespec(tv_sec: 1_300_000_000, tv_nsec: 0), timespec(tv_sec: 1_300_000_000, tv_nsec: 0)]
                note("utimensat", utimensat(AT_FDCWD, second, &times, 0) == 0)
                note("setxattr", Xattr.set(second, "user.k", [1, 2]) == 0)
                note("getxattr", (try? Xattr.get(second, "user.k").get()) == [1, 2])
                note("listxattr", (try? Xattr.list(second).get()) == ["user.k"])
                note("removexattr", removexattr(second, "user.k") == 0)
                var s = stat()
                note("stat", stat(second, &s) == 0 && s.st_size == 3000 && s.st_mode & 0o7777 == 0o640 && s.st_uid == 1234 && s.st_mtim.tv_sec == 1_300_000_000)
                note("nlink", s.st_nlink == 1)
                note("read", (try? read(second)) == Array(pattern(5000, seed: 70).prefix(3000)))
                let fd = open(second, O_WRONLY | O_APPEND)
                note("append", fd >= 0 && Glibc.write(fd, "z", 1) == 1)
                if fd >= 0 { close(fd) }
                note("link again", link(second, base + "/d1/third") == 0)
                note("rename", rename(second, base + "/d1/renamed") == 0)
                note("read after rename", (try? read(base + "/d1/third")) == Array(pattern(5000, seed: 70).prefix(3000)) + [UInt8(ascii: "z")])
                note("unlink", unlink(base + "/d1/renamed") == 0 && unlink(base + "/d1/third") == 0)
                results.append(r)
            }
            XCTAssertEqual(results[1], results[0], "\(how): mount vs plain directory")
        }
    }

    func testHardLinkErrors() throws {
        for root in [plain, mnt] {
            try write(root + "/a", [1])
            try write(root + "/b", [2])
            XCTAssertEqual(mkdir(root + "/d", 0o755), 0)
            XCTAssertEqual(link(root + "/d", root + "/dlink"), -1)
            XCTAssertEqual(errno, EPERM, "\(root): link of a directory")
            XCTAssertEqual(link(root + "/a", root + "/b"), -1)
            XCTAssertEqual(errno, EEXIST, "\(root): link over an existing name")
            XCTAssertEqual(link(root + "/a", root + "/d"), -1)
            XCTAssertEqual(errno, EEXIST, "\(root): link over an existing directory")
            XCTAssertEqual(link(root + "/missing", root + "/c"), -1)
            XCTAssertEqual(errno, ENOENT, root)
            XCTAssertEqual(link(root + "/a", root + "/nodir/c"), -1)
            XCTAssertEqual(errno, ENOENT, root)
            XCTAssertEqual(try read(root + "/b"), [2], root)
        }
        // And across filesystems: EXDEV.
        XCTAssertEqual(link(plain + "/a", mnt + "/x"), -1)
        XCTAssertEqual(errno, EXDEV)
    }

    func testHardLinksSurviveRemount() throws {
        try write(mnt + "/a", pattern(5000, seed: 6))
        XCTAssertEqual(mkdir(mnt + "/d", 0o755), 0)
        XCTAssertEqual(link(mnt + "/a", mnt + "/d/b"), 0, "errno \(errno)")
        XCTAssertEqual(link(mnt + "/a", mnt + "/" + String(repeating: "n", count: 220)), 0, "errno \(errno)")
        unmount()
        mount()
        XCTAssertEqual(st(mnt + "/a").st_nlink, 3)
        XCTAssertEqual(st(mnt + "/d/b").st_nlink, 3)
        XCTAssertEqual(st(mnt + "/a").st_ino, st(mnt + "/d/b").st_ino)
        XCTAssertEqual(st(mnt + "/a").st_ino, st(mnt + "/" + String(repeating: "n", count: 220)).st_ino)
        XCTAssertEqual(try read(mnt + "/d/b"), pattern(5000, seed: 6))
        // Still one inode after the remount: a write through one name shows through the other.
        let fd = open(mnt + "/d/b", O_WRONLY)
        pwriteAll(fd, [0xAB], 0)
        close(fd)
        XCTAssertEqual(try read(mnt + "/a").first, 0xAB)
        XCTAssertEqual(try read(mnt + "/" + String(repeating: "n", count: 220)).first, 0xAB)
    }

    // MARK: - extended attributes

    func testXattrRoundTrip() throws {
        // 160 bytes after "user." is the longest name the mount takes (docs/CONFORMANCE.md).
        let values: [(String, [UInt8])] = [("user.empty", []), ("user.one", [0x5A]), ("user.mid", pattern(300, seed: 7)),
                                           ("user." + String(repeating: "k", count: 160), Array("long name".utf8))]
        for root in [plain, mnt] {
            let f = root + "/f"
            try write(f, [1, 2, 3])
            for (name, value) in values { XCTAssertEqual(Xattr.set(f, name, value), 0, "\(root): setxattr \(name.prefix(20)): errno \(errno)") }
            for (name, value) in values { XCTAssertEqual(Xattr.get(f, name), .success(value), "\(root): getxattr \(name.prefix(20))") }
            XCTAssertEqual(Xattr.list(f).map { $0.sorted() }, .success(values.map(\.0).sorted()), "\(root): listxattr")
            // Size queries.
            XCTAssertEqual(getxattr(f, "user.mid", nil, 0), 300, "\(root): size query")
            let listSize = values.map { $0.0.utf8.count + 1 }.reduce(0, +)
            XCTAssertEqual(listxattr(f, nil, 0), listSize, "\(root): listxattr size query")
            // Too small a buffer.
            var small = [UInt8](repeating: 0, count: 10)
            XCTAssertEqual(getxattr(f, "user.mid", &small, small.count), -1)
            XCTAssertEqual(errno, ERANGE, "\(root): getxattr into a small buffer")
            var smallList = [CChar](repeating: 0, count: 5)
            XCTAssertEqual(listxattr(f, &smallList, smallList.count), -1)
            XCTAssertEqual(errno, ERANGE, "\(root): listxattr into a small buffer")
            // Missing, create-only, replace-only.
            XCTAssertEqual(Xattr.get(f, "user.missing"), .failure(Errno(ENODATA)), root)
            XCTAssertEqual(Xattr.set(f, "user.one", [1], flags: XATTR_CREATE), -1)
            XCTAssertEqual(errno, EEXIST, root)
            XCTAssertEqual(Xattr.set(f, "user.missing", [1], flags: XATTR_REPLACE), -1)
            XCTAssertEqual(errno, ENODATA, root)
            XCTAssertEqual(Xattr.set(f, "user.one", [7, 7], flags: XATTR_REPLACE), 0)
            XCTAssertEqual(Xattr.get(f, "user.one"), .success([7, 7]), root)
            // Remove.
            XCTAssertEqual(removexattr(f, "user.mid"), 0, "\(root): removexattr errno \(errno)")
            XCTAssertEqual(Xattr.get(f, "user.mid"), .failure(Errno(ENODATA)), root)
            XCTAssertEqual(removexattr(f, "user.mid"), -1)
            XCTAssertEqual(errno, ENODATA, root)
            XCTAssertEqual(Xattr.list(f).map { Set($0) }, .success(Set(values.map(\.0)).subtracting(["user.mid"])), root)
            // Content untouched by all of it.
            XCTAssertEqual(try read(f), [1, 2, 3], root)
        }
    }

    /// ext4 (what /tmp is here) holds about 4 KiB of xattrs per inode: a plain file takes
    /// a 4000-byte value, the mount (37 bytes of overhead and an encrypted name) about 3,950
    /// (docs/CONFORMANCE.md). So on ext4: 3,900 bytes must work, and 4,000 bytes either work
    /// or fail cleanly with ENOSPC, leaving no half-written attribute behind.
    func testXattrLargeValueOnExt4() throws {
        let fits = pattern(3900, seed: 8), big = pattern(4000, seed: 9)
        try write(plain + "/f", [1])
        XCTAssertEqual(Xattr.set(plain + "/f", "user.big", big), 0, "the plain directory takes a 4000-byte value: errno \(errno)")
        let f = mnt + "/f"
        try write(f, [1])
        XCTAssertEqual(Xattr.set(f, "user.fits", fits), 0, "a 3900-byte value: errno \(errno) \(errnoName(errno))")
        XCTAssertEqual(Xattr.get(f, "user.fits"), .success(fits))
        XCTAssertEqual(removexattr(f, "user.fits"), 0)
        if Xattr.set(f, "user.big", big) == 0 {
            XCTAssertEqual(Xattr.get(f, "user.big"), .success(big))
        } else {
            XCTAssertEqual(errno, ENOSPC, "a value too big for the backing inode: \(errnoName(errno))")
            XCTAssertEqual(Xattr.get(f, "user.big"), .failure(Errno(ENODATA)), "nothing half-written")
            XCTAssertEqual(Xattr.list(f), .success([]))
        }
        unmount()
        mount()
        XCTAssertEqual(Xattr.list(f).map { $0.filter { $0 != "user.big" } }, .success([]))
    }

    /// On a backing filesystem with room (tmpfs), a 4000-byte value and a 60,000-byte one
    /// round-trip; past 65,499 bytes the mount says E2BIG; a name of 161 bytes after
    /// "user." is ERANGE (the encrypted name would pass the kernel's 255-byte limit).
    func testXattrLargeValuesAndLongNames() throws {
        guard geteuid() == 0 else { throw XCTSkip("needs root to mount a tmpfs") }
        unmount()
        let t = scratch + "/tmpfs"
        XCTAssertEqual(mkdir(t, 0o755), 0)
        XCTAssertEqual(Harness.shell("mount -t tmpfs -o size=64m tmpfs '\(t)'"), 0)
        defer {
            Harness.forceUnmount(mnt)
            _ = Harness.shell("umount '\(t)'")
        }
        try write(t + "/probe", [1])
        guard Xattr.set(t + "/probe", "user.probe", pattern(60000, seed: 1)) == 0 else {
            throw XCTSkip("this tmpfs does not take a 60,000-byte user xattr (errno \(errno))")
        }
        cipher = t + "/cipher"
        initVolume()
        mount()
        let f = mnt + "/f"
        try write(f, [1])
        for n in [4000, 60000, 65499] {
            let v = pattern(n, seed: UInt64(n))
            XCTAssertEqual(Xattr.set(f, "user.v\(n)", v), 0, "a \(n)-byte value: errno \(errno) \(errnoName(errno))")
            XCTAssertEqual(Xattr.get(f, "user.v\(n)"), .success(v), "\(n) bytes")
            _ = removexattr(f, "user.v\(n)")
        }
        XCTAssertEqual(Xattr.set(f, "user.toobig", pattern(65500, seed: 2)), -1)
        XCTAssertEqual(errno, E2BIG)
        XCTAssertEqual(Xattr.set(f, "user." + String(repeating: "n", count: 161), [1]), -1)
        XCTAssertEqual(errno, ERANGE)
        XCTAssertEqual(Xattr.set(f, "user." + String(repeating: "n", count: 160), [1]), 0, "errno \(errno)")
        unmount()
        mount()
        XCTAssertEqual(Xattr.list(f), .success(["user." + String(repeating: "n", count: 160)]))
    }

    func testXattrBackingHoldsNoPlaintext() throws {
        let secretName = "user.quarterly-results-confidential"
        let secretValue = Array("The merger with Initech closes on Friday.".utf8)
        try write(mnt + "/f", [1])
        XCTAssertEqual(mkdir(mnt + "/d", 0o755), 0)
        XCTAssertEqual(Xattr.set(mnt + "/f", secretName, secretValue), 0, "errno \(errno)")
        XCTAssertEqual(Xattr.set(mnt + "/d", secretName, secretValue), 0, "errno \(errno)")
        unmount()
        var found = 0
        for (rel, _) in backingFiles() {
            guard case .success(let names) = Xattr.list(cipher + "/" + rel, follow: false) else { continue }
            for n in names {
                found += 1
                XCTAssertFalse(n.contains("quarterly"), "plaintext xattr name on backing \(rel): \(n)")
                if case .success(let v) = Xattr.get(cipher + "/" + rel, n, follow: false) {
                    XCTAssertFalse(v.contains(subsequence: Array("Initech".utf8)), "plaintext xattr value on backing \(rel)")
                    XCTAssertFalse(v.contains(subsequence: Array("quarterly".utf8)), "plaintext xattr name in a value on backing \(rel)")
                }
            }
        }
        XCTAssertGreaterThanOrEqual(found, 2, "the xattrs are stored as backing xattrs of the file and the directory")
        mount()
        XCTAssertEqual(Xattr.get(mnt + "/f", secretName), .success(secretValue))
        XCTAssertEqual(Xattr.get(mnt + "/d", secretName), .success(secretValue))
    }

    func testXattrsSurviveRemountAndRename() throws {
        try write(mnt + "/f", [1])
        XCTAssertEqual(mkdir(mnt + "/d", 0o755), 0)
        XCTAssertEqual(Xattr.set(mnt + "/f", "user.a", Array("file value".utf8)), 0, "errno \(errno)")
        XCTAssertEqual(Xattr.set(mnt + "/d", "user.b", Array("dir value".utf8)), 0, "errno \(errno)")
        XCTAssertEqual(rename(mnt + "/f", mnt + "/d/g"), 0)
        XCTAssertEqual(Xattr.get(mnt + "/d/g", "user.a"), .success(Array("file value".utf8)), "xattrs move with the file")
        unmount()
        mount()
        XCTAssertEqual(Xattr.get(mnt + "/d/g", "user.a"), .success(Array("file value".utf8)))
        XCTAssertEqual(Xattr.get(mnt + "/d", "user.b"), .success(Array("dir value".utf8)))
        XCTAssertEqual(Xattr.list(mnt + "/d"), .success(["user.b"]))
        // A copy of a file's value is not valid on another file (values are bound to their file).
        XCTAssertEqual(Xattr.get(mnt + "/d", "user.a"), .failure(Errno(ENODATA)))
    }

    func testXattrsOnDirectoriesAndSymlinks() throws {
        for root in [plain, mnt] {
            XCTAssertEqual(mkdir(root + "/d", 0o755), 0)
            XCTAssertEqual(Xattr.set(root + "/d", "user.dir", Array("v".utf8)), 0, "\(root): errno \(errno)")
            XCTAssertEqual(Xattr.get(root + "/d", "user.dir"), .success(Array("v".utf8)), root)
            XCTAssertEqual(Xattr.list(root + "/d"), .success(["user.dir"]), root)
            try write(root + "/d/inner", [1])
            XCTAssertEqual(Xattr.list(root + "/d/inner"), .success([]), "\(root): a new file has no xattrs")
            // user.* on a symlink itself is refused by Linux (EPERM), whatever the filesystem.
            XCTAssertEqual(symlink("d", root + "/l"), 0)
            XCTAssertEqual(lsetxattr(root + "/l", "user.x", "v", 1, 0), -1)
            XCTAssertEqual(errno, EPERM, root)
            // Through the symlink, the directory's.
            XCTAssertEqual(Xattr.get(root + "/l", "user.dir"), .success(Array("v".utf8)), root)
            XCTAssertEqual(rmdir(root + "/d"), -1)
            XCTAssertEqual(unlink(root + "/d/inner"), 0)
            XCTAssertEqual(rmdir(root + "/d"), 0, "\(root): a directory with xattrs can be removed")
        }
    }

    func testSecurityAndSystemNamespaces() throws {
        let f = mnt + "/f"
        try write(f, [1])
        // Not supported, as on a filesystem without labels or ACLs (ls -l then stops asking).
        XCTAssertEqual(Xattr.get(f, "security.selinux"), .failure(Errno(EOPNOTSUPP)))
        XCTAssertEqual(Xattr.get(f, "security.capability"), .failure(Errno(EOPNOTSUPP)))
        XCTAssertEqual(Xattr.get(f, "system.posix_acl_access"), .failure(Errno(EOPNOTSUPP)))
        XCTAssertEqual(Xattr.get(mnt, "system.posix_acl_default"), .failure(Errno(EOPNOTSUPP)))
        XCTAssertEqual(Xattr.get(f, "trusted.x"), .failure(Errno(EOPNOTSUPP)))
        XCTAssertEqual(Xattr.set(f, "user.only", [1]), 0, "errno \(errno)")
        XCTAssertEqual(Xattr.list(f), .success(["user.only"]), "listxattr lists only user.*")
        // Writing a file (which makes the kernel ask for security.capability) still works, and fast.
        let start = Date()
        for i in 0..<200 {
            let fd = open(f, O_WRONLY)
            pwriteAll(fd, [UInt8(i & 0xff)], i)
            close(fd)
        }
        XCTAssertLessThan(Date().timeIntervalSince(start), 10)
    }

    func testXattrOnBackingFilesystemWithoutXattrs() throws {
        guard geteuid() == 0 else { throw XCTSkip("needs root to mount a ramfs") }
        unmount()
        let ram = scratch + "/ram"
        XCTAssertEqual(mkdir(ram, 0o755), 0)
        guard Harness.shell("mount -t ramfs ramfs '\(ram)'") == 0 else { throw XCTSkip("cannot mount a ramfs here") }
        defer {
            Harness.forceUnmount(mnt)
            _ = Harness.shell("umount '\(ram)'")
        }
        try write(ram + "/probe", [1])
        guard Xattr.set(ram + "/probe", "user.probe", [1]) == -1, errno == EOPNOTSUPP else {
            throw XCTSkip("this ramfs supports user xattrs; no backing filesystem without them at hand")
        }
        XCTAssertEqual(unlink(ram + "/probe"), 0)
        cipher = ram + "/cipher"
        initVolume()
        mount()
        try write(mnt + "/f", Array("on ramfs".utf8))
        XCTAssertEqual(Xattr.set(mnt + "/f", "user.x", [1]), -1)
        XCTAssertEqual(errno, EOPNOTSUPP, "setxattr on a mount whose backing filesystem has no xattrs")
        XCTAssertEqual(try read(mnt + "/f"), Array("on ramfs".utf8), "the file itself works")
        let g = Xattr.get(mnt + "/f", "user.x")
        XCTAssertTrue(g == .failure(Errno(ENODATA)) || g == .failure(Errno(EOPNOTSUPP)), "getxattr: \(g)")
        let l = Xattr.list(mnt + "/f")
        XCTAssertTrue(l == .success([]) || l == .failure(Errno(EOPNOTSUPP)), "listxattr: \(l)")
    }

    // MARK: - fallocate

    static let keepSize: Int32 = 0x01, punchHole: Int32 = 0x02, collapseRange: Int32 = 0x08, zeroRange: Int32 = 0x10, insertRange: Int32 = 0x20

    /// The same fallocate on a plain file and on the mount, from the same starting content;
    /// afterwards both files are compared byte for byte, with their sizes.
    func compareFallocate(_ initial: [UInt8], mode: Int32, offset: Int, length: Int, _ what: String,
                          file: StaticString = #filePath, line: UInt = #line) throws {
        var results = [(Int32, [UInt8], Int)]()
        for root in [plain, mnt] {
            let f = root + "/fa"
            try write(f, initial)
            let fd = open(f, O_RDWR)
            XCTAssertGreaterThanOrEqual(fd, 0, file: file, line: line)
            let r = fallocate(fd, mode, off_t(offset), off_t(length))
            let e = r == 0 ? 0 : errno
            var s = stat()
            XCTAssertEqual(fstat(fd, &s), 0, file: file, line: line)
            close(fd)
            results.append((e, try read(f), Int(s.st_size)))
        }
        XCTAssertEqual(results[0].0, 0, "\(what): the plain directory refused it: errno \(results[0].0)", file: file, line: line)
        XCTAssertEqual(results[1].0, results[0].0, "\(what): errno \(errnoName(results[1].0)) on the mount, \(errnoName(results[0].0)) on the plain directory", file: file, line: line)
        XCTAssertEqual(results[1].2, results[0].2, "\(what): size", file: file, line: line)
        XCTAssertEqual(results[1].1.count, results[0].1.count, "\(what): length read back", file: file, line: line)
        if results[1].1 != results[0].1 {
            let first = zip(results[1].1, results[0].1).enumerated().first { $0.element.0 != $0.element.1 }?.offset
            XCTFail("\(what): content differs from the plain directory's, first at byte \(first.map(String.init) ?? "end")", file: file, line: line)
        }
    }

    func testFallocateExtends() throws {
        let data = pattern(5000, seed: 9)
        try compareFallocate(data, mode: 0, offset: 0, length: 20000, "mode 0 from 0 to 20000")
        try compareFallocate(data, mode: 0, offset: 12345, length: 100_000, "mode 0 past the end")
        try compareFallocate(data, mode: 0, offset: 100, length: 200, "mode 0 inside the file")
        try compareFallocate([], mode: 0, offset: 0, length: 4096, "mode 0 on an empty file")
        unmount()
        mount()
        XCTAssertEqual(try read(mnt + "/fa"), [UInt8](repeating: 0, count: 4096))
    }

    func testFallocateKeepSize() throws {
        let data = pattern(5000, seed: 10)
        try compareFallocate(data, mode: Self.keepSize, offset: 0, length: 1 << 20, "KEEP_SIZE past the end")
        try compareFallocate(data, mode: Self.keepSize, offset: 4000, length: 10, "KEEP_SIZE inside")
        // Data written after a KEEP_SIZE preallocation beyond the end lands right.
        for root in [plain, mnt] {
            let fd = open(root + "/fa", O_RDWR)
            pwriteAll(fd, pattern(100, seed: 11), 8000)
            close(fd)
        }
        XCTAssertEqual(try read(mnt + "/fa"), try read(plain + "/fa"))
    }

    func testFallocatePunchHole() throws {
        let data = pattern(3 * 65536 + 1234, seed: 12)
        let mode = Self.punchHole | Self.keepSize
        try compareFallocate(data, mode: mode, offset: 10000, length: 50000, "PUNCH_HOLE in the middle, unaligned")
        try compareFallocate(data, mode: mode, offset: 65536, length: 65536, "PUNCH_HOLE of aligned blocks")
        try compareFallocate(data, mode: mode, offset: 3 * 65536, length: 100_000, "PUNCH_HOLE over the end")
        try compareFallocate(data, mode: mode, offset: 5, length: 3, "PUNCH_HOLE of 3 bytes")
        let out = try read(mnt + "/fa")
        XCTAssertEqual(Array(out[5..<8]), [0, 0, 0])
        XCTAssertEqual(Array(out[0..<5]), Array(data[0..<5]))
        XCTAssertEqual(Array(out[8...]), Array(data[8...]))
        // PUNCH_HOLE without KEEP_SIZE is invalid everywhere.
        for root in [plain, mnt] {
            let fd = open(root + "/fa", O_RDWR)
            XCTAssertEqual(fallocate(fd, Self.punchHole, 0, 10), -1)
            XCTAssertEqual(errno, EOPNOTSUPP, root)
            close(fd)
        }
        // Punching frees space on the mount too (the hole is a backing hole).
        let big = pattern(1 << 20, seed: 13)
        try write(mnt + "/big", big)
        let before = st(mnt + "/big").st_blocks
        let fd = open(mnt + "/big", O_RDWR)
        XCTAssertEqual(fallocate(fd, mode, 4096, (1 << 20) - 8192), 0, "errno \(errno)")
        close(fd)
        XCTAssertLessThan(st(mnt + "/big").st_blocks, before / 2, "a punched hole releases its blocks")
        unmount()
        mount()
        let back = try read(mnt + "/big")
        XCTAssertEqual(Array(back.prefix(4096)), Array(big.prefix(4096)))
        XCTAssertTrue(back[4096..<((1 << 20) - 4096)].allSatisfy { $0 == 0 })
        XCTAssertEqual(Array(back.suffix(4096)), Array(big.suffix(4096)))
    }

    func testFallocateZeroRange() throws {
        let data = pattern(100_000, seed: 14)
        try compareFallocate(data, mode: Self.zeroRange, offset: 7000, length: 20000, "ZERO_RANGE inside")
        try compareFallocate(data, mode: Self.zeroRange, offset: 90000, length: 50000, "ZERO_RANGE growing the file")
        try compareFallocate(data, mode: Self.zeroRange | Self.keepSize, offset: 90000, length: 50000, "ZERO_RANGE|KEEP_SIZE over the end")
        try compareFallocate(data, mode: Self.zeroRange, offset: 1, length: 1, "ZERO_RANGE of one byte")
    }

    func testFallocateUnsupportedModes() throws {
        try write(mnt + "/f", pattern(1 << 16, seed: 15))
        let fd = open(mnt + "/f", O_RDWR)
        defer { close(fd) }
        for (mode, name) in [(Self.collapseRange, "COLLAPSE_RANGE"), (Self.insertRange, "INSERT_RANGE")] {
            XCTAssertEqual(fallocate(fd, mode, 4096, 4096), -1, name)
            XCTAssertEqual(errno, EOPNOTSUPP, name)
        }
        XCTAssertEqual(try read(mnt + "/f"), pattern(1 << 16, seed: 15), "refused modes change nothing")
        // Mode 0 still works afterwards (the kernel did not give up on fallocate for the mount).
        XCTAssertEqual(fallocate(fd, 0, 0, 1 << 17), 0, "errno \(errno)")
        XCTAssertEqual(st(mnt + "/f").st_size, 1 << 17)
    }

    // MARK: - long paths

    /// Nested directories reached through directory descriptors, so that no single path
    /// string passes PATH_MAX: 200-byte names become long names (short backing names),
    /// 150-byte names stay short and make the backing path longer than the plaintext one.
    func deepTree(nameLength: Int, minimumPath: Int) throws {
        let levels = minimumPath / (nameLength + 1) + 1
        let names = (0..<levels).map { i in String(repeating: Character(UnicodeScalar(UInt8(97 + i % 26))), count: nameLength - 3) + String(format: "%03d", i) }
        var fds = [open(mnt, O_RDONLY | O_DIRECTORY)]
        XCTAssertGreaterThanOrEqual(fds[0], 0)
        defer { for fd in fds { close(fd) } }
        for n in names {
            XCTAssertEqual(mkdirat(fds.last!, n, 0o755), 0, "mkdir at depth \(fds.count): errno \(errno) \(errnoName(errno))")
            let fd = openat(fds.last!, n, O_RDONLY | O_DIRECTORY)
            guard fd >= 0 else { return XCTFail("open at depth \(fds.count): errno \(errno) \(errnoName(errno))") }
            fds.append(fd)
        }
        let pathLength = names.map { $0.utf8.count + 1 }.reduce(0, +)
        XCTAssertGreaterThan(pathLength, 4000)
        let deepest = fds.last!
        let content = pattern(9000, seed: 16)
        let fileName = String(repeating: "f", count: nameLength)
        let wfd = openat(deepest, fileName, O_WRONLY | O_CREAT | O_EXCL, 0o644)
        guard wfd >= 0 else { return XCTFail("create at a plaintext path of \(pathLength + nameLength) bytes: errno \(errno) \(errnoName(errno))") }
        XCTAssertEqual(content.withUnsafeBytes { Glibc.write(wfd, $0.baseAddress, $0.count) }, content.count)
        close(wfd)
        func readAt(_ dir: Int32, _ name: String) -> [UInt8] {
            let fd = openat(dir, name, O_RDONLY)
            guard fd >= 0 else { return [] }
            defer { close(fd) }
            return preadAll(fd, 20000, 0)
        }
        XCTAssertEqual(readAt(deepest, fileName), content)
        // Listed, by readdir on the deepest directory (opened afresh: a directory stream opened
        // before a file was created need not show it) and by find over the whole tree.
        let listing = openat(deepest, ".", O_RDONLY | O_DIRECTORY)
        if listing >= 0, let d = fdopendir(listing) {
            var seen = [String]()
            while let e = readdir(d) {
                seen.append(withUnsafePointer(to: e.pointee.d_name) { $0.withMemoryRebound(to: CChar.self, capacity: 256) { String(cString: $0) } })
            }
            closedir(d)
            XCTAssertEqual(seen.sorted(), [".", "..", fileName].sorted())
        } else { XCTFail("opening the deepest directory for listing: errno \(errno)") }
        let find = runWithTimeout(["sh", "-c", "find '\(mnt)' | wc -l"], seconds: 30)
        XCTAssertEqual(find.output.trimmingCharacters(in: .whitespacesAndNewlines), String(levels + 2), "find sees every level: \(find.output)")
        // Rename inside the deepest directory, and rename the deepest directory itself.
        let renamed = String(repeating: "r", count: nameLength)
        XCTAssertEqual(renameat(deepest, fileName, deepest, renamed), 0, "errno \(errno)")
        XCTAssertEqual(readAt(deepest, renamed), content)
        let parent = fds[fds.count - 2]
        let newDirName = String(repeating: "z", count: nameLength)
        XCTAssertEqual(renameat(parent, names.last!, parent, newDirName), 0, "errno \(errno)")
        XCTAssertEqual(readAt(deepest, renamed), content, "an open directory descriptor follows its directory")
        // After a remount, walk down again.
        close(fds.removeLast())
        for fd in fds { close(fd) }
        fds = []
        unmount()
        mount()
        fds = [open(mnt, O_RDONLY | O_DIRECTORY)]
        for n in names.dropLast() + [newDirName] {
            let fd = openat(fds.last!, n, O_RDONLY | O_DIRECTORY)
            guard fd >= 0 else { return XCTFail("walking down after remount at depth \(fds.count): errno \(errno) \(errnoName(errno))") }
            fds.append(fd)
        }
        XCTAssertEqual(readAt(fds.last!, renamed), content, "after remount")
        // Remove everything, deepest first.
        XCTAssertEqual(unlinkat(fds.last!, renamed, 0), 0, "errno \(errno)")
        let allNames = names.dropLast() + [newDirName]
        for (i, n) in allNames.enumerated().reversed() {
            close(fds.removeLast())
            XCTAssertEqual(unlinkat(fds[i], n, AT_REMOVEDIR), 0, "rmdir at depth \(i): errno \(errno)")
        }
        for fd in fds { close(fd) }
        fds = []
        XCTAssertEqual(try FileManager.default.contentsOfDirectory(atPath: mnt), [])
        unmount()
        XCTAssertEqual(backingFiles().filter { !$0.path.hasPrefix("xtsfs.") }.map(\.path), [], "nothing left in the backing directory")
        mount()
    }

    func testFourThousandBytePathsWithLongNames() throws { try deepTree(nameLength: 200, minimumPath: 4000) }
    func testFourThousandBytePathsWhoseBackingPathPassesPathMax() throws { try deepTree(nameLength: 150, minimumPath: 4000) }

    // MARK: - RENAME_EXCHANGE

    func testRenameExchangeFiles() throws {
        for root in [plain, mnt] {
            try write(root + "/a", Array("content of a".utf8))
            try write(root + "/b", pattern(5000, seed: 17))
            XCTAssertEqual(chmod(root + "/a", 0o600), 0)
            let ia = st(root + "/a").st_ino, ib = st(root + "/b").st_ino
            XCTAssertEqual(RenameAt2.call(root + "/a", root + "/b", flags: RenameAt2.exchange), 0, "\(root): errno \(errno) \(errnoName(errno))")
            XCTAssertEqual(try read(root + "/a"), pattern(5000, seed: 17), root)
            XCTAssertEqual(try read(root + "/b"), Array("content of a".utf8), root)
            XCTAssertEqual(st(root + "/b").st_mode & 0o777, 0o600, "\(root): the mode moves with the file")
            XCTAssertEqual(st(root + "/a").st_ino, ib, root)
            XCTAssertEqual(st(root + "/b").st_ino, ia, root)
            XCTAssertEqual(try FileManager.default.contentsOfDirectory(atPath: root).sorted(), ["a", "b"], root)
            // A missing side is ENOENT, and changes nothing.
            XCTAssertEqual(RenameAt2.call(root + "/a", root + "/missing", flags: RenameAt2.exchange), -1)
            XCTAssertEqual(errno, ENOENT, root)
            XCTAssertEqual(try read(root + "/a"), pattern(5000, seed: 17), root)
        }
        unmount()
        mount()
        XCTAssertEqual(try read(mnt + "/b"), Array("content of a".utf8))
    }

    func testRenameExchangeFileAndDirectory() throws {
        for root in [plain, mnt] {
            try write(root + "/f", Array("a file".utf8))
            XCTAssertEqual(mkdir(root + "/d", 0o755), 0)
            try write(root + "/d/inside", Array("inside d".utf8))
            XCTAssertEqual(RenameAt2.call(root + "/f", root + "/d", flags: RenameAt2.exchange), 0, "\(root): errno \(errno) \(errnoName(errno))")
            XCTAssertEqual(st(root + "/f").st_mode & S_IFMT, S_IFDIR, root)
            XCTAssertEqual(st(root + "/d").st_mode & S_IFMT, S_IFREG, root)
            XCTAssertEqual(try read(root + "/f/inside"), Array("inside d".utf8), root)
            XCTAssertEqual(try read(root + "/d"), Array("a file".utf8), root)
            try write(root + "/f/new", [1])
            XCTAssertEqual(try FileManager.default.contentsOfDirectory(atPath: root + "/f").sorted(), ["inside", "new"], root)
        }
        unmount()
        mount()
        XCTAssertEqual(try read(mnt + "/f/inside"), Array("inside d".utf8))
        XCTAssertEqual(try read(mnt + "/d"), Array("a file".utf8))
    }

    func testRenameExchangeAcrossDirectories() throws {
        let longA = String(repeating: "x", count: 210), longB = String(repeating: "y", count: 190)
        for root in [plain, mnt] {
            XCTAssertEqual(mkdir(root + "/d1", 0o755), 0)
            XCTAssertEqual(mkdir(root + "/d2", 0o755), 0)
            XCTAssertEqual(mkdir(root + "/d2/sub", 0o755), 0)
            try write(root + "/d1/" + longA, Array("was d1/longA".utf8))
            try write(root + "/d2/sub/" + longB, Array("was d2/sub/longB".utf8))
            try write(root + "/d1/short", Array("was d1/short".utf8))
            XCTAssertEqual(RenameAt2.call(root + "/d1/" + longA, root + "/d2/sub/" + longB, flags: RenameAt2.exchange), 0, "\(root): errno \(errno) \(errnoName(errno))")
            XCTAssertEqual(try read(root + "/d1/" + longA), Array("was d2/sub/longB".utf8), root)
            XCTAssertEqual(try read(root + "/d2/sub/" + longB), Array("was d1/longA".utf8), root)
            // A directory exchanged with a file in another directory.
            XCTAssertEqual(RenameAt2.call(root + "/d1/short", root + "/d2/sub", flags: RenameAt2.exchange), 0, "\(root): errno \(errno)")
            XCTAssertEqual(try read(root + "/d2/sub"), Array("was d1/short".utf8), root)
            XCTAssertEqual(try read(root + "/d1/short/" + longB), Array("was d1/longA".utf8), root)
            XCTAssertEqual(try FileManager.default.contentsOfDirectory(atPath: root + "/d1").sorted(), [longA, "short"].sorted(), root)
            XCTAssertEqual(try FileManager.default.contentsOfDirectory(atPath: root + "/d2"), ["sub"], root)
            // A directory into its own subtree: EINVAL.
            XCTAssertEqual(RenameAt2.call(root + "/d1", root + "/d1/short/" + longB, flags: RenameAt2.exchange), -1)
            XCTAssertEqual(errno, EINVAL, root)
        }
        unmount()
        mount()
        XCTAssertEqual(try read(mnt + "/d1/short/" + longB), Array("was d1/longA".utf8))
        XCTAssertEqual(try read(mnt + "/d2/sub"), Array("was d1/short".utf8))
        XCTAssertEqual(try FileManager.default.contentsOfDirectory(atPath: mnt + "/d1").sorted(), [longA, "short"].sorted())
    }

    // MARK: - setuid and setgid cleared by other users' writes

    func asNobody(_ command: String) -> Int32 {
        runWithTimeout(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "sh", "-c", command]).status
    }

    func testSetuidAndSetgidClearedWhenAnotherUserWrites() throws {
        guard geteuid() == 0 else { throw XCTSkip("needs root to act as another user") }
        XCTAssertEqual(chmod(scratch, 0o755), 0)
        XCTAssertEqual(chmod(mnt, 0o777), 0)
        XCTAssertEqual(chmod(plain, 0o777), 0)
        let cases: [(mode: mode_t, op: String, expected: mode_t)] = [
            (0o4777, "printf x >> F", 0o777),
            (0o2777, "printf x >> F", 0o777),
            (0o6777, "printf x >> F", 0o777),
            (0o4777, "truncate -s 1 F", 0o777),
            (0o2777, "truncate -s 0 F", 0o777),
            (0o4777, "printf abc | dd of=F bs=1 seek=2 conv=notrunc 2>/dev/null", 0o777),
            (0o6777, ": > F", 0o777),
            (0o6767, "printf x > F", 0o767),
        ]
        for (i, c) in cases.enumerated() {
            var modes = [mode_t]()
            var sizes = [Int]()
            for root in [plain, mnt] {
                let f = root + "/s\(i)"
                try write(f, Array("12345".utf8))
                XCTAssertEqual(chmod(f, c.mode), 0)
                XCTAssertEqual(st(f).st_mode & 0o7777, c.mode, "\(root): chmod \(String(c.mode, radix: 8)) as root")
                XCTAssertEqual(asNobody(c.op.replacingOccurrences(of: "F", with: "'\(f)'")), 0, "\(root): \(c.op) as nobody")
                modes.append(st(f).st_mode & 0o7777)
                sizes.append(Int(st(f).st_size))
            }
            XCTAssertEqual(modes[0], c.expected, "plain directory: \(c.op) on \(String(c.mode, radix: 8)) gave \(String(modes[0], radix: 8))")
            XCTAssertEqual(modes[1], modes[0], "mount: \(c.op) by another user on mode \(String(c.mode, radix: 8)) left \(String(modes[1], radix: 8)), plain gave \(String(modes[0], radix: 8))")
            XCTAssertEqual(sizes[1], sizes[0], "\(c.op): size")
        }
        // The owner's (root's) own write keeps the bits, as on the plain directory.
        for root in [plain, mnt] {
            let f = root + "/own"
            try write(f, [1])
            XCTAssertEqual(chmod(f, 0o4755), 0)
            let fd = open(f, O_WRONLY | O_APPEND)
            XCTAssertEqual(Glibc.write(fd, "x", 1), 1)
            close(fd)
            XCTAssertEqual(st(f).st_mode & 0o7777, 0o4755, "\(root): root's write keeps setuid")
        }
    }

    /// A setgid file without group execute (02767): since Linux 6.2 a write or truncate by a
    /// user outside the file's group clears the setgid bit on ext4 and tmpfs.
    func testSetgidWithoutGroupExecuteClearedAsOnThePlainDirectory() throws {
        guard geteuid() == 0 else { throw XCTSkip("needs root to act as another user") }
        XCTAssertEqual(chmod(scratch, 0o755), 0)
        XCTAssertEqual(chmod(mnt, 0o777), 0)
        XCTAssertEqual(chmod(plain, 0o777), 0)
        for op in ["printf x >> F", "truncate -s 0 F"] {
            var kept = [mode_t]()
            for root in [plain, mnt] {
                let f = root + "/nogx-" + op.prefix(5)
                try write(f, [1])
                XCTAssertEqual(chmod(f, 0o2767), 0)
                XCTAssertEqual(asNobody(op.replacingOccurrences(of: "F", with: "'\(f)'")), 0)
                kept.append(st(f).st_mode & 0o7777)
            }
            XCTAssertEqual(kept[1], kept[0], "setgid without group x after another user's \(op): mount \(String(kept[1], radix: 8)), plain \(String(kept[0], radix: 8))")
        }
    }

    // MARK: - mmap

    func testSharedWritableMmap() throws {
        let path = mnt + "/mapped"
        let initial = pattern(3 * 4096 + 100, seed: 18)
        try write(path, initial)
        let fd = open(path, O_RDWR)
        XCTAssertGreaterThanOrEqual(fd, 0)
        let length = initial.count
        guard let map = mmap(nil, length, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0), map != MAP_FAILED else {
            close(fd)
            return XCTFail("mmap MAP_SHARED: errno \(errno)")
        }
        let patch = pattern(5000, seed: 19)
        patch.withUnsafeBytes { map.advanced(by: 3000).copyMemory(from: $0.baseAddress!, byteCount: $0.count) }
        map.storeBytes(of: 0xEE, toByteOffset: length - 1, as: UInt8.self)
        var expected = initial
        expected.replaceSubrange(3000..<8000, with: patch)
        expected[length - 1] = 0xEE
        XCTAssertEqual(msync(map, length, MS_SYNC), 0, "msync errno \(errno)")
        XCTAssertEqual(munmap(map, length), 0)
        XCTAssertEqual(preadAll(fd, length + 10, 0), expected, "read(2) on the same descriptor")
        close(fd)
        XCTAssertEqual(try read(path), expected, "read(2) after close")
        // Grow with ftruncate, write the new page through a fresh mapping.
        let fd2 = open(path, O_RDWR)
        XCTAssertEqual(ftruncate(fd2, off_t(5 * 4096)), 0)
        if let m2 = mmap(nil, 5 * 4096, PROT_READ | PROT_WRITE, MAP_SHARED, fd2, 0), m2 != MAP_FAILED {
            m2.storeBytes(of: 0x42, toByteOffset: 4 * 4096 + 17, as: UInt8.self)
            XCTAssertEqual(m2.load(fromByteOffset: 3000, as: UInt8.self), patch[0], "the mapping sees earlier data")
            XCTAssertEqual(msync(m2, 5 * 4096, MS_SYNC), 0)
            XCTAssertEqual(munmap(m2, 5 * 4096), 0)
        } else { XCTFail("second mmap: errno \(errno)") }
        close(fd2)
        expected += [UInt8](repeating: 0, count: 5 * 4096 - expected.count)
        expected[4 * 4096 + 17] = 0x42
        XCTAssertEqual(try read(path), expected)
        unmount()
        mount()
        XCTAssertEqual(try read(path), expected, "after remount")
    }

    // MARK: - symlinks

    func testSymlinkTargetOf4095Bytes() throws {
        let target = String(repeating: "s/", count: 2046) + "end" // 4095 bytes
        XCTAssertEqual(target.utf8.count, 4095)
        for root in [plain, mnt] {
            XCTAssertEqual(symlink(target, root + "/l"), 0, "\(root): a 4095-byte target: errno \(errno) \(errnoName(errno))")
            var buf = [CChar](repeating: 0, count: 5000)
            let n = readlink(root + "/l", &buf, buf.count)
            XCTAssertEqual(n, 4095, root)
            XCTAssertEqual(String(decoding: buf.prefix(max(n, 0)).map { UInt8(bitPattern: $0) }, as: UTF8.self), target, root)
            XCTAssertEqual(st(root + "/l", follow: false).st_size, 4095, root)
            // 4096 is over the Linux limit everywhere.
            XCTAssertEqual(symlink(target + "x", root + "/l2"), -1)
            XCTAssertEqual(errno, ENAMETOOLONG, root)
        }
        unmount()
        mount()
        var buf = [CChar](repeating: 0, count: 5000)
        let n = readlink(mnt + "/l", &buf, buf.count)
        XCTAssertEqual(n, 4095, "after remount")
        XCTAssertEqual(String(decoding: buf.prefix(max(n, 0)).map { UInt8(bitPattern: $0) }, as: UTF8.self), target, "after remount")
    }

    func testLchownAndTimestampsOfASymlinkItself() throws {
        var results = [[String]]()
        for root in [plain, mnt] {
            try write(root + "/target", [1])
            var old = [timespec(tv_sec: 1_200_000_000, tv_nsec: 0), timespec(tv_sec: 1_200_000_000, tv_nsec: 0)]
            XCTAssertEqual(utimensat(AT_FDCWD, root + "/target", &old, 0), 0)
            XCTAssertEqual(symlink("target", root + "/l"), 0)
            XCTAssertEqual(lchown(root + "/l", 1234, 5678), 0, "\(root): lchown errno \(errno)")
            var times = [timespec(tv_sec: 1_000_000_000, tv_nsec: 111), timespec(tv_sec: 1_100_000_000, tv_nsec: 222)]
            XCTAssertEqual(utimensat(AT_FDCWD, root + "/l", &times, AT_SYMLINK_NOFOLLOW), 0, "\(root): utimensat NOFOLLOW errno \(errno)")
            let l = st(root + "/l", follow: false), t = st(root + "/target", follow: false)
            XCTAssertEqual(l.st_uid, 1234, root)
            XCTAssertEqual(l.st_gid, 5678, root)
            XCTAssertEqual(l.st_atim.tv_sec, 1_000_000_000, root)
            XCTAssertEqual(l.st_mtim.tv_sec, 1_100_000_000, root)
            XCTAssertEqual(l.st_mtim.tv_nsec, 222, root)
            XCTAssertEqual(t.st_uid, 0, "\(root): the target's owner is untouched")
            XCTAssertEqual(t.st_mtim.tv_sec, 1_200_000_000, "\(root): the target's mtime is untouched")
            XCTAssertEqual(try FileManager.default.destinationOfSymbolicLink(atPath: root + "/l"), "target", root)
            results.append(["\(l.st_uid)", "\(l.st_gid)", "\(l.st_mtim.tv_sec)", "\(t.st_uid)"])
        }
        unmount()
        mount()
        let l = st(mnt + "/l", follow: false)
        XCTAssertEqual(l.st_uid, 1234, "after remount")
        XCTAssertEqual(l.st_mtim.tv_sec, 1_100_000_000, "after remount")
    }

    /// readdir's d_ino is what stat says, for every kind of entry, hard links and "." and ".." included.
    func testReaddirInodesMatchStat() throws {
        let d = mnt + "/d"
        XCTAssertEqual(mkdir(d, 0o755), 0)
        try write(d + "/file", [1])
        try write(d + "/" + String(repeating: "l", count: 220), [2])
        XCTAssertEqual(link(d + "/file", d + "/hardlink"), 0, "errno \(errno)")
        XCTAssertEqual(mkdir(d + "/sub", 0o755), 0)
        XCTAssertEqual(symlink("file", d + "/symlink"), 0)
        XCTAssertEqual(mkfifo(d + "/fifo", 0o644), 0)
        for pass in ["fresh", "after remount"] {
            if pass == "after remount" { unmount(); mount() }
            guard let dir = opendir(d) else { return XCTFail("opendir errno \(errno)") }
            var seen = 0
            while let e = readdir(dir) {
                let name = withUnsafePointer(to: e.pointee.d_name) { $0.withMemoryRebound(to: CChar.self, capacity: 256) { String(cString: $0) } }
                var s = stat()
                XCTAssertEqual(lstat(d + "/" + name, &s), 0, name)
                XCTAssertEqual(UInt64(e.pointee.d_ino), UInt64(s.st_ino), "\(pass): d_ino of \(name.prefix(20)) is not its st_ino")
                seen += 1
            }
            closedir(dir)
            XCTAssertEqual(seen, 8, pass)
        }
    }

    // MARK: - statfs

    func testStatfsReportsTheBackingFilesystem() throws {
        var m = statvfs(), c = statvfs()
        XCTAssertEqual(statvfs(mnt, &m), 0)
        XCTAssertEqual(statvfs(cipher, &c), 0)
        XCTAssertEqual(UInt64(m.f_blocks) * UInt64(m.f_frsize), UInt64(c.f_blocks) * UInt64(c.f_frsize), "total size")
        XCTAssertEqual(m.f_blocks, c.f_blocks)
        XCTAssertEqual(m.f_bsize, c.f_bsize)
        XCTAssertEqual(m.f_files, c.f_files)
        // Free space follows the backing filesystem (within what others write meanwhile: 64 MiB).
        let diff = abs(Int64(m.f_bavail) * Int64(m.f_frsize) - Int64(c.f_bavail) * Int64(c.f_frsize))
        XCTAssertLessThan(diff, 64 << 20)
        XCTAssertEqual(m.f_namemax, 255)
    }

    // MARK: - combinations

    func testHardLinksShareXattrsAndMappings() throws {
        for root in [plain, mnt] {
            try write(root + "/a", pattern(8192, seed: 60))
            XCTAssertEqual(link(root + "/a", root + "/b"), 0, "\(root): errno \(errno)")
            XCTAssertEqual(Xattr.set(root + "/a", "user.shared", Array("one inode".utf8)), 0, "\(root): errno \(errno)")
            XCTAssertEqual(Xattr.get(root + "/b", "user.shared"), .success(Array("one inode".utf8)), "\(root): an xattr set through one name shows through the other")
            // A shared mapping through one name, read(2) through the other.
            let fa = open(root + "/a", O_RDWR), fb = open(root + "/b", O_RDONLY)
            defer { close(fa); close(fb) }
            guard let m = mmap(nil, 8192, PROT_READ | PROT_WRITE, MAP_SHARED, fa, 0), m != MAP_FAILED else { return XCTFail("mmap errno \(errno)") }
            m.storeBytes(of: 0x77, toByteOffset: 5000, as: UInt8.self)
            XCTAssertEqual(msync(m, 8192, MS_SYNC), 0)
            XCTAssertEqual(preadAll(fb, 1, 5000), [0x77], "\(root): a write through a mapping of a shows through b")
            munmap(m, 8192)
        }
    }

    func testRenameExchangeOfDirectoriesInDifferentParents() throws {
        for root in [plain, mnt] {
            for d in ["p1", "p2", "p1/x", "p2/y"] { XCTAssertEqual(mkdir(root + "/" + d, 0o755), 0) }
            try write(root + "/p1/x/fx", Array("in x".utf8))
            try write(root + "/p2/y/fy", Array("in y".utf8))
            XCTAssertEqual(RenameAt2.call(root + "/p1/x", root + "/p2/y", flags: RenameAt2.exchange), 0, "\(root): errno \(errno) \(errnoName(errno))")
            XCTAssertEqual(try read(root + "/p1/x/fy"), Array("in y".utf8), root)
            XCTAssertEqual(try read(root + "/p2/y/fx"), Array("in x".utf8), root)
            // ".." follows: each directory's parent is where it now is.
            XCTAssertEqual(st(root + "/p1/x/..").st_ino, st(root + "/p1").st_ino, "\(root): .. of the directory moved into p1")
            XCTAssertEqual(st(root + "/p2/y/..").st_ino, st(root + "/p2").st_ino, "\(root): .. of the directory moved into p2")
            try write(root + "/p1/x/new", [1])
            XCTAssertEqual(try FileManager.default.contentsOfDirectory(atPath: root + "/p1/x").sorted(), ["fy", "new"], root)
        }
        unmount()
        mount()
        XCTAssertEqual(try read(mnt + "/p1/x/fy"), Array("in y".utf8))
        XCTAssertEqual(try FileManager.default.contentsOfDirectory(atPath: mnt + "/p2/y").sorted(), ["fx"])
    }

    /// Root's chown of a setuid/setgid file clears the bits on Linux (since 2.2.13).
    func testChownClearsSetuidAsOnThePlainDirectory() throws {
        for mode: mode_t in [0o4755, 0o2755, 0o6755, 0o2745] {
            var modes = [mode_t]()
            for root in [plain, mnt] {
                let f = root + "/c\(mode)"
                try write(f, [1])
                XCTAssertEqual(chmod(f, mode), 0)
                XCTAssertEqual(chown(f, 1234, 5678), 0, "\(root): errno \(errno)")
                modes.append(st(f).st_mode & 0o7777)
            }
            XCTAssertEqual(modes[1], modes[0], "chown of a \(String(mode, radix: 8)) file: mount \(String(modes[1], radix: 8)), plain \(String(modes[0], radix: 8))")
        }
    }

    /// A symlink whose target lives in the link store, with hard links: the target stays
    /// while any name does, and the store is empty once the last name is gone.
    func testStoredSymlinkTargetsWithHardLinksAndRename() throws {
        let target = String(repeating: "x/", count: 1900) + "end" // 3803 bytes: in the link store
        XCTAssertEqual(symlink(target, mnt + "/l"), 0, "errno \(errno) \(errnoName(errno))")
        XCTAssertEqual(mkdir(mnt + "/d", 0o755), 0)
        XCTAssertEqual(link(mnt + "/l", mnt + "/d/l2"), 0, "a hard link to a symlink: errno \(errno)")
        XCTAssertEqual(st(mnt + "/l", follow: false).st_nlink, 2)
        XCTAssertEqual(unlink(mnt + "/l"), 0)
        func targetOf(_ p: String) -> String {
            var buf = [CChar](repeating: 0, count: 8192)
            let n = readlink(p, &buf, buf.count)
            return n < 0 ? "errno \(errno)" : String(decoding: buf.prefix(n).map { UInt8(bitPattern: $0) }, as: UTF8.self)
        }
        XCTAssertEqual(targetOf(mnt + "/d/l2"), target, "the other name keeps the target")
        unmount()
        mount()
        XCTAssertEqual(targetOf(mnt + "/d/l2"), target, "after remount")
        // Renaming another symlink over the last name removes the stored target.
        XCTAssertEqual(symlink(String(repeating: "y/", count: 1800), mnt + "/other"), 0)
        XCTAssertEqual(rename(mnt + "/other", mnt + "/d/l2"), 0)
        XCTAssertEqual(targetOf(mnt + "/d/l2"), String(repeating: "y/", count: 1800))
        XCTAssertEqual(unlink(mnt + "/d/l2"), 0)
        unmount()
        let store = (try? FileManager.default.contentsOfDirectory(atPath: cipher + "/xtsfs.links")) ?? []
        XCTAssertEqual(store, [], "stored targets left behind after their last name went")
        mount()
    }

}
