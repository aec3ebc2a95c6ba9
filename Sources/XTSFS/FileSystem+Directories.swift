import XTSContent
import XTSSystem
#if canImport(Glibc)
import Glibc
#endif

extension FileSystem {
    public func opendir(_ id: UInt64) throws(FSError) -> UInt64 {
        if removedDirs.withLock({ $0[id] != nil }) {
            // Removed while the kernel still knows it (a process's working directory): it
            // opens, and holds nothing, as on ext4.
            let h = nextHandle.wrappingAdd(1, ordering: .relaxed).oldValue
            dirs.withLock { $0[h] = [] }
            return h
        }
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
                case .volumeHeader, .directoryHeader, .longNameRecord, .temporary, .linkStore, .auditLog, .presence, .tempArea, .cacheArea, .cacheKey, .rekeyCopy, .rekeyJournal:
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
        var out = [DirectoryEntry(name: Array(".".utf8), type: UInt8(DT_DIR), ino: selfIno),
                   DirectoryEntry(name: Array("..".utf8), type: UInt8(DT_DIR), ino: parentIno)]
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
                out.append(DirectoryEntry(name: plain, type: e.type, ino: e.ino, entry: e.name))
            } else {
                log("skipping undecryptable entry \(e.name) in directory node \(id): \(failure.map { "\($0)" } ?? "no key")")
            }
        }
        let h = nextHandle.wrappingAdd(1, ordering: .relaxed).oldValue
        dirs.withLock { $0[h] = out }
        return h
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
