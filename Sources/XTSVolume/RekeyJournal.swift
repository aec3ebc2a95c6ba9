import CSysShim
import Dispatch
import XTSContent
import XTSCrypto
import XTSFormat
import XTSKeys
import XTSSystem
#if canImport(Glibc)
import Glibc
#endif

/// The checksum journal of a DEK rekey (FORMAT.md section 13.1): before files are
/// overwritten in place with their new ciphertext, `xtsfs.rekey-journal` in their directory
/// records, for every unit written, a hash of its new and of its old ciphertext and the
/// few bytes of it that lie in the next 4096-byte block of the backing file. After a crash
/// each unit is then new (its hash matches), old (re-encrypted again from the old key) or
/// new in one block and old in the other (put together from the journal's bytes).
enum RekeyJournal {
    static let name = BackingEntry.rekeyJournalName
    static let temporary = name + ".tmp"
    static let magic: [UInt8] = Array("XRJ1".utf8)
    /// A record of a file of an integrity volume (FORMAT.md section 13.2).
    static let integrityMagic: [UInt8] = Array("XRJI".utf8)
    static let macLabel: [UInt8] = Array("xtsfs v1 rekey journal".utf8)
    static let macLength = 32
    /// The longest journal read back: one batch's is about 2.2% of 64 MiB.
    static let maxLength = 16 << 20
    static let page: Int64 = 4096

    /// Where unit `u` lies in the backing file: its head, in the 4096-byte block its first
    /// byte is in, and its tail, the rest (at most 47 bytes, in the next block; empty when
    /// the unit ends in the same block).
    static func pieces(_ u: Layout.Unit) -> (head: Range<Int64>, tail: Range<Int64>) {
        let b = Layout.headerLength + u.start, e = Layout.headerLength + u.end
        let h = min(e, (b / page + 1) * page)
        return (b..<h, h..<e)
    }

    /// XXH64 (seed 0) of a piece: fast (the journal costs no more than a copy in memory)
    /// and enough to tell two known ciphertexts apart; the journal's MAC protects it.
    static func hash(_ p: UnsafeRawBufferPointer) -> UInt64 { XXH64.hash(p) }
}

/// Memory for the new ciphertext of one batch (or one segment of a large file), reused
/// from batch to batch: `batchLimit` bytes, plus one read's worth past it.
final class RekeyArena {
    let buffer: UnsafeMutableRawBufferPointer
    var used = 0
    init(size: Int) { buffer = .allocate(byteCount: size, alignment: 4096) }
    deinit { buffer.deallocate() }
}

/// One unit of a journalled file: where it starts (plain offset) and what tells its
/// generation and rebuilds it.
struct JournalUnit {
    var start: Int64
    var newHead: UInt64
    var oldHead: UInt64
    var oldTail: [UInt8]
    var newTail: [UInt8]
}

/// One data unit of a journalled file of an integrity volume: where it starts (plain
/// offset), the tag that verified its old ciphertext and the tag of its new one. Tags,
/// not hashes: they tell old from new with the file's own keys, so rebuilding a unit
/// never trusts ciphertext that no tag vouches for (FORMAT.md section 13.2).
struct JournalTagUnit {
    var start: Int64
    var oldTag: [UInt8]
    var newTag: [UInt8]
}

/// One file's record in a rekey journal: the units it covers are `coverStart..<coverEnd`
/// (plain offsets, unit aligned); a unit there without an entry was a hole (all-zero
/// ciphertext) and is not written. Before `coverStart` the file is new and durable;
/// from `coverEnd` on it is old. A record of an integrity volume's file (`integrity`)
/// has 64-byte headers, covers whole groups (or runs to the end of the file), and keeps
/// `tagUnits` instead of `units`.
struct JournalRecord {
    var integrity = false
    var oldGeneration: UInt32
    var newGeneration: UInt32
    var name: String
    var backingSize: Int64
    var oldHeader: [UInt8]
    var newHeader: [UInt8]
    var coverStart: Int64
    var coverEnd: Int64
    var units: [JournalUnit] = []
    var tagUnits: [JournalTagUnit] = []

    func encode(macKey: SecretBytes) throws -> [UInt8] {
        var w = ByteWriter(capacity: 220 + units.count * 90 + tagUnits.count * 40)
        w.u32(oldGeneration); w.u32(newGeneration)
        try w.blob16(Array(name.utf8))
        w.u64(UInt64(backingSize))
        w.raw(oldHeader); w.raw(newHeader)
        w.u64(UInt64(coverStart)); w.u64(UInt64(coverEnd))
        if integrity {
            w.u32(UInt32(tagUnits.count))
            for u in tagUnits { w.u64(UInt64(u.start)); w.raw(u.oldTag); w.raw(u.newTag) }
        } else {
            w.u32(UInt32(units.count))
            for u in units {
                w.u64(UInt64(u.start)); w.u64(u.newHead); w.u64(u.oldHead)
                w.u8(UInt8(u.oldTail.count)); w.raw(u.oldTail); w.raw(u.newTail)
            }
        }
        let body = w.bytes
        var out = ByteWriter(capacity: body.count + 40)
        out.raw(integrity ? RekeyJournal.integrityMagic : RekeyJournal.magic)
        out.u32(UInt32(body.count))
        out.raw(body)
        out.raw(try HMACSHA256.mac(key: macKey, data: RekeyJournal.macLabel + body))
        return out.bytes
    }

    /// Every record of a journal, each checked against its MAC (a journal is complete
    /// once it has its name: one that does not verify was not written by this rekey).
    static func decodeAll(_ bytes: [UInt8], macKey: SecretBytes) throws -> [JournalRecord] {
        var records: [JournalRecord] = []
        var r = ByteReader(bytes)
        while r.remaining > 0 {
            let magic = try r.raw(4, "journal magic")
            guard magic == RekeyJournal.magic || magic == RekeyJournal.integrityMagic else { throw FormatError.invalid("not a rekey journal record") }
            let integrity = magic == RekeyJournal.integrityMagic
            let headerLength = integrity ? IntegrityFileHeader.length : FileHeader.length
            let n = Int(try r.u32("journal record length"))
            let body = try r.raw(n, "journal record")
            let mac = try r.raw(RekeyJournal.macLength, "journal record MAC")
            guard constantTimeEqual(try HMACSHA256.mac(key: macKey, data: RekeyJournal.macLabel + body), mac) else {
                throw FormatError.checksumMismatch("rekey journal record")
            }
            var b = ByteReader(body)
            var rec = JournalRecord(oldGeneration: try b.u32("generation"), newGeneration: try b.u32("generation"),
                                    name: String(decoding: try b.blob16("name"), as: UTF8.self),
                                    backingSize: Int64(bitPattern: try b.u64("size")),
                                    oldHeader: try b.raw(headerLength, "old header"), newHeader: try b.raw(headerLength, "new header"),
                                    coverStart: Int64(bitPattern: try b.u64("cover")), coverEnd: Int64(bitPattern: try b.u64("cover")))
            rec.integrity = integrity
            let count = Int(try b.u32("unit count"))
            if integrity {
                let T = IntegrityLayout.tagLength
                guard count <= b.remaining / (8 + 2 * T) else { throw FormatError.invalid("journal unit count") }
                rec.tagUnits.reserveCapacity(count)
                for _ in 0..<count {
                    rec.tagUnits.append(JournalTagUnit(start: Int64(bitPattern: try b.u64("unit")), oldTag: try b.raw(T, "tag"), newTag: try b.raw(T, "tag")))
                }
                guard b.remaining == 0 else { throw FormatError.invalid("journal record has trailing bytes") }
                records.append(rec)
                continue
            }
            guard count <= b.remaining / 25 else { throw FormatError.invalid("journal unit count") }
            rec.units.reserveCapacity(count)
            for _ in 0..<count {
                let start = Int64(bitPattern: try b.u64("unit")), newHead = try b.u64("hash"), oldHead = try b.u64("hash")
                let t = Int(try b.u8("tail"))
                rec.units.append(JournalUnit(start: start, newHead: newHead, oldHead: oldHead, oldTail: try b.raw(t, "tail"), newTail: try b.raw(t, "tail")))
            }
            guard b.remaining == 0 else { throw FormatError.invalid("journal record has trailing bytes") }
            records.append(rec)
        }
        return records
    }
}

/// The new ciphertext of a part of a file, in memory (the arena), with its journal record.
struct Segment {
    var record: JournalRecord
    /// The part's units as read, data units re-encrypted (zero units stay zero and are not written).
    var data = UnsafeRawBufferPointer(start: nil, count: 0)
    /// (backing offset, index in `data`, length) of each run of data units.
    var runs: [(offset: Int64, at: Int, count: Int)] = []
}

extension RekeySweep {
    /// One piece of a file read into the arena, to be re-encrypted there.
    struct ReadChunk {
        var segment: Int
        var lo: Int64
        /// Where in the arena, and where in its segment's data.
        var at: Int
        var offsetInSegment: Int
        var units: [Layout.Unit]
    }

    /// What re-encrypting a chunk gives: its units' journal entries and runs to write.
    struct ChunkResult {
        var units: [JournalUnit] = []
        var runs: [(offset: Int64, at: Int, count: Int)] = []
        var failure: (any Error)?
    }

    /// Computes the new ciphertext of the file's units from plain offset `start` on, until
    /// about `budget` bytes of data were read or the file ends, with the journal record
    /// of that part. Holes (all-zero units) are skipped and stay holes.
    func computeSegment(_ fd: Int32, name: String, backingSize: Int64, start: Int64, budget: Int64,
                        from: FileCrypto, to: FileCrypto, oldHeader: [UInt8], newHeader: [UInt8], display: String) throws -> Segment {
        if integrity {
            let seg = try integritySegment(fd, name: name, backingSize: backingSize, start: start, budget: budget, from: from, to: to,
                                           oldHeader: oldHeader, newHeader: newHeader, base: arena.used, parallel: true, display: display)
            arena.used += seg.data.count
            return seg
        }
        var chunks: [ReadChunk] = []
        var segs = [try readSegment(fd, index: 0, name: name, backingSize: backingSize, start: start, budget: budget,
                                    oldHeader: oldHeader, newHeader: newHeader, base: arena.used, chunks: &chunks)]
        arena.used += segs[0].data.count
        try encryptChunks(chunks, into: &segs, cryptos: [(from, to)])
        return segs[0]
    }

    /// Reads a segment of a file into the arena from offset `base` on, as chunks of at
    /// most `chunk` bytes of whole units; holes of the backing file are not read.
    func readSegment(_ fd: Int32, index: Int, name: String, backingSize: Int64, start: Int64, budget: Int64,
                     oldHeader: [UInt8], newHeader: [UInt8], base: Int, chunks: inout [ReadChunk]) throws -> Segment {
        let size = Layout.plainSize(backingSize: backingSize)
        let header = Layout.headerLength
        var seg = Segment(record: JournalRecord(oldGeneration: old.generation, newGeneration: new.generation, name: name, backingSize: backingSize,
                                                oldHeader: oldHeader, newHeader: newHeader, coverStart: start, coverEnd: start))
        var cur = base
        var pos = start
        var read: Int64 = 0
        while pos < size && read < budget {
            let data = lseek(fd, off_t(header + pos), 3 /* SEEK_DATA */)
            if data < 0 { if errno == ENXIO { pos = size; break }; throw SystemError(errno, "seek") }
            var s = max(pos, (Int64(data) - header) / 4096 * 4096)
            if s >= size { pos = size; break }
            s = Layout.unit(at: s, size: size).start
            let units = Layout.units(overlapping: s..<min(s + Int64(RekeySweep.chunk), size), size: size)
            let lo = units.first!.start, hi = units.last!.end
            let n = Int(hi - lo)
            // The part ends where the memory does (batches are sized not to reach it).
            guard cur + n <= arena.buffer.count else { break }
            let buf = arena.buffer.baseAddress! + cur
            let got = try Sys.pread(fd, buf, n, header + lo)
            if got < n { (buf + got).initializeMemory(as: UInt8.self, repeating: 0, count: n - got) }
            chunks.append(ReadChunk(segment: index, lo: lo, at: cur, offsetInSegment: cur - base, units: units))
            cur += n
            pos = hi
            read += Int64(n)
        }
        seg.record.coverEnd = min(pos, size)
        seg.data = UnsafeRawBufferPointer(rebasing: arena.buffer[base..<cur])
        return seg
    }

    /// Re-encrypts read chunks in place in the arena, on every processor, and puts each
    /// segment's journal entries and runs together in file order.
    func encryptChunks(_ chunks: [ReadChunk], into segs: inout [Segment], cryptos: [(from: FileCrypto, to: FileCrypto)]) throws {
        let results = UnsafeMutableBufferPointer<ChunkResult>.allocate(capacity: chunks.count)
        results.initialize(repeating: ChunkResult())
        defer { results.deinitialize(); results.deallocate() }
        // The chunks are disjoint parts of the arena, each result written by one worker only.
        struct Work: @unchecked Sendable {
            let sweep: RekeySweep
            let chunks: [ReadChunk]
            let results: UnsafeMutableBufferPointer<ChunkResult>
            let base: UnsafeMutableRawPointer
            let cryptos: [(from: FileCrypto, to: FileCrypto)]
            func run(_ i: Int) {
                let c = chunks[i]
                do { results[i] = try sweep.encryptChunk(c, at: base + c.at, crypto: cryptos[c.segment]) } catch { results[i].failure = error }
            }
        }
        let work = Work(sweep: self, chunks: chunks, results: results, base: arena.buffer.baseAddress!, cryptos: cryptos)
        if chunks.count > 1 && RekeySweep.processors > 1 {
            DispatchQueue.concurrentPerform(iterations: chunks.count) { work.run($0) }
        } else {
            for i in chunks.indices { work.run(i) }
        }
        for (i, c) in chunks.enumerated() {
            if let e = results[i].failure { throw e }
            segs[c.segment].record.units += results[i].units
            segs[c.segment].runs += results[i].runs
        }
    }

    static let processors = sysconf(Int32(_SC_NPROCESSORS_ONLN))

    /// The new ciphertext of whole files (a batch), each read and re-encrypted into its own
    /// part of the arena (its backing size, in order), the files shared among the processors.
    func computeBatch(_ jobs: [Job]) throws -> [Segment] {
        struct Result { var segment: Segment?; var failure: (any Error)? }
        let results = UnsafeMutableBufferPointer<Result>.allocate(capacity: jobs.count)
        results.initialize(repeating: Result())
        defer { results.deinitialize(); results.deallocate() }
        var bases: [Int] = []
        var next = 0
        // (An integrity file of length 0, its 64-byte header, is read into a block of room.)
        for j in jobs { bases.append(next); next += Int(integrity ? max(j.size, IntegrityLayout.blockSize) : j.size) }
        guard next <= arena.buffer.count else { throw SweepError.damaged("a batch larger than its memory") }
        struct Work: @unchecked Sendable {
            let sweep: RekeySweep
            let jobs: [Job]
            let bases: [Int]
            let results: UnsafeMutableBufferPointer<Result>
            func run(_ i: Int) {
                let j = jobs[i]
                do {
                    if sweep.integrity {
                        results[i].segment = try sweep.integritySegment(j.fd, name: j.name, backingSize: j.size, start: 0, budget: .max, from: j.from, to: j.to,
                                                                        oldHeader: j.oldHeader, newHeader: j.newHeader, base: bases[i], parallel: false, display: j.display)
                        return
                    }
                    var chunks: [ReadChunk] = []
                    var segs = [try sweep.readSegment(j.fd, index: 0, name: j.name, backingSize: Int64(j.stat.st_size), start: 0, budget: .max,
                                                      oldHeader: j.oldHeader, newHeader: j.newHeader, base: bases[i], chunks: &chunks)]
                    for c in chunks {
                        let r = try sweep.encryptChunk(c, at: sweep.arena.buffer.baseAddress! + c.at, crypto: (j.from, j.to))
                        segs[0].record.units += r.units
                        segs[0].runs += r.runs
                    }
                    results[i].segment = segs[0]
                } catch { results[i].failure = error }
            }
        }
        _ = arena.buffer.count  // (the lazy arena exists before the workers share it)
        let work = Work(sweep: self, jobs: jobs, bases: bases, results: results)
        if jobs.count > 1 && RekeySweep.processors > 1 {
            DispatchQueue.concurrentPerform(iterations: jobs.count) { work.run($0) }
        } else {
            for i in jobs.indices { work.run(i) }
        }
        arena.used = next
        return try jobs.indices.map { i in
            if let e = results[i].failure { throw e }
            return results[i].segment!
        }
    }

    func encryptChunk(_ c: ReadChunk, at p: UnsafeMutableRawPointer, crypto: (from: FileCrypto, to: FileCrypto)) throws -> ChunkResult {
        let header = Layout.headerLength
        let lo = c.lo
        let n = Int(c.units.last!.end - lo)
        let buf = UnsafeMutableRawBufferPointer(start: p, count: n)
        var out = ChunkResult()
        var run: [Layout.Unit] = []
        var olds: [(UInt64, [UInt8])] = []
        func flushRun() throws {
            guard let f = run.first, let l = run.last else { return }
            olds.removeAll(keepingCapacity: true)
            for u in run {
                let (h, t) = RekeyJournal.pieces(u)
                let hb = Int(h.lowerBound - header - lo), tb = Int(t.lowerBound - header - lo)
                olds.append((RekeyJournal.hash(UnsafeRawBufferPointer(rebasing: buf[hb..<hb + h.count])), Array(buf[tb..<tb + t.count])))
            }
            let slice = UnsafeMutableRawBufferPointer(rebasing: buf[Int(f.start - lo)..<Int(l.end - lo)])
            try crypto.from.crypt(units: run, buffer: slice, base: f.start, encrypt: false)
            try crypto.to.crypt(units: run, buffer: slice, base: f.start, encrypt: true)
            for (i, u) in run.enumerated() {
                let (h, t) = RekeyJournal.pieces(u)
                let hb = Int(h.lowerBound - header - lo), tb = Int(t.lowerBound - header - lo)
                out.units.append(JournalUnit(start: u.start, newHead: RekeyJournal.hash(UnsafeRawBufferPointer(rebasing: buf[hb..<hb + h.count])),
                                             oldHead: olds[i].0, oldTail: olds[i].1, newTail: Array(buf[tb..<tb + t.count])))
            }
            out.runs.append((header + f.start, c.offsetInSegment + Int(f.start - lo), slice.count))
            run.removeAll(keepingCapacity: true)
        }
        for u in c.units {
            if !u.tiny && isZero(p + Int(u.start - lo), Int(u.length)) { try flushRun(); continue }
            run.append(u)
        }
        try flushRun()
        return out
    }

    /// Writes the journal of `records` under a temporary name, makes it durable, and gives
    /// it its name (from then on it is complete), made durable by an fsync of the directory.
    func writeJournal(_ dirfd: Int32, _ records: [JournalRecord], path: String) throws(SweepError) {
        do {
            var bytes: [UInt8] = []
            for r in records { bytes += try r.encode(macKey: new.metadataMACKey) }
            _ = Glibc.unlinkat(dirfd, RekeyJournal.temporary, 0)
            let fd = try Sys.openat(dirfd, RekeyJournal.temporary, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0o600)
            defer { Sys.close(fd) }
            try bytes.withBytes { (p) throws(SystemError) in try Sys.pwrite(fd, p.baseAddress!, p.count, 0) }
            try Sys.fdatasync(fd)
        } catch let e as SystemError { throw .system("write the rekey journal in \(path)", e) } catch { throw .damaged("rekey journal: \(error)") }
        failpoint.step("rekey journal written (not yet complete) in \(path)")
        do {
            try Sys.renameat(dirfd, RekeyJournal.temporary, dirfd, RekeyJournal.name)
            try Sys.fsyncDirectory(dirfd)
        } catch { throw .system("complete the rekey journal in \(path)", error) }
        failpoint.step("rekey journal complete in \(path)")
    }

    func removeJournal(_ dirfd: Int32, path: String) throws(SweepError) {
        _ = Glibc.unlinkat(dirfd, RekeyJournal.name, 0)
        do { try Sys.fsyncDirectory(dirfd) } catch { throw .system("fsync \(path)", error) }
        failpoint.step("rekey journal removed in \(path)")
    }

    /// Writes a segment's new ciphertext over the file in place (and the new file header
    /// with the first segment), in pieces of at most `chunk` bytes.
    func writeInPlace(_ fd: Int32, _ seg: Segment, header: Bool) throws {
        if header { try seg.record.newHeader.withBytes { (p) throws(SystemError) in try Sys.pwrite(fd, p.baseAddress!, p.count, 0) } }
        var written = 0
        let total = seg.runs.reduce(0) { $0 + $1.count }
        for r in seg.runs {
            var done = 0
            while done < r.count {
                let n = min(RekeySweep.chunk, r.count - done)
                try Sys.pwrite(fd, seg.data.baseAddress! + r.at + done, n, r.offset + Int64(done))
                done += n
                written += n
                // One failpoint in the middle of a large file's overwrite (where the first
                // MiB is passed: integrity files' runs are not cut at MiB boundaries).
                if written >= RekeySweep.chunk && written - n < RekeySweep.chunk && total > RekeySweep.chunk { failpoint.step("file half rewritten in place") }
            }
        }
    }

    /// A file larger than a batch: rewritten alone, one segment of at most `batchLimit`
    /// bytes after the other, from plain offset `start` (0, or where a journal left off).
    /// Before each segment's journal replaces the last one, the part already written is
    /// made durable: the journal then only needs to describe the segment being written.
    func rewriteLarge(_ dirfd: Int32, fd: Int32, name: String, backingSize: Int64, start: Int64, from: FileCrypto, to: FileCrypto,
                      oldHeader: [UInt8], newHeader: [UInt8], path: String, display: String? = nil) throws(SweepError) {
        let size = plainSize(backingSize: backingSize, header: oldHeader)
        var pos = start
        var newHeader = newHeader
        if integrity {
            if start == 0 {
                // With a file root, this check also gives the root of the new tag blocks: the
                // new header is final before its segment (the first) is written. (Resumed
                // from a journal, the record holds the final header.)
                let root = try verifyIntegrityFile(fd, backingSize: backingSize, oldHeader: oldHeader, from: from, to: to, start: 0,
                                                   display: display ?? path + name.prefix(20) + "…")
                if let root {
                    do { newHeader = try rootedHeader(newHeader, root: root) } catch { throw .damaged("\(display ?? path): the new file header: \(error)") }
                }
            }
            try fitBackingSize(fd, backingSize, path: path)
        }
        do {
            repeat {
                arena.used = 0
                let seg = try computeSegment(fd, name: name, backingSize: backingSize, start: pos, budget: batchLimit,
                                             from: from, to: to, oldHeader: oldHeader, newHeader: newHeader, display: display ?? path + name.prefix(20) + "…")
                if pos > 0 { try Sys.fdatasync(fd) }
                try writeJournal(dirfd, [seg.record], path: path)
                try writeInPlace(fd, seg, header: pos == 0 && !integrity)
                failpoint.step("file part rewritten in place in \(path)")
                pos = seg.record.coverEnd
            } while pos < size
            try Sys.fdatasync(fd)
        } catch let e as SweepError { throw e } catch let e as SystemError { throw .system("rewrite a file in \(path)", e) } catch { throw .damaged("re-encrypt: \(error)") }
        if integrity && start > 0 { try checkNewRoot(fd, newHeader: newHeader, to: to, display: display ?? path + name.prefix(20) + "…") }
        try removeJournal(dirfd, path: path)
    }

    /// Finishes the journal an interrupted run left in a directory: every unit it covers
    /// is made new (rebuilt from the old generation, or from the bytes the journal keeps),
    /// the rest of a file larger than a batch is rewritten like `rewriteLarge` does, and
    /// the journal goes. A unit matching neither generation (a torn 4096-byte block, which
    /// this design assumes never happens) is reported and left as it is.
    func finishJournal(_ dirfd: Int32, path: String) throws(SweepError) {
        let records: [JournalRecord]
        do {
            let bytes = try Sys.readSmallFile(dirfd, RekeyJournal.name, limit: RekeyJournal.maxLength)
            records = try JournalRecord.decodeAll(bytes, macKey: new.metadataMACKey)
        } catch {
            // Not this rekey's (planted, damaged, not a regular file, unreadable): nothing
            // it says can be trusted, and the sweep leaves this directory alone.
            warnings.append("\(path): \(RekeyJournal.name) cannot be used (\(error)); left as it is (remove it to let the rekey finish)")
            if dryRun { dryJournalUnusable = true }
            return
        }
        var rest: [(fd: Int32, record: JournalRecord, from: FileCrypto, to: FileCrypto)] = []
        defer { for r in rest { Sys.close(r.fd) } }
        var problems = 0
        for rec in records {
            let what = path + rec.name.prefix(20) + "…"
            let size = plainSize(backingSize: rec.backingSize, header: rec.oldHeader)
            func aligned(_ x: Int64) -> Bool { x == size || x % Layout.blockSize == 0 }
            switch BackingEntry.classify(rec.name) {
            case .encryptedName, .longName: break
            default: problems += 1; warnings.append("\(path): the rekey journal names no file entry; left as it is"); continue
            }
            // Plain records' fields are checked here; an integrity record's by finishIntegrityRecord.
            guard rec.integrity == integrity, rec.oldGeneration == old.generation, rec.newGeneration == new.generation,
                  rec.integrity || (rec.backingSize > Layout.headerLength &&
                  rec.coverStart >= 0 && rec.coverStart <= rec.coverEnd && rec.coverEnd <= size && aligned(rec.coverStart) && aligned(rec.coverEnd) &&
                  rec.units.allSatisfy({ $0.start >= rec.coverStart && $0.start < rec.coverEnd })) else {
                problems += 1
                warnings.append("\(what): a rekey journal record that does not fit this rekey; left as it is")
                continue
            }
            let fd: Int32, st: stat
            do { (fd, st) = try Sys.openRegular(dirfd, rec.name, dryRun ? O_RDONLY : O_RDWR) } catch {
                if error.errno == ENOENT {
                    if dryRun { dryNotes.append("\(path): the rekey journal names a file that is gone; dropped") } else {
                        warnings.append("\(path): the rekey journal names a file that is gone; dropped")
                    }
                    continue
                }
                throw .system("open a journalled file in \(path)", error)
            }
            if dryRun { halfRewritten.insert([UInt64(st.st_dev), UInt64(st.st_ino)]) }
            var keep = false
            defer { if !keep { Sys.close(fd) } }
            do {
                if rec.integrity {
                    guard let (from, to) = try finishIntegrityRecord(fd, st, rec, what: what) else { problems += 1; continue }
                    if dryRun {
                        // A large file's parts outside the segment the record covers: before
                        // it new (finished segments), from its end on old (still to come).
                        do throws(SweepError) {
                            if rec.coverStart > 0 {
                                try verifyIntegrityFile(fd, backingSize: rec.backingSize, oldHeader: rec.newHeader, from: to, start: 0, end: rec.coverStart,
                                                        display: "in a segment already rewritten", explain: false)
                            }
                            if rec.coverEnd < size {
                                try verifyIntegrityFile(fd, backingSize: rec.backingSize, oldHeader: rec.oldHeader, from: from, start: rec.coverEnd,
                                                        display: "in a segment still to rewrite (the rekey stops there)", explain: false)
                            }
                        } catch { halfRewrittenDamage[[UInt64(st.st_dev), UInt64(st.st_ino)]] = "\(error)" }
                        continue
                    }
                    try Sys.fdatasync(fd)
                    if rec.coverEnd < size {
                        rest.append((fd, rec, from, to))
                        keep = true
                    }
                    continue
                }
                guard Int64(st.st_size) == rec.backingSize else {
                    problems += 1
                    warnings.append("\(what): \(st.st_size) bytes, its rekey journal says \(rec.backingSize): changed since; left as it is")
                    continue
                }
                var raw = [UInt8](repeating: 0, count: FileHeader.length)
                _ = try raw.withMutableBytes { (p) throws(SystemError) -> Int in try Sys.pread(fd, p.baseAddress!, p.count, 0) }
                let headerNew = raw == rec.newHeader
                guard headerNew || (raw == rec.oldHeader && rec.coverStart == 0) else {
                    problems += 1
                    warnings.append("\(what): its header is not the one its rekey journal names; left as it is")
                    continue
                }
                let from = try FileCrypto(keys: old, header: try FileHeader.decode(rec.oldHeader, macKey: old.metadataMACKey))
                let to = try FileCrypto(keys: new, header: try FileHeader.decode(rec.newHeader, macKey: new.metadataMACKey))
                for u in rec.units { try repairUnit(fd, u, size: size, from: from, to: to, what: what) }
                if dryRun { continue }
                if !headerNew { try rec.newHeader.withBytes { (p) throws(SystemError) in try Sys.pwrite(fd, p.baseAddress!, p.count, 0) } }
                try Sys.fdatasync(fd)
                if rec.coverEnd < size {
                    rest.append((fd, rec, from, to))
                    keep = true
                }
            } catch let e as SweepError { throw e } catch let e as SystemError { throw .system("finish the rekey journal in \(path)", e) } catch {
                throw .damaged("\(what): the rekey journal: \(error)")
            }
        }
        // Dry run (fsck): nothing is written, so nothing goes on and the journal stays.
        if dryRun { dryJournalUnusable = problems > 0; return }
        if problems > 0 {
            warnings.append("\(path): \(RekeyJournal.name) kept (\(problems) of its records could not be used); remove it to let the rekey finish")
            return
        }
        // A file larger than a batch goes on from where its journal stopped (it replaces the journal).
        for r in rest {
            try rewriteLarge(dirfd, fd: r.fd, name: r.record.name, backingSize: r.record.backingSize, start: r.record.coverEnd,
                             from: r.from, to: r.to, oldHeader: r.record.oldHeader, newHeader: r.record.newHeader, path: path)
        }
        try removeJournal(dirfd, path: path)
    }

    /// Makes one journalled unit new. Its head (in one 4096-byte block) is new or old by
    /// its hash; its tail (in the next block) by the bytes the journal keeps of both.
    func repairUnit(_ fd: Int32, _ j: JournalUnit, size: Int64, from: FileCrypto, to: FileCrypto, what: String) throws {
        guard j.start >= 0, j.start < size, j.start % Layout.blockSize == 0 else { throw SweepError.damaged("\(what): a journal entry outside the file") }
        let u = Layout.unit(at: j.start, size: size)
        let (h, t) = RekeyJournal.pieces(u)
        guard u.start == j.start, t.count == j.oldTail.count, t.count == j.newTail.count else { throw SweepError.damaged("\(what): a journal entry that does not fit the file") }
        var buf = [UInt8](repeating: 0, count: Int(u.length))
        let got = try buf.withMutableBytes { (p) throws(SystemError) -> Int in try Sys.pread(fd, p.baseAddress!, p.count, h.lowerBound) }
        guard got == buf.count else { throw SweepError.damaged("\(what): short read") }
        let head = buf.withUnsafeBytes { RekeyJournal.hash(UnsafeRawBufferPointer(rebasing: $0[0..<h.count])) }
        let tail = Array(buf[h.count...])
        let headNew = head == j.newHead, headOld = head == j.oldHead
        let tailNew = tail == j.newTail, tailOld = tail == j.oldTail
        if headNew && tailNew { return }
        if headNew && tailOld {
            if dryRun { return }
            try j.newTail.withBytes { (p) throws(SystemError) in try Sys.pwrite(fd, p.baseAddress!, p.count, t.lowerBound) }
            return
        }
        guard headOld && (tailOld || tailNew) else {
            warnings.append("\(what): unit \(u.index) matches neither its old nor its new ciphertext (a torn block write); its contents are lost, left as it is")
            return
        }
        if dryRun { return }
        if !tailOld { buf.replaceSubrange(h.count..., with: j.oldTail) }
        try buf.withUnsafeMutableBytes { (p) throws in
            try from.crypt(units: [u], buffer: p, base: u.start, encrypt: false)
            try to.crypt(units: [u], buffer: p, base: u.start, encrypt: true)
            try Sys.pwrite(fd, p.baseAddress!, p.count, h.lowerBound)
        }
    }
}
