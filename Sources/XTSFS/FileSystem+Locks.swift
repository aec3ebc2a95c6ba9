import CSysShim
import XTSSystem
#if canImport(Glibc)
import Glibc
#endif

/// A POSIX lock owner on one backing file: FUSE's `lock_owner` (one per process file
/// table) and the file.
struct LockOwner: Hashable, Sendable {
    var identity: Identity
    var owner: UInt64
}

/// The backing descriptor holding one owner's POSIX locks on a file, and the handles the
/// owner locked through.
struct LockHolder: Sendable {
    var fd: Int32
    var handles: Set<UInt64>
}

/// Locks forwarded to the backing files, so that they are as shared as the backing
/// filesystem makes them: two mounts of one CIPHERDIR (on one machine, or on hosts sharing
/// it through GlusterFS, NFS, CephFS) exclude each other.
///
/// - POSIX (`fcntl` F_SETLK/F_SETLKW/F_GETLK): open-file-description locks on a backing
///   descriptor of the file's own for each lock owner, so that one process's locks merge
///   whatever descriptor it uses, while two processes (or two mounts) conflict. Closing
///   any descriptor of the file (FLUSH with the owner) releases them, as POSIX says; the
///   last close of a handle (RELEASE) releases those taken through it by any owner (an
///   open-file-description lock's owner is the handle itself, and sends no FLUSH).
/// - BSD (`flock`): on the handle's own backing descriptor: one per open file description,
///   as flock(2) is; closing it releases them.
///
/// Ranges are plaintext offsets, applied as they are to the backing file: consistent
/// between xtsfs mounts, which is what matters (nothing else reads those files as such).
/// Waiting (F_SETLKW, flock without LOCK_NB) is a loop of non-blocking attempts, so that
/// an interrupted waiter (a signal) stops waiting: `interrupted` is asked between them.
extension FileSystem {
    public enum LockWait: Sendable {
        case acquired
        /// Held by someone else: try again later (the caller's loop), or fail with EAGAIN.
        case busy
    }

    /// The backing descriptor holding `owner`'s POSIX locks on the file of `handle`, made
    /// (from the handle's descriptor, reopened read-write if the file allows, otherwise in
    /// the handle's own mode) when `create`.
    func lockFD(handle: UInt64, owner: UInt64, create: Bool) throws(FSError) -> Int32? {
        let f = try openFile(handle)
        let key = LockOwner(identity: f.identity, owner: owner)
        if let fd = lockFDs.withLock({ table -> Int32? in
            guard var h = table[key] else { return nil }
            if create { h.handles.insert(handle); table[key] = h }
            return h.fd
        }) { return fd }
        guard create else { return nil }
        var fd: Int32 = -1
        for flags in [O_RDWR, O_RDONLY, O_WRONLY] {
            if let r = try? Sys.reopen(f.fd, flags) { fd = r; break }
        }
        guard fd >= 0 else { throw .system(SystemError(EBADF, "reopen for a lock")) }
        let winner = lockFDs.withLock { table -> Int32 in
            if var other = table[key] {
                other.handles.insert(handle)
                table[key] = other
                return other.fd
            }
            table[key] = LockHolder(fd: fd, handles: [handle])
            return fd
        }
        if winner != fd { Sys.close(fd) }
        return winner
    }

    /// F_GETLK: the first lock that would conflict with `lock` (as `lock`), or F_UNLCK.
    public func getLock(handle: UInt64, owner: UInt64, _ lock: inout flock) throws(FSError) {
        var fd = try openFile(handle).fd
        if let mine = try lockFD(handle: handle, owner: owner, create: false) { fd = mine }
        lock.l_pid = 0
        guard fcntl(fd, XTS_F_OFD_GETLK, &lock) == 0 else { throw .system(SystemError(errno, "F_OFD_GETLK")) }
        // An open-file-description lock has no process: -1. Another host's has none here either.
        if lock.l_pid < 0 { lock.l_pid = 0 }
    }

    /// F_SETLK (one attempt): `.busy` when another owner holds a conflicting lock.
    public func setLock(handle: UInt64, owner: UInt64, _ lock: flock) throws(FSError) -> LockWait {
        var l = lock
        l.l_pid = 0
        let unlock = l.l_type == Int16(F_UNLCK)
        guard let fd = try lockFD(handle: handle, owner: owner, create: !unlock) else { return .acquired }
        if fcntl(fd, XTS_F_OFD_SETLK, &l) == 0 { return .acquired }
        let e = errno
        if e == EAGAIN || e == EACCES { return .busy }
        throw .system(SystemError(e, "F_OFD_SETLK"))
    }

    /// FLUSH (a descriptor of the file closed by `owner`): all of the owner's POSIX locks on
    /// the file go, by closing the descriptor that holds them.
    public func releaseLocks(handle: UInt64, owner: UInt64) {
        guard let f = try? openFile(handle) else { return }
        let key = LockOwner(identity: f.identity, owner: owner)
        if let h = lockFDs.withLock({ $0.removeValue(forKey: key) }) { unlockAndClose(h.fd) }
    }

    /// Some backing filesystems (GlusterFS) keep an open-file-description lock past the
    /// close of its descriptor: unlock it all first.
    func unlockAndClose(_ fd: Int32) {
        var l = flock()
        l.l_type = Int16(F_UNLCK)
        l.l_whence = Int16(SEEK_SET)
        _ = fcntl(fd, XTS_F_OFD_SETLK, &l)
        Sys.close(fd)
    }

    /// RELEASE of `handle` (its last descriptor closed): the POSIX locks of every owner that
    /// locked through it go. Call before `release`.
    public func releaseLocks(handle: UInt64) {
        let gone = lockFDs.withLock { table -> [Int32] in
            let keys = table.filter { $0.value.handles.contains(handle) }.map(\.key)
            return keys.compactMap { table.removeValue(forKey: $0)?.fd }
        }
        for fd in gone { unlockAndClose(fd) }
    }

    /// flock(2) on the handle's backing descriptor (one attempt; `operation` without
    /// LOCK_NB). `.busy` when another open file description holds a conflicting lock.
    public func flockHandle(_ handle: UInt64, operation: Int32) throws(FSError) -> LockWait {
        let f = try openFile(handle)
        let op = operation & ~Sys.lockNonBlocking
        do { try Sys.flock(f.fd, op == Sys.lockRelease ? op : op | Sys.lockNonBlocking) } catch {
            if error.errno == EWOULDBLOCK { return .busy }
            throw .system(error)
        }
        return .acquired
    }
}
