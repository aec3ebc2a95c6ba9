/// `mount -t fuse.xtsfs CIPHERDIR MNT -o OPTIONS` (an /etc/fstab line, a systemd mount
/// unit) runs `mount.fuse3`, which runs `xtsfs CIPHERDIR MNT -o OPTIONS`: no subcommand,
/// and the key named among the mount options. This turns that form into `xtsfs mount`.
enum MountHelperArguments {
    /// Key options as `-o NAME=VALUE`, mapped to the `mount` command's options.
    static let keyOptions: [String: String] = [
        "passfile": "--passfile", "keyfile": "--keyfile", "extpass": "--extpass",
        "extpass-timeout": "--extpass-timeout", "pkcs11": "--pkcs11", "pkcs11-module": "--pkcs11-module",
        "pin-file": "--pin-file", "recovery-file": "--recovery-file", "slot": "--slot", "audit-log": "--audit-log",
        "kmip": "--kmip", "kmip-key-id": "--kmip-key-id", "kmip-cert": "--kmip-cert", "kmip-key": "--kmip-key", "kmip-ca": "--kmip-ca",
    ]
    /// Options that mean something to mount(8) or /etc/fstab only.
    static let fstabOnly: Set<String> = ["defaults", "auto", "noauto", "user", "users", "nouser", "owner", "_netdev", "nofail", "rw"]

    /// The arguments for the parser: unchanged unless they are the mount helper form.
    static func rewrite(_ args: [String], subcommands: [String]) -> [String] {
        guard args.count >= 2, !args[0].hasPrefix("-"), !subcommands.contains(args[0]), args[0] != "help" else { return args }
        var out = ["mount", args[0], args[1]]
        var rest = args.dropFirst(2)
        var passOn: [String] = []
        while let a = rest.first {
            rest = rest.dropFirst()
            if a == "-o", let opts = rest.first {
                rest = rest.dropFirst()
                for opt in splitOptions(opts) {
                    let parts = opt.split(separator: "=", maxSplits: 1).map(String.init)
                    if let flag = keyOptions[parts[0]], parts.count == 2 {
                        out += [flag, parts[1]]
                    } else if fstabOnly.contains(opt) || opt.hasPrefix("x-") || opt.hasPrefix("comment=") {
                        continue
                    } else {
                        passOn.append(opt)
                    }
                }
            } else {
                out.append(a)
            }
        }
        if !passOn.isEmpty { out += ["-o", passOn.joined(separator: ",")] }
        return out
    }

    /// Splits at commas; a backslash escapes the next character (for a comma in a command).
    static func splitOptions(_ s: String) -> [String] {
        var out: [String] = [], cur = "", escaped = false
        for c in s {
            if escaped { cur.append(c); escaped = false; continue }
            if c == "\\" { escaped = true; continue }
            if c == "," { if !cur.isEmpty { out.append(cur) }; cur = ""; continue }
            cur.append(c)
        }
        if !cur.isEmpty { out.append(cur) }
        return out
    }
}
