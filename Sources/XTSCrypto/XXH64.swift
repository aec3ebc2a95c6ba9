/// XXH64 (the 64-bit xxHash, seed given): a fast non-cryptographic hash. A DEK rekey's
/// journal uses it to tell which of two known ciphertexts a block holds (old or new); the
/// journal itself is authenticated with HMAC-SHA256, so nothing relies on it resisting
/// an attacker. Written from the published algorithm description.
public enum XXH64 {
    static let p1: UInt64 = 0x9E37_79B1_85EB_CA87
    static let p2: UInt64 = 0xC2B2_AE3D_27D4_EB4F
    static let p3: UInt64 = 0x1656_67B1_9E37_79F9
    static let p4: UInt64 = 0x85EB_CA77_C2B2_AE63
    static let p5: UInt64 = 0x27D4_EB2F_1656_67C5

    @inline(__always) static func rotl(_ x: UInt64, _ r: UInt64) -> UInt64 { (x << r) | (x >> (64 - r)) }
    @inline(__always) static func round(_ acc: UInt64, _ input: UInt64) -> UInt64 { rotl(acc &+ input &* p2, 31) &* p1 }
    @inline(__always) static func merge(_ h: UInt64, _ v: UInt64) -> UInt64 { (h ^ round(0, v)) &* p1 &+ p4 }

    @inline(__always) static func load64(_ q: UnsafeRawPointer) -> UInt64 { UInt64(littleEndian: q.loadUnaligned(as: UInt64.self)) }

    public static func hash(_ data: UnsafeRawBufferPointer, seed: UInt64 = 0) -> UInt64 {
        let n = data.count
        guard let p = data.baseAddress, n > 0 else { return avalanche(seed &+ p5) }
        var q = p
        let end = p + n
        var h: UInt64
        if n >= 32 {
            var v1 = seed &+ p1 &+ p2, v2 = seed &+ p2, v3 = seed, v4 = seed &- p1
            let limit = p + (n & ~31)
            while q < limit {
                v1 = round(v1, load64(q))
                v2 = round(v2, load64(q + 8))
                v3 = round(v3, load64(q + 16))
                v4 = round(v4, load64(q + 24))
                q += 32
            }
            h = rotl(v1, 1) &+ rotl(v2, 7) &+ rotl(v3, 12) &+ rotl(v4, 18)
            h = merge(h, v1); h = merge(h, v2); h = merge(h, v3); h = merge(h, v4)
        } else {
            h = seed &+ p5
        }
        h = h &+ UInt64(n)
        while end - q >= 8 { h = rotl(h ^ round(0, load64(q)), 27) &* p1 &+ p4; q += 8 }
        if end - q >= 4 {
            h = rotl(h ^ (UInt64(UInt32(littleEndian: q.loadUnaligned(as: UInt32.self))) &* p1), 23) &* p2 &+ p3
            q += 4
        }
        while q < end { h = rotl(h ^ (UInt64(q.load(as: UInt8.self)) &* p5), 11) &* p1; q += 1 }
        return avalanche(h)
    }

    public static func hash(_ data: [UInt8], seed: UInt64 = 0) -> UInt64 { data.withUnsafeBytes { hash($0, seed: seed) } }

    @inline(__always) static func avalanche(_ x: UInt64) -> UInt64 {
        var h = x
        h ^= h >> 33; h = h &* p2
        h ^= h >> 29; h = h &* p3
        h ^= h >> 32
        return h
    }
}
