import XTSCrypto
import XTSFormat
import XTSKeys
import XTSSystem
#if canImport(Glibc)
import Glibc
#endif

/// Volume-level operations: create, unlock, describe.
public enum Volume {
    static func now() -> UInt64 { UInt64(time(nil)) }

    /// Creates a volume in `cipherDir` (made if missing, refused if not empty): a random DEK,
    /// the root directory header, and both header copies with one keyslot per provider
    /// (slot 0 for `provider`, then 1, 2, ... for `more`, such as a recovery key).
    @discardableResult
    /// Writes no audit line: a fresh volume is exactly its three files.
    public static func initialize(cipherDir: String, provider: any KeyProvider, more: [any KeyProvider] = [], features: Features = []) throws(VolumeError) -> VolumeHeader {
        if Sys.exists(cipherDir) {
            let entries: [(name: String, type: UInt8, ino: UInt64)]
            do { entries = try Sys.listDirectory(cipherDir) } catch { throw .refused("cannot use \(cipherDir): \(error)") }
            guard entries.isEmpty else {
                let isVolume = entries.contains { HeaderStore.fileNames.contains($0.name) }
                throw .refused(isVolume ? "\(cipherDir) is already an xtsfs volume" : "\(cipherDir) is not empty: xtsfs init needs an empty directory")
            }
        } else {
            do { try Sys.mkdir(cipherDir, 0o700) } catch { throw .failure("cannot create \(cipherDir): \(error)") }
        }
        do {
            let volumeID = try Random.bytes(16)
            let keys = try KeySet.generate(generation: 1, volumeID: volumeID)
            var slots: [Keyslot] = []
            for (i, p) in ([provider] + more).enumerated() {
                slots.append(try Keyring.makeSlot(index: UInt16(i), keys: keys, volumeID: volumeID, provider: p, now: now()))
            }
            var header = VolumeHeader(sequence: 1, volumeID: volumeID, created: now(), keyGeneration: 1, keyslots: slots)
            header.features = features
            header = try Keyring.seal(header, keys: keys)
            let rootHeader = try DirHeader.random(keyGeneration: 1)
            let dir = try rootHeader.encode(macKey: keys.metadataMACKey)
            // The root directory header first: a volume header marks a complete volume.
            try Sys.atomicWrite(dir, to: cipherDir + "/" + DirHeader.fileName, mode: 0o444)
            if features.contains(.listingManifests) {
                // The root's listing manifest, empty (FORMAT.md 12.10).
                let empty = try ListingElement.seal(key: keys.listSealKey, ListingElement.zero)
                let manifest = try ListManifest(keyGeneration: 1, slotA: empty, slotB: empty).encode(macKey: keys.listMACKey, directoryID: rootHeader.directoryID)
                try Sys.atomicWrite(manifest, to: cipherDir + "/" + ListManifest.fileName, mode: 0o644)
            }
            try HeaderStore(directory: cipherDir).write(header)
            return header
        } catch let e as KeyError {
            throw VolumeError(e, context: "cannot create the keyslot")
        } catch {
            throw .failure("cannot create the volume: \(error)")
        }
    }

    public static func load(_ cipherDir: String) throws(VolumeError) -> HeaderStore.Loaded {
        do { return try HeaderStore(directory: cipherDir).load() } catch {
            switch error {
            case .notAVolume: throw .notAVolume("\(error)")
            case .unreadable(let e):
                if e.errno == ENOTDIR { throw .notAVolume("\(cipherDir) is not a directory") }
                throw .failure("\(error)")
            case .invalid(let f, _):
                switch f {
                case .unsupportedVersion, .unsupportedFeatures: throw .unsupported("\(error)")
                default: throw .corruptHeader("\(error)")
                }
            }
        }
    }

    /// An unlocked volume: its keys, the header copy that opened, and what the user should hear.
    public struct Unlocked: Sendable {
        public var keys: KeySet
        public var header: VolumeHeader
        /// Which header file opened (index into `HeaderStore.fileNames`).
        public var copy: Int
        public var slot: UInt16
        public var warnings: [String]
        /// The highest sequence of any valid copy when the volume was read: a header change
        /// made from this unlock is written as the next one, and refused if the disk has
        /// moved on meanwhile (`KeySlots.write`).
        public var newestSequence: UInt64 = 0
    }

    /// Opens the volume and writes nothing: a mount must never be able to damage a header
    /// copy, whatever state the copies are in. Each copy that parses is tried, newest first,
    /// through the whole unlock (keyslot, header MAC, root directory header under the
    /// copy's keys); the first copy that passes everything is used. A newer copy that
    /// fails anywhere (another volume's header copied in with the same passphrase,
    /// tampering, a damaged slot) only costs a warning while an older copy still works.
    ///
    /// When no copy passes: wrong key if no copy opened and at least one said definitely
    /// "wrong key" (a slot that parsed rejected it, or there is no slot of the provider);
    /// corrupt header otherwise.
    /// The same, recording the outcome in the audit log as `operation`.
    public static func unlock(_ cipherDir: String, provider: any KeyProvider, slot wanted: UInt16? = nil,
                              audit: AuditLog?, operation: String) throws(VolumeError) -> Unlocked {
        do {
            let u = try unlock(cipherDir, provider: provider, slot: wanted)
            if let w = audit?.record(.init(operation: operation, volumeID: u.header.volumeID, slot: u.slot, provider: provider.type.description, ok: true)) {
                var u2 = u
                u2.warnings.append(w)
                return u2
            }
            return u
        } catch {
            // Only for a volume: a directory that is not one gets no log.
            switch error {
            case .notAVolume, .usage: break
            default:
                audit?.record(.init(operation: operation, volumeID: (try? load(cipherDir))?.newest.volumeID, slot: wanted,
                                    provider: provider.type.description, ok: false, detail: error.description))
            }
            throw error
        }
    }

    public static func unlock(_ cipherDir: String, provider: any KeyProvider, slot wanted: UInt16? = nil) throws(VolumeError) -> Unlocked {
        let loaded = try load(cipherDir)
        var warnings: [String] = []
        for (copy, why) in loaded.damaged {
            warnings.append("header copy \(HeaderStore.fileNames[copy]) is damaged (\(why)); using the other copy")
        }
        var failures: [String] = []
        var wrongKey: [(copy: String, why: String)] = []
        var opened = false
        // Slots that already refused the key: the usual second copy is identical, and the
        // KDF need not run twice to hear "wrong passphrase" again.
        var refused: [[Keyslot]] = []
        for candidate in loaded.candidates {
            let name = HeaderStore.fileNames[candidate.copy]
            let mine = candidate.header.keyslots.filter { provider.canOpen($0) && (wanted == nil || $0.index == wanted) }
            if refused.contains(mine) { continue }
            let keys: KeySet, slot: Keyslot
            do { (keys, slot) = try Keyring.unlock(candidate.header, with: provider, slot: wanted) } catch {
                switch error {
                case .wrongKey(let p): wrongKey.append((name, "wrong \(p): no keyslot opened")); refused.append(mine)
                case .refused(let why): wrongKey.append((name, why)); refused.append(mine)
                case .noSlot(let p): wrongKey.append((name, "the volume has no \(p) keyslot"))
                case .format(let f): failures.append("\(name): keyslot: \(f)")
                // The provider itself failed: no other copy can do better.
                case .unavailable, .input: throw VolumeError(error, context: nil)
                default: failures.append("\(name): \(error)")
                }
                continue
            }
            opened = true
            do { try Keyring.verify(candidate.header, keys: keys) } catch {
                failures.append("\(name) was altered: its MAC does not verify under the unlocked key")
                continue
            }
            do { try checkRootDirectory(cipherDir, keys: keys) } catch {
                // In the middle of a DEK rekey the root may already be of the new generation.
                if let pending = try? Rekey.pendingKeys(candidate.header, old: keys),
                   (try? checkRootDirectory(cipherDir, keys: pending)) != nil {
                    // fine: the rekey record's key verifies it
                } else {
                failures.append("\(name) opened, but \(error) under its key (a header copied from another volume, or a damaged \(DirHeader.fileName))")
                continue
                }
            }
            for f in failures { warnings.append("header copy not used: \(f)") }
            for w in wrongKey {
                warnings.append("header copy not used: \(w.copy): \(w.why) (a copy of another volume?)")
            }
            // Copies after this one were not tried; one of another volume still needs a look.
            for other in loaded.candidates.drop(while: { $0.copy != candidate.copy }).dropFirst()
            where other.header.volumeID != candidate.header.volumeID {
                warnings.append("header copy \(HeaderStore.fileNames[other.copy]) belongs to another volume; left as it is (see xtsfs status)")
            }
            return Unlocked(keys: keys, header: candidate.header, copy: candidate.copy, slot: slot.index, warnings: warnings,
                            newestSequence: loaded.candidates.map(\.header.sequence).max() ?? candidate.header.sequence)
        }
        if !opened && !wrongKey.isEmpty {
            throw .wrongKey(wrongKey[0].why + (failures.isEmpty ? "" : " (also: " + failures.joined(separator: "; ") + ")"))
        }
        throw .corruptHeader("no usable header copy: " + (failures + wrongKey.map { "\($0.copy): \($0.why)" }).joined(separator: "; "))
    }

    /// The root `xtsfs.dir` is MAC'ed with a key derived from the DEK and the volume ID: a
    /// header copy whose keys do not verify it cannot serve this volume.
    static func checkRootDirectory(_ cipherDir: String, keys: KeySet) throws(VolumeError) {
        let bytes: [UInt8]
        do { bytes = try Sys.readFile(cipherDir + "/" + DirHeader.fileName, limit: 4096) } catch {
            throw .corruptHeader("cannot read the root directory header: \(error)")
        }
        do { _ = try DirHeader.decode(bytes, macKey: keys.metadataMACKey) } catch {
            throw .corruptHeader("the root directory header does not verify")
        }
    }

    /// Rebuilds the keys of a volume from a DEK handed over by the parent process, checking
    /// it against a header copy (digest and MAC) and the root directory header. Each copy
    /// is tried, as in `unlock`: the subkeys depend on the copy's volume ID.
    public static func keys(_ cipherDir: String, dek: SecretBytes, generation: UInt32) throws(VolumeError) -> KeySet {
        try opened(cipherDir, dek: dek, generation: generation).keys
    }

    /// The keys and the header copy they verify (whose feature flags the daemon serves by).
    public static func opened(_ cipherDir: String, dek: SecretBytes, generation: UInt32) throws(VolumeError) -> (keys: KeySet, header: VolumeHeader) {
        let loaded = try load(cipherDir)
        for c in loaded.candidates {
            guard let keys = try? KeySet(dek: dek, generation: generation, volumeID: c.header.volumeID),
                  (try? Keyring.verify(c.header, keys: keys)) != nil else { continue }
            // In the middle of a DEK rekey the root may already be of the new generation.
            guard (try? checkRootDirectory(cipherDir, keys: keys)) != nil
                    || (try? Rekey.pendingKeys(c.header, old: keys)).flatMap({ $0 }).map({ (try? checkRootDirectory(cipherDir, keys: $0)) != nil }) == true
            else { continue }
            return (keys, c.header)
        }
        throw .wrongKey("the key does not match this volume's header")
    }
}

extension VolumeError {
    /// What a key provider's failure means to the user and to the exit status.
    public init(_ e: KeyError, context: String?) {
        let text = (context.map { $0 + ": " } ?? "") + e.description
        switch e {
        case .wrongKey, .refused, .noSlot: self = .wrongKey(text)
        case .unavailable: self = .providerFailed(text)
        case .input: self = .badInput(text)
        case .format, .headerTampered: self = .corruptHeader(text)
        case .crypto: self = .failure(text)
        }
    }
}
