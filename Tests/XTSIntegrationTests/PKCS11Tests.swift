import Foundation
import XCTest
import XTSVolume
#if canImport(Glibc)
import Glibc
#endif

/// The PKCS#11 provider against a real SoftHSM2 token that each test makes in its own
/// directory (`SOFTHSM2_CONF`, set in this process so the xtsfs children inherit it) and
/// that goes with the scratch directory.
final class PKCS11Tests: VolumeTestCase {
    static let softhsm = "/usr/bin/softhsm2-util"
    static let module = "/usr/lib/softhsm/libsofthsm2.so"
    let uri = "pkcs11:token=xtsfs-test;object=vault"
    var pinFile: String { scratch + "/pin" }
    var savedConf: String?

    override func setUpWithError() throws {
        try super.setUpWithError()
        guard FileManager.default.isExecutableFile(atPath: Self.softhsm) else {
            throw XCTSkip("SoftHSM2 is not installed (scripts/setup installs it)")
        }
        let tokens = scratch + "/tokens"
        try FileManager.default.createDirectory(atPath: tokens, withIntermediateDirectories: true)
        let conf = scratch + "/softhsm2.conf"
        try "directories.tokendir = \(tokens)\nobjectstore.backend = file\nlog.level = ERROR\n".write(toFile: conf, atomically: true, encoding: .utf8)
        savedConf = ProcessInfo.processInfo.environment["SOFTHSM2_CONF"]
        setenv("SOFTHSM2_CONF", conf, 1)
        XCTAssertEqual(Harness.shell("timeout 20 \(Self.softhsm) --init-token --free --label xtsfs-test --pin 1234 --so-pin 4321 >/dev/null"), 0)
        try "1234\n".write(toFile: pinFile, atomically: true, encoding: .utf8)
    }

    override func tearDown() {
        super.tearDown()
        if let savedConf { setenv("SOFTHSM2_CONF", savedConf, 1) } else { unsetenv("SOFTHSM2_CONF") }
    }

    func xtsfs(_ args: [String], _ expected: ExitStatus = .success, file: StaticString = #filePath, line: UInt = #line) -> Harness.Result {
        let r = Harness.run(args)
        XCTAssertEqual(r.status, expected.rawValue, "xtsfs \(args.joined(separator: " ")): \(r.stderr)", file: file, line: line)
        return r
    }

    func testInitWithGeneratedTokenKeyMountsAndKeyNeverLeavesTheToken() throws {
        _ = xtsfs(["init", cipher, "--pkcs11", uri, "--generate", "--pin-file", pinFile])
        let list = xtsfs(["keys", "list", cipher]).stdout
        XCTAssertTrue(list.contains("pkcs11") && list.contains(uri), list)
        _ = xtsfs(["mount", cipher, mnt, "--pkcs11", uri, "--pin-file", pinFile])
        try write(mnt + "/f", [4, 5, 6])
        unmount()
        // An explicit module works the same as p11-kit's registered ones.
        _ = xtsfs(["mount", cipher, mnt, "--pkcs11", uri, "--pkcs11-module", Self.module, "--pin-file", pinFile])
        XCTAssertEqual(try read(mnt + "/f"), [4, 5, 6])
        unmount()
        // The key was made sensitive and never extractable: the token will not export it.
        let p = Process()
        p.executableURL = URL(fileURLWithPath: "/bin/sh")
        p.arguments = ["-c", "timeout 20 pkcs11-tool --module \(Self.module) --token-label xtsfs-test --login --pin 1234 --list-objects --type secrkey 2>/dev/null"]
        let out = Pipe()
        p.standardOutput = out
        try p.run()
        let text = String(decoding: out.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
        p.waitUntilExit()
        XCTAssertTrue(text.contains("never extractable") && text.contains("sensitive"), text)
        // Asking again to generate a key of that name is refused, not a second key.
        let again = scratch + "/again"
        let r = xtsfs(["init", again, "--pkcs11", uri, "--generate", "--pin-file", pinFile], .badInput)
        XCTAssertTrue(r.stderr.contains("already has a key"), r.stderr)
    }

    func testWrongPinMissingTokenMissingKeyAndPinInURI() throws {
        _ = xtsfs(["init", cipher, "--pkcs11", uri, "--generate", "--pin-file", pinFile])
        let bad = scratch + "/badpin"
        try "9999\n".write(toFile: bad, atomically: true, encoding: .utf8)
        var r = xtsfs(["mount", cipher, mnt, "--pkcs11", uri, "--pin-file", bad], .wrongKey)
        XCTAssertTrue(r.stderr.contains("wrong PIN"), r.stderr)
        r = xtsfs(["mount", cipher, mnt, "--pkcs11", "pkcs11:token=absent;object=vault", "--pin-file", pinFile], .providerFailed)
        XCTAssertTrue(r.stderr.contains("no PKCS#11 token matches"), r.stderr)
        r = xtsfs(["mount", cipher, mnt, "--pkcs11", "pkcs11:token=xtsfs-test;object=other", "--pin-file", pinFile], .providerFailed)
        XCTAssertTrue(r.stderr.contains("has no AES key"), r.stderr)
        r = xtsfs(["mount", cipher, mnt, "--pkcs11", uri + "?pin-value=1234"], .badInput)
        XCTAssertTrue(r.stderr.contains("--pin-file"), r.stderr)
        r = xtsfs(["mount", cipher, mnt, "--pkcs11", "not a uri", "--pin-file", pinFile], .badInput)
        XCTAssertFalse(Harness.isMounted(mnt))
        // Every one of them is a failed unlock in the audit log.
        let audit = xtsfs(["audit", cipher]).stdout
        XCTAssertTrue(audit.contains("wrong PIN"), audit)
        XCTAssertFalse(audit.contains("1234") || audit.contains("9999"), audit)
    }

    func testExtractableKeyIsRefused() throws {
        initVolume()
        XCTAssertEqual(Harness.shell("timeout 20 pkcs11-tool --module \(Self.module) --token-label xtsfs-test --login --pin 1234 --keygen --key-type AES:32 --label exportable --extractable >/dev/null 2>&1"), 0)
        let r = xtsfs(["keys", "add", cipher, "--passfile", passfile, "--new-pkcs11", "pkcs11:token=xtsfs-test;object=exportable", "--new-pin-file", pinFile], .badInput)
        XCTAssertTrue(r.stderr.contains("can leave token"), r.stderr)
        XCTAssertEqual(xtsfs(["keys", "list", cipher]).stdout.split(separator: "\n").count, 2)
    }

    func testTokenAndPassphraseSlotsOpenOneVolumeAndARemovedSlotNoLongerOpens() throws {
        initVolume()
        _ = xtsfs(["keys", "add", cipher, "--passfile", passfile, "--new-pkcs11", uri, "--generate", "--new-pin-file", pinFile])
        _ = xtsfs(["mount", cipher, mnt, "--pkcs11", uri, "--pin-file", pinFile])
        try write(mnt + "/g", [9])
        unmount()
        mount()
        XCTAssertEqual(try read(mnt + "/g"), [9])
        unmount()
        _ = xtsfs(["keys", "remove", cipher, "1", "--passfile", passfile])
        let r = xtsfs(["mount", cipher, mnt, "--pkcs11", uri, "--pin-file", pinFile], .wrongKey)
        XCTAssertTrue(r.stderr.contains("no pkcs11 keyslot"), r.stderr)
    }
}
