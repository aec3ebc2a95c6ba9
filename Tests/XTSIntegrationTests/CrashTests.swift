import Foundation
import Synchronization
import XCTest
#if canImport(Glibc)
import Glibc
#endif

/// The daemon killed with SIGKILL in the middle of writes: what was fsync'ed survives,
/// and the volume mounts again.
class CrashTests: VolumeTestCase {
    func testKillDashNineLosesNothingFsynced() throws {
        initVolume()
        mount()
        let a = pattern(300_001, seed: 1)
        try write(mnt + "/before", a)
        let fdA = open(mnt + "/before", O_RDONLY)
        XCTAssertEqual(fsync(fdA), 0)
        close(fdA)

        // A writer appends a known stream to "during", fsyncing every 8 chunks and
        // recording how much is durable, until the daemon dies under it.
        let chunk = 64 * 1024
        let stream = pattern(chunk * 400, seed: 2)
        let synced = Atomic<Int>(0)
        let started = Atomic<Bool>(false)
        let path = mnt + "/during"
        let writer = Thread {
            let fd = open(path, O_WRONLY | O_CREAT, 0o644)
            guard fd >= 0 else { return }
            defer { close(fd) }
            var off = 0
            while off + chunk <= stream.count {
                let n = stream.withUnsafeBytes { pwrite(fd, $0.baseAddress! + off, chunk, off_t(off)) }
                if n != chunk { return }
                off += chunk
                if (off / chunk) % 8 == 0 {
                    if fsync(fd) != 0 { return }
                    synced.store(off, ordering: .releasing)
                    started.store(true, ordering: .releasing)
                }
            }
        }
        writer.start()
        let deadline = Date().addingTimeInterval(20)
        while !started.load(ordering: .acquiring) && Date() < deadline { usleep(1000) }
        usleep(20_000)
        let pids = Harness.daemons(mnt)
        XCTAssertEqual(pids.count, 1)
        for pid in pids { kill(pid, SIGKILL) }
        // The writer now gets ENOTCONN and stops; clear the dead mount.
        while !writer.isFinished && Date() < deadline { usleep(1000) }
        Harness.forceUnmount(mnt)
        XCTAssertFalse(Harness.isMounted(mnt))

        mount()
        XCTAssertEqual(try read(mnt + "/before"), a, "an fsync'ed file must survive the daemon's death")
        let durable = synced.load(ordering: .acquiring)
        XCTAssertGreaterThan(durable, 0)
        let after = try read(mnt + "/during")
        XCTAssertGreaterThanOrEqual(after.count, durable)
        XCTAssertEqual(Array(after.prefix(durable)), Array(stream.prefix(durable)), "fsync'ed prefix intact")
        // And the volume keeps working.
        try write(mnt + "/after", pattern(5000, seed: 3))
        XCTAssertEqual(try read(mnt + "/after"), pattern(5000, seed: 3))
    }
}
