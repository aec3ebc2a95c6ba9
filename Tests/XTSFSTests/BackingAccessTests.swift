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

/// The filesystem layer over a hostile backing directory, and the operations that came
/// with one node per backing inode: hard links, xattrs, fallocate, RENAME_EXCHANGE.
final class BackingAccessTests: XCTestCase {
    var scratch = ""
    var dir = ""
    var canary = ""
    var fs: FileSystem!
    var logged: LogBox!
    let me = Caller(uid: geteuid(), gid: getegid())

    final class LogBox: @unchecked Sendable {
        private let lock = NSLock()
        private var lines: [String] = []
        func add(_ s: String) { lock.lock(); lines.append(s); lock.unlock() }
        var all: [String] { lock.lock(); defer { lock.unlock() }; return lines }
    }

    override func setUpWithError() throws {
        var template = Array("/tmp/xtsfs-fs-XXXXXX".utf8CString)
        scratch = String(cString: mkdtemp(&template)!)
        dir = scratch + "/cipher"
        canary = scratch + "/canary"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        try FileManager.default.createDirectory(atPath: canary + "/sub", withIntermediateDirectories: true)
        try Data("outside".utf8).write(to: URL(fileURLWithPath: canary + "/file"))
        chmod(canary + "/file", 0o600)
        let keys = try KeySet.generate(generation: 1, volumeID: try Random.bytes(16))
        try Sys.atomicWrite(try DirHeader.random(keyGeneration: 1).encode(macKey: keys.metadataMACKey), to: dir + "/" + DirHeader.fileName)
        let box = LogBox()
        logged = box
        fs = try FileSystem(cipherDir: dir, keys: keys, readOnly: false, log: { box.add($0) })
    }

    override func tearDown() {
        fs = nil
        try? FileManager.default.removeItem(atPath: scratch)
    }

    func name(_ s: String) -> [UInt8] { Array(s.utf8) }

    func write(_ h: UInt64, _ bytes: [UInt8], at off: Int64 = 0) throws {
        let n = try bytes.withUnsafeBytes { try fs.write(handle: h, offset: off, data: $0) }
        XCTAssertEqual(n, bytes.count)
    }

    func read(_ h: UInt64, _ count: Int, at off: Int64 = 0) throws -> [UInt8] {
        var out = [UInt8](repeating: 0, count: count)
        let n = try out.withUnsafeMutableBytes { try fs.read(handle: h, offset: off, into: $0) }
        return Array(out.prefix(n))
    }

    func makeFile(_ parent: UInt64, _ n: String, _ content: String) throws -> UInt64 {
        let (id, _, h) = try fs.create(parent: parent, name: name(n), mode: 0o644, flags: O_RDWR, caller: me)
        try write(h, name(content))
        fs.release(h)
        return id
    }

    /// The backing entries that appeared while `body` ran, in `path`.
    func newEntries(in path: String, _ body: () throws -> Void) throws -> [String] {
        let before = Set(try FileManager.default.contentsOfDirectory(atPath: path))
        try body()
        return try FileManager.default.contentsOfDirectory(atPath: path).filter { !before.contains($0) }.sorted()
    }

    func assertCanaryIntact(file: StaticString = #filePath, line: UInt = #line) {
        var st = stat()
        XCTAssertEqual(lstat(canary + "/file", &st), 0, file: file, line: line)
        XCTAssertEqual(st.st_mode & 0o7777, 0o600, "mode of a file outside CIPHERDIR changed", file: file, line: line)
        XCTAssertEqual(FileManager.default.contents(atPath: canary + "/file"), Data("outside".utf8), file: file, line: line)
        XCTAssertEqual(try? FileManager.default.contentsOfDirectory(atPath: canary + "/sub"), [], file: file, line: line)
    }

    func expect(_ errors: [String], file: StaticString = #filePath, line: UInt = #line, _ body: () throws -> Void) {
        XCTAssertThrowsError(try body(), file: file, line: line) { e in
            guard let fe = e as? FSError else { return XCTFail("\(e)", file: file, line: line) }
            let label = "\(fe)"
            XCTAssertTrue(errors.contains { label.hasPrefix($0) || label.contains($0) }, "unexpected \(fe)", file: file, line: line)
        }
    }

    // MARK: - hostile CIPHERDIR

    func testFileSwappedForSymlinkIsNeverFollowed() throws {
        var id: UInt64 = 0
        let entries = try newEntries(in: dir) { id = try makeFile(FileSystem.rootID, "victim", "inside") }
        XCTAssertEqual(entries.count, 1)
        let backing = dir + "/" + entries[0]
        XCTAssertEqual(rename(backing, scratch + "/saved"), 0)
        XCTAssertEqual(Glibc.symlink(canary + "/file", backing), 0)
        var c = AttributeChanges()
        c.mode = 0o666
        expect(["replaced"]) { _ = try fs.setattr(id, handle: nil, changes: c) }
        c = AttributeChanges(); c.size = 0
        expect(["replaced"]) { _ = try fs.setattr(id, handle: nil, changes: c) }
        c = AttributeChanges(); c.uid = 65534
        expect(["replaced"]) { _ = try fs.setattr(id, handle: nil, changes: c) }
        expect(["replaced"]) { _ = try fs.open(id, flags: O_RDWR) }
        expect(["replaced"]) { try fs.setxattr(id, name: name("user.x"), value: [1]) }
        assertCanaryIntact()
    }

    func testDirectorySwappedForSymlinkIsNeverEntered() throws {
        var sub: UInt64 = 0
        let entries = try newEntries(in: dir) { sub = try fs.mkdir(parent: FileSystem.rootID, name: name("sub"), mode: 0o755, caller: me).0 }
        _ = try makeFile(sub, "inner", "x")
        let (deep, _) = try fs.mkdir(parent: sub, name: name("deeper"), mode: 0o755, caller: me)
        // A fresh filesystem over the same directory: nothing cached.
        fs = try FileSystem(cipherDir: dir, keys: fs.keys, readOnly: false, log: { _ in })
        let (sub2, _) = try fs.lookup(parent: FileSystem.rootID, name: name("sub"))
        _ = deep
        let backing = dir + "/" + entries[0]
        XCTAssertEqual(rename(backing, scratch + "/saveddir"), 0)
        XCTAssertEqual(Glibc.symlink(canary + "/sub", backing), 0)
        expect(["replaced", "not a directory", "no such entry"]) { _ = try fs.create(parent: sub2, name: name("planted"), mode: 0o644, flags: O_RDWR, caller: me) }
        expect(["replaced", "not a directory", "no such entry"]) { _ = try fs.mkdir(parent: sub2, name: name("planted"), mode: 0o755, caller: me) }
        expect(["replaced", "not a directory", "no such entry"]) { _ = try fs.opendir(sub2) }
        // Looked up afresh, the name is a symlink that leads nowhere we would follow.
        let (again, st) = try fs.lookup(parent: FileSystem.rootID, name: name("sub"))
        XCTAssertTrue(st.isSymlink)
        expect(["damaged"]) { _ = try fs.readlink(again) }
        assertCanaryIntact()
    }

    func testFIFOsAndOversizedInternalFilesAreDamageNotHangs() throws {
        let (sub, _) = try fs.mkdir(parent: FileSystem.rootID, name: name("sub"), mode: 0o755, caller: me)
        let backingSub = try FileManager.default.contentsOfDirectory(atPath: dir).first { !$0.hasPrefix("xtsfs.") }!
        let header = dir + "/" + backingSub + "/" + DirHeader.fileName
        XCTAssertEqual(unlink(header), 0)
        XCTAssertEqual(mkfifo(header, 0o644), 0)
        fs = try FileSystem(cipherDir: dir, keys: fs.keys, readOnly: false, log: { _ in })
        let (again, _) = try fs.lookup(parent: FileSystem.rootID, name: name("sub"))
        _ = sub
        expect(["damaged"]) { _ = try fs.opendir(again) }
        expect(["damaged"]) { _ = try fs.lookup(parent: again, name: name("x")) }
        // A symlink in its place is damage too, and an oversized one.
        XCTAssertEqual(unlink(header), 0)
        XCTAssertEqual(Glibc.symlink(canary + "/file", header), 0)
        expect(["damaged"]) { _ = try fs.opendir(again) }
        XCTAssertEqual(unlink(header), 0)
        XCTAssertTrue(FileManager.default.createFile(atPath: header, contents: Data(count: 1 << 20)))
        expect(["damaged"]) { _ = try fs.opendir(again) }
        assertCanaryIntact()
    }

    func testHugeSparseBackingFileIsDamage() throws {
        // ext4 stops at 16 TiB; tmpfs takes sizes near 2^63, where offset arithmetic would overflow.
        var template = Array("/dev/shm/xtsfs-fs-XXXXXX".utf8CString)
        guard let p = mkdtemp(&template) else { throw XCTSkip("no tmpfs at /dev/shm") }
        let shm = String(cString: p)
        defer { try? FileManager.default.removeItem(atPath: shm) }
        try Sys.atomicWrite(try DirHeader.random(keyGeneration: 1).encode(macKey: fs.keys.metadataMACKey), to: shm + "/" + DirHeader.fileName)
        fs = try FileSystem(cipherDir: shm, keys: fs.keys, readOnly: false, log: { _ in })
        var id: UInt64 = 0
        let entries = try newEntries(in: shm) { id = try makeFile(FileSystem.rootID, "big", "some content") }
        XCTAssertEqual(truncate(shm + "/" + entries[0], 0x7fff_ffff_ffff_f000), 0)
        // Its attributes are still there to see; opening it is EIO, not an overflow trap.
        XCTAssertGreaterThan(try fs.getattr(id, handle: nil).st_size, 1 << 62)
        expect(["damaged"]) { _ = try fs.open(id, flags: O_RDONLY) }
        expect(["damaged"]) { _ = try fs.open(id, flags: O_RDWR) }
        var c = AttributeChanges()
        c.size = 10
        expect(["damaged"]) { _ = try fs.setattr(id, handle: nil, changes: c) }
    }

    func testSwappedLongNameSideFilesAreNotTrusted() throws {
        let long1 = String(repeating: "a", count: 220), long2 = String(repeating: "b", count: 220)
        _ = try makeFile(FileSystem.rootID, long1, "one")
        _ = try makeFile(FileSystem.rootID, long2, "two")
        _ = try makeFile(FileSystem.rootID, "short", "three")
        let records = try FileManager.default.contentsOfDirectory(atPath: dir).filter { $0.hasSuffix(NameCodec.longSuffix) }
        XCTAssertEqual(records.count, 2)
        let p1 = dir + "/" + records[0], p2 = dir + "/" + records[1]
        let c1 = try Data(contentsOf: URL(fileURLWithPath: p1)), c2 = try Data(contentsOf: URL(fileURLWithPath: p2))
        chmod(p1, 0o644); chmod(p2, 0o644)
        try c2.write(to: URL(fileURLWithPath: p1))
        try c1.write(to: URL(fileURLWithPath: p2))
        let h = try fs.opendir(FileSystem.rootID)
        var seen: [String] = []
        try fs.readdir(handle: h, offset: 0) { _, e in seen.append(String(decoding: e.name, as: UTF8.self)); return true }
        fs.releasedir(h)
        XCTAssertEqual(seen.sorted(), [".", "..", "short"], "entries whose side file belongs to another name are skipped")
        XCTAssertEqual(logged.all.filter { $0.contains("belongs to another name") }.count, 2)
    }

    func testClassifierNamesEveryKindOfBackingEntry() {
        XCTAssertEqual(BackingEntry.classify("xtsfs.header"), .volumeHeader(copy: 0))
        XCTAssertEqual(BackingEntry.classify("xtsfs.header2"), .volumeHeader(copy: 1))
        XCTAssertEqual(BackingEntry.classify("xtsfs.dir"), .directoryHeader)
        XCTAssertEqual(BackingEntry.classify("xtsfs.dir.tmp"), .temporary(of: "xtsfs.dir"))
        let hash = String(repeating: "A", count: 43)
        XCTAssertEqual(BackingEntry.classify("xtsfs.long." + hash), .longName("xtsfs.long." + hash))
        XCTAssertEqual(BackingEntry.classify("xtsfs.long." + hash + ".name"), .longNameRecord(entry: "xtsfs.long." + hash))
        XCTAssertEqual(BackingEntry.classify("xtsfs.long." + hash + ".name.tmp"), .temporary(of: "xtsfs.long." + hash + ".name"))
        XCTAssertEqual(BackingEntry.classify("xtsfs.long.short"), .foreign)
        XCTAssertEqual(BackingEntry.classify(String(repeating: "Q", count: 43)), .encryptedName(String(repeating: "Q", count: 43)))
        XCTAssertEqual(BackingEntry.classify(".DS_Store"), .foreign)
        XCTAssertEqual(BackingEntry.classify("notes (conflicted copy).txt"), .foreign)
        XCTAssertEqual(BackingEntry.classify("xtsfs.unknown"), .foreign)
        XCTAssertEqual(BackingEntry.classify("xtsfs.temp"), .tempArea)
        XCTAssertEqual(BackingEntry.classify("xtsfs.cache"), .cacheArea)
        XCTAssertEqual(BackingEntry.classify("xtsfs.cache.purged"), .cacheArea)
        XCTAssertEqual(BackingEntry.classify("xtsfs.cache.key"), .cacheKey)
        XCTAssertEqual(BackingEntry.classify("xtsfs.cache.key.tmp"), .temporary(of: "xtsfs.cache.key"))
        // A DEK rekey's copies (older versions) and its checksum journal.
        XCTAssertEqual(BackingEntry.classify("xtsfs.rekey." + hash), .rekeyCopy(hash: hash))
        XCTAssertEqual(BackingEntry.classify("xtsfs.rekey." + hash + ".tmp"), .temporary(of: "xtsfs.rekey." + hash))
        XCTAssertEqual(BackingEntry.classify("xtsfs.rekey-journal"), .rekeyJournal)
        XCTAssertEqual(BackingEntry.classify("xtsfs.rekey-journal.tmp"), .temporary(of: "xtsfs.rekey-journal"))
        XCTAssertEqual(BackingEntry.classify("xtsfs.rekey-journal2"), .foreign)
        // Temporaries with a random suffix (what every atomic replacement writes now).
        XCTAssertEqual(BackingEntry.classify("xtsfs.dir.tmp.0123456789abcdef"), .temporary(of: "xtsfs.dir"))
        XCTAssertEqual(BackingEntry.classify("xtsfs.header2.tmp.ffffffffffffffff"), .temporary(of: "xtsfs.header2"))
        XCTAssertEqual(BackingEntry.classify("xtsfs.long." + hash + ".name.tmp.00000000000000a0"), .temporary(of: "xtsfs.long." + hash + ".name"))
        XCTAssertEqual(BackingEntry.classify("xtsfs.dir.tmp.0123456789ABCDEF"), .foreign, "upper-case digits are not ours")
        XCTAssertEqual(BackingEntry.classify("xtsfs.dir.tmp.0123456789abcde"), .foreign, "15 digits")
        XCTAssertEqual(BackingEntry.classify("xtsfs.dir.tmp.0123456789abcdef0"), .foreign, "17 digits")
        XCTAssertEqual(BackingEntry.classify("xtsfs.unknown.tmp.0123456789abcdef"), .foreign)
        XCTAssertEqual(BackingEntry.classify(".tmp.0123456789abcdef"), .foreign)
        // What the writers make is what the classifier recognises.
        for base in ["xtsfs.dir", "xtsfs.header", "xtsfs.cache.key"] {
            XCTAssertEqual(BackingEntry.classify(Sys.temporaryName(for: base)), .temporary(of: base))
        }
    }

    func testTemporaryNamesAreUniqueAndAtomicWritesLeaveNone() throws {
        let names = (0..<2000).map { _ in Sys.temporaryName(for: "xtsfs.dir") }
        XCTAssertEqual(Set(names).count, names.count)
        var template = Array("/tmp/xtsfs-tmpnames-XXXXXX".utf8CString)
        let dir = String(cString: mkdtemp(&template)!)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        // An old-style leftover that is a symlink out of the directory is neither followed,
        // nor written, nor needed any more.
        let outside = dir + "-outside"
        XCTAssertTrue(FileManager.default.createFile(atPath: outside, contents: Data("untouched".utf8)))
        defer { unlink(outside) }
        XCTAssertEqual(symlink(outside, dir + "/xtsfs.dir.tmp"), 0)
        // Eight threads replace the same file 50 times each: every write is whole, no
        // temporary is left, none collides (each would throw EEXIST).
        let failures = Mutex<[String]>([])
        DispatchQueue.concurrentPerform(iterations: 8) { t in
            let fd = open(dir, O_RDONLY | O_DIRECTORY)
            defer { close(fd) }
            for i in 0..<50 {
                let bytes = Array(repeating: UInt8(t), count: 100 + i)
                do { try Sys.atomicWrite(bytes, at: fd, "xtsfs.dir", mode: 0o444) } catch { failures.withLock { $0.append("\(error)") } }
                do { try Sys.atomicWrite(bytes, to: dir + "/xtsfs.header", mode: 0o400) } catch { failures.withLock { $0.append("\(error)") } }
            }
        }
        XCTAssertEqual(failures.withLock { $0 }, [])
        let left = try FileManager.default.contentsOfDirectory(atPath: dir).sorted()
        XCTAssertEqual(left, ["xtsfs.dir", "xtsfs.dir.tmp", "xtsfs.header"])
        for name in ["xtsfs.dir", "xtsfs.header"] {
            let bytes = try Sys.readFile(dir + "/" + name)
            XCTAssertTrue(bytes.count >= 100 && bytes.allSatisfy { $0 == bytes[0] }, "\(name) is one writer's whole bytes")
        }
        XCTAssertEqual(try String(contentsOfFile: outside, encoding: .utf8), "untouched")
    }

    // MARK: - hard links

    /// The soak's ENOENT (fsbench's drop_caches beside it): a file with hard links in two
    /// directories is reached by its most recent name; when the kernel forgets the
    /// directory of that name (its entries dropped while the file lives on through the
    /// other name, held open) that name leads nowhere, and open, getattr, setxattr and
    /// link of the file answered ENOENT instead of taking the other name.
    func testHardLinkOutlivesTheDirectoryOfItsLatestName() throws {
        let (sub, _) = try fs.mkdir(parent: FileSystem.rootID, name: name("sub"), mode: 0o755, caller: me)
        let f = try makeFile(sub, "h", "shared")
        _ = try fs.link(f, newParent: FileSystem.rootID, newName: name("h"))
        // Found again through sub: the name in sub comes first now.
        XCTAssertEqual(try fs.lookup(parent: sub, name: name("h")).0, f)
        fs.forget(sub, count: 1)
        XCTAssertNil(fs.table.withLock { $0.nodes[sub] }, "the kernel forgot sub")
        let h = try fs.open(f, flags: O_RDWR)
        XCTAssertEqual(try read(h, 100), name("shared"))
        fs.release(h)
        XCTAssertEqual(try fs.getattr(f, handle: nil).st_nlink, 2)
        try fs.setxattr(f, name: name("user.k"), value: name("v"))
        let (third, _) = try fs.link(f, newParent: FileSystem.rootID, newName: name("third"))
        XCTAssertEqual(third, f)
        // sub looked up again is a new node; its name of the file is back.
        let sub2 = try fs.lookup(parent: FileSystem.rootID, name: name("sub")).0
        XCTAssertNotEqual(sub2, sub)
        XCTAssertEqual(try fs.lookup(parent: sub2, name: name("h")).0, f)
        XCTAssertEqual(try fs.getattr(f, handle: nil).st_nlink, 3)
        // The other names gone, the file is reached through the new node of sub.
        try fs.unlink(parent: FileSystem.rootID, name: name("h"))
        try fs.unlink(parent: FileSystem.rootID, name: name("third"))
        let h2 = try fs.open(f, flags: O_RDONLY)
        XCTAssertEqual(try read(h2, 100), name("shared"))
        fs.release(h2)
    }

    func testNodeTablePassesOverNamesInForgottenDirectories() {
        let root = Identity(dev: 1, ino: 1), d = Identity(dev: 1, ino: 2), f = Identity(dev: 1, ino: 3)
        var t = NodeTable(root: root)
        let dir = t.add(Link(parent: NodeTable.rootID, name: Array("d".utf8), entry: "D"), identity: d, isDirectory: true)
        let top = Link(parent: NodeTable.rootID, name: Array("h".utf8), entry: "H")
        let inD = Link(parent: dir, name: Array("h".utf8), entry: "HD")
        let x = t.add(top, identity: f, isDirectory: false)
        XCTAssertEqual(t.add(inD, identity: f, isDirectory: false), x)
        XCTAssertEqual(t.location(x)?.link, inD)
        XCTAssertTrue(t.forget(dir, 1))
        XCTAssertEqual(t.location(x)?.link, top, "the name in the forgotten directory is passed over")
        // The next registration drops it, so that it never pushes out a live name.
        let dir2 = t.add(Link(parent: NodeTable.rootID, name: Array("d".utf8), entry: "D"), identity: d, isDirectory: true)
        XCTAssertNotEqual(dir2, dir)
        let inD2 = Link(parent: dir2, name: Array("h".utf8), entry: "HD")
        XCTAssertEqual(t.add(inD2, identity: f, isDirectory: false), x)
        XCTAssertEqual(t.nodes[x]?.links, [inD2, top])
    }

    func testHardLinksAreOneNode() throws {
        let a = try makeFile(FileSystem.rootID, "a", "shared")
        let (sub, _) = try fs.mkdir(parent: FileSystem.rootID, name: name("sub"), mode: 0o755, caller: me)
        let (b, st) = try fs.link(a, newParent: sub, newName: name("b"))
        XCTAssertEqual(b, a, "two names of one file are one node")
        XCTAssertEqual(st.st_nlink, 2)
        XCTAssertEqual(try fs.lookup(parent: sub, name: name("b")).0, a)
        expect(["exists"]) { _ = try fs.link(a, newParent: sub, newName: name("b")) }
        expect(["not permitted"]) { _ = try fs.link(sub, newParent: FileSystem.rootID, newName: name("dirlink")) }
        // Written through one name, read through the other.
        let h = try fs.open(a, flags: O_RDWR)
        try write(h, name("SHARED"))
        try fs.unlink(parent: FileSystem.rootID, name: name("a"))
        XCTAssertEqual(try fs.getattr(a, handle: nil).st_nlink, 1, "reached through its other name")
        let h2 = try fs.open(a, flags: O_RDONLY)
        XCTAssertEqual(try read(h2, 100), name("SHARED"))
        fs.release(h2)
        try fs.unlink(parent: sub, name: name("b"))
        // Every name gone: the open handle still serves it.
        XCTAssertEqual(try read(h, 100), name("SHARED"))
        XCTAssertEqual(try fs.getattr(a, handle: nil).st_nlink, 0)
        fs.release(h)
    }

    func testRemovedDirectoryStillAnswersWhileKnown() throws {
        let (d, _) = try fs.mkdir(parent: FileSystem.rootID, name: name("d"), mode: 0o755, caller: me)
        let (e, _) = try fs.mkdir(parent: FileSystem.rootID, name: name("e"), mode: 0o755, caller: me)
        try fs.rmdir(parent: FileSystem.rootID, name: name("d"))
        // As through an open descriptor on ext4: attributes (no links left), xattrs, chmod.
        XCTAssertEqual(try fs.getattr(d, handle: nil).st_nlink, 0)
        try fs.setxattr(d, name: name("user.k"), value: [1])
        XCTAssertEqual(try fs.getxattr(d, name: name("user.k")), [1])
        var c = AttributeChanges()
        c.mode = 0o700
        XCTAssertEqual(try fs.setattr(d, handle: nil, changes: c).st_mode & 0o777, 0o700)
        // A directory replaced by rename is the same.
        let (f, _) = try fs.mkdir(parent: FileSystem.rootID, name: name("f"), mode: 0o755, caller: me)
        try fs.rename(parent: FileSystem.rootID, name: name("f"), newParent: FileSystem.rootID, newName: name("e"), flags: 0)
        XCTAssertEqual(try fs.getattr(e, handle: nil).st_nlink, 0)
        XCTAssertEqual(try fs.lookup(parent: FileSystem.rootID, name: name("e")).0, f)
        // Forgotten, it is gone.
        fs.forget(d, count: 1)
        expect(["no such entry"]) { _ = try fs.getattr(d, handle: nil) }
    }

    /// The names in directory node `d`, through opendir/readdir.
    func listing(_ d: UInt64) throws -> [String] {
        let h = try fs.opendir(d)
        defer { fs.releasedir(h) }
        var out: [String] = []
        try fs.readdir(handle: h, offset: 0) { _, e in out.append(String(decoding: e.name, as: UTF8.self)); return true }
        return out.filter { $0 != "." && $0 != ".." }.sorted()
    }

    /// An online rekey renames a directory's entries while holding the namespace
    /// exclusively; a listing is taken shared with it, so it never sees a directory half
    /// renamed (before, a reader during an online rekey could list a directory as empty).
    func testListingsNeverSeeEntriesMidRename() throws {
        let (d, _) = try fs.mkdir(parent: FileSystem.rootID, name: name("d"), mode: 0o755, caller: me)
        let names = (0..<40).map { "f\($0)" }
        for n in names { _ = try makeFile(d, n, n) }
        let backingDir = try XCTUnwrap(try FileManager.default.contentsOfDirectory(atPath: dir).first {
            var isDir: ObjCBool = false
            return FileManager.default.fileExists(atPath: dir + "/" + $0, isDirectory: &isDir) && isDir.boolValue
        })
        let path = dir + "/" + backingDir
        let entries = try FileManager.default.contentsOfDirectory(atPath: path).filter { !$0.hasPrefix("xtsfs.") }
        XCTAssertEqual(entries.count, names.count)
        let stop = Atomic<Bool>(false)
        let fs = self.fs!
        let mover = Thread {
            // What the rekey does to a directory's names, in the same exclusive hold: every
            // entry moved away, then to its (here: the same) new name.
            while !stop.load(ordering: .relaxed) {
                fs.withNamespaceExclusive {
                    for e in entries { rename(path + "/" + e, path + "/" + e + ".moving") }
                    for e in entries { rename(path + "/" + e + ".moving", path + "/" + e) }
                }
            }
        }
        mover.start()
        defer { stop.store(true, ordering: .relaxed) }
        for _ in 0..<300 {
            XCTAssertEqual(try listing(d), names.sorted())
            // Without OPENDIR, one request of 3 entries at a time, renames in between.
            XCTAssertEqual(try nodeListing(d, batch: 3), Dictionary(uniqueKeysWithValues: (names + [".", ".."]).map { ($0, 1) }))
        }
        stop.store(true, ordering: .relaxed)
        while !mover.isFinished { usleep(1000) }
    }

    /// A listing without OPENDIR (`readdir(node:)`), `batch` entries per request, with
    /// `between` run after each request; returns every name with how often it came.
    func nodeListing(_ d: UInt64, batch: Int, between: () throws -> Void = {}) throws -> [String: Int] {
        var seen: [String: Int] = [:]
        var offset: UInt64 = 0
        while true {
            var n = 0
            try fs.readdir(node: d, offset: offset) { next, e in
                guard n < batch else { return false }
                n += 1
                seen[String(decoding: e.name, as: UTF8.self), default: 0] += 1
                offset = next
                return true
            }
            if n == 0 { return seen }
            try between()
        }
    }

    /// Listings without OPENDIR share the node's latest listing and resume by cookie: two
    /// listers interleaved with each other's restarts (each one a new listing of the node)
    /// and with creates, unlinks and renames of other entries between their requests each
    /// see every untouched entry exactly once, "." and ".." included. An offset that was an
    /// index into the node's listing would skip or repeat entries here.
    func testListingsWithoutOpendirSeeUntouchedEntriesOnce() throws {
        let (d, _) = try fs.mkdir(parent: FileSystem.rootID, name: name("d"), mode: 0o755, caller: me)
        let stable = (0..<300).map { "stable-\($0)" + String(repeating: "s", count: $0 % 7 == 0 ? 180 : $0 % 5) }
        for n in stable { _ = try makeFile(d, n, "x") }
        var churn = (0..<100).map { "churn-\($0)" }
        for n in churn { _ = try makeFile(d, n, "x") }
        var step = 0
        func change() throws {
            step += 1
            // Another entry created, one removed, one renamed: none of them stable.
            _ = try makeFile(d, "new-\(step)", "x")
            if step > 10 { try fs.unlink(parent: d, name: name("new-\(step - 10)")) }
            let i = step % churn.count
            try fs.rename(parent: d, name: name(churn[i]), newParent: d, newName: name(churn[i] + "-r"), flags: 0)
            churn[i] += "-r"
        }
        for round in 0..<3 {
            // B lists alongside A, a request of each in turn, and starts over (offset 0: a
            // new listing of the node, which A's next request then goes on from) whenever it
            // finishes; changes come between the requests.
            var bOffset: UInt64 = 0
            var bSeen: [String: Int] = [:]
            var bDone = 0
            let aSeen = try nodeListing(d, batch: 3 + round) {
                try change()
                var n = 0
                try fs.readdir(node: d, offset: bOffset) { next, e in
                    guard n < 12 else { return false }
                    n += 1
                    bSeen[String(decoding: e.name, as: UTF8.self), default: 0] += 1
                    bOffset = next
                    return true
                }
                if n == 0 {
                    for s in stable + [".", ".."] { XCTAssertEqual(bSeen[s], 1, "lister B, \(s)") }
                    bDone += 1
                    bSeen = [:]
                    bOffset = 0
                }
                try change()
            }
            for s in stable + [".", ".."] { XCTAssertEqual(aSeen[s], 1, "lister A, round \(round), \(s)") }
            XCTAssertTrue(aSeen.values.allSatisfy { $0 == 1 }, "no entry twice")
            XCTAssertGreaterThan(bDone, 0)
        }
        // After the changes, a new listing shows what is there now, and only that.
        let now = try nodeListing(d, batch: 1000)
        XCTAssertEqual(Set(now.keys), Set(stable + churn + (step - 9...step).map { "new-\($0)" } + [".", ".."]))
    }

    /// An offset a listing returned (telldir) resumes the same way later (seekdir), in a
    /// listing with OPENDIR or without, however the node's listing was taken since.
    func testListingOffsetsResumeLater() throws {
        let (d, _) = try fs.mkdir(parent: FileSystem.rootID, name: name("d"), mode: 0o755, caller: me)
        for i in 0..<50 { _ = try makeFile(d, "f\(i)", "x") }
        var order: [(UInt64, String)] = []
        try fs.readdir(node: d, offset: 0) { next, e in order.append((next, String(decoding: e.name, as: UTF8.self))); return true }
        XCTAssertEqual(order.count, 52)
        XCTAssertEqual(Set(order.map(\.1)).count, 52)
        let h = try fs.opendir(d)
        defer { fs.releasedir(h) }
        for i in [0, 1, 17, 50, 51] {
            var rest: [String] = [], restByHandle: [String] = []
            try fs.readdir(node: d, offset: order[i].0) { _, e in rest.append(String(decoding: e.name, as: UTF8.self)); return true }
            try fs.readdir(handle: h, offset: order[i].0) { _, e in restByHandle.append(String(decoding: e.name, as: UTF8.self)); return true }
            XCTAssertEqual(rest, order[(i + 1)...].map(\.1))
            XCTAssertEqual(restByHandle, rest)
        }
        // A removed entry's offset still resumes after it.
        try fs.unlink(parent: d, name: name(order[20].1))
        var rest: [String] = []
        try fs.readdir(node: d, offset: order[20].0) { _, e in rest.append(String(decoding: e.name, as: UTF8.self)); return true }
        XCTAssertEqual(rest, order[21...].map(\.1))
    }

    /// An empty directory lists "." and ".."; one removed while being listed ends its
    /// listing (no error, nothing more), as on ext4.
    func testEmptyAndRemovedDirectoriesWithoutOpendir() throws {
        let (e, _) = try fs.mkdir(parent: FileSystem.rootID, name: name("empty"), mode: 0o755, caller: me)
        XCTAssertEqual(try nodeListing(e, batch: 1), [".": 1, "..": 1])
        let (d, _) = try fs.mkdir(parent: FileSystem.rootID, name: name("d"), mode: 0o755, caller: me)
        for i in 0..<20 { _ = try makeFile(d, "f\(i)", "x") }
        var removed = false
        let seen = try nodeListing(d, batch: 4) {
            guard !removed else { return }
            removed = true
            for i in 0..<20 { try fs.unlink(parent: d, name: name("f\(i)")) }
            try fs.rmdir(parent: FileSystem.rootID, name: name("d"))
        }
        XCTAssertEqual(seen.values.reduce(0, +), 4, "nothing after the removal")
        XCTAssertEqual(try nodeListing(d, batch: 4), [:])
    }

    func testDirectoryHeadersAreKnownPastTheirNodesUntilRemoved() throws {
        let (d, _) = try fs.mkdir(parent: FileSystem.rootID, name: name("d"), mode: 0o755, caller: me)
        _ = try makeFile(d, "inside", "x")
        let backing = try XCTUnwrap(try FileManager.default.contentsOfDirectory(atPath: dir).first {
            var isDir: ObjCBool = false
            return FileManager.default.fileExists(atPath: dir + "/" + $0, isDirectory: &isDir) && isDir.boolValue
        })
        let fd = open(dir + "/" + backing, O_PATH | O_DIRECTORY)
        XCTAssertGreaterThanOrEqual(fd, 0)
        let birth = try XCTUnwrap(Sys.birthIdentity(fd), "this test needs a backing filesystem with birth times")
        close(fd)
        // Read once from xtsfs.dir (the node forgotten first), then known by birth.
        fs.forget(d, count: 1)
        let d1 = try fs.lookup(parent: FileSystem.rootID, name: name("d")).0
        XCTAssertEqual(try listing(d1), ["inside"])
        XCTAssertNotNil(fs.knownDirHeaders.withLock { $0[birth] })
        // Forgotten again, with its header now garbage behind our back: still known, so the
        // names still decrypt (the ID of a directory never changes).
        fs.forget(d1, count: 1)
        let header = dir + "/" + backing + "/" + DirHeader.fileName
        chmod(header, 0o644)
        try Data(repeating: 0x41, count: 64).write(to: URL(fileURLWithPath: header))
        let d2 = try fs.lookup(parent: FileSystem.rootID, name: name("d")).0
        XCTAssertEqual(try listing(d2), ["inside"])
        // Removing it through us forgets it.
        try fs.unlink(parent: d2, name: name("inside"))
        try fs.rmdir(parent: FileSystem.rootID, name: name("d"))
        XCTAssertNil(fs.knownDirHeaders.withLock { $0[birth] })
        // -o shared reads the header at each use: the garbage is damage there.
        let (e, _) = try fs.mkdir(parent: FileSystem.rootID, name: name("e"), mode: 0o755, caller: me)
        fs.forget(e, count: 1)
        XCTAssertEqual(try listing(try fs.lookup(parent: FileSystem.rootID, name: name("e")).0), [])
        XCTAssertFalse(fs.knownDirHeaders.withLock { $0.isEmpty })
        let eBacking = try XCTUnwrap(try FileManager.default.contentsOfDirectory(atPath: dir).first {
            var isDir: ObjCBool = false
            return FileManager.default.fileExists(atPath: dir + "/" + $0, isDirectory: &isDir) && isDir.boolValue
        })
        fs = try FileSystem(cipherDir: dir, keys: fs.keys, readOnly: false, log: { _ in })
        fs.sharedStorage = true
        let knownBefore = fs.knownDirHeaders.withLock { $0.count }  // the root's, read by init
        let eHeader = dir + "/" + eBacking + "/" + DirHeader.fileName
        chmod(eHeader, 0o644)
        try Data(repeating: 0x41, count: 64).write(to: URL(fileURLWithPath: eHeader))
        let e2 = try fs.lookup(parent: FileSystem.rootID, name: name("e")).0
        expect(["damaged"]) { _ = try self.listing(e2) }
        XCTAssertEqual(fs.knownDirHeaders.withLock { $0.count }, knownBefore)
    }

    func testIntegrityLengthsAreRememberedAcrossOurOwnChangesOnly() throws {
        let ifs = try FileSystem(cipherDir: dir, keys: fs.keys, readOnly: false, unitTags: .ghashAES256, log: { _ in })
        fs = ifs
        let (id, _, h) = try ifs.create(parent: FileSystem.rootID, name: name("f"), mode: 0o644, flags: O_RDWR, caller: me)
        try write(h, [UInt8](repeating: 7, count: 10_000))
        ifs.release(h)
        // tar's sequence after the data: chown, chmod, utimens; each moves the ctime.
        var c = AttributeChanges()
        c.uid = geteuid()
        _ = try ifs.setattr(id, handle: nil, changes: c)
        c = AttributeChanges()
        c.mode = 0o600
        _ = try ifs.setattr(id, handle: nil, changes: c)
        c = AttributeChanges()
        c.mtime = timespec(tv_sec: 1_000_000, tv_nsec: 0)
        XCTAssertEqual(try ifs.setattr(id, handle: nil, changes: c).st_size, 10_000)
        let backing = try XCTUnwrap(try FileManager.default.contentsOfDirectory(atPath: dir).first { !$0.hasPrefix("xtsfs.") })
        var st = stat()
        XCTAssertEqual(lstat(dir + "/" + backing, &st), 0)
        // Remembered for the backing file as it is now: `stat` needs no header read.
        let known = try XCTUnwrap(ifs.integritySizes.withLock { $0[Identity(st)] })
        XCTAssertTrue(known.matches(st))
        XCTAssertEqual(known.plain, 10_000)
        XCTAssertEqual(try ifs.getattr(id, handle: nil).st_size, 10_000)
        // Changed behind our back (bytes appended): no longer trusted; the header decides.
        let fd = open(dir + "/" + backing, O_WRONLY | O_APPEND)
        XCTAssertGreaterThanOrEqual(fd, 0)
        XCTAssertEqual(Glibc.write(fd, [UInt8](repeating: 1, count: 5000), 5000), 5000)
        close(fd)
        XCTAssertEqual(lstat(dir + "/" + backing, &st), 0)
        XCTAssertFalse(try XCTUnwrap(ifs.integritySizes.withLock { $0[Identity(st)] }).matches(st))
        XCTAssertEqual(try ifs.getattr(id, handle: nil).st_size, 10_000)
    }

    func testRenameOverAnotherNameOfTheSameFileDoesNothing() throws {
        let a = try makeFile(FileSystem.rootID, "a", "x")
        _ = try fs.link(a, newParent: FileSystem.rootID, newName: name("b"))
        try fs.rename(parent: FileSystem.rootID, name: name("a"), newParent: FileSystem.rootID, newName: name("b"), flags: 0)
        XCTAssertEqual(try fs.lookup(parent: FileSystem.rootID, name: name("a")).0, a)
        XCTAssertEqual(try fs.lookup(parent: FileSystem.rootID, name: name("b")).1.st_nlink, 2)
    }

    // MARK: - lookups racing removals

    /// A lookup stats a name, then registers what it found. A removal of that name in
    /// between (the soak's reader listing a directory while a worker unlinks in it) must not
    /// leave the node table finding a deleted object by its identity: its inode number is
    /// reused at once, and a new file would be given the stale node (and, in the kernel, the
    /// stale inode). Nor may a rename in between leave the old name on the node.
    func testLookupsRacingRemovalsLeaveNoStaleIdentity() throws {
        let (p, _) = try fs.mkdir(parent: FileSystem.rootID, name: name("p"), mode: 0o755, caller: me)
        let done = Atomic<Bool>(false)
        let failures = Mutex<[String]>([])
        let found = Atomic<Int>(0)
        let fs = self.fs!
        DispatchQueue.concurrentPerform(iterations: 2) { t in
            if t == 0 {
                let me = Caller(uid: geteuid(), gid: getegid())
                defer { done.store(true, ordering: .releasing) }
                for _ in 0..<1000 {
                    do {
                        _ = try fs.mknod(parent: p, name: Array("a".utf8), mode: S_IFREG | 0o644, rdev: 0, caller: me)
                        try fs.unlink(parent: p, name: Array("a".utf8))
                        _ = try fs.mkdir(parent: p, name: Array("d".utf8), mode: 0o755, caller: me)
                        try fs.rmdir(parent: p, name: Array("d".utf8))
                        _ = try fs.mknod(parent: p, name: Array("r".utf8), mode: S_IFREG | 0o644, rdev: 0, caller: me)
                        try fs.rename(parent: p, name: Array("r".utf8), newParent: p, newName: Array("s".utf8), flags: 0)
                        try fs.unlink(parent: p, name: Array("s".utf8))
                    } catch { failures.withLock { $0.append("\(error)") } }
                }
                return
            }
            while !done.load(ordering: .acquiring) {
                for n in ["a", "d", "r", "s"] {
                    if (try? fs.lookup(parent: p, name: Array(n.utf8))) != nil { found.add(1, ordering: .relaxed) }
                }
            }
        }
        XCTAssertEqual(failures.withLock { $0 }, [])
        XCTAssertGreaterThan(found.load(ordering: .relaxed), 0, "the lookups never found anything: no race was run")
        // Everything but the root and p is gone: nothing may be found by identity, and no
        // node may keep a name.
        let pIdentity = try XCTUnwrap(fs.table.withLock { $0.nodes[p]?.identity })
        fs.table.withLock { t in
            XCTAssertEqual(Set(t.byIdentity.values), [FileSystem.rootID, p], "nodes of deleted objects are still found by identity")
            for (id, n) in t.nodes where id != FileSystem.rootID && id != p {
                XCTAssertEqual(n.links, [], "node \(id) keeps a removed name")
            }
            XCTAssertEqual(t.byIdentity[pIdentity], p)
        }
    }

    func testNodeTableRetractAndRacedRemoval() {
        let root = Identity(dev: 1, ino: 1), a = Identity(dev: 1, ino: 2)
        var t = NodeTable(root: root)
        let link = Link(parent: NodeTable.rootID, name: Array("a".utf8), entry: "E")
        // An unlink detaches node x; a racing lookup registers the object again (node z)
        // before the unlink records that the name is gone.
        let x = t.add(link, identity: a, isDirectory: false)
        let before = t.changes
        XCTAssertEqual(t.detach(a), x)
        XCTAssertNotEqual(t.changes, before, "detach counts as a change")
        let z = t.add(link, identity: a, isDirectory: false)
        XCTAssertNotEqual(z, x)
        t.unlinked(parent: NodeTable.rootID, name: Array("a".utf8), identity: a, detached: x)
        XCTAssertNil(t.byIdentity[a], "the racing lookup's node is not found by the deleted object's identity")
        XCTAssertEqual(t.nodes[z]?.links, [])
        // Retracting a lookup: the node it created goes; one that had lookups keeps them.
        let y = t.add(link, identity: a, isDirectory: false)
        _ = t.add(link, identity: a, isDirectory: false)
        t.retract(y, link, identity: a)
        XCTAssertEqual(t.nodes[y]?.lookups, 1)
        XCTAssertEqual(t.nodes[y]?.links, [])
        t.retract(y, link, identity: a)
        XCTAssertNil(t.nodes[y])
        XCTAssertNil(t.byIdentity[a])
        t.retract(NodeTable.rootID, link, identity: root)
        XCTAssertNotNil(t.nodes[NodeTable.rootID], "the root is never retracted")
    }

    // MARK: - rename exchange

    func testRenameExchangeSwapsObjects() throws {
        let f = try makeFile(FileSystem.rootID, "f", "file")
        let (d, _) = try fs.mkdir(parent: FileSystem.rootID, name: name("d"), mode: 0o755, caller: me)
        _ = try makeFile(d, "inside", "in")
        try fs.rename(parent: FileSystem.rootID, name: name("f"), newParent: FileSystem.rootID, newName: name("d"), flags: UInt32(XTS_RENAME_EXCHANGE))
        let (nowD, st) = try fs.lookup(parent: FileSystem.rootID, name: name("d"))
        XCTAssertEqual(nowD, f)
        XCTAssertTrue(st.isRegular)
        let (nowF, st2) = try fs.lookup(parent: FileSystem.rootID, name: name("f"))
        XCTAssertEqual(nowF, d)
        XCTAssertTrue(st2.isDirectory)
        // The directory kept its ID: its entry still decrypts under the new name.
        XCTAssertEqual(try fs.lookup(parent: nowF, name: name("inside")).1.st_size, 2)
        expect(["no such entry"]) {
            try fs.rename(parent: FileSystem.rootID, name: name("f"), newParent: FileSystem.rootID, newName: name("missing"), flags: UInt32(XTS_RENAME_EXCHANGE))
        }
    }

    // MARK: - extended attributes

    func testXattrsRoundTripEncrypted() throws {
        let id = try makeFile(FileSystem.rootID, "f", "x")
        try fs.setxattr(id, name: name("user.colour"), value: name("midnight blue"))
        try fs.setxattr(id, name: name("user.empty"), value: [])
        XCTAssertEqual(try fs.getxattr(id, name: name("user.colour")), name("midnight blue"))
        XCTAssertEqual(try fs.getxattr(id, name: name("user.empty")), [])
        XCTAssertEqual(Set(try fs.listxattr(id).map { String(decoding: $0, as: UTF8.self) }), ["user.colour", "user.empty"])
        expect(["no such attribute"]) { _ = try fs.getxattr(id, name: name("user.missing")) }
        expect(["not supported"]) { _ = try fs.getxattr(id, name: name("security.selinux")) }
        expect(["not supported"]) { try fs.setxattr(id, name: name("security.selinux"), value: [1]) }
        expect(["exists", "File exists"]) { try fs.setxattr(id, name: name("user.colour"), value: [1], flags: .create) }
        expect(["no such attribute"]) { try fs.setxattr(id, name: name("user.new"), value: [1], flags: .replace) }
        // Both flags: as ext4, an existing attribute is EEXIST and a missing one ENODATA.
        expect(["exists", "File exists"]) { try fs.setxattr(id, name: name("user.colour"), value: [1], flags: [.create, .replace]) }
        expect(["no such attribute"]) { try fs.setxattr(id, name: name("user.new"), value: [1], flags: [.create, .replace]) }
        expect(["invalid argument"]) { try fs.setxattr(id, name: name("user."), value: [1]) }
        expect(["invalid argument"]) { _ = try fs.getxattr(id, name: name("user.")) }
        expect(["out of range"]) { try fs.setxattr(id, name: Array("user.".utf8) + Array(repeating: 0x61, count: 161), value: [1]) }
        expect(["too large"]) { try fs.setxattr(id, name: name("user.big"), value: [UInt8](repeating: 1, count: 70000)) }
        try fs.removexattr(id, name: name("user.colour"))
        expect(["no such attribute"]) { _ = try fs.getxattr(id, name: name("user.colour")) }
        // The backing side holds neither the name nor the value in clear.
        let backing = try FileManager.default.contentsOfDirectory(atPath: dir).first { !$0.hasPrefix("xtsfs.") }!
        let raw = try listBackingXattrs(dir + "/" + backing)
        XCTAssertEqual(raw.count, 1)
        XCTAssertFalse(raw.joined().contains("empty"))
    }

    func listBackingXattrs(_ path: String) throws -> [String] {
        var buf = [CChar](repeating: 0, count: 4096)
        let n = CSysShim.listxattr(path, &buf, buf.count)
        XCTAssertGreaterThanOrEqual(n, 0)
        return buf[0..<max(n, 0)].split(separator: 0).map { String(decoding: $0.map { UInt8(bitPattern: $0) }, as: UTF8.self) }
    }

    func testXattrValueMovedToAnotherNameIsDamage() throws {
        let id = try makeFile(FileSystem.rootID, "f", "x")
        try fs.setxattr(id, name: name("user.a"), value: name("secret a"))
        try fs.setxattr(id, name: name("user.b"), value: name("secret b"))
        let backing = dir + "/" + (try FileManager.default.contentsOfDirectory(atPath: dir).first { !$0.hasPrefix("xtsfs.") }!)
        let names = try listBackingXattrs(backing)
        var a = [UInt8](repeating: 0, count: 256)
        let n = CSysShim.getxattr(backing, names[0], &a, a.count)
        XCTAssertGreaterThan(n, 0)
        XCTAssertEqual(CSysShim.setxattr(backing, names[1], a, n, 0), 0)
        let results = [try? fs.getxattr(id, name: name("user.a")), try? fs.getxattr(id, name: name("user.b"))]
        XCTAssertEqual(results.compactMap { $0 }.count, 1, "the moved value no longer opens")
    }

    // MARK: - fallocate

    func testFallocateModes() throws {
        let (id, _, h) = try fs.create(parent: FileSystem.rootID, name: name("f"), mode: 0o644, flags: O_RDWR, caller: me)
        defer { fs.release(h) }
        var data = [UInt8](repeating: 0, count: 20000)
        for i in data.indices { data[i] = UInt8(truncatingIfNeeded: i * 7 + 1) }
        try write(h, data)
        // Punch a hole across unit boundaries: partial units rewritten, whole ones freed.
        try fs.fallocate(handle: h, mode: XTS_FALLOC_PUNCH_HOLE | XTS_FALLOC_KEEP_SIZE, offset: 1000, length: 10000)
        var expected = data
        for i in 1000..<11000 { expected[i] = 0 }
        XCTAssertEqual(try read(h, 30000), expected)
        XCTAssertEqual(try fs.getattr(id, handle: h).st_size, 20000)
        // ZERO_RANGE past the end grows the file.
        try fs.fallocate(handle: h, mode: XTS_FALLOC_ZERO_RANGE, offset: 19000, length: 2000)
        for i in 19000..<20000 { expected[i] = 0 }
        expected += [UInt8](repeating: 0, count: 1000)
        XCTAssertEqual(try read(h, 30000), expected)
        // Mode 0 grows; KEEP_SIZE does not.
        try fs.fallocate(handle: h, mode: XTS_FALLOC_KEEP_SIZE, offset: 0, length: 100_000)
        XCTAssertEqual(try fs.getattr(id, handle: h).st_size, 21000)
        try fs.fallocate(handle: h, mode: 0, offset: 0, length: 50000)
        XCTAssertEqual(try fs.getattr(id, handle: h).st_size, 50000)
        expected += [UInt8](repeating: 0, count: 29000)
        XCTAssertEqual(try read(h, 60000), expected)
        expect(["not supported"]) { try fs.fallocate(handle: h, mode: XTS_FALLOC_PUNCH_HOLE, offset: 0, length: 10) }
        expect(["not supported"]) { try fs.fallocate(handle: h, mode: 0x08, offset: 0, length: 4096) }
    }

    func testPunchHoleInTinyAndMergedTailFiles() throws {
        for size in [7, 4100, 8195] {
            let (_, _, h) = try fs.create(parent: FileSystem.rootID, name: name("t\(size)"), mode: 0o644, flags: O_RDWR, caller: me)
            let data = [UInt8](repeating: 0xAB, count: size)
            try write(h, data)
            try fs.fallocate(handle: h, mode: XTS_FALLOC_PUNCH_HOLE | XTS_FALLOC_KEEP_SIZE, offset: 2, length: Int64(size))
            XCTAssertEqual(try read(h, size + 10), [0xAB, 0xAB] + [UInt8](repeating: 0, count: size - 2), "size \(size)")
            fs.release(h)
        }
    }

    // MARK: - symlinks

    func testLongSymlinkTargetsUseTheLinkStore() throws {
        let short = [UInt8](repeating: 0x73, count: 3039), long = (0..<4095).map { UInt8(0x61 + $0 % 26) }
        let (s, _) = try fs.symlink(target: short, parent: FileSystem.rootID, name: name("short"), caller: me)
        let (l, st) = try fs.symlink(target: long, parent: FileSystem.rootID, name: name("long"), caller: me)
        XCTAssertEqual(st.st_size, 4095)
        XCTAssertEqual(try fs.readlink(s), short)
        XCTAssertEqual(try fs.readlink(l), long)
        let store = dir + "/" + NameCodec.linkStore
        XCTAssertEqual(try FileManager.default.contentsOfDirectory(atPath: store).count, 1, "only the long target is stored")
        // A hard link elsewhere keeps the stored target; the last name removes it.
        let (sub, _) = try fs.mkdir(parent: FileSystem.rootID, name: name("sub"), mode: 0o755, caller: me)
        _ = try fs.link(l, newParent: sub, newName: name("again"))
        try fs.unlink(parent: FileSystem.rootID, name: name("long"))
        XCTAssertEqual(try fs.readlink(l), long)
        XCTAssertEqual(try fs.getattr(l, handle: nil).st_size, 4095)
        try fs.unlink(parent: sub, name: name("again"))
        XCTAssertEqual(try FileManager.default.contentsOfDirectory(atPath: store).count, 0)
        // Replacing a long symlink by rename removes its stored target too.
        _ = try fs.symlink(target: long, parent: FileSystem.rootID, name: name("l2"), caller: me)
        try fs.rename(parent: FileSystem.rootID, name: name("short"), newParent: FileSystem.rootID, newName: name("l2"), flags: 0)
        XCTAssertEqual(try FileManager.default.contentsOfDirectory(atPath: store).count, 0)
        expect(["name too long"]) { _ = try fs.symlink(target: long + [0x61], parent: FileSystem.rootID, name: name("x"), caller: me) }
    }

    func testTamperedStoredTargetIsDamage() throws {
        let long = [UInt8](repeating: 0x62, count: 3500)
        let (l, _) = try fs.symlink(target: long, parent: FileSystem.rootID, name: name("long"), caller: me)
        let store = dir + "/" + NameCodec.linkStore
        let file = store + "/" + (try FileManager.default.contentsOfDirectory(atPath: store)[0])
        chmod(file, 0o644)
        var bytes = [UInt8](try Data(contentsOf: URL(fileURLWithPath: file)))
        bytes[100] = bytes[100] == 0x41 ? 0x42 : 0x41
        try Data(bytes).write(to: URL(fileURLWithPath: file))
        expect(["damaged"]) { _ = try fs.readlink(l) }
        unlink(file)
        XCTAssertEqual(Glibc.symlink(canary + "/file", file), 0)
        expect(["damaged"]) { _ = try fs.readlink(l) }
        assertCanaryIntact()
    }

    // MARK: - paths

    func testDeepTreeBeyondPathMax() throws {
        var parent = FileSystem.rootID
        for i in 0..<25 {
            parent = try fs.mkdir(parent: parent, name: name(String(repeating: Character(UnicodeScalar(UInt8(97 + i % 26))), count: 200)), mode: 0o755, caller: me).0
        }
        let leaf = try makeFile(parent, "leaf", "deep content")
        // A new filesystem over the same directory reaches it again one name at a time,
        // with a directory cache far smaller than the depth.
        fs = try FileSystem(cipherDir: dir, keys: fs.keys, readOnly: false, dirCacheCapacity: 4, log: { _ in })
        parent = FileSystem.rootID
        for i in 0..<25 {
            parent = try fs.lookup(parent: parent, name: name(String(repeating: Character(UnicodeScalar(UInt8(97 + i % 26))), count: 200))).0
        }
        let (found, _) = try fs.lookup(parent: parent, name: name("leaf"))
        _ = leaf
        let h = try fs.open(found, flags: O_RDONLY)
        XCTAssertEqual(try read(h, 100), name("deep content"))
        fs.release(h)
    }
}
