import CSysShim
#if canImport(Glibc)
import Glibc
#endif

/// A pthread reader-writer lock: many readers of a file's blocks, or one writer doing
/// read-modify-write, so concurrent writers never tear a block. Writers go first, so
/// parallel readers cannot starve them.
///
/// `@unchecked Sendable`: pthread_rwlock_t is made for sharing between threads; it lives
/// in its own allocation so it never moves.
public final class RWLock: @unchecked Sendable {
    private let lock: UnsafeMutablePointer<pthread_rwlock_t>

    public init() {
        lock = .allocate(capacity: 1)
        lock.initialize(to: pthread_rwlock_t())
        xts_rwlock_init_writer_first(lock)
    }

    deinit {
        pthread_rwlock_destroy(lock)
        lock.deallocate()
    }

    /// For a holder that cannot keep to one scope (a lock held across several steps).
    public func lockWrite() { pthread_rwlock_wrlock(lock) }
    public func unlock() { pthread_rwlock_unlock(lock) }

    public func withReadLock<R, E: Error>(_ body: () throws(E) -> R) throws(E) -> R {
        pthread_rwlock_rdlock(lock)
        defer { pthread_rwlock_unlock(lock) }
        return try body()
    }

    public func withWriteLock<R, E: Error>(_ body: () throws(E) -> R) throws(E) -> R {
        pthread_rwlock_wrlock(lock)
        defer { pthread_rwlock_unlock(lock) }
        return try body()
    }
}
