import XTSFS
#if canImport(Glibc)
import Glibc
#endif

/// The one place where a filesystem error becomes what the caller of the mount sees.
extension FSError {
    var errno: Int32 {
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
        case .stale: return ESTALE
        case .notPermitted: return EPERM
        case .noAttribute: return ENODATA
        case .tooBig: return E2BIG
        case .outOfRange: return ERANGE
        }
    }
}
