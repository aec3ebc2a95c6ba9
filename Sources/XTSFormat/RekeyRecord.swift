/// The rekey record of the volume header (FORMAT.md section 2.4): the state of a DEK
/// rekey that has started and not yet finished. Present only together with the feature
/// bit `rekeyInProgress`.
///
///     version u8 (1) | state u8 | reserved u16 | old generation u32 | new generation u32 |
///     started u64 | wrapped new DEK blob16 | new DEK digest [32]
///
/// The new DEK is wrapped (RFC 5649) under a key derived from the old DEK, so every slot
/// that opens the old generation reaches both while the sweep runs.
public struct RekeyRecord: Sendable, Equatable {
    public enum State: UInt8, Sendable, CustomStringConvertible {
        /// Objects are being re-encrypted; both generations are in use.
        case sweeping = 1
        /// Every object was checked to be of the new generation; only the final header
        /// (new slots, old generation gone) remains to be written.
        case verified = 2
        public var description: String {
            switch self {
            case .sweeping: "re-encrypting"
            case .verified: "verified, header update pending"
            }
        }
    }

    public static let currentVersion: UInt8 = 1
    public var state: State
    public var oldGeneration: UInt32
    public var newGeneration: UInt32
    public var started: UInt64
    public var wrappedNewKey: [UInt8]
    public var newKeyDigest: [UInt8]

    public init(state: State, oldGeneration: UInt32, newGeneration: UInt32, started: UInt64, wrappedNewKey: [UInt8], newKeyDigest: [UInt8]) {
        self.state = state
        self.oldGeneration = oldGeneration
        self.newGeneration = newGeneration
        self.started = started
        self.wrappedNewKey = wrappedNewKey
        self.newKeyDigest = newKeyDigest
    }

    public func encode() throws(FormatError) -> [UInt8] {
        var w = ByteWriter(capacity: 128)
        w.u8(RekeyRecord.currentVersion); w.u8(state.rawValue); w.u16(0)
        w.u32(oldGeneration); w.u32(newGeneration); w.u64(started)
        try w.blob16(wrappedNewKey)
        guard newKeyDigest.count == 32 else { throw .invalid("rekey record digest length") }
        w.raw(newKeyDigest)
        return w.bytes
    }

    public static func decode(_ bytes: [UInt8]) throws(FormatError) -> RekeyRecord {
        var r = ByteReader(bytes)
        let version = try r.u8("rekey record version")
        guard version == currentVersion else { throw .invalid("rekey record version \(version)") }
        guard let state = State(rawValue: try r.u8("rekey state")) else { throw .invalid("rekey state") }
        _ = try r.u16("rekey reserved")
        let old = try r.u32("rekey old generation")
        let new = try r.u32("rekey new generation")
        guard new == old &+ 1, new != 0 else { throw .invalid("rekey generations \(old) -> \(new)") }
        let started = try r.u64("rekey started")
        let wrapped = try r.blob16("rekey wrapped key")
        let digest = try r.raw(32, "rekey digest")
        guard r.remaining == 0 else { throw .invalid("rekey record: \(r.remaining) trailing bytes") }
        return RekeyRecord(state: state, oldGeneration: old, newGeneration: new, started: started, wrappedNewKey: wrapped, newKeyDigest: digest)
    }
}
