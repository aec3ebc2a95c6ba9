import XTSSystem

/// `xtsfs cache purge CIPHERDIR`.
public enum CachePurge {
    /// Crypto-shreds the cache of an unmounted volume. While a daemon on this machine
    /// serves the cache area it is refused (exit 15): the daemon holds the cache key and
    /// files open in the area.
    @discardableResult
    public static func purge(cipherDir: String) throws(VolumeError) -> Bool {
        let dir = Mounter.absolute(cipherDir)
        if let m = AreaStatus.make(dir).mounts.first(where: { $0.area == Areas.Kind.cache.rawValue }) {
            throw .refused("the cache area of \(dir) is mounted on \(m.mountpoint); unmount the volume first")
        }
        return try Areas.purgeCache(cipherDir: dir)
    }
}
