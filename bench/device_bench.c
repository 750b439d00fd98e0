/* device-mgmt benchmark (make bench), each figure next to a reference measured in the same run:
 *   - BatchCreateDevices of 10,000 devices (x10, to 100,000) vs raw COPY of 10,000 rows into a
 *     table of the same shape and indexes;
 *   - GetDevice QPS from the cache and from Postgres (cache entries deleted first) vs raw Redis
 *     HMGET and raw Postgres SELECT by id, same client threads;
 *   - ListDevices p50/p99 at 100,000 devices (first page, and a type + label filter) vs the same
 *     SQL straight through libpq.
 * It ends by printing `token=... auth_hex=... get_hex=...` for bench/run.sh to drive
 * AuthenticateDevice and GetDevice with the grpc++ load generator.
 *   device_bench DM_ADDR PG_DSN SCHEMA REDIS_ADDR PREFIX */
#include <inttypes.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "cm_pg.h"
#include "cm_redis.h"
#include "cm_rpc.h"
#include "iot/device/v1/device.pb-c.h"

#define BATCH 10000
#define BATCHES 10
#define THREADS 8
#define SAMPLE 20000

static const char *g_addr, *g_dsn, *g_schema, *g_redis, *g_prefix;

static double now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec * 1e3 + (double)ts.tv_nsec / 1e6;
}

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static double pct(double *v, size_t n, double p) {
    qsort(v, n, sizeof *v, cmp_double);
    return n ? v[(size_t)(p * (double)(n - 1))] : 0;
}

static const char *g_types[] = {"thermostat", "meter", "valve", "camera"};

static double batch_create(cm_channel_t *ch, int b) {
    Iot__Device__V1__Device *devs = calloc(BATCH, sizeof *devs), **pd = calloc(BATCH, sizeof *pd);
    Iot__Device__V1__Device__LabelsEntry *le = calloc(BATCH, sizeof *le), **lep = calloc(BATCH, sizeof *lep);
    char (*ids)[24] = calloc(BATCH, 24);
    for (int i = 0; i < BATCH; i++) {
        int n = b * BATCH + i;
        iot__device__v1__device__init(&devs[i]);
        snprintf(ids[i], 24, "dev-%06d", n);
        devs[i].id = ids[i];
        devs[i].name = (char *)"bench device";
        devs[i].type = (char *)g_types[n % 4];
        devs[i].firmware_version = (char *)"1.0.0";
        iot__device__v1__device__labels_entry__init(&le[i]);
        le[i].key = (char *)"site";
        le[i].value = (char *)(n % 10 == 0 ? "north" : "south");
        lep[i] = &le[i];
        devs[i].labels = &lep[i];
        devs[i].n_labels = 1;
        pd[i] = &devs[i];
    }
    Iot__Device__V1__BatchCreateDevicesRequest req = IOT__DEVICE__V1__BATCH_CREATE_DEVICES_REQUEST__INIT;
    req.devices = pd;
    req.n_devices = BATCH;
    ProtobufCMessage *resp = NULL;
    cm_call_opts_t o = {.timeout_ms = 60000};
    cm_rpc_status_t st = {0};
    double t0 = now_ms();
    int code = cm_channel_unary(ch, "/iot.device.v1.DeviceManager/BatchCreateDevices", &req.base,
                                &iot__device__v1__batch_create_devices_response__descriptor, &resp, &o, &st);
    double ms = now_ms() - t0;
    if (code) fprintf(stderr, "device_bench: BatchCreateDevices: %d %s\n", code, st.message);
    cm_rpc_status_clear(&st);
    if (resp) protobuf_c_message_free_unpacked(resp, NULL);
    free(devs);
    free(pd);
    free(le);
    free(lep);
    free(ids);
    return code ? -1 : ms;
}

/* Raw COPY of the same rows into a table shaped and indexed like devices. */
static double copy_reference(cm_pg_t *pg, int b) {
    cm_pg_conn_t *c = cm_pg_acquire(pg, 5000);
    if (!c) return -1;
    if (b == 0) cm_pg_exec(c, NULL, "CREATE TABLE IF NOT EXISTS bench_ref (LIKE devices INCLUDING ALL)", 0, NULL);
    char *buf = malloc(BATCH * 160), *p = buf;
    for (int i = 0; i < BATCH; i++) {
        int n = b * BATCH + i;
        p += sprintf(p, "dev-%06d\tbench device\t%s\t\t\t0\t0\t{\"site\": \"%s\"}\t{}\t1.0.0\t1\n", n, g_types[n % 4],
                     n % 10 == 0 ? "north" : "south");
    }
    double t0 = now_ms();
    int rc = cm_pg_begin(c);
    if (!rc) rc = cm_pg_copy_begin(c, "COPY bench_ref (id, name, type, model, site, latitude, longitude, labels, metadata, "
                                      "firmware_version, status) FROM STDIN");
    if (!rc) rc = cm_pg_copy_put(c, buf, (size_t)(p - buf));
    if (!rc) rc = cm_pg_copy_end(c);
    if (!rc) rc = cm_pg_commit(c);
    double ms = now_ms() - t0;
    if (rc) fprintf(stderr, "device_bench: COPY: %s\n", cm_pg_error(c));
    free(buf);
    cm_pg_release(pg, c);
    return rc ? -1 : ms;
}

typedef struct worker_s {
    int kind; /* 0 GetDevice, 1 raw redis HMGET, 2 raw pg select */
    int from, n;
    cm_channel_t *ch;
    cm_pg_t *pg;
    long ok, failed;
} worker_t;

static void *worker(void *arg) {
    worker_t *w = arg;
    cm_redis_t *r = w->kind == 1 ? cm_redis_new(g_redis, 2000, NULL) : NULL;
    cm_pg_conn_t *c = w->kind == 2 ? cm_pg_acquire(w->pg, 5000) : NULL;
    char id[24], key[96];
    for (int i = 0; i < w->n; i++) {
        snprintf(id, sizeof id, "dev-%06d", w->from + i);
        int ok = 0;
        if (w->kind == 0) {
            Iot__Device__V1__GetDeviceRequest req = IOT__DEVICE__V1__GET_DEVICE_REQUEST__INIT;
            req.id = id;
            ProtobufCMessage *resp = NULL;
            cm_call_opts_t o = {.timeout_ms = 10000};
            ok = cm_channel_unary(w->ch, "/iot.device.v1.DeviceManager/GetDevice", &req.base,
                                  &iot__device__v1__device__descriptor, &resp, &o, NULL) == 0;
            if (resp) protobuf_c_message_free_unpacked(resp, NULL);
        } else if (w->kind == 1) {
            snprintf(key, sizeof key, "%sd:%s", g_prefix, id);
            redisReply *rep = cm_redis_cmdv(r, "HMGET", key, "pb", "del", "seen", NULL);
            ok = rep && rep->type == REDIS_REPLY_ARRAY;
            if (rep) freeReplyObject(rep);
        } else {
            const char *p[] = {id};
            PGresult *res = NULL;
            ok = c && cm_pg_exec(c, &res, "SELECT * FROM devices WHERE id = $1", 1, p) == 0 && PQntuples(res) == 1;
            PQclear(res);
        }
        if (ok) w->ok++;
        else w->failed++;
    }
    cm_redis_free(r);
    if (c) cm_pg_release(w->pg, c);
    return NULL;
}

static double run_workers(int kind, cm_channel_t *ch, cm_pg_t *pg, int from) {
    worker_t w[THREADS];
    pthread_t th[THREADS];
    double t0 = now_ms();
    for (int i = 0; i < THREADS; i++) {
        w[i] = (worker_t){.kind = kind, .from = from + i * (SAMPLE / THREADS), .n = SAMPLE / THREADS, .ch = ch, .pg = pg};
        pthread_create(&th[i], NULL, worker, &w[i]);
    }
    long ok = 0, failed = 0;
    for (int i = 0; i < THREADS; i++) {
        pthread_join(th[i], NULL);
        ok += w[i].ok;
        failed += w[i].failed;
    }
    double s = (now_ms() - t0) / 1e3;
    if (failed) fprintf(stderr, "device_bench: %ld of %ld reads failed (kind %d)\n", failed, ok + failed, kind);
    return (double)ok / s;
}

static void drop_cache(int from) {
    cm_redis_t *r = cm_redis_new(g_redis, 5000, NULL);
    char key[96], id[24];
    for (int i = 0; i < SAMPLE; i++) {
        snprintf(id, sizeof id, "dev-%06d", from + i);
        snprintf(key, sizeof key, "%sd:%s", g_prefix, id);
        const char *argv[] = {"DEL", key};
        cm_redis_append(r, 2, argv, NULL);
    }
    for (int i = 0; i < SAMPLE; i++) {
        redisReply *rep;
        if (cm_redis_get_reply(r, &rep) == 0) freeReplyObject(rep);
    }
    cm_redis_free(r);
}

static void list_latency(cm_channel_t *ch, cm_pg_t *pg, const char *type, const char *selector, const char *label) {
    enum { N = 300 };
    double ours[N], ref[N];
    for (int i = 0; i < N; i++) {
        Iot__Device__V1__DeviceFilter f = IOT__DEVICE__V1__DEVICE_FILTER__INIT;
        f.type = (char *)type;
        f.label_selector = (char *)selector;
        Iot__Device__V1__ListDevicesRequest req = IOT__DEVICE__V1__LIST_DEVICES_REQUEST__INIT;
        req.filter = &f;
        req.page_size = 100;
        ProtobufCMessage *resp = NULL;
        cm_call_opts_t o = {.timeout_ms = 10000};
        double t0 = now_ms();
        cm_channel_unary(ch, "/iot.device.v1.DeviceManager/ListDevices", &req.base,
                         &iot__device__v1__list_devices_response__descriptor, &resp, &o, NULL);
        ours[i] = now_ms() - t0;
        if (resp) protobuf_c_message_free_unpacked(resp, NULL);
    }
    cm_pg_conn_t *c = cm_pg_acquire(pg, 5000);
    for (int i = 0; i < N && c; i++) {
        PGresult *r = NULL;
        double t0 = now_ms();
        if (*type) {
            const char *p[] = {type, "{\"site\": \"north\"}"};
            cm_pg_exec(c, &r, "SELECT * FROM devices d WHERE d.type = $1 AND d.labels @> $2::jsonb ORDER BY d.id LIMIT 101", 2, p);
        } else {
            cm_pg_exec(c, &r, "SELECT * FROM devices d ORDER BY d.id LIMIT 101", 0, NULL);
        }
        ref[i] = now_ms() - t0;
        PQclear(r);
    }
    if (c) cm_pg_release(pg, c);
    printf("%-40s p50 %6.2f ms  p99 %6.2f ms   raw SQL p50 %6.2f ms  p99 %6.2f ms\n", label, pct(ours, N, 0.5),
           pct(ours, N, 0.99), pct(ref, N, 0.5), pct(ref, N, 0.99));
}

int main(int argc, char **argv) {
    if (argc != 6) {
        fprintf(stderr, "usage: device_bench DM_ADDR PG_DSN SCHEMA REDIS_ADDR PREFIX\n");
        return 2;
    }
    g_addr = argv[1], g_dsn = argv[2], g_schema = argv[3], g_redis = argv[4], g_prefix = argv[5];
    cm_channel_t *ch = cm_channel_new(g_addr, NULL, NULL);
    cm_pg_t *pg = cm_pg_new(g_dsn, g_schema, THREADS, NULL);
    double ours[BATCHES], ref[BATCHES];
    for (int b = 0; b < BATCHES; b++) {
        ours[b] = batch_create(ch, b);
        ref[b] = copy_reference(pg, b);
        if (ours[b] < 0 || ref[b] < 0) return 1;
    }
    printf("%-40s first %6.0f ms  median %6.0f ms  max %6.0f ms   raw COPY median %5.0f ms  (ratio %.1fx)\n",
           "BatchCreateDevices 10,000 (x10 -> 100k)", ours[0], pct(ours, BATCHES, 0.5), pct(ours, BATCHES, 1.0),
           pct(ref, BATCHES, 0.5), pct(ours, BATCHES, 0.5) / pct(ref, BATCHES, 0.5));
    drop_cache(0);
    double uncached = run_workers(0, ch, pg, 0);
    double cached = run_workers(0, ch, pg, 0);
    double raw_redis = run_workers(1, ch, pg, 0);
    double raw_pg = run_workers(2, ch, pg, 0);
    printf("%-40s cached %7.0f/s  uncached %7.0f/s   raw Redis HMGET %7.0f/s  raw PG SELECT %7.0f/s  (%d client threads, "
           "blocking C client)\n",
           "GetDevice QPS", cached, uncached, raw_redis, raw_pg, THREADS);
    list_latency(ch, pg, "", "", "ListDevices page 100, no filter");
    list_latency(ch, pg, "meter", "site=north", "ListDevices page 100, type+label filter");

    /* A token for the load generator. */
    Iot__Device__V1__IssueTokenRequest ir = IOT__DEVICE__V1__ISSUE_TOKEN_REQUEST__INIT;
    ir.device_id = (char *)"dev-000001";
    Iot__Device__V1__IssueTokenResponse *tok = NULL;
    cm_call_opts_t o = {.timeout_ms = 10000};
    if (cm_channel_unary(ch, "/iot.device.v1.DeviceManager/IssueToken", &ir.base,
                         &iot__device__v1__issue_token_response__descriptor, (ProtobufCMessage **)&tok, &o, NULL))
        return 1;
    Iot__Device__V1__AuthenticateDeviceRequest ar = IOT__DEVICE__V1__AUTHENTICATE_DEVICE_REQUEST__INIT;
    ar.token = tok->token;
    Iot__Device__V1__GetDeviceRequest gr = IOT__DEVICE__V1__GET_DEVICE_REQUEST__INIT;
    gr.id = (char *)"dev-000001";
    uint8_t buf[512];
    size_t n = protobuf_c_message_pack(&ar.base, buf);
    printf("token=%s auth_hex=", tok->token);
    for (size_t i = 0; i < n; i++) printf("%02x", buf[i]);
    n = protobuf_c_message_pack(&gr.base, buf);
    printf(" get_hex=");
    for (size_t i = 0; i < n; i++) printf("%02x", buf[i]);
    printf("\n");
    protobuf_c_message_free_unpacked(&tok->base, NULL);
    cm_pg_free(pg);
    cm_channel_free(ch);
    return 0;
}
