/* Device shadows: desired and reported state as JSON documents in Postgres, changed by RFC 7396
 * merge patches under the row lock, so concurrent updates serialise and the version grows by
 * exactly one per change. The delta (desired members that reported does not match) is computed
 * on every read, never stored, so it cannot go stale. */
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cm_alloc.h"
#include "cm_err.h"
#include "cm_json.h"
#include "dm_store.h"

#define DM_SHADOW_MAX_BYTES 65536

/* Builds the reply from the stored documents (text) and version/times. */
static int dm__shadow_build(ProtobufCAllocator *a, const char *device_id, const char *desired_text,
                            const char *reported_text, int64_t version, int64_t desired_us, int64_t reported_us,
                            Iot__Device__V1__Shadow **out, dm_err_t *e) {
    char err[160];
    json_t *des = cm_json_parse(desired_text, strlen(desired_text), err, sizeof err);
    json_t *rep = cm_json_parse(reported_text, strlen(reported_text), err, sizeof err);
    json_t *delta = des && rep ? cm_json_delta(des, rep) : NULL;
    Iot__Device__V1__Shadow *sh = a->alloc(a->allocator_data, sizeof *sh);
    iot__device__v1__shadow__init(sh);
    int code = CM_STATUS_OK;
    if (!delta || cm_json_to_struct(des, a, &sh->desired) || cm_json_to_struct(rep, a, &sh->reported) ||
        cm_json_to_struct(delta, a, &sh->delta)) {
        snprintf(e->msg, sizeof e->msg, "shadow of \"%s\": stored document unreadable", device_id);
        code = CM_STATUS_INTERNAL;
    }
    json_decref(des);
    json_decref(rep);
    json_decref(delta);
    if (code) return code;
    sh->device_id = dm__strdup(a, device_id);
    sh->version = version;
    sh->desired_time = dm__ts(a, desired_us, 1);
    sh->reported_time = dm__ts(a, reported_us, 1);
    *out = sh;
    return CM_STATUS_OK;
}

#define DM__SHADOW_COLS                                                                                         \
    "desired::text, reported::text, version, coalesce((extract(epoch from desired_at) * 1000000)::int8, 0), "   \
    "coalesce((extract(epoch from reported_at) * 1000000)::int8, 0)"

static int dm__device_missing(cm_pg_conn_t *c, const char *device_id, int lock, dm_err_t *e) {
    const char *p[] = {device_id};
    PGresult *r = NULL;
    if (cm_pg_exec(c, &r,
                   lock ? "SELECT 1 FROM devices WHERE id = $1 FOR SHARE" : "SELECT 1 FROM devices WHERE id = $1", 1, p))
        return dm__pg_fail(c, "device", e);
    int n = PQntuples(r);
    PQclear(r);
    if (n) return CM_STATUS_OK;
    snprintf(e->msg, sizeof e->msg, "device \"%s\" not found", device_id);
    return CM_STATUS_NOT_FOUND;
}

int dm_store_get_shadow(dm_store_t *s, const char *device_id, ProtobufCAllocator *a, Iot__Device__V1__Shadow **out,
                        dm_err_t *e) {
    cm_pg_conn_t *c = dm__pg(s, e);
    if (!c) return CM_STATUS_UNAVAILABLE;
    const char *p[] = {device_id};
    PGresult *r = NULL;
    int code = CM_STATUS_OK;
    if (cm_pg_exec(c, &r, "SELECT " DM__SHADOW_COLS " FROM shadows WHERE device_id = $1", 1, p)) {
        code = dm__pg_fail(c, "shadow", e);
    } else if (PQntuples(r) == 0) {
        /* A device that never had a shadow has an empty one. */
        code = dm__device_missing(c, device_id, 0, e);
        if (!code) code = dm__shadow_build(a, device_id, "{}", "{}", 0, 0, 0, out, e);
    } else {
        code = dm__shadow_build(a, device_id, PQgetvalue(r, 0, 0), PQgetvalue(r, 0, 1), dm__int(r, 0, 2),
                                dm__int(r, 0, 3), dm__int(r, 0, 4), out, e);
    }
    PQclear(r);
    cm_pg_release(s->pg, c);
    return code;
}

int dm_store_update_shadow(dm_store_t *s, const char *device_id, int reported, const Google__Protobuf__Struct *patch,
                           int64_t expected_version, ProtobufCAllocator *a, Iot__Device__V1__Shadow **out,
                           dm_err_t *e) {
    json_t *pj = cm_json_from_struct(patch);
    if (!pj) {
        snprintf(e->msg, sizeof e->msg, "patch: not representable as JSON (NaN, infinity, or nested deeper than %d)",
                 CM_JSON_MAX_DEPTH);
        return CM_STATUS_INVALID_ARGUMENT;
    }
    cm_pg_conn_t *c = dm__pg(s, e);
    if (!c) {
        json_decref(pj);
        return CM_STATUS_UNAVAILABLE;
    }
    const char *p[] = {device_id};
    PGresult *r = NULL;
    json_t *doc = NULL, *merged = NULL;
    char *text = NULL;
    int code = cm_pg_begin(c) ? dm__pg_fail(c, "shadow", e) : CM_STATUS_OK;
    /* FOR SHARE on the device: it cannot be deleted between our check and our write. */
    if (!code) code = dm__device_missing(c, device_id, 1, e);
    if (!code && cm_pg_exec(c, NULL, "INSERT INTO shadows (device_id) VALUES ($1) ON CONFLICT DO NOTHING", 1, p))
        code = dm__pg_fail(c, "shadow", e);
    if (!code && cm_pg_exec(c, &r, "SELECT " DM__SHADOW_COLS " FROM shadows WHERE device_id = $1 FOR UPDATE", 1, p))
        code = dm__pg_fail(c, "shadow", e);
    int64_t version = code ? 0 : dm__int(r, 0, 2);
    if (!code && expected_version && expected_version != version) {
        snprintf(e->msg, sizeof e->msg, "expected_version: the shadow of \"%s\" is at version %" PRId64 ", not %" PRId64,
                 device_id, version, expected_version);
        code = CM_STATUS_ABORTED;
    }
    if (!code) {
        const char *cur = PQgetvalue(r, 0, reported ? 1 : 0);
        char err[160];
        doc = cm_json_parse(cur, strlen(cur), err, sizeof err);
        merged = doc ? cm_json_merge_patch(doc, pj) : NULL;
        text = merged ? cm_json_dump(merged) : NULL;
        if (!text) {
            snprintf(e->msg, sizeof e->msg, "shadow of \"%s\": stored document unreadable", device_id);
            code = CM_STATUS_INTERNAL;
        } else if (strlen(text) > DM_SHADOW_MAX_BYTES) {
            snprintf(e->msg, sizeof e->msg, "patch: the %s document would be %zu bytes as JSON; the limit is %d",
                     reported ? "reported" : "desired", strlen(text), DM_SHADOW_MAX_BYTES);
            code = CM_STATUS_INVALID_ARGUMENT;
        } else if (cm_json_depth(merged) > CM_JSON_MAX_DEPTH) {
            snprintf(e->msg, sizeof e->msg, "patch: the document would nest deeper than %d", CM_JSON_MAX_DEPTH);
            code = CM_STATUS_INVALID_ARGUMENT;
        }
    }
    PQclear(r);
    r = NULL;
    if (!code) {
        const char *q[] = {device_id, text};
        if (cm_pg_exec(c, &r,
                       reported ? "UPDATE shadows SET reported = $2::jsonb, reported_at = now(), version = version + 1 "
                                  "WHERE device_id = $1 RETURNING " DM__SHADOW_COLS
                                : "UPDATE shadows SET desired = $2::jsonb, desired_at = now(), version = version + 1 "
                                  "WHERE device_id = $1 RETURNING " DM__SHADOW_COLS,
                       2, q) ||
            cm_pg_commit(c))
            code = dm__pg_fail(c, "shadow", e);
    }
    if (!code)
        code = dm__shadow_build(a, device_id, PQgetvalue(r, 0, 0), PQgetvalue(r, 0, 1), dm__int(r, 0, 2),
                                dm__int(r, 0, 3), dm__int(r, 0, 4), out, e);
    else
        cm_pg_rollback(c);
    PQclear(r);
    cm_pg_release(s->pg, c);
    json_decref(pj);
    json_decref(doc);
    json_decref(merged);
    cm_free(text);
    return code;
}
