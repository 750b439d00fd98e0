/* Process and HTTP helpers for tests that drive real binaries. */
#include "proc.h"

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static int64_t now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

int test_proc_start(test_proc_t *p, char *const argv[], const char *const env[], int wait_ports) {
    static int seq;
    memset(p, 0, sizeof *p);
    const char *tmp = getenv("IOT_TEST_TMP");
    snprintf(p->err_path, sizeof p->err_path, "%s/proc-%d-%d.stderr", tmp ? tmp : "/tmp", (int)getpid(), seq++);
    int fds[2];
    if (pipe(fds)) return -1;
    pid_t parent = getpid();
    p->pid = fork();
    if (p->pid == 0) {
        /* A test that fails half-way never stops its services: they die with it instead of
         * lingering (ports, Postgres connections) after the run. */
        prctl(PR_SET_PDEATHSIG, SIGKILL);
        if (getppid() != parent) _exit(127);
        for (size_t i = 0; env && env[i]; i++) putenv((char *)env[i]);
        int err = open(p->err_path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
        dup2(fds[1], 1);
        dup2(err, 2);
        close(fds[0]);
        /* The test may block signals in its own threads; the child starts clean. */
        sigset_t none;
        sigemptyset(&none);
        sigprocmask(SIG_SETMASK, &none, NULL);
        execv(argv[0], argv);
        _exit(127);
    }
    close(fds[1]);
    p->out_fd = fds[0];
    if (!wait_ports) return 0;
    char line[256];
    size_t n = 0;
    int64_t until = now_ms() + 10000;
    while (now_ms() < until && n + 1 < sizeof line) {
        struct pollfd pf = {p->out_fd, POLLIN, 0};
        if (poll(&pf, 1, 100) <= 0) continue;
        ssize_t r = read(p->out_fd, line + n, 1);
        if (r <= 0) break;
        if (line[n] == '\n') {
            line[n] = 0;
            const char *g = strstr(line, "grpc="), *a = strstr(line, "admin=");
            if (g && a) {
                p->grpc_port = atoi(g + 5);
                p->admin_port = atoi(a + 6);
                return 0;
            }
            n = 0;
            continue;
        }
        n++;
    }
    return -1;
}

int test_proc_read_line(test_proc_t *p, char *buf, size_t cap, int timeout_ms) {
    size_t n = 0;
    int64_t until = now_ms() + timeout_ms;
    while (now_ms() < until && n + 1 < cap) {
        struct pollfd pf = {p->out_fd, POLLIN, 0};
        if (poll(&pf, 1, 100) <= 0) continue;
        if (read(p->out_fd, buf + n, 1) != 1) break;
        if (buf[n] == '\n') {
            buf[n] = 0;
            return 0;
        }
        n++;
    }
    buf[n] = 0;
    return -1;
}

int test_proc_start_node(test_proc_t *p, const char *script, const char *arg1, const char *arg2, const char *ready) {
    char path[256];
    snprintf(path, sizeof path, "tests/interop/%s", script);
    char *argv[] = {(char *)"/usr/bin/env", (char *)"node", path, (char *)arg1, (char *)arg2, NULL};
    if (test_proc_start(p, argv, NULL, 0) != 0) return -1;
    char line[256];
    if (test_proc_read_line(p, line, sizeof line, 20000) != 0) return -1;
    return strcmp(line, ready) == 0 ? 0 : -1;
}

int test_proc_wait(test_proc_t *p, int timeout_ms) {
    int64_t until = now_ms() + timeout_ms;
    for (;;) {
        int st;
        pid_t r = waitpid(p->pid, &st, WNOHANG);
        if (r == p->pid) {
            close(p->out_fd);
            p->pid = 0;
            if (WIFEXITED(st)) return WEXITSTATUS(st);
            return 128 + WTERMSIG(st);
        }
        if (now_ms() >= until) return -1;
        usleep(10000);
    }
}

void test_proc_kill(test_proc_t *p, int sig) {
    if (p->pid > 0) kill(p->pid, sig);
}

void test_proc_stderr(const test_proc_t *p, char *buf, size_t cap) {
    buf[0] = 0;
    FILE *f = fopen(p->err_path, "r");
    if (!f) return;
    size_t n = fread(buf, 1, cap - 1, f);
    buf[n] = 0;
    fclose(f);
}

int test_http_get(int port, const char *path, char *buf, size_t cap) {
    return test_http_get_hdr(port, path, NULL, buf, cap);
}

int test_http_get_hdr(int port, const char *path, const char *header, char *buf, size_t cap) {
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in sa = {0};
    sa.sin_family = AF_INET;
    sa.sin_port = htons((uint16_t)port);
    sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (connect(fd, (struct sockaddr *)&sa, sizeof sa)) {
        close(fd);
        return -1;
    }
    char req[1024];
    int n = snprintf(req, sizeof req, "GET %s HTTP/1.0\r\nHost: 127.0.0.1\r\n%s%s\r\n", path, header ? header : "",
                     header ? "\r\n" : "");
    if (n < 0 || (size_t)n >= sizeof req) {
        close(fd);
        return -1;
    }
    if (write(fd, req, (size_t)n) != n) {
        close(fd);
        return -1;
    }
    size_t got = 0;
    ssize_t r;
    while (got + 1 < cap && (r = read(fd, buf + got, cap - got - 1)) > 0) got += (size_t)r;
    buf[got] = 0;
    close(fd);
    int code = -1;
    if (sscanf(buf, "HTTP/1.%*d %d", &code) != 1) return -1;
    char *body = strstr(buf, "\r\n\r\n");
    if (body) memmove(buf, body + 4, strlen(body + 4) + 1);
    return code;
}

long test_proc_rss_kb(pid_t pid) {
    char path[64], line[256];
    snprintf(path, sizeof path, "/proc/%d/status", (int)pid);
    FILE *f = fopen(path, "r");
    long kb = -1;
    while (f && fgets(line, sizeof line, f))
        if (strncmp(line, "VmRSS:", 6) == 0) kb = atol(line + 6);
    if (f) fclose(f);
    return kb;
}
