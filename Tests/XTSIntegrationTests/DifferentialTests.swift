import Foundation
import Synchronization
import XCTest
#if canImport(Glibc)
import Glibc
#endif

/// The same random operations on a plain directory and on the mount; after each step the
/// outcome (success or errno) must agree, and at checkpoints every name, type, size, byte,
/// link count and extended attribute of both trees. Fixed seeds, so a failure replays
/// exactly.
final class DifferentialTests: VolumeTestCase {
    var plain = ""

    override func setUpWithError() throws {
        try super.setUpWithError()
        plain = scratch + "/plain"
        try FileManager.default.createDirectory(atPath: plain, withIntermediateDirectories: false)
        initVolume()
        mount()
    }

    func testSeed1() throws { try run(seed: 1, steps: 600) }
    func testSeed2() throws { try run(seed: 2, steps: 600) }
    func testSeed3() throws { try run(seed: 3, steps: 600) }
    func testSeed4() throws { try run(seed: 4, steps: 600) }

    func run(seed: UInt64, steps: Int) throws {
        let e = DiffRun().exercise(seed: seed, steps: steps, plain: plain, mnt: mnt)
        if let failure = e.failure { return XCTFail(failure) }
        // The mix must really exercise the mount, not just collect ENOENTs.
        XCTAssertGreaterThan(e.succeeded, steps / 5, "seed \(seed): only \(e.succeeded) of \(steps) operations succeeded")
        XCTAssertGreaterThan(try Snapshot.take(mnt).count, 2)
        // And everything is still there after a remount.
        let before = try Snapshot.take(mnt)
        unmount()
        mount()
        XCTAssertEqual(try Snapshot.take(mnt), before, "seed \(seed): tree changed across remount")
        XCTAssertEqual(try Snapshot.take(plain), before)
    }

    func testConcurrentWorkers() throws {
        let failures = Self.concurrent(seeds: (100..<104).map { $0 }, steps: 300, plain: plain, mnt: mnt).failures
        for f in failures { XCTFail(f) }
        XCTAssertEqual(try Snapshot.take(mnt), try Snapshot.take(plain))
    }

    /// One worker per seed, each in its own new subdirectory `t<i>`, run at once while one
    /// more thread keeps listing and reading everything: outcomes and trees must still match.
    static func concurrent(seeds: [UInt64], steps: Int, plain: String, mnt: String) -> (failures: [String], executed: Int) {
        for i in seeds.indices {
            guard mkdir(plain + "/t\(i)", 0o755) == 0, mkdir(mnt + "/t\(i)", 0o755) == 0 else {
                return (["cannot make t\(i): errno \(errno)"], 0)
            }
        }
        let failures = Mutex<[String]>([])
        let executed = Atomic<Int>(0)
        let done = Atomic<Int>(0)
        DispatchQueue.concurrentPerform(iterations: seeds.count + 1) { i in
            if i == seeds.count {
                // The reader: errors other than "it just went away" (or a symlink it
                // followed going nowhere) are failures.
                var rounds = 0
                while done.load(ordering: .acquiring) < seeds.count || rounds == 0 {
                    rounds += 1
                    let e = FileManager.default.enumerator(atPath: mnt)
                    while let rel = e?.nextObject() as? String {
                        let fd = open(mnt + "/" + rel, O_RDONLY | O_NONBLOCK)
                        if fd < 0 {
                            if ![ENOENT, EISDIR, ENOTDIR, ELOOP].contains(errno) { failures.withLock { $0.append("reader: open \(rel): errno \(errno)") } }
                            continue
                        }
                        var buf = [UInt8](repeating: 0, count: 8192)
                        if Glibc.read(fd, &buf, 8192) < 0 && errno != EISDIR { failures.withLock { $0.append("reader: read \(rel): errno \(errno)") } }
                        close(fd)
                    }
                }
                return
            }
            let e = DiffRun().exercise(seed: seeds[i], steps: steps, plain: plain + "/t\(i)", mnt: mnt + "/t\(i)")
            if let failure = e.failure { failures.withLock { $0.append("worker \(i): " + failure) } }
            executed.add(e.executed, ordering: .relaxed)
            done.add(1, ordering: .releasing)
        }
        return (failures.withLock { $0 }, executed.load(ordering: .relaxed))
    }
}
