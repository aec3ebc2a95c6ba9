import XTSSystem
import CCrypto

public enum SHA256 {
    /// 32-byte SHA-256 digest.
    public static func hash(_ data: UnsafeRawBufferPointer) -> [UInt8] {
        var digest = [UInt8](repeating: 0, count: 32)
        var length: UInt32 = 0
        // Digesting memory with a built-in algorithm cannot fail short of memory
        // corruption; the non-throwing signature keeps call sites simple, so a
        // failure is treated as the broken invariant it would be.
        let md = Fetched.sha256 ?? EVP_sha256()
        var none: UInt8 = 0
        let ok = withUnsafeBytes(of: &none) { empty in
            digest.withUnsafeMutableBufferPointer { out in
                // EVP_Digest wants a valid pointer even for zero bytes.
                EVP_Digest(data.baseAddress ?? empty.baseAddress!, data.count, out.baseAddress, &length, md, nil)
            }
        }
        precondition(ok == 1 && length == 32, "EVP_Digest(SHA-256) failed")
        return digest
    }

    public static func hash(_ data: [UInt8]) -> [UInt8] {
        data.withUnsafeBytes { hash($0) }
    }
}

public enum HMACSHA256 {
    /// 32-byte HMAC-SHA256 of `data` under `key`.
    public static func mac(key: SecretBytes, data: UnsafeRawBufferPointer) throws(CryptoError) -> [UInt8] {
        let hmac = try Fetched.require(Fetched.hmac, "HMAC")
        guard let ctx = EVP_MAC_CTX_new(hmac) else { throw CryptoError.openssl(failed: "EVP_MAC_CTX_new(HMAC)") }
        defer { EVP_MAC_CTX_free(ctx) }

        let params = OSSLParams()
        params.utf8String(OSSL_MAC_PARAM_DIGEST, "SHA256")
        try key.withUnsafeBytes { (k) throws(CryptoError) in
            // A key of length 0 is legal HMAC; the locked buffer's base address is
            // never nil, so OpenSSL still sees "a key" rather than "keep the old key".
            let ok = params.with { p in
                EVP_MAC_init(ctx, k.baseAddress?.assumingMemoryBound(to: UInt8.self), k.count, p)
            }
            guard ok == 1 else { throw CryptoError.openssl(failed: "EVP_MAC_init(HMAC-SHA256)") }
        }
        if data.count > 0 {
            guard EVP_MAC_update(ctx, data.baseAddress!.assumingMemoryBound(to: UInt8.self), data.count) == 1 else {
                throw CryptoError.openssl(failed: "EVP_MAC_update(HMAC-SHA256)")
            }
        }
        var mac = [UInt8](repeating: 0, count: 32)
        var length = 0
        let ok = mac.withUnsafeMutableBufferPointer { EVP_MAC_final(ctx, $0.baseAddress, &length, 32) }
        guard ok == 1, length == 32 else { throw CryptoError.openssl(failed: "EVP_MAC_final(HMAC-SHA256)") }
        return mac
    }

    public static func mac(key: SecretBytes, data: [UInt8]) throws(CryptoError) -> [UInt8] {
        try data.withBytes { (d) throws(CryptoError) in try mac(key: key, data: d) }
    }
}

/// Equality whose running time depends only on the lengths, for comparing MACs
/// and other values an attacker may try to forge byte by byte.
public func constantTimeEqual(_ a: [UInt8], _ b: [UInt8]) -> Bool {
    guard a.count == b.count else { return false }
    if a.isEmpty { return true }
    return a.withUnsafeBytes { x in
        b.withUnsafeBytes { y in CRYPTO_memcmp(x.baseAddress, y.baseAddress, x.count) == 0 }
    }
}
