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
    /// the root directory header, and both header copies with one keyslot.
    @discardableResult
    public static func initialize(cipherDir: String, provider: some KeyProvider) throws(VolumeError) -> VolumeHeader {
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
            let slot = try Keyring.makeSlot(index: 0, keys: keys, provider: provider, now: now())
            var header = VolumeHeader(sequence: 1, volumeID: volumeID, created: now(), keyGeneration: 1, keyslots: [slot])
            header = try Keyring.seal(header, keys: keys)
            let dir = try DirHeader.random(keyGeneration: 1).encode(macKey: keys.metadataMACKey)
            // The root directory header first: a volume header marks a complete volume.
            try Sys.atomicWrite(dir, to: cipherDir + "/" + DirHeader.fileName, mode: 0o444)
            try HeaderStore(directory: cipherDir).write(header)
            return header
        } catch let e as KeyError {
            throw .failure("cannot create the keyslot: \(e)")
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

    /// An unlocked volume: its keys, the header that opened, and what the user should hear.
    public struct Unlocked: Sendable {
        public var keys: KeySet
        public var header: VolumeHeader
        public var slot: UInt16
        public var warnings: [String]
    }

    /// Opens a keyslot with `provider`, checks the header MAC, and unless `readOnly`
    /// records the slot's use and repairs a damaged or stale header copy.
    public static func unlock(_ cipherDir: String, provider: some KeyProvider, readOnly: Bool) throws(VolumeError) -> Unlocked {
        let loaded = try load(cipherDir)
        var warnings: [String] = []
        for (copy, why) in loaded.damaged {
            warnings.append("header copy \(HeaderStore.fileNames[copy]) is damaged (\(why)); using the other copy")
        }
        var tampered = false
        for (i, candidate) in loaded.candidates.enumerated() {
            let keys: KeySet, slot: Keyslot
            do { (keys, slot) = try Keyring.unlock(candidate.header, with: provider) } catch {
                switch error {
                case .wrongKey(let p): if i == 0 { throw .wrongKey("wrong \(p): no keyslot opened") } else { continue }
                case .noSlot(let p): throw .wrongKey("the volume has no \(p) keyslot")
                case .format(let f): throw .corruptHeader("keyslot: \(f)")
                default: throw .failure("\(error)")
                }
            }
            do { try Keyring.verify(candidate.header, keys: keys) } catch {
                tampered = true
                warnings.append("header copy \(HeaderStore.fileNames[candidate.copy]) fails its MAC check (altered outside xtsfs)")
                continue
            }
            var header = candidate.header
            let stale = loaded.candidates.count != HeaderStore.fileNames.count || tampered ||
                loaded.candidates.contains { $0.header.sequence != header.sequence }
            if !readOnly {
                header.sequence += 1
                if let i = header.keyslots.firstIndex(where: { $0.index == slot.index }) { header.keyslots[i].lastUsed = now() }
                do {
                    header = try Keyring.seal(header, keys: keys)
                    try HeaderStore(directory: cipherDir).write(header)
                    if stale { warnings.append("both header copies rewritten") }
                } catch {
                    warnings.append("cannot update the header: \(error)")
                }
            }
            return Unlocked(keys: keys, header: header, slot: slot.index, warnings: warnings)
        }
        throw .corruptHeader(tampered ? "the volume header was altered: its MAC does not verify under the unlocked key" : "no usable header copy")
    }

    /// Rebuilds the keys of a volume from a DEK handed over by the parent process,
    /// checking it against the header (digest and MAC).
    public static func keys(_ cipherDir: String, dek: SecretBytes, generation: UInt32) throws(VolumeError) -> KeySet {
        let loaded = try load(cipherDir)
        let keys: KeySet
        do { keys = try KeySet(dek: dek, generation: generation, volumeID: loaded.newest.volumeID) } catch { throw .failure("\(error)") }
        guard loaded.candidates.contains(where: { c in (try? Keyring.verify(c.header, keys: keys)) != nil }) else {
            throw .wrongKey("the key does not match this volume's header")
        }
        return keys
    }
}
