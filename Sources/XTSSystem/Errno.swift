#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// A failed system call: the errno it returned and what was being done.
/// Every syscall in xtsfs goes through `Sys`, which retries EINTR and throws this.
public struct SystemError: Error, CustomStringConvertible, Equatable, Sendable {
    public let errno: Int32
    public let operation: String

    public init(_ errno: Int32, _ operation: String) {
        self.errno = errno
        self.operation = operation
    }

    public var description: String {
        "\(operation): \(String(cString: strerror(errno)))"
    }
}
