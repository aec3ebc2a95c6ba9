/// What can be wrong with on-disk metadata. Each case maps to a user-facing message
/// and exit code in the CLI, and to EIO in the filesystem.
public enum FormatError: Error, Equatable, Sendable, CustomStringConvertible {
    /// The bytes end before a field does.
    case truncated(String)
    /// Not an xtsfs structure at all (wrong magic).
    case badMagic(String)
    /// A checksum or MAC does not match: damaged or tampered.
    case checksumMismatch(String)
    /// A format version this build does not know.
    case unsupportedVersion(UInt16)
    /// A feature flag this build does not know: reading on could return wrong data.
    case unsupportedFeatures(UInt64)
    /// A field holds a value outside what the format allows.
    case invalid(String)

    public var description: String {
        switch self {
        case .truncated(let what): return "truncated (\(what))"
        case .badMagic(let what): return "not an xtsfs \(what) (bad magic)"
        case .checksumMismatch(let what): return "\(what) does not match its checksum: damaged or tampered with"
        case .unsupportedVersion(let v): return "format version \(v) is not supported by this xtsfs (it reads version \(VolumeHeader.currentVersion))"
        case .unsupportedFeatures(let f): return "unknown feature flags 0x\(String(f, radix: 16)): written by a newer xtsfs"
        case .invalid(let what): return "invalid \(what)"
        }
    }
}
