/* Configuration from environment variables: one table per binary, typed, with defaults that work
 * locally and bounds that are checked at start.
 *
 * The table is also the --help text, so the documented variables and the parsed ones cannot drift.
 * String values point into the environment or at the table's default literal: nothing to free. */
#ifndef CM_CONFIG_H
#define CM_CONFIG_H

#include <stddef.h>
#include <stdint.h>

typedef enum {
    CM_CFG_STRING,   /* const char **dest */
    CM_CFG_INT,      /* int64_t *dest, within [min, max] */
    CM_CFG_BOOL,     /* int *dest: 1/0, true/false, yes/no, on/off */
    CM_CFG_DURATION, /* int64_t *dest in milliseconds: "250ms", "10s", "5m", "1h", bare number = ms */
} cm_cfg_type_t;

typedef struct cm_config_var_s {
    const char *env;
    cm_cfg_type_t type;
    const char *def;   /* default, written as a user would write it; NULL = empty string */
    const char *help;
    int64_t min, max;  /* INT/DURATION bounds; both 0 = unbounded */
    void *dest;
} cm_config_var_t;

/* Parses argv (--help/-h) and the environment into the table's destinations.
 * Returns 0 to run, 1 when help was printed (exit 0), or CM_ECONFIG after printing to stderr one
 * line per bad variable naming the variable, the value and what is allowed (exit 2). */
int cm_config_load(const cm_config_var_t *vars, size_t n, int argc, char **argv, const char *summary);

/* Parses a duration the way CM_CFG_DURATION variables are parsed ("250ms", "2s", "5m", "1h", a bare
 * number is milliseconds) into *ms. Returns 0, or CM_EINVAL for anything else. For command-line
 * tools that take the same durations as the services' environment. */
int cm_config_parse_duration(const char *s, int64_t *ms);

/* Settings every gRPC service shares. */
typedef struct cm_server_config_s {
    const char *listen;
    const char *admin_listen;
    int64_t threads;
    int64_t grace_ms;
    int64_t max_recv_bytes;
    const char *log_level;
    const char *tls_cert, *tls_key, *tls_ca;
    int tls_require_client_cert;
    const char *registry_addr, *advertise_addr, *instance_id, *zone, *cluster;
} cm_server_config_t;

#define CM_SERVER_CONFIG_NVARS 15
/* Writes the shared variables (IOT_GRPC_LISTEN, IOT_ADMIN_LISTEN, ...) into out[0..CM_SERVER_CONFIG_NVARS)
 * with the given default addresses. */
void cm_server_config_vars(cm_server_config_t *c, const char *def_listen, const char *def_admin, cm_config_var_t *out);

#endif
