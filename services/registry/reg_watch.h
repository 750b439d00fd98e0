/* Watch streams fed from the registry's event log (see reg_watch.c for the ordering argument). */
#ifndef REG_WATCH_H
#define REG_WATCH_H

#include "cm_rpc.h"
#include "reg_store.h"

typedef struct reg_watch_hub_s reg_watch_hub_t;

/* Starts the log tailer (its own Redis connection to redis_addr). */
reg_watch_hub_t *reg_watch_hub_start(reg_store_t *store, const char *redis_addr, int timeout_ms);
/* Server shutdown hook: ends every watch stream with UNAVAILABLE. arg is the hub. */
void reg_watch_hub_end_all(void *arg);
/* Stops the tailer and frees; after the server stopped. Accepts NULL. */
void reg_watch_hub_stop(reg_watch_hub_t *h);

/* The Watch handler's start/done callbacks; the request's service name is checked already. */
int reg_watch_start(cm_call_t *call, const ProtobufCMessage *req, reg_watch_hub_t *h);
void reg_watch_done(cm_call_t *call, int cancelled);

/* Fills ri from e (pointing into e: use before e goes away). */
void reg_entry_to_pb(const reg_entry_t *e, Iot__Registry__V1__RegisteredInstance *ri);

#endif
