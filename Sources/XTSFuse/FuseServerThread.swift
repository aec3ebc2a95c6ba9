import CFuse
#if canImport(Glibc)
import Glibc
#endif

/// One daemon serves several mounts (the data area, and the temp and cache areas): each
/// `FuseServer` owns its session, and every session but one runs its loop on a thread of
/// its own. Start these threads after the daemon has dropped its privileges: libfuse's
/// workers inherit the capabilities of the thread that creates them.
///
/// `@unchecked Sendable`: `status` is written by the serving thread before it exits and
/// read only after `join` has seen it exit.
public final class FuseServerThread: @unchecked Sendable {
    public let server: FuseServer
    private var thread = pthread_t()
    private var status: Int32 = -1

    private init(server: FuseServer) { self.server = server }

    /// Runs `server.run()` on a new thread; nil if no thread could be made.
    public static func start(_ server: FuseServer) -> FuseServerThread? {
        let t = FuseServerThread(server: server)
        let me = Unmanaged.passRetained(t).toOpaque()
        let r = pthread_create(&t.thread, nil, { arg in
            let t = Unmanaged<FuseServerThread>.fromOpaque(arg!).takeRetainedValue()
            t.status = t.server.run()
            return nil
        }, me)
        if r != 0 {
            Unmanaged<FuseServerThread>.fromOpaque(me).release()
            return nil
        }
        return t
    }

    /// Waits until the session has ended (its mount was unmounted); its loop's status.
    public func join() -> Int32 {
        pthread_join(thread, nil)
        return status
    }
}
