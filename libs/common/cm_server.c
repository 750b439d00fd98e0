/* gRPC server on the C core completion-queue API.
 *
 * One completion queue, polled by a fixed pool of worker threads. Every call is a cm_call_t whose
 * state advances on completion events (request matched, message received, send done, call closed),
 * so an idle stream costs memory, not a thread. See docs/rpc.md for the model and lifetimes.
 *
 * Counting rule that makes teardown safe: call->ops counts batches in flight plus the event being
 * handled right now. The call is finalised (done callback, metrics, grpc_call_unref) when ops drops
 * to zero after the close event, and no batch is ever started on a finalised call. The server shuts
 * its completion queue down only after every call is finalised, so no batch can be started on a
 * dead queue (which aborts the process in the core). */
#include "cm_rpc_internal.h"
#include "cm_err.h"
#include "cm_pbdec.h"
#include "cm_time.h"

#include <errno.h>
#include <stddef.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define CM__DEFAULT_THREADS 4
#define CM__DEFAULT_MAX_RECV (4 * 1024 * 1024)
#define CM__DEFAULT_SEND_QUEUE 1024
#define CM__DEFAULT_GRACE_MS 10000
#define CM__GENERIC_SLOTS 2
#define CM__MAX_SERVICES 16
#define CM__INLINE_ARENA 1024

const double cm__lat_bounds[CM__LAT_BUCKETS] = {0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025,
                                                0.05,   0.1,   0.25,   0.5,   1.0,  5.0};

typedef struct cm__sendq_s {
    grpc_byte_buffer *buf;
    struct cm__sendq_s *next;
} cm__sendq_t;

typedef struct cm__md_list_s {
    grpc_metadata *md;
    size_t n, cap;
} cm__md_list_t;

struct cm_call_s {
    cm_server_t *srv;
    cm__method_reg_t *reg;
    grpc_call *call;
    gpr_timespec deadline;
    grpc_metadata_array req_md;
    grpc_byte_buffer *payload; /* the request for registered-with-payload methods, then recv buffer */
    int close_cancelled;       /* written by the core when the close op completes */

    cm__tag_t tag_request, tag_close, tag_recv, tag_send;

    pthread_mutex_t mu;
    int refs;                  /* framework's 1 + cm_call_ref()s */
    int ops;                   /* batches in flight + event being handled */
    unsigned initial_md_sent : 1, status_queued : 1, status_in_batch : 1, status_sent : 1,
        send_in_flight : 1, closed : 1, finalised : 1, send_failed : 1, close_with_status : 1, aborted : 1,
        w_running : 1, w_again : 1; /* writable: a callback owns the call / the queue ran dry meanwhile */
    cm__sendq_t *q_head, *q_tail;
    int q_len;
    unsigned n_queued; /* messages ever queued (writable() tells a send from none) */
    grpc_byte_buffer *inflight_buf;
    cm__md_list_t init_md, trail_md;
    int status_code;
    char *status_msg;
    grpc_slice status_slice;

    cm_arena_t arena;
    void *user;
    char *peer;
    cm_trace_t trace;
    struct timespec started;
    max_align_t arena_inline[CM__INLINE_ARENA / sizeof(max_align_t)];
};

/* A posted slot for calls to methods nobody registered: answered UNIMPLEMENTED. */
typedef struct cm__generic_s {
    cm_server_t *srv;
    grpc_call *call;
    grpc_call_details details;
    grpc_metadata_array md;
    int cancelled;
    grpc_slice status;
    cm__tag_t tag_req, tag_done;
} cm__generic_t;

struct cm_server_s {
    char *name;
    char *listen;
    int threads;
    int max_recv;
    int max_send_queue;
    int grace_ms;
    cm_tls_files_t tls;
    int has_tls;

    grpc_server *server;
    grpc_completion_queue *cq;
    pthread_t *workers;
    int started;
    int port;

    const cm_service_t *services[CM__MAX_SERVICES];
    size_t n_services;
    cm__method_reg_t *methods;
    size_t n_methods;
    int slots_per_method;

    /* Counters are atomics so the per-call path takes no server-wide lock; mu/cv only carry
     * wake-ups to cm_server_shutdown (see cm__wake_shutdown for why that cannot lose one). */
    pthread_mutex_t mu;
    pthread_cond_t cv;
    atomic_int live_calls;
    atomic_int pending_slots;
    atomic_int shutting_down;
    atomic_int shutdown_notified;
    int stopped;
    cm__tag_t tag_shutdown;

    cm__health_t *health;
    cm_service_t refl_svc;
    void (*on_shutdown)(void *);
    void *on_shutdown_arg;
};

static void cm__call_pump_locked(cm_call_t *c);
static void cm__call_op_done(cm_call_t *c);
static int cm__post_slot(cm_server_t *srv, cm__method_reg_t *reg);
static void cm__post_generic(cm_server_t *srv);

static const char *const cm__status_names[CM_STATUS_COUNT] = {
    "OK",           "CANCELLED",         "UNKNOWN",          "INVALID_ARGUMENT",   "DEADLINE_EXCEEDED",
    "NOT_FOUND",    "ALREADY_EXISTS",    "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION",
    "ABORTED",      "OUT_OF_RANGE",      "UNIMPLEMENTED",    "INTERNAL",           "UNAVAILABLE",
    "DATA_LOSS",    "UNAUTHENTICATED"};

const char *cm_status_name(int code) {
    return code >= 0 && code < CM_STATUS_COUNT ? cm__status_names[code] : "UNKNOWN_CODE";
}

/* ---- encoding -------------------------------------------------------------------------- */

/* The message bytes of buf as one contiguous run. One uncompressed slice is used in place; else
 * the bytes are copied into *hold, which the caller unrefs (an empty slice otherwise). NULL when
 * the buffer cannot be read. */
static const uint8_t *cm__flatten(grpc_byte_buffer *buf, size_t *n, grpc_slice *hold) {
    *hold = grpc_empty_slice();
    if (buf->type == GRPC_BB_RAW && buf->data.raw.compression == GRPC_COMPRESS_NONE &&
        buf->data.raw.slice_buffer.count == 1) {
        *n = GRPC_SLICE_LENGTH(buf->data.raw.slice_buffer.slices[0]);
        return GRPC_SLICE_START_PTR(buf->data.raw.slice_buffer.slices[0]);
    }
    grpc_byte_buffer_reader r;
    if (!grpc_byte_buffer_reader_init(&r, buf)) return NULL;
    *hold = grpc_byte_buffer_reader_readall(&r);
    grpc_byte_buffer_reader_destroy(&r);
    *n = GRPC_SLICE_LENGTH(*hold);
    return GRPC_SLICE_START_PTR(*hold);
}

ProtobufCMessage *cm__decode(const ProtobufCMessageDescriptor *desc, ProtobufCAllocator *alloc,
                             grpc_byte_buffer *buf) {
    if (!buf) return NULL;
    size_t n;
    grpc_slice hold;
    const uint8_t *p = cm__flatten(buf, &n, &hold);
    ProtobufCMessage *m = p ? protobuf_c_message_unpack(desc, alloc, n, p) : NULL;
    grpc_slice_unref(hold);
    return m;
}

ProtobufCMessage *cm__decode_arena(const ProtobufCMessageDescriptor *desc, cm_arena_t *a, grpc_byte_buffer *buf, char *why,
                                   size_t cap) {
    why[0] = 0;
    if (!buf) return NULL;
    size_t n;
    grpc_slice hold;
    const uint8_t *p = cm__flatten(buf, &n, &hold);
    ProtobufCMessage *m = p ? cm__pb_decode_server(desc, a, p, n, why, cap) : NULL;
    grpc_slice_unref(hold);
    return m;
}

grpc_byte_buffer *cm__encode(const ProtobufCMessage *msg) {
    size_t n = protobuf_c_message_get_packed_size(msg);
    grpc_slice s = grpc_slice_malloc(n);
    protobuf_c_message_pack(msg, GRPC_SLICE_START_PTR(s));
    grpc_byte_buffer *bb = grpc_raw_byte_buffer_create(&s, 1);
    grpc_slice_unref(s);
    return bb;
}

static size_t cm__varint(uint8_t *p, uint64_t v) {
    size_t n = 0;
    while (v >= 0x80) {
        p[n++] = (uint8_t)(v | 0x80);
        v >>= 7;
    }
    p[n++] = (uint8_t)v;
    return n;
}

/* msg, then the bytes field `field` holding data: two slices, the second data itself. Protobuf
 * parsers take fields in any order, so appending the field is the same message. */
static grpc_byte_buffer *cm__encode_tail(const ProtobufCMessage *msg, uint32_t field, const void *data, size_t len,
                                         void (*release)(void *), void *arg) {
    size_t n = protobuf_c_message_get_packed_size(msg);
    grpc_slice s[2];
    s[0] = grpc_slice_malloc(n + 20);
    uint8_t *p = GRPC_SLICE_START_PTR(s[0]);
    size_t k = protobuf_c_message_pack(msg, p);
    k += cm__varint(p + k, (uint64_t)field << 3 | 2); /* wire type 2: length-delimited */
    k += cm__varint(p + k, len);
    s[0] = grpc_slice_sub_no_ref(s[0], 0, k);
    s[1] = release ? grpc_slice_new_with_user_data((void *)data, len, release, arg) : grpc_slice_from_static_buffer(data, len);
    grpc_byte_buffer *bb = grpc_raw_byte_buffer_create(s, 2);
    grpc_slice_unref(s[0]);
    grpc_slice_unref(s[1]);
    return bb;
}

char *cm__read_file(const char *path, size_t *len) {
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    size_t cap = 4096, n = 0;
    char *buf = cm_malloc(cap);
    for (;;) {
        if (n + 1 >= cap) buf = cm_realloc(buf, cap *= 2);
        size_t r = fread(buf + n, 1, cap - n - 1, f);
        if (r == 0) break;
        n += r;
    }
    int bad = ferror(f);
    fclose(f);
    if (bad) {
        cm_free(buf);
        return NULL;
    }
    buf[n] = '\0';
    if (len) *len = n;
    return buf;
}

/* ---- call objects ---------------------------------------------------------------------- */

static cm_call_t *cm__call_new(cm_server_t *srv, cm__method_reg_t *reg) {
    /* The inline arena needs no zeroing; everything before it does. */
    cm_call_t *c = cm_malloc(sizeof *c);
    memset(c, 0, offsetof(cm_call_t, arena_inline));
    c->srv = srv;
    c->reg = reg;
    c->refs = 1;
    grpc_metadata_array_init(&c->req_md);
    pthread_mutex_init(&c->mu, NULL);
    c->tag_request = (cm__tag_t){CM__TAG_REQUEST, c};
    c->tag_close = (cm__tag_t){CM__TAG_CLOSE, c};
    c->tag_recv = (cm__tag_t){CM__TAG_RECV, c};
    c->tag_send = (cm__tag_t){CM__TAG_SEND, c};
    c->status_slice = grpc_empty_slice();
    cm_arena_init(&c->arena, c->arena_inline, sizeof c->arena_inline);
    return c;
}

static void cm__md_list_free(cm__md_list_t *l) {
    for (size_t i = 0; i < l->n; i++) {
        grpc_slice_unref(l->md[i].key);
        grpc_slice_unref(l->md[i].value);
    }
    cm_free(l->md);
    l->md = NULL;
    l->n = l->cap = 0;
}

static void cm__call_free(cm_call_t *c) {
    while (c->q_head) {
        cm__sendq_t *q = c->q_head;
        c->q_head = q->next;
        grpc_byte_buffer_destroy(q->buf);
        cm_free(q);
    }
    if (c->inflight_buf) grpc_byte_buffer_destroy(c->inflight_buf);
    if (c->payload) grpc_byte_buffer_destroy(c->payload);
    grpc_metadata_array_destroy(&c->req_md);
    cm__md_list_free(&c->init_md);
    cm__md_list_free(&c->trail_md);
    grpc_slice_unref(c->status_slice);
    cm_free(c->status_msg);
    cm_free(c->peer);
    cm_arena_free(&c->arena);
    pthread_mutex_destroy(&c->mu);
    cm_free(c);
}

void cm_call_ref(cm_call_t *c) {
    pthread_mutex_lock(&c->mu);
    c->refs++;
    pthread_mutex_unlock(&c->mu);
}

void cm_call_unref(cm_call_t *c) {
    pthread_mutex_lock(&c->mu);
    int last = --c->refs == 0;
    pthread_mutex_unlock(&c->mu);
    if (last) cm__call_free(c);
}

cm_call_t *cm_call_new_detached(const cm_service_t *svc, const char *method) {
    const cm_method_t *m = NULL;
    for (size_t i = 0; i < svc->n_methods && !m; i++)
        if (strcmp(svc->methods[i].name, method) == 0) m = &svc->methods[i];
    const ProtobufCMethodDescriptor *md = protobuf_c_service_descriptor_get_method_by_name(svc->desc, method);
    if (!m || !md) return NULL;
    /* The registration a server would make; owned by the call (cm_call_free_detached). */
    cm__method_reg_t *reg = cm_calloc(1, sizeof *reg);
    reg->svc = svc;
    reg->m = m;
    reg->in = md->input;
    reg->out = md->output;
    snprintf(reg->path, sizeof reg->path, "/%s/%s", svc->desc->name, method);
    reg->svc_name = svc->desc->name;
    reg->method_name = m->name;
    cm_call_t *c = cm__call_new(NULL, reg);
    c->deadline = gpr_inf_future(GPR_CLOCK_MONOTONIC);
    return c;
}

const char *cm_call_detached_message(const cm_call_t *c) { return c->status_msg; }

void cm_call_free_detached(cm_call_t *c) {
    if (!c) return;
    cm__method_reg_t *reg = c->reg;
    cm__call_free(c);
    cm_free(reg);
}

static double cm__elapsed_s(const struct timespec *start) {
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    return (double)(now.tv_sec - start->tv_sec) + (double)(now.tv_nsec - start->tv_nsec) / 1e9;
}

/* The status the client saw, for metrics. */
static int cm__call_final_code(cm_call_t *c) {
    if (c->status_sent || c->aborted) return c->status_code;
    if (c->close_cancelled) {
        gpr_timespec now = gpr_now(GPR_CLOCK_MONOTONIC);
        if (gpr_time_cmp(c->deadline, gpr_inf_future(GPR_CLOCK_MONOTONIC)) != 0 && gpr_time_cmp(now, c->deadline) >= 0)
            return CM_STATUS_DEADLINE_EXCEEDED;
        return CM_STATUS_CANCELLED;
    }
    return c->status_code;
}

static void cm__record_stats(cm__method_reg_t *reg, int code, double secs) {
    if (code < 0 || code >= CM_STATUS_COUNT) code = CM_STATUS_UNKNOWN;
    atomic_fetch_add_explicit(&reg->stats.codes[code], 1, memory_order_relaxed);
    int b = 0;
    while (b < CM__LAT_BUCKETS && secs > cm__lat_bounds[b]) b++;
    atomic_fetch_add_explicit(&reg->stats.lat_buckets[b], 1, memory_order_relaxed);
    atomic_fetch_add_explicit(&reg->stats.lat_sum_ns, (uint64_t)(secs * 1e9), memory_order_relaxed);
}

/* Called after a counter changed. The waiter checks the counters while holding mu and sleeps on cv
 * atomically releasing it, so taking mu here before broadcasting means the waiter either has not
 * checked yet (and will see the new value) or is already asleep (and gets the broadcast). */
static void cm__wake_shutdown(cm_server_t *srv) {
    if (!atomic_load(&srv->shutting_down)) return;
    pthread_mutex_lock(&srv->mu);
    pthread_cond_broadcast(&srv->cv);
    pthread_mutex_unlock(&srv->mu);
}

/* ops reached zero: the call is over on the wire and no batch is in flight. */
static void cm__call_finalise(cm_call_t *c) {
    cm_server_t *srv = c->srv;
    int cancelled = c->close_cancelled || !c->status_sent;
    if (c->reg->m->done) {
        const cm_trace_t *prev = cm_trace_set_current(&c->trace);
        c->reg->m->done(c, cancelled);
        cm_trace_set_current(prev);
    }
    double secs = cm__elapsed_s(&c->started);
    cm__record_stats(c->reg, cm__call_final_code(c), secs);
    if (cm__log_level <= CM_LOG_DEBUG) {
        char ms[32];
        snprintf(ms, sizeof ms, "%.3f", secs * 1000);
        cm_trace_set_current(&c->trace);
        cm_log_kv(CM_LOG_DEBUG, "rpc finished", "method", c->reg->path, "code", cm_status_name(cm__call_final_code(c)),
                  "ms", ms, NULL);
        cm_trace_set_current(NULL);
    }
    grpc_call_unref(c->call);
    c->call = NULL;
    /* The metadata slices belonged to the grpc call. */
    grpc_metadata_array_destroy(&c->req_md);
    grpc_metadata_array_init(&c->req_md);
    cm_call_unref(c);
    atomic_fetch_sub(&srv->live_calls, 1);
    cm__wake_shutdown(srv);
}

static void cm__call_op_done(cm_call_t *c) {
    pthread_mutex_lock(&c->mu);
    int last = --c->ops == 0;
    if (last) c->finalised = 1;
    pthread_mutex_unlock(&c->mu);
    if (last) cm__call_finalise(c);
}

static void cm__start_batch_or_die(cm_call_t *c, const grpc_op *ops, size_t n, cm__tag_t *tag) {
    grpc_call_error e = grpc_call_start_batch(c->call, ops, n, tag, NULL);
    if (e != GRPC_CALL_OK) {
        /* Only a programming error gets here (two batches of one kind, bad flags): fail loudly. */
        CM_LOG(CM_LOG_ERROR, "grpc_call_start_batch on %s failed: %d", c->reg->path, (int)e);
        abort();
    }
}

/* Starts the next send batch if none is in flight. Caller holds c->mu. */
static void cm__call_pump_locked(cm_call_t *c) {
    if (c->send_in_flight || c->finalised || c->status_sent) return;
    if (c->send_failed || (c->closed && c->close_cancelled)) return;
    grpc_op ops[4];
    size_t n = 0;
    memset(ops, 0, sizeof ops);
    int with_message = c->q_head != NULL;
    int with_status = c->status_queued && (!c->q_head || !c->q_head->next);
    if (!with_message && !with_status) return;
    if (!c->initial_md_sent) {
        ops[n].op = GRPC_OP_SEND_INITIAL_METADATA;
        ops[n].data.send_initial_metadata.count = c->init_md.n;
        ops[n].data.send_initial_metadata.metadata = c->init_md.md;
        n++;
        c->initial_md_sent = 1;
    }
    if (with_message) {
        cm__sendq_t *q = c->q_head;
        c->q_head = q->next;
        if (!c->q_head) c->q_tail = NULL;
        c->q_len--;
        c->inflight_buf = q->buf;
        cm_free(q);
        ops[n].op = GRPC_OP_SEND_MESSAGE;
        ops[n].data.send_message.send_message = c->inflight_buf;
        n++;
    }
    if (with_status) {
        grpc_slice_unref(c->status_slice);
        c->status_slice = c->status_msg ? grpc_slice_from_copied_string(c->status_msg) : grpc_empty_slice();
        ops[n].op = GRPC_OP_SEND_STATUS_FROM_SERVER;
        ops[n].data.send_status_from_server.status = (grpc_status_code)c->status_code;
        ops[n].data.send_status_from_server.status_details = &c->status_slice;
        ops[n].data.send_status_from_server.trailing_metadata_count = c->trail_md.n;
        ops[n].data.send_status_from_server.trailing_metadata = c->trail_md.md;
        n++;
        c->status_in_batch = 1;
        if (c->close_with_status) {
            /* Unary call not watching for cancellation: learn how it ended in the same batch. */
            ops[n].op = GRPC_OP_RECV_CLOSE_ON_SERVER;
            ops[n].data.recv_close_on_server.cancelled = &c->close_cancelled;
            n++;
        }
    }
    c->send_in_flight = 1;
    c->ops++;
    cm__start_batch_or_die(c, ops, n, &c->tag_send);
}

/* Queues msg, or buf when msg is NULL (taking it, also on failure). */
static int cm__call_queue_locked(cm_call_t *c, const ProtobufCMessage *msg, grpc_byte_buffer *buf, int ignore_limit) {
    int rc = 0;
    if (c->finalised || c->status_queued || c->closed || c->send_failed) rc = CM_ECLOSED;
    else if (!ignore_limit && c->q_len >= c->srv->max_send_queue) rc = CM_EFULL;
    if (rc) {
        if (buf) grpc_byte_buffer_destroy(buf);
        return rc;
    }
    c->n_queued++;
    cm__sendq_t *q = cm_malloc(sizeof *q);
    q->buf = msg ? cm__encode(msg) : buf;
    q->next = NULL;
    if (c->q_tail)
        c->q_tail->next = q;
    else
        c->q_head = q;
    c->q_tail = q;
    c->q_len++;
    return 0;
}

int cm_call_send(cm_call_t *c, const ProtobufCMessage *msg) {
    pthread_mutex_lock(&c->mu);
    int rc = cm__call_queue_locked(c, msg, NULL, 0);
    if (rc == 0) cm__call_pump_locked(c);
    pthread_mutex_unlock(&c->mu);
    return rc;
}

int cm_call_send_tail(cm_call_t *c, const ProtobufCMessage *msg, uint32_t field, const void *data, size_t len,
                      void (*release)(void *), void *arg) {
    const ProtobufCFieldDescriptor *f = protobuf_c_message_descriptor_get_field(msg->descriptor, (unsigned)field);
    if (!f || f->type != PROTOBUF_C_TYPE_BYTES || f->label == PROTOBUF_C_LABEL_REPEATED) {
        if (release) release(arg);
        return CM_EINVAL;
    }
    /* Encoded before the lock is taken: the header is small, the data is not copied. */
    grpc_byte_buffer *buf = cm__encode_tail(msg, field, data, len, release, arg);
    pthread_mutex_lock(&c->mu);
    int rc = cm__call_queue_locked(c, NULL, buf, 0);
    if (rc == 0) cm__call_pump_locked(c);
    pthread_mutex_unlock(&c->mu);
    return rc;
}

static int cm__call_finish_locked(cm_call_t *c, int code, const char *msg) {
    if (c->finalised || c->status_queued || c->send_failed || (c->closed && c->close_cancelled)) return CM_ECLOSED;
    if (code < 0 || code >= CM_STATUS_COUNT) code = CM_STATUS_UNKNOWN;
    if (code != CM_STATUS_OK && gpr_time_cmp(c->deadline, gpr_inf_future(c->deadline.clock_type)) != 0 &&
        gpr_time_cmp(gpr_now(c->deadline.clock_type), c->deadline) >= 0) {
        /* Past the deadline the client sees DEADLINE_EXCEEDED whatever raced it; say so consistently. */
        code = CM_STATUS_DEADLINE_EXCEEDED;
        msg = "deadline exceeded";
    }
    c->status_queued = 1;
    c->status_code = code;
    if (msg) {
        cm_free(c->status_msg);
        c->status_msg = cm_strdup(msg);
    } else if (code == CM_STATUS_OK) {
        cm_free(c->status_msg);
        c->status_msg = NULL;
    }
    cm__call_pump_locked(c);
    return 0;
}

int cm_call_finish(cm_call_t *c, int code, const char *msg) {
    pthread_mutex_lock(&c->mu);
    int rc = cm__call_finish_locked(c, code, msg);
    pthread_mutex_unlock(&c->mu);
    return rc;
}

int cm_call_abort(cm_call_t *c, int code, const char *msg) {
    pthread_mutex_lock(&c->mu);
    if (c->finalised || c->closed || c->status_in_batch || c->aborted) {
        pthread_mutex_unlock(&c->mu);
        return CM_ECLOSED;
    }
    while (c->q_head) {
        cm__sendq_t *q = c->q_head;
        c->q_head = q->next;
        grpc_byte_buffer_destroy(q->buf);
        cm_free(q);
    }
    c->q_tail = NULL;
    c->q_len = 0;
    c->aborted = 1;
    c->status_queued = 1; /* no more sends, finishes or callbacks */
    c->status_code = code >= 0 && code < CM_STATUS_COUNT ? code : CM_STATUS_UNKNOWN;
    cm_free(c->status_msg);
    c->status_msg = cm_strdup(msg ? msg : cm_status_name(c->status_code));
    /* Starts no batch: in-flight batches fail and the close op reports the end, which finalises
     * the call through the usual ops count. */
    grpc_call_cancel_with_status(c->call, (grpc_status_code)c->status_code, c->status_msg, NULL);
    pthread_mutex_unlock(&c->mu);
    return 0;
}

/* Finishes with the code a callback returned, keeping a message it set through cm_call_fail. */
static void cm__call_finish_from_callback(cm_call_t *c, int code, const ProtobufCMessage *resp) {
    pthread_mutex_lock(&c->mu);
    if (code == CM_STATUS_OK && resp) cm__call_queue_locked(c, resp, NULL, 1);
    if (code != CM_STATUS_OK && !c->status_msg) c->status_msg = cm_strdup(cm_status_name(code));
    cm__call_finish_locked(c, code, NULL);
    pthread_mutex_unlock(&c->mu);
}

int cm_call_respond(cm_call_t *c, int code, const ProtobufCMessage *resp, const char *msg) {
    pthread_mutex_lock(&c->mu);
    int rc = CM_ECLOSED;
    if (!(c->finalised || c->status_queued || c->send_failed || (c->closed && c->close_cancelled))) {
        if (code == CM_STATUS_OK && resp) cm__call_queue_locked(c, resp, NULL, 1);
        rc = cm__call_finish_locked(c, code, msg ? msg : code == CM_STATUS_OK ? NULL : cm_status_name(code));
    }
    pthread_mutex_unlock(&c->mu);
    return rc;
}

int cm_call_fail(cm_call_t *c, int code, const char *fmt, ...) {
    char buf[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    pthread_mutex_lock(&c->mu);
    /* Once a status is queued its message is final: a late cm_call_fail must not relabel it. */
    if (!c->status_queued) {
        cm_free(c->status_msg);
        c->status_msg = cm_strdup(buf);
    }
    pthread_mutex_unlock(&c->mu);
    return code;
}

/* ---- accessors ------------------------------------------------------------------------- */

void *cm_call_service_ctx(const cm_call_t *c) { return c->reg->svc->ctx; }
const char *cm_call_method(const cm_call_t *c) { return c->reg->path; }
void *cm_call_alloc(cm_call_t *c, size_t n) { return cm_arena_alloc(&c->arena, n); }
char *cm_call_strdup(cm_call_t *c, const char *s) { return cm_arena_strdup(&c->arena, s); }
char *cm_call_strndup(cm_call_t *c, const char *s, size_t n) { return cm_arena_strndup(&c->arena, s, n); }
ProtobufCAllocator *cm_call_pb_allocator(cm_call_t *c) { return &c->arena.pb; }
void cm_call_set_user(cm_call_t *c, void *user) { c->user = user; }
void *cm_call_user(const cm_call_t *c) { return c->user; }
const char *cm_call_trace_id(const cm_call_t *c) { return c->trace.trace_id; }

int cm_call_cancelled(const cm_call_t *c) {
    cm_call_t *m = (cm_call_t *)c;
    pthread_mutex_lock(&m->mu);
    int r = (m->closed && m->close_cancelled) || m->send_failed;
    pthread_mutex_unlock(&m->mu);
    if (!r && gpr_time_cmp(c->deadline, gpr_inf_future(GPR_CLOCK_MONOTONIC)) != 0)
        r = gpr_time_cmp(gpr_now(GPR_CLOCK_MONOTONIC), c->deadline) >= 0;
    return r;
}

int64_t cm_call_deadline_ms(const cm_call_t *c) {
    if (gpr_time_cmp(c->deadline, gpr_inf_future(c->deadline.clock_type)) == 0) return -1;
    gpr_timespec left = gpr_time_sub(c->deadline, gpr_now(c->deadline.clock_type));
    int64_t ms = (int64_t)left.tv_sec * 1000 + left.tv_nsec / 1000000;
    return ms < 0 ? 0 : ms;
}

const char *cm_call_peer(cm_call_t *c) {
    if (!c->peer && c->call) {
        char *p = grpc_call_get_peer(c->call);
        c->peer = cm_strdup(p ? p : "");
        gpr_free(p);
    }
    return c->peer ? c->peer : "";
}

static int cm__slice_eq(grpc_slice s, const char *str) {
    size_t n = strlen(str);
    return GRPC_SLICE_LENGTH(s) == n && memcmp(GRPC_SLICE_START_PTR(s), str, n) == 0;
}

const char *cm_call_metadata(cm_call_t *c, const char *key, size_t *len) {
    for (size_t i = 0; i < c->req_md.count; i++) {
        if (!cm__slice_eq(c->req_md.metadata[i].key, key)) continue;
        grpc_slice v = c->req_md.metadata[i].value;
        if (len) *len = GRPC_SLICE_LENGTH(v);
        return cm_arena_strndup(&c->arena, (const char *)GRPC_SLICE_START_PTR(v), GRPC_SLICE_LENGTH(v));
    }
    return NULL;
}

int cm_call_metadata_at(cm_call_t *c, size_t i, const char **key, const char **val, size_t *vlen) {
    if (i >= c->req_md.count) return CM_ENOTFOUND;
    grpc_slice k = c->req_md.metadata[i].key, v = c->req_md.metadata[i].value;
    *key = cm_arena_strndup(&c->arena, (const char *)GRPC_SLICE_START_PTR(k), GRPC_SLICE_LENGTH(k));
    *val = cm_arena_strndup(&c->arena, (const char *)GRPC_SLICE_START_PTR(v), GRPC_SLICE_LENGTH(v));
    if (vlen) *vlen = GRPC_SLICE_LENGTH(v);
    return 0;
}

static void cm__md_list_add(cm__md_list_t *l, const char *key, const char *val, size_t vlen) {
    if (l->n == l->cap) {
        l->cap = l->cap ? l->cap * 2 : 4;
        l->md = cm_realloc(l->md, l->cap * sizeof *l->md);
    }
    memset(&l->md[l->n], 0, sizeof l->md[l->n]);
    l->md[l->n].key = grpc_slice_from_copied_string(key);
    l->md[l->n].value = grpc_slice_from_copied_buffer(val, vlen ? vlen : strlen(val));
    l->n++;
}

/* gRPC refuses a batch with an illegal header, and cm__start_batch_or_die would abort the
 * process: reject it here, where the caller can still handle the error. */
int cm__md_ok(const char *key, const char *val, size_t vlen) {
    grpc_slice k = grpc_slice_from_static_string(key);
    if (!grpc_header_key_is_legal(k)) return 0;
    if (grpc_is_binary_header(k)) return 1;
    grpc_slice v = grpc_slice_from_static_buffer(val, vlen);
    return grpc_header_nonbin_value_is_legal(v);
}

/* Adds to the initial or trailing list unless that metadata already went out. */
static int cm__call_add_md(cm_call_t *c, int trailing, const char *key, const char *val, size_t vlen) {
    if (!vlen) vlen = strlen(val);
    if (!cm__md_ok(key, val, vlen)) return CM_EINVAL;
    pthread_mutex_lock(&c->mu);
    int rc = (trailing ? c->status_in_batch : c->initial_md_sent) ? CM_ESTATE : 0;
    if (rc == 0) cm__md_list_add(trailing ? &c->trail_md : &c->init_md, key, val, vlen);
    pthread_mutex_unlock(&c->mu);
    return rc;
}

int cm_call_add_initial_metadata(cm_call_t *c, const char *key, const char *val, size_t vlen) {
    return cm__call_add_md(c, 0, key, val, vlen);
}

int cm_call_add_trailing_metadata(cm_call_t *c, const char *key, const char *val, size_t vlen) {
    return cm__call_add_md(c, 1, key, val, vlen);
}

/* ---- event handlers -------------------------------------------------------------------- */

/* Before a callback runs: forget a message an earlier callback left with cm_call_fail (it belongs
 * to no status), and say whether the call is still open for callbacks. A call another thread
 * finished or aborted gets no more callbacks but `done`. */
static int cm__callback_begin(cm_call_t *c) {
    pthread_mutex_lock(&c->mu);
    int open = !c->status_queued;
    if (open) {
        cm_free(c->status_msg);
        c->status_msg = NULL;
    }
    pthread_mutex_unlock(&c->mu);
    return open;
}

static void cm__post_recv(cm_call_t *c) {
    pthread_mutex_lock(&c->mu);
    if (!c->status_queued && !c->closed && !c->finalised) {
        grpc_op op;
        memset(&op, 0, sizeof op);
        op.op = GRPC_OP_RECV_MESSAGE;
        op.data.recv_message.recv_message = &c->payload;
        c->ops++;
        cm__start_batch_or_die(c, &op, 1, &c->tag_recv);
    }
    pthread_mutex_unlock(&c->mu);
}

static void cm__set_trace(cm_call_t *c) {
    size_t n = 0;
    for (size_t i = 0; i < c->req_md.count; i++) {
        if (!cm__slice_eq(c->req_md.metadata[i].key, "traceparent")) continue;
        grpc_slice v = c->req_md.metadata[i].value;
        n = GRPC_SLICE_LENGTH(v);
        if (cm_trace_parse(&c->trace, (const char *)GRPC_SLICE_START_PTR(v), n) == 0) return;
    }
    cm_trace_new(&c->trace);
}

/* Room for writable(): fewer than the method's writable_depth messages queued or in flight, and
 * still open. Under c->mu. */
static int cm__call_drained_locked(const cm_call_t *c) {
    int depth = c->reg->m->writable_depth > 1 ? c->reg->m->writable_depth : 1;
    return c->q_len + (int)c->send_in_flight < depth && !c->status_queued && !c->send_failed && !c->closed;
}

/* Runs writable() while the queue keeps draining under it. The caller set w_running; call_now says
 * whether the queue is known to be drained already. Callbacks of the call are serialised by
 * w_running: a send completion that finds it set leaves w_again for this loop instead. */
static void cm__writable_loop(cm_call_t *c, int call_now) {
    const cm_method_t *m = c->reg->m;
    for (;;) {
        int sent = 0;
        if (call_now && cm__callback_begin(c)) {
            pthread_mutex_lock(&c->mu);
            unsigned before = c->n_queued;
            pthread_mutex_unlock(&c->mu);
            int code = m->writable(c);
            cm_arena_reset(&c->arena);
            if (code != CM_PENDING) cm__call_finish_from_callback(c, code, NULL);
            pthread_mutex_lock(&c->mu);
            sent = code == CM_PENDING && c->n_queued != before;
            pthread_mutex_unlock(&c->mu);
        }
        pthread_mutex_lock(&c->mu);
        /* Again while there is room: after a send (filling the pipeline up to writable_depth), or
         * when a send completed meanwhile. */
        call_now = (sent || c->w_again) && cm__call_drained_locked(c);
        c->w_again = 0;
        if (!call_now) c->w_running = 0;
        pthread_mutex_unlock(&c->mu);
        if (!call_now) return;
    }
}

static void cm__on_request(cm_call_t *c, int ok) {
    cm_server_t *srv = c->srv;
    if (ok) {
        /* live_calls goes up before the replacement slot is counted, and down only when this call
         * is finalised, so a drained server (both zero) can never have a slot in flight. */
        atomic_fetch_add(&srv->live_calls, 1);
        /* Replace the slot before running the handler so that a slow handler never leaves the
         * method without a posted request. A slot posted just after shutdown began is failed by
         * the core at once (ok = 0 below). */
        if (!atomic_load(&srv->shutting_down)) cm__post_slot(srv, c->reg);
    }
    atomic_fetch_sub(&srv->pending_slots, 1);
    cm__wake_shutdown(srv);
    if (!ok) { /* server shutdown: the slot was never matched */
        cm_call_unref(c);
        return;
    }
    clock_gettime(CLOCK_MONOTONIC, &c->started);
    cm__set_trace(c);
    const cm_trace_t *prev = cm_trace_set_current(&c->trace);
    const cm_method_t *m = c->reg->m;
    /* An async unary call may outlive this event, so it watches like a stream: the close op keeps
     * it alive until the status is out or the client is gone. */
    if (m->kind == CM_RPC_UNARY && !m->watch_cancel && !m->async) {
        c->ops = 1; /* this event; the close op rides with the status (see cm__call_pump_locked) */
        c->close_with_status = 1;
    } else {
        /* Posted up front so that cancellation is seen while the handler runs or the stream idles. */
        c->ops = 2; /* this event + the close op */
        grpc_op op;
        memset(&op, 0, sizeof op);
        op.op = GRPC_OP_RECV_CLOSE_ON_SERVER;
        op.data.recv_close_on_server.cancelled = &c->close_cancelled;
        cm__start_batch_or_die(c, &op, 1, &c->tag_close);
    }
    int code = CM_PENDING, parked = 0;
    if (m->kind == CM_RPC_UNARY || m->kind == CM_RPC_SERVER_STREAM) {
        char why[160];
        ProtobufCMessage *req = cm__decode_arena(c->reg->in, &c->arena, c->payload, why, sizeof why);
        if (c->payload) grpc_byte_buffer_destroy(c->payload);
        c->payload = NULL;
        if (!req && why[0]) {
            code = cm_call_fail(c, CM_STATUS_INVALID_ARGUMENT, "malformed request: %s (strings must be UTF-8 without NUL bytes)", why);
        } else if (!req) {
            code = cm_call_fail(c, CM_STATUS_INVALID_ARGUMENT, "malformed request: not a valid %s message",
                                c->reg->in->name);
        } else if (m->kind == CM_RPC_UNARY) {
            ProtobufCMessage *resp = cm_arena_alloc(&c->arena, c->reg->out->sizeof_message);
            protobuf_c_message_init(c->reg->out, resp);
            code = m->unary(c, req, resp);
            if (code == CM_PENDING && !m->async)
                code = cm_call_fail(c, CM_STATUS_INTERNAL, "unary handler returned CM_PENDING");
            if (code == CM_PENDING)
                parked = 1; /* the arena now belongs to the handler until cm_call_respond */
            else
                cm__call_finish_from_callback(c, code, resp);
            code = CM_PENDING; /* finished above, or later by cm_call_respond */
        } else {
            if (m->writable) c->w_running = 1; /* no other callback can exist yet: no lock needed */
            code = m->start(c, req);
        }
    } else {
        if (m->start) code = m->start(c, NULL);
    }
    if (code != CM_PENDING) cm__call_finish_from_callback(c, code, NULL);
    if (m->kind == CM_RPC_SERVER_STREAM && m->writable) {
        cm_arena_reset(&c->arena);
        pthread_mutex_lock(&c->mu);
        c->w_again = code == CM_PENDING && cm__call_drained_locked(c);
        pthread_mutex_unlock(&c->mu);
        cm__writable_loop(c, 0);
    }
    /* Reset before the first receive is posted: its completion may run on another worker at once
     * and decode into this arena. A parked async unary call keeps it (cm_call_respond may already
     * be running on another thread: touch nothing of the call but the ops count). */
    if (!parked) cm_arena_reset(&c->arena);
    if (code == CM_PENDING && (m->kind == CM_RPC_CLIENT_STREAM || m->kind == CM_RPC_BIDI)) cm__post_recv(c);
    cm_trace_set_current(prev);
    cm__call_op_done(c);
}

static void cm__on_recv(cm_call_t *c, int ok) {
    grpc_byte_buffer *buf = c->payload;
    c->payload = NULL;
    const cm_method_t *m = c->reg->m;
    if (!cm__callback_begin(c)) { /* finished or aborted from another thread meanwhile */
        if (buf) grpc_byte_buffer_destroy(buf);
        cm__call_op_done(c);
        return;
    }
    const cm_trace_t *prev = cm_trace_set_current(&c->trace);
    if (!ok || !buf) {
        if (buf) grpc_byte_buffer_destroy(buf);
        if (ok) { /* the client half-closed */
            if (m->kind == CM_RPC_CLIENT_STREAM) {
                ProtobufCMessage *resp = cm_arena_alloc(&c->arena, c->reg->out->sizeof_message);
                protobuf_c_message_init(c->reg->out, resp);
                int code = m->half_close(c, resp);
                if (code == CM_PENDING) code = cm_call_fail(c, CM_STATUS_INTERNAL, "half_close returned CM_PENDING");
                cm__call_finish_from_callback(c, code, resp);
            } else {
                int code = m->half_close ? m->half_close(c, NULL) : CM_STATUS_OK;
                if (code != CM_PENDING) cm__call_finish_from_callback(c, code, NULL);
            }
        }
        cm_arena_reset(&c->arena);
        cm_trace_set_current(prev);
        cm__call_op_done(c);
        return;
    }
    char why[160];
    ProtobufCMessage *msg = cm__decode_arena(c->reg->in, &c->arena, buf, why, sizeof why);
    grpc_byte_buffer_destroy(buf);
    int code;
    if (!msg && why[0])
        code = cm_call_fail(c, CM_STATUS_INVALID_ARGUMENT, "malformed stream message: %s (strings must be UTF-8 without NUL bytes)", why);
    else if (!msg)
        code = cm_call_fail(c, CM_STATUS_INVALID_ARGUMENT, "malformed stream message: not a valid %s message",
                            c->reg->in->name);
    else
        code = m->message(c, msg);
    cm_arena_reset(&c->arena);
    if (code == CM_PENDING) {
        cm__post_recv(c);
    } else if (code == CM_STATUS_OK && m->kind == CM_RPC_CLIENT_STREAM) {
        /* The handler has seen enough: answer now, as if the client had half-closed. */
        ProtobufCMessage *resp = cm_arena_alloc(&c->arena, c->reg->out->sizeof_message);
        protobuf_c_message_init(c->reg->out, resp);
        code = m->half_close(c, resp);
        if (code == CM_PENDING) code = CM_STATUS_INTERNAL;
        cm__call_finish_from_callback(c, code, resp);
        cm_arena_reset(&c->arena);
    } else {
        cm__call_finish_from_callback(c, code, NULL);
    }
    cm_trace_set_current(prev);
    cm__call_op_done(c);
}

static void cm__on_send(cm_call_t *c, int ok) {
    pthread_mutex_lock(&c->mu);
    if (c->inflight_buf) {
        grpc_byte_buffer_destroy(c->inflight_buf);
        c->inflight_buf = NULL;
    }
    c->send_in_flight = 0;
    if (c->status_in_batch) c->status_sent = ok;
    if (c->status_in_batch && c->close_with_status) c->closed = 1;
    int run_writable = 0;
    if (!ok) {
        c->send_failed = 1;
        if (c->status_in_batch) c->status_sent = 0;
    } else {
        cm__call_pump_locked(c);
        if (c->reg->m->writable && c->reg->m->kind == CM_RPC_SERVER_STREAM && cm__call_drained_locked(c)) {
            if (c->w_running)
                c->w_again = 1;
            else
                run_writable = c->w_running = 1;
        }
    }
    pthread_mutex_unlock(&c->mu);
    if (run_writable) {
        const cm_trace_t *prev = cm_trace_set_current(&c->trace);
        cm__writable_loop(c, 1);
        cm_trace_set_current(prev);
    }
    cm__call_op_done(c);
}

static void cm__on_close(cm_call_t *c) {
    pthread_mutex_lock(&c->mu);
    c->closed = 1;
    pthread_mutex_unlock(&c->mu);
    cm__call_op_done(c);
}

static void cm__on_generic(cm__generic_t *g, int ok) {
    cm_server_t *srv = g->srv;
    if (ok) {
        atomic_fetch_add(&srv->live_calls, 1);
        if (!atomic_load(&srv->shutting_down)) cm__post_generic(srv);
    }
    atomic_fetch_sub(&srv->pending_slots, 1);
    cm__wake_shutdown(srv);
    if (!ok) {
        grpc_call_details_destroy(&g->details);
        grpc_metadata_array_destroy(&g->md);
        cm_free(g);
        return;
    }
    char msg[300];
    snprintf(msg, sizeof msg, "unknown method %.*s", (int)GRPC_SLICE_LENGTH(g->details.method),
             (const char *)GRPC_SLICE_START_PTR(g->details.method));
    g->status = grpc_slice_from_copied_string(msg);
    grpc_op ops[3];
    memset(ops, 0, sizeof ops);
    ops[0].op = GRPC_OP_SEND_INITIAL_METADATA;
    ops[1].op = GRPC_OP_SEND_STATUS_FROM_SERVER;
    ops[1].data.send_status_from_server.status = GRPC_STATUS_UNIMPLEMENTED;
    ops[1].data.send_status_from_server.status_details = &g->status;
    ops[2].op = GRPC_OP_RECV_CLOSE_ON_SERVER;
    ops[2].data.recv_close_on_server.cancelled = &g->cancelled;
    if (grpc_call_start_batch(g->call, ops, 3, &g->tag_done, NULL) != GRPC_CALL_OK) abort();
}

static void cm__on_generic_done(cm__generic_t *g) {
    cm_server_t *srv = g->srv;
    grpc_call_unref(g->call);
    grpc_slice_unref(g->status);
    grpc_call_details_destroy(&g->details);
    grpc_metadata_array_destroy(&g->md);
    cm_free(g);
    atomic_fetch_sub(&srv->live_calls, 1);
    cm__wake_shutdown(srv);
}

static void cm__dispatch(cm__tag_t *tag, int ok) {
    switch (tag->kind) {
    case CM__TAG_REQUEST: cm__on_request(tag->obj, ok); break;
    case CM__TAG_CLOSE: cm__on_close(tag->obj); break;
    case CM__TAG_RECV: cm__on_recv(tag->obj, ok); break;
    case CM__TAG_SEND: cm__on_send(tag->obj, ok); break;
    case CM__TAG_GENERIC: cm__on_generic(tag->obj, ok); break;
    case CM__TAG_GENERIC_DONE: cm__on_generic_done(tag->obj); break;
    case CM__TAG_SHUTDOWN: {
        cm_server_t *srv = tag->obj;
        atomic_store(&srv->shutdown_notified, 1);
        cm__wake_shutdown(srv);
        break;
    }
    }
}

static void *cm__worker(void *arg) {
    cm_server_t *srv = arg;
    for (;;) {
        grpc_event ev = grpc_completion_queue_next(srv->cq, gpr_inf_future(GPR_CLOCK_MONOTONIC), NULL);
        if (ev.type == GRPC_QUEUE_SHUTDOWN) break;
        if (ev.type == GRPC_OP_COMPLETE) cm__dispatch(ev.tag, ev.success);
    }
    return NULL;
}

/* ---- slots ----------------------------------------------------------------------------- */

static int cm__post_slot(cm_server_t *srv, cm__method_reg_t *reg) {
    cm_call_t *c = cm__call_new(srv, reg);
    int with_payload = reg->m->kind == CM_RPC_UNARY || reg->m->kind == CM_RPC_SERVER_STREAM;
    grpc_call_error e = grpc_server_request_registered_call(srv->server, reg->handle, &c->call, &c->deadline, &c->req_md,
                                                            with_payload ? &c->payload : NULL, srv->cq, srv->cq,
                                                            &c->tag_request);
    if (e != GRPC_CALL_OK) {
        CM_LOG(CM_LOG_ERROR, "request_registered_call for %s failed: %d", reg->path, (int)e);
        cm_call_unref(c);
        return CM_ERPC;
    }
    atomic_fetch_add(&srv->pending_slots, 1);
    return 0;
}

static void cm__post_generic(cm_server_t *srv) {
    cm__generic_t *g = cm_calloc(1, sizeof *g);
    g->srv = srv;
    g->tag_req = (cm__tag_t){CM__TAG_GENERIC, g};
    g->tag_done = (cm__tag_t){CM__TAG_GENERIC_DONE, g};
    g->status = grpc_empty_slice();
    grpc_call_details_init(&g->details);
    grpc_metadata_array_init(&g->md);
    if (grpc_server_request_call(srv->server, &g->call, &g->details, &g->md, srv->cq, srv->cq, &g->tag_req) !=
        GRPC_CALL_OK) {
        grpc_call_details_destroy(&g->details);
        grpc_metadata_array_destroy(&g->md);
        cm_free(g);
        return;
    }
    atomic_fetch_add(&srv->pending_slots, 1);
}

/* ---- server lifecycle ------------------------------------------------------------------ */

cm_server_t *cm_server_new(const cm_server_opts_t *o, int *err) {
    if (!o || !o->listen || !*o->listen) {
        if (err) *err = CM_EINVAL;
        return NULL;
    }
    cm_server_t *srv = cm_calloc(1, sizeof *srv);
    srv->name = cm_strdup(o->name ? o->name : "server");
    srv->listen = cm_strdup(o->listen);
    srv->threads = o->threads > 0 ? o->threads : CM__DEFAULT_THREADS;
    srv->max_recv = o->max_recv_bytes > 0 ? o->max_recv_bytes : CM__DEFAULT_MAX_RECV;
    srv->max_send_queue = o->max_send_queue > 0 ? o->max_send_queue : CM__DEFAULT_SEND_QUEUE;
    srv->grace_ms = o->grace_ms > 0 ? o->grace_ms : CM__DEFAULT_GRACE_MS;
    srv->slots_per_method = srv->threads < 2 ? 2 : srv->threads;
    if (o->tls) {
        srv->has_tls = 1;
        srv->tls.cert_file = o->tls->cert_file ? cm_strdup(o->tls->cert_file) : NULL;
        srv->tls.key_file = o->tls->key_file ? cm_strdup(o->tls->key_file) : NULL;
        srv->tls.ca_file = o->tls->ca_file ? cm_strdup(o->tls->ca_file) : NULL;
        srv->tls.require_client_cert = o->tls->require_client_cert;
    }
    pthread_mutex_init(&srv->mu, NULL);
    cm_cond_init_monotonic(&srv->cv);
    srv->tag_shutdown = (cm__tag_t){CM__TAG_SHUTDOWN, srv};
    grpc_init();
    cm__health_init(srv);
    cm_server_add_service(srv, cm__health_service(srv));
    cm__reflection_fill(&srv->refl_svc, srv);
    cm_server_add_service(srv, &srv->refl_svc);
    if (err) *err = 0;
    return srv;
}

int cm_server_add_service(cm_server_t *srv, const cm_service_t *svc) {
    if (srv->started || srv->n_services == CM__MAX_SERVICES) return CM_ESTATE;
    const ProtobufCServiceDescriptor *d = svc->desc;
    for (unsigned i = 0; i < d->n_methods; i++) {
        int found = 0;
        for (size_t j = 0; j < svc->n_methods; j++) found |= strcmp(svc->methods[j].name, d->methods[i].name) == 0;
        if (!found) {
            CM_LOG(CM_LOG_ERROR, "service %s: method %s has no handler", d->name, d->methods[i].name);
            return CM_EINVAL;
        }
    }
    for (size_t j = 0; j < svc->n_methods; j++) {
        const cm_method_t *m = &svc->methods[j];
        int found = 0;
        for (unsigned i = 0; i < d->n_methods; i++) found |= strcmp(m->name, d->methods[i].name) == 0;
        int cbs_ok = (m->kind == CM_RPC_UNARY && m->unary) ||
                     (m->kind == CM_RPC_SERVER_STREAM && m->start) ||
                     (m->kind == CM_RPC_CLIENT_STREAM && m->message && m->half_close) ||
                     (m->kind == CM_RPC_BIDI && m->message);
        if (!found || !cbs_ok) {
            CM_LOG(CM_LOG_ERROR, "service %s: handler %s %s", d->name, m->name,
                   found ? "lacks the callbacks its kind needs" : "is not a method of the service");
            return CM_EINVAL;
        }
    }
    srv->services[srv->n_services++] = svc;
    return 0;
}

static grpc_server_credentials *cm__server_creds(cm_server_t *srv, int *err) {
    if (!srv->has_tls) return grpc_insecure_server_credentials_create();
    char *cert = srv->tls.cert_file ? cm__read_file(srv->tls.cert_file, NULL) : NULL;
    char *key = srv->tls.key_file ? cm__read_file(srv->tls.key_file, NULL) : NULL;
    char *ca = srv->tls.ca_file ? cm__read_file(srv->tls.ca_file, NULL) : NULL;
    grpc_server_credentials *creds = NULL;
    if (!cert || !key || (srv->tls.ca_file && !ca)) {
        CM_LOG(CM_LOG_ERROR, "TLS: cannot read %s", !cert ? "the certificate file" : !key ? "the key file" : "the CA file");
        *err = CM_ETLS;
    } else {
        grpc_ssl_pem_key_cert_pair pair = {key, cert};
        grpc_ssl_client_certificate_request_type req =
            srv->tls.require_client_cert ? GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY
            : ca                          ? GRPC_SSL_REQUEST_CLIENT_CERTIFICATE_AND_VERIFY
                                          : GRPC_SSL_DONT_REQUEST_CLIENT_CERTIFICATE;
        creds = grpc_ssl_server_credentials_create_ex(ca, &pair, 1, req, NULL);
        if (!creds) *err = CM_ETLS;
    }
    cm_free(cert);
    cm_free(key);
    cm_free(ca);
    return creds;
}

int cm_server_start(cm_server_t *srv) {
    if (srv->started) return CM_ESTATE;
    grpc_arg args[3];
    args[0].type = GRPC_ARG_INTEGER;
    args[0].key = (char *)GRPC_ARG_MAX_RECEIVE_MESSAGE_LENGTH;
    args[0].value.integer = srv->max_recv;
    /* A second server on a busy port must fail, not silently share it (see docs/rpc.md). */
    args[1].type = GRPC_ARG_INTEGER;
    args[1].key = (char *)GRPC_ARG_ALLOW_REUSEPORT;
    args[1].value.integer = 0;
    args[2].type = GRPC_ARG_INTEGER;
    args[2].key = (char *)GRPC_ARG_HTTP2_MAX_PINGS_WITHOUT_DATA;
    args[2].value.integer = 0;
    grpc_channel_args cargs = {3, args};
    srv->server = grpc_server_create(&cargs, NULL);
    srv->cq = grpc_completion_queue_create_for_next(NULL);
    grpc_server_register_completion_queue(srv->server, srv->cq, NULL);

    size_t total = 0;
    for (size_t i = 0; i < srv->n_services; i++) total += srv->services[i]->n_methods;
    srv->methods = cm_calloc(total, sizeof *srv->methods);
    for (size_t i = 0; i < srv->n_services; i++) {
        const cm_service_t *svc = srv->services[i];
        for (size_t j = 0; j < svc->n_methods; j++) {
            cm__method_reg_t *r = &srv->methods[srv->n_methods++];
            const ProtobufCMethodDescriptor *md = protobuf_c_service_descriptor_get_method_by_name(svc->desc, svc->methods[j].name);
            r->svc = svc;
            r->m = &svc->methods[j];
            r->in = md->input;
            r->out = md->output;
            r->svc_name = svc->desc->name;
            r->method_name = md->name;
            snprintf(r->path, sizeof r->path, "/%s/%s", svc->desc->name, md->name);
            int with_payload = r->m->kind == CM_RPC_UNARY || r->m->kind == CM_RPC_SERVER_STREAM;
            r->handle = grpc_server_register_method(srv->server, r->path, NULL,
                                                    with_payload ? GRPC_SRM_PAYLOAD_READ_INITIAL_BYTE_BUFFER
                                                                 : GRPC_SRM_PAYLOAD_NONE,
                                                    0);
            if (!r->handle) {
                CM_LOG(CM_LOG_ERROR, "cannot register %s (listed twice?)", r->path);
                return CM_EINVAL;
            }
        }
    }
    int err = 0;
    grpc_server_credentials *creds = cm__server_creds(srv, &err);
    if (!creds) return err ? err : CM_ETLS;
    srv->port = grpc_server_add_http2_port(srv->server, srv->listen, creds);
    grpc_server_credentials_release(creds);
    if (srv->port <= 0) {
        CM_LOG(CM_LOG_ERROR, "cannot listen on %s (address in use or invalid)", srv->listen);
        srv->port = 0;
        return CM_EBIND;
    }
    grpc_server_start(srv->server);
    srv->started = 1;

    for (size_t i = 0; i < srv->n_methods; i++)
        for (int k = 0; k < srv->slots_per_method; k++) cm__post_slot(srv, &srv->methods[i]);
    for (int k = 0; k < CM__GENERIC_SLOTS; k++) cm__post_generic(srv);

    srv->workers = cm_calloc((size_t)srv->threads, sizeof *srv->workers);
    for (int i = 0; i < srv->threads; i++) pthread_create(&srv->workers[i], NULL, cm__worker, srv);

    cm_server_set_health(srv, "", CM_HEALTH_SERVING);
    for (size_t i = 0; i < srv->n_services; i++) cm_server_set_health(srv, srv->services[i]->desc->name, CM_HEALTH_SERVING);
    cm_log_kv(CM_LOG_INFO, "grpc server listening", "listen", srv->listen, "tls", srv->has_tls ? "on" : "off", NULL);
    return 0;
}

int cm_server_port(const cm_server_t *srv) { return srv->port; }

void cm_server_on_shutdown(cm_server_t *srv, void (*fn)(void *arg), void *arg) {
    srv->on_shutdown = fn;
    srv->on_shutdown_arg = arg;
}

/* No call in flight and no request slot posted. */
static int cm__calls_drained(cm_server_t *srv) {
    return atomic_load(&srv->live_calls) == 0 && atomic_load(&srv->pending_slots) == 0;
}

void cm_server_shutdown(cm_server_t *srv) {
    if (!srv->started || srv->stopped) return;
    /* Tell health watchers and load balancers first, so that new traffic goes elsewhere. */
    cm__health_shutdown(srv);
    if (srv->on_shutdown) srv->on_shutdown(srv->on_shutdown_arg);
    atomic_store(&srv->shutting_down, 1);
    grpc_server_shutdown_and_notify(srv->server, srv->cq, &srv->tag_shutdown);

    /* Phase 1: in-flight calls get the grace period. */
    struct timespec until;
    cm_abstime_in(&until, srv->grace_ms);
    pthread_mutex_lock(&srv->mu);
    int timed_out = 0;
    while (!cm__calls_drained(srv) && !timed_out)
        timed_out = pthread_cond_timedwait(&srv->cv, &srv->mu, &until) == ETIMEDOUT;
    int left = atomic_load(&srv->live_calls);
    pthread_mutex_unlock(&srv->mu);
    /* Phase 2: cancel what is left and close every connection. Also when no call is left: the
     * core reports shutdown only once all connections are closed, and a peer that stopped
     * reading never lets its connection close gracefully. */
    if (left > 0) cm_log_kv(CM_LOG_WARN, "grace period over, cancelling in-flight calls", NULL);
    grpc_server_cancel_all_calls(srv->server);
    pthread_mutex_lock(&srv->mu);
    while (!cm__calls_drained(srv) || !atomic_load(&srv->shutdown_notified)) pthread_cond_wait(&srv->cv, &srv->mu);
    pthread_mutex_unlock(&srv->mu);

    grpc_completion_queue_shutdown(srv->cq);
    for (int i = 0; i < srv->threads; i++) pthread_join(srv->workers[i], NULL);
    srv->stopped = 1;
    cm_log_kv(CM_LOG_INFO, "grpc server stopped", NULL);
}

void cm_server_free(cm_server_t *srv) {
    if (!srv) return;
    cm_server_shutdown(srv);
    if (srv->server) grpc_server_destroy(srv->server);
    if (srv->cq) grpc_completion_queue_destroy(srv->cq);
    cm__health_free(srv);
    cm_free(srv->workers);
    cm_free(srv->methods);
    cm_free(srv->name);
    cm_free(srv->listen);
    cm_free((char *)srv->tls.cert_file);
    cm_free((char *)srv->tls.key_file);
    cm_free((char *)srv->tls.ca_file);
    pthread_mutex_destroy(&srv->mu);
    pthread_cond_destroy(&srv->cv);
    cm_free(srv);
    grpc_shutdown();
}

int cm_server_live_calls(cm_server_t *srv) {
    return atomic_load(&srv->live_calls);
}

size_t cm__server_service_names(cm_server_t *srv, const char **out, size_t max) {
    size_t n = 0;
    for (size_t i = 0; i < srv->n_services && n < max; i++) out[n++] = srv->services[i]->desc->name;
    return n;
}

size_t cm__server_methods(cm_server_t *srv, cm__method_reg_t **out) {
    *out = srv->methods;
    return srv->n_methods;
}

const char *cm__server_name(const cm_server_t *srv) { return srv->name; }
cm__health_t *cm__server_health(cm_server_t *srv) { return srv->health; }

/* cm_health.c stores its state through this. */
void cm__server_set_health_state(cm_server_t *srv, cm__health_t *h) { srv->health = h; }

/* ---- signals --------------------------------------------------------------------------- */

void cm_signals_block(void) {
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGTERM);
    sigaddset(&set, SIGINT);
    sigaddset(&set, SIGHUP);
    pthread_sigmask(SIG_BLOCK, &set, NULL);
    signal(SIGPIPE, SIG_IGN);
}

int cm_wait_for_signal(void) {
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGTERM);
    sigaddset(&set, SIGINT);
    int sig = 0;
    while (sigwait(&set, &sig) != 0) {
    }
    return sig;
}
