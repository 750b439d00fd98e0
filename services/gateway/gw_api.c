/* API key management over REST (admin) and whoami (any key). Requests are parsed with the same
 * mapping as the proxied routes. */
#include "gw_api.h"

#include <string.h>

#include "cm_err.h"

static void gw__store_error(gw_req_t *r, int rc, const char *id) {
    if (rc == CM_ENOTFOUND) gw_reply_error(r, CM_STATUS_NOT_FOUND, NULL, "no API key %s", id);
    else gw_reply_error(r, CM_STATUS_UNAVAILABLE, json_pack("{s:s}", "service", "postgres"), "API keys are not reachable (Postgres)");
}

void gw_api_whoami(gw_req_t *r) {
    if (!gw_build_request_or_reply(r)) return; /* takes no parameters: an unknown one is a 400, as everywhere */
    Iot__Gateway__V1__ApiKey *k = NULL;
    int rc = gw_keys_get(r->gw->keys, r->key.id, &r->arena, &k);
    if (rc) gw__store_error(r, rc, r->key.id);
    else gw_reply_msg(r, 200, &k->base);
}

void gw_api_list_keys(gw_req_t *r) {
    Iot__Gateway__V1__ListApiKeysRequest *req = (void *)gw_build_request_or_reply(r);
    if (!req) return;
    if (req->page_size < 0 || req->page_size > 1000) {
        gw_reply_error(r, CM_STATUS_INVALID_ARGUMENT, NULL, "pageSize: 1..1000 (0 means 100)");
        return;
    }
    if (*req->page_token && !gw_key_id_valid(req->page_token)) {
        gw_reply_error(r, CM_STATUS_INVALID_ARGUMENT, NULL, "pageToken: not one this list gave out");
        return;
    }
    Iot__Gateway__V1__ListApiKeysResponse *resp = NULL;
    int rc = gw_keys_list(r->gw->keys, req->page_token, req->page_size ? req->page_size : 100, req->include_revoked, &r->arena, &resp);
    if (rc) gw__store_error(r, rc, "");
    else gw_reply_msg(r, 200, &resp->base);
}

/* Printable characters, 1..100 bytes. */
static int gw__name_ok(const char *s) {
    size_t n = strlen(s);
    if (n == 0 || n > 100) return 0;
    for (size_t i = 0; i < n; i++)
        if ((unsigned char)s[i] < 0x20 || s[i] == 0x7f) return 0;
    return 1;
}

void gw_api_create_key(gw_req_t *r) {
    Iot__Gateway__V1__CreateApiKeyRequest *req = (void *)gw_build_request_or_reply(r);
    if (!req) return;
    if (!gw__name_ok(req->name)) {
        gw_reply_error(r, CM_STATUS_INVALID_ARGUMENT, NULL, "name: 1 to 100 printable characters");
        return;
    }
    if ((int)req->role < GW_ROLE_VIEWER || (int)req->role > GW_ROLE_ADMIN) {
        gw_reply_error(r, CM_STATUS_INVALID_ARGUMENT, NULL, "role: ROLE_VIEWER, ROLE_OPERATOR or ROLE_ADMIN");
        return;
    }
    Iot__Gateway__V1__CreateApiKeyResponse *resp = NULL;
    int rc = gw_keys_create(r->gw->keys, req->name, (int)req->role, r->key.id, &r->arena, &resp);
    if (rc) gw__store_error(r, rc, "");
    else gw_reply_msg(r, 201, &resp->base);
}

static const char *gw__id_or_reply(gw_req_t *r) {
    if (!gw_build_request_or_reply(r)) return NULL; /* the query: refused like every route's */
    const char *id = gw_param(r, "id");
    if (!id || !gw_key_id_valid(id)) {
        gw_reply_error(r, CM_STATUS_NOT_FOUND, NULL, "no API key %s (ids are 12 hex digits)", id ? id : "");
        return NULL;
    }
    return id;
}

void gw_api_get_key(gw_req_t *r) {
    const char *id = gw__id_or_reply(r);
    if (!id) return;
    Iot__Gateway__V1__ApiKey *k = NULL;
    int rc = gw_keys_get(r->gw->keys, id, &r->arena, &k);
    if (rc) gw__store_error(r, rc, id);
    else gw_reply_msg(r, 200, &k->base);
}

void gw_api_revoke_key(gw_req_t *r) {
    const char *id = gw__id_or_reply(r);
    if (!id) return;
    if (strcmp(id, r->key.id) == 0) {
        gw_reply_error(r, CM_STATUS_FAILED_PRECONDITION, NULL, "a key cannot revoke itself (use another admin key)");
        return;
    }
    Iot__Gateway__V1__ApiKey *k = NULL;
    int rc = gw_keys_revoke(r->gw->keys, id, &r->arena, &k);
    if (rc) gw__store_error(r, rc, id);
    else gw_reply_msg(r, 200, &k->base);
}
