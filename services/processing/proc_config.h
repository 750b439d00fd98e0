/* processing's own configuration (the shared gRPC/admin/log variables come from cm_app). */
#ifndef PROC_CONFIG_H
#define PROC_CONFIG_H

#include "cm_config.h"

typedef struct proc_config_s {
    const char *pg_dsn;
    const char *pg_schema;
    const char *migrations;
    int64_t pg_pool;
    const char *redis_addr;
    int64_t redis_timeout_ms;
    const char *redis_prefix;
    const char *stream_prefix;
    int64_t shards;
    const char *group;
    const char *dm_addr;
    int64_t read_count;
    int64_t flush_ms;
    int64_t checkpoint_ms;
    int64_t lease_ms;
    int64_t rules_poll_ms;
    int64_t selector_refresh_ms;
    int64_t stats_ms;
    int64_t watch_poll_ms;
    int64_t action_poll_ms;
    int64_t action_backoff_ms;
    int64_t max_rules;
    int64_t rollup_1m_retention_ms;
    int64_t rollup_1h_retention_ms;
    int64_t event_retention_ms;
    int64_t maintenance_ms;
    /* Filled by proc_config_check: this replica's consumer name (IOT_INSTANCE_ID or host-pid). */
    char member[128];
} proc_config_t;

#define PROC_CONFIG_NVARS 26
void proc_config_vars(proc_config_t *c, cm_config_var_t *out);
/* Checks what the types cannot express and names this replica (instance_id may be NULL or "");
 * prints the problem and returns CM_ECONFIG, or 0. */
int proc_config_check(proc_config_t *c, const char *instance_id, const char *prog);

#endif
