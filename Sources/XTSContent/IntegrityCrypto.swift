import XTSCrypto
import XTSFormat
import XTSKeys
import XTSSystem

/// The tags of one operation on one thread, under one file's tag key: HMAC-SHA256 (tag
/// algorithm 1) or GHASH then AES-256 (tag algorithm 2, FORMAT.md 12.4).
///
/// No key schedule outlives the session: the HMAC context is freed (and wiped by
/// OpenSSL) with it; tag algorithm 2 keys this thread's reusable `GHASHTagContext` and
/// scrubs it when the session ends. Should another session have keyed the thread's context
/// in between, the next tag keys it again, so sessions never mix keys.
public final class UnitTagSession {
    private enum Engine {
        case hmac(HMACSession)
        case ghash(GHASHTagContext, SecretBytes)
    }
    private let engine: Engine

    init(_ algorithm: UnitTagAlgorithm, key: SecretBytes) throws(CryptoError) {
        switch algorithm {
        case .hmacSHA256:
            engine = .hmac(try HMACSession(key: key))
        case .ghashAES256, .ghashAES256Root:
            let ctx = try GHASHTagContext.forCurrentThread()
            engine = .ghash(ctx, key)
        }
        if case .ghash(let ctx, _) = engine { try claim(ctx) }
    }

    deinit {
        if case .ghash(let ctx, _) = engine, ctx.owner == ObjectIdentifier(self) { ctx.scrub() }
    }

    private func claim(_ ctx: GHASHTagContext) throws(CryptoError) {
        guard case .ghash(_, let key) = engine else { return }
        try key.withUnsafeBytes { (k) throws(CryptoError) in try ctx.setKey(k) }
        ctx.owner = ObjectIdentifier(self)
    }

    /// The 16-byte tag of `prefix || body` into `out`.
    func mac(prefix: UnsafeRawBufferPointer, body: UnsafeRawBufferPointer?, into out: UnsafeMutableRawBufferPointer) throws(CryptoError) {
        switch engine {
        case .hmac(let s):
            try s.mac(prefix: prefix, body: body, into: out)
        case .ghash(let ctx, _):
            if ctx.owner != ObjectIdentifier(self) { try claim(ctx) }
            try ctx.tag(prefix: prefix, body: body, into: out)
        }
    }
}

/// Unit encryption and tags of integrity volumes (FORMAT.md section 12).
extension FileCrypto {
    static let integrityFileLabel: [UInt8] = Array("xtsfs integrity file key".utf8)
    /// The tag key of tag algorithm 1 (HMAC-SHA256, 32 bytes).
    static let integrityTagLabel: [UInt8] = Array("xtsfs integrity unit tag".utf8)
    /// The tag key of tag algorithm 2 (K1 || K2, 64 bytes).
    static let integrityTagV2Label: [UInt8] = Array("xtsfs integrity unit tag v2 ghash-aes256".utf8)

    /// Tag kinds: the ciphertext of a unit that holds data, or a hole (no ciphertext).
    public enum TagKind: UInt8 { case hole = 0, data = 1 }

    public var isIntegrity: Bool { tagKey != nil }

    /// A tag session for one operation on one thread.
    public func tagSession() throws(CryptoError) -> UnitTagSession {
        guard let tagKey, let tagAlgorithm else { throw .invalidKeyLength }
        return try UnitTagSession(tagAlgorithm, key: tagKey)
    }

    /// The 16-byte tag of `unit` over `u64_le(index) || kind u8 || ciphertext` (FORMAT.md
    /// 12.4). The file is bound through the key (derived from its nonce), the position
    /// through the index.
    public static func tag(_ s: UnitTagSession, unit: Int64, ciphertext: UnsafeRawBufferPointer?, into out: UnsafeMutableRawBufferPointer) throws(CryptoError) {
        var prefix = (UInt64(unit).littleEndian, ciphertext == nil ? TagKind.hole.rawValue : TagKind.data.rawValue)
        try withUnsafeBytes(of: &prefix) { (p) throws(CryptoError) in
            // The tuple is padded; only its first 9 bytes are the message prefix.
            try s.mac(prefix: UnsafeRawBufferPointer(rebasing: p[0..<9]), body: ciphertext, into: out)
        }
    }

    /// Encrypts or decrypts `count` whole units in place, the first being `firstUnit`;
    /// the tweak of each is its index. An all-zero unit is left alone when decrypting (a hole;
    /// the caller has checked its tag). The thread's XTS key schedule is wiped before this
    /// returns, as in `crypt(units:...)`.
    public func cryptWhole(_ buffer: UnsafeMutableRawBufferPointer, firstUnit: Int64, count: Int, encrypt: Bool, skip: (Int) -> Bool = { _ in false }) throws(CryptoError) {
        let ctx = try XTSContext.forCurrentThread()
        defer { ctx.scrub() }
        try xtsKey.withUnsafeBytes { (k) throws(CryptoError) in try ctx.setKey(k, encrypt: encrypt) }
        let n = Int(IntegrityLayout.blockSize)
        for i in 0..<count where !skip(i) {
            let p = buffer.baseAddress! + i * n
            if !encrypt && FileCrypto.isZero(UnsafeRawPointer(p), n) { continue }
            try ctx.crypt(unit: UInt64(firstUnit) + UInt64(i), input: p, output: p, count: n)
        }
    }
}
