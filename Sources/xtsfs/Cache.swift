import ArgumentParser
import XTSVolume

struct Cache: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Manage a volume's cache area.",
        subcommands: [Purge.self])

    struct Purge: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Crypto-shred the cache area: discard its key, then remove its ciphertext. Needs no key.")

        @Argument(help: "The volume's directory.")
        var cipherDir: String

        func run() throws {
            let had = try CachePurge.purge(cipherDir: cipherDir)
            say(had ? "cache of \(cipherDir) purged: its key is gone, its ciphertext removed" : "\(cipherDir) has no cache; nothing to purge")
        }
    }
}
