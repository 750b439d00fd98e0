/* The REST routes and the generic proxy that serves most of them: the request message is built
 * from the JSON body, the path parameters and the query by one descriptor-driven mapping
 * (cm_pbjson), sent to the backend with the gateway's deadline, and the answer mapped back.
 *
 * Conventions (grpc-gateway's): GET lists and reads, POST creates (201) or acts ("...:pause"),
 * PATCH updates with ?updateMask=, DELETE deletes; path parameters name request fields (a dotted
 * name reaches into the body's message: PATCH /devices/{device.id}); every other request field can
 * be given as a query parameter in lowerCamelCase or its proto name (?pageSize=50&filter.type=x). */
#include <stdio.h>
#include <string.h>

#include "cm_err.h"
#include "cm_json.h"
#include "cm_pbjson.h"
#include "gw.h"
#include "gw_api.h"
#include "gw_artifacts.h"
#include "gw_openapi.h"
#include "gw_sse.h"
#include "iot/device/v1/device.pb-c.h"
#include "iot/ingest/v1/ingest.pb-c.h"
#include "iot/ota/v1/ota.pb-c.h"
#include "iot/processing/v1/processing.pb-c.h"
#include "iot/registry/v1/registry.pb-c.h"

#define V GW_ROLE_VIEWER
#define O GW_ROLE_OPERATOR
#define A GW_ROLE_ADMIN
#define DM "/iot.device.v1.DeviceManager/"
#define ING "/iot.ingest.v1.Ingest/"
#define PROC "/iot.processing.v1.Processing/"
#define OTA "/iot.ota.v1.Ota/"
#define REG "/iot.registry.v1.Registry/"
#define D(x) &iot__device__v1__##x##__descriptor
#define I(x) &iot__ingest__v1__##x##__descriptor
#define P(x) &iot__processing__v1__##x##__descriptor
#define T(x) &iot__ota__v1__##x##__descriptor
#define R(x) &iot__registry__v1__##x##__descriptor

/* method, pattern, role, handler, backend, rpc, request, response, body, idempotent, ok status, summary, begin */
const gw_route_t gw_routes[] = {
    /* devices */
    {"GET", "/api/v1/devices", V, NULL, GW_DM, DM "ListDevices", D(list_devices_request), D(list_devices_response), NULL, 1, 0, "List devices (filters: filter.type, filter.labelSelector, filter.statuses, ...)", NULL},
    {"GET", "/api/v1/devices:count", V, NULL, GW_DM, DM "CountDevices", D(count_devices_request), D(count_devices_response), NULL, 1, 0, "Count devices, in total and by status (the same filters as the list)", NULL},
    {"POST", "/api/v1/devices", A, NULL, GW_DM, DM "CreateDevice", D(create_device_request), D(device), "device", 0, 201, "Create a device", NULL},
    {"POST", "/api/v1/devices:batchCreate", A, NULL, GW_DM, DM "BatchCreateDevices", D(batch_create_devices_request), D(batch_create_devices_response), "*", 0, 201, "Create up to 10,000 devices at once (all or none)", NULL},
    {"GET", "/api/v1/devices/{id}", V, NULL, GW_DM, DM "GetDevice", D(get_device_request), D(device), NULL, 1, 0, "Get a device", NULL},
    {"PATCH", "/api/v1/devices/{device.id}", A, NULL, GW_DM, DM "UpdateDevice", D(update_device_request), D(device), "device", 0, 0, "Update a device (?updateMask=name,labels; etag in the body must match when given)", NULL},
    {"DELETE", "/api/v1/devices/{id}", A, NULL, GW_DM, DM "DeleteDevice", D(delete_device_request), D(delete_device_response), NULL, 0, 0, "Delete a device", NULL},
    {"POST", "/api/v1/devices/{device_id}/tokens", A, NULL, GW_DM, DM "IssueToken", D(issue_token_request), D(issue_token_response), "*", 0, 201, "Issue a device token (shown once)", NULL},
    {"POST", "/api/v1/tokens/{token_id}:rotate", A, NULL, GW_DM, DM "RotateToken", D(rotate_token_request), D(issue_token_response), "*", 0, 0, "Replace a token by a new one", NULL},
    {"DELETE", "/api/v1/tokens/{token_id}", A, NULL, GW_DM, DM "RevokeToken", D(revoke_token_request), D(revoke_token_response), NULL, 0, 0, "Revoke a token", NULL},
    {"GET", "/api/v1/devices/{device_id}/shadow", V, NULL, GW_DM, DM "GetShadow", D(get_shadow_request), D(shadow), NULL, 1, 0, "A device's shadow: desired, reported and their delta", NULL},
    {"PATCH", "/api/v1/devices/{device_id}/shadow/desired", O, NULL, GW_DM, DM "UpdateDesired", D(update_shadow_request), D(shadow), "*", 0, 0, "Merge-patch the desired state (JSON merge patch in \"patch\")", NULL},
    {"POST", "/api/v1/devices/{device_id}/commands", O, NULL, GW_DM, DM "SendCommand", D(send_command_request), D(command), "*", 0, 201, "Send a command to a device", NULL},
    {"GET", "/api/v1/devices/{device_id}/commands", V, NULL, GW_DM, DM "ListCommands", D(list_commands_request), D(list_commands_response), NULL, 1, 0, "A device's commands, newest first", NULL},
    {"GET", "/api/v1/commands/{id}", V, NULL, GW_DM, DM "GetCommand", D(get_command_request), D(command), NULL, 1, 0, "Get a command", NULL},
    /* groups */
    {"GET", "/api/v1/groups", V, NULL, GW_DM, DM "ListGroups", D(list_groups_request), D(list_groups_response), NULL, 1, 0, "List groups", NULL},
    {"POST", "/api/v1/groups", A, NULL, GW_DM, DM "CreateGroup", D(create_group_request), D(group), "group", 0, 201, "Create a group (static members, or a dynamic filter)", NULL},
    {"GET", "/api/v1/groups/{id}", V, NULL, GW_DM, DM "GetGroup", D(get_group_request), D(group), NULL, 1, 0, "Get a group", NULL},
    {"PATCH", "/api/v1/groups/{group.id}", A, NULL, GW_DM, DM "UpdateGroup", D(update_group_request), D(group), "group", 0, 0, "Update a group", NULL},
    {"DELETE", "/api/v1/groups/{id}", A, NULL, GW_DM, DM "DeleteGroup", D(delete_group_request), D(delete_group_response), NULL, 0, 0, "Delete a group", NULL},
    {"GET", "/api/v1/groups/{group_id}/members", V, NULL, GW_DM, DM "ListGroupMembers", D(list_group_members_request), D(list_group_members_response), NULL, 1, 0, "A group's members", NULL},
    {"POST", "/api/v1/groups/{group_id}/members:add", A, NULL, GW_DM, DM "AddGroupMembers", D(group_members_request), D(group_members_response), "*", 0, 0, "Add devices to a static group", NULL},
    {"POST", "/api/v1/groups/{group_id}/members:remove", A, NULL, GW_DM, DM "RemoveGroupMembers", D(group_members_request), D(group_members_response), "*", 0, 0, "Remove devices from a static group", NULL},
    /* telemetry */
    {"GET", "/api/v1/devices/{device_id}/telemetry", V, NULL, GW_INGEST, ING "QueryTelemetry", I(query_telemetry_request), I(query_telemetry_response), NULL, 1, 0, "Telemetry of a device (metric, fromMs, toMs, stepMs with aggregation)", NULL},
    {"GET", "/api/v1/devices/{device_id}/telemetry/latest", V, NULL, GW_INGEST, ING "LatestValues", I(latest_values_request), I(latest_values_response), NULL, 1, 0, "The latest value of each metric of a device", NULL},
    {"GET", "/api/v1/devices/{device_id}/telemetry/stream", V, gw_sse_telemetry, GW_INGEST, ING "WatchTelemetry", I(watch_telemetry_request), I(published_batch), NULL, 1, 0, "A device's telemetry as it is stored, as Server-Sent Events (event \"points\": a PublishedBatch; metrics filters; live only, no resume)", NULL},
    {"POST", "/api/v1/telemetry", 0, NULL, GW_INGEST, ING "PushTelemetry", I(push_telemetry_request), I(telemetry_ack), "*", 0, 0, "Push telemetry as a device (the device's token as \"Authorization: Bearer\")", NULL},
    /* rules, alerts, windows, rollups */
    {"GET", "/api/v1/rules", V, NULL, GW_PROC, PROC "ListRules", P(list_rules_request), P(list_rules_response), NULL, 1, 0, "List rules", NULL},
    {"POST", "/api/v1/rules", O, NULL, GW_PROC, PROC "CreateRule", P(create_rule_request), P(rule), "rule", 0, 201, "Create a rule", NULL},
    {"GET", "/api/v1/rules/{id}", V, NULL, GW_PROC, PROC "GetRule", P(get_rule_request), P(rule), NULL, 1, 0, "Get a rule", NULL},
    {"PATCH", "/api/v1/rules/{rule.id}", O, NULL, GW_PROC, PROC "UpdateRule", P(update_rule_request), P(rule), "rule", 0, 0, "Update a rule", NULL},
    {"DELETE", "/api/v1/rules/{id}", O, NULL, GW_PROC, PROC "DeleteRule", P(delete_rule_request), P(delete_rule_response), NULL, 0, 0, "Delete a rule", NULL},
    {"POST", "/api/v1/rules/{id}:setEnabled", O, NULL, GW_PROC, PROC "SetRuleEnabled", P(set_rule_enabled_request), P(rule), "*", 0, 0, "Enable or disable a rule ({\"enabled\": false})", NULL},
    {"GET", "/api/v1/rules/{rule_id}/stats", V, NULL, GW_PROC, PROC "GetRuleStats", P(get_rule_stats_request), P(rule_stats), NULL, 1, 0, "A rule's evaluation counters", NULL},
    {"GET", "/api/v1/rules/{rule_id}/windows/{device_id}", V, NULL, GW_PROC, PROC "GetWindowStats", P(get_window_stats_request), P(window_stats), NULL, 1, 0, "The current window of a rule for a device", NULL},
    {"GET", "/api/v1/alerts", V, NULL, GW_PROC, PROC "ListAlerts", P(list_alerts_request), P(list_alerts_response), NULL, 1, 0, "List alerts (state, minSeverity, ruleId, deviceId, firedAfter)", NULL},
    {"GET", "/api/v1/alerts/stream", V, gw_sse_alerts, GW_PROC, PROC "WatchAlerts", P(watch_alerts_request), P(alert), NULL, 1, 0, "Alert changes as Server-Sent Events (event \"alert\"; Last-Event-ID or afterEventId resumes; minSeverity)", NULL},
    {"GET", "/api/v1/alerts/{id}", V, NULL, GW_PROC, PROC "GetAlert", P(get_alert_request), P(alert), NULL, 1, 0, "Get an alert", NULL},
    {"POST", "/api/v1/alerts/{id}:ack", O, NULL, GW_PROC, PROC "AckAlert", P(ack_alert_request), P(alert), "*", 0, 0, "Acknowledge an alert (by: a name, recorded with the key id)", NULL},
    {"GET", "/api/v1/devices/{device_id}/rollups", V, NULL, GW_PROC, PROC "QueryRollups", P(query_rollups_request), P(query_rollups_response), NULL, 1, 0, "Stored rollups of a device's metric", NULL},
    /* firmware */
    {"GET", "/api/v1/artifacts", V, NULL, GW_OTA, OTA "ListArtifacts", T(list_artifacts_request), T(list_artifacts_response), NULL, 1, 0, "List firmware artifacts", NULL},
    {"POST", "/api/v1/artifacts", A, gw_artifacts_upload, GW_OTA, OTA "UploadArtifact", T(artifact_header), T(artifact), NULL, 0, 201, "Upload an artifact: the body is the content (any size up to IOT_GW_MAX_UPLOAD, streamed), the query its header (name, version, models, releaseNotes, sha256, size)", .begin = gw_artifacts_upload_begin},
    {"GET", "/api/v1/artifacts/{artifact_id}/content", 0, gw_artifacts_download, GW_OTA, OTA "DownloadArtifact", T(download_artifact_request), T(download_artifact_response), NULL, 1, 0, "Download an artifact as a device (its token as \"Authorization: Bearer\"); \"Range: bytes=N-\" resumes (206); X-Artifact-Sha256/-Signature/-Manifest/-Key-Id headers", NULL},
    {"GET", "/api/v1/artifacts/{id}", V, NULL, GW_OTA, OTA "GetArtifact", T(get_artifact_request), T(artifact), NULL, 1, 0, "Get an artifact (manifest and signature)", NULL},
    {"DELETE", "/api/v1/artifacts/{id}", A, NULL, GW_OTA, OTA "DeleteArtifact", T(delete_artifact_request), T(delete_artifact_response), NULL, 0, 0, "Delete an artifact no rollout uses", NULL},
    {"GET", "/api/v1/signing-keys", V, NULL, GW_OTA, OTA "ListSigningKeys", T(list_signing_keys_request), T(list_signing_keys_response), NULL, 1, 0, "Public keys that sign artifacts", NULL},
    {"GET", "/api/v1/rollouts", V, NULL, GW_OTA, OTA "ListRollouts", T(list_rollouts_request), T(list_rollouts_response), NULL, 1, 0, "List rollouts", NULL},
    {"POST", "/api/v1/rollouts", O, NULL, GW_OTA, OTA "CreateRollout", T(create_rollout_request), T(rollout), "rollout", 0, 201, "Create a staged rollout", NULL},
    {"GET", "/api/v1/rollouts/{id}", V, NULL, GW_OTA, OTA "GetRollout", T(get_rollout_request), T(rollout), NULL, 1, 0, "A rollout with per-stage counts", NULL},
    {"POST", "/api/v1/rollouts/{id}:start", O, NULL, GW_OTA, OTA "StartRollout", T(rollout_action_request), T(rollout), "*", 0, 0, "Start a rollout", NULL},
    {"POST", "/api/v1/rollouts/{id}:pause", O, NULL, GW_OTA, OTA "PauseRollout", T(rollout_action_request), T(rollout), "*", 0, 0, "Pause a rollout (reason)", NULL},
    {"POST", "/api/v1/rollouts/{id}:resume", O, NULL, GW_OTA, OTA "ResumeRollout", T(rollout_action_request), T(rollout), "*", 0, 0, "Resume a paused rollout", NULL},
    {"POST", "/api/v1/rollouts/{id}:cancel", O, NULL, GW_OTA, OTA "CancelRollout", T(rollout_action_request), T(rollout), "*", 0, 0, "Cancel a rollout", NULL},
    {"POST", "/api/v1/rollouts/{id}:approveStage", O, NULL, GW_OTA, OTA "ApproveStage", T(approve_stage_request), T(rollout), "*", 0, 0, "Approve the stage awaiting manual approval", NULL},
    {"GET", "/api/v1/rollouts/{rollout_id}/devices", V, NULL, GW_OTA, OTA "ListDeviceUpdates", T(list_device_updates_request), T(list_device_updates_response), NULL, 1, 0, "Each device's update in a rollout", NULL},
    /* services */
    {"GET", "/api/v1/services", V, NULL, GW_REGISTRY, REG "ListServices", R(list_services_request), R(list_services_response), NULL, 1, 0, "Registered services with instance counts", NULL},
    {"GET", "/api/v1/services/{service}/instances", V, NULL, GW_REGISTRY, REG "Discover", R(discover_request), R(discover_response), NULL, 1, 0, "A service's instances and their health", NULL},
    /* the gateway's own */
    {"GET", "/api/v1/openapi.json", GW_ROLE_PUBLIC, gw_openapi, -1, NULL, &iot__gateway__v1__who_am_irequest__descriptor, &iot__gateway__v1__api_key__descriptor, NULL, 1, 0, "This document (OpenAPI 3.0)", NULL},
    {"GET", "/api/v1/whoami", V, gw_api_whoami, 0, NULL, &iot__gateway__v1__who_am_irequest__descriptor, &iot__gateway__v1__api_key__descriptor, NULL, 1, 0, "The key making the request", NULL},
    {"GET", "/api/v1/keys", A, gw_api_list_keys, 0, NULL, &iot__gateway__v1__list_api_keys_request__descriptor, &iot__gateway__v1__list_api_keys_response__descriptor, NULL, 1, 0, "List API keys", NULL},
    {"POST", "/api/v1/keys", A, gw_api_create_key, 0, NULL, &iot__gateway__v1__create_api_key_request__descriptor, &iot__gateway__v1__create_api_key_response__descriptor, "*", 0, 201, "Create an API key (its secret is shown only in this answer)", NULL},
    {"GET", "/api/v1/keys/{id}", A, gw_api_get_key, 0, NULL, &iot__gateway__v1__get_api_key_request__descriptor, &iot__gateway__v1__api_key__descriptor, NULL, 1, 0, "Get an API key", NULL},
    {"DELETE", "/api/v1/keys/{id}", A, gw_api_revoke_key, 0, NULL, &iot__gateway__v1__revoke_api_key_request__descriptor, &iot__gateway__v1__api_key__descriptor, NULL, 0, 0, "Revoke an API key", NULL},
};
const size_t gw_n_routes = sizeof gw_routes / sizeof gw_routes[0];

int gw_request_from_parts(const gw_route_t *rt, const gw_parts_t *in, cm_arena_t *a, ProtobufCMessage **out, char *err,
                          size_t cap) {
    ProtobufCMessage *m = cm_arena_alloc(a, rt->req->sizeof_message);
    rt->req->message_init(m);
    char why[512];
    if (rt->body) {
        json_t *j;
        if (in->body_len == 0) { /* an empty body is an empty message */
            j = json_object();
        } else if (!(j = cm_json_parse(in->body, in->body_len, why, sizeof why))) {
            snprintf(err, cap, "malformed JSON: %s", why); /* "line 1, column 7 (byte 6): ..." */
            return CM_EINVAL;
        }
        int rc;
        if (strcmp(rt->body, "*") == 0) {
            rc = cm_pbjson_merge(j, m, a, why, sizeof why);
        } else {
            const ProtobufCFieldDescriptor *f = cm_pbjson_field(rt->req, rt->body);
            ProtobufCMessage *sub = NULL;
            rc = cm_pbjson_to_msg(j, f->descriptor, a, &sub, why, sizeof why);
            if (rc == 0) *(ProtobufCMessage **)((char *)m + f->offset) = sub;
        }
        json_decref(j);
        if (rc) {
            snprintf(err, cap, "body: %s", why);
            return CM_EINVAL;
        }
    }
    for (size_t i = 0; i < in->n_query; i++) { /* the query: any request field */
        if (cm_pbjson_set(m, in->query_name[i], in->query[i], a, why, sizeof why)) {
            snprintf(err, cap, "query parameter %s", why);
            return CM_EINVAL;
        }
    }
    for (int i = 0; i < in->n_params; i++) { /* the path wins over body and query */
        if (cm_pbjson_set(m, in->param_name[i], in->param[i], a, why, sizeof why)) {
            snprintf(err, cap, "path parameter %s", why);
            return CM_EINVAL;
        }
    }
    *out = m;
    return 0;
}

ProtobufCMessage *gw_build_request_or_reply(gw_req_t *r) {
    gw_parts_t in = {.param_name = r->param_name, .param = r->param, .n_params = r->n_params};
    in.body = cm_http_body(r->http, &in.body_len);
    const char *k, *v;
    while (cm_http_query_at(r->http, in.n_query, &k, &v) == 0) in.n_query++;
    const char **q = cm_arena_alloc(&r->arena, 2 * (in.n_query + 1) * sizeof *q);
    for (size_t i = 0; i < in.n_query; i++) cm_http_query_at(r->http, i, &q[i], &q[in.n_query + 1 + i]);
    in.query_name = q;
    in.query = q + in.n_query + 1;
    ProtobufCMessage *m = NULL;
    char err[1024];
    if (gw_request_from_parts(r->route, &in, &r->arena, &m, err, sizeof err)) {
        gw_reply_error(r, CM_STATUS_INVALID_ARGUMENT, NULL, "%s", err);
        return NULL;
    }
    return m;
}

void gw_proxy(gw_req_t *r) {
    const gw_route_t *rt = r->route;
    ProtobufCMessage *req = gw_build_request_or_reply(r);
    if (!req) return;
    /* Who acts (AckAlert's "by"): always the key, so it cannot be claimed for another; a name the
     * caller gives is kept in front of it ("alice (api-key:0a1b...)"). */
    const ProtobufCFieldDescriptor *by = protobuf_c_message_descriptor_get_field_by_name(rt->req, "by");
    if (by && by->type == PROTOBUF_C_TYPE_STRING && r->key.id[0]) {
        char **p = (char **)((char *)req + by->offset);
        const char *given = *p && **p ? *p : NULL;
        size_t cap = (given ? strlen(given) + 3 : 0) + sizeof r->key.id + 8;
        char *v = cm_arena_alloc(&r->arena, cap);
        if (given) snprintf(v, cap, "%s (api-key:%s)", given, r->key.id);
        else snprintf(v, cap, "api-key:%s", r->key.id);
        *p = v;
    }
    cm_md_t md[1];
    cm_call_opts_t o = {.timeout_ms = r->gw->cfg->timeout_ms, .idempotent = rt->idempotent};
    if (rt->role == 0) { /* device routes: the device's own token goes through */
        const char *auth = cm_http_header(r->http, "Authorization");
        if (!auth) {
            gw_reply_error(r, CM_STATUS_UNAUTHENTICATED, NULL, "a device token is required: send \"Authorization: Bearer <token>\"");
            return;
        }
        md[0].key = "authorization";
        md[0].val = auth;
        md[0].vlen = 0;
        o.md = md;
        o.n_md = 1;
    }
    ProtobufCMessage *resp = NULL;
    cm_rpc_status_t st = {0};
    int code = cm_channel_unary(r->gw->ch[rt->backend], rt->rpc, req, rt->resp, &resp, &o, &st);
    if (code == CM_STATUS_OK) gw_reply_msg(r, rt->ok_status ? rt->ok_status : 200, resp);
    else gw_reply_backend_error(r, rt->backend, &st);
    if (resp) protobuf_c_message_free_unpacked(resp, NULL);
    cm_rpc_status_clear(&st);
}

int gw_routes_check(char *why, size_t cap) {
    for (size_t i = 0; i < gw_n_routes; i++) {
        const gw_route_t *rt = &gw_routes[i];
        if (rt->body && strcmp(rt->body, "*")) {
            const ProtobufCFieldDescriptor *f = cm_pbjson_field(rt->req, rt->body);
            if (!f || f->type != PROTOBUF_C_TYPE_MESSAGE || f->label == PROTOBUF_C_LABEL_REPEATED) {
                snprintf(why, cap, "%s %s: body field %s is not a message field of %s", rt->method, rt->pattern, rt->body, rt->req->name);
                return CM_EINVAL;
            }
        }
        for (const char *p = strchr(rt->pattern, '{'); p; p = strchr(p + 1, '{')) {
            char name[64];
            const char *e = strchr(p, '}');
            snprintf(name, sizeof name, "%.*s", (int)(e - p - 1), p + 1);
            /* A dotted parameter reaches into a sub-message: check its first part here. */
            char *dot = strchr(name, '.');
            if (dot) *dot = 0;
            if (!cm_pbjson_field(rt->req, name)) {
                snprintf(why, cap, "%s %s: {%s} is not a field of %s", rt->method, rt->pattern, name, rt->req->name);
                return CM_EINVAL;
            }
        }
    }
    return 0;
}
