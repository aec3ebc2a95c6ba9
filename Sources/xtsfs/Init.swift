import ArgumentParser
import XTSCrypto
import XTSFormat
import XTSKeys
import XTSSystem
import XTSVolume

struct Init: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Create a volume in an empty (or new) directory, with a passphrase keyslot.")

    @Argument(help: "The directory that will hold the encrypted files.")
    var cipherDir: String

    @OptionGroup var secret: PassfileOption

    @Option(name: .customLong("pbkdf-memory"), help: ArgumentHelp("Argon2id memory cost in KiB.", valueName: "KIB"))
    var memoryKiB: UInt32 = 1024 * 1024

    @Option(name: .customLong("pbkdf-parallel"), help: ArgumentHelp("Argon2id lanes (threads).", valueName: "N"))
    var parallelism: UInt32 = 4

    @Option(name: .customLong("iter-time"), help: ArgumentHelp("Tune Argon2id iterations so that unlocking takes about MS milliseconds.", valueName: "MS"))
    var iterTime: Int = 1000

    @Option(name: .customLong("pbkdf-force-iterations"), help: ArgumentHelp("Use exactly N Argon2id iterations (no tuning).", valueName: "N"))
    var forceIterations: UInt32?

    @Flag(name: .customLong("integrity"), help: "Authenticate file contents: a tampered, moved, cut or extended file reads as an I/O error, not as data (slower; see xtsfs-format(5)).")
    var integrity = false

    func validate() throws {
        guard (1...16).contains(parallelism) else { throw ValidationError("--pbkdf-parallel must be 1 to 16") }
        guard memoryKiB >= 8 * parallelism, memoryKiB <= 4 * 1024 * 1024 else { throw ValidationError("--pbkdf-memory must be between 8×parallelism and 4194304 KiB") }
        guard iterTime > 0 else { throw ValidationError("--iter-time must be positive") }
        if let n = forceIterations, n == 0 || n > Init.maxIterations {
            throw ValidationError("--pbkdf-force-iterations must be 1 to \(Init.maxIterations)")
        }
    }

    /// What an unlock accepts (PassphraseParameters.decode); more could never be opened.
    static let maxIterations: UInt32 = 1_000_000

    func run() throws {
        ProcessHardening.apply()
        let passphrase = try SecretInput.newPassphrase(passfile: secret.passfile)
        let costs: Argon2idParameters
        if let n = forceIterations {
            costs = Argon2idParameters(memoryKiB: memoryKiB, iterations: n, parallelism: parallelism)
        } else {
            do {
                var tuned = try Argon2id.calibrate(memoryKiB: memoryKiB, parallelism: parallelism, targetMilliseconds: iterTime)
                tuned.iterations = min(tuned.iterations, Init.maxIterations)
                costs = tuned
            } catch { throw VolumeError.failure("cannot tune Argon2id: \(error)") }
        }
        let header = try Volume.initialize(cipherDir: cipherDir, provider: PassphraseProvider(passphrase: passphrase, costs: costs),
                                           features: integrity ? [.blockAuthentication] : [])
        say("Created an xtsfs volume in \(cipherDir): format version \(header.version), AES-256-XTS\(integrity ? " with authenticated contents (HMAC-SHA256 tag per 4 KiB unit)" : ""), keyslot 0 (passphrase, Argon2id m=\(costs.memoryKiB) KiB t=\(costs.iterations) p=\(costs.parallelism)).")
        say("Mount it with: xtsfs mount \(cipherDir) MOUNTPOINT")
    }
}
