/* The Echo test service: each method exercises one framework feature (see echo.proto). */
#include "echo_service.h"

#include <stdio.h>
#include <string.h>
#include <time.h>

#include "cm_alloc.h"
#include "cm_buf.h"
#include "cm_err.h"
#include "iot/testing/v1/echo.pb-c.h"

static void sleep_ms(int ms) {
    struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}

/* Sleeps up to ms, returning early (1) if the call is cancelled. */
static int sleep_unless_cancelled(cm_call_t *call, int ms) {
    while (ms > 0) {
        if (cm_call_cancelled(call)) return 1;
        int step = ms < 5 ? ms : 5;
        sleep_ms(step);
        ms -= step;
    }
    return cm_call_cancelled(call);
}

/* message and payload always (the work the grpc++ benchmark references do too); the call's
 * details only when asked, so that the benchmark compares equal work. */
static void fill_common(cm_call_t *call, const Iot__Testing__V1__EchoRequest *req, Iot__Testing__V1__EchoResponse *resp) {
    resp->message = req->message;
    resp->payload = req->payload;
    if (!req->echo_metadata) return;
    resp->peer = (char *)cm_call_peer(call);
    resp->trace_id = (char *)cm_call_trace_id(call);
    resp->deadline_ms = cm_call_deadline_ms(call);
    size_t n = 0;
    const char *k, *v;
    size_t vl;
    while (cm_call_metadata_at(call, n, &k, &v, &vl) == 0) n++;
    resp->metadata = cm_call_alloc(call, n * sizeof *resp->metadata);
    for (size_t i = 0; i < n; i++) {
        cm_call_metadata_at(call, i, &k, &v, &vl);
        Iot__Testing__V1__EchoResponse__MetadataEntry *e = cm_call_alloc(call, sizeof *e);
        iot__testing__v1__echo_response__metadata_entry__init(e);
        e->key = (char *)k;
        e->value = (char *)v;
        resp->metadata[i] = e;
    }
    resp->n_metadata = n;
    const char *x = cm_call_metadata(call, "x-echo", NULL);
    if (x) {
        cm_call_add_initial_metadata(call, "x-echo-initial", x, 0);
        cm_call_add_trailing_metadata(call, "x-echo-trailing", x, 0);
    }
}

static int echo_unary(cm_call_t *call, const ProtobufCMessage *req_, ProtobufCMessage *resp_) {
    const Iot__Testing__V1__EchoRequest *req = (const void *)req_;
    Iot__Testing__V1__EchoResponse *resp = (void *)resp_;
    if (req->delay_ms > 0 && sleep_unless_cancelled(call, req->delay_ms))
        return cm_call_fail(call, CM_STATUS_CANCELLED, "cancelled while sleeping");
    echo_ctx_t *ctx = cm_call_service_ctx(call);
    if (strcmp(req->message, "flaky") == 0 && atomic_fetch_add(&ctx->flaky_calls, 1) % 2 == 0)
        return cm_call_fail(call, CM_STATUS_UNAVAILABLE, "flaky: try again");
    fill_common(call, req, resp);
    if (strcmp(req->message, "add-illegal-metadata") == 0) /* reports the framework's answer */
        resp->index = cm_call_add_trailing_metadata(call, "x-device-name", "K\303\274che\n", 0);
    if (req->status_code) return cm_call_fail(call, req->status_code, "%s", req->status_message);
    return CM_STATUS_OK;
}

static int echo_cs_message(cm_call_t *call, const ProtobufCMessage *msg) {
    const Iot__Testing__V1__EchoRequest *req = (const void *)msg;
    cm_buf_t *b = cm_call_user(call);
    if (!b) {
        b = cm_calloc(1, sizeof *b);
        cm_call_set_user(call, b);
    }
    if (req->status_code) return cm_call_fail(call, req->status_code, "%s", req->status_message);
    cm_buf_puts(b, req->message);
    return CM_PENDING;
}

static int echo_cs_half_close(cm_call_t *call, ProtobufCMessage *resp_) {
    Iot__Testing__V1__EchoResponse *resp = (void *)resp_;
    cm_buf_t *b = cm_call_user(call);
    resp->message = cm_call_strdup(call, b && b->data ? b->data : "");
    return CM_STATUS_OK;
}

static void echo_free_buf(cm_call_t *call, int cancelled) {
    cm_buf_t *b = cm_call_user(call);
    echo_ctx_t *ctx = cm_call_service_ctx(call);
    if (cancelled) atomic_fetch_add(&ctx->stream_cancels, 1);
    if (b) {
        cm_buf_free(b);
        cm_free(b);
    }
}

/* A paced server stream: what is left to send, kept between writable() callbacks. */
typedef struct echo_paced_s {
    char *message;
    uint8_t *payload;
    size_t payload_len;
    int32_t next, repeat, status_code;
} echo_paced_t;

static int echo_ss_writable(cm_call_t *call) {
    echo_ctx_t *ctx = cm_call_service_ctx(call);
    echo_paced_t *p = cm_call_user(call);
    if (p->next == p->repeat) return p->status_code ? cm_call_fail(call, p->status_code, "paced stream ends") : CM_STATUS_OK;
    Iot__Testing__V1__EchoResponse resp = IOT__TESTING__V1__ECHO_RESPONSE__INIT;
    resp.message = p->message;
    resp.index = p->next++;
    resp.payload.data = p->payload;
    resp.payload.len = p->payload_len;
    if (cm_call_send(call, &resp.base) != 0) return CM_STATUS_CANCELLED;
    atomic_fetch_add(&ctx->paced_sent, 1);
    return CM_PENDING;
}

typedef struct echo_tail_s {
    echo_ctx_t *ctx;
    uint8_t data[];
} echo_tail_t;

static void echo_tail_release(void *arg) {
    echo_tail_t *t = arg;
    atomic_fetch_add(&t->ctx->tail_released, 1);
    cm_free(t);
}

static const uint8_t echo_static_tail[] = "static bytes that outlive every call";

/* One ServerStream response whose payload follows by cm_call_send_tail: from a buffer of its own
 * (message "tail"; released by the framework, also when the send is refused) or from static
 * memory (message "tail-static"). */
static int echo_send_tail(cm_call_t *call, const Iot__Testing__V1__EchoRequest *req, Iot__Testing__V1__EchoResponse *resp) {
    echo_ctx_t *ctx = cm_call_service_ctx(call);
    if (strcmp(req->message, "tail-static") == 0)
        return cm_call_send_tail(call, &resp->base, 2, echo_static_tail, sizeof echo_static_tail, NULL, NULL);
    echo_tail_t *t = cm_malloc(sizeof *t + req->payload.len + 1);
    t->ctx = ctx;
    if (req->payload.len) memcpy(t->data, req->payload.data, req->payload.len);
    atomic_fetch_add(&ctx->tail_made, 1);
    int rc = cm_call_send_tail(call, &resp->base, 2, t->data, req->payload.len, echo_tail_release, t);
    if (rc == CM_EFULL || rc == CM_ECLOSED) atomic_fetch_add(&ctx->tail_refused, 1);
    return rc;
}

/* cm_call_send_tail refuses fields that are not singular bytes (index is int32, message a string),
 * releasing the data at once. */
static void echo_tail_misuse(cm_call_t *call, Iot__Testing__V1__EchoResponse *resp) {
    echo_ctx_t *ctx = cm_call_service_ctx(call);
    for (uint32_t field = 1; field <= 3; field += 2) {
        echo_tail_t *t = cm_malloc(sizeof *t);
        t->ctx = ctx;
        atomic_fetch_add(&ctx->tail_made, 1);
        if (cm_call_send_tail(call, &resp->base, field, t->data, 0, echo_tail_release, t) == CM_EINVAL)
            atomic_fetch_add(&ctx->tail_einval, 1);
    }
}

static int echo_ss_start(cm_call_t *call, const ProtobufCMessage *req_) {
    const Iot__Testing__V1__EchoRequest *req = (const void *)req_;
    int tail = strncmp(req->message, "tail", 4) == 0;
    if (req->paced) {
        echo_paced_t *p = cm_calloc(1, sizeof *p);
        p->message = cm_strdup(req->message);
        p->payload_len = req->payload.len;
        p->payload = cm_malloc(req->payload.len + 1);
        if (req->payload.len) memcpy(p->payload, req->payload.data, req->payload.len);
        p->repeat = req->repeat;
        p->status_code = req->status_code;
        cm_call_set_user(call, p);
        return CM_PENDING; /* the first writable() follows at once */
    }
    for (int i = 0; i < req->repeat; i++) {
        if (req->delay_ms > 0 && sleep_unless_cancelled(call, req->delay_ms)) return CM_STATUS_CANCELLED;
        Iot__Testing__V1__EchoResponse resp = IOT__TESTING__V1__ECHO_RESPONSE__INIT;
        resp.message = req->message;
        resp.index = i;
        int rc;
        if (tail && i == 0) echo_tail_misuse(call, &resp);
        if (!tail) resp.payload = req->payload;
        /* A blocking handler can afford backpressure: wait for the client to read. */
        while ((rc = tail ? echo_send_tail(call, req, &resp) : cm_call_send(call, &resp.base)) == CM_EFULL) {
            if (cm_call_cancelled(call)) return CM_STATUS_CANCELLED;
            sleep_ms(1);
        }
        if (rc != 0) return CM_STATUS_CANCELLED;
    }
    if (req->status_code) return cm_call_fail(call, req->status_code, "%s", req->status_message);
    return CM_STATUS_OK;
}

static void echo_stream_done(cm_call_t *call, int cancelled) {
    echo_ctx_t *ctx = cm_call_service_ctx(call);
    if (cancelled) atomic_fetch_add(&ctx->stream_cancels, 1);
}

static void echo_ss_done(cm_call_t *call, int cancelled) {
    echo_stream_done(call, cancelled);
    echo_paced_t *p = cm_call_user(call);
    if (p) {
        cm_free(p->message);
        cm_free(p->payload);
        cm_free(p);
    }
}

static int echo_bidi_message(cm_call_t *call, const ProtobufCMessage *msg) {
    const Iot__Testing__V1__EchoRequest *req = (const void *)msg;
    intptr_t n = (intptr_t)cm_call_user(call);
    if (req->status_code) return cm_call_fail(call, req->status_code, "%s", req->status_message);
    Iot__Testing__V1__EchoResponse resp = IOT__TESTING__V1__ECHO_RESPONSE__INIT;
    resp.message = req->message;
    resp.payload = req->payload;
    resp.index = (int32_t)n;
    cm_call_set_user(call, (void *)(n + 1));
    if (cm_call_send(call, &resp.base) == CM_EFULL)
        cm_call_abort(call, CM_STATUS_RESOURCE_EXHAUSTED, "client is not reading responses");
    return CM_PENDING;
}

static int echo_wait_for_cancel(cm_call_t *call, const ProtobufCMessage *req_, ProtobufCMessage *resp_) {
    (void)req_;
    (void)resp_;
    echo_ctx_t *ctx = cm_call_service_ctx(call);
    if (sleep_unless_cancelled(call, 30000)) {
        atomic_fetch_add(&ctx->cancels_seen, 1);
        return cm_call_fail(call, CM_STATUS_CANCELLED, "handler saw the cancellation");
    }
    return cm_call_fail(call, CM_STATUS_DEADLINE_EXCEEDED, "nobody cancelled within 30s");
}

static int echo_stats(cm_call_t *call, const ProtobufCMessage *req_, ProtobufCMessage *resp_) {
    (void)req_;
    echo_ctx_t *ctx = cm_call_service_ctx(call);
    Iot__Testing__V1__EchoResponse *resp = (void *)resp_;
    char buf[96];
    snprintf(buf, sizeof buf, "cancels=%d stream_cancels=%d", atomic_load(&ctx->cancels_seen),
             atomic_load(&ctx->stream_cancels));
    resp->message = cm_call_strdup(call, buf);
    return CM_STATUS_OK;
}

typedef struct { int64_t messages, points; double sum; } summary_t;

static summary_t *summary_of(cm_call_t *call) {
    summary_t *s = cm_call_user(call);
    if (!s) {
        s = cm_calloc(1, sizeof *s);
        cm_call_set_user(call, s);
    }
    return s;
}

static int echo_record_message(cm_call_t *call, const ProtobufCMessage *msg) {
    const Iot__Testing__V1__Point *p = (const void *)msg;
    summary_t *s = summary_of(call);
    s->messages++;
    s->points++;
    s->sum += p->value;
    return CM_PENDING;
}

static int echo_record_batch_message(cm_call_t *call, const ProtobufCMessage *msg) {
    const Iot__Testing__V1__PointBatch *b = (const void *)msg;
    summary_t *s = summary_of(call);
    s->messages++;
    s->points += (int64_t)b->n_points;
    for (size_t i = 0; i < b->n_points; i++) s->sum += b->points[i]->value;
    return CM_PENDING;
}

static int echo_record_half_close(cm_call_t *call, ProtobufCMessage *resp_) {
    Iot__Testing__V1__StreamSummary *resp = (void *)resp_;
    summary_t *s = summary_of(call);
    resp->messages = s->messages;
    resp->points = s->points;
    resp->value_sum = s->sum;
    return CM_STATUS_OK;
}

static void echo_record_done(cm_call_t *call, int cancelled) {
    (void)cancelled;
    cm_free(cm_call_user(call));
}

static const cm_method_t echo_methods[] = {
    {.name = "Unary", .kind = CM_RPC_UNARY, .unary = echo_unary},
    {.name = "ClientStream", .kind = CM_RPC_CLIENT_STREAM, .message = echo_cs_message,
     .half_close = echo_cs_half_close, .done = echo_free_buf},
    {.name = "ServerStream", .kind = CM_RPC_SERVER_STREAM, .start = echo_ss_start, .writable = echo_ss_writable,
     .done = echo_ss_done},
    {.name = "Bidi", .kind = CM_RPC_BIDI, .message = echo_bidi_message, .done = echo_stream_done},
    {.name = "WaitForCancel", .kind = CM_RPC_UNARY, .unary = echo_wait_for_cancel, .watch_cancel = 1},
    {.name = "Stats", .kind = CM_RPC_UNARY, .unary = echo_stats},
    {.name = "Record", .kind = CM_RPC_CLIENT_STREAM, .message = echo_record_message,
     .half_close = echo_record_half_close, .done = echo_record_done},
    {.name = "RecordBatch", .kind = CM_RPC_CLIENT_STREAM, .message = echo_record_batch_message,
     .half_close = echo_record_half_close, .done = echo_record_done},
};

void echo_service_init(cm_service_t *svc, echo_ctx_t *ctx) {
    svc->desc = &iot__testing__v1__echo__descriptor;
    svc->methods = echo_methods;
    svc->n_methods = sizeof echo_methods / sizeof echo_methods[0];
    svc->ctx = ctx;
}
