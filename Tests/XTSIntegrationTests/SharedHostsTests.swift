import Foundation
import XCTest
import XTSCrypto
import XTSFormat
import XTSKeys
import XTSSystem
@testable import XTSVolume
#if canImport(Glibc)
import Glibc
#endif

/// Several hosts on one CIPHERDIR (issue 19): header changes that never lose another
/// host's change.
final class SharedHostsTests: VolumeTestCase {
    var provider: PassphraseProvider { PassphraseProvider(passphrase: SecretBytes(copying: Array(Self.passphrase.utf8))) }

    /// Host A reads the header, host B adds a keyslot, then A writes its change made to
    /// what it read: refused with a clear error, and B's slot is still there.
    func testHeaderChangeMadeToAnOutdatedHeaderIsRefused() throws {
        initVolume()
        let a = try Volume.unlock(cipher, provider: provider, audit: nil, operation: "test")
        let keyfile = scratch + "/key"
        try KeySlots.generateKeyfile(keyfile)
        let added = try KeySlots.add(cipherDir: cipher, provider: provider, newProvider: KeyfileProvider(contents: SecretBytes(copying: Array(try Sys.readFile(keyfile)))), audit: nil)
        var changed = a.header
        changed.keyslots.removeAll { $0.index != a.slot }
        XCTAssertThrowsError(try KeySlots.write(cipher, changed, keys: a.keys, base: a.newestSequence)) { error in
            guard case .refused(let why) = error as? VolumeError else { return XCTFail("\(error)") }
            XCTAssertTrue(why.contains("changed while this command ran"), why)
        }
        let now = try Volume.load(cipher)
        XCTAssertTrue(now.newest.keyslots.contains { $0.index == added }, "the other host's slot is kept")
        XCTAssertEqual(Set(now.candidates.map(\.header.sequence)).count, 1)
        // Made to the current header, the same change goes through.
        let b = try Volume.unlock(cipher, provider: provider, audit: nil, operation: "test")
        try KeySlots.remove(cipherDir: cipher, index: added, provider: provider, force: false, audit: nil)
        XCTAssertEqual(try Volume.load(cipher).newest.sequence, b.newestSequence + 1)
        XCTAssertFalse(try FileManager.default.contentsOfDirectory(atPath: cipher).contains { $0.contains(".tmp") })
    }
}
