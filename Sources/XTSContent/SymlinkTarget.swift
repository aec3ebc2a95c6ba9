import XTSKeys
import XTSSystem
#if canImport(Glibc)
import Glibc
#endif

/// A backing symlink target turned back into its plaintext one: the one resolution the
/// mount (readlink, listing identities), fsck and the DEK rekey share. A backing target is
/// either the encoded target itself or `xtsfs.link.HASH`, naming a file of the link store
/// (`CIPHERDIR/xtsfs.links`) that holds it; a stored target is trusted only when it hashes
/// to its name, and is read with a bound (the store is hostile input like the rest of
/// CIPHERDIR). The encoded target opens under at most one key generation (AES-SIV is
/// authenticated); each one held is tried.
public enum SymlinkTarget {
    public enum Failure: Error, CustomStringConvertible {
        /// The link store could not be opened (the error of whoever opened it).
        case storeUnusable(any Error)
        /// The stored target `name` could not be read (missing, too long, not a regular file).
        case storedUnreadable(name: String, SystemError)
        /// The stored target `name` does not hash to its name.
        case storedMismatch(name: String)
        /// No generation opens the encoded target (the first generation's error).
        case undecryptable(NameError?)

        public var description: String {
            switch self {
            case .storeUnusable(let e): return "the link store \(NameCodec.linkStore): \(e)"
            case .storedUnreadable(let name, let e): return "stored symlink target \(name): \(e)"
            case .storedMismatch(let name): return "stored symlink target \(name) does not match its name"
            case .undecryptable(let e): return "symlink target: \(e.map { "\($0)" } ?? "no key")"
            }
        }
    }

    /// Longest stored encoded target read from the link store.
    public static let storedLimit = 3 * NameCodec.maxBackingTarget

    /// The link-store name backing target `raw` refers to; nil when `raw` is the encoded
    /// target itself.
    public static func storedName(_ raw: [UInt8]) -> String? {
        let prefix = Array(NameCodec.storedTargetPrefix.utf8)
        guard raw.count > prefix.count, Array(raw.prefix(prefix.count)) == prefix else { return nil }
        return String(decoding: raw.dropFirst(prefix.count), as: UTF8.self)
    }

    /// The encoded target behind backing target `raw`. `store` gives a descriptor of the link
    /// store (which stays the caller's); it is called only for a stored target.
    public static func encoded(_ raw: [UInt8], store: () throws -> Int32) throws(Failure) -> [UInt8] {
        guard let name = storedName(raw) else { return raw }
        let fd: Int32
        do { fd = try store() } catch { throw .storeUnusable(error) }
        let bytes: [UInt8]
        do { bytes = try Sys.readSmallFile(fd, name, limit: storedLimit) } catch { throw .storedUnreadable(name: name, error) }
        guard NameCodec.storedTargetName(forEncoded: bytes) == name else { throw .storedMismatch(name: name) }
        return bytes
    }

    /// The same, opening the link store under CIPHERDIR's descriptor `root` for the call.
    public static func encoded(_ raw: [UInt8], root: Int32) throws(Failure) -> [UInt8] {
        var opened: Int32 = -1
        defer { if opened >= 0 { Sys.close(opened) } }
        return try encoded(raw) { () throws -> Int32 in
            opened = try Sys.openPath(root, NameCodec.linkStore, directory: true)
            return opened
        }
    }

    /// The plaintext of encoded target `encoded`, under the first of `codecs` that opens it.
    public static func decrypt<S: Sequence>(_ encoded: [UInt8], codecs: S) throws(Failure) -> [UInt8] where S.Element == NameCodec {
        var failure: NameError?
        for c in codecs {
            do { return try c.decryptTarget(encoded) } catch { failure = failure ?? error }
        }
        throw .undecryptable(failure)
    }

    /// Backing target `raw` to plaintext, the link store given by `store` (see `encoded`).
    public static func plain<S: Sequence>(_ raw: [UInt8], store: () throws -> Int32, codecs: S) throws(Failure) -> [UInt8] where S.Element == NameCodec {
        try decrypt(try encoded(raw, store: store), codecs: codecs)
    }

    /// Backing target `raw` to plaintext without a mount (fsck, the rekey): the link store
    /// opened under `root`, each of `keys` tried.
    public static func plain(_ raw: [UInt8], root: Int32, keys: [KeySet]) throws(Failure) -> [UInt8] {
        try decrypt(try encoded(raw, root: root), codecs: keys.lazy.map { NameCodec(keys: $0) })
    }
}
