import Foundation
import XCTest
#if canImport(Glibc)
import Glibc
#endif

/// An integrity volume (feature `blockAuthentication`, passphrase "xtsfs frozen integrity")
/// frozen in the repository: it holds files in both tag slots, a shrunk-then-grown file,
/// punched holes, a sparse file, a file across two tag groups, and two names written
/// as a hard link (git and the test bundle keep them as two copies of one backing file). Every later
/// version must read it exactly; do not regenerate it. Its units have tag algorithm 1
/// (HMAC-SHA256); `FrozenIntegrityVolumeV2Tests` runs the same tests on a volume of tag
/// algorithm 2.
class FrozenIntegrityVolumeTests: VolumeTestCase {
    var fixtureName: String { "integrity-volume" }
    var frozenPassphrase: String { "xtsfs frozen integrity" }
    var helloText: String { "Hello from an xtsfs integrity volume.\n" }
    var tagAlgorithm: Int { 1 }

    static func content(_ n: Int) -> [UInt8] { (0..<n).map { UInt8((($0 * 7) + n) % 251) } }

    override func setUpWithError() throws {
        try super.setUpWithError()
        guard let fixture = Bundle.module.url(forResource: "Fixtures", withExtension: nil)?.appendingPathComponent(fixtureName).path else {
            return XCTFail("fixture missing from the test bundle")
        }
        XCTAssertEqual(Harness.shell("cp -a '\(fixture)' '\(cipher)'"), 0)
        try (frozenPassphrase + "\n").write(toFile: passfile, atomically: true, encoding: .utf8)
    }

    /// The volume's tag algorithm is in its features (bit 3 for algorithm 2) and in the
    /// version of every file header.
    func testTagAlgorithmOfTheVolumeAndItsFiles() throws {
        let status = Harness.run(["status", cipher])
        XCTAssertEqual(status.stdout.contains("ghash-unit-tags"), tagAlgorithm >= 2, status.stdout)
        var files = 0
        let e = FileManager.default.enumerator(atPath: cipher)
        while let rel = e?.nextObject() as? String {
            let path = cipher + "/" + rel
            var st = stat()
            guard lstat(path, &st) == 0, st.st_mode & S_IFMT == S_IFREG, !rel.split(separator: "/").contains(where: { $0.hasPrefix("xtsfs.") }), st.st_size > 0 else { continue }
            let head = try read(path).prefix(2)
            XCTAssertEqual(Array(head), [UInt8(tagAlgorithm), 0], rel)
            files += 1
        }
        XCTAssertGreaterThanOrEqual(files, 14)
    }

    /// Both tag slots, holes, a shrunk-then-grown file, two tag groups: fsck reads every
    /// unit and finds nothing wrong (the hard link's two copies are two files here).
    func testFsckOfTheFrozenIntegrityVolumeIsClean() throws {
        let r = Harness.run(["fsck", cipher, "--passfile", passfile])
        XCTAssertEqual(r.status, 0, r.stdout + r.stderr)
    }

    /// A DEK rekey keeps each file's tag algorithm (the volume's): after it, the files
    /// read back exactly, fsck is clean and every header still names the same algorithm.
    func testDEKRekeyKeepsTheTagAlgorithm() throws {
        let r = Harness.run(["rekey", cipher, "--dek", "--passfile", passfile])
        XCTAssertEqual(r.status, 0, r.stdout + r.stderr)
        try testTagAlgorithmOfTheVolumeAndItsFiles()
        try testFsckOfTheFrozenIntegrityVolumeIsClean()
        try testFrozenIntegrityVolumeReadsBackExactly()
    }

    func testFrozenIntegrityVolumeReadsBackExactly() throws {
        let status = Harness.run(["status", cipher])
        XCTAssertTrue(status.stdout.contains("block-authentication"), status.stdout)
        mount(["-o", "ro"])
        let hello = Array(helloText.utf8)
        XCTAssertEqual(try read(mnt + "/hello.txt"), hello)
        XCTAssertEqual(try read(mnt + "/hello-link.txt"), hello)
        for n in [0, 1, 15, 16, 4095, 4096, 4097, 100000, 520000] {
            XCTAssertEqual(try read(mnt + "/sizes/s\(n)"), Self.content(n), "sizes/s\(n)")
            var st = stat()
            XCTAssertEqual(stat(mnt + "/sizes/s\(n)", &st), 0)
            XCTAssertEqual(Int(st.st_size), n)
        }
        var sparse = [UInt8](repeating: 0, count: 1 << 20)
        sparse[500000] = UInt8(ascii: "X")
        XCTAssertEqual(try read(mnt + "/sparse"), sparse)
        var rewritten = Self.content(20000)
        for i in 5000..<8000 { rewritten[i] = UInt8(ascii: "A") }
        for i in 6000..<6100 { rewritten[i] = UInt8(ascii: "B") }
        XCTAssertEqual(try read(mnt + "/rewritten"), rewritten)
        XCTAssertEqual(try read(mnt + "/shrunk"), Array(Self.content(9000).prefix(5000)) + [UInt8](repeating: 0, count: 2000))
        var punched = Self.content(5 * 4096)
        for i in 4096..<3 * 4096 { punched[i] = 0 }
        XCTAssertEqual(try read(mnt + "/punched"), punched)
        XCTAssertEqual(try FileManager.default.destinationOfSymbolicLink(atPath: mnt + "/link"), "hello.txt")
        XCTAssertEqual(try FileManager.default.contentsOfDirectory(atPath: mnt).sorted(),
                       ["hello-link.txt", "hello.txt", "link", "punched", "rewritten", "shrunk", "sizes", "sparse"])
    }

    func testFrozenIntegrityVolumeAcceptsWrites() throws {
        mount()
        try write(mnt + "/sizes/s4097", Array("rewritten".utf8))
        let fd = open(mnt + "/sizes/s520000", O_WRONLY)
        XCTAssertEqual([UInt8](repeating: 9, count: 10).withUnsafeBytes { pwrite(fd, $0.baseAddress!, 10, 516_090) }, 10)
        close(fd)
        unmount()
        mount()
        XCTAssertEqual(try read(mnt + "/sizes/s4097"), Array("rewritten".utf8))
        var big = Self.content(520000)
        for i in 516_090..<516_100 { big[i] = 9 }
        XCTAssertEqual(try read(mnt + "/sizes/s520000"), big)
    }
}

/// The frozen volume of tag algorithm 2 (GHASH+AES-256, feature bit 3), passphrase
/// "xtsfs frozen integrity v2", written by `init --integrity` with the same files as
/// `integrity-volume` (the first one with tag algorithm 2). Do not regenerate it.
final class FrozenIntegrityVolumeV2Tests: FrozenIntegrityVolumeTests {
    override var fixtureName: String { "integrity-volume-v2" }
    override var frozenPassphrase: String { "xtsfs frozen integrity v2" }
    override var helloText: String { "Hello from an xtsfs integrity volume (tag algorithm 2).\n" }
    override var tagAlgorithm: Int { 2 }

    /// A file header whose version field says 1 on this volume of version 2 (its MAC fails
    /// too; a header of the other version with a valid MAC is in IntegrityContentTests) reads
    /// as EIO, and only that file.
    func testAFileHeaderOfTheOtherVersionIsEIO() throws {
        // The two files of five units at the top: punched and rewritten.
        let names = try FileManager.default.contentsOfDirectory(atPath: cipher).filter { n in
            var st = stat()
            return lstat(cipher + "/" + n, &st) == 0 && st.st_mode & S_IFMT == S_IFREG && st.st_size == 24576
        }
        XCTAssertEqual(names.count, 2)
        for n in names {
            var b = try read(cipher + "/" + n)
            b[0] = 1
            try write(cipher + "/" + n, b)
        }
        mount(["-o", "ro"])
        for n in ["punched", "rewritten"] {
            let fd = open(mnt + "/" + n, O_RDONLY)
            var buf = [UInt8](repeating: 0, count: 4096)
            let got = fd < 0 ? -1 : buf.withUnsafeMutableBytes { Glibc.read(fd, $0.baseAddress!, $0.count) }
            XCTAssertEqual(got, -1, n)
            XCTAssertEqual(errno, EIO, n)
            if fd >= 0 { close(fd) }
        }
        XCTAssertEqual(try read(mnt + "/sizes/s4097"), Self.content(4097))
        unmount()
    }
}

/// The frozen volume with listing manifests (feature bit 5, FORMAT.md 12.10), passphrase
/// "xtsfs frozen integrity v3", written by `init --integrity` with the same files as
/// `integrity-volume` (the first one with manifests: every directory has `xtsfs.list`,
/// every file a file ID, the empty one is its 64-byte header). Do not regenerate it.
final class FrozenIntegrityVolumeV3Tests: FrozenIntegrityVolumeTests {
    override var fixtureName: String { "integrity-volume-v3" }
    override var frozenPassphrase: String { "xtsfs frozen integrity v3" }
    override var helloText: String { "Hello from an xtsfs integrity volume (listing manifests).\n" }
    override var tagAlgorithm: Int { 2 }

    /// Every directory has its manifest, fsck checks them (clean), and two files swapped
    /// in `sizes` are reported by it.
    func testManifestsAreCheckedAndASwapIsReported() throws {
        let status = Harness.run(["status", cipher])
        XCTAssertTrue(status.stdout.contains("listing-manifests"), status.stdout)
        XCTAssertTrue(FileManager.default.fileExists(atPath: cipher + "/xtsfs.list"))
        let sizes = try FileManager.default.contentsOfDirectory(atPath: cipher).first { n in
            var st = stat()
            return lstat(cipher + "/" + n, &st) == 0 && st.st_mode & S_IFMT == S_IFDIR && !n.hasPrefix("xtsfs.")
        }.map { cipher + "/" + $0 }
        let dir = try XCTUnwrap(sizes)
        XCTAssertTrue(FileManager.default.fileExists(atPath: dir + "/xtsfs.list"))
        let files = try FileManager.default.contentsOfDirectory(atPath: dir).filter { !$0.hasPrefix("xtsfs.") }.sorted()
        XCTAssertGreaterThanOrEqual(files.count, 9)
        XCTAssertEqual(rename(dir + "/" + files[0], dir + "/swap"), 0)
        XCTAssertEqual(rename(dir + "/" + files[1], dir + "/" + files[0]), 0)
        XCTAssertEqual(rename(dir + "/swap", dir + "/" + files[1]), 0)
        let r = Harness.run(["fsck", cipher, "--json", "--passfile", passfile])
        XCTAssertEqual(r.status, 4, r.stdout)
        XCTAssertTrue(r.stdout.contains("directoryListingMismatch") && r.stdout.contains("sizes"), r.stdout)
    }
}

/// The frozen volume with file roots (feature bit 6, file header version 3, FORMAT.md
/// 12.11), passphrase "xtsfs frozen integrity v4", written by `init --integrity` with the
/// same files as `integrity-volume` (the first one with file roots). Do not regenerate it.
final class FrozenIntegrityVolumeV4Tests: FrozenIntegrityVolumeTests {
    override var fixtureName: String { "integrity-volume-v4" }
    override var frozenPassphrase: String { "xtsfs frozen integrity v4" }
    override var helloText: String { "Hello from an xtsfs integrity volume (file roots).\n" }
    override var tagAlgorithm: Int { 3 }

    /// The feature is shown, and the tag block of the second group of `sizes/s520000`
    /// (its only later group) put back from before a write through the mount reads as EIO.
    func testFileRootsAndAReplayedTagBlock() throws {
        XCTAssertTrue(Harness.run(["status", cipher]).stdout.contains("file-roots"))
        let sizes = try FileManager.default.contentsOfDirectory(atPath: cipher).first { n in
            var st = stat()
            return lstat(cipher + "/" + n, &st) == 0 && st.st_mode & S_IFMT == S_IFDIR && !n.hasPrefix("xtsfs.")
        }.map { cipher + "/" + $0 }
        let dir = try XCTUnwrap(sizes)
        let big = try XCTUnwrap(try FileManager.default.contentsOfDirectory(atPath: dir).first { n in
            var st = stat()
            return lstat(dir + "/" + n, &st) == 0 && st.st_size == 528_384
        })
        let before = try read(dir + "/" + big)
        mount()
        let fd = open(mnt + "/sizes/s520000", O_WRONLY)
        XCTAssertEqual([UInt8](repeating: 9, count: 10).withUnsafeBytes { pwrite(fd, $0.baseAddress!, 10, 516_100) }, 10)
        close(fd)
        unmount()
        var after = try read(dir + "/" + big)
        after.replaceSubrange(127 * 4096..<128 * 4096 + 4096, with: before[127 * 4096..<128 * 4096 + 4096])
        try write(dir + "/" + big, after)
        mount(["-o", "ro"])
        // EIO at open (the file's keys and root are checked there) or at the read.
        let r = open(mnt + "/sizes/s520000", O_RDONLY)
        var buf = [UInt8](repeating: 0, count: 4096)
        XCTAssertEqual(r < 0 ? -1 : buf.withUnsafeMutableBytes { pread(r, $0.baseAddress!, 4096, 516_096) }, -1)
        XCTAssertEqual(errno, EIO)
        if r >= 0 { close(r) }
        unmount()
    }
}
