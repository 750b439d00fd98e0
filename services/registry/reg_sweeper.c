/* Sweeper: every interval, removes lapsed leases in batches. Discover never returns a lapsed
 * instance even between sweeps (the scripts compare with Redis time); the sweeper only reclaims
 * the keys and emits the REMOVED events. */
#include "reg_sweeper.h"

#include <stdio.h>

#include "cm_alloc.h"
#include "cm_log.h"
#include "cm_loop.h"

struct reg_sweeper_s {
    reg_store_t *store;
    int64_t interval_ms;
    cm_loop_t *loop;
};

static int64_t reg__sweep(void *arg) {
    reg_sweeper_t *sw = arg;
    char err[256];
    int n;
    /* Batches keep each script short: Redis runs scripts one at a time. */
    do {
        n = reg_store_sweep(sw->store, 500, err, sizeof err);
        if (n < 0) cm_log_kv(CM_LOG_WARN, "lease sweep failed", "error", err, NULL);
        if (n > 0) {
            char c[16];
            snprintf(c, sizeof c, "%d", n);
            cm_log_kv(CM_LOG_INFO, "expired instances removed", "count", c, NULL);
        }
    } while (n == 500);
    return sw->interval_ms;
}

reg_sweeper_t *reg_sweeper_start(reg_store_t *store, int64_t interval_ms) {
    reg_sweeper_t *sw = cm_calloc(1, sizeof *sw);
    sw->store = store;
    sw->interval_ms = interval_ms;
    sw->loop = cm_loop_start(reg__sweep, sw, interval_ms);
    return sw;
}

void reg_sweeper_stop(reg_sweeper_t *sw) {
    if (!sw) return;
    cm_loop_stop(sw->loop);
    cm_free(sw);
}
