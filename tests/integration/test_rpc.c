/* The gRPC layer against a real server on loopback: every call kind, deadlines, cancellation,
 * metadata, malformed and oversize messages, unknown methods, health, reflection, drain, TLS and
 * many idle streams on few threads. The server runs in this process so the tests can see what the
 * handlers observed. */
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "cm_err.h"
#include "cm_log.h"
#include "cm_metrics.h"
#include "cm_rpc.h"
#include "echo_service.h"
#include "grpc/health/v1/health.pb-c.h"
#include "grpc/reflection/v1alpha/reflection.pb-c.h"
#include "iot/testing/v1/echo.pb-c.h"
#include "proc.h"
#include "test.h"

typedef struct fixture_s {
    echo_ctx_t ctx;
    cm_service_t svc;
    cm_server_t *srv;
    cm_channel_t *ch;
    char target[64];
} fixture_t;

static void fx_start_opts(fixture_t *f, cm_server_opts_t o) {
    memset(&f->ctx, 0, sizeof f->ctx);
    echo_service_init(&f->svc, &f->ctx);
    if (!o.listen) o.listen = "127.0.0.1:0";
    o.name = "echo-test";
    int err;
    f->srv = cm_server_new(&o, &err);
    ASSERT(f->srv);
    ASSERT_INT_EQ(cm_server_add_service(f->srv, &f->svc), 0);
    ASSERT_INT_EQ(cm_server_start(f->srv), 0);
    snprintf(f->target, sizeof f->target, "127.0.0.1:%d", cm_server_port(f->srv));
    f->ch = cm_channel_new(f->target, NULL, &err);
    ASSERT(f->ch);
}

static void fx_start(fixture_t *f) {
    cm_server_opts_t o = {.threads = 2};
    fx_start_opts(f, o);
}

static void fx_stop(fixture_t *f) {
    cm_channel_free(f->ch);
    cm_server_free(f->srv);
    f->ch = NULL;
    f->srv = NULL;
}

static int echo_call(fixture_t *f, Iot__Testing__V1__EchoRequest *req, const cm_call_opts_t *o,
                     Iot__Testing__V1__EchoResponse **resp, cm_rpc_status_t *st) {
    return cm_channel_unary(f->ch, "/iot.testing.v1.Echo/Unary", &req->base, &iot__testing__v1__echo_response__descriptor,
                            (ProtobufCMessage **)resp, o, st);
}

static void test_unary_roundtrip(void) {
    fixture_t f;
    fx_start(&f);
    Iot__Testing__V1__EchoRequest req = IOT__TESTING__V1__ECHO_REQUEST__INIT;
    req.message = (char *)"hello";
    req.echo_metadata = 1;
    uint8_t bytes[3] = {0, 1, 255};
    req.payload.data = bytes;
    req.payload.len = 3;
    Iot__Testing__V1__EchoResponse *resp = NULL;
    cm_rpc_status_t st = {0};
    ASSERT_INT_EQ(echo_call(&f, &req, NULL, &resp, &st), CM_STATUS_OK);
    ASSERT_STR_EQ(resp->message, "hello");
    ASSERT_INT_EQ(resp->payload.len, 3);
    ASSERT_INT_EQ(resp->payload.data[2], 255);
    ASSERT(strncmp(resp->peer, "ipv4:127.0.0.1:", 15) == 0);
    ASSERT_INT_EQ(strlen(resp->trace_id), 32);
    /* The client set a 30 s default deadline; the handler sees most of it. */
    ASSERT(resp->deadline_ms > 25000 && resp->deadline_ms <= 30000);
    protobuf_c_message_free_unpacked(&resp->base, NULL);
    cm_rpc_status_clear(&st);
    fx_stop(&f);
}

static void test_status_code_and_message(void) {
    fixture_t f;
    fx_start(&f);
    Iot__Testing__V1__EchoRequest req = IOT__TESTING__V1__ECHO_REQUEST__INIT;
    req.status_code = CM_STATUS_NOT_FOUND;
    req.status_message = (char *)"device d-42 not found";
    Iot__Testing__V1__EchoResponse *resp = NULL;
    cm_rpc_status_t st = {0};
    ASSERT_INT_EQ(echo_call(&f, &req, NULL, &resp, &st), CM_STATUS_NOT_FOUND);
    ASSERT(resp == NULL);
    ASSERT_STR_EQ(st.message, "device d-42 not found");
    cm_rpc_status_clear(&st);
    fx_stop(&f);
}

static void test_metadata_roundtrip(void) {
    fixture_t f;
    fx_start(&f);
    Iot__Testing__V1__EchoRequest req = IOT__TESTING__V1__ECHO_REQUEST__INIT;
    req.echo_metadata = 1;
    cm_md_t md[] = {{"x-echo", "abc", 0}, {"x-tenant", "acme", 0}};
    cm_call_opts_t o = {.md = md, .n_md = 2};
    Iot__Testing__V1__EchoResponse *resp = NULL;
    cm_rpc_status_t st = {0};
    ASSERT_INT_EQ(echo_call(&f, &req, &o, &resp, &st), CM_STATUS_OK);
    int seen = 0;
    for (size_t i = 0; i < resp->n_metadata; i++)
        if (strcmp(resp->metadata[i]->key, "x-tenant") == 0 && strcmp(resp->metadata[i]->value, "acme") == 0) seen = 1;
    ASSERT(seen);
    ASSERT_STR_EQ(cm_rpc_status_md(&st, "x-echo-initial"), "abc");
    ASSERT_STR_EQ(cm_rpc_status_md(&st, "x-echo-trailing"), "abc");
    protobuf_c_message_free_unpacked(&resp->base, NULL);
    cm_rpc_status_clear(&st);
    fx_stop(&f);
}

static void test_traceparent_propagated(void) {
    fixture_t f;
    fx_start(&f);
    cm_trace_t t;
    ASSERT_INT_EQ(cm_trace_parse(&t, "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", 55), 0);
    const cm_trace_t *prev = cm_trace_set_current(&t);
    Iot__Testing__V1__EchoRequest req = IOT__TESTING__V1__ECHO_REQUEST__INIT;
    req.echo_metadata = 1;
    Iot__Testing__V1__EchoResponse *resp = NULL;
    ASSERT_INT_EQ(echo_call(&f, &req, NULL, &resp, NULL), CM_STATUS_OK);
    cm_trace_set_current(prev);
    ASSERT_STR_EQ(resp->trace_id, "4bf92f3577b34da6a3ce929d0e0e4736");
    protobuf_c_message_free_unpacked(&resp->base, NULL);
    /* Malformed traceparent values are rejected, so the server starts a new trace. */
    ASSERT(cm_trace_parse(&t, "00-00000000000000000000000000000000-00f067aa0ba902b7-01", 55) != 0);
    ASSERT(cm_trace_parse(&t, "zz-4bf92f3577b34da6a3ce929d0e0e4736", 35) != 0);
    fx_stop(&f);
}

static void test_client_stream(void) {
    fixture_t f;
    fx_start(&f);
    cm_stream_t *s = cm_stream_open(f.ch, "/iot.testing.v1.Echo/ClientStream", NULL);
    const char *parts[] = {"a", "bc", "def"};
    for (int i = 0; i < 3; i++) {
        Iot__Testing__V1__EchoRequest req = IOT__TESTING__V1__ECHO_REQUEST__INIT;
        req.message = (char *)parts[i];
        ASSERT_INT_EQ(cm_stream_send(s, &req.base), 0);
    }
    ASSERT_INT_EQ(cm_stream_close_send(s), 0);
    Iot__Testing__V1__EchoResponse *resp = NULL;
    ASSERT_INT_EQ(cm_stream_recv(s, &iot__testing__v1__echo_response__descriptor, (ProtobufCMessage **)&resp), 1);
    ASSERT_STR_EQ(resp->message, "abcdef");
    protobuf_c_message_free_unpacked(&resp->base, NULL);
    ASSERT_INT_EQ(cm_stream_finish(s, NULL), CM_STATUS_OK);
    fx_stop(&f);
}

static void test_client_stream_error_midway(void) {
    fixture_t f;
    fx_start(&f);
    cm_stream_t *s = cm_stream_open(f.ch, "/iot.testing.v1.Echo/ClientStream", NULL);
    Iot__Testing__V1__EchoRequest req = IOT__TESTING__V1__ECHO_REQUEST__INIT;
    req.message = (char *)"x";
    cm_stream_send(s, &req.base);
    req.status_code = CM_STATUS_INVALID_ARGUMENT;
    req.status_message = (char *)"point 2: value is NaN";
    cm_stream_send(s, &req.base);
    cm_stream_close_send(s);
    cm_rpc_status_t st = {0};
    ASSERT_INT_EQ(cm_stream_finish(s, &st), CM_STATUS_INVALID_ARGUMENT);
    ASSERT_STR_EQ(st.message, "point 2: value is NaN");
    cm_rpc_status_clear(&st);
    fx_stop(&f);
}

static void test_server_stream(void) {
    fixture_t f;
    fx_start(&f);
    Iot__Testing__V1__EchoRequest req = IOT__TESTING__V1__ECHO_REQUEST__INIT;
    req.message = (char *)"tick";
    req.repeat = 50;
    cm_stream_t *s = cm_stream_open(f.ch, "/iot.testing.v1.Echo/ServerStream", NULL);
    ASSERT_INT_EQ(cm_stream_send(s, &req.base), 0);
    ASSERT_INT_EQ(cm_stream_close_send(s), 0);
    int n = 0;
    Iot__Testing__V1__EchoResponse *resp;
    while (cm_stream_recv(s, &iot__testing__v1__echo_response__descriptor, (ProtobufCMessage **)&resp) == 1) {
        ASSERT_INT_EQ(resp->index, n);
        ASSERT_STR_EQ(resp->message, "tick");
        protobuf_c_message_free_unpacked(&resp->base, NULL);
        n++;
    }
    ASSERT_INT_EQ(n, 50);
    ASSERT_INT_EQ(cm_stream_finish(s, NULL), CM_STATUS_OK);
    fx_stop(&f);
}

/* cm_stream_recv_wait: a quiet stream times out without losing the receive in flight; the message
 * arrives on a later wait; a cancel while a receive is pending ends the stream cleanly. */
static void test_server_stream_recv_wait(void) {
    fixture_t f;
    fx_start(&f);
    Iot__Testing__V1__EchoRequest req = IOT__TESTING__V1__ECHO_REQUEST__INIT;
    req.message = (char *)"slow";
    req.repeat = 3;
    req.delay_ms = 300;
    cm_stream_t *s = cm_stream_open(f.ch, "/iot.testing.v1.Echo/ServerStream", NULL);
    ASSERT_INT_EQ(cm_stream_send(s, &req.base), 0);
    ASSERT_INT_EQ(cm_stream_close_send(s), 0);
    Iot__Testing__V1__EchoResponse *resp = NULL;
    int timeouts = 0, n = 0;
    while (n < 2) {
        int rc = cm_stream_recv_wait(s, &iot__testing__v1__echo_response__descriptor, 50, (ProtobufCMessage **)&resp);
        if (rc == CM_ETIMEOUT) {
            ASSERT(resp == NULL);
            timeouts++;
            continue;
        }
        ASSERT_INT_EQ(rc, 1);
        ASSERT_INT_EQ(resp->index, n);
        protobuf_c_message_free_unpacked(&resp->base, NULL);
        n++;
    }
    ASSERT(timeouts >= 4); /* 300 ms apart, 50 ms waits */
    /* The third is 300 ms away: a wait times out, then the caller gives up on the stream. */
    ASSERT_INT_EQ(cm_stream_recv_wait(s, &iot__testing__v1__echo_response__descriptor, 10, (ProtobufCMessage **)&resp), CM_ETIMEOUT);
    cm_stream_cancel(s);
    ASSERT_INT_EQ(cm_stream_finish(s, NULL), CM_STATUS_CANCELLED);
    fx_stop(&f);
}

/* Pull-style server streams (cm_method_t.writable): every message arrives in order, a slow reader
 * holds the server back (it sends only what the client takes, plus what the transport's window
 * holds), a status set by writable() ends the stream, and a cancel mid-stream releases the call. */
static void test_server_stream_paced(void) {
    fixture_t f;
    fx_start(&f);
    enum { N = 1000, SZ = 64 * 1024 };
    uint8_t *payload = malloc(SZ);
    for (int i = 0; i < SZ; i++) payload[i] = (uint8_t)(i * 7);
    Iot__Testing__V1__EchoRequest req = IOT__TESTING__V1__ECHO_REQUEST__INIT;
    req.message = (char *)"paced";
    req.repeat = N;
    req.paced = 1;
    req.payload.data = payload;
    req.payload.len = SZ;
    cm_channel_opts_t co = {.max_recv_bytes = 1 << 20};
    cm_channel_t *ch = cm_channel_new(f.target, &co, NULL);
    cm_stream_t *s = cm_stream_open(ch, "/iot.testing.v1.Echo/ServerStream", NULL);
    ASSERT_INT_EQ(cm_stream_send(s, &req.base), 0);
    ASSERT_INT_EQ(cm_stream_close_send(s), 0);
    Iot__Testing__V1__EchoResponse *resp;
    for (int i = 0; i < 3; i++) {
        ASSERT_INT_EQ(cm_stream_recv(s, &iot__testing__v1__echo_response__descriptor, (ProtobufCMessage **)&resp), 1);
        ASSERT_INT_EQ(resp->index, i);
        protobuf_c_message_free_unpacked(&resp->base, NULL);
    }
    usleep(300000);
    /* 64 MB on offer; the server may run ahead of the reader only by the flow-control windows. */
    int ahead = atomic_load(&f.ctx.paced_sent);
    printf("# paced: %d of %d sent while the client had read 3\n", ahead, N);
    ASSERT(ahead < 200);
    int n = 3;
    while (cm_stream_recv(s, &iot__testing__v1__echo_response__descriptor, (ProtobufCMessage **)&resp) == 1) {
        ASSERT_INT_EQ(resp->index, n);
        ASSERT_INT_EQ((int)resp->payload.len, SZ);
        ASSERT(memcmp(resp->payload.data, payload, SZ) == 0);
        protobuf_c_message_free_unpacked(&resp->base, NULL);
        n++;
    }
    ASSERT_INT_EQ(n, N);
    ASSERT_INT_EQ(cm_stream_finish(s, NULL), CM_STATUS_OK);

    /* The status writable() returns reaches the client after the messages. */
    req.repeat = 5;
    req.status_code = CM_STATUS_DATA_LOSS;
    s = cm_stream_open(ch, "/iot.testing.v1.Echo/ServerStream", NULL);
    cm_stream_send(s, &req.base);
    cm_stream_close_send(s);
    for (n = 0; cm_stream_recv(s, &iot__testing__v1__echo_response__descriptor, (ProtobufCMessage **)&resp) == 1; n++)
        protobuf_c_message_free_unpacked(&resp->base, NULL);
    ASSERT_INT_EQ(n, 5);
    cm_rpc_status_t st = {0};
    ASSERT_INT_EQ(cm_stream_finish(s, &st), CM_STATUS_DATA_LOSS);
    ASSERT_STR_EQ(st.message, "paced stream ends");
    cm_rpc_status_clear(&st);

    /* Cancelled after one message: done() runs, nothing is left. */
    req.repeat = N;
    req.status_code = 0;
    s = cm_stream_open(ch, "/iot.testing.v1.Echo/ServerStream", NULL);
    cm_stream_send(s, &req.base);
    cm_stream_close_send(s);
    ASSERT_INT_EQ(cm_stream_recv(s, &iot__testing__v1__echo_response__descriptor, (ProtobufCMessage **)&resp), 1);
    protobuf_c_message_free_unpacked(&resp->base, NULL);
    cm_stream_cancel(s);
    ASSERT_INT_EQ(cm_stream_finish(s, NULL), CM_STATUS_CANCELLED);
    for (int i = 0; i < 200 && (atomic_load(&f.ctx.stream_cancels) < 1 || cm_server_live_calls(f.srv) > 0); i++)
        usleep(10000);
    ASSERT_INT_EQ(atomic_load(&f.ctx.stream_cancels), 1);
    ASSERT_INT_EQ(cm_server_live_calls(f.srv), 0);
    cm_channel_free(ch);
    free(payload);
    fx_stop(&f);
}

/* Waits until every buffer the "tail" stream made has been released (ASan catches a second one). */
static void wait_tails_released(fixture_t *f) {
    for (int i = 0; i < 300 && (atomic_load(&f->ctx.tail_released) < atomic_load(&f->ctx.tail_made) ||
                                cm_server_live_calls(f->srv) > 0); i++)
        usleep(10000);
    ASSERT_INT_EQ(atomic_load(&f->ctx.tail_released), atomic_load(&f->ctx.tail_made));
}

/* Bulk data without copies: cm_call_send_tail on the server (the payload goes out from the
 * handler's buffer and is released exactly once: after writing, when the queue is full, after a
 * cancel, and at once for a field that is not singular bytes), and cm_stream_recv_view on the
 * client (the payload is read in place from the stream's buffer, the message from an arena). */
static void test_server_stream_send_tail(void) {
    fixture_t f;
    cm_server_opts_t o = {.threads = 2, .max_send_queue = 4};
    fx_start_opts(&f, o);
    enum { N = 100, SZ = 64 * 1024 + 3 };
    uint8_t *payload = malloc(SZ);
    for (int i = 0; i < SZ; i++) payload[i] = (uint8_t)(i * 13 + 1);
    Iot__Testing__V1__EchoRequest req = IOT__TESTING__V1__ECHO_REQUEST__INIT;
    req.message = (char *)"tail";
    req.repeat = N;
    req.payload.data = payload;
    req.payload.len = SZ;
    cm_channel_opts_t co = {.max_recv_bytes = 1 << 20};
    cm_channel_t *ch = cm_channel_new(f.target, &co, NULL);
    cm_stream_t *s = cm_stream_open(ch, "/iot.testing.v1.Echo/ServerStream", NULL);
    ASSERT_INT_EQ(cm_stream_send(s, &req.base), 0);
    ASSERT_INT_EQ(cm_stream_close_send(s), 0);
    cm_arena_t a;
    cm_arena_init(&a, NULL, 0);
    Iot__Testing__V1__EchoResponse *resp;
    int n = 0;
    while (cm_stream_recv_view(s, &iot__testing__v1__echo_response__descriptor, &a, (ProtobufCMessage **)&resp) == 1) {
        if (n == 2) usleep(300000); /* a slow reader: the server's queue of 4 fills and it retries */
        ASSERT_STR_EQ(resp->message, "tail");
        ASSERT_INT_EQ(resp->index, n);
        ASSERT_INT_EQ((int)resp->payload.len, SZ);
        ASSERT(memcmp(resp->payload.data, payload, SZ) == 0);
        cm_arena_reset(&a);
        n++;
    }
    ASSERT_INT_EQ(n, N);
    ASSERT_INT_EQ(cm_stream_finish(s, NULL), CM_STATUS_OK);
    wait_tails_released(&f);
    ASSERT_INT_EQ(atomic_load(&f.ctx.tail_einval), 2);
    int refused = atomic_load(&f.ctx.tail_refused);
    printf("# send_tail: %d buffers, %d sends refused while the queue was full\n", atomic_load(&f.ctx.tail_made), refused);
    ASSERT(refused > 0);
    ASSERT_INT_EQ(atomic_load(&f.ctx.tail_made), N + 2 + refused);

    /* Static data needs no release. */
    req.message = (char *)"tail-static";
    req.repeat = 2;
    s = cm_stream_open(ch, "/iot.testing.v1.Echo/ServerStream", NULL);
    cm_stream_send(s, &req.base);
    cm_stream_close_send(s);
    for (n = 0; cm_stream_recv_view(s, &iot__testing__v1__echo_response__descriptor, &a, (ProtobufCMessage **)&resp) == 1; n++) {
        ASSERT_INT_EQ((int)resp->payload.len, (int)sizeof "static bytes that outlive every call");
        ASSERT_STR_EQ((const char *)resp->payload.data, "static bytes that outlive every call");
        cm_arena_reset(&a);
    }
    ASSERT_INT_EQ(n, 2);
    ASSERT_INT_EQ(cm_stream_finish(s, NULL), CM_STATUS_OK);

    /* Cancelled mid-stream: what was queued and what the handler still tries goes back too. */
    req.message = (char *)"tail";
    req.repeat = N;
    s = cm_stream_open(ch, "/iot.testing.v1.Echo/ServerStream", NULL);
    cm_stream_send(s, &req.base);
    cm_stream_close_send(s);
    ASSERT_INT_EQ(cm_stream_recv_view(s, &iot__testing__v1__echo_response__descriptor, &a, (ProtobufCMessage **)&resp), 1);
    ASSERT_INT_EQ(resp->index, 0);
    cm_stream_cancel(s);
    ASSERT_INT_EQ(cm_stream_finish(s, NULL), CM_STATUS_CANCELLED);
    wait_tails_released(&f);
    ASSERT_INT_EQ(cm_server_live_calls(f.srv), 0);

    /* A message that does not parse is CM_EDECODE, as with cm_stream_recv. */
    s = cm_stream_open(ch, "/iot.testing.v1.Echo/ServerStream", NULL);
    req.repeat = 1;
    cm_stream_send(s, &req.base);
    cm_stream_close_send(s);
    ProtobufCMessage *bad = NULL;
    ASSERT_INT_EQ(cm_stream_recv_view(s, &iot__testing__v1__stream_summary__descriptor, &a, &bad), CM_EDECODE);
    ASSERT(bad == NULL);
    cm_stream_cancel(s);
    cm_stream_finish(s, NULL);
    wait_tails_released(&f);

    cm_arena_free(&a);
    cm_channel_free(ch);
    free(payload);
    fx_stop(&f);
}

static void test_bidi(void) {
    fixture_t f;
    fx_start(&f);
    cm_stream_t *s = cm_stream_open(f.ch, "/iot.testing.v1.Echo/Bidi", NULL);
    for (int i = 0; i < 20; i++) {
        char msg[16];
        snprintf(msg, sizeof msg, "m%d", i);
        Iot__Testing__V1__EchoRequest req = IOT__TESTING__V1__ECHO_REQUEST__INIT;
        req.message = msg;
        ASSERT_INT_EQ(cm_stream_send(s, &req.base), 0);
        Iot__Testing__V1__EchoResponse *resp;
        ASSERT_INT_EQ(cm_stream_recv(s, &iot__testing__v1__echo_response__descriptor, (ProtobufCMessage **)&resp), 1);
        ASSERT_STR_EQ(resp->message, msg);
        ASSERT_INT_EQ(resp->index, i);
        protobuf_c_message_free_unpacked(&resp->base, NULL);
    }
    cm_stream_close_send(s);
    ProtobufCMessage *none;
    ASSERT_INT_EQ(cm_stream_recv(s, &iot__testing__v1__echo_response__descriptor, &none), 0);
    ASSERT_INT_EQ(cm_stream_finish(s, NULL), CM_STATUS_OK);
    fx_stop(&f);
}

static void test_deadline_exceeded(void) {
    fixture_t f;
    fx_start(&f);
    Iot__Testing__V1__EchoRequest req = IOT__TESTING__V1__ECHO_REQUEST__INIT;
    req.delay_ms = 2000;
    cm_call_opts_t o = {.timeout_ms = 100};
    Iot__Testing__V1__EchoResponse *resp = NULL;
    cm_rpc_status_t st = {0};
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    ASSERT_INT_EQ(echo_call(&f, &req, &o, &resp, &st), CM_STATUS_DEADLINE_EXCEEDED);
    clock_gettime(CLOCK_MONOTONIC, &t1);
    double ms = (double)(t1.tv_sec - t0.tv_sec) * 1e3 + (double)(t1.tv_nsec - t0.tv_nsec) / 1e6;
    ASSERT(ms < 1500); /* the client did not wait for the handler */
    cm_rpc_status_clear(&st);
    fx_stop(&f);
}

static void test_cancel_seen_by_handler(void) {
    fixture_t f;
    fx_start(&f);
    /* Unary handler polling cm_call_cancelled(). */
    Iot__Testing__V1__EchoRequest req = IOT__TESTING__V1__ECHO_REQUEST__INIT;
    cm_call_opts_t o = {.timeout_ms = 200};
    Iot__Testing__V1__EchoResponse *resp = NULL;
    ASSERT_INT_EQ(cm_channel_unary(f.ch, "/iot.testing.v1.Echo/WaitForCancel", &req.base,
                                   &iot__testing__v1__echo_response__descriptor, (ProtobufCMessage **)&resp, &o, NULL),
                  CM_STATUS_DEADLINE_EXCEEDED);
    /* Streaming call cancelled by the client: the handler's loop stops and done() reports it. */
    req.repeat = 1000000;
    req.delay_ms = 1;
    cm_stream_t *s = cm_stream_open(f.ch, "/iot.testing.v1.Echo/ServerStream", NULL);
    cm_stream_send(s, &req.base);
    cm_stream_close_send(s);
    Iot__Testing__V1__EchoResponse *r;
    ASSERT_INT_EQ(cm_stream_recv(s, &iot__testing__v1__echo_response__descriptor, (ProtobufCMessage **)&r), 1);
    protobuf_c_message_free_unpacked(&r->base, NULL);
    cm_stream_cancel(s);
    ASSERT_INT_EQ(cm_stream_finish(s, NULL), CM_STATUS_CANCELLED);
    for (int i = 0; i < 200 && (atomic_load(&f.ctx.cancels_seen) < 1 || atomic_load(&f.ctx.stream_cancels) < 1); i++)
        usleep(10000);
    ASSERT_INT_EQ(atomic_load(&f.ctx.cancels_seen), 1);
    ASSERT_INT_EQ(atomic_load(&f.ctx.stream_cancels), 1);
    /* Nothing is left behind: every call was released. */
    for (int i = 0; i < 200 && cm_server_live_calls(f.srv) > 0; i++) usleep(10000);
    ASSERT_INT_EQ(cm_server_live_calls(f.srv), 0);
    fx_stop(&f);
}

static void test_malformed_message(void) {
    fixture_t f;
    fx_start(&f);
    /* StreamSummary's field 1 is a varint; EchoRequest's field 1 is a string: not decodable. */
    Iot__Testing__V1__StreamSummary bad = IOT__TESTING__V1__STREAM_SUMMARY__INIT;
    bad.messages = 7;
    ProtobufCMessage *resp = NULL;
    cm_rpc_status_t st = {0};
    ASSERT_INT_EQ(cm_channel_unary(f.ch, "/iot.testing.v1.Echo/Unary", &bad.base,
                                   &iot__testing__v1__echo_response__descriptor, &resp, NULL, &st),
                  CM_STATUS_INVALID_ARGUMENT);
    ASSERT(strstr(st.message, "iot.testing.v1.EchoRequest"));
    cm_rpc_status_clear(&st);
    /* Also inside a stream. */
    cm_stream_t *s = cm_stream_open(f.ch, "/iot.testing.v1.Echo/Bidi", NULL);
    cm_stream_send(s, &bad.base);
    cm_stream_close_send(s);
    ASSERT_INT_EQ(cm_stream_finish(s, NULL), CM_STATUS_INVALID_ARGUMENT);
    fx_stop(&f);
}

static void test_oversize_message(void) {
    fixture_t f;
    cm_server_opts_t o = {.threads = 2, .max_recv_bytes = 64 * 1024};
    fx_start_opts(&f, o);
    Iot__Testing__V1__EchoRequest req = IOT__TESTING__V1__ECHO_REQUEST__INIT;
    size_t n = 100 * 1024;
    uint8_t *big = calloc(1, n);
    req.payload.data = big;
    req.payload.len = n;
    Iot__Testing__V1__EchoResponse *resp = NULL;
    cm_rpc_status_t st = {0};
    ASSERT_INT_EQ(echo_call(&f, &req, NULL, &resp, &st), CM_STATUS_RESOURCE_EXHAUSTED);
    cm_rpc_status_clear(&st);
    /* A message under the limit still works on the same channel. */
    req.payload.len = 1024;
    ASSERT_INT_EQ(echo_call(&f, &req, NULL, &resp, NULL), CM_STATUS_OK);
    protobuf_c_message_free_unpacked(&resp->base, NULL);
    free(big);
    fx_stop(&f);
}

static void test_unknown_method(void) {
    fixture_t f;
    fx_start(&f);
    Iot__Testing__V1__EchoRequest req = IOT__TESTING__V1__ECHO_REQUEST__INIT;
    ProtobufCMessage *resp = NULL;
    cm_rpc_status_t st = {0};
    cm_call_opts_t o = {.timeout_ms = 5000};
    ASSERT_INT_EQ(cm_channel_unary(f.ch, "/iot.testing.v1.Echo/NoSuchMethod", &req.base,
                                   &iot__testing__v1__echo_response__descriptor, &resp, &o, &st),
                  CM_STATUS_UNIMPLEMENTED);
    ASSERT(strstr(st.message, "/iot.testing.v1.Echo/NoSuchMethod"));
    cm_rpc_status_clear(&st);
    ASSERT_INT_EQ(cm_channel_unary(f.ch, "/no.Such/Service", &req.base, &iot__testing__v1__echo_response__descriptor,
                                   &resp, &o, NULL),
                  CM_STATUS_UNIMPLEMENTED);
    fx_stop(&f);
}

static int health_check(fixture_t *f, const char *service, int *status) {
    Grpc__Health__V1__HealthCheckRequest req = GRPC__HEALTH__V1__HEALTH_CHECK_REQUEST__INIT;
    req.service = (char *)service;
    Grpc__Health__V1__HealthCheckResponse *resp = NULL;
    int code = cm_channel_unary(f->ch, "/grpc.health.v1.Health/Check", &req.base,
                                &grpc__health__v1__health_check_response__descriptor, (ProtobufCMessage **)&resp, NULL, NULL);
    if (resp) {
        *status = resp->status;
        protobuf_c_message_free_unpacked(&resp->base, NULL);
    }
    return code;
}

static int watch_next(cm_stream_t *s) {
    Grpc__Health__V1__HealthCheckResponse *r = NULL;
    if (cm_stream_recv(s, &grpc__health__v1__health_check_response__descriptor, (ProtobufCMessage **)&r) != 1) return -1;
    int v = r->status;
    protobuf_c_message_free_unpacked(&r->base, NULL);
    return v;
}

static void test_health_check_and_watch(void) {
    fixture_t f;
    fx_start(&f);
    int status = -1;
    ASSERT_INT_EQ(health_check(&f, "", &status), CM_STATUS_OK);
    ASSERT_INT_EQ(status, CM_HEALTH_SERVING);
    ASSERT_INT_EQ(health_check(&f, "iot.testing.v1.Echo", &status), CM_STATUS_OK);
    ASSERT_INT_EQ(status, CM_HEALTH_SERVING);
    ASSERT_INT_EQ(health_check(&f, "no.such.Service", &status), CM_STATUS_NOT_FOUND);

    Grpc__Health__V1__HealthCheckRequest req = GRPC__HEALTH__V1__HEALTH_CHECK_REQUEST__INIT;
    req.service = (char *)"iot.testing.v1.Echo";
    cm_stream_t *s = cm_stream_open(f.ch, "/grpc.health.v1.Health/Watch", NULL);
    cm_stream_send(s, &req.base);
    cm_stream_close_send(s);
    ASSERT_INT_EQ(watch_next(s), CM_HEALTH_SERVING);
    cm_server_set_health(f.srv, "iot.testing.v1.Echo", CM_HEALTH_NOT_SERVING);
    ASSERT_INT_EQ(watch_next(s), CM_HEALTH_NOT_SERVING);
    ASSERT_INT_EQ(health_check(&f, "iot.testing.v1.Echo", &status), CM_STATUS_OK);
    ASSERT_INT_EQ(status, CM_HEALTH_NOT_SERVING);
    cm_server_set_health(f.srv, "iot.testing.v1.Echo", CM_HEALTH_SERVING);
    ASSERT_INT_EQ(watch_next(s), CM_HEALTH_SERVING);

    /* Watching an unknown service: SERVICE_UNKNOWN, then its status once it appears. */
    req.service = (char *)"later.Service";
    cm_stream_t *s2 = cm_stream_open(f.ch, "/grpc.health.v1.Health/Watch", NULL);
    cm_stream_send(s2, &req.base);
    cm_stream_close_send(s2);
    ASSERT_INT_EQ(watch_next(s2), GRPC__HEALTH__V1__HEALTH_CHECK_RESPONSE__SERVING_STATUS__SERVICE_UNKNOWN);
    cm_server_set_health(f.srv, "later.Service", CM_HEALTH_SERVING);
    ASSERT_INT_EQ(watch_next(s2), CM_HEALTH_SERVING);

    /* Shutdown: watchers see NOT_SERVING and their stream ends promptly, not after the grace period. */
    cm_server_shutdown(f.srv);
    ASSERT_INT_EQ(watch_next(s), CM_HEALTH_NOT_SERVING);
    ASSERT_INT_EQ(watch_next(s), -1);
    ASSERT_INT_EQ(cm_stream_finish(s, NULL), CM_STATUS_UNAVAILABLE);
    ASSERT_INT_EQ(watch_next(s2), CM_HEALTH_NOT_SERVING);
    cm_stream_finish(s2, NULL);
    fx_stop(&f);
}

static Grpc__Reflection__V1alpha__ServerReflectionResponse *reflect(cm_stream_t *s,
                                                                     Grpc__Reflection__V1alpha__ServerReflectionRequest *req) {
    Grpc__Reflection__V1alpha__ServerReflectionResponse *r = NULL;
    if (cm_stream_send(s, &req->base) != 0) return NULL;
    if (cm_stream_recv(s, &grpc__reflection__v1alpha__server_reflection_response__descriptor, (ProtobufCMessage **)&r) != 1)
        return NULL;
    return r;
}

static void test_reflection(void) {
    fixture_t f;
    fx_start(&f);
    cm_stream_t *s = cm_stream_open(f.ch, "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo", NULL);
    Grpc__Reflection__V1alpha__ServerReflectionRequest req = GRPC__REFLECTION__V1ALPHA__SERVER_REFLECTION_REQUEST__INIT;
    req.message_request_case = GRPC__REFLECTION__V1ALPHA__SERVER_REFLECTION_REQUEST__MESSAGE_REQUEST_LIST_SERVICES;
    req.list_services = (char *)"";
    Grpc__Reflection__V1alpha__ServerReflectionResponse *r = reflect(s, &req);
    ASSERT(r);
    ASSERT_INT_EQ(r->message_response_case,
                  GRPC__REFLECTION__V1ALPHA__SERVER_REFLECTION_RESPONSE__MESSAGE_RESPONSE_LIST_SERVICES_RESPONSE);
    int echo = 0, health = 0, refl = 0;
    for (size_t i = 0; i < r->list_services_response->n_service; i++) {
        const char *n = r->list_services_response->service[i]->name;
        echo |= strcmp(n, "iot.testing.v1.Echo") == 0;
        health |= strcmp(n, "grpc.health.v1.Health") == 0;
        refl |= strcmp(n, "grpc.reflection.v1alpha.ServerReflection") == 0;
    }
    ASSERT(echo && health && refl);
    protobuf_c_message_free_unpacked(&r->base, NULL);

    req.message_request_case = GRPC__REFLECTION__V1ALPHA__SERVER_REFLECTION_REQUEST__MESSAGE_REQUEST_FILE_CONTAINING_SYMBOL;
    req.file_containing_symbol = (char *)"iot.testing.v1.Echo";
    r = reflect(s, &req);
    ASSERT(r);
    ASSERT_INT_EQ(r->message_response_case,
                  GRPC__REFLECTION__V1ALPHA__SERVER_REFLECTION_RESPONSE__MESSAGE_RESPONSE_FILE_DESCRIPTOR_RESPONSE);
    ASSERT(r->file_descriptor_response->n_file_descriptor_proto >= 1);
    ProtobufCBinaryData fd = r->file_descriptor_response->file_descriptor_proto[0];
    ASSERT(memmem(fd.data, fd.len, "iot/testing/v1/echo.proto", 25));
    protobuf_c_message_free_unpacked(&r->base, NULL);

    req.file_containing_symbol = (char *)"iot.testing.v1.Echo.Unary"; /* a method */
    r = reflect(s, &req);
    ASSERT(r);
    ASSERT_INT_EQ(r->message_response_case,
                  GRPC__REFLECTION__V1ALPHA__SERVER_REFLECTION_RESPONSE__MESSAGE_RESPONSE_FILE_DESCRIPTOR_RESPONSE);
    protobuf_c_message_free_unpacked(&r->base, NULL);

    req.message_request_case = GRPC__REFLECTION__V1ALPHA__SERVER_REFLECTION_REQUEST__MESSAGE_REQUEST_FILE_BY_FILENAME;
    req.file_by_filename = (char *)"grpc/health/v1/health.proto";
    r = reflect(s, &req);
    ASSERT(r);
    ASSERT_INT_EQ(r->message_response_case,
                  GRPC__REFLECTION__V1ALPHA__SERVER_REFLECTION_RESPONSE__MESSAGE_RESPONSE_FILE_DESCRIPTOR_RESPONSE);
    protobuf_c_message_free_unpacked(&r->base, NULL);

    req.file_by_filename = (char *)"nope.proto";
    r = reflect(s, &req);
    ASSERT(r);
    ASSERT_INT_EQ(r->message_response_case,
                  GRPC__REFLECTION__V1ALPHA__SERVER_REFLECTION_RESPONSE__MESSAGE_RESPONSE_ERROR_RESPONSE);
    ASSERT_INT_EQ(r->error_response->error_code, CM_STATUS_NOT_FOUND);
    protobuf_c_message_free_unpacked(&r->base, NULL);
    cm_stream_close_send(s);
    ASSERT_INT_EQ(cm_stream_finish(s, NULL), CM_STATUS_OK);
    fx_stop(&f);
}

typedef struct slow_call_s {
    fixture_t *f;
    int delay_ms;
    int code;
} slow_call_t;

static void *slow_call_thread(void *arg) {
    slow_call_t *sc = arg;
    Iot__Testing__V1__EchoRequest req = IOT__TESTING__V1__ECHO_REQUEST__INIT;
    req.message = (char *)"slow";
    req.delay_ms = sc->delay_ms;
    Iot__Testing__V1__EchoResponse *resp = NULL;
    sc->code = echo_call(sc->f, &req, NULL, &resp, NULL);
    if (resp) protobuf_c_message_free_unpacked(&resp->base, NULL);
    return NULL;
}

static void test_blocking_handler_does_not_stall_others(void) {
    /* Two workers; one handler sleeps (as a slow Postgres query would). Other calls are served
     * while it is still in flight: the blocked worker holds only its own call. */
    fixture_t f;
    cm_server_opts_t o = {.threads = 2};
    fx_start_opts(&f, o);
    /* Long enough that a loaded machine still serves the quick calls well inside it. */
    slow_call_t sc = {&f, 2000, -1};
    pthread_t th;
    pthread_create(&th, NULL, slow_call_thread, &sc);
    for (int i = 0; i < 200 && cm_server_live_calls(f.srv) == 0; i++) usleep(5000);
    Iot__Testing__V1__EchoRequest req = IOT__TESTING__V1__ECHO_REQUEST__INIT;
    for (int i = 0; i < 50; i++) {
        Iot__Testing__V1__EchoResponse *resp = NULL;
        ASSERT_INT_EQ(echo_call(&f, &req, NULL, &resp, NULL), CM_STATUS_OK);
        protobuf_c_message_free_unpacked(&resp->base, NULL);
    }
    ASSERT_INT_EQ(sc.code, -1); /* the slow call is still running */
    pthread_join(th, NULL);
    ASSERT_INT_EQ(sc.code, CM_STATUS_OK);
    fx_stop(&f);
}

/* Regression: the arena was reset after the first receive was posted, so a first message already
 * in flight could be decoded on another worker into an arena being reset. Many streams, each
 * sending at once a payload large enough to need an arena chunk, must all echo intact. */
static void test_bidi_first_message_not_corrupted(void) {
    fixture_t f;
    cm_server_opts_t o = {.threads = 4};
    fx_start_opts(&f, o);
    enum { N = 200, LEN = 6000 };
    uint8_t *payload = malloc(LEN);
    for (int k = 0; k < LEN; k++) payload[k] = (uint8_t)(k * 7 + 3);
    for (int i = 0; i < N; i++) {
        cm_stream_t *s = cm_stream_open(f.ch, "/iot.testing.v1.Echo/Bidi", NULL);
        Iot__Testing__V1__EchoRequest req = IOT__TESTING__V1__ECHO_REQUEST__INIT;
        req.message = (char *)"first";
        req.payload.data = payload;
        req.payload.len = LEN;
        ASSERT_INT_EQ(cm_stream_send(s, &req.base), 0);
        cm_stream_close_send(s);
        Iot__Testing__V1__EchoResponse *r;
        ASSERT_INT_EQ(cm_stream_recv(s, &iot__testing__v1__echo_response__descriptor, (ProtobufCMessage **)&r), 1);
        ASSERT_STR_EQ(r->message, "first");
        ASSERT_INT_EQ(r->payload.len, LEN);
        ASSERT(memcmp(r->payload.data, payload, LEN) == 0);
        protobuf_c_message_free_unpacked(&r->base, NULL);
        ASSERT_INT_EQ(cm_stream_finish(s, NULL), CM_STATUS_OK);
    }
    free(payload);
    fx_stop(&f);
}

/* Regression: an illegal header value made grpc_call_start_batch fail and the server abort. */
static void test_illegal_metadata_is_refused_not_fatal(void) {
    fixture_t f;
    fx_start(&f);
    Iot__Testing__V1__EchoRequest req = IOT__TESTING__V1__ECHO_REQUEST__INIT;
    req.message = (char *)"add-illegal-metadata";
    Iot__Testing__V1__EchoResponse *resp = NULL;
    cm_rpc_status_t st = {0};
    ASSERT_INT_EQ(echo_call(&f, &req, NULL, &resp, &st), CM_STATUS_OK);
    ASSERT_INT_EQ(resp->index, CM_EINVAL);
    protobuf_c_message_free_unpacked(&resp->base, NULL);
    /* Client side: refused before anything is sent. */
    cm_md_t md[] = {{"x-name", "line\nbreak", 0}};
    cm_call_opts_t o = {.md = md, .n_md = 1};
    ASSERT_INT_EQ(echo_call(&f, &req, &o, &resp, &st), CM_STATUS_INVALID_ARGUMENT);
    ASSERT(strstr(st.message, "x-name"));
    cm_md_t upper[] = {{"X-Name", "v", 0}};
    o.md = upper;
    ASSERT_INT_EQ(echo_call(&f, &req, &o, &resp, &st), CM_STATUS_INVALID_ARGUMENT);
    ASSERT(cm_stream_open(f.ch, "/iot.testing.v1.Echo/Bidi", &o) == NULL);
    cm_md_t bin[] = {{"x-raw-bin", "\x01\x02\n", 3}};
    o.md = bin;
    ASSERT_INT_EQ(echo_call(&f, &req, &o, &resp, &st), CM_STATUS_OK);
    protobuf_c_message_free_unpacked(&resp->base, NULL);
    cm_rpc_status_clear(&st);
    fx_stop(&f);
}

/* Regression: a watcher that stopped reading was "finished" behind messages flow control never
 * let out, so it stayed open and held the shutdown drain for the whole grace period. The watcher
 * is a grpc-js client that pauses its stream after the first message (real HTTP/2 backpressure). */
static void test_stalled_watcher_is_aborted(void) {
    fixture_t f;
    cm_server_opts_t o = {.threads = 2, .grace_ms = 20000};
    fx_start_opts(&f, o);
    cm_server_set_health(f.srv, "flappy", CM_HEALTH_SERVING);
    cm_metrics_add_server(f.srv);
    test_proc_t node;
    ASSERT_INT_EQ(test_proc_start_node(&node, "stalled_watcher.js", f.target, "flappy", "paused"), 0);
    char line[256];
    /* A stopped process reads nothing: socket buffers and the HTTP/2 window fill for real. */
    test_proc_kill(&node, SIGSTOP);
    /* The status flips far beyond what the window and the send queue bound can hold, paced so
     * that the window fills (the transport really blocks) before the queue does. */
    for (int i = 0; i < 2000000; i++) {
        cm_server_set_health(f.srv, "flappy", i % 2 ? CM_HEALTH_SERVING : CM_HEALTH_NOT_SERVING);
        if (i % 256 == 0) usleep(200);
    }
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    cm_server_shutdown(f.srv);
    clock_gettime(CLOCK_MONOTONIC, &t1);
    ASSERT(t1.tv_sec - t0.tv_sec < 10); /* not the 20 s grace period */
    /* The server ended the call as RESOURCE_EXHAUSTED; a stopped peer cannot hear it, so when it
     * wakes up it finds its connection closed. */
    cm_buf_t m = CM_BUF_INIT;
    cm_metrics_render(&m);
    cm_metrics_remove_server(f.srv);
    int recorded = strstr(m.data, "grpc_method=\"Watch\",grpc_code=\"RESOURCE_EXHAUSTED\"} 1\n") != NULL;
    cm_buf_free(&m);
    ASSERT(recorded);
    test_proc_kill(&node, SIGCONT);
    test_proc_kill(&node, SIGUSR2);
    ASSERT(test_proc_read_line(&node, line, sizeof line, 20000) == 0);
    if (strncmp(line, "status ", 7) != 0 || strcmp(line, "status 0") == 0) TEST__FAIL("watcher ended with: %s", line);
    ASSERT_INT_EQ(test_proc_wait(&node, 10000), 0);
    fx_stop(&f);
}

static void test_graceful_drain(void) {
    fixture_t f;
    cm_server_opts_t o = {.threads = 2, .grace_ms = 5000};
    fx_start_opts(&f, o);
    slow_call_t sc = {&f, 600, -1};
    pthread_t th;
    pthread_create(&th, NULL, slow_call_thread, &sc);
    for (int i = 0; i < 200 && cm_server_live_calls(f.srv) == 0; i++) usleep(5000);
    ASSERT(cm_server_live_calls(f.srv) >= 1);
    /* Shut down while the call is in flight; new calls on a fresh connection are refused. */
    cm_server_shutdown(f.srv);
    pthread_join(th, NULL);
    ASSERT_INT_EQ(sc.code, CM_STATUS_OK);
    cm_channel_opts_t co = {.own_connection = 1};
    cm_channel_t *ch2 = cm_channel_new(f.target, &co, NULL);
    Iot__Testing__V1__EchoRequest req = IOT__TESTING__V1__ECHO_REQUEST__INIT;
    ProtobufCMessage *resp = NULL;
    cm_call_opts_t co2 = {.timeout_ms = 2000};
    ASSERT_INT_EQ(cm_channel_unary(ch2, "/iot.testing.v1.Echo/Unary", &req.base,
                                   &iot__testing__v1__echo_response__descriptor, &resp, &co2, NULL),
                  CM_STATUS_UNAVAILABLE);
    cm_channel_free(ch2);
    fx_stop(&f);
}

static void test_grace_period_cancels_stragglers(void) {
    fixture_t f;
    cm_server_opts_t o = {.threads = 2, .grace_ms = 200};
    fx_start_opts(&f, o);
    /* A call that would run 30 s: after the 200 ms grace period it is cancelled, and the handler
     * sees the cancellation. */
    Iot__Testing__V1__EchoRequest req = IOT__TESTING__V1__ECHO_REQUEST__INIT;
    cm_stream_t *s = cm_stream_open(f.ch, "/iot.testing.v1.Echo/Bidi", NULL);
    cm_stream_send(s, &req.base);
    Iot__Testing__V1__EchoResponse *r;
    ASSERT_INT_EQ(cm_stream_recv(s, &iot__testing__v1__echo_response__descriptor, (ProtobufCMessage **)&r), 1);
    protobuf_c_message_free_unpacked(&r->base, NULL);
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    cm_server_shutdown(f.srv);
    clock_gettime(CLOCK_MONOTONIC, &t1);
    double ms = (double)(t1.tv_sec - t0.tv_sec) * 1e3 + (double)(t1.tv_nsec - t0.tv_nsec) / 1e6;
    ASSERT(ms >= 150 && ms < 3000);
    ASSERT(cm_stream_finish(s, NULL) != CM_STATUS_OK);
    ASSERT_INT_EQ(atomic_load(&f.ctx.stream_cancels), 1);
    fx_stop(&f);
}

static int run(const char *cmd) {
    int rc = system(cmd);
    return rc;
}

static void test_tls_roundtrip(void) {
    const char *tmp = test_tmpdir();
    char dir[512], cmd[4096];
    snprintf(dir, sizeof dir, "%s/tls", tmp);
    /* A throwaway CA, a server certificate for localhost and a client certificate. */
    snprintf(cmd, sizeof cmd,
             "set -e; mkdir -p %s; cd %s; "
             "openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.pem -days 2 -subj /CN=iotsuite-test-ca 2>/dev/null; "
             "openssl req -newkey rsa:2048 -nodes -keyout server.key -out server.csr -subj /CN=localhost 2>/dev/null; "
             "printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\\n' > san.ext; "
             "openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out server.pem -days 2 -extfile san.ext 2>/dev/null; "
             "openssl req -newkey rsa:2048 -nodes -keyout client.key -out client.csr -subj /CN=device-1 2>/dev/null; "
             "openssl x509 -req -in client.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out client.pem -days 2 2>/dev/null",
             dir, dir);
    ASSERT_INT_EQ(run(cmd), 0);
    char ca[600], scert[600], skey[600], ccert[600], ckey[600];
    snprintf(ca, sizeof ca, "%s/ca.pem", dir);
    snprintf(scert, sizeof scert, "%s/server.pem", dir);
    snprintf(skey, sizeof skey, "%s/server.key", dir);
    snprintf(ccert, sizeof ccert, "%s/client.pem", dir);
    snprintf(ckey, sizeof ckey, "%s/client.key", dir);

    cm_tls_files_t stls = {scert, skey, ca, 1};
    fixture_t f;
    cm_server_opts_t o = {.threads = 2, .tls = &stls};
    fx_start_opts(&f, o);
    /* mTLS: a client with a certificate from the CA gets through. */
    cm_tls_files_t ctls = {ccert, ckey, ca, 0};
    cm_channel_opts_t co = {.tls = &ctls, .own_connection = 1};
    char target[64];
    snprintf(target, sizeof target, "localhost:%d", cm_server_port(f.srv));
    cm_channel_t *tch = cm_channel_new(target, &co, NULL);
    ASSERT(tch);
    Iot__Testing__V1__EchoRequest req = IOT__TESTING__V1__ECHO_REQUEST__INIT;
    req.message = (char *)"secret";
    Iot__Testing__V1__EchoResponse *resp = NULL;
    cm_call_opts_t copt = {.timeout_ms = 5000};
    ASSERT_INT_EQ(cm_channel_unary(tch, "/iot.testing.v1.Echo/Unary", &req.base,
                                   &iot__testing__v1__echo_response__descriptor, (ProtobufCMessage **)&resp, &copt, NULL),
                  CM_STATUS_OK);
    ASSERT_STR_EQ(resp->message, "secret");
    protobuf_c_message_free_unpacked(&resp->base, NULL);
    cm_channel_free(tch);
    /* Without a client certificate the handshake is refused. */
    cm_tls_files_t notls = {NULL, NULL, ca, 0};
    co.tls = &notls;
    tch = cm_channel_new(target, &co, NULL);
    ASSERT_INT_EQ(cm_channel_unary(tch, "/iot.testing.v1.Echo/Unary", &req.base,
                                   &iot__testing__v1__echo_response__descriptor, (ProtobufCMessage **)&resp, &copt, NULL),
                  CM_STATUS_UNAVAILABLE);
    cm_channel_free(tch);
    /* Plaintext against the TLS port fails too. */
    ASSERT(cm_channel_unary(f.ch, "/iot.testing.v1.Echo/Unary", &req.base, &iot__testing__v1__echo_response__descriptor,
                            (ProtobufCMessage **)&resp, &copt, NULL) != CM_STATUS_OK);
    fx_stop(&f);
}

static void test_many_idle_streams_few_threads(void) {
    fixture_t f;
    cm_server_opts_t o = {.threads = 2};
    fx_start_opts(&f, o);
    enum { N = 500 };
    cm_stream_t **s = calloc(N, sizeof *s);
    Iot__Testing__V1__EchoRequest req = IOT__TESTING__V1__ECHO_REQUEST__INIT;
    req.message = (char *)"hi";
    for (int i = 0; i < N; i++) {
        s[i] = cm_stream_open(f.ch, "/iot.testing.v1.Echo/Bidi", NULL);
        ASSERT_INT_EQ(cm_stream_send(s[i], &req.base), 0);
    }
    /* Every stream is open on the server and idle; a unary call is still served at once. */
    for (int i = 0; i < 500 && cm_server_live_calls(f.srv) < N; i++) usleep(10000);
    ASSERT(cm_server_live_calls(f.srv) >= N);
    Iot__Testing__V1__EchoResponse *resp = NULL;
    cm_call_opts_t co = {.timeout_ms = 2000};
    ASSERT_INT_EQ(echo_call(&f, &req, &co, &resp, NULL), CM_STATUS_OK);
    protobuf_c_message_free_unpacked(&resp->base, NULL);
    for (int i = 0; i < N; i++) {
        Iot__Testing__V1__EchoResponse *r;
        ASSERT_INT_EQ(cm_stream_recv(s[i], &iot__testing__v1__echo_response__descriptor, (ProtobufCMessage **)&r), 1);
        protobuf_c_message_free_unpacked(&r->base, NULL);
        cm_stream_close_send(s[i]);
        ASSERT_INT_EQ(cm_stream_finish(s[i], NULL), CM_STATUS_OK);
    }
    free(s);
    fx_stop(&f);
}

static void test_idempotent_retry(void) {
    /* Nothing listens on the port: an idempotent call is tried max_attempts times, another once. */
    cm_channel_t *ch = cm_channel_new("127.0.0.1:1", NULL, NULL);
    Iot__Testing__V1__EchoRequest req = IOT__TESTING__V1__ECHO_REQUEST__INIT;
    ProtobufCMessage *resp = NULL;
    cm_rpc_status_t st = {0};
    cm_call_opts_t o = {.timeout_ms = 3000, .idempotent = 1, .max_attempts = 3};
    ASSERT_INT_EQ(cm_channel_unary(ch, "/iot.testing.v1.Echo/Unary", &req.base,
                                   &iot__testing__v1__echo_response__descriptor, &resp, &o, &st),
                  CM_STATUS_UNAVAILABLE);
    ASSERT_INT_EQ(st.attempts, 3);
    o.idempotent = 0;
    ASSERT_INT_EQ(cm_channel_unary(ch, "/iot.testing.v1.Echo/Unary", &req.base,
                                   &iot__testing__v1__echo_response__descriptor, &resp, &o, &st),
                  CM_STATUS_UNAVAILABLE);
    ASSERT_INT_EQ(st.attempts, 1);
    cm_rpc_status_clear(&st);
    cm_channel_free(ch);
}

/* Regression: the request buffer was encoded once and the core consumed it on the first attempt,
 * so a retried idempotent call reached the handler as an empty message. */
static void test_retry_resends_the_request(void) {
    fixture_t f;
    fx_start(&f);
    Iot__Testing__V1__EchoRequest req = IOT__TESTING__V1__ECHO_REQUEST__INIT;
    req.message = (char *)"flaky";
    uint8_t bytes[] = {1, 2, 3};
    req.payload.data = bytes;
    req.payload.len = 3;
    cm_call_opts_t o = {.timeout_ms = 5000, .idempotent = 1};
    Iot__Testing__V1__EchoResponse *resp = NULL;
    cm_rpc_status_t st = {0};
    ASSERT_INT_EQ(echo_call(&f, &req, &o, &resp, &st), CM_STATUS_OK);
    ASSERT_INT_EQ(st.attempts, 2);
    ASSERT_STR_EQ(resp->message, "flaky");
    ASSERT_INT_EQ(resp->payload.len, 3);
    protobuf_c_message_free_unpacked(&resp->base, NULL);
    /* Not idempotent: one attempt, the UNAVAILABLE is the answer. */
    o.idempotent = 0;
    ASSERT_INT_EQ(echo_call(&f, &req, &o, &resp, &st), CM_STATUS_UNAVAILABLE);
    ASSERT_INT_EQ(st.attempts, 1);
    cm_rpc_status_clear(&st);
    fx_stop(&f);
}

/* Regression: finishing a stream with messages left unread waited for the deadline and then
 * reported DEADLINE_EXCEEDED instead of the server's status. */
static void test_finish_with_unread_messages(void) {
    fixture_t f;
    fx_start(&f);
    Iot__Testing__V1__EchoRequest req = IOT__TESTING__V1__ECHO_REQUEST__INIT;
    req.message = (char *)"tick";
    req.repeat = 50;
    cm_call_opts_t o = {.timeout_ms = 20000};
    for (int read = 0; read <= 3; read += 3) {
        cm_stream_t *s = cm_stream_open(f.ch, "/iot.testing.v1.Echo/ServerStream", &o);
        cm_stream_send(s, &req.base);
        cm_stream_close_send(s);
        for (int i = 0; i < read; i++) {
            Iot__Testing__V1__EchoResponse *r;
            ASSERT_INT_EQ(cm_stream_recv(s, &iot__testing__v1__echo_response__descriptor, (ProtobufCMessage **)&r), 1);
            protobuf_c_message_free_unpacked(&r->base, NULL);
        }
        struct timespec t0, t1;
        clock_gettime(CLOCK_MONOTONIC, &t0);
        ASSERT_INT_EQ(cm_stream_finish(s, NULL), CM_STATUS_OK);
        clock_gettime(CLOCK_MONOTONIC, &t1);
        ASSERT(t1.tv_sec - t0.tv_sec < 10); /* not the 20 s deadline */
    }
    fx_stop(&f);
}

static void test_channel_wait_ready(void) {
    fixture_t f;
    fx_start(&f);
    ASSERT_INT_EQ(cm_channel_wait_ready(f.ch, 5000), 0);
    cm_channel_t *nowhere = cm_channel_new("127.0.0.1:1", NULL, NULL);
    ASSERT_INT_EQ(cm_channel_wait_ready(nowhere, 300), CM_ETIMEOUT);
    cm_channel_free(nowhere);
    ASSERT_INT_EQ(cm_server_get_health(f.srv, "iot.testing.v1.Echo"), CM_HEALTH_SERVING);
    ASSERT_INT_EQ(cm_server_get_health(f.srv, "never.Set"), 0);
    fx_stop(&f);
}

static void test_buffered_stream_sends_arrive(void) {
    fixture_t f;
    fx_start(&f);
    cm_stream_t *s = cm_stream_open(f.ch, "/iot.testing.v1.Echo/RecordBatch", NULL);
    Iot__Testing__V1__Point p = IOT__TESTING__V1__POINT__INIT, *pp[10];
    p.metric = (char *)"t";
    p.value = 1.5;
    for (int i = 0; i < 10; i++) pp[i] = &p;
    Iot__Testing__V1__PointBatch b = IOT__TESTING__V1__POINT_BATCH__INIT;
    b.points = pp;
    b.n_points = 10;
    for (int i = 0; i < 99; i++) ASSERT_INT_EQ(cm_stream_send_buffered(s, &b.base), 0);
    ASSERT_INT_EQ(cm_stream_send(s, &b.base), 0); /* a burst ends with a flushing send */
    cm_stream_close_send(s);
    Iot__Testing__V1__StreamSummary *sum;
    ASSERT_INT_EQ(cm_stream_recv(s, &iot__testing__v1__stream_summary__descriptor, (ProtobufCMessage **)&sum), 1);
    ASSERT_INT_EQ(sum->messages, 100);
    ASSERT_INT_EQ(sum->points, 1000);
    ASSERT(sum->value_sum == 1500.0);
    protobuf_c_message_free_unpacked(&sum->base, NULL);
    ASSERT_INT_EQ(cm_stream_finish(s, NULL), CM_STATUS_OK);
    fx_stop(&f);
}

static void test_busy_port_fails(void) {
    fixture_t f;
    fx_start(&f);
    char listen[64];
    snprintf(listen, sizeof listen, "127.0.0.1:%d", cm_server_port(f.srv));
    cm_server_opts_t o = {.listen = listen, .threads = 1};
    cm_server_t *srv2 = cm_server_new(&o, NULL);
    ASSERT_INT_EQ(cm_server_start(srv2), CM_EBIND);
    cm_server_free(srv2);
    fx_stop(&f);
}

TEST_MAIN(TEST_ENTRY(test_unary_roundtrip), TEST_ENTRY(test_status_code_and_message), TEST_ENTRY(test_metadata_roundtrip),
          TEST_ENTRY(test_traceparent_propagated), TEST_ENTRY(test_client_stream),
          TEST_ENTRY(test_client_stream_error_midway), TEST_ENTRY(test_server_stream), TEST_ENTRY(test_server_stream_recv_wait), TEST_ENTRY(test_server_stream_paced),
          TEST_ENTRY(test_server_stream_send_tail),
          TEST_ENTRY(test_bidi),
          TEST_ENTRY(test_deadline_exceeded), TEST_ENTRY(test_cancel_seen_by_handler), TEST_ENTRY(test_malformed_message),
          TEST_ENTRY(test_oversize_message), TEST_ENTRY(test_unknown_method), TEST_ENTRY(test_health_check_and_watch),
          TEST_ENTRY(test_reflection), TEST_ENTRY(test_blocking_handler_does_not_stall_others),
          TEST_ENTRY(test_bidi_first_message_not_corrupted), TEST_ENTRY(test_illegal_metadata_is_refused_not_fatal),
          TEST_ENTRY(test_stalled_watcher_is_aborted), TEST_ENTRY(test_graceful_drain), TEST_ENTRY(test_grace_period_cancels_stragglers),
          TEST_ENTRY(test_tls_roundtrip), TEST_ENTRY(test_many_idle_streams_few_threads),
          TEST_ENTRY(test_idempotent_retry), TEST_ENTRY(test_retry_resends_the_request),
          TEST_ENTRY(test_finish_with_unread_messages), TEST_ENTRY(test_channel_wait_ready),
          TEST_ENTRY(test_buffered_stream_sends_arrive), TEST_ENTRY(test_busy_port_fails))
