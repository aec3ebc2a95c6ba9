import CCrypto

/// The OpenSSL library this process runs with, as it names itself ("OpenSSL 3.0.19 27 Jan 2026"),
/// for reports such as `xtsfs benchmark`.
public enum OpenSSLVersion {
    public static var text: String { String(cString: OpenSSL_version(Int32(OPENSSL_VERSION))) }
}
