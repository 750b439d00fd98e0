/* Discovery-backed channels (Watch + balancer + channel cache) and self-registration. */
#include "cm_discovery.h"

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "cm_alloc.h"
#include "cm_err.h"
#include "cm_log.h"
#include "cm_loop.h"
#include "cm_time.h"
#include "iot/registry/v1/registry.pb-c.h"

#define CM__WATCH_TIMEOUT_MS (24LL * 3600 * 1000) /* a watch is long-lived; reconnects refresh it */

typedef struct cm__dinst_s {
    char id[132];
    char target[300];
    char zone[65];
    int weight;
    int passing;
} cm__dinst_t;

typedef struct cm__dchan_s {
    char target[300];
    cm_channel_t *ch;
    int busy;
} cm__dchan_t;

struct cm_disco_s {
    char *registry, *service, *dns_target, *zone;
    cm_lb_t *lb;
    cm_channel_t *dns_ch;
    cm_channel_t *reg_ch;
    pthread_t th;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int stop;
    cm_stream_t *stream; /* the watch in progress, cancelled by cm_disco_free */
    cm__dinst_t *inst;
    size_t n_inst, cap_inst;
    cm__dchan_t *chans;
    size_t n_chans, cap_chans;
    size_t passing;
};

static void cm__target_of(const Iot__Registry__V1__Instance *in, char *out, size_t cap) {
    if (strchr(in->address, ':'))
        snprintf(out, cap, "[%s]:%d", in->address, in->port);
    else
        snprintf(out, cap, "%s:%d", in->address, in->port);
}

/* Recomputes the balancer's set from the instance table. Caller holds mu. */
static void cm__disco_rebuild(cm_disco_t *d) {
    cm_lb_endpoint_t *eps = cm_calloc(d->n_inst ? d->n_inst : 1, sizeof *eps);
    size_t n = 0, in_zone = 0;
    for (size_t i = 0; i < d->n_inst; i++)
        if (d->inst[i].passing && *d->zone && strcmp(d->inst[i].zone, d->zone) == 0) in_zone++;
    for (size_t i = 0; i < d->n_inst; i++) {
        cm__dinst_t *x = &d->inst[i];
        /* Stay in the preferred zone while it has a passing instance; else use every zone. */
        if (!x->passing || (in_zone && strcmp(x->zone, d->zone) != 0)) continue;
        snprintf(eps[n].id, sizeof eps[n].id, "%s", x->id);
        snprintf(eps[n].target, sizeof eps[n].target, "%s", x->target);
        eps[n].weight = x->weight;
        n++;
    }
    cm_lb_set(d->lb, eps, n);
    d->passing = n;
    cm_free(eps);
    /* Channels to instances that are gone, and not in use, are closed. */
    for (size_t i = 0; i < d->n_chans;) {
        int known = 0;
        for (size_t k = 0; k < d->n_inst && !known; k++) known = strcmp(d->inst[k].target, d->chans[i].target) == 0;
        if (!known && !d->chans[i].busy) {
            cm_channel_free(d->chans[i].ch);
            d->chans[i] = d->chans[--d->n_chans];
        } else {
            i++;
        }
    }
    pthread_cond_broadcast(&d->cv);
}

static void cm__disco_upsert(cm_disco_t *d, const Iot__Registry__V1__RegisteredInstance *ri) {
    const Iot__Registry__V1__Instance *in = ri->instance;
    if (!in) return;
    cm__dinst_t *x = NULL;
    for (size_t i = 0; i < d->n_inst && !x; i++)
        if (strcmp(d->inst[i].id, in->instance_id) == 0) x = &d->inst[i];
    if (!x) {
        if (d->n_inst == d->cap_inst) d->inst = cm_realloc(d->inst, (d->cap_inst = d->cap_inst ? d->cap_inst * 2 : 8) * sizeof *d->inst);
        x = &d->inst[d->n_inst++];
    }
    snprintf(x->id, sizeof x->id, "%s", in->instance_id);
    cm__target_of(in, x->target, sizeof x->target);
    snprintf(x->zone, sizeof x->zone, "%s", in->zone);
    x->weight = in->weight > 0 ? in->weight : 100;
    x->passing = ri->status == IOT__REGISTRY__V1__HEALTH_STATUS__HEALTH_STATUS_PASSING;
}

static void cm__disco_apply(cm_disco_t *d, const Iot__Registry__V1__WatchEvent *ev) {
    pthread_mutex_lock(&d->mu);
    switch (ev->type) {
    case IOT__REGISTRY__V1__WATCH_EVENT__TYPE__SNAPSHOT:
        d->n_inst = 0;
        for (size_t i = 0; i < ev->n_instances; i++) cm__disco_upsert(d, ev->instances[i]);
        break;
    case IOT__REGISTRY__V1__WATCH_EVENT__TYPE__REMOVED:
        for (size_t i = 0; i < d->n_inst; i++)
            if (strcmp(d->inst[i].id, ev->instance_id) == 0) {
                d->inst[i] = d->inst[--d->n_inst];
                break;
            }
        break;
    default:
        for (size_t i = 0; i < ev->n_instances; i++) cm__disco_upsert(d, ev->instances[i]);
    }
    cm__disco_rebuild(d);
    pthread_mutex_unlock(&d->mu);
}

static void *cm__disco_loop(void *arg) {
    cm_disco_t *d = arg;
    int backoff_ms = 100;
    for (;;) {
        Iot__Registry__V1__WatchRequest req = IOT__REGISTRY__V1__WATCH_REQUEST__INIT;
        req.service = d->service;
        cm_call_opts_t o = {.timeout_ms = CM__WATCH_TIMEOUT_MS, .wait_for_ready = 0};
        /* Opening can wait on the connection: never with the lock held, or every pick would. */
        cm_stream_t *s = cm_stream_open(d->reg_ch, "/iot.registry.v1.Registry/Watch", &o);
        pthread_mutex_lock(&d->mu);
        d->stream = s;
        if (d->stop) cm_stream_cancel(s); /* stopped while we were opening */
        pthread_mutex_unlock(&d->mu);
        cm_stream_send(s, &req.base);
        cm_stream_close_send(s);
        Iot__Registry__V1__WatchEvent *ev;
        while (cm_stream_recv(s, &iot__registry__v1__watch_event__descriptor, (ProtobufCMessage **)&ev) == 1) {
            cm__disco_apply(d, ev);
            protobuf_c_message_free_unpacked(&ev->base, NULL);
            backoff_ms = 100;
        }
        pthread_mutex_lock(&d->mu);
        d->stream = NULL;
        pthread_mutex_unlock(&d->mu);
        int code = cm_stream_finish(s, NULL);
        pthread_mutex_lock(&d->mu);
        if (d->stop) {
            pthread_mutex_unlock(&d->mu);
            break;
        }
        /* Keep serving from what we know; reconnect with backoff for a fresh snapshot. */
        cm_log_kv(CM_LOG_DEBUG, "discovery watch ended, reconnecting", "service", d->service, "code",
                  cm_status_name(code), NULL);
        struct timespec until;
        cm_abstime_in(&until, backoff_ms);
        while (!d->stop && pthread_cond_timedwait(&d->cv, &d->mu, &until) == 0) {
        }
        backoff_ms = backoff_ms < 2000 ? backoff_ms * 2 : 2000;
        pthread_mutex_unlock(&d->mu);
    }
    return NULL;
}

cm_disco_t *cm_disco_new(const cm_disco_opts_t *o, int *err) {
    int dns = !o->registry || !*o->registry;
    if ((dns && (!o->dns_target || !*o->dns_target)) || (!dns && (!o->service || !*o->service))) {
        if (err) *err = CM_EINVAL;
        return NULL;
    }
    cm_disco_t *d = cm_calloc(1, sizeof *d);
    pthread_mutex_init(&d->mu, NULL);
    cm_cond_init_monotonic(&d->cv);
    d->zone = cm_strdup(o->prefer_zone ? o->prefer_zone : "");
    if (dns) {
        d->dns_target = cm_strdup(o->dns_target);
        d->dns_ch = cm_channel_new(o->dns_target, NULL, err);
    } else {
        d->registry = cm_strdup(o->registry);
        d->service = cm_strdup(o->service);
        d->lb = cm_lb_new(o->policy);
        d->reg_ch = cm_channel_new(o->registry, NULL, err);
        if (!d->reg_ch) {
            cm_disco_free(d);
            return NULL;
        }
        pthread_create(&d->th, NULL, cm__disco_loop, d);
    }
    if (dns && !d->dns_ch) {
        cm_disco_free(d);
        return NULL;
    }
    if (err) *err = 0;
    return d;
}

void cm_disco_free(cm_disco_t *d) {
    if (!d) return;
    if (d->reg_ch) {
        pthread_mutex_lock(&d->mu);
        d->stop = 1;
        if (d->stream) cm_stream_cancel(d->stream);
        pthread_cond_broadcast(&d->cv);
        pthread_mutex_unlock(&d->mu);
        pthread_join(d->th, NULL);
    }
    for (size_t i = 0; i < d->n_chans; i++) cm_channel_free(d->chans[i].ch);
    cm_channel_free(d->dns_ch);
    cm_channel_free(d->reg_ch);
    cm_lb_free(d->lb);
    cm_free(d->chans);
    cm_free(d->inst);
    cm_free(d->registry);
    cm_free(d->service);
    cm_free(d->dns_target);
    cm_free(d->zone);
    pthread_mutex_destroy(&d->mu);
    pthread_cond_destroy(&d->cv);
    cm_free(d);
}

cm_channel_t *cm_disco_pick(cm_disco_t *d, const char *key, size_t keylen, cm_lb_pick_t *pick) {
    if (d->dns_ch) {
        snprintf(pick->id, sizeof pick->id, "dns");
        snprintf(pick->target, sizeof pick->target, "%s", d->dns_target);
        return d->dns_ch;
    }
    if (cm_lb_pick(d->lb, key, keylen, pick) != 0) return NULL;
    pthread_mutex_lock(&d->mu);
    cm__dchan_t *c = NULL;
    for (size_t i = 0; i < d->n_chans && !c; i++)
        if (strcmp(d->chans[i].target, pick->target) == 0) c = &d->chans[i];
    if (!c) {
        if (d->n_chans == d->cap_chans)
            d->chans = cm_realloc(d->chans, (d->cap_chans = d->cap_chans ? d->cap_chans * 2 : 8) * sizeof *d->chans);
        c = &d->chans[d->n_chans++];
        snprintf(c->target, sizeof c->target, "%s", pick->target);
        c->ch = cm_channel_new(pick->target, NULL, NULL);
        c->busy = 0;
    }
    c->busy++;
    cm_channel_t *ch = c->ch;
    pthread_mutex_unlock(&d->mu);
    return ch;
}

void cm_disco_done(cm_disco_t *d, const cm_lb_pick_t *pick) {
    if (d->dns_ch) return;
    cm_lb_done(d->lb, pick);
    pthread_mutex_lock(&d->mu);
    for (size_t i = 0; i < d->n_chans; i++)
        if (strcmp(d->chans[i].target, pick->target) == 0) {
            d->chans[i].busy--;
            break;
        }
    pthread_mutex_unlock(&d->mu);
}

size_t cm_disco_instances(cm_disco_t *d) {
    pthread_mutex_lock(&d->mu);
    size_t n = d->passing;
    pthread_mutex_unlock(&d->mu);
    return n;
}

int cm_disco_wait(cm_disco_t *d, size_t n, int timeout_ms) {
    struct timespec until;
    cm_abstime_in(&until, timeout_ms);
    pthread_mutex_lock(&d->mu);
    int rc = 0;
    while (d->passing < n && rc == 0)
        if (pthread_cond_timedwait(&d->cv, &d->mu, &until) != 0) rc = d->passing >= n ? 0 : CM_ETIMEOUT;
    pthread_mutex_unlock(&d->mu);
    return rc;
}

/* ---- self-registration ----------------------------------------------------------------- */

struct cm_selfreg_s {
    cm_channel_t *ch;
    char service[64], health[200], id[132], address[256], zone[65], cluster[65], version[65];
    int port, ttl_s;
    char lease[40]; /* touched only by the loop thread, and by stop after the loop ended */
    cm_loop_t *loop;
};

/* Caller holds no lock; only the heartbeat thread and stop touch lease. */
static int cm__selfreg_register(cm_selfreg_t *r) {
    Iot__Registry__V1__Check chk = IOT__REGISTRY__V1__CHECK__INIT;
    chk.kind = IOT__REGISTRY__V1__CHECK__KIND__GRPC_HEALTH;
    chk.target = r->health;
    chk.interval_ms = 2000;
    chk.timeout_ms = 1000;
    Iot__Registry__V1__Instance in = IOT__REGISTRY__V1__INSTANCE__INIT;
    in.service = r->service;
    in.instance_id = r->id;
    in.address = r->address;
    in.port = r->port;
    in.zone = r->zone;
    in.cluster = r->cluster;
    in.version = r->version;
    in.check = &chk;
    Iot__Registry__V1__RegisterRequest req = IOT__REGISTRY__V1__REGISTER_REQUEST__INIT;
    req.instance = &in;
    req.ttl_seconds = r->ttl_s;
    Iot__Registry__V1__RegisterResponse *resp = NULL;
    cm_rpc_status_t st = {0};
    cm_call_opts_t o = {.timeout_ms = 3000, .idempotent = 1};
    int code = cm_channel_unary(r->ch, "/iot.registry.v1.Registry/RegisterInstance", &req.base,
                                &iot__registry__v1__register_response__descriptor, (ProtobufCMessage **)&resp, &o, &st);
    if (code == CM_STATUS_OK) {
        snprintf(r->lease, sizeof r->lease, "%s", resp->lease_id);
        protobuf_c_message_free_unpacked(&resp->base, NULL);
        cm_log_kv(CM_LOG_INFO, "registered with the registry", "service", r->service, "instance", r->id, NULL);
    } else {
        cm_log_kv(CM_LOG_WARN, "registration failed, will retry", "code", cm_status_name(code), "error", st.message, NULL);
    }
    cm_rpc_status_clear(&st);
    return code;
}

/* One round: register, or heartbeat (registering again if the registry lost the lease). Returns
 * the wait before the next round: a third of the TTL leaves two more tries before the lease
 * lapses; after an error, a second. */
static int64_t cm__selfreg_round(void *arg) {
    cm_selfreg_t *r = arg;
    int code;
    if (!r->lease[0]) {
        code = cm__selfreg_register(r);
    } else {
        Iot__Registry__V1__HeartbeatRequest req = IOT__REGISTRY__V1__HEARTBEAT_REQUEST__INIT;
        req.lease_id = r->lease;
        ProtobufCMessage *resp = NULL;
        cm_call_opts_t o = {.timeout_ms = 3000, .idempotent = 1};
        code = cm_channel_unary(r->ch, "/iot.registry.v1.Registry/Heartbeat", &req.base,
                                &iot__registry__v1__heartbeat_response__descriptor, &resp, &o, NULL);
        if (resp) protobuf_c_message_free_unpacked(resp, NULL);
        if (code == CM_STATUS_NOT_FOUND) {
            r->lease[0] = '\0';
            code = cm__selfreg_register(r);
        }
    }
    return code == CM_STATUS_OK ? (int64_t)r->ttl_s * 1000 / 3 : 1000;
}

cm_selfreg_t *cm_selfreg_start(const cm_selfreg_opts_t *o) {
    cm_selfreg_t *r = cm_calloc(1, sizeof *r);
    snprintf(r->service, sizeof r->service, "%s", o->service);
    snprintf(r->health, sizeof r->health, "%s", o->health_name ? o->health_name : "");
    if (o->address && *o->address) {
        snprintf(r->address, sizeof r->address, "%s", o->address);
    } else if (gethostname(r->address, sizeof r->address) != 0) {
        snprintf(r->address, sizeof r->address, "localhost");
    }
    r->port = o->port;
    if (o->instance_id && *o->instance_id)
        snprintf(r->id, sizeof r->id, "%s", o->instance_id);
    else
        snprintf(r->id, sizeof r->id, "%.100s-%d", r->address, r->port);
    snprintf(r->zone, sizeof r->zone, "%s", o->zone ? o->zone : "");
    snprintf(r->cluster, sizeof r->cluster, "%s", o->cluster ? o->cluster : "");
    snprintf(r->version, sizeof r->version, "%s", o->version ? o->version : "");
    r->ttl_s = o->ttl_s > 0 ? o->ttl_s : 15;
    r->ch = cm_channel_new(o->registry, NULL, NULL);
    r->loop = cm_loop_start(cm__selfreg_round, r, 0);
    return r;
}

void cm_selfreg_stop(cm_selfreg_t *r) {
    if (!r) return;
    cm_loop_stop(r->loop);
    if (r->lease[0]) {
        Iot__Registry__V1__DeregisterRequest req = IOT__REGISTRY__V1__DEREGISTER_REQUEST__INIT;
        req.lease_id = r->lease;
        ProtobufCMessage *resp = NULL;
        cm_call_opts_t o = {.timeout_ms = 2000};
        int code = cm_channel_unary(r->ch, "/iot.registry.v1.Registry/DeregisterInstance", &req.base,
                                    &iot__registry__v1__deregister_response__descriptor, &resp, &o, NULL);
        if (resp) protobuf_c_message_free_unpacked(resp, NULL);
        cm_log_kv(CM_LOG_INFO, "deregistered from the registry", "code", cm_status_name(code), NULL);
    }
    cm_channel_free(r->ch);
    cm_free(r);
}
