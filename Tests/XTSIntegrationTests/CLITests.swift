import Foundation
import XCTest
import XTSCrypto
import XTSVolume
#if canImport(Glibc)
import Glibc
#endif

/// The command line as a user meets it: exit codes and messages for good and bad input.
final class CLITests: VolumeTestCase {
    func testInitCreatesVolumeAndStatusDescribesIt() throws {
        initVolume()
        let names = try FileManager.default.contentsOfDirectory(atPath: cipher).sorted()
        XCTAssertEqual(names, ["xtsfs.dir", "xtsfs.header", "xtsfs.header2"])
        let r = Harness.run(["status", cipher])
        XCTAssertEqual(r.status, 0, r.stderr)
        XCTAssertTrue(r.stdout.contains("Format version:  1"), r.stdout)
        XCTAssertTrue(r.stdout.contains("passphrase"), r.stdout)
        XCTAssertTrue(r.stdout.contains("memoryKiB=8192"), r.stdout)
        let j = Harness.run(["status", cipher, "--json"])
        XCTAssertEqual(j.status, 0)
        let obj = try JSONSerialization.jsonObject(with: Data(j.stdout.utf8)) as? [String: Any]
        XCTAssertEqual(obj?["formatVersion"] as? Int, 1)
        XCTAssertEqual((obj?["keyslots"] as? [[String: Any]])?.count, 1)
        XCTAssertEqual(obj?["blockSize"] as? Int, 4096)
        // Nothing secret: neither the passphrase nor anything but public header facts.
        XCTAssertFalse(j.stdout.contains(Self.passphrase))
    }

    func testInitRefusesNonEmptyDirectoryAndExistingVolume() throws {
        try FileManager.default.createDirectory(atPath: cipher, withIntermediateDirectories: true)
        try "x".write(toFile: cipher + "/existing", atomically: true, encoding: .utf8)
        var r = Harness.run(["init", cipher, "--passfile", passfile] + Self.cheapKDF)
        XCTAssertEqual(r.status, ExitStatus.refused.rawValue, r.stderr)
        XCTAssertTrue(r.stderr.contains("not empty"), r.stderr)
        XCTAssertEqual(try FileManager.default.contentsOfDirectory(atPath: cipher), ["existing"])
        try FileManager.default.removeItem(atPath: cipher + "/existing")
        initVolume()
        r = Harness.run(["init", cipher, "--passfile", passfile] + Self.cheapKDF)
        XCTAssertEqual(r.status, ExitStatus.refused.rawValue)
        XCTAssertTrue(r.stderr.contains("already an xtsfs volume"), r.stderr)
    }

    func testWrongPassphraseHasItsOwnExitCodeAndChangesNothing() throws {
        initVolume()
        let before = backingFiles().map { $0.bytes }
        let wrong = scratch + "/wrong"
        try "not the passphrase\n".write(toFile: wrong, atomically: true, encoding: .utf8)
        let r = Harness.run(["mount", cipher, mnt, "--passfile", wrong])
        XCTAssertEqual(r.status, ExitStatus.wrongKey.rawValue, r.stderr)
        XCTAssertTrue(r.stderr.contains("wrong passphrase"), r.stderr)
        XCTAssertFalse(Harness.isMounted(mnt))
        XCTAssertEqual(backingFiles().map { $0.bytes }, before, "a failed unlock must not touch the volume")
    }

    func testNotAVolume() throws {
        try FileManager.default.createDirectory(atPath: cipher, withIntermediateDirectories: true)
        var r = Harness.run(["mount", cipher, mnt, "--passfile", passfile])
        XCTAssertEqual(r.status, ExitStatus.notAVolume.rawValue, r.stderr)
        XCTAssertTrue(r.stderr.contains("not an xtsfs volume"), r.stderr)
        r = Harness.run(["status", scratch + "/does-not-exist"])
        XCTAssertEqual(r.status, ExitStatus.notAVolume.rawValue, r.stderr)
        XCTAssertTrue(r.stderr.contains("does not exist"), r.stderr)
    }

    func testCorruptHeadersGiveClearErrorsNeverCrash() throws {
        initVolume()
        let primary = cipher + "/xtsfs.header", secondary = cipher + "/xtsfs.header2"
        let good = try read(primary)
        // Every kind of damage to both copies: a clear error with the corrupt-header code.
        let damaged: [(String, [UInt8])] = [
            ("bit flip", { var b = good; b[100] ^= 0x10; return b }()),
            ("truncated", Array(good.prefix(good.count / 2))),
            ("empty", []),
            ("wrong magic", { var b = good; b[0] = UInt8(ascii: "Y"); return b }()),
            ("garbage", pattern(good.count, seed: 9)),
        ]
        for (what, bytes) in damaged {
            try write(primary, bytes)
            try write(secondary, bytes)
            let r = Harness.run(["mount", cipher, mnt, "--passfile", passfile])
            XCTAssertEqual(r.status, ExitStatus.corruptHeader.rawValue, "\(what): \(r.stderr)")
            XCTAssertTrue(r.stderr.contains("header"), "\(what): \(r.stderr)")
            XCTAssertFalse(Harness.isMounted(mnt))
            let s = Harness.run(["status", cipher])
            XCTAssertEqual(s.status, ExitStatus.corruptHeader.rawValue, "\(what): \(s.stderr)")
        }
        // A future format version: "unsupported", not "corrupt".
        var newer = good
        newer[8] = 2
        // A bit flip in the version field is damage ("corrupt"), not "written by a newer xtsfs".
        try write(primary, newer)
        try write(secondary, newer)
        let flipped = Harness.run(["status", cipher])
        XCTAssertEqual(flipped.status, ExitStatus.corruptHeader.rawValue, flipped.stderr)
        XCTAssertFalse(flipped.stderr.contains("newer"), flipped.stderr)
        let body = Array(newer[0..<(newer.count - 32)])
        newer = body + SHA256.hash(body)
        try write(primary, newer)
        try write(secondary, newer)
        let r = Harness.run(["status", cipher])
        XCTAssertEqual(r.status, ExitStatus.unsupported.rawValue, r.stderr)
        XCTAssertTrue(r.stderr.contains("version 2"), r.stderr)
    }

    func testOneDamagedCopyStillMountsSaysSoAndIsLeftAlone() throws {
        initVolume()
        let primary = cipher + "/xtsfs.header", secondary = cipher + "/xtsfs.header2"
        var bytes = try read(primary)
        bytes[bytes.count - 1] ^= 0xff
        try write(primary, bytes)
        let good = try read(secondary)
        let s = Harness.run(["status", cipher])
        XCTAssertEqual(s.status, 0)
        XCTAssertTrue(s.stdout.contains("DAMAGED"), s.stdout)
        let r = Harness.run(["mount", cipher, mnt, "--passfile", passfile])
        XCTAssertEqual(r.status, 0, r.stderr)
        XCTAssertTrue(r.stderr.contains("xtsfs.header is damaged"), r.stderr)
        try write(mnt + "/file", Array("still works".utf8))
        unmount()
        // A mount writes no header: the damage stays visible, the good copy untouched.
        XCTAssertEqual(try read(primary), bytes)
        XCTAssertEqual(try read(secondary), good)
        XCTAssertTrue(Harness.run(["status", cipher]).stdout.contains("DAMAGED"))
    }

    func testTamperedParametersDetectedByMAC() throws {
        initVolume()
        // Change a field and fix the checksum: only the MAC (keyed by the DEK) can tell.
        for copy in ["xtsfs.header", "xtsfs.header2"] {
            var b = try read(cipher + "/" + copy)
            b[48] ^= 1 // the "created" timestamp
            let body = Array(b[0..<(b.count - 32)])
            b = body + SHA256.hash(body)
            try write(cipher + "/" + copy, b)
        }
        XCTAssertEqual(Harness.run(["status", cipher]).status, 0, "structurally valid")
        let r = Harness.run(["mount", cipher, mnt, "--passfile", passfile])
        XCTAssertEqual(r.status, ExitStatus.corruptHeader.rawValue, r.stderr)
        XCTAssertTrue(r.stderr.contains("altered"), r.stderr)
    }

    func testMountpointMissingOrBusy() throws {
        initVolume()
        var r = Harness.run(["mount", cipher, scratch + "/nope", "--passfile", passfile])
        XCTAssertEqual(r.status, ExitStatus.mountFailed.rawValue, r.stderr)
        XCTAssertTrue(r.stderr.contains("does not exist"), r.stderr)
        mount()
        r = Harness.run(["mount", cipher, mnt, "--passfile", passfile])
        XCTAssertEqual(r.status, ExitStatus.mountFailed.rawValue, r.stderr)
        XCTAssertTrue(r.stderr.contains("already a mount point"), r.stderr)
        unmount()
        r = Harness.run(["unmount", mnt])
        XCTAssertNotEqual(r.status, 0)
        XCTAssertTrue(r.stderr.contains("not mounted"), r.stderr)
    }

    func testMountPointOnInsideOrAboveCipherDirRefused() throws {
        initVolume()
        try FileManager.default.createDirectory(atPath: cipher + "/sub", withIntermediateDirectories: true)
        try FileManager.default.createDirectory(atPath: scratch + "/cipher2", withIntermediateDirectories: true)
        let before = backingFiles().map { $0.bytes }
        let cases: [(String, [String], String)] = [
            (cipher, [], "CIPHERDIR itself"),
            (cipher + "/", ["-o", "nonempty"], "CIPHERDIR itself"),
            (cipher + "/sub", [], "inside CIPHERDIR"),
            (cipher + "/../cipher/sub", [], "inside CIPHERDIR"),
            (scratch, [], "above CIPHERDIR"),
            (scratch, ["-o", "nonempty"], "above CIPHERDIR"),
            ("/", ["-o", "nonempty"], "above CIPHERDIR"),
        ]
        for (mp, extra, why) in cases {
            let r = Harness.run(["mount", cipher, mp, "--passfile", passfile] + extra)
            XCTAssertEqual(r.status, ExitStatus.mountFailed.rawValue, "\(mp): \(r.stderr)")
            XCTAssertTrue(r.stderr.contains(why), "\(mp): \(r.stderr)")
            XCTAssertFalse(Harness.isMounted(Mounter.absolute(mp)), mp)
        }
        // A sibling whose name starts with CIPHERDIR's is not inside it.
        let sibling = Harness.run(["mount", cipher, scratch + "/cipher2", "--passfile", passfile])
        XCTAssertEqual(sibling.status, 0, sibling.stderr)
        Harness.forceUnmount(scratch + "/cipher2")
        // The same directory reached through a bind mount.
        let bind = scratch + "/bind"
        try FileManager.default.createDirectory(atPath: bind, withIntermediateDirectories: true)
        if Harness.shell("mount --bind '\(cipher)' '\(bind)' 2>/dev/null") == 0 {
            defer { Harness.shell("umount '\(bind)'") }
            let r = Harness.run(["mount", cipher, bind + "/sub", "--passfile", passfile])
            XCTAssertEqual(r.status, ExitStatus.mountFailed.rawValue, r.stderr)
            XCTAssertTrue(r.stderr.contains("inside CIPHERDIR"), r.stderr)
            XCTAssertFalse(Harness.isMounted(bind + "/sub"))
        }
        XCTAssertEqual(backingFiles().map { $0.bytes }, before)
    }

    /// libfuse accepts `-o max_read=N` at mount(2) and refuses it only when the kernel's INIT
    /// arrives (our init() sets no matching max_read): the mount must then fail, not report
    /// success over a mount that is already gone.
    func testMountOptionRefusedAtInitIsAMountFailure() throws {
        initVolume()
        for extra in [["-o", "max_read=4096"], ["-o", "max_read=4096", "-f"], ["-o", "no_such_option"]] {
            let r = Harness.run(["mount", cipher, mnt, "--passfile", passfile] + extra)
            XCTAssertEqual(r.status, ExitStatus.mountFailed.rawValue, "\(extra): \(r.stderr)")
            XCTAssertTrue(r.stderr.contains("xtsfs:") || r.stderr.contains("error:"), "\(extra): \(r.stderr)")
            XCTAssertFalse(Harness.isMounted(mnt), "\(extra)")
            let deadline = Date().addingTimeInterval(5)
            while !Harness.daemons(mnt).isEmpty && Date() < deadline { usleep(20_000) }
            XCTAssertTrue(Harness.daemons(mnt).isEmpty, "\(extra): daemon left running")
        }
        XCTAssertTrue(Harness.run(["mount", cipher, mnt, "--passfile", passfile, "-o", "max_read=4096"]).stderr.contains("did not start"))
        // Success means a served mount, at once.
        mount()
        var st = stat()
        XCTAssertEqual(stat(mnt, &st), 0)
        XCTAssertEqual(try FileManager.default.contentsOfDirectory(atPath: mnt), [])
        unmount()
    }

    func testCacheTimeoutOption() throws {
        initVolume()
        let bad = Harness.run(["mount", cipher, mnt, "--passfile", passfile, "-o", "cache_timeout=soon"])
        XCTAssertEqual(bad.status, ExitStatus.usage.rawValue, bad.stderr)
        XCTAssertTrue(bad.stderr.contains("cache_timeout"), bad.stderr)
        // With no caching, a change made behind the mount's back shows at once.
        mount(["-o", "cache_timeout=0"])
        try write(mnt + "/seen", [1, 2, 3])
        var st = stat()
        XCTAssertEqual(stat(mnt + "/seen", &st), 0)
        let backing = backingFiles().filter { !$0.path.hasPrefix("xtsfs.") }
        XCTAssertEqual(backing.count, 1)
        XCTAssertEqual(unlink(cipher + "/" + backing[0].path), 0)
        XCTAssertEqual(stat(mnt + "/seen", &st), -1)
        XCTAssertEqual(errno, ENOENT)
        unmount()
    }

    func testUsageErrorsExitTwo() {
        XCTAssertEqual(Harness.run(["mount", cipher]).status, ExitStatus.usage.rawValue)
        XCTAssertEqual(Harness.run(["frobnicate"]).status, ExitStatus.usage.rawValue)
        XCTAssertEqual(Harness.run(["init", cipher, "--pbkdf-parallel", "0"]).status, ExitStatus.usage.rawValue)
        XCTAssertEqual(Harness.run(["--help"]).status, 0)
    }

    func testPassphraseNeverFromEnvironmentOrArgvAndEmptyRefused() throws {
        // No terminal and no --passfile: a clear input error, not a hang.
        let r = Harness.run(["init", cipher] + Self.cheapKDF)
        XCTAssertEqual(r.status, ExitStatus.badInput.rawValue, r.stderr)
        let empty = scratch + "/empty"
        try "\n".write(toFile: empty, atomically: true, encoding: .utf8)
        let e = Harness.run(["init", cipher, "--passfile", empty] + Self.cheapKDF)
        XCTAssertEqual(e.status, ExitStatus.badInput.rawValue, e.stderr)
    }

    func testDaemonHoldsNoSecretInArgvOrEnvironment() throws {
        initVolume()
        mount()
        let pids = Harness.daemons(mnt)
        XCTAssertEqual(pids.count, 1)
        for pid in pids {
            // The daemon leaves the caller's directory alone (it would keep a filesystem busy).
            XCTAssertEqual(try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/\(pid)/cwd"), "/")
            let cmdline = FileManager.default.contents(atPath: "/proc/\(pid)/cmdline") ?? Data()
            XCTAssertFalse(String(decoding: cmdline, as: UTF8.self).contains(Self.passphrase))
            // Undumpable: /proc/PID/environ of a non-dumpable process is owned by root and the
            // status shows it; core dumps are off.
            let limits = (try? String(contentsOfFile: "/proc/\(pid)/limits", encoding: .utf8)) ?? ""
            let core = limits.split(separator: "\n").first { $0.hasPrefix("Max core file size") } ?? ""
            XCTAssertTrue(core.contains(" 0 "), "core dumps must be off: \(core)")
        }
        unmount()
    }
}

