/* Client-side load balancing over a set of endpoints that changes at run time (from discovery).
 *
 * Policies: round robin; least outstanding requests (ties rotate); weighted (smooth weighted round
 * robin, as nginx does: exact proportions, interleaved picks); consistent hash on a caller's key (a
 * ring of virtual nodes: a key keeps its endpoint while that endpoint stays, and when one of N
 * leaves only its ~1/N of the keys move). Thread safe. */
#ifndef CM_BALANCE_H
#define CM_BALANCE_H

#include <stddef.h>

typedef enum {
    CM_LB_ROUND_ROBIN = 0,
    CM_LB_LEAST_OUTSTANDING,
    CM_LB_WEIGHTED,
    CM_LB_CONSISTENT_HASH,
} cm_lb_policy_t;

/* Parses "round_robin", "least_outstanding", "weighted", "consistent_hash"; -1 if unknown. */
int cm_lb_policy_parse(const char *s);

typedef struct cm_lb_endpoint_s {
    char id[132];     /* stable identity (instance id) */
    char target[300]; /* "host:port" */
    int weight;       /* > 0; used by WEIGHTED and as virtual-node multiplier by CONSISTENT_HASH */
} cm_lb_endpoint_t;

/* What cm_lb_pick chose; pass it back to cm_lb_done. */
typedef struct cm_lb_pick_s {
    char id[132];
    char target[300];
} cm_lb_pick_t;

typedef struct cm_lb_s cm_lb_t;

cm_lb_t *cm_lb_new(cm_lb_policy_t policy);
void cm_lb_free(cm_lb_t *lb);
/* Replaces the endpoint set (copied). Outstanding counts and weighted state survive for ids that
 * stay. */
void cm_lb_set(cm_lb_t *lb, const cm_lb_endpoint_t *eps, size_t n);
/* Chooses an endpoint; key/keylen matter only for CONSISTENT_HASH. CM_ENOTFOUND when empty. */
int cm_lb_pick(cm_lb_t *lb, const char *key, size_t keylen, cm_lb_pick_t *out);
/* Ends a request started with cm_lb_pick (least-outstanding bookkeeping). */
void cm_lb_done(cm_lb_t *lb, const cm_lb_pick_t *pick);
size_t cm_lb_size(cm_lb_t *lb);

#endif
