import XTSContent
import XTSKeys
import XTSSystem
#if canImport(Glibc)
import Glibc
#endif

/// `--tmp DIR [--tmp-backing DIR] --cache DIR [--cache-max SIZE]` of a mount.
public struct AreaOptions: Sendable, Equatable {
    /// Where the temp area is mounted.
    public var temp: String?
    /// Where its ciphertext goes instead of CIPHERDIR (a fast local disk).
    public var tempBacking: String?
    /// Where the cache area is mounted.
    public var cache: String?
    /// Bytes of ciphertext the cache may hold before its least recently used files go.
    public var cacheMax: Int64?

    public init(temp: String? = nil, tempBacking: String? = nil, cache: String? = nil, cacheMax: Int64? = nil) {
        self.temp = temp
        self.tempBacking = tempBacking
        self.cache = cache
        self.cacheMax = cacheMax
    }

    public var mountpoints: [String] { [temp, cache].compactMap { $0 } }

    /// The same options on the daemon child's command line.
    var arguments: [String] {
        var a: [String] = []
        if let temp { a += ["--tmp", temp] }
        if let tempBacking { a += ["--tmp-backing", tempBacking] }
        if let cache { a += ["--cache", cache] }
        if let cacheMax { a += ["--cache-max", String(cacheMax)] }
        return a
    }

    /// `--cache-max` values: bytes, or a number with K, M, G or T (powers of 1024).
    public static func parseSize(_ text: String) -> Int64? {
        let units: [Character: Int64] = ["K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40]
        var t = text.uppercased()
        if t.hasSuffix("IB") { t.removeLast(2) } else if t.hasSuffix("B") { t.removeLast() }
        var factor: Int64 = 1
        if let last = t.last, let f = units[last] { factor = f; t.removeLast() }
        guard let n = Int64(t), n > 0 else { return nil }
        let (v, overflow) = n.multipliedReportingOverflow(by: factor)
        return overflow ? nil : v
    }

    /// Lines for a shell to `eval`: TMPDIR and XDG_CACHE_HOME pointing at the areas.
    public var environmentLines: [String] {
        var out: [String] = []
        if let temp { out.append("TMPDIR=" + shellQuoted(temp)) }
        if let cache { out.append("XDG_CACHE_HOME=" + shellQuoted(cache)) }
        if !out.isEmpty { out.append("export " + [temp.map { _ in "TMPDIR" }, cache.map { _ in "XDG_CACHE_HOME" }].compactMap { $0 }.joined(separator: " ")) }
        return out
    }

    func shellQuoted(_ s: String) -> String {
        "'" + s.replacingAll("'", with: "'\\''") + "'"
    }
}

extension Mounter {
    /// The area options with absolute paths, after the same checks as the data mount point
    /// (and: every mount point distinct, none of them or the temp backing inside another).
    static func preflightAreas(_ req: MountRequest) throws(VolumeError) -> AreaOptions {
        var a = req.areas
        if a.tempBacking != nil && a.temp == nil { throw .usage("--tmp-backing needs --tmp") }
        if a.cacheMax != nil && a.cache == nil { throw .usage("--cache-max needs --cache") }
        a.temp = a.temp.map(absolute)
        a.cache = a.cache.map(absolute)
        a.tempBacking = a.tempBacking.map(absolute)
        let all = [req.mountpoint] + a.mountpoints
        guard Set(all).count == all.count else { throw .usage("the data, --tmp and --cache mount points must be three different directories") }
        for (i, mp) in all.enumerated() {
            for (j, other) in all.enumerated() where i != j {
                if mp.split(separator: "/").starts(with: other.split(separator: "/")) {
                    throw .mountFailed("cannot mount on \(mp): it is inside the mount point \(other)")
                }
            }
        }
        for mp in a.mountpoints {
            try checkOverlap(cipherDir: req.cipherDir, mountpoint: mp)
            try checkMountpoint(mp, allowNonEmpty: req.options.contains("nonempty"))
            try checkOverlapByIdentity(cipherDir: req.cipherDir, mountpoint: mp)
        }
        if let b = a.tempBacking {
            guard let st = try? Sys.lstat(b), st.isDirectory else { throw .mountFailed("--tmp-backing \(b): not a directory") }
            for mp in all where b.split(separator: "/").starts(with: mp.split(separator: "/")) {
                throw .mountFailed("--tmp-backing \(b) is inside the mount point \(mp): the daemon would wait for itself")
            }
        }
        return a
    }

    /// Prepares the temp and cache areas asked for (before any mount is made).
    static func prepareAreas(_ req: MountRequest, keys: KeySet, log: @escaping @Sendable (String) -> Void) throws(VolumeError) -> [Areas.Prepared] {
        var out: [Areas.Prepared] = []
        do {
            if let t = req.areas.temp {
                out.append(try Areas.prepareTemp(cipherDir: req.cipherDir, backing: req.areas.tempBacking, mountpoint: t))
            }
            if let c = req.areas.cache {
                out.append(try Areas.prepareCache(cipherDir: req.cipherDir, volumeKeys: keys, mountpoint: c, log: log))
            }
        } catch {
            finishAreas(out, log: log)
            throw error
        }
        return out
    }

    /// After serving: the temp area's ciphertext is removed and its key wiped (the key was
    /// never written anywhere); descriptors closed.
    static func finishAreas(_ areas: [Areas.Prepared], log: (String) -> Void) {
        for a in areas {
            Sys.close(a.rootFD)
            if a.kind == .temp {
                Areas.remove(a, log: log)
                a.keys.wipe()
            }
            Sys.close(a.parentFD)
        }
    }

    /// The areas' mount points that belong to the volume whose data area is mounted on
    /// `mountpoint`, from the mount table (their fsname is CIPHERDIR#temp, CIPHERDIR#cache).
    static func areaMounts(ofDataMount mountpoint: String) -> [MountEntry] {
        guard let data = MountEntry.fuse(at: mountpoint) else { return [] }
        let names = Set(Areas.Kind.allCases.map { data.source + $0.fsnameSuffix })
        return MountEntry.all().filter { ($0.fsType == "fuse.xtsfs" || $0.fsType == "fuse") && names.contains($0.source) }
    }
}

extension KeySet {
    /// Zeroes every key of the set now, not when the last reference goes: for a key that
    /// must not outlive its mount (the temp area's). The set is unusable afterwards.
    func wipe() {
        for s in [dek, contentKey, nameKey, metadataMACKey, headerMACKey] {
            s.withUnsafeMutableBytes { p in
                if let base = p.baseAddress { LockedBuffer.wipe(base, p.count) }
            }
        }
    }
}
