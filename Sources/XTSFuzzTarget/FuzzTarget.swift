import XTSContent
import XTSCrypto
import XTSFormat
import XTSKeys

/// One input of the parser fuzzer (scripts/fuzz; the libFuzzer entry point is in Fuzz/,
/// built only there with -sanitize=fuzzer,address). Also replayed by the unit tests over
/// the seed corpus and every crash ever found (Tests/Fuzz/regressions), so a fixed crash
/// stays fixed without the fuzzer.
///
/// The first byte picks the parser; the rest is its input. Each parser must return or
/// throw, never trap, and what it accepts must round-trip.
public enum FuzzTarget {
    public enum Parser: UInt8, CaseIterable, Sendable {
        case volumeHeader = 0, passphraseParameters, fileHeader, dirHeader, name, base64, backingName, symlinkTarget, xattr
    }

    /// Keys fixed for the run: MACs and names the fuzzer builds from seeds stay valid.
    public static let keys: KeySet = {
        let dek = SecretBytes(copying: (0..<64).map { UInt8(truncatingIfNeeded: $0 &* 37 &+ 11) })
        return try! KeySet(dek: dek, generation: 1, volumeID: Array(repeating: 0x5A, count: 16))
    }()
    public static let directoryID: [UInt8] = Array(repeating: 0xA5, count: 16)

    /// Violations of an invariant (not thrown errors, which are fine) end the process.
    static func require(_ ok: Bool, _ what: @autoclosure () -> String) {
        if !ok { fatalError("fuzz invariant: \(what())") }
    }

    public static func run(_ input: [UInt8]) {
        guard let first = input.first, let parser = Parser(rawValue: first % UInt8(Parser.allCases.count)) else { return }
        let data = Array(input.dropFirst())
        let text = String(decoding: data, as: UTF8.self)
        switch parser {
        case .volumeHeader:
            guard let h = try? VolumeHeader.decode(data) else { return }
            // What parses re-encodes to the same bytes (the MAC covers them as stored).
            require((try? h.encode()) == data, "volume header does not round-trip")
            _ = try? Keyring.verify(h, keys: keys)
            for s in h.keyslots where s.provider == .passphrase { _ = try? PassphraseParameters.decode(s.parameters) }
        case .passphraseParameters:
            if let p = try? PassphraseParameters.decode(data) { require(p.encode() == data, "passphrase parameters do not round-trip") }
        case .fileHeader:
            if let h = try? FileHeader.decode(data, macKey: keys.metadataMACKey) {
                require((try? h.encode(macKey: keys.metadataMACKey)) == Array(data.prefix(FileHeader.length)), "file header does not round-trip")
            }
        case .dirHeader:
            if let h = try? DirHeader.decode(data, macKey: keys.metadataMACKey) {
                require((try? h.encode(macKey: keys.metadataMACKey)) == data, "directory header does not round-trip")
            }
        case .name:
            let codec = NameCodec(keys: keys)
            if let plain = try? codec.decrypt(text, directoryID: directoryID) {
                // Canonical: the plaintext encrypts back to exactly this name.
                let again = try? codec.encrypt(plain, directoryID: directoryID)
                require(again?.entryName == text || { if case .long(_, let full)? = again { return full == text }; return false }(), "name is not canonical")
            }
        case .base64:
            if let bytes = Base64URL.decode(text) { require(Base64URL.encode(bytes) == text, "base64url is not canonical") }
        case .backingName:
            _ = BackingEntry.classify(text)
            if let c = SyncConflict.parse(text) { require(BackingEntry.classify(c.original) != .foreign, "conflict original is foreign") }
        case .symlinkTarget:
            _ = try? NameCodec(keys: keys).decryptTarget(data)
        case .xattr:
            let codec = XattrCodec(keys: keys)
            _ = codec.decryptName(text)
            _ = try? codec.decryptValue(data, backingName: "user.x")
        }
    }

    /// A seed corpus: one valid input per parser, built with the fixed keys.
    public static func seeds() -> [(String, [UInt8])] {
        var out: [(String, [UInt8])] = []
        func add(_ name: String, _ p: Parser, _ bytes: [UInt8]) { out.append((name, [p.rawValue] + bytes)) }
        let params = PassphraseParameters(salt: Array(repeating: 1, count: 32), argon2: Argon2idParameters(memoryKiB: 8192, iterations: 1, parallelism: 4))
        if let wrapped = try? KeyWrap.wrap(keys.dek, kek: SecretBytes(copying: Array(repeating: 3, count: 16) + Array(repeating: 4, count: 16))) {
            var slot = Keyslot(index: 0, provider: .passphrase, wrap: .aes256KWP, keyGeneration: 1, created: 1_700_000_000,
                               parameters: params.encode(), wrappedKey: wrapped, keyDigest: keys.digest)
            slot.lastUsed = 0
            let h = VolumeHeader(sequence: 1, volumeID: Array(repeating: 0x5A, count: 16), created: 1_700_000_000, keyGeneration: 1, keyslots: [slot])
            if let sealed = try? Keyring.seal(h, keys: keys), let bytes = try? sealed.encode() { add("volume-header", .volumeHeader, bytes) }
        }
        add("passphrase-parameters", .passphraseParameters, params.encode())
        if let b = try? FileHeader(keyGeneration: 1, nonce: Array(repeating: 9, count: 16)).encode(macKey: keys.metadataMACKey) { add("file-header", .fileHeader, b) }
        if let b = try? DirHeader(keyGeneration: 1, directoryID: directoryID).encode(macKey: keys.metadataMACKey) { add("dir-header", .dirHeader, b) }
        let codec = NameCodec(keys: keys)
        if let n = try? codec.encrypt(Array("hello.txt".utf8), directoryID: directoryID) { add("name", .name, Array(n.entryName.utf8)) }
        if case .long(_, let full)? = try? codec.encrypt(Array(repeating: UInt8(ascii: "n"), count: 200), directoryID: directoryID) { add("long-name", .name, Array(full.utf8)) }
        add("base64", .base64, Array("AAECAwQFBgcICQoLDA0ODw".utf8))
        add("backing-name", .backingName, Array("xtsfs.long.AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA.name".utf8))
        add("sync-conflict", .backingName, Array("AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA.sync-conflict-20260101-010101-ABCDEFG".utf8))
        if let t = try? codec.encryptTarget(Array("/some/target".utf8)) { add("symlink-target", .symlinkTarget, Array(t.utf8)) }
        let x = XattrCodec(keys: keys)
        if let v = try? x.encryptValue(Array("blue".utf8), backingName: "user.x") { add("xattr-value", .xattr, v) }
        return out
    }
}
