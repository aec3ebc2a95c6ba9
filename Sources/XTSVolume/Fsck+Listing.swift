import CSysShim
import XTSContent
import XTSCrypto
import XTSFormat
import XTSKeys
import XTSSystem
#if canImport(Glibc)
import Glibc
#endif

/// Listing manifests (FORMAT.md 12.10): each directory's entries, as they are, against the
/// accumulator its manifest commits to.
extension Fsck {
    func checkListingManifest(_ fd: Int32, backingPath: String, plainPath: String?, dirID: [UInt8]) {
        guard let generations else { return }
        let path = Fsck.join(backingPath, ListManifest.fileName)
        let shown = plainPath ?? backingPath
        let bytes: [UInt8]
        do { bytes = try Sys.readSmallFile(fd, ListManifest.fileName, limit: 4096) } catch {
            let missing = error.errno == ENOENT
            let i = add(missing ? .listingManifestMissing : .listingManifestDamaged, path, plain: plainPath,
                        "\(missing ? "missing" : "unusable (\(error))"): the entries of \(shown) cannot be checked, and the mount refuses to change them")
            if repair { notRepaired(i, "kept as is: a new manifest would seal whatever the directory holds now, tampered or not; restore \(ListManifest.fileName) from a backup") }
            return
        }
        guard let gen = ListManifest.generation(of: bytes), let k = generations.keys(gen) else {
            let i = add(.listingManifestDamaged, path, plain: plainPath, bytes.count == ListManifest.length
                        ? "written under key generation \(ListManifest.generation(of: bytes) ?? 0), which this volume does not hold"
                        : "\(bytes.count) bytes, not \(ListManifest.length): not a listing manifest")
            if repair { notRepaired(i, "kept as is: restore \(ListManifest.fileName) from a backup") }
            return
        }
        let manifest: ListManifest
        do { manifest = try ListManifest.decode(bytes, macKey: k.listMACKey, directoryID: dirID) } catch {
            let i = add(.listingManifestDamaged, path, plain: plainPath, "it does not verify (\(error)): damaged, planted, or moved here from another directory")
            if repair { notRepaired(i, "kept as is: restore \(ListManifest.fileName) from a backup") }
            return
        }
        let scan: ListingScan
        let accA: [UInt8], accB: [UInt8]
        do {
            let all = generations.all
            scan = try ListingScan.scan(fd, directoryID: dirID, codecs: nameCodecs, elementKey: k.listElementKey) { raw in
                (try? SymlinkTarget.plain(raw, root: self.root, keys: all))
            }
            accA = try ListingElement.open(key: k.listSealKey, manifest.slotA)
            accB = try ListingElement.open(key: k.listSealKey, manifest.slotB)
        } catch {
            _ = add(.directoryUnreadable, backingPath, plain: plainPath, "cannot check its listing against its manifest: \(error)")
            return
        }
        // Files without a header: on these volumes only a create cut off between making the
        // file and writing its header leaves one, and only while the manifest is pending.
        let headerless = scan.unidentified.filter {
            $0.st.st_mode & S_IFMT == S_IFREG && $0.st.st_size <= Int64(IntegrityFileHeader.length) && $0.st.st_nlink == 1
        }
        // Empty subdirectories without their header: a mkdir cut off before its header (the
        // manifest then matches A) or an rmdir cut off after removing it (B).
        let bare = scan.unidentified.filter { ListingIdentity.isBareDirectory(fd, $0.backing, $0.st) }
        let others = scan.unidentified.count - headerless.count - bare.count
        let matchesA = constantTimeEqual(scan.accumulator, accA), matchesB = constantTimeEqual(scan.accumulator, accB)
        if others == 0 && headerless.isEmpty && bare.isEmpty && matchesA && !manifest.pending { return }
        if others == 0 && manifest.pending && ((headerless.isEmpty && (matchesA || matchesB)) || (!headerless.isEmpty && matchesA)) {
            let settled = matchesA ? manifest.slotA : manifest.slotB
            let cutOff = headerless.map { Fsck.joinPlain(plainPath, $0.name) ?? Fsck.join(backingPath, $0.backing) }
            let i = add(.listingChangeInterrupted, .warning, path, plain: plainPath,
                        "a change of \(shown) was cut off (a crash): its listing matches the manifest's \(matchesA ? "committed" : "pending") slot"
                        + (cutOff.isEmpty ? "" : "; \(cutOff.joined(separator: ", ")) \(cutOff.count == 1 ? "is a file" : "are files") whose create was cut off before its header was written (no data)")
                        + "; the mount settles it at the next change, --repair now")
            guard repair else { return }
            for e in headerless {
                _ = Glibc.unlinkat(fd, e.backing, 0)
                if NameCodec.isLongName(e.backing) { _ = Glibc.unlinkat(fd, e.backing + NameCodec.longSuffix, 0) }
            }
            for e in bare {
                if let p = try? Sys.openPath(fd, e.backing, directory: true) { _ = Glibc.unlinkat(p, ListManifest.fileName, 0); Sys.close(p) }
                _ = Glibc.unlinkat(fd, e.backing, AT_REMOVEDIR)
                if NameCodec.isLongName(e.backing) { _ = Glibc.unlinkat(fd, e.backing + NameCodec.longSuffix, 0) }
            }
            do {
                let out = try ListManifest(keyGeneration: manifest.keyGeneration, slotA: settled, slotB: settled).encode(macKey: k.listMACKey, directoryID: dirID)
                try writeInPlace(fd, ListManifest.fileName, out)
                repaired(i, .settledListingManifest)
            } catch { notRepaired(i, "cannot rewrite \(ListManifest.fileName): \(error)") }
            return
        }
        var why: [String] = []
        if !headerless.isEmpty {
            why.append("\(headerless.count) file\(headerless.count == 1 ? "" : "s") without a header (\(headerless.map { Fsck.joinPlain(plainPath, $0.name) ?? $0.backing }.joined(separator: ", ")): every file of this volume has one from its creation; cut to 0 bytes or zeroed behind the mount's back)")
        }
        if others > 0 {
            why.append("\(others) entr\(others == 1 ? "y" : "ies") without an identity (a directory without its header, or a symlink whose target does not decrypt; reported above)")
        }
        let i = add(.directoryListingMismatch, backingPath, plain: plainPath,
                    "the \(scan.count + scan.unidentified.count) entries of \(shown) are not the set its listing manifest commits to: an entry was added (an older one put back), removed, or swapped with another (names or file headers exchanged) behind the mount's back"
                    + (why.isEmpty ? "" : "; " + why.joined(separator: "; "))
                    + ". The mount serves the directory but refuses changes to it after a crash; restore the directory from a backup")
        if repair { notRepaired(i, "kept as is: sealing the listing as it is would accept the change; restore the directory from a backup") }
    }

    /// Listing manifests and quarantine: an entry moved into lost+found (`dirfd`, ID
    /// `dirID`) under plaintext name `plain` becomes one of its entries. Before the move,
    /// `{A, A′}` is written to lost+found's manifest (A′ with the entry's element); the
    /// caller moves it and calls `commit` (`{A′, A′}`) or, if the move failed, `abort`
    /// (`{A, A}`). nil (nothing written) when the manifest does not verify or is pending,
    /// or the entry has no identity: lost+found is then reported by the next check.
    func prepareLostFoundAdd(_ dirfd: Int32, dirID: [UInt8], entryDir: Int32, entry: String, plain: [UInt8]) -> (commit: () -> Void, abort: () -> Void)? {
        guard listingManifests, let generations,
              let bytes = try? Sys.readSmallFile(dirfd, ListManifest.fileName, limit: 4096),
              let gen = ListManifest.generation(of: bytes), let k = generations.keys(gen),
              let m = try? ListManifest.decode(bytes, macKey: k.listMACKey, directoryID: dirID), !m.pending,
              let st = try? Sys.fstatat(entryDir, entry) else { return nil }
        let all = generations.all, root = self.root
        guard let id = ListingIdentity.identity(entryDir, entry, st, target: { try? SymlinkTarget.plain($0, root: root, keys: all) }),
              let acc = try? ListingElement.open(key: k.listSealKey, m.slotA),
              let p = try? ListingElement.element(key: k.listElementKey, directoryID: dirID, type: ListingIdentity.type(st), name: plain, identity: id),
              let next = try? ListingElement.seal(key: k.listSealKey, ListingElement.xor(acc, p)) else { return nil }
        func write(_ a: [UInt8], _ b: [UInt8]) {
            if let out = try? ListManifest(keyGeneration: gen, slotA: a, slotB: b).encode(macKey: k.listMACKey, directoryID: dirID) {
                try? writeInPlace(dirfd, ListManifest.fileName, out)
            }
        }
        write(m.slotA, next)
        return ({ write(next, next) }, { write(m.slotA, m.slotA) })
    }

    /// Rewrites small internal file `name` of `dirfd` in place (one pwrite; it keeps its length).
    func writeInPlace(_ dirfd: Int32, _ name: String, _ bytes: [UInt8]) throws(SystemError) {
        let fd = try Sys.openat(dirfd, name, O_WRONLY | O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC)
        defer { Sys.close(fd) }
        try bytes.withBytes { (p) throws(SystemError) in try Sys.pwrite(fd, p.baseAddress!, p.count, 0) }
        try Sys.fsync(fd)
    }
}
