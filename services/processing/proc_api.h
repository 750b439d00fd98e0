/* The iot.processing.v1.Processing service: rules CRUD, alerts (list, get, ack, watch), rollups,
 * window statistics and per-rule accounting. The consumer (proc_engine) writes what these read.
 *
 * Cross-replica reads go through Postgres and Redis, so any replica answers any call:
 *  - WatchAlerts: one poller per process reads alert_events after the highest id it has seen,
 *    every IOT_PROC_WATCH_POLL while any watcher is open (at once when this replica's engine has
 *    committed alert changes), and fans events out to watchers.
 *  - GetWindowStats: the owning replica publishes a serialized iot.processing.v1.WindowStats at
 *    <IOT_PROC_REDIS_PREFIX>win:<rule_id>:<device_id> (PX 1 hour) every IOT_PROC_STATS_INTERVAL
 *    for windows that changed and hold min_samples points.
 *  - GetRuleStats: every replica writes HSET <prefix>stats:<member> <rule_id>
 *    "<evaluations> <matches> <windows> <memory_bytes> <cpu_ns>" (PEXPIRE 3 x IOT_PROC_LEASE_TTL)
 *    every IOT_PROC_STATS_INTERVAL; live members are ZRANGEBYSCORE <prefix>members <now_ms> +inf.
 *    alerts_fired is counted in Postgres. */
#ifndef PROC_API_H
#define PROC_API_H

#include "cm_pg.h"
#include "cm_redis.h"
#include "cm_rpc.h"
#include "proc_config.h"
#include "proc_rules.h"

typedef struct proc_api_s proc_api_t;

proc_api_t *proc_api_new(const proc_config_t *cfg, cm_pg_t *pg, cm_redis_pool_t *redis, proc_rules_t *rules);
/* Fills svc with the service table (ctx = api). */
void proc_api_service(proc_api_t *api, cm_service_t *svc);
/* New alert events are committed: the WatchAlerts poller reads them now instead of at its next
 * poll. Thread-safe; for proc_engine_start. */
void proc_api_alerts_changed(void *api);
/* Server shutdown hook: ends every WatchAlerts stream (UNAVAILABLE) so the drain is not held. */
void proc_api_shutdown(void *api);
/* After the server has stopped. Accepts NULL. */
void proc_api_free(proc_api_t *api);

#endif
