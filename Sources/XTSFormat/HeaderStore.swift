import XTSSystem

/// The two copies of the volume header in CIPHERDIR. Each is replaced atomically
/// (new file, fsync, rename, fsync directory), one after the other, so at every
/// instant at least one copy is whole; the higher sequence number wins on load.
public struct HeaderStore: Sendable {
    public static let fileNames = ["xtsfs.header", "xtsfs.header2"]
    public let directory: String

    public init(directory: String) { self.directory = directory }

    public func path(_ copy: Int) -> String { directory + "/" + HeaderStore.fileNames[copy] }

    /// A copy that parsed, with the exact bytes it came from.
    public struct Candidate: Sendable {
        public var copy: Int
        public var header: VolumeHeader
    }

    /// What loading found: valid copies newest first, and what was wrong with the others.
    public struct Loaded: Sendable {
        public var candidates: [Candidate]
        public var damaged: [(copy: Int, error: String)]
        public var newest: VolumeHeader { candidates[0].header }
    }

    public enum LoadError: Error, Sendable, CustomStringConvertible {
        case notAVolume(String, exists: Bool)
        case unreadable(SystemError)
        case invalid(FormatError, details: [String])

        public var description: String {
            switch self {
            case .notAVolume(let dir, let exists):
                return exists ? "\(dir) is not an xtsfs volume (no \(HeaderStore.fileNames[0]))" : "\(dir) does not exist"
            case .unreadable(let e): return "cannot read the volume header: \(e)"
            case .invalid(let e, let details): return "the volume header is unusable: \(e)" + (details.count > 1 ? " (" + details.joined(separator: "; ") + ")" : "")
            }
        }
    }

    public func load() throws(LoadError) -> Loaded {
        var candidates: [Candidate] = []
        var damaged: [(Int, String)] = []
        var errors: [FormatError] = []
        var missing = 0
        var unreadable: SystemError?
        for copy in 0..<HeaderStore.fileNames.count {
            let bytes: [UInt8]
            do {
                bytes = try Sys.readFile(path(copy), limit: VolumeHeader.maxLength + 1)
            } catch {
                if error.errno == ENOENT { missing += 1; damaged.append((copy, "missing")); continue }
                // Not a regular file (a FIFO, symlink or directory put there), or unreadable:
                // that copy is unusable, the other may still serve.
                unreadable = unreadable ?? error
                damaged.append((copy, "\(error)"))
                continue
            }
            do {
                candidates.append(Candidate(copy: copy, header: try VolumeHeader.decode(bytes)))
            } catch {
                errors.append(error)
                damaged.append((copy, error.description))
            }
        }
        if missing == HeaderStore.fileNames.count { throw .notAVolume(directory, exists: Sys.exists(directory)) }
        if candidates.isEmpty, errors.isEmpty, let unreadable { throw .unreadable(unreadable) }
        if candidates.isEmpty {
            // A version or feature error is the more useful thing to say: the copies are fine, this build is old.
            let best = errors.first { if case .unsupportedVersion = $0 { return true }; if case .unsupportedFeatures = $0 { return true }; return false } ?? errors.first ?? .truncated("header")
            throw .invalid(best, details: damaged.map { "\(HeaderStore.fileNames[$0.0]): \($0.1)" })
        }
        candidates.sort { $0.header.sequence > $1.header.sequence }
        return Loaded(candidates: candidates, damaged: damaged)
    }

    public enum WriteError: Error, Sendable, CustomStringConvertible {
        /// A copy on disk is a valid header of another volume: never overwritten.
        case foreignCopy(file: String, volumeID: [UInt8])
        /// The header on disk is no longer the one the change was made to (another host or
        /// process wrote sequence `found` since `expected` was read): nothing was written.
        case concurrentChange(expected: UInt64, found: UInt64)
        case system(SystemError)

        public var description: String {
            switch self {
            case .foreignCopy(let file, let id):
                return "\(file) holds the header of another volume (ID \(id.map { ($0 < 16 ? "0" : "") + String($0, radix: 16) }.joined())); refusing to overwrite it"
            case .concurrentChange(let expected, let found):
                return "the volume header changed while this command ran (sequence \(expected) was read, \(found) is on disk now: another host or command changed it); nothing was written, run the command again"
            case .system(let e): return "\(e)"
            }
        }
    }

    /// Writes both copies of an already MAC'ed header. Refuses, before writing anything,
    /// when a copy on disk parses as a header of another volume ID: whatever put it there,
    /// replacing it could destroy the only header of that volume, and which of the two is
    /// the right one here is for a human (or a command that unlocked both) to decide.
    /// A missing or damaged copy is overwritten: that is the repair.
    /// `afterCopy` runs after each copy is in place (the rekey's fault injection).
    ///
    /// With `expectedSequence` (the sequence of the header the change was made to), the
    /// copies are re-read under an exclusive lock on CIPHERDIR and the write is refused
    /// (`concurrentChange`) unless the newest copy of this volume still has that sequence:
    /// a change another host made in the meantime is never silently overwritten. The lock is
    /// advisory and as shared as the backing filesystem makes `flock`; the sequence check
    /// holds without it, except for two writers within the same instant.
    public func write(_ header: VolumeHeader, expectedSequence: UInt64? = nil, afterCopy: ((Int) -> Void)? = nil) throws(WriteError) {
        let bytes: [UInt8]
        do { bytes = try header.encode() } catch { throw .system(SystemError(EINVAL, "encode header: \(error)")) }
        let lockFD = expectedSequence == nil ? -1 : Glibc.open(directory, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
        defer { if lockFD >= 0 { _ = Glibc.close(lockFD) } }
        if lockFD >= 0 {
            try? Sys.flock(lockFD, Sys.lockExclusive)
        }
        var newest: UInt64?
        for copy in 0..<HeaderStore.fileNames.count {
            guard let existing = try? Sys.readFile(path(copy), limit: VolumeHeader.maxLength + 1),
                  let other = try? VolumeHeader.decode(existing) else { continue }
            if other.volumeID != header.volumeID { throw .foreignCopy(file: path(copy), volumeID: other.volumeID) }
            newest = max(newest ?? 0, other.sequence)
        }
        if let expectedSequence, let newest, newest != expectedSequence {
            throw .concurrentChange(expected: expectedSequence, found: newest)
        }
        for copy in 0..<HeaderStore.fileNames.count {
            do { try Sys.atomicWrite(bytes, to: path(copy), mode: 0o400) } catch { throw .system(error) }
            afterCopy?(copy)
        }
    }
}

#if canImport(Glibc)
import Glibc
#endif
