/* Sweeper thread: every interval, removes lapsed leases in batches. Discover never returns a lapsed
 * instance even between sweeps (the scripts compare with Redis time); the sweeper only reclaims
 * the keys. */
#include "reg_sweeper.h"

#include <errno.h>
#include <pthread.h>
#include <stdio.h>

#include "cm_alloc.h"
#include "cm_log.h"
#include "cm_time.h"

struct reg_sweeper_s {
    reg_store_t *store;
    int64_t interval_ms;
    pthread_t th;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int stop;
};

static void *reg__sweep_loop(void *arg) {
    reg_sweeper_t *sw = arg;
    pthread_mutex_lock(&sw->mu);
    while (!sw->stop) {
        struct timespec until;
        cm_abstime_in(&until, sw->interval_ms);
        while (!sw->stop && pthread_cond_timedwait(&sw->cv, &sw->mu, &until) != ETIMEDOUT) {
        }
        if (sw->stop) break;
        pthread_mutex_unlock(&sw->mu);
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
        pthread_mutex_lock(&sw->mu);
    }
    pthread_mutex_unlock(&sw->mu);
    return NULL;
}

reg_sweeper_t *reg_sweeper_start(reg_store_t *store, int64_t interval_ms) {
    reg_sweeper_t *sw = cm_calloc(1, sizeof *sw);
    sw->store = store;
    sw->interval_ms = interval_ms;
    pthread_mutex_init(&sw->mu, NULL);
    cm_cond_init_monotonic(&sw->cv);
    pthread_create(&sw->th, NULL, reg__sweep_loop, sw);
    return sw;
}

void reg_sweeper_stop(reg_sweeper_t *sw) {
    if (!sw) return;
    pthread_mutex_lock(&sw->mu);
    sw->stop = 1;
    pthread_cond_signal(&sw->cv);
    pthread_mutex_unlock(&sw->mu);
    pthread_join(sw->th, NULL);
    pthread_mutex_destroy(&sw->mu);
    pthread_cond_destroy(&sw->cv);
    cm_free(sw);
}
