import XTSCrypto
import XTSFormat

/// A source of the key that protects one keyslot. One implementation per provider type,
/// one file each. The interface fits hardware: a token or a key server never hands out
/// its key, it wraps and unwraps for us; a passphrase or key file does the same with a
/// KEK derived locally (`LocalKEKProvider`).
public protocol KeyProvider {
    var type: ProviderType { get }
    /// Whether this provider may own `slot`, decided without any secret work (type, and
    /// for a token or server the key it names). Keeps one provider's expensive KDF from
    /// running for another's slot.
    func canOpen(_ slot: Keyslot) -> Bool
    /// The DEK in `slot`. Throws `.wrongKey` only when this key definitely does not open
    /// the slot; `.unavailable` when the provider itself failed (token missing, server
    /// down, command failed); `.format` when the slot's parameters are invalid.
    func unwrapDEK(from slot: Keyslot, volumeID: [UInt8]) throws(KeyError) -> SecretBytes
    /// Wraps `dek` for a new slot of this provider.
    func wrapDEK(_ dek: SecretBytes, volumeID: [UInt8]) throws(KeyError) -> WrappedKey
    /// Lets go of whatever the provider holds open (a token session, logged in), once the
    /// DEK is unwrapped: a mount serving in the foreground must not keep a token open.
    func release()
}

extension KeyProvider {
    public func release() {}
}

/// What a provider stores in a new slot.
public struct WrappedKey: Sendable {
    public var parameters: [UInt8]
    public var wrap: WrapAlgorithm
    public var wrappedKey: [UInt8]

    public init(parameters: [UInt8], wrap: WrapAlgorithm, wrappedKey: [UInt8]) {
        self.parameters = parameters
        self.wrap = wrap
        self.wrappedKey = wrappedKey
    }
}

/// A provider whose KEK is derived here from a secret it holds (passphrase, key file,
/// command output, recovery key); the DEK is wrapped with RFC 5649 under that KEK.
public protocol LocalKEKProvider: KeyProvider {
    /// The KEK for existing slot parameters. Must validate the parameters (and refuse
    /// absurd costs) before doing any work.
    func kek(parameters: [UInt8]) throws(KeyError) -> SecretBytes
    /// Fresh parameters for a new slot (a new salt, the configured costs).
    func newParameters() throws(KeyError) -> [UInt8]
}

extension LocalKEKProvider {
    public func canOpen(_ slot: Keyslot) -> Bool { slot.provider == type && slot.wrap == .aes256KWP }

    public func unwrapDEK(from slot: Keyslot, volumeID: [UInt8]) throws(KeyError) -> SecretBytes {
        let kek = try kek(parameters: slot.parameters)
        do { return try KeyWrap.unwrap(slot.wrappedKey, kek: kek) } catch {
            if error == .authenticationFailed { throw .wrongKey(provider: type.description) }
            throw .crypto(error)
        }
    }

    public func wrapDEK(_ dek: SecretBytes, volumeID: [UInt8]) throws(KeyError) -> WrappedKey {
        let params = try newParameters()
        let kek = try kek(parameters: params)
        do { return WrappedKey(parameters: params, wrap: .aes256KWP, wrappedKey: try KeyWrap.wrap(dek, kek: kek)) }
        catch { throw .crypto(error) }
    }
}

/// A 32-byte salt, the only parameter of the high-entropy local providers.
enum SaltParameters {
    static let length = 32

    static func decode(_ bytes: [UInt8], _ what: String) throws(KeyError) -> [UInt8] {
        guard bytes.count == length else { throw .format(.invalid("\(what) parameters: \(bytes.count) bytes, expected \(length)")) }
        return bytes
    }

    static func random() throws(KeyError) -> [UInt8] {
        do { return try Random.bytes(length) } catch { throw .crypto(error) }
    }
}

/// What `status` and `keys list` show of a slot, supplied by each provider type (as
/// LUKS2 gives each keyslot handler its own dump): provider knowledge stays here.
public enum SlotDescription {
    public static func describe(_ slot: Keyslot) -> [String: String] {
        switch slot.provider {
        case .passphrase?, .command?:
            guard let p = try? PassphraseParameters.decode(slot.parameters) else { return ["parameters": "invalid"] }
            return ["kdf": "argon2id", "memoryKiB": "\(p.argon2.memoryKiB)", "iterations": "\(p.argon2.iterations)",
                    "parallelism": "\(p.argon2.parallelism)"]
        case .keyfile?: return ["kdf": "hkdf-sha256"]
        case .recoveryKey?: return ["kdf": "hkdf-sha256"]
        case .pkcs11?: return PKCS11Parameters.describe(slot.parameters)
        case .kmip?: return KMIPParameters.describe(slot.parameters)
        case nil: return [:]
        }
    }
}
