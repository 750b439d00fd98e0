/* The registry's state in Redis: instances, leases and their expiry, behind five operations.
 *
 * Every operation is one Lua script, so it is atomic and uses Redis's own clock (TIME): several
 * registry replicas with skewed clocks still agree on which leases have lapsed. Keys (prefix P,
 * default "{reg}:"):
 *   P i:<service>/<id>   hash: pb (packed iot.registry.v1.Instance), lease, reg (ms), ttl (ms), status,
 *                        exp (a copy of the lease expiry, so Discover needs one call per instance)
 *   P s:<service>        set of instance ids
 *   P services           set of service names with at least one instance
 *   P l:<lease>          "<service>/<id>"
 *   P exp                sorted set "<service>/<id>" -> lease expiry (ms)
 *   P chk                sorted set "<service>/<id>" -> when its next check is due (ms)
 *   P ev                 stream of changes (added, updated, removed, health), capped near 100,000;
 *                        every mutation appends to it in the same script, so it is in apply order
 * The instance hash also keeps, for checked instances: chk_int (interval ms), chk_ok and
 * chk_fail (consecutive results), last_check (ms), last_error. status: 1 passing, 2 critical.
 * Service names and ids cannot contain '/', so "<service>/<id>" is unambiguous. */
#ifndef REG_STORE_H
#define REG_STORE_H

#include <stddef.h>
#include <stdint.h>

#include "cm_redis.h"
#include "iot/registry/v1/registry.pb-c.h"

typedef struct reg_store_s {
    cm_redis_pool_t *pool;
    char prefix[64];
    int timeout_ms;
} reg_store_t;

/* Opens a pool of `conns` connections to addr (lazily connected). 0 or CM_EINVAL (bad address). */
int reg_store_open(reg_store_t *s, const char *addr, const char *prefix, int conns, int timeout_ms);
void reg_store_close(reg_store_t *s);
/* 1 when Redis answers PING; else 0 with the reason in why (readiness). */
int reg_store_ready(void *store, char *why, size_t len);

/* Results: 0, REG_NOT_FOUND, or CM_EREDIS (message in err). */
#define REG_NOT_FOUND 1

int reg_store_register(reg_store_t *s, const Iot__Registry__V1__Instance *inst, int64_t ttl_ms, char *lease_out,
                       size_t lease_cap, int64_t *expires_ms, char *err, size_t errcap);
int reg_store_heartbeat(reg_store_t *s, const char *lease, int64_t *ttl_ms, int64_t *expires_ms, char *err, size_t errcap);
/* By lease when lease is non-empty, else by service + id. */
int reg_store_deregister(reg_store_t *s, const char *lease, const char *service, const char *id, char *err, size_t errcap);

typedef struct reg_entry_s {
    Iot__Registry__V1__Instance *inst; /* unpacked with the allocator given to reg_store_discover */
    char lease[40];
    int64_t expires_ms, registered_ms;
    int status;
    int64_t last_check_ms;
    char last_error[200];
} reg_entry_t;

/* Live instances of service (lapsed leases excluded). *out is allocated with alloc. When rev is
 * given it receives the event-log position this snapshot corresponds to. */
int reg_store_discover(reg_store_t *s, const char *service, ProtobufCAllocator *alloc, reg_entry_t **out, size_t *n,
                       char *rev, size_t revcap, char *err, size_t errcap);

/* One change from the event log. For removals entry.inst is NULL. */
typedef struct reg_event_s {
    char rev[40];
    char kind[16]; /* "added", "updated", "removed", "health" */
    char service[64];
    char instance_id[132];
    reg_entry_t entry;
} reg_event_t;

/* Parses one stream entry ([id, [field, value, ...]]); the instance is unpacked with alloc. */
int reg_store_parse_event(redisReply *entry, ProtobufCAllocator *alloc, reg_event_t *ev);
/* Log entries after `after` (exclusive) up to `upto` (inclusive), as an XRANGE reply (free it). */
int reg_store_events_between(reg_store_t *s, const char *after, const char *upto, redisReply **out, char *err,
                             size_t errcap);

typedef struct reg_service_count_s {
    char name[64];
    int instances, passing;
} reg_service_count_t;

/* Every service with live instances; *out is malloc'd (cm_free). */
int reg_store_list(reg_store_t *s, reg_service_count_t **out, size_t *n, char *err, size_t errcap);

typedef struct reg_claim_s {
    char member[200];                   /* "<service>/<id>" */
    Iot__Registry__V1__Instance *inst;  /* its registration, with the check */
} reg_claim_t;

/* Claims up to max due checks (each pushed one interval ahead). *out: reg_claims_free. */
int reg_store_claim_checks(reg_store_t *s, int max, reg_claim_t **out, size_t *n, char *err, size_t errcap);
void reg_claims_free(reg_claim_t *c, size_t n);
/* Records one check result; *status is the instance's status afterwards, *changed 1 if it flipped.
 * REG_NOT_FOUND when the instance went away meanwhile. */
int reg_store_report(reg_store_t *s, const char *member, int passed, int fails_needed, int successes_needed,
                     const char *error, int *status, int *changed, char *err, size_t errcap);

/* Removes up to `max` lapsed instances; returns how many, or CM_EREDIS. */
int reg_store_sweep(reg_store_t *s, int max, char *err, size_t errcap);

#endif
