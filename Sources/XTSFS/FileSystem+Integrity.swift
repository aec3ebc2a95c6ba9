import CSysShim
import XTSContent
import XTSSystem
#if canImport(Glibc)
import Glibc
#endif

/// Where `translate` can read a regular file's header from.
enum HeaderSource {
    case none
    /// An open file: its descriptor, under the file's lock.
    case open(OpenFile)
    /// An O_PATH descriptor pinning the file.
    case pinned(Int32)
    /// A name in a backing directory.
    case entry(Int32, String)
}

/// A committed length read from a file header, valid while the backing file's size and
/// change time are the ones it was read at: any write to the backing file, ours or
/// anyone's, moves its ctime. Remembered (1) when a written handle is released, under the
/// file's exclusive lock, so no write of ours races the header read (`rememberIntegritySize`),
/// and (2) when `stat` reads a header, only for files unchanged for a few seconds, so a
/// coarse clock (two changes within one tick) or a write racing the header read cannot
/// leave a stale entry there. Only what `stat` shows comes from here; reads and writes
/// always check the header itself.
struct IntegritySize: Sendable {
    var backing: Int64
    var ctimeSec: Int
    var ctimeNsec: Int
    var plain: Int64

    init(_ st: stat, plain: Int64) {
        backing = Int64(st.st_size); ctimeSec = st.st_ctim.tv_sec; ctimeNsec = st.st_ctim.tv_nsec; self.plain = plain
    }

    func matches(_ st: stat) -> Bool {
        backing == Int64(st.st_size) && ctimeSec == st.st_ctim.tv_sec && ctimeNsec == st.st_ctim.tv_nsec
    }
}

extension FileSystem {
    /// The plaintext size of a file of an integrity volume: the length its header commits.
    /// When the header cannot be read here (the backing file is unreadable to us, or
    /// damaged), the largest size its backing size allows; reading it then fails cleanly.
    func integritySize(_ st: stat, _ source: HeaderSource) -> Int64 {
        let backing = Int64(st.st_size)
        if backing == 0 { return 0 }
        let key = Identity(st)
        if let known = integritySizes.withLock({ $0[key] }), known.matches(st) { return known.plain }
        // Damage (a header or tag blocks that do not verify) is remembered like a size, so that
        // `ls -l` of a damaged large file does not read all of its tag blocks every time.
        var damaged = false
        func fromHeader(_ fd: Int32, _ crypto: FileCrypto? = nil) -> Int64? {
            do throws(ContentError) { return try content(fd).plainSize(crypto: crypto) } catch {
                switch error {
                case .authentication, .badHeader: damaged = true
                default: break
                }
                return nil
            }
        }
        var size: Int64?
        switch source {
        case .none: break
        case .open(let f):
            size = f.state.lock.withReadLock { fromHeader(f.fd, f.state.crypto) }
        case .pinned(let p):
            if let fd = try? Sys.reopen(p, O_RDONLY | O_NONBLOCK) { size = fromHeader(fd); Sys.close(fd) }
        case .entry(let dir, let name):
            if let fd = try? Sys.openat(dir, name, O_RDONLY | O_NOFOLLOW | O_NONBLOCK),
               let again = try? Sys.fstat(fd) {
                // Only the very file that was looked up.
                if again.st_ino == st.st_ino && again.st_dev == st.st_dev && again.isRegular { size = fromHeader(fd) }
                Sys.close(fd)
            }
        }
        if size == nil && !damaged { return IntegrityLayout.largestPlainSize(backingSize: backing) }
        let shown = size ?? IntegrityLayout.largestPlainSize(backingSize: backing)
        var now = timespec()
        clock_gettime(CLOCK_REALTIME, &now)
        guard now.tv_sec - st.st_ctim.tv_sec >= 3 else { return shown }
        integritySizes.withLock { table in
            // A bound, not an LRU: refilling costs one header read per file.
            if table.count >= 100_000 { table.removeAll(keepingCapacity: true) }
            table[key] = IntegritySize(st, plain: shown)
        }
        return shown
    }
}

extension FileSystem {
    /// Remembers the committed length of the file open as `fd` when a handle that wrote
    /// it is released (under the file's exclusive lock), so that the `stat` calls after a write
    /// (`ls -l` of files just written, or after the kernel dropped its caches) need no
    /// header read. Skipped when the backing file moved while it was read (someone else
    /// writing it) or its header cannot be read through `fd` (a write-only descriptor).
    func rememberIntegritySize(_ fd: Int32, crypto: FileCrypto? = nil) {
        guard let before = try? Sys.fstat(fd), before.isRegular, before.st_size > 0,
              let size = try? content(fd).plainSize(crypto: crypto),
              let after = try? Sys.fstat(fd),
              IntegritySize(before, plain: size).matches(after) else { return }
        integritySizes.withLock { table in
            if table.count >= 100_000 { table.removeAll(keepingCapacity: true) }
            table[Identity(after)] = IntegritySize(after, plain: size)
        }
    }

    /// Keeps a remembered length across a change of ours that moved the backing file's
    /// ctime but not its size (chmod, chown, utimens): `ls -l` after `tar -x`, which sets
    /// all three on every file, then reads no header.
    func carryIntegritySize(from before: stat, to after: stat) {
        guard before.isRegular, Identity(before) == Identity(after), before.st_size == after.st_size else { return }
        integritySizes.withLock { table in
            guard let known = table[Identity(before)], known.matches(before) else { return }
            table[Identity(after)] = IntegritySize(after, plain: known.plain)
        }
    }

    /// A plaintext path of node `id` for log lines (one of its names if it has several).
    func displayPath(_ id: UInt64) -> String {
        var parts: [String] = []
        var node = id
        table.withLock { t in
            for _ in 0..<256 {
                guard node != FileSystem.rootID, let link = t.location(node)?.link else { break }
                parts.append(String(decoding: link.name, as: UTF8.self))
                node = link.parent
            }
        }
        return "/" + parts.reversed().joined(separator: "/")
    }

    /// Damage found in a file's contents, named by the file's path, so that the log line
    /// (written where the error becomes EIO) says which file and where.
    func naming(_ error: FSError, _ node: UInt64) -> FSError {
        guard case .damaged(let why) = error else { return error }
        return .damaged("\(displayPath(node)): \(why)")
    }
}
