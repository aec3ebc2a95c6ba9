import Foundation
import XCTest
import XTSVolume
#if canImport(Glibc)
import Glibc
#endif

/// A root mount's daemon sets no_new_privs and keeps only the capabilities serving needs;
/// unmounting (xtsfs unmount, SIGTERM, SIGINT in the foreground) still works.
final class PrivilegeTests: VolumeTestCase {
    override func setUpWithError() throws {
        try super.setUpWithError()
        guard geteuid() == 0 else { throw XCTSkip("root mounts need root") }
    }

    /// Fields of /proc/PID/status (or /proc/PID/task/TID/status).
    func status(_ path: String) -> [String: String] {
        guard let text = try? String(contentsOfFile: path + "/status", encoding: .utf8) else { return [:] }
        var out: [String: String] = [:]
        for line in text.split(separator: "\n") {
            guard let colon = line.firstIndex(of: ":") else { continue }
            out[String(line[..<colon])] = line[line.index(after: colon)...].trimmingCharacters(in: .whitespaces)
        }
        return out
    }

    func caps(_ fields: [String: String], _ key: String) -> UInt64? { fields[key].flatMap { UInt64($0, radix: 16) } }

    func helpers(_ mountpoint: String) -> [Int32] { Harness.unmountHelpers(mountpoint) }

    func waitGone(_ what: () -> [Int32], file: StaticString = #filePath, line: UInt = #line) {
        let deadline = Date().addingTimeInterval(10)
        while !what().isEmpty && Date() < deadline { usleep(20_000) }
        XCTAssertTrue(what().isEmpty, "process still running", file: file, line: line)
    }

    /// Every thread of `pid`: no_new_privs, and exactly `expected` as permitted and effective.
    func checkRestricted(_ pid: Int32, expected: UInt64, file: StaticString = #filePath, line: UInt = #line) {
        let tasks = (try? FileManager.default.contentsOfDirectory(atPath: "/proc/\(pid)/task")) ?? []
        XCTAssertFalse(tasks.isEmpty, file: file, line: line)
        var checked = 0
        for tid in tasks {
            let s = status("/proc/\(pid)/task/\(tid)")
            // A worker thread may end between the listing and the read (libfuse retires idle
            // workers): nothing left to check for it.
            if s.isEmpty && access("/proc/\(pid)/task/\(tid)", F_OK) != 0 { continue }
            checked += 1
            XCTAssertEqual(s["NoNewPrivs"], "1", "thread \(tid)", file: file, line: line)
            XCTAssertEqual(caps(s, "CapEff"), expected, "thread \(tid) CapEff", file: file, line: line)
            XCTAssertEqual(caps(s, "CapPrm"), expected, "thread \(tid) CapPrm", file: file, line: line)
            XCTAssertEqual(caps(s, "CapInh"), 0, "thread \(tid) CapInh", file: file, line: line)
            XCTAssertEqual(caps(s, "CapAmb"), 0, "thread \(tid) CapAmb", file: file, line: line)
        }
        XCTAssertGreaterThan(checked, 0, "no thread of \(pid) left to check", file: file, line: line)
    }

    var ours: UInt64 { caps(status("/proc/self"), "CapPrm") ?? 0 }

    func testDaemonKeepsOnlyWhatServingNeedsAndStillServes() throws {
        initVolume()
        mount()
        let pids = Harness.daemons(mnt)
        XCTAssertEqual(pids.count, 1)
        guard let pid = pids.first else { return }
        let serving = DaemonPrivileges.mask(DaemonPrivileges.serving) & ours
        XCTAssertEqual(serving & (1 << 21), 0, "CAP_SYS_ADMIN must go")
        checkRestricted(pid, expected: serving)
        // The helper keeps only CAP_SYS_ADMIN, for umount2.
        let helper = helpers(mnt)
        XCTAssertEqual(helper.count, 1)
        if let h = helper.first {
            // A fresh exec: give it the moment it takes to start and restrict itself.
            let deadline = Date().addingTimeInterval(5)
            while status("/proc/\(h)")["NoNewPrivs"] != "1" && Date() < deadline { usleep(20_000) }
            checkRestricted(h, expected: (1 << 21) & ours)
        }

        // What serving needs still works: ownership, modes with setuid, device nodes,
        // another user's private file.
        XCTAssertEqual(chmod(scratch, 0o755), 0)
        XCTAssertEqual(chmod(mnt, 0o777), 0)
        try write(mnt + "/f", Array("x".utf8))
        XCTAssertEqual(chown(mnt + "/f", 65534, 65534), 0)
        XCTAssertEqual(chmod(mnt + "/f", 0o4755), 0)
        var st = stat()
        XCTAssertEqual(stat(mnt + "/f", &st), 0)
        XCTAssertEqual(st.st_uid, 65534)
        XCTAssertEqual(st.st_mode & 0o7777, 0o4755)
        XCTAssertEqual(mknod(mnt + "/null", S_IFCHR | 0o600, dev_t((1 << 8) | 3)), 0)
        XCTAssertEqual(Harness.shell("setpriv --reuid=65534 --regid=65534 --clear-groups sh -c 'echo theirs > \(mnt)/theirs && chmod 600 \(mnt)/theirs'"), 0)
        XCTAssertEqual(try read(mnt + "/theirs"), Array("theirs\n".utf8))
        try write(mnt + "/theirs", Array("root writes".utf8))

        unmount()
        waitGone { helpers(mnt) }
    }

    func testSIGTERMStillUnmountsLazilyAfterTheDrop() throws {
        initVolume()
        mount()
        try write(mnt + "/open", Array("busy".utf8))
        let fd = open(mnt + "/open", O_RDONLY)
        XCTAssertGreaterThanOrEqual(fd, 0)
        guard let pid = Harness.daemons(mnt).first else { return XCTFail("no daemon") }
        kill(pid, SIGTERM)
        let deadline = Date().addingTimeInterval(10)
        while Harness.isMounted(mnt) && Date() < deadline { usleep(20_000) }
        XCTAssertFalse(Harness.isMounted(mnt), "SIGTERM should detach the mount")
        // Detached, not killed: the open file is still served until closed.
        var buf = [UInt8](repeating: 0, count: 4)
        XCTAssertEqual(pread(fd, &buf, 4, 0), 4)
        XCTAssertEqual(buf, Array("busy".utf8))
        close(fd)
        waitGone { Harness.daemons(mnt) }
        waitGone { helpers(mnt) }
    }

    func testForegroundMountIsRestrictedAndCtrlCUnmounts() throws {
        initVolume()
        let p = Process()
        p.executableURL = URL(fileURLWithPath: Harness.binary)
        p.arguments = ["mount", cipher, mnt, "--passfile", passfile, "-f"]
        p.standardInput = FileHandle.nullDevice
        p.standardOutput = FileHandle.nullDevice
        p.standardError = FileHandle.nullDevice
        try p.run()
        defer { if p.isRunning { kill(p.processIdentifier, SIGKILL) } }
        let deadline = Date().addingTimeInterval(10)
        while !Harness.isMounted(mnt) && Date() < deadline { usleep(20_000) }
        XCTAssertTrue(Harness.isMounted(mnt))
        try write(mnt + "/fg", Array("foreground".utf8))
        checkRestricted(p.processIdentifier, expected: DaemonPrivileges.mask(DaemonPrivileges.serving) & ours)
        kill(p.processIdentifier, SIGINT)
        p.waitUntilExit()
        XCTAssertEqual(p.terminationStatus, 0)
        XCTAssertFalse(Harness.isMounted(mnt))
        waitGone { helpers(mnt) }
    }

    func testRootWarnsWhenOtherUsersCanChangeCipherDir() throws {
        initVolume()
        let warning = "other users can change CIPHERDIR"
        var r = Harness.run(["mount", cipher, mnt, "--passfile", passfile])
        XCTAssertEqual(r.status, 0, r.stderr)
        XCTAssertFalse(r.stderr.contains(warning), r.stderr)
        unmount()
        let cases: [(String, () -> Int32, () -> Int32, String)] = [
            ("world-writable", { chmod(self.cipher, 0o707) }, { chmod(self.cipher, 0o700) }, "writable by every user"),
            ("group-writable parent", { chmod(self.scratch, 0o770) }, { chmod(self.scratch, 0o700) }, "writable by its group"),
            ("owned by another user", { chown(self.cipher, 65534, 65534) }, { chown(self.cipher, 0, 0) }, "owned by uid 65534"),
        ]
        for (what, change, undo, why) in cases {
            XCTAssertEqual(change(), 0, what)
            r = Harness.run(["mount", cipher, mnt, "--passfile", passfile])
            XCTAssertEqual(r.status, 0, "\(what): \(r.stderr)")
            XCTAssertTrue(r.stderr.contains(warning) && r.stderr.contains(why), "\(what): \(r.stderr)")
            XCTAssertEqual(r.stderr.split(separator: "\n").filter { $0.contains(warning) }.count, 1, r.stderr)
            unmount()
            XCTAssertEqual(undo(), 0, what)
        }
        // A sticky world-writable directory above (like /tmp) is fine.
        XCTAssertEqual(chmod(scratch, 0o1777), 0)
        r = Harness.run(["mount", cipher, mnt, "--passfile", passfile])
        XCTAssertFalse(r.stderr.contains(warning), r.stderr)
        unmount()
        XCTAssertEqual(chmod(scratch, 0o700), 0)
    }
}
