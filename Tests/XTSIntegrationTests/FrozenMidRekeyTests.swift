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
        // fsck checks it as it is, each object under its own generation (the half-renamed
        // directory's names of both): nothing wrong (status 0), and it says the rekey is
        // unfinished; --repair is refused (its own status 8) before anything is changed: a
        // repair could take the rekey's own progress for damage.
        let before = backingFiles().map { $0.path }.sorted()
        let check = Harness.run(["fsck", cipher, "--passfile", passfile])
        XCTAssertEqual(check.status, 0, check.stdout + check.stderr)
        XCTAssertTrue(check.stdout.contains("in the middle of a DEK rekey (generation 1 -> 2)") && check.stdout.contains("No problems found."), check.stdout)
        let repair = Harness.run(["fsck", cipher, "--repair", "--passfile", passfile])
        XCTAssertEqual(repair.status, 8, repair.stdout + repair.stderr)
        XCTAssertTrue(repair.stderr.contains("DEK rekey"), repair.stderr)
        XCTAssertEqual(backingFiles().map { $0.path }.sorted(), before)
        // Started by a build that wrote complete copies: the rerun first marks the header
        // (feature bit 2), so that no build unaware of journals mounts it from then on.
        XCTAssertFalse(status.stdout.contains("rekey-journal"), status.stdout)
        let stopped = Harness.shell("XTSFS_REKEY_FAILPOINT=3 '\(Harness.binary)' rekey '\(cipher)' --dek --passfile '\(passfile)' >/dev/null 2>&1")
        XCTAssertNotEqual(stopped, 0, "the failpoint did not stop the rekey")
        let marked = Harness.run(["status", cipher]).stdout
        XCTAssertTrue(marked.contains("rekey-journal") && marked.contains("rekey-in-progress"), marked)
        let r = Harness.run(["rekey", cipher, "--dek", "--passfile", passfile])
        XCTAssertEqual(r.status, 0, r.stderr)
        XCTAssertTrue(r.stderr.contains("(resumed)"), r.stderr)
        mount(["-o", "ro"])
        try checkFixtureTree()
        unmount()
        let after = Harness.run(["status", cipher]).stdout
        XCTAssertTrue(after.contains("Key generation:  2") && after.contains("Rekey:           none"), after)
        XCTAssertFalse(after.contains("rekey-journal") || after.contains("rekey-in-progress"), after)
    }

    /// Every file, name and symlink target of the fixture, as it was written.
    func checkFixtureTree() throws {
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
        XCTAssertEqual(try FileManager.default.contentsOfDirectory(atPath: mnt + "/dir/sub").sorted(), ["a-link", "sym", "ten-thousand-x"])
    }

    /// Mounted in the middle of the rekey: objects of both generations read back (names of
    /// both in one directory, old and new files, symlink targets), and writes of every kind
    /// work: new objects in old and mixed directories, old objects renamed and hard-linked
    /// into a directory of the new generation, an old name replaced by rename, extended
    /// attributes on old files. Then the rekey resumes (entering the new directory, where
    /// old objects now are) and the tree is exactly what the mount left.
    func testFrozenMidRekeyVolumeMountsReadsAndWritesThenResumes() throws {
        let r = Harness.run(["mount", cipher, mnt, "--passfile", passfile])
        XCTAssertEqual(r.status, 0, r.stderr)
        XCTAssertTrue(r.stderr.contains("rekey") && r.stderr.contains("unfinished"), r.stderr)
        try checkFixtureTree()
        let m = mnt
        // Writes: a new file in the half-renamed directory, appends to old files.
        try write(m + "/dir/sub/new.txt", Array("written mid-rekey\n".utf8))
        let fd = open(m + "/dir/a.txt", O_WRONLY | O_APPEND)
        XCTAssertGreaterThanOrEqual(fd, 0)
        XCTAssertEqual(Glibc.write(fd, "appended\n", 9), 9)
        close(fd)
        // A directory of the new generation receives old objects.
        XCTAssertEqual(Glibc.mkdir(m + "/fresh", 0o755), 0)
        XCTAssertEqual(Glibc.rename(m + "/dir/b.txt", m + "/fresh/b.txt"), 0)
        XCTAssertEqual(Glibc.rename(m + "/dir/sub/sym", m + "/fresh/sym"), 0)
        XCTAssertEqual(link(m + "/dir/c.txt", m + "/fresh/c-link"), 0)
        XCTAssertEqual(Glibc.rename(m + "/dir/sub", m + "/fresh/sub"), 0)
        // An old name replaced by a rename, another removed.
        try write(m + "/replacement", Array("replaced\n".utf8))
        XCTAssertEqual(Glibc.rename(m + "/replacement", m + "/top.txt"), 0)
        XCTAssertEqual(unlink(m + "/dir/" + String(repeating: "n", count: 200)), 0)
        // Creating over an old name is EEXIST, never a second entry.
        XCTAssertEqual(open(m + "/dir/c.txt", O_WRONLY | O_CREAT | O_EXCL, 0o644), -1)
        XCTAssertEqual(errno, EEXIST)
        // Extended attributes on an old file: set, replace, list, remove.
        XCTAssertEqual(setxattr(m + "/dir/a.txt", "user.k", "v1", 2, 0), 0)
        XCTAssertEqual(setxattr(m + "/dir/a.txt", "user.k", "v2", 2, XATTR_REPLACE), 0)
        XCTAssertEqual(setxattr(m + "/dir/a.txt", "user.gone", "x", 1, 0), 0)
        XCTAssertEqual(removexattr(m + "/dir/a.txt", "user.gone"), 0)
        XCTAssertEqual(symlink("../dir/a.txt", m + "/fresh/new-sym"), 0)
        func text(_ p: String) throws -> String { String(decoding: try read(m + "/" + p), as: UTF8.self) }
        XCTAssertEqual(try text("dir/a.txt"), "hello, generation one\nappended\n")
        XCTAssertEqual(try text("fresh/sub/a-link"), "hello, generation one\n")
        XCTAssertEqual(try text("fresh/b.txt"), "second file\n")
        XCTAssertEqual(try text("fresh/c-link"), "c\n")
        XCTAssertEqual(try text("top.txt"), "replaced\n")
        XCTAssertEqual(try FileManager.default.contentsOfDirectory(atPath: m).sorted(), ["dir", "fresh", "top.txt"])
        XCTAssertEqual(try FileManager.default.contentsOfDirectory(atPath: m + "/dir").sorted(), ["a.txt", "c.txt"])
        XCTAssertEqual(try FileManager.default.contentsOfDirectory(atPath: m + "/fresh/sub").sorted(), ["a-link", "new.txt", "ten-thousand-x"])
        let before = RekeyTests.manifest(m)
        XCTAssertTrue(before.contains("user.k"), before)
        unmount()
        // What the mount wrote (new objects in old and mixed directories, old ones in a new
        // directory, xattrs of both generations) checks clean under both generations.
        let check = Harness.run(["fsck", cipher, "--passfile", passfile])
        XCTAssertEqual(check.status, 0, check.stdout + check.stderr)
        XCTAssertFalse(check.stdout.contains("ERROR"), check.stdout)
        let rekey = Harness.run(["rekey", cipher, "--dek", "--passfile", passfile])
        XCTAssertEqual(rekey.status, 0, rekey.stderr)
        XCTAssertTrue(rekey.stderr.contains("(resumed)"), rekey.stderr)
        mount()
        XCTAssertEqual(RekeyTests.manifest(m), before)
        unmount()
        let after = Harness.run(["status", cipher]).stdout
        XCTAssertTrue(after.contains("Key generation:  2") && after.contains("Rekey:           none"), after)
    }
}
