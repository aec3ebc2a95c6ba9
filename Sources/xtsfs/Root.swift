import ArgumentParser
import XTSVolume
#if canImport(Glibc)
import Glibc
#endif

@main
struct XTSFSCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "xtsfs",
        abstract: "An encrypted directory: AES-XTS-256 file contents, encrypted names, keyslots.",
        discussion: "Exit codes: 0 success, 1 other error, 2 usage, 10 not a volume, 11 corrupt header, 12 wrong key, 13 unsupported format, 14 mount failed, 15 refused, 16 bad input, 17 key provider failed. See xtsfs(1).",
        version: "0.1.0",
        subcommands: [Init.self, Mount.self, Unmount.self, Status.self, Keys.self, Rekey.self, Header.self, Audit.self, Fsck.self, Cache.self, BenchmarkCommand.self]
    )

    /// Our own exit codes; the argument parser's usage errors become 2.
    static func main() {
        // fsck speaks fsck(8)'s exit codes: usage is 16 there.
        let usageStatus = CommandLine.arguments.dropFirst().first == "fsck" ? FsckExit.usage.rawValue : ExitStatus.usage.rawValue
        if CommandLine.arguments.dropFirst().contains("") {
            printError("an argument is the empty string; see xtsfs --help")
            Glibc.exit(usageStatus)
        }
        do {
            var command = try parseAsRoot(MountHelperArguments.rewrite(Array(CommandLine.arguments.dropFirst()),
                                                                       subcommands: configuration.subcommands.map { $0._commandName }))
            try command.run()
        } catch let error as VolumeError {
            printError(error.description)
            Glibc.exit(error.exitStatus.rawValue)
        } catch {
            let code = exitCode(for: error)
            if code == .success {
                exit(withError: error)
            }
            let message = fullMessage(for: error)
            if code == .validationFailure {
                printError(message)
                Glibc.exit(usageStatus)
            }
            if !message.isEmpty { printError(message) }
            Glibc.exit(code.rawValue)
        }
    }
}

/// Every message the command writes to stderr starts with "xtsfs: " (the argument
/// parser's "Error: " becomes "xtsfs: error: ").
func printError(_ message: String) {
    var text = message
    if text.hasPrefix("Error: ") { text = "error: " + text.dropFirst("Error: ".count) }
    // The first line carries the prefix; the argument parser's usage lines follow as they are.
    writeStderr((text.hasPrefix("xtsfs: ") ? text : "xtsfs: " + text) + (text.hasSuffix("\n") ? "" : "\n"))
}

func say(_ message: String) {
    writeStderr((message.hasPrefix("xtsfs: ") ? message : "xtsfs: " + message) + "\n")
}

func writeStderr(_ text: String) {
    _ = text.withCString { Glibc.write(2, $0, strlen($0)) }
}
