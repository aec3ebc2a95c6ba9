import CSysShim
#if canImport(Glibc)
import Glibc
#endif

/// Thin wrappers over the system calls xtsfs uses: each retries EINTR and
/// turns -1 into a thrown `SystemError`. Nothing above this layer calls libc
/// file functions directly.
public enum Sys {
    /// utimensat's special nanosecond values (macros, not imported).
    public static let utimeNow = (1 << 30) - 1
    public static let utimeOmit = (1 << 30) - 2

    @inline(__always)
    public static func check<T: BinaryInteger>(_ op: @autoclosure () -> String, _ body: () -> T) throws(SystemError) -> T {
        while true {
            let r = body()
            if r >= 0 { return r }
            let e = Glibc.errno
            if e == EINTR { continue }
            throw SystemError(e, op())
        }
    }

    public static func open(_ path: String, _ flags: Int32, _ mode: mode_t = 0) throws(SystemError) -> Int32 {
        try check("open \(path)") { Glibc.open(path, flags | O_CLOEXEC, mode) }
    }

    public static func openat(_ dirfd: Int32, _ name: String, _ flags: Int32, _ mode: mode_t = 0) throws(SystemError) -> Int32 {
        try check("openat \(name)") { Glibc.openat(dirfd, name, flags | O_CLOEXEC, mode) }
    }

    public static func close(_ fd: Int32) {
        // close(2) must not be retried on EINTR on Linux: the descriptor is gone either way.
        _ = Glibc.close(fd)
    }

    /// Reads up to `count` bytes at `offset`, looping over short reads; returns the number
    /// read, which is smaller than `count` only at end of file.
    public static func pread(_ fd: Int32, _ buffer: UnsafeMutableRawPointer, _ count: Int, _ offset: Int64) throws(SystemError) -> Int {
        var done = 0
        while done < count {
            let n = try check("pread") { Glibc.pread(fd, buffer + done, count - done, off_t(offset) + off_t(done)) }
            if n == 0 { break }
            done += n
        }
        return done
    }

    /// Writes all `count` bytes at `offset`.
    public static func pwrite(_ fd: Int32, _ buffer: UnsafeRawPointer, _ count: Int, _ offset: Int64) throws(SystemError) {
        var done = 0
        while done < count {
            let n = try check("pwrite") { Glibc.pwrite(fd, buffer + done, count - done, off_t(offset) + off_t(done)) }
            done += n
        }
    }

    public static func fstat(_ fd: Int32) throws(SystemError) -> stat {
        var st = stat()
        _ = try check("fstat") { Glibc.fstat(fd, &st) }
        return st
    }

    /// The backing object's device, inode and birth time (statx on `fd`, which may be
    /// O_PATH); nil where the filesystem does not record a birth time. Together they name
    /// one object across its whole life: an inode number freed and reused later gets a
    /// new birth time.
    public static func birthIdentity(_ fd: Int32) -> BirthIdentity? {
        var b = BirthIdentity(dev: 0, ino: 0, seconds: 0, nanoseconds: 0)
        guard xtsfs_birth_identity(fd, &b.dev, &b.ino, &b.seconds, &b.nanoseconds) == 0 else { return nil }
        return b
    }

    public static func lstat(_ path: String) throws(SystemError) -> stat {
        var st = stat()
        _ = try check("lstat \(path)") { Glibc.lstat(path, &st) }
        return st
    }

    public static func ftruncate(_ fd: Int32, _ length: Int64) throws(SystemError) {
        _ = try check("ftruncate") { Glibc.ftruncate(fd, off_t(length)) }
    }

    public static func fsync(_ fd: Int32) throws(SystemError) {
        _ = try check("fsync") { Glibc.fsync(fd) }
    }

    public static func fdatasync(_ fd: Int32) throws(SystemError) {
        _ = try check("fdatasync") { Glibc.fdatasync(fd) }
    }

    public static func rename(_ from: String, _ to: String) throws(SystemError) {
        _ = try check("rename \(from)") { Glibc.rename(from, to) }
    }

    /// rename(2) that refuses to replace an existing target (RENAME_NOREPLACE).
    public static func renameNoReplace(_ from: String, _ to: String) throws(SystemError) {
        _ = try check("rename \(from)") { xts_renameat2(from, to, UInt32(XTS_RENAME_NOREPLACE)) }
    }

    public static func unlink(_ path: String) throws(SystemError) {
        _ = try check("unlink \(path)") { Glibc.unlink(path) }
    }

    public static func mkdir(_ path: String, _ mode: mode_t) throws(SystemError) {
        _ = try check("mkdir \(path)") { Glibc.mkdir(path, mode) }
    }

    public static func rmdir(_ path: String) throws(SystemError) {
        _ = try check("rmdir \(path)") { Glibc.rmdir(path) }
    }

    public static func symlink(_ target: String, _ path: String) throws(SystemError) {
        _ = try check("symlink \(path)") { Glibc.symlink(target, path) }
    }

    public static func readlink(_ path: String) throws(SystemError) -> [UInt8] {
        var size = 256
        while true {
            var buf = [UInt8](repeating: 0, count: size)
            let n = try check("readlink \(path)") { buf.withUnsafeMutableBytes { Glibc.readlink(path, $0.baseAddress!.assumingMemoryBound(to: CChar.self), size) } }
            if n < size { return Array(buf[0..<n]) }
            size *= 4
        }
    }

    public static func mknod(_ path: String, _ mode: mode_t, _ dev: dev_t) throws(SystemError) {
        _ = try check("mknod \(path)") { Glibc.mknod(path, mode, dev) }
    }

    public static func chmod(_ path: String, _ mode: mode_t) throws(SystemError) {
        _ = try check("chmod \(path)") { Glibc.chmod(path, mode) }
    }

    public static func lchown(_ path: String, _ uid: uid_t, _ gid: gid_t) throws(SystemError) {
        _ = try check("lchown \(path)") { Glibc.lchown(path, uid, gid) }
    }

    /// Sets atime and mtime without following a final symlink; `UTIME_OMIT` leaves one alone.
    public static func utimens(_ path: String, _ atime: timespec, _ mtime: timespec) throws(SystemError) {
        var times = (atime, mtime)
        _ = try check("utimensat \(path)") {
            withUnsafePointer(to: &times) {
                $0.withMemoryRebound(to: timespec.self, capacity: 2) { Glibc.utimensat(AT_FDCWD, path, $0, AT_SYMLINK_NOFOLLOW) }
            }
        }
    }

    public static func statvfs(_ path: String) throws(SystemError) -> Glibc.statvfs {
        var s = Glibc.statvfs()
        _ = try check("statvfs \(path)") { xts_statvfs(path, &s) }
        return s
    }

    public static func fsyncDirectory(_ path: String) throws(SystemError) {
        let fd = try open(path, O_RDONLY | O_DIRECTORY)
        defer { close(fd) }
        try fsync(fd)
    }

    /// Names in a directory, without "." and "..".
    public static func listDirectory(_ path: String) throws(SystemError) -> [(name: String, type: UInt8, ino: UInt64)] {
        let fd = try open(path, XTS_O_PATH | O_DIRECTORY)
        defer { close(fd) }
        return try listDirectory(fd)
    }

    /// Whole contents of a small file (headers, metadata), at most `limit` bytes. Reads to
    /// end of file rather than trusting st_size, which /proc files report as 0.
    /// Only a regular file is read, and never through a final symlink: a FIFO or device put
    /// in place of a header cannot block or trick the reader.
    public static func readFile(_ path: String, limit: Int = 1 << 20) throws(SystemError) -> [UInt8] {
        let (fd, st) = try openRegular(AT_FDCWD, path, O_RDONLY)
        defer { close(fd) }
        var buf = [UInt8](repeating: 0, count: min(max(Int(st.st_size), 4096), limit))
        var total = 0
        while true {
            let room = buf.count - total
            let n = try buf.withMutableBytes { (p) throws(SystemError) -> Int in
                try check("read \(path)") { Glibc.read(fd, p.baseAddress! + total, room) }
            }
            if n == 0 { break }
            total += n
            if total == buf.count {
                if buf.count >= limit { break }
                buf += [UInt8](repeating: 0, count: min(buf.count, limit - buf.count))
            }
        }
        return Array(buf[0..<total])
    }

    /// Replaces `path` with `bytes` so that a crash at any point leaves either the old or the
    /// new file: write a temporary file of a name no other writer uses (`temporaryName`),
    /// fsync it, rename it over, fsync the directory. Two hosts replacing the same file at
    /// once each write their own temporary; the last rename wins, whole.
    public static func atomicWrite(_ bytes: [UInt8], to path: String, mode: mode_t = 0o600) throws(SystemError) {
        let dir = parentDirectory(of: path)
        let tmp = temporaryName(for: path)
        do { try writeNewFile(bytes, to: tmp, mode: mode) } catch {
            if error.errno != EEXIST { _ = Glibc.unlink(tmp) }
            throw error
        }
        do { try rename(tmp, path) } catch {
            _ = Glibc.unlink(tmp)
            throw error
        }
        try fsyncDirectory(dir)
    }

    /// The suffix of an atomic replacement's temporary: `NAME.tmp.` and 16 random lowercase
    /// hex digits. Older versions used `NAME.tmp` alone; readers recognise both.
    public static let temporaryInfix = ".tmp."
    public static let temporaryRandomDigits = 16

    /// `name` + `.tmp.` + 16 random hex digits: unique among hosts and processes, so that
    /// concurrent replacements never share (and never truncate or rename) one temporary.
    public static func temporaryName(for name: String) -> String {
        var r: UInt64 = 0
        let n = withUnsafeMutableBytes(of: &r) { CSysShim.getrandom($0.baseAddress, 8, 0) }
        if n != 8 {
            // No entropy source (a very old kernel): the pid, time and a counter are unique enough here.
            var ts = timespec()
            clock_gettime(CLOCK_REALTIME, &ts)
            r = UInt64(UInt32(bitPattern: getpid())) << 40 ^ UInt64(ts.tv_nsec) ^ UInt64(ts.tv_sec) << 20
        }
        let hex = String(r, radix: 16)
        return name + temporaryInfix + String(repeating: "0", count: temporaryRandomDigits - hex.count) + hex
    }

    /// Creates `path` (which must not exist, and is never a symlink followed) with `bytes`, fsynced.
    public static func writeNewFile(_ bytes: [UInt8], to path: String, mode: mode_t) throws(SystemError) {
        let fd = try open(path, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW, mode)
        defer { close(fd) }
        try bytes.withBytes { (p) throws(SystemError) in
            if p.count > 0 { try pwrite(fd, p.baseAddress!, p.count, 0) }
        }
        try fsync(fd)
    }

    /// flock(2) on `fd`, retrying EINTR; `operation` is LOCK_SH or LOCK_EX (blocking), with
    /// LOCK_NB or LOCK_UN as flock takes them (the `XTS_LOCK_*` values).
    public static func flock(_ fd: Int32, _ operation: Int32) throws(SystemError) {
        _ = try check("flock") { xts_flock(fd, operation) }
    }
    public static let lockShared = XTS_LOCK_SH, lockExclusive = XTS_LOCK_EX, lockNonBlocking = XTS_LOCK_NB, lockRelease = XTS_LOCK_UN

    public static func parentDirectory(of path: String) -> String {
        guard let slash = path.lastIndex(of: "/") else { return "." }
        if slash == path.startIndex { return "/" }
        return String(path[..<slash])
    }

    public static func exists(_ path: String) -> Bool {
        var st = stat()
        return Glibc.lstat(path, &st) == 0
    }
}

/// File-type tests: the S_IS* macros are not imported into Swift.
public extension stat {
    var isDirectory: Bool { (st_mode & S_IFMT) == S_IFDIR }
    var isRegular: Bool { (st_mode & S_IFMT) == S_IFREG }
    var isSymlink: Bool { (st_mode & S_IFMT) == S_IFLNK }
}

/// An object of the backing filesystem by device, inode and birth time (`Sys.birthIdentity`).
public struct BirthIdentity: Hashable, Sendable {
    public var dev: UInt64
    public var ino: UInt64
    public var seconds: Int64
    public var nanoseconds: UInt32
}
