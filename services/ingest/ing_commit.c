/* The committers (see ing_commit.h for the contract). */
#include "ing_commit.h"

#include <inttypes.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cm_alloc.h"
#include "cm_buf.h"
#include "cm_err.h"
#include "cm_log.h"
#include "cm_map.h"
#include "cm_metrics.h"
#include "cm_redis.h"
#include "cm_rpc.h"
#include "cm_time.h"

/* How long a committer that lost Postgres waits before probing again; submits are refused
 * (UNAVAILABLE, with this as the retry hint) meanwhile. */
#define ING__PROBE_MS 500
#define ING__BUSY_RETRY_MS 200

typedef struct ing__committer_s {
    ing_committers_t *all;
    int idx;
    pthread_t th;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    ing_batch_t *head, *tail;
    size_t queued;          /* points in the queue */
    atomic_int down;        /* Postgres or Redis unreachable: refuse until a probe succeeds */
    char down_why[512];     /* under mu */
    cm_pg_t *pg;            /* one connection */
    cm_redis_t *redis;
    cm_buf_t ids, seqs;     /* array literals, reused */
} ing__committer_t;

struct ing_committers_s {
    const ing_config_t *cfg;
    ing_store_t *store;
    ing_devices_t *devices;
    int n;
    ing__committer_t *c;
    atomic_llong pending;
    atomic_int draining, stopping;
    cm_counter_t *stored, *dups, *batches, *groups, *failures, *refused_full, *refused_down;
    cm_gauge_t *pending_g;
};

int64_t ing_committers_pending(const ing_committers_t *c) { return atomic_load(&((ing_committers_t *)c)->pending); }

int ing_commit_submit(ing_committers_t *all, ing_batch_t *b, char *msg, size_t msg_cap, int64_t *retry_ms) {
    ing__committer_t *c = &all->c[cm_hash64(b->device_id, strlen(b->device_id)) % (uint64_t)all->n];
    if (atomic_load(&all->draining)) {
        snprintf(msg, msg_cap, "ingest is shutting down: reconnect and resend from your last acknowledgement");
        *retry_ms = 100;
        return CM_STATUS_UNAVAILABLE;
    }
    if (atomic_load(&c->down)) {
        pthread_mutex_lock(&c->mu);
        snprintf(msg, msg_cap, "telemetry store unavailable (%s): retry", c->down_why);
        pthread_mutex_unlock(&c->mu);
        *retry_ms = ING__PROBE_MS;
        cm_counter_add(all->refused_down, 1);
        return CM_STATUS_UNAVAILABLE;
    }
    long long n = (long long)b->n;
    long long now = atomic_fetch_add(&all->pending, n) + n;
    if (now > all->cfg->max_pending && now != n) {
        /* Over the bound (a lone batch is always let in, or a batch larger than the bound could
         * never pass): Postgres is behind, shed load instead of growing memory. */
        atomic_fetch_sub(&all->pending, n);
        snprintf(msg, msg_cap, "ingest is behind: %lld points are waiting for Postgres (limit %lld, IOT_INGEST_MAX_PENDING); retry shortly",
                 now - n, (long long)all->cfg->max_pending);
        *retry_ms = ING__BUSY_RETRY_MS;
        cm_counter_add(all->refused_full, 1);
        return CM_STATUS_RESOURCE_EXHAUSTED;
    }
    b->next = NULL;
    b->enqueued_ns = cm_mono_ns();
    pthread_mutex_lock(&c->mu);
    if (c->tail)
        c->tail->next = b;
    else
        c->head = b;
    c->tail = b;
    c->queued += b->n;
    pthread_cond_signal(&c->cv);
    pthread_mutex_unlock(&c->mu);
    return CM_STATUS_OK;
}

/* Appends s to an array literal being built in b ("{" ... "}"), quoted. */
static void ing__array_add(cm_buf_t *b, const char *s) {
    cm_buf_append(b, b->len > 1 ? ",\"" : "\"", b->len > 1 ? 2 : 1);
    for (; *s; s++) {
        if (*s == '"' || *s == '\\') cm_buf_append(b, "\\", 1);
        cm_buf_append(b, s, 1);
    }
    cm_buf_append(b, "\"", 1);
}

typedef struct ing__dev_s {
    const char *id;
    uint64_t seq;     /* the mark: as locked, then moved by this group */
    uint64_t locked;  /* the mark as locked */
} ing__dev_t;

static int ing__dev_cmp(const void *a, const void *b) {
    return strcmp(((const ing__dev_t *)a)->id, ((const ing__dev_t *)b)->id);
}

static ing__dev_t *ing__dev_find(ing__dev_t *devs, size_t n, const char *id) {
    ing__dev_t key = {id, 0, 0};
    return bsearch(&key, devs, n, sizeof *devs, ing__dev_cmp);
}

/* Publishes the stored part of each batch: one XADD per batch, pipelined. 0 or CM_EREDIS. */
static int ing__publish(ing__committer_t *c, ing_batch_t *list, char *err, size_t err_cap) {
    const ing_config_t *cfg = c->all->cfg;
    char maxlen[24];
    snprintf(maxlen, sizeof maxlen, "%" PRId64, cfg->stream_maxlen);
    int64_t now = cm_wall_ms();
    cm_buf_t payload = CM_BUF_INIT;
    int sent = 0;
    for (ing_batch_t *b = list; b; b = b->next) {
        if (!b->stored) continue;
        size_t k = b->n - (size_t)b->stored;
        char key[96], first[24], last[24], count[16];
        snprintf(key, sizeof key, "%s{%" PRIu64 "}", cfg->stream_prefix,
                 cm_hash64(b->device_id, strlen(b->device_id)) % (uint64_t)cfg->shards);
        snprintf(first, sizeof first, "%" PRIu64, b->seq[k]);
        snprintf(last, sizeof last, "%" PRIu64, b->seq[b->n - 1]);
        snprintf(count, sizeof count, "%d", b->stored);
        /* PublishedBatch: device_id (1), the stored points (2, pre-encoded), ingested_ms (3). */
        cm_buf_reset(&payload);
        size_t dl = strlen(b->device_id);
        cm_buf_append(&payload, "\x0a", 1);
        ing_varint(&payload, dl);
        cm_buf_append(&payload, b->device_id, dl);
        cm_buf_append(&payload, b->pb.data + b->pb_off[k], b->pb_off[b->n] - b->pb_off[k]);
        cm_buf_append(&payload, "\x18", 1);
        ing_varint(&payload, (uint64_t)now);
        const char *argv[] = {"XADD", key, "MAXLEN", "~", maxlen, "*", "device", b->device_id, "first_seq", first,
                              "last_seq", last, "count", count, "batch", payload.data};
        size_t lens[16];
        for (int i = 0; i < 15; i++) lens[i] = strlen(argv[i]);
        lens[15] = payload.len;
        if (cm_redis_append(c->redis, 16, argv, lens)) {
            snprintf(err, err_cap, "redis: %s", cm_redis_error(c->redis));
            cm_buf_free(&payload);
            return CM_EREDIS;
        }
        sent++;
    }
    cm_buf_free(&payload);
    int rc = 0;
    for (int i = 0; i < sent; i++) {
        redisReply *r = NULL;
        if (cm_redis_get_reply(c->redis, &r) || !r) {
            snprintf(err, err_cap, "redis: %s", cm_redis_error(c->redis));
            return CM_EREDIS; /* the connection is reset before its next use */
        }
        if (r->type == REDIS_REPLY_ERROR && rc == 0) {
            snprintf(err, err_cap, "redis: %s", r->str);
            rc = CM_EREDIS;
        }
        freeReplyObject(r);
    }
    return rc;
}

/* Commits one group. Returns a gRPC status; on failure msg says why. */
static int ing__commit(ing__committer_t *c, ing_batch_t *list, char *msg, size_t msg_cap) {
    ing_committers_t *all = c->all;
    cm_pg_conn_t *pc = cm_pg_acquire(c->pg, 2000);
    if (!pc) {
        snprintf(msg, msg_cap, "postgres: %s", cm_pg_last_error(c->pg));
        return CM_STATUS_UNAVAILABLE;
    }
    size_t nb = 0;
    int64_t lo = INT64_MAX, hi = INT64_MIN;
    for (ing_batch_t *b = list; b; b = b->next) {
        nb++;
        if (b->n && b->min_ms < lo) lo = b->min_ms;
        if (b->n && b->max_ms > hi) hi = b->max_ms;
    }
    int code = CM_STATUS_OK;
    if (lo <= hi && ing_store_cover(all->store, pc, lo, hi, msg, msg_cap)) {
        code = cm_pg_conn_lost(pc) ? CM_STATUS_UNAVAILABLE : CM_STATUS_INTERNAL;
        cm_pg_release(c->pg, pc);
        return code;
    }

    /* The group's devices, sorted and unique. */
    ing__dev_t *devs = cm_malloc(nb * sizeof *devs);
    size_t nd = 0;
    for (ing_batch_t *b = list; b; b = b->next) devs[nd++] = (ing__dev_t){b->device_id, 0, 0};
    qsort(devs, nd, sizeof *devs, ing__dev_cmp);
    size_t u = 0;
    for (size_t i = 0; i < nd; i++)
        if (u == 0 || strcmp(devs[u - 1].id, devs[i].id) != 0) devs[u++] = devs[i];
    nd = u;
    cm_buf_reset(&c->ids);
    cm_buf_append(&c->ids, "{", 1);
    for (size_t i = 0; i < nd; i++) ing__array_add(&c->ids, devs[i].id);
    cm_buf_append(&c->ids, "}", 1);

    PGresult *r = NULL;
    const char *what = "begin";
    if (cm_pg_begin(pc)) goto pg_fail;
    what = "locking sequence marks";
    const char *p1[] = {c->ids.data};
    if (cm_pg_exec(pc, &r, "SELECT o_device_id, o_seq FROM claim_seq($1::text[])", 1, p1)) goto pg_fail;
    for (int i = 0; i < PQntuples(r); i++) {
        ing__dev_t *d = ing__dev_find(devs, nd, PQgetvalue(r, i, 0));
        if (d) d->seq = d->locked = strtoull(PQgetvalue(r, i, 1), NULL, 10);
    }
    PQclear(r);

    /* Drop each batch's already-stored prefix; the rest goes into one COPY. */
    int copying = 0;
    for (ing_batch_t *b = list; b; b = b->next) {
        ing__dev_t *d = ing__dev_find(devs, nd, b->device_id);
        size_t k = 0;
        while (k < b->n && b->seq[k] <= d->seq) k++;
        b->duplicates = (int)k;
        b->stored = (int)(b->n - k);
        if (b->stored) {
            if (!copying) {
                what = "copy";
                if (cm_pg_copy_begin(pc, "COPY telemetry (device_id, metric, ts, seq, kind, v_double, v_int, v_bool, "
                                         "v_text, labels) FROM STDIN WITH (FORMAT binary)"))
                    goto pg_fail;
                if (cm_pg_copy_put(pc, ing_copy_header, sizeof ing_copy_header)) goto pg_fail;
                copying = 1;
            }
            if (cm_pg_copy_put(pc, b->rows.data + b->row_off[k], b->row_off[b->n] - b->row_off[k])) goto pg_fail;
            d->seq = b->seq[b->n - 1];
        }
        b->acked_seq = d->seq;
    }
    if (copying) {
        if (cm_pg_copy_put(pc, ing_copy_trailer, sizeof ing_copy_trailer) || cm_pg_copy_end(pc)) goto pg_fail;
        cm_buf_reset(&c->ids);
        cm_buf_reset(&c->seqs);
        cm_buf_append(&c->ids, "{", 1);
        cm_buf_append(&c->seqs, "{", 1);
        for (size_t i = 0; i < nd; i++) {
            if (devs[i].seq == devs[i].locked) continue;
            ing__array_add(&c->ids, devs[i].id);
            cm_buf_printf(&c->seqs, "%s%" PRIu64, c->seqs.len > 1 ? "," : "", devs[i].seq);
        }
        cm_buf_append(&c->ids, "}", 1);
        cm_buf_append(&c->seqs, "}", 1);
        what = "moving sequence marks";
        const char *p2[] = {c->ids.data, c->seqs.data};
        if (cm_pg_exec(pc,
                       NULL,
                       "UPDATE device_seq SET seq = v.s, updated_at = now() "
                       "FROM unnest($1::text[], $2::bigint[]) AS v(d, s) WHERE device_seq.device_id = v.d",
                       2, p2))
            goto pg_fail;
        /* Published before the commit: if the commit then fails the device resends and the
         * stream sees those points again (consumers de-duplicate by device and seq); the other
         * order could lose them from the stream for good on a crash between the two. */
        char rerr[256];
        if (ing__publish(c, list, rerr, sizeof rerr)) {
            cm_pg_rollback(pc);
            cm_pg_release(c->pg, pc);
            cm_free(devs);
            snprintf(msg, msg_cap, "%s", rerr);
            return CM_STATUS_UNAVAILABLE;
        }
    }
    what = "commit";
    if (cm_pg_commit(pc)) goto pg_fail;
    cm_pg_release(c->pg, pc);
    cm_free(devs);
    return CM_STATUS_OK;

pg_fail:
    snprintf(msg, msg_cap, "postgres (%s): %s", what, cm_pg_error(pc));
    code = cm_pg_conn_lost(pc) ? CM_STATUS_UNAVAILABLE : CM_STATUS_INTERNAL;
    if (!cm_pg_conn_lost(pc)) cm_pg_rollback(pc);
    cm_pg_release(c->pg, pc);
    cm_free(devs);
    return code;
}

/* While down: can we reach both stores again? */
static int ing__probe(ing__committer_t *c, char *why, size_t cap) {
    cm_pg_conn_t *pc = cm_pg_acquire(c->pg, 1000);
    if (!pc) {
        snprintf(why, cap, "postgres: %s", cm_pg_last_error(c->pg));
        return 0;
    }
    int ok = cm_pg_exec(pc, NULL, "SELECT 1", 0, NULL) == 0;
    if (!ok) snprintf(why, cap, "postgres: %s", cm_pg_error(pc));
    cm_pg_release(c->pg, pc);
    if (ok && cm_redis_ping(c->redis) != 0) {
        snprintf(why, cap, "redis: %s", cm_redis_error(c->redis));
        ok = 0;
    }
    return ok;
}

static void ing__answer(ing__committer_t *c, ing_batch_t *list, int code, const char *msg) {
    ing_committers_t *all = c->all;
    long long pts = 0;
    uint64_t stored = 0, dups = 0, n = 0;
    int64_t now = cm_wall_ms();
    while (list) {
        ing_batch_t *b = list;
        list = b->next;
        pts += (long long)b->n;
        n++;
        if (code == CM_STATUS_OK) {
            stored += (uint64_t)b->stored;
            dups += (uint64_t)b->duplicates;
            ing_devices_seen(all->devices, b->device_id, now);
        }
        b->done(b, code, msg); /* frees b */
    }
    atomic_fetch_sub(&all->pending, pts);
    cm_counter_add(all->batches, n);
    cm_counter_add(all->stored, stored);
    cm_counter_add(all->dups, dups);
    cm_gauge_set(all->pending_g, (double)atomic_load(&all->pending));
}

static void *ing__committer_main(void *arg) {
    ing__committer_t *c = arg;
    ing_committers_t *all = c->all;
    const ing_config_t *cfg = all->cfg;
    char msg[640], idx[12];
    snprintf(idx, sizeof idx, "%d", c->idx);
    for (;;) {
        pthread_mutex_lock(&c->mu);
        if (atomic_load(&c->down) && !atomic_load(&all->stopping)) {
            /* Batches queued before the outage was noticed are answered at once rather than held;
             * then probe, and wait a little between probes. */
            ing_batch_t *list = c->head;
            c->head = c->tail = NULL;
            c->queued = 0;
            snprintf(msg, sizeof msg, "telemetry store unavailable (%s): retry", c->down_why);
            pthread_mutex_unlock(&c->mu);
            if (list) ing__answer(c, list, CM_STATUS_UNAVAILABLE, msg);
            char why[256];
            if (ing__probe(c, why, sizeof why)) {
                atomic_store(&c->down, 0);
                cm_log_kv(CM_LOG_INFO, "telemetry store reachable again: accepting batches", NULL);
                continue;
            }
            pthread_mutex_lock(&c->mu);
            snprintf(c->down_why, sizeof c->down_why, "%s", why);
            struct timespec until;
            cm_abstime_in(&until, ING__PROBE_MS);
            while (!atomic_load(&all->stopping))
                if (pthread_cond_timedwait(&c->cv, &c->mu, &until)) break;
            pthread_mutex_unlock(&c->mu);
            continue;
        }
        while (!c->head && !atomic_load(&all->stopping)) pthread_cond_wait(&c->cv, &c->mu);
        if (!c->head) {
            pthread_mutex_unlock(&c->mu);
            break;
        }
        /* Group commit: give concurrent devices a moment to join, unless the group is full. */
        if (cfg->flush_ms > 0 && c->queued < (size_t)cfg->flush_points && !atomic_load(&all->stopping)) {
            struct timespec until;
            cm_abstime_in(&until, cfg->flush_ms);
            while (c->queued < (size_t)cfg->flush_points && !atomic_load(&all->stopping))
                if (pthread_cond_timedwait(&c->cv, &c->mu, &until)) break;
        }
        ing_batch_t *list = c->head, *last = c->head;
        size_t pts = last->n;
        while (last->next && pts + last->next->n <= (size_t)cfg->flush_points) {
            last = last->next;
            pts += last->n;
        }
        c->head = last->next;
        if (!c->head) c->tail = NULL;
        last->next = NULL;
        c->queued -= pts;
        pthread_mutex_unlock(&c->mu);

        if (atomic_load(&all->stopping)) {
            /* After the drain: the calls are gone, and a dead Postgres must not hold up the exit. */
            ing__answer(c, list, CM_STATUS_UNAVAILABLE, "ingest is shutting down: reconnect and resend from your last acknowledgement");
            continue;
        }
        int code = ing__commit(c, list, msg, sizeof msg);
        cm_counter_add(code == CM_STATUS_OK ? all->groups : all->failures, 1);
        if (code != CM_STATUS_OK) {
            /* Whatever failed (connection, timeout, disk full), the batches queued behind this group
             * must not commit before their devices resend the failed ones: a later batch would move
             * a device's mark past points that were never stored. So every failure goes down the
             * outage path: refuse new batches, answer the queue, probe (at once successful for a
             * transient error), resume. UNAVAILABLE tells devices to resend. */
            cm_log_kv(CM_LOG_WARN, "commit failed", "committer", idx, "why", msg, NULL);
            code = CM_STATUS_UNAVAILABLE;
            pthread_mutex_lock(&c->mu);
            snprintf(c->down_why, sizeof c->down_why, "%.400s", msg);
            atomic_store(&c->down, 1);
            pthread_mutex_unlock(&c->mu);
        }
        ing__answer(c, list, code, code == CM_STATUS_OK ? NULL : msg);
    }
    return NULL;
}

ing_committers_t *ing_committers_start(const ing_config_t *cfg, ing_store_t *store, ing_devices_t *devices) {
    ing_committers_t *all = cm_calloc(1, sizeof *all);
    all->cfg = cfg;
    all->store = store;
    all->devices = devices;
    all->n = (int)cfg->committers;
    all->c = cm_calloc((size_t)all->n, sizeof *all->c);
    all->stored = cm_metrics_counter("ingest_points_stored_total", "points committed to Postgres", NULL);
    all->dups = cm_metrics_counter("ingest_points_duplicate_total", "points dropped because the device had already stored their seq", NULL);
    all->batches = cm_metrics_counter("ingest_batches_total", "batches answered by the committers", NULL);
    all->groups = cm_metrics_counter("ingest_commit_groups_total", "group commits that succeeded", NULL);
    all->failures = cm_metrics_counter("ingest_commit_failures_total", "group commits that failed (their batches were answered with the error)", NULL);
    all->refused_full = cm_metrics_counter("ingest_refused_total", "batches refused before queuing", "reason=\"backpressure\"");
    all->refused_down = cm_metrics_counter("ingest_refused_total", "batches refused before queuing", "reason=\"store_down\"");
    all->pending_g = cm_metrics_gauge("ingest_pending_points", "points accepted and not yet committed", NULL);
    int ok = 1;
    for (int i = 0; i < all->n; i++) {
        ing__committer_t *c = &all->c[i];
        c->pg = cm_pg_new(cfg->pg_dsn, cfg->pg_schema, 1, NULL);
        c->redis = cm_redis_new(cfg->redis_addr, (int)cfg->redis_timeout_ms, NULL);
        ok = ok && c->pg && c->redis;
    }
    if (!ok) {
        for (int i = 0; i < all->n; i++) {
            cm_pg_free(all->c[i].pg);
            cm_redis_free(all->c[i].redis);
        }
        cm_free(all->c);
        cm_free(all);
        return NULL;
    }
    for (int i = 0; i < all->n; i++) {
        ing__committer_t *c = &all->c[i];
        c->all = all;
        c->idx = i;
        pthread_mutex_init(&c->mu, NULL);
        cm_cond_init_monotonic(&c->cv);
        pthread_create(&c->th, NULL, ing__committer_main, c);
    }
    return all;
}

void ing_committers_drain(ing_committers_t *all, int64_t timeout_ms) {
    atomic_store(&all->draining, 1);
    int64_t until = cm_mono_ns() + timeout_ms * 1000000;
    while (atomic_load(&all->pending) > 0 && cm_mono_ns() < until) {
        struct timespec ts = {0, 10 * 1000000};
        nanosleep(&ts, NULL);
    }
}

void ing_committers_stop(ing_committers_t *all) {
    if (!all) return;
    atomic_store(&all->stopping, 1);
    for (int i = 0; i < all->n; i++) {
        pthread_mutex_lock(&all->c[i].mu);
        pthread_cond_broadcast(&all->c[i].cv);
        pthread_mutex_unlock(&all->c[i].mu);
    }
    for (int i = 0; i < all->n; i++) {
        ing__committer_t *c = &all->c[i];
        pthread_join(c->th, NULL);
        cm_pg_free(c->pg);
        cm_redis_free(c->redis);
        cm_buf_free(&c->ids);
        cm_buf_free(&c->seqs);
        pthread_mutex_destroy(&c->mu);
        pthread_cond_destroy(&c->cv);
    }
    cm_free(all->c);
    cm_free(all);
}
