import ArgumentParser
import XTSKeys
import XTSSystem
import XTSVolume
#if canImport(Glibc)
import Glibc
#endif

struct Mount: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Unlock a volume and mount its plaintext view.",
        discussion: "Returns once the mount is ready (the filesystem is served by a background daemon), or serves in the foreground with -f. Options for -o: ro, allow_other, nonempty, and other FUSE mount options.")

    @Argument(help: "The volume's directory.")
    var cipherDir: String

    @Argument(help: "An empty directory to mount the plaintext on.")
    var mountpoint: String

    @OptionGroup var key: KeyOptions

    @Flag(name: [.customShort("f"), .long], help: "Stay in the foreground until unmounted.")
    var foreground = false

    @Option(name: .customShort("o"), help: ArgumentHelp("Comma-separated mount options (ro, allow_other, nonempty, ...).", valueName: "OPTIONS"))
    var options: [String] = []

    @Flag(name: .long, help: "Print every FUSE request (implies -f).")
    var debug = false

    @Option(name: .customLong("tmp"), help: ArgumentHelp("Also mount an encrypted temp area here, under a random key that lives only as long as the mount; emptied at mount and unmount.", valueName: "DIR"))
    var tmp: String?

    @Option(name: .customLong("tmp-backing"), help: ArgumentHelp("Keep the temp area's ciphertext in DIR (a fast local disk) instead of CIPHERDIR.", valueName: "DIR"))
    var tmpBacking: String?

    @Option(name: .customLong("cache"), help: ArgumentHelp("Also mount the encrypted cache area here; it survives remounts until `xtsfs cache purge`.", valueName: "DIR"))
    var cache: String?

    @Option(name: .customLong("cache-max"), help: ArgumentHelp("Evict the cache's least recently used files beyond SIZE bytes (K, M, G, T suffixes).", valueName: "SIZE"))
    var cacheMax: String?

    @Flag(name: .long, help: "Once mounted, print TMPDIR= and XDG_CACHE_HOME= lines for a shell to eval.")
    var env = false

    @Option(name: .customLong("also-unmount"), help: .hidden)
    var alsoUnmount: [String] = []

    @Flag(name: .customLong("daemon-child"), help: .hidden)
    var daemonChild = false

    @Flag(name: .customLong("unmount-helper"), help: .hidden)
    var unmountHelper = false

    var mountOptions: [String] { options.flatMap { $0.split(separator: ",").map(String.init) }.filter { !$0.isEmpty } }

    func validate() throws {
        if let cacheMax, AreaOptions.parseSize(cacheMax) == nil {
            throw ValidationError("--cache-max \(cacheMax): give a size in bytes, or with K, M, G or T")
        }
        if env && tmp == nil && cache == nil { throw ValidationError("--env needs --tmp or --cache") }
    }

    func run() throws {
        let areas = AreaOptions(temp: tmp, tempBacking: tmpBacking, cache: cache, cacheMax: cacheMax.flatMap(AreaOptions.parseSize))
        var request = MountRequest(cipherDir: cipherDir, mountpoint: mountpoint, options: mountOptions, foreground: foreground || debug, debug: debug, areas: areas)
        if unmountHelper {
            throw ExitCode(UnmountHelper.run(mountpoints: [mountpoint] + alsoUnmount))
        }
        if daemonChild {
            request.foreground = true
            throw ExitCode(Mounter.runDaemonChild(request))
        }
        ProcessHardening.apply()
        // Bad paths and a missing or damaged header are reported before any prompt.
        request = try Mounter.preflight(request)
        let provider = try key.provider(auditing: request.cipherDir, operation: "mount")
        let envLines = env ? request.areas.environmentLines : []
        let status = try Mounter.mount(request, provider: provider, slot: key.slot, audit: key.audit(request.cipherDir), say: { say($0) },
                                       mounted: { for line in envLines { _ = (line + "\n").withCString { Glibc.write(1, $0, strlen($0)) } } })
        if status != 0 { throw ExitCode(status) }
    }
}

struct Unmount: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Unmount a mounted volume (fusermount3 -u works too).")

    @Argument(help: "Where the volume is mounted.")
    var mountpoint: String

    func run() throws {
        try Mounter.unmount(mountpoint)
    }
}
