/* Device credentials: bearer tokens (issue, rotate, revoke, authenticate) and X.509 certificates
 * from the suite CA (sign, revoke, revocation list).
 *
 * A token is "dt1.<token id>.<43 characters of base64url>": 256 random bits after the id. Only its
 * SHA-256 is stored (a slow password hash buys nothing for a secret this long). Authentication
 * is one Redis round trip on the hot path: a Lua script reads the token's cache entry and the
 * device's cached status together. Revocation overwrites the entry with a "-" tombstone that
 * lives as long as any positive entry could, and positive entries (read-through fills, and the
 * write-through of a new token) are only ever SET NX, so a write racing with a revocation or a
 * device deletion cannot bring the token back. */
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>

#include <openssl/crypto.h>
#include <openssl/sha.h>

#include "cm_alloc.h"
#include "cm_buf.h"
#include "cm_err.h"
#include "cm_log.h"
#include "dm_store.h"

#define DM__TOKEN_PREFIX "dt1."
#define DM__NEGATIVE_TTL_MS 30000

/* ARGV: P, token hash. Returns nil (miss), {"-"}, or {entry, device status or "", deleted or ""}. */
static const char dm__lua_auth[] =
    "local v = redis.call('GET', ARGV[1] .. 't:' .. ARGV[2])\n"
    "if not v then return false end\n"
    "if v == '-' then return {'-'} end\n"
    "local dev = string.match(v, '^(%S+)')\n"
    "local h = redis.call('HMGET', ARGV[1] .. 'd:' .. dev, 'st', 'del')\n"
    "return {v, h[1] or '', h[2] or ''}\n";

static cm_redis_script_t dm__auth_script;
static pthread_once_t dm__creds_once = PTHREAD_ONCE_INIT;
static void dm__creds_init(void) { cm_redis_script_init(&dm__auth_script, dm__lua_auth); }

static void dm__token_hash(const char *token, char out[65]) {
    unsigned char md[SHA256_DIGEST_LENGTH];
    SHA256((const unsigned char *)token, strlen(token), md);
    cm_hex(out, md, sizeof md);
}

/* A new token: id, secret text (allocated with a) and its hash. */
static void dm__token_new(ProtobufCAllocator *a, dm_token_t *t, char hash[65]) {
    char hex[17];
    cm_random_hex(hex, 8);
    snprintf(t->id, sizeof t->id, "tk-%s", hex);
    unsigned char raw[32];
    if (getrandom(raw, sizeof raw, 0) != (ssize_t)sizeof raw) abort();
    static const char b64[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    char secret[44];
    size_t o = 0;
    uint32_t acc = 0;
    int bits = 0;
    for (size_t i = 0; i < sizeof raw; i++) {
        acc = (acc << 8) | raw[i];
        bits += 8;
        while (bits >= 6) {
            secret[o++] = b64[(acc >> (bits - 6)) & 63];
            bits -= 6;
        }
    }
    if (bits) secret[o++] = b64[(acc << (6 - bits)) & 63];
    secret[o] = '\0';
    OPENSSL_cleanse(raw, sizeof raw);
    size_t n = strlen(DM__TOKEN_PREFIX) + strlen(t->id) + 1 + o + 1;
    t->token = a->alloc(a->allocator_data, n);
    snprintf(t->token, n, "%s%s.%s", DM__TOKEN_PREFIX, t->id, secret);
    OPENSSL_cleanse(secret, sizeof secret);
    dm__token_hash(t->token, hash);
}

static int dm__token_shape_ok(const char *tok) {
    size_t n = strlen(tok), pl = strlen(DM__TOKEN_PREFIX);
    if (n < pl + 4 + 43 || n > 120 || strncmp(tok, DM__TOKEN_PREFIX, pl) != 0) return 0;
    const char *dot = strchr(tok + pl, '.');
    if (!dot || strlen(dot + 1) != 43) return 0;
    for (const char *p = tok + pl; *p; p++)
        if (!(('a' <= *p && *p <= 'z') || ('A' <= *p && *p <= 'Z') || ('0' <= *p && *p <= '9') || *p == '-' ||
              *p == '_' || *p == '.'))
            return 0;
    return 1;
}

/* Cache writes for tokens: a positive entry (fill: only if absent) or a tombstone. */
static int dm__token_cache_set(dm_store_t *s, const char *hash, const char *value, int64_t ttl_ms, int nx, dm_err_t *e) {
    if (ttl_ms < 1) ttl_ms = 1;
    cm_buf_t key = CM_BUF_INIT;
    cm_buf_printf(&key, "%st:%s", s->prefix, hash);
    char ttl[24];
    snprintf(ttl, sizeof ttl, "%" PRId64, ttl_ms);
    const char *argv[] = {"SET", key.data, value, "PX", ttl, "NX"};
    redisReply *rep = dm__redis(s, nx ? 6 : 5, argv, NULL, e);
    cm_buf_free(&key);
    if (!rep) return CM_STATUS_UNAVAILABLE;
    freeReplyObject(rep);
    return CM_STATUS_OK;
}

static int64_t dm__positive_ttl(dm_store_t *s, int64_t expires_us) {
    int64_t ttl = s->cfg->cache_ttl_ms;
    if (expires_us) {
        int64_t left = (expires_us - dm__now_us()) / 1000;
        if (left < ttl) ttl = left;
    }
    return ttl;
}

static void dm__token_entry(char *buf, size_t cap, const char *device_id, const char *token_id, int64_t expires_us) {
    snprintf(buf, cap, "%s %s %" PRId64, device_id, token_id, expires_us / 1000);
}

static int dm__insert_token(cm_pg_conn_t *c, const char *device_id, int ttl_s, ProtobufCAllocator *a,
                            dm_token_t *out, char hash[65], dm_err_t *e) {
    dm__token_new(a, out, hash);
    char ttl[24], bhash[80];
    snprintf(ttl, sizeof ttl, "%d", ttl_s);
    snprintf(bhash, sizeof bhash, "\\x%s", hash);
    const char *p[] = {out->id, device_id, bhash, ttl};
    PGresult *r = NULL;
    if (cm_pg_exec(c, &r,
                   "INSERT INTO tokens (id, device_id, hash, expires_at) VALUES ($1, $2, $3::bytea, "
                   "CASE WHEN $4::int = 0 THEN NULL ELSE now() + make_interval(secs => $4::int) END) "
                   "RETURNING coalesce((extract(epoch from expires_at) * 1000000)::int8, 0)",
                   4, p)) {
        int code = dm__pg_fail(c, "device", e);
        if (code == CM_STATUS_NOT_FOUND) snprintf(e->msg, sizeof e->msg, "device \"%s\" not found", device_id);
        return code;
    }
    out->expires_us = dm__int(r, 0, 0);
    PQclear(r);
    return CM_STATUS_OK;
}

/* The cache entry of a token just created, written only if the key is absent (SET NX). Its hash
 * is of 256 fresh random bits, so no entry can be there unless a DeleteDevice that committed after
 * our INSERT has already tombstoned it: an unconditional SET would overwrite that tombstone and
 * the token would come back with a device re-created under the same id. Failures are logged:
 * authentication falls back to Postgres on a miss. */
static void dm__token_write_through(dm_store_t *s, const char *hash, const char *device_id, const dm_token_t *t) {
    char entry[256];
    dm__token_entry(entry, sizeof entry, device_id, t->id, t->expires_us);
    dm_err_t ignored;
    if (dm__token_cache_set(s, hash, entry, dm__positive_ttl(s, t->expires_us), 1, &ignored))
        cm_log_kv(CM_LOG_WARN, "token cache write failed", "token_id", t->id, "error", ignored.msg, NULL);
}

int dm_store_issue_token(dm_store_t *s, const char *device_id, int ttl_s, ProtobufCAllocator *a, dm_token_t *out,
                         dm_err_t *e) {
    cm_pg_conn_t *c = dm__pg(s, e);
    if (!c) return CM_STATUS_UNAVAILABLE;
    char hash[65];
    int code = dm__insert_token(c, device_id, ttl_s, a, out, hash, e);
    cm_pg_release(s->pg, c);
    if (code) return code;
    dm__token_write_through(s, hash, device_id, out);
    return CM_STATUS_OK;
}

int dm_store_rotate_token(dm_store_t *s, const char *token_id, int ttl_s, ProtobufCAllocator *a, dm_token_t *out,
                          dm_err_t *e) {
    cm_pg_conn_t *c = dm__pg(s, e);
    if (!c) return CM_STATUS_UNAVAILABLE;
    const char *p[] = {token_id};
    PGresult *r = NULL;
    char old_hash[80] = "", device_id[160] = "", hash[65];
    int code = cm_pg_begin(c) ? dm__pg_fail(c, "token", e) : CM_STATUS_OK;
    if (!code && cm_pg_exec(c, &r,
                            "SELECT device_id, encode(hash, 'hex'), revoked_at IS NOT NULL FROM tokens WHERE id = $1 "
                            "FOR UPDATE",
                            1, p))
        code = dm__pg_fail(c, "token", e);
    if (!code && PQntuples(r) == 0) {
        snprintf(e->msg, sizeof e->msg, "token \"%s\" not found", token_id);
        code = CM_STATUS_NOT_FOUND;
    }
    if (!code && strcmp(PQgetvalue(r, 0, 2), "t") == 0) {
        snprintf(e->msg, sizeof e->msg, "token \"%s\" is revoked: issue a new one with IssueToken", token_id);
        code = CM_STATUS_FAILED_PRECONDITION;
    }
    if (!code) {
        snprintf(device_id, sizeof device_id, "%s", PQgetvalue(r, 0, 0));
        snprintf(old_hash, sizeof old_hash, "%s", PQgetvalue(r, 0, 1));
    }
    PQclear(r);
    if (!code && cm_pg_exec(c, NULL, "UPDATE tokens SET revoked_at = now() WHERE id = $1", 1, p))
        code = dm__pg_fail(c, "token", e);
    if (!code) code = dm__insert_token(c, device_id, ttl_s, a, out, hash, e);
    if (!code && cm_pg_commit(c)) code = dm__pg_fail(c, "token", e);
    if (code) cm_pg_rollback(c);
    cm_pg_release(s->pg, c);
    if (code) return code;
    dm__token_write_through(s, hash, device_id, out);
    /* The old token must stop working now: as for RevokeToken, a cache failure is reported so
     * the caller retries (rotating again is harmless: the old one stays revoked). */
    if (dm__token_cache_set(s, old_hash, "-", s->cfg->cache_ttl_ms, 0, e)) {
        snprintf(e->msg, sizeof e->msg,
                 "token \"%s\" was rotated to \"%s\" in storage but the cache still accepts it: retry RevokeToken(\"%s\")",
                 token_id, out->id, token_id);
        return CM_STATUS_UNAVAILABLE;
    }
    return CM_STATUS_OK;
}

int dm_store_revoke_token(dm_store_t *s, const char *token_id, dm_err_t *e) {
    cm_pg_conn_t *c = dm__pg(s, e);
    if (!c) return CM_STATUS_UNAVAILABLE;
    const char *p[] = {token_id};
    PGresult *r = NULL;
    char hash[80] = "";
    int code = CM_STATUS_OK;
    if (cm_pg_exec(c, &r,
                   "UPDATE tokens SET revoked_at = coalesce(revoked_at, now()) WHERE id = $1 RETURNING encode(hash, 'hex')",
                   1, p))
        code = dm__pg_fail(c, "token", e);
    else if (PQntuples(r) == 0) {
        snprintf(e->msg, sizeof e->msg, "token \"%s\" not found", token_id);
        code = CM_STATUS_NOT_FOUND;
    } else
        snprintf(hash, sizeof hash, "%s", PQgetvalue(r, 0, 0));
    PQclear(r);
    cm_pg_release(s->pg, c);
    if (code) return code;
    /* Revocation promises to take effect at once: if the cache cannot be told, say so. */
    if (dm__token_cache_set(s, hash, "-", s->cfg->cache_ttl_ms, 0, e)) {
        snprintf(e->msg, sizeof e->msg, "token \"%s\" is revoked in storage but the cache could not be updated: retry",
                 token_id);
        return CM_STATUS_UNAVAILABLE;
    }
    return CM_STATUS_OK;
}

static int dm__unauth(dm_err_t *e, const char *why) {
    snprintf(e->msg, sizeof e->msg, "%s", why);
    return CM_STATUS_UNAUTHENTICATED;
}

/* The device part of authentication: its status, from the cache entry when there is one. */
static int dm__auth_device(dm_store_t *s, dm_auth_t *out, const char *st, const char *del, dm_err_t *e) {
    if (*del) return dm__unauth(e, "token's device was deleted");
    if (*st) {
        out->status = atoi(st);
    } else {
        cm_arena_t ar;
        cm_arena_init(&ar, NULL, 0);
        dm_device_t *d;
        int code = dm_store_get_device(s, out->device_id, &ar.pb, &d, e);
        if (code == CM_STATUS_OK) out->status = d->status;
        cm_arena_free(&ar);
        if (code == CM_STATUS_NOT_FOUND) return dm__unauth(e, "token's device was deleted");
        if (code) return code;
    }
    if (out->status == IOT__DEVICE__V1__DEVICE_STATUS__DEVICE_STATUS_DECOMMISSIONED)
        return dm__unauth(e, "device is decommissioned");
    return CM_STATUS_OK;
}

/* Parses a token cache entry "<device> <token id> <expires ms>". */
static int dm__auth_entry(const char *v, dm_auth_t *out, dm_err_t *e) {
    char dev[132], tid[40];
    long long exp_ms;
    if (sscanf(v, "%131s %39s %lld", dev, tid, &exp_ms) != 3) return dm__unauth(e, "token unknown");
    if (exp_ms && exp_ms * 1000 <= dm__now_us()) return dm__unauth(e, "token expired");
    snprintf(out->device_id, sizeof out->device_id, "%s", dev);
    snprintf(out->token_id, sizeof out->token_id, "%s", tid);
    return CM_STATUS_OK;
}

int dm_store_authenticate(dm_store_t *s, const char *token, dm_auth_t *out, dm_err_t *e) {
    pthread_once(&dm__creds_once, dm__creds_init);
    memset(out, 0, sizeof *out);
    if (!dm__token_shape_ok(token)) return dm__unauth(e, "token malformed: expected dt1.<id>.<secret>");
    char hash[65];
    dm__token_hash(token, hash);
    const char *args[] = {s->prefix, hash};
    dm_err_t rerr;
    redisReply *rep = dm__redis_eval(s, &dm__auth_script, 2, args, NULL, &rerr);
    if (rep && rep->type == REDIS_REPLY_ARRAY && rep->elements >= 1) {
        int code;
        if (rep->elements == 1) {
            code = dm__unauth(e, "token revoked or unknown");
        } else {
            code = dm__auth_entry(rep->element[0]->str, out, e);
            if (!code) code = dm__auth_device(s, out, rep->element[1]->str, rep->element[2]->str, e);
        }
        freeReplyObject(rep);
        return code;
    }
    /* A nil reply is a miss with Redis reachable: the Postgres answer can be cached. */
    int cache_ok = rep != NULL;
    if (rep) freeReplyObject(rep);
    /* Miss (or Redis trouble): Postgres decides, and the answer is cached if Redis is there. */
    cm_pg_conn_t *c = dm__pg(s, e);
    if (!c) return CM_STATUS_UNAVAILABLE;
    char bhash[80];
    snprintf(bhash, sizeof bhash, "\\x%s", hash);
    const char *p[] = {bhash};
    PGresult *r = NULL;
    if (cm_pg_exec(c, &r,
                   "SELECT id, device_id, coalesce((extract(epoch from expires_at) * 1000000)::int8, 0), "
                   "revoked_at IS NOT NULL FROM tokens WHERE hash = $1::bytea",
                   1, p)) {
        int code = dm__pg_fail(c, "token", e);
        cm_pg_release(s->pg, c);
        return code;
    }
    cm_pg_release(s->pg, c);
    dm_err_t ignored;
    if (PQntuples(r) == 0 || strcmp(PQgetvalue(r, 0, 3), "t") == 0) {
        int revoked = PQntuples(r) != 0;
        PQclear(r);
        if (cache_ok) dm__token_cache_set(s, hash, "-", revoked ? s->cfg->cache_ttl_ms : DM__NEGATIVE_TTL_MS, 1, &ignored);
        return dm__unauth(e, "token revoked or unknown");
    }
    int64_t exp_us = dm__int(r, 0, 2);
    snprintf(out->token_id, sizeof out->token_id, "%s", PQgetvalue(r, 0, 0));
    snprintf(out->device_id, sizeof out->device_id, "%s", PQgetvalue(r, 0, 1));
    PQclear(r);
    if (exp_us && exp_us <= dm__now_us()) return dm__unauth(e, "token expired");
    if (cache_ok) {
        char entry[256];
        dm__token_entry(entry, sizeof entry, out->device_id, out->token_id, exp_us);
        dm__token_cache_set(s, hash, entry, dm__positive_ttl(s, exp_us), 1, &ignored);
    }
    return dm__auth_device(s, out, "", "", e);
}

/* ---- certificates ---------------------------------------------------------------------------- */

static char *dm__read_file(const char *path, char *err, size_t cap) {
    FILE *f = fopen(path, "rb");
    if (!f) {
        snprintf(err, cap, "cannot open %s", path);
        return NULL;
    }
    cm_buf_t b = CM_BUF_INIT;
    char chunk[4096];
    size_t n;
    while ((n = fread(chunk, 1, sizeof chunk, f)) > 0 && b.len < (1u << 20)) cm_buf_append(&b, chunk, n);
    fclose(f);
    char *out = cm_strdup(b.data ? b.data : "");
    cm_buf_free(&b);
    return out;
}

int dm_creds_load_ca(dm_store_t *s) {
    char err[256] = "";
    char *cert = NULL, *key = NULL;
    if (*s->cfg->ca_cert_file) {
        cert = dm__read_file(s->cfg->ca_cert_file, err, sizeof err);
        key = cert ? dm__read_file(s->cfg->ca_key_file, err, sizeof err) : NULL;
    } else {
        dm_err_t e;
        cm_pg_conn_t *c = dm__pg(s, &e);
        if (!c) {
            cm_log_kv(CM_LOG_ERROR, "cannot load the device CA", "error", e.msg, NULL);
            return CM_EPG;
        }
        PGresult *r = NULL;
        if (cm_pg_exec(c, &r, "SELECT cert_pem, key_pem FROM ca WHERE id = 1", 0, NULL) == 0 && PQntuples(r) == 0) {
            /* First start: make one. Replicas starting together race; the first INSERT wins and
             * everyone reads that one back. */
            char *gc = NULL, *gk = NULL;
            if (dm_ca_generate("iotsuite device CA", 3650, &gc, &gk, err, sizeof err) == 0) {
                const char *p[] = {gc, gk};
                cm_pg_exec(c, NULL, "INSERT INTO ca (id, cert_pem, key_pem) VALUES (1, $1, $2) ON CONFLICT DO NOTHING", 2, p);
                cm_log_kv(CM_LOG_INFO, "generated the device CA (kept in Postgres)", NULL);
            }
            if (gk) OPENSSL_cleanse(gk, strlen(gk));
            cm_free(gc);
            cm_free(gk);
            PQclear(r);
            r = NULL;
            cm_pg_exec(c, &r, "SELECT cert_pem, key_pem FROM ca WHERE id = 1", 0, NULL);
        }
        if (r && PQntuples(r) == 1) {
            cert = cm_strdup(PQgetvalue(r, 0, 0));
            key = cm_strdup(PQgetvalue(r, 0, 1));
        } else if (!*err) {
            snprintf(err, sizeof err, "%s", cm_pg_error(c));
        }
        PQclear(r);
        cm_pg_release(s->pg, c);
    }
    if (cert && key) s->ca = dm_ca_load(cert, key, err, sizeof err);
    if (key) OPENSSL_cleanse(key, strlen(key));
    cm_free(cert);
    cm_free(key);
    if (!s->ca) {
        cm_log_kv(CM_LOG_ERROR, "cannot load the device CA", "error", err, NULL);
        return CM_EIO;
    }
    return 0;
}

int dm_store_sign_certificate(dm_store_t *s, const char *device_id, const char *csr_pem, int days,
                              ProtobufCAllocator *a, Iot__Device__V1__SignCertificateResponse *out, dm_err_t *e) {
    cm_pg_conn_t *c = dm__pg(s, e);
    if (!c) return CM_STATUS_UNAVAILABLE;
    const char *p[] = {device_id};
    PGresult *r = NULL;
    /* Check and insert in one transaction holding the device row FOR SHARE: DeleteDevice and
     * UpdateDevice take it FOR UPDATE, so neither can commit between the check and the INSERT.
     * A delete that comes after us revokes this certificate with the others; one that came
     * before leaves no row (or a decommissioned one) for the check to refuse. Signing inside the
     * transaction holds the lock for the millisecond or so that ECDSA takes. */
    int code = cm_pg_begin(c) ? dm__pg_fail(c, "device", e) : CM_STATUS_OK;
    if (!code && cm_pg_exec(c, &r, "SELECT status FROM devices WHERE id = $1 FOR SHARE", 1, p))
        code = dm__pg_fail(c, "device", e);
    if (!code && PQntuples(r) == 0) {
        snprintf(e->msg, sizeof e->msg, "device \"%s\" not found", device_id);
        code = CM_STATUS_NOT_FOUND;
    }
    if (!code && atoi(PQgetvalue(r, 0, 0)) == IOT__DEVICE__V1__DEVICE_STATUS__DEVICE_STATUS_DECOMMISSIONED) {
        snprintf(e->msg, sizeof e->msg, "device \"%s\" is decommissioned", device_id);
        code = CM_STATUS_FAILED_PRECONDITION;
    }
    PQclear(r);
    r = NULL;
    dm_cert_t cert = {0};
    if (!code) {
        char err[256];
        int rc = dm_ca_sign_csr(s->ca, csr_pem, device_id, days, &cert, err, sizeof err);
        if (rc == CM_EINVAL) {
            snprintf(e->msg, sizeof e->msg, "csr_pem: %s", err);
            code = CM_STATUS_INVALID_ARGUMENT;
        } else if (rc) {
            cm_log_kv(CM_LOG_ERROR, "certificate signing failed", "error", err, NULL);
            snprintf(e->msg, sizeof e->msg, "certificate signing failed");
            code = CM_STATUS_INTERNAL;
        }
    }
    if (!code) {
        char nb[24], na[24];
        snprintf(nb, sizeof nb, "%" PRId64, cert.not_before_unix);
        snprintf(na, sizeof na, "%" PRId64, cert.not_after_unix);
        const char *q[] = {cert.serial_hex, device_id, cert.cert_pem, nb, na};
        if (cm_pg_exec(c, NULL,
                       "INSERT INTO certificates (serial, device_id, pem, not_before, not_after) "
                       "VALUES ($1, $2, $3, to_timestamp($4::int8), to_timestamp($5::int8))",
                       5, q) ||
            cm_pg_commit(c))
            code = dm__pg_fail(c, "certificate", e);
    }
    if (code) cm_pg_rollback(c);
    cm_pg_release(s->pg, c);
    if (!code) {
        Iot__Device__V1__Certificate *ct = a->alloc(a->allocator_data, sizeof *ct);
        iot__device__v1__certificate__init(ct);
        ct->serial = dm__strdup(a, cert.serial_hex);
        ct->device_id = dm__strdup(a, device_id);
        ct->certificate_pem = dm__strdup(a, cert.cert_pem);
        ct->not_before = dm__ts(a, cert.not_before_unix * 1000000, 0);
        ct->not_after = dm__ts(a, cert.not_after_unix * 1000000, 0);
        out->certificate = ct;
        out->ca_certificate_pem = dm__strdup(a, dm_ca_cert_pem(s->ca));
    }
    cm_free(cert.cert_pem);
    return code;
}

int dm_store_revoke_certificate(dm_store_t *s, const char *serial, int reason, dm_err_t *e) {
    cm_pg_conn_t *c = dm__pg(s, e);
    if (!c) return CM_STATUS_UNAVAILABLE;
    char rs[8];
    snprintf(rs, sizeof rs, "%d", reason);
    const char *p[] = {serial, rs};
    PGresult *r = NULL;
    int code = CM_STATUS_OK;
    /* Revoking twice keeps the first time and reason. */
    if (cm_pg_exec(c, &r,
                   "UPDATE certificates SET revoked_at = coalesce(revoked_at, now()), reason = coalesce(reason, $2::int2) "
                   "WHERE serial = $1",
                   2, p))
        code = dm__pg_fail(c, "certificate", e);
    else if (strcmp(PQcmdTuples(r), "0") == 0) {
        snprintf(e->msg, sizeof e->msg, "certificate \"%s\" not found", serial);
        code = CM_STATUS_NOT_FOUND;
    }
    PQclear(r);
    cm_pg_release(s->pg, c);
    return code;
}

int dm_store_revocation_list(dm_store_t *s, ProtobufCAllocator *a, Iot__Device__V1__GetRevocationListResponse *out,
                             dm_err_t *e) {
    cm_pg_conn_t *c = dm__pg(s, e);
    if (!c) return CM_STATUS_UNAVAILABLE;
    PGresult *r = NULL, *num = NULL;
    int code = CM_STATUS_OK;
    /* Expired certificates may leave the list (RFC 5280 5.1.2.6): a day of slack for clock skew. */
    if (cm_pg_exec(c, &r,
                   "SELECT serial, extract(epoch from revoked_at)::int8, coalesce(reason, 0) FROM certificates "
                   "WHERE revoked_at IS NOT NULL AND not_after > now() - interval '1 day' ORDER BY serial",
                   0, NULL) ||
        cm_pg_exec(c, &num, "SELECT nextval('crl_number_seq')", 0, NULL))
        code = dm__pg_fail(c, "revocation list", e);
    cm_pg_release(s->pg, c);
    if (!code) {
        int n = PQntuples(r);
        dm_revoked_t *rv = cm_malloc(sizeof *rv * (size_t)(n ? n : 1));
        out->revoked_serials = a->alloc(a->allocator_data, sizeof(char *) * (size_t)(n ? n : 1));
        out->n_revoked_serials = (size_t)n;
        for (int i = 0; i < n; i++) {
            rv[i].serial_hex = PQgetvalue(r, i, 0);
            rv[i].revoked_unix = dm__int(r, i, 1);
            rv[i].reason = atoi(PQgetvalue(r, i, 2));
            out->revoked_serials[i] = dm__strdup(a, rv[i].serial_hex);
        }
        char *pem = NULL, err[256];
        if (dm_ca_crl(s->ca, rv, (size_t)n, dm__int(num, 0, 0), 24, &pem, err, sizeof err)) {
            cm_log_kv(CM_LOG_ERROR, "revocation list signing failed", "error", err, NULL);
            snprintf(e->msg, sizeof e->msg, "revocation list signing failed");
            code = CM_STATUS_INTERNAL;
        } else {
            out->crl_pem = dm__strdup(a, pem);
            out->ca_certificate_pem = dm__strdup(a, dm_ca_cert_pem(s->ca));
        }
        cm_free(pem);
        cm_free(rv);
    }
    PQclear(r);
    PQclear(num);
    return code;
}
