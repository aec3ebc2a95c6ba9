import Foundation
import Synchronization
import XCTest
import XTSVolume
#if canImport(Glibc)
import Glibc
#endif

/// kill -9 of the daemon while several threads create, write, fsync, rename, overwrite
/// and unlink: after remounting, every fsync'ed byte is there, every file reads without
/// error, and fsck is clean or repairs to clean. XTSFS_CRASH_ITERATIONS sets the number
/// of rounds (scripts/test --soak raises it).
final class CrashConsistencyTests: VolumeTestCase {
    /// What a worker knows is durable, and what was in flight when the daemon died.
    struct Ledger {
        /// Name → contents, for files whose data and name were both fsync'ed.
        var durable: [String: [UInt8]] = [:]
        /// Names an unfinished operation touched: they may or may not exist, and if they
        /// exist they hold one of these contents (nil: any contents, e.g. an overwrite
        /// cut in the middle; it must still read without error).
        var uncertain: [String: [[UInt8]]?] = [:]
    }

    final class Worker: @unchecked Sendable {
        // Only the worker thread writes `ledger` until it is joined; read afterwards.
        var ledger = Ledger()
        let id: Int
        let dir: String
        var n = 0
        init(id: Int, dir: String) { self.id = id; self.dir = dir }

        func fsyncDir() -> Bool {
            let fd = open(dir, O_RDONLY | O_DIRECTORY)
            guard fd >= 0 else { return false }
            defer { close(fd) }
            return fsync(fd) == 0
        }

        func writeFile(_ name: String, _ bytes: [UInt8], flags: Int32) -> Bool {
            let fd = open(dir + "/" + name, O_WRONLY | flags, 0o644)
            guard fd >= 0 else { return false }
            defer { close(fd) }
            var off = 0
            while off < bytes.count {
                let w = bytes.withUnsafeBytes { pwrite(fd, $0.baseAddress! + off, min(65536, bytes.count - off), off_t(off)) }
                if w <= 0 { return false }
                off += w
            }
            if flags & O_TRUNC != 0 || flags & O_CREAT != 0 { if ftruncate(fd, off_t(bytes.count)) != 0 { return false } }
            return fsync(fd) == 0
        }

        /// Runs operations until one fails (the daemon is dead).
        func run() {
            var rng = SystemRandomNumberGenerator()
            while true {
                n += 1
                let op = Int.random(in: 0..<10, using: &rng)
                let sizes = [0, 1, 15, 100, 4095, 4096, 4097, 20000, 70001]
                let content = pattern(sizes.randomElement(using: &rng)!, seed: UInt64(id * 1_000_000 + n))
                let names = ledger.durable.keys.sorted()
                if op < 4 || names.isEmpty {
                    // Every third name is long: its side file is part of what a crash can cut.
                    let name = "w\(id)-\(n)" + (n % 3 == 0 ? String(repeating: "x", count: 180) : "")
                    // Created but not yet fsync'ed: any prefix of the data may have landed.
                    ledger.uncertain[name] = .some(nil)
                    guard writeFile(name, content, flags: O_CREAT | O_EXCL), fsyncDir() else { return }
                    ledger.uncertain[name] = nil
                    ledger.durable[name] = content
                } else if op < 6 {
                    let from = names.randomElement(using: &rng)!
                    let to = "w\(id)-\(n)-r" + (n % 2 == 0 ? String(repeating: "y", count: 180) : "")
                    let bytes = ledger.durable[from]!
                    ledger.durable[from] = nil
                    ledger.uncertain[from] = .some([bytes])
                    ledger.uncertain[to] = .some([bytes])
                    guard rename(dir + "/" + from, dir + "/" + to) == 0, fsyncDir() else { return }
                    ledger.uncertain[from] = nil
                    ledger.uncertain[to] = nil
                    ledger.durable[to] = bytes
                } else if op < 8 {
                    let name = names.randomElement(using: &rng)!
                    let old = ledger.durable[name]!
                    ledger.durable[name] = nil
                    // Rewritten in place: a crash before the fsync may leave any mix.
                    ledger.uncertain[name] = .some(nil)
                    guard writeFile(name, content, flags: O_TRUNC) else { return }
                    _ = old
                    ledger.uncertain[name] = nil
                    ledger.durable[name] = content
                } else {
                    let name = names.randomElement(using: &rng)!
                    let bytes = ledger.durable[name]!
                    ledger.durable[name] = nil
                    ledger.uncertain[name] = .some([bytes])
                    guard unlink(dir + "/" + name) == 0, fsyncDir() else { return }
                    ledger.uncertain[name] = nil
                }
            }
        }
    }

    func testKillDashNineUnderConcurrentNamespaceAndDataLoad() throws {
        let rounds = Int(ProcessInfo.processInfo.environment["XTSFS_CRASH_ITERATIONS"] ?? "") ?? 3
        initVolume()
        var workers: [Worker] = []
        for round in 0..<rounds {
            mount()
            // Each round adds its own workers; earlier rounds' files must survive too.
            var mine: [Worker] = []
            for t in 0..<4 {
                let dir = mnt + "/r\(round)-t\(t)"
                XCTAssertEqual(mkdir(dir, 0o755), 0)
                let fd = open(mnt, O_RDONLY | O_DIRECTORY); fsync(fd); close(fd)
                mine.append(Worker(id: round * 10 + t, dir: dir))
            }
            let threads = mine.map { w in Thread { w.run() } }
            threads.forEach { $0.start() }
            usleep(useconds_t(Int.random(in: 300_000...900_000)))
            let pids = Harness.daemons(mnt)
            XCTAssertEqual(pids.count, 1)
            for pid in pids { kill(pid, SIGKILL) }
            let deadline = Date().addingTimeInterval(30)
            while threads.contains(where: { !$0.isFinished }) && Date() < deadline { usleep(2000) }
            XCTAssertFalse(threads.contains { !$0.isFinished }, "a worker hung after the daemon died")
            Harness.forceUnmount(mnt)
            XCTAssertFalse(Harness.isMounted(mnt))
            workers += mine

            // fsck: clean, or repaired to clean.
            var f = Harness.run(["fsck", cipher, "--passfile", passfile])
            if f.status != 0 {
                print("round \(round): fsck found \(f.stdout)")
                let r = Harness.run(["fsck", cipher, "--repair", "--passfile", passfile])
                XCTAssertEqual(r.status, FsckExit.corrected.rawValue, "round \(round): fsck --repair: \(r.stdout)\(r.stderr)")
                f = Harness.run(["fsck", cipher, "--passfile", passfile])
            }
            XCTAssertEqual(f.status, 0, "round \(round): fsck after repair: \(f.stdout)")

            mount()
            var checked = 0
            for w in workers {
                for (name, bytes) in w.ledger.durable {
                    XCTAssertEqual(try? read(w.dir + "/" + name), bytes, "round \(round): fsync'ed \(w.dir)/\(name) lost or changed")
                    checked += 1
                }
                for (name, allowed) in w.ledger.uncertain where FileManager.default.fileExists(atPath: w.dir + "/" + name) {
                    let got = try? read(w.dir + "/" + name)
                    XCTAssertNotNil(got, "round \(round): \(w.dir)/\(name) unreadable")
                    if let got, let allowed = allowed ?? nil {
                        XCTAssertTrue(allowed.contains(got), "round \(round): \(w.dir)/\(name) holds contents nobody wrote")
                    }
                }
                // Nothing else unreadable either.
                for name in (try? FileManager.default.contentsOfDirectory(atPath: w.dir)) ?? [] {
                    XCTAssertNoThrow(try read(w.dir + "/" + name), "round \(round): \(name) unreadable")
                }
            }
            XCTAssertGreaterThan(checked, 0)
            unmount()
        }
    }
}
