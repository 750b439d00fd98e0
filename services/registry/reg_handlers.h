/* The iot.registry.v1.Registry method table. */
#ifndef REG_HANDLERS_H
#define REG_HANDLERS_H

#include "cm_rpc.h"
#include "reg_store.h"
#include "reg_watch.h"

typedef struct reg_ctx_s {
    reg_store_t *store;
    reg_watch_hub_t *hub;
} reg_ctx_t;

/* Binds the service table to ctx (which must outlive the server). */
void reg_service_init(cm_service_t *svc, reg_ctx_t *ctx);

#endif
