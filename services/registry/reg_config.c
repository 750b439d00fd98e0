/* Registry configuration: variables, defaults that work locally, and checks. */
#include "reg_config.h"

#include <stdio.h>
#include <string.h>

#include "cm_err.h"

void reg_config_vars(reg_config_t *c, cm_config_var_t *out) {
    const cm_config_var_t vars[REG_CONFIG_NVARS] = {
        {"IOT_REDIS_ADDR", CM_CFG_STRING, "127.0.0.1:6379", "Redis holding the registry's state (host:port or unix:/path)", 0, 0, &c->redis_addr},
        {"IOT_REGISTRY_PREFIX", CM_CFG_STRING, "{reg}:", "key prefix of the registry's keyspace", 0, 0, &c->prefix},
        {"IOT_REGISTRY_SWEEP_INTERVAL", CM_CFG_DURATION, "1s", "how often lapsed leases are removed", 100, 60000, &c->sweep_ms},
        {"IOT_REDIS_TIMEOUT", CM_CFG_DURATION, "2s", "connect and command timeout for Redis", 50, 60000, &c->redis_timeout_ms},
        {"IOT_REGISTRY_CHECK_CONCURRENCY", CM_CFG_INT, "8", "active checks in flight at most", 1, 256, &c->check_concurrency},
    };
    memcpy(out, vars, sizeof vars);
}

int reg_config_check(const reg_config_t *c, const char *prog) {
    size_t n = strlen(c->prefix);
    if (n == 0 || n > 48) {
        fprintf(stderr, "%s: IOT_REGISTRY_PREFIX must be 1-48 characters\n", prog);
        return CM_ECONFIG;
    }
    return 0;
}
