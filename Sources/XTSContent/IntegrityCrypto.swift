import XTSCrypto
import XTSFormat
import XTSKeys
import XTSSystem

/// Unit encryption and tags of integrity volumes (FORMAT.md section 12).
extension FileCrypto {
    static let integrityFileLabel: [UInt8] = Array("xtsfs integrity file key".utf8)
    static let integrityTagLabel: [UInt8] = Array("xtsfs integrity unit tag".utf8)

    /// Tag kinds: the ciphertext of a unit that holds data, or a hole (no ciphertext).
    public enum TagKind: UInt8 { case hole = 0, data = 1 }

    public var isIntegrity: Bool { tagKey != nil }

    /// A tag session for one operation on one thread.
    public func tagSession() throws(CryptoError) -> HMACSession {
        guard let tagKey else { throw .invalidKeyLength }
        return try HMACSession(key: tagKey)
    }

    /// The 16-byte tag of `unit`: HMAC-SHA256(tag key, index u64 LE || kind u8 || ciphertext),
    /// first 16 bytes. The file is bound through the key (derived from its nonce), the
    /// position through the index.
    public static func tag(_ s: HMACSession, unit: Int64, ciphertext: UnsafeRawBufferPointer?, into out: UnsafeMutableRawBufferPointer) throws(CryptoError) {
        var prefix = (UInt64(unit).littleEndian, ciphertext == nil ? TagKind.hole.rawValue : TagKind.data.rawValue)
        try withUnsafeBytes(of: &prefix) { (p) throws(CryptoError) in
            // The tuple is padded; only its first 9 bytes are the message prefix.
            try s.mac(prefix: UnsafeRawBufferPointer(rebasing: p[0..<9]), body: ciphertext, into: out)
        }
    }

    /// Encrypts or decrypts `count` whole units in place, the first being `firstUnit`;
    /// the tweak of each is its index. An all-zero unit is left alone when decrypting (a hole;
    /// the caller has checked its tag).
    public func cryptWhole(_ buffer: UnsafeMutableRawBufferPointer, firstUnit: Int64, count: Int, encrypt: Bool, skip: (Int) -> Bool = { _ in false }) throws(CryptoError) {
        let ctx = try XTSContext.forCurrentThread()
        try xtsKey.withUnsafeBytes { (k) throws(CryptoError) in try ctx.setKey(k, encrypt: encrypt) }
        let n = Int(IntegrityLayout.blockSize)
        for i in 0..<count where !skip(i) {
            let p = buffer.baseAddress! + i * n
            if !encrypt && FileCrypto.isZero(UnsafeRawPointer(p), n) { continue }
            try ctx.crypt(unit: UInt64(firstUnit) + UInt64(i), input: p, output: p, count: n)
        }
    }
}
