/* The API HTTP server over libmicrohttpd (see cm_http.h): one thread per connection, so handlers
 * and stream producers may block; requests collected into cm_http_req_t; replies queued when the
 * handler returns. */
#include "cm_http.h"

#include <arpa/inet.h>
#include <microhttpd.h>
#include <netinet/in.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>

#include "cm_admin.h"
#include "cm_alloc.h"
#include "cm_buf.h"
#include "cm_err.h"
#include "cm_log.h"

/* Body bytes read and dropped after an answer is decided, before it goes out early. */
#define CM__HTTP_DRAIN_MAX (64u << 20)

struct cm_http_s {
    struct MHD_Daemon *d;
    cm_http_opts_t o;
    int port;
    atomic_int stopping;
};

struct cm_http_req_s {
    cm_http_t *h;
    struct MHD_Connection *c;
    char *method, *path;
    size_t limit;
    cm_buf_t body;
    int too_big;
    int (*body_fn)(cm_http_req_t *, const char *, size_t, void *);
    void *body_arg;
    char **q; /* name, value, name, value, ... */
    size_t nq, capq;
    void *user;
    void (*cleanup)(void *);
    struct MHD_Response *resp;
    int status;
    int queued;     /* r->resp is handed to MHD (and no longer ours) */
    size_t drained; /* body bytes read and dropped after the answer was decided */
    atomic_int refs; /* the connection, and a streamed response while MHD holds it */
    int nul;         /* the path or the query held %00 */
    char peer[64];
};

/* Per TCP connection (MHD's socket context): whether the request being read decoded a %00. MHD
 * percent-decodes the path and the query before the handler runs and hands them over as C
 * strings, which end at the NUL; only the unescape callback sees it. Requests on a connection are
 * read one after another, and the flag is taken (and cleared) when the handler first runs. */
typedef struct cm__http_conn_s {
    int nul;
} cm__http_conn_t;

/* Drops a reference; the last one runs the user's cleanup and frees the request. A streamed reply
 * can outlive the connection's "completed" notice (MHD frees the response after it), so its done()
 * still sees the request and the user pointer alive. */
static void cm__http_req_release(cm_http_req_t *r) {
    if (atomic_fetch_sub(&r->refs, 1) != 1) return;
    if (r->cleanup) r->cleanup(r->user);
    for (size_t i = 0; i < 2 * r->nq; i++) cm_free(r->q[i]);
    cm_free(r->q);
    cm_buf_free(&r->body);
    cm_free(r->method);
    cm_free(r->path);
    cm_free(r);
}

const char *cm_http_method(const cm_http_req_t *r) { return r->method; }
const char *cm_http_path(const cm_http_req_t *r) { return r->path; }
const char *cm_http_peer(const cm_http_req_t *r) { return r->peer; }
int cm_http_body_too_big(const cm_http_req_t *r) { return r->too_big; }
int cm_http_has_nul(const cm_http_req_t *r) { return r->nul; }
void *cm_http_req_user(const cm_http_req_t *r) { return r->user; }
int cm_http_port(const cm_http_t *h) { return h->port; }
int cm_http_stopping(const cm_http_t *h) { return atomic_load(&h->stopping); }

const char *cm_http_header(const cm_http_req_t *r, const char *name) {
    return MHD_lookup_connection_value(r->c, MHD_HEADER_KIND, name);
}

int cm_http_query_at(const cm_http_req_t *r, size_t i, const char **name, const char **value) {
    if (i >= r->nq) return -1;
    *name = r->q[2 * i];
    *value = r->q[2 * i + 1];
    return 0;
}

const char *cm_http_body(const cm_http_req_t *r, size_t *len) {
    if (len) *len = r->body.len;
    return r->body.data ? r->body.data : "";
}

void cm_http_req_stream_body(cm_http_req_t *r, int (*fn)(cm_http_req_t *, const char *, size_t, void *), void *arg) {
    r->body_fn = fn;
    r->body_arg = arg;
}

void cm_http_req_set_user(cm_http_req_t *r, void *user, void (*cleanup)(void *)) {
    r->user = user;
    r->cleanup = cleanup;
}

static void cm__http_headers(struct MHD_Response *resp, const cm_http_header_t *h, size_t n) {
    for (size_t i = 0; i < n; i++) MHD_add_response_header(resp, h[i].name, h[i].value);
}

int cm_http_reply(cm_http_req_t *r, int status, const char *content_type, const char *body, size_t len,
                  const cm_http_header_t *headers, size_t n_headers) {
    if (r->resp) return CM_ESTATE;
    char *copy = cm_malloc(len + 1);
    if (len) memcpy(copy, body, len);
    r->resp = MHD_create_response_from_buffer(len, copy, MHD_RESPMEM_MUST_FREE);
    if (content_type) MHD_add_response_header(r->resp, MHD_HTTP_HEADER_CONTENT_TYPE, content_type);
    cm__http_headers(r->resp, headers, n_headers);
    r->status = status;
    return 0;
}

typedef struct cm__http_stream_s {
    ssize_t (*read)(void *, char *, size_t);
    void (*done)(void *);
    void *arg;
    cm_http_req_t *req;
} cm__http_stream_t;

static ssize_t cm__http_stream_read(void *cls, uint64_t pos, char *buf, size_t max) {
    (void)pos;
    cm__http_stream_t *s = cls;
    ssize_t n = s->read(s->arg, buf, max);
    if (n > 0) return n;
    return n == 0 ? MHD_CONTENT_READER_END_OF_STREAM : MHD_CONTENT_READER_END_WITH_ERROR;
}

static void cm__http_stream_free(void *cls) {
    cm__http_stream_t *s = cls;
    if (s->done) s->done(s->arg);
    cm__http_req_release(s->req);
    cm_free(s);
}

int cm_http_reply_stream(cm_http_req_t *r, int status, const char *content_type, const cm_http_header_t *headers,
                         size_t n_headers, ssize_t (*read)(void *, char *, size_t), void (*done)(void *), void *arg) {
    if (r->resp) {
        if (done) done(arg);
        return CM_ESTATE;
    }
    cm__http_stream_t *s = cm_malloc(sizeof *s);
    s->read = read;
    s->done = done;
    s->arg = arg;
    s->req = r;
    atomic_fetch_add(&r->refs, 1);
    /* 32 KiB blocks: large enough for downloads, and a read returns whatever it has sooner. */
    r->resp = MHD_create_response_from_callback(MHD_SIZE_UNKNOWN, 32 * 1024, cm__http_stream_read, s, cm__http_stream_free);
    if (content_type) MHD_add_response_header(r->resp, MHD_HTTP_HEADER_CONTENT_TYPE, content_type);
    cm__http_headers(r->resp, headers, n_headers);
    r->status = status;
    return 0;
}

static enum MHD_Result cm__http_query(void *cls, enum MHD_ValueKind kind, const char *key, const char *value) {
    (void)kind;
    cm_http_req_t *r = cls;
    if (r->nq == r->capq) {
        r->capq = r->capq ? 2 * r->capq : 8;
        r->q = cm_realloc(r->q, 2 * r->capq * sizeof *r->q);
    }
    r->q[2 * r->nq] = cm_strdup(key ? key : "");
    r->q[2 * r->nq + 1] = cm_strdup(value ? value : "");
    r->nq++;
    return MHD_YES;
}

static void cm__http_peer(cm_http_req_t *r) {
    const union MHD_ConnectionInfo *ci = MHD_get_connection_info(r->c, MHD_CONNECTION_INFO_CLIENT_ADDRESS);
    const struct sockaddr *sa = ci ? ci->client_addr : NULL;
    char host[INET6_ADDRSTRLEN] = "?";
    int port = 0;
    if (sa && sa->sa_family == AF_INET) {
        const struct sockaddr_in *in = (const void *)sa;
        inet_ntop(AF_INET, &in->sin_addr, host, sizeof host);
        port = ntohs(in->sin_port);
    } else if (sa && sa->sa_family == AF_INET6) {
        const struct sockaddr_in6 *in6 = (const void *)sa;
        inet_ntop(AF_INET6, &in6->sin6_addr, host, sizeof host);
        port = ntohs(in6->sin6_port);
    }
    snprintf(r->peer, sizeof r->peer, "%s:%d", host, port);
}

/* The answer is decided: handle() has run (unless begin() answered), r->resp is built. */
static void cm__http_decide(cm_http_t *h, cm_http_req_t *r) {
    if (!r->resp) h->o.handle(r, h->o.arg);
    if (!r->resp) {
        CM_LOG(CM_LOG_ERROR, "%s: no answer for %s %s", h->o.name ? h->o.name : "http", r->method, r->path);
        static const char msg[] = "{\"code\":13,\"status\":\"INTERNAL\",\"message\":\"the server did not answer\"}";
        cm_http_reply(r, 500, "application/json", msg, sizeof msg - 1, NULL, 0);
    }
}

/* Decides if need be and hands the answer to MHD. Queued before the body is in, MHD reads no more
 * of it and closes the connection after the answer. */
static enum MHD_Result cm__http_queue(cm_http_t *h, cm_http_req_t *r) {
    cm__http_decide(h, r);
    enum MHD_Result ok = MHD_queue_response(r->c, (unsigned)r->status, r->resp);
    MHD_destroy_response(r->resp);
    r->queued = 1;
    return ok;
}

/* An answer decided before the body is in (a refused key, a body over the limit, a consumer that
 * gave up) waits while the rest of the body is read and dropped, up to CM__HTTP_DRAIN_MAX: closing
 * a socket with unread data resets the connection, and the client would lose the answer. Past
 * that (or when the client waits for "100 Continue" and has sent nothing) it goes out at once. */
static enum MHD_Result cm__http_drain(cm_http_t *h, cm_http_req_t *r, size_t n) {
    r->drained += n;
    if (r->drained > CM__HTTP_DRAIN_MAX) return cm__http_queue(h, r);
    return MHD_YES;
}

static void cm__http_conn_notify(void *cls, struct MHD_Connection *c, void **socket_context,
                                 enum MHD_ConnectionNotificationCode toe) {
    (void)cls;
    (void)c;
    if (toe == MHD_CONNECTION_NOTIFY_STARTED) {
        *socket_context = cm_calloc(1, sizeof(cm__http_conn_t));
    } else {
        cm_free(*socket_context);
        *socket_context = NULL;
    }
}

/* MHD's own decoding, noting a decoded NUL on the connection. */
static size_t cm__http_unescape(void *cls, struct MHD_Connection *c, char *s) {
    (void)cls;
    size_t n = MHD_http_unescape(s);
    if (memchr(s, 0, n)) {
        const union MHD_ConnectionInfo *ci = MHD_get_connection_info(c, MHD_CONNECTION_INFO_SOCKET_CONTEXT);
        cm__http_conn_t *cc = ci ? ci->socket_context : NULL;
        if (cc) cc->nul = 1;
    }
    return n;
}

static enum MHD_Result cm__http_access(void *cls, struct MHD_Connection *c, const char *url, const char *method,
                                       const char *version, const char *upload_data, size_t *upload_data_size,
                                       void **con_cls) {
    (void)version;
    cm_http_t *h = cls;
    cm_http_req_t *r = *con_cls;
    if (!r) {
        r = cm_calloc(1, sizeof *r);
        atomic_init(&r->refs, 1);
        r->h = h;
        r->c = c;
        r->method = cm_strdup(method);
        r->path = cm_strdup(url);
        const union MHD_ConnectionInfo *ci = MHD_get_connection_info(c, MHD_CONNECTION_INFO_SOCKET_CONTEXT);
        cm__http_conn_t *cc = ci ? ci->socket_context : NULL;
        if (cc) {
            r->nul = cc->nul;
            cc->nul = 0;
        }
        cm__http_peer(r);
        MHD_get_connection_values(c, MHD_GET_ARGUMENT_KIND, cm__http_query, r);
        *con_cls = r;
        r->limit = h->o.begin ? h->o.begin(r, h->o.arg) : 0;
        const char *cl = MHD_lookup_connection_value(c, MHD_HEADER_KIND, MHD_HTTP_HEADER_CONTENT_LENGTH);
        unsigned long long declared = cl ? strtoull(cl, NULL, 10) : 0;
        if (!r->resp && cl && !r->body_fn && declared > r->limit) { /* refused before a byte of the body is read */
            r->too_big = 1;
            cm__http_decide(h, r);
        }
        if (r->resp) {
            const char *expect = MHD_lookup_connection_value(c, MHD_HEADER_KIND, MHD_HTTP_HEADER_EXPECT);
            if ((expect && strcasecmp(expect, "100-continue") == 0) || declared > CM__HTTP_DRAIN_MAX) return cm__http_queue(h, r);
        }
        return MHD_YES; /* a decided answer goes out when the (small) body is in: see cm__http_drain */
    }
    if (*upload_data_size) {
        size_t n = *upload_data_size;
        *upload_data_size = 0;
        if (r->queued) return MHD_NO; /* MHD should read no more after an early answer */
        if (r->resp) return cm__http_drain(h, r, n);
        if (r->body_fn) {
            if (r->body_fn(r, upload_data, n, r->body_arg)) {
                cm__http_decide(h, r); /* the consumer gave up: handle() answers now */
            }
        } else if (r->body.len + n > r->limit) { /* no declared length (chunked): found out now */
            r->too_big = 1;
            cm_buf_free(&r->body);
            cm__http_decide(h, r);
        } else {
            cm_buf_append(&r->body, upload_data, n);
        }
        return MHD_YES;
    }
    if (r->queued) return MHD_YES;
    return cm__http_queue(h, r);
}

static void cm__http_completed(void *cls, struct MHD_Connection *c, void **con_cls, enum MHD_RequestTerminationCode toe) {
    (void)cls;
    (void)c;
    (void)toe;
    cm_http_req_t *r = *con_cls;
    if (!r) return;
    *con_cls = NULL;
    if (r->resp && !r->queued) MHD_destroy_response(r->resp); /* decided, never sent: a stream's done() runs now */
    cm__http_req_release(r);
}

cm_http_t *cm_http_start(const cm_http_opts_t *o, int *err) {
    struct sockaddr_storage ss;
    unsigned sl;
    if (!o->listen || cm_parse_hostport(o->listen, &ss, &sl) != 0 || !o->handle) {
        if (err) *err = CM_EINVAL;
        return NULL;
    }
    cm_http_t *h = cm_calloc(1, sizeof *h);
    h->o = *o;
    unsigned flags = MHD_USE_THREAD_PER_CONNECTION | MHD_USE_INTERNAL_POLLING_THREAD | MHD_USE_POLL;
    if (ss.ss_family == AF_INET6) flags |= MHD_USE_IPv6;
    h->d = MHD_start_daemon(flags, 0, NULL, NULL, cm__http_access, h, MHD_OPTION_SOCK_ADDR, (struct sockaddr *)&ss,
                            MHD_OPTION_CONNECTION_LIMIT, o->max_connections ? o->max_connections : 1024u,
                            MHD_OPTION_CONNECTION_TIMEOUT, o->idle_timeout_s ? o->idle_timeout_s : 60u,
                            MHD_OPTION_NOTIFY_COMPLETED, cm__http_completed, h, MHD_OPTION_NOTIFY_CONNECTION,
                            cm__http_conn_notify, NULL, MHD_OPTION_UNESCAPE_CALLBACK, cm__http_unescape, NULL, MHD_OPTION_END);
    if (!h->d) {
        cm_free(h);
        if (err) *err = CM_EBIND;
        return NULL;
    }
    const union MHD_DaemonInfo *info = MHD_get_daemon_info(h->d, MHD_DAEMON_INFO_BIND_PORT);
    h->port = info ? info->port : 0;
    if (err) *err = 0;
    return h;
}

void cm_http_stop(cm_http_t *h) {
    if (!h) return;
    atomic_store(&h->stopping, 1);
    /* Waits for every connection thread: stream producers watch cm_http_stopping() to end. */
    MHD_stop_daemon(h->d);
    cm_free(h);
}
