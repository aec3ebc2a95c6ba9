import ArgumentParser
import XTSCrypto
import XTSFormat
import XTSKeys
import XTSSystem
import XTSVolume

struct Init: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Create a volume in an empty (or new) directory, with one keyslot (a passphrase unless another key is named).")

    @Argument(help: "The directory that will hold the encrypted files.")
    var cipherDir: String

    @OptionGroup var key: KeyOptions

    @Flag(name: .customLong("generate"), help: "With --pkcs11: create the AES-256 key in the token (non-extractable); with --kmip: create and activate it on the server.")
    var generate = false

    @Flag(name: .customLong("recovery-key"), help: "Also make a recovery key slot; the key is printed once.")
    var recoveryKey = false

    @OptionGroup var kdf: KDFOptions

    @Flag(name: .customLong("integrity"), help: "Authenticate file contents: a tampered, moved, cut or extended file reads as an I/O error, not as data (slower; see xtsfs-format(5)).")
    var integrity = false

    func validate() throws {
        if key.slot != nil { throw ValidationError("--slot is for existing volumes") }
        if key.auditLog != nil { throw ValidationError("--audit-log is for existing volumes (init writes no audit line)") }
        if key.recovery || key.recoveryFile != nil { throw ValidationError("init makes a recovery key with --recovery-key") }
        var choice = key.choice
        choice.generate = generate
        try choice.check(prefix: "")
    }

    func run() throws {
        ProcessHardening.apply()
        var choice = key.choice
        choice.generate = generate
        let costs = try kdf.costs(needed: choice.usesKDF)
        let (provider, _) = try choice.provider(newSlot: true, costs: costs)
        var more: [any KeyProvider] = []
        var recovery: SecretBytes?
        if recoveryKey {
            let (p, printable) = try RecoveryKeyProvider.generate()
            more.append(p)
            recovery = printable
        }
        let header = try Volume.initialize(cipherDir: cipherDir, provider: provider, more: more, features: .contents(integrity ? .ghashAES256Root : nil))
        if let k = provider as? KMIPProvider, generate { say("Created key \(k.keyID) on the KMIP server \(k.connection.server); unlock with --kmip-key-id \(k.keyID).") }
        let what: String
        if choice.usesKDF {
            what = "\(provider.type), Argon2id m=\(costs.memoryKiB) KiB t=\(costs.iterations) p=\(costs.parallelism)"
        } else {
            what = "\(provider.type)"
        }
        say("Created an xtsfs volume in \(cipherDir): format version \(header.version), AES-256-XTS\(integrity ? " with authenticated contents (a GHASH+AES-256 tag per 4 KiB unit)" : ""), keyslot 0 (\(what)).")
        if let recovery { printRecoveryKey(recovery, slot: 1) }
        say("Mount it with: xtsfs mount \(cipherDir) MOUNTPOINT")
    }
}
