/* Active checks: TCP connect, HTTP GET, grpc.health.v1.Health/Check. */
#include "reg_probe.h"

#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <poll.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "cm_alloc.h"
#include "cm_rpc.h"
#include "grpc/health/v1/health.pb-c.h"

#define REG__CHANNELS 256

typedef struct reg__chan_s {
    char target[300];
    cm_channel_t *ch;
    int64_t used;
    int busy; /* probes using it now; only idle channels are evicted */
} reg__chan_t;

struct reg_prober_s {
    pthread_mutex_t mu;
    reg__chan_t chans[REG__CHANNELS];
    int64_t tick;
};

reg_prober_t *reg_prober_new(void) {
    reg_prober_t *p = cm_calloc(1, sizeof *p);
    pthread_mutex_init(&p->mu, NULL);
    return p;
}

void reg_prober_free(reg_prober_t *p) {
    if (!p) return;
    for (int i = 0; i < REG__CHANNELS; i++) cm_channel_free(p->chans[i].ch);
    pthread_mutex_destroy(&p->mu);
    cm_free(p);
}

static int64_t reg__now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* Connects to address:port within timeout_ms; returns the fd or -1 with why. */
static int reg__connect(const char *address, int port, int timeout_ms, char *why, size_t cap) {
    char portstr[8];
    snprintf(portstr, sizeof portstr, "%d", port);
    struct addrinfo hints = {0}, *res = NULL;
    hints.ai_socktype = SOCK_STREAM;
    hints.ai_flags = AI_NUMERICSERV;
    int rc = getaddrinfo(address, portstr, &hints, &res);
    if (rc) {
        snprintf(why, cap, "resolve %s: %s", address, gai_strerror(rc));
        return -1;
    }
    int64_t until = reg__now_ms() + timeout_ms;
    int fd = -1;
    snprintf(why, cap, "connect %s:%d: no address", address, port);
    for (struct addrinfo *ai = res; ai && fd < 0; ai = ai->ai_next) {
        fd = socket(ai->ai_family, ai->ai_socktype | SOCK_NONBLOCK | SOCK_CLOEXEC, ai->ai_protocol);
        if (fd < 0) continue;
        if (connect(fd, ai->ai_addr, ai->ai_addrlen) == 0) break;
        if (errno == EINPROGRESS) {
            struct pollfd pf = {fd, POLLOUT, 0};
            int left = (int)(until - reg__now_ms());
            int err = 0;
            socklen_t el = sizeof err;
            if (left > 0 && poll(&pf, 1, left) == 1 && getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &el) == 0 && !err)
                break;
            snprintf(why, cap, "connect %s:%d: %s", address, port, left <= 0 || !err ? "timed out" : strerror(err));
        } else {
            snprintf(why, cap, "connect %s:%d: %s", address, port, strerror(errno));
        }
        close(fd);
        fd = -1;
    }
    freeaddrinfo(res);
    return fd;
}

static int reg__probe_tcp(const Iot__Registry__V1__Instance *in, char *why, size_t cap) {
    int fd = reg__connect(in->address, in->port, in->check->timeout_ms, why, cap);
    if (fd < 0) return 0;
    close(fd);
    return 1;
}

static int reg__probe_http(const Iot__Registry__V1__Instance *in, char *why, size_t cap) {
    int64_t until = reg__now_ms() + in->check->timeout_ms;
    int fd = reg__connect(in->address, in->port, in->check->timeout_ms, why, cap);
    if (fd < 0) return 0;
    char req[512];
    int n = snprintf(req, sizeof req, "GET %s HTTP/1.0\r\nHost: %s\r\nUser-Agent: iotsuite-registry\r\n\r\n",
                     in->check->target, in->address);
    char resp[64];
    size_t got = 0;
    int sent = 0, ok = 0;
    /* Send the request and read the status line, never waiting past the check's deadline. */
    while (got < sizeof resp - 1) {
        int left = (int)(until - reg__now_ms());
        struct pollfd pf = {fd, (short)(sent < n ? POLLOUT : POLLIN), 0};
        if (left <= 0 || poll(&pf, 1, left) != 1) {
            snprintf(why, cap, "http %s:%d%s: timed out", in->address, in->port, in->check->target);
            goto out;
        }
        if (sent < n) {
            ssize_t w = send(fd, req + sent, (size_t)(n - sent), MSG_NOSIGNAL);
            if (w <= 0) break;
            sent += (int)w;
            continue;
        }
        ssize_t r = recv(fd, resp + got, sizeof resp - 1 - got, 0);
        if (r <= 0) break;
        got += (size_t)r;
        if (memchr(resp, '\n', got)) break;
    }
    resp[got] = '\0';
    int code = 0;
    if (sscanf(resp, "HTTP/%*d.%*d %d", &code) != 1) {
        snprintf(why, cap, "http %s:%d%s: no HTTP status line", in->address, in->port, in->check->target);
    } else if (code >= 200 && code < 400) {
        ok = 1;
    } else {
        snprintf(why, cap, "http %s:%d%s: status %d", in->address, in->port, in->check->target, code);
    }
out:
    close(fd);
    return ok;
}

/* A probe channel reconnects at most a second apart: with gRPC's default backoff (up to 120 s) a
 * target that was down for minutes would keep failing checks long after it came back. Its own
 * connection, so the backoff of channels elsewhere in the process does not apply. */
static cm_channel_t *reg__probe_channel(const char *target) {
    cm_channel_opts_t o = {.own_connection = 1, .max_reconnect_backoff_ms = 1000};
    return cm_channel_new(target, &o, NULL);
}

/* The cached channel for target (created on first use), marked busy; *slot is its index, or -1
 * for a one-off channel when every cached one is busy. Release with reg__channel_release. */
static cm_channel_t *reg__channel_acquire(reg_prober_t *p, const char *target, int *slot) {
    pthread_mutex_lock(&p->mu);
    int free_slot = -1, lru = -1;
    for (int i = 0; i < REG__CHANNELS; i++) {
        reg__chan_t *c = &p->chans[i];
        if (c->ch && strcmp(c->target, target) == 0) {
            c->used = ++p->tick;
            c->busy++;
            *slot = i;
            pthread_mutex_unlock(&p->mu);
            return c->ch;
        }
        if (!c->ch && free_slot < 0) free_slot = i;
        if (c->ch && !c->busy && (lru < 0 || c->used < p->chans[lru].used)) lru = i;
    }
    int s = free_slot >= 0 ? free_slot : lru;
    cm_channel_t *ch;
    if (s < 0) {
        *slot = -1;
        ch = reg__probe_channel(target);
    } else {
        reg__chan_t *c = &p->chans[s];
        cm_channel_free(c->ch); /* idle: nobody holds it */
        snprintf(c->target, sizeof c->target, "%s", target);
        c->ch = ch = reg__probe_channel(target);
        c->used = ++p->tick;
        c->busy = 1;
        *slot = s;
    }
    pthread_mutex_unlock(&p->mu);
    return ch;
}

static void reg__channel_release(reg_prober_t *p, cm_channel_t *ch, int slot) {
    if (slot < 0) {
        cm_channel_free(ch);
        return;
    }
    pthread_mutex_lock(&p->mu);
    p->chans[slot].busy--;
    pthread_mutex_unlock(&p->mu);
}

static int reg__probe_grpc(reg_prober_t *p, const Iot__Registry__V1__Instance *in, char *why, size_t cap) {
    char target[300];
    if (strchr(in->address, ':'))
        snprintf(target, sizeof target, "[%s]:%d", in->address, in->port);
    else
        snprintf(target, sizeof target, "%s:%d", in->address, in->port);
    int slot;
    cm_channel_t *ch = reg__channel_acquire(p, target, &slot);
    Grpc__Health__V1__HealthCheckRequest req = GRPC__HEALTH__V1__HEALTH_CHECK_REQUEST__INIT;
    req.service = in->check->target;
    Grpc__Health__V1__HealthCheckResponse *resp = NULL;
    cm_rpc_status_t st = {0};
    cm_call_opts_t o = {.timeout_ms = in->check->timeout_ms};
    int code = cm_channel_unary(ch, "/grpc.health.v1.Health/Check", &req.base,
                                &grpc__health__v1__health_check_response__descriptor, (ProtobufCMessage **)&resp, &o, &st);
    reg__channel_release(p, ch, slot);
    int ok = 0;
    if (code != CM_STATUS_OK)
        snprintf(why, cap, "grpc health %s: %s %s", target, cm_status_name(code), st.message);
    else if (resp->status != GRPC__HEALTH__V1__HEALTH_CHECK_RESPONSE__SERVING_STATUS__SERVING)
        snprintf(why, cap, "grpc health %s: not serving", target);
    else
        ok = 1;
    if (resp) protobuf_c_message_free_unpacked(&resp->base, NULL);
    cm_rpc_status_clear(&st);
    return ok;
}

int reg_probe(reg_prober_t *p, const Iot__Registry__V1__Instance *inst, char *why, size_t cap) {
    why[0] = '\0';
    switch (inst->check->kind) {
    case IOT__REGISTRY__V1__CHECK__KIND__TCP: return reg__probe_tcp(inst, why, cap);
    case IOT__REGISTRY__V1__CHECK__KIND__HTTP: return reg__probe_http(inst, why, cap);
    case IOT__REGISTRY__V1__CHECK__KIND__GRPC_HEALTH: return reg__probe_grpc(p, inst, why, cap);
    default: snprintf(why, cap, "unknown check kind %d", (int)inst->check->kind); return 0;
    }
}
