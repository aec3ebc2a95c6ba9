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
public struct Caller {
    public var uid: uid_t
    public var gid: gid_t
    /// The caller's supplementary groups, asked for only when needed (it costs a read of
    /// /proc): `groupsOf(context)`. A function that captures nothing and a context pointer
    /// (the FUSE request) rather than a closure per request, which would be an allocation
    /// on every write.
    public var context: UnsafeRawPointer?
    public var groupsOf: (@Sendable (UnsafeRawPointer) -> [gid_t])?
    public init(uid: uid_t, gid: gid_t, context: UnsafeRawPointer? = nil, groupsOf: (@Sendable (UnsafeRawPointer) -> [gid_t])? = nil) {
        self.uid = uid; self.gid = gid; self.context = context; self.groupsOf = groupsOf
    }

    func isMember(of gid: gid_t) -> Bool {
        if gid == self.gid { return true }
        guard let context, let groupsOf else { return false }
        return groupsOf(context).contains(gid)
    }
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
    /// The backing entry's name (empty for "." and ".."), for `lookupListed`.
    public var entry: String = ""
}

/// The encrypted filesystem, in terms of node IDs and plaintext names, without FUSE.
/// Every method is safe to call from many threads at once.
///
/// Every backing access is relative to a directory descriptor and never follows a
/// symlink: a node's directory is opened one name at a time from a cached ancestor
/// (`dirHandle`), and an object is pinned with O_PATH and checked against the identity
/// the node was looked up with before anything changes it (`withPinned`). CIPHERDIR is
/// hostile input; nothing planted in it reaches outside it.
///
/// The operations live in extensions by family: attributes, files, namespace,
/// directories, extended attributes.
///
/// `@unchecked Sendable`: mutable state is in `Mutex`es, per-file state under its `RWLock`.
public final class FileSystem: @unchecked Sendable {
    public static let rootID = NodeTable.rootID
    public static let maxFileSize: Int64 = Layout.maxPlainSize
    public let cipherDir: String
    public let readOnly: Bool
    /// Authenticated contents (feature `blockAuthentication`): files use `IntegrityLayout`,
    /// and their plaintext size is in their header rather than implied by their size. Set
    /// to the volume's tag algorithm.
    public let unitTags: UnitTagAlgorithm?
    public var integrity: Bool { unitTags != nil }
    /// Feature `listingManifests` (FORMAT.md 12.10): every directory has a manifest that
    /// every change of its entries updates (FileSystem+Manifest), and every file a header
    /// with a file ID from its creation on.
    public let listingManifests: Bool
    let manifestLocks = ManifestLocks()
    /// Listing manifests: the file IDs of files this mount created, by backing inode, so
    /// that removing or renaming them needs no header read. A file's ID never changes
    /// (emptying and rekeying keep it); an entry goes when the file's last name does (an
    /// inode number may then be reused). Not used with -o shared.
    let knownFileIDs = Mutex<[Identity: [UInt8]]>([:])
    /// The DEK generations the volume holds: one, or two in the middle of a DEK rekey
    /// (FORMAT.md section 13). Objects of every generation held are read; new ones are
    /// written with the newest. An online rekey adds a generation, and drops the old one
    /// once its sweep is verified.
    let generations: Mutex<KeyGenerations>
    /// The generations as they are now (one lock, no copy of a key).
    var ring: KeyGenerations { generations.withLock { $0 } }
    /// The newest generation's keys: what new objects are written with.
    var keys: KeySet { ring.newest }
    var names: NameCodec { NameCodec(keys: ring.newest) }
    let chownToCaller: Bool
    let log: @Sendable (String) -> Void
    /// CIPHERDIR itself, opened once: everything else is reached from here.
    let root: DirHandle

    let table: Mutex<NodeTable>
    let dirCache: Mutex<DirCache>
    let files = Mutex<[UInt64: OpenFile]>([:])
    let states = Mutex<[Identity: FileState]>([:])
    /// Listings by handle (with OPENDIR) and by node (without: FileSystem+Directories).
    let dirs = Mutex<[UInt64: Listing]>([:])
    let nodeListings = Mutex(NodeListings())
    /// The key of the listings' cookies (`cookie`): random, so that no one can choose names
    /// whose cookies collide.
    let cookieKey = (UInt64.random(in: .min ... .max), UInt64.random(in: .min ... .max))
    let nextHandle: Atomic<UInt64>
    let linkStoreHandle = Mutex<DirHandle?>(nil)
    /// Directories removed (rmdir, or replaced by rename) while the kernel still knows
    /// them, reached through their handle until forgotten: fstat of an open descriptor of
    /// a removed directory still answers, as on ext4.
    let removedDirs = Mutex<[UInt64: DirHandle]>([:])
    /// Directory headers read since the mount, by backing directory and birth time: kept
    /// after the kernel forgets a directory's node, so that opening it again (after
    /// memory pressure, or `drop_caches`) needs no read of its `xtsfs.dir`. The ID of a
    /// directory never changes; a generation seen old when it is already new costs only a
    /// lookup under both (see `directoryInfo`). Our own removals forget their entry
    /// (`withoutDirHeader`); the birth time tells a reused inode number apart. Not used
    /// with -o shared. Emptied when it reaches `knownDirHeadersLimit` entries.
    let knownDirHeaders = Mutex<[BirthIdentity: (id: [UInt8], generation: UInt32)]>([:])
    static let knownDirHeadersLimit = 16384
    /// Held shared by operations that change entries or xattrs; exclusively by an online
    /// rekey's steps that rename or replace them (FileSystem+Rekey.swift).
    let namespaceLock = RWLock()
    /// Set once a generation was added or dropped: node names may be stale since.
    let generationsChanged = Atomic<Bool>(false)
    /// `-o shared`: other hosts change CIPHERDIR too. Cached directory handles and IDs are
    /// revalidated, and a file's keys are checked against its header before each read and
    /// write (FileSystem+Shared). Set before serving.
    public var sharedStorage = false
    /// POSIX locks forwarded to the backing files: one backing descriptor per (file, lock
    /// owner), holding that owner's open-file-description locks (FileSystem+Locks).
    let lockFDs = Mutex<[LockOwner: LockHolder]>([:])
    /// Integrity volumes: committed lengths read from file headers, by backing inode.
    let integritySizes = Mutex<[Identity: IntegritySize]>([:])
    /// Whether clearing setuid/setgid on write, truncate and chown is ours (the FUSE layer
    /// negotiated HANDLE_KILLPRIV_V2, which spares the kernel a `security.capability`
    /// query per write) rather than the kernel's. Set before serving.
    public let killsPrivileges = Atomic<Bool>(false)
    /// Told the node whose mode this filesystem changed by itself (setuid/setgid cleared),
    /// so that the kernel drops the attributes it cached. Set before serving.
    public var modeDropped: (@Sendable (UInt64) -> Void)?

    /// `idBase`: node IDs and handles start above it, so that a filesystem replacing another
    /// on the same mount (a purged cache) never answers for an ID the kernel got from the
    /// old one; 0 for a filesystem of its own.
    /// `olderKeys`: the generations still held besides `keys` (the newest), in the middle
    /// of a DEK rekey.
    public init(cipherDir: String, keys: KeySet, olderKeys: [KeySet] = [], readOnly: Bool, unitTags: UnitTagAlgorithm? = nil, listingManifests: Bool = false, dirCacheCapacity: Int = 1024, idBase: UInt64 = 0,
                log: @escaping @Sendable (String) -> Void) throws(FSError) {
        nextHandle = Atomic(idBase + 1)
        self.cipherDir = cipherDir
        self.unitTags = unitTags
        self.listingManifests = listingManifests && unitTags != nil
        self.generations = Mutex(KeyGenerations(newest: keys, older: olderKeys))
        self.readOnly = readOnly
        self.chownToCaller = geteuid() == 0
        self.log = log
        let fd: Int32
        do { fd = try Sys.open(cipherDir, XTS_O_PATH | O_DIRECTORY) } catch { throw .system(error) }
        root = DirHandle(fd: fd)
        let st: stat
        do { st = try Sys.fstat(fd) } catch { throw .system(error) }
        table = Mutex(NodeTable(root: Identity(st), firstID: idBase + 2))
        dirCache = Mutex(DirCache(capacity: dirCacheCapacity))
        _ = try directoryID(FileSystem.rootID)
    }

    /// The node IDs the kernel may hold (for telling it to forget them and their pages).
    public func knownNodeIDs() -> [UInt64] {
        table.withLock { Array($0.nodes.keys) }
    }

    /// Plaintext names in the root directory (for telling the kernel to forget them).
    public func rootNames() -> [[UInt8]] {
        guard let h = try? opendir(FileSystem.rootID) else { return [] }
        defer { releasedir(h) }
        var out: [[UInt8]] = []
        try? readdir(handle: h, offset: 0) { _, e in
            if e.name != Array(".".utf8) && e.name != Array("..".utf8) { out.append(e.name) }
            return true
        }
        return out
    }

    /// Damage the format detected while serving a request (the caller gets EIO).
    public func logDamage(_ what: String) { log("damaged data: \(what)") }

    func checkWritable() throws(FSError) {
        if readOnly { throw .readOnly }
    }

    // MARK: - reaching backing objects

    /// The directory descriptor of directory node `id`, opened from its parent's if not cached.
    func dirHandle(_ id: UInt64) throws(FSError) -> DirHandle {
        if id == FileSystem.rootID { return root }
        if let h = dirCache.withLock({ $0.get(id) }) {
            guard sharedStorage, !cachedDirectoryIsGone(h) else { return h }
            dirCache.withLock { $0.remove(id) }
        }
        // A rename may move the directory between reading its name and opening it: try again.
        var lastError = FSError.stale
        for _ in 0..<(NodeTable.maxLinks + 3) {
            guard let loc = table.withLock({ $0.location(id) }) else { throw .notFound }
            guard loc.isDirectory else { throw .notDirectory }
            guard let link = loc.link else { throw .notFound }
            let parent = try dirHandle(link.parent)
            let fd: Int32
            do { fd = try Sys.openPath(parent.fd, link.entry, directory: true) } catch {
                // Gone, or something else (a file, a symlink) put in its place.
                lastError = error.errno == ENOENT ? .notFound : (error.errno == ENOTDIR || error.errno == ELOOP) ? .stale : .system(error)
                if error.errno == ENOENT, refreshed(id, link) != nil { continue }
                // A name it no longer has, while it has another: try that one.
                if table.withLock({ $0.dropLinkIfOthers(id, link) }) { continue }
                if table.withLock({ $0.location(id)?.link }) == link { throw lastError }
                continue
            }
            let handle = DirHandle(fd: fd)
            let st: stat
            do { st = try Sys.fstat(fd) } catch { throw .system(error) }
            guard Identity(st) == loc.identity else {
                lastError = .stale
                if table.withLock({ $0.dropLinkIfOthers(id, link) }) { continue }
                if table.withLock({ $0.location(id)?.link }) == link { break }
                continue
            }
            dirCache.withLock { $0.put(id, handle) }
            return handle
        }
        if case .stale = lastError { log("directory \(id) was replaced in CIPHERDIR behind our back") }
        throw lastError
    }

    /// The directory descriptor of `link`'s directory; nil when the kernel forgot that
    /// directory since `location` gave the link (the caller asks `location` again, which
    /// now passes over it: a file with hard links may still be reached by another name).
    func parentHandle(_ link: Link) throws(FSError) -> DirHandle? {
        do { return try dirHandle(link.parent) } catch {
            if case .notFound = error, table.withLock({ $0.isGone(link.parent) }) { return nil }
            throw error
        }
    }

    /// Runs `body` with an O_PATH descriptor of node `id`'s backing object and its attributes,
    /// after checking that the object is still the one the node was looked up as.
    func withPinned<R>(_ id: UInt64, _ body: (Int32, stat) throws(FSError) -> R) throws(FSError) -> R {
        if id == FileSystem.rootID {
            let st: stat
            do { st = try Sys.fstat(root.fd) } catch { throw .system(error) }
            return try body(root.fd, st)
        }
        for _ in 0..<NodeTable.maxLinks {
            guard let loc = table.withLock({ $0.location(id) }) else { throw .notFound }
            guard let link = loc.link else {
                guard let removed = removedDirs.withLock({ $0[id] }) else { throw .notFound }
                let st: stat
                do { st = try Sys.fstat(removed.fd) } catch { throw .system(error) }
                return try body(removed.fd, st)
            }
            guard let dir = try parentHandle(link) else { continue }
            let fd: Int32
            do { fd = try Sys.openPath(dir.fd, link.entry, directory: loc.isDirectory) } catch {
                if error.errno == ENOENT || error.errno == ENOTDIR {
                    // Renamed to its new-generation name by an online rekey: follow it.
                    if error.errno == ENOENT, refreshed(id, link) != nil { continue }
                    // That name is gone; another name of a hard-linked file may still lead there.
                    table.withLock { $0.dropLink(id, link) }
                    continue
                }
                throw .system(error)
            }
            defer { Sys.close(fd) }
            let st: stat
            do { st = try Sys.fstat(fd) } catch { throw .system(error) }
            guard Identity(st) == loc.identity else {
                // A name it had, now another object's: the node may have another name.
                if table.withLock({ $0.dropLinkIfOthers(id, link) }) { continue }
                log("\(link.entry) was replaced in CIPHERDIR behind our back")
                throw .stale
            }
            return try body(fd, st)
        }
        throw .notFound
    }

    /// Attributes of node `id`'s backing object, checked against its identity; with the
    /// directory and entry it was found at (for reading a symlink's target). One fstatat:
    /// getattr is frequent and only reads, so it needs no pinned descriptor.
    func statNode(_ id: UInt64) throws(FSError) -> (stat, DirHandle, String) {
        if id == FileSystem.rootID {
            do { return (try Sys.fstat(root.fd), root, ".") } catch { throw .system(error) }
        }
        for _ in 0..<NodeTable.maxLinks {
            guard let loc = table.withLock({ $0.location(id) }) else { throw .notFound }
            guard let link = loc.link else {
                guard let removed = removedDirs.withLock({ $0[id] }) else { throw .notFound }
                do { return (try Sys.fstat(removed.fd), removed, ".") } catch { throw .system(error) }
            }
            guard let dir = try parentHandle(link) else { continue }
            let st: stat
            do { st = try Sys.fstatat(dir.fd, link.entry) } catch {
                if error.errno == ENOENT {
                    if refreshed(id, link) != nil { continue }
                    table.withLock { $0.dropLink(id, link) }
                    continue
                }
                throw .system(error)
            }
            guard Identity(st) == loc.identity else {
                if table.withLock({ $0.dropLinkIfOthers(id, link) }) { continue }
                throw .stale
            }
            return (st, dir, link.entry)
        }
        throw .notFound
    }

    func directoryID(_ id: UInt64) throws(FSError) -> [UInt8] {
        try directoryInfo(id).id
    }

    /// A directory's ID and the generation its header names (that of its names; in the
    /// middle of a rekey a directory of the old generation may also hold names of the new
    /// one). Cached in the node: the ID never changes, and a generation seen old when it
    /// is already new only costs a lookup under both. With -o shared it is read again at
    /// each use (another host may have replaced the directory).
    func directoryInfo(_ id: UInt64) throws(FSError) -> (id: [UInt8], generation: UInt32) {
        if !sharedStorage, let cached = table.withLock({ $0.nodes[id].flatMap { n in n.directoryID.map { ($0, n.directoryGeneration) } } }) { return cached }
        let dir = try dirHandle(id)
        let birth = sharedStorage ? nil : Sys.birthIdentity(dir.fd)
        if let birth, let known = knownDirHeaders.withLock({ $0[birth] }) {
            table.withLock {
                $0.nodes[id]?.directoryID = known.id
                $0.nodes[id]?.directoryGeneration = known.generation
            }
            return known
        }
        let bytes: [UInt8]
        do { bytes = try Sys.readSmallFile(dir.fd, DirHeader.fileName, limit: 4096) } catch {
            throw .damaged("directory header \(DirHeader.fileName) of node \(id): \(error)")
        }
        let header: DirHeader
        do { header = try DirHeader.decode(bytes, macKey: ring.keys(DirHeader.generation(of: bytes))?.metadataMACKey ?? keys.metadataMACKey) } catch {
            throw .damaged("directory header of node \(id): \(error)")
        }
        table.withLock {
            $0.nodes[id]?.directoryID = header.directoryID
            $0.nodes[id]?.directoryGeneration = header.keyGeneration
        }
        if let birth {
            knownDirHeaders.withLock {
                if $0.count >= FileSystem.knownDirHeadersLimit { $0.removeAll(keepingCapacity: true) }
                $0[birth] = (header.directoryID, header.keyGeneration)
            }
        }
        return (header.directoryID, header.keyGeneration)
    }

    /// Keeps a removed directory reachable (a duplicate of `pinned`) while node `id` lives.
    func retireDirectory(_ id: UInt64, pinned: Int32) {
        dirCache.withLock { $0.remove(id) }
        let fd = fcntl(pinned, F_DUPFD_CLOEXEC, 0)
        guard fd >= 0, table.withLock({ $0.nodes[id] != nil }) else {
            if fd >= 0 { Sys.close(fd) }
            return
        }
        removedDirs.withLock { $0[id] = DirHandle(fd: fd) }
    }

    /// The backing directory and entry for `name` in directory `parent`: the entry that
    /// exists under an older generation held, else the newest generation's (where a new
    /// entry goes). With one generation, or in a directory whose header is of the newest,
    /// that is one encryption and no stat; in a directory of an older generation during a
    /// rekey, a stat per older generation.
    func entry(_ parent: UInt64, _ name: [UInt8]) throws(FSError) -> (dir: DirHandle, backing: BackingName) {
        let (dirID, dirGeneration) = try directoryInfo(parent)
        let dir = try dirHandle(parent)
        let ring = self.ring
        let newest: BackingName
        do { newest = try NameCodec(keys: ring.newest).encrypt(name, directoryID: dirID) } catch { throw FSError(error) }
        if ring.older.isEmpty || dirGeneration == ring.newest.generation { return (dir, newest) }
        // Older names first: an online rekey only ever renames an entry from an older name
        // to the newest, so looking in this order never misses an entry it moves meanwhile.
        for k in ring.older {
            guard let b = try? NameCodec(keys: k).encrypt(name, directoryID: dirID) else { continue }
            if (try? Sys.fstatat(dir.fd, b.entryName)) != nil { return (dir, b) }
        }
        return (dir, newest)
    }

    func writeLongNameFile(_ dir: DirHandle, _ b: BackingName) throws(FSError) {
        guard case .long(let hashed, let full) = b else { return }
        do { try Sys.atomicWrite(Array(full.utf8), at: dir.fd, hashed + NameCodec.longSuffix, mode: 0o444) }
        catch { throw .system(error) }
    }

    func removeLongNameFile(_ dir: DirHandle, _ b: BackingName) {
        guard case .long(let hashed, _) = b else { return }
        _ = Glibc.unlinkat(dir.fd, hashed + NameCodec.longSuffix, 0)
    }

    /// Backing attributes with plaintext sizes. `target` reads a symlink's target when asked;
    /// `header` opens a regular file for reading (integrity volumes keep the size in there).
    func translate(_ st: stat, header: HeaderSource = .none, target: () -> [UInt8]?) -> stat {
        var out = st
        // The mode is tested by hand: with `st.isRegular` here the Swift 6.3 compiler fails
        // this file now and then ("value of type 'stat' has no member 'isRegular'").
        let type = st.st_mode & S_IFMT
        if type == S_IFREG {
            out.st_size = off_t(integrity ? integritySize(st, header) : Layout.plainSize(backingSize: Int64(st.st_size)))
        } else if type == S_IFLNK, let raw = target(), let plain = try? decryptedTarget(raw) {
            out.st_size = off_t(plain.count)
        }
        return out
    }
}
