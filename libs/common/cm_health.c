/* grpc.health.v1.Health on every server: Check and Watch over a per-server status table.
 *
 * Watchers are calls kept open (CM_PENDING) with a reference each; a status change is sent to every
 * watcher of that service. A watcher that does not read (its send queue is full) is ended with
 * RESOURCE_EXHAUSTED rather than buffering without bound. On shutdown every status goes NOT_SERVING
 * and watch streams are ended with UNAVAILABLE, so they do not hold the drain for the whole grace
 * period. Lock order: health mutex, then a call's mutex (inside cm_call_send/finish). */
#include "cm_rpc_internal.h"
#include "cm_err.h"

#include <string.h>

#include "grpc/health/v1/health.pb-c.h"

typedef struct cm__health_entry_s {
    char *service;
    int status;
} cm__health_entry_t;

typedef struct cm__watcher_s {
    cm_call_t *call;
    char *service;
} cm__watcher_t;

struct cm__health_s {
    pthread_mutex_t mu;
    cm__health_entry_t *entries;
    size_t n, cap;
    cm__watcher_t *watchers;
    size_t nw, capw;
    int shutting_down;
    cm_service_t svc;
};

/* Caller holds h->mu. Returns the status, or -1 for an unknown service. */
static int cm__health_lookup(cm__health_t *h, const char *service) {
    for (size_t i = 0; i < h->n; i++)
        if (strcmp(h->entries[i].service, service) == 0) return h->entries[i].status;
    return -1;
}

static int cm__health_send(cm__health_t *h, size_t wi, int status) {
    (void)h;
    Grpc__Health__V1__HealthCheckResponse resp = GRPC__HEALTH__V1__HEALTH_CHECK_RESPONSE__INIT;
    resp.status = (Grpc__Health__V1__HealthCheckResponse__ServingStatus)status;
    int rc = cm_call_send(h->watchers[wi].call, &resp.base);
    if (rc == CM_EFULL)
        cm_call_abort(h->watchers[wi].call, CM_STATUS_RESOURCE_EXHAUSTED,
                      "health watcher is not reading its stream; reconnect to resume");
    return rc;
}

void cm_server_set_health(cm_server_t *srv, const char *service, int status) {
    cm__health_t *h = cm__server_health(srv);
    pthread_mutex_lock(&h->mu);
    if (h->shutting_down && status == CM_HEALTH_SERVING) {
        /* A server that is draining never advertises SERVING again. */
        pthread_mutex_unlock(&h->mu);
        return;
    }
    int old = cm__health_lookup(h, service);
    if (old < 0) {
        if (h->n == h->cap) {
            h->cap = h->cap ? h->cap * 2 : 8;
            h->entries = cm_realloc(h->entries, h->cap * sizeof *h->entries);
        }
        h->entries[h->n].service = cm_strdup(service);
        h->entries[h->n].status = status;
        h->n++;
    } else {
        for (size_t i = 0; i < h->n; i++)
            if (strcmp(h->entries[i].service, service) == 0) h->entries[i].status = status;
    }
    if (old != status)
        for (size_t i = 0; i < h->nw; i++)
            if (strcmp(h->watchers[i].service, service) == 0) cm__health_send(h, i, status);
    pthread_mutex_unlock(&h->mu);
}

int cm_server_get_health(cm_server_t *srv, const char *service) {
    cm__health_t *h = cm__server_health(srv);
    pthread_mutex_lock(&h->mu);
    int s = cm__health_lookup(h, service);
    pthread_mutex_unlock(&h->mu);
    return s < 0 ? 0 : s;
}

static int cm__health_check(cm_call_t *call, const ProtobufCMessage *req_, ProtobufCMessage *resp_) {
    cm__health_t *h = cm_call_service_ctx(call);
    const Grpc__Health__V1__HealthCheckRequest *req = (const void *)req_;
    Grpc__Health__V1__HealthCheckResponse *resp = (void *)resp_;
    pthread_mutex_lock(&h->mu);
    int s = cm__health_lookup(h, req->service);
    pthread_mutex_unlock(&h->mu);
    if (s < 0) return cm_call_fail(call, CM_STATUS_NOT_FOUND, "unknown service \"%s\"", req->service);
    resp->status = (Grpc__Health__V1__HealthCheckResponse__ServingStatus)s;
    return CM_STATUS_OK;
}

static int cm__health_watch(cm_call_t *call, const ProtobufCMessage *req_) {
    cm__health_t *h = cm_call_service_ctx(call);
    const Grpc__Health__V1__HealthCheckRequest *req = (const void *)req_;
    pthread_mutex_lock(&h->mu);
    int s = cm__health_lookup(h, req->service);
    Grpc__Health__V1__HealthCheckResponse resp = GRPC__HEALTH__V1__HEALTH_CHECK_RESPONSE__INIT;
    resp.status = s < 0 ? GRPC__HEALTH__V1__HEALTH_CHECK_RESPONSE__SERVING_STATUS__SERVICE_UNKNOWN
                        : (Grpc__Health__V1__HealthCheckResponse__ServingStatus)s;
    cm_call_send(call, &resp.base);
    if (h->shutting_down) {
        pthread_mutex_unlock(&h->mu);
        return cm_call_fail(call, CM_STATUS_UNAVAILABLE, "server is shutting down");
    }
    if (h->nw == h->capw) {
        h->capw = h->capw ? h->capw * 2 : 8;
        h->watchers = cm_realloc(h->watchers, h->capw * sizeof *h->watchers);
    }
    cm_call_ref(call);
    h->watchers[h->nw].call = call;
    h->watchers[h->nw].service = cm_strdup(req->service);
    h->nw++;
    cm_call_set_user(call, h);
    pthread_mutex_unlock(&h->mu);
    return CM_PENDING;
}

static void cm__health_watch_done(cm_call_t *call, int cancelled) {
    (void)cancelled;
    cm__health_t *h = cm_call_user(call);
    if (!h) return; /* never registered (shutting down) */
    pthread_mutex_lock(&h->mu);
    for (size_t i = 0; i < h->nw; i++) {
        if (h->watchers[i].call != call) continue;
        cm_free(h->watchers[i].service);
        h->watchers[i] = h->watchers[--h->nw];
        break;
    }
    pthread_mutex_unlock(&h->mu);
    cm_call_unref(call);
}

static const cm_method_t cm__health_methods[] = {
    {.name = "Check", .kind = CM_RPC_UNARY, .unary = cm__health_check},
    {.name = "Watch", .kind = CM_RPC_SERVER_STREAM, .start = cm__health_watch, .done = cm__health_watch_done},
};

void cm__health_init(cm_server_t *srv) {
    cm__health_t *h = cm_calloc(1, sizeof *h);
    pthread_mutex_init(&h->mu, NULL);
    h->svc.desc = &grpc__health__v1__health__descriptor;
    h->svc.methods = cm__health_methods;
    h->svc.n_methods = sizeof cm__health_methods / sizeof cm__health_methods[0];
    h->svc.ctx = h;
    cm__server_set_health_state(srv, h);
}

const cm_service_t *cm__health_service(cm_server_t *srv) {
    return &cm__server_health(srv)->svc;
}

void cm__health_shutdown(cm_server_t *srv) {
    cm__health_t *h = cm__server_health(srv);
    pthread_mutex_lock(&h->mu);
    h->shutting_down = 1;
    for (size_t i = 0; i < h->n; i++) h->entries[i].status = CM_HEALTH_NOT_SERVING;
    for (size_t i = 0; i < h->nw; i++) {
        /* A watcher that does not read was just aborted by the send; the others get the
         * update and then the end of the stream. */
        if (cm__health_send(h, i, CM_HEALTH_NOT_SERVING) == 0)
            cm_call_finish(h->watchers[i].call, CM_STATUS_UNAVAILABLE, "server is shutting down");
    }
    pthread_mutex_unlock(&h->mu);
}

void cm__health_free(cm_server_t *srv) {
    cm__health_t *h = cm__server_health(srv);
    if (!h) return;
    for (size_t i = 0; i < h->n; i++) cm_free(h->entries[i].service);
    /* Watchers are gone: every call was finalised (done ran) before the server could be freed. */
    cm_free(h->entries);
    cm_free(h->watchers);
    pthread_mutex_destroy(&h->mu);
    cm_free(h);
    cm__server_set_health_state(srv, NULL);
}
