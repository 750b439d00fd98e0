/* Registry benchmark (make bench): Discover latency and QPS with 1,000 registered instances,
 * against raw Redis doing the same reads (SMEMBERS + HMGET per instance, pipelined) in the same
 * run; and the time from an instance's death to a watcher's event, for a failing active check and
 * for a lapsed lease.
 *   registry_bench REGISTRY_ADDR REDIS_ADDR PREFIX */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "cm_redis.h"
#include "cm_rpc.h"
#include "iot/registry/v1/registry.pb-c.h"

#define SERVICES 10
#define PER_SERVICE 100
#define THREADS 8
#define SECONDS 3

static const char *g_registry, *g_redis, *g_prefix;

static double now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec * 1e3 + (double)ts.tv_nsec / 1e6;
}

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static int reg(cm_channel_t *ch, const char *svc, const char *id, int port, int ttl, Iot__Registry__V1__Check *chk,
               char *lease) {
    Iot__Registry__V1__Instance in = IOT__REGISTRY__V1__INSTANCE__INIT;
    in.service = (char *)svc;
    in.instance_id = (char *)id;
    in.address = (char *)"127.0.0.1";
    in.port = port;
    in.zone = (char *)(port % 2 ? "zone-a" : "zone-b");
    in.version = (char *)"1.4.2";
    in.check = chk;
    Iot__Registry__V1__RegisterRequest req = IOT__REGISTRY__V1__REGISTER_REQUEST__INIT;
    req.instance = &in;
    req.ttl_seconds = ttl;
    Iot__Registry__V1__RegisterResponse *resp = NULL;
    cm_call_opts_t o = {.timeout_ms = 5000};
    int code = cm_channel_unary(ch, "/iot.registry.v1.Registry/RegisterInstance", &req.base,
                                &iot__registry__v1__register_response__descriptor, (ProtobufCMessage **)&resp, &o, NULL);
    if (resp) {
        if (lease) snprintf(lease, 40, "%s", resp->lease_id);
        protobuf_c_message_free_unpacked(&resp->base, NULL);
    }
    return code;
}

typedef struct worker_s {
    int raw; /* 1: raw Redis reference */
    double *lat;
    size_t n, cap;
    int errors;
    unsigned seed;
} worker_t;

static void raw_discover(cm_redis_t *r, const char *svc) {
    char key[128];
    snprintf(key, sizeof key, "%ss:%s", g_prefix, svc);
    redisReply *ids = cm_redis_cmdv(r, "SMEMBERS", key, NULL);
    if (!ids) return;
    for (size_t i = 0; i < ids->elements; i++) {
        char ik[256];
        snprintf(ik, sizeof ik, "%si:%s/%s", g_prefix, svc, ids->element[i]->str);
        const char *argv[] = {"HMGET", ik, "pb", "lease", "reg", "status", "last_check", "last_error"};
        cm_redis_append(r, 8, argv, NULL);
    }
    for (size_t i = 0; i < ids->elements; i++) {
        redisReply *h = NULL;
        if (cm_redis_get_reply(r, &h) == 0 && h) freeReplyObject(h);
    }
    freeReplyObject(ids);
}

static void *worker(void *arg) {
    worker_t *w = arg;
    cm_channel_t *ch = w->raw ? NULL : cm_channel_new(g_registry, &(cm_channel_opts_t){.own_connection = 1}, NULL);
    cm_redis_t *r = w->raw ? cm_redis_new(g_redis, 2000, NULL) : NULL;
    double end = now_ms() + SECONDS * 1000.0;
    while (now_ms() < end) {
        char svc[32];
        snprintf(svc, sizeof svc, "svc-%d", rand_r(&w->seed) % SERVICES);
        double t0 = now_ms();
        if (w->raw) {
            raw_discover(r, svc);
        } else {
            Iot__Registry__V1__DiscoverRequest req = IOT__REGISTRY__V1__DISCOVER_REQUEST__INIT;
            req.service = svc;
            req.prefer_zone = (char *)"zone-a";
            Iot__Registry__V1__DiscoverResponse *resp = NULL;
            cm_call_opts_t o = {.timeout_ms = 5000};
            int code = cm_channel_unary(ch, "/iot.registry.v1.Registry/Discover", &req.base,
                                        &iot__registry__v1__discover_response__descriptor, (ProtobufCMessage **)&resp, &o, NULL);
            if (code != CM_STATUS_OK || resp->n_instances != PER_SERVICE) w->errors++;
            if (resp) protobuf_c_message_free_unpacked(&resp->base, NULL);
        }
        if (w->n == w->cap) w->lat = realloc(w->lat, (w->cap = w->cap ? w->cap * 2 : 4096) * sizeof *w->lat);
        w->lat[w->n++] = now_ms() - t0;
    }
    cm_channel_free(ch);
    cm_redis_free(r);
    return NULL;
}

/* Runs THREADS workers for SECONDS; returns QPS and sets the p50 and p99 latencies. */
static double run_discover(int raw, double *p50, double *p99, int *errors) {
    worker_t w[THREADS];
    pthread_t th[THREADS];
    memset(w, 0, sizeof w);
    for (int i = 0; i < THREADS; i++) {
        w[i].raw = raw;
        w[i].seed = (unsigned)(i * 7919 + 1);
        pthread_create(&th[i], NULL, worker, &w[i]);
    }
    size_t total = 0;
    for (int i = 0; i < THREADS; i++) {
        pthread_join(th[i], NULL);
        total += w[i].n;
    }
    double *all = malloc((total ? total : 1) * sizeof *all);
    size_t k = 0;
    *errors = 0;
    for (int i = 0; i < THREADS; i++) {
        memcpy(all + k, w[i].lat, w[i].n * sizeof *all);
        k += w[i].n;
        *errors += w[i].errors;
        free(w[i].lat);
    }
    qsort(all, total, sizeof *all, cmp_double);
    *p50 = total ? all[total / 2] : 0;
    *p99 = total ? all[total * 99 / 100] : 0;
    free(all);
    return (double)total / SECONDS;
}

static cm_stream_t *watch(cm_channel_t *ch, const char *svc) {
    Iot__Registry__V1__WatchRequest req = IOT__REGISTRY__V1__WATCH_REQUEST__INIT;
    req.service = (char *)svc;
    cm_call_opts_t o = {.timeout_ms = 600000};
    cm_stream_t *s = cm_stream_open(ch, "/iot.registry.v1.Registry/Watch", &o);
    cm_stream_send(s, &req.base);
    cm_stream_close_send(s);
    Iot__Registry__V1__WatchEvent *ev = NULL;
    if (cm_stream_recv(s, &iot__registry__v1__watch_event__descriptor, (ProtobufCMessage **)&ev) == 1)
        protobuf_c_message_free_unpacked(&ev->base, NULL); /* the snapshot */
    return s;
}

/* Waits for an event of `type`; returns when it arrived (ms) or -1. */
static double wait_event(cm_stream_t *s, int type) {
    Iot__Registry__V1__WatchEvent *ev;
    while (cm_stream_recv(s, &iot__registry__v1__watch_event__descriptor, (ProtobufCMessage **)&ev) == 1) {
        int t = ev->type;
        protobuf_c_message_free_unpacked(&ev->base, NULL);
        if (t == type) return now_ms();
    }
    return -1;
}

int main(int argc, char **argv) {
    if (argc != 4) {
        fprintf(stderr, "usage: registry_bench REGISTRY_ADDR REDIS_ADDR PREFIX\n");
        return 2;
    }
    g_registry = argv[1];
    g_redis = argv[2];
    g_prefix = argv[3];
    cm_channel_t *ch = cm_channel_new(g_registry, NULL, NULL);
    double t0 = now_ms();
    for (int s = 0; s < SERVICES; s++)
        for (int i = 0; i < PER_SERVICE; i++) {
            char svc[32], id[32];
            snprintf(svc, sizeof svc, "svc-%d", s);
            snprintf(id, sizeof id, "inst-%03d", i);
            if (reg(ch, svc, id, 10000 + i, 600, NULL, NULL) != CM_STATUS_OK) {
                fprintf(stderr, "registration failed\n");
                return 1;
            }
        }
    double reg_ms = now_ms() - t0;
    printf("registered %d instances (%d services x %d) in %.0f ms: %.0f registrations/s\n", SERVICES * PER_SERVICE,
           SERVICES, PER_SERVICE, reg_ms, SERVICES * PER_SERVICE / (reg_ms / 1000));

    double p50, p99, rp50, rp99;
    int errs, rerrs;
    double qps = run_discover(0, &p50, &p99, &errs);
    double rqps = run_discover(1, &rp50, &rp99, &rerrs);
    printf("\n%-40s %10s %10s %10s\n", "Discover (100 instances per answer)", "QPS", "p50 ms", "p99 ms");
    printf("%-40s %10.0f %10.2f %10.2f  (errors %d)\n", "registry Discover over gRPC", qps, p50, p99, errs);
    printf("%-40s %10.0f %10.2f %10.2f\n", "reference: raw Redis SMEMBERS+HMGET", rqps, rp50, rp99);
    printf("%-40s %10.2f %10.2f %10.2f\n", "ratio registry/raw", qps / rqps, p50 / rp50, p99 / rp99);

    /* Death to event, 5 times each. */
    double check_ms[5], lease_ms[5];
    for (int k = 0; k < 5; k++) {
        int fd = socket(AF_INET, SOCK_STREAM, 0);
        struct sockaddr_in sa = {0};
        sa.sin_family = AF_INET;
        sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
        bind(fd, (struct sockaddr *)&sa, sizeof sa);
        listen(fd, 16);
        socklen_t sl = sizeof sa;
        getsockname(fd, (struct sockaddr *)&sa, &sl);
        char svc[32], id[32];
        snprintf(svc, sizeof svc, "death-%d", k);
        snprintf(id, sizeof id, "victim");
        cm_stream_t *s = watch(ch, svc);
        Iot__Registry__V1__Check chk = IOT__REGISTRY__V1__CHECK__INIT;
        chk.kind = IOT__REGISTRY__V1__CHECK__KIND__TCP;
        chk.interval_ms = 500;
        chk.timeout_ms = 200;
        chk.failures_before_critical = 1;
        reg(ch, svc, id, ntohs(sa.sin_port), 600, &chk, NULL);
        wait_event(s, IOT__REGISTRY__V1__WATCH_EVENT__TYPE__HEALTH_CHANGED); /* passing */
        usleep((useconds_t)(rand() % 500) * 1000);                          /* die at a random phase */
        close(fd);
        double died = now_ms();
        check_ms[k] = wait_event(s, IOT__REGISTRY__V1__WATCH_EVENT__TYPE__HEALTH_CHANGED) - died;
        char lease[40];
        snprintf(id, sizeof id, "leased");
        reg(ch, svc, id, 9, 2, NULL, lease);
        died = now_ms(); /* registered and never heartbeats: the lease is its last sign of life */
        /* "victim" has a 600 s lease and is never removed, so the first REMOVED is "leased". */
        lease_ms[k] = wait_event(s, IOT__REGISTRY__V1__WATCH_EVENT__TYPE__REMOVED) - died;
        cm_stream_cancel(s);
        cm_stream_finish(s, NULL);
    }
    qsort(check_ms, 5, sizeof(double), cmp_double);
    qsort(lease_ms, 5, sizeof(double), cmp_double);
    printf("\ninstance death -> watcher event (5 runs: median, max)\n");
    printf("  failing TCP check, interval 500 ms, 1 failure:   %6.0f ms, %6.0f ms (bound: interval + timeout)\n",
           check_ms[2], check_ms[4]);
    printf("  lapsed lease, TTL 2 s, sweep every 1 s:         %6.0f ms, %6.0f ms (bound: TTL + sweep interval)\n",
           lease_ms[2], lease_ms[4]);
    cm_channel_free(ch);
    return errs ? 1 : 0;
}
