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

/// Quarantine: an entry whose name is lost is moved, whole, into `/lost+found` under a
/// new name, where its contents (which do not depend on the name) can be read again.
/// `lost+found` is made through the filesystem's own `mkdir`, so it is an ordinary
/// encrypted directory; the entry gets a name encrypted with `lost+found`'s ID by the same
/// name codec. Nothing is deleted.
extension Fsck {
    func openLostFound() throws(FSError) -> (fd: Int32, dirID: [UInt8]) {
        if let lf = lostFound { return lf }
        guard let keys, let names, let rootDirID else { throw .damaged("the root directory cannot be used") }
        let fs: FileSystem
        if let existing = fileSystem { fs = existing } else {
            fs = try FileSystem(cipherDir: cipherDir, keys: keys, readOnly: false, unitTags: unitTags, listingManifests: listingManifests, log: { _ in })
            fileSystem = fs
        }
        let name = Array(Fsck.lostAndFound.utf8)
        do { _ = try fs.lookup(parent: FileSystem.rootID, name: name) } catch {
            guard case .notFound = error else { throw error }
            _ = try fs.mkdir(parent: FileSystem.rootID, name: name, mode: 0o700, caller: Caller(uid: getuid(), gid: getgid()))
        }
        let backing: BackingName
        do { backing = try names.encrypt(name, directoryID: rootDirID) } catch { throw .damaged("cannot encrypt the name \(Fsck.lostAndFound): \(error)") }
        let fd: Int32
        do { fd = try Sys.openPath(root, backing.entryName, directory: true) } catch { throw .system(error) }
        let header: DirHeader
        do { header = try DirHeader.decode(try Sys.readSmallFile(fd, DirHeader.fileName, limit: 4096), macKey: keys.metadataMACKey) } catch {
            Sys.close(fd)
            throw .damaged("\(Fsck.lostAndFound): \(error)")
        }
        lostFound = (fd, header.directoryID)
        return (fd, header.directoryID)
    }

    /// Moves `name` from `dirfd` into lost+found. `plainName` is the name to give it there;
    /// by default one made of `label` and the backing name, so the user can tell entries
    /// apart. A long name's side file that could not name it goes too (it is only a name).
    func quarantine(_ dirfd: Int32, _ name: String, finding i: Int, label: String?, plainName: [UInt8]? = nil, removeRecord: Bool) throws {
        guard keys != nil else { notRepaired(i, "quarantine needs the key"); return }
        let lf: (fd: Int32, dirID: [UInt8])
        do { lf = try openLostFound() } catch {
            notRepaired(i, "cannot use /\(Fsck.lostAndFound): \(error)")
            return
        }
        guard let names else { return }
        let base = plainName ?? Array("\(label ?? "entry") \(String(name.prefix(40)))".utf8)
        for attempt in 0..<100 {
            var candidate = base
            if attempt > 0 { candidate += Array(" \(attempt)".utf8) }
            let backing: BackingName
            do { backing = try names.encrypt(candidate, directoryID: lf.dirID) } catch {
                notRepaired(i, "cannot name it in /\(Fsck.lostAndFound): \(error)")
                return
            }
            do throws(SystemError) {
                if case .long = backing {
                    do { try Sys.writeNewFile(Array(backingFull(backing).utf8), at: lf.fd, backing.entryName + NameCodec.longSuffix, mode: 0o444) } catch where error.errno == EEXIST { continue }
                }
                // Listing manifests: lost+found's manifest takes the entry's element.
                let manifest = prepareLostFoundAdd(lf.fd, dirID: lf.dirID, entryDir: dirfd, entry: name, plain: candidate)
                do throws(SystemError) { try Sys.renameatNoReplace(dirfd, name, lf.fd, backing.entryName) } catch {
                    manifest?.abort()
                    throw error
                }
                manifest?.commit()
            } catch {
                if error.errno == EEXIST { continue }
                if case .long = backing { _ = Glibc.unlinkat(lf.fd, backing.entryName + NameCodec.longSuffix, 0) }
                notRepaired(i, "cannot move it into /\(Fsck.lostAndFound): \(error)")
                return
            }
            movedIntoLostFound.insert(backing.entryName)
            if removeRecord, case .longName = BackingEntry.classify(name) {
                _ = Glibc.unlinkat(dirfd, name + NameCodec.longSuffix, 0)
            }
            try? Sys.fsyncDirectory(dirfd)
            try? Sys.fsyncDirectory(lf.fd)
            repaired(i, .quarantined)
            report.findings[i].detail += "; moved to /\(Fsck.lostAndFound)/\(String(decoding: candidate, as: UTF8.self))"
            return
        }
        notRepaired(i, "no free name in /\(Fsck.lostAndFound)")
    }

    func backingFull(_ b: BackingName) -> String {
        if case .long(_, let full) = b { return full }
        return b.entryName
    }
}
