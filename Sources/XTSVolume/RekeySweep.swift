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

/// Fault injection for the rekey tests: `XTSFS_REKEY_FAILPOINT=N` kills the process with
/// SIGKILL (no cleanup, like `kill -9`) just after its Nth durable step; with
/// `XTSFS_REKEY_TRACE=1` every step is printed to stderr as `rekey step N: what`.
final class Failpoint {
    let limit: Int?
    let trace: Bool
    private(set) var steps = 0

    init() {
        limit = getenv("XTSFS_REKEY_FAILPOINT").flatMap { Int(String(cString: $0)) }
        trace = getenv("XTSFS_REKEY_TRACE") != nil
    }

    /// One that never fires (fsck's look at a rekey's leftovers writes nothing to count).
    init(disabled: Void) {
        limit = nil
        trace = false
    }

    func step(_ what: @autoclosure () -> String) {
        steps += 1
        if trace { writeErr("rekey step \(steps): \(what())\n") }
        if let limit, steps >= limit {
            writeErr("rekey: failpoint \(steps) reached (\(what())): killing myself\n")
            kill(getpid(), SIGKILL)
        }
    }

    func writeErr(_ s: String) { _ = s.withCString { Glibc.write(2, $0, strlen($0)) } }
}

/// Progress of a sweep, for the progress bar and `--json` events.
public struct RekeyProgress: Sendable {
    public var phase: String
    public var filesDone: Int
    public var filesTotal: Int
    public var bytesDone: Int64
    public var bytesTotal: Int64
}

/// The re-encryption of every object of a volume from one key generation to the next,
/// offline or online (`fs` set: in the daemon, beside the requests it serves), resumable:
/// each step is atomic on the backing filesystem, and whether an
/// object still needs work is read from the object itself (the generation in its header,
/// or which generation's key opens it), so a rerun after a crash at any instant picks
/// up where the last run stopped. See FORMAT.md section 13.
///
/// First (offline) every journal or copy a crash left in the tree is finished. Then per
/// directory, in order: re-encrypt every file's contents (in place, same inode, in
/// batches under a checksum journal) and xattrs and every symlink's target, recurse
/// into subdirectories, rename every entry to its new-generation name, re-encrypt the
/// directory's own xattrs, and last replace its `xtsfs.dir` with one of the new
/// generation. A directory whose `xtsfs.dir` is already new has only new names, but is
/// still entered: old objects may have been moved into it by a mount meanwhile.
final class RekeySweep {
    static let copyPrefix = BackingEntry.rekeyCopyPrefix
    static let chunk = 1 << 20
    /// A batch of files (one directory) holds at most this many bytes of them, and a
    /// larger file is rewritten in segments of this size: its new ciphertext is held in
    /// memory until written. `XTSFS_REKEY_BATCH_BYTES` changes it (the tests use a small one).
    static let defaultBatchLimit: Int64 = 64 << 20
    let batchLimit: Int64 = getenv("XTSFS_REKEY_BATCH_BYTES").flatMap { Int64(String(cString: $0)) }.map { min(max($0, 4096), 1 << 30) } ?? RekeySweep.defaultBatchLimit
    lazy var arena = RekeyArena(size: Int(batchLimit) + RekeySweep.chunk + 4 * 4096)

    let old: KeySet
    let new: KeySet
    /// The volume authenticates contents (`blockAuthentication`): its files have the
    /// layout of FORMAT.md section 12 and are rekeyed as RekeySweep+Integrity.swift does.
    /// The volume's unit tags: nil for a plain volume.
    let unitTags: UnitTagAlgorithm?
    var integrity: Bool { unitTags != nil }
    /// Feature `listingManifests`: each directory's manifest is verified under the old
    /// generation and sealed again under the new one (`rekeyManifest`), before its header
    /// is switched.
    var listingManifests = false
    let failpoint: Failpoint
    let report: (RekeyProgress) -> Void
    var progress: RekeyProgress
    var warnings: [String] = []
    /// Inodes of regular files already done in this run (hard links are visited once per name).
    var seen = Set<UInt64>()
    var countedInodes = Set<UInt64>()
    /// Online: the filesystem serving the volume while the sweep runs (nil offline). Files
    /// are then leased from it (never while open for writing), and steps that rename or
    /// replace entries or xattrs hold its namespace lock (FileSystem+Rekey.swift).
    var fs: FileSystem?
    var online: Bool { fs != nil }
    /// Online: objects left for a later pass in this one (open for writing, changed or
    /// gone under the sweep).
    var deferred = 0
    /// Online: asked to stop (the volume is being unmounted).
    var shouldStop: () -> Bool = { false }
    /// How deep the walk is: CIPHERDIR is hostile input, and a tree nested deeper than
    /// `maxDepth` (made to exhaust the stack) is refused rather than followed.
    var depth = 0
    static let maxDepth = 4096
    /// The directory being swept: its plaintext path and its directory ID (for messages
    /// that name a file by its plaintext path).
    var plainPath = "/"
    var directoryID: [UInt8] = []

    /// `xtsfs fsck` of a volume in the middle of the rekey (Fsck+Rekey.swift): a journal
    /// (`finishJournal`) or copy (`copyOver`) an interrupted run left is checked exactly as
    /// finishing it checks it, and nothing is written, removed or made durable. What
    /// finishing would report goes to `warnings` (damage: a journal that cannot be used, a
    /// record that does not fit its file, a torn unit, a copy that does not verify); what
    /// it would do without harm (drop a record whose file is gone) to `dryNotes`.
    var dryRun = false
    var dryNotes: [String] = []
    /// Dry run: the last journal checked would be kept (the sweep stops at its directory);
    /// false when at most some of its units are neither old nor new (reported, left as
    /// they are, and the rest finished).
    var dryJournalUnusable = false
    /// Dry run: (device, inode) of the files a usable journal record or copy names: half
    /// old, half new until the rekey finishes them, so not readable under one generation.
    var halfRewritten = Set<[UInt64]>()
    /// Dry run, integrity volumes: what is wrong in such a file outside the segment its
    /// journal covers (before it new, from its end on old: each checked against its tags).
    var halfRewrittenDamage: [[UInt64]: String] = [:]

    init(old: KeySet, new: KeySet, unitTags: UnitTagAlgorithm?, failpoint: Failpoint, report: @escaping (RekeyProgress) -> Void) {
        self.old = old
        self.new = new
        self.unitTags = unitTags
        self.failpoint = failpoint
        self.report = report
        progress = RekeyProgress(phase: "scan", filesDone: 0, filesTotal: 0, bytesDone: 0, bytesTotal: 0)
    }

    func keys(_ gen: UInt32) -> KeySet? { gen == old.generation ? old : gen == new.generation ? new : nil }

    enum SweepError: Error, CustomStringConvertible {
        case system(String, SystemError)
        case damaged(String)
        case stopped
        var description: String {
            switch self {
            case .system(let what, let e): return "\(what): \(e)"
            case .damaged(let s): return s
            case .stopped: return "stopped (the volume is being unmounted)"
            }
        }
    }

    /// Runs `body` exclusive of the namespace changes of the filesystem serving the
    /// volume (online); as is offline.
    func exclusive<R>(_ body: () throws(SweepError) -> R) throws(SweepError) -> R {
        guard let fs else { return try body() }
        return try fs.withNamespaceExclusive(body)
    }

    // MARK: - counting (for the progress display)

    func count(_ dirfd: Int32) {
        guard depth < RekeySweep.maxDepth, let entries = try? Sys.listDirectory(dirfd) else { return }
        depth += 1
        defer { depth -= 1 }
        for e in entries {
            switch BackingEntry.classify(e.name) {
            case .encryptedName, .longName: break
            default: continue
            }
            guard let st = try? Sys.fstatat(dirfd, e.name) else { continue }
            if st.isDirectory {
                guard let fd = try? Sys.openPath(dirfd, e.name, directory: true) else { continue }
                count(fd)
                Sys.close(fd)
            } else if st.isRegular, countedInodes.insert(UInt64(st.st_ino)).inserted {
                progress.filesTotal += 1
                progress.bytesTotal += Int64(st.st_size)
            }
        }
    }

    // MARK: - the sweep

    func run(root: Int32) throws(SweepError) {
        progress.phase = "scan"
        // Offline: first every journal (and copy) an interrupted run left, in the whole tree,
        // before any file is read: a half-rewritten file may be reached by another name
        // (a hard link) before its own directory. Online, the mount did this before serving.
        if !online { try finishAllLeftovers(root, path: "/") }
        count(root)
        progress.phase = "re-encrypt"
        report(progress)
        try sweep(root, path: "/")
        progress.phase = "done"
        report(progress)
    }

    func dirHeader(_ dirfd: Int32) throws(SweepError) -> DirHeader {
        let bytes: [UInt8]
        do { bytes = try Sys.readSmallFile(dirfd, DirHeader.fileName, limit: 4096) } catch { throw .system("read \(DirHeader.fileName)", error) }
        guard bytes.count == DirHeader.length else { throw .damaged("directory header of wrong length") }
        let gen = DirHeader.generation(of: bytes)
        guard let k = keys(gen) else { throw .damaged("directory header of unknown key generation \(gen)") }
        do { return try DirHeader.decode(bytes, macKey: k.metadataMACKey) } catch { throw .damaged("directory header: \(error)") }
    }

    static func copyName(for entry: String) -> String {
        copyPrefix + Base64URL.encode(SHA256.hash(Array(entry.utf8)))
    }

    func sweep(_ dirfd: Int32, path: String) throws(SweepError) {
        guard depth < RekeySweep.maxDepth else { throw .damaged("\(path): directories nested deeper than \(RekeySweep.maxDepth) levels; left as they are") }
        depth += 1
        defer { depth -= 1 }
        let header = try dirHeader(dirfd)
        let parentID = directoryID
        directoryID = header.directoryID
        defer { directoryID = parentID }
        // A directory already of the new generation is entered too: while the volume was
        // mounted in the middle of the rekey, an object of the old generation may have
        // been moved (or hard-linked) into it. Everything of the new generation is
        // skipped at the cost of a look at its header.
        let switched = header.keyGeneration == new.generation
        var entries: [(name: String, type: UInt8, ino: UInt64)]
        do { entries = try Sys.listDirectory(dirfd) } catch { throw .system("list \(path)", error) }

        // 1. Copies a crash left behind: a complete one is finished, a partial one dropped.
        // (Online, the mount finished them before serving: any copy is the sweep's own.)
        if !online { try finishLeftovers(dirfd, entries, path: path) }
        entries.removeAll { $0.name.hasPrefix(RekeySweep.copyPrefix) }
        // A journal still here could not be used (finishJournal said why): rewriting this
        // directory's files would put a journal of our own over it, and with it the only
        // way to rebuild the files it describes. Online, the mount finished what it could.
        if (try? Sys.fstatat(dirfd, RekeyJournal.name)) != nil {
            throw .damaged("\(path): \(RekeyJournal.name) cannot be used (see the warnings); left as it is: remove it to let the rekey finish")
        }

        // 2. Contents, xattrs and symlink targets; subdirectories recursively.
        for e in entries {
            switch BackingEntry.classify(e.name) {
            case .encryptedName, .longName: break
            default: continue
            }
            if shouldStop() { try flush(dirfd, path: path); throw .stopped }
            let st: stat
            do { st = try Sys.fstatat(dirfd, e.name) } catch {
                // Online, an entry may go (or be renamed) between the listing and now.
                if online && error.errno == ENOENT { continue }
                throw .system("stat in \(path)", error)
            }
            if st.isRegular {
                // A second name of a file already in the batch (hard links): done with it.
                if batch.contains(where: { $0.stat.st_ino == st.st_ino && $0.stat.st_dev == st.st_dev }) { continue }
                var lease: RekeyLease?
                if let fs {
                    guard let l = fs.leaseForRekey(st) else { deferred += 1; continue }
                    lease = l
                }
                let job: Job?
                do { job = try prepareFile(dirfd, e.name, st, path: path, lease: lease) } catch {
                    if let fs, let lease { fs.endLease(lease) }
                    throw error
                }
                if let job {
                    if job.size > batchLimit {
                        try flush(dirfd, path: path)
                        try rewriteAlone(dirfd, job, path: path)
                    } else {
                        // A batch's files, all in memory at once, never hold more than batchLimit bytes.
                        if batchBytes + job.size > batchLimit { try flush(dirfd, path: path) }
                        batch.append(job)
                        batchBytes += job.size
                        if batch.count >= 256 || batchBytes >= batchLimit { try flush(dirfd, path: path) }
                    }
                }
            } else if st.isDirectory {
                // A batch belongs to one directory: finish it before going down.
                try flush(dirfd, path: path)
                let fd: Int32
                do { fd = try Sys.openPath(dirfd, e.name, directory: true) } catch { throw .system("open directory in \(path)", error) }
                defer { Sys.close(fd) }
                let parentPath = plainPath
                plainPath = parentPath + plainName(dirfd, e.name) + "/"
                defer { plainPath = parentPath }
                do {
                    try sweep(fd, path: path + e.name.prefix(12) + "…/")
                    try exclusive { () throws(SweepError) in try reencryptXattrs(fd, what: path + e.name) }
                } catch {
                    // Online, a directory removed or changed under the sweep is seen again
                    // in the next pass (if it is still there).
                    guard online, case .system = error else { throw error }
                    warnings.append("\(path)\(e.name.prefix(12))…: \(error); tried again in the next pass")
                    deferred += 1
                }
            } else if st.isSymlink {
                try exclusive { () throws(SweepError) in
                    // Online: only if the name still leads to the symlink listed.
                    if online, (try? Sys.fstatat(dirfd, e.name)).map({ $0.st_ino == st.st_ino && $0.st_dev == st.st_dev }) != true { deferred += 1; return }
                    try reencryptSymlink(dirfd, e.name, st, path: path)
                }
            }
        }
        try flush(dirfd, path: path)

        // 3. Names: each entry renamed to its new-generation name (atomic, one by one),
        // and 4. the directory's own header, last: from here on its names are new.
        try exclusive { () throws(SweepError) in
            try renameEntries(dirfd, header: header, path: path)
            try rekeyManifest(dirfd, dirID: header.directoryID, path: path)
            if switched { return }
            // Online: an rmdir may have taken the directory (its header first) meanwhile.
            if online, (try? Sys.fstatat(dirfd, DirHeader.fileName)) == nil { deferred += 1; return }
            do {
                let bytes = try DirHeader(keyGeneration: new.generation, directoryID: header.directoryID).encode(macKey: new.metadataMACKey)
                try Sys.atomicWrite(bytes, at: dirfd, DirHeader.fileName, mode: 0o444)
            } catch let e as SystemError { throw .system("write \(DirHeader.fileName) in \(path)", e) } catch { throw .damaged("\(error)") }
            failpoint.step("directory header of \(path) switched")
        }
    }

    /// The copies a crash left in a directory: a complete one is copied over its file
    /// (which may be half old, half new, and readable by nobody until then), a partial
    /// one is dropped.
    func finishLeftovers(_ dirfd: Int32, _ entries: [(name: String, type: UInt8, ino: UInt64)], path: String) throws(SweepError) {
        // The checksum journal: a complete one is finished, a partial one (nothing was
        // overwritten under it yet) dropped.
        if entries.contains(where: { $0.name == RekeyJournal.temporary }) { _ = Glibc.unlinkat(dirfd, RekeyJournal.temporary, 0) }
        if entries.contains(where: { $0.name == RekeyJournal.name }) { try finishJournal(dirfd, path: path) }
        // Copies made by versions before the journal.
        guard entries.contains(where: { $0.name.hasPrefix(RekeySweep.copyPrefix) }) else { return }
        let byHash = Dictionary(entries.map { (RekeySweep.copyName(for: $0.name), $0.name) }, uniquingKeysWith: { a, _ in a })
        for e in entries where e.name.hasPrefix(RekeySweep.copyPrefix) {
            if e.name.hasSuffix(".tmp") { _ = Glibc.unlinkat(dirfd, e.name, 0); continue }
            guard let target = byHash[e.name] else {
                warnings.append("\(path): \(e.name) has no file to go to; removed")
                _ = Glibc.unlinkat(dirfd, e.name, 0)
                continue
            }
            try finishCopy(dirfd, copy: e.name, target: target, path: path)
        }
    }

    /// Before a volume in the middle of a rekey is mounted: every copy a crash left is
    /// finished or dropped (the whole tree is listed; nothing else is changed), so that
    /// no file is half old, half new while the filesystem serves it.
    func finishAllLeftovers(_ dirfd: Int32, path: String) throws(SweepError) {
        guard depth < RekeySweep.maxDepth else { throw .damaged("\(path): directories nested deeper than \(RekeySweep.maxDepth) levels") }
        depth += 1
        defer { depth -= 1 }
        let entries: [(name: String, type: UInt8, ino: UInt64)]
        do { entries = try Sys.listDirectory(dirfd) } catch { throw .system("list \(path)", error) }
        try finishLeftovers(dirfd, entries, path: path)
        for e in entries where e.type == UInt8(DT_DIR) || e.type == UInt8(DT_UNKNOWN) {
            switch BackingEntry.classify(e.name) {
            case .encryptedName, .longName: break
            default: continue
            }
            guard let fd = try? Sys.openPath(dirfd, e.name, directory: true) else { continue }
            defer { Sys.close(fd) }
            try finishAllLeftovers(fd, path: path + e.name.prefix(12) + "…/")
        }
    }

    // MARK: - names

    func renameEntries(_ dirfd: Int32, header: DirHeader, path: String) throws(SweepError) {
        let oldNames = NameCodec(keys: old), newNames = NameCodec(keys: new)
        let entries: [(name: String, type: UInt8, ino: UInt64)]
        do { entries = try Sys.listDirectory(dirfd) } catch { throw .system("list \(path)", error) }
        let present = Set(entries.map(\.name))
        for e in entries {
            let encoded: String
            switch BackingEntry.classify(e.name) {
            case .encryptedName: encoded = e.name
            case .longName:
                guard let full = try? Sys.readSmallFile(dirfd, e.name + NameCodec.longSuffix, limit: 4096),
                      NameCodec.longEntryName(forEncoded: full) == e.name else {
                    warnings.append("\(path): long name \(e.name) has no valid side file; left as it is")
                    continue
                }
                encoded = String(decoding: full, as: UTF8.self)
            case .longNameRecord(let entry):
                // A side file whose entry is gone (a crash after the rename): drop it if it is old.
                if !present.contains(entry), let full = try? Sys.readSmallFile(dirfd, e.name, limit: 4096),
                   (try? oldNames.decrypt(String(decoding: full, as: UTF8.self), directoryID: header.directoryID)) != nil {
                    _ = Glibc.unlinkat(dirfd, e.name, 0)
                }
                continue
            default: continue
            }
            if (try? newNames.decrypt(encoded, directoryID: header.directoryID)) != nil { continue }
            guard let plain = try? oldNames.decrypt(encoded, directoryID: header.directoryID) else {
                warnings.append("\(path): \(e.name.prefix(20))… decrypts under neither generation; left as it is")
                continue
            }
            let target: BackingName
            do { target = try newNames.encrypt(plain, directoryID: header.directoryID) } catch { throw .damaged("encrypt name: \(error)") }
            do {
                if case .long(let hashed, let full) = target {
                    try Sys.atomicWrite(Array(full.utf8), at: dirfd, hashed + NameCodec.longSuffix, mode: 0o444)
                }
                try Sys.renameatNoReplace(dirfd, e.name, dirfd, target.entryName)
            } catch {
                if online && error.errno == ENOENT { continue }
                throw .system("rename in \(path)", error)
            }
            failpoint.step("entry renamed in \(path)")
            if case .longName = BackingEntry.classify(e.name) {
                _ = Glibc.unlinkat(dirfd, e.name + NameCodec.longSuffix, 0)
            }
        }
    }

    // MARK: - files

    func fileGeneration(_ fd: Int32) throws(SweepError) -> (gen: UInt32, raw: [UInt8])? {
        var raw = [UInt8](repeating: 0, count: FileHeader.length)
        let n: Int
        do { n = try raw.withMutableBytes { (p) throws(SystemError) -> Int in try Sys.pread(fd, p.baseAddress!, p.count, 0) } } catch { throw .system("read file header", error) }
        guard n == FileHeader.length else { return nil }
        return (FileHeader.generation(of: raw), raw)
    }

    /// A file whose new ciphertext is being prepared, in a batch of one directory.
    struct Job {
        var name: String
        var stat: stat
        var from: FileCrypto
        var to: FileCrypto
        /// The file's header as it is (old) and as it will be (new).
        var oldHeader: [UInt8]
        var newHeader: [UInt8]
        /// The file, open read-write until its batch is done (online since its lease was
        /// taken: the name may change meanwhile, the inode does not), and the lease.
        var fd: Int32
        var lease: RekeyLease?
        /// The backing bytes rewritten (the backing size; of an integrity file, the one
        /// its committed length gives) and the plaintext size.
        var size: Int64
        var plainSize: Int64
        /// For messages: the file's plaintext path (integrity volumes), else its backing one.
        var display: String
    }
    var batch: [Job] = []
    var batchBytes: Int64 = 0

    func counted(_ st: stat) {
        let ino = UInt64(st.st_ino)
        guard !seen.contains(ino) else { return }
        seen.insert(ino)
        progress.filesDone += 1
        progress.bytesDone += Int64(st.st_size)
        report(progress)
    }

    /// Re-encrypts the file's xattrs; returns the work for its contents if it is still of
    /// the old generation (nil for an empty, new or damaged file). The job keeps the file
    /// open (and online its lease) until its batch is done; otherwise both end here.
    func prepareFile(_ dirfd: Int32, _ name: String, _ st: stat, path: String, lease: RekeyLease? = nil) throws(SweepError) -> Job? {
        let fd: Int32
        do {
            let (f, fst) = try Sys.openRegular(dirfd, name, O_RDWR)
            fd = f
            // Online: the name may lead to another file by now; that one is for the next pass.
            if online, fst.st_ino != st.st_ino || fst.st_dev != st.st_dev || fst.st_size != st.st_size {
                Sys.close(fd)
                if let fs, let lease { fs.endLease(lease) }
                deferred += 1
                return nil
            }
        } catch {
            if let fs, let lease { fs.endLease(lease) }
            if online && error.errno == ENOENT { deferred += 1; return nil }
            throw .system("open file in \(path)", error)
        }
        var keep = false
        defer {
            if !keep {
                Sys.close(fd)
                if let fs, let lease { fs.endLease(lease) }
            }
        }
        try exclusive { () throws(SweepError) in try reencryptXattrs(fd, what: path + name) }
        guard st.st_size > 0 else { counted(st); return nil }
        if integrity {
            guard let job = try prepareIntegrityFile(dirfd, fd, name, st, path: path, lease: lease) else { counted(st); return nil }
            keep = true
            return job
        }
        guard let found = try fileGeneration(fd) else {
            warnings.append("\(path)\(name.prefix(20))…: backing file shorter than its header; left as it is")
            counted(st)
            return nil
        }
        let (gen, raw) = found
        if gen == new.generation { counted(st); return nil }
        guard gen == old.generation else { warnings.append("\(path)\(name.prefix(20))…: unknown key generation \(gen); left as it is"); counted(st); return nil }
        let oldHeader: FileHeader
        do { oldHeader = try FileHeader.decode(raw, macKey: old.metadataMACKey) } catch {
            warnings.append("\(path)\(name.prefix(20))…: damaged file header; left as it is")
            counted(st)
            return nil
        }
        do {
            let newHeader = try FileHeader.random(keyGeneration: new.generation)
            let job = Job(name: name, stat: st, from: try FileCrypto(keys: old, header: oldHeader), to: try FileCrypto(keys: new, header: newHeader),
                          oldHeader: raw, newHeader: try newHeader.encode(macKey: new.metadataMACKey), fd: fd, lease: lease,
                          size: Int64(st.st_size), plainSize: Layout.plainSize(backingSize: Int64(st.st_size)), display: path + name.prefix(20) + "…")
            keep = true
            return job
        } catch { throw .damaged("\(error)") }
    }

    /// After an error: the files of a batch not yet written are let go (online, their
    /// leases hold requests for them).
    func abandonBatch() {
        for j in batch { release(j) }
        batch.removeAll()
        batchBytes = 0
    }

    func release(_ j: Job) {
        Sys.close(j.fd)
        if let fs, let l = j.lease { fs.endLease(l) }
    }

    /// Online: whether the job's name still leads to its file (not renamed, removed or
    /// replaced since its lease was taken); one that does not is left for the next pass.
    func stillThere(_ dirfd: Int32, _ j: Job) -> Bool {
        guard online else { return true }
        return (try? Sys.fstatat(dirfd, j.name)).map { $0.st_ino == j.stat.st_ino && $0.st_dev == j.stat.st_dev } == true
    }

    /// The batch's files, each read once and its new ciphertext computed in memory; then
    /// (1) the checksum journal of all of them written and made complete (FORMAT.md 13.1);
    /// (2) each file overwritten in place (same inode: hard links stay); one `syncfs`;
    /// (3) the journal removed. A crash before (1) is complete leaves the files old; after
    /// it, the journal tells every unit's generation, and the rerun (or the mount) finishes it.
    func flush(_ dirfd: Int32, path: String) throws(SweepError) {
        var jobs = batch
        batch.removeAll()
        batchBytes = 0
        guard !jobs.isEmpty else { return }
        defer { for j in jobs { release(j) } }
        var segments: [Segment] = []
        arena.used = 0
        do {
            // Every file read and re-encrypted in memory, the files shared among the processors.
            segments = try computeBatch(jobs)
            for (j, seg) in zip(jobs, segments) {
                // Never short: a batch fits its memory (see the sweep).
                guard seg.record.coverEnd >= j.plainSize else { throw SweepError.damaged("\(path): a batch larger than its memory") }
            }
        } catch let e as SweepError { throw e } catch let e as SystemError { throw .system("read a file in \(path)", e) } catch { throw .damaged("re-encrypt: \(error)") }
        try exclusive { () throws(SweepError) in
            let moved = jobs.indices.filter { !stillThere(dirfd, jobs[$0]) }
            deferred += moved.count
            for i in moved.reversed() {
                release(jobs[i])
                jobs.remove(at: i)
                segments.remove(at: i)
            }
            guard !jobs.isEmpty else { return }
            if integrity { for j in jobs { try fitBackingSize(j.fd, j.size, path: path) } }
            try writeJournal(dirfd, segments.map(\.record), path: path)
            do {
                for (j, seg) in zip(jobs, segments) {
                    try writeInPlace(j.fd, seg, header: !integrity)
                    failpoint.step("file rewritten in place in \(path)")
                }
                try syncAll(dirfd, path: path)
            } catch {
                // The journal is complete: finish the batch from it (as a rerun would).
                try? finishJournal(dirfd, path: path)
                if let e = error as? SweepError { throw e }
                throw .system("rewrite files in \(path)", error as? SystemError ?? SystemError(EIO, "\(error)"))
            }
            failpoint.step("batch rewritten and synced in \(path)")
            try removeJournal(dirfd, path: path)
        }
        for j in jobs { counted(j.stat) }
    }

    /// A file larger than a batch, rewritten alone in segments (`rewriteLarge`); online
    /// with the namespace held throughout, since its journal names it.
    func rewriteAlone(_ dirfd: Int32, _ j: Job, path: String) throws(SweepError) {
        defer { release(j) }
        let done = try exclusive { () throws(SweepError) -> Bool in
            guard stillThere(dirfd, j) else { deferred += 1; return false }
            try rewriteLarge(dirfd, fd: j.fd, name: j.name, backingSize: j.size, start: 0, from: j.from, to: j.to,
                             oldHeader: j.oldHeader, newHeader: j.newHeader, path: path, display: j.display)
            return true
        }
        if done { counted(j.stat) }
    }

    func syncAll(_ dirfd: Int32, path: String) throws(SweepError) {
        let fd: Int32
        do { fd = try Sys.openDirectory(dirfd) } catch { throw .system("open \(path)", error) }
        defer { Sys.close(fd) }
        guard xts_syncfs(fd) == 0 else { throw .system("syncfs", SystemError(errno, "syncfs")) }
    }

    /// Copies a complete copy left by a crash over its file, in place, then removes it.
    func finishCopy(_ dirfd: Int32, copy: String, target: String, path: String) throws(SweepError) {
        try copyOver(dirfd, copy: copy, target: target, path: path, sync: true)
        _ = Glibc.unlinkat(dirfd, copy, 0)
        failpoint.step("copy removed in \(path)")
    }

    /// Copies a complete copy over its file, in place (made durable only with `sync`).
    /// `targetFD`: the file already open (online: by inode, whatever its name is now).
    func copyOver(_ dirfd: Int32, copy: String, target: String, path: String, sync: Bool, targetFD: Int32 = -1) throws(SweepError) {
        do {
            let (src, sst) = try Sys.openRegular(dirfd, copy, O_RDONLY)
            defer { Sys.close(src) }
            let (dst, dstSt) = targetFD >= 0 ? (targetFD, try Sys.fstat(targetFD)) : try Sys.openRegular(dirfd, target, dryRun ? O_RDONLY : O_RDWR)
            defer { if targetFD < 0 { Sys.close(dst) } }
            guard sst.st_size == dstSt.st_size else {
                throw SweepError.damaged("\(path): the rekey copy \(copy) is \(sst.st_size) bytes, its file \(dstSt.st_size): the file changed during the rekey; both are left as they are")
            }
            // The copy must be of the new generation and verify, or it is not ours.
            guard let got = try fileGeneration(src), got.gen == new.generation,
                  (try? FileHeader.decode(got.raw, macKey: new.metadataMACKey)) != nil else {
                throw SweepError.damaged("\(path): the rekey copy \(copy) does not verify under the new key; left as it is")
            }
            if dryRun {
                // Half copied over, perhaps: readable once the rekey copies the rest.
                halfRewritten.insert([UInt64(dstSt.st_dev), UInt64(dstSt.st_ino)])
                return
            }
            try copyData(src, dst, size: Int64(sst.st_size), stepEvery: true)
            if sync { try Sys.fdatasync(dst) }
        } catch let e as SweepError { throw e } catch let e as SystemError { throw .system("copy over a file in \(path)", e) } catch { throw .damaged("\(error)") }
        failpoint.step("file rewritten in place in \(path)")
    }

    /// Copies the data extents of `src` over `dst` at the same offsets. Holes of `src` are
    /// zero units of the old ciphertext too, so `dst` is already zero there.
    func copyData(_ src: Int32, _ dst: Int32, size: Int64, stepEvery: Bool) throws {
        let buf = UnsafeMutableRawBufferPointer.allocate(byteCount: RekeySweep.chunk, alignment: 4096)
        defer { buf.deallocate() }
        var pos: Int64 = 0
        var chunks = 0
        while pos < size {
            let data = lseek(src, off_t(pos), 3 /* SEEK_DATA */)
            if data < 0 { if errno == ENXIO { break }; throw SystemError(errno, "seek") }
            let hole = min(Int64(lseek(src, data, 4 /* SEEK_HOLE */)), size)
            var p = Int64(data)
            while p < hole {
                let n = Int(min(Int64(buf.count), hole - p))
                let got = try Sys.pread(src, buf.baseAddress!, n, p)
                guard got > 0 else { break }
                try Sys.pwrite(dst, buf.baseAddress!, got, p)
                p += Int64(got)
                chunks += 1
                // One failpoint in the middle of a large file's copy.
                if stepEvery && chunks == 2 { failpoint.step("file half rewritten in place") }
            }
            pos = hole
        }
    }

    func isZero(_ p: UnsafeRawPointer, _ n: Int) -> Bool {
        var i = 0
        while i + 8 <= n { if p.loadUnaligned(fromByteOffset: i, as: UInt64.self) != 0 { return false }; i += 8 }
        while i < n { if p.load(fromByteOffset: i, as: UInt8.self) != 0 { return false }; i += 1 }
        return true
    }

    // MARK: - symlinks

    func reencryptSymlink(_ dirfd: Int32, _ name: String, _ st: stat, path: String) throws(SweepError) {
        let raw: [UInt8]
        do { raw = try Sys.readlinkat(dirfd, name) } catch { throw .system("readlink in \(path)", error) }
        let stored = String(decoding: raw, as: UTF8.self)
        var encoded = raw
        var storeName: String?
        if stored.hasPrefix(NameCodec.storedTargetPrefix) {
            let s = String(stored.dropFirst(NameCodec.storedTargetPrefix.count))
            guard let store = try? Sys.openPath(rootFD, NameCodec.linkStore, directory: true) else {
                warnings.append("\(path): a stored symlink target, but no link store; left as it is"); return
            }
            defer { Sys.close(store) }
            guard let bytes = try? Sys.readSmallFile(store, s, limit: 8192), NameCodec.storedTargetName(forEncoded: bytes) == s else {
                warnings.append("\(path): stored symlink target \(s) is missing or damaged; left as it is"); return
            }
            encoded = bytes
            storeName = s
        }
        if (try? NameCodec(keys: new).decryptTarget(encoded)) != nil { return }
        guard let target = try? NameCodec(keys: old).decryptTarget(encoded) else {
            warnings.append("\(path)\(name.prefix(20))…: symlink target decrypts under neither generation; left as it is"); return
        }
        do {
            let e = try NameCodec(keys: new).encryptTarget(target)
            var linkText = e
            if e.utf8.count > NameCodec.maxBackingTarget {
                let s = NameCodec.storedTargetName(forEncoded: Array(e.utf8))
                let store = try openLinkStore()
                defer { Sys.close(store) }
                try Sys.atomicWrite(Array(e.utf8), at: store, s, mode: 0o444)
                linkText = NameCodec.storedTargetPrefix + s
            }
            let tmp = RekeySweep.copyName(for: name) + ".tmp"
            _ = Glibc.unlinkat(dirfd, tmp, 0)
            try Sys.symlinkat(linkText, dirfd, tmp)
            // The symlink's owner and times are the old one's.
            if geteuid() == 0 { _ = fchownat(dirfd, tmp, st.st_uid, st.st_gid, AT_SYMLINK_NOFOLLOW) }
            var times = (st.st_atim, st.st_mtim)
            _ = withUnsafePointer(to: &times) { $0.withMemoryRebound(to: timespec.self, capacity: 2) { utimensat(dirfd, tmp, $0, AT_SYMLINK_NOFOLLOW) } }
            try Sys.renameat(dirfd, tmp, dirfd, name)
            // Online: the node the kernel knows for the symlink follows the new one.
            if let fs, let now = try? Sys.fstatat(dirfd, name) { fs.objectReplaced(old: st, new: now) }
        } catch let e as SystemError { throw .system("rewrite symlink in \(path)", e) } catch { throw .damaged("symlink: \(error)") }
        failpoint.step("symlink target re-encrypted in \(path)")
        // The old stored target goes with the old symlink (unless another hard link still uses it).
        if let s = storeName, st.st_nlink <= 1, let store = try? Sys.openPath(rootFD, NameCodec.linkStore, directory: true) {
            _ = Glibc.unlinkat(store, s, 0)
            Sys.close(store)
        }
    }

    var rootFD: Int32 = -1

    func openLinkStore() throws(SystemError) -> Int32 {
        do { return try Sys.openPath(rootFD, NameCodec.linkStore, directory: true) } catch {
            guard error.errno == ENOENT else { throw error }
            try Sys.mkdirat(rootFD, NameCodec.linkStore, 0o700)
            return try Sys.openPath(rootFD, NameCodec.linkStore, directory: true)
        }
    }

    // MARK: - xattrs

    func reencryptXattrs(_ fd: Int32, what: String) throws(SweepError) {
        let names: [String]
        do { names = try Sys.listxattr(pinned: fd) } catch {
            if error.errno == EOPNOTSUPP || error.errno == ENOTSUP { return }
            throw .system("listxattr \(what)", error)
        }
        let oldCodec = XattrCodec(keys: old), newCodec = XattrCodec(keys: new)
        for name in names where name.hasPrefix(XattrCodec.namespace) {
            if newCodec.decryptName(name) != nil { continue }
            guard let plain = oldCodec.decryptName(name) else { continue }
            do {
                var buf = [UInt8](repeating: 0, count: 65536)
                let n = try buf.withMutableBytes { (p) throws(SystemError) -> Int in try Sys.getxattr(pinned: fd, name, into: p) }
                let value = try oldCodec.decryptValue(Array(buf[0..<n]), backingName: name)
                guard let newName = try newCodec.encryptName(plain) else { continue }
                do {
                    // Online, a value set through the mount since (under the new name) wins.
                    try Sys.setxattr(pinned: fd, newName, try newCodec.encryptValue(value, backingName: newName), flags: online ? XTS_XATTR_CREATE : 0)
                } catch let e as SystemError where online && e.errno == EEXIST {}
                failpoint.step("xattr re-encrypted (old name still there) of \(what)")
                try Sys.removexattr(pinned: fd, name)
            } catch let e as SystemError { throw .system("xattr of \(what)", e) } catch {
                warnings.append("\(what): an xattr does not decrypt (\(error)); left as it is")
            }
        }
    }

    // MARK: - verification

    /// Walks the whole volume read-only: every directory header, name, file header, symlink
    /// target and xattr must be of the new generation. Returns what is still old (empty
    /// when the old generation can go) and the link-store names in use.
    func verify(_ dirfd: Int32, path: String, old found: inout [String], links: inout Set<String>) {
        guard depth < RekeySweep.maxDepth else { found.append("\(path): directories nested deeper than \(RekeySweep.maxDepth) levels"); return }
        depth += 1
        defer { depth -= 1 }
        guard let header = try? dirHeader(dirfd), header.keyGeneration == new.generation else {
            found.append("\(path): directory header not of the new generation"); return
        }
        guard let entries = try? Sys.listDirectory(dirfd) else { found.append("\(path): unreadable"); return }
        if listingManifests, ListManifest.generation(of: (try? Sys.readSmallFile(dirfd, ListManifest.fileName, limit: 4096)) ?? []) != new.generation {
            found.append("\(path): listing manifest not of the new generation")
        }
        let newNames = NameCodec(keys: new), oldNames = NameCodec(keys: old), newX = XattrCodec(keys: new), oldX = XattrCodec(keys: old)
        for e in entries {
            switch BackingEntry.classify(e.name) {
            case .encryptedName:
                if (try? newNames.decrypt(e.name, directoryID: header.directoryID)) == nil,
                   (try? oldNames.decrypt(e.name, directoryID: header.directoryID)) != nil { found.append("\(path): an old-generation name") }
            case .longName:
                if let full = try? Sys.readSmallFile(dirfd, e.name + NameCodec.longSuffix, limit: 4096) {
                    let s = String(decoding: full, as: UTF8.self)
                    if (try? newNames.decrypt(s, directoryID: header.directoryID)) == nil,
                       (try? oldNames.decrypt(s, directoryID: header.directoryID)) != nil { found.append("\(path): an old-generation long name") }
                }
            default:
                if e.name.hasPrefix(RekeySweep.copyPrefix) { found.append("\(path): a rekey copy left over") }
                if e.name == RekeyJournal.name { found.append("\(path): a rekey journal left over") }
                continue
            }
            guard let st = try? Sys.fstatat(dirfd, e.name), let fd = try? Sys.openPath(dirfd, e.name, directory: (st.mode & S_IFMT) == S_IFDIR) else { continue }
            defer { Sys.close(fd) }
            if !st.isSymlink, let xs = try? Sys.listxattr(pinned: fd) {
                for x in xs where x.hasPrefix(XattrCodec.namespace) && newX.decryptName(x) == nil && oldX.decryptName(x) != nil {
                    found.append("\(path): an old-generation xattr")
                }
            }
            if st.isDirectory {
                verify(fd, path: path + e.name.prefix(12) + "…/", old: &found, links: &links)
            } else if st.isRegular, st.st_size >= FileHeader.length {
                guard let rfd = try? Sys.reopen(fd, O_RDONLY) else { continue }
                defer { Sys.close(rfd) }
                if let got = try? fileGeneration(rfd), got.gen == old.generation { found.append("\(path): an old-generation file") }
            } else if st.isSymlink, let raw = try? Sys.readlinkat(dirfd, e.name) {
                let s = String(decoding: raw, as: UTF8.self)
                var encoded = raw
                if s.hasPrefix(NameCodec.storedTargetPrefix) {
                    let name = String(s.dropFirst(NameCodec.storedTargetPrefix.count))
                    links.insert(name)
                    guard let store = try? Sys.openPath(rootFD, NameCodec.linkStore, directory: true) else { continue }
                    defer { Sys.close(store) }
                    guard let b = try? Sys.readSmallFile(store, name, limit: 8192) else { continue }
                    encoded = b
                }
                if (try? newNames.decryptTarget(encoded)) == nil, (try? oldNames.decryptTarget(encoded)) != nil { found.append("\(path): an old-generation symlink target") }
            }
        }
    }
}

extension stat {
    var mode: mode_t { st_mode }
}

/// Runs `body` on a thread with a large stack and waits for it: the sweep's walk recurses
/// once per directory level (up to `RekeySweep.maxDepth`), more than a default stack holds.
enum LargeStack {
    static let size = 256 << 20

    final class Box: @unchecked Sendable {
        let body: () -> Void
        init(_ body: @escaping () -> Void) { self.body = body }
    }

    static func run(_ body: () -> Void) {
        withoutActuallyEscaping(body) { escapable in
            let box = Unmanaged.passRetained(Box(escapable)).toOpaque()
            var attr = pthread_attr_t()
            pthread_attr_init(&attr)
            defer { pthread_attr_destroy(&attr) }
            pthread_attr_setstacksize(&attr, size)
            var thread = pthread_t()
            if pthread_create(&thread, &attr, { arg in
                Unmanaged<Box>.fromOpaque(arg!).takeRetainedValue().body()
                return nil
            }, box) == 0 {
                pthread_join(thread, nil)
            } else {
                Unmanaged<Box>.fromOpaque(box).takeRetainedValue().body()
            }
        }
    }
}
