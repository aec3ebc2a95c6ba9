import CSysShim
import XTSContent
import XTSCrypto
import XTSFormat
import XTSKeys
import XTSSystem
#if canImport(Glibc)
import Glibc
#endif

/// Listing manifests (feature `listingManifests`, FORMAT.md 12.10). Every change of a
/// directory's entries goes through `listingChange`: under the directory's lock (a stripe
/// of `manifestLocks`; with -o shared also an OFD lock on the manifest itself, since other
/// hosts change it too) the manifest is read, the new accumulator computed from the
/// committed one and the elements removed and added, `{A: old, B: new}` written, the
/// backing change made, and `{A: new, B: new}` written. A crash leaves the listing
/// matching slot A or slot B; the next change of the directory finds A ≠ B and settles it
/// from the listing as it is (`recoverManifest`), never sealing a listing that matches
/// neither.
struct ManifestLocks {
    static let count = 64
    let stripes: [RWLock] = (0..<ManifestLocks.count).map { _ in RWLock() }
    func index(_ dirID: [UInt8]) -> Int { Int(dirID.prefix(2).reduce(0) { $0 << 8 | Int($1) }) % ManifestLocks.count }
}

/// An entry as its directory's manifest sees it.
struct ListedEntry {
    var type: UInt8
    var name: [UInt8]
    var identity: [UInt8]
}

/// One directory taking part in a change.
struct ListingDir {
    var node: UInt64
    var dir: DirHandle
    var dirID: [UInt8]
}

/// What a change does to one directory's entries.
struct ListingDelta {
    var dir: Int
    var removed: [ListedEntry] = []
    var added: [ListedEntry] = []
}

extension FileSystem {
    /// The manifest of an empty directory with ID `dirID` under generation `keys` (a new
    /// directory's, written before anything can see it).
    static func newManifestBytes(keys: KeySet, dirID: [UInt8]) throws(FSError) -> [UInt8] {
        do {
            let empty = try ListingElement.seal(key: keys.listSealKey, ListingElement.zero)
            return try ListManifest(keyGeneration: keys.generation, slotA: empty, slotB: empty).encode(macKey: keys.listMACKey, directoryID: dirID)
        } catch { throw .damaged("listing manifest: \(error)") }
    }

    /// The identity of backing entry `entry` in `dir` (attributes `st`), for its element.
    /// A regular file without a readable header has none: nil.
    func listedIdentity(_ dir: DirHandle, _ entry: String, _ st: stat) -> [UInt8]? {
        if st.st_mode & S_IFMT == S_IFREG, !sharedStorage, let known = knownFileIDs.withLock({ $0[Identity(st)] }) { return known }
        return ListingIdentity.identity(dir.fd, entry, st) { raw in try? decryptedTarget(raw) }
    }

    /// A file this mount created has file ID `id` (see `knownFileIDs`).
    func rememberFileID(_ st: stat, _ id: [UInt8]) {
        guard !sharedStorage else { return }
        knownFileIDs.withLock { table in
            if table.count >= 100_000 { table.removeAll(keepingCapacity: true) }
            table[Identity(st)] = id
        }
    }

    /// The last name of the file `st` describes is gone: its inode number may be reused.
    func forgetFileID(_ st: stat) {
        guard st.st_mode & S_IFMT == S_IFREG, st.st_nlink <= 1 else { return }
        _ = knownFileIDs.withLock { $0.removeValue(forKey: Identity(st)) }
    }

    /// The entry `name` (backing `entry`) of `dir` as it is now, or nil if there is none.
    /// An entry without an identity (damaged) is EIO: removing it would leave the manifest
    /// wrong, and the user learns of the damage.
    func listedEntry(_ dir: DirHandle, _ entry: String, name: [UInt8]) throws(FSError) -> ListedEntry? {
        guard let st = try? Sys.fstatat(dir.fd, entry) else { return nil }
        return try listedEntry(dir, entry, name: name, st)
    }

    func listedEntry(_ dir: DirHandle, _ entry: String, name: [UInt8], _ st: stat) throws(FSError) -> ListedEntry {
        guard let id = listedIdentity(dir, entry, st) else {
            throw .damaged("\(entry): no identity for the listing manifest (a file without a header, a directory without xtsfs.dir, or a symlink whose target does not decrypt)")
        }
        return ListedEntry(type: ListingIdentity.type(st), name: name, identity: id)
    }

    /// Runs a change of directory entries under the manifest protocol (see the type's
    /// comment). `plan` (under the directories' locks) says what the change removes and
    /// adds, or nil when it changes nothing; `apply` makes it. Without listing manifests,
    /// only `apply` runs.
    func listingChange<R>(_ dirs: [ListingDir], plan: () throws(FSError) -> [ListingDelta]?, apply: () throws(FSError) -> R) throws(FSError) -> R {
        guard listingManifests else { return try apply() }
        // Each directory once, locks in stripe order.
        var unique: [ListingDir] = []
        for d in dirs where !unique.contains(where: { $0.node == d.node }) { unique.append(d) }
        // Manifests are opened (and with -o shared locked) in the order of their directory
        // IDs, the same on every host: two hosts renaming between the same two directories
        // in opposite directions then never wait for each other's second lock.
        unique.sort { $0.dirID.lexicographicallyPrecedes($1.dirID) }
        let stripes = Array(Set(unique.map { manifestLocks.index($0.dirID) })).sorted()
        for s in stripes { manifestLocks.stripes[s].lockWrite() }
        defer { for s in stripes.reversed() { manifestLocks.stripes[s].unlock() } }
        var opened: [OpenManifest] = []
        defer { for m in opened { Sys.close(m.fd) } }
        for d in unique { opened.append(try openManifest(d)) }
        guard let deltas = try plan() else { return try apply() }
        // The new accumulator of each directory, from its committed one.
        var sealed: [[UInt8]] = []
        for (i, d) in unique.enumerated() {
            let m = opened[i]
            var acc: [UInt8]
            do {
                acc = try ListingElement.open(key: m.keys.listSealKey, m.manifest.slotA)
                for delta in deltas where dirs[delta.dir].node == d.node {
                    for e in delta.removed + delta.added {
                        acc = ListingElement.xor(acc, try ListingElement.element(key: m.keys.listElementKey, directoryID: d.dirID, type: e.type, name: e.name, identity: e.identity))
                    }
                }
                sealed.append(try ListingElement.seal(key: m.keys.listSealKey, acc))
            } catch { throw .damaged("listing manifest: \(error)") }
        }
        for (i, d) in unique.enumerated() { try writeManifest(opened[i], d, a: opened[i].manifest.slotA, b: sealed[i]) }
        let result: R
        do throws(FSError) { result = try apply() } catch {
            // Nothing changed: the manifests go back as they were. Any other failure may
            // have changed something; they are left pending, and the next change of the
            // directory settles them from its listing.
            switch error {
            case .exists, .notFound, .notEmpty, .isDirectory, .notDirectory, .invalidArgument, .notPermitted, .readOnly:
                for (i, d) in unique.enumerated() { try? writeManifest(opened[i], d, a: opened[i].manifest.slotA, b: opened[i].manifest.slotA) }
            default: break
            }
            throw error
        }
        for (i, d) in unique.enumerated() {
            do throws(FSError) { try writeManifest(opened[i], d, a: sealed[i], b: sealed[i]) } catch {
                // The change was made: failing it now would tell the caller it was not. The
                // manifest stays pending ({A, A′}, the listing matching A′), which the next
                // change of the directory, or fsck --repair, settles from the listing.
                log("\(displayPath(d.node)): listing manifest \(ListManifest.fileName): the change was made but could not be committed (\(error)); the manifest is left pending, and the next change of this directory (or xtsfs fsck --repair) settles it")
            }
        }
        return result
    }

    struct OpenManifest {
        var fd: Int32
        var manifest: ListManifest
        var keys: KeySet
    }

    private func openManifest(_ d: ListingDir) throws(FSError) -> OpenManifest {
        let fd: Int32
        do { fd = try Sys.openat(d.dir.fd, ListManifest.fileName, O_RDWR | O_NOFOLLOW | O_NONBLOCK | O_NOCTTY | O_CLOEXEC) } catch {
            // Not damage: the mount may not write here (another user's manifest, a read-only
            // backing filesystem); the change fails with that error.
            if [EACCES, EPERM, EROFS].contains(error.errno) { throw .system(error) }
            let what = "\(displayPath(d.node)): listing manifest \(ListManifest.fileName): \(error.errno == ENOENT ? "missing" : "\(error)")"
            logDamage(what)
            throw .damaged(what)
        }
        do throws(FSError) {
            // A planted device or FIFO is damage, found before any lock is taken on it.
            guard let st = try? Sys.fstat(fd), st.st_mode & S_IFMT == S_IFREG else {
                let what = "\(displayPath(d.node)): listing manifest \(ListManifest.fileName): not a regular file"
                logDamage(what)
                throw FSError.damaged(what)
            }
            if sharedStorage {
                var l = flock()
                l.l_type = Int16(F_WRLCK); l.l_whence = Int16(SEEK_SET)
                while fcntl(fd, XTS_F_OFD_SETLKW, &l) != 0 {
                    guard errno == EINTR else { throw FSError.system(SystemError(errno, "F_OFD_SETLKW \(ListManifest.fileName)")) }
                }
            }
            var m = try readManifest(fd, d, st)
            if m.manifest.pending { m = try recoverManifest(m, d) }
            return m
        } catch {
            Sys.close(fd)
            throw error
        }
    }

    /// `st`: the manifest's attributes, just read (a regular file). Its size says how much
    /// to read: one `pread`, no second one to find the end.
    private func readManifest(_ fd: Int32, _ d: ListingDir, _ st: stat) throws(FSError) -> OpenManifest {
        let fail = { (why: String) -> FSError in
            let what = "\(self.displayPath(d.node)): listing manifest \(ListManifest.fileName): \(why)"
            self.logDamage(what)
            return .damaged(what)
        }
        guard st.st_size == Int64(ListManifest.length) else { throw fail("\(st.st_size) bytes, not \(ListManifest.length)") }
        var buf = [UInt8](repeating: 0, count: ListManifest.length)
        let n = buf.withUnsafeMutableBytes { (try? Sys.pread(fd, $0.baseAddress!, $0.count, 0)) ?? -1 }
        guard n >= 0 else { throw fail("unreadable") }
        let bytes = Array(buf[0..<n])
        guard let gen = ListManifest.generation(of: bytes), let keys = ring.keys(gen) else {
            throw fail(bytes.count == ListManifest.length ? "written under a key generation this volume does not hold" : "\(bytes.count) bytes, not \(ListManifest.length)")
        }
        do { return OpenManifest(fd: fd, manifest: try ListManifest.decode(bytes, macKey: keys.listMACKey, directoryID: d.dirID), keys: keys) }
        catch { throw fail("\(error)") }
    }

    private func writeManifest(_ m: OpenManifest, _ d: ListingDir, a: [UInt8], b: [UInt8]) throws(FSError) {
        let bytes: [UInt8]
        do { bytes = try ListManifest(keyGeneration: m.keys.generation, slotA: a, slotB: b).encode(macKey: m.keys.listMACKey, directoryID: d.dirID) }
        catch { throw .damaged("listing manifest: \(error)") }
        // One pwrite of 64 bytes at offset 0, inside one page: a crash leaves it old or new.
        do { try bytes.withBytes { (p) throws(SystemError) in try Sys.pwrite(m.fd, p.baseAddress!, p.count, 0) } }
        catch { throw .system(error) }
    }

    /// A manifest found with A ≠ B (a change was cut off): the listing as it is decides.
    /// It matches B: the change happened (A = B). It matches A: it did not (B = A); a file
    /// without a header it holds besides is the create that was cut off before the header
    /// was written, removed (it never held data). Neither: EIO, logged, never sealed.
    private func recoverManifest(_ m: OpenManifest, _ d: ListingDir) throws(FSError) -> OpenManifest {
        let scan: ListingScan
        let accA: [UInt8], accB: [UInt8]
        do {
            scan = try ListingScan.scan(d.dir.fd, directoryID: d.dirID, codecs: ring.all.map { NameCodec(keys: $0) },
                                        elementKey: m.keys.listElementKey) { raw in try? self.decryptedTarget(raw) }
            accA = try ListingElement.open(key: m.keys.listSealKey, m.manifest.slotA)
            accB = try ListingElement.open(key: m.keys.listSealKey, m.manifest.slotB)
        } catch { throw .damaged("\(displayPath(d.node)): listing manifest: \(error)") }
        let headerless = scan.unidentified.filter { $0.st.st_mode & S_IFMT == S_IFREG && $0.st.st_size <= Int64(IntegrityFileHeader.length) && $0.st.st_nlink == 1 }
        // An empty subdirectory without its header (nothing in it but, at most, its
        // manifest): a mkdir cut off before its header was written, or an rmdir after.
        let bare = scan.unidentified.filter { ListingIdentity.isBareDirectory(d.dir.fd, $0.backing, $0.st) }
        func remove(_ es: [ListingScan.Entry], _ what: String) {
            for e in es {
                if e.st.st_mode & S_IFMT == S_IFDIR {
                    if let p = try? Sys.openPath(d.dir.fd, e.backing, directory: true) { _ = Glibc.unlinkat(p, ListManifest.fileName, 0); Sys.close(p) }
                    _ = Glibc.unlinkat(d.dir.fd, e.backing, AT_REMOVEDIR)
                } else {
                    _ = Glibc.unlinkat(d.dir.fd, e.backing, 0)
                }
                if NameCodec.isLongName(e.backing) { _ = Glibc.unlinkat(d.dir.fd, e.backing + NameCodec.longSuffix, 0) }
                log("\(displayPath(d.node)): removed \(e.backing), \(what)")
            }
        }
        let settled: [UInt8]
        if scan.unidentified.count == bare.count && constantTimeEqual(scan.accumulator, accB) {
            remove(bare, "an empty directory without its header, left by an rmdir that was cut off")
            settled = m.manifest.slotB
        } else if scan.unidentified.count == headerless.count + bare.count && constantTimeEqual(scan.accumulator, accA) {
            remove(headerless, "a file whose create was cut off before its header was written")
            remove(bare, "an empty directory whose mkdir was cut off before its header was written")
            settled = m.manifest.slotA
        } else {
            let what = "\(displayPath(d.node)): listing does not match its manifest (an entry added, removed or swapped behind the mount's back); changes to this directory fail until it is restored (xtsfs fsck names it)"
            logDamage(what)
            throw .damaged(what)
        }
        var out = m
        out.manifest.slotA = settled
        out.manifest.slotB = settled
        try writeManifest(out, d, a: settled, b: settled)
        log("\(displayPath(d.node)): an interrupted change of this directory was settled from its listing")
        return out
    }
}
