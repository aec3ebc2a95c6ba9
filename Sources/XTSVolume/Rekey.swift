import CSysShim
import XTSContent
import XTSCrypto
import XTSFormat
import XTSKeys
import XTSSystem
#if canImport(Glibc)
import Glibc
#endif

/// Key rotation: a new KEK for one slot (header only), or a new DEK generation with every
/// object re-encrypted (offline, resumable). FORMAT.md section 13 describes the states.
public enum Rekey {
    static let wrapLabel = "xtsfs v1 rekey wrap"

    /// The key that wraps the new DEK in the rekey record: derived from the old DEK, so any
    /// slot that opens the old generation reaches the new one during the sweep.
    static func recordKEK(_ old: KeySet, volumeID: [UInt8]) throws(CryptoError) -> SecretBytes {
        try HKDF.derive(key: old.dek, salt: volumeID, info: Array(wrapLabel.utf8), count: 32)
    }

    /// The new generation's keys of a header in the middle of a DEK rekey (nil if none is).
    public static func pendingKeys(_ header: VolumeHeader, old: KeySet) throws(VolumeError) -> KeySet? {
        guard header.features.contains(.rekeyInProgress) else { return nil }
        let record: RekeyRecord
        do { record = try RekeyRecord.decode(header.rekeyRecord) } catch { throw .corruptHeader("the rekey record is damaged: \(error)") }
        guard record.oldGeneration == old.generation else {
            throw .corruptHeader("the rekey record goes from generation \(record.oldGeneration), the slot opened generation \(old.generation)")
        }
        do {
            let dek = try KeyWrap.unwrap(record.wrappedNewKey, kek: try recordKEK(old, volumeID: header.volumeID))
            let keys = try KeySet(dek: dek, generation: record.newGeneration, volumeID: header.volumeID)
            guard constantTimeEqual(keys.digest, record.newKeyDigest) else { throw CryptoError.authenticationFailed }
            return keys
        } catch { throw .corruptHeader("the new key in the rekey record does not open: \(error)") }
    }

    /// Before a volume in the middle of a DEK rekey is mounted: finishes the checksum
    /// journals an interrupted sweep left (a file being overwritten in place is half old,
    /// half new until its journal is finished), and the file copies of versions before
    /// the journal, and drops partial ones. Lists the whole tree; changes nothing else.
    /// Returns warnings.
    public static func finishInterruptedCopies(cipherDir: String, old: KeySet, new: KeySet, unitTags: UnitTagAlgorithm?) throws(VolumeError) -> [String] {
        let rootFD: Int32
        do { rootFD = try Sys.open(cipherDir, XTS_O_PATH | O_DIRECTORY) } catch { throw .failure("cannot open \(cipherDir): \(error)") }
        defer { Sys.close(rootFD) }
        let sweep = RekeySweep(old: old, new: new, unitTags: unitTags, failpoint: Failpoint(), report: { _ in })
        sweep.rootFD = rootFD
        var failure: RekeySweep.SweepError?
        LargeStack.run {
            do throws(RekeySweep.SweepError) { try sweep.finishAllLeftovers(rootFD, path: "/") } catch { failure = error }
        }
        if let failure { throw .failure("cannot finish the file copies the interrupted rekey left: \(failure)") }
        return sweep.warnings
    }

    /// Refuses when CIPHERDIR is mounted on this host (an offline operation must be alone).
    public static func refuseIfMounted(_ cipherDir: String) throws(VolumeError) {
        if let mp = mountpoint(of: cipherDir) { throw .refused("\(cipherDir) is mounted on \(mp): unmount it first (offline rekey)") }
    }

    /// Where CIPHERDIR's data area is mounted on this host, if it is.
    public static func mountpoint(of cipherDir: String) -> String? {
        guard let mine = realpath(cipherDir, nil) else { return nil }
        let me = String(cString: mine)
        free(mine)
        guard let raw = try? Sys.readFile("/proc/self/mountinfo", limit: 16 << 20) else { return nil }
        for line in String(decoding: raw, as: UTF8.self).split(separator: "\n") {
            // id parent maj:min root mountpoint options [optional...] - fstype source superoptions
            let f = line.split(separator: " ")
            guard let dash = f.firstIndex(of: "-"), dash + 2 < f.count, f[dash + 1] == "fuse.xtsfs" else { continue }
            let source = String(f[dash + 2]).replacing("\\040", with: " ").replacing("\\,", with: ",")
            guard let r = realpath(source, nil) else { continue }
            let other = String(cString: r)
            free(r)
            if other == me { return String(f[4]) }
        }
        return nil
    }

    // MARK: - KEK

    /// Replaces slot `slot` (the one that opens, if nil) by a slot of `newProvider` with the
    /// same index, wrapping the same DEK. Header only: constant time whatever the volume holds.
    @discardableResult
    public static func rotateKEK(cipherDir: String, provider: any KeyProvider, slot: UInt16?, newProvider: any KeyProvider,
                                 audit: AuditLog?) throws(VolumeError) -> UInt16 {
        let u = try Volume.unlock(cipherDir, provider: provider, slot: slot, audit: audit, operation: "unlock for rekey kek")
        guard !u.header.features.contains(.rekeyInProgress) else {
            throw .refused("a DEK rekey is in progress: finish it first (xtsfs rekey --dek \(cipherDir))")
        }
        var header = u.header
        let newSlot: Keyslot
        do {
            newSlot = try Keyring.makeSlot(index: u.slot, keys: u.keys, volumeID: header.volumeID, provider: newProvider, now: Volume.now())
        } catch {
            audit?.record(.init(operation: "rekey kek", volumeID: header.volumeID, slot: u.slot, provider: newProvider.type.description, ok: false, detail: error.description))
            throw VolumeError(error, context: "cannot make the new keyslot")
        }
        header.keyslots = header.keyslots.map { $0.index == u.slot ? newSlot : $0 }
        try KeySlots.write(cipherDir, header, keys: u.keys, base: u.newestSequence)
        audit?.record(.init(operation: "rekey kek", volumeID: header.volumeID, slot: u.slot, provider: newProvider.type.description, ok: true))
        return u.slot
    }

    // MARK: - DEK

    public struct Summary: Sendable {
        public var oldGeneration: UInt32
        public var newGeneration: UInt32
        public var resumed: Bool
        public var files: Int
        public var bytes: Int64
        public var removedSlots: [UInt16]
        public var warnings: [String]
    }

    /// A new DEK generation: every file, name, symlink target and xattr re-encrypted, then
    /// the old generation removed from the header. Resumes an interrupted run. The slot that
    /// opens is rewrapped with the new DEK; other slots cannot be (their secrets are not
    /// here) and are removed at the end, which needs `removeOtherSlots`.
    ///
    /// When CIPHERDIR is mounted on this host, the daemon serving it sweeps (online, see
    /// `RekeyControl`): this writes the rekey record, hands the daemon the final header and
    /// reports its progress until the sweep is verified and the final header written.
    public static func rotateDEK(cipherDir: String, provider: any KeyProvider, slot: UInt16?, removeOtherSlots: Bool,
                                 ignoreOtherHosts: Bool = false,
                                 audit: AuditLog?, progress: @escaping (RekeyProgress) -> Void) throws(VolumeError) -> Summary {
        let realDir = Mounter.absolute(cipherDir)
        let online = mountpoint(of: realDir) != nil
        // Another host's mount, or another mount on this machine than the one whose daemon
        // sweeps: neither an offline sweep nor this machine's daemon may re-encrypt under
        // it (its daemon would go on writing with the old key).
        let sweeper = online ? "\(AuditLog.hostID()).\(try RekeyControl.daemonPID(cipherDir: realDir))" : nil
        try Presence.refuseIfHeld(cipherDir, operation: "rekey --dek", force: ignoreOtherHosts, except: sweeper)
        let failpoint = Failpoint()
        let u = try Volume.unlock(cipherDir, provider: provider, slot: slot, audit: audit, operation: "unlock for rekey dek")
        // The offline sweep must be alone: refused if a mount came up since. Online, the
        // daemon must answer before anything is written.
        if online { _ = try RekeyControl.status(cipherDir: realDir) } else { try refuseIfMounted(cipherDir) }
        var header = u.header
        var base = u.newestSequence
        let old = u.keys
        // Integrity volumes' journals hold records of their own (FORMAT.md 13.2): a build
        // that does not know them must not mount the volume until the rekey is done.
        let integrity = header.features.contains(.blockAuthentication)
        let journalFeatures: Features = integrity ? [.rekeyJournal, .rekeyIntegrityJournal] : [.rekeyJournal]
        let others = header.keyslots.filter { $0.index != u.slot }
        if !others.isEmpty && !removeOtherSlots {
            throw .refused("keyslots " + others.map { "\($0.index) (\($0.provider?.description ?? "unknown"))" }.joined(separator: ", ") +
                           " cannot be rewrapped with the new key (their secrets are not here) and would be removed at the end: " +
                           "pass --remove-other-slots to go on, and add them again afterwards with xtsfs keys add")
        }
        let new: KeySet
        var resumed = false
        if let pending = try pendingKeys(header, old: old) {
            new = pending
            resumed = true
            // A rekey started by a build that wrote complete copies: from here on files are
            // journalled, which a build that does not know journals must not mount.
            if !header.features.isSuperset(of: journalFeatures) {
                header.features.formUnion(journalFeatures)
                base = try KeySlots.write(cipherDir, header, keys: old, base: base) { copy in failpoint.step("journal feature written to header copy \(copy)") }
            }
        } else {
            do {
                new = try KeySet.generate(generation: old.generation &+ 1, volumeID: header.volumeID)
                let record = RekeyRecord(state: .sweeping, oldGeneration: old.generation, newGeneration: new.generation, started: Volume.now(),
                                         wrappedNewKey: try KeyWrap.wrap(new.dek, kek: try recordKEK(old, volumeID: header.volumeID)),
                                         newKeyDigest: new.digest)
                header.rekeyRecord = try record.encode()
            } catch { throw .failure("cannot make the new key: \(error)") }
            header.features.formUnion(journalFeatures.union(.rekeyInProgress))
            base = try KeySlots.write(cipherDir, header, keys: old, base: base) { copy in failpoint.step("rekey record written to header copy \(copy)") }
            audit?.record(.init(operation: "rekey dek started", volumeID: header.volumeID, slot: u.slot, provider: provider.type.description, ok: true,
                                detail: "generation \(old.generation) -> \(new.generation)"))
        }

        if online {
            // The daemon writes the final header as the next after this one (and refuses if
            // another host changed the header meanwhile).
            header.sequence = base
            return try rotateDEKOnline(cipherDir: realDir, provider: provider, unlocked: u, header: header, old: old, new: new, resumed: resumed,
                                       others: others, audit: audit, progress: progress)
        }

        let rootFD: Int32
        do { rootFD = try Sys.open(cipherDir, XTS_O_PATH | O_DIRECTORY) } catch { throw .failure("cannot open \(cipherDir): \(error)") }
        defer { Sys.close(rootFD) }
        let sweep = RekeySweep(old: old, new: new, unitTags: header.features.unitTags, failpoint: failpoint, report: progress)
        sweep.rootFD = rootFD
        sweep.listingManifests = header.features.contains(.listingManifests)
        var failure: RekeySweep.SweepError?
        var found: [String] = []
        var links = Set<String>()
        LargeStack.run {
            do throws(RekeySweep.SweepError) {
                try sweep.run(root: rootFD)
                try sweep.reencryptXattrs(rootFD, what: "/")
            } catch { failure = error; return }
            // Verified: nothing of the old generation is left.
            sweep.verify(rootFD, path: "/", old: &found, links: &links)
        }
        if let error = failure {
            audit?.record(.init(operation: "rekey dek", volumeID: header.volumeID, slot: u.slot, provider: nil, ok: false, detail: error.description))
            throw .failure("rekey stopped: \(error) (run the same command again to resume)")
        }
        guard found.isEmpty else {
            throw .failure("rekey did not complete: \(found.count) objects are still of generation \(old.generation) (" +
                           found.prefix(5).joined(separator: "; ") + "); run the command again")
        }
        // Link-store files no symlink points to any more (old targets) go before the old key does.
        if let store = try? Sys.openPath(rootFD, NameCodec.linkStore, directory: true) {
            for e in (try? Sys.listDirectory(store)) ?? [] where !links.contains(e.name) { _ = unlinkat(store, e.name, 0) }
            Sys.close(store)
        }
        failpoint.step("sweep verified")

        let final = try finalHeader(header, slot: u.slot, provider: provider, new: new)
        try KeySlots.write(cipherDir, final, keys: new, base: base) { copy in failpoint.step("final header written to copy \(copy)") }
        audit?.record(.init(operation: "rekey dek finished", volumeID: header.volumeID, slot: u.slot, provider: provider.type.description, ok: true,
                            detail: "generation \(new.generation); removed slots: \(others.map { "\($0.index)" }.joined(separator: ","))"))
        return Summary(oldGeneration: old.generation, newGeneration: new.generation, resumed: resumed, files: sweep.progress.filesDone,
                       bytes: sweep.progress.bytesDone, removedSlots: others.map(\.index), warnings: u.warnings + sweep.warnings)
    }

    /// The final header: the new generation only. The slot that opened is rewrapped with
    /// the new DEK (same provider, same costs); nothing else holds the old one.
    static func finalHeader(_ header: VolumeHeader, slot: UInt16, provider: any KeyProvider, new: KeySet) throws(VolumeError) -> VolumeHeader {
        var final = header
        let opened = header.keyslots.first { $0.index == slot }!
        let rewrapped: Keyslot
        do {
            rewrapped = try Keyring.makeSlot(index: slot, keys: new, volumeID: header.volumeID,
                                             provider: Rewrap.provider(provider, like: opened), now: Volume.now())
        } catch { throw VolumeError(error, context: "cannot wrap the new key") }
        final.keyslots = [rewrapped]
        final.keyGeneration = new.generation
        final.rekeyRecord = []
        final.features.subtract([.rekeyInProgress, .rekeyJournal, .rekeyIntegrityJournal])
        return final
    }

    /// How often the command asks the daemon how its sweep goes.
    static let pollInterval: UInt32 = 200_000

    /// The online rekey, once the rekey record is in the header: the daemon is handed the
    /// final header (sealed with the new key) and sweeps; its progress is polled until it
    /// is done. Interrupting this leaves the daemon sweeping; running it again polls the
    /// same sweep (or, after the daemon was killed and the volume remounted, resumes).
    static func rotateDEKOnline(cipherDir: String, provider: any KeyProvider, unlocked u: Volume.Unlocked, header: VolumeHeader,
                                old: KeySet, new: KeySet, resumed: Bool, others: [Keyslot], audit: AuditLog?,
                                progress: @escaping (RekeyProgress) -> Void) throws(VolumeError) -> Summary {
        var final = try finalHeader(header, slot: u.slot, provider: provider, new: new)
        let bytes: [UInt8]
        do {
            final = try Keyring.seal(final, keys: new)
            bytes = try final.encode()
        } catch { throw .failure("cannot seal the final header: \(error)") }
        try RekeyControl.start(cipherDir: cipherDir, final: bytes)
        var last = RekeyProgress(phase: "scan", filesDone: 0, filesTotal: 0, bytesDone: 0, bytesTotal: 0)
        while true {
            let s = try RekeyControl.status(cipherDir: cipherDir)
            last = s.progress
            switch s.phase {
            case .done:
                progress(last)
                audit?.record(.init(operation: "rekey dek finished", volumeID: header.volumeID, slot: u.slot, provider: provider.type.description, ok: true,
                                    detail: "online; generation \(new.generation); removed slots: \(others.map { "\($0.index)" }.joined(separator: ","))"))
                return Summary(oldGeneration: old.generation, newGeneration: new.generation, resumed: resumed, files: last.filesDone,
                               bytes: last.bytesDone, removedSlots: others.map(\.index), warnings: u.warnings)
            case .failed:
                audit?.record(.init(operation: "rekey dek", volumeID: header.volumeID, slot: u.slot, provider: nil, ok: false, detail: "online: " + (s.failure ?? "")))
                throw .failure("online rekey stopped: \(s.failure ?? "no reason given") (run the same command again to resume)")
            case .idle:
                throw .failure("the daemon serving \(cipherDir) is not rekeying (remounted meanwhile?); run the same command again")
            case .running:
                progress(last)
                usleep(pollInterval)
            }
        }
    }

    // MARK: - header backup and restore

    /// Copies the newest valid header copy to `file` (created, never overwritten, mode 0400).
    public static func backupHeader(cipherDir: String, to file: String) throws(VolumeError) {
        let loaded = try Volume.load(cipherDir)
        let bytes: [UInt8]
        do { bytes = try loaded.newest.encode() } catch { throw .corruptHeader("\(error)") }
        do { try Sys.writeNewFile(bytes, to: file, mode: 0o400) } catch {
            if error.errno == EEXIST { throw .refused("\(file) exists: header backup never overwrites a file") }
            throw .failure("cannot write \(file): \(error)")
        }
    }

    /// Replaces both header copies with the backup in `file`, after checking that it is a
    /// header of this very volume (same volume ID) and that `provider` unlocks it (slot,
    /// header MAC, root directory header). Nothing is written before both checks pass.
    public static func restoreHeader(cipherDir: String, from file: String, provider: any KeyProvider, slot: UInt16?,
                                     ignoreOtherHosts: Bool = false, audit: AuditLog?) throws(VolumeError) {
        try refuseIfMounted(cipherDir)
        try Presence.refuseIfHeld(cipherDir, operation: "header restore", force: ignoreOtherHosts)
        let bytes: [UInt8]
        do { bytes = try Sys.readFile(file, limit: VolumeHeader.maxLength + 1) } catch { throw .badInput("cannot read \(file): \(error)") }
        let backup: VolumeHeader
        do { backup = try VolumeHeader.decode(bytes) } catch { throw .badInput("\(file) is not a usable xtsfs header: \(error)") }
        // The volume's own ID, from any copy that parses (all may be damaged: that is what a restore is for).
        if let current = try? Volume.load(cipherDir), !current.candidates.contains(where: { $0.header.volumeID == backup.volumeID }) {
            throw .refused("\(file) is the header of another volume (ID \(StatusReport.hex(backup.volumeID)), this one is \(StatusReport.hex(current.newest.volumeID))); nothing was changed")
        }
        let keys: KeySet
        do { (keys, _) = try Keyring.unlock(backup, with: provider, slot: slot) } catch { throw VolumeError(error, context: "the backup does not unlock") }
        do { try Keyring.verify(backup, keys: keys) } catch { throw .corruptHeader("the backup's MAC does not verify: it was altered") }
        let other = try pendingKeys(backup, old: keys)
        do { try Volume.checkRootDirectory(cipherDir, keys: keys) } catch {
            guard let other, (try? Volume.checkRootDirectory(cipherDir, keys: other)) != nil else {
                throw .refused("the backup unlocks, but this volume's root directory does not verify under its key (a backup from before a DEK rekey?); nothing was changed")
            }
        }
        var restored = backup
        let loaded = try? Volume.load(cipherDir)
        let onDisk = loaded?.candidates.map(\.header.sequence).max()
        restored.sequence = max(backup.sequence, onDisk ?? 0) + 1
        do { restored = try Keyring.seal(restored, keys: keys) } catch { throw VolumeError(error, context: "cannot seal the header") }
        do { try HeaderStore(directory: cipherDir).write(restored, expectedSequence: onDisk) } catch {
            if case .concurrentChange = error { throw .refused("\(error)") }
            throw .failure("cannot write the header: \(error)")
        }
        audit?.record(.init(operation: "header restore", volumeID: backup.volumeID, slot: nil, provider: provider.type.description, ok: true))
    }
}
