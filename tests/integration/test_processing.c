/* The processing binary fed by a real ingest, with device-mgmt, Postgres and Redis from
 * tests/run.sh: window statistics against a reference computed here, the z-score alert at the
 * right point, stuck/rate/absence detectors firing and resolving, a threshold-with-duration rule
 * firing once per episode across a kill -9 and replay, the emergency command reaching a device
 * that watches its commands, and two replicas splitting shards and taking over from each other.
 * Every test has its own schemas, key prefixes and consumer group. */
#include <arpa/inet.h>
#include <math.h>
#include <netinet/in.h>
#include <pthread.h>
#include <signal.h>
#include <sys/socket.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "cm_rpc.h"
#include "iot/device/v1/device.pb-c.h"
#include "iot/ingest/v1/ingest.pb-c.h"
#include "iot/processing/v1/processing.pb-c.h"
#include "proc.h"
#include "test.h"

#define PROC "/iot.processing.v1.Processing/"
#define DM "/iot.device.v1.DeviceManager/"

typedef struct svc_s {
    test_proc_t p;
    cm_channel_t *ch;
} svc_t;

static char dm_schema[96], dm_prefix[96], ing_schema[96], ing_prefix[96], proc_schema[96], proc_prefix[96];

static void fresh_names(const char *name) {
    int pid = (int)getpid();
    snprintf(dm_schema, sizeof dm_schema, "IOT_DM_PG_SCHEMA=tp_dm_%s_%d", name, pid);
    snprintf(dm_prefix, sizeof dm_prefix, "IOT_DM_REDIS_PREFIX={tp-%s-%d}:", name, pid);
    snprintf(ing_schema, sizeof ing_schema, "IOT_INGEST_PG_SCHEMA=tp_ing_%s_%d", name, pid);
    snprintf(ing_prefix, sizeof ing_prefix, "IOT_INGEST_STREAM_PREFIX=tp-%s-%d:", name, pid);
    snprintf(proc_schema, sizeof proc_schema, "IOT_PROC_PG_SCHEMA=tp_proc_%s_%d", name, pid);
    snprintf(proc_prefix, sizeof proc_prefix, "IOT_PROC_REDIS_PREFIX=tp-%s-%d:proc:", name, pid);
}

static void svc_connect(svc_t *s) {
    char target[64];
    snprintf(target, sizeof target, "127.0.0.1:%d", s->p.grpc_port);
    s->ch = cm_channel_new(target, NULL, NULL);
}

static const char *pg_env(void) {
    static char v[1024];
    snprintf(v, sizeof v, "IOT_PG_DSN=%s", test_env("IOT_TEST_PG"));
    return v;
}
static const char *redis_env(void) {
    static char v[128];
    snprintf(v, sizeof v, "IOT_REDIS_ADDR=%s", test_env("IOT_TEST_REDIS"));
    return v;
}

static void dm_start(svc_t *d) {
    static char bin[1024];
    snprintf(bin, sizeof bin, "%s/services/device-mgmt/device-mgmt", test_env("IOT_BUILD_DIR"));
    char *argv[] = {bin, NULL};
    const char *env[] = {pg_env(), redis_env(), "IOT_DM_MIGRATIONS=services/device-mgmt/migrations", dm_schema, dm_prefix,
                         "IOT_GRPC_LISTEN=127.0.0.1:0", "IOT_ADMIN_LISTEN=127.0.0.1:0", NULL};
    ASSERT_INT_EQ(test_proc_start(&d->p, argv, env, 1), 0);
    svc_connect(d);
}

static void ing_start(svc_t *s, int dm_port) {
    static char bin[1024], dm_env[64];
    snprintf(bin, sizeof bin, "%s/services/ingest/ingest", test_env("IOT_BUILD_DIR"));
    snprintf(dm_env, sizeof dm_env, "IOT_INGEST_DM_ADDR=127.0.0.1:%d", dm_port);
    char *argv[] = {bin, NULL};
    const char *env[] = {pg_env(), redis_env(), dm_env, "IOT_INGEST_MIGRATIONS=services/ingest/migrations", ing_schema,
                         ing_prefix, "IOT_GRPC_LISTEN=127.0.0.1:0", "IOT_ADMIN_LISTEN=127.0.0.1:0", NULL};
    ASSERT_INT_EQ(test_proc_start(&s->p, argv, env, 1), 0);
    svc_connect(s);
}

/* extra: up to six more "K=V" settings. */
static void proc_start(svc_t *s, int dm_port, const char *const *extra) {
    static char bin[1024], dm_env[64];
    snprintf(bin, sizeof bin, "%s/services/processing/processing", test_env("IOT_BUILD_DIR"));
    snprintf(dm_env, sizeof dm_env, "IOT_PROC_DM_ADDR=127.0.0.1:%d", dm_port);
    char *argv[] = {bin, NULL};
    const char *env[20] = {pg_env(), redis_env(), dm_env, "IOT_PROC_MIGRATIONS=services/processing/migrations",
                           proc_schema, proc_prefix, ing_prefix, "IOT_GRPC_LISTEN=127.0.0.1:0",
                           "IOT_ADMIN_LISTEN=127.0.0.1:0", "IOT_PROC_RULES_POLL=50ms", "IOT_PROC_STATS_INTERVAL=100ms",
                           "IOT_PROC_FLUSH_INTERVAL=100ms", "IOT_PROC_LEASE_TTL=1500ms", "IOT_PROC_ACTION_BACKOFF=100ms"};
    int n = 14;
    for (int i = 0; extra && extra[i] && n < 19; i++) env[n++] = extra[i];
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

static void svc_kill9(svc_t *s) {
    cm_channel_free(s->ch);
    s->ch = NULL;
    test_proc_kill(&s->p, SIGKILL);
    test_proc_wait(&s->p, 10000);
}

static void pbfree(void *m) {
    if (m) protobuf_c_message_free_unpacked(m, NULL);
}

static char last_msg[512];

static int unary(cm_channel_t *ch, const char *path, const void *req, const ProtobufCMessageDescriptor *desc,
                 void *resp, const char *token) {
    cm_rpc_status_t st = {0};
    char auth[256];
    cm_md_t md = {"authorization", auth, 0};
    if (token) snprintf(auth, sizeof auth, "Bearer %s", token);
    cm_call_opts_t o = {.timeout_ms = 30000, .md = token ? &md : NULL, .n_md = token ? 1 : 0};
    int code = cm_channel_unary(ch, path, req, desc, (ProtobufCMessage **)resp, &o, &st);
    snprintf(last_msg, sizeof last_msg, "%s", st.message);
    cm_rpc_status_clear(&st);
    return code;
}

static int64_t now_ms(void) {
    struct timespec t;
    clock_gettime(CLOCK_REALTIME, &t);
    return (int64_t)t.tv_sec * 1000 + t.tv_nsec / 1000000;
}

static void sleep_ms(int ms) {
    struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}

/* Creates devices <tag>-0..n-1 (labels kind=<tag>) and returns their tokens. */
static char **make_devices(svc_t *dm, const char *tag, int n) {
    char **tokens = calloc((size_t)n, sizeof *tokens);
    for (int i = 0; i < n; i++) {
        char id[64];
        snprintf(id, sizeof id, "%s-%d", tag, i);
        Iot__Device__V1__Device d = IOT__DEVICE__V1__DEVICE__INIT;
        d.id = id;
        d.name = id;
        d.type = (char *)"sensor";
        Iot__Device__V1__CreateDeviceRequest req = IOT__DEVICE__V1__CREATE_DEVICE_REQUEST__INIT;
        req.device = &d;
        Iot__Device__V1__Device *out = NULL;
        ASSERT_INT_EQ(unary(dm->ch, DM "CreateDevice", &req, &iot__device__v1__device__descriptor, &out, NULL), 0);
        pbfree(out);
        Iot__Device__V1__IssueTokenRequest treq = IOT__DEVICE__V1__ISSUE_TOKEN_REQUEST__INIT;
        treq.device_id = id;
        Iot__Device__V1__IssueTokenResponse *tr = NULL;
        ASSERT_INT_EQ(unary(dm->ch, DM "IssueToken", &treq, &iot__device__v1__issue_token_response__descriptor, &tr, NULL), 0);
        tokens[i] = strdup(tr->token);
        pbfree(tr);
    }
    return tokens;
}

static void free_tokens(char **t, int n) {
    for (int i = 0; i < n; i++) free(t[i]);
    free(t);
}

/* Pushes values v[0..n) for metric as seq first.., at times t0 + i * step. */
static void push_values(svc_t *in, const char *token, const char *metric, uint64_t first, const double *v, size_t n,
                        int64_t t0, int64_t step) {
    Iot__Ingest__V1__Point *p = calloc(n, sizeof *p);
    Iot__Ingest__V1__Point **pp = calloc(n, sizeof *pp);
    for (size_t i = 0; i < n; i++) {
        iot__ingest__v1__point__init(&p[i]);
        p[i].seq = first + i;
        p[i].metric = (char *)metric;
        p[i].time_ms = t0 + (int64_t)i * step;
        p[i].value_case = IOT__INGEST__V1__POINT__VALUE_DOUBLE_VALUE;
        p[i].double_value = v[i];
        pp[i] = &p[i];
    }
    Iot__Ingest__V1__PushTelemetryRequest req = IOT__INGEST__V1__PUSH_TELEMETRY_REQUEST__INIT;
    req.n_points = n;
    req.points = pp;
    Iot__Ingest__V1__TelemetryAck *ack = NULL;
    int code = unary(in->ch, "/iot.ingest.v1.Ingest/PushTelemetry", &req, &iot__ingest__v1__telemetry_ack__descriptor,
                     &ack, token);
    if (code) TEST__FAIL("push: %d %s", code, last_msg);
    ASSERT_INT_EQ(ack->acked_seq, first + n - 1);
    pbfree(ack);
    free(p);
    free(pp);
}

/* ---- rules --------------------------------------------------------------------------------- */

static long long rules_version(svc_t *pr) {
    char body[65536];
    if (test_http_get(pr->p.admin_port, "/metrics", body, sizeof body) != 200) return -1;
    const char *m = strstr(body, "\nprocessing_rules_version ");
    return m ? atoll(m + strlen("\nprocessing_rules_version ")) : -1;
}

/* Creates r and waits until the processing replicas given have loaded it. Returns the id (static). */
static const char *create_rule(svc_t *pr, Iot__Processing__V1__Rule *r, svc_t *also) {
    static char id[160];
    Iot__Processing__V1__CreateRuleRequest req = IOT__PROCESSING__V1__CREATE_RULE_REQUEST__INIT;
    req.rule = r;
    Iot__Processing__V1__Rule *out = NULL;
    int code = unary(pr->ch, PROC "CreateRule", &req, &iot__processing__v1__rule__descriptor, &out, NULL);
    if (code) TEST__FAIL("CreateRule: %d %s", code, last_msg);
    snprintf(id, sizeof id, "%s", out->id);
    long long etag = atoll(out->etag);
    pbfree(out);
    for (int i = 0; i < 200 && (rules_version(pr) < etag || (also && rules_version(also) < etag)); i++) sleep_ms(25);
    ASSERT(rules_version(pr) >= etag);
    return id;
}

static Iot__Processing__V1__ListAlertsResponse *list_alerts(svc_t *pr, const char *rule_id) {
    Iot__Processing__V1__ListAlertsRequest req = IOT__PROCESSING__V1__LIST_ALERTS_REQUEST__INIT;
    req.rule_id = (char *)rule_id;
    req.page_size = 1000;
    Iot__Processing__V1__ListAlertsResponse *out = NULL;
    int code = unary(pr->ch, PROC "ListAlerts", &req, &iot__processing__v1__list_alerts_response__descriptor, &out, NULL);
    if (code) TEST__FAIL("ListAlerts: %d %s", code, last_msg);
    return out;
}

/* Waits up to ms for the rule to have `want` alerts of which `firing` are firing; returns the list. */
static Iot__Processing__V1__ListAlertsResponse *wait_alerts(svc_t *pr, const char *rule_id, size_t want, size_t firing,
                                                            int ms) {
    Iot__Processing__V1__ListAlertsResponse *l = NULL;
    for (int waited = 0;; waited += 25) {
        l = list_alerts(pr, rule_id);
        size_t f = 0;
        for (size_t i = 0; i < l->n_alerts; i++) f += l->alerts[i]->state == IOT__PROCESSING__V1__ALERT_STATE__ALERT_STATE_FIRING;
        if ((l->n_alerts == want && f == firing) || waited >= ms) {
            if (l->n_alerts != want || f != firing) {
                static char body[65536];
                if (test_http_get(pr->p.admin_port, "/metrics", body, sizeof body) == 200)
                    for (char *line = strtok(body, "\n"); line; line = strtok(NULL, "\n"))
                        if (!strncmp(line, "processing_", 11)) fprintf(stdout, "    %s\n", line);
            }
            if (l->n_alerts != want || f != firing)
                TEST__FAIL("rule %s: %zu alerts (%zu firing), want %zu (%zu firing)", rule_id, l->n_alerts, f, want, firing);
            return l;
        }
        pbfree(l);
        sleep_ms(25);
    }
}

/* ---- tests --------------------------------------------------------------------------------- */

static void test_window_stats_match_reference(void) {
    svc_t dm, in, pr;
    fresh_names("stats");
    dm_start(&dm);
    char **tok = make_devices(&dm, "st", 1);
    ing_start(&in, dm.p.grpc_port);
    proc_start(&pr, dm.p.grpc_port, NULL);

    Iot__Processing__V1__WindowSpec w = IOT__PROCESSING__V1__WINDOW_SPEC__INIT;
    w.kind = IOT__PROCESSING__V1__WINDOW_KIND__WINDOW_KIND_COUNT;
    w.count = 50;
    w.min_samples = 20;
    w.range_min = 0;
    w.range_max = 200;
    Iot__Processing__V1__ThresholdCondition th = IOT__PROCESSING__V1__THRESHOLD_CONDITION__INIT;
    th.op = IOT__PROCESSING__V1__COMPARISON__COMPARISON_GT;
    th.threshold = 1e9;
    th.statistic = IOT__PROCESSING__V1__STATISTIC__STATISTIC_MEAN;
    th.window = &w;
    Iot__Processing__V1__Rule r = IOT__PROCESSING__V1__RULE__INIT;
    r.name = (char *)"mean watch";
    r.enabled = 1;
    r.metric = (char *)"temp";
    r.condition_case = IOT__PROCESSING__V1__RULE__CONDITION_THRESHOLD;
    r.threshold = &th;
    const char *id = create_rule(&pr, &r, NULL);
    char rule_id[160];
    snprintf(rule_id, sizeof rule_id, "%s", id);

    /* 80 known values; the count window keeps the last 50. */
    double v[80];
    for (int i = 0; i < 80; i++) v[i] = 20.0 + (double)((i * 37) % 23) * 0.75;
    int64_t t0 = now_ms() - 60000;
    push_values(&in, tok[0], "temp", 1, v, 80, t0, 100);
    double sum = 0, mn = 1e9, mx = -1e9;
    for (int i = 30; i < 80; i++) {
        sum += v[i];
        mn = fmin(mn, v[i]);
        mx = fmax(mx, v[i]);
    }
    double mean = sum / 50, m2 = 0;
    for (int i = 30; i < 80; i++) m2 += (v[i] - mean) * (v[i] - mean);
    double sd = sqrt(m2 / 50);
    double sorted[50];
    memcpy(sorted, v + 30, sizeof sorted);
    for (int i = 0; i < 50; i++)
        for (int j = i + 1; j < 50; j++)
            if (sorted[j] < sorted[i]) {
                double t = sorted[i];
                sorted[i] = sorted[j];
                sorted[j] = t;
            }
    double p95 = sorted[(int)ceil(0.95 * 50) - 1];

    Iot__Processing__V1__GetWindowStatsRequest req = IOT__PROCESSING__V1__GET_WINDOW_STATS_REQUEST__INIT;
    req.rule_id = rule_id;
    req.device_id = (char *)"st-0";
    Iot__Processing__V1__WindowStats *ws = NULL;
    int code = -1;
    for (int i = 0; i < 200; i++) {
        pbfree(ws);
        ws = NULL;
        code = unary(pr.ch, PROC "GetWindowStats", &req, &iot__processing__v1__window_stats__descriptor, &ws, NULL);
        if (code == 0 && ws->count == 50 && fabs(ws->last - v[79]) < 1e-12) break;
        sleep_ms(25);
    }
    if (code) TEST__FAIL("GetWindowStats: %d %s", code, last_msg);
    ASSERT_INT_EQ(ws->count, 50);
    ASSERT(fabs(ws->mean - mean) < 1e-9);
    ASSERT(fabs(ws->stddev - sd) < 1e-9);
    ASSERT(ws->min == mn && ws->max == mx);
    ASSERT(fabs(ws->p95 - p95) < 1e-9); /* count windows: exact */
    ASSERT_STR_EQ(ws->metric, "temp");
    pbfree(ws);

    /* Rollups: 80 points in the minute buckets they fall in, sums exact. */
    Iot__Processing__V1__QueryRollupsRequest qr = IOT__PROCESSING__V1__QUERY_ROLLUPS_REQUEST__INIT;
    Google__Protobuf__Timestamp from = GOOGLE__PROTOBUF__TIMESTAMP__INIT, to = GOOGLE__PROTOBUF__TIMESTAMP__INIT;
    from.seconds = (t0 - 3600000) / 1000;
    to.seconds = (t0 + 3600000) / 1000;
    qr.device_id = (char *)"st-0";
    qr.metric = (char *)"temp";
    qr.from = &from;
    qr.to = &to;
    qr.resolution_ms = 60000;
    long long cnt = 0;
    double rsum = 0;
    for (int i = 0; i < 200 && cnt != 80; i++) {
        Iot__Processing__V1__QueryRollupsResponse *rr = NULL;
        ASSERT_INT_EQ(unary(pr.ch, PROC "QueryRollups", &qr, &iot__processing__v1__query_rollups_response__descriptor, &rr, NULL), 0);
        cnt = 0;
        rsum = 0;
        for (size_t k = 0; k < rr->n_rollups; k++) {
            cnt += rr->rollups[k]->count;
            rsum += rr->rollups[k]->sum;
        }
        pbfree(rr);
        if (cnt != 80) sleep_ms(25);
    }
    ASSERT_INT_EQ(cnt, 80);
    double all = 0;
    for (int i = 0; i < 80; i++) all += v[i];
    ASSERT(fabs(rsum - all) < 1e-6);

    free_tokens(tok, 1);
    svc_stop(&pr);
    svc_stop(&in);
    svc_stop(&dm);
}

static void zscore_rule(Iot__Processing__V1__Rule *r, Iot__Processing__V1__DetectorCondition *d) {
    iot__processing__v1__detector_condition__init(d);
    d->kind = IOT__PROCESSING__V1__DETECTOR_KIND__DETECTOR_KIND_ZSCORE;
    d->min_samples = 30;
    iot__processing__v1__rule__init(r);
    r->name = (char *)"temperature anomaly";
    r->enabled = 1;
    r->metric = (char *)"temp";
    r->condition_case = IOT__PROCESSING__V1__RULE__CONDITION_DETECTOR;
    r->detector = d;
}

static void test_zscore_fires_at_the_outlier_not_before(void) {
    svc_t dm, in, pr;
    fresh_names("zscore");
    dm_start(&dm);
    char **tok = make_devices(&dm, "zs", 1);
    ing_start(&in, dm.p.grpc_port);
    proc_start(&pr, dm.p.grpc_port, NULL);
    Iot__Processing__V1__Rule r;
    Iot__Processing__V1__DetectorCondition d;
    zscore_rule(&r, &d);
    char rule_id[160];
    snprintf(rule_id, sizeof rule_id, "%s", create_rule(&pr, &r, NULL));

    /* 40 points alternating 19/21 (mean 20, stddev 1): |x - mean| = 1 -> score 1/3, never alerts. */
    double v[40];
    for (int i = 0; i < 40; i++) v[i] = i % 2 ? 21.0 : 19.0;
    int64_t t0 = now_ms() - 30000;
    push_values(&in, tok[0], "temp", 1, v, 40, t0, 100);
    /* A point 2.55 sd out: score 0.85 -> alert (not HIGH); then 35: score 1 -> escalates to HIGH. */
    double spike[1] = {22.55};
    sleep_ms(300);
    Iot__Processing__V1__ListAlertsResponse *l = list_alerts(&pr, rule_id);
    ASSERT_INT_EQ(l->n_alerts, 0); /* not before */
    pbfree(l);
    push_values(&in, tok[0], "temp", 41, spike, 1, t0 + 4000, 100);
    l = wait_alerts(&pr, rule_id, 1, 1, 5000);
    Iot__Processing__V1__Alert *a = l->alerts[0];
    ASSERT_STR_EQ(a->device_id, "zs-0");
    ASSERT_INT_EQ(a->severity, IOT__PROCESSING__V1__SEVERITY__SEVERITY_WARNING);
    /* The window before the spike: 40 points, 20 of each value: mean 20, sd 1. */
    ASSERT(fabs(a->value - 2.55 / 3) < 1e-9);
    ASSERT_INT_EQ(a->fired_time->seconds, (t0 + 4000) / 1000);
    pbfree(l);
    double big[1] = {35.0};
    push_values(&in, tok[0], "temp", 42, big, 1, t0 + 4100, 100);
    for (int i = 0; i < 200; i++) {
        l = list_alerts(&pr, rule_id);
        int high = l->n_alerts == 1 && l->alerts[0]->severity == IOT__PROCESSING__V1__SEVERITY__SEVERITY_HIGH;
        pbfree(l);
        if (high) break;
        sleep_ms(25);
    }
    l = wait_alerts(&pr, rule_id, 1, 1, 100);
    ASSERT_INT_EQ(l->alerts[0]->severity, IOT__PROCESSING__V1__SEVERITY__SEVERITY_HIGH);
    pbfree(l);
    /* Back to normal: resolves. */
    double calm[1] = {20.0};
    push_values(&in, tok[0], "temp", 43, calm, 1, t0 + 4200, 100);
    l = wait_alerts(&pr, rule_id, 1, 0, 5000);
    ASSERT(l->alerts[0]->resolved_time != NULL);
    pbfree(l);
    /* fired_after: at the firing time it is listed, a millisecond later it is not. */
    for (int k = 0; k < 2; k++) {
        Iot__Processing__V1__ListAlertsRequest req = IOT__PROCESSING__V1__LIST_ALERTS_REQUEST__INIT;
        Google__Protobuf__Timestamp after = GOOGLE__PROTOBUF__TIMESTAMP__INIT;
        after.seconds = (t0 + 4000 + k) / 1000;
        after.nanos = (int32_t)((t0 + 4000 + k) % 1000) * 1000000;
        req.rule_id = rule_id;
        req.fired_after = &after;
        ASSERT_INT_EQ(unary(pr.ch, PROC "ListAlerts", &req, &iot__processing__v1__list_alerts_response__descriptor, &l, NULL), 0);
        ASSERT_INT_EQ(l->n_alerts, k ? 0 : 1);
        pbfree(l);
    }

    free_tokens(tok, 1);
    svc_stop(&pr);
    svc_stop(&in);
    svc_stop(&dm);
}

static const char *detector_rule(svc_t *pr, int kind, double level, int64_t duration_ms, const char *metric) {
    Iot__Processing__V1__DetectorCondition d = IOT__PROCESSING__V1__DETECTOR_CONDITION__INIT;
    d.kind = kind;
    d.level = level;
    d.duration_ms = duration_ms;
    Iot__Processing__V1__Rule r = IOT__PROCESSING__V1__RULE__INIT;
    r.id = (char *)metric; /* one rule per metric here: readable failures */
    r.name = (char *)"detector";
    r.enabled = 1;
    r.metric = (char *)metric;
    r.condition_case = IOT__PROCESSING__V1__RULE__CONDITION_DETECTOR;
    r.detector = &d;
    return create_rule(pr, &r, NULL);
}

static void test_stuck_rate_absence_fire_and_resolve(void) {
    svc_t dm, in, pr;
    fresh_names("detect");
    dm_start(&dm);
    char **tok = make_devices(&dm, "dt", 1);
    ing_start(&in, dm.p.grpc_port);
    proc_start(&pr, dm.p.grpc_port, NULL);
    char stuck[160], rate[160], absent[160];
    snprintf(stuck, sizeof stuck, "%s", detector_rule(&pr, IOT__PROCESSING__V1__DETECTOR_KIND__DETECTOR_KIND_STUCK, 0, 5000, "pressure"));
    snprintf(rate, sizeof rate, "%s", detector_rule(&pr, IOT__PROCESSING__V1__DETECTOR_KIND__DETECTOR_KIND_RATE, 10, 0, "flow"));
    snprintf(absent, sizeof absent, "%s", detector_rule(&pr, IOT__PROCESSING__V1__DETECTOR_KIND__DETECTOR_KIND_ABSENCE, 0, 2000, "beat"));

    int64_t t0 = now_ms() - 60000;
    /* Stuck: 7 s of the same value (1 s apart) fires at the 6th second; a change resolves. */
    double p[8] = {5, 5, 5, 5, 5, 5, 5, 6};
    push_values(&in, tok[0], "pressure", 1, p, 5, t0, 1000);
    sleep_ms(300);
    Iot__Processing__V1__ListAlertsResponse *l = list_alerts(&pr, stuck);
    ASSERT_INT_EQ(l->n_alerts, 0); /* 4 s unchanged: not yet */
    pbfree(l);
    push_values(&in, tok[0], "pressure", 6, p + 5, 2, t0 + 5000, 1000);
    pbfree(wait_alerts(&pr, stuck, 1, 1, 5000));
    push_values(&in, tok[0], "pressure", 8, p + 7, 1, t0 + 7000, 1000);
    pbfree(wait_alerts(&pr, stuck, 1, 0, 5000));

    /* Rate: +5/s is fine, +30 in one second fires, the next gentle step resolves. */
    double f[4] = {100, 105, 135, 136};
    push_values(&in, tok[0], "flow", 9, f, 2, t0 + 8000, 1000);
    sleep_ms(300);
    l = list_alerts(&pr, rate);
    ASSERT_INT_EQ(l->n_alerts, 0);
    pbfree(l);
    push_values(&in, tok[0], "flow", 11, f + 2, 1, t0 + 10000, 1000);
    l = wait_alerts(&pr, rate, 1, 1, 5000);
    ASSERT(fabs(l->alerts[0]->value - 30) < 1e-9);
    pbfree(l);
    push_values(&in, tok[0], "flow", 12, f + 3, 1, t0 + 11000, 1000);
    pbfree(wait_alerts(&pr, rate, 1, 0, 5000));

    /* Absence: a heartbeat now, then silence for 2 s fires; the next beat resolves. */
    double b[1] = {1};
    push_values(&in, tok[0], "beat", 13, b, 1, now_ms(), 1000);
    sleep_ms(800);
    l = list_alerts(&pr, absent);
    ASSERT_INT_EQ(l->n_alerts, 0);
    pbfree(l);
    pbfree(wait_alerts(&pr, absent, 1, 1, 6000));
    push_values(&in, tok[0], "beat", 14, b, 1, now_ms(), 1000);
    pbfree(wait_alerts(&pr, absent, 1, 0, 5000));

    free_tokens(tok, 1);
    svc_stop(&pr);
    svc_stop(&in);
    svc_stop(&dm);
}

static const char *threshold_rule(svc_t *pr, svc_t *also, double threshold, int64_t for_ms, const char *metric) {
    Iot__Processing__V1__ThresholdCondition th = IOT__PROCESSING__V1__THRESHOLD_CONDITION__INIT;
    th.op = IOT__PROCESSING__V1__COMPARISON__COMPARISON_GT;
    th.threshold = threshold;
    th.for_ms = for_ms;
    Iot__Processing__V1__Rule r = IOT__PROCESSING__V1__RULE__INIT;
    r.name = (char *)"overheat";
    r.enabled = 1;
    r.metric = (char *)metric;
    r.severity = IOT__PROCESSING__V1__SEVERITY__SEVERITY_HIGH;
    r.condition_case = IOT__PROCESSING__V1__RULE__CONDITION_THRESHOLD;
    r.threshold = &th;
    return create_rule(pr, &r, also);
}

static void test_threshold_duration_once_per_episode_across_kill9(void) {
    svc_t dm, in, pr;
    fresh_names("episode");
    dm_start(&dm);
    char **tok = make_devices(&dm, "ep", 1);
    ing_start(&in, dm.p.grpc_port);
    /* Checkpoints far apart: after the kill everything since the start is replayed. */
    const char *extra[] = {"IOT_PROC_CHECKPOINT_INTERVAL=600s", NULL};
    proc_start(&pr, dm.p.grpc_port, extra);
    char id[160];
    snprintf(id, sizeof id, "%s", threshold_rule(&pr, NULL, 80, 10000, "temp"));

    int64_t t0 = now_ms() - 120000;
    /* Above 80 for 8 s (no alert), dips, then above for 12 s: one alert, fired 10 s into it. */
    double v[40];
    for (int i = 0; i < 40; i++) v[i] = 70;
    for (int i = 0; i < 9; i++) v[i] = 85;   /* t 0..8 s */
    for (int i = 10; i < 23; i++) v[i] = 90; /* t 10..22 s */
    push_values(&in, tok[0], "temp", 1, v, 40, t0, 1000);
    Iot__Processing__V1__ListAlertsResponse *l = wait_alerts(&pr, id, 1, 0, 5000);
    ASSERT_INT_EQ(l->alerts[0]->fired_time->seconds, (t0 + 20000) / 1000);
    ASSERT_INT_EQ(l->alerts[0]->resolved_time->seconds, (t0 + 23000) / 1000);
    pbfree(l);

    /* kill -9 and restart: the replay re-evaluates all 40 points and writes nothing new. */
    svc_kill9(&pr);
    proc_start(&pr, dm.p.grpc_port, extra);
    sleep_ms(2500);
    pbfree(wait_alerts(&pr, id, 1, 0, 100));
    char body[65536];
    ASSERT_INT_EQ(test_http_get(pr.p.admin_port, "/metrics", body, sizeof body), 200);
    ASSERT(strstr(body, "processing_claimed_entries_total") || strstr(body, "processing_points_total"));

    /* A second episode after the restart fires once more, and only once. */
    double w[15];
    for (int i = 0; i < 15; i++) w[i] = 95;
    push_values(&in, tok[0], "temp", 41, w, 15, t0 + 40000, 1000);
    pbfree(wait_alerts(&pr, id, 2, 1, 5000));
    svc_kill9(&pr);
    proc_start(&pr, dm.p.grpc_port, extra);
    sleep_ms(2500);
    pbfree(wait_alerts(&pr, id, 2, 1, 100));

    free_tokens(tok, 1);
    svc_stop(&pr);
    svc_stop(&in);
    svc_stop(&dm);
}

static void test_emergency_command_reaches_the_device(void) {
    svc_t dm, in, pr;
    fresh_names("emerg");
    dm_start(&dm);
    char **tok = make_devices(&dm, "em", 1);
    ing_start(&in, dm.p.grpc_port);
    proc_start(&pr, dm.p.grpc_port, NULL);
    Iot__Processing__V1__Rule r;
    Iot__Processing__V1__DetectorCondition d;
    zscore_rule(&r, &d);
    Iot__Processing__V1__CommandAction cmd = IOT__PROCESSING__V1__COMMAND_ACTION__INIT;
    cmd.name = (char *)"shutdown";
    cmd.min_severity = IOT__PROCESSING__V1__SEVERITY__SEVERITY_HIGH;
    r.command = &cmd;
    char id[160];
    snprintf(id, sizeof id, "%s", create_rule(&pr, &r, NULL));

    /* The device watches its commands (token-authenticated) before anything happens. */
    Iot__Device__V1__WatchCommandsRequest wreq = IOT__DEVICE__V1__WATCH_COMMANDS_REQUEST__INIT;
    wreq.device_id = (char *)"em-0";
    char auth[256];
    snprintf(auth, sizeof auth, "Bearer %s", tok[0]);
    cm_md_t md = {"authorization", auth, 0};
    cm_call_opts_t o = {.timeout_ms = 20000, .md = &md, .n_md = 1};
    cm_stream_t *ws = cm_stream_open(dm.ch, DM "WatchCommands", &o);
    ASSERT(ws);
    ASSERT_INT_EQ(cm_stream_send(ws, &wreq.base), 0);
    cm_stream_close_send(ws);

    double v[41];
    for (int i = 0; i < 40; i++) v[i] = i % 2 ? 21.0 : 19.0;
    v[40] = 40.0; /* score 1: HIGH */
    int64_t t0 = now_ms() - 30000;
    push_values(&in, tok[0], "temp", 1, v, 41, t0, 100);
    Iot__Processing__V1__ListAlertsResponse *l = wait_alerts(&pr, id, 1, 1, 5000);
    ASSERT_INT_EQ(l->alerts[0]->severity, IOT__PROCESSING__V1__SEVERITY__SEVERITY_HIGH);
    pbfree(l);

    Iot__Device__V1__Command *c = NULL;
    ASSERT_INT_EQ(cm_stream_recv(ws, &iot__device__v1__command__descriptor, (ProtobufCMessage **)&c), 1);
    ASSERT_STR_EQ(c->name, "shutdown");
    ASSERT_STR_EQ(c->device_id, "em-0");
    char cmd_id[128];
    snprintf(cmd_id, sizeof cmd_id, "%s", c->id);
    pbfree(c);
    cm_stream_cancel(ws);
    cm_stream_finish(ws, NULL);
    /* The alert records the command it queued. */
    for (int i = 0; i < 200; i++) {
        l = list_alerts(&pr, id);
        int done = l->n_alerts == 1 && l->alerts[0]->command_id && strcmp(l->alerts[0]->command_id, cmd_id) == 0;
        pbfree(l);
        if (done) break;
        ASSERT(i < 199);
        sleep_ms(25);
    }

    free_tokens(tok, 1);
    svc_stop(&pr);
    svc_stop(&in);
    svc_stop(&dm);
}

/* A webhook receiver on 127.0.0.1: answers 500 to the first `fail_first` requests, then 204, and
 * keeps what it got. */
typedef struct hook_s {
    int fd, port, fail_first, n;
    char bodies[8][4096];
    char keys[8][128];
    pthread_t th;
} hook_t;

static void *hook_main(void *arg) {
    hook_t *h = arg;
    for (;;) {
        int c = accept(h->fd, NULL, NULL);
        if (c < 0) return NULL;
        char buf[16384];
        size_t len = 0;
        ssize_t r;
        const char *body = NULL;
        long clen = -1;
        while (len < sizeof buf - 1 && (r = read(c, buf + len, sizeof buf - 1 - len)) > 0) {
            len += (size_t)r;
            buf[len] = 0;
            char *end = strstr(buf, "\r\n\r\n");
            if (!end) continue;
            body = end + 4;
            const char *cl = strcasestr(buf, "content-length:");
            clen = cl ? atol(cl + 15) : 0;
            if ((long)(len - (size_t)(body - buf)) >= clen) break;
        }
        if (body && h->n < 8) {
            snprintf(h->bodies[h->n], sizeof h->bodies[h->n], "%s", body);
            const char *k = strcasestr(buf, "idempotency-key:");
            if (k) sscanf(k + 16, " %127[^\r\n]", h->keys[h->n]);
            h->n++;
        }
        const char *ans = h->n <= h->fail_first ? "HTTP/1.1 500 Internal Server Error\r\nContent-Length: 4\r\nConnection: close\r\n\r\nfail"
                                                : "HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n";
        ssize_t w = write(c, ans, strlen(ans));
        (void)w;
        close(c);
    }
}

static void hook_start(hook_t *h, int fail_first) {
    memset(h, 0, sizeof *h);
    h->fail_first = fail_first;
    h->fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    ASSERT_INT_EQ(bind(h->fd, (struct sockaddr *)&a, sizeof a), 0);
    ASSERT_INT_EQ(listen(h->fd, 16), 0);
    socklen_t al = sizeof a;
    getsockname(h->fd, (struct sockaddr *)&a, &al);
    h->port = ntohs(a.sin_port);
    pthread_create(&h->th, NULL, hook_main, h);
}

static void hook_stop(hook_t *h) {
    shutdown(h->fd, SHUT_RDWR);
    close(h->fd);
    pthread_join(h->th, NULL);
}

static void test_webhook_delivered_and_retried(void) {
    svc_t dm, in, pr;
    fresh_names("hook");
    dm_start(&dm);
    char **tok = make_devices(&dm, "wh", 1);
    ing_start(&in, dm.p.grpc_port);
    proc_start(&pr, dm.p.grpc_port, NULL);
    hook_t h;
    hook_start(&h, 1);
    char url[96];
    snprintf(url, sizeof url, "http://127.0.0.1:%d/hook", h.port);
    Iot__Processing__V1__ThresholdCondition th = IOT__PROCESSING__V1__THRESHOLD_CONDITION__INIT;
    th.op = IOT__PROCESSING__V1__COMPARISON__COMPARISON_GE;
    th.threshold = 100;
    Iot__Processing__V1__WebhookAction wh = IOT__PROCESSING__V1__WEBHOOK_ACTION__INIT;
    wh.url = url;
    wh.timeout_ms = 2000;
    Iot__Processing__V1__Rule r = IOT__PROCESSING__V1__RULE__INIT;
    r.name = (char *)"hooked";
    r.enabled = 1;
    r.metric = (char *)"level";
    r.condition_case = IOT__PROCESSING__V1__RULE__CONDITION_THRESHOLD;
    r.threshold = &th;
    r.webhook = &wh;
    char id[160];
    snprintf(id, sizeof id, "%s", create_rule(&pr, &r, NULL));
    double v[1] = {150};
    push_values(&in, tok[0], "level", 1, v, 1, now_ms() - 1000, 1000);
    /* The first attempt gets 500, the retry (after the 100 ms test backoff) 204. */
    for (int i = 0; i < 400 && h.n < 2; i++) sleep_ms(25);
    ASSERT_INT_EQ(h.n, 2);
    ASSERT(strstr(h.bodies[1], id));
    ASSERT(strstr(h.bodies[1], "\"wh-0\""));
    ASSERT(strstr(h.bodies[1], "fired"));
    ASSERT(h.keys[0][0] && strcmp(h.keys[0], h.keys[1]) == 0);
    sleep_ms(500);
    ASSERT_INT_EQ(h.n, 2); /* delivered: no more attempts */
    hook_stop(&h);
    free_tokens(tok, 1);
    svc_stop(&pr);
    svc_stop(&in);
    svc_stop(&dm);
}

static int rule_call(svc_t *pr, const char *method, const void *req, void *resp) {
    return unary(pr->ch, method, req, &iot__processing__v1__rule__descriptor, resp, NULL);
}

static void test_api_rules_alerts_watch_and_errors(void) {
    svc_t dm, in, pr;
    fresh_names("api");
    dm_start(&dm);
    char **tok = make_devices(&dm, "ap", 1);
    ing_start(&in, dm.p.grpc_port);
    proc_start(&pr, dm.p.grpc_port, NULL);

    /* Validation names the field. */
    Iot__Processing__V1__ThresholdCondition th = IOT__PROCESSING__V1__THRESHOLD_CONDITION__INIT;
    th.op = IOT__PROCESSING__V1__COMPARISON__COMPARISON_GT;
    th.threshold = 50;
    Iot__Processing__V1__Rule r = IOT__PROCESSING__V1__RULE__INIT;
    r.id = (char *)"hot";
    r.name = (char *)"hot";
    r.enabled = 1;
    r.condition_case = IOT__PROCESSING__V1__RULE__CONDITION_THRESHOLD;
    r.threshold = &th;
    Iot__Processing__V1__CreateRuleRequest cr = IOT__PROCESSING__V1__CREATE_RULE_REQUEST__INIT;
    cr.rule = &r;
    Iot__Processing__V1__Rule *out = NULL;
    ASSERT_INT_EQ(rule_call(&pr, PROC "CreateRule", &cr, &out), CM_STATUS_INVALID_ARGUMENT);
    ASSERT(strstr(last_msg, "rule.metric"));
    r.metric = (char *)"temp";
    r.condition_case = IOT__PROCESSING__V1__RULE__CONDITION__NOT_SET;
    ASSERT_INT_EQ(rule_call(&pr, PROC "CreateRule", &cr, &out), CM_STATUS_INVALID_ARGUMENT);
    ASSERT(strstr(last_msg, "condition"));
    r.condition_case = IOT__PROCESSING__V1__RULE__CONDITION_THRESHOLD;
    th.statistic = IOT__PROCESSING__V1__STATISTIC__STATISTIC_P95;
    Iot__Processing__V1__WindowSpec w = IOT__PROCESSING__V1__WINDOW_SPEC__INIT;
    w.width_ms = 1001; /* sliding: must be a multiple of 20 */
    th.window = &w;
    ASSERT_INT_EQ(rule_call(&pr, PROC "CreateRule", &cr, &out), CM_STATUS_INVALID_ARGUMENT);
    ASSERT(strstr(last_msg, "width_ms"));
    th.statistic = IOT__PROCESSING__V1__STATISTIC__STATISTIC_VALUE;
    th.window = NULL;
    char hot_id[64];
    snprintf(hot_id, sizeof hot_id, "%s", create_rule(&pr, &r, NULL));
    ASSERT_STR_EQ(hot_id, "hot");
    ASSERT_INT_EQ(rule_call(&pr, PROC "CreateRule", &cr, &out), CM_STATUS_ALREADY_EXISTS);

    /* Get, update with a mask and an etag, list with paging, disable, delete. */
    Iot__Processing__V1__GetRuleRequest gr = IOT__PROCESSING__V1__GET_RULE_REQUEST__INIT;
    gr.id = (char *)"nope";
    ASSERT_INT_EQ(rule_call(&pr, PROC "GetRule", &gr, &out), CM_STATUS_NOT_FOUND);
    gr.id = (char *)"bad id!";
    ASSERT_INT_EQ(rule_call(&pr, PROC "GetRule", &gr, &out), CM_STATUS_INVALID_ARGUMENT);
    gr.id = (char *)"hot";
    ASSERT_INT_EQ(rule_call(&pr, PROC "GetRule", &gr, &out), 0);
    ASSERT_INT_EQ(out->severity, IOT__PROCESSING__V1__SEVERITY__SEVERITY_WARNING); /* the default, filled in */
    char etag[32];
    snprintf(etag, sizeof etag, "%s", out->etag);
    pbfree(out);
    Iot__Processing__V1__Rule patch = IOT__PROCESSING__V1__RULE__INIT;
    patch.id = (char *)"hot";
    patch.name = (char *)"renamed";
    patch.etag = (char *)"999999";
    char *paths[] = {(char *)"name"}, *badpaths[] = {(char *)"nonsense"};
    Google__Protobuf__FieldMask mask = GOOGLE__PROTOBUF__FIELD_MASK__INIT;
    mask.n_paths = 1;
    mask.paths = paths;
    Iot__Processing__V1__UpdateRuleRequest ur = IOT__PROCESSING__V1__UPDATE_RULE_REQUEST__INIT;
    ur.rule = &patch;
    ur.update_mask = &mask;
    ASSERT_INT_EQ(rule_call(&pr, PROC "UpdateRule", &ur, &out), CM_STATUS_FAILED_PRECONDITION);
    patch.etag = etag;
    mask.paths = badpaths;
    ASSERT_INT_EQ(rule_call(&pr, PROC "UpdateRule", &ur, &out), CM_STATUS_INVALID_ARGUMENT);
    mask.paths = paths;
    ASSERT_INT_EQ(rule_call(&pr, PROC "UpdateRule", &ur, &out), 0);
    ASSERT_STR_EQ(out->name, "renamed");
    ASSERT_STR_EQ(out->metric, "temp"); /* untouched by the mask */
    ASSERT(strcmp(out->etag, etag) != 0);
    pbfree(out);
    r.metric = (char *)"other"; /* so that only "hot" fires below */
    for (int i = 0; i < 4; i++) {
        char id[32];
        snprintf(id, sizeof id, "extra-%d", i);
        r.id = id;
        ASSERT_INT_EQ(rule_call(&pr, PROC "CreateRule", &cr, &out), 0);
        pbfree(out);
    }
    Iot__Processing__V1__SetRuleEnabledRequest sr = IOT__PROCESSING__V1__SET_RULE_ENABLED_REQUEST__INIT;
    sr.id = (char *)"extra-0";
    ASSERT_INT_EQ(rule_call(&pr, PROC "SetRuleEnabled", &sr, &out), 0);
    ASSERT(!out->enabled);
    pbfree(out);
    Iot__Processing__V1__ListRulesRequest lr = IOT__PROCESSING__V1__LIST_RULES_REQUEST__INIT;
    lr.page_size = 2;
    int seen = 0, pages = 0;
    char token[512] = "";
    do {
        lr.page_token = token;
        Iot__Processing__V1__ListRulesResponse *lp = NULL;
        ASSERT_INT_EQ(unary(pr.ch, PROC "ListRules", &lr, &iot__processing__v1__list_rules_response__descriptor, &lp, NULL), 0);
        seen += (int)lp->n_rules;
        pages++;
        snprintf(token, sizeof token, "%s", lp->next_page_token);
        pbfree(lp);
    } while (*token && pages < 10);
    ASSERT_INT_EQ(seen, 5);
    ASSERT_INT_EQ(pages, 3);
    lr.page_token = (char *)"zz";
    Iot__Processing__V1__ListRulesResponse *lp = NULL;
    ASSERT_INT_EQ(unary(pr.ch, PROC "ListRules", &lr, &iot__processing__v1__list_rules_response__descriptor, &lp, NULL),
                  CM_STATUS_INVALID_ARGUMENT);
    lr.page_token = (char *)"";
    lr.page_size = 100;
    lr.enabled_only = 1;
    ASSERT_INT_EQ(unary(pr.ch, PROC "ListRules", &lr, &iot__processing__v1__list_rules_response__descriptor, &lp, NULL), 0);
    ASSERT_INT_EQ(lp->n_rules, 4);
    pbfree(lp);
    Iot__Processing__V1__DeleteRuleRequest dr = IOT__PROCESSING__V1__DELETE_RULE_REQUEST__INIT;
    dr.id = (char *)"extra-1";
    Iot__Processing__V1__DeleteRuleResponse *dresp = NULL;
    ASSERT_INT_EQ(unary(pr.ch, PROC "DeleteRule", &dr, &iot__processing__v1__delete_rule_response__descriptor, &dresp, NULL), 0);
    pbfree(dresp);
    ASSERT_INT_EQ(unary(pr.ch, PROC "DeleteRule", &dr, &iot__processing__v1__delete_rule_response__descriptor, &dresp, NULL),
                  CM_STATUS_NOT_FOUND);
    Iot__Processing__V1__GetWindowStatsRequest wr = IOT__PROCESSING__V1__GET_WINDOW_STATS_REQUEST__INIT;
    wr.rule_id = (char *)"hot";
    wr.device_id = (char *)"ap-0";
    Iot__Processing__V1__WindowStats *ws = NULL;
    ASSERT_INT_EQ(unary(pr.ch, PROC "GetWindowStats", &wr, &iot__processing__v1__window_stats__descriptor, &ws, NULL),
                  CM_STATUS_FAILED_PRECONDITION);

    /* A watcher from now sees the alert fire and its acknowledgement; another resumes after the
     * first event and sees only the acknowledgement. */
    Iot__Processing__V1__WatchAlertsRequest war = IOT__PROCESSING__V1__WATCH_ALERTS_REQUEST__INIT;
    cm_call_opts_t wo = {.timeout_ms = 20000};
    cm_stream_t *ws1 = cm_stream_open(pr.ch, PROC "WatchAlerts", &wo);
    ASSERT_INT_EQ(cm_stream_send(ws1, &war.base), 0);
    cm_stream_close_send(ws1);
    sleep_ms(200); /* registered before the alert */
    for (int i = 0; i < 100 && rules_version(&pr) < 8; i++) sleep_ms(25);
    double v[1] = {75};
    push_values(&in, tok[0], "temp", 1, v, 1, now_ms() - 1000, 1000);
    Iot__Processing__V1__Alert *ev = NULL;
    ASSERT_INT_EQ(cm_stream_recv(ws1, &iot__processing__v1__alert__descriptor, (ProtobufCMessage **)&ev), 1);
    ASSERT_STR_EQ(ev->rule_id, "hot");
    ASSERT_INT_EQ(ev->state, IOT__PROCESSING__V1__ALERT_STATE__ALERT_STATE_FIRING);
    char alert_id[32], first_event[32];
    snprintf(alert_id, sizeof alert_id, "%s", ev->id);
    snprintf(first_event, sizeof first_event, "%s", ev->event_id);
    pbfree(ev);
    Iot__Processing__V1__AckAlertRequest ar = IOT__PROCESSING__V1__ACK_ALERT_REQUEST__INIT;
    ar.id = alert_id;
    Iot__Processing__V1__Alert *acked = NULL;
    ASSERT_INT_EQ(unary(pr.ch, PROC "AckAlert", &ar, &iot__processing__v1__alert__descriptor, &acked, NULL), CM_STATUS_INVALID_ARGUMENT);
    ar.by = (char *)"operator-jane";
    ASSERT_INT_EQ(unary(pr.ch, PROC "AckAlert", &ar, &iot__processing__v1__alert__descriptor, &acked, NULL), 0);
    ASSERT(acked->acknowledged && acked->acknowledged_time);
    ASSERT_STR_EQ(acked->acknowledged_by, "operator-jane");
    pbfree(acked);
    ASSERT_INT_EQ(cm_stream_recv(ws1, &iot__processing__v1__alert__descriptor, (ProtobufCMessage **)&ev), 1);
    ASSERT(ev->acknowledged);
    ASSERT(atoll(ev->event_id) > atoll(first_event));
    pbfree(ev);
    cm_stream_cancel(ws1);
    cm_stream_finish(ws1, NULL);
    war.after_event_id = first_event;
    cm_stream_t *ws2 = cm_stream_open(pr.ch, PROC "WatchAlerts", &wo);
    ASSERT_INT_EQ(cm_stream_send(ws2, &war.base), 0);
    cm_stream_close_send(ws2);
    ASSERT_INT_EQ(cm_stream_recv(ws2, &iot__processing__v1__alert__descriptor, (ProtobufCMessage **)&ev), 1);
    ASSERT(ev->acknowledged);
    ASSERT_STR_EQ(ev->id, alert_id);
    pbfree(ev);
    cm_stream_cancel(ws2);
    cm_stream_finish(ws2, NULL);

    /* Alerts: get, bad ids, filters; rule stats; rollup arguments. */
    Iot__Processing__V1__GetAlertRequest ga = IOT__PROCESSING__V1__GET_ALERT_REQUEST__INIT;
    ga.id = (char *)"x1";
    ASSERT_INT_EQ(unary(pr.ch, PROC "GetAlert", &ga, &iot__processing__v1__alert__descriptor, &acked, NULL), CM_STATUS_INVALID_ARGUMENT);
    ga.id = (char *)"987654";
    ASSERT_INT_EQ(unary(pr.ch, PROC "GetAlert", &ga, &iot__processing__v1__alert__descriptor, &acked, NULL), CM_STATUS_NOT_FOUND);
    Iot__Processing__V1__ListAlertsRequest la = IOT__PROCESSING__V1__LIST_ALERTS_REQUEST__INIT;
    la.device_id = (char *)"ap-0";
    la.min_severity = IOT__PROCESSING__V1__SEVERITY__SEVERITY_HIGH;
    Iot__Processing__V1__ListAlertsResponse *al = NULL;
    ASSERT_INT_EQ(unary(pr.ch, PROC "ListAlerts", &la, &iot__processing__v1__list_alerts_response__descriptor, &al, NULL), 0);
    ASSERT_INT_EQ(al->n_alerts, 0); /* WARNING only */
    pbfree(al);
    Iot__Processing__V1__GetRuleStatsRequest gs = IOT__PROCESSING__V1__GET_RULE_STATS_REQUEST__INIT;
    gs.rule_id = (char *)"gone";
    Iot__Processing__V1__RuleStats *rs = NULL;
    ASSERT_INT_EQ(unary(pr.ch, PROC "GetRuleStats", &gs, &iot__processing__v1__rule_stats__descriptor, &rs, NULL), CM_STATUS_NOT_FOUND);
    gs.rule_id = (char *)"hot";
    for (int i = 0; i < 100; i++) {
        pbfree(rs);
        rs = NULL;
        ASSERT_INT_EQ(unary(pr.ch, PROC "GetRuleStats", &gs, &iot__processing__v1__rule_stats__descriptor, &rs, NULL), 0);
        if (rs->evaluations >= 1) break;
        sleep_ms(50);
    }
    ASSERT_INT_EQ(rs->evaluations, 1);
    ASSERT_INT_EQ(rs->matches, 1);
    ASSERT_INT_EQ(rs->alerts_fired, 1);
    ASSERT_INT_EQ(rs->windows, 1);
    ASSERT(rs->memory_bytes > 0 && rs->memory_bytes < 1024);
    pbfree(rs);
    Iot__Processing__V1__QueryRollupsRequest qr = IOT__PROCESSING__V1__QUERY_ROLLUPS_REQUEST__INIT;
    qr.device_id = (char *)"ap-0";
    qr.metric = (char *)"temp";
    qr.resolution_ms = 5000;
    Iot__Processing__V1__QueryRollupsResponse *rr = NULL;
    ASSERT_INT_EQ(unary(pr.ch, PROC "QueryRollups", &qr, &iot__processing__v1__query_rollups_response__descriptor, &rr, NULL),
                  CM_STATUS_INVALID_ARGUMENT);
    ASSERT(strstr(last_msg, "resolution_ms"));

    free_tokens(tok, 1);
    svc_stop(&pr);
    svc_stop(&in);
    svc_stop(&dm);
}

/* A rule selecting a device-mgmt group applies to its members only, and to a device added to the
 * group once the selector is resolved again. */
static void test_group_selector_resolved_through_device_mgmt(void) {
    svc_t dm, in, pr;
    fresh_names("group");
    dm_start(&dm);
    char **tok = make_devices(&dm, "gp", 3);
    ing_start(&in, dm.p.grpc_port);
    const char *extra[] = {"IOT_PROC_SELECTOR_REFRESH=300ms", NULL};
    proc_start(&pr, dm.p.grpc_port, extra);
    Iot__Device__V1__Group g = IOT__DEVICE__V1__GROUP__INIT;
    g.id = (char *)"boilers";
    g.kind = IOT__DEVICE__V1__GROUP_KIND__GROUP_KIND_STATIC;
    Iot__Device__V1__CreateGroupRequest cg = IOT__DEVICE__V1__CREATE_GROUP_REQUEST__INIT;
    cg.group = &g;
    Iot__Device__V1__Group *gout = NULL;
    ASSERT_INT_EQ(unary(dm.ch, DM "CreateGroup", &cg, &iot__device__v1__group__descriptor, &gout, NULL), 0);
    pbfree(gout);
    char *members[] = {(char *)"gp-0", (char *)"gp-2"};
    Iot__Device__V1__GroupMembersRequest gm = IOT__DEVICE__V1__GROUP_MEMBERS_REQUEST__INIT;
    gm.group_id = (char *)"boilers";
    gm.n_device_ids = 1;
    gm.device_ids = members;
    Iot__Device__V1__GroupMembersResponse *gmr = NULL;
    ASSERT_INT_EQ(unary(dm.ch, DM "AddGroupMembers", &gm, &iot__device__v1__group_members_response__descriptor, &gmr, NULL), 0);
    pbfree(gmr);

    Iot__Processing__V1__DeviceSelector sel = IOT__PROCESSING__V1__DEVICE_SELECTOR__INIT;
    sel.group_id = (char *)"boilers";
    sel.type = (char *)"sensor";
    Iot__Processing__V1__ThresholdCondition th = IOT__PROCESSING__V1__THRESHOLD_CONDITION__INIT;
    th.op = IOT__PROCESSING__V1__COMPARISON__COMPARISON_GT;
    th.threshold = 100;
    Iot__Processing__V1__Rule r = IOT__PROCESSING__V1__RULE__INIT;
    r.name = (char *)"boiler overheat";
    r.enabled = 1;
    r.metric = (char *)"temp";
    r.devices = &sel;
    r.condition_case = IOT__PROCESSING__V1__RULE__CONDITION_THRESHOLD;
    r.threshold = &th;
    char id[160];
    snprintf(id, sizeof id, "%s", create_rule(&pr, &r, NULL));
    int64_t t0 = now_ms() - 60000;
    double hot[2] = {120, 20};
    for (int i = 0; i < 2; i++) push_values(&in, tok[i], "temp", 1, hot, 2, t0, 1000);
    Iot__Processing__V1__ListAlertsResponse *l = wait_alerts(&pr, id, 1, 0, 5000);
    ASSERT_STR_EQ(l->alerts[0]->device_id, "gp-0"); /* gp-1 is not in the group */
    pbfree(l);

    /* gp-2 joins; after the next resolution its crossing is alerted. */
    gm.device_ids = members + 1;
    ASSERT_INT_EQ(unary(dm.ch, DM "AddGroupMembers", &gm, &iot__device__v1__group_members_response__descriptor, &gmr, NULL), 0);
    pbfree(gmr);
    sleep_ms(1000);
    push_values(&in, tok[2], "temp", 1, hot, 2, t0 + 5000, 1000);
    l = wait_alerts(&pr, id, 2, 0, 5000);
    ASSERT_STR_EQ(l->alerts[0]->device_id, "gp-2");
    pbfree(l);

    free_tokens(tok, 3);
    svc_stop(&pr);
    svc_stop(&in);
    svc_stop(&dm);
}

static int owned(svc_t *pr) {
    char body[65536];
    if (test_http_get(pr->p.admin_port, "/metrics", body, sizeof body) != 200) return -1;
    const char *m = strstr(body, "\nprocessing_shards_owned ");
    return m ? atoi(m + strlen("\nprocessing_shards_owned ")) : -1;
}

static void test_two_replicas_split_and_take_over(void) {
    svc_t dm, in, a, b;
    fresh_names("replicas");
    dm_start(&dm);
    const int n = 24;
    char **tok = make_devices(&dm, "rp", n);
    ing_start(&in, dm.p.grpc_port);
    const char *ea[] = {"IOT_INSTANCE_ID=replica-a", NULL}, *eb[] = {"IOT_INSTANCE_ID=replica-b", NULL};
    proc_start(&a, dm.p.grpc_port, ea);
    proc_start(&b, dm.p.grpc_port, eb);
    char id[160];
    snprintf(id, sizeof id, "%s", threshold_rule(&a, &b, 80, 0, "temp"));
    /* Both own some of the 8 shards, together all of them. */
    int oa = 0, ob = 0;
    for (int i = 0; i < 200; i++) {
        oa = owned(&a);
        ob = owned(&b);
        if (oa > 0 && ob > 0 && oa + ob == 8) break;
        sleep_ms(50);
    }
    if (!(oa > 0 && ob > 0 && oa + ob == 8)) TEST__FAIL("shards owned: a %d, b %d", oa, ob);

    /* Every device crosses once: n alerts. */
    int64_t t0 = now_ms() - 60000;
    double hot[2] = {90, 70};
    for (int i = 0; i < n; i++) push_values(&in, tok[i], "temp", 1, hot, 2, t0, 1000);
    pbfree(wait_alerts(&a, id, (size_t)n, 0, 10000));

    /* b dies; a takes every shard within the lease time, claims b's pending entries, and a
     * second crossing of every device is alerted once each — none twice, none missed. */
    svc_kill9(&b);
    for (int i = 0; i < 40 && owned(&a) != 8; i++) sleep_ms(100);
    ASSERT_INT_EQ(owned(&a), 8);
    for (int i = 0; i < n; i++) push_values(&in, tok[i], "temp", 3, hot, 2, t0 + 10000, 1000);
    Iot__Processing__V1__ListAlertsResponse *l = wait_alerts(&a, id, (size_t)(2 * n), 0, 10000);
    for (size_t i = 0; i < l->n_alerts; i++)
        for (size_t j = i + 1; j < l->n_alerts; j++)
            ASSERT(!(strcmp(l->alerts[i]->device_id, l->alerts[j]->device_id) == 0 &&
                     l->alerts[i]->fired_time->seconds == l->alerts[j]->fired_time->seconds));
    pbfree(l);

    /* b comes back: the shards split again, still no duplicate on replay. */
    proc_start(&b, dm.p.grpc_port, eb);
    for (int i = 0; i < 100; i++) {
        oa = owned(&a);
        ob = owned(&b);
        if (oa > 0 && ob > 0 && oa + ob == 8) break;
        sleep_ms(50);
    }
    ASSERT(oa > 0 && ob > 0 && oa + ob == 8);
    sleep_ms(500);
    pbfree(wait_alerts(&b, id, (size_t)(2 * n), 0, 100));

    free_tokens(tok, n);
    svc_stop(&a);
    svc_stop(&b);
    svc_stop(&in);
    svc_stop(&dm);
}

TEST_MAIN(TEST_ENTRY(test_api_rules_alerts_watch_and_errors), TEST_ENTRY(test_window_stats_match_reference), TEST_ENTRY(test_zscore_fires_at_the_outlier_not_before),
          TEST_ENTRY(test_stuck_rate_absence_fire_and_resolve), TEST_ENTRY(test_threshold_duration_once_per_episode_across_kill9),
          TEST_ENTRY(test_emergency_command_reaches_the_device), TEST_ENTRY(test_webhook_delivered_and_retried),
          TEST_ENTRY(test_group_selector_resolved_through_device_mgmt), TEST_ENTRY(test_two_replicas_split_and_take_over))
