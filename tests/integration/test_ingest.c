/* The ingest binary with a real device-mgmt, Postgres and Redis from tests/run.sh: push codes and
 * all-or-nothing batches, resends and stream resumption, kill -9 under load, a Postgres outage
 * under load, retention and aggregations on a known fixture, presence and the Redis stream
 * contract. Every test has its own schemas and key prefixes. The loaders record what was
 * acknowledged; the checks compare the telemetry table with that, point by point. */
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <libpq-fe.h>

#include "cm_err.h"
#include "cm_map.h"
#include "cm_redis.h"
#include "cm_rpc.h"
#include "grpc/health/v1/health.pb-c.h"
#include "iot/device/v1/device.pb-c.h"
#include "iot/ingest/v1/ingest.pb-c.h"
#include "proc.h"
#include "test.h"

#define ING "/iot.ingest.v1.Ingest/"

typedef struct svc_s {
    test_proc_t p;
    cm_channel_t *ch;
} svc_t;

static char dm_schema[96], dm_prefix[96], ing_schema[96], ing_prefix[96], ing_schema_name[64], stream_prefix[64];

static void fresh_names(const char *name) {
    snprintf(dm_schema, sizeof dm_schema, "IOT_DM_PG_SCHEMA=ti_dm_%s_%d", name, (int)getpid());
    snprintf(dm_prefix, sizeof dm_prefix, "IOT_DM_REDIS_PREFIX={ti-%s-%d}:", name, (int)getpid());
    snprintf(ing_schema_name, sizeof ing_schema_name, "ti_ing_%s_%d", name, (int)getpid());
    snprintf(ing_schema, sizeof ing_schema, "IOT_INGEST_PG_SCHEMA=%s", ing_schema_name);
    snprintf(stream_prefix, sizeof stream_prefix, "ti-%s-%d:", name, (int)getpid());
    snprintf(ing_prefix, sizeof ing_prefix, "IOT_INGEST_STREAM_PREFIX=%s", stream_prefix);
}

static void svc_connect(svc_t *s) {
    char target[64];
    snprintf(target, sizeof target, "127.0.0.1:%d", s->p.grpc_port);
    s->ch = cm_channel_new(target, NULL, NULL);
}

static void dm_start(svc_t *d) {
    static char bin[1024], pg_env[1024], redis_env[128];
    snprintf(bin, sizeof bin, "%s/services/device-mgmt/device-mgmt", test_env("IOT_BUILD_DIR"));
    snprintf(pg_env, sizeof pg_env, "IOT_PG_DSN=%s", test_env("IOT_TEST_PG"));
    snprintf(redis_env, sizeof redis_env, "IOT_REDIS_ADDR=%s", test_env("IOT_TEST_REDIS"));
    char *argv[] = {bin, NULL};
    const char *env[] = {pg_env, redis_env, "IOT_DM_MIGRATIONS=services/device-mgmt/migrations", dm_schema, dm_prefix,
                         "IOT_GRPC_LISTEN=127.0.0.1:0", "IOT_ADMIN_LISTEN=127.0.0.1:0", NULL};
    ASSERT_INT_EQ(test_proc_start(&d->p, argv, env, 1), 0);
    svc_connect(d);
}

/* extra: up to four more "K=V" settings. */
static void ing_start(svc_t *s, int dm_port, const char *const *extra) {
    static char bin[1024], pg_env[1024], redis_env[128], dm_env[64];
    snprintf(bin, sizeof bin, "%s/services/ingest/ingest", test_env("IOT_BUILD_DIR"));
    snprintf(pg_env, sizeof pg_env, "IOT_PG_DSN=%s", test_env("IOT_TEST_PG"));
    snprintf(redis_env, sizeof redis_env, "IOT_REDIS_ADDR=%s", test_env("IOT_TEST_REDIS"));
    snprintf(dm_env, sizeof dm_env, "IOT_INGEST_DM_ADDR=127.0.0.1:%d", dm_port);
    char *argv[] = {bin, NULL};
    const char *env[16] = {pg_env, redis_env, dm_env, "IOT_INGEST_MIGRATIONS=services/ingest/migrations", ing_schema,
                           ing_prefix, "IOT_GRPC_LISTEN=127.0.0.1:0", "IOT_ADMIN_LISTEN=127.0.0.1:0",
                           "IOT_INGEST_PRESENCE_INTERVAL=200ms"};
    int n = 9;
    for (int i = 0; extra && extra[i] && n < 15; i++) env[n++] = extra[i];
    env[n] = NULL;
    ASSERT_INT_EQ(test_proc_start(&s->p, argv, env, 1), 0);
    svc_connect(s);
}

static void svc_stop(svc_t *s) {
    cm_channel_free(s->ch);
    s->ch = NULL;
    test_proc_kill(&s->p, SIGTERM);
    ASSERT_INT_EQ(test_proc_wait(&s->p, 20000), 0);
}

static void pbfree(void *m) {
    if (m) protobuf_c_message_free_unpacked(m, NULL);
}

static char last_msg[512];
static char last_retry[32];

static int unary(cm_channel_t *ch, const char *path, const void *req, const ProtobufCMessageDescriptor *desc,
                 void *resp, const char *token) {
    cm_rpc_status_t st = {0};
    char auth[256];
    cm_md_t md = {"authorization", auth, 0};
    if (token) snprintf(auth, sizeof auth, "Bearer %s", token);
    cm_call_opts_t o = {.timeout_ms = 30000, .md = token ? &md : NULL, .n_md = token ? 1 : 0};
    int code = cm_channel_unary(ch, path, req, desc, (ProtobufCMessage **)resp, &o, &st);
    snprintf(last_msg, sizeof last_msg, "%s", st.message);
    const char *r = cm_rpc_status_md(&st, "retry-after-ms");
    snprintf(last_retry, sizeof last_retry, "%s", r ? r : "");
    cm_rpc_status_clear(&st);
    return code;
}

/* Creates devices dev-<tag>-0..n-1 and returns their tokens (caller frees each and the array). */
static char **make_devices(svc_t *dm, const char *tag, int n) {
    Iot__Device__V1__Device *devs = calloc((size_t)n, sizeof *devs);
    Iot__Device__V1__Device **ptrs = calloc((size_t)n, sizeof *ptrs);
    char (*ids)[64] = calloc((size_t)n, 64);
    for (int i = 0; i < n; i++) {
        iot__device__v1__device__init(&devs[i]);
        snprintf(ids[i], 64, "dev-%s-%d", tag, i);
        devs[i].id = ids[i];
        devs[i].name = ids[i];
        ptrs[i] = &devs[i];
    }
    Iot__Device__V1__BatchCreateDevicesRequest req = IOT__DEVICE__V1__BATCH_CREATE_DEVICES_REQUEST__INIT;
    req.n_devices = (size_t)n;
    req.devices = ptrs;
    Iot__Device__V1__BatchCreateDevicesResponse *resp = NULL;
    int code = unary(dm->ch, "/iot.device.v1.DeviceManager/BatchCreateDevices", &req,
                     &iot__device__v1__batch_create_devices_response__descriptor, &resp, NULL);
    pbfree(resp);
    char **tokens = calloc((size_t)n, sizeof *tokens);
    for (int i = 0; code == 0 && i < n; i++) {
        Iot__Device__V1__IssueTokenRequest treq = IOT__DEVICE__V1__ISSUE_TOKEN_REQUEST__INIT;
        treq.device_id = ids[i];
        Iot__Device__V1__IssueTokenResponse *tr = NULL;
        code = unary(dm->ch, "/iot.device.v1.DeviceManager/IssueToken", &treq,
                     &iot__device__v1__issue_token_response__descriptor, &tr, NULL);
        if (tr) tokens[i] = strdup(tr->token);
        pbfree(tr);
    }
    free(devs);
    free(ptrs);
    free(ids);
    if (code) TEST__FAIL("creating devices: %d %s", code, last_msg);
    return tokens;
}

static void free_tokens(char **t, int n) {
    for (int i = 0; i < n; i++) free(t[i]);
    free(t);
}

/* Fresh names for a test, device-mgmt started, n devices with tokens (dev-<tag>-<i>). */
static char **start_dm(const char *tag, int n, svc_t *dm) {
    fresh_names(tag);
    dm_start(dm);
    return make_devices(dm, tag, n);
}

static void stop_all(svc_t *dm, svc_t *in, char **tok, int n) {
    free_tokens(tok, n);
    svc_stop(in);
    svc_stop(dm);
}

static int64_t now_ms(void) {
    struct timespec t;
    clock_gettime(CLOCK_REALTIME, &t);
    return (int64_t)t.tv_sec * 1000 + t.tv_nsec / 1000000;
}

/* The value a loader sends for seq: recomputable by the checks. */
static double value_of(uint64_t seq) { return (double)(seq % 1000) * 0.5; }

/* Points seq first..first+n-1 of one device into a request (storage owned by the caller). */
typedef struct pts_s {
    Iot__Ingest__V1__Point p[1000];
    Iot__Ingest__V1__Point *ptrs[1000];
} pts_t;

static void fill(pts_t *b, uint64_t first, size_t n, int64_t t0) {
    for (size_t i = 0; i < n; i++) {
        iot__ingest__v1__point__init(&b->p[i]);
        b->p[i].seq = first + i;
        b->p[i].metric = (char *)"temp";
        b->p[i].time_ms = t0 + (int64_t)i;
        b->p[i].value_case = IOT__INGEST__V1__POINT__VALUE_DOUBLE_VALUE;
        b->p[i].double_value = value_of(first + i);
        b->ptrs[i] = &b->p[i];
    }
}

static int push(cm_channel_t *ch, const char *token, pts_t *b, size_t n, Iot__Ingest__V1__TelemetryAck **ack) {
    Iot__Ingest__V1__PushTelemetryRequest req = IOT__INGEST__V1__PUSH_TELEMETRY_REQUEST__INIT;
    req.n_points = n;
    req.points = b->ptrs;
    *ack = NULL;
    return unary(ch, ING "PushTelemetry", &req, &iot__ingest__v1__telemetry_ack__descriptor, ack, token);
}

/* ---- direct Postgres checks ---------------------------------------------------------------- */

static PGconn *pg_open(void) {
    PGconn *c = PQconnectdb(test_env("IOT_TEST_PG"));
    ASSERT(PQstatus(c) == CONNECTION_OK);
    char sql[160];
    snprintf(sql, sizeof sql, "SET search_path TO %s", ing_schema_name);
    PQclear(PQexec(c, sql));
    return c;
}

/* One integer from a query with one text parameter. */
static long long pg_int(PGconn *c, const char *sql, const char *param) {
    const char *p[] = {param};
    PGresult *r = PQexecParams(c, sql, param ? 1 : 0, NULL, p, NULL, NULL, 0);
    if (PQresultStatus(r) != PGRES_TUPLES_OK || PQntuples(r) != 1) {
        fprintf(stdout, "    query failed: %s\n", PQresultErrorMessage(r));
        PQclear(r);
        return -1;
    }
    long long v = PQgetisnull(r, 0, 0) ? 0 : atoll(PQgetvalue(r, 0, 0));
    PQclear(r);
    return v;
}

/* The device's rows are exactly seq 1..acked, once each, with the loader's values. */
static void check_exact(PGconn *c, const char *device, uint64_t acked) {
    long long n = pg_int(c, "SELECT count(*) FROM telemetry WHERE device_id = $1", device);
    long long distinct = pg_int(c, "SELECT count(DISTINCT seq) FROM telemetry WHERE device_id = $1", device);
    long long mx = pg_int(c, "SELECT max(seq) FROM telemetry WHERE device_id = $1", device);
    long long sum = pg_int(c, "SELECT sum(seq) FROM telemetry WHERE device_id = $1", device);
    long long vsum2 = pg_int(c, "SELECT (sum(v_double) * 2)::bigint FROM telemetry WHERE device_id = $1", device);
    long long want_v2 = 0;
    for (uint64_t s = 1; s <= acked; s++) want_v2 += (long long)(value_of(s) * 2);
    if (n != (long long)acked || distinct != n || mx != (long long)acked ||
        sum != (long long)(acked * (acked + 1) / 2) || vsum2 != want_v2)
        TEST__FAIL("%s: rows %lld distinct %lld max %lld sum %lld vsum2 %lld; acked %llu (want vsum2 %lld)", device, n,
                   distinct, mx, sum, vsum2, (unsigned long long)acked, want_v2);
}

/* ---- tests --------------------------------------------------------------------------------- */

static void test_push_codes_and_nothing_partial(void) {
    svc_t dm, in;
    char **tok = start_dm("codes", 2, &dm);
    const char *extra[] = {"IOT_INGEST_AUTH_CACHE_TTL=0", "IOT_INGEST_RATE_LIMIT=1000", NULL};
    ing_start(&in, dm.p.grpc_port, extra);
    PGconn *pg = pg_open();
    static pts_t b;
    int64_t t0 = now_ms() - 60000;
    Iot__Ingest__V1__TelemetryAck *ack = NULL;

    /* Good batch. */
    fill(&b, 1, 100, t0);
    ASSERT_INT_EQ(push(in.ch, tok[0], &b, 100, &ack), CM_STATUS_OK);
    ASSERT_INT_EQ(ack->acked_seq, 100);
    ASSERT_INT_EQ(ack->stored, 100);
    pbfree(ack);

    /* No token, a made-up token. */
    ASSERT_INT_EQ(push(in.ch, NULL, &b, 10, &ack), CM_STATUS_UNAUTHENTICATED);
    ASSERT(strstr(last_msg, "authorization"));
    ASSERT_INT_EQ(push(in.ch, "dt1.tk-0000000000000000.AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA", &b, 10, &ack),
                  CM_STATUS_UNAUTHENTICATED);

    /* Bad points: nothing of the batch is stored, the message names point and field. */
    fill(&b, 101, 10, t0);
    b.p[3].metric = (char *)"bad metric!";
    ASSERT_INT_EQ(push(in.ch, tok[0], &b, 10, &ack), CM_STATUS_INVALID_ARGUMENT);
    ASSERT(strstr(last_msg, "points[3].metric"));
    fill(&b, 101, 10, t0);
    b.p[5].seq = 104;
    ASSERT_INT_EQ(push(in.ch, tok[0], &b, 10, &ack), CM_STATUS_INVALID_ARGUMENT);
    ASSERT(strstr(last_msg, "points[5].seq"));
    fill(&b, 101, 10, t0);
    b.p[9].time_ms = now_ms() + 3600 * 1000;
    ASSERT_INT_EQ(push(in.ch, tok[0], &b, 10, &ack), CM_STATUS_INVALID_ARGUMENT);
    ASSERT(strstr(last_msg, "points[9].time_ms"));
    fill(&b, 101, 10, t0);
    b.p[2].value_case = IOT__INGEST__V1__POINT__VALUE_STRING_VALUE;
    b.p[2].string_value = (char *)"\xff\xfe";
    ASSERT_INT_EQ(push(in.ch, tok[0], &b, 10, &ack), CM_STATUS_INVALID_ARGUMENT);
    ASSERT(strstr(last_msg, "points[2].string_value"));
    fill(&b, 101, 10, t0);
    b.p[1].value_case = IOT__INGEST__V1__POINT__VALUE__NOT_SET;
    ASSERT_INT_EQ(push(in.ch, tok[0], &b, 10, &ack), CM_STATUS_INVALID_ARGUMENT);
    ASSERT_INT_EQ(pg_int(pg, "SELECT count(*) FROM telemetry WHERE device_id = $1", "dev-codes-0"), 100);

    /* Every value kind and labels round-trip; the empty batch only asks for the ack. */
    fill(&b, 101, 4, t0);
    Iot__Ingest__V1__Point__LabelsEntry l1 = IOT__INGEST__V1__POINT__LABELS_ENTRY__INIT, *lp[] = {&l1};
    l1.key = (char *)"unit";
    l1.value = (char *)"°C \"quoted\"";
    b.p[0].n_labels = 1;
    b.p[0].labels = lp;
    b.p[1].value_case = IOT__INGEST__V1__POINT__VALUE_INT_VALUE;
    b.p[1].int_value = -9007199254740993LL;
    b.p[2].value_case = IOT__INGEST__V1__POINT__VALUE_BOOL_VALUE;
    b.p[2].bool_value = 1;
    b.p[3].value_case = IOT__INGEST__V1__POINT__VALUE_STRING_VALUE;
    b.p[3].string_value = (char *)"ok ✓";
    ASSERT_INT_EQ(push(in.ch, tok[0], &b, 4, &ack), CM_STATUS_OK);
    ASSERT_INT_EQ(ack->acked_seq, 104);
    pbfree(ack);
    ASSERT_INT_EQ(pg_int(pg, "SELECT v_int FROM telemetry WHERE device_id = $1 AND seq = 102", "dev-codes-0"),
                  -9007199254740993LL);
    ASSERT_INT_EQ(pg_int(pg, "SELECT count(*) FROM telemetry WHERE device_id = $1 AND seq = 101 AND labels->>'unit' = '°C \"quoted\"'",
                         "dev-codes-0"),
                  1);
    ASSERT_INT_EQ(push(in.ch, tok[0], &b, 0, &ack), CM_STATUS_OK);
    ASSERT_INT_EQ(ack->acked_seq, 104);
    ASSERT_INT_EQ(ack->stored, 0);
    pbfree(ack);

    /* The stream contract: one entry per stored batch, PublishedBatch in "batch". */
    cm_redis_t *r = cm_redis_new(test_env("IOT_TEST_REDIS"), 2000, NULL);
    int entries = 0, points = 0;
    for (int shard = 0; shard < 8; shard++) {
        char key[96];
        snprintf(key, sizeof key, "%s{%d}", stream_prefix, shard);
        redisReply *x = cm_redis_cmdv(r, "XRANGE", key, "-", "+", NULL);
        ASSERT(x && x->type == REDIS_REPLY_ARRAY);
        for (size_t i = 0; i < x->elements; i++) {
            redisReply *f = x->element[i]->element[1];
            for (size_t j = 0; j + 1 < f->elements; j += 2) {
                if (strcmp(f->element[j]->str, "batch") != 0) continue;
                Iot__Ingest__V1__PublishedBatch *pb = iot__ingest__v1__published_batch__unpack(
                    NULL, f->element[j + 1]->len, (const uint8_t *)f->element[j + 1]->str);
                ASSERT(pb);
                ASSERT_STR_EQ(pb->device_id, "dev-codes-0");
                points += (int)pb->n_points;
                protobuf_c_message_free_unpacked(&pb->base, NULL);
            }
            entries++;
        }
        freeReplyObject(x);
    }
    cm_redis_free(r);
    ASSERT_INT_EQ(entries, 2);
    ASSERT_INT_EQ(points, 104);

    /* Revoked token: refused (the cache is off in this test; see IOT_INGEST_AUTH_CACHE_TTL). */
    Iot__Device__V1__AuthenticateDeviceRequest areq = IOT__DEVICE__V1__AUTHENTICATE_DEVICE_REQUEST__INIT;
    areq.token = tok[1];
    Iot__Device__V1__AuthenticateDeviceResponse *aresp = NULL;
    ASSERT_INT_EQ(unary(dm.ch, "/iot.device.v1.DeviceManager/AuthenticateDevice", &areq,
                        &iot__device__v1__authenticate_device_response__descriptor, &aresp, NULL),
                  0);
    Iot__Device__V1__RevokeTokenRequest rreq = IOT__DEVICE__V1__REVOKE_TOKEN_REQUEST__INIT;
    rreq.token_id = aresp->token_id;
    Iot__Device__V1__RevokeTokenResponse *rresp = NULL;
    fill(&b, 1, 5, t0);
    ASSERT_INT_EQ(push(in.ch, tok[1], &b, 5, &ack), CM_STATUS_OK);
    pbfree(ack);
    ASSERT_INT_EQ(unary(dm.ch, "/iot.device.v1.DeviceManager/RevokeToken", &rreq,
                        &iot__device__v1__revoke_token_response__descriptor, &rresp, NULL),
                  0);
    pbfree(rresp);
    pbfree(aresp);
    fill(&b, 6, 5, t0);
    ASSERT_INT_EQ(push(in.ch, tok[1], &b, 5, &ack), CM_STATUS_UNAUTHENTICATED);
    ASSERT_INT_EQ(pg_int(pg, "SELECT count(*) FROM telemetry WHERE device_id = $1", "dev-codes-1"), 5);

    /* The rate limit (1,000 points/s here): a burst beyond it is refused with a retry hint. A
     * batch is admitted while the budget is positive, so how many 1,000-point batches get in
     * depends on how long each write takes (a cold database may refill the budget in between);
     * one must be refused long before ten, since each write takes far less than a second. */
    static pts_t big;
    int admitted = 0, code = CM_STATUS_OK;
    for (; admitted < 10; admitted++) {
        fill(&big, 105 + 1000 * (uint64_t)admitted, 1000, t0 + 1000 + 2000 * admitted);
        code = push(in.ch, tok[0], &big, 1000, &ack);
        if (code != CM_STATUS_OK) break;
        pbfree(ack);
    }
    ASSERT(admitted >= 1);
    ASSERT_INT_EQ(code, CM_STATUS_RESOURCE_EXHAUSTED);
    ASSERT(strstr(last_msg, "IOT_INGEST_RATE_LIMIT"));
    ASSERT(atoi(last_retry) > 0);

    /* Presence reached device-mgmt. */
    Iot__Device__V1__GetDeviceRequest g = IOT__DEVICE__V1__GET_DEVICE_REQUEST__INIT;
    g.id = (char *)"dev-codes-0";
    int seen = 0;
    for (int i = 0; i < 50 && !seen; i++) {
        Iot__Device__V1__Device *d = NULL;
        ASSERT_INT_EQ(unary(dm.ch, "/iot.device.v1.DeviceManager/GetDevice", &g, &iot__device__v1__device__descriptor, &d,
                            NULL),
                      0);
        seen = d->last_seen_time != NULL;
        pbfree(d);
        if (!seen) usleep(100000);
    }
    ASSERT(seen);

    PQfinish(pg);
    stop_all(&dm, &in, tok, 2);
}

/* Opens a telemetry stream; the first ack says where to resume. */
static cm_stream_t *open_stream(cm_channel_t *ch, const char *token, uint64_t *resume) {
    char auth[256];
    snprintf(auth, sizeof auth, "Bearer %s", token);
    cm_md_t md = {"authorization", auth, 0};
    cm_call_opts_t o = {.timeout_ms = 120000, .md = &md, .n_md = 1};
    cm_stream_t *s = cm_stream_open(ch, ING "StreamTelemetry", &o);
    if (!s) return NULL;
    Iot__Ingest__V1__TelemetryAck *ack = NULL;
    if (cm_stream_recv(s, &iot__ingest__v1__telemetry_ack__descriptor, (ProtobufCMessage **)&ack) != 1) {
        cm_stream_cancel(s);
        cm_stream_finish(s, NULL);
        return NULL;
    }
    *resume = ack->acked_seq;
    pbfree(ack);
    return s;
}

static int stream_send(cm_stream_t *s, pts_t *b, size_t n) {
    Iot__Ingest__V1__StreamTelemetryRequest m = IOT__INGEST__V1__STREAM_TELEMETRY_REQUEST__INIT;
    m.n_points = n;
    m.points = b->ptrs;
    return cm_stream_send(s, &m.base);
}

static int stream_ack(cm_stream_t *s, uint64_t *acked) {
    Iot__Ingest__V1__TelemetryAck *ack = NULL;
    int rc = cm_stream_recv(s, &iot__ingest__v1__telemetry_ack__descriptor, (ProtobufCMessage **)&ack);
    if (rc == 1) {
        *acked = ack->acked_seq;
        pbfree(ack);
    }
    return rc;
}

static void test_resend_and_stream_resume(void) {
    svc_t dm, in;
    char **tok = start_dm("resume", 1, &dm);
    ing_start(&in, dm.p.grpc_port, NULL);
    PGconn *pg = pg_open();
    static pts_t b;
    int64_t t0 = now_ms() - 60000;
    Iot__Ingest__V1__TelemetryAck *ack = NULL;

    fill(&b, 1, 100, t0);
    ASSERT_INT_EQ(push(in.ch, tok[0], &b, 100, &ack), 0);
    pbfree(ack);
    /* The same batch again (its ack was "lost"): nothing new. */
    ASSERT_INT_EQ(push(in.ch, tok[0], &b, 100, &ack), 0);
    ASSERT_INT_EQ(ack->stored, 0);
    ASSERT_INT_EQ(ack->duplicates, 100);
    ASSERT_INT_EQ(ack->acked_seq, 100);
    pbfree(ack);
    /* Overlapping resend: only the new half is stored. */
    fill(&b, 51, 100, t0 + 50);
    ASSERT_INT_EQ(push(in.ch, tok[0], &b, 100, &ack), 0);
    ASSERT_INT_EQ(ack->stored, 50);
    ASSERT_INT_EQ(ack->duplicates, 50);
    ASSERT_INT_EQ(ack->acked_seq, 150);
    pbfree(ack);
    check_exact(pg, "dev-resume-0", 150);

    /* Stream: send batches, cut the stream without reading the last acks, resume. */
    uint64_t resume = 0, acked = 0, next = 0;
    cm_stream_t *s = open_stream(in.ch, tok[0], &resume);
    ASSERT(s);
    ASSERT_INT_EQ(resume, 150);
    next = resume + 1;
    for (int i = 0; i < 5; i++) {
        fill(&b, next, 100, t0 + (int64_t)next);
        ASSERT_INT_EQ(stream_send(s, &b, 100), 0);
        next += 100;
        ASSERT_INT_EQ(stream_ack(s, &acked), 1);
        ASSERT_INT_EQ(acked, next - 1);
    }
    for (int i = 0; i < 5; i++) { /* sent, acks never read */
        fill(&b, next, 100, t0 + (int64_t)next);
        ASSERT_INT_EQ(stream_send(s, &b, 100), 0);
        next += 100;
    }
    cm_stream_cancel(s);
    cm_stream_finish(s, NULL);
    /* Reconnect: the first ack tells where to resume; resend from there to the end. */
    s = open_stream(in.ch, tok[0], &resume);
    ASSERT(s);
    ASSERT(resume >= acked && resume <= next - 1);
    uint64_t end = next - 1 + 300;
    for (uint64_t from = resume + 1; from <= end; from += 100) {
        size_t n = end - from + 1 < 100 ? (size_t)(end - from + 1) : 100;
        fill(&b, from, n, t0 + (int64_t)from);
        ASSERT_INT_EQ(stream_send(s, &b, n), 0);
    }
    ASSERT_INT_EQ(cm_stream_close_send(s), 0);
    while (stream_ack(s, &acked) == 1) {
    }
    cm_rpc_status_t st = {0};
    ASSERT_INT_EQ(cm_stream_finish(s, &st), 0);
    cm_rpc_status_clear(&st);
    ASSERT_INT_EQ(acked, end);
    check_exact(pg, "dev-resume-0", end);

    PQfinish(pg);
    stop_all(&dm, &in, tok, 1);
}

/* Regression: a commit group that failed for a reason other than a lost connection was answered
 * INTERNAL while the same device's next batch, queued behind it, committed and moved the mark past
 * the failed points. A trigger makes the first batch fail deterministically. */
static void test_failed_commit_blocks_later_batches(void) {
    svc_t dm, in;
    char **tok = start_dm("fail", 1, &dm);
    ing_start(&in, dm.p.grpc_port, NULL);
    PGconn *pg = pg_open();
    static pts_t b;
    int64_t t0 = now_ms() - 60000;
    Iot__Ingest__V1__TelemetryAck *ack = NULL;
    fill(&b, 1, 100, t0);
    ASSERT_INT_EQ(push(in.ch, tok[0], &b, 100, &ack), 0);
    pbfree(ack);
    PQclear(PQexec(pg, "CREATE FUNCTION boom() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
                       "IF NEW.seq = 150 THEN RAISE EXCEPTION 'disk on fire'; END IF; RETURN NEW; END $$"));
    PGresult *r = PQexec(pg, "CREATE TRIGGER boom BEFORE INSERT ON telemetry FOR EACH ROW EXECUTE FUNCTION boom()");
    ASSERT(PQresultStatus(r) == PGRES_COMMAND_OK);
    PQclear(r);

    uint64_t resume = 0, acked = 0;
    cm_stream_t *s = open_stream(in.ch, tok[0], &resume);
    ASSERT(s);
    ASSERT_INT_EQ(resume, 100);
    for (uint64_t from = 101; from <= 1000; from += 100) { /* all sent at once: 150 fails */
        fill(&b, from, 100, t0 + (int64_t)from);
        if (stream_send(s, &b, 100)) break;
    }
    cm_stream_close_send(s);
    while (stream_ack(s, &acked) == 1) {
    }
    cm_rpc_status_t st = {0};
    int code = cm_stream_finish(s, &st);
    cm_rpc_status_clear(&st);
    ASSERT_INT_EQ(code, CM_STATUS_UNAVAILABLE);
    ASSERT_INT_EQ(pg_int(pg, "SELECT seq FROM device_seq WHERE device_id = $1", "dev-fail-0"), 100);
    check_exact(pg, "dev-fail-0", 100);

    /* Fixed: resending from the ack stores everything once. */
    PQclear(PQexec(pg, "DROP TRIGGER boom ON telemetry"));
    s = open_stream(in.ch, tok[0], &resume);
    ASSERT(s);
    ASSERT_INT_EQ(resume, 100);
    for (uint64_t from = 101; from <= 1000; from += 100) {
        fill(&b, from, 100, t0 + (int64_t)from);
        ASSERT_INT_EQ(stream_send(s, &b, 100), 0);
    }
    cm_stream_close_send(s);
    while (stream_ack(s, &acked) == 1) {
    }
    ASSERT_INT_EQ(cm_stream_finish(s, NULL), 0);
    ASSERT_INT_EQ(acked, 1000);
    check_exact(pg, "dev-fail-0", 1000);
    PQfinish(pg);
    stop_all(&dm, &in, tok, 1);
}

/* Pushes, retrying while the committer refuses (UNAVAILABLE) for a moment. */
static void push_retry(cm_channel_t *ch, const char *token, pts_t *b, size_t n, uint64_t want_ack) {
    Iot__Ingest__V1__TelemetryAck *ack = NULL;
    int code = -1;
    for (int i = 0; i < 100 && code != 0; i++) {
        code = push(ch, token, b, n, &ack);
        if (code == CM_STATUS_UNAVAILABLE) usleep(50000);
    }
    if (code) TEST__FAIL("push: %d %s", code, last_msg);
    ASSERT_INT_EQ(ack->acked_seq, want_ack);
    pbfree(ack);
}

/* The stream only ever carries committed points, and none is missing from it: points committed
 * while publishing failed are republished, in seq order, by the device's next commit. */
static void test_stream_republishes_after_publish_failure(void) {
    svc_t dm, in;
    char **tok = start_dm("pub", 1, &dm);
    const char *one_shard[] = {"IOT_INGEST_SHARDS=1", "IOT_INGEST_REPUBLISH_INTERVAL=200ms", NULL};
    ing_start(&in, dm.p.grpc_port, one_shard);
    cm_redis_t *r = cm_redis_new(test_env("IOT_TEST_REDIS"), 2000, NULL);
    char key[96];
    snprintf(key, sizeof key, "%s{0}", stream_prefix);
    static pts_t b;
    int64_t t0 = now_ms() - 60000;
    fill(&b, 1, 100, t0);
    push_retry(in.ch, tok[0], &b, 100, 100);
    /* Break publishing: the stream key holds a string, so XADD fails (WRONGTYPE). */
    redisReply *x = cm_redis_cmdv(r, "SET", key, "not a stream", NULL);
    freeReplyObject(x);
    fill(&b, 101, 100, t0 + 101);
    push_retry(in.ch, tok[0], &b, 100, 200); /* committed, so acknowledged */
    fill(&b, 201, 100, t0 + 201);
    push_retry(in.ch, tok[0], &b, 100, 300);
    x = cm_redis_cmdv(r, "DEL", key, NULL);
    freeReplyObject(x);
    /* The device sends nothing now: the sweep republishes 101..300 by itself. */
    long long len = 0;
    for (int i = 0; i < 50 && len == 0; i++) {
        usleep(100000);
        x = cm_redis_cmdv(r, "XLEN", key, NULL);
        len = x && x->type == REDIS_REPLY_INTEGER ? x->integer : 0;
        freeReplyObject(x);
    }
    ASSERT(len > 0);
    fill(&b, 301, 100, t0 + 301);
    push_retry(in.ch, tok[0], &b, 100, 400);
    /* The stream now holds 101..400, each once, in order. */
    x = cm_redis_cmdv(r, "XRANGE", key, "-", "+", NULL);
    ASSERT(x && x->type == REDIS_REPLY_ARRAY);
    uint64_t next = 101;
    for (size_t i = 0; i < x->elements; i++) {
        redisReply *f = x->element[i]->element[1];
        for (size_t j = 0; j + 1 < f->elements; j += 2) {
            if (strcmp(f->element[j]->str, "batch") != 0) continue;
            Iot__Ingest__V1__PublishedBatch *pb = iot__ingest__v1__published_batch__unpack(
                NULL, f->element[j + 1]->len, (const uint8_t *)f->element[j + 1]->str);
            ASSERT(pb);
            for (size_t k = 0; k < pb->n_points; k++) {
                if (pb->points[k]->seq != next || pb->points[k]->double_value != value_of(next))
                    TEST__FAIL("stream point seq %llu, want %llu", (unsigned long long)pb->points[k]->seq,
                               (unsigned long long)next);
                next++;
            }
            protobuf_c_message_free_unpacked(&pb->base, NULL);
        }
    }
    freeReplyObject(x);
    cm_redis_free(r);
    ASSERT_INT_EQ(next, 401);
    stop_all(&dm, &in, tok, 1);
}

/* ---- loaders ----------------------------------------------------------------------------------- */

typedef struct loader_s {
    pthread_t th;
    const char *token;
    char device[64];
    int *port; /* ingest's current port (changes across restarts) */
    atomic_int *stop;
    uint64_t acked; /* the highest ack received */
    uint64_t sent;  /* the highest seq sent */
    int use_stream;
    int codes[17];  /* errors seen, by code */
} loader_t;

static void *loader_main(void *arg) {
    loader_t *l = arg;
    static __thread pts_t b;
    int64_t t0 = now_ms() - 120000;
    while (!atomic_load(l->stop)) {
        char target[64];
        snprintf(target, sizeof target, "127.0.0.1:%d", atomic_load((atomic_int *)l->port));
        cm_channel_opts_t co = {.own_connection = 1, .max_reconnect_backoff_ms = 200};
        cm_channel_t *ch = cm_channel_new(target, &co, NULL);
        if (l->use_stream) {
            uint64_t resume = 0;
            cm_stream_t *s = open_stream(ch, l->token, &resume);
            if (!s) {
                cm_channel_free(ch);
                usleep(50000);
                continue;
            }
            if (resume > l->acked) l->acked = resume;
            uint64_t next = resume + 1;
            int inflight = 0;
            while (!atomic_load(l->stop)) {
                fill(&b, next, 50, t0 + (int64_t)(next % 100000));
                if (stream_send(s, &b, 50)) break;
                next += 50;
                if (next - 1 > l->sent) l->sent = next - 1;
                if (++inflight < 4) continue;
                uint64_t a;
                if (stream_ack(s, &a) != 1) break;
                inflight--;
                if (a > l->acked) l->acked = a;
            }
            /* Drain the acks still coming, then end. */
            cm_stream_close_send(s);
            uint64_t a;
            while (stream_ack(s, &a) == 1)
                if (a > l->acked) l->acked = a;
            cm_rpc_status_t st = {0};
            int code = cm_stream_finish(s, &st);
            if (code > 0 && code < 17) l->codes[code]++;
            cm_rpc_status_clear(&st);
        } else {
            while (!atomic_load(l->stop)) {
                uint64_t first = l->acked + 1;
                fill(&b, first, 50, t0 + (int64_t)(first % 100000));
                Iot__Ingest__V1__TelemetryAck *ack = NULL;
                int code = push(ch, l->token, &b, 50, &ack);
                if (code == 0) {
                    if (ack->acked_seq > l->acked) l->acked = ack->acked_seq;
                    pbfree(ack);
                    if (first + 49 > l->sent) l->sent = first + 49;
                } else {
                    if (code > 0 && code < 17) l->codes[code]++;
                    usleep(20000);
                    if (code == CM_STATUS_UNAVAILABLE && l->codes[code] % 50 == 0) break; /* reconnect */
                }
            }
        }
        cm_channel_free(ch);
    }
    return NULL;
}

/* Brings every loader's data up to its last ack with one final push, so the table must hold
 * exactly 1..acked. */
static void start_loaders(loader_t *ls, int n, char **tok, const char *tag, int *port, atomic_int *stop, int streams) {
    for (int i = 0; i < n; i++) {
        memset(&ls[i], 0, sizeof ls[i]);
        ls[i].token = tok[i];
        snprintf(ls[i].device, sizeof ls[i].device, "dev-%s-%d", tag, i);
        ls[i].port = port;
        ls[i].stop = stop;
        ls[i].use_stream = streams && i % 2 == 0;
        pthread_create(&ls[i].th, NULL, loader_main, &ls[i]);
    }
}

/* The server's mark for the device (an empty push), which every ack so far must not exceed. */
static uint64_t final_ack(cm_channel_t *ch, const loader_t *l) {
    static pts_t none;
    Iot__Ingest__V1__TelemetryAck *ack = NULL;
    int code = push(ch, l->token, &none, 0, &ack);
    if (code) TEST__FAIL("%s: final ack: %d %s", l->device, code, last_msg);
    uint64_t a = ack->acked_seq;
    pbfree(ack);
    if (a < l->acked) TEST__FAIL("%s: server mark %llu below an ack the device got (%llu)", l->device,
                                 (unsigned long long)a, (unsigned long long)l->acked);
    return a;
}

static void test_kill9_under_load_keeps_every_ack(void) {
    enum { N = 8 };
    svc_t dm, in;
    char **tok = start_dm("kill", N, &dm);
    ing_start(&in, dm.p.grpc_port, NULL);
    static atomic_int port;
    atomic_store(&port, in.p.grpc_port);
    atomic_int stop = 0;
    loader_t ls[N];
    start_loaders(ls, N, tok, "kill", (int *)&port, &stop, 1);
    sleep(2);
    uint64_t before = 0;
    for (int i = 0; i < N; i++) before += ls[i].acked;
    test_proc_kill(&in.p, SIGKILL);
    test_proc_wait(&in.p, 5000);
    cm_channel_free(in.ch);
    ing_start(&in, dm.p.grpc_port, NULL);
    atomic_store(&port, in.p.grpc_port);
    sleep(3);
    atomic_store(&stop, 1);
    uint64_t after = 0;
    for (int i = 0; i < N; i++) {
        pthread_join(ls[i].th, NULL);
        after += ls[i].acked;
    }
    ASSERT(before > 0);
    ASSERT(after > before); /* the loaders resumed on the new process */
    PGconn *pg = pg_open();
    for (int i = 0; i < N; i++) check_exact(pg, ls[i].device, final_ack(in.ch, &ls[i]));
    PQfinish(pg);
    stop_all(&dm, &in, tok, N);
}

static void pg_ctl(const char *what) {
    char cmd[256];
    snprintf(cmd, sizeof cmd, "sh tests/support/pg_stop_start.sh %s", what);
    int rc = system(cmd);
    if (rc != 0) fprintf(stdout, "    pg_stop_start %s: %d\n", what, rc);
}

/* grpc.health.v1 Check: the status (1 SERVING, 2 NOT_SERVING), or -code on an error. */
static int health(cm_channel_t *ch, const char *service) {
    Grpc__Health__V1__HealthCheckRequest req = GRPC__HEALTH__V1__HEALTH_CHECK_REQUEST__INIT;
    req.service = (char *)service;
    Grpc__Health__V1__HealthCheckResponse *r = NULL;
    int code = unary(ch, "/grpc.health.v1.Health/Check", &req, &grpc__health__v1__health_check_response__descriptor, &r, NULL);
    int st = code ? -code : (int)r->status;
    pbfree(r);
    return st;
}

static void test_postgres_outage_under_load(void) {
    enum { N = 6 };
    svc_t dm, in;
    char **tok = start_dm("outage", N, &dm);
    const char *extra[] = {"IOT_INGEST_MAX_PENDING=20000", NULL};
    ing_start(&in, dm.p.grpc_port, extra);
    static atomic_int port;
    atomic_store(&port, in.p.grpc_port);
    atomic_int stop = 0;
    loader_t ls[N];
    start_loaders(ls, N, tok, "outage", (int *)&port, &stop, 1);
    sleep(2);
    long rss_before = test_proc_rss_kb(in.p.pid);
    uint64_t before = 0;
    for (int i = 0; i < N; i++) before += ls[i].acked;
    /* No assertion between stop and start: the database must come back for the other tests. */
    pg_ctl("stop");
    long rss_max = 0;
    int not_serving = 0, live = 1; /* gRPC health follows readiness; "liveness" does not */
    for (int i = 0; i < 40; i++) {
        long r = test_proc_rss_kb(in.p.pid);
        if (r > rss_max) rss_max = r;
        if (i % 5 == 4 && health(in.ch, "iot.ingest.v1.Ingest") == 2) not_serving = 1;
        if (i % 5 == 4 && health(in.ch, "liveness") != 1) live = 0;
        usleep(100000);
    }
    uint64_t during = 0;
    for (int i = 0; i < N; i++) during += ls[i].acked;
    pg_ctl("start");
    /* Recovery without a restart: acknowledgements move again. */
    uint64_t later = during;
    for (int i = 0; i < 100 && later < during + 1000; i++) {
        usleep(100000);
        later = 0;
        for (int j = 0; j < N; j++) later += ls[j].acked;
    }
    int serving_again = 0;
    for (int i = 0; i < 50 && !(serving_again = health(in.ch, "") == 1); i++) usleep(100000);
    atomic_store(&stop, 1);
    int unavailable = 0, other = 0;
    for (int i = 0; i < N; i++) {
        pthread_join(ls[i].th, NULL);
        for (int c = 1; c < 17; c++) {
            if (c == CM_STATUS_UNAVAILABLE || c == CM_STATUS_RESOURCE_EXHAUSTED)
                unavailable += ls[i].codes[c];
            else if (c != CM_STATUS_CANCELLED)
                other += ls[i].codes[c];
        }
    }
    fprintf(stdout, "    acked before %llu, during outage %llu, after %llu; rss %ld kB before, max %ld kB during\n",
            (unsigned long long)before, (unsigned long long)during, (unsigned long long)later, rss_before, rss_max);
    ASSERT(before > 0);
    ASSERT(not_serving);
    ASSERT(live);
    ASSERT(serving_again);
    ASSERT(unavailable > 0);
    ASSERT_INT_EQ(other, 0);
    ASSERT(later >= during + 1000);
#ifdef __SANITIZE_ADDRESS__
    const long slack_kb = 250 * 1024; /* ASan's quarantine keeps freed memory resident */
#else
    const long slack_kb = 50 * 1024;
#endif
    ASSERT(rss_max < rss_before + slack_kb); /* bounded: no unbounded queueing while down */
    ASSERT_INT_EQ(kill(in.p.pid, 0), 0);       /* never restarted */
    PGconn *pg = pg_open();
    for (int i = 0; i < N; i++) check_exact(pg, ls[i].device, final_ack(in.ch, &ls[i]));
    PQfinish(pg);
    stop_all(&dm, &in, tok, N);
}

static void test_retention_and_aggregations(void) {
    svc_t dm, in;
    char **tok = start_dm("ret", 1, &dm);
    const char *wide[] = {"IOT_INGEST_MAX_PAST=480h", "IOT_INGEST_RETENTION=480h", NULL};
    ing_start(&in, dm.p.grpc_port, wide);
    static pts_t b;
    Iot__Ingest__V1__TelemetryAck *ack = NULL;
    int64_t old_t = now_ms() - 10LL * 86400 * 1000;
    fill(&b, 1, 10, old_t);
    ASSERT_INT_EQ(push(in.ch, tok[0], &b, 10, &ack), 0);
    pbfree(ack);
    /* Fixture: from = a minute boundary an hour ago; 3 buckets of 10 s: values 1..10 in the
     * first (at 0..9 s), 20 and 30 in the second (15 s, 18 s), none in the third, 7 in the
     * fourth (35 s), plus a string point in the second bucket that numeric aggregates skip. */
    int64_t from = (now_ms() - 3600 * 1000) / 60000 * 60000;
    uint64_t seq = 11;
    for (int i = 0; i < 10; i++) {
        fill(&b, seq, 1, from + i * 1000);
        b.p[0].double_value = i + 1;
        b.p[0].metric = (char *)"m";
        ASSERT_INT_EQ(push(in.ch, tok[0], &b, 1, &ack), 0);
        pbfree(ack);
        seq++;
    }
    const int64_t at[] = {15000, 17000, 18000, 35000};
    for (int i = 0; i < 4; i++) {
        fill(&b, seq++, 1, from + at[i]);
        b.p[0].metric = (char *)"m";
        if (i == 1) {
            b.p[0].value_case = IOT__INGEST__V1__POINT__VALUE_STRING_VALUE;
            b.p[0].string_value = (char *)"text";
        } else {
            b.p[0].value_case = IOT__INGEST__V1__POINT__VALUE_INT_VALUE;
            b.p[0].int_value = i == 0 ? 20 : i == 2 ? 30 : 7;
        }
        ASSERT_INT_EQ(push(in.ch, tok[0], &b, 1, &ack), 0);
        pbfree(ack);
    }
    struct {
        Iot__Ingest__V1__Aggregation a;
        double v[3];
        int64_t count[3];
    } cases[] = {
        {IOT__INGEST__V1__AGGREGATION__AGGREGATION_MIN, {1, 20, 7}, {10, 2, 1}},
        {IOT__INGEST__V1__AGGREGATION__AGGREGATION_MAX, {10, 30, 7}, {10, 2, 1}},
        {IOT__INGEST__V1__AGGREGATION__AGGREGATION_AVG, {5.5, 25, 7}, {10, 2, 1}},
        {IOT__INGEST__V1__AGGREGATION__AGGREGATION_SUM, {55, 50, 7}, {10, 2, 1}},
        {IOT__INGEST__V1__AGGREGATION__AGGREGATION_COUNT, {10, 3, 1}, {10, 3, 1}},
        {IOT__INGEST__V1__AGGREGATION__AGGREGATION_LAST, {10, 30, 7}, {10, 3, 1}},
    };
    for (size_t c = 0; c < sizeof cases / sizeof cases[0]; c++) {
        Iot__Ingest__V1__QueryTelemetryRequest q = IOT__INGEST__V1__QUERY_TELEMETRY_REQUEST__INIT;
        q.device_id = (char *)"dev-ret-0";
        q.metric = (char *)"m";
        q.from_ms = from;
        q.to_ms = from + 40000;
        q.step_ms = 10000;
        q.aggregation = cases[c].a;
        Iot__Ingest__V1__QueryTelemetryResponse *r = NULL;
        ASSERT_INT_EQ(unary(in.ch, ING "QueryTelemetry", &q, &iot__ingest__v1__query_telemetry_response__descriptor, &r,
                            NULL),
                      0);
        if (r->n_buckets != 3) TEST__FAIL("aggregation %d: %zu buckets", (int)cases[c].a, r->n_buckets);
        const int64_t starts[] = {from, from + 10000, from + 30000};
        for (int k = 0; k < 3; k++) {
            ASSERT_INT_EQ(r->buckets[k]->start_ms, starts[k]);
            if (r->buckets[k]->value != cases[c].v[k] || r->buckets[k]->count != cases[c].count[k])
                TEST__FAIL("aggregation %d bucket %d: value %g count %lld, want %g %lld", (int)cases[c].a, k,
                           r->buckets[k]->value, (long long)r->buckets[k]->count, cases[c].v[k],
                           (long long)cases[c].count[k]);
        }
        pbfree(r);
    }
    /* Raw paging: 14 points of "m" in pages of 4, in time order, no gaps. */
    Iot__Ingest__V1__QueryTelemetryRequest q = IOT__INGEST__V1__QUERY_TELEMETRY_REQUEST__INIT;
    q.device_id = (char *)"dev-ret-0";
    q.metric = (char *)"m";
    q.from_ms = from;
    q.to_ms = from + 60000;
    q.page_size = 4;
    int total = 0, pages = 0;
    int64_t last_t = -1;
    char token[256] = "";
    do {
        q.page_token = token;
        Iot__Ingest__V1__QueryTelemetryResponse *r = NULL;
        ASSERT_INT_EQ(unary(in.ch, ING "QueryTelemetry", &q, &iot__ingest__v1__query_telemetry_response__descriptor, &r,
                            NULL),
                      0);
        for (size_t i = 0; i < r->n_points; i++) {
            ASSERT(r->points[i]->time_ms > last_t);
            last_t = r->points[i]->time_ms;
        }
        total += (int)r->n_points;
        pages++;
        snprintf(token, sizeof token, "%s", r->next_page_token);
        pbfree(r);
    } while (*token && pages < 10);
    ASSERT_INT_EQ(total, 14);
    ASSERT_INT_EQ(pages, 4);
    q.step_ms = 0;
    q.from_ms = from + 1;
    q.to_ms = from;
    Iot__Ingest__V1__QueryTelemetryResponse *bad = NULL;
    ASSERT_INT_EQ(unary(in.ch, ING "QueryTelemetry", &q, &iot__ingest__v1__query_telemetry_response__descriptor, &bad, NULL),
                  CM_STATUS_INVALID_ARGUMENT);
    /* LatestValues: newest of each metric. */
    Iot__Ingest__V1__LatestValuesRequest lv = IOT__INGEST__V1__LATEST_VALUES_REQUEST__INIT;
    lv.device_id = (char *)"dev-ret-0";
    Iot__Ingest__V1__LatestValuesResponse *lr = NULL;
    ASSERT_INT_EQ(unary(in.ch, ING "LatestValues", &lv, &iot__ingest__v1__latest_values_response__descriptor, &lr, NULL), 0);
    ASSERT_INT_EQ(lr->n_points, 2);
    ASSERT_STR_EQ(lr->points[0]->metric, "m");
    ASSERT_INT_EQ(lr->points[0]->int_value, 7);
    ASSERT_STR_EQ(lr->points[1]->metric, "temp");
    ASSERT_INT_EQ(lr->points[1]->seq, 10);
    pbfree(lr);
    svc_stop(&in);

    /* Restart with a 3-day retention: the 10-day-old partition is dropped, recent data stays. */
    PGconn *pg = pg_open();
    ASSERT_INT_EQ(pg_int(pg, "SELECT count(*) FROM telemetry WHERE device_id = $1", "dev-ret-0"), 24);
    const char *narrow[] = {"IOT_INGEST_MAX_PAST=72h", "IOT_INGEST_RETENTION=72h", NULL};
    ing_start(&in, dm.p.grpc_port, narrow);
    ASSERT_INT_EQ(pg_int(pg, "SELECT count(*) FROM telemetry WHERE device_id = $1", "dev-ret-0"), 14);
    char old_name[64];
    time_t ot = (time_t)(old_t / 1000);
    struct tm tm;
    gmtime_r(&ot, &tm);
    strftime(old_name, sizeof old_name, "telemetry_p%Y%m%d00", &tm);
    ASSERT_INT_EQ(pg_int(pg, "SELECT count(*) FROM pg_class WHERE relname = $1", old_name), 0);
    PQfinish(pg);
    stop_all(&dm, &in, tok, 1);
}

/* Regression: with hourly partitions in place, a restart with daily partitions could not create
 * the day's partition (it overlaps the hourly ones) and refused every batch of that day. Gaps are
 * now filled with partitions bounded by the existing ones. */
static void test_partition_size_change(void) {
    svc_t dm, in;
    char **tok = start_dm("part", 1, &dm);
    const char *hourly[] = {"IOT_INGEST_PARTITION=1h", NULL};
    ing_start(&in, dm.p.grpc_port, hourly);
    static pts_t b;
    Iot__Ingest__V1__TelemetryAck *ack = NULL;
    int64_t now = now_ms();
    fill(&b, 1, 1, now - 1000);
    ASSERT_INT_EQ(push(in.ch, tok[0], &b, 1, &ack), 0);
    pbfree(ack);
    svc_stop(&in);
    const char *daily[] = {"IOT_INGEST_PARTITION=24h", NULL};
    ing_start(&in, dm.p.grpc_port, daily);
    const int64_t ago[] = {26 * 3600000LL, 5 * 3600000LL, 3600000LL, 1000};
    for (int i = 0; i < 4; i++) {
        fill(&b, (uint64_t)i + 2, 1, now - ago[i]);
        if (push(in.ch, tok[0], &b, 1, &ack) != 0) TEST__FAIL("point %d hours ago: %s", (int)(ago[i] / 3600000), last_msg);
        pbfree(ack);
    }
    PGconn *pg = pg_open();
    check_exact(pg, "dev-part-0", 5);
    PQfinish(pg);
    stop_all(&dm, &in, tok, 1);
}

/* ---- WatchTelemetry ---------------------------------------------------------------------------- */

static cm_stream_t *watch_open(cm_channel_t *ch, const char *device, const char **metrics, size_t n) {
    Iot__Ingest__V1__WatchTelemetryRequest req = IOT__INGEST__V1__WATCH_TELEMETRY_REQUEST__INIT;
    req.device_id = (char *)device;
    req.n_metrics = n;
    req.metrics = (char **)metrics;
    cm_call_opts_t o = {.timeout_ms = 60000};
    cm_stream_t *s = cm_stream_open(ch, ING "WatchTelemetry", &o);
    ASSERT(s);
    ASSERT_INT_EQ(cm_stream_send(s, &req.base), 0);
    cm_stream_close_send(s);
    return s;
}

/* The status a watch ends with (it must end by itself within a few seconds). */
static int watch_status(cm_stream_t *s) {
    Iot__Ingest__V1__PublishedBatch *b = NULL;
    int rc = cm_stream_recv_wait(s, &iot__ingest__v1__published_batch__descriptor, 5000, (ProtobufCMessage **)&b);
    pbfree(b);
    if (rc == CM_ETIMEOUT) TEST__FAIL("the watch did not end");
    cm_rpc_status_t st = {0};
    int code = cm_stream_finish(s, &st);
    snprintf(last_msg, sizeof last_msg, "%s", st.message);
    cm_rpc_status_clear(&st);
    return code;
}

/* Points received on s until `want` have come (fails after 5 s): seqs and metrics in order. */
static size_t watch_collect(cm_stream_t *s, const char *device, size_t want, uint64_t *seqs, char (*metrics)[16]) {
    size_t n = 0;
    while (n < want) {
        Iot__Ingest__V1__PublishedBatch *b = NULL;
        int rc = cm_stream_recv_wait(s, &iot__ingest__v1__published_batch__descriptor, 5000, (ProtobufCMessage **)&b);
        if (rc != 1) TEST__FAIL("watch of %s: %zu of %zu points, then %d", device, n, want, rc);
        ASSERT_STR_EQ(b->device_id, device);
        ASSERT(b->n_points > 0);
        for (size_t i = 0; i < b->n_points && n < want + 8; i++, n++) {
            seqs[n] = b->points[i]->seq;
            snprintf(metrics[n], 16, "%s", b->points[i]->metric);
        }
        pbfree(b);
    }
    return n;
}

static long watchers_gauge(int admin_port) {
    static char body[65536];
    if (test_http_get(admin_port, "/metrics", body, sizeof body) != 200) return -1;
    const char *g = strstr(body, "\ningest_telemetry_watchers ");
    return g ? atol(g + strlen("\ningest_telemetry_watchers ")) : -1;
}

static void wait_watchers(int admin_port, long want) {
    long got = -1;
    for (int i = 0; i < 100 && (got = watchers_gauge(admin_port)) != want; i++) usleep(20000);
    if (got != want) TEST__FAIL("ingest_telemetry_watchers %ld, want %ld", got, want);
}

/* Live points of one device, only after the watch started, only the metrics asked for, each seq
 * once even when the stream carries it twice; validation, the watcher limit, cancellation, and
 * shutdown ending the open watches. */
static void test_watch_telemetry(void) {
    svc_t dm, in;
    char **tok = start_dm("watch", 2, &dm);
    const char *extra[] = {"IOT_INGEST_MAX_WATCHERS=3", NULL};
    ing_start(&in, dm.p.grpc_port, extra);
    static pts_t b;
    int64_t t0 = now_ms() - 60000;
    Iot__Ingest__V1__TelemetryAck *ack = NULL;
    fill(&b, 1, 10, t0);
    ASSERT_INT_EQ(push(in.ch, tok[0], &b, 10, &ack), 0); /* before any watch: never sent */
    pbfree(ack);

    const char *bad_metric[] = {"no spaces"};
    ASSERT_INT_EQ(watch_status(watch_open(in.ch, "", NULL, 0)), CM_STATUS_INVALID_ARGUMENT);
    ASSERT(strstr(last_msg, "device_id"));
    ASSERT_INT_EQ(watch_status(watch_open(in.ch, "dev-watch-0", bad_metric, 1)), CM_STATUS_INVALID_ARGUMENT);
    ASSERT(strstr(last_msg, "metrics[0]"));

    const char *hum[] = {"hum"};
    cm_stream_t *all = watch_open(in.ch, "dev-watch-0", NULL, 0);
    cm_stream_t *only_hum = watch_open(in.ch, "dev-watch-0", hum, 1);
    cm_stream_t *other = watch_open(in.ch, "dev-watch-1", NULL, 0);
    wait_watchers(in.p.admin_port, 3);
    ASSERT_INT_EQ(watch_status(watch_open(in.ch, "dev-watch-0", NULL, 0)), CM_STATUS_RESOURCE_EXHAUSTED);
    ASSERT(strstr(last_msg, "IOT_INGEST_MAX_WATCHERS"));

    /* seq 11..20 alternate temp and hum; the other device sends 1..5. */
    fill(&b, 11, 10, t0 + 100);
    for (int i = 0; i < 10; i += 2) b.p[i].metric = (char *)"hum";
    ASSERT_INT_EQ(push(in.ch, tok[0], &b, 10, &ack), 0);
    pbfree(ack);
    fill(&b, 1, 5, t0);
    ASSERT_INT_EQ(push(in.ch, tok[1], &b, 5, &ack), 0);
    pbfree(ack);

    uint64_t seqs[32];
    char metrics[32][16];
    ASSERT_INT_EQ(watch_collect(all, "dev-watch-0", 10, seqs, metrics), 10);
    for (int i = 0; i < 10; i++) {
        ASSERT_INT_EQ(seqs[i], 11 + i);
        ASSERT_STR_EQ(metrics[i], i % 2 ? "temp" : "hum");
    }
    ASSERT_INT_EQ(watch_collect(only_hum, "dev-watch-0", 5, seqs, metrics), 5);
    for (int i = 0; i < 5; i++) {
        ASSERT_INT_EQ(seqs[i], 11 + 2 * i);
        ASSERT_STR_EQ(metrics[i], "hum");
    }
    ASSERT_INT_EQ(watch_collect(other, "dev-watch-1", 5, seqs, metrics), 5);
    for (int i = 0; i < 5; i++) ASSERT_INT_EQ(seqs[i], 1 + i);

    /* At least once on the stream, once on the watch: an entry repeating seq 15..20 and adding 21
     * (as a republish after a crash would) yields only 21. */
    Iot__Ingest__V1__PublishedBatch pb = IOT__INGEST__V1__PUBLISHED_BATCH__INIT;
    fill(&b, 15, 7, t0 + 200);
    pb.device_id = (char *)"dev-watch-0";
    pb.n_points = 7;
    pb.points = b.ptrs;
    uint8_t enc[4096];
    size_t len = iot__ingest__v1__published_batch__pack(&pb, enc);
    char key[96];
    snprintf(key, sizeof key, "%s{%llu}", stream_prefix,
             (unsigned long long)(cm_hash64("dev-watch-0", strlen("dev-watch-0")) % 8));
    cm_redis_t *r = cm_redis_new(test_env("IOT_TEST_REDIS"), 2000, NULL);
    const char *xadd[] = {"XADD", key, "*", "device", "dev-watch-0", "batch", (const char *)enc};
    size_t lens[] = {4, strlen(key), 1, 6, 11, 5, len};
    redisReply *x = cm_redis_cmd(r, 7, xadd, lens);
    ASSERT(x && x->type == REDIS_REPLY_STRING);
    freeReplyObject(x);
    cm_redis_free(r);
    ASSERT_INT_EQ(watch_collect(all, "dev-watch-0", 1, seqs, metrics), 1);
    ASSERT_INT_EQ(seqs[0], 21);

    /* A cancelled watch leaves; shutdown ends the others with UNAVAILABLE. */
    cm_stream_cancel(all);
    cm_stream_finish(all, NULL);
    wait_watchers(in.p.admin_port, 2);
    cm_channel_free(dm.ch);
    dm.ch = NULL;
    test_proc_kill(&in.p, SIGTERM);
    ASSERT_INT_EQ(watch_status(only_hum), CM_STATUS_UNAVAILABLE);
    ASSERT(strstr(last_msg, "shutting down"));
    ASSERT_INT_EQ(watch_status(other), CM_STATUS_UNAVAILABLE);
    cm_channel_free(in.ch);
    in.ch = NULL;
    ASSERT_INT_EQ(test_proc_wait(&in.p, 20000), 0);
    free_tokens(tok, 2);
    test_proc_kill(&dm.p, SIGTERM);
    ASSERT_INT_EQ(test_proc_wait(&dm.p, 20000), 0);
}

static void test_help_and_bad_config(void) {
    char bin[1024];
    snprintf(bin, sizeof bin, "%s/services/ingest/ingest", test_env("IOT_BUILD_DIR"));
    test_proc_t p;
    char *argv[] = {bin, (char *)"--help", NULL};
    ASSERT_INT_EQ(test_proc_start(&p, argv, NULL, 0), 0);
    char line[512];
    int found = 0;
    while (test_proc_read_line(&p, line, sizeof line, 5000) == 0)
        if (strstr(line, "IOT_INGEST_MAX_PENDING")) found = 1;
    ASSERT_INT_EQ(test_proc_wait(&p, 5000), 0);
    ASSERT(found);
    char *argv2[] = {bin, NULL};
    const char *env[] = {"IOT_INGEST_PARTITION=5h", NULL};
    ASSERT_INT_EQ(test_proc_start(&p, argv2, env, 0), 0);
    ASSERT_INT_EQ(test_proc_wait(&p, 5000), 2);
    char err[4096];
    test_proc_stderr(&p, err, sizeof err);
    ASSERT(strstr(err, "IOT_INGEST_PARTITION"));
}

TEST_MAIN(TEST_ENTRY(test_push_codes_and_nothing_partial), TEST_ENTRY(test_resend_and_stream_resume),
          TEST_ENTRY(test_failed_commit_blocks_later_batches), TEST_ENTRY(test_stream_republishes_after_publish_failure),
          TEST_ENTRY(test_kill9_under_load_keeps_every_ack), TEST_ENTRY(test_postgres_outage_under_load),
          TEST_ENTRY(test_retention_and_aggregations), TEST_ENTRY(test_partition_size_change),
          TEST_ENTRY(test_watch_telemetry), TEST_ENTRY(test_help_and_bad_config))
