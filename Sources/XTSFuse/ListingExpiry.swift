import CFuse
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

/// Without OPENDIR the kernel keeps each directory's listing (as FOPEN_CACHE_DIR) until the
/// directory changes, however long that is; an `ls -l` served from it has no attributes,
/// so once the names' cache timeout passed it costs a LOOKUP per entry, where a listing
/// taken again (READDIRPLUS) brings them for about 20 entries a request. So a listing
/// lives as long as the names it brought: `cacheTimeout` after the daemon served its
/// start, the kernel is told to drop it (FUSE_NOTIFY_INVAL_INODE, which also drops the
/// directory's attributes, expired by then too).
///
/// The directories wait in the order they were listed (their deadlines are in that order,
/// the timeout being one); at most `limit` wait, past that one is dropped at the next tick.
final class ListingExpiry: Sendable {
    private struct Queue {
        var entries: [(node: UInt64, deadline: Double)] = []
        var head = 0
        var waiting = Set<UInt64>()
    }
    private let queue = Mutex(Queue())
    let timeout: Double
    static let limit = 65_536

    init(timeout: Double) { self.timeout = timeout }

    static func now() -> Double {
        var ts = timespec()
        clock_gettime(CLOCK_MONOTONIC, &ts)
        return Double(ts.tv_sec) + Double(ts.tv_nsec) / 1e9
    }

    /// The daemon served the start (offset 0) of a listing of directory `node`.
    func listed(_ node: UInt64) {
        let now = ListingExpiry.now()
        queue.withLock { q in
            guard !q.waiting.contains(node) else { return }
            q.waiting.insert(node)
            q.entries.append((node, q.waiting.count > ListingExpiry.limit ? now : now + timeout))
        }
    }

    /// The directories whose listings are due, taken off the queue.
    func due() -> [UInt64] {
        let now = ListingExpiry.now()
        return queue.withLock { q in
            var out: [UInt64] = []
            while q.head < q.entries.count, q.entries[q.head].deadline <= now {
                let node = q.entries[q.head].node
                q.waiting.remove(node)
                out.append(node)
                q.head += 1
            }
            if q.head > 4096, q.head * 2 > q.entries.count {
                q.entries.removeFirst(q.head)
                q.head = 0
            }
            return out
        }
    }
}

extension FuseServer {
    /// Runs until the session ends: every second (or the timeout, if shorter), the kernel
    /// is told to drop the listings that are due.
    func startListingExpiry(_ expiry: ListingExpiry) {
        let me = Unmanaged.passRetained(self).toOpaque()
        var thread = pthread_t()
        if pthread_create(&thread, nil, { arg in
            let server = Unmanaged<FuseServer>.fromOpaque(arg!).takeRetainedValue()
            guard let expiry = server.listingExpiry else { return nil }
            let tick = UInt32(min(max(expiry.timeout, 0.05), 1) * 1_000_000)
            while !server.ending.load(ordering: .relaxed) {
                usleep(tick)
                for node in expiry.due() { server.dropListing(node) }
            }
            return nil
        }, me) == 0 {
            pthread_detach(thread)
        } else {
            Unmanaged<FuseServer>.fromOpaque(me).release()
        }
    }

    /// Tells the kernel to drop its cached listing of directory `node` (and its attributes).
    func dropListing(_ node: UInt64) {
        withNotifySession { se in _ = fuse_lowlevel_notify_inval_inode(se, fuse_ino_t(node), 0, 0) }
    }
}
