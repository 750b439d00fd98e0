/* libpq wrapper: pool, queries, transactions, COPY, migrations. */
#include "cm_pg.h"
#include "cm_alloc.h"
#include "cm_buf.h"
#include "cm_err.h"
#include "cm_log.h"
#include "cm_time.h"

#include <dirent.h>
#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

struct cm_pg_conn_s {
    PGconn *conn;
    int in_use;
    int lost;
    char sqlstate[6];
    char err[512];
};

struct cm_pg_s {
    char *conninfo;
    char *schema;
    int size;
    cm_pg_conn_t *conns;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    char last_error[512];
};

static void cm__pg_set_err(cm_pg_conn_t *c, const char *msg, const char *state) {
    snprintf(c->err, sizeof c->err, "%s", msg ? msg : "");
    /* libpq messages end with a newline; logs want one line. */
    size_t n = strlen(c->err);
    while (n && (c->err[n - 1] == '\n' || c->err[n - 1] == ' ')) c->err[--n] = '\0';
    snprintf(c->sqlstate, sizeof c->sqlstate, "%s", state ? state : "");
    /* Class 08 (connection exception) and 57P01..57P03 (the server is shutting down, crashed or
     * starting): the server is out of reach, not the statement at fault; callers answer UNAVAILABLE. */
    c->lost = (state && (strncmp(state, "08", 2) == 0 || strcmp(state, "57P01") == 0 || strcmp(state, "57P02") == 0 ||
                         strcmp(state, "57P03") == 0)) ||
              !c->conn || PQstatus(c->conn) == CONNECTION_BAD;
}

cm_pg_t *cm_pg_new(const char *conninfo, const char *schema, int size, int *err) {
    if (!conninfo || size <= 0) {
        if (err) *err = CM_EINVAL;
        return NULL;
    }
    cm_pg_t *pg = cm_calloc(1, sizeof *pg);
    pg->conninfo = cm_strdup(conninfo);
    pg->schema = schema && *schema ? cm_strdup(schema) : NULL;
    pg->size = size;
    pg->conns = cm_calloc((size_t)size, sizeof *pg->conns);
    pthread_mutex_init(&pg->mu, NULL);
    cm_cond_init_monotonic(&pg->cv);
    if (err) *err = 0;
    return pg;
}

void cm_pg_free(cm_pg_t *pg) {
    if (!pg) return;
    for (int i = 0; i < pg->size; i++)
        if (pg->conns[i].conn) PQfinish(pg->conns[i].conn);
    cm_free(pg->conns);
    cm_free(pg->conninfo);
    cm_free(pg->schema);
    pthread_mutex_destroy(&pg->mu);
    pthread_cond_destroy(&pg->cv);
    cm_free(pg);
}

const char *cm_pg_last_error(cm_pg_t *pg) { return pg->last_error; }

/* Runs a fixed statement of ours (no parameters) with the simple-query protocol. */
static int cm__pg_simple(cm_pg_conn_t *c, const char *sql) {
    PGresult *r = PQexec(c->conn, sql);
    ExecStatusType st = PQresultStatus(r);
    int ok = st == PGRES_COMMAND_OK || st == PGRES_TUPLES_OK;
    if (!ok) cm__pg_set_err(c, PQresultErrorMessage(r), PQresultErrorField(r, PG_DIAG_SQLSTATE));
    PQclear(r);
    return ok ? 0 : CM_EPG;
}

static void cm__pg_ignore_notice(void *arg, const char *msg) {
    (void)arg;
    (void)msg;
}

/* Makes sure c is connected, with the pool's search_path. */
static int cm__pg_connect(cm_pg_t *pg, cm_pg_conn_t *c) {
    if (c->conn && PQstatus(c->conn) == CONNECTION_OK && PQtransactionStatus(c->conn) == PQTRANS_IDLE) return 0;
    if (c->conn) {
        /* Broken, or left inside a transaction by a caller that bailed out: start clean. */
        PQfinish(c->conn);
        c->conn = NULL;
    }
    /* Defaults first, the configured string after: its own settings win. Without a connect
     * timeout an unreachable host would hold a handler (or readiness) for minutes. */
    const char *const keys[] = {"connect_timeout", "keepalives", "keepalives_idle", "dbname", NULL};
    const char *const vals[] = {"5", "1", "30", pg->conninfo, NULL};
    c->conn = PQconnectdbParams(keys, vals, 1);
    if (PQstatus(c->conn) != CONNECTION_OK) {
        cm__pg_set_err(c, PQerrorMessage(c->conn), "08001");
        PQfinish(c->conn);
        c->conn = NULL;
        return CM_EPG;
    }
    /* Server notices ("schema already exists, skipping") are not errors: keep them off stderr. */
    PQsetNoticeProcessor(c->conn, cm__pg_ignore_notice, NULL);
    if (pg->schema) {
        /* Identifiers cannot be parameters; the schema name comes from the service's own
         * configuration and is quoted by libpq. */
        char *ident = PQescapeIdentifier(c->conn, pg->schema, strlen(pg->schema));
        cm_buf_t create = CM_BUF_INIT, set = CM_BUF_INIT;
        cm_buf_printf(&create, "CREATE SCHEMA IF NOT EXISTS %s", ident);
        cm_buf_printf(&set, "SET search_path TO %s", ident);
        PQfreemem(ident);
        int rc = cm__pg_simple(c, create.data);
        /* IF NOT EXISTS still races with another session creating it: that one won, fine. */
        if (rc && (strcmp(c->sqlstate, "23505") == 0 || strcmp(c->sqlstate, "42P06") == 0)) rc = 0;
        if (rc == 0) rc = cm__pg_simple(c, set.data);
        cm_buf_free(&create);
        cm_buf_free(&set);
        if (rc) {
            PQfinish(c->conn);
            c->conn = NULL;
            return CM_EPG;
        }
    }
    c->lost = 0;
    return 0;
}

cm_pg_conn_t *cm_pg_acquire(cm_pg_t *pg, int timeout_ms) {
    struct timespec until;
    cm_abstime_in(&until, timeout_ms);
    pthread_mutex_lock(&pg->mu);
    cm_pg_conn_t *c = NULL;
    for (int timed_out = 0;;) {
        /* Prefer a connection that is already open. */
        for (int i = 0; i < pg->size && !c; i++)
            if (!pg->conns[i].in_use && pg->conns[i].conn) c = &pg->conns[i];
        for (int i = 0; i < pg->size && !c; i++)
            if (!pg->conns[i].in_use) c = &pg->conns[i];
        if (c) break;
        /* Scan once more after a timeout: a release may have landed at the deadline. */
        if (!timed_out) {
            timed_out = pthread_cond_timedwait(&pg->cv, &pg->mu, &until) == ETIMEDOUT;
            continue;
        }
        snprintf(pg->last_error, sizeof pg->last_error, "all %d postgres connections busy for %d ms", pg->size,
                 timeout_ms);
        pthread_mutex_unlock(&pg->mu);
        return NULL;
    }
    c->in_use = 1;
    pthread_mutex_unlock(&pg->mu);
    /* Connecting happens outside the pool lock: it can take a network round trip or a timeout. */
    if (cm__pg_connect(pg, c) != 0) {
        pthread_mutex_lock(&pg->mu);
        snprintf(pg->last_error, sizeof pg->last_error, "%s", c->err);
        c->in_use = 0;
        pthread_cond_signal(&pg->cv);
        pthread_mutex_unlock(&pg->mu);
        return NULL;
    }
    c->err[0] = '\0';
    c->sqlstate[0] = '\0';
    return c;
}

void cm_pg_release(cm_pg_t *pg, cm_pg_conn_t *c) {
    if (!c) return;
    if (c->conn && PQtransactionStatus(c->conn) != PQTRANS_IDLE) {
        /* A caller returned mid-transaction (an error path): never hand that state to the next user. */
        PGresult *r = PQexec(c->conn, "ROLLBACK");
        PQclear(r);
    }
    pthread_mutex_lock(&pg->mu);
    c->in_use = 0;
    pthread_cond_signal(&pg->cv);
    pthread_mutex_unlock(&pg->mu);
}

int cm_pg_exec(cm_pg_conn_t *c, PGresult **res, const char *sql, int nparams, const char *const *params) {
    return cm_pg_exec_bin(c, res, sql, nparams, params, NULL, NULL, 0);
}

int cm_pg_exec_bin(cm_pg_conn_t *c, PGresult **res, const char *sql, int nparams, const char *const *params,
                   const int *lengths, const int *formats, int binary_result) {
    if (res) *res = NULL;
    PGresult *r = PQexecParams(c->conn, sql, nparams, NULL, params, lengths, formats, binary_result ? 1 : 0);
    ExecStatusType st = PQresultStatus(r);
    if (st == PGRES_COMMAND_OK || st == PGRES_TUPLES_OK || st == PGRES_COPY_IN) {
        if (res)
            *res = r;
        else
            PQclear(r);
        return 0;
    }
    cm__pg_set_err(c, r ? PQresultErrorMessage(r) : PQerrorMessage(c->conn),
                   r ? PQresultErrorField(r, PG_DIAG_SQLSTATE) : NULL);
    if (!c->err[0]) cm__pg_set_err(c, PQerrorMessage(c->conn), c->sqlstate);
    PQclear(r);
    return CM_EPG;
}

const char *cm_pg_error(const cm_pg_conn_t *c) { return c->err; }
const char *cm_pg_sqlstate(const cm_pg_conn_t *c) { return c->sqlstate; }
int cm_pg_conn_lost(const cm_pg_conn_t *c) { return c->lost; }

int cm_pg_check(cm_pg_t *pg, int timeout_ms, char *why, size_t len) {
    cm_pg_conn_t *c = cm_pg_acquire(pg, timeout_ms);
    if (!c) {
        snprintf(why, len, "postgres: %s", cm_pg_last_error(pg));
        return 0;
    }
    int ok = cm_pg_exec(c, NULL, "SELECT 1", 0, NULL) == 0;
    if (!ok) snprintf(why, len, "postgres: %s", cm_pg_error(c));
    cm_pg_release(pg, c);
    return ok;
}

int cm_pg_begin(cm_pg_conn_t *c) { return cm_pg_exec(c, NULL, "BEGIN", 0, NULL); }
int cm_pg_commit(cm_pg_conn_t *c) { return cm_pg_exec(c, NULL, "COMMIT", 0, NULL); }
int cm_pg_rollback(cm_pg_conn_t *c) { return cm_pg_exec(c, NULL, "ROLLBACK", 0, NULL); }

int cm_pg_copy_begin(cm_pg_conn_t *c, const char *copy_sql) {
    PGresult *r = PQexec(c->conn, copy_sql);
    int ok = PQresultStatus(r) == PGRES_COPY_IN;
    if (!ok) cm__pg_set_err(c, PQresultErrorMessage(r), PQresultErrorField(r, PG_DIAG_SQLSTATE));
    PQclear(r);
    return ok ? 0 : CM_EPG;
}

int cm_pg_copy_put(cm_pg_conn_t *c, const char *buf, size_t len) {
    /* PQputCopyData takes an int length: feed large buffers in pieces. */
    while (len > 0) {
        int n = len > (1u << 20) ? (1 << 20) : (int)len;
        if (PQputCopyData(c->conn, buf, n) != 1) {
            cm__pg_set_err(c, PQerrorMessage(c->conn), NULL);
            return CM_EPG;
        }
        buf += n;
        len -= (size_t)n;
    }
    return 0;
}

int cm_pg_copy_end(cm_pg_conn_t *c) {
    if (PQputCopyEnd(c->conn, NULL) != 1) {
        cm__pg_set_err(c, PQerrorMessage(c->conn), NULL);
        return CM_EPG;
    }
    int rc = 0;
    PGresult *r;
    while ((r = PQgetResult(c->conn))) {
        if (PQresultStatus(r) != PGRES_COMMAND_OK) {
            cm__pg_set_err(c, PQresultErrorMessage(r), PQresultErrorField(r, PG_DIAG_SQLSTATE));
            rc = CM_EPG;
        }
        PQclear(r);
    }
    return rc;
}

/* ---- migrations ------------------------------------------------------------------------ */

typedef struct cm__migration_s {
    long version;
    char *name;
    char *path;
} cm__migration_t;

static int cm__migration_cmp(const void *a, const void *b) {
    long x = ((const cm__migration_t *)a)->version, y = ((const cm__migration_t *)b)->version;
    return (x > y) - (x < y);
}

static char *cm__slurp(const char *path) {
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    cm_buf_t b = CM_BUF_INIT;
    char chunk[4096];
    size_t n;
    while ((n = fread(chunk, 1, sizeof chunk, f)) > 0) cm_buf_append(&b, chunk, n);
    fclose(f);
    if (!b.data) cm_buf_puts(&b, "");
    return b.data;
}

/* Lists <digits>_<name>.sql files in dir, sorted by version; CM_EINVAL on duplicate versions. */
static int cm__migrations_list(const char *dir, cm__migration_t **out, size_t *n) {
    DIR *d = opendir(dir);
    *out = NULL;
    *n = 0;
    if (!d) {
        CM_LOG(CM_LOG_ERROR, "migrations: cannot open directory %s", dir);
        return CM_EIO;
    }
    size_t cap = 0;
    struct dirent *e;
    while ((e = readdir(d))) {
        const char *nm = e->d_name;
        size_t len = strlen(nm);
        char *end;
        long v = strtol(nm, &end, 10);
        if (end == nm || *end != '_' || len < 5 || strcmp(nm + len - 4, ".sql") != 0) continue;
        if (*n == cap) *out = cm_realloc(*out, (cap = cap ? cap * 2 : 8) * sizeof **out);
        cm_buf_t p = CM_BUF_INIT;
        cm_buf_printf(&p, "%s/%s", dir, nm);
        (*out)[*n].version = v;
        (*out)[*n].name = cm_strdup(nm);
        (*out)[*n].path = p.data;
        (*n)++;
    }
    closedir(d);
    qsort(*out, *n, sizeof **out, cm__migration_cmp);
    for (size_t i = 1; i < *n; i++)
        if ((*out)[i].version == (*out)[i - 1].version) {
            CM_LOG(CM_LOG_ERROR, "migrations: %s and %s share version %ld", (*out)[i - 1].name, (*out)[i].name,
                   (*out)[i].version);
            return CM_EINVAL;
        }
    return 0;
}

static void cm__migrations_free(cm__migration_t *m, size_t n) {
    for (size_t i = 0; i < n; i++) {
        cm_free(m[i].name);
        cm_free(m[i].path);
    }
    cm_free(m);
}

static int cm__migrate_one(cm_pg_conn_t *c, const char *lock_key, const cm__migration_t *m, int *applied) {
    char ver[32];
    snprintf(ver, sizeof ver, "%ld", m->version);
    const char *lock_params[] = {lock_key};
    const char *ver_params[] = {ver, m->name};
    PGresult *r = NULL;
    if (cm_pg_begin(c)) return CM_EPG;
    /* Replicas starting together wait here; the check below then sees what the winner applied. */
    if (cm_pg_exec(c, NULL, "SELECT pg_advisory_xact_lock(hashtext($1))", 1, lock_params)) goto fail;
    if (cm_pg_exec(c, &r, "SELECT 1 FROM schema_migrations WHERE version = $1", 1, ver_params)) goto fail;
    int done = PQntuples(r) > 0;
    PQclear(r);
    if (done) return cm_pg_rollback(c);
    char *sql = cm__slurp(m->path);
    if (!sql) {
        CM_LOG(CM_LOG_ERROR, "migrations: cannot read %s", m->path);
        cm_pg_rollback(c);
        return CM_EIO;
    }
    /* A migration file is several statements of our own, so it goes through the simple-query
     * protocol; it never contains request data. */
    int bad = cm__pg_simple(c, sql);
    cm_free(sql);
    if (bad) goto fail;
    if (cm_pg_exec(c, NULL, "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)", 2, ver_params)) goto fail;
    if (cm_pg_commit(c)) goto fail;
    (*applied)++;
    cm_log_kv(CM_LOG_INFO, "migration applied", "file", m->name, NULL);
    return 0;
fail:
    CM_LOG(CM_LOG_ERROR, "migration %s failed: %s", m->name, cm_pg_error(c));
    cm__pg_simple(c, "ROLLBACK");
    return CM_EPG;
}

int cm_pg_migrate(cm_pg_t *pg, const char *dir, int *applied) {
    int dummy;
    if (!applied) applied = &dummy;
    *applied = 0;
    cm__migration_t *m;
    size_t n;
    int rc = cm__migrations_list(dir, &m, &n);
    if (rc) {
        cm__migrations_free(m, n);
        return rc;
    }
    cm_pg_conn_t *c = cm_pg_acquire(pg, 10000);
    if (!c) {
        CM_LOG(CM_LOG_ERROR, "migrations: no postgres connection: %s", cm_pg_last_error(pg));
        cm__migrations_free(m, n);
        return CM_EPG;
    }
    const char *lock_key = pg->schema ? pg->schema : "public";
    const char *lock_params[] = {lock_key};
    /* Under the same advisory lock as the migrations: concurrent CREATE TABLE IF NOT EXISTS can
     * otherwise fail on the catalog's unique index when replicas start together. */
    rc = cm_pg_begin(c);
    if (!rc) rc = cm_pg_exec(c, NULL, "SELECT pg_advisory_xact_lock(hashtext($1))", 1, lock_params);
    if (!rc)
        rc = cm_pg_exec(c, NULL,
                        "CREATE TABLE IF NOT EXISTS schema_migrations ("
                        " version bigint PRIMARY KEY, name text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())",
                        0, NULL);
    if (!rc) rc = cm_pg_commit(c);
    if (rc) {
        CM_LOG(CM_LOG_ERROR, "migrations: cannot create schema_migrations: %s", cm_pg_error(c));
        cm__pg_simple(c, "ROLLBACK");
    }
    for (size_t i = 0; i < n && rc == 0; i++) rc = cm__migrate_one(c, lock_key, &m[i], applied);
    cm_pg_release(pg, c);
    cm__migrations_free(m, n);
    return rc;
}
