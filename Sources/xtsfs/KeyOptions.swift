import ArgumentParser
import XTSCrypto
import XTSFormat
import XTSKeys
import XTSSystem
import XTSVolume

/// Which provider a command uses, from its options: one convention for every command.
/// Unlocking takes `--passfile F`, `--keyfile F`, `--extpass CMD`, `--pkcs11 URI`,
/// `--recovery-file F` / `--recovery`, or a terminal prompt; the key being added takes the
/// same with `new-` in front (as cryptsetup does).
struct ProviderChoice {
    var passfile: String?
    var keyfile: String?
    var extpass: String?
    var extpassTimeout: Double = CommandProvider.defaultTimeout
    var pkcs11: String?
    var pkcs11Module: String?
    var pinFile: String?
    var recoveryFile: String?
    var recoveryPrompt = false
    var kmip: String?
    var kmipKeyID: String?
    var kmipCert: String?
    var kmipKey: String?
    var kmipCA: String?
    /// For a new slot: a fresh recovery key, printed once.
    var newRecoveryKey = false
    /// For a new PKCS#11 slot: create the key in the token.
    var generate = false

    var named: [String] {
        var n: [String] = []
        if passfile != nil { n.append("passfile") }
        if keyfile != nil { n.append("keyfile") }
        if extpass != nil { n.append("extpass") }
        if pkcs11 != nil { n.append("pkcs11") }
        if kmip != nil { n.append("kmip") }
        if recoveryFile != nil || recoveryPrompt || newRecoveryKey { n.append("recovery key") }
        return n
    }

    func check(prefix: String) throws {
        if named.count > 1 { throw ValidationError("give one key: \(named.map { "--\(prefix)\($0 == "recovery key" ? "recovery…" : $0)" }.joined(separator: ", ")) are exclusive") }
        if generate && pkcs11 == nil && kmip == nil { throw ValidationError("--generate goes with --\(prefix)pkcs11 or --\(prefix)kmip") }
        if kmip != nil {
            guard kmipCert != nil, kmipKey != nil, kmipCA != nil else { throw ValidationError("--\(prefix)kmip needs --\(prefix)kmip-cert, --\(prefix)kmip-key and --\(prefix)kmip-ca") }
            if kmipKeyID != nil && generate { throw ValidationError("--generate creates a new KMIP key: drop --\(prefix)kmip-key-id") }
        } else if kmipKeyID != nil || kmipCert != nil || kmipKey != nil || kmipCA != nil {
            throw ValidationError("--\(prefix)kmip-key-id, -cert, -key and -ca go with --\(prefix)kmip")
        }
        if (pkcs11Module != nil || pinFile != nil) && pkcs11 == nil { throw ValidationError("--\(prefix)pkcs11-module and --\(prefix)pin-file go with --\(prefix)pkcs11") }
        guard extpassTimeout > 0 && extpassTimeout <= 3600 else { throw ValidationError("--extpass-timeout must be 1 to 3600 seconds") }
    }

    /// The provider; `newSlot` asks a terminal passphrase twice. For a new recovery key,
    /// `recovery` holds the printable key.
    func provider(newSlot: Bool, costs: Argon2idParameters) throws -> (provider: any KeyProvider, recovery: SecretBytes?) {
        do {
            if let keyfile {
                return (try KeyfileProvider(contents: try SecretInput.wholeFile(keyfile, limit: KeyfileProvider.maximumLength, what: "key file")), nil)
            }
            if let extpass {
                return (try CommandProvider(command: extpass, timeout: extpassTimeout, costs: costs), nil)
            }
            if let pkcs11 {
                try PKCS11Provider.check(uri: pkcs11)
                let pin = try SecretInput.pin(file: pinFile, token: pkcs11)
                return (try PKCS11Provider(uri: pkcs11, module: pkcs11Module, pin: pin, generate: generate), nil)
            }
            if let kmip {
                guard generate || kmipKeyID != nil else { throw VolumeError.usage("--kmip needs --kmip-key-id ID (or, for a new slot, --generate to create a key on the server)") }
                let c = try KMIPProvider.Connection(server: kmip, certificate: kmipCert ?? "", key: kmipKey ?? "", ca: kmipCA ?? "")
                return (try KMIPProvider(connection: c, keyID: generate ? nil : kmipKeyID), nil)
            }
            if newRecoveryKey {
                let (p, printable) = try RecoveryKeyProvider.generate()
                return (p, printable)
            }
            if let recoveryFile {
                return (try RecoveryKeyProvider(typed: try SecretInput.fromFile(recoveryFile)), nil)
            }
            if recoveryPrompt {
                return (try RecoveryKeyProvider(typed: try SecretInput.fromTerminal(prompt: "Recovery key: ")), nil)
            }
            let passphrase = newSlot ? try SecretInput.newPassphrase(passfile: passfile) : try SecretInput.passphrase(passfile: passfile)
            return (PassphraseProvider(passphrase: passphrase, costs: costs), nil)
        } catch let e as KeyError {
            throw VolumeError(e, context: nil)
        }
    }
}

/// The key that opens an existing volume.
struct KeyOptions: ParsableArguments {
    @Option(name: .long, help: ArgumentHelp("Read the passphrase from the first line of FILE instead of the terminal.", valueName: "FILE"))
    var passfile: String?
    @Option(name: .long, help: ArgumentHelp("Unlock with a key file (made by xtsfs keys generate).", valueName: "FILE"))
    var keyfile: String?
    @Option(name: .long, help: ArgumentHelp("Unlock with the first line a command prints (run by /bin/sh -c).", valueName: "COMMAND"))
    var extpass: String?
    @Option(name: .customLong("extpass-timeout"), help: ArgumentHelp("Seconds the command may take.", valueName: "S"))
    var extpassTimeout: Double = CommandProvider.defaultTimeout
    @Option(name: .long, help: ArgumentHelp("Unlock with an AES key in a PKCS#11 token (RFC 7512 URI, pkcs11:token=…;object=…).", valueName: "URI"))
    var pkcs11: String?
    @Option(name: .customLong("pkcs11-module"), help: ArgumentHelp("The PKCS#11 module to load (default: those registered with p11-kit).", valueName: "PATH"))
    var pkcs11Module: String?
    @Option(name: .customLong("pin-file"), help: ArgumentHelp("Read the token PIN from the first line of FILE instead of the terminal.", valueName: "FILE"))
    var pinFile: String?
    @Option(name: .customLong("recovery-file"), help: ArgumentHelp("Unlock with the recovery key in FILE.", valueName: "FILE"))
    var recoveryFile: String?
    @Flag(name: .long, help: "Unlock with a recovery key typed at the terminal.")
    var recovery = false
    @Option(name: .long, help: ArgumentHelp("Unlock with a key on a KMIP server (mutual TLS).", valueName: "HOST:PORT"))
    var kmip: String?
    @Option(name: .customLong("kmip-key-id"), help: ArgumentHelp("The key's unique identifier on the KMIP server.", valueName: "ID"))
    var kmipKeyID: String?
    @Option(name: .customLong("kmip-cert"), help: ArgumentHelp("Client certificate (PEM) for the KMIP server.", valueName: "FILE"))
    var kmipCert: String?
    @Option(name: .customLong("kmip-key"), help: ArgumentHelp("Client private key (PEM) for the KMIP server.", valueName: "FILE"))
    var kmipKey: String?
    @Option(name: .customLong("kmip-ca"), help: ArgumentHelp("CA certificate (PEM) that signed the KMIP server's certificate.", valueName: "FILE"))
    var kmipCA: String?
    @Option(name: .long, help: ArgumentHelp("Try only keyslot N.", valueName: "N"))
    var slot: UInt16?
    @Option(name: .customLong("audit-log"), help: ArgumentHelp("Append the audit log to FILE instead of CIPHERDIR/xtsfs.audit/.", valueName: "FILE"))
    var auditLog: String?

    var choice: ProviderChoice {
        ProviderChoice(passfile: passfile, keyfile: keyfile, extpass: extpass, extpassTimeout: extpassTimeout, pkcs11: pkcs11,
                       pkcs11Module: pkcs11Module, pinFile: pinFile, recoveryFile: recoveryFile, recoveryPrompt: recovery,
                       kmip: kmip, kmipKeyID: kmipKeyID, kmipCert: kmipCert, kmipKey: kmipKey, kmipCA: kmipCA)
    }

    func validate() throws { try choice.check(prefix: "") }

    /// The provider that unlocks (existing slots carry their own costs). A provider that
    /// fails before any slot is tried (wrong PIN, token missing, command failed) is a
    /// failed unlock too: it goes to the audit log of a volume.
    func provider(auditing cipherDir: String, operation: String) throws -> any KeyProvider {
        do { return try choice.provider(newSlot: false, costs: PassphraseProvider.defaultCosts).provider } catch let e as VolumeError {
            if let header = try? Volume.load(cipherDir).newest {
                audit(cipherDir).record(.init(operation: operation, volumeID: header.volumeID, slot: slot,
                                              provider: choice.providerName, ok: false, detail: e.description))
            }
            throw e
        }
    }

    func audit(_ cipherDir: String) -> AuditLog { AuditLog(cipherDir: cipherDir, override: auditLog) }
}

/// The key being added (`keys add`): the same options with `new-` in front.
struct NewKeyOptions: ParsableArguments {
    @Option(name: .customLong("new-passfile"), help: ArgumentHelp("The new passphrase, from the first line of FILE (default: asked twice).", valueName: "FILE"))
    var passfile: String?
    @Option(name: .customLong("new-keyfile"), help: ArgumentHelp("Add a key file slot.", valueName: "FILE"))
    var keyfile: String?
    @Option(name: .customLong("new-extpass"), help: ArgumentHelp("Add a slot opened by what COMMAND prints.", valueName: "COMMAND"))
    var extpass: String?
    @Option(name: .customLong("new-pkcs11"), help: ArgumentHelp("Add a slot whose key is in a PKCS#11 token.", valueName: "URI"))
    var pkcs11: String?
    @Option(name: .customLong("new-pkcs11-module"), help: ArgumentHelp("The PKCS#11 module for --new-pkcs11.", valueName: "PATH"))
    var pkcs11Module: String?
    @Option(name: .customLong("new-pin-file"), help: ArgumentHelp("The PIN for --new-pkcs11.", valueName: "FILE"))
    var pinFile: String?
    @Option(name: .customLong("new-kmip"), help: ArgumentHelp("Add a slot whose key is on a KMIP server.", valueName: "HOST:PORT"))
    var kmip: String?
    @Option(name: .customLong("new-kmip-key-id"), help: ArgumentHelp("The key's ID on the server (or --generate).", valueName: "ID"))
    var kmipKeyID: String?
    @Option(name: .customLong("new-kmip-cert"), help: ArgumentHelp("Client certificate for --new-kmip.", valueName: "FILE"))
    var kmipCert: String?
    @Option(name: .customLong("new-kmip-key"), help: ArgumentHelp("Client private key for --new-kmip.", valueName: "FILE"))
    var kmipKey: String?
    @Option(name: .customLong("new-kmip-ca"), help: ArgumentHelp("CA certificate for --new-kmip.", valueName: "FILE"))
    var kmipCA: String?
    @Flag(name: .customLong("generate"), help: "With --new-pkcs11: create the AES-256 key in the token (non-extractable); with --new-kmip: create and activate it on the server.")
    var generate = false
    @Flag(name: .customLong("new-recovery-key"), help: "Add a recovery key slot; the key is printed once.")
    var recoveryKey = false

    var choice: ProviderChoice {
        ProviderChoice(passfile: passfile, keyfile: keyfile, extpass: extpass, pkcs11: pkcs11, pkcs11Module: pkcs11Module,
                       pinFile: pinFile, kmip: kmip, kmipKeyID: kmipKeyID, kmipCert: kmipCert, kmipKey: kmipKey, kmipCA: kmipCA,
                       newRecoveryKey: recoveryKey, generate: generate)
    }

    func validate() throws { try choice.check(prefix: "new-") }
}

/// Argon2id costs of a new passphrase or command slot.
struct KDFOptions: ParsableArguments {
    @Option(name: .customLong("pbkdf-memory"), help: ArgumentHelp("Argon2id memory cost in KiB.", valueName: "KIB"))
    var memoryKiB: UInt32 = 1024 * 1024

    @Option(name: .customLong("pbkdf-parallel"), help: ArgumentHelp("Argon2id lanes (threads).", valueName: "N"))
    var parallelism: UInt32 = 4

    @Option(name: .customLong("iter-time"), help: ArgumentHelp("Tune Argon2id iterations so that unlocking takes about MS milliseconds.", valueName: "MS"))
    var iterTime: Int = 1000

    @Option(name: .customLong("pbkdf-force-iterations"), help: ArgumentHelp("Use exactly N Argon2id iterations (no tuning).", valueName: "N"))
    var forceIterations: UInt32?

    func validate() throws {
        guard (1...16).contains(parallelism) else { throw ValidationError("--pbkdf-parallel must be 1 to 16") }
        guard memoryKiB >= 8 * parallelism, memoryKiB <= Argon2Bounds.maxMemoryKiB else { throw ValidationError("--pbkdf-memory must be between 8×parallelism and \(Argon2Bounds.maxMemoryKiB) KiB") }
        let half = Argon2Bounds.physicalMemoryKiB() / 2
        if half > 0 && UInt64(memoryKiB) > half { throw ValidationError("--pbkdf-memory \(memoryKiB) KiB is more than half of this machine's RAM; no unlock here could use it") }
        guard iterTime > 0 else { throw ValidationError("--iter-time must be positive") }
        if let n = forceIterations {
            guard n > 0 && n <= Argon2Bounds.maxIterations else { throw ValidationError("--pbkdf-force-iterations must be 1 to \(Argon2Bounds.maxIterations)") }
            guard UInt64(n) * UInt64(memoryKiB) <= Argon2Bounds.maxWork else {
                throw ValidationError("--pbkdf-memory × --pbkdf-force-iterations must be at most \(Argon2Bounds.maxWork) KiB (8× the default work); an unlock refuses more")
            }
        }
    }

    /// Only computed when a passphrase or command slot is made (tuning takes a second).
    func costs(needed: Bool) throws -> Argon2idParameters {
        guard needed else { return PassphraseProvider.defaultCosts }
        if memoryKiB < Argon2Bounds.recommendedMinimumKiB {
            say("xtsfs: warning: Argon2id memory \(memoryKiB) KiB is below the recommended \(Argon2Bounds.recommendedMinimumKiB) KiB: a guessable passphrase is cheap to attack")
        }
        if let n = forceIterations { return Argon2idParameters(memoryKiB: memoryKiB, iterations: n, parallelism: parallelism) }
        do {
            var tuned = try Argon2id.calibrate(memoryKiB: memoryKiB, parallelism: parallelism, targetMilliseconds: iterTime)
            let maxT = UInt32(min(UInt64(Argon2Bounds.maxIterations), Argon2Bounds.maxWork / UInt64(memoryKiB)))
            tuned.iterations = max(1, min(tuned.iterations, maxT))
            return tuned
        } catch { throw VolumeError.failure("cannot tune Argon2id: \(error)") }
    }
}

extension ProviderChoice {
    /// The provider's name as the audit log and `keys list` say it.
    var providerName: String {
        if keyfile != nil { return ProviderType.keyfile.description }
        if extpass != nil { return ProviderType.command.description }
        if pkcs11 != nil { return ProviderType.pkcs11.description }
        if kmip != nil { return ProviderType.kmip.description }
        if recoveryFile != nil || recoveryPrompt || newRecoveryKey { return ProviderType.recoveryKey.description }
        return ProviderType.passphrase.description
    }

    /// Whether the new slot's KEK comes from Argon2id (passphrase or command).
    var usesKDF: Bool { keyfile == nil && pkcs11 == nil && kmip == nil && !newRecoveryKey && recoveryFile == nil && !recoveryPrompt }
}

/// Prints a new recovery key once, on standard output, straight from locked memory.
func printRecoveryKey(_ key: SecretBytes, slot: UInt16) {
    say("Recovery key (keyslot \(slot)). It is shown only this once: write it down and keep it offline.")
    writeStdout("\n    ")
    key.withUnsafeBytes { p in _ = Glibc.write(1, p.baseAddress, p.count) }
    writeStdout("\n\n")
}

func writeStdout(_ text: String) {
    _ = text.withCString { Glibc.write(1, $0, strlen($0)) }
}

#if canImport(Glibc)
import Glibc
#endif
