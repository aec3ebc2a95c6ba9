import CSysShim
import Dispatch
import XTSContent
import XTSCrypto
import XTSFormat
import XTSFS
import XTSKeys
import XTSSystem
#if canImport(Glibc)
import Glibc
#endif

/// The DEK rekey of an integrity volume's files (FORMAT.md sections 12 and 13.2). The
/// sweep, batches, segments and journals are the plain files' (RekeySweep.swift,
/// RekeyJournal.swift); what differs is what a file is made of. An integrity backing file
/// is a run of whole, aligned 4096-byte blocks (groups of a tag block and 126 data
/// blocks), so each block is rewritten as one new block at the same offset: nothing
/// spills into the next block. A segment is a run of whole groups, so that a tag block is
/// always rewritten together with all of its units.
///
/// Every old unit is checked against its tag before anything of its file is written: a
/// unit that fails stops the rekey there (naming the file), rather than being sealed under
/// the new key as if it were good. The journal keeps, per data unit, the tag that
/// verified its old ciphertext and the tag of its new one; rebuilding a unit after a
/// crash trusts only ciphertext one of them vouches for.
extension RekeySweep {
    typealias IL = IntegrityLayout

    static let groupPlainBytes = IL.unitsPerGroup * IL.blockSize

    /// The plaintext size of a file whose (verified) header is `header`.
    func plainSize(backingSize: Int64, header: [UInt8]) -> Int64 {
        guard integrity else { return Layout.plainSize(backingSize: backingSize) }
        return (24..<32).reduce(Int64(0)) { $0 | Int64(header[$1]) << (8 * ($1 - 24)) }
    }

    /// The backing size a writer leaves for committed length `plain` (FORMAT.md 12.2).
    static func integrityBackingSize(plain: Int64) -> Int64 {
        plain == 0 ? IL.headerLength : IL.backingSize(plainSize: plain)
    }

    /// The plaintext name of entry `name` in the directory being swept (for messages).
    func plainName(_ dirfd: Int32, _ name: String) -> String {
        var encoded = name
        if case .longName = BackingEntry.classify(name) {
            guard let full = try? Sys.readSmallFile(dirfd, name + NameCodec.longSuffix, limit: 4096) else { return name }
            encoded = String(decoding: full, as: UTF8.self)
        }
        for k in [old, new] {
            if let p = try? NameCodec(keys: k).decrypt(encoded, directoryID: directoryID) { return String(decoding: p, as: UTF8.self) }
        }
        return name
    }

    /// The fields of a file header of generation `keys`, checked. With file roots (header
    /// version 3) only its fields are: its MAC covers the root of the file's tag blocks,
    /// checked by `checkOldRoot` before anything of the file is written (and a journal
    /// record's headers are vouched for by the record's own MAC).
    func headerFields(_ raw: [UInt8], keys: KeySet) throws -> IntegrityFileHeader {
        guard unitTags?.hasFileRoot == true else { return try IntegrityFileHeader.decode(raw, macKey: keys.metadataMACKey) }
        let h = try IntegrityFileHeader.parse(raw)
        guard h.flags == IntegrityFileHeader.flagAuthenticated else { throw FormatError.unsupportedFeatures(UInt64(h.flags)) }
        return h
    }

    /// Checks the old header of a file with a file root against the root of its old tag
    /// blocks (each group's committed element: the record's when it names this header, as
    /// a read counts it). A mismatch is tampering (a tag block put back from an older
    /// version of the file, with its units), handled as a unit failing its tag.
    static func checkOldRoot(_ oldHeader: [UInt8], root: RootElement, keys: KeySet) throws(ContentError) {
        guard (try? IntegrityFileHeader.decode(oldHeader, macKey: keys.metadataMACKey, root: root.bytes)) != nil else {
            throw .authentication("the file header does not match the file's tag blocks (the header was changed, or a tag block was changed or put back from an older version of the file)")
        }
    }

    /// The new header of a file with a file root, its MAC over `root` (the XOR of the
    /// elements of the new tag blocks).
    func rootedHeader(_ newHeader: [UInt8], root: RootElement) throws -> [UInt8] {
        try IntegrityFileHeader.parse(newHeader).encode(macKey: new.metadataMACKey, root: root.bytes)
    }

    /// The work for an integrity file still of the old generation (nil when there is
    /// none: empty, new, or damaged, with a warning). Its new header keeps the committed
    /// length and gets a new nonce.
    func prepareIntegrityFile(_ dirfd: Int32, _ fd: Int32, _ name: String, _ st: stat, path: String, lease: RekeyLease?) throws(SweepError) -> Job? {
        let display = plainPath + plainName(dirfd, name)
        var raw = [UInt8](repeating: 0, count: IntegrityFileHeader.length)
        let n: Int
        do { n = try raw.withMutableBytes { (p) throws(SystemError) -> Int in try Sys.pread(fd, p.baseAddress!, p.count, 0) } } catch { throw .system("read file header", error) }
        guard n == raw.count else {
            warnings.append("\(display): backing file shorter than its header; left as it is")
            return nil
        }
        // 64 zero bytes: a first write interrupted before its header, an empty file of no generation.
        if raw.allSatisfy({ $0 == 0 }) { return nil }
        guard let gen = IntegrityFileHeader.claimedGeneration(raw) else { return nil }
        if gen == new.generation { return nil }
        guard gen == old.generation else { warnings.append("\(display): unknown key generation \(gen); left as it is"); return nil }
        let oldHeader: IntegrityFileHeader
        do { oldHeader = try headerFields(raw, keys: old) } catch {
            warnings.append("\(display): damaged file header (\(error)); left as it is")
            return nil
        }
        // A header of the other tag algorithm is damage, as for a read (FORMAT.md 12.3).
        guard let tags = unitTags, oldHeader.tags == tags else {
            warnings.append("\(display): file header of tag algorithm \(oldHeader.version), not the volume's; left as it is")
            return nil
        }
        let plain = Int64(oldHeader.plainLength)
        guard plain <= IL.maxPlainSize else { warnings.append("\(display): a committed length beyond the largest file; left as it is"); return nil }
        guard !tags.hasFileRoot || IL.groupCount(plainSize: plain) <= IL.maxRootGroups else {
            warnings.append("\(display): a committed length beyond the largest file with a file root; left as it is")
            return nil
        }
        do {
            var newHeader = try IntegrityFileHeader.random(tags: tags, keyGeneration: new.generation)
            newHeader.plainLength = oldHeader.plainLength
            // Listing manifests: the file keeps its identity (FORMAT.md 12.10).
            newHeader.fileID = oldHeader.fileID
            // With a file root, the header is encoded again once the root of the new tag
            // blocks is known (before anything is written): for now that of no groups.
            return Job(name: name, stat: st, from: try FileCrypto(keys: old, integrityHeader: oldHeader), to: try FileCrypto(keys: new, integrityHeader: newHeader),
                       oldHeader: raw, newHeader: try newHeader.encode(macKey: new.metadataMACKey, root: tags.hasFileRoot ? IntegrityFileHeader.emptyRoot : nil),
                       fd: fd, lease: lease,
                       size: RekeySweep.integrityBackingSize(plain: plain), plainSize: plain, display: display)
        } catch { throw .damaged("\(error)") }
    }

    /// Makes the backing file exactly as long as its committed length needs: an
    /// uncommitted tail (never read) is cut off, a file cut short is extended with zeros
    /// (read as zeros either way). Neither changes what the old generation reads, so it
    /// comes before the journal; finishing a journal does it again.
    func fitBackingSize(_ fd: Int32, _ size: Int64, path: String) throws(SweepError) {
        do {
            if Int64(try Sys.fstat(fd).st_size) != size { try Sys.ftruncate(fd, size) }
        } catch { throw .system("set the size of a file in \(path)", error) }
    }

    /// One group of an integrity file read into the arena: its backing image (tag block,
    /// then the data blocks of `units`) at `at`; of a group whose data blocks are all
    /// holes in the backing file (`sparse`), the tag block only.
    struct GroupRead {
        var group: Int64
        var units: Range<Int64>
        var at: Int
        var offsetInSegment: Int
        var sparse: Bool
    }

    /// The ciphertext of a group of holes, for checking and sealing a sparse group
    /// (never written: holes are neither decrypted nor encrypted).
    nonisolated(unsafe) static let zeroGroup: UnsafeMutableRawBufferPointer = {
        let b = UnsafeMutableRawBufferPointer.allocate(byteCount: Int(IntegrityLayout.unitsPerGroup * IntegrityLayout.blockSize), alignment: 4096)
        b.initializeMemory(as: UInt8.self, repeating: 0)
        return b
    }()

    /// What sealing a group gives: its data units' journal entries, the runs to write.
    struct GroupResult {
        var units: [JournalTagUnit] = []
        var runs: [(offset: Int64, at: Int, count: Int)] = []
        var failure: (any Error)?
        /// With a file root: the element the old header counts for the group (its old tag
        /// block's, or the record's that names that header), and the new tag block's.
        var oldElement = RootElement()
        var newElement = RootElement()
    }

    /// The new image of whole groups of an integrity file from plaintext offset `start`
    /// (a group boundary) on, until about `budget` bytes were read or the file ends, with
    /// the journal record of that part; the groups are sealed on every processor when
    /// `parallel`. A unit that fails its tag fails the whole segment (nothing is written).
    func integritySegment(_ fd: Int32, name: String, backingSize: Int64, start: Int64, budget: Int64, from: FileCrypto, to: FileCrypto,
                          oldHeader: [UInt8], newHeader: [UInt8], base: Int, parallel: Bool, display: String) throws -> Segment {
        let plain = plainSize(backingSize: backingSize, header: oldHeader)
        let unitCount = IL.unitCount(plain)
        var seg = Segment(record: JournalRecord(integrity: true, oldGeneration: old.generation, newGeneration: new.generation, name: name,
                                                backingSize: backingSize, oldHeader: oldHeader, newHeader: newHeader, coverStart: start, coverEnd: start))
        var reads: [GroupRead] = []
        var cur = base
        var g = start / RekeySweep.groupPlainBytes
        var read: Int64 = 0
        // A file of length 0 with a header: its header is all there is to rewrite.
        if plain == 0 && start == 0 {
            let got = try Sys.pread(fd, arena.buffer.baseAddress! + cur, Int(IL.headerLength), 0)
            guard got == Int(IL.headerLength) else { throw SweepError.damaged("\(display): backing file shorter than its header") }
            reads.append(GroupRead(group: 0, units: 0..<0, at: cur, offsetInSegment: 0, sparse: true))
            cur += Int(IL.blockSize)
        }
        while g * IL.unitsPerGroup < unitCount && read < budget {
            let units = g * IL.unitsPerGroup..<min(unitCount, (g + 1) * IL.unitsPerGroup)
            let n = Int(IL.blockSize) * (1 + units.count)
            let lo = g * IL.groupLength
            // Data blocks that are all holes in the backing file are not read.
            let data = lseek(fd, off_t(lo + IL.blockSize), 3 /* SEEK_DATA */)
            let sparse = (data < 0 && errno == ENXIO) || (data >= 0 && Int64(data) >= lo + Int64(n))
            if data < 0 && errno != ENXIO { throw SystemError(errno, "seek") }
            let want = sparse ? Int(IL.blockSize) : n
            // The part ends where the memory does (a segment holds at least one group: the
            // arena has room for a read past its batch limit).
            guard cur + want <= arena.buffer.count else { break }
            let buf = arena.buffer.baseAddress! + cur
            let got = try Sys.pread(fd, buf, want, lo)
            if got < want { (buf + got).initializeMemory(as: UInt8.self, repeating: 0, count: want - got) }
            reads.append(GroupRead(group: g, units: units, at: cur, offsetInSegment: cur - base, sparse: sparse))
            // A sparse group takes its tag block's room only, and counts as that much read.
            cur += want
            read += Int64(want)
            g += 1
        }
        seg.record.coverEnd = min(g * RekeySweep.groupPlainBytes, plain)
        seg.data = UnsafeRawBufferPointer(rebasing: arena.buffer[base..<cur])
        guard !reads.isEmpty else { return seg }

        let results = UnsafeMutableBufferPointer<GroupResult>.allocate(capacity: reads.count)
        results.initialize(repeating: GroupResult())
        defer { results.deinitialize(); results.deallocate() }
        // Each group is a disjoint part of the arena, each result written by one worker only.
        struct Work: @unchecked Sendable {
            let sweep: RekeySweep
            let reads: [GroupRead]
            let results: UnsafeMutableBufferPointer<GroupResult>
            let base: UnsafeMutableRawPointer
            let from: FileCrypto, to: FileCrypto
            let newHeader: [UInt8]
            let oldMAC: [UInt8]
            let plain: Int64
            func run(_ i: Int) {
                do { results[i] = try sweep.sealGroup(reads[i], at: base + reads[i].at, from: from, to: to, newHeader: newHeader, oldMAC: oldMAC, plain: plain) } catch {
                    results[i].failure = error
                }
            }
        }
        let work = Work(sweep: self, reads: reads, results: results, base: arena.buffer.baseAddress!, from: from, to: to, newHeader: newHeader,
                        oldMAC: Array(IntegrityFileHeader.macBytes(oldHeader)), plain: plain)
        if parallel && reads.count > 1 && RekeySweep.processors > 1 {
            DispatchQueue.concurrentPerform(iterations: reads.count) { work.run($0) }
        } else {
            for i in reads.indices { work.run(i) }
        }
        for i in reads.indices {
            if let e = results[i].failure {
                if let c = e as? ContentError, case .authentication = c { throw SweepError.damaged(RekeySweep.tamperMessage(display, c)) }
                throw e
            }
            seg.record.tagUnits += results[i].units
            seg.runs += results[i].runs
        }
        // A file with a file root in one segment: its old root checked, its new header's
        // MAC computed over the new tag blocks' root and put in group 0's tag block, before
        // anything is written. (A file rewritten in segments had both done by the whole-file
        // check, verifyIntegrityFile: `newHeader` is already the final one.)
        if from.hasFileRoot && start == 0 && seg.record.coverEnd >= plain {
            let G = IL.groupCount(plainSize: plain)
            var oldRoot = RootElement(), newRoot = RootElement()
            for i in reads.indices where reads[i].group < G {
                oldRoot ^= results[i].oldElement
                newRoot ^= results[i].newElement
            }
            do throws(ContentError) { try RekeySweep.checkOldRoot(oldHeader, root: oldRoot, keys: old) } catch {
                throw SweepError.damaged(RekeySweep.tamperMessage(display, error))
            }
            let header = try rootedHeader(newHeader, root: newRoot)
            seg.record.newHeader = header
            header.withUnsafeBytes { (arena.buffer.baseAddress! + reads[0].at).copyMemory(from: $0.baseAddress!, byteCount: header.count) }
        }
        return seg
    }

    /// One group's old units checked against their tags and decrypted, then encrypted and
    /// tagged under the new file keys, and its tag block rebuilt (the new header in group
    /// 0, one new tag per unit in slot A, zeros elsewhere), all in place in the arena.
    ///
    /// With a file root (groups the length covers): the element the old header counts for
    /// the group (`oldMAC`: that header's MAC bytes, which a record naming it carries) and
    /// the new tag block's element. The new tag block is the same whatever wrote it (the
    /// sweep, the whole-file check, a journal being finished): salt and record zero.
    func sealGroup(_ r: GroupRead, at p: UnsafeMutableRawPointer, from: FileCrypto, to: FileCrypto, newHeader: [UInt8], oldMAC: [UInt8], plain: Int64) throws -> GroupResult {
        let B = Int(IL.blockSize), E = Int(IL.entryLength), T = IL.tagLength, H = Int(IL.headerLength)
        let count = r.units.count
        let tagBlock = UnsafeMutableRawBufferPointer(start: p, count: B)
        let rooted = from.hasFileRoot && r.group < IL.groupCount(plainSize: plain)
        var out = GroupResult()
        if rooted {
            let e = try from.element(group: r.group, tagBlock: UnsafeRawBufferPointer(tagBlock))
            if r.group > 0, tagBlock[IL.recordHeaderRange].elementsEqual(oldMAC) {
                out.oldElement = try from.openRecord(tagBlock[IL.recordElementRange])
            } else {
                out.oldElement = e
            }
        }
        let data = r.sparse ? UnsafeMutableRawBufferPointer(rebasing: RekeySweep.zeroGroup[0..<count * B]) : UnsafeMutableRawBufferPointer(start: p + B, count: count * B)
        var entries = [UInt8](repeating: 0, count: count * E)
        entries.withUnsafeMutableBytes { $0.copyMemory(from: UnsafeRawBufferPointer(rebasing: tagBlock[H..<H + count * E])) }
        var hole = [Bool](repeating: false, count: count)
        for i in 0..<count { hole[i] = isZero(data.baseAddress! + i * B, B) }
        var oldTags = [UInt8](repeating: 0, count: count * T), newTags = [UInt8](repeating: 0, count: count * T)
        try entries.withUnsafeBytes { e throws in
            try oldTags.withUnsafeMutableBytes { t throws in try from.openUnits(firstUnit: r.units.lowerBound, count: count, entries: e, data: data, tags: t) }
        }
        // Bytes past the committed length (a shrink leaves them) are not carried over.
        if count > 0, !hole[count - 1], r.units.upperBound == IL.unitCount(plain), plain % IL.blockSize != 0 {
            let from = Int(plain % IL.blockSize)
            (data.baseAddress! + (count - 1) * B + from).initializeMemory(as: UInt8.self, repeating: 0, count: B - from)
        }
        try newTags.withUnsafeMutableBytes { t throws in try to.sealUnits(firstUnit: r.units.lowerBound, count: count, data: data, hole: { hole[$0] }, tags: t) }
        tagBlock.initializeMemory(as: UInt8.self, repeating: 0)
        if r.group == 0 { newHeader.withUnsafeBytes { tagBlock.baseAddress!.copyMemory(from: $0.baseAddress!, byteCount: H) } }
        newTags.withUnsafeBytes { t in
            for i in 0..<count { (tagBlock.baseAddress! + H + i * E).copyMemory(from: t.baseAddress! + i * T, byteCount: T) }
        }
        if rooted { out.newElement = try to.element(group: r.group, tagBlock: UnsafeRawBufferPointer(tagBlock)) }
        for i in 0..<count where !hole[i] {
            out.units.append(JournalTagUnit(start: (r.units.lowerBound + Int64(i)) * IL.blockSize,
                                            oldTag: Array(oldTags[i * T..<(i + 1) * T]), newTag: Array(newTags[i * T..<(i + 1) * T])))
        }
        // Runs of blocks to write: the tag block, then each run of data blocks (holes stay
        // holes). A file of length 0 is its header alone.
        let lo = r.group * IL.groupLength
        if plain == 0 { out.runs.append((0, r.offsetInSegment, H)); return out }
        var k = 0
        while k <= count {
            guard k == 0 || !hole[k - 1] else { k += 1; continue }
            var end = k + 1
            while end <= count && !hole[end - 1] { end += 1 }
            out.runs.append((lo + Int64(k * B), r.offsetInSegment + k * B, (end - k) * B))
            k = end
        }
        return out
    }

    /// Checks every unit of an integrity file against its tag, from plaintext offset
    /// `start` on, without writing anything: a file rewritten in segments (larger than a
    /// batch) is checked whole before its first segment is written, so that a tampered
    /// unit in a later segment stops its rekey before any of it is new (a file half
    /// rewritten would be readable only through its journal, which could never finish).
    /// `end`: stop there (a group boundary), not at the end of the file; `explain`: whether
    /// the error says what the rekey does about it.
    ///
    /// With a file root, checked whole (`start` 0, no `end`) with the new keys `to`: each
    /// group is also sealed under the new keys (in scratch memory, never written), so that
    /// the old header is checked against the root of the old tag blocks, and the root of
    /// the new ones (returned) is known before the first segment, which holds the new
    /// header, is written.
    @discardableResult
    func verifyIntegrityFile(_ fd: Int32, backingSize: Int64, oldHeader: [UInt8], from: FileCrypto, to: FileCrypto? = nil, start: Int64, end: Int64? = nil,
                             display: String, explain: Bool = true) throws(SweepError) -> RootElement? {
        let plain = plainSize(backingSize: backingSize, header: oldHeader)
        let unitCount = IL.unitCount(plain)
        let B = Int(IL.blockSize), E = Int(IL.entryLength), H = Int(IL.headerLength)
        let buf = UnsafeMutableRawBufferPointer.allocate(byteCount: Int(IL.groupLength), alignment: 4096)
        defer { buf.deallocate() }
        var tags = [UInt8](repeating: 0, count: Int(IL.unitsPerGroup) * IL.tagLength)
        var g = start / RekeySweep.groupPlainBytes
        let sealing = from.hasFileRoot && start == 0 && end == nil ? to : nil
        let oldMAC = Array(IntegrityFileHeader.macBytes(oldHeader))
        var oldRoot = RootElement(), newRoot = RootElement()
        do {
            while g * IL.unitsPerGroup < unitCount && (end.map { g * RekeySweep.groupPlainBytes < $0 } ?? true) {
                let units = g * IL.unitsPerGroup..<min(unitCount, (g + 1) * IL.unitsPerGroup)
                let n = B * (1 + units.count), lo = g * IL.groupLength
                let data = lseek(fd, off_t(lo + IL.blockSize), 3 /* SEEK_DATA */)
                if data < 0 && errno != ENXIO { throw SystemError(errno, "seek") }
                let sparse = data < 0 || Int64(data) >= lo + Int64(n)
                let want = sparse ? B : n
                let got = try Sys.pread(fd, buf.baseAddress!, want, lo)
                if got < want { (buf.baseAddress! + got).initializeMemory(as: UInt8.self, repeating: 0, count: want - got) }
                if let to = sealing {
                    let r = try sealGroup(GroupRead(group: g, units: units, at: 0, offsetInSegment: 0, sparse: sparse), at: buf.baseAddress!,
                                          from: from, to: to, newHeader: oldHeader, oldMAC: oldMAC, plain: plain)
                    oldRoot ^= r.oldElement
                    newRoot ^= r.newElement
                    g += 1
                    continue
                }
                let ct = sparse ? UnsafeMutableRawBufferPointer(rebasing: RekeySweep.zeroGroup[0..<units.count * B])
                                : UnsafeMutableRawBufferPointer(rebasing: buf[B..<n])
                try tags.withUnsafeMutableBytes { t in
                    try from.openUnits(firstUnit: units.lowerBound, count: units.count,
                                       entries: UnsafeRawBufferPointer(rebasing: buf[H..<H + units.count * E]), data: ct, tags: t)
                }
                g += 1
            }
            if sealing != nil { try RekeySweep.checkOldRoot(oldHeader, root: oldRoot, keys: old) }
        } catch let c as ContentError {
            if case .authentication = c, explain { throw .damaged(RekeySweep.tamperMessage(display, c)) }
            throw .damaged("\(display): \(c)")
        } catch let e as SystemError { throw .system("read \(display)", e) } catch { throw .damaged("\(display): \(error)") }
        return sealing == nil ? nil : newRoot
    }

    /// A file with a file root rewritten from a journal on (a run resumed after a crash):
    /// its groups from the journal's cover on were checked against their old tags only
    /// (the old root needs the groups already rewritten). A unit put back with its tag
    /// block between the crash and now was sealed under the new keys as it was, and the
    /// new header, made for the file as the first run read it, then does not match the
    /// root of the new tag blocks (the file reads as an error, never as that data): it is
    /// reported here, naming the file.
    func checkNewRoot(_ fd: Int32, newHeader: [UInt8], to: FileCrypto, display: String) throws(SweepError) {
        guard to.hasFileRoot, let h = try? IntegrityFileHeader.parse(newHeader) else { return }
        let G = IL.groupCount(plainSize: Int64(h.plainLength))
        guard G <= IL.maxRootGroups else { return }
        var page = [UInt8](repeating: 0, count: Int(IL.blockSize))
        var root = RootElement()
        do {
            for g in 0..<G {
                let got = try page.withMutableBytes { (p) throws(SystemError) -> Int in try Sys.pread(fd, p.baseAddress!, p.count, IL.tagBlockOffset(group: g)) }
                if got < page.count { page.replaceSubrange(got..., with: repeatElement(0, count: page.count - got)) }
                root ^= try page.withUnsafeBytes { (p) throws(CryptoError) in try to.element(group: g, tagBlock: p) }
            }
        } catch let e as SystemError { throw .system("read \(display)", e) } catch { throw .damaged("\(display): \(error)") }
        if (try? IntegrityFileHeader.decode(newHeader, macKey: new.metadataMACKey, root: root.bytes)) == nil {
            warnings.append("\(display): rewritten under the new key, but its header does not match its tag blocks: a part of the file still to rewrite " +
                            "when the rekey was interrupted was changed or put back from an older version since; the file reads as an error " +
                            "(restore it from a backup)")
        }
    }

    static func tamperMessage(_ display: String, _ c: ContentError) -> String {
        "\(display): \(c); its old contents are not what was written, so the rekey does not seal them under the new key. " +
            "The rekey stops here, nothing of this file rewritten: restore the file from a backup or remove it first"
    }

    // MARK: - finishing a journal

    /// Finishes one integrity record of a journal an interrupted run left (FORMAT.md
    /// 13.2): each data unit it names is new (its new tag matches), or old (its old tag
    /// matches: rebuilt under the new keys), or neither (reported, left: it reads as an
    /// error, never as data); then every tag block of the cover is written from the
    /// journal (salt and record zero: the very bytes the sweep writes, so that a file root
    /// matches the root the record's new header was made for). Returns false (with a
    /// warning) when the record does not fit the file.
    func finishIntegrityRecord(_ fd: Int32, _ st: stat, _ rec: JournalRecord, what: String) throws -> (from: FileCrypto, to: FileCrypto)? {
        // With file roots the headers' MACs cover the roots of tag blocks (the old ones half
        // gone): their fields are taken as the record gives them, which its own MAC vouches for.
        let oldHeader: IntegrityFileHeader, newHeader: IntegrityFileHeader
        do {
            oldHeader = try headerFields(rec.oldHeader, keys: old)
            newHeader = try headerFields(rec.newHeader, keys: new)
        } catch { warnings.append("\(what): a rekey journal record whose headers do not verify; left as it is"); return nil }
        let plain = Int64(newHeader.plainLength)
        let G = RekeySweep.groupPlainBytes
        func aligned(_ x: Int64) -> Bool { x == plain || x % G == 0 }
        let rooted = unitTags?.hasFileRoot == true
        guard !rooted || (oldHeader.tags == unitTags && newHeader.tags == unitTags && IL.groupCount(plainSize: plain) <= IL.maxRootGroups),
              oldHeader.keyGeneration == old.generation, newHeader.keyGeneration == new.generation, oldHeader.plainLength == newHeader.plainLength,
              plain <= IL.maxPlainSize, rec.backingSize == RekeySweep.integrityBackingSize(plain: plain),
              aligned(rec.coverStart), aligned(rec.coverEnd), rec.coverStart <= rec.coverEnd, rec.coverEnd <= plain,
              rec.tagUnits.allSatisfy({ $0.start >= rec.coverStart && $0.start < rec.coverEnd && $0.start % IL.blockSize == 0 }) else {
            warnings.append("\(what): a rekey journal record that does not fit this rekey; left as it is")
            return nil
        }
        var raw = [UInt8](repeating: 0, count: IntegrityFileHeader.length)
        _ = try raw.withMutableBytes { (p) throws(SystemError) -> Int in try Sys.pread(fd, p.baseAddress!, p.count, 0) }
        guard raw == rec.newHeader || (raw == rec.oldHeader && rec.coverStart == 0) else {
            warnings.append("\(what): its header is not the one its rekey journal names; left as it is")
            return nil
        }
        // (Only the file the record names, by its header.) Bytes past the backing size the
        // length needs are never read; missing ones read as zeros.
        if Int64(st.st_size) != rec.backingSize && !dryRun { try Sys.ftruncate(fd, rec.backingSize) }
        let from = try FileCrypto(keys: old, integrityHeader: oldHeader), to = try FileCrypto(keys: new, integrityHeader: newHeader)
        defer { FileCrypto.scrubThreadContext() }
        let byUnit = Dictionary(rec.tagUnits.map { ($0.start / IL.blockSize, $0) }, uniquingKeysWith: { a, _ in a })
        let unitCount = IL.unitCount(plain)
        let B = Int(IL.blockSize), E = Int(IL.entryLength), H = Int(IL.headerLength)
        let block = UnsafeMutableRawBufferPointer.allocate(byteCount: B, alignment: 4096)
        defer { block.deallocate() }
        if plain == 0 {
            if raw != rec.newHeader && !dryRun { try rec.newHeader.withBytes { (p) throws(SystemError) in try Sys.pwrite(fd, p.baseAddress!, p.count, 0) } }
            return (from, to)
        }
        var g = rec.coverStart / G
        while g * G < rec.coverEnd {
            let units = g * IL.unitsPerGroup..<min(unitCount, (g + 1) * IL.unitsPerGroup)
            var tagBlock = [UInt8](repeating: 0, count: B)
            if g == 0 { tagBlock.replaceSubrange(0..<H, with: rec.newHeader) }
            for u in units {
                let at = IL.dataOffset(unit: u)
                let got = try Sys.pread(fd, block.baseAddress!, B, at)
                if got < B { (block.baseAddress! + got).initializeMemory(as: UInt8.self, repeating: 0, count: B - got) }
                let isHole = isZero(block.baseAddress!, B)
                var tag: [UInt8]
                if let j = byUnit[u] {
                    tag = j.newTag
                    if !isHole, try to.unitTag(unit: u, ciphertext: UnsafeRawBufferPointer(block)) == j.newTag {
                        // New already.
                    } else if !isHole, try from.unitTag(unit: u, ciphertext: UnsafeRawBufferPointer(block)) == j.oldTag {
                        try from.cryptWhole(block, firstUnit: u, count: 1, encrypt: false)
                        if u == unitCount - 1, plain % IL.blockSize != 0 {
                            let keep = Int(plain % IL.blockSize)
                            (block.baseAddress! + keep).initializeMemory(as: UInt8.self, repeating: 0, count: B - keep)
                        }
                        try to.cryptWhole(block, firstUnit: u, count: 1, encrypt: true)
                        guard try to.unitTag(unit: u, ciphertext: UnsafeRawBufferPointer(block)) == j.newTag else {
                            throw SweepError.damaged("\(what): unit \(u) rebuilt from its journal does not match its new tag")
                        }
                        if !dryRun { try Sys.pwrite(fd, block.baseAddress!, B, at) }
                    } else {
                        warnings.append("\(what): unit \(u) matches neither its old nor its new ciphertext (a torn block write, or changed since the rekey read it); left as it is: it reads as an error")
                    }
                } else {
                    // A hole when the rekey read it: it stays one (if it is not one now, its hole tag makes it read as an error).
                    tag = try to.unitTag(unit: u, ciphertext: nil)
                    if !isHole { warnings.append("\(what): unit \(u) was a hole when the rekey read it and is not now; left as it is: it reads as an error") }
                }
                tagBlock.replaceSubrange(H + Int(u - units.lowerBound) * E..<H + Int(u - units.lowerBound) * E + tag.count, with: tag)
            }
            if !dryRun { try tagBlock.withBytes { (p) throws(SystemError) in try Sys.pwrite(fd, p.baseAddress!, p.count, g * IL.groupLength) } }
            g += 1
        }
        return (from, to)
    }
}
