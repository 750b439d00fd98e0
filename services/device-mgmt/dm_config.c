/* device-mgmt configuration: variables, defaults that work locally, and checks. */
#include "dm_config.h"

#include <stdio.h>
#include <string.h>

#include "cm_err.h"

void dm_config_vars(dm_config_t *c, cm_config_var_t *out) {
    const cm_config_var_t vars[DM_CONFIG_NVARS] = {
        {"IOT_PG_DSN", CM_CFG_STRING, "dbname=iotsuite", "Postgres connection string (libpq keywords or URI)", 0, 0, &c->pg_dsn},
        {"IOT_DM_PG_SCHEMA", CM_CFG_STRING, "device", "Postgres schema owned by device-mgmt (created if missing)", 0, 0, &c->pg_schema},
        {"IOT_DM_PG_POOL", CM_CFG_INT, "8", "Postgres connections at most", 2, 256, &c->pg_pool},
        {"IOT_DM_MIGRATIONS", CM_CFG_STRING, "services/device-mgmt/migrations", "directory of the schema migrations applied at start", 0, 0, &c->migrations},
        {"IOT_REDIS_ADDR", CM_CFG_STRING, "127.0.0.1:6379", "Redis for the cache, events and command notifications (host:port or unix:/path)", 0, 0, &c->redis_addr},
        {"IOT_DM_REDIS_PREFIX", CM_CFG_STRING, "{dm}:", "key prefix of device-mgmt's Redis keyspace", 0, 0, &c->redis_prefix},
        {"IOT_REDIS_TIMEOUT", CM_CFG_DURATION, "2s", "connect and command timeout for Redis", 50, 60000, &c->redis_timeout_ms},
        {"IOT_DM_CACHE_TTL", CM_CFG_DURATION, "5m", "how long cached devices and tokens live in Redis (bounds staleness if Redis missed a write)", 1000, 86400000, &c->cache_ttl_ms},
        {"IOT_DM_OFFLINE_AFTER", CM_CFG_DURATION, "5m", "an online device silent this long is marked offline", 1000, 604800000, &c->offline_after_ms},
        {"IOT_DM_PRESENCE_INTERVAL", CM_CFG_DURATION, "5s", "how often silent devices are looked for, and expired commands marked", 100, 600000, &c->presence_interval_ms},
        {"IOT_DM_EVENTS_MAXLEN", CM_CFG_INT, "100000", "approximate length the device event stream is trimmed to", 1000, 100000000, &c->events_maxlen},
        {"IOT_DM_COMMAND_POLL", CM_CFG_DURATION, "30s", "command watchers also look for new commands this often (in case a notification was lost)", 1000, 3600000, &c->command_poll_ms},
        {"IOT_DM_CA_CERT", CM_CFG_STRING, "", "PEM file of the device CA certificate; empty: a CA is generated once and kept in Postgres", 0, 0, &c->ca_cert_file},
        {"IOT_DM_CA_KEY", CM_CFG_STRING, "", "PEM file of the device CA private key (with IOT_DM_CA_CERT)", 0, 0, &c->ca_key_file},
    };
    memcpy(out, vars, sizeof vars);
}

int dm_config_check(const dm_config_t *c, const char *prog) {
    size_t n = strlen(c->redis_prefix);
    if (n == 0 || n > 48) {
        fprintf(stderr, "%s: IOT_DM_REDIS_PREFIX must be 1-48 characters\n", prog);
        return CM_ECONFIG;
    }
    n = strlen(c->pg_schema);
    if (n == 0 || n > 63) {
        fprintf(stderr, "%s: IOT_DM_PG_SCHEMA must be 1-63 characters\n", prog);
        return CM_ECONFIG;
    }
    if (!*c->ca_cert_file != !*c->ca_key_file) {
        fprintf(stderr, "%s: IOT_DM_CA_CERT and IOT_DM_CA_KEY must be set together\n", prog);
        return CM_ECONFIG;
    }
    return 0;
}
