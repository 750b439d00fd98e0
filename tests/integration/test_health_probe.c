/* tools/iot-health-probe, the images' HEALTHCHECK, against a real device-mgmt on the harness's
 * Postgres and Redis: SERVING (whole server, a named service, the address taken from
 * IOT_GRPC_LISTEN), an unknown service name, a closed port, a server that never answers, mTLS,
 * bad usage. */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "proc.h"
#include "test.h"

static int64_t now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* Runs the probe with up to four arguments (NULL-terminated) and extra environment; returns its
 * exit status with its one line of stdout in out. */
static int probe(char *out, size_t cap, const char *const env[], const char *a1, const char *a2, const char *a3,
                 const char *a4) {
    static char bin[1024];
    snprintf(bin, sizeof bin, "%s/tools/iot-health-probe", test_env("IOT_BUILD_DIR"));
    char *argv[] = {bin, (char *)a1, (char *)a2, (char *)a3, (char *)a4, NULL};
    test_proc_t p;
    ASSERT_INT_EQ(test_proc_start(&p, argv, env, 0), 0);
    out[0] = 0;
    test_proc_read_line(&p, out, cap, 10000);
    int rc = test_proc_wait(&p, 10000);
    close(p.out_fd);
    return rc;
}

typedef struct dm_s {
    test_proc_t p;
    char addr[64];
} dm_t;

/* extra: more environment entries (NULL-terminated) or NULL. */
static void dm_start_env(dm_t *d, const char *const *extra) {
    static char bin[1024], pg_env[1024], redis_env[128], schema_env[96], prefix_env[96];
    snprintf(bin, sizeof bin, "%s/services/device-mgmt/device-mgmt", test_env("IOT_BUILD_DIR"));
    snprintf(pg_env, sizeof pg_env, "IOT_PG_DSN=%s", test_env("IOT_TEST_PG"));
    snprintf(redis_env, sizeof redis_env, "IOT_REDIS_ADDR=%s", test_env("IOT_TEST_REDIS"));
    snprintf(schema_env, sizeof schema_env, "IOT_DM_PG_SCHEMA=t_probe_%d", (int)getpid());
    snprintf(prefix_env, sizeof prefix_env, "IOT_DM_REDIS_PREFIX={t-probe-%d}:", (int)getpid());
    char *argv[] = {bin, NULL};
    const char *env[16] = {pg_env, redis_env, schema_env, prefix_env, "IOT_DM_MIGRATIONS=services/device-mgmt/migrations",
                           "IOT_GRPC_LISTEN=127.0.0.1:0", "IOT_ADMIN_LISTEN=127.0.0.1:0", "IOT_LOG_LEVEL=warn"};
    for (size_t i = 8, j = 0; extra && extra[j] && i < 15; i++, j++) env[i] = extra[j];
    ASSERT_INT_EQ(test_proc_start(&d->p, argv, env, 1), 0);
    snprintf(d->addr, sizeof d->addr, "127.0.0.1:%d", d->p.grpc_port);
}

static void dm_start(dm_t *d) { dm_start_env(d, NULL); }

static void dm_stop(dm_t *d) {
    test_proc_kill(&d->p, SIGTERM);
    ASSERT_INT_EQ(test_proc_wait(&d->p, 15000), 0);
}

static void test_serving_service_and_unknown_name(void) {
    dm_t d;
    dm_start(&d);
    char out[1024];
    ASSERT_INT_EQ(probe(out, sizeof out, NULL, "-addr", d.addr, NULL, NULL), 0);
    if (!strstr(out, "SERVING")) TEST__FAIL("whole server: %s", out);
    ASSERT_INT_EQ(probe(out, sizeof out, NULL, "--addr", d.addr, "-service", "iot.device.v1.DeviceManager"), 0);
    if (!strstr(out, "iot.device.v1.DeviceManager SERVING")) TEST__FAIL("named service: %s", out);
    /* A name the server does not know: it answers NOT_FOUND, which is "not healthy", not "no answer". */
    ASSERT_INT_EQ(probe(out, sizeof out, NULL, "-addr", d.addr, "-service", "iot.nope.v1.Nope"), 1);
    if (!strstr(out, "iot.nope.v1.Nope unknown")) TEST__FAIL("unknown service: %s", out);
    /* Without -addr the HEALTHCHECK of an image dials the port IOT_GRPC_LISTEN names. */
    char listen[96];
    snprintf(listen, sizeof listen, "IOT_GRPC_LISTEN=0.0.0.0:%d", d.p.grpc_port);
    const char *env[] = {listen, NULL};
    ASSERT_INT_EQ(probe(out, sizeof out, env, NULL, NULL, NULL, NULL), 0);
    if (!strstr(out, d.addr)) TEST__FAIL("address from IOT_GRPC_LISTEN: %s", out);
    dm_stop(&d);
    /* The same port once the service has gone. */
    ASSERT_INT_EQ(probe(out, sizeof out, NULL, "-addr", d.addr, NULL, NULL), 2);
}

static void test_closed_port_is_no_answer_at_once(void) {
    /* A port bound but not listening refuses connections, and nothing else can take it meanwhile. */
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t len = sizeof sa;
    ASSERT(bind(fd, (struct sockaddr *)&sa, sizeof sa) == 0);
    ASSERT(getsockname(fd, (struct sockaddr *)&sa, &len) == 0);
    char addr[64], out[1024];
    snprintf(addr, sizeof addr, "127.0.0.1:%d", ntohs(sa.sin_port));
    int64_t t0 = now_ms();
    int rc = probe(out, sizeof out, NULL, "-addr", addr, "-timeout", "5s");
    int64_t took = now_ms() - t0;
    close(fd);
    ASSERT_INT_EQ(rc, 2);
    if (!strstr(out, "UNAVAILABLE")) TEST__FAIL("closed port: %s", out);
    /* Fail fast: a refused connection is reported without waiting for the deadline. */
    if (took >= 4000) TEST__FAIL("closed port took %lld ms", (long long)took);
}

static void test_silent_server_times_out(void) {
    /* Listening, so TCP connects, but nobody ever speaks HTTP/2. */
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t len = sizeof sa;
    ASSERT(bind(fd, (struct sockaddr *)&sa, sizeof sa) == 0);
    ASSERT(listen(fd, 8) == 0);
    ASSERT(getsockname(fd, (struct sockaddr *)&sa, &len) == 0);
    char addr[64], out[1024];
    snprintf(addr, sizeof addr, "127.0.0.1:%d", ntohs(sa.sin_port));
    int64_t t0 = now_ms();
    int rc = probe(out, sizeof out, NULL, "-addr", addr, "-timeout", "300ms");
    int64_t took = now_ms() - t0;
    close(fd);
    ASSERT_INT_EQ(rc, 2);
    if (!strstr(out, "within 300ms")) TEST__FAIL("silent server: %s", out);
    if (took >= 5000) TEST__FAIL("a 300ms timeout took %lld ms", (long long)took);
}

/* A service with mTLS required: the probe gets SERVING with the CA and a client certificate, and
 * no answer in plaintext or without a certificate (the handshake is refused). */
static void test_tls(void) {
    char dir[512], cmd[4096];
    snprintf(dir, sizeof dir, "%s/probe-tls-%d", test_tmpdir(), (int)getpid());
    snprintf(cmd, sizeof cmd,
             "set -e; mkdir -p %s; cd %s; "
             "openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout ca.key -out ca.pem -days 2 -subj /CN=probe-test-ca 2>/dev/null; "
             "openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout server.key -out server.csr -subj /CN=localhost 2>/dev/null; "
             "printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\\n' > san.ext; "
             "openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out server.pem -days 2 -extfile san.ext 2>/dev/null; "
             "openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout client.key -out client.csr -subj /CN=probe 2>/dev/null; "
             "openssl x509 -req -in client.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out client.pem -days 2 2>/dev/null",
             dir, dir);
    ASSERT_INT_EQ(system(cmd), 0);
    char cert_env[600], key_env[600], ca_env[600], ca[600], cert[600], key[600];
    snprintf(cert_env, sizeof cert_env, "IOT_TLS_CERT=%s/server.pem", dir);
    snprintf(key_env, sizeof key_env, "IOT_TLS_KEY=%s/server.key", dir);
    snprintf(ca_env, sizeof ca_env, "IOT_TLS_CLIENT_CA=%s/ca.pem", dir);
    snprintf(ca, sizeof ca, "%s/ca.pem", dir);
    snprintf(cert, sizeof cert, "%s/client.pem", dir);
    snprintf(key, sizeof key, "%s/client.key", dir);
    const char *extra[] = {cert_env, key_env, ca_env, "IOT_TLS_REQUIRE_CLIENT_CERT=true", NULL};
    dm_t d;
    dm_start_env(&d, extra);
    static char bin[1024];
    snprintf(bin, sizeof bin, "%s/tools/iot-health-probe", test_env("IOT_BUILD_DIR"));
    char *argv[] = {bin, (char *)"-addr", d.addr, (char *)"-tls-ca", ca, (char *)"-tls-cert", cert, (char *)"-tls-key", key, NULL};
    test_proc_t p;
    char out[1024] = "";
    ASSERT_INT_EQ(test_proc_start(&p, argv, NULL, 0), 0);
    test_proc_read_line(&p, out, sizeof out, 10000);
    int rc = test_proc_wait(&p, 10000);
    close(p.out_fd);
    if (rc != 0) TEST__FAIL("mTLS probe exited %d: %s", rc, out);
    ASSERT_INT_EQ(probe(out, sizeof out, NULL, "-addr", d.addr, NULL, NULL), 2);
    ASSERT_INT_EQ(probe(out, sizeof out, NULL, "-addr", d.addr, "-tls-ca", ca), 2);
    ASSERT_INT_EQ(probe(out, sizeof out, NULL, "-addr", d.addr, "-tls-cert", cert), 3); /* needs -tls-ca */
    dm_stop(&d);
}

static void test_bad_usage_exits_3(void) {
    char out[1024];
    const char *no_listen[] = {"IOT_GRPC_LISTEN=", NULL};
    ASSERT_INT_EQ(probe(out, sizeof out, no_listen, NULL, NULL, NULL, NULL), 3);
    ASSERT_INT_EQ(probe(out, sizeof out, NULL, "-addr", "127.0.0.1:1", "-timeout", "soon"), 3);
    ASSERT_INT_EQ(probe(out, sizeof out, NULL, "-bogus", "x", NULL, NULL), 3);
    ASSERT_INT_EQ(probe(out, sizeof out, NULL, "-addr", NULL, NULL, NULL), 3);
    ASSERT_INT_EQ(probe(out, sizeof out, NULL, "--help", NULL, NULL, NULL), 0);
    if (!strstr(out, "Usage: iot-health-probe")) TEST__FAIL("help: %s", out);
}

TEST_MAIN(TEST_ENTRY(test_serving_service_and_unknown_name), TEST_ENTRY(test_closed_port_is_no_answer_at_once),
          TEST_ENTRY(test_silent_server_times_out), TEST_ENTRY(test_tls), TEST_ENTRY(test_bad_usage_exits_3))
