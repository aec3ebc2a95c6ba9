import XTSSystem
import CCrypto

/// Every failure of the crypto layer. OpenSSL failures carry the operation and
/// OpenSSL's own error strings, so a log line says which call failed and why.
public enum CryptoError: Error, Equatable, CustomStringConvertible {
    /// An OpenSSL call failed: "operation: OpenSSL error queue".
    case openssl(String)
    case invalidKeyLength
    /// Integrity check failed: wrong key, or the data was damaged or tampered with.
    case authenticationFailed
    case argon2(String)
    case randomFailed
    case invalidInput(String)

    public var description: String {
        switch self {
        case .openssl(let what): return "OpenSSL error: \(what)"
        case .invalidKeyLength: return "invalid key length"
        case .authenticationFailed: return "authentication failed (wrong key or damaged data)"
        case .argon2(let what): return "Argon2 error: \(what)"
        case .randomFailed: return "the random number generator failed"
        case .invalidInput(let what): return "invalid input: \(what)"
        }
    }

    /// Builds `.openssl` from the failed operation and OpenSSL's per-thread error
    /// queue, and empties the queue so a later failure does not report stale errors.
    static func openssl(failed operation: String) -> CryptoError {
        var reasons: [String] = []
        while true {
            let code = ERR_get_error()
            if code == 0 { break }
            var text = [CChar](repeating: 0, count: 256)
            let message = text.withUnsafeMutableBufferPointer { buffer -> String in
                ERR_error_string_n(code, buffer.baseAddress, buffer.count)
                return String(cString: buffer.baseAddress!)
            }
            reasons.append(message)
        }
        if reasons.isEmpty { return .openssl(operation) }
        return .openssl("\(operation): \(reasons.joined(separator: "; "))")
    }

    /// For failures that are answered with `.authenticationFailed`: the queue's
    /// contents say nothing useful to the caller, but must not leak into later errors.
    static func discardOpenSSLErrors() {
        ERR_clear_error()
    }
}
