#ifndef XTSFS_CSYS_SHIM_H
#define XTSFS_CSYS_SHIM_H
// Linux calls that Glibc's Swift overlay does not import (macros or GNU-only).
#include <fcntl.h>
extern int pipe2(int pipefd[2], int flags);
#include <errno.h>
#include <sys/wait.h>
#include <unistd.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <sys/statvfs.h>
#include <sys/mount.h>
#include <spawn.h>
#include <signal.h>
#include <pthread.h>
#include <syslog.h>

#ifndef POSIX_SPAWN_SETSID
#define POSIX_SPAWN_SETSID 0x80 /* glibc >= 2.26; hidden without _GNU_SOURCE */
#endif


// Declared here rather than through <sys/xattr.h> and <linux/falloc.h>: those would
// make this module, not Glibc, the owner of `struct stat` and friends in Swift.
extern ssize_t getxattr(const char *path, const char *name, void *value, size_t size);
extern int setxattr(const char *path, const char *name, const void *value, size_t size, int flags);
extern ssize_t listxattr(const char *path, char *list, size_t size);
extern int removexattr(const char *path, const char *name);
// flock(2): Swift sees only `struct flock` under that name.
extern int flock(int fd, int operation);
static inline int xts_flock(int fd, int operation) { return flock(fd, operation); }
static const int XTS_LOCK_SH = 1, XTS_LOCK_EX = 2, XTS_LOCK_NB = 4, XTS_LOCK_UN = 8;
// Open file description locks (fcntl.h hides them without _GNU_SOURCE).
static const int XTS_F_OFD_GETLK = 36, XTS_F_OFD_SETLK = 37, XTS_F_OFD_SETLKW = 38;
// <sys/random.h> (the temporaries' random suffixes).
extern ssize_t getrandom(void *buf, size_t buflen, unsigned int flags);

#ifndef AT_EMPTY_PATH
#define AT_EMPTY_PATH 0x1000
#endif
#ifndef O_PATH
#define O_PATH 010000000
#endif
static const int XTS_O_PATH = O_PATH;
static const int XTS_AT_EMPTY_PATH = AT_EMPTY_PATH;
static const int XTS_FALLOC_KEEP_SIZE = 0x01;   /* FALLOC_FL_KEEP_SIZE */
static const int XTS_FALLOC_PUNCH_HOLE = 0x02;  /* FALLOC_FL_PUNCH_HOLE */
static const int XTS_FALLOC_ZERO_RANGE = 0x10;  /* FALLOC_FL_ZERO_RANGE */
static const int XTS_XATTR_CREATE = 1;
static const int XTS_XATTR_REPLACE = 2;

/// renameat2(2) relative to directory descriptors (glibc 2.36 lacks a prototype here).
static inline int xts_renameat2_at(int olddir, const char *from, int newdir, const char *to, unsigned int flags) {
    return (int)syscall(SYS_renameat2, olddir, from, newdir, to, flags);
}

/// fchmodat2(2) (Linux 6.6): chmod through an O_PATH descriptor with AT_EMPTY_PATH,
/// never following a symlink. -1/ENOSYS on older kernels.
static inline int xts_fchmodat2(int dirfd, const char *name, mode_t mode, int flags) {
#ifndef SYS_fchmodat2
#define SYS_fchmodat2 452
#endif
    return (int)syscall(SYS_fchmodat2, dirfd, name, mode, flags);
}

extern int fallocate(int fd, int mode, off_t offset, off_t len);
static inline int xts_fallocate(int fd, int mode, long long offset, long long len) {
    return fallocate(fd, mode, (off_t)offset, (off_t)len);
}

// getdents64(2) with a buffer of the caller's size (tests list with small ones).
static inline long xts_getdents64(int fd, void *buf, size_t len) {
    return syscall(SYS_getdents64, fd, buf, len);
}

/// syncfs(2): one flush of the whole backing filesystem (the rekey's batches).
static inline int xts_syncfs(int fd) {
    return (int)syscall(SYS_syncfs, fd);
}

#define XTS_RENAME_NOREPLACE 1
#define XTS_RENAME_EXCHANGE 2

static inline int xts_renameat2(const char *from, const char *to, unsigned int flags) {
    return (int)syscall(SYS_renameat2, AT_FDCWD, from, AT_FDCWD, to, flags);
}

static inline int xts_set_undumpable(void) {
    return prctl(PR_SET_DUMPABLE, 0, 0, 0, 0);
}
static inline int xts_statvfs(const char *path, struct statvfs *out) {
    return statvfs(path, out);
}
extern int pthread_rwlockattr_setkind_np(pthread_rwlockattr_t *attr, int pref);

/// A reader-writer lock that lets a waiting writer in before new readers
/// (PTHREAD_RWLOCK_PREFER_WRITER_NONRECURSIVE_NP = 2): glibc's default prefers readers,
/// and a stream of reads could starve a write forever.
static inline int xts_rwlock_init_writer_first(pthread_rwlock_t *lock) {
    pthread_rwlockattr_t attr;
    pthread_rwlockattr_init(&attr);
    pthread_rwlockattr_setkind_np(&attr, 2);
    int r = pthread_rwlock_init(lock, &attr);
    pthread_rwlockattr_destroy(&attr);
    return r;
}

static inline int xts_pipe_cloexec(int fds[2]) {
    return pipe2(fds, O_CLOEXEC);
}

// syslog is variadic: Swift cannot call it.
static inline void xts_syslog(int priority, const char *message) {
    syslog(priority, "%s", message);
}

extern int posix_spawn_file_actions_addclosefrom_np(posix_spawn_file_actions_t *, int);

/// posix_spawn attributes for the mount daemon: its own session, an empty signal mask
/// and default handlers (a Swift parent may have signals blocked, and a child inherits that).
static inline int xts_spawn_daemon(pid_t *pid, const char *path, char *const argv[], char *const envp[],
                                   int key_fd, int status_fd) {
    posix_spawnattr_t attr;
    posix_spawn_file_actions_t fa;
    sigset_t empty, defaults;
    int r;
    posix_spawnattr_init(&attr);
    posix_spawn_file_actions_init(&fa);
    sigemptyset(&empty);
    sigemptyset(&defaults);
    sigaddset(&defaults, SIGTERM); sigaddset(&defaults, SIGINT); sigaddset(&defaults, SIGHUP);
    sigaddset(&defaults, SIGPIPE); sigaddset(&defaults, SIGQUIT);
    posix_spawnattr_setsigmask(&attr, &empty);
    posix_spawnattr_setsigdefault(&attr, &defaults);
    posix_spawnattr_setflags(&attr, POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSIGDEF | POSIX_SPAWN_SETSID);
    posix_spawn_file_actions_addopen(&fa, 0, "/dev/null", O_RDONLY, 0);
    posix_spawn_file_actions_adddup2(&fa, key_fd, 3);
    posix_spawn_file_actions_adddup2(&fa, status_fd, 4);
    // Nothing else of the caller's: an inherited pipe or socket would make whoever waits
    // on it (a shell's $(...), a test harness) wait for the daemon's whole life.
    posix_spawn_file_actions_addclosefrom_np(&fa, 5);
    r = posix_spawn(pid, path, &fa, &attr, argv, envp);
    posix_spawn_file_actions_destroy(&fa);
    posix_spawnattr_destroy(&attr);
    return r;
}

/// Runs a program and waits for it; returns its exit status, or -1.
static inline int xts_run(const char *path, char *const argv[], char *const envp[], int quiet) {
    pid_t pid;
    int status;
    posix_spawnattr_t attr;
    posix_spawn_file_actions_t fa;
    sigset_t empty;
    posix_spawnattr_init(&attr);
    posix_spawn_file_actions_init(&fa);
    if (quiet) posix_spawn_file_actions_addopen(&fa, 2, "/dev/null", O_WRONLY, 0);
    sigemptyset(&empty);
    posix_spawnattr_setsigmask(&attr, &empty);
    posix_spawnattr_setflags(&attr, POSIX_SPAWN_SETSIGMASK);
    int r = posix_spawnp(&pid, path, &fa, &attr, argv, envp);
    posix_spawn_file_actions_destroy(&fa);
    posix_spawnattr_destroy(&attr);
    if (r != 0) return -1;
    while (waitpid(pid, &status, 0) < 0) { if (errno != EINTR) return -1; }
    return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}
// ---- header-safety branch: privileges of the mount daemon (capabilities, no_new_privs,
// the unmount helper). Kept in one block so that parallel work on this file merges. ----
#include <stdint.h>
#include <linux/capability.h>

static inline int xts_set_no_new_privs(void) {
    return prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0);
}

/// The calling thread's permitted capabilities (bits 0-63), or -1 with errno.
static inline int xts_cap_permitted(uint64_t *permitted) {
    struct __user_cap_header_struct hdr = { _LINUX_CAPABILITY_VERSION_3, 0 };
    struct __user_cap_data_struct data[2];
    if (syscall(SYS_capget, &hdr, data) != 0) return -1;
    *permitted = ((uint64_t)data[1].permitted << 32) | data[0].permitted;
    return 0;
}

/// Keeps only `keep` (intersected with what the thread has) as permitted and effective
/// capabilities, and clears the inheritable set (which clears the ambient set too).
/// Per thread: call it before creating the threads that must inherit it.
static inline int xts_cap_limit(uint64_t keep) {
    uint64_t have;
    if (xts_cap_permitted(&have) != 0) return -1;
    uint64_t set = have & keep;
    struct __user_cap_header_struct hdr = { _LINUX_CAPABILITY_VERSION_3, 0 };
    struct __user_cap_data_struct data[2];
    data[0].permitted = data[0].effective = (uint32_t)set;
    data[1].permitted = data[1].effective = (uint32_t)(set >> 32);
    data[0].inheritable = data[1].inheritable = 0;
    return (int)syscall(SYS_capset, &hdr, data);
}

/// Starts the unmount helper: `read_fd` becomes its standard input, /dev/null its output
/// and error (it must not hold the caller's pipes open), nothing else is inherited.
static inline int xts_spawn_helper(pid_t *pid, const char *path, char *const argv[], char *const envp[], int read_fd) {
    posix_spawnattr_t attr;
    posix_spawn_file_actions_t fa;
    sigset_t empty;
    int r;
    posix_spawnattr_init(&attr);
    posix_spawn_file_actions_init(&fa);
    sigemptyset(&empty);
    posix_spawnattr_setsigmask(&attr, &empty);
    posix_spawnattr_setflags(&attr, POSIX_SPAWN_SETSIGMASK);
    posix_spawn_file_actions_adddup2(&fa, read_fd, 0);
    posix_spawn_file_actions_addopen(&fa, 1, "/dev/null", O_WRONLY, 0);
    posix_spawn_file_actions_addopen(&fa, 2, "/dev/null", O_WRONLY, 0);
    posix_spawn_file_actions_addclosefrom_np(&fa, 3);
    r = posix_spawn(pid, path, &fa, &attr, argv, envp);
    posix_spawn_file_actions_destroy(&fa);
    posix_spawnattr_destroy(&attr);
    return r;
}
// ---- end of the header-safety block ----
// ---- key providers ----
/// Starts `/bin/sh -c command` for the command key provider: `out_fd` becomes its standard
/// output, its standard input is /dev/null, standard error is inherited (so the program can
/// talk to the user), nothing else above 2 is inherited, signals are unblocked.
static inline int xts_spawn_capture(pid_t *pid, char *const argv[], char *const envp[], int out_fd) {
    posix_spawnattr_t attr;
    posix_spawn_file_actions_t fa;
    sigset_t empty;
    int r;
    posix_spawnattr_init(&attr);
    posix_spawn_file_actions_init(&fa);
    sigemptyset(&empty);
    posix_spawnattr_setsigmask(&attr, &empty);
    posix_spawnattr_setflags(&attr, POSIX_SPAWN_SETSIGMASK);
    posix_spawn_file_actions_addopen(&fa, 0, "/dev/null", O_RDONLY, 0);
    posix_spawn_file_actions_adddup2(&fa, out_fd, 1);
    posix_spawn_file_actions_addclosefrom_np(&fa, 3);
    r = posix_spawn(pid, "/bin/sh", &fa, &attr, argv, envp);
    posix_spawn_file_actions_destroy(&fa);
    posix_spawnattr_destroy(&attr);
    return r;
}
// ---- end of the key providers block ----
// statx(2) for a birth time, through the raw system call: glibc declares statx only with
// _GNU_SOURCE. Returns 0 and fills the outputs when the filesystem records a birth time;
// -1 otherwise.
#include <linux/stat.h>
static inline int xtsfs_birth_identity(int fd, uint64_t *dev, uint64_t *ino, int64_t *sec, uint32_t *nsec) {
    struct statx sx;
    if (syscall(SYS_statx, fd, "", AT_EMPTY_PATH | AT_SYMLINK_NOFOLLOW, STATX_INO | STATX_BTIME, &sx) != 0) return -1;
    if (!(sx.stx_mask & STATX_BTIME)) return -1;
    *dev = ((uint64_t)sx.stx_dev_major << 32) | sx.stx_dev_minor;
    *ino = sx.stx_ino;
    *sec = sx.stx_btime.tv_sec;
    *nsec = sx.stx_btime.tv_nsec;
    return 0;
}

#endif
