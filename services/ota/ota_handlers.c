/* iot.ota.v1.Ota: the shared pieces of the handlers and the method table (see ota_handlers.h). */
#include "ota_handlers.h"

#include <ctype.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "cm_alloc.h"
#include "cm_buf.h"
#include "cm_err.h"
#include "cm_json.h"
#include "cm_log.h"
#include "cm_page.h"
#include "iot/device/v1/device.pb-c.h"
#include "ota_rollouts.h"

int ota_ctx_init(ota_ctx_t *ctx, const ota_config_t *cfg, cm_pg_t *pg, ota_keys_t *keys) {
    memset(ctx, 0, sizeof *ctx);
    int err = 0;
    ctx->dm = cm_channel_new(cfg->dm_addr, NULL, &err);
    if (!ctx->dm) return CM_EINVAL;
    ctx->cfg = cfg;
    ctx->pg = pg;
    ctx->keys = keys;
    ctx->c_uploads = cm_metrics_counter("ota_uploads_total", "artifacts uploaded and signed", NULL);
    ctx->c_uploaded_bytes = cm_metrics_counter("ota_upload_bytes_total", "artifact bytes received by uploads", NULL);
    ctx->c_upload_rejects = cm_metrics_counter("ota_upload_rejected_total", "uploads refused because IOT_OTA_MAX_UPLOADS were in progress", NULL);
    ctx->c_downloads = cm_metrics_counter("ota_downloads_total", "downloads started", NULL);
    ctx->c_download_bytes = cm_metrics_counter("ota_download_bytes_total", "artifact bytes sent to devices", NULL);
    ctx->g_downloads = cm_metrics_gauge("ota_downloads_active", "downloads in progress", NULL);
    ctx->c_cache_hits = cm_metrics_counter("ota_chunk_cache_hits_total", "download chunks served from memory", NULL);
    ctx->c_cache_misses = cm_metrics_counter("ota_chunk_cache_misses_total", "download chunks read from Postgres", NULL);
    ctx->g_cache_bytes = cm_metrics_gauge("ota_chunk_cache_bytes", "bytes of chunks held by the download cache", NULL);
    ctx->proc = cm_channel_new(cfg->proc_addr, NULL, &err);
    if (!ctx->proc) {
        cm_channel_free(ctx->dm);
        return CM_EINVAL;
    }
    ctx->cache = ota_cache_new((size_t)cfg->cache_bytes);
    return 0;
}

void ota_ctx_destroy(ota_ctx_t *ctx) {
    cm_channel_free(ctx->dm);
    cm_channel_free(ctx->proc);
    ctx->dm = ctx->proc = NULL;
    ota_cache_free(ctx->cache);
    ctx->cache = NULL;
}

/* ---- shared helpers ------------------------------------------------------------------------ */

cm_pg_conn_t *ota__conn_or_fail(cm_call_t *call, ota_ctx_t *ctx, int *rc) {
    cm_pg_conn_t *c = cm_pg_acquire(ctx->pg, 5000);
    if (!c) *rc = cm_call_fail(call, CM_STATUS_UNAVAILABLE, "database unavailable: %s", cm_pg_last_error(ctx->pg));
    return c;
}

int ota__pg_fail(cm_call_t *call, ota_ctx_t *ctx, cm_pg_conn_t *c) {
    int lost = cm_pg_conn_lost(c);
    char msg[256];
    snprintf(msg, sizeof msg, "%s", cm_pg_error(c));
    cm_pg_release(ctx->pg, c);
    if (lost) return cm_call_fail(call, CM_STATUS_UNAVAILABLE, "database connection lost; retry");
    cm_log_kv(CM_LOG_ERROR, "query failed", "method", cm_call_method(call), "error", msg, NULL);
    return cm_call_fail(call, CM_STATUS_INTERNAL, "database error");
}

int ota__device_or_fail(cm_call_t *call, ota_ctx_t *ctx, char *device_id) {
    const char *tok = cm_call_metadata(call, "authorization", NULL);
    if (!tok || strncasecmp(tok, "Bearer ", 7) != 0 || !tok[7])
        return cm_call_fail(call, CM_STATUS_UNAUTHENTICATED,
                            "missing device credentials: send metadata \"authorization: Bearer <device token>\"");
    tok += 7;
    while (*tok == ' ') tok++;
    if (!*tok || strlen(tok) > 512) return cm_call_fail(call, CM_STATUS_UNAUTHENTICATED, "malformed device token");
    Iot__Device__V1__AuthenticateDeviceRequest req = IOT__DEVICE__V1__AUTHENTICATE_DEVICE_REQUEST__INIT;
    req.token = (char *)tok;
    Iot__Device__V1__AuthenticateDeviceResponse *resp = NULL;
    cm_rpc_status_t st = {0};
    int64_t left = cm_call_deadline_ms(call);
    int64_t timeout = left < 0 || left > ctx->cfg->dm_timeout_ms ? ctx->cfg->dm_timeout_ms : left;
    cm_call_opts_t o = {.timeout_ms = timeout > 0 ? timeout : 1, .idempotent = 1};
    int code = cm_channel_unary(ctx->dm, "/iot.device.v1.DeviceManager/AuthenticateDevice", &req.base,
                                &iot__device__v1__authenticate_device_response__descriptor, (ProtobufCMessage **)&resp, &o, &st);
    int rc = 0;
    if (code == CM_STATUS_OK) {
        snprintf(device_id, OTA_MAX_ID + 1, "%s", resp->device_id);
        protobuf_c_message_free_unpacked(&resp->base, NULL);
    } else if (code == CM_STATUS_UNAUTHENTICATED || code == CM_STATUS_INVALID_ARGUMENT || code == CM_STATUS_NOT_FOUND ||
               code == CM_STATUS_PERMISSION_DENIED) {
        rc = cm_call_fail(call, CM_STATUS_UNAUTHENTICATED, "device token refused: %s", st.message);
    } else {
        rc = cm_call_fail(call, CM_STATUS_UNAVAILABLE, "cannot check the device token now: device-mgmt answered %s (%s); retry later",
                          cm_status_name(code), st.message);
    }
    cm_rpc_status_clear(&st);
    return rc;
}

int64_t ota__id(const char *s) {
    if (!s || !*s || strlen(s) > 18 || s[0] == '0') return 0;
    for (const char *p = s; *p; p++)
        if (!isdigit((unsigned char)*p)) return 0;
    return strtoll(s, NULL, 10);
}

Google__Protobuf__Timestamp *ota__ts(cm_call_t *call, const char *ms_text) {
    if (!ms_text || !*ms_text) return NULL;
    int64_t ms = strtoll(ms_text, NULL, 10), sec = ms / 1000, rem = ms % 1000;
    if (rem < 0) {
        rem += 1000;
        sec--;
    }
    Google__Protobuf__Timestamp *t = cm_call_alloc(call, sizeof *t);
    google__protobuf__timestamp__init(t);
    t->seconds = sec;
    t->nanos = (int32_t)(rem * 1000000);
    return t;
}

int ota__page_size(cm_call_t *call, int v, int def, int max, int *out) {
    if (v < 0 || v > max) return cm_call_fail(call, CM_STATUS_INVALID_ARGUMENT, "page_size: %d is not in 1..%d (0: %d)", v, max, def);
    *out = v ? v : def;
    return 0;
}

char *ota__token(cm_call_t *call, char kind, int64_t id) {
    char v[24];
    snprintf(v, sizeof v, "%" PRId64, id);
    return cm_page_token(call, kind, v);
}

int ota__token_parse(cm_call_t *call, const char *tok, char kind, int64_t *id) {
    char v[24];
    int rc = cm_page_token_parse_or_fail(call, tok, kind, v, sizeof v);
    *id = 0;
    if (rc || !*v) return rc;
    if (!(*id = ota__id(v)))
        return cm_call_fail(call, CM_STATUS_INVALID_ARGUMENT, "page_token: not a token this call issued; start again without one");
    return 0;
}

/* bytea in text output ("\x" + hex) into call memory. */
static ProtobufCBinaryData ota__bytea(cm_call_t *call, const char *text) {
    ProtobufCBinaryData b = {0, NULL};
    if (strncmp(text, "\\x", 2) != 0) return b;
    text += 2;
    size_t n = strlen(text) / 2;
    b.data = cm_call_alloc(call, n + 1);
    for (size_t i = 0; i < n; i++) {
        unsigned v = 0;
        sscanf(text + 2 * i, "%2x", &v);
        b.data[i] = (uint8_t)v;
    }
    b.len = n;
    return b;
}

Iot__Ota__V1__Artifact *ota__artifact_row(cm_call_t *call, PGresult *r, int row) { return ota__artifact_row_at(call, r, row, 0); }

Iot__Ota__V1__Artifact *ota__artifact_row_at(cm_call_t *call, PGresult *r, int row, int col0) {
    Iot__Ota__V1__Artifact *a = cm_call_alloc(call, sizeof *a);
    iot__ota__v1__artifact__init(a);
    a->id = cm_call_strdup(call, PQgetvalue(r, row, col0 + 0));
    a->name = cm_call_strdup(call, PQgetvalue(r, row, col0 + 1));
    a->version = cm_call_strdup(call, PQgetvalue(r, row, col0 + 2));
    /* Stored JSON is ours: models an array of strings, metadata an object of strings. */
    json_t *models = json_loads(PQgetvalue(r, row, col0 + 3), 0, NULL), *meta = json_loads(PQgetvalue(r, row, col0 + 5), 0, NULL);
    size_t nm = json_array_size(models);
    a->models = cm_call_alloc(call, sizeof *a->models * (nm + 1));
    for (size_t i = 0; i < nm; i++) a->models[a->n_models++] = cm_call_strdup(call, json_string_value(json_array_get(models, i)));
    a->release_notes = cm_call_strdup(call, PQgetvalue(r, row, col0 + 4));
    size_t nmeta = json_object_size(meta);
    a->metadata = cm_call_alloc(call, sizeof *a->metadata * (nmeta + 1));
    const char *k;
    json_t *v;
    json_object_foreach(meta, k, v) {
        Iot__Ota__V1__Artifact__MetadataEntry *e = cm_call_alloc(call, sizeof *e);
        iot__ota__v1__artifact__metadata_entry__init(e);
        e->key = cm_call_strdup(call, k);
        e->value = cm_call_strdup(call, json_string_value(v) ? json_string_value(v) : "");
        a->metadata[a->n_metadata++] = e;
    }
    json_decref(models);
    json_decref(meta);
    a->size = strtoll(PQgetvalue(r, row, col0 + 6), NULL, 10);
    a->sha256 = cm_call_strdup(call, PQgetvalue(r, row, col0 + 7));
    a->manifest = ota__bytea(call, PQgetvalue(r, row, col0 + 8));
    a->signature = ota__bytea(call, PQgetvalue(r, row, col0 + 9));
    a->key_id = cm_call_strdup(call, PQgetvalue(r, row, col0 + 10));
    a->create_time = ota__ts(call, PQgetvalue(r, row, col0 + 11));
    return a;
}

/* ---- the table ----------------------------------------------------------------------------- */

static const cm_method_t ota__methods[] = {
    {.name = "UploadArtifact", .kind = CM_RPC_CLIENT_STREAM, .message = ota_upload_message, .half_close = ota_upload_half_close,
     .done = ota_upload_done},
    {.name = "GetArtifact", .kind = CM_RPC_UNARY, .unary = ota_get_artifact, .check = ota_get_artifact_check},
    {.name = "ListArtifacts", .kind = CM_RPC_UNARY, .unary = ota_list_artifacts, .check = ota_list_artifacts_check},
    {.name = "DeleteArtifact", .kind = CM_RPC_UNARY, .unary = ota_delete_artifact, .check = ota_delete_artifact_check},
    {.name = "ListSigningKeys", .kind = CM_RPC_UNARY, .unary = ota_list_signing_keys},
    {.name = "CreateRollout", .kind = CM_RPC_UNARY, .unary = ota_create_rollout, .check = ota_create_rollout_check},
    {.name = "GetRollout", .kind = CM_RPC_UNARY, .unary = ota_get_rollout, .check = ota_get_rollout_check},
    {.name = "ListRollouts", .kind = CM_RPC_UNARY, .unary = ota_list_rollouts, .check = ota_list_rollouts_check},
    {.name = "StartRollout", .kind = CM_RPC_UNARY, .unary = ota_start_rollout, .check = ota_rollout_action_check},
    {.name = "PauseRollout", .kind = CM_RPC_UNARY, .unary = ota_pause_rollout, .check = ota_rollout_reason_check},
    {.name = "ResumeRollout", .kind = CM_RPC_UNARY, .unary = ota_resume_rollout, .check = ota_rollout_action_check},
    {.name = "CancelRollout", .kind = CM_RPC_UNARY, .unary = ota_cancel_rollout, .check = ota_rollout_reason_check},
    {.name = "ApproveStage", .kind = CM_RPC_UNARY, .unary = ota_approve_stage, .check = ota_approve_stage_check},
    {.name = "ListDeviceUpdates", .kind = CM_RPC_UNARY, .unary = ota_list_device_updates, .check = ota_list_device_updates_check},
    {.name = "CheckForUpdate", .kind = CM_RPC_UNARY, .unary = ota_check_for_update, .check = ota_check_for_update_check},
    /* Depth 2: the next chunk is read (cache or Postgres) while the previous one is on the wire. */
    {.name = "DownloadArtifact", .kind = CM_RPC_SERVER_STREAM, .start = ota_download_start, .writable = ota_download_writable,
     .writable_depth = 2, .done = ota_download_done, .check = ota_download_check},
    {.name = "ReportStatus", .kind = CM_RPC_UNARY, .unary = ota_report_status, .check = ota_report_status_check},
};

void ota_service_init(cm_service_t *svc, ota_ctx_t *ctx) {
    svc->desc = &iot__ota__v1__ota__descriptor;
    svc->methods = ota__methods;
    svc->n_methods = sizeof ota__methods / sizeof ota__methods[0];
    svc->ctx = ctx;
}
