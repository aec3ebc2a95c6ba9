import Foundation
import XCTest
import XTSVolume
#if canImport(Glibc)
import Glibc
#endif

/// What the user reads when something is off: every message names the way out.
final class MessageTests: VolumeTestCase {
    func testStatusOfAMountPointNamesItsVolume() throws {
        initVolume()
        mount()
        let r = Harness.run(["status", mnt])
        XCTAssertEqual(r.status, ExitStatus.notAVolume.rawValue)
        XCTAssertTrue(r.stderr.hasPrefix("xtsfs: ") && r.stderr.contains("mount point") && r.stderr.contains(cipher), r.stderr)
    }

    func testSwappedArgumentsAreSaidToBeSwapped() throws {
        initVolume()
        let r = Harness.run(["mount", mnt, cipher, "--passfile", passfile])
        XCTAssertEqual(r.status, ExitStatus.usage.rawValue, r.stderr)
        XCTAssertTrue(r.stderr.contains("swapped"), r.stderr)
        XCTAssertFalse(r.stderr.contains("nonempty"), r.stderr)
        XCTAssertFalse(Harness.isMounted(cipher))
    }

    func testUnmountOfAnotherFilesystemSaysWhatItIs() {
        let r = Harness.run(["unmount", "/proc"])
        XCTAssertNotEqual(r.status, 0)
        XCTAssertTrue(r.stderr.contains("not an xtsfs mount") && r.stderr.contains("proc"), r.stderr)
        XCTAssertFalse(r.stderr.contains("is not mounted"), r.stderr)
    }

    func testEmptyArgumentsAreUsageErrors() {
        for args in [["mount", "", mnt], ["status", ""], ["init", ""], ["unmount", ""], ["mount", cipher, mnt, "--passfile", ""]] {
            let r = Harness.run(args)
            XCTAssertEqual(r.status, ExitStatus.usage.rawValue, "\(args): \(r.stderr)")
            XCTAssertTrue(r.stderr.hasPrefix("xtsfs: "), r.stderr)
        }
    }

    func testEveryErrorHasThePrefix() {
        for args in [["mount"], ["status", scratch + "/none"], ["bogus"], ["status", "--bogus", "x"]] {
            let r = Harness.run(args)
            XCTAssertNotEqual(r.status, 0)
            XCTAssertTrue(r.stderr.hasPrefix("xtsfs: "), "\(args): \(r.stderr)")
        }
    }

    func testStaleMountIsNamedWithItsCure() throws {
        initVolume()
        mount()
        // A root daemon's unmount helper detaches the mount when the daemon dies: a stale
        // mount needs both gone at once (as after an OOM kill of the whole group).
        for pid in Harness.unmountHelpers(mnt) { kill(pid, SIGKILL) }
        for pid in Harness.daemons(mnt) { kill(pid, SIGKILL) }
        let deadline = Date().addingTimeInterval(10)
        while !(Harness.daemons(mnt).isEmpty && Harness.unmountHelpers(mnt).isEmpty) && Date() < deadline { usleep(20_000) }
        guard Harness.isMounted(mnt) else { return XCTFail("the killed daemon's mount is gone: no stale mount to test") }
        let r = Harness.run(["mount", cipher, mnt, "--passfile", passfile])
        XCTAssertEqual(r.status, ExitStatus.mountFailed.rawValue, r.stderr)
        XCTAssertTrue(r.stderr.contains("fusermount3 -u -z"), r.stderr)
    }

    /// Warnings about damage reach the user without syslog: the daemon writes them to the
    /// log file that `mount` names.
    func testDaemonWarningsReachALogFileWithoutSyslog() throws {
        guard !DamageLog.syslogAvailable else { throw XCTSkip("this machine has syslog") }
        initVolume()
        let file = DamageLog.file(mountpoint: mnt)
        try? FileManager.default.removeItem(atPath: file)
        let r = Harness.run(["mount", cipher, mnt, "--passfile", passfile])
        XCTAssertEqual(r.status, 0, r.stderr)
        XCTAssertTrue(r.stderr.contains(file), r.stderr)
        try write(cipher + "/planted.sync-conflict-1", [1])
        _ = try FileManager.default.contentsOfDirectory(atPath: mnt)
        unmount()
        let log = try String(contentsOfFile: file, encoding: .utf8)
        XCTAssertTrue(log.contains("planted.sync-conflict-1"), log)
        try? FileManager.default.removeItem(atPath: file)
    }

    /// `kill -USR1` on the daemon logs the requests it served, by operation.
    func testSIGUSR1LogsRequestCounts() throws {
        guard !DamageLog.syslogAvailable else { throw XCTSkip("this machine has syslog") }
        initVolume()
        let file = DamageLog.file(mountpoint: mnt)
        try? FileManager.default.removeItem(atPath: file)
        defer { try? FileManager.default.removeItem(atPath: file) }
        mount()
        for i in 0..<3 { try write(mnt + "/f\(i)", Array("file \(i)".utf8)) }
        let pids = Harness.daemons(mnt)
        XCTAssertEqual(pids.count, 1)
        kill(pids[0], SIGUSR1)
        var log = ""
        let deadline = Date().addingTimeInterval(10)
        while !log.contains("requests") && Date() < deadline {
            usleep(50_000)
            log = (try? String(contentsOfFile: file, encoding: .utf8)) ?? ""
        }
        XCTAssertTrue(log.contains("\(mnt): requests "), log)
        XCTAssertTrue(log.contains("CREATE 3"), log)
        XCTAssertTrue(log.contains("written 18 B"), log)
        XCTAssertTrue(Harness.isMounted(mnt), "SIGUSR1 must not unmount")
        unmount()
    }
}
