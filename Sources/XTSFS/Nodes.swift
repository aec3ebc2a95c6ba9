import XTSKeys
#if canImport(Glibc)
import Glibc
#endif

/// A backing object's identity: device and inode number. It gives the several names of one
/// file (hard links) one node, and tells when something else was put under a name we know.
/// It plays no part in naming or crypto: backing inode numbers are not stable across copies.
struct Identity: Hashable, Sendable {
    var dev: UInt64
    var ino: UInt64
    init(_ st: stat) { dev = UInt64(st.st_dev); ino = UInt64(st.st_ino) }
    init(dev: UInt64, ino: UInt64) { self.dev = dev; self.ino = ino }
}

/// One name of a node: the plaintext name in directory node `parent`, and the backing entry
/// (encrypted name) it is stored under.
struct Link: Equatable, Sendable {
    var parent: UInt64
    var name: [UInt8]
    var entry: String
}

/// The kernel's view of the tree: a node per backing object, handed out by lookup and kept
/// until the kernel forgets it.
struct Node {
    var identity: Identity
    var isDirectory: Bool
    /// The names it is known by, most recent first. A directory has one; a file with hard
    /// links may have several; none once every name is gone (an open, unlinked file).
    var links: [Link]
    var lookups: UInt64
    /// Directory ID of a directory node, read from its `xtsfs.dir` on first use.
    var directoryID: [UInt8]?
    /// The generation its `xtsfs.dir` named when `directoryID` was read.
    var directoryGeneration: UInt32 = 0
}

struct NodeTable {
    static let rootID: UInt64 = 1
    /// Names remembered per node; more are looked up again when needed.
    static let maxLinks = 8
    var nodes: [UInt64: Node] = [:]
    var byIdentity: [Identity: UInt64] = [:]
    var nextID: UInt64 = 2
    /// Counts the changes that take a name away from an object (unlink, rmdir, rename,
    /// detach). A lookup reads it before it stats a name; if it moved by the time the
    /// lookup registers what it found, the name may have gone in between (`add` would put
    /// back a name a rename or unlink had just taken away), so the lookup checks again.
    private(set) var changes: UInt64 = 0

    /// `firstID`: where new node IDs start (above 1, the root's): a filesystem that takes
    /// over a mount from another (the cache area after a purge) starts above the IDs the
    /// kernel may still hold from the old one.
    init(root: Identity, firstID: UInt64 = 2) {
        nextID = max(firstID, 2)
        nodes[NodeTable.rootID] = Node(identity: root, isDirectory: true, links: [], lookups: 1)
        byIdentity[root] = NodeTable.rootID
    }

    /// Registers a lookup (or creation) of `link` naming the object `identity`: the node
    /// that already has that identity, or a new one.
    mutating func add(_ link: Link, identity: Identity, isDirectory: Bool) -> UInt64 {
        if let id = byIdentity[identity], var n = nodes[id], n.isDirectory == isDirectory {
            n.lookups += 1
            // Names in directories the kernel forgot lead nowhere (see `location`): they
            // go, rather than push out a name that still leads here.
            n.links.removeAll { ($0.parent == link.parent && $0.name == link.name) || nodes[$0.parent] == nil }
            n.links.insert(link, at: 0)
            if n.links.count > NodeTable.maxLinks { n.links.removeLast() }
            nodes[id] = n
            return id
        }
        // New, or an inode number reused for an object of another type.
        let id = nextID
        nextID += 1
        nodes[id] = Node(identity: identity, isDirectory: isDirectory, links: [link], lookups: 1)
        byIdentity[identity] = id
        return id
    }

    /// Drops `count` lookups; returns true when the node is gone.
    mutating func forget(_ id: UInt64, _ count: UInt64) -> Bool {
        guard id != NodeTable.rootID, var n = nodes[id] else { return false }
        n.lookups = n.lookups > count ? n.lookups - count : 0
        if n.lookups > 0 {
            nodes[id] = n
            return false
        }
        nodes[id] = nil
        if byIdentity[n.identity] == id { byIdentity[n.identity] = nil }
        return true
    }

    /// Before the last name of `identity` goes: no lookup may find its node by identity any
    /// more, because once the backing object is gone its inode number can be reused at
    /// once, by a file created in another directory that must get a node of its own.
    /// Returns the node, for `unlinked` (or `reattach`, if the removal fails).
    mutating func detach(_ identity: Identity) -> UInt64? {
        changes &+= 1
        guard let id = byIdentity[identity] else { return nil }
        byIdentity[identity] = nil
        return id
    }

    /// The removal that `detach` prepared failed: the object is still there.
    mutating func reattach(_ identity: Identity, _ id: UInt64) {
        if byIdentity[identity] == nil, nodes[id] != nil { byIdentity[identity] = id }
    }

    /// The name (parent, name) no longer names the object. `detached` is the node `detach`
    /// took out when that was the object's last name: it loses every name. Otherwise the
    /// node found by `identity` loses this one. Returns the node that lost the name.
    @discardableResult
    mutating func unlinked(parent: UInt64, name: [UInt8], identity: Identity?, detached: UInt64?) -> UInt64? {
        changes &+= 1
        if let id = detached {
            nodes[id]?.links = []
            // A lookup that stat'ed the name just before it went may have registered the
            // object again since `detach` (as a node of its own): the object is gone, and
            // its inode number may be reused at once, so that node must not be found by it.
            if let identity, let other = byIdentity[identity], other != id {
                byIdentity[identity] = nil
                nodes[other]?.links.removeAll { $0.parent == parent && $0.name == name }
            }
            return id
        }
        guard let identity, let id = byIdentity[identity], var n = nodes[id] else { return nil }
        n.links.removeAll { $0.parent == parent && $0.name == name }
        nodes[id] = n
        return id
    }

    /// `identity` was renamed from (parent, name) to `link`.
    mutating func moved(from parent: UInt64, name: [UInt8], to link: Link, identity: Identity) {
        changes &+= 1
        guard let id = byIdentity[identity], var n = nodes[id] else { return }
        n.links.removeAll { ($0.parent == parent && $0.name == name) || ($0.parent == link.parent && $0.name == link.name) }
        n.links.insert(link, at: 0)
        nodes[id] = n
    }

    /// Where a node can be reached: its most recent name in a directory still known. A
    /// file with hard links keeps the names it was found by in other directories, and the
    /// kernel may forget such a directory while the file lives on through another name (it
    /// drops a directory's entries under memory pressure, at `drop_caches`, or when they
    /// expire unused): that directory's node is gone, and a name in it leads nowhere
    /// (node IDs are never reused); the next lookup there gives it a node and the name back.
    func location(_ id: UInt64) -> (link: Link?, identity: Identity, isDirectory: Bool)? {
        guard let n = nodes[id] else { return nil }
        return (n.links.first { nodes[$0.parent] != nil }, n.identity, n.isDirectory)
    }

    /// Whether directory node `id` was forgotten (or never was).
    func isGone(_ id: UInt64) -> Bool { nodes[id] == nil }

    /// The object of a node was replaced by another under the same names (an online
    /// rekey re-encrypting a symlink): the node follows it.
    mutating func replaceIdentity(_ old: Identity, with new: Identity) {
        changes &+= 1
        guard let id = byIdentity[old] else { return }
        byIdentity[old] = nil
        nodes[id]?.identity = new
        byIdentity[new] = id
    }

    /// A name of `id` other than `failed` (which did not lead to it), forgetting `failed`.
    mutating func dropLink(_ id: UInt64, _ failed: Link) {
        nodes[id]?.links.removeAll { $0 == failed }
    }

    /// `failed` (a name of `id`) did not lead to it: forgets it if the node knows another
    /// name to try instead, and says so.
    mutating func dropLinkIfOthers(_ id: UInt64, _ failed: Link) -> Bool {
        guard var n = nodes[id], n.links.count > 1, n.links.contains(failed) else { return false }
        n.links.removeAll { $0 == failed }
        nodes[id] = n
        return true
    }

    /// Takes back an `add` of `link` whose name turned out to be gone by the time it was
    /// registered: the lookup it counted is not answered.
    mutating func retract(_ id: UInt64, _ link: Link, identity: Identity) {
        guard id != NodeTable.rootID, var n = nodes[id] else { return }
        n.links.removeAll { $0 == link }
        n.lookups -= min(n.lookups, 1)
        if n.lookups == 0 {
            nodes[id] = nil
            if byIdentity[identity] == id { byIdentity[identity] = nil }
            return
        }
        nodes[id] = n
    }
}

/// A directory descriptor (O_PATH) kept open for *at() calls. Closed when the last user
/// lets go of it, so evicting it from the cache never pulls it from under a request.
final class DirHandle: Sendable {
    let fd: Int32
    init(fd: Int32) { self.fd = fd }
    deinit { Glibc.close(fd) }
}

/// Recently used directory handles, bounded: an evicted one is opened again, one name at
/// a time from a cached ancestor, the next time it is needed.
struct DirCache {
    let capacity: Int
    private var entries: [UInt64: (handle: DirHandle, stamp: UInt64)] = [:]
    private var clock: UInt64 = 0

    init(capacity: Int) { self.capacity = capacity }

    var count: Int { entries.count }

    mutating func get(_ id: UInt64) -> DirHandle? {
        guard let e = entries[id] else { return nil }
        clock += 1
        entries[id] = (e.handle, clock)
        return e.handle
    }

    mutating func put(_ id: UInt64, _ handle: DirHandle) {
        clock += 1
        entries[id] = (handle, clock)
        if entries.count > capacity {
            // Evict the older half at once, so eviction costs O(1) per insertion on average.
            let cut = entries.values.map(\.stamp).sorted()[entries.count / 2]
            entries = entries.filter { $0.value.stamp >= cut }
        }
    }

    mutating func remove(_ id: UInt64) { entries[id] = nil }
}

/// The DEK generations a filesystem holds, newest first. Immutable: a change (an online
/// rekey adding or dropping one) is a new value.
public final class KeyGenerations: Sendable {
    public let newest: KeySet
    public let older: [KeySet]
    public init(newest: KeySet, older: [KeySet] = []) {
        self.newest = newest
        self.older = older.filter { $0.generation != newest.generation }
    }
    /// Every generation, newest first.
    public var all: [KeySet] { [newest] + older }
    public func keys(_ generation: UInt32) -> KeySet? {
        if generation == newest.generation { return newest }
        return older.first { $0.generation == generation }
    }
}
