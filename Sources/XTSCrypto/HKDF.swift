import XTSSystem
import CCrypto

/// HKDF-SHA256 (RFC 5869), extract-then-expand, through OpenSSL's EVP_KDF "HKDF".
public enum HKDF {
    /// `count` bytes of output keying material, in locked memory.
    public static func derive(key ikm: SecretBytes, salt: [UInt8], info: [UInt8], count: Int) throws(CryptoError) -> SecretBytes {
        guard count > 0 else { throw .invalidInput("HKDF output length must be positive, not \(count)") }
        let okm = SecretBytes(count: count)
        try ikm.withUnsafeBytes { (input) throws(CryptoError) in
            try okm.withUnsafeMutableBytes { (output) throws(CryptoError) in
                try derive(ikm: input, salt: salt, info: info, into: output)
            }
        }
        return okm
    }

    /// Fills all of `output` (at most 255 × 32 bytes, the RFC 5869 limit).
    public static func derive(ikm: UnsafeRawBufferPointer, salt: [UInt8], info: [UInt8], into output: UnsafeMutableRawBufferPointer) throws(CryptoError) {
        guard let out = output.baseAddress, output.count > 0 else {
            throw .invalidInput("HKDF output length must be positive")
        }
        guard output.count <= 255 * 32 else {
            throw .invalidInput("HKDF-SHA256 output is limited to 8160 bytes, not \(output.count)")
        }
        let kdf = try Fetched.require(Fetched.hkdf, "HKDF")
        guard let ctx = EVP_KDF_CTX_new(kdf) else { throw CryptoError.openssl(failed: "EVP_KDF_CTX_new(HKDF)") }
        defer { EVP_KDF_CTX_free(ctx) }

        // An empty IKM is legal in RFC 5869, but OpenSSL treats a NULL key pointer
        // as "no key"; give it a valid address of zero bytes.
        var none: UInt8 = 0
        try withUnsafeBytes(of: &none) { (empty) throws(CryptoError) in
            try salt.withBytes { (s) throws(CryptoError) in
                try info.withBytes { (i) throws(CryptoError) in
                    let params = OSSLParams()
                    params.utf8String(OSSL_KDF_PARAM_DIGEST, "SHA256")
                    params.octetString(OSSL_KDF_PARAM_KEY, ikm.baseAddress == nil ? UnsafeRawBufferPointer(start: empty.baseAddress, count: 0) : ikm)
                    // An absent salt and an empty salt are the same in RFC 5869 (both
                    // mean HashLen zero bytes); empty info is simply no info.
                    if s.count > 0 { params.octetString(OSSL_KDF_PARAM_SALT, s) }
                    if i.count > 0 { params.octetString(OSSL_KDF_PARAM_INFO, i) }
                    let ok = params.with { p in
                        EVP_KDF_derive(ctx, out.assumingMemoryBound(to: UInt8.self), output.count, p)
                    }
                    guard ok == 1 else { throw CryptoError.openssl(failed: "EVP_KDF_derive(HKDF-SHA256)") }
                }
            }
        }
    }
}
