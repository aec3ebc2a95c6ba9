import XTSContent
import XTSFormat
import XTSSystem
#if canImport(Glibc)
import Glibc
#endif

/// `-o shared` (README, "Several hosts"): CIPHERDIR is changed by other hosts too, so
/// nothing they can change is trusted from a cache without revalidation.
///
/// - The backing file's own page cache is dropped before each read (`dropBackingCache`):
///   on a network filesystem it may hold another host's replaced ciphertext.
/// - A file's keys: before each read and write, the key-bearing bytes of its header on disk
///   are compared with those its keys were loaded from (`FileState.headerStamp`); another
///   host's rewrite (a new header, a new key) makes the keys load again, so nothing is
///   ever decrypted or encrypted with a stale key. One pread of 32 bytes per request.
/// - Directories: a cached directory handle whose directory is gone (removed by another
///   host: no links left, or no longer reachable) is dropped and the directory found again
///   by name, checked against its identity; its directory ID is read again from its
///   `xtsfs.dir` at each use, so a directory removed and made again under the same name
///   (even on the same inode number) is never addressed with the old ID.
extension FileSystem {
    /// The bytes of the file header that decide the key: the whole plain header (32), or
    /// version, flags, key generation and nonce of an integrity header (24; its length
    /// field changes with every write). Empty for an empty file.
    func headerStamp(_ fd: Int32) -> [UInt8] {
        let n = integrity ? 24 : FileHeader.length
        dropBackingCache(fd)
        var buf = [UInt8](repeating: 0, count: n)
        let got = buf.withUnsafeMutableBytes { (try? Sys.pread(fd, $0.baseAddress!, n, 0)) ?? -1 }
        // Unreadable (a write-only descriptor): a stamp that never matches, so keys load as usual.
        return got < 0 ? [0xff] : Array(buf[0..<got])
    }

    /// Drops what the kernel caches of the backing file itself (clean pages only), so that
    /// the next read of it asks the backing filesystem: on a network filesystem those
    /// pages may hold ciphertext another host has since replaced, which read with the
    /// file's current key would be garbage. Costs the backing filesystem's own caching
    /// of the file (xtsfs's page cache above it stays, as `keepCache` allows).
    func dropBackingCache(_ fd: Int32) {
        _ = posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED)
    }

    /// Under the file's write lock: forgets keys loaded from another header than the one on
    /// disk now.
    func dropStaleKeys(_ fd: Int32, _ state: FileState) {
        guard state.loaded, state.headerStamp != headerStamp(fd) else { return }
        state.loaded = false
        state.crypto = nil
    }

    /// A cached directory descriptor whose directory was removed behind our back.
    func cachedDirectoryIsGone(_ h: DirHandle) -> Bool {
        guard let st = try? Sys.fstat(h.fd) else { return true }
        return st.st_nlink == 0
    }

    /// What must not have changed for the kernel to keep a file's cached pages: its inode,
    /// size, modification and change times (to the nanosecond, where the backing filesystem
    /// keeps them) and the key-bearing bytes of its header. nil if it cannot be read.
    public func contentStamp(handle: UInt64) -> [UInt8]? {
        guard let f = try? openFile(handle), let st = try? Sys.fstat(f.fd) else { return nil }
        var out: [UInt8] = []
        for v in [UInt64(st.st_dev), UInt64(st.st_ino), UInt64(bitPattern: Int64(st.st_size)),
                  UInt64(bitPattern: Int64(st.st_mtim.tv_sec)), UInt64(st.st_mtim.tv_nsec),
                  UInt64(bitPattern: Int64(st.st_ctim.tv_sec)), UInt64(st.st_ctim.tv_nsec)] {
            withUnsafeBytes(of: v.littleEndian) { out += $0 }
        }
        return out + headerStamp(f.fd)
    }
}

extension FileSystem {
    /// `open(O_CREAT)` without O_EXCL whose create lost a race with another host creating
    /// the same name: opens the file that won, as a local create would have, after the
    /// permission check the kernel would have made on it (mode bits against the caller;
    /// root may read and write anything). The caller's reply counts as a lookup.
    public func openExisting(parent: UInt64, name: [UInt8], flags: Int32, caller: Caller) throws(FSError) -> (UInt64, stat, UInt64) {
        let (id, st) = try lookup(parent: parent, name: name)
        do throws(FSError) {
            guard st.st_mode & S_IFMT != S_IFDIR else { throw FSError.isDirectory }
            guard st.st_mode & S_IFMT == S_IFREG else { throw FSError.exists }
            let acc = flags & O_ACCMODE
            let want: mode_t = (acc == O_RDONLY ? 4 : acc == O_WRONLY ? 2 : 6) | (flags & O_TRUNC != 0 ? 2 : 0)
            if caller.uid != 0 {
                let bits: mode_t
                if caller.uid == st.st_uid { bits = (st.st_mode >> 6) & 7 } else if caller.gid == st.st_gid || caller.isMember(of: st.st_gid) { bits = (st.st_mode >> 3) & 7 } else { bits = st.st_mode & 7 }
                guard bits & want == want else { throw FSError.system(SystemError(EACCES, "open")) }
            }
            let h = try open(id, flags: flags & ~(O_CREAT | O_EXCL), caller: caller)
            return (id, st, h)
        } catch {
            forget(id, count: 1)
            throw error
        }
    }
}
