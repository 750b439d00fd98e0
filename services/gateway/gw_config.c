/* Gateway configuration: variables, defaults that work locally (the other services on their
 * default ports on this machine), and checks. */
#include "gw_config.h"

#include <stdio.h>
#include <string.h>

#include "cm_err.h"

#define GW__MIB (1024LL * 1024)

static const char *const gw__names[GW_NBACKENDS] = {"device-mgmt", "ingest", "processing", "ota", "registry"};

const char *gw_backend_name(int i) { return i >= 0 && i < GW_NBACKENDS ? gw__names[i] : "?"; }

void gw_config_vars(gw_config_t *c, cm_config_var_t *out) {
    const cm_config_var_t vars[GW_CONFIG_NVARS] = {
        {"IOT_GW_HTTP_LISTEN", CM_CFG_STRING, "0.0.0.0:8080", "REST API and dashboard address (host:port)", 0, 0, &c->http_listen},
        {"IOT_GW_DM_ADDR", CM_CFG_STRING, "127.0.0.1:7002", "device-mgmt gRPC address", 0, 0, &c->backend[GW_DM]},
        {"IOT_GW_INGEST_ADDR", CM_CFG_STRING, "127.0.0.1:7003", "ingest gRPC address", 0, 0, &c->backend[GW_INGEST]},
        {"IOT_GW_PROC_ADDR", CM_CFG_STRING, "127.0.0.1:7004", "processing gRPC address", 0, 0, &c->backend[GW_PROC]},
        {"IOT_GW_OTA_ADDR", CM_CFG_STRING, "127.0.0.1:7005", "ota gRPC address", 0, 0, &c->backend[GW_OTA]},
        {"IOT_GW_REGISTRY_ADDR", CM_CFG_STRING, "127.0.0.1:7001", "registry gRPC address (the services page)", 0, 0, &c->backend[GW_REGISTRY]},
        {"IOT_GW_BACKEND_TIMEOUT", CM_CFG_DURATION, "5s", "deadline of each backend call (504 when it passes)", 50, 600000, &c->timeout_ms},
        {"IOT_GW_MAX_BODY", CM_CFG_INT, "1048576", "largest JSON request body in bytes (413 beyond)", 1024, 64 * GW__MIB, &c->max_body},
        {"IOT_GW_MAX_UPLOAD", CM_CFG_INT, "1073741824", "largest artifact upload through the gateway in bytes (413 beyond)", 1, 1024 * 1024 * GW__MIB, &c->max_upload},
        {"IOT_GW_MAX_CONNECTIONS", CM_CFG_INT, "1024", "HTTP connections at once (one thread each; live streams hold theirs)", 4, 65536, &c->max_connections},
        {"IOT_PG_DSN", CM_CFG_STRING, "dbname=iotsuite", "Postgres connection string (libpq keywords or URI) for API keys", 0, 0, &c->pg_dsn},
        {"IOT_GW_PG_SCHEMA", CM_CFG_STRING, "gateway", "Postgres schema owned by the gateway (created if missing)", 0, 0, &c->pg_schema},
        {"IOT_GW_MIGRATIONS", CM_CFG_STRING, "services/gateway/migrations", "directory of the schema migrations applied at start", 0, 0, &c->migrations},
        {"IOT_GW_PG_POOL", CM_CFG_INT, "4", "Postgres connections (key lookups and key management)", 1, 256, &c->pg_pool},
        {"IOT_GW_BOOTSTRAP_KEY", CM_CFG_STRING, "", "an admin API key to accept (iotk_<id>_<secret>); empty: one is created and printed once when no admin key exists", 0, 0, &c->bootstrap_key},
        {"IOT_GW_KEY_CACHE", CM_CFG_DURATION, "5s", "how long a checked key is trusted before Postgres is asked again (revocations by other replicas take this long)", 0, 600000, &c->key_cache_ms},
    };
    memcpy(out, vars, sizeof vars);
}

int gw_config_check(const gw_config_t *c, const char *prog) {
    size_t n = strlen(c->pg_schema);
    if (n == 0 || n > 63) {
        fprintf(stderr, "%s: IOT_GW_PG_SCHEMA must be 1-63 characters\n", prog);
        return CM_ECONFIG;
    }
    for (int i = 0; i < GW_NBACKENDS; i++)
        if (!*c->backend[i]) {
            fprintf(stderr, "%s: the %s address must not be empty\n", prog, gw__names[i]);
            return CM_ECONFIG;
        }
    return 0;
}
