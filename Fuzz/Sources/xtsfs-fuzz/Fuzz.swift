import XTSFuzzTarget
#if canImport(Glibc)
import Glibc
#endif

/// libFuzzer calls this for every input.
@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzOne(_ data: UnsafePointer<UInt8>?, _ size: Int) -> CInt {
    let bytes = size == 0 || data == nil ? [] : Array(UnsafeBufferPointer(start: data, count: size))
    FuzzTarget.run(bytes)
    return 0
}

@_silgen_name("LLVMFuzzerRunDriver")
func runDriver(_ argc: UnsafeMutablePointer<CInt>, _ argv: UnsafeMutablePointer<UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>?>,
               _ callback: @convention(c) (UnsafePointer<UInt8>?, Int) -> CInt) -> CInt

/// SwiftPM names an executable's entry point after its module; libFuzzer's driver runs
/// from here. `--write-seeds DIR` writes the seed corpus instead.
@_cdecl("xtsfs_fuzz_main")
func fuzzMain(_ argc: CInt, _ argv: UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>?) -> CInt {
    if argc == 3, let a = argv?[1], String(cString: a) == "--write-seeds", let d = argv?[2] {
        let dir = String(cString: d)
        for (name, bytes) in FuzzTarget.seeds() {
            let fd = open(dir + "/" + name, O_WRONLY | O_CREAT | O_TRUNC, 0o644)
            guard fd >= 0 else { return 1 }
            _ = bytes.withUnsafeBytes { write(fd, $0.baseAddress, $0.count) }
            close(fd)
        }
        return 0
    }
    var c = argc
    var v = argv
    return runDriver(&c, &v, { fuzzOne($0, $1) })
}
