/* The lifecycle every service binary shares, so that main.c reads: config -> start -> wait for a
 * signal -> stop -> free.
 *
 *   cm_app_t app;
 *   int rc = cm_app_init(&app, "registry", vars, n, argc, argv, "what it does", "0.0.0.0:7001", "0.0.0.0:9101");
 *   if (rc) return rc > 0 ? 0 : 2;
 *   ... open stores ...
 *   if (cm_app_start(&app, services, n_services)) return 1;
 *   cm_app_wait(&app);   // SIGTERM/SIGINT
 *   cm_app_stop(&app);   // drain gRPC, stop admin
 */
#ifndef CM_APP_H
#define CM_APP_H

#include "cm_admin.h"
#include "cm_config.h"
#include "cm_discovery.h"
#include "cm_loop.h"
#include "cm_rpc.h"

#define CM_APP_MAX_VARS 64
/* The gRPC health service name that answers SERVING for as long as the process serves (until
 * shutdown), whatever the readiness check says: for liveness probes, which must not restart a pod
 * because its database is away. "" and the services' own names follow readiness. */
#define CM_APP_LIVENESS "liveness"

typedef struct cm_app_s {
    const char *name;
    cm_server_config_t cfg;
    cm_server_t *srv;
    cm_admin_t *admin;
    cm_selfreg_t *selfreg; /* when IOT_REGISTRY_ADDR is set */
    /* Optional readiness check, set before cm_app_start: /readyz answers with it, and gRPC health
     * follows it (checked every second: NOT_SERVING while not ready, for the whole server and each
     * service), so gRPC readiness probes, the registry's checks and clients all see the same. */
    cm_ready_fn ready;
    void *ready_arg;
    cm_loop_t *ready_loop;
    int serving;
    const char *svc_names[8];
    size_t n_svcs;
    void (*on_shutdown)(void *arg); /* optional: see cm_server_on_shutdown; set before cm_app_start */
    void *on_shutdown_arg;
} cm_app_t;

/* Blocks signals, parses the shared and the service's variables, sets up logging.
 * Returns 0 to continue, 1 after --help (exit 0), CM_ECONFIG after printing why (exit 2). */
int cm_app_init(cm_app_t *app, const char *name, const cm_config_var_t *vars, size_t n_vars, int argc, char **argv,
                const char *summary, const char *def_listen, const char *def_admin);
/* Creates and starts the gRPC server with the services, and the admin endpoint; registers with
 * the registry when IOT_REGISTRY_ADDR is set. Prints one line to stdout,
 * "<name> grpc=<port> admin=<port>", for scripts and tests that asked for port 0. */
int cm_app_start(cm_app_t *app, const cm_service_t *const *svcs, size_t n);
/* Waits for SIGTERM or SIGINT. */
void cm_app_wait(cm_app_t *app);
/* Deregisters first (clients stop picking us), then drains, then releases everything. */
void cm_app_stop(cm_app_t *app);

#endif
