import XTSSystem
import CCrypto

/// AES-256 on one 16-byte block (ECB of a single block, no padding): a pseudorandom
/// permutation under a 32-byte key. Used to seal a directory's listing accumulator
/// (FORMAT.md 12.10), so that the accumulator itself is never stored in the clear.
public enum AESBlock {
    public static func encrypt(key: SecretBytes, _ block: [UInt8]) throws(CryptoError) -> [UInt8] {
        try apply(key: key, block, encrypt: true)
    }

    public static func decrypt(key: SecretBytes, _ block: [UInt8]) throws(CryptoError) -> [UInt8] {
        try apply(key: key, block, encrypt: false)
    }

    private static func apply(key: SecretBytes, _ block: [UInt8], encrypt: Bool) throws(CryptoError) -> [UInt8] {
        guard key.count == 32 else { throw .invalidKeyLength }
        guard block.count == 16 else { throw .invalidInput("an AES block is 16 bytes, not \(block.count)") }
        let cipher = try Fetched.require(Fetched.aes256ECB, "AES-256-ECB")
        guard let ctx = EVP_CIPHER_CTX_new() else { throw CryptoError.openssl(failed: "EVP_CIPHER_CTX_new") }
        // Freeing the context wipes its key schedule.
        defer { EVP_CIPHER_CTX_free(ctx) }
        let keyed = key.withUnsafeBytes { k in
            EVP_CipherInit_ex2(ctx, cipher, k.baseAddress!.assumingMemoryBound(to: UInt8.self), nil, encrypt ? 1 : 0, nil)
        }
        guard keyed == 1, EVP_CIPHER_CTX_set_padding(ctx, 0) == 1 else { throw CryptoError.openssl(failed: "EVP_CipherInit_ex2(AES-256-ECB)") }
        var out = [UInt8](repeating: 0, count: 32)
        var written: Int32 = 0
        let ok = out.withUnsafeMutableBufferPointer { o in
            block.withUnsafeBufferPointer { i in EVP_CipherUpdate(ctx, o.baseAddress, &written, i.baseAddress, 16) }
        }
        guard ok == 1, written == 16 else { throw CryptoError.openssl(failed: "EVP_CipherUpdate(AES-256-ECB)") }
        return Array(out.prefix(16))
    }
}
