import XTSCrypto
import XTSFormat
import XTSKeys

/// Extended attributes of the `user.` namespace, encrypted for the backing filesystem's
/// own `user.` attributes:
/// - the name after `user.` is encrypted deterministically (AES-SIV, zero-padded to a
///   multiple of 16 bytes like file names), so getxattr needs no scan, and written as
///   `user.` + base64url;
/// - the value is `version u8 | key generation u32 LE | nonce [16] | AES-SIV(value)`,
///   with the backing attribute name and the nonce as associated data, so a value cannot
///   be moved to another attribute name and equal values do not show.
public struct XattrCodec: Sendable {
    public static let namespace = "user."
    /// Longest plaintext name after `user.` whose encrypted form fits the 255-byte limit
    /// of attribute names.
    public static let maxName = 160
    /// Bytes a stored value has beyond the plaintext.
    public static let valueOverhead = 1 + 4 + 16 + 16
    /// The kernel's limit on a value (XATTR_SIZE_MAX), less our overhead.
    public static let maxValue = 65536 - valueOverhead
    static let version: UInt8 = 1
    static let nameLabel: [UInt8] = Array("xtsfs v1 xattr name".utf8)
    static let valueLabel: [UInt8] = Array("xtsfs v1 xattr value".utf8)

    public let keys: KeySet
    public init(keys: KeySet) { self.keys = keys }

    /// The backing attribute name of a plaintext `user.` name; nil when the name is not in
    /// the `user.` namespace. Throws `tooLong` past `maxName`.
    public func encryptName(_ name: [UInt8]) throws(NameError) -> String? {
        let prefix = Array(XattrCodec.namespace.utf8)
        guard name.count > prefix.count, Array(name.prefix(prefix.count)) == prefix else { return nil }
        let rest = Array(name.dropFirst(prefix.count))
        guard rest.count <= XattrCodec.maxName else { throw .tooLong }
        guard !rest.contains(0) else { throw .invalid }
        var padded = rest
        padded.append(contentsOf: repeatElement(0, count: (rest.count + 15) / 16 * 16 - rest.count))
        do {
            return XattrCodec.namespace + Base64URL.encode(try AESSIV.seal(key: keys.nameKey, plaintext: padded, associatedData: XattrCodec.nameLabel))
        } catch { throw .crypto(error) }
    }

    /// The plaintext name (with `user.`) of a backing attribute name; nil for one that is
    /// not ours.
    public func decryptName(_ backing: String) -> [UInt8]? {
        guard backing.hasPrefix(XattrCodec.namespace),
              let sealed = Base64URL.decode(String(backing.dropFirst(XattrCodec.namespace.count))),
              sealed.count >= 32, sealed.count % 16 == 0,
              var plain = try? AESSIV.open(key: keys.nameKey, sealed: sealed, associatedData: XattrCodec.nameLabel) else { return nil }
        while plain.last == 0 { plain.removeLast() }
        guard !plain.isEmpty else { return nil }
        return Array(XattrCodec.namespace.utf8) + plain
    }

    public func encryptValue(_ value: [UInt8], backingName: String) throws(CryptoError) -> [UInt8] {
        let nonce = try Random.bytes(16)
        var w = ByteWriter(capacity: value.count + XattrCodec.valueOverhead)
        w.u8(XattrCodec.version)
        w.u32(keys.generation)
        w.raw(nonce)
        let sealed = try AESSIV.seal(key: keys.nameKey, plaintext: value, associatedData: XattrCodec.valueLabel + Array(backingName.utf8) + nonce)
        return w.bytes + sealed
    }

    public func decryptValue(_ stored: [UInt8], backingName: String) throws(CryptoError) -> [UInt8] {
        guard stored.count >= XattrCodec.valueOverhead, stored[0] == XattrCodec.version else { throw .authenticationFailed }
        let generation = UInt32(stored[1]) | UInt32(stored[2]) << 8 | UInt32(stored[3]) << 16 | UInt32(stored[4]) << 24
        guard generation == keys.generation else { throw .authenticationFailed }
        let nonce = Array(stored[5..<21])
        return try AESSIV.open(key: keys.nameKey, sealed: Array(stored[21...]), associatedData: XattrCodec.valueLabel + Array(backingName.utf8) + nonce)
    }
}
