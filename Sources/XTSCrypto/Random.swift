import XTSSystem
import CCrypto

/// Cryptographically secure random bytes from OpenSSL's DRBG, which is seeded and
/// reseeded from the kernel (getrandom).
public enum Random {
    public static func bytes(_ count: Int) throws(CryptoError) -> [UInt8] {
        guard count >= 0 else { throw .invalidInput("negative random length \(count)") }
        var out = [UInt8](repeating: 0, count: count)
        try out.withMutableBytes { (buffer) throws(CryptoError) in
            try fill(buffer)
        }
        return out
    }

    public static func fill(_ buffer: UnsafeMutableRawBufferPointer) throws(CryptoError) {
        guard let base = buffer.baseAddress, buffer.count > 0 else { return }
        // RAND_bytes takes an int length; larger requests go in pieces.
        let chunk = 1 << 30
        var done = 0
        while done < buffer.count {
            let n = min(chunk, buffer.count - done)
            guard RAND_bytes(base.advanced(by: done).assumingMemoryBound(to: UInt8.self), Int32(n)) == 1 else {
                CryptoError.discardOpenSSLErrors()
                throw .randomFailed
            }
            done += n
        }
    }
}
