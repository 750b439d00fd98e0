/* Environment-variable configuration with typed parsing, bounds and generated --help. */
#include "cm_config.h"
#include "cm_err.h"
#include "cm_log.h"

#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

static int cm__parse_int(const char *s, int64_t *out) {
    char *end;
    errno = 0;
    long long v = strtoll(s, &end, 10);
    if (errno || end == s || *end) return -1;
    *out = v;
    return 0;
}

static int cm__parse_bool(const char *s, int *out) {
    static const char *const t[] = {"1", "true", "yes", "on"}, *const f[] = {"0", "false", "no", "off"};
    for (int i = 0; i < 4; i++) {
        if (strcasecmp(s, t[i]) == 0) return *out = 1, 0;
        if (strcasecmp(s, f[i]) == 0) return *out = 0, 0;
    }
    return -1;
}

static int cm__parse_duration(const char *s, int64_t *out) {
    char *end;
    errno = 0;
    double v = strtod(s, &end);
    if (errno || end == s || !(v >= 0) || v > 1e15) return -1; /* also NaN, inf and overflow */
    double mult;
    if (!*end || strcmp(end, "ms") == 0) mult = 1;
    else if (strcmp(end, "s") == 0) mult = 1000;
    else if (strcmp(end, "m") == 0) mult = 60000;
    else if (strcmp(end, "h") == 0) mult = 3600000;
    else return -1;
    *out = (int64_t)(v * mult + 0.5);
    return 0;
}

int cm_config_parse_duration(const char *s, int64_t *ms) {
    return s && cm__parse_duration(s, ms) == 0 ? 0 : CM_EINVAL;
}

static const char *cm__type_name(cm_cfg_type_t t) {
    switch (t) {
    case CM_CFG_INT: return "integer";
    case CM_CFG_BOOL: return "boolean";
    case CM_CFG_DURATION: return "duration";
    default: return "string";
    }
}

static void cm__print_help(const cm_config_var_t *vars, size_t n, const char *prog, const char *summary) {
    printf("Usage: %s [--help]\n\n%s\n\nConfiguration (environment variables):\n", prog, summary);
    for (size_t i = 0; i < n; i++) {
        const cm_config_var_t *v = &vars[i];
        printf("  %-28s %s (%s", v->env, v->help, cm__type_name(v->type));
        if ((v->type == CM_CFG_INT || v->type == CM_CFG_DURATION) && (v->min || v->max)) {
            if (v->type == CM_CFG_INT)
                printf(", %" PRId64 "..%" PRId64, v->min, v->max);
            else
                printf(", %" PRId64 "ms..%" PRId64 "ms", v->min, v->max);
        }
        printf(", default \"%s\")\n", v->def ? v->def : "");
    }
}

int cm_config_load(const cm_config_var_t *vars, size_t n, int argc, char **argv, const char *summary) {
    const char *prog = argc > 0 ? argv[0] : "service";
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--help") == 0 || strcmp(argv[i], "-h") == 0) {
            cm__print_help(vars, n, prog, summary);
            return 1;
        }
        fprintf(stderr, "%s: unknown argument \"%s\"; configuration is by environment variables, see --help\n", prog,
                argv[i]);
        return CM_ECONFIG;
    }
    int bad = 0;
    for (size_t i = 0; i < n; i++) {
        const cm_config_var_t *v = &vars[i];
        const char *val = getenv(v->env);
        int from_env = val && *val;
        if (!from_env) val = v->def ? v->def : "";
        int rc = 0;
        int64_t iv = 0;
        switch (v->type) {
        case CM_CFG_STRING:
            *(const char **)v->dest = val;
            break;
        case CM_CFG_BOOL:
            rc = cm__parse_bool(val, (int *)v->dest);
            break;
        case CM_CFG_INT:
        case CM_CFG_DURATION:
            rc = v->type == CM_CFG_INT ? cm__parse_int(val, &iv) : cm__parse_duration(val, &iv);
            if (rc == 0 && (v->min || v->max) && (iv < v->min || iv > v->max)) rc = -2;
            if (rc == 0) *(int64_t *)v->dest = iv;
            break;
        }
        if (rc == -1) {
            fprintf(stderr, "%s: %s=\"%s\" is not a valid %s%s\n", prog, v->env, val, cm__type_name(v->type),
                    v->type == CM_CFG_DURATION ? " (examples: 500ms, 10s, 2m)" : "");
            bad++;
        } else if (rc == -2) {
            if (v->type == CM_CFG_INT)
                fprintf(stderr, "%s: %s=%s is out of range (%" PRId64 "..%" PRId64 ")\n", prog, v->env, val, v->min, v->max);
            else
                fprintf(stderr, "%s: %s=%s is out of range (%" PRId64 "ms..%" PRId64 "ms)\n", prog, v->env, val, v->min,
                        v->max);
            bad++;
        }
    }
    return bad ? CM_ECONFIG : 0;
}

void cm_server_config_vars(cm_server_config_t *c, const char *def_listen, const char *def_admin, cm_config_var_t *out) {
    const cm_config_var_t vars[CM_SERVER_CONFIG_NVARS] = {
        {"IOT_GRPC_LISTEN", CM_CFG_STRING, def_listen, "gRPC listen address (host:port, :0 picks a free port)", 0, 0, &c->listen},
        {"IOT_ADMIN_LISTEN", CM_CFG_STRING, def_admin, "admin HTTP address for /metrics, /healthz, /readyz", 0, 0, &c->admin_listen},
        {"IOT_GRPC_THREADS", CM_CFG_INT, "4", "worker threads serving gRPC calls", 1, 256, &c->threads},
        {"IOT_SHUTDOWN_GRACE", CM_CFG_DURATION, "10s", "time in-flight calls get to finish on SIGTERM", 0, 600000, &c->grace_ms},
        {"IOT_GRPC_MAX_RECV_BYTES", CM_CFG_INT, "4194304", "largest request message accepted", 1024, 64 << 20, &c->max_recv_bytes},
        {"IOT_LOG_LEVEL", CM_CFG_STRING, "info", "debug, info, warn, error or off", 0, 0, &c->log_level},
        {"IOT_TLS_CERT", CM_CFG_STRING, "", "PEM certificate chain; with IOT_TLS_KEY enables TLS", 0, 0, &c->tls_cert},
        {"IOT_TLS_KEY", CM_CFG_STRING, "", "PEM private key", 0, 0, &c->tls_key},
        {"IOT_TLS_CLIENT_CA", CM_CFG_STRING, "", "PEM CA that signs client certificates (mTLS)", 0, 0, &c->tls_ca},
        {"IOT_TLS_REQUIRE_CLIENT_CERT", CM_CFG_BOOL, "false", "refuse clients without a valid certificate", 0, 0, &c->tls_require_client_cert},
        {"IOT_REGISTRY_ADDR", CM_CFG_STRING, "", "registry to register with (host:port); empty: do not register", 0, 0, &c->registry_addr},
        {"IOT_ADVERTISE_ADDR", CM_CFG_STRING, "", "address others reach this instance at; empty: the host name", 0, 0, &c->advertise_addr},
        {"IOT_INSTANCE_ID", CM_CFG_STRING, "", "instance id in the registry; empty: <address>-<port>", 0, 0, &c->instance_id},
        {"IOT_ZONE", CM_CFG_STRING, "", "zone advertised to the registry (for zone-preferring clients)", 0, 0, &c->zone},
        {"IOT_CLUSTER", CM_CFG_STRING, "", "cluster advertised to the registry", 0, 0, &c->cluster},
    };
    memcpy(out, vars, sizeof vars);
}
