import Foundation
import XCTest
#if canImport(Glibc)
import Glibc
#endif

/// `xtsfs fsck` of a volume in the middle of a DEK rekey (the rekey killed with
/// `XTSFS_REKEY_FAILPOINT`): both generations are checked, each object under its own;
/// the rekey's journals and copies are warnings, damage to either generation and to a
/// journal or copy is reported; `--repair` is refused (status 8) and changes nothing;
/// afterwards the rekey finishes and the tree reads back unchanged. An extension of
/// RekeyTests, so IntegrityRekeyTests runs every test again on an integrity volume.
extension RekeyTests {
    struct MidRekeyFsckReport: Decodable {
        struct Finding: Decodable {
            var kind: String
            var severity: String
            var backingPath: String
            var detail: String
        }
        var findings: [Finding]
        var exitStatus: Int32
        var notes: [String]
        var errors: [Finding] { findings.filter { $0.severity == "error" } }
    }

    var integrityVolume: Bool { initArguments.contains("--integrity") }

    /// `xtsfs fsck --json` (with the key unless `key` is false); the report, and stderr.
    func fsckMidRekey(_ extra: [String] = [], key: Bool = true, file: StaticString = #filePath, line: UInt = #line) -> (Int32, MidRekeyFsckReport?, String) {
        let r = Harness.run(["fsck", cipher, "--json"] + (key ? ["--passfile", passfile] : ["--no-key"]) + extra)
        let report = try? JSONDecoder().decode(MidRekeyFsckReport.self, from: Data(r.stdout.utf8))
        if let report { XCTAssertEqual(report.exitStatus, r.status, file: file, line: line) }
        return (r.status, report, r.stderr + r.stdout)
    }

    /// Every name, file and byte of the backing directory, to tell that nothing changed.
    func backingState() -> [String] { backingFiles().map { $0.path + ":" + "\($0.bytes.hashValue)" }.sorted() }

    /// `--repair` on a volume in the middle of a rekey: refused with status 8 (an
    /// operational error, as documented), nothing read into lost+found, nothing changed.
    func assertRepairRefused(_ what: String, file: StaticString = #filePath, line: UInt = #line) {
        let state = backingState()
        let r = Harness.run(["fsck", cipher, "--repair", "--passfile", passfile])
        XCTAssertEqual(r.status, 8, "\(what): fsck --repair mid-rekey: \(r.stdout) \(r.stderr)", file: file, line: line)
        XCTAssertTrue(r.stderr.contains("DEK rekey") && r.stderr.contains("xtsfs rekey --dek"), "\(what): \(r.stderr)", file: file, line: line)
        XCTAssertEqual(backingState(), state, "\(what): fsck --repair changed the volume", file: file, line: line)
    }

    /// The key generation a file header names (bytes 4 to 7, plain and integrity alike).
    func headerGeneration(_ bytes: [UInt8]) -> UInt32 {
        bytes.count >= 8 ? (4..<8).reduce(UInt32(0)) { $0 | UInt32(bytes[$1]) << (8 * ($1 - 4)) } : 0
    }

    /// The backing names of the files a rekey journal's records name (FORMAT.md 13.1:
    /// magic, length, body starting with two generations and the name, MAC).
    func journalNames(_ rel: String) throws -> [String] {
        let b = try read(cipher + "/" + rel)
        var names: [String] = []
        var i = 0
        func u32(_ at: Int) -> Int { Int(b[at]) | Int(b[at + 1]) << 8 | Int(b[at + 2]) << 16 | Int(b[at + 3]) << 24 }
        while i + 8 <= b.count {
            let n = u32(i + 4), body = i + 8
            guard body + 10 <= b.count else { break }
            let len = Int(b[body + 8]) | Int(b[body + 9]) << 8
            names.append(String(decoding: b[(body + 10)..<(body + 10 + len)], as: UTF8.self))
            i = body + n + 32
        }
        return names
    }

    /// Regular backing files of the tree (not xtsfs's own, nor the link store), relative to CIPHERDIR.
    func treeFiles() -> [(path: String, bytes: [UInt8])] {
        backingFiles().filter { f in
            let name = (f.path as NSString).lastPathComponent
            var st = stat()
            return !f.path.hasPrefix("xtsfs.links/") && (!name.hasPrefix("xtsfs.") || (name.hasPrefix("xtsfs.long.") && !name.hasSuffix(".name")))
                && lstat(cipher + "/" + f.path, &st) == 0 && (st.st_mode & S_IFMT) == S_IFREG
        }
    }

    /// Killed in the middle of the sweep (a directory switched, entries renamed), with an
    /// incomplete journal, with a complete one (before and while files are overwritten,
    /// and in the segments of a large file): each time fsck with the key finds no damage
    /// and exits 0, reporting the journal as a warning; without the key too; --repair is
    /// refused and changes nothing; the rekey then finishes and the tree is unchanged.
    func testFsckChecksVolumeKilledInTheMiddleOfARekey() throws {
        let env = ["XTSFS_REKEY_BATCH_BYTES": "3145728"]
        let (before, template, steps, trace) = try tracedRekey(env: env)
        let wanted = ["rekey journal written", "rekey journal complete", "file half rewritten", "file rewritten in place",
                      "file part rewritten", "entry renamed", "directory header of", "symlink target re-encrypted", "xattr re-encrypted"]
        var points: [(Int, String)] = []
        for phase in wanted {
            let at = steps.indices.filter { steps[$0].contains(": " + phase) }
            XCTAssertFalse(at.isEmpty, "no step \(phase) in: \(trace)")
            if let mid = at.isEmpty ? nil : at[at.count / 2] { points.append((mid + 1, phase)) }
        }
        // One more: the sweep half done (old and new directories, names, files side by side).
        points.append((steps.count / 2, "half the sweep"))
        var journalsSeen = 0, mixedPoints = 0
        for (point, phase) in points {
            XCTAssertEqual(sh("rm -rf '\(cipher)' && cp -a '\(template)' '\(cipher)' && echo ok").trimmingCharacters(in: .whitespacesAndNewlines), "ok")
            let (killed, err) = runEnv(["rekey", cipher, "--dek", "--passfile", passfile], env: env.merging(["XTSFS_REKEY_FAILPOINT": "\(point)"]) { $1 })
            XCTAssertEqual(killed, -SIGKILL, "point \(point) (\(phase)): not killed: \(err)")
            let what = "point \(point) (\(phase))"
            let journals = backingPaths(named: "xtsfs.rekey-journal", in: cipher), temporaries = backingPaths(named: "xtsfs.rekey-journal.tmp", in: cipher)
            // Both generations really are there (files of each) at most points.
            if Set(treeFiles().filter { $0.bytes.count >= 64 }.map { headerGeneration($0.bytes) }).isSuperset(of: [1, 2]) { mixedPoints += 1 }
            let (status, report, out) = fsckMidRekey()
            XCTAssertEqual(status, 0, "\(what): \(out)")
            guard let report else { XCTFail("\(what): no report: \(out)"); continue }
            XCTAssertEqual(report.errors.map(\.kind), [], "\(what): \(report.errors.map { "\($0.kind) \($0.backingPath): \($0.detail)" })")
            XCTAssertTrue(report.notes.contains { $0.contains("middle of a DEK rekey (generation 1 -> 2)") }, "\(what): \(report.notes)")
            for j in journals {
                journalsSeen += 1
                XCTAssertTrue(report.findings.contains { $0.kind == "rekeyJournal" && $0.severity == "warning" && $0.backingPath == j && $0.detail.contains("xtsfs rekey --dek") },
                              "\(what): journal \(j) not reported: \(report.findings.map { "\($0.kind) \($0.backingPath)" })")
            }
            for t in temporaries {
                XCTAssertTrue(report.findings.contains { $0.kind == "rekeyTemporary" && $0.severity == "warning" && $0.backingPath == t }, "\(what): \(t) not reported")
            }
            // Without the key: the key-free checks, no damage either.
            let (s2, r2, out2) = fsckMidRekey(key: false)
            XCTAssertEqual(s2, 0, "\(what), no key: \(out2)")
            XCTAssertEqual(r2?.errors.map(\.kind) ?? ["no report"], [], "\(what), no key: \(out2)")
            assertRepairRefused(what)
            let (again, err2) = runEnv(["rekey", cipher, "--dek", "--passfile", passfile], env: env)
            XCTAssertEqual(again, 0, "\(what): rerun failed: \(err2)")
            mount()
            XCTAssertEqual(manifest(mnt), before, what)
            unmount()
            // Finished: an ordinary clean volume.
            let (s3, r3, out3) = fsckMidRekey()
            XCTAssertEqual(s3, 0, "\(what), after the rekey: \(out3)")
            XCTAssertFalse(r3?.notes.contains { $0.contains("DEK rekey") } ?? true, "\(what): \(out3)")
        }
        XCTAssertGreaterThanOrEqual(journalsSeen, 4, "the kill points left too few complete journals to check")
        XCTAssertGreaterThanOrEqual(mixedPoints, 3, "too few kill points left files of both generations")
    }

    /// Damage mid-rekey: a byte flipped in a file of the old generation and in one of the
    /// new, and the journal's MAC broken; fsck reports each (status 4), --repair is refused
    /// and changes nothing; once the bytes are put back the rekey finishes and the tree
    /// is unchanged.
    func testFsckMidRekeyReportsDamageInBothGenerationsAndTheJournal() throws {
        let env = ["XTSFS_REKEY_BATCH_BYTES": "3145728"]
        let (before, template, steps, trace) = try tracedRekey(env: env)
        // A complete journal, with files of both generations elsewhere in the tree (which
        // files are done when depends on the listing order of random names: the points with
        // a complete journal are tried from the middle out until one has both).
        let complete = steps.indices.filter { steps[$0].contains(": rekey journal complete") }.map { $0 + 1 }
        XCTAssertGreaterThanOrEqual(complete.count, 3, trace)
        let mid = complete.count / 2
        var found: (journal: String, old: String, new: String)?
        for point in complete.indices.sorted(by: { abs($0 - mid) < abs($1 - mid) }).map({ complete[$0] }) {
            XCTAssertEqual(sh("rm -rf '\(cipher)' && cp -a '\(template)' '\(cipher)' && echo ok").trimmingCharacters(in: .whitespacesAndNewlines), "ok")
            let (killed, err) = runEnv(["rekey", cipher, "--dek", "--passfile", passfile], env: env.merging(["XTSFS_REKEY_FAILPOINT": "\(point)"]) { $1 })
            XCTAssertEqual(killed, -SIGKILL, err)
            guard let journal = backingPaths(named: "xtsfs.rekey-journal", in: cipher).first else { XCTFail("no journal at point \(point)"); continue }
            let journalDir = (journal as NSString).deletingLastPathComponent
            // A file of each generation, outside the journal's directory (whose files the
            // journal covers), not a hard link (its other name may be in the journal), with
            // a data unit to damage.
            let candidates = treeFiles().filter { f in
                var st = stat()
                return (f.path as NSString).deletingLastPathComponent != journalDir && f.bytes.count >= (integrityVolume ? 8192 : 64)
                    && lstat(cipher + "/" + f.path, &st) == 0 && st.st_nlink == 1
            }
            if let o = candidates.first(where: { headerGeneration($0.bytes) == 1 }), let n = candidates.first(where: { headerGeneration($0.bytes) == 2 }) {
                found = (journal, o.path, n.path)
                break
            }
        }
        guard let (journal, oldPath, newPath) = found else { return XCTFail("no kill point with a complete journal and files of both generations elsewhere") }
        let (s0, r0, out0) = fsckMidRekey()
        XCTAssertEqual(s0, 0, out0)
        XCTAssertEqual(r0?.errors.count, 0, out0)

        // Plain volumes do not authenticate contents: the byte is flipped in the file header
        // (its MAC); integrity volumes: in the first data unit (its tag).
        let at = integrityVolume ? 4096 + 100 : 20
        func flip(_ rel: String, _ offset: Int) throws {
            var b = try read(cipher + "/" + rel)
            b[offset] ^= 0x40
            let fd = open(cipher + "/" + rel, O_WRONLY)
            XCTAssertGreaterThanOrEqual(fd, 0, rel)
            XCTAssertEqual(b.withUnsafeBytes { pwrite(fd, $0.baseAddress! + offset, 1, off_t(offset)) }, 1)
            close(fd)
        }
        var st = stat()
        XCTAssertEqual(lstat(cipher + "/" + journal, &st), 0)
        let journalMiddle = Int(st.st_size) / 2
        // The files' modes may lack a write bit (backing files carry the plaintext mode).
        XCTAssertEqual(sh("chmod u+w '\(cipher)/\(oldPath)' '\(cipher)/\(newPath)' '\(cipher)/\(journal)' && echo ok").trimmingCharacters(in: .whitespacesAndNewlines), "ok")
        try flip(oldPath, at)
        try flip(newPath, at)
        try flip(journal, journalMiddle)

        let (status, report, out) = fsckMidRekey()
        XCTAssertEqual(status, 4, out)
        let errors = report?.errors ?? []
        let kind = integrityVolume ? "fileAuthenticationFailed" : "fileHeaderDamaged"
        XCTAssertTrue(errors.contains { $0.kind == kind && $0.backingPath == oldPath }, "old-generation file not reported: \(out)")
        XCTAssertTrue(errors.contains { $0.kind == kind && $0.backingPath == newPath }, "new-generation file not reported: \(out)")
        XCTAssertTrue(errors.contains { $0.kind == "rekeyJournalDamaged" && $0.backingPath == journal && $0.detail.contains("cannot be used")
                                         && $0.detail.contains("stops at this directory") },
                      "damaged journal not reported: \(out)")
        XCTAssertEqual(errors.count, 3, "only the three planted: \(errors.map { "\($0.kind) \($0.backingPath): \($0.detail)" })")
        // The text report says the same.
        let text = Harness.run(["fsck", cipher, "--passfile", passfile])
        XCTAssertEqual(text.status, 4)
        XCTAssertTrue(text.stdout.contains("ERROR rekeyJournalDamaged: \(journal)"), text.stdout)
        assertRepairRefused("damaged")

        // Put back: clean again, and the rekey finishes.
        try flip(oldPath, at)
        try flip(newPath, at)
        try flip(journal, journalMiddle)
        let (s1, r1, out1) = fsckMidRekey()
        XCTAssertEqual(s1, 0, out1)
        XCTAssertEqual(r1?.errors.count, 0, out1)
        let (again, err2) = runEnv(["rekey", cipher, "--dek", "--passfile", passfile], env: env)
        XCTAssertEqual(again, 0, err2)
        mount()
        XCTAssertEqual(manifest(mnt), before)
        unmount()
    }

    /// A unit of a journalled file that is neither old nor new (what a torn block leaves):
    /// the journal verifies, but finishing it would report the unit, so fsck reports the
    /// journal as damaged, naming the unit.
    func testFsckMidRekeyReportsAJournalledUnitNeitherOldNorNew() throws {
        let env = ["XTSFS_REKEY_BATCH_BYTES": "3145728"]
        let (_, template, steps, trace) = try tracedRekey(env: env)
        let points = steps.indices.filter { steps[$0].contains(": rekey journal complete") }.map { $0 + 1 }
        XCTAssertGreaterThanOrEqual(points.count, 3, trace)
        var checked = 0
        for point in points {
            guard let (journal, dir) = rekeyKilled(at: point, from: template, env: env) else { continue }
            // Nothing is overwritten yet: a file the journal names that is still old gets
            // bytes of neither generation in its first data block (the journal covers it
            // unless it is a later segment of a large file, whose header is new by then).
            let named = Set(try journalNames(journal).map { (dir.isEmpty ? "" : dir + "/") + $0 })
            XCTAssertFalse(named.isEmpty, "point \(point): the journal names no file")
            guard let victim = treeFiles().first(where: { named.contains($0.path) && $0.bytes.count >= 8192 && headerGeneration($0.bytes) == 1 })
            else { continue }
            let at = integrityVolume ? 4096 : 64
            XCTAssertEqual(sh("chmod u+w '\(cipher)/\(victim.path)' && echo ok").trimmingCharacters(in: .whitespacesAndNewlines), "ok")
            let fd = open(cipher + "/" + victim.path, O_WRONLY)
            XCTAssertGreaterThanOrEqual(fd, 0)
            let junk = pattern(512, seed: 99)
            XCTAssertEqual(junk.withUnsafeBytes { pwrite(fd, $0.baseAddress, 512, off_t(at)) }, 512)
            close(fd)
            let (status, report, out) = fsckMidRekey()
            XCTAssertEqual(status, 4, "point \(point): \(out)")
            let errors = report?.errors ?? []
            XCTAssertTrue(errors.contains { $0.kind == "rekeyJournalDamaged" && $0.backingPath == journal && $0.detail.contains("unit 0") && $0.detail.contains("neither")
                                     && $0.detail.contains("finishes the rest of its files") },
                          "point \(point): \(errors.map { "\($0.kind) \($0.backingPath): \($0.detail)" })")
            assertRepairRefused("torn unit at point \(point)")
            // As fsck said: the rekey finishes around the unit, reporting it.
            let (again, err2) = runEnv(["rekey", cipher, "--dek", "--passfile", passfile], env: env)
            XCTAssertEqual(again, 0, "point \(point): \(err2)")
            XCTAssertTrue(err2.contains("unit 0 matches neither"), "point \(point): \(err2)")
            checked += 1
        }
        XCTAssertGreaterThanOrEqual(checked, 1, "no journal covered a file with a data block")
    }

    /// Copies (`xtsfs.rekey.<H>`, what versions before the journal left): a complete copy
    /// is a warning, a damaged one an error; the rekey copies the good ones over their
    /// files. Plain volumes only: integrity volumes were never rekeyed with copies (a copy
    /// there does not verify, and is reported as such).
    func testFsckMidRekeyReportsRekeyCopies() throws {
        let (before, template, steps, trace) = try tracedRekey()
        let points = steps.indices.filter { steps[$0].contains(": rekey journal complete") }.map { $0 + 1 }
        XCTAssertGreaterThanOrEqual(points.count, 2, trace)
        let finished = scratch + "/finished"
        // Killed with a complete journal, nothing overwritten: the same state with the
        // journal finished (rerun stopped at its first step) has those files new.
        let point = points[points.count / 2]
        XCTAssertEqual(sh("rm -rf '\(cipher)' '\(finished)' && cp -a '\(template)' '\(cipher)' && echo ok").trimmingCharacters(in: .whitespacesAndNewlines), "ok")
        let (killed, err) = runEnv(["rekey", cipher, "--dek", "--passfile", passfile], env: ["XTSFS_REKEY_FAILPOINT": "\(point)"])
        XCTAssertEqual(killed, -SIGKILL, err)
        let journal = try XCTUnwrap(backingPaths(named: "xtsfs.rekey-journal", in: cipher).first)
        let dir = (journal as NSString).deletingLastPathComponent
        XCTAssertEqual(sh("cp -a '\(cipher)' '\(finished)' && echo ok").trimmingCharacters(in: .whitespacesAndNewlines), "ok")
        let (stopped, err1) = runEnv(["rekey", finished, "--dek", "--passfile", passfile], env: ["XTSFS_REKEY_FAILPOINT": "1", "XTSFS_REKEY_TRACE": "1"])
        XCTAssertEqual(stopped, -SIGKILL, err1)
        // Each file the journal made new becomes a copy beside its old file; the journal
        // goes: the state a version before the journal left.
        let maker = """
        import base64, hashlib, os, shutil, sys
        old_dir, new_dir = sys.argv[1], sys.argv[2]
        made = []
        for name in sorted(os.listdir(old_dir)):
            o, w = os.path.join(old_dir, name), os.path.join(new_dir, name)
            ours = name.startswith("xtsfs.") and not (name.startswith("xtsfs.long.") and not name.endswith(".name"))
            if ours or os.path.islink(o) or not os.path.isfile(o) or not os.path.isfile(w): continue
            if open(o, "rb").read() == open(w, "rb").read(): continue
            h = base64.urlsafe_b64encode(hashlib.sha256(name.encode()).digest()).decode().rstrip("=")
            shutil.copyfile(w, os.path.join(old_dir, "xtsfs.rekey." + h))
            made.append("xtsfs.rekey." + h)
        os.unlink(os.path.join(old_dir, "xtsfs.rekey-journal"))
        print("\\n".join(made))
        """
        let out = sh("python3 -c '\(maker.replacingOccurrences(of: "'", with: "'\\''"))' '\(cipher)/\(dir)' '\(finished)/\(dir)'")
        let copies = out.split(separator: "\n").map { (dir.isEmpty ? "" : dir + "/") + $0 }
        XCTAssertFalse(copies.isEmpty, "no copy made in /\(dir)")
        let (status, report, text) = fsckMidRekey()
        if integrityVolume {
            XCTAssertEqual(status, 4, text)
            for c in copies { XCTAssertTrue(report?.errors.contains { $0.kind == "rekeyCopyDamaged" && $0.backingPath == c } ?? false, "\(c): \(text)") }
            return
        }
        XCTAssertEqual(status, 0, text)
        XCTAssertEqual(report?.errors.count, 0, text)
        for c in copies {
            XCTAssertTrue(report?.findings.contains { $0.kind == "rekeyCopy" && $0.severity == "warning" && $0.backingPath == c } ?? false, "\(c) not reported: \(text)")
        }
        // One copy damaged: its header's MAC fails.
        let bad = cipher + "/" + copies[0]
        var b = try read(bad)
        b[20] ^= 1
        try write(bad, b)
        let (s2, r2, text2) = fsckMidRekey()
        XCTAssertEqual(s2, 4, text2)
        XCTAssertTrue(r2?.errors.contains { $0.kind == "rekeyCopyDamaged" && $0.backingPath == copies[0] && $0.detail.contains("does not verify") } ?? false, text2)
        XCTAssertEqual(r2?.errors.count, 1, text2)
        assertRepairRefused("damaged copy")
        b[20] ^= 1
        try write(bad, b)
        let (again, err2) = runEnv(["rekey", cipher, "--dek", "--passfile", passfile], env: [:])
        XCTAssertEqual(again, 0, err2)
        mount()
        XCTAssertEqual(manifest(mnt), before)
        unmount()
    }

    /// The rekey killed between the two copies of a header write: after the first copy of
    /// the rekey record, the other copy is the header from before the rekey (a warning:
    /// the rekey writes both when it finishes; --repair still refused); after the first
    /// copy of the final header, the rekey is complete and the other copy, which still
    /// holds the rekey, is an ordinary outdated copy (an error, not "altered"), which
    /// --repair restores.
    func testFsckBetweenTheTwoCopiesOfTheRekeysHeaderWrites() throws {
        initVolume()
        mount()
        try FileManager.default.createDirectory(atPath: mnt + "/d", withIntermediateDirectories: true)
        try write(mnt + "/d/f", pattern(9000, seed: 3))
        let before = manifest(mnt)
        unmount()
        let template = scratch + "/template"
        XCTAssertEqual(sh("cp -a '\(cipher)' '\(template)' && echo ok").trimmingCharacters(in: .whitespacesAndNewlines), "ok")
        let (status, trace) = runEnv(["rekey", cipher, "--dek", "--passfile", passfile], env: ["XTSFS_REKEY_TRACE": "1"])
        XCTAssertEqual(status, 0, trace)
        let steps = trace.split(separator: "\n").filter { $0.hasPrefix("rekey step ") }.map(String.init)
        let record = try XCTUnwrap(steps.firstIndex { $0.contains(": rekey record written to header copy") }, trace) + 1
        let final = try XCTUnwrap(steps.firstIndex { $0.contains(": final header written to copy") }, trace) + 1
        XCTAssertLessThan(final, steps.count, "the final header's second copy is the last step")
        for (point, complete) in [(record, false), (final, true)] {
            XCTAssertEqual(sh("rm -rf '\(cipher)' && cp -a '\(template)' '\(cipher)' && echo ok").trimmingCharacters(in: .whitespacesAndNewlines), "ok")
            let (killed, err) = runEnv(["rekey", cipher, "--dek", "--passfile", passfile], env: ["XTSFS_REKEY_FAILPOINT": "\(point)"])
            XCTAssertEqual(killed, -SIGKILL, err)
            let (s, report, out) = fsckMidRekey()
            let outdated = report?.findings.filter { $0.kind == "headerCopyOutdated" } ?? []
            XCTAssertEqual(outdated.count, 1, "point \(point): \(out)")
            XCTAssertFalse(report?.findings.contains { $0.kind == "headerCopyAltered" } ?? true, "point \(point): \(out)")
            if !complete {
                XCTAssertEqual(s, 0, out)
                XCTAssertEqual(outdated.first?.severity, "warning", out)
                XCTAssertTrue(outdated.first?.detail.contains("xtsfs rekey --dek writes both copies") ?? false, out)
                assertRepairRefused("between the rekey record's copies")
            } else {
                XCTAssertEqual(s, 4, out)
                XCTAssertEqual(outdated.first?.severity, "error", out)
                XCTAssertTrue(outdated.first?.detail.contains("final header") ?? false, out)
                XCTAssertFalse(report?.notes.contains { $0.contains("middle of a DEK rekey") } ?? true, out)
                let r = Harness.run(["fsck", cipher, "--repair", "--passfile", passfile])
                XCTAssertEqual(r.status, 1, r.stdout + r.stderr)
                let (s2, _, out2) = fsckMidRekey()
                XCTAssertEqual(s2, 0, out2)
                let st = Harness.run(["status", cipher]).stdout
                XCTAssertTrue(st.contains("Key generation:  2") && st.contains("Rekey:           none"), st)
            }
            if !complete {
                let (again, err2) = runEnv(["rekey", cipher, "--dek", "--passfile", passfile], env: [:])
                XCTAssertEqual(again, 0, err2)
            }
            mount()
            XCTAssertEqual(manifest(mnt), before, "point \(point)")
            unmount()
        }
    }
}

extension IntegrityRekeyTests {
    /// Each record of a rekey journal: the backing name, and the plaintext range it covers.
    func journalRecords(_ rel: String) throws -> [(name: String, coverStart: Int64, coverEnd: Int64)] {
        let b = try read(cipher + "/" + rel)
        func u(_ at: Int, _ n: Int) -> Int64 { (0..<n).reduce(Int64(0)) { $0 | Int64(b[at + $1]) << (8 * $1) } }
        var out: [(String, Int64, Int64)] = []
        var i = 0
        while i + 8 <= b.count {
            let headerLength = b[i..<(i + 4)].elementsEqual("XRJI".utf8) ? 64 : 32
            let length = Int(u(i + 4, 4)), body = i + 8
            let nameLength = Int(u(body + 8, 2))
            let name = String(decoding: b[(body + 10)..<(body + 10 + nameLength)], as: UTF8.self)
            let cover = body + 10 + nameLength + 8 + 2 * headerLength
            out.append((name, u(cover, 8), u(cover + 8, 8)))
            i = body + length + 32
        }
        return out
    }

    /// A large file rewritten in segments, killed after a segment: its journal covers
    /// that segment only; before it the file is new, after it old. A unit damaged in
    /// either part is reported at the file (fileAuthenticationFailed, checked against its
    /// new or its old tags), the journal itself staying sound; put back, all is clean and
    /// the rekey finishes.
    func testFsckMidRekeyChecksALargeFileOutsideItsJournalSegment() throws {
        // 1 MiB batches: the 3 MiB file goes in 3 segments of whole groups.
        let env = ["XTSFS_REKEY_BATCH_BYTES": "1048576"]
        let (before, template, steps, trace) = try tracedRekey(env: env)
        let points = steps.indices.filter { steps[$0].contains(": file part rewritten") }.map { $0 + 1 }
        XCTAssertGreaterThanOrEqual(points.count, 3, trace)
        var checkedOld = 0, checkedNew = 0
        for point in points {
            guard let (journal, dir) = rekeyKilled(at: point, from: template, env: env) else { continue }
            let records = try journalRecords(journal)
            XCTAssertEqual(records.count, 1, "point \(point): a segment's journal names one file")
            guard let rec = records.first else { continue }
            let file = (dir.isEmpty ? "" : dir + "/") + rec.name
            let header = try read(cipher + "/" + file).prefix(64)
            let length = (24..<32).reduce(Int64(0)) { $0 | Int64(header[$1]) << (8 * ($1 - 24)) }
            // One unit in each part outside the cover that exists.
            var units: [(Int64, String)] = []
            if rec.coverStart > 0 { units.append((0, "already rewritten")) }
            if rec.coverEnd < length { units.append((rec.coverEnd / 4096, "still to rewrite")) }
            for (unit, part) in units {
                let offset = off_t((unit / 126) * 127 * 4096 + 4096 + (unit % 126) * 4096 + 10)
                XCTAssertEqual(sh("chmod u+w '\(cipher)/\(file)' && echo ok").trimmingCharacters(in: .whitespacesAndNewlines), "ok")
                let fd = open(cipher + "/" + file, O_RDWR)
                XCTAssertGreaterThanOrEqual(fd, 0)
                var byte: UInt8 = 0
                XCTAssertEqual(pread(fd, &byte, 1, offset), 1)
                var flipped = byte ^ 0x10
                XCTAssertEqual(pwrite(fd, &flipped, 1, offset), 1)
                let (status, report, out) = fsckMidRekey()
                XCTAssertEqual(status, 4, "point \(point), unit \(unit) (\(part)): \(out)")
                let errors = report?.errors ?? []
                XCTAssertEqual(errors.map(\.kind), ["fileAuthenticationFailed"], "point \(point), unit \(unit): \(out)")
                XCTAssertTrue(errors.first.map { $0.backingPath == file && $0.detail.contains(part) && $0.detail.contains("unit \(unit) ") } ?? false,
                              "point \(point), unit \(unit) (\(part)): \(errors.map { "\($0.backingPath): \($0.detail)" })")
                XCTAssertEqual(pwrite(fd, &byte, 1, offset), 1)
                close(fd)
                if part == "already rewritten" { checkedNew += 1 } else { checkedOld += 1 }
            }
            let (s1, r1, out1) = fsckMidRekey()
            XCTAssertEqual(s1, 0, "point \(point): \(out1)")
            XCTAssertEqual(r1?.errors.count, 0, out1)
            let (again, err2) = runEnv(["rekey", cipher, "--dek", "--passfile", passfile], env: env)
            XCTAssertEqual(again, 0, "point \(point): \(err2)")
            mount()
            XCTAssertEqual(manifest(mnt), before, "point \(point)")
            unmount()
        }
        XCTAssertGreaterThanOrEqual(checkedNew, 1)
        XCTAssertGreaterThanOrEqual(checkedOld, 1)
    }
}
