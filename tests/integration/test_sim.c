/* iot-sim against the real device-mgmt, ingest, processing and ota binaries (Postgres and Redis from
 * tests/run.sh): 50 devices for about 20 s, then, through the services' own gRPC APIs, the devices
 * exist with their labels, both metrics landed in ingest, an anomaly fired an alert in processing
 * whose command the device acknowledged, and devices finished the OTA update (device-mgmt records
 * the new version). SIGTERM stops the simulator with status 0 and a final summary without errors;
 * a second run against the same state sets up again without creating anything twice. */
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "cm_rpc.h"
#include "iot/device/v1/device.pb-c.h"
#include "iot/ingest/v1/ingest.pb-c.h"
#include "iot/ota/v1/ota.pb-c.h"
#include "iot/processing/v1/processing.pb-c.h"
#include "proc.h"
#include "test.h"

#define DM "/iot.device.v1.DeviceManager/"
#define ING "/iot.ingest.v1.Ingest/"
#define PROC "/iot.processing.v1.Processing/"
#define OTA "/iot.ota.v1.Ota/"
#define N_DEVICES 50

typedef struct svc_s {
    test_proc_t p;
    cm_channel_t *ch;
    char addr[64];
} svc_t;

static int64_t now_ms(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (int64_t)t.tv_sec * 1000 + t.tv_nsec / 1000000;
}

static int64_t wall_ms(void) {
    struct timespec t;
    clock_gettime(CLOCK_REALTIME, &t);
    return (int64_t)t.tv_sec * 1000 + t.tv_nsec / 1000000;
}

static void pbfree(void *m) {
    if (m) protobuf_c_message_free_unpacked(m, NULL);
}

static void start_svc(svc_t *s, const char *name, const char *const *env) {
    static char bin[1024];
    snprintf(bin, sizeof bin, "%s/services/%s/%s", test_env("IOT_BUILD_DIR"), name, name);
    char *argv[] = {bin, NULL};
    if (test_proc_start(&s->p, argv, env, 1) != 0) {
        char err[4096];
        test_proc_stderr(&s->p, err, sizeof err);
        TEST__FAIL("%s did not start: %s", name, err);
    }
    snprintf(s->addr, sizeof s->addr, "127.0.0.1:%d", s->p.grpc_port);
    s->ch = cm_channel_new(s->addr, NULL, NULL);
}

static void stop_svc(svc_t *s) {
    cm_channel_free(s->ch);
    s->ch = NULL;
    test_proc_kill(&s->p, SIGTERM);
    ASSERT_INT_EQ(test_proc_wait(&s->p, 30000), 0);
}

static int unary(svc_t *s, const char *method, const void *req, const ProtobufCMessageDescriptor *desc, void *resp) {
    cm_call_opts_t o = {.timeout_ms = 10000};
    return cm_channel_unary(s->ch, method, req, desc, (ProtobufCMessage **)resp, &o, NULL);
}

/* The simulator's stdout so far, read without blocking (so that it never waits on a full pipe). */
typedef struct sim_out_s {
    char buf[65536];
    size_t n;
} sim_out_t;

static void drain(test_proc_t *p, sim_out_t *o) {
    for (;;) {
        struct pollfd pf = {p->out_fd, POLLIN, 0};
        if (poll(&pf, 1, 0) <= 0 || !(pf.revents & (POLLIN | POLLHUP))) return;
        if (o->n + 1 >= sizeof o->buf) { /* keep the newest half: the checks read the last lines */
            memmove(o->buf, o->buf + sizeof o->buf / 2, o->n - sizeof o->buf / 2);
            o->n -= sizeof o->buf / 2;
        }
        ssize_t r = read(p->out_fd, o->buf + o->n, sizeof o->buf - o->n - 1);
        if (r <= 0) return;
        o->n += (size_t)r;
        o->buf[o->n] = 0;
    }
}

/* Reads until the simulator closes its stdout (it exits), at most timeout_ms. Call before
 * test_proc_wait, which closes the pipe. */
static void drain_to_eof(test_proc_t *p, sim_out_t *o, int timeout_ms) {
    int64_t until = now_ms() + timeout_ms;
    while (now_ms() < until) {
        struct pollfd pf = {p->out_fd, POLLIN, 0};
        if (poll(&pf, 1, 100) <= 0) continue;
        if (o->n + 1 >= sizeof o->buf) {
            memmove(o->buf, o->buf + sizeof o->buf / 2, o->n - sizeof o->buf / 2);
            o->n -= sizeof o->buf / 2;
        }
        ssize_t r = read(p->out_fd, o->buf + o->n, sizeof o->buf - o->n - 1);
        if (r <= 0) return;
        o->n += (size_t)r;
        o->buf[o->n] = 0;
    }
}

static void start_sim(test_proc_t *p, svc_t *dm, svc_t *in, svc_t *pr, svc_t *ota, const char *duration) {
    static char bin[1024];
    snprintf(bin, sizeof bin, "%s/tools/iot-sim", test_env("IOT_BUILD_DIR"));
    char *argv[] = {bin, (char *)"--devices", (char *)"50", (char *)"--prefix", (char *)"simt", (char *)"--interval",
                    (char *)"250ms", (char *)"--anomaly-rate", (char *)"30", (char *)"--ota-check", (char *)"2s",
                    (char *)"--install-time", (char *)"1s", (char *)"--soak", (char *)"2s", (char *)"--ota-fail-rate",
                    (char *)"0", (char *)"--summary", (char *)"2s", (char *)"--artifact-size", (char *)"1000000",
                    (char *)"--dm", dm->addr, (char *)"--ingest", in->addr, (char *)"--processing", pr->addr,
                    (char *)"--ota", ota->addr, (char *)"--duration", (char *)duration, NULL};
    ASSERT_INT_EQ(test_proc_start(p, argv, NULL, 0), 0);
}

/* ---- what the services say ---------------------------------------------------------------- */

static int64_t count_devices(svc_t *dm) {
    Iot__Device__V1__DeviceFilter f = IOT__DEVICE__V1__DEVICE_FILTER__INIT;
    f.label_selector = (char *)"fleet=simt";
    Iot__Device__V1__CountDevicesRequest req = IOT__DEVICE__V1__COUNT_DEVICES_REQUEST__INIT;
    req.filter = &f;
    Iot__Device__V1__CountDevicesResponse *r = NULL;
    if (unary(dm, DM "CountDevices", &req, &iot__device__v1__count_devices_response__descriptor, &r)) return -1;
    int64_t n = r->total;
    pbfree(r);
    return n;
}

/* Points of metric stored for a device in the last 10 minutes (one page of up to 10,000). */
static size_t points_of(svc_t *in, const char *device, const char *metric) {
    Iot__Ingest__V1__QueryTelemetryRequest req = IOT__INGEST__V1__QUERY_TELEMETRY_REQUEST__INIT;
    req.device_id = (char *)device;
    req.metric = (char *)metric;
    req.from_ms = wall_ms() - 600000;
    req.to_ms = wall_ms() + 60000;
    req.page_size = 10000;
    Iot__Ingest__V1__QueryTelemetryResponse *r = NULL;
    if (unary(in, ING "QueryTelemetry", &req, &iot__ingest__v1__query_telemetry_response__descriptor, &r)) return 0;
    size_t n = r->n_points;
    for (size_t i = 0; i < n; i++) /* realistic values, not just any number */
        if (strcmp(metric, "humidity") == 0 && (r->points[i]->double_value < 0 || r->points[i]->double_value > 100)) n = 0;
    pbfree(r);
    return n;
}

/* An alert of the sim's rule whose command the device acknowledged: 1 (with the alert's device),
 * else 0. *alerts gets how many alerts the rule has fired. */
static int alert_with_acked_command(svc_t *pr, svc_t *dm, int *alerts, char *device, size_t cap) {
    Iot__Processing__V1__ListAlertsRequest req = IOT__PROCESSING__V1__LIST_ALERTS_REQUEST__INIT;
    req.rule_id = (char *)"simt-anomaly";
    req.page_size = 1000;
    Iot__Processing__V1__ListAlertsResponse *r = NULL;
    *alerts = 0;
    if (unary(pr, PROC "ListAlerts", &req, &iot__processing__v1__list_alerts_response__descriptor, &r)) return 0;
    *alerts = (int)r->n_alerts;
    int found = 0;
    for (size_t i = 0; i < r->n_alerts && !found; i++) {
        const Iot__Processing__V1__Alert *a = r->alerts[i];
        if (!*a->command_id) continue;
        Iot__Device__V1__GetCommandRequest g = IOT__DEVICE__V1__GET_COMMAND_REQUEST__INIT;
        g.id = a->command_id;
        Iot__Device__V1__Command *c = NULL;
        if (unary(dm, DM "GetCommand", &g, &iot__device__v1__command__descriptor, &c) == 0 &&
            c->status == IOT__DEVICE__V1__COMMAND_STATUS__COMMAND_STATUS_SUCCEEDED && strcmp(c->name, "throttle") == 0 &&
            strcmp(c->device_id, a->device_id) == 0 && c->result) {
            found = 1;
            snprintf(device, cap, "%s", a->device_id);
        }
        pbfree(c);
    }
    pbfree(r);
    return found;
}

/* Devices that finished the sim's rollout, and that device-mgmt now records as running the
 * artifact's version; *version gets it. */
static int updated_devices(svc_t *ota, svc_t *dm, char *version, size_t cap) {
    Iot__Ota__V1__ListArtifactsRequest la = IOT__OTA__V1__LIST_ARTIFACTS_REQUEST__INIT;
    la.name = (char *)"simt-firmware";
    Iot__Ota__V1__ListArtifactsResponse *arts = NULL;
    if (unary(ota, OTA "ListArtifacts", &la, &iot__ota__v1__list_artifacts_response__descriptor, &arts)) return 0;
    int done = 0;
    for (size_t i = 0; i < arts->n_artifacts; i++) {
        Iot__Ota__V1__ListRolloutsRequest lr = IOT__OTA__V1__LIST_ROLLOUTS_REQUEST__INIT;
        lr.artifact_id = arts->artifacts[i]->id;
        Iot__Ota__V1__ListRolloutsResponse *ros = NULL;
        if (unary(ota, OTA "ListRollouts", &lr, &iot__ota__v1__list_rollouts_response__descriptor, &ros)) continue;
        for (size_t j = 0; j < ros->n_rollouts; j++) {
            Iot__Ota__V1__ListDeviceUpdatesRequest lu = IOT__OTA__V1__LIST_DEVICE_UPDATES_REQUEST__INIT;
            lu.rollout_id = ros->rollouts[j]->id;
            lu.phase = IOT__OTA__V1__UPDATE_PHASE__UPDATE_PHASE_SUCCEEDED;
            lu.page_size = 100;
            Iot__Ota__V1__ListDeviceUpdatesResponse *ups = NULL;
            if (unary(ota, OTA "ListDeviceUpdates", &lu, &iot__ota__v1__list_device_updates_response__descriptor, &ups)) continue;
            for (size_t k = 0; k < ups->n_updates; k++) {
                Iot__Device__V1__GetDeviceRequest g = IOT__DEVICE__V1__GET_DEVICE_REQUEST__INIT;
                g.id = ups->updates[k]->device_id;
                Iot__Device__V1__Device *d = NULL;
                if (unary(dm, DM "GetDevice", &g, &iot__device__v1__device__descriptor, &d) == 0 &&
                    strcmp(d->firmware_version, arts->artifacts[i]->version) == 0 && strcmp(ups->updates[k]->from_version, "1.0.0") == 0) {
                    done++;
                    snprintf(version, cap, "%s", arts->artifacts[i]->version);
                }
                pbfree(d);
            }
            pbfree(ups);
        }
        pbfree(ros);
    }
    pbfree(arts);
    return done;
}

static long summary_field(const char *line, const char *name) {
    const char *p = line ? strstr(line, name) : NULL;
    return p ? atol(p + strlen(name)) : -1;
}

static void test_sim_drives_every_service(void) {
    int pid = (int)getpid();
    char pg[1024], redis[128], dm_schema[96], dm_prefix[96], ing_schema[96], streams[96], proc_schema[96], proc_prefix[96],
        proc_streams[96], ota_schema[96], keys[700];
    snprintf(pg, sizeof pg, "IOT_PG_DSN=%s", test_env("IOT_TEST_PG"));
    snprintf(redis, sizeof redis, "IOT_REDIS_ADDR=%s", test_env("IOT_TEST_REDIS"));
    snprintf(dm_schema, sizeof dm_schema, "IOT_DM_PG_SCHEMA=sim_dm_%d", pid);
    snprintf(dm_prefix, sizeof dm_prefix, "IOT_DM_REDIS_PREFIX={sim-%d}:", pid);
    snprintf(ing_schema, sizeof ing_schema, "IOT_INGEST_PG_SCHEMA=sim_ing_%d", pid);
    snprintf(streams, sizeof streams, "IOT_INGEST_STREAM_PREFIX=sim-%d:", pid);
    snprintf(proc_streams, sizeof proc_streams, "IOT_INGEST_STREAM_PREFIX=sim-%d:", pid);
    snprintf(proc_schema, sizeof proc_schema, "IOT_PROC_PG_SCHEMA=sim_proc_%d", pid);
    snprintf(proc_prefix, sizeof proc_prefix, "IOT_PROC_REDIS_PREFIX=sim-%d:proc:", pid);
    snprintf(ota_schema, sizeof ota_schema, "IOT_OTA_PG_SCHEMA=sim_ota_%d", pid);
    snprintf(keys, sizeof keys, "IOT_OTA_KEYS_DIR=%s/sim-keys-%d", test_tmpdir(), pid);

    svc_t dm = {0}, in = {0}, pr = {0}, ota = {0};
    const char *dm_env[] = {pg, redis, dm_schema, dm_prefix, "IOT_DM_MIGRATIONS=services/device-mgmt/migrations",
                            "IOT_GRPC_LISTEN=127.0.0.1:0", "IOT_ADMIN_LISTEN=127.0.0.1:0", NULL};
    start_svc(&dm, "device-mgmt", dm_env);
    char ing_dm[96], proc_dm[96], ota_dm[96], ota_proc[96];
    snprintf(ing_dm, sizeof ing_dm, "IOT_INGEST_DM_ADDR=%s", dm.addr);
    snprintf(proc_dm, sizeof proc_dm, "IOT_PROC_DM_ADDR=%s", dm.addr);
    snprintf(ota_dm, sizeof ota_dm, "IOT_OTA_DM_ADDR=%s", dm.addr);
    const char *in_env[] = {pg, redis, ing_schema, streams, ing_dm, "IOT_INGEST_MIGRATIONS=services/ingest/migrations",
                            "IOT_GRPC_LISTEN=127.0.0.1:0", "IOT_ADMIN_LISTEN=127.0.0.1:0", NULL};
    start_svc(&in, "ingest", in_env);
    const char *pr_env[] = {pg, redis, proc_schema, proc_prefix, proc_streams, proc_dm,
                            "IOT_PROC_MIGRATIONS=services/processing/migrations", "IOT_PROC_RULES_POLL=100ms",
                            "IOT_PROC_FLUSH_INTERVAL=200ms", "IOT_PROC_ACTION_POLL=200ms", "IOT_GRPC_LISTEN=127.0.0.1:0",
                            "IOT_ADMIN_LISTEN=127.0.0.1:0", NULL};
    start_svc(&pr, "processing", pr_env);
    snprintf(ota_proc, sizeof ota_proc, "IOT_OTA_PROC_ADDR=%s", pr.addr);
    const char *ota_env[] = {pg, ota_schema, keys, ota_dm, ota_proc, "IOT_OTA_MIGRATIONS=services/ota/migrations",
                             "IOT_OTA_CONTROLLER_INTERVAL=200ms", "IOT_GRPC_LISTEN=127.0.0.1:0", "IOT_ADMIN_LISTEN=127.0.0.1:0", NULL};
    start_svc(&ota, "ota", ota_env);

    /* ~20 s of simulation, longer only if a slow (sanitizer) build needs it to get there. */
    test_proc_t sim;
    static sim_out_t out;
    memset(&out, 0, sizeof out);
    int64_t t0 = now_ms();
    start_sim(&sim, &dm, &in, &pr, &ota, "0");
    int64_t devices = 0;
    size_t temps = 0, hums = 0;
    int alerts = 0, acked = 0, updated = 0;
    char alert_dev[64] = "", version[32] = "";
    while (now_ms() - t0 < 150000) {
        usleep(500000);
        drain(&sim, &out);
        if (test_proc_wait(&sim, 0) >= 0) {
            char err[4096];
            test_proc_stderr(&sim, err, sizeof err);
            TEST__FAIL("iot-sim exited early; stdout:\n%s\nstderr:\n%s", out.buf, err);
        }
        devices = count_devices(&dm);
        temps = points_of(&in, "simt-00007", "temperature");
        hums = points_of(&in, "simt-00007", "humidity");
        if (!acked) acked = alert_with_acked_command(&pr, &dm, &alerts, alert_dev, sizeof alert_dev);
        updated = updated_devices(&ota, &dm, version, sizeof version);
        if (devices == N_DEVICES && temps >= 20 && hums >= 20 && acked && updated >= 1 && now_ms() - t0 >= 20000) break;
    }
    printf("    after %.1f s: %lld devices, device simt-00007 %zu temperature and %zu humidity points, %d alerts "
           "(command acked by %s), %d devices updated to %s\n",
           (double)(now_ms() - t0) / 1000.0, (long long)devices, temps, hums, alerts, alert_dev[0] ? alert_dev : "none", updated,
           version[0] ? version : "-");
    ASSERT_INT_EQ(devices, N_DEVICES);
    ASSERT(temps >= 20);
    ASSERT(hums >= 20);
    ASSERT(acked);
    ASSERT(updated >= 1);

    test_proc_kill(&sim, SIGTERM);
    drain_to_eof(&sim, &out, 30000);
    int st = test_proc_wait(&sim, 30000);
    if (st != 0) {
        char err[8192];
        test_proc_stderr(&sim, err, sizeof err);
        TEST__FAIL("iot-sim exited with %d after SIGTERM; stderr:\n%s", st, err);
    }
    const char *last = strstr(out.buf, "iot-sim: stopped after ");
    ASSERT(last != NULL);
    printf("    %.*s\n", (int)strcspn(last, "\n"), last);
    ASSERT_INT_EQ(summary_field(last, "errors "), 0);
    ASSERT(summary_field(last, "points sent ") > 0);
    ASSERT(summary_field(last, "commands acked ") >= 1);
    ASSERT(summary_field(last, "updates done ") >= 1);
    /* Every alert has an anomaly behind it: ordinary noise does not fire the rule. */
    ASSERT(alerts <= summary_field(last, "anomalies "));

    /* Again, against what the first run left: nothing is created twice, the devices go on. */
    memset(&out, 0, sizeof out);
    start_sim(&sim, &dm, &in, &pr, &ota, "3s");
    drain_to_eof(&sim, &out, 60000);
    st = test_proc_wait(&sim, 60000);
    if (st != 0) {
        char err[8192];
        test_proc_stderr(&sim, err, sizeof err);
        TEST__FAIL("second iot-sim run exited with %d; stdout:\n%s\nstderr:\n%s", st, out.buf, err);
    }
    ASSERT(strstr(out.buf, "devices: 50 (0 created, 50 existed)"));
    ASSERT(strstr(out.buf, "group: simt-fleet (dynamic, fleet=simt), existed"));
    ASSERT(strstr(out.buf, "rule: simt-anomaly existed"));
    ASSERT(strstr(out.buf, "iot-sim: rollout: "));
    ASSERT(strstr(out.buf, "iot-sim: stopped after "));
    ASSERT_INT_EQ(count_devices(&dm), N_DEVICES);

    stop_svc(&ota);
    stop_svc(&pr);
    stop_svc(&in);
    stop_svc(&dm);
}

/* Bad options: exit 2 and a line naming the option, its variable and what is allowed. */
static void test_sim_rejects_bad_options(void) {
    static char bin[1024];
    snprintf(bin, sizeof bin, "%s/tools/iot-sim", test_env("IOT_BUILD_DIR"));
    char *argv[] = {bin, (char *)"--devices", (char *)"0", (char *)"--interval=soon", NULL};
    test_proc_t p;
    ASSERT_INT_EQ(test_proc_start(&p, argv, NULL, 0), 0);
    ASSERT_INT_EQ(test_proc_wait(&p, 10000), 2);
    char err[2048];
    test_proc_stderr(&p, err, sizeof err);
    ASSERT(strstr(err, "--devices / IOT_SIM_DEVICES: \"0\" is out of range (1..99999)"));
    ASSERT(strstr(err, "--interval / IOT_SIM_INTERVAL: \"soon\" is not a duration"));
    char *help[] = {bin, (char *)"--help", NULL};
    ASSERT_INT_EQ(test_proc_start(&p, help, NULL, 0), 0);
    char line[256];
    ASSERT_INT_EQ(test_proc_read_line(&p, line, sizeof line, 10000), 0);
    ASSERT(strncmp(line, "Usage: iot-sim", 14) == 0);
    ASSERT_INT_EQ(test_proc_wait(&p, 10000), 0);
}

TEST_MAIN(TEST_ENTRY(test_sim_rejects_bad_options), TEST_ENTRY(test_sim_drives_every_service))
