/* ota: signed firmware artifacts, staged rollouts and the device side of updates (iot.ota.v1).
 * Lifecycle only: config -> Postgres (migrations) -> signing keys -> rollout controller -> serve ->
 * wait for a signal -> drain -> stop the controller -> free. */
#include <stdio.h>

#include "cm_app.h"
#include "cm_log.h"
#include "cm_pg.h"
#include "ota_config.h"
#include "ota_handlers.h"
#include "ota_keys.h"
#include "ota_rollouts.h"

static int ota__ready(void *pg, char *why, size_t len) { return cm_pg_check(pg, 1000, why, len); }

int main(int argc, char **argv) {
    ota_config_t cfg;
    cm_config_var_t vars[OTA_CONFIG_NVARS];
    ota_config_vars(&cfg, vars);
    cm_app_t app;
    int rc = cm_app_init(&app, "ota", vars, OTA_CONFIG_NVARS, argc, argv,
                         "iot.ota.v1.Ota: firmware artifacts (streamed uploads, sha256, Ed25519-signed manifests, keys that\n"
                         "rotate), staged rollouts gated on success, errors and telemetry, and the device side\n"
                         "(update checks, resumable downloads streamed from Postgres, status reports).",
                         "0.0.0.0:7005", "0.0.0.0:9105");
    if (rc) return rc > 0 ? 0 : 2;
    if (ota_config_check(&cfg, argv[0])) return 2;

    int err = 0;
    cm_pg_t *pg = cm_pg_new(cfg.pg_dsn, cfg.pg_schema, (int)cfg.pg_pool, &err);
    if (!pg) {
        cm_log_kv(CM_LOG_ERROR, "cannot set up the Postgres pool", "dsn", cfg.pg_dsn, NULL);
        return 2;
    }
    int applied = 0;
    if (cm_pg_migrate(pg, cfg.migrations, &applied)) {
        cm_pg_free(pg);
        return 1;
    }
    char why[512];
    ota_keys_t *keys = ota_keys_load(&cfg, why, sizeof why);
    if (!keys) {
        cm_log_kv(CM_LOG_ERROR, "no signing key", "why", why, NULL);
        cm_pg_free(pg);
        return 2;
    }
    if (ota_keys_register(keys, pg)) {
        ota_keys_free(keys);
        cm_pg_free(pg);
        return 1;
    }
    cm_log_kv(CM_LOG_INFO, "signing key", "key_id", ota_keys_active(keys), NULL);
    ota_ctx_t ctx;
    if (ota_ctx_init(&ctx, &cfg, pg, keys)) {
        cm_log_kv(CM_LOG_ERROR, "IOT_OTA_DM_ADDR or IOT_OTA_PROC_ADDR is not a usable gRPC target", "dm", cfg.dm_addr, "proc",
                  cfg.proc_addr, NULL);
        ota_keys_free(keys);
        cm_pg_free(pg);
        return 2;
    }
    cm_service_t svc;
    ota_service_init(&svc, &ctx);
    const cm_service_t *svcs[] = {&svc};
    app.ready = ota__ready;
    app.ready_arg = pg;
    ctx.ctl = ota_ctl_start(&ctx);
    if (cm_app_start(&app, svcs, 1) == 0) {
        cm_app_wait(&app);
        rc = 0;
    } else {
        rc = 1;
    }
    cm_app_stop(&app);
    /* After the server: no handler can kick the controller any more. */
    ota_ctl_stop(ctx.ctl);
    ctx.ctl = NULL;
    ota_ctx_destroy(&ctx);
    ota_keys_free(keys);
    cm_pg_free(pg);
    return rc;
}
