/* cm_http, the API HTTP server, against a raw socket client on loopback: buffered bodies with path,
 * query and headers; a declared body over the limit answered before it is sent; a chunked body
 * over the limit and a streamed body its consumer refuses: a little over is read, dropped and
 * answered cleanly, far over is cut after the drain allowance; a streamed reply whose done() and the request's cleanup run once, in that order, with the
 * request still alive (ASan watches); a %00 in the path or query reported. */
#include <errno.h>
#include <netinet/in.h>
#include <poll.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "cm_http.h"
#include "test.h"

/* ---- the server under test -------------------------------------------------------------------- */

typedef struct srv_s {
    cm_http_t *h;
    size_t limit;
    int stream_body;     /* take the body through a callback that stops after stop_after bytes */
    size_t stop_after;
    atomic_size_t streamed; /* bytes the body callback saw */
    atomic_int too_big;  /* handle() saw cm_http_body_too_big() */
    atomic_int handled;
    /* the streamed reply */
    atomic_int pieces, done_calls, cleanups, done_before_cleanup;
    char done_path[64];
} srv_t;

static int body_cb(cm_http_req_t *r, const char *data, size_t len, void *arg) {
    (void)r;
    (void)data;
    srv_t *s = arg;
    size_t n = atomic_fetch_add(&s->streamed, len) + len;
    return n >= s->stop_after;
}

static size_t begin(cm_http_req_t *r, void *arg) {
    srv_t *s = arg;
    if (s->stream_body) cm_http_req_stream_body(r, body_cb, s);
    return s->limit;
}

typedef struct reply_s {
    srv_t *s;
    cm_http_req_t *r;
    int n;
} reply_t;

static ssize_t reply_read(void *arg, char *buf, size_t max) {
    reply_t *p = arg;
    if (p->n == 3) return 0;
    atomic_fetch_add(&p->s->pieces, 1);
    return snprintf(buf, max, "piece %d;", p->n++);
}

static void reply_done(void *arg) {
    reply_t *p = arg;
    /* The request is still alive here: its path can be read. */
    snprintf(p->s->done_path, sizeof p->s->done_path, "%s", cm_http_path(p->r));
    if (atomic_load(&p->s->cleanups) == 0) atomic_store(&p->s->done_before_cleanup, 1);
    atomic_fetch_add(&p->s->done_calls, 1);
    free(p);
}

static void user_cleanup(void *user) {
    srv_t *s = user;
    atomic_fetch_add(&s->cleanups, 1);
}

static void handle(cm_http_req_t *r, void *arg) {
    srv_t *s = arg;
    atomic_fetch_add(&s->handled, 1);
    if (cm_http_body_too_big(r)) {
        atomic_store(&s->too_big, 1);
        cm_http_reply(r, 413, "text/plain", "too big", 7, NULL, 0);
        return;
    }
    if (s->stream_body) {
        cm_http_reply(r, 409, "text/plain", "refused", 7, NULL, 0);
        return;
    }
    if (strcmp(cm_http_path(r), "/stream") == 0) {
        reply_t *p = calloc(1, sizeof *p);
        p->s = s;
        p->r = r;
        cm_http_req_set_user(r, s, user_cleanup);
        cm_http_reply_stream(r, 200, "text/plain", NULL, 0, reply_read, reply_done, p);
        return;
    }
    char out[512];
    const char *qn = "", *qv = "", *hv = cm_http_header(r, "x-test");
    cm_http_query_at(r, 0, &qn, &qv);
    size_t blen;
    const char *body = cm_http_body(r, &blen);
    int n = snprintf(out, sizeof out, "%s %s q=%s:%s h=%s nul=%d body=%zu:%s", cm_http_method(r), cm_http_path(r), qn, qv,
                     hv ? hv : "-", cm_http_has_nul(r), blen, body);
    cm_http_header_t hdr = {"X-Reply", "yes"};
    cm_http_reply(r, 200, "text/plain", out, (size_t)n, &hdr, 1);
}

static void srv_start(srv_t *s) {
    cm_http_opts_t o = {.listen = "127.0.0.1:0", .name = "test", .begin = begin, .handle = handle, .arg = s};
    int err = 0;
    s->h = cm_http_start(&o, &err);
    ASSERT(s->h != NULL);
    ASSERT(cm_http_port(s->h) > 0);
}

/* ---- a raw client ------------------------------------------------------------------------------ */

static int dial(int port) {
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port), .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    if (connect(fd, (struct sockaddr *)&a, sizeof a) != 0) {
        close(fd);
        return -1;
    }
    return fd;
}

/* Reads what is available within ms into buf (NUL-terminated), appending at *len; 0 at EOF or
 * reset, 1 when data came and the wait may go on, -1 on a timeout. */
static int read_some(int fd, char *buf, size_t cap, size_t *len, int ms) {
    struct pollfd p = {.fd = fd, .events = POLLIN};
    if (poll(&p, 1, ms) <= 0) return -1;
    ssize_t n = recv(fd, buf + *len, cap - 1 - *len, 0);
    if (n <= 0) return 0;
    *len += (size_t)n;
    buf[*len] = 0;
    return 1;
}

/* Sends req, then reads the answer until the connection closes. */
static void exchange(int port, const char *req, char *out, size_t cap) {
    int fd = dial(port);
    ASSERT(fd >= 0);
    ASSERT(send(fd, req, strlen(req), MSG_NOSIGNAL) == (ssize_t)strlen(req));
    size_t len = 0;
    out[0] = 0;
    while (len < cap - 1 && read_some(fd, out, cap, &len, 5000) == 1) {
    }
    close(fd);
}

/* Sends headers and then up to pieces 16 KiB pieces of body (chunked or not, ending a chunked
 * body properly when all went), reading the socket as it goes; stops sending when the server
 * answers or stops reading for a second. The body bytes sent. */
static size_t push_body(int port, const char *headers, int chunked, size_t pieces, char *out, size_t cap) {
    int fd = dial(port);
    ASSERT(fd >= 0);
    ASSERT(send(fd, headers, strlen(headers), MSG_NOSIGNAL) == (ssize_t)strlen(headers));
    static char piece[16384 + 16];
    size_t off = 0, n = 0, sent = 0, len = 0;
    out[0] = 0;
    for (size_t i = 0; i < pieces;) {
        if (off == n) { /* the next piece */
            n = chunked ? (size_t)snprintf(piece, sizeof piece, "4000\r\n") : 0;
            memset(piece + n, 'x', 16384);
            n += 16384;
            if (chunked) n += (size_t)snprintf(piece + n, sizeof piece - n, "\r\n");
            off = 0;
        }
        struct pollfd p = {.fd = fd, .events = POLLIN | POLLOUT};
        if (poll(&p, 1, 1000) <= 0) break; /* neither readable nor writable: the server stopped reading */
        if (p.revents & (POLLIN | POLLHUP | POLLERR)) break;
        ssize_t w = send(fd, piece + off, n - off, MSG_NOSIGNAL | MSG_DONTWAIT);
        if (w < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) continue;
        if (w <= 0) break;
        off += (size_t)w;
        sent += (size_t)w;
        if (off == n) i++;
        if (i == pieces && chunked) send(fd, "0\r\n\r\n", 5, MSG_NOSIGNAL);
    }
    while (len < cap - 1 && read_some(fd, out, cap, &len, 5000) == 1) {
    }
    close(fd);
    return sent;
}

/* ---- tests ------------------------------------------------------------------------------------- */

static void test_buffered_body(void) {
    srv_t s = {.limit = 1024};
    srv_start(&s);
    char out[4096];
    exchange(cm_http_port(s.h),
             "POST /a%20b/c?x=1%262&y HTTP/1.1\r\nHost: t\r\nX-Test: hi\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello", out,
             sizeof out);
    ASSERT(strncmp(out, "HTTP/1.1 200", 12) == 0);
    ASSERT(strstr(out, "X-Reply: yes") != NULL);
    ASSERT(strstr(out, "POST /a b/c q=x:1&2 h=hi nul=0 body=5:hello") != NULL);
    /* Chunked bodies under the limit are collected whole. */
    exchange(cm_http_port(s.h),
             "PUT /p HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n",
             out, sizeof out);
    ASSERT(strstr(out, "PUT /p q=: h=- nul=0 body=5:abcde") != NULL);
    cm_http_stop(s.h);
}

/* A %00 in the path or the query: the decoded strings end at it ("/a%00b" reads as "/a"), so the
 * request says so (the gateway refuses it: DELETE /devices/a%00b deleted device "a"). The mark is
 * per request: the next request on the same connection is clean. */
static void test_encoded_nul_is_reported(void) {
    srv_t s = {.limit = 1024};
    srv_start(&s);
    char out[8192];
    exchange(cm_http_port(s.h), "GET /a%00b HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n", out, sizeof out);
    ASSERT(strstr(out, "GET /a q=: h=- nul=1 ") != NULL);
    exchange(cm_http_port(s.h), "GET /p?x=a%00b HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n", out, sizeof out);
    ASSERT(strstr(out, "GET /p q=x:a h=- nul=1 ") != NULL);
    exchange(cm_http_port(s.h), "GET /p?x%00y=1 HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n", out, sizeof out);
    ASSERT(strstr(out, "nul=1 ") != NULL);
    exchange(cm_http_port(s.h),
             "GET /a%00b HTTP/1.1\r\nHost: t\r\n\r\nGET /c?x=%41 HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n", out,
             sizeof out);
    ASSERT(strstr(out, "GET /a q=: h=- nul=1 ") != NULL);
    ASSERT(strstr(out, "GET /c q=x:A h=- nul=0 ") != NULL);
    cm_http_stop(s.h);
}

static void test_declared_length_over_limit(void) {
    srv_t s = {.limit = 1024};
    srv_start(&s);
    char out[4096];
    /* The headers alone: the answer comes without a byte of the body sent. */
    exchange(cm_http_port(s.h), "POST /x HTTP/1.1\r\nHost: t\r\nContent-Length: 100000000\r\n\r\n", out, sizeof out);
    ASSERT(strncmp(out, "HTTP/1.1 413", 12) == 0);
    ASSERT(atomic_load(&s.too_big) == 1);
    cm_http_stop(s.h);
}

static void test_chunked_over_limit(void) {
    srv_t s = {.limit = 64 * 1024};
    srv_start(&s);
    char out[4096];
    /* A little over (256 KiB): read to its end and dropped, then a clean 413. */
    push_body(cm_http_port(s.h), "POST /x HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n", 1, 16, out, sizeof out);
    ASSERT(strncmp(out, "HTTP/1.1 413", 12) == 0);
    ASSERT(atomic_load(&s.too_big) == 1);
    /* Far over (256 MiB offered): the server stops reading after the drain allowance. */
    size_t sent = push_body(cm_http_port(s.h), "POST /x HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n", 1, 16384,
                            out, sizeof out);
    ASSERT(sent < (size_t)(128u << 20)); /* 64 MiB drained, plus socket buffers */
    ASSERT_INT_EQ(atomic_load(&s.handled), 2);
    cm_http_stop(s.h);
}

static void test_streamed_body_refused_midway(void) {
    srv_t s = {.limit = 0, .stream_body = 1, .stop_after = 100 * 1024};
    srv_start(&s);
    char out[4096];
    char hdr[128];
    /* 1 MiB: the consumer stops after 100 KiB, the rest is dropped, the answer is clean. */
    snprintf(hdr, sizeof hdr, "POST /up HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\nConnection: close\r\n\r\n", 64 * 16384);
    push_body(cm_http_port(s.h), hdr, 0, 64, out, sizeof out);
    ASSERT(strncmp(out, "HTTP/1.1 409", 12) == 0);
    ASSERT_INT_EQ(atomic_load(&s.handled), 1);
    size_t seen = atomic_load(&s.streamed);
    ASSERT(seen >= 100 * 1024 && seen < 200 * 1024); /* the callback saw no more after refusing */
    /* 256 MiB: the server stops reading after the drain allowance. */
    snprintf(hdr, sizeof hdr, "POST /up HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n", 16384 * 16384);
    size_t sent = push_body(cm_http_port(s.h), hdr, 0, 16384, out, sizeof out);
    ASSERT(sent < (size_t)(128u << 20)); /* 64 MiB drained, plus socket buffers */
    ASSERT_INT_EQ(atomic_load(&s.handled), 2);
    cm_http_stop(s.h);
}

static void test_stream_reply_done_then_cleanup(void) {
    srv_t s = {.limit = 1024};
    srv_start(&s);
    char out[4096];
    exchange(cm_http_port(s.h), "GET /stream HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n", out, sizeof out);
    ASSERT(strncmp(out, "HTTP/1.1 200", 12) == 0);
    ASSERT(strstr(out, "Transfer-Encoding: chunked") != NULL);
    ASSERT(strstr(out, "piece 0;") && strstr(out, "piece 1;") && strstr(out, "piece 2;"));
    cm_http_stop(s.h); /* every connection over: the counts are final */
    ASSERT_INT_EQ(atomic_load(&s.pieces), 3);
    ASSERT_INT_EQ(atomic_load(&s.done_calls), 1);
    ASSERT_INT_EQ(atomic_load(&s.cleanups), 1);
    ASSERT_INT_EQ(atomic_load(&s.done_before_cleanup), 1);
    ASSERT_STR_EQ(s.done_path, "/stream");
}

TEST_MAIN(TEST_ENTRY(test_buffered_body), TEST_ENTRY(test_encoded_nul_is_reported), TEST_ENTRY(test_declared_length_over_limit), TEST_ENTRY(test_chunked_over_limit),
          TEST_ENTRY(test_streamed_body_refused_midway), TEST_ENTRY(test_stream_reply_done_then_cleanup))
