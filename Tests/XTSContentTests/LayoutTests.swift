import XCTest
@testable import XTSContent

final class LayoutTests: XCTestCase {
    func testSizes() {
        XCTAssertEqual(Layout.backingSize(plainSize: 0), 0)
        XCTAssertEqual(Layout.backingSize(plainSize: 1), 33)
        XCTAssertEqual(Layout.backingSize(plainSize: 4096), 4128)
        XCTAssertEqual(Layout.plainSize(backingSize: 0), 0)
        XCTAssertEqual(Layout.plainSize(backingSize: 33), 1)
        XCTAssertTrue(Layout.isDamagedSize(backingSize: 31))
        XCTAssertFalse(Layout.isDamagedSize(backingSize: 0))
    }

    func testUnitsCoverEveryByteOnceAndAreXTSSized() {
        for size: Int64 in [1, 15, 16, 17, 4095, 4096, 4097, 4111, 4112, 8191, 8192, 8193, 8207, 12288 + 3, 1 << 20] {
            let units = Layout.units(overlapping: 0..<size, size: size)
            var next: Int64 = 0
            for u in units {
                XCTAssertEqual(u.start, next, "size \(size): \(units)")
                XCTAssertEqual(u.index, UInt64(u.start / 4096))
                if u.tiny { XCTAssertLessThan(size, 16) } else {
                    XCTAssertGreaterThanOrEqual(u.length, 16, "size \(size)")
                    XCTAssertLessThanOrEqual(u.length, 4096 + 15)
                }
                next = u.end
            }
            XCTAssertEqual(next, size)
        }
    }

    func testShortTailJoinsPreviousBlock() {
        let u = Layout.unit(at: 4096, size: 4100)
        XCTAssertEqual(u, Layout.Unit(index: 0, start: 0, end: 4100, tiny: false))
        XCTAssertEqual(Layout.unit(at: 4096, size: 4112).start, 4096)
        XCTAssertEqual(Layout.unit(at: 0, size: 10).tiny, true)
    }

    func testRewriteRanges() {
        // Plain overwrite inside the file: just the touched units.
        XCTAssertEqual(Layout.rewriteRanges(oldSize: 10000, newSize: 10000, written: 5000..<5001), [4096..<8192])
        // Growing with a gap: the old last unit, a hole, the written unit.
        XCTAssertEqual(Layout.rewriteRanges(oldSize: 100, newSize: 20000, written: 19000..<20000), [0..<4096, 16384..<20000])
        // Shrinking to a 1-byte tail: the last unit is now 4097 bytes.
        XCTAssertEqual(Layout.rewriteRanges(oldSize: 9000, newSize: 4097, written: nil), [0..<4097])
        // Tiny result: the whole file.
        XCTAssertEqual(Layout.rewriteRanges(oldSize: 3, newSize: 5, written: 4..<5), [0..<5])
        XCTAssertEqual(Layout.rewriteRanges(oldSize: 0, newSize: 0, written: nil), [])
    }
}
