import XTSCrypto

/// The 32-byte header at the start of every non-empty backing file:
///
///     version u16 | flags u16 | key generation u32 | nonce [16] | MAC [8]
///
/// The nonce makes the file's content key unique (HKDF of the content key and the nonce),
/// so no two files ever share key and tweak; inode numbers play no part. The MAC
/// (HMAC-SHA256 under the metadata key, truncated) turns a damaged header into an
/// error instead of a silently wrong key.
public struct FileHeader: Sendable, Equatable {
    public static let length = 32
    public static let nonceLength = 16
    public static let currentVersion: UInt16 = 1
    static let macLength = 8
    static let macLabel: [UInt8] = Array("xtsfs file header".utf8)

    public var version: UInt16 = FileHeader.currentVersion
    public var flags: UInt16 = 0
    public var keyGeneration: UInt32
    public var nonce: [UInt8]

    public init(keyGeneration: UInt32, nonce: [UInt8]) {
        self.keyGeneration = keyGeneration
        self.nonce = nonce
    }

    public static func random(keyGeneration: UInt32) throws(CryptoError) -> FileHeader {
        FileHeader(keyGeneration: keyGeneration, nonce: try Random.bytes(nonceLength))
    }

    private func body() -> [UInt8] {
        var w = ByteWriter(capacity: FileHeader.length)
        w.u16(version); w.u16(flags); w.u32(keyGeneration); w.raw(nonce)
        return w.bytes
    }

    public func encode(macKey: SecretBytes) throws(CryptoError) -> [UInt8] {
        let b = body()
        return b + (try truncatedMAC(FileHeader.macLabel, b, macKey, FileHeader.macLength))
    }

    /// The key generation field of encoded header bytes, read before the MAC is checked
    /// (the MAC key depends on it); 0 when the bytes are too short to hold one.
    public static func generation(of bytes: [UInt8]) -> UInt32 {
        guard bytes.count >= 8 else { return 0 }
        return UInt32(bytes[4]) | UInt32(bytes[5]) << 8 | UInt32(bytes[6]) << 16 | UInt32(bytes[7]) << 24
    }

    public static func decode(_ bytes: [UInt8], macKey: SecretBytes) throws(FormatError) -> FileHeader {
        guard bytes.count >= length else { throw .truncated("file header") }
        var r = ByteReader(bytes)
        let version = try r.u16("file header version")
        guard version == currentVersion else { throw .unsupportedVersion(version) }
        let flags = try r.u16("file header flags")
        let generation = try r.u32("file key generation")
        let nonce = try r.raw(nonceLength, "file nonce")
        let mac = try r.raw(macLength, "file header MAC")
        var h = FileHeader(keyGeneration: generation, nonce: nonce)
        h.flags = flags
        let expected: [UInt8]
        do { expected = try truncatedMAC(macLabel, h.body(), macKey, macLength) }
        catch { throw .invalid("file header MAC: \(error)") }
        guard constantTimeEqual(expected, mac) else { throw .checksumMismatch("file header") }
        guard flags == 0 else { throw .unsupportedFeatures(UInt64(flags)) }
        return h
    }
}

/// `xtsfs.dir`, present in every backing directory (the root too):
///
///     magic "XTSFSDIR" | version u16 | flags u16 | name key generation u32 | directory ID [16] | MAC [16]
///
/// The directory ID is the associated data of every name encrypted in this directory,
/// so equal names in different directories encrypt differently, and it travels with the
/// directory on rename, so children never need re-encrypting.
public struct DirHeader: Sendable, Equatable {
    public static let fileName = "xtsfs.dir"
    public static let magic: [UInt8] = Array("XTSFSDIR".utf8)
    public static let length = 48
    public static let idLength = 16
    static let macLength = 16
    static let macLabel: [UInt8] = Array("xtsfs dir header".utf8)

    public var version: UInt16 = 1
    public var flags: UInt16 = 0
    public var keyGeneration: UInt32
    public var directoryID: [UInt8]

    public init(keyGeneration: UInt32, directoryID: [UInt8]) {
        self.keyGeneration = keyGeneration
        self.directoryID = directoryID
    }

    public static func random(keyGeneration: UInt32) throws(CryptoError) -> DirHeader {
        DirHeader(keyGeneration: keyGeneration, directoryID: try Random.bytes(idLength))
    }

    private func body() -> [UInt8] {
        var w = ByteWriter(capacity: DirHeader.length)
        w.raw(DirHeader.magic); w.u16(version); w.u16(flags); w.u32(keyGeneration); w.raw(directoryID)
        return w.bytes
    }

    public func encode(macKey: SecretBytes) throws(CryptoError) -> [UInt8] {
        let b = body()
        return b + (try truncatedMAC(DirHeader.macLabel, b, macKey, DirHeader.macLength))
    }

    /// The generation field of encoded header bytes, read before the MAC is checked (the
    /// MAC key depends on it); 0 when the bytes are too short to hold one.
    public static func generation(of bytes: [UInt8]) -> UInt32 {
        guard bytes.count >= 16 else { return 0 }
        return UInt32(bytes[12]) | UInt32(bytes[13]) << 8 | UInt32(bytes[14]) << 16 | UInt32(bytes[15]) << 24
    }

    public static func decode(_ bytes: [UInt8], macKey: SecretBytes) throws(FormatError) -> DirHeader {
        guard bytes.count == length else { throw bytes.count < length ? .truncated("directory header") : .invalid("directory header length") }
        guard Array(bytes[0..<8]) == magic else { throw .badMagic("directory header") }
        var r = ByteReader(bytes, offset: 8)
        let version = try r.u16("directory header version")
        guard version == 1 else { throw .unsupportedVersion(version) }
        let flags = try r.u16("directory header flags")
        let generation = try r.u32("directory key generation")
        let id = try r.raw(idLength, "directory ID")
        let mac = try r.raw(macLength, "directory header MAC")
        var h = DirHeader(keyGeneration: generation, directoryID: id)
        h.flags = flags
        let expected: [UInt8]
        do { expected = try truncatedMAC(macLabel, h.body(), macKey, macLength) }
        catch { throw .invalid("directory header MAC: \(error)") }
        guard constantTimeEqual(expected, mac) else { throw .checksumMismatch("directory header") }
        guard flags == 0 else { throw .unsupportedFeatures(UInt64(flags)) }
        return h
    }
}

/// HMAC-SHA256 of a label and a header body, cut to the header's MAC length: the check
/// every per-file and per-directory header carries.
func truncatedMAC(_ label: [UInt8], _ body: [UInt8], _ key: SecretBytes, _ length: Int) throws(CryptoError) -> [UInt8] {
    Array(try HMACSHA256.mac(key: key, data: label + body).prefix(length))
}
