import CTLS
import XTSCrypto
import XTSFormat
#if canImport(Glibc)
import Glibc
#endif

/// KMIP 1.x TTLV (tag, type, length, value; values padded to 8 bytes), the part a key
/// client needs. Tags and enumerations from the KMIP 1.2 specification.
enum TTLV {
    enum Tag: UInt32 {
        case attribute = 0x420008, attributeName = 0x42000A, attributeValue = 0x42000B
        case batchCount = 0x42000D, batchItem = 0x42000F, blockCipherMode = 0x420011
        case cryptographicAlgorithm = 0x420028, cryptographicParameters = 0x42002B
        case ivCounterNonce = 0x42003D, objectType = 0x420057, operation = 0x42005C, paddingMethod = 0x42005F
        case protocolVersion = 0x420069, protocolVersionMajor = 0x42006A, protocolVersionMinor = 0x42006B
        case requestHeader = 0x420077, requestMessage = 0x420078, requestPayload = 0x420079
        case responseMessage = 0x42007B, responsePayload = 0x42007C
        case resultMessage = 0x42007D, resultReason = 0x42007E, resultStatus = 0x42007F
        case templateAttribute = 0x420091, uniqueIdentifier = 0x420094, data = 0x4200C2, randomIV = 0x4200C5
    }
    enum Kind: UInt8 { case structure = 1, integer = 2, long = 3, big = 4, enumeration = 5, boolean = 6, text = 7, bytes = 8, dateTime = 9, interval = 10 }

    indirect enum Item {
        case structure(UInt32, [Item])
        case integer(UInt32, Int32)
        case enumeration(UInt32, UInt32)
        case boolean(UInt32, Bool)
        case text(UInt32, String)
        case bytes(UInt32, [UInt8])
        case other(UInt32)

        var tag: UInt32 {
            switch self {
            case .structure(let t, _), .integer(let t, _), .enumeration(let t, _), .boolean(let t, _), .text(let t, _), .bytes(let t, _), .other(let t): t
            }
        }
        func first(_ tag: Tag) -> Item? {
            guard case .structure(_, let items) = self else { return nil }
            return items.first { $0.tag == tag.rawValue }
        }
        var enumValue: UInt32? { if case .enumeration(_, let v) = self { return v }; return nil }
        var textValue: String? { if case .text(_, let v) = self { return v }; return nil }
        var bytesValue: [UInt8]? { if case .bytes(_, let v) = self { return v }; return nil }
    }

    static func s(_ tag: Tag, _ items: [Item]) -> Item { .structure(tag.rawValue, items) }

    static func encode(_ item: Item) -> [UInt8] {
        func header(_ tag: UInt32, _ kind: Kind, _ length: Int) -> [UInt8] {
            [UInt8(tag >> 16 & 0xff), UInt8(tag >> 8 & 0xff), UInt8(tag & 0xff), kind.rawValue] + be32(UInt32(length))
        }
        func padded(_ v: [UInt8]) -> [UInt8] { v + [UInt8](repeating: 0, count: (8 - v.count % 8) % 8) }
        switch item {
        case .structure(let t, let items):
            let body = items.flatMap(encode)
            return header(t, .structure, body.count) + body
        case .integer(let t, let v): return header(t, .integer, 4) + be32(UInt32(bitPattern: v)) + [0, 0, 0, 0]
        case .enumeration(let t, let v): return header(t, .enumeration, 4) + be32(v) + [0, 0, 0, 0]
        case .boolean(let t, let v): return header(t, .boolean, 8) + [0, 0, 0, 0, 0, 0, 0, v ? 1 : 0]
        case .text(let t, let v): let b = Array(v.utf8); return header(t, .text, b.count) + padded(b)
        case .bytes(let t, let v): return header(t, .bytes, v.count) + padded(v)
        case .other: return []
        }
    }

    /// Parses one item; throws on anything malformed (the server is not trusted to be sane).
    static func decode(_ b: [UInt8], _ at: inout Int, depth: Int = 0) throws(KeyError) -> Item {
        guard depth < 16, at + 8 <= b.count else { throw .unavailable("malformed KMIP response") }
        let tag = UInt32(b[at]) << 16 | UInt32(b[at + 1]) << 8 | UInt32(b[at + 2])
        let kind = b[at + 3]
        let length = Int(UInt32(b[at + 4]) << 24 | UInt32(b[at + 5]) << 16 | UInt32(b[at + 6]) << 8 | UInt32(b[at + 7]))
        at += 8
        let paddedLength = kind == Kind.structure.rawValue ? length : length + (8 - length % 8) % 8
        guard length >= 0, at + paddedLength <= b.count else { throw .unavailable("malformed KMIP response") }
        let value = Array(b[at..<at + length])
        defer { at += paddedLength }
        switch Kind(rawValue: kind) {
        case .structure?:
            var items: [Item] = []
            var i = at
            while i < at + length { items.append(try decode(b, &i, depth: depth + 1)) }
            guard i == at + length else { throw .unavailable("malformed KMIP response") }
            return .structure(tag, items)
        case .integer?: return .integer(tag, Int32(bitPattern: value.count == 4 ? be32(value) : 0))
        case .enumeration?: return .enumeration(tag, value.count == 4 ? be32(value) : 0)
        case .boolean?: return .boolean(tag, value.last == 1)
        case .text?: return .text(tag, String(decoding: value, as: UTF8.self))
        case .bytes?: return .bytes(tag, value)
        default: return .other(tag)
        }
    }

    static func be32(_ v: UInt32) -> [UInt8] { [UInt8(v >> 24), UInt8(v >> 16 & 0xff), UInt8(v >> 8 & 0xff), UInt8(v & 0xff)] }
    static func be32(_ b: [UInt8]) -> UInt32 { UInt32(b[0]) << 24 | UInt32(b[1]) << 16 | UInt32(b[2]) << 8 | UInt32(b[3]) }
}

/// Parameters of a KMIP slot: server (host:port) blob16 | key unique identifier blob16, UTF-8.
public enum KMIPParameters {
    public static func encode(server: String, keyID: String) throws(KeyError) -> [UInt8] {
        var w = ByteWriter()
        do { try w.blob16(Array(server.utf8)); try w.blob16(Array(keyID.utf8)) } catch { throw .format(error) }
        return w.bytes
    }

    public static func decode(_ bytes: [UInt8]) throws(FormatError) -> (server: String, keyID: String) {
        var r = ByteReader(bytes)
        let server = try r.blob16("kmip server"), key = try r.blob16("kmip key id")
        guard r.remaining == 0 else { throw .invalid("kmip parameters: trailing bytes") }
        return (String(decoding: server, as: UTF8.self), String(decoding: key, as: UTF8.self))
    }

    static func describe(_ bytes: [UInt8]) -> [String: String] {
        guard let p = try? decode(bytes) else { return ["parameters": "invalid"] }
        return ["server": p.server, "keyID": p.keyID, "wrap": "aes-256-cbc on the server"]
    }
}

/// The KEK is an AES-256 key on a KMIP 1.x server, reached over mutual TLS (client
/// certificate, key and CA from files). The server encrypts and decrypts the DEK with
/// AES-256-CBC (PKCS#5 padding, a random IV the server chooses); the slot stores
/// IV [16] | ciphertext [80]. (PyKMIP's AES-GCM path is broken; CBC works everywhere.)
/// A wrong key fails the padding check or the DEK digest; a revoked or destroyed key
/// is refused by the server with its own message.
///
/// Known limit: the DEK crosses this client inside TTLV byte arrays (the Encrypt request,
/// the Decrypt answer), ordinary heap memory that is wiped where we hold it but not
/// locked, and copied by the encoder; the PKCS#11 and local providers never let it out
/// of `SecretBytes`.
public final class KMIPProvider: KeyProvider {
    public struct Connection: Sendable {
        public var host: String
        public var port: String
        public var certificate: String
        public var key: String
        public var ca: String
        public var timeoutMilliseconds: Int32

        public init(server: String, certificate: String, key: String, ca: String, timeoutMilliseconds: Int32 = 10_000) throws(KeyError) {
            guard let colon = server.lastIndex(of: ":"), !server[..<colon].isEmpty, let p = UInt16(server[server.index(after: colon)...]), p > 0 else {
                throw .input("--kmip wants HOST:PORT, not \(server)")
            }
            var h = String(server[..<colon])
            if h.hasPrefix("[") && h.hasSuffix("]") { h = String(h.dropFirst().dropLast()) }
            host = h
            port = String(p)
            for (what, path) in [("client certificate", certificate), ("client key", key), ("CA certificate", ca)] where access(path, R_OK) != 0 {
                throw .input("cannot read the KMIP \(what) \(path): \(String(cString: strerror(errno)))")
            }
            self.certificate = certificate
            self.key = key
            self.ca = ca
            self.timeoutMilliseconds = timeoutMilliseconds
        }
        public var server: String { host.contains(":") ? "[\(host)]:\(port)" : "\(host):\(port)" }
    }

    public var type: ProviderType { .kmip }
    public let connection: Connection
    public private(set) var keyID: String

    /// With `keyID` nil, creates and activates a new AES-256 key on the server.
    public init(connection: Connection, keyID: String?) throws(KeyError) {
        self.connection = connection
        self.keyID = keyID ?? ""
        if keyID == nil {
            let attrs: [TTLV.Item] = [
                attribute("Cryptographic Algorithm", .enumeration(TTLV.Tag.attributeValue.rawValue, 3)),
                attribute("Cryptographic Length", .integer(TTLV.Tag.attributeValue.rawValue, 256)),
                attribute("Cryptographic Usage Mask", .integer(TTLV.Tag.attributeValue.rawValue, 0x04 | 0x08)),
            ]
            let created = try call(operation: 1, [
                .enumeration(TTLV.Tag.objectType.rawValue, 2),
                TTLV.s(.templateAttribute, attrs),
            ])
            guard let id = created.first(.uniqueIdentifier)?.textValue else { throw .unavailable("the KMIP server created no key ID") }
            self.keyID = id
            _ = try call(operation: 0x12, [.text(TTLV.Tag.uniqueIdentifier.rawValue, id)])
        }
    }

    func attribute(_ name: String, _ value: TTLV.Item) -> TTLV.Item {
        TTLV.s(.attribute, [.text(TTLV.Tag.attributeName.rawValue, name), value])
    }

    public func canOpen(_ slot: Keyslot) -> Bool {
        guard slot.provider == .kmip, slot.wrap == .serverAES256CBC, let p = try? KMIPParameters.decode(slot.parameters) else { return false }
        return p.keyID == keyID
    }

    var cbc: TTLV.Item {
        TTLV.s(.cryptographicParameters, [
            .enumeration(TTLV.Tag.blockCipherMode.rawValue, 1),
            .enumeration(TTLV.Tag.paddingMethod.rawValue, 3),
            .enumeration(TTLV.Tag.cryptographicAlgorithm.rawValue, 3),
        ])
    }

    public func wrapDEK(_ dek: SecretBytes, volumeID: [UInt8]) throws(KeyError) -> WrappedKey {
        var params = cbc
        if case .structure(let t, var items) = params { items.append(.boolean(TTLV.Tag.randomIV.rawValue, true)); params = .structure(t, items) }
        // The DEK crosses the TLS connection in the request; the request buffer is wiped after.
        var data = dek.withUnsafeBytes { Array($0) }
        defer { for i in data.indices { data[i] = 0 } }
        let r = try call(operation: 0x1F, [.text(TTLV.Tag.uniqueIdentifier.rawValue, keyID), params, .bytes(TTLV.Tag.data.rawValue, data)])
        guard let ct = r.first(.data)?.bytesValue, let iv = r.first(.ivCounterNonce)?.bytesValue, iv.count == 16, ct.count == 80 else {
            throw .unavailable("the KMIP server's Encrypt answer is not AES-CBC of a 64-byte key")
        }
        return WrappedKey(parameters: try KMIPParameters.encode(server: connection.server, keyID: keyID), wrap: .serverAES256CBC, wrappedKey: iv + ct)
    }

    public func unwrapDEK(from slot: Keyslot, volumeID: [UInt8]) throws(KeyError) -> SecretBytes {
        let w = slot.wrappedKey
        guard w.count == 96 else { throw .format(.invalid("kmip wrapped key length \(w.count)")) }
        let r: TTLV.Item
        do {
            r = try call(operation: 0x20, [.text(TTLV.Tag.uniqueIdentifier.rawValue, keyID), cbc,
                                           .bytes(TTLV.Tag.data.rawValue, Array(w[16...])), .bytes(TTLV.Tag.ivCounterNonce.rawValue, Array(w[0..<16]))])
        } catch {
            // Cryptographic Failure: the padding did not check out under this key.
            if case .refused(let m) = error, m.contains("reason 10") { throw .wrongKey(provider: "kmip key") }
            throw error
        }
        guard var plain = r.first(.data)?.bytesValue, plain.count == KeySet.dekLength else { throw .wrongKey(provider: "kmip key") }
        defer { for i in plain.indices { plain[i] = 0 } }
        return SecretBytes(copying: plain)
    }

    /// One request with one batch item; returns the response payload. A failed result is
    /// `.unavailable` with the server's reason (a revoked or destroyed key says so), or
    /// `.refused` with "reason N" for the caller to tell a wrong key.
    func call(operation: UInt32, _ payload: [TTLV.Item]) throws(KeyError) -> TTLV.Item {
        let request = TTLV.s(.requestMessage, [
            TTLV.s(.requestHeader, [
                TTLV.s(.protocolVersion, [.integer(TTLV.Tag.protocolVersionMajor.rawValue, 1), .integer(TTLV.Tag.protocolVersionMinor.rawValue, 2)]),
                .integer(TTLV.Tag.batchCount.rawValue, 1),
            ]),
            TTLV.s(.batchItem, [.enumeration(TTLV.Tag.operation.rawValue, operation), TTLV.s(.requestPayload, payload)]),
        ])
        var bytes = TTLV.encode(request)
        defer { for i in bytes.indices { bytes[i] = 0 } }
        var t = xts_tls()
        var err = [CChar](repeating: 0, count: 512)
        let c = connection
        let rc = xts_tls_connect(&t, c.host, c.port, c.ca, c.certificate, c.key, c.timeoutMilliseconds, &err, err.count)
        defer { xts_tls_close(&t) }
        guard rc == Int32(XTS_TLS_OK) else {
            let msg = String(decoding: err.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
            if rc == Int32(XTS_TLS_SETUP) { throw .input(msg) }
            throw .unavailable(msg + (rc == Int32(XTS_TLS_TIMEOUT) ? " (no answer within \(c.timeoutMilliseconds / 1000) s)" : ""))
        }
        guard xts_tls_write(&t, bytes, Int32(bytes.count)) == 0 else { throw .unavailable("the KMIP server \(c.server) closed the connection") }
        var head = [UInt8](repeating: 0, count: 8)
        guard xts_tls_read(&t, &head, 8) == 0 else { throw .unavailable("no answer from the KMIP server \(c.server) within \(c.timeoutMilliseconds / 1000) s") }
        let length = Int(TTLV.be32(Array(head[4..<8])))
        guard head[3] == TTLV.Kind.structure.rawValue, length <= 1 << 20 else { throw .unavailable("malformed KMIP response") }
        var body = [UInt8](repeating: 0, count: length)
        guard length == 0 || xts_tls_read(&t, &body, Int32(length)) == 0 else { throw .unavailable("the KMIP server \(c.server) closed the connection") }
        var at = 0
        let response = try TTLV.decode(head + body, &at)
        guard response.tag == TTLV.Tag.responseMessage.rawValue, let item = response.first(.batchItem) else { throw .unavailable("malformed KMIP response") }
        let status = item.first(.resultStatus)?.enumValue ?? 1
        guard status == 0 else {
            let reason = item.first(.resultReason)?.enumValue ?? 0
            let message = item.first(.resultMessage)?.textValue ?? "no message"
            if operation == 0x20 && reason == 10 { throw .refused("reason 10") }
            let key = keyID.isEmpty ? "" : " key \(keyID)"
            switch reason {
            case 1: throw .unavailable("the KMIP server has no\(key) (destroyed?): \(message)")
            case 12 where operation == 0x1F || operation == 0x20:
                throw .unavailable("the KMIP server refuses to use\(key): it is revoked, destroyed or not active (\(message))")
            default: throw .unavailable("the KMIP server refused (\(key.isEmpty ? "" : key.dropFirst() + ", ")reason \(reason)): \(message)")
            }
        }
        return item.first(.responsePayload) ?? .structure(TTLV.Tag.responsePayload.rawValue, [])
    }
}
