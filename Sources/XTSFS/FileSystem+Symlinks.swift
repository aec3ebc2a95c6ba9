import XTSContent
import XTSSystem
#if canImport(Glibc)
import Glibc
#endif

/// Symlink targets. An encoded target (nonce, SIV tag and ciphertext in base64url) is the
/// backing symlink's own target when it fits Linux's 4095 bytes, which holds plaintext
/// targets up to 3039 bytes. Longer ones go to the link store, `CIPHERDIR/xtsfs.links/HASH`,
/// and the backing symlink points to `xtsfs.link.HASH`: hard links of a symlink may sit in
/// any directory, so the store is one for the volume. A stored target is trusted only when
/// it hashes to its name.
extension FileSystem {
    /// The backing target for an encrypted one, storing it first if it is too long.
    func backingTarget(_ encoded: String) throws(FSError) -> String {
        let bytes = Array(encoded.utf8)
        if bytes.count <= NameCodec.maxBackingTarget { return encoded }
        let name = NameCodec.storedTargetName(forEncoded: bytes)
        let store = try linkStore(create: true)
        do { try Sys.writeNewFile(bytes, at: store.fd, name, mode: 0o444) } catch where error.errno == EEXIST {
            // Random nonces make equal hashes equal contents; a file planted under that
            // name is checked when read.
        } catch { throw .system(error) }
        return NameCodec.storedTargetPrefix + name
    }

    /// The plaintext target behind a backing target (`SymlinkTarget`, shared with fsck and
    /// the rekey); the link store's descriptor is the mount's cached one.
    func decryptedTarget(_ raw: [UInt8]) throws(FSError) -> [UInt8] {
        do {
            return try SymlinkTarget.plain(raw, store: { () throws -> Int32 in try linkStore(create: false).fd },
                                           codecs: ring.all.lazy.map { NameCodec(keys: $0) })
        } catch {
            if case .storeUnusable(let e) = error, let e = e as? FSError { throw e }
            throw .damaged("\(error)")
        }
    }

    /// After the last name of a symlink is gone: drop its stored target, if it has one.
    func dropStoredTarget(_ raw: [UInt8]?) {
        guard let raw, let name = SymlinkTarget.storedName(raw), let store = try? linkStore(create: false) else { return }
        // Only a hash names a stored target: nothing else in the store is ever removed.
        guard name.utf8.count == 43, name.utf8.allSatisfy(Base64URL.isAlphabet) else { return }
        _ = Glibc.unlinkat(store.fd, name, 0)
    }

    private func linkStore(create: Bool) throws(FSError) -> DirHandle {
        if let h = linkStoreHandle.withLock({ $0 }) { return h }
        if create {
            do { try Sys.mkdirat(root.fd, NameCodec.linkStore, 0o700) } catch where error.errno == EEXIST {} catch { throw .system(error) }
        }
        let fd: Int32
        do { fd = try Sys.openPath(root.fd, NameCodec.linkStore, directory: true) } catch {
            throw error.errno == ENOENT ? .damaged("the link store \(NameCodec.linkStore) is missing") : .damaged("the link store \(NameCodec.linkStore): \(error)")
        }
        let h = DirHandle(fd: fd)
        linkStoreHandle.withLock { $0 = h }
        return h
    }
}
