import Foundation
import XCTest
#if canImport(Glibc)
import Glibc
#endif

/// An integrity volume (feature `blockAuthentication`, passphrase "xtsfs frozen integrity")
/// frozen in the repository: it holds files in both tag slots, a shrunk-then-grown file,
/// punched holes, a sparse file, a file across two tag groups, and two names written
/// as a hard link (git and the test bundle keep them as two copies of one backing file). Every later
/// version must read it exactly; do not regenerate it.
final class FrozenIntegrityVolumeTests: VolumeTestCase {
    static let frozenPassphrase = "xtsfs frozen integrity"

    static func content(_ n: Int) -> [UInt8] { (0..<n).map { UInt8((($0 * 7) + n) % 251) } }

    override func setUpWithError() throws {
        try super.setUpWithError()
        guard let fixture = Bundle.module.url(forResource: "Fixtures", withExtension: nil)?.appendingPathComponent("integrity-volume").path else {
            return XCTFail("fixture missing from the test bundle")
        }
        XCTAssertEqual(Harness.shell("cp -a '\(fixture)' '\(cipher)'"), 0)
        try (Self.frozenPassphrase + "\n").write(toFile: passfile, atomically: true, encoding: .utf8)
    }

    /// Both tag slots, holes, a shrunk-then-grown file, two tag groups: fsck reads every
    /// unit and finds nothing wrong (the hard link's two copies are two files here).
    func testFsckOfTheFrozenIntegrityVolumeIsClean() throws {
        let r = Harness.run(["fsck", cipher, "--passfile", passfile])
        XCTAssertEqual(r.status, 0, r.stdout + r.stderr)
    }

    func testFrozenIntegrityVolumeReadsBackExactly() throws {
        let status = Harness.run(["status", cipher])
        XCTAssertTrue(status.stdout.contains("block-authentication"), status.stdout)
        mount(["-o", "ro"])
        let hello = Array("Hello from an xtsfs integrity volume.\n".utf8)
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
