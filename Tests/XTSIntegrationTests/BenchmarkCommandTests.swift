import Foundation
import XCTest
import XTSVolume

/// `xtsfs benchmark`: the report's shape and that every figure was measured (positive).
/// No speed is asserted: the machine's load decides the numbers.
final class BenchmarkCommandTests: XCTestCase {
    func testJSONReportHasEveryRowAndOnlyPositiveFigures() throws {
        let r = Harness.run(["benchmark", "--json", "--time", "0.05",
                             "--pbkdf-memory", "8192", "--pbkdf-force-iterations", "1", "--pbkdf-parallel", "1", "--iter-time", "250"])
        XCTAssertEqual(r.status, 0, r.stderr)
        XCTAssertEqual(r.stderr, "", "--json writes no progress")
        let obj = try XCTUnwrap(try JSONSerialization.jsonObject(with: Data(r.stdout.utf8)) as? [String: Any], r.stdout)
        XCTAssertEqual(Set(obj.keys), ["machine", "seconds_per_figure", "content", "names", "integrity_tags", "argon2id"])
        XCTAssertEqual(obj["seconds_per_figure"] as? Double, 0.05)

        let machine = try XCTUnwrap(obj["machine"] as? [String: Any])
        let cores = try XCTUnwrap(machine["cores"] as? Int)
        XCTAssertGreaterThanOrEqual(cores, 1)
        XCTAssertFalse((machine["kernel"] as? String ?? "").isEmpty)
        XCTAssertTrue((machine["openssl"] as? String ?? "").hasPrefix("OpenSSL"), "\(machine)")
        let threadCounts = cores > 1 ? [1, cores] : [1]

        func rows(_ key: String) throws -> [[String: Any]] { try XCTUnwrap(obj[key] as? [[String: Any]], key) }
        func positive(_ row: [String: Any], _ keys: [String], file: StaticString = #filePath, line: UInt = #line) {
            for k in keys {
                let v = (row[k] as? NSNumber)?.doubleValue ?? -1
                XCTAssertTrue(v > 0 && v.isFinite, "\(k) = \(row[k] ?? "missing") in \(row)", file: file, line: line)
            }
        }

        // AES-256-XTS: 4 KiB and 1 MiB requests, one thread and all cores.
        let content = try rows("content")
        XCTAssertEqual(content.map { "\($0["request_bytes"] ?? "")/\($0["threads"] ?? "")" },
                       [4096, 1 << 20].flatMap { s in threadCounts.map { "\(s)/\($0)" } })
        for row in content {
            XCTAssertEqual(row["algorithm"] as? String, "aes-256-xts")
            positive(row, ["encrypt_mb_per_second", "decrypt_mb_per_second"])
        }

        let names = try rows("names")
        XCTAssertEqual(names.map { $0["threads"] as? Int }, threadCounts)
        for row in names {
            XCTAssertEqual(row["algorithm"] as? String, "aes-256-siv")
            positive(row, ["name_bytes", "encrypt_names_per_second", "decrypt_names_per_second"])
        }

        // Both tag algorithms, the default (2) first, each at both request sizes.
        let tags = try rows("integrity_tags")
        XCTAssertEqual(tags.map { "\($0["algorithm"] ?? "")/\($0["tag_algorithm"] ?? "")/\($0["request_bytes"] ?? "")/\($0["threads"] ?? "")" },
                       ["ghash-aes256/2", "hmac-sha256-128/1"].flatMap { a in [4096, 1 << 20].flatMap { s in threadCounts.map { "\(a)/\(s)/\($0)" } } })
        for row in tags { positive(row, ["request_bytes", "threads", "mb_per_second"]) }

        // The default cost first, then the one given on the command line.
        let kdf = try rows("argon2id")
        XCTAssertEqual(kdf.count, 2)
        XCTAssertEqual(kdf.map { $0["is_default"] as? Bool }, [true, false])
        XCTAssertEqual(kdf.map { $0["memory_kib"] as? Int }, [1 << 20, 8192])
        XCTAssertEqual(kdf.map { $0["iterations"] as? Int }, [4, 1])
        XCTAssertEqual(kdf.map { $0["parallelism"] as? Int }, [4, 1])
        XCTAssertEqual(kdf.map { $0["target_milliseconds"] as? Int }, [250, 250])
        for row in kdf { positive(row, ["derivations", "milliseconds_per_derivation", "iterations_for_target"]) }
    }

    func testTextReportAndBadOptions() throws {
        let r = Harness.run(["benchmark", "--time", "0.02"])
        XCTAssertEqual(r.status, 0, r.stderr)
        for needle in ["aes-256-xts", "aes-256-siv", "Unit tags", "ghash-aes256 (v2)", "hmac-sha256-128 (v1)", "argon2id", "(default)", "MB/s", "names/s"] {
            XCTAssertTrue(r.stdout.contains(needle), "\(needle) missing from:\n\(r.stdout)")
        }
        for bad in [["--time", "0"], ["--time", "61"], ["--pbkdf-memory", "4"], ["--pbkdf-parallel", "0"],
                    ["--pbkdf-memory", "4194304", "--pbkdf-force-iterations", "1000"]] {
            let b = Harness.run(["benchmark"] + bad)
            XCTAssertEqual(b.status, ExitStatus.usage.rawValue, "\(bad): \(b.stderr)")
            XCTAssertEqual(b.stdout, "", "\(bad)")
        }
    }
}
