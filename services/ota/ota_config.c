/* ota configuration: variables, defaults that work locally, and checks. */
#include "ota_config.h"

#include <stdio.h>
#include <string.h>

#include "cm_err.h"

#define OTA__MIB (1024LL * 1024)

void ota_config_vars(ota_config_t *c, cm_config_var_t *out) {
    const cm_config_var_t vars[OTA_CONFIG_NVARS] = {
        {"IOT_PG_DSN", CM_CFG_STRING, "dbname=iotsuite", "Postgres connection string (libpq keywords or URI)", 0, 0, &c->pg_dsn},
        {"IOT_OTA_PG_SCHEMA", CM_CFG_STRING, "ota", "Postgres schema owned by ota (created if missing)", 0, 0, &c->pg_schema},
        {"IOT_OTA_MIGRATIONS", CM_CFG_STRING, "services/ota/migrations", "directory of the schema migrations applied at start", 0, 0, &c->migrations},
        {"IOT_OTA_PG_POOL", CM_CFG_INT, "12", "Postgres connections (each upload in progress holds one for its transaction)", 4, 512, &c->pg_pool},
        {"IOT_OTA_DM_ADDR", CM_CFG_STRING, "127.0.0.1:7002", "device-mgmt gRPC address (device tokens, rollout targets, reported versions)", 0, 0, &c->dm_addr},
        {"IOT_OTA_PROC_ADDR", CM_CFG_STRING, "127.0.0.1:7004", "processing gRPC address (alerts for the rollouts' telemetry gate)", 0, 0, &c->proc_addr},
        {"IOT_OTA_KEYS_DIR", CM_CFG_STRING, "state/ota-keys", "directory of Ed25519 private keys (PEM, one per file, named <anything>.pem)", 0, 0, &c->keys_dir},
        {"IOT_OTA_SIGNING_KEY", CM_CFG_STRING, "", "key id that signs new artifacts; empty: the only key in IOT_OTA_KEYS_DIR", 0, 0, &c->signing_key},
        {"IOT_OTA_GENERATE_KEY", CM_CFG_BOOL, "true", "create a key in IOT_OTA_KEYS_DIR when it holds none (local runs; mount a Secret in production)", 0, 0, &c->generate_key},
        {"IOT_OTA_MAX_ARTIFACT_SIZE", CM_CFG_INT, "1073741824", "largest artifact accepted, in bytes (UploadArtifact answers RESOURCE_EXHAUSTED beyond)", 1, 1024 * 1024 * OTA__MIB, &c->max_artifact_bytes},
        {"IOT_OTA_MAX_UPLOADS", CM_CFG_INT, "4", "uploads in progress at once (more answer RESOURCE_EXHAUSTED); each holds a Postgres connection", 1, 256, &c->max_uploads},
        {"IOT_OTA_CACHE_SIZE", CM_CFG_INT, "67108864", "bytes of artifact chunks kept in memory for downloads, shared by all (0: read every chunk from Postgres)", 0, 64 * 1024 * OTA__MIB, &c->cache_bytes},
        {"IOT_OTA_CHUNK_SIZE", CM_CFG_INT, "262144", "bytes per stored chunk and per download message", 4096, OTA__MIB, &c->chunk_bytes},
        {"IOT_OTA_DM_TIMEOUT", CM_CFG_DURATION, "5s", "deadline of each call to device-mgmt and processing", 50, 60000, &c->dm_timeout_ms},
        {"IOT_OTA_CONTROLLER_INTERVAL", CM_CFG_DURATION, "1s", "how often running rollouts are advanced, paused or completed (also woken by status reports)", 10, 60000, &c->controller_ms},
    };
    memcpy(out, vars, sizeof vars);
}

int ota_config_check(const ota_config_t *c, const char *prog) {
    size_t n = strlen(c->pg_schema);
    if (n == 0 || n > 63) {
        fprintf(stderr, "%s: IOT_OTA_PG_SCHEMA must be 1-63 characters\n", prog);
        return CM_ECONFIG;
    }
    if (!*c->keys_dir) {
        fprintf(stderr, "%s: IOT_OTA_KEYS_DIR is required\n", prog);
        return CM_ECONFIG;
    }
    if (c->pg_pool < c->max_uploads + 2) {
        fprintf(stderr, "%s: IOT_OTA_PG_POOL must exceed IOT_OTA_MAX_UPLOADS by at least 2 (uploads hold connections)\n", prog);
        return CM_ECONFIG;
    }
    return 0;
}
