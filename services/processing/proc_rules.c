/* Rules: validation, defaults, the compiled form, snapshots and the loader thread. */
#include "proc_rules.h"

#include <ctype.h>
#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cm_alloc.h"
#include "cm_err.h"
#include "cm_json.h"
#include "cm_log.h"
#include "cm_loop.h"
#include "cm_metrics.h"
#include "cm_rpc.h"
#include "cm_selector.h"
#include "cm_time.h"
#include "iot/device/v1/device.pb-c.h"

#define PROC__SEV_MIN IOT__PROCESSING__V1__SEVERITY__SEVERITY_INFO
#define PROC__SEV_MAX IOT__PROCESSING__V1__SEVERITY__SEVERITY_CRITICAL
#define PROC__WEEK_MS (7LL * 24 * 3600 * 1000)
#define PROC__SLIDING_BUCKETS 20

/* ---- validation and defaults ------------------------------------------------------------ */

int proc_rule_id_ok(const char *s) {
    size_t n = s ? strlen(s) : 0;
    if (n == 0 || n > PROC_ID_MAX || !isalnum((unsigned char)s[0])) return 0;
    for (size_t i = 1; i < n; i++)
        if (!isalnum((unsigned char)s[i]) && !strchr("._:-", s[i])) return 0;
    return 1;
}

int proc_metric_ok(const char *s) {
    size_t n = s ? strlen(s) : 0;
    if (n == 0 || n > PROC_METRIC_MAX) return 0;
    for (size_t i = 0; i < n; i++)
        if (!isalnum((unsigned char)s[i]) && !strchr("_.:/-", s[i])) return 0;
    return 1;
}

/* A device type as device-mgmt defines it: [a-z0-9][a-z0-9._-]{0,62}. */
static int proc__type_ok(const char *s) {
    size_t n = strlen(s);
    if (n == 0 || n > 63 || !(islower((unsigned char)s[0]) || isdigit((unsigned char)s[0]))) return 0;
    for (size_t i = 1; i < n; i++)
        if (!islower((unsigned char)s[i]) && !isdigit((unsigned char)s[i]) && !strchr("._-", s[i])) return 0;
    return 1;
}

static int proc__printable(const char *s, size_t max) {
    size_t n = strlen(s);
    if (n > max) return 0;
    for (size_t i = 0; i < n; i++)
        if ((unsigned char)s[i] < 0x20 || s[i] == 0x7f) return 0;
    return 1;
}

static void *proc__new_msg(ProtobufCAllocator *a, size_t size) {
    return a ? a->alloc(a->allocator_data, size) : NULL;
}

static void proc__window_defaults(Iot__Processing__V1__WindowSpec *w) {
    if (w->kind == IOT__PROCESSING__V1__WINDOW_KIND__WINDOW_KIND_UNSPECIFIED)
        w->kind = IOT__PROCESSING__V1__WINDOW_KIND__WINDOW_KIND_SLIDING;
    if (w->kind != IOT__PROCESSING__V1__WINDOW_KIND__WINDOW_KIND_COUNT && w->width_ms == 0) w->width_ms = 300000;
    if (w->kind == IOT__PROCESSING__V1__WINDOW_KIND__WINDOW_KIND_COUNT && w->count == 0) w->count = PROC_WINDOW_MAX_COUNT;
    if (w->late_ms == 0) w->late_ms = 30000;
    if (w->min_samples == 0) w->min_samples = 10;
    if (w->range_min == 0 && w->range_max == 0) {
        w->range_min = -50;
        w->range_max = 150;
    }
}

void proc_rule_normalize(proc_rule_pb_t *r, ProtobufCAllocator *alloc) {
    if (r->severity == IOT__PROCESSING__V1__SEVERITY__SEVERITY_UNSPECIFIED)
        r->severity = IOT__PROCESSING__V1__SEVERITY__SEVERITY_WARNING;
    if (r->condition_case == IOT__PROCESSING__V1__RULE__CONDITION_THRESHOLD && r->threshold) {
        Iot__Processing__V1__ThresholdCondition *t = r->threshold;
        if (t->statistic != IOT__PROCESSING__V1__STATISTIC__STATISTIC_VALUE) {
            if (!t->window) {
                t->window = proc__new_msg(alloc, sizeof *t->window);
                if (t->window) iot__processing__v1__window_spec__init(t->window);
            }
            if (t->window) proc__window_defaults(t->window);
        }
    } else if (r->condition_case == IOT__PROCESSING__V1__RULE__CONDITION_DETECTOR && r->detector) {
        Iot__Processing__V1__DetectorCondition *d = r->detector;
        if (d->kind == IOT__PROCESSING__V1__DETECTOR_KIND__DETECTOR_KIND_ZSCORE) {
            if (d->level == 0) d->level = PROC_ZSCORE_ALERT;
            if (d->window_ms == 0) d->window_ms = 300000;
            if (d->min_samples == 0) d->min_samples = 30;
        }
    }
    if (r->command && r->command->min_severity == IOT__PROCESSING__V1__SEVERITY__SEVERITY_UNSPECIFIED)
        r->command->min_severity = IOT__PROCESSING__V1__SEVERITY__SEVERITY_CRITICAL;
    if (r->webhook) {
        if (r->webhook->max_attempts == 0) r->webhook->max_attempts = 5;
        if (r->webhook->timeout_ms == 0) r->webhook->timeout_ms = 5000;
    }
}

#define PROC__BAD(...)                         \
    do {                                       \
        snprintf(why, cap, __VA_ARGS__);       \
        return CM_STATUS_INVALID_ARGUMENT;     \
    } while (0)

static int proc__check_window(const Iot__Processing__V1__WindowSpec *w, const char *f, char *why, size_t cap) {
    if (!w) PROC__BAD("%s is required with a statistic other than VALUE", f);
    int time = w->kind != IOT__PROCESSING__V1__WINDOW_KIND__WINDOW_KIND_COUNT;
    if (w->kind < 0 || w->kind > IOT__PROCESSING__V1__WINDOW_KIND__WINDOW_KIND_COUNT) PROC__BAD("%s.kind is not a WindowKind", f);
    if (time && (w->width_ms < PROC__SLIDING_BUCKETS || w->width_ms > PROC__WEEK_MS))
        PROC__BAD("%s.width_ms must be 20 ms .. 7 days (got %lld)", f, (long long)w->width_ms);
    if (w->kind == IOT__PROCESSING__V1__WINDOW_KIND__WINDOW_KIND_SLIDING && w->width_ms % PROC__SLIDING_BUCKETS)
        PROC__BAD("%s.width_ms of a sliding window must be a multiple of 20 (it slides in 20 steps)", f);
    if (!time && (w->count < 1 || w->count > PROC_WINDOW_MAX_COUNT))
        PROC__BAD("%s.count must be 1..%d", f, PROC_WINDOW_MAX_COUNT);
    if (w->late_ms < 0 || w->late_ms > PROC__WEEK_MS) PROC__BAD("%s.late_ms must be 0 .. 7 days", f);
    if (w->min_samples < 1 || w->min_samples > 1000000) PROC__BAD("%s.min_samples must be 1..1000000", f);
    if (!isfinite(w->range_min) || !isfinite(w->range_max) || w->range_min >= w->range_max)
        PROC__BAD("%s.range_min must be below %s.range_max (the p95 sketch's value range)", f, f);
    return 0;
}

int proc_rule_check(const proc_rule_pb_t *r, char *why, size_t cap) {
    if (r->id && *r->id && !proc_rule_id_ok(r->id))
        PROC__BAD("rule.id must match [A-Za-z0-9][A-Za-z0-9._:-]{0,127}");
    if (!r->name || !*r->name || !proc__printable(r->name, PROC_NAME_MAX))
        PROC__BAD("rule.name is required: 1..%d printable characters", PROC_NAME_MAX);
    if (!proc_metric_ok(r->metric)) PROC__BAD("rule.metric is required: 1..128 characters of [A-Za-z0-9_.:/-]");
    if (r->severity < PROC__SEV_MIN || r->severity > PROC__SEV_MAX) PROC__BAD("rule.severity is not a Severity");
    const Iot__Processing__V1__DeviceSelector *s = r->devices;
    if (s) {
        if (s->n_device_ids > PROC_SELECTOR_IDS_MAX)
            PROC__BAD("rule.devices.device_ids holds at most %d ids; select by group, type or labels instead", PROC_SELECTOR_IDS_MAX);
        for (size_t i = 0; i < s->n_device_ids; i++)
            if (!proc_rule_id_ok(s->device_ids[i]))
                PROC__BAD("rule.devices.device_ids[%zu] is not a device id ([A-Za-z0-9][A-Za-z0-9._:-]{0,127})", i);
        if (s->group_id && *s->group_id && !proc_rule_id_ok(s->group_id)) PROC__BAD("rule.devices.group_id is not a group id");
        /* Resolved through device-mgmt's ListDevices, which refuses anything but a device type: a
         * rule with another type would be stored, and never select a device. */
        if (s->type && *s->type && !proc__type_ok(s->type))
            PROC__BAD("rule.devices.type is a device type: up to 63 characters of a-z, 0-9, '.', '_', '-', starting with a letter or digit");
        if (s->label_selector && *s->label_selector) {
            char err[256];
            cm_selector_t *sel = cm_selector_parse(s->label_selector, err, sizeof err);
            if (!sel) PROC__BAD("rule.devices.label_selector: %s", err);
            cm_selector_free(sel);
        }
    }
    if (r->condition_case == IOT__PROCESSING__V1__RULE__CONDITION_THRESHOLD && r->threshold) {
        const Iot__Processing__V1__ThresholdCondition *t = r->threshold;
        if (t->op < IOT__PROCESSING__V1__COMPARISON__COMPARISON_GT || t->op > IOT__PROCESSING__V1__COMPARISON__COMPARISON_NE)
            PROC__BAD("rule.threshold.op is required (COMPARISON_GT, _GE, _LT, _LE, _EQ or _NE)");
        if (!isfinite(t->threshold)) PROC__BAD("rule.threshold.threshold must be finite");
        if (t->for_ms < 0 || t->for_ms > PROC__WEEK_MS) PROC__BAD("rule.threshold.for_ms must be 0 .. 7 days");
        if (t->statistic < 0 || t->statistic > IOT__PROCESSING__V1__STATISTIC__STATISTIC_P95)
            PROC__BAD("rule.threshold.statistic is not a Statistic");
        if (t->statistic != IOT__PROCESSING__V1__STATISTIC__STATISTIC_VALUE) {
            int rc = proc__check_window(t->window, "rule.threshold.window", why, cap);
            if (rc) return rc;
        } else if (t->window) {
            PROC__BAD("rule.threshold.window needs a statistic (MEAN, MIN, MAX, STDDEV, COUNT or P95)");
        }
    } else if (r->condition_case == IOT__PROCESSING__V1__RULE__CONDITION_DETECTOR && r->detector) {
        const Iot__Processing__V1__DetectorCondition *d = r->detector;
        switch (d->kind) {
        case IOT__PROCESSING__V1__DETECTOR_KIND__DETECTOR_KIND_ZSCORE:
            if (!(d->level > 0 && d->level < 1)) PROC__BAD("rule.detector.level of a ZSCORE detector must be in (0, 1)");
            if (d->window_ms < PROC__SLIDING_BUCKETS || d->window_ms > PROC__WEEK_MS || d->window_ms % PROC__SLIDING_BUCKETS)
                PROC__BAD("rule.detector.window_ms must be a multiple of 20 ms up to 7 days");
            if (d->min_samples < 2 || d->min_samples > 1000000) PROC__BAD("rule.detector.min_samples must be 2..1000000");
            break;
        case IOT__PROCESSING__V1__DETECTOR_KIND__DETECTOR_KIND_STUCK:
            if (d->duration_ms <= 0 || d->duration_ms > PROC__WEEK_MS)
                PROC__BAD("rule.detector.duration_ms of a STUCK detector must be 1 ms .. 7 days");
            if (!isfinite(d->epsilon) || d->epsilon < 0) PROC__BAD("rule.detector.epsilon must be finite and >= 0");
            break;
        case IOT__PROCESSING__V1__DETECTOR_KIND__DETECTOR_KIND_RATE:
            if (!isfinite(d->level) || d->level <= 0) PROC__BAD("rule.detector.level of a RATE detector (units per second) must be > 0");
            break;
        case IOT__PROCESSING__V1__DETECTOR_KIND__DETECTOR_KIND_ABSENCE:
            if (d->duration_ms < 1000 || d->duration_ms > PROC__WEEK_MS)
                PROC__BAD("rule.detector.duration_ms of an ABSENCE detector must be 1 s .. 7 days");
            break;
        default:
            PROC__BAD("rule.detector.kind is required (DETECTOR_KIND_ZSCORE, _STUCK, _RATE or _ABSENCE)");
        }
    } else {
        PROC__BAD("rule needs a condition: threshold or detector");
    }
    if (r->command) {
        const Iot__Processing__V1__CommandAction *c = r->command;
        int ok = c->name && isalnum((unsigned char)c->name[0]) && strlen(c->name) <= 64;
        for (size_t i = 1; ok && c->name[i]; i++) ok = isalnum((unsigned char)c->name[i]) || strchr("._-", c->name[i]);
        if (!ok) PROC__BAD("rule.command.name is required: 1-64 characters of A-Z, a-z, 0-9, '.', '_', '-' (as device-mgmt's SendCommand)");
        if (c->min_severity < PROC__SEV_MIN || c->min_severity > PROC__SEV_MAX) PROC__BAD("rule.command.min_severity is not a Severity");
        if (c->payload && protobuf_c_message_get_packed_size(&c->payload->base) > PROC_PAYLOAD_MAX)
            PROC__BAD("rule.command.payload is larger than 64 KiB");
        /* The payload goes to device-mgmt as JSON, and the rule to REST clients: a NaN in it was
         * stored, then every command it sent was refused and GET /api/v1/rules answered 500. */
        if (c->payload) {
            json_t *j = cm_json_from_struct(c->payload);
            int representable = j != NULL;
            json_decref(j);
            if (!representable)
                PROC__BAD("rule.command.payload is not representable as JSON (NaN, infinity, or nested deeper than %d)", CM_JSON_MAX_DEPTH);
        }
    }
    if (r->webhook) {
        const Iot__Processing__V1__WebhookAction *w = r->webhook;
        size_t n = w->url ? strlen(w->url) : 0;
        if (n == 0 || n > PROC_URL_MAX || !proc__printable(w->url, PROC_URL_MAX) ||
            (strncmp(w->url, "http://", 7) != 0 && strncmp(w->url, "https://", 8) != 0) || strchr(w->url, ' '))
            PROC__BAD("rule.webhook.url must be an http:// or https:// URL of at most %d characters", PROC_URL_MAX);
        if (w->max_attempts < 1 || w->max_attempts > 100) PROC__BAD("rule.webhook.max_attempts must be 1..100");
        if (w->timeout_ms < 10 || w->timeout_ms > 60000) PROC__BAD("rule.webhook.timeout_ms must be 10 ms .. 60 s");
    }
    return 0;
}

/* ---- stats ------------------------------------------------------------------------------- */

void proc_rule_stats_ref(proc_rule_stats_t *s) { atomic_fetch_add(&s->refs, 1); }

void proc_rule_stats_unref(proc_rule_stats_t *s) {
    if (s && atomic_fetch_sub(&s->refs, 1) == 1) cm_free(s);
}

/* ---- compiled rules ---------------------------------------------------------------------- */

int proc_compare(int op, double x, double t) {
    switch (op) {
    case IOT__PROCESSING__V1__COMPARISON__COMPARISON_GT: return x > t;
    case IOT__PROCESSING__V1__COMPARISON__COMPARISON_GE: return x >= t;
    case IOT__PROCESSING__V1__COMPARISON__COMPARISON_LT: return x < t;
    case IOT__PROCESSING__V1__COMPARISON__COMPARISON_LE: return x <= t;
    case IOT__PROCESSING__V1__COMPARISON__COMPARISON_EQ: return x == t;
    case IOT__PROCESSING__V1__COMPARISON__COMPARISON_NE: return x != t;
    default: return 0;
    }
}

int proc_rule_selects(const proc_rule_t *r, const char *device_id) {
    size_t n = strlen(device_id);
    if (r->ids && !cm_map_get(r->ids, device_id, n)) return 0;
    if (r->resolved && !cm_map_get(r->resolved, device_id, n)) return 0;
    return 1;
}

static void proc__window_cfg(proc_window_cfg_t *c, const Iot__Processing__V1__WindowSpec *w) {
    memset(c, 0, sizeof *c);
    switch (w->kind) {
    case IOT__PROCESSING__V1__WINDOW_KIND__WINDOW_KIND_TUMBLING:
        c->kind = PROC_WIN_TUMBLING;
        c->buckets = 2;
        break;
    case IOT__PROCESSING__V1__WINDOW_KIND__WINDOW_KIND_COUNT:
        c->kind = PROC_WIN_COUNT;
        c->count = w->count;
        break;
    default:
        c->kind = PROC_WIN_SLIDING;
        c->buckets = PROC__SLIDING_BUCKETS;
        break;
    }
    c->width_ms = c->kind == PROC_WIN_COUNT ? 0 : w->width_ms;
    c->late_ms = w->late_ms;
    c->min_samples = w->min_samples;
    c->sketch_min = w->range_min;
    c->sketch_max = w->range_max;
}

/* A marker value for id sets (the map stores pointers; any non-NULL one means present). */
static char proc__present;

/* One resolved selector: the device ids device-mgmt listed for it. Shared by the rules with the
 * same selector (each holds a reference, and so does the loader's cache until the next refresh). */
typedef struct proc__res_s {
    _Atomic int refs;
    cm_map_t *ids;
    int64_t at_ms; /* monotonic time of the resolution */
    int used;      /* by the snapshot being built */
} proc__res_t;

static void proc__res_unref(void *v) {
    proc__res_t *r = v;
    if (!r || atomic_fetch_sub(&r->refs, 1) != 1) return;
    cm_map_free(r->ids, NULL);
    cm_free(r);
}

static void proc__rule_free(proc_rule_t *r) {
    if (!r) return;
    cm_free(r->id);
    cm_free(r->name);
    cm_free(r->metric);
    cm_free(r->cmd_name);
    cm_free(r->cmd_payload);
    cm_free(r->hook_url);
    cm_free(r->sel_key);
    cm_map_free(r->ids, NULL);
    proc__res_unref(r->res_ref);
    proc_rule_stats_unref(r->stats);
    cm_free(r);
}

/* Compiles a stored rule; NULL when it does not pass proc_rule_check (a rule written by an older
 * release under looser checks is skipped with a log line rather than evaluated wrongly). */
static proc_rule_t *proc__compile(proc_rule_pb_t *pb, const char *id, int64_t revision) {
    char why[256];
    proc_rule_normalize(pb, NULL);
    if (proc_rule_check(pb, why, sizeof why)) {
        cm_log_kv(CM_LOG_WARN, "stored rule fails validation; skipped", "rule", id, "why", why, NULL);
        return NULL;
    }
    proc_rule_t *r = cm_calloc(1, sizeof *r);
    r->id = cm_strdup(id);
    r->name = cm_strdup(pb->name);
    r->metric = cm_strdup(pb->metric);
    r->revision = revision;
    r->severity = pb->severity;
    if (pb->condition_case == IOT__PROCESSING__V1__RULE__CONDITION_THRESHOLD) {
        const Iot__Processing__V1__ThresholdCondition *t = pb->threshold;
        r->cond = PROC_COND_THRESHOLD;
        r->op = t->op;
        r->threshold = t->threshold;
        r->for_ms = t->for_ms;
        r->statistic = t->statistic;
        if (t->statistic != IOT__PROCESSING__V1__STATISTIC__STATISTIC_VALUE) {
            r->has_window = 1;
            proc__window_cfg(&r->win, t->window);
        }
    } else {
        const Iot__Processing__V1__DetectorCondition *d = pb->detector;
        switch (d->kind) {
        case IOT__PROCESSING__V1__DETECTOR_KIND__DETECTOR_KIND_ZSCORE:
            r->cond = PROC_COND_ZSCORE;
            r->level = d->level;
            r->has_window = 1;
            proc_window_cfg_seed(&r->win);
            r->win.width_ms = d->window_ms;
            r->win.min_samples = d->min_samples;
            break;
        case IOT__PROCESSING__V1__DETECTOR_KIND__DETECTOR_KIND_STUCK:
            r->cond = PROC_COND_STUCK;
            r->stuck.duration_ms = d->duration_ms;
            r->stuck.epsilon = d->epsilon;
            break;
        case IOT__PROCESSING__V1__DETECTOR_KIND__DETECTOR_KIND_RATE:
            r->cond = PROC_COND_RATE;
            r->rate.limit_per_s = d->level;
            break;
        default:
            r->cond = PROC_COND_ABSENCE;
            r->absence.duration_ms = d->duration_ms;
            break;
        }
    }
    if (pb->command) {
        r->cmd_name = cm_strdup(pb->command->name);
        r->cmd_min_severity = pb->command->min_severity;
        if (pb->command->payload) {
            r->cmd_payload_len = protobuf_c_message_get_packed_size(&pb->command->payload->base);
            r->cmd_payload = cm_malloc(r->cmd_payload_len ? r->cmd_payload_len : 1);
            protobuf_c_message_pack(&pb->command->payload->base, r->cmd_payload);
        }
    }
    if (pb->webhook) {
        r->hook_url = cm_strdup(pb->webhook->url);
        r->hook_attempts = pb->webhook->max_attempts;
        r->hook_timeout_ms = pb->webhook->timeout_ms;
    }
    const Iot__Processing__V1__DeviceSelector *s = pb->devices;
    if (s && s->n_device_ids) {
        r->ids = cm_map_new();
        for (size_t i = 0; i < s->n_device_ids; i++)
            *cm_map_slot(r->ids, s->device_ids[i], strlen(s->device_ids[i]), NULL) = &proc__present;
    }
    if (s && ((s->group_id && *s->group_id) || (s->type && *s->type) || (s->label_selector && *s->label_selector))) {
        char key[1024];
        snprintf(key, sizeof key, "g=%s\nt=%s\nl=%s", s->group_id ? s->group_id : "", s->type ? s->type : "",
                 s->label_selector ? s->label_selector : "");
        r->sel_key = cm_strdup(key);
    }
    return r;
}

/* ---- snapshots --------------------------------------------------------------------------- */

static void proc__list_free(void *v) {
    proc_rule_list_t *l = v;
    cm_free(l->v);
    cm_free(l);
}

void proc_ruleset_unref(proc_ruleset_t *rs) {
    if (!rs || atomic_fetch_sub(&rs->refs, 1) != 1) return;
    for (size_t i = 0; i < rs->n; i++) proc__rule_free(rs->rules[i]);
    cm_free(rs->rules);
    cm_map_free(rs->by_metric, proc__list_free);
    cm_free(rs);
}

static const proc_rule_list_t proc__empty_list = {NULL, 0};

const proc_rule_list_t *proc_ruleset_metric(const proc_ruleset_t *rs, const char *metric) {
    const proc_rule_list_t *l = cm_map_get(rs->by_metric, metric, strlen(metric));
    return l ? l : &proc__empty_list;
}

/* ---- the loader -------------------------------------------------------------------------- */

struct proc_rules_s {
    const proc_config_t *cfg;
    cm_pg_t *pg;
    cm_channel_t *dm;
    cm_loop_t *loop;
    pthread_mutex_t mu;
    proc_ruleset_t *cur;
    int64_t version; /* rules_version of cur, -1 before the first load */
    uint64_t gen;
    int kicked;
    cm_map_t *stats;   /* rule id -> proc_rule_stats_t * (a reference each); under mu */
    cm_map_t *res;     /* selector key -> proc__res_t * (a reference); loader thread only */
    int64_t last_refresh;
    cm_gauge_t *g_version, *g_rules;
    cm_counter_t *c_reload_fail;
};

static int64_t proc__mono_ms(void) { return cm_mono_ns() / 1000000; }

/* Resolves one selector by paging through ListDevices. NULL when device-mgmt did not answer. */
static cm_map_t *proc__resolve(proc_rules_t *rl, const char *key) {
    char group[256] = "", type[128] = "", labels[1024] = "";
    const char *g = strstr(key, "g="), *t = strstr(key, "\nt="), *l = strstr(key, "\nl=");
    snprintf(group, sizeof group, "%.*s", (int)(t - g - 2), g + 2);
    snprintf(type, sizeof type, "%.*s", (int)(l - t - 3), t + 3);
    snprintf(labels, sizeof labels, "%s", l + 3);
    cm_map_t *ids = cm_map_new();
    char token[512] = "";
    for (;;) {
        Iot__Device__V1__DeviceFilter f = IOT__DEVICE__V1__DEVICE_FILTER__INIT;
        f.group_id = group;
        f.type = type;
        f.label_selector = labels;
        Iot__Device__V1__ListDevicesRequest req = IOT__DEVICE__V1__LIST_DEVICES_REQUEST__INIT;
        req.filter = &f;
        req.page_size = 1000;
        req.page_token = token;
        Iot__Device__V1__ListDevicesResponse *resp = NULL;
        cm_rpc_status_t st = {0};
        cm_call_opts_t o = {.timeout_ms = 10000, .idempotent = 1};
        int code = cm_channel_unary(rl->dm, "/iot.device.v1.DeviceManager/ListDevices", &req.base,
                                    &iot__device__v1__list_devices_response__descriptor, (ProtobufCMessage **)&resp, &o, &st);
        if (code != CM_STATUS_OK) {
            cm_log_kv(CM_LOG_WARN, "cannot resolve a rule selector through device-mgmt", "selector", key, "code",
                      cm_status_name(code), "message", st.message, NULL);
            cm_rpc_status_clear(&st);
            cm_map_free(ids, NULL);
            return NULL;
        }
        cm_rpc_status_clear(&st);
        for (size_t i = 0; i < resp->n_devices; i++)
            *cm_map_slot(ids, resp->devices[i]->id, strlen(resp->devices[i]->id), NULL) = &proc__present;
        snprintf(token, sizeof token, "%s", resp->next_page_token ? resp->next_page_token : "");
        protobuf_c_message_free_unpacked(&resp->base, NULL);
        if (!*token) return ids;
    }
}

/* The rules_version, or -1 when Postgres cannot be asked. */
static int64_t proc__version(proc_rules_t *rl) {
    cm_pg_conn_t *c = cm_pg_acquire(rl->pg, 2000);
    if (!c) return -1;
    PGresult *res = NULL;
    int64_t v = -1;
    if (cm_pg_exec(c, &res, "SELECT v FROM rules_version", 0, NULL) == 0 && PQntuples(res) == 1)
        v = strtoll(PQgetvalue(res, 0, 0), NULL, 10);
    if (res) PQclear(res);
    cm_pg_release(rl->pg, c);
    return v;
}

static proc_rule_stats_t *proc__stats_for(proc_rules_t *rl, const char *id) {
    pthread_mutex_lock(&rl->mu);
    int created = 0;
    void **slot = cm_map_slot(rl->stats, id, strlen(id), &created);
    if (created) {
        proc_rule_stats_t *s = cm_calloc(1, sizeof *s);
        atomic_init(&s->refs, 1); /* the map's */
        snprintf(s->id, sizeof s->id, "%s", id);
        *slot = s;
    }
    proc_rule_stats_t *s = *slot;
    proc_rule_stats_ref(s);
    pthread_mutex_unlock(&rl->mu);
    return s;
}

/* Builds a snapshot from the rules table at version v. 0, or -1 when Postgres failed. */
static int proc__load(proc_rules_t *rl, int64_t v, int refresh) {
    cm_pg_conn_t *c = cm_pg_acquire(rl->pg, 2000);
    if (!c) return -1;
    PGresult *res = NULL;
    int rc = cm_pg_exec(c, &res, "SELECT id, spec, revision, (SELECT v FROM rules_version) FROM rules WHERE enabled ORDER BY id", 0, NULL);
    cm_pg_release(rl->pg, c);
    if (rc) return -1;
    int n = PQntuples(res);
    if (n > 0) v = strtoll(PQgetvalue(res, 0, 3), NULL, 10);
    proc_ruleset_t *rs = cm_calloc(1, sizeof *rs);
    atomic_init(&rs->refs, 1);
    rs->version = v;
    rs->rules = cm_calloc((size_t)n + 1, sizeof *rs->rules);
    rs->by_metric = cm_map_new();
    size_t iter = 0;
    const void *k;
    size_t kl;
    void *val;
    while (cm_map_next(rl->res, &iter, &k, &kl, &val)) ((proc__res_t *)val)->used = 0;
    int64_t now = proc__mono_ms();
    for (int i = 0; i < n; i++) {
        size_t blen = 0;
        unsigned char *bytes = PQunescapeBytea((const unsigned char *)PQgetvalue(res, i, 1), &blen);
        proc_rule_pb_t *pb = bytes ? iot__processing__v1__rule__unpack(NULL, blen, bytes) : NULL;
        PQfreemem(bytes);
        const char *id = PQgetvalue(res, i, 0);
        if (!pb) {
            cm_log_kv(CM_LOG_WARN, "stored rule does not parse; skipped", "rule", id, NULL);
            continue;
        }
        proc_rule_t *r = proc__compile(pb, id, strtoll(PQgetvalue(res, i, 2), NULL, 10));
        protobuf_c_message_free_unpacked(&pb->base, NULL);
        if (!r) continue;
        if (r->sel_key) {
            int created = 0;
            void **slot = cm_map_slot(rl->res, r->sel_key, strlen(r->sel_key), &created);
            proc__res_t *rr = *slot;
            if (!rr || (refresh && now - rr->at_ms >= rl->cfg->selector_refresh_ms && !rr->used)) {
                cm_map_t *ids = proc__resolve(rl, r->sel_key);
                if (ids) {
                    proc__res_unref(rr); /* snapshots still using the old set hold their own references */
                    rr = cm_calloc(1, sizeof *rr);
                    atomic_init(&rr->refs, 1);
                    rr->ids = ids;
                    rr->at_ms = now;
                    *slot = rr;
                }
            }
            if (!rr) { /* never resolved: not applied yet */
                cm_map_del(rl->res, r->sel_key, strlen(r->sel_key));
                proc__rule_free(r);
                continue;
            }
            rr->used = 1;
            atomic_fetch_add(&rr->refs, 1);
            r->res_ref = rr;
            r->resolved = rr->ids;
        }
        r->stats = proc__stats_for(rl, r->id);
        rs->rules[rs->n++] = r;
        int created = 0;
        void **slot = cm_map_slot(rs->by_metric, r->metric, strlen(r->metric), &created);
        proc_rule_list_t *l = *slot;
        if (!l) *slot = l = cm_calloc(1, sizeof *l);
        l->v = cm_realloc(l->v, (l->n + 1) * sizeof *l->v);
        l->v[l->n++] = r;
    }
    PQclear(res);
    iter = 0; /* drop resolutions no rule uses any more */
    while (cm_map_next(rl->res, &iter, &k, &kl, &val))
        if (!((proc__res_t *)val)->used) proc__res_unref(cm_map_del(rl->res, k, kl));
    pthread_mutex_lock(&rl->mu);
    rs->gen = ++rl->gen;
    proc_ruleset_t *old = rl->cur;
    rl->cur = rs;
    rl->version = v;
    /* Forget the stats of rules no longer loaded (states still billing them hold references). */
    cm_map_t *live = cm_map_new();
    for (size_t i = 0; i < rs->n; i++) *cm_map_slot(live, rs->rules[i]->id, strlen(rs->rules[i]->id), NULL) = &proc__present;
    iter = 0;
    while (cm_map_next(rl->stats, &iter, &k, &kl, &val))
        if (!cm_map_get(live, k, kl)) proc_rule_stats_unref(cm_map_del(rl->stats, k, kl));
    pthread_mutex_unlock(&rl->mu);
    cm_map_free(live, NULL);
    proc_ruleset_unref(old);
    cm_gauge_set(rl->g_version, (double)v);
    cm_gauge_set(rl->g_rules, (double)rs->n);
    return 0;
}

static int64_t proc__loop(void *arg) {
    proc_rules_t *rl = arg;
    int64_t v = proc__version(rl);
    pthread_mutex_lock(&rl->mu);
    int kicked = rl->kicked;
    rl->kicked = 0;
    int64_t have = rl->version;
    pthread_mutex_unlock(&rl->mu);
    if (v < 0) {
        cm_counter_add(rl->c_reload_fail, 1);
        return rl->cfg->rules_poll_ms;
    }
    /* Reload on a change, and every refresh period to re-resolve selectors. */
    int64_t now = proc__mono_ms();
    int refresh = now - rl->last_refresh >= rl->cfg->selector_refresh_ms;
    if (v != have || kicked || refresh) {
        if (proc__load(rl, v, refresh) == 0) {
            if (refresh) rl->last_refresh = now;
        } else {
            cm_counter_add(rl->c_reload_fail, 1);
        }
    }
    return rl->cfg->rules_poll_ms;
}

proc_rules_t *proc_rules_start(const proc_config_t *cfg, cm_pg_t *pg) {
    int err = 0;
    cm_channel_t *dm = cm_channel_new(cfg->dm_addr, NULL, &err);
    if (!dm) return NULL;
    proc_rules_t *rl = cm_calloc(1, sizeof *rl);
    rl->cfg = cfg;
    rl->pg = pg;
    rl->dm = dm;
    pthread_mutex_init(&rl->mu, NULL);
    rl->stats = cm_map_new();
    rl->res = cm_map_new();
    rl->version = -1;
    rl->g_version = cm_metrics_gauge("processing_rules_version", "rules_version of the rule set in use (compare with a rule's etag)", NULL);
    rl->g_rules = cm_metrics_gauge("processing_rules_loaded", "enabled rules in the rule set in use", NULL);
    rl->c_reload_fail = cm_metrics_counter("processing_rule_reload_failures_total", "rule reloads that could not read Postgres", NULL);
    /* An empty snapshot until the first load succeeds. */
    rl->cur = cm_calloc(1, sizeof *rl->cur);
    atomic_init(&rl->cur->refs, 1);
    rl->cur->by_metric = cm_map_new();
    rl->cur->version = -1;
    rl->loop = cm_loop_start(proc__loop, rl, 0);
    return rl;
}

int proc_rules_ready(proc_rules_t *rl) {
    pthread_mutex_lock(&rl->mu);
    int ok = rl->version >= 0;
    pthread_mutex_unlock(&rl->mu);
    return ok;
}

proc_ruleset_t *proc_rules_get(proc_rules_t *rl) {
    pthread_mutex_lock(&rl->mu);
    proc_ruleset_t *rs = rl->cur;
    atomic_fetch_add(&rs->refs, 1);
    pthread_mutex_unlock(&rl->mu);
    return rs;
}

void proc_rules_kick(proc_rules_t *rl) {
    if (!rl) return;
    pthread_mutex_lock(&rl->mu);
    rl->kicked = 1;
    pthread_mutex_unlock(&rl->mu);
    cm_loop_kick(rl->loop);
}

proc_rule_stats_t *proc_rules_stats(proc_rules_t *rl, const char *id) {
    pthread_mutex_lock(&rl->mu);
    proc_rule_stats_t *s = cm_map_get(rl->stats, id, strlen(id));
    if (s) proc_rule_stats_ref(s);
    pthread_mutex_unlock(&rl->mu);
    return s;
}

void proc_rules_metrics(cm_buf_t *b, void *arg) {
    proc_rules_t *rl = arg;
    proc_ruleset_t *rs = proc_rules_get(rl);
    static const struct {
        const char *name, *help, *type;
    } fam[] = {
        {"processing_rule_evaluations_total", "points evaluated by the rule in this process", "counter"},
        {"processing_rule_matches_total", "evaluations whose condition held", "counter"},
        {"processing_rule_cpu_seconds_total", "time spent evaluating the rule", "counter"},
        {"processing_rule_windows", "(device, metric) states the rule holds in this process", "gauge"},
        {"processing_rule_memory_bytes", "memory held by the rule's windows and detector states", "gauge"},
    };
    for (size_t f = 0; f < sizeof fam / sizeof fam[0]; f++) {
        cm_buf_printf(b, "# HELP %s %s\n# TYPE %s %s\n", fam[f].name, fam[f].help, fam[f].name, fam[f].type);
        for (size_t i = 0; i < rs->n; i++) {
            proc_rule_stats_t *s = rs->rules[i]->stats;
            cm_buf_printf(b, "%s{rule=\"%s\"} ", fam[f].name, s->id); /* ids are [A-Za-z0-9._:-]: no escaping needed */
            switch (f) {
            case 0: cm_buf_printf(b, "%llu\n", (unsigned long long)atomic_load(&s->evaluations)); break;
            case 1: cm_buf_printf(b, "%llu\n", (unsigned long long)atomic_load(&s->matches)); break;
            case 2: cm_buf_printf(b, "%.6f\n", (double)atomic_load(&s->cpu_ns) / 1e9); break;
            case 3: cm_buf_printf(b, "%lld\n", (long long)atomic_load(&s->windows)); break;
            default: cm_buf_printf(b, "%lld\n", (long long)atomic_load(&s->memory_bytes)); break;
            }
        }
    }
    proc_ruleset_unref(rs);
}

void proc_rules_stop(proc_rules_t *rl) {
    if (!rl) return;
    cm_loop_stop(rl->loop);
    proc_ruleset_unref(rl->cur);
    size_t iter = 0;
    const void *k;
    size_t kl;
    void *val;
    while (cm_map_next(rl->stats, &iter, &k, &kl, &val)) proc_rule_stats_unref(val);
    cm_map_free(rl->stats, NULL);
    cm_map_free(rl->res, proc__res_unref);
    cm_channel_free(rl->dm);
    pthread_mutex_destroy(&rl->mu);
    cm_free(rl);
}
