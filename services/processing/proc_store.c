/* processing's Postgres pool, migrations and retention upkeep. */
#include "proc_store.h"

#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>

#include "cm_err.h"
#include "cm_log.h"

int proc_store_open(proc_store_t *s, const proc_config_t *cfg) {
    int err = 0;
    s->cfg = cfg;
    s->upkeep = NULL;
    s->pg = cm_pg_new(cfg->pg_dsn, cfg->pg_schema, (int)cfg->pg_pool, &err);
    return s->pg ? 0 : CM_EINVAL;
}

int64_t proc_store_upkeep(proc_store_t *s) {
    cm_pg_conn_t *c = cm_pg_acquire(s->pg, 5000);
    if (!c) return -1;
    char m1[32], h1[32], ev[32];
    snprintf(m1, sizeof m1, "%" PRId64, s->cfg->rollup_1m_retention_ms);
    snprintf(h1, sizeof h1, "%" PRId64, s->cfg->rollup_1h_retention_ms);
    snprintf(ev, sizeof ev, "%" PRId64, s->cfg->event_retention_ms);
    /* Bucket starts are epoch ms; the cutoff is computed by the server's clock. */
    static const char *const sql[] = {
        "DELETE FROM rollups WHERE res_ms = 60000 AND bucket_ms < (extract(epoch FROM now()) * 1000)::bigint - $1",
        "DELETE FROM rollups WHERE res_ms = 3600000 AND bucket_ms < (extract(epoch FROM now()) * 1000)::bigint - $1",
        "DELETE FROM alert_events WHERE time < now() - $1 * interval '1 millisecond'",
        "DELETE FROM actions WHERE state <> 0 AND update_time < now() - $1 * interval '1 millisecond'",
    };
    const char *args[] = {m1, h1, ev, ev};
    int64_t total = 0;
    for (size_t i = 0; i < sizeof sql / sizeof sql[0]; i++) {
        PGresult *res = NULL;
        const char *p[1] = {args[i]};
        if (cm_pg_exec(c, &res, sql[i], 1, p) != 0) {
            cm_log_kv(CM_LOG_WARN, "upkeep failed", "error", cm_pg_error(c), NULL);
            cm_pg_release(s->pg, c);
            return -1;
        }
        total += strtoll(PQcmdTuples(res), NULL, 10);
        PQclear(res);
    }
    cm_pg_release(s->pg, c);
    return total;
}

static int64_t proc__upkeep_loop(void *arg) {
    proc_store_t *s = arg;
    int64_t rc = proc_store_upkeep(s);
    return rc < 0 && s->cfg->maintenance_ms > 5000 ? 5000 : s->cfg->maintenance_ms;
}

int proc_store_start(proc_store_t *s) {
    int applied = 0;
    int rc = cm_pg_migrate(s->pg, s->cfg->migrations, &applied);
    if (rc) return rc;
    s->upkeep = cm_loop_start(proc__upkeep_loop, s, s->cfg->maintenance_ms);
    return 0;
}

int proc_store_ready(void *store, char *why, size_t len) {
    return cm_pg_check(((proc_store_t *)store)->pg, 1000, why, len);
}

void proc_store_close(proc_store_t *s) {
    cm_loop_stop(s->upkeep);
    s->upkeep = NULL;
    cm_pg_free(s->pg);
    s->pg = NULL;
}
