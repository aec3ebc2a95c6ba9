import XTSSystem
import CArgon2

/// Cost parameters of Argon2id, stored in the volume header so the same key can be
/// derived again on a machine of different speed.
public struct Argon2idParameters: Sendable, Equatable, Codable {
    public var memoryKiB: UInt32
    public var iterations: UInt32
    public var parallelism: UInt32

    public init(memoryKiB: UInt32, iterations: UInt32, parallelism: UInt32) {
        self.memoryKiB = memoryKiB
        self.iterations = iterations
        self.parallelism = parallelism
    }
}

/// Argon2id (RFC 9106), version 0x13, through libargon2's `argon2_ctx`: the simple
/// `argon2id_hash_raw` entry point has no way to pass a secret or associated data.
public enum Argon2id {
    public static func derive(password: SecretBytes, salt: [UInt8], parameters: Argon2idParameters,
                              secret: [UInt8] = [], associatedData: [UInt8] = [], count: Int) throws(CryptoError) -> SecretBytes {
        guard count >= 4, let outLength = UInt32(exactly: count) else {
            throw .invalidInput("Argon2 output length must be 4 ... 2^32-1 bytes, not \(count)")
        }
        guard let passwordLength = UInt32(exactly: password.count), let saltLength = UInt32(exactly: salt.count),
              let secretLength = UInt32(exactly: secret.count), let adLength = UInt32(exactly: associatedData.count) else {
            throw .invalidInput("Argon2 input longer than 2^32-1 bytes")
        }
        let output = SecretBytes(count: count)
        var salt = salt, secret = secret, associatedData = associatedData
        let code: Int32 = password.withUnsafeBytes { pwd in
            output.withUnsafeMutableBytes { out in
                salt.withUnsafeMutableBufferPointer { s in
                    secret.withUnsafeMutableBufferPointer { k in
                        associatedData.withUnsafeMutableBufferPointer { ad in
                            var context = argon2_context()
                            context.out = out.baseAddress?.assumingMemoryBound(to: UInt8.self)
                            context.outlen = outLength
                            // libargon2 only reads the password (it would wipe it only with
                            // ARGON2_FLAG_CLEAR_PASSWORD, which is not set).
                            context.pwd = UnsafeMutablePointer(mutating: pwd.baseAddress?.assumingMemoryBound(to: UInt8.self))
                            context.pwdlen = passwordLength
                            context.salt = s.baseAddress
                            context.saltlen = saltLength
                            context.secret = k.baseAddress
                            context.secretlen = secretLength
                            context.ad = ad.baseAddress
                            context.adlen = adLength
                            context.t_cost = parameters.iterations
                            context.m_cost = parameters.memoryKiB
                            context.lanes = parameters.parallelism
                            context.threads = parameters.parallelism
                            context.version = UInt32(ARGON2_VERSION_13.rawValue)
                            context.allocate_cbk = nil
                            context.free_cbk = nil
                            // Default flags: libargon2 wipes its working memory before freeing it.
                            context.flags = 0  // ARGON2_DEFAULT_FLAGS (a UINT32_C macro, not imported)
                            return argon2_ctx(&context, Argon2_id)
                        }
                    }
                }
            }
        }
        guard code == ARGON2_OK.rawValue else {
            let message = argon2_error_message(code).map { String(cString: $0) } ?? "error \(code)"
            throw .argon2(message)
        }
        return output
    }

    /// Chooses the number of iterations so that one derivation with `memoryKiB` and
    /// `parallelism` takes about `targetMilliseconds` on this machine. Memory stays
    /// fixed (it is the expensive resource for an attacker); time is tuned with
    /// iterations. Starts at one iteration, grows until a run is long enough to
    /// measure reliably, then scales linearly, since Argon2's time is proportional
    /// to memory × iterations.
    public static func calibrate(memoryKiB: UInt32, parallelism: UInt32, targetMilliseconds: Int) throws(CryptoError) -> Argon2idParameters {
        // A fixed dummy password and salt: only the duration matters.
        let password = SecretBytes(count: 32)
        let salt = [UInt8](repeating: 0x5a, count: 16)
        let target = Double(max(targetMilliseconds, 0))
        let maxIterations: UInt32 = 1 << 20
        var iterations: UInt32 = 1

        while true {
            let parameters = Argon2idParameters(memoryKiB: memoryKiB, iterations: iterations, parallelism: parallelism)
            let clock = ContinuousClock()
            let start = clock.now
            _ = try derive(password: password, salt: salt, parameters: parameters, count: 32)
            let elapsed = milliseconds(clock.now - start)

            if elapsed >= target {
                if iterations == 1 { return parameters }
                return scaled(parameters, elapsed: elapsed, target: target, limit: maxIterations)
            }
            // Runs shorter than a quarter of the target (and very short runs in
            // absolute terms) are dominated by noise and fixed costs; measure again
            // with more iterations before extrapolating.
            if elapsed >= target / 4 && elapsed >= 20 {
                return scaled(parameters, elapsed: elapsed, target: target, limit: maxIterations)
            }
            if iterations >= maxIterations { return parameters }
            let factor = elapsed > 0 ? min(max(target / 4 / elapsed, 2), 16) : 16
            iterations = UInt32(min(Double(maxIterations), (Double(iterations) * factor).rounded(.up)))
        }
    }

    private static func scaled(_ measured: Argon2idParameters, elapsed: Double, target: Double, limit: UInt32) -> Argon2idParameters {
        var result = measured
        let estimate = (Double(measured.iterations) * target / max(elapsed, 0.001)).rounded()
        result.iterations = UInt32(min(max(estimate, 1), Double(limit)))
        return result
    }

    private static func milliseconds(_ d: Duration) -> Double {
        let (seconds, attoseconds) = d.components
        return Double(seconds) * 1000 + Double(attoseconds) / 1e15
    }
}
