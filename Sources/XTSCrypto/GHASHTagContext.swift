import XTSSystem
import CCrypto
#if canImport(Glibc)
import Glibc
#endif

/// The unit tag of tag algorithm 2 (FORMAT.md section 12.4): a universal hash, then a
/// block cipher on its output, like AES-GCM-SIV's POLYVAL-then-AES.
///
///     S   = GCM tag under K1 with the fixed IV 0^96, the message as additional data
///           and an empty plaintext      (= GHASH_H(message) xor AES_K1(J0), H = AES_K1(0^128))
///     tag = AES-256_K2(S)
///
/// K1 and K2 are the two halves of a 64-byte key. Nothing here is a nonce: the same
/// message under the same key always gives the same tag, which is what lets a unit be
/// overwritten any number of times (GMAC alone would repeat its nonce).
///
/// Not thread-safe: one per thread (`forCurrentThread()`). The two OpenSSL contexts are
/// reused; their key schedules are not: `scrub()` frees them (OpenSSL wipes a cipher's
/// state before freeing it) and callers scrub when their request is done, as for
/// `XTSContext`.
public final class GHASHTagContext {
    private let gcm: OpaquePointer
    private let ecb: OpaquePointer
    private let gcmCipher: OpaquePointer
    private let ecbCipher: OpaquePointer
    private var keyed = false
    /// The session whose key is set (see `UnitTagSession`); nil when scrubbed.
    public var owner: ObjectIdentifier?

    public static let keyLength = 64
    /// 96 zero bits: any fixed value would do (12.1); this one is the simplest to state.
    private static let iv = [UInt8](repeating: 0, count: 12)

    public init() throws(CryptoError) {
        gcmCipher = try Fetched.require(Fetched.aes256GCM, "AES-256-GCM")
        ecbCipher = try Fetched.require(Fetched.aes256ECB, "AES-256-ECB")
        guard let g = EVP_CIPHER_CTX_new() else { throw CryptoError.openssl(failed: "EVP_CIPHER_CTX_new") }
        guard let e = EVP_CIPHER_CTX_new() else { EVP_CIPHER_CTX_free(g); throw CryptoError.openssl(failed: "EVP_CIPHER_CTX_new") }
        gcm = g
        ecb = e
    }

    deinit {
        EVP_CIPHER_CTX_free(gcm)
        EVP_CIPHER_CTX_free(ecb)
    }

    /// Keys both contexts from a 64-byte key: K1 (the GCM key) then K2 (the outer AES key).
    /// Equal halves are refused: the two keys must be independent.
    public func setKey(_ key: UnsafeRawBufferPointer) throws(CryptoError) {
        guard key.count == GHASHTagContext.keyLength, let base = key.baseAddress else { throw .invalidKeyLength }
        scrub()
        if CRYPTO_memcmp(base, base + 32, 32) == 0 { throw .invalidInput("a unit tag key's two halves are equal") }
        let k = base.assumingMemoryBound(to: UInt8.self)
        let gcmOK = GHASHTagContext.iv.withUnsafeBufferPointer { iv in
            EVP_CipherInit_ex2(gcm, gcmCipher, k, iv.baseAddress, 1, nil)
        }
        guard gcmOK == 1 else { scrub(); throw CryptoError.openssl(failed: "EVP_CipherInit_ex2(AES-256-GCM key)") }
        guard EVP_CipherInit_ex2(ecb, ecbCipher, k + 32, nil, 1, nil) == 1, EVP_CIPHER_CTX_set_padding(ecb, 0) == 1 else {
            scrub(); throw CryptoError.openssl(failed: "EVP_CipherInit_ex2(AES-256-ECB key)")
        }
        keyed = true
    }

    /// Frees both key schedules (after OpenSSL wipes them); the next `setKey` builds new ones.
    public func scrub() {
        keyed = false
        owner = nil
        _ = EVP_CIPHER_CTX_reset(gcm)
        _ = EVP_CIPHER_CTX_reset(ecb)
    }

    /// Whether a key schedule is held (for tests of the scrubbing).
    public var holdsKey: Bool { keyed }

    /// The 16-byte tag of `prefix || body` into `out` (exactly 16 bytes).
    public func tag(prefix: UnsafeRawBufferPointer, body: UnsafeRawBufferPointer?, into out: UnsafeMutableRawBufferPointer) throws(CryptoError) {
        guard keyed else { throw .invalidInput("unit tag context has no key") }
        precondition(out.count == 16)
        // Key nil: the key schedule and H stay; the IV is set again, which restarts GHASH.
        let ivOK = GHASHTagContext.iv.withUnsafeBufferPointer { iv in EVP_CipherInit_ex2(gcm, nil, nil, iv.baseAddress, 1, nil) }
        guard ivOK == 1 else { throw CryptoError.openssl(failed: "EVP_CipherInit_ex2(AES-256-GCM IV)") }
        var n: Int32 = 0
        // A NULL output makes the input additional data.
        if prefix.count > 0, EVP_CipherUpdate(gcm, nil, &n, prefix.baseAddress!.assumingMemoryBound(to: UInt8.self), Int32(prefix.count)) != 1 {
            throw CryptoError.openssl(failed: "EVP_CipherUpdate(AES-256-GCM AAD)")
        }
        if let body, body.count > 0, EVP_CipherUpdate(gcm, nil, &n, body.baseAddress!.assumingMemoryBound(to: UInt8.self), Int32(body.count)) != 1 {
            throw CryptoError.openssl(failed: "EVP_CipherUpdate(AES-256-GCM AAD)")
        }
        var s = (UInt64(0), UInt64(0))
        defer { s = (0, 0) }
        let finalOK = withUnsafeMutableBytes(of: &s) { sb -> Bool in
            let p = sb.baseAddress!.assumingMemoryBound(to: UInt8.self)
            var none: Int32 = 0
            // Empty plaintext: Final writes nothing, and computes the tag.
            guard EVP_CipherFinal_ex(gcm, p, &none) == 1, none == 0 else { return false }
            return EVP_CIPHER_CTX_ctrl(gcm, EVP_CTRL_AEAD_GET_TAG, 16, sb.baseAddress) == 1
        }
        guard finalOK else { throw CryptoError.openssl(failed: "EVP_CipherFinal_ex(AES-256-GCM tag)") }
        let ecbOK = withUnsafeBytes(of: &s) { sb -> Bool in
            var written: Int32 = 0
            let ok = EVP_CipherUpdate(ecb, out.baseAddress!.assumingMemoryBound(to: UInt8.self), &written, sb.baseAddress!.assumingMemoryBound(to: UInt8.self), 16)
            return ok == 1 && written == 16
        }
        guard ecbOK else { throw CryptoError.openssl(failed: "EVP_CipherUpdate(AES-256-ECB)") }
    }

    // MARK: One context per thread

    private static let threadSlot: pthread_key_t? = {
        var key = pthread_key_t()
        let rc = pthread_key_create(&key) { pointer in
            guard let pointer else { return }
            Unmanaged<GHASHTagContext>.fromOpaque(pointer).release()
        }
        return rc == 0 ? key : nil
    }()

    /// This thread's context, created on first use (see `XTSContext.forCurrentThread`).
    public static func forCurrentThread() throws(CryptoError) -> GHASHTagContext {
        guard let slot = threadSlot else { throw .openssl("pthread_key_create failed: no thread-local slot for tag contexts") }
        if let existing = pthread_getspecific(slot) {
            return Unmanaged<GHASHTagContext>.fromOpaque(existing).takeUnretainedValue()
        }
        let context = try GHASHTagContext()
        let retained = Unmanaged.passRetained(context)
        guard pthread_setspecific(slot, retained.toOpaque()) == 0 else {
            retained.release()
            throw .openssl("pthread_setspecific failed for the tag context")
        }
        return context
    }
}
