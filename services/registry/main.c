/* registry: service registration with leases and discovery (iot.registry.v1). Lifecycle only:
 * config -> store -> start -> wait for a signal -> stop -> free. */
#include "cm_app.h"
#include "cm_log.h"
#include "reg_config.h"
#include "reg_checker.h"
#include "reg_handlers.h"
#include "reg_store.h"
#include "reg_sweeper.h"

int main(int argc, char **argv) {
    reg_config_t cfg;
    cm_config_var_t vars[REG_CONFIG_NVARS];
    reg_config_vars(&cfg, vars);
    cm_app_t app;
    int rc = cm_app_init(&app, "registry", vars, REG_CONFIG_NVARS, argc, argv,
                         "iot.registry.v1.Registry: instances register with a lease, heartbeat, and are discovered.\n"
                         "State lives in Redis; several replicas can share one Redis.",
                         "0.0.0.0:7001", "0.0.0.0:9101");
    if (rc) return rc > 0 ? 0 : 2;
    if (reg_config_check(&cfg, argv[0])) return 2;

    reg_store_t store;
    /* One connection per worker thread and per probe thread, plus sweeper, scheduler, readiness. */
    int conns = (int)app.cfg.threads + (int)cfg.check_concurrency + 3;
    if (reg_store_open(&store, cfg.redis_addr, cfg.prefix, conns, (int)cfg.redis_timeout_ms)) {
        cm_log_kv(CM_LOG_ERROR, "IOT_REDIS_ADDR is not host:port or unix:/path", "value", cfg.redis_addr, NULL);
        return 2;
    }
    reg_ctx_t ctx = {&store, reg_watch_hub_start(&store, cfg.redis_addr, (int)cfg.redis_timeout_ms)};
    cm_service_t svc;
    reg_service_init(&svc, &ctx);
    app.on_shutdown = reg_watch_hub_end_all;
    app.on_shutdown_arg = ctx.hub;
    const cm_service_t *svcs[] = {&svc};
    app.ready = reg_store_ready;
    app.ready_arg = &store;
    reg_sweeper_t *sweeper = reg_sweeper_start(&store, cfg.sweep_ms);
    reg_checker_t *checker = reg_checker_start(&store, (int)cfg.check_concurrency);
    if (cm_app_start(&app, svcs, 1) == 0) {
        cm_app_wait(&app);
        rc = 0;
    } else {
        rc = 1;
    }
    cm_app_stop(&app);
    reg_checker_stop(checker);
    reg_sweeper_stop(sweeper);
    reg_watch_hub_stop(ctx.hub);
    reg_store_close(&store);
    return rc;
}
