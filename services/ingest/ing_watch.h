/* WatchTelemetry: a device's points as they are stored, read from ingest's own Redis streams.
 *
 * One reader thread per process, running only while a watch is open: XREAD BLOCK over the shard
 * streams that have watchers, from the lowest cursor among them, fanned out to the watchers of
 * each entry's device. A watcher starts after the newest entry of its shard when it joins (read
 * then, so nothing stored after the call started is missed even while the reader is blocked on
 * other shards), and drops points whose seq it has already sent (the streams are at least once). */
#ifndef ING_WATCH_H
#define ING_WATCH_H

#include "cm_rpc.h"
#include "ing_config.h"

typedef struct ing_watch_s ing_watch_t;

/* NULL only when IOT_REDIS_ADDR is malformed. */
ing_watch_t *ing_watch_new(const ing_config_t *cfg);
/* The RPC's start and done callbacks (the server stream's service ctx must lead to w: the caller
 * passes it). */
int ing_watch_start(ing_watch_t *w, cm_call_t *call, const ProtobufCMessage *req);
/* The request check ing_watch_start begins with (device_id, metrics): 0, or INVALID_ARGUMENT. */
int ing_watch_check(cm_call_t *call, const ProtobufCMessage *req);
void ing_watch_done(cm_call_t *call, int cancelled);
/* Ends every watch with UNAVAILABLE and refuses new ones (shutdown, before the drain). */
void ing_watch_shutdown(ing_watch_t *w);
void ing_watch_free(ing_watch_t *w);

#endif
