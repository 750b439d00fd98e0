/* The iot.ota.v1.Ota service: what every handler shares (the context, device authentication,
 * row conversions), and the method table. Artifacts are in ota_artifacts.c. */
#ifndef OTA_HANDLERS_H
#define OTA_HANDLERS_H

#include <stdatomic.h>
#include <stdint.h>

#include "cm_metrics.h"
#include "cm_pg.h"
#include "cm_rpc.h"
#include "iot/ota/v1/ota.pb-c.h"
#include "ota_cache.h"
#include "ota_config.h"
#include "ota_keys.h"

#define OTA_MAX_ID 128 /* device ids */

typedef struct ota_ctx_s {
    const ota_config_t *cfg;
    cm_pg_t *pg;
    ota_keys_t *keys;
    cm_channel_t *dm;
    atomic_int uploads; /* in progress */
    cm_counter_t *c_uploaded_bytes, *c_uploads, *c_upload_rejects, *c_download_bytes, *c_downloads;
    cm_gauge_t *g_downloads;
    atomic_int downloads;
    cm_channel_t *proc;     /* processing, for the telemetry gate */
    ota_cache_t *cache;     /* chunks shared by downloads */
    cm_counter_t *c_cache_hits, *c_cache_misses;
    cm_gauge_t *g_cache_bytes;
    struct ota_ctl_s *ctl;  /* the rollout controller; NULL until started */
} ota_ctx_t;

/* Creates the device-mgmt channel and the metrics. 0, or CM_EINVAL for an unusable address. */
int ota_ctx_init(ota_ctx_t *ctx, const ota_config_t *cfg, cm_pg_t *pg, ota_keys_t *keys);
void ota_ctx_destroy(ota_ctx_t *ctx);
void ota_service_init(cm_service_t *svc, ota_ctx_t *ctx);

/* ---- shared by the handler files ---------------------------------------------------------- */

/* A pooled connection, or NULL after failing the call with UNAVAILABLE (*rc holds the status). */
cm_pg_conn_t *ota__conn_or_fail(cm_call_t *call, ota_ctx_t *ctx, int *rc);
/* Releases c and fails the call: UNAVAILABLE when Postgres went away, INTERNAL otherwise (logged). */
int ota__pg_fail(cm_call_t *call, ota_ctx_t *ctx, cm_pg_conn_t *c);
/* The caller's device, from "authorization: Bearer <device token>" through device-mgmt. 0 with the
 * id in device_id (OTA_MAX_ID + 1 bytes), or the status the call was failed with. */
int ota__device_or_fail(cm_call_t *call, ota_ctx_t *ctx, char *device_id);
/* A decimal id > 0 (artifact, rollout), or 0. */
int64_t ota__id(const char *s);
Google__Protobuf__Timestamp *ota__ts(cm_call_t *call, const char *ms_text);
/* page_size in 0..max (0: def), or INVALID_ARGUMENT. */
int ota__page_size(cm_call_t *call, int v, int def, int max, int *out);
/* Opaque page tokens carrying one id: "" or a token this service issued, else INVALID_ARGUMENT. */
char *ota__token(cm_call_t *call, char kind, int64_t id);
int ota__token_parse(cm_call_t *call, const char *tok, char kind, int64_t *id);


/* Columns for ota__artifact_row, selected from artifacts AS a. */
#define OTA_ARTIFACT_COLS                                                                                              \
    "a.id, a.name, a.version, array_to_json(a.models)::text, a.release_notes, a.metadata::text, a.size, a.sha256, "   \
    "a.manifest, a.signature, a.key_id, (extract(epoch FROM a.create_time) * 1000)::bigint"
/* A row of OTA_ARTIFACT_COLS (text results) as an Artifact in the call arena. */
Iot__Ota__V1__Artifact *ota__artifact_row(cm_call_t *call, PGresult *r, int row);
/* The same with the artifact's columns starting at col0. */
Iot__Ota__V1__Artifact *ota__artifact_row_at(cm_call_t *call, PGresult *r, int row, int col0);

/* ---- handlers (ota_artifacts.c) ----------------------------------------------------------- */

int ota_upload_message(cm_call_t *call, const ProtobufCMessage *msg);
int ota_upload_half_close(cm_call_t *call, ProtobufCMessage *resp);
void ota_upload_done(cm_call_t *call, int cancelled);
int ota_get_artifact(cm_call_t *call, const ProtobufCMessage *req, ProtobufCMessage *resp);
int ota_list_artifacts(cm_call_t *call, const ProtobufCMessage *req, ProtobufCMessage *resp);
int ota_delete_artifact(cm_call_t *call, const ProtobufCMessage *req, ProtobufCMessage *resp);
int ota_list_signing_keys(cm_call_t *call, const ProtobufCMessage *req, ProtobufCMessage *resp);
int ota_download_start(cm_call_t *call, const ProtobufCMessage *req);
/* Request checks (cm_method_t.check) of these handlers. */
int ota_get_artifact_check(cm_call_t *call, ProtobufCMessage *req);
int ota_list_artifacts_check(cm_call_t *call, ProtobufCMessage *req);
int ota_delete_artifact_check(cm_call_t *call, ProtobufCMessage *req);
int ota_download_check(cm_call_t *call, ProtobufCMessage *req);
int ota_download_writable(cm_call_t *call);
void ota_download_done(cm_call_t *call, int cancelled);

#endif
