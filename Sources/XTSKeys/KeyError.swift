import XTSCrypto
import XTSFormat

public enum KeyError: Error, Sendable, CustomStringConvertible {
    /// No keyslot opened with the key given.
    case wrongKey(provider: String)
    /// A secret the provider needs was refused (a wrong PIN): a wrong key, said precisely.
    case refused(String)
    /// The volume has no slot the given provider can open.
    case noSlot(provider: String)
    /// The header MAC does not verify under the unlocked DEK: the header was altered.
    case headerTampered
    /// The provider itself failed: token missing, server unreachable, command failed,
    /// key file unreadable, key revoked.
    case unavailable(String)
    case crypto(CryptoError)
    case format(FormatError)
    case input(String)

    public var description: String {
        switch self {
        case .wrongKey(let p): return "wrong \(p): no keyslot opened with it"
        case .refused(let s): return s
        case .noSlot(let p): return "the volume has no \(p) keyslot"
        case .headerTampered: return "the volume header does not match its MAC: it was altered outside xtsfs"
        case .unavailable(let s): return s
        case .crypto(let e): return "crypto failure: \(e)"
        case .format(let e): return "\(e)"
        case .input(let s): return s
        }
    }
}
