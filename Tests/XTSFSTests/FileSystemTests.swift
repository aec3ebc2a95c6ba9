import Foundation
import XCTest
import XTSCrypto
import XTSFormat
import XTSKeys
import XTSSystem
@testable import XTSFS

/// The filesystem layer on its own: node IDs and plaintext names over a backing
/// directory, no FUSE and no mount.
final class FileSystemTests: XCTestCase {
    var dir = ""
    var fs: FileSystem!
    let me = Caller(uid: geteuid(), gid: getegid())

    override func setUpWithError() throws {
        var template = Array("/tmp/xtsfs-fs-XXXXXX".utf8CString)
        dir = String(cString: mkdtemp(&template)!)
        let keys = try KeySet.generate(generation: 1, volumeID: try Random.bytes(16))
        try Sys.atomicWrite(try DirHeader.random(keyGeneration: 1).encode(macKey: keys.metadataMACKey), to: dir + "/" + DirHeader.fileName)
        fs = try FileSystem(cipherDir: dir, keys: keys, readOnly: false, log: { _ in })
    }

    override func tearDown() {
        fs = nil
        try? FileManager.default.removeItem(atPath: dir)
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

    func testCreateWriteLookupRead() throws {
        let (id, st, h) = try fs.create(parent: FileSystem.rootID, name: name("hello.txt"), mode: 0o644, flags: O_RDWR, caller: me)
        XCTAssertEqual(st.st_size, 0)
        try write(h, name("hello, world"))
        fs.release(h)
        let (id2, st2) = try fs.lookup(parent: FileSystem.rootID, name: name("hello.txt"))
        XCTAssertEqual(id2, id, "the same name gives the same node while it is known")
        XCTAssertEqual(st2.st_size, 12)
        let h2 = try fs.open(id2, flags: O_RDONLY)
        XCTAssertEqual(try read(h2, 100), name("hello, world"))
        fs.release(h2)
        // The backing directory holds the encrypted name only.
        let backing = try FileManager.default.contentsOfDirectory(atPath: dir).filter { !$0.hasPrefix("xtsfs.") }
        XCTAssertEqual(backing.count, 1)
        XCTAssertFalse(backing[0].contains("hello"))
    }

    /// A write of nothing (FUSE does not send one, a direct caller may) changes nothing, on an
    /// empty file (no header, no crypto state) and on one with contents; it crashed once.
    func testEmptyWriteChangesNothing() throws {
        let (id, _, h) = try fs.create(parent: FileSystem.rootID, name: name("empty"), mode: 0o644, flags: O_RDWR, caller: me)
        try write(h, [], at: 0)
        try write(h, [], at: 5000)
        XCTAssertEqual(try fs.getattr(id, handle: nil).st_size, 0)
        try write(h, name("abc"))
        try write(h, [], at: 10)
        XCTAssertEqual(try fs.getattr(id, handle: nil).st_size, 3)
        XCTAssertEqual(try read(h, 100), name("abc"))
        fs.release(h)
    }

    func testErrorsAreTyped() throws {
        XCTAssertThrowsError(try fs.lookup(parent: FileSystem.rootID, name: name("missing"))) {
            guard case .notFound = $0 as? FSError else { return XCTFail("\($0)") }
        }
        _ = try fs.mkdir(parent: FileSystem.rootID, name: name("d"), mode: 0o755, caller: me)
        XCTAssertThrowsError(try fs.mkdir(parent: FileSystem.rootID, name: name("d"), mode: 0o755, caller: me)) {
            guard case .exists = $0 as? FSError else { return XCTFail("\($0)") }
        }
        XCTAssertThrowsError(try fs.lookup(parent: FileSystem.rootID, name: Array(repeating: 0x61, count: 256))) {
            guard case .nameTooLong = $0 as? FSError else { return XCTFail("\($0)") }
        }
        XCTAssertThrowsError(try fs.read(handle: 999_999, offset: 0, into: UnsafeMutableRawBufferPointer.allocate(byteCount: 1, alignment: 1))) {
            guard case .badHandle = $0 as? FSError else { return XCTFail("\($0)") }
        }
    }

    func testRenameMovesTheNodeAndDetachesTheTarget() throws {
        let (dirID, _) = try fs.mkdir(parent: FileSystem.rootID, name: name("sub"), mode: 0o755, caller: me)
        let (a, _, ha) = try fs.create(parent: FileSystem.rootID, name: name("a"), mode: 0o644, flags: O_RDWR, caller: me)
        try write(ha, name("AAA"))
        fs.release(ha)
        let (b, _, hb) = try fs.create(parent: dirID, name: name("b"), mode: 0o644, flags: O_RDWR, caller: me)
        fs.release(hb)
        try fs.rename(parent: FileSystem.rootID, name: name("a"), newParent: dirID, newName: name("b"), flags: 0)
        // The moved node keeps its ID and now answers at the new place; the replaced one is gone.
        let (found, st) = try fs.lookup(parent: dirID, name: name("b"))
        XCTAssertEqual(found, a)
        XCTAssertEqual(st.st_size, 3)
        XCTAssertThrowsError(try fs.getattr(b, handle: nil))
        XCTAssertThrowsError(try fs.lookup(parent: FileSystem.rootID, name: name("a")))
        // A directory with an entry is not empty; once emptied, rmdir works.
        XCTAssertThrowsError(try fs.rmdir(parent: FileSystem.rootID, name: name("sub"))) {
            guard case .notEmpty = $0 as? FSError else { return XCTFail("\($0)") }
        }
        try fs.unlink(parent: dirID, name: name("b"))
        try fs.rmdir(parent: FileSystem.rootID, name: name("sub"))
    }

    func testReaddirDecryptsNamesAndSkipsOurFiles() throws {
        for n in ["one", "two", String(repeating: "l", count: 200)] {
            let (_, _, h) = try fs.create(parent: FileSystem.rootID, name: name(n), mode: 0o644, flags: O_RDWR, caller: me)
            fs.release(h)
        }
        let h = try fs.opendir(FileSystem.rootID)
        var seen: [String] = []
        try fs.readdir(handle: h, offset: 0) { _, e in seen.append(String(decoding: e.name, as: UTF8.self)); return true }
        fs.releasedir(h)
        XCTAssertEqual(seen.sorted(), [".", "..", "one", String(repeating: "l", count: 200), "two"].sorted())
        // Resuming at an offset (the cookie of the last entry taken) continues where the last
        // batch stopped.
        let h2 = try fs.opendir(FileSystem.rootID)
        var first: [String] = [], rest: [String] = [], last: UInt64 = 0
        try fs.readdir(handle: h2, offset: 0) { next, e in
            guard first.count < 3 else { return false }
            first.append(String(decoding: e.name, as: UTF8.self))
            last = next
            return true
        }
        try fs.readdir(handle: h2, offset: last) { _, e in rest.append(String(decoding: e.name, as: UTF8.self)); return true }
        fs.releasedir(h2)
        XCTAssertEqual(rest.count, 2)
        XCTAssertEqual((first + rest).sorted(), seen.sorted())
    }

    func testReadOnlyFilesystemRefusesChanges() throws {
        let ro = try FileSystem(cipherDir: dir, keys: fs.keys, readOnly: true, log: { _ in })
        XCTAssertThrowsError(try ro.mkdir(parent: FileSystem.rootID, name: name("x"), mode: 0o755, caller: me)) {
            guard case .readOnly = $0 as? FSError else { return XCTFail("\($0)") }
        }
    }
}
