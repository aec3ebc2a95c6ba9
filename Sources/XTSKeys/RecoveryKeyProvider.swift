import XTSCrypto
import XTSFormat

/// A recovery key: 160 random bits printed once by `init --recovery-key` as 32 characters
/// of Crockford's base32 in eight groups of four (easy to read aloud and type back;
/// I/L read as 1 and O as 0, case and separators ignored). High entropy, so the KEK is
/// HKDF-SHA256 of the 32 normalized characters with the slot's salt. Parameters: salt [32].
public struct RecoveryKeyProvider: LocalKEKProvider {
    public static let characters = 32
    static let alphabet = Array("0123456789ABCDEFGHJKMNPQRSTVWXYZ".utf8)
    static let label = Array("xtsfs v1 recovery kek".utf8)

    public var type: ProviderType { .recoveryKey }
    /// The 32 normalized characters.
    let key: SecretBytes

    /// From what the user typed (any case, with or without separators).
    public init(typed: SecretBytes) throws(KeyError) {
        let out = SecretBytes(count: RecoveryKeyProvider.characters)
        let n: Int? = typed.withUnsafeBytes { src in
            out.withUnsafeMutableBytes { dst in
                var n = 0
                for var c in src {
                    if c == UInt8(ascii: "-") || c == UInt8(ascii: " ") || c == UInt8(ascii: "\t") { continue }
                    if c >= UInt8(ascii: "a") && c <= UInt8(ascii: "z") { c -= 32 }
                    if c == UInt8(ascii: "I") || c == UInt8(ascii: "L") { c = UInt8(ascii: "1") }
                    if c == UInt8(ascii: "O") { c = UInt8(ascii: "0") }
                    guard RecoveryKeyProvider.alphabet.contains(c), n < dst.count else { return nil }
                    dst[n] = c
                    n += 1
                }
                return n
            }
        }
        guard n == RecoveryKeyProvider.characters else {
            throw .input("not a recovery key: expected 32 characters (eight groups of four, 0-9 and A-Z without I, L, O, U)")
        }
        key = out
    }

    /// A new random recovery key and its printable, grouped form (locked memory both).
    public static func generate() throws(KeyError) -> (provider: RecoveryKeyProvider, grouped: SecretBytes) {
        let random: SecretBytes
        do { random = try SecretBytes.random(count: characters) } catch { throw .crypto(error) }
        let grouped = SecretBytes(count: characters + characters / 4 - 1)
        // One character per random byte, 5 of its 8 bits: 32 × 5 = 160 bits.
        random.withUnsafeBytes { r in
            grouped.withUnsafeMutableBytes { g in
                var j = 0
                for i in 0..<characters {
                    if i > 0 && i % 4 == 0 { g[j] = UInt8(ascii: "-"); j += 1 }
                    g[j] = alphabet[Int(r[i] & 31)]
                    j += 1
                }
            }
        }
        return (try RecoveryKeyProvider(typed: grouped), grouped)
    }

    public func kek(parameters: [UInt8]) throws(KeyError) -> SecretBytes {
        let salt = try SaltParameters.decode(parameters, "recovery key")
        do { return try HKDF.derive(key: key, salt: salt, info: RecoveryKeyProvider.label, count: 32) } catch { throw .crypto(error) }
    }

    public func newParameters() throws(KeyError) -> [UInt8] { try SaltParameters.random() }
}
