import CSysShim
import XTSContent
import XTSSystem
#if canImport(Glibc)
import Glibc
#endif

/// Who has the volume mounted: each mount's daemon keeps a presence record in
/// `CIPHERDIR/xtsfs.hosts/HOSTID.PID` (HOSTID as the audit log's, PID the daemon's), written
/// at mount, rewritten every `refreshInterval` seconds with a new expiry `lifetime` seconds
/// ahead, and removed on a clean unmount. `xtsfs status` lists them; the offline operations
/// that must not run under another host's feet (`rekey --dek`, `fsck --repair`,
/// `header restore`) refuse while a live one exists.
///
/// A record is "live" until it expires; one of this machine whose daemon is gone (kill -9,
/// crash) is "dead" at once. Records are hostile input: at most `maxSize` bytes, regular
/// files only (never through a symlink, never a FIFO opened), and a record that does not
/// parse is ignored with a log line.
public final class Presence: @unchecked Sendable {
    public static let directoryName = BackingEntry.presenceName
    public static let maxSize = 4096
    /// Seconds a record stays live without a refresh; generous against clock skew between hosts.
    public static let lifetime: Int64 = 120
    public static let refreshInterval: Int32 = 30

    public struct Record: Codable, Sendable, Equatable {
        /// The file name in `xtsfs.hosts`.
        public var file: String
        public var host: String
        public var hostID: String
        public var pid: Int32
        public var mountpoint: String
        /// Seconds since the epoch.
        public var mounted: Int64
        public var refreshed: Int64
        public var expires: Int64
        /// Mounted with `-o shared`.
        public var shared: Bool
        /// `live`, `expired` (not refreshed within its lifetime: that host is gone or cut
        /// off) or `dead` (this machine's, and its daemon no longer runs).
        public var state: String = "live"

        func encode() -> String {
            func clean(_ s: String) -> String { String(s.unicodeScalars.filter { $0.value >= 0x20 && $0 != "=" }.prefix(1024).map(Character.init)) }
            return """
                xtsfs-presence 1
                host=\(clean(host))
                hostID=\(clean(hostID))
                pid=\(pid)
                mountpoint=\(clean(mountpoint))
                mounted=\(mounted)
                refreshed=\(refreshed)
                expires=\(expires)
                shared=\(shared ? 1 : 0)

                """
        }

        static func decode(_ bytes: [UInt8], file: String) -> Record? {
            let text = String(decoding: bytes, as: UTF8.self)
            var lines = text.split(separator: "\n", omittingEmptySubsequences: true)
            guard lines.first == "xtsfs-presence 1" else { return nil }
            lines.removeFirst()
            var f: [String: String] = [:]
            for l in lines {
                guard let eq = l.firstIndex(of: "=") else { return nil }
                f[String(l[..<eq])] = String(l[l.index(after: eq)...])
            }
            guard let host = f["host"], let hostID = f["hostID"], let pid = f["pid"].flatMap({ Int32($0) }),
                  let mp = f["mountpoint"], let mounted = f["mounted"].flatMap({ Int64($0) }),
                  let refreshed = f["refreshed"].flatMap({ Int64($0) }), let expires = f["expires"].flatMap({ Int64($0) }) else { return nil }
            return Record(file: file, host: host, hostID: hostID, pid: pid, mountpoint: mp, mounted: mounted,
                          refreshed: refreshed, expires: expires, shared: f["shared"] == "1")
        }
    }

    let cipherDir: String
    var record: Record
    let log: @Sendable (String) -> Void
    var thread = pthread_t()
    var running = false
    var wake: [Int32] = [-1, -1]

    public init(cipherDir: String, mountpoint: String, shared: Bool, log: @escaping @Sendable (String) -> Void) {
        self.cipherDir = cipherDir
        self.log = log
        let pid = getpid()
        let id = AuditLog.hostID()
        let now = Presence.now()
        record = Record(file: "\(id).\(pid)", host: AuditLog.hostname(), hostID: id, pid: pid, mountpoint: mountpoint,
                        mounted: now, refreshed: now, expires: now + Presence.lifetime, shared: shared)
    }

    public static func now() -> Int64 {
        var ts = timespec()
        clock_gettime(CLOCK_REALTIME, &ts)
        return Int64(ts.tv_sec)
    }

    /// Writes the record (and removes this machine's dead ones), then refreshes it from a
    /// thread of its own until `stop`. A CIPHERDIR that cannot be written (read-only) costs
    /// a log line: the mount goes on, unseen by other hosts.
    public func start() {
        Presence.removeDead(cipherDir, log: log)
        guard write() else { return }
        guard pipe2(&wake, O_CLOEXEC) == 0 else { return }
        let box = Unmanaged.passRetained(self)
        running = pthread_create(&thread, nil, { arg in
            let me = Unmanaged<Presence>.fromOpaque(arg!).takeRetainedValue()
            me.refreshLoop()
            return nil
        }, box.toOpaque()) == 0
        if !running { box.release() }
    }

    func refreshLoop() {
        while true {
            var p = pollfd(fd: wake[0], events: Int16(POLLIN), revents: 0)
            let r = poll(&p, 1, Presence.refreshInterval * 1000)
            if r > 0 { return }
            if r < 0 && errno == EINTR { continue }
            record.refreshed = Presence.now()
            record.expires = record.refreshed + Presence.lifetime
            _ = write()
        }
    }

    /// Stops refreshing and removes the record: a clean unmount.
    public func stop() {
        if running {
            var b: UInt8 = 1
            _ = Glibc.write(wake[1], &b, 1)
            pthread_join(thread, nil)
            running = false
        }
        for fd in wake where fd >= 0 { Glibc.close(fd) }
        wake = [-1, -1]
        guard let dir = Presence.openDirectory(cipherDir, create: false) else { return }
        defer { Sys.close(dir) }
        _ = unlinkat(dir, record.file, 0)
    }

    @discardableResult
    func write() -> Bool {
        guard let dir = Presence.openDirectory(cipherDir, create: true) else {
            log("warning: cannot write the presence record in \(cipherDir)/\(Presence.directoryName) (read-only?): other hosts will not see this mount")
            return false
        }
        defer { Sys.close(dir) }
        do { try Sys.atomicWrite(Array(record.encode().utf8), at: dir, record.file, mode: 0o644) } catch {
            log("warning: cannot write the presence record \(Presence.directoryName)/\(record.file): \(error)")
            return false
        }
        return true
    }

    /// `xtsfs.hosts` in CIPHERDIR, never through a symlink.
    static func openDirectory(_ cipherDir: String, create: Bool) -> Int32? {
        guard let root = try? Sys.open(cipherDir, O_RDONLY | O_DIRECTORY) else { return nil }
        defer { Sys.close(root) }
        if create { _ = mkdirat(root, directoryName, 0o755) }
        return try? Sys.openat(root, directoryName, O_RDONLY | O_DIRECTORY | O_NOFOLLOW)
    }

    /// Every record in CIPHERDIR, with its state. What is not a record (a temporary, a
    /// directory, a FIFO, too big, garbage) is skipped, with a log line for the last kinds.
    public static func list(_ cipherDir: String, log: (String) -> Void = { _ in }) -> [Record] {
        guard let dir = openDirectory(cipherDir, create: false) else { return [] }
        defer { Sys.close(dir) }
        let now = now()
        let me = AuditLog.hostID()
        var out: [Record] = []
        for e in ((try? Sys.listDirectory(dir)) ?? []).prefix(10_000) {
            if BackingEntry.temporaryBase(e.name) != nil { continue }
            let bytes: [UInt8]
            do { bytes = try Sys.readSmallFile(dir, e.name, limit: maxSize) } catch {
                log("xtsfs: ignoring \(directoryName)/\(e.name): \(error)")
                continue
            }
            guard var r = Record.decode(bytes, file: e.name) else {
                log("xtsfs: ignoring \(directoryName)/\(e.name): not a presence record")
                continue
            }
            if r.hostID == me && r.pid > 0 && daemonGone(r.pid) {
                r.state = "dead"
            } else if r.expires < now {
                r.state = "expired"
            }
            out.append(r)
        }
        return out.sorted { ($0.mounted, $0.file) < ($1.mounted, $1.file) }
    }

    /// Whether this machine's process `pid` is no longer an xtsfs daemon: gone, a zombie
    /// not yet reaped (a daemon killed with SIGKILL a moment ago), or the number now used by
    /// another program.
    static func daemonGone(_ pid: Int32) -> Bool {
        if kill(pid, 0) != 0 && errno == ESRCH { return true }
        if let stat = try? Sys.readFile("/proc/\(pid)/stat", limit: 4096),
           let close = stat.lastIndex(of: UInt8(ascii: ")")), close + 2 < stat.count {
            let state = stat[close + 2]
            if state == UInt8(ascii: "Z") || state == UInt8(ascii: "X") { return true }
        }
        if let cmdline = try? Sys.readFile("/proc/\(pid)/cmdline", limit: 65536) {
            let argv0 = cmdline.split(separator: 0, omittingEmptySubsequences: false).first.map { String(decoding: $0, as: UTF8.self) } ?? ""
            if !argv0.hasSuffix("xtsfs") && !argv0.contains("xtsfs") { return true }
        }
        return false
    }

    /// Removes this machine's records whose daemon is gone.
    static func removeDead(_ cipherDir: String, log: (String) -> Void) {
        let dead = list(cipherDir, log: log).filter { $0.state == "dead" }
        guard !dead.isEmpty, let dir = openDirectory(cipherDir, create: false) else { return }
        defer { Sys.close(dir) }
        for r in dead { _ = unlinkat(dir, r.file, 0) }
    }

    /// One line per record, for messages and `xtsfs status`.
    public static func describe(_ r: Record, now: Int64 = Presence.now()) -> String {
        var s = "\(r.host) (host \(r.hostID), pid \(r.pid)) on \(r.mountpoint)\(r.shared ? ", -o shared" : ""), mounted \(now - r.mounted) s ago, "
        switch r.state {
        case "dead": s += "daemon gone (a crash; the record is stale)"
        case "expired": s += "not refreshed for \(now - r.refreshed) s: expired (that host is gone or cut off)"
        default: s += "refreshed \(now - r.refreshed) s ago"
        }
        return s
    }

    /// Refuses `operation` while a live record exists: another host (or another mount on
    /// this one) has the volume mounted. `--force` (`force`) goes on anyway, for a host
    /// known to be gone whose record has not expired yet.
    /// `except`: the record (file name, `HOSTID.PID`) of the mount that does the work and
    /// so does not count (the daemon that sweeps an online rekey).
    public static func refuseIfHeld(_ cipherDir: String, operation: String, force: Bool, except: String? = nil) throws(VolumeError) {
        let live = list(cipherDir).filter { $0.state == "live" && $0.file != except }
        guard !live.isEmpty, !force else { return }
        let me = AuditLog.hostID()
        let here = live.contains { $0.hostID == me }
        throw .refused("\(cipherDir) is mounted elsewhere: " + live.map { describe($0) }.joined(separator: "; ") +
                       ". \(operation) must not run while another host " + (here ? "or another mount on this one " : "") +
                       "has the volume mounted: unmount it there first" +
                       " (a record expires \(lifetime) s after its host stops refreshing it; --force ignores it if that host is known to be gone)")
    }
}
