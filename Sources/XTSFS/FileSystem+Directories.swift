import XTSContent
import XTSSystem
#if canImport(Glibc)
import Glibc
#endif

/// A directory's entries as a listing serves them: sorted by cookie, the offset a READDIR
/// resumes after. A cookie depends only on the plaintext name (`FileSystem.cookie`), so
/// that it is the same in every listing of the directory, whenever it was taken: resuming
/// after cookie C in a newer listing than the one C came from gives exactly the entries
/// after C that were not added or removed meanwhile. That is what lets a listing go on
/// without its own snapshot (no OPENDIR: see `readdir(node:offset:_:)`), lets two listers
/// of one directory share one, and keeps seekdir to an offset telldir returned working.
/// An online rekey renames entries to their new-generation names, which changes neither
/// their plaintext names nor their cookies.
struct Listing: Sendable {
    var cookies: [UInt64] = []
    var entries: [DirectoryEntry] = []
    static let empty = Listing()

    /// Entries with a cookie above `offset`, in order, until `body` refuses one. Returns
    /// whether there was none (the listing is over).
    @discardableResult
    func serve(after offset: UInt64, _ body: (UInt64, DirectoryEntry) -> Bool) -> Bool {
        var lo = 0, hi = cookies.count
        while lo < hi {
            let mid = (lo + hi) / 2
            if cookies[mid] <= offset { lo = mid + 1 } else { hi = mid }
        }
        var i = lo
        while i < cookies.count, body(cookies[i], entries[i]) { i += 1 }
        return lo == cookies.count
    }
}

/// Listings of directories read without OPENDIR (`readdir(node:offset:_:)`), by node: the
/// one a listing in progress goes on from. Bounded (no RELEASEDIR says when a listing is
/// over): the least recently used go first; one dropped is taken again when next needed,
/// which the cookies make seamless.
struct NodeListings {
    var byNode: [UInt64: (listing: Listing, used: UInt64)] = [:]
    var clock: UInt64 = 0
    var entries = 0
    static let maxDirectories = 64
    static let maxEntries = 262_144

    mutating func get(_ id: UInt64) -> Listing? {
        guard let l = byNode[id]?.listing else { return nil }
        clock += 1
        byNode[id]!.used = clock
        return l
    }

    mutating func put(_ id: UInt64, _ l: Listing) {
        remove(id)
        clock += 1
        byNode[id] = (l, clock)
        entries += l.entries.count
        while byNode.count > NodeListings.maxDirectories || entries > NodeListings.maxEntries {
            guard let oldest = byNode.filter({ $0.key != id }).min(by: { $0.value.used < $1.value.used })?.key else { break }
            remove(oldest)
        }
    }

    mutating func remove(_ id: UInt64) {
        if let old = byNode.removeValue(forKey: id) { entries -= old.listing.entries.count }
    }
}

extension FileSystem {
    /// The cookie of plaintext name `name`: a hash keyed with this filesystem's random
    /// `cookieKey`, in 3...Int64.max ("." is 1, ".." is 2; 0 is the start). Two names of one
    /// directory sharing a cookie (odds about n²/2⁶⁴ for n entries, as for ext4's own 63-bit
    /// hash cookies) could make a listing that stops between them skip the second.
    func cookie(_ name: [UInt8]) -> UInt64 {
        var h = Hasher()
        h.combine(cookieKey.0)
        h.combine(cookieKey.1)
        h.combine(name.count)
        name.withUnsafeBytes { h.combine(bytes: $0) }
        let v = UInt64(bitPattern: Int64(h.finalize()))
        return 3 + v % (UInt64(Int64.max) - 2)
    }

    /// With OPENDIR (the kernel did not offer to do without, or -o shared): the listing is
    /// taken here and kept by handle until RELEASEDIR.
    public func opendir(_ id: UInt64) throws(FSError) -> UInt64 {
        let listing = try takeListing(id)
        let h = nextHandle.wrappingAdd(1, ordering: .relaxed).oldValue
        dirs.withLock { $0[h] = listing }
        return h
    }

    /// Node `id`'s entries now, sorted by cookie. Taken shared with the changes of names (see
    /// below). A directory removed while the kernel still knows it (a process's working
    /// directory) lists nothing, as on ext4.
    func takeListing(_ id: UInt64) throws(FSError) -> Listing {
        if removedDirs.withLock({ $0[id] != nil }) { return .empty }
        let dir = try dirHandle(id)
        let dirID = try directoryID(id)
        // The listing (and the long names' side files) is taken shared with the changes of
        // names: an online rekey renames a directory's entries to their new-generation
        // names exclusively, and a listing running beside those renames could miss
        // entries (a readdir does not promise to see an entry renamed meanwhile).
        let listed = try withNamespace { () throws(FSError) -> [(encoded: String, entry: (name: String, type: UInt8, ino: UInt64))] in
            let raw: [(name: String, type: UInt8, ino: UInt64)]
            do throws(SystemError) { raw = try Sys.listDirectory(dir.fd) } catch { throw .system(error) }
            var listed: [(encoded: String, entry: (name: String, type: UInt8, ino: UInt64))] = []
            listed.reserveCapacity(raw.count)
            for e in raw {
                switch BackingEntry.classify(e.name) {
                case .encryptedName(let n):
                    listed.append((n, e))
                case .longName(let entry):
                    guard let full = readLongName(dir, entry) else { continue }
                    listed.append((full, e))
                case .foreign:
                    log("skipping a foreign entry in CIPHERDIR (directory node \(id)): \(e.name)")
                case .volumeHeader, .directoryHeader, .listManifest, .longNameRecord, .temporary, .linkStore, .auditLog, .presence, .tempArea, .cacheArea, .cacheKey, .rekeyCopy, .rekeyJournal:
                    continue
                }
            }
            return listed
        }
        // glibc's readdir hides entries with inode 0, so "." and ".." carry backing ones.
        let (selfIno, parentIno) = table.withLock { t -> (UInt64, UInt64) in
            let me = t.nodes[id]
            let parent = me?.links.first.flatMap { t.nodes[$0.parent] }
            return (me?.identity.ino ?? 1, parent?.identity.ino ?? me?.identity.ino ?? 1)
        }
        var out: [(cookie: UInt64, entry: DirectoryEntry)] = [
            (1, DirectoryEntry(name: Array(".".utf8), type: UInt8(DT_DIR), ino: selfIno)),
            (2, DirectoryEntry(name: Array("..".utf8), type: UInt8(DT_DIR), ino: parentIno))]
        out.reserveCapacity(listed.count + 2)
        // In the middle of a rekey, a name may be of any generation held (newest first).
        let codecs = ring.all.map { NameCodec(keys: $0) }
        for (encoded, e) in listed {
            var failure: NameError?
            var plain: [UInt8]?
            for codec in codecs {
                do { plain = try codec.decrypt(encoded, directoryID: dirID); break } catch { failure = failure ?? error }
            }
            if let plain {
                out.append((cookie(plain), DirectoryEntry(name: plain, type: e.type, ino: e.ino, entry: e.name)))
            } else {
                log("skipping undecryptable entry \(e.name) in directory node \(id): \(failure.map { "\($0)" } ?? "no key")")
            }
        }
        // Ties (two names of one cookie) in a fixed order, the same in every listing.
        out.sort { $0.cookie != $1.cookie ? $0.cookie < $1.cookie : $0.entry.name.lexicographicallyPrecedes($1.entry.name) }
        return Listing(cookies: out.map(\.cookie), entries: out.map(\.entry))
    }

    /// The encrypted name a long-name entry stands for, from its side file, trusted only
    /// when it hashes to the entry's name (a side file swapped with another's would
    /// otherwise list one file twice and hide the other).
    private func readLongName(_ dir: DirHandle, _ entry: String) -> String? {
        let full: [UInt8]
        do { full = try Sys.readSmallFile(dir.fd, entry + NameCodec.longSuffix, limit: 4096) } catch {
            log("skipping long-name entry \(entry): its side file is unusable (\(error))")
            return nil
        }
        guard NameCodec.longEntryName(forEncoded: full) == entry else {
            log("skipping long-name entry \(entry): its side file belongs to another name")
            return nil
        }
        return String(decoding: full, as: UTF8.self)
    }

    /// A READDIR: of the listing opened as `handle`, or, with handle 0 (never one OPENDIR
    /// gives), of directory node `ino` without OPENDIR.
    public func readdir(ino: UInt64, handle: UInt64, offset: UInt64, _ body: (UInt64, DirectoryEntry) -> Bool) throws(FSError) {
        if handle == 0 {
            try readdir(node: ino, offset: offset, body)
        } else {
            try readdir(handle: handle, offset: offset, body)
        }
    }

    /// The entries of the listing opened as `handle` after cookie `offset` (0: from the
    /// start); `body` gets each with its own cookie (where the next request resumes) and
    /// returns false when the FUSE layer's buffer is full.
    public func readdir(handle: UInt64, offset: UInt64, _ body: (UInt64, DirectoryEntry) -> Bool) throws(FSError) {
        guard let listing = dirs.withLock({ $0[handle] }) else { throw .badHandle }
        listing.serve(after: offset, body)
    }

    /// Without OPENDIR (FUSE_NO_OPENDIR_SUPPORT): the entries of directory node `id` after
    /// cookie `offset`. A listing that starts (offset 0) is taken afresh, so it shows every
    /// change made before it started; one that goes on uses the node's latest listing,
    /// whoever took it: the cookies make any listing of the directory continue any other
    /// for every entry not added or removed in between (see `Listing`). The request that
    /// finds nothing left (the end of a listing) lets the node's listing go.
    public func readdir(node id: UInt64, offset: UInt64, _ body: (UInt64, DirectoryEntry) -> Bool) throws(FSError) {
        // Removed meanwhile (its entries went first): nothing more, not the old listing.
        if removedDirs.withLock({ $0[id] != nil }) {
            nodeListings.withLock { $0.remove(id) }
            return
        }
        var listing = offset == 0 ? nil : nodeListings.withLock { $0.get(id) }
        if listing == nil {
            let fresh = try takeListing(id)
            nodeListings.withLock { $0.put(id, fresh) }
            listing = fresh
        }
        if listing!.serve(after: offset, body) {
            nodeListings.withLock { $0.remove(id) }
        }
    }

    public func releasedir(_ handle: UInt64) {
        _ = dirs.withLock { $0.removeValue(forKey: handle) }
    }

    public func fsyncdir(_ id: UInt64) throws(FSError) {
        let dir = try dirHandle(id)
        do { try Sys.fsyncDirectory(dir.fd) } catch { throw .system(error) }
    }

    public func statfs() throws(FSError) -> statvfs {
        do {
            var s = try Sys.fstatvfs(root.fd)
            s.f_namemax = UInt(NameCodec.maxPlainName)
            return s
        } catch { throw .system(error) }
    }
}
