import XTSCrypto
import XTSFormat

/// A source of key-encryption keys. One implementation per provider type; each keyslot
/// names its provider and carries that provider's parameters.
public protocol KeyProvider {
    var type: ProviderType { get }
    /// The KEK for an existing slot of this provider's type.
    func unwrapKey(for slot: Keyslot) throws(KeyError) -> SecretBytes
    /// A new KEK and the parameters to store in the new slot.
    func newKey() throws(KeyError) -> (kek: SecretBytes, parameters: [UInt8])
}

/// Argon2id parameters of a passphrase slot: salt [32] | memory KiB u32 | iterations u32 | parallelism u32.
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

    public static func decode(_ bytes: [UInt8]) throws(FormatError) -> PassphraseParameters {
        var r = ByteReader(bytes)
        let salt = try r.raw(saltLength, "passphrase salt")
        let m = try r.u32("argon2 memory")
        let t = try r.u32("argon2 iterations")
        let p = try r.u32("argon2 parallelism")
        guard r.remaining == 0 else { throw .invalid("passphrase parameters length") }
        // Bounds that keep a damaged or hostile header from asking for absurd work.
        guard (1...16).contains(p), m >= 8 * p, m <= 4 * 1024 * 1024, (1...1_000_000).contains(t) else {
            throw .invalid("Argon2id parameters (m=\(m) t=\(t) p=\(p))")
        }
        return PassphraseParameters(salt: salt, argon2: Argon2idParameters(memoryKiB: m, iterations: t, parallelism: p))
    }
}

/// Passphrase → Argon2id → 32-byte KEK.
public struct PassphraseProvider: KeyProvider {
    public var type: ProviderType { .passphrase }
    public let passphrase: SecretBytes
    /// Costs for new slots (`newKey`); existing slots use their stored ones.
    public let costs: Argon2idParameters

    public init(passphrase: SecretBytes, costs: Argon2idParameters = PassphraseProvider.defaultCosts) {
        self.passphrase = passphrase
        self.costs = costs
    }

    /// 1 GiB, 4 lanes; iterations are calibrated at init time for about one second.
    public static let defaultCosts = Argon2idParameters(memoryKiB: 1024 * 1024, iterations: 4, parallelism: 4)

    public func unwrapKey(for slot: Keyslot) throws(KeyError) -> SecretBytes {
        let params: PassphraseParameters
        do { params = try PassphraseParameters.decode(slot.parameters) } catch { throw .format(error) }
        return try derive(params)
    }

    public func newKey() throws(KeyError) -> (kek: SecretBytes, parameters: [UInt8]) {
        let salt: [UInt8]
        do { salt = try Random.bytes(PassphraseParameters.saltLength) } catch { throw .crypto(error) }
        let params = PassphraseParameters(salt: salt, argon2: costs)
        return (try derive(params), params.encode())
    }

    private func derive(_ params: PassphraseParameters) throws(KeyError) -> SecretBytes {
        do {
            return try Argon2id.derive(password: passphrase, salt: params.salt, parameters: params.argon2, count: 32)
        } catch {
            throw .crypto(error)
        }
    }
}
