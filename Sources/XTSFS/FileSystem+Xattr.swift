import CSysShim
import XTSContent
import XTSKeys
import XTSSystem
#if canImport(Glibc)
import Glibc
#endif

/// Extended attributes. `user.*` are stored encrypted in the backing object's own `user.`
/// attributes (EOPNOTSUPP where the backing filesystem has none). Other namespaces are
/// not supported (EOPNOTSUPP), without a backing call: `ls -l` asks for two of them.
extension FileSystem {
    /// setxattr's XATTR_CREATE and XATTR_REPLACE; both at once behave as on ext4 (an
    /// existing attribute is EEXIST, a missing one ENODATA): the backing filesystem decides.
    public struct XattrFlags: OptionSet, Sendable {
        public let rawValue: Int32
        public init(rawValue: Int32) { self.rawValue = rawValue }
        public static let create = XattrFlags(rawValue: XTS_XATTR_CREATE)
        public static let replace = XattrFlags(rawValue: XTS_XATTR_REPLACE)
    }

    var xattrs: XattrCodec { XattrCodec(keys: keys) }

    /// The backing name of a plaintext attribute name under `keys`; nil for names outside `user.`.
    private func backingXattrName(_ name: [UInt8], _ keys: KeySet) throws(FSError) -> String? {
        // A namespace with no name in it, as ext4 answers it.
        if name == Array(XattrCodec.namespace.utf8) { throw .invalidArgument }
        do { return try XattrCodec(keys: keys).encryptName(name) } catch {
            // The kernel says ERANGE for a name too long for the filesystem.
            if case .tooLong = error { throw .outOfRange }
            throw FSError(error)
        }
    }

    /// The backing names of `name` under the generations older than the newest (in the
    /// middle of a DEK rekey; none otherwise).
    private func olderXattrNames(_ name: [UInt8], _ ring: KeyGenerations) -> [String] {
        ring.older.compactMap { try? backingXattrName(name, $0) ?? nil }
    }

    private static func readXattr(_ fd: Int32, _ backing: String) throws(SystemError) -> [UInt8] {
        while true {
            let need = try Sys.getxattr(pinned: fd, backing, into: UnsafeMutableRawBufferPointer(start: nil, count: 0))
            var buf = [UInt8](repeating: 0, count: need)
            do throws(SystemError) {
                let n = try buf.withMutableBytes { (p) throws(SystemError) -> Int in try Sys.getxattr(pinned: fd, backing, into: p) }
                return Array(buf.prefix(n))
            } catch where error.errno == ERANGE {
                continue  // grew since we asked
            }
        }
    }

    /// The value of `name`. Outside `user.` the answer is EOPNOTSUPP, as from a
    /// filesystem without security labels or ACLs (ext4 mounted `noacl` answers so for
    /// ACLs), not ENODATA: `ls -l` then remembers, for the whole filesystem, that there
    /// are no labels or ACLs to ask for, instead of asking for both of every entry (two
    /// FUSE round trips each). The kernel takes it as "no capabilities" on write.
    /// In the middle of a rekey the attribute may be stored under the name of an older
    /// generation; its value says which generation sealed it.
    public func getxattr(_ id: UInt64, name: [UInt8]) throws(FSError) -> [UInt8] {
        let ring = self.ring
        guard let backing = try backingXattrName(name, ring.newest) else { throw .notSupported }
        let candidates = [backing] + olderXattrNames(name, ring)
        let (stored, found) = try withXattrTarget(id) { (fd) throws(SystemError) -> ([UInt8], String) in
            for (i, b) in candidates.enumerated() {
                do throws(SystemError) { return (try FileSystem.readXattr(fd, b), b) } catch where error.errno == ENODATA && i < candidates.count - 1 {
                    continue
                }
            }
            throw SystemError(ENODATA, "getxattr")
        }
        let generation = stored.count >= 5 ? UInt32(stored[1]) | UInt32(stored[2]) << 8 | UInt32(stored[3]) << 16 | UInt32(stored[4]) << 24 : 0
        do { return try XattrCodec(keys: ring.keys(generation) ?? ring.newest).decryptValue(stored, backingName: found) } catch {
            throw .damaged("extended attribute value of node \(id): \(error)")
        }
    }

    /// (Under the namespace lock: see `setxattr` in FileSystem+Rekey.swift.)
    func setxattrUnlocked(_ id: UInt64, name: [UInt8], value: [UInt8], flags: XattrFlags) throws(FSError) {
        try checkWritable()
        let ring = self.ring
        guard let backing = try backingXattrName(name, ring.newest) else {
            // No security labels, ACLs or trusted attributes are kept (ext4 without them).
            throw .notSupported
        }
        guard value.count <= XattrCodec.maxValue else { throw .tooBig }
        let stored: [UInt8]
        do { stored = try XattrCodec(keys: ring.newest).encryptValue(value, backingName: backing) } catch { throw .damaged("\(error)") }
        let older = olderXattrNames(name, ring)
        try withXattrTarget(id) { (fd) throws(SystemError) in
            // The attribute of an older generation is this one: it counts for CREATE and
            // REPLACE, and goes once the newest is set.
            let olderThere = older.filter { (try? Sys.getxattr(pinned: fd, $0, into: UnsafeMutableRawBufferPointer(start: nil, count: 0))) != nil }
            var f = flags
            if !olderThere.isEmpty {
                if f.contains(.create) { throw SystemError(EEXIST, "setxattr") }
                f.remove(.replace)
            }
            try Sys.setxattr(pinned: fd, backing, stored, flags: f.rawValue)
            for b in olderThere { _ = try? Sys.removexattr(pinned: fd, b) }
        }
    }

    public func listxattr(_ id: UInt64) throws(FSError) -> [[UInt8]] {
        let all = try withXattrTarget(id) { (fd) throws(SystemError) -> [String] in
            do throws(SystemError) { return try Sys.listxattr(pinned: fd) } catch where error.errno == EOPNOTSUPP { return [] }
        }
        // Attributes that are not ours (or do not decrypt) are not listed.
        let codecs = ring.all.map { XattrCodec(keys: $0) }
        if codecs.count == 1 { return all.compactMap { codecs[0].decryptName($0) } }
        // Mid-rekey, one attribute may briefly be there under two generations' names.
        var seen = Set<[UInt8]>()
        return all.compactMap { b in codecs.lazy.compactMap { $0.decryptName(b) }.first }.filter { seen.insert($0).inserted }
    }

    /// (Under the namespace lock: see `removexattr` in FileSystem+Rekey.swift.)
    func removexattrUnlocked(_ id: UInt64, name: [UInt8]) throws(FSError) {
        try checkWritable()
        let ring = self.ring
        guard let backing = try backingXattrName(name, ring.newest) else { throw .notSupported }
        let older = olderXattrNames(name, ring)
        try withXattrTarget(id) { (fd) throws(SystemError) in
            var removed = false
            var lastError = SystemError(ENODATA, "removexattr")
            for b in [backing] + older {
                do throws(SystemError) { try Sys.removexattr(pinned: fd, b); removed = true } catch {
                    if error.errno != ENODATA { lastError = error }
                }
            }
            if !removed { throw lastError }
        }
    }

    /// Runs `body` on the node's pinned object, or on an open handle of an unlinked one.
    private func withXattrTarget<R>(_ id: UInt64, _ body: (Int32) throws(SystemError) -> R) throws(FSError) -> R {
        func run(_ fd: Int32) throws(FSError) -> R {
            do { return try body(fd) } catch {
                switch error.errno {
                case ENODATA: throw .noAttribute
                case ENOTSUP: throw .notSupported
                case E2BIG: throw .tooBig
                case ERANGE: throw .outOfRange
                default: throw .system(error)
                }
            }
        }
        do {
            return try withPinned(id) { (fd, _) throws(FSError) in try run(fd) }
        } catch {
            guard case .notFound = error, let f = anyOpenFile(of: id) else { throw error }
            return try run(f.fd)
        }
    }
}
