import XTSFormat
import XTSSystem

extension Mounter {
    /// `xtsfs mount MOUNTPOINT CIPHERDIR`: the "mount point" holds a volume header and
    /// CIPHERDIR does not. Said plainly instead of "not empty, use -o nonempty", which
    /// would invite mounting over the volume. Skipped for a FUSE mount point (looking
    /// inside could wait for its daemon).
    static func checkSwapped(cipherDir: String, mountpoint mp: String) throws(VolumeError) {
        guard MountEntry.fuse(at: mp) == nil else { return }
        let holdsHeader = { (dir: String) in HeaderStore.fileNames.contains { Sys.exists(dir + "/" + $0) } }
        guard holdsHeader(mp) else { return }
        if !holdsHeader(cipherDir) {
            throw .usage("the arguments look swapped: \(mp) is an xtsfs volume and \(cipherDir) is not; usage: xtsfs mount CIPHERDIR MOUNTPOINT")
        }
        throw .mountFailed("mountpoint \(mp) is itself an xtsfs volume; refusing to mount over it")
    }
}

extension StatusReport {
    /// `xtsfs status` given a mount point instead of CIPHERDIR: the xtsfs volume mounted
    /// there, from the mount table (nothing under the mount is touched).
    public static func cipherDirServed(at path: String) -> String? {
        let mp = Mounter.absolute(path)
        guard let e = MountEntry.all().last(where: { $0.mountpoint == mp }), e.fsType == "fuse.xtsfs", !e.source.isEmpty else { return nil }
        return e.source
    }
}
