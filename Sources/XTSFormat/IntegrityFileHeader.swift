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
    /// Tag algorithm 2's unit tags, and a **file root**: the header's MAC also covers a
    /// commitment to every tag block of the file, so that no unit (with its tag entry) can
    /// be put back from an older version of the file (FORMAT.md 12.11). What `init
    /// --integrity` makes since this version.
    case ghashAES256Root = 3

    public var description: String {
        switch self {
        case .hmacSHA256: "HMAC-SHA256"
        case .ghashAES256: "GHASH+AES-256"
        case .ghashAES256Root: "GHASH+AES-256, file root"
        }
    }

    /// The header's MAC covers the file root (FORMAT.md 12.11).
    public var hasFileRoot: Bool { self == .ghashAES256Root }
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
    /// Version 3: the MAC covers the header's 48 bytes and the file root (16 bytes).
    static let macLabelV3: [UInt8] = Array("xtsfs integrity file header v3".utf8)
    /// The 16 bytes of the file root of a file with no units (a file of length 0).
    public static let emptyRoot = [UInt8](repeating: 0, count: 16)

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

    /// The 64 bytes. A version 3 header needs `root`, the file root of the units and tag
    /// blocks it commits (FORMAT.md 12.11); the others have none.
    public func encode(macKey: SecretBytes, root: [UInt8]? = nil) throws(CryptoError) -> [UInt8] {
        let b = body()
        return b + (try mac(b, macKey: macKey, root: root))
    }

    private func mac(_ body: [UInt8], macKey: SecretBytes, root: [UInt8]?) throws(CryptoError) -> [UInt8] {
        if tags?.hasFileRoot == true {
            guard let root, root.count == 16 else { throw .invalidInput("a version 3 file header needs its file root") }
            return try truncatedMAC(IntegrityFileHeader.macLabelV3, body + root, macKey, IntegrityFileHeader.macLength)
        }
        return try truncatedMAC(IntegrityFileHeader.macLabel, body, macKey, IntegrityFileHeader.macLength)
    }

    /// The MAC bytes of an encoded header (its last 16 bytes): a tag block's record names
    /// the header it was written under by them (FORMAT.md 12.11).
    public static func macBytes(_ bytes: [UInt8]) -> ArraySlice<UInt8> { bytes[(length - macLength)..<length] }

    /// The key generation a header claims, before its MAC can be checked (it names the key).
    public static func claimedGeneration(_ bytes: [UInt8]) -> UInt32? {
        guard bytes.count >= 8 else { return nil }
        return (4..<8).reduce(UInt32(0)) { $0 | UInt32(bytes[$1]) << (8 * ($1 - 4)) }
    }

    /// The fields of a header, not checked: for a version 3 header, whose MAC can only be
    /// checked once its file root is computed, which needs the keys its nonce gives.
    /// `decode(_:macKey:root:)` then checks it.
    public static func parse(_ bytes: [UInt8]) throws(FormatError) -> IntegrityFileHeader {
        guard bytes.count >= length else { throw .truncated("integrity file header") }
        var r = ByteReader(Array(bytes.prefix(length)))
        let version = try r.u16("file header version")
        guard let tags = UnitTagAlgorithm(rawValue: version) else { throw .unsupportedVersion(version) }
        let flags = try r.u16("file header flags")
        let generation = try r.u32("file key generation")
        let nonce = try r.raw(FileHeader.nonceLength, "file nonce")
        let plainLength = try r.u64("file length")
        var h = IntegrityFileHeader(tags: tags, keyGeneration: generation, nonce: nonce, plainLength: plainLength)
        h.flags = flags
        h.fileID = try r.raw(16, "file ID")
        return h
    }

    /// Decodes and checks a header; a version 3 header needs `root`, the file root computed
    /// from the file's tag blocks (a header whose root does not match fails its MAC).
    public static func decode(_ bytes: [UInt8], macKey: SecretBytes, root: [UInt8]? = nil) throws(FormatError) -> IntegrityFileHeader {
        let h = try parse(bytes)
        let mac = Array(macBytes(bytes))
        let expected: [UInt8]
        do { expected = try h.mac(h.body(), macKey: macKey, root: root) }
        catch { throw .invalid("file header MAC: \(error)") }
        // The file ID is inside the MAC; whether it must be zeros (a volume without listing
        // manifests) or not (one with them) is for the reader, who knows the volume.
        guard constantTimeEqual(expected, mac) else { throw .checksumMismatch("integrity file header") }
        guard h.flags == flagAuthenticated else { throw .unsupportedFeatures(UInt64(h.flags)) }
        return h
    }
}
