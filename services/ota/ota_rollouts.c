/* Rollout handlers: create (validated against the artifact and device-mgmt), read with per-stage
 * counts, the operator's state changes, and the per-device list. The controller that moves
 * rollouts is in ota_controller.c. */
#include <inttypes.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cm_alloc.h"
#include "cm_buf.h"
#include "cm_log.h"
#include "cm_page.h"
#include "ota_rollouts.h"
#include "ota_semver.h"

#define OTA__MAX_STAGES 20
#define OTA__WEEK_MS (7LL * 24 * 3600 * 1000)

static const char *const ota__state_names[] = {"UNSPECIFIED", "DRAFT", "RUNNING", "PAUSED", "COMPLETED", "CANCELLED"};

static const char *ota__state_name(int s) { return s >= 0 && s <= OTA_CANCELLED ? ota__state_names[s] : "UNKNOWN"; }

#define OTA__ROLLOUT_COLS                                                                                              \
    "r.id, r.name, coalesce(r.artifact_id::text, ''), r.group_id, r.model, r.label_selector, r.version_range, "       \
    "r.allow_downgrade, r.gate_enabled, r.gate_max_ratio, r.gate_min_alerts, r.gate_min_severity, r.state, "         \
    "r.current_stage, r.pause_reason, r.version, (extract(epoch FROM r.create_time) * 1000)::bigint, "                \
    "(extract(epoch FROM r.update_time) * 1000)::bigint"

static int ota__b(PGresult *r, int row, int col) { return PQgetvalue(r, row, col)[0] == 't'; }

/* The rollout id (a row of OTA__ROLLOUT_COLS) with its stages and their counts, in the call arena.
 * NULL when the queries fail (the connection is still the caller's). */
#define OTA__SNAPSHOT "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY"

static Iot__Ota__V1__Rollout *ota__rollout_build(cm_call_t *call, cm_pg_conn_t *c, PGresult *r, int row) {
    Iot__Ota__V1__Rollout *o = cm_call_alloc(call, sizeof *o);
    iot__ota__v1__rollout__init(o);
    Iot__Ota__V1__RolloutTarget *t = cm_call_alloc(call, sizeof *t);
    iot__ota__v1__rollout_target__init(t);
    Iot__Ota__V1__TelemetryGate *g = cm_call_alloc(call, sizeof *g);
    iot__ota__v1__telemetry_gate__init(g);
    o->id = cm_call_strdup(call, PQgetvalue(r, row, 0));
    o->name = cm_call_strdup(call, PQgetvalue(r, row, 1));
    o->artifact_id = cm_call_strdup(call, PQgetvalue(r, row, 2));
    t->group_id = cm_call_strdup(call, PQgetvalue(r, row, 3));
    t->model = cm_call_strdup(call, PQgetvalue(r, row, 4));
    t->label_selector = cm_call_strdup(call, PQgetvalue(r, row, 5));
    t->version_range = cm_call_strdup(call, PQgetvalue(r, row, 6));
    o->target = t;
    o->allow_downgrade = ota__b(r, row, 7);
    g->enabled = ota__b(r, row, 8);
    g->max_ratio = strtod(PQgetvalue(r, row, 9), NULL);
    g->min_alerts = atoi(PQgetvalue(r, row, 10));
    g->min_severity = atoi(PQgetvalue(r, row, 11));
    o->gate = g;
    o->state = atoi(PQgetvalue(r, row, 12));
    o->current_stage = atoi(PQgetvalue(r, row, 13));
    o->pause_reason = cm_call_strdup(call, PQgetvalue(r, row, 14));
    o->etag = cm_call_strdup(call, PQgetvalue(r, row, 15));
    o->create_time = ota__ts(call, PQgetvalue(r, row, 16));
    o->update_time = ota__ts(call, PQgetvalue(r, row, 17));

    const char *p[1] = {o->id};
    PGresult *s = NULL, *n = NULL;
    if (cm_pg_exec(c, &s,
                   "SELECT idx, percent, count, success_threshold, error_threshold, soak_ms, manual_approval, state, "
                   "(extract(epoch FROM start_time) * 1000)::bigint, (extract(epoch FROM soak_until) * 1000)::bigint "
                   "FROM rollout_stages WHERE rollout_id = $1::bigint ORDER BY idx",
                   1, p) ||
        cm_pg_exec(c, &n, "SELECT stage, phase, count(*) FROM device_updates WHERE rollout_id = $1::bigint GROUP BY 1, 2", 1, p)) {
        PQclear(s);
        return NULL;
    }
    int ns = PQntuples(s);
    o->stages = cm_call_alloc(call, sizeof *o->stages * (size_t)(ns + 1));
    o->stage_status = cm_call_alloc(call, sizeof *o->stage_status * (size_t)(ns + 1));
    for (int i = 0; i < ns; i++) {
        Iot__Ota__V1__Stage *st = cm_call_alloc(call, sizeof *st);
        iot__ota__v1__stage__init(st);
        st->percent = strtod(PQgetvalue(s, i, 1), NULL);
        st->count = atoi(PQgetvalue(s, i, 2));
        st->success_threshold = strtod(PQgetvalue(s, i, 3), NULL);
        st->error_threshold = strtod(PQgetvalue(s, i, 4), NULL);
        st->soak_ms = strtoll(PQgetvalue(s, i, 5), NULL, 10);
        st->manual_approval = ota__b(s, i, 6);
        o->stages[o->n_stages++] = st;
        Iot__Ota__V1__StageStatus *ss = cm_call_alloc(call, sizeof *ss);
        iot__ota__v1__stage_status__init(ss);
        ss->stage = st;
        ss->index = i;
        ss->state = cm_call_strdup(call, PQgetvalue(s, i, 7));
        ss->start_time = ota__ts(call, PQgetvalue(s, i, 8));
        ss->soak_until = ota__ts(call, PQgetvalue(s, i, 9));
        o->stage_status[o->n_stage_status++] = ss;
    }
    for (int i = 0; i < PQntuples(n); i++) {
        int stage = atoi(PQgetvalue(n, i, 0)), phase = atoi(PQgetvalue(n, i, 1)), k = atoi(PQgetvalue(n, i, 2));
        if (stage < 0 || stage >= ns) continue;
        Iot__Ota__V1__StageStatus *ss = o->stage_status[stage];
        ss->devices += k;
        switch (phase) {
        case OTA_PENDING: ss->pending += k; break;
        case OTA_OFFERED: ss->offered += k; break;
        case OTA_DOWNLOADING: ss->downloading += k; break;
        case OTA_VERIFYING: ss->verifying += k; break;
        case OTA_INSTALLING: ss->installing += k; break;
        case OTA_SUCCEEDED: ss->succeeded += k; break;
        case OTA_FAILED: ss->failed += k; break;
        case OTA_ROLLED_BACK: ss->rolled_back += k; break;
        default: break;
        }
    }
    PQclear(s);
    PQclear(n);
    return o;
}

/* Loads rollout id into *out. 0, or the status the call was failed with (NOT_FOUND, ...). */
/* Reads and releases c. The rollout, its stages and their counts are three statements: they read
 * one snapshot, or a stage just started by the controller could show its devices while still
 * "waiting". The read-only transaction ends when the connection is released (rolled back). */
static int ota__rollout_load_or_fail(cm_call_t *call, ota_ctx_t *ctx, cm_pg_conn_t *c, const char *id, Iot__Ota__V1__Rollout **out) {
    const char *p[1] = {id};
    PGresult *r = NULL;
    if (cm_pg_exec(c, NULL, OTA__SNAPSHOT, 0, NULL)) return ota__pg_fail(call, ctx, c);
    if (cm_pg_exec(c, &r, "SELECT " OTA__ROLLOUT_COLS " FROM rollouts AS r WHERE r.id = $1::bigint", 1, p)) return ota__pg_fail(call, ctx, c);
    if (PQntuples(r) == 0) {
        PQclear(r);
        cm_pg_release(ctx->pg, c);
        return cm_call_fail(call, CM_STATUS_NOT_FOUND, "no rollout %s", id);
    }
    *out = ota__rollout_build(call, c, r, 0);
    PQclear(r);
    if (!*out) return ota__pg_fail(call, ctx, c);
    cm_pg_release(ctx->pg, c);
    return 0;
}

/* ---- create -------------------------------------------------------------------------------- */

static int ota__stages_or_fail(cm_call_t *call, const Iot__Ota__V1__Rollout *ro) {
    if (ro->n_stages == 0 || ro->n_stages > OTA__MAX_STAGES)
        return cm_call_fail(call, CM_STATUS_INVALID_ARGUMENT, "rollout.stages: 1-%d stages", OTA__MAX_STAGES);
    double last_pct = 0;
    int last_count = 0;
    for (size_t i = 0; i < ro->n_stages; i++) {
        const Iot__Ota__V1__Stage *s = ro->stages[i];
        int has_pct = s->percent != 0, has_count = s->count != 0;
        if (has_pct == has_count)
            return cm_call_fail(call, CM_STATUS_INVALID_ARGUMENT, "rollout.stages[%zu]: set exactly one of percent and count", i);
        if (has_pct && !(s->percent > 0 && s->percent <= 100))
            return cm_call_fail(call, CM_STATUS_INVALID_ARGUMENT, "rollout.stages[%zu].percent: in (0, 100]", i);
        if (has_count && s->count < 0) return cm_call_fail(call, CM_STATUS_INVALID_ARGUMENT, "rollout.stages[%zu].count: > 0", i);
        if ((has_pct && s->percent < last_pct) || (has_count && s->count < last_count))
            return cm_call_fail(call, CM_STATUS_INVALID_ARGUMENT,
                                "rollout.stages[%zu]: sizes are cumulative and must not shrink", i);
        if (has_pct) last_pct = s->percent;
        if (has_count) last_count = s->count;
        if (s->success_threshold < 0 || s->success_threshold > 1 || s->error_threshold < 0 || s->error_threshold > 1 ||
            !isfinite(s->success_threshold) || !isfinite(s->error_threshold))
            return cm_call_fail(call, CM_STATUS_INVALID_ARGUMENT,
                                "rollout.stages[%zu]: success_threshold and error_threshold are shares in [0, 1] (0: default)", i);
        if (s->soak_ms < 0 || s->soak_ms > OTA__WEEK_MS)
            return cm_call_fail(call, CM_STATUS_INVALID_ARGUMENT, "rollout.stages[%zu].soak_ms: 0 to 7 days", i);
    }
    if (ro->stages[ro->n_stages - 1]->percent != 100)
        return cm_call_fail(call, CM_STATUS_INVALID_ARGUMENT, "rollout.stages: the last stage must be percent 100 (the whole target)");
    return 0;
}

int ota_create_rollout_check(cm_call_t *call, ProtobufCMessage *req_) {
    const Iot__Ota__V1__CreateRolloutRequest *req = (const void *)req_;
    const Iot__Ota__V1__Rollout *ro = req->rollout;
    if (!ro) return cm_call_fail(call, CM_STATUS_INVALID_ARGUMENT, "rollout is required");
    size_t nl = strlen(ro->name);
    if (nl == 0 || nl > 200) return cm_call_fail(call, CM_STATUS_INVALID_ARGUMENT, "rollout.name: 1-200 characters");
    if (!ota__id(ro->artifact_id)) return cm_call_fail(call, CM_STATUS_INVALID_ARGUMENT, "rollout.artifact_id: an artifact id");
    const Iot__Ota__V1__RolloutTarget *t = ro->target;
    Iot__Ota__V1__RolloutTarget empty = IOT__OTA__V1__ROLLOUT_TARGET__INIT;
    if (!t) t = &empty;
    if (strlen(t->group_id) > 128 || strlen(t->model) > 64 || strlen(t->label_selector) > 1024)
        return cm_call_fail(call, CM_STATUS_INVALID_ARGUMENT, "rollout.target: group_id up to 128, model up to 64, label_selector up to 1024 characters");
    if (ota_semver_range_check(t->version_range))
        return cm_call_fail(call, CM_STATUS_INVALID_ARGUMENT,
                            "rollout.target.version_range: comparators (=, !=, >, >=, <, <=) on semantic versions separated by spaces, e.g. \">=1.0.0 <2.0.0\"");
    int rc = ota__stages_or_fail(call, ro);
    if (rc) return rc;
    Iot__Ota__V1__TelemetryGate dg = IOT__OTA__V1__TELEMETRY_GATE__INIT;
    const Iot__Ota__V1__TelemetryGate *g = ro->gate ? ro->gate : &dg;
    if (g->max_ratio < 0 || !isfinite(g->max_ratio) || g->min_alerts < 0 || g->min_severity < 0 || g->min_severity > 4)
        return cm_call_fail(call, CM_STATUS_INVALID_ARGUMENT, "rollout.gate: max_ratio >= 0, min_alerts >= 0, min_severity 0..4");
    return 0;
}

int ota_create_rollout(cm_call_t *call, const ProtobufCMessage *req_, ProtobufCMessage *resp_) {
    ota_ctx_t *ctx = cm_call_service_ctx(call);
    const Iot__Ota__V1__CreateRolloutRequest *req = (const void *)req_;
    const Iot__Ota__V1__Rollout *ro = req->rollout;
    int rc = ota_create_rollout_check(call, (ProtobufCMessage *)req_);
    if (rc) return rc;
    const Iot__Ota__V1__RolloutTarget *t = ro->target;
    Iot__Ota__V1__RolloutTarget empty = IOT__OTA__V1__ROLLOUT_TARGET__INIT;
    if (!t) t = &empty;
    Iot__Ota__V1__TelemetryGate dg = IOT__OTA__V1__TELEMETRY_GATE__INIT;
    const Iot__Ota__V1__TelemetryGate *g = ro->gate ? ro->gate : &dg;

    cm_pg_conn_t *c = ota__conn_or_fail(call, ctx, &rc);
    if (!c) return rc;
    const char *ap[1] = {ro->artifact_id};
    PGresult *a = NULL;
    if (cm_pg_exec(c, &a, "SELECT array_to_json(models)::text FROM artifacts WHERE id = $1::bigint AND manifest IS NOT NULL", 1, ap))
        return ota__pg_fail(call, ctx, c);
    int found = PQntuples(a) > 0;
    PQclear(a);
    if (!found) {
        cm_pg_release(ctx->pg, c);
        return cm_call_fail(call, CM_STATUS_NOT_FOUND, "no artifact %s", ro->artifact_id);
    }
    /* The target must be one device-mgmt understands (a known group, a valid selector): ask it now
     * rather than fail when the first stage starts. */
    {
        cm_map_t *probe = cm_map_new();
        char msg[300];
        char *none[1] = {NULL};
        int code = ota_target_devices(ctx, t->group_id, t->model, t->label_selector, none, 0, probe, msg, sizeof msg);
        cm_map_free(probe, cm_free);
        if (code) {
            cm_pg_release(ctx->pg, c);
            return cm_call_fail(call, code == CM_STATUS_UNAVAILABLE || code == CM_STATUS_DEADLINE_EXCEEDED ? CM_STATUS_UNAVAILABLE : code,
                                "rollout.target: %s", msg);
        }
    }
    char ratio[32], mina[16], sev[16];
    snprintf(ratio, sizeof ratio, "%.17g", g->max_ratio > 0 ? g->max_ratio : 2.0);
    snprintf(mina, sizeof mina, "%d", g->min_alerts > 0 ? g->min_alerts : 1);
    snprintf(sev, sizeof sev, "%d", g->min_severity);
    const char *p[11] = {ro->name, ro->artifact_id, t->group_id, t->model, t->label_selector, t->version_range,
                         ro->allow_downgrade ? "t" : "f", g->enabled ? "t" : "f", ratio, mina, sev};
    PGresult *r = NULL;
    rc = cm_pg_begin(c);
    if (!rc)
        rc = cm_pg_exec(c, &r,
                        "INSERT INTO rollouts (name, artifact_id, group_id, model, label_selector, version_range, allow_downgrade, "
                        "gate_enabled, gate_max_ratio, gate_min_alerts, gate_min_severity) VALUES ($1, $2::bigint, $3, $4, $5, $6, "
                        "$7::boolean, $8::boolean, $9::float8, $10::int, $11::int) RETURNING id",
                        11, p);
    char id[24] = "";
    if (!rc) snprintf(id, sizeof id, "%s", PQgetvalue(r, 0, 0));
    PQclear(r);
    for (size_t i = 0; !rc && i < ro->n_stages; i++) {
        const Iot__Ota__V1__Stage *s = ro->stages[i];
        char idx[16], pct[32], cnt[16], succ[32], err[32], soak[24];
        snprintf(idx, sizeof idx, "%d", (int)i);
        snprintf(pct, sizeof pct, "%.17g", s->percent);
        snprintf(cnt, sizeof cnt, "%d", s->count);
        snprintf(succ, sizeof succ, "%.17g", s->success_threshold > 0 ? s->success_threshold : 0.95);
        snprintf(err, sizeof err, "%.17g", s->error_threshold > 0 ? s->error_threshold : 0.1);
        snprintf(soak, sizeof soak, "%" PRId64, s->soak_ms);
        const char *sp[8] = {id, idx, pct, cnt, succ, err, soak, s->manual_approval ? "t" : "f"};
        rc = cm_pg_exec(c, NULL,
                        "INSERT INTO rollout_stages (rollout_id, idx, percent, count, success_threshold, error_threshold, soak_ms, "
                        "manual_approval) VALUES ($1::bigint, $2::int, $3::float8, $4::int, $5::float8, $6::float8, $7::bigint, $8::boolean)",
                        8, sp);
    }
    if (!rc) rc = cm_pg_commit(c);
    if (rc && strcmp(cm_pg_sqlstate(c), "23503") == 0) { /* the artifact was deleted meanwhile */
        cm_pg_rollback(c);
        cm_pg_release(ctx->pg, c);
        return cm_call_fail(call, CM_STATUS_NOT_FOUND, "no artifact %s", ro->artifact_id);
    }
    if (rc) {
        cm_pg_rollback(c);
        return ota__pg_fail(call, ctx, c);
    }
    Iot__Ota__V1__Rollout *out = NULL;
    if ((rc = ota__rollout_load_or_fail(call, ctx, c, id, &out))) return rc;
    memcpy(resp_, out, sizeof *out);
    cm_log_kv(CM_LOG_INFO, "rollout created", "id", id, "artifact", ro->artifact_id, NULL);
    return 0;
}

/* ---- reads --------------------------------------------------------------------------------- */

int ota_get_rollout_check(cm_call_t *call, ProtobufCMessage *req_) {
    const Iot__Ota__V1__GetRolloutRequest *req = (const void *)req_;
    if (!ota__id(req->id)) return cm_call_fail(call, CM_STATUS_INVALID_ARGUMENT, "id: a rollout id (a positive integer)");
    return 0;
}

int ota_get_rollout(cm_call_t *call, const ProtobufCMessage *req_, ProtobufCMessage *resp_) {
    ota_ctx_t *ctx = cm_call_service_ctx(call);
    const Iot__Ota__V1__GetRolloutRequest *req = (const void *)req_;
    int rc = ota_get_rollout_check(call, (ProtobufCMessage *)req_);
    if (rc) return rc;
    cm_pg_conn_t *c = ota__conn_or_fail(call, ctx, &rc);
    if (!c) return rc;
    Iot__Ota__V1__Rollout *out = NULL;
    if ((rc = ota__rollout_load_or_fail(call, ctx, c, req->id, &out))) return rc;
    memcpy(resp_, out, sizeof *out);
    return 0;
}

/* Fills in the default page size. */
int ota_list_rollouts_check(cm_call_t *call, ProtobufCMessage *req_) {
    Iot__Ota__V1__ListRolloutsRequest *req = (void *)req_;
    int size, rc = ota__page_size(call, req->page_size, 20, 100, &size);
    if (rc) return rc;
    int64_t before = 0;
    if ((rc = ota__token_parse(call, req->page_token, 'r', &before))) return rc;
    if (*req->artifact_id && !ota__id(req->artifact_id)) return cm_call_fail(call, CM_STATUS_INVALID_ARGUMENT, "artifact_id: an artifact id");
    /* As int: the enum's type is unsigned (it has no negative value), so "state < 0" never held and
     * -1 passed as a filter that matched nothing. */
    if ((int)req->state < 0 || (int)req->state > OTA_CANCELLED)
        return cm_call_fail(call, CM_STATUS_INVALID_ARGUMENT, "state: not a RolloutState");
    req->page_size = size;
    return 0;
}

int ota_list_rollouts(cm_call_t *call, const ProtobufCMessage *req_, ProtobufCMessage *resp_) {
    ota_ctx_t *ctx = cm_call_service_ctx(call);
    const Iot__Ota__V1__ListRolloutsRequest *req = (const void *)req_;
    Iot__Ota__V1__ListRolloutsResponse *resp = (void *)resp_;
    int rc = ota_list_rollouts_check(call, (ProtobufCMessage *)req_);
    if (rc) return rc;
    int size = req->page_size;
    int64_t before = 0;
    ota__token_parse(call, req->page_token, 'r', &before); /* checked */
    cm_pg_conn_t *c = ota__conn_or_fail(call, ctx, &rc);
    if (!c) return rc;
    char b[24], st[8], lim[16];
    snprintf(b, sizeof b, "%" PRId64, before);
    snprintf(st, sizeof st, "%d", req->state);
    snprintf(lim, sizeof lim, "%d", size + 1);
    const char *p[4] = {req->artifact_id, st, b, lim};
    PGresult *r = NULL;
    if (cm_pg_exec(c, NULL, OTA__SNAPSHOT, 0, NULL)) return ota__pg_fail(call, ctx, c); /* as in a Get */
    if (cm_pg_exec(c, &r,
                   "SELECT " OTA__ROLLOUT_COLS " FROM rollouts AS r WHERE ($1 = '' OR r.artifact_id = $1::bigint) AND "
                   "($2::int = 0 OR r.state = $2::int) AND ($3::bigint = 0 OR r.id < $3::bigint) ORDER BY r.id DESC LIMIT $4::int",
                   4, p))
        return ota__pg_fail(call, ctx, c);
    int n = PQntuples(r), take = n > size ? size : n;
    resp->rollouts = cm_call_alloc(call, sizeof *resp->rollouts * (size_t)(take + 1));
    for (int i = 0; i < take; i++) {
        Iot__Ota__V1__Rollout *o = ota__rollout_build(call, c, r, i);
        if (!o) {
            PQclear(r);
            return ota__pg_fail(call, ctx, c);
        }
        resp->rollouts[resp->n_rollouts++] = o;
    }
    cm_pg_release(ctx->pg, c);
    resp->next_page_token = n > size ? ota__token(call, 'r', strtoll(PQgetvalue(r, take - 1, 0), NULL, 10)) : (char *)"";
    PQclear(r);
    return 0;
}

/* ---- state changes ------------------------------------------------------------------------- */

/* StartRollout and ResumeRollout (ApproveStage has the id at the same place). */
int ota_rollout_action_check(cm_call_t *call, ProtobufCMessage *req_) {
    const Iot__Ota__V1__RolloutActionRequest *req = (const void *)req_;
    if (!ota__id(req->id)) return cm_call_fail(call, CM_STATUS_INVALID_ARGUMENT, "id: a rollout id (a positive integer)");
    return 0;
}

/* PauseRollout and CancelRollout, which record the reason. */
int ota_rollout_reason_check(cm_call_t *call, ProtobufCMessage *req_) {
    const Iot__Ota__V1__RolloutActionRequest *req = (const void *)req_;
    if (strlen(req->reason) > 1024) return cm_call_fail(call, CM_STATUS_INVALID_ARGUMENT, "reason: up to 1024 characters");
    return ota_rollout_action_check(call, req_);
}

int ota_approve_stage_check(cm_call_t *call, ProtobufCMessage *req_) {
    const Iot__Ota__V1__ApproveStageRequest *req = (const void *)req_;
    if (!ota__id(req->id)) return cm_call_fail(call, CM_STATUS_INVALID_ARGUMENT, "id: a rollout id (a positive integer)");
    return 0;
}

/* Runs sql (which returns a row when the transition applies) for rollout id (checked), then
 * answers the rollout as it is now; FAILED_PRECONDITION naming the current state when it did not
 * apply. */
static int ota__transition_answer(cm_call_t *call, ProtobufCMessage *resp_, const char *id, const char *what, const char *sql,
                                  int n, const char *const *p) {
    ota_ctx_t *ctx = cm_call_service_ctx(call);
    int rc;
    cm_pg_conn_t *c = ota__conn_or_fail(call, ctx, &rc);
    if (!c) return rc;
    PGresult *r = NULL;
    if (cm_pg_exec(c, &r, sql, n, p)) return ota__pg_fail(call, ctx, c);
    int applied = PQntuples(r) > 0;
    PQclear(r);
    Iot__Ota__V1__Rollout *out = NULL;
    if ((rc = ota__rollout_load_or_fail(call, ctx, c, id, &out))) return rc;
    if (!applied)
        return cm_call_fail(call, CM_STATUS_FAILED_PRECONDITION, "cannot %s rollout %s: it is %s", what, id, ota__state_name(out->state));
    if (ctx->ctl) ota_ctl_kick(ctx->ctl);
    cm_log_kv(CM_LOG_INFO, "rollout changed", "id", id, "action", what, NULL);
    memcpy(resp_, out, sizeof *out);
    return 0;
}

int ota_start_rollout(cm_call_t *call, const ProtobufCMessage *req_, ProtobufCMessage *resp_) {
    const Iot__Ota__V1__RolloutActionRequest *req = (const void *)req_;
    int rc = ota_rollout_action_check(call, (ProtobufCMessage *)req_);
    if (rc) return rc;
    const char *p[1] = {req->id};
    return ota__transition_answer(call, resp_, req->id, "start",
                                  "UPDATE rollouts SET state = 2, version = version + 1, update_time = now() "
                                  "WHERE id = $1::bigint AND state = 1 AND artifact_id IS NOT NULL RETURNING id",
                                  1, p);
}

int ota_pause_rollout(cm_call_t *call, const ProtobufCMessage *req_, ProtobufCMessage *resp_) {
    const Iot__Ota__V1__RolloutActionRequest *req = (const void *)req_;
    int rc = ota_rollout_reason_check(call, (ProtobufCMessage *)req_);
    if (rc) return rc;
    const char *p[2] = {req->id, req->reason};
    return ota__transition_answer(call, resp_, req->id, "pause",
                                  "UPDATE rollouts SET state = 3, pause_reason = 'paused by an operator' || "
                                  "CASE WHEN $2 = '' THEN '' ELSE ': ' || $2 END, version = version + 1, update_time = now() "
                                  "WHERE id = $1::bigint AND state = 2 RETURNING id",
                                  2, p);
}

/* Resuming accepts what made the rollout pause: the stage's failures so far stop counting against
 * its thresholds, the telemetry gate's window starts again now, and a soaking stage soaks its full
 * time again from now (the gate must see the devices for that long). */
int ota_resume_rollout(cm_call_t *call, const ProtobufCMessage *req_, ProtobufCMessage *resp_) {
    const Iot__Ota__V1__RolloutActionRequest *req = (const void *)req_;
    int rc = ota_rollout_action_check(call, (ProtobufCMessage *)req_);
    if (rc) return rc;
    const char *p[1] = {req->id};
    return ota__transition_answer(
        call, resp_, req->id, "resume",
        "WITH r AS (UPDATE rollouts SET state = 2, pause_reason = '', version = version + 1, update_time = now() "
        "WHERE id = $1::bigint AND state = 3 RETURNING id, current_stage), "
        "s AS (UPDATE rollout_stages AS s SET gate_since = now(), "
        "soak_until = CASE WHEN s.state = 'soaking' THEN greatest(s.soak_until, now() + s.soak_ms * interval '1 millisecond') "
        "ELSE s.soak_until END, failed_base = (SELECT count(*) FROM device_updates AS d "
        "WHERE d.rollout_id = s.rollout_id AND d.stage = s.idx AND d.phase IN (7, 8)) FROM r "
        "WHERE s.rollout_id = r.id AND s.idx = r.current_stage RETURNING 1) SELECT id FROM r",
        1, p);
}

int ota_cancel_rollout(cm_call_t *call, const ProtobufCMessage *req_, ProtobufCMessage *resp_) {
    const Iot__Ota__V1__RolloutActionRequest *req = (const void *)req_;
    int rc = ota_rollout_reason_check(call, (ProtobufCMessage *)req_);
    if (rc) return rc;
    const char *p[2] = {req->id, req->reason};
    return ota__transition_answer(call, resp_, req->id, "cancel",
                                  "UPDATE rollouts SET state = 5, pause_reason = 'cancelled' || "
                                  "CASE WHEN $2 = '' THEN '' ELSE ': ' || $2 END, version = version + 1, update_time = now() "
                                  "WHERE id = $1::bigint AND state IN (1, 2, 3) RETURNING id",
                                  2, p);
}

int ota_approve_stage(cm_call_t *call, const ProtobufCMessage *req_, ProtobufCMessage *resp_) {
    const Iot__Ota__V1__ApproveStageRequest *req = (const void *)req_;
    int rc = ota_approve_stage_check(call, (ProtobufCMessage *)req_);
    if (rc) return rc;
    char st[16];
    snprintf(st, sizeof st, "%d", req->stage);
    const char *p[2] = {req->id, st};
    return ota__transition_answer(call, resp_, req->id, "approve the stage of",
                                  "UPDATE rollout_stages AS s SET approved = true FROM rollouts AS r WHERE r.id = $1::bigint "
                                  "AND s.rollout_id = r.id AND s.idx = $2::int AND r.current_stage = $2::int AND r.state = 2 "
                                  "AND s.state = 'awaiting_approval' RETURNING r.id",
                                  2, p);
}

/* Fills in the default page size. */
int ota_list_device_updates_check(cm_call_t *call, ProtobufCMessage *req_) {
    Iot__Ota__V1__ListDeviceUpdatesRequest *req = (void *)req_;
    if (!ota__id(req->rollout_id)) return cm_call_fail(call, CM_STATUS_INVALID_ARGUMENT, "rollout_id: a rollout id");
    if ((int)req->phase < 0 || (int)req->phase > OTA_ROLLED_BACK) /* as int: see ListRollouts */
        return cm_call_fail(call, CM_STATUS_INVALID_ARGUMENT, "phase: not an UpdatePhase");
    int size, rc = ota__page_size(call, req->page_size, 100, 1000, &size);
    if (rc) return rc;
    char after[OTA_MAX_ID + 1] = "";
    if ((rc = cm_page_token_parse_or_fail(call, req->page_token, 'd', after, sizeof after))) return rc;
    req->page_size = size;
    return 0;
}

int ota_list_device_updates(cm_call_t *call, const ProtobufCMessage *req_, ProtobufCMessage *resp_) {
    ota_ctx_t *ctx = cm_call_service_ctx(call);
    const Iot__Ota__V1__ListDeviceUpdatesRequest *req = (const void *)req_;
    Iot__Ota__V1__ListDeviceUpdatesResponse *resp = (void *)resp_;
    int rc = ota_list_device_updates_check(call, (ProtobufCMessage *)req_);
    if (rc) return rc;
    int size = req->page_size;
    char after[OTA_MAX_ID + 1] = "";
    cm_page_token_parse_or_fail(call, req->page_token, 'd', after, sizeof after); /* checked */
    cm_pg_conn_t *c = ota__conn_or_fail(call, ctx, &rc);
    if (!c) return rc;
    char ph[8], lim[16];
    snprintf(ph, sizeof ph, "%d", req->phase);
    snprintf(lim, sizeof lim, "%d", size + 1);
    const char *p[4] = {req->rollout_id, ph, after, lim};
    PGresult *r = NULL;
    if (cm_pg_exec(c, &r,
                   "SELECT device_id, stage, phase, progress, error, from_version, (extract(epoch FROM update_time) * 1000)::bigint "
                   "FROM device_updates WHERE rollout_id = $1::bigint AND ($2::int = 0 OR phase = $2::int) AND device_id > $3 "
                   "ORDER BY device_id LIMIT $4::int",
                   4, p))
        return ota__pg_fail(call, ctx, c);
    if (PQntuples(r) == 0) {
        PGresult *e = NULL;
        const char *ep[1] = {req->rollout_id};
        if (cm_pg_exec(c, &e, "SELECT 1 FROM rollouts WHERE id = $1::bigint", 1, ep)) {
            PQclear(r);
            return ota__pg_fail(call, ctx, c);
        }
        int exists = PQntuples(e) > 0;
        PQclear(e);
        if (!exists) {
            PQclear(r);
            cm_pg_release(ctx->pg, c);
            return cm_call_fail(call, CM_STATUS_NOT_FOUND, "no rollout %s", req->rollout_id);
        }
    }
    cm_pg_release(ctx->pg, c);
    int n = PQntuples(r), take = n > size ? size : n;
    resp->updates = cm_call_alloc(call, sizeof *resp->updates * (size_t)(take + 1));
    for (int i = 0; i < take; i++) {
        Iot__Ota__V1__DeviceUpdate *u = cm_call_alloc(call, sizeof *u);
        iot__ota__v1__device_update__init(u);
        u->rollout_id = req->rollout_id;
        u->device_id = cm_call_strdup(call, PQgetvalue(r, i, 0));
        u->stage = atoi(PQgetvalue(r, i, 1));
        u->phase = atoi(PQgetvalue(r, i, 2));
        u->progress = atoi(PQgetvalue(r, i, 3));
        u->error = cm_call_strdup(call, PQgetvalue(r, i, 4));
        u->from_version = cm_call_strdup(call, PQgetvalue(r, i, 5));
        u->update_time = ota__ts(call, PQgetvalue(r, i, 6));
        resp->updates[resp->n_updates++] = u;
    }
    resp->next_page_token = n > size ? cm_page_token(call, 'd', PQgetvalue(r, take - 1, 0)) : (char *)"";
    PQclear(r);
    return 0;
}
