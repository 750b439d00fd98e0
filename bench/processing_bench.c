/* Benchmark driver for processing (bench/run.sh runs it; every figure is printed next to its reference).
 *
 *   processing_bench rules ADDR ADMIN_PORT TOKENS N OUT
 *        N rules through CreateRule over the devices in TOKENS ("id token" lines, as ingest_bench setup
 *        writes them): a tenth are z-score detectors on "humidity", each selecting a slice of the
 *        devices; the rest are thresholds `temp > 1000` on one device each (never true for the
 *        normal values below). Waits until the replica at ADMIN_PORT runs them, then writes
 *        "threshold RULE_ID DEVICE" and "zscore RULE_ID NDEVICES" lines to OUT
 *   processing_bench wide ADDR ADMIN_PORT N METRIC OUT
 *        N z-score rules on METRIC selecting every device (for the memory figure), as `rules` does
 *   processing_bench feed REDIS PREFIX SHARDS TOKENS N_PER_DEV BATCH [SEQ_BASE]
 *        writes N_PER_DEV points per device to the telemetry streams, entries exactly as ingest
 *        publishes them (services/ingest/README.md, "Redis streams"), seqs above SEQ_BASE (0)
 *   processing_bench ref REDIS PREFIX SHARDS GROUP
 *        reference: one thread per shard reads every entry with a new consumer group (XREADGROUP
 *        COUNT 256, like processing's default read), unpacks each PublishedBatch and XACKs the
 *        entries read: the raw cost of reading the stream, without evaluating anything
 *   processing_bench drain ADMIN_PORT N
 *        polls processing_points_total until it reaches N; points/s between the first sample that
 *        moved and the first that reached N
 *   processing_bench counter ADMIN_PORT NAME [N]
 *        prints the sample NAME of /metrics, after waiting (up to 30 s) until it reaches N
 *   processing_bench e2e INGEST_ADDR TOKENS PROC_ADDR ADMIN_PORT RULES RATE SECONDS BATCH SEQ_BASE
 *        every device in TOKENS streams batches of BATCH points over its own StreamTelemetry (one
 *        batch in flight per device), paced to RATE points/s in all; every 20 ms one batch of a
 *        device with a threshold rule (from RULES) starts with temp = 1001 + k (the k-th spike),
 *        followed by normal values. A WatchAlerts stream receives the alerts; alert latency is
 *        its FIRED event's arrival minus the send of the batch that carried the spike (one clock:
 *        this process's). Same-run reference: ingest's acknowledgement latency of the same pushes.
 *        Seqs start above SEQ_BASE (points a feed already wrote for the same devices).
 *   processing_bench stats PROC_ADDR RULES
 *        GetRuleStats of every rule in RULES: windows and memory_bytes by kind
 *
 * Output lines are "name key=value ..." for bench/run.sh to pick apart. */
#include <arpa/inet.h>
#include <inttypes.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "bench_util.h"
#include "cm_map.h"
#include "cm_redis.h"
#include "cm_rpc.h"
#include "cm_time.h"
#include "iot/ingest/v1/ingest.pb-c.h"
#include "iot/processing/v1/processing.pb-c.h"

#define PROC "/iot.processing.v1.Processing/"
#define SPIKE_EVERY_MS 20
#define SPIKE_BASE 1001.0 /* spike k carries SPIKE_BASE + k: the alert's value names its spike */

static double secs_since(int64_t t0) { return (double)(cm_mono_ns() - t0) / 1e9; }

static void sleep_ms(long ms) {
    struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

/* The q-quantile of v[0..n) (sorts v); 0 when empty. */
static double quantile(double *v, long n, double q) {
    if (n <= 0) return 0;
    qsort(v, (size_t)n, sizeof *v, cmp_double);
    long i = (long)((double)n * q);
    return v[i < n ? i : n - 1];
}

/* ---- /metrics --------------------------------------------------------------------------------- */

/* The value of an unlabelled sample `name` on the admin server at port, or -1 when it cannot be read.
 * The page carries five series per rule, so it is read into a growing buffer. */
static double metric(int port, const char *name) {
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in sa = {0};
    sa.sin_family = AF_INET;
    sa.sin_port = htons((uint16_t)port);
    sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (fd < 0) return -1;
    if (connect(fd, (struct sockaddr *)&sa, sizeof sa)) {
        close(fd);
        return -1;
    }
    const char req[] = "GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n";
    if (write(fd, req, sizeof req - 1) != (ssize_t)(sizeof req - 1)) {
        close(fd);
        return -1;
    }
    size_t cap = 1 << 16, got = 0;
    char *buf = malloc(cap);
    ssize_t r;
    while (buf && (r = read(fd, buf + got, cap - got - 1)) > 0) {
        got += (size_t)r;
        if (cap - got < 4096) {
            char *nb = realloc(buf, cap * 2);
            if (!nb) break;
            buf = nb;
            cap *= 2;
        }
    }
    close(fd);
    if (!buf) return -1;
    buf[got] = 0;
    double v = -1;
    size_t nl = strlen(name);
    for (const char *p = strstr(buf, "\r\n\r\n"); p; p = strchr(p, '\n')) {
        p++;
        if (strncmp(p, name, nl) == 0 && p[nl] == ' ') {
            v = strtod(p + nl + 1, NULL);
            break;
        }
    }
    free(buf);
    return v;
}

/* ---- devices ---------------------------------------------------------------------------------- */

typedef struct tok_s {
    char id[64];
    char token[128];
} tok_t;

/* The "id token" lines of file; *n of them. The caller frees the array. */
static tok_t *read_tokens(const char *file, int *n) {
    FILE *f = fopen(file, "r");
    if (!f) {
        fprintf(stderr, "%s: cannot open\n", file);
        return NULL;
    }
    int cap = 1024;
    tok_t *t = malloc((size_t)cap * sizeof *t);
    *n = 0;
    while (t && fscanf(f, "%63s %127s", t[*n].id, t[*n].token) == 2)
        if (++*n == cap) {
            cap *= 2;
            tok_t *nt = realloc(t, (size_t)cap * sizeof *t);
            if (!nt) free(t);
            t = nt;
        }
    fclose(f);
    if (t && *n == 0) {
        fprintf(stderr, "%s: no devices\n", file);
        free(t);
        t = NULL;
    }
    return t;
}

/* ---- points ----------------------------------------------------------------------------------- */

typedef struct pts_s {
    size_t n;
    Iot__Ingest__V1__Point *p;
    Iot__Ingest__V1__Point **ptrs;
} pts_t;

/* Same shape as ingest_bench's load: four metrics in turn, a saw-tooth value in [20, 30). */
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

/* Point i gets time t + i * step_ms. */
static void pts_fill(pts_t *b, uint64_t first_seq, int64_t t, int64_t step_ms) {
    for (size_t i = 0; i < b->n; i++) {
        b->p[i].seq = first_seq + i;
        b->p[i].time_ms = t + (int64_t)i * step_ms;
        b->p[i].double_value = 20.0 + (double)((first_seq + i) % 100) * 0.1;
    }
}

static void pts_free(pts_t *b) {
    free(b->p);
    free(b->ptrs);
}

/* ---- rules ------------------------------------------------------------------------------------ */

typedef struct rspec_s {
    int zscore;
    int first, count; /* devices [first, first + count) of the token list; 0: every device */
    const char *metric;
    char id[160];
    long long etag;
} rspec_t;

typedef struct rmaker_s {
    cm_channel_t *ch;
    tok_t *toks;
    rspec_t *specs;
    int n;
    atomic_int next;
    atomic_int failed;
} rmaker_t;

static int create_rule(rmaker_t *m, rspec_t *s, int i) {
    char name[64];
    char **ids = calloc((size_t)s->count + 1, sizeof *ids);
    for (int k = 0; k < s->count; k++) ids[k] = m->toks[s->first + k].id;
    Iot__Processing__V1__Rule r = IOT__PROCESSING__V1__RULE__INIT;
    Iot__Processing__V1__DeviceSelector sel = IOT__PROCESSING__V1__DEVICE_SELECTOR__INIT;
    Iot__Processing__V1__ThresholdCondition th = IOT__PROCESSING__V1__THRESHOLD_CONDITION__INIT;
    Iot__Processing__V1__DetectorCondition det = IOT__PROCESSING__V1__DETECTOR_CONDITION__INIT;
    sel.n_device_ids = (size_t)s->count;
    sel.device_ids = ids;
    r.enabled = 1;
    r.devices = s->count ? &sel : NULL;
    r.name = name;
    if (s->zscore) {
        snprintf(name, sizeof name, "bench z-score %d", i);
        r.metric = (char *)s->metric;
        det.kind = IOT__PROCESSING__V1__DETECTOR_KIND__DETECTOR_KIND_ZSCORE; /* defaults: 5 min, 30 samples, 0.8 */
        r.condition_case = IOT__PROCESSING__V1__RULE__CONDITION_DETECTOR;
        r.detector = &det;
    } else {
        snprintf(name, sizeof name, "bench threshold %d", i);
        r.metric = (char *)s->metric;
        th.op = IOT__PROCESSING__V1__COMPARISON__COMPARISON_GT;
        th.threshold = 1000;
        th.statistic = IOT__PROCESSING__V1__STATISTIC__STATISTIC_VALUE;
        r.condition_case = IOT__PROCESSING__V1__RULE__CONDITION_THRESHOLD;
        r.threshold = &th;
    }
    Iot__Processing__V1__CreateRuleRequest req = IOT__PROCESSING__V1__CREATE_RULE_REQUEST__INIT;
    req.rule = &r;
    Iot__Processing__V1__Rule *out = NULL;
    cm_rpc_status_t st = {0};
    cm_call_opts_t o = {.timeout_ms = 60000};
    int code = cm_channel_unary(m->ch, PROC "CreateRule", &req.base, &iot__processing__v1__rule__descriptor,
                                (ProtobufCMessage **)&out, &o, &st);
    free(ids);
    if (code) {
        fprintf(stderr, "rules: CreateRule: %s %s\n", cm_status_name(code), st.message);
        cm_rpc_status_clear(&st);
        return 1;
    }
    cm_rpc_status_clear(&st);
    snprintf(s->id, sizeof s->id, "%s", out->id);
    s->etag = atoll(out->etag);
    protobuf_c_message_free_unpacked(&out->base, NULL);
    return 0;
}

static void *rmaker_main(void *arg) {
    rmaker_t *m = arg;
    for (int i; (i = atomic_fetch_add(&m->next, 1)) < m->n && !atomic_load(&m->failed);)
        if (create_rule(m, &m->specs[i], i)) atomic_store(&m->failed, 1);
    return NULL;
}

/* Creates specs[0..n) four at a time, waits until the replica at admin runs them all, and writes
 * them to out. */
static int make_rules(const char *addr, int admin, tok_t *toks, rspec_t *specs, int n, const char *out) {
    rmaker_t m = {.ch = cm_channel_new(addr, NULL, NULL), .toks = toks, .specs = specs, .n = n};
    enum { MAKERS = 4 };
    pthread_t th[MAKERS];
    int64_t t0 = cm_mono_ns();
    for (int i = 0; i < MAKERS; i++) pthread_create(&th[i], NULL, rmaker_main, &m);
    for (int i = 0; i < MAKERS; i++) pthread_join(th[i], NULL);
    cm_channel_free(m.ch);
    double create_s = secs_since(t0);
    int rc = atomic_load(&m.failed);
    long long want = 0;
    int nz = 0;
    for (int i = 0; i < n; i++) {
        if (specs[i].etag > want) want = specs[i].etag;
        nz += specs[i].zscore;
    }
    double v = -1;
    int64_t t1 = cm_mono_ns();
    while (!rc && (v = metric(admin, "processing_rules_version")) < (double)want && secs_since(t1) < 120) sleep_ms(50);
    if (!rc && v < (double)want) {
        fprintf(stderr, "rules: processing runs version %.0f after 120 s, want %lld\n", v, want);
        rc = 1;
    }
    FILE *f = rc ? NULL : fopen(out, "w");
    for (int i = 0; f && i < n; i++) {
        if (specs[i].zscore)
            fprintf(f, "zscore %s %d\n", specs[i].id, specs[i].count);
        else
            fprintf(f, "threshold %s %s\n", specs[i].id, toks[specs[i].first].id);
    }
    if (f) fclose(f);
    if (!rc)
        printf("rules created=%d threshold=%d zscore=%d create_seconds=%.2f load_seconds=%.2f version=%lld\n", n, n - nz, nz,
               create_s, secs_since(t1), want);
    return rc;
}

static int cmd_rules(const char *addr, int admin, const char *tokens, int n, const char *out) {
    int nd = 0;
    tok_t *toks = read_tokens(tokens, &nd);
    if (!toks) return 1;
    int nz = n / 10, nt = n - nz;
    rspec_t *specs = calloc((size_t)n, sizeof *specs);
    for (int i = 0; i < nt; i++) {
        specs[i].first = i % nd;
        specs[i].count = 1;
        specs[i].metric = "temp";
    }
    for (int j = 0; j < nz; j++) {
        rspec_t *s = &specs[nt + j];
        s->zscore = 1;
        s->metric = "humidity";
        s->first = (int)((long)nd * j / nz);
        s->count = (int)((long)nd * (j + 1) / nz) - s->first;
        if (s->count == 0) s->count = 1; /* more z-score rules than devices: some share one */
        if (s->first >= nd) s->first = nd - 1;
        if (s->count > 1000) s->count = 1000; /* the selector's limit */
    }
    int rc = make_rules(addr, admin, toks, specs, n, out);
    free(specs);
    free(toks);
    return rc;
}

static int cmd_wide(const char *addr, int admin, int n, const char *metric_name, const char *out) {
    rspec_t *specs = calloc((size_t)n, sizeof *specs);
    for (int i = 0; i < n; i++) {
        specs[i].zscore = 1;
        specs[i].metric = metric_name;
    }
    int rc = make_rules(addr, admin, NULL, specs, n, out);
    free(specs);
    return rc;
}

/* ---- feed ------------------------------------------------------------------------------------- */

/* Reads n pipelined replies; 0 when none failed. */
static int replies(cm_redis_t *r, long n) {
    int rc = 0;
    for (long i = 0; i < n; i++) {
        redisReply *rep = NULL;
        if (cm_redis_get_reply(r, &rep) || !rep) {
            fprintf(stderr, "redis: %s\n", cm_redis_error(r));
            return 1;
        }
        if (rep->type == REDIS_REPLY_ERROR && !rc) {
            fprintf(stderr, "redis: %s\n", rep->str);
            rc = 1;
        }
        freeReplyObject(rep);
    }
    return rc;
}

static int cmd_feed(const char *raddr, const char *prefix, int shards, const char *tokens, long per_dev, long batch,
                    uint64_t seq_base) {
    int nd = 0;
    tok_t *toks = read_tokens(tokens, &nd);
    if (!toks) return 1;
    cm_redis_t *r = cm_redis_new(raddr, 10000, NULL);
    if (!r) {
        free(toks);
        return 1;
    }
    long rounds = per_dev / batch, entries = rounds * nd;
    /* Trimming must not eat the backlog, and ingest may add its own entries meanwhile. */
    char maxlen[24];
    snprintf(maxlen, sizeof maxlen, "%ld", entries + 1000000);
    pts_t p;
    pts_init(&p, (size_t)batch);
    /* Event times 10 ms apart, ending a second ago: inside every window, none late. */
    const int64_t step = 10;
    int64_t t_first = cm_wall_ms() - 1000 - rounds * batch * step;
    size_t cap = 0;
    uint8_t *buf = NULL;
    int rc = 0;
    long pending = 0;
    int64_t t0 = cm_mono_ns();
    for (long k = 0; k < rounds && !rc; k++) {
        for (int d = 0; d < nd && !rc; d++) {
            uint64_t first = seq_base + (uint64_t)(k * batch) + 1;
            pts_fill(&p, first, t_first + k * batch * step, step);
            Iot__Ingest__V1__PublishedBatch pb = IOT__INGEST__V1__PUBLISHED_BATCH__INIT;
            pb.device_id = toks[d].id;
            pb.n_points = p.n;
            pb.points = p.ptrs;
            pb.ingested_ms = cm_wall_ms();
            size_t len = iot__ingest__v1__published_batch__get_packed_size(&pb);
            if (len > cap) {
                cap = len * 2;
                uint8_t *nb = realloc(buf, cap);
                if (!nb) {
                    rc = 1;
                    break;
                }
                buf = nb;
            }
            iot__ingest__v1__published_batch__pack(&pb, buf);
            char key[160], sfirst[24], slast[24], scount[24];
            snprintf(key, sizeof key, "%s{%" PRIu64 "}", prefix, cm_hash64(toks[d].id, strlen(toks[d].id)) % (uint64_t)shards);
            snprintf(sfirst, sizeof sfirst, "%" PRIu64, first);
            snprintf(slast, sizeof slast, "%" PRIu64, first + (uint64_t)batch - 1);
            snprintf(scount, sizeof scount, "%ld", batch);
            const char *argv[] = {"XADD", key, "MAXLEN", "~", maxlen, "*", "device", toks[d].id, "first_seq", sfirst,
                                  "last_seq", slast, "count", scount, "batch", (const char *)buf};
            size_t lens[16];
            for (int i = 0; i < 15; i++) lens[i] = strlen(argv[i]);
            lens[15] = len;
            if (cm_redis_append(r, 16, argv, lens)) rc = 1;
            if (++pending == 512) {
                rc |= replies(r, pending);
                pending = 0;
            }
        }
    }
    if (!rc) rc = replies(r, pending);
    if (!rc)
        printf("feed devices=%d entries=%ld points=%ld seconds=%.2f\n", nd, entries, entries * batch, secs_since(t0));
    free(buf);
    pts_free(&p);
    cm_redis_free(r);
    free(toks);
    return rc;
}

/* ---- ref -------------------------------------------------------------------------------------- */

typedef struct reader_s {
    pthread_t th;
    const char *addr, *group;
    char key[160];
    long entries, points;
    int failed;
} reader_t;

static void *reader_main(void *arg) {
    reader_t *k = arg;
    cm_redis_t *r = cm_redis_new(k->addr, 10000, NULL);
    const char **ack = malloc((256 + 3) * sizeof *ack);
    for (;;) {
        redisReply *rep = r ? cm_redis_cmdv(r, "XREADGROUP", "GROUP", k->group, "ref", "COUNT", "256", "STREAMS", k->key, ">",
                                            NULL)
                            : NULL;
        if (!rep || rep->type == REDIS_REPLY_ERROR) {
            fprintf(stderr, "ref: XREADGROUP %s: %s\n", k->key, rep ? rep->str : cm_redis_error(r));
            k->failed = 1;
            if (rep) freeReplyObject(rep);
            break;
        }
        if (rep->type != REDIS_REPLY_ARRAY || rep->elements == 0) { /* nil: nothing left */
            freeReplyObject(rep);
            break;
        }
        const redisReply *es = rep->element[0]->element[1];
        int na = 3;
        ack[0] = "XACK";
        ack[1] = k->key;
        ack[2] = k->group;
        for (size_t i = 0; i < es->elements; i++) {
            const redisReply *e = es->element[i], *f = e->element[1];
            ack[na++] = e->element[0]->str;
            k->entries++;
            for (size_t j = 0; f->type == REDIS_REPLY_ARRAY && j + 1 < f->elements; j += 2) {
                if (strcmp(f->element[j]->str, "batch") != 0) continue;
                Iot__Ingest__V1__PublishedBatch *pb = iot__ingest__v1__published_batch__unpack(
                    NULL, f->element[j + 1]->len, (const uint8_t *)f->element[j + 1]->str);
                if (pb) {
                    k->points += (long)pb->n_points;
                    protobuf_c_message_free_unpacked(&pb->base, NULL);
                }
            }
        }
        int done = es->elements == 0;
        redisReply *a = done ? NULL : cm_redis_cmd(r, na, ack, NULL);
        if (a) freeReplyObject(a);
        freeReplyObject(rep);
        if (done) break;
    }
    free(ack);
    cm_redis_free(r);
    return NULL;
}

static int cmd_ref(const char *raddr, const char *prefix, int shards, const char *group) {
    reader_t *k = calloc((size_t)shards, sizeof *k);
    cm_redis_t *r = cm_redis_new(raddr, 10000, NULL);
    int rc = r ? 0 : 1;
    for (int s = 0; s < shards && !rc; s++) {
        k[s].addr = raddr;
        k[s].group = group;
        snprintf(k[s].key, sizeof k[s].key, "%s{%d}", prefix, s);
        redisReply *rep = cm_redis_cmdv(r, "XGROUP", "CREATE", k[s].key, group, "0", "MKSTREAM", NULL);
        if (!rep || rep->type == REDIS_REPLY_ERROR) {
            fprintf(stderr, "ref: XGROUP CREATE %s: %s\n", k[s].key, rep ? rep->str : cm_redis_error(r));
            rc = 1;
        }
        if (rep) freeReplyObject(rep);
    }
    int64_t t0 = cm_mono_ns();
    for (int s = 0; s < shards && !rc; s++) pthread_create(&k[s].th, NULL, reader_main, &k[s]);
    long entries = 0, points = 0;
    for (int s = 0; s < shards && !rc; s++) {
        pthread_join(k[s].th, NULL);
        entries += k[s].entries;
        points += k[s].points;
        rc |= k[s].failed;
    }
    double secs = secs_since(t0);
    if (!rc)
        printf("ref shards=%d entries=%ld points=%ld seconds=%.3f pps=%.0f\n", shards, entries, points, secs,
               (double)points / secs);
    for (int s = 0; s < shards && r; s++) { /* the group is ours alone: drop it, and its memory */
        redisReply *rep = cm_redis_cmdv(r, "XGROUP", "DESTROY", k[s].key, group, NULL);
        if (rep) freeReplyObject(rep);
    }
    cm_redis_free(r);
    free(k);
    return rc;
}

/* ---- drain ------------------------------------------------------------------------------------ */

static int cmd_drain(int admin, double n) {
    double v0 = -1, v = -1, v_first = -1, last = -1;
    int64_t t_first = 0, t_end = 0, t_moved = cm_mono_ns();
    for (;;) {
        int64_t t = cm_mono_ns();
        v = metric(admin, "processing_points_total");
        if (v0 < 0 && v >= 0) v0 = v;
        if (v_first < 0 && v0 >= 0 && v > v0) {
            v_first = v;
            t_first = t;
        }
        if (v > last) {
            last = v;
            t_moved = t;
        }
        if (v >= n) {
            t_end = t;
            break;
        }
        if ((double)(t - t_moved) / 1e9 > 30) {
            fprintf(stderr, "drain: processing_points_total stuck at %.0f of %.0f for 30 s\n", v, n);
            return 1;
        }
        sleep_ms(100); /* a scrape renders five series per rule: keep it out of what is measured */
    }
    /* Both ends are samples of the counter, so the rate needs no guess at when work began. */
    double secs = (double)(t_end - t_first) / 1e9;
    if (v_first < 0 || secs <= 0) {
        fprintf(stderr, "drain: the counter was already at %.0f when polling began; no rate (feed more points)\n", v);
        return 1;
    }
    printf("drain points=%.0f seconds=%.3f pps=%.0f\n", v - v_first, secs, (v - v_first) / secs);
    return 0;
}

static int cmd_counter(int admin, const char *name, double n) {
    double v = -1;
    int64_t t0 = cm_mono_ns();
    while ((v = metric(admin, name)) < n && secs_since(t0) < 30) sleep_ms(20);
    printf("counter name=%s value=%.0f seconds=%.2f\n", name, v, secs_since(t0));
    return v >= n && v >= 0 ? 0 : 1;
}

/* ---- e2e -------------------------------------------------------------------------------------- */

typedef struct edev_s {
    char id[64];
    char auth[160];
    cm_stream_t *s;
    uint64_t next_seq;
    int thr;          /* has a threshold rule: may carry a spike */
    atomic_int busy;  /* a batch is in flight */
    atomic_int dead;  /* the stream failed */
} edev_t;

typedef struct inflight_s {
    int dev;
    long spike; /* -1: none */
    int64_t sent_ns;
} inflight_t;

typedef struct e2e_s {
    long batch;
    _Atomic int64_t next_spike_ns;
    atomic_long n_spikes;
    long cap_spikes;
    _Atomic int64_t *spike_sent_ns;
    double *spike_ack_ms;  /* -1 until stored; written by the lane that sent it */
    double *alert_ms;      /* -1 until the FIRED event arrived; written by the watcher */
    atomic_long matched;   /* spikes whose alert arrived */
    long other_events;     /* events that name no spike (resolutions, other rules) */
} e2e_t;

/* One sender and one receiver over a slice of the devices and one connection. The receiver takes
 * acknowledgements in send order: each device has at most one batch in flight and ingest answers
 * in commit order, so the head of the queue is (nearly) always the next to be answered. */
typedef struct lane_s {
    pthread_t tx, rx;
    e2e_t *e;
    cm_channel_t *ch;
    edev_t *devs;
    int n;
    int64_t start_ns, end_ns, slot_ns;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    inflight_t *ring;
    size_t cap, head, len;
    int tx_done;
    long sent_points, acked_points, skipped, errors;
    double *lat;
    long n_lat, cap_lat;
} lane_t;

static void *lane_tx(void *arg) {
    lane_t *l = arg;
    e2e_t *e = l->e;
    pts_t p;
    pts_init(&p, (size_t)e->batch);
    for (long slot = 0;; slot++) {
        int64_t due = l->start_ns + slot * l->slot_ns;
        if (due >= l->end_ns) break;
        struct timespec ts = {(time_t)(due / 1000000000), (long)(due % 1000000000)};
        while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, NULL) != 0) {
        }
        edev_t *d = &l->devs[slot % l->n];
        if (atomic_load(&d->dead) || atomic_load(&d->busy)) {
            l->skipped++; /* the previous batch is not acknowledged yet: the rate falls, visibly */
            continue;
        }
        pts_fill(&p, d->next_seq, cm_wall_ms(), 0);
        long spike = -1;
        int64_t now = cm_mono_ns(), next = atomic_load(&e->next_spike_ns);
        if (d->thr && now >= next && atomic_compare_exchange_strong(&e->next_spike_ns, &next, now + SPIKE_EVERY_MS * 1000000LL)) {
            spike = atomic_fetch_add(&e->n_spikes, 1);
            if (spike < e->cap_spikes)
                p.p[0].double_value = SPIKE_BASE + (double)spike; /* point 0 is temp; point 4 (normal) resolves it */
            else
                spike = -1;
        }
        Iot__Ingest__V1__StreamTelemetryRequest m = IOT__INGEST__V1__STREAM_TELEMETRY_REQUEST__INIT;
        m.n_points = p.n;
        m.points = p.ptrs;
        atomic_store(&d->busy, 1);
        pthread_mutex_lock(&l->mu);
        inflight_t *f = &l->ring[(l->head + l->len) % l->cap];
        f->dev = (int)(d - l->devs);
        f->spike = spike;
        f->sent_ns = cm_mono_ns();
        if (spike >= 0) atomic_store(&e->spike_sent_ns[spike], f->sent_ns);
        l->len++;
        pthread_cond_signal(&l->cv);
        pthread_mutex_unlock(&l->mu);
        /* Queued before the send, so the receiver waits on this stream only once the batch is out
         * or about to be; a failed send shows up there as a failed receive. */
        if (cm_stream_send(d->s, &m.base) == 0) {
            d->next_seq += (uint64_t)e->batch;
            l->sent_points += e->batch;
        }
    }
    pts_free(&p);
    pthread_mutex_lock(&l->mu);
    l->tx_done = 1;
    pthread_cond_signal(&l->cv);
    pthread_mutex_unlock(&l->mu);
    return NULL;
}

static void *lane_rx(void *arg) {
    lane_t *l = arg;
    e2e_t *e = l->e;
    for (;;) {
        pthread_mutex_lock(&l->mu);
        while (l->len == 0 && !l->tx_done) pthread_cond_wait(&l->cv, &l->mu);
        if (l->len == 0) {
            pthread_mutex_unlock(&l->mu);
            break;
        }
        inflight_t f = l->ring[l->head];
        pthread_mutex_unlock(&l->mu);
        edev_t *d = &l->devs[f.dev];
        Iot__Ingest__V1__TelemetryAck *ack = NULL;
        if (cm_stream_recv(d->s, &iot__ingest__v1__telemetry_ack__descriptor, (ProtobufCMessage **)&ack) == 1) {
            double ms = (double)(cm_mono_ns() - f.sent_ns) / 1e6;
            l->acked_points += ack->stored;
            if (l->n_lat == l->cap_lat) {
                l->cap_lat = l->cap_lat ? l->cap_lat * 2 : 4096;
                l->lat = realloc(l->lat, (size_t)l->cap_lat * sizeof *l->lat);
            }
            l->lat[l->n_lat++] = ms;
            if (f.spike >= 0 && ack->stored > 0) e->spike_ack_ms[f.spike] = ms;
            protobuf_c_message_free_unpacked(&ack->base, NULL);
            atomic_store(&d->busy, 0);
        } else {
            if (l->errors++ < 3) fprintf(stderr, "e2e: %s: stream ended\n", d->id);
            atomic_store(&d->dead, 1);
        }
        pthread_mutex_lock(&l->mu);
        l->head = (l->head + 1) % l->cap;
        l->len--;
        pthread_mutex_unlock(&l->mu);
    }
    return NULL;
}

typedef struct watcher_s {
    pthread_t th;
    cm_stream_t *s;
    e2e_t *e;
} watcher_t;

static void *watcher_main(void *arg) {
    watcher_t *w = arg;
    e2e_t *e = w->e;
    Iot__Processing__V1__Alert *a = NULL;
    while (cm_stream_recv(w->s, &iot__processing__v1__alert__descriptor, (ProtobufCMessage **)&a) == 1) {
        int64_t now = cm_mono_ns();
        long k = (long)(a->value - SPIKE_BASE + 0.5);
        int64_t sent = k >= 0 && k < e->cap_spikes ? atomic_load(&e->spike_sent_ns[k]) : 0;
        /* The first event of a spike's alert is its firing; a second rule on the same device would
         * fire too, and counts once. */
        if (a->state == IOT__PROCESSING__V1__ALERT_STATE__ALERT_STATE_FIRING && a->value >= SPIKE_BASE && sent &&
            e->alert_ms[k] < 0) {
            e->alert_ms[k] = (double)(now - sent) / 1e6;
            atomic_fetch_add(&e->matched, 1);
        } else {
            e->other_events++;
        }
        protobuf_c_message_free_unpacked(&a->base, NULL);
        a = NULL;
    }
    return NULL;
}

static int cmd_e2e(const char *ing_addr, const char *tokens, const char *proc_addr, int admin, const char *rules_file,
                   double rate, double seconds, long batch, uint64_t seq_base) {
    int nd = 0;
    tok_t *toks = read_tokens(tokens, &nd);
    if (!toks) return 1;
    cm_map_t *thr = cm_map_new();
    FILE *rf = fopen(rules_file, "r");
    char kind[16], rid[160], arg[64];
    while (rf && fscanf(rf, "%15s %159s %63s", kind, rid, arg) == 3)
        if (strcmp(kind, "threshold") == 0) *cm_map_slot(thr, arg, strlen(arg), NULL) = (void *)1;
    if (rf) fclose(rf);
    e2e_t e = {.batch = batch};
    e.cap_spikes = (long)(seconds * 1000 / SPIKE_EVERY_MS) + 64;
    e.spike_sent_ns = calloc((size_t)e.cap_spikes, sizeof *e.spike_sent_ns);
    e.spike_ack_ms = malloc((size_t)e.cap_spikes * sizeof *e.spike_ack_ms);
    e.alert_ms = malloc((size_t)e.cap_spikes * sizeof *e.alert_ms);
    for (long k = 0; k < e.cap_spikes; k++) e.spike_ack_ms[k] = e.alert_ms[k] = -1;

    /* The watcher first: it sees events from the moment it is registered. */
    cm_channel_t *pch = cm_channel_new(proc_addr, NULL, NULL);
    cm_call_opts_t wo = {.timeout_ms = (int64_t)(seconds * 1000) + 600000};
    watcher_t w = {.e = &e, .s = cm_stream_open(pch, PROC "WatchAlerts", &wo)};
    Iot__Processing__V1__WatchAlertsRequest wr = IOT__PROCESSING__V1__WATCH_ALERTS_REQUEST__INIT;
    if (!w.s || cm_stream_send(w.s, &wr.base)) {
        fprintf(stderr, "e2e: WatchAlerts could not start\n");
        if (w.s) cm_stream_finish(w.s, NULL);
        cm_channel_free(pch);
        free(e.spike_sent_ns);
        free(e.spike_ack_ms);
        free(e.alert_ms);
        cm_map_free(thr, NULL);
        free(toks);
        return 1;
    }
    cm_stream_close_send(w.s);
    pthread_create(&w.th, NULL, watcher_main, &w);

    enum { LANES = 2 };
    lane_t lanes[LANES];
    edev_t *devs = calloc((size_t)nd, sizeof *devs);
    int opened = 0, n_thr = 0;
    for (int i = 0; i < nd; i++) {
        snprintf(devs[i].id, sizeof devs[i].id, "%s", toks[i].id);
        snprintf(devs[i].auth, sizeof devs[i].auth, "Bearer %s", toks[i].token);
        devs[i].thr = cm_map_get(thr, toks[i].id, strlen(toks[i].id)) != NULL;
        n_thr += devs[i].thr;
    }
    /* Each device sends one batch every `period`; a lane's slots are spread evenly over it, and the
     * lanes are offset by half a slot, so the load is smooth rather than one burst per period. */
    int64_t period_ns = (int64_t)((double)batch * nd / rate * 1e9);
    for (int t = 0; t < LANES; t++) {
        lane_t *l = &lanes[t];
        memset(l, 0, sizeof *l);
        l->e = &e;
        cm_channel_opts_t co = {.own_connection = 1};
        l->ch = cm_channel_new(ing_addr, &co, NULL);
        l->devs = devs + (long)nd * t / LANES;
        l->n = (int)((long)nd * (t + 1) / LANES - (long)nd * t / LANES);
        l->cap = (size_t)l->n + 1;
        l->ring = calloc(l->cap, sizeof *l->ring);
        l->slot_ns = period_ns / (l->n ? l->n : 1);
        pthread_mutex_init(&l->mu, NULL);
        pthread_cond_init(&l->cv, NULL);
        for (int i = 0; i < l->n; i++) {
            uint64_t resume = 0;
            l->devs[i].s = bench_open_telemetry(l->ch, l->devs[i].id, l->devs[i].auth, 3600000, &resume);
            l->devs[i].next_seq = (resume > seq_base ? resume : seq_base) + 1;
            if (l->devs[i].s)
                opened++;
            else
                atomic_store(&l->devs[i].dead, 1);
        }
    }
    sleep_ms(300); /* the watcher is registered by now (it has no first message to wait for) */
    double p0 = metric(admin, "processing_points_total");
    int64_t start = cm_mono_ns() + 10000000;
    atomic_store(&e.next_spike_ns, start);
    for (int t = 0; t < LANES; t++) {
        lanes[t].start_ns = start + lanes[t].slot_ns * t / LANES;
        lanes[t].end_ns = start + (int64_t)(seconds * 1e9);
        pthread_create(&lanes[t].tx, NULL, lane_tx, &lanes[t]);
        pthread_create(&lanes[t].rx, NULL, lane_rx, &lanes[t]);
    }
    long sent = 0, acked = 0, skipped = 0, nl = 0;
    int errors = 0;
    for (int t = 0; t < LANES; t++) {
        pthread_join(lanes[t].tx, NULL);
        pthread_join(lanes[t].rx, NULL);
        sent += lanes[t].sent_points;
        acked += lanes[t].acked_points;
        skipped += lanes[t].skipped;
        nl += lanes[t].n_lat;
        errors += (int)lanes[t].errors;
    }
    double secs = secs_since(start);
    double p1 = metric(admin, "processing_points_total");

    /* Spikes that were stored must alert; wait for the stragglers (and for processing to catch up). */
    long spikes = atomic_load(&e.n_spikes), stored_spikes = 0;
    if (spikes > e.cap_spikes) spikes = e.cap_spikes;
    for (long k = 0; k < spikes; k++) stored_spikes += e.spike_ack_ms[k] >= 0;
    int64_t t_end = cm_mono_ns();
    double caught_up_ms = -1;
    while (secs_since(t_end) < 30) {
        if (caught_up_ms < 0 && metric(admin, "processing_points_total") - p0 >= (double)acked)
            caught_up_ms = secs_since(t_end) * 1000;
        if (caught_up_ms >= 0 && atomic_load(&e.matched) >= stored_spikes) break;
        sleep_ms(20);
    }
    cm_stream_cancel(w.s);
    pthread_join(w.th, NULL);
    cm_stream_finish(w.s, NULL);

    double *lat = malloc((size_t)(nl + 1) * sizeof *lat), *sack = malloc((size_t)(spikes + 1) * sizeof *sack),
           *alat = malloc((size_t)(spikes + 1) * sizeof *alat), *share = malloc((size_t)(spikes + 1) * sizeof *share);
    long k = 0, ns = 0, na = 0, nsh = 0;
    for (int t = 0; t < LANES; t++) {
        if (lanes[t].n_lat) memcpy(lat + k, lanes[t].lat, (size_t)lanes[t].n_lat * sizeof *lat);
        k += lanes[t].n_lat;
    }
    for (long i = 0; i < spikes; i++) {
        if (e.spike_ack_ms[i] >= 0) sack[ns++] = e.spike_ack_ms[i];
        if (e.alert_ms[i] >= 0) alat[na++] = e.alert_ms[i];
        /* What processing adds to a push ingest has stored (and published: ingest answers after both). */
        if (e.alert_ms[i] >= 0 && e.spike_ack_ms[i] >= 0) share[nsh++] = e.alert_ms[i] - e.spike_ack_ms[i];
    }
    printf("e2e devices=%d opened=%d threshold_devices=%d target_pps=%.0f seconds=%.2f sent=%ld acked=%ld pps=%.0f "
           "skipped_sends=%ld ack_p50_ms=%.1f ack_p99_ms=%.1f spikes=%ld spikes_stored=%ld alerts=%ld "
           "spike_ack_p50_ms=%.1f spike_ack_p99_ms=%.1f alert_p50_ms=%.1f alert_p99_ms=%.1f alert_max_ms=%.1f "
           "after_ack_p50_ms=%.1f after_ack_p99_ms=%.1f other_events=%ld lag_points=%.0f caught_up_ms=%.0f errors=%d\n",
           nd, opened, n_thr, rate, secs, sent, acked, (double)acked / secs, skipped, quantile(lat, nl, 0.5),
           quantile(lat, nl, 0.99), spikes, stored_spikes, na, quantile(sack, ns, 0.5), quantile(sack, ns, 0.99),
           quantile(alat, na, 0.5), quantile(alat, na, 0.99), quantile(alat, na, 1.0), quantile(share, nsh, 0.5),
           quantile(share, nsh, 0.99), e.other_events,
           (double)acked - (p1 - p0), caught_up_ms, errors);
    free(lat);
    free(sack);
    free(alat);
    free(share);
    for (int t = 0; t < LANES; t++) {
        lane_t *l = &lanes[t];
        for (int i = 0; i < l->n; i++)
            if (l->devs[i].s) {
                cm_stream_close_send(l->devs[i].s);
                cm_stream_finish(l->devs[i].s, NULL);
            }
        free(l->lat);
        free(l->ring);
        pthread_mutex_destroy(&l->mu);
        pthread_cond_destroy(&l->cv);
        cm_channel_free(l->ch);
    }
    cm_channel_free(pch);
    free(devs);
    free(e.spike_sent_ns);
    free(e.spike_ack_ms);
    free(e.alert_ms);
    cm_map_free(thr, NULL);
    free(toks);
    int ok = errors == 0 && opened == nd && na == stored_spikes && caught_up_ms >= 0;
    return ok ? 0 : 1;
}

/* ---- stats ------------------------------------------------------------------------------------ */

static int cmd_stats(const char *addr, const char *rules_file) {
    FILE *f = fopen(rules_file, "r");
    if (!f) return 1;
    cm_channel_t *ch = cm_channel_new(addr, NULL, NULL);
    char kind[16], rid[160], arg[64];
    long long win[2] = {0}, mem[2] = {0}, evals[2] = {0}, rules[2] = {0}, one_win = -1, one_mem = -1;
    double cpu[2] = {0};
    int rc = 0;
    while (!rc && fscanf(f, "%15s %159s %63s", kind, rid, arg) == 3) {
        int z = strcmp(kind, "zscore") == 0;
        Iot__Processing__V1__GetRuleStatsRequest req = IOT__PROCESSING__V1__GET_RULE_STATS_REQUEST__INIT;
        req.rule_id = rid;
        Iot__Processing__V1__RuleStats *s = NULL;
        cm_rpc_status_t st = {0};
        cm_call_opts_t o = {.timeout_ms = 10000};
        int code = cm_channel_unary(ch, PROC "GetRuleStats", &req.base, &iot__processing__v1__rule_stats__descriptor,
                                    (ProtobufCMessage **)&s, &o, &st);
        if (code) {
            fprintf(stderr, "stats: GetRuleStats %s: %s %s\n", rid, cm_status_name(code), st.message);
            rc = 1;
        } else {
            rules[z]++;
            win[z] += s->windows;
            mem[z] += s->memory_bytes;
            evals[z] += s->evaluations;
            cpu[z] += s->cpu_seconds;
            if (z && one_win < 0) {
                one_win = s->windows;
                one_mem = s->memory_bytes;
            }
            protobuf_c_message_free_unpacked(&s->base, NULL);
        }
        cm_rpc_status_clear(&st);
    }
    fclose(f);
    cm_channel_free(ch);
    if (rc) return rc;
    printf("stats rules=%lld zscore_rules=%lld zscore_windows=%lld zscore_bytes=%lld zscore_bytes_per_window=%.0f "
           "one_zscore_windows=%lld one_zscore_bytes=%lld one_zscore_bytes_per_window=%.0f threshold_rules=%lld "
           "threshold_states=%lld threshold_bytes=%lld threshold_bytes_per_state=%.0f states=%lld bytes=%lld "
           "evaluations=%lld eval_ns=%.0f\n",
           rules[0] + rules[1], rules[1], win[1], mem[1], win[1] ? (double)mem[1] / (double)win[1] : 0, one_win, one_mem,
           one_win > 0 ? (double)one_mem / (double)one_win : 0, rules[0], win[0], mem[0],
           win[0] ? (double)mem[0] / (double)win[0] : 0, win[0] + win[1], mem[0] + mem[1], evals[0] + evals[1],
           evals[0] + evals[1] ? (cpu[0] + cpu[1]) * 1e9 / (double)(evals[0] + evals[1]) : 0);
    return 0;
}

int main(int argc, char **argv) {
    if (argc >= 7 && strcmp(argv[1], "rules") == 0) return cmd_rules(argv[2], atoi(argv[3]), argv[4], atoi(argv[5]), argv[6]);
    if (argc >= 8 && strcmp(argv[1], "feed") == 0)
        return cmd_feed(argv[2], argv[3], atoi(argv[4]), argv[5], atol(argv[6]), atol(argv[7]),
                        argc >= 9 ? strtoull(argv[8], NULL, 10) : 0);
    if (argc >= 7 && strcmp(argv[1], "wide") == 0) return cmd_wide(argv[2], atoi(argv[3]), atoi(argv[4]), argv[5], argv[6]);
    if (argc >= 6 && strcmp(argv[1], "ref") == 0) return cmd_ref(argv[2], argv[3], atoi(argv[4]), argv[5]);
    if (argc >= 4 && strcmp(argv[1], "drain") == 0) return cmd_drain(atoi(argv[2]), atof(argv[3]));
    if (argc >= 4 && strcmp(argv[1], "counter") == 0) return cmd_counter(atoi(argv[2]), argv[3], argc >= 5 ? atof(argv[4]) : 0);
    if (argc >= 11 && strcmp(argv[1], "e2e") == 0)
        return cmd_e2e(argv[2], argv[3], argv[4], atoi(argv[5]), argv[6], atof(argv[7]), atof(argv[8]), atol(argv[9]),
                       strtoull(argv[10], NULL, 10));
    if (argc >= 4 && strcmp(argv[1], "stats") == 0) return cmd_stats(argv[2], argv[3]);
    fprintf(stderr, "usage: see the header of bench/processing_bench.c\n");
    return 2;
}
