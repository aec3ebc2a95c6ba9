#ifndef XTSFS_FUSE_RING_H
#define XTSFS_FUSE_RING_H
#include <stddef.h>
#include <stdint.h>

/// FUSE over io_uring (Linux 6.14 and later, `/sys/module/fuse/parameters/enable_uring`),
/// beside libfuse 3.14, which has no such transport: a queue per CPU, each served by a
/// thread pinned to that CPU, so a request and its reply stay on the caller's CPU.
/// Requests that come off a ring are handed to libfuse (`fuse_session_process_buf`) as if
/// read from /dev/fuse; their replies, which libfuse writes through the session's custom
/// I/O, are routed back into the ring entry by their unique ID. Everything else
/// (forgets, interrupts, notifications, and all requests until every queue is registered)
/// keeps using /dev/fuse and libfuse's own loop.

/// The FUSE_INIT flags2 bit that asks for the transport (bit 41 of the 64 flags).
#define XTSFS_FUSE_OVER_IO_URING_FLAGS2 (1u << 9)

struct xtsfs_ring;

/// Routes the session's replies (libfuse's custom I/O): call once, after
/// fuse_session_mount and before any request is served.
int xtsfs_ring_install_io(void *session);

/// Starts the transport on a session whose INIT granted FUSE_OVER_IO_URING: `depth`
/// entries per CPU, each with a payload buffer of `payload` bytes (at least the session's
/// largest request). Returns NULL with errno set if it cannot start; the session then
/// goes on through /dev/fuse alone. `served` (may be NULL) counts the requests served
/// through the rings (atomically; it must outlive the ring).
struct xtsfs_ring *xtsfs_ring_start(void *session, unsigned depth, size_t payload, uint64_t *served);

/// Where a read being served on this thread may put its reply: the payload buffer of the
/// ring entry its request came from (a reply written there is not copied again), or NULL
/// when the request did not come off a ring or `size` does not fit. Valid only until the
/// reply is sent, on the thread that asked.
void *xtsfs_ring_reply_buffer(size_t size);

/// Whether every queue registered (the kernel sends requests through the rings).
int xtsfs_ring_active(const struct xtsfs_ring *ring);

/// Stops the threads and frees the rings; after the session's loop has ended (the
/// kernel ends the rings' commands when the filesystem is unmounted).
void xtsfs_ring_stop(struct xtsfs_ring *ring);
#endif
