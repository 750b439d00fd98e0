/* Benchmark driver for ingest (bench/run.sh runs it; every figure is printed next to its reference).
 *
 *   ingest_bench setup DM_ADDR N TAG OUT         create N devices in device-mgmt, write "id token" lines
 *   ingest_bench copy PG_DSN SCHEMA N DEVICES CONNS
 *                                                reference: raw binary COPY of N rows into the schema's
 *                                                telemetry table, 20,000 rows per transaction, CONNS
 *                                                connections copying disjoint parts at once
 *   ingest_bench load ADDR TOKENS N_PER_DEV BATCH THREADS
 *                                                every device in TOKENS streams N_PER_DEV points in batches
 *                                                of BATCH over its own StreamTelemetry, one batch in flight
 *                                                per device; points/s counts acknowledged points only
 *   ingest_bench open ADDR TOKENS N PID          N concurrent streams, each acknowledged once; prints the
 *                                                RSS of process PID with them open
 *
 * Rows for the reference are encoded by the same code ingest uses (ing_batch.c), before the clock
 * starts, so the reference measures Postgres alone. */
#include <inttypes.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "cm_pg.h"
#include "cm_rpc.h"
#include "bench_util.h"
#include "cm_time.h"
#include "ing_batch.h"
#include "iot/device/v1/device.pb-c.h"
#include "iot/ingest/v1/ingest.pb-c.h"

static double secs_since(int64_t t0) { return (double)(cm_mono_ns() - t0) / 1e9; }

/* ---- setup ------------------------------------------------------------------------------------ */

static int cmd_setup(const char *addr, int n, const char *tag, const char *out) {
    cm_channel_t *ch = cm_channel_new(addr, NULL, NULL);
    FILE *f = fopen(out, "w");
    if (!ch || !f) return 1;
    cm_call_opts_t o = {.timeout_ms = 60000};
    for (int base = 0; base < n; base += 10000) {
        int k = n - base < 10000 ? n - base : 10000;
        Iot__Device__V1__Device *devs = calloc((size_t)k, sizeof *devs);
        Iot__Device__V1__Device **ptrs = calloc((size_t)k, sizeof *ptrs);
        char (*ids)[48] = calloc((size_t)k, 48);
        for (int i = 0; i < k; i++) {
            iot__device__v1__device__init(&devs[i]);
            snprintf(ids[i], 48, "%s-%06d", tag, base + i);
            devs[i].id = devs[i].name = ids[i];
            ptrs[i] = &devs[i];
        }
        Iot__Device__V1__BatchCreateDevicesRequest req = IOT__DEVICE__V1__BATCH_CREATE_DEVICES_REQUEST__INIT;
        req.n_devices = (size_t)k;
        req.devices = ptrs;
        ProtobufCMessage *resp = NULL;
        cm_rpc_status_t st = {0};
        int code = cm_channel_unary(ch, "/iot.device.v1.DeviceManager/BatchCreateDevices", &req.base,
                                    &iot__device__v1__batch_create_devices_response__descriptor, &resp, &o, &st);
        if (resp) protobuf_c_message_free_unpacked(resp, NULL);
        if (code) {
            fprintf(stderr, "setup: BatchCreateDevices: %s\n", st.message);
            return 1;
        }
        cm_rpc_status_clear(&st);
        for (int i = 0; i < k; i++) {
            Iot__Device__V1__IssueTokenRequest t = IOT__DEVICE__V1__ISSUE_TOKEN_REQUEST__INIT;
            t.device_id = ids[i];
            Iot__Device__V1__IssueTokenResponse *tr = NULL;
            code = cm_channel_unary(ch, "/iot.device.v1.DeviceManager/IssueToken", &t.base,
                                    &iot__device__v1__issue_token_response__descriptor, (ProtobufCMessage **)&tr, &o,
                                    &st);
            if (code) {
                fprintf(stderr, "setup: IssueToken: %s\n", st.message);
                return 1;
            }
            fprintf(f, "%s %s\n", ids[i], tr->token);
            protobuf_c_message_free_unpacked(&tr->base, NULL);
            cm_rpc_status_clear(&st);
        }
        free(devs);
        free(ptrs);
        free(ids);
    }
    fclose(f);
    cm_channel_free(ch);
    return 0;
}

/* ---- points ----------------------------------------------------------------------------------- */

typedef struct pts_s {
    size_t n;
    Iot__Ingest__V1__Point *p;
    Iot__Ingest__V1__Point **ptrs;
} pts_t;

static const char *const metrics[] = {"temp", "humidity", "pressure", "battery"};

static void pts_init(pts_t *b, size_t n) {
    b->n = n;
    b->p = calloc(n, sizeof *b->p);
    b->ptrs = calloc(n, sizeof *b->ptrs);
    for (size_t i = 0; i < n; i++) {
        iot__ingest__v1__point__init(&b->p[i]);
        b->p[i].metric = (char *)metrics[i % 4];
        b->p[i].value_case = IOT__INGEST__V1__POINT__VALUE_DOUBLE_VALUE;
        b->ptrs[i] = &b->p[i];
    }
}

static void pts_fill(pts_t *b, uint64_t first_seq, int64_t t) {
    for (size_t i = 0; i < b->n; i++) {
        b->p[i].seq = first_seq + i;
        b->p[i].time_ms = t;
        b->p[i].double_value = 20.0 + (double)((first_seq + i) % 100) * 0.1;
    }
}

static void pts_free(pts_t *b) {
    free(b->p);
    free(b->ptrs);
}

/* ---- copy (reference) ------------------------------------------------------------------------- */

typedef struct copier_s {
    pthread_t th;
    cm_pg_conn_t *c;
    ing_batch_t **bs;
    long from, to;
    int failed;
} copier_t;

static void *copier_main(void *arg) {
    copier_t *k = arg;
    const long per_tx = 200; /* batches of 100: 20,000 rows per transaction, like a full commit group */
    long i = k->from;
    while (i < k->to) {
        if (cm_pg_begin(k->c) ||
            cm_pg_copy_begin(k->c, "COPY telemetry (device_id, metric, ts, seq, kind, v_double, v_int, v_bool, v_text, "
                                   "labels) FROM STDIN WITH (FORMAT binary)") ||
            cm_pg_copy_put(k->c, ing_copy_header, sizeof ing_copy_header))
            goto fail;
        for (long n = 0; n < per_tx && i < k->to; n++, i++)
            if (cm_pg_copy_put(k->c, k->bs[i]->rows.data, k->bs[i]->rows.len)) goto fail;
        if (cm_pg_copy_put(k->c, ing_copy_trailer, sizeof ing_copy_trailer) || cm_pg_copy_end(k->c) ||
            cm_pg_commit(k->c))
            goto fail;
    }
    return NULL;
fail:
    fprintf(stderr, "copy: %s\n", cm_pg_error(k->c));
    k->failed = 1;
    return NULL;
}

/* conns connections copy disjoint halves (thirds, ...) at once. */
static int cmd_copy(const char *dsn, const char *schema, long n, int devices, int conns) {
    const long batch = 100;
    ing_limits_t lim = {86400000LL * 365, 86400000LL};
    int64_t now = cm_wall_ms();
    long nb = (n + batch - 1) / batch;
    ing_batch_t **bs = calloc((size_t)nb, sizeof *bs);
    pts_t p;
    pts_init(&p, (size_t)batch);
    char err[256], dev[48];
    for (long i = 0; i < nb; i++) {
        snprintf(dev, sizeof dev, "ref-%06ld", i % devices);
        pts_fill(&p, (uint64_t)(i / devices) * (uint64_t)batch + 1, now - 1000);
        bs[i] = ing_batch_new(dev, p.ptrs, (size_t)batch, &lim, now, err, sizeof err);
        if (!bs[i]) {
            fprintf(stderr, "copy: %s\n", err);
            return 1;
        }
    }
    pts_free(&p);
    cm_pg_t *pg = cm_pg_new(dsn, schema, conns, NULL);
    copier_t *k = calloc((size_t)conns, sizeof *k);
    for (int j = 0; j < conns; j++) {
        k[j].c = cm_pg_acquire(pg, 5000);
        if (!k[j].c) {
            fprintf(stderr, "copy: %s\n", cm_pg_last_error(pg));
            return 1;
        }
        k[j].bs = bs;
        k[j].from = nb * j / conns;
        k[j].to = nb * (j + 1) / conns;
    }
    int64_t t0 = cm_mono_ns();
    for (int j = 0; j < conns; j++) pthread_create(&k[j].th, NULL, copier_main, &k[j]);
    int failed = 0;
    for (int j = 0; j < conns; j++) {
        pthread_join(k[j].th, NULL);
        failed |= k[j].failed;
    }
    double s = secs_since(t0);
    printf("copy conns=%d points=%ld seconds=%.3f pps=%.0f\n", conns, n, s, (double)n / s);
    for (int j = 0; j < conns; j++) cm_pg_release(pg, k[j].c);
    cm_pg_free(pg);
    free(k);
    for (long i = 0; i < nb; i++) ing_batch_free(bs[i]);
    free(bs);
    return failed;
}

/* ---- load ------------------------------------------------------------------------------------- */

typedef struct bdev_s {
    char id[64];
    char auth[160];
    cm_stream_t *s;
    uint64_t next_seq;
    int64_t sent_ns;
} bdev_t;

typedef struct worker_s {
    pthread_t th;
    cm_channel_t *ch;
    bdev_t *devs;
    int n;
    long per_dev, batch;
    long acked_points;
    int errors;
    double *lat_ms; /* one per batch */
    long n_lat;
} worker_t;

static void *worker_main(void *arg) {
    worker_t *w = arg;
    pts_t p;
    pts_init(&p, (size_t)w->batch);
    long rounds = w->per_dev / w->batch;
    w->lat_ms = calloc((size_t)(rounds * w->n + 1), sizeof *w->lat_ms);
    for (long r = 0; r < rounds; r++) {
        int64_t t = cm_wall_ms();
        for (int i = 0; i < w->n; i++) {
            bdev_t *d = &w->devs[i];
            if (!d->s) continue;
            pts_fill(&p, d->next_seq, t);
            Iot__Ingest__V1__StreamTelemetryRequest m = IOT__INGEST__V1__STREAM_TELEMETRY_REQUEST__INIT;
            m.n_points = p.n;
            m.points = p.ptrs;
            d->sent_ns = cm_mono_ns();
            if (cm_stream_send(d->s, &m.base)) {
                w->errors++;
                cm_stream_finish(d->s, NULL);
                d->s = NULL;
                continue;
            }
            d->next_seq += (uint64_t)w->batch;
        }
        for (int i = 0; i < w->n; i++) {
            bdev_t *d = &w->devs[i];
            if (!d->s) continue;
            Iot__Ingest__V1__TelemetryAck *ack = NULL;
            if (cm_stream_recv(d->s, &iot__ingest__v1__telemetry_ack__descriptor, (ProtobufCMessage **)&ack) != 1) {
                cm_rpc_status_t st = {0};
                cm_stream_finish(d->s, &st);
                if (w->errors++ < 3) fprintf(stderr, "%s: %s %s\n", d->id, cm_status_name(st.code), st.message);
                cm_rpc_status_clear(&st);
                d->s = NULL;
                continue;
            }
            w->acked_points += ack->stored;
            w->lat_ms[w->n_lat++] = (double)(cm_mono_ns() - d->sent_ns) / 1e6;
            protobuf_c_message_free_unpacked(&ack->base, NULL);
        }
    }
    pts_free(&p);
    return NULL;
}

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static bdev_t *read_tokens(const char *file, int *n) {
    FILE *f = fopen(file, "r");
    if (!f) return NULL;
    int cap = 1024;
    bdev_t *d = calloc((size_t)cap, sizeof *d);
    char id[64], tok[128];
    *n = 0;
    while (fscanf(f, "%63s %127s", id, tok) == 2) {
        if (*n == cap) {
            cap *= 2;
            d = realloc(d, (size_t)cap * sizeof *d);
        }
        memset(&d[*n], 0, sizeof d[*n]);
        snprintf(d[*n].id, sizeof d[*n].id, "%s", id);
        snprintf(d[*n].auth, sizeof d[*n].auth, "Bearer %s", tok);
        (*n)++;
    }
    fclose(f);
    return d;
}

static int cmd_load(const char *addr, const char *tokens, long per_dev, long batch, int threads) {
    int n = 0;
    bdev_t *devs = read_tokens(tokens, &n);
    if (!devs || n == 0) return 1;
    worker_t *w = calloc((size_t)threads, sizeof *w);
    int opened = 0;
    for (int t = 0; t < threads; t++) {
        cm_channel_opts_t co = {.own_connection = 1};
        w[t].ch = cm_channel_new(addr, &co, NULL);
        w[t].devs = devs + (long)n * t / threads;
        w[t].n = (int)((long)n * (t + 1) / threads - (long)n * t / threads);
        w[t].per_dev = per_dev;
        w[t].batch = batch;
        for (int i = 0; i < w[t].n; i++) {
            uint64_t resume = 0;
            w[t].devs[i].s = bench_open_telemetry(w[t].ch, w[t].devs[i].id, w[t].devs[i].auth, 600000, &resume);
            w[t].devs[i].next_seq = resume + 1;
            opened += w[t].devs[i].s != NULL;
        }
    }
    int64_t t0 = cm_mono_ns();
    for (int t = 0; t < threads; t++) pthread_create(&w[t].th, NULL, worker_main, &w[t]);
    long acked = 0, nl = 0;
    int errors = 0;
    for (int t = 0; t < threads; t++) {
        pthread_join(w[t].th, NULL);
        acked += w[t].acked_points;
        nl += w[t].n_lat;
        errors += w[t].errors;
    }
    double s = secs_since(t0);
    double *lat = calloc((size_t)nl + 1, sizeof *lat);
    long k = 0;
    for (int t = 0; t < threads; t++) {
        memcpy(lat + k, w[t].lat_ms, (size_t)w[t].n_lat * sizeof *lat);
        k += w[t].n_lat;
    }
    qsort(lat, (size_t)nl, sizeof *lat, cmp_double);
    printf("load devices=%d opened=%d points=%ld seconds=%.3f pps=%.0f p50_ms=%.1f p99_ms=%.1f errors=%d\n", n, opened,
           acked, s, (double)acked / s, nl ? lat[nl / 2] : 0, nl ? lat[(long)((double)nl * 0.99)] : 0, errors);
    for (int t = 0; t < threads; t++) {
        for (int i = 0; i < w[t].n; i++)
            if (w[t].devs[i].s) {
                cm_stream_close_send(w[t].devs[i].s);
                cm_stream_finish(w[t].devs[i].s, NULL);
            }
        free(w[t].lat_ms);
        cm_channel_free(w[t].ch);
    }
    free(lat);
    free(w);
    free(devs);
    return errors ? 1 : 0;
}

/* ---- open ------------------------------------------------------------------------------------- */

static int cmd_open(const char *addr, const char *tokens, int want, long pid) {
    int n = 0;
    bdev_t *devs = read_tokens(tokens, &n);
    if (!devs || n < want) {
        fprintf(stderr, "open: %d tokens, %d wanted\n", n, want);
        return 1;
    }
    long before = bench_rss_kb(pid);
    enum { CHANNELS = 8 };
    cm_channel_t *ch[CHANNELS];
    for (int i = 0; i < CHANNELS; i++) {
        cm_channel_opts_t co = {.own_connection = 1};
        ch[i] = cm_channel_new(addr, &co, NULL);
    }
    int64_t t0 = cm_mono_ns();
    int opened = 0;
    /* All calls first, then the first acknowledgements: the opens overlap like real devices'. */
    for (int i = 0; i < want; i++) {
        cm_md_t md = {"authorization", devs[i].auth, 0};
        cm_call_opts_t o = {.timeout_ms = 600000, .md = &md, .n_md = 1};
        devs[i].s = cm_stream_open(ch[i % CHANNELS], "/iot.ingest.v1.Ingest/StreamTelemetry", &o);
    }
    for (int i = 0; i < want; i++) {
        Iot__Ingest__V1__TelemetryAck *ack = NULL;
        if (devs[i].s &&
            cm_stream_recv(devs[i].s, &iot__ingest__v1__telemetry_ack__descriptor, (ProtobufCMessage **)&ack) == 1) {
            protobuf_c_message_free_unpacked(&ack->base, NULL);
            opened++;
        } else if (devs[i].s) {
            cm_rpc_status_t st = {0};
            cm_stream_finish(devs[i].s, &st);
            if (want - opened < 3) fprintf(stderr, "open %s: %s %s\n", devs[i].id, cm_status_name(st.code), st.message);
            cm_rpc_status_clear(&st);
            devs[i].s = NULL;
        }
    }
    double s = secs_since(t0);
    sleep(1);
    long with = bench_rss_kb(pid);
    printf("open streams=%d seconds=%.2f rss_before_kb=%ld rss_open_kb=%ld per_stream_bytes=%.0f\n", opened, s, before,
           with, opened ? (double)(with - before) * 1024.0 / opened : 0);
    for (int i = 0; i < want; i++)
        if (devs[i].s) {
            cm_stream_cancel(devs[i].s);
            cm_stream_finish(devs[i].s, NULL);
        }
    for (int i = 0; i < CHANNELS; i++) cm_channel_free(ch[i]);
    free(devs);
    return opened == want ? 0 : 1;
}

int main(int argc, char **argv) {
    if (argc >= 6 && strcmp(argv[1], "setup") == 0) return cmd_setup(argv[2], atoi(argv[3]), argv[4], argv[5]);
    if (argc >= 7 && strcmp(argv[1], "copy") == 0)
        return cmd_copy(argv[2], argv[3], atol(argv[4]), atoi(argv[5]), atoi(argv[6]));
    if (argc >= 7 && strcmp(argv[1], "load") == 0)
        return cmd_load(argv[2], argv[3], atol(argv[4]), atol(argv[5]), atoi(argv[6]));
    if (argc >= 6 && strcmp(argv[1], "open") == 0) return cmd_open(argv[2], argv[3], atoi(argv[4]), atol(argv[5]));
    fprintf(stderr, "usage: see the header of bench/ingest_bench.c\n");
    return 2;
}
