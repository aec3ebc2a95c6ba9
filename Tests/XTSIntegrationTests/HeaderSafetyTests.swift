import Foundation
import XCTest
import XTSCrypto
import XTSFormat
import XTSKeys
import XTSVolume
#if canImport(Glibc)
import Glibc
#endif

/// A mount writes no header, and no state of the header copies can make a mount destroy
/// the good one.
final class HeaderSafetyTests: VolumeTestCase {
    let headers = ["xtsfs.header", "xtsfs.header2"]

    func snapshot(_ dir: String) throws -> [[UInt8]] {
        try headers.map { try read(dir + "/" + $0) }
    }

    func inodes(_ dir: String) -> [UInt64] {
        headers.map { name in
            var st = stat()
            return lstat(dir + "/" + name, &st) == 0 ? UInt64(st.st_ino) : 0
        }
    }

    func testSuccessfulMountWritesNoHeader() throws {
        initVolume()
        let before = try snapshot(cipher), files = inodes(cipher)
        mount()
        try write(mnt + "/a", Array("hello".utf8))
        unmount()
        mount(["-o", "ro"])
        XCTAssertEqual(try read(mnt + "/a"), Array("hello".utf8))
        unmount()
        XCTAssertEqual(try snapshot(cipher), before, "a mount must not rewrite a header copy")
        XCTAssertEqual(inodes(cipher), files, "a mount must not replace a header file")
        XCTAssertFalse(FileManager.default.fileExists(atPath: cipher + "/xtsfs.header.tmp"))
    }

    /// A FIFO, a symlink to a file outside CIPHERDIR, or a directory in place of one copy:
    /// nothing hangs, nothing outside is read, and the other copy serves.
    func testPlantedHeaderCopyOfAnotherTypeIsDamageNotAHang() throws {
        initVolume()
        let outside = scratch + "/outside"
        try write(outside, try read(cipher + "/xtsfs.header"))
        for plant in ["fifo", "symlink", "directory"] {
            let copy = cipher + "/xtsfs.header2"
            XCTAssertEqual(unlink(copy), 0)
            switch plant {
            case "fifo": XCTAssertEqual(mkfifo(copy, 0o644), 0)
            case "symlink": XCTAssertEqual(symlink(outside, copy), 0)
            default: XCTAssertEqual(mkdir(copy, 0o755), 0)
            }
            let status = Harness.run(["status", cipher])
            XCTAssertEqual(status.status, 0, "\(plant): \(status.stderr)")
            XCTAssertTrue(status.stdout.contains("xtsfs.header2: DAMAGED"), "\(plant): \(status.stdout)")
            mount()
            XCTAssertTrue(Harness.isMounted(mnt))
            unmount()
            if plant == "directory" { XCTAssertEqual(rmdir(copy), 0) } else { XCTAssertEqual(unlink(copy), 0) }
            XCTAssertEqual(link(cipher + "/xtsfs.header", copy), 0)
        }
    }

    /// Volume B's header, re-sealed with B's key and a sequence number above A's, copied
    /// over A's second copy: it opens with the (shared) passphrase and its MAC verifies,
    /// but it cannot open A's root directory. The mount must use A's own copy and leave
    /// both files exactly as they were.
    func testForeignHeaderCopyWithHigherSequenceNeitherBreaksNorIsRepairedByMount() throws {
        initVolume()
        mount()
        try write(mnt + "/mine", Array("volume A".utf8))
        unmount()
        let other = scratch + "/other"
        let r = Harness.run(["init", other, "--passfile", passfile] + Self.cheapKDF)
        XCTAssertEqual(r.status, 0, r.stderr)

        let a = try VolumeHeader.decode(try read(cipher + "/xtsfs.header"))
        var b = try VolumeHeader.decode(try read(other + "/xtsfs.header"))
        XCTAssertNotEqual(a.volumeID, b.volumeID)
        let provider = PassphraseProvider(passphrase: SecretBytes(copying: Array(Self.passphrase.utf8)))
        let (keysB, _) = try Keyring.unlock(b, with: provider)
        b.sequence = a.sequence + 5
        b = try Keyring.seal(b, keys: keysB)
        try write(cipher + "/xtsfs.header2", try b.encode())
        let before = try snapshot(cipher)

        let s = Harness.run(["status", cipher])
        XCTAssertEqual(s.status, 0, s.stderr)
        XCTAssertTrue(s.stdout.contains("Warning:") && s.stdout.contains("different volumes"), s.stdout)
        let j = Harness.run(["status", cipher, "--json"])
        let obj = try JSONSerialization.jsonObject(with: Data(j.stdout.utf8)) as? [String: Any]
        XCTAssertEqual((obj?["warnings"] as? [String])?.count, 1, j.stdout)

        let m = Harness.run(["mount", cipher, mnt, "--passfile", passfile])
        XCTAssertEqual(m.status, 0, m.stderr)
        XCTAssertTrue(m.stderr.contains("xtsfs.header2") && m.stderr.contains("root directory"), m.stderr)
        XCTAssertEqual(try read(mnt + "/mine"), Array("volume A".utf8))
        try write(mnt + "/more", Array("still A".utf8))
        unmount()
        XCTAssertEqual(try snapshot(cipher), before, "mount must not write either header copy")

        // A second time, and read-only: same outcome.
        mount(["-o", "ro"])
        XCTAssertEqual(try read(mnt + "/more"), Array("still A".utf8))
        unmount()
        XCTAssertEqual(try snapshot(cipher), before)
    }

    /// Both copies unusable in different ways: a clear corrupt-header error, nothing written.
    func testEveryCopyFailingIsCorruptNotWrongKey() throws {
        initVolume()
        let other = scratch + "/other"
        XCTAssertEqual(Harness.run(["init", other, "--passfile", passfile] + Self.cheapKDF).status, 0)
        // Copy 1: B's header (opens, fails at the root directory). Copy 2: A's, tampered.
        try write(cipher + "/xtsfs.header", try read(other + "/xtsfs.header"))
        var tampered = try read(cipher + "/xtsfs.header2")
        tampered[48] ^= 1
        let body = Array(tampered[0..<(tampered.count - 32)])
        tampered = body + SHA256.hash(body)
        try write(cipher + "/xtsfs.header2", tampered)
        let before = try snapshot(cipher)
        let r = Harness.run(["mount", cipher, mnt, "--passfile", passfile])
        XCTAssertEqual(r.status, ExitStatus.corruptHeader.rawValue, r.stderr)
        XCTAssertTrue(r.stderr.contains("root directory") && r.stderr.contains("altered"), r.stderr)
        XCTAssertFalse(Harness.isMounted(mnt))
        XCTAssertEqual(try snapshot(cipher), before)
        // A wrong passphrase for both copies is still "wrong key".
        let wrong = scratch + "/wrong"
        try "nope\n".write(toFile: wrong, atomically: true, encoding: .utf8)
        XCTAssertEqual(Harness.run(["mount", other, mnt, "--passfile", wrong]).status, ExitStatus.wrongKey.rawValue)
    }
}
