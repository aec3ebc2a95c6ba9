import CSysShim
import Foundation
import XCTest
import XTSFormat
import XTSVolume
#if canImport(Glibc)
import Glibc
#endif

/// Key rotation through the command line: KEK rotation between providers, header backup
/// and restore, and the offline DEK rekey, killed at 20+ points and resumed, with the tree
/// compared (contents, names, symlink targets, xattrs, hard links) after each.
class RekeyTests: VolumeTestCase {
    var keyfile: String { scratch + "/key" }

    @discardableResult
    func xtsfs(_ args: [String], _ expected: ExitStatus = .success, file: StaticString = #filePath, line: UInt = #line) -> Harness.Result {
        let r = Harness.run(args)
        XCTAssertEqual(r.status, expected.rawValue, "xtsfs \(args.joined(separator: " ")): \(r.stderr)", file: file, line: line)
        return r
    }

    /// Runs xtsfs with extra environment; returns (exit status or -signal, stderr).
    func runEnv(_ args: [String], env: [String: String]) -> (Int32, String) {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: Harness.binary)
        p.arguments = args
        p.environment = ProcessInfo.processInfo.environment.merging(env) { $1 }
        let err = Pipe()
        p.standardError = err
        p.standardOutput = FileHandle.nullDevice
        p.standardInput = FileHandle.nullDevice
        do { try p.run() } catch { return (-1000, "\(error)") }
        let data = err.fileHandleForReading.readDataToEndOfFile()
        p.waitUntilExit()
        let status = p.terminationReason == .uncaughtSignal ? -p.terminationStatus : p.terminationStatus
        return (status, String(decoding: data, as: UTF8.self))
    }

    static let repoRoot = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent().path

    /// Output of a shell command.
    func sh(_ command: String) -> String { Self.sh(command) }

    static func sh(_ command: String) -> String {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: "/bin/sh")
        p.arguments = ["-c", command]
        let out = Pipe()
        p.standardOutput = out
        do { try p.run() } catch { return "cannot run: \(error)" }
        let data = out.fileHandleForReading.readDataToEndOfFile()
        p.waitUntilExit()
        return String(decoding: data, as: UTF8.self)
    }

    func manifest(_ dir: String) -> String { Self.manifest(dir) }

    /// The start of the kill tests: the rekey tree written through a mount, its manifest,
    /// a copy of the volume as it was (`template`), and the steps one traced rekey of the
    /// volume takes (with `env` added).
    func tracedRekey(env: [String: String] = [:]) throws -> (before: String, template: String, steps: [String], trace: String) {
        initVolume()
        mount()
        try populateRekeyTree()
        let before = manifest(mnt)
        unmount()
        try prepareBackingForRekey()
        let template = scratch + "/template"
        XCTAssertEqual(sh("cp -a '\(cipher)' '\(template)' && echo ok").trimmingCharacters(in: .whitespacesAndNewlines), "ok")
        let (status, trace) = runEnv(["rekey", cipher, "--dek", "--passfile", passfile], env: env.merging(["XTSFS_REKEY_TRACE": "1"]) { $1 })
        XCTAssertEqual(status, 0, trace)
        return (before, template, trace.split(separator: "\n").filter { $0.hasPrefix("rekey step ") }.map(String.init), trace)
    }

    /// CIPHERDIR put back as `template` and a DEK rekey killed at step `point`: the journal
    /// it left and that journal's directory (relative to CIPHERDIR), or nil (failure noted).
    func rekeyKilled(at point: Int, from template: String, env: [String: String] = [:]) -> (journal: String, dir: String)? {
        XCTAssertEqual(sh("rm -rf '\(cipher)' && cp -a '\(template)' '\(cipher)' && echo ok").trimmingCharacters(in: .whitespacesAndNewlines), "ok")
        let (killed, err) = runEnv(["rekey", cipher, "--dek", "--passfile", passfile], env: env.merging(["XTSFS_REKEY_FAILPOINT": "\(point)"]) { $1 })
        XCTAssertEqual(killed, -SIGKILL, "point \(point): not killed: \(err)")
        guard let journal = backingPaths(named: "xtsfs.rekey-journal", in: cipher).first else {
            XCTFail("point \(point): no journal")
            return nil
        }
        return (journal, (journal as NSString).deletingLastPathComponent)
    }

    /// Changes to the backing files of the rekey tree that the plaintext view does not
    /// show, made before the kill tests copy it (IntegrityRekeyTests plants some).
    func prepareBackingForRekey() throws {}

    /// One line per entry of the tree under `dir`: type, name, SHA-256 of the contents,
    /// symlink target, user xattrs, size, mode, hard-link group (scripts/tree-manifest.py).
    static func manifest(_ dir: String) -> String {
        sh("python3 '\(Self.repoRoot)/scripts/tree-manifest.py' '\(dir)'")
    }

    func testKEKRotationBetweenKeyfileAndPassphrase() throws {
        initVolume()
        mount()
        try write(mnt + "/f", pattern(10000, seed: 9))
        unmount()
        xtsfs(["keys", "generate", keyfile])
        // Passphrase -> key file: the same slot index, and the old passphrase no longer opens.
        let r = xtsfs(["rekey", cipher, "--kek", "--passfile", passfile, "--new-keyfile", keyfile])
        XCTAssertTrue(r.stderr.contains("backup of the old header"), r.stderr)
        let list = xtsfs(["keys", "list", cipher]).stdout
        XCTAssertTrue(list.contains("keyfile") && !list.contains("passphrase"), list)
        xtsfs(["mount", cipher, mnt, "--passfile", passfile], .wrongKey)
        xtsfs(["mount", cipher, mnt, "--keyfile", keyfile])
        XCTAssertEqual(try read(mnt + "/f"), pattern(10000, seed: 9))
        unmount()
        // Key file -> passphrase.
        let pass2 = scratch + "/pass2"
        try "another passphrase\n".write(toFile: pass2, atomically: true, encoding: .utf8)
        xtsfs(["rekey", cipher, "--kek", "--keyfile", keyfile, "--new-passfile", pass2] + Self.cheapKDF)
        xtsfs(["mount", cipher, mnt, "--keyfile", keyfile], .wrongKey)
        xtsfs(["mount", cipher, mnt, "--passfile", pass2])
        XCTAssertEqual(try read(mnt + "/f"), pattern(10000, seed: 9))
        unmount()
    }

    func testHeaderBackupRestoreRoundTripAndForeignRefused() throws {
        initVolume()
        let backup = scratch + "/hdr.bak"
        xtsfs(["header", "backup", cipher, backup])
        xtsfs(["header", "backup", cipher, backup], .refused)
        // Rotate the KEK: the backup still opens with the old passphrase, the volume does not.
        xtsfs(["keys", "generate", keyfile])
        xtsfs(["rekey", cipher, "--kek", "--passfile", passfile, "--new-keyfile", keyfile])
        xtsfs(["mount", cipher, mnt, "--passfile", passfile], .wrongKey)
        // Restore needs a key that opens the backup: the key file does not.
        xtsfs(["header", "restore", cipher, backup, "--keyfile", keyfile], .wrongKey)
        xtsfs(["header", "restore", cipher, backup, "--passfile", passfile])
        mount()
        unmount()
        // Another volume's header is refused, and nothing changes.
        let other = scratch + "/other"
        XCTAssertEqual(Harness.run(["init", other, "--passfile", passfile] + Self.cheapKDF).status, 0)
        let otherBackup = scratch + "/other.bak"
        xtsfs(["header", "backup", other, otherBackup])
        let before = try read(cipher + "/xtsfs.header")
        let r = xtsfs(["header", "restore", cipher, otherBackup, "--passfile", passfile], .refused)
        XCTAssertTrue(r.stderr.contains("another volume"), r.stderr)
        XCTAssertEqual(try read(cipher + "/xtsfs.header"), before)
        // A damaged file is bad input.
        try write(scratch + "/junk", Array("not a header".utf8))
        xtsfs(["header", "restore", cipher, scratch + "/junk", "--passfile", passfile], .badInput)
    }

    /// A rekey journal planted in CIPHERDIR (garbage, or a FIFO) in the middle of a rekey:
    /// its records do not verify under the new key, so nothing it says is used. The mount
    /// serves the tree as it is; the rekey does not finish while it is there and says so;
    /// once it is removed the rekey finishes and the tree is whole.
    func testPlantedRekeyJournalIsNeverTrusted() throws {
        initVolume()
        mount()
        try write(mnt + "/f", pattern(20_000, seed: 7))
        let before = manifest(mnt)
        unmount()
        // Stopped right after the header's rekey record: mid-rekey, nothing swept yet.
        let (killed, err) = runEnv(["rekey", cipher, "--dek", "--passfile", passfile], env: ["XTSFS_REKEY_FAILPOINT": "3"])
        XCTAssertEqual(killed, -SIGKILL, err)
        let journal = cipher + "/xtsfs.rekey-journal"
        for plant in ["garbage", "fifo"] {
            if plant == "fifo" { XCTAssertEqual(mkfifo(journal, 0o600), 0) } else { try write(journal, Array("XRJ1".utf8) + pattern(300, seed: 9)) }
            mount()
            XCTAssertEqual(manifest(mnt), before, plant)
            unmount()
            let (status, out) = runEnv(["rekey", cipher, "--dek", "--passfile", passfile], env: [:])
            XCTAssertNotEqual(status, 0, "\(plant): the rekey finished past a journal it cannot trust: \(out)")
            XCTAssertTrue(out.contains("xtsfs.rekey-journal"), "\(plant): \(out)")
            XCTAssertEqual(unlink(journal), 0)
        }
        let (status, out) = runEnv(["rekey", cipher, "--dek", "--passfile", passfile], env: [:])
        XCTAssertEqual(status, 0, out)
        mount()
        XCTAssertEqual(manifest(mnt), before)
        unmount()
    }

    func testDEKRekeyOfEmptyVolume() throws {
        initVolume()
        xtsfs(["rekey", cipher, "--dek", "--passfile", passfile])
        let status = xtsfs(["status", cipher]).stdout
        XCTAssertTrue(status.contains("Key generation:  2"), status)
        XCTAssertTrue(status.contains("Rekey:           none"), status)
        mount()
        try write(mnt + "/after", [1, 2, 3])
        unmount()
        xtsfs(["rekey", cipher, "--dek", "--passfile", passfile])
        mount()
        XCTAssertEqual(try read(mnt + "/after"), [1, 2, 3])
        unmount()
    }

    func testDEKRekeyRefusesWhileMountedAndOtherSlots() throws {
        initVolume()
        // Mounted read-write the rekey goes online (OnlineRekeyTests); read-only, the
        // offline sweep is refused.
        mount(["-o", "ro"])
        xtsfs(["rekey", cipher, "--dek", "--passfile", passfile], .refused)
        unmount()
        // Other slots are refused before anything is written, online too.
        mount()
        xtsfs(["keys", "generate", scratch + "/other-key"])
        xtsfs(["keys", "add", cipher, "--passfile", passfile, "--new-keyfile", scratch + "/other-key"])
        let online = xtsfs(["rekey", cipher, "--dek", "--passfile", passfile], .refused)
        XCTAssertTrue(online.stderr.contains("--remove-other-slots"), online.stderr)
        XCTAssertTrue(Harness.run(["status", cipher]).stdout.contains("Rekey:           none"))
        unmount()
        xtsfs(["keys", "remove", cipher, "1", "--passfile", passfile])
        xtsfs(["keys", "generate", keyfile])
        xtsfs(["keys", "add", cipher, "--passfile", passfile, "--new-keyfile", keyfile])
        let r = xtsfs(["rekey", cipher, "--dek", "--passfile", passfile], .refused)
        XCTAssertTrue(r.stderr.contains("--remove-other-slots"), r.stderr)
        xtsfs(["rekey", cipher, "--dek", "--passfile", passfile, "--remove-other-slots"])
        xtsfs(["mount", cipher, mnt, "--keyfile", keyfile], .wrongKey)
        mount()
        unmount()
    }

    /// The whole tree rekeyed without interruption: every byte, name, target, xattr and hard
    /// link unchanged; the backing files all changed; JSON progress events.
    func testDEKRekeyPreservesTree() throws {
        initVolume()
        mount()
        try populateRekeyTree()
        let before = manifest(mnt)
        unmount()
        let oldBacking = Set(backingFiles().map(\.path))
        let r = xtsfs(["rekey", cipher, "--dek", "--passfile", passfile, "--json"])
        XCTAssertTrue(r.stdout.contains("\"event\":\"progress\""), r.stdout)
        XCTAssertTrue(r.stdout.contains("\"event\":\"finished\""), r.stdout)
        let newBacking = Set(backingFiles().map(\.path))
        let encryptedNames = newBacking.filter { !$0.contains("xtsfs.") }
        XCTAssertTrue(encryptedNames.isDisjoint(with: oldBacking), "some name was not re-encrypted")
        XCTAssertFalse(newBacking.contains { $0.contains("xtsfs.rekey.") })
        mount()
        XCTAssertEqual(manifest(mnt), before)
        var st = stat()
        XCTAssertEqual(lstat(mnt + "/sparse", &st), 0)
        XCTAssertLessThan(Int(st.st_blocks) * 512, 1 << 20, "the sparse file stayed sparse")
        unmount()
    }

    /// Killed (SIGKILL) at 20+ distinct steps across every phase, rerun, compared.
    func testDEKRekeyKilledAtManyPointsResumes() throws {
        // Count and name the steps.
        let (before, template, steps, trace) = try tracedRekey()
        XCTAssertGreaterThanOrEqual(steps.count, 20, trace)
        let kinds = Set(steps.map { $0.split(separator: ":", maxSplits: 1)[1].split(separator: " ").prefix(3).joined(separator: " ") })
        // Every kind of step, and at least 24 points spread over the whole run.
        var points = Set<Int>()
        for k in kinds { if let i = steps.firstIndex(where: { $0.contains(k) }) { points.insert(i + 1) } }
        let stride = max(1, steps.count / 24)
        for i in Swift.stride(from: 1, through: steps.count, by: stride) { points.insert(i) }
        points.insert(steps.count)      // the last header copy
        points.insert(steps.count - 1)  // between the two header copies
        XCTAssertGreaterThanOrEqual(points.count, 20)
        for point in points.sorted() {
            XCTAssertEqual(sh("rm -rf '\(cipher)' && cp -a '\(template)' '\(cipher)' && echo ok").trimmingCharacters(in: .whitespacesAndNewlines), "ok")
            let (killed, err) = runEnv(["rekey", cipher, "--dek", "--passfile", passfile], env: ["XTSFS_REKEY_FAILPOINT": "\(point)"])
            XCTAssertEqual(killed, -SIGKILL, "point \(point) (\(steps[point - 1])): not killed: \(err)")
            // A status with no key shows the interrupted rekey (until the final header is whole).
            if point < steps.count - 1 {
                let s = Harness.run(["status", cipher]).stdout
                XCTAssertTrue(s.contains("interrupted or running"), "point \(point): \(s)")
                // Mounted in the middle of the rekey, the tree reads back whole.
                mount()
                XCTAssertEqual(manifest(mnt), before, "mounted mid-rekey at point \(point) (\(steps[point - 1]))")
                unmount()
            }
            let (again, err2) = runEnv(["rekey", cipher, "--dek", "--passfile", passfile], env: [:])
            XCTAssertEqual(again, 0, "point \(point) (\(steps[point - 1])): rerun failed: \(err2)")
            mount()
            XCTAssertEqual(manifest(mnt), before, "point \(point) (\(steps[point - 1]))")
            unmount()
            // Killed once the final header was in place, the rekey was done: the rerun made another.
            let s = Harness.run(["status", cipher]).stdout
            let generation = point >= steps.count - 1 ? "Key generation:  3" : "Key generation:  2"
            XCTAssertTrue(s.contains(generation) && s.contains("Rekey:           none"), "point \(point): \(s)")
        }
    }
    /// Backing paths (relative to `dir`) of every file named `name`.
    func backingPaths(named name: String, in dir: String) -> [String] {
        sh("cd '\(dir)' && find . -name '\(name)' -printf '%P\\n'").split(separator: "\n").map(String.init)
    }

    /// Killed at every phase of the checksum journal (FORMAT.md section 13.1), with batches
    /// of 3 MiB so that the 3 MiB file and the 64 MiB sparse one are rewritten in segments:
    /// the journal written but not yet renamed complete, complete, a file half overwritten,
    /// overwritten, a segment written, the batch synced, the journal removed. Each time the
    /// state is checked (the temporary or the complete journal is there), read through a
    /// mount (which finishes the journal first), resumed and compared.
    func testDEKRekeyKilledInEveryJournalPhaseResumes() throws {
        let env = ["XTSFS_REKEY_BATCH_BYTES": "3145728"]
        let (before, template, steps, trace) = try tracedRekey(env: env)
        let phases = ["rekey journal written", "rekey journal complete", "file half rewritten", "file rewritten in place",
                      "file part rewritten", "batch rewritten and synced", "rekey journal removed"]
        // Every phase, at its first, middle and last occurrence.
        var points: [(Int, String)] = []
        for phase in phases {
            let at = steps.indices.filter { steps[$0].contains(": " + phase) }
            XCTAssertFalse(at.isEmpty, "no step \(phase) in: \(trace)")
            guard let first = at.first, let last = at.last else { continue }
            for i in Set([first, at[at.count / 2], last]).sorted() { points.append((i + 1, phase)) }
        }
        XCTAssertGreaterThanOrEqual(points.count, 15)
        for (point, phase) in points {
            XCTAssertEqual(sh("rm -rf '\(cipher)' && cp -a '\(template)' '\(cipher)' && echo ok").trimmingCharacters(in: .whitespacesAndNewlines), "ok")
            let (killed, err) = runEnv(["rekey", cipher, "--dek", "--passfile", passfile], env: env.merging(["XTSFS_REKEY_FAILPOINT": "\(point)"]) { $1 })
            XCTAssertEqual(killed, -SIGKILL, "point \(point) (\(phase)): not killed: \(err)")
            let temporaries = backingPaths(named: "xtsfs.rekey-journal.tmp", in: cipher), journals = backingPaths(named: "xtsfs.rekey-journal", in: cipher)
            switch phase {
            // (A segment's journal may still be there while the next one's is written.)
            case "rekey journal written": XCTAssertEqual(temporaries.count, 1, "point \(point)")
            case "rekey journal removed": XCTAssertTrue(journals.isEmpty && temporaries.isEmpty, "point \(point)")
            default: XCTAssertEqual(journals.count, 1, "point \(point) (\(phase))")
            }
            mount()
            XCTAssertEqual(manifest(mnt), before, "mounted after point \(point) (\(phase))")
            unmount()
            XCTAssertTrue(backingPaths(named: "xtsfs.rekey-journal", in: cipher).isEmpty, "the mount finished the journal (point \(point))")
            let (again, err2) = runEnv(["rekey", cipher, "--dek", "--passfile", passfile], env: env)
            XCTAssertEqual(again, 0, "point \(point) (\(phase)): rerun failed: \(err2)")
            mount()
            XCTAssertEqual(manifest(mnt), before, "point \(point) (\(phase))")
            // Hard links stay one inode.
            var a = stat(), b = stat()
            XCTAssertEqual(lstat(mnt + "/a/one-unit", &a), 0)
            XCTAssertEqual(lstat(mnt + "/a/b/c/hardlink", &b), 0)
            XCTAssertEqual(a.st_ino, b.st_ino, "point \(point)")
            XCTAssertEqual(a.st_nlink, 2)
            unmount()
            XCTAssertTrue(backingFiles().allSatisfy { !$0.path.contains("xtsfs.rekey") }, "point \(point): something of the rekey left")
        }
    }

    /// A power loss in the middle of an overwrite may keep any subset of the 4096-byte
    /// blocks written: simulated by killing the rekey once each batch's journal is complete,
    /// finishing the journal of a copy of that state (every journalled file new), and
    /// then putting every journalled file together block by block, alternately from the
    /// old and the new one (so units are new in one block and old in the next, both ways
    /// round). The rerun rebuilds every unit from the journal: the tree reads back whole.
    func testDEKRekeyJournalRebuildsFilesMixedBlockByBlock() throws {
        let (before, template, steps, trace) = try tracedRekey()
        let points = steps.indices.filter { steps[$0].contains(": rekey journal complete") }.map { $0 + 1 }
        XCTAssertGreaterThanOrEqual(points.count, 3, trace)
        let finished = scratch + "/finished", realCipher = cipher
        for (n, point) in points.enumerated() {
            XCTAssertEqual(sh("rm -rf '\(finished)' && echo ok").trimmingCharacters(in: .whitespacesAndNewlines), "ok")
            guard let (_, dir) = rekeyKilled(at: point, from: template) else { continue }
            // The same state, its journal finished by a rerun stopped right after (its
            // first step): the journalled files all new.
            XCTAssertEqual(sh("cp -a '\(realCipher)' '\(finished)' && echo ok").trimmingCharacters(in: .whitespacesAndNewlines), "ok")
            let (stopped, err1) = runEnv(["rekey", finished, "--dek", "--passfile", passfile], env: ["XTSFS_REKEY_FAILPOINT": "1", "XTSFS_REKEY_TRACE": "1"])
            XCTAssertEqual(stopped, -SIGKILL, err1)
            XCTAssertTrue(err1.contains("rekey step 1: rekey journal removed"), err1)
            // Every file of that directory that the mount changed, mixed block by block in place.
            let mixer = """
            import os, sys
            old_dir, new_dir, parity = sys.argv[1], sys.argv[2], int(sys.argv[3])
            mixed = 0
            for name in os.listdir(old_dir):
                o, w = os.path.join(old_dir, name), os.path.join(new_dir, name)
                # A long name's entry (xtsfs.long.HASH) holds a file's contents like any other.
                ours = name.startswith("xtsfs.") and not (name.startswith("xtsfs.long.") and not name.endswith(".name"))
                if not os.path.isfile(o) or os.path.islink(o) or ours or not os.path.isfile(w):
                    continue
                a, b = open(o, "rb").read(), open(w, "rb").read()
                if a == b or len(a) != len(b):
                    continue
                fd = os.open(o, os.O_WRONLY)
                for k in range(0, (len(a) + 4095) // 4096):
                    if (k + parity) % 2 == 0:
                        os.pwrite(fd, b[k * 4096:(k + 1) * 4096], k * 4096)
                os.close(fd)
                mixed += 1
            print(mixed)
            """
            let out = sh("python3 -c '\(mixer.replacingOccurrences(of: "'", with: "'\\''"))' '\(realCipher)/\(dir)' '\(finished)/\(dir)' \(n % 2)")
            // Every journal describes at least one file with contents (empty files and
            // files already new are left out of batches), so something is mixed each time.
            let mixed = Int(out.trimmingCharacters(in: .whitespacesAndNewlines)) ?? -1000
            XCTAssertGreaterThanOrEqual(mixed, 1, "point \(point): nothing mixed in /\(dir) (\(steps[point - 1]))")
            let (again, err2) = runEnv(["rekey", cipher, "--dek", "--passfile", passfile], env: [:])
            XCTAssertEqual(again, 0, "point \(point): rerun failed: \(err2)")
            XCTAssertFalse(err2.contains("torn"), "point \(point): \(err2)")
            mount()
            XCTAssertEqual(manifest(mnt), before, "point \(point), mixed block by block")
            unmount()
        }
    }
}


extension VolumeTestCase {
    /// The tree the rekey tests rekey: empty, small, unit-sized and odd-sized files, a 3 MiB
    /// one, hard links across directories, a sparse file, short and link-store symlinks,
    /// long names, xattrs on a file and a directory, a FIFO, a 4,000-byte path.
    func populateRekeyTree() throws {
        let m = mnt
        try FileManager.default.createDirectory(atPath: m + "/a/b/c", withIntermediateDirectories: true)
        try write(m + "/empty", [])
        try write(m + "/tiny", Array("hello".utf8))
        try write(m + "/a/one-unit", pattern(4096, seed: 1))
        try write(m + "/a/b/odd", pattern(8200, seed: 2))
        try write(m + "/a/b/c/big", pattern(3 << 20 + 17, seed: 3))
        XCTAssertEqual(link(m + "/a/one-unit", m + "/a/b/c/hardlink"), 0)
        XCTAssertEqual(link(m + "/tiny", m + "/a/tiny-link"), 0)
        // Sparse: a hole between two written regions, and a far end.
        let fd = open(m + "/sparse", O_WRONLY | O_CREAT, 0o644)
        XCTAssertGreaterThanOrEqual(fd, 0)
        _ = pattern(5000, seed: 4).withUnsafeBytes { pwrite(fd, $0.baseAddress, $0.count, 0) }
        _ = pattern(100, seed: 5).withUnsafeBytes { pwrite(fd, $0.baseAddress, $0.count, 1 << 24) }
        XCTAssertEqual(ftruncate(fd, 1 << 26), 0)
        close(fd)
        XCTAssertEqual(symlink("a/b/odd", m + "/short-link"), 0)
        XCTAssertEqual(symlink(String(repeating: "x/", count: 1800) + "end", m + "/a/stored-link"), 0)
        let long = String(repeating: "L", count: 250)
        try write(m + "/a/" + long, pattern(100, seed: 6))
        try FileManager.default.createDirectory(atPath: m + "/" + String(repeating: "d", count: 200), withIntermediateDirectories: false)
        XCTAssertEqual(setxattr(m + "/a/one-unit", "user.color", "blue", 4, 0), 0)
        XCTAssertEqual(setxattr(m + "/a/b", "user.dir-attr", "on a directory", 14, 0), 0)
        XCTAssertEqual(mkfifo(m + "/a/fifo", 0o600), 0)
        // A path of about 4000 bytes: 20 directories of 190-byte names.
        var deep = m
        for i in 0..<20 {
            deep += "/" + String(repeating: Character(String(UnicodeScalar(UInt8(97 + i)))), count: 190)
            XCTAssertEqual(Glibc.mkdir(deep, 0o755), 0, "mkdir at depth \(i)")
        }
        try write(deep + "/leaf", Array("deep".utf8))
    }
}
