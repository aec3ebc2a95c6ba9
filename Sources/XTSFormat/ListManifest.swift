import XTSCrypto
import XTSSystem

/// The listing manifest of a backing directory of a volume with feature
/// `listingManifests` (FORMAT.md 12.10): `xtsfs.list`, next to `xtsfs.dir`, 64 bytes,
/// rewritten in place with one `pwrite` at offset 0:
///
///     magic "XTSFSLST" | version u16 (1) | flags u16 (0) | key generation u32 |
///     slot A [16] | slot B [16] | MAC [16]
///
/// A slot holds AES-256 under the generation's seal key of the directory's accumulator:
/// the XOR of the elements (`ListingElement`) of its entries. Slot A is the committed
/// listing, slot B the pending one; they differ only while a change is under way (or
/// after a crash in one). The MAC (HMAC-SHA256 under the generation's manifest MAC key,
/// cut to 16 bytes) covers the directory ID and bytes 0…47, so a manifest moved to
/// another directory fails it.
public struct ListManifest: Sendable, Equatable {
    public static let fileName = "xtsfs.list"
    public static let length = 64
    static let magic: [UInt8] = Array("XTSFSLST".utf8)
    static let macLabel: [UInt8] = Array("xtsfs listing manifest".utf8)
    static let macLength = 16

    public var version: UInt16 = 1
    public var flags: UInt16 = 0
    public var keyGeneration: UInt32
    /// Sealed accumulators: A committed, B pending.
    public var slotA: [UInt8]
    public var slotB: [UInt8]

    public init(keyGeneration: UInt32, slotA: [UInt8], slotB: [UInt8]) {
        self.keyGeneration = keyGeneration
        self.slotA = slotA
        self.slotB = slotB
    }

    /// A change is under way, or was cut off by a crash.
    public var pending: Bool { !constantTimeEqual(slotA, slotB) }

    private func body() -> [UInt8] {
        var w = ByteWriter(capacity: ListManifest.length)
        w.raw(ListManifest.magic); w.u16(version); w.u16(flags); w.u32(keyGeneration); w.raw(slotA); w.raw(slotB)
        return w.bytes
    }

    public func encode(macKey: SecretBytes, directoryID: [UInt8]) throws(CryptoError) -> [UInt8] {
        precondition(slotA.count == 16 && slotB.count == 16 && directoryID.count == DirHeader.idLength)
        let b = body()
        return b + (try truncatedMAC(ListManifest.macLabel, directoryID + b, macKey, ListManifest.macLength))
    }

    /// The generation field, read before the MAC is checked (it names the key); nil when
    /// the bytes are not a manifest's length.
    public static func generation(of bytes: [UInt8]) -> UInt32? {
        guard bytes.count == length else { return nil }
        return UInt32(bytes[12]) | UInt32(bytes[13]) << 8 | UInt32(bytes[14]) << 16 | UInt32(bytes[15]) << 24
    }

    public static func decode(_ bytes: [UInt8], macKey: SecretBytes, directoryID: [UInt8]) throws(FormatError) -> ListManifest {
        guard bytes.count == length else { throw bytes.count < length ? .truncated("listing manifest") : .invalid("listing manifest length \(bytes.count)") }
        guard Array(bytes[0..<8]) == magic else { throw .badMagic("listing manifest") }
        var r = ByteReader(bytes, offset: 8)
        let version = try r.u16("listing manifest version")
        guard version == 1 else { throw .unsupportedVersion(version) }
        let flags = try r.u16("listing manifest flags")
        let generation = try r.u32("listing manifest key generation")
        let a = try r.raw(16, "listing manifest slot A")
        let b = try r.raw(16, "listing manifest slot B")
        let mac = try r.raw(macLength, "listing manifest MAC")
        var m = ListManifest(keyGeneration: generation, slotA: a, slotB: b)
        m.flags = flags
        let expected: [UInt8]
        do { expected = try truncatedMAC(macLabel, directoryID + m.body(), macKey, macLength) }
        catch { throw .invalid("listing manifest MAC: \(error)") }
        guard constantTimeEqual(expected, mac) else { throw .checksumMismatch("listing manifest") }
        guard flags == 0 else { throw .unsupportedFeatures(UInt64(flags)) }
        return m
    }
}

/// The element of one directory entry in its directory's accumulator (FORMAT.md 12.10):
///
///     P(e) = first 16 bytes of HMAC-SHA256(element key,
///              directory ID [16] | type u8 | name length u16 | plaintext name | identity [16])
///
/// `type` is the entry's `DT_*` value (file 8, directory 4, symlink 10, character device 2,
/// block device 6, FIFO 1, socket 12); `identity` is what the entry is: a file's file ID,
/// a directory's directory ID, a symlink's first 16 bytes of SHA-256 of its plaintext
/// target, a device's rdev (u64, then 8 zero bytes), zeros for a FIFO or socket.
public enum ListingElement {
    public static let zero = [UInt8](repeating: 0, count: 16)

    public static func element(key: SecretBytes, directoryID: [UInt8], type: UInt8, name: [UInt8], identity: [UInt8]) throws(CryptoError) -> [UInt8] {
        precondition(identity.count == 16 && name.count <= Int(UInt16.max))
        var w = ByteWriter(capacity: 16 + 3 + name.count + 16)
        w.raw(directoryID); w.u8(type); w.u16(UInt16(name.count)); w.raw(name); w.raw(identity)
        return Array(try HMACSHA256.mac(key: key, data: w.bytes).prefix(16))
    }

    public static func xor(_ a: [UInt8], _ b: [UInt8]) -> [UInt8] {
        var out = a
        for i in 0..<16 { out[i] ^= b[i] }
        return out
    }

    public static func identity(symlinkTarget plain: [UInt8]) -> [UInt8] { Array(SHA256.hash(plain).prefix(16)) }

    public static func identity(rdev: UInt64) -> [UInt8] {
        var w = ByteWriter(capacity: 16)
        w.u64(rdev); w.u64(0)
        return w.bytes
    }

    /// Seals an accumulator for a slot.
    public static func seal(key: SecretBytes, _ acc: [UInt8]) throws(CryptoError) -> [UInt8] { try AESBlock.encrypt(key: key, acc) }
    /// The accumulator a slot holds.
    public static func open(key: SecretBytes, _ slot: [UInt8]) throws(CryptoError) -> [UInt8] { try AESBlock.decrypt(key: key, slot) }
}
