/* The consumer: reads ingest's telemetry streams as one Redis consumer group, evaluates rules on
 * windows and detectors per (device, rule), writes alerts, rollups and progress to Postgres, and
 * checkpoints its state so that a restart or a takeover by another replica resumes exactly.
 *
 * Shards and replicas. Every replica heartbeats into the sorted set <prefix>members (score: expiry,
 * now + IOT_PROC_LEASE_TTL). Each shard's owner is the live member with the highest
 * mix64(cm_hash64("<member>:<shard>")) (MurmurHash3 finalizer) (rendezvous hashing: when a member joins or leaves only its share
 * moves). A replica processes a shard only while it holds the lease <prefix>lease:<shard> (SET NX
 * PX, renewed every third of the TTL), so two replicas never consume one shard at once, and it
 * stops touching Postgres and the stream once its lease may have run out. A replica that should no
 * longer own a shard checkpoints it and deletes the lease; a killed one's lease expires.
 *
 * Recovery. Entries are acknowledged (XACK) only by a checkpoint, after the window states that
 * include them are committed. A new owner claims the group's pending entries of the shard
 * (XAUTOCLAIM from 0) and replays them against the checkpointed states:
 *   - points with seq <= the device's checkpoint seq are skipped (already in the states);
 *   - points up to the device's progress mark (effects committed by a flush after the checkpoint)
 *     feed windows and detectors, and their alert writes are no-ops (an episode's key is the
 *     event time its condition began, which the replay reproduces), but not rollups again;
 *   - later points take full effect.
 * So a crash anywhere neither repeats nor loses an alert episode or a rollup contribution.
 * Any failure of a flush or checkpoint resets the shard the same way (drop memory, reload, replay).
 *
 * Threads: one per shard (started when first owned), plus the lease thread. A device's states are
 * touched only by its shard's thread. */
#ifndef PROC_ENGINE_H
#define PROC_ENGINE_H

#include "proc_actions.h"
#include "proc_config.h"
#include "proc_rules.h"

typedef struct proc_engine_s proc_engine_t;

/* NULL when the Redis address or the Postgres settings are unusable. Shards are taken once the
 * rule set has loaded. alerts_changed(arg), when not NULL, is called from a shard thread after each
 * commit that fired, escalated or resolved an alert; it must be quick and thread-safe. */
proc_engine_t *proc_engine_start(const proc_config_t *cfg, proc_rules_t *rules, proc_actions_t *actions,
                                 void (*alerts_changed)(void *arg), void *arg);
/* Graceful: every owned shard is flushed, checkpointed and released, and the member entry removed,
 * so other replicas take over at once. Accepts NULL. */
void proc_engine_stop(proc_engine_t *e);
/* Readiness: Redis answers and the rule set is loaded. 1, or 0 with the reason in why. */
int proc_engine_ready(proc_engine_t *e, char *why, size_t len);

#endif
