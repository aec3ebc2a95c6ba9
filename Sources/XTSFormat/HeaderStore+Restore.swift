import XTSSystem

extension HeaderStore {
    /// Replaces one copy with `bytes`, the exact bytes of the other copy, which the caller
    /// has verified (keyslot, MAC, root directory). Guarded like `write`: refuses when the
    /// target parses as a header of another volume ID, so a copy that verifies is never
    /// overwritten with another volume's. A missing, damaged, outdated or altered copy of
    /// the same volume is replaced atomically (tmp, fsync, rename, fsync directory).
    public func restore(copy: Int, bytes: [UInt8]) throws(WriteError) {
        let header: VolumeHeader
        do { header = try VolumeHeader.decode(bytes) } catch { throw .system(SystemError(EINVAL, "the copy to restore from does not parse: \(error)")) }
        if let existing = try? Sys.readFile(path(copy), limit: VolumeHeader.maxLength + 1),
           let other = try? VolumeHeader.decode(existing), other.volumeID != header.volumeID {
            throw .foreignCopy(file: path(copy), volumeID: other.volumeID)
        }
        do { try Sys.atomicWrite(bytes, to: path(copy), mode: 0o400) } catch { throw .system(error) }
    }
}

#if canImport(Glibc)
import Glibc
#endif
