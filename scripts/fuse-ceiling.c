/*
 * fuse-ceiling: a FUSE filesystem that passes every request through to a backing
 * directory, with no encryption: what FUSE itself costs on this machine, for
 * scripts/fsbench (its "ceiling" row). Not part of xtsfs; written for the benchmark.
 *
 *   fuse-ceiling BACKING_DIR MOUNTPOINT [-f] [-o OPTIONS] [--no-writeback]
 *
 * It serves the requests the benchmark's workloads make with the same FUSE settings
 * xtsfs uses: the low-level API on several threads (one /dev/fuse clone each), 1 MiB
 * requests, READDIRPLUS, names and attributes cached for 10 s, file pages kept across
 * opens, and the writeback cache (unless --no-writeback). It has no extended
 * attributes: the first xattr request gets ENOSYS, after which the kernel asks no more
 * (securefs does the same; xtsfs answers them). Objects are found by an O_PATH
 * descriptor per backing inode, as xtsfs does; nothing follows a symlink.
 * Build: cc -O2 -Wall fuse-ceiling.c $(pkg-config --cflags --libs fuse3) -o fuse-ceiling
 */
#define FUSE_USE_VERSION 312
#define _GNU_SOURCE
#include <fuse_lowlevel.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <sys/types.h>
#include <unistd.h>

struct node {
    struct node *next;
    dev_t dev;
    ino_t ino;
    int fd;             /* O_PATH */
    uint64_t nlookup;
};

#define BUCKETS 65536
static struct node *buckets[BUCKETS];
static pthread_mutex_t table_lock = PTHREAD_MUTEX_INITIALIZER;
static struct node root;
static const double cache_seconds = 10.0;
static int writeback = 1;

static struct node *node_of(fuse_ino_t ino) { return ino == FUSE_ROOT_ID ? &root : (struct node *)(uintptr_t)ino; }
static fuse_ino_t id_of(struct node *n) { return n == &root ? FUSE_ROOT_ID : (fuse_ino_t)(uintptr_t)n; }
static size_t bucket(dev_t dev, ino_t ino) { return (size_t)((ino * 0x9E3779B97F4A7C15ULL) ^ dev) % BUCKETS; }

static void proc_path(int fd, char *out) { snprintf(out, 64, "/proc/self/fd/%d", fd); }

/* Looks `name` up in `parent`, taking one lookup reference on its node. */
static int do_lookup(fuse_ino_t parent, const char *name, struct fuse_entry_param *e) {
    memset(e, 0, sizeof *e);
    e->attr_timeout = e->entry_timeout = cache_seconds;
    int fd = openat(node_of(parent)->fd, name, O_PATH | O_NOFOLLOW | O_CLOEXEC);
    if (fd < 0) return errno;
    if (fstatat(fd, "", &e->attr, AT_EMPTY_PATH | AT_SYMLINK_NOFOLLOW) != 0) {
        int err = errno;
        close(fd);
        return err;
    }
    pthread_mutex_lock(&table_lock);
    size_t b = bucket(e->attr.st_dev, e->attr.st_ino);
    struct node *n = buckets[b];
    while (n && !(n->dev == e->attr.st_dev && n->ino == e->attr.st_ino)) n = n->next;
    if (n) {
        n->nlookup++;
        close(fd);
    } else {
        n = calloc(1, sizeof *n);
        if (!n) { pthread_mutex_unlock(&table_lock); close(fd); return ENOMEM; }
        n->dev = e->attr.st_dev; n->ino = e->attr.st_ino; n->fd = fd; n->nlookup = 1;
        n->next = buckets[b];
        buckets[b] = n;
    }
    pthread_mutex_unlock(&table_lock);
    e->ino = id_of(n);
    return 0;
}

static void forget_one(fuse_ino_t ino, uint64_t count) {
    struct node *n = node_of(ino);
    if (n == &root) return;
    pthread_mutex_lock(&table_lock);
    if (n->nlookup > count) { n->nlookup -= count; pthread_mutex_unlock(&table_lock); return; }
    struct node **p = &buckets[bucket(n->dev, n->ino)];
    while (*p && *p != n) p = &(*p)->next;
    if (*p) *p = n->next;
    pthread_mutex_unlock(&table_lock);
    close(n->fd);
    free(n);
}

static void op_init(void *userdata, struct fuse_conn_info *conn) {
    (void)userdata;
    if (writeback && (conn->capable & FUSE_CAP_WRITEBACK_CACHE)) conn->want |= FUSE_CAP_WRITEBACK_CACHE;
    if (conn->capable & FUSE_CAP_READDIRPLUS) conn->want |= FUSE_CAP_READDIRPLUS;
    conn->want &= ~FUSE_CAP_READDIRPLUS_AUTO;
}

static void reply_entry_or_error(fuse_req_t req, fuse_ino_t parent, const char *name) {
    struct fuse_entry_param e;
    int err = do_lookup(parent, name, &e);
    if (err) fuse_reply_err(req, err); else fuse_reply_entry(req, &e);
}

static void op_lookup(fuse_req_t req, fuse_ino_t parent, const char *name) {
    struct fuse_entry_param e;
    int err = do_lookup(parent, name, &e);
    if (err == ENOENT) { e.ino = 0; e.entry_timeout = cache_seconds; fuse_reply_entry(req, &e); }
    else if (err) fuse_reply_err(req, err);
    else fuse_reply_entry(req, &e);
}

static void op_forget(fuse_req_t req, fuse_ino_t ino, uint64_t nlookup) { forget_one(ino, nlookup); fuse_reply_none(req); }

static void op_forget_multi(fuse_req_t req, size_t count, struct fuse_forget_data *forgets) {
    for (size_t i = 0; i < count; i++) forget_one(forgets[i].ino, forgets[i].nlookup);
    fuse_reply_none(req);
}

static void op_getattr(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi) {
    (void)fi;
    struct stat st;
    if (fstatat(node_of(ino)->fd, "", &st, AT_EMPTY_PATH | AT_SYMLINK_NOFOLLOW) != 0) { fuse_reply_err(req, errno); return; }
    fuse_reply_attr(req, &st, cache_seconds);
}

static void op_setattr(fuse_req_t req, fuse_ino_t ino, struct stat *attr, int valid, struct fuse_file_info *fi) {
    struct node *n = node_of(ino);
    char path[64];
    proc_path(n->fd, path);
    int r = 0;
    if (valid & FUSE_SET_ATTR_MODE) r = chmod(path, attr->st_mode);
    if (!r && (valid & (FUSE_SET_ATTR_UID | FUSE_SET_ATTR_GID)))
        r = fchownat(n->fd, "", (valid & FUSE_SET_ATTR_UID) ? attr->st_uid : (uid_t)-1,
                     (valid & FUSE_SET_ATTR_GID) ? attr->st_gid : (gid_t)-1, AT_EMPTY_PATH | AT_SYMLINK_NOFOLLOW);
    if (!r && (valid & FUSE_SET_ATTR_SIZE)) r = fi ? ftruncate((int)fi->fh, attr->st_size) : truncate(path, attr->st_size);
    if (!r && (valid & (FUSE_SET_ATTR_ATIME | FUSE_SET_ATTR_MTIME))) {
        struct timespec tv[2] = {{0, UTIME_OMIT}, {0, UTIME_OMIT}};
        if (valid & FUSE_SET_ATTR_ATIME_NOW) tv[0].tv_nsec = UTIME_NOW; else if (valid & FUSE_SET_ATTR_ATIME) tv[0] = attr->st_atim;
        if (valid & FUSE_SET_ATTR_MTIME_NOW) tv[1].tv_nsec = UTIME_NOW; else if (valid & FUSE_SET_ATTR_MTIME) tv[1] = attr->st_mtim;
        r = fi ? futimens((int)fi->fh, tv) : utimensat(AT_FDCWD, path, tv, 0);
    }
    if (r) { fuse_reply_err(req, errno); return; }
    op_getattr(req, ino, fi);
}

struct dir_handle { DIR *dir; off_t offset; struct dirent *entry; };

static void op_opendir(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi) {
    struct dir_handle *d = calloc(1, sizeof *d);
    int fd = openat(node_of(ino)->fd, ".", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (!d || fd < 0 || !(d->dir = fdopendir(fd))) {
        int err = d ? errno : ENOMEM;
        if (fd >= 0) close(fd);
        free(d);
        fuse_reply_err(req, err);
        return;
    }
    fi->fh = (uint64_t)(uintptr_t)d;
    fi->keep_cache = 1;
    fi->cache_readdir = 1;
    fuse_reply_open(req, fi);
}

static void readdir_common(fuse_req_t req, fuse_ino_t ino, size_t size, off_t offset, struct fuse_file_info *fi, int plus) {
    struct dir_handle *d = (struct dir_handle *)(uintptr_t)fi->fh;
    char *buf = malloc(size), *p = buf;
    size_t left = size;
    if (!buf) { fuse_reply_err(req, ENOMEM); return; }
    if (offset != d->offset) { seekdir(d->dir, offset); d->entry = NULL; d->offset = offset; }
    for (;;) {
        if (!d->entry) {
            errno = 0;
            d->entry = readdir(d->dir);
            if (!d->entry) break;
        }
        struct dirent *de = d->entry;
        size_t used;
        if (plus) {
            struct fuse_entry_param e;
            int dots = strcmp(de->d_name, ".") == 0 || strcmp(de->d_name, "..") == 0;
            if (dots) {
                memset(&e, 0, sizeof e);
                e.attr.st_ino = de->d_ino;
                e.attr.st_mode = (mode_t)de->d_type << 12;
            } else if (do_lookup(ino, de->d_name, &e) != 0) {
                d->entry = NULL; d->offset = de->d_off;
                continue;
            }
            used = fuse_add_direntry_plus(req, p, left, de->d_name, &e, de->d_off);
            if (used > left) {
                if (!dots) forget_one(e.ino, 1);
                break;
            }
        } else {
            struct stat st = {.st_ino = de->d_ino, .st_mode = (mode_t)de->d_type << 12};
            used = fuse_add_direntry(req, p, left, de->d_name, &st, de->d_off);
            if (used > left) break;
        }
        p += used; left -= used;
        d->offset = de->d_off;
        d->entry = NULL;
    }
    fuse_reply_buf(req, buf, size - left);
    free(buf);
}

static void op_readdir(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off, struct fuse_file_info *fi) { readdir_common(req, ino, size, off, fi, 0); }
static void op_readdirplus(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off, struct fuse_file_info *fi) { readdir_common(req, ino, size, off, fi, 1); }

static void op_releasedir(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi) {
    (void)ino;
    struct dir_handle *d = (struct dir_handle *)(uintptr_t)fi->fh;
    closedir(d->dir);
    free(d);
    fuse_reply_err(req, 0);
}

static void op_mkdir(fuse_req_t req, fuse_ino_t parent, const char *name, mode_t mode) {
    if (mkdirat(node_of(parent)->fd, name, mode) != 0) { fuse_reply_err(req, errno); return; }
    reply_entry_or_error(req, parent, name);
}

static void op_unlink(fuse_req_t req, fuse_ino_t parent, const char *name) {
    fuse_reply_err(req, unlinkat(node_of(parent)->fd, name, 0) ? errno : 0);
}

static void op_rmdir(fuse_req_t req, fuse_ino_t parent, const char *name) {
    fuse_reply_err(req, unlinkat(node_of(parent)->fd, name, AT_REMOVEDIR) ? errno : 0);
}

static void op_rename(fuse_req_t req, fuse_ino_t parent, const char *name, fuse_ino_t newparent, const char *newname, unsigned int flags) {
    if (flags) { fuse_reply_err(req, EINVAL); return; }
    fuse_reply_err(req, renameat(node_of(parent)->fd, name, node_of(newparent)->fd, newname) ? errno : 0);
}

static void op_symlink(fuse_req_t req, const char *link, fuse_ino_t parent, const char *name) {
    if (symlinkat(link, node_of(parent)->fd, name) != 0) { fuse_reply_err(req, errno); return; }
    reply_entry_or_error(req, parent, name);
}

static void op_readlink(fuse_req_t req, fuse_ino_t ino) {
    char buf[PATH_MAX + 1];
    ssize_t n = readlinkat(node_of(ino)->fd, "", buf, PATH_MAX);
    if (n < 0) { fuse_reply_err(req, errno); return; }
    buf[n] = 0;
    fuse_reply_readlink(req, buf);
}

static void op_link(fuse_req_t req, fuse_ino_t ino, fuse_ino_t newparent, const char *newname) {
    char path[64];
    proc_path(node_of(ino)->fd, path);
    if (linkat(AT_FDCWD, path, node_of(newparent)->fd, newname, AT_SYMLINK_FOLLOW) != 0) { fuse_reply_err(req, errno); return; }
    reply_entry_or_error(req, newparent, newname);
}

/* With the writeback cache the kernel may read pages of a file opened write-only, and
 * does O_APPEND itself. */
static int backing_flags(int flags) {
    if (writeback) {
        if ((flags & O_ACCMODE) == O_WRONLY) flags = (flags & ~O_ACCMODE) | O_RDWR;
        flags &= ~O_APPEND;
    }
    return (flags & ~O_NOFOLLOW) | O_CLOEXEC;
}

static void op_create(fuse_req_t req, fuse_ino_t parent, const char *name, mode_t mode, struct fuse_file_info *fi) {
    int fd = openat(node_of(parent)->fd, name, backing_flags(fi->flags) | O_CREAT | O_NOFOLLOW, mode);
    if (fd < 0) { fuse_reply_err(req, errno); return; }
    struct fuse_entry_param e;
    int err = do_lookup(parent, name, &e);
    if (err) { close(fd); fuse_reply_err(req, err); return; }
    fi->fh = (uint64_t)fd;
    fi->keep_cache = 1;
    fuse_reply_create(req, &e, fi);
}

static void op_open(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi) {
    char path[64];
    proc_path(node_of(ino)->fd, path);
    int fd = open(path, backing_flags(fi->flags));
    if (fd < 0) { fuse_reply_err(req, errno); return; }
    fi->fh = (uint64_t)fd;
    fi->keep_cache = 1;
    fuse_reply_open(req, fi);
}

static void op_read(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off, struct fuse_file_info *fi) {
    (void)ino;
    char *buf = malloc(size ? size : 1);
    if (!buf) { fuse_reply_err(req, ENOMEM); return; }
    ssize_t n = pread((int)fi->fh, buf, size, off);
    if (n < 0) fuse_reply_err(req, errno); else fuse_reply_buf(req, buf, (size_t)n);
    free(buf);
}

static void op_write(fuse_req_t req, fuse_ino_t ino, const char *buf, size_t size, off_t off, struct fuse_file_info *fi) {
    (void)ino;
    ssize_t n = pwrite((int)fi->fh, buf, size, off);
    if (n < 0) fuse_reply_err(req, errno); else fuse_reply_write(req, (size_t)n);
}

static void op_flush(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi) { (void)ino; (void)fi; fuse_reply_err(req, 0); }

static void op_release(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi) {
    (void)ino;
    close((int)fi->fh);
    fuse_reply_err(req, 0);
}

static void op_fsync(fuse_req_t req, fuse_ino_t ino, int datasync, struct fuse_file_info *fi) {
    (void)ino;
    int fd = (int)fi->fh;
    fuse_reply_err(req, (datasync ? fdatasync(fd) : fsync(fd)) ? errno : 0);
}

static void op_statfs(fuse_req_t req, fuse_ino_t ino) {
    struct statvfs sv;
    if (fstatvfs(node_of(ino)->fd, &sv) != 0) { fuse_reply_err(req, errno); return; }
    fuse_reply_statfs(req, &sv);
}

static const struct fuse_lowlevel_ops ops = {
    .init = op_init, .lookup = op_lookup, .forget = op_forget, .forget_multi = op_forget_multi,
    .getattr = op_getattr, .setattr = op_setattr, .opendir = op_opendir, .readdir = op_readdir,
    .readdirplus = op_readdirplus, .releasedir = op_releasedir, .mkdir = op_mkdir, .unlink = op_unlink,
    .rmdir = op_rmdir, .rename = op_rename, .symlink = op_symlink, .readlink = op_readlink, .link = op_link,
    .create = op_create, .open = op_open, .read = op_read, .write = op_write, .flush = op_flush,
    .release = op_release, .fsync = op_fsync, .statfs = op_statfs,
};

int main(int argc, char *argv[]) {
    if (argc < 3) {
        fprintf(stderr, "usage: %s BACKING_DIR MOUNTPOINT [-f] [-o OPTIONS] [--no-writeback]\n", argv[0]);
        return 2;
    }
    const char *backing = argv[1];
    /* libfuse parses the rest (mount point, -f, -o); --no-writeback is ours. */
    char **rest = calloc((size_t)argc + 1, sizeof *rest);
    int n = 0;
    rest[n++] = argv[0];
    for (int i = 2; i < argc; i++) {
        if (strcmp(argv[i], "--no-writeback") == 0) writeback = 0; else rest[n++] = argv[i];
    }
    struct fuse_args args = FUSE_ARGS_INIT(n, rest);
    struct fuse_cmdline_opts opts;
    if (fuse_parse_cmdline(&args, &opts) != 0 || !opts.mountpoint) { fprintf(stderr, "fuse-ceiling: bad arguments\n"); return 2; }
    root.fd = open(backing, O_PATH | O_DIRECTORY | O_CLOEXEC);
    if (root.fd < 0) { perror(backing); return 1; }
    root.nlookup = 2;
    struct fuse_session *se = fuse_session_new(&args, &ops, sizeof ops, NULL);
    if (!se || fuse_set_signal_handlers(se) != 0 || fuse_session_mount(se, opts.mountpoint) != 0) return 1;
    fuse_daemonize(opts.foreground);
    struct fuse_loop_config *cfg = fuse_loop_cfg_create();
    fuse_loop_cfg_set_clone_fd(cfg, 1);
    fuse_loop_cfg_set_max_threads(cfg, 8);
    int r = fuse_session_loop_mt(se, cfg);
    fuse_loop_cfg_destroy(cfg);
    fuse_session_unmount(se);
    fuse_remove_signal_handlers(se);
    fuse_session_destroy(se);
    return r ? 1 : 0;
}
