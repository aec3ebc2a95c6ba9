import XTSCrypto
import XTSSystem
#if canImport(Glibc)
import Glibc
#endif

/// Reads passphrases straight into locked memory: from the terminal with echo off, or
/// from the first line of a file. Never from argv or the environment.
public enum SecretInput {
    public static let maxLength = 1024

    /// Reads one line (without its newline) from `fd` into locked memory.
    static func readLine(_ fd: Int32) throws(VolumeError) -> SecretBytes {
        let buf = SecretBytes(count: maxLength)
        var n = 0
        var byte: UInt8 = 0
        while true {
            let r = Glibc.read(fd, &byte, 1)
            if r < 0 { if errno == EINTR { continue }; throw .badInput("cannot read the passphrase: \(String(cString: strerror(errno)))") }
            if r == 0 || byte == UInt8(ascii: "\n") { break }
            guard n < maxLength else { byte = 0; throw .badInput("passphrase longer than \(maxLength) bytes") }
            buf.withUnsafeMutableBytes { $0[n] = byte }
            n += 1
        }
        byte = 0
        if n > 0, buf.withUnsafeBytes({ $0[n - 1] }) == UInt8(ascii: "\r") { n -= 1 }
        guard n > 0 else { throw .badInput("empty passphrase") }
        return buf.slice(0..<n)
    }

    public static func fromFile(_ path: String) throws(VolumeError) -> SecretBytes {
        let fd: Int32
        do { fd = try Sys.open(path, O_RDONLY) } catch { throw .badInput("cannot read passphrase file: \(error)") }
        defer { Sys.close(fd) }
        do { return try readLine(fd) } catch { throw .badInput("\(error) in \(path)") }
    }

    /// The terminal state to put back if a signal ends the process during a prompt.
    /// Written before the handlers are installed and only read by them.
    nonisolated(unsafe) static var promptFD: Int32 = -1
    nonisolated(unsafe) static var savedTerminal = termios()
    /// Signals that end the process. Not SIGTSTP: a stopped prompt resumes, and must
    /// resume with echo still off.
    static let promptSignals = [SIGINT, SIGTERM, SIGHUP, SIGQUIT]

    /// Prompts on the controlling terminal with echo off. Ctrl-C (or any other signal that
    /// ends the process) during the prompt turns echo back on before the process dies.
    public static func fromTerminal(prompt: String) throws(VolumeError) -> SecretBytes {
        let fd = Glibc.open("/dev/tty", O_RDWR | O_CLOEXEC)
        guard fd >= 0 else { throw .badInput("no terminal to ask for the passphrase: use --passfile FILE") }
        defer { Sys.close(fd) }
        var old = termios()
        let isTTY = tcgetattr(fd, &old) == 0
        var previous: [sigaction] = []
        if isTTY {
            promptFD = fd
            savedTerminal = old
            for sig in promptSignals {
                var action = sigaction()
                action.__sigaction_handler.sa_handler = { sig in
                    // Async-signal-safe only: restore the terminal, end the line, die of the signal.
                    _ = tcsetattr(SecretInput.promptFD, TCSAFLUSH, &SecretInput.savedTerminal)
                    _ = Glibc.write(SecretInput.promptFD, "\n", 1)
                    signal(sig, SIG_DFL)
                    raise(sig)
                }
                sigemptyset(&action.sa_mask)
                var prior = sigaction()
                sigaction(sig, nil, &prior)
                previous.append(prior)
                // An ignored signal (nohup) stays ignored.
                if unsafeBitCast(prior.__sigaction_handler.sa_handler, to: Int.self) == unsafeBitCast(SIG_IGN, to: Int.self) { continue }
                sigaction(sig, &action, nil)
            }
            var quiet = old
            quiet.c_lflag &= ~tcflag_t(ECHO)
            _ = tcsetattr(fd, TCSAFLUSH, &quiet)
        }
        defer {
            if isTTY {
                _ = tcsetattr(fd, TCSAFLUSH, &old)
                for (sig, var prior) in zip(promptSignals, previous) { sigaction(sig, &prior, nil) }
            }
            _ = Glibc.write(fd, "\n", 1)
        }
        _ = prompt.withCString { Glibc.write(fd, $0, strlen($0)) }
        return try readLine(fd)
    }

    /// The passphrase for an existing volume.
    public static func passphrase(passfile: String?) throws(VolumeError) -> SecretBytes {
        if let passfile { return try fromFile(passfile) }
        return try fromTerminal(prompt: "Passphrase: ")
    }

    /// A new passphrase: asked twice on a terminal.
    public static func newPassphrase(passfile: String?) throws(VolumeError) -> SecretBytes {
        if let passfile { return try fromFile(passfile) }
        let first = try fromTerminal(prompt: "New passphrase: ")
        let second = try fromTerminal(prompt: "Repeat passphrase: ")
        guard first.constantTimeEquals(second) else { throw .badInput("the passphrases do not match") }
        return first
    }

    /// A whole file (a key file) into locked memory: at most `limit` bytes.
    public static func wholeFile(_ path: String, limit: Int, what: String) throws(VolumeError) -> SecretBytes {
        let fd: Int32
        do { fd = try Sys.open(path, O_RDONLY | O_NONBLOCK) } catch { throw .providerFailed("cannot read \(what) \(path): \(error)") }
        defer { Sys.close(fd) }
        let buf = SecretBytes(count: limit + 1)
        var n = 0
        while n <= limit {
            let r = buf.withUnsafeMutableBytes { Glibc.read(fd, $0.baseAddress! + n, $0.count - n) }
            if r < 0 { if errno == EINTR { continue }; throw .providerFailed("cannot read \(what) \(path): \(String(cString: strerror(errno)))") }
            if r == 0 { break }
            n += r
        }
        guard n <= limit else { throw .badInput("\(what) \(path) is larger than \(limit) bytes") }
        return buf.slice(0..<n)
    }

    /// A PIN: the first line of `file`, or asked on the terminal.
    public static func pin(file: String?, token: String) throws(VolumeError) -> SecretBytes {
        if let file { return try fromFile(file) }
        guard Sys.exists("/dev/tty"), Glibc.access("/dev/tty", R_OK | W_OK) == 0 else { throw .badInput("no terminal to ask for the PIN: use --pin-file FILE") }
        do { return try fromTerminal(prompt: "PIN for PKCS#11 \(token): ") } catch {
            if case .badInput(let m) = error, m.hasPrefix("no terminal") { throw .badInput("no terminal to ask for the PIN: use --pin-file FILE") }
            throw error
        }
    }
}
