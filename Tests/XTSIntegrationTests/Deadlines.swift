import Foundation
import XCTest
#if canImport(Glibc)
import Glibc
#endif

/// What one system call made through the mount came to: its result, its errno, or no
/// answer before the deadline. A hang is an outcome like any other, so a test that meets
/// one fails instead of stopping the suite.
enum Outcome: Equatable, CustomStringConvertible, Sendable {
    case ok(Int)
    case failed(Int32)
    case hung

    var description: String {
        switch self {
        case .ok(let n): return "success (\(n))"
        case .failed(let e): return "errno \(e) \(errnoName(e))"
        case .hung: return "no answer before the deadline (hang)"
        }
    }

    var errno: Int32? { if case .failed(let e) = self { return e }; return nil }
    var succeeded: Bool { if case .ok = self { return true }; return false }
}

func errnoName(_ e: Int32) -> String {
    let names: [Int32: String] = [EPERM: "EPERM", ENOENT: "ENOENT", EIO: "EIO", ENXIO: "ENXIO", EBADF: "EBADF",
                                  EACCES: "EACCES", EEXIST: "EEXIST", ENOTDIR: "ENOTDIR", EISDIR: "EISDIR",
                                  EINVAL: "EINVAL", EFBIG: "EFBIG", ENOSPC: "ENOSPC", ENAMETOOLONG: "ENAMETOOLONG",
                                  ENOSYS: "ENOSYS", ENOTEMPTY: "ENOTEMPTY", ELOOP: "ELOOP", ENODATA: "ENODATA",
                                  EOVERFLOW: "EOVERFLOW", EOPNOTSUPP: "EOPNOTSUPP", ESTALE: "ESTALE",
                                  ERANGE: "ERANGE", ENOTCONN: "ENOTCONN", EXDEV: "EXDEV", EROFS: "EROFS", E2BIG: "E2BIG"]
    return names[e] ?? String(cString: strerror(e))
}

/// How long a call through the mount may take before it counts as hung. A test that
/// expects waits it can explain (a FIFO's open) lowers it and puts it back.
nonisolated(unsafe) var callDeadline: Double = 10

/// Filled by the worker thread; read after `done` is signalled.
private final class DeadlineBox<T: Sendable>: @unchecked Sendable {
    var value: T?
    let done = DispatchSemaphore(value: 0)
}

/// Runs `body` on a thread of its own and waits at most `seconds`. On a timeout the thread
/// is abandoned: it is stuck in a FUSE request, which ends with an error when the
/// teardown unmounts and, at the latest, kills the daemon.
func withDeadline<T: Sendable>(_ seconds: Double = callDeadline, _ body: @escaping @Sendable () -> T) -> T? {
    let box = DeadlineBox<T>()
    let t = Thread {
        box.value = body()
        box.done.signal()
    }
    t.start()
    guard box.done.wait(timeout: .now() + seconds) == .success else { return nil }
    return box.value
}

/// One system call under a deadline; `body` returns the call's result (negative = failed).
func sys(_ seconds: Double = callDeadline, _ body: @escaping @Sendable () -> Int) -> Outcome {
    withDeadline(seconds) { () -> Outcome in
        Glibc.errno = 0
        let r = body()
        return r < 0 ? .failed(Glibc.errno) : .ok(r)
    } ?? .hung
}

func sys32(_ seconds: Double = callDeadline, _ body: @escaping @Sendable () -> Int32) -> Outcome {
    sys(seconds) { Int(body()) }
}

/// Reads a whole file (at most `limit` bytes) under a deadline.
func readWithDeadline(_ path: String, limit: Int = 1 << 20, seconds: Double = callDeadline) -> (Outcome, [UInt8]) {
    withDeadline(seconds) { () -> (Outcome, [UInt8]) in
        let fd = open(path, O_RDONLY)
        if fd < 0 { return (.failed(Glibc.errno), []) }
        defer { close(fd) }
        var out = [UInt8]()
        var buf = [UInt8](repeating: 0, count: 65536)
        while out.count < limit {
            let n = Glibc.read(fd, &buf, min(buf.count, limit - out.count))
            if n < 0 { return (.failed(Glibc.errno), out) }
            if n == 0 { break }
            out += buf.prefix(n)
        }
        return (.ok(out.count), out)
    } ?? (.hung, [])
}

/// Lists a directory (names, with their d_ino) under a deadline; "." and ".." left out.
func listWithDeadline(_ path: String, seconds: Double = callDeadline) -> (Outcome, [(name: String, ino: UInt64)]) {
    withDeadline(seconds) { () -> (Outcome, [String], [UInt64]) in
        guard let d = opendir(path) else { return (.failed(Glibc.errno), [], []) }
        defer { closedir(d) }
        var names = [String](), inos = [UInt64]()
        while true {
            Glibc.errno = 0
            guard let e = readdir(d) else {
                if Glibc.errno != 0 { return (.failed(Glibc.errno), names, inos) }
                break
            }
            let name = withUnsafePointer(to: e.pointee.d_name) {
                $0.withMemoryRebound(to: CChar.self, capacity: 256) { String(cString: $0) }
            }
            if name == "." || name == ".." { continue }
            names.append(name)
            inos.append(UInt64(e.pointee.d_ino))
        }
        return (.ok(names.count), names, inos)
    }.map { ($0.0, Array(zip($0.1, $0.2)).map { (name: $0.0, ino: $0.1) }) } ?? (.hung, [])
}

/// An external command killed (with its whole process group) after `seconds`.
/// Exit status 137 means it was killed: it hung. The output goes through a file, not a
/// pipe: a process killed inside a FUSE request stays until the daemon answers, and would
/// hold a pipe open.
@discardableResult
func runWithTimeout(_ args: [String], seconds: Int = 10) -> (status: Int32, output: String) {
    let outPath = NSTemporaryDirectory() + "/xtsfs-run-\(getpid())-\(UInt64.random(in: 0...UInt64.max)).out"
    _ = FileManager.default.createFile(atPath: outPath, contents: nil)
    defer { try? FileManager.default.removeItem(atPath: outPath) }
    guard let out = FileHandle(forWritingAtPath: outPath) else { return (-1, "cannot create \(outPath)") }
    let p = Process()
    p.executableURL = URL(fileURLWithPath: "/usr/bin/timeout")
    p.arguments = ["-s", "KILL", String(seconds)] + args
    p.standardOutput = out
    p.standardError = out
    p.standardInput = FileHandle.nullDevice
    do { try p.run() } catch { return (-1, "cannot run \(args): \(error)") }
    try? out.close()
    let deadline = Date().addingTimeInterval(Double(seconds) + 5)
    while p.isRunning && Date() < deadline { usleep(10_000) }
    if p.isRunning { kill(p.processIdentifier, SIGKILL); return (137, "timeout itself did not return") }
    p.waitUntilExit()
    let text = (try? String(contentsOfFile: outPath, encoding: .utf8)) ?? ""
    // timeout signals the whole process group, itself included: killed by a signal = hung.
    if p.terminationReason == .uncaughtSignal { return (137, text + "[killed by signal \(p.terminationStatus)]") }
    return (p.terminationStatus, text)
}

/// `renameat2(2)`, found at run time so that no C shim is needed.
enum RenameAt2 {
    typealias Fn = @convention(c) (Int32, UnsafePointer<CChar>?, Int32, UnsafePointer<CChar>?, UInt32) -> Int32
    static let noReplace: UInt32 = 1
    static let exchange: UInt32 = 2
    static let fn: Fn? = {
        guard let h = dlopen(nil, RTLD_NOW), let sym = dlsym(h, "renameat2") else { return nil }
        return unsafeBitCast(sym, to: Fn.self)
    }()

    static func call(_ from: String, _ to: String, flags: UInt32) -> Int32 {
        guard let fn else { Glibc.errno = ENOSYS; return -1 }
        return fn(AT_FDCWD, from, AT_FDCWD, to, flags)
    }
}

/// The xattr calls of <sys/xattr.h>, which the Glibc module does not import; found at run time.
private func libcSymbol<F>(_ name: String, as: F.Type) -> F {
    guard let h = dlopen(nil, RTLD_NOW), let sym = dlsym(h, name) else { fatalError("libc has no \(name)") }
    return unsafeBitCast(sym, to: F.self)
}

private typealias SetXattrFn = @convention(c) (UnsafePointer<CChar>?, UnsafePointer<CChar>?, UnsafeRawPointer?, Int, Int32) -> Int32
private typealias GetXattrFn = @convention(c) (UnsafePointer<CChar>?, UnsafePointer<CChar>?, UnsafeMutableRawPointer?, Int) -> Int
private typealias ListXattrFn = @convention(c) (UnsafePointer<CChar>?, UnsafeMutablePointer<CChar>?, Int) -> Int
private typealias RemoveXattrFn = @convention(c) (UnsafePointer<CChar>?, UnsafePointer<CChar>?) -> Int32

private typealias FallocateFn = @convention(c) (Int32, Int32, Int, Int) -> Int32
private let fallocateSymbol = libcSymbol("fallocate", as: FallocateFn.self)
/// fallocate(2), also missing from the Glibc module.
func fallocate(_ fd: Int32, _ mode: Int32, _ offset: off_t, _ length: off_t) -> Int32 { fallocateSymbol(fd, mode, Int(offset), Int(length)) }

private enum XattrSymbols {
    static let set = libcSymbol("setxattr", as: SetXattrFn.self)
    static let lset = libcSymbol("lsetxattr", as: SetXattrFn.self)
    static let get = libcSymbol("getxattr", as: GetXattrFn.self)
    static let lget = libcSymbol("lgetxattr", as: GetXattrFn.self)
    static let list = libcSymbol("listxattr", as: ListXattrFn.self)
    static let llist = libcSymbol("llistxattr", as: ListXattrFn.self)
    static let remove = libcSymbol("removexattr", as: RemoveXattrFn.self)
}

let XATTR_CREATE: Int32 = 1
let XATTR_REPLACE: Int32 = 2
/// O_NOATIME and makedev(1, 3) of x86_64/aarch64 Linux, which Glibc does not export.
let O_NOATIME_FLAG: Int32 = 0o1000000
let devNullNumbers: dev_t = 0x103

func setxattr(_ path: String, _ name: String, _ value: UnsafeRawPointer?, _ size: Int, _ flags: Int32) -> Int32 { XattrSymbols.set(path, name, value, size, flags) }
func lsetxattr(_ path: String, _ name: String, _ value: UnsafeRawPointer?, _ size: Int, _ flags: Int32) -> Int32 { XattrSymbols.lset(path, name, value, size, flags) }
func getxattr(_ path: String, _ name: String, _ value: UnsafeMutableRawPointer?, _ size: Int) -> Int { XattrSymbols.get(path, name, value, size) }
func lgetxattr(_ path: String, _ name: String, _ value: UnsafeMutableRawPointer?, _ size: Int) -> Int { XattrSymbols.lget(path, name, value, size) }
func listxattr(_ path: String, _ list: UnsafeMutablePointer<CChar>?, _ size: Int) -> Int { XattrSymbols.list(path, list, size) }
func llistxattr(_ path: String, _ list: UnsafeMutablePointer<CChar>?, _ size: Int) -> Int { XattrSymbols.llist(path, list, size) }
func removexattr(_ path: String, _ name: String) -> Int32 { XattrSymbols.remove(path, name) }

/// Convenience over the raw calls: a value set from bytes, read into bytes, names listed.
enum Xattr {
    static func set(_ path: String, _ name: String, _ value: [UInt8], flags: Int32 = 0) -> Int32 {
        value.isEmpty ? setxattr(path, name, "", 0, flags) : value.withUnsafeBytes { setxattr(path, name, $0.baseAddress, $0.count, flags) }
    }
    /// The value, or the errno.
    static func get(_ path: String, _ name: String, follow: Bool = true) -> Result<[UInt8], Errno> {
        var buf = [UInt8](repeating: 0, count: 65536)
        let n = follow ? getxattr(path, name, &buf, buf.count) : lgetxattr(path, name, &buf, buf.count)
        return n < 0 ? .failure(Errno(Glibc.errno)) : .success(Array(buf.prefix(n)))
    }
    static func list(_ path: String, follow: Bool = true) -> Result<[String], Errno> {
        var buf = [CChar](repeating: 0, count: 65536)
        let n = follow ? listxattr(path, &buf, buf.count) : llistxattr(path, &buf, buf.count)
        if n < 0 { return .failure(Errno(Glibc.errno)) }
        return .success(buf.prefix(n).split(separator: 0).map { String(decoding: $0.map { UInt8(bitPattern: $0) }, as: UTF8.self) })
    }
}

/// An errno as an Error, for Result.
struct Errno: Error, Equatable, CustomStringConvertible {
    var code: Int32
    init(_ code: Int32) { self.code = code }
    var description: String { "errno \(code) \(errnoName(code))" }
}
