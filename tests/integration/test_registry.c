/* The registry service binary against the real Redis from tests/run.sh: registration, leases and
 * their expiry, idempotent re-registration, validation, restart, two replicas, Redis outage. Each
 * test uses its own key prefix so tests never see each other's state. */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "cm_admin.h"
#include "cm_discovery.h"
#include "iot/testing/v1/echo.pb-c.h"
#include "cm_rpc.h"
#include "echo_service.h"
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

/* Registers service/id at 127.0.0.1:port with a check; returns the status code. */
static int reg_register_checked(reg_proc_t *r, const char *service, const char *id, int port,
                                Iot__Registry__V1__Check__Kind kind, const char *target, int fails, int oks) {
    Iot__Registry__V1__Check chk = IOT__REGISTRY__V1__CHECK__INIT;
    chk.kind = kind;
    chk.target = (char *)target;
    chk.interval_ms = 100;
    chk.timeout_ms = 80;
    chk.failures_before_critical = fails;
    chk.successes_before_passing = oks;
    Iot__Registry__V1__Instance in = IOT__REGISTRY__V1__INSTANCE__INIT;
    in.service = (char *)service;
    in.instance_id = (char *)id;
    in.address = (char *)"127.0.0.1";
    in.port = port;
    in.check = &chk;
    Iot__Registry__V1__RegisterRequest req = IOT__REGISTRY__V1__REGISTER_REQUEST__INIT;
    req.instance = &in;
    req.ttl_seconds = 60;
    ProtobufCMessage *resp = NULL;
    int code = call(r, "RegisterInstance", &req.base, &iot__registry__v1__register_response__descriptor, &resp, NULL, 0);
    if (resp) protobuf_c_message_free_unpacked(resp, NULL);
    return code;
}

/* Status of the single instance of service (0 if none), and its last check error. */
static int status_of(reg_proc_t *r, const char *service, char *err, size_t cap) {
    Iot__Registry__V1__DiscoverResponse *d = discover(r, service, "");
    int st = 0;
    if (d && d->n_instances == 1) {
        st = d->instances[0]->status;
        if (err) snprintf(err, cap, "%s", d->instances[0]->last_check_error);
    }
    if (d) protobuf_c_message_free_unpacked(&d->base, NULL);
    return st;
}

/* Polls until the instance has `want` status or timeout_ms passes; returns the last status seen. */
static int wait_status(reg_proc_t *r, const char *service, int want, int timeout_ms) {
    int st = 0;
    for (int waited = 0; waited <= timeout_ms; waited += 50) {
        if ((st = status_of(r, service, NULL, 0)) == want) break;
        usleep(50000);
    }
    return st;
}

#define PASSING IOT__REGISTRY__V1__HEALTH_STATUS__HEALTH_STATUS_PASSING
#define CRITICAL IOT__REGISTRY__V1__HEALTH_STATUS__HEALTH_STATUS_CRITICAL

static void test_grpc_health_check_transitions(void) {
    new_prefix("grpccheck");
    echo_ctx_t ctx = {0};
    cm_service_t svc;
    echo_service_init(&svc, &ctx);
    cm_server_opts_t o = {.listen = "127.0.0.1:0", .threads = 2};
    cm_server_t *target = cm_server_new(&o, NULL);
    cm_server_add_service(target, &svc);
    ASSERT_INT_EQ(cm_server_start(target), 0);
    reg_proc_t r;
    reg_start(&r);
    ASSERT_INT_EQ(reg_register_checked(&r, "echo", "echo-1", cm_server_port(target),
                                       IOT__REGISTRY__V1__CHECK__KIND__GRPC_HEALTH, "iot.testing.v1.Echo", 2, 2),
                  CM_STATUS_OK);
    ASSERT_INT_EQ(status_of(&r, "echo", NULL, 0), CRITICAL); /* unproven until checks pass */
    ASSERT_INT_EQ(wait_status(&r, "echo", PASSING, 5000), PASSING);
    cm_server_set_health(target, "iot.testing.v1.Echo", CM_HEALTH_NOT_SERVING);
    ASSERT_INT_EQ(wait_status(&r, "echo", CRITICAL, 5000), CRITICAL);
    char err[256];
    status_of(&r, "echo", err, sizeof err);
    ASSERT(strstr(err, "not serving"));
    /* only_passing hides it now. */
    Iot__Registry__V1__DiscoverRequest dreq = IOT__REGISTRY__V1__DISCOVER_REQUEST__INIT;
    dreq.service = (char *)"echo";
    dreq.only_passing = 1;
    Iot__Registry__V1__DiscoverResponse *d = NULL;
    ASSERT_INT_EQ(call(&r, "Discover", &dreq.base, &iot__registry__v1__discover_response__descriptor,
                       (ProtobufCMessage **)&d, NULL, 0),
                  CM_STATUS_OK);
    ASSERT_INT_EQ(d->n_instances, 0);
    protobuf_c_message_free_unpacked(&d->base, NULL);
    cm_server_set_health(target, "iot.testing.v1.Echo", CM_HEALTH_SERVING);
    ASSERT_INT_EQ(wait_status(&r, "echo", PASSING, 5000), PASSING);
    /* A stopped server fails its checks too. */
    cm_server_free(target);
    ASSERT_INT_EQ(wait_status(&r, "echo", CRITICAL, 5000), CRITICAL);
    reg_stop(&r);
}

typedef struct http_target_s {
    atomic_int mode; /* 0 ready, 1 not ready, 2 alternate */
    atomic_int calls;
} http_target_t;

static int http_ready(void *arg, char *why, size_t len) {
    http_target_t *t = arg;
    int n = atomic_fetch_add(&t->calls, 1);
    int mode = atomic_load(&t->mode);
    int ok = mode == 0 || (mode == 2 && n % 2 == 0);
    if (!ok) snprintf(why, len, "test says no");
    return ok;
}

static void test_http_check_and_no_flapping(void) {
    new_prefix("httpcheck");
    http_target_t t = {0};
    cm_admin_t *admin = cm_admin_start("127.0.0.1:0", http_ready, &t, NULL);
    ASSERT(admin);
    reg_proc_t r;
    reg_start(&r);
    ASSERT_INT_EQ(reg_register_checked(&r, "web", "web-1", cm_admin_port(admin), IOT__REGISTRY__V1__CHECK__KIND__HTTP,
                                       "/readyz", 3, 3),
                  CM_STATUS_OK);
    ASSERT_INT_EQ(wait_status(&r, "web", PASSING, 5000), PASSING);
    /* Alternating results never make three failures in a row: the status holds. */
    atomic_store(&t.mode, 2);
    int before = atomic_load(&t.calls);
    for (int i = 0; i < 15; i++) {
        usleep(100000);
        ASSERT_INT_EQ(status_of(&r, "web", NULL, 0), PASSING);
    }
    ASSERT(atomic_load(&t.calls) - before >= 8); /* the checks did run meanwhile */
    atomic_store(&t.mode, 1);
    ASSERT_INT_EQ(wait_status(&r, "web", CRITICAL, 5000), CRITICAL);
    char err[256];
    status_of(&r, "web", err, sizeof err);
    ASSERT(strstr(err, "status 503"));
    reg_stop(&r);
    cm_admin_stop(admin);
}

typedef struct tcp_target_s {
    int fd;
    atomic_int accepts;
    atomic_int stop;
} tcp_target_t;

static void *tcp_accept_loop(void *arg) {
    tcp_target_t *t = arg;
    while (!atomic_load(&t->stop)) {
        int c = accept(t->fd, NULL, NULL);
        if (c < 0) break;
        atomic_fetch_add(&t->accepts, 1);
        close(c);
    }
    return NULL;
}

static int tcp_listen(int *port) {
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in sa = {0};
    sa.sin_family = AF_INET;
    sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (bind(fd, (struct sockaddr *)&sa, sizeof sa) || listen(fd, 64)) return -1;
    socklen_t sl = sizeof sa;
    getsockname(fd, (struct sockaddr *)&sa, &sl);
    *port = ntohs(sa.sin_port);
    return fd;
}

static void test_tcp_check_runs_once_per_interval_across_replicas(void) {
    new_prefix("tcpcheck");
    tcp_target_t t = {0};
    int port;
    t.fd = tcp_listen(&port);
    ASSERT(t.fd >= 0);
    pthread_t th;
    pthread_create(&th, NULL, tcp_accept_loop, &t);
    reg_proc_t a, b;
    reg_start(&a);
    reg_start(&b);
    ASSERT_INT_EQ(reg_register_checked(&a, "mqtt", "mqtt-1", port, IOT__REGISTRY__V1__CHECK__KIND__TCP, "", 1, 1),
                  CM_STATUS_OK);
    ASSERT_INT_EQ(wait_status(&b, "mqtt", PASSING, 5000), PASSING);
    int before = atomic_load(&t.accepts);
    usleep(2000000);
    int probes = atomic_load(&t.accepts) - before;
    /* 100 ms interval over 2 s: about 20 probes in all, not about 20 per replica. */
    if (probes < 12 || probes > 26) TEST__FAIL("expected ~20 probes from two replicas together, got %d", probes);
    /* The port closes: connection refused, critical after one failure. */
    atomic_store(&t.stop, 1);
    shutdown(t.fd, SHUT_RDWR);
    close(t.fd);
    pthread_join(th, NULL);
    ASSERT_INT_EQ(wait_status(&a, "mqtt", CRITICAL, 5000), CRITICAL);
    char err[256];
    status_of(&a, "mqtt", err, sizeof err);
    ASSERT(strstr(err, "connect 127.0.0.1:"));
    reg_stop(&a);
    reg_stop(&b);
}

static void test_check_validation(void) {
    new_prefix("checkvalid");
    reg_proc_t r;
    reg_start(&r);
    Iot__Registry__V1__Check chk = IOT__REGISTRY__V1__CHECK__INIT;
    Iot__Registry__V1__Instance in = IOT__REGISTRY__V1__INSTANCE__INIT;
    in.service = (char *)"svc";
    in.instance_id = (char *)"i1";
    in.address = (char *)"127.0.0.1";
    in.port = 80;
    in.check = &chk;
    Iot__Registry__V1__RegisterRequest req = IOT__REGISTRY__V1__REGISTER_REQUEST__INIT;
    req.instance = &in;
    char msg[256];
    ProtobufCMessage *resp = NULL;
    ASSERT_INT_EQ(call(&r, "RegisterInstance", &req.base, &iot__registry__v1__register_response__descriptor, &resp, msg,
                       sizeof msg),
                  CM_STATUS_INVALID_ARGUMENT);
    ASSERT(strstr(msg, "instance.check.kind"));
    chk.kind = IOT__REGISTRY__V1__CHECK__KIND__HTTP;
    chk.target = (char *)"no-slash";
    ASSERT_INT_EQ(call(&r, "RegisterInstance", &req.base, &iot__registry__v1__register_response__descriptor, &resp, msg,
                       sizeof msg),
                  CM_STATUS_INVALID_ARGUMENT);
    ASSERT(strstr(msg, "instance.check.target"));
    chk.target = (char *)"";
    chk.interval_ms = 50;
    ASSERT_INT_EQ(call(&r, "RegisterInstance", &req.base, &iot__registry__v1__register_response__descriptor, &resp, msg,
                       sizeof msg),
                  CM_STATUS_INVALID_ARGUMENT);
    ASSERT(strstr(msg, "instance.check.interval_ms: 50"));
    chk.interval_ms = 1000;
    chk.timeout_ms = 5000;
    ASSERT_INT_EQ(call(&r, "RegisterInstance", &req.base, &iot__registry__v1__register_response__descriptor, &resp, msg,
                       sizeof msg),
                  CM_STATUS_INVALID_ARGUMENT);
    ASSERT(strstr(msg, "instance.check.timeout_ms"));
    /* Defaults are filled in and stored: the path defaults to /healthz. */
    chk.timeout_ms = 0;
    ASSERT_INT_EQ(call(&r, "RegisterInstance", &req.base, &iot__registry__v1__register_response__descriptor, &resp, msg,
                       sizeof msg),
                  CM_STATUS_OK);
    protobuf_c_message_free_unpacked(resp, NULL);
    Iot__Registry__V1__DiscoverResponse *d = discover(&r, "svc", "");
    ASSERT_STR_EQ(d->instances[0]->instance->check->target, "/healthz");
    ASSERT_INT_EQ(d->instances[0]->instance->check->timeout_ms, 1000);
    ASSERT_INT_EQ(d->instances[0]->instance->check->failures_before_critical, 3);
    protobuf_c_message_free_unpacked(&d->base, NULL);
    reg_stop(&r);
}

static cm_stream_t *watch_open(reg_proc_t *r, const char *service) {
    Iot__Registry__V1__WatchRequest req = IOT__REGISTRY__V1__WATCH_REQUEST__INIT;
    req.service = (char *)service;
    cm_call_opts_t o = {.timeout_ms = 60000};
    cm_stream_t *s = cm_stream_open(r->ch, "/iot.registry.v1.Registry/Watch", &o);
    cm_stream_send(s, &req.base);
    cm_stream_close_send(s);
    return s;
}

static Iot__Registry__V1__WatchEvent *watch_next(cm_stream_t *s) {
    Iot__Registry__V1__WatchEvent *ev = NULL;
    if (cm_stream_recv(s, &iot__registry__v1__watch_event__descriptor, (ProtobufCMessage **)&ev) != 1) return NULL;
    return ev;
}

/* Reads the next event and checks its type and instance id; returns its revision in rev. */
static void expect_event(cm_stream_t *s, int type, const char *id, char *rev) {
    Iot__Registry__V1__WatchEvent *ev = watch_next(s);
    ASSERT(ev);
    if ((int)ev->type != type || strcmp(ev->instance_id, id) != 0) {
        int t = ev->type;
        char got[140];
        snprintf(got, sizeof got, "%s", ev->instance_id);
        protobuf_c_message_free_unpacked(&ev->base, NULL);
        TEST__FAIL("expected event %d for %s, got %d for %s", type, id, t, got);
    }
    if (rev) {
        ASSERT(strcmp(ev->revision, rev) != 0);
        snprintf(rev, 40, "%s", ev->revision);
    }
    protobuf_c_message_free_unpacked(&ev->base, NULL);
}

static void test_watch_snapshot_then_changes_in_order(void) {
    new_prefix("watch");
    reg_proc_t r;
    reg_start(&r);
    char la[40], lb[40], rev[40] = "";
    ASSERT_INT_EQ(reg_register(&r, "inventory", "a", 9000, "", 30, la, NULL), CM_STATUS_OK);
    cm_stream_t *s = watch_open(&r, "inventory");
    Iot__Registry__V1__WatchEvent *snap = watch_next(s);
    ASSERT(snap);
    ASSERT_INT_EQ(snap->type, IOT__REGISTRY__V1__WATCH_EVENT__TYPE__SNAPSHOT);
    ASSERT_INT_EQ(snap->n_instances, 1);
    ASSERT_STR_EQ(snap->instances[0]->instance->instance_id, "a");
    snprintf(rev, sizeof rev, "%s", snap->revision);
    protobuf_c_message_free_unpacked(&snap->base, NULL);
    /* Another service's changes are not sent. */
    ASSERT_INT_EQ(reg_register(&r, "other", "x", 9000, "", 30, NULL, NULL), CM_STATUS_OK);
    ASSERT_INT_EQ(reg_register(&r, "inventory", "b", 9001, "", 1, lb, NULL), CM_STATUS_OK);
    expect_event(s, IOT__REGISTRY__V1__WATCH_EVENT__TYPE__ADDED, "b", rev);
    ASSERT_INT_EQ(reg_register(&r, "inventory", "b", 9002, "", 1, NULL, NULL), CM_STATUS_OK);
    expect_event(s, IOT__REGISTRY__V1__WATCH_EVENT__TYPE__UPDATED, "b", rev);
    /* Regression: an identical re-registration changed nothing and must not be an event. */
    ASSERT_INT_EQ(reg_register(&r, "inventory", "b", 9002, "", 1, NULL, NULL), CM_STATUS_OK);
    ASSERT_INT_EQ(deregister(&r, la, "", ""), CM_STATUS_OK);
    expect_event(s, IOT__REGISTRY__V1__WATCH_EVENT__TYPE__REMOVED, "a", rev);
    /* b's 1 s lease lapses without heartbeats: removed by the sweeper. */
    expect_event(s, IOT__REGISTRY__V1__WATCH_EVENT__TYPE__REMOVED, "b", rev);
    cm_stream_cancel(s);
    cm_stream_finish(s, NULL);
    reg_stop(&r);
}

static void test_watch_sees_changes_made_on_another_replica(void) {
    new_prefix("watchrep");
    reg_proc_t a, b;
    reg_start(&a);
    reg_start(&b);
    cm_stream_t *s = watch_open(&b, "fleet");
    Iot__Registry__V1__WatchEvent *snap = watch_next(s);
    ASSERT(snap && snap->n_instances == 0);
    protobuf_c_message_free_unpacked(&snap->base, NULL);
    char lease[40];
    ASSERT_INT_EQ(reg_register(&a, "fleet", "f1", 9100, "", 30, lease, NULL), CM_STATUS_OK);
    expect_event(s, IOT__REGISTRY__V1__WATCH_EVENT__TYPE__ADDED, "f1", NULL);
    ASSERT_INT_EQ(deregister(&a, lease, "", ""), CM_STATUS_OK);
    expect_event(s, IOT__REGISTRY__V1__WATCH_EVENT__TYPE__REMOVED, "f1", NULL);
    cm_stream_cancel(s);
    cm_stream_finish(s, NULL);
    reg_stop(&a);
    reg_stop(&b);
}

static void test_watch_reports_health_changes(void) {
    new_prefix("watchhealth");
    tcp_target_t t = {0};
    int port;
    t.fd = tcp_listen(&port);
    pthread_t th;
    pthread_create(&th, NULL, tcp_accept_loop, &t);
    reg_proc_t r;
    reg_start(&r);
    cm_stream_t *s = watch_open(&r, "broker");
    Iot__Registry__V1__WatchEvent *snap = watch_next(s);
    ASSERT(snap);
    protobuf_c_message_free_unpacked(&snap->base, NULL);
    ASSERT_INT_EQ(reg_register_checked(&r, "broker", "b1", port, IOT__REGISTRY__V1__CHECK__KIND__TCP, "", 1, 1),
                  CM_STATUS_OK);
    expect_event(s, IOT__REGISTRY__V1__WATCH_EVENT__TYPE__ADDED, "b1", NULL);
    Iot__Registry__V1__WatchEvent *ev = watch_next(s);
    ASSERT(ev && ev->type == IOT__REGISTRY__V1__WATCH_EVENT__TYPE__HEALTH_CHANGED);
    ASSERT_INT_EQ(ev->instances[0]->status, PASSING);
    protobuf_c_message_free_unpacked(&ev->base, NULL);
    atomic_store(&t.stop, 1);
    shutdown(t.fd, SHUT_RDWR);
    close(t.fd);
    pthread_join(th, NULL);
    ev = watch_next(s);
    ASSERT(ev && ev->type == IOT__REGISTRY__V1__WATCH_EVENT__TYPE__HEALTH_CHANGED);
    ASSERT_INT_EQ(ev->instances[0]->status, CRITICAL);
    ASSERT(strstr(ev->instances[0]->last_check_error, "connect"));
    protobuf_c_message_free_unpacked(&ev->base, NULL);
    cm_stream_cancel(s);
    cm_stream_finish(s, NULL);
    reg_stop(&r);
}

static void test_watch_ends_promptly_on_shutdown(void) {
    new_prefix("watchstop");
    reg_proc_t r;
    reg_start(&r);
    cm_stream_t *s = watch_open(&r, "anything");
    Iot__Registry__V1__WatchEvent *snap = watch_next(s);
    ASSERT(snap);
    protobuf_c_message_free_unpacked(&snap->base, NULL);
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    cm_channel_free(r.ch);
    r.ch = NULL;
    test_proc_kill(&r.p, SIGTERM);
    ASSERT_INT_EQ(cm_stream_finish(s, NULL), CM_STATUS_UNAVAILABLE);
    ASSERT_INT_EQ(test_proc_wait(&r.p, 15000), 0);
    clock_gettime(CLOCK_MONOTONIC, &t1);
    ASSERT(t1.tv_sec - t0.tv_sec < 5); /* not the 10 s grace period */
}

static void echo_start_registered(test_proc_t *p, int reg_port, const char *id) {
    static char bin[1024];
    snprintf(bin, sizeof bin, "%s/tests/echo_server", test_env("IOT_BUILD_DIR"));
    char *argv[] = {bin, NULL};
    char reg[64], iid[64];
    snprintf(reg, sizeof reg, "IOT_REGISTRY_ADDR=127.0.0.1:%d", reg_port);
    snprintf(iid, sizeof iid, "IOT_INSTANCE_ID=%s", id);
    const char *env[] = {reg, iid, "IOT_ADVERTISE_ADDR=127.0.0.1", "IOT_GRPC_LISTEN=127.0.0.1:0",
                         "IOT_ADMIN_LISTEN=127.0.0.1:0", "IOT_SHUTDOWN_GRACE=2s", NULL};
    ASSERT_INT_EQ(test_proc_start(p, argv, env, 1), 0);
}

static int echo_via(cm_disco_t *d, char *picked, size_t cap) {
    cm_lb_pick_t pick;
    cm_channel_t *ch = cm_disco_pick(d, NULL, 0, &pick);
    if (!ch) return -1;
    snprintf(picked, cap, "%s", pick.id);
    Iot__Testing__V1__EchoRequest req = IOT__TESTING__V1__ECHO_REQUEST__INIT;
    req.message = (char *)"via discovery";
    ProtobufCMessage *resp = NULL;
    cm_call_opts_t o = {.timeout_ms = 3000};
    int code = cm_channel_unary(ch, "/iot.testing.v1.Echo/Unary", &req.base, &iot__testing__v1__echo_response__descriptor,
                                &resp, &o, NULL);
    if (resp) protobuf_c_message_free_unpacked(resp, NULL);
    cm_disco_done(d, &pick);
    return code;
}

static void test_self_registration_and_discovery_channels(void) {
    new_prefix("selfreg");
    reg_proc_t r;
    reg_start(&r);
    test_proc_t a, b;
    echo_start_registered(&a, r.p.grpc_port, "echo-a");
    echo_start_registered(&b, r.p.grpc_port, "echo-b");
    char regaddr[64];
    snprintf(regaddr, sizeof regaddr, "127.0.0.1:%d", r.p.grpc_port);
    cm_disco_opts_t o = {.registry = regaddr, .service = "echo", .policy = CM_LB_ROUND_ROBIN};
    cm_disco_t *d = cm_disco_new(&o, NULL);
    /* Both pass their gRPC health check (registered CRITICAL until then). */
    ASSERT_INT_EQ(cm_disco_wait(d, 2, 10000), 0);
    char first[132], second[132];
    ASSERT_INT_EQ(echo_via(d, first, sizeof first), CM_STATUS_OK);
    ASSERT_INT_EQ(echo_via(d, second, sizeof second), CM_STATUS_OK);
    ASSERT(strcmp(first, second) != 0); /* round robin over both */
    /* One stops: it deregisters before draining, so clients stop picking it at once. */
    test_proc_kill(&a, SIGTERM);
    ASSERT_INT_EQ(test_proc_wait(&a, 15000), 0);
    for (int i = 0; i < 100 && cm_disco_instances(d) != 1; i++) usleep(20000);
    ASSERT_INT_EQ(cm_disco_instances(d), 1);
    for (int i = 0; i < 4; i++) {
        char id[132];
        ASSERT_INT_EQ(echo_via(d, id, sizeof id), CM_STATUS_OK);
        ASSERT_STR_EQ(id, "echo-b");
    }
    cm_disco_free(d);
    /* DNS mode: no registry, one target. */
    char target[64];
    snprintf(target, sizeof target, "127.0.0.1:%d", b.grpc_port);
    cm_disco_opts_t dns = {.dns_target = target};
    d = cm_disco_new(&dns, NULL);
    char id[132];
    ASSERT_INT_EQ(echo_via(d, id, sizeof id), CM_STATUS_OK);
    ASSERT_STR_EQ(id, "dns");
    cm_disco_free(d);
    test_proc_kill(&b, SIGTERM);
    ASSERT_INT_EQ(test_proc_wait(&b, 15000), 0);
    ASSERT_INT_EQ(count(&r, "echo"), 0); /* both deregistered */
    reg_stop(&r);
}

/* Reads registry_watchers from the admin endpoint. */
static int watchers_gauge(reg_proc_t *r) {
    char body[65536];
    if (test_http_get(r->p.admin_port, "/metrics", body, sizeof body) != 200) return -1;
    const char *m = strstr(body, "\nregistry_watchers ");
    return m ? atoi(m + 19) : -1;
}

/* A watcher that stops reading (a SIGSTOPped grpc-js client: real TCP/HTTP2 backpressure) is
 * ended with RESOURCE_EXHAUSTED instead of buffering events without bound. */
static void test_stalled_watcher_is_dropped(void) {
    new_prefix("stall");
    reg_proc_t r;
    reg_start(&r);
    char target[64];
    snprintf(target, sizeof target, "127.0.0.1:%d", r.p.grpc_port);
    test_proc_t node;
    ASSERT_INT_EQ(test_proc_start_node(&node, "stalled_registry_watcher.js", target, "churn", "watching"), 0);
    char line[256];
    ASSERT_INT_EQ(watchers_gauge(&r), 1);
    test_proc_kill(&node, SIGSTOP);
    /* Churn: each registration is an event of ~150 bytes; far more than the window, the socket
     * buffers and the 1024-event send queue together can hold. */
    int dropped = 0;
    for (int i = 0; i < 60000 && !dropped; i++) {
        char id[32];
        snprintf(id, sizeof id, "i-%d", i % 50);
        reg_register(&r, "churn", id, 1000 + i % 60000, "", 60, NULL, NULL);
        if (i % 2000 == 1999) dropped = watchers_gauge(&r) == 0;
    }
    ASSERT(dropped);
    test_proc_kill(&node, SIGCONT);
    ASSERT(test_proc_read_line(&node, line, sizeof line, 20000) == 0);
    ASSERT(strncmp(line, "status ", 7) == 0);
    test_proc_wait(&node, 10000);
    reg_stop(&r);
}

TEST_MAIN(TEST_ENTRY(test_register_discover_deregister), TEST_ENTRY(test_reregister_is_idempotent),
          TEST_ENTRY(test_heartbeat_keeps_and_ttl_expires), TEST_ENTRY(test_validation_names_the_field),
          TEST_ENTRY(test_restart_keeps_instances_and_leases), TEST_ENTRY(test_two_replicas_agree),
          TEST_ENTRY(test_redis_down_is_unavailable), TEST_ENTRY(test_grpc_health_check_transitions),
          TEST_ENTRY(test_http_check_and_no_flapping), TEST_ENTRY(test_tcp_check_runs_once_per_interval_across_replicas),
          TEST_ENTRY(test_check_validation), TEST_ENTRY(test_watch_snapshot_then_changes_in_order),
          TEST_ENTRY(test_watch_sees_changes_made_on_another_replica), TEST_ENTRY(test_watch_reports_health_changes),
          TEST_ENTRY(test_watch_ends_promptly_on_shutdown), TEST_ENTRY(test_self_registration_and_discovery_channels),
          TEST_ENTRY(test_stalled_watcher_is_dropped))
