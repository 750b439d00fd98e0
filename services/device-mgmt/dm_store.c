/* device-mgmt store, core: pools, migrations, readiness, the device cache, the event outbox and
 * its relay, devices, groups and presence. Credentials live in dm_creds.c, shadows in
 * dm_shadow.c, commands in dm_commands.c. */
#include "dm_store.h"

#include <ctype.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "cm_alloc.h"
#include "cm_buf.h"
#include "cm_err.h"
#include "cm_json.h"
#include "cm_log.h"
#include "cm_metrics.h"
#include "cm_selector.h"
#include "dm_commands.h"

/* Columns of a device row in the order dm__device_from_row reads them; the table is aliased d. */
#define DM__DEVICE_COLS                                                                                         \
    "d.id, d.name, d.type, d.model, d.site, d.latitude, d.longitude, d.labels::text, d.metadata::text, "        \
    "d.firmware_version, d.status, (extract(epoch from d.created_at) * 1000000)::int8, "                        \
    "(extract(epoch from d.updated_at) * 1000000)::int8, "                                                      \
    "coalesce((extract(epoch from d.last_seen) * 1000000)::int8, 0), d.version"
#define DM__DEVICE_NCOLS 15

/* ARGV: P, id, version, pb ("" for a tombstone), status, ttl ms. Keeps the newest version: an older
 * write (a slow read-through fill, or a writer that lost a race) never replaces a newer one. The
 * `seen` field (last sighting, kept fresher than pb by ReportSeen) survives a rewrite. */
static const char dm__lua_put[] =
    "local k = ARGV[1] .. 'd:' .. ARGV[2]\n"
    "local cur = redis.call('HGET', k, 'v')\n"
    "if cur and tonumber(cur) >= tonumber(ARGV[3]) then return 0 end\n"
    "local seen = redis.call('HGET', k, 'seen')\n"
    "redis.call('DEL', k)\n"
    "if ARGV[4] == '' then\n"
    "  redis.call('HSET', k, 'v', ARGV[3], 'del', '1')\n"
    "else\n"
    "  redis.call('HSET', k, 'v', ARGV[3], 'pb', ARGV[4], 'st', ARGV[5])\n"
    "  if seen then redis.call('HSET', k, 'seen', seen) end\n"
    "end\n"
    "redis.call('PEXPIRE', k, ARGV[6])\n"
    "return 1\n";

/* ARGV: P, then id, seen-us pairs. Only devices already cached are touched. */
static const char dm__lua_seen[] =
    "local n = 0\n"
    "for i = 2, #ARGV, 2 do\n"
    "  local k = ARGV[1] .. 'd:' .. ARGV[i]\n"
    "  if redis.call('HEXISTS', k, 'pb') == 1 then\n"
    "    local cur = tonumber(redis.call('HGET', k, 'seen') or '0')\n"
    "    if tonumber(ARGV[i + 1]) > cur then redis.call('HSET', k, 'seen', ARGV[i + 1]); n = n + 1 end\n"
    "  end\n"
    "end\n"
    "return n\n";

static cm_redis_script_t dm__put_script, dm__seen_script;
static cm_counter_t *dm__cache_errors, *dm__cache_hits, *dm__cache_misses, *dm__events_published;
static pthread_once_t dm__once = PTHREAD_ONCE_INIT;

static void dm__init_once(void) {
    cm_redis_script_init(&dm__put_script, dm__lua_put);
    cm_redis_script_init(&dm__seen_script, dm__lua_seen);
    dm__cache_errors = cm_metrics_counter("dm_cache_write_errors_total",
                                          "device cache writes that failed (Redis unreachable); the TTL bounds staleness", "");
    dm__cache_hits = cm_metrics_counter("dm_cache_hits_total", "GetDevice answered from the Redis cache", "");
    dm__cache_misses = cm_metrics_counter("dm_cache_misses_total", "GetDevice read from Postgres", "");
    dm__events_published = cm_metrics_counter("dm_events_published_total", "device events published to the Redis stream", "");
}

/* ---- small helpers ------------------------------------------------------------------------ */

int dm__param(dm__params_t *p, const char *value) {
    if (p->n >= (int)(sizeof p->v / sizeof p->v[0])) abort(); /* bounded by validation: a bug */
    p->v[p->n++] = value;
    return p->n;
}

int dm__name_ok(const char *s, size_t max, const char *extra) {
    size_t n = strlen(s);
    if (n == 0 || n > max || !isalnum((unsigned char)s[0])) return 0;
    for (size_t i = 1; i < n; i++)
        if (!isalnum((unsigned char)s[i]) && !strchr(extra, s[i])) return 0;
    return 1;
}

int dm__id_ok(const char *s) { return dm__name_ok(s, 128, "._:-"); }

int64_t dm__now_us(void) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (int64_t)ts.tv_sec * 1000000 + ts.tv_nsec / 1000;
}

char *dm__strdup(ProtobufCAllocator *a, const char *s) {
    size_t n = strlen(s);
    char *d = a->alloc(a->allocator_data, n + 1);
    memcpy(d, s, n + 1);
    return d;
}

Google__Protobuf__Timestamp *dm__ts(ProtobufCAllocator *a, int64_t us, int null_if_zero) {
    if (us == 0 && null_if_zero) return NULL;
    Google__Protobuf__Timestamp *t = a->alloc(a->allocator_data, sizeof *t);
    google__protobuf__timestamp__init(t);
    int64_t sec = us / 1000000, rem = us % 1000000;
    if (rem < 0) {
        rem += 1000000;
        sec--;
    }
    t->seconds = sec;
    t->nanos = (int32_t)(rem * 1000);
    return t;
}

cm_pg_conn_t *dm__pg(dm_store_t *s, dm_err_t *e) {
    cm_pg_conn_t *c = cm_pg_acquire(s->pg, 5000);
    if (!c) snprintf(e->msg, sizeof e->msg, "device storage unavailable: %s", cm_pg_last_error(s->pg));
    return c;
}

int dm__pg_fail(cm_pg_conn_t *c, const char *what, dm_err_t *e) {
    const char *st = cm_pg_sqlstate(c);
    if (cm_pg_conn_lost(c)) {
        snprintf(e->msg, sizeof e->msg, "device storage unavailable: %s", cm_pg_error(c));
        return CM_STATUS_UNAVAILABLE;
    }
    if (strcmp(st, "23505") == 0) {
        snprintf(e->msg, sizeof e->msg, "%s already exists", what);
        return CM_STATUS_ALREADY_EXISTS;
    }
    if (strcmp(st, "23503") == 0) {
        snprintf(e->msg, sizeof e->msg, "%s not found", what);
        return CM_STATUS_NOT_FOUND;
    }
    if (strcmp(st, "57014") == 0) {
        snprintf(e->msg, sizeof e->msg, "device storage query timed out");
        return CM_STATUS_DEADLINE_EXCEEDED;
    }
    cm_log_kv(CM_LOG_ERROR, "device storage error", "what", what, "sqlstate", st, "error", cm_pg_error(c), NULL);
    snprintf(e->msg, sizeof e->msg, "device storage error (sqlstate %s)", st);
    return CM_STATUS_INTERNAL;
}

/* Redis failures become UNAVAILABLE messages for the caller. */
static redisReply *dm__redis_done(redisReply *rep, const char *err, dm_err_t *e) {
    if (!rep) snprintf(e->msg, sizeof e->msg, "device cache unavailable: %s", err);
    return rep;
}

redisReply *dm__redis(dm_store_t *s, int argc, const char **argv, const size_t *lens, dm_err_t *e) {
    char err[256];
    return dm__redis_done(cm_redis_pool_cmd(s->redis, s->redis_timeout_ms, argc, argv, lens, err, sizeof err), err, e);
}

redisReply *dm__redis_eval(dm_store_t *s, const cm_redis_script_t *script, int nargs, const char **args,
                           const size_t *lens, dm_err_t *e) {
    char err[256];
    return dm__redis_done(cm_redis_pool_eval(s->redis, s->redis_timeout_ms, script, nargs, args, lens, err, sizeof err),
                          err, e);
}

/* One quoted element of a Postgres array literal, with a comma before all but the first. */
static void dm__array_elem(cm_buf_t *b, const char *v, int first) {
    cm_buf_puts(b, first ? "\"" : ",\"");
    for (const char *p = v; *p; p++) {
        if (*p == '"' || *p == '\\') cm_buf_append(b, "\\", 1);
        cm_buf_append(b, p, 1);
    }
    cm_buf_puts(b, "\"");
}

/* Postgres array literal of text elements: {"a","b\"c"}. */
static void dm__array_text(cm_buf_t *b, const char *const *v, size_t n) {
    cm_buf_puts(b, "{");
    for (size_t i = 0; i < n; i++) dm__array_elem(b, v[i], i == 0);
    cm_buf_puts(b, "}");
}

/* ---- device rows and protobuf -------------------------------------------------------------- */

static const char *dm__status_name(int st) {
    static const char *const names[] = {"unspecified", "provisioned", "online", "offline",
                                        "maintenance", "error",       "decommissioned"};
    return st >= 0 && st <= 6 ? names[st] : "unspecified";
}

/* A JSON object of strings (stored labels/metadata) into map entries. Stored text is ours, so a
 * parse failure is a bug; it yields an empty map rather than a crash. */
static void dm__map_from_json(ProtobufCAllocator *a, const char *text, size_t *n_out, void ***out,
                              const ProtobufCMessageDescriptor *entry_desc) {
    *n_out = 0;
    *out = NULL;
    char err[128];
    json_t *j = cm_json_parse(text, strlen(text), err, sizeof err);
    if (!j || !json_is_object(j) || json_object_size(j) == 0) {
        json_decref(j);
        return;
    }
    size_t n = json_object_size(j), i = 0;
    void **arr = a->alloc(a->allocator_data, n * sizeof *arr);
    const char *k;
    json_t *v;
    json_object_foreach(j, k, v) {
        /* Labels and metadata entries have the same layout: base, key, value. */
        Iot__Device__V1__Device__LabelsEntry *en = a->alloc(a->allocator_data, entry_desc->sizeof_message);
        protobuf_c_message_init(entry_desc, en);
        en->key = dm__strdup(a, k);
        en->value = dm__strdup(a, json_is_string(v) ? json_string_value(v) : "");
        arr[i++] = en;
    }
    json_decref(j);
    *n_out = i;
    *out = arr;
}

static char *dm__map_to_json(Iot__Device__V1__Device__LabelsEntry *const *en, size_t n) {
    json_t *o = json_object();
    for (size_t i = 0; i < n; i++) json_object_set_new(o, en[i]->key, json_string(en[i]->value));
    char *s = cm_json_dump(o);
    json_decref(o);
    return s;
}

int64_t dm__int(const PGresult *r, int row, int col) { return strtoll(PQgetvalue(r, row, col), NULL, 10); }

/* Reads the DM__DEVICE_COLS columns starting at col0. */
static dm_device_t *dm__device_from_row(ProtobufCAllocator *a, const PGresult *r, int row, int col0) {
    dm_device_t *d = a->alloc(a->allocator_data, sizeof *d);
    iot__device__v1__device__init(d);
    d->id = dm__strdup(a, PQgetvalue(r, row, col0));
    d->name = dm__strdup(a, PQgetvalue(r, row, col0 + 1));
    d->type = dm__strdup(a, PQgetvalue(r, row, col0 + 2));
    d->model = dm__strdup(a, PQgetvalue(r, row, col0 + 3));
    const char *site = PQgetvalue(r, row, col0 + 4);
    double lat = strtod(PQgetvalue(r, row, col0 + 5), NULL), lon = strtod(PQgetvalue(r, row, col0 + 6), NULL);
    if (*site || lat != 0 || lon != 0) {
        d->location = a->alloc(a->allocator_data, sizeof *d->location);
        iot__device__v1__location__init(d->location);
        d->location->site = dm__strdup(a, site);
        d->location->latitude = lat;
        d->location->longitude = lon;
    }
    dm__map_from_json(a, PQgetvalue(r, row, col0 + 7), &d->n_labels, (void ***)&d->labels,
                      &iot__device__v1__device__labels_entry__descriptor);
    dm__map_from_json(a, PQgetvalue(r, row, col0 + 8), &d->n_metadata, (void ***)&d->metadata,
                      &iot__device__v1__device__metadata_entry__descriptor);
    d->firmware_version = dm__strdup(a, PQgetvalue(r, row, col0 + 9));
    d->status = (Iot__Device__V1__DeviceStatus)dm__int(r, row, col0 + 10);
    d->create_time = dm__ts(a, dm__int(r, row, col0 + 11), 0);
    d->update_time = dm__ts(a, dm__int(r, row, col0 + 12), 0);
    d->last_seen_time = dm__ts(a, dm__int(r, row, col0 + 13), 1);
    d->etag = dm__strdup(a, PQgetvalue(r, row, col0 + 14));
    return d;
}

/* ---- the device cache ---------------------------------------------------------------------- */

static void dm__cache_args(dm_store_t *s, const char *id, const char *version, const dm_device_t *d, uint8_t **pb,
                           const char **args, size_t *lens, char *st, char *ttl) {
    size_t n = 0;
    *pb = NULL;
    if (d) {
        n = protobuf_c_message_get_packed_size(&d->base);
        *pb = cm_malloc(n + 1);
        protobuf_c_message_pack(&d->base, *pb);
        snprintf(st, 8, "%d", (int)d->status);
    } else {
        snprintf(st, 8, "0");
    }
    snprintf(ttl, 24, "%" PRId64, s->cfg->cache_ttl_ms);
    args[0] = s->prefix;
    args[1] = id;
    args[2] = version;
    args[3] = d ? (const char *)*pb : "";
    args[4] = st;
    args[5] = ttl;
    /* args[3] is packed protobuf, not a C string: its length is n. */
    for (int i = 0; i < 6; i++) lens[i] = i == 3 ? n : strlen(args[i]);
}

void dm__cache_put(dm_store_t *s, const char *id, const char *version, const dm_device_t *d) {
    const char *args[6];
    size_t lens[6];
    char st[8], ttl[24];
    uint8_t *pb;
    dm__cache_args(s, id, version, d, &pb, args, lens, st, ttl);
    dm_err_t e;
    redisReply *rep = dm__redis_eval(s, &dm__put_script, 6, args, lens, &e);
    cm_free(pb);
    if (!rep) {
        cm_counter_add(dm__cache_errors, 1);
        cm_log_kv(CM_LOG_WARN, "device cache write failed", "device_id", id, "error", e.msg, NULL);
        return;
    }
    freeReplyObject(rep);
}

/* Many puts in one round trip (batch create, presence sweeps). The first goes alone so that the
 * script is loaded; the rest are pipelined EVALSHAs. */
static void dm__cache_put_many(dm_store_t *s, dm_device_t *const *devs, size_t n) {
    if (n == 0) return;
    dm__cache_put(s, devs[0]->id, devs[0]->etag, devs[0]);
    cm_redis_t *r = cm_redis_pool_acquire(s->redis, s->redis_timeout_ms);
    if (!r) {
        cm_counter_add(dm__cache_errors, n - 1);
        return;
    }
    size_t sent = 0, failed = 0;
    for (size_t i = 1; i < n; i++) {
        const char *args[9];
        size_t lens[9];
        char st[8], ttl[24];
        uint8_t *pb;
        dm__cache_args(s, devs[i]->id, devs[i]->etag, devs[i], &pb, args + 3, lens + 3, st, ttl);
        args[0] = "EVALSHA";
        args[1] = dm__put_script.sha;
        args[2] = "0";
        lens[0] = 7;
        lens[1] = 40;
        lens[2] = 1;
        int rc = cm_redis_append(r, 9, args, lens);
        cm_free(pb);
        if (rc) break;
        sent++;
    }
    for (size_t i = 0; i < sent; i++) {
        redisReply *rep;
        if (cm_redis_get_reply(r, &rep)) {
            failed += sent - i;
            break;
        }
        if (rep->type == REDIS_REPLY_ERROR) failed++;
        freeReplyObject(rep);
    }
    failed += (n - 1) - sent;
    cm_redis_pool_release(s->redis, r);
    if (failed) {
        cm_counter_add(dm__cache_errors, failed);
        CM_LOG(CM_LOG_WARN, "%zu device cache writes failed", failed);
    }
}

/* The cached device, or 0 with *found = 0 on a miss (or Redis trouble: Postgres answers then).
 * A tombstone sets *deleted. */
static int dm__cache_get(dm_store_t *s, const char *id, ProtobufCAllocator *a, dm_device_t **out, int *deleted) {
    *out = NULL;
    *deleted = 0;
    cm_buf_t key = CM_BUF_INIT;
    cm_buf_printf(&key, "%sd:%s", s->prefix, id);
    const char *argv[] = {"HMGET", key.data, "pb", "del", "seen"};
    dm_err_t e;
    redisReply *rep = dm__redis(s, 5, argv, NULL, &e);
    cm_buf_free(&key);
    if (!rep) return 0;
    int found = 0;
    if (rep->type == REDIS_REPLY_ARRAY && rep->elements == 3) {
        redisReply *pb = rep->element[0], *del = rep->element[1], *seen = rep->element[2];
        if (del->type == REDIS_REPLY_STRING) {
            *deleted = 1;
            found = 1;
        } else if (pb->type == REDIS_REPLY_STRING) {
            dm_device_t *d = (dm_device_t *)protobuf_c_message_unpack(&iot__device__v1__device__descriptor, a, pb->len,
                                                                      (const uint8_t *)pb->str);
            if (d) {
                if (seen->type == REDIS_REPLY_STRING) {
                    int64_t us = strtoll(seen->str, NULL, 10);
                    int64_t cur = d->last_seen_time ? d->last_seen_time->seconds * 1000000 + d->last_seen_time->nanos / 1000 : 0;
                    if (us > cur) d->last_seen_time = dm__ts(a, us, 1);
                }
                *out = d;
                found = 1;
            }
        }
    }
    freeReplyObject(rep);
    return found;
}

/* ---- events: outbox and relay ---------------------------------------------------------------- */

int dm__event(cm_pg_conn_t *c, const char *type, const char *device_id, int status, const char *version) {
    char st[8];
    snprintf(st, sizeof st, "%d", status);
    const char *p[] = {type, device_id, st, version};
    return cm_pg_exec(c, NULL, "INSERT INTO events (type, device_id, status, version) VALUES ($1, $2, $3, $4)", 4, p);
}

void dm__events_kick(dm_store_t *s) {
    if (s->relay) cm_loop_kick(s->relay);
}

/* One relay pass: publishes up to 1000 outbox rows in id order and deletes exactly those rows.
 * Replicas take turns through a transaction-scoped advisory lock, so a pass never races another.
 *
 * Ids are not commit order: a writer takes its id at INSERT and its row becomes visible at COMMIT,
 * so a row with a lower id (a long BatchCreateDevices, say) can commit after this pass has read
 * and published higher ones. Deleting "id <= the highest published" would then delete it
 * unpublished (the DELETE runs with a newer snapshot than the SELECT); deleting the published ids
 * only leaves it for the next pass. Per device the stream keeps order all the same: every writer of
 * a device's events holds that device's row lock (FOR UPDATE, or the unique index for a create)
 * from before it takes an event id until it commits, so a device's later event has a higher id and
 * commits after its earlier one, which any pass that sees the later one also sees (or already
 * published). A crash between XADD and DELETE publishes those events again (at least once:
 * consumers dedupe on event_id). */
static int dm__relay_once(dm_store_t *s, int *more) {
    *more = 0;
    dm_err_t e;
    cm_pg_conn_t *c = dm__pg(s, &e);
    if (!c) return CM_EPG;
    PGresult *r = NULL;
    int rc = cm_pg_begin(c);
    if (!rc) rc = cm_pg_exec(c, &r, "SELECT pg_try_advisory_xact_lock(hashtext(current_schema() || '.events'))", 0, NULL);
    int locked = !rc && strcmp(PQgetvalue(r, 0, 0), "t") == 0;
    PQclear(r);
    r = NULL;
    if (!rc && locked)
        rc = cm_pg_exec(c, &r,
                        "SELECT id, type, device_id, status, version, (extract(epoch from at) * 1000)::int8 "
                        "FROM events ORDER BY id LIMIT 1000",
                        0, NULL);
    int n = r ? PQntuples(r) : 0;
    if (!rc && n > 0) {
        cm_redis_t *rd = cm_redis_pool_acquire(s->redis, s->redis_timeout_ms);
        int sent = 0, ok = rd != NULL;
        char key[96], maxlen[24];
        snprintf(key, sizeof key, "%sevents", s->prefix);
        snprintf(maxlen, sizeof maxlen, "%" PRId64, s->cfg->events_maxlen);
        for (int i = 0; ok && i < n; i++) {
            const char *argv[] = {"XADD", key, "MAXLEN", "~", maxlen, "*",
                                  "event_id", PQgetvalue(r, i, 0), "type", PQgetvalue(r, i, 1),
                                  "device_id", PQgetvalue(r, i, 2), "status", dm__status_name((int)dm__int(r, i, 3)),
                                  "version", PQgetvalue(r, i, 4), "time_ms", PQgetvalue(r, i, 5)};
            ok = cm_redis_append(rd, 18, argv, NULL) == 0;
            if (ok) sent++;
        }
        for (int i = 0; i < sent; i++) {
            redisReply *rep;
            if (cm_redis_get_reply(rd, &rep)) {
                ok = 0;
                break;
            }
            if (rep->type == REDIS_REPLY_ERROR) ok = 0;
            freeReplyObject(rep);
        }
        if (rd) cm_redis_pool_release(s->redis, rd);
        if (ok) {
            cm_buf_t ids = CM_BUF_INIT;
            cm_buf_puts(&ids, "{");
            for (int i = 0; i < n; i++) cm_buf_printf(&ids, "%s%s", i ? "," : "", PQgetvalue(r, i, 0));
            cm_buf_puts(&ids, "}");
            const char *p[] = {ids.data};
            rc = cm_pg_exec(c, NULL, "DELETE FROM events WHERE id = ANY($1::bigint[])", 1, p);
            cm_buf_free(&ids);
            cm_counter_add(dm__events_published, (uint64_t)n);
            *more = n == 1000;
        } else {
            rc = CM_EREDIS;
        }
    }
    PQclear(r);
    if (!rc) rc = cm_pg_commit(c);
    else cm_pg_rollback(c);
    cm_pg_release(s->pg, c);
    return rc;
}

static int64_t dm__relay_loop(void *arg) {
    dm_store_t *s = arg;
    int more;
    int rc = dm__relay_once(s, &more);
    if (rc) return 1000; /* Postgres or Redis down: retry, events wait safely in the outbox */
    return more ? 0 : 500;
}

/* ---- presence sweep -------------------------------------------------------------------------- */

static int64_t dm__presence_loop(void *arg) {
    dm_store_t *s = arg;
    dm_err_t e;
    cm_pg_conn_t *c = dm__pg(s, &e);
    if (!c) return s->cfg->presence_interval_ms;
    char after[48];
    snprintf(after, sizeof after, "%" PRId64 " milliseconds", s->cfg->offline_after_ms);
    const char *p[] = {after};
    PGresult *r = NULL;
    /* SKIP LOCKED: replicas sweeping at once split the work; each device goes offline once, so
     * its event is written once. */
    int rc = cm_pg_exec(c, &r,
                        "WITH due AS (SELECT id FROM devices WHERE status = 2 AND last_seen < now() - $1::interval "
                        "  ORDER BY id LIMIT 1000 FOR UPDATE SKIP LOCKED), "
                        "upd AS (UPDATE devices d SET status = 3, version = nextval('version_seq'), updated_at = now() "
                        "  FROM due WHERE d.id = due.id RETURNING d.*), "
                        "ev AS (INSERT INTO events (type, device_id, status, version) "
                        "  SELECT 'offline', id, status, version FROM upd) "
                        "SELECT " DM__DEVICE_COLS " FROM upd d",
                        1, p);
    int n = 0;
    if (rc == 0) {
        n = PQntuples(r);
        if (n) {
            cm_arena_t arena;
            cm_arena_init(&arena, NULL, 0);
            dm_device_t **devs = cm_arena_alloc(&arena, sizeof *devs * (size_t)n);
            for (int i = 0; i < n; i++) devs[i] = dm__device_from_row(&arena.pb, r, i, 0);
            dm__cache_put_many(s, devs, (size_t)n);
            cm_arena_free(&arena);
            dm__events_kick(s);
            CM_LOG(CM_LOG_INFO, "%d devices marked offline", n);
        }
        PQclear(r);
    } else {
        cm_log_kv(CM_LOG_WARN, "presence sweep failed", "error", cm_pg_error(c), NULL);
    }
    cm_pg_release(s->pg, c);
    dm_commands_expire(s);
    return n == 1000 ? 0 : s->cfg->presence_interval_ms;
}

/* ---- lifecycle ------------------------------------------------------------------------------- */

int dm_store_open(dm_store_t *s, const dm_config_t *cfg, int pg_conns, int redis_conns) {
    pthread_once(&dm__once, dm__init_once);
    memset(s, 0, sizeof *s);
    s->cfg = cfg;
    snprintf(s->prefix, sizeof s->prefix, "%s", cfg->redis_prefix);
    s->redis_timeout_ms = (int)cfg->redis_timeout_ms;
    pthread_mutex_init(&s->ca_mu, NULL);
    int err = 0;
    s->pg = cm_pg_new(cfg->pg_dsn, cfg->pg_schema, pg_conns, &err);
    if (!s->pg) return err ? err : CM_EINVAL;
    s->redis = cm_redis_pool_new(cfg->redis_addr, redis_conns, s->redis_timeout_ms, &err);
    if (!s->redis) {
        cm_pg_free(s->pg);
        s->pg = NULL;
        return err ? err : CM_EINVAL;
    }
    return 0;
}

int dm_store_start(dm_store_t *s) {
    int applied = 0;
    int rc = cm_pg_migrate(s->pg, s->cfg->migrations, &applied);
    if (rc) return rc;
    rc = dm_creds_load_ca(s);
    if (rc) return rc;
    s->relay = cm_loop_start(dm__relay_loop, s, 0);
    s->presence = cm_loop_start(dm__presence_loop, s, s->cfg->presence_interval_ms);
    return 0;
}

void dm_store_close(dm_store_t *s) {
    cm_loop_stop(s->presence);
    s->presence = NULL;
    /* One last pass so events of the final calls are not left for the next start. */
    if (s->relay) {
        cm_loop_stop(s->relay);
        s->relay = NULL;
        int more = 1;
        for (int i = 0; i < 10 && more; i++)
            if (dm__relay_once(s, &more)) break;
    }
    dm_ca_free(s->ca);
    s->ca = NULL;
    cm_redis_pool_free(s->redis);
    cm_pg_free(s->pg);
    pthread_mutex_destroy(&s->ca_mu);
}

int dm_store_ready(void *store, char *why, size_t len) {
    dm_store_t *s = store;
    if (!cm_pg_check(s->pg, 1000, why, len)) return 0;
    cm_redis_t *r = cm_redis_pool_acquire(s->redis, 1000);
    if (!r) {
        snprintf(why, len, "redis: no connection free");
        return 0;
    }
    int ok = cm_redis_ping(r) == 0;
    if (!ok) snprintf(why, len, "redis: %s", cm_redis_error(r));
    cm_redis_pool_release(s->redis, r);
    return ok;
}

/* ---- devices --------------------------------------------------------------------------------- */

typedef struct dm__idx_s {
    const char *id;
    size_t i;
} dm__idx_t;

static int dm__idx_cmp(const void *a, const void *b) {
    return strcmp(((const dm__idx_t *)a)->id, ((const dm__idx_t *)b)->id);
}

int dm_store_create_devices(dm_store_t *s, dm_device_t **devs, size_t n, ProtobufCAllocator *a, dm_err_t *e) {
    for (size_t i = 0; i < n; i++)
        if (!*devs[i]->id) {
            char hex[17];
            cm_random_hex(hex, 8);
            devs[i]->id = a->alloc(a->allocator_data, 20);
            snprintf(devs[i]->id, 20, "d-%s", hex);
        }
    /* Duplicates within the batch are found here, so the error can name both indexes. */
    dm__idx_t *idx = cm_malloc(sizeof *idx * (n ? n : 1));
    for (size_t i = 0; i < n; i++) idx[i] = (dm__idx_t){devs[i]->id, i};
    qsort(idx, n, sizeof *idx, dm__idx_cmp);
    for (size_t i = 1; i < n; i++)
        if (strcmp(idx[i - 1].id, idx[i].id) == 0) {
            size_t x = idx[i - 1].i < idx[i].i ? idx[i - 1].i : idx[i].i, y = idx[i - 1].i ^ idx[i].i ^ x;
            snprintf(e->msg, sizeof e->msg, "devices[%zu].id: \"%s\" repeats devices[%zu].id", y, idx[i].id, x);
            cm_free(idx);
            return CM_STATUS_ALREADY_EXISTS;
        }

    /* One INSERT over unnest()ed arrays: one round trip and one plan for the whole batch. */
    enum { NCOL = 11 };
    cm_buf_t col[NCOL];
    for (int k = 0; k < NCOL; k++) {
        cm_buf_t b = CM_BUF_INIT;
        col[k] = b;
        cm_buf_puts(&col[k], "{");
    }
    for (size_t i = 0; i < n; i++) {
        dm_device_t *d = devs[i];
        char lat[32], lon[32], st[8];
        snprintf(lat, sizeof lat, "%.17g", d->location ? d->location->latitude : 0.0);
        snprintf(lon, sizeof lon, "%.17g", d->location ? d->location->longitude : 0.0);
        snprintf(st, sizeof st, "%d", d->status ? (int)d->status : 1);
        char *labels = dm__map_to_json(d->labels, d->n_labels);
        char *meta = dm__map_to_json((Iot__Device__V1__Device__LabelsEntry **)d->metadata, d->n_metadata);
        const char *v[NCOL] = {d->id,   d->name, d->type, d->model, d->location ? d->location->site : "",
                               lat,     lon,     labels,  meta,     d->firmware_version,
                               st};
        for (int k = 0; k < NCOL; k++) dm__array_elem(&col[k], v[k], i == 0);
        cm_free(labels);
        cm_free(meta);
    }
    const char *p[NCOL];
    for (int k = 0; k < NCOL; k++) {
        cm_buf_puts(&col[k], "}");
        p[k] = col[k].data;
    }
    int code = CM_STATUS_OK;
    cm_pg_conn_t *c = dm__pg(s, e);
    PGresult *r = NULL;
    if (!c) {
        code = CM_STATUS_UNAVAILABLE;
        goto out;
    }
    if (cm_pg_exec(c, &r,
                   "WITH ins AS (INSERT INTO devices (id, name, type, model, site, latitude, longitude, labels, metadata, "
                   "  firmware_version, status) "
                   "  SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::float8[], "
                   "  $7::float8[], $8::jsonb[], $9::jsonb[], $10::text[], $11::int2[]) "
                   "  RETURNING id, status, version, created_at), "
                   "ev AS (INSERT INTO events (type, device_id, status, version) SELECT 'created', id, status, version FROM ins) "
                   "SELECT id, version, (extract(epoch from created_at) * 1000000)::int8 FROM ins",
                   NCOL, p)) {
        code = dm__pg_fail(c, "device", e);
        if (code == CM_STATUS_ALREADY_EXISTS) {
            /* Name the first offending index, as the API promises. */
            PGresult *x = NULL;
            const char *q[] = {p[0]};
            if (cm_pg_exec(c, &x, "SELECT id FROM devices WHERE id = ANY($1::text[]) ORDER BY id LIMIT 1", 1, q) == 0 &&
                PQntuples(x) == 1) {
                dm__idx_t key = {PQgetvalue(x, 0, 0), 0}, *hit = bsearch(&key, idx, n, sizeof *idx, dm__idx_cmp);
                if (hit)
                    snprintf(e->msg, sizeof e->msg, "devices[%zu].id: device \"%s\" already exists", hit->i, hit->id);
            }
            PQclear(x);
        }
        goto out;
    }
    int rows = PQntuples(r);
    for (int i = 0; i < rows; i++) {
        dm__idx_t key = {PQgetvalue(r, i, 0), 0}, *hit = bsearch(&key, idx, n, sizeof *idx, dm__idx_cmp);
        if (!hit) continue;
        dm_device_t *d = devs[hit->i];
        int64_t us = dm__int(r, i, 2);
        d->etag = dm__strdup(a, PQgetvalue(r, i, 1));
        d->create_time = dm__ts(a, us, 0);
        d->update_time = dm__ts(a, us, 0);
        d->last_seen_time = NULL;
        if (!d->status) d->status = IOT__DEVICE__V1__DEVICE_STATUS__DEVICE_STATUS_PROVISIONED;
    }
    dm__events_kick(s);
    /* Write-through: overwrites tombstones of earlier devices with the same ids. */
    dm__cache_put_many(s, devs, n);
out:
    PQclear(r);
    if (c) cm_pg_release(s->pg, c);
    for (int k = 0; k < NCOL; k++) cm_buf_free(&col[k]);
    cm_free(idx);
    return code;
}

static int dm__get_device_pg(cm_pg_conn_t *c, const char *id, ProtobufCAllocator *a, dm_device_t **out,
                             int for_update, dm_err_t *e) {
    const char *p[] = {id};
    PGresult *r = NULL;
    if (cm_pg_exec(c, &r,
                   for_update ? "SELECT " DM__DEVICE_COLS " FROM devices d WHERE d.id = $1 FOR UPDATE"
                              : "SELECT " DM__DEVICE_COLS " FROM devices d WHERE d.id = $1",
                   1, p))
        return dm__pg_fail(c, "device", e);
    int code = CM_STATUS_OK;
    if (PQntuples(r) == 0) {
        snprintf(e->msg, sizeof e->msg, "device \"%s\" not found", id);
        code = CM_STATUS_NOT_FOUND;
    } else {
        *out = dm__device_from_row(a, r, 0, 0);
    }
    PQclear(r);
    return code;
}

int dm_store_get_device(dm_store_t *s, const char *id, ProtobufCAllocator *a, dm_device_t **out, dm_err_t *e) {
    int deleted;
    if (dm__cache_get(s, id, a, out, &deleted)) {
        cm_counter_add(dm__cache_hits, 1);
        if (!deleted) return CM_STATUS_OK;
        snprintf(e->msg, sizeof e->msg, "device \"%s\" not found", id);
        return CM_STATUS_NOT_FOUND;
    }
    cm_counter_add(dm__cache_misses, 1);
    cm_pg_conn_t *c = dm__pg(s, e);
    if (!c) return CM_STATUS_UNAVAILABLE;
    int code = dm__get_device_pg(c, id, a, out, 0, e);
    cm_pg_release(s->pg, c);
    if (code == CM_STATUS_OK) dm__cache_put(s, id, (*out)->etag, *out);
    return code;
}

static int dm__mask_has(const char *const *mask, size_t n, const char *field) {
    if (n == 0) return 1;
    for (size_t i = 0; i < n; i++)
        if (strcmp(mask[i], field) == 0) return 1;
    return 0;
}

int dm_store_update_device(dm_store_t *s, const dm_device_t *upd, const char *const *mask, size_t n_mask,
                           ProtobufCAllocator *a, dm_device_t **out, dm_err_t *e) {
    cm_pg_conn_t *c = dm__pg(s, e);
    if (!c) return CM_STATUS_UNAVAILABLE;
    dm_device_t *d = NULL;
    PGresult *r = NULL;
    int code = cm_pg_begin(c) ? dm__pg_fail(c, "device", e) : CM_STATUS_OK;
    if (!code) code = dm__get_device_pg(c, upd->id, a, &d, 1, e);
    if (!code && *upd->etag && strcmp(upd->etag, d->etag) != 0) {
        snprintf(e->msg, sizeof e->msg, "device \"%s\" changed since etag %s (now %s): read it again and retry",
                 upd->id, upd->etag, d->etag);
        code = CM_STATUS_ABORTED;
    }
    if (code) goto out;
    int old_status = d->status;
    if (dm__mask_has(mask, n_mask, "name")) d->name = upd->name;
    if (dm__mask_has(mask, n_mask, "type")) d->type = upd->type;
    if (dm__mask_has(mask, n_mask, "model")) d->model = upd->model;
    if (dm__mask_has(mask, n_mask, "location")) d->location = upd->location;
    if (dm__mask_has(mask, n_mask, "labels")) {
        d->labels = upd->labels;
        d->n_labels = upd->n_labels;
    }
    if (dm__mask_has(mask, n_mask, "metadata")) {
        d->metadata = upd->metadata;
        d->n_metadata = upd->n_metadata;
    }
    if (dm__mask_has(mask, n_mask, "firmware_version")) d->firmware_version = upd->firmware_version;
    if (dm__mask_has(mask, n_mask, "status") && upd->status) d->status = upd->status;
    char lat[32], lon[32], st[8];
    snprintf(lat, sizeof lat, "%.17g", d->location ? d->location->latitude : 0.0);
    snprintf(lon, sizeof lon, "%.17g", d->location ? d->location->longitude : 0.0);
    snprintf(st, sizeof st, "%d", (int)d->status);
    char *labels = dm__map_to_json(d->labels, d->n_labels);
    char *meta = dm__map_to_json((Iot__Device__V1__Device__LabelsEntry **)d->metadata, d->n_metadata);
    const char *p[] = {d->id, d->name, d->type, d->model, d->location ? d->location->site : "", lat, lon, labels,
                       meta,  d->firmware_version, st};
    int rc = cm_pg_exec(c, &r,
                        "UPDATE devices SET name = $2, type = $3, model = $4, site = $5, latitude = $6, longitude = $7, "
                        "labels = $8, metadata = $9, firmware_version = $10, status = $11, updated_at = now(), "
                        "version = nextval('version_seq') WHERE id = $1 "
                        "RETURNING version, (extract(epoch from updated_at) * 1000000)::int8",
                        11, p);
    cm_free(labels);
    cm_free(meta);
    if (rc) {
        code = dm__pg_fail(c, "device", e);
        goto out;
    }
    d->etag = dm__strdup(a, PQgetvalue(r, 0, 0));
    d->update_time = dm__ts(a, dm__int(r, 0, 1), 0);
    const char *type = (int)d->status == old_status ? "updated"
                       : d->status == IOT__DEVICE__V1__DEVICE_STATUS__DEVICE_STATUS_ONLINE  ? "online"
                       : d->status == IOT__DEVICE__V1__DEVICE_STATUS__DEVICE_STATUS_OFFLINE ? "offline"
                                                                                             : "updated";
    if (dm__event(c, type, d->id, d->status, d->etag) || cm_pg_commit(c)) code = dm__pg_fail(c, "device", e);
out:
    PQclear(r);
    if (code) cm_pg_rollback(c);
    cm_pg_release(s->pg, c);
    if (code) return code;
    dm__events_kick(s);
    dm__cache_put(s, d->id, d->etag, d);
    *out = d;
    return CM_STATUS_OK;
}

int dm_store_delete_device(dm_store_t *s, const char *id, const char *etag, dm_err_t *e) {
    cm_pg_conn_t *c = dm__pg(s, e);
    if (!c) return CM_STATUS_UNAVAILABLE;
    PGresult *r = NULL, *toks = NULL;
    const char *p[] = {id};
    int code = cm_pg_begin(c) ? dm__pg_fail(c, "device", e) : CM_STATUS_OK;
    if (!code && cm_pg_exec(c, &r, "SELECT version, status FROM devices WHERE id = $1 FOR UPDATE", 1, p))
        code = dm__pg_fail(c, "device", e);
    if (!code && PQntuples(r) == 0) {
        snprintf(e->msg, sizeof e->msg, "device \"%s\" not found", id);
        code = CM_STATUS_NOT_FOUND;
    }
    if (!code && etag && *etag && strcmp(etag, PQgetvalue(r, 0, 0)) != 0) {
        snprintf(e->msg, sizeof e->msg, "device \"%s\" changed since etag %s (now %s): read it again and retry", id,
                 etag, PQgetvalue(r, 0, 0));
        code = CM_STATUS_ABORTED;
    }
    int status = code ? 0 : (int)dm__int(r, 0, 1);
    PQclear(r);
    r = NULL;
    /* Tokens go with the device; their cache entries are tombstoned below so a device later
     * re-created under the same id does not inherit them. Certificates stay, revoked. */
    if (!code && cm_pg_exec(c, &toks, "DELETE FROM tokens WHERE device_id = $1 RETURNING encode(hash, 'hex')", 1, p))
        code = dm__pg_fail(c, "device", e);
    if (!code && cm_pg_exec(c, NULL,
                            "UPDATE certificates SET revoked_at = now(), reason = 5 "
                            "WHERE device_id = $1 AND revoked_at IS NULL",
                            1, p))
        code = dm__pg_fail(c, "device", e);
    if (!code && cm_pg_exec(c, &r, "WITH del AS (DELETE FROM devices WHERE id = $1) SELECT nextval('version_seq')", 1, p))
        code = dm__pg_fail(c, "device", e);
    char version[24] = "";
    if (!code) {
        snprintf(version, sizeof version, "%s", PQgetvalue(r, 0, 0));
        if (dm__event(c, "deleted", id, status, version) || cm_pg_commit(c)) code = dm__pg_fail(c, "device", e);
    }
    PQclear(r);
    if (code) cm_pg_rollback(c);
    cm_pg_release(s->pg, c);
    if (!code) {
        dm__events_kick(s);
        dm__cache_put(s, id, version, NULL);
        char ttl[24];
        snprintf(ttl, sizeof ttl, "%" PRId64, s->cfg->cache_ttl_ms);
        for (int i = 0; i < PQntuples(toks); i++) {
            cm_buf_t key = CM_BUF_INIT;
            cm_buf_printf(&key, "%st:%s", s->prefix, PQgetvalue(toks, i, 0));
            const char *argv[] = {"SET", key.data, "-", "PX", ttl};
            dm_err_t ignored;
            redisReply *rep = dm__redis(s, 5, argv, NULL, &ignored);
            if (rep) freeReplyObject(rep);
            else cm_counter_add(dm__cache_errors, 1);
            cm_buf_free(&key);
        }
    }
    PQclear(toks);
    return code;
}

/* ---- filters and paging ---------------------------------------------------------------------- */

/* LIKE pattern text with its metacharacters escaped (the default escape character is \). */
static char *dm__like_escape(cm_arena_t *ar, const char *s, int contains) {
    size_t n = strlen(s);
    char *out = cm_arena_alloc(ar, 2 * n + 3), *o = out;
    if (contains) *o++ = '%';
    for (; *s; s++) {
        if (*s == '%' || *s == '_' || *s == '\\') *o++ = '\\';
        *o++ = *s;
    }
    *o++ = '%';
    *o = '\0';
    return out;
}

static char *dm__json_kv(cm_arena_t *ar, const char *k, const char *v) {
    json_t *o = json_object();
    json_object_set_new(o, k, json_string(v));
    char *s = cm_json_dump(o);
    json_decref(o);
    char *r = cm_arena_strdup(ar, s);
    cm_free(s);
    return r;
}

/* Appends " AND ..." conditions on devices d for f. A group_id is resolved here: static groups by
 * membership, dynamic ones by their own filter (which cannot name a group, so no recursion). */
static int dm__filter_sql(dm_store_t *s, cm_pg_conn_t *c, const dm_filter_t *f, cm_buf_t *sql, dm__params_t *p,
                          cm_arena_t *ar, int depth, dm_err_t *e) {
    if (!f) return CM_STATUS_OK;
    if (*f->type) cm_buf_printf(sql, " AND d.type = $%d", dm__param(p, f->type));
    if (*f->model) cm_buf_printf(sql, " AND d.model = $%d", dm__param(p, f->model));
    if (*f->firmware_version) cm_buf_printf(sql, " AND d.firmware_version = $%d", dm__param(p, f->firmware_version));
    if (f->n_statuses) {
        cm_buf_t lit = CM_BUF_INIT;
        cm_buf_puts(&lit, "{");
        for (size_t i = 0; i < f->n_statuses; i++) cm_buf_printf(&lit, "%s%d", i ? "," : "", (int)f->statuses[i]);
        cm_buf_puts(&lit, "}");
        cm_buf_printf(sql, " AND d.status = ANY($%d::int2[])", dm__param(p, cm_arena_strdup(ar, lit.data)));
        cm_buf_free(&lit);
    }
    if (*f->name_contains) cm_buf_printf(sql, " AND d.name ILIKE $%d", dm__param(p, dm__like_escape(ar, f->name_contains, 1)));
    if (*f->search) {
        int k = dm__param(p, dm__like_escape(ar, f->search, 1));
        cm_buf_printf(sql, " AND (d.id ILIKE $%d OR d.name ILIKE $%d)", k, k);
    }
    if (*f->site_prefix) cm_buf_printf(sql, " AND d.site LIKE $%d", dm__param(p, dm__like_escape(ar, f->site_prefix, 0)));
    if (*f->label_selector) {
        char err[256];
        cm_selector_t *sel = cm_selector_parse(f->label_selector, err, sizeof err);
        if (!sel) {
            snprintf(e->msg, sizeof e->msg, "filter.%s", err);
            return CM_STATUS_INVALID_ARGUMENT;
        }
        for (size_t i = 0; i < sel->n_reqs; i++) {
            const cm_sel_req_t *q = &sel->reqs[i];
            const char *key = cm_arena_strdup(ar, q->key);
            switch (q->op) {
            case CM_SEL_EQ:
            case CM_SEL_NEQ:
                /* @> containment uses the GIN index on labels. */
                cm_buf_printf(sql, q->op == CM_SEL_EQ ? " AND d.labels @> $%d::jsonb" : " AND NOT d.labels @> $%d::jsonb",
                              dm__param(p, dm__json_kv(ar, q->key, q->values[0])));
                break;
            case CM_SEL_IN:
            case CM_SEL_NOTIN: {
                cm_buf_t lit = CM_BUF_INIT;
                dm__array_text(&lit, q->values, q->n_values);
                int pk = dm__param(p, key), pv = dm__param(p, cm_arena_strdup(ar, lit.data));
                cm_buf_free(&lit);
                cm_buf_printf(sql,
                              q->op == CM_SEL_IN ? " AND d.labels ->> $%d = ANY($%d::text[])"
                                                 : " AND NOT coalesce(d.labels ->> $%d = ANY($%d::text[]), false)",
                              pk, pv);
                break;
            }
            case CM_SEL_EXISTS:
                cm_buf_printf(sql, " AND d.labels ? $%d", dm__param(p, key));
                break;
            case CM_SEL_NOT_EXISTS:
                cm_buf_printf(sql, " AND NOT d.labels ? $%d", dm__param(p, key));
                break;
            }
        }
        cm_selector_free(sel);
    }
    if (*f->group_id) {
        if (depth > 0) {
            snprintf(e->msg, sizeof e->msg, "filter.group_id: a group's filter cannot name a group");
            return CM_STATUS_INVALID_ARGUMENT;
        }
        const char *gp[] = {f->group_id};
        PGresult *r = NULL;
        if (cm_pg_exec(c, &r, "SELECT kind, filter FROM groups WHERE id = $1", 1, gp))
            return dm__pg_fail(c, "group", e);
        if (PQntuples(r) == 0) {
            PQclear(r);
            snprintf(e->msg, sizeof e->msg, "filter.group_id: group \"%s\" not found", f->group_id);
            return CM_STATUS_NOT_FOUND;
        }
        int code = CM_STATUS_OK;
        if (atoi(PQgetvalue(r, 0, 0)) == IOT__DEVICE__V1__GROUP_KIND__GROUP_KIND_STATIC) {
            cm_buf_printf(sql,
                          " AND EXISTS (SELECT 1 FROM group_members m WHERE m.group_id = $%d AND m.device_id = d.id)",
                          dm__param(p, cm_arena_strdup(ar, f->group_id)));
        } else {
            size_t blen;
            unsigned char *raw = PQunescapeBytea((const unsigned char *)PQgetvalue(r, 0, 1), &blen);
            dm_filter_t *gf = raw ? (dm_filter_t *)protobuf_c_message_unpack(&iot__device__v1__device_filter__descriptor,
                                                                            &ar->pb, blen, raw)
                                  : NULL;
            if (raw) PQfreemem(raw);
            if (!gf) {
                snprintf(e->msg, sizeof e->msg, "group \"%s\": stored filter unreadable", f->group_id);
                code = CM_STATUS_INTERNAL;
            } else {
                code = dm__filter_sql(s, c, gf, sql, p, ar, depth + 1, e);
            }
        }
        PQclear(r);
        return code;
    }
    return CM_STATUS_OK;
}

/* Page tokens are "<filter hash>:<last id>" in hex: opaque to clients, and a token used with a
 * different filter is refused instead of silently paging something else. */
static uint32_t dm__hash(const void *data, size_t n) {
    const unsigned char *p = data;
    uint32_t h = 2166136261u;
    for (size_t i = 0; i < n; i++) h = (h ^ p[i]) * 16777619u;
    return h;
}

static uint32_t dm__filter_hash(const dm_filter_t *f) {
    if (!f) return 0;
    size_t n = protobuf_c_message_get_packed_size(&f->base);
    uint8_t *buf = cm_malloc(n + 1);
    protobuf_c_message_pack(&f->base, buf);
    uint32_t h = dm__hash(buf, n);
    cm_free(buf);
    return h;
}

static char *dm__page_token(ProtobufCAllocator *a, uint32_t h, const char *last) {
    char head[16];
    snprintf(head, sizeof head, "%08x:", h);
    size_t nh = strlen(head), nl = strlen(last);
    char *out = a->alloc(a->allocator_data, 2 * (nh + nl) + 1);
    cm_hex(out, head, nh);
    cm_hex(out + 2 * nh, last, nl);
    return out;
}

/* Decodes a token into last (cap bytes). 0, or INVALID_ARGUMENT. */
static int dm__page_token_parse(const char *tok, uint32_t h, char *last, size_t cap, dm_err_t *e) {
    last[0] = '\0';
    if (!*tok) return CM_STATUS_OK;
    size_t n = strlen(tok);
    char buf[300];
    if (n % 2 || n / 2 >= sizeof buf) goto bad;
    for (size_t i = 0; i < n / 2; i++) {
        char pair[3] = {tok[2 * i], tok[2 * i + 1], 0}, *end;
        long v = strtol(pair, &end, 16);
        if (*end || v == 0) goto bad;
        buf[i] = (char)v;
    }
    buf[n / 2] = '\0';
    char want[16];
    snprintf(want, sizeof want, "%08x:", h);
    if (strncmp(buf, want, 9) != 0) {
        snprintf(e->msg, sizeof e->msg, "page_token: it belongs to a different filter; start again without a page_token");
        return CM_STATUS_INVALID_ARGUMENT;
    }
    /* The id part is checked like a request id: a forged token must not carry bytes (invalid
     * UTF-8, say) that Postgres would reject as an internal error rather than a bad argument. */
    if (strlen(buf + 9) >= cap || !dm__id_ok(buf + 9)) goto bad;
    snprintf(last, cap, "%s", buf + 9);
    return CM_STATUS_OK;
bad:
    snprintf(e->msg, sizeof e->msg, "page_token: not a token this service issued");
    return CM_STATUS_INVALID_ARGUMENT;
}

int dm_store_list_devices(dm_store_t *s, const dm_filter_t *f, int page_size, const char *page_token,
                          ProtobufCAllocator *a, dm_device_t ***out, size_t *n, char **next, dm_err_t *e) {
    *out = NULL;
    *n = 0;
    *next = dm__strdup(a, "");
    uint32_t h = dm__filter_hash(f);
    char last[160];
    int code = dm__page_token_parse(page_token, h, last, sizeof last, e);
    if (code) return code;
    cm_pg_conn_t *c = dm__pg(s, e);
    if (!c) return CM_STATUS_UNAVAILABLE;
    cm_arena_t ar;
    cm_arena_init(&ar, NULL, 0);
    dm__params_t p = {.n = 0};
    cm_buf_t sql = CM_BUF_INIT;
    cm_buf_puts(&sql, "SELECT " DM__DEVICE_COLS " FROM devices d WHERE true");
    code = dm__filter_sql(s, c, f, &sql, &p, &ar, 0, e);
    PGresult *r = NULL;
    if (!code) {
        if (*last) cm_buf_printf(&sql, " AND d.id > $%d", dm__param(&p, last));
        /* One row more than asked tells whether another page exists. */
        char lim[16];
        snprintf(lim, sizeof lim, "%d", page_size + 1);
        cm_buf_printf(&sql, " ORDER BY d.id LIMIT $%d", dm__param(&p, lim));
        if (cm_pg_exec(c, &r, sql.data, p.n, p.v)) code = dm__pg_fail(c, "devices", e);
    }
    if (!code) {
        int rows = PQntuples(r), take = rows > page_size ? page_size : rows;
        *out = a->alloc(a->allocator_data, sizeof **out * (size_t)(take ? take : 1));
        for (int i = 0; i < take; i++) (*out)[i] = dm__device_from_row(a, r, i, 0);
        *n = (size_t)take;
        if (rows > page_size) *next = dm__page_token(a, h, (*out)[take - 1]->id);
    }
    PQclear(r);
    cm_buf_free(&sql);
    cm_arena_free(&ar);
    cm_pg_release(s->pg, c);
    return code;
}

int dm_store_count_devices(dm_store_t *s, const dm_filter_t *f, ProtobufCAllocator *a,
                           Iot__Device__V1__CountDevicesResponse *out, dm_err_t *e) {
    cm_pg_conn_t *c = dm__pg(s, e);
    if (!c) return CM_STATUS_UNAVAILABLE;
    cm_arena_t ar;
    cm_arena_init(&ar, NULL, 0);
    dm__params_t p = {.n = 0};
    cm_buf_t sql = CM_BUF_INIT;
    cm_buf_puts(&sql, "SELECT d.status, count(*) FROM devices d WHERE true");
    int code = dm__filter_sql(s, c, f, &sql, &p, &ar, 0, e);
    PGresult *r = NULL;
    if (!code) {
        cm_buf_puts(&sql, " GROUP BY d.status ORDER BY d.status");
        if (cm_pg_exec(c, &r, sql.data, p.n, p.v)) code = dm__pg_fail(c, "devices", e);
    }
    if (!code) {
        int rows = PQntuples(r);
        out->total = 0;
        out->n_by_status = (size_t)rows;
        out->by_status = a->alloc(a->allocator_data, sizeof *out->by_status * (size_t)(rows ? rows : 1));
        for (int i = 0; i < rows; i++) {
            Iot__Device__V1__DeviceStatusCount *sc = a->alloc(a->allocator_data, sizeof *sc);
            iot__device__v1__device_status_count__init(sc);
            sc->status = (Iot__Device__V1__DeviceStatus)dm__int(r, i, 0);
            sc->count = dm__int(r, i, 1);
            out->total += sc->count;
            out->by_status[i] = sc;
        }
    }
    PQclear(r);
    cm_buf_free(&sql);
    cm_arena_free(&ar);
    cm_pg_release(s->pg, c);
    return code;
}

/* ---- groups ---------------------------------------------------------------------------------- */

#define DM__GROUP_COLS                                                                                          \
    "g.id, g.description, g.kind, g.filter, (extract(epoch from g.created_at) * 1000000)::int8, "               \
    "(extract(epoch from g.updated_at) * 1000000)::int8, g.version"

static dm_group_t *dm__group_from_row(ProtobufCAllocator *a, const PGresult *r, int row) {
    dm_group_t *g = a->alloc(a->allocator_data, sizeof *g);
    iot__device__v1__group__init(g);
    g->id = dm__strdup(a, PQgetvalue(r, row, 0));
    g->description = dm__strdup(a, PQgetvalue(r, row, 1));
    g->kind = (Iot__Device__V1__GroupKind)dm__int(r, row, 2);
    if (!PQgetisnull(r, row, 3)) {
        size_t blen;
        unsigned char *raw = PQunescapeBytea((const unsigned char *)PQgetvalue(r, row, 3), &blen);
        if (raw) {
            g->filter = (dm_filter_t *)protobuf_c_message_unpack(&iot__device__v1__device_filter__descriptor, a, blen, raw);
            PQfreemem(raw);
        }
    }
    g->create_time = dm__ts(a, dm__int(r, row, 4), 0);
    g->update_time = dm__ts(a, dm__int(r, row, 5), 0);
    g->etag = dm__strdup(a, PQgetvalue(r, row, 6));
    return g;
}

/* A filter as a bytea parameter in hex form ("\x..."), or NULL. */
static char *dm__filter_param(const dm_filter_t *f) {
    if (!f) return NULL;
    size_t n = protobuf_c_message_get_packed_size(&f->base);
    uint8_t *buf = cm_malloc(n + 1);
    protobuf_c_message_pack(&f->base, buf);
    char *out = cm_malloc(2 * n + 3);
    out[0] = '\\';
    out[1] = 'x';
    cm_hex(out + 2, buf, n);
    cm_free(buf);
    return out;
}

/* A dynamic group's filter must be valid SQL-wise too: compile it once against the database. */
static int dm__check_filter(dm_store_t *s, cm_pg_conn_t *c, const dm_filter_t *f, dm_err_t *e) {
    cm_arena_t ar;
    cm_arena_init(&ar, NULL, 0);
    cm_buf_t sql = CM_BUF_INIT;
    dm__params_t p = {.n = 0};
    int code = dm__filter_sql(s, c, f, &sql, &p, &ar, 1, e);
    cm_buf_free(&sql);
    cm_arena_free(&ar);
    return code;
}

int dm_store_create_group(dm_store_t *s, dm_group_t *g, ProtobufCAllocator *a, dm_err_t *e) {
    if (!*g->id) {
        char hex[17];
        cm_random_hex(hex, 8);
        g->id = a->alloc(a->allocator_data, 20);
        snprintf(g->id, 20, "g-%s", hex);
    }
    cm_pg_conn_t *c = dm__pg(s, e);
    if (!c) return CM_STATUS_UNAVAILABLE;
    int code = g->kind == IOT__DEVICE__V1__GROUP_KIND__GROUP_KIND_DYNAMIC ? dm__check_filter(s, c, g->filter, e) : 0;
    char kind[8];
    snprintf(kind, sizeof kind, "%d", (int)g->kind);
    char *filter = g->kind == IOT__DEVICE__V1__GROUP_KIND__GROUP_KIND_DYNAMIC ? dm__filter_param(g->filter) : NULL;
    const char *p[] = {g->id, g->description, kind, filter};
    PGresult *r = NULL;
    if (!code && cm_pg_exec(c, &r,
                            "INSERT INTO groups AS g (id, description, kind, filter) VALUES ($1, $2, $3, $4::bytea) "
                            "RETURNING " DM__GROUP_COLS,
                            4, p)) {
        code = dm__pg_fail(c, "group", e);
        if (code == CM_STATUS_ALREADY_EXISTS)
            snprintf(e->msg, sizeof e->msg, "group.id: group \"%s\" already exists", g->id);
    }
    if (!code) *g = *dm__group_from_row(a, r, 0);
    PQclear(r);
    cm_free(filter);
    cm_pg_release(s->pg, c);
    return code;
}

int dm_store_get_group(dm_store_t *s, const char *id, ProtobufCAllocator *a, dm_group_t **out, dm_err_t *e) {
    cm_pg_conn_t *c = dm__pg(s, e);
    if (!c) return CM_STATUS_UNAVAILABLE;
    const char *p[] = {id};
    PGresult *r = NULL;
    int code = CM_STATUS_OK;
    if (cm_pg_exec(c, &r, "SELECT " DM__GROUP_COLS " FROM groups g WHERE g.id = $1", 1, p)) {
        code = dm__pg_fail(c, "group", e);
    } else if (PQntuples(r) == 0) {
        snprintf(e->msg, sizeof e->msg, "group \"%s\" not found", id);
        code = CM_STATUS_NOT_FOUND;
    } else {
        *out = dm__group_from_row(a, r, 0);
    }
    PQclear(r);
    cm_pg_release(s->pg, c);
    return code;
}

int dm_store_list_groups(dm_store_t *s, int page_size, const char *page_token, ProtobufCAllocator *a,
                         dm_group_t ***out, size_t *n, char **next, dm_err_t *e) {
    *out = NULL;
    *n = 0;
    *next = dm__strdup(a, "");
    char last[160];
    int code = dm__page_token_parse(page_token, 0, last, sizeof last, e);
    if (code) return code;
    cm_pg_conn_t *c = dm__pg(s, e);
    if (!c) return CM_STATUS_UNAVAILABLE;
    char lim[16];
    snprintf(lim, sizeof lim, "%d", page_size + 1);
    const char *p[] = {last, lim};
    PGresult *r = NULL;
    if (cm_pg_exec(c, &r, "SELECT " DM__GROUP_COLS " FROM groups g WHERE g.id > $1 ORDER BY g.id LIMIT $2", 2, p)) {
        code = dm__pg_fail(c, "groups", e);
    } else {
        int rows = PQntuples(r), take = rows > page_size ? page_size : rows;
        *out = a->alloc(a->allocator_data, sizeof **out * (size_t)(take ? take : 1));
        for (int i = 0; i < take; i++) (*out)[i] = dm__group_from_row(a, r, i);
        *n = (size_t)take;
        if (rows > page_size) *next = dm__page_token(a, 0, (*out)[take - 1]->id);
    }
    PQclear(r);
    cm_pg_release(s->pg, c);
    return code;
}

int dm_store_update_group(dm_store_t *s, const dm_group_t *upd, const char *const *mask, size_t n_mask,
                          ProtobufCAllocator *a, dm_group_t **out, dm_err_t *e) {
    cm_pg_conn_t *c = dm__pg(s, e);
    if (!c) return CM_STATUS_UNAVAILABLE;
    const char *p[] = {upd->id};
    PGresult *r = NULL;
    dm_group_t *g = NULL;
    char *filter = NULL;
    int code = cm_pg_begin(c) ? dm__pg_fail(c, "group", e) : CM_STATUS_OK;
    if (!code && cm_pg_exec(c, &r, "SELECT " DM__GROUP_COLS " FROM groups g WHERE g.id = $1 FOR UPDATE", 1, p))
        code = dm__pg_fail(c, "group", e);
    if (!code && PQntuples(r) == 0) {
        snprintf(e->msg, sizeof e->msg, "group \"%s\" not found", upd->id);
        code = CM_STATUS_NOT_FOUND;
    }
    if (!code) g = dm__group_from_row(a, r, 0);
    PQclear(r);
    r = NULL;
    if (!code && *upd->etag && strcmp(upd->etag, g->etag) != 0) {
        snprintf(e->msg, sizeof e->msg, "group \"%s\" changed since etag %s (now %s): read it again and retry", upd->id,
                 upd->etag, g->etag);
        code = CM_STATUS_ABORTED;
    }
    if (!code && dm__mask_has(mask, n_mask, "filter") && (n_mask || upd->filter)) {
        if (g->kind != IOT__DEVICE__V1__GROUP_KIND__GROUP_KIND_DYNAMIC) {
            snprintf(e->msg, sizeof e->msg, "group.filter: group \"%s\" is static; only dynamic groups have a filter",
                     upd->id);
            code = CM_STATUS_FAILED_PRECONDITION;
        } else if (!upd->filter) {
            /* Named in the mask but absent would store no filter, and a dynamic group without
             * one matches every device: refused as CreateGroup refuses it. */
            snprintf(e->msg, sizeof e->msg, "group.filter: a dynamic group needs a filter");
            code = CM_STATUS_INVALID_ARGUMENT;
        } else {
            code = dm__check_filter(s, c, upd->filter, e);
            g->filter = upd->filter;
        }
    }
    if (!code && dm__mask_has(mask, n_mask, "description")) g->description = upd->description;
    if (!code) {
        filter = g->kind == IOT__DEVICE__V1__GROUP_KIND__GROUP_KIND_DYNAMIC ? dm__filter_param(g->filter) : NULL;
        const char *q[] = {g->id, g->description, filter};
        if (cm_pg_exec(c, &r,
                       "UPDATE groups g SET description = $2, filter = $3::bytea, updated_at = now(), "
                       "version = nextval('version_seq') WHERE id = $1 RETURNING " DM__GROUP_COLS,
                       3, q) ||
            cm_pg_commit(c))
            code = dm__pg_fail(c, "group", e);
        else
            *out = dm__group_from_row(a, r, 0);
    }
    PQclear(r);
    cm_free(filter);
    if (code) cm_pg_rollback(c);
    cm_pg_release(s->pg, c);
    return code;
}

int dm_store_delete_group(dm_store_t *s, const char *id, dm_err_t *e) {
    cm_pg_conn_t *c = dm__pg(s, e);
    if (!c) return CM_STATUS_UNAVAILABLE;
    const char *p[] = {id};
    PGresult *r = NULL;
    int code = CM_STATUS_OK;
    if (cm_pg_exec(c, &r, "DELETE FROM groups WHERE id = $1", 1, p)) {
        code = dm__pg_fail(c, "group", e);
    } else if (strcmp(PQcmdTuples(r), "0") == 0) {
        snprintf(e->msg, sizeof e->msg, "group \"%s\" not found", id);
        code = CM_STATUS_NOT_FOUND;
    }
    PQclear(r);
    cm_pg_release(s->pg, c);
    return code;
}

int dm_store_group_members(dm_store_t *s, const char *group_id, char **ids, size_t n, int add, int *changed,
                           dm_err_t *e) {
    *changed = 0;
    cm_pg_conn_t *c = dm__pg(s, e);
    if (!c) return CM_STATUS_UNAVAILABLE;
    cm_buf_t lit = CM_BUF_INIT;
    dm__array_text(&lit, (const char *const *)ids, n);
    const char *p[] = {group_id, lit.data};
    PGresult *r = NULL;
    int code = cm_pg_begin(c) ? dm__pg_fail(c, "group", e) : CM_STATUS_OK;
    /* FOR SHARE: the group cannot be deleted or change kind under us. */
    if (!code && cm_pg_exec(c, &r, "SELECT kind FROM groups WHERE id = $1 FOR SHARE", 1, p))
        code = dm__pg_fail(c, "group", e);
    if (!code && PQntuples(r) == 0) {
        snprintf(e->msg, sizeof e->msg, "group_id: group \"%s\" not found", group_id);
        code = CM_STATUS_NOT_FOUND;
    }
    if (!code && atoi(PQgetvalue(r, 0, 0)) != IOT__DEVICE__V1__GROUP_KIND__GROUP_KIND_STATIC) {
        snprintf(e->msg, sizeof e->msg,
                 "group_id: group \"%s\" is dynamic: its members are the devices matching its filter", group_id);
        code = CM_STATUS_FAILED_PRECONDITION;
    }
    PQclear(r);
    r = NULL;
    if (!code && add) {
        if (cm_pg_exec(c, &r,
                       "SELECT x.id FROM unnest($2::text[]) WITH ORDINALITY AS x(id, i) "
                       "WHERE $1 <> '' AND NOT EXISTS (SELECT 1 FROM devices d WHERE d.id = x.id) ORDER BY x.i LIMIT 1",
                       2, p)) {
            code = dm__pg_fail(c, "device", e);
        } else if (PQntuples(r) == 1) {
            snprintf(e->msg, sizeof e->msg, "device_ids: device \"%s\" not found", PQgetvalue(r, 0, 0));
            code = CM_STATUS_NOT_FOUND;
        }
        PQclear(r);
        r = NULL;
        if (!code && cm_pg_exec(c, &r,
                                "INSERT INTO group_members (group_id, device_id) SELECT $1, x FROM unnest($2::text[]) x "
                                "ON CONFLICT DO NOTHING",
                                2, p))
            code = dm__pg_fail(c, "device", e);
    } else if (!code) {
        if (cm_pg_exec(c, &r, "DELETE FROM group_members WHERE group_id = $1 AND device_id = ANY($2::text[])", 2, p))
            code = dm__pg_fail(c, "group", e);
    }
    if (!code) *changed = atoi(PQcmdTuples(r));
    PQclear(r);
    if (!code && cm_pg_commit(c)) code = dm__pg_fail(c, "group", e);
    if (code) cm_pg_rollback(c);
    cm_pg_release(s->pg, c);
    cm_buf_free(&lit);
    return code;
}

/* ---- presence -------------------------------------------------------------------------------- */

static int dm__strp_cmp(const void *a, const void *b) { return strcmp(*(char *const *)a, *(char *const *)b); }

int dm_store_report_seen(dm_store_t *s, char **ids, const int64_t *at_us, size_t n, int *updated, int *unknown,
                         dm_err_t *e) {
    *updated = *unknown = 0;
    cm_buf_t lid = CM_BUF_INIT, lt = CM_BUF_INIT;
    dm__array_text(&lid, (const char *const *)ids, n);
    cm_buf_puts(&lt, "{");
    for (size_t i = 0; i < n; i++) cm_buf_printf(&lt, "%s%" PRId64, i ? "," : "", at_us[i]);
    cm_buf_puts(&lt, "}");
    const char *p[] = {lid.data, lt.data};
    cm_pg_conn_t *c = dm__pg(s, e);
    PGresult *r = NULL;
    int code = CM_STATUS_OK;
    if (!c) {
        code = CM_STATUS_UNAVAILABLE;
        goto out;
    }
    /* One statement: newest sighting per device, rows locked in id order (concurrent batches
     * cannot deadlock), last_seen only moves forward, and a provisioned or offline device comes
     * online with a new version and an event. The first column counts the devices found. */
    if (cm_pg_exec(c, &r,
                   "WITH v AS (SELECT x.id, max(to_timestamp(x.t / 1000000.0)) AS t "
                   "  FROM unnest($1::text[], $2::int8[]) AS x(id, t) GROUP BY x.id), "
                   "old AS (SELECT d.id, d.status FROM devices d JOIN v ON v.id = d.id ORDER BY d.id FOR UPDATE OF d), "
                   "upd AS (UPDATE devices d SET last_seen = greatest(d.last_seen, v.t), "
                   "  status = CASE WHEN old.status IN (1, 3) THEN 2 ELSE d.status END, "
                   "  version = CASE WHEN old.status IN (1, 3) THEN nextval('version_seq') ELSE d.version END, "
                   "  updated_at = CASE WHEN old.status IN (1, 3) THEN now() ELSE d.updated_at END "
                   "  FROM v, old WHERE d.id = v.id AND old.id = d.id RETURNING d.*, old.status AS old_status), "
                   "ev AS (INSERT INTO events (type, device_id, status, version) "
                   "  SELECT 'online', id, status, version FROM upd WHERE old_status IN (1, 3)) "
                   "SELECT cnt.n, " DM__DEVICE_COLS " FROM (SELECT count(*) AS n FROM upd) cnt "
                   "LEFT JOIN (SELECT * FROM upd WHERE old_status IN (1, 3)) d ON true",
                   2, p)) {
        code = dm__pg_fail(c, "device", e);
        goto out;
    }
    int rows = PQntuples(r);
    *updated = rows ? atoi(PQgetvalue(r, 0, 0)) : 0;
    /* distinct ids in the request */
    char **sorted = cm_malloc(sizeof *sorted * (n ? n : 1));
    memcpy(sorted, ids, sizeof *sorted * n);
    qsort(sorted, n, sizeof *sorted, dm__strp_cmp);
    size_t distinct = 0;
    for (size_t i = 0; i < n; i++)
        if (i == 0 || strcmp(sorted[i], sorted[i - 1]) != 0) distinct++;
    cm_free(sorted);
    *unknown = (int)distinct - *updated;
    /* Devices that came online: full cache write. Others: just the sighting, if cached. */
    cm_arena_t ar;
    cm_arena_init(&ar, NULL, 0);
    size_t nonline = 0;
    dm_device_t **online = cm_arena_alloc(&ar, sizeof *online * (size_t)(rows ? rows : 1));
    for (int i = 0; i < rows; i++)
        if (!PQgetisnull(r, i, 1)) online[nonline++] = dm__device_from_row(&ar.pb, r, i, 1);
    if (nonline) {
        dm__events_kick(s);
        dm__cache_put_many(s, online, nonline);
    }
    cm_arena_free(&ar);
    size_t nargs = 1 + 2 * n;
    const char **args = cm_malloc(sizeof *args * nargs);
    char *nums = cm_malloc(24 * (n ? n : 1));
    args[0] = s->prefix;
    for (size_t i = 0; i < n; i++) {
        snprintf(nums + 24 * i, 24, "%" PRId64, at_us[i]);
        args[1 + 2 * i] = ids[i];
        args[2 + 2 * i] = nums + 24 * i;
    }
    dm_err_t ignored;
    redisReply *rep = dm__redis_eval(s, &dm__seen_script, (int)nargs, args, NULL, &ignored);
    if (rep) freeReplyObject(rep);
    else cm_counter_add(dm__cache_errors, 1);
    cm_free(args);
    cm_free(nums);
out:
    PQclear(r);
    if (c) cm_pg_release(s->pg, c);
    cm_buf_free(&lid);
    cm_buf_free(&lt);
    return code;
}
