/* Unit tests for libs/common pieces that need no server: arena, buffer, config, log, trace,
 * errors, address parsing. */
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "cm_admin.h"
#include "cm_alloc.h"
#include "cm_buf.h"
#include "cm_config.h"
#include "cm_err.h"
#include "cm_log.h"
#include "cm_loop.h"
#include "cm_metrics.h"
#include "cm_rpc.h"
#include "iot/testing/v1/echo.pb-c.h"
#include "test.h"

static void test_arena_alignment_and_growth(void) {
    char inline_buf[100];
    cm_arena_t a;
    cm_arena_init(&a, inline_buf, sizeof inline_buf);
    for (int i = 0; i < 1000; i++) {
        void *p = cm_arena_alloc(&a, (size_t)(i % 37) + 1);
        ASSERT(((uintptr_t)p % _Alignof(max_align_t)) == 0);
        memset(p, 0xab, (size_t)(i % 37) + 1);
    }
    char *big = cm_arena_alloc(&a, 100000);
    memset(big, 1, 100000);
    ASSERT_STR_EQ(cm_arena_strdup(&a, "hello"), "hello");
    cm_arena_reset(&a);
    ASSERT_STR_EQ(cm_arena_strndup(&a, "abcdef", 3), "abc");
    cm_arena_free(&a);
}

static void test_arena_as_protobuf_allocator(void) {
    Iot__Testing__V1__PointBatch b = IOT__TESTING__V1__POINT_BATCH__INIT;
    Iot__Testing__V1__Point pts[3], *pp[3];
    for (int i = 0; i < 3; i++) {
        iot__testing__v1__point__init(&pts[i]);
        pts[i].metric = (char *)"temp";
        pts[i].value = i * 1.5;
        pp[i] = &pts[i];
    }
    b.device_id = (char *)"dev-1";
    b.points = pp;
    b.n_points = 3;
    uint8_t buf[256];
    size_t n = protobuf_c_message_pack(&b.base, buf);
    cm_arena_t a;
    cm_arena_init(&a, NULL, 0);
    Iot__Testing__V1__PointBatch *out = iot__testing__v1__point_batch__unpack(&a.pb, n, buf);
    ASSERT(out);
    ASSERT_STR_EQ(out->device_id, "dev-1");
    ASSERT_INT_EQ(out->n_points, 3);
    ASSERT(out->points[2]->value == 3.0);
    cm_arena_free(&a); /* no per-field frees: everything goes with the arena */
}

static void test_arena_chunks_recycled(void) {
    /* A stream decoding message after message reuses chunks instead of malloc/free each time,
     * and a reset arena holds nothing of its own (the recycling cache is per thread). */
    cm_arena_t a;
    cm_arena_init(&a, NULL, 0);
    void *first = cm_arena_alloc(&a, 6000);
    cm_arena_reset(&a);
    ASSERT(a.head == NULL);
    void *again = cm_arena_alloc(&a, 6000);
    ASSERT(again == first);
    cm_arena_free(&a);
}

static void test_buf_printf_grows(void) {
    cm_buf_t b = CM_BUF_INIT;
    for (int i = 0; i < 1000; i++) cm_buf_printf(&b, "%d,", i);
    ASSERT(strncmp(b.data, "0,1,2,", 6) == 0);
    ASSERT(strstr(b.data, ",999,"));
    char big[600];
    memset(big, 'x', sizeof big - 1);
    big[sizeof big - 1] = 0;
    cm_buf_reset(&b);
    cm_buf_printf(&b, "<%s>", big);
    ASSERT_INT_EQ(b.len, 601);
    cm_buf_free(&b);
}

static void test_errors_have_messages(void) {
    ASSERT_STR_EQ(cm_strerror(0), "ok");
    ASSERT_STR_EQ(cm_strerror(CM_EFULL), "send queue full");
    ASSERT_STR_EQ(cm_strerror(12345), "unknown error");
    ASSERT_STR_EQ(cm_status_name(CM_STATUS_RESOURCE_EXHAUSTED), "RESOURCE_EXHAUSTED");
    ASSERT_STR_EQ(cm_status_name(99), "UNKNOWN_CODE");
}

typedef struct cfg_s {
    const char *name;
    int64_t port, timeout;
    int flag;
} cfg_t;

static int load_cfg(cfg_t *c, int argc, char **argv) {
    cm_config_var_t vars[] = {
        {"T_NAME", CM_CFG_STRING, "dflt", "a name", 0, 0, &c->name},
        {"T_PORT", CM_CFG_INT, "8080", "a port", 1, 65535, &c->port},
        {"T_TIMEOUT", CM_CFG_DURATION, "2s", "a timeout", 1, 60000, &c->timeout},
        {"T_FLAG", CM_CFG_BOOL, "false", "a flag", 0, 0, &c->flag},
    };
    return cm_config_load(vars, 4, argc, argv, "test");
}

static void test_config_defaults_and_env(void) {
    char *argv[] = {(char *)"prog", NULL};
    cfg_t c;
    unsetenv("T_NAME");
    unsetenv("T_PORT");
    unsetenv("T_TIMEOUT");
    unsetenv("T_FLAG");
    ASSERT_INT_EQ(load_cfg(&c, 1, argv), 0);
    ASSERT_STR_EQ(c.name, "dflt");
    ASSERT_INT_EQ(c.port, 8080);
    ASSERT_INT_EQ(c.timeout, 2000);
    ASSERT_INT_EQ(c.flag, 0);
    setenv("T_NAME", "x", 1);
    setenv("T_PORT", "9000", 1);
    setenv("T_TIMEOUT", "250ms", 1);
    setenv("T_FLAG", "yes", 1);
    ASSERT_INT_EQ(load_cfg(&c, 1, argv), 0);
    ASSERT_STR_EQ(c.name, "x");
    ASSERT_INT_EQ(c.port, 9000);
    ASSERT_INT_EQ(c.timeout, 250);
    ASSERT_INT_EQ(c.flag, 1);
    setenv("T_TIMEOUT", "nan", 1);
    ASSERT_INT_EQ(load_cfg(&c, 1, argv), CM_ECONFIG);
    setenv("T_TIMEOUT", "1e300s", 1);
    ASSERT_INT_EQ(load_cfg(&c, 1, argv), CM_ECONFIG);
    setenv("T_TIMEOUT", "1.5m", 1);
    setenv("T_PORT", "1", 1);
    ASSERT_INT_EQ(load_cfg(&c, 1, argv), CM_ECONFIG); /* 90000 ms is above the 60000 bound */
    unsetenv("T_NAME");
    unsetenv("T_PORT");
    unsetenv("T_TIMEOUT");
    unsetenv("T_FLAG");
}

/* Runs fn in a child with stdout/stderr captured into out; returns the child's exit status. */
static int capture(int (*fn)(void), char *out, size_t cap) {
    int p[2];
    ASSERT(pipe(p) == 0);
    fflush(stdout);
    pid_t pid = fork();
    if (pid == 0) {
        dup2(p[1], 1);
        dup2(p[1], 2);
        close(p[0]);
        int rc = fn();
        fflush(stdout);
        _exit(rc);
    }
    close(p[1]);
    size_t n = 0;
    ssize_t r;
    while (n + 1 < cap && (r = read(p[0], out + n, cap - n - 1)) > 0) n += (size_t)r;
    out[n] = 0;
    close(p[0]);
    int st;
    waitpid(pid, &st, 0);
    return WIFEXITED(st) ? WEXITSTATUS(st) : -1;
}

static int bad_values_child(void) {
    setenv("T_PORT", "70000", 1);
    setenv("T_TIMEOUT", "soon", 1);
    setenv("T_FLAG", "maybe", 1);
    char *argv[] = {(char *)"prog", NULL};
    cfg_t c;
    return load_cfg(&c, 1, argv) == CM_ECONFIG ? 2 : 0;
}

static int help_child(void) {
    char *argv[] = {(char *)"prog", (char *)"--help", NULL};
    cfg_t c;
    return load_cfg(&c, 2, argv) == 1 ? 0 : 1;
}

static void test_config_errors_name_the_variable(void) {
    char out[4096];
    ASSERT_INT_EQ(capture(bad_values_child, out, sizeof out), 2);
    ASSERT(strstr(out, "T_PORT=70000 is out of range (1..65535)"));
    ASSERT(strstr(out, "T_TIMEOUT=\"soon\" is not a valid duration"));
    ASSERT(strstr(out, "T_FLAG=\"maybe\" is not a valid boolean"));
    ASSERT_INT_EQ(capture(help_child, out, sizeof out), 0);
    ASSERT(strstr(out, "T_PORT"));
    ASSERT(strstr(out, "default \"8080\""));
}

static int log_child(void) {
    cm_log_init("unit", CM_LOG_INFO);
    CM_LOG(CM_LOG_DEBUG, "hidden %d", 1);
    cm_trace_t t;
    cm_trace_parse(&t, "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01", 55);
    cm_trace_set_current(&t);
    CM_LOG(CM_LOG_INFO, "quote \" backslash \\ newline \n tab \t ctl \x01 end");
    cm_trace_set_current(NULL);
    cm_log_kv(CM_LOG_WARN, "kv", "device", "d\"1", "n", "3", NULL);
    return 0;
}

static void test_log_lines_are_json(void) {
    char out[4096];
    ASSERT_INT_EQ(capture(log_child, out, sizeof out), 0);
    ASSERT(!strstr(out, "hidden"));
    ASSERT(strstr(out, "\"level\":\"info\",\"service\":\"unit\",\"trace_id\":\"0af7651916cd43dd8448eb211c80319c\""));
    ASSERT(strstr(out, "\"msg\":\"quote \\\" backslash \\\\ newline \\n tab \\t ctl \\u0001 end\"}"));
    ASSERT(strstr(out, "\"msg\":\"kv\",\"device\":\"d\\\"1\",\"n\":\"3\"}"));
    /* Exactly two lines, each one object. */
    int lines = 0;
    for (char *p = out; *p; p++) lines += *p == '\n';
    ASSERT_INT_EQ(lines, 2);
    ASSERT_INT_EQ(out[0], '{');
}

static void test_trace_parse_and_child(void) {
    cm_trace_t t;
    ASSERT_INT_EQ(cm_trace_parse(&t, "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", 55), 0);
    ASSERT_STR_EQ(t.trace_id, "4bf92f3577b34da6a3ce929d0e0e4736");
    ASSERT_STR_EQ(t.span_id, "00f067aa0ba902b7");
    char h[64];
    cm_trace_child_header(&t, h, sizeof h);
    ASSERT_INT_EQ(strlen(h), 55);
    ASSERT(strncmp(h, "00-4bf92f3577b34da6a3ce929d0e0e4736-", 36) == 0);
    ASSERT(strcmp(h + 36, "00f067aa0ba902b7-01") != 0); /* a new span */
    ASSERT(cm_trace_parse(&t, "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01", 55) != 0); /* uppercase */
    ASSERT(cm_trace_parse(&t, "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", 55) != 0);
    ASSERT(cm_trace_parse(&t, "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01", 55) != 0);
    cm_trace_new(&t);
    ASSERT_INT_EQ(strlen(t.trace_id), 32);
}

static void test_hostport_parse(void) {
    struct sockaddr_storage ss;
    unsigned len;
    ASSERT_INT_EQ(cm_parse_hostport("127.0.0.1:9090", &ss, &len), 0);
    ASSERT_INT_EQ(ss.ss_family, AF_INET);
    ASSERT_INT_EQ(ntohs(((struct sockaddr_in *)&ss)->sin_port), 9090);
    ASSERT_INT_EQ(cm_parse_hostport("[::1]:0", &ss, &len), 0);
    ASSERT_INT_EQ(ss.ss_family, AF_INET6);
    ASSERT_INT_EQ(cm_parse_hostport(":80", &ss, &len), 0);
    ASSERT_INT_EQ(cm_parse_hostport("localhost:80", &ss, &len), 0);
    ASSERT(cm_parse_hostport("nohost", &ss, &len) != 0);
    ASSERT(cm_parse_hostport("1.2.3.4:99999", &ss, &len) != 0);
    ASSERT(cm_parse_hostport("1.2.3.4:", &ss, &len) != 0);
    ASSERT(cm_parse_hostport("example.com:80", &ss, &len) != 0);
}

static void test_metrics_registry_renders(void) {
    cm_counter_t *a = cm_metrics_counter("iot_test_points_total", "Points stored.", "shard=\"1\"");
    cm_counter_t *b = cm_metrics_counter("iot_test_points_total", "Points stored.", "shard=\"2\"");
    ASSERT(a != b);
    ASSERT(cm_metrics_counter("iot_test_points_total", "Points stored.", "shard=\"1\"") == a);
    cm_counter_add(a, 5);
    cm_counter_add(b, 7);
    cm_counter_add(a, 1);
    ASSERT_INT_EQ(cm_counter_get(a), 6);
    cm_gauge_set(cm_metrics_gauge("iot_test_queue_depth", "Queued batches.", NULL), 2.5);
    cm_buf_t out = CM_BUF_INIT;
    cm_metrics_render(&out);
    ASSERT(strstr(out.data, "# HELP iot_test_points_total Points stored.\n# TYPE iot_test_points_total counter\n"
                            "iot_test_points_total{shard=\"1\"} 6\niot_test_points_total{shard=\"2\"} 7\n"));
    ASSERT(strstr(out.data, "# TYPE iot_test_queue_depth gauge\niot_test_queue_depth 2.5\n"));
    ASSERT(strstr(out.data, "process_resident_memory_bytes "));
    cm_buf_free(&out);
}

static void collect_two(cm_buf_t *b, void *arg) {
    cm_buf_printf(b, "# TYPE iot_test_dynamic gauge\niot_test_dynamic{rule=\"%s\"} 1\n", (const char *)arg);
}

static void test_metrics_collectors_come_and_go(void) {
    ASSERT_INT_EQ(cm_metrics_add_collector(collect_two, (void *)"r1"), 0);
    cm_buf_t out = CM_BUF_INIT;
    cm_metrics_render(&out);
    ASSERT(strstr(out.data, "iot_test_dynamic{rule=\"r1\"} 1\n"));
    cm_metrics_remove_collector(collect_two, (void *)"r1");
    cm_buf_reset(&out);
    cm_metrics_render(&out);
    ASSERT(!strstr(out.data, "iot_test_dynamic"));
    /* At most 8 at once: the ninth is refused, and removing one makes room. */
    static const char *names[9] = {"a", "b", "c", "d", "e", "f", "g", "h", "i"};
    for (int i = 0; i < 8; i++) ASSERT_INT_EQ(cm_metrics_add_collector(collect_two, (void *)names[i]), 0);
    ASSERT(cm_metrics_add_collector(collect_two, (void *)names[8]) != 0);
    cm_metrics_remove_collector(collect_two, (void *)names[0]);
    ASSERT_INT_EQ(cm_metrics_add_collector(collect_two, (void *)names[8]), 0);
    for (int i = 1; i < 9; i++) cm_metrics_remove_collector(collect_two, (void *)names[i]);
    cm_buf_free(&out);
}

static int64_t loop_count(void *arg) {
    __atomic_add_fetch((int *)arg, 1, __ATOMIC_SEQ_CST);
    return 60000; /* a long sleep: kick and stop must not wait it out */
}

static void test_loop_kick_and_stop(void) {
    int runs = 0;
    cm_loop_t *l = cm_loop_start(loop_count, &runs, 0);
    for (int i = 0; i < 200 && __atomic_load_n(&runs, __ATOMIC_SEQ_CST) < 1; i++) usleep(5000);
    ASSERT_INT_EQ(__atomic_load_n(&runs, __ATOMIC_SEQ_CST), 1);
    cm_loop_kick(l);
    for (int i = 0; i < 200 && __atomic_load_n(&runs, __ATOMIC_SEQ_CST) < 2; i++) usleep(5000);
    ASSERT_INT_EQ(__atomic_load_n(&runs, __ATOMIC_SEQ_CST), 2);
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    cm_loop_stop(l);
    clock_gettime(CLOCK_MONOTONIC, &t1);
    ASSERT(t1.tv_sec - t0.tv_sec < 2);
}

/* A method's check run on a call without a wire (cm_call_new_detached), as tests/fuzz does. */
static int test__message_required(cm_call_t *call, ProtobufCMessage *req_) {
    Iot__Testing__V1__EchoRequest *req = (void *)req_;
    if (!*req->message) return cm_call_fail(call, CM_STATUS_INVALID_ARGUMENT, "message: required (%d)", req->repeat);
    if (!req->repeat) req->repeat = 1; /* a default, as checks may fill in */
    return 0;
}

static void test_detached_call_runs_a_check(void) {
    cm_method_t m = {.name = "Unary", .kind = CM_RPC_UNARY, .check = test__message_required};
    int ctx = 7;
    cm_service_t svc = {.desc = &iot__testing__v1__echo__descriptor, .methods = &m, .n_methods = 1, .ctx = &ctx};
    ASSERT(cm_call_new_detached(&svc, "ServerStream") == NULL); /* in the descriptor, not in the table */
    ASSERT(cm_call_new_detached(&svc, "NoSuchMethod") == NULL);
    cm_call_t *c = cm_call_new_detached(&svc, "Unary");
    ASSERT(c);
    ASSERT_STR_EQ(cm_call_method(c), "/iot.testing.v1.Echo/Unary");
    ASSERT(cm_call_service_ctx(c) == &ctx);
    ASSERT(cm_call_metadata(c, "authorization", NULL) == NULL);
    ASSERT_INT_EQ(cm_call_deadline_ms(c), -1);
    ASSERT(cm_call_detached_message(c) == NULL);
    Iot__Testing__V1__EchoRequest req = IOT__TESTING__V1__ECHO_REQUEST__INIT;
    ASSERT_INT_EQ(m.check(c, &req.base), CM_STATUS_INVALID_ARGUMENT);
    ASSERT_STR_EQ(cm_call_detached_message(c), "message: required (0)");
    req.message = cm_call_strdup(c, "hi");
    ASSERT_INT_EQ(m.check(c, &req.base), CM_STATUS_OK);
    ASSERT_INT_EQ(req.repeat, 1);
    cm_call_free_detached(c);
    cm_call_free_detached(NULL);
}

TEST_MAIN(TEST_ENTRY(test_arena_alignment_and_growth), TEST_ENTRY(test_arena_as_protobuf_allocator),
          TEST_ENTRY(test_arena_chunks_recycled),
          TEST_ENTRY(test_buf_printf_grows), TEST_ENTRY(test_errors_have_messages),
          TEST_ENTRY(test_config_defaults_and_env), TEST_ENTRY(test_config_errors_name_the_variable),
          TEST_ENTRY(test_log_lines_are_json), TEST_ENTRY(test_trace_parse_and_child), TEST_ENTRY(test_hostport_parse),
          TEST_ENTRY(test_metrics_registry_renders), TEST_ENTRY(test_metrics_collectors_come_and_go),
          TEST_ENTRY(test_loop_kick_and_stop), TEST_ENTRY(test_detached_call_runs_a_check))
