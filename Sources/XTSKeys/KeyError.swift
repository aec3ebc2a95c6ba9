import XTSCrypto
import XTSFormat

public enum KeyError: Error, Sendable, CustomStringConvertible {
    /// No keyslot opened with the key given.
    case wrongKey(provider: String)
    /// The volume has no slot the given provider can open.
    case noSlot(provider: String)
    /// The header MAC does not verify under the unlocked DEK: the header was altered.
    case headerTampered
    case crypto(CryptoError)
    case format(FormatError)
    case input(String)

    public var description: String {
        switch self {
        case .wrongKey(let p): return "wrong \(p): no keyslot opened with it"
        case .noSlot(let p): return "the volume has no \(p) keyslot"
        case .headerTampered: return "the volume header does not match its MAC: it was altered outside xtsfs"
        case .crypto(let e): return "crypto failure: \(e)"
        case .format(let e): return "\(e)"
        case .input(let s): return s
        }
    }
}
