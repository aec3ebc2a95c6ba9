/// Where plaintext bytes live in a backing file. Pure arithmetic, no I/O.
///
/// A backing file is empty (plaintext empty) or a 32-byte file header followed by the
/// ciphertext, byte for byte as long as the plaintext. The plaintext is cut into
/// *units*, each encrypted on its own with AES-XTS and the unit number as tweak:
/// - normally a unit is one 4096-byte block, the last one shorter;
/// - XTS needs at least 16 bytes, so a last block of 1–15 bytes joins the block before
///   it into one unit of 4097–4111 bytes (ciphertext stealing covers the odd length);
/// - a whole file of 1–15 bytes is a *tiny* unit, masked with a one-time pad derived
///   from a nonce that is renewed on every write (see `FileCrypto`).
public enum Layout {
    public static let headerLength: Int64 = 32
    public static let blockSize: Int64 = 4096
    /// Smallest input AES-XTS accepts.
    public static let minXTS: Int64 = 16
    /// The largest plaintext the format serves: far below where offset arithmetic (header,
    /// unit rounding) could overflow Int64. A backing file claiming more is damaged.
    public static let maxPlainSize: Int64 = 1 << 60

    public static func plainSize(backingSize: Int64) -> Int64 {
        backingSize <= headerLength ? 0 : backingSize - headerLength
    }

    public static func backingSize(plainSize: Int64) -> Int64 {
        plainSize == 0 ? 0 : plainSize + headerLength
    }

    /// True when a backing file of this size cannot be a valid one (a header cut short).
    public static func isDamagedSize(backingSize: Int64) -> Bool {
        backingSize > 0 && backingSize < headerLength
    }

    public static func isTiny(_ size: Int64) -> Bool { size > 0 && size < minXTS }

    public struct Unit: Equatable, Sendable, CustomStringConvertible {
        /// The XTS data unit number (tweak); block index of the unit's first byte.
        public var index: UInt64
        public var start: Int64
        public var end: Int64
        public var tiny: Bool
        public var length: Int64 { end - start }
        public var description: String { "unit \(index) [\(start), \(end))\(tiny ? " tiny" : "")" }
    }

    /// Index of the last unit of a file of `size` bytes (> 0).
    static func lastUnitIndex(_ size: Int64) -> Int64 {
        let blocks = (size + blockSize - 1) / blockSize
        let tail = size % blockSize
        return (tail > 0 && tail < minXTS && blocks > 1) ? blocks - 2 : blocks - 1
    }

    /// The unit holding byte `offset` of a file of `size` bytes (`0 <= offset < size`).
    public static func unit(at offset: Int64, size: Int64) -> Unit {
        precondition(offset >= 0 && offset < size)
        if isTiny(size) { return Unit(index: 0, start: 0, end: size, tiny: true) }
        let last = lastUnitIndex(size)
        let i = min(offset / blockSize, last)
        let start = i * blockSize
        let end = i == last ? size : start + blockSize
        return Unit(index: UInt64(i), start: start, end: end, tiny: false)
    }

    /// Units of a file of `size` bytes that overlap `range` (clamped to the file).
    public static func units(overlapping range: Range<Int64>, size: Int64) -> [Unit] {
        let lo = max(range.lowerBound, 0), hi = min(range.upperBound, size)
        guard lo < hi else { return [] }
        var out: [Unit] = []
        var u = unit(at: lo, size: size)
        while true {
            out.append(u)
            if u.end >= hi { break }
            u = unit(at: u.end, size: size)
        }
        return out
    }

    /// `range` widened to whole units of a file of `size` bytes.
    public static func unitAligned(_ range: Range<Int64>, size: Int64) -> Range<Int64> {
        let us = units(overlapping: range, size: size)
        guard let first = us.first, let last = us.last else { return range.lowerBound..<range.lowerBound }
        return first.start..<last.end
    }

    /// The byte range of the last unit of a file of `size` bytes, or nil when empty.
    public static func lastUnitRange(size: Int64) -> Range<Int64>? {
        guard size > 0 else { return nil }
        let u = unit(at: size - 1, size: size)
        return u.start..<u.end
    }

    /// What a change of size from `old` to `new` (with data written over `written`)
    /// forces to be re-encrypted under the new size: the written units, plus the units
    /// that held the old last unit (its length, and so its encryption, changes).
    /// Returns one or two disjoint, sorted, unit-aligned ranges; blocks between them are
    /// left alone (holes when the file grew).
    public static func rewriteRanges(oldSize old: Int64, newSize new: Int64, written: Range<Int64>?) -> [Range<Int64>] {
        guard new > 0 else { return [] }
        var ranges: [Range<Int64>] = []
        if new < old {
            // Shrinking: the new last unit is shorter than the unit it was part of.
            if let r = lastUnitRange(size: new) { ranges.append(r) }
        } else if new > old, let lastOld = lastUnitRange(size: old) {
            // Growing: the old last unit gains zeros or joins a neighbour, unless it keeps
            // its extent (a full block followed by 16 or more new bytes): then its
            // ciphertext is unchanged and appending costs no read-modify-write.
            let after = unit(at: lastOld.lowerBound, size: new)
            if isTiny(old) || after.start != lastOld.lowerBound || after.end != lastOld.upperBound {
                ranges.append(unitAligned(lastOld, size: new))
            }
        }
        if let w = written, !w.isEmpty {
            ranges.append(unitAligned(w, size: new))
        }
        if isTiny(new) { return [0..<new] }
        ranges.sort { $0.lowerBound < $1.lowerBound }
        var merged: [Range<Int64>] = []
        for r in ranges {
            if let last = merged.last, r.lowerBound <= last.upperBound {
                merged[merged.count - 1] = last.lowerBound..<max(last.upperBound, r.upperBound)
            } else {
                merged.append(r)
            }
        }
        return merged
    }
}
