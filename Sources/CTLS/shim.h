#ifndef XTS_TLS_SHIM_H
#define XTS_TLS_SHIM_H
// Mutual TLS to a KMIP server with OpenSSL's libssl: connect with a deadline, verify the
// server against the CA file (and its name or IP address), present the client
// certificate. The KMIP client (TTLV) is Swift; this file only does the socket and TLS
// calls, several of which are macros Swift cannot import.
#include <openssl/ssl.h>
#include <openssl/err.h>
#include <openssl/x509v3.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <netdb.h>
#include <poll.h>
#include <fcntl.h>
#include <unistd.h>
#include <errno.h>
#include <string.h>
#include <stdio.h>
#include <arpa/inet.h>

typedef struct { SSL_CTX *ctx; SSL *ssl; int fd; } xts_tls;

enum { XTS_TLS_OK = 0, XTS_TLS_CONNECT = 1, XTS_TLS_SETUP = 2, XTS_TLS_HANDSHAKE = 3, XTS_TLS_TIMEOUT = 4 };

static inline void xts_tls_error(char *err, size_t n, const char *what) {
    unsigned long e = ERR_get_error();
    char buf[256] = "";
    if (e) ERR_error_string_n(e, buf, sizeof buf);
    snprintf(err, n, "%s%s%s", what, e ? ": " : "", buf);
    ERR_clear_error();
}

static inline void xts_tls_close(xts_tls *t) {
    if (t->ssl) { SSL_shutdown(t->ssl); SSL_free(t->ssl); }
    if (t->ctx) SSL_CTX_free(t->ctx);
    if (t->fd >= 0) close(t->fd);
    t->ssl = NULL; t->ctx = NULL; t->fd = -1;
}

/* Connects within timeout_ms, then bounds every read and write by it too. */
static inline int xts_tls_connect(xts_tls *t, const char *host, const char *port, const char *ca, const char *cert,
                                  const char *key, int timeout_ms, char *err, size_t errlen) {
    t->ctx = NULL; t->ssl = NULL; t->fd = -1;
    struct addrinfo hints, *res = NULL, *ai;
    memset(&hints, 0, sizeof hints);
    hints.ai_socktype = SOCK_STREAM;
    int g = getaddrinfo(host, port, &hints, &res);
    if (g != 0) { snprintf(err, errlen, "cannot resolve %s: %s", host, gai_strerror(g)); return XTS_TLS_CONNECT; }
    int last = ECONNREFUSED, timed_out = 0;
    for (ai = res; ai && t->fd < 0; ai = ai->ai_next) {
        int fd = socket(ai->ai_family, ai->ai_socktype | SOCK_CLOEXEC | SOCK_NONBLOCK, ai->ai_protocol);
        if (fd < 0) { last = errno; continue; }
        if (connect(fd, ai->ai_addr, ai->ai_addrlen) != 0) {
            if (errno != EINPROGRESS) { last = errno; close(fd); continue; }
            struct pollfd p = { fd, POLLOUT, 0 };
            int r;
            do { r = poll(&p, 1, timeout_ms); } while (r < 0 && errno == EINTR);
            if (r == 0) { timed_out = 1; last = ETIMEDOUT; close(fd); continue; }
            int soerr = 0; socklen_t sl = sizeof soerr;
            getsockopt(fd, SOL_SOCKET, SO_ERROR, &soerr, &sl);
            if (r < 0 || soerr) { last = r < 0 ? errno : soerr; close(fd); continue; }
        }
        fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) & ~O_NONBLOCK);
        struct timeval tv = { timeout_ms / 1000, (timeout_ms % 1000) * 1000 };
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
        setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
        t->fd = fd;
    }
    freeaddrinfo(res);
    if (t->fd < 0) {
        snprintf(err, errlen, "cannot connect to the KMIP server %s:%s: %s", host, port, strerror(last));
        return timed_out ? XTS_TLS_TIMEOUT : XTS_TLS_CONNECT;
    }
    t->ctx = SSL_CTX_new(TLS_client_method());
    if (!t->ctx) { xts_tls_error(err, errlen, "TLS setup"); return XTS_TLS_SETUP; }
    SSL_CTX_set_min_proto_version(t->ctx, TLS1_2_VERSION);
    if (SSL_CTX_load_verify_locations(t->ctx, ca, NULL) != 1) { xts_tls_error(err, errlen, "cannot load the KMIP CA file"); return XTS_TLS_SETUP; }
    if (SSL_CTX_use_certificate_chain_file(t->ctx, cert) != 1) { xts_tls_error(err, errlen, "cannot load the KMIP client certificate"); return XTS_TLS_SETUP; }
    if (SSL_CTX_use_PrivateKey_file(t->ctx, key, SSL_FILETYPE_PEM) != 1 || SSL_CTX_check_private_key(t->ctx) != 1) {
        xts_tls_error(err, errlen, "cannot load the KMIP client key (or it does not match the certificate)"); return XTS_TLS_SETUP;
    }
    SSL_CTX_set_verify(t->ctx, SSL_VERIFY_PEER, NULL);
    t->ssl = SSL_new(t->ctx);
    if (!t->ssl) { xts_tls_error(err, errlen, "TLS setup"); return XTS_TLS_SETUP; }
    X509_VERIFY_PARAM *param = SSL_get0_param(t->ssl);
    unsigned char ipbuf[16];
    if (inet_pton(AF_INET, host, ipbuf) == 1 || inet_pton(AF_INET6, host, ipbuf) == 1) X509_VERIFY_PARAM_set1_ip_asc(param, host);
    else { X509_VERIFY_PARAM_set1_host(param, host, 0); SSL_set_tlsext_host_name(t->ssl, host); }
    SSL_set_fd(t->ssl, t->fd);
    if (SSL_connect(t->ssl) != 1) {
        long v = SSL_get_verify_result(t->ssl);
        if (v != X509_V_OK) snprintf(err, errlen, "the KMIP server's certificate does not verify: %s", X509_verify_cert_error_string(v));
        else xts_tls_error(err, errlen, "TLS handshake with the KMIP server failed");
        return XTS_TLS_HANDSHAKE;
    }
    return XTS_TLS_OK;
}

/* Writes all of buf; 0 on success. */
static inline int xts_tls_write(xts_tls *t, const unsigned char *buf, int len) {
    int done = 0;
    while (done < len) {
        int n = SSL_write(t->ssl, buf + done, len - done);
        if (n <= 0) return -1;
        done += n;
    }
    return 0;
}

/* Reads exactly len bytes; 0 on success. */
static inline int xts_tls_read(xts_tls *t, unsigned char *buf, int len) {
    int done = 0;
    while (done < len) {
        int n = SSL_read(t->ssl, buf + done, len - done);
        if (n <= 0) return -1;
        done += n;
    }
    return 0;
}
#endif
