/* device-mgmt's state: Postgres (the truth) and the Redis cache, events and notifications.
 *
 * Every operation returns a gRPC status code (CM_STATUS_OK or an error) and, on error, a message
 * for the caller in e->msg, so that a handler only has to pass it on. Messages built for a reply
 * are allocated with the ProtobufCAllocator given (a call's arena in handlers): nothing to free.
 *
 * Postgres keys (schema IOT_DM_PG_SCHEMA): see migrations/001_init.sql. Redis keys, under the
 * prefix P (IOT_DM_REDIS_PREFIX, default "{dm}:"):
 *   P d:<device id>   hash {v, pb, st, seen} or tombstone {v, del}: cached device (version-ordered)
 *   P t:<sha256 hex>  "<device id> <token id> <expires ms>" or "-" (revoked/unknown): token cache
 *   P events          stream of device events (the public contract, README.md)
 *   P cmdq            stream of "a command was queued for <device>" notifications
 *
 * Cache rules: a write to Postgres is followed by a cache write tagged with the row's version
 * (one sequence for the schema); the cache keeps the newest version it has seen, so concurrent
 * writers and read-through fills cannot leave an older row in place. Cache entries expire after
 * IOT_DM_CACHE_TTL, which bounds staleness if Redis missed a write while unreachable. */
#ifndef DM_STORE_H
#define DM_STORE_H

#include <pthread.h>
#include <stddef.h>
#include <stdint.h>

#include "cm_loop.h"
#include "cm_pg.h"
#include "cm_redis.h"
#include "cm_rpc.h"
#include "dm_ca.h"
#include "dm_config.h"
#include "iot/device/v1/device.pb-c.h"

typedef struct dm_err_s {
    char msg[384];
} dm_err_t;

typedef Iot__Device__V1__Device dm_device_t;
typedef Iot__Device__V1__DeviceFilter dm_filter_t;

typedef struct dm_store_s {
    cm_pg_t *pg;
    cm_redis_pool_t *redis;
    const dm_config_t *cfg;
    char prefix[64];
    int redis_timeout_ms;
    cm_loop_t *relay;   /* events outbox -> Redis stream */
    cm_loop_t *presence; /* offline marking, command expiry */
    dm_ca_t *ca;        /* loaded by dm_store_start; NULL until then */
    pthread_mutex_t ca_mu;
} dm_store_t;

/* Opens pools (lazily connected). 0, or CM_EINVAL for a malformed Redis address. */
int dm_store_open(dm_store_t *s, const dm_config_t *cfg, int pg_conns, int redis_conns);
/* Applies migrations, loads or makes the CA, starts the background loops. 0 or CM_EPG / CM_EIO
 * with a log line saying why. */
int dm_store_start(dm_store_t *s);
/* Stops the background loops (publishing what is pending) and closes everything. */
void dm_store_close(dm_store_t *s);
/* Readiness: 1 when Postgres and Redis both answer; else 0 with the reason in why. */
int dm_store_ready(void *store, char *why, size_t len);

/* ---- devices ---- */
/* Creates the devices (all or none; see BatchCreateDevicesRequest) and fills in ids, times and
 * etags in place (strings allocated with a). ALREADY_EXISTS names the index of the offender. */
int dm_store_create_devices(dm_store_t *s, dm_device_t **devs, size_t n, ProtobufCAllocator *a, dm_err_t *e);
int dm_store_get_device(dm_store_t *s, const char *id, ProtobufCAllocator *a, dm_device_t **out, dm_err_t *e);
/* Applies the fields named in mask (NULL/empty: every settable field) from upd; upd->etag, when
 * set, must match (ABORTED). */
int dm_store_update_device(dm_store_t *s, const dm_device_t *upd, const char *const *mask, size_t n_mask,
                           ProtobufCAllocator *a, dm_device_t **out, dm_err_t *e);
int dm_store_delete_device(dm_store_t *s, const char *id, const char *etag, dm_err_t *e);
/* One page ordered by id. page_token "" for the first page; *next "" after the last one. */
int dm_store_list_devices(dm_store_t *s, const dm_filter_t *f, int page_size, const char *page_token,
                          ProtobufCAllocator *a, dm_device_t ***out, size_t *n, char **next, dm_err_t *e);
/* The devices matching f, in total and by status (statuses with devices only, in enum order). */
int dm_store_count_devices(dm_store_t *s, const dm_filter_t *f, ProtobufCAllocator *a,
                           Iot__Device__V1__CountDevicesResponse *out, dm_err_t *e);

/* ---- groups ---- */
typedef Iot__Device__V1__Group dm_group_t;
int dm_store_create_group(dm_store_t *s, dm_group_t *g, ProtobufCAllocator *a, dm_err_t *e);
int dm_store_get_group(dm_store_t *s, const char *id, ProtobufCAllocator *a, dm_group_t **out, dm_err_t *e);
int dm_store_list_groups(dm_store_t *s, int page_size, const char *page_token, ProtobufCAllocator *a,
                         dm_group_t ***out, size_t *n, char **next, dm_err_t *e);
int dm_store_update_group(dm_store_t *s, const dm_group_t *upd, const char *const *mask, size_t n_mask,
                          ProtobufCAllocator *a, dm_group_t **out, dm_err_t *e);
int dm_store_delete_group(dm_store_t *s, const char *id, dm_err_t *e);
/* add: 1 to add, 0 to remove. *changed counts rows actually added/removed. */
int dm_store_group_members(dm_store_t *s, const char *group_id, char **ids, size_t n, int add, int *changed,
                           dm_err_t *e);

/* ---- presence ---- */
int dm_store_report_seen(dm_store_t *s, char **ids, const int64_t *at_us, size_t n, int *updated, int *unknown,
                         dm_err_t *e);

/* ---- credentials (dm_creds.c) ---- */
typedef struct dm_token_s {
    char id[40];
    char *token; /* allocated with a */
    int64_t expires_us; /* 0: never */
} dm_token_t;
int dm_store_issue_token(dm_store_t *s, const char *device_id, int ttl_s, ProtobufCAllocator *a, dm_token_t *out,
                         dm_err_t *e);
int dm_store_rotate_token(dm_store_t *s, const char *token_id, int ttl_s, ProtobufCAllocator *a, dm_token_t *out,
                          dm_err_t *e);
int dm_store_revoke_token(dm_store_t *s, const char *token_id, dm_err_t *e);
typedef struct dm_auth_s {
    char device_id[132];
    char token_id[40];
    int status;
} dm_auth_t;
/* UNAUTHENTICATED for an unknown, malformed, expired or revoked token, or a decommissioned device. */
int dm_store_authenticate(dm_store_t *s, const char *token, dm_auth_t *out, dm_err_t *e);

int dm_store_sign_certificate(dm_store_t *s, const char *device_id, const char *csr_pem, int days,
                              ProtobufCAllocator *a, Iot__Device__V1__SignCertificateResponse *out, dm_err_t *e);
int dm_store_revoke_certificate(dm_store_t *s, const char *serial, int reason, dm_err_t *e);
int dm_store_revocation_list(dm_store_t *s, ProtobufCAllocator *a, Iot__Device__V1__GetRevocationListResponse *out,
                             dm_err_t *e);

/* ---- shadows (dm_shadow.c) ---- */
int dm_store_get_shadow(dm_store_t *s, const char *device_id, ProtobufCAllocator *a, Iot__Device__V1__Shadow **out,
                        dm_err_t *e);
/* reported: 0 patches desired, 1 patches reported. */
int dm_store_update_shadow(dm_store_t *s, const char *device_id, int reported, const Google__Protobuf__Struct *patch,
                           int64_t expected_version, ProtobufCAllocator *a, Iot__Device__V1__Shadow **out,
                           dm_err_t *e);

/* ---- internal helpers shared by the dm_*.c store files ---- */
typedef struct dm__params_s {
    const char *v[160];
    int n;
} dm__params_t;
/* 1..max characters: an ASCII letter or digit first, then letters, digits or `extra`. */
int dm__name_ok(const char *s, size_t max, const char *extra);
/* The rule for every id a client names (devices, groups, tokens): 1-128 characters of A-Z, a-z,
 * 0-9, '.', '_', ':', '-', starting with a letter or digit. Handlers check request fields with it,
 * and the store checks what it decodes from page tokens, so no other text reaches a query. */
int dm__id_ok(const char *s);
/* Appends a parameter and returns its number ($n). */
int dm__param(dm__params_t *p, const char *value);
/* Acquires a Postgres connection or fails with UNAVAILABLE. */
cm_pg_conn_t *dm__pg(dm_store_t *s, dm_err_t *e);
/* Maps a failed statement on c to a status: lost connection UNAVAILABLE, unique violation
 * ALREADY_EXISTS (with what), foreign key NOT_FOUND (with what), else INTERNAL. */
int dm__pg_fail(cm_pg_conn_t *c, const char *what, dm_err_t *e);
/* Runs one Redis command on a pooled connection: reply or NULL (error replies become NULL), with
 * the reason in e. */
redisReply *dm__redis(dm_store_t *s, int argc, const char **argv, const size_t *lens, dm_err_t *e);
redisReply *dm__redis_eval(dm_store_t *s, const cm_redis_script_t *script, int nargs, const char **args,
                           const size_t *lens, dm_err_t *e);
/* Queues an event in the outbox, inside the caller's transaction. */
int dm__event(cm_pg_conn_t *c, const char *type, const char *device_id, int status, const char *version);
/* Wakes the relay after a commit that queued events. */
void dm__events_kick(dm_store_t *s);
/* The device cache: writes the row at version (pb NULL: a deletion tombstone). Failures are logged
 * and counted, not returned: Postgres already has the truth and the TTL bounds staleness. */
void dm__cache_put(dm_store_t *s, const char *id, const char *version, const dm_device_t *d);
/* Timestamp from microseconds since the epoch (NULL for 0 when null_if_zero). */
Google__Protobuf__Timestamp *dm__ts(ProtobufCAllocator *a, int64_t us, int null_if_zero);
char *dm__strdup(ProtobufCAllocator *a, const char *s);
int64_t dm__now_us(void);
/* An integer column of a result row. */
int64_t dm__int(const PGresult *r, int row, int col);
/* Loads the CA from files or Postgres, making one on first start (dm_creds.c). 0 or CM_E*. */
int dm_creds_load_ca(dm_store_t *s);

#endif
