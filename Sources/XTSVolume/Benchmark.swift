import XTSContent
import XTSCrypto
import XTSFormat
import XTSKeys
import XTSSystem
#if canImport(Glibc)
import Glibc
#endif

/// `xtsfs benchmark`: the speed of the volume's cryptography in memory (no storage, no
/// FUSE), through the same code the daemon runs: `FileCrypto` for content (AES-256-XTS,
/// a key schedule per request), `NameCodec` for names (AES-256-SIV and base64url), the
/// integrity mode's unit tags (both tag algorithms, a tag per 4 KiB unit, a session per
/// request: GHASH+AES-256 of new volumes, HMAC-SHA256 of older ones), and
/// Argon2id for passphrase slots. Keys are random, in locked memory (`SecretBytes`).
///
/// Every figure runs for about `seconds` (at least one operation), so the whole report
/// takes a bounded time; throughput is in MB/s (10^6 bytes per second, as dd prints).
public struct BenchmarkReport: Codable, Sendable {
    public struct Machine: Codable, Sendable {
        public var cores: Int
        public var kernel: String
        public var openssl: String
    }

    /// AES-256-XTS on requests of `requestBytes` (4 KiB units), one thread or all cores.
    public struct ContentRow: Codable, Sendable {
        public var algorithm: String
        public var requestBytes: Int
        public var threads: Int
        public var encryptMBPerSecond: Double
        public var decryptMBPerSecond: Double
    }

    /// AES-256-SIV names of `nameBytes` bytes, encoded as stored in CIPHERDIR.
    public struct NameRow: Codable, Sendable {
        public var algorithm: String
        public var nameBytes: Int
        public var threads: Int
        public var encryptNamesPerSecond: Double
        public var decryptNamesPerSecond: Double
    }

    /// The integrity mode's unit tags over requests of `requestBytes`, one tag per 4 KiB
    /// unit, by tag algorithm (1: HMAC-SHA256 of older volumes, 2: GHASH+AES-256 of new ones).
    public struct TagRow: Codable, Sendable {
        public var algorithm: String
        public var tagAlgorithm: Int
        public var requestBytes: Int
        public var threads: Int
        public var mbPerSecond: Double
    }

    /// One Argon2id cost: the time of one derivation, and the iterations that would take
    /// `targetMilliseconds` at this memory and parallelism (what `init --iter-time` tunes).
    public struct KDFRow: Codable, Sendable {
        public var algorithm: String
        public var isDefault: Bool
        public var memoryKiB: UInt32
        public var iterations: UInt32
        public var parallelism: UInt32
        public var derivations: Int
        public var millisecondsPerDerivation: Double
        public var targetMilliseconds: Int
        public var iterationsForTarget: UInt32

        enum CodingKeys: String, CodingKey {
            case algorithm, isDefault, iterations, parallelism, derivations, millisecondsPerDerivation, targetMilliseconds, iterationsForTarget
            case memoryKiB = "memoryKib"
        }
    }

    public var machine: Machine
    public var secondsPerFigure: Double
    public var content: [ContentRow]
    public var names: [NameRow]
    public var integrityTags: [TagRow]
    public var argon2id: [KDFRow]
}

public enum Benchmark {
    public static let requestSizes = [4096, 1 << 20]
    /// A name of typical length for a source tree ("ChannelPipelineTests.swift").
    public static let sampleName: [UInt8] = Array("ChannelPipelineTests.swift".utf8)

    /// The cores the benchmark uses for its "all cores" rows.
    public static var cores: Int { max(1, Int(sysconf(Int32(_SC_NPROCESSORS_ONLN)))) }

    /// Runs every measurement. `kdfCosts` are the Argon2id costs to measure besides the
    /// default; `progress` is told what runs next (for a terminal, or nothing).
    public static func run(seconds: Double, kdfCosts: [Argon2idParameters], targetMilliseconds: Int,
                           progress: (String) -> Void = { _ in }) throws -> BenchmarkReport {
        let n = cores
        let threadCounts = n > 1 ? [1, n] : [1]
        // A volume's keys, random, as `init` makes them; one file of each kind.
        let keys = try KeySet.generate(generation: 1, volumeID: try Random.bytes(16))
        let plainFile = try FileCrypto(keys: keys, header: try FileHeader.random(keyGeneration: 1))
        // (Version 3 files tag their units as algorithm 2 does: one row each.)
        let integrityFiles = try UnitTagAlgorithm.allCases.filter { !$0.hasFileRoot }.reversed().map { a in
            (a, try FileCrypto(keys: keys, integrityHeader: try IntegrityFileHeader.random(tags: a, keyGeneration: 1)))
        }

        var content: [BenchmarkReport.ContentRow] = []
        for size in requestSizes {
            for t in threadCounts {
                progress("aes-256-xts \(label(size)) requests, \(t) thread\(t == 1 ? "" : "s")")
                let enc = try throughput(threads: t, seconds: seconds) { try ContentJob(crypto: plainFile, requestBytes: size, encrypt: true) }
                let dec = try throughput(threads: t, seconds: seconds) { try ContentJob(crypto: plainFile, requestBytes: size, encrypt: false) }
                content.append(.init(algorithm: "aes-256-xts", requestBytes: size, threads: t,
                                     encryptMBPerSecond: enc / 1e6, decryptMBPerSecond: dec / 1e6))
            }
        }

        var names: [BenchmarkReport.NameRow] = []
        for t in threadCounts {
            progress("aes-256-siv names, \(t) thread\(t == 1 ? "" : "s")")
            let enc = try throughput(threads: t, seconds: seconds) { try NameJob(keys: keys, decrypt: false) }
            let dec = try throughput(threads: t, seconds: seconds) { try NameJob(keys: keys, decrypt: true) }
            names.append(.init(algorithm: "aes-256-siv", nameBytes: sampleName.count, threads: t,
                               encryptNamesPerSecond: enc, decryptNamesPerSecond: dec))
        }

        var tags: [BenchmarkReport.TagRow] = []
        for (algorithm, file) in integrityFiles {
            for size in requestSizes {
                for t in threadCounts {
                    progress("integrity unit tags (\(algorithm)), \(label(size)) requests, \(t) thread\(t == 1 ? "" : "s")")
                    let rate = try throughput(threads: t, seconds: seconds) { try TagJob(crypto: file, requestBytes: size) }
                    tags.append(.init(algorithm: tagName(algorithm), tagAlgorithm: Int(algorithm.rawValue), requestBytes: size, threads: t, mbPerSecond: rate / 1e6))
                }
            }
        }

        var kdf: [BenchmarkReport.KDFRow] = []
        let costs = [PassphraseProvider.defaultCosts] + kdfCosts.filter { $0 != PassphraseProvider.defaultCosts }
        for (i, c) in costs.enumerated() {
            progress("argon2id m=\(c.memoryKiB) KiB t=\(c.iterations) p=\(c.parallelism)")
            kdf.append(try argon2(c, isDefault: i == 0, seconds: seconds, targetMilliseconds: targetMilliseconds))
        }

        var u = utsname()
        uname(&u)
        let kernel = withUnsafeBytes(of: &u.release) { String(decoding: $0.prefix { $0 != 0 }, as: UTF8.self) }
        let openssl = OpenSSLVersion.text
        return BenchmarkReport(machine: .init(cores: n, kernel: kernel, openssl: openssl), secondsPerFigure: seconds,
                               content: content, names: names, integrityTags: tags, argon2id: kdf)
    }

    /// The `algorithm` of a tag row.
    public static func tagName(_ a: UnitTagAlgorithm) -> String {
        switch a {
        case .hmacSHA256: "hmac-sha256-128"
        case .ghashAES256, .ghashAES256Root: "ghash-aes256"
        }
    }

    static func label(_ bytes: Int) -> String {
        bytes >= 1 << 20 ? "\(bytes >> 20) MiB" : "\(bytes >> 10) KiB"
    }

    // MARK: - Argon2id

    static func argon2(_ c: Argon2idParameters, isDefault: Bool, seconds: Double, targetMilliseconds: Int) throws -> BenchmarkReport.KDFRow {
        do { try Argon2Bounds.checkMachine(c) } catch { throw VolumeError.usage("\(error)") }
        let password = try SecretBytes.random(count: 32)
        let salt = try Random.bytes(16)
        let clock = ContinuousClock()
        let start = clock.now
        var count = 0
        repeat {
            _ = try Argon2id.derive(password: password, salt: salt, parameters: c, count: 32)
            count += 1
        } while Benchmark.seconds(clock.now - start) < seconds
        let ms = Benchmark.seconds(clock.now - start) * 1000 / Double(count)
        let scaled = (Double(c.iterations) * Double(targetMilliseconds) / max(ms, 0.001)).rounded()
        return .init(algorithm: "argon2id", isDefault: isDefault, memoryKiB: c.memoryKiB, iterations: c.iterations,
                     parallelism: c.parallelism, derivations: count, millisecondsPerDerivation: ms,
                     targetMilliseconds: targetMilliseconds, iterationsForTarget: UInt32(min(max(scaled, 1), Double(Argon2Bounds.maxIterations))))
    }

    static func seconds(_ d: Duration) -> Double {
        let (s, atto) = d.components
        return Double(s) + Double(atto) / 1e18
    }

    // MARK: - Timed loops on threads

    /// Runs `make()`'s job on `threads` threads at once, each for about `seconds`, and
    /// returns the summed rate (units of work per second). Each thread builds its own job
    /// (its buffers), as each FUSE worker has its own.
    static func throughput(threads: Int, seconds: Double, make: @escaping @Sendable () throws -> any BenchmarkJob) throws -> Double {
        let runners = (0..<threads).map { _ in Runner(seconds: seconds, make: make) }
        if threads == 1 {
            runners[0].run()
        } else {
            var ids: [pthread_t] = []
            for r in runners {
                var tid = pthread_t()
                let box = Unmanaged.passRetained(r).toOpaque()
                let rc = pthread_create(&tid, nil, { arg in
                    let r = Unmanaged<Runner>.fromOpaque(arg!).takeRetainedValue()
                    r.run()
                    return nil
                }, box)
                if rc != 0 {
                    Unmanaged<Runner>.fromOpaque(box).release()
                    for t in ids { pthread_join(t, nil) }
                    throw VolumeError.failure("cannot start a benchmark thread: \(String(cString: strerror(rc)))")
                }
                ids.append(tid)
            }
            for t in ids { pthread_join(t, nil) }
        }
        var total = 0.0
        for r in runners {
            if let e = r.error { throw e }
            total += Double(r.work) / max(r.elapsed, 1e-9)
        }
        return total
    }
}

/// One unit of repeatable work; `step()` returns how much it did (bytes or names).
protocol BenchmarkJob {
    mutating func step() throws -> Int
}

/// `@unchecked Sendable`: written by its one thread, read after that thread is joined.
final class Runner: @unchecked Sendable {
    let seconds: Double
    let make: @Sendable () throws -> any BenchmarkJob
    var work = 0
    var elapsed = 0.0
    var error: (any Error)?

    init(seconds: Double, make: @escaping @Sendable () throws -> any BenchmarkJob) {
        self.seconds = seconds
        self.make = make
    }

    func run() {
        do {
            var job = try make()
            _ = try job.step()  // warm up: first-use costs (thread contexts, page faults)
            let clock = ContinuousClock()
            let start = clock.now
            repeat {
                work += try job.step()
                elapsed = Benchmark.seconds(clock.now - start)
            } while elapsed < seconds
        } catch {
            self.error = error
        }
    }
}

/// A request's worth of units through `FileCrypto.crypt`, in place, as the daemon does.
struct ContentJob: BenchmarkJob {
    let crypto: FileCrypto
    let units: [Layout.Unit]
    let buffer: UnsafeMutableRawBufferPointer
    let holder: Holder
    let base: Int64
    let encrypt: Bool

    /// Frees the buffer when the job goes away.
    final class Holder {
        let buffer: UnsafeMutableRawBufferPointer
        init(_ b: UnsafeMutableRawBufferPointer) { buffer = b }
        deinit { buffer.deallocate() }
    }

    init(crypto: FileCrypto, requestBytes: Int, encrypt: Bool) throws {
        self.crypto = crypto
        self.encrypt = encrypt
        // A request in the middle of a large file: whole 4 KiB units, real tweaks.
        let offset = Int64(64 << 20)
        units = Layout.units(overlapping: offset..<offset + Int64(requestBytes), size: 1 << 30)
        buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: requestBytes, alignment: 64)
        holder = Holder(buffer)
        // Random contents, so a decryption never meets an all-zero unit (a hole it skips).
        try Random.fill(buffer)
        base = offset
    }

    mutating func step() throws -> Int {
        try crypto.crypt(units: units, buffer: buffer, base: base, encrypt: encrypt)
        return buffer.count
    }
}

/// One name through `NameCodec`: sealed and encoded, or decoded and opened.
struct NameJob: BenchmarkJob {
    let codec: NameCodec
    let directoryID: [UInt8]
    let encoded: String
    let decrypt: Bool

    init(keys: KeySet, decrypt: Bool) throws {
        codec = NameCodec(keys: keys)
        directoryID = try Random.bytes(DirHeader.idLength)
        self.decrypt = decrypt
        guard case .short(let e) = try codec.encrypt(Benchmark.sampleName, directoryID: directoryID) else {
            throw VolumeError.failure("benchmark name encodes to a long name")
        }
        encoded = e
    }

    mutating func step() throws -> Int {
        if decrypt {
            _ = try codec.decrypt(encoded, directoryID: directoryID)
        } else {
            _ = try codec.encrypt(Benchmark.sampleName, directoryID: directoryID)
        }
        return 1
    }
}

/// The tags of a request's units: one tag session per request, a tag per 4 KiB unit.
struct TagJob: BenchmarkJob {
    let crypto: FileCrypto
    let buffer: UnsafeMutableRawBufferPointer
    let holder: ContentJob.Holder
    let firstUnit: Int64 = 16384

    init(crypto: FileCrypto, requestBytes: Int) throws {
        self.crypto = crypto
        buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: requestBytes, alignment: 64)
        holder = ContentJob.Holder(buffer)
        try Random.fill(buffer)
    }

    mutating func step() throws -> Int {
        let session = try crypto.tagSession()
        let unit = Int(IntegrityLayout.blockSize)
        var tag = (UInt64(0), UInt64(0))
        try withUnsafeMutableBytes(of: &tag) { (t) throws(CryptoError) in
            for i in 0..<buffer.count / unit {
                let ct = UnsafeRawBufferPointer(rebasing: buffer[i * unit..<(i + 1) * unit])
                try FileCrypto.tag(session, unit: firstUnit + Int64(i), ciphertext: ct, into: t)
            }
        }
        return buffer.count
    }
}
