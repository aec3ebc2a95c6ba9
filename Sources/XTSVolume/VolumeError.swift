/// Exit codes of the `xtsfs` command. Stable: scripts depend on them (documented in xtsfs(1)).
public enum ExitStatus: Int32, Sendable, CaseIterable {
    case success = 0
    case failure = 1
    case usage = 2
    case notAVolume = 10
    case corruptHeader = 11
    case wrongKey = 12
    case unsupported = 13
    case mountFailed = 14
    case refused = 15
    case badInput = 16
    /// The key provider failed: token missing, key server unreachable, key revoked,
    /// key command failed or timed out, key file unreadable.
    case providerFailed = 17
}

/// What a volume operation tells the user when it fails: a message and an exit status.
public enum VolumeError: Error, Sendable, CustomStringConvertible {
    case notAVolume(String)
    case corruptHeader(String)
    case wrongKey(String)
    case unsupported(String)
    case mountFailed(String)
    case refused(String)
    case badInput(String)
    case providerFailed(String)
    case usage(String)
    case failure(String)

    public var description: String {
        switch self {
        case .notAVolume(let s), .corruptHeader(let s), .wrongKey(let s), .unsupported(let s),
             .mountFailed(let s), .refused(let s), .badInput(let s), .providerFailed(let s), .usage(let s), .failure(let s):
            return s
        }
    }

    public var exitStatus: ExitStatus {
        switch self {
        case .notAVolume: .notAVolume
        case .corruptHeader: .corruptHeader
        case .wrongKey: .wrongKey
        case .unsupported: .unsupported
        case .mountFailed: .mountFailed
        case .refused: .refused
        case .badInput: .badInput
        case .providerFailed: .providerFailed
        case .usage: .usage
        case .failure: .failure
        }
    }
}
