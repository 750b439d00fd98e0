/* The rollout controller (see ota_rollouts.h): one step per running rollout per tick. A step:
 *   waiting  -> resolve the target through device-mgmt, assign devices up to the stage's size
 *               (deterministic order: hash of rollout and device), become active;
 *   active   -> pause when the stage's failures exceed error_threshold; on success_threshold
 *               soak (soak_ms) or advance;
 *   soaking  -> the same error check, the telemetry gate, advance when soak_until has passed;
 *   awaiting_approval -> advance once ApproveStage has been called;
 * and advancing completes the rollout after its last stage. */
#include <inttypes.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cm_alloc.h"
#include "cm_buf.h"
#include "cm_json.h"
#include "cm_log.h"
#include "cm_loop.h"
#include "iot/device/v1/device.pb-c.h"
#include "iot/processing/v1/processing.pb-c.h"
#include "ota_rollouts.h"
#include "ota_semver.h"

struct ota_ctl_s {
    ota_ctx_t *ctx;
    cm_loop_t *loop;
    cm_counter_t *c_steps, *c_pauses, *c_assigned;
};

/* ---- lookups ------------------------------------------------------------------------------- */

int ota_target_devices(ota_ctx_t *ctx, const char *group_id, const char *model, const char *label_selector,
                       char *const *models, size_t n_models, cm_map_t *out, char *msg, size_t msg_len) {
    Iot__Device__V1__DeviceFilter f = IOT__DEVICE__V1__DEVICE_FILTER__INIT;
    f.group_id = (char *)group_id;
    f.model = (char *)model;
    f.label_selector = (char *)label_selector;
    Iot__Device__V1__ListDevicesRequest req = IOT__DEVICE__V1__LIST_DEVICES_REQUEST__INIT;
    req.filter = &f;
    req.page_size = 1000;
    char *token = NULL;
    int code = 0;
    for (;;) {
        req.page_token = token ? token : (char *)"";
        Iot__Device__V1__ListDevicesResponse *r = NULL;
        cm_rpc_status_t st = {0};
        cm_call_opts_t o = {.timeout_ms = ctx->cfg->dm_timeout_ms, .idempotent = 1};
        code = cm_channel_unary(ctx->dm, "/iot.device.v1.DeviceManager/ListDevices", &req.base,
                                &iot__device__v1__list_devices_response__descriptor, (ProtobufCMessage **)&r, &o, &st);
        if (code) {
            snprintf(msg, msg_len, "device-mgmt ListDevices: %s %.200s", cm_status_name(code), st.message);
            cm_rpc_status_clear(&st);
            break;
        }
        cm_rpc_status_clear(&st);
        for (size_t i = 0; i < r->n_devices; i++) {
            const Iot__Device__V1__Device *d = r->devices[i];
            if (d->status == IOT__DEVICE__V1__DEVICE_STATUS__DEVICE_STATUS_DECOMMISSIONED) continue;
            int model_ok = n_models == 0;
            for (size_t k = 0; k < n_models && !model_ok; k++) model_ok = strcmp(models[k], d->model) == 0;
            if (!model_ok) continue;
            void **slot = cm_map_slot(out, d->id, strlen(d->id), NULL);
            if (!*slot) *slot = cm_strdup(d->firmware_version);
        }
        cm_free(token);
        token = *r->next_page_token ? cm_strdup(r->next_page_token) : NULL;
        protobuf_c_message_free_unpacked(&r->base, NULL);
        if (!token) break;
    }
    cm_free(token);
    return code;
}

/* ---- one step ------------------------------------------------------------------------------ */

typedef struct ota__ro_s {
    char id[24], artifact_id[24], version[OTA_VERSION_MAX + 1];
    char group_id[129], model[65], label_selector[1025], version_range[600];
    char **models;
    size_t n_models;
    int allow_downgrade, gate_enabled, gate_min_alerts, gate_min_severity, current, n_stages;
    double gate_max_ratio;
} ota__ro_t;

typedef struct ota__stage_s {
    double percent, success, error;
    int count, manual, approved, failed_base;
    int64_t soak_ms;
    char state[24];
    int soak_over; /* soak_until has passed */
    char gate_since_ms[24];
} ota__stage_t;

static void ota__ro_free(ota__ro_t *ro) {
    for (size_t i = 0; i < ro->n_models; i++) cm_free(ro->models[i]);
    cm_free(ro->models);
}

static void ota__pause(cm_pg_conn_t *c, ota_ctl_t *ctl, const ota__ro_t *ro, const char *reason, int *rc) {
    const char *p[2] = {ro->id, reason};
    if (!*rc)
        *rc = cm_pg_exec(c, NULL,
                         "UPDATE rollouts SET state = 3, pause_reason = $2, version = version + 1, update_time = now() WHERE id = $1::bigint",
                         2, p);
    cm_counter_add(ctl->c_pauses, 1);
    cm_log_kv(CM_LOG_WARN, "rollout paused itself", "id", ro->id, "reason", reason, NULL);
}

static int ota__set_stage(cm_pg_conn_t *c, const ota__ro_t *ro, int idx, const char *sql_set) {
    char i[16], sql[512];
    snprintf(i, sizeof i, "%d", idx);
    snprintf(sql, sizeof sql, "UPDATE rollout_stages SET %s WHERE rollout_id = $1::bigint AND idx = $2::int", sql_set);
    const char *p[2] = {ro->id, i};
    return cm_pg_exec(c, NULL, sql, 2, p);
}

/* Devices that are in the middle of another rollout's update: they are left out of new stages. */
static int ota__busy(cm_pg_conn_t *c, const ota__ro_t *ro, cm_map_t *busy) {
    const char *p[1] = {ro->id};
    PGresult *r = NULL;
    if (cm_pg_exec(c, &r,
                   "SELECT d.device_id FROM device_updates AS d JOIN rollouts AS r ON r.id = d.rollout_id "
                   "WHERE r.state IN (2, 3) AND r.id <> $1::bigint AND d.phase < 6",
                   1, p))
        return -1;
    for (int i = 0; i < PQntuples(r); i++) *cm_map_slot(busy, PQgetvalue(r, i, 0), strlen(PQgetvalue(r, i, 0)), NULL) = (void *)1;
    PQclear(r);
    return 0;
}

typedef struct ota__cand_s {
    const char *id, *version;
    uint64_t order;
} ota__cand_t;

static int ota__cand_cmp(const void *a, const void *b) {
    const ota__cand_t *x = a, *y = b;
    return x->order < y->order ? -1 : x->order > y->order ? 1 : strcmp(x->id, y->id);
}

/* Whether a device on `version` should get the artifact: in the target's version range, not on
 * the artifact's version already, and not newer unless downgrades are allowed. */
static int ota__needs(const ota__ro_t *ro, const char *version) {
    ota_semver_t dv, av;
    if (ota_semver_parse(version, &dv)) return !*ro->version_range; /* unknown version: only an open range takes it */
    if (ota_semver_in_range(&dv, ro->version_range) != 1) return 0;
    if (ota_semver_parse(ro->version, &av)) return 0;
    int c = ota_semver_cmp(&dv, &av);
    return c < 0 || (c > 0 && ro->allow_downgrade);
}

/* Starts stage idx: assigns devices. 0, or -1 with *why set when the target cannot be resolved. */
static int ota__start_stage(ota_ctl_t *ctl, cm_pg_conn_t *c, const ota__ro_t *ro, int idx, const ota__stage_t *st, char *why,
                            size_t why_len) {
    ota_ctx_t *ctx = ctl->ctx;
    cm_map_t *target = cm_map_new(), *assigned = cm_map_new(), *busy = cm_map_new();
    int rc = 0;
    /* One stage start at a time across replicas: the busy set read below must include what
     * another replica's stage start just assigned (held until this transaction ends). */
    if (cm_pg_exec(c, NULL, "SELECT pg_advisory_xact_lock(hashtext('iotsuite.ota.assign'))", 0, NULL)) rc = -2;
    if (!rc && ota_target_devices(ctx, ro->group_id, ro->model, ro->label_selector, ro->models, ro->n_models, target, why, why_len)) rc = -1;
    const char *p[1] = {ro->id};
    PGresult *r = NULL;
    if (!rc && cm_pg_exec(c, &r, "SELECT device_id FROM device_updates WHERE rollout_id = $1::bigint", 1, p)) rc = -2;
    for (int i = 0; !rc && i < PQntuples(r); i++) *cm_map_slot(assigned, PQgetvalue(r, i, 0), strlen(PQgetvalue(r, i, 0)), NULL) = (void *)1;
    PQclear(r);
    if (!rc && ota__busy(c, ro, busy)) rc = -2;
    ota__cand_t *cand = NULL;
    size_t nc = 0;
    if (!rc) {
        cand = cm_malloc(sizeof *cand * (cm_map_len(target) + 1));
        size_t it = 0, kl;
        const void *k;
        void *v;
        while (cm_map_next(target, &it, &k, &kl, &v)) {
            if (cm_map_get(assigned, k, kl) || !ota__needs(ro, v)) continue;
            char key[200];
            int n = snprintf(key, sizeof key, "%s:%.*s", ro->id, (int)kl, (const char *)k);
            cand[nc++] = (ota__cand_t){k, v, cm_hash64(key, (size_t)n)};
        }
        qsort(cand, nc, sizeof *cand, ota__cand_cmp);
        /* The stage's size counts the devices already in the rollout plus those that still need it. */
        size_t total = cm_map_len(assigned) + nc, want;
        if (idx == ro->n_stages - 1)
            want = total;
        else if (st->percent > 0)
            want = (size_t)ceil(st->percent / 100.0 * (double)total - 1e-9);
        else
            want = (size_t)st->count < total ? (size_t)st->count : total;
        size_t add = want > cm_map_len(assigned) ? want - cm_map_len(assigned) : 0, added = 0;
        char i_s[16];
        snprintf(i_s, sizeof i_s, "%d", idx);
        for (size_t i = 0; !rc && i < nc && added < add; i++) {
            if (cm_map_get(busy, cand[i].id, strlen(cand[i].id))) continue;
            const char *ip[4] = {ro->id, cand[i].id, i_s, cand[i].version};
            if (cm_pg_exec(c, NULL,
                           "INSERT INTO device_updates (rollout_id, device_id, stage, from_version) VALUES ($1::bigint, $2, $3::int, $4) "
                           "ON CONFLICT DO NOTHING",
                           4, ip))
                rc = -2;
            added++;
        }
        cm_counter_add(ctl->c_assigned, (double)added);
        cm_log_kv(CM_LOG_INFO, "rollout stage started", "id", ro->id, "stage", i_s, NULL);
    }
    if (!rc) rc = ota__set_stage(c, ro, idx, "state = 'active', start_time = now(), gate_since = now()") ? -2 : 0;
    cm_free(cand);
    cm_map_free(target, cm_free);
    cm_map_free(assigned, NULL);
    cm_map_free(busy, NULL);
    return rc;
}

/* The telemetry gate: alerts fired since gate_since on updated devices against the target's
 * devices not updated yet. 1 with the reason in why when the rollout must pause, 0 when not,
 * -1 when processing or device-mgmt could not answer (the gate is checked again next tick). */
static int ota__gate(ota_ctl_t *ctl, cm_pg_conn_t *c, const ota__ro_t *ro, const ota__stage_t *st, char *why, size_t why_len) {
    ota_ctx_t *ctx = ctl->ctx;
    cm_map_t *updated = cm_map_new(), *target = cm_map_new();
    const char *p[1] = {ro->id};
    PGresult *r = NULL;
    int rc = 0;
    /* Updated: succeeded in this rollout. Devices of the rollout still under way or failed are in
     * neither cohort (they would blur the baseline). */
    if (cm_pg_exec(c, &r, "SELECT device_id, phase = 6 FROM device_updates WHERE rollout_id = $1::bigint", 1, p)) rc = -2;
    for (int i = 0; !rc && i < PQntuples(r); i++)
        *cm_map_slot(updated, PQgetvalue(r, i, 0), strlen(PQgetvalue(r, i, 0)), NULL) = PQgetvalue(r, i, 1)[0] == 't' ? (void *)2 : (void *)1;
    PQclear(r);
    char msg[300];
    if (!rc && ota_target_devices(ctx, ro->group_id, ro->model, ro->label_selector, ro->models, ro->n_models, target, msg, sizeof msg))
        rc = -1;
    long a_u = 0, a_b = 0;
    size_t n_u = 0, n_b = 0;
    if (!rc) {
        size_t it = 0, kl;
        const void *k;
        void *v;
        while (cm_map_next(updated, &it, &k, &kl, &v)) n_u += v == (void *)2;
        it = 0;
        while (cm_map_next(target, &it, &k, &kl, &v)) n_b += cm_map_get(updated, k, kl) == NULL;
    }
    Google__Protobuf__Timestamp since = GOOGLE__PROTOBUF__TIMESTAMP__INIT;
    int64_t ms = strtoll(st->gate_since_ms, NULL, 10);
    since.seconds = ms / 1000;
    since.nanos = (int32_t)(ms % 1000) * 1000000;
    Iot__Processing__V1__ListAlertsRequest req = IOT__PROCESSING__V1__LIST_ALERTS_REQUEST__INIT;
    req.fired_after = &since;
    req.min_severity = ro->gate_min_severity;
    req.page_size = 1000;
    char *token = NULL;
    /* Bounded: a storm of alerts is counted up to 100,000, which is plenty to decide. */
    for (int page = 0; !rc && page < 100; page++) {
        req.page_token = token ? token : (char *)"";
        Iot__Processing__V1__ListAlertsResponse *l = NULL;
        cm_rpc_status_t s = {0};
        cm_call_opts_t o = {.timeout_ms = ctx->cfg->dm_timeout_ms, .idempotent = 1};
        int code = cm_channel_unary(ctx->proc, "/iot.processing.v1.Processing/ListAlerts", &req.base,
                                    &iot__processing__v1__list_alerts_response__descriptor, (ProtobufCMessage **)&l, &o, &s);
        if (code) {
            snprintf(msg, sizeof msg, "processing ListAlerts: %s %.200s", cm_status_name(code), s.message);
            cm_rpc_status_clear(&s);
            rc = -1;
            break;
        }
        cm_rpc_status_clear(&s);
        for (size_t i = 0; i < l->n_alerts; i++) {
            const char *d = l->alerts[i]->device_id;
            void *in = cm_map_get(updated, d, strlen(d));
            if (in == (void *)2)
                a_u++;
            else if (!in && cm_map_get(target, d, strlen(d)))
                a_b++;
        }
        cm_free(token);
        token = *l->next_page_token ? cm_strdup(l->next_page_token) : NULL;
        protobuf_c_message_free_unpacked(&l->base, NULL);
        if (!token) break;
    }
    cm_free(token);
    cm_map_free(updated, NULL);
    cm_map_free(target, cm_free);
    if (rc == -1) cm_log_kv(CM_LOG_WARN, "telemetry gate not checked", "id", ro->id, "why", msg, NULL);
    if (rc) return rc;
    /* No comparison without both cohorts; below min_alerts the updated devices are not judged. */
    if (n_u == 0 || n_b == 0 || a_u < ro->gate_min_alerts) return 0;
    double r_u = (double)a_u / (double)n_u, r_b = (double)a_b / (double)n_b;
    if (r_u <= ro->gate_max_ratio * r_b) return 0;
    snprintf(why, why_len,
             "telemetry gate: %ld alerts on %zu updated devices (%.3f per device) against %ld on %zu not updated (%.3f per device) "
             "since the stage started; more than %.2f times the baseline",
             a_u, n_u, r_u, a_b, n_b, r_b, ro->gate_max_ratio);
    return 1;
}

/* Loads the rollout locked for this step. 1 loaded, 0 not running or locked by another replica, -2 on a database error. */
static int ota__load(cm_pg_conn_t *c, int64_t id, ota__ro_t *ro) {
    char ids[24];
    snprintf(ids, sizeof ids, "%" PRId64, id);
    const char *p[1] = {ids};
    PGresult *r = NULL;
    if (cm_pg_exec(c, &r,
                   "SELECT r.id, r.artifact_id, a.version, array_to_json(a.models)::text, r.group_id, r.model, r.label_selector, "
                   "r.version_range, r.allow_downgrade, r.gate_enabled, r.gate_min_alerts, r.gate_min_severity, r.gate_max_ratio, "
                   "r.current_stage, (SELECT count(*) FROM rollout_stages AS s WHERE s.rollout_id = r.id) "
                   "FROM rollouts AS r JOIN artifacts AS a ON a.id = r.artifact_id WHERE r.id = $1::bigint AND r.state = 2 "
                   "FOR UPDATE OF r SKIP LOCKED",
                   1, p))
        return -2;
    if (PQntuples(r) == 0) {
        PQclear(r);
        return 0;
    }
    memset(ro, 0, sizeof *ro);
    snprintf(ro->id, sizeof ro->id, "%s", PQgetvalue(r, 0, 0));
    snprintf(ro->artifact_id, sizeof ro->artifact_id, "%s", PQgetvalue(r, 0, 1));
    snprintf(ro->version, sizeof ro->version, "%s", PQgetvalue(r, 0, 2));
    json_t *m = json_loads(PQgetvalue(r, 0, 3), 0, NULL);
    ro->n_models = json_array_size(m);
    ro->models = cm_calloc(ro->n_models + 1, sizeof *ro->models);
    for (size_t i = 0; i < ro->n_models; i++) ro->models[i] = cm_strdup(json_string_value(json_array_get(m, i)));
    json_decref(m);
    snprintf(ro->group_id, sizeof ro->group_id, "%s", PQgetvalue(r, 0, 4));
    snprintf(ro->model, sizeof ro->model, "%s", PQgetvalue(r, 0, 5));
    snprintf(ro->label_selector, sizeof ro->label_selector, "%s", PQgetvalue(r, 0, 6));
    snprintf(ro->version_range, sizeof ro->version_range, "%s", PQgetvalue(r, 0, 7));
    ro->allow_downgrade = PQgetvalue(r, 0, 8)[0] == 't';
    ro->gate_enabled = PQgetvalue(r, 0, 9)[0] == 't';
    ro->gate_min_alerts = atoi(PQgetvalue(r, 0, 10));
    ro->gate_min_severity = atoi(PQgetvalue(r, 0, 11));
    ro->gate_max_ratio = strtod(PQgetvalue(r, 0, 12), NULL);
    ro->current = atoi(PQgetvalue(r, 0, 13));
    ro->n_stages = atoi(PQgetvalue(r, 0, 14));
    PQclear(r);
    return 1;
}

static int ota__load_stage(cm_pg_conn_t *c, const ota__ro_t *ro, int idx, ota__stage_t *st) {
    char i[16];
    snprintf(i, sizeof i, "%d", idx);
    const char *p[2] = {ro->id, i};
    PGresult *r = NULL;
    if (cm_pg_exec(c, &r,
                   "SELECT percent, count, success_threshold, error_threshold, soak_ms, manual_approval, approved, failed_base, state, "
                   "coalesce(soak_until <= now(), false), (extract(epoch FROM coalesce(gate_since, now())) * 1000)::bigint "
                   "FROM rollout_stages WHERE rollout_id = $1::bigint AND idx = $2::int",
                   2, p))
        return -2;
    if (PQntuples(r) == 0) {
        PQclear(r);
        return -2;
    }
    st->percent = strtod(PQgetvalue(r, 0, 0), NULL);
    st->count = atoi(PQgetvalue(r, 0, 1));
    st->success = strtod(PQgetvalue(r, 0, 2), NULL);
    st->error = strtod(PQgetvalue(r, 0, 3), NULL);
    st->soak_ms = strtoll(PQgetvalue(r, 0, 4), NULL, 10);
    st->manual = PQgetvalue(r, 0, 5)[0] == 't';
    st->approved = PQgetvalue(r, 0, 6)[0] == 't';
    st->failed_base = atoi(PQgetvalue(r, 0, 7));
    snprintf(st->state, sizeof st->state, "%s", PQgetvalue(r, 0, 8));
    st->soak_over = PQgetvalue(r, 0, 9)[0] == 't';
    snprintf(st->gate_since_ms, sizeof st->gate_since_ms, "%s", PQgetvalue(r, 0, 10));
    PQclear(r);
    return 0;
}

/* One step of rollout id, in one transaction. Stages that complete at once (empty, no soak) are
 * walked through in the same step. */
static void ota__step(ota_ctl_t *ctl, int64_t id) {
    ota_ctx_t *ctx = ctl->ctx;
    cm_pg_conn_t *c = cm_pg_acquire(ctx->pg, 5000);
    if (!c) return;
    ota__ro_t ro;
    int rc = cm_pg_begin(c), loaded = 0;
    if (!rc) {
        loaded = ota__load(c, id, &ro);
        if (loaded < 0) rc = -2;
    }
    char why[600] = "";
    for (int guard = 0; !rc && loaded == 1 && guard < 64; guard++) {
        ota__stage_t st;
        if (ota__load_stage(c, &ro, ro.current, &st)) {
            rc = -2;
            break;
        }
        if (strcmp(st.state, "waiting") == 0) {
            int s = ota__start_stage(ctl, c, &ro, ro.current, &st, why, sizeof why);
            if (s == -1) { /* device-mgmt cannot say who is in the target: try again next tick */
                cm_log_kv(CM_LOG_WARN, "rollout stage waits for its target", "id", ro.id, "why", why, NULL);
                break;
            }
            rc = s;
            continue;
        }
        /* Counts of the stage's devices. */
        char i_s[16];
        snprintf(i_s, sizeof i_s, "%d", ro.current);
        const char *p[2] = {ro.id, i_s};
        PGresult *r = NULL;
        if (cm_pg_exec(c, &r,
                       "SELECT count(*), count(*) FILTER (WHERE phase = 6), count(*) FILTER (WHERE phase IN (7, 8)) "
                       "FROM device_updates WHERE rollout_id = $1::bigint AND stage = $2::int",
                       2, p)) {
            rc = -2;
            break;
        }
        long devices = atol(PQgetvalue(r, 0, 0)), ok = atol(PQgetvalue(r, 0, 1)), failed = atol(PQgetvalue(r, 0, 2));
        PQclear(r);
        /* Failures an operator accepted by resuming count in neither share. */
        long counted = failed - st.failed_base, judged = devices - st.failed_base;
        if (strcmp(st.state, "done") != 0 && judged > 0 && (double)counted / (double)judged > st.error + 1e-12) {
            snprintf(why, sizeof why, "stage %d: %ld of %ld devices failed (%.0f%%, error threshold %.0f%%)", ro.current, counted, judged,
                     100.0 * (double)counted / (double)judged, 100.0 * st.error);
            ota__pause(c, ctl, &ro, why, &rc);
            break;
        }
        int advance = 0;
        if (strcmp(st.state, "active") == 0) {
            if (judged <= 0 || (double)ok / (double)judged >= st.success - 1e-12) {
                if (st.soak_ms > 0) {
                    char set[128];
                    snprintf(set, sizeof set, "state = 'soaking', soak_until = now() + %" PRId64 " * interval '1 millisecond'", st.soak_ms);
                    rc = ota__set_stage(c, &ro, ro.current, set) ? -2 : 0;
                    break;
                }
                advance = 1;
            } else if (ok + counted >= judged) {
                /* Every device has finished, too few succeeded, yet not enough failed to pause:
                 * nothing more can happen by itself, so say so. */
                snprintf(why, sizeof why, "stage %d: every device finished but only %ld of %ld succeeded (%.0f%%, success threshold %.0f%%)",
                         ro.current, ok, judged, 100.0 * (double)ok / (double)judged, 100.0 * st.success);
                ota__pause(c, ctl, &ro, why, &rc);
                break;
            } else {
                break; /* still updating */
            }
        } else if (strcmp(st.state, "soaking") == 0) {
            if (ro.gate_enabled) {
                int g = ota__gate(ctl, c, &ro, &st, why, sizeof why);
                if (g == -2) {
                    rc = -2;
                    break;
                }
                if (g == 1) {
                    ota__pause(c, ctl, &ro, why, &rc);
                    break;
                }
                if (g == -1) break; /* not judged: no advancing on an unchecked gate */
            }
            if (!st.soak_over) break;
            advance = 1;
        } else if (strcmp(st.state, "awaiting_approval") == 0) {
            if (!st.approved) break;
            advance = 2;
        } else {
            advance = 2; /* done: move on */
        }
        if (advance == 1 && st.manual && !st.approved) {
            rc = ota__set_stage(c, &ro, ro.current, "state = 'awaiting_approval'") ? -2 : 0;
            break;
        }
        if (ro.current + 1 >= ro.n_stages) {
            /* Complete only when every device has finished: past the last threshold the stragglers
             * still get their offers (an operator may cancel to stop waiting for them). */
            const char *lp[1] = {ro.id};
            PGresult *left = NULL;
            if (cm_pg_exec(c, &left, "SELECT count(*) FROM device_updates WHERE rollout_id = $1::bigint AND phase < 6", 1, lp)) {
                rc = -2;
                break;
            }
            long unfinished = atol(PQgetvalue(left, 0, 0));
            PQclear(left);
            if (unfinished > 0) break;
        }
        if (strcmp(st.state, "done") != 0 && ota__set_stage(c, &ro, ro.current, "state = 'done'")) {
            rc = -2;
            break;
        }
        if (ro.current + 1 >= ro.n_stages) {
            const char *cp[1] = {ro.id};
            rc = cm_pg_exec(c, NULL, "UPDATE rollouts SET state = 4, version = version + 1, update_time = now() WHERE id = $1::bigint", 1, cp)
                     ? -2
                     : 0;
            cm_log_kv(CM_LOG_INFO, "rollout completed", "id", ro.id, NULL);
            break;
        }
        ro.current++;
        const char *np[1] = {ro.id};
        if (cm_pg_exec(c, NULL,
                       "UPDATE rollouts SET current_stage = current_stage + 1, version = version + 1, update_time = now() WHERE id = $1::bigint",
                       1, np)) {
            rc = -2;
            break;
        }
    }
    if (loaded == 1) ota__ro_free(&ro);
    if (!rc && cm_pg_commit(c)) rc = -2;
    if (rc) {
        cm_log_kv(CM_LOG_WARN, "rollout step failed; retried next tick", "error", cm_pg_error(c), NULL);
        cm_pg_rollback(c);
    }
    cm_pg_release(ctx->pg, c);
    cm_counter_add(ctl->c_steps, 1);
}

static int64_t ota__tick(void *arg) {
    ota_ctl_t *ctl = arg;
    ota_ctx_t *ctx = ctl->ctx;
    cm_pg_conn_t *c = cm_pg_acquire(ctx->pg, 5000);
    if (!c) return ctx->cfg->controller_ms;
    PGresult *r = NULL;
    int rc = cm_pg_exec(c, &r, "SELECT id FROM rollouts WHERE state = 2 ORDER BY id", 0, NULL);
    cm_pg_release(ctx->pg, c);
    if (rc) return ctx->cfg->controller_ms;
    for (int i = 0; i < PQntuples(r); i++) ota__step(ctl, strtoll(PQgetvalue(r, i, 0), NULL, 10));
    PQclear(r);
    return ctx->cfg->controller_ms;
}

ota_ctl_t *ota_ctl_start(ota_ctx_t *ctx) {
    ota_ctl_t *ctl = cm_calloc(1, sizeof *ctl);
    ctl->ctx = ctx;
    ctl->c_steps = cm_metrics_counter("ota_rollout_steps_total", "controller steps over running rollouts", NULL);
    ctl->c_pauses = cm_metrics_counter("ota_rollout_auto_pauses_total", "rollouts paused by the error threshold or the telemetry gate", NULL);
    ctl->c_assigned = cm_metrics_counter("ota_rollout_devices_assigned_total", "devices assigned to rollout stages", NULL);
    ctl->loop = cm_loop_start(ota__tick, ctl, 0);
    return ctl;
}

void ota_ctl_kick(ota_ctl_t *ctl) { cm_loop_kick(ctl->loop); }

void ota_ctl_stop(ota_ctl_t *ctl) {
    if (!ctl) return;
    cm_loop_stop(ctl->loop);
    cm_free(ctl);
}
