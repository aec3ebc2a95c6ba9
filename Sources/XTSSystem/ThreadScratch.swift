#if canImport(Glibc)
import Glibc
#endif

/// Per-thread buffers reused across FUSE requests. A 128 KiB–1 MiB `malloc` per request is
/// an mmap/munmap pair plus page faults; reusing one buffer per worker thread avoids all of
/// it. Two slots, because a request buffer and the content layer's work buffer are live at
/// the same time. They hold plaintext, never keys.
public enum ThreadScratch {
    public enum Slot: Int {
        /// The FUSE layer's reply buffer, or the content layer's read-modify-write buffer.
        case request = 0
        /// The content layer's buffer for unaligned reads.
        case content = 1
    }

    /// `@unchecked Sendable`: reached only from its own thread through the thread-specific key.
    final class Buffers: @unchecked Sendable {
        var slots: [UnsafeMutableRawBufferPointer] = [.init(start: nil, count: 0), .init(start: nil, count: 0)]
        deinit { for s in slots { s.deallocate() } }
    }

    static let key: pthread_key_t = {
        var k = pthread_key_t()
        pthread_key_create(&k) { p in
            if let p { Unmanaged<Buffers>.fromOpaque(p).release() }
        }
        return k
    }()

    /// A buffer of at least `count` bytes, valid until the next call for the same slot on this thread.
    public static func buffer(_ slot: Slot, count: Int) -> UnsafeMutableRawBufferPointer {
        let buffers: Buffers
        if let p = pthread_getspecific(key) {
            buffers = Unmanaged<Buffers>.fromOpaque(p).takeUnretainedValue()
        } else {
            buffers = Buffers()
            pthread_setspecific(key, Unmanaged.passRetained(buffers).toOpaque())
        }
        let i = slot.rawValue
        if buffers.slots[i].count < count {
            buffers.slots[i].deallocate()
            // Round up so that a slightly larger request does not reallocate.
            let size = max(count, 64 * 1024).roundedUp(to: 64 * 1024)
            buffers.slots[i] = .allocate(byteCount: size, alignment: 64)
        }
        return UnsafeMutableRawBufferPointer(rebasing: buffers.slots[i][0..<count])
    }
}

extension Int {
    func roundedUp(to m: Int) -> Int { (self + m - 1) / m * m }
}
