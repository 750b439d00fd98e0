/* The iot.ingest.v1.Ingest method table, and the open device streams it tracks for shutdown. */
#ifndef ING_HANDLERS_H
#define ING_HANDLERS_H

#include <pthread.h>

#include "cm_rpc.h"
#include "ing_batch.h"
#include "ing_commit.h"
#include "ing_devices.h"
#include "ing_store.h"
#include "ing_watch.h"

typedef struct ing__stream_s ing__stream_t;

typedef struct ing_ctx_s {
    const ing_config_t *cfg;
    ing_store_t *store;
    ing_devices_t *devices;
    ing_committers_t *commit;
    ing_watch_t *watch;         /* WatchTelemetry */
    ing_limits_t lim;
    int64_t drain_ms;           /* how long shutdown waits for queued batches to commit */
    pthread_mutex_t mu;         /* guards streams */
    ing__stream_t *streams;     /* open StreamTelemetry calls */
    size_t n_streams;
} ing_ctx_t;

/* Initialises ctx's own fields (the pointers are set by the caller) and binds the table to it;
 * ctx must outlive the server. */
void ing_service_init(cm_service_t *svc, ing_ctx_t *ctx);
/* Shutdown hook (cm_app on_shutdown): end the telemetry watches, stop taking batches, let the
 * queued ones commit and be acknowledged, then end every open stream with UNAVAILABLE so devices
 * reconnect elsewhere. */
void ing_ctx_shutdown(void *ctx);
void ing_ctx_destroy(ing_ctx_t *ctx);

#endif
