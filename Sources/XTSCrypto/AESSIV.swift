import CCrypto
import XTSSystem

/// AES-SIV (RFC 5297): deterministic authenticated encryption. Equal inputs give
/// equal outputs, which is what encrypted file names need (a name must map to one
/// stored name so lookups work), while any change to the sealed name or its
/// associated data is detected.
///
/// Key: 64 bytes (AES-256-SIV: a CMAC key and a CTR key); 32 bytes (AES-128-SIV)
/// and 48 bytes (AES-192-SIV) are accepted for the published test vectors.
///
/// The associated data is always passed to S2V as exactly one header component,
/// even when empty: RFC 5297 distinguishes "one empty component" from "no
/// component", and fixing the shape keeps the output a function of its arguments.
///
/// OpenSSL 3.0's AES-SIV cannot process an empty plaintext (its final step fails
/// because no data update ever ran: openssl/openssl#17268, #26580). An empty
/// plaintext seals to the synthetic IV alone, so that case computes S2V here from
/// AES-CMAC (RFC 5297 section 2.4) and needs no CTR step.
public enum AESSIV {
    public static let tagLength = 16

    private static func cipher(forKey count: Int) throws(CryptoError) -> OpaquePointer {
        switch count {
        case 32: return try Fetched.require(Fetched.aes128SIV, "AES-128-SIV")
        case 48: return try Fetched.require(Fetched.aes192SIV, "AES-192-SIV")
        case 64: return try Fetched.require(Fetched.aes256SIV, "AES-256-SIV")
        default: throw .invalidKeyLength
        }
    }

    /// Returns the 16-byte synthetic IV (the tag) followed by the ciphertext, which
    /// is as long as the plaintext. The plaintext may be empty.
    public static func seal(key: SecretBytes, plaintext: [UInt8], associatedData: [UInt8]) throws(CryptoError) -> [UInt8] {
        let cipher = try cipher(forKey: key.count)
        guard plaintext.count <= Int(Int32.max) - tagLength, associatedData.count <= Int(Int32.max) else {
            throw .invalidInput("AES-SIV input too long")
        }
        if plaintext.isEmpty {
            return try syntheticIVOfEmptyPlaintext(key: key, associatedData: associatedData)
        }
        guard let ctx = EVP_CIPHER_CTX_new() else { throw CryptoError.openssl(failed: "EVP_CIPHER_CTX_new") }
        defer { EVP_CIPHER_CTX_free(ctx) }

        let initOK = key.withUnsafeBytes { k in
            EVP_CipherInit_ex2(ctx, cipher, k.baseAddress?.assumingMemoryBound(to: UInt8.self), nil, 1, nil)
        }
        guard initOK == 1 else { throw CryptoError.openssl(failed: "EVP_CipherInit_ex2(AES-SIV seal)") }

        var sealed = [UInt8](repeating: 0, count: tagLength + plaintext.count)
        try sealed.withMutableBuffer { (out) throws(CryptoError) in
            let tag = out.baseAddress!
            let body = tag + tagLength
            try addAssociatedData(ctx, associatedData)
            // The non-NULL output pointer is what tells OpenSSL this is the message,
            // not more associated data.
            var written: Int32 = 0
            let updateOK = plaintext.withUnsafeBufferPointer { p in
                EVP_CipherUpdate(ctx, body, &written, p.baseAddress, Int32(p.count))
            }
            guard updateOK == 1, Int(written) == plaintext.count else {
                throw CryptoError.openssl(failed: "EVP_CipherUpdate(AES-SIV seal)")
            }
            var tail: Int32 = 0
            guard EVP_CipherFinal_ex(ctx, body + plaintext.count, &tail) == 1, tail == 0 else {
                throw CryptoError.openssl(failed: "EVP_CipherFinal_ex(AES-SIV seal)")
            }
            guard EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_AEAD_GET_TAG, Int32(tagLength), tag) == 1 else {
                throw CryptoError.openssl(failed: "EVP_CIPHER_CTX_ctrl(AES-SIV get tag)")
            }
        }
        return sealed
    }

    /// Checks and decrypts `tag || ciphertext`. A mismatch (wrong key, wrong
    /// associated data, tampered bytes) gives `.authenticationFailed` and no plaintext.
    public static func open(key: SecretBytes, sealed: [UInt8], associatedData: [UInt8]) throws(CryptoError) -> [UInt8] {
        let cipher = try cipher(forKey: key.count)
        guard sealed.count >= tagLength else {
            throw .invalidInput("AES-SIV sealed data is at least \(tagLength) bytes, not \(sealed.count)")
        }
        guard sealed.count <= Int(Int32.max), associatedData.count <= Int(Int32.max) else {
            throw .invalidInput("AES-SIV input too long")
        }
        if sealed.count == tagLength {
            let expected = try syntheticIVOfEmptyPlaintext(key: key, associatedData: associatedData)
            guard constantTimeEqual(expected, sealed) else { throw .authenticationFailed }
            return []
        }
        guard let ctx = EVP_CIPHER_CTX_new() else { throw CryptoError.openssl(failed: "EVP_CIPHER_CTX_new") }
        defer { EVP_CIPHER_CTX_free(ctx) }

        let initOK = key.withUnsafeBytes { k in
            EVP_CipherInit_ex2(ctx, cipher, k.baseAddress?.assumingMemoryBound(to: UInt8.self), nil, 0, nil)
        }
        guard initOK == 1 else { throw CryptoError.openssl(failed: "EVP_CipherInit_ex2(AES-SIV open)") }

        let bodyLength = sealed.count - tagLength
        var plaintext = [UInt8](repeating: 0, count: bodyLength)
        var authentic = true
        try sealed.withBuffer { (input) throws(CryptoError) in
            // The expected tag must be known before the data: OpenSSL recomputes it
            // while decrypting and compares at the data update.
            var tag = Array(input[0..<tagLength])
            let setOK = tag.withUnsafeMutableBytes { EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_AEAD_SET_TAG, Int32(tagLength), $0.baseAddress) }
            guard setOK == 1 else { throw CryptoError.openssl(failed: "EVP_CIPHER_CTX_ctrl(AES-SIV set tag)") }
            try addAssociatedData(ctx, associatedData)
            try plaintext.withMutableBuffer { (out) throws(CryptoError) in
                var written: Int32 = 0
                let updateOK = EVP_CipherUpdate(ctx, out.baseAddress, &written, input.baseAddress! + tagLength, Int32(bodyLength))
                guard updateOK == 1, Int(written) == bodyLength else { authentic = false; return }
                var tail: Int32 = 0
                guard EVP_CipherFinal_ex(ctx, out.baseAddress! + bodyLength, &tail) == 1, tail == 0 else { authentic = false; return }
            }
        }
        guard authentic else {
            CryptoError.discardOpenSSLErrors()
            // Do not let unauthenticated plaintext linger.
            plaintext.withUnsafeMutableBytes { LockedBuffer.wipe($0.baseAddress!, $0.count) }
            throw .authenticationFailed
        }
        return plaintext
    }

    /// Feeds the associated data as one S2V component: a NULL output pointer marks
    /// an update as associated data.
    private static func addAssociatedData(_ ctx: OpaquePointer, _ associatedData: [UInt8]) throws(CryptoError) {
        var none: UInt8 = 0
        var written: Int32 = 0
        let ok = withUnsafeBytes(of: &none) { empty in
            associatedData.withUnsafeBufferPointer { ad in
                EVP_CipherUpdate(ctx, nil, &written, ad.baseAddress ?? empty.baseAddress!.assumingMemoryBound(to: UInt8.self), Int32(ad.count))
            }
        }
        guard ok == 1 else { throw CryptoError.openssl(failed: "EVP_CipherUpdate(AES-SIV associated data)") }
    }

    // MARK: S2V for the empty plaintext

    /// S2V(K1, AD, "") from RFC 5297 section 2.4, with K1 the first half of the key:
    ///   D = CMAC(K1, 0^128); D = dbl(D) xor CMAC(K1, AD); V = CMAC(K1, dbl(D) xor pad(""))
    /// where pad("") = 0x80 followed by zeros. The intermediate values are derived
    /// from the key, so they live in locked memory.
    private static func syntheticIVOfEmptyPlaintext(key: SecretBytes, associatedData: [UInt8]) throws(CryptoError) -> [UInt8] {
        let cmacCipher: String
        switch key.count {
        case 32: cmacCipher = "AES-128-CBC"
        case 48: cmacCipher = "AES-192-CBC"
        case 64: cmacCipher = "AES-256-CBC"
        default: throw .invalidKeyLength
        }
        let macKey = key.slice(0..<key.count / 2)
        let scratch = SecretBytes(count: 3 * tagLength)  // D, CMAC(AD), T
        var v = [UInt8](repeating: 0, count: tagLength)
        try scratch.withUnsafeMutableBytes { (s) throws(CryptoError) in
            let d = UnsafeMutableRawBufferPointer(rebasing: s[0..<16])
            let adMAC = UnsafeMutableRawBufferPointer(rebasing: s[16..<32])
            let t = UnsafeMutableRawBufferPointer(rebasing: s[32..<48])
            t.initializeMemory(as: UInt8.self, repeating: 0)
            try cmac(key: macKey, cipher: cmacCipher, data: UnsafeRawBufferPointer(t), into: d)
            try associatedData.withBytes { (ad) throws(CryptoError) in
                try cmac(key: macKey, cipher: cmacCipher, data: ad, into: adMAC)
            }
            double(d)
            for i in 0..<16 { d[i] ^= adMAC[i] }
            // T = dbl(D) xor pad(""), pad("") = 0x80 00 ... 00
            double(d)
            for i in 0..<16 { t[i] = d[i] }
            t[0] ^= 0x80
            try v.withMutableBytes { (out) throws(CryptoError) in
                try cmac(key: macKey, cipher: cmacCipher, data: UnsafeRawBufferPointer(t), into: out)
            }
        }
        return v
    }

    /// Multiplication by x in GF(2^128) on a big-endian 16-byte block ("dbl").
    private static func double(_ block: UnsafeMutableRawBufferPointer) {
        let carry = block[0] >> 7
        for i in 0..<15 { block[i] = (block[i] << 1) | (block[i + 1] >> 7) }
        block[15] = (block[15] << 1) ^ (carry * 0x87)
    }

    /// One AES-CMAC (EVP_MAC "CMAC") of `data` into the 16-byte `output`.
    private static func cmac(key: SecretBytes, cipher: String, data: UnsafeRawBufferPointer, into output: UnsafeMutableRawBufferPointer) throws(CryptoError) {
        let mac = try Fetched.require(Fetched.cmac, "CMAC")
        guard let ctx = EVP_MAC_CTX_new(mac) else { throw CryptoError.openssl(failed: "EVP_MAC_CTX_new(CMAC)") }
        defer { EVP_MAC_CTX_free(ctx) }
        let params = OSSLParams()
        params.utf8String(OSSL_MAC_PARAM_CIPHER, cipher)
        let initOK = key.withUnsafeBytes { k in
            params.with { p in EVP_MAC_init(ctx, k.baseAddress?.assumingMemoryBound(to: UInt8.self), k.count, p) }
        }
        guard initOK == 1 else { throw CryptoError.openssl(failed: "EVP_MAC_init(CMAC \(cipher))") }
        if data.count > 0 {
            guard EVP_MAC_update(ctx, data.baseAddress!.assumingMemoryBound(to: UInt8.self), data.count) == 1 else {
                throw CryptoError.openssl(failed: "EVP_MAC_update(CMAC)")
            }
        }
        var length = 0
        guard EVP_MAC_final(ctx, output.baseAddress?.assumingMemoryBound(to: UInt8.self), &length, output.count) == 1,
              length == tagLength else {
            throw CryptoError.openssl(failed: "EVP_MAC_final(CMAC)")
        }
    }
}
