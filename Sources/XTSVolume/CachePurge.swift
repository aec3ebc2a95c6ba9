import XTSSystem

/// `xtsfs cache purge CIPHERDIR`.
public enum CachePurge {
    /// Crypto-shreds the cache. While a daemon on this machine serves the cache area, it
    /// is asked to (it holds the key and serves the files): it switches to a fresh key and
    /// an empty area. Otherwise the key file and the ciphertext are deleted here.
    @discardableResult
    public static func purge(cipherDir: String) throws(VolumeError) -> Bool {
        let dir = Mounter.absolute(cipherDir)
        _ = try Volume.load(dir)
        if AreaStatus.make(dir).mounts.contains(where: { $0.area == Areas.Kind.cache.rawValue }) {
            try CacheControl.requestPurge(cipherDir: dir)
            return true
        }
        return try Areas.purgeCache(cipherDir: dir)
    }
}
