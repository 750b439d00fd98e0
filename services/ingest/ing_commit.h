/* Group commit: the durable half of ingest.
 *
 * Handlers submit validated batches; each committer thread owns one Postgres and one Redis
 * connection and commits whatever queued up while it was busy (plus a short flush wait) as one
 * transaction: lock the devices' high-water marks, drop the already-stored prefix of each batch,
 * COPY the rest, move the marks, commit. Then the stored points go to the Redis stream shards
 * (after republishing whatever an earlier crash or Redis failure left off the stream, tracked by
 * a publication mark per device), and each batch's `done` is called with OK: an acknowledgement
 * always means "in Postgres". A device always maps to the same committer, which keeps its
 * batches, and its stream entries, in order.
 *
 * Memory is bounded: submit refuses with RESOURCE_EXHAUSTED beyond IOT_INGEST_MAX_PENDING points
 * waiting, and with UNAVAILABLE while the committer cannot reach Postgres. */
#ifndef ING_COMMIT_H
#define ING_COMMIT_H

#include <stddef.h>
#include <stdint.h>

#include "ing_batch.h"
#include "ing_config.h"
#include "ing_devices.h"
#include "ing_store.h"

typedef struct ing_committers_s ing_committers_t;

/* NULL when the Postgres or Redis address cannot be used (nothing is started then). */
ing_committers_t *ing_committers_start(const ing_config_t *cfg, ing_store_t *store, ing_devices_t *devices);
/* Queues b and returns CM_STATUS_OK (b->done follows later, from a committer thread), or refuses
 * with RESOURCE_EXHAUSTED / UNAVAILABLE, a message and a retry hint; b then stays the caller's. */
int ing_commit_submit(ing_committers_t *c, ing_batch_t *b, char *msg, size_t msg_cap, int64_t *retry_ms);
/* Refuses new batches (UNAVAILABLE) and waits up to timeout_ms for the queued ones to commit. */
void ing_committers_drain(ing_committers_t *c, int64_t timeout_ms);
/* Stops the threads (call after the drain and after the server stopped); batches still queued are
 * answered UNAVAILABLE without being committed. Accepts NULL. */
void ing_committers_stop(ing_committers_t *c);
/* Points accepted and not yet answered. */
int64_t ing_committers_pending(const ing_committers_t *c);

#endif
