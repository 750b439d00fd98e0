/* PostgreSQL over libpq: a small connection pool, parameterised queries, transactions, COPY, and
 * the migration runner every service uses at start.
 *
 * SQL text is always a constant of the calling service; values travel only as parameters
 * ($1, $2, ...). Results are libpq's PGresult: the caller PQclear()s every result it receives,
 * on every path. Connections found broken are reconnected on the next acquire; a query that fails
 * because the connection dropped is NOT retried here (it may have run): the caller decides.
 *
 * Lifetime: a connection from cm_pg_acquire() belongs to the caller until cm_pg_release(). The pool
 * must outlive every acquired connection. */
#ifndef CM_PG_H
#define CM_PG_H

#include <libpq-fe.h>
#include <stddef.h>

typedef struct cm_pg_s cm_pg_t;
typedef struct cm_pg_conn_s cm_pg_conn_t;

/* conninfo: libpq string or URI. schema: search_path for every connection (NULL: default).
 * size: connections at most. Connects lazily; returns NULL only on bad arguments. */
cm_pg_t *cm_pg_new(const char *conninfo, const char *schema, int size, int *err);
void cm_pg_free(cm_pg_t *pg);

/* Waits up to timeout_ms for a free connection and makes sure it is connected.
 * NULL on timeout or when the server cannot be reached (reason in cm_pg_last_error(pg)). */
cm_pg_conn_t *cm_pg_acquire(cm_pg_t *pg, int timeout_ms);
void cm_pg_release(cm_pg_t *pg, cm_pg_conn_t *c);
/* Why the last acquire failed (thread-unsafe snapshot, for logs and readiness). */
const char *cm_pg_last_error(cm_pg_t *pg);
/* Readiness: 1 when a connection can be had within timeout_ms and answers a query; otherwise 0
 * with "postgres: <reason>" in why. */
int cm_pg_check(cm_pg_t *pg, int timeout_ms, char *why, size_t len);

/* Runs sql with text parameters (NULL entries are SQL NULL). On success returns 0 and, when res is
 * non-NULL, the result (caller PQclear()s); otherwise the result is cleared here. On failure
 * returns CM_EPG; cm_pg_error()/cm_pg_sqlstate() describe it. */
int cm_pg_exec(cm_pg_conn_t *c, PGresult **res, const char *sql, int nparams, const char *const *params);
/* The same with binary values: formats[i] 1 marks params[i] as lengths[i] raw bytes (bytea, or a
 * type's binary send format), 0 as text (formats NULL: all text). binary_result asks for every
 * result column in binary (bytea arrives raw: PQgetlength bytes, no unescaping). */
int cm_pg_exec_bin(cm_pg_conn_t *c, PGresult **res, const char *sql, int nparams, const char *const *params,
                   const int *lengths, const int *formats, int binary_result);
const char *cm_pg_error(const cm_pg_conn_t *c);
const char *cm_pg_sqlstate(const cm_pg_conn_t *c); /* "23505" unique violation, "" if none */
/* 1 when the last error was a lost connection (SQLSTATE class 08, 57P01-57P03 server shutting down
 * or starting, or a dead socket). */
int cm_pg_conn_lost(const cm_pg_conn_t *c);

int cm_pg_begin(cm_pg_conn_t *c);
int cm_pg_commit(cm_pg_conn_t *c);
int cm_pg_rollback(cm_pg_conn_t *c);

/* COPY ... FROM STDIN: begin with the COPY statement, put rows in text format, end to commit the
 * copy (returns CM_EPG if the server rejected a row). */
int cm_pg_copy_begin(cm_pg_conn_t *c, const char *copy_sql);
int cm_pg_copy_put(cm_pg_conn_t *c, const char *buf, size_t len);
int cm_pg_copy_end(cm_pg_conn_t *c);

/* Applies dir's files named <version>_<name>.sql (version: digits) in version order, each once,
 * each in its own transaction, recording them in <schema>.schema_migrations. Concurrent runners
 * (several replicas starting together) serialise on an advisory lock. Returns 0, or CM_EPG /
 * CM_EIO with a log line naming the file. *applied counts files applied now. */
int cm_pg_migrate(cm_pg_t *pg, const char *dir, int *applied);

#endif
