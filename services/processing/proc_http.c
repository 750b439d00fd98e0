/* The webhook HTTP/1.1 client (see proc_http.h): URL parsing, name resolution bounded by the
 * call's deadline, non-blocking connect, TLS with peer verification, and a response reader
 * that understands Content-Length, chunked and read-until-close bodies. */
#include "proc_http.h"

#include <arpa/inet.h>
#include <ctype.h>
#include <errno.h>
#include <limits.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <openssl/x509v3.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <unistd.h>

#include "cm_alloc.h"
#include "cm_buf.h"
#include "cm_err.h"
#include "cm_time.h"

#define PROC__LINE_MAX 8192
#define PROC__MAX_INTERIM 8 /* 1xx answers skipped before the final one, at most */

struct proc_http_s {
    SSL_CTX *tls;
};

static int proc__err(char *err, size_t cap, int code, const char *fmt, ...) __attribute__((format(printf, 4, 5)));
static int proc__err(char *err, size_t cap, int code, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err, cap, fmt, ap);
    va_end(ap);
    return code;
}

proc_http_t *proc_http_new(const char *ca_file, int *err) {
    SSL_CTX *ctx = SSL_CTX_new(TLS_client_method());
    int ok = ctx != NULL;
    if (ok) {
        SSL_CTX_set_min_proto_version(ctx, TLS1_2_VERSION);
        SSL_CTX_set_verify(ctx, SSL_VERIFY_PEER, NULL);
        ok = ca_file ? SSL_CTX_load_verify_locations(ctx, ca_file, NULL) == 1 : SSL_CTX_set_default_verify_paths(ctx) == 1;
#ifdef SSL_OP_IGNORE_UNEXPECTED_EOF
        /* Many servers close without close_notify after a read-until-close body. That would let
         * an attacker cut such a body short, but only the status decides anything here. */
        SSL_CTX_set_options(ctx, SSL_OP_IGNORE_UNEXPECTED_EOF);
#endif
    }
    if (!ok) {
        ERR_clear_error();
        SSL_CTX_free(ctx);
        if (err) *err = CM_ETLS;
        return NULL;
    }
    proc_http_t *h = cm_calloc(1, sizeof *h);
    h->tls = ctx;
    return h;
}

void proc_http_free(proc_http_t *h) {
    if (!h) return;
    SSL_CTX_free(h->tls);
    cm_free(h);
}

void proc_http_resp_free(proc_http_resp_t *resp) {
    if (!resp) return;
    cm_free(resp->body);
    resp->body = NULL;
    resp->body_len = 0;
}

/* ---- URLs -------------------------------------------------------------------------------- */

static int proc__name_char(int c) { return isalnum(c) || c == '.' || c == '-' || c == '_'; }

int proc_http_url_parse(const char *url, proc_http_url_t *u, char *err, size_t cap) {
    memset(u, 0, sizeof *u);
    if (!url || !*url) return proc__err(err, cap, CM_EINVAL, "empty URL");
    for (const unsigned char *c = (const unsigned char *)url; *c; c++)
        if (*c <= 0x20 || *c >= 0x7f) return proc__err(err, cap, CM_EINVAL, "URL contains a space, control or non-ASCII character");
    const char *p;
    if (strncasecmp(url, "http://", 7) == 0) {
        p = url + 7;
    } else if (strncasecmp(url, "https://", 8) == 0) {
        u->tls = 1;
        p = url + 8;
    } else {
        return proc__err(err, cap, CM_EINVAL, "not an http:// or https:// URL");
    }
    size_t alen = strcspn(p, "/?#");
    const char *aend = p + alen;
    if (memchr(p, '@', alen)) return proc__err(err, cap, CM_EINVAL, "user info (user@host) in a URL is not supported");
    const char *hend;
    if (*p == '[') {
        const char *rb = memchr(p, ']', alen);
        if (!rb) return proc__err(err, cap, CM_EINVAL, "IPv6 literal without its closing ']'");
        size_t hl = (size_t)(rb - p - 1);
        if (hl == 0 || hl >= sizeof u->host) return proc__err(err, cap, CM_EINVAL, "bad IPv6 literal");
        memcpy(u->host, p + 1, hl);
        struct in6_addr a6;
        if (inet_pton(AF_INET6, u->host, &a6) != 1) return proc__err(err, cap, CM_EINVAL, "bad IPv6 literal");
        u->ip = u->ipv6 = 1;
        hend = rb + 1;
        if (hend < aend && *hend != ':') return proc__err(err, cap, CM_EINVAL, "unexpected characters after the IPv6 literal");
    } else {
        const char *colon = memchr(p, ':', alen);
        hend = colon ? colon : aend;
        size_t hl = (size_t)(hend - p);
        if (hl == 0) return proc__err(err, cap, CM_EINVAL, "no host in URL");
        if (hl >= sizeof u->host) return proc__err(err, cap, CM_EINVAL, "host name longer than %zu characters", sizeof u->host - 1);
        for (size_t i = 0; i < hl; i++)
            if (!proc__name_char((unsigned char)p[i])) return proc__err(err, cap, CM_EINVAL, "bad character in host name");
        memcpy(u->host, p, hl);
        struct in_addr a4;
        u->ip = inet_pton(AF_INET, u->host, &a4) == 1;
    }
    const char *def = u->tls ? "443" : "80";
    if (hend < aend && aend - hend > 1) { /* ":port"; an empty port means the default (RFC 3986) */
        const char *ps = hend + 1;
        size_t pl = (size_t)(aend - ps);
        long v = 0;
        for (size_t i = 0; i < pl; i++) {
            if (!isdigit((unsigned char)ps[i]) || pl > 5) return proc__err(err, cap, CM_EINVAL, "bad port in URL");
            v = v * 10 + (ps[i] - '0');
        }
        if (v < 1 || v > 65535) return proc__err(err, cap, CM_EINVAL, "port %ld is not in 1..65535", v);
        snprintf(u->port, sizeof u->port, "%ld", v);
    } else {
        snprintf(u->port, sizeof u->port, "%s", def);
    }
    u->default_port = strcmp(u->port, def) == 0;
    u->path = aend;
    u->path_len = strcspn(aend, "#");
    return 0;
}

/* ---- the connection ---------------------------------------------------------------------- */

typedef struct proc__conn_s {
    int fd;
    SSL *ssl;
    int64_t deadline; /* CLOCK_MONOTONIC ns */
    int timeout_ms;
    const char *phase; /* for timeout messages: "connecting", "sending the request", ... */
    char where[300];   /* host:port, for messages */
    char *err;
    size_t cap;
} proc__conn_t;

/* Milliseconds to the deadline, rounded up so that a wait never ends just short of it. */
static int proc__left_ms(int64_t deadline) {
    int64_t ns = deadline - cm_mono_ns();
    if (ns <= 0) return 0;
    int64_t ms = (ns + 999999) / 1000000;
    return ms > INT_MAX ? INT_MAX : (int)ms;
}

/* Waits for events on fd until deadline: 1 ready (or in error: the next call says which), 0 time
 * is up. */
static int proc__wait(int fd, short events, int64_t deadline) {
    for (;;) {
        int ms = proc__left_ms(deadline);
        if (ms == 0) return 0;
        struct pollfd p = {fd, events, 0};
        int r = poll(&p, 1, ms);
        if (r > 0) return 1;
        if (r < 0 && errno != EINTR) return 1;
    }
}

static int proc__timed_out(proc__conn_t *c) {
    return proc__err(c->err, c->cap, CM_ETIMEOUT, "timed out after %d ms %s (%s)", c->timeout_ms, c->phase, c->where);
}

/* Name resolution on a helper thread, so that a hanging resolver cannot outlast the deadline:
 * on timeout the caller leaves and the thread frees the request when getaddrinfo returns. */
typedef struct proc__dns_s {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int refs, done, rc;
    struct addrinfo *ai;
    char host[256], port[6];
} proc__dns_t;

static void proc__dns_unref(proc__dns_t *d) {
    pthread_mutex_lock(&d->mu);
    int last = --d->refs == 0;
    pthread_mutex_unlock(&d->mu);
    if (!last) return;
    if (d->ai) freeaddrinfo(d->ai);
    pthread_cond_destroy(&d->cv);
    pthread_mutex_destroy(&d->mu);
    cm_free(d);
}

static void proc__dns_run(proc__dns_t *d) {
    struct addrinfo hints = {.ai_socktype = SOCK_STREAM, .ai_flags = AI_NUMERICSERV};
    struct addrinfo *ai = NULL;
    int rc = getaddrinfo(d->host, d->port, &hints, &ai);
    pthread_mutex_lock(&d->mu);
    d->rc = rc;
    d->ai = ai;
    d->done = 1;
    pthread_cond_signal(&d->cv);
    pthread_mutex_unlock(&d->mu);
}

static void *proc__dns_thread(void *arg) {
    proc__dns_run(arg);
    proc__dns_unref(arg);
    return NULL;
}

static int proc__resolve(proc__conn_t *c, const proc_http_url_t *u, struct addrinfo **out) {
    *out = NULL;
    if (u->ip) { /* a literal: getaddrinfo only converts it, nothing to wait for */
        struct addrinfo hints = {.ai_socktype = SOCK_STREAM, .ai_flags = AI_NUMERICHOST | AI_NUMERICSERV};
        int rc = getaddrinfo(u->host, u->port, &hints, out);
        return rc ? proc__err(c->err, c->cap, CM_EINVAL, "bad address %s: %s", u->host, gai_strerror(rc)) : 0;
    }
    proc__dns_t *d = cm_calloc(1, sizeof *d);
    pthread_mutex_init(&d->mu, NULL);
    cm_cond_init_monotonic(&d->cv);
    d->refs = 2;
    snprintf(d->host, sizeof d->host, "%s", u->host);
    snprintf(d->port, sizeof d->port, "%s", u->port);
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    pthread_t t;
    if (pthread_create(&t, &attr, proc__dns_thread, d) != 0) {
        d->refs = 1;
        proc__dns_run(d); /* no thread to spare: resolve here, unbounded by the deadline */
    }
    pthread_attr_destroy(&attr);
    pthread_mutex_lock(&d->mu);
    while (!d->done) {
        int ms = proc__left_ms(c->deadline);
        if (ms == 0) break;
        struct timespec ts;
        cm_abstime_in(&ts, ms);
        pthread_cond_timedwait(&d->cv, &d->mu, &ts);
    }
    int done = d->done, rc = d->rc;
    if (done && !rc) {
        *out = d->ai;
        d->ai = NULL;
    }
    pthread_mutex_unlock(&d->mu);
    proc__dns_unref(d);
    if (!done) {
        c->phase = "resolving the host name";
        return proc__timed_out(c);
    }
    if (rc) return proc__err(c->err, c->cap, CM_ENOTFOUND, "cannot resolve %s: %s", u->host, gai_strerror(rc));
    return 0;
}

/* Tries each address in turn; each gets an even share of the time left, so one address that
 * drops packets cannot use up the time of the ones after it. */
static int proc__connect(proc__conn_t *c, const struct addrinfo *ai) {
    int n = 0;
    for (const struct addrinfo *a = ai; a; a = a->ai_next) n++;
    int code = CM_EIO;
    c->phase = "connecting";
    proc__err(c->err, c->cap, CM_EIO, "cannot connect to %s: no address", c->where);
    for (const struct addrinfo *a = ai; a; a = a->ai_next, n--) {
        int64_t now = cm_mono_ns();
        if (now >= c->deadline) return proc__timed_out(c);
        int64_t until = now + (c->deadline - now) / n;
        int fd = socket(a->ai_family, a->ai_socktype | SOCK_NONBLOCK | SOCK_CLOEXEC, a->ai_protocol);
        if (fd < 0) {
            code = proc__err(c->err, c->cap, CM_EIO, "cannot connect to %s: %s", c->where, strerror(errno));
            continue;
        }
        int soerr = 0;
        if (connect(fd, a->ai_addr, a->ai_addrlen) != 0) {
            soerr = errno;
            if (soerr == EINPROGRESS) {
                socklen_t sl = sizeof soerr;
                if (!proc__wait(fd, POLLOUT, until))
                    soerr = ETIMEDOUT;
                else if (getsockopt(fd, SOL_SOCKET, SO_ERROR, &soerr, &sl) != 0)
                    soerr = errno;
            }
        }
        if (soerr == 0) {
            c->err[0] = 0; /* forget the addresses that failed before this one */
            int one = 1;
            setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
            c->fd = fd;
            return 0;
        }
        close(fd);
        if (soerr == ETIMEDOUT && cm_mono_ns() >= c->deadline) return proc__timed_out(c);
        code = proc__err(c->err, c->cap, CM_EIO, "cannot connect to %s: %s", c->where,
                         soerr == ETIMEDOUT ? "timed out" : strerror(soerr));
    }
    return code;
}

/* The reason OpenSSL gives for the last failure on this thread. */
static const char *proc__ssl_reason(int ssl_err) {
    unsigned long e = ERR_peek_last_error();
    const char *r = e ? ERR_reason_error_string(e) : NULL;
    if (r) return r;
    if (ssl_err == SSL_ERROR_SYSCALL) return errno ? strerror(errno) : "connection closed by the peer";
    return "TLS error";
}

static int proc__handshake(proc__conn_t *c, SSL_CTX *ctx, const proc_http_url_t *u) {
    c->phase = "in the TLS handshake";
    c->ssl = SSL_new(ctx);
    if (!c->ssl || !SSL_set_fd(c->ssl, c->fd)) {
        ERR_clear_error();
        return proc__err(c->err, c->cap, CM_ETLS, "cannot set up TLS for %s", c->where);
    }
    int ok;
    if (u->ip) { /* no SNI for addresses (RFC 6066); the certificate must name the address */
        ok = X509_VERIFY_PARAM_set1_ip_asc(SSL_get0_param(c->ssl), u->host) == 1;
    } else {
        ok = SSL_set_tlsext_host_name(c->ssl, u->host) == 1 && SSL_set1_host(c->ssl, u->host) == 1;
        SSL_set_hostflags(c->ssl, X509_CHECK_FLAG_NO_PARTIAL_WILDCARDS);
    }
    if (!ok) {
        ERR_clear_error();
        return proc__err(c->err, c->cap, CM_ETLS, "cannot set the name to verify for %s", c->where);
    }
    for (;;) {
        ERR_clear_error();
        errno = 0;
        int r = SSL_connect(c->ssl);
        if (r == 1) return 0;
        int e = SSL_get_error(c->ssl, r);
        if (e == SSL_ERROR_WANT_READ || e == SSL_ERROR_WANT_WRITE) {
            if (!proc__wait(c->fd, e == SSL_ERROR_WANT_READ ? POLLIN : POLLOUT, c->deadline)) return proc__timed_out(c);
            continue;
        }
        long v = SSL_get_verify_result(c->ssl);
        int code = v != X509_V_OK ? proc__err(c->err, c->cap, CM_ETLS, "TLS handshake with %s failed: certificate not trusted: %s",
                                              c->where, X509_verify_cert_error_string(v))
                                  : proc__err(c->err, c->cap, CM_ETLS, "TLS handshake with %s failed: %s", c->where,
                                              proc__ssl_reason(e));
        ERR_clear_error();
        return code;
    }
}

static int proc__write_all(proc__conn_t *c, const char *p, size_t n) {
    c->phase = "sending the request";
    while (n > 0) {
        size_t chunk = n > INT_MAX ? INT_MAX : n;
        if (c->ssl) {
            ERR_clear_error();
            errno = 0;
            int r = SSL_write(c->ssl, p, (int)chunk); /* a retry must repeat the same buffer: it does */
            if (r > 0) {
                p += r;
                n -= (size_t)r;
                continue;
            }
            int e = SSL_get_error(c->ssl, r);
            if (e == SSL_ERROR_WANT_READ || e == SSL_ERROR_WANT_WRITE) {
                if (!proc__wait(c->fd, e == SSL_ERROR_WANT_READ ? POLLIN : POLLOUT, c->deadline)) return proc__timed_out(c);
                continue;
            }
            int code = proc__err(c->err, c->cap, CM_EIO, "sending to %s failed: %s", c->where, proc__ssl_reason(e));
            ERR_clear_error();
            return code;
        }
        ssize_t r = send(c->fd, p, chunk, MSG_NOSIGNAL);
        if (r > 0) {
            p += r;
            n -= (size_t)r;
        } else if (r < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
            if (!proc__wait(c->fd, POLLOUT, c->deadline)) return proc__timed_out(c);
        } else if (r < 0 && errno != EINTR) {
            return proc__err(c->err, c->cap, CM_EIO, "sending to %s failed: %s", c->where, strerror(errno));
        }
    }
    return 0;
}

/* Up to cap bytes: > 0 read, 0 the peer closed, < 0 an error (err set). */
static int proc__read(proc__conn_t *c, char *buf, size_t cap) {
    int want = cap > INT_MAX ? INT_MAX : (int)cap;
    for (;;) {
        if (c->ssl) {
            ERR_clear_error();
            errno = 0;
            int r = SSL_read(c->ssl, buf, want);
            if (r > 0) return r;
            int e = SSL_get_error(c->ssl, r);
            if (e == SSL_ERROR_ZERO_RETURN || (e == SSL_ERROR_SYSCALL && errno == 0 && !ERR_peek_error())) return 0;
            if (e == SSL_ERROR_WANT_READ || e == SSL_ERROR_WANT_WRITE) {
                if (!proc__wait(c->fd, e == SSL_ERROR_WANT_READ ? POLLIN : POLLOUT, c->deadline)) return proc__timed_out(c);
                continue;
            }
            int code = proc__err(c->err, c->cap, CM_EIO, "reading from %s failed: %s", c->where, proc__ssl_reason(e));
            ERR_clear_error();
            return code;
        }
        ssize_t r = recv(c->fd, buf, (size_t)want, 0);
        if (r >= 0) return (int)r;
        if (errno == EAGAIN || errno == EWOULDBLOCK) {
            if (!proc__wait(c->fd, POLLIN, c->deadline)) return proc__timed_out(c);
        } else if (errno != EINTR) {
            return proc__err(c->err, c->cap, CM_EIO, "reading from %s failed: %s", c->where, strerror(errno));
        }
    }
}

/* ---- the response ------------------------------------------------------------------------ */

typedef struct proc__rd_s {
    proc__conn_t *c;
    size_t off, len;
    size_t seen; /* bytes received so far */
    char buf[PROC__LINE_MAX];
} proc__rd_t;

/* More bytes after what is buffered: 1, 0 at end of stream, < 0 error. */
static int proc__rd_fill(proc__rd_t *r) {
    if (r->off > 0) {
        memmove(r->buf, r->buf + r->off, r->len - r->off);
        r->len -= r->off;
        r->off = 0;
    }
    int n = proc__read(r->c, r->buf + r->len, sizeof r->buf - r->len);
    if (n <= 0) return n;
    r->len += (size_t)n;
    r->seen += (size_t)n;
    return 1;
}

/* The next line without its CR LF (a bare LF is accepted too) into line (NUL-terminated).
 * Returns its length, or < 0 (CM_EDECODE: too long; CM_EIO: the stream ended first). */
static int proc__rd_line(proc__rd_t *r, char *line, const char *what) {
    for (;;) {
        char *nl = memchr(r->buf + r->off, '\n', r->len - r->off);
        if (nl) {
            size_t n = (size_t)(nl - (r->buf + r->off));
            memcpy(line, r->buf + r->off, n);
            r->off += n + 1;
            if (n > 0 && line[n - 1] == '\r') n--;
            line[n] = 0;
            return (int)n;
        }
        if (r->off == 0 && r->len == sizeof r->buf)
            return proc__err(r->c->err, r->c->cap, CM_EDECODE, "malformed response from %s: %s line over %d bytes",
                             r->c->where, what, PROC__LINE_MAX);
        int f = proc__rd_fill(r);
        if (f < 0) return f;
        if (f == 0)
            return proc__err(r->c->err, r->c->cap, CM_EIO, "%s closed the connection %s", r->c->where,
                             r->seen ? "in the middle of the response" : "without answering");
    }
}

/* Keeps what fits of n body bytes; returns 1 when the cut was reached. */
static int proc__keep(proc_http_resp_t *resp, const char *p, size_t n) {
    size_t room = PROC_HTTP_BODY_MAX - resp->body_len;
    if (n > room) {
        n = room;
        resp->truncated = 1;
    }
    if (n) {
        resp->body = cm_realloc(resp->body, resp->body_len + n + 1);
        memcpy(resp->body + resp->body_len, p, n);
        resp->body_len += n;
        resp->body[resp->body_len] = 0;
    }
    return resp->truncated;
}

#define PROC__TO_CLOSE UINT64_MAX

/* n body bytes (PROC__TO_CLOSE: until the peer closes). 0 done, 1 cut at PROC_HTTP_BODY_MAX
 * (the rest is left unread), < 0 error. */
static int proc__rd_body(proc__rd_t *r, proc_http_resp_t *resp, uint64_t n) {
    while (n > 0) {
        if (r->off == r->len) {
            int f = proc__rd_fill(r);
            if (f < 0) return f;
            if (f == 0) {
                if (n == PROC__TO_CLOSE) return 0;
                return proc__err(r->c->err, r->c->cap, CM_EIO, "%s closed the connection before the end of the body", r->c->where);
            }
        }
        size_t have = r->len - r->off;
        size_t take = (uint64_t)have < n ? have : (size_t)n;
        if (proc__keep(resp, r->buf + r->off, take)) return 1;
        r->off += take;
        if (n != PROC__TO_CLOSE) n -= take;
    }
    return 0;
}

static int proc__rd_chunked(proc__rd_t *r, proc_http_resp_t *resp) {
    char line[PROC__LINE_MAX];
    for (;;) {
        int n = proc__rd_line(r, line, "chunk size");
        if (n < 0) return n;
        char *end;
        errno = 0;
        unsigned long long size = strtoull(line, &end, 16);
        if (!isxdigit((unsigned char)line[0]) || errno || (*end && *end != ';' && *end != ' ' && *end != '\t'))
            return proc__err(r->c->err, r->c->cap, CM_EDECODE, "malformed response from %s: bad chunk size", r->c->where);
        if (size == 0) break;
        int b = proc__rd_body(r, resp, size);
        if (b) return b > 0 ? 0 : b;
        n = proc__rd_line(r, line, "chunk end");
        if (n < 0) return n;
        if (n != 0) return proc__err(r->c->err, r->c->cap, CM_EDECODE, "malformed response from %s: chunk longer than its size", r->c->where);
    }
    /* Trailer fields, up to the empty line that ends the message. */
    for (int i = 0;; i++) {
        int n = proc__rd_line(r, line, "trailer");
        if (n <= 0) return n;
        if (i > 100) return proc__err(r->c->err, r->c->cap, CM_EDECODE, "malformed response from %s: too many trailers", r->c->where);
    }
}

static char *proc__trim(char *s) {
    while (*s == ' ' || *s == '\t') s++;
    size_t n = strlen(s);
    while (n > 0 && (s[n - 1] == ' ' || s[n - 1] == '\t')) s[--n] = 0;
    return s;
}

/* Status line and headers, skipping 1xx interim answers, then the body. Returns the status or
 * < 0 when no final status could be read. */
static int proc__read_response(proc__rd_t *r, proc_http_resp_t *resp) {
    proc__conn_t *c = r->c;
    char line[PROC__LINE_MAX];
    size_t head = 0;
    int status = 0, chunked = 0, te = 0;
    long long clen = -1;
    c->phase = "waiting for the response";
    for (int interim = 0;; interim++) {
        int n = proc__rd_line(r, line, "status");
        if (n < 0) return n;
        head += (size_t)n + 2;
        /* "HTTP/1.x NNN[ reason]" */
        if (n < 12 || memcmp(line, "HTTP/1.", 7) != 0 || !isdigit((unsigned char)line[7]) || line[8] != ' ' ||
            !isdigit((unsigned char)line[9]) || !isdigit((unsigned char)line[10]) || !isdigit((unsigned char)line[11]) ||
            (line[12] != 0 && line[12] != ' ') || line[9] == '0' || line[9] > '5')
            return proc__err(c->err, c->cap, CM_EDECODE, "malformed response from %s: not an HTTP/1.x status line", c->where);
        status = (line[9] - '0') * 100 + (line[10] - '0') * 10 + (line[11] - '0');
        chunked = te = 0;
        clen = -1;
        for (;;) {
            n = proc__rd_line(r, line, "header");
            if (n < 0) return n;
            head += (size_t)n + 2;
            if (head > PROC_HTTP_HEAD_MAX)
                return proc__err(c->err, c->cap, CM_EDECODE, "malformed response from %s: headers over %d bytes", c->where,
                                 PROC_HTTP_HEAD_MAX);
            if (n == 0) break;
            if (line[0] == ' ' || line[0] == '\t') continue; /* obsolete folding: continues a field we ignore */
            char *colon = strchr(line, ':');
            if (!colon || colon == line)
                return proc__err(c->err, c->cap, CM_EDECODE, "malformed response from %s: bad header line", c->where);
            *colon = 0;
            char *v = proc__trim(colon + 1);
            if (strcasecmp(line, "Transfer-Encoding") == 0) {
                te = 1;
                size_t vl = strlen(v);
                /* chunked must be the last coding; anything else is read until the close */
                chunked = vl >= 7 && strcasecmp(v + vl - 7, "chunked") == 0 && (vl == 7 || v[vl - 8] == ' ' || v[vl - 8] == ',');
            } else if (strcasecmp(line, "Content-Length") == 0) {
                char *end;
                errno = 0;
                long long x = isdigit((unsigned char)v[0]) ? strtoll(v, &end, 10) : -1;
                if (x < 0 || errno || *end || (clen >= 0 && clen != x))
                    return proc__err(c->err, c->cap, CM_EDECODE, "malformed response from %s: bad Content-Length", c->where);
                clen = x;
            }
        }
        if (status >= 200 || status == 101) break;
        if (interim >= PROC__MAX_INTERIM)
            return proc__err(c->err, c->cap, CM_EDECODE, "malformed response from %s: too many interim responses", c->where);
    }
    resp->status = status;
    c->phase = "reading the response body";
    int rc = 0;
    if (status == 101 || status == 204 || status == 304)
        rc = 0;
    else if (te)
        rc = chunked ? proc__rd_chunked(r, resp) : proc__rd_body(r, resp, PROC__TO_CLOSE);
    else
        rc = proc__rd_body(r, resp, clen >= 0 ? (uint64_t)clen : PROC__TO_CLOSE);
    resp->complete = rc >= 0;
    return status;
}

/* ---- the call ---------------------------------------------------------------------------- */

static int proc__header_ok(const char *h) {
    const char *colon = h ? strchr(h, ':') : NULL;
    if (!colon || colon == h) return 0;
    for (const char *p = h; *p; p++)
        if (*p == '\r' || *p == '\n') return 0;
    return 1;
}

static int proc__post(proc__conn_t *c, proc_http_t *h, const proc_http_url_t *u, const char *const *headers,
                      size_t n_headers, const char *body, size_t len, proc_http_resp_t *resp) {
    struct addrinfo *ai = NULL;
    int rc = proc__resolve(c, u, &ai);
    if (rc) return rc;
    rc = proc__connect(c, ai);
    freeaddrinfo(ai);
    if (rc) return rc;
    if (u->tls && (rc = proc__handshake(c, h->tls, u))) return rc;
    cm_buf_t req = CM_BUF_INIT;
    cm_buf_puts(&req, "POST ");
    if (u->path_len == 0 || u->path[0] != '/') cm_buf_puts(&req, "/");
    cm_buf_append(&req, u->path, u->path_len);
    cm_buf_printf(&req, " HTTP/1.1\r\nHost: %s%s%s%s%s\r\n", u->ipv6 ? "[" : "", u->host, u->ipv6 ? "]" : "",
                  u->default_port ? "" : ":", u->default_port ? "" : u->port);
    cm_buf_printf(&req, "Content-Length: %zu\r\nConnection: close\r\n", len);
    for (size_t i = 0; i < n_headers; i++) cm_buf_printf(&req, "%s\r\n", headers[i]);
    cm_buf_puts(&req, "\r\n");
    /* Headers and body in one write when the body is small, so they leave in one segment. */
    if (len <= 16384) cm_buf_append(&req, body, len);
    rc = proc__write_all(c, req.data, req.len);
    if (!rc && len > 16384) rc = proc__write_all(c, body, len);
    cm_buf_free(&req);
    if (rc) return rc;
    proc__rd_t *r = cm_malloc(sizeof *r);
    r->c = c;
    r->off = r->len = r->seen = 0;
    rc = proc__read_response(r, resp);
    cm_free(r);
    return rc;
}

int proc_http_post(proc_http_t *h, const char *url, const char *const *headers, size_t n_headers, const char *body,
                   size_t len, int timeout_ms, proc_http_resp_t *resp) {
    memset(resp, 0, sizeof *resp);
    char *err = resp->errstr;
    size_t cap = sizeof resp->errstr;
    proc_http_url_t u;
    if (!h) return proc__err(err, cap, CM_EINVAL, "no client");
    if (proc_http_url_parse(url, &u, err, cap)) return CM_EINVAL;
    if (timeout_ms <= 0) return proc__err(err, cap, CM_EINVAL, "timeout_ms must be positive");
    if (len && !body) return proc__err(err, cap, CM_EINVAL, "no body");
    for (size_t i = 0; i < n_headers; i++)
        if (!proc__header_ok(headers[i])) return proc__err(err, cap, CM_EINVAL, "header %zu is not \"Name: value\" on one line", i);

    /* SSL_write writes to the socket with write(), which raises SIGPIPE when the peer has gone:
     * block it here and take the one this call raised before unblocking. */
    sigset_t pipe, old;
    sigemptyset(&pipe);
    sigaddset(&pipe, SIGPIPE);
    pthread_sigmask(SIG_BLOCK, &pipe, &old);

    proc__conn_t c = {.fd = -1, .deadline = cm_mono_ns() + (int64_t)timeout_ms * 1000000, .timeout_ms = timeout_ms,
                      .phase = "", .err = err, .cap = cap};
    snprintf(c.where, sizeof c.where, "%s%s%s:%s", u.ipv6 ? "[" : "", u.host, u.ipv6 ? "]" : "", u.port);
    int rc = proc__post(&c, h, &u, headers, n_headers, body, len, resp);
    if (c.ssl) {
        SSL_shutdown(c.ssl); /* one try at close_notify; the socket closes either way */
        SSL_free(c.ssl);
        ERR_clear_error();
    }
    if (c.fd >= 0) close(c.fd);
    if (rc < 0) proc_http_resp_free(resp);

    if (!sigismember(&old, SIGPIPE)) {
        sigset_t pending;
        sigpending(&pending);
        if (sigismember(&pending, SIGPIPE)) {
            struct timespec zero = {0, 0};
            sigtimedwait(&pipe, NULL, &zero);
        }
        pthread_sigmask(SIG_SETMASK, &old, NULL);
    }
    return rc;
}
