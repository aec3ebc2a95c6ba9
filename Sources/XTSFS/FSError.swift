import XTSContent
import XTSFormat
import XTSSystem

/// Errors of filesystem operations, in domain terms. The FUSE layer turns them into an
/// errno in exactly one place (XTSFuse's `FSError.errno`).
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
    /// The backing object behind a known node was replaced by something else.
    case stale
    case notPermitted
    /// No such extended attribute.
    case noAttribute
    /// An extended attribute value too large.
    case tooBig
    /// A buffer too small, or an extended attribute name too long.
    case outOfRange
    /// Damaged ciphertext or metadata that the format can detect.
    case damaged(String)

    public var description: String {
        switch self {
        case .system(let e): return "\(e)"
        case .damaged(let s): return "damaged: \(s)"
        case .notFound: return "no such entry"
        case .exists: return "entry exists"
        case .notEmpty: return "directory not empty"
        case .notDirectory: return "not a directory"
        case .isDirectory: return "is a directory"
        case .nameTooLong: return "name too long"
        case .invalidArgument: return "invalid argument"
        case .readOnly: return "read-only mount"
        case .notSupported: return "not supported"
        case .badHandle: return "unknown file handle"
        case .fileTooLarge: return "file too large"
        case .stale: return "replaced in CIPHERDIR since it was looked up"
        case .notPermitted: return "operation not permitted"
        case .noAttribute: return "no such attribute"
        case .tooBig: return "attribute value too large"
        case .outOfRange: return "out of range"
        }
    }

    init(_ e: ContentError) {
        switch e {
        case .io(let s): self = .system(s)
        case .crypto(let c): self = .damaged("\(c)")
        case .badHeader(let s): self = .damaged(s)
        case .authentication(let s): self = .damaged(s)
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
