/* The Postgres and Redis wrappers against the real servers tests/run.sh starts. */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <time.h>

#include "cm_buf.h"
#include "cm_err.h"
#include "cm_pg.h"
#include "cm_redis.h"
#include "test.h"

static cm_pg_t *pg_pool(const char *schema, int size) {
    cm_pg_t *pg = cm_pg_new(test_env("IOT_TEST_PG"), schema, size, NULL);
    ASSERT(pg);
    return pg;
}

static void test_pg_params_are_data(void) {
    cm_pg_t *pg = pg_pool("t_params", 2);
    cm_pg_conn_t *c = cm_pg_acquire(pg, 5000);
    ASSERT(c);
    ASSERT_INT_EQ(cm_pg_exec(c, NULL, "CREATE TABLE IF NOT EXISTS kv (k text PRIMARY KEY, v text)", 0, NULL), 0);
    const char *evil = "x'); DROP TABLE kv; --";
    const char *p[] = {"a", evil};
    ASSERT_INT_EQ(cm_pg_exec(c, NULL, "INSERT INTO kv (k, v) VALUES ($1, $2)", 2, p), 0);
    PGresult *r;
    ASSERT_INT_EQ(cm_pg_exec(c, &r, "SELECT v FROM kv WHERE k = $1", 1, p), 0);
    ASSERT_INT_EQ(PQntuples(r), 1);
    ASSERT_STR_EQ(PQgetvalue(r, 0, 0), evil);
    PQclear(r);
    /* A duplicate key reports its SQLSTATE so services can answer ALREADY_EXISTS. */
    ASSERT_INT_EQ(cm_pg_exec(c, NULL, "INSERT INTO kv (k, v) VALUES ($1, $2)", 2, p), CM_EPG);
    ASSERT_STR_EQ(cm_pg_sqlstate(c), "23505");
    ASSERT(strstr(cm_pg_error(c), "duplicate key"));
    ASSERT(!cm_pg_conn_lost(c));
    /* NULL parameters are SQL NULL. */
    const char *pn[] = {"b", NULL};
    ASSERT_INT_EQ(cm_pg_exec(c, NULL, "INSERT INTO kv (k, v) VALUES ($1, $2)", 2, pn), 0);
    ASSERT_INT_EQ(cm_pg_exec(c, &r, "SELECT v IS NULL FROM kv WHERE k = 'b'", 0, NULL), 0);
    ASSERT_STR_EQ(PQgetvalue(r, 0, 0), "t");
    PQclear(r);
    cm_pg_release(pg, c);
    cm_pg_free(pg);
}

static void test_pg_transactions(void) {
    cm_pg_t *pg = pg_pool("t_tx", 1);
    cm_pg_conn_t *c = cm_pg_acquire(pg, 5000);
    ASSERT_INT_EQ(cm_pg_exec(c, NULL, "CREATE TABLE IF NOT EXISTS n (i int)", 0, NULL), 0);
    ASSERT_INT_EQ(cm_pg_begin(c), 0);
    ASSERT_INT_EQ(cm_pg_exec(c, NULL, "INSERT INTO n VALUES (1)", 0, NULL), 0);
    ASSERT_INT_EQ(cm_pg_rollback(c), 0);
    ASSERT_INT_EQ(cm_pg_begin(c), 0);
    ASSERT_INT_EQ(cm_pg_exec(c, NULL, "INSERT INTO n VALUES (2)", 0, NULL), 0);
    ASSERT_INT_EQ(cm_pg_commit(c), 0);
    /* Released mid-transaction (an error path): the pool rolls it back before reuse. */
    ASSERT_INT_EQ(cm_pg_begin(c), 0);
    ASSERT_INT_EQ(cm_pg_exec(c, NULL, "INSERT INTO n VALUES (3)", 0, NULL), 0);
    cm_pg_release(pg, c);
    c = cm_pg_acquire(pg, 5000);
    PGresult *r;
    ASSERT_INT_EQ(cm_pg_exec(c, &r, "SELECT string_agg(i::text, ',' ORDER BY i) FROM n", 0, NULL), 0);
    ASSERT_STR_EQ(PQgetvalue(r, 0, 0), "2");
    PQclear(r);
    cm_pg_release(pg, c);
    cm_pg_free(pg);
}

static void test_pg_copy(void) {
    cm_pg_t *pg = pg_pool("t_copy", 1);
    cm_pg_conn_t *c = cm_pg_acquire(pg, 5000);
    ASSERT_INT_EQ(cm_pg_exec(c, NULL, "CREATE TABLE IF NOT EXISTS pts (dev text, ts bigint, v double precision)", 0, NULL), 0);
    ASSERT_INT_EQ(cm_pg_copy_begin(c, "COPY pts (dev, ts, v) FROM STDIN"), 0);
    cm_buf_t b = CM_BUF_INIT;
    for (int i = 0; i < 10000; i++) cm_buf_printf(&b, "d%d\t%d\t%d.5\n", i % 10, i, i);
    ASSERT_INT_EQ(cm_pg_copy_put(c, b.data, b.len), 0);
    ASSERT_INT_EQ(cm_pg_copy_end(c), 0);
    cm_buf_free(&b);
    PGresult *r;
    ASSERT_INT_EQ(cm_pg_exec(c, &r, "SELECT count(*), sum(ts) FROM pts", 0, NULL), 0);
    ASSERT_STR_EQ(PQgetvalue(r, 0, 0), "10000");
    ASSERT_STR_EQ(PQgetvalue(r, 0, 1), "49995000");
    PQclear(r);
    /* A bad row fails the whole COPY; nothing from it is stored. */
    ASSERT_INT_EQ(cm_pg_copy_begin(c, "COPY pts (dev, ts, v) FROM STDIN"), 0);
    const char *rows = "ok\t1\t1.0\nbad\tnot-a-number\t2.0\n";
    ASSERT_INT_EQ(cm_pg_copy_put(c, rows, strlen(rows)), 0);
    ASSERT_INT_EQ(cm_pg_copy_end(c), CM_EPG);
    ASSERT_STR_EQ(cm_pg_sqlstate(c), "22P02");
    ASSERT_INT_EQ(cm_pg_exec(c, &r, "SELECT count(*) FROM pts", 0, NULL), 0);
    ASSERT_STR_EQ(PQgetvalue(r, 0, 0), "10000");
    PQclear(r);
    cm_pg_release(pg, c);
    cm_pg_free(pg);
}

static void write_file(const char *dir, const char *name, const char *text) {
    char path[1024];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    FILE *f = fopen(path, "w");
    ASSERT(f);
    fputs(text, f);
    fclose(f);
}

typedef struct mig_arg_s {
    const char *dir, *schema;
    int rc, applied;
} mig_arg_t;

static void *migrate_thread(void *arg) {
    mig_arg_t *m = arg;
    cm_pg_t *pg = cm_pg_new(getenv("IOT_TEST_PG"), m->schema, 1, NULL);
    m->rc = cm_pg_migrate(pg, m->dir, &m->applied);
    cm_pg_free(pg);
    return NULL;
}

static void test_pg_migrations(void) {
    char dir[512];
    snprintf(dir, sizeof dir, "%s/migrations", test_tmpdir());
    mkdir(dir, 0755);
    write_file(dir, "001_devices.sql", "CREATE TABLE devices (id text PRIMARY KEY);\nCREATE INDEX ON devices (id);\n");
    write_file(dir, "002_groups.sql", "CREATE TABLE groups (id text PRIMARY KEY);");
    write_file(dir, "README.md", "not a migration");
    cm_pg_t *pg = pg_pool("t_mig", 1);
    int applied = -1;
    ASSERT_INT_EQ(cm_pg_migrate(pg, dir, &applied), 0);
    ASSERT_INT_EQ(applied, 2);
    ASSERT_INT_EQ(cm_pg_migrate(pg, dir, &applied), 0);
    ASSERT_INT_EQ(applied, 0); /* idempotent */
    write_file(dir, "010_more.sql", "ALTER TABLE devices ADD COLUMN name text;");
    ASSERT_INT_EQ(cm_pg_migrate(pg, dir, &applied), 0);
    ASSERT_INT_EQ(applied, 1);
    /* A failing migration leaves neither its changes nor its record behind. */
    write_file(dir, "011_broken.sql", "CREATE TABLE half (i int); SELECT no_such_function();");
    ASSERT_INT_EQ(cm_pg_migrate(pg, dir, &applied), CM_EPG);
    cm_pg_conn_t *c = cm_pg_acquire(pg, 5000);
    PGresult *r;
    ASSERT_INT_EQ(cm_pg_exec(c, &r, "SELECT count(*) FROM schema_migrations", 0, NULL), 0);
    ASSERT_STR_EQ(PQgetvalue(r, 0, 0), "3");
    PQclear(r);
    ASSERT_INT_EQ(cm_pg_exec(c, &r, "SELECT to_regclass('half') IS NULL", 0, NULL), 0);
    ASSERT_STR_EQ(PQgetvalue(r, 0, 0), "t");
    PQclear(r);
    cm_pg_release(pg, c);
    cm_pg_free(pg);
    char path[1024];
    snprintf(path, sizeof path, "%s/011_broken.sql", dir);
    unlink(path);

}

/* Regression: replicas starting at once on a fresh schema raced in CREATE SCHEMA / CREATE TABLE
 * IF NOT EXISTS and one of them failed to start. Each migration must apply exactly once. */
static void test_pg_migrations_concurrent_replicas(void) {
    char dir[512];
    snprintf(dir, sizeof dir, "%s/migrations-race", test_tmpdir());
    mkdir(dir, 0755);
    write_file(dir, "001_a.sql", "CREATE TABLE a (i int);");
    write_file(dir, "002_b.sql", "CREATE TABLE b (i int);");
    write_file(dir, "003_c.sql", "INSERT INTO a VALUES (1);");
    for (int round = 0; round < 3; round++) {
        char schema[32];
        snprintf(schema, sizeof schema, "t_mig_race_%d", round);
        enum { N = 8 };
        mig_arg_t a[N];
        pthread_t th[N];
        for (int i = 0; i < N; i++) {
            a[i] = (mig_arg_t){dir, schema, -1, 0};
            pthread_create(&th[i], NULL, migrate_thread, &a[i]);
        }
        int total = 0;
        for (int i = 0; i < N; i++) {
            pthread_join(th[i], NULL);
            ASSERT_INT_EQ(a[i].rc, 0);
            total += a[i].applied;
        }
        ASSERT_INT_EQ(total, 3);
    }
}

static void test_pg_pool_bounds(void) {
    cm_pg_t *pg = pg_pool("t_pool", 2);
    cm_pg_conn_t *a = cm_pg_acquire(pg, 1000), *b = cm_pg_acquire(pg, 1000);
    ASSERT(a && b && a != b);
    ASSERT(cm_pg_acquire(pg, 100) == NULL);
    ASSERT(strstr(cm_pg_last_error(pg), "busy"));
    cm_pg_release(pg, a);
    cm_pg_conn_t *c = cm_pg_acquire(pg, 100);
    ASSERT(c == a);
    cm_pg_release(pg, b);
    cm_pg_release(pg, c);
    cm_pg_free(pg);
}

static void test_pg_reconnects_after_backend_killed(void) {
    cm_pg_t *pg = pg_pool("t_reconn", 1), *admin = pg_pool(NULL, 1);
    cm_pg_conn_t *c = cm_pg_acquire(pg, 5000);
    PGresult *r;
    ASSERT_INT_EQ(cm_pg_exec(c, &r, "SELECT pg_backend_pid()::text", 0, NULL), 0);
    char pid[32];
    snprintf(pid, sizeof pid, "%s", PQgetvalue(r, 0, 0));
    PQclear(r);
    cm_pg_conn_t *k = cm_pg_acquire(admin, 5000);
    const char *p[] = {pid};
    ASSERT_INT_EQ(cm_pg_exec(k, NULL, "SELECT pg_terminate_backend($1::int)", 1, p), 0);
    cm_pg_release(admin, k);
    usleep(100000);
    /* The query on the dead connection fails and says so; it is not silently retried. */
    ASSERT_INT_EQ(cm_pg_exec(c, NULL, "SELECT 1", 0, NULL), CM_EPG);
    ASSERT(cm_pg_conn_lost(c));
    cm_pg_release(pg, c);
    c = cm_pg_acquire(pg, 5000);
    ASSERT(c);
    ASSERT_INT_EQ(cm_pg_exec(c, &r, "SELECT current_schema()", 0, NULL), 0);
    ASSERT_STR_EQ(PQgetvalue(r, 0, 0), "t_reconn"); /* search_path restored on reconnect */
    PQclear(r);
    cm_pg_release(pg, c);
    cm_pg_free(pg);
    cm_pg_free(admin);
}

/* A COPY larger than libpq's per-call chunk still arrives whole. */
static void test_pg_copy_large_buffer(void) {
    cm_pg_t *pg = pg_pool("t_copy_big", 1);
    cm_pg_conn_t *c = cm_pg_acquire(pg, 5000);
    ASSERT_INT_EQ(cm_pg_exec(c, NULL, "CREATE TABLE IF NOT EXISTS big (line text)", 0, NULL), 0);
    cm_buf_t b = CM_BUF_INIT;
    for (int i = 0; i < 60000; i++) cm_buf_printf(&b, "line-%08d-padding-padding-padding\n", i);
    ASSERT(b.len > (2u << 20)); /* more than two 1 MiB chunks */
    ASSERT_INT_EQ(cm_pg_copy_begin(c, "COPY big (line) FROM STDIN"), 0);
    ASSERT_INT_EQ(cm_pg_copy_put(c, b.data, b.len), 0);
    ASSERT_INT_EQ(cm_pg_copy_end(c), 0);
    cm_buf_free(&b);
    PGresult *r;
    ASSERT_INT_EQ(cm_pg_exec(c, &r, "SELECT count(*), max(line) FROM big", 0, NULL), 0);
    ASSERT_STR_EQ(PQgetvalue(r, 0, 0), "60000");
    ASSERT_STR_EQ(PQgetvalue(r, 0, 1), "line-00059999-padding-padding-padding");
    PQclear(r);
    cm_pg_release(pg, c);
    cm_pg_free(pg);
}

/* Regression: connecting had no time limit, so a server that accepts but never answers held the
 * caller for minutes. A default connect_timeout applies; the configured one still wins. */
static void test_pg_connect_timeout(void) {
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in sa = {0};
    sa.sin_family = AF_INET;
    sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    ASSERT(bind(fd, (struct sockaddr *)&sa, sizeof sa) == 0);
    ASSERT(listen(fd, 8) == 0);
    socklen_t sl = sizeof sa;
    getsockname(fd, (struct sockaddr *)&sa, &sl);
    char ci[256];
    snprintf(ci, sizeof ci, "host=127.0.0.1 port=%d dbname=x user=postgres connect_timeout=1", ntohs(sa.sin_port));
    struct timespec t0, t1;
    cm_pg_t *pg = cm_pg_new(ci, NULL, 1, NULL);
    clock_gettime(CLOCK_MONOTONIC, &t0);
    ASSERT(cm_pg_acquire(pg, 30000) == NULL);
    clock_gettime(CLOCK_MONOTONIC, &t1);
    ASSERT(t1.tv_sec - t0.tv_sec <= 3);
    ASSERT(strstr(cm_pg_last_error(pg), "timeout"));
    cm_pg_free(pg);
    snprintf(ci, sizeof ci, "host=127.0.0.1 port=%d dbname=x user=postgres", ntohs(sa.sin_port));
    pg = cm_pg_new(ci, NULL, 1, NULL);
    clock_gettime(CLOCK_MONOTONIC, &t0);
    ASSERT(cm_pg_acquire(pg, 30000) == NULL);
    clock_gettime(CLOCK_MONOTONIC, &t1);
    ASSERT(t1.tv_sec - t0.tv_sec <= 8); /* the 5 s default */
    cm_pg_free(pg);
    close(fd);
}

static void test_pg_unreachable(void) {
    char ci[600];
    snprintf(ci, sizeof ci, "host=%s/nonexistent dbname=x user=postgres connect_timeout=2", test_tmpdir());
    cm_pg_t *pg = cm_pg_new(ci, NULL, 1, NULL);
    ASSERT(cm_pg_acquire(pg, 1000) == NULL);
    ASSERT(strlen(cm_pg_last_error(pg)) > 0);
    cm_pg_free(pg);
}

static cm_redis_t *redis_conn(void) {
    cm_redis_t *r = cm_redis_new(test_env("IOT_TEST_REDIS"), 2000, NULL);
    ASSERT(r);
    return r;
}

static void test_redis_argv_is_binary_safe(void) {
    cm_redis_t *r = redis_conn();
    const char val[] = {'a', 0, 'b', '\r', '\n', 'c'};
    const char *argv[] = {"SET", "t:bin", val};
    size_t lens[] = {3, 5, sizeof val};
    redisReply *rep = cm_redis_cmd(r, 3, argv, lens);
    ASSERT(rep && rep->type == REDIS_REPLY_STATUS);
    freeReplyObject(rep);
    rep = cm_redis_cmdv(r, "GET", "t:bin", NULL);
    ASSERT(rep && rep->type == REDIS_REPLY_STRING);
    ASSERT_INT_EQ(rep->len, sizeof val);
    ASSERT(memcmp(rep->str, val, sizeof val) == 0);
    freeReplyObject(rep);
    /* A command error is a reply, not a connection failure. */
    rep = cm_redis_cmdv(r, "LPUSH", "t:bin", "x", NULL);
    ASSERT(rep && rep->type == REDIS_REPLY_ERROR);
    ASSERT(strstr(rep->str, "WRONGTYPE"));
    freeReplyObject(rep);
    cm_redis_free(r);
}

static void test_redis_pipelining(void) {
    cm_redis_t *r = redis_conn();
    redisReply *rep = cm_redis_cmdv(r, "DEL", "t:ctr", NULL);
    freeReplyObject(rep);
    for (int i = 0; i < 1000; i++) {
        const char *argv[] = {"INCR", "t:ctr"};
        ASSERT_INT_EQ(cm_redis_append(r, 2, argv, NULL), 0);
    }
    for (int i = 0; i < 1000; i++) {
        ASSERT_INT_EQ(cm_redis_get_reply(r, &rep), 0);
        ASSERT_INT_EQ(rep->integer, i + 1);
        freeReplyObject(rep);
    }
    cm_redis_free(r);
}

/* Regression: after one failed pipelined read the connection was never re-established, so every
 * later pipeline failed too. */
static void test_redis_pipeline_recovers_after_error(void) {
    cm_redis_t *r = cm_redis_new(test_env("IOT_TEST_REDIS"), 200, NULL);
    const char *blpop[] = {"BLPOP", "t:nothing-here", "2"};
    ASSERT_INT_EQ(cm_redis_append(r, 3, blpop, NULL), 0);
    redisReply *rep = NULL;
    ASSERT_INT_EQ(cm_redis_get_reply(r, &rep), CM_EREDIS); /* 200 ms timeout < 2 s block */
    ASSERT(rep == NULL);
    const char *echo[] = {"ECHO", "again"};
    ASSERT_INT_EQ(cm_redis_append(r, 2, echo, NULL), 0);
    ASSERT_INT_EQ(cm_redis_get_reply(r, &rep), 0);
    ASSERT_STR_EQ(rep->str, "again");
    freeReplyObject(rep);
    /* A plain command while pipelined replies are unread is refused, not answered with them. */
    ASSERT_INT_EQ(cm_redis_append(r, 2, echo, NULL), 0);
    ASSERT(cm_redis_cmdv(r, "PING", NULL) == NULL);
    ASSERT(strstr(cm_redis_error(r), "pipelined"));
    ASSERT_INT_EQ(cm_redis_get_reply(r, &rep), 0);
    freeReplyObject(rep);
    ASSERT_INT_EQ(cm_redis_ping(r), 0);
    cm_redis_free(r);
}

static void test_redis_reconnects(void) {
    cm_redis_t *r = redis_conn(), *admin = redis_conn();
    ASSERT_INT_EQ(cm_redis_ping(r), 0);
    redisReply *rep = cm_redis_cmdv(r, "CLIENT", "SETNAME", "victim", NULL);
    freeReplyObject(rep);
    rep = cm_redis_cmdv(admin, "CLIENT", "KILL", "SKIPME", "yes", "TYPE", "normal", NULL);
    freeReplyObject(rep);
    /* The next command sees the dead connection; the one after reconnects. */
    rep = cm_redis_cmdv(r, "PING", NULL);
    if (rep) freeReplyObject(rep);
    ASSERT(rep == NULL);
    ASSERT(strlen(cm_redis_error(r)) > 0);
    ASSERT_INT_EQ(cm_redis_ping(r), 0);
    cm_redis_free(r);
    cm_redis_free(admin);
}

static void test_redis_pool_drops_unread_pipeline(void) {
    cm_redis_pool_t *p = cm_redis_pool_new(test_env("IOT_TEST_REDIS"), 1, 2000, NULL);
    ASSERT(p);
    cm_redis_t *r = cm_redis_pool_acquire(p, 1000);
    ASSERT(r);
    ASSERT(cm_redis_pool_acquire(p, 50) == NULL);
    const char *argv[] = {"ECHO", "stale"};
    cm_redis_append(r, 2, argv, NULL);
    cm_redis_pool_release(p, r);
    r = cm_redis_pool_acquire(p, 1000);
    redisReply *rep = cm_redis_cmdv(r, "ECHO", "fresh", NULL);
    ASSERT(rep);
    ASSERT_STR_EQ(rep->str, "fresh");
    freeReplyObject(rep);
    cm_redis_pool_release(p, r);
    cm_redis_pool_free(p);
}

static void test_redis_bad_address(void) {
    int err = 0;
    ASSERT(cm_redis_new("no-port", 100, &err) == NULL);
    ASSERT_INT_EQ(err, CM_EINVAL);
    cm_redis_t *r = cm_redis_new("127.0.0.1:1", 200, NULL);
    ASSERT(cm_redis_cmdv(r, "PING", NULL) == NULL);
    ASSERT(strstr(cm_redis_error(r), "127.0.0.1:1"));
    cm_redis_free(r);
}

TEST_MAIN(TEST_ENTRY(test_pg_params_are_data), TEST_ENTRY(test_pg_transactions), TEST_ENTRY(test_pg_copy),
          TEST_ENTRY(test_pg_migrations), TEST_ENTRY(test_pg_migrations_concurrent_replicas),
          TEST_ENTRY(test_pg_pool_bounds),
          TEST_ENTRY(test_pg_reconnects_after_backend_killed), TEST_ENTRY(test_pg_copy_large_buffer),
          TEST_ENTRY(test_pg_connect_timeout), TEST_ENTRY(test_pg_unreachable),
          TEST_ENTRY(test_redis_argv_is_binary_safe), TEST_ENTRY(test_redis_pipelining),
          TEST_ENTRY(test_redis_pipeline_recovers_after_error), TEST_ENTRY(test_redis_reconnects), TEST_ENTRY(test_redis_pool_drops_unread_pipeline),
          TEST_ENTRY(test_redis_bad_address))
