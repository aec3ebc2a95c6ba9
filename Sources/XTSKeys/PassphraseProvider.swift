import XTSCrypto
import XTSFormat
#if canImport(Glibc)
import Glibc
#endif

/// Argon2id parameters of a passphrase (or command) slot: salt [32] | memory KiB u32 | iterations u32 | parallelism u32.
public struct PassphraseParameters: Sendable, Equatable {
    public static let saltLength = 32
    public var salt: [UInt8]
    public var argon2: Argon2idParameters

    public init(salt: [UInt8], argon2: Argon2idParameters) {
        self.salt = salt
        self.argon2 = argon2
    }

    public func encode() -> [UInt8] {
        var w = ByteWriter(capacity: 44)
        w.raw(salt); w.u32(argon2.memoryKiB); w.u32(argon2.iterations); w.u32(argon2.parallelism)
        return w.bytes
    }

    /// Parses and bounds the costs (`Argon2Bounds.check`): a damaged or hostile header is
    /// refused here, before any work.
    public static func decode(_ bytes: [UInt8]) throws(FormatError) -> PassphraseParameters {
        var r = ByteReader(bytes)
        let salt = try r.raw(saltLength, "passphrase salt")
        let m = try r.u32("argon2 memory")
        let t = try r.u32("argon2 iterations")
        let p = try r.u32("argon2 parallelism")
        guard r.remaining == 0 else { throw .invalid("passphrase parameters length") }
        let params = Argon2idParameters(memoryKiB: m, iterations: t, parallelism: p)
        try Argon2Bounds.check(params)
        return PassphraseParameters(salt: salt, argon2: params)
    }
}

/// The work a header may ask of Argon2id. v1 accepted 4 GiB × 1,000,000 iterations × 16
/// lanes (an estimated 53 days at 4.2 GB RSS); these bounds keep an unlock within a small
/// multiple of what `init` chooses by default.
public enum Argon2Bounds {
    /// 4 GiB: the most any slot may ask for, on any machine.
    public static let maxMemoryKiB: UInt32 = 4 * 1024 * 1024
    public static let maxIterations: UInt32 = 1_000_000
    /// Memory × iterations of the init default (1 GiB × 4).
    public static let defaultWork = UInt64(PassphraseProvider.defaultCosts.memoryKiB) * UInt64(PassphraseProvider.defaultCosts.iterations)
    /// At most 8× the default: about 8 s where the default takes one.
    public static let maxWork = 8 * defaultWork
    /// Below this memory `init` warns (a cheap slot is a cheap guess for an attacker);
    /// tests still make cheap volumes.
    public static let recommendedMinimumKiB: UInt32 = 64 * 1024

    /// Machine-independent bounds, checked when a slot is parsed.
    public static func check(_ a: Argon2idParameters) throws(FormatError) {
        let (m, t, p) = (a.memoryKiB, a.iterations, a.parallelism)
        guard (1...16).contains(p), m >= 8 * p, m <= maxMemoryKiB, (1...maxIterations).contains(t) else {
            throw .invalid("Argon2id parameters out of range (m=\(m) KiB t=\(t) p=\(p))")
        }
        guard UInt64(m) * UInt64(t) <= maxWork else {
            throw .invalid("Argon2id parameters ask for too much work (m=\(m) KiB × t=\(t) exceeds \(maxWork) KiB·iterations, 8× the default)")
        }
    }

    /// Memory above half of this machine's RAM is refused (as cryptsetup does): the unlock
    /// would swap or be killed.
    public static func checkMachine(_ a: Argon2idParameters) throws(KeyError) {
        let limit = physicalMemoryKiB() / 2
        if limit > 0 && UInt64(a.memoryKiB) > limit {
            throw .format(.invalid("Argon2id memory \(a.memoryKiB) KiB is more than half of this machine's RAM (\(limit * 2) KiB)"))
        }
    }

    public static func physicalMemoryKiB() -> UInt64 {
        let pages = sysconf(Int32(_SC_PHYS_PAGES)), size = sysconf(Int32(_SC_PAGESIZE))
        guard pages > 0, size > 0 else { return 0 }
        return UInt64(pages) * UInt64(size) / 1024
    }
}

/// Passphrase → Argon2id → 32-byte KEK.
public struct PassphraseProvider: LocalKEKProvider {
    public var type: ProviderType { kind }
    /// `.command` reuses this derivation: a program's output is treated like a passphrase.
    let kind: ProviderType
    public let passphrase: SecretBytes
    /// Costs for new slots; existing slots use their stored ones.
    public let costs: Argon2idParameters

    public init(passphrase: SecretBytes, costs: Argon2idParameters = PassphraseProvider.defaultCosts) {
        self.init(passphrase: passphrase, costs: costs, kind: .passphrase)
    }

    init(passphrase: SecretBytes, costs: Argon2idParameters, kind: ProviderType) {
        self.passphrase = passphrase
        self.costs = costs
        self.kind = kind
    }

    /// 1 GiB, 4 lanes; iterations are calibrated at init time for about one second.
    public static let defaultCosts = Argon2idParameters(memoryKiB: 1024 * 1024, iterations: 4, parallelism: 4)

    public func kek(parameters: [UInt8]) throws(KeyError) -> SecretBytes {
        let params: PassphraseParameters
        do { params = try PassphraseParameters.decode(parameters) } catch { throw .format(error) }
        try Argon2Bounds.checkMachine(params.argon2)
        do {
            return try Argon2id.derive(password: passphrase, salt: params.salt, parameters: params.argon2, count: 32)
        } catch {
            throw .crypto(error)
        }
    }

    public func newParameters() throws(KeyError) -> [UInt8] {
        do { try Argon2Bounds.check(costs) } catch { throw .format(error) }
        let salt: [UInt8]
        do { salt = try Random.bytes(PassphraseParameters.saltLength) } catch { throw .crypto(error) }
        return PassphraseParameters(salt: salt, argon2: costs).encode()
    }
}
