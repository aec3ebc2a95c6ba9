import XTSFormat

/// Rewrapping a slot's DEK (a DEK rekey's final header): the same secret and, for a
/// passphrase or command slot, the slot's own Argon2id costs with a fresh salt, so the
/// rewrapped slot costs what the user chose when making it, not the defaults.
public enum Rewrap {
    public static func provider(_ p: any KeyProvider, like slot: Keyslot) -> any KeyProvider {
        guard let params = try? PassphraseParameters.decode(slot.parameters) else { return p }
        if let pp = p as? PassphraseProvider { return PassphraseProvider(passphrase: pp.passphrase, costs: params.argon2, kind: pp.type) }
        if let cp = p as? CommandProvider { return PassphraseProvider(passphrase: cp.inner.passphrase, costs: params.argon2, kind: .command) }
        return p
    }
}
