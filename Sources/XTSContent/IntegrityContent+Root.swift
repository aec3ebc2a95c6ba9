import XTSCrypto
import XTSFormat
import XTSKeys
import XTSSystem

/// File roots (file header version 3, FORMAT.md 12.11): the header's MAC covers the XOR
/// of one element per tag block the file's length covers, so a tag block (with the units
/// it vouches for) cannot be put back from an older version of the file.
///
/// While a change is under way the header cannot follow every tag block write, so a tag
/// block of a later group that changes carries a *record*: the element the current header
/// counts for it, and that header's MAC bytes. A reader counts the recorded element for
/// every tag block whose record names the header it checks, and the actual element for
/// every other. Group 0's tag block is the header's own page: it is written together with
/// a header in one `pwrite`, and needs no record.
extension IntegrityContent {
    /// The checked header and its keys, on a volume with file roots: the header's fields,
    /// the keys its nonce gives, then its MAC over the root of the tag blocks (read anew
    /// unless `crypto` verified this very header before).
    func rootedState(_ raw: [UInt8], _ crypto: FileCrypto?) throws(ContentError) -> (header: IntegrityFileHeader, crypto: FileCrypto) {
        let fields: IntegrityFileHeader
        do { fields = try IntegrityFileHeader.parse(raw) } catch { throw .badHeader("\(error)") }
        guard fields.version == tags.rawValue else {
            throw .badHeader("file header of version \(fields.version) (\(fields.tags.map { "\($0)" } ?? "?") unit tags) on a volume whose files have version \(tags.rawValue) (\(tags))")
        }
        guard fields.plainLength <= UInt64(L.maxPlainSize) else { throw .badHeader("claims \(fields.plainLength) bytes, beyond the largest file the format allows") }
        let c: FileCrypto
        if let cc = crypto, cc.hasFileRoot, cc.header.nonce == fields.nonce, cc.header.keyGeneration == fields.keyGeneration { c = cc } else {
            guard let k = keys(fields.keyGeneration) else { throw .badHeader("written under key generation \(fields.keyGeneration), which this volume no longer holds") }
            do { c = try FileCrypto(keys: k, integrityHeader: fields) } catch { throw .crypto(error) }
        }
        guard let cache = c.root else { throw .badHeader("no file root keys") }
        if cache.isVerified(raw) { return (fields, c) }
        let scan = try scanRoot(raw, fields, c)
        let h: IntegrityFileHeader
        do { h = try IntegrityFileHeader.decode(raw, macKey: c.keys.metadataMACKey, root: scan.committed.bytes) } catch {
            throw .authentication("the file header does not match the file's tag blocks (the header was changed, or a tag block was changed or put back from an older version of the file)")
        }
        guard h.flags == IntegrityFileHeader.flagAuthenticated else { throw .badHeader("flags \(h.flags)") }
        if fileIDs != (h.fileID != IntegrityFileHeader.noFileID) {
            throw .badHeader(fileIDs ? "no file ID, on a volume with listing manifests" : "a file ID, on a volume without listing manifests")
        }
        cache.store(header: raw, elements: scan.elements, recorded: scan.recorded)
        return (h, c)
    }

    /// Every tag block the header's length covers: each one's actual element, the records
    /// that name this header, and the root the header must then commit to.
    func scanRoot(_ raw: [UInt8], _ h: IntegrityFileHeader, _ c: FileCrypto) throws(ContentError) -> (committed: RootElement, elements: [RootElement], recorded: [Int64: RootElement]) {
        let G = L.groupCount(plainSize: Int64(h.plainLength))
        guard G <= L.maxRootGroups else {
            throw .badHeader("claims \(h.plainLength) bytes: a file with a file root holds at most \(L.maxRootGroups * L.unitsPerGroup * L.blockSize) bytes in this version")
        }
        if G > 0 {
            // A backing file cut short of its last tag block: nothing to scan past its end.
            let need = L.tagBlockOffset(group: G - 1) + L.blockSize, have = try backingSize()
            guard have >= need else { throw .authentication("backing file cut short: \(have) bytes, but its header commits tag blocks up to byte \(need)") }
        }
        let mac = Array(IntegrityFileHeader.macBytes(raw))
        var committed = RootElement()
        var elements: [RootElement] = []
        elements.reserveCapacity(Int(G))
        var recorded: [Int64: RootElement] = [:]
        var page = [UInt8](repeating: 0, count: Int(L.blockSize))
        for g in 0..<G {
            _ = try readFully(&page, at: L.tagBlockOffset(group: g))
            // A covered group's tag block always holds tags (a hole has one too): all zeros
            // is a hole punched or planted in the backing file, found without reading on.
            if g > 0 && FileCrypto.isZero(page, page.count) {
                throw .authentication("the tag block of units \(g * L.unitsPerGroup)–\((g + 1) * L.unitsPerGroup - 1) is all zeros")
            }
            let e = try element(g, page, c)
            elements.append(e)
            if g > 0, page[L.recordHeaderRange].elementsEqual(mac) {
                let r: RootElement
                do { r = try c.openRecord(page[L.recordElementRange]) } catch { throw .crypto(error) }
                recorded[g] = r
                committed ^= r
            } else {
                committed ^= e
            }
        }
        return (committed, elements, recorded)
    }

    func element(_ g: Int64, _ page: [UInt8], _ c: FileCrypto) throws(ContentError) -> RootElement {
        do { return try page.withBytes { (p) throws(CryptoError) in try c.element(group: g, tagBlock: p) } } catch { throw .crypto(error) }
    }

    /// Reads the tag block of group `g` and checks it against what the file root vouches
    /// for: the element verified under the current header. A tag block that differs (put
    /// back, changed, or being changed by another host) makes every tag block be read again
    /// under the header now on disk; it must then verify.
    func verifiedTagBlock(_ g: Int64, _ c: FileCrypto) throws(ContentError) -> [UInt8] {
        guard let cache = c.root else { throw .badHeader("no file root keys") }
        var page = [UInt8](repeating: 0, count: Int(L.blockSize))
        _ = try readFully(&page, at: L.tagBlockOffset(group: g))
        let e = try element(g, page, c)
        if cache.element(g) == e { return page }
        cache.reset()
        let units = "units \(g * L.unitsPerGroup)–\((g + 1) * L.unitsPerGroup - 1) (plaintext bytes \(g * L.unitsPerGroup * L.blockSize)–\((g + 1) * L.unitsPerGroup * L.blockSize - 1))"
        guard let raw = try headerBytes() else { throw .authentication("the file header disappeared while the file was read") }
        do { _ = try rootedState(raw, c) } catch {
            // Name where the change was seen: the tag block of these units.
            guard case .authentication(let why) = error else { throw error }
            throw .authentication("the tag block of \(units) changed since it was verified: \(why)")
        }
        _ = try readFully(&page, at: L.tagBlockOffset(group: g))
        let again = try element(g, page, c)
        guard cache.element(g) == again else {
            throw .authentication("the tag block of \(units) does not match the file root")
        }
        return page
    }
}

/// One change of a file with a file root, group by group (FORMAT.md 12.11): the header
/// MAC the records of its tag blocks name, the elements of the tag blocks it rewrote (over
/// those the file's cache verified), and group 0's new tag block, written last with the
/// new header.
struct RootChange {
    /// The header the change started from (nil: a file without one yet).
    var header: IntegrityFileHeader?
    /// MAC bytes of the header on disk now (zeros for a file without one: no record names them).
    var mac: [UInt8]
    let cache: FileRootCache
    var overlay: [Int64: RootElement] = [:]
    var recorded: [Int64: RootElement]
    var page0: [UInt8]?

    init(header: IntegrityFileHeader?, crypto c: FileCrypto) {
        self.header = header
        cache = c.root ?? FileRootCache()
        let s = cache.snapshot()
        mac = header == nil || s.header.isEmpty ? [UInt8](repeating: 0, count: 16) : Array(IntegrityFileHeader.macBytes(s.header))
        recorded = header == nil ? [:] : s.recorded
    }

    /// Group `g`'s tag block as it is on disk now.
    func actual(_ g: Int64) -> RootElement { overlay[g] ?? (header == nil ? nil : cache.element(g)) ?? RootElement() }

    /// The element the header on disk counts for group `g`.
    func committed(_ g: Int64) -> RootElement { recorded[g] ?? actual(g) }

    mutating func set(_ g: Int64, _ e: RootElement) { overlay[g] = e }

    /// The root of the actual tag blocks of the first `groups` groups.
    func root(groups: Int64) -> RootElement {
        header == nil ? overlay.filter { $0.key < groups }.values.reduce(RootElement(), ^) : cache.root(groups: groups, overlay: overlay)
    }
}

extension IntegrityContent {
    /// Writes the new entries of `run` (`entries`: mid entries, each existing unit's old
    /// tag kept in slot `slots[i]`, its new one in the other) and its ciphertext
    /// (`writeData`) so that the file verifies whenever the writer stops:
    ///
    /// - group 0: with existing units changing, the tag block holding both tags goes in one
    ///   `pwrite` with a header whose root counts it; the ciphertext; the tag block holding
    ///   only the new tags is kept for the final header;
    /// - other groups: the tag block holding both tags, with a new salt and a record
    ///   naming the header on disk and the element it counts; the ciphertext; the tag
    ///   block holding only the new tags (same record). The final header counts it.
    func writeRooted(_ run: Range<Int64>, entries: [UInt8], slots: [Int], existing: Int, page loaded: [UInt8]?,
                     _ t: inout RootChange, _ c: FileCrypto, writeData: () throws(SystemError) -> Void) throws(ContentError) {
        let g = L.group(of: run.lowerBound)
        let E = Int(L.entryLength), T = L.tagLength, H = Int(L.headerLength)
        let at = H + Int(run.lowerBound - g * L.unitsPerGroup) * E
        var mid: [UInt8]
        if let loaded { mid = loaded } else if g == 0, let p = t.page0 { mid = p } else if let h = t.header, g < L.groupCount(plainSize: Int64(h.plainLength)) {
            mid = try verifiedTagBlock(g, c)
        } else {
            // A group past the committed length: nothing in it is read before the new header.
            mid = [UInt8](repeating: 0, count: Int(L.blockSize))
            _ = try readFully(&mid, at: L.tagBlockOffset(group: g))
        }
        mid.replaceSubrange(at..<at + entries.count, with: entries)
        var final = mid
        for i in 0..<existing {
            let old = at + i * E + slots[i] * T
            final.replaceSubrange(old..<old + T, with: repeatElement(0, count: T))
        }
        if g == 0 {
            if existing > 0, let h = t.header {
                t.set(0, try element(0, mid, c))
                let bytes: [UInt8]
                do { bytes = try h.encode(macKey: c.keys.metadataMACKey, root: t.root(groups: L.groupCount(plainSize: Int64(h.plainLength))).bytes) } catch { throw .crypto(error) }
                mid.replaceSubrange(0..<H, with: bytes)
                try write(mid, at: 0)
                t.mac = Array(IntegrityFileHeader.macBytes(bytes))
                t.recorded = [:]
            }
            do { try writeData() } catch { throw .io(error) }
            t.page0 = final
            t.set(0, try element(0, final, c))
            return
        }
        let committed = t.committed(g)
        let salt: [UInt8], record: [UInt8]
        do { salt = try Random.bytes(16); record = try c.sealRecord(committed) } catch { throw .crypto(error) }
        for i in 0..<2 {
            var b = i == 0 ? mid : final
            b.replaceSubrange(L.saltRange, with: salt)
            b.replaceSubrange(L.recordElementRange, with: record)
            b.replaceSubrange(L.recordHeaderRange, with: t.mac)
            b.replaceSubrange(L.recordHeaderRange.upperBound..<H, with: repeatElement(0, count: H - L.recordHeaderRange.upperBound))
            if i == 0 { mid = b } else { final = b }
        }
        try write(mid, at: L.tagBlockOffset(group: g))
        do { try writeData() } catch { throw .io(error) }
        if existing > 0 { try write(final, at: L.tagBlockOffset(group: g)) }
        t.recorded[g] = committed
        t.set(g, try element(g, final, c))
    }

    private func write(_ bytes: [UInt8], at offset: Int64) throws(ContentError) {
        do { try bytes.withBytes { (p) throws(SystemError) in try file.write(p, at: offset) } } catch { throw .io(error) }
    }

    /// The last write of a change: the header with the new length and the root of every
    /// tag block it covers, with group 0's new tag block when the change touched it.
    func commitRooted(_ h: IntegrityFileHeader, _ t: RootChange, _ c: FileCrypto) throws(ContentError) {
        let groups = L.groupCount(plainSize: Int64(h.plainLength))
        var bytes: [UInt8]
        do { bytes = try h.encode(macKey: c.keys.metadataMACKey, root: t.root(groups: groups).bytes) } catch { throw .crypto(error) }
        let header = bytes
        if let p = t.page0 { bytes += p[Int(L.headerLength)...] }
        try write(bytes, at: 0)
        if t.header == nil { t.cache.reset() }
        t.cache.commit(header: header, groups: groups, overlay: t.overlay)
    }
}

extension IntegrityContent {
    /// Tag blocks whose record names the header on disk were left so by a change cut off
    /// (a crash): their units may still hold both the tag of the version before that change
    /// and the one after. Before a new header makes them count as they are, each unit keeps
    /// only the tag its ciphertext has now, so neither version can later be put back in
    /// place of the other. A unit that matches neither is damage (EIO).
    func settleRecorded(_ t: inout RootChange, _ c: FileCrypto) throws(ContentError) {
        guard let h = t.header, !t.recorded.isEmpty else { return }
        let n = L.unitCount(Int64(h.plainLength))
        let s: UnitTagSession
        do { s = try c.tagSession() } catch { throw .crypto(error) }
        let E = Int(L.entryLength), T = L.tagLength, H = Int(L.headerLength)
        for g in t.recorded.keys.sorted() where g * L.unitsPerGroup < n {
            var page = [UInt8](repeating: 0, count: Int(L.blockSize))
            _ = try readFully(&page, at: L.tagBlockOffset(group: g))
            guard try element(g, page, c) == t.actual(g) else {
                throw .authentication("the tag block of units \(g * L.unitsPerGroup)–\((g + 1) * L.unitsPerGroup - 1) changed while the file was changed")
            }
            let first = g * L.unitsPerGroup, count = Int(min(L.unitsPerGroup, n - first))
            let buf = ThreadScratch.buffer(.request, count: count * unit)
            _ = try readFully(buf, at: L.dataOffset(unit: first))
            var changed = false
            var tag = [UInt8](repeating: 0, count: T)
            for i in 0..<count {
                let ct = UnsafeRawBufferPointer(rebasing: buf[i * unit..<(i + 1) * unit])
                let hole = FileCrypto.isZero(ct.baseAddress!, unit)
                do throws(CryptoError) {
                    try tag.withMutableBytes { (o) throws(CryptoError) in try FileCrypto.tag(s, unit: first + Int64(i), ciphertext: hole ? nil : ct, into: o) }
                } catch { throw .crypto(error) }
                let a = H + i * E, b = a + T
                let keep: Int
                // In constant time, as every tag comparison: the slots are the planter's to choose.
                let matches = { (at: Int) -> Bool in
                    page.withUnsafeBytes { p in tag.withUnsafeBytes { t in equal(UnsafeRawBufferPointer(rebasing: p[at..<at + T]), t) } }
                }
                if matches(a) { keep = a } else if matches(b) { keep = b } else {
                    let u = first + Int64(i)
                    throw .authentication("unit \(u) (plaintext bytes \(u * L.blockSize)–\((u + 1) * L.blockSize - 1)) does not match its tag")
                }
                let drop = keep == a ? b : a
                if page[drop..<drop + T].contains(where: { $0 != 0 }) {
                    page.replaceSubrange(drop..<drop + T, with: repeatElement(0, count: T))
                    changed = true
                }
            }
            guard changed else { continue }
            try write(page, at: L.tagBlockOffset(group: g))
            t.cache.replace(g, try element(g, page, c))
        }
    }
}
