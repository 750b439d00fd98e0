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
#include "cm_loop.h"
#include "cm_map.h"
#include "cm_metrics.h"
#include "cm_redis.h"
#include "cm_rpc.h"
#include "cm_time.h"
#include "ing_query.h"

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
    cm_counter_t *stored, *dups, *batches, *groups, *failures, *publish_failures, *refused_full, *refused_down;
    cm_gauge_t *pending_g;
    cm_loop_t *sweep;
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
    uint64_t seq;       /* the mark: as locked, then moved by this group */
    uint64_t locked;    /* the mark as locked */
    uint64_t published; /* the publication mark as locked */
    int64_t pending_us; /* earliest time among stored points not yet published (0: unknown) */
    int64_t min_ms;     /* earliest time among points this group stores (INT64_MAX: none) */
} ing__dev_t;

static int ing__dev_cmp(const void *a, const void *b) {
    return strcmp(((const ing__dev_t *)a)->id, ((const ing__dev_t *)b)->id);
}

static ing__dev_t *ing__dev_find(ing__dev_t *devs, size_t n, const char *id) {
    ing__dev_t key = {.id = id};
    return bsearch(&key, devs, n, sizeof *devs, ing__dev_cmp);
}

/* Appends one XADD of a PublishedBatch to the pipeline: device_id (1), the points (2, already
 * encoded as `points` fields), ingested_ms (3). */
static int ing__xadd(ing__committer_t *c, cm_buf_t *payload, const char *device, uint64_t first, uint64_t last,
                     int count, const char *points, size_t points_len) {
    const ing_config_t *cfg = c->all->cfg;
    char key[96], maxlen[24], sfirst[24], slast[24], scount[16];
    snprintf(key, sizeof key, "%s{%" PRIu64 "}", cfg->stream_prefix, cm_hash64(device, strlen(device)) % (uint64_t)cfg->shards);
    snprintf(maxlen, sizeof maxlen, "%" PRId64, cfg->stream_maxlen);
    snprintf(sfirst, sizeof sfirst, "%" PRIu64, first);
    snprintf(slast, sizeof slast, "%" PRIu64, last);
    snprintf(scount, sizeof scount, "%d", count);
    cm_buf_reset(payload);
    size_t dl = strlen(device);
    cm_buf_append(payload, "\x0a", 1);
    ing_varint(payload, dl);
    cm_buf_append(payload, device, dl);
    cm_buf_append(payload, points, points_len);
    cm_buf_append(payload, "\x18", 1);
    ing_varint(payload, (uint64_t)cm_wall_ms());
    const char *argv[] = {"XADD", key, "MAXLEN", "~", maxlen, "*", "device", device, "first_seq", sfirst,
                          "last_seq", slast, "count", scount, "batch", payload->data};
    size_t lens[16];
    for (int i = 0; i < 15; i++) lens[i] = strlen(argv[i]);
    lens[15] = payload->len;
    return cm_redis_append(c->redis, 16, argv, lens);
}

/* Reads n pipelined replies. 0 or CM_EREDIS (err says why). */
static int ing__replies(ing__committer_t *c, int n, char *err, size_t err_cap) {
    int rc = 0;
    for (int i = 0; i < n; i++) {
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

#define ING__CATCHUP_CHUNK 1000

/* Republishes d's stored points above its publication mark, oldest first, read back from
 * Postgres: what a crash or a Redis failure between a commit and its publication left out.
 * Runs on the device's committer before its new points are published, so the stream stays in
 * seq order. 0, CM_EPG or CM_EREDIS. */
static int ing__catch_up(ing__committer_t *c, cm_pg_conn_t *pc, const ing__dev_t *d, char *err, size_t err_cap) {
    char from[24], to[24], since[24];
    snprintf(from, sizeof from, "%" PRIu64, d->published);
    snprintf(to, sizeof to, "%" PRIu64, d->locked);
    snprintf(since, sizeof since, "%" PRId64, d->pending_us);
    const char *p[] = {d->id, from, to, since};
    PGresult *r = NULL;
    /* The time bound lets partition pruning skip all but the partitions the points went to. */
    if (cm_pg_exec(pc, &r,
                   "SELECT " ING_POINT_COLS ", t.metric FROM telemetry t WHERE t.device_id = $1 AND t.seq > $2::int8 "
                   "AND t.seq <= $3::int8 AND ($4::int8 = 0 OR t.ts >= to_timestamp($4::int8 / 1000000.0) - interval '1 millisecond') "
                   "ORDER BY t.seq",
                   4, p)) {
        snprintf(err, err_cap, "reading points to republish: %s", cm_pg_error(pc));
        return CM_EPG;
    }
    int n = PQntuples(r), sent = 0, rc = 0;
    cm_buf_t points = CM_BUF_INIT, payload = CM_BUF_INIT;
    for (int i0 = 0; i0 < n && rc == 0; i0 += ING__CATCHUP_CHUNK) {
        int k = n - i0 < ING__CATCHUP_CHUNK ? n - i0 : ING__CATCHUP_CHUNK;
        cm_arena_t ar;
        cm_arena_init(&ar, NULL, 0);
        cm_buf_reset(&points);
        for (int i = i0; i < i0 + k; i++) {
            int64_t us;
            char *metric = PQgetvalue(r, i, ING_POINT_NCOLS);
            Iot__Ingest__V1__Point *pt = ing_point_from_row(&ar.pb, r, i, metric, &us);
            size_t sz = protobuf_c_message_get_packed_size(&pt->base);
            cm_buf_append(&points, "\x12", 1);
            ing_varint(&points, sz);
            uint8_t *tmp = cm_arena_alloc(&ar, sz ? sz : 1);
            protobuf_c_message_pack(&pt->base, tmp);
            cm_buf_append(&points, (const char *)tmp, sz);
        }
        cm_arena_free(&ar);
        if (ing__xadd(c, &payload, d->id, strtoull(PQgetvalue(r, i0, 0), NULL, 10),
                      strtoull(PQgetvalue(r, i0 + k - 1, 0), NULL, 10), k, points.data, points.len)) {
            snprintf(err, err_cap, "redis: %s", cm_redis_error(c->redis));
            rc = CM_EREDIS;
        } else {
            sent++;
        }
    }
    if (rc == 0) rc = ing__replies(c, sent, err, err_cap);
    if (rc == 0 && n) cm_log_kv(CM_LOG_INFO, "republished stored points missing from the stream", "device", d->id, NULL);
    PQclear(r);
    cm_buf_free(&points);
    cm_buf_free(&payload);
    return rc;
}

/* After the commit: the group's devices that lag behind on the stream first, then the group's new
 * points, then the publication marks. 0, or CM_EPG/CM_EREDIS with err: the points are committed
 * either way, and whatever was not published is republished by the device's next commit. */
static int ing__publish(ing__committer_t *c, cm_pg_conn_t *pc, ing_batch_t *list, ing__dev_t *devs, size_t nd,
                        char *err, size_t err_cap) {
    for (size_t i = 0; i < nd; i++) {
        if (devs[i].published >= devs[i].locked) continue;
        int rc = ing__catch_up(c, pc, &devs[i], err, err_cap);
        if (rc) return rc;
    }
    cm_buf_t payload = CM_BUF_INIT;
    int sent = 0;
    for (ing_batch_t *b = list; b; b = b->next) {
        if (!b->stored) continue;
        size_t k = b->n - (size_t)b->stored;
        if (ing__xadd(c, &payload, b->device_id, b->seq[k], b->seq[b->n - 1], b->stored, b->pb.data + b->pb_off[k],
                      b->pb_off[b->n] - b->pb_off[k])) {
            snprintf(err, err_cap, "redis: %s", cm_redis_error(c->redis));
            cm_buf_free(&payload);
            return CM_EREDIS;
        }
        sent++;
    }
    cm_buf_free(&payload);
    int rc = ing__replies(c, sent, err, err_cap);
    if (rc) return rc;
    /* Marks of devices now fully on the stream. A crash right here republishes them (at least
     * once), never loses them. */
    cm_buf_reset(&c->ids);
    cm_buf_reset(&c->seqs);
    cm_buf_append(&c->ids, "{", 1);
    cm_buf_append(&c->seqs, "{", 1);
    int any = 0;
    for (size_t i = 0; i < nd; i++) {
        if (devs[i].published >= devs[i].seq) continue;
        ing__array_add(&c->ids, devs[i].id);
        cm_buf_printf(&c->seqs, "%s%" PRIu64, any ? "," : "", devs[i].seq);
        any = 1;
    }
    cm_buf_append(&c->ids, "}", 1);
    cm_buf_append(&c->seqs, "}", 1);
    if (!any) return 0;
    const char *p[] = {c->ids.data, c->seqs.data};
    if (cm_pg_exec(pc, NULL,
                   "UPDATE device_seq SET published = v.p, pending_from = CASE WHEN v.p >= device_seq.seq THEN NULL "
                   "ELSE device_seq.pending_from END FROM unnest($1::text[], $2::bigint[]) AS v(d, p) "
                   "WHERE device_seq.device_id = v.d AND device_seq.published < v.p",
                   2, p)) {
        snprintf(err, err_cap, "recording what was published: %s", cm_pg_error(pc));
        return CM_EPG;
    }
    return 0;
}

/* Commits one group, then publishes it. Returns a gRPC status for the commit (on failure msg says
 * why); *publish_rc is 0 or why the publication failed (in pub_err). */
static int ing__commit(ing__committer_t *c, ing_batch_t *list, char *msg, size_t msg_cap, int *publish_rc,
                       char *pub_err, size_t pub_err_cap) {
    *publish_rc = 0;
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
    for (ing_batch_t *b = list; b; b = b->next) devs[nd++] = (ing__dev_t){.id = b->device_id, .min_ms = INT64_MAX};
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
    if (cm_pg_exec(pc, &r, "SELECT o_device_id, o_seq, o_published, o_pending_from_us FROM claim_seq($1::text[])", 1,
                   p1))
        goto pg_fail;
    for (int i = 0; i < PQntuples(r); i++) {
        ing__dev_t *d = ing__dev_find(devs, nd, PQgetvalue(r, i, 0));
        if (!d) continue;
        d->seq = d->locked = strtoull(PQgetvalue(r, i, 1), NULL, 10);
        d->published = strtoull(PQgetvalue(r, i, 2), NULL, 10);
        d->pending_us = PQgetisnull(r, i, 3) ? 0 : strtoll(PQgetvalue(r, i, 3), NULL, 10);
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
            if (b->min_ms < d->min_ms) d->min_ms = b->min_ms; /* of the whole batch: a safe lower bound */
        }
        b->acked_seq = d->seq;
    }
    if (copying) {
        if (cm_pg_copy_put(pc, ing_copy_trailer, sizeof ing_copy_trailer) || cm_pg_copy_end(pc)) goto pg_fail;
        cm_buf_t mins = CM_BUF_INIT;
        cm_buf_reset(&c->ids);
        cm_buf_reset(&c->seqs);
        cm_buf_append(&c->ids, "{", 1);
        cm_buf_append(&c->seqs, "{", 1);
        cm_buf_append(&mins, "{", 1);
        for (size_t i = 0; i < nd; i++) {
            if (devs[i].seq == devs[i].locked) continue;
            ing__array_add(&c->ids, devs[i].id);
            cm_buf_printf(&c->seqs, "%s%" PRIu64, c->seqs.len > 1 ? "," : "", devs[i].seq);
            cm_buf_printf(&mins, "%s%" PRId64, mins.len > 1 ? "," : "", devs[i].min_ms);
        }
        cm_buf_append(&c->ids, "}", 1);
        cm_buf_append(&c->seqs, "}", 1);
        cm_buf_append(&mins, "}", 1);
        what = "moving sequence marks";
        const char *p2[] = {c->ids.data, c->seqs.data, mins.data};
        /* pending_from: the earliest time among stored points not yet published, so that a
         * republication reads only the partitions they went to. */
        int urc = cm_pg_exec(pc, NULL,
                             "UPDATE device_seq SET seq = v.s, updated_at = now(), pending_from = CASE "
                             "WHEN device_seq.published >= device_seq.seq THEN to_timestamp(v.t / 1000.0) "
                             "WHEN device_seq.pending_from IS NULL THEN NULL " /* unknown stays unknown */
                             "ELSE least(device_seq.pending_from, to_timestamp(v.t / 1000.0)) END "
                             "FROM unnest($1::text[], $2::bigint[], $3::bigint[]) AS v(d, s, t) "
                             "WHERE device_seq.device_id = v.d",
                             3, p2);
        cm_buf_free(&mins);
        if (urc) goto pg_fail;
    }
    what = "commit";
    if (cm_pg_commit(pc)) goto pg_fail;
    /* Published only now that the points are durable (a stream entry always means "stored").
     * A failure here does not undo the commit: the batches are acknowledged, the committer stops
     * taking new ones until Redis answers, and the device's next commit republishes the rest. */
    *publish_rc = ing__publish(c, pc, list, devs, nd, pub_err, pub_err_cap);
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
    int ok = cm_pg_check(c->pg, 1000, why, cap);
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
        int publish_rc = 0;
        char pub_err[512];
        int code = ing__commit(c, list, msg, sizeof msg, &publish_rc, pub_err, sizeof pub_err);
        cm_counter_add(code == CM_STATUS_OK ? all->groups : all->failures, 1);
        if (code == CM_STATUS_OK && publish_rc) {
            /* Committed, so acknowledged; but nothing more is taken until the stream can be fed
             * again, and the backlog is republished (in order) by each device's next commit. */
            cm_log_kv(CM_LOG_WARN, "publishing committed points failed", "committer", idx, "why", pub_err, NULL);
            cm_counter_add(all->publish_failures, 1);
            pthread_mutex_lock(&c->mu);
            snprintf(c->down_why, sizeof c->down_why, "%.400s", pub_err);
            atomic_store(&c->down, 1);
            pthread_mutex_unlock(&c->mu);
        }
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

static void ing__sweep_done(ing_batch_t *b, int code, const char *msg) {
    (void)code;
    (void)msg;
    ing_batch_free(b);
}

/* Devices whose committed points are not all on their stream (a crash or a Redis failure between
 * commit and publish) are republished by their next commit; this finds those that have not sent
 * since and gives each an empty batch, which takes the normal path: through the device's
 * committer, under its row lock, in order with anything it sends meanwhile. */
static int64_t ing__sweep_loop(void *arg) {
    ing_committers_t *all = arg;
    cm_pg_conn_t *pc = cm_pg_acquire(all->store->pg, 2000);
    if (!pc) return all->cfg->republish_ms;
    PGresult *r = NULL;
    if (cm_pg_exec(pc, &r, "SELECT device_id FROM device_seq WHERE published < seq LIMIT 1000", 0, NULL) == 0) {
        ing_limits_t lim = {0, 0};
        char err[64], msg[256];
        int64_t retry;
        for (int i = 0; i < PQntuples(r); i++) {
            ing_batch_t *b = ing_batch_new(PQgetvalue(r, i, 0), NULL, 0, &lim, 0, err, sizeof err);
            if (!b) continue;
            b->done = ing__sweep_done;
            if (ing_commit_submit(all, b, msg, sizeof msg, &retry)) ing_batch_free(b);
        }
        PQclear(r);
    }
    cm_pg_release(all->store->pg, pc);
    return all->cfg->republish_ms;
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
    all->publish_failures = cm_metrics_counter("ingest_publish_failures_total", "commit groups whose points could not be published at once (republished later)", NULL);
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
    all->sweep = cm_loop_start(ing__sweep_loop, all, cfg->republish_ms);
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
    cm_loop_stop(all->sweep);
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
