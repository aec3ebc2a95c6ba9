import CSysShim
import XTSContent
import XTSCrypto
import XTSFormat
import XTSFS
import XTSKeys
import XTSSystem
#if canImport(Glibc)
import Glibc
#endif

/// The tree walk: every backing directory, classified by `BackingEntry`, one name at a time.
extension Fsck {
    static let maxDepth = 2048

    func walk(dir fd: Int32, backingPath: String, plainPath: String?, isRoot: Bool, depth: Int) throws {
        try checkCancelled()
        directoriesSeen += 1
        var entries: [(name: String, type: UInt8, ino: UInt64)]
        do { entries = try Sys.listDirectory(fd).sorted { $0.name < $1.name } } catch {
            walkComplete = false
            _ = add(.directoryUnreadable, backingPath, plain: plainPath, "cannot list it: \(error)")
            return
        }
        if repair && putBackMisplacedRecords(fd, entries.map(\.name), backingPath: backingPath),
           let again = try? Sys.listDirectory(fd) {
            entries = again.sorted { $0.name < $1.name }
        }
        let present = Set(entries.map(\.name))
        let isLostFound = depth == 1 && lostFound != nil && plainPath == "/" + Fsck.lostAndFound

        // With listing manifests, an empty directory without its header (nothing in it but,
        // at most, its manifest) is what a mkdir or rmdir cut off by a crash leaves: its
        // parent's listing check reports it and --repair removes it there; a new header
        // here would give it an ID its parent's manifest never had.
        if listingManifests, !isRoot, !present.contains(DirHeader.fileName), present.isSubset(of: [ListManifest.fileName]) { return }
        // The directory header: its ID decrypts every name here.
        var dirID: [UInt8]? = isRoot ? rootDirID : nil
        var headerFinding: Int?
        if !isRoot || rootDirID == nil {
            (dirID, headerFinding) = checkDirectoryHeader(fd, backingPath: backingPath, plainPath: plainPath, isRoot: isRoot)
        }
        // Entries are checked first, repaired after, so that quarantine (which moves them)
        // never changes the directory while it is listed.
        var undecryptable: [(name: String, finding: Int, longRecord: Bool)] = []
        var conflicts: [(name: String, finding: Int, plainName: [UInt8])] = []
        var handled = Set<String>()

        for e in entries {
            try tick()
            let path = Fsck.join(backingPath, e.name)
            if isLostFound && movedIntoLostFound.contains(e.name) { continue }
            switch BackingEntry.classify(e.name) {
            case .directoryHeader:
                continue
            case .listManifest:
                if !listingManifests { _ = add(.foreignEntry, .warning, path, "a listing manifest on a volume without them; ignored by xtsfs") }
                continue
            case .volumeHeader, .linkStore, .auditLog, .presence, .tempArea, .cacheArea, .cacheKey:
                if isRoot { continue }
                _ = add(.foreignEntry, .warning, path, "an xtsfs internal name outside CIPHERDIR's top level; ignored by xtsfs")
            case .rekeyJournal:
                reportRekeyJournal(path)
            case .rekeyCopy:
                reportRekeyCopy(path)
            case .temporary(let base):
                checkTemporary(fd, name: e.name, base: base, path: path, plainPath: plainPath, dirID: dirID, present: present)
            case .longNameRecord(let entry):
                if !present.contains(entry) && rekeyInterrupted {
                    // The rekey renames a long name by writing the new side file first and
                    // removing the old one after: between the two, one has no entry.
                    _ = add(.longNameRecordOrphan, .warning, path, "the side file of a long name whose entry no longer exists (left by the interrupted DEK rekey's renaming of a long name, or an interrupted unlink or rename); harmless, xtsfs rekey --dek removes or reuses it")
                } else if !present.contains(entry) {
                    let i = add(.longNameRecordOrphan, path, "the side file of a long name whose entry no longer exists (left by an interrupted unlink or rename)")
                    if repair { removeFile(fd, e.name, finding: i) }
                }
            case .longName(let entry):
                var encoded: String?
                let recordName = entry + NameCodec.longSuffix
                do {
                    let full = try Sys.readSmallFile(fd, recordName, limit: 4096)
                    if NameCodec.longEntryName(forEncoded: full) == entry {
                        encoded = String(decoding: full, as: UTF8.self)
                    } else {
                        let i = add(.longNameRecordMismatch, Fsck.join(backingPath, recordName), "its content does not hash to the entry's name \(entry): the entry's name is lost")
                        undecryptable.append((e.name, i, true))
                    }
                } catch {
                    let kind: FsckDamage = error.errno == ENOENT ? .longNameRecordMissing : .longNameRecordMismatch
                    let i = add(kind, path, "its side file \(recordName) is \(error.errno == ENOENT ? "missing" : "unusable (\(error))"): the entry's name is lost")
                    undecryptable.append((e.name, i, error.errno != ENOENT))
                }
                let plainName = encoded.flatMap { decryptName($0, dirID: dirID) }
                if encoded != nil, dirID == nil, keys != nil {
                    let i = add(.nameUndecryptable, path, "in a directory whose header is lost: its name cannot be decrypted")
                    undecryptable.append((e.name, i, false))
                } else if encoded != nil, dirID != nil, plainName == nil {
                    let i = add(.nameUndecryptable, path, "the name in its side file does not decrypt in this directory")
                    undecryptable.append((e.name, i, true))
                }
                try checkObject(fd, e.name, path: path, plainPath: Fsck.joinPlain(plainPath, plainName), depth: depth)
                handled.insert(e.name)
            case .encryptedName(let n):
                let plainName = decryptName(n, dirID: dirID)
                if dirID == nil, keys != nil {
                    let i = add(.nameUndecryptable, path, "in a directory whose header is lost: its name cannot be decrypted")
                    undecryptable.append((e.name, i, false))
                } else if dirID != nil, plainName == nil {
                    let canonical = Base64URL.decode(n) != nil
                    let i = add(.nameUndecryptable, path, canonical ? "the name does not decrypt in this directory (altered, or moved here from another directory)" : "not canonical base64url: an altered name")
                    undecryptable.append((e.name, i, false))
                }
                try checkObject(fd, e.name, path: path, plainPath: Fsck.joinPlain(plainPath, plainName), depth: depth)
                handled.insert(e.name)
            case .foreign:
                if let conflict = SyncConflict.parse(e.name) {
                    var shadowName: [UInt8]?
                    switch BackingEntry.classify(conflict.original) {
                    case .encryptedName(let n): shadowName = decryptName(n, dirID: dirID)
                    case .longName(let entry):
                        if let full = try? Sys.readSmallFile(fd, entry + NameCodec.longSuffix, limit: 4096),
                           NameCodec.longEntryName(forEncoded: full) == entry {
                            shadowName = decryptName(String(decoding: full, as: UTF8.self), dirID: dirID)
                        }
                    default: break
                    }
                    let shadows = Fsck.joinPlain(plainPath, shadowName)
                    let i = add(.syncConflict, .warning, path, shadows: shadows,
                                "a conflict copy made by a sync tool (\(conflict.tool)) of \(conflict.original)\(present.contains(conflict.original) ? "" : ", which no longer exists"); xtsfs does not show it")
                    if let shadowName, isEntryShaped(conflict.original) { conflicts.append((e.name, i, shadowName)) }
                    else if repair { notRepaired(i, "kept as is: not an entry xtsfs can show") }
                } else {
                    _ = add(.foreignEntry, .warning, path, "not a name xtsfs writes (\(typeName(e.type))); ignored by xtsfs and left alone")
                }
            }
        }

        if listingManifests, keys != nil, let dirID, !isLostFound || movedIntoLostFound.isEmpty {
            checkListingManifest(fd, backingPath: backingPath, plainPath: plainPath, dirID: dirID)
        }
        guard repair else { return }
        // Repairs that move entries: only with the key, and never in the root when its
        // header is damaged (lost+found lives there).
        for u in undecryptable {
            try quarantine(fd, u.name, finding: u.finding, label: "unreadable name", removeRecord: u.longRecord)
        }
        for c in conflicts {
            let name = Array(c.plainName.prefix(120)) + Array(" (sync conflict)".utf8)
            try quarantine(fd, c.name, finding: c.finding, label: nil, plainName: name, removeRecord: false)
        }
        if let i = headerFinding, report.findings[i].repaired == nil, !isRoot {
            recreateDirectoryHeaderIfEmpty(fd, finding: i)
        }
        _ = handled
    }

    func typeName(_ t: UInt8) -> String {
        switch Int32(t) {
        case Int32(DT_DIR): return "a directory"
        case Int32(DT_REG): return "a file"
        case Int32(DT_LNK): return "a symlink"
        case Int32(DT_FIFO): return "a FIFO"
        case Int32(DT_SOCK): return "a socket"
        case Int32(DT_CHR), Int32(DT_BLK): return "a device node"
        default: return "an entry"
        }
    }

    func isEntryShaped(_ name: String) -> Bool {
        switch BackingEntry.classify(name) {
        case .encryptedName, .longName: return true
        default: return false
        }
    }

    /// The name under whichever generation opens it (AES-SIV: at most one does); mid-rekey
    /// a directory holds names of both until its header is switched.
    func decryptName(_ encoded: String, dirID: [UInt8]?) -> [UInt8]? {
        guard let dirID else { return nil }
        for codec in nameCodecs {
            if let plain = try? codec.decrypt(encoded, directoryID: dirID) { return plain }
        }
        return nil
    }

    /// Long-name side files that hold another entry's name (swapped, or renamed by hand):
    /// each goes back to the entry its content hashes to, when that entry has no good
    /// side file of its own. Two side files swapped are exchanged atomically. Returns true
    /// when anything moved.
    func putBackMisplacedRecords(_ fd: Int32, _ names: [String], backingPath: String) -> Bool {
        let present = Set(names)
        var owner: [String: String] = [:]  // side file → the entry its content names
        for n in names {
            guard case .longNameRecord(let entry) = BackingEntry.classify(n),
                  let content = try? Sys.readSmallFile(fd, n, limit: 4096) else { continue }
            let hashed = NameCodec.longEntryName(forEncoded: content)
            if hashed != entry { owner[n] = hashed }
        }
        var moved = false
        var done = Set<String>()
        for (record, entry) in owner.sorted(by: { $0.key < $1.key }) where !done.contains(record) && present.contains(entry) {
            let want = entry + NameCodec.longSuffix
            let path = Fsck.join(backingPath, record)
            do {
                if let partner = owner[want], partner + NameCodec.longSuffix == record {
                    try Sys.renameat(fd, record, fd, want, flags: UInt32(XTS_RENAME_EXCHANGE))
                    done.insert(want)
                } else if !present.contains(want) {
                    try Sys.renameatNoReplace(fd, record, fd, want)
                } else { continue }
            } catch {
                let i = add(.longNameRecordMismatch, path, "holds the name of \(entry)")
                notRepaired(i, "cannot move it back: \(error)")
                continue
            }
            done.insert(record)
            moved = true
            let i = add(.longNameRecordMismatch, path, "held the name of \(entry); moved back to \(want)")
            repaired(i, .putBack)
        }
        if moved { try? Sys.fsyncDirectory(fd) }
        return moved
    }

    // MARK: - directory headers

    /// Reads and verifies `xtsfs.dir`; corrects a single flipped bit when repairing.
    func checkDirectoryHeader(_ fd: Int32, backingPath: String, plainPath: String?, isRoot: Bool) -> ([UInt8]?, Int?) {
        let path = Fsck.join(backingPath, DirHeader.fileName)
        let bytes: [UInt8]
        do { bytes = try Sys.readSmallFile(fd, DirHeader.fileName, limit: 4096) } catch {
            let missing = error.errno == ENOENT
            let i = add(missing ? .directoryHeaderMissing : .directoryHeaderDamaged, path, plain: plainPath,
                        missing ? "the directory header is missing: no name in this directory can be decrypted" : "the directory header is unusable (\(error))")
            return (nil, i)
        }
        guard let keys, let generations else {
            // Without the key: only the shape.
            if bytes.count != DirHeader.length || Array(bytes.prefix(8)) != DirHeader.magic {
                return (nil, add(.directoryHeaderDamaged, path, plain: plainPath, "\(bytes.count) bytes, not a directory header"))
            }
            return (nil, nil)
        }
        // Under the generation it names (mid-rekey: old until the rekey switches it).
        let verify: ([UInt8]) -> DirHeader? = { b in
            generations.keys(DirHeader.generation(of: b)).flatMap { try? DirHeader.decode(b, macKey: $0.metadataMACKey) }
        }
        do {
            let named = generations.keys(DirHeader.generation(of: bytes)) ?? keys
            return (try DirHeader.decode(bytes, macKey: named.metadataMACKey).directoryID, nil)
        } catch {
            let i = add(.directoryHeaderDamaged, path, plain: plainPath, "it does not verify (\(error)): no name in this directory can be decrypted")
            if bytes.count == DirHeader.length,
               let fixed = Fsck.singleBitFlip(bytes, verifies: { verify($0) != nil }) {
                if repair {
                    do {
                        try Sys.atomicWrite(fixed, at: fd, DirHeader.fileName, mode: 0o444)
                        repaired(i, .correctedBitFlip)
                        return (verify(fixed)?.directoryID, i)
                    } catch { notRepaired(i, "cannot rewrite it: \(error)") }
                } else {
                    report.findings[i].detail += "; one flipped bit, which --repair corrects"
                    // Names are checked as they will be once corrected.
                    return (verify(fixed)?.directoryID, i)
                }
            }
            if isRoot && repair && report.findings[i].repaired == nil {
                notRepaired(i, "the root directory's ID is lost: its entries cannot be named (not even quarantined)")
            }
            return (nil, i)
        }
    }

    /// The one variant of `bytes` with a single bit flipped that `verifies`, if exactly one does.
    static func singleBitFlip(_ bytes: [UInt8], verifies: ([UInt8]) -> Bool) -> [UInt8]? {
        var found: [UInt8]?
        var b = bytes
        for i in 0..<b.count * 8 {
            b[i / 8] ^= UInt8(1 << (i % 8))
            if verifies(b) {
                if found != nil { return nil }
                found = b
            }
            b[i / 8] ^= UInt8(1 << (i % 8))
        }
        return found
    }

    /// A directory whose ID is lost and whose entries have all been quarantined: a new
    /// header makes it usable again (it is empty, so the new ID names nothing).
    func recreateDirectoryHeaderIfEmpty(_ fd: Int32, finding i: Int) {
        guard let keys else { return }
        guard let rest = try? Sys.listDirectory(fd) else { return }
        let left = rest.filter {
            switch BackingEntry.classify($0.name) {
            case .encryptedName, .longName, .longNameRecord: return true
            default: return false
            }
        }
        guard left.isEmpty else {
            notRepaired(i, "\(left.count) entries could not be quarantined; the directory header is left as it is")
            return
        }
        do {
            let header = try DirHeader.random(keyGeneration: keys.generation).encode(macKey: keys.metadataMACKey)
            // Keep a damaged header's bytes beside it rather than destroying them.
            if (try? Sys.fstatat(fd, DirHeader.fileName)) != nil {
                try Sys.renameatNoReplace(fd, DirHeader.fileName, fd, DirHeader.fileName + ".damaged")
            }
            try Sys.atomicWrite(header, at: fd, DirHeader.fileName, mode: 0o444)
            repaired(i, .recreatedDirectoryHeader)
            report.findings[i].detail += "; its entries were quarantined into /\(Fsck.lostAndFound) and a new header written (the old one kept as \(DirHeader.fileName).damaged)"
        } catch {
            notRepaired(i, "cannot write a new directory header: \(error)")
        }
    }

    // MARK: - temporaries and orphans

    /// A `.tmp` leftover is removed only when the file it would have replaced is intact;
    /// otherwise it may be the only whole copy and is left alone.
    func checkTemporary(_ fd: Int32, name: String, base: String, path: String, plainPath: String?, dirID: [UInt8]?, present: Set<String>) {
        if rekeyInterrupted {
            switch BackingEntry.classify(base) {
            case .rekeyJournal:
                _ = add(.rekeyTemporary, .warning, path, "an incomplete checksum journal of the interrupted DEK rekey: nothing was overwritten under it; xtsfs rekey --dek removes it")
                return
            case .rekeyCopy:
                _ = add(.rekeyTemporary, .warning, path, "an incomplete copy (or symlink) made by the interrupted DEK rekey; xtsfs rekey --dek removes it")
                return
            default: break
            }
        }
        let i = add(.temporaryLeftover, path, "left by an interrupted atomic replacement of \(base)")
        guard repair else { return }
        var baseIntact = false
        switch BackingEntry.classify(base) {
        case .volumeHeader(let copy):
            // Both copies verified (restored above if they were not).
            baseIntact = report.findings.allSatisfy { !($0.backingPath == HeaderStore.fileNames[copy] && $0.isOpenError) }
                && (try? VolumeHeader.decode(Sys.readSmallFile(fd, base, limit: VolumeHeader.maxLength + 1))) != nil
        case .directoryHeader:
            if let keys, let b = try? Sys.readSmallFile(fd, base, limit: 4096) {
                baseIntact = (try? DirHeader.decode(b, macKey: keys.metadataMACKey)) != nil
            }
        case .longNameRecord(let entry):
            if let b = try? Sys.readSmallFile(fd, base, limit: 4096) { baseIntact = NameCodec.longEntryName(forEncoded: b) == entry }
            // A record whose entry is gone is useless, and so is its replacement.
            if !present.contains(entry) { baseIntact = true }
        default:
            baseIntact = false
        }
        if baseIntact { removeFile(fd, name, finding: i) } else { notRepaired(i, "kept: \(base) is missing or damaged, so this may be its only good copy") }
    }

    func removeFile(_ fd: Int32, _ name: String, finding i: Int) {
        // Only regular files: never a directory, never through a symlink.
        guard let st = try? Sys.fstatat(fd, name), st.isRegular || st.isSymlink else {
            notRepaired(i, "not a regular file; left alone")
            return
        }
        do { try Sys.unlinkat(fd, name); repaired(i, .removed) } catch { notRepaired(i, "cannot remove it: \(error)") }
    }

    // MARK: - objects

    func checkObject(_ dirfd: Int32, _ name: String, path: String, plainPath: String?, depth: Int) throws {
        let st: stat
        do { st = try Sys.fstatat(dirfd, name) } catch {
            if error.errno == ENOENT { return }
            _ = add(.fileUnreadable, path, plain: plainPath, "cannot stat it: \(error)")
            return
        }
        if st.isDirectory {
            report.directories += 0
            guard depth < Fsck.maxDepth else {
                _ = add(.directoryUnreadable, path, plain: plainPath, "nested deeper than \(Fsck.maxDepth) levels; not checked")
                walkComplete = false
                return
            }
            guard UInt64(st.st_dev) == rootDev else {
                _ = add(.foreignEntry, .warning, path, plain: plainPath, "another filesystem is mounted here; not checked")
                return
            }
            let sub: Int32
            do { sub = try Sys.openPath(dirfd, name, directory: true) } catch {
                walkComplete = false
                _ = add(.directoryUnreadable, path, plain: plainPath, "cannot open it: \(error)")
                return
            }
            defer { Sys.close(sub) }
            checkXattrs(sub, path: path, plainPath: plainPath)
            try walk(dir: sub, backingPath: path, plainPath: plainPath, isRoot: false, depth: depth + 1)
        } else if st.isRegular {
            report.files += 1
            checkFile(dirfd, name, size: Int64(st.st_size), path: path, plainPath: plainPath)
            if keys != nil, let pinned = try? Sys.openPath(dirfd, name) {
                checkXattrs(pinned, path: path, plainPath: plainPath)
                Sys.close(pinned)
            }
        } else if st.isSymlink {
            report.symlinks += 1
            checkSymlink(dirfd, name, path: path, plainPath: plainPath)
        } else {
            report.otherEntries += 1
        }
    }

    func checkFile(_ dirfd: Int32, _ name: String, size: Int64, path: String, plainPath: String?) {
        if size == 0 { return }
        if integrity { return checkAuthenticatedFile(dirfd, name, path: path, plainPath: plainPath) }
        if Layout.isDamagedSize(backingSize: size) {
            let i = add(.fileTruncatedInHeader, path, plain: plainPath, "\(size) bytes: its header is cut short and its content is gone; opening it fails with EIO")
            // Not truncated to an empty file here: that would turn a visible error into a
            // file that silently reads as empty. Its owner decides (delete it, or open it
            // with O_TRUNC, through the mount).
            if repair { notRepaired(i, "left for you to delete or truncate through the mount: an empty file would hide that its content is gone") }
            return
        }
        if Layout.plainSize(backingSize: size) > Layout.maxPlainSize {
            _ = add(.fileTooLarge, path, plain: plainPath, "a backing file of \(size) bytes, beyond the largest the format allows (2^60 bytes)")
            return
        }
        guard let keys, let generations else { return }
        var raw = [UInt8](repeating: 0, count: FileHeader.length)
        do {
            let (fd, _) = try Sys.openRegular(dirfd, name, O_RDONLY | O_NONBLOCK)
            defer { Sys.close(fd) }
            let n = try raw.withMutableBytes { (p) throws(SystemError) -> Int in try Sys.pread(fd, p.baseAddress!, p.count, 0) }
            guard n == FileHeader.length else { throw SystemError(EIO, "short read of the file header") }
        } catch {
            _ = add(.fileUnreadable, path, plain: plainPath, "cannot read it: \(error)")
            return
        }
        // Under the generation it names (mid-rekey: old or new; the MAC covers the field).
        let verifies: ([UInt8]) -> Bool = { b in
            generations.keys(FileHeader.generation(of: b)).map { (try? FileHeader.decode(b, macKey: $0.metadataMACKey)) != nil } ?? false
        }
        do {
            let h = try FileHeader.decode(raw, macKey: (generations.keys(FileHeader.generation(of: raw)) ?? keys).metadataMACKey)
            if generations.keys(h.keyGeneration) == nil {
                _ = add(.fileHeaderDamaged, path, plain: plainPath, "written under key generation \(h.keyGeneration), which this volume does not hold")
            }
        } catch {
            let i = add(.fileHeaderDamaged, path, plain: plainPath, "its header does not verify (\(error)): the file cannot be read")
            if let fixed = Fsck.singleBitFlip(raw, verifies: verifies) {
                if repair {
                    do {
                        try withWritable(dirfd, name) { fd throws(SystemError) in
                            try fixed.withBytes { (p) throws(SystemError) in try Sys.pwrite(fd, p.baseAddress!, p.count, 0) }
                            try Sys.fsync(fd)
                        }
                        repaired(i, .correctedBitFlip)
                    } catch { notRepaired(i, "cannot rewrite its header: \(error)") }
                } else {
                    report.findings[i].detail += "; one flipped bit, which --repair corrects"
                }
            } else if repair {
                notRepaired(i, "kept as is: its key is lost, but the bytes may still matter to someone")
            }
        }
    }

    /// Integrity volumes: reads the whole file through the same code the mount uses, so
    /// every unit is checked against its tag and the length against the committed one.
    /// Without the key nothing can be checked. Damage is reported, never repaired: the
    /// tags say that a unit is wrong, not what it was (a backup has it).
    func checkAuthenticatedFile(_ dirfd: Int32, _ name: String, path: String, plainPath: String?) {
        guard let keys, let unitTags, let generations else { return }
        let fd: Int32, st: stat
        do { (fd, st) = try Sys.openRegular(dirfd, name, O_RDONLY | O_NONBLOCK) } catch {
            _ = add(.fileUnreadable, path, plain: plainPath, "cannot read it: \(error)")
            return
        }
        defer { Sys.close(fd) }
        // Half old, half new under a journal (or copy) of the interrupted rekey: the units its
        // journal covers were checked against it (each old or new), those of a large file
        // outside that segment against their tags, new before it, old after it; it reads
        // whole only once the rekey (or a mount) finishes it.
        let inode = [UInt64(st.st_dev), UInt64(st.st_ino)]
        if halfRewritten.contains(inode) {
            if let why = halfRewrittenDamage[inode] {
                _ = add(.fileAuthenticationFailed, path, plain: plainPath, "half rewritten by the interrupted DEK rekey (its journal is sound): \(why)")
            }
            return
        }
        // A file without a header on a volume with listing manifests: the directory's
        // manifest check says what it is (a create cut off, or damage).
        if listingManifests, ListingIdentity.fileID(fd: fd) == nil, st.st_size <= Int64(IntegrityFileHeader.length) { return }
        // Read with the keys of the generation its header names, as the mount reads it.
        let content = ContentFile(file: FDBackingFile(fd: fd), currentKeys: keys, unitTags: unitTags, fileIDs: listingManifests) { generations.keys($0) }
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: 1 << 20, alignment: 16)
        defer { buffer.deallocate() }
        var offset: Int64 = 0
        let unit = IntegrityLayout.blockSize
        // Every unit that fails its tag, not only the first: a 1 MiB read that fails is read
        // again unit by unit, and the check goes on after it.
        // Bounded however many fail (a hostile or damaged file may fail in every other unit).
        var failing: [Range<Int64>] = [], failingCount: Int64 = 0, failingRuns = 0, lastFailing: Int64 = -2
        var firstWhy = ""
        do throws(ContentError) {
            let crypto = try content.loadCrypto()
            let size = try content.plainSize(crypto: crypto)
            while offset < size {
                let n: Int
                do throws(ContentError) { n = try content.read(into: buffer, at: offset, crypto: crypto) } catch {
                    guard case .authentication = error else { throw error }
                    let end = min(offset + Int64(buffer.count), size)
                    let one = UnsafeMutableRawBufferPointer(rebasing: buffer[0..<Int(unit)])
                    for at in stride(from: offset, to: end, by: Int(unit)) {
                        do throws(ContentError) { _ = try content.read(into: one, at: at, crypto: crypto) } catch {
                            guard case .authentication(let why) = error else { throw error }
                            if failingCount == 0 { firstWhy = why }
                            let u = at / unit
                            failingCount += 1
                            if lastFailing + 1 == u {
                                if failingRuns <= 8 { failing[failing.count - 1] = failing[failing.count - 1].lowerBound..<u + 1 }
                            } else {
                                failingRuns += 1
                                if failingRuns <= 8 { failing.append(u..<u + 1) }
                            }
                            lastFailing = u
                        }
                    }
                    offset = end
                    continue
                }
                if n == 0 { break }
                offset += Int64(n)
            }
            if failingCount > 0 {
                let count = failingCount
                let shown = failing.map { r in
                    r.count == 1 ? "\(r.lowerBound) (bytes \(r.lowerBound * unit)–\(r.lowerBound * unit + unit - 1))"
                        : "\(r.lowerBound)–\(r.upperBound - 1) (bytes \(r.lowerBound * unit)–\(r.upperBound * unit - 1))"
                }.joined(separator: ", ") + (failingRuns > 8 ? ", …" : "")
                let i = add(.fileAuthenticationFailed, path, plain: plainPath,
                        "\(count) unit\(count == 1 ? "" : "s") of its \((size + unit - 1) / unit) fail\(count == 1 ? "s" : "") \(count == 1 ? "its tag" : "their tags"): \(count == 1 ? "unit" : "units") \(shown); reads there fail with EIO (the first: \(firstWhy))")
                if repair { notRepaired(i, "kept as is: the tags tell that the contents changed, not what they were; restore the file from a backup") }
            } else if offset < size {
                _ = add(.fileAuthenticationFailed, path, plain: plainPath, "its committed length is \(size) bytes but only \(offset) can be read")
            }
            checkIntegrityLayout(fd: fd, dirfd, name, size: size, path: path, plainPath: plainPath)
        } catch {
            let i: Int
            switch error {
            case .badHeader(let why):
                i = add(.fileHeaderDamaged, path, plain: plainPath, "its header does not verify (\(why)): the file cannot be read")
            case .authentication(let why):
                i = add(.fileAuthenticationFailed, path, plain: plainPath, "from plaintext offset \(offset) on: \(why); reads there fail with EIO")
            case .io, .crypto:
                i = add(.fileUnreadable, path, plain: plainPath, "cannot read it: \(error)")
            }
            if repair { notRepaired(i, "kept as is: the tags tell that the contents changed, not what they were; restore the file from a backup") }
        }
    }

    /// What reading an integrity volume's file never looks at (FORMAT.md section 12.9): the
    /// bytes past its committed length, and the reserved start of each group after the
    /// first. Both are harmless warnings; the first is cut off by `--repair`.
    func checkIntegrityLayout(fd: Int32, _ dirfd: Int32, _ name: String, size: Int64, path: String, plainPath: String?) {
        typealias L = IntegrityLayout
        guard let backing = (try? Sys.fstat(fd)).map({ Int64($0.st_size) }) else { return }
        let committed = L.backingSize(plainSize: size)
        // Groups after the first that lie within the committed length.
        let groups = size == 0 ? 1 : L.group(of: L.unitCount(size) - 1) + 1
        // With file roots (FORMAT.md 12.11) the first 48 bytes are the salt (under the root)
        // and the record: only the last 16 are reserved.
        let reserved = unitTags?.hasFileRoot == true ? L.recordHeaderRange.upperBound..<Int(L.headerLength) : 0..<Int(L.headerLength)
        for g in 1..<max(groups, 1) {
            var raw = [UInt8](repeating: 0, count: reserved.count)
            let n = raw.withUnsafeMutableBytes { pread(fd, $0.baseAddress, $0.count, off_t(g * L.groupLength) + off_t(reserved.lowerBound)) }
            if n > 0 && raw[0..<n].contains(where: { $0 != 0 }) {
                add(.fileReservedBytesForeign, .warning, path, plain: plainPath,
                    "the reserved \(reserved.count) bytes of group \(g) (backing offset \(g * L.groupLength + Int64(reserved.lowerBound))) are not zeros; xtsfs never reads them")
            }
        }
        guard backing > committed else { return }
        let i = add(.fileUncommittedTail, .warning, path, plain: plainPath,
                    "\(backing - committed) bytes past its committed length (\(size) bytes of plaintext, \(committed) backing): left by an interrupted change, or appended by someone else; never read")
        guard repair else { return }
        do {
            try withWritable(dirfd, name) { (w) throws(SystemError) in
                guard ftruncate(w, off_t(committed)) == 0 else { throw SystemError(errno, "ftruncate") }
                guard fsync(w) == 0 else { throw SystemError(errno, "fsync") }
            }
            repaired(i, .trimmedUncommittedTail)
        } catch {
            notRepaired(i, "cannot cut it off: \(error)")
        }
    }

    /// Opens a regular file for writing even when its mode has no write bit (backing files
    /// carry the plaintext mode), putting the mode back afterwards.
    func withWritable(_ dirfd: Int32, _ name: String, _ body: (Int32) throws(SystemError) -> Void) throws(SystemError) {
        let pinned = try Sys.openPath(dirfd, name)
        defer { Sys.close(pinned) }
        let st = try Sys.fstat(pinned)
        guard st.isRegular else { throw SystemError(EINVAL, "\(name): not a regular file") }
        var restore: mode_t?
        if access("/proc/self/fd/\(pinned)", W_OK) != 0 {
            try Sys.fchmod(pinned: pinned, (st.st_mode & 0o7777) | 0o200)
            restore = st.st_mode & 0o7777
        }
        defer { if let restore { try? Sys.fchmod(pinned: pinned, restore) } }
        let fd = try Sys.reopen(pinned, O_WRONLY | O_NONBLOCK)
        defer { Sys.close(fd) }
        try body(fd)
    }

    func checkSymlink(_ dirfd: Int32, _ name: String, path: String, plainPath: String?) {
        let raw: [UInt8]
        do { raw = try Sys.readlinkat(dirfd, name) } catch {
            _ = add(.fileUnreadable, path, plain: plainPath, "cannot read the symlink: \(error)")
            return
        }
        // The stored target is in use whether or not this check can open it.
        if let stored = SymlinkTarget.storedName(raw) {
            referencedLinks.insert(stored)
            guard keys != nil else { return }
        }
        let encoded: [UInt8]
        do { encoded = try SymlinkTarget.encoded(raw, root: root) } catch {
            let why: String
            switch error {
            case .storedMismatch: why = "does not match its hash"
            case .storedUnreadable(_, let e): why = "is unusable (\(e))"
            case .storeUnusable(let e): why = "is unusable (\(e))"
            case .undecryptable: why = "is unusable (\(error))"
            }
            _ = add(.symlinkTargetUndecryptable, path, plain: plainPath, "its stored target \(NameCodec.linkStore)/\(SymlinkTarget.storedName(raw) ?? "") \(why)")
            return
        }
        guard !nameCodecs.isEmpty else { return }
        if (try? SymlinkTarget.decrypt(encoded, codecs: nameCodecs)) == nil {
            _ = add(.symlinkTargetUndecryptable, path, plain: plainPath, "its target does not decrypt: readlink fails with EIO")
        }
    }

    func checkXattrs(_ pinned: Int32, path: String, plainPath: String?) {
        guard let generations else { return }
        // Mid-rekey an attribute's name opens under one generation, its value names one.
        let codecs = generations.all.map { XattrCodec(keys: $0) }
        guard let list = try? Sys.listxattr(pinned: pinned) else { return }
        for backing in list where backing.hasPrefix(XattrCodec.namespace) {
            guard let plain = codecs.lazy.compactMap({ $0.decryptName(backing) }).first else {
                _ = add(.xattrForeign, .warning, path, plain: plainPath, "extended attribute \(backing) is not one xtsfs wrote; not shown")
                continue
            }
            let label = String(decoding: plain, as: UTF8.self)
            var value: [UInt8] = []
            do {
                let need = try Sys.getxattr(pinned: pinned, backing, into: UnsafeMutableRawBufferPointer(start: nil, count: 0))
                value = [UInt8](repeating: 0, count: need)
                let n = try value.withMutableBytes { (p) throws(SystemError) -> Int in try Sys.getxattr(pinned: pinned, backing, into: p) }
                value = Array(value.prefix(n))
            } catch {
                _ = add(.xattrUndecryptable, path, plain: plainPath, "extended attribute \(label) cannot be read: \(error)")
                continue
            }
            if !codecs.contains(where: { (try? $0.decryptValue(value, backingName: backing)) != nil }) {
                _ = add(.xattrUndecryptable, path, plain: plainPath, "the value of extended attribute \(label) does not decrypt: getxattr fails with EIO")
            }
        }
    }

    // MARK: - the link store

    func checkLinkStore() throws {
        let store: Int32
        do { store = try Sys.openPath(root, NameCodec.linkStore, directory: true) } catch {
            if error.errno != ENOENT { _ = add(.directoryUnreadable, NameCodec.linkStore, "the link store is unusable: \(error)") }
            return
        }
        defer { Sys.close(store) }
        let entries: [(name: String, type: UInt8, ino: UInt64)]
        do { entries = try Sys.listDirectory(store) } catch {
            _ = add(.directoryUnreadable, NameCodec.linkStore, "cannot list the link store: \(error)")
            return
        }
        for e in entries.sorted(by: { $0.name < $1.name }) {
            try tick()
            let path = NameCodec.linkStore + "/" + e.name
            let isHash = e.name.utf8.count == 43 && e.name.utf8.allSatisfy(Base64URL.isAlphabet)
            guard isHash else {
                _ = add(.foreignEntry, .warning, path, "not a name the link store uses; left alone")
                continue
            }
            let content = try? Sys.readSmallFile(store, e.name, limit: 3 * NameCodec.maxBackingTarget)
            let matches = content.map { NameCodec.storedTargetName(forEncoded: $0) == e.name } ?? false
            if !referencedLinks.contains(e.name) && rekeyInterrupted {
                // The rekey removes a symlink's old stored target after the new symlink is in
                // place, and at its end every stored target no symlink points to.
                _ = add(.linkStoreOrphan, .warning, path, "a stored symlink target no symlink refers to (the interrupted DEK rekey replaced its symlink, or an unlink was interrupted); harmless, xtsfs rekey --dek removes it when it finishes")
            } else if !referencedLinks.contains(e.name) {
                let i = add(.linkStoreOrphan, path, "a stored symlink target no symlink refers to (left by an interrupted unlink)")
                if repair {
                    if walkComplete { removeFile(store, e.name, finding: i) } else { notRepaired(i, "kept: some directory could not be checked, and a symlink in it may refer to it") }
                }
            } else if !matches {
                // Reported with the symlink; here only what it is.
                _ = add(.linkStoreMismatch, path, "its content does not hash to its name")
            }
        }
    }
}
