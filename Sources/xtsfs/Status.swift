import ArgumentParser
import Foundation
import XTSVolume

struct Status: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Show a volume's header: format, cipher, keyslots, header copies. Never a secret; no key needed.")

    @Argument(help: "The volume's directory.")
    var cipherDir: String

    @Flag(help: "Print JSON.")
    var json = false

    func run() throws {
        let r: StatusReport
        do { r = try StatusReport.make(cipherDir) } catch {
            if case .notAVolume = error, let served = StatusReport.cipherDirServed(at: cipherDir) {
                throw VolumeError.notAVolume("\(cipherDir) is the mount point of the xtsfs volume \(served); for its header run: xtsfs status \(served)")
            }
            throw error
        }
        if json {
            let enc = JSONEncoder()
            enc.outputFormatting = [.prettyPrinted, .sortedKeys, .withoutEscapingSlashes]
            print(String(decoding: try enc.encode(r), as: UTF8.self))
            return
        }
        func date(_ t: UInt64) -> String {
            let f = ISO8601DateFormatter()
            return f.string(from: Date(timeIntervalSince1970: TimeInterval(t)))
        }
        print("Volume:          \(r.cipherDir)")
        print("Format version:  \(r.formatVersion)")
        print("Volume ID:       \(r.volumeID)")
        print("Created:         \(date(r.created))")
        print("Content cipher:  \(r.contentCipher)")
        print("Name cipher:     \(r.nameCipher)")
        print("Block size:      \(r.blockSize)")
        print("Key generation:  \(r.keyGeneration)")
        print("Features:        \(r.features.isEmpty ? "none" : r.features.joined(separator: ", "))")
        print("Rekey:           \(r.rekey)")
        print("Header copies:")
        for c in r.headerCopies {
            print("  \(c.file): " + (c.ok ? "ok, sequence \(c.sequence ?? 0)" : "DAMAGED (\(c.problem ?? "?"))"))
        }
        for w in r.warnings { print("Warning:         \(w)") }
        print("Keyslots:")
        for s in r.keyslots {
            let params = s.parameters.keys.sorted().map { "\($0)=\(s.parameters[$0]!)" }.joined(separator: " ")
            print("  \(s.index): \(s.provider)  \(params)")
            print("     wrap \(s.wrap), key generation \(s.keyGeneration), created \(date(s.created)), last used \(s.lastUsed.map(date) ?? "never")")
        }
        let now = Int64(Date().timeIntervalSince1970)
        if r.mountedBy.isEmpty { print("Mounted by:      nobody (no presence record)") }
        for m in r.mountedBy { print("Mounted by:      " + Presence.describe(m, now: now)) }
        if let a = r.areas {
            print("Cache area:      " + (a.cacheKey ? "key present, \(a.cacheBytes) bytes of ciphertext" : "none (made by the first mount with --cache)"))
            print("Temp area:       " + (a.tempInCipherDir ? "present in CIPHERDIR (mounted, or left by a crash: unreadable, removed by the next --tmp mount)" : "none in CIPHERDIR"))
            if a.mounts.isEmpty { print("Mounted here:    no") }
            for m in a.mounts { print("Mounted here:    \(m.area) on \(m.mountpoint)") }
        }
    }
}
