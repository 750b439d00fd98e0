/* Small time helpers shared by the pools and the server's drain. */
#ifndef CM_TIME_H
#define CM_TIME_H

#include <stdint.h>
#include <time.h>

#include <pthread.h>

/* Condition variables that wait on CLOCK_MONOTONIC, so a wall-clock jump cannot stretch or cut a
 * timeout; pair with cm_abstime_in(). */
static inline void cm_cond_init_monotonic(pthread_cond_t *cv) {
    pthread_condattr_t a;
    pthread_condattr_init(&a);
    pthread_condattr_setclock(&a, CLOCK_MONOTONIC);
    pthread_cond_init(cv, &a);
    pthread_condattr_destroy(&a);
}

/* *ts = now (CLOCK_MONOTONIC) + ms, for pthread_cond_timedwait on a cm_cond_init_monotonic cv. */
static inline void cm_abstime_in(struct timespec *ts, int64_t ms) {
    clock_gettime(CLOCK_MONOTONIC, ts);
    ts->tv_sec += (time_t)(ms / 1000);
    ts->tv_nsec += (long)(ms % 1000) * 1000000L;
    if (ts->tv_nsec >= 1000000000L) {
        ts->tv_sec++;
        ts->tv_nsec -= 1000000000L;
    }
}

/* Wall-clock milliseconds since the Unix epoch (timestamps that leave the process). */
static inline int64_t cm_wall_ms(void) {
    struct timespec t;
    clock_gettime(CLOCK_REALTIME, &t);
    return (int64_t)t.tv_sec * 1000 + t.tv_nsec / 1000000;
}

/* Monotonic nanoseconds (durations and deadlines inside the process). */
static inline int64_t cm_mono_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (int64_t)t.tv_sec * 1000000000 + t.tv_nsec;
}

#endif
