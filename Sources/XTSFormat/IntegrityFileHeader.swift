import XTSCrypto

/// How the 4 KiB units of an integrity volume are tagged (FORMAT.md 12.4). Chosen once per
/// volume (feature bit 3 means algorithm 2) and recorded in every file header as its
/// version, which must be the volume's: a file header of the other algorithm is damage.
public enum UnitTagAlgorithm: UInt16, Sendable, CaseIterable, CustomStringConvertible {
    /// HMAC-SHA256 under a 32-byte per-file key, cut to 16 bytes (volumes made before tag
    /// algorithm 2; still read and written).
    case hmacSHA256 = 1
    /// AES-256 under K2 of the AES-256-GCM tag under K1 (fixed IV, the unit as additional
    /// data): GHASH then a block cipher, per-file 64-byte key K1 || K2. What `init --integrity` makes.
    case ghashAES256 = 2

    public var description: String {
        switch self {
        case .hmacSHA256: "HMAC-SHA256"
        case .ghashAES256: "GHASH+AES-256"
        }
    }
}

/// The 64-byte header at the start of every non-empty backing file of an integrity volume
/// (feature `blockAuthentication`), at the head of the file's first tag block:
///
///     version u16 | flags u16 | key generation u32 | nonce [16] | length u64 |
///     file ID [16] | MAC [16]
///
/// Unlike the plain header it commits the plaintext length: an integrity file is not
/// length-preserving (every unit is stored whole, with tags beside it), and the length is
/// what a truncation or extension behind our back would change. The MAC is HMAC-SHA256
/// under the metadata key with a label of its own, cut to 128 bits, so a plain header
/// can never pass for one of these or the reverse.
public struct IntegrityFileHeader: Sendable, Equatable {
    public static let length = 64
    /// Flag bit 0: contents are authenticated. The only flag, and always set.
    public static let flagAuthenticated: UInt16 = 1
    static let macLength = 16
    static let macLabel: [UInt8] = Array("xtsfs integrity file header".utf8)

    /// The tag algorithm of the file's units (`UnitTagAlgorithm`): 1 or 2.
    public var version: UInt16
    public var flags: UInt16 = IntegrityFileHeader.flagAuthenticated
    public var keyGeneration: UInt32
    public var nonce: [UInt8]
    /// The plaintext length, in bytes.
    public var plainLength: UInt64
    /// The file's identity in its directories' listing manifests (FORMAT.md 12.10):
    /// random at creation, kept when the file is emptied or rekeyed. 16 zero bytes on a
    /// volume without listing manifests (the reserved bytes of older versions).
    public var fileID: [UInt8] = IntegrityFileHeader.noFileID
    public static let noFileID = [UInt8](repeating: 0, count: 16)

    public init(tags: UnitTagAlgorithm, keyGeneration: UInt32, nonce: [UInt8], plainLength: UInt64) {
        self.version = tags.rawValue
        self.keyGeneration = keyGeneration
        self.nonce = nonce
        self.plainLength = plainLength
    }

    /// The tag algorithm the version names (every decoded header has one).
    public var tags: UnitTagAlgorithm? { UnitTagAlgorithm(rawValue: version) }

    public static func random(tags: UnitTagAlgorithm, keyGeneration: UInt32) throws(CryptoError) -> IntegrityFileHeader {
        IntegrityFileHeader(tags: tags, keyGeneration: keyGeneration, nonce: try Random.bytes(FileHeader.nonceLength), plainLength: 0)
    }

    private func body() -> [UInt8] {
        var w = ByteWriter(capacity: IntegrityFileHeader.length)
        w.u16(version); w.u16(flags); w.u32(keyGeneration); w.raw(nonce); w.u64(plainLength)
        w.raw(fileID.count == 16 ? fileID : IntegrityFileHeader.noFileID)
        return w.bytes
    }

    public func encode(macKey: SecretBytes) throws(CryptoError) -> [UInt8] {
        let b = body()
        return b + (try truncatedMAC(IntegrityFileHeader.macLabel, b, macKey, IntegrityFileHeader.macLength))
    }

    /// The key generation a header claims, before its MAC can be checked (it names the key).
    public static func claimedGeneration(_ bytes: [UInt8]) -> UInt32? {
        guard bytes.count >= 8 else { return nil }
        return (4..<8).reduce(UInt32(0)) { $0 | UInt32(bytes[$1]) << (8 * ($1 - 4)) }
    }

    public static func decode(_ bytes: [UInt8], macKey: SecretBytes) throws(FormatError) -> IntegrityFileHeader {
        guard bytes.count >= length else { throw .truncated("integrity file header") }
        var r = ByteReader(Array(bytes.prefix(length)))
        let version = try r.u16("file header version")
        guard let tags = UnitTagAlgorithm(rawValue: version) else { throw .unsupportedVersion(version) }
        let flags = try r.u16("file header flags")
        let generation = try r.u32("file key generation")
        let nonce = try r.raw(FileHeader.nonceLength, "file nonce")
        let plainLength = try r.u64("file length")
        let fileID = try r.raw(16, "file ID")
        let mac = try r.raw(macLength, "file header MAC")
        var h = IntegrityFileHeader(tags: tags, keyGeneration: generation, nonce: nonce, plainLength: plainLength)
        h.flags = flags
        h.fileID = fileID
        let expected: [UInt8]
        do { expected = try truncatedMAC(macLabel, h.body(), macKey, macLength) }
        catch { throw .invalid("file header MAC: \(error)") }
        // The file ID is inside the MAC; whether it must be zeros (a volume without listing
        // manifests) or not (one with them) is for the reader, who knows the volume.
        guard constantTimeEqual(expected, mac) else { throw .checksumMismatch("integrity file header") }
        guard flags == flagAuthenticated else { throw .unsupportedFeatures(UInt64(flags)) }
        return h
    }
}
