import Foundation
import XCTest
import XTSCrypto
import XTSFormat
import XTSKeys
import XTSVolume
#if canImport(Glibc)
import Glibc
#endif

/// The corruption campaign: damaged volumes generated from one good volume, each taken
/// through status, mount, list, read, write, unmount, fsck, fsck --repair and a second
/// mount. What must never happen: a crash, a hang, detectable damage returned as data,
/// a volume made worse by our own command. Prints a table of outcomes by case class.
///
/// The short form runs every deterministic case once (in scripts/test); `scripts/corrupt
/// --cases N` sets XTSFS_CORRUPT_CASES=N and adds random bit flips and truncations of
/// random backing files and header copies up to N cases.
final class CorruptionCampaignTests: VolumeTestCase {
    struct Case {
        var cls: String
        var name: String
        /// Plaintext paths whose contents the format cannot protect in this case (plain XTS
        /// authenticates no content): they may read as garbage, never other files.
        var mayGarble: Set<String> = []
        var mutate: (String) throws -> Void
    }

    /// Plaintext path → SHA-256 (hex) of the expected contents.
    var expected: [String: String] = [:]
    var base = ""
    var otherSame = ""
    var otherDifferent = ""
    var reader = ""
    var violations: [String] = []
    var rows: [(cls: String, name: String, outcome: [String: String])] = []

    static let timeout: TimeInterval = 30

    // MARK: - running commands with a deadline

    struct Outcome { var status: Int32; var stdout: String; var stderr: String; var crashed: Bool; var hung: Bool }

    func run(_ exe: String, _ args: [String], timeout: TimeInterval = CorruptionCampaignTests.timeout) -> Outcome {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: exe)
        p.arguments = args
        let out = Pipe(), err = Pipe()
        p.standardOutput = out
        p.standardError = err
        p.standardInput = FileHandle.nullDevice
        do { try p.run() } catch { return Outcome(status: -1, stdout: "", stderr: "\(error)", crashed: false, hung: false) }
        let outBox = DataBox(), errBox = DataBox()
        Thread { outBox.data = out.fileHandleForReading.readDataToEndOfFile(); outBox.done.signal() }.start()
        Thread { errBox.data = err.fileHandleForReading.readDataToEndOfFile(); errBox.done.signal() }.start()
        let deadline = Date().addingTimeInterval(timeout)
        var hung = false
        while p.isRunning {
            if Date() > deadline { hung = true; kill(p.processIdentifier, SIGKILL); break }
            usleep(5000)
        }
        p.waitUntilExit()
        _ = outBox.done.wait(timeout: .now() + 5)
        _ = errBox.done.wait(timeout: .now() + 5)
        return Outcome(status: p.terminationStatus, stdout: String(decoding: outBox.data, as: UTF8.self),
                       stderr: String(decoding: errBox.data, as: UTF8.self),
                       crashed: p.terminationReason == .uncaughtSignal && !hung, hung: hung)
    }

    func xtsfs(_ args: [String]) -> Outcome { run(Harness.binary, args) }

    // MARK: - the good volume

    func makeBase() throws {
        initVolume()
        mount()
        try FileManager.default.createDirectory(atPath: mnt + "/dir/sub", withIntermediateDirectories: true)
        let files: [(String, [UInt8])] = [
            ("/a", pattern(5000, seed: 1)), ("/tiny", Array("abc".utf8)), ("/dir/b", pattern(10000, seed: 2)),
            ("/dir/sub/c", pattern(100, seed: 3)), ("/" + String(repeating: "L", count: 200), pattern(50, seed: 4)),
            ("/dir/empty", []),
        ]
        for (p, bytes) in files {
            try write(mnt + p, bytes)
            expected[p] = SHA256.hash(bytes).map { String(format: "%02x", $0) }.joined()
        }
        try FileManager.default.createSymbolicLink(atPath: mnt + "/link", withDestinationPath: "a")
        try FileManager.default.createSymbolicLink(atPath: mnt + "/longlink", withDestinationPath: String(repeating: "t", count: 3500))
        unmount()
        base = scratch + "/base"
        XCTAssertEqual(Harness.shell("cp -a '\(cipher)' '\(base)'"), 0)
        otherSame = scratch + "/other-same"
        XCTAssertEqual(Harness.run(["init", otherSame, "--passfile", passfile] + Self.cheapKDF).status, 0)
        otherDifferent = scratch + "/other-diff"
        let pass2 = scratch + "/pass2"
        try "another passphrase\n".write(toFile: pass2, atomically: true, encoding: .utf8)
        XCTAssertEqual(Harness.run(["init", otherDifferent, "--passfile", pass2] + Self.cheapKDF).status, 0)
        reader = scratch + "/reader.py"
        try """
        import hashlib, os, sys, json
        root = sys.argv[1]
        out = {}
        for d, dirs, files in os.walk(root):
            for n in files + dirs:
                p = os.path.join(d, n)
                rel = p[len(root):]
                try:
                    st = os.lstat(p)
                    if os.path.islink(p):
                        out[rel] = "link " + str(len(os.readlink(p)))
                    elif os.path.isfile(p):
                        with open(p, 'rb') as f:
                            out[rel] = "ok " + hashlib.sha256(f.read()).hexdigest()
                except OSError as e:
                    out[rel] = "error " + str(e.errno)
        print(json.dumps(out))
        """.write(toFile: reader, atomically: true, encoding: .utf8)
    }

    // MARK: - locating backing objects of the good volume

    func files(_ dir: String) -> [String] {
        ((try? FileManager.default.contentsOfDirectory(atPath: dir)) ?? []).sorted()
    }

    func isDir(_ p: String) -> Bool { var st = stat(); return lstat(p, &st) == 0 && st.st_mode & S_IFMT == S_IFDIR }

    func size(_ p: String) -> Int? { var st = stat(); return lstat(p, &st) == 0 && st.st_mode & S_IFMT == S_IFREG ? Int(st.st_size) : nil }

    func bySize(_ dir: String, _ n: Int) throws -> String {
        guard let e = files(dir).first(where: { !$0.hasPrefix("xtsfs.") && size(dir + "/" + $0) == n }) else { throw XCTSkip("no \(n)-byte file in \(dir)") }
        return dir + "/" + e
    }

    func subdir(_ dir: String) throws -> String {
        guard let e = files(dir).first(where: { !$0.hasPrefix("xtsfs.") && isDir(dir + "/" + $0) }) else { throw XCTSkip("no directory in \(dir)") }
        return dir + "/" + e
    }

    func longEntry(_ dir: String) throws -> String {
        guard let e = files(dir).first(where: { $0.hasPrefix("xtsfs.long.") && !$0.hasSuffix(".name") }) else { throw XCTSkip("no long name") }
        return dir + "/" + e
    }

    func bytes(_ p: String) throws -> [UInt8] { try read(p) }

    func put(_ p: String, _ b: [UInt8]) throws {
        chmod(p, 0o600)
        try write(p, b)
    }

    func rechecksum(_ b: [UInt8]) -> [UInt8] {
        let body = Array(b[0..<(b.count - 32)])
        return body + SHA256.hash(body)
    }

    // MARK: - the cases

    func cases(random: Int) -> [Case] {
        var out: [Case] = []
        for copy in 0..<2 {
            let h = copy == 0 ? "/xtsfs.header" : "/xtsfs.header2"
            out.append(Case(cls: "header copy", name: "\(h) bit flip") { c in var b = try self.bytes(c + h); b[97] ^= 0x20; try self.put(c + h, b) })
            out.append(Case(cls: "header copy", name: "\(h) truncated") { c in try self.put(c + h, Array(try self.bytes(c + h).prefix(150))) })
            out.append(Case(cls: "header copy", name: "\(h) removed") { c in try FileManager.default.removeItem(atPath: c + h) })
            out.append(Case(cls: "keyslot", name: "\(h) keyslot byte, checksum recomputed") { c in
                var b = try self.bytes(c + h); b[160] ^= 0x01; try self.put(c + h, self.rechecksum(b))
            })
            out.append(Case(cls: "keyslot", name: "\(h) Argon2id cost edited, checksum recomputed") { c in
                var b = try self.bytes(c + h); b[142] ^= 0x02; try self.put(c + h, self.rechecksum(b))
            })
            for off in [8, 10, 16, 24, 48, 56, 60, 70] {
                out.append(Case(cls: "header field edited", name: "\(h) offset \(off), checksum recomputed") { c in
                    var b = try self.bytes(c + h); b[off] ^= 0x01; try self.put(c + h, self.rechecksum(b))
                })
            }
            out.append(Case(cls: "foreign header copy", name: "\(h) from another volume, same passphrase, higher sequence") { c in
                let mine = try VolumeHeader.decode(try self.bytes(c + h))
                var other = try VolumeHeader.decode(try self.bytes(self.otherSame + "/xtsfs.header"))
                let (k, _) = try Keyring.unlock(other, with: PassphraseProvider(passphrase: SecretBytes(copying: Array(Self.passphrase.utf8))))
                other.sequence = mine.sequence + 3
                try self.put(c + h, try Keyring.seal(other, keys: k).encode())
            })
            out.append(Case(cls: "foreign header copy", name: "\(h) from another volume, other passphrase") { c in
                try self.put(c + h, try self.bytes(self.otherDifferent + "/xtsfs.header"))
            })
        }
        out.append(Case(cls: "file", name: "file header byte flipped") { c in
            let f = try self.bySize(c, 5032); var b = try self.bytes(f); b[9] ^= 0x40; try self.put(f, b)
        })
        out.append(Case(cls: "file", name: "file header bytes overwritten") { c in
            let f = try self.bySize(c, 5032); var b = try self.bytes(f); for i in 8..<16 { b[i] = 0xAA }; try self.put(f, b)
        })
        out.append(Case(cls: "file", name: "file truncated inside its header") { c in
            XCTAssertEqual(truncate(try self.bySize(c, 5032), 17), 0)
        })
        out.append(Case(cls: "file", name: "file truncated mid-unit", mayGarble: ["/a"]) { c in
            XCTAssertEqual(truncate(try self.bySize(c, 5032), 32 + 3001), 0)
        })
        out.append(Case(cls: "file", name: "content byte flipped", mayGarble: ["/dir/b"]) { c in
            let f = try self.bySize(try self.subdir(c), 10032); var b = try self.bytes(f); b[5000] ^= 1; try self.put(f, b)
        })
        out.append(Case(cls: "directory header", name: "xtsfs.dir byte flipped") { c in
            let d = try self.subdir(c) + "/xtsfs.dir"; var b = try self.bytes(d); b[25] ^= 0x08; try self.put(d, b)
        })
        out.append(Case(cls: "directory header", name: "xtsfs.dir overwritten") { c in
            let d = try self.subdir(c) + "/xtsfs.dir"; var b = try self.bytes(d); for i in 16..<48 { b[i] = 0 }; try self.put(d, b)
        })
        out.append(Case(cls: "directory header", name: "xtsfs.dir missing") { c in try FileManager.default.removeItem(atPath: try self.subdir(c) + "/xtsfs.dir") })
        out.append(Case(cls: "directory header", name: "xtsfs.dir truncated") { c in XCTAssertEqual(truncate(try self.subdir(c) + "/xtsfs.dir", 20), 0) })
        out.append(Case(cls: "directory header", name: "xtsfs.dir is a symlink to /etc/passwd") { c in
            let d = try self.subdir(c) + "/xtsfs.dir"; try FileManager.default.removeItem(atPath: d)
            try FileManager.default.createSymbolicLink(atPath: d, withDestinationPath: "/etc/passwd")
        })
        out.append(Case(cls: "directory header", name: "root xtsfs.dir byte flipped") { c in
            var b = try self.bytes(c + "/xtsfs.dir"); b[40] ^= 0x01; try self.put(c + "/xtsfs.dir", b)
        })
        out.append(Case(cls: "directory header", name: "root xtsfs.dir missing") { c in try FileManager.default.removeItem(atPath: c + "/xtsfs.dir") })
        out.append(Case(cls: "name", name: "one character changed") { c in
            let f = try self.bySize(c, 5032)
            var name = Array(URL(fileURLWithPath: f).lastPathComponent)
            name[10] = name[10] == "Q" ? "R" : "Q"
            try FileManager.default.moveItem(atPath: f, toPath: c + "/" + String(name))
        })
        out.append(Case(cls: "name", name: "non-canonical base64 (last character)") { c in
            let f = try self.bySize(c, 5032)
            var name = Array(URL(fileURLWithPath: f).lastPathComponent)
            // 43 characters encode 32 bytes: the last one carries 2 unused low bits.
            let alphabet = Array("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")
            let v = alphabet.firstIndex(of: name[name.count - 1])!
            name[name.count - 1] = alphabet[v ^ 1]
            try FileManager.default.moveItem(atPath: f, toPath: c + "/" + String(name))
        })
        out.append(Case(cls: "name", name: "name moved to another directory") { c in
            let f = try self.bySize(c, 5032)
            try FileManager.default.moveItem(atPath: f, toPath: try self.subdir(c) + "/" + URL(fileURLWithPath: f).lastPathComponent)
        })
        out.append(Case(cls: "long name", name: "side file removed") { c in try FileManager.default.removeItem(atPath: try self.longEntry(c) + ".name") })
        out.append(Case(cls: "long name", name: "side file altered") { c in
            let s = try self.longEntry(c) + ".name"; var b = try self.bytes(s); b[100] = b[100] == 65 ? 66 : 65; try self.put(s, b)
        })
        out.append(Case(cls: "long name", name: "side file is a FIFO") { c in
            let s = try self.longEntry(c) + ".name"; try FileManager.default.removeItem(atPath: s); XCTAssertEqual(mkfifo(s, 0o644), 0)
        })
        out.append(Case(cls: "long name", name: "entry removed, side file left") { c in try FileManager.default.removeItem(atPath: try self.longEntry(c)) })
        out.append(Case(cls: "foreign", name: "Syncthing conflict copy of a file") { c in
            let f = try self.bySize(c, 5032); try FileManager.default.copyItem(atPath: f, toPath: f + ".sync-conflict-20260102-030405-ABCDEFG")
        })
        out.append(Case(cls: "foreign", name: "Dropbox conflict copy of a directory") { c in
            let d = try self.subdir(c); XCTAssertEqual(Harness.shell("cp -a \"\(d)\" \"\(d) (laptop's conflicted copy 2026-01-02)\""), 0)
        })
        out.append(Case(cls: "foreign", name: ".DS_Store") { c in try self.write(c + "/.DS_Store", [0, 0, 0, 1]) })
        out.append(Case(cls: "foreign", name: "FIFO with a foreign name") { c in XCTAssertEqual(mkfifo(c + "/pipe", 0o644), 0) })
        out.append(Case(cls: "foreign", name: "FIFO with an encrypted-looking name") { c in
            XCTAssertEqual(mkfifo(c + "/" + String(repeating: "Q", count: 43), 0o644), 0)
        })
        out.append(Case(cls: "foreign", name: "symlink out of CIPHERDIR") { c in
            try FileManager.default.createSymbolicLink(atPath: c + "/escape", withDestinationPath: "/etc")
            try FileManager.default.createSymbolicLink(atPath: c + "/" + String(repeating: "w", count: 43), withDestinationPath: "/etc/passwd")
        })
        out.append(Case(cls: "leftover", name: ".tmp leftovers and orphaned link-store file") { c in
            try self.write(c + "/xtsfs.header.tmp", [1, 2])
            try self.write(try self.subdir(c) + "/xtsfs.dir.tmp", [3])
            try self.write(c + "/xtsfs.links/" + String(repeating: "Z", count: 43), [4])
        })
        out.append(Case(cls: "symlink", name: "stored target altered") { c in
            let store = c + "/xtsfs.links"
            guard let f = self.files(store).first else { throw XCTSkip("no stored target") }
            var b = try self.bytes(store + "/" + f); b[10] = b[10] == 65 ? 66 : 65; try self.put(store + "/" + f, b)
        })
        // Random damage, seeded: bit flips and truncations of any backing file.
        var rng = SystemRandomNumberGenerator()
        for n in 0..<random {
            let seed = UInt64.random(in: 0...UInt64.max, using: &rng)
            out.append(Case(cls: "random", name: "random damage #\(n) seed \(seed)", mayGarble: Set(expected.keys)) { c in
                var g = SplitMix(seed)
                var all: [String] = []
                let e = FileManager.default.enumerator(atPath: c)
                while let rel = e?.nextObject() as? String { if self.size(c + "/" + rel) != nil { all.append(rel) } }
                all.sort()
                guard !all.isEmpty else { return }
                let f = c + "/" + all[Int(g.next() % UInt64(all.count))]
                var b = try self.bytes(f)
                if b.isEmpty { return }
                if g.next() % 4 == 0 { b = Array(b.prefix(Int(g.next() % UInt64(b.count)))) } else { let i = Int(g.next() % UInt64(b.count)); b[i] ^= UInt8(1 << (g.next() % 8)) }
                try self.put(f, b)
            })
        }
        return out
    }

    struct SplitMix {
        var s: UInt64
        init(_ seed: UInt64) { s = seed }
        mutating func next() -> UInt64 { s &+= 0x9E3779B97F4A7C15; var z = s; z = (z ^ (z >> 30)) &* 0xBF58476D1CE4E5B9; z = (z ^ (z >> 27)) &* 0x94D049BB133111EB; return z ^ (z >> 31) }
    }

    // MARK: - one case

    func readTree() -> [String: String]? {
        let o = run("/usr/bin/python3", [reader, mnt], timeout: 60)
        if o.hung { return nil }
        return (try? JSONSerialization.jsonObject(with: Data(o.stdout.utf8))) as? [String: String] ?? [:]
    }

    func note(_ c: Case, _ what: String) {
        violations.append("\(c.cls) / \(c.name): \(what)")
    }

    func check(_ c: Case, tree: [String: String], stage: String) -> Set<String> {
        var readable = Set<String>()
        for (path, want) in expected {
            guard let got = tree[path], got.hasPrefix("ok ") else { continue }
            if got == "ok " + want { readable.insert(path) } else if !c.mayGarble.contains(path) {
                note(c, "\(stage): \(path) read as wrong data without an error")
            }
        }
        return readable
    }

    /// Every backing name, type, size, mode and file content hash: what a check must not change.
    func treeSnapshot() -> String {
        let o = run("/bin/sh", ["-c", "cd '\(cipher)' && find . -printf '%p %y %s %m\\n' | sort && find . -type f -exec sha256sum {} + | sort"])
        return o.stdout
    }

    func unmountQuietly() {
        if Harness.isMounted(mnt) {
            let u = xtsfs(["unmount", mnt])
            if u.status != 0 { Harness.shell("fusermount3 -u -z '\(mnt)'") }
        }
        let deadline = Date().addingTimeInterval(10)
        while !Harness.daemons(mnt).isEmpty && Date() < deadline { usleep(20_000) }
    }

    func runCase(_ c: Case) {
        var o: [String: String] = [:]
        Harness.shell("rm -rf '\(cipher)' && cp -a '\(base)' '\(cipher)'")
        do { try c.mutate(cipher) } catch { o["setup"] = "skipped: \(error)"; rows.append((c.cls, c.name, o)); return }
        func record(_ key: String, _ r: Outcome) {
            o[key] = r.hung ? "HANG" : r.crashed ? "CRASH" : "\(r.status)"
            if r.hung { note(c, "\(key) hung") }
            if r.crashed { note(c, "\(key) crashed: \(r.stderr.suffix(300))") }
        }
        record("status", xtsfs(["status", cipher]))
        let m1 = xtsfs(["mount", cipher, mnt, "--passfile", passfile])
        record("mount", m1)
        var readableBefore = Set<String>()
        var wrote = false
        if m1.status == 0 && Harness.isMounted(mnt) {
            if let tree = readTree() {
                readableBefore = check(c, tree: tree, stage: "first mount")
                o["readable"] = "\(readableBefore.count)/\(expected.count)"
            } else { note(c, "reading the mount hung"); o["readable"] = "HANG" }
            wrote = (try? write(mnt + "/campaign-new", pattern(7000, seed: 9))) != nil && (try? read(mnt + "/campaign-new")) == pattern(7000, seed: 9)
            o["write"] = wrote ? "ok" : "failed"
            unmountQuietly()
            if Harness.isMounted(mnt) { note(c, "unmount failed") }
        }
        let before = treeSnapshot()
        let f1 = xtsfs(["fsck", cipher, "--passfile", passfile])
        record("fsck", f1)
        if treeSnapshot() != before { note(c, "fsck without --repair changed CIPHERDIR") }
        let f2 = xtsfs(["fsck", cipher, "--repair", "--passfile", passfile])
        record("repair", f2)
        if ![0, 1, 4, 5, 8].contains(f2.status) { note(c, "fsck --repair exit \(f2.status): \(f2.stderr)") }
        if f2.status == 1 {
            let f3 = xtsfs(["fsck", cipher, "--passfile", passfile])
            record("after", f3)
            if f3.status != 0 { note(c, "fsck --repair said all corrected, but a new fsck exits \(f3.status): \(f3.stdout.suffix(600))") }
        }
        let m2 = xtsfs(["mount", cipher, mnt, "--passfile", passfile])
        record("remount", m2)
        if m1.status == 0 && m2.status != 0 { note(c, "mounted before fsck --repair, not after: \(m2.stderr)") }
        if m2.status == 0 && Harness.isMounted(mnt) {
            if let tree = readTree() {
                let readableAfter = check(c, tree: tree, stage: "after repair")
                // Quarantined entries move into /lost+found: what was readable stays readable somewhere.
                let lostHashes = Set(tree.filter { $0.key.hasPrefix("/lost+found/") }.values)
                for p in readableBefore.subtracting(readableAfter) where !lostHashes.contains("ok " + expected[p]!) {
                    note(c, "\(p) was readable before fsck --repair and is not after")
                }
                o["readable after"] = "\(readableAfter.count)/\(expected.count)"
                if wrote && tree["/campaign-new"] == nil && !lostHashes.contains("ok " + SHA256.hash(pattern(7000, seed: 9)).map { String(format: "%02x", $0) }.joined()) {
                    note(c, "a file written through the mount was lost by fsck --repair")
                }
            } else { note(c, "reading the mount after repair hung") }
            unmountQuietly()
        }
        rows.append((c.cls, c.name, o))
    }

    func testCampaign() throws {
        let wanted = Int(ProcessInfo.processInfo.environment["XTSFS_CORRUPT_CASES"] ?? "") ?? 0
        try makeBase()
        let fixed = cases(random: 0).count
        let all = cases(random: max(0, wanted - fixed))
        for c in all { runCase(c) }
        printTable()
        XCTAssertTrue(violations.isEmpty, "violations:\n" + violations.joined(separator: "\n"))
    }

    func printTable() {
        var text = "\nCorruption campaign: \(rows.count) cases\n"
        let keys = ["status", "mount", "readable", "write", "fsck", "repair", "after", "remount", "readable after"]
        text += "case".padding(toLength: 70, withPad: " ", startingAt: 0) + keys.map { $0.padding(toLength: 9, withPad: " ", startingAt: 0) }.joined(separator: " ") + "\n"
        for r in rows {
            let label = String((r.cls + ": " + r.name).prefix(69)).padding(toLength: 70, withPad: " ", startingAt: 0)
            if let s = r.outcome["setup"] { text += label + s + "\n"; continue }
            text += label + keys.map { (r.outcome[$0] ?? "-").padding(toLength: 9, withPad: " ", startingAt: 0) }.joined(separator: " ") + "\n"
        }
        // Class × outcome summary.
        text += "\nBy class (cases; mounted before repair; fsck --repair exit codes; mounted after):\n"
        var classes: [String] = []
        for r in rows where !classes.contains(r.cls) { classes.append(r.cls) }
        for cls in classes {
            let rs = rows.filter { $0.cls == cls && $0.outcome["setup"] == nil }
            let mounted = rs.filter { $0.outcome["mount"] == "0" }.count
            let after = rs.filter { $0.outcome["remount"] == "0" }.count
            var codes: [String: Int] = [:]
            for r in rs { codes[r.outcome["repair"] ?? "-", default: 0] += 1 }
            text += "  " + cls.padding(toLength: 22, withPad: " ", startingAt: 0) + "\(rs.count) cases; mounted \(mounted); repair " +
                codes.keys.sorted().map { "exit \($0)×\(codes[$0]!)" }.joined(separator: " ") + "; mounted after \(after)\n"
        }
        text += "Violations: \(violations.count)\n"
        print(text)
        if let path = ProcessInfo.processInfo.environment["XTSFS_CORRUPT_TABLE"] { try? text.write(toFile: path, atomically: true, encoding: .utf8) }
    }
}
