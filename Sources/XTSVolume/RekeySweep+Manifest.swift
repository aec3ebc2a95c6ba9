import XTSContent
import XTSCrypto
import XTSFormat
import XTSKeys
import XTSSystem
#if canImport(Glibc)
import Glibc
#endif

/// Listing manifests in a DEK rekey (FORMAT.md 12.10, 13.2). An element depends on the
/// plaintext name and the entry's identity, which the sweep keeps (a file keeps its file
/// ID, a directory its ID, a symlink its plaintext target), not on backing names: a
/// manifest of the old generation stays true while the sweep re-encrypts and renames
/// the directory's entries. Before the directory's header is switched, the manifest is
/// verified under the old generation (a listing that matches neither slot stops the
/// rekey, as a unit that fails its tag does: sealing it under the new key would accept
/// the change) and replaced, atomically, by one of the new generation. A rerun finds a
/// manifest already new and leaves it.
extension RekeySweep {
    func rekeyManifest(_ dirfd: Int32, dirID: [UInt8], path: String) throws(SweepError) {
        guard listingManifests else { return }
        let where_ = plainPath == "/" ? "/" : String(plainPath.dropLast())
        let bytes: [UInt8]
        do { bytes = try Sys.readSmallFile(dirfd, ListManifest.fileName, limit: 4096) } catch {
            throw .damaged("rekey stopped: \(where_): its listing manifest \(ListManifest.fileName) is \(error.errno == ENOENT ? "missing" : "unusable (\(error))"); xtsfs fsck says more")
        }
        guard let gen = ListManifest.generation(of: bytes) else {
            throw .damaged("rekey stopped: \(where_): \(ListManifest.fileName) is \(bytes.count) bytes, not a listing manifest")
        }
        if gen == new.generation { return }
        guard gen == old.generation else { throw .damaged("rekey stopped: \(where_): \(ListManifest.fileName) of unknown key generation \(gen)") }
        let manifest: ListManifest
        do { manifest = try ListManifest.decode(bytes, macKey: old.listMACKey, directoryID: dirID) } catch {
            throw .damaged("rekey stopped: \(where_): its listing manifest does not verify (\(error))")
        }
        let scan: ListingScan
        let accA: [UInt8], accB: [UInt8]
        let sealed: [UInt8]
        do {
            let all = [new, old]
            let root = rootFD
            scan = try ListingScan.scan(dirfd, directoryID: dirID, codecs: all.map { NameCodec(keys: $0) }, elementKeys: [old.listElementKey, new.listElementKey]) { raw in
                (try? SymlinkTarget.plain(raw, root: root, keys: all))
            }
            accA = try ListingElement.open(key: old.listSealKey, manifest.slotA)
            accB = try ListingElement.open(key: old.listSealKey, manifest.slotB)
            sealed = try ListingElement.seal(key: new.listSealKey, scan.accumulators[1])
        } catch { throw .damaged("rekey stopped: \(where_): cannot check its listing: \(error)") }
        guard scan.unidentified.isEmpty, constantTimeEqual(scan.accumulator, accA) || constantTimeEqual(scan.accumulator, accB) else {
            throw .damaged("rekey stopped: \(where_): the listing does not match its manifest (an entry added, removed or swapped behind the mount's back\(scan.unidentified.isEmpty ? "" : ", or \(scan.unidentified.count) entries without an identity")); sealing it under the new key would accept that. xtsfs fsck names it; once the directory is restored, the same command goes on")
        }
        if dryRun { return }
        do {
            let out = try ListManifest(keyGeneration: new.generation, slotA: sealed, slotB: sealed).encode(macKey: new.listMACKey, directoryID: dirID)
            try Sys.atomicWrite(out, at: dirfd, ListManifest.fileName, mode: 0o644)
        } catch let e as SystemError { throw .system("write \(ListManifest.fileName) in \(path)", e) } catch { throw .damaged("\(error)") }
        failpoint.step("listing manifest of \(path) sealed under the new generation")
    }
}
