/* An HTTP/1.1 server for APIs (libmicrohttpd, one thread per connection): requests with buffered
 * or streamed bodies, whole or streamed responses (Server-Sent Events, downloads).
 *
 * Flow of a request: begin() runs when the headers are in and chooses how the body is taken
 * (buffered up to a limit, or streamed to a callback); handle() runs when the body is complete and
 * must answer with exactly one cm_http_reply() or cm_http_reply_stream(). A body over the limit is
 * not kept: handle() runs as soon as the overflow is known (at once for a Content-Length over it,
 * or when a chunked body passes it) and sees cm_http_body_too_big() (so the service words the 413).
 * An answer decided before the body is in (by begin(), an overflow, or a stream consumer giving up)
 * is sent once up to 64 MiB more of the body has been read and dropped (so the client, still
 * sending, is not reset before it reads the answer); past that, or when the client asked for
 * "100 Continue", it is sent at once and the connection closes after it.
 * Connections are kept alive between requests. Each connection has its own thread, so begin(),
 * handle() and a stream's read callback may block (a backend call, a wait for the next event).
 *
 * Ownership: a cm_http_req_t and everything its accessors return live until the response has been
 * sent (or the client went away) and, for a streamed response, its done() has run; the user
 * pointer's cleanup (cm_http_req_set_user) runs then, last. */
#ifndef CM_HTTP_H
#define CM_HTTP_H

#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

typedef struct cm_http_s cm_http_t;
typedef struct cm_http_req_s cm_http_req_t;

typedef struct cm_http_opts_s {
    const char *listen;       /* "0.0.0.0:8080", "127.0.0.1:0" (free port), "[::1]:8080" */
    unsigned max_connections; /* 0: 1024 */
    unsigned idle_timeout_s;  /* idle keep-alive connections close after this; 0: 60 */
    const char *name;         /* for logs: "gateway" */
    /* Headers are in. Return the largest body to buffer, or call cm_http_req_stream_body(). */
    size_t (*begin)(cm_http_req_t *r, void *arg);
    void (*handle)(cm_http_req_t *r, void *arg);
    void *arg;
} cm_http_opts_t;

/* Starts listening. NULL with *err (CM_EINVAL for a bad address, CM_EBIND) on failure. */
cm_http_t *cm_http_start(const cm_http_opts_t *o, int *err);
int cm_http_port(const cm_http_t *h);
/* Stops accepting, ends open connections (streams see their read callback's connection gone) and
 * frees. Accepts NULL. */
void cm_http_stop(cm_http_t *h);
/* 1 once cm_http_stop has begun: long-lived read callbacks should end their streams. */
int cm_http_stopping(const cm_http_t *h);

const char *cm_http_method(const cm_http_req_t *r);
/* The path, percent-decoded, without the query. */
const char *cm_http_path(const cm_http_req_t *r);
/* 1 when the path or a query parameter (name or value) held an encoded NUL byte ("%00"): the
 * strings above end at it, so "/devices/a%00b" reads as "/devices/a". Refuse such a request. */
int cm_http_has_nul(const cm_http_req_t *r);
/* A request header (case-insensitive name), or NULL. */
const char *cm_http_header(const cm_http_req_t *r, const char *name);
/* The i-th query parameter (decoded, in order; repeated names repeat): 0, or -1 past the end. A
 * parameter without '=' has value "". */
int cm_http_query_at(const cm_http_req_t *r, size_t i, const char **name, const char **value);
/* The buffered body (NUL-terminated; len may be NULL). */
const char *cm_http_body(const cm_http_req_t *r, size_t *len);
int cm_http_body_too_big(const cm_http_req_t *r);
/* The peer's address ("127.0.0.1:53412"). */
const char *cm_http_peer(const cm_http_req_t *r);

/* From begin(): the body goes to fn as it arrives, in pieces of any size, instead of being
 * buffered. fn returns 0 to go on, or non-zero to take no more: handle() runs at once (answer
 * then) and fn sees nothing more of the body. */
void cm_http_req_stream_body(cm_http_req_t *r, int (*fn)(cm_http_req_t *r, const char *data, size_t len, void *arg),
                             void *arg);

void cm_http_req_set_user(cm_http_req_t *r, void *user, void (*cleanup)(void *user));
void *cm_http_req_user(const cm_http_req_t *r);

/* A header for a reply: name and value copied. */
typedef struct cm_http_header_s {
    const char *name, *value;
} cm_http_header_t;

/* Answers with status and body (copied). 0, or CM_ESTATE if the request was answered already. */
int cm_http_reply(cm_http_req_t *r, int status, const char *content_type, const char *body, size_t len,
                  const cm_http_header_t *headers, size_t n_headers);
/* Answers with a body produced by read(arg, buf, max) as the client takes it: it returns bytes
 * written (> 0; it may block until it has some), 0 at the end, or -1 to cut the connection (the
 * client went away or the producer failed). done(arg) runs once when the response is over, however
 * it ended. Chunked transfer encoding. */
int cm_http_reply_stream(cm_http_req_t *r, int status, const char *content_type, const cm_http_header_t *headers,
                         size_t n_headers, ssize_t (*read)(void *arg, char *buf, size_t max), void (*done)(void *arg),
                         void *arg);

#endif
