import Synchronization
import XTSContent
import XTSCrypto
import XTSFS
import XTSFuse
import XTSKeys
import XTSSystem
#if canImport(Glibc)
import Glibc
#endif

/// The daemon's control channel for its cache area: `xtsfs cache purge` of a mounted
/// cache asks the daemon, which holds the cache key and serves the area, to purge it.
///
/// The channel is a Unix socket in the abstract namespace (no file to plant or leave
/// behind), named after CIPHERDIR's real path; only a peer with the daemon's user ID, or
/// root, is heard (SO_PEERCRED). One request per connection: `purge-cache\n`, answered
/// `OK\n` or `E<exit status> <message>\n`.
///
/// A purge: the key file goes first (crypto-shredding: once it is deleted and the
/// directory synced, nothing on disk opens the old ciphertext); the old area is renamed
/// `xtsfs.cache.purged`; a new key, key file and empty area are made; the server switches
/// to a filesystem over them (with node IDs and handles above the old one's, so nothing
/// the kernel still holds reaches the new area); the old key is wiped; the old area is
/// removed. Files open in the cache at that moment fail from then on (EBADF), as if
/// deleted and more: their contents are gone.
///
/// An online DEK rekey that finishes purges the cache the same way (`rekeyed(to:)`): its
/// key file was wrapped under the old DEK, which the rekey is there to retire, so the new
/// key file is wrapped under the new one. A cache is never re-encrypted.
///
/// `@unchecked Sendable`: mutable state is in `state`, `stopped` is atomic, the socket and
/// thread are set before the thread starts and read after it is joined.
final class CacheControl: @unchecked Sendable {
    let cipherDir: String
    let parentFD: Int32
    /// The volume generation the cache key file is wrapped under (changed by an online rekey).
    let volumeKeys: Mutex<KeySet>
    let server: FuseServer
    let log: @Sendable (String) -> Void
    /// The keys now serving, and how many purges happened (the ID base of the next area).
    let state: Mutex<(keys: KeySet, generation: UInt64)>
    let stopped = Atomic<Bool>(false)
    private var socketFD: Int32 = -1
    private var thread = pthread_t()
    private var started = false

    init(cipherDir: String, area: Areas.Prepared, volumeKeys: KeySet, server: FuseServer, log: @escaping @Sendable (String) -> Void) {
        self.cipherDir = cipherDir
        self.parentFD = area.parentFD
        self.volumeKeys = Mutex(volumeKeys)
        self.server = server
        self.log = log
        state = Mutex((area.keys, 0))
    }

    static let purgeRequest = "purge-cache"

    /// The abstract socket name for CIPHERDIR (its real path).
    static func socketName(_ cipherDir: String) -> [UInt8] {
        let hash = SHA256.hash(Array(cipherDir.utf8)).prefix(16).map { String($0, radix: 16).leftPadded(2) }.joined()
        return [0] + Array("xtsfs-control-\(hash)".utf8)
    }

    static func address(_ name: [UInt8]) -> (sockaddr_un, socklen_t) {
        var addr = sockaddr_un()
        addr.sun_family = sa_family_t(AF_UNIX)
        withUnsafeMutableBytes(of: &addr.sun_path) { p in
            for (i, b) in name.enumerated() where i < p.count { p[i] = b }
        }
        return (addr, socklen_t(MemoryLayout<sa_family_t>.size + name.count))
    }

    /// Listens on the control socket; a warning if it cannot (another daemon of the same
    /// CIPHERDIR on this machine already does): a mounted purge is then refused.
    func start() {
        let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { log("cache area: no control socket (\(String(cString: strerror(errno)))); cache purge refused while mounted"); return }
        var (addr, len) = CacheControl.address(CacheControl.socketName(cipherDir))
        let bound = withUnsafePointer(to: &addr) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, len) } }
        guard bound == 0, listen(fd, 4) == 0 else {
            log("cache area: cannot listen on the control socket (\(String(cString: strerror(errno)))); cache purge refused while mounted")
            Sys.close(fd)
            return
        }
        socketFD = fd
        let me = Unmanaged.passRetained(self).toOpaque()
        if pthread_create(&thread, nil, { arg in
            let me = Unmanaged<CacheControl>.fromOpaque(arg!).takeRetainedValue()
            me.serve()
            return nil
        }, me) == 0 {
            started = true
        } else {
            Unmanaged<CacheControl>.fromOpaque(me).release()
            Sys.close(fd)
            socketFD = -1
        }
    }

    func stop() {
        stopped.store(true, ordering: .relaxed)
        if socketFD >= 0 { _ = shutdown(socketFD, Int32(SHUT_RDWR)) }
        if started { pthread_join(thread, nil) }
        if socketFD >= 0 { Sys.close(socketFD) }
    }

    private func serve() {
        while !stopped.load(ordering: .relaxed) {
            // (accept4 is not imported; the window before FD_CLOEXEC only matters to a
            // process spawned meanwhile, fusermount3 at most.)
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
        // pid, uid, gid of the peer (struct ucred).
        var cred: (Int32, UInt32, UInt32) = (0, 0, 0)
        var len = socklen_t(MemoryLayout<(Int32, UInt32, UInt32)>.size)
        guard getsockopt(c, SOL_SOCKET, SO_PEERCRED, &cred, &len) == 0, cred.1 == geteuid() || cred.1 == 0 else {
            CacheControl.send(c, "E\(ExitStatus.refused.rawValue) not the daemon's user")
            return
        }
        var buf = [UInt8](repeating: 0, count: 64)
        let n = buf.withUnsafeMutableBytes { Glibc.read(c, $0.baseAddress, 64) }
        guard n > 0, String(decoding: buf[0..<n], as: UTF8.self).trimmingSuffix("\n") == CacheControl.purgeRequest else {
            CacheControl.send(c, "E\(ExitStatus.usage.rawValue) unknown request")
            return
        }
        do {
            try purge()
            CacheControl.send(c, "OK")
        } catch {
            CacheControl.send(c, "E\(error.exitStatus.rawValue) \(error)")
        }
    }

    static func send(_ c: Int32, _ text: String) {
        _ = (text + "\n").withCString { Glibc.write(c, $0, strlen($0)) }
    }

    /// The volume's DEK changed (an online rekey finished): the cache is purged and its new
    /// key wrapped under the new generation.
    func rekeyed(to volume: KeySet) {
        volumeKeys.withLock { $0 = volume }
        do {
            try purge()
            log("cache area: purged after the DEK rekey")
        } catch {
            log("cache area: not purged after the DEK rekey (\(error)); it is purged at the next mount")
        }
    }

    /// Purges the served cache: see the type's description for the order.
    func purge() throws(VolumeError) {
        try state.withLock { (st) throws(VolumeError) in
            do {
                _ = try Areas.discardCacheKey(parentFD)
                try Areas.removeTree(parentFD, BackingEntry.purgedCacheAreaName)
                try Sys.renameat(parentFD, BackingEntry.cacheAreaName, parentFD, BackingEntry.purgedCacheAreaName)
            } catch {
                throw .failure("cache purge: \(error)")
            }
            let keys: KeySet, root: Int32
            do { (keys, root) = try Areas.newCache(parentFD, volumeKeys: volumeKeys.withLock { $0 }) } catch {
                throw .failure("cache purge: the old key is gone, but no new cache could be made (\(error)); remount")
            }
            defer { Sys.close(root) }
            let generation = st.generation + 1
            let fs: FileSystem
            do { fs = try FileSystem(cipherDir: "/proc/self/fd/\(root)", keys: keys, readOnly: false, idBase: generation << 48, log: log) } catch {
                throw .failure("cache purge: the old key is gone, but the new cache does not open (\(error)); remount")
            }
            server.replace(with: fs)
            st.keys.wipe()
            st = (keys, generation)
            do {
                try Areas.removeTree(parentFD, BackingEntry.purgedCacheAreaName)
                try Sys.fsyncDirectory(parentFD)
            } catch {
                log("cache area: purged, but its old ciphertext is not all removed: \(error)")
            }
        }
    }

    /// The client side (`xtsfs cache purge` of a mounted cache): asks the daemon serving
    /// CIPHERDIR's cache on this machine.
    static func requestPurge(cipherDir: String) throws(VolumeError) {
        let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { throw .failure("socket: \(String(cString: strerror(errno)))") }
        defer { Sys.close(fd) }
        var (addr, len) = address(socketName(cipherDir))
        let r = withUnsafePointer(to: &addr) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, len) } }
        guard r == 0 else {
            throw .refused("the cache area of \(cipherDir) is mounted, but its daemon does not answer on its control socket (\(String(cString: strerror(errno)))); unmount the volume and purge again")
        }
        send(fd, purgeRequest)
        var reply = [UInt8]()
        var byte: UInt8 = 0
        while Glibc.read(fd, &byte, 1) == 1 && byte != UInt8(ascii: "\n") { reply.append(byte) }
        let text = String(decoding: reply, as: UTF8.self)
        if text == "OK" { return }
        if text.hasPrefix("E"), let space = text.firstIndex(of: " "), let code = Int32(text.dropFirst().prefix(upTo: space)) {
            throw VolumeError.fromStatus(code, String(text[text.index(after: space)...]))
        }
        throw .failure("the daemon gave no answer to the purge request")
    }
}

extension String {
    func trimmingSuffix(_ suffix: String) -> String { hasSuffix(suffix) ? String(dropLast(suffix.count)) : self }
}
