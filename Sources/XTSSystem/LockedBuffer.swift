import CSysShim
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

/// Memory for secrets: mlock'ed so it is never swapped out, excluded from core dumps,
/// and zeroed before it is reused or returned to the system. Small secrets (keys) share
/// locked arenas, so a daemon with thousands of open files neither spends a locked page
/// nor four system calls on each file's key; larger ones get pages of their own.
///
/// `@unchecked Sendable`: the storage is written only while the owner builds the
/// secret; afterwards every holder only reads it, and the pointer never escapes
/// except through the scoped accessors of the types built on it.
public final class LockedBuffer: @unchecked Sendable {
    public let count: Int
    private let base: UnsafeMutableRawPointer
    /// Bytes of our own pages, or 0 for a slot of the shared arena.
    private let mapped: Int

    public init(count: Int) {
        precondition(count >= 0)
        self.count = count
        if count <= SecretArena.slotSize {
            base = SecretArena.shared.allocate()
            mapped = 0
            return
        }
        let page = Int(sysconf(Int32(_SC_PAGESIZE)))
        let size = (count + page - 1) / page * page
        base = LockedBuffer.lockedPages(size)
        mapped = size
    }

    deinit {
        if mapped == 0 {
            SecretArena.shared.free(base)
        } else {
            LockedBuffer.wipe(base, mapped)
            _ = munlock(base, mapped)
            free(base)
        }
    }

    /// Whether some secret memory could not be locked (RLIMIT_MEMLOCK too low, no
    /// CAP_IPC_LOCK): then it may be swapped, though still never dumped.
    public static var lockFailed: Bool { SecretArena.lockFailed.load(ordering: .relaxed) }

    /// Called once, on the first failure to lock (the daemon logs it). Set before serving.
    nonisolated(unsafe) public static var lockFailureHandler: (@Sendable () -> Void)?

    static func lockedPages(_ size: Int) -> UnsafeMutableRawPointer {
        let page = Int(sysconf(Int32(_SC_PAGESIZE)))
        var p: UnsafeMutableRawPointer? = nil
        guard posix_memalign(&p, page, size) == 0, let p else {
            fatalError("out of memory allocating a key buffer")
        }
        memset(p, 0, size)
        if mlock(p, size) != 0, !SecretArena.lockFailed.exchange(true, ordering: .relaxed) {
            LockedBuffer.lockFailureHandler?()
        }
        _ = madvise(p, size, MADV_DONTDUMP)
        return p
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
    /// No core dumps, not ptrace-attachable by other users' processes, and no crash
    /// reporter: the Swift runtime's backtracer catches SIGABRT, SIGSEGV and the other
    /// crash signals and runs `swift-backtrace`, which reads the crashed process's memory
    /// and prints it; it cannot read an undumpable process, and meanwhile the daemon
    /// hung, its mounts still up (seen here: a daemon outlived its first SIGABRT). A crash
    /// now ends the process at once.
    public static func apply() {
        var lim = rlimit(rlim_cur: 0, rlim_max: 0)
        _ = setrlimit(__rlimit_resource_t(RLIMIT_CORE.rawValue), &lim)
        _ = xts_set_undumpable()
        for s in [SIGQUIT, SIGILL, SIGTRAP, SIGABRT, SIGBUS, SIGFPE, SIGSEGV] { signal(s, SIG_DFL) }
    }
}

/// Fixed-size slots in locked 64 KiB arenas. Arenas are kept for the life of the process
/// (their number follows the peak of live keys); a freed slot is zeroed before reuse.
final class SecretArena: Sendable {
    static let slotSize = 128
    static let arenaSize = 64 * 1024
    static let shared = SecretArena()
    static let lockFailed = Atomic<Bool>(false)

    /// Free slots, as addresses (Int, so the state is Sendable).
    private let freeSlots = Mutex<[Int]>([])

    func allocate() -> UnsafeMutableRawPointer {
        freeSlots.withLock { free in
            if free.isEmpty {
                let arena = LockedBuffer.lockedPages(SecretArena.arenaSize)
                let n = SecretArena.arenaSize / SecretArena.slotSize
                free.reserveCapacity(free.count + n)
                for i in stride(from: n - 1, through: 0, by: -1) { free.append(Int(bitPattern: arena + i * SecretArena.slotSize)) }
            }
            return UnsafeMutableRawPointer(bitPattern: free.removeLast())!
        }
    }

    func free(_ p: UnsafeMutableRawPointer) {
        LockedBuffer.wipe(p, SecretArena.slotSize)
        freeSlots.withLock { $0.append(Int(bitPattern: p)) }
    }
}
