/* iot.processing.v1.Processing handlers: rules CRUD, alerts, WatchAlerts, rollups, window
 * statistics and per-rule accounting (the contract is in proc_api.h and the README). */
#include "proc_api.h"

#include <ctype.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cm_alloc.h"
#include "cm_buf.h"
#include "cm_err.h"
#include "cm_log.h"
#include "cm_loop.h"
#include "cm_metrics.h"
#include "cm_page.h"
#include "cm_time.h"

#define SVC_RULE Iot__Processing__V1__Rule
#define PROC__IDLE_POLL_MS 200

typedef struct proc__watcher_s {
    cm_call_t *call;
    int64_t cursor; /* last event id sent */
    int min_severity;
} proc__watcher_t;

struct proc_api_s {
    const proc_config_t *cfg;
    cm_pg_t *pg;
    cm_redis_pool_t *redis;
    proc_rules_t *rules;
    pthread_mutex_t mu;
    proc__watcher_t *w;
    size_t nw, capw;
    int closing;
    cm_loop_t *poller;
    cm_gauge_t *g_watchers;
};

static proc_api_t *proc__api(cm_call_t *call) { return cm_call_service_ctx(call); }

/* ---- helpers ------------------------------------------------------------------------------- */

static cm_pg_conn_t *proc__conn(cm_call_t *call, proc_api_t *api, int *code) {
    cm_pg_conn_t *c = cm_pg_acquire(api->pg, 5000);
    if (!c) *code = cm_call_fail(call, CM_STATUS_UNAVAILABLE, "processing storage unavailable: %s", cm_pg_last_error(api->pg));
    return c;
}

static int proc__pg_fail(cm_call_t *call, proc_api_t *api, cm_pg_conn_t *c) {
    int lost = cm_pg_conn_lost(c);
    int code = cm_call_fail(call, lost ? CM_STATUS_UNAVAILABLE : CM_STATUS_INTERNAL, "%s: %s",
                            lost ? "processing storage unavailable" : "storage error", cm_pg_error(c));
    cm_pg_rollback(c);
    cm_pg_release(api->pg, c);
    return code;
}

/* *t = epoch milliseconds ms_text (a result column); 0 when the column is NULL (""). */
static int proc__ts_fill(Google__Protobuf__Timestamp *t, const char *ms_text) {
    if (!ms_text || !*ms_text) return 0;
    int64_t ms = strtoll(ms_text, NULL, 10);
    google__protobuf__timestamp__init(t);
    int64_t sec = ms / 1000, rem = ms % 1000;
    if (rem < 0) {
        rem += 1000;
        sec--;
    }
    t->seconds = sec;
    t->nanos = (int32_t)(rem * 1000000);
    return 1;
}

static Google__Protobuf__Timestamp *proc__ts(cm_call_t *call, const char *ms_text) {
    Google__Protobuf__Timestamp tmp;
    if (!proc__ts_fill(&tmp, ms_text)) return NULL;
    Google__Protobuf__Timestamp *t = cm_call_alloc(call, sizeof *t);
    *t = tmp;
    return t;
}

/* Call only on a timestamp that passed proc__ts_ok. */
static int64_t proc__ms(const Google__Protobuf__Timestamp *t) { return t->seconds * 1000 + t->nanos / 1000000; }

/* A timestamp the JSON mapping can write (0001-01-01 .. 9999-12-31, nanos 0..999999999): proc__ms
 * cannot overflow on it (seconds near INT64_MIN did, undefined behaviour, and then matched). */
static int proc__ts_ok(const Google__Protobuf__Timestamp *t) {
    return t->seconds >= -62135596800LL && t->seconds <= 253402300799LL && t->nanos >= 0 && t->nanos <= 999999999;
}
#define PROC__TS_RULE "a timestamp from 0001-01-01 to 9999-12-31 (nanos 0..999999999)"

/* A positive decimal bigint, or 0. */
static int64_t proc__id(const char *s) {
    if (!s || !*s || strlen(s) > 18) return 0;
    for (const char *p = s; *p; p++)
        if (!isdigit((unsigned char)*p)) return 0;
    return strtoll(s, NULL, 10);
}

static int proc__page_size(cm_call_t *call, int v, int def, int max, int *out) {
    if (v < 0 || v > max) return cm_call_fail(call, CM_STATUS_INVALID_ARGUMENT, "page_size: %d is not in 1..%d (0: %d)", v, max, def);
    *out = v ? v : def;
    return 0;
}


/* ---- rules ------------------------------------------------------------------------------- */

#define PROC__RULE_COLS \
    "id, enabled, spec, revision, (extract(epoch FROM create_time) * 1000)::bigint, (extract(epoch FROM update_time) * 1000)::bigint"

static SVC_RULE *proc__rule_row(cm_call_t *call, PGresult *r, int row) {
    size_t n = 0;
    unsigned char *b = PQunescapeBytea((const unsigned char *)PQgetvalue(r, row, 2), &n);
    SVC_RULE *rule = b ? iot__processing__v1__rule__unpack(cm_call_pb_allocator(call), n, b) : NULL;
    PQfreemem(b);
    if (!rule) return NULL;
    rule->id = cm_call_strdup(call, PQgetvalue(r, row, 0));
    rule->enabled = PQgetvalue(r, row, 1)[0] == 't';
    rule->etag = cm_call_strdup(call, PQgetvalue(r, row, 3));
    rule->create_time = proc__ts(call, PQgetvalue(r, row, 4));
    rule->update_time = proc__ts(call, PQgetvalue(r, row, 5));
    return rule;
}

/* The stored form: the rule without its id, etag and times (those are columns). */
static char *proc__rule_hex(cm_call_t *call, const SVC_RULE *r) {
    SVC_RULE copy = *r;
    copy.id = (char *)"";
    copy.etag = (char *)"";
    copy.create_time = copy.update_time = NULL;
    copy.enabled = 0;
    size_t n = protobuf_c_message_get_packed_size(&copy.base);
    uint8_t *b = cm_call_alloc(call, n + 1);
    protobuf_c_message_pack(&copy.base, b);
    char *hex = cm_call_alloc(call, 2 * n + 3);
    hex[0] = '\\';
    hex[1] = 'x';
    cm_hex(hex + 2, b, n);
    return hex;
}

static int proc__get_rule(cm_call_t *call, proc_api_t *api, cm_pg_conn_t *c, const char *id, int lock, SVC_RULE **out) {
    const char *p[1] = {id};
    PGresult *r = NULL;
    if (cm_pg_exec(c, &r, lock ? "SELECT " PROC__RULE_COLS " FROM rules WHERE id = $1 FOR UPDATE" : "SELECT " PROC__RULE_COLS " FROM rules WHERE id = $1", 1, p))
        return proc__pg_fail(call, api, c);
    if (PQntuples(r) == 0) {
        PQclear(r);
        cm_pg_rollback(c);
        cm_pg_release(api->pg, c);
        return cm_call_fail(call, CM_STATUS_NOT_FOUND, "rule \"%s\" not found", id);
    }
    *out = proc__rule_row(call, r, 0);
    PQclear(r);
    if (!*out) {
        cm_pg_rollback(c);
        cm_pg_release(api->pg, c);
        return cm_call_fail(call, CM_STATUS_INTERNAL, "stored rule \"%s\" does not parse", id);
    }
    return 0;
}

static int proc__check_id(cm_call_t *call, const char *field, const char *id) {
    if (!proc_rule_id_ok(id))
        return cm_call_fail(call, CM_STATUS_INVALID_ARGUMENT, "%s: a rule id ([A-Za-z0-9][A-Za-z0-9._:-]{0,127}) is required", field);
    return 0;
}

/* Writes rule (insert when create) under a new version; returns the rule as stored via *out. */
static int proc__write_rule(cm_call_t *call, proc_api_t *api, cm_pg_conn_t *c, SVC_RULE *rule, int create, SVC_RULE **out) {
    PGresult *r = NULL;
    if (cm_pg_exec(c, &r, "UPDATE rules_version SET v = v + 1 RETURNING v", 0, NULL)) return proc__pg_fail(call, api, c);
    char v[32];
    snprintf(v, sizeof v, "%s", PQgetvalue(r, 0, 0));
    PQclear(r);
    r = NULL;
    const char *p[4] = {rule->id, rule->enabled ? "true" : "false", proc__rule_hex(call, rule), v};
    int rc = cm_pg_exec(c, &r,
                        create ? "INSERT INTO rules (id, enabled, spec, revision) VALUES ($1, $2, $3::bytea, $4) RETURNING " PROC__RULE_COLS
                               : "UPDATE rules SET enabled = $2, spec = $3::bytea, revision = $4, update_time = now() WHERE id = $1 "
                                 "RETURNING " PROC__RULE_COLS,
                        4, p);
    if (rc) {
        if (create && strcmp(cm_pg_sqlstate(c), "23505") == 0) {
            cm_pg_rollback(c);
            cm_pg_release(api->pg, c);
            return cm_call_fail(call, CM_STATUS_ALREADY_EXISTS, "rule \"%s\" already exists", rule->id);
        }
        return proc__pg_fail(call, api, c);
    }
    *out = proc__rule_row(call, r, 0);
    PQclear(r);
    if (cm_pg_commit(c)) return proc__pg_fail(call, api, c);
    cm_pg_release(api->pg, c);
    proc_rules_kick(api->rules);
    return 0;
}

static int proc__validate(cm_call_t *call, SVC_RULE *rule) {
    char why[300];
    proc_rule_normalize(rule, cm_call_pb_allocator(call));
    if (proc_rule_check(rule, why, sizeof why)) return cm_call_fail(call, CM_STATUS_INVALID_ARGUMENT, "%s", why);
    return 0;
}

static int proc_create_rule_check(cm_call_t *call, ProtobufCMessage *req_) {
    const Iot__Processing__V1__CreateRuleRequest *req = (const void *)req_;
    if (!req->rule) return cm_call_fail(call, CM_STATUS_INVALID_ARGUMENT, "rule is required");
    return proc__validate(call, req->rule);
}

static int proc_create_rule(cm_call_t *call, const ProtobufCMessage *req_, ProtobufCMessage *resp_) {
    proc_api_t *api = proc__api(call);
    const Iot__Processing__V1__CreateRuleRequest *req = (const void *)req_;
    int rc = proc_create_rule_check(call, (ProtobufCMessage *)req_);
    if (rc) return rc;
    SVC_RULE *rule = req->rule;
    if (!rule->id || !*rule->id) {
        char hex[17];
        cm_random_hex(hex, 8);
        rule->id = cm_call_alloc(call, 20);
        snprintf(rule->id, 20, "r-%s", hex);
    }
    cm_pg_conn_t *c = proc__conn(call, api, &rc);
    if (!c) return rc;
    PGresult *r = NULL;
    if (cm_pg_begin(c) || cm_pg_exec(c, &r, "SELECT count(*) FROM rules", 0, NULL)) return proc__pg_fail(call, api, c);
    long long n = atoll(PQgetvalue(r, 0, 0));
    PQclear(r);
    if (n >= api->cfg->max_rules) {
        cm_pg_rollback(c);
        cm_pg_release(api->pg, c);
        return cm_call_fail(call, CM_STATUS_RESOURCE_EXHAUSTED, "%lld rules exist, the limit (IOT_PROC_MAX_RULES); delete some first", n);
    }
    SVC_RULE *out = NULL;
    rc = proc__write_rule(call, api, c, rule, 1, &out);
    if (rc) return rc;
    *(SVC_RULE *)resp_ = *out;
    return 0;
}

static int proc_get_rule_check(cm_call_t *call, ProtobufCMessage *req_) {
    const Iot__Processing__V1__GetRuleRequest *req = (const void *)req_;
    return proc__check_id(call, "id", req->id);
}

static int proc_get_rule(cm_call_t *call, const ProtobufCMessage *req_, ProtobufCMessage *resp_) {
    proc_api_t *api = proc__api(call);
    const Iot__Processing__V1__GetRuleRequest *req = (const void *)req_;
    int rc = proc_get_rule_check(call, (ProtobufCMessage *)req_);
    if (rc) return rc;
    cm_pg_conn_t *c = proc__conn(call, api, &rc);
    if (!c) return rc;
    SVC_RULE *out = NULL;
    rc = proc__get_rule(call, api, c, req->id, 0, &out);
    if (rc) return rc;
    cm_pg_release(api->pg, c);
    *(SVC_RULE *)resp_ = *out;
    return 0;
}

/* Fills in the default page size. */
static int proc_list_rules_check(cm_call_t *call, ProtobufCMessage *req_) {
    Iot__Processing__V1__ListRulesRequest *req = (void *)req_;
    int size = 0, rc = proc__page_size(call, req->page_size, 100, 1000, &size);
    if (rc) return rc;
    req->page_size = size;
    char after[200] = "";
    if (req->page_token && *req->page_token && (rc = cm_page_token_parse_or_fail(call, req->page_token, 'r', after, sizeof after)))
        return rc;
    return 0;
}

static int proc_list_rules(cm_call_t *call, const ProtobufCMessage *req_, ProtobufCMessage *resp_) {
    proc_api_t *api = proc__api(call);
    const Iot__Processing__V1__ListRulesRequest *req = (const void *)req_;
    Iot__Processing__V1__ListRulesResponse *resp = (void *)resp_;
    int rc = proc_list_rules_check(call, (ProtobufCMessage *)req_);
    if (rc) return rc;
    int size = req->page_size;
    char after[200] = "";
    if (req->page_token && *req->page_token) cm_page_token_parse_or_fail(call, req->page_token, 'r', after, sizeof after); /* checked */
    cm_pg_conn_t *c = proc__conn(call, api, &rc);
    if (!c) return rc;
    char lim[16];
    snprintf(lim, sizeof lim, "%d", size + 1);
    const char *p[3] = {after, req->enabled_only ? "true" : "false", lim};
    PGresult *r = NULL;
    if (cm_pg_exec(c, &r, "SELECT " PROC__RULE_COLS " FROM rules WHERE id > $1 AND (enabled OR NOT $2::boolean) ORDER BY id LIMIT $3", 3, p))
        return proc__pg_fail(call, api, c);
    cm_pg_release(api->pg, c);
    int n = PQntuples(r);
    int take = n > size ? size : n;
    resp->rules = cm_call_alloc(call, sizeof *resp->rules * (size_t)(take + 1));
    for (int i = 0; i < take; i++) {
        SVC_RULE *x = proc__rule_row(call, r, i);
        if (x) resp->rules[resp->n_rules++] = x;
    }
    resp->next_page_token = n > size ? cm_page_token(call, 'r', PQgetvalue(r, take - 1, 0)) : (char *)"";
    PQclear(r);
    return 0;
}

static int proc__etag_ok(cm_call_t *call, proc_api_t *api, cm_pg_conn_t *c, const char *want, const char *have) {
    if (want && *want && strcmp(want, have) != 0) {
        cm_pg_rollback(c);
        cm_pg_release(api->pg, c);
        return cm_call_fail(call, CM_STATUS_FAILED_PRECONDITION,
                            "etag \"%s\" does not match the rule's current etag \"%s\": it changed since you read it", want, have);
    }
    return 0;
}

/* The id and the mask; the rule itself is validated once merged with the stored one. */
static int proc_update_rule_check(cm_call_t *call, ProtobufCMessage *req_) {
    const Iot__Processing__V1__UpdateRuleRequest *req = (const void *)req_;
    if (!req->rule) return cm_call_fail(call, CM_STATUS_INVALID_ARGUMENT, "rule is required");
    int rc = proc__check_id(call, "rule.id", req->rule->id);
    if (rc) return rc;
    static const char *const paths[] = {"name", "enabled", "devices", "metric", "threshold", "detector", "severity", "command", "webhook"};
    size_t np = req->update_mask ? req->update_mask->n_paths : 0;
    for (size_t i = 0; i < np; i++) {
        int known = 0;
        for (size_t k = 0; k < sizeof paths / sizeof paths[0]; k++) known |= strcmp(req->update_mask->paths[i], paths[k]) == 0;
        if (!known)
            return cm_call_fail(call, CM_STATUS_INVALID_ARGUMENT,
                                "update_mask: \"%s\" is not an updatable field (name, enabled, devices, metric, threshold, "
                                "detector, severity, command, webhook)",
                                req->update_mask->paths[i]);
    }
    return 0;
}

static int proc_update_rule(cm_call_t *call, const ProtobufCMessage *req_, ProtobufCMessage *resp_) {
    proc_api_t *api = proc__api(call);
    const Iot__Processing__V1__UpdateRuleRequest *req = (const void *)req_;
    int rc = proc_update_rule_check(call, (ProtobufCMessage *)req_);
    if (rc) return rc;
    SVC_RULE *in = req->rule;
    size_t np = req->update_mask ? req->update_mask->n_paths : 0;
    cm_pg_conn_t *c = proc__conn(call, api, &rc);
    if (!c) return rc;
    if (cm_pg_begin(c)) return proc__pg_fail(call, api, c);
    SVC_RULE *cur = NULL;
    rc = proc__get_rule(call, api, c, in->id, 1, &cur);
    if (rc) return rc;
    if ((rc = proc__etag_ok(call, api, c, in->etag, cur->etag))) return rc;
    SVC_RULE *next = cur;
    if (np == 0) {
        next = in;
    } else {
        for (size_t i = 0; i < np; i++) {
            const char *f = req->update_mask->paths[i];
            if (!strcmp(f, "name")) next->name = in->name;
            else if (!strcmp(f, "enabled")) next->enabled = in->enabled;
            else if (!strcmp(f, "devices")) next->devices = in->devices;
            else if (!strcmp(f, "metric")) next->metric = in->metric;
            else if (!strcmp(f, "severity")) next->severity = in->severity;
            else if (!strcmp(f, "command")) next->command = in->command;
            else if (!strcmp(f, "webhook")) next->webhook = in->webhook;
            else if (!strcmp(f, "threshold") || !strcmp(f, "detector")) {
                next->condition_case = in->condition_case;
                if (in->condition_case == IOT__PROCESSING__V1__RULE__CONDITION_THRESHOLD) next->threshold = in->threshold;
                else next->detector = in->detector;
            }
        }
    }
    if ((rc = proc__validate(call, next))) {
        cm_pg_rollback(c);
        cm_pg_release(api->pg, c);
        return rc;
    }
    SVC_RULE *out = NULL;
    rc = proc__write_rule(call, api, c, next, 0, &out);
    if (rc) return rc;
    *(SVC_RULE *)resp_ = *out;
    return 0;
}

static int proc_delete_rule_check(cm_call_t *call, ProtobufCMessage *req_) {
    const Iot__Processing__V1__DeleteRuleRequest *req = (const void *)req_;
    return proc__check_id(call, "id", req->id);
}

static int proc_delete_rule(cm_call_t *call, const ProtobufCMessage *req_, ProtobufCMessage *resp_) {
    (void)resp_;
    proc_api_t *api = proc__api(call);
    const Iot__Processing__V1__DeleteRuleRequest *req = (const void *)req_;
    int rc = proc_delete_rule_check(call, (ProtobufCMessage *)req_);
    if (rc) return rc;
    cm_pg_conn_t *c = proc__conn(call, api, &rc);
    if (!c) return rc;
    if (cm_pg_begin(c)) return proc__pg_fail(call, api, c);
    SVC_RULE *cur = NULL;
    if ((rc = proc__get_rule(call, api, c, req->id, 1, &cur))) return rc;
    if ((rc = proc__etag_ok(call, api, c, req->etag, cur->etag))) return rc;
    const char *p[1] = {req->id};
    if (cm_pg_exec(c, NULL, "DELETE FROM rules WHERE id = $1", 1, p) ||
        cm_pg_exec(c, NULL, "UPDATE rules_version SET v = v + 1", 0, NULL) || cm_pg_commit(c))
        return proc__pg_fail(call, api, c);
    cm_pg_release(api->pg, c);
    proc_rules_kick(api->rules);
    return 0;
}

static int proc_set_rule_enabled_check(cm_call_t *call, ProtobufCMessage *req_) {
    const Iot__Processing__V1__SetRuleEnabledRequest *req = (const void *)req_;
    return proc__check_id(call, "id", req->id);
}

static int proc_set_rule_enabled(cm_call_t *call, const ProtobufCMessage *req_, ProtobufCMessage *resp_) {
    proc_api_t *api = proc__api(call);
    const Iot__Processing__V1__SetRuleEnabledRequest *req = (const void *)req_;
    int rc = proc_set_rule_enabled_check(call, (ProtobufCMessage *)req_);
    if (rc) return rc;
    cm_pg_conn_t *c = proc__conn(call, api, &rc);
    if (!c) return rc;
    if (cm_pg_begin(c)) return proc__pg_fail(call, api, c);
    SVC_RULE *cur = NULL;
    if ((rc = proc__get_rule(call, api, c, req->id, 1, &cur))) return rc;
    cur->enabled = req->enabled;
    SVC_RULE *out = NULL;
    if ((rc = proc__write_rule(call, api, c, cur, 0, &out))) return rc;
    *(SVC_RULE *)resp_ = *out;
    return 0;
}

static int proc_get_rule_stats_check(cm_call_t *call, ProtobufCMessage *req_) {
    const Iot__Processing__V1__GetRuleStatsRequest *req = (const void *)req_;
    return proc__check_id(call, "rule_id", req->rule_id);
}

static int proc_get_rule_stats(cm_call_t *call, const ProtobufCMessage *req_, ProtobufCMessage *resp_) {
    proc_api_t *api = proc__api(call);
    const Iot__Processing__V1__GetRuleStatsRequest *req = (const void *)req_;
    Iot__Processing__V1__RuleStats *resp = (void *)resp_;
    int rc = proc_get_rule_stats_check(call, (ProtobufCMessage *)req_);
    if (rc) return rc;
    cm_pg_conn_t *c = proc__conn(call, api, &rc);
    if (!c) return rc;
    const char *p[1] = {req->rule_id};
    PGresult *r = NULL;
    if (cm_pg_exec(c, &r, "SELECT (SELECT count(*) FROM rules WHERE id = $1), (SELECT count(*) FROM alerts WHERE rule_id = $1)", 1, p))
        return proc__pg_fail(call, api, c);
    cm_pg_release(api->pg, c);
    int exists = atoi(PQgetvalue(r, 0, 0));
    resp->alerts_fired = atoll(PQgetvalue(r, 0, 1));
    PQclear(r);
    if (!exists) return cm_call_fail(call, CM_STATUS_NOT_FOUND, "rule \"%s\" not found", req->rule_id);
    resp->rule_id = cm_call_strdup(call, req->rule_id);
    char key[200], now[32], err[256];
    snprintf(key, sizeof key, "%smembers", api->cfg->redis_prefix);
    snprintf(now, sizeof now, "%" PRId64, cm_wall_ms());
    const char *zargv[] = {"ZRANGEBYSCORE", key, now, "+inf"};
    redisReply *m = cm_redis_pool_cmd(api->redis, (int)api->cfg->redis_timeout_ms, 4, zargv, NULL, err, sizeof err);
    if (!m) return cm_call_fail(call, CM_STATUS_UNAVAILABLE, "processing's Redis unavailable: %s", err);
    uint64_t cpu = 0;
    for (size_t i = 0; m->type == REDIS_REPLY_ARRAY && i < m->elements; i++) {
        snprintf(key, sizeof key, "%sstats:%s", api->cfg->redis_prefix, m->element[i]->str);
        const char *hargv[] = {"HGET", key, req->rule_id};
        redisReply *h = cm_redis_pool_cmd(api->redis, (int)api->cfg->redis_timeout_ms, 3, hargv, NULL, err, sizeof err);
        if (!h) {
            freeReplyObject(m);
            return cm_call_fail(call, CM_STATUS_UNAVAILABLE, "processing's Redis unavailable: %s", err);
        }
        unsigned long long ev = 0, ma = 0, cn = 0;
        long long wi = 0, me = 0;
        if (h->type == REDIS_REPLY_STRING && sscanf(h->str, "%llu %llu %lld %lld %llu", &ev, &ma, &wi, &me, &cn) == 5) {
            resp->evaluations += (int64_t)ev;
            resp->matches += (int64_t)ma;
            resp->windows += wi;
            resp->memory_bytes += me;
            cpu += cn;
        }
        freeReplyObject(h);
    }
    freeReplyObject(m);
    resp->cpu_seconds = (double)cpu / 1e9;
    return 0;
}

/* ---- alerts ------------------------------------------------------------------------------ */

#define PROC__ALERT_COLS                                                                                               \
    "a.id, a.rule_id, a.device_id, a.metric, a.severity, a.state, a.value, a.message, "                              \
    "(extract(epoch FROM a.fired_time) * 1000)::bigint, (extract(epoch FROM a.resolved_time) * 1000)::bigint, "       \
    "a.acknowledged, a.acknowledged_by, (extract(epoch FROM a.acknowledged_time) * 1000)::bigint, a.command_id"
/* The same columns from an event's snapshot (and the alert's static fields), then the event id. */
#define PROC__EVENT_COLS                                                                                               \
    "a.id, a.rule_id, a.device_id, a.metric, e.severity, e.state, e.value, a.message, "                              \
    "(extract(epoch FROM a.fired_time) * 1000)::bigint, (extract(epoch FROM e.resolved_time) * 1000)::bigint, "       \
    "e.acknowledged, e.acknowledged_by, (extract(epoch FROM e.acknowledged_time) * 1000)::bigint, e.command_id, e.event_id"

static Iot__Processing__V1__Alert *proc__alert_row(cm_call_t *call, PGresult *r, int i) {
    Iot__Processing__V1__Alert *a = cm_call_alloc(call, sizeof *a);
    iot__processing__v1__alert__init(a);
    a->id = cm_call_strdup(call, PQgetvalue(r, i, 0));
    a->rule_id = cm_call_strdup(call, PQgetvalue(r, i, 1));
    a->device_id = cm_call_strdup(call, PQgetvalue(r, i, 2));
    a->metric = cm_call_strdup(call, PQgetvalue(r, i, 3));
    a->severity = atoi(PQgetvalue(r, i, 4));
    a->state = atoi(PQgetvalue(r, i, 5));
    a->value = strtod(PQgetvalue(r, i, 6), NULL);
    a->message = cm_call_strdup(call, PQgetvalue(r, i, 7));
    a->fired_time = proc__ts(call, PQgetvalue(r, i, 8));
    a->resolved_time = proc__ts(call, PQgetvalue(r, i, 9));
    a->acknowledged = PQgetvalue(r, i, 10)[0] == 't';
    a->acknowledged_by = cm_call_strdup(call, PQgetvalue(r, i, 11));
    a->acknowledged_time = proc__ts(call, PQgetvalue(r, i, 12));
    a->command_id = cm_call_strdup(call, PQgetvalue(r, i, 13));
    if (PQnfields(r) > 14) a->event_id = cm_call_strdup(call, PQgetvalue(r, i, 14));
    return a;
}

/* Fills in the default page size. */
static int proc_list_alerts_check(cm_call_t *call, ProtobufCMessage *req_) {
    Iot__Processing__V1__ListAlertsRequest *req = (void *)req_;
    int size = 0, rc = proc__page_size(call, req->page_size, 100, 1000, &size);
    if (rc) return rc;
    req->page_size = size;
    if (req->state < 0 || req->state > IOT__PROCESSING__V1__ALERT_STATE__ALERT_STATE_RESOLVED)
        return cm_call_fail(call, CM_STATUS_INVALID_ARGUMENT, "state: not an AlertState");
    if (req->min_severity < 0 || req->min_severity > IOT__PROCESSING__V1__SEVERITY__SEVERITY_CRITICAL)
        return cm_call_fail(call, CM_STATUS_INVALID_ARGUMENT, "min_severity: not a Severity");
    if (*req->rule_id && (rc = proc__check_id(call, "rule_id", req->rule_id))) return rc;
    if (*req->device_id && !proc_rule_id_ok(req->device_id))
        return cm_call_fail(call, CM_STATUS_INVALID_ARGUMENT, "device_id: not a device id");
    if (req->fired_after && !proc__ts_ok(req->fired_after))
        return cm_call_fail(call, CM_STATUS_INVALID_ARGUMENT, "fired_after: " PROC__TS_RULE);
    char before[32] = "0";
    if (*req->page_token) {
        if ((rc = cm_page_token_parse_or_fail(call, req->page_token, 'a', before, sizeof before))) return rc;
        if (!proc__id(before)) return cm_call_fail(call, CM_STATUS_INVALID_ARGUMENT, "page_token: not a token this call issued");
    }
    return 0;
}

static int proc_list_alerts(cm_call_t *call, const ProtobufCMessage *req_, ProtobufCMessage *resp_) {
    proc_api_t *api = proc__api(call);
    const Iot__Processing__V1__ListAlertsRequest *req = (const void *)req_;
    Iot__Processing__V1__ListAlertsResponse *resp = (void *)resp_;
    int rc = proc_list_alerts_check(call, (ProtobufCMessage *)req_);
    if (rc) return rc;
    int size = req->page_size;
    char before[32] = "0";
    if (*req->page_token) cm_page_token_parse_or_fail(call, req->page_token, 'a', before, sizeof before); /* checked */
    cm_pg_conn_t *c = proc__conn(call, api, &rc);
    if (!c) return rc;
    char st[8], sev[8], lim[16], after[24];
    snprintf(st, sizeof st, "%d", req->state);
    snprintf(sev, sizeof sev, "%d", req->min_severity);
    snprintf(lim, sizeof lim, "%d", size + 1);
    snprintf(after, sizeof after, "%" PRId64, req->fired_after ? proc__ms(req->fired_after) : (int64_t)0);
    const char *p[7] = {req->rule_id, req->device_id, st, sev, before, lim, req->fired_after ? after : NULL};
    PGresult *r = NULL;
    if (cm_pg_exec(c, &r,
                   "SELECT " PROC__ALERT_COLS " FROM alerts AS a WHERE ($1 = '' OR a.rule_id = $1) AND ($2 = '' OR a.device_id = $2) "
                   "AND ($3::int = 0 OR a.state = $3::int) AND a.severity >= $4::int AND ($5::bigint = 0 OR a.id < $5::bigint) "
                   "AND ($7::bigint IS NULL OR a.fired_time >= to_timestamp($7::bigint / 1000.0)) "
                   "ORDER BY a.id DESC LIMIT $6",
                   7, p))
        return proc__pg_fail(call, api, c);
    cm_pg_release(api->pg, c);
    int n = PQntuples(r), take = n > size ? size : n;
    resp->alerts = cm_call_alloc(call, sizeof *resp->alerts * (size_t)(take + 1));
    for (int i = 0; i < take; i++) resp->alerts[resp->n_alerts++] = proc__alert_row(call, r, i);
    resp->next_page_token = n > size ? cm_page_token(call, 'a', PQgetvalue(r, take - 1, 0)) : (char *)"";
    PQclear(r);
    return 0;
}

static int proc__load_alert(cm_call_t *call, proc_api_t *api, const char *id, Iot__Processing__V1__Alert **out) {
    int rc;
    cm_pg_conn_t *c = proc__conn(call, api, &rc);
    if (!c) return rc;
    const char *p[1] = {id};
    PGresult *r = NULL;
    if (cm_pg_exec(c, &r, "SELECT " PROC__ALERT_COLS " FROM alerts AS a WHERE a.id = $1::bigint", 1, p)) return proc__pg_fail(call, api, c);
    cm_pg_release(api->pg, c);
    if (PQntuples(r) == 0) {
        PQclear(r);
        return cm_call_fail(call, CM_STATUS_NOT_FOUND, "alert %s not found", id);
    }
    *out = proc__alert_row(call, r, 0);
    PQclear(r);
    return 0;
}

static int proc_get_alert_check(cm_call_t *call, ProtobufCMessage *req_) {
    const Iot__Processing__V1__GetAlertRequest *req = (const void *)req_;
    if (!proc__id(req->id)) return cm_call_fail(call, CM_STATUS_INVALID_ARGUMENT, "id: an alert id (a positive integer) is required");
    return 0;
}

static int proc_get_alert(cm_call_t *call, const ProtobufCMessage *req_, ProtobufCMessage *resp_) {
    const Iot__Processing__V1__GetAlertRequest *req = (const void *)req_;
    int rc = proc_get_alert_check(call, (ProtobufCMessage *)req_);
    if (rc) return rc;
    Iot__Processing__V1__Alert *a = NULL;
    rc = proc__load_alert(call, proc__api(call), req->id, &a);
    if (rc) return rc;
    *(Iot__Processing__V1__Alert *)resp_ = *a;
    return 0;
}

static int proc_ack_alert_check(cm_call_t *call, ProtobufCMessage *req_) {
    const Iot__Processing__V1__AckAlertRequest *req = (const void *)req_;
    if (!proc__id(req->id)) return cm_call_fail(call, CM_STATUS_INVALID_ARGUMENT, "id: an alert id (a positive integer) is required");
    size_t bl = strlen(req->by);
    int ok = bl > 0 && bl <= 200;
    for (size_t i = 0; ok && i < bl; i++) ok = (unsigned char)req->by[i] >= 0x20 && req->by[i] != 0x7f;
    if (!ok) return cm_call_fail(call, CM_STATUS_INVALID_ARGUMENT, "by: who acknowledges is required (1-200 printable characters)");
    return 0;
}

static int proc_ack_alert(cm_call_t *call, const ProtobufCMessage *req_, ProtobufCMessage *resp_) {
    proc_api_t *api = proc__api(call);
    const Iot__Processing__V1__AckAlertRequest *req = (const void *)req_;
    int rc = proc_ack_alert_check(call, (ProtobufCMessage *)req_);
    if (rc) return rc;
    cm_pg_conn_t *c = proc__conn(call, api, &rc);
    if (!c) return rc;
    const char *p[2] = {req->id, req->by};
    PGresult *r = NULL;
    if (cm_pg_begin(c) ||
        cm_pg_exec(c, &r,
                   "UPDATE alerts SET acknowledged = true, acknowledged_by = $2, acknowledged_time = now() "
                   "WHERE id = $1::bigint AND NOT acknowledged RETURNING id",
                   2, p))
        return proc__pg_fail(call, api, c);
    int changed = PQntuples(r);
    PQclear(r);
    if (changed && cm_pg_exec(c, NULL, "SELECT alert_event($1::bigint, 4::smallint)", 1, p)) return proc__pg_fail(call, api, c);
    if (cm_pg_commit(c)) return proc__pg_fail(call, api, c);
    cm_pg_release(api->pg, c);
    Iot__Processing__V1__Alert *a = NULL;
    if ((rc = proc__load_alert(call, api, req->id, &a))) return rc;
    *(Iot__Processing__V1__Alert *)resp_ = *a;
    return 0;
}

/* ---- WatchAlerts ------------------------------------------------------------------------- */

/* One poll: every event after the lowest watcher cursor, fanned out. Returns the next sleep. */
static int64_t proc__poll(void *arg) {
    proc_api_t *api = arg;
    pthread_mutex_lock(&api->mu);
    size_t nw = api->nw;
    int64_t from = INT64_MAX;
    for (size_t i = 0; i < nw; i++)
        if (api->w[i].cursor < from) from = api->w[i].cursor;
    pthread_mutex_unlock(&api->mu);
    if (!nw) return PROC__IDLE_POLL_MS;
    cm_pg_conn_t *c = cm_pg_acquire(api->pg, 1000);
    if (!c) return api->cfg->watch_poll_ms * 10;
    char f[32];
    snprintf(f, sizeof f, "%" PRId64, from);
    const char *p[1] = {f};
    PGresult *r = NULL;
    int rc = cm_pg_exec(c, &r,
                        "SELECT " PROC__EVENT_COLS " FROM alert_events AS e JOIN alerts AS a ON a.id = e.alert_id "
                        "WHERE e.event_id > $1::bigint ORDER BY e.event_id LIMIT 1000",
                        1, p);
    cm_pg_release(api->pg, c);
    if (rc) return api->cfg->watch_poll_ms * 10;
    int n = PQntuples(r);
    pthread_mutex_lock(&api->mu);
    for (int i = 0; i < n; i++) {
        int64_t ev = strtoll(PQgetvalue(r, i, 14), NULL, 10);
        int sev = atoi(PQgetvalue(r, i, 4));
        Iot__Processing__V1__Alert a = IOT__PROCESSING__V1__ALERT__INIT;
        Google__Protobuf__Timestamp ft = GOOGLE__PROTOBUF__TIMESTAMP__INIT, rt = GOOGLE__PROTOBUF__TIMESTAMP__INIT,
                                    at = GOOGLE__PROTOBUF__TIMESTAMP__INIT;
        a.id = PQgetvalue(r, i, 0);
        a.rule_id = PQgetvalue(r, i, 1);
        a.device_id = PQgetvalue(r, i, 2);
        a.metric = PQgetvalue(r, i, 3);
        a.severity = sev;
        a.state = atoi(PQgetvalue(r, i, 5));
        a.value = strtod(PQgetvalue(r, i, 6), NULL);
        a.message = PQgetvalue(r, i, 7);
        a.fired_time = proc__ts_fill(&ft, PQgetvalue(r, i, 8)) ? &ft : NULL;
        a.resolved_time = proc__ts_fill(&rt, PQgetvalue(r, i, 9)) ? &rt : NULL;
        a.acknowledged = PQgetvalue(r, i, 10)[0] == 't';
        a.acknowledged_by = PQgetvalue(r, i, 11);
        a.acknowledged_time = proc__ts_fill(&at, PQgetvalue(r, i, 12)) ? &at : NULL;
        a.command_id = PQgetvalue(r, i, 13);
        a.event_id = PQgetvalue(r, i, 14);
        for (size_t k = 0; k < api->nw; k++) {
            proc__watcher_t *w = &api->w[k];
            /* A watcher that joined during the query with an older cursor than `from` was not
             * asked for: advancing it here would skip the events between its cursor and `from`.
             * The next poll starts from its cursor. */
            if (ev <= w->cursor || w->cursor < from) continue;
            w->cursor = ev;
            if (sev < w->min_severity) continue;
            int s = cm_call_send(w->call, &a.base);
            if (s == CM_EFULL) {
                char msg[160];
                snprintf(msg, sizeof msg, "watcher stopped reading; resume with after_event_id=%" PRId64, ev - 1);
                cm_call_abort(w->call, CM_STATUS_RESOURCE_EXHAUSTED, msg);
                w->cursor = INT64_MAX; /* leaves at `done` */
            }
        }
    }
    pthread_mutex_unlock(&api->mu);
    PQclear(r);
    /* A full page: more is waiting, go again at once. */
    return n == 1000 ? 0 : api->cfg->watch_poll_ms;
}

static int proc_watch_alerts_check(cm_call_t *call, ProtobufCMessage *req_) {
    const Iot__Processing__V1__WatchAlertsRequest *req = (const void *)req_;
    if (req->min_severity < 0 || req->min_severity > IOT__PROCESSING__V1__SEVERITY__SEVERITY_CRITICAL)
        return cm_call_fail(call, CM_STATUS_INVALID_ARGUMENT, "min_severity: not a Severity");
    if (*req->after_event_id && !proc__id(req->after_event_id) && strcmp(req->after_event_id, "0") != 0)
        return cm_call_fail(call, CM_STATUS_INVALID_ARGUMENT, "after_event_id: an event id (a non-negative integer) or empty");
    return 0;
}

static int proc_watch_alerts(cm_call_t *call, const ProtobufCMessage *req_) {
    proc_api_t *api = proc__api(call);
    const Iot__Processing__V1__WatchAlertsRequest *req = (const void *)req_;
    int rc = proc_watch_alerts_check(call, (ProtobufCMessage *)req_);
    if (rc) return rc;
    int64_t cursor;
    if (*req->after_event_id) {
        cursor = proc__id(req->after_event_id);
    } else {
        int rc;
        cm_pg_conn_t *c = proc__conn(call, api, &rc);
        if (!c) return rc;
        PGresult *r = NULL;
        if (cm_pg_exec(c, &r, "SELECT v FROM event_counter", 0, NULL)) return proc__pg_fail(call, api, c);
        cm_pg_release(api->pg, c);
        cursor = strtoll(PQgetvalue(r, 0, 0), NULL, 10);
        PQclear(r);
    }
    pthread_mutex_lock(&api->mu);
    if (api->closing) {
        pthread_mutex_unlock(&api->mu);
        return cm_call_fail(call, CM_STATUS_UNAVAILABLE, "processing is shutting down; watch again elsewhere");
    }
    if (api->nw == api->capw) api->w = cm_realloc(api->w, (api->capw = api->capw ? api->capw * 2 : 16) * sizeof *api->w);
    cm_call_ref(call);
    api->w[api->nw++] = (proc__watcher_t){call, cursor, req->min_severity};
    cm_gauge_set(api->g_watchers, (double)api->nw);
    cm_call_set_user(call, api);
    pthread_mutex_unlock(&api->mu);
    cm_loop_kick(api->poller);
    return CM_PENDING;
}

static void proc_watch_done(cm_call_t *call, int cancelled) {
    (void)cancelled;
    proc_api_t *api = cm_call_user(call);
    if (!api) return;
    pthread_mutex_lock(&api->mu);
    for (size_t i = 0; i < api->nw; i++)
        if (api->w[i].call == call) {
            api->w[i] = api->w[--api->nw];
            break;
        }
    cm_gauge_set(api->g_watchers, (double)api->nw);
    pthread_mutex_unlock(&api->mu);
    cm_call_unref(call);
}

/* ---- rollups and window statistics -------------------------------------------------------- */

/* Fills in the default resolution and page size. */
static int proc_query_rollups_check(cm_call_t *call, ProtobufCMessage *req_) {
    Iot__Processing__V1__QueryRollupsRequest *req = (void *)req_;
    if (!proc_rule_id_ok(req->device_id)) return cm_call_fail(call, CM_STATUS_INVALID_ARGUMENT, "device_id is required");
    if (!proc_metric_ok(req->metric))
        return cm_call_fail(call, CM_STATUS_INVALID_ARGUMENT, "metric is required: 1..128 characters of [A-Za-z0-9_.:/-]");
    int64_t res = req->resolution_ms ? req->resolution_ms : 60000;
    if (res != 60000 && res != 3600000)
        return cm_call_fail(call, CM_STATUS_INVALID_ARGUMENT, "resolution_ms: 60000 (1 minute) or 3600000 (1 hour)");
    if (req->from && !proc__ts_ok(req->from)) return cm_call_fail(call, CM_STATUS_INVALID_ARGUMENT, "from: " PROC__TS_RULE);
    if (req->to && !proc__ts_ok(req->to)) return cm_call_fail(call, CM_STATUS_INVALID_ARGUMENT, "to: " PROC__TS_RULE);
    if (!req->from || !req->to || proc__ms(req->from) >= proc__ms(req->to))
        return cm_call_fail(call, CM_STATUS_INVALID_ARGUMENT, "from and to are required, from before to");
    int size = 0, rc = proc__page_size(call, req->page_size, 1000, 10000, &size);
    if (rc) return rc;
    char after[32] = "";
    if (*req->page_token && (rc = cm_page_token_parse_or_fail(call, req->page_token, 'b', after, sizeof after))) return rc;
    req->resolution_ms = res;
    req->page_size = size;
    return 0;
}

static int proc_query_rollups(cm_call_t *call, const ProtobufCMessage *req_, ProtobufCMessage *resp_) {
    proc_api_t *api = proc__api(call);
    const Iot__Processing__V1__QueryRollupsRequest *req = (const void *)req_;
    Iot__Processing__V1__QueryRollupsResponse *resp = (void *)resp_;
    int rc = proc_query_rollups_check(call, (ProtobufCMessage *)req_);
    if (rc) return rc;
    int64_t res = req->resolution_ms;
    int size = req->page_size;
    char after[32] = "";
    if (*req->page_token) cm_page_token_parse_or_fail(call, req->page_token, 'b', after, sizeof after); /* checked */
    char sres[16], from[32], to[32], lim[16];
    snprintf(sres, sizeof sres, "%" PRId64, res);
    snprintf(from, sizeof from, "%" PRId64, proc__ms(req->from));
    snprintf(to, sizeof to, "%" PRId64, proc__ms(req->to));
    snprintf(lim, sizeof lim, "%d", size + 1);
    if (!*after) snprintf(after, sizeof after, "%" PRId64, INT64_MIN);
    cm_pg_conn_t *c = proc__conn(call, api, &rc);
    if (!c) return rc;
    const char *p[7] = {req->device_id, req->metric, sres, from, to, after, lim};
    PGresult *r = NULL;
    if (cm_pg_exec(c, &r,
                   "SELECT bucket_ms, count, min, max, sum, last FROM rollups WHERE device_id = $1 AND metric = $2 "
                   "AND res_ms = $3::int AND bucket_ms >= $4::bigint AND bucket_ms < $5::bigint AND bucket_ms > $6::bigint "
                   "ORDER BY bucket_ms LIMIT $7",
                   7, p))
        return proc__pg_fail(call, api, c);
    cm_pg_release(api->pg, c);
    int n = PQntuples(r), take = n > size ? size : n;
    resp->rollups = cm_call_alloc(call, sizeof *resp->rollups * (size_t)(take + 1));
    for (int i = 0; i < take; i++) {
        Iot__Processing__V1__Rollup *x = cm_call_alloc(call, sizeof *x);
        iot__processing__v1__rollup__init(x);
        x->device_id = req->device_id;
        x->metric = req->metric;
        x->start_time = proc__ts(call, PQgetvalue(r, i, 0));
        x->count = atoll(PQgetvalue(r, i, 1));
        x->min = strtod(PQgetvalue(r, i, 2), NULL);
        x->max = strtod(PQgetvalue(r, i, 3), NULL);
        x->sum = strtod(PQgetvalue(r, i, 4), NULL);
        x->last = strtod(PQgetvalue(r, i, 5), NULL);
        resp->rollups[resp->n_rollups++] = x;
    }
    resp->next_page_token = n > size ? cm_page_token(call, 'b', PQgetvalue(r, take - 1, 0)) : (char *)"";
    PQclear(r);
    return 0;
}

static int proc_get_window_stats_check(cm_call_t *call, ProtobufCMessage *req_) {
    const Iot__Processing__V1__GetWindowStatsRequest *req = (const void *)req_;
    int rc = proc__check_id(call, "rule_id", req->rule_id);
    if (rc) return rc;
    if (!proc_rule_id_ok(req->device_id)) return cm_call_fail(call, CM_STATUS_INVALID_ARGUMENT, "device_id is required");
    return 0;
}

static int proc_get_window_stats(cm_call_t *call, const ProtobufCMessage *req_, ProtobufCMessage *resp_) {
    proc_api_t *api = proc__api(call);
    const Iot__Processing__V1__GetWindowStatsRequest *req = (const void *)req_;
    int rc = proc_get_window_stats_check(call, (ProtobufCMessage *)req_);
    if (rc) return rc;
    cm_pg_conn_t *c = proc__conn(call, api, &rc);
    if (!c) return rc;
    SVC_RULE *rule = NULL;
    if ((rc = proc__get_rule(call, api, c, req->rule_id, 0, &rule))) return rc;
    cm_pg_release(api->pg, c);
    int windowed = (rule->condition_case == IOT__PROCESSING__V1__RULE__CONDITION_THRESHOLD && rule->threshold &&
                    rule->threshold->statistic != IOT__PROCESSING__V1__STATISTIC__STATISTIC_VALUE) ||
                   (rule->condition_case == IOT__PROCESSING__V1__RULE__CONDITION_DETECTOR && rule->detector &&
                    rule->detector->kind == IOT__PROCESSING__V1__DETECTOR_KIND__DETECTOR_KIND_ZSCORE);
    if (!windowed)
        return cm_call_fail(call, CM_STATUS_FAILED_PRECONDITION,
                            "rule \"%s\" keeps no window (a threshold on each value, or a stuck/rate/absence detector)", req->rule_id);
    char key[400], err[256];
    snprintf(key, sizeof key, "%swin:%s:%s", api->cfg->redis_prefix, req->rule_id, req->device_id);
    const char *argv[] = {"GET", key};
    redisReply *r = cm_redis_pool_cmd(api->redis, (int)api->cfg->redis_timeout_ms, 2, argv, NULL, err, sizeof err);
    if (!r) return cm_call_fail(call, CM_STATUS_UNAVAILABLE, "processing's Redis unavailable: %s", err);
    if (r->type != REDIS_REPLY_STRING) {
        freeReplyObject(r);
        return cm_call_fail(call, CM_STATUS_NOT_FOUND,
                            "no statistics published yet for device \"%s\" under rule \"%s\" (the window needs min_samples points)",
                            req->device_id, req->rule_id);
    }
    Iot__Processing__V1__WindowStats *ws =
        iot__processing__v1__window_stats__unpack(cm_call_pb_allocator(call), r->len, (const uint8_t *)r->str);
    freeReplyObject(r);
    if (!ws) return cm_call_fail(call, CM_STATUS_INTERNAL, "published statistics do not parse");
    *(Iot__Processing__V1__WindowStats *)resp_ = *ws;
    return 0;
}

/* ---- the service ------------------------------------------------------------------------- */

static const cm_method_t proc__methods[] = {
    {.name = "CreateRule", .kind = CM_RPC_UNARY, .unary = proc_create_rule, .check = proc_create_rule_check},
    {.name = "GetRule", .kind = CM_RPC_UNARY, .unary = proc_get_rule, .check = proc_get_rule_check},
    {.name = "ListRules", .kind = CM_RPC_UNARY, .unary = proc_list_rules, .check = proc_list_rules_check},
    {.name = "UpdateRule", .kind = CM_RPC_UNARY, .unary = proc_update_rule, .check = proc_update_rule_check},
    {.name = "DeleteRule", .kind = CM_RPC_UNARY, .unary = proc_delete_rule, .check = proc_delete_rule_check},
    {.name = "SetRuleEnabled", .kind = CM_RPC_UNARY, .unary = proc_set_rule_enabled, .check = proc_set_rule_enabled_check},
    {.name = "GetRuleStats", .kind = CM_RPC_UNARY, .unary = proc_get_rule_stats, .check = proc_get_rule_stats_check},
    {.name = "ListAlerts", .kind = CM_RPC_UNARY, .unary = proc_list_alerts, .check = proc_list_alerts_check},
    {.name = "GetAlert", .kind = CM_RPC_UNARY, .unary = proc_get_alert, .check = proc_get_alert_check},
    {.name = "AckAlert", .kind = CM_RPC_UNARY, .unary = proc_ack_alert, .check = proc_ack_alert_check},
    {.name = "WatchAlerts", .kind = CM_RPC_SERVER_STREAM, .start = proc_watch_alerts, .done = proc_watch_done,
     .check = proc_watch_alerts_check},
    {.name = "QueryRollups", .kind = CM_RPC_UNARY, .unary = proc_query_rollups, .check = proc_query_rollups_check},
    {.name = "GetWindowStats", .kind = CM_RPC_UNARY, .unary = proc_get_window_stats, .check = proc_get_window_stats_check},
};

proc_api_t *proc_api_new(const proc_config_t *cfg, cm_pg_t *pg, cm_redis_pool_t *redis, proc_rules_t *rules) {
    proc_api_t *api = cm_calloc(1, sizeof *api);
    api->cfg = cfg;
    api->pg = pg;
    api->redis = redis;
    api->rules = rules;
    pthread_mutex_init(&api->mu, NULL);
    api->g_watchers = cm_metrics_gauge("processing_alert_watchers", "open WatchAlerts streams", NULL);
    api->poller = cm_loop_start(proc__poll, api, 0);
    return api;
}

void proc_api_alerts_changed(void *api) { cm_loop_kick(((proc_api_t *)api)->poller); }

void proc_api_service(proc_api_t *api, cm_service_t *svc) {
    svc->desc = &iot__processing__v1__processing__descriptor;
    svc->methods = proc__methods;
    svc->n_methods = sizeof proc__methods / sizeof proc__methods[0];
    svc->ctx = api;
}

void proc_api_shutdown(void *arg) {
    proc_api_t *api = arg;
    pthread_mutex_lock(&api->mu);
    api->closing = 1;
    for (size_t i = 0; i < api->nw; i++)
        cm_call_abort(api->w[i].call, CM_STATUS_UNAVAILABLE, "processing is shutting down; resume with after_event_id");
    pthread_mutex_unlock(&api->mu);
}

void proc_api_free(proc_api_t *api) {
    if (!api) return;
    cm_loop_stop(api->poller);
    cm_free(api->w);
    pthread_mutex_destroy(&api->mu);
    cm_free(api);
}
