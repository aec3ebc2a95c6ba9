/// The kernel's mount table (/proc/self/mountinfo), read without touching the mounts
/// themselves: a stat of a FUSE mount point would wait for its daemon.
public struct MountEntry: Sendable, Equatable {
    /// "major:minor" of the mounted filesystem (its bdi name for a FUSE mount).
    public var device: String
    public var mountpoint: String
    public var fsType: String
    /// The mount's source: for an xtsfs mount, its CIPHERDIR (the `fsname` option), or
    /// CIPHERDIR#temp and CIPHERDIR#cache for its areas.
    public var source: String = ""

    public static func all() -> [MountEntry] {
        guard let raw = try? Sys.readFile("/proc/self/mountinfo", limit: 16 << 20) else { return [] }
        var out: [MountEntry] = []
        for line in String(decoding: raw, as: UTF8.self).split(separator: "\n") {
            // id parent maj:min root mountpoint options [optional...] - fstype source superoptions
            let f = line.split(separator: " ")
            guard f.count > 4, let dash = f.firstIndex(of: "-"), dash + 1 < f.count else { continue }
            var entry = MountEntry(device: String(f[2]), mountpoint: unescape(String(f[4])), fsType: String(f[dash + 1]))
            if dash + 2 < f.count { entry.source = unescape(String(f[dash + 2])) }
            out.append(entry)
        }
        return out
    }

    /// The FUSE mount on `path`, if any (the last one mounted there).
    public static func fuse(at path: String) -> MountEntry? {
        all().last { $0.mountpoint == path && ($0.fsType == "fuse" || $0.fsType.hasPrefix("fuse.")) }
    }

    /// xtsfs mounts serving `cipherDir` (an absolute path).
    public static func xtsfs(servingCipherDir cipherDir: String) -> [MountEntry] {
        all().filter { $0.fsType == "fuse.xtsfs" && $0.source == cipherDir }
    }

    /// mountinfo writes space, tab, newline and backslash as \ooo (three octal digits).
    static func unescape(_ s: String) -> String {
        let b = Array(s.utf8)
        var out = [UInt8]()
        var i = 0
        while i < b.count {
            if b[i] == UInt8(ascii: "\\"), i + 3 < b.count,
               let v = UInt8(String(decoding: b[i + 1...i + 3], as: UTF8.self), radix: 8) {
                out.append(v)
                i += 4
            } else {
                out.append(b[i])
                i += 1
            }
        }
        return String(decoding: out, as: UTF8.self)
    }
}
