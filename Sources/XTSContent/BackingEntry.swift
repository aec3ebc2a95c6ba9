import XTSSystem
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
    /// `xtsfs.list`: the directory's listing manifest (volumes with `listingManifests`,
    /// FORMAT.md 12.10); never an entry of the listing it describes.
    case listManifest
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
    /// `xtsfs.hosts`: one presence record per mount, from every host that has the volume
    /// mounted (meaningful in the root directory only).
    case presence
    /// `xtsfs.temp`: the temp area's ciphertext, under its own per-mount key (meaningful
    /// in the root directory only; a mount with `--tmp` empties it).
    case tempArea
    /// `xtsfs.cache`: the cache area's ciphertext, or `xtsfs.cache.purged`: a purged one
    /// being removed (meaningful in the root directory only).
    case cacheArea
    /// `xtsfs.cache.key`: the cache area's key, wrapped under a key derived from the DEK.
    case cacheKey
    /// `NAME.tmp.RANDOM` (16 hex digits; `NAME.tmp` from older versions) of one of our
    /// files: left by an interrupted atomic replacement, or one in progress on another host.
    case temporary(of: String)
    /// `xtsfs.rekey.<H>`: the re-encrypted copy of the entry whose backing name hashes to
    /// `<H>`, made by a DEK rekey and copied over that entry in place (FORMAT.md section 13).
    case rekeyCopy(hash: String)
    /// `xtsfs.rekey-journal`: the checksum journal of the files a DEK rekey is overwriting
    /// in place in this directory (FORMAT.md section 13.1); finished before anything else
    /// reads those files.
    case rekeyJournal
    /// Anything else: not ours (a sync tool's conflict copy, `.DS_Store`, ...).
    case foreign

    static let internalPrefix = "xtsfs."
    static let temporarySuffix = ".tmp"
    /// The audit log directory (XTSVolume's `AuditLog` writes it).
    public static let auditLogName = "xtsfs.audit"
    /// The presence records (XTSVolume's `Presence` writes them).
    public static let presenceName = "xtsfs.hosts"
    /// The temp and cache areas (XTSVolume's `Areas` writes them).
    public static let tempAreaName = "xtsfs.temp"
    public static let cacheAreaName = "xtsfs.cache"
    public static let cacheKeyName = "xtsfs.cache.key"
    /// A cache area being removed after a purge of a mounted cache (its key is gone).
    public static let purgedCacheAreaName = "xtsfs.cache.purged"
    public static let rekeyCopyPrefix = "xtsfs.rekey."
    /// Not a prefix of `rekeyCopyPrefix`'s names: versions that only know copies leave it alone.
    public static let rekeyJournalName = "xtsfs.rekey-journal"

    public static func classify(_ name: String) -> BackingEntry {
        if name.hasPrefix(internalPrefix) {
            if name == DirHeader.fileName { return .directoryHeader }
            if name == ListManifest.fileName { return .listManifest }
            if name == NameCodec.linkStore { return .linkStore }
            if name == auditLogName { return .auditLog }
            if name == presenceName { return .presence }
            if name == tempAreaName { return .tempArea }
            if name == cacheAreaName || name == purgedCacheAreaName { return .cacheArea }
            if name == cacheKeyName { return .cacheKey }
            if name == rekeyJournalName { return .rekeyJournal }
            if let copy = HeaderStore.fileNames.firstIndex(of: name) { return .volumeHeader(copy: copy) }
            if let base = temporaryBase(name) {
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

    /// The name a temporary replaces: `NAME` of `NAME.tmp.` + 16 lowercase hex digits (what
    /// `Sys.temporaryName` makes), or of `NAME.tmp` (older versions); nil for anything else.
    public static func temporaryBase(_ name: String) -> String? {
        if name.hasSuffix(temporarySuffix) { return String(name.dropLast(temporarySuffix.count)) }
        let u = Array(name.utf8)
        let digits = Sys.temporaryRandomDigits, infix = Array(Sys.temporaryInfix.utf8)
        guard u.count > digits + infix.count else { return nil }
        let cut = u.count - digits - infix.count
        guard Array(u[cut..<(cut + infix.count)]) == infix,
              u[(cut + infix.count)...].allSatisfy({ ($0 >= 0x30 && $0 <= 0x39) || ($0 >= 0x61 && $0 <= 0x66) }) else { return nil }
        return String(decoding: u[..<cut], as: UTF8.self)
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
