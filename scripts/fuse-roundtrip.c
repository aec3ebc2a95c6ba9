// One FUSE round trip, timed: scripts/fsbench runs this against an xtsfs mount, with the
// caller and the daemon on one CPU and on two, to show what a request costs on the
// machine before any work is done for it.
//
//   fuse-roundtrip FILE [COUNT]
//
// Asks for the security.capability attribute of FILE COUNT times (default 20000) and
// prints the mean time per call in microseconds. xtsfs answers that query itself,
// without a call to the backing filesystem, and the kernel does not cache the answer, so
// every call is one request to the daemon and its reply. A call that succeeds means the
// attribute is cached or present: then the figure measures nothing, and the program
// says so and fails.
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/xattr.h>
#include <time.h>

int main(int argc, char **argv) {
    if (argc < 2 || argc > 3) {
        fprintf(stderr, "usage: fuse-roundtrip FILE [COUNT]\n");
        return 2;
    }
    long count = argc == 3 ? strtol(argv[2], NULL, 10) : 20000;
    if (count < 1) count = 1;
    char value[64];
    for (int i = 0; i < 100; i++) getxattr(argv[1], "security.capability", value, sizeof value);
    struct timespec a, b;
    clock_gettime(CLOCK_MONOTONIC, &a);
    for (long i = 0; i < count; i++) {
        if (getxattr(argv[1], "security.capability", value, sizeof value) >= 0) {
            fprintf(stderr, "fuse-roundtrip: %s has security.capability: no round trip to time\n", argv[1]);
            return 1;
        }
        if (errno == ENOENT || errno == ENOTCONN || errno == EIO) {
            perror("fuse-roundtrip: getxattr");
            return 1;
        }
    }
    clock_gettime(CLOCK_MONOTONIC, &b);
    double ns = (double)(b.tv_sec - a.tv_sec) * 1e9 + (double)(b.tv_nsec - a.tv_nsec);
    printf("%.1f\n", ns / (double)count / 1000.0);
    return 0;
}
