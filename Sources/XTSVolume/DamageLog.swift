import CSysShim
import XTSSystem
#if canImport(Glibc)
import Glibc
#endif

/// Where the mount daemon's warnings go (damaged data hidden or refused, a header copy
/// not used, key memory not locked), so that they reach the user on every machine:
/// - in the foreground (`-f`): stderr;
/// - a daemon, when the machine has a syslog socket (`/dev/log`, also journald's): syslog;
/// - otherwise a log file, `/run/xtsfs/MOUNT.log` for root, else
///   `$XDG_RUNTIME_DIR/xtsfs/MOUNT.log`, else `/tmp/xtsfs-UID/MOUNT.log`, where MOUNT is
///   the mount point's path with `/` written as `-` (and `-` as `--`). xtsfs(1) names it.
public enum DamageLog {
    public static let syslogSocket = "/dev/log"

    public static var syslogAvailable: Bool {
        guard let st = try? Sys.lstat(syslogSocket) else { return false }
        return (st.st_mode & S_IFMT) == S_IFSOCK
    }

    public static func directory() -> String {
        if geteuid() == 0 { return "/run/xtsfs" }
        if let x = getenv("XDG_RUNTIME_DIR"), x.pointee == UInt8(ascii: "/") { return String(cString: x) + "/xtsfs" }
        return "/tmp/xtsfs-\(geteuid())"
    }

    /// The log file of the mount on `mountpoint` (an absolute path).
    public static func file(mountpoint: String) -> String {
        var name = ""
        for c in mountpoint.drop(while: { $0 == "/" }) {
            switch c {
            case "/": name += "-"
            case "-": name += "--"
            default: name.append(c)
            }
        }
        return directory() + "/" + (name.isEmpty ? "root" : name) + ".log"
    }

    /// Where a daemon serving `mountpoint` will log: nil for syslog.
    public static func destination(mountpoint: String) -> String? {
        syslogAvailable ? nil : file(mountpoint: mountpoint)
    }

    /// The daemon's sink. The file is opened here, before the daemon gives up privileges,
    /// in a directory that must be ours (not a symlink, mode 0700), never through a symlink.
    public static func daemonSink(mountpoint: String) -> @Sendable (String) -> Void {
        if syslogAvailable {
            openlog("xtsfs", LOG_PID, LOG_DAEMON)
            return { msg in xts_syslog(LOG_WARNING, msg) }
        }
        let path = file(mountpoint: mountpoint)
        let dir = directory()
        _ = Glibc.mkdir(dir, 0o700)
        guard let st = try? Sys.lstat(dir), st.isDirectory, st.st_uid == geteuid(), st.st_mode & 0o022 == 0 else {
            openlog("xtsfs", LOG_PID, LOG_DAEMON)
            return { msg in xts_syslog(LOG_WARNING, msg) }
        }
        let fd = Glibc.open(path, O_WRONLY | O_APPEND | O_CREAT | O_NOFOLLOW | O_CLOEXEC, 0o600)
        guard fd >= 0 else {
            openlog("xtsfs", LOG_PID, LOG_DAEMON)
            return { msg in xts_syslog(LOG_WARNING, msg) }
        }
        let pid = getpid()
        return { msg in
            var now = time(nil)
            var tm = Glibc.tm()
            gmtime_r(&now, &tm)
            func n(_ v: Int32, _ w: Int) -> String { "\(v)".leftPad(w) }
            let stamp = n(tm.tm_year + 1900, 4) + "-" + n(tm.tm_mon + 1, 2) + "-" + n(tm.tm_mday, 2)
                + "T" + n(tm.tm_hour, 2) + ":" + n(tm.tm_min, 2) + ":" + n(tm.tm_sec, 2) + "Z"
            let line = "\(stamp) xtsfs[\(pid)]: \(msg)\n"
            _ = line.withCString { Glibc.write(fd, $0, strlen($0)) }
        }
    }
}

