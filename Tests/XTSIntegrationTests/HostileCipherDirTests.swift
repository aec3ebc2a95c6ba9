import Foundation
import XCTest
#if canImport(Glibc)
import Glibc
#endif

/// CIPHERDIR is hostile input: whoever can write it may plant symlinks, FIFOs, device
/// nodes, odd sizes or swapped side files, before the mount or while it runs. The daemon
/// runs as root, so following one of those out of CIPHERDIR would let that person read or
/// change any file on the machine.
///
/// Every case here keeps a canary outside CIPHERDIR (a 0600 file, a subdirectory, old
/// timestamps) and checks afterwards that it is exactly as it was, atime included (a
/// read of it would move its atime: /tmp is mounted relatime and the canary's atime is
/// not after its mtime), that nothing hung, that the daemon still serves other files, and
/// that the operation that met the plant failed with a sensible errno (or, for a daemon
/// that holds the original inode, acted on that inode only).
final class HostileCipherDirTests: VolumeTestCase {
    var canary = ""
    var canaryFile = ""
    var canaryBefore: [CanaryEntry] = []
    static let canaryText = Array("canary: outside CIPHERDIR, never to be read or changed by xtsfs\n".utf8)
    static let oldTime = timespec(tv_sec: 1_000_000_000, tv_nsec: 123_456_789)
    let good = pattern(5000, seed: 77)
    /// Errors that say "that backing entry is not what it should be".
    static let refused: Set<Int32> = [EIO, ENOENT, ELOOP, ESTALE]
    /// Backing paths of entries created through the mount, by plaintext path ("" is the root).
    var backing: [String: String] = [:]
    var asides = 0
    var previousSIGPIPE: __sighandler_t? = nil

    override func setUpWithError() throws {
        try super.setUpWithError()
        // A writer released from a FIFO whose reader has gone must get EPIPE, not kill the suite.
        previousSIGPIPE = signal(SIGPIPE, SIG_IGN)
        canary = scratch + "/canary"
        canaryFile = canary + "/secret"
        XCTAssertEqual(mkdir(canary, 0o755), 0)
        XCTAssertEqual(mkdir(canary + "/sub", 0o700), 0)
        try write(canary + "/sub/inner", Array("inner canary".utf8))
        try write(canaryFile, Self.canaryText)
        XCTAssertEqual(chmod(canaryFile, 0o600), 0)
        XCTAssertEqual(Xattr.set(canaryFile, "user.canary", Array("canary xattr".utf8)), 0)
        freezeCanary()
        initVolume()
        mount()
        backing[""] = cipher
        try create("good", content: good)
    }

    override func tearDown() {
        // Unmount first: what the daemon does while shutting down counts too.
        Harness.forceUnmount(mnt)
        if !canary.isEmpty { assertCanaryUnchanged("after unmount") }
        signal(SIGPIPE, previousSIGPIPE)
        super.tearDown()
    }

    // MARK: - canary

    struct CanaryEntry: Equatable, CustomStringConvertible {
        var path: String
        var mode: UInt32, uid: UInt32, gid: UInt32, size: Int, ino: UInt64, nlink: UInt64
        var atime: [Int], mtime: [Int], ctime: [Int]
        var content: [UInt8] = []
        var link = ""
        var xattrs: [String] = []
        var description: String {
            "\(path) mode \(String(mode, radix: 8)) uid \(uid) gid \(gid) size \(size) nlink \(nlink) atime \(atime) mtime \(mtime) ctime \(ctime) xattrs \(xattrs)"
        }
    }

    /// Old timestamps on everything in the canary, then the snapshot to compare with.
    func freezeCanary() {
        var times = [Self.oldTime, Self.oldTime]
        for e in snapshot(canary) { _ = utimensat(AT_FDCWD, canary + "/" + e.path, &times, AT_SYMLINK_NOFOLLOW) }
        XCTAssertEqual(utimensat(AT_FDCWD, canary, &times, 0), 0)
        canaryBefore = snapshot(canary)
        XCTAssertGreaterThanOrEqual(canaryBefore.count, 3)
    }

    /// Everything about the tree at `root`, read with O_NOATIME so that looking does not touch.
    func snapshot(_ root: String) -> [CanaryEntry] {
        var out = [CanaryEntry]()
        func visit(_ rel: String) {
            let full = rel.isEmpty ? root : root + "/" + rel
            var st = stat()
            guard lstat(full, &st) == 0 else { return }
            var e = CanaryEntry(path: rel.isEmpty ? "." : rel, mode: st.st_mode, uid: st.st_uid, gid: st.st_gid, size: Int(st.st_size),
                                ino: UInt64(st.st_ino), nlink: UInt64(st.st_nlink),
                                atime: [st.st_atim.tv_sec, st.st_atim.tv_nsec], mtime: [st.st_mtim.tv_sec, st.st_mtim.tv_nsec],
                                ctime: [st.st_ctim.tv_sec, st.st_ctim.tv_nsec])
            var names = [CChar](repeating: 0, count: 4096)
            let n = llistxattr(full, &names, names.count)
            if n > 0 { e.xattrs = names.prefix(n).split(separator: 0).map { String(decoding: $0.map { UInt8(bitPattern: $0) }, as: UTF8.self) }.sorted() }
            switch st.st_mode & S_IFMT {
            case S_IFREG:
                let fd = open(full, O_RDONLY | O_NOATIME_FLAG | O_NOFOLLOW)
                if fd >= 0 {
                    var buf = [UInt8](repeating: 0, count: max(Int(st.st_size), 1))
                    let r = pread(fd, &buf, buf.count, 0)
                    e.content = Array(buf.prefix(max(r, 0)))
                    close(fd)
                }
                out.append(e)
            case S_IFLNK:
                var buf = [CChar](repeating: 0, count: 4096)
                let r = readlink(full, &buf, buf.count)
                e.link = String(decoding: buf.prefix(max(r, 0)).map { UInt8(bitPattern: $0) }, as: UTF8.self)
                e.atime = [] // readlink(2), this snapshot's own included, moves a symlink's atime
                out.append(e)
            case S_IFDIR:
                out.append(e)
                let fd = open(full, O_RDONLY | O_DIRECTORY | O_NOATIME_FLAG | O_NOFOLLOW)
                guard fd >= 0, let d = fdopendir(fd) else { return }
                var children = [String]()
                while let ent = readdir(d) {
                    let name = withUnsafePointer(to: ent.pointee.d_name) { $0.withMemoryRebound(to: CChar.self, capacity: 256) { String(cString: $0) } }
                    if name != "." && name != ".." { children.append(name) }
                }
                closedir(d)
                for c in children.sorted() { visit(rel.isEmpty ? c : rel + "/" + c) }
            default:
                out.append(e)
            }
        }
        visit("")
        return out
    }

    func assertCanaryUnchanged(_ context: String, file: StaticString = #filePath, line: UInt = #line) {
        let now = snapshot(canary)
        if now == canaryBefore { return }
        let before = Dictionary(canaryBefore.map { ($0.path, $0) }, uniquingKeysWith: { a, _ in a })
        let after = Dictionary(now.map { ($0.path, $0) }, uniquingKeysWith: { a, _ in a })
        for p in Set(before.keys).union(after.keys).sorted() where before[p] != after[p] {
            XCTFail("\(context): canary outside CIPHERDIR changed: \(p)\n  before: \(before[p].map { "\($0)" } ?? "absent")\n  after:  \(after[p].map { "\($0)" } ?? "absent")"
                    + ((before[p]?.content != after[p]?.content) ? "\n  content differs" : ""), file: file, line: line)
        }
    }

    /// The whole contract of a case: canary intact, daemon alive, the mount still serving.
    func assertContained(_ context: String, file: StaticString = #filePath, line: UInt = #line) {
        assertCanaryUnchanged(context, file: file, line: line)
        XCTAssertFalse(Harness.daemons(mnt).isEmpty, "\(context): the daemon is gone", file: file, line: line)
        let root = mnt
        let st = sys32 { var st = stat(); return stat(root, &st) }
        XCTAssertEqual(st, .ok(0), "\(context): stat of the mount root", file: file, line: line)
        let (r, bytes) = readWithDeadline(mnt + "/good")
        XCTAssertEqual(r, .ok(good.count), "\(context): reading a good file", file: file, line: line)
        XCTAssertTrue(bytes == good, "\(context): a good file no longer reads back", file: file, line: line)
    }

    // MARK: - planting

    func parentOf(_ rel: String) -> String {
        guard let slash = rel.lastIndex(of: "/") else { return "" }
        return String(rel[..<slash])
    }

    func backingListing(_ dir: String) -> Set<String> {
        Set((try? FileManager.default.contentsOfDirectory(atPath: dir)) ?? [])
    }

    /// Creates `rel` through the mount and records its backing path, found by diffing the
    /// backing directory of its parent.
    @discardableResult
    func create(_ rel: String, directory: Bool = false, content: [UInt8] = [], file: StaticString = #filePath, line: UInt = #line) throws -> String {
        guard let dir = backing[parentOf(rel)] else { XCTFail("no backing for parent of \(rel)", file: file, line: line); return "" }
        let before = backingListing(dir)
        if directory { XCTAssertEqual(mkdir(mnt + "/" + rel, 0o755), 0, "mkdir \(rel)", file: file, line: line) }
        else { try write(mnt + "/" + rel, content) }
        let new = backingListing(dir).subtracting(before).filter { !$0.hasSuffix(".name") && !$0.hasSuffix(".tmp") }
        XCTAssertEqual(new.count, 1, "one new backing entry for \(rel): \(new)", file: file, line: line)
        let path = dir + "/" + (new.first ?? "?")
        backing[rel] = path
        return path
    }

    /// Moves a backing entry out of the way (to the scratch directory, same filesystem) and returns where it went.
    func moveAside(_ path: String, file: StaticString = #filePath, line: UInt = #line) -> String {
        asides += 1
        let aside = scratch + "/aside\(asides)"
        XCTAssertEqual(rename(path, aside), 0, "moving \(path) aside: errno \(errno)", file: file, line: line)
        return aside
    }

    func plantSymlink(at path: String, to target: String, file: StaticString = #filePath, line: UInt = #line) -> String {
        let aside = moveAside(path, file: file, line: line)
        XCTAssertEqual(symlink(target, path), 0, "planting a symlink at \(path)", file: file, line: line)
        return aside
    }

    /// The outcome of an operation that met a plant: a refusal from `allowed`, or success when
    /// `successOK` (a daemon may act on the original inode it still holds).
    func assertRefused(_ o: Outcome, _ what: String, allowed: Set<Int32> = HostileCipherDirTests.refused, successOK: Bool = true,
                       file: StaticString = #filePath, line: UInt = #line) {
        switch o {
        case .hung: XCTFail("\(what): hung", file: file, line: line)
        case .ok: if !successOK { XCTFail("\(what): succeeded", file: file, line: line) }
        case .failed(let e):
            XCTAssertTrue(allowed.contains(e), "\(what): \(o), expected one of \(allowed.sorted().map(errnoName))", file: file, line: line)
        }
    }

    /// A read that met a plant: refused, or the file's own content; never the canary, never empty device data.
    func checkRead(_ o: Outcome, _ bytes: [UInt8], original: [UInt8], _ what: String, allowed: Set<Int32>,
                   file: StaticString = #filePath, line: UInt = #line) {
        XCTAssertFalse(bytes.contains(subsequence: Array("canary".utf8)), "\(what): returned the canary's content", file: file, line: line)
        if o.succeeded {
            XCTAssertTrue(bytes == original, "\(what): succeeded with \(bytes.count) bytes that are not the file's own content", file: file, line: line)
        } else {
            assertRefused(o, what, allowed: allowed, file: file, line: line)
        }
    }

    func assertReadRefused(_ path: String, original: [UInt8], _ what: String, allowed: Set<Int32> = HostileCipherDirTests.refused,
                           file: StaticString = #filePath, line: UInt = #line) {
        let (o, bytes) = readWithDeadline(path, limit: 1 << 20)
        checkRead(o, bytes, original: original, what, allowed: allowed, file: file, line: line)
    }

    /// After each operation: the canary must be as it was. A change is reported once and the
    /// new state becomes the reference, so that the next operation is judged on its own.
    func checkCanaryAfter(_ what: String, file: StaticString = #filePath, line: UInt = #line) {
        if snapshot(canary) != canaryBefore {
            assertCanaryUnchanged(what, file: file, line: line)
            canaryBefore = snapshot(canary)
        }
    }

    /// One operation through the mount on a path whose backing entry was planted; it
    /// returns its outcome and, for reads, what it read.
    struct Attack {
        var name: String
        var extraErrnos: Set<Int32> = []
        /// Called with the path of the planted entry (or directory) and the mount point.
        var run: @Sendable (String, String) -> (Outcome, [UInt8]?)
    }

    static func op(_ name: String, extra: Set<Int32> = [], _ body: @escaping @Sendable (String) -> Int) -> Attack {
        Attack(name: name, extraErrnos: extra) { p, _ in (sys { body(p) }, nil) }
    }

    /// Everything one can do to a file, each to be tried on a file of its own: the first
    /// operation that reaches the daemon may make the kernel give up on that inode, and the
    /// others must still reach the daemon to be tested.
    static let fileAttacks: [Attack] = [
        Attack(name: "cat") { p, _ in readWithDeadline(p) },
        op("chmod 666") { Int(chmod($0, 0o666)) },
        op("chmod 4777") { Int(chmod($0, 0o4777)) },
        op("chown") { Int(chown($0, 1234, 5678)) },
        op("truncate") { Int(truncate($0, 3)) },
        op("touch") { p in
            var times = [timespec(tv_sec: 2_000_000_000, tv_nsec: 0), timespec(tv_sec: 2_000_000_000, tv_nsec: 0)]
            return Int(utimensat(AT_FDCWD, p, &times, 0))
        },
        op("append") { p in
            let fd = open(p, O_WRONLY | O_APPEND)
            if fd < 0 { return -1 }
            defer { close(fd) }
            return Glibc.write(fd, "appended by the attack test\n", 28)
        },
        op("write") { p in
            let fd = open(p, O_WRONLY)
            if fd < 0 { return -1 }
            defer { close(fd) }
            return pwrite(fd, "overwritten", 11, 0)
        },
        op("open O_TRUNC") { p in
            let fd = open(p, O_WRONLY | O_TRUNC)
            if fd >= 0 { close(fd) }
            return Int(fd)
        },
        op("setfattr", extra: [EOPNOTSUPP, EPERM]) { Int(setxattr($0, "user.attack", "v", 1, 0)) },
        op("removexattr", extra: [EOPNOTSUPP, EPERM, ENODATA]) { Int(removexattr($0, "user.canary")) },
        Attack(name: "getfattr", extraErrnos: [EOPNOTSUPP, ENODATA]) { p, _ in
            let r = withDeadline { () -> (Outcome, [UInt8]) in
                var buf = [UInt8](repeating: 0, count: 4096)
                let n = getxattr(p, "user.canary", &buf, buf.count)
                return n < 0 ? (.failed(Glibc.errno), []) : (.ok(n), Array(buf.prefix(n)))
            }
            // A value read is never "the file's own content": any success here is the canary's.
            return r.map { ($0.0, $0.0.succeeded ? $0.1 + Array("canary".utf8) : []) } ?? (.hung, [])
        },
        Attack(name: "listxattr", extraErrnos: [EOPNOTSUPP]) { p, _ in
            let r = withDeadline { () -> (Outcome, [UInt8]) in
                var buf = [CChar](repeating: 0, count: 4096)
                let n = listxattr(p, &buf, buf.count)
                return n < 0 ? (.failed(Glibc.errno), []) : (.ok(n), buf.prefix(n).map { UInt8(bitPattern: $0) })
            }
            return r.map { ($0.0, nil as [UInt8]?) }.map { o in
                // Listing must not show the canary's xattr.
                (o.0, r!.1.contains(subsequence: Array("user.canary".utf8)) ? Array("canary".utf8) : nil)
            } ?? (.hung, nil)
        },
        op("rename the entry") { p in Int(rename(p, p + "-renamed")) },
        op("unlink the entry") { Int(unlink($0)) },
    ]

    enum Plant { case symlink(String), device, fifo, directory }

    /// Creates one file per attack (under `dir`, which must exist), replaces each backing file
    /// with `plant` (before the mount or while it runs) and runs each attack on its own file.
    func attackFiles(in dir: String = "", plant: Plant, beforeMount: Bool, allowed: Set<Int32> = HostileCipherDirTests.refused,
                     _ context: String, file: StaticString = #filePath, line: UInt = #line) throws {
        let attacks = Self.fileAttacks
        var contents = [[UInt8]]()
        var backings = [String]()
        for (i, _) in attacks.enumerated() {
            contents.append(pattern(1000 + i, seed: UInt64(100 + i)))
            backings.append(try create((dir.isEmpty ? "" : dir + "/") + "victim\(i)", content: contents[i], file: file, line: line))
        }
        if beforeMount { unmount(file: file, line: line) }
        for b in backings {
            // The original goes to the scratch directory: a daemon that still holds its inode may act on it.
            _ = moveAside(b, file: file, line: line)
            switch plant {
            case .symlink(let target): XCTAssertEqual(symlink(target, b), 0, file: file, line: line)
            case .device: XCTAssertEqual(mknod(b, S_IFCHR | 0o666, devNullNumbers), 0, "mknod: errno \(errno)", file: file, line: line)
            case .fifo: XCTAssertEqual(mkfifo(b, 0o666), 0, file: file, line: line)
            case .directory: XCTAssertEqual(mkdir(b, 0o755), 0, file: file, line: line)
            }
        }
        if beforeMount { mount(file: file, line: line) }
        var hangs = 0
        var fifoWaits = [String]()
        for (i, a) in attacks.enumerated() {
            let p = mnt + "/" + (dir.isEmpty ? "" : dir + "/") + "victim\(i)"
            let what = "\(context): \(a.name)"
            var (o, bytes) = a.run(p, mnt)
            if o == .hung, case .fifo = plant, let why = kernelFIFOWait(p) {
                // The daemon refused the stale node (ESTALE), the kernel looked the name up
                // again and found a FIFO: opening a FIFO waits for its other end, as on any
                // filesystem. Not a hang of the daemon, which is checked separately.
                fifoWaits.append(p)
                XCTAssertTrue(daemonThreadsWaitingOnFIFOs().isEmpty, "\(what): \(why), but a daemon thread waits on a FIFO", file: file, line: line)
                o = .failed(ESTALE)
                bytes = bytes.map { _ in [] }
            }
            if let bytes {
                checkRead(o, bytes, original: contents[i], what, allowed: allowed.union(a.extraErrnos), file: file, line: line)
            } else {
                assertRefused(o, what, allowed: allowed.union(a.extraErrnos), file: file, line: line)
            }
            checkCanaryAfter(what, file: file, line: line)
            if o == .hung { hangs += 1 }
            if hangs >= 3 { XCTFail("\(context): three hangs, the remaining attacks are skipped", file: file, line: line); break }
        }
        XCTAssertTrue(daemonThreadsWaitingOnFIFOs().isEmpty, "\(context): daemon threads wait on FIFOs: \(daemonThreadsWaitingOnFIFOs())", file: file, line: line)
        assertContained(context, file: file, line: line)
        // Release this process's threads that wait in the kernel for the FIFOs' other ends.
        for p in fifoWaits {
            for flags in [O_RDONLY | O_NONBLOCK, O_WRONLY | O_NONBLOCK] {
                if let fd = withDeadline(2, { open(p, flags) }), fd >= 0 { close(fd) }
            }
        }
    }

    /// Why an operation on `path` may wait without the daemon being stuck: the mount shows
    /// the entry as a FIFO now. nil if it does not.
    func kernelFIFOWait(_ path: String) -> String? {
        let mode = withDeadline(5) { () -> mode_t in var st = stat(); return lstat(path, &st) == 0 ? st.st_mode & S_IFMT : 0 }
        return mode == S_IFIFO ? "the mount now shows a FIFO, whose open waits for a partner" : nil
    }

    /// Threads of the mount's daemon blocked in a FIFO (opening one, or reading or writing it).
    func daemonThreadsWaitingOnFIFOs() -> [String] {
        var out = [String]()
        for pid in Harness.daemons(mnt) {
            let tasks = (try? FileManager.default.contentsOfDirectory(atPath: "/proc/\(pid)/task")) ?? []
            for t in tasks {
                let wchan = (try? String(contentsOfFile: "/proc/\(pid)/task/\(t)/wchan", encoding: .utf8)) ?? ""
                if wchan.contains("wait_for_partner") || wchan.contains("fifo_pipe") || wchan == "pipe_read" || wchan == "pipe_write" {
                    out.append("\(pid)/\(t): \(wchan)")
                }
            }
        }
        return out
    }

    // MARK: - a backing file replaced by a symlink

    func testBackingFileReplacedBySymlinkWhileMounted() throws {
        try attackFiles(plant: .symlink(canaryFile), beforeMount: false, "file → symlink to the canary")
    }

    func testBackingFileReplacedBySymlinkBeforeMount() throws {
        try attackFiles(plant: .symlink(canaryFile), beforeMount: true, "file → symlink to the canary, planted before the mount")
        let (o, names) = listWithDeadline(mnt)
        XCTAssertTrue(o.succeeded, "listing the root: \(o)")
        XCTAssertTrue(names.map(\.name).contains("good"))
    }

    func testBackingFileReplacedByRelativeSymlinkEscapingCipherDir() throws {
        // ../canary/secret from CIPHERDIR itself is the canary.
        try attackFiles(plant: .symlink("../canary/secret"), beforeMount: false, "file → relative symlink out of CIPHERDIR")
    }

    func testDeepBackingFileReplacedBySymlink() throws {
        try create("a", directory: true)
        try create("a/b", directory: true)
        try create("a/b/c", directory: true)
        try attackFiles(in: "a/b/c", plant: .symlink(canaryFile), beforeMount: false, "a/b/c/file → symlink")
    }

    func testDeepBackingFileReplacedBySymlinkBeforeMount() throws {
        try create("a", directory: true)
        try create("a/b", directory: true)
        try create("a/b/c", directory: true)
        try attackFiles(in: "a/b/c", plant: .symlink(canaryFile), beforeMount: true, "a/b/c/file → symlink before the mount")
    }

    // MARK: - a backing directory replaced by a symlink

    /// Everything one can do inside a directory, each tried in a directory of its own.
    static let directoryAttacks: [Attack] = [
        Attack(name: "ls") { d, _ in
            let (o, names) = listWithDeadline(d)
            // Names from the canary directory (or the bait in it) must not show up.
            // ("victim" and "subdir" are the directory's own names, and also what the bait's
            // names decrypt to: a listing of the bait is caught by the bait directory's atime.)
            let leaked = names.contains { ["secret", "sub", "xtsfs.dir"].contains($0.name) }
            return (o, leaked && o.succeeded ? Array("canary".utf8) : nil)
        },
        op("create") { d in let fd = open(d + "/new", O_CREAT | O_WRONLY, 0o644); if fd >= 0 { close(fd) }; return Int(fd) },
        op("mkdir") { Int(mkdir($0 + "/newdir", 0o755)) },
        op("symlink") { Int(symlink("x", $0 + "/newlink")) },
        op("mkfifo") { Int(mkfifo($0 + "/newfifo", 0o644)) },
        op("mknod") { Int(mknod($0 + "/newnode", S_IFREG | 0o644, 0)) },
        op("stat") { d in var st = stat(); return Int(lstat(d + "/victim", &st)) },
        Attack(name: "cat") { d, _ in readWithDeadline(d + "/victim") },
        op("chmod inside") { Int(chmod($0 + "/victim", 0o666)) },
        op("rename inside") { Int(rename($0 + "/victim", $0 + "/renamed")) },
        op("rm") { Int(unlink($0 + "/victim")) },
        op("rmdir") { Int(rmdir($0 + "/subdir")) },
        op("rmdir of it", extra: [ENOTEMPTY, ENOTDIR]) { Int(rmdir($0)) },
        op("setfattr on it", extra: [EOPNOTSUPP, EPERM]) { Int(setxattr($0, "user.attack", "v", 1, 0)) },
        op("chmod of it") { Int(chmod($0, 0o777)) },
        // A file of the mount moved into it must not land outside CIPHERDIR.
        Attack(name: "rename into it") { d, m in (sys { Int(rename(m + "/mover", d + "/moved")) }, nil) },
        Attack(name: "link into it", extraErrnos: [EPERM]) { d, m in (sys { Int(link(m + "/mover", d + "/linked")) }, nil) },
    ]

    enum DirLayout { case direct, depth3, intermediate }

    /// One directory per attack, laid out as `layout` says; its backing directory (or, for
    /// `.intermediate`, its parent's) becomes a symlink that leads into the canary, where
    /// copies of the backing entries the daemon would act on are waiting: the victim file's
    /// backing file, the directory's `xtsfs.dir` and the subdirectory. A daemon that follows
    /// the symlink finds something to read, change or remove there.
    func attackDirectories(_ layout: DirLayout, beforeMount: Bool, _ context: String, file: StaticString = #filePath, line: UInt = #line) throws {
        let attacks = Self.directoryAttacks
        if layout != .direct {
            try create("a", directory: true, file: file, line: line)
            if layout == .depth3 { try create("a/b", directory: true, file: file, line: line) }
        }
        var swaps = [(backing: String, target: String)]()
        var paths = [String]()
        for i in attacks.indices {
            let rel: String
            switch layout {
            case .direct: rel = "d\(i)"
            case .depth3: rel = "a/b/c\(i)"
            case .intermediate:
                try create("a/b\(i)", directory: true, file: file, line: line)
                rel = "a/b\(i)/c"
            }
            let d = try create(rel, directory: true, file: file, line: line)
            let v = try create(rel + "/victim", content: pattern(300, seed: UInt64(i)), file: file, line: line)
            let s = try create(rel + "/subdir", directory: true, file: file, line: line)
            let t = canary + "/t\(i)"
            XCTAssertEqual(mkdir(t, 0o755), 0, file: file, line: line)
            try FileManager.default.copyItem(atPath: v, toPath: t + "/" + (v as NSString).lastPathComponent)
            try FileManager.default.copyItem(atPath: d + "/xtsfs.dir", toPath: t + "/xtsfs.dir")
            XCTAssertEqual(mkdir(t + "/" + (s as NSString).lastPathComponent, 0o755), 0, file: file, line: line)
            try FileManager.default.copyItem(atPath: s + "/xtsfs.dir", toPath: t + "/" + (s as NSString).lastPathComponent + "/xtsfs.dir")
            if layout == .intermediate {
                // b becomes a symlink to the attacker's directory (inside the canary too, so it
                // is watched), where c's backing name is a symlink to the bait.
                let b = backing["a/b\(i)"]!
                let attacker = canary + "/attacker\(i)"
                XCTAssertEqual(mkdir(attacker, 0o755), 0, file: file, line: line)
                try FileManager.default.copyItem(atPath: b + "/xtsfs.dir", toPath: attacker + "/xtsfs.dir")
                XCTAssertEqual(symlink(t, attacker + "/" + (d as NSString).lastPathComponent), 0, file: file, line: line)
                swaps.append((b, attacker))
            } else {
                swaps.append((d, t))
            }
            paths.append(mnt + "/" + rel)
        }
        freezeCanary()
        if beforeMount { unmount(file: file, line: line) }
        for s in swaps {
            _ = moveAside(s.backing, file: file, line: line)
            XCTAssertEqual(symlink(s.target, s.backing), 0, file: file, line: line)
        }
        if beforeMount { mount(file: file, line: line) }
        var hangs = 0
        for (i, a) in attacks.enumerated() {
            let what = "\(context): \(a.name)"
            if a.name.hasSuffix("into it") { try write(mnt + "/mover", Array("mover".utf8)) }
            let (o, bytes) = a.run(paths[i], mnt)
            if let bytes {
                checkRead(o, bytes, original: pattern(300, seed: UInt64(i)), what, allowed: Self.refused.union(a.extraErrnos), file: file, line: line)
            } else {
                assertRefused(o, what, allowed: Self.refused.union(a.extraErrnos), file: file, line: line)
            }
            checkCanaryAfter(what, file: file, line: line)
            if o == .hung { hangs += 1 }
            if hangs >= 3 { XCTFail("\(context): three hangs, the remaining attacks are skipped", file: file, line: line); break }
        }
        assertContained(context, file: file, line: line)
    }

    func testBackingDirectoryReplacedBySymlink() throws {
        try attackDirectories(.direct, beforeMount: false, "dir → symlink into the canary")
    }

    func testBackingDirectoryReplacedBySymlinkBeforeMount() throws {
        try attackDirectories(.direct, beforeMount: true, "dir → symlink into the canary, before the mount")
    }

    func testDeepBackingDirectoryReplacedBySymlink() throws {
        try attackDirectories(.depth3, beforeMount: false, "a/b/c → symlink into the canary")
    }

    func testDeepBackingDirectoryReplacedBySymlinkBeforeMount() throws {
        try attackDirectories(.depth3, beforeMount: true, "a/b/c → symlink into the canary, before the mount")
    }

    /// Nothing of c itself is a symlink in CIPHERDIR, yet a path walk through b ends in the canary.
    func testIntermediateBackingDirectoryReplacedBySymlink() throws {
        try attackDirectories(.intermediate, beforeMount: false, "a/b → symlink, c there leads into the canary")
    }

    func testIntermediateBackingDirectoryReplacedBySymlinkBeforeMount() throws {
        try attackDirectories(.intermediate, beforeMount: true, "a/b → symlink before the mount")
    }

    // MARK: - xtsfs.dir replaced

    func testDirHeaderReplacedBySymlinkToCanary() throws {
        let d = try create("d", directory: true)
        try create("d/f", content: pattern(10, seed: 12))
        unmount()
        XCTAssertEqual(unlink(d + "/xtsfs.dir"), 0)
        XCTAssertEqual(symlink(canaryFile, d + "/xtsfs.dir"), 0)
        mount()
        let (o, names) = listWithDeadline(mnt + "/d")
        if o.succeeded { XCTAssertTrue(names.isEmpty, "a directory without a usable header lists \(names.map(\.name))") }
        else { assertRefused(o, "ls of a directory whose xtsfs.dir is a symlink") }
        assertReadRefused(mnt + "/d/f", original: pattern(10, seed: 12), "cat in that directory")
        let m = mnt
        assertRefused(sys32 { mkdir(m + "/d/x", 0o755) }, "mkdir in that directory", successOK: false)
        XCTAssertEqual(runWithTimeout(["ls", "-la", mnt + "/d"]).status == 137, false, "ls hung")
        assertContained("xtsfs.dir → symlink")
    }

    func testDirHeaderReplacedByFIFO() throws {
        let d = try create("d", directory: true)
        try create("d/f", content: pattern(10, seed: 13))
        unmount()
        XCTAssertEqual(unlink(d + "/xtsfs.dir"), 0)
        XCTAssertEqual(mkfifo(d + "/xtsfs.dir", 0o644), 0)
        mount()
        let ls = runWithTimeout(["ls", "-la", mnt + "/d"])
        XCTAssertNotEqual(ls.status, 137, "ls of a directory whose xtsfs.dir is a FIFO hung")
        let (o, names) = listWithDeadline(mnt + "/d")
        if o.succeeded { XCTAssertTrue(names.isEmpty, "lists \(names.map(\.name))") } else { assertRefused(o, "ls with a FIFO xtsfs.dir") }
        assertReadRefused(mnt + "/d/f", original: pattern(10, seed: 13), "cat in that directory")
        assertContained("xtsfs.dir → FIFO")
    }

    func testRootDirHeaderOrVolumeHeaderReplacedByFIFOOrSymlink() throws {
        unmount()
        for victim in ["xtsfs.dir", "xtsfs.header", "xtsfs.header2"] {
            for kind in ["fifo", "symlink"] {
                let p = cipher + "/" + victim
                let aside = moveAside(p)
                if kind == "fifo" { XCTAssertEqual(mkfifo(p, 0o644), 0) } else { XCTAssertEqual(symlink(canaryFile, p), 0) }
                let start = Date()
                let r = runWithTimeout([Harness.binary, "mount", cipher, mnt, "--passfile", passfile], seconds: 20)
                XCTAssertNotEqual(r.status, 137, "mount with \(victim) as a \(kind) hung")
                XCTAssertLessThan(Date().timeIntervalSince(start), 10, "mount with \(victim) as a \(kind) took long (status \(r.status): \(r.output))")
                if victim == "xtsfs.dir" {
                    XCTAssertNotEqual(r.status, 0, "mounted with a root xtsfs.dir that is a \(kind)")
                }
                Harness.forceUnmount(mnt)
                let s = runWithTimeout([Harness.binary, "status", cipher], seconds: 20)
                XCTAssertNotEqual(s.status, 137, "status with \(victim) as a \(kind) hung")
                XCTAssertFalse(s.output.contains("canary"), "status printed the canary")
                XCTAssertEqual(unlink(p), 0)
                XCTAssertEqual(rename(aside, p), 0)
                checkCanaryAfter("\(victim) as a \(kind)")
            }
        }
        mount()
        assertContained("headers restored")
    }

    // MARK: - long-name side files

    static let longA = String(repeating: "A", count: 200)
    static let longB = String(repeating: "B", count: 200)

    func sideFile(of backingPath: String) -> String { backingPath + ".name" }

    func testLongNameSideFileReplacedByFIFO() throws {
        let content = pattern(700, seed: 14)
        let l = try create(Self.longA, content: content)
        XCTAssertTrue((l as NSString).lastPathComponent.hasPrefix("xtsfs.long."), "a 200-byte name is a long name")
        let side = sideFile(of: l)
        XCTAssertEqual(unlink(side), 0)
        XCTAssertEqual(mkfifo(side, 0o644), 0)
        let ls = runWithTimeout(["ls", "-la", mnt])
        XCTAssertNotEqual(ls.status, 137, "ls hung on a FIFO side file")
        let (o, names) = listWithDeadline(mnt)
        XCTAssertTrue(o.succeeded, "ls of the root: \(o)")
        XCTAssertTrue(names.map(\.name).contains("good"))
        XCTAssertEqual(Set(names.map(\.name)).count, names.count, "a name listed twice: \(names.map(\.name))")
        let (r, bytes) = readWithDeadline(mnt + "/" + Self.longA)
        if r.succeeded { XCTAssertTrue(bytes == content, "the long name reads something else") }
        else { assertRefused(r, "reading a long name with a FIFO side file") }
        assertContained("side file → FIFO")
    }

    func testLongNameSideFileReplacedBySymlink() throws {
        let content = pattern(700, seed: 15)
        let l = try create(Self.longA, content: content)
        let side = sideFile(of: l)
        XCTAssertEqual(unlink(side), 0)
        XCTAssertEqual(symlink(canaryFile, side), 0)
        let (o, names) = listWithDeadline(mnt)
        XCTAssertTrue(o.succeeded, "ls of the root: \(o)")
        XCTAssertTrue(names.map(\.name).contains("good"))
        XCTAssertFalse(names.contains { $0.name.contains("canary") })
        XCTAssertFalse(names.map(\.name).contains(Self.longA), "listed under a side file that is a symlink")
        XCTAssertEqual(runWithTimeout(["ls", "-la", mnt]).status, 0)
        assertContained("side file → symlink")
    }

    /// Two long names in one directory whose side files are exchanged: each entry's side file
    /// now names the other. Neither may be listed (their hashes do not match), no name twice,
    /// and each name still opens its own content.
    func testLongNameSideFilesExchanged() throws {
        let a = pattern(1000, seed: 16), b = pattern(1500, seed: 17)
        let la = try create(Self.longA, content: a)
        let lb = try create(Self.longB, content: b)
        let tmp = scratch + "/side.tmp"
        XCTAssertEqual(rename(sideFile(of: la), tmp), 0)
        XCTAssertEqual(rename(sideFile(of: lb), sideFile(of: la)), 0)
        XCTAssertEqual(rename(tmp, sideFile(of: lb)), 0)
        unmount()
        mount()
        let (o, names) = listWithDeadline(mnt)
        XCTAssertTrue(o.succeeded, "\(o)")
        XCTAssertEqual(Set(names.map(\.name)).count, names.count, "a name listed twice")
        XCTAssertFalse(names.map(\.name).contains(Self.longA), "an entry listed under the name its side file claims, not its own")
        XCTAssertFalse(names.map(\.name).contains(Self.longB), "an entry listed under the name its side file claims, not its own")
        // d_ino of any listed name must be the inode that name opens.
        for n in names {
            var st = stat()
            if lstat(mnt + "/" + n.name, &st) == 0 { XCTAssertEqual(UInt64(st.st_ino), n.ino, "readdir and stat disagree for \(n.name.prefix(20))…") }
        }
        let (ra, ba) = readWithDeadline(mnt + "/" + Self.longA)
        if ra.succeeded { XCTAssertTrue(ba == a, "A reads B's content") } else { assertRefused(ra, "read A") }
        let (rb, bb) = readWithDeadline(mnt + "/" + Self.longB)
        if rb.succeeded { XCTAssertTrue(bb == b, "B reads A's content") } else { assertRefused(rb, "read B") }
        assertContained("side files exchanged")
    }

    /// B's side file becomes a copy of A's: A must not be listed twice, B's entry is skipped.
    func testLongNameSideFileDuplicated() throws {
        let a = pattern(1000, seed: 18), b = pattern(1500, seed: 19)
        let la = try create(Self.longA, content: a)
        let lb = try create(Self.longB, content: b)
        XCTAssertEqual(unlink(sideFile(of: lb)), 0)
        try FileManager.default.copyItem(atPath: sideFile(of: la), toPath: sideFile(of: lb))
        unmount()
        mount()
        let (o, names) = listWithDeadline(mnt)
        XCTAssertTrue(o.succeeded, "\(o)")
        XCTAssertEqual(names.filter { $0.name == Self.longA }.count, 1, "A must be listed exactly once (its own side file matches)")
        XCTAssertEqual(Set(names.map(\.name)).count, names.count, "a name listed twice: \(names.count) entries")
        if let entry = names.first(where: { $0.name == Self.longA }) {
            var st = stat()
            XCTAssertEqual(lstat(mnt + "/" + Self.longA, &st), 0)
            XCTAssertEqual(UInt64(st.st_ino), entry.ino, "A listed with B's inode")
        }
        let (ra, ba) = readWithDeadline(mnt + "/" + Self.longA)
        XCTAssertEqual(ra, .ok(a.count))
        XCTAssertTrue(ba == a, "A reads B's content")
        assertContained("side file duplicated")
    }

    // MARK: - internal files of odd types and sizes

    /// `xtsfs.dir` and a long name's side file as a directory, or as a sparse file of
    /// 2^40 bytes: internal files are read only if they are regular files of a bounded
    /// size, so each is damage (EIO or a skipped entry), quickly.
    func testInternalFilesAsDirectoriesOrHugeSparseFiles() throws {
        let long = String(repeating: "L", count: 200)
        for (i, kind) in ["directory", "huge"].enumerated() {
            let d = try create("d\(i)", directory: true)
            try create("d\(i)/f", content: pattern(10, seed: 40))
            let l = try create("d\(i)/" + long, content: pattern(20, seed: 41))
            unmount()
            for item in [d + "/xtsfs.dir", l + ".name"] {
                _ = moveAside(item)
                if kind == "directory" { XCTAssertEqual(mkdir(item, 0o755), 0) }
                else {
                    let fd = open(item, O_CREAT | O_WRONLY, 0o444)
                    XCTAssertEqual(ftruncate(fd, off_t(1) << 40), 0)
                    close(fd)
                }
            }
            mount()
            let start = Date()
            let (o, names) = listWithDeadline(mnt + "/d\(i)")
            if o.succeeded { XCTAssertTrue(names.isEmpty, "\(kind): a directory without a usable header lists \(names.map { String($0.name.prefix(10)) })") }
            else { assertRefused(o, "\(kind) xtsfs.dir: ls") }
            assertReadRefused(mnt + "/d\(i)/f", original: pattern(10, seed: 40), "\(kind) xtsfs.dir: cat")
            XCTAssertLessThan(Date().timeIntervalSince(start), 5, "\(kind): internal files must be bounded reads")
            assertContained("\(kind) internal files")
        }
        // And a side file of the right type but huge, in a healthy directory.
        let l = try create(long, content: pattern(30, seed: 42))
        let side = l + ".name"
        _ = moveAside(side)
        let fd = open(side, O_CREAT | O_WRONLY, 0o444)
        XCTAssertEqual(ftruncate(fd, off_t(1) << 40), 0)
        close(fd)
        let (o, names) = listWithDeadline(mnt)
        XCTAssertTrue(o.succeeded, "\(o)")
        XCTAssertFalse(names.map(\.name).contains(long), "listed through a 1 TiB side file")
        XCTAssertTrue(names.map(\.name).contains("good"))
        assertContained("huge side file")
    }

    // MARK: - planted temporary files

    /// The side file of a long name is written as `<side>.tmp` and renamed. Its name is
    /// predictable once the long name has existed, so `<side>.tmp` may be waiting as a
    /// symlink to the canary, a FIFO or a directory when the same name is created again.
    func testPlantedTemporarySideFile() throws {
        for (i, kind) in ["symlink", "fifo", "directory"].enumerated() {
            let name = String(repeating: Character(UnicodeScalar(UInt8(65 + i))), count: 200)
            let l = try create(name, content: [1])
            XCTAssertEqual(unlink(mnt + "/" + name), 0)
            let tmp = l + ".name.tmp"
            switch kind {
            case "symlink": XCTAssertEqual(symlink(canaryFile, tmp), 0)
            case "fifo": XCTAssertEqual(mkfifo(tmp, 0o644), 0)
            default: XCTAssertEqual(mkdir(tmp, 0o755), 0); try write(tmp + "/inside", [1])
            }
            let p = mnt + "/" + name
            let content = pattern(500, seed: UInt64(50 + i))
            let o = sys {
                let fd = open(p, O_CREAT | O_WRONLY | O_EXCL, 0o644)
                if fd < 0 { return -1 }
                defer { close(fd) }
                return content.withUnsafeBytes { Glibc.write(fd, $0.baseAddress, $0.count) }
            }
            XCTAssertNotEqual(o, .hung, "\(kind) .tmp: creating the long name hung")
            if o.succeeded {
                XCTAssertEqual(readWithDeadline(p).1, content, "\(kind) .tmp: the new file reads back")
                XCTAssertTrue(listWithDeadline(mnt).1.map(\.name).contains(name), "\(kind) .tmp: listed")
            } else {
                assertRefused(o, "\(kind) .tmp: create", allowed: [EIO, EEXIST, EISDIR, ENOTEMPTY])
            }
            checkCanaryAfter("\(kind) planted as the side file's .tmp")
        }
        assertContained("planted .tmp files")
    }

    // MARK: - the link store of long symlink targets

    static let longTarget = String(repeating: "t/", count: 1700) + "end" // 3403 bytes: stored in xtsfs.links

    /// Creates a symlink with a target long enough for the link store; returns the store file.
    func storedLink(_ name: String, target: String = HostileCipherDirTests.longTarget, file: StaticString = #filePath, line: UInt = #line) -> String? {
        let store = cipher + "/xtsfs.links"
        let before = backingListing(store)
        XCTAssertEqual(symlink(target, mnt + "/" + name), 0, "symlink with a \(target.utf8.count)-byte target: errno \(errno)", file: file, line: line)
        let new = backingListing(store).subtracting(before).filter { !$0.hasSuffix(".tmp") }
        guard new.count == 1, let n = new.first else {
            XCTFail("expected one new file in xtsfs.links, found \(new)", file: file, line: line)
            return nil
        }
        return store + "/" + n
    }

    func readlinkWithDeadline(_ path: String) -> (Outcome, String) {
        withDeadline { () -> (Outcome, String) in
            var buf = [CChar](repeating: 0, count: 8192)
            let n = readlink(path, &buf, buf.count)
            if n < 0 { return (.failed(Glibc.errno), "") }
            return (.ok(n), String(decoding: buf.prefix(n).map { UInt8(bitPattern: $0) }, as: UTF8.self))
        } ?? (.hung, "")
    }

    func testLinkStoreFileReplaced() throws {
        let other = String(repeating: "o/", count: 1700) + "other"
        guard let s1 = storedLink("l1"), let s2 = storedLink("l2"), let s3 = storedLink("l3"), let s4 = storedLink("l4"),
              let s5 = storedLink("l5", target: other) else { return }
        XCTAssertEqual(readlinkWithDeadline(mnt + "/l1").1, Self.longTarget)
        // l1: symlink to the canary; l2: FIFO; l3: directory; l4: l5's store file (right type, wrong hash).
        _ = plantSymlink(at: s1, to: canaryFile)
        _ = moveAside(s2); XCTAssertEqual(mkfifo(s2, 0o444), 0)
        _ = moveAside(s3); XCTAssertEqual(mkdir(s3, 0o755), 0)
        _ = moveAside(s4); try FileManager.default.copyItem(atPath: s5, toPath: s4)
        for (name, what) in [("l1", "store file → symlink"), ("l2", "store file → FIFO"), ("l3", "store file → directory"), ("l4", "store file of another target")] {
            let (o, target) = readlinkWithDeadline(mnt + "/" + name)
            XCTAssertNotEqual(target, other, "\(what): readlink gave another link's target")
            XCTAssertFalse(target.contains("canary"), "\(what): readlink gave the canary")
            if o.succeeded { XCTAssertEqual(target, Self.longTarget, "\(what): readlink succeeded with something else") }
            else { assertRefused(o, "\(what): readlink", allowed: [EIO]) }
            checkCanaryAfter(what)
        }
        XCTAssertEqual(readlinkWithDeadline(mnt + "/l5").1, other, "an intact stored target still reads")
        // Removing the last name removes its store file: never through the planted symlink.
        let m = mnt
        XCTAssertEqual(sys32 { unlink(m + "/l1") }, .ok(0))
        assertContained("link store files replaced")
    }

    /// xtsfs.links itself replaced by a symlink to a directory outside CIPHERDIR that holds
    /// copies of the store files: reading, creating and removing stored targets must not
    /// touch that directory.
    func testLinkStoreDirectoryReplacedBySymlink() throws {
        guard let s1 = storedLink("l1"), storedLink("l2") != nil else { return }
        let bait = canary + "/links"
        try FileManager.default.copyItem(atPath: cipher + "/xtsfs.links", toPath: bait)
        freezeCanary()
        XCTAssertNotNil(s1)
        for beforeMount in [false, true] {
            if beforeMount { unmount() }
            if beforeMount == false { _ = plantSymlink(at: cipher + "/xtsfs.links", to: bait) }
            if beforeMount { mount() }
            let (o, target) = readlinkWithDeadline(mnt + "/l1")
            if o.succeeded { XCTAssertEqual(target, Self.longTarget) } else { assertRefused(o, "readlink through a symlinked store", allowed: [EIO]) }
            checkCanaryAfter("readlink with xtsfs.links a symlink (before mount: \(beforeMount))")
            let m = mnt
            let created = sys32 { symlink(String(repeating: "n/", count: 1800), m + "/new\(beforeMount)") }
            assertRefused(created, "new stored target with xtsfs.links a symlink", allowed: [EIO, ENOENT, ELOOP, ESTALE, ENOTDIR])
            checkCanaryAfter("symlink with xtsfs.links a symlink (before mount: \(beforeMount))")
            assertRefused(sys32 { unlink(m + "/l2") }, "unlink of a stored link", allowed: [EIO, ENOENT, ELOOP, ESTALE, ENOTDIR])
            checkCanaryAfter("unlink with xtsfs.links a symlink (before mount: \(beforeMount))")
        }
        assertContained("xtsfs.links → symlink")
    }

    // MARK: - extended attributes planted in the backing

    func testBackingXattrsMovedOrForged() throws {
        let b = try create("f", content: [1])
        let m = mnt
        XCTAssertEqual(Xattr.set(m + "/f", "user.a", Array("value of a".utf8)), 0, "errno \(errno)")
        XCTAssertEqual(Xattr.set(m + "/f", "user.b", Array("value of b".utf8)), 0, "errno \(errno)")
        unmount()
        guard case .success(let names) = Xattr.list(b, follow: false), names.count == 2 else { return XCTFail("two backing xattrs expected") }
        let va = try Xattr.get(b, names[0], follow: false).get(), vb = try Xattr.get(b, names[1], follow: false).get()
        // Swap the two values between the two (encrypted) names; add a foreign attribute and one with a garbage value.
        XCTAssertEqual(Xattr.set(b, names[0], vb), 0)
        XCTAssertEqual(Xattr.set(b, names[1], va), 0)
        XCTAssertEqual(Xattr.set(b, "user.plaintext-planted", Array("planted".utf8)), 0)
        mount()
        for n in ["user.a", "user.b"] {
            let r = Xattr.get(m + "/f", n)
            XCTAssertEqual(r, .failure(Errno(EIO)), "\(n): a value moved to another attribute name must not open")
        }
        let listed = Xattr.list(m + "/f")
        if case .success(let l) = listed {
            XCTAssertFalse(l.contains { $0.contains("planted") }, "a backing attribute that does not decrypt is listed: \(l)")
        } else { XCTFail("listxattr: \(listed)") }
        XCTAssertEqual(Xattr.get(m + "/f", "user.plaintext-planted"), .failure(Errno(ENODATA)))
        // Garbage and huge garbage under a valid encrypted name.
        unmount()
        XCTAssertEqual(Xattr.set(b, names[0], [1, 2, 3]), 0)
        XCTAssertEqual(Xattr.set(b, names[1], pattern(3000, seed: 43)), 0)
        mount()
        for n in ["user.a", "user.b"] {
            XCTAssertEqual(Xattr.get(m + "/f", n), .failure(Errno(EIO)), "\(n): a garbage value")
        }
        XCTAssertEqual(Xattr.set(m + "/f", "user.a", Array("rewritten".utf8)), 0, "a damaged attribute can be overwritten")
        XCTAssertEqual(Xattr.get(m + "/f", "user.a"), .success(Array("rewritten".utf8)))
        assertContained("xattrs moved or forged")
    }

    // MARK: - a directory swap racing with the daemon

    /// A thread swaps a backing file with a FIFO and back while this thread opens
    /// (non-blocking, so the kernel's own FIFO semantics never make it wait), reads, writes
    /// and truncates through the mount: a daemon that checks the type and then opens by
    /// name would block on the FIFO that arrived in between.
    func testFIFOSwapRacesWithOperations() throws {
        let b = try create("racy", content: pattern(2000, seed: 45))
        let aside = scratch + "/racy-aside"
        let stop = DeadlineStop()
        let swapper = Thread {
            let end = Date().addingTimeInterval(2)
            var swaps = 0
            while Date() < end {
                guard rename(b, aside) == 0 else { break }
                _ = mkfifo(b, 0o666)
                usleep(200)
                _ = unlink(b)
                _ = rename(aside, b)
                usleep(200)
                swaps += 1
            }
            stop.finish(swaps: swaps)
        }
        swapper.start()
        let p = mnt + "/racy"
        let rounds = withDeadline(60) { () -> Int in
            var i = 0
            while !stop.finished {
                i += 1
                for flags in [O_RDONLY, O_WRONLY, O_RDWR, O_WRONLY | O_APPEND, O_WRONLY | O_TRUNC] {
                    let fd = open(p, flags | O_NONBLOCK)
                    if fd < 0 { continue }
                    var buf = [UInt8](repeating: 0, count: 512)
                    if flags == O_RDONLY || flags == O_RDWR { _ = Glibc.read(fd, &buf, buf.count) }
                    if flags != O_RDONLY { _ = Glibc.write(fd, "w", 1) }
                    close(fd)
                }
                _ = truncate(p, off_t(1000 + i % 50))
                _ = chmod(p, 0o644)
            }
            return i
        }
        XCTAssertNotNil(rounds, "operations during the FIFO swap race hung")
        XCTAssertGreaterThan(rounds ?? 0, 20, "too few rounds of operations during the race")
        XCTAssertTrue(stop.wait(seconds: 10), "the swapper did not finish")
        XCTAssertGreaterThan(stop.swaps, 100, "too few swaps to race with anything")
        XCTAssertEqual(daemonThreadsWaitingOnFIFOs(), [], "daemon threads blocked on a FIFO after the race")
        var st = stat()
        if lstat(b, &st) == 0 && st.st_mode & S_IFMT == S_IFIFO { _ = unlink(b) }
        if access(aside, F_OK) == 0 { _ = rename(aside, b) }
        assertContained("FIFO swap race (\(stop.swaps) swaps, \(rounds ?? -1) rounds)")
    }

    /// As the file race, for a directory: a thread swaps a backing directory with a symlink
    /// into the canary (which holds copies of its entries) while this thread creates,
    /// lists, renames and removes inside it through the mount.
    func testDirectorySymlinkSwapRacesWithOperations() throws {
        let d = try create("racy", directory: true)
        let v = try create("racy/victim", content: pattern(100, seed: 44))
        let t = canary + "/bait"
        XCTAssertEqual(mkdir(t, 0o755), 0)
        try FileManager.default.copyItem(atPath: v, toPath: t + "/" + (v as NSString).lastPathComponent)
        try FileManager.default.copyItem(atPath: d + "/xtsfs.dir", toPath: t + "/xtsfs.dir")
        freezeCanary()
        let aside = scratch + "/racy-aside"
        let stop = DeadlineStop()
        let swapper = Thread {
            let end = Date().addingTimeInterval(2)
            var swaps = 0
            while Date() < end {
                guard rename(d, aside) == 0 else { break }
                _ = symlink(t, d)
                usleep(200)
                _ = unlink(d)
                _ = rename(aside, d)
                usleep(200)
                swaps += 1
            }
            stop.finish(swaps: swaps)
        }
        swapper.start()
        let p = mnt + "/racy"
        let ops = withDeadline(60) { () -> Int in
            var i = 0
            while !stop.finished {
                i += 1
                let fd = open(p + "/new\(i % 5)", O_CREAT | O_WRONLY, 0o644)
                if fd >= 0 { _ = Glibc.write(fd, "x", 1); close(fd) }
                _ = mkdir(p + "/dir\(i % 3)", 0o755)
                _ = rmdir(p + "/dir\((i + 1) % 3)")
                _ = rename(p + "/new\(i % 5)", p + "/moved\(i % 5)")
                _ = unlink(p + "/moved\((i + 2) % 5)")
                _ = unlink(p + "/victim")
                _ = chmod(p, i % 2 == 0 ? 0o777 : 0o755)
                if let dir = opendir(p) { while readdir(dir) != nil {}; closedir(dir) }
            }
            return i
        }
        XCTAssertNotNil(ops, "operations during the directory swap race hung")
        XCTAssertGreaterThan(ops ?? 0, 20, "too few rounds of operations during the race")
        XCTAssertTrue(stop.wait(seconds: 10), "the swapper did not finish")
        XCTAssertGreaterThan(stop.swaps, 100, "too few swaps to race with anything")
        var st = stat()
        if lstat(d, &st) == 0 && st.st_mode & S_IFMT == S_IFLNK { _ = unlink(d) }
        if access(aside, F_OK) == 0 { _ = rename(aside, d) }
        assertContained("directory swap race (\(stop.swaps) swaps, \(ops ?? -1) rounds)")
    }

    // MARK: - sizes, devices, FIFOs, wrong types

    func testBackingFileSparseNearTwoToTheSixtyThree() throws {
        guard geteuid() == 0 else { throw XCTSkip("needs root to mount a tmpfs (ext4 cannot hold a file of 2^63 bytes)") }
        unmount()
        let small = scratch + "/small"
        XCTAssertEqual(mkdir(small, 0o755), 0)
        XCTAssertEqual(Harness.shell("mount -t tmpfs -o size=16m tmpfs '\(small)'"), 0)
        defer {
            Harness.forceUnmount(mnt)
            _ = Harness.shell("umount '\(small)'")
        }
        cipher = small + "/cipher"
        initVolume()
        mount()
        backing = ["": cipher]
        try create("good", content: good)
        let content = pattern(100, seed: 20)
        let b = try create("huge", content: content)
        try create("huge2", content: content)
        unmount()
        // Keep the first 32 bytes (a real file header), make the rest a hole up to nearly 2^63.
        let r = truncate(b, off_t(9_223_372_036_854_775_000))
        guard r == 0 else { throw XCTSkip("the backing filesystem refused a size near 2^63: errno \(errno)") }
        XCTAssertEqual(truncate(backing["huge2"]!, off_t(Int64.max)), 0)
        mount()
        for name in ["huge", "huge2"] {
            let p = mnt + "/" + name
            let st = sys32 { var st = stat(); return stat(p, &st) }
            XCTAssertNotEqual(st, .hung)
            if !st.succeeded { assertRefused(st, "stat \(name)", allowed: [EIO, EOVERFLOW, EFBIG]) }
            let size = withDeadline { () -> Int64 in var st = stat(); return stat(p, &st) == 0 ? Int64(st.st_size) : -1 } ?? -1
            let allowed: Set<Int32> = [EIO, EFBIG, EOVERFLOW, EINVAL]
            assertRefused(sys {
                let fd = open(p, O_RDONLY)
                if fd < 0 { return -1 }
                defer { close(fd) }
                var buf = [UInt8](repeating: 0, count: 4096)
                return pread(fd, &buf, buf.count, 0)
            }, "\(name): read at 0", allowed: allowed)
            if size > 100 {
                assertRefused(sys {
                    let fd = open(p, O_RDONLY)
                    if fd < 0 { return -1 }
                    defer { close(fd) }
                    var buf = [UInt8](repeating: 0, count: 4096)
                    return pread(fd, &buf, buf.count, off_t(size - 100))
                }, "\(name): read at the end", allowed: allowed)
            }
            XCTAssertNotEqual(runWithTimeout(["sh", "-c", "head -c 100000 '\(p)' >/dev/null"]).status, 137, "head hung")
            XCTAssertNotEqual(runWithTimeout(["sh", "-c", "tail -c 100 '\(p)' >/dev/null"]).status, 137, "tail hung")
            assertRefused(sys {
                let fd = open(p, O_WRONLY)
                if fd < 0 { return -1 }
                defer { close(fd) }
                return pwrite(fd, "x", 1, 10)
            }, "\(name): write", allowed: allowed)
            assertRefused(sys32 { truncate(p, 50) }, "\(name): truncate down", allowed: allowed)
            XCTAssertFalse(Harness.daemons(mnt).isEmpty, "\(name): the daemon died")
        }
        XCTAssertEqual(readWithDeadline(mnt + "/good").1, good)
        assertContained("size near 2^63")
    }

    /// A device node (/dev/null's numbers) or a FIFO where the daemon created a regular file.
    /// A FUSE mount is nodev; EACCES/ENXIO come from the kernel when it sees the node as what it is.
    func testDeviceNodePlantedWhileMounted() throws {
        // The daemon answers ESTALE; the kernel looks the name up again and finds a device:
        // EACCES for opening it (nodev), EINVAL for truncating it, as on any filesystem.
        try attackFiles(plant: .device, beforeMount: false, allowed: Self.refused.union([EACCES, ENXIO, EINVAL]), "file → /dev/null's device node")
    }

    func testDeviceNodePlantedBeforeMount() throws {
        // Seen as a device after a fresh lookup: truncate(2) of a device is EINVAL from the kernel.
        try attackFiles(plant: .device, beforeMount: true, allowed: Self.refused.union([EACCES, ENXIO, EINVAL]), "file → device node before the mount")
    }

    func testFIFOPlantedWhileMounted() throws {
        // Opening a FIFO through the mount waits for its other end (see attackFiles): 3 s is enough to tell.
        callDeadline = 3
        defer { callDeadline = 10 }
        try attackFiles(plant: .fifo, beforeMount: false, allowed: Self.refused.union([ENXIO, EINVAL]), "file → FIFO")
    }

    func testFIFOPlantedBeforeMount() throws {
        // Seen as a FIFO after a fresh lookup: opening it for reading through the mount waits
        // for a writer, as any FIFO does, so only operations that do not open it are tried.
        try create("victim", content: pattern(100, seed: 30))
        let b = backing["victim"]!
        unmount()
        _ = moveAside(b)
        XCTAssertEqual(mkfifo(b, 0o666), 0)
        mount()
        let p = mnt + "/victim"
        let st = withDeadline { () -> mode_t in var st = stat(); return lstat(p, &st) == 0 ? st.st_mode & S_IFMT : 0 }
        XCTAssertNotNil(st, "lstat hung")
        assertRefused(sys32 { truncate(p, 10) }, "truncate of a planted FIFO", allowed: Self.refused.union([EINVAL, ENXIO]))
        assertRefused(sys32 { chmod(p, 0o600) }, "chmod of a planted FIFO")
        let nb = sys { let fd = open(p, O_RDONLY | O_NONBLOCK); if fd >= 0 { close(fd) }; return Int(fd) }
        XCTAssertNotEqual(nb, .hung, "a non-blocking open of a FIFO hung")
        assertContained("FIFO before the mount")
    }

    func testBackingFileReplacedByDirectory() throws {
        try attackFiles(plant: .directory, beforeMount: false, allowed: Self.refused.union([EISDIR]), "file → directory")
    }

    func testBackingDirectoryReplacedByRegularFile() throws {
        let d = try create("d", directory: true)
        let content = pattern(100, seed: 22)
        try create("d/f", content: content)
        _ = moveAside(d)
        try FileManager.default.copyItem(atPath: backing["good"] ?? cipher + "/missing", toPath: d)
        let allowed = Self.refused.union([ENOTDIR])
        let (o, names) = listWithDeadline(mnt + "/d")
        if o.succeeded { XCTAssertTrue(names.isEmpty, "\(names.map(\.name))") } else { assertRefused(o, "ls", allowed: allowed) }
        assertReadRefused(mnt + "/d/f", original: content, "read inside", allowed: allowed)
        let m = mnt
        assertRefused(sys32 { let fd = open(m + "/d/new", O_CREAT | O_WRONLY, 0o644); if fd >= 0 { close(fd) }; return fd }, "create inside", allowed: allowed, successOK: false)
        assertRefused(sys32 { mkdir(m + "/d/sub", 0o755) }, "mkdir inside", allowed: allowed, successOK: false)
        assertRefused(sys32 { rmdir(m + "/d") }, "rmdir", allowed: allowed)
        XCTAssertNotEqual(runWithTimeout(["ls", "-la", mnt + "/d"]).status, 137)
        assertContained("dir → regular file")
    }

    func testBackingDirectoryReplacedByRegularFileBeforeMount() throws {
        let d = try create("d", directory: true)
        try create("d/f", content: pattern(100, seed: 23))
        unmount()
        _ = moveAside(d)
        try FileManager.default.copyItem(atPath: backing["good"] ?? cipher + "/missing", toPath: d)
        mount()
        // Now it is simply a file (whose content is good's): reading it must not crash anything.
        let allowed = Self.refused.union([ENOTDIR])
        let (o, _) = listWithDeadline(mnt + "/d")
        if !o.succeeded { assertRefused(o, "ls", allowed: allowed) }
        let m = mnt
        assertRefused(sys32 { var st = stat(); return stat(m + "/d/f", &st) }, "stat inside", allowed: allowed, successOK: false)
        assertContained("dir → regular file before mount")
    }

    // MARK: - a swap racing with the daemon

    /// For about two seconds a thread swaps a backing file with a symlink to the canary and
    /// back, as fast as it can, while this thread chmods, reads, writes, truncates and
    /// chowns the file through the mount. Whatever interleaving happens, the canary stays.
    func testSymlinkSwapRacesWithOperations() throws {
        let content = pattern(2000, seed: 24)
        let b = try create("racy", content: content)
        let aside = scratch + "/racy-aside"
        let target = canaryFile
        let stop = DeadlineStop()
        let swapper = Thread {
            let end = Date().addingTimeInterval(2)
            var swaps = 0
            while Date() < end {
                guard rename(b, aside) == 0 else { break }
                _ = symlink(target, b)
                usleep(200)
                _ = unlink(b)
                _ = rename(aside, b)
                usleep(200)
                swaps += 1
            }
            stop.finish(swaps: swaps)
        }
        swapper.start()
        let p = mnt + "/racy"
        let ops = withDeadline(60) { () -> [String] in
            var problems = [String]()
            var i = 0
            while !stop.finished {
                i += 1
                _ = chmod(p, i % 2 == 0 ? 0o666 : 0o644)
                _ = chown(p, uid_t(1000 + i % 7), gid_t(1000 + i % 5))
                let fd = open(p, O_RDONLY)
                if fd >= 0 {
                    var buf = [UInt8](repeating: 0, count: 4096)
                    let n = Glibc.read(fd, &buf, buf.count)
                    if n > 0 && Array(buf.prefix(n)).contains(subsequence: Array("canary".utf8)) { problems.append("read returned the canary") }
                    close(fd)
                }
                let w = open(p, O_WRONLY | O_APPEND)
                if w >= 0 { _ = Glibc.write(w, "z", 1); close(w) }
                _ = truncate(p, off_t(1000 + i % 100))
                var times = [timespec(tv_sec: 1_900_000_000, tv_nsec: 0), timespec(tv_sec: 1_900_000_000, tv_nsec: 0)]
                _ = utimensat(AT_FDCWD, p, &times, 0)
                _ = setxattr(p, "user.race", "r", 1, 0)
            }
            return problems + ["iterations \(i)"]
        }
        XCTAssertNotNil(ops, "operations during the swap race hung")
        if let ops {
            let problems: [String] = ops.filter { !$0.hasPrefix("iterations") }
            XCTAssertTrue(problems.isEmpty, "\(ops)")
        }
        XCTAssertTrue(stop.wait(seconds: 10), "the swapper did not finish")
        XCTAssertGreaterThan(stop.swaps, 100, "too few swaps to race with anything")
        // Leave the backing file in place whatever the swapper's last step was.
        var st = stat()
        if lstat(b, &st) == 0 && st.st_mode & S_IFMT == S_IFLNK { _ = unlink(b) }
        if access(aside, F_OK) == 0 { _ = rename(aside, b) }
        assertContained("swap race (\(stop.swaps) swaps, \(ops?.last ?? "?"))")
    }
}

/// Shared between the swapper thread and the test.
final class DeadlineStop: @unchecked Sendable {
    private let lock = NSLock()
    private let done = DispatchSemaphore(value: 0)
    private var _finished = false
    private var _swaps = 0
    var finished: Bool { lock.withLock { _finished } }
    var swaps: Int { lock.withLock { _swaps } }
    func finish(swaps: Int) {
        lock.withLock { _finished = true; _swaps = swaps }
        done.signal()
    }
    func wait(seconds: Double) -> Bool { finished || done.wait(timeout: .now() + seconds) == .success }
}
