import CFuse
import CFuseRing
import Synchronization
import XTSFS
import XTSSystem
#if canImport(Glibc)
import Glibc
#endif

public enum FuseError: Error, CustomStringConvertible {
    case session(String)
    case mount(String)
    public var description: String {
        switch self {
        case .session(let s): return "cannot start the FUSE session: \(s)"
        case .mount(let s): return s
        }
    }
}

/// The FUSE binding: libfuse3's low-level (inode) API over `FileSystem`. One server is one
/// session and one mount point; a daemon serving several mounts has one server for each
/// (see `FuseServerThread`). Requests arrive
/// on libfuse's worker threads; each callback finds the server through the request's
/// userdata, calls the filesystem and replies. `FSError` becomes an errno here, in `fail`.
///
/// `@unchecked Sendable`: after `mount()` only `session` is read (by the serving thread);
/// other threads reach it only through `notifySession`; the filesystem is thread-safe.
public final class FuseServer: @unchecked Sendable {
    /// The filesystem served; replaced only when the cache area is purged while mounted.
    public var fs: FileSystem { current.withLock { $0 } }
    private let current: Mutex<FileSystem>
    public let mountpoint: String
    let options: [String]
    let debug: Bool
    let maxThreads: UInt32
    private var session: OpaquePointer?
    /// The session for notifications from threads other than the session's own (cache
    /// eviction); cleared under the lock before the session is destroyed.
    /// (The address, as an Int: a pointer is not Sendable.)
    private let notifySession = Mutex<Int>(0)
    /// How long the kernel may cache names and attributes (`-o cache_timeout=S`).
    let timeout: Double

    /// Told the node of every file opened, created or written (the cache area's LRU
    /// eviction keeps its own record of use); nil for the other areas. Set before serving.
    public var used: (@Sendable (UInt64) -> Void)?

    /// Extended attributes served; without them every xattr request is ENOSYS, which makes
    /// the kernel stop sending any (`-o noxattr`).
    let xattrs: Bool

    /// Ask for the kernel's writeback cache (see `MountRequest.writebackCache`).
    let writebackCache: Bool

    /// POSIX and BSD locks taken on the backing files (`-o shared`), so that other mounts of
    /// CIPHERDIR see them; otherwise the kernel keeps them, local to this mount, and closes
    /// need no FLUSH round trip.
    let forwardLocks: Bool

    /// `-o shared`: other hosts change the files, so the kernel keeps a file's cached pages
    /// across opens only while its backing file provably did not change (`contentStamp`).
    let shared: Bool
    /// The kernel lists directories without OPENDIR and RELEASEDIR (FUSE_NO_OPENDIR_SUPPORT,
    /// asked for by answering the first OPENDIR with ENOSYS): READDIR then comes with the
    /// directory's node, no handle, and the offset (cookie) the last reply ended with; two
    /// round trips fewer per directory listed. The kernel then also caches listings (as
    /// FOPEN_CACHE_DIR), revalidated against the directory's mtime and its own changes
    /// at each listing's start, and dropped after the cache timeout (`ListingExpiry`).
    /// Not with -o shared or cache_timeout=0: changes made
    /// behind the mount's back would then show only once the directory's mtime is seen
    /// to change (a coarse clock tick may hide one), where each listing now sees them.
    let noOpendir = Atomic<Bool>(false)
    /// With `noOpendir`: when the kernel's cached listings are dropped. Set by `run`.
    private(set) var listingExpiry: ListingExpiry?
    /// Lock requests waiting on threads of their own (`lockRequest`), and whether the
    /// session is ending (they then answer EINTR at once).
    let lockWaiters = Atomic<Int>(0)
    let ending = Atomic<Bool>(false)
    /// By node: the content stamp the kernel's cached pages of the file agree with.
    private let cachedStamps = Mutex<[UInt64: [UInt8]]>([:])
    /// By handle: its node and the content stamp at open.
    private let openStamps = Mutex<[UInt64: (node: UInt64, stamp: [UInt8])]>([:])

    /// Ask for FUSE over io_uring (`-o uring`; see Sources/CFuseRing). Never with forwarded
    /// locks: a lock waiter holds its request's ring entry until it is granted, and the
    /// request that would release it could find no free entry on its CPU.
    let uring: Bool
    /// What became of `-o uring`: nil when not asked for. Also handed to `logLine`.
    public private(set) var uringStatus: String? {
        didSet { if let uringStatus { logLine?(uringStatus) } }
    }
    /// Where the server's own notes go (the daemon's log); set before `run`.
    public var logLine: (@Sendable (String) -> Void)?
    private var ring: OpaquePointer?

    public init(fs: FileSystem, mountpoint: String, options: [String], cacheTimeout: Double, xattrs: Bool = true, writebackCache: Bool = true,
                forwardLocks: Bool = false, shared: Bool = false, debug: Bool = false, maxThreads: UInt32 = 8, uring: Bool = false) {
        self.uring = uring && !forwardLocks
        self.current = Mutex(fs)
        self.writebackCache = writebackCache
        self.forwardLocks = forwardLocks
        self.shared = shared
        self.xattrs = xattrs
        self.timeout = cacheTimeout
        self.mountpoint = mountpoint
        self.options = options
        self.debug = debug
        self.maxThreads = maxThreads
    }

    /// Creates the session and mounts; the mount is visible when this returns.
    public func mount() throws(FuseError) {
        var argv = ["xtsfs"]
        if !options.isEmpty { argv += ["-o", options.joined(separator: ",")] }
        if debug { argv.append("-d") }
        var cargs = argv.map { strdup($0) }
        defer { cargs.forEach { free($0) } }
        var ops = FuseServer.operations
        let me = Unmanaged.passUnretained(self).toOpaque()
        let se: OpaquePointer? = cargs.withUnsafeMutableBufferPointer { buf in
            var args = xtsfs_fuse_args_init(Int32(buf.count), buf.baseAddress)
            defer { fuse_opt_free_args(&args) }
            return fuse_session_new(&args, &ops, MemoryLayout<fuse_lowlevel_ops>.size, me)
        }
        guard let se else { throw .session("invalid options \(options.joined(separator: ","))") }
        if fuse_session_mount(se, mountpoint) != 0 {
            fuse_session_destroy(se)
            throw .mount("cannot mount on \(mountpoint)")
        }
        // Replies to requests taken off a ring go back through it (libfuse's custom I/O);
        // without -o uring libfuse writes to /dev/fuse itself, as always.
        if uring && xtsfs_ring_install_io(UnsafeMutableRawPointer(se)) != 0 {
            fuse_session_unmount(se)
            fuse_session_destroy(se)
            throw .session("cannot route replies for -o uring")
        }
        session = se
        notifySession.withLock { $0 = Int(bitPattern: UnsafeRawPointer(se)) }
    }

    /// Tells the kernel to forget `name` in directory `parent`, removed behind its back
    /// (cache eviction), so the name is gone at once rather than after the cache timeout.
    /// Best effort; a no-op once the session is over.
    public func invalidate(parent: UInt64, name: [UInt8]) {
        withNotifySession { se in
            FuseServer.invalidateEntry(se, parent, name)
            // The kernel's cached listing of the directory (without OPENDIR) goes too: the
            // entry invalidation reaches it only when the name's dentry is cached.
            if noOpendir.load(ordering: .relaxed) { _ = fuse_lowlevel_notify_inval_inode(se, fuse_ino_t(parent), 0, 0) }
        }
    }

    /// Serves `new` from now on instead of the current filesystem, and tells the kernel to
    /// forget what it cached of the old one (every node's attributes and cached pages, the
    /// root's entries; entries below go with theirs). Requests under way finish on the old one; handles and nodes
    /// of the old one then fail (EBADF, ENOENT): `new` must have been made with an
    /// `idBase` above every ID the old one gave out. Returns the old filesystem.
    @discardableResult
    public func replace(with new: FileSystem) -> FileSystem {
        configure(new)
        let old = current.withLock { fs in
            let old = fs
            fs = new
            return old
        }
        let names = old.rootNames()
        let nodes = old.knownNodeIDs()
        withNotifySession { se in
            // Cached pages of the old files go too: a file still open must not keep
            // reading plaintext the purge was meant to make unreadable.
            for id in nodes where id != FileSystem.rootID {
                _ = fuse_lowlevel_notify_inval_inode(se, fuse_ino_t(id), 0, 0)
            }
            for name in names { FuseServer.invalidateEntry(se, FileSystem.rootID, name) }
            _ = fuse_lowlevel_notify_inval_inode(se, fuse_ino_t(FileSystem.rootID), 0, 0)
        }
        return old
    }

    /// FUSE_HANDLE_KILLPRIV_V2 (protocol 7.33), which libfuse 3.14 does not know.
    static let handleKillprivV2: UInt32 = 1 << 28
    /// Whether the kernel granted HANDLE_KILLPRIV_V2; set by `run` before serving.
    private(set) var killsPrivileges = false

    /// What a filesystem must know of the session before it serves requests.
    func configure(_ fs: FileSystem) {
        fs.killsPrivileges.store(killsPrivileges, ordering: .relaxed)
        fs.modeDropped = { [weak self] id in self?.invalidateAttributes(id) }
    }

    /// `body` with the session, unless it is over.
    func withNotifySession(_ body: (OpaquePointer) -> Void) {
        notifySession.withLock { address in
            guard let se = OpaquePointer(bitPattern: address) else { return }
            body(se)
        }
    }

    /// FUSE_NOTIFY_INVAL_ENTRY: the kernel forgets `name` in directory `parent`.
    private static func invalidateEntry(_ se: OpaquePointer, _ parent: UInt64, _ name: [UInt8]) {
        _ = name.withUnsafeBufferPointer { p in
            p.withMemoryRebound(to: CChar.self) { fuse_lowlevel_notify_inval_entry(se, fuse_ino_t(parent), $0.baseAddress, p.count) }
        }
    }

    /// Tells the kernel to drop the attributes it cached for node `id` (not its pages).
    func invalidateAttributes(_ id: UInt64) {
        withNotifySession { se in _ = fuse_lowlevel_notify_inval_inode(se, fuse_ino_t(id), -1, 0) }
    }

    /// Unmounts and tears down a session that was mounted but will never be served
    /// (another mount of the same daemon failed).
    public func abandon() {
        guard let se = session else { return }
        session = nil
        notifySession.withLock { $0 = 0 }
        fuse_session_unmount(se)
        fuse_session_destroy(se)
    }

    /// Sequential reads reach the daemon in read-ahead-sized requests; the kernel's default
    /// of 128 KiB for a FUSE mount leaves the daemon idle between them. 1 MiB measured
    /// 1.3 → 2.0 GB/s on cold 1 GiB reads here. Needs root (sysfs); best effort.
    /// The kernel lowers the value to what the FUSE INIT reply allows when it processes that
    /// reply, so this must run after INIT: `run` calls it from a thread that first waits for
    /// a stat of the mount point, which the kernel answers only once INIT is done.
    func tuneReadahead(kilobytes: Int = 1024) {
        guard geteuid() == 0, let entry = MountEntry.fuse(at: mountpoint) else { return }
        let path = "/sys/class/bdi/\(entry.device)/read_ahead_kb"
        let fd = Glibc.open(path, O_WRONLY | O_CLOEXEC)
        guard fd >= 0 else { return }
        defer { Glibc.close(fd) }
        let text = "\(kilobytes)\n"
        _ = text.withCString { Glibc.write(fd, $0, strlen($0)) }
    }

    /// Serves requests until the filesystem is unmounted; then tears the session down.
    public func run() -> Int32 {
        guard let se = session else { return -1 }
        var tuner = pthread_t()
        let me = Unmanaged.passRetained(self).toOpaque()
        if pthread_create(&tuner, nil, { arg in
            let server = Unmanaged<FuseServer>.fromOpaque(arg!).takeRetainedValue()
            if (try? Sys.lstat(server.mountpoint)) != nil { server.tuneReadahead() }
            return nil
        }, me) == 0 {
            pthread_detach(tuner)
        } else {
            Unmanaged<FuseServer>.fromOpaque(me).release()
        }
        // INIT before the loop, so as to ask for what libfuse 3.14 cannot: HANDLE_KILLPRIV_V2
        // (no `security.capability` query per write; setuid/setgid clearing is ours then).
        let granted = xtsfs_session_init_with(se, FuseServer.handleKillprivV2, uring ? UInt32(XTSFS_FUSE_OVER_IO_URING_FLAGS2) : 0)
        if granted < 0 {
            fuse_session_unmount(se)
            fuse_session_destroy(se)
            session = nil
            return -1
        }
        killsPrivileges = granted & Int64(FuseServer.handleKillprivV2) != 0
        configure(fs)
        if uring { startRing(granted: granted & (Int64(XTSFS_FUSE_OVER_IO_URING_FLAGS2) << 32) != 0, session: se) }
        if noOpendir.load(ordering: .relaxed) {
            let expiry = ListingExpiry(timeout: timeout)
            listingExpiry = expiry
            startListingExpiry(expiry)
        }
        let r = xtsfs_session_loop_mt(se, maxThreads)
        // The kernel ended the rings' commands at the unmount; their threads go now.
        if let ring { xtsfs_ring_stop(ring); self.ring = nil }
        // Lock waiters answer (EINTR) and go before the session they answer through does.
        ending.store(true, ordering: .sequentiallyConsistent)
        while lockWaiters.load(ordering: .sequentiallyConsistent) > 0 { usleep(1000) }
        notifySession.withLock { $0 = 0 }
        fuse_session_unmount(se)
        fuse_session_destroy(se)
        session = nil
        return r
    }

    /// Entries per CPU queue: requests of one CPU served at once. Each has a payload
    /// buffer as large as the largest request (1 MiB), touched only as far as used.
    static let ringDepth: UInt32 = 4
    static let ringPayload = (1 << 20) + 4096

    /// Starts the rings once INIT granted FUSE over io_uring; otherwise says why not. The
    /// session goes on through /dev/fuse in every case where the rings do not start.
    private func startRing(granted: Bool, session se: OpaquePointer) {
        guard granted else {
            let param = "/sys/module/fuse/parameters/enable_uring"
            let enabled = (try? Sys.readSmallFile(AT_FDCWD, param, limit: 4096)).map { $0.first == UInt8(ascii: "Y") }
            uringStatus = enabled == false
                ? "-o uring: the kernel offers FUSE over io_uring only with \(param) set to 1 (as root: echo 1 > \(param)); requests go through /dev/fuse"
                : "-o uring: this kernel does not offer FUSE over io_uring (Linux 6.14 or later, CONFIG_FUSE_IO_URING); requests go through /dev/fuse"
            return
        }
        guard let r = xtsfs_ring_start(UnsafeMutableRawPointer(se), FuseServer.ringDepth, FuseServer.ringPayload, requests.ringSlot) else {
            uringStatus = "-o uring: cannot set up the rings (\(String(cString: strerror(errno)))); requests go through /dev/fuse"
            return
        }
        ring = r
        requests.ringActive = true
        uringStatus = xtsfs_ring_active(r) != 0
            ? "-o uring: FUSE over io_uring, one queue per CPU (\(sysconf(Int32(_SC_NPROCESSORS_CONF))) queues of \(FuseServer.ringDepth) entries)"
            : "-o uring: the kernel refused the rings; requests go through /dev/fuse"
    }

    // MARK: - page cache across opens

    /// Whether the kernel may keep the cached pages of node `id` opened as `handle`: always
    /// without -o shared (only this daemon changes the files); with it, only if the backing
    /// file's stamp is the one those pages were read under.
    func keepCache(node id: UInt64, handle: UInt64) -> Bool {
        guard shared else { return true }
        guard let now = fs.contentStamp(handle: handle) else {
            cachedStamps.withLock { _ = $0.removeValue(forKey: id) }
            return false
        }
        openStamps.withLock { $0[handle] = (id, now) }
        return cachedStamps.withLock { table in
            let keep = table[id] == now
            table[id] = now
            return keep
        }
    }

    /// At release: if the file changed while this handle was open (here or on another host),
    /// the pages cached meanwhile may be of either version: the next open drops them.
    func closed(handle: UInt64) {
        guard shared, let (id, then) = openStamps.withLock({ $0.removeValue(forKey: handle) }) else { return }
        if fs.contentStamp(handle: handle) != then {
            cachedStamps.withLock { _ = $0.removeValue(forKey: id) }
        }
    }

    func forgotten(node id: UInt64) {
        guard shared else { return }
        cachedStamps.withLock { _ = $0.removeValue(forKey: id) }
    }

    // MARK: - helpers shared by the callbacks

    /// Requests served by this mount, by operation.
    public let requests = RequestCounts()

    static func count(_ req: fuse_req_t?, _ op: RequestCounts.Operation) {
        server(req).requests.add(op)
    }

    static func server(_ req: fuse_req_t?) -> FuseServer {
        Unmanaged<FuseServer>.fromOpaque(fuse_req_userdata(req)!).takeUnretainedValue()
    }

    /// The caller of a request; its supplementary groups are read (from /proc, by libfuse)
    /// only if the filesystem asks, while the request is being handled.
    static func caller(_ req: fuse_req_t?) -> Caller {
        let ctx = fuse_req_ctx(req)!.pointee
        return Caller(uid: ctx.uid, gid: ctx.gid, context: req.map { UnsafeRawPointer($0) }, groupsOf: groupsOf)
    }

    /// Captures nothing: one function for every request.
    static let groupsOf: @Sendable (UnsafeRawPointer) -> [gid_t] = { raw in
        let req = fuse_req_t(raw)
        var list = [gid_t](repeating: 0, count: 64)
        var n = fuse_req_getgroups(req, Int32(list.count), &list)
        if n > list.count {
            list = [gid_t](repeating: 0, count: Int(n))
            n = fuse_req_getgroups(req, Int32(list.count), &list)
        }
        return n > 0 ? Array(list.prefix(Int(min(n, Int32(list.count))))) : []
    }

    static func fail(_ req: fuse_req_t?, _ error: FSError) {
        if case .damaged(let why) = error { server(req).fs.logDamage(why) }
        fuse_reply_err(req, error.errno)
    }

    static func name(_ p: UnsafePointer<CChar>?) -> [UInt8] {
        guard let p else { return [] }
        return Array(UnsafeRawBufferPointer(start: p, count: strlen(p)))
    }

    func replyEntry(_ req: fuse_req_t?, _ id: UInt64, _ st: stat) {
        var e = fuse_entry_param()
        e.ino = fuse_ino_t(id)
        e.generation = 0
        e.attr = st
        e.attr_timeout = timeout
        e.entry_timeout = timeout
        fuse_reply_entry(req, &e)
    }

    /// getxattr/listxattr: a size of 0 asks for the length only; a buffer too small is ERANGE.
    static func replySized(_ req: fuse_req_t?, _ bytes: [UInt8], size: Int) {
        if size == 0 {
            fuse_reply_xattr(req, bytes.count)
        } else if bytes.count > size {
            fuse_reply_err(req, ERANGE)
        } else {
            _ = bytes.withUnsafeBytes { fuse_reply_buf(req, $0.baseAddress?.assumingMemoryBound(to: CChar.self), bytes.count) }
        }
    }

    func run<T>(_ req: fuse_req_t?, _ body: () throws(FSError) -> T, reply: (T) -> Void) {
        do { reply(try body()) } catch { FuseServer.fail(req, error) }
    }

    /// A lock request: one attempt here; if the lock is held elsewhere and the caller waits
    /// (F_SETLKW, flock without LOCK_NB), a thread of its own retries until it is acquired
    /// or the request is interrupted (EINTR), so that waiters never hold the session's
    /// worker threads. Without waiting, a held lock is EAGAIN.
    func lockRequest(_ req: fuse_req_t?, wait: Bool, _ attempt: @escaping @Sendable () throws(FSError) -> FileSystem.LockWait) {
        func once() -> Int32? {
            do throws(FSError) {
                switch try attempt() {
                case .acquired: return 0
                case .busy: return nil
                }
            } catch { return error.errno }
        }
        if let r = once() { fuse_reply_err(req, r); return }
        guard wait else { fuse_reply_err(req, EAGAIN); return }
        let waiter = LockWaiter(req: Int(bitPattern: UnsafeRawPointer(req)), server: self, attempt: once)
        lockWaiters.add(1, ordering: .sequentiallyConsistent)
        let box = Unmanaged.passRetained(waiter).toOpaque()
        var thread = pthread_t()
        if pthread_create(&thread, nil, { arg in
            let w = Unmanaged<LockWaiter>.fromOpaque(arg!).takeRetainedValue()
            w.run()
            return nil
        }, box) == 0 {
            pthread_detach(thread)
        } else {
            Unmanaged<LockWaiter>.fromOpaque(box).release()
            lockWaiters.subtract(1, ordering: .sequentiallyConsistent)
            fuse_reply_err(req, ENOLCK)
        }
    }

    // MARK: - the operations table

    static let operations: fuse_lowlevel_ops = {
        var ops = fuse_lowlevel_ops()
        ops.`init` = { userdata, conn in
            guard let conn, let userdata else { return }
            let s = Unmanaged<FuseServer>.fromOpaque(userdata).takeUnretainedValue()
            // libfuse asks for remote locks because the handlers exist; without -o shared the
            // kernel keeps them (local to this mount).
            if !s.forwardLocks {
                conn.pointee.want &= ~UInt32(FUSE_CAP_POSIX_LOCKS | FUSE_CAP_FLOCK_LOCKS)
            }
            // Keep libfuse's defaults; make sure O_TRUNC arrives with open (we truncate the plaintext).
            if conn.pointee.capable & UInt32(FUSE_CAP_ATOMIC_O_TRUNC) != 0 {
                conn.pointee.want |= UInt32(FUSE_CAP_ATOMIC_O_TRUNC)
            }
            // Writes gather in the page cache and arrive as whole pages, in batches: one
            // request for many small write(2) calls, and one 4 KiB unit re-encrypted once.
            // The kernel then keeps size and times itself and may read a page before a
            // partial write (backing files are always opened read-write); it sends O_APPEND
            // writes at its own idea of the end, which is ours too (only we write CIPHERDIR).
            if s.writebackCache, conn.pointee.capable & UInt32(FUSE_CAP_WRITEBACK_CACHE) != 0 {
                conn.pointee.want |= UInt32(FUSE_CAP_WRITEBACK_CACHE)
            }
            // A symlink's target never changes in place (only we write CIPHERDIR, and a
            // symlink is replaced, never rewritten): the kernel may keep it. Not with
            // -o shared: another host's new symlink may reuse a removed one's inode number.
            if !s.shared, conn.pointee.capable & UInt32(FUSE_CAP_CACHE_SYMLINKS) != 0 {
                conn.pointee.want |= UInt32(FUSE_CAP_CACHE_SYMLINKS)
            }
            // Directories listed without OPENDIR/RELEASEDIR (see `noOpendir`); not when
            // changes behind the mount's back must show at once (cache_timeout=0).
            if !s.shared, s.timeout > 0, conn.pointee.capable & UInt32(FUSE_CAP_NO_OPENDIR_SUPPORT) != 0 {
                conn.pointee.want |= UInt32(FUSE_CAP_NO_OPENDIR_SUPPORT)
                s.noOpendir.store(true, ordering: .relaxed)
            }
        }
        ops.lookup = { req, parent, name in
            FuseServer.count(req, .lookup)
            let s = server(req)
            s.run(req, { () throws(FSError) in try s.fs.lookup(parent: UInt64(parent), name: FuseServer.name(name)) }) { s.replyEntry(req, $0.0, $0.1) }
        }
        ops.forget = { req, ino, n in
            FuseServer.count(req, .forget)
            let s = server(req)
            s.fs.forget(UInt64(ino), count: n)
            s.forgotten(node: UInt64(ino))
            fuse_reply_none(req)
        }
        ops.forget_multi = { req, count, list in
            FuseServer.count(req, .forgetMulti)
            let s = server(req)
            for i in 0..<count {
                s.fs.forget(UInt64(list![i].ino), count: list![i].nlookup)
                s.forgotten(node: UInt64(list![i].ino))
            }
            fuse_reply_none(req)
        }
        ops.getattr = { req, ino, fi in
            FuseServer.count(req, .getattr)
            let s = server(req)
            s.run(req, { () throws(FSError) in try s.fs.getattr(UInt64(ino), handle: fi.map { $0.pointee.fh }) }) { st in
                var st = st
                fuse_reply_attr(req, &st, s.timeout)
            }
        }
        ops.setattr = { req, ino, attr, toSet, fi in
            FuseServer.count(req, .setattr)
            let s = server(req)
            guard let a = attr?.pointee else { fuse_reply_err(req, EINVAL); return }
            var c = AttributeChanges()
            if toSet & FUSE_SET_ATTR_MODE != 0 { c.mode = a.st_mode }
            if toSet & FUSE_SET_ATTR_UID != 0 { c.uid = a.st_uid }
            if toSet & FUSE_SET_ATTR_GID != 0 { c.gid = a.st_gid }
            if toSet & FUSE_SET_ATTR_SIZE != 0 { c.size = Int64(a.st_size) }
            let now = timespec(tv_sec: 0, tv_nsec: Int(Sys.utimeNow))
            if toSet & FUSE_SET_ATTR_ATIME_NOW != 0 { c.atime = now } else if toSet & FUSE_SET_ATTR_ATIME != 0 { c.atime = a.st_atim }
            if toSet & FUSE_SET_ATTR_MTIME_NOW != 0 { c.mtime = now } else if toSet & FUSE_SET_ATTR_MTIME != 0 { c.mtime = a.st_mtim }
            s.run(req, { () throws(FSError) in try s.fs.setattr(UInt64(ino), handle: fi.map { $0.pointee.fh }, changes: c, caller: caller(req)) }) { st in
                var st = st
                fuse_reply_attr(req, &st, s.timeout)
            }
        }
        ops.readlink = { req, ino in
            FuseServer.count(req, .readlink)
            let s = server(req)
            s.run(req, { () throws(FSError) in try s.fs.readlink(UInt64(ino)) }) { target in
                var t = target
                t.append(0)
                t.withUnsafeBufferPointer { p in
                    p.withMemoryRebound(to: CChar.self) { _ = fuse_reply_readlink(req, $0.baseAddress) }
                }
            }
        }
        ops.mknod = { req, parent, name, mode, rdev in
            FuseServer.count(req, .mknod)
            let s = server(req)
            s.run(req, { () throws(FSError) in try s.fs.mknod(parent: UInt64(parent), name: FuseServer.name(name), mode: mode, rdev: rdev, caller: caller(req)) }) { s.replyEntry(req, $0.0, $0.1) }
        }
        ops.mkdir = { req, parent, name, mode in
            FuseServer.count(req, .mkdir)
            let s = server(req)
            s.run(req, { () throws(FSError) in try s.fs.mkdir(parent: UInt64(parent), name: FuseServer.name(name), mode: mode, caller: caller(req)) }) { s.replyEntry(req, $0.0, $0.1) }
        }
        ops.unlink = { req, parent, name in
            FuseServer.count(req, .unlink)
            let s = server(req)
            s.run(req, { () throws(FSError) in try s.fs.unlink(parent: UInt64(parent), name: FuseServer.name(name)) }) { fuse_reply_err(req, 0) }
        }
        ops.rmdir = { req, parent, name in
            FuseServer.count(req, .rmdir)
            let s = server(req)
            s.run(req, { () throws(FSError) in try s.fs.rmdir(parent: UInt64(parent), name: FuseServer.name(name)) }) { fuse_reply_err(req, 0) }
        }
        ops.symlink = { req, link, parent, name in
            FuseServer.count(req, .symlink)
            let s = server(req)
            s.run(req, { () throws(FSError) in try s.fs.symlink(target: FuseServer.name(link), parent: UInt64(parent), name: FuseServer.name(name), caller: caller(req)) }) { s.replyEntry(req, $0.0, $0.1) }
        }
        ops.rename = { req, parent, name, newParent, newName, flags in
            FuseServer.count(req, .rename)
            let s = server(req)
            s.run(req, { () throws(FSError) in
                try s.fs.rename(parent: UInt64(parent), name: FuseServer.name(name), newParent: UInt64(newParent), newName: FuseServer.name(newName), flags: flags)
            }) { fuse_reply_err(req, 0) }
        }
        ops.link = { req, ino, newParent, newName in
            FuseServer.count(req, .link)
            let s = server(req)
            s.run(req, { () throws(FSError) in try s.fs.link(UInt64(ino), newParent: UInt64(newParent), newName: FuseServer.name(newName)) }) { s.replyEntry(req, $0.0, $0.1) }
        }
        ops.getxattr = { req, ino, name, size in
            FuseServer.count(req, .getxattr)
            let s = server(req)
            guard s.xattrs else { fuse_reply_err(req, ENOSYS); return }
            s.run(req, { () throws(FSError) in try s.fs.getxattr(UInt64(ino), name: FuseServer.name(name)) }) { value in
                FuseServer.replySized(req, value, size: size)
            }
        }
        ops.listxattr = { req, ino, size in
            FuseServer.count(req, .listxattr)
            let s = server(req)
            guard s.xattrs else { fuse_reply_err(req, ENOSYS); return }
            s.run(req, { () throws(FSError) in try s.fs.listxattr(UInt64(ino)) }) { names in
                FuseServer.replySized(req, names.flatMap { $0 + [0] }, size: size)
            }
        }
        ops.setxattr = { req, ino, name, value, size, flags in
            FuseServer.count(req, .setxattr)
            let s = server(req)
            guard s.xattrs else { fuse_reply_err(req, ENOSYS); return }
            let bytes = value.map { Array(UnsafeRawBufferPointer(start: $0, count: size)) } ?? []
            let known = FileSystem.XattrFlags(rawValue: flags).intersection([.create, .replace])
            s.run(req, { () throws(FSError) in try s.fs.setxattr(UInt64(ino), name: FuseServer.name(name), value: bytes, flags: known) }) { fuse_reply_err(req, 0) }
        }
        ops.removexattr = { req, ino, name in
            FuseServer.count(req, .removexattr)
            let s = server(req)
            guard s.xattrs else { fuse_reply_err(req, ENOSYS); return }
            s.run(req, { () throws(FSError) in try s.fs.removexattr(UInt64(ino), name: FuseServer.name(name)) }) { fuse_reply_err(req, 0) }
        }
        ops.fallocate = { req, _, mode, offset, length, fi in
            FuseServer.count(req, .fallocate)
            let s = server(req)
            guard let fi else { fuse_reply_err(req, EBADF); return }
            s.run(req, { () throws(FSError) in
                try s.fs.fallocate(handle: fi.pointee.fh, mode: mode, offset: Int64(offset), length: Int64(length))
            }) { fuse_reply_err(req, 0) }
        }
        ops.open = { req, ino, fi in
            FuseServer.count(req, .open)
            let s = server(req)
            guard let fi else { fuse_reply_err(req, EINVAL); return }
            s.run(req, { () throws(FSError) in try s.fs.open(UInt64(ino), flags: fi.pointee.flags, caller: caller(req)) }) { h in
                s.used?(UInt64(ino))
                fi.pointee.fh = h
                // Only this daemon changes the files while mounted: cached pages stay valid
                // (with -o shared, only while the backing file did not change).
                fi.pointee.keep_cache = s.keepCache(node: UInt64(ino), handle: h) ? 1 : 0
                // Writes go straight to the backing file, so close(2) has nothing to flush:
                // spare the kernel a FLUSH round trip per close. Forwarded POSIX locks need
                // it: a close releases the closer's locks.
                fi.pointee.noflush = s.forwardLocks ? 0 : 1
                if fuse_reply_open(req, fi) != 0 { s.fs.release(h) }
            }
        }
        ops.create = { req, parent, name, mode, fi in
            FuseServer.count(req, .create)
            let s = server(req)
            guard let fi else { fuse_reply_err(req, EINVAL); return }
            let flags = fi.pointee.flags
            s.run(req, { () throws(FSError) -> (UInt64, stat, UInt64) in
                do throws(FSError) { return try s.fs.create(parent: UInt64(parent), name: FuseServer.name(name), mode: mode, flags: flags, caller: caller(req)) } catch {
                    // Another host created the name since the kernel's lookup (-o shared): open it.
                    guard s.shared, case .exists = error, flags & O_EXCL == 0 else { throw error }
                    return try s.fs.openExisting(parent: UInt64(parent), name: FuseServer.name(name), flags: flags, caller: caller(req))
                }
            }) { (id, st, h) in
                s.used?(id)
                fi.pointee.fh = h
                fi.pointee.keep_cache = s.keepCache(node: id, handle: h) ? 1 : 0
                fi.pointee.noflush = s.forwardLocks ? 0 : 1
                var e = fuse_entry_param()
                e.ino = fuse_ino_t(id)
                e.attr = st
                e.attr_timeout = s.timeout
                e.entry_timeout = s.timeout
                if fuse_reply_create(req, &e, fi) != 0 { s.fs.release(h) }
            }
        }
        ops.read = { req, _, size, off, fi in
            FuseServer.count(req, .read)
            let s = server(req)
            guard let fi else { fuse_reply_err(req, EBADF); return }
            // Through io_uring, decrypted straight into the ring entry the reply goes out of.
            let buf = s.uring ? xtsfs_ring_reply_buffer(size).map { UnsafeMutableRawBufferPointer(start: $0, count: size) } ?? ThreadScratch.buffer(.request, count: size)
                : ThreadScratch.buffer(.request, count: size)
            s.run(req, { () throws(FSError) in try s.fs.read(handle: fi.pointee.fh, offset: Int64(off), into: buf) }) { n in
                s.requests.add(.bytesRead, UInt64(n))
                fuse_reply_buf(req, buf.baseAddress!.assumingMemoryBound(to: CChar.self), n)
            }
        }
        ops.write = { req, ino, data, size, off, fi in
            FuseServer.count(req, .write)
            let s = server(req)
            s.used?(UInt64(ino))
            guard let fi, let data else { fuse_reply_err(req, EBADF); return }
            // Page writeback (mmap) is no write by the caller: it kills no setuid bit.
            let who = fi.pointee.writepage != 0 ? nil : caller(req)
            s.run(req, { () throws(FSError) in
                try s.fs.write(handle: fi.pointee.fh, offset: Int64(off), data: UnsafeRawBufferPointer(start: data, count: size), caller: who)
            }) { n in
                s.requests.add(.bytesWritten, UInt64(n))
                fuse_reply_write(req, n)
            }
        }
        // Nothing to flush here (writes reach the backing file as they come; the kernel
        // writes its dirty pages back before it would send FLUSH). ENOSYS once makes the
        // kernel stop sending FLUSH on every close(2), which the writeback cache otherwise
        // sends whatever `noflush` says. Forwarded POSIX locks need it: a close releases
        // the closer's locks.
        ops.flush = { req, _, fi in
            FuseServer.count(req, .flush)
            let s = server(req)
            guard s.forwardLocks else { fuse_reply_err(req, ENOSYS); return }
            if let fi { s.fs.releaseLocks(handle: fi.pointee.fh, owner: fi.pointee.lock_owner) }
            fuse_reply_err(req, 0)
        }
        ops.getlk = { req, _, fi, lock in
            let s = server(req)
            guard let fi, let lock else { fuse_reply_err(req, EBADF); return }
            var l = lock.pointee
            s.run(req, { () throws(FSError) in try s.fs.getLock(handle: fi.pointee.fh, owner: fi.pointee.lock_owner, &l) }) {
                _ = fuse_reply_lock(req, &l)
            }
        }
        ops.setlk = { req, _, fi, lock, sleep in
            let s = server(req)
            guard let fi, let lock else { fuse_reply_err(req, EBADF); return }
            let l = lock.pointee, fh = fi.pointee.fh, owner = fi.pointee.lock_owner
            s.lockRequest(req, wait: sleep != 0) { () throws(FSError) in try s.fs.setLock(handle: fh, owner: owner, l) }
        }
        ops.flock = { req, _, fi, op in
            let s = server(req)
            guard let fi else { fuse_reply_err(req, EBADF); return }
            let fh = fi.pointee.fh
            s.lockRequest(req, wait: op & Sys.lockNonBlocking == 0) { () throws(FSError) in try s.fs.flockHandle(fh, operation: op) }
        }
        ops.release = { req, _, fi in
            FuseServer.count(req, .release)
            let s = server(req)
            if let fi {
                if s.forwardLocks { s.fs.releaseLocks(handle: fi.pointee.fh) }
                s.closed(handle: fi.pointee.fh)
                s.fs.release(fi.pointee.fh)
            }
            fuse_reply_err(req, 0)
        }
        ops.fsync = { req, _, datasync, fi in
            FuseServer.count(req, .fsync)
            let s = server(req)
            guard let fi else { fuse_reply_err(req, EBADF); return }
            s.run(req, { () throws(FSError) in try s.fs.fsync(handle: fi.pointee.fh, dataOnly: datasync != 0) }) { fuse_reply_err(req, 0) }
        }
        ops.opendir = { req, ino, fi in
            FuseServer.count(req, .opendir)
            let s = server(req)
            guard let fi else { fuse_reply_err(req, EINVAL); return }
            // ENOSYS: the kernel opens this directory and every other one without us.
            guard !s.noOpendir.load(ordering: .relaxed) else { fuse_reply_err(req, ENOSYS); return }
            s.run(req, { () throws(FSError) in try s.fs.opendir(UInt64(ino)) }) { h in
                fi.pointee.fh = h
                if fuse_reply_open(req, fi) != 0 { s.fs.releasedir(h) }
            }
        }
        ops.readdir = { req, ino, size, off, fi in
            FuseServer.count(req, .readdir)
            let s = server(req)
            guard let fi else { fuse_reply_err(req, EBADF); return }
            if fi.pointee.fh == 0, off == 0 { s.listingExpiry?.listed(UInt64(ino)) }
            let buf = UnsafeMutableRawBufferPointer.allocate(byteCount: size, alignment: 8)
            defer { buf.deallocate() }
            var used = 0
            s.run(req, { () throws(FSError) in
                try s.fs.readdir(ino: UInt64(ino), handle: fi.pointee.fh, offset: UInt64(bitPattern: Int64(off))) { next, entry in
                    var st = stat()
                    st.st_ino = ino_t(entry.ino)
                    st.st_mode = mode_t(entry.type) << 12
                    var name = entry.name
                    name.append(0)
                    let need = name.withUnsafeBufferPointer { p in
                        p.withMemoryRebound(to: CChar.self) { n in
                            fuse_add_direntry(req, buf.baseAddress!.assumingMemoryBound(to: CChar.self) + used, size - used, n.baseAddress, &st, off_t(truncatingIfNeeded: next))
                        }
                    }
                    if need > size - used { return false }
                    used += need
                    return true
                }
            }) { fuse_reply_buf(req, buf.baseAddress!.assumingMemoryBound(to: CChar.self), used) }
        }
        // With attributes: `ls -l`, `rm -rf` and `find` then send no LOOKUP per entry.
        ops.readdirplus = { req, ino, size, off, fi in
            FuseServer.count(req, .readdirplus)
            let s = server(req)
            guard let fi else { fuse_reply_err(req, EBADF); return }
            if fi.pointee.fh == 0, off == 0 { s.listingExpiry?.listed(UInt64(ino)) }
            let buf = UnsafeMutableRawBufferPointer.allocate(byteCount: size, alignment: 8)
            defer { buf.deallocate() }
            var used = 0
            let fs = s.fs
            s.run(req, { () throws(FSError) in
                try fs.readdir(ino: UInt64(ino), handle: fi.pointee.fh, offset: UInt64(bitPattern: Int64(off))) { next, entry in
                    var name = entry.name
                    name.append(0)
                    return name.withUnsafeBufferPointer { p in
                        p.withMemoryRebound(to: CChar.self) { n in
                            let at = buf.baseAddress!.assumingMemoryBound(to: CChar.self) + used
                            // The size first: an entry that does not fit must not be looked up
                            // (the kernel would never learn of that lookup).
                            let need = fuse_add_direntry_plus(req, nil, 0, n.baseAddress, nil, off_t(truncatingIfNeeded: next))
                            if need > size - used { return false }
                            var e = fuse_entry_param()
                            if let (id, st) = fs.lookupListed(parent: UInt64(ino), entry) {
                                e.ino = fuse_ino_t(id)
                                e.attr = st
                                e.attr_timeout = s.timeout
                                e.entry_timeout = s.timeout
                            } else {
                                // "." and "..", or an entry gone since it was listed: listed, not looked up.
                                e.attr.st_ino = ino_t(entry.ino)
                                e.attr.st_mode = mode_t(entry.type) << 12
                            }
                            used += fuse_add_direntry_plus(req, at, size - used, n.baseAddress, &e, off_t(truncatingIfNeeded: next))
                            return true
                        }
                    }
                }
            }) { fuse_reply_buf(req, buf.baseAddress!.assumingMemoryBound(to: CChar.self), used) }
        }
        ops.releasedir = { req, _, fi in
            FuseServer.count(req, .releasedir)
            if let fi { server(req).fs.releasedir(fi.pointee.fh) }
            fuse_reply_err(req, 0)
        }
        ops.fsyncdir = { req, ino, _, _ in
            FuseServer.count(req, .fsyncdir)
            let s = server(req)
            s.run(req, { () throws(FSError) in try s.fs.fsyncdir(UInt64(ino)) }) { fuse_reply_err(req, 0) }
        }
        ops.statfs = { req, _ in
            FuseServer.count(req, .statfs)
            let s = server(req)
            s.run(req, { () throws(FSError) in try s.fs.statfs() }) { st in
                var st = st
                fuse_reply_statfs(req, &st)
            }
        }
        return ops
    }()
}

/// One waiting lock request: retried with growing pauses (1 ms to 50 ms) until the lock
/// is acquired, fails, or the kernel interrupts the request (the caller got a signal).
/// Counted in its server's `lockWaiters` until it has answered.
final class LockWaiter: @unchecked Sendable {
    let req: Int
    let server: FuseServer
    let attempt: () -> Int32?
    init(req: Int, server: FuseServer, attempt: @escaping () -> Int32?) { self.req = req; self.server = server; self.attempt = attempt }

    func run() {
        defer { server.lockWaiters.subtract(1, ordering: .sequentiallyConsistent) }
        let r = fuse_req_t(bitPattern: req)
        var pause: UInt32 = 1000
        while true {
            if fuse_req_interrupted(r) != 0 || server.ending.load(ordering: .sequentiallyConsistent) { fuse_reply_err(r, EINTR); return }
            usleep(pause)
            pause = min(pause * 2, 50_000)
            if let e = attempt() { fuse_reply_err(r, e); return }
        }
    }
}
