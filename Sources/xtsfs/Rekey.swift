import ArgumentParser
import Foundation
import XTSKeys
import XTSSystem
import XTSVolume
#if canImport(Glibc)
import Glibc
#endif

struct Rekey: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Rotate keys: --kek rewraps the volume key under a new key (header only); --dek re-encrypts everything under a new volume key (offline or through the mount's daemon, resumable).",
        discussion: """
        --kek replaces the keyslot that opens (or --slot N) by one of the new key (--new-passfile, --new-keyfile, --new-extpass, --new-pkcs11, \
        --new-kmip, --new-recovery-key; default: a new passphrase asked twice). A backup of the old header still opens with the old key.
        --dek re-encrypts every file, name, symlink target and xattr; an interrupted run (crash, kill -9) is resumed by running the same \
        command again. Unmounted, this command does it; mounted (read-write, on this machine), the daemon serving the mount does it in the \
        background while the mount is in use, and this command shows its progress until it is done (interrupting it leaves the daemon \
        sweeping; xtsfs status shows it). Either way it is refused while another host, or another mount on this machine than the one \
        whose daemon sweeps, has the volume mounted (presence records in CIPHERDIR/xtsfs.hosts; --force ignores them). Slots other than the one that opens cannot be rewrapped and are removed at the end \
        (--remove-other-slots); add them again with xtsfs keys add.
        """)

    @Argument(help: "The volume's directory.")
    var cipherDir: String
    @Flag(help: "Rotate a key-encryption key (one keyslot).")
    var kek = false
    @Flag(help: "Rotate the data-encryption key: re-encrypt the whole volume.")
    var dek = false
    @OptionGroup var key: KeyOptions
    @OptionGroup var new: NewKeyOptions
    @OptionGroup var kdf: KDFOptions
    @Flag(name: .customLong("remove-other-slots"), help: "With --dek: allow removing the keyslots other than the one that opens.")
    var removeOtherSlots = false
    @Flag(help: "With --dek: progress as JSON lines on standard output.")
    var json = false
    @Flag(help: "With --dek: go on although another host's presence record says it has the volume mounted (only if that host is known to be gone).")
    var force = false

    func validate() throws {
        guard kek != dek else { throw ValidationError("give exactly one of --kek and --dek") }
        if dek && !new.choice.named.isEmpty { throw ValidationError("--new-… options go with --kek") }
    }

    func run() throws {
        ProcessHardening.apply()
        _ = try Volume.load(cipherDir)
        let audit = key.audit(cipherDir)
        if kek {
            let opener = try key.provider(auditing: cipherDir, operation: "unlock for rekey kek")
            let costs = try kdf.costs(needed: new.choice.usesKDF)
            let (newProvider, recovery) = try new.choice.provider(newSlot: true, costs: costs)
            let started = Date()
            let index = try XTSVolume.Rekey.rotateKEK(cipherDir: cipherDir, provider: opener, slot: key.slot, newProvider: newProvider, audit: audit)
            say("Keyslot \(index) now opens with the new \(newProvider.type) (\(String(format: "%.2f", Date().timeIntervalSince(started))) s).")
            say("Warning: a backup of the old header (xtsfs header backup, a synced or restored copy) still opens with the old key. The volume key did not change: use --dek after a compromise.")
            if let recovery { printRecoveryKey(recovery, slot: index) }
            return
        }
        let opener = try key.provider(auditing: cipherDir, operation: "unlock for rekey dek")
        let display = ProgressDisplay(json: json)
        let s = try XTSVolume.Rekey.rotateDEK(cipherDir: cipherDir, provider: opener, slot: key.slot, removeOtherSlots: removeOtherSlots,
                                             ignoreOtherHosts: force, audit: audit, progress: { display.update($0) })
        display.finish()
        for w in s.warnings { say("xtsfs: warning: \(w)") }
        if json {
            writeStdout("{\"event\":\"finished\",\"oldGeneration\":\(s.oldGeneration),\"newGeneration\":\(s.newGeneration),\"files\":\(s.files),\"bytes\":\(s.bytes),\"resumed\":\(s.resumed)}\n")
        }
        say("Rekeyed\(s.resumed ? " (resumed)" : ""): generation \(s.oldGeneration) -> \(s.newGeneration), \(s.files) files, \(s.bytes) bytes. The old key is gone from the header.")
        if !s.removedSlots.isEmpty { say("Removed keyslots \(s.removedSlots.map { "\($0)" }.joined(separator: ", ")): add them again with xtsfs keys add.") }
        say("Warning: a backup of the old header still opens with the old key, but no longer decrypts this volume's data.")
    }
}

/// A progress bar on a terminal (stderr), plain lines otherwise, JSON lines with --json.
final class ProgressDisplay {
    let json: Bool
    let terminal = isatty(2) == 1
    let start = Date()
    var last = Date.distantPast
    var lastPhase = ""
    var drawn = false

    init(json: Bool) { self.json = json }

    func update(_ p: RekeyProgress) {
        let now = Date()
        let phaseChanged = p.phase != lastPhase
        guard phaseChanged || now.timeIntervalSince(last) >= (terminal ? 0.1 : 1.0) else { return }
        last = now
        lastPhase = p.phase
        let elapsed = max(now.timeIntervalSince(start), 0.001)
        let rate = Double(p.bytesDone) / elapsed
        let left = rate > 0 ? Double(p.bytesTotal - p.bytesDone) / rate : 0
        if json {
            writeStdout("{\"event\":\"progress\",\"phase\":\"\(p.phase)\",\"files\":\(p.filesDone),\"filesTotal\":\(p.filesTotal),\"bytes\":\(p.bytesDone),\"bytesTotal\":\(p.bytesTotal),\"bytesPerSecond\":\(Int(rate)),\"secondsLeft\":\(Int(left))}\n")
            return
        }
        let mb = { (b: Int64) in String(format: "%.1f MB", Double(b) / 1e6) }
        let text = "\(p.phase): \(p.filesDone)/\(p.filesTotal) files, \(mb(p.bytesDone))/\(mb(p.bytesTotal)), \(String(format: "%.1f", rate / 1e6)) MB/s, \(Int(left)) s left"
        if terminal {
            let fraction = p.bytesTotal > 0 ? Double(p.bytesDone) / Double(p.bytesTotal) : (p.filesTotal > 0 ? Double(p.filesDone) / Double(p.filesTotal) : 1)
            let width = 30
            let filled = max(0, min(width, Int(fraction * Double(width))))
            writeStderr("\r[" + String(repeating: "#", count: filled) + String(repeating: "-", count: width - filled) + "] " + text + "\u{1B}[K")
            drawn = true
        } else {
            writeStderr(text + "\n")
        }
    }

    func finish() { if drawn { writeStderr("\n") } }
}
