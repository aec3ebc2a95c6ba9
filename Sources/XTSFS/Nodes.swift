/// The kernel's view of the tree: node IDs handed out by lookup, each tied to a
/// (parent, plaintext name) and to the encrypted name of its backing entry.
/// Backing inode numbers play no part in naming or crypto.
struct Node {
    var parent: UInt64
    var name: [UInt8]
    var backingName: String
    var lookups: UInt64
    /// Directory ID of a directory node, read from its `xtsfs.dir` on first use.
    var directoryID: [UInt8]?
    /// Unlinked or replaced: its path no longer names it.
    var detached = false
}

struct ChildKey: Hashable {
    var parent: UInt64
    var name: [UInt8]
}

struct NodeTable {
    static let rootID: UInt64 = 1
    var nodes: [UInt64: Node] = [:]
    var children: [ChildKey: UInt64] = [:]
    var nextID: UInt64 = 2

    init() {
        nodes[NodeTable.rootID] = Node(parent: 0, name: [], backingName: "", lookups: 1)
    }

    /// The backing path of a node: the cipher directory and the encrypted names down to it.
    func path(_ id: UInt64, root: String) -> String? {
        var parts: [String] = []
        var cur = id
        while cur != NodeTable.rootID {
            guard let n = nodes[cur], !n.detached else { return nil }
            parts.append(n.backingName)
            cur = n.parent
        }
        var p = root
        for part in parts.reversed() { p += "/" + part }
        return p
    }

    /// Registers a lookup of (parent, name): the same node again if known, else a new one.
    mutating func add(parent: UInt64, name: [UInt8], backingName: String) -> UInt64 {
        let key = ChildKey(parent: parent, name: name)
        if let id = children[key], var n = nodes[id], !n.detached {
            n.lookups += 1
            n.backingName = backingName
            nodes[id] = n
            return id
        }
        let id = nextID
        nextID += 1
        nodes[id] = Node(parent: parent, name: name, backingName: backingName, lookups: 1)
        children[key] = id
        return id
    }

    mutating func forget(_ id: UInt64, _ count: UInt64) {
        guard id != NodeTable.rootID, var n = nodes[id] else { return }
        n.lookups = n.lookups > count ? n.lookups - count : 0
        if n.lookups == 0 {
            nodes[id] = nil
            let key = ChildKey(parent: n.parent, name: n.name)
            if children[key] == id { children[key] = nil }
        } else {
            nodes[id] = n
        }
    }

    /// The entry is gone from the tree (unlink, rmdir, replaced by rename).
    mutating func detach(parent: UInt64, name: [UInt8]) {
        let key = ChildKey(parent: parent, name: name)
        guard let id = children.removeValue(forKey: key) else { return }
        nodes[id]?.detached = true
    }

    mutating func move(parent: UInt64, name: [UInt8], to newParent: UInt64, newName: [UInt8], backingName: String) {
        detach(parent: newParent, name: newName)
        let key = ChildKey(parent: parent, name: name)
        guard let id = children.removeValue(forKey: key), var n = nodes[id] else { return }
        n.parent = newParent
        n.name = newName
        n.backingName = backingName
        nodes[id] = n
        children[ChildKey(parent: newParent, name: newName)] = id
    }
}
