import Foundation
import XCTest
import XTSCrypto
import XTSSystem

final class LockedMemoryTests: XCTestCase {
    func lockedKiB() -> Int {
        let status = (try? String(contentsOfFile: "/proc/self/status", encoding: .utf8)) ?? ""
        let line = status.split(separator: "\n").first { $0.hasPrefix("VmLck:") } ?? ""
        return Int(line.split(separator: " ").dropFirst().first ?? "0") ?? 0
    }

    func testManySmallSecretsShareLockedArenasAndStayIntact() throws {
        let before = lockedKiB()
        var keys: [SecretBytes] = []
        for i in 0..<3000 {
            let k = SecretBytes(count: 64)
            k.withUnsafeMutableBytes { for j in 0..<64 { $0[j] = UInt8(truncatingIfNeeded: i &* 7 &+ j) } }
            keys.append(k)
        }
        for (i, k) in keys.enumerated() {
            k.withUnsafeBytes { p in XCTAssertTrue((0..<64).allSatisfy { p[$0] == UInt8(truncatingIfNeeded: i &* 7 &+ $0) }, "key \(i) overwritten") }
        }
        if !LockedBuffer.lockFailed {
            // A page per key would lock 12000 KiB; shared 128-byte slots need under 500 KiB.
            XCTAssertLessThan(lockedKiB() - before, 1024, "small secrets should share locked arenas")
        }
        keys.removeAll()
        // Freed slots come back zeroed.
        for _ in 0..<3000 {
            let k = SecretBytes(count: 64)
            k.withUnsafeBytes { XCTAssertTrue($0.allSatisfy { $0 == 0 }) }
        }
    }

    func testLargeSecretsGetTheirOwnPages() {
        let big = SecretBytes(count: 5000)
        big.withUnsafeMutableBytes { _ = $0.initializeMemory(as: UInt8.self, repeating: 0xa5) }
        big.withUnsafeBytes { XCTAssertTrue($0.allSatisfy { $0 == 0xa5 }) }
        XCTAssertEqual(big.description, "<secret 5000 bytes>")
    }
}
