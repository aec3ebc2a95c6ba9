import XTSSystem
import CCrypto

/// HMAC-SHA256 under one key, for many short messages: the key is set once and each
/// message only re-initialises the context (OpenSSL keeps the keyed state), which is
/// what makes a tag per 4 KiB unit affordable. One session per thread at a time.
public final class HMACSession {
    private let ctx: OpaquePointer

    public init(key: SecretBytes) throws(CryptoError) {
        let hmac = try Fetched.require(Fetched.hmac, "HMAC")
        guard let c = EVP_MAC_CTX_new(hmac) else { throw CryptoError.openssl(failed: "EVP_MAC_CTX_new(HMAC)") }
        ctx = c
        let params = OSSLParams()
        params.utf8String(OSSL_MAC_PARAM_DIGEST, "SHA256")
        let ok = key.withUnsafeBytes { k in
            params.with { p in EVP_MAC_init(c, k.baseAddress?.assumingMemoryBound(to: UInt8.self), k.count, p) }
        }
        guard ok == 1 else { EVP_MAC_CTX_free(c); throw CryptoError.openssl(failed: "EVP_MAC_init(HMAC-SHA256)") }
    }

    deinit { EVP_MAC_CTX_free(ctx) }

    /// HMAC-SHA256 of `prefix || body`, its first `out.count` (at most 32) bytes into `out`.
    public func mac(prefix: UnsafeRawBufferPointer, body: UnsafeRawBufferPointer?, into out: UnsafeMutableRawBufferPointer) throws(CryptoError) {
        precondition(out.count <= 32)
        // A NULL key re-initialises with the key already set.
        guard EVP_MAC_init(ctx, nil, 0, nil) == 1 else { throw CryptoError.openssl(failed: "EVP_MAC_init(HMAC-SHA256)") }
        if prefix.count > 0, EVP_MAC_update(ctx, prefix.baseAddress!.assumingMemoryBound(to: UInt8.self), prefix.count) != 1 {
            throw CryptoError.openssl(failed: "EVP_MAC_update(HMAC-SHA256)")
        }
        if let body, body.count > 0, EVP_MAC_update(ctx, body.baseAddress!.assumingMemoryBound(to: UInt8.self), body.count) != 1 {
            throw CryptoError.openssl(failed: "EVP_MAC_update(HMAC-SHA256)")
        }
        var full = (UInt64(0), UInt64(0), UInt64(0), UInt64(0))
        var length = 0
        let ok = withUnsafeMutableBytes(of: &full) { f in
            EVP_MAC_final(ctx, f.baseAddress!.assumingMemoryBound(to: UInt8.self), &length, 32)
        }
        guard ok == 1, length == 32 else { throw CryptoError.openssl(failed: "EVP_MAC_final(HMAC-SHA256)") }
        withUnsafeBytes(of: &full) { out.copyMemory(from: UnsafeRawBufferPointer(rebasing: $0[0..<out.count])) }
        full = (0, 0, 0, 0)
    }
}
