import XTSCrypto
import XTSFormat
import XTSKeys

/// A backing-side name for a plaintext name.
public enum BackingName: Equatable, Sendable {
    /// The encrypted name itself.
    case short(String)
    /// Too long for the backing filesystem: stored as `xtsfs.long.HASH`, with the full
    /// encrypted name in the side file `xtsfs.long.HASH.name`.
    case long(hashed: String, full: String)

    public var entryName: String {
        switch self {
        case .short(let s): return s
        case .long(let h, _): return h
        }
    }
}

public enum NameError: Error, Sendable, Equatable {
    case tooLong
    case invalid
    case crypto(CryptoError)
}

/// Names are encrypted deterministically (AES-256-SIV) with the directory ID as associated
/// data: the same name in the same directory always gives the same backing name, so a
/// lookup is one encryption and one stat, with no directory scan. Names are zero-padded to
/// a multiple of 16 bytes first (a name has no NUL byte, so the padding is unambiguous),
/// which hides their exact length.
public struct NameCodec: Sendable {
    public static let maxPlainName = 255
    /// Longest backing name used as is; longer ones become `xtsfs.long.*`.
    public static let maxBackingName = 255
    public static let longPrefix = "xtsfs.long."
    public static let longSuffix = ".name"
    /// PATH_MAX - 1, as on Linux filesystems.
    public static let maxSymlinkTarget = 4095
    /// Longest backing symlink target; a longer encoded target is kept in the link store.
    public static let maxBackingTarget = 4095
    /// The backing target of a symlink whose encoded target is in the link store:
    /// `xtsfs.link.` + base64url(SHA-256(encoded target)). Never base64url itself.
    public static let storedTargetPrefix = "xtsfs.link."
    /// The directory in CIPHERDIR that holds long encoded symlink targets, by hash.
    public static let linkStore = "xtsfs.links"
    static let nameLabel: [UInt8] = Array("xtsfs v1 name".utf8)
    static let linkLabel: [UInt8] = Array("xtsfs v1 symlink".utf8)

    public let keys: KeySet
    public init(keys: KeySet) { self.keys = keys }

    public func encrypt(_ name: [UInt8], directoryID: [UInt8]) throws(NameError) -> BackingName {
        guard !name.isEmpty, name.count <= NameCodec.maxPlainName, !name.contains(0), !name.contains(UInt8(ascii: "/")) else {
            throw name.count > NameCodec.maxPlainName ? .tooLong : .invalid
        }
        var padded = name
        let target = (name.count + 15) / 16 * 16
        padded.append(contentsOf: repeatElement(0, count: target - name.count))
        let sealed: [UInt8]
        do { sealed = try AESSIV.seal(key: keys.nameKey, plaintext: padded, associatedData: NameCodec.nameLabel + directoryID) }
        catch { throw .crypto(error) }
        let encoded = Base64URL.encode(sealed)
        if encoded.utf8.count <= NameCodec.maxBackingName { return .short(encoded) }
        return .long(hashed: NameCodec.longEntryName(forEncoded: Array(encoded.utf8)), full: encoded)
    }

    /// The backing entry name of a long encrypted name: a hash of it. A side file is
    /// trusted only when its content hashes to its entry's name.
    public static func longEntryName(forEncoded encoded: [UInt8]) -> String {
        longPrefix + Base64URL.encode(SHA256.hash(encoded))
    }

    /// The link-store file name of a long encoded symlink target: its hash.
    public static func storedTargetName(forEncoded encoded: [UInt8]) -> String {
        Base64URL.encode(SHA256.hash(encoded))
    }

    /// Decrypts an encrypted name (the short form, or the content of a long-name side file).
    public func decrypt(_ encoded: String, directoryID: [UInt8]) throws(NameError) -> [UInt8] {
        guard let sealed = Base64URL.decode(encoded), sealed.count >= 32, (sealed.count - 16) % 16 == 0 else { throw .invalid }
        var plain: [UInt8]
        do { plain = try AESSIV.open(key: keys.nameKey, sealed: sealed, associatedData: NameCodec.nameLabel + directoryID) }
        catch { throw .crypto(error) }
        while plain.last == 0 { plain.removeLast() }
        guard !plain.isEmpty, !plain.contains(0), !plain.contains(UInt8(ascii: "/")) else { throw .invalid }
        return plain
    }

    public static func isLongName(_ backing: String) -> Bool {
        if case .longName = BackingEntry.classify(backing) { return true }
        return false
    }

    /// Symlink targets are encrypted with a random nonce (so equal targets do not show).
    public func encryptTarget(_ target: [UInt8]) throws(NameError) -> String {
        guard !target.isEmpty else { throw .invalid }
        guard target.count <= NameCodec.maxSymlinkTarget else { throw .tooLong }
        do {
            let nonce = try Random.bytes(16)
            let sealed = try AESSIV.seal(key: keys.nameKey, plaintext: target, associatedData: NameCodec.linkLabel + nonce)
            return Base64URL.encode(nonce + sealed)
        } catch { throw .crypto(error) }
    }

    public func decryptTarget(_ encoded: [UInt8]) throws(NameError) -> [UInt8] {
        guard let raw = Base64URL.decode(String(decoding: encoded, as: UTF8.self)), raw.count > 32 else { throw .invalid }
        do {
            return try AESSIV.open(key: keys.nameKey, sealed: Array(raw[16...]), associatedData: NameCodec.linkLabel + Array(raw[0..<16]))
        } catch { throw .crypto(error) }
    }
}
