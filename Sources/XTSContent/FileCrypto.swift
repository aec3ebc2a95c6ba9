import XTSCrypto
import XTSFormat
import XTSKeys

/// The keys of one file: derived from the volume's content key and the file's nonce,
/// so every file has its own XTS key and (file, unit) pairs never repeat key and tweak.
///
/// `@unchecked Sendable`: immutable after init.
public final class FileCrypto: @unchecked Sendable {
    public let header: FileHeader
    public let keys: KeySet
    let xtsKey: SecretBytes
    /// Integrity volumes only: the key of the file's unit tags (IntegrityCrypto.swift), and
    /// how it tags (the file header's version).
    let tagKey: SecretBytes?
    public let tagAlgorithm: UnitTagAlgorithm?
    /// Files with a file root (header version 3, FORMAT.md 12.11): the key of the tag
    /// blocks' elements (K1 || K2 of tag algorithm 2), the key that seals a tag block's
    /// record, and what this process has verified of the file (shared by every handle of
    /// the file that holds this object).
    let elementKey: SecretBytes?
    let recordKey: SecretBytes?
    public let root: FileRootCache?

    static let fileLabel: [UInt8] = Array("xtsfs v1 file key".utf8)
    static let tinyLabel: [UInt8] = Array("xtsfs v1 tiny pad".utf8)

    public init(keys: KeySet, header: FileHeader) throws(CryptoError) {
        self.keys = keys
        self.header = header
        xtsKey = try HKDF.derive(key: keys.contentKey, salt: [], info: FileCrypto.fileLabel + header.nonce, count: 64)
        tagKey = nil
        tagAlgorithm = nil
        elementKey = nil; recordKey = nil; root = nil
    }

    /// The keys of a file of an integrity volume: an XTS key and a tag key of its own,
    /// each under a label used for nothing else (the two tag algorithms' labels differ, so
    /// their keys never coincide).
    public init(keys: KeySet, integrityHeader h: IntegrityFileHeader) throws(CryptoError) {
        guard let tags = h.tags else { throw .invalidInput("integrity file header version \(h.version)") }
        self.keys = keys
        self.header = FileHeader(keyGeneration: h.keyGeneration, nonce: h.nonce)
        xtsKey = try HKDF.derive(key: keys.contentKey, salt: [], info: FileCrypto.integrityFileLabel + h.nonce, count: 64)
        tagAlgorithm = tags
        switch tags {
        case .hmacSHA256:
            tagKey = try HKDF.derive(key: keys.contentKey, salt: [], info: FileCrypto.integrityTagLabel + h.nonce, count: 32)
        case .ghashAES256, .ghashAES256Root:
            tagKey = try HKDF.derive(key: keys.contentKey, salt: [], info: FileCrypto.integrityTagV2Label + h.nonce, count: GHASHTagContext.keyLength)
        }
        if tags.hasFileRoot {
            elementKey = try HKDF.derive(key: keys.contentKey, salt: [], info: FileCrypto.rootElementLabel + h.nonce, count: GHASHTagContext.keyLength)
            recordKey = try HKDF.derive(key: keys.contentKey, salt: [], info: FileCrypto.rootRecordLabel + h.nonce, count: 32)
            root = FileRootCache()
        } else {
            elementKey = nil; recordKey = nil; root = nil
        }
    }

    /// Encrypts (or decrypts) whole units in place in `buffer`, whose first byte is
    /// plaintext offset `base`. Units whose ciphertext is all zeros are holes and decrypt
    /// to zeros; a tiny unit is never treated as a hole (its pad could make zeros).
    public func crypt(units: [Layout.Unit], buffer: UnsafeMutableRawBufferPointer, base: Int64, encrypt: Bool) throws(CryptoError) {
        guard let first = units.first else { return }
        if first.tiny {
            let pad = try HKDF.derive(key: keys.contentKey, salt: [], info: FileCrypto.tinyLabel + header.nonce, count: Int(first.length))
            pad.withUnsafeBytes { p in
                let off = Int(first.start - base)
                for i in 0..<Int(first.length) { buffer[off + i] ^= p[i] }
            }
            return
        }
        let ctx = try XTSContext.forCurrentThread()
        // The context's key schedule sits in unlocked heap: wiped before this returns.
        defer { ctx.scrub() }
        try xtsKey.withUnsafeBytes { (k) throws(CryptoError) in try ctx.setKey(k, encrypt: encrypt) }
        for u in units {
            let p = buffer.baseAddress! + Int(u.start - base)
            let n = Int(u.length)
            if !encrypt && FileCrypto.isZero(UnsafeRawPointer(p), n) { continue }
            try ctx.crypt(unit: u.index, input: p, output: p, count: n)
        }
    }

    static func isZero(_ p: UnsafeRawPointer, _ n: Int) -> Bool {
        // Word-at-a-time scan; ciphertext almost always fails on the first word.
        var i = 0
        while i + 8 <= n {
            if p.loadUnaligned(fromByteOffset: i, as: UInt64.self) != 0 { return false }
            i += 8
        }
        while i < n {
            if p.load(fromByteOffset: i, as: UInt8.self) != 0 { return false }
            i += 1
        }
        return true
    }
}
