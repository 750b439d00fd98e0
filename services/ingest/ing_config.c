/* ingest configuration: variables, defaults that work locally, and checks. */
#include "ing_config.h"

#include <stdio.h>
#include <string.h>

#include "cm_err.h"

#define ING__HOUR 3600000LL
#define ING__DAY (24 * ING__HOUR)

void ing_config_vars(ing_config_t *c, cm_config_var_t *out) {
    const cm_config_var_t vars[ING_CONFIG_NVARS] = {
        {"IOT_PG_DSN", CM_CFG_STRING, "dbname=iotsuite", "Postgres connection string (libpq keywords or URI)", 0, 0, &c->pg_dsn},
        {"IOT_INGEST_PG_SCHEMA", CM_CFG_STRING, "ingest", "Postgres schema owned by ingest (created if missing)", 0, 0, &c->pg_schema},
        {"IOT_INGEST_MIGRATIONS", CM_CFG_STRING, "services/ingest/migrations", "directory of the schema migrations applied at start", 0, 0, &c->migrations},
        {"IOT_REDIS_ADDR", CM_CFG_STRING, "127.0.0.1:6379", "Redis for the telemetry streams (host:port or unix:/path)", 0, 0, &c->redis_addr},
        {"IOT_REDIS_TIMEOUT", CM_CFG_DURATION, "2s", "connect and command timeout for Redis", 50, 60000, &c->redis_timeout_ms},
        {"IOT_INGEST_STREAM_PREFIX", CM_CFG_STRING, "telemetry:", "stream keys are <prefix>{<shard>}", 0, 0, &c->stream_prefix},
        {"IOT_INGEST_SHARDS", CM_CFG_INT, "8", "number of telemetry streams; a device's shard is fnv1a64(device_id) mod this", 1, 1024, &c->shards},
        {"IOT_INGEST_STREAM_MAXLEN", CM_CFG_INT, "100000", "approximate entries each stream is trimmed to", 100, 100000000, &c->stream_maxlen},
        {"IOT_INGEST_DM_ADDR", CM_CFG_STRING, "127.0.0.1:7002", "device-mgmt gRPC address (token checks, last-seen reports)", 0, 0, &c->dm_addr},
        {"IOT_INGEST_AUTH_CACHE_TTL", CM_CFG_DURATION, "30s", "how long a checked token is trusted without asking device-mgmt again (bounds revocation delay)", 0, 3600000, &c->auth_cache_ms},
        {"IOT_INGEST_COMMITTERS", CM_CFG_INT, "2", "commit threads, each with its own Postgres connection; a device always goes to the same one", 1, 64, &c->committers},
        {"IOT_INGEST_FLUSH_INTERVAL", CM_CFG_DURATION, "2ms", "how long a commit group waits for more batches once one arrived", 0, 1000, &c->flush_ms},
        {"IOT_INGEST_FLUSH_POINTS", CM_CFG_INT, "20000", "points per commit group at most", 100, 1000000, &c->flush_points},
        {"IOT_INGEST_MAX_PENDING", CM_CFG_INT, "200000", "points accepted but not yet committed, over all devices; beyond it calls get RESOURCE_EXHAUSTED", 1000, 100000000, &c->max_pending},
        {"IOT_INGEST_RATE_LIMIT", CM_CFG_INT, "20000", "points per second per device (bursts up to one second's worth); 0 = no limit", 0, 100000000, &c->rate_limit},
        {"IOT_INGEST_MAX_PAST", CM_CFG_DURATION, "168h", "points older than this are refused (at most IOT_INGEST_RETENTION)", 60000, 87600 * ING__HOUR, &c->max_past_ms},
        {"IOT_INGEST_MAX_FUTURE", CM_CFG_DURATION, "5m", "points further than this in the future are refused", 0, 86400000, &c->max_future_ms},
        {"IOT_INGEST_RETENTION", CM_CFG_DURATION, "720h", "partitions whose whole range is older than this are dropped", 3600000, 87600 * ING__HOUR, &c->retention_ms},
        {"IOT_INGEST_PARTITION", CM_CFG_DURATION, "24h", "time range of one telemetry partition: whole hours dividing 24h, or whole days", 3600000, 8760 * ING__HOUR, &c->partition_ms},
        {"IOT_INGEST_MAINTENANCE_INTERVAL", CM_CFG_DURATION, "10m", "how often partitions are created ahead and old ones dropped", 100, 86400000, &c->maintenance_ms},
        {"IOT_INGEST_PRESENCE_INTERVAL", CM_CFG_DURATION, "10s", "how often last-seen times are reported to device-mgmt", 100, 3600000, &c->presence_ms},
        {"IOT_INGEST_QUERY_POOL", CM_CFG_INT, "4", "Postgres connections for queries and partition upkeep", 1, 256, &c->query_pool},
        {"IOT_INGEST_REPUBLISH_INTERVAL", CM_CFG_DURATION, "30s", "how often devices with committed points missing from their stream are looked for (and republished)", 100, 3600000, &c->republish_ms},
        {"IOT_INGEST_MAX_WATCHERS", CM_CFG_INT, "1000", "open WatchTelemetry streams at most; beyond it calls get RESOURCE_EXHAUSTED", 1, 1000000, &c->max_watchers},
    };
    memcpy(out, vars, sizeof vars);
}

int ing_config_check(const ing_config_t *c, const char *prog) {
    size_t n = strlen(c->pg_schema);
    if (n == 0 || n > 63) {
        fprintf(stderr, "%s: IOT_INGEST_PG_SCHEMA must be 1-63 characters\n", prog);
        return CM_ECONFIG;
    }
    n = strlen(c->stream_prefix);
    if (n == 0 || n > 64) {
        fprintf(stderr, "%s: IOT_INGEST_STREAM_PREFIX must be 1-64 characters\n", prog);
        return CM_ECONFIG;
    }
    if (!*c->dm_addr) {
        fprintf(stderr, "%s: IOT_INGEST_DM_ADDR is required (devices are authenticated by device-mgmt)\n", prog);
        return CM_ECONFIG;
    }
    /* Partition bounds are computed from the epoch, so a partition must tile days exactly. */
    if (c->partition_ms % ING__HOUR ||
        (c->partition_ms < ING__DAY ? ING__DAY % c->partition_ms : c->partition_ms % ING__DAY)) {
        fprintf(stderr, "%s: IOT_INGEST_PARTITION must be whole hours dividing 24h (1h, 2h, 3h, 4h, 6h, 8h, 12h) or whole days (24h, 48h, ...)\n", prog);
        return CM_ECONFIG;
    }
    if (c->max_past_ms > c->retention_ms) {
        fprintf(stderr, "%s: IOT_INGEST_MAX_PAST must not exceed IOT_INGEST_RETENTION (points would be dropped as soon as stored)\n", prog);
        return CM_ECONFIG;
    }
    if (c->flush_points < 10000) {
        /* A single batch may hold 10,000 points and must fit in one group. */
        fprintf(stderr, "%s: IOT_INGEST_FLUSH_POINTS must be at least 10000 (the largest batch)\n", prog);
        return CM_ECONFIG;
    }
    if (c->max_pending < c->flush_points) {
        fprintf(stderr, "%s: IOT_INGEST_MAX_PENDING must be at least IOT_INGEST_FLUSH_POINTS\n", prog);
        return CM_ECONFIG;
    }
    return 0;
}
