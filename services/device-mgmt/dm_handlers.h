/* The iot.device.v1.DeviceManager method table. */
#ifndef DM_HANDLERS_H
#define DM_HANDLERS_H

#include "cm_rpc.h"
#include "dm_commands.h"
#include "dm_store.h"

typedef struct dm_ctx_s {
    dm_store_t *store;
    dm_cmd_hub_t *hub;
} dm_ctx_t;

/* Binds the service table to ctx (which must outlive the server). */
void dm_service_init(cm_service_t *svc, dm_ctx_t *ctx);

#endif
