import XTSCrypto
import XTSFormat
import XTSKeys
import XTSSystem
#if canImport(Glibc)
import Glibc
#endif

/// Keyslot management: add and remove slots (each a new header, written to both copies by
/// the guarded writer), generate key files.
public enum KeySlots {
    /// Adds a slot wrapping the volume's DEK with `newProvider`, after unlocking with
    /// `provider` (`slot` picks which). Returns the new slot's index.
    @discardableResult
    public static func add(cipherDir: String, provider: any KeyProvider, slot: UInt16? = nil, newProvider: any KeyProvider,
                           index wantedIndex: UInt16? = nil, audit: AuditLog?) throws(VolumeError) -> UInt16 {
        let u = try Volume.unlock(cipherDir, provider: provider, slot: slot, audit: audit, operation: "unlock for keys add")
        var header = u.header
        let used = Set(header.keyslots.map(\.index))
        let index: UInt16
        if let wantedIndex {
            guard Int(wantedIndex) < VolumeHeader.maxKeyslots else { throw .usage("keyslot index must be 0 to \(VolumeHeader.maxKeyslots - 1)") }
            guard !used.contains(wantedIndex) else { throw .refused("keyslot \(wantedIndex) is in use (remove it first)") }
            index = wantedIndex
        } else {
            guard let free = (0..<UInt16(VolumeHeader.maxKeyslots)).first(where: { !used.contains($0) }) else {
                throw .refused("all \(VolumeHeader.maxKeyslots) keyslots are in use")
            }
            index = free
        }
        let newSlot: Keyslot
        do {
            newSlot = try Keyring.makeSlot(index: index, keys: u.keys, volumeID: header.volumeID, provider: newProvider, now: Volume.now())
        } catch {
            audit?.record(.init(operation: "keys add", volumeID: header.volumeID, slot: index, provider: newProvider.type.description, ok: false, detail: error.description))
            throw VolumeError(error, context: "cannot make the new keyslot")
        }
        header.keyslots.append(newSlot)
        header.keyslots.sort { $0.index < $1.index }
        try write(cipherDir, header, keys: u.keys, base: u.newestSequence)
        audit?.record(.init(operation: "keys add", volumeID: header.volumeID, slot: index, provider: newProvider.type.description, ok: true))
        return index
    }

    /// Removes slot `index` after unlocking with `provider` (which may open that very slot).
    /// The last slot goes only with `force`: without a slot the volume can never be opened.
    public static func remove(cipherDir: String, index: UInt16, provider: any KeyProvider, slot: UInt16? = nil,
                              force: Bool, audit: AuditLog?) throws(VolumeError) {
        let u = try Volume.unlock(cipherDir, provider: provider, slot: slot, audit: audit, operation: "unlock for keys remove")
        var header = u.header
        guard let victim = header.keyslots.first(where: { $0.index == index }) else {
            throw .badInput("the volume has no keyslot \(index) (see xtsfs keys list)")
        }
        if header.keyslots.count == 1 && !force {
            throw .refused("keyslot \(index) is the last one: without it the volume can never be opened again (use --force if that is what you want)")
        }
        header.keyslots.removeAll { $0.index == index }
        try write(cipherDir, header, keys: u.keys, base: u.newestSequence)
        audit?.record(.init(operation: "keys remove", volumeID: header.volumeID, slot: index, provider: victim.provider?.description, ok: true))
    }

    /// `header` as the next header after sequence `base` (the newest on disk when the change
    /// was made to what was read): numbered `base + 1`, sealed, written to both copies one after the other by the writer that
    /// never replaces another volume's copy, and refused when the header on disk is no longer
    /// `base` (another host changed it meanwhile: its change is never lost, and the command
    /// says so). Returns the sequence written: the base of a further change.
    @discardableResult
    static func write(_ cipherDir: String, _ header: VolumeHeader, keys: KeySet, base: UInt64,
                      afterCopy: ((Int) -> Void)? = nil) throws(VolumeError) -> UInt64 {
        var h = header
        h.sequence = base + 1
        do { h = try Keyring.seal(h, keys: keys) } catch { throw VolumeError(error, context: "cannot seal the header") }
        do { try HeaderStore(directory: cipherDir).write(h, expectedSequence: base, afterCopy: afterCopy) } catch {
            switch error {
            case .foreignCopy, .concurrentChange: throw .refused("\(error)")
            case .system: throw .failure("cannot write the volume header: \(error)")
            }
        }
        return h.sequence
    }

    /// Writes a new key file of `count` random bytes, mode 0400; never overwrites anything
    /// (nor follows a symlink).
    public static func generateKeyfile(_ path: String, count: Int = 64) throws(VolumeError) {
        let secret: SecretBytes
        do { secret = try SecretBytes.random(count: count) } catch { throw .failure("\(error)") }
        let fd = Glibc.open(path, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0o400)
        guard fd >= 0 else {
            let e = errno
            if e == EEXIST { throw .refused("\(path) exists: xtsfs keys generate never overwrites a file") }
            throw .failure("cannot create \(path): \(String(cString: strerror(e)))")
        }
        defer { Sys.close(fd) }
        let ok = secret.withUnsafeBytes { p in Glibc.write(fd, p.baseAddress, p.count) == p.count }
        guard ok, fsync(fd) == 0 else {
            let e = errno
            _ = unlink(path)
            throw .failure("cannot write \(path): \(String(cString: strerror(e)))")
        }
    }
}
