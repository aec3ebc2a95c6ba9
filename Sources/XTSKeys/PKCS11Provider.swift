import CP11Kit
import XTSCrypto
import XTSFormat

/// Parameters of a PKCS#11 slot: the RFC 7512 URI of the key as given when the slot was
/// made (token and object, never a PIN): u16 length | UTF-8 bytes.
public enum PKCS11Parameters {
    public static func encode(uri: String) throws(KeyError) -> [UInt8] {
        var w = ByteWriter()
        do { try w.blob16(Array(uri.utf8)) } catch { throw .format(error) }
        return w.bytes
    }

    public static func decode(_ bytes: [UInt8]) throws(FormatError) -> String {
        var r = ByteReader(bytes)
        let uri = try r.blob16("pkcs11 URI")
        guard r.remaining == 0 else { throw .invalid("pkcs11 parameters: trailing bytes") }
        return String(decoding: uri, as: UTF8.self)
    }

    static func describe(_ bytes: [UInt8]) -> [String: String] {
        guard let uri = try? decode(bytes) else { return ["parameters": "invalid"] }
        return ["uri": uri, "wrap": "aes-256-gcm in the token"]
    }
}

/// The KEK is a non-extractable AES-256 key inside a PKCS#11 token, named by an RFC 7512
/// URI (`pkcs11:token=LABEL;object=LABEL`). The token does the wrapping: AES-GCM
/// `C_Encrypt`/`C_Decrypt` with a fresh 96-bit IV and the volume ID as additional data;
/// the slot stores IV [12] | ciphertext [64] | tag [16]. p11-kit parses the URI and loads
/// the module (the registered ones, or `module`); the token is found by its label.
///
/// Opened (C_Initialize, login) when made and closed when released: make it in the
/// process that uses it, never before a fork.
public final class PKCS11Provider: KeyProvider {
    public var type: ProviderType { .pkcs11 }
    public let uri: String
    private var ctx = xts_p11()
    public var tokenLabel: String { withUnsafeBytes(of: ctx.token_label) { String(decoding: $0.prefix { $0 != 0 }, as: UTF8.self) } }

    /// Loads the module, finds the token and the key, logs in. With `generate`, creates the
    /// key (refused if one with that label already exists).
    public init(uri: String, module: String?, pin: SecretBytes, generate: Bool = false) throws(KeyError) {
        self.uri = uri
        var rv: UInt = 0
        var r = pin.withUnsafeBytes { p in
            xts_p11_open(&ctx, uri, module, p.baseAddress?.assumingMemoryBound(to: UInt8.self), UInt(p.count), &rv)
        }
        if r == Int32(XTS_P11_OK) {
            r = generate ? xts_p11_generate(&ctx, uri, &rv) : xts_p11_find_key(&ctx, uri, &rv)
        }
        if r == Int32(XTS_P11_OK) { r = xts_p11_check_key(&ctx, &rv) }
        if r != Int32(XTS_P11_OK) {
            let e = PKCS11Provider.error(r, rv, uri: uri, module: module, token: tokenLabel)
            xts_p11_close(&ctx)
            throw e
        }
    }

    deinit { xts_p11_close(&ctx) }

    /// Logs out and finalises the module now; the provider cannot be used afterwards.
    public func release() { xts_p11_close(&ctx) }

    /// Checks what can be checked before asking for a PIN.
    public static func check(uri: String) throws(KeyError) {
        guard uri.hasPrefix("pkcs11:") else { throw error(Int32(XTS_P11_BAD_URI), 0, uri: uri, module: nil, token: "") }
        if uri.lowercased().contains("pin-value=") { throw error(Int32(XTS_P11_PIN_IN_URI), 0, uri: uri, module: nil, token: "") }
    }

    static func error(_ r: Int32, _ rv: UInt, uri: String, module: String?, token: String) -> KeyError {
        let ckr = "CKR 0x" + String(rv, radix: 16)
        switch Int(r) {
        case Int(XTS_P11_BAD_URI): return .input("not a PKCS#11 URI (RFC 7512): \(uri)")
        case Int(XTS_P11_PIN_IN_URI): return .input("the PKCS#11 URI holds a PIN (pin-value): command lines are visible to every user; give the PIN with --pin-file or at the prompt")
        case Int(XTS_P11_NO_OBJECT): return .input("the PKCS#11 URI names no key: add object=LABEL (or id=...)")
        case Int(XTS_P11_NO_MODULE): return .unavailable("cannot load the PKCS#11 module" + (module.map { " \($0)" } ?? "s registered with p11-kit") + (rv != 0 ? " (\(ckr))" : ""))
        case Int(XTS_P11_NO_TOKEN): return .unavailable("no PKCS#11 token matches \(uri) (is the token present?)")
        case Int(XTS_P11_MANY_TOKENS): return .input("several PKCS#11 tokens match \(uri): name one by token=LABEL (and serial=)")
        case Int(XTS_P11_PIN_INCORRECT): return .refused("wrong PIN for PKCS#11 token \(token)")
        case Int(XTS_P11_PIN_LOCKED): return .unavailable("the PIN of PKCS#11 token \(token) is locked")
        case Int(XTS_P11_NO_KEY): return .unavailable("token \(token) has no AES key matching \(uri)")
        case Int(XTS_P11_MANY_KEYS): return .input("token \(token) has several AES keys matching \(uri): name one by object= and id=")
        case Int(XTS_P11_KEY_EXISTS): return .input("token \(token) already has a key matching \(uri); drop --generate to use it")
        case Int(XTS_P11_EXTRACTABLE): return .input("the key \(uri) can leave token \(token) (CKA_EXTRACTABLE set or CKA_SENSITIVE unset): xtsfs uses only keys that cannot be exported")
        default: return .unavailable("PKCS#11 token \(token): operation failed (\(ckr))")
        }
    }

    public func canOpen(_ slot: Keyslot) -> Bool { slot.provider == .pkcs11 && slot.wrap == .tokenAES256GCM }

    public func unwrapDEK(from slot: Keyslot, volumeID: [UInt8]) throws(KeyError) -> SecretBytes {
        do { _ = try PKCS11Parameters.decode(slot.parameters) } catch { throw .format(error) }
        let w = slot.wrappedKey
        guard w.count == 12 + KeySet.dekLength + 16 else { throw .format(.invalid("pkcs11 wrapped key length \(w.count)")) }
        var iv = Array(w[0..<12]), aad = volumeID
        let body = Array(w[12...])
        // Some tokens (SoftHSM2) want room for the whole input, tag included.
        let plain = SecretBytes(count: body.count)
        guard ctx.module != nil else { throw .unavailable("the PKCS#11 session was already closed") }
        var rv: UInt = 0
        let r = plain.withUnsafeMutableBytes { out in
            var len = UInt(out.count)
            let r = xts_p11_gcm(&ctx, 0, &iv, &aad, UInt(aad.count), body, UInt(body.count), out.baseAddress!.assumingMemoryBound(to: UInt8.self), &len, &rv)
            return r == Int32(XTS_P11_OK) && len != UInt(KeySet.dekLength) ? Int32(XTS_P11_WRONG_KEY) : r
        }
        if r == Int32(XTS_P11_WRONG_KEY) { throw .wrongKey(provider: "pkcs11 key") }
        guard r == Int32(XTS_P11_OK) else { throw PKCS11Provider.error(r, rv, uri: uri, module: nil, token: tokenLabel) }
        return plain.slice(0..<KeySet.dekLength)
    }

    public func wrapDEK(_ dek: SecretBytes, volumeID: [UInt8]) throws(KeyError) -> WrappedKey {
        guard ctx.module != nil else { throw .unavailable("the PKCS#11 session was already closed") }
        var iv: [UInt8]
        do { iv = try Random.bytes(12) } catch { throw .crypto(error) }
        var aad = volumeID
        var out = [UInt8](repeating: 0, count: dek.count + 16)
        var len = UInt(out.count)
        var rv: UInt = 0
        let r = dek.withUnsafeBytes { d in
            xts_p11_gcm(&ctx, 1, &iv, &aad, UInt(aad.count), d.baseAddress!.assumingMemoryBound(to: UInt8.self), UInt(d.count), &out, &len, &rv)
        }
        guard r == Int32(XTS_P11_OK), len == UInt(dek.count + 16) else { throw PKCS11Provider.error(r, rv, uri: uri, module: nil, token: tokenLabel) }
        return WrappedKey(parameters: try PKCS11Parameters.encode(uri: uri), wrap: .tokenAES256GCM, wrappedKey: iv + out)
    }
}
