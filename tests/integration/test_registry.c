/* The registry service binary against the real Redis from tests/run.sh: registration, leases and
 * their expiry, idempotent re-registration, validation, restart, two replicas, Redis outage. Each
 * test uses its own key prefix so tests never see each other's state. */
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "cm_rpc.h"
#include "iot/registry/v1/registry.pb-c.h"
#include "proc.h"
#include "test.h"

typedef struct reg_proc_s {
    test_proc_t p;
    cm_channel_t *ch;
} reg_proc_t;

static char prefix_env[64];

static void new_prefix(const char *name) {
    snprintf(prefix_env, sizeof prefix_env, "IOT_REGISTRY_PREFIX={t-%s-%d}:", name, (int)getpid());
}

static void reg_start_with(reg_proc_t *r, const char *redis) {
    static char bin[1024], redis_env[128];
    snprintf(bin, sizeof bin, "%s/services/registry/registry", test_env("IOT_BUILD_DIR"));
    snprintf(redis_env, sizeof redis_env, "IOT_REDIS_ADDR=%s", redis);
    char *argv[] = {bin, NULL};
    const char *env[] = {redis_env, prefix_env, "IOT_GRPC_LISTEN=127.0.0.1:0", "IOT_ADMIN_LISTEN=127.0.0.1:0",
                         "IOT_REGISTRY_SWEEP_INTERVAL=100ms", "IOT_REDIS_TIMEOUT=500ms", NULL};
    ASSERT_INT_EQ(test_proc_start(&r->p, argv, env, 1), 0);
    char target[64];
    snprintf(target, sizeof target, "127.0.0.1:%d", r->p.grpc_port);
    r->ch = cm_channel_new(target, NULL, NULL);
}

static void reg_start(reg_proc_t *r) { reg_start_with(r, test_env("IOT_TEST_REDIS")); }

static void reg_stop(reg_proc_t *r) {
    cm_channel_free(r->ch);
    test_proc_kill(&r->p, SIGTERM);
    ASSERT_INT_EQ(test_proc_wait(&r->p, 15000), 0);
}

static int call(reg_proc_t *r, const char *method, const ProtobufCMessage *req, const ProtobufCMessageDescriptor *d,
                ProtobufCMessage **resp, char *msg, size_t cap) {
    cm_rpc_status_t st = {0};
    cm_call_opts_t o = {.timeout_ms = 5000};
    char path[128];
    snprintf(path, sizeof path, "/iot.registry.v1.Registry/%s", method);
    int code = cm_channel_unary(r->ch, path, req, d, resp, &o, &st);
    if (msg && cap) {
        size_t n = strnlen(st.message, cap - 1);
        memcpy(msg, st.message, n);
        msg[n] = '\0';
    }
    cm_rpc_status_clear(&st);
    return code;
}

/* Registers service/id on port; returns the status; lease copied out when given. */
static int reg_register(reg_proc_t *r, const char *service, const char *id, int port, const char *zone, int ttl,
                        char *lease, char *msg) {
    Iot__Registry__V1__Instance in = IOT__REGISTRY__V1__INSTANCE__INIT;
    in.service = (char *)service;
    in.instance_id = (char *)id;
    in.address = (char *)"10.1.2.3";
    in.port = port;
    in.zone = (char *)zone;
    Iot__Registry__V1__RegisterRequest req = IOT__REGISTRY__V1__REGISTER_REQUEST__INIT;
    req.instance = &in;
    req.ttl_seconds = ttl;
    Iot__Registry__V1__RegisterResponse *resp = NULL;
    int code = call(r, "RegisterInstance", &req.base, &iot__registry__v1__register_response__descriptor,
                    (ProtobufCMessage **)&resp, msg, 256);
    if (resp) {
        if (lease) snprintf(lease, 40, "%s", resp->lease_id);
        protobuf_c_message_free_unpacked(&resp->base, NULL);
    }
    return code;
}

static Iot__Registry__V1__DiscoverResponse *discover(reg_proc_t *r, const char *service, const char *zone) {
    Iot__Registry__V1__DiscoverRequest req = IOT__REGISTRY__V1__DISCOVER_REQUEST__INIT;
    req.service = (char *)service;
    req.prefer_zone = (char *)zone;
    Iot__Registry__V1__DiscoverResponse *resp = NULL;
    if (call(r, "Discover", &req.base, &iot__registry__v1__discover_response__descriptor, (ProtobufCMessage **)&resp,
             NULL, 0) != CM_STATUS_OK)
        return NULL;
    return resp;
}

static int count(reg_proc_t *r, const char *service) {
    Iot__Registry__V1__DiscoverResponse *d = discover(r, service, "");
    if (!d) return -1;
    int n = (int)d->n_instances;
    protobuf_c_message_free_unpacked(&d->base, NULL);
    return n;
}

static int heartbeat(reg_proc_t *r, const char *lease, char *msg) {
    Iot__Registry__V1__HeartbeatRequest req = IOT__REGISTRY__V1__HEARTBEAT_REQUEST__INIT;
    req.lease_id = (char *)lease;
    ProtobufCMessage *resp = NULL;
    int code = call(r, "Heartbeat", &req.base, &iot__registry__v1__heartbeat_response__descriptor, &resp, msg, 256);
    if (resp) protobuf_c_message_free_unpacked(resp, NULL);
    return code;
}

static int deregister(reg_proc_t *r, const char *lease, const char *service, const char *id) {
    Iot__Registry__V1__DeregisterRequest req = IOT__REGISTRY__V1__DEREGISTER_REQUEST__INIT;
    req.lease_id = (char *)lease;
    req.service = (char *)service;
    req.instance_id = (char *)id;
    ProtobufCMessage *resp = NULL;
    int code = call(r, "DeregisterInstance", &req.base, &iot__registry__v1__deregister_response__descriptor, &resp,
                    NULL, 0);
    if (resp) protobuf_c_message_free_unpacked(resp, NULL);
    return code;
}

static void test_register_discover_deregister(void) {
    new_prefix("basic");
    reg_proc_t r;
    reg_start(&r);
    char l1[40], l2[40], l3[40];
    ASSERT_INT_EQ(reg_register(&r, "ingest", "ingest-1", 7002, "zone-a", 30, l1, NULL), CM_STATUS_OK);
    ASSERT_INT_EQ(reg_register(&r, "ingest", "ingest-2", 7002, "zone-b", 30, l2, NULL), CM_STATUS_OK);
    ASSERT_INT_EQ(reg_register(&r, "ingest", "ingest-3", 7002, "zone-a", 30, l3, NULL), CM_STATUS_OK);
    ASSERT(strcmp(l1, l2) != 0);
    Iot__Registry__V1__DiscoverResponse *d = discover(&r, "ingest", "");
    ASSERT(d && d->n_instances == 3);
    ASSERT_STR_EQ(d->instances[0]->instance->instance_id, "ingest-1");
    ASSERT_STR_EQ(d->instances[0]->instance->address, "10.1.2.3");
    ASSERT_INT_EQ(d->instances[0]->instance->weight, 100); /* default */
    ASSERT_INT_EQ(d->instances[0]->status, IOT__REGISTRY__V1__HEALTH_STATUS__HEALTH_STATUS_PASSING);
    ASSERT(d->instances[0]->lease_expires_unix_ms > d->instances[0]->registered_unix_ms);
    protobuf_c_message_free_unpacked(&d->base, NULL);
    d = discover(&r, "ingest", "zone-b"); /* preferred zone first */
    ASSERT_STR_EQ(d->instances[0]->instance->instance_id, "ingest-2");
    protobuf_c_message_free_unpacked(&d->base, NULL);

    Iot__Registry__V1__ListServicesRequest lreq = IOT__REGISTRY__V1__LIST_SERVICES_REQUEST__INIT;
    Iot__Registry__V1__ListServicesResponse *ls = NULL;
    ASSERT_INT_EQ(call(&r, "ListServices", &lreq.base, &iot__registry__v1__list_services_response__descriptor,
                       (ProtobufCMessage **)&ls, NULL, 0),
                  CM_STATUS_OK);
    ASSERT_INT_EQ(ls->n_services, 1);
    ASSERT_STR_EQ(ls->services[0]->name, "ingest");
    ASSERT_INT_EQ(ls->services[0]->instances, 3);
    protobuf_c_message_free_unpacked(&ls->base, NULL);

    ASSERT_INT_EQ(deregister(&r, l1, "", ""), CM_STATUS_OK);
    ASSERT_INT_EQ(deregister(&r, "", "ingest", "ingest-2"), CM_STATUS_OK);
    ASSERT_INT_EQ(count(&r, "ingest"), 1);
    ASSERT_INT_EQ(deregister(&r, l1, "", ""), CM_STATUS_NOT_FOUND);
    ASSERT_INT_EQ(heartbeat(&r, l1, NULL), CM_STATUS_NOT_FOUND);
    ASSERT_INT_EQ(count(&r, "nobody"), 0);
    reg_stop(&r);
}

static void test_reregister_is_idempotent(void) {
    new_prefix("idem");
    reg_proc_t r;
    reg_start(&r);
    char a[40], b[40];
    ASSERT_INT_EQ(reg_register(&r, "ota", "ota-1", 7004, "", 30, a, NULL), CM_STATUS_OK);
    ASSERT_INT_EQ(reg_register(&r, "ota", "ota-1", 7005, "", 30, b, NULL), CM_STATUS_OK);
    ASSERT_STR_EQ(a, b); /* same lease */
    Iot__Registry__V1__DiscoverResponse *d = discover(&r, "ota", "");
    ASSERT_INT_EQ(d->n_instances, 1);
    ASSERT_INT_EQ(d->instances[0]->instance->port, 7005); /* updated */
    protobuf_c_message_free_unpacked(&d->base, NULL);
    reg_stop(&r);
}

static void test_heartbeat_keeps_and_ttl_expires(void) {
    new_prefix("ttl");
    reg_proc_t r;
    reg_start(&r);
    char kept[40], lapsing[40], msg[256];
    ASSERT_INT_EQ(reg_register(&r, "processing", "kept", 7003, "", 1, kept, NULL), CM_STATUS_OK);
    ASSERT_INT_EQ(reg_register(&r, "processing", "lapsing", 7003, "", 1, lapsing, NULL), CM_STATUS_OK);
    for (int i = 0; i < 6; i++) { /* 1.5 s, heartbeating one of them every 250 ms */
        usleep(250000);
        ASSERT_INT_EQ(heartbeat(&r, kept, NULL), CM_STATUS_OK);
    }
    Iot__Registry__V1__DiscoverResponse *d = discover(&r, "processing", "");
    ASSERT_INT_EQ(d->n_instances, 1);
    ASSERT_STR_EQ(d->instances[0]->instance->instance_id, "kept");
    protobuf_c_message_free_unpacked(&d->base, NULL);
    ASSERT_INT_EQ(heartbeat(&r, lapsing, msg), CM_STATUS_NOT_FOUND);
    ASSERT(strstr(msg, "register again"));
    /* Registering again after the lapse starts over with a new lease. */
    char again[40];
    ASSERT_INT_EQ(reg_register(&r, "processing", "lapsing", 7003, "", 1, again, NULL), CM_STATUS_OK);
    ASSERT(strcmp(again, lapsing) != 0);
    usleep(1500000);
    ASSERT_INT_EQ(count(&r, "processing"), 0);
    reg_stop(&r);
}

static void test_validation_names_the_field(void) {
    new_prefix("valid");
    reg_proc_t r;
    reg_start(&r);
    char msg[256];
    ASSERT_INT_EQ(reg_register(&r, "Bad Name", "x", 80, "", 30, NULL, msg), CM_STATUS_INVALID_ARGUMENT);
    ASSERT(strstr(msg, "instance.service"));
    ASSERT_INT_EQ(reg_register(&r, "ok", "has/slash", 80, "", 30, NULL, msg), CM_STATUS_INVALID_ARGUMENT);
    ASSERT(strstr(msg, "instance.instance_id"));
    ASSERT_INT_EQ(reg_register(&r, "ok", "x", 0, "", 30, NULL, msg), CM_STATUS_INVALID_ARGUMENT);
    ASSERT(strstr(msg, "instance.port: 0 is not in 1..65535"));
    ASSERT_INT_EQ(reg_register(&r, "ok", "x", 70000, "", 30, NULL, msg), CM_STATUS_INVALID_ARGUMENT);
    ASSERT_INT_EQ(reg_register(&r, "ok", "x", 80, "", 4000, NULL, msg), CM_STATUS_INVALID_ARGUMENT);
    ASSERT(strstr(msg, "ttl_seconds: 4000 is not in 1..3600"));
    ASSERT_INT_EQ(reg_register(&r, "ok", "x", 80, "zone\n", 30, NULL, msg), CM_STATUS_INVALID_ARGUMENT);
    ASSERT_INT_EQ(heartbeat(&r, "not-a-lease", msg), CM_STATUS_INVALID_ARGUMENT);
    ASSERT(strstr(msg, "lease_id"));
    ASSERT_INT_EQ(deregister(&r, "", "", ""), CM_STATUS_INVALID_ARGUMENT);
    Iot__Registry__V1__RegisterRequest empty = IOT__REGISTRY__V1__REGISTER_REQUEST__INIT;
    ProtobufCMessage *resp = NULL;
    ASSERT_INT_EQ(call(&r, "RegisterInstance", &empty.base, &iot__registry__v1__register_response__descriptor, &resp,
                       msg, sizeof msg),
                  CM_STATUS_INVALID_ARGUMENT);
    ASSERT(strstr(msg, "instance: required"));
    ASSERT_INT_EQ(count(&r, "ok"), 0); /* nothing half-stored */
    reg_stop(&r);
}

static void test_restart_keeps_instances_and_leases(void) {
    new_prefix("restart");
    reg_proc_t r;
    reg_start(&r);
    char lease[40];
    ASSERT_INT_EQ(reg_register(&r, "gateway", "gw-1", 8080, "", 60, lease, NULL), CM_STATUS_OK);
    reg_stop(&r);
    reg_start(&r);
    Iot__Registry__V1__DiscoverResponse *d = discover(&r, "gateway", "");
    ASSERT(d && d->n_instances == 1);
    ASSERT_STR_EQ(d->instances[0]->lease_id, lease);
    protobuf_c_message_free_unpacked(&d->base, NULL);
    ASSERT_INT_EQ(heartbeat(&r, lease, NULL), CM_STATUS_OK);
    reg_stop(&r);
}

static void test_two_replicas_agree(void) {
    new_prefix("replicas");
    reg_proc_t a, b;
    reg_start(&a);
    reg_start(&b);
    char lease[40];
    ASSERT_INT_EQ(reg_register(&a, "device-mgmt", "dm-1", 7010, "", 30, lease, NULL), CM_STATUS_OK);
    ASSERT_INT_EQ(count(&b, "device-mgmt"), 1);
    ASSERT_INT_EQ(heartbeat(&b, lease, NULL), CM_STATUS_OK);
    ASSERT_INT_EQ(deregister(&b, lease, "", ""), CM_STATUS_OK);
    ASSERT_INT_EQ(count(&a, "device-mgmt"), 0);
    reg_stop(&a);
    reg_stop(&b);
}

static void test_redis_down_is_unavailable(void) {
    new_prefix("down");
    reg_proc_t r;
    reg_start_with(&r, "127.0.0.1:1");
    char msg[256];
    ASSERT_INT_EQ(reg_register(&r, "x", "x-1", 80, "", 30, NULL, msg), CM_STATUS_UNAVAILABLE);
    ASSERT(strstr(msg, "registry storage unavailable"));
    char body[512];
    ASSERT_INT_EQ(test_http_get(r.p.admin_port, "/readyz", body, sizeof body), 503);
    ASSERT(strstr(body, "not ready"));
    reg_stop(&r);
}

TEST_MAIN(TEST_ENTRY(test_register_discover_deregister), TEST_ENTRY(test_reregister_is_idempotent),
          TEST_ENTRY(test_heartbeat_keeps_and_ttl_expires), TEST_ENTRY(test_validation_names_the_field),
          TEST_ENTRY(test_restart_keeps_instances_and_leases), TEST_ENTRY(test_two_replicas_agree),
          TEST_ENTRY(test_redis_down_is_unavailable))
