/* processing configuration: variables, defaults that work locally, and checks. */
#include "proc_config.h"

#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include "cm_err.h"

#define PROC__HOUR 3600000LL

void proc_config_vars(proc_config_t *c, cm_config_var_t *out) {
    const cm_config_var_t vars[PROC_CONFIG_NVARS] = {
        {"IOT_PG_DSN", CM_CFG_STRING, "dbname=iotsuite", "Postgres connection string (libpq keywords or URI)", 0, 0, &c->pg_dsn},
        {"IOT_PROC_PG_SCHEMA", CM_CFG_STRING, "processing", "Postgres schema owned by processing (created if missing)", 0, 0, &c->pg_schema},
        {"IOT_PROC_MIGRATIONS", CM_CFG_STRING, "services/processing/migrations", "directory of the schema migrations applied at start", 0, 0, &c->migrations},
        {"IOT_PROC_PG_POOL", CM_CFG_INT, "4", "Postgres connections for the API, rule loading and actions (each shard consumer has its own)", 2, 256, &c->pg_pool},
        {"IOT_REDIS_ADDR", CM_CFG_STRING, "127.0.0.1:6379", "Redis holding ingest's telemetry streams (host:port or unix:/path)", 0, 0, &c->redis_addr},
        {"IOT_REDIS_TIMEOUT", CM_CFG_DURATION, "2s", "connect and command timeout for Redis", 50, 60000, &c->redis_timeout_ms},
        {"IOT_PROC_REDIS_PREFIX", CM_CFG_STRING, "proc:", "prefix of processing's own Redis keys (members, shard leases, published statistics)", 0, 0, &c->redis_prefix},
        {"IOT_INGEST_STREAM_PREFIX", CM_CFG_STRING, "telemetry:", "ingest's stream keys are <prefix>{<shard>} (must match ingest)", 0, 0, &c->stream_prefix},
        {"IOT_INGEST_SHARDS", CM_CFG_INT, "8", "number of telemetry streams (must match ingest)", 1, 1024, &c->shards},
        {"IOT_PROC_GROUP", CM_CFG_STRING, "processing", "Redis consumer group every replica reads the streams in", 0, 0, &c->group},
        {"IOT_PROC_DM_ADDR", CM_CFG_STRING, "127.0.0.1:7002", "device-mgmt gRPC address (rule selectors, command actions)", 0, 0, &c->dm_addr},
        {"IOT_PROC_READ_COUNT", CM_CFG_INT, "256", "stream entries read per XREADGROUP", 1, 100000, &c->read_count},
        {"IOT_PROC_FLUSH_INTERVAL", CM_CFG_DURATION, "1s", "how often rollups and progress marks are committed (alerts commit at once)", 10, 60000, &c->flush_ms},
        {"IOT_PROC_CHECKPOINT_INTERVAL", CM_CFG_DURATION, "10s", "how often window states are checkpointed and stream entries acknowledged (XACK)", 100, 600000, &c->checkpoint_ms},
        {"IOT_PROC_LEASE_TTL", CM_CFG_DURATION, "6s", "shard lease lifetime: a killed replica's shards move after at most this long", 300, 600000, &c->lease_ms},
        {"IOT_PROC_RULES_POLL", CM_CFG_DURATION, "1s", "how often replicas look for rule changes made elsewhere", 10, 60000, &c->rules_poll_ms},
        {"IOT_PROC_SELECTOR_REFRESH", CM_CFG_DURATION, "30s", "how often group/type/label selectors are resolved again through device-mgmt", 100, 3600000, &c->selector_refresh_ms},
        {"IOT_PROC_STATS_INTERVAL", CM_CFG_DURATION, "1s", "how often window statistics and per-rule accounting are published", 10, 60000, &c->stats_ms},
        {"IOT_PROC_WATCH_POLL", CM_CFG_DURATION, "10ms", "how often WatchAlerts streams look for alert events of other replicas (own ones go out on commit)", 1, 10000, &c->watch_poll_ms},
        {"IOT_PROC_ACTION_POLL", CM_CFG_DURATION, "1s", "how often the action workers look for due commands and webhooks (they are also woken at once)", 10, 60000, &c->action_poll_ms},
        {"IOT_PROC_ACTION_BACKOFF", CM_CFG_DURATION, "1s", "first retry delay of a failed action; doubles per attempt, at most 5 minutes", 10, 300000, &c->action_backoff_ms},
        {"IOT_PROC_MAX_RULES", CM_CFG_INT, "10000", "rules at most (CreateRule answers RESOURCE_EXHAUSTED beyond)", 1, 1000000, &c->max_rules},
        {"IOT_PROC_ROLLUP_1M_RETENTION", CM_CFG_DURATION, "720h", "1-minute rollups older than this are deleted", PROC__HOUR, 87600 * PROC__HOUR, &c->rollup_1m_retention_ms},
        {"IOT_PROC_ROLLUP_1H_RETENTION", CM_CFG_DURATION, "8760h", "1-hour rollups older than this are deleted", PROC__HOUR, 87600 * PROC__HOUR, &c->rollup_1h_retention_ms},
        {"IOT_PROC_EVENT_RETENTION", CM_CFG_DURATION, "168h", "alert change events (WatchAlerts resume) and finished actions older than this are deleted", PROC__HOUR, 87600 * PROC__HOUR, &c->event_retention_ms},
        {"IOT_PROC_MAINTENANCE_INTERVAL", CM_CFG_DURATION, "10m", "how often old rollups, events and actions are deleted", 100, 86400000, &c->maintenance_ms},
    };
    memcpy(out, vars, sizeof vars);
}

static int proc__len_ok(const char *prog, const char *var, const char *v, size_t max) {
    size_t n = strlen(v);
    if (n == 0 || n > max) {
        fprintf(stderr, "%s: %s must be 1-%zu characters\n", prog, var, max);
        return 0;
    }
    return 1;
}

int proc_config_check(proc_config_t *c, const char *instance_id, const char *prog) {
    if (!proc__len_ok(prog, "IOT_PROC_PG_SCHEMA", c->pg_schema, 63) ||
        !proc__len_ok(prog, "IOT_INGEST_STREAM_PREFIX", c->stream_prefix, 64) ||
        !proc__len_ok(prog, "IOT_PROC_REDIS_PREFIX", c->redis_prefix, 64) ||
        !proc__len_ok(prog, "IOT_PROC_GROUP", c->group, 64) || !proc__len_ok(prog, "IOT_PROC_DM_ADDR", c->dm_addr, 256))
        return CM_ECONFIG;
    if (c->checkpoint_ms < c->flush_ms) {
        fprintf(stderr, "%s: IOT_PROC_CHECKPOINT_INTERVAL must be at least IOT_PROC_FLUSH_INTERVAL\n", prog);
        return CM_ECONFIG;
    }
    if (c->rollup_1h_retention_ms < c->rollup_1m_retention_ms) {
        fprintf(stderr, "%s: IOT_PROC_ROLLUP_1H_RETENTION must be at least IOT_PROC_ROLLUP_1M_RETENTION\n", prog);
        return CM_ECONFIG;
    }
    if (instance_id && *instance_id) {
        if (strlen(instance_id) >= sizeof c->member) {
            fprintf(stderr, "%s: IOT_INSTANCE_ID must be shorter than %zu characters\n", prog, sizeof c->member);
            return CM_ECONFIG;
        }
        snprintf(c->member, sizeof c->member, "%s", instance_id);
    } else {
        char host[64] = "";
        gethostname(host, sizeof host - 1);
        snprintf(c->member, sizeof c->member, "%s-%ld", *host ? host : "processing", (long)getpid());
    }
    return 0;
}
