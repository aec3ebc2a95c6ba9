import ArgumentParser
import Foundation
import XTSCrypto
import XTSKeys
import XTSVolume

struct BenchmarkCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "benchmark",
        abstract: "Measure the volume's cryptography in memory: AES-256-XTS contents, AES-SIV names, integrity tags, Argon2id.",
        discussion: """
        Like cryptsetup benchmark: no storage and no FUSE, only the code the daemon runs on \
        random keys. Each figure runs for about --time seconds (Argon2id for at least one \
        derivation). Argon2id is measured at the default cost of init (1 GiB, 4 lanes, 4 \
        iterations) and, when --pbkdf-memory, --pbkdf-parallel or --pbkdf-force-iterations \
        is given, at that cost too. MB/s are 10^6 bytes per second.
        """)

    @Flag(help: "Print one JSON object.")
    var json = false

    @Option(name: .customLong("time"), help: ArgumentHelp("Seconds per figure (0.01 to 60).", valueName: "SECONDS"))
    var seconds: Double = 0.5

    @Option(name: .customLong("pbkdf-memory"), help: ArgumentHelp("Also measure Argon2id with this memory cost in KiB.", valueName: "KIB"))
    var memoryKiB: UInt32?

    @Option(name: .customLong("pbkdf-parallel"), help: ArgumentHelp("Argon2id lanes (threads) of that cost (default 4).", valueName: "N"))
    var parallelism: UInt32?

    @Option(name: .customLong("pbkdf-force-iterations"), help: ArgumentHelp("Argon2id iterations of that cost (default 4).", valueName: "N"))
    var iterations: UInt32?

    @Option(name: .customLong("iter-time"), help: ArgumentHelp("Also report the iterations that take MS milliseconds, as init --iter-time would tune them.", valueName: "MS"))
    var iterTime: Int = 1000

    var extraCost: Argon2idParameters? {
        guard memoryKiB != nil || parallelism != nil || iterations != nil else { return nil }
        let d = PassphraseProvider.defaultCosts
        return Argon2idParameters(memoryKiB: memoryKiB ?? d.memoryKiB, iterations: iterations ?? d.iterations,
                                  parallelism: parallelism ?? d.parallelism)
    }

    func validate() throws {
        guard seconds >= 0.01 && seconds <= 60 else { throw ValidationError("--time must be 0.01 to 60 seconds") }
        guard iterTime > 0 else { throw ValidationError("--iter-time must be positive") }
        if let c = extraCost {
            guard (1...16).contains(c.parallelism) else { throw ValidationError("--pbkdf-parallel must be 1 to 16") }
            guard c.memoryKiB >= 8 * c.parallelism, c.memoryKiB <= Argon2Bounds.maxMemoryKiB else {
                throw ValidationError("--pbkdf-memory must be between 8×parallelism and \(Argon2Bounds.maxMemoryKiB) KiB")
            }
            let half = Argon2Bounds.physicalMemoryKiB() / 2
            if half > 0 && UInt64(c.memoryKiB) > half { throw ValidationError("--pbkdf-memory \(c.memoryKiB) KiB is more than half of this machine's RAM") }
            guard c.iterations > 0 && c.iterations <= Argon2Bounds.maxIterations else {
                throw ValidationError("--pbkdf-force-iterations must be 1 to \(Argon2Bounds.maxIterations)")
            }
            guard UInt64(c.iterations) * UInt64(c.memoryKiB) <= Argon2Bounds.maxWork else {
                throw ValidationError("--pbkdf-memory × --pbkdf-force-iterations must be at most \(Argon2Bounds.maxWork) KiB (8× the default work)")
            }
        }
    }

    func run() throws {
        let terminal = isatty(2) == 1 && !json
        let r = try Benchmark.run(seconds: seconds, kdfCosts: extraCost.map { [$0] } ?? [], targetMilliseconds: iterTime) { what in
            if terminal { writeStderr("\r\u{1B}[K# measuring \(what) …") }
        }
        if terminal { writeStderr("\r\u{1B}[K") }
        if json {
            let enc = JSONEncoder()
            enc.outputFormatting = [.prettyPrinted, .sortedKeys, .withoutEscapingSlashes]
            enc.keyEncodingStrategy = .convertToSnakeCase
            print(String(decoding: try enc.encode(r), as: UTF8.self))
            return
        }
        print(Self.text(r), terminator: "")
    }

    static func text(_ r: BenchmarkReport) -> String {
        func pad(_ s: String, _ n: Int) -> String { String(repeating: " ", count: max(0, n - s.count)) + s }
        func rate(_ v: Double, _ unit: String) -> String { String(format: "%.1f %@", v, unit) }
        func size(_ b: Int) -> String { b >= 1 << 20 ? "\(b >> 20) MiB" : "\(b >> 10) KiB" }
        var out = "# In memory only (no storage, no FUSE); \(r.machine.cores) cores, \(r.machine.openssl); "
        out += String(format: "about %.2g s per figure. MB/s = 10^6 bytes/s.\n", r.secondsPerFigure)
        out += "#     Algorithm | Request | Threads |     Encryption |     Decryption\n"
        for c in r.content {
            out += pad(c.algorithm, 15) + pad(size(c.requestBytes), 10) + pad("\(c.threads)", 10)
                + pad(rate(c.encryptMBPerSecond, "MB/s"), 17) + pad(rate(c.decryptMBPerSecond, "MB/s"), 17) + "\n"
        }
        out += "#     Algorithm |    Name | Threads |     Encryption |     Decryption\n"
        for n in r.names {
            out += pad(n.algorithm, 15) + pad("\(n.nameBytes) B", 10) + pad("\(n.threads)", 10)
                + pad(String(format: "%.0f names/s", n.encryptNamesPerSecond), 17) + pad(String(format: "%.0f names/s", n.decryptNamesPerSecond), 17) + "\n"
        }
        out += "#  Unit tags (per 4 KiB) | Request | Threads |     Tags\n"
        for t in r.integrityTags {
            out += pad("\(t.algorithm) (v\(t.tagAlgorithm))", 24) + pad(size(t.requestBytes), 10) + pad("\(t.threads)", 10) + pad(rate(t.mbPerSecond, "MB/s"), 15) + "\n"
        }
        for k in r.argon2id {
            let perIteration = k.millisecondsPerDerivation / Double(max(k.iterations, 1))
            let target = k.iterationsForTarget == 1 && perIteration > Double(k.targetMilliseconds)
                ? String(format: "1 iteration already takes %.0f ms (more than %d ms)", perIteration, k.targetMilliseconds)
                : "\(k.iterationsForTarget) iteration\(k.iterationsForTarget == 1 ? "" : "s") for \(k.targetMilliseconds) ms"
            out += String(format: "argon2id  %u iterations, %u KiB memory, %u lanes%@: %.0f ms per derivation; ",
                          k.iterations, k.memoryKiB, k.parallelism, k.isDefault ? " (default)" : "", k.millisecondsPerDerivation)
            out += target + "\n"
        }
        return out
    }
}
