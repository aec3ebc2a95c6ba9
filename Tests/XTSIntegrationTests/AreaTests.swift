import Foundation
import XCTest
import XTSCrypto
import XTSFormat
import XTSKeys
@testable import XTSVolume
#if canImport(Glibc)
import Glibc
#endif

/// The temp and cache areas (`--tmp`, `--cache`) served by the data mount's daemon, and a
/// daemon that leaks nothing: crashed with SIGKILL and SIGABRT while an application writes
/// through all three areas, no file it could have written holds a plaintext marker or key
/// bytes, and in its live memory key bytes appear only in locked, undumpable mappings.
final class AreaTests: VolumeTestCase {
    var marker = ""
    var started = time(nil)

    override func setUpWithError() throws {
        try super.setUpWithError()
        try FileManager.default.createDirectory(atPath: tmpMnt, withIntermediateDirectories: true)
        try FileManager.default.createDirectory(atPath: cacheMnt, withIntermediateDirectories: true)
        marker = "XTSFS-AREA-MARKER-" + String(UInt64.random(in: 1...UInt64.max), radix: 36)
        started = time(nil) - 1
    }

    /// Mounts the three areas with `--env`; returns the environment it printed.
    func mountAreas(_ extra: [String] = [], file: StaticString = #filePath, line: UInt = #line) -> [String: String] {
        let r = Harness.run(["mount", cipher, mnt, "--passfile", passfile, "--tmp", tmpMnt, "--cache", cacheMnt, "--env"] + extra)
        XCTAssertEqual(r.status, 0, "mount failed: \(r.stderr)", file: file, line: line)
        for mp in [mnt, tmpMnt, cacheMnt] { XCTAssertTrue(Harness.isMounted(mp), "\(mp) not mounted", file: file, line: line) }
        var env: [String: String] = [:]
        for l in r.stdout.split(separator: "\n") where l.contains("=") && !l.hasPrefix("export") {
            let parts = l.split(separator: "=", maxSplits: 1)
            env[String(parts[0])] = String(parts[1]).trimmingCharacters(in: CharacterSet(charactersIn: "'"))
        }
        return env
    }

    /// An application: `script` under /bin/sh with TMPDIR and XDG_CACHE_HOME from `--env`.
    func app(_ env: [String: String], _ script: String) -> Process {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: "/bin/sh")
        p.arguments = ["-c", script]
        var e = ProcessInfo.processInfo.environment
        for (k, v) in env { e[k] = v }
        e["MARKER"] = marker
        e["DATA"] = mnt
        p.environment = e
        p.standardInput = FileHandle.nullDevice
        p.standardOutput = FileHandle.nullDevice
        p.standardError = FileHandle.nullDevice
        return p
    }

    /// Writes the marker through all three areas in a loop until killed or the mounts die.
    /// Writes through descriptors opened once, on the mounts: once the daemon is gone its
    /// writes fail (ENOTCONN) and it stops. (Appending by path reopened the names each
    /// time; after the unmount helper cleared the mounts, the names led to the empty
    /// directories below them, and the writer put its marker on the disk.)
    static let writerScript = """
        t=$(mktemp) || exit 1
        mkdir -p "$XDG_CACHE_HOME/app" || exit 1
        exec 3>>"$t" 4>>"$XDG_CACHE_HOME/app/log" 5>>"$DATA/log" || exit 1
        i=0
        while [ $i -lt 100000 ]; do
          echo "$MARKER temp $i" >&3 || exit 0
          echo "$MARKER cache $i" >&4 || exit 0
          echo "$MARKER data $i" >&5 || exit 0
          i=$((i+1))
        done
        """

    func waitUnmounted(_ mps: [String], seconds: Double = 10) -> Bool {
        let deadline = Date().addingTimeInterval(seconds)
        while mps.contains(where: Harness.isMounted) && Date() < deadline { usleep(20_000) }
        return !mps.contains(where: Harness.isMounted)
    }

    // MARK: - key bytes

    func volumeKeys() throws -> KeySet {
        let provider = PassphraseProvider(passphrase: SecretBytes(copying: Array(Self.passphrase.utf8)))
        return try Volume.unlock(cipher, provider: provider).keys
    }

    func cacheKeys(_ volume: KeySet) throws -> KeySet? {
        let fd = open(cipher, O_RDONLY | O_DIRECTORY)
        defer { close(fd) }
        return try Areas.loadCacheKey(fd, volumeKeys: volume, log: { _ in })
    }

    /// Every key of a set, and each 32-byte half of a 64-byte key: an AES-256 key
    /// schedule starts with the key itself, so a lingering schedule shows up too.
    func needles(_ keys: KeySet) -> [(String, [UInt8])] {
        var out: [(String, [UInt8])] = []
        for (name, s) in [("dek", keys.dek), ("content", keys.contentKey), ("names", keys.nameKey),
                          ("metadata mac", keys.metadataMACKey), ("header mac", keys.headerMACKey)] {
            let b = s.withUnsafeBytes { Array($0) }
            out.append((name, b))
            if b.count == 64 { out += [(name + " 1st half", Array(b[0..<32])), (name + " 2nd half", Array(b[32...]))] }
        }
        return out
    }

    /// The XTS key halves of every file under a backing directory (from its nonce).
    func fileKeyNeedles(_ dir: String, _ keys: KeySet) -> [(String, [UInt8])] {
        var out: [(String, [UInt8])] = []
        let e = FileManager.default.enumerator(atPath: dir)
        while let rel = e?.nextObject() as? String {
            if (rel as NSString).lastPathComponent.hasPrefix("xtsfs.") { continue }
            guard let d = FileManager.default.contents(atPath: dir + "/" + rel), d.count >= FileHeader.length else { continue }
            let nonce = Array([UInt8](d)[8..<24])
            guard let k = try? HKDF.derive(key: keys.contentKey, salt: [], info: Array("xtsfs v1 file key".utf8) + nonce, count: 64) else { continue }
            let b = k.withUnsafeBytes { Array($0) }
            out += [("file key of \(rel) 1st half", Array(b[0..<32])), ("file key of \(rel) 2nd half", Array(b[32...]))]
        }
        return out
    }

    // MARK: - searching files

    /// Paths of every regular file under `roots` changed since the test started (mount
    /// points and other filesystems' mounts skipped: another test's daemon may hang).
    func recentFiles(_ roots: [String]) -> [String] {
        let mounts = Set(MountEntryList.mountpoints())
        var out: [String] = []
        func walk(_ path: String, _ depth: Int) {
            guard depth < 32, !mounts.contains(path) || roots.contains(path) else { return }
            var st = stat()
            guard lstat(path, &st) == 0 else { return }
            if st.st_mode & S_IFMT == S_IFDIR {
                guard let names = try? FileManager.default.contentsOfDirectory(atPath: path) else { return }
                for n in names { walk(path == "/" ? "/" + n : path + "/" + n, depth + 1) }
            } else if st.st_mode & S_IFMT == S_IFREG && st.st_mtim.tv_sec >= started && st.st_size < 64 << 20 {
                out.append(path)
            }
        }
        for r in roots { walk(r, 0) }
        return out
    }

    /// What of `needles` (and the marker) appears in those files.
    func search(_ files: [String], _ needles: [(String, [UInt8])]) -> [String] {
        let all = needles + [("marker", Array(marker.utf8))]
        var hits: [String] = []
        for f in files {
            guard let d = FileManager.default.contents(atPath: f) else { continue }
            let bytes = [UInt8](d)
            for (name, n) in all where contains(bytes, bytes.count, n) { hits.append("\(name) in \(f)") }
        }
        return hits
    }

    /// Where a daemon could have written: CIPHERDIR (with the temp backing in it), /tmp,
    /// the core pattern's target, the logs.
    func searchRoots() -> [String] {
        var roots = [cipher, "/tmp", "/var/log", "/var/lib/systemd/coredump", "/var/crash"]
        let pattern = (try? String(contentsOfFile: "/proc/sys/kernel/core_pattern", encoding: .utf8))?.trimmingCharacters(in: .whitespacesAndNewlines) ?? "core"
        if pattern.hasPrefix("/") { roots.append((pattern as NSString).deletingLastPathComponent) }
        // A relative pattern lands in the crashing process's directory: the daemon's is /.
        if !pattern.hasPrefix("/") && !pattern.hasPrefix("|") { roots += ((try? FileManager.default.contentsOfDirectory(atPath: "/")) ?? []).filter { $0.hasPrefix("core") }.map { "/" + $0 } }
        return roots.filter { FileManager.default.fileExists(atPath: $0) }
    }

    // MARK: - searching memory

    struct Mapping { var start: UInt64; var end: UInt64; var name: String; var flags: [String]; var rssKB = 0 }

    /// The daemon's mappings from /proc/PID/smaps, with their VmFlags.
    func mappings(_ pid: Int32) -> [Mapping] {
        // Read to the end by hand: a /proc file has no size to go by.
        let fd = open("/proc/\(pid)/smaps", O_RDONLY)
        guard fd >= 0 else { return [] }
        defer { close(fd) }
        var raw = [UInt8]()
        var chunk = [UInt8](repeating: 0, count: 65536)
        while true {
            let n = chunk.withUnsafeMutableBytes { Glibc.read(fd, $0.baseAddress, 65536) }
            if n <= 0 { break }
            raw += chunk[0..<n]
        }
        let text = String(decoding: raw, as: UTF8.self)
        var out: [Mapping] = []
        for line in text.split(separator: "\n") {
            let f = line.split(separator: " ", omittingEmptySubsequences: true)
            if let range = f.first, range.contains("-"), let dash = range.firstIndex(of: "-"),
               let a = UInt64(range[..<dash], radix: 16), let b = UInt64(range[range.index(after: dash)...], radix: 16) {
                out.append(Mapping(start: a, end: b, name: f.count > 5 ? f[5...].joined(separator: " ") : "", flags: []))
            } else if f.first == "Rss:", f.count > 1, let kb = Int(f[1]), !out.isEmpty {
                out[out.count - 1].rssKB = kb
            } else if f.first == "VmFlags:", !out.isEmpty {
                out[out.count - 1].flags = f.dropFirst().map(String.init)
            }
        }
        return out
    }

    /// Every place a needle appears in the daemon's memory: (needle, mapping, locked, undumpable).
    func scanMemory(_ pid: Int32, _ needles: [(String, [UInt8])]) -> (hits: [(String, Mapping)], bytes: Int) {
        let fd = open("/proc/\(pid)/mem", O_RDONLY)
        guard fd >= 0 else { XCTFail("cannot open /proc/\(pid)/mem: \(errno)"); return ([], 0) }
        defer { close(fd) }
        var hits: [(String, Mapping)] = []
        var scanned = 0
        // Only what is resident: a page never touched holds nothing (and reading a 1 GiB
        // reservation would take minutes).
        for m in mappings(pid) where m.flags.contains("rd") && m.rssKB > 0 && m.name != "[vvar]" && m.name != "[vsyscall]" {
            let size = Int(m.end - m.start)
            var buf = [UInt8](repeating: 0, count: size)
            let n = buf.withUnsafeMutableBytes { pread(fd, $0.baseAddress, size, off_t(Int64(bitPattern: m.start))) }
            guard n > 0 else { continue }
            scanned += n
            for (name, needle) in needles where contains(buf, n, needle) { hits.append((name, m)) }
        }
        return (hits, scanned)
    }

    func contains(_ hay: [UInt8], _ count: Int, _ needle: [UInt8]) -> Bool {
        guard !needle.isEmpty, count >= needle.count else { return false }
        return hay.withUnsafeBytes { h in
            needle.withUnsafeBytes { n in
                let last = h.baseAddress! + (count - n.count)
                var p = h.baseAddress!
                while p <= last {
                    guard let q = memchr(p, Int32(needle[0]), last - p + 1) else { return false }
                    if memcmp(q, n.baseAddress!, n.count) == 0 { return true }
                    p = UnsafeRawPointer(q) + 1
                }
                return false
            }
        }
    }

    // MARK: - tests

    /// The issue's done-when: three areas, an application writing through TMPDIR and
    /// XDG_CACHE_HOME, SIGKILL, remount: temp empty and its old ciphertext gone, cache
    /// intact; then `cache purge` leaves nothing to recover; no marker or key bytes in any
    /// file the daemon could have written.
    func testKilledDaemonLeavesNothingAndCacheSurvivesUntilPurged() throws {
        initVolume()
        let env = mountAreas()
        XCTAssertEqual(env["TMPDIR"], tmpMnt)
        XCTAssertEqual(env["XDG_CACHE_HOME"], cacheMnt)
        let setup = app(env, """
            t=$(mktemp) && echo "$MARKER in temp" > "$t" && mkdir -p "$XDG_CACHE_HOME/app" && echo "$MARKER kept" > "$XDG_CACHE_HOME/app/entry"
            """)
        try setup.run()
        setup.waitUntilExit()
        XCTAssertEqual(setup.terminationStatus, 0)
        XCTAssertEqual(try FileManager.default.contentsOfDirectory(atPath: tmpMnt).count, 1)
        let volume = try volumeKeys()
        let cacheKeys = try XCTUnwrap(try cacheKeys(volume))

        let writer = app(env, Self.writerScript)
        try writer.run()
        // The writer is under way (its files open on the mounts) before the daemon dies.
        let started = Date()
        while ((try? FileManager.default.attributesOfItem(atPath: cacheMnt + "/app/log")[.size] as? Int) ?? 0) < 4096
                && Date().timeIntervalSince(started) < 20 { usleep(20_000) }
        let pids = Harness.daemons(mnt)
        XCTAssertEqual(pids.count, 1)
        for pid in pids { kill(pid, SIGKILL) }
        writer.waitUntilExit()
        // The unmount helper saw its daemon die and cleared the three mounts: nothing stale.
        XCTAssertTrue(waitUnmounted([mnt, tmpMnt, cacheMnt]), "a dead daemon's mounts must not stay behind")

        let leftover = try FileManager.default.contentsOfDirectory(atPath: cipher + "/xtsfs.temp").filter { $0 != "xtsfs.dir" }
        XCTAssertFalse(leftover.isEmpty, "the temp area held ciphertext when the daemon died")
        let keyNeedles = needles(volume) + needles(cacheKeys) + fileKeyNeedles(cipher, volume) + fileKeyNeedles(cipher + "/xtsfs.cache", cacheKeys)
        let files = recentFiles(searchRoots())
        XCTAssertFalse(files.isEmpty)
        XCTAssertEqual(search(files, keyNeedles), [], "marker or key bytes written somewhere")

        // fsck leaves the areas alone (a crashed temp area, the cache and its key).
        let fsck = Harness.run(["fsck", cipher, "--passfile", passfile])
        XCTAssertEqual(fsck.status, 0, fsck.stdout + fsck.stderr)
        XCTAssertTrue(FileManager.default.fileExists(atPath: cipher + "/xtsfs.cache.key"))

        _ = mountAreas()
        XCTAssertEqual(try FileManager.default.contentsOfDirectory(atPath: tmpMnt), [], "temp area empty at mount")
        let now = try FileManager.default.contentsOfDirectory(atPath: cipher + "/xtsfs.temp")
        XCTAssertEqual(now, ["xtsfs.dir"], "the crashed temp area's ciphertext is removed at the next mount")
        XCTAssertEqual(try String(contentsOfFile: cacheMnt + "/app/entry", encoding: .utf8), marker + " kept\n", "cache intact")
        XCTAssertTrue(try String(contentsOfFile: cacheMnt + "/app/log", encoding: .utf8).hasPrefix(marker + " cache 0\n"))
        let status = Harness.run(["status", cipher])
        XCTAssertTrue(status.stdout.contains("temp on \(tmpMnt)") && status.stdout.contains("cache on \(cacheMnt)"), status.stdout)

        // Purged while mounted: the daemon discards the key, switches to a fresh key and
        // an empty area, and removes the old ciphertext; a file open in it stops working.
        let oldCiphertext = try FileManager.default.contentsOfDirectory(atPath: cipher + "/xtsfs.cache").filter { $0 != "xtsfs.dir" }
        XCTAssertFalse(oldCiphertext.isEmpty)
        let held = open(cacheMnt + "/app/entry", O_RDONLY)
        XCTAssertGreaterThanOrEqual(held, 0)
        let online = Harness.run(["cache", "purge", cipher])
        XCTAssertEqual(online.status, 0, online.stderr)
        XCTAssertEqual(try FileManager.default.contentsOfDirectory(atPath: cacheMnt), [], "the purged cache is empty at once")
        var byte: UInt8 = 0
        XCTAssertLessThan(Glibc.read(held, &byte, 1), 0, "a file open in the purged cache no longer reads")
        close(held)
        XCTAssertEqual(try FileManager.default.contentsOfDirectory(atPath: cipher + "/xtsfs.cache"), ["xtsfs.dir"], "old ciphertext removed")
        XCTAssertFalse(FileManager.default.fileExists(atPath: cipher + "/xtsfs.cache.purged"))
        let fresh = try XCTUnwrap(try self.cacheKeys(volume))
        XCTAssertFalse(fresh.dek.constantTimeEquals(cacheKeys.dek), "a new cache key")
        try Data("after purge\n".utf8).write(to: URL(fileURLWithPath: cacheMnt + "/new"))
        XCTAssertEqual(try String(contentsOfFile: cacheMnt + "/new", encoding: .utf8), "after purge\n")
        XCTAssertEqual(search(recentFiles([cipher]), needles(cacheKeys)), [], "the old cache key is nowhere on disk")

        // Unmounting the data area unmounts all three.
        unmount()
        XCTAssertTrue(waitUnmounted([tmpMnt, cacheMnt], seconds: 1), "unmount of the data area unmounts the areas")
        XCTAssertFalse(FileManager.default.fileExists(atPath: cipher + "/xtsfs.temp"), "temp ciphertext removed at unmount")

        let purge = Harness.run(["cache", "purge", cipher])
        XCTAssertEqual(purge.status, 0, purge.stderr)
        XCTAssertFalse(FileManager.default.fileExists(atPath: cipher + "/xtsfs.cache.key"), "the cache key is discarded")
        XCTAssertFalse(FileManager.default.fileExists(atPath: cipher + "/xtsfs.cache"), "the cache ciphertext is removed")
        XCTAssertNil(try self.cacheKeys(volume), "no cache key left to unwrap")
        XCTAssertTrue(try FileManager.default.contentsOfDirectory(atPath: cipher).allSatisfy { !$0.hasPrefix("xtsfs.cache") })
        _ = mountAreas()
        XCTAssertEqual(try FileManager.default.contentsOfDirectory(atPath: cacheMnt), [], "a purged cache comes back empty")
        unmount()
    }

    /// An online DEK rekey purges the mounted cache when it finishes: the old cache key
    /// (wrapped under the retired DEK) is gone, the new one is wrapped under the new DEK,
    /// the data area is untouched, and the next mount keeps what was cached since.
    func testOnlineRekeyPurgesTheMountedCache() throws {
        initVolume()
        _ = mountAreas()
        try FileManager.default.createDirectory(atPath: cacheMnt + "/app", withIntermediateDirectories: true)
        try Data("cached before\n".utf8).write(to: URL(fileURLWithPath: cacheMnt + "/app/entry"))
        try Data("data\n".utf8).write(to: URL(fileURLWithPath: mnt + "/d"))
        let oldVolume = try volumeKeys()
        let oldCache = try XCTUnwrap(try cacheKeys(oldVolume))
        let r = Harness.run(["rekey", cipher, "--dek", "--passfile", passfile])
        XCTAssertEqual(r.status, 0, r.stderr)
        // The purge follows the end of the sweep in the daemon (a guard against a hang, 60 s).
        let deadline = Date().addingTimeInterval(60)
        while (try? FileManager.default.contentsOfDirectory(atPath: cacheMnt)) != [] && Date() < deadline { usleep(50_000) }
        XCTAssertEqual(try FileManager.default.contentsOfDirectory(atPath: cacheMnt), [], "the cache is purged")
        let newVolume = try volumeKeys()
        XCTAssertNotEqual(newVolume.generation, oldVolume.generation)
        XCTAssertNil(try cacheKeys(oldVolume), "the cache key file no longer opens under the retired DEK")
        var fresh: KeySet?
        while fresh == nil && Date() < deadline {
            fresh = try cacheKeys(newVolume)
            if fresh == nil { usleep(50_000) }
        }
        let newCache = try XCTUnwrap(fresh, "the new cache key is wrapped under the new DEK")
        XCTAssertFalse(newCache.dek.constantTimeEquals(oldCache.dek), "a new cache key")
        XCTAssertEqual(try FileManager.default.contentsOfDirectory(atPath: cipher + "/xtsfs.cache"), ["xtsfs.dir"], "old cache ciphertext removed")
        XCTAssertEqual(try String(contentsOfFile: mnt + "/d", encoding: .utf8), "data\n")
        try Data("cached after\n".utf8).write(to: URL(fileURLWithPath: cacheMnt + "/after"))
        unmount()
        XCTAssertTrue(waitUnmounted([tmpMnt, cacheMnt]))
        _ = mountAreas()
        XCTAssertEqual(try String(contentsOfFile: cacheMnt + "/after", encoding: .utf8), "cached after\n", "kept across the remount")
        XCTAssertEqual(try String(contentsOfFile: mnt + "/d", encoding: .utf8), "data\n")
        unmount()
    }

    /// The live daemon, as an attacker with root would read it: key bytes (the DEK, its
    /// subkeys, the cache key's, and every file's XTS key) only in locked, undumpable
    /// mappings, also after files were written and while they are still open; then a
    /// SIGABRT leaves no core and no marker or key bytes in any file.
    func testKeysOnlyInLockedUndumpableMemoryAndAbortLeavesNothing() throws {
        guard geteuid() == 0 else { throw XCTSkip("reading another process's memory needs root") }
        initVolume()
        let env = mountAreas()
        // Written, then left open (file descriptor 3 stays open in the sleeping shell).
        let holder = app(env, """
            t=$(mktemp); exec 3>>"$t"; mkdir -p "$XDG_CACHE_HOME/app"; exec 4>>"$XDG_CACHE_HOME/app/open"; exec 5>>"$DATA/open"
            i=0; while [ $i -lt 300 ]; do echo "$MARKER $i" >&3; echo "$MARKER $i" >&4; echo "$MARKER $i" >&5; i=$((i+1)); done
            cat "$t" "$XDG_CACHE_HOME/app/open" "$DATA/open" > /dev/null
            exec sleep 30
            """)
        try holder.run()
        defer { if holder.isRunning { holder.terminate() } }
        let pid = try XCTUnwrap(Harness.daemons(mnt).first)
        let volume = try volumeKeys()
        let cacheKeys = try XCTUnwrap(try cacheKeys(volume))
        let deadline = Date().addingTimeInterval(20)
        while (try? String(contentsOfFile: mnt + "/open", encoding: .utf8))?.contains("\(marker) 299") != true && Date() < deadline { usleep(20_000) }
        usleep(200_000)
        let fileNeedles = fileKeyNeedles(cipher, volume) + fileKeyNeedles(cipher + "/xtsfs.cache", cacheKeys)
        XCTAssertGreaterThanOrEqual(fileNeedles.count, 4, "file keys of the data and cache files")
        let allNeedles = needles(volume) + needles(cacheKeys) + fileNeedles
        let (hits, scanned) = scanMemory(pid, allNeedles)
        XCTAssertGreaterThan(scanned, 1 << 20)
        // The scan finds the keys where they are meant to be: the DEK, and the XTS key of
        // each file still open (in its locked `FileCrypto`); so a key schedule left in the
        // heap would be found too.
        XCTAssertTrue(hits.contains { $0.0 == "dek" }, "the scan must find the DEK where it is kept")
        XCTAssertTrue(hits.contains { $0.0.hasPrefix("file key") }, "the scan must find open files' keys where they are kept")
        for (name, m) in hits {
            XCTAssertTrue(m.flags.contains("lo") && m.flags.contains("dd"),
                          "\(name) in an unlocked or dumpable mapping \(String(m.start, radix: 16))-\(String(m.end, radix: 16)) \(m.name) [\(m.flags.joined(separator: " "))]")
        }

        kill(pid, SIGABRT)
        XCTAssertTrue(waitUnmounted([mnt, tmpMnt, cacheMnt]), "a crashed daemon's mounts must not stay behind")
        holder.terminate()
        holder.waitUntilExit()
        let files = recentFiles(searchRoots())
        XCTAssertEqual(search(files, allNeedles), [], "marker or key bytes written somewhere")
        XCTAssertFalse(files.contains { ($0 as NSString).lastPathComponent.hasPrefix("core") }, "a core file was written")
        // The next mount clears what the crash left.
        _ = mountAreas()
        XCTAssertEqual(try FileManager.default.contentsOfDirectory(atPath: tmpMnt), [])
        unmount()
    }

    /// An integrity volume's daemon, as `testKeysOnlyInLockedUndumpableMemoryAndAbortLeavesNothing`
    /// reads a plain one's: each file's XTS key halves and unit tag keys (K1, K2 of tag
    /// algorithm 2: an AES key schedule starts with its key) and file root keys (element
    /// key K1, K2 and record key) appear only in locked,
    /// undumpable mappings, also after many reads and writes and with a file still open;
    /// so no GCM, ECB or XTS key schedule is left in the heap between requests.
    func testIntegrityKeysOnlyInLockedUndumpableMemory() throws {
        guard geteuid() == 0 else { throw XCTSkip("reading another process's memory needs root") }
        let r = Harness.run(["init", cipher, "--passfile", passfile, "--integrity"] + Self.cheapKDF)
        XCTAssertEqual(r.status, 0, r.stderr)
        mount()
        defer { if Harness.isMounted(mnt) { unmount() } }
        let holder = Process()
        holder.executableURL = URL(fileURLWithPath: "/bin/sh")
        holder.arguments = ["-c", """
            exec 3>>"$1/open"; i=0; while [ $i -lt 200 ]; do echo "$2 $i" >&3; i=$((i+1)); done
            for f in a b c; do head -c 300000 /dev/urandom > "$1/$f"; cat "$1/$f" > /dev/null; done
            dd if=/dev/urandom of="$1/b" bs=4096 seek=3 count=5 conv=notrunc 2>/dev/null; cat "$1/open" "$1/b" > /dev/null
            exec sleep 30
            """, "sh", mnt, marker]
        try holder.run()
        defer { if holder.isRunning { holder.terminate(); holder.waitUntilExit() } }
        let pid = try XCTUnwrap(Harness.daemons(mnt).first)
        let deadline = Date().addingTimeInterval(20)
        while (try? Data(contentsOf: URL(fileURLWithPath: mnt + "/b")))?.count != 300_000 && Date() < deadline { usleep(50_000) }
        usleep(500_000)
        let volume = try volumeKeys()
        var fileNeedles: [(String, [UInt8])] = []
        for name in try FileManager.default.contentsOfDirectory(atPath: cipher) where !name.hasPrefix("xtsfs.") {
            guard let d = FileManager.default.contents(atPath: cipher + "/" + name), d.count >= 64 else { continue }
            let h = [UInt8](d)
            XCTAssertEqual(Array(h[0..<2]), [3, 0], "file header version 3: tag algorithm 2 and a file root")
            let nonce = Array(h[8..<24])
            let xts = try HKDF.derive(key: volume.contentKey, salt: [], info: Array("xtsfs integrity file key".utf8) + nonce, count: 64).withUnsafeBytes { Array($0) }
            let tag = try HKDF.derive(key: volume.contentKey, salt: [], info: Array("xtsfs integrity unit tag v2 ghash-aes256".utf8) + nonce, count: 64).withUnsafeBytes { Array($0) }
            let element = try HKDF.derive(key: volume.contentKey, salt: [], info: Array("xtsfs integrity group element".utf8) + nonce, count: 64).withUnsafeBytes { Array($0) }
            let record = try HKDF.derive(key: volume.contentKey, salt: [], info: Array("xtsfs integrity group record".utf8) + nonce, count: 32).withUnsafeBytes { Array($0) }
            fileNeedles += [("xts key of \(name) 1st half", Array(xts[0..<32])), ("xts key of \(name) 2nd half", Array(xts[32...])),
                            ("tag key K1 of \(name)", Array(tag[0..<32])), ("tag key K2 of \(name)", Array(tag[32...])),
                            ("element key K1 of \(name)", Array(element[0..<32])), ("element key K2 of \(name)", Array(element[32...])),
                            ("record key of \(name)", record)]
        }
        XCTAssertEqual(fileNeedles.count, 28, "open, a, b, c")
        let (hits, scanned) = scanMemory(pid, needles(volume) + fileNeedles)
        XCTAssertGreaterThan(scanned, 1 << 20)
        XCTAssertTrue(hits.contains { $0.0 == "dek" }, "the scan must find the DEK where it is kept")
        XCTAssertTrue(hits.contains { $0.0.hasPrefix("tag key K1") }, "the scan must find an open file's tag key where it is kept")
        for (name, m) in hits {
            XCTAssertTrue(m.flags.contains("lo") && m.flags.contains("dd"),
                          "\(name) in an unlocked or dumpable mapping \(String(m.start, radix: 16))-\(String(m.end, radix: 16)) \(m.name) [\(m.flags.joined(separator: " "))]")
        }
    }

    func testAreaOptionErrors() throws {
        initVolume()
        XCTAssertEqual(Harness.run(["mount", cipher, mnt, "--passfile", passfile, "--tmp", mnt]).status, 2, "same mount point twice")
        XCTAssertEqual(Harness.run(["mount", cipher, mnt, "--passfile", passfile, "--tmp-backing", scratch]).status, 2, "--tmp-backing without --tmp")
        XCTAssertEqual(Harness.run(["mount", cipher, mnt, "--passfile", passfile, "--cache", cacheMnt, "--cache-max", "lots"]).status, 2)
        XCTAssertEqual(Harness.run(["mount", cipher, mnt, "--passfile", passfile, "--env"]).status, 2, "--env without an area")
        XCTAssertEqual(Harness.run(["mount", cipher, mnt, "--passfile", passfile, "--tmp", cipher + "/inside"]).status, 14)
        XCTAssertFalse(Harness.isMounted(mnt))
        XCTAssertEqual(Harness.run(["cache", "purge", scratch]).status, 10, "not a volume")
        XCTAssertEqual(AreaOptions.parseSize("10M"), 10 << 20)
        XCTAssertEqual(AreaOptions.parseSize("2GiB"), 2 << 30)
        XCTAssertEqual(AreaOptions.parseSize("4096"), 4096)
        XCTAssertNil(AreaOptions.parseSize("0"))
    }

    /// CIPHERDIR is hostile input: symlinks planted as the area directories and a FIFO as
    /// the cache key file are replaced, never followed or opened.
    func testPlantedAreaEntriesAreNeverFollowed() throws {
        initVolume()
        let victim = scratch + "/victim"
        try FileManager.default.createDirectory(atPath: victim + "/keep", withIntermediateDirectories: true)
        try Data("precious".utf8).write(to: URL(fileURLWithPath: victim + "/keep/file"))
        try FileManager.default.createSymbolicLink(atPath: cipher + "/xtsfs.temp", withDestinationPath: victim)
        try FileManager.default.createSymbolicLink(atPath: cipher + "/xtsfs.cache", withDestinationPath: victim)
        XCTAssertEqual(mkfifo(cipher + "/xtsfs.cache.key", 0o600), 0)
        _ = mountAreas()
        try Data("t".utf8).write(to: URL(fileURLWithPath: tmpMnt + "/t"))
        try Data("c".utf8).write(to: URL(fileURLWithPath: cacheMnt + "/c"))
        unmount()
        XCTAssertEqual(try String(contentsOfFile: victim + "/keep/file", encoding: .utf8), "precious")
        XCTAssertEqual(try FileManager.default.contentsOfDirectory(atPath: victim), ["keep"])
        var st = stat()
        XCTAssertEqual(lstat(cipher + "/xtsfs.cache", &st), 0)
        XCTAssertEqual(st.st_mode & S_IFMT, S_IFDIR, "a real directory replaced the planted symlink")
        XCTAssertEqual(lstat(cipher + "/xtsfs.cache.key", &st), 0)
        XCTAssertEqual(st.st_mode & S_IFMT, S_IFREG)
        // And a purge removes a planted symlink, not what it points at.
        try FileManager.default.removeItem(atPath: cipher + "/xtsfs.cache")
        try FileManager.default.createSymbolicLink(atPath: cipher + "/xtsfs.cache", withDestinationPath: victim)
        XCTAssertEqual(Harness.run(["cache", "purge", cipher]).status, 0)
        XCTAssertEqual(try String(contentsOfFile: victim + "/keep/file", encoding: .utf8), "precious")
    }

    /// A mount refused at FUSE INIT leaves none of the three mounted, and no temp area.
    func testRefusedAtInitLeavesNothingMounted() throws {
        initVolume()
        let r = Harness.run(["mount", cipher, mnt, "--passfile", passfile, "--tmp", tmpMnt, "--cache", cacheMnt, "-o", "max_read=4096"])
        XCTAssertEqual(r.status, 14, r.stderr)
        XCTAssertTrue(waitUnmounted([mnt, tmpMnt, cacheMnt]))
        let deadline = Date().addingTimeInterval(10)
        while [mnt, tmpMnt, cacheMnt].contains(where: { !Harness.daemons($0).isEmpty }) && Date() < deadline { usleep(20_000) }
        XCTAssertTrue(Harness.daemons(mnt).isEmpty, "daemon gone")
        XCTAssertFalse(FileManager.default.fileExists(atPath: cipher + "/xtsfs.temp"), "temp area removed")
    }

    /// `--cache-max`: beyond the limit the least recently used whole files go.
    func testCacheMaxEvictsLeastRecentlyUsedFiles() throws {
        initVolume()
        let r = Harness.run(["mount", cipher, mnt, "--passfile", passfile, "--cache", cacheMnt, "--cache-max", "100K"])
        XCTAssertEqual(r.status, 0, r.stderr)
        try write(cacheMnt + "/old", pattern(60_000, seed: 1))
        try FileManager.default.createDirectory(atPath: cacheMnt + "/d", withIntermediateDirectories: true)
        usleep(50_000)
        try write(cacheMnt + "/d/newer", pattern(30_000, seed: 2))
        usleep(50_000)
        // Used again: now the most recent.
        XCTAssertEqual(try read(cacheMnt + "/old"), pattern(60_000, seed: 1))
        usleep(50_000)
        try write(cacheMnt + "/newest", pattern(30_000, seed: 3))
        let deadline = Date().addingTimeInterval(10)
        while FileManager.default.fileExists(atPath: cacheMnt + "/d/newer") && Date() < deadline { usleep(100_000) }
        XCTAssertFalse(FileManager.default.fileExists(atPath: cacheMnt + "/d/newer"), "the least recently used file is evicted")
        XCTAssertEqual(try read(cacheMnt + "/old"), pattern(60_000, seed: 1))
        XCTAssertEqual(try read(cacheMnt + "/newest"), pattern(30_000, seed: 3))
        unmount()
    }

    /// `--tmp-backing DIR`: the temp ciphertext goes there (named after the volume ID),
    /// and is gone after unmount.
    func testTempBackingElsewhere() throws {
        initVolume()
        let backing = scratch + "/local"
        try FileManager.default.createDirectory(atPath: backing, withIntermediateDirectories: true)
        let r = Harness.run(["mount", cipher, mnt, "--passfile", passfile, "--tmp", tmpMnt, "--tmp-backing", backing])
        XCTAssertEqual(r.status, 0, r.stderr)
        try Data((marker + "\n").utf8).write(to: URL(fileURLWithPath: tmpMnt + "/f"))
        let inside = try FileManager.default.contentsOfDirectory(atPath: backing)
        XCTAssertEqual(inside.count, 1)
        XCTAssertTrue(inside.first?.hasPrefix("xtsfs.temp.") == true, "\(inside)")
        XCTAssertFalse(FileManager.default.fileExists(atPath: cipher + "/xtsfs.temp"))
        XCTAssertEqual(search(recentFiles([backing, cipher]), []), [])
        unmount()
        XCTAssertTrue(waitUnmounted([tmpMnt]))
        XCTAssertEqual(try FileManager.default.contentsOfDirectory(atPath: backing), [])
    }
}

/// Mount points of this machine, for skipping them while walking directories.
enum MountEntryList {
    static func mountpoints() -> [String] {
        guard let info = try? String(contentsOfFile: "/proc/self/mountinfo", encoding: .utf8) else { return [] }
        return info.split(separator: "\n").compactMap { l in
            let f = l.split(separator: " ")
            return f.count > 4 ? String(f[4]).replacingOccurrences(of: "\\040", with: " ") : nil
        }
    }
}
