// FUSE over io_uring beside libfuse 3.14: see include/fuse_ring.h.
//
// The kernel's side (fs/fuse/dev_uring.c, Linux 6.14+): each CPU has a queue; the daemon
// registers entries on it with IORING_OP_URING_CMD on the /dev/fuse descriptor (a
// 128-byte SQE carrying the queue and a commit ID, and two buffers: a header block and a
// payload). When a request is made on CPU c, the kernel fills a free entry of queue c
// (the fuse_in_header, the operation's own header in `op_in`, the rest in the payload)
// and completes its command; the daemon answers by writing the fuse_out_header into the
// header block and the reply into the payload, and submits COMMIT_AND_FETCH with the
// request's commit ID, which both delivers the reply and makes the entry free again.
// The ring goes live once every queue has an entry; until then, and for forgets and
// interrupts always, requests come through /dev/fuse.
#define _GNU_SOURCE
#define FUSE_USE_VERSION 312
#include <fuse3/fuse_lowlevel.h>
#include <linux/fuse.h>
#include <liburing.h>

#include "fuse_ring.h"

#include <errno.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/sysinfo.h>
#include <sys/uio.h>
#include <unistd.h>

enum { CMD_REGISTER = 1, CMD_COMMIT_AND_FETCH = 2 };
enum { IN_HEADER = sizeof(struct fuse_in_header), OP_AREA = 128, OUT_HEADER = sizeof(struct fuse_out_header) };

// The kernel's layouts (include/uapi/linux/fuse.h, protocol 7.42).
struct ent_in_out { uint64_t flags, commit_id; uint32_t payload_sz, padding; uint64_t reserved; };
struct req_header { char in_out[128]; char op_in[OP_AREA]; struct ent_in_out ent; };
struct cmd_req { uint64_t flags, commit_id; uint16_t qid; uint8_t padding[6]; };

struct queue;
struct ent {
    struct queue *q;
    struct req_header *hdr;
    // The request as libfuse reads it from /dev/fuse: in header and op header are put
    // right before the payload, which the kernel writes at `buf + OFFSET`.
    char *buf;
    struct iovec iov[2];
    _Atomic uint64_t unique; // of the request being served, 0 when none
    uint64_t commit;
    // A large request handed to the worker pool (one at most per entry: no allocation).
    struct fuse_buf work;
    struct ent *next_work;
};
#define OFFSET 256

struct queue {
    struct xtsfs_ring *ring;
    int qid;
    struct io_uring uring;
    int uring_ready;
    pthread_mutex_t lock;
    pthread_t tid;
    int started;
    struct ent *ents;
};

// Large reads and writes (a sequential stream's read-ahead and write-back, 128 KiB to
// 1 MiB each) come to one CPU's queue one after another; served on the queue's own thread
// alone they would be decrypted and encrypted one at a time on one CPU. They go to a small
// pool of unpinned workers instead (twice as many as CPUs, 4 to 8, so that their backing
// reads overlap), and the queue's thread fetches the next request.
#define LARGE_REQUEST (64 * 1024)

struct xtsfs_ring {
    struct fuse_session *se;
    pthread_mutex_t pool_lock;
    pthread_cond_t pool_wake;
    struct ent *pool_head, *pool_tail;
    int workers;
    pthread_t worker_tids[8];
    int fd;
    int nq;
    unsigned depth;
    size_t payload;
    struct queue *qs;
    _Atomic int stop;
    _Atomic int failed;
    _Atomic int registered;
    uint64_t *served; // the session's counter (updated with __atomic builtins)
};

// Live rings, for routing replies (a daemon may serve several mounts).
#define MAX_RINGS 16
static struct xtsfs_ring *_Atomic rings[MAX_RINGS];

static struct ent *find_entry(int fd, uint64_t unique) {
    if (unique == 0) return NULL;
    for (int r = 0; r < MAX_RINGS; r++) {
        struct xtsfs_ring *ring = atomic_load(&rings[r]);
        if (!ring || ring->fd != fd) continue;
        for (int q = 0; q < ring->nq; q++) {
            struct queue *qu = &ring->qs[q];
            for (unsigned i = 0; i < ring->depth; i++) {
                if (atomic_load_explicit(&qu->ents[i].unique, memory_order_acquire) == unique) return &qu->ents[i];
            }
        }
    }
    return NULL;
}

static void prep(struct queue *q, struct ent *e, uint32_t cmd) {
    struct io_uring_sqe *sqe = io_uring_get_sqe(&q->uring);
    // One SQE per entry is all there ever is in flight, and the ring has twice that.
    if (!sqe) { io_uring_submit(&q->uring); sqe = io_uring_get_sqe(&q->uring); }
    if (!sqe) return;
    memset(sqe, 0, 128);
    sqe->opcode = IORING_OP_URING_CMD;
    sqe->fd = q->ring->fd;
    sqe->cmd_op = cmd;
    sqe->user_data = (uint64_t)(uintptr_t)e;
    if (cmd == CMD_REGISTER) {
        sqe->addr = (uint64_t)(uintptr_t)e->iov;
        sqe->len = 2;
    }
    struct cmd_req *r = (struct cmd_req *)(void *)sqe->cmd;
    r->qid = (uint16_t)q->qid;
    r->commit_id = cmd == CMD_REGISTER ? 0 : e->commit;
}

// libfuse's custom I/O: a reply to a request taken off a ring goes back into its entry.
static ssize_t ring_writev(int fd, struct iovec *iov, int count, void *userdata) {
    (void)userdata;
    if (count < 1 || iov[0].iov_len < OUT_HEADER) return writev(fd, iov, count);
    struct fuse_out_header oh;
    memcpy(&oh, iov[0].iov_base, sizeof oh);
    struct ent *e = find_entry(fd, oh.unique);
    if (!e) return writev(fd, iov, count);
    struct queue *q = e->q;
    size_t total = iov[0].iov_len, len = 0;
    for (int i = 1; i < count; i++) {
        total += iov[i].iov_len;
        if (len + iov[i].iov_len > q->ring->payload) {
            oh.error = -EIO;
            len = 0;
            break;
        }
        // A read decrypted straight into the entry (xtsfs_ring_reply_buffer) is in place.
        if (iov[i].iov_base != e->buf + OFFSET + len) memcpy(e->buf + OFFSET + len, iov[i].iov_base, iov[i].iov_len);
        len += iov[i].iov_len;
    }
    if (oh.error) len = 0;
    oh.len = (uint32_t)(OUT_HEADER + len);
    memcpy(e->hdr->in_out, &oh, sizeof oh);
    e->hdr->ent.payload_sz = (uint32_t)len;
    pthread_mutex_lock(&q->lock);
    atomic_store_explicit(&e->unique, 0, memory_order_release);
    prep(q, e, CMD_COMMIT_AND_FETCH);
    int r = io_uring_submit(&q->uring);
    pthread_mutex_unlock(&q->lock);
    if (r < 0) { errno = -r; return -1; }
    return (ssize_t)total;
}

// The entry whose request this thread is serving, while libfuse dispatches it.
static __thread struct ent *serving;

void *xtsfs_ring_reply_buffer(size_t size) {
    struct ent *e = serving;
    if (!e || size > e->q->ring->payload) return NULL;
    return e->buf + OFFSET;
}

static void process(struct xtsfs_ring *ring, struct ent *e, struct fuse_buf *b) {
    serving = e;
    fuse_session_process_buf(ring->se, b);
    serving = NULL;
}

static ssize_t ring_read(int fd, void *buf, size_t len, void *userdata) {
    (void)userdata;
    return read(fd, buf, len);
}

int xtsfs_ring_install_io(void *session) {
    struct fuse_session *se = session;
    static const struct fuse_custom_io io = { .writev = ring_writev, .read = ring_read };
    return fuse_session_custom_io(se, &io, fuse_session_fd(se));
}

static void serve(struct queue *q, struct ent *e) {
    struct fuse_in_header in;
    memcpy(&in, e->hdr->in_out, sizeof in);
    uint32_t payload = e->hdr->ent.payload_sz;
    // The operation's own header is what the request holds beyond the two others.
    size_t op = in.len >= IN_HEADER + (size_t)payload ? in.len - IN_HEADER - payload : SIZE_MAX;
    if (op > OP_AREA || payload > q->ring->payload) {
        // Not a request this code understands: answer EIO rather than guess.
        struct fuse_out_header oh = { .len = OUT_HEADER, .error = -EIO, .unique = in.unique };
        e->commit = e->hdr->ent.commit_id;
        memcpy(e->hdr->in_out, &oh, sizeof oh);
        e->hdr->ent.payload_sz = 0;
        pthread_mutex_lock(&q->lock);
        prep(q, e, CMD_COMMIT_AND_FETCH);
        io_uring_submit(&q->uring);
        pthread_mutex_unlock(&q->lock);
        return;
    }
    char *start = e->buf + OFFSET - op - IN_HEADER;
    memcpy(start, &in, IN_HEADER);
    memcpy(start + IN_HEADER, e->hdr->op_in, op);
    e->commit = e->hdr->ent.commit_id;
    atomic_store_explicit(&e->unique, in.unique, memory_order_release);
    struct fuse_buf b;
    memset(&b, 0, sizeof b);
    b.mem = start;
    b.size = in.len;
    struct xtsfs_ring *ring = q->ring;
    if (ring->served) __atomic_fetch_add(ring->served, 1, __ATOMIC_RELAXED);
    // So do fsyncs, which wait for the disk: the CPU's other requests go on meanwhile.
    int large = (in.opcode == FUSE_WRITE && payload >= LARGE_REQUEST) ||
                (in.opcode == FUSE_READ && op >= sizeof(struct fuse_read_in) &&
                 ((const struct fuse_read_in *)(const void *)e->hdr->op_in)->size >= LARGE_REQUEST) ||
                in.opcode == FUSE_FSYNC || in.opcode == FUSE_FSYNCDIR;
    if (!large || ring->workers == 0) {
        process(ring, e, &b);
        return;
    }
    e->work = b;
    e->next_work = NULL;
    pthread_mutex_lock(&ring->pool_lock);
    if (ring->pool_tail) ring->pool_tail->next_work = e; else ring->pool_head = e;
    ring->pool_tail = e;
    pthread_cond_signal(&ring->pool_wake);
    pthread_mutex_unlock(&ring->pool_lock);
}

static void *worker_thread(void *arg) {
    struct xtsfs_ring *ring = arg;
    for (;;) {
        pthread_mutex_lock(&ring->pool_lock);
        while (!ring->pool_head && !atomic_load(&ring->stop)) pthread_cond_wait(&ring->pool_wake, &ring->pool_lock);
        struct ent *e = ring->pool_head;
        if (e) {
            ring->pool_head = e->next_work;
            if (!ring->pool_head) ring->pool_tail = NULL;
        }
        pthread_mutex_unlock(&ring->pool_lock);
        if (!e) return NULL; // stopping, nothing left
        // The entry is not fetched again before this request's reply commits it.
        struct fuse_buf b = e->work;
        process(ring, e, &b);
    }
}

static void *queue_thread(void *arg) {
    struct queue *q = arg;
    struct xtsfs_ring *ring = q->ring;
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(q->qid, &set);
    pthread_setaffinity_np(pthread_self(), sizeof set, &set);
    pthread_mutex_lock(&q->lock);
    for (unsigned i = 0; i < ring->depth; i++) prep(q, &q->ents[i], CMD_REGISTER);
    int r = io_uring_submit(&q->uring);
    pthread_mutex_unlock(&q->lock);
    if (r < 0) { atomic_store(&ring->failed, -r); return NULL; }
    atomic_fetch_add(&ring->registered, 1);
    while (!atomic_load(&ring->stop)) {
        struct io_uring_cqe *cqe;
        struct __kernel_timespec ts = { .tv_sec = 0, .tv_nsec = 200 * 1000 * 1000 };
        r = io_uring_wait_cqe_timeout(&q->uring, &cqe, &ts);
        if (r == -ETIME || r == -EINTR) continue;
        if (r < 0) break;
        struct ent *e = (struct ent *)(uintptr_t)cqe->user_data;
        int res = cqe->res;
        io_uring_cqe_seen(&q->uring, cqe);
        if (res < 0) {
            // The filesystem unmounted (ENOTCONN, ECANCELED) or the kernel refused an
            // entry (the session then goes on through /dev/fuse).
            if (res != -ENOTCONN && res != -ECANCELED && res != -ENODEV) atomic_store(&ring->failed, -res);
            break;
        }
        if (e) serve(q, e);
    }
    return NULL;
}

static void ring_free(struct xtsfs_ring *ring) {
    for (int q = 0; q < ring->nq; q++) {
        struct queue *qu = &ring->qs[q];
        if (qu->uring_ready) io_uring_queue_exit(&qu->uring);
        if (qu->ents) {
            for (unsigned i = 0; i < ring->depth; i++) {
                if (qu->ents[i].hdr) munmap(qu->ents[i].hdr, 4096);
                if (qu->ents[i].buf) munmap(qu->ents[i].buf, OFFSET + ring->payload);
            }
            free(qu->ents);
        }
        pthread_mutex_destroy(&qu->lock);
    }
    free(ring->qs);
    free(ring);
}

struct xtsfs_ring *xtsfs_ring_start(void *session, unsigned depth, size_t payload, uint64_t *served) {
    struct fuse_session *se = session;
    int nq = get_nprocs_conf();
    if (nq < 1 || depth < 1 || depth > 64) { errno = EINVAL; return NULL; }
    struct xtsfs_ring *ring = calloc(1, sizeof *ring);
    if (!ring) return NULL;
    ring->se = se;
    ring->fd = fuse_session_fd(se);
    ring->nq = nq;
    ring->depth = depth;
    ring->payload = payload;
    ring->served = served;
    ring->qs = calloc((size_t)nq, sizeof *ring->qs);
    if (!ring->qs) { free(ring); return NULL; }
    int err = 0;
    for (int q = 0; q < nq && !err; q++) {
        struct queue *qu = &ring->qs[q];
        qu->ring = ring;
        qu->qid = q;
        pthread_mutex_init(&qu->lock, NULL);
        qu->ents = calloc(depth, sizeof *qu->ents);
        if (!qu->ents) { err = ENOMEM; break; }
        struct io_uring_params p;
        memset(&p, 0, sizeof p);
        p.flags = IORING_SETUP_SQE128;
        int r = io_uring_queue_init_params(depth * 2, &qu->uring, &p);
        if (r < 0) { err = -r; break; }
        qu->uring_ready = 1;
        for (unsigned i = 0; i < depth; i++) {
            struct ent *e = &qu->ents[i];
            e->q = qu;
            // Anonymous mappings: left out of core dumps like the rest of the daemon's
            // plaintext, and given back to the kernel when the ring stops.
            e->hdr = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
            e->buf = mmap(NULL, OFFSET + payload, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
            if (e->hdr == MAP_FAILED || e->buf == MAP_FAILED) {
                if (e->hdr == MAP_FAILED) e->hdr = NULL;
                if (e->buf == MAP_FAILED) e->buf = NULL;
                err = ENOMEM;
                break;
            }
            madvise(e->buf, OFFSET + payload, MADV_DONTDUMP);
            e->iov[0] = (struct iovec){ e->hdr, sizeof(struct req_header) };
            e->iov[1] = (struct iovec){ e->buf + OFFSET, payload };
        }
    }
    int slot = -1;
    if (!err) {
        for (int r = 0; r < MAX_RINGS && slot < 0; r++) {
            struct xtsfs_ring *expected = NULL;
            if (atomic_compare_exchange_strong(&rings[r], &expected, ring)) slot = r;
        }
        if (slot < 0) err = EBUSY;
    }
    if (err) { ring_free(ring); errno = err; return NULL; }
    pthread_mutex_init(&ring->pool_lock, NULL);
    pthread_cond_init(&ring->pool_wake, NULL);
    int want = 2 * nq < 4 ? 4 : (2 * nq > 8 ? 8 : 2 * nq);
    for (int i = 0; i < want; i++) {
        if (pthread_create(&ring->worker_tids[i], NULL, worker_thread, ring) != 0) break;
        ring->workers++;
    }
    for (int q = 0; q < nq; q++) {
        if (pthread_create(&ring->qs[q].tid, NULL, queue_thread, &ring->qs[q]) != 0) {
            atomic_store(&ring->stop, 1);
            for (int k = 0; k < q; k++) pthread_join(ring->qs[k].tid, NULL);
            pthread_mutex_lock(&ring->pool_lock);
            pthread_cond_broadcast(&ring->pool_wake);
            pthread_mutex_unlock(&ring->pool_lock);
            for (int k = 0; k < ring->workers; k++) pthread_join(ring->worker_tids[k], NULL);
            atomic_store(&rings[slot], NULL);
            ring_free(ring);
            errno = EAGAIN;
            return NULL;
        }
        ring->qs[q].started = 1;
    }
    // Every queue has submitted its entries (or failed) before this returns.
    for (int i = 0; i < 500 && atomic_load(&ring->registered) + (atomic_load(&ring->failed) ? 1 : 0) < nq; i++) usleep(1000);
    return ring;
}

int xtsfs_ring_active(const struct xtsfs_ring *ring) {
    return ring && atomic_load(&((struct xtsfs_ring *)ring)->failed) == 0 && atomic_load(&((struct xtsfs_ring *)ring)->registered) == ring->nq;
}

void xtsfs_ring_stop(struct xtsfs_ring *ring) {
    if (!ring) return;
    // Out of the routing table first: the session is over, and no reply goes to a ring now.
    for (int r = 0; r < MAX_RINGS; r++) {
        struct xtsfs_ring *expected = ring;
        atomic_compare_exchange_strong(&rings[r], &expected, NULL);
    }
    atomic_store(&ring->stop, 1);
    for (int q = 0; q < ring->nq; q++) if (ring->qs[q].started) pthread_join(ring->qs[q].tid, NULL);
    // Workers finish what they hold (the replies go nowhere now) and leave.
    pthread_mutex_lock(&ring->pool_lock);
    pthread_cond_broadcast(&ring->pool_wake);
    pthread_mutex_unlock(&ring->pool_lock);
    for (int k = 0; k < ring->workers; k++) pthread_join(ring->worker_tids[k], NULL);
    // The buffers and rings go; the small ring and entry records stay allocated: another
    // thread's reply or notification may still be reading an entry's unique ID in
    // find_entry, having found the ring just before it left the table.
    for (int q = 0; q < ring->nq; q++) {
        struct queue *qu = &ring->qs[q];
        if (qu->uring_ready) { io_uring_queue_exit(&qu->uring); qu->uring_ready = 0; }
        for (unsigned i = 0; i < ring->depth; i++) {
            struct ent *e = &qu->ents[i];
            atomic_store(&e->unique, 0);
            if (e->hdr) { munmap(e->hdr, 4096); e->hdr = NULL; }
            if (e->buf) { munmap(e->buf, OFFSET + ring->payload); e->buf = NULL; }
        }
    }
}
