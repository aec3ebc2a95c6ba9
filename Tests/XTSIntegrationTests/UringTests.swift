import Foundation
import XCTest
import XTSVolume
#if canImport(Glibc)
import Glibc
#endif

/// `-o uring`: FUSE over io_uring, the kernel's request queue per CPU, instead of
/// /dev/fuse. The kernel offers it only while root has set
/// /sys/module/fuse/parameters/enable_uring; these tests set it for their own mounts and
/// put back what was there.
final class UringTests: VolumeTestCase {
    static let param = "/sys/module/fuse/parameters/enable_uring"
    private var saved: String?

    override func setUpWithError() throws {
        try super.setUpWithError()
        guard FileManager.default.fileExists(atPath: Self.param) else {
            throw XCTSkip("this kernel has no FUSE over io_uring (Linux 6.14+, CONFIG_FUSE_IO_URING)")
        }
        guard geteuid() == 0 else { throw XCTSkip("turning FUSE over io_uring on needs root") }
        guard !DamageLog.syslogAvailable else { throw XCTSkip("this machine has syslog: the daemon's notes are not in a file") }
        saved = try String(contentsOfFile: Self.param, encoding: .utf8).trimmingCharacters(in: .whitespacesAndNewlines)
        try Self.setKernelSwitch(true)
    }

    override func tearDownWithError() throws {
        if let saved { try? Self.setKernelSwitch(saved == "Y") }
        try super.tearDownWithError()
    }

    static func setKernelSwitch(_ on: Bool) throws {
        let fd = open(param, O_WRONLY)
        guard fd >= 0 else { throw POSIXError(POSIXErrorCode(rawValue: errno) ?? .EIO) }
        defer { close(fd) }
        let text = on ? "1\n" : "0\n"
        guard text.withCString({ Glibc.write(fd, $0, strlen($0)) }) == text.utf8.count else {
            throw POSIXError(POSIXErrorCode(rawValue: errno) ?? .EIO)
        }
    }

    /// The daemon's log (its notes and the SIGUSR1 counter lines), read until it holds `text`.
    func log(waitingFor text: String) -> String {
        let file = DamageLog.file(mountpoint: mnt)
        var log = ""
        let deadline = Date().addingTimeInterval(10)
        repeat {
            log = (try? String(contentsOfFile: file, encoding: .utf8)) ?? ""
            if log.contains(text) { break }
            usleep(50_000)
        } while Date() < deadline
        return log
    }

    /// The last SIGUSR1 counter line of this mount: (all requests, those through io_uring).
    func counts() -> (total: Int, ring: Int?) {
        let before = log(waitingFor: "").components(separatedBy: "\n").filter { $0.contains("\(mnt): requests ") }.count
        let pids = Harness.daemons(mnt)
        XCTAssertEqual(pids.count, 1)
        if let pid = pids.first { kill(pid, SIGUSR1) }
        var lines: [String] = []
        let deadline = Date().addingTimeInterval(10)
        repeat {
            lines = log(waitingFor: "").components(separatedBy: "\n").filter { $0.contains("\(mnt): requests ") }
            if lines.count > before { break }
            usleep(50_000)
        } while Date() < deadline
        guard let line = lines.last, lines.count > before else {
            XCTFail("no counter line after SIGUSR1")
            return (0, nil)
        }
        func number(after marker: String) -> Int? {
            guard let r = line.range(of: marker) else { return nil }
            return Int(line[r.upperBound...].prefix { $0.isNumber })
        }
        return (number(after: "requests ") ?? 0, number(after: "through io_uring "))
    }

    /// A tree with every kind of object and operation: files of every size class, a large
    /// one written and read in 1 MiB requests, a directory of 3,000 entries (many READDIRs),
    /// renames, hard links, symlinks, xattrs, truncation, unlinks.
    func exercise(_ root: String) throws -> [String: [UInt8]] {
        var expect: [String: [UInt8]] = [:]
        let fm = FileManager.default
        try fm.createDirectory(atPath: root + "/d/e", withIntermediateDirectories: true)
        for (i, size) in [0, 1, 15, 4095, 4096, 4097, 65_536, (1 << 20) + 17, 3 << 20].enumerated() {
            let bytes = pattern(size, seed: UInt64(i + 1))
            try write(root + "/d/f\(i)", bytes)
            expect["d/f\(i)"] = bytes
        }
        for i in 0..<3000 { try write(root + "/d/e/n\(i)", Array("entry \(i)".utf8)) }
        XCTAssertEqual(try fm.contentsOfDirectory(atPath: root + "/d/e").count, 3000)
        for i in stride(from: 0, to: 3000, by: 7) { XCTAssertEqual(unlink(root + "/d/e/n\(i)"), 0) }
        for i in 0..<3000 where i % 7 != 0 { expect["d/e/n\(i)"] = Array("entry \(i)".utf8) }
        XCTAssertEqual(rename(root + "/d/f1", root + "/d/renamed"), 0)
        expect["d/renamed"] = expect.removeValue(forKey: "d/f1")
        XCTAssertEqual(link(root + "/d/f2", root + "/d/e/hard"), 0)
        expect["d/e/hard"] = expect["d/f2"]
        XCTAssertEqual(symlink("../f3", root + "/d/e/sym"), 0)
        XCTAssertEqual(try fm.destinationOfSymbolicLink(atPath: root + "/d/e/sym"), "../f3")
        XCTAssertEqual(setxattr(root + "/d/f4", "user.k", "value", 5, 0), 0)
        var buf = [UInt8](repeating: 0, count: 16)
        XCTAssertEqual(getxattr(root + "/d/f4", "user.k", &buf, 16), 5)
        XCTAssertEqual(Array(buf.prefix(5)), Array("value".utf8))
        XCTAssertEqual(truncate(root + "/d/f7", 100_000), 0)
        expect["d/f7"] = Array(expect["d/f7"]!.prefix(100_000))
        for (path, bytes) in expect { XCTAssertEqual(try read(root + "/" + path), bytes, path) }
        return expect
    }

    func testEverythingGoesThroughTheRingsAndStays() throws {
        initVolume()
        mount(["-o", "uring"])
        XCTAssertTrue(log(waitingFor: "FUSE over io_uring").contains("-o uring: FUSE over io_uring, one queue per CPU"),
                      log(waitingFor: ""))
        let expect = try exercise(mnt)
        let (total, ring) = counts()
        XCTAssertGreaterThan(total, 6000)
        // Everything after INIT comes off the rings; forgets and interrupts alone use /dev/fuse.
        XCTAssertNotNil(ring, "no io_uring count in the counter line")
        XCTAssertGreaterThan(ring ?? 0, total * 9 / 10, "requests through io_uring: \(ring ?? 0) of \(total)")
        unmount()
        // The same tree through /dev/fuse.
        mount()
        for (path, bytes) in expect { XCTAssertEqual(try read(mnt + "/" + path), bytes, path) }
        XCTAssertNil(counts().ring, "no rings without -o uring")
        unmount()
    }

    func testWithoutTheKernelSwitchItServesThroughDevFuseAndSaysWhy() throws {
        try Self.setKernelSwitch(false)
        initVolume()
        mount(["-o", "uring"])
        XCTAssertTrue(log(waitingFor: "enable_uring").contains("only with \(Self.param) set to 1"), log(waitingFor: ""))
        _ = try exercise(mnt)
        XCTAssertNil(counts().ring)
        unmount()
    }

    func testDifferentialRunAndConcurrentWorkersThroughTheRings() throws {
        let plain = scratch + "/plain"
        try FileManager.default.createDirectory(atPath: plain, withIntermediateDirectories: false)
        initVolume()
        mount(["-o", "uring"])
        let e = DiffRun().exercise(seed: 11, steps: 400, plain: plain, mnt: mnt)
        if let failure = e.failure { XCTFail(failure) }
        XCTAssertGreaterThan(e.succeeded, 80)
        let c = DifferentialTests.concurrent(seeds: [21, 22, 23, 24], steps: 200, plain: plain, mnt: mnt)
        for f in c.failures { XCTFail(f) }
        XCTAssertEqual(try Snapshot.take(mnt, excluding: c.abandoned), try Snapshot.take(plain, excluding: c.abandoned))
        XCTAssertGreaterThan(counts().ring ?? 0, 1000)
        let before = try Snapshot.take(mnt, excluding: c.abandoned)
        unmount()
        mount()
        XCTAssertEqual(try Snapshot.take(mnt, excluding: c.abandoned), before, "tree changed across a remount without the rings")
        unmount()
    }

    func testRefusedWithShared() throws {
        initVolume()
        assertMountRefused(options: "uring,shared", saying: "-o uring with -o shared")
    }
}
