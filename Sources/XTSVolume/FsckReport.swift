/// What `xtsfs fsck` finds: typed findings, each with the backing path and, where the
/// format lets us know it, the plaintext path. The CLI prints them or writes them as JSON;
/// tests match on `kind`, never on wording.
public enum FsckDamage: String, Codable, Sendable, CaseIterable {
    // Volume header copies and keyslots.
    case headerCopyMissing
    case headerCopyDamaged
    case headerCopyUnsupported
    /// A copy that is a valid header of another volume (another volume ID).
    case headerCopyForeign
    /// The copies hold different volume IDs and no key was given to tell which is ours.
    case headerCopiesDisagree
    /// A copy of this volume with a lower sequence number than the copy in use.
    case headerCopyOutdated
    /// A copy of this volume whose MAC does not verify under the volume's key.
    case headerCopyAltered
    /// A copy whose keyslots do not open with the key given although another copy's do.
    case headerCopyNotOpening
    case keyslotDamaged
    // Directories.
    case directoryHeaderMissing
    case directoryHeaderDamaged
    case directoryUnreadable
    /// Volumes with listing manifests (FORMAT.md 12.10): a directory's `xtsfs.list` is
    /// missing, or does not verify (damaged, planted, or moved from another directory).
    case listingManifestMissing
    case listingManifestDamaged
    /// The entries of a directory are not the set its manifest commits to: an entry was
    /// added, removed or swapped (or a file's header swapped) behind the mount's back.
    case directoryListingMismatch
    /// A change of a directory's entries was cut off (a crash): its listing matches the
    /// manifest's pending slot or its committed one, both of which xtsfs wrote (a warning;
    /// `--repair` settles the manifest, and removes a file whose create was cut off
    /// before its header was written).
    case listingChangeInterrupted
    // Names.
    case nameUndecryptable
    case longNameRecordMissing
    case longNameRecordMismatch
    case longNameRecordOrphan
    // Regular files.
    case fileHeaderDamaged
    /// A backing file of 1 to 31 bytes: its header is cut short and it holds no content.
    case fileTruncatedInHeader
    /// A backing size beyond what the format serves (2^60 bytes of plaintext).
    case fileTooLarge
    case fileUnreadable
    /// Integrity volumes: a unit that fails its tag, or a length that disagrees with the
    /// committed one (tampered, moved, replayed, cut short or extended behind our back).
    case fileAuthenticationFailed
    /// Integrity volumes: bytes past the committed length (an interrupted change leaves
    /// them, or someone appended them); never read, so harmless; `--repair` cuts them off.
    case fileUncommittedTail
    /// Integrity volumes: the reserved 64 bytes at the start of a group after the first
    /// are not zeros (never read, so harmless: written by something other than xtsfs).
    case fileReservedBytesForeign
    // Symlinks, the link store, extended attributes.
    case symlinkTargetUndecryptable
    case linkStoreMismatch
    case linkStoreOrphan
    case xattrUndecryptable
    case xattrForeign
    // Leftovers and entries that are not ours.
    case temporaryLeftover
    case syncConflict
    case foreignEntry
    // Leftovers of an interrupted DEK rekey (a volume in the middle of one; FORMAT.md 13).
    /// A checksum journal that verifies and whose every unit is old or new (a warning:
    /// `xtsfs rekey --dek`, or a mount, finishes its files and removes it).
    case rekeyJournal
    /// A journal that cannot be used: it does not verify, a record does not fit its file,
    /// or a unit it covers is neither old nor new.
    case rekeyJournalDamaged
    /// A complete copy made by a version before the journal (a warning: copied over its file).
    case rekeyCopy
    /// A copy that does not verify under the new key, or whose file changed size.
    case rekeyCopyDamaged
    /// An incomplete journal or copy (`.tmp`): nothing was overwritten under it (a
    /// warning: the rekey removes it).
    case rekeyTemporary
}

public enum FsckSeverity: String, Codable, Sendable {
    /// Damage to the volume: counts toward exit status 4 while not repaired.
    case error
    /// Not damage (an entry that is not ours, a leftover that harms nothing), reported only.
    case warning
}

/// What `--repair` did about a finding.
public enum FsckAction: String, Codable, Sendable {
    /// A header copy rewritten from the verified one.
    case restoredHeaderCopy
    /// A foreign header copy renamed aside (never deleted) so the volume's own copy could be restored.
    case movedAside
    /// A provably useless file removed (orphaned side file or link-store file, `.tmp` leftover).
    case removed
    /// An entry moved into the volume's `lost+found` directory.
    case quarantined
    /// A header with a single flipped bit corrected (the MAC verifies after flipping it back).
    case correctedBitFlip
    /// A long-name side file moved back to the entry whose name it holds.
    case putBack
    /// A directory header rewritten after every entry of the directory was quarantined.
    case recreatedDirectoryHeader
    /// An integrity volume's file cut back to its committed length.
    case trimmedUncommittedTail
    /// A listing manifest whose change was cut off, settled to the slot its listing matches.
    case settledListingManifest
}

public struct FsckFinding: Codable, Sendable, Equatable {
    public var kind: FsckDamage
    public var severity: FsckSeverity
    /// Relative to CIPHERDIR ("." for CIPHERDIR itself).
    public var backingPath: String
    /// The plaintext path inside the volume, where it is known.
    public var plaintextPath: String?
    /// For a sync-conflict copy: the plaintext path of the entry it shadows, where known.
    public var shadows: String?
    public var detail: String
    /// Set when `--repair` fixed it.
    public var repaired: FsckAction?
    /// Set when a repair was attempted and failed, or was not safe.
    public var notRepaired: String?

    public var isOpenError: Bool { severity == .error && repaired == nil }
}

/// Exit statuses of `xtsfs fsck`, as fsck(8) and e2fsck(8) define them; they add up
/// (1 + 4 = 5: some errors corrected, others left). They differ from the codes of the
/// other xtsfs commands.
public enum FsckExit: Int32, Sendable {
    case clean = 0
    case corrected = 1
    case uncorrected = 4
    case operationalError = 8
    case usage = 16
    case cancelled = 32
}

public struct FsckReport: Codable, Sendable {
    public var cipherDir: String
    /// "check" or "repair".
    public var mode: String
    /// Whether a key was used (names, MACs and contents' headers checked).
    public var keyUsed: Bool
    /// Which header copy opened and is trusted, when a key was used.
    public var headerCopyInUse: String?
    public var directories = 0
    public var files = 0
    public var symlinks = 0
    public var otherEntries = 0
    public var findings: [FsckFinding] = []
    /// What the user should know about the run itself (checks skipped without a key, ...).
    public var notes: [String] = []
    public var exitStatus: Int32 = 0

    public init(cipherDir: String, mode: String, keyUsed: Bool) {
        self.cipherDir = cipherDir
        self.mode = mode
        self.keyUsed = keyUsed
    }

    public var computedExit: Int32 {
        var code: Int32 = 0
        if findings.contains(where: { $0.repaired != nil && $0.severity == .error }) { code |= FsckExit.corrected.rawValue }
        if findings.contains(where: \.isOpenError) { code |= FsckExit.uncorrected.rawValue }
        return code
    }
}

/// Thrown when the user interrupts a run (exit status 32).
public struct FsckCancelled: Error, Sendable {
    public init() {}
}
