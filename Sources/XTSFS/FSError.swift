import XTSContent
import XTSFormat
import XTSSystem

/// Errors of filesystem operations, in domain terms. The FUSE layer turns them into an
/// errno in exactly one place (`FSError.errno`).
public enum FSError: Error, Sendable, CustomStringConvertible {
    case system(SystemError)
    case notFound
    case exists
    case notEmpty
    case notDirectory
    case isDirectory
    case nameTooLong
    case invalidArgument
    case readOnly
    case notSupported
    case badHandle
    case fileTooLarge
    /// Damaged ciphertext or metadata that the format can detect.
    case damaged(String)

    public var description: String {
        switch self {
        case .system(let e): return "\(e)"
        case .damaged(let s): return "damaged: \(s)"
        default: return "\(self.errno)"
        }
    }

    /// The errno a caller of the mounted filesystem sees.
    public var errno: Int32 {
        switch self {
        case .system(let e): return e.errno
        case .notFound: return ENOENT
        case .exists: return EEXIST
        case .notEmpty: return ENOTEMPTY
        case .notDirectory: return ENOTDIR
        case .isDirectory: return EISDIR
        case .nameTooLong: return ENAMETOOLONG
        case .invalidArgument: return EINVAL
        case .readOnly: return EROFS
        case .notSupported: return EOPNOTSUPP
        case .badHandle: return EBADF
        case .fileTooLarge: return EFBIG
        case .damaged: return EIO
        }
    }

    init(_ e: ContentError) {
        switch e {
        case .io(let s): self = .system(s)
        case .crypto(let c): self = .damaged("\(c)")
        case .badHeader(let s): self = .damaged(s)
        }
    }

    init(_ e: NameError) {
        switch e {
        case .tooLong: self = .nameTooLong
        case .invalid: self = .invalidArgument
        case .crypto(let c): self = .damaged("name: \(c)")
        }
    }
}

#if canImport(Glibc)
import Glibc
#endif
