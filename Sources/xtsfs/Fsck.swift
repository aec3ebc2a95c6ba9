import ArgumentParser
import Foundation
import Synchronization
import XTSKeys
import XTSSystem
import XTSVolume
#if canImport(Glibc)
import Glibc
#endif

/// Set by SIGINT/SIGTERM during a run: the walk stops at the next entry (exit 32).
let fsckCancelled = Atomic<Bool>(false)

struct Fsck: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "fsck",
        abstract: "Check a volume (header copies, keyslots, directory and file headers, names, symlinks, xattrs); --repair fixes what is safe.",
        discussion: """
            Exit status as fsck(8), added up: 0 clean, 1 errors corrected, 4 errors left uncorrected, \
            8 operational error (not a volume, wrong passphrase, cannot read, --repair on a mounted volume \
            or on one in the middle of a DEK rekey), 16 usage, 32 cancelled. \
            These differ from the other commands' codes. Without a key (no --passfile and no terminal, \
            --no-key, or an empty passphrase at the prompt) only the key-free checks run. See xtsfs(1).
            """)

    @Argument(help: "The volume's directory.")
    var cipherDir: String

    @Flag(help: "Repair what is safe: restore a header copy from the verified one, remove orphaned side files and .tmp leftovers, quarantine unreadable entries into /lost+found.")
    var repair = false

    @Flag(help: "With --repair: go on although another host's presence record says it has the volume mounted (only if that host is known to be gone).")
    var force = false

    @Flag(help: "Print the report as JSON.")
    var json = false

    @Flag(name: .customLong("no-key"), help: "Do not ask for a passphrase: only the checks that need no key.")
    var noKey = false

    @OptionGroup var key: KeyOptions

    func run() throws {
        let code = execute()
        throw ExitCode(code)
    }

    func execute() -> Int32 {
        ProcessHardening.apply()
        let dir = Mounter.absolute(cipherDir)
        // Mounted: the daemon changes CIPHERDIR under us. Repairing is refused; a check runs,
        // but says its findings may be transient.
        let mounts = MountEntry.xtsfs(servingCipherDir: dir)
        var mountedNote: String?
        if let m = mounts.first {
            if repair {
                printError("\(dir) is mounted on \(m.mountpoint): unmount it first (xtsfs unmount \(m.mountpoint)); fsck --repair runs only on an unmounted volume")
                return FsckExit.operationalError.rawValue
            }
            mountedNote = "the volume is mounted on \(m.mountpoint): checked read-only, and what the mount is changing may show as damage"
            if !json { printError("warning: " + mountedNote!) }
        }
        // Mounted on another host (its presence record is live): the same, across hosts.
        let elsewhere = Presence.list(dir).filter { $0.state == "live" }
        if mountedNote == nil, !elsewhere.isEmpty {
            if repair && !force {
                do { try Presence.refuseIfHeld(dir, operation: "fsck --repair", force: false) } catch { printError("\(error)") }
                return FsckExit.operationalError.rawValue
            }
            if !repair {
                mountedNote = "the volume is mounted on another host (" + elsewhere.map { Presence.describe($0) }.joined(separator: "; ") +
                              "): what it is changing may show as damage"
                if !json { printError("warning: " + mountedNote!) }
            }
        }
        var provider: (any KeyProvider)?
        if !noKey {
            let k = key
            let named = k.passfile != nil || k.keyfile != nil || k.extpass != nil || k.pkcs11 != nil || k.recoveryFile != nil || k.recovery || k.kmip != nil
            do {
                if named {
                    provider = try key.provider(auditing: dir, operation: "fsck")
                } else if isatty(0) == 1 || isatty(2) == 1, Glibc.access("/dev/tty", R_OK | W_OK) == 0 {
                    switch Result(catching: { () throws(VolumeError) in try SecretInput.fromTerminal(prompt: "Passphrase (empty: only the checks that need no key): ") }) {
                    case .success(let passphrase): provider = PassphraseProvider(passphrase: passphrase)
                    case .failure(let e):
                        // Enter alone: only the checks that need no key.
                        guard e.description.contains("empty passphrase") else { throw e }
                        provider = nil
                    }
                }
            } catch {
                printError("\(error)")
                return FsckExit.operationalError.rawValue
            }
        }
        let showProgress = !json && isatty(2) == 1
        signal(SIGINT) { _ in fsckCancelled.store(true, ordering: .relaxed) }
        signal(SIGTERM) { _ in fsckCancelled.store(true, ordering: .relaxed) }
        var progress: (@Sendable (Int, Int) -> Void)?
        if showProgress {
            progress = { (dirs: Int, entries: Int) -> Void in
                writeStderr("\rxtsfs: fsck: \(entries) entries in \(dirs) directories checked\u{1B}[K")
            }
        }
        let options = XTSVolume.Fsck.Options(cipherDir: dir, repair: repair, progress: progress,
                                             isCancelled: { fsckCancelled.load(ordering: .relaxed) })
        var report: FsckReport
        do { report = try XTSVolume.Fsck.run(options, provider: provider) } catch is FsckCancelled {
            if showProgress { writeStderr("\r\u{1B}[K") }
            printError("fsck cancelled; what was repaired so far stays repaired")
            return FsckExit.cancelled.rawValue
        } catch {
            if showProgress { writeStderr("\r\u{1B}[K") }
            printError("fsck: \(error)")
            return FsckExit.operationalError.rawValue
        }
        if showProgress { writeStderr("\r\u{1B}[K") }
        if let mountedNote { report.notes.insert(mountedNote, at: 0) }
        if json {
            let enc = JSONEncoder()
            enc.outputFormatting = [.prettyPrinted, .sortedKeys, .withoutEscapingSlashes]
            if let data = try? enc.encode(report) { print(String(decoding: data, as: UTF8.self)) }
        } else {
            printText(report)
        }
        return report.exitStatus
    }

    func printText(_ r: FsckReport) {
        print("Volume:     \(r.cipherDir)")
        print("Key:        \(r.keyUsed ? "used (header copy \(r.headerCopyInUse ?? "?"))" : "none: key-free checks only")")
        print("Checked:    \(r.directories) directories, \(r.files) files, \(r.symlinks) symlinks, \(r.otherEntries) other entries")
        for n in r.notes { print("Note:       \(n)") }
        if r.findings.isEmpty {
            print("No problems found.")
            return
        }
        for f in r.findings {
            var line = "\(f.severity == .error ? "ERROR" : "warning") \(f.kind.rawValue): \(f.backingPath)"
            if let p = f.plaintextPath { line += " (\(p))" }
            if let s = f.shadows { line += " shadows \(s)" }
            line += ": \(f.detail)"
            if let a = f.repaired { line += " [repaired: \(a.rawValue)]" }
            if let n = f.notRepaired { line += " [not repaired: \(n)]" }
            print(line)
        }
        let errors = r.findings.filter { $0.severity == .error }
        let open = errors.filter(\.isOpenError)
        print("\(errors.count) errors (\(errors.count - open.count) repaired, \(open.count) left), \(r.findings.count - errors.count) warnings.")
        if !open.isEmpty && r.mode == "check" { print("Run with --repair to fix what is safe to fix.") }
    }
}
