import Foundation
import XCTest
import XTSFuzzTarget

/// Replays the fuzzer's seed corpus and every input that ever crashed it
/// (FuzzCorpus/regressions, copied there from scripts/fuzz's crash-* files) through the
/// same entry point the fuzzer uses: a crash fixed once stays fixed, fuzzer or not.
final class FuzzRegressionTests: XCTestCase {
    func testSeedsAndRegressionsRunClean() throws {
        guard let base = Bundle.module.url(forResource: "FuzzCorpus", withExtension: nil) else { return XCTFail("no FuzzCorpus") }
        var count = 0
        for sub in ["seeds", "regressions"] {
            let dir = base.appendingPathComponent(sub)
            for name in (try? FileManager.default.contentsOfDirectory(atPath: dir.path)) ?? [] where !name.hasPrefix(".") {
                FuzzTarget.run([UInt8](try Data(contentsOf: dir.appendingPathComponent(name))))
                count += 1
            }
        }
        XCTAssertGreaterThanOrEqual(count, 10)
        for (_, bytes) in FuzzTarget.seeds() { FuzzTarget.run(bytes) }
    }

    /// Every parser, fed truncations and single-byte changes of its seed.
    func testSeedMutationsRunClean() {
        for (_, seed) in FuzzTarget.seeds() {
            for cut in stride(from: 0, through: seed.count, by: max(1, seed.count / 40)) { FuzzTarget.run(Array(seed.prefix(cut))) }
            for i in stride(from: 1, to: seed.count, by: max(1, seed.count / 60)) {
                var b = seed
                b[i] ^= 0x41
                FuzzTarget.run(b)
            }
        }
    }
}
