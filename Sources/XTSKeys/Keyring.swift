import XTSCrypto
import XTSFormat

/// Keyslot operations on a volume header: create the first slot, open a slot,
/// seal (MAC) and verify a header.
public enum Keyring {
    /// Wraps `keys.dek` with `provider` into a new slot.
    public static func makeSlot(index: UInt16, keys: KeySet, volumeID: [UInt8], provider: some KeyProvider, now: UInt64) throws(KeyError) -> Keyslot {
        let w = try provider.wrapDEK(keys.dek, volumeID: volumeID)
        return Keyslot(index: index, provider: provider.type, wrap: w.wrap, keyGeneration: keys.generation,
                       created: now, parameters: w.parameters, wrappedKey: w.wrappedKey, keyDigest: keys.digest)
    }

    /// Tries every slot the provider can own (newest generation first, then lowest index;
    /// only `wanted` if given); returns the keys and the slot that opened. A wrong key is
    /// told apart from damage by the provider's unwrap (key wrap integrity, GCM tag) and
    /// then the DEK digest, never by decrypting data. Slots of other providers are never
    /// touched: no provider's KDF runs for another's slot.
    public static func unlock(_ header: VolumeHeader, with provider: some KeyProvider, slot wanted: UInt16? = nil) throws(KeyError) -> (KeySet, Keyslot) {
        let slots = header.keyslots
            .filter { provider.canOpen($0) && (wanted == nil || $0.index == wanted) }
            .sorted { ($0.keyGeneration, $1.index) > ($1.keyGeneration, $0.index) }
        guard !slots.isEmpty else {
            if let wanted, let s = header.keyslots.first(where: { $0.index == wanted }) {
                throw .input("keyslot \(wanted) is a \(s.provider?.description ?? "unknown") slot, not a \(provider.type) slot")
            }
            throw .noSlot(provider: provider.type.description + (wanted.map { " keyslot \($0)" } ?? ""))
        }
        var lastFormatError: FormatError?
        var refusal: KeyError?
        for slot in slots {
            let dek: SecretBytes
            do { dek = try provider.unwrapDEK(from: slot, volumeID: header.volumeID) } catch {
                switch error {
                case .format(let f): lastFormatError = f; continue
                case .wrongKey: continue
                case .refused: refusal = error; continue
                default: throw error
                }
            }
            let keys: KeySet
            do { keys = try KeySet(dek: dek, generation: slot.keyGeneration, volumeID: header.volumeID) } catch { continue }
            guard constantTimeEqual(keys.digest, slot.keyDigest) else { continue }
            return (keys, slot)
        }
        if let f = lastFormatError, slots.count == 1 { throw .format(f) }
        if let refusal { throw refusal }
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
