/* Watch: a snapshot, then every change from the registry's event log (P ev in Redis).
 *
 * One tailer thread per replica follows the log with XREAD and fans each event out to the local
 * watchers of that service. A new watcher takes its snapshot together with the log position S; if
 * the tailer has already delivered up to T > S, the watcher is caught up with the log range (S, T]
 * while the fan-out lock is held, and only then joins. So every watcher sees each change once, in
 * log order, whichever replica applied it. A watcher whose send queue fills is aborted with
 * RESOURCE_EXHAUSTED: memory per watcher stays bounded by the call's send queue. */
#include "reg_watch.h"

#include <inttypes.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "cm_alloc.h"
#include "cm_err.h"
#include "cm_log.h"
#include "cm_metrics.h"

typedef struct reg__watcher_s {
    cm_call_t *call;
    char service[64];
    char from_rev[40]; /* its snapshot's position: older events are already in the snapshot */
} reg__watcher_t;

struct reg_watch_hub_s {
    reg_store_t *store;
    cm_redis_t *tail; /* the tailer's own connection: XREAD BLOCK holds it */
    pthread_t th;
    int stop;
    pthread_mutex_t mu; /* watchers, last_rev */
    reg__watcher_t *w;
    size_t nw, capw;
    char last_rev[40];
    int closing; /* set by the shutdown hook; new watchers are refused from then on */
    cm_gauge_t *watchers_gauge;
};

/* Compares stream ids "ms-seq". */
static int reg__rev_cmp(const char *a, const char *b) {
    uint64_t am = strtoull(a, NULL, 10), bm = strtoull(b, NULL, 10);
    if (am != bm) return am < bm ? -1 : 1;
    const char *ad = strchr(a, '-'), *bd = strchr(b, '-');
    uint64_t as = ad ? strtoull(ad + 1, NULL, 10) : 0, bs = bd ? strtoull(bd + 1, NULL, 10) : 0;
    return as < bs ? -1 : as > bs;
}

void reg_entry_to_pb(const reg_entry_t *e, Iot__Registry__V1__RegisteredInstance *ri) {
    iot__registry__v1__registered_instance__init(ri);
    ri->instance = e->inst;
    ri->status = e->status == 1 ? IOT__REGISTRY__V1__HEALTH_STATUS__HEALTH_STATUS_PASSING
                                : IOT__REGISTRY__V1__HEALTH_STATUS__HEALTH_STATUS_CRITICAL;
    ri->lease_id = (char *)e->lease;
    ri->lease_expires_unix_ms = e->expires_ms;
    ri->registered_unix_ms = e->registered_ms;
    ri->last_check_unix_ms = e->last_check_ms;
    ri->last_check_error = (char *)e->last_error;
}

/* Sends one event to one watcher; aborts a watcher that stopped reading. Caller holds hub->mu. */
static void reg__send(cm_call_t *call, const reg_event_t *ev) {
    Iot__Registry__V1__WatchEvent out = IOT__REGISTRY__V1__WATCH_EVENT__INIT;
    Iot__Registry__V1__RegisteredInstance ri, *rip = &ri;
    out.service = (char *)ev->service;
    out.instance_id = (char *)ev->instance_id;
    out.revision = (char *)ev->rev;
    if (strcmp(ev->kind, "removed") == 0) {
        out.type = IOT__REGISTRY__V1__WATCH_EVENT__TYPE__REMOVED;
    } else {
        if (!ev->entry.inst) return;
        out.type = strcmp(ev->kind, "added") == 0     ? IOT__REGISTRY__V1__WATCH_EVENT__TYPE__ADDED
                   : strcmp(ev->kind, "updated") == 0 ? IOT__REGISTRY__V1__WATCH_EVENT__TYPE__UPDATED
                                                      : IOT__REGISTRY__V1__WATCH_EVENT__TYPE__HEALTH_CHANGED;
        reg_entry_to_pb(&ev->entry, &ri);
        out.instances = &rip;
        out.n_instances = 1;
    }
    if (cm_call_send(call, &out.base) == CM_EFULL)
        cm_call_abort(call, CM_STATUS_RESOURCE_EXHAUSTED, "watcher is not reading its events; watch again for a snapshot");
}

/* Delivers each entry of an XRANGE/XREAD entry list to the matching watchers (all of them, or
 * only `only` when given, for a catch-up). Caller holds hub->mu. */
static void reg__deliver(reg_watch_hub_t *h, redisReply *entries, cm_call_t *only, const char *only_service) {
    for (size_t i = 0; i < entries->elements; i++) {
        cm_arena_t a;
        cm_arena_init(&a, NULL, 0);
        reg_event_t ev;
        if (reg_store_parse_event(entries->element[i], &a.pb, &ev) == 0) {
            if (only) {
                if (strcmp(ev.service, only_service) == 0) reg__send(only, &ev);
            } else {
                for (size_t k = 0; k < h->nw; k++)
                    if (strcmp(h->w[k].service, ev.service) == 0 && reg__rev_cmp(ev.rev, h->w[k].from_rev) > 0)
                        reg__send(h->w[k].call, &ev);
                snprintf(h->last_rev, sizeof h->last_rev, "%s", ev.rev);
            }
        }
        cm_arena_free(&a);
    }
}

static void *reg__tail_loop(void *arg) {
    reg_watch_hub_t *h = arg;
    char key[96];
    snprintf(key, sizeof key, "%sev", h->store->prefix);
    int down = 0; /* log transitions, not every retry */
    while (!__atomic_load_n(&h->stop, __ATOMIC_ACQUIRE)) {
        char from[40];
        pthread_mutex_lock(&h->mu);
        snprintf(from, sizeof from, "%s", h->last_rev);
        pthread_mutex_unlock(&h->mu);
        /* Short blocks so that stop is noticed within half a second. */
        const char *argv[] = {"XREAD", "COUNT", "500", "BLOCK", "500", "STREAMS", key, from};
        redisReply *rep = cm_redis_cmd(h->tail, 8, argv, NULL);
        if (rep && rep->type == REDIS_REPLY_ERROR) { /* e.g. LOADING after a restart: back off too */
            freeReplyObject(rep);
            rep = NULL;
        }
        if (!rep) {
            if (!down) cm_log_kv(CM_LOG_WARN, "watch tailer lost redis", "error", cm_redis_error(h->tail), NULL);
            down = 1;
            usleep(200000);
            continue;
        }
        if (down) cm_log_kv(CM_LOG_INFO, "watch tailer reconnected to redis", NULL);
        down = 0;
        if (rep->type == REDIS_REPLY_ARRAY && rep->elements == 1 && rep->element[0]->elements == 2) {
            pthread_mutex_lock(&h->mu);
            reg__deliver(h, rep->element[0]->element[1], NULL, NULL);
            pthread_mutex_unlock(&h->mu);
        }
        freeReplyObject(rep);
    }
    return NULL;
}

reg_watch_hub_t *reg_watch_hub_start(reg_store_t *store, const char *redis_addr, int timeout_ms) {
    reg_watch_hub_t *h = cm_calloc(1, sizeof *h);
    h->store = store;
    /* XREAD blocks up to 500 ms: the connection's command timeout must be longer. */
    h->tail = cm_redis_new(redis_addr, timeout_ms > 1500 ? timeout_ms : 1500, NULL);
    snprintf(h->last_rev, sizeof h->last_rev, "$");
    pthread_mutex_init(&h->mu, NULL);
    h->watchers_gauge = cm_metrics_gauge("registry_watchers", "Open Watch streams on this replica.", NULL);
    /* Start from the log's current end; watchers catch up from their own snapshot position. */
    char key[96];
    snprintf(key, sizeof key, "%sev", store->prefix);
    redisReply *rep = cm_redis_cmdv(h->tail, "XREVRANGE", key, "+", "-", "COUNT", "1", NULL);
    if (rep && rep->type == REDIS_REPLY_ARRAY)
        snprintf(h->last_rev, sizeof h->last_rev, "%s", rep->elements ? rep->element[0]->element[0]->str : "0-0");
    if (rep) freeReplyObject(rep);
    if (strcmp(h->last_rev, "$") == 0) snprintf(h->last_rev, sizeof h->last_rev, "0-0"); /* Redis down at start */
    pthread_create(&h->th, NULL, reg__tail_loop, h);
    return h;
}

void reg_watch_hub_end_all(void *arg) {
    reg_watch_hub_t *h = arg;
    pthread_mutex_lock(&h->mu);
    h->closing = 1;
    /* Abort, not finish: a watcher with events queued behind a full window would otherwise hold
     * the drain for the whole grace period. */
    for (size_t i = 0; i < h->nw; i++) cm_call_abort(h->w[i].call, CM_STATUS_UNAVAILABLE, "registry is shutting down");
    pthread_mutex_unlock(&h->mu);
}

void reg_watch_hub_stop(reg_watch_hub_t *h) {
    if (!h) return;
    __atomic_store_n(&h->stop, 1, __ATOMIC_RELEASE);
    pthread_join(h->th, NULL);
    cm_redis_free(h->tail);
    /* The server is gone by now, so every watcher's done() ran and the list is empty. */
    cm_free(h->w);
    pthread_mutex_destroy(&h->mu);
    cm_free(h);
}

int reg_watch_start(cm_call_t *call, const ProtobufCMessage *req_, reg_watch_hub_t *h) {
    const Iot__Registry__V1__WatchRequest *req = (const void *)req_;
    reg_entry_t *e;
    size_t n;
    char rev[40], err[256];
    if (reg_store_discover(h->store, req->service, cm_call_pb_allocator(call), &e, &n, rev, sizeof rev, err, sizeof err))
        return cm_call_fail(call, CM_STATUS_UNAVAILABLE, "registry storage unavailable: %s", err);
    Iot__Registry__V1__WatchEvent snap = IOT__REGISTRY__V1__WATCH_EVENT__INIT;
    snap.type = IOT__REGISTRY__V1__WATCH_EVENT__TYPE__SNAPSHOT;
    snap.service = req->service;
    snap.revision = rev;
    snap.instances = cm_call_alloc(call, (n ? n : 1) * sizeof *snap.instances);
    for (size_t i = 0; i < n; i++) {
        snap.instances[i] = cm_call_alloc(call, sizeof **snap.instances);
        reg_entry_to_pb(&e[i], snap.instances[i]);
    }
    snap.n_instances = n;
    cm_call_send(call, &snap.base);

    pthread_mutex_lock(&h->mu);
    /* Joining and the shutdown hook are decided under the same lock: a watcher either joins
     * before the hook ends them all, or sees `closing` here. */
    if (h->closing) {
        pthread_mutex_unlock(&h->mu);
        return cm_call_fail(call, CM_STATUS_UNAVAILABLE, "registry is shutting down");
    }
    if (strcmp(h->last_rev, "0-0") != 0 && reg__rev_cmp(rev, h->last_rev) < 0) {
        redisReply *gap = NULL;
        if (reg_store_events_between(h->store, rev, h->last_rev, &gap, err, sizeof err) == 0) {
            reg__deliver(h, gap, call, req->service);
            freeReplyObject(gap);
        } else {
            pthread_mutex_unlock(&h->mu);
            return cm_call_fail(call, CM_STATUS_UNAVAILABLE, "registry storage unavailable: %s", err);
        }
    }
    if (h->nw == h->capw) h->w = cm_realloc(h->w, (h->capw = h->capw ? h->capw * 2 : 16) * sizeof *h->w);
    cm_call_ref(call);
    h->w[h->nw].call = call;
    snprintf(h->w[h->nw].service, sizeof h->w[h->nw].service, "%s", req->service);
    /* After a catch-up the watcher has everything up to the tailer's position. */
    snprintf(h->w[h->nw].from_rev, sizeof h->w[h->nw].from_rev, "%s",
             reg__rev_cmp(rev, h->last_rev) < 0 ? h->last_rev : rev);
    h->nw++;
    cm_gauge_set(h->watchers_gauge, (double)h->nw);
    cm_call_set_user(call, h);
    pthread_mutex_unlock(&h->mu);
    return CM_PENDING;
}

void reg_watch_done(cm_call_t *call, int cancelled) {
    (void)cancelled;
    reg_watch_hub_t *h = cm_call_user(call);
    if (!h) return; /* failed before joining */
    pthread_mutex_lock(&h->mu);
    for (size_t i = 0; i < h->nw; i++)
        if (h->w[i].call == call) {
            h->w[i] = h->w[--h->nw];
            break;
        }
    cm_gauge_set(h->watchers_gauge, (double)h->nw);
    pthread_mutex_unlock(&h->mu);
    cm_call_unref(call);
}
