import CSysShim
import XTSContent
import XTSCrypto
import XTSSystem
#if canImport(Glibc)
import Glibc
#endif

/// The audit log: one JSON line per key operation (unlock succeeded or failed, slot added
/// or removed, volume created), never a secret. By default it lives in CIPHERDIR as
/// `xtsfs.audit/HOSTID.jsonl`, one append-only file per host, so that hosts sharing the
/// volume through a synced folder never write the same file (no sync conflicts);
/// `--audit-log PATH` puts it in one file elsewhere. A record, not a proof: whoever can
/// write CIPHERDIR can edit it.
///
/// Writing it never blocks a key operation: a log that cannot be written (read-only
/// CIPHERDIR) costs a warning.
public struct AuditLog: Sendable {
    public enum Destination: Sendable, Equatable {
        /// `CIPHERDIR/xtsfs.audit/HOSTID.jsonl`.
        case volume(String)
        /// One file, given by the user.
        case file(String)
    }
    public let destination: Destination

    public init(cipherDir: String, override path: String?) {
        destination = path.map { .file($0) } ?? .volume(cipherDir)
    }

    public struct Event: Sendable {
        public var operation: String
        public var volumeID: [UInt8]?
        public var slot: UInt16?
        public var provider: String?
        public var ok: Bool
        public var detail: String?

        public init(operation: String, volumeID: [UInt8]? = nil, slot: UInt16? = nil, provider: String? = nil, ok: Bool, detail: String? = nil) {
            self.operation = operation
            self.volumeID = volumeID
            self.slot = slot
            self.provider = provider
            self.ok = ok
            self.detail = detail
        }
    }

    /// Appends one line; returns a warning for the user if it could not.
    @discardableResult
    public func record(_ e: Event) -> String? {
        var fields: [(String, String)] = [
            ("time", AuditLog.json(AuditLog.timestamp())),
            ("host", AuditLog.json(AuditLog.hostname())),
            ("hostID", AuditLog.json(AuditLog.hostID())),
            ("uid", "\(getuid())"),
            ("operation", AuditLog.json(e.operation)),
        ]
        if let v = e.volumeID { fields.append(("volumeID", AuditLog.json(StatusReport.hex(v)))) }
        if let s = e.slot { fields.append(("slot", "\(s)")) }
        if let p = e.provider { fields.append(("provider", AuditLog.json(p))) }
        fields.append(("outcome", AuditLog.json(e.ok ? "ok" : "failed")))
        if let d = e.detail { fields.append(("detail", AuditLog.json(d))) }
        let line = "{" + fields.map { "\"\($0.0)\":\($0.1)" }.joined(separator: ",") + "}\n"
        do { try append(line) } catch { return "warning: cannot write the audit log: \(error)" }
        return nil
    }

    /// The directory and file name a line goes to.
    var target: (dir: String, name: String, inVolume: Bool) {
        switch destination {
        case .volume(let c): return (c, BackingEntry.auditLogName, true)
        case .file(let p): return (Sys.parentDirectory(of: p), String(p.split(separator: "/").last ?? Substring(p)), false)
        }
    }

    /// Opens every component with O_NOFOLLOW and appends only to a regular file: CIPHERDIR
    /// is hostile input, and a planted symlink must not make us write elsewhere.
    func append(_ line: String) throws(SystemError) {
        let t = target
        let dirfd = try Sys.open(t.dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
        defer { Sys.close(dirfd) }
        var logDir = dirfd
        var fileName = t.name
        if t.inVolume {
            do { try Sys.mkdirat(dirfd, t.name, 0o700) } catch where error.errno == EEXIST {}
            logDir = try Sys.openat(dirfd, t.name, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC)
            fileName = AuditLog.hostID() + ".jsonl"
        }
        defer { if logDir != dirfd { Sys.close(logDir) } }
        // Only a regular file is ever opened: a FIFO or device planted under the log's name
        // is refused before it is opened (a device's open alone can have effects).
        let fd: Int32
        do {
            fd = try Sys.openRegular(logDir, fileName, O_WRONLY | O_APPEND).fd
        } catch where error.errno == ENOENT {
            do { fd = try Sys.openat(logDir, fileName, O_WRONLY | O_APPEND | O_CREAT | O_EXCL | O_NOFOLLOW, 0o600) } catch where error.errno == EEXIST {
                fd = try Sys.openRegular(logDir, fileName, O_WRONLY | O_APPEND).fd
            }
        }
        defer { Sys.close(fd) }
        // One write of the whole line: with O_APPEND, lines from two processes never interleave.
        var bytes = Array(line.utf8)
        let n = bytes.withUnsafeMutableBytes { Glibc.write(fd, $0.baseAddress, $0.count) }
        guard n == bytes.count else { throw SystemError(n < 0 ? errno : EIO, "write \(fileName)") }
        try Sys.fsync(fd)
    }

    /// Every line of the log, in time order (the files of all hosts merged).
    public func read() throws(VolumeError) -> [String] {
        let t = target
        var files: [String] = []
        let dirfd: Int32
        do { dirfd = try Sys.open(t.dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC) } catch { throw .failure("cannot read the audit log: \(error)") }
        defer { Sys.close(dirfd) }
        if t.inVolume {
            let logDir: Int32
            do { logDir = try Sys.openat(dirfd, t.name, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC) } catch {
                if error.errno == ENOENT { return [] }
                throw .failure("cannot read the audit log: \(error)")
            }
            defer { Sys.close(logDir) }
            let names: [String]
            do { names = try Sys.listDirectory(logDir).map(\.name).filter { $0.hasSuffix(".jsonl") }.sorted() } catch {
                throw .failure("cannot read the audit log: \(error)")
            }
            for n in names {
                if let bytes = try? Sys.readSmallFile(logDir, n, limit: 8 << 20) { files.append(String(decoding: bytes, as: UTF8.self)) }
            }
        } else {
            do { files.append(String(decoding: try Sys.readSmallFile(dirfd, t.name, limit: 8 << 20), as: UTF8.self)) } catch {
                if error.errno == ENOENT { return [] }
                throw .failure("cannot read the audit log: \(error)")
            }
        }
        let lines = files.flatMap { $0.split(separator: "\n").map(String.init) }
        // Lines start with {"time":"<ISO 8601 UTC>": sorting the text sorts by time.
        return lines.sorted()
    }

    static func timestamp() -> String {
        var ts = timespec()
        clock_gettime(CLOCK_REALTIME, &ts)
        var t = ts.tv_sec
        var tmv = tm()
        gmtime_r(&t, &tmv)
        func p(_ v: Int32, _ n: Int) -> String { String(v).leftPad(n) }
        return "\(p(tmv.tm_year + 1900, 4))-\(p(tmv.tm_mon + 1, 2))-\(p(tmv.tm_mday, 2))T\(p(tmv.tm_hour, 2)):\(p(tmv.tm_min, 2)):\(p(tmv.tm_sec, 2)).\(String(ts.tv_nsec / 1_000_000).leftPad(3))Z"
    }

    static func hostname() -> String {
        var buf = [CChar](repeating: 0, count: 256)
        guard gethostname(&buf, buf.count - 1) == 0 else { return "unknown" }
        return String(decoding: buf.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
    }

    /// A stable name for this machine that does not reveal its machine ID: the first 16
    /// hex digits of SHA-256 of `/etc/machine-id` (or of the host name if there is none).
    static func hostID() -> String {
        let source = (try? Sys.readFile("/etc/machine-id", limit: 256)).map { String(decoding: $0, as: UTF8.self) } ?? hostname()
        let digest = SHA256.hash(Array(("xtsfs audit host " + source.trimmingNewline()).utf8))
        return String(StatusReport.hex(digest).prefix(16))
    }

    static func json(_ s: String) -> String {
        var out = "\""
        for u in s.unicodeScalars {
            switch u {
            case "\"": out += "\\\""
            case "\\": out += "\\\\"
            case "\n": out += "\\n"
            case "\r": out += "\\r"
            case "\t": out += "\\t"
            default:
                if u.value < 0x20 { out += "\\u" + String(u.value, radix: 16).leftPad(4) } else { out.unicodeScalars.append(u) }
            }
        }
        return out + "\""
    }
}

extension String {
    func trimmingNewline() -> String {
        var s = Substring(self)
        while let l = s.last, l == "\n" || l == "\r" || l == " " { s = s.dropLast() }
        return String(s)
    }
}
