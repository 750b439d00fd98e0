/* Load-balancing policies over a mutable endpoint set. */
#include "cm_balance.h"
#include "cm_alloc.h"
#include "cm_err.h"

#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define CM__LB_VNODES 160 /* ring points per unit of weight: keeps the spread within a few percent */

typedef struct cm__lb_ep_s {
    cm_lb_endpoint_t ep;
    int outstanding;
    long current; /* smooth weighted round robin state */
} cm__lb_ep_t;

typedef struct cm__ring_pt_s {
    uint64_t hash;
    size_t ep;
} cm__ring_pt_t;

struct cm_lb_s {
    cm_lb_policy_t policy;
    pthread_mutex_t mu;
    cm__lb_ep_t *eps;
    size_t n;
    size_t rr;
    cm__ring_pt_t *ring;
    size_t ring_n;
};

int cm_lb_policy_parse(const char *s) {
    static const char *const names[] = {"round_robin", "least_outstanding", "weighted", "consistent_hash"};
    for (int i = 0; i < 4; i++)
        if (strcmp(s, names[i]) == 0) return i;
    return -1;
}

cm_lb_t *cm_lb_new(cm_lb_policy_t policy) {
    cm_lb_t *lb = cm_calloc(1, sizeof *lb);
    lb->policy = policy;
    pthread_mutex_init(&lb->mu, NULL);
    return lb;
}

void cm_lb_free(cm_lb_t *lb) {
    if (!lb) return;
    cm_free(lb->eps);
    cm_free(lb->ring);
    pthread_mutex_destroy(&lb->mu);
    cm_free(lb);
}

/* 64-bit FNV-1a, then a murmur-style finaliser so that similar keys spread over the ring. */
static uint64_t cm__hash(const char *p, size_t n) {
    uint64_t h = 1469598103934665603ULL;
    for (size_t i = 0; i < n; i++) {
        h ^= (unsigned char)p[i];
        h *= 1099511628211ULL;
    }
    h ^= h >> 33;
    h *= 0xff51afd7ed558ccdULL;
    h ^= h >> 33;
    h *= 0xc4ceb9fe1a85ec53ULL;
    h ^= h >> 33;
    return h;
}

static int cm__ring_cmp(const void *a, const void *b) {
    uint64_t x = ((const cm__ring_pt_t *)a)->hash, y = ((const cm__ring_pt_t *)b)->hash;
    return (x > y) - (x < y);
}

/* Ring points derive from the endpoint id only, so an endpoint's points do not move when others
 * come or go. Caller holds mu. */
static void cm__ring_build(cm_lb_t *lb) {
    size_t total = 0;
    for (size_t i = 0; i < lb->n; i++) total += (size_t)lb->eps[i].ep.weight * CM__LB_VNODES / 100 + 1;
    cm_free(lb->ring);
    lb->ring = cm_malloc((total ? total : 1) * sizeof *lb->ring);
    lb->ring_n = 0;
    for (size_t i = 0; i < lb->n; i++) {
        size_t pts = (size_t)lb->eps[i].ep.weight * CM__LB_VNODES / 100 + 1;
        for (size_t k = 0; k < pts; k++) {
            char buf[160];
            int len = snprintf(buf, sizeof buf, "%s#%zu", lb->eps[i].ep.id, k);
            lb->ring[lb->ring_n++] = (cm__ring_pt_t){cm__hash(buf, (size_t)len), i};
        }
    }
    qsort(lb->ring, lb->ring_n, sizeof *lb->ring, cm__ring_cmp);
}

void cm_lb_set(cm_lb_t *lb, const cm_lb_endpoint_t *eps, size_t n) {
    cm__lb_ep_t *next = cm_calloc(n ? n : 1, sizeof *next);
    pthread_mutex_lock(&lb->mu);
    for (size_t i = 0; i < n; i++) {
        next[i].ep = eps[i];
        if (next[i].ep.weight <= 0) next[i].ep.weight = 1;
        for (size_t j = 0; j < lb->n; j++)
            if (strcmp(lb->eps[j].ep.id, eps[i].id) == 0) {
                next[i].outstanding = lb->eps[j].outstanding;
                next[i].current = lb->eps[j].current;
                break;
            }
    }
    cm_free(lb->eps);
    lb->eps = next;
    lb->n = n;
    if (lb->policy == CM_LB_CONSISTENT_HASH) cm__ring_build(lb);
    pthread_mutex_unlock(&lb->mu);
}

int cm_lb_pick(cm_lb_t *lb, const char *key, size_t keylen, cm_lb_pick_t *out) {
    pthread_mutex_lock(&lb->mu);
    if (lb->n == 0) {
        pthread_mutex_unlock(&lb->mu);
        return CM_ENOTFOUND;
    }
    size_t pick = 0;
    switch (lb->policy) {
    case CM_LB_ROUND_ROBIN:
        pick = lb->rr++ % lb->n;
        break;
    case CM_LB_LEAST_OUTSTANDING: {
        /* Start the scan at a rotating index so that ties spread instead of piling on the first. */
        size_t start = lb->rr++ % lb->n;
        pick = start;
        for (size_t k = 1; k < lb->n; k++) {
            size_t i = (start + k) % lb->n;
            if (lb->eps[i].outstanding < lb->eps[pick].outstanding) pick = i;
        }
        break;
    }
    case CM_LB_WEIGHTED: {
        long total = 0;
        for (size_t i = 0; i < lb->n; i++) {
            lb->eps[i].current += lb->eps[i].ep.weight;
            total += lb->eps[i].ep.weight;
            if (lb->eps[i].current > lb->eps[pick].current) pick = i;
        }
        lb->eps[pick].current -= total;
        break;
    }
    case CM_LB_CONSISTENT_HASH: {
        uint64_t h = cm__hash(key ? key : "", key ? keylen : 0);
        size_t lo = 0, hi = lb->ring_n;
        while (lo < hi) {
            size_t mid = (lo + hi) / 2;
            if (lb->ring[mid].hash < h)
                lo = mid + 1;
            else
                hi = mid;
        }
        pick = lb->ring[lo == lb->ring_n ? 0 : lo].ep;
        break;
    }
    }
    lb->eps[pick].outstanding++;
    snprintf(out->id, sizeof out->id, "%s", lb->eps[pick].ep.id);
    snprintf(out->target, sizeof out->target, "%s", lb->eps[pick].ep.target);
    pthread_mutex_unlock(&lb->mu);
    return 0;
}

void cm_lb_done(cm_lb_t *lb, const cm_lb_pick_t *pick) {
    pthread_mutex_lock(&lb->mu);
    for (size_t i = 0; i < lb->n; i++)
        if (strcmp(lb->eps[i].ep.id, pick->id) == 0) {
            if (lb->eps[i].outstanding > 0) lb->eps[i].outstanding--;
            break;
        }
    pthread_mutex_unlock(&lb->mu);
}

size_t cm_lb_size(cm_lb_t *lb) {
    pthread_mutex_lock(&lb->mu);
    size_t n = lb->n;
    pthread_mutex_unlock(&lb->mu);
    return n;
}
