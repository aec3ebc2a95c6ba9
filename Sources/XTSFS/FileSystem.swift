import CSysShim
import Synchronization
import XTSContent
import XTSCrypto
import XTSFormat
import XTSKeys
import XTSSystem
#if canImport(Glibc)
import Glibc
#endif

/// Who is asking: files they create are theirs when the daemon runs as root.
public struct Caller: Sendable {
    public var uid: uid_t
    public var gid: gid_t
    public init(uid: uid_t, gid: gid_t) { self.uid = uid; self.gid = gid }
}

/// Attribute changes of a setattr; nil leaves a field alone.
public struct AttributeChanges: Sendable {
    public var mode: mode_t?
    public var uid: uid_t?
    public var gid: gid_t?
    public var size: Int64?
    /// `tv_nsec == UTIME_NOW` means "now".
    public var atime: timespec?
    public var mtime: timespec?
    public init() {}
}

public struct DirectoryEntry: Sendable {
    public var name: [UInt8]
    public var type: UInt8
    public var ino: UInt64
}

/// Per backing file state shared by all its open handles: the lock that serialises
/// read-modify-write and the file's keys.
///
/// `@unchecked Sendable`: `crypto` and `loaded` are touched only under `lock` (write side).
final class FileState: @unchecked Sendable {
    let lock = RWLock()
    var crypto: FileCrypto?
    var loaded = false
    var references = 0
}

struct InodeKey: Hashable { var dev: UInt64; var ino: UInt64 }

/// `@unchecked Sendable`: immutable after open; the state it points to has its own lock.
final class OpenFile: @unchecked Sendable {
    let fd: Int32
    let node: UInt64
    let key: InodeKey
    let state: FileState
    init(fd: Int32, node: UInt64, key: InodeKey, state: FileState) {
        self.fd = fd; self.node = node; self.key = key; self.state = state
    }
}

/// The encrypted filesystem, in terms of node IDs and plaintext names, without FUSE.
/// Every method is safe to call from many threads at once.
///
/// `@unchecked Sendable`: mutable state is in `Mutex`es, per-file state under its `RWLock`.
public final class FileSystem: @unchecked Sendable {
    public static let rootID = NodeTable.rootID
    /// Far below where offset arithmetic (header, unit rounding) could overflow Int64.
    public static let maxFileSize: Int64 = 1 << 60
    public let cipherDir: String
    public let readOnly: Bool
    let keys: KeySet
    let names: NameCodec
    /// The keys of each DEK generation the volume holds (one until rekey exists); built once,
    /// not per request.
    let keysByGeneration: @Sendable (UInt32) -> KeySet?
    let chownToCaller: Bool
    let log: @Sendable (String) -> Void

    private let table = Mutex(NodeTable())
    private let files = Mutex<[UInt64: OpenFile]>([:])
    private let states = Mutex<[InodeKey: FileState]>([:])
    private let dirs = Mutex<[UInt64: [DirectoryEntry]]>([:])
    private let nextHandle = Atomic<UInt64>(1)

    public init(cipherDir: String, keys: KeySet, readOnly: Bool, log: @escaping @Sendable (String) -> Void) throws(FSError) {
        self.cipherDir = cipherDir
        self.keys = keys
        self.names = NameCodec(keys: keys)
        self.keysByGeneration = { [keys] gen in gen == keys.generation ? keys : nil }
        self.readOnly = readOnly
        self.chownToCaller = geteuid() == 0
        self.log = log
        _ = try directoryID(FileSystem.rootID)
    }

    /// Damage the format detected while serving a request (the caller gets EIO).
    public func logDamage(_ what: String) { log("damaged data: \(what)") }

    // MARK: - paths and names

    func path(_ id: UInt64) throws(FSError) -> String {
        guard let p = table.withLock({ $0.path(id, root: cipherDir) }) else { throw .notFound }
        return p
    }

    func directoryID(_ id: UInt64) throws(FSError) -> [UInt8] {
        if let cached = table.withLock({ $0.nodes[id]?.directoryID }) { return cached }
        let dir = try path(id)
        let bytes: [UInt8]
        do { bytes = try Sys.readFile(dir + "/" + DirHeader.fileName, limit: 4096) } catch {
            if error.errno == ENOENT { throw .damaged("\(dir) has no \(DirHeader.fileName)") }
            if error.errno == ENOTDIR { throw .notDirectory }
            throw .system(error)
        }
        let header: DirHeader
        do { header = try DirHeader.decode(bytes, macKey: keys.metadataMACKey) } catch {
            log("directory header of \(dir): \(error)")
            throw .damaged("directory header: \(error)")
        }
        table.withLock { $0.nodes[id]?.directoryID = header.directoryID }
        return header.directoryID
    }

    /// The backing entry for `name` in directory `parent`.
    func entry(_ parent: UInt64, _ name: [UInt8]) throws(FSError) -> (dir: String, backing: BackingName) {
        let dirID = try directoryID(parent)
        let dir = try path(parent)
        do { return (dir, try names.encrypt(name, directoryID: dirID)) } catch { throw FSError(error) }
    }

    private func writeLongNameFile(_ dir: String, _ b: BackingName) throws(FSError) {
        guard case .long(let hashed, let full) = b else { return }
        do { try Sys.atomicWrite(Array(full.utf8), to: dir + "/" + hashed + NameCodec.longSuffix, mode: 0o444) }
        catch { throw .system(error) }
    }

    private func removeLongNameFile(_ dir: String, _ b: BackingName) {
        guard case .long(let hashed, _) = b else { return }
        _ = Glibc.unlink(dir + "/" + hashed + NameCodec.longSuffix)
    }

    private func checkWritable() throws(FSError) {
        if readOnly { throw .readOnly }
    }

    // MARK: - attributes

    /// Backing attributes with plaintext sizes.
    func translate(_ st: stat, path: String?) -> stat {
        var out = st
        if st.isRegular {
            out.st_size = off_t(Layout.plainSize(backingSize: Int64(st.st_size)))
        } else if st.isSymlink, let path, let raw = try? Sys.readlink(path), let target = try? names.decryptTarget(raw) {
            out.st_size = off_t(target.count)
        }
        return out
    }

    public func lookup(parent: UInt64, name: [UInt8]) throws(FSError) -> (UInt64, stat) {
        let (dir, b) = try entry(parent, name)
        let p = dir + "/" + b.entryName
        let st: stat
        do { st = try Sys.lstat(p) } catch { throw error.errno == ENOENT ? .notFound : .system(error) }
        let id = table.withLock { $0.add(parent: parent, name: name, backingName: b.entryName) }
        return (id, translate(st, path: p))
    }

    public func forget(_ id: UInt64, count: UInt64) {
        table.withLock { $0.forget(id, count) }
    }

    public func getattr(_ id: UInt64, handle: UInt64?) throws(FSError) -> stat {
        if let h = handle, let f = files.withLock({ $0[h] }) {
            do { return translate(try Sys.fstat(f.fd), path: nil) } catch { throw .system(error) }
        }
        let p: String
        do { p = try path(id) } catch {
            // Unlinked while open: answer from an open handle of the node.
            if let f = files.withLock({ $0.values.first { $0.node == id } }) {
                do { return translate(try Sys.fstat(f.fd), path: nil) } catch { throw .system(error) }
            }
            throw error
        }
        do { return translate(try Sys.lstat(p), path: p) } catch { throw error.errno == ENOENT ? .notFound : .system(error) }
    }

    public func setattr(_ id: UInt64, handle: UInt64?, changes c: AttributeChanges) throws(FSError) -> stat {
        try checkWritable()
        let p = try? path(id)
        // No handle comes with fchmod/fchown/futimens; an unlinked file is reached through any open one.
        let open = handle.flatMap { h in files.withLock { $0[h] } } ?? (p == nil ? files.withLock { $0.values.first { $0.node == id } } : nil)
        do {
            if let mode = c.mode {
                if let open { _ = try Sys.check("fchmod") { fchmod(open.fd, mode & 0o7777) } }
                else if let p { try Sys.chmod(p, mode & 0o7777) } else { throw FSError.notFound }
            }
            if c.uid != nil || c.gid != nil {
                let uid = c.uid ?? uid_t.max, gid = c.gid ?? gid_t.max
                if let open { _ = try Sys.check("fchown") { fchown(open.fd, uid, gid) } }
                else if let p { try Sys.lchown(p, uid, gid) } else { throw FSError.notFound }
            }
            if let size = c.size {
                guard size >= 0 else { throw FSError.invalidArgument }
                guard size <= FileSystem.maxFileSize else { throw FSError.fileTooLarge }
                try truncate(id, path: p, open: open, size: size)
            }
            if c.atime != nil || c.mtime != nil {
                let omit = timespec(tv_sec: 0, tv_nsec: Int(Sys.utimeOmit))
                if let open {
                    var times = [c.atime ?? omit, c.mtime ?? omit]
                    _ = try Sys.check("futimens") { futimens(open.fd, &times) }
                } else if let p {
                    try Sys.utimens(p, c.atime ?? omit, c.mtime ?? omit)
                } else { throw FSError.notFound }
            }
        } catch let e as FSError { throw e } catch let e as SystemError { throw .system(e) } catch { throw .damaged("\(error)") }
        return try getattr(id, handle: handle)
    }

    private func truncate(_ id: UInt64, path p: String?, open: OpenFile?, size: Int64) throws(FSError) {
        if let open {
            try truncate(fd: open.fd, state: open.state, size: size)
            return
        }
        guard let p else { throw .notFound }
        let fd: Int32
        do { fd = try Sys.open(p, O_RDWR | O_NOFOLLOW) } catch { throw error.errno == EISDIR ? .isDirectory : .system(error) }
        defer { Sys.close(fd) }
        let (key, state) = try acquireState(fd)
        defer { releaseState(key) }
        try truncate(fd: fd, state: state, size: size)
    }

    private func truncate(fd: Int32, state: FileState, size: Int64) throws(FSError) {
        // Emptying a file needs no key: even a file with a damaged header can be overwritten.
        try withExclusive(fd, state, loadKeys: size > 0) { (content, state) throws(FSError) in
            do throws(ContentError) { state.crypto = try content.truncate(to: size, crypto: state.crypto) } catch {
                state.loaded = false
                throw FSError(error)
            }
            if size == 0 { state.loaded = true }
        }
    }

    // MARK: - file state and content

    private func content(_ fd: Int32) -> ContentFile<FDBackingFile> {
        ContentFile(file: FDBackingFile(fd: fd), currentKeys: keys, keys: keysByGeneration)
    }

    /// Runs `body` under the file's exclusive lock with its keys loaded.
    private func withExclusive<R>(_ fd: Int32, _ state: FileState, loadKeys: Bool = true, _ body: (ContentFile<FDBackingFile>, FileState) throws(FSError) -> R) throws(FSError) -> R {
        let c = content(fd)
        return try state.lock.withWriteLock { () throws(FSError) -> R in
            if !state.loaded && loadKeys {
                do throws(ContentError) { state.crypto = try c.loadCrypto() } catch { throw FSError(error) }
                state.loaded = true
            }
            return try body(c, state)
        }
    }

    private func acquireState(_ fd: Int32) throws(FSError) -> (InodeKey, FileState) {
        let st: stat
        do { st = try Sys.fstat(fd) } catch { throw .system(error) }
        guard st.isRegular else { throw st.isDirectory ? .isDirectory : .invalidArgument }
        let key = InodeKey(dev: UInt64(st.st_dev), ino: UInt64(st.st_ino))
        let state = states.withLock { table in
            let s = table[key] ?? FileState()
            s.references += 1
            table[key] = s
            return s
        }
        return (key, state)
    }

    private func releaseState(_ key: InodeKey) {
        states.withLock { table in
            guard let s = table[key] else { return }
            s.references -= 1
            if s.references == 0 { table[key] = nil }
        }
    }

    private func register(fd: Int32, node: UInt64) throws(FSError) -> UInt64 {
        let (key, state) = try acquireState(fd)
        let h = nextHandle.wrappingAdd(1, ordering: .relaxed).oldValue
        let f = OpenFile(fd: fd, node: node, key: key, state: state)
        files.withLock { $0[h] = f }
        return h
    }

    private func openFile(_ h: UInt64) throws(FSError) -> OpenFile {
        guard let f = files.withLock({ $0[h] }) else { throw .badHandle }
        return f
    }

    /// The backing file is opened read-write even for write-only opens: partial-block
    /// writes must read the block they change.
    private static func backingFlags(_ flags: Int32) -> Int32 {
        let acc = flags & O_ACCMODE
        return (acc == O_RDONLY ? O_RDONLY : O_RDWR) | (flags & (O_SYNC | O_DSYNC)) | O_NOFOLLOW
    }

    public func open(_ id: UInt64, flags: Int32) throws(FSError) -> UInt64 {
        let writing = flags & O_ACCMODE != O_RDONLY || flags & O_TRUNC != 0
        if writing { try checkWritable() }
        let p = try path(id)
        var fd: Int32
        var writeOnly = false
        do { fd = try Sys.open(p, FileSystem.backingFlags(flags)) } catch {
            guard error.errno == EACCES, flags & O_ACCMODE == O_WRONLY else { throw .system(error) }
            do { fd = try Sys.open(p, O_WRONLY | O_NOFOLLOW) } catch { throw .system(error) }
            writeOnly = true
        }
        let h: UInt64
        do { h = try register(fd: fd, node: id) } catch { Sys.close(fd); throw error }
        let f = try openFile(h)
        do throws(FSError) {
            if flags & O_TRUNC != 0 {
                // libfuse's atomic O_TRUNC: empty the plaintext (the header goes with it).
                try truncate(fd: f.fd, state: f.state, size: 0)
            } else if !writeOnly && !f.state.lock.withReadLock({ f.state.loaded }) {
                // Load the file's keys now, so a damaged header is an error at open. Later
                // would be too late for a header cut short: the file then looks empty and
                // the kernel never asks us to read it. (A write-only backing descriptor
                // cannot read the header; its first write loads the keys.)
                try withExclusive(f.fd, f.state) { (_, _) throws(FSError) in }
            }
        } catch { release(h); throw error }
        return h
    }

    public func create(parent: UInt64, name: [UInt8], mode: mode_t, flags: Int32, caller: Caller) throws(FSError) -> (UInt64, stat, UInt64) {
        try checkWritable()
        let (dir, b) = try entry(parent, name)
        try writeLongNameFile(dir, b)
        let p = dir + "/" + b.entryName
        let fd: Int32
        do { fd = try Sys.open(p, O_CREAT | O_EXCL | FileSystem.backingFlags(flags), mode & 0o7777) } catch {
            // A name taken since the kernel's lookup is EEXIST even without O_EXCL: opening
            // the existing file here would skip the kernel's permission check on it.
            // The side file of a long name that already exists belongs to that entry: keep it.
            if error.errno != EEXIST { removeLongNameFile(dir, b) }
            throw error.errno == EEXIST ? .exists : .system(error)
        }
        if chownToCaller { _ = fchown(fd, caller.uid, groupFor(caller, in: dir)) }
        let st: stat
        do { st = try Sys.fstat(fd) } catch { Sys.close(fd); throw .system(error) }
        let id = table.withLock { $0.add(parent: parent, name: name, backingName: b.entryName) }
        do { return (id, translate(st, path: nil), try register(fd: fd, node: id)) } catch {
            Sys.close(fd)
            forget(id, count: 1)
            throw error
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
                guard f.state.loaded else { return nil }
                do throws(ContentError) { return try c.read(into: buffer, at: offset, crypto: f.state.crypto) } catch { throw FSError(error) }
            }
            if let n { return n }
            try withExclusive(f.fd, f.state) { (_, _) throws(FSError) in }
        }
    }

    public func write(handle: UInt64, offset: Int64, data: UnsafeRawBufferPointer) throws(FSError) -> Int {
        try checkWritable()
        guard offset >= 0, offset <= FileSystem.maxFileSize - Int64(data.count) else { throw .fileTooLarge }
        let f = try openFile(handle)
        // O_APPEND needs nothing here: without the writeback cache the kernel sends such
        // writes at the current size, and page writeback (mmap) must keep its offset.
        return try withExclusive(f.fd, f.state) { (c, s) throws(FSError) -> Int in
            do throws(ContentError) { s.crypto = try c.write(data, at: offset, crypto: s.crypto) } catch {
                // A partial write may have left a new header on disk: read it again next time.
                s.loaded = false
                throw FSError(error)
            }
            return data.count
        }
    }

    public func fsync(handle: UInt64, dataOnly: Bool) throws(FSError) {
        let f = try openFile(handle)
        do { if dataOnly { try Sys.fdatasync(f.fd) } else { try Sys.fsync(f.fd) } } catch { throw .system(error) }
    }

    public func fsyncdir(_ id: UInt64) throws(FSError) {
        do { try Sys.fsyncDirectory(try path(id)) } catch let e as FSError { throw e } catch let e as SystemError { throw .system(e) } catch { throw .damaged("\(error)") }
    }

    public func release(_ handle: UInt64) {
        guard let f = files.withLock({ $0.removeValue(forKey: handle) }) else { return }
        Sys.close(f.fd)
        releaseState(f.key)
    }

    // MARK: - namespace

    /// The group of a new entry: the caller's, except in a setgid directory, where the
    /// backing filesystem has already given it the directory's group (gid_t.max: leave it).
    private func groupFor(_ caller: Caller, in dir: String) -> gid_t {
        if let st = try? Sys.lstat(dir), st.st_mode & S_ISGID != 0 { return gid_t.max }
        return caller.gid
    }

    private func newEntry(parent: UInt64, name: [UInt8], caller: Caller, make: (String) throws(SystemError) -> Void) throws(FSError) -> (UInt64, stat) {
        try checkWritable()
        let (dir, b) = try entry(parent, name)
        try writeLongNameFile(dir, b)
        let p = dir + "/" + b.entryName
        do { try make(p) } catch {
            // The side file of a long name that already exists belongs to that entry: keep it.
            if error.errno != EEXIST { removeLongNameFile(dir, b) }
            throw error.errno == EEXIST ? .exists : .system(error)
        }
        if chownToCaller { _ = Glibc.lchown(p, caller.uid, groupFor(caller, in: dir)) }
        let st: stat
        do { st = try Sys.lstat(p) } catch { throw .system(error) }
        let id = table.withLock { $0.add(parent: parent, name: name, backingName: b.entryName) }
        return (id, translate(st, path: p))
    }

    public func mknod(parent: UInt64, name: [UInt8], mode: mode_t, rdev: dev_t, caller: Caller) throws(FSError) -> (UInt64, stat) {
        try newEntry(parent: parent, name: name, caller: caller) { (p) throws(SystemError) in
            if mode & S_IFMT == S_IFREG || mode & S_IFMT == 0 {
                let fd = try Sys.open(p, O_CREAT | O_EXCL | O_WRONLY, mode & 0o7777)
                Sys.close(fd)
            } else {
                try Sys.mknod(p, mode, rdev)
            }
        }
    }

    public func mkdir(parent: UInt64, name: [UInt8], mode: mode_t, caller: Caller) throws(FSError) -> (UInt64, stat) {
        let header: [UInt8]
        do { header = try DirHeader.random(keyGeneration: keys.generation).encode(macKey: keys.metadataMACKey) } catch { throw .damaged("\(error)") }
        return try newEntry(parent: parent, name: name, caller: caller) { (p) throws(SystemError) in
            // Owner-writable until its header is in, then the mode asked for.
            try Sys.mkdir(p, 0o700)
            do throws(SystemError) {
                // A new directory is invisible to readers until this returns: no rename needed.
                try Sys.writeNewFile(header, to: p + "/" + DirHeader.fileName, mode: 0o444)
                // Keep the setgid bit a setgid parent passes down.
                let inherited = (try? Sys.lstat(p)).map { $0.st_mode & S_ISGID } ?? 0
                try Sys.chmod(p, (mode & 0o7777) | inherited)
            } catch {
                _ = Glibc.unlink(p + "/" + DirHeader.fileName)
                _ = Glibc.rmdir(p)
                throw error
            }
        }
    }

    public func symlink(target: [UInt8], parent: UInt64, name: [UInt8], caller: Caller) throws(FSError) -> (UInt64, stat) {
        let encrypted: String
        do { encrypted = try names.encryptTarget(target) } catch { throw FSError(error) }
        return try newEntry(parent: parent, name: name, caller: caller) { (p) throws(SystemError) in
            try Sys.symlink(encrypted, p)
        }
    }

    public func readlink(_ id: UInt64) throws(FSError) -> [UInt8] {
        let p = try path(id)
        let raw: [UInt8]
        do { raw = try Sys.readlink(p) } catch { throw .system(error) }
        do { return try names.decryptTarget(raw) } catch { throw FSError(error) }
    }

    public func unlink(parent: UInt64, name: [UInt8]) throws(FSError) {
        try checkWritable()
        let (dir, b) = try entry(parent, name)
        do { try Sys.unlink(dir + "/" + b.entryName) } catch { throw error.errno == ENOENT ? .notFound : .system(error) }
        removeLongNameFile(dir, b)
        table.withLock { $0.detach(parent: parent, name: name) }
    }

    /// A backing directory is empty for the user when it holds only its `xtsfs.dir`.
    private func isEmptyDirectory(_ p: String) throws(FSError) -> Bool {
        do { return try Sys.listDirectory(p).allSatisfy { $0.name == DirHeader.fileName } } catch { throw .system(error) }
    }

    /// Removes an empty backing directory's header and runs `body`; puts the header back if `body` fails.
    private func withoutDirHeader(_ p: String, _ body: () throws(SystemError) -> Void) throws(FSError) {
        guard try isEmptyDirectory(p) else { throw .notEmpty }
        let hp = p + "/" + DirHeader.fileName
        let saved: [UInt8]
        do { saved = try Sys.readFile(hp) } catch { throw .system(error) }
        // POSIX lets rmdir remove a directory its owner cannot write into; removing our
        // header inside it can need that write permission, so lend it for the moment.
        var restoreMode: mode_t?
        do { try Sys.unlink(hp) } catch {
            guard error.errno == EACCES, let st = try? Sys.lstat(p), (try? Sys.chmod(p, (st.st_mode & 0o7777) | 0o700)) != nil else { throw .system(error) }
            restoreMode = st.st_mode & 0o7777
            do { try Sys.unlink(hp) } catch {
                _ = try? Sys.chmod(p, restoreMode!)
                throw .system(error)
            }
        }
        do { try body() } catch {
            _ = try? Sys.atomicWrite(saved, to: hp, mode: 0o444)
            if let m = restoreMode { _ = try? Sys.chmod(p, m) }
            throw error.errno == EEXIST ? .notEmpty : .system(error)
        }
    }

    public func rmdir(parent: UInt64, name: [UInt8]) throws(FSError) {
        try checkWritable()
        let (dir, b) = try entry(parent, name)
        let p = dir + "/" + b.entryName
        let st: stat
        do { st = try Sys.lstat(p) } catch { throw error.errno == ENOENT ? .notFound : .system(error) }
        guard st.isDirectory else { throw .notDirectory }
        try withoutDirHeader(p) { () throws(SystemError) in try Sys.rmdir(p) }
        removeLongNameFile(dir, b)
        table.withLock { $0.detach(parent: parent, name: name) }
    }

    public func rename(parent: UInt64, name: [UInt8], newParent: UInt64, newName: [UInt8], flags: UInt32) throws(FSError) {
        try checkWritable()
        let exchange = UInt32(XTS_RENAME_EXCHANGE), noReplace = UInt32(XTS_RENAME_NOREPLACE)
        guard flags & ~(exchange | noReplace) == 0, flags & exchange == 0 else { throw .invalidArgument }
        let (sdir, sb) = try entry(parent, name)
        let (ddir, db) = try entry(newParent, newName)
        let src = sdir + "/" + sb.entryName, dst = ddir + "/" + db.entryName
        if src == dst { return }
        let sst: stat
        do { sst = try Sys.lstat(src) } catch { throw error.errno == ENOENT ? .notFound : .system(error) }
        let dst_st = try? Sys.lstat(dst)
        if let d = dst_st, flags & noReplace != 0 { _ = d; throw .exists }
        try writeLongNameFile(ddir, db)
        let doRename = { () throws(SystemError) in
            if flags & noReplace != 0 { try Sys.renameNoReplace(src, dst) } else { try Sys.rename(src, dst) }
        }
        do throws(FSError) {
            if sst.isDirectory, let d = dst_st, d.isDirectory {
                try withoutDirHeader(dst, doRename)
            } else {
                do { try doRename() } catch { throw FSError.system(error) }
            }
        } catch {
            if dst_st == nil { removeLongNameFile(ddir, db) }
            if case .system(let e) = error, e.errno == ENOENT { throw FSError.notFound }
            throw error
        }
        if sb != db { removeLongNameFile(sdir, sb) }
        table.withLock { $0.move(parent: parent, name: name, to: newParent, newName: newName, backingName: db.entryName) }
    }

    // MARK: - directories

    public func opendir(_ id: UInt64) throws(FSError) -> UInt64 {
        let p = try path(id)
        let dirID = try directoryID(id)
        let raw: [(name: String, type: UInt8, ino: UInt64)]
        do { raw = try Sys.listDirectory(p) } catch { throw .system(error) }
        // glibc's readdir hides entries with inode 0, so "." and ".." carry the backing ones.
        let selfIno = (try? Sys.lstat(p)).map { UInt64($0.st_ino) } ?? 1
        let parentIno = (try? Sys.lstat(p + "/..")).map { UInt64($0.st_ino) } ?? 1
        var out = [DirectoryEntry(name: Array(".".utf8), type: UInt8(DT_DIR), ino: selfIno),
                   DirectoryEntry(name: Array("..".utf8), type: UInt8(DT_DIR), ino: parentIno)]
        out.reserveCapacity(raw.count + 2)
        for e in raw {
            var encoded = e.name
            if NameCodec.isInternal(e.name) {
                guard NameCodec.isLongName(e.name),
                      let full = try? Sys.readFile(p + "/" + e.name + NameCodec.longSuffix, limit: 4096) else { continue }
                encoded = String(decoding: full, as: UTF8.self)
            }
            do {
                out.append(DirectoryEntry(name: try names.decrypt(encoded, directoryID: dirID), type: e.type, ino: e.ino))
            } catch {
                log("skipping undecryptable entry \(p)/\(e.name): \(error)")
            }
        }
        let h = nextHandle.wrappingAdd(1, ordering: .relaxed).oldValue
        dirs.withLock { $0[h] = out }
        return h
    }

    /// Entries from index `offset` on; the FUSE layer stops when its buffer is full.
    public func readdir(handle: UInt64, offset: Int, _ body: (Int, DirectoryEntry) -> Bool) throws(FSError) {
        guard let entries = dirs.withLock({ $0[handle] }) else { throw .badHandle }
        var i = offset
        while i < entries.count {
            if !body(i + 1, entries[i]) { break }
            i += 1
        }
    }

    public func releasedir(_ handle: UInt64) {
        _ = dirs.withLock { $0.removeValue(forKey: handle) }
    }

    public func statfs() throws(FSError) -> statvfs {
        do {
            var s = try Sys.statvfs(cipherDir)
            s.f_namemax = UInt(NameCodec.maxPlainName)
            return s
        } catch { throw .system(error) }
    }
}
