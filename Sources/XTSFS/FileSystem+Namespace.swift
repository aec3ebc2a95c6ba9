import CSysShim
import XTSContent
import XTSFormat
import XTSSystem
#if canImport(Glibc)
import Glibc
#endif

extension FileSystem {
    public func lookup(parent: UInt64, name: [UInt8]) throws(FSError) -> (UInt64, stat) {
        let seen = table.withLock { $0.changes }
        var (dir, b) = try entry(parent, name)
        var st: stat
        do { st = try Sys.fstatat(dir.fd, b.entryName) } catch {
            guard error.errno == ENOENT else { throw .system(error) }
            // An online rekey may have renamed the entry to its new-generation name since
            // it was found (names only ever move to the newest): look once more.
            guard !ring.older.isEmpty else { throw .notFound }
            (dir, b) = try entry(parent, name)
            do { st = try Sys.fstatat(dir.fd, b.entryName) } catch { throw error.errno == ENOENT ? .notFound : .system(error) }
        }
        guard let found = register(parent: parent, name: name, entry: b.entryName, in: dir, st, seen: seen) else { throw .notFound }
        return found
    }

    /// The node for what (parent, name) was just found to be, and its attributes as the
    /// kernel sees them: shared by `lookup` and `lookupListed`. `seen`: the table's change
    /// count read before `st` was taken. If a name went away since (a rename or unlink
    /// running beside this lookup), the name is checked again, so that a name already
    /// taken away is not put back into the node (where it would come first, and lead
    /// nowhere or, once the inode number is reused, to another object); nil if it is gone.
    private func register(parent: UInt64, name: [UInt8], entry: String, in dir: DirHandle, _ st: stat, seen: UInt64) -> (UInt64, stat)? {
        let link = Link(parent: parent, name: name, entry: entry), identity = Identity(st)
        let (id, raced) = table.withLock { t in (t.add(link, identity: identity, isDirectory: st.isDirectory), t.changes != seen) }
        if raced, (try? Sys.fstatat(dir.fd, entry)).map(Identity.init) != identity {
            table.withLock { $0.retract(id, link, identity: identity) }
            return nil
        }
        return (id, translate(st, header: .entry(dir.fd, entry)) { try? Sys.readlinkat(dir.fd, entry) })
    }

    /// `lookup` of an entry a directory listing just gave (READDIRPLUS): the backing name
    /// is known, so the plaintext name is not encrypted again. nil when the entry is gone
    /// or is not what it was listed as; the caller then lists it without attributes.
    public func lookupListed(parent: UInt64, _ e: DirectoryEntry) -> (UInt64, stat)? {
        let seen = table.withLock { $0.changes }
        guard !e.entry.isEmpty, let dir = try? dirHandle(parent), let st = try? Sys.fstatat(dir.fd, e.entry),
              UInt64(st.st_ino) == e.ino else { return nil }
        return register(parent: parent, name: e.name, entry: e.entry, in: dir, st, seen: seen)
    }

    public func forget(_ id: UInt64, count: UInt64) {
        if table.withLock({ $0.forget(id, count) }) {
            dirCache.withLock { $0.remove(id) }
            _ = removedDirs.withLock { $0.removeValue(forKey: id) }
            nodeListings.withLock { $0.remove(id) }
        }
    }

    /// The group of a new entry: the caller's, except in a setgid directory, where the
    /// backing filesystem has already given it the directory's group (gid_t.max: leave it).
    func groupFor(_ caller: Caller, in dir: DirHandle) -> gid_t {
        if let st = try? Sys.fstat(dir.fd), st.st_mode & S_ISGID != 0 { return gid_t.max }
        return caller.gid
    }

    /// Creates an entry with `make(dirfd, entryName)`, then pins it to give it to the caller
    /// and learn its identity. The caller has checked that the filesystem is writable (before
    /// any manifest is written).
    private func newEntry(parent: UInt64, name: [UInt8], caller: Caller, directory: Bool = false, make: (Int32, String) throws(SystemError) -> Void) throws(FSError) -> (UInt64, stat) {
        let (dir, b) = try entry(parent, name)
        try writeLongNameFile(dir, b)
        do { try make(dir.fd, b.entryName) } catch {
            // The side file of a long name that already exists belongs to that entry: keep it.
            if error.errno != EEXIST { removeLongNameFile(dir, b) }
            throw error.errno == EEXIST ? .exists : .system(error)
        }
        let pinned: Int32
        do { pinned = try Sys.openPath(dir.fd, b.entryName, directory: directory) } catch { throw .system(error) }
        defer { Sys.close(pinned) }
        if chownToCaller {
            let gid = groupFor(caller, in: dir)
            try? Sys.fchown(pinned: pinned, caller.uid, gid)
            // A new directory's manifest belongs to its owner too: a later mount by that user
            // (not root) must be able to rewrite it.
            if directory && listingManifests { _ = Glibc.fchownat(pinned, ListManifest.fileName, caller.uid, gid, AT_SYMLINK_NOFOLLOW) }
        }
        let st: stat
        do { st = try Sys.fstat(pinned) } catch { throw .system(error) }
        let id = table.withLock { $0.add(Link(parent: parent, name: name, entry: b.entryName), identity: Identity(st), isDirectory: st.isDirectory) }
        return (id, translate(st) { try? Sys.readlinkat(pinned, "") })
    }

    public func mknod(parent: UInt64, name: [UInt8], mode: mode_t, rdev: dev_t, caller: Caller) throws(FSError) -> (UInt64, stat) {
        try withNamespace { () throws(FSError) in try mknodLocked(parent: parent, name: name, mode: mode, rdev: rdev, caller: caller) }
    }

    private func mknodLocked(parent: UInt64, name: [UInt8], mode: mode_t, rdev: dev_t, caller: Caller) throws(FSError) -> (UInt64, stat) {
        try checkWritable()
        let regular = mode & S_IFMT == S_IFREG || mode & S_IFMT == 0
        let fileID = try regular ? newFileID() : nil
        let identity: [UInt8]
        switch mode & S_IFMT {
        case S_IFCHR, S_IFBLK: identity = ListingElement.identity(rdev: UInt64(rdev))
        default: identity = fileID ?? ListingElement.zero
        }
        let type = regular ? UInt8(DT_REG) : UInt8(truncatingIfNeeded: (mode & S_IFMT) >> 12)
        return try listingChange(try listingDirs(parent), plan: { () throws(FSError) -> [ListingDelta]? in
            [ListingDelta(dir: 0, added: [ListedEntry(type: type, name: name, identity: identity)])]
        }) { () throws(FSError) -> (UInt64, stat) in
            try newEntry(parent: parent, name: name, caller: caller) { (dirfd, entry) throws(SystemError) in
                if regular {
                    let fd = try Sys.openat(dirfd, entry, O_CREAT | O_EXCL | O_WRONLY | O_NOFOLLOW, mode & 0o7777)
                    defer { Sys.close(fd) }
                    if let fileID {
                        do throws(FSError) { try writeNewHeader(fd: fd, fileID: fileID) } catch {
                            _ = Glibc.unlinkat(dirfd, entry, 0)
                            throw SystemError(EIO, "write the new file's header: \(error)")
                        }
                    }
                } else {
                    try Sys.mknodat(dirfd, entry, mode, rdev)
                }
            }
        }
    }

    /// The directory `parent` as a manifest change needs it; none without listing manifests.
    func listingDirs(_ parents: UInt64...) throws(FSError) -> [ListingDir] {
        guard listingManifests else { return [] }
        var out: [ListingDir] = []
        for p in parents { out.append(ListingDir(node: p, dir: try dirHandle(p), dirID: try directoryID(p))) }
        return out
    }

    public func mkdir(parent: UInt64, name: [UInt8], mode: mode_t, caller: Caller) throws(FSError) -> (UInt64, stat) {
        try withNamespace { () throws(FSError) in try mkdirLocked(parent: parent, name: name, mode: mode, caller: caller) }
    }

    private func mkdirLocked(parent: UInt64, name: [UInt8], mode: mode_t, caller: Caller) throws(FSError) -> (UInt64, stat) {
        try checkWritable()
        let header: [UInt8]
        let keys = self.keys
        let dirHeader: DirHeader
        do {
            dirHeader = try DirHeader.random(keyGeneration: keys.generation)
            header = try dirHeader.encode(macKey: keys.metadataMACKey)
        } catch { throw .damaged("\(error)") }
        let manifest = try listingManifests ? FileSystem.newManifestBytes(keys: keys, dirID: dirHeader.directoryID) : nil
        return try listingChange(try listingDirs(parent), plan: { () throws(FSError) -> [ListingDelta]? in
            [ListingDelta(dir: 0, added: [ListedEntry(type: UInt8(DT_DIR), name: name, identity: dirHeader.directoryID)])]
        }) { () throws(FSError) -> (UInt64, stat) in
            try newEntry(parent: parent, name: name, caller: caller, directory: true) { (dirfd, entry) throws(SystemError) in
                // Owner-writable until its header is in, then the mode asked for.
                try Sys.mkdirat(dirfd, entry, 0o700)
                var pinned: Int32 = -1
                do throws(SystemError) {
                    pinned = try Sys.openPath(dirfd, entry, directory: true)
                    if let manifest {
                        // Its manifest (empty) first, then its header: a crash in between leaves
                        // a directory with no header and nothing else, which the parent's
                        // settling removes (FORMAT.md 12.10).
                        try Sys.writeNewFile(manifest, at: pinned, ListManifest.fileName, mode: 0o644, sync: false)
                    }
                    // A new directory is invisible to readers until this returns: no rename needed.
                    try Sys.writeNewFile(header, at: pinned, DirHeader.fileName, mode: 0o444)
                    // Keep the setgid bit a setgid parent passes down.
                    let inherited = try Sys.fstat(pinned).st_mode & S_ISGID
                    try Sys.fchmod(pinned: pinned, (mode & 0o7777) | inherited)
                    Sys.close(pinned)
                } catch {
                    if pinned >= 0 {
                        _ = Glibc.unlinkat(pinned, ListManifest.fileName, 0)
                        _ = Glibc.unlinkat(pinned, DirHeader.fileName, 0)
                        Sys.close(pinned)
                    }
                    _ = Glibc.unlinkat(dirfd, entry, AT_REMOVEDIR)
                    throw error
                }
            }
        }
    }

    public func symlink(target: [UInt8], parent: UInt64, name: [UInt8], caller: Caller) throws(FSError) -> (UInt64, stat) {
        try withNamespace { () throws(FSError) in try symlinkLocked(target: target, parent: parent, name: name, caller: caller) }
    }

    private func symlinkLocked(target: [UInt8], parent: UInt64, name: [UInt8], caller: Caller) throws(FSError) -> (UInt64, stat) {
        try checkWritable()
        let encrypted: String
        do { encrypted = try names.encryptTarget(target) } catch { throw FSError(error) }
        let stored = try backingTarget(encrypted)
        do {
            return try listingChange(try listingDirs(parent), plan: { () throws(FSError) -> [ListingDelta]? in
                [ListingDelta(dir: 0, added: [ListedEntry(type: UInt8(DT_LNK), name: name, identity: ListingElement.identity(symlinkTarget: target))])]
            }) { () throws(FSError) -> (UInt64, stat) in
                try newEntry(parent: parent, name: name, caller: caller) { (dirfd, entry) throws(SystemError) in
                    try Sys.symlinkat(stored, dirfd, entry)
                }
            }
        } catch {
            if stored != encrypted { dropStoredTarget(Array(stored.utf8)) }
            throw error
        }
    }

    public func readlink(_ id: UInt64) throws(FSError) -> [UInt8] {
        let raw = try withPinned(id) { (fd, st) throws(FSError) -> [UInt8] in
            guard st.isSymlink else { throw .invalidArgument }
            do throws(SystemError) { return try Sys.readlinkat(fd, "") } catch { throw .system(error) }
        }
        // A target that does not decrypt is damage (or something planted), whatever the reason.
        return try decryptedTarget(raw)
    }

    /// A hard link: one more backing name for the same backing file. The file's key is in
    /// its own header, so the link needs no crypto; both names are one node.
    public func link(_ id: UInt64, newParent: UInt64, newName: [UInt8]) throws(FSError) -> (UInt64, stat) {
        try withNamespace { () throws(FSError) in try linkLocked(id, newParent: newParent, newName: newName) }
    }

    private func linkLocked(_ id: UInt64, newParent: UInt64, newName: [UInt8]) throws(FSError) -> (UInt64, stat) {
        try checkWritable()
        guard let loc = table.withLock({ $0.location(id) }) else { throw .notFound }
        if loc.isDirectory { throw .notPermitted }
        guard var link = loc.link else { throw .notFound }
        let (ddir, db) = try entry(newParent, newName)
        let sdir = try dirHandle(link.parent)
        // A name renamed to its new-generation name by an online rekey is found again.
        if (try? Sys.fstatat(sdir.fd, link.entry)) == nil, let fresh = refreshed(id, link) { link = fresh }
        let source = link
        return try listingChange(try listingDirs(newParent), plan: { () throws(FSError) -> [ListingDelta]? in
            guard let st = try? Sys.fstatat(sdir.fd, source.entry), Identity(st) == loc.identity else { return nil }
            return [ListingDelta(dir: 0, added: [try listedEntry(sdir, source.entry, name: newName, st)])]
        }) { () throws(FSError) -> (UInt64, stat) in
            try linkApply(loc: loc, link: source, sdir: sdir, ddir: ddir, db: db, newParent: newParent, newName: newName)
        }
    }

    private func linkApply(loc: (link: Link?, identity: Identity, isDirectory: Bool), link: Link, sdir: DirHandle, ddir: DirHandle, db: BackingName, newParent: UInt64, newName: [UInt8]) throws(FSError) -> (UInt64, stat) {
        try writeLongNameFile(ddir, db)
        do { try Sys.linkat(sdir.fd, link.entry, ddir.fd, db.entryName) } catch {
            if error.errno != EEXIST { removeLongNameFile(ddir, db) }
            throw error.errno == EEXIST ? .exists : error.errno == ENOENT ? .notFound : .system(error)
        }
        let st: stat
        do { st = try Sys.fstatat(ddir.fd, db.entryName) } catch { throw .system(error) }
        guard Identity(st) == loc.identity else {
            // The source name led to something else by the time we linked it: undo.
            _ = Glibc.unlinkat(ddir.fd, db.entryName, 0)
            removeLongNameFile(ddir, db)
            throw .stale
        }
        let node = table.withLock { $0.add(Link(parent: newParent, name: newName, entry: db.entryName), identity: loc.identity, isDirectory: false) }
        return (node, translate(st, header: .entry(ddir.fd, db.entryName)) { try? Sys.readlinkat(ddir.fd, db.entryName) })
    }

    public func unlink(parent: UInt64, name: [UInt8]) throws(FSError) {
        try withNamespace { () throws(FSError) in try unlinkLocked(parent: parent, name: name) }
    }

    private func unlinkLocked(parent: UInt64, name: [UInt8]) throws(FSError) {
        try checkWritable()
        let (dir, b) = try entry(parent, name)
        try listingChange(try listingDirs(parent), plan: { () throws(FSError) -> [ListingDelta]? in
            guard let st = try? Sys.fstatat(dir.fd, b.entryName), !st.isDirectory else { return nil }
            guard let id = listedIdentity(dir, b.entryName, st) else {
                // Damaged (a file without a header, a symlink whose target does not
                // decrypt): its element is unknown, so the manifest cannot follow. It goes
                // anyway (the user wants it gone); the manifest, wrong already, stays so.
                logDamage("\(displayPath(parent)): removing \(b.entryName), which has no identity; the directory's listing manifest no longer matches it (xtsfs fsck reports it)")
                return nil
            }
            return [ListingDelta(dir: 0, removed: [ListedEntry(type: ListingIdentity.type(st), name: name, identity: id)])]
        }) { () throws(FSError) in
            try unlinkApply(parent: parent, name: name, dir: dir, b: b)
        }
    }

    private func unlinkApply(parent: UInt64, name: [UInt8], dir: DirHandle, b: BackingName) throws(FSError) {
        let st = try? Sys.fstatat(dir.fd, b.entryName)
        if let st, st.isDirectory { throw .isDirectory }
        let storedTarget = st.flatMap { $0.isSymlink && $0.st_nlink <= 1 ? try? Sys.readlinkat(dir.fd, b.entryName) : nil }
        let identity = st.map(Identity.init)
        let detached = identity.flatMap { i in st!.st_nlink <= 1 ? table.withLock { $0.detach(i) } : nil }
        do { try Sys.unlinkat(dir.fd, b.entryName) } catch {
            if let identity, let detached { table.withLock { $0.reattach(identity, detached) } }
            throw error.errno == ENOENT ? .notFound : .system(error)
        }
        if let st { forgetFileID(st) }
        removeLongNameFile(dir, b)
        dropStoredTarget(storedTarget)
        table.withLock { _ = $0.unlinked(parent: parent, name: name, identity: identity, detached: detached) }
    }

    /// Removes an empty backing directory's header and runs `body`; puts the header back if
    /// `body` fails. `pinned` is the directory (O_PATH).
    private func withoutDirHeader(_ pinned: Int32, _ body: () throws(SystemError) -> Void) throws(FSError) {
        if let birth = Sys.birthIdentity(pinned) { _ = knownDirHeaders.withLock { $0.removeValue(forKey: birth) } }
        let entries: [(name: String, type: UInt8, ino: UInt64)]
        do { entries = try Sys.listDirectory(pinned) } catch { throw .system(error) }
        guard entries.allSatisfy({ let c = BackingEntry.classify($0.name); return c == .directoryHeader || c == .listManifest }) else { throw .notEmpty }
        if entries.isEmpty {
            do { try body() } catch { throw error.errno == EEXIST ? .notEmpty : .system(error) }
            return
        }
        // The listing manifest goes first (put back if what follows fails): an empty
        // directory's, which nothing reads once the directory is gone.
        var savedManifest: [UInt8]?
        if entries.contains(where: { $0.name == ListManifest.fileName }) { savedManifest = try? Sys.readSmallFile(pinned, ListManifest.fileName, limit: 4096) }
        if savedManifest != nil { _ = Glibc.unlinkat(pinned, ListManifest.fileName, 0) }
        func restoreManifest() {
            if let savedManifest { _ = try? Sys.writeNewFile(savedManifest, at: pinned, ListManifest.fileName, mode: 0o644, sync: false) }
        }
        guard entries.contains(where: { $0.name == DirHeader.fileName }) else {
            do { try body() } catch { restoreManifest(); throw error.errno == EEXIST ? .notEmpty : .system(error) }
            return
        }
        // The header is ours to put back; a damaged one goes back as it was.
        let saved = try? Sys.readSmallFile(pinned, DirHeader.fileName, limit: 4096)
        // POSIX lets rmdir remove a directory its owner cannot write into; removing our
        // header inside it can need that write permission, so lend it for the moment.
        var restoreMode: mode_t?
        do { try Sys.unlinkat(pinned, DirHeader.fileName) } catch {
            guard error.errno == EACCES, let st = try? Sys.fstat(pinned),
                  (try? Sys.fchmod(pinned: pinned, (st.st_mode & 0o7777) | 0o700)) != nil else { restoreManifest(); throw .system(error) }
            restoreMode = st.st_mode & 0o7777
            do { try Sys.unlinkat(pinned, DirHeader.fileName) } catch {
                _ = try? Sys.fchmod(pinned: pinned, restoreMode!)
                restoreManifest()
                throw .system(error)
            }
        }
        do { try body() } catch {
            if let saved { _ = try? Sys.atomicWrite(saved, at: pinned, DirHeader.fileName, mode: 0o444) }
            restoreManifest()
            if let m = restoreMode { _ = try? Sys.fchmod(pinned: pinned, m) }
            throw error.errno == EEXIST ? .notEmpty : .system(error)
        }
    }

    public func rmdir(parent: UInt64, name: [UInt8]) throws(FSError) {
        try withNamespace { () throws(FSError) in try rmdirLocked(parent: parent, name: name) }
    }

    private func rmdirLocked(parent: UInt64, name: [UInt8]) throws(FSError) {
        try checkWritable()
        let (dir, b) = try entry(parent, name)
        try listingChange(try listingDirs(parent), plan: { () throws(FSError) -> [ListingDelta]? in
            guard let st = try? Sys.fstatat(dir.fd, b.entryName), st.isDirectory else { return nil }
            return [ListingDelta(dir: 0, removed: [try listedEntry(dir, b.entryName, name: name, st)])]
        }) { () throws(FSError) in
            try rmdirApply(parent: parent, name: name, dir: dir, b: b)
        }
    }

    private func rmdirApply(parent: UInt64, name: [UInt8], dir: DirHandle, b: BackingName) throws(FSError) {
        let pinned: Int32
        do { pinned = try Sys.openPath(dir.fd, b.entryName, directory: true) } catch {
            throw error.errno == ENOENT ? .notFound : (error.errno == ENOTDIR || error.errno == ELOOP) ? .notDirectory : .system(error)
        }
        defer { Sys.close(pinned) }
        let st: stat
        do { st = try Sys.fstat(pinned) } catch { throw .system(error) }
        let detached = table.withLock { $0.detach(Identity(st)) }
        do {
            try withoutDirHeader(pinned) { () throws(SystemError) in try Sys.unlinkat(dir.fd, b.entryName, directory: true) }
        } catch {
            if let detached { table.withLock { $0.reattach(Identity(st), detached) } }
            throw error
        }
        removeLongNameFile(dir, b)
        if let gone = table.withLock({ $0.unlinked(parent: parent, name: name, identity: Identity(st), detached: detached) }) {
            retireDirectory(gone, pinned: pinned)
        }
    }

    public func rename(parent: UInt64, name: [UInt8], newParent: UInt64, newName: [UInt8], flags: UInt32) throws(FSError) {
        try withNamespace { () throws(FSError) in try renameLocked(parent: parent, name: name, newParent: newParent, newName: newName, flags: flags) }
    }

    private func renameLocked(parent: UInt64, name: [UInt8], newParent: UInt64, newName: [UInt8], flags: UInt32) throws(FSError) {
        try checkWritable()
        let exchange = UInt32(XTS_RENAME_EXCHANGE), noReplace = UInt32(XTS_RENAME_NOREPLACE)
        guard flags & ~(exchange | noReplace) == 0, flags & (exchange | noReplace) != (exchange | noReplace) else { throw .invalidArgument }
        // A target that appears between the plan and the rename (see renameOnce) makes the
        // rename fail with nothing done; it is tried again from the start, twice at most.
        for attempt in 1...3 {
            if try renameOnce(parent: parent, name: name, newParent: newParent, newName: newName, flags: flags, retrying: attempt < 3) { return }
        }
    }

    /// One try of a rename. With listing manifests the names are looked at again inside
    /// `plan`, under the directories' manifest locks: with -o shared another host may have
    /// changed them up to the moment those locks were taken, and the manifest must describe
    /// what the rename does. false (the caller tries again, when `retrying`): a target absent
    /// at the plan appeared before the rename, which then did nothing.
    private func renameOnce(parent: UInt64, name: [UInt8], newParent: UInt64, newName: [UInt8], flags: UInt32, retrying: Bool) throws(FSError) -> Bool {
        let exchange = UInt32(XTS_RENAME_EXCHANGE), noReplace = UInt32(XTS_RENAME_NOREPLACE)
        let (sdir, sb) = try entry(parent, name)
        let (ddir, db) = try entry(newParent, newName)
        if parent == newParent && sb == db { return true }
        var sst: stat
        do { sst = try Sys.fstatat(sdir.fd, sb.entryName) } catch { throw error.errno == ENOENT ? .notFound : .system(error) }
        var dst = try? Sys.fstatat(ddir.fd, db.entryName)
        let source = Link(parent: parent, name: name, entry: sb.entryName)
        let target = Link(parent: newParent, name: newName, entry: db.entryName)
        // Both names as they are now (under the manifest locks, in `plan`).
        func restat() throws(FSError) {
            do { sst = try Sys.fstatat(sdir.fd, sb.entryName) } catch { throw error.errno == ENOENT ? .notFound : .system(error) }
            dst = try? Sys.fstatat(ddir.fd, db.entryName)
        }

        if flags & exchange != 0 {
            // Both names stay where they are (and so do long names' side files); the
            // objects behind them swap. A directory carries its ID inside it.
            guard dst != nil else { throw .notFound }
            try listingChange(try listingDirs(parent, newParent), plan: { () throws(FSError) -> [ListingDelta]? in
                try restat()
                guard let dst else { throw .notFound }
                let s = try listedEntry(sdir, sb.entryName, name: name, sst), d = try listedEntry(ddir, db.entryName, name: newName, dst)
                return [ListingDelta(dir: 0, removed: [s], added: [ListedEntry(type: d.type, name: name, identity: d.identity)]),
                        ListingDelta(dir: 1, removed: [d], added: [ListedEntry(type: s.type, name: newName, identity: s.identity)])]
            }) { () throws(FSError) in
                do throws(SystemError) { try Sys.renameat(sdir.fd, sb.entryName, ddir.fd, db.entryName, flags: exchange) } catch { throw .system(error) }
            }
            guard let dst else { return true }
            table.withLock {
                $0.moved(from: parent, name: name, to: target, identity: Identity(sst))
                $0.moved(from: newParent, name: newName, to: source, identity: Identity(dst))
            }
            return true
        }
        if dst != nil && flags & noReplace != 0 { throw .exists }
        if let dst, Identity(dst) == Identity(sst) {
            // Two names of one file: rename(2) does nothing then.
            return true
        }
        var planned = false, sameFile = false, appeared = false
        do throws(FSError) {
            try listingChange(try listingDirs(parent, newParent), plan: { () throws(FSError) -> [ListingDelta]? in
                try restat()
                planned = true
                if dst != nil && flags & noReplace != 0 { throw .exists }
                if let dst, Identity(dst) == Identity(sst) { sameFile = true; return nil }
                let s = try listedEntry(sdir, sb.entryName, name: name, sst)
                var replaced: [ListedEntry] = []
                if let dst { replaced.append(try listedEntry(ddir, db.entryName, name: newName, dst)) }
                return [ListingDelta(dir: 0, removed: [s]),
                        ListingDelta(dir: 1, removed: replaced, added: [ListedEntry(type: s.type, name: newName, identity: s.identity)])]
            }) { () throws(FSError) in
                if sameFile { return }
                // A target absent when the manifests were planned must still be absent when the
                // rename is made: the manifests say nothing was replaced.
                let absent = planned && dst == nil
                do throws(FSError) {
                    try renameApply(parent: parent, name: name, newParent: newParent, newName: newName, flags: flags,
                                    sdir: sdir, sb: sb, ddir: ddir, db: db, sst: sst, dst: dst, target: target, locked: absent)
                } catch {
                    if absent, flags & noReplace == 0, retrying, case .exists = error { appeared = true }
                    throw error
                }
            }
        } catch {
            // EEXIST is "nothing done": the manifests went back to A.
            if appeared { return false }
            throw error
        }
        return true
    }

    private func renameApply(parent: UInt64, name: [UInt8], newParent: UInt64, newName: [UInt8], flags: UInt32, sdir: DirHandle, sb: BackingName, ddir: DirHandle, db: BackingName,
                             sst: stat, dst: stat?, target: Link, locked: Bool = false) throws(FSError) {
        let noReplace = UInt32(XTS_RENAME_NOREPLACE)
        try writeLongNameFile(ddir, db)
        let replacedTarget = dst.flatMap { $0.isSymlink && $0.st_nlink <= 1 ? try? Sys.readlinkat(ddir.fd, db.entryName) : nil }
        let doRename = { () throws(SystemError) in
            if locked {
                // Under the manifest locks: where the backing filesystem does not take
                // RENAME_NOREPLACE, a check that the target is absent, which the locks make
                // good against every host that changes the directory through them.
                try Sys.renameatNoReplace(sdir.fd, sb.entryName, ddir.fd, db.entryName)
            } else {
                try Sys.renameat(sdir.fd, sb.entryName, ddir.fd, db.entryName, flags: flags & noReplace)
            }
        }
        var replacedDir: Int32 = -1
        defer { if replacedDir >= 0 { Sys.close(replacedDir) } }
        // The object replaced loses its last name (a directory always): detach it first, as unlink does.
        let replacedIdentity = dst.map(Identity.init)
        let detached = replacedIdentity.flatMap { i in dst!.isDirectory || dst!.st_nlink <= 1 ? table.withLock { $0.detach(i) } : nil }
        do throws(FSError) {
            if sst.isDirectory, let d = dst, d.isDirectory {
                do { replacedDir = try Sys.openPath(ddir.fd, db.entryName, directory: true) } catch { throw FSError.system(error) }
                try withoutDirHeader(replacedDir, doRename)
            } else {
                do { try doRename() } catch { throw FSError.system(error) }
            }
        } catch {
            if let replacedIdentity, let detached { table.withLock { $0.reattach(replacedIdentity, detached) } }
            // The side file of a long name that appeared meanwhile belongs to that entry: keep it.
            if case .system(let e) = error, e.errno == EEXIST { throw FSError.exists }
            if dst == nil { removeLongNameFile(ddir, db) }
            if case .system(let e) = error, e.errno == ENOENT { throw FSError.notFound }
            throw error
        }
        removeLongNameFile(sdir, sb)
        dropStoredTarget(replacedTarget)
        if let dst { forgetFileID(dst) }
        let replaced = table.withLock { t -> UInt64? in
            var gone: UInt64?
            if let dst {
                gone = t.unlinked(parent: newParent, name: newName, identity: Identity(dst), detached: detached)
            }
            t.moved(from: parent, name: name, to: target, identity: Identity(sst))
            return dst?.isDirectory == true ? gone : nil
        }
        if let replaced, replacedDir >= 0 { retireDirectory(replaced, pinned: replacedDir) }
    }
}
