import XTSCrypto
import XTSFormat
import XTSKeys
import XTSSystem
#if canImport(Glibc)
import Glibc
#endif

/// Listing manifests (FORMAT.md 12.10): what an entry of a backing directory is, for its
/// element, and the accumulator of a whole backing directory as it is on disk. Shared by
/// the mount (its recovery after a crash), fsck and the DEK rekey, so that all three
/// compute one thing.
public enum ListingIdentity {
    /// The `DT_*` type of a backing object.
    public static func type(_ st: stat) -> UInt8 { UInt8(truncatingIfNeeded: (st.st_mode & S_IFMT) >> 12) }

    /// The file ID stored in the header of regular file `name` in `dirfd` (read raw: the
    /// header's MAC is checked by whoever reads the file; a header whose MAC fails makes
    /// the file EIO anyway). nil when the file has no header (0 bytes, or 64 zero bytes),
    /// or is not a regular file.
    public static func fileID(_ dirfd: Int32, _ name: String) -> [UInt8]? {
        guard let fd = try? Sys.openat(dirfd, name, O_RDONLY | O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC) else { return nil }
        defer { Sys.close(fd) }
        return fileID(fd: fd)
    }

    /// The same, of an open backing file.
    public static func fileID(fd: Int32) -> [UInt8]? {
        guard let st = try? Sys.fstat(fd), st.st_mode & S_IFMT == S_IFREG else { return nil }
        var raw = [UInt8](repeating: 0, count: IntegrityFileHeader.length)
        let n = raw.withUnsafeMutableBytes { (try? Sys.pread(fd, $0.baseAddress!, $0.count, 0)) ?? -1 }
        guard n == IntegrityFileHeader.length, !raw.allSatisfy({ $0 == 0 }) else { return nil }
        return Array(raw[32..<48])
    }

    /// The directory ID in the `xtsfs.dir` of subdirectory `name` of `dirfd` (raw; its
    /// MAC is checked when the directory is used). nil when it has none.
    public static func directoryID(_ dirfd: Int32, _ name: String) -> [UInt8]? {
        guard let fd = try? Sys.openPath(dirfd, name, directory: true) else { return nil }
        defer { Sys.close(fd) }
        return directoryID(pinned: fd)
    }

    public static func directoryID(pinned fd: Int32) -> [UInt8]? {
        guard let bytes = try? Sys.readSmallFile(fd, DirHeader.fileName, limit: 4096), bytes.count == DirHeader.length else { return nil }
        return Array(bytes[16..<32])
    }

    /// Whether `name` in `dirfd` (attributes `st`) is a directory that holds nothing but, at
    /// most, a listing manifest: no `xtsfs.dir`, no entries. A mkdir cut off before its
    /// header was written, or an rmdir cut off after it removed the header, leaves one.
    public static func isBareDirectory(_ dirfd: Int32, _ name: String, _ st: stat) -> Bool {
        guard st.st_mode & S_IFMT == S_IFDIR, let fd = try? Sys.openPath(dirfd, name, directory: true) else { return false }
        defer { Sys.close(fd) }
        guard let entries = try? Sys.listDirectory(fd) else { return false }
        return entries.allSatisfy { $0.name == ListManifest.fileName }
    }

    /// The identity of entry `name` in `dirfd`, whose attributes are `st`. `target` turns a
    /// symlink's backing target into its plaintext one (nil: it does not decrypt).
    public static func identity(_ dirfd: Int32, _ name: String, _ st: stat, target: ([UInt8]) -> [UInt8]?) -> [UInt8]? {
        switch st.st_mode & S_IFMT {
        case S_IFREG: return fileID(dirfd, name)
        case S_IFDIR: return directoryID(dirfd, name)
        case S_IFLNK:
            guard let raw = try? Sys.readlinkat(dirfd, name), let plain = target(raw) else { return nil }
            return ListingElement.identity(symlinkTarget: plain)
        case S_IFCHR, S_IFBLK: return ListingElement.identity(rdev: UInt64(st.st_rdev))
        default: return ListingElement.zero
        }
    }
}

/// A backing directory's accumulator, computed from its entries as they are.
public struct ListingScan {
    public struct Entry {
        public var backing: String
        public var name: [UInt8]
        public var st: stat
    }
    /// XOR of the elements of every entry that decrypts and has an identity, under each
    /// element key asked for (the first is `accumulator`).
    public var accumulators: [[UInt8]] = []
    public var accumulator: [UInt8] { accumulators.first ?? ListingElement.zero }
    /// Entries that decrypt but have no identity: a regular file without a header (an
    /// interrupted create, or damage), a subdirectory without `xtsfs.dir`, a symlink whose
    /// target does not decrypt.
    public var unidentified: [Entry] = []
    /// Encrypted names that decrypt under no generation held (reported by fsck as such;
    /// the mount does not list them): not part of the accumulator.
    public var undecryptable: [String] = []
    public var count = 0

    /// Scans `dirfd` (directory ID `directoryID`); names are tried under each of `codecs`;
    /// elements are computed under `elementKey` (the manifest's generation).
    public static func scan(_ dirfd: Int32, directoryID: [UInt8], codecs: [NameCodec], elementKey: SecretBytes,
                            target: ([UInt8]) -> [UInt8]?) throws -> ListingScan {
        try scan(dirfd, directoryID: directoryID, codecs: codecs, elementKeys: [elementKey], target: target)
    }

    public static func scan(_ dirfd: Int32, directoryID: [UInt8], codecs: [NameCodec], elementKeys: [SecretBytes],
                            target: ([UInt8]) -> [UInt8]?) throws -> ListingScan {
        var out = ListingScan()
        out.accumulators = elementKeys.map { _ in ListingElement.zero }
        for e in try Sys.listDirectory(dirfd) {
            let encoded: String
            switch BackingEntry.classify(e.name) {
            case .encryptedName(let n): encoded = n
            case .longName(let entry):
                guard let full = try? Sys.readSmallFile(dirfd, entry + NameCodec.longSuffix, limit: 4096),
                      NameCodec.longEntryName(forEncoded: full) == entry else { out.undecryptable.append(e.name); continue }
                encoded = String(decoding: full, as: UTF8.self)
            default: continue
            }
            var plain: [UInt8]?
            for c in codecs { if let p = try? c.decrypt(encoded, directoryID: directoryID) { plain = p; break } }
            guard let plain else { out.undecryptable.append(e.name); continue }
            guard let st = try? Sys.fstatat(dirfd, e.name) else { continue }
            guard let id = ListingIdentity.identity(dirfd, e.name, st, target: target) else {
                out.unidentified.append(Entry(backing: e.name, name: plain, st: st))
                continue
            }
            for (i, k) in elementKeys.enumerated() {
                let p = try ListingElement.element(key: k, directoryID: directoryID, type: ListingIdentity.type(st), name: plain, identity: id)
                out.accumulators[i] = ListingElement.xor(out.accumulators[i], p)
            }
            out.count += 1
        }
        return out
    }
}
