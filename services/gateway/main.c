/* gateway: the REST/JSON API and the dashboard in front of the gRPC services. Lifecycle only:
 * config -> Postgres (migrations, API keys) -> backend channels -> HTTP -> wait for a signal ->
 * stop HTTP (ends live streams) -> free. Its gRPC port serves health and reflection only. */
#include <stdio.h>

#include "cm_app.h"
#include "cm_err.h"
#include "cm_log.h"
#include "gw.h"
#include "gw_openapi.h"

static int gw__ready(void *pg, char *why, size_t len) { return cm_pg_check(pg, 1000, why, len); }

int main(int argc, char **argv) {
    gw_config_t cfg;
    cm_config_var_t vars[GW_CONFIG_NVARS];
    gw_config_vars(&cfg, vars);
    cm_app_t app;
    int rc = cm_app_init(&app, "gateway", vars, GW_CONFIG_NVARS, argc, argv,
                         "REST/JSON API (/api/v1/...) for dashboards and programs, in front of device-mgmt, ingest,\n"
                         "processing, ota and registry, with API keys (admin / operator / viewer) kept hashed in Postgres.",
                         "0.0.0.0:7006", "0.0.0.0:9106");
    if (rc) return rc > 0 ? 0 : 2;
    if (gw_config_check(&cfg, argv[0])) return 2;
    char why[512];
    if (gw_routes_check(why, sizeof why)) {
        cm_log_kv(CM_LOG_ERROR, "route table does not match the protos", "why", why, NULL);
        return 1;
    }

    gw_t gw = {.cfg = &cfg};
    int err = 0;
    gw.pg = cm_pg_new(cfg.pg_dsn, cfg.pg_schema, (int)cfg.pg_pool, &err);
    if (!gw.pg) {
        cm_log_kv(CM_LOG_ERROR, "cannot set up the Postgres pool", "dsn", cfg.pg_dsn, NULL);
        return 2;
    }
    int applied = 0;
    if (cm_pg_migrate(gw.pg, cfg.migrations, &applied)) {
        cm_pg_free(gw.pg);
        return 1;
    }
    gw.keys = gw_keys_new(gw.pg, cfg.key_cache_ms);
    char created[128];
    rc = gw_keys_bootstrap(gw.keys, cfg.bootstrap_key, created, sizeof created);
    if (rc) {
        cm_log_kv(CM_LOG_ERROR, rc == CM_EINVAL ? "IOT_GW_BOOTSTRAP_KEY is not a key (iotk_<12 hex>_<64 hex>)" : "cannot set up API keys",
                  NULL);
        gw_keys_free(gw.keys);
        cm_pg_free(gw.pg);
        return rc == CM_EINVAL ? 2 : 1;
    }
    if (created[0]) { /* printed once, never logged: the only copy is what the operator saves now */
        printf("gateway bootstrap admin API key (shown once, keep it): %s\n", created);
        fflush(stdout);
    }
    for (int i = 0; i < GW_NBACKENDS; i++) {
        cm_channel_opts_t co = {.max_recv_bytes = 64 * 1024 * 1024};
        gw.ch[i] = cm_channel_new(cfg.backend[i], &co, &err);
        if (!gw.ch[i]) {
            cm_log_kv(CM_LOG_ERROR, "backend address is not a usable gRPC target", "service", gw_backend_name(i), "addr",
                      cfg.backend[i], NULL);
            return 2;
        }
    }
    app.ready = gw__ready;
    app.ready_arg = gw.pg;
    if (gw_http_start(&gw) == 0) {
        printf("gateway http=%d\n", cm_http_port(gw.http));
        fflush(stdout);
        if (cm_app_start(&app, NULL, 0) == 0) {
            cm_app_wait(&app);
            rc = 0;
        } else {
            rc = 1;
        }
        gw_http_stop(&gw); /* first: in-flight REST calls finish against live backends */
    } else {
        rc = 1;
    }
    cm_app_stop(&app);
    for (int i = 0; i < GW_NBACKENDS; i++) cm_channel_free(gw.ch[i]);
    gw_keys_free(gw.keys);
    gw_openapi_free();
    cm_pg_free(gw.pg);
    return rc;
}
