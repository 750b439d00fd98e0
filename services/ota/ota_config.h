/* ota's own configuration (the shared gRPC/admin/log variables come from cm_app). */
#ifndef OTA_CONFIG_H
#define OTA_CONFIG_H

#include "cm_config.h"

typedef struct ota_config_s {
    const char *pg_dsn;
    const char *pg_schema;
    const char *migrations;
    int64_t pg_pool;
    const char *dm_addr;
    const char *proc_addr;
    const char *keys_dir;
    const char *signing_key;
    int generate_key;
    int64_t max_artifact_bytes;
    int64_t max_uploads;
    int64_t chunk_bytes;
    int64_t cache_bytes;
    int64_t dm_timeout_ms;
    int64_t controller_ms;
} ota_config_t;

#define OTA_CONFIG_NVARS 15
void ota_config_vars(ota_config_t *c, cm_config_var_t *out);
/* Checks what the types cannot express; prints the problem and returns CM_ECONFIG, or 0. */
int ota_config_check(const ota_config_t *c, const char *prog);

#endif
