import CSysShim
import Foundation
import Synchronization
import XCTest
import XTSContent
import XTSCrypto
import XTSFormat
import XTSKeys
import XTSSystem
@testable import XTSFS

/// Listing manifests (FORMAT.md 12.10) in the filesystem layer, without FUSE: after every
/// kind of namespace change, every backing directory's manifest is settled (A = B) and
/// matches its entries as `ListingScan` (what fsck and the rekey use) computes them.
final class ListingManifestFSTests: XCTestCase {
    var dir = ""
    var fs: FileSystem!
    var keys: KeySet!
    let me = Caller(uid: geteuid(), gid: getegid())
    let root = FileSystem.rootID

    override func setUpWithError() throws {
        var template = Array("/tmp/xtsfs-manifest-XXXXXX".utf8CString)
        dir = String(cString: mkdtemp(&template)!)
        keys = try KeySet.generate(generation: 1, volumeID: try Random.bytes(16))
        let header = try DirHeader.random(keyGeneration: 1)
        try Sys.atomicWrite(try header.encode(macKey: keys.metadataMACKey), to: dir + "/" + DirHeader.fileName)
        let empty = try ListingElement.seal(key: keys.listSealKey, ListingElement.zero)
        try Sys.atomicWrite(try ListManifest(keyGeneration: 1, slotA: empty, slotB: empty).encode(macKey: keys.listMACKey, directoryID: header.directoryID),
                            to: dir + "/" + ListManifest.fileName)
        fs = try FileSystem(cipherDir: dir, keys: keys, readOnly: false, unitTags: .ghashAES256, listingManifests: true, log: { _ in })
    }

    override func tearDown() {
        fs = nil
        try? FileManager.default.removeItem(atPath: dir)
    }

    func name(_ s: String) -> [UInt8] { Array(s.utf8) }

    /// Every backing directory under `path`: (backing path, settled, matches).
    func check(_ path: String? = nil, file: StaticString = #filePath, line: UInt = #line) throws {
        let path = path ?? dir
        let fd = try Sys.open(path, XTS_O_PATH | O_DIRECTORY)
        defer { Sys.close(fd) }
        let dirID = Array(try Sys.readSmallFile(fd, DirHeader.fileName, limit: 4096)[16..<32])
        let m = try ListManifest.decode(try Sys.readSmallFile(fd, ListManifest.fileName, limit: 4096), macKey: keys.listMACKey, directoryID: dirID)
        XCTAssertFalse(m.pending, "\(path): pending", file: file, line: line)
        let k = keys!
        let scan = try ListingScan.scan(fd, directoryID: dirID, codecs: [NameCodec(keys: k)], elementKey: k.listElementKey) { raw in
            (try? SymlinkTarget.plain(raw, root: self.rootFD, keys: [k]))
        }
        XCTAssertTrue(scan.unidentified.isEmpty, "\(path): \(scan.unidentified.map(\.backing))", file: file, line: line)
        XCTAssertEqual(scan.accumulator, try ListingElement.open(key: k.listSealKey, m.slotA), "\(path): listing does not match", file: file, line: line)
        for e in try Sys.listDirectory(fd) where e.type == UInt8(DT_DIR) && !e.name.hasPrefix("xtsfs.") {
            try check(path + "/" + e.name, file: file, line: line)
        }
    }

    var rootFD: Int32 { fs.root.fd }

    func create(_ parent: UInt64, _ n: String, _ bytes: [UInt8] = []) throws -> UInt64 {
        let (id, _, h) = try fs.create(parent: parent, name: name(n), mode: 0o644, flags: O_WRONLY, caller: me)
        if !bytes.isEmpty { _ = try bytes.withUnsafeBytes { try fs.write(handle: h, offset: 0, data: $0) } }
        fs.release(h)
        return id
    }

    func testEveryChangeKeepsTheManifestsTrue() throws {
        try check()
        let a = try create(root, "a", [1, 2, 3])
        _ = try create(root, "b")
        let (d, _) = try fs.mkdir(parent: root, name: name("d"), mode: 0o755, caller: me)
        let (e, _) = try fs.mkdir(parent: d, name: name("e"), mode: 0o755, caller: me)
        try check()
        // Files are created with their header (64 bytes when empty), never 0 bytes.
        for f in try FileManager.default.contentsOfDirectory(atPath: dir) where !f.hasPrefix("xtsfs.") {
            var st = stat()
            XCTAssertEqual(lstat(dir + "/" + f, &st), 0)
            if st.st_mode & S_IFMT == S_IFREG { XCTAssertGreaterThanOrEqual(st.st_size, 64) }
        }
        _ = try fs.symlink(target: name("a"), parent: d, name: name("s"), caller: me)
        _ = try fs.symlink(target: Array(repeating: UInt8(ascii: "t"), count: 3500), parent: e, name: name("long-target"), caller: me)
        _ = try fs.mknod(parent: d, name: name("fifo"), mode: S_IFIFO | 0o644, rdev: 0, caller: me)
        _ = try fs.mknod(parent: d, name: name("reg"), mode: S_IFREG | 0o644, rdev: 0, caller: me)
        let long = String(repeating: "x", count: 200)
        _ = try create(e, long, [9])
        _ = try fs.link(a, newParent: e, newName: name("a-link"))
        try check()
        try fs.rename(parent: root, name: name("a"), newParent: d, newName: name("a2"), flags: 0)
        try fs.rename(parent: e, name: name(long), newParent: e, newName: name(long + "y"), flags: 0)
        try fs.rename(parent: root, name: name("b"), newParent: d, newName: name("reg"), flags: 0)   // over an existing file
        try check()
        XCTAssertThrowsError(try fs.rename(parent: d, name: name("a2"), newParent: d, newName: name("reg"), flags: UInt32(XTS_RENAME_NOREPLACE)))
        try fs.rename(parent: d, name: name("a2"), newParent: e, newName: name("a-link"), flags: UInt32(XTS_RENAME_EXCHANGE))   // two names of one file
        try fs.rename(parent: d, name: name("s"), newParent: e, newName: name(long + "y"), flags: UInt32(XTS_RENAME_EXCHANGE))
        try check()
        // Exceptions: nothing done, nothing pending.
        XCTAssertThrowsError(try fs.create(parent: d, name: name("reg"), mode: 0o644, flags: O_WRONLY, caller: me))
        XCTAssertThrowsError(try fs.unlink(parent: d, name: name("missing")))
        XCTAssertThrowsError(try fs.rmdir(parent: d, name: name("e")))
        try check()
        // Emptying keeps the header and the file ID.
        let reg = try fs.lookup(parent: d, name: name("reg")).0
        let h = try fs.open(reg, flags: O_WRONLY | O_TRUNC)
        fs.release(h)
        try check()
        let (f, _) = try fs.mkdir(parent: root, name: name("f"), mode: 0o755, caller: me)
        _ = f
        try fs.rename(parent: d, name: name("e"), newParent: root, newName: name("f"), flags: 0)   // a directory over an empty one
        try check()
        for n in ["fifo", "reg", "a2"] { try? fs.unlink(parent: d, name: name(n)) }
        let (g, _) = try fs.mkdir(parent: d, name: name("g"), mode: 0o755, caller: me)
        _ = g
        try fs.rmdir(parent: d, name: name("g"))
        try check()
        _ = e
    }

    /// The manifest of a directory read raw: (pending, slot A open).
    func manifest(_ path: String? = nil) throws -> ListManifest {
        let path = path ?? dir
        let fd = try Sys.open(path, XTS_O_PATH | O_DIRECTORY)
        defer { Sys.close(fd) }
        let dirID = Array(try Sys.readSmallFile(fd, DirHeader.fileName, limit: 4096)[16..<32])
        return try ListManifest.decode(try Sys.readSmallFile(fd, ListManifest.fileName, limit: 4096), macKey: keys.listMACKey, directoryID: dirID)
    }

    /// Step 5 of a change (`{A′, A′}`, after the change itself was made) failing does not
    /// fail the change: it happened, and the caller is told so. The failure is logged, the
    /// manifest is left pending ({A, A′}, the listing matching A′), and the next change of
    /// the directory settles it.
    func testFailedCommitAfterTheChangeIsLoggedAndTheChangeSucceeds() throws {
        let logged = Mutex<[String]>([])
        fs = try FileSystem(cipherDir: dir, keys: keys, readOnly: false, unitTags: .ghashAES256, listingManifests: true,
                            log: { m in logged.withLock { $0.append(m) } })
        _ = try create(root, "a", [1])
        let fifo = name("fifo")
        let (d, b) = try fs.entry(root, fifo)
        var limit = rlimit()
        XCTAssertEqual(getrlimit(__rlimit_resource_t(RLIMIT_FSIZE.rawValue), &limit), 0)
        let handler = signal(SIGXFSZ, SIG_IGN)
        var restored = false
        func restore() {
            guard !restored else { return }
            restored = true
            _ = setrlimit(__rlimit_resource_t(RLIMIT_FSIZE.rawValue), &limit)
            signal(SIGXFSZ, handler)
        }
        defer { restore() }
        var result: Result<Void, FSError> = .success(())
        do throws(FSError) {
            try fs.listingChange(try fs.listingDirs(root), plan: { () throws(FSError) -> [ListingDelta]? in
                [ListingDelta(dir: 0, added: [ListedEntry(type: UInt8(DT_FIFO), name: fifo, identity: ListingElement.zero)])]
            }) { () throws(FSError) in
                do throws(SystemError) { try Sys.mknodat(d.fd, b.entryName, S_IFIFO | 0o644, 0) } catch { throw .system(error) }
                // From here no write of this process to a regular file succeeds (EFBIG): the
                // commit's pwrite fails.
                var zero = limit
                zero.rlim_cur = 0
                _ = setrlimit(__rlimit_resource_t(RLIMIT_FSIZE.rawValue), &zero)
            }
        } catch { result = .failure(error) }
        restore()
        if case .failure(let e) = result { XCTFail("the change was made, yet reported as failed: \(e)") }
        XCTAssertTrue(logged.withLock { $0 }.contains { $0.contains(ListManifest.fileName) && $0.contains("pending") }, "\(logged.withLock { $0 })")
        XCTAssertTrue(try manifest().pending)
        XCTAssertNoThrow(try fs.lookup(parent: root, name: fifo))
        // The next change of the directory settles it from the listing.
        _ = try create(root, "b")
        try check()
    }

    /// With -o shared another host may change a directory up to the moment this one holds
    /// its manifest's lock. A rename (or exchange) that looked at its target before that
    /// must look again under the lock: here the test holds the lock, the rename waits for
    /// it, and meanwhile "the other host" (a second filesystem on the same CIPHERDIR,
    /// standing for one that made its change under the lock) creates, or replaces, the
    /// target. The manifest must then describe what the rename really did.
    func testSharedRenameLooksAtItsTargetAgainUnderTheManifestLock() throws {
        fs.sharedStorage = true
        let other = try FileSystem(cipherDir: dir, keys: keys, readOnly: false, unitTags: .ghashAES256, listingManifests: true, log: { _ in })
        _ = try create(root, "x", [1])
        _ = try create(root, "e1", [2])
        _ = try create(root, "e2", [3])
        try check()
        let fs = self.fs!, root = self.root, exchange = UInt32(XTS_RENAME_EXCHANGE)
        let x = name("x"), y = name("y"), e1 = name("e1"), e2 = name("e2")
        // rename x → y, y made meanwhile; exchange e1 ↔ e2, e2 replaced meanwhile.
        try whileTheManifestIsLocked({ try fs.rename(parent: root, name: x, newParent: root, newName: y, flags: 0) }) {
            _ = try other.create(parent: root, name: name("y"), mode: 0o644, flags: O_WRONLY, caller: me)
        }
        try check()
        try whileTheManifestIsLocked({ try fs.rename(parent: root, name: e1, newParent: root, newName: e2, flags: exchange) }) {
            try other.unlink(parent: root, name: name("e2"))
            _ = try other.create(parent: root, name: name("e2"), mode: 0o644, flags: O_WRONLY, caller: me)
        }
        try check()
        // The target gone meanwhile: an exchange finds nothing to exchange with.
        XCTAssertThrowsError(try whileTheManifestIsLocked({ try fs.rename(parent: root, name: e1, newParent: root, newName: y, flags: exchange) }) {
            try other.unlink(parent: root, name: name("y"))
        }) { if case .notFound = $0 as? FSError {} else { XCTFail("\($0)") } }
        try check()
    }

    /// Runs `change` on another thread while this one holds an OFD lock on the root's
    /// manifest; once `change` waits for that lock, runs `meanwhile`, then lets it go.
    func whileTheManifestIsLocked(_ change: @escaping @Sendable () throws -> Void, meanwhile: () throws -> Void) throws {
        let path = dir + "/" + ListManifest.fileName
        var st = stat()
        XCTAssertEqual(stat(path, &st), 0)
        let fd = open(path, O_RDWR | O_CLOEXEC)
        XCTAssertGreaterThanOrEqual(fd, 0)
        var l = flock()
        l.l_type = Int16(F_WRLCK); l.l_whence = Int16(SEEK_SET)
        XCTAssertEqual(fcntl(fd, XTS_F_OFD_SETLK, &l), 0)
        let outcome = Mutex<Result<Void, FSError>?>(nil)
        let finished = DispatchSemaphore(value: 0)
        DispatchQueue.global().async {
            do { try change(); outcome.withLock { $0 = .success(()) } } catch { outcome.withLock { $0 = .failure(error as? FSError ?? .invalidArgument) } }
            finished.signal()
        }
        // A request waiting for a lock on this inode shows in /proc/locks as "-> OFDLCK".
        // Without /proc/locks, a pause long enough for it to get there.
        let inode = ":\(st.st_ino) "
        let deadline = Date().addingTimeInterval(10)
        var waiting = false
        if FileManager.default.isReadableFile(atPath: "/proc/locks") {
            while !waiting && Date() < deadline {
                let locks = (try? String(contentsOfFile: "/proc/locks", encoding: .utf8)) ?? ""
                waiting = locks.split(separator: "\n").contains { $0.contains("-> OFDLCK") && $0.contains(inode) }
                if !waiting { usleep(5_000) }
            }
            XCTAssertTrue(waiting, "the change never waited for the manifest's lock")
        } else {
            usleep(500_000)
        }
        var failure: Error?
        do { try meanwhile() } catch { failure = error }
        close(fd)
        XCTAssertEqual(finished.wait(timeout: .now() + 30), .success, "the change did not finish")
        if let failure { throw failure }
        if case .failure(let e) = outcome.withLock({ $0 }) { throw e }
    }

    /// A read-only filesystem refuses mknod, mkdir and symlink before it touches a
    /// manifest (or the link store): nothing in CIPHERDIR is written.
    func testReadOnlyRefusesBeforeWritingAManifest() throws {
        let ro = try FileSystem(cipherDir: dir, keys: keys, readOnly: true, unitTags: .ghashAES256, listingManifests: true, log: { _ in })
        let path = dir + "/" + ListManifest.fileName
        var old = [timespec(tv_sec: 946_684_800, tv_nsec: 0), timespec(tv_sec: 946_684_800, tv_nsec: 0)]
        XCTAssertEqual(utimensat(AT_FDCWD, path, &old, 0), 0)
        let before = try Sys.readFile(path)
        func refused(_ what: String, _ body: () throws -> Void) {
            XCTAssertThrowsError(try body(), what) { if case .readOnly = $0 as? FSError {} else { XCTFail("\(what): \($0)") } }
        }
        refused("mknod") { _ = try ro.mknod(parent: root, name: name("n"), mode: S_IFIFO | 0o644, rdev: 0, caller: me) }
        refused("mkdir") { _ = try ro.mkdir(parent: root, name: name("d"), mode: 0o755, caller: me) }
        refused("symlink") { _ = try ro.symlink(target: name("t"), parent: root, name: name("s"), caller: me) }
        refused("long symlink") { _ = try ro.symlink(target: Array(repeating: UInt8(ascii: "t"), count: 3500), parent: root, name: name("l"), caller: me) }
        var st = stat()
        XCTAssertEqual(stat(path, &st), 0)
        XCTAssertEqual(st.st_mtim.tv_sec, 946_684_800, "the manifest was written")
        XCTAssertEqual(try Sys.readFile(path), before)
        XCTAssertFalse(FileManager.default.fileExists(atPath: dir + "/" + NameCodec.linkStore), "the link store was written")
        try check()
    }

    func testTamperIsVisibleToTheScan() throws {
        _ = try create(root, "a", [1])
        _ = try create(root, "b", [2])
        try check()
        let victim = try FileManager.default.contentsOfDirectory(atPath: dir).first { !$0.hasPrefix("xtsfs.") }!
        XCTAssertEqual(unlink(dir + "/" + victim), 0)
        let fd = try Sys.open(dir, XTS_O_PATH | O_DIRECTORY)
        defer { Sys.close(fd) }
        let dirID = Array(try Sys.readSmallFile(fd, DirHeader.fileName, limit: 4096)[16..<32])
        let m = try ListManifest.decode(try Sys.readSmallFile(fd, ListManifest.fileName, limit: 4096), macKey: keys.listMACKey, directoryID: dirID)
        let scan = try ListingScan.scan(fd, directoryID: dirID, codecs: [NameCodec(keys: keys)], elementKey: keys.listElementKey) { _ in nil }
        XCTAssertNotEqual(scan.accumulator, try ListingElement.open(key: keys.listSealKey, m.slotA))
        // A change of the tampered directory is not refused while the manifest is settled
        // (the mount does not scan on every change), but after a crash it would be: forge
        // a pending manifest and see the change fail with EIO.
        let other = try ListingElement.seal(key: keys.listSealKey, [UInt8](repeating: 3, count: 16))
        try Sys.atomicWrite(try ListManifest(keyGeneration: 1, slotA: m.slotA, slotB: other).encode(macKey: keys.listMACKey, directoryID: dirID), to: dir + "/" + ListManifest.fileName)
        XCTAssertThrowsError(try fs.create(parent: root, name: name("c"), mode: 0o644, flags: O_WRONLY, caller: me)) {
            guard case .damaged = $0 as? FSError else { return XCTFail("\($0)") }
        }
    }
}
