import CSysShim
import Synchronization
import XTSCrypto
import XTSFormat
import XTSFS
import XTSFuse
import XTSKeys
import XTSSystem
#if canImport(Glibc)
import Glibc
#endif

public struct MountRequest: Sendable {
    public var cipherDir: String
    public var mountpoint: String
    /// User's `-o` options.
    public var options: [String]
    public var foreground: Bool
    public var debug: Bool
    /// The temp and cache areas to mount beside the data area (`--tmp`, `--cache`).
    public var areas: AreaOptions

    public init(cipherDir: String, mountpoint: String, options: [String], foreground: Bool, debug: Bool = false, areas: AreaOptions = AreaOptions()) {
        self.cipherDir = cipherDir
        self.mountpoint = mountpoint
        self.options = options
        self.foreground = foreground
        self.debug = debug
        self.areas = areas
    }

    public var readOnly: Bool { options.contains("ro") }

    /// How long the kernel may cache names and attributes, in seconds. Only this daemon
    /// changes CIPHERDIR while it is mounted, so caching is safe; 10 s made reading a
    /// 15,000-file tree 14% faster than 1 s. Lower it (0: no caching) when something else
    /// also writes CIPHERDIR, such as a sync client.
    public static let defaultCacheTimeout = 10.0
    static let cacheTimeoutKey = "cache_timeout="
    /// `-o noxattr`: no extended attributes at all. The kernel then stops asking for them,
    /// which spares a round trip per write (security.capability) and two per entry of
    /// `ls -l` (security.selinux, system.posix_acl_access).
    static let noXattrKey = "noxattr"
    public var xattrs: Bool { !options.contains(MountRequest.noXattrKey) }
    /// `-o shared`: CIPHERDIR is on storage other hosts mount too; nothing another host can
    /// change is trusted from a cache without revalidation (README, "Several hosts").
    static let sharedKey = "shared"
    public var shared: Bool { options.contains(MountRequest.sharedKey) }
    /// `-o uring`: FUSE over io_uring (a request queue per CPU, served on that CPU) instead
    /// of /dev/fuse, where the kernel offers it (Linux 6.14+, `enable_uring`). Opt-in; not
    /// with `-o shared` (see `FuseServer.uring`).
    static let uringKey = "uring"
    public var uring: Bool { options.contains(MountRequest.uringKey) }
    static let writebackKey = "writecache"
    static let noWritebackKey = "nowritecache"
    /// The kernel's writeback cache, opt-in (`-o writecache`): writes land in the page
    /// cache and reach the daemon in page-aligned batches. Not the default: a concurrent
    /// soak with it and READDIRPLUS failed opens with ENOENT, and ran clean with either
    /// off (suspect: the kernel's ctime SETATTR after unlink, link and rename; xtsfs(1),
    /// BUGS). Never
    /// with `-o shared`: the kernel would trust its own idea of size and times.
    public var writebackCache: Bool {
        options.contains(MountRequest.writebackKey) && !options.contains(MountRequest.noWritebackKey) && !shared
    }

    public func cacheTimeout() throws(VolumeError) -> Double {
        guard let opt = options.last(where: { $0.hasPrefix(MountRequest.cacheTimeoutKey) }) else { return shared ? 0 : MountRequest.defaultCacheTimeout }
        guard let v = Double(opt.dropFirst(MountRequest.cacheTimeoutKey.count)), v >= 0, v <= 86400 else {
            throw .usage("-o \(opt): give a number of seconds from 0 to 86400")
        }
        // Other hosts change names and attributes: the kernel must ask every time.
        if shared && v > 0 { throw .usage("-o \(opt) with -o shared: names and attributes another host can change are never cached (cache_timeout=0)") }
        return v
    }

    /// The options handed to libfuse: the kernel checks permissions (default_permissions),
    /// other users may enter when we run as root, plus the user's own (less ours).
    var fuseOptions: [String] { fuseOptions(fsname: cipherDir) }

    /// The same for an area: its fsname marks it as one of CIPHERDIR's areas; `ro` is the
    /// data area's alone (temp and cache exist to be written).
    func fuseOptions(area: Areas.Kind) -> [String] {
        fuseOptions(fsname: cipherDir + area.fsnameSuffix).filter { $0 != "ro" }
    }

    func fuseOptions(fsname: String) -> [String] {
        var o = ["default_permissions", "fsname=" + fsname.replacingAll(",", with: "\\,"), "subtype=xtsfs"]
        if geteuid() == 0 && !options.contains("allow_other") { o.append("allow_other") }
        o += options.filter { $0 != "nonempty" && $0 != MountRequest.noXattrKey && $0 != MountRequest.noWritebackKey && $0 != MountRequest.writebackKey && $0 != MountRequest.sharedKey && $0 != MountRequest.uringKey && !$0.hasPrefix(MountRequest.cacheTimeoutKey) }
        return o
    }
}

/// Mounting: unlock in the foreground process (so a wrong passphrase is reported at once),
/// then either serve here (`-f`) or start a daemon that gets the key through a pipe and
/// tells us when the mount is ready.
public enum Mounter {
    /// The fds the daemon child finds its key on and reports readiness to.
    static let keyFD: Int32 = 3
    static let statusFD: Int32 = 4

    public static func absolute(_ path: String) -> String {
        guard let p = realpath(path, nil) else { return path }
        defer { free(p) }
        return String(cString: p)
    }

    /// Refuses a mountpoint that is missing, not a directory, already mounted, stale or
    /// (without `-o nonempty`) not empty.
    public static func checkMountpoint(_ mp: String, allowNonEmpty: Bool) throws(VolumeError) {
        // From the mount table first: a stat of a mount whose daemon hangs would hang too.
        if MountEntry.fuse(at: mp) != nil {
            // lstat of a dead FUSE mount's root may still succeed; statfs asks the daemon.
            if case .failure(let e) = Result(catching: { () throws(SystemError) in _ = try Sys.lstat(mp); _ = try Sys.statvfs(mp) }), e.errno == ENOTCONN {
                throw .mountFailed("\(mp): a stale mount (Transport endpoint is not connected); clear it with: fusermount3 -u -z \(mp)")
            }
            throw .mountFailed("\(mp) is already a mount point (busy)")
        }
        let st: stat
        do { st = try Sys.lstat(mp) } catch {
            if error.errno == ENOTCONN {
                throw .mountFailed("\(mp): a stale mount (Transport endpoint is not connected); clear it with: fusermount3 -u -z \(mp)")
            }
            throw .mountFailed("mountpoint \(mp) does not exist")
        }
        guard st.isDirectory else { throw .mountFailed("mountpoint \(mp) is not a directory") }
        if let parent = try? Sys.lstat(mp + "/.."), parent.st_dev != st.st_dev || (parent.st_ino == st.st_ino && mp != "/") {
            throw .mountFailed("\(mp) is already a mount point (busy)")
        }
        if !allowNonEmpty, let entries = try? Sys.listDirectory(mp), !entries.isEmpty {
            throw .mountFailed("mountpoint \(mp) is not empty (use -o nonempty to mount over it)")
        }
    }

    /// Refuses a mount point that is CIPHERDIR, lies inside it, or lies above it. The daemon
    /// would serve its own mount: every access to the backing files goes through the
    /// kernel back to the daemon, which waits for itself (a deadlock), or the mount hides
    /// CIPHERDIR. Compared by components of the real paths (so `/a/bc` is not inside
    /// `/a/b`), without touching the filesystem.
    public static func checkOverlap(cipherDir: String, mountpoint mp: String) throws(VolumeError) {
        let c = cipherDir.split(separator: "/"), m = mp.split(separator: "/")
        if c == m { throw overlap(cipherDir, mp, "it is CIPHERDIR itself") }
        if m.starts(with: c) { throw overlap(cipherDir, mp, "it is inside CIPHERDIR") }
        if c.starts(with: m) { throw overlap(cipherDir, mp, "it is above CIPHERDIR (a parent directory of it)") }
    }

    static func overlap(_ cipherDir: String, _ mp: String, _ why: String) -> VolumeError {
        .mountFailed("cannot mount on \(mp): \(why); choose a mount point outside CIPHERDIR \(cipherDir)")
    }

    /// The same by the identity (device and inode) of every ancestor, which also sees one
    /// directory reached through two paths (a bind mount). Stats the mount point: call it
    /// after `checkMountpoint` has ruled out a stale mount there.
    static func checkOverlapByIdentity(cipherDir: String, mountpoint mp: String) throws(VolumeError) {
        let c = cipherDir.split(separator: "/"), m = mp.split(separator: "/")
        func identity(_ p: String) -> [UInt64]? {
            guard let st = try? Sys.lstat(p) else { return nil }
            return [UInt64(st.st_dev), UInt64(st.st_ino)]
        }
        func ancestors(_ parts: [Substring]) -> [[UInt64]] {
            (0...parts.count).compactMap { n in identity("/" + parts.prefix(n).joined(separator: "/")) }
        }
        if let cid = identity(cipherDir), ancestors(m).contains(cid) {
            throw overlap(cipherDir, mp, "it is inside CIPHERDIR (reached through another path, such as a bind mount)")
        }
        if let mid = identity(mp), ancestors(c).contains(mid) {
            throw overlap(cipherDir, mp, "it is above CIPHERDIR (reached through another path, such as a bind mount)")
        }
    }

    /// What can be checked before asking for a key: the mount point, and that CIPHERDIR
    /// holds a readable header. Returns the request with absolute paths.
    public static func preflight(_ request: MountRequest) throws(VolumeError) -> MountRequest {
        var req = request
        req.cipherDir = absolute(req.cipherDir)
        req.mountpoint = absolute(req.mountpoint)
        _ = try req.cacheTimeout()
        if req.uring && req.shared {
            throw .usage("-o uring with -o shared: locks are forwarded to CIPHERDIR there, and a lock waiter would hold its CPU's request queue; use one or the other")
        }
        try checkOverlap(cipherDir: req.cipherDir, mountpoint: req.mountpoint)
        try checkSwapped(cipherDir: req.cipherDir, mountpoint: req.mountpoint)
        try checkMountpoint(req.mountpoint, allowNonEmpty: req.options.contains("nonempty"))
        try checkOverlapByIdentity(cipherDir: req.cipherDir, mountpoint: req.mountpoint)
        _ = try Volume.load(req.cipherDir)
        req.areas = try preflightAreas(req)
        return req
    }

    /// The command's mount: returns the exit status once the mount is ready (or failed),
    /// or when the foreground filesystem is unmounted.

    public static func mount(_ request: MountRequest, provider: any KeyProvider, slot: UInt16? = nil, audit: AuditLog? = nil,
                             say: @escaping @Sendable (String) -> Void,
                             mounted: @escaping @Sendable () -> Void = {}) throws(VolumeError) -> Int32 {
        let req = try preflight(request)
        let unlocked = try Volume.unlock(req.cipherDir, provider: provider, slot: slot, audit: audit, operation: "mount")
        var warnings = unlocked.warnings
        // In the middle of a DEK rekey: both generations are served (new objects get the
        // new one), once the copies an interrupted sweep left are finished.
        let newer = try Rekey.pendingKeys(unlocked.header, old: unlocked.keys)
        if let newer {
            warnings += try Rekey.finishInterruptedCopies(cipherDir: req.cipherDir, old: unlocked.keys, new: newer,
                                                          unitTags: unlocked.header.features.unitTags)
            warnings.append("a DEK rekey of \(req.cipherDir) (generation \(unlocked.keys.generation) -> \(newer.generation)) is unfinished: objects of both generations are served; finish it with xtsfs rekey --dek \(req.cipherDir)")
        }
        provider.release()
        for w in warnings { say("warning: " + w) }
        if geteuid() == 0, let why = DaemonPrivileges.othersCanChange(req.cipherDir) {
            say("warning: other users can change CIPHERDIR \(req.cipherDir) (\(why)); this root mount serves what they put there to every user of it")
        }
        if req.foreground {
            ProcessHardening.apply()
            return serve(req, keys: unlocked.keys, newer: newer, features: unlocked.header.features, log: { say($0) }) { result in
                switch result {
                case .success:
                    let areas = [req.areas.temp.map { "temp area on \($0)" }, req.areas.cache.map { "cache area on \($0)" }].compactMap { $0 }
                    say("mounted \(req.cipherDir) on \(req.mountpoint)" + (areas.isEmpty ? "" : " (" + areas.joined(separator: ", ") + ")") + "; serving in the foreground (unmount with: xtsfs unmount \(req.mountpoint))")
                    mounted()
                case .failure(let e): say("error: \(e)")
                }
            }
        }
        let status = try spawnDaemon(req, keys: unlocked.keys)
        if status == 0, let file = DamageLog.destination(mountpoint: req.mountpoint) {
            say("no syslog on this machine (\(DamageLog.syslogSocket)): warnings about damaged data go to \(file)")
        }
        if status == 0 { mounted() }
        return status
    }

    // MARK: - serving

    nonisolated(unsafe) static var servedMountpoints: [String] = []
    /// Each served mount's request counters, logged on SIGUSR1; set before the signal
    /// thread starts.
    nonisolated(unsafe) static var servedRequests: [(String, RequestCounts)] = []
    nonisolated(unsafe) static var serveLog: (@Sendable (String) -> Void)?

    /// Mounts and serves until unmounted: the data area, and the temp and cache areas when
    /// asked, each its own FUSE session in this one process. `ready` hears once whether
    /// every mount is up: only after the kernel's FUSE INIT has been answered and accepted
    /// on each, which is when libfuse rejects what it cannot do (`-o max_read=N` without a
    /// matching `max_read` in init()) and ends the session; mount(2) alone succeeding
    /// proves nothing. Unmounting the data area unmounts the others.
    /// `keys`: the generation the header names (areas are keyed from it); `newer`: the new
    /// generation of an unfinished DEK rekey, which the data area then writes with.
    static func serve(_ req: MountRequest, keys: KeySet, newer: KeySet?, features: Features, log: @escaping @Sendable (String) -> Void,
                      ready: @escaping @Sendable (Result<Void, VolumeError>) -> Void) -> Int32 {
        let fs: FileSystem
        do {
            fs = try FileSystem(cipherDir: req.cipherDir, keys: newer ?? keys, olderKeys: newer == nil ? [] : [keys], readOnly: req.readOnly,
                                unitTags: features.unitTags, listingManifests: features.contains(.listingManifests), log: log)
        } catch {
            ready(.failure(.corruptHeader("cannot open the root directory: \(error)")))
            return ExitStatus.corruptHeader.rawValue
        }
        fs.sharedStorage = req.shared
        // Signals go to one thread that unmounts (or, for SIGUSR1, logs the request
        // counts); libfuse's workers never see them.
        var set = sigset_t()
        sigemptyset(&set)
        for s in [SIGINT, SIGTERM, SIGHUP, SIGUSR1] { sigaddset(&set, s) }
        pthread_sigmask(SIG_BLOCK, &set, nil)
        let timeout: Double
        do { timeout = try req.cacheTimeout() } catch {
            ready(.failure(error))
            return error.exitStatus.rawValue
        }
        var servers = [FuseServer(fs: fs, mountpoint: req.mountpoint, options: req.fuseOptions, cacheTimeout: timeout, xattrs: req.xattrs, writebackCache: req.writebackCache,
                                  forwardLocks: req.shared, shared: req.shared, debug: req.debug, uring: req.uring)]
        servers[0].logLine = log
        let areas: [Areas.Prepared]
        do { areas = try prepareAreas(req, keys: keys, log: log) } catch {
            ready(.failure(error))
            return error.exitStatus.rawValue
        }
        var eviction: CacheEviction?
        var control: CacheControl?
        // Online DEK rekey through the daemon (not of a read-only mount).
        let rekeyControl = req.readOnly ? nil : RekeyControl(cipherDir: req.cipherDir, keys: keys, fs: fs, log: log)
        defer {
            rekeyControl?.stop()
            control?.stop()
            eviction?.stop()
            finishAreas(areas, log: log)
        }
        for a in areas {
            do {
                let afs = try FileSystem(cipherDir: a.rootPath, keys: a.keys, readOnly: false, log: log)
                let server = FuseServer(fs: afs, mountpoint: a.mountpoint, options: req.fuseOptions(area: a.kind), cacheTimeout: timeout, xattrs: req.xattrs, writebackCache: req.writebackCache, debug: req.debug)
                if a.kind == .cache {
                    control = CacheControl(cipherDir: req.cipherDir, area: a, volumeKeys: keys, server: server, log: log)
                }
                if a.kind == .cache, let max = req.areas.cacheMax {
                    let e = CacheEviction(fs: { [unowned server] in server.fs }, maxBytes: max, log: log)
                    server.used = { e.used($0) }
                    e.invalidate = { [unowned server] parent, name in server.invalidate(parent: parent, name: name) }
                    eviction = e
                }
                servers.append(server)
            } catch {
                ready(.failure(.mountFailed("\(a.kind.rawValue) area: cannot open its root directory: \(error)")))
                return ExitStatus.mountFailed.rawValue
            }
        }
        // Every mount is made before the privileges go: none can be made after.
        for (i, server) in servers.enumerated() {
            do { try server.mount() } catch {
                for done in servers[..<i] { done.abandon() }
                ready(.failure(.mountFailed("\(error)")))
                return ExitStatus.mountFailed.rawValue
            }
        }
        servedMountpoints = servers.map(\.mountpoint)
        servedRequests = servers.map { ($0.mountpoint, $0.requests) }
        serveLog = log
        // The mounts are made: give up what serving does not need before any serving
        // thread exists (they inherit it). Unmounting is left to a helper started first.
        if !UnmountHelper.start(cipherDir: req.cipherDir, mountpoints: servedMountpoints) {
            log("warning: cannot start the unmount helper; SIGTERM may not be able to unmount")
        }
        if let w = DaemonPrivileges.restrict(to: DaemonPrivileges.serving) { log(w) }
        let lockWarning = "warning: some key memory could not be locked (raise RLIMIT_MEMLOCK or run as root); keys may reach swap, never a core dump"
        if LockedBuffer.lockFailed { log(lockWarning) }
        LockedBuffer.lockFailureHandler = { log(lockWarning) }
        var thread = pthread_t()
        pthread_create(&thread, nil, { _ in
            var set = sigset_t()
            sigemptyset(&set)
            for s in [SIGINT, SIGTERM, SIGHUP, SIGUSR1] { sigaddset(&set, s) }
            var sig: Int32 = 0
            while sigwait(&set, &sig) == 0 && sig == SIGUSR1 {
                for (mountpoint, counts) in Mounter.servedRequests {
                    let line = "\(mountpoint): \(counts.summary)"
                    Mounter.serveLog?(line)
                    _ = (line + "\n").withCString { Glibc.write(2, $0, strlen($0)) }
                }
            }
            // Seen in the foreground (-f); the daemon's stderr is /dev/null.
            let note = "xtsfs: unmounting \(Mounter.servedMountpoints.joined(separator: ", ")); the daemon exits once no file in them is in use\n"
            _ = note.withCString { Glibc.write(2, $0, strlen($0)) }
            if !UnmountHelper.request() { for mp in Mounter.servedMountpoints { _ = Mounter.lazyUnmount(mp) } }
            return nil
        }, nil)
        // A mount that fails after the others came up (an area refused at INIT) takes
        // the others down with it: `mount` reports the failure, nothing stays mounted.
        let all = ReadyAll(count: servers.count) { result in
            ready(result)
            if case .failure = result, !UnmountHelper.request() {
                for mp in Mounter.servedMountpoints { _ = Mounter.lazyUnmount(mp) }
            }
        }
        let readiness = servers.map { s in
            Readiness(mountpoint: s.mountpoint, device: MountEntry.fuse(at: s.mountpoint)?.device, ready: { all.report($0) })
        }
        readiness.forEach { $0.startWaiting() }
        eviction?.start()
        control?.start()
        if let control { rekeyControl?.finished = { control.rekeyed(to: $0) } }
        rekeyControl?.start()
        var areaThreads: [(Int, FuseServerThread)] = []
        for i in servers.indices.dropFirst() {
            if let t = FuseServerThread.start(servers[i]) { areaThreads.append((i, t)) } else {
                readiness[i].report(.failure(.mountFailed("cannot start a thread to serve \(servers[i].mountpoint)")))
            }
        }
        // Other hosts see this mount (xtsfs status, and offline operations refuse) until it ends.
        let presence = Presence(cipherDir: req.cipherDir, mountpoint: req.mountpoint, shared: req.shared, log: log)
        presence.start()
        let r = servers[0].run()
        presence.stop()
        // The data area is gone (unmounted, or INIT refused): the areas go with it. libfuse
        // unmounts when a session ends by itself (INIT refused), but no longer may.
        let left = servers.indices.filter { i in
            readiness[i].device.map { MountEntry.fuse(at: servers[i].mountpoint)?.device == $0 } ?? false
        }
        if !left.isEmpty && !UnmountHelper.unmountAndWait() {
            for i in left { _ = lazyUnmount(servers[i].mountpoint) }
        }
        for (i, t) in areaThreads {
            _ = t.join()
            readiness[i].report(.failure(.mountFailed("FUSE ended the session on \(servers[i].mountpoint) before the mount was ready")))
        }
        readiness[0].report(.failure(.mountFailed("FUSE ended the session before the mount was ready: the kernel's INIT request failed (a mount option libfuse cannot honour? see the libfuse message above)")))
        if readiness.contains(where: { $0.outcome != true }) { return ExitStatus.mountFailed.rawValue }
        return r == 0 ? 0 : ExitStatus.failure.rawValue
    }

    /// Reports success once every mount has, or the first failure.
    final class ReadyAll: Sendable {
        let ready: @Sendable (Result<Void, VolumeError>) -> Void
        /// Mounts still to report success; nil once told.
        let pending: Mutex<Int?>
        init(count: Int, ready: @escaping @Sendable (Result<Void, VolumeError>) -> Void) {
            self.ready = ready
            pending = Mutex(count)
        }
        func report(_ result: Result<Void, VolumeError>) {
            let tell: Bool = pending.withLock { p in
                guard let n = p else { return false }
                if case .success = result, n > 1 { p = n - 1; return false }
                p = nil
                return true
            }
            if tell { ready(result) }
        }
    }

    /// Tells `ready` once, from whichever side knows first: a thread whose stat of the mount
    /// point returns once the kernel has had INIT answered (a stat of a FUSE mount waits
    /// for that), or the session ending before it (INIT refused).
    final class Readiness: Sendable {
        let mountpoint: String
        /// "major:minor" of our mount, to tell it from the directory under it once unmounted.
        let device: String?
        let ready: @Sendable (Result<Void, VolumeError>) -> Void
        /// nil until told; then whether the mount came up.
        let told = Mutex<Bool?>(nil)
        var outcome: Bool? { told.withLock { $0 } }

        init(mountpoint: String, device: String?, ready: @escaping @Sendable (Result<Void, VolumeError>) -> Void) {
            self.mountpoint = mountpoint
            self.device = device
            self.ready = ready
        }

        /// True if this call was the one that told.
        @discardableResult
        func report(_ result: Result<Void, VolumeError>) -> Bool {
            let first = told.withLock { t in
                guard t == nil else { return false }
                if case .success = result { t = true } else { t = false }
                return true
            }
            if first { ready(result) }
            return first
        }

        func startWaiting() {
            var thread = pthread_t()
            let me = Unmanaged.passRetained(self).toOpaque()
            let r = pthread_create(&thread, nil, { arg in
                let me = Unmanaged<Readiness>.fromOpaque(arg!).takeRetainedValue()
                me.wait()
                return nil
            }, me)
            if r == 0 { pthread_detach(thread) } else {
                Unmanaged<Readiness>.fromOpaque(me).release()
                report(.success(()))
            }
        }

        func wait() {
            let st: stat
            do { st = try Sys.lstat(mountpoint) } catch {
                report(.failure(.mountFailed("the FUSE mount on \(mountpoint) did not start: \(String(cString: strerror(error.errno))) (a mount option libfuse cannot honour? see the libfuse message above)")))
                // libfuse's reason is out; its teardown will add "failed to unmount: Operation
                // not permitted" (the daemon gave that right to the helper, which unmounts).
                let null = Glibc.open("/dev/null", O_WRONLY)
                if null >= 0 { dup2(null, 2); Sys.close(null) }
                return
            }
            let dev = UInt64(st.st_dev)
            let major = ((dev >> 8) & 0xfff) | ((dev >> 32) & ~0xfff)
            let minor = (dev & 0xff) | ((dev >> 12) & ~0xff)
            if let device, device != "\(major):\(minor)" {
                report(.failure(.mountFailed("the FUSE mount on \(mountpoint) went away before it was ready")))
                return
            }
            report(.success(()))
        }
    }

    // MARK: - the daemon

    static func selfExecutable() -> String {
        (try? Sys.readlink("/proc/self/exe")).map { String(decoding: $0, as: UTF8.self) } ?? CommandLine.arguments[0]
    }

    static func spawnDaemon(_ req: MountRequest, keys: KeySet) throws(VolumeError) -> Int32 {
        var keyPipe: [Int32] = [0, 0], statusPipe: [Int32] = [0, 0]
        guard xts_pipe_cloexec(&keyPipe) == 0, xts_pipe_cloexec(&statusPipe) == 0 else {
            throw .failure("pipe: \(String(cString: strerror(errno)))")
        }
        let exe = selfExecutable()
        var args = ["xtsfs", "mount", "--daemon-child", req.cipherDir, req.mountpoint]
        if !req.options.isEmpty { args += ["-o", req.options.joined(separator: ",")] }
        args += req.areas.arguments
        var cargs: [UnsafeMutablePointer<CChar>?] = args.map { strdup($0) } + [nil]
        defer { cargs.forEach { free($0) } }
        var pid: pid_t = 0
        let r = xts_spawn_daemon(&pid, exe, &cargs, environ, keyPipe[0], statusPipe[1])
        Sys.close(keyPipe[0]); Sys.close(statusPipe[1])
        guard r == 0 else {
            Sys.close(keyPipe[1]); Sys.close(statusPipe[0])
            throw .mountFailed("cannot start the daemon: \(String(cString: strerror(r)))")
        }
        // A daemon that died before reading would kill us with SIGPIPE; get EPIPE instead
        // and report the failure.
        signal(SIGPIPE, SIG_IGN)
        // Generation (4 bytes, little-endian) then the DEK, straight from locked memory.
        var gen = keys.generation.littleEndian
        var ok = Glibc.write(keyPipe[1], &gen, 4) == 4
        ok = ok && keys.dek.withUnsafeBytes { Glibc.write(keyPipe[1], $0.baseAddress, $0.count) == $0.count }
        Sys.close(keyPipe[1])
        var reply = [UInt8]()
        var byte: UInt8 = 0
        while Glibc.read(statusPipe[0], &byte, 1) == 1 { reply.append(byte) }
        Sys.close(statusPipe[0])
        let text = String(decoding: reply, as: UTF8.self)
        if ok && text.hasPrefix("OK") { return 0 }
        var status: Int32 = 0
        while waitpid(pid, &status, 0) < 0 && errno == EINTR {}
        if let space = text.firstIndex(of: " "), text.hasPrefix("E"), let code = Int32(text.dropFirst().prefix(upTo: space)) {
            throw VolumeError.fromStatus(code, String(text[text.index(after: space)...]))
        }
        throw .mountFailed("the mount daemon exited before the mount was ready")
    }

    /// Entry point of the daemon process (`xtsfs mount --daemon-child`).
    public static func runDaemonChild(_ request: MountRequest) -> Int32 {
        ProcessHardening.apply()
        // Processes libfuse starts (fusermount3 for auto_unmount) must not hold our pipes open.
        _ = fcntl(keyFD, F_SETFD, FD_CLOEXEC)
        _ = fcntl(statusFD, F_SETFD, FD_CLOEXEC)
        let dek = SecretBytes(count: KeySet.dekLength)
        var gen: UInt32 = 0
        let gotGen = Glibc.read(keyFD, &gen, 4) == 4
        let gotKey = dek.withUnsafeMutableBytes { p in
            var n = 0
            while n < p.count {
                let r = Glibc.read(keyFD, p.baseAddress! + n, p.count - n)
                if r <= 0 { if r < 0 && errno == EINTR { continue }; return false }
                n += r
            }
            return true
        }
        Sys.close(keyFD)
        // Paths are absolute by now; do not keep the caller's directory busy.
        _ = chdir("/")
        // Warnings must reach the user: syslog where there is one, else a file (DamageLog).
        let log = DamageLog.daemonSink(mountpoint: request.mountpoint)
        @Sendable func report(_ text: String) {
            _ = text.withCString { Glibc.write(statusFD, $0, strlen($0)) }
            Sys.close(statusFD)
        }
        guard gotGen, gotKey else { report("E\(ExitStatus.failure.rawValue) no key from the parent process"); return ExitStatus.failure.rawValue }
        let keys: KeySet, features: Features, newer: KeySet?
        do {
            let opened = try Volume.opened(request.cipherDir, dek: dek, generation: UInt32(littleEndian: gen))
            (keys, features) = (opened.keys, opened.header.features)
            newer = try Rekey.pendingKeys(opened.header, old: keys)
        } catch {
            report("E\(error.exitStatus.rawValue) \(error)")
            return error.exitStatus.rawValue
        }
        return serve(request, keys: keys, newer: newer, features: features, log: log) { result in
            switch result {
            case .success:
                if DamageLog.destination(mountpoint: request.mountpoint) != nil {
                    log("serving \(request.cipherDir) on \(request.mountpoint)")
                }
                report("OK")
                // Detach from the terminal and from any pipe the caller reads to its end.
                let null = Glibc.open("/dev/null", O_RDWR)
                if null >= 0 { dup2(null, 1); dup2(null, 2); if null > 2 { Sys.close(null) } }
            case .failure(let e):
                report("E\(e.exitStatus.rawValue) \(e)")
            }
        }
    }

    // MARK: - unmounting

    /// Detaches the mount even if busy (used on SIGTERM/SIGINT).
    static func lazyUnmount(_ mp: String) -> Bool {
        if geteuid() == 0 && umount2(mp, Int32(MNT_DETACH)) == 0 { return true }
        return run(["fusermount3", "-u", "-z", mp]) == 0
    }

    /// Runs a helper program; `quiet` sends its stderr to /dev/null (we say what failed ourselves).
    static func run(_ argv: [String], quiet: Bool = false) -> Int32 {
        var cargs: [UnsafeMutablePointer<CChar>?] = argv.map { strdup($0) } + [nil]
        defer { cargs.forEach { free($0) } }
        return xts_run(argv[0], &cargs, environ, quiet ? 1 : 0)
    }

    public static func unmount(_ mountpoint: String) throws(VolumeError) {
        let mp = absolute(mountpoint)
        guard isMounted(mp) else {
            if let other = MountEntry.all().last(where: { $0.mountpoint == mp }) {
                throw .failure("\(mp) is not an xtsfs mount (it is a \(other.fsType) mount); xtsfs unmounts only its own")
            }
            throw .failure("\(mp) is not mounted")
        }
        let areas = areaMounts(ofDataMount: mp)
        guard run(["fusermount3", "-u", mp], quiet: true) == 0 || (geteuid() == 0 && umount2(mp, 0) == 0) else {
            throw .failure("cannot unmount \(mp) (busy? close the files open in it)")
        }
        // The daemon detaches its temp and cache areas once the data area is gone; wait
        // for that, and do it here if it does not happen (a daemon that hangs).
        var deadline = 250
        while deadline > 0 && areas.contains(where: { MountEntry.fuse(at: $0.mountpoint)?.device == $0.device }) {
            usleep(20_000)
            deadline -= 1
        }
        for a in areas where MountEntry.fuse(at: a.mountpoint)?.device == a.device {
            _ = run(["fusermount3", "-u", a.mountpoint], quiet: true) == 0 || lazyUnmount(a.mountpoint)
        }
    }

    /// Whether `mp` is a FUSE mount point, from /proc/self/mountinfo.
    public static func isMounted(_ mp: String) -> Bool {
        MountEntry.fuse(at: mp) != nil
    }
}

extension VolumeError {
    static func fromStatus(_ code: Int32, _ message: String) -> VolumeError {
        switch ExitStatus(rawValue: code) {
        case .notAVolume: .notAVolume(message)
        case .corruptHeader: .corruptHeader(message)
        case .wrongKey: .wrongKey(message)
        case .unsupported: .unsupported(message)
        case .refused: .refused(message)
        case .badInput: .badInput(message)
        case .providerFailed: .providerFailed(message)
        case .failure: .failure(message)
        default: .mountFailed(message)
        }
    }
}

extension String {
    func replacingAll(_ a: Character, with b: String) -> String {
        var out = ""
        for c in self { if c == a { out += b } else { out.append(c) } }
        return out
    }
}
