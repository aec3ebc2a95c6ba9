/// Conflict copies that file-sync tools leave beside a file they could not merge. In
/// CIPHERDIR they are foreign entries, but their name still holds the backing name they
/// copy, so fsck can say which plaintext entry they shadow (and quarantine them where the
/// user can see both versions).
public struct SyncConflict: Equatable, Sendable {
    /// The backing name the conflict copy was made from.
    public var original: String
    /// Which tool's naming it matches.
    public var tool: String

    /// Recognises the naming of Syncthing (`NAME.sync-conflict-DATE-TIME-DEVICE[.EXT]`),
    /// Dropbox (`NAME (HOST's conflicted copy DATE)[.EXT]`), Nextcloud
    /// (`NAME (conflicted copy DATE TIME)[.EXT]`), ownCloud (`NAME_conflict-DATE-TIME[.EXT]`)
    /// and Resilio Sync (`NAME.Conflict[.EXT]`). Returns nil when the name matches none of
    /// them or what is left is not a name xtsfs writes.
    public static func parse(_ name: String) -> SyncConflict? {
        let candidates: [(String, String?)] = [
            ("syncthing", strip(name, marker: ".sync-conflict-", toNextDot: true)),
            ("dropbox/nextcloud", stripParenthesised(name, containing: "conflicted copy")),
            ("owncloud", strip(name, marker: "_conflict-", toNextDot: true)),
            ("resilio", strip(name, marker: ".Conflict", toNextDot: false)),
        ]
        for (tool, original) in candidates {
            guard let original, !original.isEmpty else { continue }
            switch BackingEntry.classify(original) {
            case .foreign, .volumeHeader, .linkStore: continue
            default: return SyncConflict(original: original, tool: tool)
            }
        }
        return nil
    }

    /// Removes `marker` and what follows it up to the next `.` (or, without `toNextDot`,
    /// only the marker itself when it ends the name or precedes a `.`).
    static func strip(_ name: String, marker: String, toNextDot: Bool) -> String? {
        guard let r = name.firstRange(of: marker) else { return nil }
        let rest = name[r.upperBound...]
        if toNextDot {
            let end = rest.firstIndex(of: ".") ?? rest.endIndex
            return String(name[..<r.lowerBound]) + String(rest[end...])
        }
        guard rest.isEmpty || rest.hasPrefix(".") else { return nil }
        return String(name[..<r.lowerBound]) + String(rest)
    }

    static func stripParenthesised(_ name: String, containing text: String) -> String? {
        guard let open = name.firstRange(of: " ("), let close = name[open.upperBound...].firstIndex(of: ")") else { return nil }
        guard name[open.upperBound..<close].firstRange(of: text) != nil else { return nil }
        return String(name[..<open.lowerBound]) + String(name[name.index(after: close)...])
    }
}
