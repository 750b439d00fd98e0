/* Per-device state of ingest (see ing_devices.h): token cache, rate budget, presence. */
#include "ing_devices.h"

#include <pthread.h>
#include <stdio.h>
#include <string.h>
#include <strings.h>

#include "cm_alloc.h"
#include "cm_log.h"
#include "cm_loop.h"
#include "cm_map.h"
#include "cm_metrics.h"
#include "cm_rpc.h"
#include "cm_time.h"
#include "google/protobuf/timestamp.pb-c.h"
#include "ing_batch.h"
#include "iot/device/v1/device.pb-c.h"

#define ING__STRIPES 16
/* Cached tokens at most, over all stripes: a flood of distinct bad or one-off tokens must not grow
 * memory without bound (negative answers are never cached anyway). */
#define ING__MAX_TOKENS 262144
/* Device state untouched this long (and fully reported) is forgotten. */
#define ING__IDLE_MS (10 * 60 * 1000)
#define ING__MAX_SIGHTINGS 10000

typedef struct ing__tok_s {
    char device_id[ING_MAX_DEVICE_ID + 1];
    int64_t expires_ms; /* monotonic */
} ing__tok_t;

typedef struct ing__dev_s {
    double allowance;
    int64_t refill_ms;   /* monotonic */
    int64_t seen_ms;     /* wall clock, newest sighting */
    int64_t reported_ms; /* the seen_ms device-mgmt has */
    int64_t touched_ms;  /* monotonic */
} ing__dev_t;

typedef struct ing__stripe_s {
    pthread_mutex_t mu;
    cm_map_t *tokens;
    cm_map_t *devs;
} ing__stripe_t;

struct ing_devices_s {
    const ing_config_t *cfg;
    cm_channel_t *dm;
    ing__stripe_t stripes[ING__STRIPES];
    cm_loop_t *presence;
    pthread_mutex_t report_mu; /* one report at a time (loop and shutdown) */
    cm_counter_t *auth_hits, *auth_misses, *auth_rejects, *limited, *reported;
};

static int64_t ing__mono_ms(void) { return cm_mono_ns() / 1000000; }

static ing__stripe_t *ing__stripe(ing_devices_t *d, const char *key, size_t n) {
    return &d->stripes[cm_hash64(key, n) % ING__STRIPES];
}

static int64_t ing__presence_loop(void *arg) {
    ing_devices_t *d = arg;
    ing_devices_report(d);
    return d->cfg->presence_ms;
}

ing_devices_t *ing_devices_new(const ing_config_t *cfg) {
    int err = 0;
    cm_channel_t *ch = cm_channel_new(cfg->dm_addr, NULL, &err);
    if (!ch) return NULL;
    ing_devices_t *d = cm_calloc(1, sizeof *d);
    d->cfg = cfg;
    d->dm = ch;
    for (int i = 0; i < ING__STRIPES; i++) {
        pthread_mutex_init(&d->stripes[i].mu, NULL);
        d->stripes[i].tokens = cm_map_new();
        d->stripes[i].devs = cm_map_new();
    }
    pthread_mutex_init(&d->report_mu, NULL);
    d->auth_hits = cm_metrics_counter("ingest_auth_cache_hits_total", "token checks answered from the in-process cache", NULL);
    d->auth_misses = cm_metrics_counter("ingest_auth_cache_misses_total", "token checks sent to device-mgmt", NULL);
    d->auth_rejects = cm_metrics_counter("ingest_auth_rejected_total", "calls refused for a missing, unknown or revoked token", NULL);
    d->limited = cm_metrics_counter("ingest_rate_limited_total", "batches refused by the per-device rate limit", NULL);
    d->reported = cm_metrics_counter("ingest_presence_reported_total", "last-seen times reported to device-mgmt", NULL);
    d->presence = cm_loop_start(ing__presence_loop, d, cfg->presence_ms);
    return d;
}

void ing_devices_free(ing_devices_t *d) {
    if (!d) return;
    cm_loop_stop(d->presence);
    ing_devices_report(d); /* what the last batches said */
    for (int i = 0; i < ING__STRIPES; i++) {
        cm_map_free(d->stripes[i].tokens, cm_free);
        cm_map_free(d->stripes[i].devs, cm_free);
        pthread_mutex_destroy(&d->stripes[i].mu);
    }
    pthread_mutex_destroy(&d->report_mu);
    cm_channel_free(d->dm);
    cm_free(d);
}

int ing_devices_auth(ing_devices_t *d, const char *authorization, int64_t deadline_ms, char *device_id, char *msg,
                     size_t msg_cap) {
    const char *tok = authorization;
    if (!tok || strncasecmp(tok, "Bearer ", 7) != 0 || !tok[7]) {
        cm_counter_add(d->auth_rejects, 1);
        snprintf(msg, msg_cap, "missing device credentials: send metadata \"authorization: Bearer <device token>\"");
        return CM_STATUS_UNAUTHENTICATED;
    }
    tok += 7;
    while (*tok == ' ') tok++;
    size_t tlen = strlen(tok);
    if (tlen == 0 || tlen > 512) {
        cm_counter_add(d->auth_rejects, 1);
        snprintf(msg, msg_cap, "malformed device token");
        return CM_STATUS_UNAUTHENTICATED;
    }
    ing__stripe_t *st = ing__stripe(d, tok, tlen);
    int64_t now = ing__mono_ms();
    pthread_mutex_lock(&st->mu);
    ing__tok_t *e = cm_map_get(st->tokens, tok, tlen);
    if (e && e->expires_ms > now) {
        memcpy(device_id, e->device_id, sizeof e->device_id);
        pthread_mutex_unlock(&st->mu);
        cm_counter_add(d->auth_hits, 1);
        return CM_STATUS_OK;
    }
    pthread_mutex_unlock(&st->mu);
    cm_counter_add(d->auth_misses, 1);

    Iot__Device__V1__AuthenticateDeviceRequest req = IOT__DEVICE__V1__AUTHENTICATE_DEVICE_REQUEST__INIT;
    req.token = (char *)tok;
    Iot__Device__V1__AuthenticateDeviceResponse *resp = NULL;
    cm_rpc_status_t rs = {0};
    int64_t timeout = deadline_ms < 0 || deadline_ms > 5000 ? 5000 : deadline_ms;
    cm_call_opts_t o = {.timeout_ms = timeout > 0 ? timeout : 1, .idempotent = 1};
    int code = cm_channel_unary(d->dm, "/iot.device.v1.DeviceManager/AuthenticateDevice", &req.base,
                                &iot__device__v1__authenticate_device_response__descriptor, (ProtobufCMessage **)&resp,
                                &o, &rs);
    if (code == CM_STATUS_OK) {
        snprintf(device_id, ING_MAX_DEVICE_ID + 1, "%s", resp->device_id);
        protobuf_c_message_free_unpacked(&resp->base, NULL);
    } else if (code == CM_STATUS_UNAUTHENTICATED || code == CM_STATUS_INVALID_ARGUMENT || code == CM_STATUS_NOT_FOUND ||
               code == CM_STATUS_PERMISSION_DENIED) {
        cm_counter_add(d->auth_rejects, 1);
        snprintf(msg, msg_cap, "device token refused: %s", rs.message);
        code = CM_STATUS_UNAUTHENTICATED;
    } else {
        snprintf(msg, msg_cap, "cannot check the device token now: device-mgmt answered %s (%s); retry later",
                 cm_status_name(code), rs.message);
        code = CM_STATUS_UNAVAILABLE;
    }
    cm_rpc_status_clear(&rs);
    if (code != CM_STATUS_OK || d->cfg->auth_cache_ms <= 0) return code;

    pthread_mutex_lock(&st->mu);
    if (cm_map_len(st->tokens) >= ING__MAX_TOKENS / ING__STRIPES) {
        /* Full: forget expired entries first; if it is still full, skip caching this one. */
        size_t it = 0;
        const void *k;
        size_t kl;
        void *v;
        while (cm_map_next(st->tokens, &it, &k, &kl, &v))
            if (((ing__tok_t *)v)->expires_ms <= now) cm_free(cm_map_del(st->tokens, k, kl));
    }
    if (cm_map_len(st->tokens) < ING__MAX_TOKENS / ING__STRIPES) {
        void **slot = cm_map_slot(st->tokens, tok, tlen, NULL);
        if (!*slot) *slot = cm_malloc(sizeof(ing__tok_t));
        e = *slot;
        memcpy(e->device_id, device_id, sizeof e->device_id);
        e->expires_ms = now + d->cfg->auth_cache_ms;
    }
    pthread_mutex_unlock(&st->mu);
    return CM_STATUS_OK;
}

static ing__dev_t *ing__dev_locked(ing__stripe_t *st, const char *device_id, size_t n, double rate, int64_t now) {
    int created = 0;
    void **slot = cm_map_slot(st->devs, device_id, n, &created);
    if (created) {
        ing__dev_t *v = cm_calloc(1, sizeof *v);
        v->allowance = rate;
        v->refill_ms = now;
        *slot = v;
    }
    ing__dev_t *v = *slot;
    v->touched_ms = now;
    return v;
}

int ing_devices_admit(ing_devices_t *d, const char *device_id, size_t n, int64_t *retry_ms) {
    double rate = (double)d->cfg->rate_limit;
    if (rate <= 0) return CM_STATUS_OK;
    size_t dl = strlen(device_id);
    ing__stripe_t *st = ing__stripe(d, device_id, dl);
    int64_t now = ing__mono_ms();
    pthread_mutex_lock(&st->mu);
    ing__dev_t *v = ing__dev_locked(st, device_id, dl, rate, now);
    v->allowance += (double)(now - v->refill_ms) * rate / 1000.0;
    if (v->allowance > rate) v->allowance = rate; /* bursts of at most one second's worth */
    v->refill_ms = now;
    int code = CM_STATUS_OK;
    /* A batch is admitted while the budget is positive and may overdraw it: a batch larger than
     * one second's budget still goes through, and the debt delays the next one. */
    if (v->allowance > 0) {
        v->allowance -= (double)n;
    } else {
        *retry_ms = (int64_t)(-v->allowance * 1000.0 / rate) + 1;
        code = CM_STATUS_RESOURCE_EXHAUSTED;
    }
    pthread_mutex_unlock(&st->mu);
    if (code) cm_counter_add(d->limited, 1);
    return code;
}

void ing_devices_seen(ing_devices_t *d, const char *device_id, int64_t when_ms) {
    size_t dl = strlen(device_id);
    ing__stripe_t *st = ing__stripe(d, device_id, dl);
    pthread_mutex_lock(&st->mu);
    ing__dev_t *v = ing__dev_locked(st, device_id, dl, (double)d->cfg->rate_limit, ing__mono_ms());
    if (when_ms > v->seen_ms) v->seen_ms = when_ms;
    pthread_mutex_unlock(&st->mu);
}

typedef struct ing__sight_s {
    char *id;
    int64_t ms;
} ing__sight_t;

/* Sends sightings; on failure puts their times back as unreported so the next pass retries. */
static int ing__send_sightings(ing_devices_t *d, ing__sight_t *s, size_t n) {
    Iot__Device__V1__Sighting *rows = cm_calloc(n, sizeof *rows);
    Iot__Device__V1__Sighting **ptrs = cm_calloc(n, sizeof *ptrs);
    Google__Protobuf__Timestamp *ts = cm_calloc(n, sizeof *ts);
    for (size_t i = 0; i < n; i++) {
        iot__device__v1__sighting__init(&rows[i]);
        google__protobuf__timestamp__init(&ts[i]);
        ts[i].seconds = s[i].ms / 1000;
        ts[i].nanos = (int32_t)(s[i].ms % 1000) * 1000000;
        rows[i].device_id = s[i].id;
        rows[i].time = &ts[i];
        ptrs[i] = &rows[i];
    }
    Iot__Device__V1__ReportSeenRequest req = IOT__DEVICE__V1__REPORT_SEEN_REQUEST__INIT;
    req.n_sightings = n;
    req.sightings = ptrs;
    Iot__Device__V1__ReportSeenResponse *resp = NULL;
    cm_rpc_status_t rs = {0};
    cm_call_opts_t o = {.timeout_ms = 10000, .idempotent = 1};
    int code = cm_channel_unary(d->dm, "/iot.device.v1.DeviceManager/ReportSeen", &req.base,
                                &iot__device__v1__report_seen_response__descriptor, (ProtobufCMessage **)&resp, &o, &rs);
    if (code == CM_STATUS_OK) {
        protobuf_c_message_free_unpacked(&resp->base, NULL);
        cm_counter_add(d->reported, n);
    } else {
        CM_LOG(CM_LOG_WARN, "reporting last-seen times to device-mgmt: %s: %s (will retry)", cm_status_name(code),
               rs.message);
        for (size_t i = 0; i < n; i++) {
            ing__stripe_t *st = ing__stripe(d, s[i].id, strlen(s[i].id));
            pthread_mutex_lock(&st->mu);
            ing__dev_t *v = cm_map_get(st->devs, s[i].id, strlen(s[i].id));
            if (v && v->reported_ms == s[i].ms) v->reported_ms = 0;
            pthread_mutex_unlock(&st->mu);
        }
    }
    cm_rpc_status_clear(&rs);
    cm_free(rows);
    cm_free(ptrs);
    cm_free(ts);
    return code == CM_STATUS_OK ? (int)n : 0;
}

int ing_devices_report(ing_devices_t *d) {
    pthread_mutex_lock(&d->report_mu);
    int64_t now = ing__mono_ms();
    ing__sight_t *batch = cm_malloc(ING__MAX_SIGHTINGS * sizeof *batch);
    size_t n = 0;
    int sent = 0;
    for (int i = 0; i < ING__STRIPES; i++) {
        ing__stripe_t *st = &d->stripes[i];
        pthread_mutex_lock(&st->mu);
        size_t it = 0;
        const void *k;
        size_t kl;
        void *val;
        while (cm_map_next(st->devs, &it, &k, &kl, &val)) {
            ing__dev_t *v = val;
            if (v->seen_ms > v->reported_ms) {
                if (n == ING__MAX_SIGHTINGS) {
                    /* Send outside the stripe lock: it is a network call. */
                    pthread_mutex_unlock(&st->mu);
                    sent += ing__send_sightings(d, batch, n);
                    for (size_t j = 0; j < n; j++) cm_free(batch[j].id);
                    n = 0;
                    pthread_mutex_lock(&st->mu);
                    /* The map may have changed while unlocked: restart this stripe. */
                    it = 0;
                    continue;
                }
                batch[n].id = cm_strndup(k, kl);
                batch[n].ms = v->seen_ms;
                n++;
                v->reported_ms = v->seen_ms;
            } else if (now - v->touched_ms > ING__IDLE_MS) {
                cm_free(cm_map_del(st->devs, k, kl));
            }
        }
        pthread_mutex_unlock(&st->mu);
    }
    if (n) sent += ing__send_sightings(d, batch, n);
    for (size_t j = 0; j < n; j++) cm_free(batch[j].id);
    cm_free(batch);
    pthread_mutex_unlock(&d->report_mu);
    return sent;
}
