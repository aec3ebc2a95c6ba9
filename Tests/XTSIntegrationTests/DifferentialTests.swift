import Foundation
import Synchronization
import XCTest
#if canImport(Glibc)
import Glibc
#endif

/// The same random operations on a plain directory and on the mount; after each step the
/// outcome (success or errno) must agree, and at checkpoints every name, type, size, byte,
/// link count and extended attribute of both trees. Fixed seeds, so a failure replays
/// exactly; a failure is minimised to a short reproducer (see `Minimiser`).
class DifferentialTests: VolumeTestCase {
    var plain = ""

    override func setUpWithError() throws {
        try super.setUpWithError()
        plain = scratch + "/plain"
        try FileManager.default.createDirectory(atPath: plain, withIntermediateDirectories: false)
        initVolume()
        mount(Self.soakMountArguments)
    }

    /// `-o XTSFS_SOAK_MOUNT_OPTIONS` when set (scripts/soak --mount-options), for a soak of
    /// another configuration (the writeback cache, -o shared).
    static var soakMountArguments: [String] {
        ProcessInfo.processInfo.environment["XTSFS_SOAK_MOUNT_OPTIONS"].flatMap { $0.isEmpty ? nil : ["-o", $0] } ?? []
    }

    func testSeed1() throws { try run(seed: 1, steps: 600) }
    func testSeed2() throws { try run(seed: 2, steps: 600) }
    func testSeed3() throws { try run(seed: 3, steps: 600) }
    func testSeed4() throws { try run(seed: 4, steps: 600) }

    func run(seed: UInt64, steps: Int) throws {
        let e = DiffRun().exercise(seed: seed, steps: steps, plain: plain, mnt: mnt)
        if let failure = e.failure { return XCTFail(failure) }
        XCTAssertEqual(e.tolerated, [:], "seed \(seed): known xtsfs bugs")
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
        let c = Self.concurrent(seeds: (100..<104).map { $0 }, steps: 300, plain: plain, mnt: mnt)
        for f in c.failures { XCTFail(f) }
        if !c.abandoned.isEmpty { print("known xtsfs bugs: \(KnownBug.summary(c.tolerated)); set aside: \(c.abandoned.sorted())") }
        XCTAssertEqual(try Snapshot.take(mnt, excluding: c.abandoned), try Snapshot.take(plain, excluding: c.abandoned))
    }

    struct Concurrent {
        var failures: [String] = []
        var executed = 0
        var tolerated: [KnownBug: Int] = [:]
        /// Workers' directories (`t<i>`) left behind by a known bug that ended the run,
        /// to be left out of comparisons until a remount.
        var abandoned: Set<String> = []
    }

    /// One worker per seed, each in its own new subdirectory `t<i>`, run at once while one
    /// more thread keeps listing and reading everything: outcomes and trees must still match.
    static func concurrent(seeds: [UInt64], steps: Int, plain: String, mnt: String) -> Concurrent {
        for i in seeds.indices {
            guard mkdir(plain + "/t\(i)", 0o755) == 0, mkdir(mnt + "/t\(i)", 0o755) == 0 else {
                return Concurrent(failures: ["cannot make t\(i): errno \(errno)"])
            }
        }
        let result = Mutex(Concurrent())
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
                            if ![ENOENT, EISDIR, ENOTDIR, ELOOP].contains(errno) { result.withLock { $0.failures.append("reader: open \(rel): errno \(errno)") } }
                            continue
                        }
                        var buf = [UInt8](repeating: 0, count: 8192)
                        if Glibc.read(fd, &buf, 8192) < 0 && errno != EISDIR { result.withLock { $0.failures.append("reader: read \(rel): errno \(errno)") } }
                        close(fd)
                    }
                }
                return
            }
            var run = DiffRun()
            run.concurrent = true
            let e = run.exercise(seed: seeds[i], steps: steps, plain: plain + "/t\(i)", mnt: mnt + "/t\(i)")
            result.withLock {
                if let failure = e.failure { $0.failures.append("worker \(i): " + failure) }
                if e.abandoned != nil { $0.abandoned.insert("t\(i)") }
                $0.executed += e.executed
                $0.tolerated.merge(e.tolerated, uniquingKeysWith: +)
            }
            done.add(1, ordering: .releasing)
        }
        return result.withLock { $0 }
    }

    // MARK: Long runs (scripts/soak)

    /// Rounds until XTSFS_SOAK_SECONDS have passed, each in a fresh directory: one seed
    /// run alone, then the next four at once with a reader; then both whole trees are
    /// compared, the volume is remounted and compared again, and the round's directory is
    /// removed through the mount. Seeds count up from XTSFS_SOAK_SEED; XTSFS_SOAK_STEPS
    /// operations per sequential seed (half that per concurrent one). If XTSFS_SOAK_STATE
    /// names a file, the mountpoint is written there for the script to clear up after a kill;
    /// if XTSFS_SOAK_PROGRESS does, the progress lines and the summary go there as well.
    func testSoak() throws {
        let env = ProcessInfo.processInfo.environment
        guard let seconds = env["XTSFS_SOAK_SECONDS"].flatMap(Double.init), seconds > 0 else {
            throw XCTSkip("a long run: set XTSFS_SOAK_SECONDS (scripts/soak does)")
        }
        let first = env["XTSFS_SOAK_SEED"].flatMap { UInt64($0) } ?? UInt64(Date().timeIntervalSince1970)
        let steps = env["XTSFS_SOAK_STEPS"].flatMap { Int($0) } ?? 1000
        if let state = env["XTSFS_SOAK_STATE"] { try mnt.write(toFile: state, atomically: true, encoding: .utf8) }
        let start = Date(), deadline = start.addingTimeInterval(seconds)
        var seed = first, rounds = 0, sequentialOps = 0, concurrentOps = 0, lastProgress = start
        var failure: String?
        var tolerated: [KnownBug: Int] = [:]
        // swift test passes on the test's output only at the end: progress goes to a file.
        let progress = env["XTSFS_SOAK_PROGRESS"].flatMap { FileHandle(forWritingAtPath: $0) }
        defer { try? progress?.close() }
        func say(_ line: String) {
            print("soak: " + line)
            progress?.write(Data(("soak: " + line + "\n").utf8))
        }
        say("seeds from \(first), \(steps) operations per sequential seed, \(Int(seconds)) s" + (Self.soakMountArguments.isEmpty ? "" : ", mounted with " + Self.soakMountArguments.joined(separator: " ")))
        while failure == nil && Date() < deadline {
            rounds += 1
            let roundSeed = seed
            let dir = "/round\(rounds)"
            guard mkdir(plain + dir, 0o755) == 0, mkdir(mnt + dir, 0o755) == 0 else { failure = "cannot make \(dir): errno \(errno)"; break }
            let s = DiffRun().exercise(seed: seed, steps: steps, plain: plain + dir, mnt: mnt + dir)
            sequentialOps += s.executed
            tolerated.merge(s.tolerated, uniquingKeysWith: +)
            seed += 1
            if let f = s.failure { failure = "sequential " + f; break }
            let c = Self.concurrent(seeds: (seed..<seed + 4).map { $0 }, steps: steps / 2, plain: plain + dir, mnt: mnt + dir)
            concurrentOps += c.executed
            tolerated.merge(c.tolerated, uniquingKeysWith: +)
            seed += 4
            if !c.failures.isEmpty { failure = "concurrent seeds \(seed - 4)...\(seed - 1):\n" + c.failures.joined(separator: "\n"); break }
            // A worker stopped by a known bug left its directory parted from the plain one.
            let aside = Set(c.abandoned.map { String(dir.dropFirst()) + "/" + $0 })
            let before = try Snapshot.take(mnt, excluding: aside)
            if let d = Snapshot.difference(try Snapshot.take(plain, excluding: aside), before, names: ("plain", "xtsfs")) {
                failure = "round \(rounds) (seeds \(roundSeed)...\(seed - 1)), whole trees: \(d)"; break
            }
            unmount()
            mount(Self.soakMountArguments)
            if let d = Snapshot.difference(before, try Snapshot.take(mnt, excluding: aside), names: ("before remount", "after remount")) {
                failure = "round \(rounds) (seeds \(roundSeed)...\(seed - 1)), across a remount: \(d)"; break
            }
            try FileManager.default.removeItem(atPath: plain + dir)
            do { try FileManager.default.removeItem(atPath: mnt + dir) } catch {
                failure = "round \(rounds): removing \(dir) through the mount: \(error)"; break
            }
            if Date().timeIntervalSince(lastProgress) >= 30 {
                lastProgress = Date()
                say("\(Int(lastProgress.timeIntervalSince(start))) s: \(rounds) rounds, \(sequentialOps + concurrentOps) operations")
            }
        }
        let verdict = failure == nil ? "passed" : "FAILED"
        say("\(verdict): \(sequentialOps + concurrentOps) operations (\(sequentialOps) sequential, \(concurrentOps) concurrent) in \(rounds) rounds, \(Int(Date().timeIntervalSince(start))) s, seeds \(first)...\(seed - 1); known xtsfs bugs passed over: \(KnownBug.summary(tolerated))")
        if let failure {
            say("failure begin\n\(failure)\nsoak: failure end")
            XCTFail(failure)
        }
    }

    // MARK: Known xtsfs bugs

    /// The tester's first find, fixed on main (fbb4fa5): through the descriptor of a
    /// directory removed while open, fstat answered ENOENT where ext4 answers (nlink 0).
    /// Its minimised reproducer, and the same with a file, now agree even strictly.
    func testRemovedDirectoryStillAnswersThroughItsDescriptor() throws {
        let removedDirectory: [DiffOp] = [.mkdir("c"), .openFd(slot: 0, "c", flags: O_RDONLY), .rmdir("c"), .fdStat(slot: 0),
                                          .fdSetxattr(slot: 0, name: "user.a", length: 3, seed: 1), .fdGetxattr(slot: 0, name: "user.a")]
        let removedFile: [DiffOp] = [.write("f", offset: 0, length: 5, seed: 1, truncate: false), .openFd(slot: 0, "f", flags: O_RDONLY), .unlink("f"), .fdStat(slot: 0)]
        var strict = DiffRun()
        strict.tolerateKnownBugs = false
        for (i, ops) in [removedDirectory, removedFile].enumerated() {
            XCTAssertEqual(mkdir(plain + "/k\(i)", 0o755), 0)
            XCTAssertEqual(mkdir(mnt + "/k\(i)", 0o755), 0)
            let r = strict.replay(ops, plain: plain + "/k\(i)", mnt: mnt + "/k\(i)")
            XCTAssertNil(r.failure?.detail)
            XCTAssertEqual(r.outcomes.count, ops.count)
        }
    }

    /// The race behind KnownBug.strippedNode, in its smallest form: two threads, each
    /// creating, stat'ing and unlinking a file in its own directory. Every call must
    /// succeed; before bcd4f39, within seconds a stat of a file just created said ENOENT,
    /// and from then on that name, still listed, could not be reached.
    func testRacingUnlinkAndCreateStripANewFilesNode() throws {
        let root = mnt
        let found = Mutex<[String]>([])
        let deadline = Date().addingTimeInterval(5)
        DispatchQueue.concurrentPerform(iterations: 2) { i in
            let dir = root + "/w\(i)"
            guard mkdir(dir, 0o755) == 0 else { return found.withLock { $0.append("mkdir w\(i): errno \(errno)") } }
            while Date() < deadline && found.withLock({ $0.isEmpty }) {
                let fd = open(dir + "/f", O_WRONLY | O_CREAT, 0o644)
                if fd < 0 { return found.withLock { $0.append("w\(i)/f: open: \(DiffOp.describe(errno))") } }
                close(fd)
                var st = stat()
                if stat(dir + "/f", &st) != 0 {
                    let e = errno
                    let known = KnownBug.unreachable(root, "w\(i)/f")
                    return found.withLock { $0.append("w\(i)/f: stat: \(DiffOp.describe(e))\(known ? " (KnownBug.strippedNode)" : "")") }
                }
                if unlink(dir + "/f") != 0 { return found.withLock { $0.append("w\(i)/f: unlink: \(DiffOp.describe(errno))") } }
            }
        }
        let seen = found.withLock { $0 }
        print("racing create and unlink: " + (seen.isEmpty ? "no failure in 5 s" : seen.joined(separator: "; ")))
        XCTAssertEqual(seen, [], "racing create and unlink")
    }

    // MARK: The minimiser, against deliberate faults of the plain side

    /// The plain side refuses a hard link across directories with EXDEV: the outcome of
    /// one `link` differs, and only after a file and a directory were made.
    func testMinimiserShrinksAnOutcomeFault() throws {
        let run = DiffRun(reference: { op, side in
            let r = op.apply(on: side)
            if case let .link(from, to) = op, r == 0, DifferentialTests.parent(from) != DifferentialTests.parent(to) {
                _ = unlink(side.root + "/" + to)
                return EXDEV
            }
            return r
        })
        try checkMinimiser(run, seed: 17, expect: "outcome of link", lastKind: "link")
    }

    /// The plain side's truncate of a file with several names changes nothing: the
    /// outcomes agree and only the trees show it, at the next checkpoint.
    func testMinimiserShrinksATreeFault() throws {
        let run = DiffRun(reference: { op, side in
            if case let .truncate(p, _) = op {
                var st = stat()
                if stat(side.root + "/" + p, &st) == 0, st.st_mode & S_IFMT == S_IFREG, st.st_nlink > 1 { return 0 }
            }
            return op.apply(on: side)
        })
        try checkMinimiser(run, seed: 25, expect: "trees", lastKind: "truncate")
    }

    static func parent(_ p: String) -> String { p.split(separator: "/").dropLast().joined(separator: "/") }

    func checkMinimiser(_ run: DiffRun, seed: UInt64, expect signature: String, lastKind: String, file: StaticString = #filePath, line: UInt = #line) throws {
        let ops = DiffOp.generate(seed: seed, steps: 300)
        let r = run.replay(ops, plain: plain, mnt: mnt)
        let failure = try XCTUnwrap(r.failure, "seed \(seed): the fault never showed", file: file, line: line)
        XCTAssertEqual(failure.signature, signature, file: file, line: line)
        XCTAssertGreaterThanOrEqual(failure.step, 100, "seed \(seed): fails too early to show shrinking", file: file, line: line)
        let report = Minimiser(run: run, plainParent: plain, mntParent: mnt).minimise(ops, failure: failure)
        print(report.text)
        XCTAssertTrue(report.reproduced, file: file, line: line)
        XCTAssertFalse(report.bounded, file: file, line: line)
        XCTAssertLessThanOrEqual(report.ops.count, 4, report.text, file: file, line: line)
        XCTAssertEqual(report.ops.last?.kind, lastKind, report.text, file: file, line: line)
        XCTAssertEqual(report.failure.signature, signature, file: file, line: line)
        XCTAssertTrue(report.text.contains(report.ops.last!.description), file: file, line: line)
        // 1-minimal: without any one of its operations the sequence passes.
        for i in report.ops.indices {
            var shorter = report.ops
            shorter.remove(at: i)
            let dir = "/check-\(i)"
            XCTAssertEqual(mkdir(plain + dir, 0o755), 0)
            XCTAssertEqual(mkdir(mnt + dir, 0o755), 0)
            let again = run.replay(shorter, plain: plain + dir, mnt: mnt + dir).failure
            XCTAssertNotEqual(again?.signature, signature, "still fails without operation \(i)", file: file, line: line)
        }
        // Every replay cleaned up after itself.
        let left = try FileManager.default.contentsOfDirectory(atPath: mnt).filter { $0.hasPrefix("minimise-") }
        XCTAssertEqual(left, [], file: file, line: line)
        // And a failing run reports the same reproducer.
        XCTAssertEqual(mkdir(plain + "/again", 0o755), 0)
        XCTAssertEqual(mkdir(mnt + "/again", 0o755), 0)
        let message = run.exercise(seed: seed, steps: 300, plain: plain + "/again", mnt: mnt + "/again").failure ?? ""
        XCTAssertTrue(message.hasPrefix("seed \(seed) step \(failure.step): "), message, file: file, line: line)
        XCTAssertTrue(message.contains(report.text), message, file: file, line: line)
    }
}
