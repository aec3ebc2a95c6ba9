import Synchronization
import XTSFS
import XTSSystem
#if canImport(Glibc)
import Glibc
#endif

/// `--cache-max SIZE`: keeps the cache area's files at SIZE bytes (their plaintext sizes)
/// or less by removing whole files, least recently used first. Use is what this daemon
/// saw (open, create, write through the mount); for a file it has not seen since the
/// mount, the later of its backing file's access and modification times. A thread looks
/// every `interval` seconds; eviction goes through the filesystem like an `rm` would, so
/// a file open at that moment keeps working for whoever holds it.
///
/// `@unchecked Sendable`: `lastUse` is in a Mutex, `stopped` atomic; the rest is immutable.
final class CacheEviction: @unchecked Sendable {
    /// The cache area's filesystem now (a purge replaces it).
    let filesystem: @Sendable () -> FileSystem
    var fs: FileSystem { filesystem() }
    let maxBytes: Int64
    let interval: Double
    let log: @Sendable (String) -> Void
    /// Tells the kernel an evicted name is gone (the cache area's server).
    var invalidate: (@Sendable (UInt64, [UInt8]) -> Void)?
    let lastUse = Mutex<[UInt64: Int64]>([:])
    let stopped = Atomic<Bool>(false)
    private var thread = pthread_t()
    private var started = false

    init(fs filesystem: @escaping @Sendable () -> FileSystem, maxBytes: Int64, interval: Double = 2, log: @escaping @Sendable (String) -> Void) {
        self.filesystem = filesystem
        self.maxBytes = maxBytes
        self.interval = interval
        self.log = log
    }

    /// Records a use of node `id` now (called from the FUSE workers).
    func used(_ id: UInt64) {
        var ts = timespec()
        clock_gettime(CLOCK_REALTIME, &ts)
        let now = Int64(ts.tv_sec) * 1_000_000_000 + Int64(ts.tv_nsec)
        lastUse.withLock { $0[id] = now }
    }

    struct Candidate {
        var parent: UInt64
        var name: [UInt8]
        var id: UInt64
        var size: Int64
        var used: Int64
    }

    /// The files of the area with their sizes and last use (a walk through the filesystem).
    func candidates(_ fs: FileSystem) -> [Candidate] {
        var out: [Candidate] = []
        let seen = lastUse.withLock { $0 }
        func walk(_ dir: UInt64, _ depth: Int) {
            guard depth < 256, let h = try? fs.opendir(dir) else { return }
            var entries: [DirectoryEntry] = []
            try? fs.readdir(handle: h, offset: 0) { _, e in entries.append(e); return true }
            fs.releasedir(h)
            for e in entries where e.name != Array(".".utf8) && e.name != Array("..".utf8) {
                guard let (id, st) = try? fs.lookup(parent: dir, name: e.name) else { continue }
                defer { fs.forget(id, count: 1) }
                if st.isDirectory {
                    walk(id, depth + 1)
                } else if st.isRegular {
                    let backing = max(Int64(st.st_atim.tv_sec) * 1_000_000_000 + Int64(st.st_atim.tv_nsec),
                                      Int64(st.st_mtim.tv_sec) * 1_000_000_000 + Int64(st.st_mtim.tv_nsec))
                    out.append(Candidate(parent: dir, name: e.name, id: id, size: Int64(st.st_size), used: max(seen[id] ?? 0, backing)))
                }
            }
        }
        walk(FileSystem.rootID, 0)
        return out
    }

    /// One pass: removes least recently used files until the rest fit. Returns how many.
    @discardableResult
    func evict() -> Int {
        let fs = self.fs
        let files = candidates(fs)
        var total = files.reduce(0) { $0 + $1.size }
        guard total > maxBytes else { return 0 }
        var removed = 0
        for f in files.sorted(by: { $0.used < $1.used }) where total > maxBytes {
            do {
                try fs.unlink(parent: f.parent, name: f.name)
                invalidate?(f.parent, f.name)
                total -= f.size
                removed += 1
                lastUse.withLock { _ = $0.removeValue(forKey: f.id) }
            } catch {
                log("cache area: cannot evict a file: \(error)")
            }
        }
        return removed
    }

    func start() {
        let me = Unmanaged.passRetained(self).toOpaque()
        if pthread_create(&thread, nil, { arg in
            let me = Unmanaged<CacheEviction>.fromOpaque(arg!).takeRetainedValue()
            while !me.stopped.load(ordering: .relaxed) {
                me.evict()
                var left = me.interval
                while left > 0 && !me.stopped.load(ordering: .relaxed) { usleep(100_000); left -= 0.1 }
            }
            return nil
        }, me) == 0 {
            started = true
        } else {
            Unmanaged<CacheEviction>.fromOpaque(me).release()
            log("cache area: cannot start the eviction thread; --cache-max is not enforced")
        }
    }

    func stop() {
        stopped.store(true, ordering: .relaxed)
        if started { pthread_join(thread, nil) }
    }
}
