import XTSCrypto
import XTSFormat
import XTSKeys
import CSysShim
import XTSSystem
#if canImport(Glibc)
import Glibc
#endif

/// What content I/O needs of a backing file. The filesystem passes a real file
/// descriptor; tests can pass memory.
public protocol BackingFile {
    func read(into buffer: UnsafeMutableRawBufferPointer, at offset: Int64) throws(SystemError) -> Int
    func write(_ buffer: UnsafeRawBufferPointer, at offset: Int64) throws(SystemError)
    func size() throws(SystemError) -> Int64
    func truncate(_ size: Int64) throws(SystemError)
    /// Makes `length` bytes at `offset` read as zeros, freeing the space where it can.
    func punchHole(at offset: Int64, length: Int64) throws(SystemError)
}

public struct FDBackingFile: BackingFile {
    public let fd: Int32
    public init(fd: Int32) { self.fd = fd }
    public func read(into buffer: UnsafeMutableRawBufferPointer, at offset: Int64) throws(SystemError) -> Int {
        try Sys.pread(fd, buffer.baseAddress!, buffer.count, offset)
    }
    public func write(_ buffer: UnsafeRawBufferPointer, at offset: Int64) throws(SystemError) {
        try Sys.pwrite(fd, buffer.baseAddress!, buffer.count, offset)
    }
    public func size() throws(SystemError) -> Int64 { Int64(try Sys.fstat(fd).st_size) }
    public func truncate(_ size: Int64) throws(SystemError) { try Sys.ftruncate(fd, size) }
    public func punchHole(at offset: Int64, length: Int64) throws(SystemError) {
        do {
            try Sys.fallocate(fd, mode: XTS_FALLOC_PUNCH_HOLE | XTS_FALLOC_KEEP_SIZE, offset: offset, length: length)
        } catch where error.errno == EOPNOTSUPP {
            // A backing filesystem without holes: zeros written read back the same.
            let chunk = 1 << 20
            let zeros = UnsafeMutableRawBufferPointer.allocate(byteCount: chunk, alignment: 16)
            defer { zeros.deallocate() }
            zeros.initializeMemory(as: UInt8.self, repeating: 0)
            var done: Int64 = 0
            while done < length {
                let n = Int(min(Int64(chunk), length - done))
                try Sys.pwrite(fd, zeros.baseAddress!, n, offset + done)
                done += Int64(n)
            }
        }
    }
}

public enum ContentError: Error, Sendable, CustomStringConvertible {
    case io(SystemError)
    case crypto(CryptoError)
    /// The file header is damaged, or written under a key generation we do not hold.
    case badHeader(String)
    /// Integrity volumes: a unit that does not match its tag (tampered, moved or cut off).
    case authentication(String)

    public var description: String {
        switch self {
        case .io(let e): return "\(e)"
        case .crypto(let e): return "\(e)"
        case .badHeader(let s): return "damaged file header: \(s)"
        case .authentication(let s): return "authentication failed: \(s)"
        }
    }
}

/// Reads and writes plaintext of one backing file. Not thread-safe: the caller holds the
/// file's lock (shared for `read`, exclusive for the others), and keeps the `FileCrypto`
/// these calls return for the next call.
public struct ContentFile<File: BackingFile> {
    public let file: File
    /// The keys of a generation; nil if the volume does not hold it.
    public let keys: @Sendable (UInt32) -> KeySet?
    public let currentKeys: KeySet
    /// Set when the volume authenticates contents (feature `blockAuthentication`), to its
    /// tag algorithm: every call goes to `IntegrityContent`, whose layout is `IntegrityLayout`.
    public let unitTags: UnitTagAlgorithm?
    public var integrity: Bool { unitTags != nil }
    /// The volume has listing manifests (feature `listingManifests`, FORMAT.md 12.10): every
    /// file has a header with a file ID from its creation on, kept when it is emptied.
    public let fileIDs: Bool

    public init(file: File, currentKeys: KeySet, unitTags: UnitTagAlgorithm?, fileIDs: Bool = false, keys: @escaping @Sendable (UInt32) -> KeySet?) {
        self.file = file
        self.currentKeys = currentKeys
        self.unitTags = unitTags
        self.fileIDs = fileIDs && unitTags != nil
        self.keys = keys
    }

    /// Only used when `unitTags` is set (every caller checks `integrity` first).
    var authenticated: IntegrityContent<File> { IntegrityContent(file: file, currentKeys: currentKeys, tags: unitTags ?? .ghashAES256, fileIDs: fileIDs, keys: keys) }

    /// A new file of a volume with listing manifests: its header, length 0, file ID `fileID`.
    public func writeNewHeader(fileID: [UInt8]) throws(ContentError) -> FileCrypto {
        try authenticated.writeNewHeader(fileID: fileID)
    }

    /// The plaintext size; a backing file larger than the format allows (a planted sparse
    /// file, say) is damaged rather than a reason for arithmetic to overflow.
    /// `crypto`: what an earlier call returned for this file, which spares reading every tag
    /// block of a file with a file root again.
    public func plainSize(crypto: FileCrypto? = nil) throws(ContentError) -> Int64 {
        if integrity { return try authenticated.plainSize(crypto: crypto) }
        let backing: Int64
        do { backing = try file.size() } catch { throw .io(error) }
        let size = Layout.plainSize(backingSize: backing)
        guard size <= Layout.maxPlainSize else { throw .badHeader("backing file of \(backing) bytes, beyond the largest file the format allows") }
        return size
    }

    /// Loads the file's header; nil for an empty file.
    public func loadCrypto() throws(ContentError) -> FileCrypto? {
        if integrity { return try authenticated.loadCrypto() }
        let backing: Int64
        do { backing = try file.size() } catch { throw .io(error) }
        if backing == 0 { return nil }
        _ = try plainSize()
        if Layout.isDamagedSize(backingSize: backing) { throw .badHeader("backing file is \(backing) bytes, shorter than its header") }
        var raw = [UInt8](repeating: 0, count: FileHeader.length)
        let n: Int
        do { n = try raw.withMutableBytes { (p) throws(SystemError) -> Int in try file.read(into: p, at: 0) } } catch { throw .io(error) }
        guard n == FileHeader.length else { throw .badHeader("short read") }
        let header: FileHeader
        do { header = try FileHeader.decode(raw, macKey: currentKeys.metadataMACKey) } catch {
            // The MAC key depends on the generation recorded inside; try that one.
            if let gen = Optional(raw[4..<8].enumerated().reduce(UInt32(0)) { $0 | UInt32($1.element) << (8 * $1.offset) }),
               gen != currentKeys.generation, let k = keys(gen), let h = try? FileHeader.decode(raw, macKey: k.metadataMACKey) {
                header = h
            } else {
                throw .badHeader("\(error)")
            }
        }
        guard let k = keys(header.keyGeneration) else { throw .badHeader("written under key generation \(header.keyGeneration), which this volume no longer holds") }
        do { return try FileCrypto(keys: k, header: header) } catch { throw .crypto(error) }
    }

    /// Reads up to `output.count` plaintext bytes at `offset`; returns how many (0 at or past EOF).
    public func read(into output: UnsafeMutableRawBufferPointer, at offset: Int64, crypto: FileCrypto?) throws(ContentError) -> Int {
        if integrity { return try authenticated.read(into: output, at: offset, crypto: crypto) }
        let size = try plainSize()
        return try read(into: output, at: offset, size: size, crypto: crypto)
    }

    func read(into output: UnsafeMutableRawBufferPointer, at offset: Int64, size: Int64, crypto: FileCrypto?) throws(ContentError) -> Int {
        let end = min(offset + Int64(output.count), size)
        guard offset < end else { return 0 }
        guard let crypto else { throw .badHeader("missing") }
        let units = Layout.units(overlapping: offset..<end, size: size)
        let lo = units.first!.start, hi = units.last!.end
        let want = Int(end - offset)
        if lo == offset && hi == end {
            // Aligned: decrypt straight into the caller's buffer.
            let dst = UnsafeMutableRawBufferPointer(rebasing: output[0..<want])
            try fill(dst, at: lo, size: size)
            do { try crypto.crypt(units: units, buffer: dst, base: lo, encrypt: false) } catch { throw .crypto(error) }
            return want
        }
        let scratch = ThreadScratch.buffer(.content, count: Int(hi - lo))
        try fill(scratch, at: lo, size: size)
        do { try crypto.crypt(units: units, buffer: scratch, base: lo, encrypt: false) } catch { throw .crypto(error) }
        output.baseAddress!.copyMemory(from: scratch.baseAddress! + Int(offset - lo), byteCount: want)
        return want
    }

    /// Ciphertext of plaintext range [at, at+count) into `buffer`; bytes past the end of
    /// the backing file read as zeros (a hole).
    private func fill(_ buffer: UnsafeMutableRawBufferPointer, at: Int64, size: Int64) throws(ContentError) {
        let n: Int
        do { n = try file.read(into: buffer, at: Layout.headerLength + at) } catch { throw .io(error) }
        if n < buffer.count { (buffer.baseAddress! + n).initializeMemory(as: UInt8.self, repeating: 0, count: buffer.count - n) }
    }

    /// Writes `data` at `offset`, growing the file (with a hole) if needed. Returns the
    /// file's crypto state after the write (new for a new or tiny file). `data` must not be
    /// empty (an empty file has no crypto state to return): callers answer such writes alone.
    public func write(_ data: UnsafeRawBufferPointer, at offset: Int64, crypto: FileCrypto?) throws(ContentError) -> FileCrypto {
        precondition(!data.isEmpty, "ContentFile.write of nothing")
        if integrity { return try authenticated.write(data, at: offset, crypto: crypto) }
        let old = try plainSize()
        let new = max(old, offset + Int64(data.count))
        return try rewrite(oldSize: old, newSize: new, crypto: crypto, written: offset..<offset + Int64(data.count), data: data)!
    }

    /// Sets the plaintext size, up (a hole) or down. Returns the crypto state after (nil when empty).
    public func truncate(to newSize: Int64, crypto: FileCrypto?) throws(ContentError) -> FileCrypto? {
        if integrity { return try authenticated.truncate(to: newSize, crypto: crypto) }
        let old = try plainSize()
        if newSize == old {
            // Still a truncate: the file's mtime and ctime change, as make's stamp files expect.
            do { try file.truncate(Layout.backingSize(plainSize: old)) } catch { throw .io(error) }
            return crypto
        }
        if newSize == 0 {
            do { try file.truncate(0) } catch { throw .io(error) }
            return nil
        }
        return try rewrite(oldSize: old, newSize: newSize, crypto: crypto, written: nil, data: nil)
    }

    /// Makes plaintext `range` (inside the file) read as zeros: whole units become holes in
    /// the backing file, partly covered ones are rewritten. Returns the crypto state after.
    public func zeroRange(_ range: Range<Int64>, crypto: FileCrypto?) throws(ContentError) -> FileCrypto? {
        if integrity { return try authenticated.zeroRange(range, crypto: crypto) }
        let size = try plainSize()
        let lo = max(range.lowerBound, 0), hi = min(range.upperBound, size)
        guard lo < hi else { return crypto }
        var crypto = crypto
        let units = Layout.units(overlapping: lo..<hi, size: size)
        var whole: Range<Int64>?
        func flushWhole() throws(ContentError) {
            guard let w = whole else { return }
            do { try file.punchHole(at: Layout.headerLength + w.lowerBound, length: w.upperBound - w.lowerBound) } catch { throw .io(error) }
            whole = nil
        }
        for u in units {
            if !u.tiny && u.start >= lo && u.end <= hi {
                whole = whole.map { $0.lowerBound..<u.end } ?? u.start..<u.end
                continue
            }
            try flushWhole()
            let a = max(u.start, lo), b = min(u.end, hi)
            let zeros = [UInt8](repeating: 0, count: Int(b - a))
            crypto = try zeros.withBytes { (p) throws(ContentError) in try write(p, at: a, crypto: crypto) }
        }
        try flushWhole()
        return crypto
    }

    private func rewrite(oldSize old: Int64, newSize new: Int64, crypto: FileCrypto?, written: Range<Int64>?, data: UnsafeRawBufferPointer?) throws(ContentError) -> FileCrypto? {
        if new == 0 { return crypto }
        var target = crypto
        var writeHeader = false
        if old > 0 && crypto == nil { throw .badHeader("missing") }
        if old == 0 || Layout.isTiny(new) {
            // New file, or a tiny one: a fresh nonce each time, so a tiny file's pad is never reused.
            do { target = try FileCrypto(keys: currentKeys, header: try FileHeader.random(keyGeneration: currentKeys.generation)) }
            catch { throw .crypto(error) }
            writeHeader = true
        }
        let ranges = Layout.rewriteRanges(oldSize: old, newSize: new, written: written)
        let oldBacking = Layout.backingSize(plainSize: old), newBacking = Layout.backingSize(plainSize: new)
        if new > old && written == nil {
            // Growing by truncate: the size first, so that a size the backing filesystem
            // refuses (EFBIG) leaves the file exactly as it was.
            do { try file.truncate(newBacking) } catch { throw .io(error) }
        }
        // Highest range first: when the file grows, what lies past the old end is written
        // before the old last unit is re-encrypted, so a write the backing filesystem refuses
        // there (EFBIG, ENOSPC) can be undone by cutting the file back to its old size.
        var touchedOldContent = false
        do throws(ContentError) {
            try rewriteRanges(ranges.reversed(), old: old, new: new, crypto: crypto, target: target!, writeHeader: &writeHeader,
                              written: written, data: data, touchedOldContent: &touchedOldContent)
        } catch {
            if new > old && !touchedOldContent { try? file.truncate(oldBacking) }
            throw error
        }
        if writeHeader {
            do { try encodeHeader(target!).withBytes { (p) throws(SystemError) in try file.write(p, at: 0) } }
            catch let e as SystemError { throw .io(e) } catch let e as CryptoError { throw .crypto(e) } catch { throw .badHeader("\(error)") }
        }
        do {
            if try file.size() != newBacking { try file.truncate(newBacking) }
        } catch { throw .io(error) }
        return target
    }

    private func rewriteRanges(_ ranges: ReversedCollection<[Range<Int64>]>, old: Int64, new: Int64, crypto: FileCrypto?, target: FileCrypto,
                               writeHeader: inout Bool, written: Range<Int64>?, data: UnsafeRawBufferPointer?,
                               touchedOldContent: inout Bool) throws(ContentError) {
        for r in ranges {
            if r.lowerBound < old { touchedOldContent = true }
            let count = Int(r.upperBound - r.lowerBound)
            // The request slot: writes and truncates never run inside a FUSE read on this thread.
            let buf = ThreadScratch.buffer(.request, count: count)
            // Old plaintext under the old layout, zeros past the old end.
            let covered = written.map { $0.lowerBound <= r.lowerBound && $0.upperBound >= r.upperBound } ?? false
            let have = (old > r.lowerBound && !covered) ? try read(into: buf, at: r.lowerBound, size: old, crypto: crypto) : 0
            if have < count { (buf.baseAddress! + have).initializeMemory(as: UInt8.self, repeating: 0, count: count - have) }
            if let w = written, let data {
                let lo = max(w.lowerBound, r.lowerBound), hi = min(w.upperBound, r.upperBound)
                if lo < hi {
                    (buf.baseAddress! + Int(lo - r.lowerBound)).copyMemory(from: data.baseAddress! + Int(lo - w.lowerBound), byteCount: Int(hi - lo))
                }
            }
            let units = Layout.units(overlapping: r, size: new)
            do { try target.crypt(units: units, buffer: buf, base: r.lowerBound, encrypt: true) } catch { throw .crypto(error) }
            do {
                if writeHeader && r.lowerBound == 0 && count <= 64 * 1024 {
                    // Header and first unit in one write (a tiny file's header and pad together).
                    let headerBytes = try encodeHeader(target)
                    let joint = UnsafeMutableRawBufferPointer.allocate(byteCount: headerBytes.count + count, alignment: 16)
                    defer { joint.deallocate() }
                    headerBytes.withUnsafeBytes { joint.copyMemory(from: $0) }
                    (joint.baseAddress! + headerBytes.count).copyMemory(from: buf.baseAddress!, byteCount: count)
                    try file.write(UnsafeRawBufferPointer(joint), at: 0)
                    writeHeader = false
                } else {
                    if writeHeader && r.lowerBound == 0 {
                        let headerBytes = try encodeHeader(target)
                        try headerBytes.withBytes { (p) throws(SystemError) in try file.write(p, at: 0) }
                        writeHeader = false
                    }
                    try file.write(UnsafeRawBufferPointer(buf), at: Layout.headerLength + r.lowerBound)
                }
            } catch let e as SystemError { throw .io(e) } catch let e as CryptoError { throw .crypto(e) } catch { throw .badHeader("\(error)") }
        }
    }

    private func encodeHeader(_ c: FileCrypto) throws(CryptoError) -> [UInt8] {
        try c.header.encode(macKey: currentKeys.metadataMACKey)
    }
}
