/// Where plaintext, tags and the header live in a backing file of an integrity volume.
/// Pure arithmetic, no I/O (the plain volumes' counterpart is `Layout`).
///
/// The backing file is a run of *groups* of 127 blocks of 4096 bytes. The first block of
/// a group is its *tag block*: 64 bytes (in group 0 the file header, elsewhere zeros) and
/// 126 tag entries of 32 bytes; the other 126 blocks hold the ciphertext of 126 units.
/// A unit is always a whole 4096-byte block of ciphertext (the plaintext past the end of
/// the file is zeros), so every unit's ciphertext is one aligned page of the backing file
/// and a write of it can never be torn by the death of the writing process.
///
/// A tag entry is two 16-byte slots. A unit is authentic when the tag of its current
/// ciphertext is in either slot; a writer puts the new tag in the slot that does not hold
/// the current one before it overwrites the ciphertext, so whenever it stops, the unit
/// matches one of its slots (FORMAT.md section 12).
public enum IntegrityLayout {
    public static let blockSize: Int64 = 4096
    public static let headerLength: Int64 = 64
    public static let tagLength = 16
    public static let entryLength: Int64 = 32
    public static let unitsPerGroup: Int64 = (blockSize - headerLength) / entryLength
    public static let groupLength: Int64 = (unitsPerGroup + 1) * blockSize
    /// As for plain files: far below where the offset arithmetic could overflow.
    public static let maxPlainSize: Int64 = 1 << 60

    /// Units of a file of `size` bytes: a partial last unit counts.
    public static func unitCount(_ size: Int64) -> Int64 { (size + blockSize - 1) / blockSize }

    public static func group(of unit: Int64) -> Int64 { unit / unitsPerGroup }

    /// Backing offset of the ciphertext of `unit`.
    public static func dataOffset(unit: Int64) -> Int64 {
        group(of: unit) * groupLength + blockSize * (1 + unit % unitsPerGroup)
    }

    /// Backing offset of the tag entry of `unit`.
    public static func entryOffset(unit: Int64) -> Int64 {
        group(of: unit) * groupLength + headerLength + entryLength * (unit % unitsPerGroup)
    }

    /// The backing size of a file of `plainSize` bytes as a writer leaves it: just the
    /// header for an empty file with a header; otherwise through the last unit's block.
    /// A reader accepts more (an interrupted write leaves an uncommitted tail) but not less.
    public static func backingSize(plainSize: Int64) -> Int64 {
        plainSize == 0 ? headerLength : dataOffset(unit: unitCount(plainSize) - 1) + blockSize
    }

    /// Indices of the units that hold plaintext bytes `range`.
    public static func units(overlapping range: Range<Int64>) -> Range<Int64> {
        guard !range.isEmpty else { return range.lowerBound / blockSize..<range.lowerBound / blockSize }
        return range.lowerBound / blockSize..<unitCount(range.upperBound)
    }

    /// `units` cut where a group ends: each run's entries are adjacent in one tag block and
    /// its ciphertext is one contiguous backing range.
    public static func groupRuns(_ units: Range<Int64>) -> [Range<Int64>] {
        var out: [Range<Int64>] = []
        var u = units.lowerBound
        while u < units.upperBound {
            let end = min(units.upperBound, (group(of: u) + 1) * unitsPerGroup)
            out.append(u..<end)
            u = end
        }
        return out
    }

    /// Plaintext byte range of `unit`.
    public static func plainRange(unit: Int64) -> Range<Int64> { unit * blockSize..<(unit + 1) * blockSize }

    /// Backing byte range that holds the ciphertext of plaintext `range` (for reserving
    /// space): from the first unit's block to the last one's end, tag blocks between included.
    public static func backingRange(plain range: Range<Int64>) -> Range<Int64> {
        let us = units(overlapping: range)
        guard !us.isEmpty else { return 0..<0 }
        return dataOffset(unit: us.lowerBound)..<dataOffset(unit: us.upperBound - 1) + blockSize
    }
}

extension IntegrityLayout {
    /// The most plaintext a backing file of this size could hold: for a size shown when the
    /// header cannot be read.
    public static func largestPlainSize(backingSize b: Int64) -> Int64 {
        guard b > blockSize else { return 0 }
        let groups = b / groupLength, rest = b % groupLength
        let blocks = rest <= blockSize ? 0 : (rest - blockSize + blockSize - 1) / blockSize
        return min(maxPlainSize, (groups * unitsPerGroup + blocks) * blockSize)
    }
}

/// The first 64 bytes of the tag block of a group after the first, on files with a file
/// root (header version 3, FORMAT.md 12.11); group 0 has the file header there.
extension IntegrityLayout {
    /// A random salt, drawn anew whenever the tag block is written: part of the group's
    /// element, so no two versions of a group have the same element.
    public static let saltRange = 0..<16
    /// The record: the element the header named by `recordHeaderRange` counts for this
    /// group (sealed under the file's record key) while a change of the group is under way.
    public static let recordElementRange = 16..<32
    /// The MAC bytes of the file header the record was written under.
    public static let recordHeaderRange = 32..<48

    /// Groups whose tag blocks a file root covers: those holding units of a file of `size` bytes.
    public static func groupCount(plainSize size: Int64) -> Int64 {
        let n = unitCount(size)
        return (n + unitsPerGroup - 1) / unitsPerGroup
    }

    /// Backing offset of group `g`'s tag block.
    public static func tagBlockOffset(group g: Int64) -> Int64 { g * groupLength }
}
