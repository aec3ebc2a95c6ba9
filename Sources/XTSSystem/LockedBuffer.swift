import CSysShim
#if canImport(Glibc)
import Glibc
#endif

/// Memory for secrets: page-aligned, mlock'ed so it is never swapped out, excluded
/// from core dumps, and zeroed before it is returned to the system.
///
/// `@unchecked Sendable`: the storage is written only while the owner builds the
/// secret; afterwards every holder only reads it, and the pointer never escapes
/// except through the scoped accessors of the types built on it.
public final class LockedBuffer: @unchecked Sendable {
    public let count: Int
    private let base: UnsafeMutableRawPointer
    private let mapped: Int

    public init(count: Int) {
        precondition(count >= 0)
        self.count = count
        let page = Int(sysconf(Int32(_SC_PAGESIZE)))
        let size = max(page, (count + page - 1) / page * page)
        var p: UnsafeMutableRawPointer? = nil
        guard posix_memalign(&p, page, size) == 0, let p else {
            fatalError("out of memory allocating a key buffer")
        }
        base = p
        mapped = size
        memset(base, 0, size)
        // Best effort: without CAP_IPC_LOCK and with a low RLIMIT_MEMLOCK mlock can fail;
        // the daemon also disables core dumps, so the secret still never reaches a dump.
        _ = mlock(base, size)
        _ = madvise(base, size, MADV_DONTDUMP)
    }

    deinit {
        LockedBuffer.wipe(base, mapped)
        _ = munlock(base, mapped)
        free(base)
    }

    public func withUnsafeBytes<R, E: Error>(_ body: (UnsafeRawBufferPointer) throws(E) -> R) throws(E) -> R {
        try body(UnsafeRawBufferPointer(start: base, count: count))
    }

    public func withUnsafeMutableBytes<R, E: Error>(_ body: (UnsafeMutableRawBufferPointer) throws(E) -> R) throws(E) -> R {
        try body(UnsafeMutableRawBufferPointer(start: base, count: count))
    }

    /// Zeroes memory in a way the optimiser cannot drop.
    public static func wipe(_ p: UnsafeMutableRawPointer, _ n: Int) {
        explicit_bzero(p, n)
    }
}

/// Process-wide protections for a process that holds keys.
public enum ProcessHardening {
    /// No core dumps, not ptrace-attachable by other users' processes.
    public static func apply() {
        var lim = rlimit(rlim_cur: 0, rlim_max: 0)
        _ = setrlimit(__rlimit_resource_t(RLIMIT_CORE.rawValue), &lim)
        _ = xts_set_undumpable()
    }
}
