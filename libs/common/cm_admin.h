/* The admin HTTP endpoint every service runs next to its gRPC port (libmicrohttpd):
 *   GET /metrics  Prometheus text exposition (cm_metrics_render)
 *   GET /healthz  200 while the process serves (liveness)
 *   GET /readyz   200 when the readiness callback says so, else 503 with its reason
 * Runs its own single thread; handlers never block on service work. */
#ifndef CM_ADMIN_H
#define CM_ADMIN_H

#include <stddef.h>

typedef struct cm_admin_s cm_admin_t;

/* Returns 1 when ready; else 0 with a reason written to why[0..len). Called from the admin thread. */
typedef int (*cm_ready_fn)(void *arg, char *why, size_t len);

/* listen: "127.0.0.1:9090", "0.0.0.0:0" (free port), "[::1]:9090". NULL + *err on failure. */
cm_admin_t *cm_admin_start(const char *listen, cm_ready_fn ready, void *arg, int *err);
int cm_admin_port(const cm_admin_t *a);
/* Stops the thread and frees. Accepts NULL. */
void cm_admin_stop(cm_admin_t *a);

/* Splits "host:port" / "[v6]:port" into a sockaddr; 0 or CM_EINVAL. Shared with other listeners. */
struct sockaddr_storage;
int cm_parse_hostport(const char *s, struct sockaddr_storage *out, unsigned *len);

#endif
