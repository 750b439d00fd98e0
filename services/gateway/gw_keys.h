/* API keys: "iotk_<id>_<secret>", the id public, only a SHA-256 of the secret stored (Postgres,
 * the gateway's schema). Checks are served from a short-lived cache so a request costs no
 * Postgres round trip; revoking through this replica takes effect at once, through another
 * within IOT_GW_KEY_CACHE. */
#ifndef GW_KEYS_H
#define GW_KEYS_H

#include <stddef.h>
#include <stdint.h>

#include "cm_alloc.h"
#include "cm_pg.h"
#include "iot/gateway/v1/gateway.pb-c.h"

/* A route's least role; GW_ROLE_DEVICE routes take a device token instead, GW_ROLE_PUBLIC no key. */
enum { GW_ROLE_PUBLIC = -1, GW_ROLE_DEVICE = 0, GW_ROLE_VIEWER = 1, GW_ROLE_OPERATOR = 2, GW_ROLE_ADMIN = 3 };

#define GW_KEY_ID_LEN 12

typedef struct gw_key_s {
    char id[GW_KEY_ID_LEN + 1];
    int role;
} gw_key_t;

typedef struct gw_keys_s gw_keys_t;

gw_keys_t *gw_keys_new(cm_pg_t *pg, int64_t cache_ms);
void gw_keys_free(gw_keys_t *k);
/* The key presented: 0 with *out; CM_ENOTFOUND when it is not a working key (malformed, unknown,
 * revoked, wrong secret: the caller answers 401 alike); CM_EPG when Postgres cannot say. */
int gw_keys_check(gw_keys_t *k, const char *presented, gw_key_t *out);
/* At start: given (IOT_GW_BOOTSTRAP_KEY) is made a working admin key; with none given and no
 * working admin key stored, one is created and its secret written to created (else created is "").
 * 0, CM_EINVAL for a malformed given key, CM_EPG. */
int gw_keys_bootstrap(gw_keys_t *k, const char *given, char *created, size_t cap);

/* Key management; results in arena a. 0, CM_EPG, CM_ENOTFOUND. */
int gw_keys_create(gw_keys_t *k, const char *name, int role, const char *by, cm_arena_t *a,
                   Iot__Gateway__V1__CreateApiKeyResponse **out);
int gw_keys_get(gw_keys_t *k, const char *id, cm_arena_t *a, Iot__Gateway__V1__ApiKey **out);
/* Keys ordered by id after after_id (""), at most limit (+1 fetched to tell if more follow). */
int gw_keys_list(gw_keys_t *k, const char *after_id, int limit, int include_revoked, cm_arena_t *a,
                 Iot__Gateway__V1__ListApiKeysResponse **out);
/* Revokes id (idempotent: revoking a revoked key keeps its first revoke time). */
int gw_keys_revoke(gw_keys_t *k, const char *id, cm_arena_t *a, Iot__Gateway__V1__ApiKey **out);
/* 1 when id has the shape of a key id (so it can be used in SQL and page tokens). */
int gw_key_id_valid(const char *id);

#endif
