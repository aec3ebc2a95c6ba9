/// `withUnsafeBytes` of the standard library rethrows as `any Error`; these keep a typed
/// error so callers with `throws(SomeError)` need no casts.
public extension Array where Element == UInt8 {
    func withBytes<R, E: Error>(_ body: (UnsafeRawBufferPointer) throws(E) -> R) throws(E) -> R {
        let result: Result<R, E> = withUnsafeBytes { p in Result { () throws(E) -> R in try body(p) } }
        return try result.get()
    }

    mutating func withMutableBytes<R, E: Error>(_ body: (UnsafeMutableRawBufferPointer) throws(E) -> R) throws(E) -> R {
        let result: Result<R, E> = withUnsafeMutableBytes { p in Result { () throws(E) -> R in try body(p) } }
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
