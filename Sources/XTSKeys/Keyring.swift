import XTSCrypto
import XTSFormat

/// Keyslot operations on a volume header: create the first slot, open a slot,
/// seal (MAC) and verify a header.
public enum Keyring {
    /// Wraps `keys.dek` under a new KEK from `provider` into a new slot.
    public static func makeSlot(index: UInt16, keys: KeySet, provider: some KeyProvider, now: UInt64) throws(KeyError) -> Keyslot {
        let (kek, params) = try provider.newKey()
        let wrapped: [UInt8]
        do { wrapped = try KeyWrap.wrap(keys.dek, kek: kek) } catch { throw .crypto(error) }
        return Keyslot(index: index, provider: provider.type, wrap: .aes256KWP, keyGeneration: keys.generation,
                       created: now, parameters: params, wrappedKey: wrapped, keyDigest: keys.digest)
    }

    /// Tries every slot of the provider's type (newest generation first); returns the keys
    /// and the slot that opened. A wrong key is told apart from damage by the key wrap's
    /// integrity check and then the DEK digest, never by decrypting data.
    public static func unlock(_ header: VolumeHeader, with provider: some KeyProvider, slot wanted: UInt16? = nil) throws(KeyError) -> (KeySet, Keyslot) {
        let slots = header.keyslots
            .filter { $0.provider == provider.type && (wanted == nil || $0.index == wanted) }
            .sorted { ($0.keyGeneration, $1.index) > ($1.keyGeneration, $0.index) }
        guard !slots.isEmpty else { throw .noSlot(provider: provider.type.description) }
        var lastFormatError: FormatError?
        for slot in slots {
            guard slot.wrap == .aes256KWP else { continue }
            let kek: SecretBytes
            do { kek = try provider.unwrapKey(for: slot) } catch {
                if case .format(let f) = error { lastFormatError = f; continue }
                throw error
            }
            let dek: SecretBytes
            do { dek = try KeyWrap.unwrap(slot.wrappedKey, kek: kek) } catch {
                if error == .authenticationFailed { continue }
                throw .crypto(error)
            }
            let keys: KeySet
            do { keys = try KeySet(dek: dek, generation: slot.keyGeneration, volumeID: header.volumeID) } catch { continue }
            guard constantTimeEqual(keys.digest, slot.keyDigest) else { continue }
            return (keys, slot)
        }
        if let f = lastFormatError, slots.count == 1 { throw .format(f) }
        throw .wrongKey(provider: provider.type.description)
    }

    public static func mac(_ header: VolumeHeader, keys: KeySet) throws(KeyError) -> [UInt8] {
        do { return try HMACSHA256.mac(key: keys.headerMACKey, data: try header.authenticatedBytes()) }
        catch let e as FormatError { throw .format(e) }
        catch let e as CryptoError { throw .crypto(e) }
        catch { throw .input("\(error)") }
    }

    public static func seal(_ header: VolumeHeader, keys: KeySet) throws(KeyError) -> VolumeHeader {
        var h = header
        h.mac = try mac(h, keys: keys)
        return h
    }

    public static func verify(_ header: VolumeHeader, keys: KeySet) throws(KeyError) {
        guard constantTimeEqual(try mac(header, keys: keys), header.mac) else { throw .headerTampered }
    }
}
