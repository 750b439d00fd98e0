/* The device side of rollouts (device token required): CheckForUpdate offers the artifact of the
 * rollout a device is assigned to, once its stage has started; ReportStatus moves the device's
 * update through its phases and, on success, records the new version in device-mgmt. */
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cm_log.h"
#include "google/protobuf/field_mask.pb-c.h"
#include "iot/device/v1/device.pb-c.h"
#include "ota_rollouts.h"
#include "ota_semver.h"

static const char *const ota__phase_names[] = {"UNSPECIFIED", "PENDING",   "OFFERED", "DOWNLOADING", "VERIFYING",
                                               "INSTALLING",  "SUCCEEDED", "FAILED",  "ROLLED_BACK"};

static const char *ota__phase(int p) { return p >= 0 && p <= OTA_ROLLED_BACK ? ota__phase_names[p] : "UNKNOWN"; }

static int ota__record_version(cm_call_t *call, ota_ctx_t *ctx, const char *device, const char *version);

int ota_check_for_update_check(cm_call_t *call, ProtobufCMessage *req_) {
    const Iot__Ota__V1__CheckForUpdateRequest *req = (const void *)req_;
    ota_semver_t cur;
    if (ota_semver_parse(req->current_version, &cur))
        return cm_call_fail(call, CM_STATUS_INVALID_ARGUMENT, "current_version: \"%.80s\" is not a semantic version", req->current_version);
    if (strlen(req->model) > 64) return cm_call_fail(call, CM_STATUS_INVALID_ARGUMENT, "model: up to 64 characters");
    return 0;
}

int ota_check_for_update(cm_call_t *call, const ProtobufCMessage *req_, ProtobufCMessage *resp_) {
    ota_ctx_t *ctx = cm_call_service_ctx(call);
    const Iot__Ota__V1__CheckForUpdateRequest *req = (const void *)req_;
    Iot__Ota__V1__CheckForUpdateResponse *resp = (void *)resp_;
    char device[OTA_MAX_ID + 1];
    int rc = ota__device_or_fail(call, ctx, device);
    if (!rc) rc = ota_check_for_update_check(call, (ProtobufCMessage *)req_);
    if (rc) return rc;
    ota_semver_t cur;
    ota_semver_parse(req->current_version, &cur); /* checked */
    cm_pg_conn_t *c = ota__conn_or_fail(call, ctx, &rc);
    if (!c) return rc;
    /* The newest rollout that has reached the device's stage. A paused one offers nothing new, but
     * a device already under way may fetch its offer again (to resume a download). */
    const char *p[1] = {device};
    PGresult *r = NULL;
    if (cm_pg_exec(c, &r,
                   "SELECT d.rollout_id, d.phase, r.allow_downgrade, " OTA_ARTIFACT_COLS " FROM device_updates AS d "
                   "JOIN rollouts AS r ON r.id = d.rollout_id JOIN artifacts AS a ON a.id = r.artifact_id "
                   "WHERE d.device_id = $1 AND d.stage <= r.current_stage AND d.phase < 6 "
                   "AND (r.state = 2 OR (r.state = 3 AND d.phase >= 2)) ORDER BY r.id DESC LIMIT 1",
                   1, p))
        return ota__pg_fail(call, ctx, c);
    if (PQntuples(r) == 0) {
        PQclear(r);
        cm_pg_release(ctx->pg, c);
        return 0;
    }
    char rollout[24];
    snprintf(rollout, sizeof rollout, "%s", PQgetvalue(r, 0, 0));
    int phase = atoi(PQgetvalue(r, 0, 1)), downgrade = PQgetvalue(r, 0, 2)[0] == 't';
    Iot__Ota__V1__Artifact *a = ota__artifact_row_at(call, r, 0, 3);
    PQclear(r);
    ota_semver_t av;
    int cmp = ota_semver_parse(a->version, &av) ? 0 : ota_semver_cmp(&cur, &av);
    int model_ok = !*req->model;
    for (size_t i = 0; i < a->n_models && !model_ok; i++) model_ok = strcmp(a->models[i], req->model) == 0;
    /* Never offered: the version it runs already (its update is done: device-mgmt had an old
     * version), a downgrade the rollout does not allow, or a model the artifact is not built for
     * (both failures, so that operators see them). Either way the row moves on, so it neither
     * holds the stage back nor hides an older rollout that does apply. */
    if (cmp == 0 || (cmp > 0 && !downgrade) || !model_ok) {
        char err[320] = "";
        if (cmp > 0 && !downgrade)
            snprintf(err, sizeof err, "not offered: the device runs %.64s, newer than %.64s, and the rollout allows no downgrade",
                     req->current_version, a->version);
        else if (cmp != 0)
            snprintf(err, sizeof err, "not offered: model %.64s is not one the artifact is built for", req->model);
        const char *up[3] = {rollout, device, err};
        if (cm_pg_exec(c, NULL,
                       "UPDATE device_updates SET phase = CASE WHEN $3 = '' THEN 6 ELSE 7 END, progress = CASE WHEN $3 = '' THEN 100 "
                       "ELSE 0 END, error = $3, update_time = now() WHERE rollout_id = $1::bigint AND device_id = $2 AND phase < 6",
                       3, up))
            return ota__pg_fail(call, ctx, c);
        cm_pg_release(ctx->pg, c);
        if (!*err && ota__record_version(call, ctx, device, a->version)) {
            /* The update stands; device-mgmt learns the version at the device's next report. */
            cm_log_kv(CM_LOG_WARN, "cannot record a device's version in device-mgmt", "device", device, NULL);
        }
        if (ctx->ctl) ota_ctl_kick(ctx->ctl);
        return 0;
    }
    if (phase == OTA_PENDING) {
        const char *up[2] = {rollout, device};
        if (cm_pg_exec(c, NULL,
                       "UPDATE device_updates SET phase = 2, update_time = now() WHERE rollout_id = $1::bigint AND device_id = $2 AND phase = 1",
                       2, up))
            return ota__pg_fail(call, ctx, c);
    }
    cm_pg_release(ctx->pg, c);
    Iot__Ota__V1__UpdateOffer *o = cm_call_alloc(call, sizeof *o);
    iot__ota__v1__update_offer__init(o);
    o->rollout_id = cm_call_strdup(call, rollout);
    o->artifact = a;
    resp->offer = o;
    return 0;
}

/* device-mgmt learns the version the device now runs. CM_STATUS_OK or the status to answer. */
static int ota__record_version(cm_call_t *call, ota_ctx_t *ctx, const char *device, const char *version) {
    Iot__Device__V1__Device d = IOT__DEVICE__V1__DEVICE__INIT;
    d.id = (char *)device;
    d.firmware_version = (char *)version;
    char *paths[] = {(char *)"firmware_version"};
    Google__Protobuf__FieldMask mask = GOOGLE__PROTOBUF__FIELD_MASK__INIT;
    mask.n_paths = 1;
    mask.paths = paths;
    Iot__Device__V1__UpdateDeviceRequest req = IOT__DEVICE__V1__UPDATE_DEVICE_REQUEST__INIT;
    req.device = &d;
    req.update_mask = &mask;
    Iot__Device__V1__Device *out = NULL;
    cm_rpc_status_t st = {0};
    cm_call_opts_t o = {.timeout_ms = ctx->cfg->dm_timeout_ms, .idempotent = 1};
    int code = cm_channel_unary(ctx->dm, "/iot.device.v1.DeviceManager/UpdateDevice", &req.base, &iot__device__v1__device__descriptor,
                                (ProtobufCMessage **)&out, &o, &st);
    if (out) protobuf_c_message_free_unpacked(&out->base, NULL);
    if (code)
        code = cm_call_fail(call, CM_STATUS_UNAVAILABLE, "cannot record version %s in device-mgmt (%s %s); report again", version,
                            cm_status_name(code), st.message);
    cm_rpc_status_clear(&st);
    return code;
}

/* Whether a device may go from phase `from` to `to`: forward through the phases (repeats carry
 * progress), to FAILED from anywhere unfinished, to ROLLED_BACK after a failure or from anywhere
 * unfinished; nothing leaves SUCCEEDED or ROLLED_BACK. */
static int ota__phase_ok(int from, int to) {
    if (from == to) return 1;
    if (from == OTA_SUCCEEDED || from == OTA_ROLLED_BACK) return 0;
    if (from == OTA_FAILED) return to == OTA_ROLLED_BACK;
    if (to == OTA_FAILED || to == OTA_ROLLED_BACK) return 1;
    return to > from;
}

int ota_report_status_check(cm_call_t *call, ProtobufCMessage *req_) {
    const Iot__Ota__V1__ReportStatusRequest *req = (const void *)req_;
    if (!ota__id(req->rollout_id)) return cm_call_fail(call, CM_STATUS_INVALID_ARGUMENT, "rollout_id: a rollout id");
    int phase = (int)req->phase;
    if (phase < OTA_DOWNLOADING || phase > OTA_ROLLED_BACK)
        return cm_call_fail(call, CM_STATUS_INVALID_ARGUMENT, "phase: DOWNLOADING, VERIFYING, INSTALLING, SUCCEEDED, FAILED or ROLLED_BACK");
    if (req->progress < 0 || req->progress > 100) return cm_call_fail(call, CM_STATUS_INVALID_ARGUMENT, "progress: 0..100");
    if (strlen(req->error) > 1024) return cm_call_fail(call, CM_STATUS_INVALID_ARGUMENT, "error: up to 1024 characters");
    return 0;
}

int ota_report_status(cm_call_t *call, const ProtobufCMessage *req_, ProtobufCMessage *resp_) {
    ota_ctx_t *ctx = cm_call_service_ctx(call);
    const Iot__Ota__V1__ReportStatusRequest *req = (const void *)req_;
    Iot__Ota__V1__DeviceUpdate *resp = (void *)resp_;
    char device[OTA_MAX_ID + 1];
    int rc = ota__device_or_fail(call, ctx, device);
    if (!rc) rc = ota_report_status_check(call, (ProtobufCMessage *)req_);
    if (rc) return rc;
    int phase = (int)req->phase;
    cm_pg_conn_t *c = ota__conn_or_fail(call, ctx, &rc);
    if (!c) return rc;
    const char *p[2] = {req->rollout_id, device};
    PGresult *r = NULL;
    rc = cm_pg_begin(c);
    if (!rc)
        rc = cm_pg_exec(c, &r,
                        "SELECT d.phase, d.stage, coalesce(a.version, ''), d.from_version FROM device_updates AS d "
                        "JOIN rollouts AS ro ON ro.id = d.rollout_id LEFT JOIN artifacts AS a ON a.id = ro.artifact_id "
                        "WHERE d.rollout_id = $1::bigint AND d.device_id = $2 FOR UPDATE OF d",
                        2, p);
    if (rc) {
        cm_pg_rollback(c);
        return ota__pg_fail(call, ctx, c);
    }
    if (PQntuples(r) == 0) {
        PQclear(r);
        cm_pg_rollback(c);
        cm_pg_release(ctx->pg, c);
        return cm_call_fail(call, CM_STATUS_NOT_FOUND, "device %s is not part of rollout %s", device, req->rollout_id);
    }
    int from = atoi(PQgetvalue(r, 0, 0)), stage = atoi(PQgetvalue(r, 0, 1));
    char version[OTA_VERSION_MAX + 1], from_version[OTA_VERSION_MAX + 1];
    snprintf(version, sizeof version, "%s", PQgetvalue(r, 0, 2));
    snprintf(from_version, sizeof from_version, "%s", PQgetvalue(r, 0, 3));
    PQclear(r);
    if (!ota__phase_ok(from, phase)) {
        cm_pg_rollback(c);
        cm_pg_release(ctx->pg, c);
        return cm_call_fail(call, CM_STATUS_FAILED_PRECONDITION, "device %s's update in rollout %s is %s; it cannot become %s",
                            device, req->rollout_id, ota__phase(from), ota__phase(phase));
    }
    /* The version reaches device-mgmt before the success is recorded: a failure there leaves the
     * report undone, and the device's retry records both. */
    if (phase == OTA_SUCCEEDED && from != OTA_SUCCEEDED && *version && (rc = ota__record_version(call, ctx, device, version))) {
        cm_pg_rollback(c);
        cm_pg_release(ctx->pg, c);
        return rc;
    }
    char ph[8], prog[8];
    snprintf(ph, sizeof ph, "%d", req->phase);
    snprintf(prog, sizeof prog, "%d", req->progress);
    const char *up[5] = {req->rollout_id, device, ph, prog, req->error};
    rc = cm_pg_exec(c, &r,
                    "UPDATE device_updates SET phase = $3::int, progress = $4::int, error = $5, update_time = now() "
                    "WHERE rollout_id = $1::bigint AND device_id = $2 RETURNING (extract(epoch FROM update_time) * 1000)::bigint",
                    5, up);
    if (!rc) rc = cm_pg_commit(c);
    if (rc) {
        PQclear(r);
        cm_pg_rollback(c);
        return ota__pg_fail(call, ctx, c);
    }
    cm_pg_release(ctx->pg, c);
    resp->rollout_id = cm_call_strdup(call, req->rollout_id);
    resp->device_id = cm_call_strdup(call, device);
    resp->stage = stage;
    resp->phase = req->phase;
    resp->progress = req->progress;
    resp->error = cm_call_strdup(call, req->error);
    resp->from_version = cm_call_strdup(call, from_version);
    resp->update_time = ota__ts(call, PQgetvalue(r, 0, 0));
    PQclear(r);
    if (phase != from && ctx->ctl) ota_ctl_kick(ctx->ctl);
    return 0;
}
