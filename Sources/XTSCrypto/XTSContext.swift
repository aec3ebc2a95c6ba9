import XTSSystem
import CCrypto
#if canImport(Glibc)
import Glibc
#endif

/// AES-XTS-256 (IEEE 1619): a 64-byte key made of the data key followed by the
/// tweak key, each an AES-256 key.
///
/// The tweak of a data unit is its 64-bit unit number, little-endian, in the first
/// 8 bytes of the 16-byte IV, the rest zero (IEEE 1619's data unit sequence number).
/// A data unit is 16 bytes to 16 MiB long; lengths that are not a multiple of 16
/// use ciphertext stealing.
///
/// Not thread-safe: the OpenSSL context holds per-operation state. Use one per
/// thread (`forCurrentThread()` keeps one for each FUSE worker).
///
/// Speed: the key schedule is set once per `setKey`, and each data unit only resets
/// the IV on the already-keyed context, which is the cheapest way through EVP.
public final class XTSContext {
    /// IEEE 1619-2007 caps a data unit at 2^20 blocks.
    public static let maxUnitLength = 16 << 20
    public static let minUnitLength = 16

    private let ctx: OpaquePointer
    private let cipher: OpaquePointer
    private var keyed = false

    public init() throws(CryptoError) {
        cipher = try Fetched.require(Fetched.aes256XTS, "AES-256-XTS")
        guard let c = EVP_CIPHER_CTX_new() else { throw CryptoError.openssl(failed: "EVP_CIPHER_CTX_new") }
        ctx = c
    }

    deinit {
        // Frees the key schedules after wiping them.
        EVP_CIPHER_CTX_free(ctx)
    }

    /// Keys the context for encryption or decryption. Equal key halves are refused
    /// in both directions: they reduce XTS to a much weaker mode (IEEE 1619-2018
    /// requires the check, and OpenSSL 3.0 enforces it only for encryption).
    public func setKey(_ key: UnsafeRawBufferPointer, encrypt: Bool) throws(CryptoError) {
        guard key.count == 64, let base = key.baseAddress else { throw .invalidKeyLength }
        keyed = false
        if CRYPTO_memcmp(base, base + 32, 32) == 0 {
            throw .openssl("EVP_CipherInit_ex2(AES-256-XTS): xts duplicated keys (the two key halves are equal)")
        }
        guard EVP_CipherInit_ex2(ctx, cipher, base.assumingMemoryBound(to: UInt8.self), nil, encrypt ? 1 : 0, nil) == 1 else {
            throw CryptoError.openssl(failed: "EVP_CipherInit_ex2(AES-256-XTS key)")
        }
        keyed = true
    }

    /// Forgets the key: OpenSSL frees the cipher's state (its key schedules) after wiping
    /// it. The context lives in ordinary heap, which is neither locked nor excluded from
    /// a core dump, so a key schedule must not outlive the request that set it: callers
    /// scrub when they are done (`FileCrypto` does after every request), and the next
    /// `setKey` builds a fresh state.
    public func scrub() {
        keyed = false
        _ = EVP_CIPHER_CTX_reset(ctx)
    }

    /// Whether a key schedule is held (for tests of the scrubbing).
    public var holdsKey: Bool { keyed }

    /// Encrypts or decrypts (as keyed) one data unit. `input` and `output` may be the
    /// same buffer, but must not otherwise overlap.
    public func crypt(unit: UInt64, input: UnsafeRawPointer, output: UnsafeMutableRawPointer, count: Int) throws(CryptoError) {
        var iv: (UInt64, UInt64) = (unit.littleEndian, 0)
        try withUnsafeBytes(of: &iv) { (tweak) throws(CryptoError) in
            try run(iv: tweak.baseAddress!, input: input, output: output, count: count)
        }
    }

    /// Like `crypt(unit:...)` with a raw 16-byte tweak, for test vectors whose tweak
    /// is not a small little-endian number.
    public func crypt(tweak: [UInt8], input: UnsafeRawPointer, output: UnsafeMutableRawPointer, count: Int) throws(CryptoError) {
        guard tweak.count == 16 else { throw .invalidInput("an XTS tweak is 16 bytes, not \(tweak.count)") }
        try tweak.withBytes { (t) throws(CryptoError) in
            try run(iv: t.baseAddress!, input: input, output: output, count: count)
        }
    }

    private func run(iv: UnsafeRawPointer, input: UnsafeRawPointer, output: UnsafeMutableRawPointer, count: Int) throws(CryptoError) {
        guard keyed else { throw .invalidInput("XTS context has no key") }
        guard count >= XTSContext.minUnitLength, count <= XTSContext.maxUnitLength else {
            throw .invalidInput("an XTS data unit is 16 bytes to 16 MiB, not \(count)")
        }
        // cipher and key nil, direction -1: keep the key schedule and direction,
        // replace only the tweak.
        guard EVP_CipherInit_ex2(ctx, nil, nil, iv.assumingMemoryBound(to: UInt8.self), -1, nil) == 1 else {
            throw CryptoError.openssl(failed: "EVP_CipherInit_ex2(AES-256-XTS tweak)")
        }
        let out = output.assumingMemoryBound(to: UInt8.self)
        var written: Int32 = 0
        guard EVP_CipherUpdate(ctx, out, &written, input.assumingMemoryBound(to: UInt8.self), Int32(count)) == 1,
              Int(written) == count else {
            throw CryptoError.openssl(failed: "EVP_CipherUpdate(AES-256-XTS, \(count) bytes)")
        }
        // XTS processes a data unit in one update; Final only closes the operation.
        var tail: Int32 = 0
        guard EVP_CipherFinal_ex(ctx, out + count, &tail) == 1, tail == 0 else {
            throw CryptoError.openssl(failed: "EVP_CipherFinal_ex(AES-256-XTS)")
        }
    }

    // MARK: One context per thread

    /// Thread-local slot whose destructor releases the thread's context when the
    /// thread exits, which frees (and wipes) its OpenSSL context.
    private static let threadSlot: pthread_key_t? = {
        var key = pthread_key_t()
        let rc = pthread_key_create(&key) { pointer in
            guard let pointer else { return }
            Unmanaged<XTSContext>.fromOpaque(pointer).release()
        }
        return rc == 0 ? key : nil
    }()

    /// This thread's context, created on first use. Callers set the key they need before
    /// crypting and `scrub()` it when done: the context itself is reused, its key is not.
    public static func forCurrentThread() throws(CryptoError) -> XTSContext {
        guard let slot = threadSlot else { throw .openssl("pthread_key_create failed: no thread-local slot for XTS contexts") }
        if let existing = pthread_getspecific(slot) {
            return Unmanaged<XTSContext>.fromOpaque(existing).takeUnretainedValue()
        }
        let context = try XTSContext()
        let retained = Unmanaged.passRetained(context)
        guard pthread_setspecific(slot, retained.toOpaque()) == 0 else {
            retained.release()
            throw .openssl("pthread_setspecific failed for the XTS context")
        }
        return context
    }
}
