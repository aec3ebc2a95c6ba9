import Foundation
import XCTest
#if canImport(Glibc)
import Glibc
#endif

/// `rekey --dek` of a mounted volume: the daemon sweeps while a writer and a reader work
/// on the mount; the daemon killed at several points of its sweep, the volume remounted
/// and the rekey resumed. Trees are compared with scripts/tree-manifest.py (SHA-256,
/// names, symlink targets, xattrs, hard-link groups).
class OnlineRekeyTests: VolumeTestCase {
    func manifest(_ dir: String, excluding: String? = nil) -> String {
        RekeyTests.sh("python3 '\(RekeyTests.repoRoot)/scripts/tree-manifest.py' '\(dir)'" + (excluding.map { " --exclude '\($0)'" } ?? ""))
    }

    /// Starts xtsfs (or python3 with a script) in the background with extra environment.
    func spawn(_ executable: String, _ args: [String], env: [String: String] = [:], stdout: Pipe? = nil) throws -> Process {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: executable)
        p.arguments = args
        p.environment = ProcessInfo.processInfo.environment.merging(env) { $1 }
        p.standardOutput = stdout ?? FileHandle.nullDevice
        p.standardError = FileHandle.nullDevice
        p.standardInput = FileHandle.nullDevice
        try p.run()
        return p
    }

    func run(_ args: [String], env: [String: String]) -> Int32 {
        guard let p = try? spawn(Harness.binary, args, env: env) else { return -1000 }
        p.waitUntilExit()
        return p.terminationReason == .uncaughtSignal ? -p.terminationStatus : p.terminationStatus
    }

    /// Waits for `condition` (a guard against a hang, not a timing check: 120 s).
    func waitFor(_ what: String, _ condition: () -> Bool) -> Bool {
        let deadline = Date().addingTimeInterval(120)
        while !condition() {
            if Date() > deadline { XCTFail("gave up waiting for \(what)"); return false }
            usleep(20_000)
        }
        return true
    }

    func number(_ path: String) -> Int {
        (try? String(contentsOfFile: path, encoding: .utf8)).flatMap { Int($0.trimmingCharacters(in: .whitespacesAndNewlines)) } ?? 0
    }

    static let readerScript = """
    import os, subprocess, sys
    manifest, mnt, baseline, stop, count = sys.argv[1:]
    base = open(baseline).read()
    n = 0
    while not os.path.exists(stop):
        out = subprocess.run([sys.executable, manifest, mnt, "--exclude", "live"], capture_output=True, text=True)
        if out.returncode != 0 or out.stdout != base:
            open(count + ".mismatch", "w").write(out.stdout + out.stderr)
            sys.exit(1)
        n += 1
        open(count + ".tmp", "w").write(str(n))
        os.rename(count + ".tmp", count)
    """

    static let writerScript = """
    import os, sys, time
    live, scratch = sys.argv[1:]
    # A file held open for writing until told: the sweep must leave it for a later pass.
    held = open(live + "/held", "ab", buffering=0)
    held.write(b"held-open\\n")
    # A file kept open for reading all along (its keys stay loaded in the daemon) and
    # appended to through other opens, also after the sweep rewrote it.
    reading = open(live + "/ro", "rb")
    open(scratch + "/writer-ready", "w").close()
    i = 0
    while not os.path.exists(scratch + "/release"):
        i += 1
        held.write(b"h %d\\n" % i)
        time.sleep(0.002)
    held.close()
    j = 0
    while not os.path.exists(scratch + "/stop"):
        j += 1
        # Appends to a file of the old generation, new files renamed over each other with
        # xattrs, and old files renamed back and forth.
        with open(live + "/old", "ab") as f:
            f.write(b"old %d\\n" % j)
        with open(live + "/ro", "ab") as f:
            f.write(b"ro %d\\n" % j)
        reading.seek(0)
        reading.read()
        with open(live + "/tmp", "wb") as f:
            f.write(b"%d\\n" % j)
        os.setxattr(live + "/tmp", "user.n", b"%d" % j)
        os.rename(live + "/tmp", live + "/n%d" % (j % 7))
        k = j % 20
        a, b = live + "/mv/f%d" % k, live + "/mv/g%d" % k
        if os.path.exists(a):
            os.rename(a, b)
        else:
            os.rename(b, a)
        open(scratch + "/writer-count.tmp", "w").write(str(j))
        os.rename(scratch + "/writer-count.tmp", scratch + "/writer-count")
    reading.close()
    open(scratch + "/writer-done", "w").write("%d %d" % (i, j))
    """

    /// The online rekey while a writer loop and a reader loop run on the mount. The writer
    /// holds one file open for writing until the rekey reports waiting for it (so the
    /// retry is exercised, whatever the timing), then appends to an old file, renames new
    /// files over each other and old files back and forth. The reader compares the rest of
    /// the tree with its manifest again and again. Afterwards: the tree, the writer's files
    /// as its counters say they must be, and all of it again after a remount.
    func testOnlineRekeyWithWriterAndReaderLoops() throws {
        initVolume()
        mount()
        try populateRekeyTree()
        let live = mnt + "/live"
        XCTAssertEqual(Glibc.mkdir(live, 0o755), 0)
        XCTAssertEqual(Glibc.mkdir(live + "/mv", 0o755), 0)
        for k in 0..<20 { try write(live + "/mv/f\(k)", pattern(1000 + k, seed: UInt64(k))) }
        // Not empty: an empty file has no header, and its first write would make it new.
        try write(live + "/old", Array("start\n".utf8))
        try write(live + "/ro", Array("start\n".utf8))
        let before = manifest(mnt, excluding: "live")
        XCTAssertFalse(before.isEmpty)
        let baseline = scratch + "/baseline", count = scratch + "/reader-count"
        try before.write(toFile: baseline, atomically: true, encoding: .utf8)
        let readerPy = scratch + "/reader.py", writerPy = scratch + "/writer.py"
        try Self.readerScript.write(toFile: readerPy, atomically: true, encoding: .utf8)
        try Self.writerScript.write(toFile: writerPy, atomically: true, encoding: .utf8)
        let stopFile = scratch + "/stop"
        let reader = try spawn("/usr/bin/python3", [readerPy, RekeyTests.repoRoot + "/scripts/tree-manifest.py", mnt, baseline, stopFile, count])
        let writer = try spawn("/usr/bin/python3", [writerPy, live, scratch])
        defer {
            // Whatever happened, the loops end before the mount goes.
            _ = FileManager.default.createFile(atPath: stopFile, contents: nil)
            _ = FileManager.default.createFile(atPath: scratch + "/release", contents: nil)
            reader.waitUntilExit()
            writer.waitUntilExit()
        }
        guard waitFor("the loops to start", { FileManager.default.fileExists(atPath: scratch + "/writer-ready") && number(count) >= 1 || !reader.isRunning }) else { return }
        XCTAssertTrue(reader.isRunning, (try? String(contentsOfFile: count + ".mismatch", encoding: .utf8)) ?? "reader stopped")

        let out = Pipe()
        let rekey = try spawn(Harness.binary, ["rekey", cipher, "--dek", "--passfile", passfile, "--json"], stdout: out)
        var events = ""
        var buffer = Data()
        var released = false
        while true {
            let chunk = out.fileHandleForReading.availableData
            if chunk.isEmpty { break }
            buffer.append(chunk)
            while let nl = buffer.firstIndex(of: UInt8(ascii: "\n")) {
                let line = String(decoding: buffer[buffer.startIndex..<nl], as: UTF8.self)
                buffer.removeSubrange(buffer.startIndex...nl)
                events += line + "\n"
                if !released && line.contains("waiting for") {
                    // The sweep left the held file for later: let it go, and see a reader
                    // pass complete in the middle of the rekey.
                    let n = number(count)
                    _ = waitFor("a reader pass during the rekey") { number(count) > n || !reader.isRunning }
                    let status = Harness.run(["status", cipher]).stdout
                    XCTAssertTrue(status.contains("running online"), status)
                    _ = FileManager.default.createFile(atPath: scratch + "/release", contents: nil)
                    released = true
                }
            }
        }
        rekey.waitUntilExit()
        XCTAssertEqual(rekey.terminationStatus, 0, events)
        XCTAssertTrue(released, "the rekey never reported waiting for the file open for writing: \(events)")
        XCTAssertTrue(events.contains("\"event\":\"finished\""), events)
        // The writer goes on a little with every file rewritten under the new key.
        let done = number(scratch + "/writer-count")
        _ = waitFor("the writer after the rekey") { number(scratch + "/writer-count") > done + 2 || !writer.isRunning }

        _ = FileManager.default.createFile(atPath: stopFile, contents: nil)
        reader.waitUntilExit()
        writer.waitUntilExit()
        XCTAssertEqual(reader.terminationStatus, 0, (try? String(contentsOfFile: count + ".mismatch", encoding: .utf8)) ?? "")
        XCTAssertEqual(writer.terminationStatus, 0)
        XCTAssertGreaterThanOrEqual(number(count), 2)

        func checkTree(_ when: String) throws {
            XCTAssertEqual(manifest(mnt, excluding: "live"), before, when)
            let counts = ((try? String(contentsOfFile: scratch + "/writer-done", encoding: .utf8)) ?? "").split(separator: " ").compactMap { Int($0) }
            guard counts.count == 2 else { return XCTFail("the writer did not finish") }
            let (i, j) = (counts[0], counts[1])
            XCTAssertEqual(String(decoding: try read(live + "/held"), as: UTF8.self),
                           "held-open\n" + (0..<i).map { "h \($0 + 1)\n" }.joined(), when)
            XCTAssertEqual(String(decoding: try read(live + "/old"), as: UTF8.self), "start\n" + (0..<j).map { "old \($0 + 1)\n" }.joined(), when)
            XCTAssertEqual(String(decoding: try read(live + "/ro"), as: UTF8.self), "start\n" + (0..<j).map { "ro \($0 + 1)\n" }.joined(), when)
            for k in 0..<7 {
                let last = stride(from: j, through: 1, by: -1).first { $0 % 7 == k }
                guard let last else { XCTAssertFalse(FileManager.default.fileExists(atPath: live + "/n\(k)"), when); continue }
                XCTAssertEqual(String(decoding: try read(live + "/n\(k)"), as: UTF8.self), "\(last)\n", when)
                var value = [UInt8](repeating: 0, count: 64)
                let n = getxattr(live + "/n\(k)", "user.n", &value, 64)
                XCTAssertEqual(n > 0 ? String(decoding: value[0..<n], as: UTF8.self) : "", "\(last)", when)
            }
            for k in 0..<20 {
                // Toggled once per iteration j with j % 20 == k.
                let toggles = j >= k ? (j - k) / 20 + (k == 0 ? 0 : 1) : 0
                let name = toggles % 2 == 0 ? "f\(k)" : "g\(k)"
                XCTAssertEqual(try read(live + "/mv/" + name), pattern(1000 + k, seed: UInt64(k)), "\(when): mv/\(name)")
            }
        }
        try checkTree("after the online rekey")
        unmount()
        let status = Harness.run(["status", cipher]).stdout
        XCTAssertTrue(status.contains("Key generation:  2") && status.contains("Rekey:           none"), status)
        mount()
        try checkTree("after a remount")
        unmount()
    }

    /// Events of a `rekey --json` until one contains `marker` (or the command ends).
    func readEvents(_ out: Pipe, until marker: String) -> String {
        var events = ""
        var buffer = Data()
        while !events.contains(marker) {
            let chunk = out.fileHandleForReading.availableData
            if chunk.isEmpty { break }
            buffer.append(chunk)
            while let nl = buffer.firstIndex(of: UInt8(ascii: "\n")) {
                events += String(decoding: buffer[buffer.startIndex..<nl], as: UTF8.self) + "\n"
                buffer.removeSubrange(buffer.startIndex...nl)
            }
        }
        return events
    }

    /// Interrupting the command (Ctrl-C) leaves the daemon's sweep running: it finishes by
    /// itself, writes the final header, and `status` shows it running, then done.
    func testOnlineRekeyGoesOnWhenTheCommandIsInterrupted() throws {
        initVolume()
        mount()
        try populateRekeyTree()
        let before = manifest(mnt)
        // Something open for writing holds the sweep back until released.
        let holder = scratch + "/holder.py"
        try """
        import os, sys, time
        f = open(sys.argv[1], "ab")
        open(sys.argv[2] + "/holding", "w").close()
        while not os.path.exists(sys.argv[2] + "/release"):
            time.sleep(0.01)
        f.close()
        """.write(toFile: holder, atomically: true, encoding: .utf8)
        let held = try spawn("/usr/bin/python3", [holder, mnt + "/tiny", scratch])
        defer {
            _ = FileManager.default.createFile(atPath: scratch + "/release", contents: nil)
            held.waitUntilExit()
        }
        guard waitFor("the holder", { FileManager.default.fileExists(atPath: scratch + "/holding") }) else { return }
        let out = Pipe()
        let rekey = try spawn(Harness.binary, ["rekey", cipher, "--dek", "--passfile", passfile, "--json"], stdout: out)
        let events = readEvents(out, until: "waiting for")
        XCTAssertTrue(events.contains("waiting for"), events)
        kill(rekey.processIdentifier, SIGINT)
        rekey.waitUntilExit()
        XCTAssertEqual(rekey.terminationReason, .uncaughtSignal)
        let running = Harness.run(["status", cipher]).stdout
        XCTAssertTrue(running.contains("running online"), running)
        _ = FileManager.default.createFile(atPath: scratch + "/release", contents: nil)
        held.waitUntilExit()
        _ = waitFor("the daemon to finish the rekey by itself") { Harness.run(["status", cipher]).stdout.contains("Rekey:           none") }
        XCTAssertEqual(manifest(mnt), before)
        unmount()
        let status = Harness.run(["status", cipher]).stdout
        XCTAssertTrue(status.contains("Key generation:  2"), status)
        mount()
        XCTAssertEqual(manifest(mnt), before)
        unmount()
    }

    /// The daemon killed (its own SIGKILL, `XTSFS_REKEY_FAILPOINT` in the mount's
    /// environment) at points spread over its sweep, from the first step to the one after
    /// verification; each time the volume is remounted (it mounts mid-rekey and reads
    /// back whole), the same command resumes online, and the tree is compared.
    func testOnlineRekeyDaemonKilledThenRemountedResumes() throws {
        initVolume()
        mount()
        try populateRekeyTree()
        let before = manifest(mnt)
        unmount()
        let template = scratch + "/template"
        XCTAssertEqual(RekeyTests.sh("cp -a '\(cipher)' '\(template)' && echo ok").trimmingCharacters(in: .whitespacesAndNewlines), "ok")
        // The sweep's steps, counted on an offline rekey of a copy: the daemon takes the
        // same ones, less the header's (two for the record, two for the final header).
        let probe = scratch + "/probe"
        XCTAssertEqual(RekeyTests.sh("cp -a '\(template)' '\(probe)' && echo ok").trimmingCharacters(in: .whitespacesAndNewlines), "ok")
        let trace = RekeyTests.sh("XTSFS_REKEY_TRACE=1 '\(Harness.binary)' rekey '\(probe)' --dek --passfile '\(passfile)' 2>&1")
        let steps = trace.split(separator: "\n").filter { $0.hasPrefix("rekey step ") }.count - 4
        XCTAssertGreaterThan(steps, 8, trace)
        let points = Array(Set([1, 2, steps / 4, steps / 2, 3 * steps / 4, steps - 1, steps])).filter { $0 >= 1 }.sorted()
        for point in points {
            XCTAssertEqual(RekeyTests.sh("rm -rf '\(cipher)' && cp -a '\(template)' '\(cipher)' && echo ok").trimmingCharacters(in: .whitespacesAndNewlines), "ok")
            XCTAssertEqual(run(["mount", cipher, mnt, "--passfile", passfile], env: ["XTSFS_REKEY_FAILPOINT": "\(point)"]), 0, "point \(point)")
            let r = Harness.run(["rekey", cipher, "--dek", "--passfile", passfile])
            XCTAssertNotEqual(r.status, 0, "point \(point): the daemon was not killed: \(r.stderr)")
            _ = waitFor("the killed daemon to go") { Harness.daemons(mnt).isEmpty }
            Harness.forceUnmount(mnt)
            let s = Harness.run(["status", cipher]).stdout
            XCTAssertTrue(s.contains("interrupted or running"), "point \(point): \(s)")
            // Mounted again in the middle of the rekey: whole.
            mount()
            XCTAssertEqual(manifest(mnt), before, "point \(point): mounted after the kill")
            let again = Harness.run(["rekey", cipher, "--dek", "--passfile", passfile])
            XCTAssertEqual(again.status, 0, "point \(point): the resumed online rekey failed: \(again.stderr)")
            XCTAssertTrue(again.stderr.contains("(resumed)"), again.stderr)
            XCTAssertEqual(manifest(mnt), before, "point \(point): after the resumed rekey")
            unmount()
            let after = Harness.run(["status", cipher]).stdout
            XCTAssertTrue(after.contains("Key generation:  2") && after.contains("Rekey:           none"), "point \(point): \(after)")
            mount()
            XCTAssertEqual(manifest(mnt), before, "point \(point): remounted with the new key only")
            unmount()
        }
    }

    /// The offline sweep is never run on a mounted volume: with the mount read-only (no
    /// online rekey there) the command is refused and nothing changes.
    func testRekeyOfReadOnlyMountRefusedAndNothingChanges() throws {
        initVolume()
        mount()
        try write(mnt + "/f", pattern(5000, seed: 1))
        unmount()
        mount(["-o", "ro"])
        func snapshot() -> [String] { backingFiles().map { $0.path + " " + $0.bytes.map { String($0) }.joined(separator: ",") }.sorted() }
        let before = snapshot()
        let r = Harness.run(["rekey", cipher, "--dek", "--passfile", passfile])
        XCTAssertEqual(r.status, 15, r.stderr)
        XCTAssertEqual(try read(mnt + "/f"), pattern(5000, seed: 1))
        unmount()
        XCTAssertEqual(snapshot(), before)
        let status = Harness.run(["status", cipher]).stdout
        XCTAssertTrue(status.contains("Key generation:  1") && status.contains("Rekey:           none"), status)
    }
}
