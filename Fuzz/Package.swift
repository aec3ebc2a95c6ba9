// swift-tools-version:6.0
// The libFuzzer target over xtsfs's parsers. A package of its own so that the normal
// build never needs the fuzzer runtime: scripts/fuzz builds it with
// -sanitize=fuzzer,address. The input logic is XTSFuzzTarget in the main package.
import PackageDescription

let package = Package(
    name: "xtsfs-fuzz",
    dependencies: [.package(name: "xtsfs", path: "..")],
    targets: [
        .executableTarget(name: "xtsfs-fuzz", dependencies: [.product(name: "XTSFuzzTarget", package: "xtsfs")]),
    ],
    swiftLanguageModes: [.v6]
)
