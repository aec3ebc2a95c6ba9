import XTSContent
import XTSKeys
import XTSSystem
#if canImport(Glibc)
import Glibc
#endif

/// What an online DEK rekey (a sweep running in the daemon while the filesystem serves)
/// needs from the filesystem, and how the two keep out of each other's way:
///
/// - every operation that creates, removes or renames an entry, or changes an extended
///   attribute, holds the namespace lock shared; the sweep holds it exclusively while it
///   renames entries, replaces a symlink, moves an object's xattrs, switches a directory
///   header, or makes a batch's file copies complete and copies them over their files;
/// - a file is re-encrypted under its exclusive lock (readers and writers of it wait),
///   and not at all while it is open for writing: the sweep tries it again later;
/// - a node's backing entry, once renamed to its new-generation name, is found again
///   from its plaintext name (`refreshed`); a replaced symlink keeps its node
///   (`objectReplaced`). Nodes are keyed by backing identity, which neither an in-place
///   file rewrite nor a rename changes.
extension FileSystem {
    func withNamespace<R>(_ body: () throws(FSError) -> R) throws(FSError) -> R {
        try namespaceLock.withReadLock(body)
    }

    /// Sets an extended attribute, shared with the other changes of names: an online
    /// rekey moves an object's xattrs exclusively.
    public func setxattr(_ id: UInt64, name: [UInt8], value: [UInt8], flags: XattrFlags = []) throws(FSError) {
        try withNamespace { () throws(FSError) in try setxattrUnlocked(id, name: name, value: value, flags: flags) }
    }

    public func removexattr(_ id: UInt64, name: [UInt8]) throws(FSError) {
        try withNamespace { () throws(FSError) in try removexattrUnlocked(id, name: name) }
    }

    /// Runs `body` with no namespace change or xattr change of this filesystem under way.
    public func withNamespaceExclusive<R, E: Error>(_ body: () throws(E) -> R) throws(E) -> R {
        try namespaceLock.withWriteLock(body)
    }

    /// The generations this filesystem reads, newest first.
    public var heldGenerations: [UInt32] { ring.all.map(\.generation) }

    /// From now on new objects are written with `keys`; the generations held so far are
    /// still read.
    public func addGeneration(_ keys: KeySet) {
        generations.withLock { g in
            guard g.keys(keys.generation) == nil else { return }
            g = KeyGenerations(newest: keys, older: g.all)
        }
        generationsChanged.store(true, ordering: .relaxed)
    }

    /// Forgets every generation but the newest (the rekey is verified: nothing of them is left).
    public func dropOlderGenerations() {
        generations.withLock { g in g = KeyGenerations(newest: g.newest) }
        generationsChanged.store(true, ordering: .relaxed)
    }

    /// `link` (a name of node `id`) did not lead anywhere: if the entry for its plaintext
    /// name is another one now (an online rekey renamed it to its new-generation name),
    /// the node's name is updated and returned.
    func refreshed(_ id: UInt64, _ link: Link) -> Link? {
        guard !ring.older.isEmpty || generationsChanged.load(ordering: .relaxed),
              let (_, b) = try? entry(link.parent, link.name), b.entryName != link.entry else { return nil }
        let fresh = Link(parent: link.parent, name: link.name, entry: b.entryName)
        table.withLock { t in
            guard var n = t.nodes[id], let i = n.links.firstIndex(of: link) else { return }
            n.links[i] = fresh
            t.nodes[id] = n
        }
        return fresh
    }

    /// The backing object `old` was replaced by `new` under the same name (a symlink
    /// re-encrypted): the node the kernel knows follows it.
    public func objectReplaced(old: stat, new: stat) {
        table.withLock { $0.replaceIdentity(Identity(old), with: Identity(new)) }
    }


    /// A file to re-encrypt: its exclusive lock is held (reads and writes of it wait)
    /// until `endLease`. Nil while it is open for writing: try it again later.
    public func leaseForRekey(_ st: stat) -> RekeyLease? {
        let key = Identity(st)
        if files.withLock({ $0.values.contains { $0.identity == key && $0.writable } }) { return nil }
        guard let acquired = try? acquireState(st) else { return nil }
        let state = acquired.1
        state.lock.lockWrite()
        // Opened for writing while we waited for the lock: let the writer go first.
        if files.withLock({ $0.values.contains { $0.identity == key && $0.writable } }) {
            state.lock.unlock()
            releaseState(key)
            return nil
        }
        return RekeyLease(identity: key, state: state)
    }

    /// The file's contents changed under the lease: its keys are read again from its header.
    public func endLease(_ lease: RekeyLease) {
        lease.state.loaded = false
        lease.state.crypto = nil
        lease.state.lock.unlock()
        releaseState(lease.identity)
    }
}

/// A file an online rekey holds (`FileSystem.leaseForRekey`).
public final class RekeyLease: @unchecked Sendable {
    let identity: Identity
    let state: FileState
    init(identity: Identity, state: FileState) { self.identity = identity; self.state = state }
}
