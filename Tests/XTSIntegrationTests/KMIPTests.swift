import Foundation
import XCTest
import XTSVolume
#if canImport(Glibc)
import Glibc
#endif

/// The KMIP provider against a real PyKMIP server on 127.0.0.1, started by each test with
/// its own CA, server and client certificates (made here with openssl), its own database
/// and a free port, and stopped (SIGTERM, then SIGKILL) in teardown even on failure.
final class KMIPTests: VolumeTestCase {
    static let venv = ProcessInfo.processInfo.environment["XTSFS_PYKMIP_VENV"] ?? "/var/cache/xtsfs/pykmip-venv"
    var server: Process?
    var port = 0
    var dir: String { scratch + "/kmip" }
    var options: [String] { ["--kmip", "127.0.0.1:\(port)", "--kmip-cert", dir + "/client.crt", "--kmip-key", dir + "/client.key", "--kmip-ca", dir + "/ca.crt"] }

    override func setUpWithError() throws {
        try super.setUpWithError()
        guard FileManager.default.isExecutableFile(atPath: Self.venv + "/bin/pykmip-server") else {
            throw XCTSkip("PyKMIP is not installed in \(Self.venv) (scripts/setup installs it)")
        }
        try FileManager.default.createDirectory(atPath: dir + "/policies", withIntermediateDirectories: true)
        try """
        [server]
        basicConstraints=CA:FALSE
        keyUsage=digitalSignature,keyEncipherment
        extendedKeyUsage=serverAuth
        subjectAltName=IP:127.0.0.1
        [client]
        basicConstraints=CA:FALSE
        keyUsage=digitalSignature,keyEncipherment
        extendedKeyUsage=clientAuth
        """.write(toFile: dir + "/ext.cnf", atomically: true, encoding: .utf8)
        let certs = """
        cd '\(dir)' && openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.crt -days 2 -subj /CN=xtsfs-test-ca && \
        for n in server client; do openssl req -newkey rsa:2048 -nodes -keyout $n.key -out $n.csr -subj /CN=$n && \
        openssl x509 -req -in $n.csr -CA ca.crt -CAkey ca.key -CAcreateserial -out $n.crt -days 2 -extfile ext.cnf -extensions $n || exit 1; done
        """
        XCTAssertEqual(Harness.shell("(\(certs)) >/dev/null 2>&1"), 0, "making test certificates")
        try startServer()
    }

    override func tearDown() {
        stopServer()
        super.tearDown()
    }

    /// A port the kernel just gave out, so two runs never collide.
    static func freePort() -> Int {
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        defer { close(fd) }
        var addr = sockaddr_in()
        addr.sin_family = sa_family_t(AF_INET)
        addr.sin_addr.s_addr = inet_addr("127.0.0.1")
        var len = socklen_t(MemoryLayout<sockaddr_in>.size)
        _ = withUnsafeMutablePointer(to: &addr) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, len) } }
        _ = withUnsafeMutablePointer(to: &addr) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(fd, $0, &len) } }
        return Int(UInt16(bigEndian: addr.sin_port))
    }

    func startServer() throws {
        port = Self.freePort()
        try """
        [server]
        hostname=127.0.0.1
        port=\(port)
        certificate_path=\(dir)/server.crt
        key_path=\(dir)/server.key
        ca_path=\(dir)/ca.crt
        auth_suite=TLS1.2
        policy_path=\(dir)/policies
        enable_tls_client_auth=True
        logging_level=INFO
        database_path=\(dir)/pykmip.db
        """.write(toFile: dir + "/server.conf", atomically: true, encoding: .utf8)
        let p = Process()
        // `timeout` bounds the server's life even if this process dies without teardown.
        p.executableURL = URL(fileURLWithPath: "/usr/bin/timeout")
        p.arguments = ["--kill-after=5", "300", Self.venv + "/bin/pykmip-server", "-f", dir + "/server.conf", "-l", dir + "/server.log"]
        p.standardInput = FileHandle.nullDevice
        p.standardOutput = FileHandle.nullDevice
        p.standardError = FileHandle.nullDevice
        try p.run()
        server = p
        let deadline = Date().addingTimeInterval(30)
        while Date() < deadline {
            if Harness.shell("bash -c 'exec 3<>/dev/tcp/127.0.0.1/\(port)' 2>/dev/null") == 0 { return }
            if !p.isRunning { break }
            usleep(200_000)
        }
        stopServer()
        throw NSError(domain: "KMIPTests", code: 1, userInfo: [NSLocalizedDescriptionKey: "the PyKMIP server did not start within 30 s (see \(dir)/server.log)"])
    }

    func stopServer() {
        guard let p = server else { return }
        server = nil
        // `timeout` forwards SIGTERM to the server; if that is not enough, kill both by PID.
        let children = Self.children(of: p.processIdentifier)
        if p.isRunning {
            kill(p.processIdentifier, SIGTERM)
            let deadline = Date().addingTimeInterval(10)
            while p.isRunning && Date() < deadline { usleep(50_000) }
            if p.isRunning { kill(p.processIdentifier, SIGKILL) }
        }
        p.waitUntilExit()
        for c in children where kill(c, 0) == 0 { kill(c, SIGKILL) }
    }

    static func children(of parent: Int32) -> [Int32] {
        let pids = (try? FileManager.default.contentsOfDirectory(atPath: "/proc"))?.compactMap { Int32($0) } ?? []
        return pids.filter { pid in
            guard let stat = try? String(contentsOfFile: "/proc/\(pid)/stat", encoding: .utf8),
                  let close = stat.lastIndex(of: ")") else { return false }
            let fields = stat[stat.index(after: close)...].split(separator: " ")
            return fields.count > 1 && Int32(fields[1]) == parent
        }
    }

    func xtsfs(_ args: [String], _ expected: ExitStatus = .success, file: StaticString = #filePath, line: UInt = #line) -> Harness.Result {
        let r = Harness.run(args)
        XCTAssertEqual(r.status, expected.rawValue, "xtsfs \(args.joined(separator: " ")): \(r.stderr)", file: file, line: line)
        return r
    }

    func keyID(_ stderr: String) -> String? {
        guard let r = stderr.range(of: "--kmip-key-id ") else { return nil }
        return String(stderr[r.upperBound...].prefix { $0 != "." && $0 != "\n" })
    }

    /// Revokes (and destroys) a key with PyKMIP's own client.
    func revoke(_ id: String, destroy: Bool = false) {
        let script = """
        import sys
        from kmip.pie import client
        from kmip import enums
        c = client.ProxyKmipClient(hostname="127.0.0.1", port=\(port), cert="\(dir)/client.crt", key="\(dir)/client.key", ca="\(dir)/ca.crt", config_file="/dev/null")
        c.open()
        c.revoke(enums.RevocationReasonCode.KEY_COMPROMISE, "\(id)")
        \(destroy ? "c.destroy(\"\(id)\")" : "")
        """
        try? script.write(toFile: dir + "/revoke.py", atomically: true, encoding: .utf8)
        XCTAssertEqual(Harness.shell("timeout 30 \(Self.venv)/bin/python \(dir)/revoke.py >/dev/null 2>&1"), 0)
    }

    func testInitWithServerKeyMountAndSecondProvider() throws {
        let r = xtsfs(["init", cipher, "--generate"] + options)
        let id = try XCTUnwrap(keyID(r.stderr), r.stderr)
        XCTAssertTrue(xtsfs(["keys", "list", cipher]).stdout.contains("keyID=\(id)"))
        _ = xtsfs(["mount", cipher, mnt, "--kmip-key-id", id] + options)
        try write(mnt + "/k", [7, 7])
        unmount()
        // A passphrase slot beside it: both open the volume.
        _ = xtsfs(["keys", "add", cipher, "--kmip-key-id", id, "--new-passfile", passfile] + options + Self.cheapKDF)
        mount()
        XCTAssertEqual(try read(mnt + "/k"), [7, 7])
        unmount()
        // Another key on the server is not this volume's: no slot names it.
        _ = xtsfs(["mount", cipher, mnt, "--kmip-key-id", "999"] + options, .wrongKey)
    }

    func testRevokedAndDestroyedKeysFailWithTheirOwnMessage() throws {
        let r = xtsfs(["init", cipher, "--passfile", passfile] + Self.cheapKDF)
        _ = r
        let added = xtsfs(["keys", "add", cipher, "--passfile", passfile, "--generate"] + options.map { $0.hasPrefix("--kmip") ? "--new-" + $0.dropFirst(2) : $0 })
        let id = try XCTUnwrap(keyID(added.stderr), added.stderr)
        _ = xtsfs(["mount", cipher, mnt, "--kmip-key-id", id] + options)
        unmount()
        revoke(id)
        var m = xtsfs(["mount", cipher, mnt, "--kmip-key-id", id] + options, .providerFailed)
        XCTAssertTrue(m.stderr.contains("revoked"), m.stderr)
        revoke(id, destroy: true)
        m = xtsfs(["mount", cipher, mnt, "--kmip-key-id", id] + options, .providerFailed)
        XCTAssertTrue(m.stderr.contains("KMIP server"), m.stderr)
        XCTAssertFalse(Harness.isMounted(mnt))
        XCTAssertTrue(xtsfs(["audit", cipher]).stdout.contains("kmip  failed"))
        // The passphrase slot still opens it.
        mount()
        unmount()
    }

    func testServerDownIsAClearErrorWithinBoundedTime() throws {
        let r = xtsfs(["init", cipher, "--generate"] + options)
        let id = try XCTUnwrap(keyID(r.stderr), r.stderr)
        stopServer()
        let start = Date()
        let m = xtsfs(["mount", cipher, mnt, "--kmip-key-id", id] + options, .providerFailed)
        XCTAssertLessThan(Date().timeIntervalSince(start), 15)
        XCTAssertTrue(m.stderr.contains("cannot connect to the KMIP server"), m.stderr)
        // A client certificate the server's CA did not sign is refused at the handshake.
        _ = xtsfs(["mount", cipher, mnt, "--kmip-key-id", id, "--kmip", "127.0.0.1:1", "--kmip-cert", dir + "/missing.crt",
                   "--kmip-key", dir + "/client.key", "--kmip-ca", dir + "/ca.crt"], .badInput)
    }
}
