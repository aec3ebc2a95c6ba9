import CSysShim
import XTSContent
import XTSSystem
#if canImport(Glibc)
import Glibc
#endif

/// The temp and cache areas of a volume, as `xtsfs status` shows them: what is in
/// CIPHERDIR and what this machine has mounted. Never a key.
public struct AreaStatus: Codable, Sendable {
    public struct Mounted: Codable, Sendable {
        /// "data", "temp" or "cache".
        public var area: String
        public var mountpoint: String
    }
    /// Whether `xtsfs.cache.key` exists (the cache survives remounts under it).
    public var cacheKey: Bool
    /// Bytes of ciphertext in `xtsfs.cache` (files only).
    public var cacheBytes: Int64
    /// Whether `xtsfs.temp` exists in CIPHERDIR: a temp area mounted now, or what a crashed
    /// one left (unreadable; removed by the next `--tmp` mount).
    public var tempInCipherDir: Bool
    /// Mounts of this volume and its areas on this machine (from the mount table).
    public var mounts: [Mounted]

    public static func make(_ cipherDir: String) -> AreaStatus {
        let dir = Mounter.absolute(cipherDir)
        let fd = Glibc.open(dir, XTS_O_PATH | O_DIRECTORY | O_CLOEXEC)
        defer { if fd >= 0 { Sys.close(fd) } }
        var cacheKey = false, temp = false
        var bytes: Int64 = 0
        if fd >= 0 {
            cacheKey = (try? Sys.fstatat(fd, BackingEntry.cacheKeyName))?.isRegular ?? false
            temp = (try? Sys.fstatat(fd, BackingEntry.tempAreaName))?.isDirectory ?? false
            bytes = size(fd, BackingEntry.cacheAreaName, depth: 0)
        }
        var mounts: [Mounted] = []
        for e in MountEntry.all() where e.fsType == "fuse.xtsfs" || e.fsType == "fuse" {
            if e.source == dir { mounts.append(Mounted(area: "data", mountpoint: e.mountpoint)) }
            for k in Areas.Kind.allCases where e.source == dir + k.fsnameSuffix {
                mounts.append(Mounted(area: k.rawValue, mountpoint: e.mountpoint))
            }
        }
        return AreaStatus(cacheKey: cacheKey, cacheBytes: bytes, tempInCipherDir: temp, mounts: mounts)
    }

    /// Bytes of the regular files under `name`, never following a symlink.
    static func size(_ dirFD: Int32, _ name: String, depth: Int) -> Int64 {
        guard depth < 256, let st = try? Sys.fstatat(dirFD, name) else { return 0 }
        if st.isRegular { return Int64(st.st_size) }
        guard st.isDirectory, let sub = try? Sys.openPath(dirFD, name, directory: true) else { return 0 }
        defer { Sys.close(sub) }
        return ((try? Sys.listDirectory(sub)) ?? []).reduce(0) { $0 + size(sub, $1.name, depth: depth + 1) }
    }
}
