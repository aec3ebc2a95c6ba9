import XTSFormat
import XTSKeys

/// What `xtsfs status` shows: header facts, never a secret.
public struct StatusReport: Codable, Sendable {
    public struct Slot: Codable, Sendable {
        public var index: Int
        public var provider: String
        public var wrap: String
        public var keyGeneration: Int
        public var created: UInt64
        public var lastUsed: UInt64?
        public var parameters: [String: String]
    }
    public struct Copy: Codable, Sendable {
        public var file: String
        public var ok: Bool
        public var sequence: UInt64?
        /// The copy's own volume ID (hex); the two differ only if a copy came from elsewhere.
        public var volumeID: String?
        public var problem: String?
    }
    public var cipherDir: String
    public var formatVersion: Int
    public var volumeID: String
    public var created: UInt64
    public var contentCipher: String
    public var nameCipher: String
    public var blockSize: Int
    public var keyGeneration: Int
    public var features: [String]
    public var headerCopies: [Copy]
    public var keyslots: [Slot]
    public var rekey: String
    /// What needs a look: header copies that disagree.
    public var warnings: [String]
    /// The temp and cache areas (in CIPHERDIR, and mounted here).
    public var areas: AreaStatus?
    /// Who has the volume mounted: the presence records in `xtsfs.hosts`, with their state.
    public var mountedBy: [Presence.Record] = []

    public static func make(_ cipherDir: String) throws(VolumeError) -> StatusReport {
        let loaded = try Volume.load(cipherDir)
        let h = loaded.newest
        var copies: [Copy] = []
        for copy in 0..<HeaderStore.fileNames.count {
            if let c = loaded.candidates.first(where: { $0.copy == copy }) {
                copies.append(Copy(file: HeaderStore.fileNames[copy], ok: true, sequence: c.header.sequence, volumeID: hex(c.header.volumeID), problem: nil))
            } else {
                let why = loaded.damaged.first { $0.copy == copy }?.error ?? "unknown"
                copies.append(Copy(file: HeaderStore.fileNames[copy], ok: false, sequence: nil, volumeID: nil, problem: why))
            }
        }
        var warnings: [String] = []
        let valid = copies.filter(\.ok)
        if Set(valid.compactMap(\.volumeID)).count > 1 {
            warnings.append("the header copies belong to different volumes (" + valid.map { "\($0.file): \($0.volumeID ?? "?")" }.joined(separator: ", ") +
                            "): one was copied in from elsewhere; shown is the newest, mount uses the copy that opens and verifies")
        } else if Set(valid.compactMap(\.sequence)).count > 1 {
            warnings.append("the header copies disagree (" + valid.map { "\($0.file): sequence \($0.sequence ?? 0)" }.joined(separator: ", ") +
                            "): an interrupted update, or a copy put back from elsewhere; shown is the newest")
        }
        var features: [String] = []
        if h.features.contains(.blockAuthentication) { features.append("block-authentication") }
        if h.features.contains(.rekeyInProgress) { features.append("rekey-in-progress") }
        if h.features.contains(.rekeyJournal) { features.append("rekey-journal") }
        if h.features.contains(.ghashUnitTags) { features.append("ghash-unit-tags") }
        if h.features.contains(.rekeyIntegrityJournal) { features.append("rekey-integrity-journal") }
        if h.features.contains(.listingManifests) { features.append("listing-manifests") }
        if h.features.contains(.fileRoots) { features.append("file-roots") }
        return StatusReport(
            cipherDir: cipherDir, formatVersion: Int(h.version),
            volumeID: hex(h.volumeID),
            created: h.created, contentCipher: h.contentCipher.description, nameCipher: h.nameCipher.description,
            blockSize: Int(h.blockSize), keyGeneration: Int(h.keyGeneration), features: features,
            headerCopies: copies,
            keyslots: h.keyslots.map(slotReport),
            rekey: rekeyState(h, cipherDir: cipherDir), warnings: warnings, areas: AreaStatus.make(cipherDir),
            mountedBy: Presence.list(cipherDir))
    }

    /// The rekey record as the user reads it; never a key.
    /// A rekey running online (in the daemon serving the volume on this machine) is shown
    /// with its progress.
    static func rekeyState(_ h: VolumeHeader, cipherDir: String) -> String {
        if h.rekeyRecord.isEmpty { return "none" }
        guard let r = try? RekeyRecord.decode(h.rekeyRecord) else { return "in progress (record not readable by this version)" }
        let generations = "generation \(r.oldGeneration) -> \(r.newGeneration)"
        let dir = Mounter.absolute(cipherDir)
        if Rekey.mountpoint(of: dir) != nil, let s = try? RekeyControl.status(cipherDir: dir), s.phase == .running {
            let p = s.progress
            return "running online in the daemon serving it: \(generations), pass \(s.pass), \(p.phase), \(p.filesDone)/\(p.filesTotal) files, " +
                   "\(p.bytesDone)/\(p.bytesTotal) bytes, started \(r.started) (xtsfs rekey --dek shows its progress)"
        }
        return "interrupted or running: \(generations), \(r.state), started \(r.started) (resume with xtsfs rekey --dek)"
    }

    static func hex(_ bytes: [UInt8]) -> String { bytes.map { String($0, radix: 16).leftPad(2) }.joined() }

    /// Each provider describes its own slots (`SlotDescription`): no provider knowledge here.
    public static func slotReport(_ s: Keyslot) -> Slot {
        Slot(index: Int(s.index), provider: s.provider?.description ?? "unknown(\(s.providerRaw))",
             wrap: s.wrap?.description ?? "unknown(\(s.wrapRaw))", keyGeneration: Int(s.keyGeneration),
             created: s.created, lastUsed: s.lastUsed == 0 ? nil : s.lastUsed, parameters: SlotDescription.describe(s))
    }
}

extension String {
    func leftPad(_ n: Int) -> String { count >= n ? self : String(repeating: "0", count: n - count) + self }
}
