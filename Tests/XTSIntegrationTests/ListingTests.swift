import CSysShim
import Foundation
import Synchronization
import XCTest
import XTSVolume
#if canImport(Glibc)
import Glibc
#endif

/// Directory listings through the mount: the kernel lists without OPENDIR/RELEASEDIR
/// (FUSE_NO_OPENDIR_SUPPORT), READDIR resuming from the offset (cookie) of the last entry
/// it took; POSIX readdir guarantees must hold across requests and across listers.
final class ListingTests: VolumeTestCase {
    /// One pass of getdents64 over `path` with a small buffer (many requests), calling
    /// `between` after each call; the names with how often each came, and the error if
    /// one ended it.
    static func getdents(_ path: String, buffer: Int = 512, between: () -> Void = {}) -> (seen: [String: Int], errno: Int32) {
        let fd = open(path, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
        guard fd >= 0 else { return ([:], errno) }
        defer { close(fd) }
        var seen: [String: Int] = [:]
        let buf = UnsafeMutableRawPointer.allocate(byteCount: buffer, alignment: 8)
        defer { buf.deallocate() }
        while true {
            let n = xts_getdents64(fd, buf, buffer)
            if n < 0 { return (seen, errno) }
            if n == 0 { return (seen, 0) }
            var at = 0
            while at < Int(n) {
                let reclen = Int(buf.load(fromByteOffset: at + 16, as: UInt16.self))
                let name = String(cString: (buf + at + 19).assumingMemoryBound(to: CChar.self))
                seen[name, default: 0] += 1
                at += reclen
            }
            between()
        }
    }

    /// Two listers of one directory of thousands of entries (hundreds of READDIRPLUS
    /// requests each, with a 512-byte getdents buffer), started again and again, while
    /// other entries are created, removed and renamed: each listing has every untouched
    /// entry exactly once, and "." and "..".
    func testConcurrentListersSeeUntouchedEntriesOnce() throws {
        initVolume()
        mount()
        let dir = mnt + "/big"
        XCTAssertEqual(mkdir(dir, 0o755), 0)
        let stable = (0..<2500).map { "stable-\($0)-" + String(repeating: "n", count: $0 % 40) }
        for n in stable { XCTAssertEqual(close(open(dir + "/" + n, O_CREAT | O_WRONLY, 0o644)), 0) }
        let expected = Set(stable + [".", ".."])
        let stop = Atomic<Bool>(false)
        let changes = Atomic<Int>(0)
        let mutator = Thread {
            var i = 0
            while !stop.load(ordering: .relaxed) {
                let a = dir + "/churn-\(i)", b = dir + "/churn-\(i)-renamed"
                close(open(a, O_CREAT | O_WRONLY, 0o644))
                rename(a, b)
                if i >= 20 { unlink(dir + "/churn-\(i - 20)-renamed") }
                i += 1
                changes.store(i, ordering: .relaxed)
                usleep(200)
            }
        }
        mutator.start()
        defer {
            stop.store(true, ordering: .relaxed)
            while !mutator.isFinished { usleep(1000) }
        }
        let failures = Mutex<[String]>([])
        let group = DispatchGroup()
        for lister in 0..<2 {
            group.enter()
            Thread {
                defer { group.leave() }
                for round in 0..<4 {
                    // Lister 1 pauses between calls, so that lister 0 starts new listings
                    // while it is in the middle of its own.
                    let (seen, err) = ListingTests.getdents(dir, buffer: lister == 0 ? 512 : 700) { if lister == 1 { usleep(300) } }
                    var bad: [String] = []
                    if err != 0 { bad.append("errno \(err)") }
                    let missing = expected.filter { seen[$0] != 1 }
                    if !missing.isEmpty { bad.append("\(missing.count) untouched entries not seen exactly once, e.g. \(Array(missing.prefix(3))) (\(missing.prefix(3).map { seen[$0] ?? 0 }))") }
                    let twice = seen.filter { $0.value > 1 }.map(\.key)
                    if !twice.isEmpty { bad.append("listed twice: \(Array(twice.prefix(3)))") }
                    if !bad.isEmpty { failures.withLock { $0.append("lister \(lister), round \(round): " + bad.joined(separator: "; ")) } }
                }
            }.start()
        }
        group.wait()
        stop.store(true, ordering: .relaxed)
        while !mutator.isFinished { usleep(1000) }
        XCTAssertGreaterThan(changes.load(ordering: .relaxed), 10, "the mutator ran meanwhile")
        XCTAssertEqual(failures.withLock { $0 }, [])
        unmount()
    }

    /// telldir/seekdir: an offset telldir gave resumes at the same place later, also after
    /// other listings of the directory and changes to other entries.
    func testTelldirSeekdirRoundTrip() throws {
        initVolume()
        mount()
        let dir = mnt + "/d"
        XCTAssertEqual(mkdir(dir, 0o755), 0)
        for i in 0..<400 { XCTAssertEqual(close(open(dir + "/file-\(i)", O_CREAT | O_WRONLY, 0o644)), 0) }
        guard let d = opendir(dir) else { return XCTFail("opendir errno \(errno)") }
        var order: [(Int, String)] = []
        while let e = readdir(d) {
            let name = withUnsafePointer(to: e.pointee.d_name) { $0.withMemoryRebound(to: CChar.self, capacity: 256) { String(cString: $0) } }
            order.append((telldir(d), name))
        }
        XCTAssertEqual(order.count, 402)
        XCTAssertEqual(Set(order.map(\.1)).count, 402)
        // Changes to other entries, one of them before the places resumed from, then another
        // listing: the kernel takes its cached listing again from the daemon, which the
        // open stream then resumes in (by offset).
        XCTAssertEqual(close(open(dir + "/added", O_CREAT | O_WRONLY, 0o644)), 0)
        let gone = order.map(\.1).first { $0.hasPrefix("file-") }!
        XCTAssertEqual(unlink(dir + "/" + gone), 0)
        XCTAssertEqual(ListingTests.getdents(dir).seen.count, 402)
        for i in [0, 1, 2, 150, 399, 400] {
            seekdir(d, order[i].0)
            var rest: [String] = []
            while let e = readdir(d) {
                rest.append(withUnsafePointer(to: e.pointee.d_name) { $0.withMemoryRebound(to: CChar.self, capacity: 256) { String(cString: $0) } })
            }
            let expected = order[(i + 1)...].map(\.1).filter { $0 != gone }
            // Entries added or removed since the stream was opened may or may not come.
            XCTAssertEqual(rest.filter { $0 != "added" && $0 != gone }, expected, "resumed after entry \(i)")
        }
        closedir(d)
        unmount()
    }

    /// An empty directory lists "." and ".."; one removed while a listing of it is half
    /// done ends that listing (as on ext4: nothing more, or ENOENT), and the mount goes on.
    func testEmptyAndRemovedDirectories() throws {
        initVolume()
        mount()
        XCTAssertEqual(mkdir(mnt + "/empty", 0o755), 0)
        let (empty, err) = ListingTests.getdents(mnt + "/empty")
        XCTAssertEqual(err, 0)
        XCTAssertEqual(empty, [".": 1, "..": 1])
        let dir = mnt + "/going"
        XCTAssertEqual(mkdir(dir, 0o755), 0)
        for i in 0..<300 { XCTAssertEqual(close(open(dir + "/f\(i)", O_CREAT | O_WRONLY, 0o644)), 0) }
        var removed = false
        let (seen, _) = ListingTests.getdents(dir, buffer: 512) {
            guard !removed else { return }
            removed = true
            for i in 0..<300 { unlink(dir + "/f\(i)") }
            XCTAssertEqual(rmdir(dir), 0)
        }
        XCTAssertTrue(removed)
        XCTAssertLessThan(seen.count, 100, "the listing stopped at the removal")
        XCTAssertTrue(seen.values.allSatisfy { $0 == 1 })
        XCTAssertFalse(FileManager.default.fileExists(atPath: dir))
        XCTAssertEqual(try FileManager.default.contentsOfDirectory(atPath: mnt).sorted(), ["empty"])
        unmount()
    }

    /// Listing a tree costs READDIRPLUS requests only: one OPENDIR at most (the first,
    /// answered ENOSYS), no RELEASEDIR; the kernel's cached listings expire with the cache
    /// timeout, so that `ls -l` lists again (READDIRPLUS) rather than looking up every
    /// entry. With -o shared, OPENDIR stays (each listing is taken afresh; the kernel
    /// caches none).
    func testListingsSendNoOpendirOrReleasedir() throws {
        guard !DamageLog.syslogAvailable else { throw XCTSkip("this machine has syslog") }
        initVolume()
        let file = DamageLog.file(mountpoint: mnt)
        try? FileManager.default.removeItem(atPath: file)
        defer { try? FileManager.default.removeItem(atPath: file) }
        for shared in [false, true] {
            mount(["-o", shared ? "shared" : "cache_timeout=1"])
            for i in 0..<20 {
                XCTAssertEqual(mkdir(mnt + "/d\(i)", 0o755), 0)
                for j in 0..<5 { XCTAssertEqual(close(open(mnt + "/d\(i)/f\(j)", O_CREAT | O_WRONLY, 0o644)), 0) }
            }
            XCTAssertEqual(Harness.shell("ls -lR '\(mnt)' > /dev/null"), 0)
            // Past the timeout: listed again, not looked up entry by entry.
            usleep(2_500_000)
            XCTAssertEqual(Harness.shell("ls -lR '\(mnt)' > /dev/null"), 0)
            let pids = Harness.daemons(mnt)
            XCTAssertEqual(pids.count, 1)
            let before = (try? String(contentsOfFile: file, encoding: .utf8))?.utf8.count ?? 0
            kill(pids[0], SIGUSR1)
            var log = ""
            let deadline = Date().addingTimeInterval(10)
            while !log.contains("requests") && Date() < deadline {
                usleep(50_000)
                log = String(((try? String(contentsOfFile: file, encoding: .utf8)) ?? "").utf8.dropFirst(before)) ?? ""
            }
            func count(_ op: String) -> Int {
                guard let r = log.range(of: " \(op) ") else { return 0 }
                return Int(log[r.upperBound...].prefix { $0.isNumber }) ?? -1
            }
            XCTAssertGreaterThanOrEqual(count("READDIRPLUS"), 42, log)
            if shared {
                XCTAssertGreaterThanOrEqual(count("OPENDIR"), 42, log)
                XCTAssertGreaterThanOrEqual(count("RELEASEDIR"), 42, log)
            } else {
                XCTAssertLessThanOrEqual(count("OPENDIR"), 1, log)
                XCTAssertEqual(count("RELEASEDIR"), 0, log)
                // The creates' 120 (a LOOKUP each), not 120 more for the second `ls -l`.
                XCTAssertLessThan(count("LOOKUP"), 170, log)
                XCTAssertGreaterThanOrEqual(count("READDIRPLUS"), 84, log)
            }
            XCTAssertEqual(Harness.shell("rm -rf '\(mnt)'/d*"), 0)
            unmount()
        }
    }
}
