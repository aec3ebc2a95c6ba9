import CSysShim
import Foundation
#if canImport(Glibc)
import Glibc
#endif

/// One operation of the differential tester with every argument fixed, so it replays the
/// same on any root: the random generator only picks operations, it never sees outcomes.
/// Paths are relative and symlink targets never leave the directory they are run under.
enum DiffOp: Sendable, Equatable {
    case write(String, offset: Int, length: Int, seed: UInt64, truncate: Bool)
    case truncate(String, size: Int)
    case rename(String, String)
    case exchange(String, String)
    case renameNoReplace(String, String)
    case chmod(String, mode: Int)
    case unlink(String)
    case mkdir(String)
    case rmdir(String)
    case read(String, offset: Int, length: Int)
    case link(String, String)
    case symlink(target: String, String)
    case setxattr(String, name: String, length: Int, seed: UInt64, flags: Int32)
    case getxattr(String, name: String, size: Int)
    case listxattr(String, size: Int)
    case removexattr(String, name: String)
    case fallocate(String, mode: Int32, offset: Int, length: Int)
    // Descriptors held across operations, in a few numbered slots of each side: writes
    // through one name read through another, files used after rename or unlink.
    case openFd(slot: Int, String, flags: Int32)
    case fdWrite(slot: Int, offset: Int, length: Int, seed: UInt64)
    case fdRead(slot: Int, offset: Int, length: Int)
    case fdTruncate(slot: Int, size: Int)
    case fdFallocate(slot: Int, mode: Int32, offset: Int, length: Int)
    case fdStat(slot: Int)
    case fdSetxattr(slot: Int, name: String, length: Int, seed: UInt64)
    case fdGetxattr(slot: Int, name: String)
    case closeFd(slot: Int)

    /// 0, an errno, or for an operation that returns data a digest of it with bit 30 set
    /// (errnos stay far below), so a wrong byte shows as a different outcome.
    typealias Outcome = Int32

    static func digest(_ bytes: some Sequence<UInt8>, count: Int) -> Outcome {
        Int32(truncatingIfNeeded: bytes.reduce(UInt32(truncatingIfNeeded: count)) { $0 &* 31 &+ UInt32($1) } & 0x3fff_ffff) | 0x4000_0000
    }

    static func isSuccess(_ o: Outcome) -> Bool { o == 0 || o & 0x4000_0000 != 0 }

    /// The paths an operation names (not a symlink's target).
    var paths: [String] {
        switch self {
        case let .write(p, _, _, _, _), let .truncate(p, _), let .unlink(p), let .mkdir(p), let .rmdir(p), let .read(p, _, _),
             let .symlink(_, p), let .setxattr(p, _, _, _, _), let .getxattr(p, _, _), let .listxattr(p, _), let .removexattr(p, _),
             let .fallocate(p, _, _, _), let .openFd(_, p, _), let .chmod(p, _):
            return [p]
        case let .rename(p, q), let .exchange(p, q), let .renameNoReplace(p, q), let .link(p, q):
            return [p, q]
        case .fdWrite, .fdRead, .fdTruncate, .fdFallocate, .fdStat, .fdSetxattr, .fdGetxattr, .closeFd:
            return []
        }
    }

    /// The slot of an operation on a held descriptor.
    var slot: Int? {
        switch self {
        case let .openFd(slot, _, _), let .fdWrite(slot, _, _, _), let .fdRead(slot, _, _), let .fdTruncate(slot, _),
             let .fdFallocate(slot, _, _, _), let .fdStat(slot), let .fdSetxattr(slot, _, _, _), let .fdGetxattr(slot, _),
             let .closeFd(slot):
            return slot
        default:
            return nil
        }
    }

    /// The operation's family, as in "outcome of link".
    var kind: String { String(describing: self).prefix { $0 != "(" }.description }

    func apply(on side: DiffSide) -> Outcome {
        func at(_ p: String) -> String { side.root + "/" + p }
        func check(_ r: Int32) -> Outcome { r == 0 ? 0 : errno }
        /// The slot's descriptor, or EBADF as an unopened descriptor would give.
        func withFd(_ slot: Int, _ body: (Int32) -> Outcome) -> Outcome {
            guard let fd = side.fds[slot] else { return EBADF }
            return body(fd)
        }
        switch self {
        case let .write(p, offset, length, seed, trunc):
            let data = pattern(length, seed: seed)
            let fd = Glibc.open(at(p), O_WRONLY | O_CREAT | (trunc ? O_TRUNC : 0), 0o644)
            if fd < 0 { return errno }
            defer { Glibc.close(fd) }
            return data.withUnsafeBytes { pwrite(fd, $0.baseAddress, $0.count, off_t(offset)) } == length ? 0 : errno
        case let .truncate(p, size):
            return check(Glibc.truncate(at(p), off_t(size)))
        case let .rename(p, q):
            return check(Glibc.rename(at(p), at(q)))
        case let .exchange(p, q):
            return check(xts_renameat2(at(p), at(q), UInt32(XTS_RENAME_EXCHANGE)))
        case let .renameNoReplace(p, q):
            return check(xts_renameat2(at(p), at(q), UInt32(XTS_RENAME_NOREPLACE)))
        case let .chmod(p, mode):
            return check(Glibc.chmod(at(p), mode_t(mode)))
        case let .unlink(p):
            return check(Glibc.unlink(at(p)))
        case let .mkdir(p):
            return check(Glibc.mkdir(at(p), 0o755))
        case let .rmdir(p):
            return check(Glibc.rmdir(at(p)))
        case let .read(p, offset, length):
            let fd = Glibc.open(at(p), O_RDONLY)
            if fd < 0 { return errno }
            defer { Glibc.close(fd) }
            var buf = [UInt8](repeating: 0, count: length)
            let n = pread(fd, &buf, length, off_t(offset))
            return n < 0 ? errno : Self.digest(buf.prefix(n), count: n)
        case let .link(p, q):
            return check(Glibc.link(at(p), at(q)))
        case let .symlink(target, p):
            return check(Glibc.symlink(target, at(p)))
        case let .setxattr(p, name, length, seed, flags):
            let value = pattern(length, seed: seed)
            return check(value.withUnsafeBytes { LibC.lsetxattr(at(p), name, $0.baseAddress, length, flags) })
        case let .getxattr(p, name, size):
            var buf = [UInt8](repeating: 0, count: max(size, 1))
            let n = buf.withUnsafeMutableBytes { LibC.lgetxattr(at(p), name, size == 0 ? nil : $0.baseAddress, size) }
            if n < 0 { return errno }
            return Self.digest(size == 0 ? [] : buf.prefix(n), count: n)
        case let .listxattr(p, size):
            var buf = [CChar](repeating: 0, count: max(size, 1))
            let n = buf.withUnsafeMutableBufferPointer { LibC.llistxattr(at(p), size == 0 ? nil : $0.baseAddress, size) }
            if n < 0 { return errno }
            // The order of names is the filesystem's own: compare them sorted.
            let names = size == 0 ? [] : Self.splitNames(buf.prefix(n)).sorted()
            return Self.digest(names.joined(separator: "\n").utf8, count: n)
        case let .removexattr(p, name):
            return check(LibC.lremovexattr(at(p), name))
        case let .fallocate(p, mode, offset, length):
            let fd = Glibc.open(at(p), O_WRONLY)
            if fd < 0 { return errno }
            defer { Glibc.close(fd) }
            return check(xts_fallocate(fd, mode, Int64(offset), Int64(length)))
        case let .openFd(slot, p, flags):
            if let old = side.fds.removeValue(forKey: slot) { Glibc.close(old) }
            let fd = Glibc.open(at(p), flags, 0o644)
            if fd < 0 { return errno }
            side.fds[slot] = fd
            return 0
        case let .fdWrite(slot, offset, length, seed):
            let data = pattern(length, seed: seed)
            return withFd(slot) { fd in data.withUnsafeBytes { pwrite(fd, $0.baseAddress, $0.count, off_t(offset)) } == length ? 0 : errno }
        case let .fdRead(slot, offset, length):
            return withFd(slot) { fd in
                var buf = [UInt8](repeating: 0, count: length)
                let n = pread(fd, &buf, length, off_t(offset))
                return n < 0 ? errno : Self.digest(buf.prefix(n), count: n)
            }
        case let .fdTruncate(slot, size):
            return withFd(slot) { fd in check(ftruncate(fd, off_t(size))) }
        case let .fdFallocate(slot, mode, offset, length):
            return withFd(slot) { fd in check(xts_fallocate(fd, mode, Int64(offset), Int64(length))) }
        case let .fdStat(slot):
            // Size and link count (0 once every name is gone) of what the descriptor holds;
            // the outcome is a digest of both.
            return withFd(slot) { fd in
                var st = stat()
                if fstat(fd, &st) != 0 { return errno }
                return Self.digest("\(st.st_size) \(st.st_nlink)".utf8, count: Int(st.st_size))
            }
        case let .fdSetxattr(slot, name, length, seed):
            let value = pattern(length, seed: seed)
            return withFd(slot) { fd in check(value.withUnsafeBytes { LibC.fsetxattr(fd, name, $0.baseAddress, length, 0) }) }
        case let .fdGetxattr(slot, name):
            return withFd(slot) { fd in
                var buf = [UInt8](repeating: 0, count: 4096)
                let n = buf.withUnsafeMutableBytes { LibC.fgetxattr(fd, name, $0.baseAddress, $0.count) }
                return n < 0 ? errno : Self.digest(buf.prefix(n), count: n)
            }
        case let .closeFd(slot):
            guard let fd = side.fds.removeValue(forKey: slot) else { return EBADF }
            return check(Glibc.close(fd))
        }
    }

    static func splitNames(_ raw: some Collection<CChar>) -> [String] {
        raw.split(separator: 0).map { String(decoding: $0.map { UInt8(bitPattern: $0) }, as: UTF8.self) }
    }

    /// One line of C, with the arguments, that does the same.
    var description: String {
        func q(_ p: String) -> String {
            "\"" + p.replacingOccurrences(of: DiffOp.longName, with: "long-x{200}") + "\""
        }
        switch self {
        case let .write(p, offset, length, seed, trunc):
            return "pwrite(open(\(q(p)), O_WRONLY|O_CREAT\(trunc ? "|O_TRUNC" : "")), pattern(\(length), seed: \(seed)), \(length), \(offset))"
        case let .truncate(p, size): return "truncate(\(q(p)), \(size))"
        case let .rename(p, r): return "rename(\(q(p)), \(q(r)))"
        case let .exchange(p, r): return "renameat2(AT_FDCWD, \(q(p)), AT_FDCWD, \(q(r)), RENAME_EXCHANGE)"
        case let .renameNoReplace(p, r): return "renameat2(AT_FDCWD, \(q(p)), AT_FDCWD, \(q(r)), RENAME_NOREPLACE)"
        case let .chmod(p, mode): return "chmod(\(q(p)), 0\(String(mode, radix: 8)))"
        case let .unlink(p): return "unlink(\(q(p)))"
        case let .mkdir(p): return "mkdir(\(q(p)), 0755)"
        case let .rmdir(p): return "rmdir(\(q(p)))"
        case let .read(p, offset, length): return "pread(open(\(q(p)), O_RDONLY), buf, \(length), \(offset))"
        case let .link(p, r): return "link(\(q(p)), \(q(r)))"
        case let .symlink(target, p): return "symlink(\(q(target)), \(q(p)))"
        case let .setxattr(p, name, length, seed, flags):
            let f = flags == 1 ? "XATTR_CREATE" : flags == 2 ? "XATTR_REPLACE" : "\(flags)"
            return "lsetxattr(\(q(p)), \"\(name)\", pattern(\(length), seed: \(seed)), \(length), \(f))"
        case let .getxattr(p, name, size): return "lgetxattr(\(q(p)), \"\(name)\", buf, \(size))"
        case let .listxattr(p, size): return "llistxattr(\(q(p)), buf, \(size))"
        case let .removexattr(p, name): return "lremovexattr(\(q(p)), \"\(name)\")"
        case let .fallocate(p, mode, offset, length):
            return "fallocate(open(\(q(p)), O_WRONLY), \(Self.modeName(mode)), \(offset), \(length))"
        case let .openFd(slot, p, flags): return "fd\(slot) = open(\(q(p)), \(Self.openFlagsName(flags)), 0644)"
        case let .fdWrite(slot, offset, length, seed): return "pwrite(fd\(slot), pattern(\(length), seed: \(seed)), \(length), \(offset))"
        case let .fdRead(slot, offset, length): return "pread(fd\(slot), buf, \(length), \(offset))"
        case let .fdTruncate(slot, size): return "ftruncate(fd\(slot), \(size))"
        case let .fdFallocate(slot, mode, offset, length): return "fallocate(fd\(slot), \(Self.modeName(mode)), \(offset), \(length))"
        case let .fdStat(slot): return "fstat(fd\(slot), &st)"
        case let .fdSetxattr(slot, name, length, seed): return "fsetxattr(fd\(slot), \"\(name)\", pattern(\(length), seed: \(seed)), \(length), 0)"
        case let .fdGetxattr(slot, name): return "fgetxattr(fd\(slot), \"\(name)\", buf, 4096)"
        case let .closeFd(slot): return "close(fd\(slot))"
        }
    }

    static func modeName(_ mode: Int32) -> String {
        if mode == 0 { return "0" }
        let names: [(Int32, String)] = [(XTS_FALLOC_KEEP_SIZE, "KEEP_SIZE"), (XTS_FALLOC_PUNCH_HOLE, "PUNCH_HOLE"), (XTS_FALLOC_ZERO_RANGE, "ZERO_RANGE")]
        let other = mode & ~names.reduce(0) { $0 | $1.0 }
        return (names.filter { mode & $0.0 != 0 }.map { "FALLOC_FL_" + $0.1 } + (other != 0 ? ["0x" + String(other, radix: 16)] : [])).joined(separator: "|")
    }

    static func openFlagsName(_ flags: Int32) -> String {
        let access = [O_RDONLY: "O_RDONLY", O_WRONLY: "O_WRONLY", O_RDWR: "O_RDWR"][flags & O_ACCMODE] ?? "?"
        let rest: [(Int32, String)] = [(O_CREAT, "O_CREAT"), (O_TRUNC, "O_TRUNC"), (O_APPEND, "O_APPEND")]
        return ([access] + rest.filter { flags & $0.0 != 0 }.map(\.1)).joined(separator: "|")
    }

    static func describe(_ o: Outcome) -> String {
        if o == 0 { return "0" }
        if o & 0x4000_0000 != 0 { return "data#\(String(o & 0x3fff_ffff, radix: 16))" }
        let names: [Int32: String] = [
            EPERM: "EPERM", ENOENT: "ENOENT", EIO: "EIO", EBADF: "EBADF", EACCES: "EACCES", EBUSY: "EBUSY",
            EEXIST: "EEXIST", EXDEV: "EXDEV", ENOTDIR: "ENOTDIR", EISDIR: "EISDIR", EINVAL: "EINVAL",
            EFBIG: "EFBIG", ENOSPC: "ENOSPC", EMLINK: "EMLINK", ERANGE: "ERANGE", ENAMETOOLONG: "ENAMETOOLONG",
            ENOTEMPTY: "ENOTEMPTY", ELOOP: "ELOOP", ENODATA: "ENODATA", EOPNOTSUPP: "EOPNOTSUPP", E2BIG: "E2BIG",
        ]
        return names[o] ?? "errno \(o)"
    }

    // MARK: The random mix

    static let longName = "long-" + String(repeating: "x", count: 200)
    /// Last components, weighted: files more often than the two directory names (a file
    /// called d1 makes every d1/... ENOTDIR, so writes never create one). "e" to "h" are
    /// favoured as the new name of a link or rename, where a taken name only gives EEXIST.
    static let leaves = ["a", "a", "b", "b", "c", "c", longName, "d1", "d2", "e", "f", "g", "h"]
    static let freshLeaves = ["e", "f", "g", "h"]
    static let fileLeaves = leaves.filter { !["d1", "d2"].contains($0) }
    /// Relative and never "..": a target stays inside the directory the operations run under.
    static let targets = ["a", "b", "d1", "d2/a", "missing", longName]
    /// Few enough that their values (up to 1000 bytes) fit in one ext4 block with our
    /// per-value overhead: plain and backing must not run out of attribute space apart.
    static let xattrNames = ["user.a", "user.b", "user." + String(repeating: "n", count: 35)]

    struct Rng {
        var s: UInt64
        init(seed: UInt64) { s = seed &* 0x9E3779B97F4A7C15 | 1 }
        mutating func next() -> UInt64 { s ^= s << 13; s ^= s >> 7; s ^= s << 17; return s }
        mutating func below(_ n: Int) -> Int { Int(next() % UInt64(n)) }
        mutating func pick<T>(_ a: [T]) -> T { a[below(a.count)] }
    }

    /// `steps` operations from `seed`. Paths come from a small set so operations collide:
    /// overwrite, rename over, rmdir non-empty, link to an existing name.
    static func generate(seed: UInt64, steps: Int) -> [DiffOp] {
        var rng = Rng(seed: seed)
        /// The last component comes from `favoured`, if given, `odds` times in 4; a file
        /// about to be created is never called d1 or d2.
        func randomPath(favoured: [String]? = nil, odds: Int = 2, creatingFile: Bool = false) -> String {
            let depth = rng.pick([0, 0, 0, 1, 1, 2])
            var parts: [String] = []
            for _ in 0..<depth { parts.append(rng.pick(["d1", "d2"])) }
            if let favoured, rng.below(4) < odds { parts.append(rng.pick(favoured)) }
            else { parts.append(rng.pick(creatingFile ? fileLeaves : leaves)) }
            return parts.joined(separator: "/")
        }
        let lengths = [1, 7, 15, 16, 17, 100, 4095, 4096, 4097, 8192, 12000]
        let slots = 2
        return (0..<steps).map { _ in
            let op = rng.below(125)
            let p = randomPath(creatingFile: op < 28 || (73..<76).contains(op) || (100..<106).contains(op))
            switch op {
            case 0..<28:
                let off = rng.below(3) == 0 ? rng.below(20000) : rng.below(9000)
                return .write(p, offset: off, length: rng.pick(lengths), seed: rng.next(), truncate: rng.below(4) == 0)
            case 28..<35:
                return .truncate(p, size: rng.pick([0, 1, 15, 16, 17, 4095, 4096, 4097, 5000, 10000, 30000]))
            case 35..<43: return .rename(p, randomPath(favoured: freshLeaves))
            case 43..<47: return .exchange(p, randomPath())
            // A file called d1 or d2 blocks every path through it: unlink sometimes aims there.
            case 47..<54: return .unlink(rng.below(2) == 0 ? p : randomPath(favoured: ["d1", "d2"]))
            case 54..<60: return .mkdir(randomPath(favoured: ["d1", "d2"], odds: 3))
            case 60..<63: return .rmdir(p)
            case 63..<73: return .link(p, randomPath(favoured: freshLeaves))
            case 73..<76: return .symlink(target: rng.pick(targets), p)
            case 76..<83:
                let length = rng.pick([0, 0, 1, 15, 16, 17, 100, 500, 999, 1000])
                return .setxattr(p, name: rng.pick(xattrNames), length: length, seed: rng.next(), flags: rng.pick([0, 0, 1, 2]))
            case 83..<86: return .getxattr(p, name: rng.pick(xattrNames), size: rng.pick([0, 10, 4096, 4096]))
            case 86..<88: return .listxattr(p, size: rng.pick([0, 5, 4096, 4096]))
            case 88..<90: return .removexattr(p, name: rng.pick(xattrNames))
            case 90..<96:
                // PUNCH_HOLE without KEEP_SIZE is refused by the kernel before any filesystem.
                let mode = rng.pick([0, 1, 3, 3, 0x10, 0x11, 2])
                let off = rng.below(3) == 0 ? rng.below(40000) : rng.below(12000)
                let length = rng.below(8) == 0 ? 0 : rng.pick([1, 15, 16, 17, 4095, 4096, 4097, 8192, 1 + rng.below(20000)])
                return .fallocate(p, mode: Int32(mode), offset: off, length: length)
            case 96..<100:
                return .read(p, offset: rng.below(12000), length: rng.below(6000) + 1)
            case 100..<106:
                let flags = rng.pick([O_RDWR | O_CREAT, O_RDWR | O_CREAT, O_RDWR | O_CREAT, O_RDWR, O_RDONLY, O_WRONLY | O_APPEND])
                return .openFd(slot: rng.below(slots), p, flags: flags)
            case 106..<111:
                let off = rng.below(3) == 0 ? rng.below(20000) : rng.below(9000)
                return .fdWrite(slot: rng.below(slots), offset: off, length: rng.pick(lengths), seed: rng.next())
            case 111..<114: return .fdRead(slot: rng.below(slots), offset: rng.below(12000), length: rng.below(6000) + 1)
            case 114: return .fdTruncate(slot: rng.below(slots), size: rng.pick([0, 17, 4095, 4097, 10000]))
            case 115:
                let mode = rng.pick([0, 1, 3, 0x10, 0x11])
                return .fdFallocate(slot: rng.below(slots), mode: Int32(mode), offset: rng.below(12000), length: 1 + rng.below(10000))
            case 116: return .fdStat(slot: rng.below(slots))
            case 117:
                let length = rng.pick([0, 1, 17, 500, 1000])
                return .fdSetxattr(slot: rng.below(slots), name: rng.pick(xattrNames), length: length, seed: rng.next())
            case 118: return .fdGetxattr(slot: rng.below(slots), name: rng.pick(xattrNames))
            case 119: return .closeFd(slot: rng.below(slots))
            case 120..<123: return .chmod(p, mode: rng.pick([0o644, 0o600, 0o755, 0o4755, 0o2711, 0o1777, 0]))
            default: return .renameNoReplace(p, randomPath(favoured: freshLeaves))
            }
        }
    }
}

/// One side of a run: its root, and the descriptors its `openFd` operations hold. Used by
/// one thread; the descriptors are closed when the run ends.
final class DiffSide {
    let root: String
    var fds: [Int: Int32] = [:]
    init(root: String) { self.root = root }
    func closeAll() {
        for fd in fds.values { Glibc.close(fd) }
        fds = [:]
    }
    deinit { closeAll() }
}

/// The l*xattr and f*xattr calls, which Glibc's Swift overlay does not import (and the
/// shim declares only the path-following ones): looked up once, called with their exact
/// C types.
enum LibC {
    private static func symbol<T>(_ name: String, as: T.Type) -> T {
        guard let p = dlsym(nil, name) else { fatalError("no \(name) in libc") }  // nil: RTLD_DEFAULT
        return unsafeBitCast(p, to: T.self)
    }
    typealias SetFn = @convention(c) (UnsafePointer<CChar>, UnsafePointer<CChar>, UnsafeRawPointer?, Int, Int32) -> Int32
    typealias GetFn = @convention(c) (UnsafePointer<CChar>, UnsafePointer<CChar>, UnsafeMutableRawPointer?, Int) -> Int
    typealias ListFn = @convention(c) (UnsafePointer<CChar>, UnsafeMutablePointer<CChar>?, Int) -> Int
    typealias RemoveFn = @convention(c) (UnsafePointer<CChar>, UnsafePointer<CChar>) -> Int32
    // Written once, at first use, and only called after: safe from any thread.
    nonisolated(unsafe) static let lsetxattr = symbol("lsetxattr", as: SetFn.self)
    nonisolated(unsafe) static let lgetxattr = symbol("lgetxattr", as: GetFn.self)
    nonisolated(unsafe) static let llistxattr = symbol("llistxattr", as: ListFn.self)
    nonisolated(unsafe) static let lremovexattr = symbol("lremovexattr", as: RemoveFn.self)
    typealias FSetFn = @convention(c) (Int32, UnsafePointer<CChar>, UnsafeRawPointer?, Int, Int32) -> Int32
    typealias FGetFn = @convention(c) (Int32, UnsafePointer<CChar>, UnsafeMutableRawPointer?, Int) -> Int
    nonisolated(unsafe) static let fsetxattr = symbol("fsetxattr", as: FSetFn.self)
    nonisolated(unsafe) static let fgetxattr = symbol("fgetxattr", as: FGetFn.self)
}
