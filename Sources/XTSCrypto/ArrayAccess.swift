/// Array's pointer accessors are `rethrows`, so a typed-throwing closure passed to
/// them comes back out as `any Error`. These wrappers carry the closure's error
/// type through, so the crypto API can keep `throws(CryptoError)` end to end.
extension Array where Element == UInt8 {
    func withBytes<R, E: Error>(_ body: (UnsafeRawBufferPointer) throws(E) -> R) throws(E) -> R {
        let result: Result<R, E> = withUnsafeBytes { bytes in Result { () throws(E) -> R in try body(bytes) } }
        return try result.get()
    }

    mutating func withMutableBytes<R, E: Error>(_ body: (UnsafeMutableRawBufferPointer) throws(E) -> R) throws(E) -> R {
        let result: Result<R, E> = withUnsafeMutableBytes { bytes in Result { () throws(E) -> R in try body(bytes) } }
        return try result.get()
    }

    func withBuffer<R, E: Error>(_ body: (UnsafeBufferPointer<UInt8>) throws(E) -> R) throws(E) -> R {
        let result: Result<R, E> = withUnsafeBufferPointer { buffer in Result { () throws(E) -> R in try body(buffer) } }
        return try result.get()
    }

    mutating func withMutableBuffer<R, E: Error>(_ body: (UnsafeMutableBufferPointer<UInt8>) throws(E) -> R) throws(E) -> R {
        let result: Result<R, E> = withUnsafeMutableBufferPointer { buffer in Result { () throws(E) -> R in try body(buffer) } }
        return try result.get()
    }
}
