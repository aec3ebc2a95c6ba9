import CSysShim
#if canImport(Glibc)
import Glibc
#endif

/// Access relative to directory descriptors. The filesystem reaches every backing object
/// through these: a name is resolved one component at a time from a descriptor it already
/// holds, and never through a symbolic link, so nothing planted in CIPHERDIR can make the
/// daemon act on a file outside it, and no path grows longer than one name.
public extension Sys {
    /// A descriptor for `name` in `dirfd` that pins the object itself without opening it
    /// (O_PATH): a symlink is the symlink, a FIFO or device is never opened.
    static func openPath(_ dirfd: Int32, _ name: String, directory: Bool = false) throws(SystemError) -> Int32 {
        try check("open \(name)") { Glibc.openat(dirfd, name, XTS_O_PATH | O_NOFOLLOW | O_CLOEXEC | (directory ? O_DIRECTORY : 0)) }
    }

    /// Opens the object an O_PATH descriptor pins, with real access flags. Goes through the
    /// descriptor's /proc link, which leads to that very inode: no name is looked up again.
    static func reopen(_ pathfd: Int32, _ flags: Int32) throws(SystemError) -> Int32 {
        try check("reopen") { Glibc.open("/proc/self/fd/\(pathfd)", flags | O_CLOEXEC) }
    }

    /// Opens `name` in `dirfd` only if it is a regular file: other types (a planted FIFO,
    /// device or symlink) are refused before they are opened. Returns the descriptor and
    /// its attributes.
    static func openRegular(_ dirfd: Int32, _ name: String, _ flags: Int32) throws(SystemError) -> (fd: Int32, stat: stat) {
        let pinned = try openPath(dirfd, name)
        defer { close(pinned) }
        let st = try fstat(pinned)
        guard st.isRegular else { throw SystemError(st.isDirectory ? EISDIR : (st.isSymlink ? ELOOP : EINVAL), "open \(name): not a regular file") }
        return (try reopen(pinned, flags), st)
    }

    static func fstatat(_ dirfd: Int32, _ name: String) throws(SystemError) -> stat {
        var st = stat()
        _ = try check("stat \(name)") { Glibc.fstatat(dirfd, name, &st, AT_SYMLINK_NOFOLLOW) }
        return st
    }

    static func unlinkat(_ dirfd: Int32, _ name: String, directory: Bool = false) throws(SystemError) {
        _ = try check("unlink \(name)") { Glibc.unlinkat(dirfd, name, directory ? AT_REMOVEDIR : 0) }
    }

    static func mkdirat(_ dirfd: Int32, _ name: String, _ mode: mode_t) throws(SystemError) {
        _ = try check("mkdir \(name)") { Glibc.mkdirat(dirfd, name, mode) }
    }

    static func mknodat(_ dirfd: Int32, _ name: String, _ mode: mode_t, _ dev: dev_t) throws(SystemError) {
        _ = try check("mknod \(name)") { Glibc.mknodat(dirfd, name, mode, dev) }
    }

    static func symlinkat(_ target: String, _ dirfd: Int32, _ name: String) throws(SystemError) {
        _ = try check("symlink \(name)") { Glibc.symlinkat(target, dirfd, name) }
    }

    /// The target of the symlink `name` in `dirfd` (an empty name with an O_PATH descriptor
    /// of the symlink reads that one).
    static func readlinkat(_ dirfd: Int32, _ name: String) throws(SystemError) -> [UInt8] {
        var size = 512
        while true {
            var buf = [UInt8](repeating: 0, count: size)
            let n = try check("readlink \(name)") {
                buf.withUnsafeMutableBytes { Glibc.readlinkat(dirfd, name, $0.baseAddress!.assumingMemoryBound(to: CChar.self), size) }
            }
            if n < size { return Array(buf[0..<n]) }
            size *= 4
        }
    }

    /// A new name for an existing object; a symlink is linked itself, never followed.
    static func linkat(_ fromDir: Int32, _ from: String, _ toDir: Int32, _ to: String) throws(SystemError) {
        _ = try check("link \(from)") { Glibc.linkat(fromDir, from, toDir, to, 0) }
    }

    /// renameat2(2); `flags` as RENAME_NOREPLACE / RENAME_EXCHANGE.
    static func renameat(_ fromDir: Int32, _ from: String, _ toDir: Int32, _ to: String, flags: UInt32 = 0) throws(SystemError) {
        _ = try check("rename \(from)") { xts_renameat2_at(fromDir, from, toDir, to, flags) }
    }

    /// renameat2(2) with RENAME_NOREPLACE; where the filesystem does not take the flag
    /// (GlusterFS's FUSE client answers EINVAL), a check that the target is absent (EEXIST
    /// if not) and a plain rename. Only for callers that hold the directory against
    /// changes of this machine (the rekey sweep, fsck --repair) and that other hosts do not
    /// change meanwhile (both refuse while another host has the volume mounted).
    static func renameatNoReplace(_ fromDir: Int32, _ from: String, _ toDir: Int32, _ to: String) throws(SystemError) {
        do {
            try renameat(fromDir, from, toDir, to, flags: UInt32(XTS_RENAME_NOREPLACE))
        } catch where error.errno == EINVAL {
            var st = stat()
            if Glibc.fstatat(toDir, to, &st, AT_SYMLINK_NOFOLLOW) == 0 { throw SystemError(EEXIST, "rename \(from)") }
            try renameat(fromDir, from, toDir, to)
        }
    }

    /// chown of the object an O_PATH descriptor pins (never follows a symlink).
    static func fchown(pinned fd: Int32, _ uid: uid_t, _ gid: gid_t) throws(SystemError) {
        _ = try check("chown") { Glibc.fchownat(fd, "", uid, gid, XTS_AT_EMPTY_PATH | AT_SYMLINK_NOFOLLOW) }
    }

    /// chmod of the object an O_PATH descriptor pins. fchmodat2 (Linux 6.6) where it
    /// exists; before that, the descriptor's /proc link (which leads to the same inode).
    /// A symlink's mode cannot change: EOPNOTSUPP, as on ext4.
    static func fchmod(pinned fd: Int32, _ mode: mode_t) throws(SystemError) {
        let r = xts_fchmodat2(fd, "", mode, XTS_AT_EMPTY_PATH | AT_SYMLINK_NOFOLLOW)
        if r == 0 { return }
        let e = Glibc.errno
        if e != ENOSYS {
            if e == EINTR { return try fchmod(pinned: fd, mode) }
            throw SystemError(e, "chmod")
        }
        let st = try fstat(fd)
        if st.isSymlink { throw SystemError(EOPNOTSUPP, "chmod") }
        _ = try check("chmod") { Glibc.chmod("/proc/self/fd/\(fd)", mode) }
    }

    /// Sets atime and mtime of the object a descriptor pins; `UTIME_OMIT` leaves one alone.
    static func futimens(pinned fd: Int32, _ atime: timespec, _ mtime: timespec) throws(SystemError) {
        var times = (atime, mtime)
        _ = try check("utimensat") {
            withUnsafePointer(to: &times) {
                $0.withMemoryRebound(to: timespec.self, capacity: 2) { Glibc.utimensat(fd, "", $0, XTS_AT_EMPTY_PATH | AT_SYMLINK_NOFOLLOW) }
            }
        }
    }

    static func fstatvfs(_ fd: Int32) throws(SystemError) -> Glibc.statvfs {
        var s = Glibc.statvfs()
        _ = try check("statvfs") { Glibc.fstatvfs(fd, &s) }
        return s
    }

    static func fallocate(_ fd: Int32, mode: Int32, offset: Int64, length: Int64) throws(SystemError) {
        _ = try check("fallocate") { xts_fallocate(fd, mode, offset, length) }
    }

    static func fchmod(_ fd: Int32, _ mode: mode_t) throws(SystemError) {
        _ = try check("fchmod") { Glibc.fchmod(fd, mode) }
    }

    /// A readable descriptor of the directory `dirfd` pins (which may be O_PATH).
    static func openDirectory(_ dirfd: Int32) throws(SystemError) -> Int32 {
        try check("open directory") { Glibc.openat(dirfd, ".", O_RDONLY | O_DIRECTORY | O_CLOEXEC) }
    }

    static func fsyncDirectory(_ dirfd: Int32) throws(SystemError) {
        let fd = try openDirectory(dirfd)
        defer { close(fd) }
        try fsync(fd)
    }

    /// Names in the directory `dirfd` pins, without "." and "..".
    static func listDirectory(_ dirfd: Int32) throws(SystemError) -> [(name: String, type: UInt8, ino: UInt64)] {
        let fd = try openDirectory(dirfd)
        guard let dir = fdopendir(fd) else {
            let e = Glibc.errno
            close(fd)
            throw SystemError(e, "opendir")
        }
        defer { closedir(dir) }
        var out: [(String, UInt8, UInt64)] = []
        while true {
            Glibc.errno = 0
            guard let ent = readdir(dir) else {
                if Glibc.errno != 0 { throw SystemError(Glibc.errno, "readdir") }
                break
            }
            let name = withUnsafePointer(to: ent.pointee.d_name) {
                $0.withMemoryRebound(to: CChar.self, capacity: 256) { String(cString: $0) }
            }
            if name == "." || name == ".." { continue }
            out.append((name, ent.pointee.d_type, UInt64(ent.pointee.d_ino)))
        }
        return out
    }

    /// The whole of a small regular file `name` in `dirfd`: internal metadata, which is
    /// hostile input. Refuses anything but a regular file, and one larger than `limit`.
    static func readSmallFile(_ dirfd: Int32, _ name: String, limit: Int) throws(SystemError) -> [UInt8] {
        let (fd, st) = try openRegular(dirfd, name, O_RDONLY | O_NONBLOCK)
        defer { close(fd) }
        guard st.st_size >= 0, Int(st.st_size) <= limit else { throw SystemError(EFBIG, "read \(name): \(st.st_size) bytes, more than \(limit)") }
        var buf = [UInt8](repeating: 0, count: limit + 1)
        let n = try buf.withMutableBytes { (p) throws(SystemError) -> Int in try pread(fd, p.baseAddress!, p.count, 0) }
        guard n <= limit else { throw SystemError(EFBIG, "read \(name): more than \(limit) bytes") }
        return Array(buf[0..<n])
    }

    /// Creates `name` in `dirfd` (which must not exist; never through a symlink) with `bytes`,
    /// fsynced unless `sync` is false.
    static func writeNewFile(_ bytes: [UInt8], at dirfd: Int32, _ name: String, mode: mode_t, sync: Bool = true) throws(SystemError) {
        let fd = try openat(dirfd, name, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, mode)
        defer { close(fd) }
        try bytes.withBytes { (p) throws(SystemError) in
            if p.count > 0 { try pwrite(fd, p.baseAddress!, p.count, 0) }
        }
        if sync { try fsync(fd) }
    }

    /// Replaces `name` in `dirfd` so that a crash leaves the old or the new file: write a
    /// temporary of a name no other writer uses (`temporaryName`), fsync, rename over, fsync
    /// the directory.
    static func atomicWrite(_ bytes: [UInt8], at dirfd: Int32, _ name: String, mode: mode_t) throws(SystemError) {
        let tmp = temporaryName(for: name)
        do { try writeNewFile(bytes, at: dirfd, tmp, mode: mode) } catch {
            if error.errno != EEXIST { _ = Glibc.unlinkat(dirfd, tmp, 0) }
            throw error
        }
        do { try renameat(dirfd, tmp, dirfd, name) } catch {
            _ = Glibc.unlinkat(dirfd, tmp, 0)
            throw error
        }
        try fsyncDirectory(dirfd)
    }

    /// Extended attributes of the object an O_PATH descriptor pins, through its /proc link.
    /// Returns the value's length; with an empty buffer, the length it needs.
    static func getxattr(pinned fd: Int32, _ name: String, into buffer: UnsafeMutableRawBufferPointer) throws(SystemError) -> Int {
        try check("getxattr") { CSysShim.getxattr("/proc/self/fd/\(fd)", name, buffer.baseAddress, buffer.count) }
    }

    static func setxattr(pinned fd: Int32, _ name: String, _ value: [UInt8], flags: Int32) throws(SystemError) {
        _ = try check("setxattr") { value.withUnsafeBytes { CSysShim.setxattr("/proc/self/fd/\(fd)", name, $0.baseAddress, $0.count, flags) } }
    }

    static func removexattr(pinned fd: Int32, _ name: String) throws(SystemError) {
        _ = try check("removexattr") { CSysShim.removexattr("/proc/self/fd/\(fd)", name) }
    }

    /// Attribute names, NUL-separated as listxattr(2) gives them.
    static func listxattr(pinned fd: Int32) throws(SystemError) -> [String] {
        let path = "/proc/self/fd/\(fd)"
        while true {
            let need = try check("listxattr") { CSysShim.listxattr(path, UnsafeMutablePointer<CChar>(bitPattern: 0), 0) }
            if need == 0 { return [] }
            var buf = [CChar](repeating: 0, count: need)
            let n = CSysShim.listxattr(path, &buf, need)
            if n < 0 {
                // Grown since we asked: ask again.
                if Glibc.errno == ERANGE || Glibc.errno == EINTR { continue }
                throw SystemError(Glibc.errno, "listxattr")
            }
            return buf[0..<n].split(separator: 0).map { String(decoding: $0.map { UInt8(bitPattern: $0) }, as: UTF8.self) }
        }
    }
}
