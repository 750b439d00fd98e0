/* Active health checking: a scheduler thread claims due checks from Redis (each once per interval
 * across all replicas) and a fixed pool of probe threads runs them and records the results. */
#ifndef REG_CHECKER_H
#define REG_CHECKER_H

#include "reg_store.h"

typedef struct reg_checker_s reg_checker_t;

/* concurrency: probe threads, i.e. checks in flight at most. */
reg_checker_t *reg_checker_start(reg_store_t *store, int concurrency);
/* Stops the threads (probes in flight finish first, each bounded by its timeout) and frees. */
void reg_checker_stop(reg_checker_t *c);

#endif
