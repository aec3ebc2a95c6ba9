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

/// `xtsfs fsck`: checks every header copy, keyslot, directory header, name, file header,
/// symlink target and extended attribute of an unmounted volume; with `repair`, fixes
/// what is provably safe to fix and quarantines what it cannot read into `lost+found`.
/// It never deletes anything that could hold data: only `.tmp` leftovers whose original
/// is intact, side files of names that no longer exist, and link-store files no symlink
/// refers to.
///
/// In the middle of a DEK rekey (Fsck+Rekey.swift) both generations are checked, each
/// object under the generation it names, and the rekey's leftovers are reported as what
/// `xtsfs rekey --dek` will do with them; `--repair` is refused there.
///
/// CIPHERDIR is hostile input, as in the filesystem: every object is reached from a
/// directory descriptor one name at a time, never through a symlink, and internal files
/// are read only when they are regular files of bounded size.
public final class Fsck {
    public struct Options: Sendable {
        public var cipherDir: String
        public var repair: Bool
        /// Called now and then with (directories, entries) checked so far.
        public var progress: (@Sendable (Int, Int) -> Void)?
        public var isCancelled: @Sendable () -> Bool
        public init(cipherDir: String, repair: Bool, progress: (@Sendable (Int, Int) -> Void)? = nil,
                    isCancelled: @escaping @Sendable () -> Bool = { false }) {
            self.cipherDir = cipherDir
            self.repair = repair
            self.progress = progress
            self.isCancelled = isCancelled
        }
    }

    public static let lostAndFound = "lost+found"

    let options: Options
    let cipherDir: String
    var repair: Bool { options.repair }
    var report: FsckReport
    var root: Int32 = -1
    var rootDev: UInt64 = 0
    var keys: KeySet?
    /// The volume authenticates file contents (init --integrity), with these unit tags.
    var unitTags: UnitTagAlgorithm?
    var integrity: Bool { unitTags != nil }
    /// Feature `listingManifests`: every directory's entries are checked against its
    /// manifest (FORMAT.md 12.10), and every file must have a header.
    var listingManifests = false
    var names: NameCodec?
    /// The root directory's ID; nil when its header is damaged or no key was given.
    var rootDirID: [UInt8]?
    /// False once a directory could not be listed: then nothing is known to be unreferenced.
    var walkComplete = true
    /// Link-store names some symlink points to.
    var referencedLinks = Set<String>()
    var lostFound: (fd: Int32, dirID: [UInt8])?
    /// Backing names moved into lost+found by this run (not checked again there).
    var movedIntoLostFound = Set<String>()
    var fileSystem: FileSystem?
    /// The header says a DEK rekey was interrupted (the copy in use, or any copy without a key).
    var rekeyInterrupted = false
    /// In the middle of a DEK rekey: the new generation's keys, from the header's rekey
    /// record (`keys` are the old generation's, which the header's keyslots open).
    var pendingKeys: KeySet?
    /// Every generation the volume holds: `keys`, and mid-rekey `pendingKeys`.
    var generations: KeyGenerations?
    /// A name codec per generation held, newest first.
    var nameCodecs: [NameCodec] = []
    /// Mid-rekey: what finishing each journal and copy would find, by backing path.
    var leftovers: [String: RekeyLeftover] = [:]
    /// Mid-rekey: (device, inode) of the files a journal or copy names (half old, half new).
    var halfRewritten = Set<[UInt64]>()
    /// Mid-rekey, integrity volumes: damage in such a file outside its journal's segment.
    var halfRewrittenDamage: [[UInt64]: String] = [:]
    var entriesSeen = 0
    var directoriesSeen = 0
    var lastProgress = 0

    init(options: Options, keyUsed: Bool) {
        self.options = options
        self.cipherDir = options.cipherDir
        self.report = FsckReport(cipherDir: options.cipherDir, mode: options.repair ? "repair" : "check", keyUsed: keyUsed)
    }

    deinit {
        if root >= 0 { Sys.close(root) }
        if let lf = lostFound { Sys.close(lf.fd) }
    }

    /// Runs the whole check. Throws `VolumeError` when it cannot run at all (not a volume,
    /// wrong key, unreadable CIPHERDIR) and `FsckCancelled` when interrupted.
    public static func run(_ options: Options, provider: (any KeyProvider)?) throws -> FsckReport {
        let fsck = Fsck(options: options, keyUsed: provider != nil)
        try fsck.start(provider: provider)
        fsck.report.directories = fsck.directoriesSeen
        fsck.report.exitStatus = fsck.report.computedExit
        return fsck.report
    }

    func start(provider: (any KeyProvider)?) throws {
        do { root = try Sys.open(cipherDir, XTS_O_PATH | O_DIRECTORY | O_CLOEXEC) } catch {
            if error.errno == ENOENT { throw VolumeError.notAVolume("\(cipherDir) does not exist") }
            if error.errno == ENOTDIR { throw VolumeError.notAVolume("\(cipherDir) is not a directory") }
            throw VolumeError.failure("cannot open \(cipherDir): \(error)")
        }
        do { rootDev = UInt64(try Sys.fstat(root).st_dev) } catch { throw VolumeError.failure("\(error)") }
        // Integrity volumes have files of another layout (FORMAT.md §12): every unit is
        // read and checked against its tag, and the length against the committed one.
        if let loaded = try? Volume.load(cipherDir) {
            unitTags = loaded.candidates.lazy.compactMap(\.header.features.unitTags).first
            listingManifests = unitTags != nil && loaded.candidates.contains { $0.header.features.contains(.listingManifests) }
            // Mid-rekey, names and files of two key generations stand side by side, and what
            // looks out of place may be the rekey's own progress (a half-rewritten file, a
            // side file between two renames): a check reports it, a repair is refused.
            // With the key, the copy in use decides (unlockAndRepairHeaders), before any repair.
            if loaded.candidates.contains(where: { $0.header.features.contains(.rekeyInProgress) }) {
                if repair && provider == nil { throw VolumeError.refused(Fsck.midRekeyRepairRefusal(cipherDir)) }
                rekeyInterrupted = true
            }
        }
        guard try checkHeaders(provider: provider) else { return }
        if keys == nil {
            report.notes.append("no key given: names, symlink targets, extended attributes and the MACs of file and directory headers were not checked (give --passfile FILE, or the passphrase at the prompt)")
        }
        if rekeyInterrupted { try startMidRekey() }
        try walk(dir: root, backingPath: ".", plainPath: rootDirID == nil ? nil : "/", isRoot: true, depth: 0)
        try checkLinkStore()
        options.progress?(directoriesSeen, entriesSeen)
    }

    // MARK: - findings

    @discardableResult
    func add(_ kind: FsckDamage, _ backing: String, plain: String? = nil, shadows: String? = nil, _ detail: String) -> Int {
        add(kind, .error, backing, plain: plain, shadows: shadows, detail)
    }

    @discardableResult
    func add(_ kind: FsckDamage, _ severity: FsckSeverity, _ backing: String, plain: String? = nil,
             shadows: String? = nil, _ detail: String) -> Int {
        report.findings.append(FsckFinding(kind: kind, severity: severity, backingPath: backing, plaintextPath: plain,
                                           shadows: shadows, detail: detail, repaired: nil, notRepaired: nil))
        return report.findings.count - 1
    }

    func repaired(_ i: Int, _ action: FsckAction) { report.findings[i].repaired = action }
    func notRepaired(_ i: Int, _ why: String) { report.findings[i].notRepaired = why }

    func checkCancelled() throws {
        if options.isCancelled() { throw FsckCancelled() }
    }

    func tick() throws {
        entriesSeen += 1
        if entriesSeen - lastProgress >= 64 {
            lastProgress = entriesSeen
            options.progress?(directoriesSeen, entriesSeen)
            try checkCancelled()
        }
    }

    static func join(_ dir: String, _ name: String) -> String { dir == "." ? name : dir + "/" + name }
    static func joinPlain(_ dir: String?, _ name: [UInt8]?) -> String? {
        guard let dir, let name else { return nil }
        let n = String(decoding: name, as: UTF8.self)
        return dir == "/" ? "/" + n : dir + "/" + n
    }

    // MARK: - header copies

    struct Copy {
        var copy: Int
        var name: String { HeaderStore.fileNames[copy] }
        var bytes: [UInt8]?
        var header: VolumeHeader?
        var problem: FsckDamage?
        var detail = ""
    }

    /// Returns false when nothing further can be checked.
    func checkHeaders(provider: (any KeyProvider)?) throws -> Bool {
        var copies: [Copy] = []
        for c in 0..<HeaderStore.fileNames.count {
            var copy = Copy(copy: c)
            do {
                let bytes = try Sys.readSmallFile(root, copy.name, limit: VolumeHeader.maxLength + 1)
                copy.bytes = bytes
                do { copy.header = try VolumeHeader.decode(bytes) } catch {
                    switch error {
                    case .unsupportedVersion, .unsupportedFeatures: copy.problem = .headerCopyUnsupported
                    default: copy.problem = .headerCopyDamaged
                    }
                    copy.detail = "\(error)"
                }
            } catch {
                copy.problem = error.errno == ENOENT ? .headerCopyMissing : .headerCopyDamaged
                copy.detail = error.errno == ENOENT ? "missing" : "unusable: \(error)"
            }
            copies.append(copy)
        }
        let valid = copies.filter { $0.header != nil }
        if copies.allSatisfy({ $0.problem == .headerCopyMissing }) {
            guard (try? Sys.fstatat(root, DirHeader.fileName)) != nil else {
                throw VolumeError.notAVolume("\(cipherDir) is not an xtsfs volume (no \(HeaderStore.fileNames[0]))")
            }
            for c in copies {
                let i = add(.headerCopyMissing, c.name, "both header copies are missing; only a header backup can bring the volume back (xtsfs header restore)")
                if repair { notRepaired(i, "no copy left to restore from") }
            }
            return false
        }
        if valid.isEmpty {
            if copies.allSatisfy({ $0.problem == .headerCopyUnsupported || $0.problem == .headerCopyMissing }) {
                throw VolumeError.unsupported("the volume header is not one this xtsfs can check: " + copies.map { "\($0.name): \($0.detail)" }.joined(separator: "; "))
            }
            for c in copies {
                let i = add(c.problem ?? .headerCopyDamaged, c.name, c.detail)
                if repair { notRepaired(i, "no valid copy to restore from") }
            }
            return false
        }
        for c in valid { checkKeyslots(c) }

        guard let provider else {
            // Key-free: what the checksums and volume IDs alone can tell.
            for c in copies where c.problem != nil {
                let i = add(c.problem!, c.name, c.detail)
                if repair { notRepaired(i, "restoring a header copy needs the key (to verify the copy it is restored from)") }
            }
            if valid.count == 2 {
                let (a, b) = (valid[0].header!, valid[1].header!)
                if a.volumeID != b.volumeID {
                    let i = add(.headerCopiesDisagree, ".", "\(valid[0].name) and \(valid[1].name) belong to different volumes (\(StatusReport.hex(a.volumeID)), \(StatusReport.hex(b.volumeID))); the key tells which one is this volume's")
                    if repair { notRepaired(i, "needs the key") }
                } else if a.sequence != b.sequence {
                    let old = a.sequence < b.sequence ? valid[0] : valid[1]
                    let i = add(.headerCopyOutdated, old.name, "sequence \(min(a.sequence, b.sequence)), the other copy has \(max(a.sequence, b.sequence))")
                    if repair { notRepaired(i, "restoring a header copy needs the key") }
                }
            }
            return true
        }
        return try unlockAndRepairHeaders(copies, provider: provider)
    }

    func checkKeyslots(_ c: Copy) {
        guard let h = c.header else { return }
        for s in h.keyslots {
            var problem: String?
            if s.provider == .passphrase {
                do { _ = try PassphraseParameters.decode(s.parameters) } catch { problem = "\(error)" }
            }
            if s.wrap == .aes256KWP, s.wrappedKey.count != KeySet.dekLength + 8 {
                problem = "wrapped key of \(s.wrappedKey.count) bytes, expected \(KeySet.dekLength + 8)"
            }
            if let problem {
                _ = add(.keyslotDamaged, c.name, "keyslot \(s.index) (\(s.provider?.description ?? "provider \(s.providerRaw)")): \(problem); it cannot be opened")
            }
        }
    }

    func unlockAndRepairHeaders(_ copies: [Copy], provider: any KeyProvider) throws -> Bool {
        struct Tried { var keys: KeySet?; var macOK = false; var rootOK = false; var why = "" }
        var tried: [Int: Tried] = [:]
        let order = copies.filter { $0.header != nil }.sorted { $0.header!.sequence > $1.header!.sequence }
        var refused: [[Keyslot]] = []
        for c in order {
            let h = c.header!
            var t = Tried()
            let mine = h.keyslots.filter { $0.provider == provider.type }
            if refused.contains(mine) { t.why = "no keyslot opens with the key given"; tried[c.copy] = t; continue }
            do {
                let (k, _) = try Keyring.unlock(h, with: provider)
                t.keys = k
                t.macOK = (try? Keyring.verify(h, keys: k)) != nil
                // In the middle of a DEK rekey the root may already be of the new generation.
                let ring = KeyGenerations(newest: (t.macOK ? (try? Rekey.pendingKeys(h, old: k)) ?? nil : nil) ?? k, older: [k])
                if t.macOK, let bytes = try? Sys.readSmallFile(root, DirHeader.fileName, limit: 4096),
                   let rk = ring.keys(DirHeader.generation(of: bytes)),
                   (try? DirHeader.decode(bytes, macKey: rk.metadataMACKey)) != nil {
                    t.rootOK = true
                }
            } catch {
                if case .wrongKey = error { refused.append(mine) }
                t.why = "\(error)"
            }
            tried[c.copy] = t
        }
        // The copy in use: opens, verifies, and its keys verify the root directory header;
        // failing that, one that opens and verifies (the root directory header is damaged).
        guard let chosen = order.first(where: { tried[$0.copy]?.rootOK == true })
                ?? order.first(where: { tried[$0.copy]?.macOK == true }),
              let keys = tried[chosen.copy]?.keys else {
            if order.allSatisfy({ tried[$0.copy]?.keys == nil }) {
                throw VolumeError.wrongKey("wrong passphrase: no keyslot of any header copy opens with it (" +
                                           order.map { "\($0.name): \(tried[$0.copy]?.why ?? "?")" }.joined(separator: "; ") + ")")
            }
            for c in order where tried[c.copy]?.keys != nil {
                let i = add(.headerCopyAltered, c.name, "its keyslot opens, but its MAC does not verify: the header was changed by someone without the key")
                if repair { notRepaired(i, "no verified copy to restore from") }
            }
            for c in copies where c.header == nil {
                let i = add(c.problem ?? .headerCopyDamaged, c.name, c.detail)
                if repair { notRepaired(i, "no verified copy to restore from") }
            }
            return false
        }
        let chosenHeader = chosen.header!
        // The copy in use decides whether the volume is in the middle of a DEK rekey (the
        // other may be the final header already, written first); its MAC covers the record.
        if chosenHeader.features.contains(.rekeyInProgress) {
            if repair { throw VolumeError.refused(Fsck.midRekeyRepairRefusal(cipherDir)) }
            rekeyInterrupted = true
            pendingKeys = try Rekey.pendingKeys(chosenHeader, old: keys)
        } else {
            rekeyInterrupted = false
        }
        self.keys = keys
        self.names = NameCodec(keys: keys)
        self.generations = KeyGenerations(newest: pendingKeys ?? keys, older: [keys])
        self.nameCodecs = generations!.all.map { NameCodec(keys: $0) }
        report.headerCopyInUse = chosen.name
        let rootOK = tried[chosen.copy]?.rootOK == true
        for c in copies where c.copy != chosen.copy {
            var kind: FsckDamage? = c.problem
            var detail = c.detail
            var foreign = false
            if let h = c.header {
                if h.volumeID != chosenHeader.volumeID {
                    kind = .headerCopyForeign
                    foreign = true
                    detail = "a valid header of another volume (ID \(StatusReport.hex(h.volumeID))); this volume is \(StatusReport.hex(chosenHeader.volumeID))"
                } else if (try? Keyring.verify(h, keys: keys)) == nil, h.sequence < chosenHeader.sequence,
                          let before = tried[c.copy]?.keys, tried[c.copy]?.macOK == true, before.generation < keys.generation,
                          let pending = (try? Rekey.pendingKeys(h, old: before)) ?? nil, constantTimeEqual(pending.digest, keys.digest) {
                    // The header of the middle of the DEK rekey whose final header the copy in
                    // use is: the rekey stopped between writing the final header's two copies.
                    kind = .headerCopyOutdated
                    detail = "sequence \(h.sequence), the copy in use has \(chosenHeader.sequence): the header of the DEK rekey to generation \(keys.generation), " +
                             "which stopped between writing its final header's two copies (the rekey itself is complete)"
                } else if (try? Keyring.verify(h, keys: keys)) == nil {
                    kind = .headerCopyAltered
                    detail = "its MAC does not verify under the volume's key: changed by someone without the key, or damaged with its checksum recomputed"
                } else if h.sequence < chosenHeader.sequence && pendingKeys != nil {
                    // Mid-rekey (which --repair refuses): the rekey writes both copies when it
                    // finishes. Until then only the copy in use may hold the new key.
                    let holds = h.features.contains(.rekeyInProgress) ? "it holds the rekey record too" : "only the copy in use holds the rekey record (the new key): keep it safe (xtsfs header backup)"
                    _ = add(.headerCopyOutdated, .warning, c.name, "sequence \(h.sequence), the copy in use has \(chosenHeader.sequence): written before a step of the interrupted DEK rekey; " +
                            holds + "; xtsfs rekey --dek writes both copies when it finishes")
                    continue
                } else if h.sequence < chosenHeader.sequence {
                    kind = .headerCopyOutdated
                    detail = "sequence \(h.sequence), the copy in use has \(chosenHeader.sequence)"
                } else if h.sequence > chosenHeader.sequence {
                    // Genuine and newer, but it did not open: never overwritten.
                    _ = add(.headerCopyNotOpening, .warning, c.name, "a newer genuine copy (sequence \(h.sequence)) that does not open with this key; left as it is")
                    continue
                } else {
                    continue
                }
            }
            guard let kind else { continue }
            let i = add(kind, c.name, detail)
            guard repair else { continue }
            guard rootOK, let good = chosen.bytes else {
                notRepaired(i, "the copy in use does not verify the root directory header; not copying it")
                continue
            }
            if foreign {
                let aside = c.name + ".foreign-" + StatusReport.hex(c.header!.volumeID)
                do { try Sys.renameatNoReplace(root, c.name, root, aside) } catch {
                    notRepaired(i, "cannot move it aside to \(aside): \(error)")
                    continue
                }
                report.findings[i].detail += "; moved aside to \(aside)"
            }
            do {
                try HeaderStore(directory: cipherDir).restore(copy: c.copy, bytes: good)
                repaired(i, .restoredHeaderCopy)
            } catch {
                notRepaired(i, "\(error)")
            }
        }
        if rootOK, let bytes = try? Sys.readSmallFile(root, DirHeader.fileName, limit: 4096),
           let rk = generations?.keys(DirHeader.generation(of: bytes)) {
            rootDirID = try? DirHeader.decode(bytes, macKey: rk.metadataMACKey).directoryID
        }
        return true
    }
}
