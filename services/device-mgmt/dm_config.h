/* device-mgmt's own configuration (the shared gRPC/admin/log variables come from cm_app). */
#ifndef DM_CONFIG_H
#define DM_CONFIG_H

#include "cm_config.h"

typedef struct dm_config_s {
    const char *pg_dsn;
    const char *pg_schema;
    int64_t pg_pool;
    const char *migrations;
    const char *redis_addr;
    const char *redis_prefix;
    int64_t redis_timeout_ms;
    int64_t cache_ttl_ms;
    int64_t offline_after_ms;
    int64_t presence_interval_ms;
    int64_t events_maxlen;
    int64_t command_poll_ms;
    const char *ca_cert_file;
    const char *ca_key_file;
} dm_config_t;

#define DM_CONFIG_NVARS 14
void dm_config_vars(dm_config_t *c, cm_config_var_t *out);
/* Checks what the types cannot express; prints the problem and returns CM_ECONFIG, or 0. */
int dm_config_check(const dm_config_t *c, const char *prog);

#endif
