/* The gateway's own configuration (the shared gRPC/admin/log variables come from cm_app). */
#ifndef GW_CONFIG_H
#define GW_CONFIG_H

#include "cm_config.h"

/* The backends, in the order of gw_config_t.backend[]. */
enum { GW_DM, GW_INGEST, GW_PROC, GW_OTA, GW_REGISTRY, GW_NBACKENDS };

typedef struct gw_config_s {
    const char *http_listen;
    const char *backend[GW_NBACKENDS];
    int64_t timeout_ms;
    int64_t max_body;
    int64_t max_upload;
    int64_t max_connections;
    const char *pg_dsn, *pg_schema, *migrations;
    int64_t pg_pool;
    const char *bootstrap_key;
    int64_t key_cache_ms;
} gw_config_t;

#define GW_CONFIG_NVARS 16
void gw_config_vars(gw_config_t *c, cm_config_var_t *out);
/* Checks what the types cannot express; prints the problem and returns CM_ECONFIG, or 0. */
int gw_config_check(const gw_config_t *c, const char *prog);
/* The name of backend i ("device-mgmt", ...), for errors and logs. */
const char *gw_backend_name(int i);

#endif
