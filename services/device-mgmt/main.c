/* device-mgmt: devices, groups, credentials, presence, shadows and commands (iot.device.v1).
 * Lifecycle only: config -> store -> start -> wait for a signal -> stop -> free. */
#include "cm_app.h"
#include "cm_log.h"
#include "dm_commands.h"
#include "dm_config.h"
#include "dm_handlers.h"
#include "dm_store.h"

int main(int argc, char **argv) {
    dm_config_t cfg;
    cm_config_var_t vars[DM_CONFIG_NVARS];
    dm_config_vars(&cfg, vars);
    cm_app_t app;
    int rc = cm_app_init(&app, "device-mgmt", vars, DM_CONFIG_NVARS, argc, argv,
                         "iot.device.v1.DeviceManager: devices, groups, tokens and certificates, presence, shadows, commands.\n"
                         "State lives in Postgres (schema IOT_DM_PG_SCHEMA) with a Redis cache; replicas share both.",
                         "0.0.0.0:7002", "0.0.0.0:9102");
    if (rc) return rc > 0 ? 0 : 2;
    if (dm_config_check(&cfg, argv[0])) return 2;

    dm_store_t store;
    /* One Redis connection per worker thread plus the background loops. */
    if (dm_store_open(&store, &cfg, (int)cfg.pg_pool, (int)app.cfg.threads + 4)) {
        cm_log_kv(CM_LOG_ERROR, "IOT_REDIS_ADDR is not host:port or unix:/path", "value", cfg.redis_addr, NULL);
        return 2;
    }
    if (dm_store_start(&store)) {
        dm_store_close(&store);
        return 1;
    }
    dm_ctx_t ctx = {&store, dm_cmd_hub_start(&store)};
    cm_service_t svc;
    dm_service_init(&svc, &ctx);
    const cm_service_t *svcs[] = {&svc};
    app.ready = dm_store_ready;
    app.ready_arg = &store;
    app.on_shutdown = dm_cmd_hub_end_all;
    app.on_shutdown_arg = ctx.hub;
    if (cm_app_start(&app, svcs, 1) == 0) {
        cm_app_wait(&app);
        rc = 0;
    } else {
        rc = 1;
    }
    cm_app_stop(&app);
    dm_cmd_hub_stop(ctx.hub);
    dm_store_close(&store);
    return rc;
}
