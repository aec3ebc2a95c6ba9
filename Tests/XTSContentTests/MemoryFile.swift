import XTSContent
import XTSSystem
#if canImport(Glibc)
import Glibc
#endif

/// A backing file in memory, for content tests without a mount or a disk.
final class MemoryFile: BackingFile {
    var bytes: [UInt8] = []
    /// The largest size the "filesystem" allows: beyond it writes and truncates fail with
    /// EFBIG, as a real one's limit does.
    var maxSize: Int = .max

    func read(into buffer: UnsafeMutableRawBufferPointer, at offset: Int64) throws(SystemError) -> Int {
        let o = Int(offset)
        guard o < bytes.count else { return 0 }
        let n = min(buffer.count, bytes.count - o)
        bytes.withUnsafeBytes { buffer.baseAddress!.copyMemory(from: $0.baseAddress! + o, byteCount: n) }
        return n
    }

    func write(_ buffer: UnsafeRawBufferPointer, at offset: Int64) throws(SystemError) {
        let o = Int(offset)
        if o + buffer.count > maxSize { throw SystemError(EFBIG, "pwrite") }
        if bytes.count < o + buffer.count { bytes += [UInt8](repeating: 0, count: o + buffer.count - bytes.count) }
        for i in 0..<buffer.count { bytes[o + i] = buffer[i] }
    }

    func size() throws(SystemError) -> Int64 { Int64(bytes.count) }

    func truncate(_ size: Int64) throws(SystemError) {
        let n = Int(size)
        if n > maxSize { throw SystemError(EFBIG, "ftruncate") }
        if n < bytes.count { bytes.removeLast(bytes.count - n) } else { bytes += [UInt8](repeating: 0, count: n - bytes.count) }
    }

    /// Zeros in place; the size stays (as fallocate's KEEP_SIZE).
    func punchHole(at offset: Int64, length: Int64) throws(SystemError) {
        let lo = Int(offset), hi = min(Int(offset + length), bytes.count)
        if lo < hi { for i in lo..<hi { bytes[i] = 0 } }
    }
}
