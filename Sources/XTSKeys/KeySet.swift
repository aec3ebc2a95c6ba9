import XTSCrypto
import XTSFormat

/// A data-encryption key of one generation and the subkeys derived from it.
/// Each purpose has its own HKDF label, so no key is ever used for two things.
///
/// `@unchecked Sendable`: immutable after init; the secrets are only read.
public final class KeySet: @unchecked Sendable {
    public static let dekLength = 64
    public let generation: UInt32
    public let dek: SecretBytes
    /// Master for per-file content keys (HKDF of this and the file nonce).
    public let contentKey: SecretBytes
    /// AES-256-SIV key for names and symlink targets.
    public let nameKey: SecretBytes
    /// HMAC key for per-file and per-directory headers.
    public let metadataMACKey: SecretBytes
    /// HMAC key for the volume header.
    public let headerMACKey: SecretBytes
    /// Stored in keyslots: tells a right DEK from a wrong one without touching data.
    public let digest: [UInt8]
    /// Listing manifests (FORMAT.md 12.10): the HMAC key of an entry's element, the AES-256
    /// key that seals a directory's accumulator, and the HMAC key of the manifest file.
    public let listElementKey: SecretBytes
    public let listSealKey: SecretBytes
    public let listMACKey: SecretBytes

    public enum Label {
        public static let content = "xtsfs v1 content"
        public static let names = "xtsfs v1 names"
        public static let metadataMAC = "xtsfs v1 metadata mac"
        public static let headerMAC = "xtsfs v1 header mac"
        public static let digest = "xtsfs v1 dek digest"
        public static let listElement = "xtsfs v1 listing element"
        public static let listSeal = "xtsfs v1 listing seal"
        public static let listMAC = "xtsfs v1 listing manifest mac"
    }

    public init(dek: SecretBytes, generation: UInt32, volumeID: [UInt8]) throws(CryptoError) {
        guard dek.count == KeySet.dekLength else { throw .invalidKeyLength }
        self.generation = generation
        self.dek = dek
        func derive(_ label: String, _ n: Int) throws(CryptoError) -> SecretBytes {
            try HKDF.derive(key: dek, salt: volumeID, info: Array(label.utf8), count: n)
        }
        contentKey = try derive(Label.content, 64)
        nameKey = try derive(Label.names, 64)
        metadataMACKey = try derive(Label.metadataMAC, 32)
        headerMACKey = try derive(Label.headerMAC, 32)
        digest = try derive(Label.digest, 32).withUnsafeBytes { Array($0) }
        listElementKey = try derive(Label.listElement, 32)
        listSealKey = try derive(Label.listSeal, 32)
        listMACKey = try derive(Label.listMAC, 32)
    }

    public static func generate(generation: UInt32, volumeID: [UInt8]) throws(CryptoError) -> KeySet {
        try KeySet(dek: SecretBytes.random(count: dekLength), generation: generation, volumeID: volumeID)
    }
}
