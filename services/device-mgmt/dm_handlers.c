/* iot.device.v1.DeviceManager handlers: validation naming the offending field, then one store
 * operation each. */
#include "dm_handlers.h"

#include <ctype.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cm_err.h"
#include "cm_selector.h"
#include "dm_ca.h"

#define DM_BATCH_MAX 10000
#define DM_MAP_MAX 64
#define DM_PAGE_DEFAULT 100
#define DM_PAGE_MAX 1000

static dm_store_t *dm__store(cm_call_t *call) { return ((dm_ctx_t *)cm_call_service_ctx(call))->store; }

static int dm__fail(cm_call_t *call, int code, const dm_err_t *e) { return cm_call_fail(call, code, "%s", e->msg); }

/* ---- validation -------------------------------------------------------------------------- */

/* Well-formed UTF-8 without control characters, at most max bytes. */
static int dm__text_ok(const char *s, size_t max) {
    const unsigned char *p = (const unsigned char *)s;
    size_t n = strlen(s);
    if (n > max) return 0;
    while (*p) {
        unsigned c = *p;
        int len = c < 0x80 ? 1 : (c >> 5) == 6 ? 2 : (c >> 4) == 14 ? 3 : (c >> 3) == 30 ? 4 : 0;
        if (!len || (len == 1 && (c < 0x20 || c == 0x7f))) return 0;
        if (len == 2 && c < 0xc2) return 0; /* overlong */
        for (int i = 1; i < len; i++)
            if ((p[i] & 0xc0) != 0x80) return 0;
        if (len == 3) {
            unsigned cp = ((c & 15) << 12) | ((p[1] & 63u) << 6) | (p[2] & 63u);
            if (cp < 0x800 || (cp >= 0xd800 && cp <= 0xdfff)) return 0;
        }
        if (len == 4) {
            unsigned cp = ((c & 7) << 18) | ((p[1] & 63u) << 12) | ((p[2] & 63u) << 6) | (p[3] & 63u);
            if (cp < 0x10000 || cp > 0x10ffff) return 0;
        }
        p += len;
    }
    return 1;
}

#define DM_ID_RULE "1-128 characters of A-Z, a-z, 0-9, '.', '_', ':', '-', starting with a letter or digit"

static int dm__type_ok(const char *s) {
    if (!*s) return 1;
    size_t n = strlen(s);
    if (n > 63 || !(islower((unsigned char)s[0]) || isdigit((unsigned char)s[0]))) return 0;
    for (size_t i = 1; i < n; i++)
        if (!islower((unsigned char)s[i]) && !isdigit((unsigned char)s[i]) && !strchr("._-", s[i])) return 0;
    return 1;
}

static int dm__id_or_fail(cm_call_t *call, const char *field, const char *id) {
    if (dm__id_ok(id)) return 0;
    return cm_call_fail(call, CM_STATUS_INVALID_ARGUMENT, "%s: %s", field, *id ? DM_ID_RULE : "required");
}

static int dm__page_or_fail(cm_call_t *call, int32_t *size) {
    if (*size < 0 || *size > DM_PAGE_MAX)
        return cm_call_fail(call, CM_STATUS_INVALID_ARGUMENT, "page_size: %d is not in 0..%d", *size, DM_PAGE_MAX);
    if (*size == 0) *size = DM_PAGE_DEFAULT;
    return 0;
}

static int dm__status_ok(int st) { return st >= 1 && st <= 6; }

/* Validates the writable fields of a device; `where` prefixes field names ("device", "devices[7]"). */
static int dm__device_or_fail(cm_call_t *call, const char *where, const dm_device_t *d, int need_id) {
    if ((need_id || *d->id) && !dm__id_ok(d->id))
        return cm_call_fail(call, CM_STATUS_INVALID_ARGUMENT, "%s.id: %s", where, *d->id ? DM_ID_RULE : "required");
    if (!dm__text_ok(d->name, 200))
        return cm_call_fail(call, CM_STATUS_INVALID_ARGUMENT, "%s.name: up to 200 bytes of UTF-8 without control characters", where);
    if (!dm__type_ok(d->type))
        return cm_call_fail(call, CM_STATUS_INVALID_ARGUMENT,
                            "%s.type: up to 63 characters of a-z, 0-9, '.', '_', '-', starting with a letter or digit", where);
    if (!dm__text_ok(d->model, 64) || !dm__text_ok(d->firmware_version, 64))
        return cm_call_fail(call, CM_STATUS_INVALID_ARGUMENT, "%s.model and firmware_version: up to 64 printable bytes", where);
    if (d->location) {
        if (!dm__text_ok(d->location->site, 200))
            return cm_call_fail(call, CM_STATUS_INVALID_ARGUMENT, "%s.location.site: up to 200 printable bytes", where);
        if (!isfinite(d->location->latitude) || fabs(d->location->latitude) > 90 || !isfinite(d->location->longitude) ||
            fabs(d->location->longitude) > 180)
            return cm_call_fail(call, CM_STATUS_INVALID_ARGUMENT,
                                "%s.location: latitude must be in -90..90 and longitude in -180..180", where);
    }
    if (d->n_labels > DM_MAP_MAX)
        return cm_call_fail(call, CM_STATUS_INVALID_ARGUMENT, "%s.labels: at most %d entries", where, DM_MAP_MAX);
    for (size_t i = 0; i < d->n_labels; i++)
        if (!cm_selector_key_ok(d->labels[i]->key) || !cm_selector_value_ok(d->labels[i]->value))
            return cm_call_fail(call, CM_STATUS_INVALID_ARGUMENT,
                                "%s.labels[\"%.64s\"]: keys 1-63 characters of A-Z, a-z, 0-9, '.', '_', '/', '-'; values "
                                "up to 63 of A-Z, a-z, 0-9, '.', '_', '-'",
                                where, dm__text_ok(d->labels[i]->key, 64) ? d->labels[i]->key : "?");
    if (d->n_metadata > DM_MAP_MAX)
        return cm_call_fail(call, CM_STATUS_INVALID_ARGUMENT, "%s.metadata: at most %d entries", where, DM_MAP_MAX);
    for (size_t i = 0; i < d->n_metadata; i++)
        if (!*d->metadata[i]->key || !dm__text_ok(d->metadata[i]->key, 128) || !dm__text_ok(d->metadata[i]->value, 1024))
            return cm_call_fail(call, CM_STATUS_INVALID_ARGUMENT,
                                "%s.metadata: keys 1-128 and values up to 1024 bytes of UTF-8 without control characters", where);
    if (d->status && !dm__status_ok(d->status))
        return cm_call_fail(call, CM_STATUS_INVALID_ARGUMENT, "%s.status: %d is not a DeviceStatus", where, (int)d->status);
    return 0;
}

static int dm__filter_or_fail(cm_call_t *call, const char *where, const dm_filter_t *f, int in_group) {
    if (!f) return 0;
    if (!dm__type_ok(f->type))
        return cm_call_fail(call, CM_STATUS_INVALID_ARGUMENT, "%s.type: a device type (a-z, 0-9, '.', '_', '-')", where);
    if (!dm__text_ok(f->model, 64) || !dm__text_ok(f->firmware_version, 64) || !dm__text_ok(f->name_contains, 200) ||
        !dm__text_ok(f->site_prefix, 200) || !dm__text_ok(f->search, 200))
        return cm_call_fail(call, CM_STATUS_INVALID_ARGUMENT,
                            "%s: model, firmware_version up to 64 and name_contains, site_prefix, search up to 200 printable bytes",
                            where);
    for (size_t i = 0; i < f->n_statuses; i++)
        if (!dm__status_ok(f->statuses[i]))
            return cm_call_fail(call, CM_STATUS_INVALID_ARGUMENT, "%s.statuses[%zu]: %d is not a DeviceStatus", where, i,
                                (int)f->statuses[i]);
    if (f->n_statuses > 6)
        return cm_call_fail(call, CM_STATUS_INVALID_ARGUMENT, "%s.statuses: at most 6 entries", where);
    if (*f->label_selector) {
        char err[256];
        cm_selector_t *sel = cm_selector_parse(f->label_selector, err, sizeof err);
        if (!sel) return cm_call_fail(call, CM_STATUS_INVALID_ARGUMENT, "%s.%s", where, err);
        cm_selector_free(sel);
    }
    if (*f->group_id) {
        if (in_group)
            return cm_call_fail(call, CM_STATUS_INVALID_ARGUMENT, "%s.group_id: a group's filter cannot name a group", where);
        if (!dm__id_ok(f->group_id))
            return cm_call_fail(call, CM_STATUS_INVALID_ARGUMENT, "%s.group_id: %s", where, DM_ID_RULE);
    }
    return 0;
}

/* The device's token from `authorization: Bearer <token>`, checked; the token must belong to
 * device_id. 0, or the failure already set on the call. */
static int dm__device_auth_or_fail(cm_call_t *call, const char *device_id) {
    const char *h = cm_call_metadata(call, "authorization", NULL);
    if (!h || strncasecmp(h, "Bearer ", 7) != 0)
        return cm_call_fail(call, CM_STATUS_UNAUTHENTICATED, "missing `authorization: Bearer <device token>` metadata");
    dm_auth_t auth;
    dm_err_t e;
    int code = dm_store_authenticate(dm__store(call), h + 7, &auth, &e);
    if (code) return dm__fail(call, code, &e);
    if (strcmp(auth.device_id, device_id) != 0)
        return cm_call_fail(call, CM_STATUS_PERMISSION_DENIED, "the token belongs to another device than \"%s\"", device_id);
    return 0;
}

/* The update mask paths, checked against the settable fields. */
static int dm__mask_or_fail(cm_call_t *call, const Google__Protobuf__FieldMask *m, const char *const *allowed) {
    if (!m) return 0;
    for (size_t i = 0; i < m->n_paths; i++) {
        int ok = 0;
        for (const char *const *a = allowed; *a && !ok; a++) ok = strcmp(m->paths[i], *a) == 0;
        if (!ok)
            return cm_call_fail(call, CM_STATUS_INVALID_ARGUMENT, "update_mask.paths[%zu]: \"%.64s\" is not a settable field", i,
                                dm__text_ok(m->paths[i], 64) ? m->paths[i] : "?");
    }
    return 0;
}

/* ---- devices --------------------------------------------------------------------------------- */

static int dm_create_device_check(cm_call_t *call, ProtobufCMessage *req_) {
    const Iot__Device__V1__CreateDeviceRequest *req = (const void *)req_;
    if (!req->device) return cm_call_fail(call, CM_STATUS_INVALID_ARGUMENT, "device: required");
    return dm__device_or_fail(call, "device", req->device, 0);
}

static int dm_create_device(cm_call_t *call, const ProtobufCMessage *req_, ProtobufCMessage *resp_) {
    const Iot__Device__V1__CreateDeviceRequest *req = (const void *)req_;
    int rc = dm_create_device_check(call, (ProtobufCMessage *)req_);
    if (rc) return rc;
    dm_device_t *d = req->device;
    dm_err_t e;
    int code = dm_store_create_devices(dm__store(call), &d, 1, cm_call_pb_allocator(call), &e);
    if (code == CM_STATUS_ALREADY_EXISTS) return cm_call_fail(call, code, "device.id: device \"%s\" already exists", d->id);
    if (code) return dm__fail(call, code, &e);
    *(dm_device_t *)resp_ = *d;
    return CM_STATUS_OK;
}

static int dm_batch_create_devices_check(cm_call_t *call, ProtobufCMessage *req_) {
    const Iot__Device__V1__BatchCreateDevicesRequest *req = (const void *)req_;
    if (req->n_devices < 1 || req->n_devices > DM_BATCH_MAX)
        return cm_call_fail(call, CM_STATUS_INVALID_ARGUMENT, "devices: %zu devices; a batch has 1..%d", req->n_devices,
                            DM_BATCH_MAX);
    for (size_t i = 0; i < req->n_devices; i++) {
        char where[32];
        snprintf(where, sizeof where, "devices[%zu]", i);
        int rc = dm__device_or_fail(call, where, req->devices[i], 0);
        if (rc) return rc;
    }
    return 0;
}

static int dm_batch_create_devices(cm_call_t *call, const ProtobufCMessage *req_, ProtobufCMessage *resp_) {
    const Iot__Device__V1__BatchCreateDevicesRequest *req = (const void *)req_;
    Iot__Device__V1__BatchCreateDevicesResponse *resp = (void *)resp_;
    int rc = dm_batch_create_devices_check(call, (ProtobufCMessage *)req_);
    if (rc) return rc;
    dm_err_t e;
    int code = dm_store_create_devices(dm__store(call), req->devices, req->n_devices, cm_call_pb_allocator(call), &e);
    if (code) return dm__fail(call, code, &e);
    resp->devices = req->devices;
    resp->n_devices = req->n_devices;
    return CM_STATUS_OK;
}

static int dm_get_device_check(cm_call_t *call, ProtobufCMessage *req_) {
    const Iot__Device__V1__GetDeviceRequest *req = (const void *)req_;
    return dm__id_or_fail(call, "id", req->id);
}

static int dm_get_device(cm_call_t *call, const ProtobufCMessage *req_, ProtobufCMessage *resp_) {
    const Iot__Device__V1__GetDeviceRequest *req = (const void *)req_;
    int rc = dm_get_device_check(call, (ProtobufCMessage *)req_);
    if (rc) return rc;
    dm_device_t *d;
    dm_err_t e;
    int code = dm_store_get_device(dm__store(call), req->id, cm_call_pb_allocator(call), &d, &e);
    if (code) return dm__fail(call, code, &e);
    *(dm_device_t *)resp_ = *d;
    return CM_STATUS_OK;
}

static int dm_list_devices_check(cm_call_t *call, ProtobufCMessage *req_) {
    Iot__Device__V1__ListDevicesRequest *req = (void *)req_;
    int rc = dm__page_or_fail(call, &req->page_size);
    return rc ? rc : dm__filter_or_fail(call, "filter", req->filter, 0);
}

static int dm_list_devices(cm_call_t *call, const ProtobufCMessage *req_, ProtobufCMessage *resp_) {
    Iot__Device__V1__ListDevicesRequest *req = (void *)req_;
    Iot__Device__V1__ListDevicesResponse *resp = (void *)resp_;
    int rc = dm_list_devices_check(call, (ProtobufCMessage *)req_);
    if (rc) return rc;
    dm_err_t e;
    int code = dm_store_list_devices(dm__store(call), req->filter, req->page_size, req->page_token,
                                     cm_call_pb_allocator(call), &resp->devices, &resp->n_devices, &resp->next_page_token, &e);
    return code ? dm__fail(call, code, &e) : CM_STATUS_OK;
}

static int dm_count_devices_check(cm_call_t *call, ProtobufCMessage *req_) {
    const Iot__Device__V1__CountDevicesRequest *req = (const void *)req_;
    return dm__filter_or_fail(call, "filter", req->filter, 0);
}

static int dm_count_devices(cm_call_t *call, const ProtobufCMessage *req_, ProtobufCMessage *resp_) {
    const Iot__Device__V1__CountDevicesRequest *req = (const void *)req_;
    int rc = dm_count_devices_check(call, (ProtobufCMessage *)req_);
    if (rc) return rc;
    dm_err_t e;
    int code = dm_store_count_devices(dm__store(call), req->filter, cm_call_pb_allocator(call), (void *)resp_, &e);
    return code ? dm__fail(call, code, &e) : CM_STATUS_OK;
}

static const char *const dm__device_fields[] = {"name", "type", "model", "location", "labels", "metadata",
                                                "firmware_version", "status", NULL};

static int dm_update_device_check(cm_call_t *call, ProtobufCMessage *req_) {
    const Iot__Device__V1__UpdateDeviceRequest *req = (const void *)req_;
    if (!req->device) return cm_call_fail(call, CM_STATUS_INVALID_ARGUMENT, "device: required");
    int rc = dm__device_or_fail(call, "device", req->device, 1);
    if (!rc) rc = dm__mask_or_fail(call, req->update_mask, dm__device_fields);
    if (rc) return rc;
    if (!dm__text_ok(req->device->etag, 32))
        return cm_call_fail(call, CM_STATUS_INVALID_ARGUMENT, "device.etag: an etag from a previous read");
    return 0;
}

static int dm_update_device(cm_call_t *call, const ProtobufCMessage *req_, ProtobufCMessage *resp_) {
    const Iot__Device__V1__UpdateDeviceRequest *req = (const void *)req_;
    int rc = dm_update_device_check(call, (ProtobufCMessage *)req_);
    if (rc) return rc;
    dm_device_t *d;
    dm_err_t e;
    int code = dm_store_update_device(dm__store(call), req->device,
                                      req->update_mask ? (const char *const *)req->update_mask->paths : NULL,
                                      req->update_mask ? req->update_mask->n_paths : 0, cm_call_pb_allocator(call), &d, &e);
    if (code) return dm__fail(call, code, &e);
    *(dm_device_t *)resp_ = *d;
    return CM_STATUS_OK;
}

static int dm_delete_device_check(cm_call_t *call, ProtobufCMessage *req_) {
    const Iot__Device__V1__DeleteDeviceRequest *req = (const void *)req_;
    int rc = dm__id_or_fail(call, "id", req->id);
    if (rc) return rc;
    if (!dm__text_ok(req->etag, 32))
        return cm_call_fail(call, CM_STATUS_INVALID_ARGUMENT, "etag: an etag from a previous read");
    return 0;
}

static int dm_delete_device(cm_call_t *call, const ProtobufCMessage *req_, ProtobufCMessage *resp_) {
    const Iot__Device__V1__DeleteDeviceRequest *req = (const void *)req_;
    (void)resp_;
    int rc = dm_delete_device_check(call, (ProtobufCMessage *)req_);
    if (rc) return rc;
    dm_err_t e;
    int code = dm_store_delete_device(dm__store(call), req->id, req->etag, &e);
    return code ? dm__fail(call, code, &e) : CM_STATUS_OK;
}

/* ---- groups ---------------------------------------------------------------------------------- */

static int dm__group_or_fail(cm_call_t *call, const dm_group_t *g) {
    if (*g->id && !dm__id_ok(g->id)) return cm_call_fail(call, CM_STATUS_INVALID_ARGUMENT, "group.id: %s", DM_ID_RULE);
    if (!dm__text_ok(g->description, 1024))
        return cm_call_fail(call, CM_STATUS_INVALID_ARGUMENT, "group.description: up to 1024 bytes of UTF-8 without control characters");
    return dm__filter_or_fail(call, "group.filter", g->filter, 1);
}

static int dm_create_group_check(cm_call_t *call, ProtobufCMessage *req_) {
    const Iot__Device__V1__CreateGroupRequest *req = (const void *)req_;
    if (!req->group) return cm_call_fail(call, CM_STATUS_INVALID_ARGUMENT, "group: required");
    const dm_group_t *g = req->group;
    int rc = dm__group_or_fail(call, g);
    if (rc) return rc;
    if (g->kind != IOT__DEVICE__V1__GROUP_KIND__GROUP_KIND_STATIC && g->kind != IOT__DEVICE__V1__GROUP_KIND__GROUP_KIND_DYNAMIC)
        return cm_call_fail(call, CM_STATUS_INVALID_ARGUMENT, "group.kind: GROUP_KIND_STATIC or GROUP_KIND_DYNAMIC");
    if (g->kind == IOT__DEVICE__V1__GROUP_KIND__GROUP_KIND_STATIC && g->filter)
        return cm_call_fail(call, CM_STATUS_INVALID_ARGUMENT, "group.filter: only dynamic groups have a filter");
    if (g->kind == IOT__DEVICE__V1__GROUP_KIND__GROUP_KIND_DYNAMIC && !g->filter)
        return cm_call_fail(call, CM_STATUS_INVALID_ARGUMENT, "group.filter: a dynamic group needs a filter");
    return 0;
}

static int dm_create_group(cm_call_t *call, const ProtobufCMessage *req_, ProtobufCMessage *resp_) {
    const Iot__Device__V1__CreateGroupRequest *req = (const void *)req_;
    int rc = dm_create_group_check(call, (ProtobufCMessage *)req_);
    if (rc) return rc;
    dm_group_t *g = req->group;
    dm_err_t e;
    int code = dm_store_create_group(dm__store(call), g, cm_call_pb_allocator(call), &e);
    if (code) return dm__fail(call, code, &e);
    *(dm_group_t *)resp_ = *g;
    return CM_STATUS_OK;
}

static int dm_get_group_check(cm_call_t *call, ProtobufCMessage *req_) {
    const Iot__Device__V1__GetGroupRequest *req = (const void *)req_;
    return dm__id_or_fail(call, "id", req->id);
}

static int dm_get_group(cm_call_t *call, const ProtobufCMessage *req_, ProtobufCMessage *resp_) {
    const Iot__Device__V1__GetGroupRequest *req = (const void *)req_;
    int rc = dm_get_group_check(call, (ProtobufCMessage *)req_);
    if (rc) return rc;
    dm_group_t *g;
    dm_err_t e;
    int code = dm_store_get_group(dm__store(call), req->id, cm_call_pb_allocator(call), &g, &e);
    if (code) return dm__fail(call, code, &e);
    *(dm_group_t *)resp_ = *g;
    return CM_STATUS_OK;
}

static int dm_list_groups_check(cm_call_t *call, ProtobufCMessage *req_) {
    Iot__Device__V1__ListGroupsRequest *req = (void *)req_;
    return dm__page_or_fail(call, &req->page_size);
}

static int dm_list_groups(cm_call_t *call, const ProtobufCMessage *req_, ProtobufCMessage *resp_) {
    Iot__Device__V1__ListGroupsRequest *req = (void *)req_;
    Iot__Device__V1__ListGroupsResponse *resp = (void *)resp_;
    int rc = dm_list_groups_check(call, (ProtobufCMessage *)req_);
    if (rc) return rc;
    dm_err_t e;
    int code = dm_store_list_groups(dm__store(call), req->page_size, req->page_token, cm_call_pb_allocator(call),
                                    &resp->groups, &resp->n_groups, &resp->next_page_token, &e);
    return code ? dm__fail(call, code, &e) : CM_STATUS_OK;
}

static const char *const dm__group_fields[] = {"description", "filter", NULL};

static int dm_update_group_check(cm_call_t *call, ProtobufCMessage *req_) {
    const Iot__Device__V1__UpdateGroupRequest *req = (const void *)req_;
    if (!req->group) return cm_call_fail(call, CM_STATUS_INVALID_ARGUMENT, "group: required");
    int rc = dm__id_or_fail(call, "group.id", req->group->id);
    if (!rc) rc = dm__group_or_fail(call, req->group);
    if (!rc) rc = dm__mask_or_fail(call, req->update_mask, dm__group_fields);
    if (rc) return rc;
    if (!dm__text_ok(req->group->etag, 32))
        return cm_call_fail(call, CM_STATUS_INVALID_ARGUMENT, "group.etag: an etag from a previous read");
    return 0;
}

static int dm_update_group(cm_call_t *call, const ProtobufCMessage *req_, ProtobufCMessage *resp_) {
    const Iot__Device__V1__UpdateGroupRequest *req = (const void *)req_;
    int rc = dm_update_group_check(call, (ProtobufCMessage *)req_);
    if (rc) return rc;
    dm_group_t *g;
    dm_err_t e;
    int code = dm_store_update_group(dm__store(call), req->group,
                                     req->update_mask ? (const char *const *)req->update_mask->paths : NULL,
                                     req->update_mask ? req->update_mask->n_paths : 0, cm_call_pb_allocator(call), &g, &e);
    if (code) return dm__fail(call, code, &e);
    *(dm_group_t *)resp_ = *g;
    return CM_STATUS_OK;
}

static int dm_delete_group_check(cm_call_t *call, ProtobufCMessage *req_) {
    const Iot__Device__V1__DeleteGroupRequest *req = (const void *)req_;
    return dm__id_or_fail(call, "id", req->id);
}

static int dm_delete_group(cm_call_t *call, const ProtobufCMessage *req_, ProtobufCMessage *resp_) {
    const Iot__Device__V1__DeleteGroupRequest *req = (const void *)req_;
    (void)resp_;
    int rc = dm_delete_group_check(call, (ProtobufCMessage *)req_);
    if (rc) return rc;
    dm_err_t e;
    int code = dm_store_delete_group(dm__store(call), req->id, &e);
    return code ? dm__fail(call, code, &e) : CM_STATUS_OK;
}

/* AddGroupMembers and RemoveGroupMembers. */
static int dm_members_check(cm_call_t *call, ProtobufCMessage *req_) {
    const Iot__Device__V1__GroupMembersRequest *req = (const void *)req_;
    int rc = dm__id_or_fail(call, "group_id", req->group_id);
    if (rc) return rc;
    if (req->n_device_ids < 1 || req->n_device_ids > DM_BATCH_MAX)
        return cm_call_fail(call, CM_STATUS_INVALID_ARGUMENT, "device_ids: %zu ids; 1..%d per call", req->n_device_ids,
                            DM_BATCH_MAX);
    for (size_t i = 0; i < req->n_device_ids; i++)
        if (!dm__id_ok(req->device_ids[i]))
            return cm_call_fail(call, CM_STATUS_INVALID_ARGUMENT, "device_ids[%zu]: %s", i, DM_ID_RULE);
    return 0;
}

static int dm__members(cm_call_t *call, const ProtobufCMessage *req_, ProtobufCMessage *resp_, int add) {
    const Iot__Device__V1__GroupMembersRequest *req = (const void *)req_;
    Iot__Device__V1__GroupMembersResponse *resp = (void *)resp_;
    int rc = dm_members_check(call, (ProtobufCMessage *)req_);
    if (rc) return rc;
    dm_err_t e;
    int code = dm_store_group_members(dm__store(call), req->group_id, req->device_ids, req->n_device_ids, add,
                                      &resp->changed, &e);
    return code ? dm__fail(call, code, &e) : CM_STATUS_OK;
}

static int dm_add_group_members(cm_call_t *call, const ProtobufCMessage *req, ProtobufCMessage *resp) {
    return dm__members(call, req, resp, 1);
}

static int dm_remove_group_members(cm_call_t *call, const ProtobufCMessage *req, ProtobufCMessage *resp) {
    return dm__members(call, req, resp, 0);
}

static int dm_list_group_members_check(cm_call_t *call, ProtobufCMessage *req_) {
    Iot__Device__V1__ListGroupMembersRequest *req = (void *)req_;
    int rc = dm__id_or_fail(call, "group_id", req->group_id);
    return rc ? rc : dm__page_or_fail(call, &req->page_size);
}

static int dm_list_group_members(cm_call_t *call, const ProtobufCMessage *req_, ProtobufCMessage *resp_) {
    Iot__Device__V1__ListGroupMembersRequest *req = (void *)req_;
    Iot__Device__V1__ListGroupMembersResponse *resp = (void *)resp_;
    int rc = dm_list_group_members_check(call, (ProtobufCMessage *)req_);
    if (rc) return rc;
    /* Members of either kind are "devices whose filter says group_id = this group". */
    dm_filter_t f = IOT__DEVICE__V1__DEVICE_FILTER__INIT;
    f.group_id = req->group_id;
    dm_err_t e;
    int code = dm_store_list_devices(dm__store(call), &f, req->page_size, req->page_token, cm_call_pb_allocator(call),
                                     &resp->devices, &resp->n_devices, &resp->next_page_token, &e);
    if (code == CM_STATUS_NOT_FOUND) return cm_call_fail(call, code, "group \"%s\" not found", req->group_id);
    return code ? dm__fail(call, code, &e) : CM_STATUS_OK;
}

/* ---- credentials ----------------------------------------------------------------------------- */

static int dm__ttl_or_fail(cm_call_t *call, int ttl) {
    if (ttl == 0 || (ttl >= 60 && ttl <= 315360000)) return 0;
    return cm_call_fail(call, CM_STATUS_INVALID_ARGUMENT, "ttl_seconds: %d; 0 (no expiry) or 60..315360000", ttl);
}

static void dm__token_resp(cm_call_t *call, const dm_token_t *t, Iot__Device__V1__IssueTokenResponse *resp) {
    resp->token_id = cm_call_strdup(call, t->id);
    resp->token = t->token;
    resp->expire_time = dm__ts(cm_call_pb_allocator(call), t->expires_us, 1);
}

static int dm_issue_token_check(cm_call_t *call, ProtobufCMessage *req_) {
    const Iot__Device__V1__IssueTokenRequest *req = (const void *)req_;
    int rc = dm__id_or_fail(call, "device_id", req->device_id);
    return rc ? rc : dm__ttl_or_fail(call, req->ttl_seconds);
}

static int dm_issue_token(cm_call_t *call, const ProtobufCMessage *req_, ProtobufCMessage *resp_) {
    const Iot__Device__V1__IssueTokenRequest *req = (const void *)req_;
    int rc = dm_issue_token_check(call, (ProtobufCMessage *)req_);
    if (rc) return rc;
    dm_token_t t;
    dm_err_t e;
    int code = dm_store_issue_token(dm__store(call), req->device_id, req->ttl_seconds, cm_call_pb_allocator(call), &t, &e);
    if (code) return dm__fail(call, code, &e);
    dm__token_resp(call, &t, (void *)resp_);
    return CM_STATUS_OK;
}

static int dm_rotate_token_check(cm_call_t *call, ProtobufCMessage *req_) {
    const Iot__Device__V1__RotateTokenRequest *req = (const void *)req_;
    int rc = dm__id_or_fail(call, "token_id", req->token_id);
    return rc ? rc : dm__ttl_or_fail(call, req->ttl_seconds);
}

static int dm_rotate_token(cm_call_t *call, const ProtobufCMessage *req_, ProtobufCMessage *resp_) {
    const Iot__Device__V1__RotateTokenRequest *req = (const void *)req_;
    int rc = dm_rotate_token_check(call, (ProtobufCMessage *)req_);
    if (rc) return rc;
    dm_token_t t;
    dm_err_t e;
    int code = dm_store_rotate_token(dm__store(call), req->token_id, req->ttl_seconds, cm_call_pb_allocator(call), &t, &e);
    if (code) return dm__fail(call, code, &e);
    dm__token_resp(call, &t, (void *)resp_);
    return CM_STATUS_OK;
}

static int dm_revoke_token_check(cm_call_t *call, ProtobufCMessage *req_) {
    const Iot__Device__V1__RevokeTokenRequest *req = (const void *)req_;
    return dm__id_or_fail(call, "token_id", req->token_id);
}

static int dm_revoke_token(cm_call_t *call, const ProtobufCMessage *req_, ProtobufCMessage *resp_) {
    const Iot__Device__V1__RevokeTokenRequest *req = (const void *)req_;
    (void)resp_;
    int rc = dm_revoke_token_check(call, (ProtobufCMessage *)req_);
    if (rc) return rc;
    dm_err_t e;
    int code = dm_store_revoke_token(dm__store(call), req->token_id, &e);
    return code ? dm__fail(call, code, &e) : CM_STATUS_OK;
}

static int dm_authenticate_device_check(cm_call_t *call, ProtobufCMessage *req_) {
    const Iot__Device__V1__AuthenticateDeviceRequest *req = (const void *)req_;
    return *req->token ? 0 : cm_call_fail(call, CM_STATUS_INVALID_ARGUMENT, "token: required");
}

static int dm_authenticate_device(cm_call_t *call, const ProtobufCMessage *req_, ProtobufCMessage *resp_) {
    const Iot__Device__V1__AuthenticateDeviceRequest *req = (const void *)req_;
    Iot__Device__V1__AuthenticateDeviceResponse *resp = (void *)resp_;
    int rc = dm_authenticate_device_check(call, (ProtobufCMessage *)req_);
    if (rc) return rc;
    dm_auth_t auth;
    dm_err_t e;
    int code = dm_store_authenticate(dm__store(call), req->token, &auth, &e);
    if (code) return dm__fail(call, code, &e);
    resp->device_id = cm_call_strdup(call, auth.device_id);
    resp->token_id = cm_call_strdup(call, auth.token_id);
    resp->status = (Iot__Device__V1__DeviceStatus)auth.status;
    return CM_STATUS_OK;
}

static int dm_sign_certificate_check(cm_call_t *call, ProtobufCMessage *req_) {
    const Iot__Device__V1__SignCertificateRequest *req = (const void *)req_;
    int rc = dm__id_or_fail(call, "device_id", req->device_id);
    if (rc) return rc;
    if (!*req->csr_pem) return cm_call_fail(call, CM_STATUS_INVALID_ARGUMENT, "csr_pem: required (PEM PKCS#10)");
    if (strlen(req->csr_pem) > 16384) return cm_call_fail(call, CM_STATUS_INVALID_ARGUMENT, "csr_pem: over 16 KiB");
    int days = req->validity_days ? req->validity_days : 365;
    if (days < 1 || days > 3650)
        return cm_call_fail(call, CM_STATUS_INVALID_ARGUMENT, "validity_days: %d is not in 1..3650", req->validity_days);
    return 0;
}

static int dm_sign_certificate(cm_call_t *call, const ProtobufCMessage *req_, ProtobufCMessage *resp_) {
    const Iot__Device__V1__SignCertificateRequest *req = (const void *)req_;
    int rc = dm_sign_certificate_check(call, (ProtobufCMessage *)req_);
    if (rc) return rc;
    int days = req->validity_days ? req->validity_days : 365;
    dm_err_t e;
    int code = dm_store_sign_certificate(dm__store(call), req->device_id, req->csr_pem, days, cm_call_pb_allocator(call),
                                         (void *)resp_, &e);
    return code ? dm__fail(call, code, &e) : CM_STATUS_OK;
}

static int dm__serial_ok(const char *s) {
    size_t n = strlen(s);
    if (n == 0 || n > 40) return 0;
    for (size_t i = 0; i < n; i++)
        if (!isxdigit((unsigned char)s[i]) || isupper((unsigned char)s[i])) return 0;
    return 1;
}

static int dm_revoke_certificate_check(cm_call_t *call, ProtobufCMessage *req_) {
    const Iot__Device__V1__RevokeCertificateRequest *req = (const void *)req_;
    if (!dm__serial_ok(req->serial))
        return cm_call_fail(call, CM_STATUS_INVALID_ARGUMENT, "serial: 1-40 lowercase hex digits, as SignCertificate returned it");
    /* The CRL builder's own rule: a reason it refuses would be stored and then break every
     * GetRevocationList (8, removeFromCRL, is a CRLReason but belongs only in delta CRLs). */
    if (!dm_ca_reason_ok(req->reason))
        return cm_call_fail(call, CM_STATUS_INVALID_ARGUMENT, "reason: %d is not allowed; use one of " DM_CA_REASONS,
                            req->reason);
    return 0;
}

static int dm_revoke_certificate(cm_call_t *call, const ProtobufCMessage *req_, ProtobufCMessage *resp_) {
    const Iot__Device__V1__RevokeCertificateRequest *req = (const void *)req_;
    (void)resp_;
    int rc = dm_revoke_certificate_check(call, (ProtobufCMessage *)req_);
    if (rc) return rc;
    dm_err_t e;
    int code = dm_store_revoke_certificate(dm__store(call), req->serial, req->reason, &e);
    return code ? dm__fail(call, code, &e) : CM_STATUS_OK;
}

static int dm_get_revocation_list(cm_call_t *call, const ProtobufCMessage *req_, ProtobufCMessage *resp_) {
    (void)req_;
    dm_err_t e;
    int code = dm_store_revocation_list(dm__store(call), cm_call_pb_allocator(call), (void *)resp_, &e);
    return code ? dm__fail(call, code, &e) : CM_STATUS_OK;
}

/* ---- presence -------------------------------------------------------------------------------- */

/* When a sighting happened (Unix microseconds): its time, or now when it has none. */
static int64_t dm__sighting_us(const Iot__Device__V1__Sighting *s, int64_t now) {
    return s->time ? s->time->seconds * 1000000 + s->time->nanos / 1000 : now;
}

static int dm_report_seen_check(cm_call_t *call, ProtobufCMessage *req_) {
    const Iot__Device__V1__ReportSeenRequest *req = (const void *)req_;
    size_t n = req->n_sightings;
    if (n < 1 || n > DM_BATCH_MAX)
        return cm_call_fail(call, CM_STATUS_INVALID_ARGUMENT, "sightings: %zu; 1..%d per call", n, DM_BATCH_MAX);
    int64_t now = dm__now_us();
    for (size_t i = 0; i < n; i++) {
        const Iot__Device__V1__Sighting *s = req->sightings[i];
        if (!dm__id_ok(s->device_id))
            return cm_call_fail(call, CM_STATUS_INVALID_ARGUMENT, "sightings[%zu].device_id: %s", i, DM_ID_RULE);
        if (!s->time) continue;
        if (s->time->nanos < 0 || s->time->nanos > 999999999 || s->time->seconds < 0 || s->time->seconds > 253402300799)
            return cm_call_fail(call, CM_STATUS_INVALID_ARGUMENT, "sightings[%zu].time: not a valid timestamp", i);
        if (dm__sighting_us(s, now) > now + 300 * 1000000LL)
            return cm_call_fail(call, CM_STATUS_INVALID_ARGUMENT, "sightings[%zu].time: more than 5 minutes in the future", i);
    }
    return 0;
}

static int dm_report_seen(cm_call_t *call, const ProtobufCMessage *req_, ProtobufCMessage *resp_) {
    const Iot__Device__V1__ReportSeenRequest *req = (const void *)req_;
    Iot__Device__V1__ReportSeenResponse *resp = (void *)resp_;
    int rc = dm_report_seen_check(call, (ProtobufCMessage *)req_);
    if (rc) return rc;
    size_t n = req->n_sightings;
    char **ids = cm_call_alloc(call, sizeof *ids * n);
    int64_t *at = cm_call_alloc(call, sizeof *at * n);
    int64_t now = dm__now_us();
    for (size_t i = 0; i < n; i++) {
        ids[i] = req->sightings[i]->device_id;
        at[i] = dm__sighting_us(req->sightings[i], now);
    }
    dm_err_t e;
    int code = dm_store_report_seen(dm__store(call), ids, at, n, &resp->updated, &resp->unknown, &e);
    return code ? dm__fail(call, code, &e) : CM_STATUS_OK;
}

/* ---- shadows --------------------------------------------------------------------------------- */

static int dm_get_shadow_check(cm_call_t *call, ProtobufCMessage *req_) {
    const Iot__Device__V1__GetShadowRequest *req = (const void *)req_;
    return dm__id_or_fail(call, "device_id", req->device_id);
}

static int dm_get_shadow(cm_call_t *call, const ProtobufCMessage *req_, ProtobufCMessage *resp_) {
    const Iot__Device__V1__GetShadowRequest *req = (const void *)req_;
    int rc = dm_get_shadow_check(call, (ProtobufCMessage *)req_);
    if (rc) return rc;
    Iot__Device__V1__Shadow *sh;
    dm_err_t e;
    int code = dm_store_get_shadow(dm__store(call), req->device_id, cm_call_pb_allocator(call), &sh, &e);
    if (code) return dm__fail(call, code, &e);
    *(Iot__Device__V1__Shadow *)resp_ = *sh;
    return CM_STATUS_OK;
}

/* UpdateDesired and ReportState. */
static int dm_update_shadow_check(cm_call_t *call, ProtobufCMessage *req_) {
    const Iot__Device__V1__UpdateShadowRequest *req = (const void *)req_;
    int rc = dm__id_or_fail(call, "device_id", req->device_id);
    if (rc) return rc;
    if (!req->patch) return cm_call_fail(call, CM_STATUS_INVALID_ARGUMENT, "patch: required (members set to null are removed)");
    if (req->expected_version < 0)
        return cm_call_fail(call, CM_STATUS_INVALID_ARGUMENT, "expected_version: 0 (any) or a version from GetShadow");
    return 0;
}

static int dm__update_shadow(cm_call_t *call, const ProtobufCMessage *req_, ProtobufCMessage *resp_, int reported) {
    const Iot__Device__V1__UpdateShadowRequest *req = (const void *)req_;
    int rc = dm_update_shadow_check(call, (ProtobufCMessage *)req_);
    if (rc) return rc;
    /* Reported state comes from the device itself. */
    if (reported && (rc = dm__device_auth_or_fail(call, req->device_id))) return rc;
    Iot__Device__V1__Shadow *sh;
    dm_err_t e;
    int code = dm_store_update_shadow(dm__store(call), req->device_id, reported, req->patch, req->expected_version,
                                      cm_call_pb_allocator(call), &sh, &e);
    if (code) return dm__fail(call, code, &e);
    *(Iot__Device__V1__Shadow *)resp_ = *sh;
    return CM_STATUS_OK;
}

static int dm_update_desired(cm_call_t *call, const ProtobufCMessage *req, ProtobufCMessage *resp) {
    return dm__update_shadow(call, req, resp, 0);
}

static int dm_report_state(cm_call_t *call, const ProtobufCMessage *req, ProtobufCMessage *resp) {
    return dm__update_shadow(call, req, resp, 1);
}

/* ---- commands -------------------------------------------------------------------------------- */

static int dm__command_id_or_fail(cm_call_t *call, const char *field, const char *id) {
    size_t n = strlen(id);
    int ok = n > 0 && n < 19 && id[0] != '0';
    for (size_t i = 0; ok && i < n; i++) ok = isdigit((unsigned char)id[i]);
    return ok ? 0 : cm_call_fail(call, CM_STATUS_INVALID_ARGUMENT, "%s: a command id as SendCommand returned it", field);
}

/* Empty (none) or 1..128 printable ASCII characters. */
static int dm__request_id_ok(const char *s) {
    size_t n = s ? strlen(s) : 0;
    if (n > 128) return 0;
    for (size_t i = 0; i < n; i++)
        if (s[i] < 0x20 || s[i] > 0x7e) return 0;
    return 1;
}

static int dm_send_command_check(cm_call_t *call, ProtobufCMessage *req_) {
    const Iot__Device__V1__SendCommandRequest *req = (const void *)req_;
    int rc = dm__id_or_fail(call, "device_id", req->device_id);
    if (rc) return rc;
    if (!dm__name_ok(req->name, 64, "._-"))
        return cm_call_fail(call, CM_STATUS_INVALID_ARGUMENT,
                            "name: 1-64 characters of A-Z, a-z, 0-9, '.', '_', '-', starting with a letter or digit");
    int ttl = req->ttl_seconds ? req->ttl_seconds : 3600;
    if (ttl < 1 || ttl > 604800)
        return cm_call_fail(call, CM_STATUS_INVALID_ARGUMENT, "ttl_seconds: %d is not in 1..604800", req->ttl_seconds);
    if (!dm__request_id_ok(req->request_id))
        return cm_call_fail(call, CM_STATUS_INVALID_ARGUMENT, "request_id: at most 128 printable ASCII characters");
    return 0;
}

static int dm_send_command(cm_call_t *call, const ProtobufCMessage *req_, ProtobufCMessage *resp_) {
    const Iot__Device__V1__SendCommandRequest *req = (const void *)req_;
    int rc = dm_send_command_check(call, (ProtobufCMessage *)req_);
    if (rc) return rc;
    int ttl = req->ttl_seconds ? req->ttl_seconds : 3600;
    dm_command_t *c;
    dm_err_t e;
    int code = dm_store_send_command(dm__store(call), req->device_id, req->name, req->payload, ttl, req->request_id,
                                     cm_call_pb_allocator(call), &c, &e);
    if (code) return dm__fail(call, code, &e);
    *(dm_command_t *)resp_ = *c;
    return CM_STATUS_OK;
}

static int dm_get_command_check(cm_call_t *call, ProtobufCMessage *req_) {
    const Iot__Device__V1__GetCommandRequest *req = (const void *)req_;
    return dm__command_id_or_fail(call, "id", req->id);
}

static int dm_get_command(cm_call_t *call, const ProtobufCMessage *req_, ProtobufCMessage *resp_) {
    const Iot__Device__V1__GetCommandRequest *req = (const void *)req_;
    int rc = dm_get_command_check(call, (ProtobufCMessage *)req_);
    if (rc) return rc;
    dm_command_t *c;
    dm_err_t e;
    int code = dm_store_get_command(dm__store(call), req->id, cm_call_pb_allocator(call), &c, &e);
    if (code) return dm__fail(call, code, &e);
    *(dm_command_t *)resp_ = *c;
    return CM_STATUS_OK;
}

static int dm_list_commands_check(cm_call_t *call, ProtobufCMessage *req_) {
    Iot__Device__V1__ListCommandsRequest *req = (void *)req_;
    int rc = dm__id_or_fail(call, "device_id", req->device_id);
    if (!rc) rc = dm__page_or_fail(call, &req->page_size);
    if (rc) return rc;
    if (req->n_statuses > 5) return cm_call_fail(call, CM_STATUS_INVALID_ARGUMENT, "statuses: at most 5 entries");
    for (size_t i = 0; i < req->n_statuses; i++) {
        int st = req->statuses[i];
        if (st < 1 || st > 5)
            return cm_call_fail(call, CM_STATUS_INVALID_ARGUMENT, "statuses[%zu]: %d is not a CommandStatus", i, st);
    }
    return 0;
}

static int dm_list_commands(cm_call_t *call, const ProtobufCMessage *req_, ProtobufCMessage *resp_) {
    Iot__Device__V1__ListCommandsRequest *req = (void *)req_;
    Iot__Device__V1__ListCommandsResponse *resp = (void *)resp_;
    int rc = dm_list_commands_check(call, (ProtobufCMessage *)req_);
    if (rc) return rc;
    int st[5];
    for (size_t i = 0; i < req->n_statuses; i++) st[i] = req->statuses[i];
    dm_err_t e;
    int code = dm_store_list_commands(dm__store(call), req->device_id, st, req->n_statuses, req->page_size,
                                      req->page_token, cm_call_pb_allocator(call), &resp->commands, &resp->n_commands,
                                      &resp->next_page_token, &e);
    return code ? dm__fail(call, code, &e) : CM_STATUS_OK;
}

static int dm_watch_commands_check(cm_call_t *call, ProtobufCMessage *req_) {
    const Iot__Device__V1__WatchCommandsRequest *req = (const void *)req_;
    return dm__id_or_fail(call, "device_id", req->device_id);
}

static int dm_watch_commands(cm_call_t *call, const ProtobufCMessage *req_) {
    const Iot__Device__V1__WatchCommandsRequest *req = (const void *)req_;
    int rc = dm_watch_commands_check(call, (ProtobufCMessage *)req_);
    if (!rc) rc = dm__device_auth_or_fail(call, req->device_id);
    if (rc) return rc;
    return dm_cmd_hub_watch(((dm_ctx_t *)cm_call_service_ctx(call))->hub, call, req->device_id);
}

static void dm_watch_commands_done(cm_call_t *call, int cancelled) {
    (void)cancelled;
    dm_cmd_hub_done(call);
}

static int dm_ack_command_check(cm_call_t *call, ProtobufCMessage *req_) {
    const Iot__Device__V1__AckCommandRequest *req = (const void *)req_;
    int rc = dm__id_or_fail(call, "device_id", req->device_id);
    if (!rc) rc = dm__command_id_or_fail(call, "command_id", req->command_id);
    if (rc) return rc;
    if (!dm__text_ok(req->error, 1024))
        return cm_call_fail(call, CM_STATUS_INVALID_ARGUMENT, "error: up to 1024 bytes of UTF-8 without control characters");
    return 0;
}

static int dm_ack_command(cm_call_t *call, const ProtobufCMessage *req_, ProtobufCMessage *resp_) {
    const Iot__Device__V1__AckCommandRequest *req = (const void *)req_;
    int rc = dm_ack_command_check(call, (ProtobufCMessage *)req_);
    if (rc) return rc;
    if ((rc = dm__device_auth_or_fail(call, req->device_id))) return rc;
    dm_command_t *c;
    dm_err_t e;
    int code = dm_store_ack_command(dm__store(call), req->device_id, req->command_id, req->success, req->result,
                                    req->error, cm_call_pb_allocator(call), &c, &e);
    if (code) return dm__fail(call, code, &e);
    *(dm_command_t *)resp_ = *c;
    return CM_STATUS_OK;
}

static const cm_method_t dm__methods[] = {
    {.name = "CreateDevice", .kind = CM_RPC_UNARY, .unary = dm_create_device, .check = dm_create_device_check},
    {.name = "BatchCreateDevices", .kind = CM_RPC_UNARY, .unary = dm_batch_create_devices, .check = dm_batch_create_devices_check},
    {.name = "GetDevice", .kind = CM_RPC_UNARY, .unary = dm_get_device, .check = dm_get_device_check},
    {.name = "ListDevices", .kind = CM_RPC_UNARY, .unary = dm_list_devices, .check = dm_list_devices_check},
    {.name = "CountDevices", .kind = CM_RPC_UNARY, .unary = dm_count_devices, .check = dm_count_devices_check},
    {.name = "UpdateDevice", .kind = CM_RPC_UNARY, .unary = dm_update_device, .check = dm_update_device_check},
    {.name = "DeleteDevice", .kind = CM_RPC_UNARY, .unary = dm_delete_device, .check = dm_delete_device_check},
    {.name = "CreateGroup", .kind = CM_RPC_UNARY, .unary = dm_create_group, .check = dm_create_group_check},
    {.name = "GetGroup", .kind = CM_RPC_UNARY, .unary = dm_get_group, .check = dm_get_group_check},
    {.name = "ListGroups", .kind = CM_RPC_UNARY, .unary = dm_list_groups, .check = dm_list_groups_check},
    {.name = "UpdateGroup", .kind = CM_RPC_UNARY, .unary = dm_update_group, .check = dm_update_group_check},
    {.name = "DeleteGroup", .kind = CM_RPC_UNARY, .unary = dm_delete_group, .check = dm_delete_group_check},
    {.name = "AddGroupMembers", .kind = CM_RPC_UNARY, .unary = dm_add_group_members, .check = dm_members_check},
    {.name = "RemoveGroupMembers", .kind = CM_RPC_UNARY, .unary = dm_remove_group_members, .check = dm_members_check},
    {.name = "ListGroupMembers", .kind = CM_RPC_UNARY, .unary = dm_list_group_members, .check = dm_list_group_members_check},
    {.name = "IssueToken", .kind = CM_RPC_UNARY, .unary = dm_issue_token, .check = dm_issue_token_check},
    {.name = "RotateToken", .kind = CM_RPC_UNARY, .unary = dm_rotate_token, .check = dm_rotate_token_check},
    {.name = "RevokeToken", .kind = CM_RPC_UNARY, .unary = dm_revoke_token, .check = dm_revoke_token_check},
    {.name = "AuthenticateDevice", .kind = CM_RPC_UNARY, .unary = dm_authenticate_device, .check = dm_authenticate_device_check},
    {.name = "SignCertificate", .kind = CM_RPC_UNARY, .unary = dm_sign_certificate, .check = dm_sign_certificate_check},
    {.name = "RevokeCertificate", .kind = CM_RPC_UNARY, .unary = dm_revoke_certificate, .check = dm_revoke_certificate_check},
    {.name = "GetRevocationList", .kind = CM_RPC_UNARY, .unary = dm_get_revocation_list},
    {.name = "ReportSeen", .kind = CM_RPC_UNARY, .unary = dm_report_seen, .check = dm_report_seen_check},
    {.name = "GetShadow", .kind = CM_RPC_UNARY, .unary = dm_get_shadow, .check = dm_get_shadow_check},
    {.name = "UpdateDesired", .kind = CM_RPC_UNARY, .unary = dm_update_desired, .check = dm_update_shadow_check},
    {.name = "ReportState", .kind = CM_RPC_UNARY, .unary = dm_report_state, .check = dm_update_shadow_check},
    {.name = "SendCommand", .kind = CM_RPC_UNARY, .unary = dm_send_command, .check = dm_send_command_check},
    {.name = "GetCommand", .kind = CM_RPC_UNARY, .unary = dm_get_command, .check = dm_get_command_check},
    {.name = "ListCommands", .kind = CM_RPC_UNARY, .unary = dm_list_commands, .check = dm_list_commands_check},
    {.name = "WatchCommands", .kind = CM_RPC_SERVER_STREAM, .start = dm_watch_commands, .done = dm_watch_commands_done,
     .check = dm_watch_commands_check},
    {.name = "AckCommand", .kind = CM_RPC_UNARY, .unary = dm_ack_command, .check = dm_ack_command_check},
};

void dm_service_init(cm_service_t *svc, dm_ctx_t *ctx) {
    svc->desc = &iot__device__v1__device_manager__descriptor;
    svc->methods = dm__methods;
    svc->n_methods = sizeof dm__methods / sizeof dm__methods[0];
    svc->ctx = ctx;
}
