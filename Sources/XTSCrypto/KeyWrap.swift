import XTSSystem
import CCrypto

/// AES key wrap with padding (RFC 5649): wraps keys of any length from 1 byte,
/// with an integrity check so a wrong KEK or a damaged blob is detected on unwrap.
///
/// The KEK is normally 32 bytes (AES-256); 16- and 24-byte KEKs are accepted so the
/// RFC's own vectors (which use AES-192) can be checked.
public enum KeyWrap {
    private static func cipher(forKEK count: Int) throws(CryptoError) -> OpaquePointer {
        switch count {
        case 16: return try Fetched.require(Fetched.aes128WrapPad, "id-aes128-wrap-pad")
        case 24: return try Fetched.require(Fetched.aes192WrapPad, "id-aes192-wrap-pad")
        case 32: return try Fetched.require(Fetched.aes256WrapPad, "id-aes256-wrap-pad")
        default: throw .invalidKeyLength
        }
    }

    /// Runs the wrap cipher once over `input` into `output`; returns the bytes written,
    /// or nil when the cipher rejected the data (on unwrap: the integrity check failed).
    private static func run(kek: SecretBytes, encrypt: Bool, input: UnsafeRawBufferPointer, output: UnsafeMutableRawBufferPointer) throws(CryptoError) -> Int? {
        let cipher = try cipher(forKEK: kek.count)
        guard let ctx = EVP_CIPHER_CTX_new() else { throw CryptoError.openssl(failed: "EVP_CIPHER_CTX_new") }
        defer { EVP_CIPHER_CTX_free(ctx) }
        // Wrap modes are refused through the EVP interface unless explicitly allowed:
        // their one-shot semantics differ from ordinary streaming ciphers.
        EVP_CIPHER_CTX_set_flags(ctx, Int32(EVP_CIPHER_CTX_FLAG_WRAP_ALLOW))
        let initOK = kek.withUnsafeBytes { k in
            EVP_CipherInit_ex2(ctx, cipher, k.baseAddress?.assumingMemoryBound(to: UInt8.self), nil, encrypt ? 1 : 0, nil)
        }
        guard initOK == 1 else { throw CryptoError.openssl(failed: "EVP_CipherInit_ex2(AES key wrap)") }

        var written: Int32 = 0
        let updateOK = EVP_CipherUpdate(ctx, output.baseAddress?.assumingMemoryBound(to: UInt8.self), &written,
                                        input.baseAddress?.assumingMemoryBound(to: UInt8.self), Int32(input.count))
        guard updateOK == 1, written > 0 else {
            if encrypt { throw CryptoError.openssl(failed: "EVP_CipherUpdate(AES key wrap)") }
            CryptoError.discardOpenSSLErrors()
            return nil
        }
        var tail: Int32 = 0
        let finalOK = EVP_CipherFinal_ex(ctx, output.baseAddress!.assumingMemoryBound(to: UInt8.self).advanced(by: Int(written)), &tail)
        guard finalOK == 1 else {
            if encrypt { throw CryptoError.openssl(failed: "EVP_CipherFinal_ex(AES key wrap)") }
            CryptoError.discardOpenSSLErrors()
            return nil
        }
        return Int(written) + Int(tail)
    }

    /// The wrapped key: 8 bytes longer than the key rounded up to a multiple of 8.
    public static func wrap(_ key: SecretBytes, kek: SecretBytes) throws(CryptoError) -> [UInt8] {
        _ = try cipher(forKEK: kek.count)
        guard key.count > 0 else { throw .invalidInput("cannot wrap an empty key") }
        guard key.count <= 1 << 24 else { throw .invalidInput("key to wrap is too long (\(key.count) bytes)") }
        // EVP_CipherUpdate is not told the output size, so the buffer must hold the
        // whole result: the key padded to a multiple of 8 plus the 8-byte integrity
        // block (and a spare block, in case OpenSSL writes by whole blocks).
        var wrapped = [UInt8](repeating: 0, count: (key.count + 7) / 8 * 8 + 16)
        let length = try key.withUnsafeBytes { (k) throws(CryptoError) -> Int in
            try wrapped.withMutableBytes { (out) throws(CryptoError) -> Int in
                guard let n = try run(kek: kek, encrypt: true, input: k, output: out) else {
                    throw CryptoError.openssl(failed: "AES key wrap")
                }
                return n
            }
        }
        guard length == (key.count + 7) / 8 * 8 + 8 else {
            throw .openssl("AES key wrap: unexpected output length \(length)")
        }
        wrapped.removeSubrange(length...)
        return wrapped
    }

    /// The key inside `wrapped`, in locked memory. A wrong KEK or damaged data gives
    /// `.authenticationFailed`; a length that no wrap can have gives `.invalidInput`.
    public static func unwrap(_ wrapped: [UInt8], kek: SecretBytes) throws(CryptoError) -> SecretBytes {
        _ = try cipher(forKEK: kek.count)
        guard wrapped.count >= 16, wrapped.count % 8 == 0 else {
            throw .invalidInput("a wrapped key is a multiple of 8 bytes, at least 16; got \(wrapped.count)")
        }
        guard wrapped.count <= (1 << 24) + 16 else { throw .invalidInput("wrapped key is too long (\(wrapped.count) bytes)") }
        // The unwrapped key (with padding) is written to locked memory only, and the
        // scratch buffer is wiped when it goes away.
        let scratch = SecretBytes(count: wrapped.count + 16)
        let length = try wrapped.withBytes { (w) throws(CryptoError) -> Int? in
            try scratch.withUnsafeMutableBytes { (out) throws(CryptoError) -> Int? in
                try run(kek: kek, encrypt: false, input: w, output: out)
            }
        }
        guard let length, length > 0, length <= wrapped.count - 8 else { throw .authenticationFailed }
        return scratch.slice(0..<length)
    }
}
