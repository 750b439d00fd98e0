/* iot.ingest.v1.Ingest: one function per RPC plus the method table.
 *
 * PushTelemetry is an async unary method: the handler validates and queues the batch and returns
 * CM_PENDING; the committer answers the call after the commit. StreamTelemetry keeps one state
 * object per stream, referenced by the call and by each of its batches still in a committer, so
 * that acknowledgements can go out from committer threads after the call itself has ended. */
#include "ing_handlers.h"

#include <inttypes.h>
#include <stdatomic.h>
#include <stdio.h>
#include <string.h>

#include "cm_alloc.h"
#include "cm_err.h"
#include "cm_log.h"
#include "cm_time.h"
#include "ing_query.h"
#include "iot/ingest/v1/ingest.pb-c.h"

struct ing__stream_s {
    atomic_int refs; /* the call (until done) + each batch in flight */
    pthread_mutex_t mu;
    cm_call_t *call;
    ing_ctx_t *ctx;
    char device_id[ING_MAX_DEVICE_ID + 1];
    int pending;     /* batches submitted and not yet answered */
    int half_closed; /* the device said it is done sending */
    int finished;    /* a status went out (or the call ended) */
    ing__stream_t *prev, *next;
};

static ing_ctx_t *ing__ctx(cm_call_t *call) { return cm_call_service_ctx(call); }

static void ing__retry_hint(cm_call_t *call, int64_t ms) {
    char v[24];
    snprintf(v, sizeof v, "%" PRId64, ms);
    cm_call_add_trailing_metadata(call, "retry-after-ms", v, 0);
}

/* Checks the token and turns the points into a batch; on failure the status is set on the call
 * and returned (the ...OrReply idiom). */
static int ing__batch_or_fail(cm_call_t *call, const char *device_id, Iot__Ingest__V1__Point *const *pts, size_t n,
                              ing_batch_t **out) {
    ing_ctx_t *ctx = ing__ctx(call);
    char msg[512];
    ing_batch_t *b = ing_batch_new(device_id, pts, n, &ctx->lim, cm_wall_ms(), msg, sizeof msg);
    if (!b) return cm_call_fail(call, CM_STATUS_INVALID_ARGUMENT, "%s; nothing of this batch was stored", msg);
    int64_t retry = 0;
    if (n && ing_devices_admit(ctx->devices, device_id, n, &retry) != CM_STATUS_OK) {
        ing_batch_free(b);
        ing__retry_hint(call, retry);
        return cm_call_fail(call, CM_STATUS_RESOURCE_EXHAUSTED,
                            "rate limit: a device may send %" PRId64 " points per second (IOT_INGEST_RATE_LIMIT); retry in %" PRId64 " ms",
                            ctx->cfg->rate_limit, retry);
    }
    *out = b;
    return CM_STATUS_OK;
}

static int ing__auth_or_fail(cm_call_t *call, char *device_id) {
    char msg[512];
    int code = ing_devices_auth(ing__ctx(call)->devices, cm_call_metadata(call, "authorization", NULL),
                                cm_call_deadline_ms(call), device_id, msg, sizeof msg);
    return code ? cm_call_fail(call, code, "%s", msg) : CM_STATUS_OK;
}

/* ---- PushTelemetry ---------------------------------------------------------------------------- */

static void ing__push_done(ing_batch_t *b, int code, const char *msg) {
    cm_call_t *call = b->arg;
    Iot__Ingest__V1__TelemetryAck ack = IOT__INGEST__V1__TELEMETRY_ACK__INIT;
    ack.acked_seq = b->acked_seq;
    ack.stored = b->stored;
    ack.duplicates = b->duplicates;
    if (code == CM_STATUS_UNAVAILABLE) ing__retry_hint(call, 500);
    cm_call_respond(call, code, &ack.base, msg);
    cm_call_unref(call);
    ing_batch_free(b);
}

static int ing_push_telemetry(cm_call_t *call, const ProtobufCMessage *req_, ProtobufCMessage *resp_) {
    const Iot__Ingest__V1__PushTelemetryRequest *req = (const void *)req_;
    (void)resp_;
    char device_id[ING_MAX_DEVICE_ID + 1];
    int code = ing__auth_or_fail(call, device_id);
    if (code) return code;
    ing_batch_t *b = NULL;
    code = ing__batch_or_fail(call, device_id, req->points, req->n_points, &b);
    if (code) return code;
    b->done = ing__push_done;
    b->arg = call;
    cm_call_ref(call);
    char msg[512];
    int64_t retry = 0;
    code = ing_commit_submit(ing__ctx(call)->commit, b, msg, sizeof msg, &retry);
    if (code) {
        cm_call_unref(call);
        ing_batch_free(b);
        ing__retry_hint(call, retry);
        return cm_call_fail(call, code, "%s", msg);
    }
    return CM_PENDING;
}

/* ---- StreamTelemetry -------------------------------------------------------------------------- */

static void ing__stream_unref(ing__stream_t *s) {
    if (atomic_fetch_sub(&s->refs, 1) != 1) return;
    cm_call_unref(s->call);
    pthread_mutex_destroy(&s->mu);
    cm_free(s);
}

/* Ends the stream with code unless it already ended (caller holds s->mu). */
static void ing__stream_end_locked(ing__stream_t *s, int code, const char *msg, int64_t retry_ms) {
    if (s->finished) return;
    s->finished = 1;
    if (retry_ms > 0) ing__retry_hint(s->call, retry_ms);
    cm_call_finish(s->call, code, msg);
}

static void ing__stream_done_batch(ing_batch_t *b, int code, const char *msg) {
    ing__stream_t *s = b->arg;
    pthread_mutex_lock(&s->mu);
    s->pending--;
    if (!s->finished) {
        if (code == CM_STATUS_OK) {
            Iot__Ingest__V1__TelemetryAck ack = IOT__INGEST__V1__TELEMETRY_ACK__INIT;
            ack.acked_seq = b->acked_seq;
            ack.stored = b->stored;
            ack.duplicates = b->duplicates;
            int rc = cm_call_send(s->call, &ack.base);
            if (rc == CM_EFULL) {
                /* The device stopped reading acknowledgements: holding more would grow memory. */
                s->finished = 1;
                cm_call_abort(s->call, CM_STATUS_RESOURCE_EXHAUSTED,
                              "acknowledgements are not being read: read the response stream");
            } else if (rc) {
                s->finished = 1; /* the call already ended */
            }
        } else {
            ing__stream_end_locked(s, code, msg, code == CM_STATUS_UNAVAILABLE ? 500 : 0);
        }
        if (!s->finished && s->half_closed && s->pending == 0) ing__stream_end_locked(s, CM_STATUS_OK, NULL, 0);
    }
    pthread_mutex_unlock(&s->mu);
    ing_batch_free(b);
    ing__stream_unref(s);
}

/* Queues a batch of the stream (an empty one asks for the current acknowledgement). */
static int ing__stream_submit(cm_call_t *call, ing__stream_t *s, Iot__Ingest__V1__Point *const *pts, size_t n) {
    ing_batch_t *b = NULL;
    int code = ing__batch_or_fail(call, s->device_id, pts, n, &b);
    if (code) return code;
    b->done = ing__stream_done_batch;
    b->arg = s;
    char msg[512];
    int64_t retry = 0;
    /* Checked and queued under the stream's lock: once a failed batch has ended the stream, no
     * later message of it may reach a committer, or that batch could commit while the failed one
     * is never resent, and the device's mark would pass points that were never stored. */
    pthread_mutex_lock(&s->mu);
    if (s->finished) {
        pthread_mutex_unlock(&s->mu);
        ing_batch_free(b);
        return cm_call_fail(call, CM_STATUS_UNAVAILABLE, "stream already ended: reconnect");
    }
    atomic_fetch_add(&s->refs, 1);
    s->pending++;
    code = ing_commit_submit(s->ctx->commit, b, msg, sizeof msg, &retry);
    if (code) {
        s->pending--;
        atomic_fetch_sub(&s->refs, 1); /* not the last: the call holds one */
    }
    pthread_mutex_unlock(&s->mu);
    if (code) {
        ing_batch_free(b);
        ing__retry_hint(call, retry);
        return cm_call_fail(call, code, "%s", msg);
    }
    return CM_PENDING;
}

static int ing_stream_start(cm_call_t *call, const ProtobufCMessage *req) {
    (void)req;
    ing_ctx_t *ctx = ing__ctx(call);
    char device_id[ING_MAX_DEVICE_ID + 1];
    int code = ing__auth_or_fail(call, device_id);
    if (code) return code;
    ing__stream_t *s = cm_calloc(1, sizeof *s);
    atomic_init(&s->refs, 1);
    pthread_mutex_init(&s->mu, NULL);
    s->call = call;
    cm_call_ref(call);
    s->ctx = ctx;
    memcpy(s->device_id, device_id, sizeof device_id);
    pthread_mutex_lock(&ctx->mu);
    s->next = ctx->streams;
    if (s->next) s->next->prev = s;
    ctx->streams = s;
    ctx->n_streams++;
    pthread_mutex_unlock(&ctx->mu);
    cm_call_set_user(call, s);
    /* The first acknowledgement tells a reconnecting device where to resume; it goes through the
     * device's committer like any batch, so it can never overtake an earlier batch's ack. */
    return ing__stream_submit(call, s, NULL, 0);
}

static int ing_stream_message(cm_call_t *call, const ProtobufCMessage *msg_) {
    const Iot__Ingest__V1__StreamTelemetryRequest *msg = (const void *)msg_;
    return ing__stream_submit(call, cm_call_user(call), msg->points, msg->n_points);
}

static int ing_stream_half_close(cm_call_t *call, ProtobufCMessage *resp) {
    (void)resp;
    ing__stream_t *s = cm_call_user(call);
    pthread_mutex_lock(&s->mu);
    s->half_closed = 1;
    int done = s->pending == 0 && !s->finished;
    if (done) s->finished = 1;
    pthread_mutex_unlock(&s->mu);
    return done ? CM_STATUS_OK : CM_PENDING;
}

static void ing_stream_done(cm_call_t *call, int cancelled) {
    (void)cancelled;
    ing__stream_t *s = cm_call_user(call);
    if (!s) return; /* refused in start */
    ing_ctx_t *ctx = s->ctx;
    pthread_mutex_lock(&ctx->mu);
    if (s->prev)
        s->prev->next = s->next;
    else
        ctx->streams = s->next;
    if (s->next) s->next->prev = s->prev;
    ctx->n_streams--;
    pthread_mutex_unlock(&ctx->mu);
    pthread_mutex_lock(&s->mu);
    s->finished = 1;
    pthread_mutex_unlock(&s->mu);
    ing__stream_unref(s);
}

/* ---- queries ---------------------------------------------------------------------------------- */

static int ing_query_telemetry_check_rpc(cm_call_t *call, ProtobufCMessage *req) {
    return ing_query_telemetry_check(call, (const void *)req);
}

static int ing_latest_values_check_rpc(cm_call_t *call, ProtobufCMessage *req) {
    return ing_latest_values_check(call, (const void *)req);
}

static int ing_watch_check_rpc(cm_call_t *call, ProtobufCMessage *req) { return ing_watch_check(call, req); }

static int ing_query_telemetry_rpc(cm_call_t *call, const ProtobufCMessage *req, ProtobufCMessage *resp) {
    return ing_query_telemetry(call, ing__ctx(call)->store->pg, (const void *)req, (void *)resp);
}

static int ing_latest_values_rpc(cm_call_t *call, const ProtobufCMessage *req, ProtobufCMessage *resp) {
    return ing_latest_values(call, ing__ctx(call)->store->pg, (const void *)req, (void *)resp);
}

static int ing_watch_start_rpc(cm_call_t *call, const ProtobufCMessage *req) {
    return ing_watch_start(ing__ctx(call)->watch, call, req);
}

static const cm_method_t ing__methods[] = {
    {.name = "PushTelemetry", .kind = CM_RPC_UNARY, .unary = ing_push_telemetry, .async = 1},
    {.name = "StreamTelemetry",
     .kind = CM_RPC_BIDI,
     .start = ing_stream_start,
     .message = ing_stream_message,
     .half_close = ing_stream_half_close,
     .done = ing_stream_done},
    {.name = "QueryTelemetry", .kind = CM_RPC_UNARY, .unary = ing_query_telemetry_rpc, .check = ing_query_telemetry_check_rpc},
    {.name = "LatestValues", .kind = CM_RPC_UNARY, .unary = ing_latest_values_rpc, .check = ing_latest_values_check_rpc},
    {.name = "WatchTelemetry", .kind = CM_RPC_SERVER_STREAM, .start = ing_watch_start_rpc, .done = ing_watch_done,
     .check = ing_watch_check_rpc},
};

void ing_service_init(cm_service_t *svc, ing_ctx_t *ctx) {
    pthread_mutex_init(&ctx->mu, NULL);
    ctx->streams = NULL;
    ctx->n_streams = 0;
    svc->desc = &iot__ingest__v1__ingest__descriptor;
    svc->methods = ing__methods;
    svc->n_methods = sizeof ing__methods / sizeof ing__methods[0];
    svc->ctx = ctx;
}

void ing_ctx_shutdown(void *arg) {
    ing_ctx_t *ctx = arg;
    ing_watch_shutdown(ctx->watch);
    ing_committers_drain(ctx->commit, ctx->drain_ms);
    /* Collect under the lock, end outside it: ending a call must not wait on ctx->mu. */
    pthread_mutex_lock(&ctx->mu);
    size_t n = 0;
    ing__stream_t **all = cm_malloc((ctx->n_streams + 1) * sizeof *all);
    for (ing__stream_t *s = ctx->streams; s; s = s->next) {
        atomic_fetch_add(&s->refs, 1);
        all[n++] = s;
    }
    pthread_mutex_unlock(&ctx->mu);
    for (size_t i = 0; i < n; i++) {
        pthread_mutex_lock(&all[i]->mu);
        ing__stream_end_locked(all[i], CM_STATUS_UNAVAILABLE,
                               "ingest is shutting down: reconnect and resend from your last acknowledgement", 100);
        pthread_mutex_unlock(&all[i]->mu);
        ing__stream_unref(all[i]);
    }
    cm_free(all);
    if (n) cm_log_kv(CM_LOG_INFO, "ended open device streams for shutdown", NULL);
}

void ing_ctx_destroy(ing_ctx_t *ctx) { pthread_mutex_destroy(&ctx->mu); }
