import Foundation
import XCTest

/// Passphrases typed at a terminal: a pseudo-terminal driven by a small Python script
/// (Fixtures/pty_prompt.py) answers the prompts or presses Ctrl-C.
final class TerminalTests: VolumeTestCase {
    struct Session: Decodable {
        var status: Int32
        var shown: String
        var echo: Bool
    }

    func drive(_ mode: String, _ args: [String]) throws -> Session {
        guard let script = Bundle.module.url(forResource: "Fixtures", withExtension: nil)?.appendingPathComponent("pty_prompt.py").path else {
            throw XCTSkip("pty driver missing")
        }
        let p = Process()
        p.executableURL = URL(fileURLWithPath: "/usr/bin/env")
        p.arguments = ["python3", script, mode, Harness.binary] + args
        let out = Pipe()
        p.standardOutput = out
        p.standardInput = FileHandle.nullDevice
        try p.run()
        let data = out.fileHandleForReading.readDataToEndOfFile()
        p.waitUntilExit()
        return try JSONDecoder().decode(Session.self, from: data)
    }

    func testInitAsksTwiceWithoutEcho() throws {
        let s = try drive("answer:typed at the keyboard,typed at the keyboard", ["init", cipher] + Self.cheapKDF)
        XCTAssertEqual(s.status, 0, s.shown)
        XCTAssertTrue(s.shown.contains("New passphrase:"), s.shown)
        XCTAssertTrue(s.shown.contains("Repeat passphrase:"), s.shown)
        XCTAssertFalse(s.shown.contains("typed at the keyboard"), "the passphrase was echoed: \(s.shown)")
        XCTAssertTrue(s.echo)
        XCTAssertTrue(FileManager.default.fileExists(atPath: cipher + "/xtsfs.header"))
        // The same passphrase typed at mount opens it; a wrong one does not.
        let wrong = try drive("answer:something else", ["mount", cipher, mnt])
        XCTAssertEqual(wrong.status, 12, wrong.shown)
        XCTAssertTrue(wrong.echo)
        let right = try drive("answer:typed at the keyboard", ["mount", cipher, mnt])
        XCTAssertEqual(right.status, 0, right.shown)
        XCTAssertTrue(Harness.isMounted(mnt))
        unmount()
    }

    func testMismatchAndEmptyRefused() throws {
        let s = try drive("answer:one,two", ["init", cipher] + Self.cheapKDF)
        XCTAssertEqual(s.status, 16, s.shown)
        XCTAssertTrue(s.shown.contains("do not match"), s.shown)
        let e = try drive("answer:,", ["init", cipher] + Self.cheapKDF)
        XCTAssertEqual(e.status, 16, e.shown)
        XCTAssertFalse(FileManager.default.fileExists(atPath: cipher + "/xtsfs.header"))
    }

    func testCtrlCAtThePromptRestoresEcho() throws {
        let s = try drive("interrupt", ["init", cipher] + Self.cheapKDF)
        XCTAssertEqual(s.status, -SIGINT, s.shown)
        XCTAssertTrue(s.echo, "Ctrl-C at the prompt left the terminal without echo")
        XCTAssertFalse(FileManager.default.fileExists(atPath: cipher + "/xtsfs.header"))
    }

    func testMountChecksPathsBeforeAsking() throws {
        initVolume()
        let s = try drive("answer:never asked", ["mount", cipher, scratch + "/missing"])
        XCTAssertEqual(s.status, 14, s.shown)
        XCTAssertFalse(s.shown.contains("assphrase:"), "asked for a passphrase before checking the mount point: \(s.shown)")
    }
}
