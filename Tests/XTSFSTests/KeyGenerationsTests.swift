import Foundation
import XCTest
import XTSCrypto
import XTSFormat
import XTSKeys
import XTSSystem
@testable import XTSFS

/// A filesystem holding two key generations (a volume in the middle of a DEK rekey):
/// objects of the old one read, new ones written with the new one, each name present once.
final class KeyGenerationsTests: XCTestCase {
    var dir = ""
    var old: KeySet!
    var new: KeySet!
    let me = Caller(uid: geteuid(), gid: getegid())

    override func setUpWithError() throws {
        var template = Array("/tmp/xtsfs-gen-XXXXXX".utf8CString)
        dir = String(cString: mkdtemp(&template)!)
        let volumeID = try Random.bytes(16)
        old = try KeySet.generate(generation: 1, volumeID: volumeID)
        new = try KeySet.generate(generation: 2, volumeID: volumeID)
        try Sys.atomicWrite(try DirHeader.random(keyGeneration: 1).encode(macKey: old.metadataMACKey), to: dir + "/" + DirHeader.fileName)
    }

    override func tearDown() { try? FileManager.default.removeItem(atPath: dir) }

    func name(_ s: String) -> [UInt8] { Array(s.utf8) }

    func listing(_ fs: FileSystem, _ id: UInt64) throws -> [String] {
        let h = try fs.opendir(id)
        defer { fs.releasedir(h) }
        var out: [String] = []
        try fs.readdir(handle: h, offset: 0) { _, e in out.append(String(decoding: e.name, as: UTF8.self)); return true }
        return out.filter { $0 != "." && $0 != ".." }.sorted()
    }

    func contents(_ fs: FileSystem, _ id: UInt64) throws -> [UInt8] {
        let h = try fs.open(id, flags: O_RDONLY)
        defer { fs.release(h) }
        var buf = [UInt8](repeating: 0, count: 1000)
        let n = try buf.withUnsafeMutableBytes { try fs.read(handle: h, offset: 0, into: $0) }
        return Array(buf.prefix(n))
    }

    func testOldObjectsReadAndNewOnesWrittenWithTheNewGeneration() throws {
        // Generation 1 alone: a file, a directory with a file, a symlink, an xattr.
        var fs: FileSystem! = try FileSystem(cipherDir: dir, keys: old, readOnly: false, log: { _ in })
        let (f, _, h) = try fs.create(parent: FileSystem.rootID, name: name("old.txt"), mode: 0o644, flags: O_RDWR, caller: me)
        _ = try name("old contents").withUnsafeBytes { try fs.write(handle: h, offset: 0, data: $0) }
        fs.release(h)
        try fs.setxattr(f, name: name("user.k"), value: name("old value"))
        let (d, _) = try fs.mkdir(parent: FileSystem.rootID, name: name("d"), mode: 0o755, caller: me)
        let (_, _, h2) = try fs.create(parent: d, name: name("inner"), mode: 0o644, flags: O_RDWR, caller: me)
        fs.release(h2)
        _ = try fs.symlink(target: name("old.txt"), parent: FileSystem.rootID, name: name("link"), caller: me)
        fs = nil

        // The new generation alone opens none of it (the root's header is of generation 1).
        XCTAssertThrowsError(try FileSystem(cipherDir: dir, keys: new, readOnly: false, log: { _ in }))

        fs = try FileSystem(cipherDir: dir, keys: new, olderKeys: [old], readOnly: false, log: { _ in })
        XCTAssertEqual(try listing(fs, FileSystem.rootID), ["d", "link", "old.txt"])
        let (f2, st) = try fs.lookup(parent: FileSystem.rootID, name: name("old.txt"))
        XCTAssertEqual(st.st_size, 12)
        XCTAssertEqual(try contents(fs, f2), name("old contents"))
        XCTAssertEqual(try fs.getxattr(f2, name: name("user.k")), name("old value"))
        let (l, _) = try fs.lookup(parent: FileSystem.rootID, name: name("link"))
        XCTAssertEqual(try fs.readlink(l), name("old.txt"))
        let (d2, _) = try fs.lookup(parent: FileSystem.rootID, name: name("d"))
        XCTAssertEqual(try listing(fs, d2), ["inner"])

        // Creating over an old name is EEXIST; a new file and xattr are of generation 2.
        XCTAssertThrowsError(try fs.create(parent: FileSystem.rootID, name: name("old.txt"), mode: 0o644, flags: O_RDWR, caller: me)) {
            XCTAssertEqual(($0 as? FSError).map { "\($0)" }, "\(FSError.exists)")
        }
        let (n, _, h3) = try fs.create(parent: FileSystem.rootID, name: name("new.txt"), mode: 0o644, flags: O_RDWR, caller: me)
        _ = try name("new").withUnsafeBytes { try fs.write(handle: h3, offset: 0, data: $0) }
        fs.release(h3)
        try fs.setxattr(f2, name: name("user.k"), value: name("replaced"), flags: .replace)
        XCTAssertEqual(try fs.listxattr(f2), [name("user.k")], "the old-key attribute went when the new one was set")
        XCTAssertEqual(try fs.getxattr(f2, name: name("user.k")), name("replaced"))
        // A rename onto an old name replaces that entry (one entry per name).
        try fs.rename(parent: FileSystem.rootID, name: name("new.txt"), newParent: FileSystem.rootID, newName: name("old.txt"), flags: 0)
        XCTAssertEqual(try listing(fs, FileSystem.rootID), ["d", "link", "old.txt"])
        XCTAssertEqual(try contents(fs, n), name("new"))
        fs = nil

        // The file written now has a header of generation 2 (and one entry per name is left).
        let backing = try FileManager.default.contentsOfDirectory(atPath: dir).filter { !$0.hasPrefix("xtsfs.") }
        XCTAssertEqual(backing.count, 3)
        let files = try backing.map { try Sys.lstat(dir + "/" + $0) }.enumerated().filter { $0.element.isRegular }.map { backing[$0.offset] }
        XCTAssertEqual(files.count, 1)
        let raw = [UInt8](try Data(contentsOf: URL(fileURLWithPath: dir + "/" + files[0])))
        XCTAssertEqual(Array(raw[4..<8]), [2, 0, 0, 0])
    }
}
