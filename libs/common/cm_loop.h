/* A background thread that runs a function again and again until stopped, sleeping between runs
 * for as long as the function asks. Stop wakes it at once (no waiting out the sleep) and joins. */
#ifndef CM_LOOP_H
#define CM_LOOP_H

#include <stdint.h>

typedef struct cm_loop_s cm_loop_t;

/* fn runs on the loop's thread and returns how many milliseconds to sleep before the next run. */
typedef int64_t (*cm_loop_fn)(void *arg);

/* first_delay_ms: sleep before the first run (0: run at once). */
cm_loop_t *cm_loop_start(cm_loop_fn fn, void *arg, int64_t first_delay_ms);
/* Wakes a sleeping loop so that fn runs now. */
void cm_loop_kick(cm_loop_t *l);
/* Stops (fn is not interrupted mid-run), joins and frees. Accepts NULL. */
void cm_loop_stop(cm_loop_t *l);

#endif
