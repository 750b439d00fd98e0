/* Finding other services: discovery-backed channels, and registering this process.
 *
 * cm_disco_t resolves a service name to a live channel. With a registry it keeps a Watch on the
 * service (snapshot, then changes; reconnecting with backoff when the stream breaks), balances the
 * passing instances with a cm_balance policy and caches one channel per instance. Without a
 * registry it is a plain channel to a DNS target (inside the mesh, Envoy balances).
 *
 * cm_selfreg_t registers this process with the registry (with a gRPC health check on its own
 * port), heartbeats at a third of the TTL, registers again if the registry lost the lease, and
 * deregisters on stop. cm_app does this when IOT_REGISTRY_ADDR is set. */
#ifndef CM_DISCOVERY_H
#define CM_DISCOVERY_H

#include <stddef.h>

#include "cm_balance.h"
#include "cm_rpc.h"

typedef struct cm_disco_opts_s {
    const char *registry;    /* registry address, or NULL / "" for DNS mode */
    const char *service;     /* the registry's service name */
    const char *dns_target;  /* DNS mode target, e.g. "dns:///ingest.iot:7002" */
    cm_lb_policy_t policy;
    const char *prefer_zone; /* instances in this zone only, while any is passing ("" = any) */
} cm_disco_opts_t;

typedef struct cm_disco_s cm_disco_t;

/* Starts watching (registry mode). NULL with *err for missing options. */
cm_disco_t *cm_disco_new(const cm_disco_opts_t *o, int *err);
void cm_disco_free(cm_disco_t *d);
/* A channel to one instance (key: for CONSISTENT_HASH). NULL when no instance is passing.
 * The channel stays valid until cm_disco_done(d, pick). */
cm_channel_t *cm_disco_pick(cm_disco_t *d, const char *key, size_t keylen, cm_lb_pick_t *pick);
void cm_disco_done(cm_disco_t *d, const cm_lb_pick_t *pick);
/* Passing instances known now (0 in DNS mode means "unknown"). */
size_t cm_disco_instances(cm_disco_t *d);
/* Waits up to timeout_ms until at least n instances are known; 0 or CM_ETIMEOUT. */
int cm_disco_wait(cm_disco_t *d, size_t n, int timeout_ms);

typedef struct cm_selfreg_opts_s {
    const char *registry;
    const char *service;     /* registry service name (e.g. "ingest") */
    const char *health_name; /* gRPC health service name to check ("" = the whole server) */
    const char *instance_id; /* "" = "<address>-<port>" */
    const char *address;     /* how others reach us; "" = this host's name */
    int port;
    const char *zone, *cluster, *version;
    int ttl_s;               /* 0 = 15 */
} cm_selfreg_opts_t;

typedef struct cm_selfreg_s cm_selfreg_t;

/* Registers (retrying in the background if the registry is not reachable yet). */
cm_selfreg_t *cm_selfreg_start(const cm_selfreg_opts_t *o);
/* Deregisters (best effort, bounded by a short deadline) and frees. Accepts NULL. */
void cm_selfreg_stop(cm_selfreg_t *r);

#endif
