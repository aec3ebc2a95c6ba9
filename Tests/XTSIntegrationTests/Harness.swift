import Foundation
import XCTest
#if canImport(Glibc)
import Glibc
#endif

/// Runs the real `xtsfs` binary and real mounts. Every mount made here is unmounted in
/// teardown, even when the test failed, and the daemon is waited for.
enum Harness {
    /// The built executable: beside the test bundle in .build/<config>/.
    static let binary: String = {
        if let env = ProcessInfo.processInfo.environment["XTSFS_BIN"] { return env }
        var dir = URL(fileURLWithPath: CommandLine.arguments[0]).deletingLastPathComponent()
        for _ in 0..<4 {
            let candidate = dir.appendingPathComponent("xtsfs").path
            if FileManager.default.isExecutableFile(atPath: candidate) { return candidate }
            dir = dir.deletingLastPathComponent()
        }
        return Bundle.main.bundleURL.deletingLastPathComponent().appendingPathComponent("xtsfs").path
    }()

    struct Result {
        var status: Int32
        var stdout: String
        var stderr: String
    }

    @discardableResult
    static func run(_ args: [String], stdin: String? = nil) -> Result {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: binary)
        p.arguments = args
        let out = Pipe(), err = Pipe()
        p.standardOutput = out
        p.standardError = err
        if let stdin {
            let inPipe = Pipe()
            p.standardInput = inPipe
            inPipe.fileHandleForWriting.write(stdin.data(using: .utf8)!)
            try? inPipe.fileHandleForWriting.close()
        } else {
            p.standardInput = FileHandle.nullDevice
        }
        do { try p.run() } catch { return Result(status: -1, stdout: "", stderr: "cannot run \(binary): \(error)") }
        // Read both pipes to EOF before waiting, so a chatty child cannot block on a full pipe.
        let errBox = DataBox()
        let errReader = Thread { errBox.data = err.fileHandleForReading.readDataToEndOfFile(); errBox.done.signal() }
        errReader.start()
        let outData = out.fileHandleForReading.readDataToEndOfFile()
        errBox.done.wait()
        let errData = errBox.data
        p.waitUntilExit()
        return Result(status: p.terminationStatus, stdout: String(decoding: outData, as: UTF8.self), stderr: String(decoding: errData, as: UTF8.self))
    }

    static func isMounted(_ path: String) -> Bool {
        guard let info = try? String(contentsOfFile: "/proc/self/mountinfo", encoding: .utf8) else { return false }
        return info.split(separator: "\n").contains { line in
            let f = line.split(separator: " ")
            return f.count > 4 && f[4] == path && line.contains(" - fuse")
        }
    }

    /// PIDs of the unmount helpers of root daemons serving `mountpoint` (they detach the
    /// mounts when their daemon dies).
    static func unmountHelpers(_ mountpoint: String) -> [Int32] {
        guard let entries = try? FileManager.default.contentsOfDirectory(atPath: "/proc") else { return [] }
        return entries.compactMap { Int32($0) }.filter { pid in
            guard let raw = FileManager.default.contents(atPath: "/proc/\(pid)/cmdline") else { return false }
            let args = raw.split(separator: 0).map { String(decoding: $0, as: UTF8.self) }
            return args.contains("--unmount-helper") && args.contains(mountpoint)
        }
    }

    /// PIDs of mount daemons serving `mountpoint`.
    static func daemons(_ mountpoint: String) -> [Int32] {
        guard let entries = try? FileManager.default.contentsOfDirectory(atPath: "/proc") else { return [] }
        return entries.compactMap { Int32($0) }.filter { pid in
            guard let raw = FileManager.default.contents(atPath: "/proc/\(pid)/cmdline") else { return false }
            let args = raw.split(separator: 0).map { String(decoding: $0, as: UTF8.self) }
            return args.contains("--daemon-child") && args.contains(mountpoint)
        }
    }

    /// Unmounts (lazily if needed) and waits for the daemon to exit; kills it as a last resort.
    static func forceUnmount(_ mountpoint: String) {
        if isMounted(mountpoint) {
            if run(["unmount", mountpoint]).status != 0 {
                _ = shell("fusermount3 -u -z '\(mountpoint)'")
            }
        }
        let deadline = Date().addingTimeInterval(10)
        while !daemons(mountpoint).isEmpty && Date() < deadline { usleep(20_000) }
        for pid in daemons(mountpoint) { kill(pid, SIGKILL) }
    }

    @discardableResult
    static func shell(_ command: String) -> Int32 {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: "/bin/sh")
        p.arguments = ["-c", command]
        p.standardInput = FileHandle.nullDevice
        try? p.run()
        p.waitUntilExit()
        return p.terminationStatus
    }
}

/// Filled by the stderr reader thread; read after `done` is signalled.
final class DataBox: @unchecked Sendable {
    var data = Data()
    let done = DispatchSemaphore(value: 0)
}

/// A scratch directory with a volume, a passphrase file and a mountpoint.
class VolumeTestCase: XCTestCase {
    var scratch = ""
    var cipher = ""
    var mnt = ""
    var passfile = ""
    /// Where tests mount the temp and cache areas (`--tmp`, `--cache`).
    var tmpMnt: String { scratch + "/tmpmnt" }
    var cacheMnt: String { scratch + "/cachemnt" }
    static let passphrase = "integration test passphrase"
    /// Argon2id kept cheap in tests; the defaults are exercised by the crypto tests.
    static let cheapKDF = ["--pbkdf-memory", "8192", "--pbkdf-force-iterations", "1"]

    override func setUpWithError() throws {
        try super.setUpWithError()
        var template = Array("/tmp/xtsfs-test-XXXXXX".utf8CString)
        guard let p = mkdtemp(&template) else { throw XCTSkip("mkdtemp failed") }
        scratch = String(cString: p)
        cipher = scratch + "/cipher"
        mnt = scratch + "/mnt"
        passfile = scratch + "/pass"
        try FileManager.default.createDirectory(atPath: mnt, withIntermediateDirectories: true)
        try (Self.passphrase + "\n").write(toFile: passfile, atomically: true, encoding: .utf8)
    }

    override func tearDown() {
        for mp in [mnt, tmpMnt, cacheMnt] {
            Harness.forceUnmount(mp)
            XCTAssertFalse(Harness.isMounted(mp), "mount left behind on \(mp)")
        }
        try? FileManager.default.removeItem(atPath: scratch)
        super.tearDown()
    }

    /// Extra `init` arguments: a subclass runs the same tests on another kind of volume.
    var initArguments: [String] { [] }

    /// The backing size of an n-byte file on the volumes this test case makes.
    func backingSize(_ n: Int) -> Int {
        if initArguments.contains("--integrity") {
            // FORMAT.md section 12: groups of a tag block and 126 data blocks; with listing
            // manifests (12.10, every volume init --integrity makes now) an empty file is
            // its 64-byte header.
            if n == 0 { return 64 }
            let last = (n + 4095) / 4096 - 1
            return (last / 126) * 127 * 4096 + 4096 * (1 + last % 126) + 4096
        }
        return n == 0 ? 0 : n + 32
    }

    /// Backing space a hole of n bytes takes on these volumes: none on plain ones; the tag
    /// blocks (4 KiB per 504 KiB) on integrity ones.
    func holeOverhead(_ n: Int) -> Int {
        initArguments.contains("--integrity") ? (n / (126 * 4096) + 2) * 4096 : 0
    }

    func initVolume(file: StaticString = #filePath, line: UInt = #line) {
        let r = Harness.run(["init", cipher, "--passfile", passfile] + Self.cheapKDF + initArguments)
        XCTAssertEqual(r.status, 0, "init failed: \(r.stderr)", file: file, line: line)
    }

    func mount(_ extra: [String] = [], file: StaticString = #filePath, line: UInt = #line) {
        let r = Harness.run(["mount", cipher, mnt, "--passfile", passfile] + extra)
        XCTAssertEqual(r.status, 0, "mount failed: \(r.stderr)", file: file, line: line)
        XCTAssertTrue(Harness.isMounted(mnt), "not mounted after mount returned", file: file, line: line)
    }

    /// `mount -o OPTIONS` is a usage error (exit 2) whose message holds `text`, and nothing
    /// is mounted.
    func assertMountRefused(options: String, saying text: String, file: StaticString = #filePath, line: UInt = #line) {
        let r = Harness.run(["mount", cipher, mnt, "--passfile", passfile, "-o", options])
        XCTAssertEqual(r.status, 2, r.stderr, file: file, line: line)
        XCTAssertTrue(r.stderr.contains(text), r.stderr, file: file, line: line)
        XCTAssertFalse(Harness.isMounted(mnt), file: file, line: line)
    }

    func unmount(file: StaticString = #filePath, line: UInt = #line) {
        let r = Harness.run(["unmount", mnt])
        XCTAssertEqual(r.status, 0, "unmount failed: \(r.stderr)", file: file, line: line)
        let deadline = Date().addingTimeInterval(10)
        while !Harness.daemons(mnt).isEmpty && Date() < deadline { usleep(20_000) }
        XCTAssertTrue(Harness.daemons(mnt).isEmpty, "daemon still running after unmount", file: file, line: line)
    }

    func write(_ path: String, _ bytes: [UInt8]) throws {
        try Data(bytes).write(to: URL(fileURLWithPath: path))
    }

    func read(_ path: String) throws -> [UInt8] {
        [UInt8](try Data(contentsOf: URL(fileURLWithPath: path)))
    }

    /// Every regular file's bytes and every name under the backing directory, less the
    /// audit log (which every unlock, failed or not, appends to) and the presence records
    /// (which every mount writes and its unmount removes).
    func backingFiles() -> [(path: String, bytes: [UInt8])] {
        var out: [(String, [UInt8])] = []
        let e = FileManager.default.enumerator(atPath: cipher)
        while let rel = e?.nextObject() as? String {
            if rel == "xtsfs.audit" || rel.hasPrefix("xtsfs.audit/") || rel == "xtsfs.hosts" || rel.hasPrefix("xtsfs.hosts/") { continue }
            let full = cipher + "/" + rel
            var st = stat()
            guard lstat(full, &st) == 0 else { continue }
            if st.st_mode & S_IFMT == S_IFREG, let d = FileManager.default.contents(atPath: full) { out.append((rel, [UInt8](d))) }
            else { out.append((rel, [])) }
        }
        return out
    }
}

/// Deterministic bytes for content checks.
func pattern(_ count: Int, seed: UInt64) -> [UInt8] {
    var s = seed &+ 0x9E3779B97F4A7C15
    var out = [UInt8]()
    out.reserveCapacity(count)
    while out.count < count {
        s ^= s << 13; s ^= s >> 7; s ^= s << 17
        withUnsafeBytes(of: s) { out.append(contentsOf: $0.prefix(count - out.count)) }
    }
    return out
}

extension Array where Element == UInt8 {
    func contains(subsequence needle: [UInt8]) -> Bool {
        guard !needle.isEmpty, needle.count <= count else { return false }
        for i in 0...(count - needle.count) where self[i] == needle[0] {
            if Array(self[i..<i + needle.count]) == needle { return true }
        }
        return false
    }
}
