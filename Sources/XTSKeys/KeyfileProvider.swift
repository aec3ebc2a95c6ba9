import XTSCrypto
import XTSFormat

/// A key file: at least 32 random bytes (`xtsfs keys generate` writes one). It is high
/// entropy, so the KEK is HKDF-SHA256 of the whole file with the slot's salt, no
/// password hashing. Parameters: salt [32].
public struct KeyfileProvider: LocalKEKProvider {
    public static let minimumLength = 32
    public static let maximumLength = 64 * 1024
    static let label = Array("xtsfs v1 keyfile kek".utf8)

    public var type: ProviderType { .keyfile }
    let contents: SecretBytes

    public init(contents: SecretBytes) throws(KeyError) {
        guard contents.count >= KeyfileProvider.minimumLength else {
            throw .input("the key file has \(contents.count) bytes; a key file needs at least \(KeyfileProvider.minimumLength) random bytes (make one with: xtsfs keys generate FILE)")
        }
        self.contents = contents
    }

    public func kek(parameters: [UInt8]) throws(KeyError) -> SecretBytes {
        let salt = try SaltParameters.decode(parameters, "keyfile")
        do { return try HKDF.derive(key: contents, salt: salt, info: KeyfileProvider.label, count: 32) } catch { throw .crypto(error) }
    }

    public func newParameters() throws(KeyError) -> [UInt8] { try SaltParameters.random() }
}
