import CSysShim
import XTSContent
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

    /// The backing name of a plaintext attribute name; nil for names outside `user.`.
    private func backingXattrName(_ name: [UInt8]) throws(FSError) -> String? {
        // A namespace with no name in it, as ext4 answers it.
        if name == Array(XattrCodec.namespace.utf8) { throw .invalidArgument }
        do { return try xattrs.encryptName(name) } catch {
            // The kernel says ERANGE for a name too long for the filesystem.
            if case .tooLong = error { throw .outOfRange }
            throw FSError(error)
        }
    }

    /// The value of `name`. Outside `user.` the answer is EOPNOTSUPP, as from a
    /// filesystem without security labels or ACLs (ext4 mounted `noacl` answers so for
    /// ACLs), not ENODATA: `ls -l` then remembers, for the whole filesystem, that there
    /// are no labels or ACLs to ask for, instead of asking for both of every entry (two
    /// FUSE round trips each). The kernel takes it as "no capabilities" on write.
    public func getxattr(_ id: UInt64, name: [UInt8]) throws(FSError) -> [UInt8] {
        guard let backing = try backingXattrName(name) else { throw .notSupported }
        let stored = try withXattrTarget(id) { (fd) throws(SystemError) -> [UInt8] in
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
        do { return try xattrs.decryptValue(stored, backingName: backing) } catch {
            throw .damaged("extended attribute value of node \(id): \(error)")
        }
    }

    public func setxattr(_ id: UInt64, name: [UInt8], value: [UInt8], flags: XattrFlags = []) throws(FSError) {
        try checkWritable()
        guard let backing = try backingXattrName(name) else {
            // No security labels, ACLs or trusted attributes are kept (ext4 without them).
            throw .notSupported
        }
        guard value.count <= XattrCodec.maxValue else { throw .tooBig }
        let stored: [UInt8]
        do { stored = try xattrs.encryptValue(value, backingName: backing) } catch { throw .damaged("\(error)") }
        try withXattrTarget(id) { (fd) throws(SystemError) in try Sys.setxattr(pinned: fd, backing, stored, flags: flags.rawValue) }
    }

    public func listxattr(_ id: UInt64) throws(FSError) -> [[UInt8]] {
        let all = try withXattrTarget(id) { (fd) throws(SystemError) -> [String] in
            do throws(SystemError) { return try Sys.listxattr(pinned: fd) } catch where error.errno == EOPNOTSUPP { return [] }
        }
        // Attributes that are not ours (or do not decrypt) are not listed.
        return all.compactMap { xattrs.decryptName($0) }
    }

    public func removexattr(_ id: UInt64, name: [UInt8]) throws(FSError) {
        try checkWritable()
        guard let backing = try backingXattrName(name) else { throw .notSupported }
        try withXattrTarget(id) { (fd) throws(SystemError) in try Sys.removexattr(pinned: fd, backing) }
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
