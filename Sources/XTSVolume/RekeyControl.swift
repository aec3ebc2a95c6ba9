import CSysShim
import Synchronization
import XTSContent
import XTSCrypto
import XTSFormat
import XTSFS
import XTSKeys
import XTSSystem
#if canImport(Glibc)
import Glibc
#endif

/// The daemon's control channel for an online DEK rekey: `xtsfs rekey CIPHERDIR --dek`
/// of a mounted volume asks the daemon serving it to sweep in the background while the
/// mount goes on serving, and polls it for progress.
///
/// As for `CacheControl`: a Unix socket in the abstract namespace named after CIPHERDIR's
/// real path; only a peer with the daemon's user ID, or root, is heard (SO_PEERCRED). One
/// request per connection, one line each:
///
/// - `rekey-start HEX`: HEX is the final header (the new generation only, the slot that
///   opened rewrapped with the new key) sealed with the new key: the command writes the
///   rekey record (and so the new key, wrapped under the old) into the header first, and
///   the daemon, which holds the old key, reads the new one from there, checks that the
///   final header verifies under it (only a holder of a key of the volume can make it),
///   starts serving with both generations and starts the sweep. Answered `OK` or
///   `E<exit status> <message>`; a sweep already running is not started twice.
/// - `rekey-status`: `S <state> <phase> <files> <filesTotal> <bytes> <bytesTotal>
///   <deferred> <pass>`, state `idle`, `running`, `done` or `failed`; for a failure a
///   second line `F <message>`.
///
/// The sweep (`RekeySweep` with the filesystem attached) runs in passes until a pass
/// leaves nothing for later (files open for writing are left for the next pass, which
/// starts a second later) and the read-only verification finds nothing of the old
/// generation. Then the daemon writes the final header and forgets the old key. Nothing
/// of this depends on the command that asked: interrupting it leaves the sweep running.
/// A daemon killed mid-sweep leaves a volume in the middle of a rekey, which mounts again
/// (finishing the file copies left) and resumes with the same command.
///
/// `@unchecked Sendable`: mutable state is in `state`; the socket and threads are set
/// before the threads start and read after they are joined.
final class RekeyControl: @unchecked Sendable {
    let cipherDir: String
    let fs: FileSystem
    let log: @Sendable (String) -> Void
    /// Steps with pauses between passes; longer waits are cut short by `stop`.
    static let passPause: UInt32 = 1_000_000
    static let maxPasses = 10_000
    static let stackSize = 256 << 20

    enum Phase: String { case idle, running, done, failed }

    struct State {
        /// The generation the header names now (the old one until a rekey is done).
        var current: KeySet
        var phase: Phase = .idle
        var progress = RekeyProgress(phase: "scan", filesDone: 0, filesTotal: 0, bytesDone: 0, bytesTotal: 0)
        var deferred = 0
        var pass = 0
        var failure = ""
    }

    let state: Mutex<State>
    let stopped = Atomic<Bool>(false)
    private var socketFD: Int32 = -1
    private var thread = pthread_t()
    private var started = false
    private var sweepThread = pthread_t()
    private let sweepStarted = Atomic<Bool>(false)
    /// Told the new generation once a rekey is done (the cache area purges itself). Set
    /// before `start`.
    var finished: (@Sendable (KeySet) -> Void)?

    init(cipherDir: String, keys: KeySet, fs: FileSystem, log: @escaping @Sendable (String) -> Void) {
        self.cipherDir = cipherDir
        self.fs = fs
        self.log = log
        state = Mutex(State(current: keys))
    }

    static let startRequest = "rekey-start"
    static let statusRequest = "rekey-status"

    static func socketName(_ cipherDir: String) -> [UInt8] {
        let hash = SHA256.hash(Array(cipherDir.utf8)).prefix(16).map { String($0, radix: 16).leftPadded(2) }.joined()
        return [0] + Array("xtsfs-rekey-\(hash)".utf8)
    }

    func start() {
        let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { log("no rekey control socket (\(String(cString: strerror(errno)))); online rekey refused"); return }
        var (addr, len) = CacheControl.address(RekeyControl.socketName(cipherDir))
        let bound = withUnsafePointer(to: &addr) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, len) } }
        guard bound == 0, listen(fd, 4) == 0 else {
            log("cannot listen on the rekey control socket (\(String(cString: strerror(errno)))); online rekey refused")
            Sys.close(fd)
            return
        }
        socketFD = fd
        let me = Unmanaged.passRetained(self).toOpaque()
        if pthread_create(&thread, nil, { arg in
            let me = Unmanaged<RekeyControl>.fromOpaque(arg!).takeRetainedValue()
            me.serve()
            return nil
        }, me) == 0 {
            started = true
        } else {
            Unmanaged<RekeyControl>.fromOpaque(me).release()
            Sys.close(fd)
            socketFD = -1
        }
    }

    /// Stops listening, and stops a running sweep at its next step (every state it can
    /// stop in is one a rerun resumes from).
    func stop() {
        stopped.store(true, ordering: .relaxed)
        if socketFD >= 0 { _ = shutdown(socketFD, Int32(SHUT_RDWR)) }
        if started { pthread_join(thread, nil) }
        if socketFD >= 0 { Sys.close(socketFD) }
        if sweepStarted.load(ordering: .acquiring) { pthread_join(sweepThread, nil) }
    }

    private func serve() {
        while !stopped.load(ordering: .relaxed) {
            let c = accept(socketFD, nil, nil)
            if c < 0 {
                if errno == EINTR || errno == ECONNABORTED { continue }
                return
            }
            _ = fcntl(c, F_SETFD, FD_CLOEXEC)
            handle(c)
            Sys.close(c)
        }
    }

    private func handle(_ c: Int32) {
        var cred: (Int32, UInt32, UInt32) = (0, 0, 0)
        var len = socklen_t(MemoryLayout<(Int32, UInt32, UInt32)>.size)
        guard getsockopt(c, SOL_SOCKET, SO_PEERCRED, &cred, &len) == 0, cred.1 == geteuid() || cred.1 == 0 else {
            CacheControl.send(c, "E\(ExitStatus.refused.rawValue) not the daemon's user")
            return
        }
        // One line, at most 64 KiB (a header in hex is a few KiB).
        var line: [UInt8] = []
        var buf = [UInt8](repeating: 0, count: 4096)
        while line.count < 65536 && !line.contains(UInt8(ascii: "\n")) {
            let n = buf.withUnsafeMutableBytes { Glibc.read(c, $0.baseAddress, $0.count) }
            if n < 0 && errno == EINTR { continue }
            if n <= 0 { break }
            line += buf[0..<n]
        }
        let text = String(decoding: line, as: UTF8.self).trimmingSuffix("\n")
        if text == RekeyControl.statusRequest {
            CacheControl.send(c, statusLine())
        } else if text.hasPrefix(RekeyControl.startRequest + " ") {
            do {
                try begin(hexHeader: String(text.dropFirst(RekeyControl.startRequest.count + 1)))
                CacheControl.send(c, "OK")
            } catch {
                CacheControl.send(c, "E\(error.exitStatus.rawValue) \(error)")
            }
        } else {
            CacheControl.send(c, "E\(ExitStatus.usage.rawValue) unknown request")
        }
    }

    func statusLine() -> String {
        state.withLock { s in
            let p = s.progress
            var line = "S \(s.phase.rawValue) \(p.phase.replacingAll(" ", with: "_")) \(p.filesDone) \(p.filesTotal) \(p.bytesDone) \(p.bytesTotal) \(s.deferred) \(s.pass)"
            if s.phase == .failed { line += "\nF " + s.failure.replacingAll("\n", with: " ") }
            return line
        }
    }

    // MARK: - the sweep

    /// Checks the request against the header on disk and starts the sweep thread.
    func begin(hexHeader: String) throws(VolumeError) {
        guard let bytes = RekeyControl.unhex(hexHeader) else { throw .badInput("the final header is not hex") }
        let final: VolumeHeader
        do { final = try VolumeHeader.decode(bytes) } catch { throw .badInput("the final header does not parse: \(error)") }
        let current = state.withLock { $0.current }
        // The header on disk: the rekey record the command wrote, under the key we hold.
        let loaded = try Volume.load(cipherDir)
        guard let header = loaded.candidates.map(\.header).first(where: { (try? Keyring.verify($0, keys: current)) != nil }) else {
            throw .refused("no header copy of \(cipherDir) verifies under the key this daemon serves with (remount, then rekey again)")
        }
        guard let new = try Rekey.pendingKeys(header, old: current) else {
            throw .refused("the header of \(cipherDir) records no DEK rekey")
        }
        guard final.volumeID == header.volumeID, final.keyGeneration == new.generation, final.rekeyRecord.isEmpty,
              final.features.isDisjoint(with: [.rekeyInProgress, .rekeyJournal, .rekeyIntegrityJournal]), (try? Keyring.verify(final, keys: new)) != nil else {
            throw .refused("the final header does not verify under the rekey's new key")
        }
        let go = state.withLock { s -> Bool in
            if s.phase == .running { return false }
            s.phase = .running
            s.failure = ""
            s.pass = 0
            s.deferred = 0
            s.progress = RekeyProgress(phase: "scan", filesDone: 0, filesTotal: 0, bytesDone: 0, bytesTotal: 0)
            return true
        }
        guard go else { return }
        // New objects are of the new generation from here on.
        fs.addGeneration(new)
        let job = SweepJob(control: self, old: current, new: new, final: final)
        let arg = Unmanaged.passRetained(job).toOpaque()
        if sweepStarted.load(ordering: .acquiring) { pthread_join(sweepThread, nil) }
        // The walk recurses once per directory level (up to RekeySweep.maxDepth): a stack
        // of its own, larger than a thread's default.
        var attr = pthread_attr_t()
        pthread_attr_init(&attr)
        defer { pthread_attr_destroy(&attr) }
        pthread_attr_setstacksize(&attr, RekeyControl.stackSize)
        guard pthread_create(&sweepThread, &attr, { arg in
            let job = Unmanaged<SweepJob>.fromOpaque(arg!).takeRetainedValue()
            job.control.runSweep(job)
            return nil
        }, arg) == 0 else {
            Unmanaged<SweepJob>.fromOpaque(arg).release()
            state.withLock { $0.phase = .failed; $0.failure = "cannot start the sweep thread" }
            throw .failure("cannot start the sweep thread")
        }
        sweepStarted.store(true, ordering: .releasing)
    }

    final class SweepJob: @unchecked Sendable {
        let control: RekeyControl
        let old: KeySet, new: KeySet
        let final: VolumeHeader
        init(control: RekeyControl, old: KeySet, new: KeySet, final: VolumeHeader) {
            self.control = control; self.old = old; self.new = new; self.final = final
        }
    }

    func runSweep(_ job: SweepJob) {
        do {
            try sweepUntilVerified(job)
            // The command numbered the final header after the rekey record's header.
            try KeySlots.write(cipherDir, job.final, keys: job.new, base: job.final.sequence)
            fs.dropOlderGenerations()
            state.withLock { s in
                s.current = job.new
                s.progress.phase = "done"
                s.phase = .done
            }
            log("online rekey of \(cipherDir) finished: generation \(job.old.generation) -> \(job.new.generation)")
            finished?(job.new)
        } catch {
            state.withLock { s in
                s.phase = .failed
                s.failure = "\(error)"
            }
            log("online rekey of \(cipherDir) stopped: \(error)")
        }
    }

    struct Failure: Error, CustomStringConvertible {
        var description: String
    }

    func sweepUntilVerified(_ job: SweepJob) throws {
        let rootFD: Int32
        do { rootFD = try Sys.open(cipherDir, XTS_O_PATH | O_DIRECTORY) } catch { throw Failure(description: "cannot open \(cipherDir): \(error)") }
        defer { Sys.close(rootFD) }
        let sweep = RekeySweep(old: job.old, new: job.new, unitTags: fs.unitTags, failpoint: Failpoint(), report: { [unowned self] p in
            self.state.withLock { $0.progress = p }
        })
        sweep.rootFD = rootFD
        sweep.listingManifests = fs.listingManifests
        sweep.fs = fs
        sweep.shouldStop = { [unowned self] in self.stopped.load(ordering: .relaxed) }
        for pass in 1...RekeyControl.maxPasses {
            state.withLock { $0.pass = pass }
            sweep.deferred = 0
            do {
                try sweep.run(root: rootFD)
                try sweep.exclusive { () throws(RekeySweep.SweepError) in try sweep.reencryptXattrs(rootFD, what: "/") }
            } catch {
                sweep.abandonBatch()
                throw Failure(description: "\(error)")
            }
            let deferred = sweep.deferred
            state.withLock { $0.deferred = deferred }
            if deferred > 0 {
                // Files open for writing (or changed under the sweep): again in a moment.
                state.withLock { $0.progress.phase = "waiting for \(deferred) busy objects" }
                if !pause() { throw Failure(description: "\(RekeySweep.SweepError.stopped)") }
                continue
            }
            state.withLock { $0.progress.phase = "verify" }
            var found: [String] = []
            var links = Set<String>()
            sweep.verify(rootFD, path: "/", old: &found, links: &links)
            if found.isEmpty {
                dropOldStoredTargets(rootFD, old: job.old, new: job.new)
                sweep.failpoint.step("sweep verified")
                return
            }
            // Something old came back into a part already swept (moved there meanwhile).
        }
        throw Failure(description: "the sweep did not converge after \(RekeyControl.maxPasses) passes")
    }

    /// Sleeps between passes; false when asked to stop.
    func pause() -> Bool {
        for _ in 0..<10 {
            if stopped.load(ordering: .relaxed) { return false }
            usleep(RekeyControl.passPause / 10)
        }
        return !stopped.load(ordering: .relaxed)
    }

    /// Link-store files whose target opens only with the old key: no symlink points to them
    /// once the sweep is verified. (Online, a link-store file made meanwhile may not be
    /// pointed to yet, but it is of the new generation and stays.)
    func dropOldStoredTargets(_ rootFD: Int32, old: KeySet, new: KeySet) {
        guard let store = try? Sys.openPath(rootFD, NameCodec.linkStore, directory: true) else { return }
        defer { Sys.close(store) }
        let oldNames = NameCodec(keys: old), newNames = NameCodec(keys: new)
        fs.withNamespaceExclusive {
            for e in (try? Sys.listDirectory(store)) ?? [] {
                guard let bytes = try? Sys.readSmallFile(store, e.name, limit: 3 * NameCodec.maxBackingTarget) else { continue }
                if (try? newNames.decryptTarget(bytes)) == nil, (try? oldNames.decryptTarget(bytes)) != nil { _ = unlinkat(store, e.name, 0) }
            }
        }
    }

    // MARK: - the client side

    /// One request to the daemon serving CIPHERDIR on this machine; its answer (lines).
    static func request(cipherDir: String, _ text: String) throws(VolumeError) -> [String] {
        try request(cipherDir: cipherDir, text, peer: nil)
    }

    /// The process ID of the daemon that answers on CIPHERDIR's control socket (the one
    /// an online rekey goes through; of two mounts of one CIPHERDIR on this machine, the
    /// first), from the socket's peer credentials.
    static func daemonPID(cipherDir: String) throws(VolumeError) -> Int32 {
        var pid: Int32 = 0
        _ = try request(cipherDir: cipherDir, statusRequest, peer: &pid)
        guard pid > 0 else { throw .failure("cannot tell which process answers on the rekey control socket") }
        return pid
    }

    private static func request(cipherDir: String, _ text: String, peer: UnsafeMutablePointer<Int32>?) throws(VolumeError) -> [String] {
        let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { throw .failure("socket: \(String(cString: strerror(errno)))") }
        defer { Sys.close(fd) }
        var (addr, len) = CacheControl.address(socketName(cipherDir))
        let r = withUnsafePointer(to: &addr) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, len) } }
        guard r == 0 else {
            throw .refused("\(cipherDir) is mounted, but its daemon does not answer on its rekey control socket (\(String(cString: strerror(errno)))); unmount it and run the rekey offline")
        }
        if let peer {
            // struct ucred: pid, uid, gid of the process that listens.
            var cred: (Int32, UInt32, UInt32) = (0, 0, 0)
            var credLen = socklen_t(MemoryLayout<(Int32, UInt32, UInt32)>.size)
            peer.pointee = getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &credLen) == 0 ? cred.0 : 0
        }
        CacheControl.send(fd, text)
        var reply = [UInt8]()
        var buf = [UInt8](repeating: 0, count: 4096)
        while true {
            let n = buf.withUnsafeMutableBytes { Glibc.read(fd, $0.baseAddress, $0.count) }
            if n < 0 && errno == EINTR { continue }
            if n <= 0 { break }
            reply += buf[0..<n]
        }
        return String(decoding: reply, as: UTF8.self).split(separator: "\n").map(String.init)
    }

    struct Status {
        var phase: Phase
        var progress: RekeyProgress
        var deferred: Int
        var pass: Int
        var failure: String?
    }

    static func status(cipherDir: String) throws(VolumeError) -> Status {
        let lines = try request(cipherDir: cipherDir, statusRequest)
        let f = lines.first?.split(separator: " ").map(String.init) ?? []
        guard f.count == 9, f[0] == "S", let phase = Phase(rawValue: f[1]),
              let files = Int(f[3]), let filesTotal = Int(f[4]), let bytes = Int64(f[5]), let bytesTotal = Int64(f[6]),
              let deferred = Int(f[7]), let pass = Int(f[8]) else {
            throw .failure("the daemon's answer to a rekey status request is not understood")
        }
        let failure = lines.dropFirst().first { $0.hasPrefix("F ") }.map { String($0.dropFirst(2)) }
        return Status(phase: phase, progress: RekeyProgress(phase: f[2].replacingAll("_", with: " "), filesDone: files, filesTotal: filesTotal,
                                                            bytesDone: bytes, bytesTotal: bytesTotal),
                      deferred: deferred, pass: pass, failure: failure)
    }

    static func start(cipherDir: String, final: [UInt8]) throws(VolumeError) {
        let lines = try request(cipherDir: cipherDir, startRequest + " " + final.map { String($0, radix: 16).leftPadded(2) }.joined())
        let text = lines.first ?? ""
        if text == "OK" { return }
        if text.hasPrefix("E"), let space = text.firstIndex(of: " "), let code = Int32(text.dropFirst().prefix(upTo: space)) {
            throw VolumeError.fromStatus(code, String(text[text.index(after: space)...]))
        }
        throw .failure("the daemon gave no answer to the rekey request")
    }

    static func unhex(_ s: String) -> [UInt8]? {
        let u = Array(s.utf8)
        guard u.count % 2 == 0 else { return nil }
        var out: [UInt8] = []
        out.reserveCapacity(u.count / 2)
        var i = 0
        while i < u.count {
            guard let b = UInt8(String(decoding: u[i..<i + 2], as: UTF8.self), radix: 16) else { return nil }
            out.append(b)
            i += 2
        }
        return out
    }
}
