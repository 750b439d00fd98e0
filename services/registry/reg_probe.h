/* One active check against one instance: gRPC health, HTTP or TCP, within the check's timeout.
 * gRPC channels are cached per address (bounded, least recently used evicted) so a check every
 * second does not pay a TCP and HTTP/2 handshake each time. Thread safe. */
#ifndef REG_PROBE_H
#define REG_PROBE_H

#include <stddef.h>

#include "iot/registry/v1/registry.pb-c.h"

typedef struct reg_prober_s reg_prober_t;

reg_prober_t *reg_prober_new(void);
void reg_prober_free(reg_prober_t *p);
/* 1 when the check passed; 0 with the reason in why. */
int reg_probe(reg_prober_t *p, const Iot__Registry__V1__Instance *inst, char *why, size_t cap);

#endif
