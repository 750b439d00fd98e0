/* API key storage and checks (see gw_keys.h). SQL only with parameters; secrets never logged. */
#include "gw_keys.h"

#include <openssl/crypto.h>
#include <openssl/sha.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cm_buf.h"
#include "cm_err.h"
#include "cm_log.h"
#include "cm_map.h"
#include "cm_time.h"

#define GW__SECRET_HEX 64
#define GW__KEY_LEN (5 + GW_KEY_ID_LEN + 1 + GW__SECRET_HEX)

typedef struct gw__cached_s {
    int role;
    int revoked;
    uint8_t sha[32];
    int64_t until_ms;
} gw__cached_t;

/* Unknown ids are remembered too (a client retrying a deleted key costs no query), in a map that
 * is emptied when it reaches this size, so guessing ids cannot fill memory. */
#define GW__UNKNOWN_MAX 4096

struct gw_keys_s {
    cm_pg_t *pg;
    int64_t cache_ms;
    pthread_mutex_t mu;
    cm_map_t *cache;   /* id -> gw__cached_t */
    cm_map_t *unknown; /* id -> int64_t until_ms */
    uint64_t gen;      /* bumped by every revoke: a lookup that raced one does not cache */
};

gw_keys_t *gw_keys_new(cm_pg_t *pg, int64_t cache_ms) {
    gw_keys_t *k = cm_calloc(1, sizeof *k);
    k->pg = pg;
    k->cache_ms = cache_ms;
    pthread_mutex_init(&k->mu, NULL);
    k->cache = cm_map_new();
    k->unknown = cm_map_new();
    return k;
}

void gw_keys_free(gw_keys_t *k) {
    if (!k) return;
    cm_map_free(k->cache, cm_free);
    cm_map_free(k->unknown, cm_free);
    pthread_mutex_destroy(&k->mu);
    cm_free(k);
}

static int gw__hex(const char *s, size_t n) {
    for (size_t i = 0; i < n; i++)
        if (!((s[i] >= '0' && s[i] <= '9') || (s[i] >= 'a' && s[i] <= 'f'))) return 0;
    return 1;
}

int gw_key_id_valid(const char *id) { return strlen(id) == GW_KEY_ID_LEN && gw__hex(id, GW_KEY_ID_LEN); }

/* Splits "iotk_<id>_<secret>"; 0 or -1. */
static int gw__split(const char *key, char id[GW_KEY_ID_LEN + 1], const char **secret) {
    if (strlen(key) != GW__KEY_LEN || strncmp(key, "iotk_", 5) || key[5 + GW_KEY_ID_LEN] != '_' ||
        !gw__hex(key + 5, GW_KEY_ID_LEN) || !gw__hex(key + 6 + GW_KEY_ID_LEN, GW__SECRET_HEX))
        return -1;
    memcpy(id, key + 5, GW_KEY_ID_LEN);
    id[GW_KEY_ID_LEN] = 0;
    *secret = key + 6 + GW_KEY_ID_LEN;
    return 0;
}

static cm_pg_conn_t *gw__conn(gw_keys_t *k) {
    cm_pg_conn_t *c = cm_pg_acquire(k->pg, 2000);
    if (!c) cm_log_kv(CM_LOG_WARN, "api keys: no Postgres connection", "why", cm_pg_last_error(k->pg), NULL);
    return c;
}

static int gw__exec(gw_keys_t *k, PGresult **res, const char *sql, int n, const char *const *p, const int *len, const int *fmt) {
    cm_pg_conn_t *c = gw__conn(k);
    if (!c) return CM_EPG;
    int rc = cm_pg_exec_bin(c, res, sql, n, p, len, fmt, 0);
    if (rc) cm_log_kv(CM_LOG_WARN, "api keys: query failed", "error", cm_pg_error(c), NULL);
    cm_pg_release(k->pg, c);
    return rc;
}

int gw_keys_check(gw_keys_t *k, const char *presented, gw_key_t *out) {
    char id[GW_KEY_ID_LEN + 1];
    const char *secret;
    if (!presented || gw__split(presented, id, &secret)) return CM_ENOTFOUND;
    uint8_t sha[32];
    SHA256((const unsigned char *)secret, GW__SECRET_HEX, sha);
    int64_t now = cm_wall_ms();
    gw__cached_t e;
    pthread_mutex_lock(&k->mu);
    gw__cached_t *c = cm_map_get(k->cache, id, GW_KEY_ID_LEN);
    int64_t *unknown_until = cm_map_get(k->unknown, id, GW_KEY_ID_LEN);
    int hit = c && c->until_ms > now, unknown = unknown_until && *unknown_until > now;
    if (hit) e = *c;
    uint64_t gen = k->gen;
    pthread_mutex_unlock(&k->mu);
    if (unknown) return CM_ENOTFOUND;
    if (!hit) {
        PGresult *r = NULL;
        const char *p[1] = {id};
        if (gw__exec(k, &r, "SELECT role, secret_sha256, revoke_time IS NOT NULL FROM api_keys WHERE id = $1", 1, p, NULL, NULL))
            return CM_EPG;
        if (PQntuples(r) == 0) {
            PQclear(r);
            pthread_mutex_lock(&k->mu);
            if (cm_map_len(k->unknown) >= GW__UNKNOWN_MAX) {
                cm_map_free(k->unknown, cm_free);
                k->unknown = cm_map_new();
            }
            int created;
            void **slot = cm_map_slot(k->unknown, id, GW_KEY_ID_LEN, &created);
            if (created) *slot = cm_malloc(sizeof(int64_t));
            *(int64_t *)*slot = now + k->cache_ms;
            pthread_mutex_unlock(&k->mu);
            return CM_ENOTFOUND;
        }
        e.role = atoi(PQgetvalue(r, 0, 0));
        size_t n = 0;
        unsigned char *raw = PQunescapeBytea((const unsigned char *)PQgetvalue(r, 0, 1), &n);
        memset(e.sha, 0, sizeof e.sha);
        if (raw && n == sizeof e.sha) memcpy(e.sha, raw, n);
        PQfreemem(raw);
        e.revoked = PQgetvalue(r, 0, 2)[0] == 't';
        e.until_ms = now + k->cache_ms;
        PQclear(r);
        pthread_mutex_lock(&k->mu);
        if (gen == k->gen) { /* no revoke since the query began: what it read is current */
            int created;
            void **slot = cm_map_slot(k->cache, id, GW_KEY_ID_LEN, &created);
            if (created) *slot = cm_malloc(sizeof e);
            memcpy(*slot, &e, sizeof e);
        }
        pthread_mutex_unlock(&k->mu);
    }
    if (e.revoked || CRYPTO_memcmp(sha, e.sha, sizeof sha) != 0) return CM_ENOTFOUND;
    memcpy(out->id, id, sizeof out->id);
    out->role = e.role;
    return 0;
}

/* Stores id/secret with role; upsert makes a given bootstrap key work whatever was there. */
static int gw__store(gw_keys_t *k, const char *id, const char *secret, const char *name, int role, const char *by, int upsert) {
    uint8_t sha[32];
    SHA256((const unsigned char *)secret, GW__SECRET_HEX, sha);
    char rs[4];
    snprintf(rs, sizeof rs, "%d", role);
    const char *p[5] = {id, name, rs, (const char *)sha, by};
    const int len[5] = {0, 0, 0, sizeof sha, 0}, fmt[5] = {0, 0, 0, 1, 0};
    return gw__exec(k, NULL,
                    upsert ? "INSERT INTO api_keys (id, name, role, secret_sha256, created_by) VALUES ($1, $2, $3::smallint, $4, $5) "
                             "ON CONFLICT (id) DO UPDATE SET role = EXCLUDED.role, secret_sha256 = EXCLUDED.secret_sha256, revoke_time = NULL"
                           : "INSERT INTO api_keys (id, name, role, secret_sha256, created_by) VALUES ($1, $2, $3::smallint, $4, $5)",
                    5, p, len, fmt);
}

int gw_keys_bootstrap(gw_keys_t *k, const char *given, char *created, size_t cap) {
    if (cap) created[0] = 0;
    if (given && *given) {
        char id[GW_KEY_ID_LEN + 1];
        const char *secret;
        if (gw__split(given, id, &secret)) return CM_EINVAL;
        return gw__store(k, id, secret, "bootstrap", GW_ROLE_ADMIN, "", 1);
    }
    PGresult *r = NULL;
    if (gw__exec(k, &r, "SELECT count(*) FROM api_keys WHERE role = 3 AND revoke_time IS NULL", 0, NULL, NULL, NULL)) return CM_EPG;
    int have = atoi(PQgetvalue(r, 0, 0));
    PQclear(r);
    if (have) return 0;
    char id[GW_KEY_ID_LEN + 1], secret[GW__SECRET_HEX + 1];
    cm_random_hex(id, GW_KEY_ID_LEN / 2);
    cm_random_hex(secret, GW__SECRET_HEX / 2);
    int rc = gw__store(k, id, secret, "bootstrap", GW_ROLE_ADMIN, "", 0);
    if (rc == 0) snprintf(created, cap, "iotk_%s_%s", id, secret);
    return rc;
}

#define GW__KEY_COLS \
    "id, name, role, created_by, (extract(epoch FROM create_time) * 1000)::bigint, (extract(epoch FROM revoke_time) * 1000)::bigint"

static Google__Protobuf__Timestamp *gw__ts(cm_arena_t *a, const char *ms) {
    if (!*ms) return NULL;
    Google__Protobuf__Timestamp *t = cm_arena_alloc(a, sizeof *t);
    google__protobuf__timestamp__init(t);
    long long v = strtoll(ms, NULL, 10);
    t->seconds = v / 1000;
    t->nanos = (int32_t)(v % 1000) * 1000000;
    return t;
}

static Iot__Gateway__V1__ApiKey *gw__row(PGresult *r, int i, cm_arena_t *a) {
    Iot__Gateway__V1__ApiKey *key = cm_arena_alloc(a, sizeof *key);
    iot__gateway__v1__api_key__init(key);
    key->id = cm_arena_strdup(a, PQgetvalue(r, i, 0));
    key->name = cm_arena_strdup(a, PQgetvalue(r, i, 1));
    key->role = atoi(PQgetvalue(r, i, 2));
    key->created_by = cm_arena_strdup(a, PQgetvalue(r, i, 3));
    key->create_time = gw__ts(a, PQgetvalue(r, i, 4));
    key->revoke_time = gw__ts(a, PQgetvalue(r, i, 5));
    return key;
}

int gw_keys_get(gw_keys_t *k, const char *id, cm_arena_t *a, Iot__Gateway__V1__ApiKey **out) {
    PGresult *r = NULL;
    const char *p[1] = {id};
    if (gw__exec(k, &r, "SELECT " GW__KEY_COLS " FROM api_keys WHERE id = $1", 1, p, NULL, NULL)) return CM_EPG;
    int found = PQntuples(r) == 1;
    if (found) *out = gw__row(r, 0, a);
    PQclear(r);
    return found ? 0 : CM_ENOTFOUND;
}

int gw_keys_create(gw_keys_t *k, const char *name, int role, const char *by, cm_arena_t *a,
                   Iot__Gateway__V1__CreateApiKeyResponse **out) {
    char id[GW_KEY_ID_LEN + 1], secret[GW__SECRET_HEX + 1];
    cm_random_hex(id, GW_KEY_ID_LEN / 2);
    cm_random_hex(secret, GW__SECRET_HEX / 2);
    int rc = gw__store(k, id, secret, name, role, by, 0);
    if (rc) return rc;
    pthread_mutex_lock(&k->mu);
    cm_free(cm_map_del(k->unknown, id, GW_KEY_ID_LEN));
    pthread_mutex_unlock(&k->mu);
    Iot__Gateway__V1__CreateApiKeyResponse *resp = cm_arena_alloc(a, sizeof *resp);
    iot__gateway__v1__create_api_key_response__init(resp);
    if ((rc = gw_keys_get(k, id, a, &resp->key))) return rc;
    resp->secret = cm_arena_alloc(a, GW__KEY_LEN + 1);
    snprintf(resp->secret, GW__KEY_LEN + 1, "iotk_%s_%s", id, secret);
    *out = resp;
    return 0;
}

int gw_keys_list(gw_keys_t *k, const char *after_id, int limit, int include_revoked, cm_arena_t *a,
                 Iot__Gateway__V1__ListApiKeysResponse **out) {
    char lim[16];
    snprintf(lim, sizeof lim, "%d", limit + 1);
    const char *p[3] = {after_id, lim, include_revoked ? "t" : "f"};
    PGresult *r = NULL;
    if (gw__exec(k, &r,
                 "SELECT " GW__KEY_COLS " FROM api_keys WHERE id > $1 AND ($3::boolean OR revoke_time IS NULL) "
                 "ORDER BY id LIMIT $2::int",
                 3, p, NULL, NULL))
        return CM_EPG;
    Iot__Gateway__V1__ListApiKeysResponse *resp = cm_arena_alloc(a, sizeof *resp);
    iot__gateway__v1__list_api_keys_response__init(resp);
    int n = PQntuples(r);
    int take = n > limit ? limit : n;
    resp->keys = cm_arena_alloc(a, ((size_t)take + 1) * sizeof *resp->keys);
    for (int i = 0; i < take; i++) resp->keys[resp->n_keys++] = gw__row(r, i, a);
    if (n > limit) resp->next_page_token = cm_arena_strdup(a, PQgetvalue(r, take - 1, 0));
    PQclear(r);
    *out = resp;
    return 0;
}

int gw_keys_revoke(gw_keys_t *k, const char *id, cm_arena_t *a, Iot__Gateway__V1__ApiKey **out) {
    const char *p[1] = {id};
    if (gw__exec(k, NULL, "UPDATE api_keys SET revoke_time = coalesce(revoke_time, now()) WHERE id = $1", 1, p, NULL, NULL))
        return CM_EPG;
    pthread_mutex_lock(&k->mu);
    cm_free(cm_map_del(k->cache, id, strlen(id))); /* this replica forgets it at once */
    k->gen++;
    pthread_mutex_unlock(&k->mu);
    return gw_keys_get(k, id, a, out);
}
