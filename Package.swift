// swift-tools-version:6.0
import PackageDescription

// Layers import only downward:
// C shims -> XTSSystem -> XTSCrypto -> XTSFormat -> XTSKeys -> XTSContent -> XTSFS -> XTSFuse -> XTSVolume -> xtsfs (CLI)
let package = Package(
    name: "xtsfs",
    platforms: [.macOS(.v15)],
    products: [
        .executable(name: "xtsfs", targets: ["xtsfs"]),
        // For the fuzzer package in Fuzz/ (scripts/fuzz) only.
        .library(name: "XTSFuzzTarget", targets: ["XTSFuzzTarget"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.8.2"),
    ],
    targets: [
        .systemLibrary(name: "CFuse", pkgConfig: "fuse3", providers: [.apt(["libfuse3-dev"])]),
        .systemLibrary(name: "CCrypto", pkgConfig: "libcrypto", providers: [.apt(["libssl-dev"])]),
        .systemLibrary(name: "CArgon2", pkgConfig: "libargon2", providers: [.apt(["libargon2-dev"])]),
        .systemLibrary(name: "CSysShim"),
        .systemLibrary(name: "CP11Kit", pkgConfig: "p11-kit-1", providers: [.apt(["libp11-kit-dev"])]),
        .systemLibrary(name: "CTLS", pkgConfig: "libssl", providers: [.apt(["libssl-dev"])]),
        .target(name: "XTSSystem", dependencies: ["CSysShim"]),
        .target(name: "XTSCrypto", dependencies: ["XTSSystem", "CCrypto", "CArgon2"]),
        .target(name: "XTSFormat", dependencies: ["XTSSystem", "XTSCrypto"]),
        .target(name: "XTSKeys", dependencies: ["CSysShim", "CP11Kit", "CTLS", "XTSSystem", "XTSCrypto", "XTSFormat"]),
        .target(name: "XTSContent", dependencies: ["XTSSystem", "XTSCrypto", "XTSFormat", "XTSKeys"]),
        .target(name: "XTSFS", dependencies: ["CSysShim", "XTSSystem", "XTSCrypto", "XTSFormat", "XTSKeys", "XTSContent"]),
        // FUSE over io_uring beside libfuse 3.14 (`-o uring`); links liburing.
        .target(name: "CFuseRing", dependencies: ["CFuse"], linkerSettings: [.linkedLibrary("uring")]),
        .target(name: "XTSFuse", dependencies: ["XTSSystem", "XTSFS", "CFuse", "CFuseRing"]),
        .target(name: "XTSVolume", dependencies: ["CSysShim", "XTSSystem", "XTSCrypto", "XTSFormat", "XTSKeys", "XTSContent", "XTSFS", "XTSFuse"]),
        .target(name: "XTSFuzzTarget", dependencies: ["XTSFormat", "XTSKeys", "XTSContent", "XTSCrypto"]),
        .executableTarget(name: "xtsfs", dependencies: [
            "XTSVolume", "XTSSystem", "XTSKeys", "XTSFormat", "XTSCrypto",
            .product(name: "ArgumentParser", package: "swift-argument-parser"),
        ]),
        .testTarget(name: "XTSCryptoTests", dependencies: ["XTSCrypto", "XTSSystem"], resources: [.copy("Vectors")]),
        .testTarget(name: "XTSFormatTests", dependencies: ["XTSFormat", "XTSKeys", "XTSCrypto", "XTSSystem", "XTSVolume", "XTSFuzzTarget"], resources: [.copy("Golden"), .copy("FuzzCorpus")]),
        .testTarget(name: "XTSFSTests", dependencies: ["XTSFS", "CSysShim", "XTSContent", "XTSKeys", "XTSFormat", "XTSCrypto", "XTSSystem"]),
        .testTarget(name: "XTSContentTests", dependencies: ["XTSContent", "XTSCrypto", "XTSFormat", "XTSKeys", "XTSSystem"]),
        .testTarget(name: "XTSIntegrationTests", dependencies: ["CSysShim", "XTSVolume", "XTSFormat", "XTSKeys", "XTSCrypto", "XTSSystem", "xtsfs"], resources: [.copy("Fixtures")]),
    ],
    swiftLanguageModes: [.v6]
)
