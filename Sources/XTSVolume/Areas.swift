import CSysShim
import XTSContent
import XTSCrypto
import XTSFormat
import XTSKeys
import XTSSystem
#if canImport(Glibc)
import Glibc
#endif

/// The temp and cache areas: the same encrypted filesystem as the data area, each under a
/// key of its own and a backing directory of its own, mounted by the same daemon.
///
/// - Temp (`xtsfs.temp`, or `xtsfs.temp.VOLUMEID` under `--tmp-backing DIR`): a random key
///   made at mount, held only in locked memory and never written; the backing directory is
///   removed and made anew at mount and removed at unmount. What a crash leaves is
///   ciphertext under a key that died with the daemon, removed by the next `--tmp` mount.
/// - Cache (`xtsfs.cache`): its key is stored in `xtsfs.cache.key`, wrapped (RFC 5649)
///   under a key derived from the DEK, so it survives remounts. `cache purge` deletes that
///   file (crypto-shredding), then the ciphertext. A key file that does not unwrap (the
///   DEK was rekeyed, the file was damaged or planted) purges the cache at the next mount:
///   a cache is disposable, never worth refusing a mount over.
///
/// The cache key file is not the volume header: mounts still never write a header copy.
/// A `--cache` mount writes `xtsfs.cache.key` (atomically, in its own file) when there is
/// none or the one there does not unwrap; nothing else a mount writes is a key.
public enum Areas {
    public enum Kind: String, Sendable, CaseIterable {
        case temp, cache
        /// Appended to CIPHERDIR in the mount's fsname, so `unmount` and `status` find the
        /// areas of a volume in the mount table.
        public var fsnameSuffix: String { "#" + rawValue }
    }

    /// An area ready to serve: its backing directory pinned (O_PATH), its keys.
    struct Prepared {
        var kind: Kind
        var mountpoint: String
        var keys: KeySet
        /// The directory the backing directory is in, and its name there.
        var parentFD: Int32
        var name: String
        /// The backing directory itself: the filesystem is opened through /proc/self/fd/N,
        /// so a name swapped in CIPHERDIR after the check cannot redirect it.
        var rootFD: Int32
        var rootPath: String { "/proc/self/fd/\(rootFD)" }
    }

    static let cacheWrapLabel: [UInt8] = Array("xtsfs v1 cache key wrap".utf8)
    static let areaKeyGeneration: UInt32 = 1

    /// The backing directory name of the temp area: in CIPHERDIR it is `xtsfs.temp`; in a
    /// directory given with `--tmp-backing`, which several volumes may share, it carries
    /// the volume ID.
    public static func tempName(volumeID: [UInt8], external: Bool) -> String {
        external ? BackingEntry.tempAreaName + "." + volumeID.map { String($0, radix: 16).leftPadded(2) }.joined() : BackingEntry.tempAreaName
    }

    // MARK: - temp

    /// A fresh, empty temp area under a new random key: whatever was there (a crashed
    /// mount's ciphertext) is removed first.
    static func prepareTemp(cipherDir: String, backing: String?, mountpoint: String) throws(VolumeError) -> Prepared {
        let volumeID = try Volume.load(cipherDir).newest.volumeID
        let parent = backing ?? cipherDir
        let name = tempName(volumeID: volumeID, external: backing != nil)
        let parentFD: Int32
        do { parentFD = try Sys.open(parent, XTS_O_PATH | O_DIRECTORY | O_CLOEXEC) } catch {
            throw .mountFailed("temp area: cannot open \(parent): \(error)")
        }
        let keys: KeySet
        do { keys = try KeySet.generate(generation: areaKeyGeneration, volumeID: try Random.bytes(16)) } catch {
            Sys.close(parentFD)
            throw .failure("temp area: cannot make its key: \(error)")
        }
        do {
            let root = try fresh(parentFD, name, keys: keys)
            return Prepared(kind: .temp, mountpoint: mountpoint, keys: keys, parentFD: parentFD, name: name, rootFD: root)
        } catch {
            Sys.close(parentFD)
            throw .mountFailed("temp area: cannot prepare \(parent)/\(name): \(error)")
        }
    }

    // MARK: - cache

    /// The cache area under its stored key, or a new key and an empty area when there is
    /// no usable key (first `--cache` mount, after `cache purge`, after a DEK rekey).
    static func prepareCache(cipherDir: String, volumeKeys: KeySet, mountpoint: String, log: (String) -> Void) throws(VolumeError) -> Prepared {
        let parentFD: Int32
        do { parentFD = try Sys.open(cipherDir, XTS_O_PATH | O_DIRECTORY | O_CLOEXEC) } catch {
            throw .mountFailed("cache area: cannot open \(cipherDir): \(error)")
        }
        let name = BackingEntry.cacheAreaName
        do {
            if let keys = try loadCacheKey(parentFD, volumeKeys: volumeKeys, log: log) {
                if let root = try? Sys.openPath(parentFD, name, directory: true) {
                    if (try? checkRoot(root, keys: keys)) != nil {
                        return Prepared(kind: .cache, mountpoint: mountpoint, keys: keys, parentFD: parentFD, name: name, rootFD: root)
                    }
                    Sys.close(root)
                    log("cache area: \(name) does not verify under the cache key; starting an empty cache")
                }
                let root = try fresh(parentFD, name, keys: keys)
                return Prepared(kind: .cache, mountpoint: mountpoint, keys: keys, parentFD: parentFD, name: name, rootFD: root)
            }
            let (keys, root) = try newCache(parentFD, volumeKeys: volumeKeys)
            return Prepared(kind: .cache, mountpoint: mountpoint, keys: keys, parentFD: parentFD, name: name, rootFD: root)
        } catch let e as VolumeError {
            Sys.close(parentFD)
            throw e
        } catch {
            Sys.close(parentFD)
            throw .mountFailed("cache area: \(error)")
        }
    }

    /// A new cache key, its key file, and an empty area under it. Nothing in an old area
    /// can be read without its key: it is removed before the new key exists, so no crash
    /// leaves old ciphertext beside a key.
    static func newCache(_ parentFD: Int32, volumeKeys: KeySet) throws -> (KeySet, Int32) {
        try removeTree(parentFD, BackingEntry.cacheAreaName)
        try removeTree(parentFD, BackingEntry.purgedCacheAreaName)
        let cacheID = try Random.bytes(16)
        let keys = try KeySet.generate(generation: areaKeyGeneration, volumeID: cacheID)
        let file = try CacheKeyFile(cacheID: cacheID, wrapped: KeyWrap.wrap(keys.dek, kek: wrappingKey(volumeKeys, cacheID: cacheID)))
        try Sys.atomicWrite(file.encode(), at: parentFD, BackingEntry.cacheKeyName, mode: 0o600)
        return (keys, try fresh(parentFD, BackingEntry.cacheAreaName, keys: keys))
    }

    /// Deletes the cache key file (and a leftover replacement) and syncs the directory:
    /// from then on the cache's ciphertext cannot be read.
    static func discardCacheKey(_ parentFD: Int32) throws(SystemError) -> Bool {
        var had = false
        let leftovers = ((try? Sys.listDirectory(parentFD)) ?? []).map(\.name).filter { BackingEntry.temporaryBase($0) == BackingEntry.cacheKeyName }
        for name in [BackingEntry.cacheKeyName] + leftovers {
            if (try? Sys.fstatat(parentFD, name)) != nil {
                had = true
                do { try Sys.unlinkat(parentFD, name) } catch { if error.errno != ENOENT { throw error } }
            }
        }
        try Sys.fsyncDirectory(parentFD)
        return had
    }

    static func wrappingKey(_ volumeKeys: KeySet, cacheID: [UInt8]) throws(CryptoError) -> SecretBytes {
        try HKDF.derive(key: volumeKeys.dek, salt: [], info: cacheWrapLabel + cacheID, count: 32)
    }

    /// The cache's keys from `xtsfs.cache.key`, or nil when there is none or it does not
    /// unwrap under this DEK (said in the log).
    static func loadCacheKey(_ parentFD: Int32, volumeKeys: KeySet, log: (String) -> Void) throws -> KeySet? {
        let bytes: [UInt8]
        do { bytes = try Sys.readSmallFile(parentFD, BackingEntry.cacheKeyName, limit: 4096) } catch {
            if error.errno != ENOENT { log("cache area: \(BackingEntry.cacheKeyName) unreadable (\(error)); starting an empty cache") }
            return nil
        }
        guard let file = CacheKeyFile.decode(bytes) else {
            log("cache area: \(BackingEntry.cacheKeyName) is damaged; starting an empty cache")
            return nil
        }
        do {
            let key = try KeyWrap.unwrap(file.wrapped, kek: wrappingKey(volumeKeys, cacheID: file.cacheID))
            return try KeySet(dek: key, generation: areaKeyGeneration, volumeID: file.cacheID)
        } catch {
            log("cache area: \(BackingEntry.cacheKeyName) does not open under this volume key (rekeyed, or not ours); starting an empty cache")
            return nil
        }
    }

    /// Crypto-shreds the cache: the key file goes first (once it is gone and the directory
    /// synced, the ciphertext is unreadable, however large), then the ciphertext.
    /// Returns whether there was a cache.
    @discardableResult
    public static func purgeCache(cipherDir: String) throws(VolumeError) -> Bool {
        _ = try Volume.load(cipherDir)
        let parentFD: Int32
        do { parentFD = try Sys.open(cipherDir, XTS_O_PATH | O_DIRECTORY | O_CLOEXEC) } catch {
            throw .failure("cannot open \(cipherDir): \(error)")
        }
        defer { Sys.close(parentFD) }
        var had = false
        do {
            had = try discardCacheKey(parentFD)
            if (try? Sys.fstatat(parentFD, BackingEntry.cacheAreaName)) != nil { had = true }
            try removeTree(parentFD, BackingEntry.cacheAreaName)
            try removeTree(parentFD, BackingEntry.purgedCacheAreaName)
            try Sys.fsyncDirectory(parentFD)
        } catch {
            throw .failure("cache purge: \(error)")
        }
        return had
    }

    // MARK: - backing directories

    /// Removes `name` in `parentFD` and make it anew, empty, with a root directory header
    /// under `keys`; returns an O_PATH descriptor of it.
    static func fresh(_ parentFD: Int32, _ name: String, keys: KeySet) throws -> Int32 {
        try removeTree(parentFD, name)
        try Sys.mkdirat(parentFD, name, 0o700)
        let root = try Sys.openPath(parentFD, name, directory: true)
        do {
            try Sys.atomicWrite(DirHeader.random(keyGeneration: areaKeyGeneration).encode(macKey: keys.metadataMACKey), at: root, DirHeader.fileName, mode: 0o444)
            try Sys.fsyncDirectory(parentFD)
        } catch {
            Sys.close(root)
            throw error
        }
        return root
    }

    static func checkRoot(_ root: Int32, keys: KeySet) throws {
        let bytes = try Sys.readSmallFile(root, DirHeader.fileName, limit: 4096)
        _ = try DirHeader.decode(bytes, macKey: keys.metadataMACKey)
    }

    /// Removes `name` in `dirFD` and everything under it, never following a symlink: each
    /// directory is opened from its parent's descriptor with O_NOFOLLOW. A missing entry is
    /// fine. Directories made unwritable by their owner are made writable first.
    public static func removeTree(_ dirFD: Int32, _ name: String, depth: Int = 0) throws(SystemError) {
        let st: stat
        do { st = try Sys.fstatat(dirFD, name) } catch {
            if error.errno == ENOENT { return }
            throw error
        }
        guard st.isDirectory else {
            do { try Sys.unlinkat(dirFD, name) } catch { if error.errno != ENOENT { throw error } }
            return
        }
        guard depth < 4096 else { throw SystemError(ELOOP, "remove \(name): too deep") }
        let sub = try Sys.openPath(dirFD, name, directory: true)
        defer { Sys.close(sub) }
        if st.st_mode & 0o300 != 0o300 { _ = try? Sys.fchmod(pinned: sub, st.st_mode | 0o700) }
        for e in try Sys.listDirectory(sub) {
            try removeTree(sub, e.name, depth: depth + 1)
        }
        do { try Sys.unlinkat(dirFD, name, directory: true) } catch { if error.errno != ENOENT { throw error } }
    }

    /// Removes an area's backing directory (temp at unmount); logs a failure.
    static func remove(_ area: Prepared, log: (String) -> Void) {
        do {
            try removeTree(area.parentFD, area.name)
            try Sys.fsyncDirectory(area.parentFD)
        } catch {
            log("\(area.kind.rawValue) area: cannot remove its ciphertext \(area.name): \(error)")
        }
    }
}

/// `xtsfs.cache.key` (96 bytes):
///
///     magic "XTSFSCK1" | cache ID [16] | the 64-byte cache key wrapped (RFC 5649) [72]
///
/// The wrapping key is HKDF-SHA256(DEK, salt: none, info: "xtsfs v1 cache key wrap" ||
/// cache ID), 32 bytes. The cache ID is the salt of the cache's subkeys, as the volume ID
/// is of the volume's.
struct CacheKeyFile {
    static let magic: [UInt8] = Array("XTSFSCK1".utf8)
    static let wrappedLength = 72
    static let length = 8 + 16 + wrappedLength
    var cacheID: [UInt8]
    var wrapped: [UInt8]

    func encode() -> [UInt8] { CacheKeyFile.magic + cacheID + wrapped }

    static func decode(_ bytes: [UInt8]) -> CacheKeyFile? {
        guard bytes.count == length, Array(bytes[0..<8]) == magic else { return nil }
        return CacheKeyFile(cacheID: Array(bytes[8..<24]), wrapped: Array(bytes[24...]))
    }
}

extension String {
    func leftPadded(_ n: Int) -> String { count >= n ? self : String(repeating: "0", count: n - count) + self }
}
