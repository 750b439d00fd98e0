/* gRPC client: channels, unary calls with deadline and retry, blocking streams.
 *
 * Each call has its own pluck completion queue, so calls on one channel never wait on each other
 * and a stream can be read on one thread while another writes to it. Channels are thread safe and
 * share the TCP connection to a target unless own_connection is set. */
#include "cm_rpc_internal.h"
#include "cm_err.h"
#include "cm_pbdec.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define CM__DEFAULT_TIMEOUT_MS 30000
#define CM__DEFAULT_ATTEMPTS 3

struct cm_channel_s {
    grpc_channel *ch;
    char *target;
};

struct cm_stream_s {
    grpc_call *call;
    grpc_completion_queue *cq;
    grpc_metadata_array initial_md, trailing_md;
    int got_initial_md;
    grpc_status_code status;
    grpc_slice details;
    const char *error_string;
    char tag_status, tag_write, tag_read, tag_md;
    grpc_slice *md_slices;
    size_t n_md_slices;
    uint8_t *rbuf; /* cm_stream_recv_view: the last message's bytes, contiguous */
    size_t rcap;
    int read_pending;          /* a receive is started and not yet collected (cm_stream_recv_wait timed out) */
    grpc_byte_buffer *pending; /* where that receive lands */
};

cm_channel_t *cm_channel_new(const char *target, const cm_channel_opts_t *o, int *err) {
    cm_channel_opts_t none = {0};
    if (!o) o = &none;
    grpc_init();
    grpc_channel_credentials *creds;
    if (o->tls) {
        char *ca = o->tls->ca_file ? cm__read_file(o->tls->ca_file, NULL) : NULL;
        char *cert = o->tls->cert_file ? cm__read_file(o->tls->cert_file, NULL) : NULL;
        char *key = o->tls->key_file ? cm__read_file(o->tls->key_file, NULL) : NULL;
        int bad = (o->tls->ca_file && !ca) || (o->tls->cert_file && !cert) || (o->tls->key_file && !key) ||
                  (!cert != !key);
        grpc_ssl_pem_key_cert_pair pair = {key, cert};
        creds = bad ? NULL : grpc_ssl_credentials_create(ca, cert ? &pair : NULL, NULL, NULL);
        cm_free(ca);
        cm_free(cert);
        cm_free(key);
        if (!creds) {
            CM_LOG(CM_LOG_ERROR, "TLS client configuration for %s: cannot read the CA, certificate or key file",
                   target);
            if (err) *err = CM_ETLS;
            grpc_shutdown();
            return NULL;
        }
    } else {
        creds = grpc_insecure_credentials_create();
    }
    grpc_arg args[8];
    size_t n = 0;
    args[n].type = GRPC_ARG_INTEGER;
    args[n].key = (char *)GRPC_ARG_MAX_RECEIVE_MESSAGE_LENGTH;
    args[n++].value.integer = o->max_recv_bytes > 0 ? o->max_recv_bytes : 4 * 1024 * 1024;
    args[n].type = GRPC_ARG_INTEGER;
    args[n].key = (char *)GRPC_ARG_ENABLE_RETRIES; /* we retry ourselves, only when told it is safe */
    args[n++].value.integer = 0;
    if (o->authority) {
        args[n].type = GRPC_ARG_STRING;
        args[n].key = (char *)GRPC_SSL_TARGET_NAME_OVERRIDE_ARG;
        args[n++].value.string = (char *)o->authority;
    }
    if (o->own_connection) {
        args[n].type = GRPC_ARG_INTEGER;
        args[n].key = (char *)GRPC_ARG_USE_LOCAL_SUBCHANNEL_POOL;
        args[n++].value.integer = 1;
    }
    if (o->max_reconnect_backoff_ms > 0) {
        args[n].type = GRPC_ARG_INTEGER;
        args[n].key = (char *)GRPC_ARG_MAX_RECONNECT_BACKOFF_MS;
        args[n++].value.integer = o->max_reconnect_backoff_ms;
        args[n].type = GRPC_ARG_INTEGER;
        args[n].key = (char *)GRPC_ARG_INITIAL_RECONNECT_BACKOFF_MS;
        args[n++].value.integer = o->max_reconnect_backoff_ms < 1000 ? o->max_reconnect_backoff_ms : 1000;
    }
    if (o->flow_window_bytes > 0) {
        args[n].type = GRPC_ARG_INTEGER;
        args[n].key = (char *)GRPC_ARG_HTTP2_BDP_PROBE;
        args[n++].value.integer = 0;
        args[n].type = GRPC_ARG_INTEGER;
        args[n].key = (char *)GRPC_ARG_HTTP2_STREAM_LOOKAHEAD_BYTES;
        args[n++].value.integer = o->flow_window_bytes;
    }
    grpc_channel_args cargs = {n, args};
    cm_channel_t *c = cm_calloc(1, sizeof *c);
    c->ch = grpc_channel_create(target, creds, &cargs);
    c->target = cm_strdup(target);
    grpc_channel_credentials_release(creds);
    if (err) *err = 0;
    return c;
}

void cm_channel_free(cm_channel_t *c) {
    if (!c) return;
    grpc_channel_destroy(c->ch);
    cm_free(c->target);
    cm_free(c);
    grpc_shutdown();
}

static gpr_timespec cm__deadline_after(int64_t ms) {
    return gpr_time_add(gpr_now(GPR_CLOCK_MONOTONIC), gpr_time_from_millis(ms, GPR_TIMESPAN));
}

static void cm__cq_destroy(grpc_completion_queue *cq) {
    grpc_completion_queue_shutdown(cq);
    /* Drain: a pluck queue reports GRPC_QUEUE_SHUTDOWN once it is empty. */
    for (;;) {
        grpc_event ev = grpc_completion_queue_pluck(cq, NULL, gpr_inf_future(GPR_CLOCK_REALTIME), NULL);
        if (ev.type == GRPC_QUEUE_SHUTDOWN) break;
    }
    grpc_completion_queue_destroy(cq);
}

int cm_channel_wait_ready(cm_channel_t *c, int64_t timeout_ms) {
    gpr_timespec deadline = cm__deadline_after(timeout_ms);
    grpc_completion_queue *cq = grpc_completion_queue_create_for_pluck(NULL);
    int rc = CM_ETIMEOUT;
    char tag;
    for (;;) {
        grpc_connectivity_state s = grpc_channel_check_connectivity_state(c->ch, 1);
        if (s == GRPC_CHANNEL_READY) {
            rc = 0;
            break;
        }
        grpc_channel_watch_connectivity_state(c->ch, s, deadline, cq, &tag);
        grpc_event ev = grpc_completion_queue_pluck(cq, &tag, gpr_inf_future(GPR_CLOCK_REALTIME), NULL);
        if (ev.type != GRPC_OP_COMPLETE || !ev.success) break; /* deadline reached */
    }
    cm__cq_destroy(cq);
    return rc;
}

/* Builds the outgoing metadata: the caller's plus traceparent. Slices are owned by *slices. */
static grpc_metadata *cm__build_md(const cm_call_opts_t *o, size_t *count, grpc_slice **slices, size_t *n_slices) {
    size_t n = (o ? o->n_md : 0) + 1;
    grpc_metadata *md = cm_calloc(n, sizeof *md);
    *slices = cm_calloc(n * 2, sizeof **slices);
    size_t k = 0;
    for (size_t i = 0; o && i < o->n_md; i++) {
        md[i].key = (*slices)[k++] = grpc_slice_from_copied_string(o->md[i].key);
        size_t vl = o->md[i].vlen ? o->md[i].vlen : strlen(o->md[i].val);
        md[i].value = (*slices)[k++] = grpc_slice_from_copied_buffer(o->md[i].val, vl);
    }
    cm_trace_t fresh;
    const cm_trace_t *t = cm_trace_current();
    if (!t || !t->trace_id[0]) {
        cm_trace_new(&fresh);
        t = &fresh;
    }
    char tp[64];
    cm_trace_child_header(t, tp, sizeof tp);
    md[n - 1].key = (*slices)[k++] = grpc_slice_from_static_string("traceparent");
    md[n - 1].value = (*slices)[k++] = grpc_slice_from_copied_string(tp);
    *count = n;
    *n_slices = k;
    return md;
}

/* Fills op as SEND_INITIAL_METADATA with the caller's metadata plus traceparent; returns the
 * metadata array (cm_free after the batch completes) and the slices it owns. */
static grpc_metadata *cm__md_op(grpc_op *op, const cm_call_opts_t *o, grpc_slice **slices, size_t *n_slices) {
    size_t n_md;
    grpc_metadata *md = cm__build_md(o, &n_md, slices, n_slices);
    op->op = GRPC_OP_SEND_INITIAL_METADATA;
    op->data.send_initial_metadata.count = n_md;
    op->data.send_initial_metadata.metadata = md;
    op->flags = o && o->wait_for_ready ? GRPC_INITIAL_METADATA_WAIT_FOR_READY : 0;
    return md;
}

static void cm__free_slices(grpc_slice *s, size_t n) {
    for (size_t i = 0; i < n; i++) grpc_slice_unref(s[i]);
    cm_free(s);
}

static void cm__copy_md(const grpc_metadata_array *a, cm_md_t **out, size_t *n) {
    *n = a->count;
    *out = a->count ? cm_calloc(a->count, sizeof **out) : NULL;
    for (size_t i = 0; i < a->count; i++) {
        (*out)[i].key = cm_strndup((const char *)GRPC_SLICE_START_PTR(a->metadata[i].key), GRPC_SLICE_LENGTH(a->metadata[i].key));
        (*out)[i].val = cm_strndup((const char *)GRPC_SLICE_START_PTR(a->metadata[i].value), GRPC_SLICE_LENGTH(a->metadata[i].value));
        (*out)[i].vlen = GRPC_SLICE_LENGTH(a->metadata[i].value);
    }
}

static void cm__free_md(cm_md_t *md, size_t n) {
    for (size_t i = 0; i < n; i++) {
        cm_free((char *)md[i].key);
        cm_free((char *)md[i].val);
    }
    cm_free(md);
}

void cm_rpc_status_clear(cm_rpc_status_t *st) {
    if (!st) return;
    cm__free_md(st->initial_md, st->n_initial_md);
    cm__free_md(st->trailing_md, st->n_trailing_md);
    st->initial_md = st->trailing_md = NULL;
    st->n_initial_md = st->n_trailing_md = 0;
}

const char *cm_rpc_status_md(const cm_rpc_status_t *st, const char *key) {
    for (size_t i = 0; i < st->n_initial_md; i++)
        if (strcmp(st->initial_md[i].key, key) == 0) return st->initial_md[i].val;
    for (size_t i = 0; i < st->n_trailing_md; i++)
        if (strcmp(st->trailing_md[i].key, key) == 0) return st->trailing_md[i].val;
    return NULL;
}

static void cm__fill_status(cm_rpc_status_t *st, int code, grpc_slice details, const char *error_string) {
    st->code = code;
    size_t n = GRPC_SLICE_LENGTH(details);
    if (n >= sizeof st->message) n = sizeof st->message - 1;
    memcpy(st->message, GRPC_SLICE_START_PTR(details), n);
    st->message[n] = '\0';
    if (!n && code != GRPC_STATUS_OK && error_string)
        snprintf(st->message, sizeof st->message, "%s", error_string);
}

/* Name of the first request header gRPC would refuse, or NULL when all are legal. */
static const char *cm__bad_md(const cm_call_opts_t *o) {
    for (size_t i = 0; o && i < o->n_md; i++) {
        size_t vl = o->md[i].vlen ? o->md[i].vlen : strlen(o->md[i].val);
        if (!cm__md_ok(o->md[i].key, o->md[i].val, vl)) return o->md[i].key;
    }
    return NULL;
}

/* One attempt of a unary call. */
static int cm__unary_once(cm_channel_t *c, grpc_slice method, grpc_byte_buffer *req, gpr_timespec deadline,
                          const cm_call_opts_t *o, const ProtobufCMessageDescriptor *resp_desc,
                          ProtobufCMessage **resp, cm_rpc_status_t *st) {
    grpc_completion_queue *cq = grpc_completion_queue_create_for_pluck(NULL);
    grpc_call *call = grpc_channel_create_call(c->ch, NULL, GRPC_PROPAGATE_DEFAULTS, cq, method, NULL, deadline, NULL);
    grpc_metadata_array init_md, trail_md;
    grpc_metadata_array_init(&init_md);
    grpc_metadata_array_init(&trail_md);
    grpc_byte_buffer *recv = NULL;
    grpc_status_code status = GRPC_STATUS_UNKNOWN;
    grpc_slice details = grpc_empty_slice();
    const char *error_string = NULL;
    size_t n_slices;
    grpc_slice *slices;
    grpc_op ops[6];
    memset(ops, 0, sizeof ops);
    grpc_metadata *md = cm__md_op(&ops[0], o, &slices, &n_slices);
    ops[1].op = GRPC_OP_SEND_MESSAGE;
    ops[1].data.send_message.send_message = req;
    ops[2].op = GRPC_OP_SEND_CLOSE_FROM_CLIENT;
    ops[3].op = GRPC_OP_RECV_INITIAL_METADATA;
    ops[3].data.recv_initial_metadata.recv_initial_metadata = &init_md;
    ops[4].op = GRPC_OP_RECV_MESSAGE;
    ops[4].data.recv_message.recv_message = &recv;
    ops[5].op = GRPC_OP_RECV_STATUS_ON_CLIENT;
    ops[5].data.recv_status_on_client.trailing_metadata = &trail_md;
    ops[5].data.recv_status_on_client.status = &status;
    ops[5].data.recv_status_on_client.status_details = &details;
    ops[5].data.recv_status_on_client.error_string = &error_string;
    char tag;
    if (grpc_call_start_batch(call, ops, 6, &tag, NULL) != GRPC_CALL_OK) abort();
    grpc_completion_queue_pluck(cq, &tag, gpr_inf_future(GPR_CLOCK_REALTIME), NULL);

    int code = (int)status;
    if (code == GRPC_STATUS_OK) {
        *resp = cm__decode(resp_desc, NULL, recv);
        if (!*resp) {
            code = CM_STATUS_INTERNAL;
            grpc_slice_unref(details);
            details = grpc_slice_from_static_string("response message could not be decoded");
        }
    }
    cm__fill_status(st, code, details, error_string);
    cm_rpc_status_clear(st);
    cm__copy_md(&init_md, &st->initial_md, &st->n_initial_md);
    cm__copy_md(&trail_md, &st->trailing_md, &st->n_trailing_md);

    if (recv) grpc_byte_buffer_destroy(recv);
    grpc_slice_unref(details);
    gpr_free((void *)error_string);
    grpc_metadata_array_destroy(&init_md);
    grpc_metadata_array_destroy(&trail_md);
    grpc_call_unref(call);
    cm__cq_destroy(cq);
    cm__free_slices(slices, n_slices);
    cm_free(md);
    return code;
}

int cm_channel_unary(cm_channel_t *c, const char *method, const ProtobufCMessage *req,
                     const ProtobufCMessageDescriptor *resp_desc, ProtobufCMessage **resp, const cm_call_opts_t *o,
                     cm_rpc_status_t *st_out) {
    cm_rpc_status_t local = {0};
    cm_rpc_status_t *st = st_out ? st_out : &local;
    *resp = NULL;
    const char *bad = cm__bad_md(o);
    if (bad) {
        cm_rpc_status_clear(st);
        st->code = CM_STATUS_INVALID_ARGUMENT;
        st->attempts = 0;
        snprintf(st->message, sizeof st->message,
                 "request metadata \"%s\": key must be lowercase and the value printable ASCII (or use a -bin key)", bad);
        return st->code;
    }
    int64_t timeout = o && o->timeout_ms > 0 ? o->timeout_ms : CM__DEFAULT_TIMEOUT_MS;
    int attempts = o && o->idempotent ? (o->max_attempts > 0 ? o->max_attempts : CM__DEFAULT_ATTEMPTS) : 1;
    gpr_timespec deadline = cm__deadline_after(timeout);
    grpc_slice m = grpc_slice_from_copied_string(method);
    grpc_byte_buffer *buf = cm__encode(req);
    int code = CM_STATUS_UNKNOWN;
    int64_t backoff_ms = 25;
    for (int i = 1; i <= attempts; i++) {
        st->attempts = i;
        /* The core consumes a sent byte buffer; each attempt sends its own copy. */
        grpc_byte_buffer *attempt = grpc_byte_buffer_copy(buf);
        code = cm__unary_once(c, m, attempt, deadline, o, resp_desc, resp, st);
        grpc_byte_buffer_destroy(attempt);
        /* Only UNAVAILABLE means the request never reached a handler or the server went away;
         * even then only an idempotent call may be sent again. */
        if (code != CM_STATUS_UNAVAILABLE || i == attempts) break;
        gpr_timespec left = gpr_time_sub(deadline, gpr_now(GPR_CLOCK_MONOTONIC));
        int64_t left_ms = (int64_t)left.tv_sec * 1000 + left.tv_nsec / 1000000;
        int64_t sleep_ms = backoff_ms / 2 + rand() % (backoff_ms / 2 + 1); /* jittered */
        if (left_ms <= sleep_ms) break;
        struct timespec ts = {sleep_ms / 1000, (long)(sleep_ms % 1000) * 1000000L};
        nanosleep(&ts, NULL);
        backoff_ms *= 2;
    }
    grpc_byte_buffer_destroy(buf);
    grpc_slice_unref(m);
    if (st == &local) cm_rpc_status_clear(&local);
    return code;
}

/* ---- streams --------------------------------------------------------------------------- */

cm_stream_t *cm_stream_open(cm_channel_t *c, const char *method, const cm_call_opts_t *o) {
    const char *bad = cm__bad_md(o);
    if (bad) {
        CM_LOG(CM_LOG_ERROR, "stream %s not opened: request metadata \"%s\" is not a legal header", method, bad);
        return NULL;
    }
    cm_stream_t *s = cm_calloc(1, sizeof *s);
    int64_t timeout = o && o->timeout_ms > 0 ? o->timeout_ms : CM__DEFAULT_TIMEOUT_MS;
    s->cq = grpc_completion_queue_create_for_pluck(NULL);
    grpc_slice m = grpc_slice_from_copied_string(method);
    s->call = grpc_channel_create_call(c->ch, NULL, GRPC_PROPAGATE_DEFAULTS, s->cq, m, NULL, cm__deadline_after(timeout), NULL);
    grpc_slice_unref(m);
    grpc_metadata_array_init(&s->initial_md);
    grpc_metadata_array_init(&s->trailing_md);
    s->details = grpc_empty_slice();
    grpc_op ops[1];
    memset(ops, 0, sizeof ops);
    grpc_metadata *md = cm__md_op(&ops[0], o, &s->md_slices, &s->n_md_slices);
    if (grpc_call_start_batch(s->call, ops, 1, &s->tag_md, NULL) != GRPC_CALL_OK) abort();
    grpc_completion_queue_pluck(s->cq, &s->tag_md, gpr_inf_future(GPR_CLOCK_REALTIME), NULL);
    cm_free(md);
    /* The status op is posted up front so that the status is collected whenever it arrives. */
    ops[0].op = GRPC_OP_RECV_STATUS_ON_CLIENT;
    ops[0].flags = 0;
    ops[0].data.recv_status_on_client.trailing_metadata = &s->trailing_md;
    ops[0].data.recv_status_on_client.status = &s->status;
    ops[0].data.recv_status_on_client.status_details = &s->details;
    ops[0].data.recv_status_on_client.error_string = &s->error_string;
    if (grpc_call_start_batch(s->call, ops, 1, &s->tag_status, NULL) != GRPC_CALL_OK) abort();
    return s;
}

static int cm__stream_write(cm_stream_t *s, const ProtobufCMessage *msg, uint32_t flags) {
    grpc_byte_buffer *buf = cm__encode(msg);
    grpc_op op;
    memset(&op, 0, sizeof op);
    op.op = GRPC_OP_SEND_MESSAGE;
    op.flags = flags;
    op.data.send_message.send_message = buf;
    if (grpc_call_start_batch(s->call, &op, 1, &s->tag_write, NULL) != GRPC_CALL_OK) abort();
    grpc_event ev = grpc_completion_queue_pluck(s->cq, &s->tag_write, gpr_inf_future(GPR_CLOCK_REALTIME), NULL);
    grpc_byte_buffer_destroy(buf);
    return ev.success ? 0 : CM_ECLOSED;
}

int cm_stream_send(cm_stream_t *s, const ProtobufCMessage *msg) {
    return cm__stream_write(s, msg, 0);
}

int cm_stream_send_buffered(cm_stream_t *s, const ProtobufCMessage *msg) {
    return cm__stream_write(s, msg, GRPC_WRITE_BUFFER_HINT);
}

int cm_stream_close_send(cm_stream_t *s) {
    grpc_op op;
    memset(&op, 0, sizeof op);
    op.op = GRPC_OP_SEND_CLOSE_FROM_CLIENT;
    if (grpc_call_start_batch(s->call, &op, 1, &s->tag_write, NULL) != GRPC_CALL_OK) abort();
    grpc_event ev = grpc_completion_queue_pluck(s->cq, &s->tag_write, gpr_inf_future(GPR_CLOCK_REALTIME), NULL);
    return ev.success ? 0 : CM_ECLOSED;
}

/* Receives the next message (and, the first time, the initial metadata), waiting until deadline.
 * *buf is NULL at the end of the stream; returns the batch's success flag, or -1 when the deadline
 * passed first (the receive stays started: the next call collects it). */
static int cm__stream_read_until(cm_stream_t *s, grpc_byte_buffer **buf, gpr_timespec deadline) {
    *buf = NULL;
    if (!s->read_pending) {
        grpc_op ops[2];
        size_t n = 0;
        memset(ops, 0, sizeof ops);
        if (!s->got_initial_md) {
            ops[n].op = GRPC_OP_RECV_INITIAL_METADATA;
            ops[n++].data.recv_initial_metadata.recv_initial_metadata = &s->initial_md;
            s->got_initial_md = 1;
        }
        ops[n].op = GRPC_OP_RECV_MESSAGE;
        ops[n++].data.recv_message.recv_message = &s->pending;
        if (grpc_call_start_batch(s->call, ops, n, &s->tag_read, NULL) != GRPC_CALL_OK) abort();
        s->read_pending = 1;
    }
    grpc_event ev = grpc_completion_queue_pluck(s->cq, &s->tag_read, deadline, NULL);
    if (ev.type == GRPC_QUEUE_TIMEOUT) return -1;
    s->read_pending = 0;
    *buf = s->pending;
    s->pending = NULL;
    return ev.success;
}

static int cm__stream_read(cm_stream_t *s, grpc_byte_buffer **buf) {
    return cm__stream_read_until(s, buf, gpr_inf_future(GPR_CLOCK_REALTIME));
}

int cm_stream_recv_wait(cm_stream_t *s, const ProtobufCMessageDescriptor *desc, int64_t timeout_ms, ProtobufCMessage **out) {
    grpc_byte_buffer *buf;
    *out = NULL;
    int ok = cm__stream_read_until(s, &buf, gpr_time_add(gpr_now(GPR_CLOCK_MONOTONIC), gpr_time_from_millis(timeout_ms, GPR_TIMESPAN)));
    if (ok < 0) return CM_ETIMEOUT;
    if (!ok || !buf) {
        if (buf) grpc_byte_buffer_destroy(buf);
        return 0;
    }
    *out = cm__decode(desc, NULL, buf);
    grpc_byte_buffer_destroy(buf);
    return *out ? 1 : CM_EDECODE;
}

int cm_stream_recv(cm_stream_t *s, const ProtobufCMessageDescriptor *desc, ProtobufCMessage **out) {
    grpc_byte_buffer *buf;
    int ok = cm__stream_read(s, &buf);
    *out = NULL;
    if (!ok || !buf) {
        if (buf) grpc_byte_buffer_destroy(buf);
        return 0;
    }
    *out = cm__decode(desc, NULL, buf);
    grpc_byte_buffer_destroy(buf);
    return *out ? 1 : CM_EDECODE;
}

int cm_stream_recv_view(cm_stream_t *s, const ProtobufCMessageDescriptor *desc, cm_arena_t *a, ProtobufCMessage **out) {
    grpc_byte_buffer *buf;
    int ok = cm__stream_read(s, &buf);
    *out = NULL;
    if (!ok || !buf) {
        if (buf) grpc_byte_buffer_destroy(buf);
        return 0;
    }
    grpc_byte_buffer_reader r;
    if (!grpc_byte_buffer_reader_init(&r, buf)) {
        grpc_byte_buffer_destroy(buf);
        return CM_EDECODE;
    }
    size_t n = 0;
    grpc_slice sl;
    while (grpc_byte_buffer_reader_next(&r, &sl)) {
        size_t k = GRPC_SLICE_LENGTH(sl);
        if (n + k > s->rcap) {
            s->rcap = n + k > 2 * s->rcap ? n + k : 2 * s->rcap;
            s->rbuf = cm_realloc(s->rbuf, s->rcap);
        }
        memcpy(s->rbuf + n, GRPC_SLICE_START_PTR(sl), k);
        n += k;
        grpc_slice_unref(sl);
    }
    grpc_byte_buffer_reader_destroy(&r);
    grpc_byte_buffer_destroy(buf);
    int rc = cm__pb_decode_alias(desc, a, s->rbuf, n, out);
    if (rc == CM__PB_FALLBACK) *out = protobuf_c_message_unpack(desc, &a->pb, n, s->rbuf);
    else if (rc) *out = NULL;
    return *out ? 1 : CM_EDECODE;
}

void cm_stream_cancel(cm_stream_t *s) {
    grpc_call_cancel(s->call, NULL);
}

int cm_stream_finish(cm_stream_t *s, cm_rpc_status_t *st) {
    /* The core hands over the status only after initial metadata was asked for and every message
     * was read: drain what the caller left (cm_stream_cancel first to abandon an endless stream). */
    for (;;) {
        grpc_byte_buffer *buf;
        int ok = cm__stream_read(s, &buf);
        if (!buf) break;
        grpc_byte_buffer_destroy(buf);
        if (!ok) break;
    }
    grpc_completion_queue_pluck(s->cq, &s->tag_status, gpr_inf_future(GPR_CLOCK_REALTIME), NULL);
    int code = (int)s->status;
    if (st) {
        cm__fill_status(st, code, s->details, s->error_string);
        cm_rpc_status_clear(st);
        cm__copy_md(&s->initial_md, &st->initial_md, &st->n_initial_md);
        cm__copy_md(&s->trailing_md, &st->trailing_md, &st->n_trailing_md);
    }
    grpc_slice_unref(s->details);
    gpr_free((void *)s->error_string);
    grpc_metadata_array_destroy(&s->initial_md);
    grpc_metadata_array_destroy(&s->trailing_md);
    grpc_call_unref(s->call);
    cm__cq_destroy(s->cq);
    cm__free_slices(s->md_slices, s->n_md_slices);
    cm_free(s->rbuf);
    cm_free(s);
    return code;
}
