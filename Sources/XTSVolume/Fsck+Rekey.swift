import CSysShim
import XTSContent
import XTSFormat
import XTSKeys
import XTSSystem
#if canImport(Glibc)
import Glibc
#endif

/// What finishing one leftover of an interrupted DEK rekey (a journal, a copy) would
/// find: `damage` (it cannot be used as it is: the rekey stops or reports it) and `notes`
/// (what it would do without harm).
struct RekeyLeftover {
    var damage: [String] = []
    var notes: [String] = []
    /// The rekey would not use it (it stops there) rather than finish it around damaged units.
    var unusable = true
}

/// `xtsfs fsck` of a volume in the middle of a DEK rekey (FORMAT.md section 13): objects
/// of the old and the new generation stand side by side, and each is checked under the
/// generation it names (the new keys come from the header's rekey record, as the mount
/// takes them). The journals and copies an interrupted run left are checked by the very
/// code that finishes them (`RekeySweep` in dry run: nothing written), before the walk,
/// because a file half rewritten under a journal may be reached by another name (a hard
/// link) in a directory walked earlier. Nothing is changed: `--repair` is refused.
extension Fsck {
    static func midRekeyRepairRefusal(_ cipherDir: String) -> String {
        "a DEK rekey of this volume was interrupted: fsck --repair does not change a volume in the middle of one " +
        "(a half-rewritten file or a name between two generations is the rekey's own progress, which only the rekey can finish). " +
        "Check it with fsck without --repair, and finish the rekey with xtsfs rekey --dek \(cipherDir) (then fsck --repair if anything is left); nothing was changed"
    }

    /// Notes the rekey, and with the key checks every journal and copy in the tree.
    func startMidRekey() throws {
        guard let keys, let pendingKeys else {
            report.notes.append("the volume is in the middle of a DEK rekey: without the key, the rekey's journals and copies were not checked; xtsfs rekey --dek \(cipherDir) finishes it")
            return
        }
        report.notes.append("the volume is in the middle of a DEK rekey (generation \(keys.generation) -> \(pendingKeys.generation)): " +
                            "every object was checked under the generation it names; what the rekey left is reported as warnings, and xtsfs rekey --dek \(cipherDir) finishes it")
        let sweep = RekeySweep(old: keys, new: pendingKeys, unitTags: unitTags, failpoint: Failpoint(disabled: ()), report: { _ in })
        sweep.dryRun = true
        sweep.rootFD = root
        try scanRekeyLeftovers(sweep, root, backingPath: ".", depth: 0)
        halfRewritten = sweep.halfRewritten
        halfRewrittenDamage = sweep.halfRewrittenDamage
    }

    /// Every directory of the tree (as the walk reaches them: entries xtsfs names, on
    /// CIPHERDIR's filesystem), each journal and copy in it checked as finishing it would.
    func scanRekeyLeftovers(_ sweep: RekeySweep, _ fd: Int32, backingPath: String, depth: Int) throws {
        try checkCancelled()
        guard depth < Fsck.maxDepth, let entries = try? Sys.listDirectory(fd) else { return }
        let prefix = backingPath == "." ? "" : backingPath + "/"
        let names = Set(entries.map(\.name))
        if names.contains(RekeyJournal.name) {
            let before = sweep.warnings.count
            sweep.dryNotes = []
            sweep.dryJournalUnusable = false
            var r = RekeyLeftover()
            do throws(RekeySweep.SweepError) {
                try sweep.finishJournal(fd, path: prefix)
                r.unusable = sweep.dryJournalUnusable
            } catch { r.damage.append("\(error)") }
            r.damage.insert(contentsOf: sweep.warnings[before...], at: 0)
            r.notes = sweep.dryNotes
            leftovers[Fsck.join(backingPath, RekeyJournal.name)] = r
        }
        let copies = entries.filter { if case .rekeyCopy = BackingEntry.classify($0.name) { return true } else { return false } }
        if !copies.isEmpty {
            let byHash = Dictionary(entries.map { (RekeySweep.copyName(for: $0.name), $0.name) }, uniquingKeysWith: { a, _ in a })
            for c in copies {
                var r = RekeyLeftover()
                if let target = byHash[c.name] {
                    let before = sweep.warnings.count
                    do throws(RekeySweep.SweepError) { try sweep.copyOver(fd, copy: c.name, target: target, path: prefix, sync: false) } catch {
                        r.damage.append("\(error)")
                    }
                    r.damage.insert(contentsOf: sweep.warnings[before...], at: 0)
                } else {
                    r.notes.append("it has no file to go to (removed since); xtsfs rekey --dek removes it")
                }
                leftovers[Fsck.join(backingPath, c.name)] = r
            }
        }
        for e in entries.sorted(by: { $0.name < $1.name }) {
            switch BackingEntry.classify(e.name) {
            case .encryptedName, .longName: break
            default: continue
            }
            guard let st = try? Sys.fstatat(fd, e.name), st.isDirectory, UInt64(st.st_dev) == rootDev,
                  let sub = try? Sys.openPath(fd, e.name, directory: true) else { continue }
            defer { Sys.close(sub) }
            try scanRekeyLeftovers(sweep, sub, backingPath: Fsck.join(backingPath, e.name), depth: depth + 1)
        }
    }

    /// The finding for a journal the walk meets.
    func reportRekeyJournal(_ path: String) {
        guard rekeyInterrupted else {
            _ = add(.foreignEntry, .warning, path, "a checksum journal of a DEK rekey, on a volume that is not in the middle of one; ignored by xtsfs (fsck leaves it alone)")
            return
        }
        guard keys != nil, pendingKeys != nil else {
            _ = add(.rekeyJournal, .warning, path, "the checksum journal of files the interrupted DEK rekey was overwriting in place (not checked without the key); xtsfs rekey --dek finishes them and removes it")
            return
        }
        let r = leftovers[path] ?? RekeyLeftover(damage: ["not checked (the directory could not be listed before the walk)"])
        let notes = r.notes.isEmpty ? "" : " (" + r.notes.joined(separator: "; ") + ")"
        if r.damage.isEmpty {
            _ = add(.rekeyJournal, .warning, path, "the checksum journal of files the interrupted DEK rekey was overwriting in place: it verifies, and each unit it covers is old or new" +
                    notes + "; xtsfs rekey --dek (or a mount) finishes those files and removes it")
        } else if r.unusable {
            _ = add(.rekeyJournalDamaged, path, "the checksum journal of the interrupted DEK rekey cannot be used as it is: " + r.damage.joined(separator: "; ") + notes +
                    "; xtsfs rekey --dek stops at this directory until it is dealt with (restore the files it names from a backup, then remove it)")
        } else {
            _ = add(.rekeyJournalDamaged, path, "the checksum journal of the interrupted DEK rekey verifies, but finishing it finds damage: " + r.damage.joined(separator: "; ") + notes +
                    "; xtsfs rekey --dek (or a mount) finishes the rest of its files and leaves those units as they are (their contents are lost: restore the file from a backup)")
        }
    }

    /// The finding for a copy (made by versions before the journal) the walk meets.
    func reportRekeyCopy(_ path: String) {
        guard rekeyInterrupted else {
            // Never removed: it may be a file's only complete copy.
            _ = add(.foreignEntry, .warning, path, "a copy made by a DEK rekey, on a volume that is not in the middle of one; ignored by xtsfs (fsck leaves it alone)")
            return
        }
        guard keys != nil, pendingKeys != nil else {
            _ = add(.rekeyCopy, .warning, path, "a copy of a file in the new generation left by the interrupted DEK rekey (not checked without the key); xtsfs rekey --dek copies it over its file and removes it")
            return
        }
        let r = leftovers[path] ?? RekeyLeftover(damage: ["not checked (the directory could not be listed before the walk)"])
        if !r.damage.isEmpty {
            _ = add(.rekeyCopyDamaged, path, "a copy left by the interrupted DEK rekey that cannot be used: " + r.damage.joined(separator: "; ") +
                    "; xtsfs rekey --dek stops here until it is dealt with")
        } else if !r.notes.isEmpty {
            _ = add(.rekeyCopy, .warning, path, "a copy left by the interrupted DEK rekey: " + r.notes.joined(separator: "; "))
        } else {
            _ = add(.rekeyCopy, .warning, path, "a complete copy of a file in the new generation, left by the interrupted DEK rekey (it verifies); xtsfs rekey --dek (or a mount) copies it over its file and removes it")
        }
    }
}
