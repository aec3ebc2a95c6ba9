import XTSSystem
import CCrypto

/// Algorithms fetched once per process. An explicit fetch avoids the implicit
/// (locked, hashed) lookup that OpenSSL 3 does on every init with the legacy
/// `EVP_aes_256_xts()`-style getters; fetched algorithm objects are immutable and
/// may be shared by all threads. Never freed: they live as long as the process.
enum Fetched {
    nonisolated(unsafe) static let sha256: OpaquePointer? = EVP_MD_fetch(nil, "SHA256", nil)
    nonisolated(unsafe) static let hmac: OpaquePointer? = EVP_MAC_fetch(nil, "HMAC", nil)
    nonisolated(unsafe) static let cmac: OpaquePointer? = EVP_MAC_fetch(nil, "CMAC", nil)
    nonisolated(unsafe) static let hkdf: OpaquePointer? = EVP_KDF_fetch(nil, "HKDF", nil)
    nonisolated(unsafe) static let aes256XTS: OpaquePointer? = EVP_CIPHER_fetch(nil, "AES-256-XTS", nil)
    nonisolated(unsafe) static let aes256GCM: OpaquePointer? = EVP_CIPHER_fetch(nil, "AES-256-GCM", nil)
    nonisolated(unsafe) static let aes256ECB: OpaquePointer? = EVP_CIPHER_fetch(nil, "AES-256-ECB", nil)
    nonisolated(unsafe) static let aes128WrapPad: OpaquePointer? = EVP_CIPHER_fetch(nil, "id-aes128-wrap-pad", nil)
    nonisolated(unsafe) static let aes192WrapPad: OpaquePointer? = EVP_CIPHER_fetch(nil, "id-aes192-wrap-pad", nil)
    nonisolated(unsafe) static let aes256WrapPad: OpaquePointer? = EVP_CIPHER_fetch(nil, "id-aes256-wrap-pad", nil)
    nonisolated(unsafe) static let aes128SIV: OpaquePointer? = EVP_CIPHER_fetch(nil, "AES-128-SIV", nil)
    nonisolated(unsafe) static let aes192SIV: OpaquePointer? = EVP_CIPHER_fetch(nil, "AES-192-SIV", nil)
    nonisolated(unsafe) static let aes256SIV: OpaquePointer? = EVP_CIPHER_fetch(nil, "AES-256-SIV", nil)

    /// The fetched algorithm, or `.openssl` naming it if this OpenSSL lacks it.
    static func require(_ algorithm: OpaquePointer?, _ name: String) throws(CryptoError) -> OpaquePointer {
        guard let algorithm else { throw CryptoError.openssl(failed: "fetch \(name)") }
        return algorithm
    }
}

/// An OSSL_PARAM array for one OpenSSL call.
///
/// OSSL_PARAM stores *pointers* to its key names and string values, not copies, so
/// Swift strings bridged for the duration of a single `construct` call would dangle
/// by the time OpenSSL reads them. The names and string values are therefore copied
/// into memory this object owns; octet values point at the caller's buffers, which
/// the caller keeps alive by building and using the list inside its own
/// `withUnsafeBytes` scope.
final class OSSLParams {
    private var owned: [UnsafeMutablePointer<CChar>] = []
    private var params: [OSSL_PARAM] = []

    deinit {
        for p in owned { p.deallocate() }
    }

    private func cString(_ s: String) -> UnsafeMutablePointer<CChar> {
        let utf8 = Array(s.utf8)
        let p = UnsafeMutablePointer<CChar>.allocate(capacity: utf8.count + 1)
        for (i, byte) in utf8.enumerated() { p[i] = CChar(bitPattern: byte) }
        p[utf8.count] = 0
        owned.append(p)
        return p
    }

    func utf8String(_ key: String, _ value: String) {
        params.append(OSSL_PARAM_construct_utf8_string(cString(key), cString(value), 0))
    }

    /// `bytes` must stay valid until the call that uses this list returns.
    func octetString(_ key: String, _ bytes: UnsafeRawBufferPointer) {
        params.append(OSSL_PARAM_construct_octet_string(cString(key), UnsafeMutableRawPointer(mutating: bytes.baseAddress), bytes.count))
    }

    func with<R, E: Error>(_ body: (UnsafePointer<OSSL_PARAM>) throws(E) -> R) throws(E) -> R {
        var terminated = params
        terminated.append(OSSL_PARAM_construct_end())
        let result: Result<R, E> = terminated.withUnsafeBufferPointer { buffer in
            do throws(E) { return .success(try body(buffer.baseAddress!)) } catch { return .failure(error) }
        }
        return try result.get()
    }
}
