/* processing's Postgres pool, migrations at start, and upkeep: deleting rollups, alert events and
 * finished actions past their retention. */
#ifndef PROC_STORE_H
#define PROC_STORE_H

#include "cm_loop.h"
#include "cm_pg.h"
#include "proc_config.h"

typedef struct proc_store_s {
    const proc_config_t *cfg;
    cm_pg_t *pg;
    cm_loop_t *upkeep;
} proc_store_t;

/* Creates the pool (connects lazily). 0, or CM_EINVAL for unusable settings. */
int proc_store_open(proc_store_t *s, const proc_config_t *cfg);
/* Applies migrations and starts the upkeep loop. 0, or CM_EPG / CM_EIO (logged). */
int proc_store_start(proc_store_t *s);
/* One upkeep pass; returns rows deleted, or -1 when Postgres failed. */
int64_t proc_store_upkeep(proc_store_t *s);
/* cm_ready_fn: Postgres answers. */
int proc_store_ready(void *store, char *why, size_t len);
void proc_store_close(proc_store_t *s);

#endif
