import ArgumentParser
import XTSKeys
import XTSSystem
import XTSVolume

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

    @Flag(name: .customLong("daemon-child"), help: .hidden)
    var daemonChild = false

    @Flag(name: .customLong("unmount-helper"), help: .hidden)
    var unmountHelper = false

    var mountOptions: [String] { options.flatMap { $0.split(separator: ",").map(String.init) }.filter { !$0.isEmpty } }

    func run() throws {
        var request = MountRequest(cipherDir: cipherDir, mountpoint: mountpoint, options: mountOptions, foreground: foreground || debug, debug: debug)
        if unmountHelper {
            throw ExitCode(UnmountHelper.run(mountpoint: mountpoint))
        }
        if daemonChild {
            request.foreground = true
            throw ExitCode(Mounter.runDaemonChild(request))
        }
        ProcessHardening.apply()
        // Bad paths and a missing or damaged header are reported before any prompt.
        request = try Mounter.preflight(request)
        let provider = try key.provider(auditing: request.cipherDir, operation: "mount")
        let status = try Mounter.mount(request, provider: provider, slot: key.slot, audit: key.audit(request.cipherDir), say: { say($0) })
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
