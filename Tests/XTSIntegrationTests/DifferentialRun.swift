import Foundation
#if canImport(Glibc)
import Glibc
#endif

/// The first disagreement between the plain directory and the mount.
struct DiffFailure: Sendable {
    /// Index of the operation after which it showed.
    var step: Int
    /// What disagreed: one operation family's outcome, or the trees. A shorter sequence
    /// counts as the same failure only if this matches, so minimising cannot wander off
    /// to another difference.
    var signature: String
    var detail: String
    /// xtsfs said ENOENT where the plain directory succeeded.
    var spuriousENOENT = false
}

/// Runs operations on both sides and compares: every outcome, and the whole trees at
/// checkpoints and after the last operation.
struct DiffRun: Sendable {
    typealias Outcome = DiffOp.Outcome
    /// How the plain side runs an operation; a test can put a deliberate fault here.
    var reference: @Sendable (DiffOp, DiffSide) -> Outcome = { op, side in op.apply(on: side) }
    var checkpointEvery = 50
    /// Let differences that are reported xtsfs bugs pass (and count them): only when
    /// XTSFS_DIFF_TOLERATE_KNOWN is set.
    var tolerateKnownBugs = ProcessInfo.processInfo.environment["XTSFS_DIFF_TOLERATE_KNOWN"] != nil
    /// Other runs go on at the same time on the same mount: races between them are possible.
    var concurrent = false

    struct Result {
        var failure: DiffFailure?
        var outcomes: [(plain: Outcome, mount: Outcome)] = []
        var tolerated: [KnownBug: Int] = [:]
        /// The run stopped at a known bug after which the two sides can no longer be
        /// compared; the mount directory is left as it was, for the caller to set aside.
        var abandoned: KnownBug?
        var succeeded: Int { outcomes.filter { DiffOp.isSuccess($0.mount) }.count }
    }

    func replay(_ ops: [DiffOp], plain: String, mnt: String) -> Result {
        var result = Result()
        let plainSide = DiffSide(root: plain), mountSide = DiffSide(root: mnt)
        defer {
            plainSide.closeAll()
            mountSide.closeAll()
        }
        for (i, op) in ops.enumerated() {
            let expected = reference(op, plainSide)
            let got = op.apply(on: mountSide)
            result.outcomes.append((expected, got))
            if expected != got, tolerateKnownBugs, concurrent, let bug = KnownBug.match(op, mnt: mnt, expected: expected, got: got) {
                result.tolerated[bug, default: 0] += 1
                result.abandoned = bug
                return result
            } else if expected != got {
                result.failure = DiffFailure(step: i, signature: "outcome of \(op.kind)",
                    detail: "\(op.description): plain \(DiffOp.describe(expected)), xtsfs \(DiffOp.describe(got))",
                    spuriousENOENT: got == ENOENT && DiffOp.isSuccess(expected))
                return result
            }
            if i % checkpointEvery == checkpointEvery - 1 || i == ops.count - 1 {
                guard let a = try? Snapshot.take(plain), let b = try? Snapshot.take(mnt) else {
                    result.failure = DiffFailure(step: i, signature: "trees", detail: "after \(op.description): cannot list the trees")
                    return result
                }
                if tolerateKnownBugs, concurrent, let bug = KnownBug.match(plain: a, mount: b) {
                    result.tolerated[bug, default: 0] += 1
                    result.abandoned = bug
                    return result
                }
                if let diff = Snapshot.difference(a, b, names: ("plain", "xtsfs")) {
                    result.failure = DiffFailure(step: i, signature: "trees", detail: "after \(op.description): \(diff)")
                    return result
                }
            }
        }
        return result
    }

    /// Generates and runs `steps` operations from `seed`; on a disagreement, minimises it
    /// (replays in fresh directories under the same roots) and returns the report.
    func exercise(seed: UInt64, steps: Int, plain: String, mnt: String) -> Exercise {
        let ops = DiffOp.generate(seed: seed, steps: steps)
        let r = replay(ops, plain: plain, mnt: mnt)
        var e = Exercise(executed: r.outcomes.count, succeeded: r.succeeded, tolerated: r.tolerated, abandoned: r.abandoned)
        guard let f = r.failure else { return e }
        let last = ops.prefix(f.step + 1).suffix(8).map(\.description).joined(separator: "\n")
        let report = Minimiser(run: self, plainParent: plain, mntParent: mnt).minimise(ops, failure: f)
        if concurrent, tolerateKnownBugs, f.spuriousENOENT, !report.reproduced {
            // The racing-unlink bug, by elimination: the name can heal (a new lookup after
            // the entry timeout gives the file a fresh node) before it can be seen broken.
            e.tolerated[.concurrentENOENT, default: 0] += 1
            e.abandoned = .concurrentENOENT
            return e
        }
        e.failure = "seed \(seed) step \(f.step): \(f.detail)\nlast steps:\n\(last)\n\(report.text)"
        return e
    }

    struct Exercise {
        var failure: String?
        var executed: Int
        var succeeded: Int
        var tolerated: [KnownBug: Int]
        var abandoned: KnownBug?
    }
}

/// xtsfs bugs already reported, each matched narrowly, so that a long run can go past them
/// to find others while they are being fixed: only with XTSFS_DIFF_TOLERATE_KNOWN=1 (the
/// soak's summary then counts them). Every run is strict otherwise. Both cases below were
/// fixed in bcd4f39 (the node leaves the identity map before the backing unlink).
enum KnownBug: String, Sendable, Hashable {
    /// A file created while another thread unlinks a file elsewhere could get the inode number
    /// the unlink just freed, and with it the dying file's node; the unlink, updating the
    /// node table after the backing unlink, then takes that node's names, and the new file
    /// answers ENOENT (open, chmod, xattrs, lstat once its cached attributes expire...)
    /// under a name its directory still lists, until a remount or a new lookup. Concurrent
    /// runs only: the run stops there, its directory set aside.
    case strippedNode = "ENOENT for a name its directory lists (a racing unlink took the node's names)"

    /// The same seen only by its effect: in a concurrent run, xtsfs said ENOENT where the
    /// plain directory succeeded, and the run up to there, replayed alone, agrees.
    case concurrentENOENT = "ENOENT under concurrency only, not reproduced alone (likely the racing unlink)"

    static func match(_ op: DiffOp, mnt: String, expected: DiffOp.Outcome, got: DiffOp.Outcome) -> KnownBug? {
        guard got == ENOENT, expected != ENOENT else { return nil }
        // Some directory on the way, or the name itself, is listed but unreachable.
        for path in op.paths {
            let parts = path.split(separator: "/").map(String.init)
            for n in parts.indices where unreachable(mnt, parts[0...n].joined(separator: "/")) { return .strippedNode }
        }
        return nil
    }

    /// Trees that differ only where the mount lists a name it cannot reach, and below it.
    static func match(plain a: [String: String], mount b: [String: String]) -> KnownBug? {
        let differing = Set(a.keys).union(b.keys).filter { a[$0] != b[$0] }
        let stripped = differing.filter { b[$0]?.hasPrefix(Snapshot.unreachable) == true }
        guard !stripped.isEmpty else { return nil }
        let explained = differing.allSatisfy { key in stripped.contains { key == $0 || key.hasPrefix($0 + "/") } }
        return explained ? .strippedNode : nil
    }

    /// Listed by its directory on the mount, yet lstat, llistxattr or open says ENOENT.
    /// (lstat can be answered from the kernel's attribute cache, and llistxattr through an
    /// open handle of the file; a new open needs the node's name.)
    static func unreachable(_ mnt: String, _ rel: String) -> Bool {
        let path = mnt + "/" + rel
        var st = stat()
        func opens() -> Bool {
            let fd = open(path, O_RDONLY | O_NONBLOCK | O_NOFOLLOW)
            if fd >= 0 { close(fd) }
            return fd >= 0 || errno != ENOENT
        }
        let lost = (lstat(path, &st) != 0 && errno == ENOENT) || (LibC.llistxattr(path, nil, 0) < 0 && errno == ENOENT) || !opens()
        guard lost else { return false }
        var parts = rel.split(separator: "/").map(String.init)
        guard let name = parts.popLast() else { return false }
        let listing = try? FileManager.default.contentsOfDirectory(atPath: ([mnt] + parts).joined(separator: "/"))
        return listing?.contains(name) == true
    }

    static func summary(_ counts: [KnownBug: Int]) -> String {
        counts.isEmpty ? "none" : counts.sorted { $0.key.rawValue < $1.key.rawValue }.map { "\($0.value) × \($0.key.rawValue)" }.joined(separator: ", ")
    }
}

/// Delta debugging over a failing sequence: drops chunks of operations, halving the chunk
/// when none can go, while the shorter sequence, replayed from an empty directory on each
/// side, still fails the same way. Ends 1-minimal (no single operation can be dropped)
/// unless it reaches the replay or time bound first.
struct Minimiser {
    let run: DiffRun
    /// Each replay gets a fresh empty directory under these, removed afterwards.
    let plainParent: String
    let mntParent: String
    var maxReplays = 400
    var timeLimit: TimeInterval = 300

    struct Report {
        var ops: [DiffOp]
        var outcomes: [(plain: DiffOp.Outcome, mount: DiffOp.Outcome)]
        var failure: DiffFailure
        var original: Int
        var replays: Int
        /// The failure did not come back when the sequence was replayed alone (a race
        /// between concurrent workers, say): `ops` is the unminimised failing prefix.
        var reproduced: Bool
        var bounded: Bool

        var text: String {
            guard reproduced else {
                return "not minimised: the first \(original) operations replayed alone in an empty directory do not fail"
            }
            var lines = ["minimal reproducer: \(ops.count) of \(original) operations after \(replays) replays"
                + (bounded ? " (stopped at the replay bound, may not be minimal)" : "")
                + ", run in an empty directory (long-x{200} is \"long-\" and 200 x):"]
            for (op, o) in zip(ops, outcomes) {
                let note = o.plain == o.mount ? DiffOp.describe(o.mount) : "plain \(DiffOp.describe(o.plain)), xtsfs \(DiffOp.describe(o.mount))"
                lines.append("  \(op.description);  // \(note)")
            }
            lines.append("fails: \(failure.detail)")
            return lines.joined(separator: "\n")
        }
    }

    func minimise(_ ops: [DiffOp], failure: DiffFailure) -> Report {
        let deadline = Date().addingTimeInterval(timeLimit)
        var replays = 0
        let tag = "\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        func attempt(_ candidate: [DiffOp]) -> DiffRun.Result? {
            replays += 1
            let dir = "/minimise-\(tag)-\(replays)"
            defer {
                try? FileManager.default.removeItem(atPath: plainParent + dir)
                try? FileManager.default.removeItem(atPath: mntParent + dir)
            }
            guard mkdir(plainParent + dir, 0o755) == 0, mkdir(mntParent + dir, 0o755) == 0 else { return nil }
            let r = run.replay(candidate, plain: plainParent + dir, mnt: mntParent + dir)
            guard let f = r.failure, f.signature == failure.signature else { return nil }
            return r
        }

        var current = Array(ops.prefix(failure.step + 1))
        let original = current.count
        guard var last = attempt(current) else {
            return Report(ops: current, outcomes: [], failure: failure, original: original, replays: replays, reproduced: false, bounded: false)
        }
        // Whatever follows the failing operation is never needed.
        func adopt(_ candidate: [DiffOp], _ r: DiffRun.Result) {
            current = Array(candidate.prefix(r.failure!.step + 1))
            last = r
        }
        adopt(current, last)
        var parts = 2
        var bounded = false
        search: while current.count > 1 {
            let chunk = (current.count + parts - 1) / parts
            var shrunk = false
            for start in stride(from: 0, to: current.count, by: chunk) {
                if replays >= maxReplays || Date() > deadline { bounded = true; break search }
                var candidate = current
                candidate.removeSubrange(start..<min(start + chunk, current.count))
                if let r = attempt(candidate) {
                    adopt(candidate, r)
                    parts = max(parts - 1, 2)
                    shrunk = true
                    break
                }
            }
            if !shrunk {
                if chunk == 1 { break }
                parts = min(parts * 2, current.count)
            }
        }
        return Report(ops: current, outcomes: last.outcomes, failure: last.failure!, original: original, replays: replays, reproduced: true, bounded: bounded)
    }
}

/// Every name under a root with what can be compared across the two sides: type, link
/// count, permission bits (not of symlinks), size and bytes (or target), extended
/// attributes, and which names are one file. Not st_blocks or times, which legitimately
/// differ.
enum Snapshot {
    /// The entry of a name listed by its directory that lstat cannot reach.
    static let unreachable = "unreachable: listed, but lstat says "

    /// `excluding`: relative paths left out with everything below them.
    static func take(_ root: String, excluding: Set<String> = []) throws -> [String: String] {
        var out: [String: String] = [:]
        var inodes: [String: UInt64] = [:]
        func walk(_ rel: String) throws {
            for name in try FileManager.default.contentsOfDirectory(atPath: root + "/" + rel) {
                let r = rel.isEmpty ? name : rel + "/" + name
                if excluding.contains(r) { continue }
                let full = root + "/" + r
                var st = stat()
                guard lstat(full, &st) == 0 else {
                    out[r] = unreachable + DiffOp.describe(errno)
                    continue
                }
                let attrs = xattrs(full)
                let mode = " mode 0" + String(st.st_mode & 0o7777, radix: 8)
                switch st.st_mode & S_IFMT {
                case S_IFDIR:
                    out[r] = "dir nlink \(st.st_nlink)\(mode)\(attrs)"
                    try walk(r)
                    continue
                case S_IFLNK:
                    let target = (try? FileManager.default.destinationOfSymbolicLink(atPath: full)) ?? "?"
                    out[r] = "symlink -> \(target) size \(st.st_size) nlink \(st.st_nlink)\(attrs)"
                default:
                    let bytes = [UInt8](try Data(contentsOf: URL(fileURLWithPath: full)))
                    let sizeNote = Int(st.st_size) == bytes.count ? "" : " (stat says \(st.st_size))"
                    out[r] = "file \(bytes.count)\(sizeNote):\(fnv(bytes)) nlink \(st.st_nlink)\(mode)\(attrs)"
                }
                if st.st_nlink > 1 { inodes[r] = UInt64(st.st_ino) }
            }
        }
        try walk("")
        // The names of one file each note the first of them, so the grouping is compared too.
        for (_, group) in Dictionary(grouping: inodes.keys, by: { inodes[$0]! }) {
            let first = group.min()!
            for name in group { out[name]! += " same file as \(first)" }
        }
        return out
    }

    /// nil when equal, else the first few differing entries of both sides.
    static func compare(plain: String, mount: String) -> String? {
        guard let a = try? take(plain), let b = try? take(mount) else { return "cannot list the trees" }
        return difference(a, b, names: ("plain", "xtsfs"))
    }

    static func difference(_ a: [String: String], _ b: [String: String], names: (String, String)) -> String? {
        if a == b { return nil }
        let keys = Set(a.keys).union(b.keys).filter { a[$0] != b[$0] }.sorted()
        return "trees differ at \(keys.count) names:\n"
            + keys.prefix(5).map { "  \($0):\n    \(names.0) \(a[$0] ?? "absent")\n    \(names.1) \(b[$0] ?? "absent")" }.joined(separator: "\n")
    }

    static func fnv(_ bytes: some Sequence<UInt8>) -> UInt64 {
        bytes.reduce(UInt64(1469598103934665603)) { ($0 ^ UInt64($1)) &* 1099511628211 }
    }

    /// " xattrs[name=length:hash ...]" sorted by name, "" when there are none.
    static func xattrs(_ path: String) -> String {
        var buf = [CChar](repeating: 0, count: 65536)
        let n = buf.withUnsafeMutableBufferPointer { LibC.llistxattr(path, $0.baseAddress, $0.count) }
        if n < 0 { return " xattrs:\(DiffOp.describe(errno))" }
        let names = DiffOp.splitNames(buf.prefix(n)).sorted()
        if names.isEmpty { return "" }
        let values = names.map { name -> String in
            var value = [UInt8](repeating: 0, count: 65536)
            let m = value.withUnsafeMutableBytes { LibC.lgetxattr(path, name, $0.baseAddress, $0.count) }
            return m < 0 ? "\(name)=\(DiffOp.describe(errno))" : "\(name)=\(m):\(fnv(value.prefix(m)))"
        }
        return " xattrs[" + values.joined(separator: " ") + "]"
    }
}
