/* The iot.registry.v1.Registry method table. */
#ifndef REG_HANDLERS_H
#define REG_HANDLERS_H

#include "cm_rpc.h"
#include "reg_store.h"

/* Binds the service table to store (which must outlive the server). */
void reg_service_init(cm_service_t *svc, reg_store_t *store);

#endif
