/* Partitions, migrations, readiness and small reads for ingest (see ing_store.h).
 *
 * Partition names and bounds are computed here from integers (telemetry_pYYYYMMDDHH, UTC), never
 * from request data; that is why they may be spliced into DDL, which takes no parameters. */
#include "ing_store.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "cm_alloc.h"
#include "cm_err.h"
#include "cm_log.h"
#include "cm_rpc.h"
#include "cm_time.h"

int ing_store_open(ing_store_t *s, const ing_config_t *cfg) {
    memset(s, 0, sizeof *s);
    s->cfg = cfg;
    pthread_mutex_init(&s->part_mu, NULL);
    int err = 0;
    s->pg = cm_pg_new(cfg->pg_dsn, cfg->pg_schema, (int)cfg->query_pool, &err);
    return s->pg ? 0 : (err ? err : CM_EINVAL);
}

static int64_t ing__floor(int64_t v, int64_t m) { return (v >= 0 ? v : v - (m - 1)) / m * m; }

static void ing__utc(int64_t ms, char *out, size_t cap, int compact) {
    time_t t = (time_t)(ms / 1000);
    struct tm tm;
    gmtime_r(&t, &tm);
    if (compact)
        strftime(out, cap, "%Y%m%d%H", &tm);
    else
        strftime(out, cap, "%Y-%m-%d %H:%M:%S+00", &tm);
}

/* Reloads the partition list from the catalog (another replica may have created or dropped). */
static int ing__load_parts(ing_store_t *s, cm_pg_conn_t *c, char *err, size_t err_cap) {
    PGresult *r = NULL;
    const char *sql =
        "SELECT c.relname, "
        "  (extract(epoch FROM (regexp_match(pg_get_expr(c.relpartbound, c.oid), $$FROM \\('([^']+)'\\)$$))[1]::timestamptz) * 1000)::bigint, "
        "  (extract(epoch FROM (regexp_match(pg_get_expr(c.relpartbound, c.oid), $$TO \\('([^']+)'\\)$$))[1]::timestamptz) * 1000)::bigint "
        "FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
        "WHERE i.inhparent = 'telemetry'::regclass ORDER BY 2";
    if (cm_pg_exec(c, &r, sql, 0, NULL)) {
        snprintf(err, err_cap, "listing partitions: %s", cm_pg_error(c));
        return CM_EPG;
    }
    int n = PQntuples(r);
    pthread_mutex_lock(&s->part_mu);
    if ((size_t)n > s->cap_parts) {
        s->cap_parts = (size_t)n * 2;
        s->parts = cm_realloc(s->parts, s->cap_parts * sizeof *s->parts);
    }
    s->n_parts = 0;
    for (int i = 0; i < n; i++) {
        if (PQgetisnull(r, i, 1) || PQgetisnull(r, i, 2)) continue; /* not a range partition of ours */
        ing__part_t *p = &s->parts[s->n_parts++];
        snprintf(p->name, sizeof p->name, "%s", PQgetvalue(r, i, 0));
        p->from_ms = strtoll(PQgetvalue(r, i, 1), NULL, 10);
        p->to_ms = strtoll(PQgetvalue(r, i, 2), NULL, 10);
    }
    pthread_mutex_unlock(&s->part_mu);
    PQclear(r);
    return 0;
}

/* The first gap in [from, to) not covered by known partitions, as [*g0, *g1); 0 when none.
 * Caller holds part_mu. Partitions are sorted by from_ms and never overlap (Postgres refuses). */
static int ing__gap_locked(const ing_store_t *s, int64_t from, int64_t to, int64_t *g0, int64_t *g1) {
    int64_t cur = from;
    for (size_t i = 0; i < s->n_parts && cur < to; i++) {
        const ing__part_t *p = &s->parts[i];
        if (p->to_ms <= cur) continue;
        if (p->from_ms > cur) {
            *g0 = cur;
            *g1 = p->from_ms < to ? p->from_ms : to;
            return 1;
        }
        cur = p->to_ms;
    }
    if (cur < to) {
        *g0 = cur;
        *g1 = to;
        return 1;
    }
    return 0;
}

static int ing__create_part(cm_pg_conn_t *c, int64_t from_ms, int64_t to_ms) {
    char name[16], from[40], to[40], sql[256];
    ing__utc(from_ms, name, sizeof name, 1);
    ing__utc(from_ms, from, sizeof from, 0);
    ing__utc(to_ms, to, sizeof to, 0);
    snprintf(sql, sizeof sql,
             "CREATE TABLE IF NOT EXISTS telemetry_p%s PARTITION OF telemetry FOR VALUES FROM ('%s') TO ('%s')", name,
             from, to);
    return cm_pg_exec(c, NULL, sql, 0, NULL);
}

int ing_store_cover(ing_store_t *s, cm_pg_conn_t *c, int64_t from_ms, int64_t to_ms, char *err, size_t err_cap) {
    int64_t step = s->cfg->partition_ms;
    /* Whole slots: a partition is never created for less than the slot it falls in, unless an
     * existing partition (of another IOT_INGEST_PARTITION, from an earlier configuration) bounds
     * it, in which case the new one fills exactly the gap. */
    int64_t lo = ing__floor(from_ms, step), hi = ing__floor(to_ms, step) + step;
    for (int attempt = 0; attempt < 3; attempt++) {
        int64_t g0, g1;
        int created = 0, failed = 0;
        for (;;) {
            pthread_mutex_lock(&s->part_mu);
            int gap = ing__gap_locked(s, lo, hi, &g0, &g1);
            if (gap) {
                /* One slot at a time; remember it as known so the next gap search moves on. */
                int64_t end = ing__floor(g0, step) + step;
                if (end < g1) g1 = end;
                if (s->n_parts == s->cap_parts) {
                    s->cap_parts = s->cap_parts ? s->cap_parts * 2 : 16;
                    s->parts = cm_realloc(s->parts, s->cap_parts * sizeof *s->parts);
                }
                size_t at = 0;
                while (at < s->n_parts && s->parts[at].from_ms < g0) at++;
                memmove(&s->parts[at + 1], &s->parts[at], (s->n_parts - at) * sizeof *s->parts);
                s->parts[at] = (ing__part_t){g0, g1, ""};
                s->n_parts++;
            }
            pthread_mutex_unlock(&s->part_mu);
            if (!gap) break;
            if (ing__create_part(c, g0, g1) != 0) {
                /* Another replica won the race (42P07), or created a partition of another size
                 * that overlaps (42P17): the catalog reload below says what exists. */
                CM_LOG(CM_LOG_DEBUG, "creating a partition: %s", cm_pg_error(c));
                if (cm_pg_conn_lost(c)) {
                    snprintf(err, err_cap, "creating a partition: %s", cm_pg_error(c));
                    ing__load_parts(s, c, err, err_cap);
                    return CM_EPG;
                }
                failed = 1;
            }
            created = 1;
        }
        if (!created) return 0;
        /* Names and exact bounds come from the catalog, which also drops optimistic entries of
         * partitions that could not be created. */
        int rc = ing__load_parts(s, c, err, err_cap);
        if (rc) return rc;
        if (!failed) return 0;
    }
    char when[40];
    ing__utc(lo, when, sizeof when, 0);
    snprintf(err, err_cap, "telemetry partitions for the range from %s cannot be created (see the log)", when);
    return CM_EPG;
}

int ing_store_upkeep(ing_store_t *s) {
    cm_pg_conn_t *c = cm_pg_acquire(s->pg, 5000);
    if (!c) {
        CM_LOG(CM_LOG_WARN, "partition upkeep: postgres unavailable: %s", cm_pg_last_error(s->pg));
        return CM_EPG;
    }
    char err[256];
    int64_t now = cm_wall_ms();
    int rc = ing__load_parts(s, c, err, sizeof err);
    /* Ahead: the current slot and the next, so the hot path never waits for DDL at midnight. */
    if (rc == 0) rc = ing_store_cover(s, c, now, now + s->cfg->partition_ms + s->cfg->max_future_ms, err, sizeof err);
    if (rc) {
        CM_LOG(CM_LOG_WARN, "partition upkeep: %s", err);
        cm_pg_release(s->pg, c);
        return rc;
    }
    /* Retention: whole partitions whose upper bound is older than the horizon. */
    int64_t horizon = now - s->cfg->retention_ms;
    int dropped = 0;
    for (;;) {
        char name[40] = "";
        pthread_mutex_lock(&s->part_mu);
        for (size_t i = 0; i < s->n_parts; i++) {
            if (s->parts[i].to_ms <= horizon && strncmp(s->parts[i].name, "telemetry_p", 11) == 0 &&
                strspn(s->parts[i].name + 11, "0123456789") == strlen(s->parts[i].name + 11)) {
                memcpy(name, s->parts[i].name, sizeof name);
                memmove(&s->parts[i], &s->parts[i + 1], (s->n_parts - i - 1) * sizeof *s->parts);
                s->n_parts--;
                break;
            }
        }
        pthread_mutex_unlock(&s->part_mu);
        if (!*name) break;
        char sql[96];
        snprintf(sql, sizeof sql, "DROP TABLE IF EXISTS %s", name);
        if (cm_pg_exec(c, NULL, sql, 0, NULL)) {
            CM_LOG(CM_LOG_WARN, "retention: dropping %s: %s", name, cm_pg_error(c));
            rc = CM_EPG;
            break;
        }
        cm_log_kv(CM_LOG_INFO, "retention dropped a partition", "partition", name, NULL);
        dropped++;
    }
    cm_pg_release(s->pg, c);
    return rc ? rc : dropped;
}

static int64_t ing__upkeep_loop(void *arg) {
    ing_store_t *s = arg;
    int rc = ing_store_upkeep(s);
    /* Retry sooner after a failure: the next partition may be due. */
    return rc < 0 && s->cfg->maintenance_ms > 5000 ? 5000 : s->cfg->maintenance_ms;
}

int ing_store_start(ing_store_t *s) {
    int applied = 0;
    int rc = cm_pg_migrate(s->pg, s->cfg->migrations, &applied);
    if (rc) return rc;
    rc = ing_store_upkeep(s);
    if (rc < 0) return rc;
    s->upkeep = cm_loop_start(ing__upkeep_loop, s, s->cfg->maintenance_ms);
    return 0;
}

void ing_store_close(ing_store_t *s) {
    cm_loop_stop(s->upkeep);
    s->upkeep = NULL;
    cm_pg_free(s->pg);
    s->pg = NULL;
    cm_free(s->parts);
    s->parts = NULL;
    pthread_mutex_destroy(&s->part_mu);
}

int ing_store_ready(void *store, char *why, size_t len) {
    return cm_pg_check(((ing_store_t *)store)->pg, 1000, why, len);
}

int ing_store_device_seq(ing_store_t *s, const char *device_id, uint64_t *seq, int timeout_ms, char *err,
                         size_t err_cap) {
    cm_pg_conn_t *c = cm_pg_acquire(s->pg, timeout_ms);
    if (!c) {
        snprintf(err, err_cap, "telemetry store unavailable: %s", cm_pg_last_error(s->pg));
        return CM_STATUS_UNAVAILABLE;
    }
    PGresult *r = NULL;
    const char *p[] = {device_id};
    int code = CM_STATUS_OK;
    if (cm_pg_exec(c, &r, "SELECT seq FROM device_seq WHERE device_id = $1", 1, p)) {
        snprintf(err, err_cap, "telemetry store %s: %s", cm_pg_conn_lost(c) ? "unavailable" : "error", cm_pg_error(c));
        code = cm_pg_conn_lost(c) ? CM_STATUS_UNAVAILABLE : CM_STATUS_INTERNAL;
    } else {
        *seq = PQntuples(r) ? strtoull(PQgetvalue(r, 0, 0), NULL, 10) : 0;
        PQclear(r);
    }
    cm_pg_release(s->pg, c);
    return code;
}
