import Foundation
import Synchronization
import XCTest
import CSysShim
import XTSCrypto
import XTSFormat
import XTSKeys
import XTSSystem
@testable import XTSVolume
#if canImport(Glibc)
import Glibc
#endif

/// Several hosts on one CIPHERDIR (issue 19): header changes that never lose another
/// host's change.
final class SharedHostsTests: VolumeTestCase {
    /// The second mount of the same CIPHERDIR: another "host".
    var mnt2: String { scratch + "/mnt2" }

    /// CIPHERDIR as mount B reaches it: the same directory, or (scripts/gluster-test) the
    /// same directory through another client of a distributed filesystem.
    var cipher2 = ""

    override func setUpWithError() throws {
        try super.setUpWithError()
        try FileManager.default.createDirectory(atPath: mnt2, withIntermediateDirectories: true)
        cipher2 = cipher
        // XTSFS_SHARED_BACKING=DIR1:DIR2: two clients' views of one shared filesystem.
        if let shared = ProcessInfo.processInfo.environment["XTSFS_SHARED_BACKING"] {
            let parts = shared.split(separator: ":").map(String.init)
            guard parts.count == 2 else { throw XCTSkip("XTSFS_SHARED_BACKING must be DIR1:DIR2") }
            let name = "vol-" + URL(fileURLWithPath: scratch).lastPathComponent
            cipher = parts[0] + "/" + name
            cipher2 = parts[1] + "/" + name
        }
    }

    override func tearDown() {
        Harness.forceUnmount(mnt2)
        XCTAssertFalse(Harness.isMounted(mnt2), "mount left behind on \(mnt2)")
        Harness.forceUnmount(mnt)
        if cipher != scratch + "/cipher" { try? FileManager.default.removeItem(atPath: cipher) }
        super.tearDown()
    }

    /// Mounts CIPHERDIR on `mnt` and on `mnt2`, each its own daemon.
    func mountTwice(_ options: [String] = ["-o", "shared"], file: StaticString = #filePath, line: UInt = #line) {
        mount(options, file: file, line: line)
        let r = Harness.run(["mount", cipher2, mnt2, "--passfile", passfile] + options)
        XCTAssertEqual(r.status, 0, "second mount failed: \(r.stderr)", file: file, line: line)
        XCTAssertTrue(Harness.isMounted(mnt2), file: file, line: line)
    }

    func unmountBoth(file: StaticString = #filePath, line: UInt = #line) {
        XCTAssertEqual(Harness.run(["unmount", mnt2]).status, 0, file: file, line: line)
        unmount(file: file, line: line)
    }

    var provider: PassphraseProvider { PassphraseProvider(passphrase: SecretBytes(copying: Array(Self.passphrase.utf8))) }

    /// Host A reads the header, host B adds a keyslot, then A writes its change made to
    /// what it read: refused with a clear error, and B's slot is still there.
    func testHeaderChangeMadeToAnOutdatedHeaderIsRefused() throws {
        initVolume()
        let a = try Volume.unlock(cipher, provider: provider, audit: nil, operation: "test")
        let keyfile = scratch + "/key"
        try KeySlots.generateKeyfile(keyfile)
        let added = try KeySlots.add(cipherDir: cipher, provider: provider, newProvider: KeyfileProvider(contents: SecretBytes(copying: Array(try Sys.readFile(keyfile)))), audit: nil)
        var changed = a.header
        changed.keyslots.removeAll { $0.index != a.slot }
        XCTAssertThrowsError(try KeySlots.write(cipher, changed, keys: a.keys, base: a.newestSequence)) { error in
            guard case .refused(let why) = error as? VolumeError else { return XCTFail("\(error)") }
            XCTAssertTrue(why.contains("changed while this command ran"), why)
        }
        let now = try Volume.load(cipher)
        XCTAssertTrue(now.newest.keyslots.contains { $0.index == added }, "the other host's slot is kept")
        XCTAssertEqual(Set(now.candidates.map(\.header.sequence)).count, 1)
        // Made to the current header, the same change goes through.
        let b = try Volume.unlock(cipher, provider: provider, audit: nil, operation: "test")
        try KeySlots.remove(cipherDir: cipher, index: added, provider: provider, force: false, audit: nil)
        XCTAssertEqual(try Volume.load(cipher).newest.sequence, b.newestSequence + 1)
        XCTAssertFalse(try FileManager.default.contentsOfDirectory(atPath: cipher).contains { $0.contains(".tmp") })
    }

    // MARK: - presence records

    var hostsDir: String { cipher + "/xtsfs.hosts" }

    /// A record as another host writes it.
    func plantRecord(_ name: String, host: String = "otherhost", hostID: String = "00112233445566ff", pid: Int32 = 4242,
                     expires: Int64 = Int64(time(nil)) + 100) throws {
        try FileManager.default.createDirectory(atPath: hostsDir, withIntermediateDirectories: true)
        let now = Int64(time(nil))
        let text = "xtsfs-presence 1\nhost=\(host)\nhostID=\(hostID)\npid=\(pid)\nmountpoint=/mnt/there\nmounted=\(now - 50)\nrefreshed=\(now - 10)\nexpires=\(expires)\nshared=1\n"
        try text.write(toFile: hostsDir + "/" + name, atomically: false, encoding: .utf8)
    }

    func statusRecords() throws -> [[String: Any]] {
        let r = Harness.run(["status", cipher, "--json"])
        XCTAssertEqual(r.status, 0, r.stderr)
        let obj = try JSONSerialization.jsonObject(with: Data(r.stdout.utf8)) as? [String: Any]
        return obj?["mountedBy"] as? [[String: Any]] ?? []
    }

    func testMountLeavesAPresenceRecordThatStatusListsAndUnmountRemoves() throws {
        initVolume()
        mount(["-o", "shared"])
        let daemons = Harness.daemons(mnt)
        XCTAssertEqual(daemons.count, 1)
        let files = try FileManager.default.contentsOfDirectory(atPath: hostsDir)
        XCTAssertEqual(files.count, 1, "\(files)")
        XCTAssertTrue(files[0].hasSuffix(".\(daemons[0])"), "named HOSTID.PID of the daemon: \(files[0])")
        let records = try statusRecords()
        XCTAssertEqual(records.count, 1)
        XCTAssertEqual(records.first?["state"] as? String, "live")
        XCTAssertEqual(records.first?["mountpoint"] as? String, mnt)
        XCTAssertEqual(records.first?["shared"] as? Bool, true)
        XCTAssertEqual((records.first?["pid"] as? Int).map(Int32.init), daemons.first)
        XCTAssertTrue(Harness.run(["status", cipher]).stdout.contains("Mounted by:      "))
        // The mount itself does not count as another host for what it serves, and is hidden.
        XCTAssertFalse(try FileManager.default.contentsOfDirectory(atPath: mnt).contains { $0.contains("xtsfs") })
        unmount()
        XCTAssertEqual(try FileManager.default.contentsOfDirectory(atPath: hostsDir), [], "removed on a clean unmount")
        XCTAssertEqual(try statusRecords().count, 0)
        XCTAssertTrue(Harness.run(["status", cipher]).stdout.contains("Mounted by:      nobody"))
    }

    func testOfflineOperationsRefuseWhileAnotherHostHoldsTheVolume() throws {
        initVolume()
        let backup = scratch + "/header.bak"
        XCTAssertEqual(Harness.run(["header", "backup", cipher, backup]).status, 0)
        try plantRecord("00112233445566ff.4242")
        let before = backingFiles().map { "\($0.path) \($0.bytes)" }
        let rekey = Harness.run(["rekey", "--dek", cipher, "--passfile", passfile])
        XCTAssertEqual(rekey.status, 15, rekey.stderr)
        XCTAssertTrue(rekey.stderr.contains("otherhost") && rekey.stderr.contains("mounted elsewhere") && rekey.stderr.contains("--force"), rekey.stderr)
        let restore = Harness.run(["header", "restore", cipher, backup, "--passfile", passfile])
        XCTAssertEqual(restore.status, 15, restore.stderr)
        XCTAssertTrue(restore.stderr.contains("header restore must not run"), restore.stderr)
        let fsck = Harness.run(["fsck", "--repair", cipher, "--passfile", passfile])
        XCTAssertEqual(fsck.status, 8, fsck.stderr)
        XCTAssertTrue(fsck.stderr.contains("fsck --repair must not run"), fsck.stderr)
        XCTAssertEqual(backingFiles().map { "\($0.path) \($0.bytes)" }, before, "nothing changed")
        // A check without repair runs, and says why findings may be transient.
        let check = Harness.run(["fsck", cipher, "--passfile", passfile])
        XCTAssertEqual(check.status, 0, check.stdout + check.stderr)
        XCTAssertTrue(check.stdout.contains("mounted on another host"), check.stdout)
        // --force: that host is known to be gone.
        XCTAssertEqual(Harness.run(["header", "restore", cipher, backup, "--passfile", passfile, "--force"]).status, 0)
        let forced = Harness.run(["rekey", "--dek", cipher, "--passfile", passfile, "--force"])
        XCTAssertEqual(forced.status, 0, forced.stderr)
        // An expired record (a host cut off, not refreshed) does not hold the volume.
        try plantRecord("00112233445566ff.4242", expires: Int64(time(nil)) - 5)
        XCTAssertEqual(try statusRecords().first?["state"] as? String, "expired")
        XCTAssertEqual(Harness.run(["fsck", "--repair", cipher, "--passfile", passfile]).status, 0)
        // A record of this machine whose daemon is gone is dead at once, and a mount removes it.
        try FileManager.default.removeItem(atPath: hostsDir + "/00112233445566ff.4242")
        mount()
        let mine = try FileManager.default.contentsOfDirectory(atPath: hostsDir)
        XCTAssertEqual(mine.count, 1)
        let hostID = String(mine[0].split(separator: ".")[0])
        unmount()
        let child = Process()
        child.executableURL = URL(fileURLWithPath: "/bin/true")
        try child.run()
        child.waitUntilExit()
        let dead = child.processIdentifier
        try plantRecord(hostID + ".\(dead)", host: "me", hostID: hostID, pid: dead)
        XCTAssertEqual(try statusRecords().first?["state"] as? String, "dead")
        XCTAssertEqual(Harness.run(["fsck", "--repair", cipher, "--passfile", passfile]).status, 0)
        mount()
        XCTAssertFalse(try FileManager.default.contentsOfDirectory(atPath: hostsDir).contains(hostID + ".\(dead)"), "a mount removes this machine's dead records")
        unmount()
    }

    /// `rekey --dek` of a mounted volume (this machine's daemon sweeps) refuses while
    /// another host's record is live, or while another mount of the same CIPHERDIR on this
    /// machine holds it (its daemon would go on writing with the old key), naming it and
    /// changing nothing; `--force` goes on, and the sweeping mount's own record never counts.
    func testOnlineRekeyRefusesWhileAnotherHostOrAnotherMountHoldsTheVolume() throws {
        initVolume()
        mount(["-o", "shared"])
        let data = pattern(30_000, seed: 91)
        try write(mnt + "/f", data)
        let before = backingFiles().map { "\($0.path) \($0.bytes)" }
        try plantRecord("00112233445566ff.4242")
        let other = Harness.run(["rekey", "--dek", cipher, "--passfile", passfile])
        XCTAssertEqual(other.status, 15, other.stdout + other.stderr)
        XCTAssertTrue(other.stderr.contains("otherhost") && other.stderr.contains("mounted elsewhere") && other.stderr.contains("--force"), other.stderr)
        XCTAssertEqual(backingFiles().map { "\($0.path) \($0.bytes)" }, before, "nothing changed")
        try FileManager.default.removeItem(atPath: hostsDir + "/00112233445566ff.4242")
        // A second mount here: the first mount's daemon answers the rekey, the second's
        // record refuses it.
        let second = Harness.run(["mount", cipher2, mnt2, "--passfile", passfile, "-o", "shared"])
        XCTAssertEqual(second.status, 0, second.stderr)
        let both = Harness.run(["rekey", "--dek", cipher, "--passfile", passfile])
        XCTAssertEqual(both.status, 15, both.stdout + both.stderr)
        XCTAssertTrue(both.stderr.contains(mnt2) && both.stderr.contains("another mount on this one"), both.stderr)
        XCTAssertFalse(both.stderr.contains("on \(mnt),"), "the sweeping mount is not named: \(both.stderr)")
        XCTAssertEqual(backingFiles().map { "\($0.path) \($0.bytes)" }, before, "nothing changed")
        XCTAssertEqual(Harness.run(["unmount", mnt2]).status, 0)
        // --force (a host known to be gone).
        try plantRecord("00112233445566ff.4242")
        let forced = Harness.run(["rekey", "--dek", cipher, "--passfile", passfile, "--force"])
        XCTAssertEqual(forced.status, 0, forced.stdout + forced.stderr)
        assertBytes(readAll(mnt + "/f"), data, "the file after the forced rekey")
        XCTAssertNotEqual(backingFiles().map { "\($0.path) \($0.bytes)" }, before, "re-encrypted")
        // Alone, the mount's own record does not hold the rekey back.
        try FileManager.default.removeItem(atPath: hostsDir + "/00112233445566ff.4242")
        let alone = Harness.run(["rekey", "--dek", cipher, "--passfile", passfile])
        XCTAssertEqual(alone.status, 0, alone.stdout + alone.stderr)
        assertBytes(readAll(mnt + "/f"), data, "the file after the second rekey")
        unmount()
        XCTAssertEqual(Harness.run(["fsck", cipher, "--passfile", passfile]).status, 0)
    }

    /// Presence records are hostile input: a FIFO, a symlink out, a huge file, a directory
    /// and garbage are skipped (never opened, never followed, never read whole); status
    /// and the refusals work on.
    func testHostilePresenceRecordsAreIgnored() throws {
        initVolume()
        try FileManager.default.createDirectory(atPath: hostsDir, withIntermediateDirectories: true)
        XCTAssertEqual(mkfifo(hostsDir + "/fifo", 0o644), 0)
        XCTAssertEqual(symlink("/etc/passwd", hostsDir + "/link"), 0)
        try FileManager.default.createDirectory(atPath: hostsDir + "/dir", withIntermediateDirectories: true)
        try Data(repeating: 0x41, count: 1 << 20).write(to: URL(fileURLWithPath: hostsDir + "/huge"))
        try "xtsfs-presence 1\nhost=x\npid=notanumber\n".write(toFile: hostsDir + "/garbage", atomically: false, encoding: .utf8)
        try "xtsfs-presence 1\nhost=x\nhostID=y\npid=1\nmountpoint=/m\nmounted=1\nrefreshed=1\nexpires=99999999999\n".write(
            toFile: hostsDir + "/xtsfs.hosts.tmp.0123456789abcdef", atomically: false, encoding: .utf8)
        XCTAssertEqual(try statusRecords().count, 0)
        mount()
        XCTAssertEqual(try statusRecords().count, 1, "only the mount's own record")
        unmount()
        let fsck = Harness.run(["fsck", "--repair", cipher, "--passfile", passfile])
        XCTAssertEqual(fsck.status, 0, fsck.stdout + fsck.stderr)
        // CIPHERDIR/xtsfs.hosts itself a symlink out: never followed.
        try FileManager.default.removeItem(atPath: hostsDir)
        let outside = scratch + "/outside"
        try FileManager.default.createDirectory(atPath: outside, withIntermediateDirectories: true)
        XCTAssertEqual(symlink(outside, hostsDir), 0)
        mount()
        XCTAssertEqual(try FileManager.default.contentsOfDirectory(atPath: outside), [], "nothing written through the symlink")
        unmount()
    }

    // MARK: - locks

    func ofdLock(_ fd: Int32, _ type: Int32, _ start: Int, _ len: Int, wait: Bool = false) -> Int32 {
        var l = flock()
        l.l_type = Int16(type)
        l.l_whence = Int16(SEEK_SET)
        l.l_start = off_t(start)
        l.l_len = off_t(len)
        return fcntl(fd, wait ? XTS_F_OFD_SETLKW : XTS_F_OFD_SETLK, &l) == 0 ? 0 : errno
    }

    /// Two mounts of one CIPHERDIR with -o shared: a lock taken through one blocks the
    /// other (fcntl byte ranges, F_GETLK, flock), waiters wake when it goes, and closing the
    /// descriptor releases it.
    func testLocksHeldOnOneMountExcludeTheOther() throws {
        initVolume()
        mountTwice()
        try write(mnt + "/f", pattern(100, seed: 1))
        let fa = open(mnt + "/f", O_RDWR), fb = open(mnt2 + "/f", O_RDWR)
        XCTAssertTrue(fa >= 0 && fb >= 0)
        // fcntl byte ranges (open-file-description locks: FUSE setlk with an owner per descriptor).
        XCTAssertEqual(ofdLock(fa, F_WRLCK, 0, 10), 0)
        XCTAssertEqual(ofdLock(fb, F_WRLCK, 5, 10), EAGAIN, "overlapping range locked on the other mount")
        XCTAssertEqual(ofdLock(fb, F_RDLCK, 0, 1), EAGAIN)
        XCTAssertEqual(ofdLock(fb, F_WRLCK, 20, 10), 0, "a disjoint range is free")
        var probe = flock()
        probe.l_type = Int16(F_WRLCK)
        probe.l_whence = Int16(SEEK_SET)
        probe.l_start = 0
        probe.l_len = 5
        XCTAssertEqual(fcntl(fb, XTS_F_OFD_GETLK, &probe), 0)
        XCTAssertEqual(Int32(probe.l_type), F_WRLCK, "F_GETLK sees the other mount's lock")
        XCTAssertEqual(probe.l_start, 0)
        XCTAssertEqual(probe.l_len, 10)
        XCTAssertEqual(ofdLock(fb, F_UNLCK, 0, 100), 0)
        let released = Atomic<Bool>(false)
        // flock: exclusive on A, refused on B; a blocked waiter on B gets it once A closes.
        // (On another file: on GlusterFS, as on NFS, flock and fcntl locks conflict.)
        try write(mnt + "/g", [1])
        let ga = open(mnt + "/g", O_RDWR), gb = open(mnt2 + "/g", O_RDWR)
        XCTAssertEqual(xts_flock(ga, XTS_LOCK_EX | XTS_LOCK_NB), 0)
        XCTAssertEqual(xts_flock(gb, XTS_LOCK_EX | XTS_LOCK_NB), -1)
        XCTAssertEqual(errno, EWOULDBLOCK)
        XCTAssertEqual(xts_flock(gb, XTS_LOCK_SH | XTS_LOCK_NB), -1, "shared is refused against exclusive")
        let acquiredAfterRelease = Mutex<Bool?>(nil)
        let waiter = Thread { [gb] in
            let r = xts_flock(gb, XTS_LOCK_EX)
            acquiredAfterRelease.withLock { $0 = r == 0 && released.load(ordering: .sequentiallyConsistent) }
        }
        waiter.start()
        usleep(200_000)
        XCTAssertNil(acquiredAfterRelease.withLock { $0 }, "the waiter must still wait while A holds the lock")
        released.store(true, ordering: .sequentiallyConsistent)
        close(ga)  // releases A's flock
        close(fa)  // and its fcntl range
        let deadline = Date().addingTimeInterval(30)
        while acquiredAfterRelease.withLock({ $0 }) == nil && Date() < deadline { usleep(10_000) }
        XCTAssertEqual(acquiredAfterRelease.withLock { $0 }, true, "B's waiter got the lock once A let it go")
        XCTAssertEqual(ofdLock(fb, F_WRLCK, 0, 10), 0, "A's fcntl range went with its descriptor")
        // Through A again, now B holds both.
        let fa2 = open(mnt + "/f", O_RDWR), ga2 = open(mnt + "/g", O_RDWR)
        XCTAssertEqual(xts_flock(ga2, XTS_LOCK_EX | XTS_LOCK_NB), -1)
        XCTAssertEqual(ofdLock(fa2, F_RDLCK, 0, 1), EAGAIN)
        close(fa2)
        close(ga2)
        XCTAssertEqual(xts_flock(gb, XTS_LOCK_UN), 0)
        close(gb)
        close(fb)
        unmountBoth()
    }

    /// A waiter killed while it waits (a signal interrupts the FUSE request) neither
    /// hangs the daemon nor keeps a lock it never got.
    func testKilledLockWaiterLeavesNothingHeld() throws {
        initVolume()
        mountTwice()
        try write(mnt + "/f", [1, 2, 3])
        let fa = open(mnt + "/f", O_RDWR)
        XCTAssertEqual(xts_flock(fa, XTS_LOCK_EX), 0)
        let p = Process()
        p.executableURL = URL(fileURLWithPath: "/usr/bin/flock")
        p.arguments = ["-x", mnt2 + "/f", "-c", "true"]
        try p.run()
        usleep(300_000)
        XCTAssertTrue(p.isRunning, "flock through the other mount waits")
        kill(p.processIdentifier, SIGKILL)
        p.waitUntilExit()
        XCTAssertEqual(xts_flock(fa, XTS_LOCK_UN), 0)
        XCTAssertEqual(Harness.shell("flock -n -x '\(mnt2)/f' -c true"), 0, "the killed waiter holds nothing")
        close(fa)
        unmountBoth()
    }

    /// Without -o shared the kernel keeps locks, local to each mount (documented): two
    /// mounts do not see each other's.
    func testWithoutSharedLocksAreLocalToEachMount() throws {
        initVolume()
        mountTwice([])
        try write(mnt + "/f", [1])
        let fa = open(mnt + "/f", O_RDWR), fb = open(mnt2 + "/f", O_RDWR)
        XCTAssertEqual(xts_flock(fa, XTS_LOCK_EX | XTS_LOCK_NB), 0)
        XCTAssertEqual(xts_flock(fb, XTS_LOCK_EX | XTS_LOCK_NB), 0)
        let fa2 = open(mnt + "/f", O_RDWR)
        XCTAssertEqual(xts_flock(fa2, XTS_LOCK_EX | XTS_LOCK_NB), -1, "within one mount they still exclude")
        close(fa2)
        close(fa)
        close(fb)
        unmountBoth()
    }

    // MARK: - -o shared: what one mount changes, the other sees

    func readAll(_ path: String) -> [UInt8]? {
        try? read(path)
    }

    /// Compares bytes without printing megabytes of them: the sizes and the first difference.
    func assertBytes(_ got: [UInt8]?, _ expected: [UInt8], _ message: String = "bytes", file: StaticString = #filePath, line: UInt = #line) {
        guard let got else { return XCTFail("\(message): unreadable", file: file, line: line) }
        guard got != expected else { return }
        let first = zip(got, expected).enumerated().first { $0.element.0 != $0.element.1 }?.offset ?? min(got.count, expected.count)
        XCTFail("\(message): \(got.count) bytes, expected \(expected.count); first difference at \(first)", file: file, line: line)
    }

    func pwriteFile(_ path: String, _ bytes: [UInt8], at offset: Int, flags: Int32 = O_WRONLY) {
        let fd = open(path, flags)
        XCTAssertTrue(fd >= 0, "open \(path): \(errno)")
        XCTAssertEqual(bytes.withUnsafeBytes { pwrite(fd, $0.baseAddress, $0.count, off_t(offset)) }, bytes.count)
        close(fd)
    }

    func append(_ path: String, _ bytes: [UInt8]) {
        let fd = open(path, O_WRONLY | O_APPEND)
        XCTAssertTrue(fd >= 0)
        XCTAssertEqual(bytes.withUnsafeBytes { Glibc.write(fd, $0.baseAddress, $0.count) }, bytes.count)
        close(fd)
    }

    func exists(_ path: String) -> Bool {
        var st = stat()
        return lstat(path, &st) == 0
    }

    /// Every kind of change made and closed on `a` is seen with the right bytes on `b`,
    /// which has read (cached) the old state first.
    func checkChangesSeen(from a: String, on b: String, _ tag: String) throws {
        let p1 = pattern(20_000, seed: 11), p2 = pattern(20_000, seed: 12)
        // create
        try write(a + "/f", p1)
        assertBytes(readAll(b + "/f"), p1, "\(tag): create")
        // write in place, same size
        var expected = p1
        let patch = [UInt8](repeating: 0xAA, count: 100)
        pwriteFile(a + "/f", patch, at: 5000)
        expected.replaceSubrange(5000..<5100, with: patch)
        assertBytes(readAll(b + "/f"), expected, "\(tag): write in place")
        // O_TRUNC rewrite, same size: a new file header and key
        try write(a + "/f", p2)
        assertBytes(readAll(b + "/f"), p2, "\(tag): O_TRUNC rewrite")
        // append
        append(a + "/f", [1, 2, 3])
        assertBytes(readAll(b + "/f"), p2 + [1, 2, 3], "\(tag): append")
        // rename
        XCTAssertEqual(rename(a + "/f", a + "/g"), 0)
        XCTAssertFalse(exists(b + "/f"), "\(tag): renamed away")
        assertBytes(readAll(b + "/g"), p2 + [1, 2, 3], "\(tag): rename")
        // rename over an existing file
        try write(a + "/h", p1)
        _ = readAll(b + "/h")
        XCTAssertEqual(rename(a + "/h", a + "/g"), 0)
        assertBytes(readAll(b + "/g"), p1, "\(tag): rename over")
        XCTAssertFalse(exists(b + "/h"))
        // unlink
        XCTAssertEqual(unlink(a + "/g"), 0)
        XCTAssertFalse(exists(b + "/g"), "\(tag): unlink")
        // mkdir, a file in it
        XCTAssertEqual(mkdir(a + "/d", 0o755), 0)
        try write(a + "/d/x", [7, 7, 7])
        assertBytes(readAll(b + "/d/x"), [7, 7, 7], "\(tag): mkdir")
        // rmdir + mkdir of the same name: what b then creates there, a reads
        XCTAssertEqual(unlink(a + "/d/x"), 0)
        XCTAssertEqual(rmdir(a + "/d"), 0)
        XCTAssertEqual(mkdir(a + "/d", 0o700), 0)
        XCTAssertEqual(try FileManager.default.contentsOfDirectory(atPath: b + "/d"), [], "\(tag): the new directory is empty")
        try write(b + "/d/y", [9, 8, 7])
        XCTAssertEqual(try FileManager.default.contentsOfDirectory(atPath: a + "/d"), ["y"], "\(tag): rmdir + mkdir")
        assertBytes(readAll(a + "/d/y"), [9, 8, 7])
        // symlink
        XCTAssertEqual(symlink("some/target", a + "/s"), 0)
        XCTAssertEqual(try FileManager.default.destinationOfSymbolicLink(atPath: b + "/s"), "some/target", "\(tag): symlink")
        // chmod
        var st = stat()
        XCTAssertEqual(stat(b + "/d/y", &st), 0)
        XCTAssertEqual(chmod(a + "/d/y", 0o640), 0)
        XCTAssertEqual(stat(b + "/d/y", &st), 0)
        XCTAssertEqual(st.st_mode & 0o7777, 0o640, "\(tag): chmod")
        // directory rename
        XCTAssertEqual(rename(a + "/d", a + "/e"), 0)
        XCTAssertFalse(exists(b + "/d"), "\(tag): directory renamed away")
        assertBytes(readAll(b + "/e/y"), [9, 8, 7], "\(tag): directory rename")
        // clean up for the other direction
        XCTAssertEqual(unlink(b + "/e/y"), 0)
        XCTAssertEqual(rmdir(b + "/e"), 0)
        XCTAssertEqual(unlink(b + "/s"), 0)
        XCTAssertEqual(try FileManager.default.contentsOfDirectory(atPath: a), [], "\(tag): everything removed from the other side")
    }

    func testEveryChangeOnOneMountIsSeenOnTheOther() throws {
        initVolume()
        mountTwice()
        try checkChangesSeen(from: mnt, on: mnt2, "A to B")
        try checkChangesSeen(from: mnt2, on: mnt, "B to A")
        unmountBoth()
        XCTAssertEqual(Harness.run(["fsck", cipher, "--passfile", passfile]).status, 0, "fsck finds nothing wrong")
    }

    /// 300 creates from each mount at once in one directory: all 600 appear on both, each
    /// with its bytes.
    func testConcurrentCreatesFromBothMounts() throws {
        initVolume()
        mountTwice()
        XCTAssertEqual(mkdir(mnt + "/dir", 0o755), 0)
        let failures = Mutex<[String]>([])
        let roots = [mnt + "/dir/", mnt2 + "/dir/"]
        DispatchQueue.concurrentPerform(iterations: 2) { side in
            let root = roots[side]
            for i in 0..<300 {
                let name = (side == 0 ? "a" : "b") + "\(i)"
                let fd = open(root + name, O_WRONLY | O_CREAT | O_EXCL, 0o644)
                guard fd >= 0 else { failures.withLock { $0.append("\(name): \(errno)") }; continue }
                let bytes = Array("\(name) content".utf8)
                if bytes.withUnsafeBytes({ Glibc.write(fd, $0.baseAddress, $0.count) }) != bytes.count { failures.withLock { $0.append("\(name): write") } }
                close(fd)
            }
        }
        XCTAssertEqual(failures.withLock { $0 }, [])
        let expected = Set((0..<300).flatMap { ["a\($0)", "b\($0)"] })
        for m in [mnt, mnt2] {
            XCTAssertEqual(Set(try FileManager.default.contentsOfDirectory(atPath: m + "/dir")), expected, "\(m) lists all 600")
            for name in expected where readAll(m + "/dir/" + name) != Array("\(name) content".utf8) {
                XCTFail("\(m)/dir/\(name) has the wrong bytes")
            }
        }
        unmountBoth()
        let fsck = Harness.run(["fsck", cipher, "--passfile", passfile])
        XCTAssertEqual(fsck.status, 0, fsck.stdout)
    }

    /// A file open (and cached) on B, rewritten by A with a new key: B's open descriptor
    /// reads the new bytes, never plaintext decrypted with the old key, and a new open
    /// does not serve the old pages.
    func testFileRewrittenWhileOpenOnTheOtherMount() throws {
        initVolume()
        mountTwice()
        let old = pattern(50_000, seed: 21), new = pattern(50_000, seed: 22), shorter = pattern(7_000, seed: 23)
        try write(mnt + "/f", old)
        let fb = open(mnt2 + "/f", O_RDONLY)
        XCTAssertTrue(fb >= 0)
        func preadAll(_ fd: Int32) -> [UInt8] {
            var buf = [UInt8](repeating: 0, count: 100_000)
            let n = buf.withUnsafeMutableBytes { pread(fd, $0.baseAddress, $0.count, 0) }
            return n < 0 ? [] : Array(buf[0..<n])
        }
        assertBytes(preadAll(fb), old, "B reads the file")
        try write(mnt + "/f", new)   // O_TRUNC and new contents: a new header, a new key
        let seen = preadAll(fb)
        assertBytes(seen, new, "the open descriptor reads the new file with its new key" + (seen == old ? " (it read the old file: stale, not garbage)" : ""))
        assertBytes(readAll(mnt2 + "/f"), new, "a new open reads the new bytes")
        try write(mnt + "/f", shorter)
        assertBytes(preadAll(fb), shorter, "shorter, through the open descriptor")
        assertBytes(readAll(mnt2 + "/f"), shorter, "shorter, a new open")
        // And the other way round while A has it open.
        let fa = open(mnt + "/f", O_RDONLY)
        assertBytes(preadAll(fa), shorter, "A reads its own file")
        try write(mnt2 + "/f", old)
        assertBytes(preadAll(fa), old, "A open across B's rewrite")
        close(fa)
        close(fb)
        unmountBoth()
    }

    /// Both mounts open(O_CREAT) without O_EXCL the same 300 names at once: every open
    /// succeeds (one creates, the other opens what won), and each file holds one whole write.
    func testCreatesOfTheSameNamesRacingOnBothMounts() throws {
        initVolume()
        mountTwice()
        XCTAssertEqual(mkdir(mnt + "/dir", 0o755), 0)
        let failures = Mutex<[String]>([])
        let roots = [mnt + "/dir/", mnt2 + "/dir/"]
        DispatchQueue.concurrentPerform(iterations: 2) { side in
            for i in 0..<300 {
                let fd = open(roots[side] + "f\(i)", O_WRONLY | O_CREAT, 0o644)
                guard fd >= 0 else { failures.withLock { $0.append("side \(side) f\(i): errno \(errno)") }; continue }
                let bytes = Array("side \(side)".utf8)
                _ = bytes.withUnsafeBytes { pwrite(fd, $0.baseAddress, $0.count, 0) }
                close(fd)
            }
        }
        XCTAssertEqual(failures.withLock { $0 }, [])
        for i in 0..<300 {
            let got = readAll(mnt2 + "/dir/f\(i)")
            XCTAssertTrue(got == Array("side 0".utf8) || got == Array("side 1".utf8), "f\(i): \(String(describing: got))")
        }
        unmountBoth()
    }

    // MARK: - failures of the distributed filesystem (scripts/gluster-test)

    /// scripts/gluster-test's failure controls (XTSFS_SHARED_CONTROL): kill-brick N,
    /// restart-bricks, heal, cut a|b, reconnect a|b. Without them (a local double mount) there is
    /// no brick to lose and no network to cut.
    func failureControl() throws -> String {
        guard let c = ProcessInfo.processInfo.environment["XTSFS_SHARED_CONTROL"] else {
            throw XCTSkip("needs a distributed backing filesystem with failure controls (scripts/gluster-test)")
        }
        return c
    }

    func control(_ c: String, _ args: String, file: StaticString = #filePath, line: UInt = #line) {
        XCTAssertEqual(Harness.shell("'\(c)' \(args)"), 0, "control \(args)", file: file, line: line)
    }

    /// Creates or truncates `path` and writes `bytes`, fsync and close included: 0, or the
    /// first errno.
    func tryWrite(_ path: String, _ bytes: [UInt8]) -> Int32 {
        let fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0o644)
        guard fd >= 0 else { return errno }
        var e: Int32 = 0
        if bytes.withUnsafeBytes({ Glibc.write(fd, $0.baseAddress, $0.count) }) != bytes.count { e = errno == 0 ? EIO : errno }
        if e == 0 && fsync(fd) != 0 { e = errno }
        if close(fd) != 0 && e == 0 { e = errno }
        return e
    }

    /// The bytes of `path`, or the errno that refused them.
    func tryRead(_ path: String) -> (bytes: [UInt8]?, errno: Int32) {
        let fd = open(path, O_RDONLY)
        guard fd >= 0 else { return (nil, errno) }
        defer { close(fd) }
        var out: [UInt8] = []
        var buf = [UInt8](repeating: 0, count: 65536)
        while true {
            let n = buf.withUnsafeMutableBytes { Glibc.read(fd, $0.baseAddress, $0.count) }
            if n < 0 { return (nil, errno) }
            if n == 0 { return (out, 0) }
            out += buf[0..<n]
        }
    }

    /// The errors a backing filesystem that lost its storage may give: clean, expected.
    static let cleanErrors: Set<Int32> = [EROFS, ENOTCONN, EIO, ETIMEDOUT, EHOSTUNREACH, ENETUNREACH, ESTALE]

    /// Polls until `ready` holds (a recovery: clients reconnect in their own time), for at
    /// most `seconds`; false if it never did.
    func waitFor(_ seconds: Double, _ ready: () -> Bool) -> Bool {
        let deadline = Date().addingTimeInterval(seconds)
        while Date() < deadline {
            if ready() { return true }
            usleep(250_000)
        }
        return ready()
    }

    /// Both daemons still run and serve their mounts.
    func assertDaemonsAlive(_ what: String, file: StaticString = #filePath, line: UInt = #line) {
        for m in [mnt, mnt2] {
            XCTAssertTrue(Harness.isMounted(m), "\(what): \(m) still mounted", file: file, line: line)
            XCTAssertEqual(Harness.daemons(m).count, 1, "\(what): the daemon of \(m) still runs", file: file, line: line)
        }
    }

    /// One brick of three lost, then another once the first is back: both hosts go on
    /// reading and writing through xtsfs, and after the bricks return everything written
    /// meanwhile reads back on both.
    func testOneBrickLostBothHostsGoOn() throws {
        let c = try failureControl()
        initVolume()
        mountTwice()
        var expected: [String: [UInt8]] = [:]
        expected["before"] = pattern(30_000, seed: 31)
        try write(mnt + "/before", expected["before"]!)
        defer { control(c, "restart-bricks") }
        for (round, brick) in [1, 2].enumerated() {
            control(c, "kill-brick \(brick)")
            let tag = "brick \(brick) lost"
            for name in expected.keys.sorted() {
                assertBytes(readAll(mnt2 + "/" + name), expected[name]!, "\(tag): B reads \(name)")
                assertBytes(readAll(mnt + "/" + name), expected[name]!, "\(tag): A reads \(name)")
            }
            let a = pattern(12_345, seed: UInt64(40 + round)), b = pattern(70_000, seed: UInt64(50 + round))
            XCTAssertEqual(tryWrite(mnt + "/a\(round)", a), 0, "\(tag): A writes")
            XCTAssertEqual(tryWrite(mnt2 + "/b\(round)", b), 0, "\(tag): B writes")
            expected["a\(round)"] = a
            expected["b\(round)"] = b
            assertBytes(readAll(mnt2 + "/a\(round)"), a, "\(tag): B reads what A wrote")
            assertBytes(readAll(mnt + "/b\(round)"), b, "\(tag): A reads what B wrote")
            // A rewrite (new key) on B, seen by A; a directory made on A, a file renamed into it on B.
            let rewritten = pattern(20_000, seed: UInt64(60 + round))
            XCTAssertEqual(tryWrite(mnt2 + "/before", rewritten), 0, "\(tag): B rewrites")
            expected["before"] = rewritten
            assertBytes(readAll(mnt + "/before"), rewritten, "\(tag): A reads B's rewrite")
            XCTAssertEqual(mkdir(mnt + "/d\(round)", 0o755), 0, "\(tag): A makes a directory")
            XCTAssertEqual(rename(mnt2 + "/b\(round)", mnt2 + "/d\(round)/b"), 0, "\(tag): B renames into it")
            expected["d\(round)/b"] = expected.removeValue(forKey: "b\(round)")
            assertBytes(readAll(mnt + "/d\(round)/b"), b, "\(tag): A follows the rename")
            assertDaemonsAlive(tag)
            // Back, and healed before the next brick goes (with one brick restarted but not
            // healed and another lost, GlusterFS has no good copy of what the first missed).
            control(c, "restart-bricks")
            control(c, "heal")
        }
        // All bricks back: everything reads back on both hosts (the bricks that missed
        // writes are healed or passed over by the replication, never served stale).
        for m in [mnt, mnt2] {
            for (name, bytes) in expected { assertBytes(readAll(m + "/" + name), bytes, "bricks back: \(m)/\(name)") }
        }
        unmountBoth()
        let fsck = Harness.run(["fsck", cipher, "--passfile", passfile])
        XCTAssertEqual(fsck.status, 0, fsck.stdout + fsck.stderr)
    }

    /// Two bricks of three lost (no quorum): writes through xtsfs fail with clean errors
    /// (EROFS, ENOTCONN, EIO), reads give the right bytes or such an error, never others;
    /// no daemon dies. Once the bricks are restarted everything is readable and writable
    /// again on both hosts.
    func testQuorumLostGivesCleanErrorsAndRecovers() throws {
        let c = try failureControl()
        initVolume()
        mountTwice()
        let f = pattern(40_000, seed: 71), g = pattern(5_000, seed: 72)
        try write(mnt + "/f", f)
        try write(mnt2 + "/g", g)
        XCTAssertEqual(mkdir(mnt + "/d", 0o755), 0)
        defer { control(c, "restart-bricks") }
        control(c, "kill-brick 1")
        control(c, "kill-brick 2")
        let errs = Self.cleanErrors
        // Writes: a new file, a rewrite, an append, a mkdir, a rename, an unlink; on both hosts.
        for (host, m) in [("A", mnt), ("B", mnt2)] {
            let e = tryWrite(m + "/new" + host, [1, 2, 3])
            XCTAssertTrue(errs.contains(e), "\(host): a create without quorum gives a clean error, not \(e)")
            let r = tryWrite(m + "/f", pattern(40_000, seed: 73))
            XCTAssertTrue(errs.contains(r), "\(host): a rewrite without quorum gives a clean error, not \(r)")
            let md = mkdir(m + "/e" + host, 0o755) == 0 ? 0 : errno
            XCTAssertTrue(errs.contains(md), "\(host): mkdir without quorum gives a clean error, not \(md)")
            let rn = rename(m + "/g", m + "/d/g") == 0 ? 0 : errno
            XCTAssertTrue(errs.contains(rn), "\(host): rename without quorum gives a clean error, not \(rn)")
            // Reads: the right bytes, or a clean error.
            for (name, bytes) in [("f", f), ("g", g)] {
                let got = tryRead(m + "/" + name)
                if let b = got.bytes { assertBytes(b, bytes, "\(host) reads \(name) without quorum") } else {
                    XCTAssertTrue(errs.contains(got.errno), "\(host): reading \(name) without quorum: \(got.errno)")
                }
            }
        }
        assertDaemonsAlive("quorum lost")
        print("quorum lost: a create got \(String(cString: strerror(tryWrite(mnt + "/newA", [0]))))")
        control(c, "restart-bricks")
        // The clients reconnect to the restarted bricks in their own time.
        let back = waitFor(90) { tryWrite(mnt + "/newA", [1, 2, 3]) == 0 && tryWrite(mnt2 + "/newB", [4, 5, 6]) == 0 }
        XCTAssertTrue(back, "writable again on both hosts after the bricks were restarted")
        assertDaemonsAlive("bricks back")
        for m in [mnt, mnt2] {
            assertBytes(readAll(m + "/f"), f, "\(m)/f unchanged by the refused rewrites")
            assertBytes(readAll(m + "/g"), g, "\(m)/g")
            assertBytes(readAll(m + "/newA"), [1, 2, 3], "\(m)/newA")
            assertBytes(readAll(m + "/newB"), [4, 5, 6], "\(m)/newB")
            XCTAssertFalse(exists(m + "/eA") || exists(m + "/eB") || exists(m + "/d/g"), "\(m): nothing refused happened after all")
        }
        let f2 = pattern(33_333, seed: 74)
        XCTAssertEqual(tryWrite(mnt2 + "/f", f2), 0)
        assertBytes(readAll(mnt + "/f"), f2, "A reads B's rewrite after the recovery")
        XCTAssertEqual(rename(mnt + "/g", mnt + "/d/g"), 0)
        assertBytes(readAll(mnt2 + "/d/g"), g, "B follows A's rename after the recovery")
        unmountBoth()
        let fsck = Harness.run(["fsck", cipher, "--passfile", passfile])
        XCTAssertEqual(fsck.status, 0, fsck.stdout + fsck.stderr)
    }

    /// Host B cut off from the storage by a network partition while A goes on changing the
    /// volume; B's own attempts fail cleanly (or, if one succeeds, its bytes are kept).
    /// Reconnected, B sees every change A made, and nothing either host wrote is lost.
    func testHostCutOffByAPartitionAndReconnected() throws {
        let c = try failureControl()
        initVolume()
        mountTwice()
        let fromA = pattern(25_000, seed: 81), fromB = pattern(9_000, seed: 82)
        try write(mnt + "/fromA", fromA)
        try write(mnt2 + "/fromB", fromB)
        assertBytes(readAll(mnt2 + "/fromA"), fromA, "B reads A's file before the cut")
        control(c, "cut b")
        defer { control(c, "reconnect b") }
        // A goes on: a create, a rewrite (new key), a rename of B's file, a directory.
        let during = pattern(44_000, seed: 83), rewritten = pattern(25_000, seed: 84)
        XCTAssertEqual(tryWrite(mnt + "/during", during), 0, "A writes while B is cut off")
        XCTAssertEqual(tryWrite(mnt + "/fromA", rewritten), 0, "A rewrites while B is cut off")
        XCTAssertEqual(rename(mnt + "/fromB", mnt + "/fromB2"), 0)
        XCTAssertEqual(mkdir(mnt + "/dirA", 0o755), 0)
        // B tries to write (its client gives up after the volume's ping timeout).
        let fromBDuring = pattern(3_000, seed: 85)
        let e = tryWrite(mnt2 + "/fromBDuring", fromBDuring)
        XCTAssertTrue(e == 0 || Self.cleanErrors.contains(e), "B's write while cut off: a clean error or success, not \(e)")
        print("cut off: B's write got \(e == 0 ? "success" : String(cString: strerror(e)))")
        let r = tryRead(mnt2 + "/fromA")
        if let b = r.bytes {
            XCTAssertTrue(b == fromA || b == rewritten, "B cut off reads the old or the new file, never garbage (\(b.count) bytes)")
        } else {
            XCTAssertTrue(Self.cleanErrors.contains(r.errno), "B's read while cut off: \(r.errno)")
        }
        XCTAssertEqual(Harness.daemons(mnt2).count, 1, "B's daemon survives the partition")
        control(c, "reconnect b")
        // B's client reconnects in its own time.
        let back = waitFor(90) { tryRead(mnt2 + "/during").bytes == during }
        XCTAssertTrue(back, "B sees A's file written during the cut once reconnected")
        assertBytes(readAll(mnt2 + "/fromA"), rewritten, "B reads A's rewrite")
        assertBytes(readAll(mnt2 + "/fromB2"), fromB, "B's own file, renamed by A, is intact")
        XCTAssertFalse(exists(mnt2 + "/fromB"))
        XCTAssertTrue(exists(mnt2 + "/dirA"), "B sees A's directory")
        if e == 0 {
            assertBytes(readAll(mnt + "/fromBDuring"), fromBDuring, "what B's write during the cut reported as written is kept")
        }
        // B writes again and A sees it.
        let after = pattern(11_000, seed: 86)
        XCTAssertEqual(tryWrite(mnt2 + "/dirA/after", after), 0, "B writes once reconnected")
        assertBytes(readAll(mnt + "/dirA/after"), after, "A reads what B wrote after the reconnect")
        assertDaemonsAlive("after the partition")
        unmountBoth()
        let fsck = Harness.run(["fsck", cipher, "--passfile", passfile])
        XCTAssertEqual(fsck.status, 0, fsck.stdout + fsck.stderr)
    }

    func testSharedRefusesANameAndAttributeCache() throws {
        initVolume()
        assertMountRefused(options: "shared,cache_timeout=5", saying: "cache_timeout=0")
    }
}
