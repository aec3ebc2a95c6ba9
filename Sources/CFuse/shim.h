#ifndef XTSFS_CFUSE_SHIM_H
#define XTSFS_CFUSE_SHIM_H
#define FUSE_USE_VERSION 312
#include <fuse_lowlevel.h>
#include <fuse_opt.h>
#include <sys/stat.h>
#include <errno.h>
#include <fcntl.h>

#include <unistd.h>
#include <string.h>
#include <stdlib.h>
#include <stdint.h>

// FUSE INIT with flags libfuse 3.14 cannot ask for. libfuse builds the INIT reply from
// the capabilities it knows; HANDLE_KILLPRIV_V2 (kernel protocol 7.33) is not among them.
// This reads the kernel's INIT request itself, lets libfuse process it with the session's
// descriptor briefly pointed at a pipe (dup2: same number, other file), adds the wanted
// flags that the kernel offered to libfuse's reply, and writes that to /dev/fuse.
// Run once, after fuse_session_mount and before the session loop. Returns the flags
// granted (0 if none; the session is then initialised as libfuse alone would) or -1 on a
// failure that leaves the session unusable. `extra2` are flags2 bits (FUSE_INIT_EXT, the
// 64 flags' upper half), granted likewise when offered; they come back shifted up by 32.
#define XTSFS_FUSE_INIT_OPCODE 26
#define XTSFS_FUSE_IN_HEADER 40
#define XTSFS_FUSE_OUT_HEADER 16
#define XTSFS_FUSE_INIT_EXT (1u << 30)
static inline int64_t xtsfs_session_init_with(struct fuse_session *se, uint32_t extra, uint32_t extra2) {
    int fd = fuse_session_fd(se);
    size_t cap = 1 << 17;
    char *in = (char *)malloc(cap);
    if (!in) return -1;
    ssize_t n;
    do { n = read(fd, in, cap); } while (n < 0 && (errno == EINTR || errno == ENOENT));
    if (n < XTSFS_FUSE_IN_HEADER + 16) { free(in); return -1; }
    uint32_t opcode; memcpy(&opcode, in + 4, 4);
    uint32_t offered = 0, offered2 = 0, minor = 0;
    if (opcode == XTSFS_FUSE_INIT_OPCODE) {
        memcpy(&minor, in + XTSFS_FUSE_IN_HEADER + 4, 4);
        memcpy(&offered, in + XTSFS_FUSE_IN_HEADER + 12, 4);
        if ((offered & XTSFS_FUSE_INIT_EXT) && n >= XTSFS_FUSE_IN_HEADER + 20)
            memcpy(&offered2, in + XTSFS_FUSE_IN_HEADER + 16, 4);
    }
    uint32_t grant = extra & offered;
    uint32_t grant2 = extra2 & offered2;
    struct fuse_buf buf; memset(&buf, 0, sizeof buf);
    buf.mem = in; buf.size = (size_t)n;
    int p[2] = {-1, -1};
    int saved = -1;
    if ((grant || grant2) && pipe(p) == 0 && (saved = fcntl(fd, F_DUPFD_CLOEXEC, 0)) >= 0 && dup2(p[1], fd) >= 0) {
        fuse_session_process_buf(se, &buf);
        dup2(saved, fd);
        fcntl(fd, F_SETFD, FD_CLOEXEC);
        close(saved); close(p[1]);
        char out[512];
        ssize_t m = read(p[0], out, sizeof out);
        close(p[0]);
        free(in);
        if (m < XTSFS_FUSE_OUT_HEADER) return -1;
        int32_t err; memcpy(&err, out + 4, 4);
        if (err == 0 && m >= XTSFS_FUSE_OUT_HEADER + 16) {
            uint32_t flags; memcpy(&flags, out + XTSFS_FUSE_OUT_HEADER + 12, 4);
            flags |= grant;
            // flags2 (fuse_init_out offset 32) counts only with FUSE_INIT_EXT in the reply.
            if (grant2 && m >= XTSFS_FUSE_OUT_HEADER + 36) {
                uint32_t flags2; memcpy(&flags2, out + XTSFS_FUSE_OUT_HEADER + 32, 4);
                flags2 |= grant2;
                flags |= XTSFS_FUSE_INIT_EXT;
                memcpy(out + XTSFS_FUSE_OUT_HEADER + 32, &flags2, 4);
            } else {
                grant2 = 0;
            }
            memcpy(out + XTSFS_FUSE_OUT_HEADER + 12, &flags, 4);
        } else {
            grant = 0;
            grant2 = 0;
        }
        ssize_t w;
        do { w = write(fd, out, (size_t)m); } while (w < 0 && errno == EINTR);
        return w == m ? (int64_t)grant | ((int64_t)grant2 << 32) : -1;
    }
    if (p[0] >= 0) { close(p[0]); close(p[1]); }
    if (saved >= 0) { close(saved); }
    fuse_session_process_buf(se, &buf);
    free(in);
    return 0;
}

// FUSE_ARGS_INIT is a macro that Swift does not import.
static inline struct fuse_args xtsfs_fuse_args_init(int argc, char **argv) {
    struct fuse_args a = FUSE_ARGS_INIT(argc, argv);
    return a;
}


// fuse_session_loop_mt is a version-selecting macro; give Swift a plain function.
static inline int xtsfs_session_loop_mt(struct fuse_session *se, unsigned int max_threads) {
    struct fuse_loop_config *cfg = fuse_loop_cfg_create();
    if (!cfg) return -1;
    fuse_loop_cfg_set_max_threads(cfg, max_threads);
    fuse_loop_cfg_set_clone_fd(cfg, 1);
    int r = fuse_session_loop_mt(se, cfg);
    fuse_loop_cfg_destroy(cfg);
    return r;
}
// A relaxed atomic increment, for per-operation request counters.
static inline void xtsfs_count(uint64_t *slots, int index, uint64_t n) {
    __atomic_fetch_add(&slots[index], n, __ATOMIC_RELAXED);
}
static inline uint64_t xtsfs_count_load(const uint64_t *slots, int index) {
    return __atomic_load_n(&slots[index], __ATOMIC_RELAXED);
}
#endif

