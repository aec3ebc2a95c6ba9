import Foundation
import XCTest

/// Known-answer vectors live as JSON in Vectors/ (copied into the test bundle), so
/// they can be read and diffed against their published sources without Swift noise.
enum Vectors {
    struct Missing: Error, CustomStringConvertible {
        let name: String
        var description: String { "test vector file \(name) is not in the test bundle" }
    }

    static func load<T: Decodable>(_ name: String, as type: T.Type = T.self) throws -> T {
        guard let folder = Bundle.module.url(forResource: "Vectors", withExtension: nil) else { throw Missing(name: "Vectors/") }
        let data = try Data(contentsOf: folder.appendingPathComponent(name))
        return try JSONDecoder().decode(T.self, from: data)
    }
}

struct BadHex: Error, CustomStringConvertible {
    let text: String
    var description: String { "not hex: \(text.prefix(40))" }
}

/// Bytes from a hex string (upper or lower case, even length).
func hex(_ text: String) throws -> [UInt8] {
    let digits = Array(text.utf8)
    guard digits.count % 2 == 0 else { throw BadHex(text: text) }
    func value(_ c: UInt8) throws -> UInt8 {
        switch c {
        case 0x30...0x39: return c - 0x30
        case 0x61...0x66: return c - 0x61 + 10
        case 0x41...0x46: return c - 0x41 + 10
        default: throw BadHex(text: text)
        }
    }
    var out: [UInt8] = []
    out.reserveCapacity(digits.count / 2)
    var i = 0
    while i < digits.count {
        out.append(try value(digits[i]) << 4 | value(digits[i + 1]))
        i += 2
    }
    return out
}

func hexString(_ bytes: [UInt8]) -> String {
    let digits = Array("0123456789abcdef".utf8)
    var out: [UInt8] = []
    out.reserveCapacity(bytes.count * 2)
    for b in bytes {
        out.append(digits[Int(b >> 4)])
        out.append(digits[Int(b & 0xf)])
    }
    return String(decoding: out, as: UTF8.self)
}
