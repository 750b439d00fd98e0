/* ingest: durable, de-duplicated telemetry intake and queries (iot.ingest.v1).
 * Lifecycle only: config -> stores -> committers -> start -> wait for a signal -> drain -> free. */
#include "cm_app.h"
#include "cm_log.h"
#include "ing_commit.h"
#include "ing_config.h"
#include "ing_devices.h"
#include "ing_handlers.h"
#include "ing_store.h"

int main(int argc, char **argv) {
    ing_config_t cfg;
    cm_config_var_t vars[ING_CONFIG_NVARS];
    ing_config_vars(&cfg, vars);
    cm_app_t app;
    int rc = cm_app_init(&app, "ingest", vars, ING_CONFIG_NVARS, argc, argv,
                         "iot.ingest.v1.Ingest: device telemetry in (unary batches and bidi streams, acknowledged after the\n"
                         "Postgres commit, de-duplicated by per-device seq), published to sharded Redis streams; queries.",
                         "0.0.0.0:7003", "0.0.0.0:9103");
    if (rc) return rc > 0 ? 0 : 2;
    if (ing_config_check(&cfg, argv[0])) return 2;

    ing_store_t store;
    if (ing_store_open(&store, &cfg)) {
        cm_log_kv(CM_LOG_ERROR, "cannot set up the Postgres pool", "dsn", cfg.pg_dsn, NULL);
        return 2;
    }
    if (ing_store_start(&store)) {
        ing_store_close(&store);
        return 1;
    }
    ing_devices_t *devices = ing_devices_new(&cfg);
    if (!devices) {
        cm_log_kv(CM_LOG_ERROR, "IOT_INGEST_DM_ADDR is not a usable gRPC target", "value", cfg.dm_addr, NULL);
        ing_store_close(&store);
        return 2;
    }
    ing_ctx_t ctx = {.cfg = &cfg, .store = &store, .devices = devices};
    ctx.lim.max_past_ms = cfg.max_past_ms;
    ctx.lim.max_future_ms = cfg.max_future_ms;
    /* Half the gRPC grace period for queued batches to commit and be acknowledged; the other half
     * is left for the calls to end. */
    ctx.drain_ms = app.cfg.grace_ms / 2;
    ctx.commit = ing_committers_start(&cfg, &store, devices);
    if (!ctx.commit) {
        cm_log_kv(CM_LOG_ERROR, "IOT_REDIS_ADDR is not host:port or unix:/path", "value", cfg.redis_addr, NULL);
        ing_devices_free(devices);
        ing_store_close(&store);
        return 2;
    }
    ctx.watch = ing_watch_new(&cfg);
    if (!ctx.watch) {
        cm_log_kv(CM_LOG_ERROR, "IOT_REDIS_ADDR is not host:port or unix:/path", "value", cfg.redis_addr, NULL);
        ing_committers_stop(ctx.commit);
        ing_devices_free(devices);
        ing_store_close(&store);
        return 2;
    }
    cm_service_t svc;
    ing_service_init(&svc, &ctx);
    const cm_service_t *svcs[] = {&svc};
    app.ready = ing_store_ready;
    app.ready_arg = &store;
    app.on_shutdown = ing_ctx_shutdown;
    app.on_shutdown_arg = &ctx;
    if (cm_app_start(&app, svcs, 1) == 0) {
        cm_app_wait(&app);
        rc = 0;
    } else {
        rc = 1;
    }
    cm_app_stop(&app);
    ing_watch_free(ctx.watch);
    ing_committers_stop(ctx.commit);
    ing_ctx_destroy(&ctx);
    ing_devices_free(devices);
    ing_store_close(&store);
    return rc;
}
