/* processing's webhook HTTP client (proc_http.c) against a local listener thread on loopback that
 * answers canned responses: Content-Length, chunked, until-close and oversized bodies, interim
 * answers, error statuses, garbage, servers that never answer or never read (the deadline holds),
 * refused connections, bad URLs, IPv6 and host names, and HTTPS with peer and name verification
 * against a throwaway self-signed certificate. */
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/ssl.h>
#include <openssl/x509.h>
#include <openssl/x509v3.h>

#include "cm_err.h"
#include "cm_time.h"
#include "proc_http.h"
#include "test.h"

/* ---- a canned server ------------------------------------------------------------------------ */

typedef enum {
    SRV_REPLY,   /* read the request, send reply, close */
    SRV_CLOSE,   /* read the request, close without a word */
    SRV_HANG,    /* read the request, then hold the connection until stopped */
    SRV_NO_READ, /* accept, read nothing, hold the connection until stopped */
    SRV_BLURT,   /* send reply at once without reading, close */
} srv_mode_t;

typedef struct srv_s {
    int lfd, port, family;
    srv_mode_t mode;
    const char *reply;
    size_t reply_len;
    int split;      /* send the reply a few bytes at a time */
    int hold;       /* after the reply, hold the connection until stopped */
    SSL_CTX *tls;   /* serve TLS with this context */
    int stop[2];    /* a pipe: written to end a hold */
    pthread_t th;
    int conns;      /* connections accepted */
    char req[70000]; /* what the last request was, headers and body */
    size_t req_len;
} srv_t;

static int srv_io_read(int fd, SSL *ssl, char *buf, size_t cap) {
    return ssl ? SSL_read(ssl, buf, (int)cap) : (int)recv(fd, buf, cap, 0);
}

static void srv_read_request(srv_t *s, int fd, SSL *ssl) {
    s->req_len = 0;
    size_t want = SIZE_MAX;
    while (s->req_len < want && s->req_len < sizeof s->req - 1) {
        int n = srv_io_read(fd, ssl, s->req + s->req_len, sizeof s->req - 1 - s->req_len);
        if (n <= 0) break;
        s->req_len += (size_t)n;
        s->req[s->req_len] = 0;
        char *end = strstr(s->req, "\r\n\r\n");
        if (end && want == SIZE_MAX) {
            const char *cl = strstr(s->req, "Content-Length: ");
            want = (size_t)(end + 4 - s->req) + (cl ? strtoul(cl + 16, NULL, 10) : 0);
        }
    }
}

static void srv_send(srv_t *s, int fd, SSL *ssl) {
    size_t step = s->split ? 7 : s->reply_len;
    for (size_t off = 0; off < s->reply_len; off += step) {
        size_t n = s->reply_len - off < step ? s->reply_len - off : step;
        if (ssl)
            SSL_write(ssl, s->reply + off, (int)n);
        else if (send(fd, s->reply + off, n, MSG_NOSIGNAL) < 0)
            return;
        if (s->split) nanosleep(&(struct timespec){0, 2000000}, NULL);
    }
}

static void *srv_main(void *arg) {
    srv_t *s = arg;
    for (;;) {
        int fd = accept(s->lfd, NULL, NULL);
        if (fd < 0) break;
        s->conns++;
        SSL *ssl = NULL;
        int ok = 1;
        if (s->tls) {
            ssl = SSL_new(s->tls);
            SSL_set_fd(ssl, fd);
            ok = SSL_accept(ssl) == 1; /* fails when the client refuses the certificate */
        }
        if (ok && s->mode != SRV_NO_READ && s->mode != SRV_BLURT) srv_read_request(s, fd, ssl);
        if (ok && (s->mode == SRV_REPLY || s->mode == SRV_BLURT)) srv_send(s, fd, ssl);
        if (ok && (s->mode == SRV_HANG || s->mode == SRV_NO_READ || s->hold)) {
            struct pollfd p = {s->stop[0], POLLIN, 0};
            poll(&p, 1, 20000);
        }
        if (ssl) {
            if (ok) SSL_shutdown(ssl);
            SSL_free(ssl);
        }
        ERR_clear_error();
        close(fd);
    }
    return NULL;
}

/* Starts a server on 127.0.0.1 (or ::1 with family AF_INET6) port 0; 0, or -1 when the family
 * is not available here. */
static int srv_start_on(srv_t *s, int family, srv_mode_t mode, const char *reply) {
    memset(s, 0, sizeof *s);
    s->mode = mode;
    s->reply = reply;
    s->reply_len = reply ? strlen(reply) : 0;
    s->family = family;
    s->lfd = socket(family, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (s->lfd < 0) return -1;
    int one = 1;
    setsockopt(s->lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_storage ss;
    memset(&ss, 0, sizeof ss);
    socklen_t sl;
    if (family == AF_INET6) {
        struct sockaddr_in6 *a = (struct sockaddr_in6 *)&ss;
        a->sin6_family = AF_INET6;
        a->sin6_addr = in6addr_loopback;
        sl = sizeof *a;
    } else {
        struct sockaddr_in *a = (struct sockaddr_in *)&ss;
        a->sin_family = AF_INET;
        a->sin_addr.s_addr = htonl(INADDR_LOOPBACK);
        sl = sizeof *a;
    }
    if (bind(s->lfd, (struct sockaddr *)&ss, sl) != 0 || listen(s->lfd, 16) != 0) {
        close(s->lfd);
        return -1;
    }
    getsockname(s->lfd, (struct sockaddr *)&ss, &sl);
    s->port = ntohs(family == AF_INET6 ? ((struct sockaddr_in6 *)&ss)->sin6_port : ((struct sockaddr_in *)&ss)->sin_port);
    if (pipe(s->stop) != 0) TEST__FAIL("pipe: %s", strerror(errno));
    pthread_create(&s->th, NULL, srv_main, s);
    return 0;
}

static void srv_start(srv_t *s, srv_mode_t mode, const char *reply) {
    if (srv_start_on(s, AF_INET, mode, reply)) TEST__FAIL("cannot listen on 127.0.0.1: %s", strerror(errno));
}

static void srv_stop(srv_t *s) {
    if (write(s->stop[1], "x", 1) != 1) TEST__FAIL("write: %s", strerror(errno));
    shutdown(s->lfd, SHUT_RDWR); /* wakes the accept */
    pthread_join(s->th, NULL);
    close(s->lfd);
    close(s->stop[0]);
    close(s->stop[1]);
}

static double ms_since(int64_t t0) { return (double)(cm_mono_ns() - t0) / 1e6; }

static const char *const hdrs[] = {"Content-Type: application/json", "Idempotency-Key: 42"};

/* POSTs {"a":1} to url through h; returns the status or error, resp filled. */
static int post(proc_http_t *h, const char *url, int timeout_ms, proc_http_resp_t *resp) {
    return proc_http_post(h, url, hdrs, 2, "{\"a\":1}", 7, timeout_ms, resp);
}

/* ---- plain HTTP -------------------------------------------------------------------------- */

static void test_200_with_content_length_and_request_shape(void) {
    proc_http_t *h = proc_http_new(NULL, NULL);
    ASSERT(h);
    srv_t s;
    srv_start(&s, SRV_REPLY, "HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-Other: y\r\n\r\nhello");
    char url[128];
    snprintf(url, sizeof url, "http://127.0.0.1:%d/hooks/a?token=s3cret#frag", s.port);
    proc_http_resp_t r;
    ASSERT_INT_EQ(post(h, url, 5000, &r), 200);
    ASSERT_INT_EQ(r.status, 200);
    ASSERT_STR_EQ(r.body, "hello");
    ASSERT_INT_EQ(r.body_len, 5);
    ASSERT(r.complete && !r.truncated);
    proc_http_resp_free(&r);
    srv_stop(&s);
    /* The request: path and query without the fragment, Host with the port, our headers, body. */
    char want[256];
    snprintf(want, sizeof want, "POST /hooks/a?token=s3cret HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n", s.port);
    ASSERT(strncmp(s.req, want, strlen(want)) == 0);
    ASSERT(strstr(s.req, "\r\nContent-Length: 7\r\n"));
    ASSERT(strstr(s.req, "\r\nConnection: close\r\n"));
    ASSERT(strstr(s.req, "\r\nIdempotency-Key: 42\r\n"));
    ASSERT(strstr(s.req, "\r\nContent-Type: application/json\r\n"));
    ASSERT(s.req_len > 11 && strcmp(s.req + s.req_len - 11, "\r\n\r\n{\"a\":1}") == 0);
    proc_http_free(h);
}

static void test_chunked_body_split_in_small_writes(void) {
    proc_http_t *h = proc_http_new(NULL, NULL);
    srv_t s;
    srv_start(&s, SRV_REPLY,
              "HTTP/1.1 201 Created\r\nTransfer-Encoding: chunked\r\n\r\n"
              "5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\nX-Trailer: 1\r\n\r\n");
    s.split = 1;
    char url[128];
    snprintf(url, sizeof url, "http://127.0.0.1:%d/", s.port);
    proc_http_resp_t r;
    ASSERT_INT_EQ(post(h, url, 5000, &r), 201);
    ASSERT_STR_EQ(r.body, "hello world");
    ASSERT(r.complete);
    proc_http_resp_free(&r);
    srv_stop(&s);
    proc_http_free(h);
}

static void test_500_is_a_status_not_an_error(void) {
    proc_http_t *h = proc_http_new(NULL, NULL);
    srv_t s;
    srv_start(&s, SRV_REPLY, "HTTP/1.1 500 Internal Server Error\r\nContent-Length: 5\r\n\r\noops!");
    char url[128];
    snprintf(url, sizeof url, "http://127.0.0.1:%d", s.port); /* no path: "/" */
    proc_http_resp_t r;
    ASSERT_INT_EQ(post(h, url, 5000, &r), 500);
    ASSERT_STR_EQ(r.body, "oops!");
    proc_http_resp_free(&r);
    srv_stop(&s);
    ASSERT(strncmp(s.req, "POST / HTTP/1.1\r\n", 17) == 0);
    proc_http_free(h);
}

static void test_interim_100_then_until_close_body(void) {
    proc_http_t *h = proc_http_new(NULL, NULL);
    srv_t s;
    srv_start(&s, SRV_REPLY, "HTTP/1.1 100 Continue\r\n\r\nHTTP/1.0 202 Accepted\r\nServer: x\r\n\r\nqueued, thanks");
    char url[128];
    snprintf(url, sizeof url, "http://127.0.0.1:%d/x", s.port);
    proc_http_resp_t r;
    ASSERT_INT_EQ(post(h, url, 5000, &r), 202);
    ASSERT_STR_EQ(r.body, "queued, thanks");
    ASSERT(r.complete);
    proc_http_resp_free(&r);
    srv_stop(&s);
    proc_http_free(h);
}

static void test_204_has_no_body(void) {
    proc_http_t *h = proc_http_new(NULL, NULL);
    srv_t s;
    srv_start(&s, SRV_REPLY, "HTTP/1.1 204 No Content\r\n\r\n");
    s.hold = 1; /* keeps the connection open: reading a body would wait for the deadline */
    char url[128];
    snprintf(url, sizeof url, "http://127.0.0.1:%d/", s.port);
    proc_http_resp_t r;
    int64_t t0 = cm_mono_ns();
    ASSERT_INT_EQ(post(h, url, 3000, &r), 204);
    ASSERT(ms_since(t0) < 1500);
    ASSERT(r.body == NULL && r.body_len == 0 && r.complete);
    proc_http_resp_free(&r);
    srv_stop(&s);
    proc_http_free(h);
}

static void test_body_over_64k_is_cut(void) {
    proc_http_t *h = proc_http_new(NULL, NULL);
    size_t n = 100000;
    char *reply = malloc(n + 100);
    int k = snprintf(reply, 100, "HTTP/1.1 200 OK\r\nContent-Length: %zu\r\n\r\n", n);
    memset(reply + k, 'b', n);
    reply[k + (int)n] = 0;
    srv_t s;
    srv_start(&s, SRV_REPLY, reply);
    char url[128];
    snprintf(url, sizeof url, "http://127.0.0.1:%d/", s.port);
    proc_http_resp_t r;
    ASSERT_INT_EQ(post(h, url, 5000, &r), 200);
    ASSERT_INT_EQ(r.body_len, PROC_HTTP_BODY_MAX);
    ASSERT(r.truncated && r.complete);
    ASSERT_INT_EQ(strlen(r.body), PROC_HTTP_BODY_MAX);
    proc_http_resp_free(&r);
    srv_stop(&s);
    free(reply);
    proc_http_free(h);
}

static void test_short_body_keeps_status(void) {
    proc_http_t *h = proc_http_new(NULL, NULL);
    srv_t s;
    srv_start(&s, SRV_REPLY, "HTTP/1.1 200 OK\r\nContent-Length: 50\r\n\r\nonly this");
    char url[128];
    snprintf(url, sizeof url, "http://127.0.0.1:%d/", s.port);
    proc_http_resp_t r;
    ASSERT_INT_EQ(post(h, url, 5000, &r), 200);
    ASSERT(!r.complete);
    ASSERT(strstr(r.errstr, "before the end of the body"));
    ASSERT_STR_EQ(r.body, "only this");
    proc_http_resp_free(&r);
    srv_stop(&s);
    proc_http_free(h);
}

static void test_malformed_and_missing_responses(void) {
    proc_http_t *h = proc_http_new(NULL, NULL);
    static const char *const bad[] = {
        "garbage\r\n\r\n",
        "HTTP/1.1 2000 OK\r\n\r\n",
        "HTTP/2 200\r\n\r\n",
        "HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n",
        "HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
        "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        "HTTP/1.1 200 OK\r\nno colon here\r\n\r\n",
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        srv_t s;
        srv_start(&s, SRV_REPLY, bad[i]);
        char url[128];
        snprintf(url, sizeof url, "http://127.0.0.1:%d/", s.port);
        proc_http_resp_t r;
        int rc = post(h, url, 5000, &r);
        srv_stop(&s);
        if (i == 5) { /* the status is known: only the body is malformed */
            ASSERT_INT_EQ(rc, 200);
            ASSERT(!r.complete && strstr(r.errstr, "chunk size"));
        } else {
            if (rc != CM_EDECODE) TEST__FAIL("reply %zu: got %d (%s), want CM_EDECODE", i, rc, r.errstr);
            ASSERT(strstr(r.errstr, "malformed response from 127.0.0.1:"));
        }
        proc_http_resp_free(&r);
    }
    /* A server that reads the request and hangs up without a word. */
    srv_t s;
    srv_start(&s, SRV_CLOSE, NULL);
    char url[128];
    snprintf(url, sizeof url, "http://127.0.0.1:%d/", s.port);
    proc_http_resp_t r;
    ASSERT_INT_EQ(post(h, url, 5000, &r), CM_EIO);
    ASSERT(strstr(r.errstr, "without answering"));
    proc_http_resp_free(&r);
    srv_stop(&s);
    proc_http_free(h);
}

/* ---- time limits and connection failures ---------------------------------------------------- */

static void test_server_that_never_answers_times_out(void) {
    proc_http_t *h = proc_http_new(NULL, NULL);
    srv_t s;
    srv_start(&s, SRV_HANG, NULL);
    char url[128];
    snprintf(url, sizeof url, "http://127.0.0.1:%d/", s.port);
    proc_http_resp_t r;
    int64_t t0 = cm_mono_ns();
    ASSERT_INT_EQ(post(h, url, 300, &r), CM_ETIMEOUT);
    double ms = ms_since(t0);
    if (ms < 295 || ms > 1500) TEST__FAIL("timed out after %.0f ms, want about 300", ms);
    ASSERT(strstr(r.errstr, "timed out after 300 ms waiting for the response"));
    proc_http_resp_free(&r);
    srv_stop(&s);
    proc_http_free(h);
}

static void test_server_that_never_reads_times_out_sending(void) {
    proc_http_t *h = proc_http_new(NULL, NULL);
    srv_t s;
    srv_start(&s, SRV_NO_READ, NULL);
    char url[128];
    snprintf(url, sizeof url, "http://127.0.0.1:%d/", s.port);
    size_t n = 64u << 20; /* more than loopback socket buffers hold */
    char *body = malloc(n);
    memset(body, '{', n);
    proc_http_resp_t r;
    int64_t t0 = cm_mono_ns();
    ASSERT_INT_EQ(proc_http_post(h, url, NULL, 0, body, n, 400, &r), CM_ETIMEOUT);
    double ms = ms_since(t0);
    free(body);
    if (ms < 395 || ms > 2000) TEST__FAIL("timed out after %.0f ms, want about 400", ms);
    ASSERT(strstr(r.errstr, "sending the request"));
    proc_http_resp_free(&r);
    srv_stop(&s);
    proc_http_free(h);
}

static void test_connection_refused(void) {
    proc_http_t *h = proc_http_new(NULL, NULL);
    /* A port that was just free: bind, read the number, close. */
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t sl = sizeof a;
    ASSERT(bind(fd, (struct sockaddr *)&a, sl) == 0);
    getsockname(fd, (struct sockaddr *)&a, &sl);
    close(fd);
    char url[128];
    snprintf(url, sizeof url, "http://127.0.0.1:%d/", ntohs(a.sin_port));
    proc_http_resp_t r;
    int64_t t0 = cm_mono_ns();
    ASSERT_INT_EQ(post(h, url, 5000, &r), CM_EIO);
    ASSERT(ms_since(t0) < 1000);
    ASSERT(strstr(r.errstr, "cannot connect to 127.0.0.1:"));
    ASSERT(strstr(r.errstr, "refused"));
    proc_http_resp_free(&r);
    proc_http_free(h);
}

static void test_malformed_urls(void) {
    proc_http_t *h = proc_http_new(NULL, NULL);
    static const char *const bad[] = {
        "",
        "ftp://example.com/",
        "http://",
        "http:///path",
        "http://[::1/",
        "http://[not-v6]/",
        "http://[::1]x/",
        "http://example.com:99999/",
        "http://example.com:0/",
        "http://example.com:8a/",
        "http://user:pw@example.com/",
        "http://exa mple.com/",
        "http://example.com/a b",
        "http://exa$mple.com/",
        "http://example.com/\x7f",
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        proc_http_resp_t r;
        int rc = post(h, bad[i], 1000, &r);
        if (rc != CM_EINVAL) TEST__FAIL("\"%s\": got %d, want CM_EINVAL", bad[i], rc);
        ASSERT(r.errstr[0]);
        proc_http_resp_free(&r);
    }
    proc_http_url_t u;
    char err[128];
    ASSERT_INT_EQ(proc_http_url_parse("HTTPS://[2001:db8::1]:8443/p?q#f", &u, err, sizeof err), 0);
    ASSERT(u.tls && u.ip && u.ipv6 && !u.default_port);
    ASSERT_STR_EQ(u.host, "2001:db8::1");
    ASSERT_STR_EQ(u.port, "8443");
    ASSERT_INT_EQ(u.path_len, 4);
    ASSERT(strncmp(u.path, "/p?q", 4) == 0);
    ASSERT_INT_EQ(proc_http_url_parse("http://hooks.example.com:80", &u, err, sizeof err), 0);
    ASSERT(!u.tls && !u.ip && u.default_port && u.path_len == 0);
    ASSERT_STR_EQ(u.port, "80");
    ASSERT_INT_EQ(proc_http_url_parse("https://10.0.0.1:/x", &u, err, sizeof err), 0);
    ASSERT(u.ip && !u.ipv6 && u.default_port);
    ASSERT_STR_EQ(u.port, "443");
    /* Bad headers and arguments. */
    proc_http_resp_t r;
    const char *inj[] = {"X-A: 1\r\nX-B: 2"};
    ASSERT_INT_EQ(proc_http_post(h, "http://127.0.0.1:1/", inj, 1, "", 0, 1000, &r), CM_EINVAL);
    const char *nocolon[] = {"X-A"};
    ASSERT_INT_EQ(proc_http_post(h, "http://127.0.0.1:1/", nocolon, 1, "", 0, 1000, &r), CM_EINVAL);
    ASSERT_INT_EQ(proc_http_post(h, "http://127.0.0.1:1/", NULL, 0, "", 0, 0, &r), CM_EINVAL);
    proc_http_resp_free(&r);
    proc_http_free(h);
}

static void test_ipv6_literal_and_host_name(void) {
    proc_http_t *h = proc_http_new(NULL, NULL);
    srv_t s;
    proc_http_resp_t r;
    char url[128];
    if (srv_start_on(&s, AF_INET6, SRV_REPLY, "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nv6") == 0) {
        snprintf(url, sizeof url, "http://[::1]:%d/six", s.port);
        ASSERT_INT_EQ(post(h, url, 5000, &r), 200);
        ASSERT_STR_EQ(r.body, "v6");
        proc_http_resp_free(&r);
        srv_stop(&s);
        char want[64];
        snprintf(want, sizeof want, "\r\nHost: [::1]:%d\r\n", s.port);
        ASSERT(strstr(s.req, want));
    }
    /* A name, resolved on the side; if it also maps to ::1, that address is refused and the
     * next one is tried. */
    srv_start(&s, SRV_REPLY, "HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nname");
    snprintf(url, sizeof url, "http://localhost:%d/", s.port);
    ASSERT_INT_EQ(post(h, url, 5000, &r), 200);
    ASSERT_STR_EQ(r.body, "name");
    proc_http_resp_free(&r);
    srv_stop(&s);
    ASSERT_INT_EQ(post(h, "http://no-such-host.invalid/", 5000, &r), CM_ENOTFOUND);
    ASSERT(strstr(r.errstr, "cannot resolve no-such-host.invalid"));
    proc_http_resp_free(&r);
    proc_http_free(h);
}

/* ---- HTTPS ------------------------------------------------------------------------------- */

/* A self-signed certificate for DNS:localhost only, written to a temporary PEM file. */
typedef struct tls_fixture_s {
    EVP_PKEY *key;
    X509 *cert;
    char ca_path[64];
} tls_fixture_t;

static void tls_fixture(tls_fixture_t *f) {
    f->key = EVP_PKEY_Q_keygen(NULL, NULL, "EC", "P-256");
    ASSERT(f->key);
    X509 *x = X509_new();
    X509_set_version(x, 2);
    ASN1_INTEGER_set(X509_get_serialNumber(x), 1);
    X509_gmtime_adj(X509_getm_notBefore(x), -3600);
    X509_gmtime_adj(X509_getm_notAfter(x), 3600);
    X509_set_pubkey(x, f->key);
    X509_NAME *name = X509_get_subject_name(x);
    X509_NAME_add_entry_by_txt(name, "CN", MBSTRING_ASC, (const unsigned char *)"test webhook receiver", -1, -1, 0);
    X509_set_issuer_name(x, name);
    X509V3_CTX ctx;
    X509V3_set_ctx_nodb(&ctx);
    X509V3_set_ctx(&ctx, x, x, NULL, NULL, 0);
    static const char *const exts[][2] = {{"basicConstraints", "critical,CA:TRUE"},
                                          {"keyUsage", "critical,digitalSignature,keyCertSign"},
                                          {"subjectAltName", "DNS:localhost"}};
    for (size_t i = 0; i < 3; i++) {
        X509_EXTENSION *e = X509V3_EXT_conf(NULL, &ctx, exts[i][0], exts[i][1]);
        ASSERT(e);
        X509_add_ext(x, e, -1);
        X509_EXTENSION_free(e);
    }
    ASSERT(X509_sign(x, f->key, EVP_sha256()) > 0);
    f->cert = x;
    snprintf(f->ca_path, sizeof f->ca_path, "/tmp/test_proc_http_ca_XXXXXX");
    int fd = mkstemp(f->ca_path);
    ASSERT(fd >= 0);
    FILE *fp = fdopen(fd, "w");
    PEM_write_X509(fp, x);
    fclose(fp);
}

static void tls_fixture_free(tls_fixture_t *f) {
    unlink(f->ca_path);
    X509_free(f->cert);
    EVP_PKEY_free(f->key);
}

static SSL_CTX *tls_server_ctx(const tls_fixture_t *f) {
    SSL_CTX *ctx = SSL_CTX_new(TLS_server_method());
    SSL_CTX_use_certificate(ctx, f->cert);
    SSL_CTX_use_PrivateKey(ctx, f->key);
    return ctx;
}

static void test_https_verifies_peer_and_name(void) {
    tls_fixture_t f;
    tls_fixture(&f);
    SSL_CTX *sctx = tls_server_ctx(&f);
    proc_http_t *trusting = proc_http_new(f.ca_path, NULL);
    proc_http_t *system = proc_http_new(NULL, NULL);
    ASSERT(trusting && system);
    ASSERT(proc_http_new("/nonexistent/ca.pem", NULL) == NULL);
    srv_t s;
    srv_start(&s, SRV_REPLY, "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nsec\r\n0\r\n\r\n");
    s.tls = sctx;
    char url[128];
    proc_http_resp_t r;

    /* Trusted CA, matching name. */
    snprintf(url, sizeof url, "https://localhost:%d/secure", s.port);
    ASSERT_INT_EQ(post(trusting, url, 5000, &r), 200);
    ASSERT_STR_EQ(r.body, "sec");
    proc_http_resp_free(&r);
    ASSERT(strncmp(s.req, "POST /secure HTTP/1.1\r\n", 23) == 0);

    /* The system store does not know the certificate. */
    ASSERT_INT_EQ(post(system, url, 5000, &r), CM_ETLS);
    ASSERT(strstr(r.errstr, "certificate not trusted"));
    proc_http_resp_free(&r);

    /* Trusted, but the certificate names localhost, not the address. */
    snprintf(url, sizeof url, "https://127.0.0.1:%d/secure", s.port);
    ASSERT_INT_EQ(post(trusting, url, 5000, &r), CM_ETLS);
    ASSERT(strstr(r.errstr, "127.0.0.1:"));
    proc_http_resp_free(&r);

    /* TLS to a plain HTTP server fails as TLS, not as a hang. */
    srv_stop(&s);
    srv_start(&s, SRV_BLURT, "HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n");
    snprintf(url, sizeof url, "https://localhost:%d/", s.port);
    int64_t t0 = cm_mono_ns();
    ASSERT_INT_EQ(post(trusting, url, 3000, &r), CM_ETLS);
    ASSERT(ms_since(t0) < 2500);
    proc_http_resp_free(&r);
    srv_stop(&s);

    /* A TLS server that completes the handshake and never answers: the deadline holds. */
    srv_start(&s, SRV_HANG, NULL);
    s.tls = sctx;
    snprintf(url, sizeof url, "https://localhost:%d/", s.port);
    t0 = cm_mono_ns();
    ASSERT_INT_EQ(post(trusting, url, 300, &r), CM_ETIMEOUT);
    double ms = ms_since(t0);
    if (ms < 295 || ms > 1500) TEST__FAIL("timed out after %.0f ms, want about 300", ms);
    proc_http_resp_free(&r);
    srv_stop(&s);

    proc_http_free(trusting);
    proc_http_free(system);
    SSL_CTX_free(sctx);
    tls_fixture_free(&f);
}

TEST_MAIN(TEST_ENTRY(test_200_with_content_length_and_request_shape), TEST_ENTRY(test_chunked_body_split_in_small_writes),
          TEST_ENTRY(test_500_is_a_status_not_an_error), TEST_ENTRY(test_interim_100_then_until_close_body),
          TEST_ENTRY(test_204_has_no_body), TEST_ENTRY(test_body_over_64k_is_cut), TEST_ENTRY(test_short_body_keeps_status),
          TEST_ENTRY(test_malformed_and_missing_responses), TEST_ENTRY(test_server_that_never_answers_times_out),
          TEST_ENTRY(test_server_that_never_reads_times_out_sending), TEST_ENTRY(test_connection_refused),
          TEST_ENTRY(test_malformed_urls), TEST_ENTRY(test_ipv6_literal_and_host_name),
          TEST_ENTRY(test_https_verifies_peer_and_name))
