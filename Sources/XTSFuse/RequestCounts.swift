import CFuse

/// Requests served, by operation, and bytes read and written: what a workload costs in
/// FUSE round trips (`kill -USR1` on the daemon logs them; see xtsfs(1)).
///
/// `@unchecked Sendable`: the slots are only touched with atomic operations.
public final class RequestCounts: @unchecked Sendable {
    public enum Operation: Int, CaseIterable, Sendable {
        case lookup, forget, forgetMulti, getattr, setattr, readlink, mknod, mkdir, unlink, rmdir, symlink, rename, link
        case getxattr, listxattr, setxattr, removexattr, fallocate, open, create, read, write, flush, release, fsync
        case opendir, readdir, readdirplus, releasedir, fsyncdir, statfs
        /// Not operations: bytes returned by READ and taken by WRITE, and requests that
        /// came through FUSE over io_uring (`-o uring`) rather than /dev/fuse.
        case bytesRead, bytesWritten, viaRing

        /// The kernel's name of the operation (as `--debug` prints it).
        public var name: String {
            switch self {
            case .forgetMulti: return "BATCH_FORGET"
            case .bytesRead: return "bytes_read"
            case .bytesWritten: return "bytes_written"
            case .viaRing: return "via_io_uring"
            default: return String(describing: self).uppercased()
            }
        }
    }

    private let slots: UnsafeMutablePointer<UInt64>

    public init() {
        slots = .allocate(capacity: Operation.allCases.count)
        slots.initialize(repeating: 0, count: Operation.allCases.count)
    }

    deinit { slots.deallocate() }

    /// With `-o uring`: where the rings count the requests they served.
    var ringSlot: UnsafeMutablePointer<UInt64> { slots + Operation.viaRing.rawValue }
    /// Whether the rings run (the count is then shown); set before serving.
    var ringActive = false

    func add(_ op: Operation, _ n: UInt64 = 1) { xtsfs_count(slots, Int32(op.rawValue), n) }

    public subscript(_ op: Operation) -> UInt64 { xtsfs_count_load(slots, Int32(op.rawValue)) }

    /// One line: the operations seen, most frequent first, then the bytes; e.g.
    /// `requests 1234: LOOKUP 600, GETATTR 400, ...; read 0 B, written 4096 B`.
    public var summary: String {
        let ops = Operation.allCases.filter { $0 != .bytesRead && $0 != .bytesWritten && $0 != .viaRing }.map { ($0, self[$0]) }.filter { $0.1 > 0 }
        let total = ops.reduce(0) { $0 + $1.1 }
        let list = ops.sorted { $0.1 > $1.1 }.map { "\($0.0.name) \($0.1)" }.joined(separator: ", ")
        let ring = ringActive ? "; through io_uring \(self[.viaRing])" : ""
        return "requests \(total): \(list.isEmpty ? "none" : list); read \(self[.bytesRead]) B, written \(self[.bytesWritten]) B\(ring)"
    }
}
