import XTSCrypto
import XTSFormat
import XTSKeys
import XTSSystem

/// Content I/O of a backing file of an integrity volume (FORMAT.md section 12). Same
/// contract as `ContentFile`, which forwards here: the caller holds the file's lock.
///
/// Every change keeps one rule, so that a writer killed between any two of its writes
/// leaves every unit readable: a unit's current tag is never overwritten before its new
/// ciphertext is in place (the new tag goes to the entry's other slot first), and the
/// header's length is written last when the file grows and first when it shrinks, so
/// bytes past the committed length are never read.
struct IntegrityContent<File: BackingFile> {
    typealias L = IntegrityLayout
    let file: File
    let currentKeys: KeySet
    /// The volume's tag algorithm: new files get it, and a file header naming the other
    /// one is damage (a file planted from, or copied between, volumes of the other kind).
    let tags: UnitTagAlgorithm
    /// Listing manifests (FORMAT.md 12.10): every file has a header with a file ID, from
    /// its creation on; a file without one is damage, and emptying keeps it.
    var fileIDs = false
    let keys: @Sendable (UInt32) -> KeySet?

    init(file: File, currentKeys: KeySet, tags: UnitTagAlgorithm, fileIDs: Bool = false, keys: @escaping @Sendable (UInt32) -> KeySet?) {
        self.file = file; self.currentKeys = currentKeys; self.tags = tags; self.fileIDs = fileIDs; self.keys = keys
    }

    var unit: Int { Int(L.blockSize) }

    // MARK: - header and keys

    func backingSize() throws(ContentError) -> Int64 {
        do { return try file.size() } catch { throw .io(error) }
    }

    /// The stored header bytes; nil when the backing file is empty (created, never written)
    /// or its header is 64 zero bytes (a first write interrupted before its header: the
    /// file was empty, and that is what it still is).
    func headerBytes() throws(ContentError) -> [UInt8]? {
        let backing = try backingSize()
        if backing == 0 {
            if fileIDs { throw .badHeader("no file header (0 bytes): every file of a volume with listing manifests has one") }
            return nil
        }
        guard backing >= L.headerLength else { throw .badHeader("backing file is \(backing) bytes, shorter than its header") }
        var raw = [UInt8](repeating: 0, count: IntegrityFileHeader.length)
        let n = try readFully(&raw, at: 0)
        guard n == raw.count else { throw .badHeader("short read") }
        if raw.allSatisfy({ $0 == 0 }) {
            if fileIDs { throw .badHeader("file header of 64 zero bytes: every file of a volume with listing manifests has one") }
            return nil
        }
        return raw
    }

    /// What every header must be, once its MAC is checked.
    private func checkFields(_ h: IntegrityFileHeader) throws(ContentError) {
        guard h.version == tags.rawValue else {
            throw .badHeader("file header of version \(h.version) (\(h.tags.map { "\($0)" } ?? "?") unit tags) on a volume whose files have version \(tags.rawValue) (\(tags))")
        }
        if fileIDs != (h.fileID != IntegrityFileHeader.noFileID) {
            throw .badHeader(fileIDs ? "no file ID, on a volume with listing manifests" : "a file ID, on a volume without listing manifests")
        }
        guard h.plainLength <= UInt64(L.maxPlainSize) else { throw .badHeader("claims \(h.plainLength) bytes, beyond the largest file the format allows") }
    }

    /// The header and the keys it names (the cached ones if the nonce is unchanged), both
    /// checked: the header's MAC, and on a volume with file roots the root of every tag
    /// block it covers (from what `crypto` verified before, when the header is the same).
    func state(_ crypto: FileCrypto?) throws(ContentError) -> (header: IntegrityFileHeader, crypto: FileCrypto)? {
        guard let raw = try headerBytes() else { return nil }
        if tags.hasFileRoot { return try rootedState(raw, crypto) }
        let h = try decodeUnrooted(raw)
        if let c = crypto, c.isIntegrity, c.header.nonce == h.nonce, c.header.keyGeneration == h.keyGeneration { return (h, c) }
        guard let k = keys(h.keyGeneration) else { throw .badHeader("written under key generation \(h.keyGeneration), which this volume no longer holds") }
        do { return (h, try FileCrypto(keys: k, integrityHeader: h)) } catch { throw .crypto(error) }
    }

    /// A header of version 1 or 2, its MAC and fields checked.
    private func decodeUnrooted(_ raw: [UInt8]) throws(ContentError) -> IntegrityFileHeader {
        let h: IntegrityFileHeader
        do { h = try IntegrityFileHeader.decode(raw, macKey: currentKeys.metadataMACKey) } catch {
            // The MAC key depends on the generation recorded inside; try that one.
            guard let gen = IntegrityFileHeader.claimedGeneration(raw), gen != currentKeys.generation, let k = keys(gen),
                  let other = try? IntegrityFileHeader.decode(raw, macKey: k.metadataMACKey) else { throw .badHeader("\(error)") }
            h = other
        }
        try checkFields(h)
        return h
    }

    /// The header, checked (`state`); nil for an empty file.
    func header() throws(ContentError) -> IntegrityFileHeader? {
        guard let raw = try headerBytes() else { return nil }
        return tags.hasFileRoot ? try rootedState(raw, nil).header : try decodeUnrooted(raw)
    }

    /// The committed length; `crypto` spares reading every tag block again on a volume
    /// with file roots when it verified this header before.
    func plainSize(crypto: FileCrypto? = nil) throws(ContentError) -> Int64 {
        guard let raw = try headerBytes() else { return 0 }
        return Int64((tags.hasFileRoot ? try rootedState(raw, crypto).header : try decodeUnrooted(raw)).plainLength)
    }

    func loadCrypto() throws(ContentError) -> FileCrypto? { try state(nil)?.crypto }

    /// Writes a header alone. With a file root, its root counts the actual tag blocks of
    /// the groups its length covers, as verified (`state`) or written by this process: a
    /// header for a shorter length, or the header of a file of length 0 (no groups).
    private func writeHeader(_ h: IntegrityFileHeader, _ c: FileCrypto) throws(ContentError) {
        let bytes: [UInt8]
        if let cache = c.root {
            let groups = L.groupCount(plainSize: Int64(h.plainLength))
            guard groups == 0 || cache.element(groups - 1) != nil else { throw .badHeader("the file root of a shorter file needs the tag blocks verified first") }
            let root = cache.root(groups: groups, overlay: [:])
            do { bytes = try h.encode(macKey: c.keys.metadataMACKey, root: root.bytes) } catch { throw .crypto(error) }
            do { try bytes.withBytes { (p) throws(SystemError) in try file.write(p, at: 0) } } catch { throw .io(error) }
            cache.commit(header: bytes, groups: groups, overlay: [:])
            return
        }
        do { bytes = try h.encode(macKey: c.keys.metadataMACKey) } catch { throw .crypto(error) }
        do { try bytes.withBytes { (p) throws(SystemError) in try file.write(p, at: 0) } } catch { throw .io(error) }
    }

    // MARK: - reading

    func read(into output: UnsafeMutableRawBufferPointer, at offset: Int64, crypto: FileCrypto?) throws(ContentError) -> Int {
        guard let (h, c) = try state(crypto) else { return 0 }
        let size = Int64(h.plainLength)
        let end = min(offset + Int64(output.count), size)
        guard offset < end else { return 0 }
        let units = L.units(overlapping: offset..<end)
        let session: UnitTagSession
        do { session = try c.tagSession() } catch { throw .crypto(error) }
        var out = 0
        for run in L.groupRuns(units) {
            let lo = max(offset, run.lowerBound * L.blockSize), hi = min(end, run.upperBound * L.blockSize)
            // A run the request covers whole is read, checked and decrypted in the caller's
            // buffer (no copy); one it covers in part goes through a scratch buffer. On an
            // error the caller's buffer holds ciphertext, but nothing of it is returned.
            let whole = lo == run.lowerBound * L.blockSize && hi == run.upperBound * L.blockSize
            let buf = whole ? UnsafeMutableRawBufferPointer(rebasing: output[out..<out + run.count * unit])
                            : ThreadScratch.buffer(.content, count: run.count * unit)
            _ = try load(run, into: buf, c, session)
            do { try c.cryptWhole(buf, firstUnit: run.lowerBound, count: run.count, encrypt: false) } catch { throw .crypto(error) }
            if !whole {
                (output.baseAddress! + out).copyMemory(from: buf.baseAddress! + Int(lo - run.lowerBound * L.blockSize), byteCount: Int(hi - lo))
            }
            out += Int(hi - lo)
        }
        return out
    }

    /// Reads the entries and ciphertext of `run` (zeros past the end of the backing file)
    /// and checks every unit against its entry. Returns the entries and, for each unit, the
    /// slot that holds its current tag. With a file root, the whole tag block is read and
    /// checked against the root first (and returned).
    private func load(_ run: Range<Int64>, into buf: UnsafeMutableRawBufferPointer, _ c: FileCrypto, _ s: UnitTagSession) throws(ContentError) -> (entries: [UInt8], slots: [Int], page: [UInt8]?) {
        var entries = [UInt8](repeating: 0, count: run.count * Int(L.entryLength))
        var page: [UInt8]?
        if c.hasFileRoot {
            let p = try verifiedTagBlock(L.group(of: run.lowerBound), c)
            let at = Int(L.entryOffset(unit: run.lowerBound) - L.tagBlockOffset(group: L.group(of: run.lowerBound)))
            entries = Array(p[at..<at + entries.count])
            page = p
        } else {
            _ = try readFully(&entries, at: L.entryOffset(unit: run.lowerBound))
        }
        _ = try readFully(buf, at: L.dataOffset(unit: run.lowerBound))
        var slots = [Int](repeating: 0, count: run.count)
        var tag = (UInt64(0), UInt64(0))
        for i in 0..<run.count {
            let u = run.lowerBound + Int64(i)
            let ct = UnsafeRawBufferPointer(rebasing: buf[i * unit..<(i + 1) * unit])
            let hole = FileCrypto.isZero(ct.baseAddress!, unit)
            let found: Int? = try withUnsafeMutableBytes(of: &tag) { (t) throws(ContentError) -> Int? in
                do throws(CryptoError) { try FileCrypto.tag(s, unit: u, ciphertext: hole ? nil : ct, into: t) } catch { throw .crypto(error) }
                return entries.withUnsafeBytes { e in
                    let base = i * Int(L.entryLength)
                    if equal(UnsafeRawBufferPointer(t), UnsafeRawBufferPointer(rebasing: e[base..<base + L.tagLength])) { return 0 }
                    if equal(UnsafeRawBufferPointer(t), UnsafeRawBufferPointer(rebasing: e[base + L.tagLength..<base + 2 * L.tagLength])) { return 1 }
                    return nil
                }
            }
            guard let slot = found else {
                throw .authentication("unit \(u) (plaintext bytes \(u * L.blockSize)–\((u + 1) * L.blockSize - 1)) does not match its tag\(hole ? " (it reads as a hole)" : "")")
            }
            slots[i] = slot
        }
        return (entries, slots, page)
    }

    // MARK: - changing

    func write(_ data: UnsafeRawBufferPointer, at offset: Int64, crypto: FileCrypto?) throws(ContentError) -> FileCrypto {
        let st = try state(crypto)
        let old = st.map { Int64($0.header.plainLength) } ?? 0
        let new = max(old, offset + Int64(data.count))
        return try change(st, newSize: new, edit: offset..<offset + Int64(data.count), data: data, punch: false)
    }

    func writeNewHeader(fileID: [UInt8]) throws(ContentError) -> FileCrypto {
        var h: IntegrityFileHeader
        let c: FileCrypto
        do {
            h = try IntegrityFileHeader.random(tags: tags, keyGeneration: currentKeys.generation)
            h.fileID = fileID
            c = try FileCrypto(keys: currentKeys, integrityHeader: h)
        } catch { throw .crypto(error) }
        try writeHeader(h, c)
        return c
    }

    func truncate(to newSize: Int64, crypto: FileCrypto?) throws(ContentError) -> FileCrypto? {
        if newSize == 0 && fileIDs {
            // The file keeps its identity (its file ID, in its directories' manifests) but
            // gets a new nonce, so nothing older can be replayed into it: the new header
            // with length 0 first (from then on nothing past it is read), then the cut.
            // Emptying needs no key: a file whose header is damaged keeps the file ID its
            // bytes still hold (its manifests may then match again), or gets a new one.
            var id: [UInt8]
            if let st = try? state(crypto) { id = st.header.fileID } else {
                // A read that fails (an I/O error, a descriptor that cannot read) fails the
                // truncate: a new file ID here would change the file's element behind its
                // directories' manifests. Only a file too short to hold one gets a new one.
                var raw = [UInt8](repeating: 0, count: 48)
                id = try readFully(&raw, at: 0) == 48 ? Array(raw[32..<48]) : IntegrityFileHeader.noFileID
                if id == IntegrityFileHeader.noFileID {
                    do { id = try Random.bytes(16) } catch { throw .crypto(error) }
                }
            }
            let c = try writeNewHeader(fileID: id)
            do { try file.truncate(Int64(L.headerLength)) } catch { throw .io(error) }
            return c
        }
        if newSize == 0 {
            // Emptying needs no key (a file with a damaged header can still be emptied); the
            // next write draws a new nonce, so nothing older can be replayed into the file.
            do { try file.truncate(0) } catch { throw .io(error) }
            return nil
        }
        let st = try state(crypto)
        let old = st.map { Int64($0.header.plainLength) } ?? 0
        if newSize > old { return try change(st, newSize: newSize, edit: nil, data: nil, punch: false) }
        guard let st else { return crypto }
        var h = st.header
        let c = st.crypto
        if newSize < old {
            if c.hasFileRoot {
                var t = RootChange(header: h, crypto: c)
                try settleRecorded(&t, c)
            }
            // Length first: from here on the units past it are never read.
            h.plainLength = UInt64(newSize)
            try writeHeader(h, c)
        }
        // Also when the size is unchanged: a truncate changes mtime and ctime.
        do {
            let want = L.backingSize(plainSize: newSize), have = try file.size()
            try file.truncate(newSize < old ? min(want, have) : have)
        } catch { throw .io(error) }
        return c
    }

    func zeroRange(_ range: Range<Int64>, crypto: FileCrypto?) throws(ContentError) -> FileCrypto? {
        guard let st = try state(crypto) else { return crypto }
        let size = Int64(st.header.plainLength)
        let lo = max(range.lowerBound, 0), hi = min(range.upperBound, size)
        guard lo < hi else { return st.crypto }
        return try change(st, newSize: size, edit: lo..<hi, data: nil, punch: true)
    }

    /// Changes the file to `new` bytes with plaintext `edit` replaced by `data` (zeros when
    /// nil); with `punch`, units the edit covers whole become holes.
    private func change(_ st: (header: IntegrityFileHeader, crypto: FileCrypto)?, newSize new: Int64, edit: Range<Int64>?, data: UnsafeRawBufferPointer?, punch: Bool) throws(ContentError) -> FileCrypto {
        var h: IntegrityFileHeader
        let c: FileCrypto
        // A file without a header reads as empty until its header is written, last, so a
        // new file needs no header with length 0 first: its units, then the header and the
        // first group's entries together (they are adjacent), two writes for a small file.
        let fresh = st == nil
        if let st { (h, c) = st } else {
            do {
                h = try IntegrityFileHeader.random(tags: tags, keyGeneration: currentKeys.generation)
                c = try FileCrypto(keys: currentKeys, integrityHeader: h)
            } catch { throw .crypto(error) }
        }
        let old = Int64(h.plainLength)
        let oldUnits = L.unitCount(old)
        // A file root (FORMAT.md 12.11): every tag block written names the header on disk;
        // the new header, always written last, commits to them all.
        if c.hasFileRoot && L.groupCount(plainSize: new) > L.maxRootGroups { throw .io(SystemError(27 /* EFBIG */, "grow a file with a file root past its largest size")) }
        var root: RootChange? = c.hasFileRoot ? RootChange(header: fresh ? nil : h, crypto: c) : nil
        if root != nil { try settleRecorded(&root!, c) }
        if new > old {
            // Whatever lies past the committed length was left by an interrupted change:
            // drop it, so that new units start from zeros.
            let committed = L.backingSize(plainSize: old)
            do { if try file.size() > committed { try file.truncate(committed) } } catch { throw .io(error) }
        }
        var lo = Int64.max, hi = Int64.min
        if let e = edit, !e.isEmpty { let us = L.units(overlapping: e); lo = us.lowerBound; hi = us.upperBound }
        if new > old {
            // The old last unit, if partial, gets zeros past the old end (a shrink leaves
            // stale bytes there); the units up to the new end get tags (holes or data).
            lo = min(lo, old % L.blockSize != 0 ? oldUnits - 1 : oldUnits)
            hi = max(hi, L.unitCount(new))
        }
        var firstEntries: [UInt8]?
        if lo < hi {
            let session: UnitTagSession
            do { session = try c.tagSession() } catch { throw .crypto(error) }
            for run in L.groupRuns(lo..<hi) {
                // Also for a file of length 0 with a header (a new file of a volume with
                // listing manifests): nothing of its units is read before the header with
                // the new length, written last with these entries, says they exist.
                let deferred = try changeRun(run, c, session, old: old, edit: edit, data: data, punch: punch,
                                             deferEntries: (fresh || old == 0) && new > 0 && run.lowerBound == 0, root: &root)
                if deferred != nil { firstEntries = deferred }
            }
        }
        if new > old || fresh || root != nil {
            do {
                let want = L.backingSize(plainSize: new)
                if try file.size() < want { try file.truncate(want) }
            } catch { throw .io(error) }
            h.plainLength = UInt64(new)
            if let root { try commitRooted(h, root, c); return c }
            let bytes: [UInt8]
            do { bytes = try h.encode(macKey: c.keys.metadataMACKey) + (firstEntries ?? []) } catch { throw .crypto(error) }
            do { try bytes.withBytes { (p) throws(SystemError) in try file.write(p, at: 0) } } catch { throw .io(error) }
        }
        return c
    }

    /// Changes the units of `run`. With `deferEntries` (a new file's first group) the
    /// entries are returned instead of written, for the caller to write with the header.
    private func changeRun(_ run: Range<Int64>, _ c: FileCrypto, _ s: UnitTagSession, old: Int64, edit: Range<Int64>?, data: UnsafeRawBufferPointer?, punch: Bool, deferEntries: Bool,
                           root: inout RootChange?) throws(ContentError) -> [UInt8]? {
        let n = run.count
        let B = L.blockSize
        // Units below the old unit count exist and must be authentic before they change; the
        // others are new and start as zeros.
        let existing = min(n, max(0, Int(L.unitCount(old) - run.lowerBound)))
        let runBytes = run.lowerBound * B..<run.upperBound * B
        if existing == 0 && !(edit.map { $0.overlaps(runBytes) } ?? false) {
            // Only new holes (a file grown past them): tags, and nothing else to write.
            return try writeHoleEntries(run, s, deferEntries: deferEntries, c, root: &root)
        }
        let buf = ThreadScratch.buffer(.request, count: n * unit)
        var entries = [UInt8](repeating: 0, count: n * Int(L.entryLength))
        var slots = [Int](repeating: 0, count: n)
        var page: [UInt8]?
        if existing > 0 {
            let head = UnsafeMutableRawBufferPointer(rebasing: buf[0..<existing * unit])
            let loaded = try load(run.lowerBound..<run.lowerBound + Int64(existing), into: head, c, s)
            entries.replaceSubrange(0..<loaded.entries.count, with: loaded.entries)
            slots.replaceSubrange(0..<existing, with: loaded.slots)
            page = loaded.page
            let needOld: (Int) -> Bool = { i in
                let r = L.plainRange(unit: run.lowerBound + Int64(i))
                return !(edit.map { $0.lowerBound <= r.lowerBound && $0.upperBound >= r.upperBound } ?? false)
            }
            do { try c.cryptWhole(head, firstUnit: run.lowerBound, count: existing, encrypt: false, skip: { !needOld($0) }) } catch { throw .crypto(error) }
            // Bytes past the old end (left by a shrink) become zeros.
            let lastStart = (L.unitCount(old) - 1) * B
            if old % B != 0, run.contains(L.unitCount(old) - 1) {
                let i = Int(L.unitCount(old) - 1 - run.lowerBound)
                let from = Int(old - lastStart)
                (buf.baseAddress! + i * unit + from).initializeMemory(as: UInt8.self, repeating: 0, count: unit - from)
            }
        }
        if existing < n { (buf.baseAddress! + existing * unit).initializeMemory(as: UInt8.self, repeating: 0, count: (n - existing) * unit) }
        var hole = [Bool](repeating: false, count: n)
        for i in 0..<n {
            let r = L.plainRange(unit: run.lowerBound + Int64(i))
            if let e = edit, e.lowerBound < r.upperBound, e.upperBound > r.lowerBound {
                let a = max(e.lowerBound, r.lowerBound), b = min(e.upperBound, r.upperBound)
                let dst = buf.baseAddress! + i * unit + Int(a - r.lowerBound)
                if let data { dst.copyMemory(from: data.baseAddress! + Int(a - e.lowerBound), byteCount: Int(b - a)) }
                else { dst.initializeMemory(as: UInt8.self, repeating: 0, count: Int(b - a)) }
                hole[i] = punch && a == r.lowerBound && b == r.upperBound
            } else {
                // Not edited: a new unit (a hole), or the old last unit getting its zeros.
                hole[i] = i >= existing
            }
        }
        do { try c.cryptWhole(buf, firstUnit: run.lowerBound, count: n, encrypt: true, skip: { hole[$0] }) } catch { throw .crypto(error) }
        let E = Int(L.entryLength), T = L.tagLength
        try entries.withMutableBytes { (e) throws(ContentError) in
            for i in 0..<n {
                let u = run.lowerBound + Int64(i)
                let target: Int
                if i < existing {
                    // Keep the slot that matches what is on disk now.
                    target = i * E + (1 - slots[i]) * T
                } else {
                    target = i * E
                    (e.baseAddress! + i * E + T).initializeMemory(as: UInt8.self, repeating: 0, count: T)
                }
                let ct = hole[i] ? nil : UnsafeRawBufferPointer(rebasing: buf[i * unit..<(i + 1) * unit])
                do throws(CryptoError) { try FileCrypto.tag(s, unit: u, ciphertext: ct, into: UnsafeMutableRawBufferPointer(rebasing: e[target..<target + T])) }
                catch { throw .crypto(error) }
            }
        }
        let writeData = { () throws(SystemError) in
            var i = 0
            while i < n {
                var j = i
                while j < n && hole[j] == hole[i] { j += 1 }
                let at = L.dataOffset(unit: run.lowerBound + Int64(i))
                if !hole[i] {
                    try file.write(UnsafeRawBufferPointer(rebasing: buf[i * unit..<j * unit]), at: at)
                } else if i < existing {
                    // Existing units becoming holes (new ones are zeros already).
                    try file.punchHole(at: at, length: Int64(min(j, existing) - i) * B)
                }
                i = j
            }
        }
        if root != nil {
            try writeRooted(run, entries: entries, slots: slots, existing: existing, page: page, &root!, c, writeData: writeData)
            return nil
        }
        do throws(SystemError) {
            // Tags first, then ciphertext: see the type's comment. (Deferred entries belong
            // to a file whose header is not written yet: nothing here is read before it.)
            if !deferEntries {
                try entries.withBytes { (p) throws(SystemError) in try file.write(p, at: L.entryOffset(unit: run.lowerBound)) }
            }
            try writeData()
        } catch { throw .io(error) }
        return deferEntries ? entries : nil
    }

    private func writeHoleEntries(_ run: Range<Int64>, _ s: UnitTagSession, deferEntries: Bool, _ c: FileCrypto, root: inout RootChange?) throws(ContentError) -> [UInt8]? {
        let E = Int(L.entryLength), T = L.tagLength
        var entries = [UInt8](repeating: 0, count: run.count * E)
        try entries.withMutableBytes { (e) throws(ContentError) in
            for i in 0..<run.count {
                do throws(CryptoError) {
                    try FileCrypto.tag(s, unit: run.lowerBound + Int64(i), ciphertext: nil, into: UnsafeMutableRawBufferPointer(rebasing: e[i * E..<i * E + T]))
                } catch { throw .crypto(error) }
            }
        }
        if root != nil {
            try writeRooted(run, entries: entries, slots: [], existing: 0, page: nil, &root!, c, writeData: { () throws(SystemError) in })
            return nil
        }
        if deferEntries { return entries }
        do { try entries.withBytes { (p) throws(SystemError) in try file.write(p, at: L.entryOffset(unit: run.lowerBound)) } } catch { throw .io(error) }
        return nil
    }

    // MARK: - helpers

    /// Reads until `buffer` is full or the file ends; the rest is zeros. Returns the bytes read.
    func readFully(_ buffer: UnsafeMutableRawBufferPointer, at offset: Int64) throws(ContentError) -> Int {
        var done = 0
        while done < buffer.count {
            let n: Int
            do { n = try file.read(into: UnsafeMutableRawBufferPointer(rebasing: buffer[done...]), at: offset + Int64(done)) } catch { throw .io(error) }
            if n == 0 { break }
            done += n
        }
        if done < buffer.count { (buffer.baseAddress! + done).initializeMemory(as: UInt8.self, repeating: 0, count: buffer.count - done) }
        return done
    }

    func readFully(_ bytes: inout [UInt8], at offset: Int64) throws(ContentError) -> Int {
        try bytes.withMutableBytes { (p) throws(ContentError) -> Int in try readFully(p, at: offset) }
    }

    /// Comparison whose time does not depend on where the bytes differ.
    func equal(_ a: UnsafeRawBufferPointer, _ b: UnsafeRawBufferPointer) -> Bool {
        var d: UInt8 = 0
        for i in 0..<a.count { d |= a[i] ^ b[i] }
        return d == 0
    }
}
