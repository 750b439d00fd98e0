/* Background removal of instances whose lease lapsed. Every replica runs one; the removal script
 * is idempotent, so running it on several replicas only repeats a cheap check. */
#ifndef REG_SWEEPER_H
#define REG_SWEEPER_H

#include <stdint.h>

#include "reg_store.h"

typedef struct reg_sweeper_s reg_sweeper_t;

reg_sweeper_t *reg_sweeper_start(reg_store_t *store, int64_t interval_ms);
/* Stops the thread and frees. Accepts NULL. */
void reg_sweeper_stop(reg_sweeper_t *sw);

#endif
