/* WatchTelemetry (contract in ing_watch.h and the README). */
#include "ing_watch.h"

#include <inttypes.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cm_alloc.h"
#include "cm_err.h"
#include "cm_log.h"
#include "cm_loop.h"
#include "cm_map.h"
#include "cm_metrics.h"
#include "cm_redis.h"
#include "cm_time.h"
#include "ing_batch.h"
#include "iot/ingest/v1/ingest.pb-c.h"

#define ING__WATCH_BLOCK_MS 250 /* one XREAD BLOCK: bounds how late a new shard joins the read */
#define ING__WATCH_IDLE_MS 1000 /* nobody watching: the loop is kicked when someone starts */
#define ING__WATCH_COUNT "512"  /* entries per stream per read */
#define ING__WATCH_MAX_METRICS 64

/* A stream entry id "<ms>-<seq>". */
typedef struct ing__sid_s {
    uint64_t ms, seq;
} ing__sid_t;

static int ing__sid_cmp(ing__sid_t a, ing__sid_t b) {
    if (a.ms != b.ms) return a.ms < b.ms ? -1 : 1;
    return a.seq < b.seq ? -1 : a.seq > b.seq;
}

static int ing__sid_parse(const char *s, ing__sid_t *out) {
    char *end;
    out->ms = strtoull(s, &end, 10);
    if (end == s || *end != '-') return -1;
    const char *q = end + 1;
    out->seq = strtoull(q, &end, 10);
    return end == q || *end ? -1 : 0;
}

typedef struct ing__watcher_s {
    cm_call_t *call;
    uint32_t shard;
    ing__sid_t after;  /* entries up to here were seen (sent or not this device's) */
    uint64_t last_seq; /* highest point seq sent: redeliveries are dropped */
    char device[ING_MAX_DEVICE_ID + 1];
    size_t n_metrics;
    char **metrics;
} ing__watcher_t;

struct ing_watch_s {
    const ing_config_t *cfg;
    pthread_mutex_t mu; /* guards w, nw, capw, closing */
    ing__watcher_t **w;
    size_t nw, capw;
    int closing;
    cm_redis_pool_t *join;     /* the newest entry of a shard when a watch starts */
    cm_redis_t *reader;        /* the loop thread's own connection (blocking reads) */
    cm_loop_t *loop;
    int64_t fail_logged_ms;
    cm_gauge_t *g_watchers;
    cm_counter_t *c_sent, *c_dropped;
};

static void ing__watcher_free(ing__watcher_t *x) {
    for (size_t i = 0; i < x->n_metrics; i++) cm_free(x->metrics[i]);
    cm_free(x->metrics);
    cm_free(x);
}

static void ing__key(const ing_config_t *cfg, uint32_t shard, char *out, size_t cap) {
    snprintf(out, cap, "%s{%" PRIu32 "}", cfg->stream_prefix, shard);
}

/* ---- the reader -------------------------------------------------------------------------------- */

static int ing__wants(const ing__watcher_t *x, const char *metric) {
    if (!x->n_metrics) return 1;
    for (size_t i = 0; i < x->n_metrics; i++)
        if (strcmp(x->metrics[i], metric) == 0) return 1;
    return 0;
}

/* Sends the points of b that x wants and has not had; called with mu held. */
static void ing__deliver(ing_watch_t *w, ing__watcher_t *x, const Iot__Ingest__V1__PublishedBatch *b,
                         Iot__Ingest__V1__Point **scratch) {
    size_t n = 0;
    uint64_t top = x->last_seq;
    for (size_t i = 0; i < b->n_points; i++) {
        const Iot__Ingest__V1__Point *p = b->points[i];
        if (p->seq <= x->last_seq || !ing__wants(x, p->metric)) continue;
        scratch[n++] = b->points[i];
        if (p->seq > top) top = p->seq;
    }
    if (!n) return;
    Iot__Ingest__V1__PublishedBatch out = *b;
    out.n_points = n;
    out.points = scratch;
    int rc = cm_call_send(x->call, &out.base);
    if (rc == CM_EFULL) {
        cm_call_abort(x->call, CM_STATUS_RESOURCE_EXHAUSTED,
                      "this watch fell behind (the client stopped reading); watch again and fill the gap with QueryTelemetry");
        cm_counter_add(w->c_dropped, 1);
        x->after = (ing__sid_t){UINT64_MAX, UINT64_MAX}; /* nothing more until `done` removes it */
        return;
    }
    if (rc == 0) cm_counter_add(w->c_sent, 1);
    x->last_seq = top;
}

/* One stream's entries from an XREAD reply, fanned out to the watchers of that shard that took part
 * in the read (cursor at or after `from`); called with mu held. */
static void ing__fan_out(ing_watch_t *w, uint32_t shard, ing__sid_t from, const redisReply *entries) {
    Iot__Ingest__V1__Point **scratch = NULL;
    for (size_t e = 0; e < entries->elements; e++) {
        const redisReply *ent = entries->element[e];
        ing__sid_t id;
        if (ent->type != REDIS_REPLY_ARRAY || ent->elements != 2 || ent->element[0]->type != REDIS_REPLY_STRING ||
            ing__sid_parse(ent->element[0]->str, &id))
            continue;
        const redisReply *f = ent->element[1];
        const char *device = NULL;
        const redisReply *batch = NULL;
        for (size_t k = 0; f->type == REDIS_REPLY_ARRAY && k + 1 < f->elements; k += 2) {
            const redisReply *name = f->element[k], *val = f->element[k + 1];
            if (name->type != REDIS_REPLY_STRING || val->type != REDIS_REPLY_STRING) continue;
            if (strcmp(name->str, "device") == 0) device = val->str;
            else if (strcmp(name->str, "batch") == 0) batch = val;
        }
        Iot__Ingest__V1__PublishedBatch *b = NULL;
        for (size_t i = 0; i < w->nw; i++) {
            ing__watcher_t *x = w->w[i];
            /* Joined while this read was under way with an older cursor: the next read starts
             * from its cursor, so nothing it should see is skipped by advancing it here. */
            if (x->shard != shard || ing__sid_cmp(x->after, from) < 0 || ing__sid_cmp(id, x->after) <= 0) continue;
            x->after = id;
            if (!device || !batch || strcmp(device, x->device) != 0) continue;
            if (!b) {
                b = iot__ingest__v1__published_batch__unpack(NULL, batch->len, (const uint8_t *)batch->str);
                if (!b) {
                    cm_log_kv(CM_LOG_WARN, "telemetry stream entry does not decode as a PublishedBatch; skipped",
                              "device", device, "id", ent->element[0]->str, NULL);
                    break;
                }
                scratch = cm_realloc(scratch, (b->n_points + 1) * sizeof *scratch);
            }
            ing__deliver(w, x, b, scratch);
        }
        if (b) iot__ingest__v1__published_batch__free_unpacked(b, NULL);
    }
    cm_free(scratch);
}

static int64_t ing__read(void *arg) {
    ing_watch_t *w = arg;
    const ing_config_t *cfg = w->cfg;
    uint32_t shards = (uint32_t)cfg->shards;
    /* Each shard with a watcher, read from its lowest cursor. */
    ing__sid_t *from = cm_malloc(shards * sizeof *from);
    unsigned char *on = cm_calloc(shards, 1);
    size_t n_on = 0;
    pthread_mutex_lock(&w->mu);
    for (size_t i = 0; i < w->nw; i++) {
        ing__watcher_t *x = w->w[i];
        if (x->after.ms == UINT64_MAX) continue; /* ended, waiting for `done` */
        if (!on[x->shard]) {
            on[x->shard] = 1;
            from[x->shard] = x->after;
            n_on++;
        } else if (ing__sid_cmp(x->after, from[x->shard]) < 0) {
            from[x->shard] = x->after;
        }
    }
    pthread_mutex_unlock(&w->mu);
    if (!n_on) {
        cm_free(from);
        cm_free(on);
        return ING__WATCH_IDLE_MS;
    }
    size_t argc = 6 + 2 * n_on, a = 0;
    const char **argv = cm_malloc(argc * sizeof *argv);
    char (*keys)[96] = cm_malloc(n_on * sizeof *keys);
    char (*ids)[48] = cm_malloc(n_on * sizeof *ids);
    uint32_t *which = cm_malloc(n_on * sizeof *which);
    char block[16];
    snprintf(block, sizeof block, "%d", ING__WATCH_BLOCK_MS);
    argv[a++] = "XREAD";
    argv[a++] = "COUNT";
    argv[a++] = ING__WATCH_COUNT;
    argv[a++] = "BLOCK";
    argv[a++] = block;
    argv[a++] = "STREAMS";
    size_t j = 0;
    for (uint32_t s = 0; s < shards; s++)
        if (on[s]) {
            ing__key(cfg, s, keys[j], sizeof keys[j]);
            snprintf(ids[j], sizeof ids[j], "%" PRIu64 "-%" PRIu64, from[s].ms, from[s].seq);
            which[j] = s;
            argv[6 + j] = keys[j];
            argv[6 + n_on + j] = ids[j];
            j++;
        }
    redisReply *r = cm_redis_cmd(w->reader, (int)argc, argv, NULL);
    int64_t next = 0;
    if (!r || r->type == REDIS_REPLY_ERROR) {
        int64_t now = cm_wall_ms();
        if (now - w->fail_logged_ms > 10000) { /* at most one line per 10 s while Redis is away */
            w->fail_logged_ms = now;
            cm_log_kv(CM_LOG_WARN, "WatchTelemetry cannot read the telemetry streams; retrying", "error",
                      r ? r->str : cm_redis_error(w->reader), NULL);
        }
        next = ING__WATCH_IDLE_MS;
    } else if (r->type == REDIS_REPLY_ARRAY) {
        pthread_mutex_lock(&w->mu);
        for (size_t k = 0; k < r->elements; k++) {
            const redisReply *sr = r->element[k];
            if (sr->type != REDIS_REPLY_ARRAY || sr->elements != 2 || sr->element[0]->type != REDIS_REPLY_STRING ||
                sr->element[1]->type != REDIS_REPLY_ARRAY)
                continue;
            for (size_t q = 0; q < n_on; q++)
                if (strcmp(sr->element[0]->str, keys[q]) == 0) {
                    ing__fan_out(w, which[q], from[which[q]], sr->element[1]);
                    break;
                }
        }
        pthread_mutex_unlock(&w->mu);
    } /* a nil reply: the block timed out with nothing new */
    if (r) freeReplyObject(r);
    cm_free(argv);
    cm_free(keys);
    cm_free(ids);
    cm_free(which);
    cm_free(from);
    cm_free(on);
    return next;
}

/* ---- the RPC ----------------------------------------------------------------------------------- */

/* The id of the newest entry of a shard (0-0 when the stream is empty or absent). */
static int ing__newest(ing_watch_t *w, uint32_t shard, ing__sid_t *out, char *err, size_t cap) {
    char key[96];
    ing__key(w->cfg, shard, key, sizeof key);
    const char *argv[] = {"XREVRANGE", key, "+", "-", "COUNT", "1"};
    redisReply *r = cm_redis_pool_cmd(w->join, (int)w->cfg->redis_timeout_ms, 6, argv, NULL, err, cap);
    if (!r) return -1;
    *out = (ing__sid_t){0, 0};
    int rc = 0;
    if (r->type == REDIS_REPLY_ARRAY && r->elements > 0) {
        const redisReply *e = r->element[0];
        if (e->type != REDIS_REPLY_ARRAY || e->elements < 1 || e->element[0]->type != REDIS_REPLY_STRING ||
            ing__sid_parse(e->element[0]->str, out)) {
            snprintf(err, cap, "unexpected XREVRANGE reply");
            rc = -1;
        }
    }
    freeReplyObject(r);
    return rc;
}

int ing_watch_check(cm_call_t *call, const ProtobufCMessage *req_) {
    const Iot__Ingest__V1__WatchTelemetryRequest *req = (const void *)req_;
    if (!*req->device_id) return cm_call_fail(call, CM_STATUS_INVALID_ARGUMENT, "device_id: required");
    if (!ing_device_id_ok(req->device_id)) return cm_call_fail(call, CM_STATUS_INVALID_ARGUMENT, "device_id: " ING_DEVICE_ID_RULE);
    if (req->n_metrics > ING__WATCH_MAX_METRICS)
        return cm_call_fail(call, CM_STATUS_INVALID_ARGUMENT, "metrics: at most %d names (got %zu)",
                            ING__WATCH_MAX_METRICS, req->n_metrics);
    for (size_t i = 0; i < req->n_metrics; i++)
        if (!ing_name_ok(req->metrics[i], ING_MAX_METRIC))
            return cm_call_fail(call, CM_STATUS_INVALID_ARGUMENT,
                                "metrics[%zu]: must be 1-%d characters of A-Z a-z 0-9 _ . : / -", i, ING_MAX_METRIC);
    return 0;
}

int ing_watch_start(ing_watch_t *w, cm_call_t *call, const ProtobufCMessage *req_) {
    const Iot__Ingest__V1__WatchTelemetryRequest *req = (const void *)req_;
    int rc = ing_watch_check(call, req_);
    if (rc) return rc;
    ing__watcher_t *x = cm_calloc(1, sizeof *x);
    x->call = call;
    x->shard = (uint32_t)(cm_hash64(req->device_id, strlen(req->device_id)) % (uint64_t)w->cfg->shards);
    snprintf(x->device, sizeof x->device, "%s", req->device_id);
    if (req->n_metrics) {
        x->metrics = cm_malloc(req->n_metrics * sizeof *x->metrics);
        for (size_t i = 0; i < req->n_metrics; i++) x->metrics[x->n_metrics++] = cm_strdup(req->metrics[i]);
    }
    char err[256];
    if (ing__newest(w, x->shard, &x->after, err, sizeof err)) {
        ing__watcher_free(x);
        return cm_call_fail(call, CM_STATUS_UNAVAILABLE, "telemetry streams unavailable (redis: %s); retry", err);
    }
    pthread_mutex_lock(&w->mu);
    if (w->closing) {
        pthread_mutex_unlock(&w->mu);
        ing__watcher_free(x);
        return cm_call_fail(call, CM_STATUS_UNAVAILABLE, "ingest is shutting down; watch again elsewhere");
    }
    if (w->nw >= (size_t)w->cfg->max_watchers) {
        pthread_mutex_unlock(&w->mu);
        ing__watcher_free(x);
        return cm_call_fail(call, CM_STATUS_RESOURCE_EXHAUSTED,
                            "%" PRId64 " telemetry watches are open already (IOT_INGEST_MAX_WATCHERS); retry later",
                            w->cfg->max_watchers);
    }
    if (w->nw == w->capw) w->w = cm_realloc(w->w, (w->capw = w->capw ? w->capw * 2 : 16) * sizeof *w->w);
    w->w[w->nw++] = x;
    cm_call_ref(call);
    cm_call_set_user(call, w);
    cm_gauge_set(w->g_watchers, (double)w->nw);
    pthread_mutex_unlock(&w->mu);
    cm_loop_kick(w->loop);
    return CM_PENDING;
}

void ing_watch_done(cm_call_t *call, int cancelled) {
    (void)cancelled;
    ing_watch_t *w = cm_call_user(call);
    if (!w) return; /* refused in start */
    ing__watcher_t *x = NULL;
    pthread_mutex_lock(&w->mu);
    for (size_t i = 0; i < w->nw; i++)
        if (w->w[i]->call == call) {
            x = w->w[i];
            w->w[i] = w->w[--w->nw];
            break;
        }
    cm_gauge_set(w->g_watchers, (double)w->nw);
    pthread_mutex_unlock(&w->mu);
    if (x) ing__watcher_free(x);
    cm_call_unref(call);
}

/* ---- lifecycle --------------------------------------------------------------------------------- */

ing_watch_t *ing_watch_new(const ing_config_t *cfg) {
    ing_watch_t *w = cm_calloc(1, sizeof *w);
    w->cfg = cfg;
    pthread_mutex_init(&w->mu, NULL);
    w->join = cm_redis_pool_new(cfg->redis_addr, 2, (int)cfg->redis_timeout_ms, NULL);
    /* A blocking read answers after up to ING__WATCH_BLOCK_MS: the timeout covers that too. */
    w->reader = cm_redis_new(cfg->redis_addr, (int)cfg->redis_timeout_ms + ING__WATCH_BLOCK_MS, NULL);
    if (!w->join || !w->reader) {
        ing_watch_free(w);
        return NULL;
    }
    w->g_watchers = cm_metrics_gauge("ingest_telemetry_watchers", "open WatchTelemetry streams", NULL);
    w->c_sent = cm_metrics_counter("ingest_watch_batches_sent_total", "batches sent on WatchTelemetry streams", NULL);
    w->c_dropped = cm_metrics_counter("ingest_watch_overflows_total",
                                      "WatchTelemetry streams ended because the client stopped reading", NULL);
    w->loop = cm_loop_start(ing__read, w, 0);
    return w;
}

void ing_watch_shutdown(ing_watch_t *w) {
    pthread_mutex_lock(&w->mu);
    w->closing = 1;
    for (size_t i = 0; i < w->nw; i++)
        cm_call_abort(w->w[i]->call, CM_STATUS_UNAVAILABLE, "ingest is shutting down; watch again elsewhere");
    pthread_mutex_unlock(&w->mu);
}

void ing_watch_free(ing_watch_t *w) {
    if (!w) return;
    cm_loop_stop(w->loop);
    for (size_t i = 0; i < w->nw; i++) ing__watcher_free(w->w[i]);
    cm_free(w->w);
    if (w->join) cm_redis_pool_free(w->join);
    if (w->reader) cm_redis_free(w->reader);
    pthread_mutex_destroy(&w->mu);
    cm_free(w);
}
