import CSysShim
import XTSSystem
#if canImport(Glibc)
import Glibc
#endif

extension FileSystem {
    public func getattr(_ id: UInt64, handle: UInt64?) throws(FSError) -> stat {
        if let h = handle, let f = files.withLock({ $0[h] }) {
            do { return translate(try Sys.fstat(f.fd), header: .open(f)) { nil } } catch { throw .system(error) }
        }
        do {
            let (st, dir, entry) = try statNode(id)
            return translate(st, header: .entry(dir.fd, entry)) { try? Sys.readlinkat(dir.fd, entry) }
        } catch {
            // Every name gone while open: answer from an open handle of the node.
            if case .notFound = error, let f = anyOpenFile(of: id) {
                do { return translate(try Sys.fstat(f.fd), header: .open(f)) { nil } } catch { throw .system(error) }
            }
            throw error
        }
    }

    public func setattr(_ id: UInt64, handle: UInt64?, changes c: AttributeChanges, caller: Caller? = nil) throws(FSError) -> stat {
        try checkWritable()
        if c.size != nil {
            guard c.size! >= 0 else { throw .invalidArgument }
            guard c.size! <= FileSystem.maxFileSize else { throw .fileTooLarge }
        }
        // Integrity volumes: a change that leaves the size alone keeps the remembered length.
        let before = integrity && !sharedStorage && c.size == nil ? currentStat(id, handle: handle) : nil
        // fchmod/fchown/futimens come without a handle; an open handle of this node serves
        // them (and is the only way to an unlinked file).
        if let open = handle.flatMap({ h in files.withLock { $0[h] } }) {
            try apply(c, toOpen: open, node: id, caller: caller)
        } else {
            do {
                try withPinned(id) { (fd, st) throws(FSError) in try apply(c, toPinned: fd, st, node: id, caller: caller) }
            } catch {
                guard case .notFound = error, let open = anyOpenFile(of: id) else { throw error }
                try apply(c, toOpen: open, node: id, caller: caller)
            }
        }
        if let before, let after = currentStat(id, handle: handle) { carryIntegritySize(from: before, to: after) }
        return try getattr(id, handle: handle)
    }

    /// The backing object of node `id` as it is now (through `handle` if open), or nil.
    private func currentStat(_ id: UInt64, handle: UInt64?) -> stat? {
        if let h = handle, let f = files.withLock({ $0[h] }) { return try? Sys.fstat(f.fd) }
        return try? statNode(id).0
    }

    private func apply(_ c: AttributeChanges, toOpen f: OpenFile, node: UInt64, caller: Caller?) throws(FSError) {
        do {
            if let mode = c.mode {
                try Sys.fchmod(f.fd, mode & 0o7777)
                modeChanged(f.identity)
            }
            if c.uid != nil || c.gid != nil { try Sys.fchown(pinned: f.fd, c.uid ?? uid_t.max, c.gid ?? gid_t.max) }
        } catch { throw .system(error) }
        if c.mode == nil && (c.uid != nil || c.gid != nil) { dropPrivileges(f.fd, f.state, node: node, for: caller, chown: true) }
        if let size = c.size {
            try truncate(fd: f.fd, state: f.state, size: size)
            if c.mode == nil { dropPrivileges(f.fd, f.state, node: node, for: caller) }
        }
        if c.atime != nil || c.mtime != nil {
            do { try Sys.futimens(pinned: f.fd, c.atime ?? FileSystem.omit, c.mtime ?? FileSystem.omit) } catch { throw .system(error) }
        }
    }

    /// Changes through the pinned object itself: never a path, never a symlink followed.
    private func apply(_ c: AttributeChanges, toPinned fd: Int32, _ st: stat, node: UInt64, caller: Caller?) throws(FSError) {
        do {
            if let mode = c.mode {
                try Sys.fchmod(pinned: fd, mode & 0o7777)
                modeChanged(Identity(st))
            }
            if c.uid != nil || c.gid != nil { try Sys.fchown(pinned: fd, c.uid ?? uid_t.max, c.gid ?? gid_t.max) }
        } catch { throw .system(error) }
        if c.mode == nil && (c.uid != nil || c.gid != nil) && st.isRegular {
            modeChanged(Identity(st))
            dropPrivileges(fd, nil, node: node, for: caller, chown: true)
        }
        if let size = c.size {
            guard st.isRegular else { throw st.isDirectory ? FSError.isDirectory : FSError.invalidArgument }
            let file: Int32
            do { file = try Sys.reopen(fd, O_RDWR) } catch { throw .system(error) }
            defer { Sys.close(file) }
            let (key, state) = try acquireState(st)
            defer { releaseState(key) }
            try truncate(fd: file, state: state, size: size)
            if c.mode == nil { dropPrivileges(file, state, node: node, for: caller) }
        }
        if c.atime != nil || c.mtime != nil {
            do { try Sys.futimens(pinned: fd, c.atime ?? FileSystem.omit, c.mtime ?? FileSystem.omit) } catch { throw .system(error) }
        }
    }

    static let omit = timespec(tv_sec: 0, tv_nsec: Int(Sys.utimeOmit))
}
