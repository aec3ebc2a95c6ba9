import Foundation
import XCTest
import XTSCrypto
import XTSFormat
@testable import XTSKeys

final class KeyringTests: XCTestCase {
    let cheap = Argon2idParameters(memoryKiB: 64, iterations: 1, parallelism: 1)

    func provider(_ s: String) -> PassphraseProvider {
        PassphraseProvider(passphrase: SecretBytes(copying: Array(s.utf8)), costs: cheap)
    }

    func makeHeader() throws -> (VolumeHeader, KeySet) {
        let id = try Random.bytes(16)
        let keys = try KeySet.generate(generation: 1, volumeID: id)
        let slot = try Keyring.makeSlot(index: 0, keys: keys, volumeID: id, provider: provider("right"), now: 1)
        let h = try Keyring.seal(VolumeHeader(sequence: 1, volumeID: id, created: 1, keyGeneration: 1, keyslots: [slot]), keys: keys)
        return (h, keys)
    }

    func testRightAndWrongPassphrase() throws {
        let (h, keys) = try makeHeader()
        let (opened, slot) = try Keyring.unlock(h, with: provider("right"))
        XCTAssertTrue(opened.dek.constantTimeEquals(keys.dek))
        XCTAssertEqual(slot.index, 0)
        XCTAssertNoThrow(try Keyring.verify(h, keys: opened))
        XCTAssertThrowsError(try Keyring.unlock(h, with: provider("wrong"))) {
            guard case .wrongKey = $0 as? KeyError else { return XCTFail("\($0)") }
        }
    }

    func testTamperedHeaderFailsMAC() throws {
        var (h, keys) = try makeHeader()
        h.created += 1
        XCTAssertThrowsError(try Keyring.verify(h, keys: keys)) {
            guard case .headerTampered = $0 as? KeyError else { return XCTFail("\($0)") }
        }
    }

    func testSwappedWrappedKeyIsRejectedByDigest() throws {
        let (h, _) = try makeHeader()
        // A slot wrapping some other DEK under the same KEK: the unwrap succeeds, the digest does not match.
        let other = try KeySet.generate(generation: 1, volumeID: h.volumeID)
        let forged = try Keyring.makeSlot(index: 0, keys: other, volumeID: h.volumeID, provider: provider("right"), now: 1)
        var h2 = h
        h2.keyslots[0].wrappedKey = forged.wrappedKey
        h2.keyslots[0].parameters = forged.parameters
        XCTAssertThrowsError(try Keyring.unlock(h2, with: provider("right")))
    }

    func testEachProviderTriesOnlyItsOwnSlots() throws {
        var (h, keys) = try makeHeader()
        let kf = try KeyfileProvider(contents: SecretBytes.random(count: 64))
        h.keyslots.append(try Keyring.makeSlot(index: 1, keys: keys, volumeID: h.volumeID, provider: kf, now: 1))
        // A passphrase slot whose parameters no KDF would accept: a key file never looks at it.
        h.keyslots[0].parameters = Array(repeating: 0xff, count: 44)
        let (opened, slot) = try Keyring.unlock(h, with: kf)
        XCTAssertTrue(opened.dek.constantTimeEquals(keys.dek))
        XCTAssertEqual(slot.index, 1)
        XCTAssertThrowsError(try Keyring.unlock(h, with: kf, slot: 0)) {
            guard case .input = $0 as? KeyError else { return XCTFail("\($0)") }
        }
    }

    func testArgon2Bounds() throws {
        XCTAssertNoThrow(try Argon2Bounds.check(PassphraseProvider.defaultCosts))
        XCTAssertNoThrow(try Argon2Bounds.check(.init(memoryKiB: 1024 * 1024, iterations: 32, parallelism: 4)))
        XCTAssertThrowsError(try Argon2Bounds.check(.init(memoryKiB: 1024 * 1024, iterations: 33, parallelism: 4)))
        XCTAssertThrowsError(try Argon2Bounds.check(.init(memoryKiB: 4 * 1024 * 1024, iterations: 1_000_000, parallelism: 16)))
        XCTAssertThrowsError(try Argon2Bounds.check(.init(memoryKiB: 64, iterations: 1, parallelism: 17)))
    }

    func testRecoveryKeyNormalisation() throws {
        let (p, printed) = try RecoveryKeyProvider.generate()
        let text = printed.withUnsafeBytes { String(decoding: $0, as: UTF8.self) }
        XCTAssertEqual(text.split(separator: "-").count, 8)
        let typed = try RecoveryKeyProvider(typed: SecretBytes(copying: Array(text.lowercased().replacingOccurrences(of: "-", with: " ").utf8)))
        let salt = Array(repeating: UInt8(1), count: 32)
        XCTAssertTrue(try p.kek(parameters: salt).constantTimeEquals(try typed.kek(parameters: salt)))
        XCTAssertThrowsError(try RecoveryKeyProvider(typed: SecretBytes(copying: Array("UUUU".utf8))))
    }

    func testSubkeysAreDistinctAndDeterministic() throws {
        let dek = try SecretBytes.random(count: 64)
        let id = Array(repeating: UInt8(3), count: 16)
        let a = try KeySet(dek: dek, generation: 1, volumeID: id)
        let b = try KeySet(dek: dek, generation: 1, volumeID: id)
        XCTAssertTrue(a.contentKey.constantTimeEquals(b.contentKey))
        XCTAssertEqual(a.digest, b.digest)
        let all = [a.contentKey, a.nameKey, a.metadataMACKey, a.headerMACKey].map { $0.withUnsafeBytes { Array($0.prefix(32)) } }
        XCTAssertEqual(Set(all).count, 4)
        XCTAssertFalse(a.dek.description.contains("0"), "secrets never print their bytes")
    }

    func testPassphraseParameterBounds() {
        var p = PassphraseParameters(salt: Array(repeating: 1, count: 32), argon2: Argon2idParameters(memoryKiB: 8, iterations: 1, parallelism: 1))
        XCTAssertNoThrow(try PassphraseParameters.decode(p.encode()))
        p.argon2.memoryKiB = 64 * 1024 * 1024
        XCTAssertThrowsError(try PassphraseParameters.decode(p.encode()))
        p.argon2 = Argon2idParameters(memoryKiB: 8, iterations: 0, parallelism: 1)
        XCTAssertThrowsError(try PassphraseParameters.decode(p.encode()))
        XCTAssertThrowsError(try PassphraseParameters.decode([1, 2, 3]))
    }
}
