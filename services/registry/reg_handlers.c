/* iot.registry.v1.Registry handlers: validation, then one store operation each. */
#include "reg_handlers.h"

#include <ctype.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cm_alloc.h"
#include "cm_err.h"
#include "cm_log.h"

#define REG_TTL_DEFAULT_S 30
#define REG_TTL_MAX_S 3600
#define REG_WEIGHT_DEFAULT 100
#define REG_WEIGHT_MAX 1000
#define REG_META_MAX 32

/* 1..max characters: an ASCII letter or digit first, then letters, digits or `extra`. */
static int reg__name_ok(const char *s, size_t max, const char *extra) {
    size_t n = strlen(s);
    if (n == 0 || n > max || !isalnum((unsigned char)s[0])) return 0;
    for (size_t i = 1; i < n; i++) {
        unsigned char c = (unsigned char)s[i];
        if (!isalnum(c) && !strchr(extra, c)) return 0;
    }
    return 1;
}

static int reg__lower_or_digit(int c) { return islower(c) || isdigit(c); }

static int reg__service_ok(const char *s) {
    size_t n = strlen(s);
    if (n == 0 || n > 63 || !reg__lower_or_digit((unsigned char)s[0])) return 0;
    for (size_t i = 1; i < n; i++) {
        unsigned char c = (unsigned char)s[i];
        if (!reg__lower_or_digit(c) && c != '.' && c != '_' && c != '-') return 0;
    }
    return 1;
}

static int reg__id_ok(const char *s) { return reg__name_ok(s, 128, "._:-"); }

/* Host names and IP literals (v6 included): letters, digits, '.', '-', ':', '%' for zones. */
static int reg__address_ok(const char *s) { return reg__name_ok(s, 253, ".-:%"); }

static int reg__text_ok(const char *s, size_t max) {
    size_t n = strlen(s);
    if (n > max) return 0;
    for (size_t i = 0; i < n; i++)
        if ((unsigned char)s[i] < 0x20 || s[i] == 0x7f) return 0;
    return 1;
}

static reg_store_t *reg__store(cm_call_t *call) { return ((reg_ctx_t *)cm_call_service_ctx(call))->store; }

/* Storage failures are the caller's to retry: UNAVAILABLE with the reason. */
static int reg__store_failed(cm_call_t *call, const char *err) {
    cm_log_kv(CM_LOG_ERROR, "registry storage failed", "error", err, NULL);
    return cm_call_fail(call, CM_STATUS_UNAVAILABLE, "registry storage unavailable: %s", err);
}

/* Validates a check and writes its defaults into it, so the stored registration says what runs. */
static int reg__validate_check_or_fail(cm_call_t *call, Iot__Registry__V1__Check *c) {
    switch (c->kind) {
    case IOT__REGISTRY__V1__CHECK__KIND__GRPC_HEALTH:
        if (!reg__text_ok(c->target, 200))
            return cm_call_fail(call, CM_STATUS_INVALID_ARGUMENT, "instance.check.target: a gRPC service name");
        break;
    case IOT__REGISTRY__V1__CHECK__KIND__HTTP:
        if (!*c->target) c->target = (char *)"/healthz";
        if (c->target[0] != '/' || !reg__text_ok(c->target, 200) || strchr(c->target, ' '))
            return cm_call_fail(call, CM_STATUS_INVALID_ARGUMENT,
                                "instance.check.target: an HTTP path starting with '/', without spaces");
        break;
    case IOT__REGISTRY__V1__CHECK__KIND__TCP:
        break;
    default:
        return cm_call_fail(call, CM_STATUS_INVALID_ARGUMENT, "instance.check.kind: GRPC_HEALTH, HTTP or TCP");
    }
    if (!c->interval_ms) c->interval_ms = 10000;
    if (c->interval_ms < 100 || c->interval_ms > 600000)
        return cm_call_fail(call, CM_STATUS_INVALID_ARGUMENT, "instance.check.interval_ms: %d is not in 100..600000",
                            c->interval_ms);
    if (!c->timeout_ms) c->timeout_ms = c->interval_ms < 2000 ? c->interval_ms : 2000;
    if (c->timeout_ms < 50 || c->timeout_ms > c->interval_ms)
        return cm_call_fail(call, CM_STATUS_INVALID_ARGUMENT,
                            "instance.check.timeout_ms: %d is not in 50..interval_ms (%d)", c->timeout_ms, c->interval_ms);
    if (!c->failures_before_critical) c->failures_before_critical = 3;
    if (!c->successes_before_passing) c->successes_before_passing = 1;
    if (c->failures_before_critical < 1 || c->failures_before_critical > 100 || c->successes_before_passing < 1 ||
        c->successes_before_passing > 100)
        return cm_call_fail(call, CM_STATUS_INVALID_ARGUMENT,
                            "instance.check.failures_before_critical and successes_before_passing: 1..100");
    return 0;
}

/* Validates an instance for Register; fills defaults. Returns 0 or an INVALID_ARGUMENT already
 * set on the call (the _or_fail convention: the caller just returns the code). */
static int reg__validate_instance_or_fail(cm_call_t *call, Iot__Registry__V1__Instance *in) {
    if (!in) return cm_call_fail(call, CM_STATUS_INVALID_ARGUMENT, "instance: required");
    if (!reg__service_ok(in->service))
        return cm_call_fail(call, CM_STATUS_INVALID_ARGUMENT,
                            "instance.service: 1-63 characters of a-z, 0-9, '.', '_', '-', starting with a letter or digit");
    if (!reg__id_ok(in->instance_id))
        return cm_call_fail(call, CM_STATUS_INVALID_ARGUMENT,
                            "instance.instance_id: 1-128 characters of A-Z, a-z, 0-9, '.', '_', ':', '-', starting with a letter or digit");
    if (!reg__address_ok(in->address))
        return cm_call_fail(call, CM_STATUS_INVALID_ARGUMENT, "instance.address: a host name or IP address is required");
    if (in->port < 1 || in->port > 65535)
        return cm_call_fail(call, CM_STATUS_INVALID_ARGUMENT, "instance.port: %d is not in 1..65535", in->port);
    if (!reg__text_ok(in->version, 64))
        return cm_call_fail(call, CM_STATUS_INVALID_ARGUMENT, "instance.version: up to 64 printable characters");
    if (!reg__text_ok(in->zone, 64) || !reg__text_ok(in->cluster, 64))
        return cm_call_fail(call, CM_STATUS_INVALID_ARGUMENT, "instance.zone/cluster: up to 64 printable characters");
    if (in->weight < 0 || in->weight > REG_WEIGHT_MAX)
        return cm_call_fail(call, CM_STATUS_INVALID_ARGUMENT, "instance.weight: %d is not in 0..%d", in->weight,
                            REG_WEIGHT_MAX);
    if (in->weight == 0) in->weight = REG_WEIGHT_DEFAULT;
    if (in->n_metadata > REG_META_MAX)
        return cm_call_fail(call, CM_STATUS_INVALID_ARGUMENT, "instance.metadata: at most %d entries", REG_META_MAX);
    for (size_t i = 0; i < in->n_metadata; i++)
        if (!*in->metadata[i]->key || !reg__text_ok(in->metadata[i]->key, 63) || !reg__text_ok(in->metadata[i]->value, 512))
            return cm_call_fail(call, CM_STATUS_INVALID_ARGUMENT,
                                "instance.metadata: keys 1-63 and values up to 512 printable characters");
    return in->check ? reg__validate_check_or_fail(call, in->check) : 0;
}

static int reg_register_check(cm_call_t *call, ProtobufCMessage *req_) {
    const Iot__Registry__V1__RegisterRequest *req = (const void *)req_;
    int rc = reg__validate_instance_or_fail(call, req->instance);
    if (rc) return rc;
    int ttl = req->ttl_seconds ? req->ttl_seconds : REG_TTL_DEFAULT_S;
    if (ttl < 1 || ttl > REG_TTL_MAX_S)
        return cm_call_fail(call, CM_STATUS_INVALID_ARGUMENT, "ttl_seconds: %d is not in 1..%d", req->ttl_seconds,
                            REG_TTL_MAX_S);
    return 0;
}

static int reg_register(cm_call_t *call, const ProtobufCMessage *req_, ProtobufCMessage *resp_) {
    const Iot__Registry__V1__RegisterRequest *req = (const void *)req_;
    Iot__Registry__V1__RegisterResponse *resp = (void *)resp_;
    int rc = reg_register_check(call, (ProtobufCMessage *)req_);
    if (rc) return rc;
    int ttl = req->ttl_seconds ? req->ttl_seconds : REG_TTL_DEFAULT_S;
    char lease[40], err[256];
    int64_t expires;
    if (reg_store_register(reg__store(call), req->instance, (int64_t)ttl * 1000, lease, sizeof lease, &expires, err,
                           sizeof err))
        return reg__store_failed(call, err);
    resp->lease_id = cm_call_strdup(call, lease);
    resp->ttl_seconds = ttl;
    return CM_STATUS_OK;
}

static int reg__lease_ok(const char *s) {
    size_t n = strlen(s);
    if (n != 32) return 0;
    for (size_t i = 0; i < n; i++)
        if (!isxdigit((unsigned char)s[i])) return 0;
    return 1;
}

static int reg_heartbeat_check(cm_call_t *call, ProtobufCMessage *req_) {
    const Iot__Registry__V1__HeartbeatRequest *req = (const void *)req_;
    if (!reg__lease_ok(req->lease_id))
        return cm_call_fail(call, CM_STATUS_INVALID_ARGUMENT, "lease_id: 32 hex characters from Register");
    return 0;
}

static int reg_heartbeat(cm_call_t *call, const ProtobufCMessage *req_, ProtobufCMessage *resp_) {
    const Iot__Registry__V1__HeartbeatRequest *req = (const void *)req_;
    Iot__Registry__V1__HeartbeatResponse *resp = (void *)resp_;
    int rc = reg_heartbeat_check(call, (ProtobufCMessage *)req_);
    if (rc) return rc;
    char err[256];
    int64_t ttl_ms, expires;
    rc = reg_store_heartbeat(reg__store(call), req->lease_id, &ttl_ms, &expires, err, sizeof err);
    if (rc == REG_NOT_FOUND)
        return cm_call_fail(call, CM_STATUS_NOT_FOUND, "lease %s is unknown or expired: register again", req->lease_id);
    if (rc) return reg__store_failed(call, err);
    resp->ttl_seconds = (int32_t)(ttl_ms / 1000);
    resp->lease_expires_unix_ms = expires;
    return CM_STATUS_OK;
}

static int reg_deregister_check(cm_call_t *call, ProtobufCMessage *req_) {
    const Iot__Registry__V1__DeregisterRequest *req = (const void *)req_;
    if (*req->lease_id) {
        if (!reg__lease_ok(req->lease_id))
            return cm_call_fail(call, CM_STATUS_INVALID_ARGUMENT, "lease_id: 32 hex characters from Register");
    } else if (!reg__service_ok(req->service) || !reg__id_ok(req->instance_id)) {
        return cm_call_fail(call, CM_STATUS_INVALID_ARGUMENT, "give lease_id, or a valid service and instance_id");
    }
    return 0;
}

static int reg_deregister(cm_call_t *call, const ProtobufCMessage *req_, ProtobufCMessage *resp_) {
    (void)resp_;
    const Iot__Registry__V1__DeregisterRequest *req = (const void *)req_;
    int rc = reg_deregister_check(call, (ProtobufCMessage *)req_);
    if (rc) return rc;
    char err[256];
    rc = reg_store_deregister(reg__store(call), req->lease_id, req->service, req->instance_id, err, sizeof err);
    if (rc == REG_NOT_FOUND) return cm_call_fail(call, CM_STATUS_NOT_FOUND, "no such registered instance");
    if (rc) return reg__store_failed(call, err);
    return CM_STATUS_OK;
}

typedef struct reg__sort_ctx_s {
    const char *zone, *cluster;
} reg__sort_ctx_t;

static _Thread_local reg__sort_ctx_t reg__sort;

/* Preferred zone first, then preferred cluster, then by instance id (stable answers). */
static int reg__cmp(const void *a_, const void *b_) {
    const reg_entry_t *a = a_, *b = b_;
    int za = *reg__sort.zone && strcmp(a->inst->zone, reg__sort.zone) == 0;
    int zb = *reg__sort.zone && strcmp(b->inst->zone, reg__sort.zone) == 0;
    if (za != zb) return zb - za;
    int ca = *reg__sort.cluster && strcmp(a->inst->cluster, reg__sort.cluster) == 0;
    int cb = *reg__sort.cluster && strcmp(b->inst->cluster, reg__sort.cluster) == 0;
    if (ca != cb) return cb - ca;
    return strcmp(a->inst->instance_id, b->inst->instance_id);
}

static int reg_discover_check(cm_call_t *call, ProtobufCMessage *req_) {
    const Iot__Registry__V1__DiscoverRequest *req = (const void *)req_;
    if (!reg__service_ok(req->service))
        return cm_call_fail(call, CM_STATUS_INVALID_ARGUMENT, "service: 1-63 characters of a-z, 0-9, '.', '_', '-'");
    return 0;
}

static int reg_discover(cm_call_t *call, const ProtobufCMessage *req_, ProtobufCMessage *resp_) {
    const Iot__Registry__V1__DiscoverRequest *req = (const void *)req_;
    Iot__Registry__V1__DiscoverResponse *resp = (void *)resp_;
    int rc = reg_discover_check(call, (ProtobufCMessage *)req_);
    if (rc) return rc;
    /* Entries and their decoded instances live in the call's memory, like the response. */
    reg_entry_t *e;
    size_t n;
    char err[256];
    if (reg_store_discover(reg__store(call), req->service, cm_call_pb_allocator(call), &e, &n, NULL, 0, err, sizeof err))
        return reg__store_failed(call, err);
    reg__sort = (reg__sort_ctx_t){req->prefer_zone, req->prefer_cluster};
    qsort(e, n, sizeof *e, reg__cmp);
    resp->instances = cm_call_alloc(call, (n ? n : 1) * sizeof *resp->instances);
    for (size_t i = 0; i < n; i++) {
        if (req->only_passing && e[i].status != 1) continue;
        /* The entries live in the call's memory too, so the response may point into them. */
        Iot__Registry__V1__RegisteredInstance *ri = cm_call_alloc(call, sizeof *ri);
        reg_entry_to_pb(&e[i], ri);
        resp->instances[resp->n_instances++] = ri;
    }
    return CM_STATUS_OK;
}

static int reg_list_services(cm_call_t *call, const ProtobufCMessage *req_, ProtobufCMessage *resp_) {
    (void)req_;
    Iot__Registry__V1__ListServicesResponse *resp = (void *)resp_;
    reg_service_count_t *c;
    size_t n;
    char err[256];
    if (reg_store_list(reg__store(call), &c, &n, err, sizeof err)) return reg__store_failed(call, err);
    resp->services = cm_call_alloc(call, (n ? n : 1) * sizeof *resp->services);
    for (size_t i = 0; i < n; i++) {
        Iot__Registry__V1__ServiceSummary *s = cm_call_alloc(call, sizeof *s);
        iot__registry__v1__service_summary__init(s);
        s->name = cm_call_strdup(call, c[i].name);
        s->instances = c[i].instances;
        s->passing = c[i].passing;
        resp->services[i] = s;
    }
    resp->n_services = n;
    cm_free(c);
    return CM_STATUS_OK;
}

static int reg_watch_check(cm_call_t *call, ProtobufCMessage *req_) {
    const Iot__Registry__V1__WatchRequest *req = (const void *)req_;
    if (!reg__service_ok(req->service))
        return cm_call_fail(call, CM_STATUS_INVALID_ARGUMENT, "service: 1-63 characters of a-z, 0-9, '.', '_', '-'");
    return 0;
}

static int reg_watch(cm_call_t *call, const ProtobufCMessage *req) {
    int rc = reg_watch_check(call, (ProtobufCMessage *)req);
    return rc ? rc : reg_watch_start(call, req, ((reg_ctx_t *)cm_call_service_ctx(call))->hub);
}

static const cm_method_t reg__methods[] = {
    {.name = "RegisterInstance", .kind = CM_RPC_UNARY, .unary = reg_register, .check = reg_register_check},
    {.name = "Heartbeat", .kind = CM_RPC_UNARY, .unary = reg_heartbeat, .check = reg_heartbeat_check},
    {.name = "DeregisterInstance", .kind = CM_RPC_UNARY, .unary = reg_deregister, .check = reg_deregister_check},
    {.name = "Discover", .kind = CM_RPC_UNARY, .unary = reg_discover, .check = reg_discover_check},
    {.name = "ListServices", .kind = CM_RPC_UNARY, .unary = reg_list_services},
    {.name = "Watch", .kind = CM_RPC_SERVER_STREAM, .start = reg_watch, .done = reg_watch_done, .check = reg_watch_check},
};

void reg_service_init(cm_service_t *svc, reg_ctx_t *ctx) {
    svc->desc = &iot__registry__v1__registry__descriptor;
    svc->methods = reg__methods;
    svc->n_methods = sizeof reg__methods / sizeof reg__methods[0];
    svc->ctx = ctx;
}
