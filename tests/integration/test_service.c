/* A real service binary (the Echo test server, built on cm_app like every service): --help, bad
 * configuration, the admin endpoint, JSON logs, and SIGTERM drain. */
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "cm_rpc.h"
#include "iot/testing/v1/echo.pb-c.h"
#include "proc.h"
#include "test.h"

static char *echo_bin(void) {
    static char path[1024];
    snprintf(path, sizeof path, "%s/tests/echo_server", test_env("IOT_BUILD_DIR"));
    return path;
}

static void test_help_lists_variables(void) {
    char *argv[] = {echo_bin(), (char *)"--help", NULL};
    test_proc_t p;
    ASSERT_INT_EQ(test_proc_start(&p, argv, NULL, 0), 0);
    char out[8192];
    ssize_t n = 0, r;
    while ((r = read(p.out_fd, out + n, sizeof out - 1 - (size_t)n)) > 0) n += r;
    out[n] = 0;
    ASSERT_INT_EQ(test_proc_wait(&p, 5000), 0);
    ASSERT(strstr(out, "IOT_GRPC_LISTEN"));
    ASSERT(strstr(out, "IOT_ADMIN_LISTEN"));
    ASSERT(strstr(out, "IOT_SHUTDOWN_GRACE"));
    ASSERT(strstr(out, "IOT_LOG_LEVEL"));
}

static void expect_config_error(const char *env, const char *needle) {
    char *argv[] = {echo_bin(), NULL};
    const char *e[] = {env, NULL};
    test_proc_t p;
    ASSERT_INT_EQ(test_proc_start(&p, argv, e, 0), 0);
    ASSERT_INT_EQ(test_proc_wait(&p, 5000), 2);
    char err[4096];
    test_proc_stderr(&p, err, sizeof err);
    if (!strstr(err, needle)) TEST__FAIL("stderr for %s lacks \"%s\": %s", env, needle, err);
}

static void test_bad_config_exits_2(void) {
    expect_config_error("IOT_GRPC_THREADS=0", "IOT_GRPC_THREADS=0 is out of range (1..256)");
    expect_config_error("IOT_LOG_LEVEL=loud", "IOT_LOG_LEVEL=\"loud\"");
    expect_config_error("IOT_SHUTDOWN_GRACE=forever", "IOT_SHUTDOWN_GRACE=\"forever\" is not a valid duration");
    expect_config_error("IOT_TLS_CERT=/x.pem", "IOT_TLS_CERT and IOT_TLS_KEY must be set together");
}

static int unary(cm_channel_t *ch, int delay_ms) {
    Iot__Testing__V1__EchoRequest req = IOT__TESTING__V1__ECHO_REQUEST__INIT;
    req.message = (char *)"m";
    req.delay_ms = delay_ms;
    ProtobufCMessage *resp = NULL;
    cm_call_opts_t o = {.timeout_ms = 5000};
    int code = cm_channel_unary(ch, "/iot.testing.v1.Echo/Unary", &req.base, &iot__testing__v1__echo_response__descriptor,
                                &resp, &o, NULL);
    if (resp) protobuf_c_message_free_unpacked(resp, NULL);
    return code;
}

static void test_admin_endpoint_and_metrics(void) {
    char *argv[] = {echo_bin(), NULL};
    const char *env[] = {"IOT_LOG_LEVEL=info", NULL};
    test_proc_t p;
    ASSERT_INT_EQ(test_proc_start(&p, argv, env, 1), 0);
    char buf[65536], target[64];
    ASSERT_INT_EQ(test_http_get(p.admin_port, "/healthz", buf, sizeof buf), 200);
    ASSERT_INT_EQ(test_http_get(p.admin_port, "/readyz", buf, sizeof buf), 200);
    ASSERT_INT_EQ(test_http_get(p.admin_port, "/nope", buf, sizeof buf), 404);
    snprintf(target, sizeof target, "127.0.0.1:%d", p.grpc_port);
    cm_channel_t *ch = cm_channel_new(target, NULL, NULL);
    for (int i = 0; i < 3; i++) ASSERT_INT_EQ(unary(ch, 0), CM_STATUS_OK);
    /* A call is counted when the server releases it, just after the client has its answer: on a
     * busy machine the last one may take a moment. */
    const char *handled = "grpc_server_handled_total{grpc_service=\"iot.testing.v1.Echo\",grpc_method=\"Unary\",grpc_code=\"OK\"} 3\n";
    for (int i = 0; i < 200; i++) {
        ASSERT_INT_EQ(test_http_get(p.admin_port, "/metrics", buf, sizeof buf), 200);
        if (strstr(buf, handled)) break;
        usleep(10000);
    }
    ASSERT(strstr(buf, handled));
    ASSERT(strstr(buf, "grpc_server_handling_seconds_count{grpc_service=\"iot.testing.v1.Echo\",grpc_method=\"Unary\"} 3\n"));
    ASSERT(strstr(buf, "le=\"+Inf\"} 3\n"));
    ASSERT(strstr(buf, "# TYPE process_resident_memory_bytes gauge\nprocess_resident_memory_bytes "));
    ASSERT(strstr(buf, "process_open_fds "));
    ASSERT(strstr(buf, "process_threads "));
    cm_channel_free(ch);
    test_proc_kill(&p, SIGTERM);
    ASSERT_INT_EQ(test_proc_wait(&p, 15000), 0);
    /* Every stderr line is one JSON object naming the service. */
    test_proc_stderr(&p, buf, sizeof buf);
    int lines = 0;
    for (char *line = strtok(buf, "\n"); line; line = strtok(NULL, "\n")) {
        ASSERT(line[0] == '{' && line[strlen(line) - 1] == '}');
        ASSERT(strstr(line, "\"service\":\"echo\""));
        lines++;
    }
    ASSERT(lines >= 2); /* listening ... stopped */
}

typedef struct slow_s {
    int port, code;
} slow_t;

static void *slow_thread(void *arg) {
    slow_t *s = arg;
    char target[64];
    snprintf(target, sizeof target, "127.0.0.1:%d", s->port);
    cm_channel_t *ch = cm_channel_new(target, NULL, NULL);
    s->code = unary(ch, 800);
    cm_channel_free(ch);
    return NULL;
}

static void test_sigterm_drains_in_flight_calls(void) {
    char *argv[] = {echo_bin(), NULL};
    const char *env[] = {"IOT_SHUTDOWN_GRACE=5s", "IOT_LOG_LEVEL=info", NULL};
    test_proc_t p;
    ASSERT_INT_EQ(test_proc_start(&p, argv, env, 1), 0);
    slow_t s = {p.grpc_port, -1};
    pthread_t th;
    pthread_create(&th, NULL, slow_thread, &s);
    usleep(300000); /* the call is in its handler */
    test_proc_kill(&p, SIGTERM);
    usleep(100000);
    /* New connections are refused while the old call finishes. */
    char target[64];
    snprintf(target, sizeof target, "127.0.0.1:%d", p.grpc_port);
    cm_channel_opts_t co = {.own_connection = 1};
    cm_channel_t *ch = cm_channel_new(target, &co, NULL);
    ASSERT_INT_EQ(unary(ch, 0), CM_STATUS_UNAVAILABLE);
    cm_channel_free(ch);
    pthread_join(th, NULL);
    ASSERT_INT_EQ(s.code, CM_STATUS_OK);
    ASSERT_INT_EQ(test_proc_wait(&p, 10000), 0);
    char err[16384];
    test_proc_stderr(&p, err, sizeof err);
    ASSERT(strstr(err, "\"msg\":\"signal received, draining\",\"signal\":\"SIGTERM\""));
    ASSERT(strstr(err, "\"msg\":\"grpc server stopped\""));
}

static void test_busy_port_exits_nonzero(void) {
    char *argv[] = {echo_bin(), NULL};
    test_proc_t a, b;
    ASSERT_INT_EQ(test_proc_start(&a, argv, NULL, 1), 0);
    char env1[64];
    snprintf(env1, sizeof env1, "IOT_GRPC_LISTEN=127.0.0.1:%d", a.grpc_port);
    const char *env[] = {env1, NULL};
    ASSERT_INT_EQ(test_proc_start(&b, argv, env, 0), 0);
    ASSERT_INT_EQ(test_proc_wait(&b, 10000), 1);
    char err[8192];
    test_proc_stderr(&b, err, sizeof err);
    ASSERT(strstr(err, "cannot listen on 127.0.0.1:"));
    test_proc_kill(&a, SIGTERM);
    ASSERT_INT_EQ(test_proc_wait(&a, 15000), 0);
}

TEST_MAIN(TEST_ENTRY(test_help_lists_variables), TEST_ENTRY(test_bad_config_exits_2),
          TEST_ENTRY(test_admin_endpoint_and_metrics), TEST_ENTRY(test_sigterm_drains_in_flight_calls),
          TEST_ENTRY(test_busy_port_exits_nonzero))
