/* Staged rollouts: the controller that moves running rollouts along (assigns devices to stages,
 * checks success and error thresholds, soaks under the telemetry gate, completes), and the
 * device-mgmt / processing lookups it shares with the handlers.
 *
 * Every replica runs the controller; a step on a rollout holds its row lock (SELECT ... FOR UPDATE
 * SKIP LOCKED), so replicas never step the same rollout at once, and a step's changes commit
 * together or not at all. */
#ifndef OTA_ROLLOUTS_H
#define OTA_ROLLOUTS_H

#include "cm_map.h"
#include "ota_handlers.h"

/* Rollout states and update phases, as stored (the proto enum values). */
enum {
    OTA_DRAFT = 1,
    OTA_RUNNING = 2,
    OTA_PAUSED = 3,
    OTA_COMPLETED = 4,
    OTA_CANCELLED = 5,
};
enum {
    OTA_PENDING = 1,
    OTA_OFFERED = 2,
    OTA_DOWNLOADING = 3,
    OTA_VERIFYING = 4,
    OTA_INSTALLING = 5,
    OTA_SUCCEEDED = 6,
    OTA_FAILED = 7,
    OTA_ROLLED_BACK = 8,
};

typedef struct ota_ctl_s ota_ctl_t;

/* Starts the controller loop (every IOT_OTA_CONTROLLER_INTERVAL). */
ota_ctl_t *ota_ctl_start(ota_ctx_t *ctx);
/* Steps the running rollouts now (after a start, a resume, an approval or a status report). */
void ota_ctl_kick(ota_ctl_t *c);
/* Stops and joins. Accepts NULL. */
void ota_ctl_stop(ota_ctl_t *c);

/* The devices a target selects, through device-mgmt ListDevices: id -> firmware_version (cm_strdup'ed
 * strings; free with cm_map_free(out, cm_free)), only devices whose model is one of models[0..n).
 * CM_STATUS_OK, or the status device-mgmt answered with its message in msg. */
int ota_target_devices(ota_ctx_t *ctx, const char *group_id, const char *model, const char *label_selector,
                       char *const *models, size_t n_models, cm_map_t *out, char *msg, size_t msg_len);

/* ---- handlers (ota_rollouts.c, ota_devices.c) ----------------------------------------------- */

int ota_create_rollout(cm_call_t *call, const ProtobufCMessage *req, ProtobufCMessage *resp);
int ota_get_rollout(cm_call_t *call, const ProtobufCMessage *req, ProtobufCMessage *resp);
int ota_list_rollouts(cm_call_t *call, const ProtobufCMessage *req, ProtobufCMessage *resp);
int ota_start_rollout(cm_call_t *call, const ProtobufCMessage *req, ProtobufCMessage *resp);
int ota_pause_rollout(cm_call_t *call, const ProtobufCMessage *req, ProtobufCMessage *resp);
int ota_resume_rollout(cm_call_t *call, const ProtobufCMessage *req, ProtobufCMessage *resp);
int ota_cancel_rollout(cm_call_t *call, const ProtobufCMessage *req, ProtobufCMessage *resp);
int ota_approve_stage(cm_call_t *call, const ProtobufCMessage *req, ProtobufCMessage *resp);
int ota_list_device_updates(cm_call_t *call, const ProtobufCMessage *req, ProtobufCMessage *resp);
int ota_check_for_update(cm_call_t *call, const ProtobufCMessage *req, ProtobufCMessage *resp);
int ota_report_status(cm_call_t *call, const ProtobufCMessage *req, ProtobufCMessage *resp);
/* Request checks (cm_method_t.check) of these handlers. */
int ota_create_rollout_check(cm_call_t *call, ProtobufCMessage *req);
int ota_get_rollout_check(cm_call_t *call, ProtobufCMessage *req);
int ota_list_rollouts_check(cm_call_t *call, ProtobufCMessage *req);
int ota_rollout_action_check(cm_call_t *call, ProtobufCMessage *req);
int ota_rollout_reason_check(cm_call_t *call, ProtobufCMessage *req);
int ota_approve_stage_check(cm_call_t *call, ProtobufCMessage *req);
int ota_list_device_updates_check(cm_call_t *call, ProtobufCMessage *req);
int ota_check_for_update_check(cm_call_t *call, ProtobufCMessage *req);
int ota_report_status_check(cm_call_t *call, ProtobufCMessage *req);

#endif
