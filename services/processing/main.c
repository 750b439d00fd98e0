/* processing: rules, windows, anomaly detection and alerts over the telemetry streams
 * (iot.processing.v1). Lifecycle only: config -> store -> rules -> actions -> consumer -> serve ->
 * wait for a signal -> drain -> stop consumer (checkpoint, hand shards over) -> free. */
#include "cm_app.h"
#include "cm_log.h"
#include "cm_metrics.h"
#include "proc_actions.h"
#include "proc_api.h"
#include "proc_config.h"
#include "proc_engine.h"
#include "proc_rules.h"
#include "proc_store.h"

typedef struct proc__ready_s {
    proc_store_t *store;
    proc_engine_t *engine;
} proc__ready_t;

static int proc__ready(void *arg, char *why, size_t len) {
    proc__ready_t *r = arg;
    return proc_store_ready(r->store, why, len) && proc_engine_ready(r->engine, why, len);
}

int main(int argc, char **argv) {
    proc_config_t cfg;
    cm_config_var_t vars[PROC_CONFIG_NVARS];
    proc_config_vars(&cfg, vars);
    cm_app_t app;
    int rc = cm_app_init(&app, "processing", vars, PROC_CONFIG_NVARS, argc, argv,
                         "iot.processing.v1.Processing: rules over the telemetry streams (windows, thresholds, z-score,\n"
                         "stuck/rate/absence detectors), alerts with command and webhook actions, rollups.",
                         "0.0.0.0:7004", "0.0.0.0:9104");
    if (rc) return rc > 0 ? 0 : 2;
    if (proc_config_check(&cfg, app.cfg.instance_id, argv[0])) return 2;

    proc_store_t store;
    if (proc_store_open(&store, &cfg)) {
        cm_log_kv(CM_LOG_ERROR, "cannot set up the Postgres pool", "dsn", cfg.pg_dsn, NULL);
        return 2;
    }
    if (proc_store_start(&store)) {
        proc_store_close(&store);
        return 1;
    }
    proc_rules_t *rules = proc_rules_start(&cfg, store.pg);
    proc_actions_t *actions = rules ? proc_actions_start(&cfg, store.pg) : NULL;
    if (!rules || !actions) {
        cm_log_kv(CM_LOG_ERROR, "IOT_PROC_DM_ADDR is not a usable gRPC target", "value", cfg.dm_addr, NULL);
        proc_rules_stop(rules);
        proc_store_close(&store);
        return 2;
    }
    cm_metrics_add_collector(proc_rules_metrics, rules);
    int err = 0;
    cm_redis_pool_t *redis = cm_redis_pool_new(cfg.redis_addr, (int)app.cfg.threads, (int)cfg.redis_timeout_ms, &err);
    proc_api_t *api = redis ? proc_api_new(&cfg, store.pg, redis, rules) : NULL;
    /* The engine tells the API when it committed alert changes, so this replica's watchers see
     * them at once rather than at the next poll. */
    proc_engine_t *engine = api ? proc_engine_start(&cfg, rules, actions, proc_api_alerts_changed, api) : NULL;
    if (!engine) {
        cm_log_kv(CM_LOG_ERROR, "IOT_REDIS_ADDR is not host:port or unix:/path", "value", cfg.redis_addr, NULL);
        proc_api_free(api);
        cm_redis_pool_free(redis);
        cm_metrics_remove_collector(proc_rules_metrics, rules);
        proc_actions_stop(actions);
        proc_rules_stop(rules);
        proc_store_close(&store);
        return 2;
    }
    cm_service_t svc;
    proc_api_service(api, &svc);
    const cm_service_t *svcs[] = {&svc};
    proc__ready_t ready = {&store, engine};
    app.ready = proc__ready;
    app.ready_arg = &ready;
    app.on_shutdown = proc_api_shutdown;
    app.on_shutdown_arg = api;
    if (cm_app_start(&app, svcs, 1) == 0) {
        cm_app_wait(&app);
        rc = 0;
    } else {
        rc = 1;
    }
    cm_app_stop(&app);
    proc_engine_stop(engine);
    proc_api_free(api);
    cm_redis_pool_free(redis);
    cm_metrics_remove_collector(proc_rules_metrics, rules);
    proc_actions_stop(actions);
    proc_rules_stop(rules);
    proc_store_close(&store);
    return rc;
}
