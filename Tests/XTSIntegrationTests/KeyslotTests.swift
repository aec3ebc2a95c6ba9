import Foundation
import XCTest
import XTSFormat
import XTSKeys
import XTSVolume
#if canImport(Glibc)
import Glibc
#endif

/// Keyslots through the command line: each local provider, several slots on one volume,
/// adding and removing, the recovery key, Argon2id bounds, the audit log.
final class KeyslotTests: VolumeTestCase {
    var keyfile: String { scratch + "/key" }

    func xtsfs(_ args: [String], _ expected: ExitStatus = .success, file: StaticString = #filePath, line: UInt = #line) -> Harness.Result {
        let r = Harness.run(args)
        XCTAssertEqual(r.status, expected.rawValue, "xtsfs \(args.joined(separator: " ")): \(r.stderr)", file: file, line: line)
        return r
    }

    func auditLines() throws -> [[String: Any]] {
        let r = Harness.run(["audit", cipher, "--json"])
        XCTAssertEqual(r.status, 0, r.stderr)
        return try r.stdout.split(separator: "\n").map { try JSONSerialization.jsonObject(with: Data($0.utf8)) as! [String: Any] }
    }

    func testKeyfileGenerateAddMountAndRemove() throws {
        initVolume()
        _ = xtsfs(["keys", "generate", keyfile])
        var st = stat()
        XCTAssertEqual(lstat(keyfile, &st), 0)
        XCTAssertEqual(st.st_mode & 0o777, 0o400)
        XCTAssertEqual(st.st_size, 64)
        let r = xtsfs(["keys", "generate", keyfile], .refused)
        XCTAssertTrue(r.stderr.contains("never overwrites"), r.stderr)

        _ = xtsfs(["keys", "add", cipher, "--passfile", passfile, "--new-keyfile", keyfile])
        let list = xtsfs(["keys", "list", cipher]).stdout
        XCTAssertTrue(list.contains("keyfile"), list)
        mount()
        try write(mnt + "/f", [1, 2, 3])
        unmount()
        // Both slots open the same volume; each provider only tries its own slot.
        _ = xtsfs(["mount", cipher, mnt, "--keyfile", keyfile])
        XCTAssertEqual(try read(mnt + "/f"), [1, 2, 3])
        unmount()

        // Removing the passphrase slot with the key file: the passphrase no longer opens it.
        _ = xtsfs(["keys", "remove", cipher, "0", "--keyfile", keyfile])
        let wrong = xtsfs(["mount", cipher, mnt, "--passfile", passfile], .wrongKey)
        XCTAssertTrue(wrong.stderr.contains("no passphrase keyslot"), wrong.stderr)
        // The last slot goes only with --force.
        let last = xtsfs(["keys", "remove", cipher, "1", "--keyfile", keyfile], .refused)
        XCTAssertTrue(last.stderr.contains("--force"), last.stderr)
        _ = xtsfs(["mount", cipher, mnt, "--keyfile", keyfile])
        unmount()
    }

    func testShortKeyfileIsRefused() throws {
        initVolume()
        try write(keyfile, Array(repeating: 7, count: 16))
        let r = xtsfs(["keys", "add", cipher, "--passfile", passfile, "--new-keyfile", keyfile], .badInput)
        XCTAssertTrue(r.stderr.contains("at least 32"), r.stderr)
    }

    func testCommandProviderOutputFailureAndTimeout() throws {
        initVolume()
        _ = xtsfs(["keys", "add", cipher, "--passfile", passfile, "--new-extpass", "printf 'from a command\\n'"] + Self.cheapKDF)
        _ = xtsfs(["mount", cipher, mnt, "--extpass", "echo from a command"])
        unmount()
        var r = xtsfs(["mount", cipher, mnt, "--extpass", "echo something else"], .wrongKey)
        r = xtsfs(["mount", cipher, mnt, "--extpass", "exit 3"], .providerFailed)
        XCTAssertTrue(r.stderr.contains("exit status 3"), r.stderr)
        r = xtsfs(["mount", cipher, mnt, "--extpass", "true"], .badInput)
        XCTAssertTrue(r.stderr.contains("printed nothing"), r.stderr)
        let start = Date()
        r = xtsfs(["mount", cipher, mnt, "--extpass", "sleep 30", "--extpass-timeout", "1"], .providerFailed)
        XCTAssertTrue(r.stderr.contains("did not finish within 1 s"), r.stderr)
        XCTAssertLessThan(Date().timeIntervalSince(start), 10)
        XCTAssertFalse(Harness.isMounted(mnt))
    }

    func testSlotOptionPicksOneSlot() throws {
        initVolume()
        let second = scratch + "/pass2"
        try "second passphrase\n".write(toFile: second, atomically: true, encoding: .utf8)
        _ = xtsfs(["keys", "add", cipher, "--passfile", passfile, "--new-passfile", second] + Self.cheapKDF)
        _ = xtsfs(["mount", cipher, mnt, "--passfile", second, "--slot", "1"])
        unmount()
        _ = xtsfs(["mount", cipher, mnt, "--passfile", second, "--slot", "0"], .wrongKey)
        _ = xtsfs(["keys", "generate", keyfile])
        _ = xtsfs(["keys", "add", cipher, "--passfile", passfile, "--new-keyfile", keyfile, "--new-slot", "7"])
        let r = xtsfs(["mount", cipher, mnt, "--keyfile", keyfile, "--slot", "0"], .badInput)
        XCTAssertTrue(r.stderr.contains("not a keyfile slot"), r.stderr)
        _ = xtsfs(["mount", cipher, mnt, "--keyfile", keyfile, "--slot", "7"])
        unmount()
        _ = xtsfs(["keys", "add", cipher, "--passfile", passfile, "--new-keyfile", keyfile, "--new-slot", "7"], .refused)
    }

    func testRecoveryKeyPrintedOnceOpensTheVolume() throws {
        let r = xtsfs(["init", cipher, "--passfile", passfile, "--recovery-key"] + Self.cheapKDF)
        let groups = r.stdout.split(whereSeparator: { $0 == " " || $0 == "\n" }).filter { $0.count == 39 && $0.split(separator: "-").count == 8 }
        XCTAssertEqual(groups.count, 1, "one recovery key on stdout: \(r.stdout)")
        let key = String(groups[0])
        let recovery = scratch + "/recovery"
        // Typed back in lower case without dashes: still the key.
        try (key.lowercased().replacingOccurrences(of: "-", with: " ") + "\n").write(toFile: recovery, atomically: true, encoding: .utf8)
        _ = xtsfs(["mount", cipher, mnt, "--recovery-file", recovery])
        unmount()
        XCTAssertTrue(xtsfs(["keys", "list", cipher]).stdout.contains("recovery-key"))
        XCTAssertFalse(xtsfs(["status", cipher]).stdout.contains(key))
        try "0000-0000-0000-0000-0000-0000-0000-0000\n".write(toFile: recovery, atomically: true, encoding: .utf8)
        _ = xtsfs(["mount", cipher, mnt, "--recovery-file", recovery], .wrongKey)
    }

    /// Rewrites slot `index`'s parameters with the checksum recomputed (the MAC, which
    /// needs the key, is left as it was: exactly what an attacker can do).
    func editSlot(_ index: Int, _ change: (inout Keyslot) -> Void) throws {
        for name in HeaderStore.fileNames {
            var h = try VolumeHeader.decode(try read(cipher + "/" + name))
            change(&h.keyslots[index])
            let path = cipher + "/" + name
            chmod(path, 0o600)
            try write(path, try h.encode())
        }
    }

    func testHostileArgon2ParametersAreRefusedBeforeAnyWork() throws {
        initVolume()
        // v1 accepted 4 GiB × 1,000,000 iterations × 16 lanes (53 days).
        try editSlot(0) { slot in
            var p = try! PassphraseParameters.decode(slot.parameters)
            p.argon2 = .init(memoryKiB: 4 * 1024 * 1024, iterations: 1_000_000, parallelism: 16)
            slot.parameters = p.encode()
        }
        let start = Date()
        let r = xtsfs(["mount", cipher, mnt, "--passfile", passfile], .corruptHeader)
        XCTAssertLessThan(Date().timeIntervalSince(start), 5)
        XCTAssertTrue(r.stderr.contains("Argon2id parameters"), r.stderr)
        // Within the old bounds but far above the default work: refused too.
        try editSlot(0) { slot in
            var p = try! PassphraseParameters.decode(Array(slot.parameters.prefix(32)) + [0, 0, 1, 0, 1, 0, 0, 0, 1, 0, 0, 0])
            p.argon2 = .init(memoryKiB: 1024 * 1024, iterations: 100, parallelism: 4)
            slot.parameters = p.encode()
        }
        let r2 = xtsfs(["mount", cipher, mnt, "--passfile", passfile], .corruptHeader)
        XCTAssertTrue(r2.stderr.contains("too much work"), r2.stderr)
        // init refuses to make what an unlock would refuse.
        let other = scratch + "/other"
        _ = xtsfs(["init", other, "--passfile", passfile, "--pbkdf-memory", "1048576", "--pbkdf-force-iterations", "1000"], .usage)
    }

    func testAuditLogRecordsEachOperationWithoutSecrets() throws {
        initVolume()
        XCTAssertEqual(try FileManager.default.contentsOfDirectory(atPath: cipher).sorted(), ["xtsfs.dir", "xtsfs.header", "xtsfs.header2"])
        mount()
        // The root listing never shows the audit log.
        XCTAssertEqual(try FileManager.default.contentsOfDirectory(atPath: mnt), [])
        unmount()
        let wrong = scratch + "/wrong"
        try "not it\n".write(toFile: wrong, atomically: true, encoding: .utf8)
        _ = xtsfs(["mount", cipher, mnt, "--passfile", wrong], .wrongKey)
        _ = xtsfs(["keys", "generate", keyfile])
        _ = xtsfs(["keys", "add", cipher, "--passfile", passfile, "--new-keyfile", keyfile])
        _ = xtsfs(["keys", "remove", cipher, "1", "--passfile", passfile])
        let lines = try auditLines()
        let ops = lines.map { "\($0["operation"]!) \($0["slot"].map { "\($0)" } ?? "-") \($0["provider"]!) \($0["outcome"]!)" }
        XCTAssertEqual(ops, ["mount 0 passphrase ok", "mount - passphrase failed",
                             "unlock for keys add 0 passphrase ok", "keys add 1 keyfile ok",
                             "unlock for keys remove 0 passphrase ok", "keys remove 1 keyfile ok"])
        for l in lines {
            XCTAssertNotNil(l["time"]); XCTAssertNotNil(l["host"]); XCTAssertNotNil(l["hostID"]); XCTAssertNotNil(l["volumeID"])
        }
        let files = try FileManager.default.contentsOfDirectory(atPath: cipher + "/xtsfs.audit")
        XCTAssertEqual(files.count, 1)
        XCTAssertTrue(files[0].hasSuffix(".jsonl") && files[0].count == 16 + 6, files[0])
        let raw = try String(contentsOfFile: cipher + "/xtsfs.audit/" + files[0], encoding: .utf8)
        XCTAssertFalse(raw.contains(Self.passphrase) || raw.contains("not it"))
        let text = xtsfs(["audit", cipher]).stdout
        XCTAssertTrue(text.contains("keys add  slot 1  keyfile  ok"), text)
    }

    func testAuditLogElsewhereAndPlantedSymlinkRefused() throws {
        initVolume()
        let elsewhere = scratch + "/audit.jsonl"
        mount(["--audit-log", elsewhere])
        unmount()
        XCTAssertTrue(try String(contentsOfFile: elsewhere, encoding: .utf8).contains("\"operation\":\"mount\""))
        XCTAssertFalse(FileManager.default.fileExists(atPath: cipher + "/xtsfs.audit"))
        XCTAssertEqual(xtsfs(["audit", cipher, "--audit-log", elsewhere, "--json"]).stdout.split(separator: "\n").count, 1)
        // CIPHERDIR is hostile: a symlink planted as the log directory is not followed.
        let outside = scratch + "/outside"
        try FileManager.default.createDirectory(atPath: outside, withIntermediateDirectories: true)
        symlink(outside, cipher + "/xtsfs.audit")
        let r = xtsfs(["mount", cipher, mnt, "--passfile", passfile])
        XCTAssertTrue(r.stderr.contains("cannot write the audit log"), r.stderr)
        unmount()
        XCTAssertEqual(try FileManager.default.contentsOfDirectory(atPath: outside), [])
    }
}
