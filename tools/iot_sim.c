/* iot-sim: a fleet of simulated devices for a running suite (`make demo`, tests/integration/test_sim.c).
 *
 * Setup is idempotent, so it can run again against the state a previous run left: the devices
 * (BatchCreateDevices of the missing ones), a dynamic group selecting them by label, a z-score
 * anomaly rule in processing with a command action, and an OTA artifact with a staged rollout to
 * the group behind the telemetry gate (reused while one is unfinished, otherwise the next version).
 *
 * Then each device, on a few worker threads (not one per device): takes a token (IssueToken),
 * sends temperature and humidity (PushTelemetry, resending unacknowledged points after
 * UNAVAILABLE / RESOURCE_EXHAUSTED, honouring retry-after-ms), keeps a WatchCommands stream open
 * and acknowledges every command, and checks for firmware updates: download (resumable), sha256,
 * Ed25519 signature and manifest checks, then ReportStatus DOWNLOADING, VERIFYING, INSTALLING,
 * SUCCEEDED (ota then records the new version in device-mgmt), or FAILED and ROLLED_BACK.
 * Now and then one device runs hot for a few readings, so processing alerts and sends the command.
 *
 * The main thread owns setup, the anomaly schedule, the summary line (stdout, every
 * --summary) and shutdown: SIGINT/SIGTERM (or --duration) stop the workers, which cancel their
 * streams; everything is freed before exit (clean under LeakSanitizer). Exit 0 after a clean stop,
 * 1 when setup cannot complete, 2 for bad options. */
#include <errno.h>
#include <inttypes.h>
#include <math.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <openssl/evp.h>

#include "cm_alloc.h"
#include "cm_config.h"
#include "cm_err.h"
#include "cm_json.h"
#include "cm_log.h"
#include "cm_rpc.h"
#include "cm_time.h"
#include "iot/device/v1/device.pb-c.h"
#include "iot/ingest/v1/ingest.pb-c.h"
#include "iot/ota/v1/ota.pb-c.h"
#include "iot/processing/v1/processing.pb-c.h"

#define DM "/iot.device.v1.DeviceManager/"
#define ING "/iot.ingest.v1.Ingest/"
#define PROC "/iot.processing.v1.Processing/"
#define OTA "/iot.ota.v1.Ota/"

#define SIM_MODEL "SIM-100"
#define SIM_TYPE "env-sensor"
#define SIM_FIRST_FW "1.0.0"
#define SIM_CALL_MS 5000        /* deadline of a device's unary calls */
#define SIM_SETUP_WAIT_MS 120000 /* how long setup waits for services that are not up yet */
#define SIM_MAX_READINGS 600     /* unacknowledged readings a device keeps (10 min at 1 s) */
#define SIM_TICK_MS 50           /* worker loop period: command streams are polled this often */
#define SIM_STREAM_MS 3600000    /* deadline of a device's long streams; they are reopened after */
#define SIM_TOKEN_TTL_S 86400
#define SIM_SPIKE_READINGS 3

/* ---- configuration ------------------------------------------------------------------------- */

typedef struct sim_cfg_s {
    int64_t devices, threads, interval_ms, duration_ms, ota_check_ms, install_ms, soak_ms, summary_ms;
    int64_t artifact_size, min_samples, seed;
    double anomaly_rate, ota_fail_rate;
    const char *prefix, *dm_addr, *ingest_addr, *proc_addr, *ota_addr;
} sim_cfg_t;

typedef enum { OPT_INT, OPT_DUR, OPT_NUM, OPT_STR } sim_opt_type_t;

typedef struct sim_opt_s {
    const char *flag, *env;
    sim_opt_type_t type;
    const char *def, *help;
    double min, max; /* INT, DUR (ms), NUM; both 0: unbounded */
    void *dest;
    const char *given; /* from the command line */
} sim_opt_t;

static sim_cfg_t cfg;

static sim_opt_t opts[] = {
    {"--devices", "IOT_SIM_DEVICES", OPT_INT, "300", "simulated devices", 1, 99999, &cfg.devices, NULL},
    {"--prefix", "IOT_SIM_PREFIX", OPT_STR, "sim",
     "names what setup creates: devices <prefix>-00001.., label fleet=<prefix>, group <prefix>-fleet, rule <prefix>-anomaly, "
     "artifact <prefix>-firmware",
     0, 0, &cfg.prefix, NULL},
    {"--dm", "IOT_SIM_DM_ADDR", OPT_STR, "127.0.0.1:7002", "device-mgmt gRPC address", 0, 0, &cfg.dm_addr, NULL},
    {"--ingest", "IOT_SIM_INGEST_ADDR", OPT_STR, "127.0.0.1:7003", "ingest gRPC address", 0, 0, &cfg.ingest_addr, NULL},
    {"--processing", "IOT_SIM_PROC_ADDR", OPT_STR, "127.0.0.1:7004", "processing gRPC address", 0, 0, &cfg.proc_addr, NULL},
    {"--ota", "IOT_SIM_OTA_ADDR", OPT_STR, "127.0.0.1:7005", "ota gRPC address", 0, 0, &cfg.ota_addr, NULL},
    {"--interval", "IOT_SIM_INTERVAL", OPT_DUR, "500ms", "telemetry period of each device (one temperature and one humidity point)", 50,
     3600000, &cfg.interval_ms, NULL},
    {"--anomaly-rate", "IOT_SIM_ANOMALY_RATE", OPT_NUM, "2",
     "anomalies per minute across the fleet: a device runs hot for a few readings (0: none)", 0, 6000, &cfg.anomaly_rate, NULL},
    {"--duration", "IOT_SIM_DURATION", OPT_DUR, "0", "run this long, then stop (0: until SIGINT or SIGTERM)", 0, 0, &cfg.duration_ms,
     NULL},
    {"--threads", "IOT_SIM_THREADS", OPT_INT, "4", "worker threads the devices are spread over", 1, 64, &cfg.threads, NULL},
    {"--ota-check", "IOT_SIM_OTA_CHECK", OPT_DUR, "30s", "how often each device asks for a firmware update", 100, 86400000,
     &cfg.ota_check_ms, NULL},
    {"--install-time", "IOT_SIM_INSTALL_TIME", OPT_DUR, "10s", "how long an install (and the reboot after it) takes", 0, 3600000,
     &cfg.install_ms, NULL},
    {"--ota-fail-rate", "IOT_SIM_OTA_FAIL_RATE", OPT_NUM, "0.01", "share of installs that fail and roll back", 0, 1,
     &cfg.ota_fail_rate, NULL},
    {"--soak", "IOT_SIM_SOAK", OPT_DUR, "60s", "soak (telemetry gate) after each stage of a rollout setup creates", 0, 86400000,
     &cfg.soak_ms, NULL},
    {"--artifact-size", "IOT_SIM_ARTIFACT_SIZE", OPT_INT, "262144", "bytes of a firmware artifact setup uploads", 1, 64 << 20,
     &cfg.artifact_size, NULL},
    {"--min-samples", "IOT_SIM_MIN_SAMPLES", OPT_INT, "60",
     "z-score warm-up of the anomaly rule setup creates (points; below 60 ordinary noise may alert now and then)", 2, 10000,
     &cfg.min_samples, NULL},
    {"--summary", "IOT_SIM_SUMMARY", OPT_DUR, "10s", "period of the summary line on stdout", 100, 3600000, &cfg.summary_ms, NULL},
    {"--seed", "IOT_SIM_SEED", OPT_INT, "0", "random seed (0: from the clock)", 0, 0, &cfg.seed, NULL},
};
#define N_OPTS (sizeof opts / sizeof opts[0])

static void usage(FILE *f) {
    fprintf(f,
            "Usage: iot-sim [--option value | --option=value ...]\n"
            "\n"
            "Simulated devices against a running iotsuite: sets up devices, a group, an anomaly rule and a\n"
            "firmware rollout (idempotently), then streams telemetry with occasional anomalies, answers\n"
            "commands and takes part in the rollout. Prints a summary line every --summary; stops on SIGINT\n"
            "or SIGTERM (or after --duration). Each option can also be given by its environment variable;\n"
            "the command line wins.\n\n");
    for (size_t i = 0; i < N_OPTS; i++)
        fprintf(f, "  %-16s %-22s %s (default %s)\n", opts[i].flag, opts[i].env, opts[i].help, opts[i].def);
    fprintf(f, "\nExit status: 0 after a clean stop, 1 when setup cannot complete, 2 for bad options.\n");
}

static int prefix_ok(const char *s) {
    size_t n = strlen(s);
    if (n < 1 || n > 24) return 0;
    for (size_t i = 0; i < n; i++) {
        char c = s[i];
        int ok = (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || (c == '-' && i > 0);
        if (!ok) return 0;
    }
    return 1;
}

/* Returns 0 to run, 1 after --help, 2 after printing what is wrong. */
static int parse_options(int argc, char **argv) {
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (strcmp(a, "--help") == 0 || strcmp(a, "-h") == 0) {
            usage(stdout);
            return 1;
        }
        const char *eq = strchr(a, '=');
        size_t flen = eq ? (size_t)(eq - a) : strlen(a);
        sim_opt_t *o = NULL;
        for (size_t k = 0; k < N_OPTS && !o; k++)
            if (strlen(opts[k].flag) == flen && strncmp(opts[k].flag, a, flen) == 0) o = &opts[k];
        if (!o) {
            fprintf(stderr, "iot-sim: unknown option \"%s\" (see --help)\n", a);
            return 2;
        }
        if (eq) {
            o->given = eq + 1;
        } else if (i + 1 < argc) {
            o->given = argv[++i];
        } else {
            fprintf(stderr, "iot-sim: %s needs a value\n", o->flag);
            return 2;
        }
    }
    int bad = 0;
    for (size_t k = 0; k < N_OPTS; k++) {
        sim_opt_t *o = &opts[k];
        const char *v = o->given;
        if (!v) v = getenv(o->env);
        if (!v || !*v) v = o->def;
        char *end = NULL;
        double x = 0;
        int64_t ms = 0;
        int ok = 1;
        switch (o->type) {
        case OPT_STR: *(const char **)o->dest = v; break;
        case OPT_INT:
            errno = 0;
            x = (double)strtoll(v, &end, 10);
            ok = !errno && end != v && !*end;
            if (ok) *(int64_t *)o->dest = (int64_t)x;
            break;
        case OPT_NUM:
            errno = 0;
            x = strtod(v, &end);
            ok = !errno && end != v && !*end && isfinite(x);
            if (ok) *(double *)o->dest = x;
            break;
        case OPT_DUR:
            ok = cm_config_parse_duration(v, &ms) == 0;
            x = (double)ms;
            if (ok) *(int64_t *)o->dest = ms;
            break;
        }
        if (!ok) {
            fprintf(stderr, "iot-sim: %s / %s: \"%s\" is not a%s\n", o->flag, o->env, v,
                    o->type == OPT_INT ? "n integer" : o->type == OPT_NUM ? " number" : " duration (examples: 500ms, 10s, 2m)");
            bad++;
        } else if (o->type != OPT_STR && (o->min || o->max) && (x < o->min || x > o->max)) {
            if (o->type == OPT_DUR)
                fprintf(stderr, "iot-sim: %s / %s: \"%s\" is out of range (%.0fms..%.0fms)\n", o->flag, o->env, v, o->min, o->max);
            else
                fprintf(stderr, "iot-sim: %s / %s: \"%s\" is out of range (%g..%g)\n", o->flag, o->env, v, o->min, o->max);
            bad++;
        }
    }
    if (!bad && !prefix_ok(cfg.prefix)) {
        fprintf(stderr, "iot-sim: --prefix / IOT_SIM_PREFIX: \"%s\" must be 1..24 characters of a-z 0-9 - (not starting with -)\n",
                cfg.prefix);
        bad++;
    }
    return bad ? 2 : 0;
}

/* ---- small helpers ------------------------------------------------------------------------- */

static atomic_int stopping;

static int64_t mono_ms(void) { return cm_mono_ns() / 1000000; }

static void sleep_ms(int64_t ms) {
    if (ms <= 0) return;
    struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}

/* xorshift64*: one state per thread, so no locking. */
static uint64_t rng_next(uint64_t *s) {
    uint64_t x = *s;
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    *s = x;
    return x * 0x2545F4914F6CDD1DULL;
}

static double rng_unit(uint64_t *s) { return (double)(rng_next(s) >> 11) / 9007199254740992.0; }

static uint64_t fnv1a(const char *s) {
    uint64_t h = 0xcbf29ce484222325ULL;
    for (; *s; s++) h = (h ^ (uint8_t)*s) * 0x100000001b3ULL;
    return h ? h : 1;
}

/* d ms, give or take a quarter, so that a fleet does not move in lock step. */
static int64_t jitter(uint64_t *r, int64_t d) { return d - d / 4 + (int64_t)(rng_unit(r) * (double)(d / 2 + 1)); }

static void pbfree(void *m) {
    if (m) protobuf_c_message_free_unpacked(m, NULL);
}

/* Counters for the summary line. */
static struct {
    atomic_llong points, batches, dropped, anomalies, cmds_received, cmds_acked, updates_started, updates_done, updates_failed,
        updates_active, errors, retries;
} stats;

/* Problems go to stderr with their context, but at most one line per kind every 5 s, so that a
 * fleet hitting the same outage does not flood the log; the others are counted in that line. */
enum { W_SETUP, W_TOKEN, W_PUSH, W_WATCH, W_ACK, W_OTA, W_VERIFY, W_COUNT };
static pthread_mutex_t warn_mu = PTHREAD_MUTEX_INITIALIZER;
static int64_t warn_last[W_COUNT];
static long warn_suppressed[W_COUNT];

static void sim_warn(int kind, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void sim_warn(int kind, const char *fmt, ...) {
    int64_t now = mono_ms();
    pthread_mutex_lock(&warn_mu);
    if (warn_last[kind] && now - warn_last[kind] < 5000) {
        warn_suppressed[kind]++;
        pthread_mutex_unlock(&warn_mu);
        return;
    }
    long sup = warn_suppressed[kind];
    warn_suppressed[kind] = 0;
    warn_last[kind] = now;
    pthread_mutex_unlock(&warn_mu);
    char msg[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    if (sup)
        fprintf(stderr, "iot-sim: %s (and %ld more like it in the last seconds)\n", msg, sup);
    else
        fprintf(stderr, "iot-sim: %s\n", msg);
}

/* ---- calls ----------------------------------------------------------------------------------- */

typedef struct sim_rpc_s {
    int code;
    char msg[512];
    int64_t retry_after_ms; /* the server's retry-after-ms, else 0 */
} sim_rpc_t;

static cm_channel_t *ch_dm, *ch_ing, *ch_proc, *ch_ota;

/* A unary call, with the device's "Bearer <token>" when auth is given. */
static int sim_unary(cm_channel_t *ch, const char *method, const void *req, const ProtobufCMessageDescriptor *desc, void *resp,
                     const char *auth, int64_t timeout_ms, sim_rpc_t *out) {
    cm_md_t md = {"authorization", auth, 0};
    cm_call_opts_t o = {.timeout_ms = timeout_ms, .md = auth ? &md : NULL, .n_md = auth ? 1 : 0};
    cm_rpc_status_t st = {0};
    int code = cm_channel_unary(ch, method, req, desc, (ProtobufCMessage **)resp, &o, &st);
    if (out) {
        out->code = code;
        snprintf(out->msg, sizeof out->msg, "%s", st.message);
        const char *ra = cm_rpc_status_md(&st, "retry-after-ms");
        out->retry_after_ms = ra ? strtoll(ra, NULL, 10) : 0;
        if (out->retry_after_ms < 0 || out->retry_after_ms > 600000) out->retry_after_ms = 0;
    }
    cm_rpc_status_clear(&st);
    return code;
}

/* Codes after which the same request may simply be sent again later. */
static int transient(int code) {
    return code == CM_STATUS_UNAVAILABLE || code == CM_STATUS_RESOURCE_EXHAUSTED || code == CM_STATUS_DEADLINE_EXCEEDED ||
           code == CM_STATUS_ABORTED;
}

/* Consumes a pending SIGINT/SIGTERM (signals are blocked in every thread; main collects them). */
static void poll_signal(int64_t wait_ms) {
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGINT);
    sigaddset(&set, SIGTERM);
    struct timespec ts = {wait_ms / 1000, (long)(wait_ms % 1000) * 1000000L};
    if (sigtimedwait(&set, NULL, &ts) > 0) atomic_store(&stopping, 1);
}

/* A setup call: waits for services that are not up yet (transient codes) up to
 * SIM_SETUP_WAIT_MS, honouring retry-after-ms; returns the final code, or CM_STATUS_CANCELLED when
 * a signal came first. */
static int setup_unary(cm_channel_t *ch, const char *addr, const char *method, const void *req, const ProtobufCMessageDescriptor *desc,
                       void *resp, sim_rpc_t *out) {
    int64_t until = mono_ms() + SIM_SETUP_WAIT_MS, backoff = 250;
    int said = 0;
    for (;;) {
        int code = sim_unary(ch, method, req, desc, resp, NULL, 30000, out);
        if (!transient(code) || mono_ms() >= until) return code;
        if (!said++) fprintf(stderr, "iot-sim: %s at %s: %s %s; waiting for it\n", method, addr, cm_status_name(code), out->msg);
        int64_t wait = out->retry_after_ms > 0 ? out->retry_after_ms : backoff;
        backoff = backoff < 4000 ? backoff * 2 : 4000;
        for (int64_t t = 0; t < wait && !atomic_load(&stopping); t += 100) poll_signal(100);
        if (atomic_load(&stopping)) return out->code = CM_STATUS_CANCELLED;
    }
}

/* ---- signing keys (device side: verify what ota offers) ------------------------------------ */

typedef struct sim_key_s {
    char id[32];
    uint8_t pub[32];
} sim_key_t;

static pthread_mutex_t keys_mu = PTHREAD_MUTEX_INITIALIZER;
static sim_key_t *keys;
static size_t n_keys;

/* Loads ListSigningKeys (again); 0 or the failing status code. */
static int keys_load(void) {
    Iot__Ota__V1__ListSigningKeysRequest req = IOT__OTA__V1__LIST_SIGNING_KEYS_REQUEST__INIT;
    Iot__Ota__V1__ListSigningKeysResponse *r = NULL;
    sim_rpc_t st;
    if (sim_unary(ch_ota, OTA "ListSigningKeys", &req, &iot__ota__v1__list_signing_keys_response__descriptor, &r, NULL, SIM_CALL_MS,
                  &st))
        return st.code;
    pthread_mutex_lock(&keys_mu);
    cm_free(keys);
    keys = cm_calloc(r->n_keys + 1, sizeof *keys);
    n_keys = 0;
    for (size_t i = 0; i < r->n_keys; i++) {
        if (r->keys[i]->public_key.len != 32) continue;
        snprintf(keys[n_keys].id, sizeof keys[n_keys].id, "%s", r->keys[i]->key_id);
        memcpy(keys[n_keys].pub, r->keys[i]->public_key.data, 32);
        n_keys++;
    }
    pthread_mutex_unlock(&keys_mu);
    pbfree(r);
    return 0;
}

static int key_find(const char *id, uint8_t pub[32]) {
    pthread_mutex_lock(&keys_mu);
    int found = 0;
    for (size_t i = 0; i < n_keys && !found; i++)
        if (strcmp(keys[i].id, id) == 0) {
            memcpy(pub, keys[i].pub, 32);
            found = 1;
        }
    pthread_mutex_unlock(&keys_mu);
    return found;
}

/* The checks a device makes before installing (services/ota/README.md, "Signatures and keys"):
 * the signature over the manifest with the key it names, the manifest naming what was offered and
 * a model of ours, then the content's digest and size. 0, or -1 with why. */
static int verify_download(const Iot__Ota__V1__Artifact *a, const char *sha_hex, int64_t size, char *why, size_t cap) {
    uint8_t pub[32];
    if (!key_find(a->key_id, pub)) {
        keys_load(); /* a key rotated in since setup */
        if (!key_find(a->key_id, pub)) return snprintf(why, cap, "signing key %s is unknown to ListSigningKeys", a->key_id), -1;
    }
    EVP_PKEY *pk = EVP_PKEY_new_raw_public_key(EVP_PKEY_ED25519, NULL, pub, 32);
    EVP_MD_CTX *m = EVP_MD_CTX_new();
    int ok = pk && m && EVP_DigestVerifyInit(m, NULL, NULL, NULL, pk) == 1 &&
             EVP_DigestVerify(m, a->signature.data, a->signature.len, a->manifest.data, a->manifest.len) == 1;
    EVP_MD_CTX_free(m);
    EVP_PKEY_free(pk);
    if (!ok) return snprintf(why, cap, "the manifest's Ed25519 signature does not verify with key %s", a->key_id), -1;
    char err[160];
    json_t *j = cm_json_parse((const char *)a->manifest.data, a->manifest.len, err, sizeof err);
    if (!j) return snprintf(why, cap, "the manifest is not JSON: %s", err), -1;
    const char *id = json_string_value(json_object_get(j, "artifact_id"));
    const char *ver = json_string_value(json_object_get(j, "version"));
    const char *sha = json_string_value(json_object_get(j, "sha256"));
    json_t *models = json_object_get(j, "models"), *sz = json_object_get(j, "size");
    int model_ok = 0;
    for (size_t i = 0; json_is_array(models) && i < json_array_size(models); i++) {
        const char *mm = json_string_value(json_array_get(models, i));
        if (mm && strcmp(mm, SIM_MODEL) == 0) model_ok = 1;
    }
    int rc = -1;
    if (!id || strcmp(id, a->id) != 0)
        snprintf(why, cap, "the manifest names artifact %s, not %s", id ? id : "(none)", a->id);
    else if (!ver || strcmp(ver, a->version) != 0)
        snprintf(why, cap, "the manifest names version %s, not %s", ver ? ver : "(none)", a->version);
    else if (!model_ok)
        snprintf(why, cap, "the manifest's models do not include %s", SIM_MODEL);
    else if (!sha || strcmp(sha, sha_hex) != 0)
        snprintf(why, cap, "content sha256 %s does not match the manifest's %s", sha_hex, sha ? sha : "(none)");
    else if (!json_is_integer(sz) || json_integer_value(sz) != size)
        snprintf(why, cap, "content size %" PRId64 " does not match the manifest's", size);
    else
        rc = 0;
    json_decref(j);
    return rc;
}

/* ---- firmware content ------------------------------------------------------------------------ */

/* The artifact of a version: a small header, then bytes from a generator seeded by the version, so
 * that any slice can be made again without keeping the whole image. */
static void firmware_fill(const char *version, int64_t from, uint8_t *buf, size_t n) {
    char head[64];
    int hl = snprintf(head, sizeof head, "IOTSIM-FW %s\n", version);
    uint64_t seed = fnv1a(version);
    for (size_t i = 0; i < n; i++) {
        int64_t at = from + (int64_t)i;
        if (at < hl) {
            buf[i] = (uint8_t)head[at];
            continue;
        }
        uint64_t x = ((uint64_t)at / 8 + 1) * 0x9E3779B97F4A7C15ULL ^ seed;
        x ^= x >> 31;
        x *= 0xbf58476d1ce4e5b9ULL;
        x ^= x >> 29;
        buf[i] = (uint8_t)(x >> ((at % 8) * 8));
    }
}

static void hex32(const uint8_t d[32], char out[65]) {
    for (int i = 0; i < 32; i++) snprintf(out + 2 * i, 3, "%02x", d[i]);
}

/* ---- setup ------------------------------------------------------------------------------------- */

typedef struct sim_dev_s sim_dev_t;
static sim_dev_t *devs;
static char group_id[64], rule_id[64], artifact_name[64], label_sel[64];

typedef struct semver_s {
    long a, b, c;
} semver_t;

/* Plain "a.b.c" (what the sim makes and starts with); anything else: -1. */
static int semver_parse(const char *s, semver_t *v) {
    char tail;
    return s && sscanf(s, "%ld.%ld.%ld%c", &v->a, &v->b, &v->c, &tail) == 3 && v->a >= 0 && v->b >= 0 && v->c >= 0 ? 0 : -1;
}

static int semver_cmp(const semver_t *x, const semver_t *y) {
    if (x->a != y->a) return x->a < y->a ? -1 : 1;
    if (x->b != y->b) return x->b < y->b ? -1 : 1;
    return x->c < y->c ? -1 : x->c > y->c;
}

struct sim_dev_s {
    int index;
    char id[48];
    char fw[32];  /* the firmware it runs */
    char *auth;   /* "Bearer <token>", or NULL until IssueToken answered */
    int64_t token_retry_ms;
    /* telemetry */
    double temp_base, hum_base, phase, spike, last_temp;
    int seq_known;
    uint64_t seq; /* the last seq given to a point */
    cm_stream_t *tel; /* StreamTelemetry */
    int tel_ready;    /* its first acknowledgement came */
    uint64_t sent;    /* the highest seq sent on it */
    int in_flight;    /* batches sent on it and not acknowledged yet */
    int64_t tel_retry_ms, tel_backoff_ms;
    struct reading {
        uint64_t seq; /* of the temperature point; humidity is seq + 1 */
        int64_t time_ms;
        double temp, hum;
    } *pending;
    int n_pending;
    int64_t next_reading_ms, paused_until_ms;
    atomic_int spike_left;     /* readings left running hot (set by main, cleared by "throttle") */
    atomic_llong readings;     /* readings taken since start (main picks warm devices) */
    atomic_int busy;           /* installing: main leaves it alone */
    /* commands */
    cm_stream_t *watch;
    int64_t watch_retry_ms, watch_backoff_ms;
    /* ota */
    int ota;
    int64_t ota_next_ms, ota_backoff_ms, install_until_ms;
    char rollout[32], target[32], artifact_id[32];
    int quiet;  /* the server is past a phase we would report (a restart mid-update): report from INSTALLING on */
    int64_t dl_offset;
    EVP_MD_CTX *dl_sha;
    Iot__Ota__V1__Artifact *offer; /* the artifact offered, with manifest and signature */
    char fail_why[256];
    int rolled_back;
};

/* Devices that exist: their firmware versions by index (NULL: absent). */
static char **existing_fw;

static int list_devices(void) {
    char token[256] = "";
    for (;;) {
        Iot__Device__V1__DeviceFilter f = IOT__DEVICE__V1__DEVICE_FILTER__INIT;
        f.label_selector = label_sel;
        Iot__Device__V1__ListDevicesRequest req = IOT__DEVICE__V1__LIST_DEVICES_REQUEST__INIT;
        req.filter = &f;
        req.page_size = 1000;
        req.page_token = token;
        Iot__Device__V1__ListDevicesResponse *r = NULL;
        sim_rpc_t st;
        if (setup_unary(ch_dm, cfg.dm_addr, DM "ListDevices", &req, &iot__device__v1__list_devices_response__descriptor, &r, &st)) {
            if (st.code != CM_STATUS_CANCELLED) fprintf(stderr, "iot-sim: listing devices (%s): %s %s\n", label_sel, cm_status_name(st.code), st.msg);
            return -1;
        }
        size_t plen = strlen(cfg.prefix);
        for (size_t i = 0; i < r->n_devices; i++) {
            const char *id = r->devices[i]->id;
            if (strncmp(id, cfg.prefix, plen) != 0 || id[plen] != '-') continue;
            char *end;
            long k = strtol(id + plen + 1, &end, 10);
            if (*end || k < 1 || k > cfg.devices) continue;
            cm_free(existing_fw[k - 1]);
            existing_fw[k - 1] = cm_strdup(r->devices[i]->firmware_version);
        }
        snprintf(token, sizeof token, "%s", r->next_page_token);
        pbfree(r);
        if (!token[0]) return 0;
    }
}

static void dev_id(int k, char *out, size_t cap) { snprintf(out, cap, "%s-%05d", cfg.prefix, k + 1); }

/* Creates the devices that are missing, 500 per BatchCreateDevices (all or nothing per batch: one
 * that appeared meanwhile fails the batch with ALREADY_EXISTS, and the listing is read again). */
static int setup_devices(void) {
    existing_fw = cm_calloc((size_t)cfg.devices, sizeof *existing_fw);
    int created = 0;
    for (int attempt = 0; attempt < 3; attempt++) {
        if (list_devices()) return -1;
        int missing = 0, conflict = 0;
        for (int64_t k = 0; k < cfg.devices; k++) missing += !existing_fw[k];
        if (!missing) break;
        Iot__Device__V1__Device *dv = cm_calloc(500, sizeof *dv), **dp = cm_calloc(500, sizeof *dp);
        Iot__Device__V1__Location *loc = cm_calloc(500, sizeof *loc);
        Iot__Device__V1__Device__LabelsEntry *lab = cm_calloc(1000, sizeof *lab), **lp = cm_calloc(1000, sizeof *lp);
        char(*ids)[48] = cm_calloc(500, sizeof *ids), (*names)[64] = cm_calloc(500, sizeof *names),
            (*sites)[48] = cm_calloc(500, sizeof *sites), (*plants)[16] = cm_calloc(500, sizeof *plants);
        int64_t k = 0;
        while (k < cfg.devices && !conflict) {
            size_t n = 0;
            for (; k < cfg.devices && n < 500; k++) {
                if (existing_fw[k]) continue;
                int plant = (int)(k % 3) + 1, line = (int)(k / 3 % 4) + 1;
                dev_id((int)k, ids[n], sizeof ids[n]);
                snprintf(names[n], sizeof names[n], "Sensor %05d (plant %d, line %d)", (int)k + 1, plant, line);
                snprintf(sites[n], sizeof sites[n], "plant-%d/line-%d", plant, line);
                snprintf(plants[n], sizeof plants[n], "plant-%d", plant);
                iot__device__v1__device__init(&dv[n]);
                iot__device__v1__location__init(&loc[n]);
                loc[n].site = sites[n];
                loc[n].latitude = 48.13 + plant * 0.05 + (double)line * 0.001;
                loc[n].longitude = 11.57 + plant * 0.07 + (double)(k % 7) * 0.0005;
                for (int l = 0; l < 2; l++) {
                    iot__device__v1__device__labels_entry__init(&lab[2 * n + l]);
                    lp[2 * n + l] = &lab[2 * n + l];
                }
                lab[2 * n].key = (char *)"fleet";
                lab[2 * n].value = (char *)cfg.prefix;
                lab[2 * n + 1].key = (char *)"site";
                lab[2 * n + 1].value = plants[n];
                dv[n].id = ids[n];
                dv[n].name = names[n];
                dv[n].type = (char *)SIM_TYPE;
                dv[n].model = (char *)SIM_MODEL;
                dv[n].location = &loc[n];
                dv[n].n_labels = 2;
                dv[n].labels = &lp[2 * n];
                dv[n].firmware_version = (char *)SIM_FIRST_FW;
                dp[n] = &dv[n];
                n++;
            }
            if (!n) break;
            Iot__Device__V1__BatchCreateDevicesRequest req = IOT__DEVICE__V1__BATCH_CREATE_DEVICES_REQUEST__INIT;
            req.n_devices = n;
            req.devices = dp;
            Iot__Device__V1__BatchCreateDevicesResponse *r = NULL;
            sim_rpc_t st;
            int code = setup_unary(ch_dm, cfg.dm_addr, DM "BatchCreateDevices", &req, &iot__device__v1__batch_create_devices_response__descriptor,
                                   &r, &st);
            pbfree(r);
            if (code == CM_STATUS_ALREADY_EXISTS) {
                conflict = 1; /* created by someone else meanwhile: list again */
            } else if (code) {
                if (code != CM_STATUS_CANCELLED)
                    fprintf(stderr, "iot-sim: BatchCreateDevices of %zu devices at %s: %s %s\n", n, cfg.dm_addr, cm_status_name(code), st.msg);
                k = -1;
                break;
            } else {
                for (size_t i = 0; i < n; i++) {
                    long idx = strtol(ids[i] + strlen(cfg.prefix) + 1, NULL, 10) - 1;
                    existing_fw[idx] = cm_strdup(SIM_FIRST_FW);
                }
                created += (int)n;
            }
        }
        cm_free(dv);
        cm_free(dp);
        cm_free(loc);
        cm_free(lab);
        cm_free(lp);
        cm_free(ids);
        cm_free(names);
        cm_free(sites);
        cm_free(plants);
        if (k < 0) return -1;
        if (!conflict) break;
    }
    for (int64_t k = 0; k < cfg.devices; k++)
        if (!existing_fw[k]) {
            fprintf(stderr, "iot-sim: device %s-%05d could not be created (it kept appearing and disappearing)\n", cfg.prefix, (int)k + 1);
            return -1;
        }
    printf("iot-sim: devices: %" PRId64 " (%d created, %" PRId64 " existed), model %s, label fleet=%s\n", cfg.devices, created,
           cfg.devices - created, SIM_MODEL, cfg.prefix);
    return 0;
}

static int setup_group(void) {
    Iot__Device__V1__DeviceFilter f = IOT__DEVICE__V1__DEVICE_FILTER__INIT;
    f.label_selector = label_sel;
    Iot__Device__V1__Group g = IOT__DEVICE__V1__GROUP__INIT;
    g.id = group_id;
    g.kind = IOT__DEVICE__V1__GROUP_KIND__GROUP_KIND_DYNAMIC;
    g.description = (char *)"devices simulated by iot-sim";
    g.filter = &f;
    Iot__Device__V1__CreateGroupRequest req = IOT__DEVICE__V1__CREATE_GROUP_REQUEST__INIT;
    req.group = &g;
    Iot__Device__V1__Group *r = NULL;
    sim_rpc_t st;
    int code = setup_unary(ch_dm, cfg.dm_addr, DM "CreateGroup", &req, &iot__device__v1__group__descriptor, &r, &st);
    pbfree(r);
    if (code && code != CM_STATUS_ALREADY_EXISTS) {
        if (code != CM_STATUS_CANCELLED) fprintf(stderr, "iot-sim: CreateGroup %s at %s: %s %s\n", group_id, cfg.dm_addr, cm_status_name(code), st.msg);
        return -1;
    }
    printf("iot-sim: group: %s (dynamic, %s)%s\n", group_id, label_sel, code ? ", existed" : ", created");
    return 0;
}

/* A z-score detector on temperature for the group: an anomaly scores 1 and fires a HIGH alert,
 * whose command action queues "throttle" to the device; ordinary noise stays below the level
 * (take_reading). */
static int setup_rule(void) {
    Iot__Processing__V1__GetRuleRequest g = IOT__PROCESSING__V1__GET_RULE_REQUEST__INIT;
    g.id = rule_id;
    Iot__Processing__V1__Rule *have = NULL;
    sim_rpc_t st;
    int code = setup_unary(ch_proc, cfg.proc_addr, PROC "GetRule", &g, &iot__processing__v1__rule__descriptor, &have, &st);
    if (code == CM_STATUS_OK) {
        printf("iot-sim: rule: %s existed (%s), kept as it is\n", rule_id, have->enabled ? "enabled" : "disabled");
        pbfree(have);
        return 0;
    }
    if (code != CM_STATUS_NOT_FOUND) {
        if (code != CM_STATUS_CANCELLED) fprintf(stderr, "iot-sim: GetRule %s at %s: %s %s\n", rule_id, cfg.proc_addr, cm_status_name(code), st.msg);
        return -1;
    }
    Iot__Processing__V1__DeviceSelector sel = IOT__PROCESSING__V1__DEVICE_SELECTOR__INIT;
    sel.group_id = group_id;
    Iot__Processing__V1__DetectorCondition det = IOT__PROCESSING__V1__DETECTOR_CONDITION__INIT;
    det.kind = IOT__PROCESSING__V1__DETECTOR_KIND__DETECTOR_KIND_ZSCORE;
    det.level = 0.9;
    det.window_ms = 300000;
    det.min_samples = (int32_t)cfg.min_samples;
    json_t *payload = json_pack("{s:s, s:i}", "reason", "temperature anomaly", "max_duty_percent", 50);
    Google__Protobuf__Struct *ps = NULL;
    int jrc = cm_json_to_struct(payload, NULL, &ps);
    json_decref(payload);
    if (jrc) {
        fprintf(stderr, "iot-sim: cannot build the command payload of rule %s\n", rule_id);
        return -1;
    }
    Iot__Processing__V1__CommandAction cmd = IOT__PROCESSING__V1__COMMAND_ACTION__INIT;
    cmd.name = (char *)"throttle";
    cmd.payload = ps;
    cmd.min_severity = IOT__PROCESSING__V1__SEVERITY__SEVERITY_HIGH;
    Iot__Processing__V1__Rule r = IOT__PROCESSING__V1__RULE__INIT;
    r.id = rule_id;
    r.name = (char *)"Temperature anomaly (iot-sim)";
    r.enabled = 1;
    r.devices = &sel;
    r.metric = (char *)"temperature";
    r.condition_case = IOT__PROCESSING__V1__RULE__CONDITION_DETECTOR;
    r.detector = &det;
    r.severity = IOT__PROCESSING__V1__SEVERITY__SEVERITY_HIGH;
    r.command = &cmd;
    Iot__Processing__V1__CreateRuleRequest req = IOT__PROCESSING__V1__CREATE_RULE_REQUEST__INIT;
    req.rule = &r;
    Iot__Processing__V1__Rule *out = NULL;
    code = setup_unary(ch_proc, cfg.proc_addr, PROC "CreateRule", &req, &iot__processing__v1__rule__descriptor, &out, &st);
    pbfree(out);
    protobuf_c_message_free_unpacked(&ps->base, NULL);
    if (code && code != CM_STATUS_ALREADY_EXISTS) {
        if (code != CM_STATUS_CANCELLED) fprintf(stderr, "iot-sim: CreateRule %s at %s: %s %s\n", rule_id, cfg.proc_addr, cm_status_name(code), st.msg);
        return -1;
    }
    printf("iot-sim: rule: %s created (z-score of temperature over 0.9 after %" PRId64 " points: a HIGH alert and a \"throttle\" command)\n",
           rule_id, cfg.min_samples);
    return 0;
}

/* Uploads version's image; 0 with its id, CM_STATUS_ALREADY_EXISTS, or -1 after saying why. */
static int upload_artifact(const char *version, char *id_out, size_t cap) {
    uint8_t *buf = cm_malloc(256 * 1024);
    EVP_MD_CTX *c = EVP_MD_CTX_new();
    EVP_DigestInit_ex(c, EVP_sha256(), NULL);
    for (int64_t off = 0; off < cfg.artifact_size; off += 256 * 1024) {
        size_t n = (size_t)(cfg.artifact_size - off < 256 * 1024 ? cfg.artifact_size - off : 256 * 1024);
        firmware_fill(version, off, buf, n);
        EVP_DigestUpdate(c, buf, n);
    }
    uint8_t d[32];
    char sha[65];
    EVP_DigestFinal_ex(c, d, NULL);
    EVP_MD_CTX_free(c);
    hex32(d, sha);

    char *models[] = {(char *)SIM_MODEL};
    Iot__Ota__V1__ArtifactHeader h = IOT__OTA__V1__ARTIFACT_HEADER__INIT;
    char notes[128];
    snprintf(notes, sizeof notes, "Simulated firmware %s for %s sensors (iot-sim).", version, SIM_MODEL);
    h.name = artifact_name;
    h.version = (char *)version;
    h.n_models = 1;
    h.models = models;
    h.release_notes = notes;
    h.sha256 = sha;
    h.size = cfg.artifact_size;
    cm_call_opts_t o = {.timeout_ms = 120000};
    cm_stream_t *s = cm_stream_open(ch_ota, OTA "UploadArtifact", &o);
    Iot__Ota__V1__UploadArtifactRequest m = IOT__OTA__V1__UPLOAD_ARTIFACT_REQUEST__INIT;
    m.part_case = IOT__OTA__V1__UPLOAD_ARTIFACT_REQUEST__PART_HEADER;
    m.header = &h;
    int sent = cm_stream_send(s, &m.base) == 0;
    for (int64_t off = 0; sent && off < cfg.artifact_size; off += 256 * 1024) {
        size_t n = (size_t)(cfg.artifact_size - off < 256 * 1024 ? cfg.artifact_size - off : 256 * 1024);
        firmware_fill(version, off, buf, n);
        m.part_case = IOT__OTA__V1__UPLOAD_ARTIFACT_REQUEST__PART_CHUNK;
        m.chunk.data = buf;
        m.chunk.len = n;
        sent = cm_stream_send(s, &m.base) == 0; /* refused midway: the status says why */
    }
    cm_free(buf);
    cm_stream_close_send(s);
    Iot__Ota__V1__Artifact *a = NULL;
    int got = cm_stream_recv(s, &iot__ota__v1__artifact__descriptor, (ProtobufCMessage **)&a);
    cm_rpc_status_t st = {0};
    int code = cm_stream_finish(s, &st);
    int rc = 0;
    if (got == 1 && code == CM_STATUS_OK) {
        snprintf(id_out, cap, "%s", a->id);
    } else if (code == CM_STATUS_ALREADY_EXISTS) {
        rc = code;
    } else {
        fprintf(stderr, "iot-sim: UploadArtifact %s %s at %s: %s %s\n", artifact_name, version, cfg.ota_addr, cm_status_name(code),
                st.message);
        rc = -1;
    }
    pbfree(a);
    cm_rpc_status_clear(&st);
    return rc;
}

static int rollout_action(const char *method, const char *id) {
    Iot__Ota__V1__RolloutActionRequest a = IOT__OTA__V1__ROLLOUT_ACTION_REQUEST__INIT;
    a.id = (char *)id;
    Iot__Ota__V1__Rollout *r = NULL;
    sim_rpc_t st;
    int code = setup_unary(ch_ota, cfg.ota_addr, method, &a, &iot__ota__v1__rollout__descriptor, &r, &st);
    pbfree(r);
    if (code && code != CM_STATUS_CANCELLED) fprintf(stderr, "iot-sim: %s %s at %s: %s %s\n", method, id, cfg.ota_addr, cm_status_name(code), st.msg);
    return code ? -1 : 0;
}

/* An unfinished rollout of one of our artifacts to our group is used as it is (a draft is
 * started; a paused one is left to the operator). Otherwise the next minor version is uploaded
 * and rolled out in four stages with a soak and the telemetry gate after each but the last. */
static int setup_rollout(void) {
    semver_t newest = {0, 0, 0};
    int have_newest = 0;
    for (int64_t k = 0; k < cfg.devices; k++) {
        semver_t v;
        if (semver_parse(existing_fw[k], &v) == 0 && (!have_newest || semver_cmp(&v, &newest) > 0)) newest = v, have_newest = 1;
    }
    char token[256] = "";
    for (;;) {
        Iot__Ota__V1__ListArtifactsRequest la = IOT__OTA__V1__LIST_ARTIFACTS_REQUEST__INIT;
        la.name = artifact_name;
        la.page_size = 100;
        la.page_token = token;
        Iot__Ota__V1__ListArtifactsResponse *arts = NULL;
        sim_rpc_t st;
        if (setup_unary(ch_ota, cfg.ota_addr, OTA "ListArtifacts", &la, &iot__ota__v1__list_artifacts_response__descriptor, &arts, &st)) {
            if (st.code != CM_STATUS_CANCELLED) fprintf(stderr, "iot-sim: ListArtifacts %s at %s: %s %s\n", artifact_name, cfg.ota_addr, cm_status_name(st.code), st.msg);
            return -1;
        }
        for (size_t i = 0; i < arts->n_artifacts; i++) {
            const Iot__Ota__V1__Artifact *a = arts->artifacts[i];
            semver_t v;
            if (semver_parse(a->version, &v) == 0 && (!have_newest || semver_cmp(&v, &newest) > 0)) newest = v, have_newest = 1;
            Iot__Ota__V1__ListRolloutsRequest lr = IOT__OTA__V1__LIST_ROLLOUTS_REQUEST__INIT;
            lr.artifact_id = a->id;
            lr.page_size = 100;
            Iot__Ota__V1__ListRolloutsResponse *ros = NULL;
            if (setup_unary(ch_ota, cfg.ota_addr, OTA "ListRollouts", &lr, &iot__ota__v1__list_rollouts_response__descriptor, &ros, &st)) {
                if (st.code != CM_STATUS_CANCELLED) fprintf(stderr, "iot-sim: ListRollouts of artifact %s at %s: %s %s\n", a->id, cfg.ota_addr, cm_status_name(st.code), st.msg);
                pbfree(arts);
                return -1;
            }
            for (size_t j = 0; j < ros->n_rollouts; j++) {
                const Iot__Ota__V1__Rollout *r = ros->rollouts[j];
                int unfinished = r->state == IOT__OTA__V1__ROLLOUT_STATE__ROLLOUT_STATE_DRAFT ||
                                 r->state == IOT__OTA__V1__ROLLOUT_STATE__ROLLOUT_STATE_RUNNING ||
                                 r->state == IOT__OTA__V1__ROLLOUT_STATE__ROLLOUT_STATE_PAUSED;
                if (!unfinished || !r->target || strcmp(r->target->group_id, group_id) != 0) continue;
                int rc = 0;
                if (r->state == IOT__OTA__V1__ROLLOUT_STATE__ROLLOUT_STATE_DRAFT) rc = rollout_action(OTA "StartRollout", r->id);
                if (!rc && r->state == IOT__OTA__V1__ROLLOUT_STATE__ROLLOUT_STATE_PAUSED)
                    printf("iot-sim: rollout: %s of %s %s is PAUSED (%s); left as it is: resume it on the dashboard\n", r->id,
                           artifact_name, a->version, r->pause_reason);
                else if (!rc)
                    printf("iot-sim: rollout: %s of %s %s to group %s, %s (from an earlier run)\n", r->id, artifact_name, a->version,
                           group_id, r->state == IOT__OTA__V1__ROLLOUT_STATE__ROLLOUT_STATE_DRAFT ? "started" : "RUNNING");
                pbfree(ros);
                pbfree(arts);
                return rc;
            }
            pbfree(ros);
        }
        snprintf(token, sizeof token, "%s", arts->next_page_token);
        pbfree(arts);
        if (!token[0]) break;
    }

    semver_t next = have_newest ? (semver_t){newest.a, newest.b + 1, 0} : (semver_t){1, 1, 0};
    char version[64], art_id[32] = "";
    for (int attempt = 0; attempt < 5 && !art_id[0]; attempt++) {
        snprintf(version, sizeof version, "%ld.%ld.%ld", next.a, next.b, next.c);
        int rc = upload_artifact(version, art_id, sizeof art_id);
        if (rc == CM_STATUS_ALREADY_EXISTS) {
            next.b++; /* taken (another sim's upload in between): the next one */
            continue;
        }
        if (rc) return -1;
    }
    if (!art_id[0]) {
        fprintf(stderr, "iot-sim: no free version for a new %s artifact\n", artifact_name);
        return -1;
    }
    static const double pct[] = {5, 25, 50, 100};
    Iot__Ota__V1__Stage st[4], *sp[4];
    for (int i = 0; i < 4; i++) {
        iot__ota__v1__stage__init(&st[i]);
        st[i].percent = pct[i];
        st[i].success_threshold = 0.9;
        st[i].error_threshold = 0.2;
        st[i].soak_ms = i < 3 ? cfg.soak_ms : 0;
        sp[i] = &st[i];
    }
    Iot__Ota__V1__RolloutTarget t = IOT__OTA__V1__ROLLOUT_TARGET__INIT;
    t.group_id = group_id;
    t.model = (char *)SIM_MODEL;
    Iot__Ota__V1__TelemetryGate gate = IOT__OTA__V1__TELEMETRY_GATE__INIT;
    gate.enabled = 1;
    gate.max_ratio = 2.0;
    gate.min_alerts = 3;
    gate.min_severity = IOT__PROCESSING__V1__SEVERITY__SEVERITY_HIGH;
    char name[256];
    snprintf(name, sizeof name, "%s %s to %s (iot-sim)", artifact_name, version, group_id);
    Iot__Ota__V1__Rollout r = IOT__OTA__V1__ROLLOUT__INIT;
    r.name = name;
    r.artifact_id = art_id;
    r.target = &t;
    r.n_stages = 4;
    r.stages = sp;
    r.gate = &gate;
    Iot__Ota__V1__CreateRolloutRequest req = IOT__OTA__V1__CREATE_ROLLOUT_REQUEST__INIT;
    req.rollout = &r;
    Iot__Ota__V1__Rollout *out = NULL;
    sim_rpc_t rs;
    if (setup_unary(ch_ota, cfg.ota_addr, OTA "CreateRollout", &req, &iot__ota__v1__rollout__descriptor, &out, &rs)) {
        if (rs.code != CM_STATUS_CANCELLED) fprintf(stderr, "iot-sim: CreateRollout of %s %s at %s: %s %s\n", artifact_name, version, cfg.ota_addr, cm_status_name(rs.code), rs.msg);
        return -1;
    }
    char rid[32];
    snprintf(rid, sizeof rid, "%s", out->id);
    pbfree(out);
    if (rollout_action(OTA "StartRollout", rid)) return -1;
    printf("iot-sim: rollout: %s of %s %s (artifact %s, %" PRId64 " bytes) to group %s started: stages 5%%, 25%%, 50%%, 100%%, "
           "soak %" PRId64 " ms with the telemetry gate\n",
           rid, artifact_name, version, art_id, cfg.artifact_size, group_id, cfg.soak_ms);
    return 0;
}

static int setup(void) {
    snprintf(group_id, sizeof group_id, "%s-fleet", cfg.prefix);
    snprintf(rule_id, sizeof rule_id, "%s-anomaly", cfg.prefix);
    snprintf(artifact_name, sizeof artifact_name, "%s-firmware", cfg.prefix);
    snprintf(label_sel, sizeof label_sel, "fleet=%s", cfg.prefix);
    /* A signal between steps stops setup there (the calls themselves notice it while they wait). */
    if (setup_devices() || (poll_signal(0), atomic_load(&stopping)) || setup_group() || setup_rule()) return -1;
    poll_signal(0);
    if (atomic_load(&stopping)) return -1;
    int code = keys_load();
    if (code) {
        fprintf(stderr, "iot-sim: ListSigningKeys at %s: %s\n", cfg.ota_addr, cm_status_name(code));
        return -1;
    }
    return setup_rollout();
}

/* ---- one device ------------------------------------------------------------------------------ */

enum { OTA_IDLE, OTA_START, OTA_DOWNLOAD, OTA_VERIFY, OTA_INSTALL, OTA_INSTALLING, OTA_SUCCESS, OTA_FAIL, OTA_ROLLBACK };

typedef struct sim_worker_s {
    pthread_t th;
    int index;
    sim_dev_t **devs;
    size_t n;
    uint64_t rng;
    Iot__Ingest__V1__Point *points, **pp; /* scratch for one batch */
} sim_worker_t;

static int64_t backoff_next(sim_worker_t *w, int64_t *cur, int64_t retry_after) {
    if (retry_after > 0) return retry_after;
    *cur = *cur ? (*cur < 30000 ? *cur * 2 : 30000) : 500;
    return jitter(&w->rng, *cur);
}

static void dev_init(sim_dev_t *d, int k, uint64_t *rng) {
    d->index = k;
    dev_id(k, d->id, sizeof d->id);
    snprintf(d->fw, sizeof d->fw, "%s", existing_fw[k] && *existing_fw[k] ? existing_fw[k] : SIM_FIRST_FW);
    /* A device's levels come from its id, not the run: processing keeps its windows across runs,
     * and a sensor that came back reading 3 degrees off would look like an anomaly. */
    uint64_t own = fnv1a(d->id);
    d->temp_base = 19.0 + rng_unit(&own) * 6.0;
    d->hum_base = 35.0 + rng_unit(&own) * 20.0;
    d->phase = rng_unit(&own) * 6.283185307179586;
    d->pending = cm_calloc(SIM_MAX_READINGS, sizeof *d->pending);
    d->ota_next_ms = mono_ms() + (int64_t)(rng_unit(rng) * (double)cfg.ota_check_ms);
}

static void dev_free(sim_dev_t *d) {
    if (d->tel) {
        cm_stream_cancel(d->tel);
        cm_stream_finish(d->tel, NULL);
    }
    if (d->watch) {
        cm_stream_cancel(d->watch);
        cm_stream_finish(d->watch, NULL);
    }
    cm_free(d->auth);
    cm_free(d->pending);
    EVP_MD_CTX_free(d->dl_sha);
    pbfree(d->offer);
}

static void issue_token(sim_worker_t *w, sim_dev_t *d, int64_t now) {
    Iot__Device__V1__IssueTokenRequest req = IOT__DEVICE__V1__ISSUE_TOKEN_REQUEST__INIT;
    req.device_id = d->id;
    req.ttl_seconds = SIM_TOKEN_TTL_S;
    Iot__Device__V1__IssueTokenResponse *r = NULL;
    sim_rpc_t st;
    if (sim_unary(ch_dm, DM "IssueToken", &req, &iot__device__v1__issue_token_response__descriptor, &r, NULL, SIM_CALL_MS, &st)) {
        if (transient(st.code)) atomic_fetch_add(&stats.retries, 1);
        else atomic_fetch_add(&stats.errors, 1);
        sim_warn(W_TOKEN, "%s: IssueToken at %s: %s %s", d->id, cfg.dm_addr, cm_status_name(st.code), st.msg);
        d->token_retry_ms = now + jitter(&w->rng, 2000);
        return;
    }
    size_t n = strlen(r->token) + 8;
    cm_free(d->auth);
    d->auth = cm_malloc(n);
    snprintf(d->auth, n, "Bearer %s", r->token);
    pbfree(r);
}

/* A refused token (expired, or the device was re-created): the next step takes a new one. */
static void token_refused(sim_dev_t *d, const char *what, const sim_rpc_t *st) {
    atomic_fetch_add(&stats.errors, 1);
    sim_warn(W_TOKEN, "%s: %s: token refused (%s); taking a new one", d->id, what, st->msg);
    cm_free(d->auth);
    d->auth = NULL;
}

static double round2(double x) { return round(x * 100.0) / 100.0; }

/* Temperature: the device's own level, a slow half-hour swing of 0.15 degrees and a bounded
 * sensor noise of +-0.4, plus the spike (8..15 degrees) while it misbehaves. Bounded noise keeps
 * ordinary readings from looking like anomalies: against processing's sliding window they score
 * at most about 0.87 once the window holds 60 points (measured over 6 million readings with
 * proc_window.c and proc_detect.c), under the rule's level of 0.9, while a spike scores 1.
 * Humidity likewise, without spikes. */
static void take_reading(sim_worker_t *w, sim_dev_t *d, int64_t wall) {
    if (d->n_pending == SIM_MAX_READINGS) { /* the oldest goes: a device has bounded memory */
        memmove(d->pending, d->pending + 1, (SIM_MAX_READINGS - 1) * sizeof *d->pending);
        d->n_pending--;
        atomic_fetch_add(&stats.dropped, 2);
    }
    double t = (double)wall / 1000.0;
    double temp = d->temp_base + 0.15 * sin(6.283185307179586 * t / 1800.0 + d->phase) + (rng_unit(&w->rng) - 0.5) * 0.8;
    int left = atomic_load(&d->spike_left);
    while (left > 0 && !atomic_compare_exchange_weak(&d->spike_left, &left, left - 1)) {
    }
    if (left > 0) {
        if (left == SIM_SPIKE_READINGS) d->spike = 8.0 + rng_unit(&w->rng) * 7.0;
        temp += d->spike;
    }
    double hum = d->hum_base + 1.0 * sin(6.283185307179586 * t / 3600.0 + d->phase) + (rng_unit(&w->rng) - 0.5) * 2.0;
    hum = hum < 0 ? 0 : hum > 100 ? 100 : hum;
    struct reading *r = &d->pending[d->n_pending++];
    r->seq = d->seq + 1;
    d->seq += 2;
    r->time_ms = wall;
    r->temp = round2(temp);
    r->hum = round2(hum);
    d->last_temp = r->temp;
    atomic_fetch_add(&d->readings, 1);
}

/* The status a stream ended with, as sim_rpc_t (with its retry-after-ms). Releases the stream. */
static void stream_end(cm_stream_t *st, sim_rpc_t *out) {
    cm_rpc_status_t rs = {0};
    out->code = cm_stream_finish(st, &rs);
    snprintf(out->msg, sizeof out->msg, "%s", rs.message);
    const char *ra = cm_rpc_status_md(&rs, "retry-after-ms");
    out->retry_after_ms = ra ? strtoll(ra, NULL, 10) : 0;
    if (out->retry_after_ms < 0 || out->retry_after_ms > 600000) out->retry_after_ms = 0;
    cm_rpc_status_clear(&rs);
}

/* Sends the readings not sent on this stream yet as one batch (their two points each). */
static void tel_send(sim_worker_t *w, sim_dev_t *d) {
    size_t n = 0;
    for (int i = 0; i < d->n_pending; i++) {
        const struct reading *r = &d->pending[i];
        if (r->seq <= d->sent) continue;
        for (int m = 0; m < 2; m++) {
            Iot__Ingest__V1__Point *p = &w->points[n];
            iot__ingest__v1__point__init(p);
            p->seq = r->seq + (uint64_t)m;
            p->metric = (char *)(m ? "humidity" : "temperature");
            p->time_ms = r->time_ms;
            p->value_case = IOT__INGEST__V1__POINT__VALUE_DOUBLE_VALUE;
            p->double_value = m ? r->hum : r->temp;
            w->pp[n] = p;
            n++;
        }
    }
    if (!n) return;
    Iot__Ingest__V1__StreamTelemetryRequest req = IOT__INGEST__V1__STREAM_TELEMETRY_REQUEST__INIT;
    req.n_points = n;
    req.points = w->pp;
    if (cm_stream_send(d->tel, &req.base) == 0) { /* else the stream ended: its status comes with the next read */
        d->sent = w->pp[n - 1]->seq;
        d->in_flight++;
    }
}

/* The stream ended: says why, and when to reconnect (honouring retry-after-ms). Readings keep
 * accumulating meanwhile; the next stream resends every one not acknowledged. */
static void tel_ended(sim_worker_t *w, sim_dev_t *d, int64_t now) {
    sim_rpc_t st;
    stream_end(d->tel, &st);
    d->tel = NULL;
    if (st.code == CM_STATUS_DEADLINE_EXCEEDED) { /* our own deadline: reconnect at once */
        d->tel_retry_ms = now;
        return;
    }
    if (st.code == CM_STATUS_UNAUTHENTICATED) {
        token_refused(d, "StreamTelemetry", &st);
        return;
    }
    if (transient(st.code) || st.code == CM_STATUS_OK) atomic_fetch_add(&stats.retries, 1);
    else atomic_fetch_add(&stats.errors, 1);
    int64_t wait = backoff_next(w, &d->tel_backoff_ms, st.retry_after_ms);
    d->tel_retry_ms = now + wait;
    if (st.code == CM_STATUS_INVALID_ARGUMENT) d->n_pending = 0; /* sending it again would not help */
    sim_warn(W_PUSH, "%s: StreamTelemetry at %s ended: %s %s; %d readings unacknowledged, reconnecting in %" PRId64 " ms", d->id,
             cfg.ingest_addr, cm_status_name(st.code), st.msg, d->n_pending, wait);
}

/* Telemetry over one StreamTelemetry per device: its first acknowledgement says where the
 * device's counter stands (the highest seq stored); each batch is acknowledged in order; after a
 * reconnect everything above the acknowledged seq is sent again (ingest drops duplicates). At most
 * 8 batches are in flight: a slow ingest makes readings pile up (bounded) rather than the
 * transport's buffers. */
static void telemetry_step(sim_worker_t *w, sim_dev_t *d, int64_t now) {
    if (!d->tel) {
        if (now < d->tel_retry_ms) goto reading;
        cm_md_t md = {"authorization", d->auth, 0};
        cm_call_opts_t o = {.timeout_ms = SIM_STREAM_MS, .md = &md, .n_md = 1};
        d->tel = cm_stream_open(ch_ing, ING "StreamTelemetry", &o);
        if (!d->tel) { /* only for illegal metadata, which a token never is */
            atomic_fetch_add(&stats.errors, 1);
            d->tel_retry_ms = now + 60000;
            return;
        }
        d->tel_ready = 0;
        d->in_flight = 0;
    }
    for (int i = 0; i < 64; i++) {
        Iot__Ingest__V1__TelemetryAck *ack = NULL;
        int rc = cm_stream_recv_wait(d->tel, &iot__ingest__v1__telemetry_ack__descriptor, 0, (ProtobufCMessage **)&ack);
        if (rc == CM_ETIMEOUT) break;
        if (rc != 1) {
            tel_ended(w, d, now);
            goto reading;
        }
        if (!d->tel_ready) {
            d->tel_ready = 1;
            if (!d->seq_known || ack->acked_seq > d->seq) d->seq = ack->acked_seq;
            d->seq_known = 1;
            d->sent = ack->acked_seq; /* what this stream must carry: everything after it */
        } else {
            d->in_flight--;
            d->tel_backoff_ms = 0;
            atomic_fetch_add(&stats.points, ack->stored);
            atomic_fetch_add(&stats.batches, 1);
        }
        int keep = 0;
        for (int k = 0; k < d->n_pending; k++)
            if (d->pending[k].seq + 1 > ack->acked_seq) d->pending[keep++] = d->pending[k];
        d->n_pending = keep;
        pbfree(ack);
    }
reading:
    if (!d->seq_known) return;
    if (now >= d->next_reading_ms) {
        int rebooting = d->ota == OTA_INSTALLING || now < d->paused_until_ms;
        if (!rebooting) take_reading(w, d, cm_wall_ms());
        d->next_reading_ms += cfg.interval_ms;
        if (d->next_reading_ms < now) d->next_reading_ms = now + cfg.interval_ms; /* fell behind: skip, do not burst */
    }
    if (d->tel && d->tel_ready && d->in_flight < 8) tel_send(w, d);
}

/* ---- commands ---- */

static void ack_command(sim_worker_t *w, sim_dev_t *d, const Iot__Device__V1__Command *c, int64_t now) {
    atomic_fetch_add(&stats.cmds_received, 1);
    json_t *result = NULL;
    const char *error = NULL;
    char err[160];
    if (strcmp(c->name, "throttle") == 0) {
        atomic_store(&d->spike_left, 0); /* it cools down */
        result = json_pack("{s:s, s:f}", "action", "throttled", "temperature", d->last_temp);
    } else if (strcmp(c->name, "reboot") == 0) {
        d->paused_until_ms = now + 5000;
        result = json_pack("{s:s}", "action", "rebooting");
    } else if (strcmp(c->name, "ping") == 0) {
        result = json_pack("{s:b, s:s}", "pong", 1, "firmware", d->fw);
    } else if (strcmp(c->name, "identify") == 0) {
        result = json_pack("{s:s}", "action", "led blinking for 10 s");
    } else {
        snprintf(err, sizeof err, "command \"%.64s\" is not supported (iot-sim devices know throttle, reboot, ping, identify)", c->name);
        error = err;
    }
    Google__Protobuf__Struct *rs = NULL;
    if (result && cm_json_to_struct(result, NULL, &rs)) rs = NULL;
    json_decref(result);
    Iot__Device__V1__AckCommandRequest req = IOT__DEVICE__V1__ACK_COMMAND_REQUEST__INIT;
    req.device_id = d->id;
    req.command_id = c->id;
    req.success = error == NULL;
    req.result = rs;
    req.error = (char *)(error ? error : "");
    Iot__Device__V1__Command *out = NULL;
    sim_rpc_t st;
    int code = sim_unary(ch_dm, DM "AckCommand", &req, &iot__device__v1__command__descriptor, &out, d->auth, SIM_CALL_MS, &st);
    pbfree(out);
    if (rs) protobuf_c_message_free_unpacked(&rs->base, NULL);
    if (code == CM_STATUS_OK) {
        atomic_fetch_add(&stats.cmds_acked, 1);
        return;
    }
    if (code == CM_STATUS_UNAUTHENTICATED) token_refused(d, "AckCommand", &st);
    else if (transient(code)) atomic_fetch_add(&stats.retries, 1);
    else atomic_fetch_add(&stats.errors, 1);
    sim_warn(W_ACK, "%s: AckCommand %s (%s) at %s: %s %s", d->id, c->id, c->name, cfg.dm_addr, cm_status_name(code), st.msg);
    if (transient(code) || code == CM_STATUS_UNAUTHENTICATED) {
        /* Unacknowledged commands come again on a new stream: reconnect rather than keep state. */
        cm_stream_cancel(d->watch);
        cm_stream_finish(d->watch, NULL);
        d->watch = NULL;
        d->watch_retry_ms = now + backoff_next(w, &d->watch_backoff_ms, st.retry_after_ms);
    }
}

static void commands_step(sim_worker_t *w, sim_dev_t *d, int64_t now) {
    if (!d->watch) {
        if (now < d->watch_retry_ms) return;
        cm_md_t md = {"authorization", d->auth, 0};
        cm_call_opts_t o = {.timeout_ms = SIM_STREAM_MS, .md = &md, .n_md = 1};
        d->watch = cm_stream_open(ch_dm, DM "WatchCommands", &o);
        if (!d->watch) { /* only for illegal metadata, which a token never is */
            atomic_fetch_add(&stats.errors, 1);
            d->watch_retry_ms = now + 60000;
            return;
        }
        Iot__Device__V1__WatchCommandsRequest req = IOT__DEVICE__V1__WATCH_COMMANDS_REQUEST__INIT;
        req.device_id = d->id;
        cm_stream_send(d->watch, &req.base); /* a refusal shows as the stream's status below */
        cm_stream_close_send(d->watch);
    }
    for (int i = 0; i < 16 && d->watch; i++) {
        Iot__Device__V1__Command *c = NULL;
        int rc = cm_stream_recv_wait(d->watch, &iot__device__v1__command__descriptor, 0, (ProtobufCMessage **)&c);
        if (rc == CM_ETIMEOUT) return;
        if (rc == 1) {
            d->watch_backoff_ms = 0;
            ack_command(w, d, c, now);
            pbfree(c);
            continue;
        }
        cm_rpc_status_t st = {0};
        int code = cm_stream_finish(d->watch, &st);
        d->watch = NULL;
        sim_rpc_t s = {.code = code};
        snprintf(s.msg, sizeof s.msg, "%s", st.message);
        const char *ra = cm_rpc_status_md(&st, "retry-after-ms");
        s.retry_after_ms = ra ? strtoll(ra, NULL, 10) : 0;
        cm_rpc_status_clear(&st);
        if (code == CM_STATUS_DEADLINE_EXCEEDED) { /* our own deadline: reopen at once */
            d->watch_retry_ms = now;
        } else if (code == CM_STATUS_UNAUTHENTICATED) {
            token_refused(d, "WatchCommands", &s);
        } else {
            if (transient(code)) atomic_fetch_add(&stats.retries, 1);
            else atomic_fetch_add(&stats.errors, 1);
            int64_t wait = backoff_next(w, &d->watch_backoff_ms, s.retry_after_ms);
            d->watch_retry_ms = now + wait;
            sim_warn(W_WATCH, "%s: WatchCommands at %s ended: %s %s; reconnecting in %" PRId64 " ms", d->id, cfg.dm_addr,
                     cm_status_name(code), s.msg, wait);
        }
    }
}

/* ---- firmware updates ---- */

static void ota_idle(sim_worker_t *w, sim_dev_t *d, int64_t now) {
    if (d->ota != OTA_IDLE) {
        d->ota = OTA_IDLE;
        atomic_fetch_sub(&stats.updates_active, 1);
        atomic_store(&d->busy, 0);
    }
    pbfree(d->offer);
    d->offer = NULL;
    EVP_MD_CTX_free(d->dl_sha);
    d->dl_sha = NULL;
    d->ota_backoff_ms = 0;
    d->ota_next_ms = now + jitter(&w->rng, cfg.ota_check_ms);
}

/* Reports a phase; 0 when recorded, 1 to retry later (transient, or a new token first), -2 when
 * the server's record is past this phase (FAILED_PRECONDITION: a device that restarted mid-update
 * reports again from where it was), -1 when the update cannot go on (NOT_FOUND: no longer in the
 * rollout, or another refusal). */
static int ota_report(sim_worker_t *w, sim_dev_t *d, int phase, int progress, const char *error, int64_t now) {
    Iot__Ota__V1__ReportStatusRequest req = IOT__OTA__V1__REPORT_STATUS_REQUEST__INIT;
    req.rollout_id = d->rollout;
    req.phase = phase;
    req.progress = progress;
    req.error = (char *)(error ? error : "");
    Iot__Ota__V1__DeviceUpdate *u = NULL;
    sim_rpc_t st;
    int code = sim_unary(ch_ota, OTA "ReportStatus", &req, &iot__ota__v1__device_update__descriptor, &u, d->auth, SIM_CALL_MS, &st);
    pbfree(u);
    if (code == CM_STATUS_OK) return 0;
    if (code == CM_STATUS_UNAUTHENTICATED) {
        token_refused(d, "ReportStatus", &st);
        return 1;
    }
    if (transient(code)) {
        atomic_fetch_add(&stats.retries, 1);
        d->ota_next_ms = now + backoff_next(w, &d->ota_backoff_ms, st.retry_after_ms);
        sim_warn(W_OTA, "%s: ReportStatus %d for rollout %s at %s: %s %s; reporting again", d->id, phase, d->rollout, cfg.ota_addr,
                 cm_status_name(code), st.msg);
        return 1;
    }
    if (code == CM_STATUS_FAILED_PRECONDITION) return -2;
    atomic_fetch_add(&stats.errors, 1);
    sim_warn(W_OTA, "%s: ReportStatus %d for rollout %s at %s: %s %s; giving the update up", d->id, phase, d->rollout, cfg.ota_addr,
             cm_status_name(code), st.msg);
    return -1;
}

static void ota_check(sim_worker_t *w, sim_dev_t *d, int64_t now) {
    Iot__Ota__V1__CheckForUpdateRequest req = IOT__OTA__V1__CHECK_FOR_UPDATE_REQUEST__INIT;
    req.current_version = d->fw;
    req.model = (char *)SIM_MODEL;
    Iot__Ota__V1__CheckForUpdateResponse *r = NULL;
    sim_rpc_t st;
    int code = sim_unary(ch_ota, OTA "CheckForUpdate", &req, &iot__ota__v1__check_for_update_response__descriptor, &r, d->auth,
                         SIM_CALL_MS, &st);
    if (code) {
        if (code == CM_STATUS_UNAUTHENTICATED) {
            token_refused(d, "CheckForUpdate", &st);
        } else {
            if (transient(code)) atomic_fetch_add(&stats.retries, 1);
            else atomic_fetch_add(&stats.errors, 1);
            sim_warn(W_OTA, "%s: CheckForUpdate at %s: %s %s", d->id, cfg.ota_addr, cm_status_name(code), st.msg);
        }
        d->ota_next_ms = now + backoff_next(w, &d->ota_backoff_ms, st.retry_after_ms);
        return;
    }
    d->ota_backoff_ms = 0;
    if (!r->offer || !r->offer->artifact || strcmp(r->offer->artifact->version, d->fw) == 0) {
        pbfree(r);
        d->ota_next_ms = now + jitter(&w->rng, cfg.ota_check_ms);
        return;
    }
    snprintf(d->rollout, sizeof d->rollout, "%s", r->offer->rollout_id);
    snprintf(d->target, sizeof d->target, "%s", r->offer->artifact->version);
    snprintf(d->artifact_id, sizeof d->artifact_id, "%s", r->offer->artifact->id);
    d->offer = r->offer->artifact;
    r->offer->artifact = NULL;
    pbfree(r);
    d->ota = OTA_START;
    d->quiet = 0;
    d->dl_offset = 0;
    d->rolled_back = 0;
    atomic_fetch_add(&stats.updates_active, 1);
    atomic_fetch_add(&stats.updates_started, 1);
}

/* Downloads from dl_offset to the end (a failed download resumes where it stopped), hashing as
 * the data comes. 0 when complete, 1 to resume later, -1 when the update cannot go on. */
static int ota_download(sim_worker_t *w, sim_dev_t *d, int64_t now) {
    if (!d->dl_sha) {
        d->dl_sha = EVP_MD_CTX_new();
        EVP_DigestInit_ex(d->dl_sha, EVP_sha256(), NULL);
        d->dl_offset = 0;
    }
    cm_md_t md = {"authorization", d->auth, 0};
    cm_call_opts_t o = {.timeout_ms = 60000, .md = &md, .n_md = 1};
    cm_stream_t *s = cm_stream_open(ch_ota, OTA "DownloadArtifact", &o);
    Iot__Ota__V1__DownloadArtifactRequest req = IOT__OTA__V1__DOWNLOAD_ARTIFACT_REQUEST__INIT;
    req.artifact_id = d->artifact_id;
    req.offset = d->dl_offset;
    cm_stream_send(s, &req.base);
    cm_stream_close_send(s);
    Iot__Ota__V1__DownloadArtifactResponse *m = NULL;
    int bad = 0;
    while (!bad && !atomic_load(&stopping) &&
           cm_stream_recv(s, &iot__ota__v1__download_artifact_response__descriptor, (ProtobufCMessage **)&m) == 1) {
        if (m->offset != d->dl_offset) {
            snprintf(d->fail_why, sizeof d->fail_why, "download: data at offset %" PRId64 ", expected %" PRId64, m->offset, d->dl_offset);
            bad = 1;
        } else {
            EVP_DigestUpdate(d->dl_sha, m->data.data, m->data.len);
            d->dl_offset += (int64_t)m->data.len;
        }
        pbfree(m);
        m = NULL;
    }
    if (bad || atomic_load(&stopping)) cm_stream_cancel(s);
    cm_rpc_status_t st = {0};
    int code = cm_stream_finish(s, &st);
    sim_rpc_t rs = {.code = code};
    snprintf(rs.msg, sizeof rs.msg, "%s", st.message);
    cm_rpc_status_clear(&st);
    if (bad) return -1;
    if (code == CM_STATUS_OK) {
        if (d->dl_offset == d->offer->size) return 0;
        snprintf(d->fail_why, sizeof d->fail_why, "download ended at byte %" PRId64 " of %" PRId64, d->dl_offset, d->offer->size);
        return -1;
    }
    if (atomic_load(&stopping)) return 1;
    if (code == CM_STATUS_UNAUTHENTICATED) {
        token_refused(d, "DownloadArtifact", &rs);
        return 1;
    }
    if (transient(code) || code == CM_STATUS_CANCELLED) {
        atomic_fetch_add(&stats.retries, 1);
        d->ota_next_ms = now + backoff_next(w, &d->ota_backoff_ms, 0);
        sim_warn(W_OTA, "%s: DownloadArtifact %s at %s stopped at byte %" PRId64 ": %s %s; resuming", d->id, d->artifact_id, cfg.ota_addr,
                 d->dl_offset, cm_status_name(code), rs.msg);
        return 1;
    }
    snprintf(d->fail_why, sizeof d->fail_why, "download of artifact %s: %s %.160s", d->artifact_id, cm_status_name(code), rs.msg);
    return -1;
}

static void ota_step(sim_worker_t *w, sim_dev_t *d, int64_t now) {
    if (now < d->ota_next_ms) return;
    int rc;
    switch (d->ota) {
    case OTA_IDLE: ota_check(w, d, now); break;
    case OTA_START:
        rc = ota_report(w, d, IOT__OTA__V1__UPDATE_PHASE__UPDATE_PHASE_DOWNLOADING, 0, NULL, now);
        if (rc == -1) {
            ota_idle(w, d, now);
            break;
        }
        if (rc == -2) d->quiet = 1; /* restarted mid-update: the server is past downloading; fetch the image again quietly */
        if (rc <= 0) d->ota = OTA_DOWNLOAD;
        break;
    case OTA_DOWNLOAD:
        rc = ota_download(w, d, now);
        if (rc == 0) {
            if (!d->quiet) ota_report(w, d, IOT__OTA__V1__UPDATE_PHASE__UPDATE_PHASE_DOWNLOADING, 100, NULL, now);
            d->ota = OTA_VERIFY;
        } else if (rc < 0) {
            d->ota = OTA_FAIL;
        }
        break;
    case OTA_VERIFY: {
        if (!d->quiet) {
            rc = ota_report(w, d, IOT__OTA__V1__UPDATE_PHASE__UPDATE_PHASE_VERIFYING, 0, NULL, now);
            if (rc > 0) break;
            if (rc == -1) {
                ota_idle(w, d, now);
                break;
            }
            if (rc == -2) d->quiet = 1;
        }
        uint8_t dg[32];
        char hex[65];
        EVP_DigestFinal_ex(d->dl_sha, dg, NULL);
        EVP_MD_CTX_free(d->dl_sha);
        d->dl_sha = NULL;
        hex32(dg, hex);
        if (verify_download(d->offer, hex, d->dl_offset, d->fail_why, sizeof d->fail_why)) {
            atomic_fetch_add(&stats.errors, 1);
            sim_warn(W_VERIFY, "%s: artifact %s (%s) fails verification: %s", d->id, d->artifact_id, d->target, d->fail_why);
            d->ota = OTA_FAIL;
            break;
        }
        d->ota = OTA_INSTALL;
        break;
    }
    case OTA_INSTALL:
        rc = ota_report(w, d, IOT__OTA__V1__UPDATE_PHASE__UPDATE_PHASE_INSTALLING, 0, NULL, now);
        if (rc > 0) break;
        if (rc < 0) {
            ota_idle(w, d, now);
            break;
        }
        d->ota = OTA_INSTALLING;
        atomic_store(&d->busy, 1);
        d->install_until_ms = now + jitter(&w->rng, cfg.install_ms);
        break;
    case OTA_INSTALLING:
        if (now < d->install_until_ms) break;
        atomic_store(&d->busy, 0);
        if (rng_unit(&w->rng) < cfg.ota_fail_rate) {
            snprintf(d->fail_why, sizeof d->fail_why, "install of %s failed: flash write error at block %d (simulated); running %s again",
                     d->target, (int)(rng_next(&w->rng) % 4096), d->fw);
            d->rolled_back = 1;
            d->ota = OTA_FAIL;
        } else {
            d->ota = OTA_SUCCESS;
        }
        break;
    case OTA_SUCCESS:
        /* ota writes the new version to device-mgmt before it records SUCCEEDED; the device
         * then runs it and says so in its next CheckForUpdate. */
        rc = ota_report(w, d, IOT__OTA__V1__UPDATE_PHASE__UPDATE_PHASE_SUCCEEDED, 100, NULL, now);
        if (rc > 0) break;
        if (rc == 0 || rc == -2) { /* -2: recorded already (our earlier report's answer was lost) */
            snprintf(d->fw, sizeof d->fw, "%s", d->target);
            atomic_fetch_add(&stats.updates_done, 1);
        }
        ota_idle(w, d, now);
        break;
    case OTA_FAIL:
        rc = ota_report(w, d, IOT__OTA__V1__UPDATE_PHASE__UPDATE_PHASE_FAILED, 0, d->fail_why, now);
        if (rc > 0) break;
        if (rc == 0 && d->rolled_back) {
            d->ota = OTA_ROLLBACK;
            break;
        }
        if (rc == 0) atomic_fetch_add(&stats.updates_failed, 1);
        ota_idle(w, d, now);
        break;
    case OTA_ROLLBACK:
        rc = ota_report(w, d, IOT__OTA__V1__UPDATE_PHASE__UPDATE_PHASE_ROLLED_BACK, 0, d->fail_why, now);
        if (rc > 0) break;
        atomic_fetch_add(&stats.updates_failed, 1);
        ota_idle(w, d, now);
        break;
    }
}

static void *worker_main(void *arg) {
    sim_worker_t *w = arg;
    w->points = cm_calloc(2 * SIM_MAX_READINGS, sizeof *w->points);
    w->pp = cm_calloc(2 * SIM_MAX_READINGS, sizeof *w->pp);
    while (!atomic_load(&stopping)) {
        int64_t start = mono_ms();
        for (size_t i = 0; i < w->n && !atomic_load(&stopping); i++) {
            sim_dev_t *d = w->devs[i];
            int64_t now = mono_ms();
            if (!d->auth) {
                if (now < d->token_retry_ms) continue;
                issue_token(w, d, now);
                if (!d->auth) continue;
            }
            telemetry_step(w, d, now);
            if (d->auth) commands_step(w, d, now);
            if (d->auth) ota_step(w, d, now);
        }
        int64_t spent = mono_ms() - start;
        if (spent < SIM_TICK_MS) sleep_ms(SIM_TICK_MS - spent);
    }
    cm_free(w->points);
    cm_free(w->pp);
    return NULL;
}

/* ---- main ------------------------------------------------------------------------------------ */

/* Starts an anomaly on a random device that has enough readings for the detector's window (and is
 * not in the middle of an install); 1 when one was started. */
static int start_anomaly(uint64_t *rng) {
    for (int tries = 0; tries < 20; tries++) {
        sim_dev_t *d = &devs[rng_next(rng) % (uint64_t)cfg.devices];
        if (atomic_load(&d->readings) < cfg.min_samples + 5 || atomic_load(&d->busy)) continue;
        int zero = 0;
        if (atomic_compare_exchange_strong(&d->spike_left, &zero, SIM_SPIKE_READINGS)) {
            atomic_fetch_add(&stats.anomalies, 1);
            return 1;
        }
    }
    return 0;
}

/* Milliseconds to the next anomaly: exponentially distributed with mean 60000 / rate. */
static int64_t next_gap(uint64_t *rng) {
    double u = rng_unit(rng);
    return (int64_t)(-log(u > 1e-12 ? u : 1e-12) * 60000.0 / cfg.anomaly_rate) + 1;
}

static void summary(const char *head, int64_t elapsed_ms, long long *last_points, int64_t *last_ms) {
    long long pts = atomic_load(&stats.points);
    double rate = elapsed_ms > *last_ms ? (double)(pts - *last_points) * 1000.0 / (double)(elapsed_ms - *last_ms) : 0;
    *last_points = pts;
    *last_ms = elapsed_ms;
    printf("iot-sim: %s %" PRId64 "s: %" PRId64 " devices, points sent %lld (%.0f/s), anomalies %lld, commands acked %lld/%lld, "
           "updates done %lld (failed %lld, in progress %lld), errors %lld, retries %lld\n",
           head, elapsed_ms / 1000, cfg.devices, pts, rate, (long long)atomic_load(&stats.anomalies),
           (long long)atomic_load(&stats.cmds_acked), (long long)atomic_load(&stats.cmds_received),
           (long long)atomic_load(&stats.updates_done), (long long)atomic_load(&stats.updates_failed),
           (long long)atomic_load(&stats.updates_active), (long long)atomic_load(&stats.errors), (long long)atomic_load(&stats.retries));
    fflush(stdout);
}

int main(int argc, char **argv) {
    int rc = parse_options(argc, argv);
    if (rc) return rc == 1 ? 0 : 2;
    const char *lvl = getenv("IOT_LOG_LEVEL");
    int level = lvl && *lvl ? cm_log_level_parse(lvl) : CM_LOG_WARN;
    cm_log_init("iot-sim", level < 0 ? CM_LOG_WARN : (cm_log_level_t)level);
    /* Every thread inherits the blocked set; the main thread takes SIGINT/SIGTERM with sigtimedwait. */
    cm_signals_block();
    setvbuf(stdout, NULL, _IOLBF, 0);
    uint64_t rng = cfg.seed ? (uint64_t)cfg.seed : (uint64_t)cm_wall_ms() ^ ((uint64_t)getpid() << 32);
    rng = rng ? rng : 1;

    ch_dm = cm_channel_new(cfg.dm_addr, NULL, NULL);
    ch_ing = cm_channel_new(cfg.ingest_addr, NULL, NULL);
    ch_proc = cm_channel_new(cfg.proc_addr, NULL, NULL);
    cm_channel_opts_t oo = {.max_recv_bytes = 8 << 20};
    ch_ota = cm_channel_new(cfg.ota_addr, &oo, NULL);
    printf("iot-sim: %" PRId64 " devices against device-mgmt %s, ingest %s, processing %s, ota %s\n", cfg.devices, cfg.dm_addr,
           cfg.ingest_addr, cfg.proc_addr, cfg.ota_addr);

    int64_t t0 = mono_ms();
    int failed = setup() != 0;
    int exit_code = failed && !atomic_load(&stopping) ? 1 : 0;
    sim_worker_t *workers = NULL;
    int n_workers = 0;
    if (!failed && !atomic_load(&stopping)) {
        printf("iot-sim: setup done in %.1f s; devices start now (telemetry every %" PRId64 " ms, %.3g anomalies/min, update checks "
               "every %" PRId64 " ms)\n",
               (double)(mono_ms() - t0) / 1000.0, cfg.interval_ms, cfg.anomaly_rate, cfg.ota_check_ms);
        devs = cm_calloc((size_t)cfg.devices, sizeof *devs);
        for (int64_t k = 0; k < cfg.devices; k++) dev_init(&devs[k], (int)k, &rng);
        n_workers = (int)(cfg.threads < cfg.devices ? cfg.threads : cfg.devices);
        workers = cm_calloc((size_t)n_workers, sizeof *workers);
        for (int i = 0; i < n_workers; i++) {
            sim_worker_t *w = &workers[i];
            w->index = i;
            w->rng = rng_next(&rng) | 1;
            w->devs = cm_calloc((size_t)(cfg.devices / n_workers + 1), sizeof *w->devs);
            for (int64_t k = i; k < cfg.devices; k += n_workers) w->devs[w->n++] = &devs[k];
        }
        for (int i = 0; i < n_workers; i++) pthread_create(&workers[i].th, NULL, worker_main, &workers[i]);

        int64_t start = mono_ms(), last_summary = start, last_ms = 0;
        long long last_points = 0;
        /* Anomalies arrive as a Poisson process of --anomaly-rate per minute, the first as soon as
         * devices are warm (so that a demo shows an alert early); one that finds no warm device is
         * tried again a second later. */
        int64_t next_anomaly = cfg.anomaly_rate > 0 ? start : INT64_MAX;
        while (!atomic_load(&stopping)) {
            poll_signal(200);
            int64_t now = mono_ms();
            if (cfg.duration_ms && now - start >= cfg.duration_ms) break;
            if (now >= next_anomaly) next_anomaly = start_anomaly(&rng) ? now + next_gap(&rng) : now + 1000;
            if (now - last_summary >= cfg.summary_ms) {
                last_summary = now;
                summary("at", now - start, &last_points, &last_ms);
            }
        }
        atomic_store(&stopping, 1);
        for (int i = 0; i < n_workers; i++) pthread_join(workers[i].th, NULL);
        long long none = 0;
        int64_t zero = 0;
        summary("stopped after", mono_ms() - start, &none, &zero); /* the rate over the whole run */
    } else if (atomic_load(&stopping)) {
        printf("iot-sim: stopped during setup\n");
    } else {
        fprintf(stderr, "iot-sim: setup did not complete; nothing was simulated\n");
    }

    for (int64_t k = 0; devs && k < cfg.devices; k++) dev_free(&devs[k]);
    for (int i = 0; i < n_workers; i++) cm_free(workers[i].devs);
    cm_free(workers);
    cm_free(devs);
    for (int64_t k = 0; existing_fw && k < cfg.devices; k++) cm_free(existing_fw[k]);
    cm_free(existing_fw);
    cm_free(keys);
    cm_channel_free(ch_dm);
    cm_channel_free(ch_ing);
    cm_channel_free(ch_proc);
    cm_channel_free(ch_ota);
    return exit_code;
}
