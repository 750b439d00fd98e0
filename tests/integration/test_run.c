/* tools/run.sh (make run, make run-clean) as a user runs it: on a fresh state directory and free
 * ports it starts Postgres, Redis and the six services, prints the REST address and an admin key
 * that works against the gateway; SIGINT stops everything with status 0 and leaves no process
 * behind. A second run on the same directory prints the same key, which still works; --clean is
 * refused while a run uses the directory and wipes it afterwards. */
#include <arpa/inet.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "proc.h"
#include "test.h"

static char state[600], env_state[640], env_pg[64], env_redis[64];
static test_proc_t run; /* the run.sh being driven; stopped at exit if a failed test left it */

static void stop_leftover_run(void) {
    if (run.pid > 0) {
        test_proc_kill(&run, SIGTERM);
        test_proc_wait(&run, 60000);
    }
}

/* A loopback port nothing listens on right now. */
static int free_port(void) {
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in sa = {0};
    sa.sin_family = AF_INET;
    sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    socklen_t len = sizeof sa;
    int port = -1;
    if (bind(fd, (struct sockaddr *)&sa, sizeof sa) == 0 && getsockname(fd, (struct sockaddr *)&sa, &len) == 0)
        port = ntohs(sa.sin_port);
    close(fd);
    return port;
}

typedef struct started_s {
    int http_port;
    char key[160];
    char out[16384]; /* everything run.sh printed up to "iotsuite running" */
} started_t;

/* Starts run.sh on the test's state directory and reads its output until it says it runs. */
static void run_start(started_t *s) {
    static char sh[] = "/bin/sh", script[] = "tools/run.sh", build[1024];
    snprintf(build, sizeof build, "%s", test_env("IOT_BUILD_DIR"));
    char *argv[] = {sh, script, build, NULL};
    const char *env[] = {env_state, env_pg, env_redis, "IOT_RUN_GRPC_BASE=0", "IOT_RUN_ADMIN_BASE=0", "IOT_RUN_HTTP_PORT=0", NULL};
    ASSERT_INT_EQ(test_proc_start(&run, argv, env, 0), 0);
    memset(s, 0, sizeof *s);
    size_t n = 0;
    for (;;) {
        char line[1024];
        /* First runs make a Postgres cluster; sanitizer builds start slowly. */
        if (test_proc_read_line(&run, line, sizeof line, 240000) != 0) {
            char err[4096];
            test_proc_stderr(&run, err, sizeof err);
            TEST__FAIL("run.sh did not say it runs; stdout:\n%s\nstderr:\n%s", s->out, err);
        }
        n += (size_t)snprintf(s->out + n, sizeof s->out - n, "%s\n", line);
        if (n >= sizeof s->out) n = sizeof s->out - 1;
        const char *p;
        if ((p = strstr(line, "REST API:   http://127.0.0.1:"))) s->http_port = atoi(p + strlen("REST API:   http://127.0.0.1:"));
        if ((p = strstr(line, "API key:    "))) sscanf(p + strlen("API key:    "), "%159s", s->key);
        if (strcmp(line, "iotsuite running; Ctrl-C stops it") == 0) break;
    }
    ASSERT(s->http_port > 0);
    ASSERT(strncmp(s->key, "iotk_", 5) == 0 && strlen(s->key) == 5 + 12 + 1 + 64);
    /* Every service, with a gRPC and an admin address. */
    static const char *const names[] = {"registry", "device-mgmt", "ingest", "processing", "ota", "gateway"};
    for (size_t i = 0; i < 6; i++) {
        char want[64];
        snprintf(want, sizeof want, "\n  %-12s 127.0.0.1:", names[i]);
        if (!strstr(s->out, want)) TEST__FAIL("no gRPC address for %s in:\n%s", names[i], s->out);
    }
}

static int api_get(const started_t *s, const char *path, const char *key, char *body, size_t cap) {
    char hdr[256];
    if (!key) return test_http_get(s->http_port, path, body, cap);
    snprintf(hdr, sizeof hdr, "Authorization: Bearer %s", key);
    return test_http_get_hdr(s->http_port, path, hdr, body, cap);
}

/* The processes run.sh started (from its pid list, Redis's pid file and Postgres's), while it runs. */
static int started_pids(pid_t *pids, int cap) {
    int n = 0;
    char path[700], line[1200];
    snprintf(path, sizeof path, "%s/run.pids", state);
    FILE *f = fopen(path, "r");
    while (f && n < cap && fgets(line, sizeof line, f)) pids[n++] = (pid_t)atol(line);
    if (f) fclose(f);
    const char *files[] = {"redis.pid", "pg/data/postmaster.pid"};
    for (int i = 0; i < 2 && n < cap; i++) {
        snprintf(path, sizeof path, "%s/%s", state, files[i]);
        f = fopen(path, "r");
        if (f && fgets(line, sizeof line, f)) pids[n++] = (pid_t)atol(line);
        if (f) fclose(f);
    }
    return n;
}

/* Processes whose environment names our state directory: whatever run.sh started, and their
 * children (Postgres's backends), inherit IOT_STATE_DIR. Returns how many, the first in *which. */
static int processes_of_state(pid_t *which) {
    DIR *d = opendir("/proc");
    int found = 0;
    struct dirent *e;
    size_t want = strlen(env_state);
    while (d && (e = readdir(d))) {
        pid_t pid = (pid_t)atol(e->d_name);
        if (pid <= 0 || pid == getpid()) continue;
        char path[64];
        snprintf(path, sizeof path, "/proc/%d/environ", (int)pid);
        int fd = open(path, O_RDONLY);
        if (fd < 0) continue;
        static char buf[65536];
        ssize_t n = read(fd, buf, sizeof buf - 1);
        close(fd);
        for (ssize_t i = 0; n > 0 && i < n;) {
            size_t len = strnlen(buf + i, (size_t)(n - i));
            if (len == want && memcmp(buf + i, env_state, want) == 0) {
                if (!found++) *which = pid;
                break;
            }
            i += (ssize_t)len + 1;
        }
    }
    if (d) closedir(d);
    return found;
}

/* Exited: no such process, or a zombie its adoptive parent has not reaped yet (Postgres, which
 * pg_ctl leaves to init, can be one for a moment after pg_ctl stop returns). */
static int gone(pid_t pid) {
    if (kill(pid, 0) != 0 && errno == ESRCH) return 1;
    char path[64], buf[256];
    snprintf(path, sizeof path, "/proc/%d/stat", (int)pid);
    FILE *f = fopen(path, "r");
    if (!f) return 1;
    size_t n = fread(buf, 1, sizeof buf - 1, f);
    fclose(f);
    buf[n] = 0;
    const char *p = strrchr(buf, ')');
    return p && p[1] == ' ' && p[2] == 'Z';
}

/* Sends sig to run.sh and expects a clean stop: status 0, "iotsuite stopped", nothing left. */
static void run_stop(int sig, pid_t *pids, int n) {
    test_proc_kill(&run, sig);
    char line[1024];
    int said = 0;
    while (test_proc_read_line(&run, line, sizeof line, 120000) == 0)
        if (strncmp(line, "iotsuite stopped", 16) == 0) said = 1;
    int st = test_proc_wait(&run, 120000);
    if (st != 0) {
        char err[4096];
        test_proc_stderr(&run, err, sizeof err);
        TEST__FAIL("run.sh exited with %d after signal %d; stderr:\n%s", st, sig, err);
    }
    ASSERT(said);
    for (int i = 0; i < n; i++) {
        for (int t = 0; t < 100 && !gone(pids[i]); t++) usleep(100000);
        if (!gone(pids[i])) TEST__FAIL("pid %d (started by run.sh) is still there", (int)pids[i]);
    }
    pid_t left = 0;
    int k = processes_of_state(&left);
    if (k) TEST__FAIL("%d processes of %s are still running, e.g. pid %d", k, state, (int)left);
    char path[700];
    snprintf(path, sizeof path, "%s/run.pid", state);
    ASSERT(access(path, F_OK) != 0);
}

static int clean(void) {
    static char sh[] = "/bin/sh", script[] = "tools/run.sh", opt[] = "--clean";
    char *argv[] = {sh, script, opt, NULL};
    const char *env[] = {env_state, NULL};
    test_proc_t p;
    ASSERT_INT_EQ(test_proc_start(&p, argv, env, 0), 0);
    return test_proc_wait(&p, 60000);
}

static void test_run_prints_a_working_key_and_stops_cleanly(void) {
    snprintf(state, sizeof state, "%s/run-state-%d", test_tmpdir(), (int)getpid());
    snprintf(env_state, sizeof env_state, "IOT_STATE_DIR=%s", state);
    snprintf(env_pg, sizeof env_pg, "IOT_PG_PORT=%d", free_port());
    snprintf(env_redis, sizeof env_redis, "IOT_REDIS_PORT=%d", free_port());
    atexit(stop_leftover_run);

    started_t a;
    run_start(&a);
    char body[8192];
    ASSERT_INT_EQ(api_get(&a, "/api/v1/devices:count", a.key, body, sizeof body), 200);
    ASSERT(strstr(body, "{") != NULL);
    ASSERT_INT_EQ(api_get(&a, "/api/v1/whoami", a.key, body, sizeof body), 200);
    ASSERT(strstr(body, "ADMIN"));
    ASSERT_INT_EQ(api_get(&a, "/api/v1/devices:count", NULL, body, sizeof body), 401);
    ASSERT_INT_EQ(test_http_get(a.http_port, "/", body, sizeof body), 200); /* the dashboard */
    /* The key is kept for the next run, readable by its owner only. */
    char path[700];
    struct stat sb;
    snprintf(path, sizeof path, "%s/admin-key", state);
    ASSERT_INT_EQ(stat(path, &sb), 0);
    ASSERT_INT_EQ(sb.st_mode & 0777, 0600);
    /* Wiping the directory under a running suite is refused. */
    ASSERT_INT_EQ(clean(), 1);
    pid_t pids[32];
    int n = started_pids(pids, 32);
    ASSERT(n >= 8); /* six services, Redis, Postgres */
    run_stop(SIGINT, pids, n);

    /* The same directory again: the data and the key are still there. */
    started_t b;
    run_start(&b);
    ASSERT_STR_EQ(b.key, a.key);
    ASSERT(strstr(b.out, "creating the Postgres cluster") == NULL);
    ASSERT_INT_EQ(api_get(&b, "/api/v1/devices:count", b.key, body, sizeof body), 200);
    n = started_pids(pids, 32);
    run_stop(SIGTERM, pids, n);

    ASSERT_INT_EQ(clean(), 0);
    ASSERT(access(state, F_OK) != 0);
}

TEST_MAIN(TEST_ENTRY(test_run_prints_a_working_key_and_stops_cleanly))
