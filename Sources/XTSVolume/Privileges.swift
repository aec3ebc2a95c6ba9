import CSysShim
import XTSSystem
#if canImport(Glibc)
import Glibc
#endif

/// What the serving daemon keeps of its privileges once the mount is up.
///
/// It sets no_new_privs, so nothing it runs can gain privileges through a setuid binary or
/// file capabilities, and as root it keeps only the capabilities serving needs:
/// - CAP_CHOWN: files are created owned by the calling user; chown requests.
/// - CAP_DAC_OVERRIDE: backing files keep their owners' modes (another user's 0600 file, or
///   a 0400 file its owner writes after the kernel allowed it); it covers directory
///   search too, so CAP_DAC_READ_SEARCH, and the open_by_handle_at(2) it allows, goes.
/// - CAP_FOWNER: chmod and utimens of backing files that other users own.
/// - CAP_FSETID: setuid and setgid bits survive chmod, chown and writes as asked.
/// - CAP_MKNOD: device nodes created in the mount.
/// - CAP_IPC_LOCK: keys of files opened later are mlock'ed beyond RLIMIT_MEMLOCK.
/// Everything else goes, CAP_SYS_ADMIN included: unmounting is done by `UnmountHelper`,
/// started before the drop. Not kept either: CAP_SYS_RESOURCE (the daemon need not use
/// the blocks reserved for root), CAP_SETFCAP (no extended attributes), CAP_SETUID and
/// CAP_SETGID (the daemon never switches identity).
///
/// Capabilities belong to threads: `restrict` must run before the daemon starts the
/// threads that serve (libfuse's workers inherit it from the thread that creates them).
public enum DaemonPrivileges {
    public static let serving: [Int32] = [CAP_CHOWN, CAP_DAC_OVERRIDE, CAP_FOWNER, CAP_FSETID, CAP_MKNOD, CAP_IPC_LOCK]

    public static func mask(_ caps: [Int32]) -> UInt64 { caps.reduce(0) { $0 | (1 << UInt64($1)) } }

    /// Sets no_new_privs and keeps only `caps` (of those the thread has). A warning if
    /// either fails; serving goes on.
    static func restrict(to caps: [Int32]) -> String? {
        var failed: [String] = []
        if xts_set_no_new_privs() != 0 { failed.append("no_new_privs: " + String(cString: strerror(errno))) }
        if xts_cap_limit(mask(caps)) != 0 { failed.append("capabilities: " + String(cString: strerror(errno))) }
        return failed.isEmpty ? nil : "warning: cannot restrict the daemon's privileges (" + failed.joined(separator: "; ") + ")"
    }

    /// For a root mount: the first reason another user could change CIPHERDIR, by writing
    /// it or a directory above it (group or other write permission without the sticky
    /// bit), or by owning one of them. The daemon then serves what they put there to
    /// every user of the mount, as root.
    public static func othersCanChange(_ cipherDir: String) -> String? {
        let me = geteuid()
        let parts = cipherDir.split(separator: "/")
        for n in stride(from: parts.count, through: 0, by: -1) {
            let p = "/" + parts.prefix(n).joined(separator: "/")
            guard let st = try? Sys.lstat(p) else { continue }
            if st.st_uid != me { return "\(p) is owned by uid \(st.st_uid)" }
            if st.st_mode & S_ISVTX == 0 && st.st_mode & 0o022 != 0 {
                let who = st.st_mode & 0o002 != 0 ? "every user" : "its group (gid \(st.st_gid))"
                return "\(p) is writable by \(who)"
            }
        }
        return nil
    }
}

/// Unmounts for a daemon that has given up the right to: a separate process, started
/// before the daemon drops its privileges (and before no_new_privs, so that a non-root
/// user's helper can still run the setuid fusermount3). It is a fresh exec of xtsfs, so
/// it holds no copy of the daemon's memory and keys. It serves every mount of the daemon
/// (the data area, and the temp and cache areas). It waits for one byte on its standard
/// input, then detaches the mounts lazily. End of file means the daemon is gone: if it
/// died (SIGKILL, a crash), its mounts are still there, stale ("Transport endpoint is not
/// connected"), and would block the next mount, so the helper detaches them too. Only the
/// mounts it was started for: each must still be the same FUSE mount (device number) it
/// saw at start, never a later mount on the same path.
public enum UnmountHelper {
    /// Where the daemon asks; -1 when there is no helper. Set once, before the threads
    /// that read it exist.
    nonisolated(unsafe) static var requestFD: Int32 = -1
    nonisolated(unsafe) static var pid: pid_t = 0

    /// Set once `request` has written: the helper reads one byte, then exits.
    nonisolated(unsafe) static var requested = false

    static func start(cipherDir: String, mountpoints: [String]) -> Bool {
        var fds: [Int32] = [0, 0]
        guard xts_pipe_cloexec(&fds) == 0, let first = mountpoints.first else { return false }
        let args = ["xtsfs", "mount", "--unmount-helper", cipherDir, first] + mountpoints.dropFirst().flatMap { ["--also-unmount", $0] }
        var cargs: [UnsafeMutablePointer<CChar>?] = args.map { strdup($0) } + [nil]
        defer { cargs.forEach { free($0) } }
        var pid: pid_t = 0
        let r = xts_spawn_helper(&pid, Mounter.selfExecutable(), &cargs, environ, fds[0])
        Sys.close(fds[0])
        guard r == 0 else { Sys.close(fds[1]); return false }
        requestFD = fds[1]
        UnmountHelper.pid = pid
        return true
    }

    /// Asks for the unmount and waits until it is done (the helper exits after it), so
    /// that whoever waits for this process finds the mount point clear.
    static func unmountAndWait() -> Bool {
        guard request() else { return false }
        var status: Int32 = 0
        while waitpid(pid, &status, 0) < 0 && errno == EINTR {}
        return true
    }

    /// Asks the helper to detach the mount; false if there is no helper to ask.
    static func request() -> Bool {
        guard requestFD >= 0 else { return false }
        if requested { return true }
        var byte: UInt8 = 1
        requested = Glibc.write(requestFD, &byte, 1) == 1
        return requested
    }

    /// Entry point of the helper process (`xtsfs mount --unmount-helper`).
    public static func run(mountpoints: [String]) -> Int32 {
        // A signal meant for the daemon's process group must not take the helper with it.
        for s in [SIGINT, SIGTERM, SIGHUP, SIGQUIT, SIGPIPE] { signal(s, SIG_IGN) }
        ProcessHardening.apply()
        _ = chdir("/")
        // As root, umount2(2) is all it does; a user's helper needs fusermount3's setuid.
        if geteuid() == 0 { _ = DaemonPrivileges.restrict(to: [CAP_SYS_ADMIN]) }
        let devices = mountpoints.map { MountEntry.fuse(at: $0)?.device }
        var byte: UInt8 = 0
        while true {
            let n = Glibc.read(0, &byte, 1)
            if n < 0 && errno == EINTR { continue }
            break
        }
        var status: Int32 = 0
        for (mp, device) in zip(mountpoints, devices) {
            guard let device, MountEntry.fuse(at: mp)?.device == device else { continue }
            if !Mounter.lazyUnmount(mp) { status = 1 }
        }
        return status
    }
}
