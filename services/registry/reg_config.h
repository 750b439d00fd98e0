/* The registry's own configuration (the shared gRPC/admin/log variables come from cm_app). */
#ifndef REG_CONFIG_H
#define REG_CONFIG_H

#include "cm_config.h"

typedef struct reg_config_s {
    const char *redis_addr;
    const char *prefix;
    int64_t sweep_ms;
    int64_t redis_timeout_ms;
    int64_t check_concurrency;
} reg_config_t;

#define REG_CONFIG_NVARS 5
void reg_config_vars(reg_config_t *c, cm_config_var_t *out);
/* Checks what the types cannot express; prints the problem and returns CM_ECONFIG, or 0. */
int reg_config_check(const reg_config_t *c, const char *prog);

#endif
