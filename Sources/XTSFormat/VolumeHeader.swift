import XTSCrypto

/// Content ciphers a header can name. Only one today; the field exists so that a
/// later cipher is a new value, not a format break.
public enum ContentCipher: UInt16, Sendable, CustomStringConvertible {
    case aesXTS256 = 1
    public var description: String { "aes-xts-plain64 (AES-256-XTS, 512-bit key)" }
}

public enum NameCipher: UInt16, Sendable, CustomStringConvertible {
    /// AES-256-SIV over the zero-padded name, directory ID as associated data, base64url.
    case aesSIV256 = 1
    public var description: String { "aes-siv (AES-256-SIV, names padded to 16 bytes, base64url)" }
}

/// Feature flags. A reader refuses a header that has a bit it does not know.
public struct Features: OptionSet, Sendable, Hashable {
    public let rawValue: UInt64
    public init(rawValue: UInt64) { self.rawValue = rawValue }
    /// Authenticated contents (`xtsfs init --integrity`): every 4 KiB unit carries a tag
    /// and every file header commits the file's length (FORMAT.md section 12).
    public static let blockAuthentication = Features(rawValue: 1 << 0)
    /// A DEK rekey is under way: files, names, symlink targets and xattrs of two key
    /// generations coexist, and the rekey record holds the new DEK. A reader that does not
    /// know the rekey record would not find the new generation's names: it must refuse.
    public static let rekeyInProgress = Features(rawValue: 1 << 1)
    /// The unfinished DEK rekey re-encrypts files in place under checksum journals
    /// (`xtsfs.rekey-journal`, FORMAT.md section 13.1). A reader that does not know them
    /// would serve a file half rewritten when the rekey stopped as if it were whole: it
    /// must refuse. Set with `rekeyInProgress` (and by a rerun of a rekey started without
    /// it, before its first journal), cleared with it.
    public static let rekeyJournal = Features(rawValue: 1 << 2)
    /// The unfinished DEK rekey is of an integrity volume (with `blockAuthentication`): its
    /// journals hold integrity records (FORMAT.md section 13.2). A reader that knows bit 2
    /// but not these records would leave such a journal unfinished and serve the file it
    /// describes half rewritten: it must refuse. Set and cleared with `rekeyJournal`.
    public static let rekeyIntegrityJournal = Features(rawValue: 1 << 4)
    /// With `blockAuthentication`: units are tagged with tag algorithm 2 (GHASH then AES,
    /// FORMAT.md 12.4) instead of HMAC-SHA256. A reader that does not know it would find
    /// every unit's tag wrong and report the whole volume as tampered: it must refuse.
    public static let ghashUnitTags = Features(rawValue: 1 << 3)
    /// With `blockAuthentication`: every backing directory holds a listing manifest
    /// (`xtsfs.list`, FORMAT.md 12.10) that commits to its entries, and every regular file
    /// has a header with a file ID from its creation. A reader that does not know it would
    /// change directories without updating their manifests, and every directory it touched
    /// would then be reported as tampered: it must refuse.
    public static let listingManifests = Features(rawValue: 1 << 5)
    /// With `blockAuthentication` and `ghashUnitTags`: every file header's MAC also covers
    /// the file's **root**, a commitment to all of its tag blocks (file header version 3,
    /// FORMAT.md 12.11), so that a unit put back from an older version of its file is
    /// detected. A reader that does not know it would find every file header's MAC wrong:
    /// it must refuse.
    public static let fileRoots = Features(rawValue: 1 << 6)
    /// Every flag this build can read.
    public static let known: Features = [.blockAuthentication, .rekeyInProgress, .rekeyJournal, .ghashUnitTags, .rekeyIntegrityJournal, .listingManifests, .fileRoots]

    /// How units are tagged: nil on a plain volume.
    public var unitTags: UnitTagAlgorithm? {
        guard contains(.blockAuthentication) else { return nil }
        guard contains(.ghashUnitTags) else { return .hmacSHA256 }
        return contains(.fileRoots) ? .ghashAES256Root : .ghashAES256
    }

    /// The features of a new volume: plain, or authenticated with `tags`.
    public static func contents(_ tags: UnitTagAlgorithm?) -> Features {
        switch tags {
        case nil: []
        case .hmacSHA256: [.blockAuthentication]
        case .ghashAES256: [.blockAuthentication, .ghashUnitTags, .listingManifests]
        case .ghashAES256Root: [.blockAuthentication, .ghashUnitTags, .listingManifests, .fileRoots]
        }
    }
}

/// Which kind of key provider produced a keyslot's KEK.
public enum ProviderType: UInt16, Sendable, CaseIterable, CustomStringConvertible {
    case passphrase = 1
    case keyfile = 2
    case command = 3
    case pkcs11 = 4
    case kmip = 5
    case recoveryKey = 6
    public var description: String {
        switch self {
        case .passphrase: "passphrase"
        case .keyfile: "keyfile"
        case .command: "command"
        case .pkcs11: "pkcs11"
        case .kmip: "kmip"
        case .recoveryKey: "recovery-key"
        }
    }
}

public enum WrapAlgorithm: UInt16, Sendable, CustomStringConvertible {
    /// RFC 5649 AES key wrap with padding, AES-256 KEK.
    case aes256KWP = 1
    /// AES-256-GCM inside a PKCS#11 token (the key never leaves it): IV [12] | ciphertext | tag [16],
    /// the volume ID as additional data.
    case tokenAES256GCM = 2
    /// AES-256-CBC by a KMIP server (the key never leaves it): IV [16] | ciphertext (PKCS#7 padded).
    case serverAES256CBC = 3
    public var description: String {
        switch self {
        case .aes256KWP: "aes256-kwp (RFC 5649)"
        case .tokenAES256GCM: "aes256-gcm in the token"
        case .serverAES256CBC: "aes256-cbc on the key server"
        }
    }
}

/// One keyslot: the DEK of one key generation, wrapped by one KEK.
public struct Keyslot: Sendable, Equatable {
    public var index: UInt16
    /// Raw provider type; unknown values are kept as they are so a newer slot survives a rewrite.
    public var providerRaw: UInt16
    public var wrapRaw: UInt16
    public var flags: UInt16
    public var keyGeneration: UInt32
    public var created: UInt64
    public var lastUsed: UInt64
    /// Provider-specific parameters (for a passphrase: salt and Argon2id costs).
    public var parameters: [UInt8]
    public var wrappedKey: [UInt8]
    /// Tells a right DEK from a wrong one: HKDF of the DEK under its own label.
    public var keyDigest: [UInt8]

    public var provider: ProviderType? { ProviderType(rawValue: providerRaw) }
    public var wrap: WrapAlgorithm? { WrapAlgorithm(rawValue: wrapRaw) }

    public init(index: UInt16, provider: ProviderType, wrap: WrapAlgorithm, keyGeneration: UInt32, created: UInt64,
                parameters: [UInt8], wrappedKey: [UInt8], keyDigest: [UInt8]) {
        self.index = index
        self.providerRaw = provider.rawValue
        self.wrapRaw = wrap.rawValue
        self.flags = 0
        self.keyGeneration = keyGeneration
        self.created = created
        self.lastUsed = 0
        self.parameters = parameters
        self.wrappedKey = wrappedKey
        self.keyDigest = keyDigest
    }

    static let digestLength = 32

    func encode(into w: inout ByteWriter) throws(FormatError) {
        let start = w.count
        w.u32(0)
        w.u16(index); w.u16(providerRaw); w.u16(wrapRaw); w.u16(flags)
        w.u32(keyGeneration); w.u64(created); w.u64(lastUsed)
        try w.blob16(parameters)
        try w.blob16(wrappedKey)
        guard keyDigest.count == Keyslot.digestLength else { throw .invalid("keyslot digest length") }
        w.raw(keyDigest)
        w.patchU32(at: start, UInt32(w.count - start - 4))
    }

    static func decode(from r: inout ByteReader) throws(FormatError) -> Keyslot {
        let length = Int(try r.u32("keyslot length"))
        guard length <= r.remaining else { throw .truncated("keyslot") }
        var s = ByteReader(try r.raw(length, "keyslot"))
        let index = try s.u16("keyslot index")
        let provider = try s.u16("keyslot provider")
        let wrap = try s.u16("keyslot wrap")
        let flags = try s.u16("keyslot flags")
        let generation = try s.u32("keyslot generation")
        let created = try s.u64("keyslot created")
        let lastUsed = try s.u64("keyslot last used")
        let params = try s.blob16("keyslot parameters")
        let wrapped = try s.blob16("keyslot wrapped key")
        let digest = try s.raw(digestLength, "keyslot digest")
        guard s.remaining == 0 else { throw .invalid("keyslot: \(s.remaining) trailing bytes") }
        var slot = Keyslot(index: index, provider: .passphrase, wrap: .aes256KWP, keyGeneration: generation,
                           created: created, parameters: params, wrappedKey: wrapped, keyDigest: digest)
        slot.providerRaw = provider
        slot.wrapRaw = wrap
        slot.flags = flags
        slot.lastUsed = lastUsed
        return slot
    }
}

/// The volume header (format version 1), as stored in `xtsfs.header` and its copy.
/// Layout (all integers little-endian), documented in docs/FORMAT.md:
///
///     magic "XTSFSHDR" | version u16 | reserved u16 | total length u32 | features u64 |
///     sequence u64 | volume ID [16] | created u64 | content cipher u16 | name cipher u16 |
///     block size u32 | key generation u32 | keyslot count u16 | reserved u16 |
///     keyslots | rekey record (u32 length + bytes) | MAC [32] | SHA-256 checksum [32]
public struct VolumeHeader: Sendable, Equatable {
    public static let magic: [UInt8] = Array("XTSFSHDR".utf8)
    public static let currentVersion: UInt16 = 1
    public static let blockSize = 4096
    public static let macLength = 32
    public static let checksumLength = 32
    public static let maxKeyslots = 32
    /// A header larger than this is not one of ours (limits what a damaged length field can make us read).
    public static let maxLength = 64 * 1024

    public var version: UInt16 = VolumeHeader.currentVersion
    public var features: Features = []
    public var sequence: UInt64
    public var volumeID: [UInt8]
    public var created: UInt64
    public var contentCipher: ContentCipher = .aesXTS256
    public var nameCipher: NameCipher = .aesSIV256
    public var blockSize: UInt32 = UInt32(VolumeHeader.blockSize)
    /// Generation of the DEK that new files and directories are written with.
    public var keyGeneration: UInt32
    public var keyslots: [Keyslot]
    /// Reserved for the state of an interrupted DEK rekey; empty when none is in progress.
    public var rekeyRecord: [UInt8] = []
    /// The reserved fields at offsets 10 and 70, kept as stored: written 0, not
    /// interpreted, but covered by the MAC like every other byte before it, so changing
    /// them is detected once the volume is unlocked.
    public var reserved10: UInt16 = 0
    public var reserved70: UInt16 = 0
    /// HMAC-SHA256 under the header MAC key; verified once the volume is unlocked.
    public var mac: [UInt8] = Array(repeating: 0, count: VolumeHeader.macLength)

    public init(sequence: UInt64, volumeID: [UInt8], created: UInt64, keyGeneration: UInt32, keyslots: [Keyslot]) {
        self.sequence = sequence
        self.volumeID = volumeID
        self.created = created
        self.keyGeneration = keyGeneration
        self.keyslots = keyslots
    }

    /// The bytes the MAC covers: everything before the MAC field.
    public func authenticatedBytes() throws(FormatError) -> [UInt8] {
        var w = ByteWriter(capacity: 1024)
        w.raw(VolumeHeader.magic)
        w.u16(version); w.u16(reserved10)
        w.u32(0) // total length, patched below
        w.u64(features.rawValue)
        w.u64(sequence)
        guard volumeID.count == 16 else { throw .invalid("volume ID length") }
        w.raw(volumeID)
        w.u64(created)
        w.u16(contentCipher.rawValue); w.u16(nameCipher.rawValue)
        w.u32(blockSize); w.u32(keyGeneration)
        guard keyslots.count <= VolumeHeader.maxKeyslots else { throw .invalid("keyslot count \(keyslots.count)") }
        w.u16(UInt16(keyslots.count)); w.u16(reserved70)
        for slot in keyslots { try slot.encode(into: &w) }
        w.u32(UInt32(rekeyRecord.count)); w.raw(rekeyRecord)
        let total = w.count + VolumeHeader.macLength + VolumeHeader.checksumLength
        guard total <= VolumeHeader.maxLength else { throw .invalid("header too large (\(total) bytes)") }
        w.patchU32(at: 12, UInt32(total))
        return w.bytes
    }

    /// Serialises with the MAC already stored in `mac`, appending the checksum.
    public func encode() throws(FormatError) -> [UInt8] {
        var bytes = try authenticatedBytes()
        guard mac.count == VolumeHeader.macLength else { throw .invalid("MAC length") }
        bytes += mac
        bytes += SHA256.hash(bytes)
        return bytes
    }

    /// Parses and checks structure and checksum. The MAC can be checked only with the key
    /// (`authenticatedBytes()` and `mac` are what the caller needs for that).
    public static func decode(_ bytes: [UInt8]) throws(FormatError) -> VolumeHeader {
        guard bytes.count >= 8 else { throw .truncated("header magic") }
        guard Array(bytes[0..<8]) == magic else { throw .badMagic("volume header") }
        var r = ByteReader(bytes, offset: 8)
        let version = try r.u16("version")
        guard version == currentVersion else {
            // A version this build does not know, or a damaged one: only a header whose
            // checksum (where v1 keeps it) still matches can be from a newer xtsfs.
            if bytes.count >= 8 + checksumLength,
               !constantTimeEqual(SHA256.hash(Array(bytes[0..<(bytes.count - checksumLength)])), Array(bytes[(bytes.count - checksumLength)...])) {
                throw .checksumMismatch("volume header (its version field reads \(version))")
            }
            throw .unsupportedVersion(version)
        }
        let reserved10 = try r.u16("reserved")
        let total = Int(try r.u32("total length"))
        guard total == bytes.count else {
            throw total > bytes.count ? .truncated("header is \(bytes.count) bytes, says \(total)") : .invalid("header length \(total), file has \(bytes.count) bytes")
        }
        let body = bytes.count - checksumLength
        guard body >= 0 else { throw .truncated("checksum") }
        guard constantTimeEqual(SHA256.hash(Array(bytes[0..<body])), Array(bytes[body...])) else {
            throw .checksumMismatch("volume header")
        }
        let features = Features(rawValue: try r.u64("features"))
        let unknown = features.subtracting(.known)
        guard unknown.isEmpty else { throw .unsupportedFeatures(unknown.rawValue) }
        guard !features.contains(.ghashUnitTags) || features.contains(.blockAuthentication) else {
            throw .invalid("feature ghashUnitTags (bit 3) without blockAuthentication (bit 0)")
        }
        guard !features.contains(.fileRoots) || features.contains([.blockAuthentication, .ghashUnitTags]) else {
            throw .invalid("feature fileRoots (bit 6) without blockAuthentication and ghashUnitTags (bits 0 and 3)")
        }
        guard !features.contains(.listingManifests) || features.contains(.blockAuthentication) else {
            throw .invalid("feature listingManifests (bit 5) without blockAuthentication (bit 0)")
        }
        let sequence = try r.u64("sequence")
        let volumeID = try r.raw(16, "volume ID")
        let created = try r.u64("created")
        guard let content = ContentCipher(rawValue: try r.u16("content cipher")) else { throw .invalid("content cipher") }
        guard let names = NameCipher(rawValue: try r.u16("name cipher")) else { throw .invalid("name cipher") }
        let blockSize = try r.u32("block size")
        guard blockSize == UInt32(VolumeHeader.blockSize) else { throw .invalid("block size \(blockSize)") }
        let generation = try r.u32("key generation")
        let count = Int(try r.u16("keyslot count"))
        let reserved70 = try r.u16("reserved")
        guard count <= maxKeyslots else { throw .invalid("keyslot count \(count)") }
        var slots: [Keyslot] = []
        for _ in 0..<count { slots.append(try Keyslot.decode(from: &r)) }
        guard Set(slots.map(\.index)).count == slots.count else { throw .invalid("duplicate keyslot index") }
        let rekeyLength = Int(try r.u32("rekey record length"))
        let rekey = try r.raw(rekeyLength, "rekey record")
        let mac = try r.raw(macLength, "MAC")
        guard r.offset == body else { throw .invalid("header: \(body - r.offset) unexpected bytes") }

        var h = VolumeHeader(sequence: sequence, volumeID: volumeID, created: created, keyGeneration: generation, keyslots: slots)
        h.version = version
        h.features = features
        h.contentCipher = content
        h.nameCipher = names
        h.blockSize = blockSize
        h.rekeyRecord = rekey
        h.mac = mac
        h.reserved10 = reserved10
        h.reserved70 = reserved70
        return h
    }
}
