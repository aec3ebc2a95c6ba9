import XTSCrypto
import XTSFormat
import XTSKeys

/// What a DEK rekey needs of an integrity volume's units, one group at a time, in memory
/// (FORMAT.md sections 12 and 13.1): check the old ones against their tags, and seal the
/// new ones. Built on `tagSession`, `tag` and `cryptWhole`, the entry points the mount's
/// reads and writes use, so the rekey tags and checks units exactly as they do.
extension FileCrypto {
    /// The tag of one unit's ciphertext (nil: a hole) under this file's tag key.
    public func unitTag(unit: Int64, ciphertext: UnsafeRawBufferPointer?) throws(CryptoError) -> [UInt8] {
        let s = try tagSession()
        var out = [UInt8](repeating: 0, count: IntegrityLayout.tagLength)
        try out.withMutableBytes { (o) throws(CryptoError) in try FileCrypto.tag(s, unit: unit, ciphertext: ciphertext, into: o) }
        return out
    }

    /// Checks `count` units from `firstUnit` on (all in one group), their ciphertext in
    /// `data` (`count` blocks of 4096 bytes, all-zero ones holes) against `entries` (their
    /// 32-byte entries), and puts each unit's current tag (the slot that matched) into
    /// `tags` (16 bytes each). A unit that matches neither slot is `ContentError.authentication`,
    /// worded as a read of it is. Then decrypts the units in place (holes stay zeros).
    public func openUnits(firstUnit: Int64, count: Int, entries: UnsafeRawBufferPointer, data: UnsafeMutableRawBufferPointer,
                          tags: UnsafeMutableRawBufferPointer) throws(ContentError) {
        let B = Int(IntegrityLayout.blockSize), E = Int(IntegrityLayout.entryLength), T = IntegrityLayout.tagLength
        precondition(data.count >= count * B && entries.count >= count * E && tags.count >= count * T)
        defer { FileCrypto.scrubThreadContext() }
        let s: UnitTagSession
        do { s = try tagSession() } catch { throw .crypto(error) }
        for i in 0..<count {
            let u = firstUnit + Int64(i)
            let ct = UnsafeRawBufferPointer(rebasing: data[i * B..<(i + 1) * B])
            let hole = FileCrypto.isZero(ct.baseAddress!, B)
            let t = UnsafeMutableRawBufferPointer(rebasing: tags[i * T..<(i + 1) * T])
            do { try FileCrypto.tag(s, unit: u, ciphertext: hole ? nil : ct, into: t) } catch { throw .crypto(error) }
            let a = UnsafeRawBufferPointer(rebasing: entries[i * E..<i * E + T]), b = UnsafeRawBufferPointer(rebasing: entries[i * E + T..<i * E + 2 * T])
            guard FileCrypto.constantTimeEqual(UnsafeRawBufferPointer(t), a) || FileCrypto.constantTimeEqual(UnsafeRawBufferPointer(t), b) else {
                throw .authentication("unit \(u) (plaintext bytes \(u * IntegrityLayout.blockSize)–\((u + 1) * IntegrityLayout.blockSize - 1)) does not match its tag\(hole ? " (it reads as a hole)" : "")")
            }
        }
        do { try cryptWhole(data, firstUnit: firstUnit, count: count, encrypt: false) } catch { throw .crypto(error) }
    }

    /// Encrypts `count` plaintext units from `firstUnit` on in place, except those
    /// `hole` names (left all zero), and puts each unit's tag (hole tag for those) into
    /// `tags` (16 bytes each).
    public func sealUnits(firstUnit: Int64, count: Int, data: UnsafeMutableRawBufferPointer, hole: (Int) -> Bool,
                          tags: UnsafeMutableRawBufferPointer) throws(CryptoError) {
        let B = Int(IntegrityLayout.blockSize), T = IntegrityLayout.tagLength
        precondition(data.count >= count * B && tags.count >= count * T)
        defer { FileCrypto.scrubThreadContext() }
        try cryptWhole(data, firstUnit: firstUnit, count: count, encrypt: true, skip: hole)
        let s = try tagSession()
        for i in 0..<count {
            let ct = hole(i) ? nil : UnsafeRawBufferPointer(rebasing: data[i * B..<(i + 1) * B])
            try FileCrypto.tag(s, unit: firstUnit + Int64(i), ciphertext: ct, into: UnsafeMutableRawBufferPointer(rebasing: tags[i * T..<(i + 1) * T]))
        }
    }

    /// The key schedule `cryptWhole` leaves in this thread's XTS context (ordinary heap)
    /// is wiped: a rekey's threads must not keep the old generation's file keys.
    public static func scrubThreadContext() {
        (try? XTSContext.forCurrentThread())?.scrub()
    }

    static func constantTimeEqual(_ a: UnsafeRawBufferPointer, _ b: UnsafeRawBufferPointer) -> Bool {
        guard a.count == b.count else { return false }
        var d: UInt8 = 0
        for i in 0..<a.count { d |= a[i] ^ b[i] }
        return d == 0
    }
}
