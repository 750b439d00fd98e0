/* ingest's Postgres side apart from the commit path: the query pool, migrations, readiness, the
 * device high-water mark read at stream start, and the telemetry partitions (created ahead and on
 * demand, dropped after the retention period).
 *
 * Partition bookkeeping is shared by the committers and the upkeep loop; every function here is
 * thread safe. */
#ifndef ING_STORE_H
#define ING_STORE_H

#include <pthread.h>
#include <stdint.h>

#include "cm_loop.h"
#include "cm_pg.h"
#include "ing_config.h"

typedef struct ing__part_s {
    int64_t from_ms, to_ms;
    char name[40];
} ing__part_t;

typedef struct ing_store_s {
    const ing_config_t *cfg;
    cm_pg_t *pg; /* queries, stream starts, partition upkeep */
    pthread_mutex_t part_mu;
    ing__part_t *parts; /* known partitions, sorted by from_ms */
    size_t n_parts, cap_parts;
    cm_loop_t *upkeep;
} ing_store_t;

/* Creates the pool (connects lazily). CM_EINVAL on bad arguments. */
int ing_store_open(ing_store_t *s, const ing_config_t *cfg);
/* Applies migrations, creates the current and next partitions, starts the upkeep loop. */
int ing_store_start(ing_store_t *s);
void ing_store_close(ing_store_t *s);
/* cm_ready_fn: Postgres answers. */
int ing_store_ready(void *store, char *why, size_t len);

/* Makes sure partitions cover [from_ms, to_ms] (inclusive), creating missing ones on c (outside
 * any transaction). 0, or CM_EPG with the reason in err. */
int ing_store_cover(ing_store_t *s, cm_pg_conn_t *c, int64_t from_ms, int64_t to_ms, char *err, size_t err_cap);
/* One upkeep pass: partitions ahead, then retention. Returns the number of partitions dropped,
 * or a negative CM_E... code. */
int ing_store_upkeep(ing_store_t *s);

/* The device's stored high-water mark (0 when it never stored anything): a gRPC status, with the
 * reason in err when not OK. */
int ing_store_device_seq(ing_store_t *s, const char *device_id, uint64_t *seq, int timeout_ms, char *err, size_t err_cap);

#endif
