import ArgumentParser
import Foundation
import XTSKeys
import XTSSystem
import XTSVolume

struct Keys: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Manage keyslots: list, add, remove; generate key files.",
        subcommands: [List.self, Add.self, Remove.self, Generate.self])

    struct List: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "List the keyslots (no key needed; never a secret).")

        @Argument(help: "The volume's directory.")
        var cipherDir: String

        @Flag(help: "Print JSON.")
        var json = false

        func run() throws {
            let r = try StatusReport.make(cipherDir)
            if json {
                let enc = JSONEncoder()
                enc.outputFormatting = [.prettyPrinted, .sortedKeys, .withoutEscapingSlashes]
                print(String(decoding: try enc.encode(r.keyslots), as: UTF8.self))
                return
            }
            for w in r.warnings { say("xtsfs: warning: \(w)") }
            print("SLOT  PROVIDER      GEN  CREATED               DESCRIPTION")
            for s in r.keyslots {
                let params = s.parameters.keys.sorted().map { "\($0)=\(s.parameters[$0]!)" }.joined(separator: " ")
                let index = String(s.index).padding(toLength: 4, withPad: " ", startingAt: 0)
                let provider = s.provider.padding(toLength: 12, withPad: " ", startingAt: 0)
                let gen = String(s.keyGeneration).padding(toLength: 3, withPad: " ", startingAt: 0)
                print("\(index)  \(provider)  \(gen)  \(isoDate(s.created))  \(params)")
            }
        }
    }

    struct Add: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Add a keyslot: unlock with an existing key, then wrap the volume key with a new one.",
            discussion: "The existing key is given as for mount (--passfile, --keyfile, --extpass, --pkcs11, --recovery-file, or a prompt); the new one with the same options prefixed by new- (--new-passfile, --new-keyfile, --new-extpass, --new-pkcs11 [--generate], --new-recovery-key).")

        @Argument(help: "The volume's directory.")
        var cipherDir: String

        @OptionGroup var key: KeyOptions
        @OptionGroup var new: NewKeyOptions
        @OptionGroup var kdf: KDFOptions

        @Option(name: .customLong("new-slot"), help: ArgumentHelp("Index for the new slot (default: the lowest free one).", valueName: "N"))
        var newSlot: UInt16?

        func run() throws {
            ProcessHardening.apply()
            let audit = key.audit(cipherDir)
            // Everything that can fail on bad input is checked before the expensive unlock.
            _ = try Volume.load(cipherDir)
            let opener = try key.provider(auditing: cipherDir, operation: "unlock for keys add")
            let costs = try kdf.costs(needed: new.choice.usesKDF)
            let (newProvider, recovery) = try new.choice.provider(newSlot: true, costs: costs)
            let index = try KeySlots.add(cipherDir: cipherDir, provider: opener, slot: key.slot, newProvider: newProvider,
                                         index: newSlot, audit: audit)
            say("Added keyslot \(index) (\(newProvider.type)).")
            if let k = newProvider as? KMIPProvider, new.generate { say("Created key \(k.keyID) on the KMIP server \(k.connection.server); unlock with --kmip-key-id \(k.keyID).") }
            if let recovery { printRecoveryKey(recovery, slot: index) }
        }
    }

    struct Remove: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Remove a keyslot (unlocking with any key of the volume, that one included).",
            discussion: "A removed slot still opens any copy of the old header (a backup, a synced older version) until the volume key is rekeyed.")

        @Argument(help: "The volume's directory.")
        var cipherDir: String

        @Argument(help: "The keyslot index to remove (see xtsfs keys list).")
        var index: UInt16

        @OptionGroup var key: KeyOptions

        @Flag(help: "Allow removing the last keyslot (the volume can then never be opened).")
        var force = false

        func run() throws {
            ProcessHardening.apply()
            _ = try Volume.load(cipherDir)
            try KeySlots.remove(cipherDir: cipherDir, index: index, provider: try key.provider(auditing: cipherDir, operation: "unlock for keys remove"), slot: key.slot,
                                force: force, audit: key.audit(cipherDir))
            say("Removed keyslot \(index). Copies of the old header (backups) still open with it until the volume key is rekeyed.")
        }
    }

    struct Generate: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Write a new random key file (64 bytes, mode 0400); never overwrites.")

        @Argument(help: "The key file to create.")
        var file: String

        func run() throws {
            try KeySlots.generateKeyfile(file)
            say("Wrote a new key file \(file) (64 random bytes, mode 0400). Add it with: xtsfs keys add CIPHERDIR --new-keyfile \(file)")
        }
    }
}

struct Audit: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Print the audit log of key operations (CIPHERDIR/xtsfs.audit/, all hosts merged in time order).")

    @Argument(help: "The volume's directory.")
    var cipherDir: String

    @Option(name: .customLong("audit-log"), help: ArgumentHelp("Read this file instead of CIPHERDIR/xtsfs.audit/.", valueName: "FILE"))
    var auditLog: String?

    @Flag(help: "Print the JSON lines as stored.")
    var json = false

    func run() throws {
        let lines = try AuditLog(cipherDir: cipherDir, override: auditLog).read()
        for line in lines {
            if json { print(line); continue }
            guard let obj = try? JSONSerialization.jsonObject(with: Data(line.utf8)) as? [String: Any] else {
                print("(unreadable line) \(line)")
                continue
            }
            func f(_ k: String) -> String { obj[k].map { "\($0)" } ?? "-" }
            var text = "\(f("time"))  \(f("host"))  \(f("operation"))"
            if obj["slot"] != nil { text += "  slot \(f("slot"))" }
            if obj["provider"] != nil { text += "  \(f("provider"))" }
            text += "  \(f("outcome"))"
            if obj["detail"] != nil { text += ": \(f("detail"))" }
            print(text)
        }
    }
}

func isoDate(_ t: UInt64) -> String {
    ISO8601DateFormatter().string(from: Date(timeIntervalSince1970: TimeInterval(t)))
}
