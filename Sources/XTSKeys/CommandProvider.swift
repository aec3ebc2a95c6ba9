import CSysShim
import XTSCrypto
import XTSFormat
#if canImport(Glibc)
import Glibc
#endif

/// An external program prints the secret (like gocryptfs `-extpass`): `/bin/sh -c COMMAND`,
/// its standard output read straight into locked memory (the first line, without its
/// newline, at most 1024 bytes). The output may be a human's passphrase, so the KEK is
/// derived with Argon2id exactly as for a passphrase slot (same parameters, section 2.3
/// of FORMAT.md). The program runs once per xtsfs command, before any slot is tried.
public struct CommandProvider: LocalKEKProvider {
    public static let maxOutput = 1024
    public static let defaultTimeout = 60.0

    public var type: ProviderType { .command }
    let inner: PassphraseProvider

    /// Runs `command` now and keeps its output.
    public init(command: String, timeout: Double = CommandProvider.defaultTimeout,
                costs: Argon2idParameters = PassphraseProvider.defaultCosts) throws(KeyError) {
        let secret = try CommandProvider.run(command, timeout: timeout)
        inner = PassphraseProvider(passphrase: secret, costs: costs, kind: .command)
    }

    public func kek(parameters: [UInt8]) throws(KeyError) -> SecretBytes { try inner.kek(parameters: parameters) }
    public func newParameters() throws(KeyError) -> [UInt8] { try inner.newParameters() }

    static func run(_ command: String, timeout: Double) throws(KeyError) -> SecretBytes {
        guard !command.isEmpty else { throw .input("the key command is empty") }
        var fds: [Int32] = [0, 0]
        guard xts_pipe_cloexec(&fds) == 0 else { throw .unavailable("key command: pipe: \(String(cString: strerror(errno)))") }
        var cargs: [UnsafeMutablePointer<CChar>?] = [String]([ "sh", "-c", command ]).map { strdup($0) } + [nil]
        defer { cargs.forEach { free($0) } }
        var pid: pid_t = 0
        let r = xts_spawn_capture(&pid, &cargs, environ, fds[1])
        close(fds[1])
        guard r == 0 else { close(fds[0]); throw .unavailable("cannot run the key command: \(String(cString: strerror(r)))") }

        let buf = SecretBytes(count: maxOutput + 1)
        var n = 0
        var timedOut = false
        let deadline = Double(monotonicMilliseconds()) + timeout * 1000
        var pfd = pollfd(fd: fds[0], events: Int16(POLLIN), revents: 0)
        readLoop: while true {
            let left = Int32(max(0, deadline - Double(monotonicMilliseconds())))
            if left == 0 { timedOut = true; break }
            let p = poll(&pfd, 1, left)
            if p < 0 { if errno == EINTR { continue }; break }
            if p == 0 { timedOut = true; break }
            let got = buf.withUnsafeMutableBytes { b -> Int in
                if n >= b.count { return 0 }
                return read(fds[0], b.baseAddress! + n, b.count - n)
            }
            if got < 0 { if errno == EINTR { continue }; break readLoop }
            if got == 0 { break }
            n += got
        }
        close(fds[0])
        if timedOut {
            // The shell may have started the program as its child: end them all, children first
            // found while the shell still lives (then they are still its descendants).
            for p in descendants(of: pid) + [pid] { kill(p, SIGKILL) }
        }
        var status: Int32 = 0
        while waitpid(pid, &status, 0) < 0 && errno == EINTR {}
        if timedOut { throw .unavailable("the key command did not finish within \(Int(timeout)) s") }
        // WIFEXITED / WEXITSTATUS are macros: decode the status by hand.
        let exited = status & 0x7f == 0, code = (status >> 8) & 0xff
        guard exited else { throw .unavailable("the key command was killed by signal \(status & 0x7f)") }
        guard code == 0 else { throw .unavailable("the key command failed (exit status \(code))") }
        let line = buf.withUnsafeBytes { b in b.prefix(n).firstIndex(of: UInt8(ascii: "\n")) ?? n }
        guard line <= maxOutput else { throw .input("the key command printed more than \(maxOutput) bytes on its first line") }
        var end = line
        if end > 0, buf.withUnsafeBytes({ $0[end - 1] }) == UInt8(ascii: "\r") { end -= 1 }
        guard end > 0 else { throw .input("the key command printed nothing") }
        return buf.slice(0..<end)
    }

    /// Processes below `root`, from /proc (the command stays in our process group, so a
    /// prompt it shows on the terminal keeps working: no group to kill at once).
    static func descendants(of root: pid_t) -> [pid_t] {
        guard let dir = opendir("/proc") else { return [] }
        defer { closedir(dir) }
        var parent: [pid_t: pid_t] = [:]
        while let ent = readdir(dir) {
            let name = withUnsafePointer(to: ent.pointee.d_name) { $0.withMemoryRebound(to: CChar.self, capacity: 256) { String(cString: $0) } }
            guard let pid = pid_t(name) else { continue }
            let fd = open("/proc/\(pid)/stat", O_RDONLY | O_CLOEXEC)
            guard fd >= 0 else { continue }
            var buf = [UInt8](repeating: 0, count: 512)
            let n = read(fd, &buf, buf.count)
            close(fd)
            guard n > 0 else { continue }
            // "pid (comm) state ppid ...": comm may hold spaces and parentheses; parse after the last ')'.
            let text = String(decoding: buf[0..<n], as: UTF8.self)
            guard let close = text.lastIndex(of: ")") else { continue }
            let fields = text[text.index(after: close)...].split(separator: " ")
            if fields.count > 1, let pp = pid_t(fields[1]) { parent[pid] = pp }
        }
        var out: [pid_t] = []
        var frontier = [root]
        while let p = frontier.popLast() {
            let children = parent.filter { $0.value == p }.map(\.key)
            out += children
            frontier += children
        }
        return out
    }

    static func monotonicMilliseconds() -> Int64 {
        var ts = timespec()
        clock_gettime(CLOCK_MONOTONIC, &ts)
        return Int64(ts.tv_sec) * 1000 + Int64(ts.tv_nsec) / 1_000_000
    }
}
