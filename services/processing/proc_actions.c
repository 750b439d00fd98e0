/* The action workers: commands through device-mgmt and webhooks over HTTP(S), from the `actions`
 * outbox (the contract is in proc_actions.h). */
#include "proc_actions.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <jansson.h>
#include <netdb.h>
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <openssl/x509v3.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

#include "cm_alloc.h"
#include "cm_buf.h"
#include "cm_log.h"
#include "cm_loop.h"
#include "cm_metrics.h"
#include "cm_rpc.h"
#include "cm_time.h"
#include "iot/device/v1/device.pb-c.h"
#include "iot/processing/v1/processing.pb-c.h"

#define PROC__BATCH 16
#define PROC__BACKOFF_CAP_MS 300000

struct proc_actions_s {
    const proc_config_t *cfg;
    cm_pg_t *pg;
    cm_channel_t *dm;
    SSL_CTX *tls;
    cm_loop_t *cmd_loop, *hook_loop;
    cm_counter_t *c_ok[2], *c_fail[2], *c_retry[2];
};

typedef struct proc__job_s {
    char id[24], alert_id[24], event_id[24];
    char *target;
    uint8_t *payload;
    size_t plen;
    int attempts, max_attempts, timeout_ms;
    char device[160];
} proc__job_t;

/* ---- a small HTTP/1.1 client: one POST, the status code back ------------------------------ */

static int64_t proc__left(int64_t deadline_ns) {
    int64_t ms = (deadline_ns - cm_mono_ns()) / 1000000;
    return ms > 0 ? ms : 0;
}

static int proc__connect(const char *host, const char *port, int64_t deadline, char *err, size_t cap) {
    struct addrinfo hints = {.ai_socktype = SOCK_STREAM}, *ai = NULL;
    int rc = getaddrinfo(host, port, &hints, &ai);
    if (rc) {
        snprintf(err, cap, "cannot resolve %s: %s", host, gai_strerror(rc));
        return -1;
    }
    int fd = -1;
    for (struct addrinfo *a = ai; a && fd < 0; a = a->ai_next) {
        fd = socket(a->ai_family, a->ai_socktype | SOCK_CLOEXEC, a->ai_protocol);
        if (fd < 0) continue;
        int fl = fcntl(fd, F_GETFL);
        fcntl(fd, F_SETFL, fl | O_NONBLOCK);
        if (connect(fd, a->ai_addr, a->ai_addrlen) != 0 && errno == EINPROGRESS) {
            struct pollfd p = {fd, POLLOUT, 0};
            int soerr = 0;
            socklen_t sl = sizeof soerr;
            if (poll(&p, 1, (int)proc__left(deadline)) != 1 || getsockopt(fd, SOL_SOCKET, SO_ERROR, &soerr, &sl) || soerr) {
                snprintf(err, cap, "cannot connect to %s:%s: %s", host, port, soerr ? strerror(soerr) : "timed out");
                close(fd);
                fd = -1;
                continue;
            }
        } else if (errno != 0 && errno != EINPROGRESS) {
            snprintf(err, cap, "cannot connect to %s:%s: %s", host, port, strerror(errno));
        }
        if (fd >= 0) fcntl(fd, F_SETFL, fl);
    }
    freeaddrinfo(ai);
    return fd;
}

static void proc__timeouts(int fd, int64_t deadline) {
    int64_t ms = proc__left(deadline);
    if (ms < 1) ms = 1;
    struct timeval tv = {(time_t)(ms / 1000), (suseconds_t)(ms % 1000) * 1000};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
}

/* POSTs body to url within timeout_ms. Returns the HTTP status, or -1 with err set. */
static int proc__http_post(SSL_CTX *tls, const char *url, const char *const *headers, size_t n_headers,
                           const char *body, size_t blen, int timeout_ms, char *err, size_t cap) {
    int secure = strncmp(url, "https://", 8) == 0;
    const char *p = url + (secure ? 8 : 7);
    if (!secure && strncmp(url, "http://", 7) != 0) {
        snprintf(err, cap, "not an http(s) URL");
        return -1;
    }
    char host[256], port[8];
    const char *path = strchr(p, '/');
    size_t hl = path ? (size_t)(path - p) : strlen(p);
    if (!path) path = "/";
    if (hl == 0 || hl >= sizeof host) {
        snprintf(err, cap, "bad host in URL");
        return -1;
    }
    memcpy(host, p, hl);
    host[hl] = 0;
    snprintf(port, sizeof port, "%s", secure ? "443" : "80");
    char *hp = host;
    if (host[0] == '[') { /* [v6]:port */
        char *e = strchr(host, ']');
        if (!e) {
            snprintf(err, cap, "bad IPv6 host in URL");
            return -1;
        }
        *e = 0;
        hp = host + 1;
        if (e[1] == ':') snprintf(port, sizeof port, "%s", e + 2);
    } else {
        char *c = strrchr(host, ':');
        if (c) {
            *c = 0;
            snprintf(port, sizeof port, "%s", c + 1);
        }
    }
    int64_t deadline = cm_mono_ns() + (int64_t)timeout_ms * 1000000;
    int fd = proc__connect(hp, port, deadline, err, cap);
    if (fd < 0) return -1;
    proc__timeouts(fd, deadline);
    SSL *ssl = NULL;
    if (secure) {
        ssl = tls ? SSL_new(tls) : NULL;
        if (!ssl || !SSL_set_fd(ssl, fd) || !SSL_set_tlsext_host_name(ssl, hp) || !SSL_set1_host(ssl, hp) ||
            SSL_connect(ssl) != 1) {
            unsigned long e = ERR_get_error();
            char why[256];
            snprintf(why, sizeof why, "%s", e ? ERR_error_string(e, NULL) : "peer not verified");
            snprintf(err, cap, "TLS handshake with %.100s failed: %.150s", hp, why);
            ERR_clear_error();
            SSL_free(ssl);
            close(fd);
            return -1;
        }
    }
    cm_buf_t req = CM_BUF_INIT;
    cm_buf_printf(&req, "POST %s HTTP/1.1\r\nHost: %s\r\nContent-Length: %zu\r\nConnection: close\r\n", path, host, blen);
    for (size_t i = 0; i < n_headers; i++) cm_buf_printf(&req, "%s\r\n", headers[i]);
    cm_buf_puts(&req, "\r\n");
    cm_buf_append(&req, body, blen);
    size_t off = 0;
    int status = -1;
    while (off < req.len) {
        ssize_t w = ssl ? SSL_write(ssl, req.data + off, (int)(req.len - off)) : write(fd, req.data + off, req.len - off);
        if (w <= 0) {
            snprintf(err, cap, "sending the request failed (%s)", proc__left(deadline) ? "connection closed" : "timed out");
            goto out;
        }
        off += (size_t)w;
    }
    char resp[1024];
    size_t got = 0;
    while (got < sizeof resp - 1) {
        ssize_t r = ssl ? SSL_read(ssl, resp + got, (int)(sizeof resp - 1 - got)) : read(fd, resp + got, sizeof resp - 1 - got);
        if (r <= 0) break;
        got += (size_t)r;
        resp[got] = 0;
        if (strstr(resp, "\r\n")) break; /* the status line is all we need */
    }
    resp[got] = 0;
    if (sscanf(resp, "HTTP/%*d.%*d %d", &status) != 1) {
        status = -1;
        snprintf(err, cap, "%s", got ? "malformed HTTP response" : (proc__left(deadline) ? "no response" : "timed out"));
    }
out:
    cm_buf_free(&req);
    if (ssl) {
        SSL_shutdown(ssl);
        SSL_free(ssl);
    }
    close(fd);
    return status;
}

/* ---- the outbox -------------------------------------------------------------------------- */

static int proc__claim(proc_actions_t *a, int kind, proc__job_t *jobs) {
    cm_pg_conn_t *c = cm_pg_acquire(a->pg, 2000);
    if (!c) return -1;
    char k[4];
    snprintf(k, sizeof k, "%d", kind);
    const char *p[1] = {k};
    PGresult *res = NULL;
    int rc = cm_pg_exec(c, &res,
                        "WITH c AS (UPDATE actions SET attempts = attempts + 1, update_time = now(), "
                        "  next_time = now() + (timeout_ms + 5000) * interval '1 millisecond' "
                        "  WHERE id IN (SELECT id FROM actions WHERE state = 0 AND kind = $1 AND next_time <= now() "
                        "    ORDER BY id LIMIT 16 FOR UPDATE SKIP LOCKED) "
                        "  RETURNING id, alert_id, event_id, target, payload, attempts, max_attempts, timeout_ms) "
                        "SELECT c.*, a.device_id FROM c JOIN alerts AS a ON a.id = c.alert_id ORDER BY c.id",
                        1, p);
    cm_pg_release(a->pg, c);
    if (rc) return -1;
    int n = PQntuples(res);
    for (int i = 0; i < n && i < PROC__BATCH; i++) {
        proc__job_t *j = &jobs[i];
        memset(j, 0, sizeof *j);
        snprintf(j->id, sizeof j->id, "%s", PQgetvalue(res, i, 0));
        snprintf(j->alert_id, sizeof j->alert_id, "%s", PQgetvalue(res, i, 1));
        snprintf(j->event_id, sizeof j->event_id, "%s", PQgetvalue(res, i, 2));
        j->target = cm_strdup(PQgetvalue(res, i, 3));
        if (!PQgetisnull(res, i, 4)) {
            unsigned char *b = PQunescapeBytea((const unsigned char *)PQgetvalue(res, i, 4), &j->plen);
            j->payload = cm_malloc(j->plen ? j->plen : 1);
            if (b) memcpy(j->payload, b, j->plen);
            PQfreemem(b);
        }
        j->attempts = atoi(PQgetvalue(res, i, 5));
        j->max_attempts = atoi(PQgetvalue(res, i, 6));
        j->timeout_ms = atoi(PQgetvalue(res, i, 7));
        snprintf(j->device, sizeof j->device, "%s", PQgetvalue(res, i, 8));
    }
    PQclear(res);
    return n < PROC__BATCH ? n : PROC__BATCH;
}

/* Records the outcome: done (result), failed for good, or retried later with backoff. */
static void proc__finish(proc_actions_t *a, int kind, const proc__job_t *j, int ok, int permanent, const char *result) {
    cm_pg_conn_t *c = cm_pg_acquire(a->pg, 5000);
    if (!c) return; /* the claim runs out and the action is retried */
    int k = kind - 1;
    if (ok) {
        const char *p[2] = {j->id, result};
        int rc = cm_pg_begin(c);
        if (!rc) rc = cm_pg_exec(c, NULL, "UPDATE actions SET state = 1, result = $2, update_time = now() WHERE id = $1", 2, p);
        if (!rc && kind == 1) {
            const char *q[2] = {j->alert_id, result};
            rc = cm_pg_exec(c, NULL, "UPDATE alerts SET command_id = $2 WHERE id = $1 AND command_id IS NULL", 2, q);
            if (!rc) rc = cm_pg_exec(c, NULL, "SELECT alert_event($1, 5::smallint)", 1, q);
        }
        if (!rc) rc = cm_pg_commit(c);
        if (rc) cm_pg_rollback(c);
        cm_counter_add(a->c_ok[k], 1);
    } else if (permanent || j->attempts >= j->max_attempts) {
        const char *p[2] = {j->id, result};
        cm_pg_exec(c, NULL, "UPDATE actions SET state = 2, result = $2, update_time = now() WHERE id = $1", 2, p);
        cm_counter_add(a->c_fail[k], 1);
        cm_log_kv(CM_LOG_WARN, kind == 1 ? "command action failed for good" : "webhook failed for good", "action", j->id,
                  "alert", j->alert_id, "target", j->target, "result", result, NULL);
    } else {
        int64_t delay = a->cfg->action_backoff_ms;
        for (int i = 1; i < j->attempts && delay < PROC__BACKOFF_CAP_MS; i++) delay *= 2;
        if (delay > PROC__BACKOFF_CAP_MS) delay = PROC__BACKOFF_CAP_MS;
        char d[24];
        snprintf(d, sizeof d, "%" PRId64, delay);
        const char *p[3] = {j->id, result, d};
        cm_pg_exec(c, NULL,
                   "UPDATE actions SET result = $2, update_time = now(), next_time = now() + $3 * interval '1 millisecond' "
                   "WHERE id = $1",
                   3, p);
        cm_counter_add(a->c_retry[k], 1);
    }
    cm_pg_release(a->pg, c);
}

static void proc__command(proc_actions_t *a, const proc__job_t *j) {
    Iot__Device__V1__SendCommandRequest req = IOT__DEVICE__V1__SEND_COMMAND_REQUEST__INIT;
    req.device_id = (char *)j->device;
    req.name = j->target;
    char rid[48];
    snprintf(rid, sizeof rid, "alert-%s", j->alert_id);
    req.request_id = rid;
    Google__Protobuf__Struct *payload = NULL;
    if (j->payload) payload = google__protobuf__struct__unpack(NULL, j->plen, j->payload);
    req.payload = payload;
    Iot__Device__V1__Command *resp = NULL;
    cm_rpc_status_t st = {0};
    cm_call_opts_t o = {.timeout_ms = j->timeout_ms, .idempotent = 1};
    int code = cm_channel_unary(a->dm, "/iot.device.v1.DeviceManager/SendCommand", &req.base,
                                &iot__device__v1__command__descriptor, (ProtobufCMessage **)&resp, &o, &st);
    if (payload) protobuf_c_message_free_unpacked(&payload->base, NULL);
    char result[600];
    if (code == CM_STATUS_OK) {
        proc__finish(a, 1, j, 1, 0, resp->id);
        protobuf_c_message_free_unpacked(&resp->base, NULL);
    } else {
        snprintf(result, sizeof result, "%s: %s", cm_status_name(code), st.message);
        int permanent = code == CM_STATUS_INVALID_ARGUMENT || code == CM_STATUS_NOT_FOUND || code == CM_STATUS_FAILED_PRECONDITION;
        proc__finish(a, 1, j, 0, permanent, result);
    }
    cm_rpc_status_clear(&st);
}

static const char *proc__enum(const ProtobufCEnumDescriptor *d, int v) {
    const ProtobufCEnumValue *e = protobuf_c_enum_descriptor_get_value(d, v);
    return e ? e->name : "UNSPECIFIED";
}

static void proc__rfc3339(char *out, size_t cap, double ms) {
    time_t s = (time_t)(ms / 1000);
    struct tm tm;
    gmtime_r(&s, &tm);
    char b[32];
    strftime(b, sizeof b, "%Y-%m-%dT%H:%M:%S", &tm);
    snprintf(out, cap, "%s.%03dZ", b, (int)((int64_t)ms % 1000));
}

/* The alert as of the action's event, as JSON (proto3 JSON names). NULL when it is gone. */
static char *proc__hook_body(proc_actions_t *a, const proc__job_t *j) {
    cm_pg_conn_t *c = cm_pg_acquire(a->pg, 5000);
    if (!c) return NULL;
    const char *p[1] = {j->event_id};
    PGresult *res = NULL;
    int rc = cm_pg_exec(c, &res,
                        "SELECT a.id, a.rule_id, a.device_id, a.metric, a.message, "
                        "  (extract(epoch FROM a.fired_time) * 1000)::bigint, e.kind, e.severity, e.state, e.value, "
                        "  (extract(epoch FROM e.resolved_time) * 1000)::bigint, e.acknowledged, e.acknowledged_by, e.command_id "
                        "FROM alert_events AS e JOIN alerts AS a ON a.id = e.alert_id WHERE e.event_id = $1",
                        1, p);
    cm_pg_release(a->pg, c);
    if (rc) return NULL;
    if (PQntuples(res) != 1) {
        PQclear(res);
        return NULL;
    }
    static const char *const kinds[] = {"?", "fired", "escalated", "resolved", "acknowledged", "command_queued"};
    int kind = atoi(PQgetvalue(res, 0, 6));
    char fired[40], resolved[40];
    proc__rfc3339(fired, sizeof fired, atof(PQgetvalue(res, 0, 5)));
    json_t *o = json_object();
    json_object_set_new(o, "id", json_string(PQgetvalue(res, 0, 0)));
    json_object_set_new(o, "ruleId", json_string(PQgetvalue(res, 0, 1)));
    json_object_set_new(o, "deviceId", json_string(PQgetvalue(res, 0, 2)));
    json_object_set_new(o, "metric", json_string(PQgetvalue(res, 0, 3)));
    json_object_set_new(o, "message", json_string(PQgetvalue(res, 0, 4)));
    json_object_set_new(o, "firedTime", json_string(fired));
    json_object_set_new(o, "event", json_string(kind >= 1 && kind <= 5 ? kinds[kind] : "changed"));
    json_object_set_new(o, "eventId", json_string(j->event_id));
    json_object_set_new(o, "severity", json_string(proc__enum(&iot__processing__v1__severity__descriptor, atoi(PQgetvalue(res, 0, 7)))));
    json_object_set_new(o, "state", json_string(proc__enum(&iot__processing__v1__alert_state__descriptor, atoi(PQgetvalue(res, 0, 8)))));
    json_object_set_new(o, "value", json_real(atof(PQgetvalue(res, 0, 9))));
    if (!PQgetisnull(res, 0, 10)) {
        proc__rfc3339(resolved, sizeof resolved, atof(PQgetvalue(res, 0, 10)));
        json_object_set_new(o, "resolvedTime", json_string(resolved));
    }
    json_object_set_new(o, "acknowledged", json_boolean(PQgetvalue(res, 0, 11)[0] == 't'));
    if (!PQgetisnull(res, 0, 12)) json_object_set_new(o, "acknowledgedBy", json_string(PQgetvalue(res, 0, 12)));
    if (!PQgetisnull(res, 0, 13)) json_object_set_new(o, "commandId", json_string(PQgetvalue(res, 0, 13)));
    PQclear(res);
    char *s = json_dumps(o, JSON_COMPACT);
    json_decref(o);
    return s;
}

static void proc__webhook(proc_actions_t *a, const proc__job_t *j) {
    char *body = proc__hook_body(a, j);
    if (!body) {
        proc__finish(a, 2, j, 0, 0, "alert event not readable (Postgres)");
        return;
    }
    char key[64], err[300], result[400];
    snprintf(key, sizeof key, "Idempotency-Key: %.23s", j->id);
    const char *h[] = {"Content-Type: application/json", "User-Agent: iotsuite-processing", key};
    int status = proc__http_post(a->tls, j->target, h, 3, body, strlen(body), j->timeout_ms, err, sizeof err);
    free(body);
    if (status >= 200 && status < 300) {
        snprintf(result, sizeof result, "HTTP %d", status);
        proc__finish(a, 2, j, 1, 0, result);
    } else {
        if (status > 0)
            snprintf(result, sizeof result, "HTTP %d", status);
        else
            snprintf(result, sizeof result, "%s", err);
        proc__finish(a, 2, j, 0, 0, result);
    }
}

static int64_t proc__run(proc_actions_t *a, int kind) {
    proc__job_t jobs[PROC__BATCH];
    for (;;) {
        int n = proc__claim(a, kind, jobs);
        if (n <= 0) break;
        for (int i = 0; i < n; i++) {
            if (kind == 1)
                proc__command(a, &jobs[i]);
            else
                proc__webhook(a, &jobs[i]);
            cm_free(jobs[i].target);
            cm_free(jobs[i].payload);
        }
        if (n < PROC__BATCH) break;
    }
    /* Retries come due on their own schedule: look again at the poll interval, or earlier when a
     * short backoff is configured. */
    int64_t next = a->cfg->action_poll_ms;
    return a->cfg->action_backoff_ms < next ? a->cfg->action_backoff_ms : next;
}

static int64_t proc__cmd_loop(void *arg) { return proc__run(arg, 1); }
static int64_t proc__hook_loop(void *arg) { return proc__run(arg, 2); }

proc_actions_t *proc_actions_start(const proc_config_t *cfg, cm_pg_t *pg) {
    int err = 0;
    cm_channel_t *dm = cm_channel_new(cfg->dm_addr, NULL, &err);
    if (!dm) return NULL;
    proc_actions_t *a = cm_calloc(1, sizeof *a);
    a->cfg = cfg;
    a->pg = pg;
    a->dm = dm;
    a->tls = SSL_CTX_new(TLS_client_method());
    if (a->tls) {
        SSL_CTX_set_verify(a->tls, SSL_VERIFY_PEER, NULL);
        SSL_CTX_set_default_verify_paths(a->tls);
        SSL_CTX_set_min_proto_version(a->tls, TLS1_2_VERSION);
    }
    static const char *const kinds[2] = {"kind=\"command\"", "kind=\"webhook\""};
    for (int k = 0; k < 2; k++) {
        a->c_ok[k] = cm_metrics_counter("processing_actions_delivered_total", "actions delivered (commands queued, webhooks answered 2xx)", kinds[k]);
        a->c_fail[k] = cm_metrics_counter("processing_actions_failed_total", "actions given up on (attempts exhausted or refused for good)", kinds[k]);
        a->c_retry[k] = cm_metrics_counter("processing_action_retries_total", "failed attempts scheduled again", kinds[k]);
    }
    a->cmd_loop = cm_loop_start(proc__cmd_loop, a, 0);
    a->hook_loop = cm_loop_start(proc__hook_loop, a, 0);
    return a;
}

void proc_actions_kick(proc_actions_t *a) {
    if (!a) return;
    cm_loop_kick(a->cmd_loop);
    cm_loop_kick(a->hook_loop);
}

void proc_actions_stop(proc_actions_t *a) {
    if (!a) return;
    cm_loop_stop(a->cmd_loop);
    cm_loop_stop(a->hook_loop);
    SSL_CTX_free(a->tls);
    cm_channel_free(a->dm);
    cm_free(a);
}
