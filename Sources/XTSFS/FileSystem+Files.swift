import CSysShim
import XTSContent
import XTSCrypto
import XTSSystem
#if canImport(Glibc)
import Glibc
#endif

/// Per backing file state shared by all its open handles (whatever name they were opened
/// by): the lock that serialises read-modify-write and the file's keys.
///
/// `@unchecked Sendable`: `crypto` and `loaded` are touched only under `lock` (write side).
final class FileState: @unchecked Sendable {
    let lock = RWLock()
    var crypto: FileCrypto?
    var loaded = false
    var references = 0
    /// The file's mode as last seen, to spare an fstat per write when it has no setgid bit;
    /// nil when unknown (first write, or after a chmod through this mount). Under `lock`.
    var modeHint: mode_t?
    /// `-o shared`: the key-bearing bytes of the file header `crypto` was loaded from (empty
    /// for an empty file); a different header on disk means another host rewrote the file.
    var headerStamp: [UInt8]?
}

/// An open backing file.
final class OpenFile: Sendable {
    let fd: Int32
    let node: UInt64
    let identity: Identity
    let state: FileState
    /// Opened for writing (or truncating): an online rekey leaves such a file for later.
    let writable: Bool
    init(fd: Int32, node: UInt64, identity: Identity, state: FileState, writable: Bool = true) {
        self.fd = fd; self.node = node; self.identity = identity; self.state = state; self.writable = writable
    }
}

extension FileSystem {
    func content(_ fd: Int32) -> ContentFile<FDBackingFile> {
        let ring = self.ring
        return ContentFile(file: FDBackingFile(fd: fd), currentKeys: ring.newest, unitTags: unitTags, fileIDs: listingManifests, keys: { ring.keys($0) })
    }

    /// Runs `body` under the file's exclusive lock with its keys loaded.
    func withExclusive<R>(_ fd: Int32, _ state: FileState, loadKeys: Bool = true, _ body: (ContentFile<FDBackingFile>, FileState) throws(FSError) -> R) throws(FSError) -> R {
        let c = content(fd)
        return try state.lock.withWriteLock { () throws(FSError) -> R in
            if sharedStorage { dropStaleKeys(fd, state) }
            if !state.loaded && loadKeys {
                do throws(ContentError) { state.crypto = try c.loadCrypto() } catch { throw FSError(error) }
                state.loaded = true
            }
            defer { if sharedStorage { state.headerStamp = headerStamp(fd) } }
            return try body(c, state)
        }
    }

    func acquireState(_ st: stat) throws(FSError) -> (Identity, FileState) {
        guard st.isRegular else { throw st.isDirectory ? FSError.isDirectory : FSError.invalidArgument }
        let key = Identity(st)
        let state = states.withLock { table in
            let s = table[key] ?? FileState()
            s.references += 1
            table[key] = s
            return s
        }
        return (key, state)
    }

    func releaseState(_ key: Identity) {
        states.withLock { table in
            guard let s = table[key] else { return }
            s.references -= 1
            if s.references == 0 { table[key] = nil }
        }
    }

    private func register(fd: Int32, stat st: stat, node: UInt64, writable: Bool) throws(FSError) -> UInt64 {
        let (key, state) = try acquireState(st)
        let h = nextHandle.wrappingAdd(1, ordering: .relaxed).oldValue
        files.withLock { $0[h] = OpenFile(fd: fd, node: node, identity: key, state: state, writable: writable) }
        return h
    }

    func openFile(_ h: UInt64) throws(FSError) -> OpenFile {
        guard let f = files.withLock({ $0[h] }) else { throw .badHandle }
        return f
    }

    /// Any open handle of node `id`: how an unlinked file is still reached.
    func anyOpenFile(of id: UInt64) -> OpenFile? {
        files.withLock { $0.values.first { $0.node == id } }
    }

    /// The backing file is opened read-write even for write-only opens: partial-block
    /// writes must read the block they change.
    private static func backingFlags(_ flags: Int32) -> Int32 {
        let acc = flags & O_ACCMODE
        return (acc == O_RDONLY ? O_RDONLY : O_RDWR) | (flags & (O_SYNC | O_DSYNC))
    }

    public func open(_ id: UInt64, flags: Int32, caller: Caller? = nil) throws(FSError) -> UInt64 {
        let writing = flags & O_ACCMODE != O_RDONLY || flags & O_TRUNC != 0
        if writing { try checkWritable() }
        // Pinned first, so that only a regular file is ever opened (never a FIFO or device
        // put in its place), and the very inode that was checked.
        let (fd, st, writeOnly) = try withPinned(id) { (pinned, st) throws(FSError) -> (Int32, stat, Bool) in
            guard st.isRegular else { throw st.isDirectory ? FSError.isDirectory : FSError.invalidArgument }
            do throws(SystemError) { return (try Sys.reopen(pinned, FileSystem.backingFlags(flags)), st, false) } catch {
                guard error.errno == EACCES, flags & O_ACCMODE == O_WRONLY else { throw .system(error) }
                do throws(SystemError) { return (try Sys.reopen(pinned, O_WRONLY), st, true) } catch { throw .system(error) }
            }
        }
        let h: UInt64
        do throws(FSError) { h = try register(fd: fd, stat: st, node: id, writable: writing) } catch { Sys.close(fd); throw error }
        let f = try openFile(h)
        do throws(FSError) {
            if flags & O_TRUNC != 0 {
                // libfuse's atomic O_TRUNC: empty the plaintext (the header goes with it).
                try truncate(fd: f.fd, state: f.state, size: 0)
                dropPrivileges(f.fd, f.state, node: id, for: caller)
            } else if !writeOnly && !f.state.lock.withReadLock({ f.state.loaded }) {
                // Load the file's keys now, so a damaged header is an error at open. Later
                // would be too late for a header cut short: the file then looks empty and
                // the kernel never asks us to read it. (A write-only backing descriptor
                // cannot read the header; its first write loads the keys.)
                try withExclusive(f.fd, f.state) { (_, _) throws(FSError) in }
            }
        } catch { release(h); throw naming(error, id) }
        return h
    }

    public func create(parent: UInt64, name: [UInt8], mode: mode_t, flags: Int32, caller: Caller) throws(FSError) -> (UInt64, stat, UInt64) {
        try checkWritable()
        return try withNamespace { () throws(FSError) in try createLocked(parent: parent, name: name, mode: mode, flags: flags, caller: caller) }
    }

    private func createLocked(parent: UInt64, name: [UInt8], mode: mode_t, flags: Int32, caller: Caller) throws(FSError) -> (UInt64, stat, UInt64) {
        let (dir, b) = try entry(parent, name)
        let fileID = try newFileID()
        return try listingChange(try listingDirs(parent), plan: { () throws(FSError) -> [ListingDelta]? in
            [ListingDelta(dir: 0, added: [ListedEntry(type: UInt8(DT_REG), name: name, identity: fileID ?? [])])]
        }) { () throws(FSError) -> (UInt64, stat, UInt64) in
            try writeLongNameFile(dir, b)
            let fd: Int32
            // With listing manifests the new file's header is written through this descriptor,
            // so it is opened for writing even when the caller's open is read-only.
            let access = fileID == nil ? FileSystem.backingFlags(flags) : O_RDWR | (flags & (O_SYNC | O_DSYNC))
            do throws(SystemError) { fd = try Sys.openat(dir.fd, b.entryName, O_CREAT | O_EXCL | O_NOFOLLOW | access, mode & 0o7777) } catch {
                // A name taken since the kernel's lookup is EEXIST even without O_EXCL: opening
                // the existing file here would skip the kernel's permission check on it.
                // The side file of a long name that already exists belongs to that entry: keep it.
                if error.errno != EEXIST { removeLongNameFile(dir, b) }
                throw error.errno == EEXIST ? .exists : .system(error)
            }
            if let fileID {
                // Listing manifests: a file has its header (length 0, its file ID) from the start.
                do throws(FSError) { try writeNewHeader(fd: fd, fileID: fileID) } catch {
                    Sys.close(fd)
                    _ = Glibc.unlinkat(dir.fd, b.entryName, 0)
                    removeLongNameFile(dir, b)
                    throw error
                }
            }
            if chownToCaller { _ = Glibc.fchown(fd, caller.uid, groupFor(caller, in: dir)) }
            let st: stat
            do throws(SystemError) { st = try Sys.fstat(fd) } catch { Sys.close(fd); throw .system(error) }
            if let fileID { rememberFileID(st, fileID) }
            let id = table.withLock { $0.add(Link(parent: parent, name: name, entry: b.entryName), identity: Identity(st), isDirectory: false) }
            do throws(FSError) { return (id, translate(st) { nil }, try register(fd: fd, stat: st, node: id, writable: true)) } catch {
                Sys.close(fd)
                forget(id, count: 1)
                throw error
            }
        }
    }

    /// A random file ID for a new file of a volume with listing manifests; nil without.
    func newFileID() throws(FSError) -> [UInt8]? {
        guard listingManifests else { return nil }
        do { return try Random.bytes(16) } catch { throw .damaged("\(error)") }
    }

    /// Writes a new file's header (length 0, `fileID`) through `fd` (one pwrite).
    func writeNewHeader(fd: Int32, fileID: [UInt8]) throws(FSError) {
        do throws(ContentError) { _ = try content(fd).writeNewHeader(fileID: fileID) } catch {
            throw FSError(error)
        }
    }

    public func read(handle: UInt64, offset: Int64, into buffer: UnsafeMutableRawBufferPointer) throws(FSError) -> Int {
        let f = try openFile(handle)
        let c = content(f.fd)
        // One shared lock per read: open has normally loaded the keys. Only when it could
        // not (a write-only backing descriptor, or after a failed write) are they loaded
        // under the exclusive lock first.
        while true {
            let n = try f.state.lock.withReadLock { () throws(FSError) -> Int? in
                guard f.state.loaded, !sharedStorage || f.state.headerStamp == headerStamp(f.fd) else { return nil }
                do throws(ContentError) { return try c.read(into: buffer, at: offset, crypto: f.state.crypto) } catch { throw naming(FSError(error), f.node) }
            }
            if let n { return n }
            try withExclusive(f.fd, f.state) { (_, _) throws(FSError) in }
        }
    }

    public func write(handle: UInt64, offset: Int64, data: UnsafeRawBufferPointer, caller: Caller? = nil) throws(FSError) -> Int {
        try checkWritable()
        guard offset >= 0, offset <= FileSystem.maxFileSize - Int64(data.count) else { throw .fileTooLarge }
        let f = try openFile(handle)
        // Writing nothing changes nothing (as on ext4: no size, no mtime); FUSE does not send
        // such writes, but the content layer has no state to return for an empty file.
        if data.isEmpty { return 0 }
        dropPrivileges(f.fd, f.state, node: f.node, for: caller)
        // O_APPEND needs nothing here: the kernel sends such writes at the current size
        // (its own idea of it with -o writecache), and page writeback (mmap) must keep
        // its offset.
        return try withExclusive(f.fd, f.state) { (c, s) throws(FSError) -> Int in
            do throws(ContentError) { s.crypto = try c.write(data, at: offset, crypto: s.crypto) } catch {
                // A partial write may have left a new header on disk: read it again next time.
                s.loaded = false
                throw naming(FSError(error), f.node)
            }
            return data.count
        }
    }

    /// Clears setuid and setgid as ext4 does when a file is written, truncated or given
    /// another owner, for the part the kernel leaves to us:
    /// - write, truncate, open with O_TRUNC by anyone but root (`chown: false`): setuid,
    ///   and setgid with group execute, when the FUSE layer took that job from the kernel
    ///   (`killsPrivileges`, HANDLE_KILLPRIV_V2; root stands for CAP_FSETID);
    /// - chown of a regular file by anyone (`chown: true`): the same two, under the same
    ///   condition (the kernel then sends the owner change alone);
    /// - always: setgid without group execute when the caller is neither root nor in the
    ///   file's group (the kernel never does this one for FUSE).
    /// `state` caches the mode, so a write to a file without these bits costs no fstat.
    func dropPrivileges(_ fd: Int32, _ state: FileState?, node: UInt64, for caller: Caller?, chown: Bool = false) {
        let root = (caller?.uid ?? 0) == 0
        if root && !chown { return }
        if let state, let hint = state.lock.withReadLock({ state.modeHint }), hint & (S_ISUID | S_ISGID) == 0 { return }
        guard let st = try? Sys.fstat(fd) else { return }
        if let state { state.lock.withWriteLock { state.modeHint = st.st_mode } }
        guard st.isRegular, st.st_mode & (S_ISUID | S_ISGID) != 0 else { return }
        var mode = st.st_mode & 0o7777
        if killsPrivileges.load(ordering: .relaxed) {
            mode &= ~S_ISUID
            if mode & S_IXGRP != 0 { mode &= ~S_ISGID }
        }
        if mode & S_ISGID != 0, mode & S_IXGRP == 0, !root, let caller, !caller.isMember(of: st.st_gid) { mode &= ~S_ISGID }
        guard mode != st.st_mode & 0o7777 else { return }
        // fchmodat2 with AT_EMPTY_PATH: an open file and an O_PATH descriptor alike.
        if (try? Sys.fchmod(pinned: fd, mode)) != nil {
            if let state { state.lock.withWriteLock { state.modeHint = (st.st_mode & ~0o7777) | mode } }
            modeDropped?(node)
        }
    }

    /// A mode changed through this mount: forget what open handles of `identity` knew of it.
    func modeChanged(_ identity: Identity) {
        guard let state = states.withLock({ $0[identity] }) else { return }
        state.lock.withWriteLock { state.modeHint = nil }
    }

    func truncate(fd: Int32, state: FileState, size: Int64) throws(FSError) {
        // Emptying a file needs no key: even a file with a damaged header can be overwritten.
        try withExclusive(fd, state, loadKeys: size > 0) { (content, state) throws(FSError) in
            do throws(ContentError) { state.crypto = try content.truncate(to: size, crypto: state.crypto) } catch {
                state.loaded = false
                throw FSError(error)
            }
            if size == 0 { state.loaded = true }
        }
    }

    /// fallocate(2) modes a length-preserving format can honour: 0 and KEEP_SIZE reserve
    /// backing space (0 also grows the file), PUNCH_HOLE and ZERO_RANGE make a range read
    /// as zeros, whole units becoming holes in the backing file. Others: EOPNOTSUPP.
    public func fallocate(handle: UInt64, mode: Int32, offset: Int64, length: Int64) throws(FSError) {
        try checkWritable()
        let keep = XTS_FALLOC_KEEP_SIZE, punch = XTS_FALLOC_PUNCH_HOLE, zero = XTS_FALLOC_ZERO_RANGE
        guard mode & ~(keep | punch | zero) == 0, !(mode & punch != 0 && mode & zero != 0) else { throw .notSupported }
        // As the kernel: a hole punched must keep the size.
        if mode & punch != 0 && mode & keep == 0 { throw .notSupported }
        guard offset >= 0, length > 0 else { throw .invalidArgument }
        guard offset <= FileSystem.maxFileSize - length else { throw .fileTooLarge }
        let f = try openFile(handle)
        let end = offset + length
        try withExclusive(f.fd, f.state) { (c, s) throws(FSError) in
            do throws(ContentError) {
                let size = try c.plainSize(crypto: s.crypto)
                if mode & (punch | zero) != 0 {
                    s.crypto = try c.zeroRange(offset..<end, crypto: s.crypto)
                } else {
                    // Reserve the ciphertext's space; the blocks read as zeros, that is holes.
                    let r = integrity ? IntegrityLayout.backingRange(plain: offset..<end) : Layout.headerLength + offset..<Layout.headerLength + end
                    do throws(SystemError) { try Sys.fallocate(f.fd, mode: keep, offset: r.lowerBound, length: r.upperBound - r.lowerBound) }
                    catch { throw ContentError.io(error) }
                }
                if mode & keep == 0 && end > size {
                    s.crypto = try c.truncate(to: end, crypto: s.crypto)
                }
            } catch {
                s.loaded = false
                throw FSError(error)
            }
        }
    }

    public func fsync(handle: UInt64, dataOnly: Bool) throws(FSError) {
        let f = try openFile(handle)
        do { if dataOnly { try Sys.fdatasync(f.fd) } else { try Sys.fsync(f.fd) } } catch { throw .system(error) }
    }

    public func release(_ handle: UInt64) {
        guard let f = files.withLock({ $0.removeValue(forKey: handle) }) else { return }
        // Once per written handle rather than per WRITE (a header read and two fstat each).
        if integrity && !sharedStorage && f.writable { f.state.lock.withWriteLock { rememberIntegritySize(f.fd, crypto: f.state.crypto) } }
        Sys.close(f.fd)
        releaseState(f.identity)
    }
}
