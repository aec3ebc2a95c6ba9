import Foundation
import Synchronization
import XCTest
#if canImport(Glibc)
import Glibc
#endif

/// The same random operations on a plain directory and on the mount; after each step the
/// outcome (success or errno) must agree, and at checkpoints every name, type, size and
/// byte of both trees. Fixed seeds, so a failure replays exactly.
class DifferentialTests: VolumeTestCase {
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

    struct Rng {
        var s: UInt64
        mutating func next() -> UInt64 { s ^= s << 13; s ^= s >> 7; s ^= s << 17; return s }
        mutating func below(_ n: Int) -> Int { Int(next() % UInt64(n)) }
    }

    /// Outcome of one operation: 0 or the errno.
    typealias Outcome = Int32

    func run(seed: UInt64, steps: Int) throws {
        let (failure, succeeded) = exercise(seed: seed, steps: steps, sub: "")
        if let failure { return XCTFail(failure) }
        // The mix must really exercise the mount, not just collect ENOENTs.
        XCTAssertGreaterThan(succeeded, steps / 5, "seed \(seed): only \(succeeded) of \(steps) operations succeeded")
        XCTAssertGreaterThan(try snapshot(mnt).count, 2)
        // And everything is still there after a remount.
        let before = try snapshot(mnt)
        unmount()
        mount()
        XCTAssertEqual(try snapshot(mnt), before, "seed \(seed): tree changed across remount")
        XCTAssertEqual(try snapshot(plain), before)
    }

    /// Four workers, each with its own subdirectory and seed, run at once while a fifth
    /// thread keeps listing and reading everything: outcomes and trees must still match.
    func testConcurrentWorkers() throws {
        let workers = 4
        for i in 0..<workers {
            XCTAssertEqual(mkdir(plain + "/t\(i)", 0o755), 0)
            XCTAssertEqual(mkdir(mnt + "/t\(i)", 0o755), 0)
        }
        let failures = Mutex<[String]>([])
        let done = Atomic<Int>(0)
        let root = mnt, plainRoot = plain
        DispatchQueue.concurrentPerform(iterations: workers + 1) { i in
            if i == workers {
                // The reader: errors other than "it just went away" are failures.
                var rounds = 0
                while done.load(ordering: .acquiring) < workers || rounds == 0 {
                    rounds += 1
                    let e = FileManager.default.enumerator(atPath: root)
                    while let rel = e?.nextObject() as? String {
                        let fd = open(root + "/" + rel, O_RDONLY | O_NONBLOCK)
                        if fd < 0 {
                            if ![ENOENT, EISDIR].contains(errno) { failures.withLock { $0.append("reader: open \(rel): errno \(errno)") } }
                            continue
                        }
                        var buf = [UInt8](repeating: 0, count: 8192)
                        if Glibc.read(fd, &buf, 8192) < 0 && errno != EISDIR { failures.withLock { $0.append("reader: read \(rel): errno \(errno)") } }
                        close(fd)
                    }
                }
                return
            }
            let (failure, _) = Self.exercise(seed: 100 + UInt64(i), steps: 300, plain: plainRoot + "/t\(i)", mnt: root + "/t\(i)")
            if let failure { failures.withLock { $0.append(failure) } }
            done.add(1, ordering: .releasing)
        }
        for f in failures.withLock({ $0 }) { XCTFail(f) }
        XCTAssertEqual(try snapshot(mnt), try snapshot(plain))
    }

    /// Runs `steps` random operations under `sub` of both trees; returns the first
    /// disagreement, and how many operations succeeded. Safe to run on several threads
    /// with different `sub`s.
    func exercise(seed: UInt64, steps: Int, sub: String) -> (String?, Int) {
        Self.exercise(seed: seed, steps: steps, plain: plain + sub, mnt: mnt + sub)
    }

    static func exercise(seed: UInt64, steps: Int, plain: String, mnt: String) -> (String?, Int) {
        var rng = Rng(s: seed &* 0x9E3779B97F4A7C15 | 1)
        let names = ["a", "b", "c", "long-" + String(repeating: "x", count: 200), "d1", "d2"]
        // Paths are picked from a small set so operations collide: overwrite, rename over, rmdir non-empty.
        func randomPath() -> String {
            let depth = [0, 0, 0, 1, 1, 2][rng.below(6)]
            var parts: [String] = []
            for i in 0...depth { parts.append(i < depth ? ["d1", "d2"][rng.below(2)] : names[rng.below(names.count)]) }
            return parts.joined(separator: "/")
        }
        var log: [String] = []
        var succeeded = 0
        for step in 0..<steps {
            let op = rng.below(100)
            let p = randomPath()
            let description: String
            let action: (String) -> Outcome
            switch op {
            case 0..<40:
                let off = rng.below(3) == 0 ? rng.below(20000) : rng.below(9000)
                let len = [1, 7, 15, 16, 17, 100, 4095, 4096, 4097, 8192, 12000][rng.below(11)]
                let data = pattern(len, seed: rng.next())
                let flags = rng.below(4) == 0 ? O_TRUNC : 0
                description = "write \(len)@\(off) \(flags != 0 ? "O_TRUNC " : "")\(p)"
                action = { root in
                    let fd = open(root + "/" + p, O_WRONLY | O_CREAT | flags, 0o644)
                    if fd < 0 { return errno }
                    defer { close(fd) }
                    return data.withUnsafeBytes { pwrite(fd, $0.baseAddress, $0.count, off_t(off)) } == len ? 0 : errno
                }
            case 40..<52:
                let size = [0, 1, 15, 16, 17, 4095, 4096, 4097, 5000, 10000, 30000][rng.below(11)]
                description = "truncate \(size) \(p)"
                action = { root in truncate(root + "/" + p, off_t(size)) == 0 ? 0 : errno }
            case 52..<64:
                let q = randomPath()
                description = "rename \(p) -> \(q)"
                action = { root in rename(root + "/" + p, root + "/" + q) == 0 ? 0 : errno }
            case 64..<74:
                description = "unlink \(p)"
                action = { root in unlink(root + "/" + p) == 0 ? 0 : errno }
            case 74..<86:
                description = "mkdir \(p)"
                action = { root in mkdir(root + "/" + p, 0o755) == 0 ? 0 : errno }
            case 86..<92:
                description = "rmdir \(p)"
                action = { root in rmdir(root + "/" + p) == 0 ? 0 : errno }
            default:
                let off = rng.below(12000), len = rng.below(6000) + 1
                description = "read \(len)@\(off) \(p)"
                action = { root in
                    let fd = open(root + "/" + p, O_RDONLY)
                    if fd < 0 { return errno }
                    defer { close(fd) }
                    var buf = [UInt8](repeating: 0, count: len)
                    let n = pread(fd, &buf, len, off_t(off))
                    if n < 0 { return errno }
                    // Fold the bytes into the outcome so a wrong byte shows as a mismatch.
                    return Int32(truncatingIfNeeded: buf.prefix(n).reduce(UInt32(n)) { $0 &* 31 &+ UInt32($1) } & 0x7fff_ffff) | 0x4000_0000
                }
            }
            log.append(description)
            let expected = action(plain)
            let got = action(mnt)
            if got == 0 || got & 0x4000_0000 != 0 { succeeded += 1 }
            if expected != got {
                return ("seed \(seed) step \(step): \(description): plain \(expected), xtsfs \(got)\nlast steps:\n" + log.suffix(8).joined(separator: "\n"), succeeded)
            }
            if step % 50 == 49 || step == steps - 1 {
                guard let a = try? snapshot(plain), let b = try? snapshot(mnt) else { return ("seed \(seed) step \(step): cannot list the trees", succeeded) }
                if a != b {
                    let diff = Set(a.keys).symmetricDifference(b.keys).sorted() + a.keys.filter { b[$0] != nil && a[$0] != b[$0] }.sorted()
                    return ("seed \(seed) step \(step): trees differ at \(diff.prefix(5))\nlast steps:\n" + log.suffix(8).joined(separator: "\n"), succeeded)
                }
            }
        }
        return (nil, succeeded)
    }

    /// Relative path → "d" for directories, or "size:bytes-hash" for files.
    func snapshot(_ root: String) throws -> [String: String] { try Self.snapshot(root) }

    static func snapshot(_ root: String) throws -> [String: String] {
        var out: [String: String] = [:]
        func walk(_ rel: String) throws {
            for name in try FileManager.default.contentsOfDirectory(atPath: root + "/" + rel) {
                let r = rel.isEmpty ? name : rel + "/" + name
                var st = stat()
                guard lstat(root + "/" + r, &st) == 0 else { continue }
                if st.st_mode & S_IFMT == S_IFDIR {
                    out[r] = "d"
                    try walk(r)
                } else {
                    let bytes = [UInt8](try Data(contentsOf: URL(fileURLWithPath: root + "/" + r)))
                    let sizeNote = Int(st.st_size) == bytes.count ? "" : " (stat says \(st.st_size))"
                    out[r] = "\(bytes.count)\(sizeNote):\(bytes.reduce(UInt64(1469598103934665603)) { ($0 ^ UInt64($1)) &* 1099511628211 })"
                }
            }
        }
        try walk("")
        return out
    }
}
