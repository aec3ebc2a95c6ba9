import CCrypto
import XTSSystem

/// Key material and other secrets, kept in locked (never swapped, never dumped)
/// memory that is zeroed when the last reference goes away.
///
/// Deliberately not printable: `description` shows only the length, so a secret
/// that ends up in a log line or an error message does not leak.
///
/// `@unchecked Sendable` on the same terms as `LockedBuffer`: the bytes are written
/// only while the owner builds the secret, afterwards every holder only reads them.
public final class SecretBytes: @unchecked Sendable, CustomStringConvertible, CustomDebugStringConvertible {
    private let storage: LockedBuffer

    /// Zero-filled secret of `count` bytes, to be filled through `withUnsafeMutableBytes`.
    public init(count: Int) {
        precondition(count >= 0, "SecretBytes count must not be negative")
        storage = LockedBuffer(count: count)
    }

    public init(copying bytes: UnsafeRawBufferPointer) {
        storage = LockedBuffer(count: bytes.count)
        if bytes.count > 0 {
            storage.withUnsafeMutableBytes { $0.copyMemory(from: bytes) }
        }
    }

    /// For known-answer tests and fixed inputs: the caller should wipe its array,
    /// because Swift arrays live in ordinary, swappable, copy-on-write memory.
    public init(copying bytes: [UInt8]) {
        storage = LockedBuffer(count: bytes.count)
        if bytes.count > 0 {
            storage.withUnsafeMutableBytes { dst in
                bytes.withUnsafeBytes { dst.copyMemory(from: $0) }
            }
        }
    }

    /// `count` bytes from the CSPRNG, generated straight into locked memory.
    public static func random(count: Int) throws(CryptoError) -> SecretBytes {
        guard count >= 0 else { throw .invalidInput("negative random length \(count)") }
        let secret = SecretBytes(count: count)
        try secret.withUnsafeMutableBytes { (buffer) throws(CryptoError) in
            try Random.fill(buffer)
        }
        return secret
    }

    public var count: Int { storage.count }

    public func withUnsafeBytes<R, E: Error>(_ body: (UnsafeRawBufferPointer) throws(E) -> R) throws(E) -> R {
        try storage.withUnsafeBytes(body)
    }

    public func withUnsafeMutableBytes<R, E: Error>(_ body: (UnsafeMutableRawBufferPointer) throws(E) -> R) throws(E) -> R {
        try storage.withUnsafeMutableBytes(body)
    }

    /// Comparison whose running time does not depend on where the bytes differ,
    /// so comparing against a secret does not leak it byte by byte through timing.
    public func constantTimeEquals(_ other: SecretBytes) -> Bool {
        guard count == other.count else { return false }
        if count == 0 { return true }
        return withUnsafeBytes { a in
            other.withUnsafeBytes { b in
                CRYPTO_memcmp(a.baseAddress, b.baseAddress, a.count) == 0
            }
        }
    }

    /// A copy of `range` in new locked memory (for splitting derived key material).
    public func slice(_ range: Range<Int>) -> SecretBytes {
        precondition(range.lowerBound >= 0 && range.upperBound <= count, "SecretBytes slice out of range")
        return withUnsafeBytes { SecretBytes(copying: UnsafeRawBufferPointer(rebasing: $0[range])) }
    }

    public var description: String { "<secret \(count) bytes>" }
    public var debugDescription: String { "<secret \(count) bytes>" }
}
