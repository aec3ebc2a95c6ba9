import ArgumentParser
import XTSSystem
import XTSVolume

struct Header: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Back up or restore the volume header (keyslots included).",
        subcommands: [Backup.self, Restore.self])

    struct Backup: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Write the volume header to FILE (never overwritten; mode 0400). No key needed.",
            discussion: "The backup holds the keyslots as they are now: anyone with a key of one of them can open the volume with it, even after that slot is removed or its key rotated (until a DEK rekey). Keep it as safe as the keys.")
        @Argument(help: "The volume's directory.") var cipherDir: String
        @Argument(help: "The backup file to create.") var file: String
        func run() throws {
            try XTSVolume.Rekey.backupHeader(cipherDir: cipherDir, to: file)
            say("Wrote the header of \(cipherDir) to \(file).")
        }
    }

    struct Restore: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Replace both header copies with the backup in FILE, after checking it is this volume's and that a key opens it.",
            discussion: "Refused while the volume is mounted, here or on another host (presence records; --force ignores those of other hosts). Refused for a header of another volume (volume ID) and when the key given does not open the backup; nothing is written before both checks pass. A restored header brings back its keyslots: keys removed or rotated since the backup open the volume again.")
        @Argument(help: "The volume's directory.") var cipherDir: String
        @Argument(help: "The backup file.") var file: String
        @OptionGroup var key: KeyOptions
        @Flag(help: "Go on although another host's presence record says it has the volume mounted (only if that host is known to be gone).")
        var force = false
        func run() throws {
            ProcessHardening.apply()
            let opener = try key.provider(auditing: cipherDir, operation: "unlock for header restore")
            try XTSVolume.Rekey.restoreHeader(cipherDir: cipherDir, from: file, provider: opener, slot: key.slot, ignoreOtherHosts: force, audit: key.audit(cipherDir))
            say("Restored the header of \(cipherDir) from \(file). Its keyslots are back, including any removed since the backup.")
        }
    }
}
