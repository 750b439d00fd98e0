/* Helpers for tests that run real service binaries: start with extra environment, read the
 * "<name> grpc=<port> admin=<port>" line, send signals, wait, and a tiny HTTP GET client. */
#ifndef TEST_PROC_H
#define TEST_PROC_H

#include <stddef.h>
#include <sys/types.h>

typedef struct test_proc_s {
    pid_t pid;
    int out_fd;      /* child's stdout */
    char err_path[512]; /* child's stderr goes to this file */
    int grpc_port, admin_port;
} test_proc_t;

/* Starts argv[0] with env entries ("K=V", NULL-terminated) added. When wait_ports is set, waits up
 * to 10 s for the ports line; returns 0 or -1. */
int test_proc_start(test_proc_t *p, char *const argv[], const char *const env[], int wait_ports);
/* Starts `node tests/interop/<script> arg1 arg2` and waits up to 20 s for it to print `ready`
 * as its first line; 0 or -1. */
int test_proc_start_node(test_proc_t *p, const char *script, const char *arg1, const char *arg2, const char *ready);
/* Reads one line of the child's stdout (without the newline) within timeout_ms; 0 or -1. */
int test_proc_read_line(test_proc_t *p, char *buf, size_t cap, int timeout_ms);
/* Waits for exit up to timeout_ms; returns the exit status, 128+signal, or -1 on timeout. */
int test_proc_wait(test_proc_t *p, int timeout_ms);
void test_proc_kill(test_proc_t *p, int sig);
/* The resident set of a process in kB (VmRSS), -1 when it cannot be read. */
long test_proc_rss_kb(pid_t pid);
/* Reads the child's whole stderr file into buf. */
void test_proc_stderr(const test_proc_t *p, char *buf, size_t cap);

/* GET http://127.0.0.1:port/path; returns the status code, body in buf (NUL-terminated), -1 on error. */
int test_http_get(int port, const char *path, char *buf, size_t cap);
/* The same with one more request header line ("Authorization: Bearer ...", no CRLF), or NULL. */
int test_http_get_hdr(int port, const char *path, const char *header, char *buf, size_t cap);

#endif
