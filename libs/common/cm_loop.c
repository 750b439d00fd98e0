/* cm_loop_t: a stoppable periodic thread on a monotonic clock. */
#include "cm_loop.h"
#include "cm_alloc.h"
#include "cm_time.h"

#include <errno.h>
#include <pthread.h>

struct cm_loop_s {
    cm_loop_fn fn;
    void *arg;
    int64_t delay;
    pthread_t th;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int stop, kicked;
};

static void *cm__loop_main(void *arg) {
    cm_loop_t *l = arg;
    pthread_mutex_lock(&l->mu);
    while (!l->stop) {
        if (l->delay > 0 && !l->kicked) {
            struct timespec until;
            cm_abstime_in(&until, l->delay);
            while (!l->stop && !l->kicked && pthread_cond_timedwait(&l->cv, &l->mu, &until) != ETIMEDOUT) {
            }
            if (l->stop) break;
        }
        l->kicked = 0;
        pthread_mutex_unlock(&l->mu);
        int64_t next = l->fn(l->arg);
        pthread_mutex_lock(&l->mu);
        l->delay = next;
    }
    pthread_mutex_unlock(&l->mu);
    return NULL;
}

cm_loop_t *cm_loop_start(cm_loop_fn fn, void *arg, int64_t first_delay_ms) {
    cm_loop_t *l = cm_calloc(1, sizeof *l);
    l->fn = fn;
    l->arg = arg;
    l->delay = first_delay_ms;
    pthread_mutex_init(&l->mu, NULL);
    cm_cond_init_monotonic(&l->cv);
    pthread_create(&l->th, NULL, cm__loop_main, l);
    return l;
}

void cm_loop_kick(cm_loop_t *l) {
    pthread_mutex_lock(&l->mu);
    l->kicked = 1;
    pthread_cond_signal(&l->cv);
    pthread_mutex_unlock(&l->mu);
}

void cm_loop_stop(cm_loop_t *l) {
    if (!l) return;
    pthread_mutex_lock(&l->mu);
    l->stop = 1;
    pthread_cond_signal(&l->cv);
    pthread_mutex_unlock(&l->mu);
    pthread_join(l->th, NULL);
    pthread_mutex_destroy(&l->mu);
    pthread_cond_destroy(&l->cv);
    cm_free(l);
}
