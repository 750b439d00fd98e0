/* Admin HTTP server: /metrics, /healthz, /readyz over libmicrohttpd. */
#include "cm_admin.h"
#include "cm_alloc.h"
#include "cm_buf.h"
#include "cm_err.h"
#include "cm_log.h"
#include "cm_metrics.h"

#include <arpa/inet.h>
#include <microhttpd.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

struct cm_admin_s {
    struct MHD_Daemon *d;
    cm_ready_fn ready;
    void *arg;
    int port;
};

int cm_parse_hostport(const char *s, struct sockaddr_storage *out, unsigned *len) {
    char host[256];
    const char *colon;
    memset(out, 0, sizeof *out);
    if (s[0] == '[') {
        const char *end = strchr(s, ']');
        if (!end || end[1] != ':' || (size_t)(end - s - 1) >= sizeof host) return CM_EINVAL;
        memcpy(host, s + 1, (size_t)(end - s - 1));
        host[end - s - 1] = '\0';
        colon = end + 1;
    } else {
        colon = strrchr(s, ':');
        if (!colon || (size_t)(colon - s) >= sizeof host) return CM_EINVAL;
        memcpy(host, s, (size_t)(colon - s));
        host[colon - s] = '\0';
    }
    char *endp;
    long port = strtol(colon + 1, &endp, 10);
    if (*endp || port < 0 || port > 65535 || colon[1] == '\0') return CM_EINVAL;
    if (!*host || strcmp(host, "localhost") == 0) strcpy(host, !*host ? "0.0.0.0" : "127.0.0.1");
    struct sockaddr_in *v4 = (struct sockaddr_in *)out;
    struct sockaddr_in6 *v6 = (struct sockaddr_in6 *)out;
    if (inet_pton(AF_INET, host, &v4->sin_addr) == 1) {
        v4->sin_family = AF_INET;
        v4->sin_port = htons((uint16_t)port);
        *len = sizeof *v4;
        return 0;
    }
    if (inet_pton(AF_INET6, host, &v6->sin6_addr) == 1) {
        v6->sin6_family = AF_INET6;
        v6->sin6_port = htons((uint16_t)port);
        *len = sizeof *v6;
        return 0;
    }
    return CM_EINVAL;
}

static enum MHD_Result cm__reply(struct MHD_Connection *conn, unsigned code, const char *type, char *body, size_t n) {
    struct MHD_Response *r = MHD_create_response_from_buffer(n, body, MHD_RESPMEM_MUST_FREE);
    if (!r) {
        cm_free(body);
        return MHD_NO; /* libmicrohttpd closes the connection */
    }
    MHD_add_response_header(r, "Content-Type", type);
    enum MHD_Result ret = MHD_queue_response(conn, code, r);
    MHD_destroy_response(r);
    return ret;
}

static enum MHD_Result cm__admin_handler(void *cls, struct MHD_Connection *conn, const char *url, const char *method,
                                         const char *version, const char *upload, size_t *upload_size, void **state) {
    (void)version;
    (void)upload;
    (void)upload_size;
    (void)state;
    cm_admin_t *a = cls;
    if (strcmp(method, "GET") != 0 && strcmp(method, "HEAD") != 0)
        return cm__reply(conn, 405, "text/plain", cm_strdup("method not allowed\n"), 19);
    if (strcmp(url, "/metrics") == 0) {
        cm_buf_t b = CM_BUF_INIT;
        cm_metrics_render(&b);
        if (!b.data) cm_buf_puts(&b, "");
        /* Ownership of b.data passes to libmicrohttpd, which frees it with free(). */
        return cm__reply(conn, 200, "text/plain; version=0.0.4; charset=utf-8", b.data, b.len);
    }
    if (strcmp(url, "/healthz") == 0) return cm__reply(conn, 200, "text/plain", cm_strdup("ok\n"), 3);
    if (strcmp(url, "/readyz") == 0) {
        char why[256] = "";
        int ok = a->ready ? a->ready(a->arg, why, sizeof why) : 1;
        cm_buf_t b = CM_BUF_INIT;
        cm_buf_printf(&b, "%s%s%s\n", ok ? "ready" : "not ready", why[0] ? ": " : "", why);
        return cm__reply(conn, ok ? 200 : 503, "text/plain", b.data, b.len);
    }
    return cm__reply(conn, 404, "text/plain", cm_strdup("not found: try /metrics, /healthz or /readyz\n"), 45);
}

cm_admin_t *cm_admin_start(const char *listen, cm_ready_fn ready, void *arg, int *err) {
    struct sockaddr_storage ss;
    unsigned sl;
    if (cm_parse_hostport(listen, &ss, &sl) != 0) {
        CM_LOG(CM_LOG_ERROR, "admin listen address \"%s\" is not host:port", listen);
        if (err) *err = CM_EINVAL;
        return NULL;
    }
    cm_admin_t *a = cm_calloc(1, sizeof *a);
    a->ready = ready;
    a->arg = arg;
    unsigned flags = MHD_USE_INTERNAL_POLLING_THREAD | MHD_USE_POLL;
    if (ss.ss_family == AF_INET6) flags |= MHD_USE_IPv6;
    a->d = MHD_start_daemon(flags, 0, NULL, NULL, cm__admin_handler, a, MHD_OPTION_SOCK_ADDR, (struct sockaddr *)&ss,
                            MHD_OPTION_CONNECTION_LIMIT, 64u, MHD_OPTION_CONNECTION_TIMEOUT, 10u, MHD_OPTION_END);
    if (!a->d) {
        CM_LOG(CM_LOG_ERROR, "cannot listen for admin HTTP on %s (address in use?)", listen);
        cm_free(a);
        if (err) *err = CM_EBIND;
        return NULL;
    }
    const union MHD_DaemonInfo *info = MHD_get_daemon_info(a->d, MHD_DAEMON_INFO_BIND_PORT);
    a->port = info ? info->port : 0;
    if (err) *err = 0;
    return a;
}

int cm_admin_port(const cm_admin_t *a) { return a->port; }

void cm_admin_stop(cm_admin_t *a) {
    if (!a) return;
    MHD_stop_daemon(a->d);
    cm_free(a);
}
