import XCTest
import XTSCrypto
import XTSFormat
import XTSKeys
@testable import XTSContent

/// The per-thread XTS context holds no key schedule once a request is done: it lives in
/// ordinary heap (neither locked nor kept out of core dumps). The mounted counterpart,
/// a scan of the live daemon's memory, is in AreaTests.
final class KeyScheduleScrubTests: XCTestCase {
    func testThreadContextHoldsNoKeyAfterCrypting() throws {
        let keys = try KeySet.generate(generation: 1, volumeID: Array(repeating: 9, count: 16))
        let crypto = try FileCrypto(keys: keys, header: try FileHeader.random(keyGeneration: 1))
        var data = [UInt8](repeating: 0x41, count: 8192)
        let units = Layout.units(overlapping: 0..<Int64(data.count), size: Int64(data.count))
        try data.withUnsafeMutableBytes { try crypto.crypt(units: units, buffer: $0, base: 0, encrypt: true) }
        XCTAssertNotEqual(data, [UInt8](repeating: 0x41, count: 8192))
        XCTAssertFalse(try XTSContext.forCurrentThread().holdsKey, "the key schedule must not outlive the request")
        try data.withUnsafeMutableBytes { try crypto.crypt(units: units, buffer: $0, base: 0, encrypt: false) }
        XCTAssertEqual(data, [UInt8](repeating: 0x41, count: 8192), "a scrubbed context is keyed anew for the next request")
        XCTAssertFalse(try XTSContext.forCurrentThread().holdsKey)
    }
}
