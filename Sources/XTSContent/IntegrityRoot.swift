import Synchronization
import XTSCrypto
import XTSFormat
import XTSSystem

/// A group's element, or an XOR of elements: 16 bytes as two words.
public struct RootElement: Equatable, Sendable {
    var lo: UInt64 = 0
    var hi: UInt64 = 0

    public init() {}

    public init(_ bytes: some Collection<UInt8>) {
        precondition(bytes.count == 16)
        var i = 0
        for b in bytes {
            if i < 8 { lo |= UInt64(b) << (8 * i) } else { hi |= UInt64(b) << (8 * (i - 8)) }
            i += 1
        }
    }

    public var bytes: [UInt8] { (0..<16).map { i in UInt8(truncatingIfNeeded: (i < 8 ? lo >> (8 * i) : hi >> (8 * (i - 8)))) } }

    public static func ^ (a: RootElement, b: RootElement) -> RootElement {
        var r = RootElement()
        r.lo = a.lo ^ b.lo; r.hi = a.hi ^ b.hi
        return r
    }

    public static func ^= (a: inout RootElement, b: RootElement) { a = a ^ b }
}

/// What this process has verified of one file's tag blocks (file header version 3,
/// FORMAT.md 12.11), shared by every handle that holds the file's `FileCrypto`: the
/// header bytes the file root was last checked against, each covered group's element as
/// its tag block held it, and the elements the header counts instead for groups whose
/// record names it (a change cut off by a crash, or one another host is making).
///
/// A read checks the tag block of each group it touches against `elements` (one 4 KiB
/// GHASH) and reads every tag block again only when that fails or the header changed.
public final class FileRootCache: Sendable {
    struct State {
        var header: [UInt8] = []
        var elements: [RootElement] = []
        var recorded: [Int64: RootElement] = [:]
        /// The XOR of `elements`.
        var acc = RootElement()
    }
    let state = Mutex(State())

    public init() {}

    /// Forgets what was verified (the next access reads every tag block again).
    public func reset() { state.withLock { $0 = State() } }

    func isVerified(_ header: [UInt8]) -> Bool { state.withLock { $0.header == header } }

    func store(header: [UInt8], elements: [RootElement], recorded: [Int64: RootElement]) {
        let acc = elements.reduce(RootElement(), ^)
        state.withLock { $0 = State(header: header, elements: elements, recorded: recorded, acc: acc) }
    }

    /// The verified header bytes and the records that name it.
    func snapshot() -> (header: [UInt8], recorded: [Int64: RootElement]) { state.withLock { ($0.header, $0.recorded) } }

    /// Group `g`'s element as verified; nil past the groups covered.
    func element(_ g: Int64) -> RootElement? {
        state.withLock { g >= 0 && g < $0.elements.count ? $0.elements[Int(g)] : nil }
    }

    /// A tag block rewritten with the same header in place (its record still naming it).
    func replace(_ g: Int64, _ e: RootElement) {
        state.withLock { st in
            guard g >= 0 && g < st.elements.count else { return }
            st.acc ^= st.elements[Int(g)] ^ e
            st.elements[Int(g)] = e
        }
    }

    /// The root of the first `groups` groups with the elements of `overlay` in place of
    /// the verified ones (every group past those verified must be in `overlay`): O(groups
    /// changed), and O(groups dropped) for a shorter file, never a copy of the elements.
    func root(groups: Int64, overlay: [Int64: RootElement]) -> RootElement {
        state.withLock { Self.root(&$0, groups: groups, overlay: overlay) }
    }

    private static func root(_ st: inout State, groups: Int64, overlay: [Int64: RootElement]) -> RootElement {
        var acc = st.acc
        let n = Int64(st.elements.count)
        if groups < n { for g in Int(groups)..<Int(n) { acc ^= st.elements[g] } }
        for (g, e) in overlay where g < groups {
            acc ^= e
            if g < n { acc ^= st.elements[Int(g)] }
        }
        return acc
    }

    /// The header `header` was written, committing to the first `groups` groups with
    /// `overlay` applied: it is what is verified now, in place.
    func commit(header: [UInt8], groups: Int64, overlay: [Int64: RootElement]) {
        state.withLock { st in
            let acc = Self.root(&st, groups: groups, overlay: overlay)
            if st.elements.count > Int(groups) { st.elements.removeLast(st.elements.count - Int(groups)) }
            for (g, e) in overlay.sorted(by: { $0.key < $1.key }) where g < groups {
                while st.elements.count <= Int(g) { st.elements.append(RootElement()) }
                st.elements[Int(g)] = e
            }
            st.acc = acc
            st.header = header
            st.recorded = [:]
        }
    }
}

extension IntegrityLayout {
    /// The most groups a file root covers in this version: files of up to 2 TiB (about
    /// 4.2 million groups, 64 MiB of cached elements). A header claiming more is refused
    /// before any tag block is read, so a planted header cannot make the daemon scan
    /// (or hold) without bound.
    public static let maxRootGroups: Int64 = 1 << 22
}

/// The file root of header version 3 (FORMAT.md 12.11).
extension FileCrypto {
    static let rootElementLabel: [UInt8] = Array("xtsfs integrity group element".utf8)
    static let rootRecordLabel: [UInt8] = Array("xtsfs integrity group record".utf8)

    public var hasFileRoot: Bool { elementKey != nil }

    /// The element of group `g` whose tag block is `block` (4096 bytes): tag algorithm 2
    /// under the file's element key over `u64_le(g) || salt || the 126 entries`. Group 0
    /// has no salt (its first 64 bytes are the header): 16 zero bytes stand for it.
    public func element(group g: Int64, tagBlock block: UnsafeRawBufferPointer) throws(CryptoError) -> RootElement {
        guard let elementKey else { throw .invalidKeyLength }
        precondition(block.count == Int(IntegrityLayout.blockSize))
        let s = try UnitTagSession(.ghashAES256, key: elementKey)
        var prefix = [UInt8](repeating: 0, count: 24)
        for i in 0..<8 { prefix[i] = UInt8(truncatingIfNeeded: UInt64(g) >> (8 * i)) }
        if g > 0 { for i in IntegrityLayout.saltRange { prefix[8 + i] = block[i] } }
        var out = [UInt8](repeating: 0, count: 16)
        try prefix.withBytes { (p) throws(CryptoError) in
            try out.withMutableBytes { (o) throws(CryptoError) in
                try s.mac(prefix: p, body: UnsafeRawBufferPointer(rebasing: block[Int(IntegrityLayout.headerLength)...]), into: o)
            }
        }
        return RootElement(out)
    }

    /// A group's record element, sealed (AES-256 under the file's record key) so that
    /// elements never appear in the clear.
    public func sealRecord(_ e: RootElement) throws(CryptoError) -> [UInt8] {
        guard let recordKey else { throw .invalidKeyLength }
        return try AESBlock.encrypt(key: recordKey, e.bytes)
    }

    public func openRecord(_ sealed: some Collection<UInt8>) throws(CryptoError) -> RootElement {
        guard let recordKey else { throw .invalidKeyLength }
        return RootElement(try AESBlock.decrypt(key: recordKey, Array(sealed)))
    }
}
