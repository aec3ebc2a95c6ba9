import Foundation
import XCTest
#if canImport(Glibc)
import Glibc
#endif

/// A volume frozen in the middle of a DEK rekey (killed at step 25 of 44: generation 1 -> 2,
/// one directory half renamed, files, names and a symlink of both generations, the rekey
/// record in the header). Passphrase "xtsfs frozen mid-rekey". Every later version must
/// finish it and read it exactly; do not regenerate it. Git keeps neither xattrs nor hard
/// links, so the fixture has neither (the kill tests cover both).
final class FrozenMidRekeyTests: VolumeTestCase {
    override func setUpWithError() throws {
        try super.setUpWithError()
        guard let fixture = Bundle.module.url(forResource: "Fixtures", withExtension: nil)?.appendingPathComponent("v1-midrekey").path else {
            return XCTFail("fixture missing from the test bundle")
        }
        XCTAssertEqual(Harness.shell("cp -a '\(fixture)' '\(cipher)'"), 0)
        try "xtsfs frozen mid-rekey\n".write(toFile: passfile, atomically: true, encoding: .utf8)
    }

    func testFrozenMidRekeyVolumeResumesAndReadsBack() throws {
        let status = Harness.run(["status", cipher])
        XCTAssertEqual(status.status, 0, status.stderr)
        XCTAssertTrue(status.stdout.contains("generation 1 -> 2, re-encrypting"), status.stdout)
        XCTAssertTrue(status.stdout.contains("rekey-in-progress"), status.stdout)
        // Mounting is refused until the rekey is finished.
        XCTAssertEqual(Harness.run(["mount", cipher, mnt, "--passfile", passfile]).status, 15)
        // So is fsck (its own status 8), before it reads or changes anything: checked with one
        // generation, the other's names would look lost, and a repair would quarantine them.
        let before = backingFiles().map { $0.path }.sorted()
        for args in [["fsck", cipher, "--passfile", passfile], ["fsck", cipher, "--repair", "--passfile", passfile]] {
            let f = Harness.run(args)
            XCTAssertEqual(f.status, 8, f.stdout + f.stderr)
            XCTAssertTrue(f.stderr.contains("rekey"), f.stderr)
        }
        XCTAssertEqual(backingFiles().map { $0.path }.sorted(), before)
        let r = Harness.run(["rekey", cipher, "--dek", "--passfile", passfile])
        XCTAssertEqual(r.status, 0, r.stderr)
        XCTAssertTrue(r.stderr.contains("(resumed)"), r.stderr)
        mount(["-o", "ro"])
        func text(_ p: String) throws -> String { String(decoding: try read(mnt + "/" + p), as: UTF8.self) }
        XCTAssertEqual(try text("top.txt"), "root file\n")
        XCTAssertEqual(try text("dir/a.txt"), "hello, generation one\n")
        XCTAssertEqual(try text("dir/b.txt"), "second file\n")
        XCTAssertEqual(try text("dir/c.txt"), "c\n")
        XCTAssertEqual(try text("dir/" + String(repeating: "n", count: 200)), "long\n")
        XCTAssertEqual(try text("dir/sub/a-link"), "hello, generation one\n")
        XCTAssertEqual(try read(mnt + "/dir/sub/ten-thousand-x"), [UInt8](repeating: UInt8(ascii: "x"), count: 10000))
        XCTAssertEqual(try FileManager.default.destinationOfSymbolicLink(atPath: mnt + "/dir/sub/sym"), "../a.txt")
        XCTAssertEqual(try FileManager.default.contentsOfDirectory(atPath: mnt + "/dir").sorted(),
                       ["a.txt", "b.txt", "c.txt", String(repeating: "n", count: 200), "sub"])
        unmount()
        let after = Harness.run(["status", cipher]).stdout
        XCTAssertTrue(after.contains("Key generation:  2") && after.contains("Rekey:           none"), after)
    }
}
