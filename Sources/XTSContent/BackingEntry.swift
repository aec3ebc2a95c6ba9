import XTSCrypto
import XTSFormat

/// What a name found in a backing directory is. CIPHERDIR is hostile input: anything may
/// appear in it, so every reader of a backing directory (readdir, fsck, rekey) classifies
/// names here, in one place, instead of testing prefixes of its own.
public enum BackingEntry: Equatable, Sendable {
    /// `xtsfs.header` or `xtsfs.header2` (meaningful in the root directory only).
    case volumeHeader(copy: Int)
    /// `xtsfs.dir`: the directory's ID and key generation.
    case directoryHeader
    /// An encrypted name, used as is.
    case encryptedName(String)
    /// `xtsfs.long.HASH`: an entry whose encrypted name is in its side file.
    case longName(String)
    /// `xtsfs.long.HASH.name`: the side file holding the encrypted name of `longName`.
    case longNameRecord(entry: String)
    /// `xtsfs.links`: long symlink targets, by hash (meaningful in the root directory only).
    case linkStore
    /// `xtsfs.audit`: the audit log of key operations, one JSON-lines file per host
    /// (meaningful in the root directory only).
    case auditLog
    /// `NAME.tmp` of one of our files: left by an interrupted atomic replacement.
    case temporary(of: String)
    /// `xtsfs.rekey.<H>`: the re-encrypted copy of the entry whose backing name hashes to
    /// `<H>`, made by a DEK rekey and copied over that entry in place (FORMAT.md section 12).
    case rekeyCopy(hash: String)
    /// Anything else: not ours (a sync tool's conflict copy, `.DS_Store`, ...).
    case foreign

    static let internalPrefix = "xtsfs."
    static let temporarySuffix = ".tmp"
    /// The audit log directory (XTSVolume's `AuditLog` writes it).
    public static let auditLogName = "xtsfs.audit"
    public static let rekeyCopyPrefix = "xtsfs.rekey."

    public static func classify(_ name: String) -> BackingEntry {
        if name.hasPrefix(internalPrefix) {
            if name == DirHeader.fileName { return .directoryHeader }
            if name == NameCodec.linkStore { return .linkStore }
            if name == auditLogName { return .auditLog }
            if let copy = HeaderStore.fileNames.firstIndex(of: name) { return .volumeHeader(copy: copy) }
            if name.hasSuffix(temporarySuffix) {
                let base = String(name.dropLast(temporarySuffix.count))
                return classify(base) == .foreign ? .foreign : .temporary(of: base)
            }
            if name.hasPrefix(rekeyCopyPrefix) {
                let rest = name.dropFirst(rekeyCopyPrefix.count)
                return isHash(rest) ? .rekeyCopy(hash: String(rest)) : .foreign
            }
            if name.hasPrefix(NameCodec.longPrefix) {
                var rest = Substring(name.dropFirst(NameCodec.longPrefix.count))
                let record = rest.hasSuffix(NameCodec.longSuffix)
                if record { rest = rest.dropLast(NameCodec.longSuffix.count) }
                guard isHash(rest) else { return .foreign }
                let entry = NameCodec.longPrefix + rest
                return record ? .longNameRecord(entry: entry) : .longName(entry)
            }
            return .foreign
        }
        return isEncodedName(name) ? .encryptedName(name) : .foreign
    }

    /// The base64url SHA-256 of a long name: 43 characters.
    static func isHash(_ s: Substring) -> Bool {
        s.utf8.count == 43 && s.utf8.allSatisfy(Base64URL.isAlphabet)
    }

    /// Shape of an encrypted short name: base64url without padding, of a 32-byte or
    /// longer SIV output (tag and at least one padded block).
    static func isEncodedName(_ s: String) -> Bool {
        let n = s.utf8.count
        return n >= 43 && n <= NameCodec.maxBackingName && s.utf8.allSatisfy(Base64URL.isAlphabet)
    }
}
