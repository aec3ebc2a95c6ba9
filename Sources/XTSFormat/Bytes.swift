/// Little-endian encoding for the on-disk structures. Readers throw `FormatError.truncated`
/// instead of trapping, so damaged input can never crash the parser.
public struct ByteWriter {
    public private(set) var bytes: [UInt8] = []
    public init(capacity: Int = 256) { bytes.reserveCapacity(capacity) }

    public mutating func u8(_ v: UInt8) { bytes.append(v) }
    public mutating func u16(_ v: UInt16) { withUnsafeBytes(of: v.littleEndian) { bytes.append(contentsOf: $0) } }
    public mutating func u32(_ v: UInt32) { withUnsafeBytes(of: v.littleEndian) { bytes.append(contentsOf: $0) } }
    public mutating func u64(_ v: UInt64) { withUnsafeBytes(of: v.littleEndian) { bytes.append(contentsOf: $0) } }
    public mutating func raw(_ v: [UInt8]) { bytes.append(contentsOf: v) }
    public mutating func raw<S: Sequence>(_ v: S) where S.Element == UInt8 { bytes.append(contentsOf: v) }
    /// u16 length followed by the bytes.
    public mutating func blob16(_ v: [UInt8]) throws(FormatError) {
        guard v.count <= Int(UInt16.max) else { throw .invalid("field too long (\(v.count) bytes)") }
        u16(UInt16(v.count)); raw(v)
    }
    /// Overwrites a u32 written earlier (for length fields known only at the end).
    public mutating func patchU32(at offset: Int, _ v: UInt32) {
        withUnsafeBytes(of: v.littleEndian) { for (i, b) in $0.enumerated() { bytes[offset + i] = b } }
    }
    public var count: Int { bytes.count }
}

public struct ByteReader {
    public let bytes: [UInt8]
    public private(set) var offset: Int

    public init(_ bytes: [UInt8], offset: Int = 0) { self.bytes = bytes; self.offset = offset }

    public var remaining: Int { bytes.count - offset }

    private mutating func take(_ n: Int, _ what: StaticString) throws(FormatError) -> ArraySlice<UInt8> {
        guard n >= 0, remaining >= n else { throw .truncated("\(what)") }
        defer { offset += n }
        return bytes[offset..<offset + n]
    }

    private mutating func int<T: FixedWidthInteger>(_ type: T.Type, _ what: StaticString) throws(FormatError) -> T {
        let s = try take(MemoryLayout<T>.size, what)
        var v: T = 0
        for (i, b) in s.enumerated() { v |= T(b) << (8 * i) }
        return v
    }

    public mutating func u8(_ what: StaticString) throws(FormatError) -> UInt8 { try int(UInt8.self, what) }
    public mutating func u16(_ what: StaticString) throws(FormatError) -> UInt16 { try int(UInt16.self, what) }
    public mutating func u32(_ what: StaticString) throws(FormatError) -> UInt32 { try int(UInt32.self, what) }
    public mutating func u64(_ what: StaticString) throws(FormatError) -> UInt64 { try int(UInt64.self, what) }
    public mutating func raw(_ n: Int, _ what: StaticString) throws(FormatError) -> [UInt8] { Array(try take(n, what)) }
    public mutating func blob16(_ what: StaticString) throws(FormatError) -> [UInt8] {
        let n = try u16(what)
        return try raw(Int(n), what)
    }
}
