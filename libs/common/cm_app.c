/* Shared service lifecycle: configuration, logging, gRPC server, admin endpoint, signals. */
#include "cm_app.h"
#include "cm_err.h"
#include "cm_log.h"
#include "cm_metrics.h"

#include <stdio.h>
#include <string.h>

int cm_app_init(cm_app_t *app, const char *name, const cm_config_var_t *vars, size_t n_vars, int argc, char **argv,
                const char *summary, const char *def_listen, const char *def_admin) {
    memset(app, 0, sizeof *app);
    app->name = name;
    /* Before any thread exists, so every thread (grpc's included) inherits the mask. */
    cm_signals_block();
    cm_config_var_t all[CM_APP_MAX_VARS];
    size_t n = 0;
    cm_server_config_vars(&app->cfg, def_listen, def_admin, all);
    n = CM_SERVER_CONFIG_NVARS;
    for (size_t i = 0; i < n_vars && n < CM_APP_MAX_VARS; i++) all[n++] = vars[i];
    int rc = cm_config_load(all, n, argc, argv, summary);
    if (rc) return rc;
    int level = cm_log_level_parse(app->cfg.log_level);
    if (level < 0) {
        fprintf(stderr, "%s: IOT_LOG_LEVEL=\"%s\" is not one of debug, info, warn, error, off\n", argv[0],
                app->cfg.log_level);
        return CM_ECONFIG;
    }
    if (!*app->cfg.tls_cert != !*app->cfg.tls_key) {
        fprintf(stderr, "%s: IOT_TLS_CERT and IOT_TLS_KEY must be set together\n", argv[0]);
        return CM_ECONFIG;
    }
    if (app->cfg.tls_require_client_cert && !*app->cfg.tls_ca) {
        fprintf(stderr, "%s: IOT_TLS_REQUIRE_CLIENT_CERT needs IOT_TLS_CLIENT_CA\n", argv[0]);
        return CM_ECONFIG;
    }
    cm_log_init(name, (cm_log_level_t)level);
    return 0;
}

#define CM__READY_EVERY_MS 1000

/* gRPC health follows the readiness check. */
static int64_t cm__app_ready(void *arg) {
    cm_app_t *app = arg;
    char why[256] = "";
    int ok = app->ready(app->ready_arg, why, sizeof why) ? 1 : 0;
    if (ok != app->serving) {
        int st = ok ? CM_HEALTH_SERVING : CM_HEALTH_NOT_SERVING;
        cm_server_set_health(app->srv, "", st);
        for (size_t i = 0; i < app->n_svcs; i++) cm_server_set_health(app->srv, app->svc_names[i], st);
        cm_log_kv(ok ? CM_LOG_INFO : CM_LOG_WARN, ok ? "ready again: gRPC health SERVING" : "not ready: gRPC health NOT_SERVING",
                  "why", why, NULL);
        app->serving = ok;
    }
    return CM__READY_EVERY_MS;
}

int cm_app_start(cm_app_t *app, const cm_service_t *const *svcs, size_t n) {
    cm_tls_files_t tls = {app->cfg.tls_cert, app->cfg.tls_key, *app->cfg.tls_ca ? app->cfg.tls_ca : NULL,
                          app->cfg.tls_require_client_cert};
    cm_server_opts_t o = {
        .name = app->name,
        .listen = app->cfg.listen,
        .threads = (int)app->cfg.threads,
        .max_recv_bytes = (int)app->cfg.max_recv_bytes,
        .grace_ms = (int)app->cfg.grace_ms,
        .tls = *app->cfg.tls_cert ? &tls : NULL,
    };
    int err;
    app->srv = cm_server_new(&o, &err);
    if (!app->srv) return err;
    for (size_t i = 0; i < n; i++)
        if ((err = cm_server_add_service(app->srv, svcs[i]))) return err;
    if (app->on_shutdown) cm_server_on_shutdown(app->srv, app->on_shutdown, app->on_shutdown_arg);
    if ((err = cm_server_start(app->srv))) return err;
    cm_metrics_add_server(app->srv);
    cm_server_set_health(app->srv, CM_APP_LIVENESS, CM_HEALTH_SERVING);
    if (app->ready) {
        app->serving = 1; /* what cm_server_start set */
        for (size_t i = 0; i < n && app->n_svcs < sizeof app->svc_names / sizeof app->svc_names[0]; i++)
            app->svc_names[app->n_svcs++] = svcs[i]->desc->name;
        app->ready_loop = cm_loop_start(cm__app_ready, app, 0);
    }
    app->admin = cm_admin_start(app->cfg.admin_listen, app->ready, app->ready_arg, &err);
    if (!app->admin) return err;
    if (*app->cfg.registry_addr) {
        cm_selfreg_opts_t ro = {
            .registry = app->cfg.registry_addr,
            .service = app->name,
            .health_name = "",
            .instance_id = app->cfg.instance_id,
            .address = app->cfg.advertise_addr,
            .port = cm_server_port(app->srv),
            .zone = app->cfg.zone,
            .cluster = app->cfg.cluster,
        };
        app->selfreg = cm_selfreg_start(&ro);
    }
    printf("%s grpc=%d admin=%d\n", app->name, cm_server_port(app->srv), cm_admin_port(app->admin));
    fflush(stdout);
    return 0;
}

void cm_app_wait(cm_app_t *app) {
    int sig = cm_wait_for_signal();
    cm_log_kv(CM_LOG_INFO, "signal received, draining", "signal", sig == 15 ? "SIGTERM" : "SIGINT", "service",
              app->name, NULL);
}

void cm_app_stop(cm_app_t *app) {
    /* Before the drain: shutdown's NOT_SERVING must not be turned back. */
    cm_loop_stop(app->ready_loop);
    app->ready_loop = NULL;
    cm_selfreg_stop(app->selfreg);
    app->selfreg = NULL;
    if (app->srv) {
        cm_server_shutdown(app->srv);
        cm_metrics_remove_server(app->srv);
    }
    cm_admin_stop(app->admin);
    app->admin = NULL;
    cm_server_free(app->srv);
    app->srv = NULL;
}
