import Foundation
import XCTest
#if canImport(Glibc)
import Glibc
#endif

/// A volume with one keyslot of every provider whose secret a test can recreate, frozen in
/// the repository (`Fixtures/v1-keyslots`): 0 passphrase "xtsfs frozen keyslots", 1 the
/// recovery key in `v1-keyslots.recovery`, 2 the key file `v1-keyslots.key`, 3 the command
/// `echo xtsfs frozen command`. It holds hello.txt. Do not regenerate it: every later
/// version must open each slot. (PKCS#11 and KMIP keys live in a token or on a server
/// and cannot be recreated non-extractable with a known value; their slots are covered
/// byte for byte in docs/FORMAT.md section 2.3.1 and by PKCS11Tests and KMIPTests.)
final class FrozenKeyslotsTests: VolumeTestCase {
    var fixtures = ""

    override func setUpWithError() throws {
        try super.setUpWithError()
        guard let dir = Bundle.module.url(forResource: "Fixtures", withExtension: nil)?.path else {
            return XCTFail("fixtures missing from the test bundle")
        }
        fixtures = dir
        XCTAssertEqual(Harness.shell("cp -a '\(dir)/v1-keyslots' '\(cipher)'"), 0)
        try "xtsfs frozen keyslots\n".write(toFile: passfile, atomically: true, encoding: .utf8)
    }

    func checkOpens(_ key: [String], slot: String, file: StaticString = #filePath, line: UInt = #line) throws {
        let r = Harness.run(["mount", cipher, mnt, "-o", "ro", "--audit-log", scratch + "/audit"] + key)
        XCTAssertEqual(r.status, 0, "\(key): \(r.stderr)", file: file, line: line)
        XCTAssertEqual(String(decoding: try read(mnt + "/hello.txt"), as: UTF8.self), "opened by any of four keys\n", file: file, line: line)
        unmount(file: file, line: line)
        let audit = try String(contentsOfFile: scratch + "/audit", encoding: .utf8).split(separator: "\n").last.map(String.init) ?? ""
        XCTAssertTrue(audit.contains("\"slot\":\(slot),"), audit, file: file, line: line)
    }

    func testEverySlotOfTheFrozenVolumeOpens() throws {
        let list = Harness.run(["keys", "list", cipher])
        XCTAssertEqual(list.status, 0, list.stderr)
        for p in ["passphrase", "recovery-key", "keyfile", "command"] { XCTAssertTrue(list.stdout.contains(p), list.stdout) }
        let keyfile = scratch + "/key"
        XCTAssertEqual(Harness.shell("cp '\(fixtures)/v1-keyslots.key' '\(keyfile)'"), 0)
        try checkOpens(["--passfile", passfile], slot: "0")
        try checkOpens(["--recovery-file", fixtures + "/v1-keyslots.recovery"], slot: "1")
        try checkOpens(["--keyfile", keyfile], slot: "2")
        try checkOpens(["--extpass", "echo xtsfs frozen command"], slot: "3")
        XCTAssertEqual(Harness.run(["mount", cipher, mnt, "--extpass", "echo xtsfs frozen commanD"]).status, 12)
    }
}
