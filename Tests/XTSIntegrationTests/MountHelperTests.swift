import Foundation
import XCTest
import XTSVolume
#if canImport(Glibc)
import Glibc
#endif

/// `mount -t fuse.xtsfs CIPHERDIR MNT -o keyfile=F`, as an /etc/fstab line or a systemd
/// mount unit does it: mount(8) runs mount.fuse3 with a clean PATH, which runs `xtsfs`
/// from there. The test puts a symlink to the build at /usr/local/bin/xtsfs for its
/// duration (only if nothing is there) and removes it afterwards.
final class MountHelperTests: VolumeTestCase {
    static let link = "/usr/local/bin/xtsfs"

    func testMountTypeFuseXtsfsWithKeyOptions() throws {
        guard geteuid() == 0 else { throw XCTSkip("mount -t fuse.xtsfs needs root here") }
        guard FileManager.default.isExecutableFile(atPath: "/sbin/mount.fuse3") || FileManager.default.isExecutableFile(atPath: "/usr/sbin/mount.fuse3") else {
            throw XCTSkip("mount.fuse3 is not installed")
        }
        var st = stat()
        if lstat(Self.link, &st) == 0 {
            // Our own link, left by a run that died before its cleanup, is replaced; anything else is not ours.
            let target = (try? FileManager.default.destinationOfSymbolicLink(atPath: Self.link)) ?? ""
            guard target.contains("/.build"), target.hasSuffix("/xtsfs") else { throw XCTSkip("\(Self.link) exists already; not replacing it") }
            unlink(Self.link)
        }
        XCTAssertEqual(symlink(Harness.binary, Self.link), 0)
        defer { unlink(Self.link) }

        initVolume()
        let keyfile = scratch + "/key"
        XCTAssertEqual(Harness.run(["keys", "generate", keyfile]).status, 0)
        XCTAssertEqual(Harness.run(["keys", "add", cipher, "--passfile", passfile, "--new-keyfile", keyfile]).status, 0)
        // fstab-only options are dropped, key options become xtsfs mount options, the rest go to FUSE.
        let opts = "keyfile=\(keyfile),noauto,nofail,_netdev,x-systemd.automount,cache_timeout=1"
        XCTAssertEqual(Harness.shell("timeout 30 mount -t fuse.xtsfs '\(cipher)' '\(mnt)' -o '\(opts)'"), 0)
        XCTAssertTrue(Harness.isMounted(mnt))
        try write(mnt + "/boot", [1])
        XCTAssertEqual(Harness.shell("umount '\(mnt)'"), 0)
        let deadline = Date().addingTimeInterval(10)
        while !Harness.daemons(mnt).isEmpty && Date() < deadline { usleep(20_000) }
        // A wrong key through mount(8): it fails and nothing is mounted.
        XCTAssertNotEqual(Harness.shell("timeout 30 mount -t fuse.xtsfs '\(cipher)' '\(mnt)' -o passfile=\(keyfile) 2>/dev/null"), 0)
        XCTAssertFalse(Harness.isMounted(mnt))
        // The mount was recorded; the direct form reads the file back.
        mount()
        XCTAssertEqual(try read(mnt + "/boot"), [1])
        unmount()
        XCTAssertTrue(Harness.run(["audit", cipher]).stdout.contains("mount  slot 1  keyfile  ok"))
    }
}
