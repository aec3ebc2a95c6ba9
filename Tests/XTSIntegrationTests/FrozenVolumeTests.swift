import Foundation
import XCTest
#if canImport(Glibc)
import Glibc
#endif

/// A volume written by xtsfs format version 1 (passphrase "xtsfs frozen v1") and frozen in
/// the repository. Every later version must still read it exactly; do not regenerate it.
final class FrozenVolumeTests: VolumeTestCase {
    static let frozenPassphrase = "xtsfs frozen v1"

    /// The generator the fixture's files were written with: byte i of an n-byte file.
    static func content(_ n: Int) -> [UInt8] { (0..<n).map { UInt8((($0 * 7) + n) % 251) } }

    override func setUpWithError() throws {
        try super.setUpWithError()
        guard let fixture = Bundle.module.url(forResource: "Fixtures", withExtension: nil)?.appendingPathComponent("v1-volume").path else {
            return XCTFail("fixture missing from the test bundle")
        }
        XCTAssertEqual(Harness.shell("cp -a '\(fixture)' '\(cipher)'"), 0)
        try (Self.frozenPassphrase + "\n").write(toFile: passfile, atomically: true, encoding: .utf8)
    }

    func testStatusOfFrozenVolume() {
        let r = Harness.run(["status", cipher])
        XCTAssertEqual(r.status, 0, r.stderr)
        XCTAssertTrue(r.stdout.contains("Format version:  1"), r.stdout)
        XCTAssertTrue(r.stdout.contains("xtsfs.header: ok"), r.stdout)
    }

    func testFrozenVolumeReadsBackExactly() throws {
        let headerBefore = try read(cipher + "/xtsfs.header")
        mount(["-o", "ro"])
        XCTAssertEqual(String(decoding: try read(mnt + "/hello.txt"), as: UTF8.self), "Hello from xtsfs format version 1.\n")
        for n in [0, 1, 15, 16, 17, 4095, 4096, 4097, 4111, 100000] {
            XCTAssertEqual(try read(mnt + "/sizes/s\(n)"), Self.content(n), "sizes/s\(n)")
        }
        let long = mnt + "/dir-" + String(repeating: "L", count: 200)
        XCTAssertEqual(String(decoding: try read(long + "/nested.txt"), as: UTF8.self), "inside a long-named directory\n")
        XCTAssertEqual(try FileManager.default.destinationOfSymbolicLink(atPath: mnt + "/link"), "hello.txt")
        var sparse = [UInt8](repeating: 0, count: 1 << 20)
        sparse[500000] = UInt8(ascii: "X")
        XCTAssertEqual(try read(mnt + "/sparse"), sparse)
        XCTAssertEqual(String(decoding: try read(mnt + "/\u{fc}n\u{ef}c\u{f6}d\u{e9}.txt"), as: UTF8.self), "unicode\n")
        XCTAssertEqual(try FileManager.default.contentsOfDirectory(atPath: mnt + "/empty"), [])
        XCTAssertEqual(try FileManager.default.contentsOfDirectory(atPath: mnt).count, 7)
        unmount()
        XCTAssertEqual(try read(cipher + "/xtsfs.header"), headerBefore, "a read-only mount must not change the header")
    }

    func testFrozenVolumeAcceptsWrites() throws {
        mount()
        try write(mnt + "/sizes/s4097", Array("rewritten".utf8))
        try write(mnt + "/new.txt", Self.content(5000))
        unmount()
        mount()
        XCTAssertEqual(try read(mnt + "/sizes/s4097"), Array("rewritten".utf8))
        XCTAssertEqual(try read(mnt + "/new.txt"), Self.content(5000))
        XCTAssertEqual(try read(mnt + "/sizes/s100000"), Self.content(100000))
    }

    func testWrongPassphraseOnFrozenVolume() throws {
        try "xtsfs frozen v2\n".write(toFile: passfile, atomically: true, encoding: .utf8)
        let r = Harness.run(["mount", cipher, mnt, "--passfile", passfile])
        XCTAssertEqual(r.status, 12, r.stderr)
    }
}
