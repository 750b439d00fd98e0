/* ingest's own configuration (the shared gRPC/admin/log variables come from cm_app). */
#ifndef ING_CONFIG_H
#define ING_CONFIG_H

#include "cm_config.h"

typedef struct ing_config_s {
    const char *pg_dsn;
    const char *pg_schema;
    const char *migrations;
    const char *redis_addr;
    int64_t redis_timeout_ms;
    const char *stream_prefix;
    int64_t shards;
    int64_t stream_maxlen;
    const char *dm_addr;
    int64_t auth_cache_ms;
    int64_t committers;
    int64_t flush_ms;
    int64_t flush_points;
    int64_t max_pending;
    int64_t rate_limit;
    int64_t max_past_ms;
    int64_t max_future_ms;
    int64_t retention_ms;
    int64_t partition_ms;
    int64_t maintenance_ms;
    int64_t presence_ms;
    int64_t query_pool;
    int64_t republish_ms;
    int64_t max_watchers;
} ing_config_t;

#define ING_CONFIG_NVARS 24
void ing_config_vars(ing_config_t *c, cm_config_var_t *out);
/* Checks what the types cannot express; prints the problem and returns CM_ECONFIG, or 0. */
int ing_config_check(const ing_config_t *c, const char *prog);

#endif
