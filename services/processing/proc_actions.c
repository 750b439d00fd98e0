/* The action workers: commands through device-mgmt and webhooks over HTTP(S), from the `actions`
 * outbox (the contract is in proc_actions.h; the HTTP client in proc_http.h).
 *
 * Each worker thread claims one due row at a time (so a claim's lease covers exactly one
 * delivery), delivers it holding no Postgres connection, then records the outcome. Outcome
 * writes are conditioned on the claim still being ours (state 0 and the attempt number we took),
 * so a worker whose lease ran out while another one retried cannot overwrite the newer attempt;
 * a success is always recorded, since the delivery did happen. */
#include "proc_actions.h"

#include <inttypes.h>
#include <math.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "cm_alloc.h"
#include "cm_err.h"
#include "cm_json.h"
#include "cm_log.h"
#include "cm_loop.h"
#include "cm_metrics.h"
#include "cm_rpc.h"
#include "iot/device/v1/device.pb-c.h"
#include "iot/processing/v1/processing.pb-c.h"
#include "proc_http.h"

enum { PROC__COMMAND = 1, PROC__WEBHOOK = 2 };

#define PROC__BACKOFF_CAP_MS 300000
/* A claim pushes next_time past the attempt's timeout by this much: room for recording the
 * outcome (a pool wait of up to 5 s and the write) before another worker may take the row. */
#define PROC__LEASE_GRACE_MS 10000
#define PROC__MIN_SLEEP_MS 10

#define PROC__SEND_COMMAND "/iot.device.v1.DeviceManager/SendCommand"

typedef struct proc__worker_s {
    proc_actions_t *a;
    int kind;
    const char *name; /* "command" / "webhook", for logs */
    cm_loop_t *loop;
    cm_counter_t *c_ok, *c_fail, *c_retry;
} proc__worker_t;

struct proc_actions_s {
    const proc_config_t *cfg;
    cm_pg_t *pg;
    cm_channel_t *dm;
    proc_http_t *http;
    atomic_int stopping;
    proc__worker_t w[2]; /* commands, webhooks: apart, so a slow webhook never delays a command */
};

/* One claimed row. */
typedef struct proc__job_s {
    char id[24], alert_id[24], event_id[24], attempt[16];
    char *target;
    uint8_t *payload; /* NULL when the row has none */
    size_t plen;
    int attempts, max_attempts, timeout_ms;
    char *device; /* NULL when the alert is gone */
} proc__job_t;

static void proc__job_free(proc__job_t *j) {
    cm_free(j->target);
    cm_free(j->payload);
    cm_free(j->device);
}

/* ---- the outbox -------------------------------------------------------------------------- */

/* Takes the most overdue row of the worker's kind: 1 with *j filled, 0 none due, -1 Postgres
 * unavailable. The attempt is counted at the claim, so one that dies mid-delivery still counts. */
static int proc__claim(proc__worker_t *w, proc__job_t *j) {
    proc_actions_t *a = w->a;
    cm_pg_conn_t *c = cm_pg_acquire(a->pg, 2000);
    if (!c) return -1;
    char kind[4], grace[16];
    snprintf(kind, sizeof kind, "%d", w->kind);
    snprintf(grace, sizeof grace, "%d", PROC__LEASE_GRACE_MS);
    const char *p[2] = {kind, grace};
    PGresult *res = NULL;
    int rc = cm_pg_exec(c, &res,
                        "WITH c AS ("
                        "  UPDATE actions AS x SET attempts = x.attempts + 1, update_time = now(), "
                        "    next_time = now() + (x.timeout_ms + $2::int) * interval '1 millisecond' "
                        "  FROM (SELECT id FROM actions WHERE state = 0 AND kind = $1::smallint AND next_time <= now() "
                        "        ORDER BY next_time LIMIT 1 FOR UPDATE SKIP LOCKED) AS due "
                        "  WHERE x.id = due.id "
                        "  RETURNING x.id, x.alert_id, x.event_id, x.target, x.payload, x.attempts, x.max_attempts, x.timeout_ms) "
                        "SELECT c.id, c.alert_id, c.event_id, c.target, c.payload, c.attempts, c.max_attempts, c.timeout_ms, "
                        "  a.device_id FROM c LEFT JOIN alerts AS a ON a.id = c.alert_id",
                        2, p);
    if (rc) {
        cm_log_kv(CM_LOG_WARN, "action claim failed", "kind", w->name, "error", cm_pg_error(c), NULL);
        cm_pg_release(a->pg, c);
        return -1;
    }
    cm_pg_release(a->pg, c);
    if (PQntuples(res) != 1) {
        PQclear(res);
        return 0;
    }
    memset(j, 0, sizeof *j);
    snprintf(j->id, sizeof j->id, "%s", PQgetvalue(res, 0, 0));
    snprintf(j->alert_id, sizeof j->alert_id, "%s", PQgetvalue(res, 0, 1));
    snprintf(j->event_id, sizeof j->event_id, "%s", PQgetvalue(res, 0, 2));
    j->target = cm_strdup(PQgetvalue(res, 0, 3));
    if (!PQgetisnull(res, 0, 4)) {
        size_t n = 0;
        unsigned char *b = PQunescapeBytea((const unsigned char *)PQgetvalue(res, 0, 4), &n);
        if (b) {
            j->payload = cm_malloc(n ? n : 1);
            memcpy(j->payload, b, n);
            j->plen = n;
            PQfreemem(b);
        }
    }
    snprintf(j->attempt, sizeof j->attempt, "%s", PQgetvalue(res, 0, 5));
    j->attempts = atoi(j->attempt);
    j->max_attempts = atoi(PQgetvalue(res, 0, 6));
    j->timeout_ms = atoi(PQgetvalue(res, 0, 7));
    if (j->timeout_ms <= 0) j->timeout_ms = 5000;
    if (!PQgetisnull(res, 0, 8)) j->device = cm_strdup(PQgetvalue(res, 0, 8));
    PQclear(res);
    return 1;
}

/* Milliseconds until the next row of this kind comes due (NULL: none pending). */
static int64_t proc__next_due(proc__worker_t *w) {
    int64_t poll = w->a->cfg->action_poll_ms;
    cm_pg_conn_t *c = cm_pg_acquire(w->a->pg, 2000);
    if (!c) return poll;
    char kind[4];
    snprintf(kind, sizeof kind, "%d", w->kind);
    const char *p[1] = {kind};
    PGresult *res = NULL;
    int64_t ms = poll;
    if (cm_pg_exec(c, &res,
                   "SELECT ceil(extract(epoch FROM min(next_time) - now()) * 1000)::bigint FROM actions "
                   "WHERE state = 0 AND kind = $1::smallint",
                   1, p) == 0) {
        if (PQntuples(res) == 1 && !PQgetisnull(res, 0, 0)) ms = strtoll(PQgetvalue(res, 0, 0), NULL, 10);
        PQclear(res);
    }
    cm_pg_release(w->a->pg, c);
    /* A row due now that the claim did not get is locked by another worker's claim: look again
     * soon, not at once. */
    if (ms < PROC__MIN_SLEEP_MS) ms = PROC__MIN_SLEEP_MS;
    return ms < poll ? ms : poll;
}

/* IOT_PROC_ACTION_BACKOFF * 2^(attempt-1), at most 5 minutes. */
static int64_t proc__backoff(const proc_config_t *cfg, int attempt) {
    int64_t d = cfg->action_backoff_ms;
    for (int i = 1; i < attempt && d < PROC__BACKOFF_CAP_MS; i++) d *= 2;
    return d < PROC__BACKOFF_CAP_MS ? d : PROC__BACKOFF_CAP_MS;
}

/* Rows changed by a successful UPDATE, -1 on error. */
static int proc__update(cm_pg_conn_t *c, const char *sql, int n, const char *const *p) {
    PGresult *res = NULL;
    if (cm_pg_exec(c, &res, sql, n, p)) return -1;
    int rows = atoi(PQcmdTuples(res));
    PQclear(res);
    return rows;
}

/* Records a success: the action is done (result), and for a command the alert gets the command
 * id and a "command queued" event, in one transaction. Returns 0, or -1 (the lease then runs
 * out and the action is delivered again: device-mgmt answers a repeat with the same command). */
static int proc__done(proc__worker_t *w, const proc__job_t *j, const char *result) {
    cm_pg_conn_t *c = cm_pg_acquire(w->a->pg, 5000);
    if (!c) return -1;
    const char *p[2] = {j->id, result};
    int rc = cm_pg_begin(c);
    int rows = rc ? -1 : proc__update(c, "UPDATE actions SET state = 1, result = $2, update_time = now() WHERE id = $1::bigint AND state = 0", 2, p);
    /* rows == 0: another worker already recorded this action (our lease had lapsed) */
    if (rows == 1 && w->kind == PROC__COMMAND) {
        const char *q[2] = {j->alert_id, result};
        rows = proc__update(c, "UPDATE alerts SET command_id = $2 WHERE id = $1::bigint AND command_id IS NULL", 2, q);
        if (rows == 1) rows = cm_pg_exec(c, NULL, "SELECT alert_event($1::bigint, 5::smallint)", 1, q) ? -1 : 1;
    }
    rc = rows < 0 ? -1 : cm_pg_commit(c);
    if (rc) {
        cm_log_kv(CM_LOG_WARN, "recording a delivered action failed; it will be delivered again", "kind", w->name, "action",
                  j->id, "error", cm_pg_error(c), NULL);
        cm_pg_rollback(c);
    }
    cm_pg_release(w->a->pg, c);
    return rc ? -1 : 0;
}

/* Records a failed attempt: retried after the backoff, or failed for good when permanent or
 * out of attempts. shown: the target as it may appear in logs. */
static void proc__failed(proc__worker_t *w, const proc__job_t *j, int permanent, const char *result, const char *shown) {
    int final = permanent || j->attempts >= j->max_attempts;
    int64_t delay = proc__backoff(w->a->cfg, j->attempts);
    char d[24];
    snprintf(d, sizeof d, "%" PRId64, delay);
    cm_pg_conn_t *c = cm_pg_acquire(w->a->pg, 5000);
    int rows = -1;
    if (c) {
        if (final) {
            const char *p[3] = {j->id, result, j->attempt};
            rows = proc__update(c,
                                "UPDATE actions SET state = 2, result = $2, update_time = now() "
                                "WHERE id = $1::bigint AND state = 0 AND attempts = $3::int",
                                3, p);
        } else {
            const char *p[4] = {j->id, result, j->attempt, d};
            rows = proc__update(c,
                                "UPDATE actions SET result = $2, update_time = now(), next_time = now() + $4::bigint * interval '1 millisecond' "
                                "WHERE id = $1::bigint AND state = 0 AND attempts = $3::int",
                                4, p);
        }
        if (rows < 0)
            cm_log_kv(CM_LOG_WARN, "recording a failed action attempt failed; it is retried when its claim runs out", "kind",
                      w->name, "action", j->id, "error", cm_pg_error(c), NULL);
        cm_pg_release(w->a->pg, c);
    }
    if (rows != 1) return; /* not recorded, or no longer ours: nothing to count */
    char att[32];
    snprintf(att, sizeof att, "%d/%d", j->attempts, j->max_attempts);
    if (final) {
        cm_counter_add(w->c_fail, 1);
        cm_log_kv(CM_LOG_WARN, permanent ? "action refused for good" : "action failed for good (attempts exhausted)", "kind",
                  w->name, "action", j->id, "alert", j->alert_id, "target", shown, "attempt", att, "result", result, NULL);
    } else {
        cm_counter_add(w->c_retry, 1);
        cm_log_kv(CM_LOG_INFO, "action attempt failed; retrying", "kind", w->name, "action", j->id, "alert", j->alert_id,
                  "target", shown, "attempt", att, "result", result, "retry_in_ms", d, NULL);
    }
}

static void proc__succeeded(proc__worker_t *w, const proc__job_t *j, const char *result, const char *shown) {
    if (proc__done(w, j, result)) return;
    cm_counter_add(w->c_ok, 1);
    CM_LOG(CM_LOG_DEBUG, "action %s (%s, alert %s) delivered to %s: %s", j->id, w->name, j->alert_id, shown, result);
}

/* ---- commands ---------------------------------------------------------------------------- */

static void proc__command(proc__worker_t *w, const proc__job_t *j) {
    if (!j->device) {
        proc__failed(w, j, 1, "the alert no longer exists", j->target);
        return;
    }
    Google__Protobuf__Struct *payload = NULL;
    if (j->payload) {
        payload = google__protobuf__struct__unpack(NULL, j->plen, j->payload);
        if (!payload) {
            proc__failed(w, j, 1, "stored payload is not a google.protobuf.Struct", j->target);
            return;
        }
    }
    Iot__Device__V1__SendCommandRequest req = IOT__DEVICE__V1__SEND_COMMAND_REQUEST__INIT;
    char rid[48];
    snprintf(rid, sizeof rid, "alert-%s", j->alert_id);
    req.device_id = j->device;
    req.name = j->target;
    req.payload = payload;
    req.request_id = rid;
    Iot__Device__V1__Command *resp = NULL;
    cm_rpc_status_t st;
    memset(&st, 0, sizeof st);
    /* The request_id makes a repeat harmless, so the channel may retry UNAVAILABLE itself. */
    cm_call_opts_t o = {.timeout_ms = j->timeout_ms, .idempotent = 1};
    int code = cm_channel_unary(w->a->dm, PROC__SEND_COMMAND, &req.base, &iot__device__v1__command__descriptor,
                                (ProtobufCMessage **)&resp, &o, &st);
    if (payload) protobuf_c_message_free_unpacked(&payload->base, NULL);
    if (code == CM_STATUS_OK) {
        proc__succeeded(w, j, resp->id, j->target);
        protobuf_c_message_free_unpacked(&resp->base, NULL);
    } else {
        char result[600];
        snprintf(result, sizeof result, "%s: %s", cm_status_name(code), st.message);
        /* Refusals that a repeat cannot change; anything else (UNAVAILABLE, DEADLINE_EXCEEDED,
         * INTERNAL, ...) may pass later. */
        int permanent = code == CM_STATUS_INVALID_ARGUMENT || code == CM_STATUS_NOT_FOUND || code == CM_STATUS_FAILED_PRECONDITION;
        proc__failed(w, j, permanent, result, j->target);
    }
    cm_rpc_status_clear(&st);
}

/* ---- webhooks ---------------------------------------------------------------------------- */

/* An enum as proto3 JSON: its name, or the number when it has none. */
static json_t *proc__enum_json(const ProtobufCEnumDescriptor *d, int v) {
    const ProtobufCEnumValue *e = protobuf_c_enum_descriptor_get_value(d, v);
    return e ? json_string(e->name) : json_integer(v);
}

/* A double as proto3 JSON: a number, or "NaN" / "Infinity" / "-Infinity". */
static json_t *proc__double_json(double v) {
    if (isnan(v)) return json_string("NaN");
    if (isinf(v)) return json_string(v > 0 ? "Infinity" : "-Infinity");
    return json_real(v);
}

/* Epoch milliseconds (a result column) as an RFC 3339 UTC timestamp, as protobuf prints one:
 * fractional digits only when there are milliseconds. */
static json_t *proc__time_json(const char *ms_text) {
    int64_t ms = strtoll(ms_text, NULL, 10);
    int64_t sec = ms / 1000, rem = ms % 1000;
    if (rem < 0) {
        rem += 1000;
        sec--;
    }
    time_t t = (time_t)sec;
    struct tm tm;
    gmtime_r(&t, &tm);
    char b[48];
    size_t n = strftime(b, sizeof b, "%Y-%m-%dT%H:%M:%S", &tm);
    if (rem)
        snprintf(b + n, sizeof b - n, ".%03dZ", (int)rem);
    else
        snprintf(b + n, sizeof b - n, "Z");
    return json_string(b);
}

/* The webhook body for the job's event, NUL-terminated (cm_free), or NULL with *permanent set
 * when the event is gone (1) or Postgres could not be read (0). */
static char *proc__hook_body(proc__worker_t *w, const proc__job_t *j, int *permanent) {
    *permanent = 0;
    cm_pg_conn_t *c = cm_pg_acquire(w->a->pg, 5000);
    if (!c) return NULL;
    const char *p[1] = {j->event_id};
    PGresult *res = NULL;
    /* The alert's fixed columns from alerts; what changes from the event's own snapshot, so a
     * late or repeated delivery still describes the alert as it was at that change. */
    int rc = cm_pg_exec(c, &res,
                        "SELECT a.id, a.rule_id, a.device_id, a.metric, a.message, "
                        "  (extract(epoch FROM a.fired_time) * 1000)::bigint, e.kind, e.severity, e.state, e.value, "
                        "  (extract(epoch FROM e.resolved_time) * 1000)::bigint, e.acknowledged, e.acknowledged_by, "
                        "  (extract(epoch FROM e.acknowledged_time) * 1000)::bigint, e.command_id "
                        "FROM alert_events AS e JOIN alerts AS a ON a.id = e.alert_id WHERE e.event_id = $1::bigint",
                        1, p);
    if (rc) {
        cm_log_kv(CM_LOG_WARN, "reading the alert for a webhook failed", "action", j->id, "error", cm_pg_error(c), NULL);
        cm_pg_release(w->a->pg, c);
        return NULL;
    }
    cm_pg_release(w->a->pg, c);
    if (PQntuples(res) != 1) {
        PQclear(res);
        *permanent = 1;
        return NULL;
    }
    static const char *const events[] = {"changed", "fired", "escalated", "resolved", "acknowledged", "commandQueued"};
    int kind = atoi(PQgetvalue(res, 0, 6));
    json_t *o = json_object();
    json_object_set_new(o, "id", json_string(PQgetvalue(res, 0, 0)));
    json_object_set_new(o, "ruleId", json_string(PQgetvalue(res, 0, 1)));
    json_object_set_new(o, "deviceId", json_string(PQgetvalue(res, 0, 2)));
    json_object_set_new(o, "metric", json_string(PQgetvalue(res, 0, 3)));
    json_object_set_new(o, "message", json_string(PQgetvalue(res, 0, 4)));
    json_object_set_new(o, "firedTime", proc__time_json(PQgetvalue(res, 0, 5)));
    json_object_set_new(o, "event", json_string(events[kind >= 1 && kind <= 5 ? kind : 0]));
    json_object_set_new(o, "eventId", json_string(j->event_id));
    json_object_set_new(o, "severity", proc__enum_json(&iot__processing__v1__severity__descriptor, atoi(PQgetvalue(res, 0, 7))));
    json_object_set_new(o, "state", proc__enum_json(&iot__processing__v1__alert_state__descriptor, atoi(PQgetvalue(res, 0, 8))));
    json_object_set_new(o, "value", proc__double_json(strtod(PQgetvalue(res, 0, 9), NULL)));
    /* proto3 JSON leaves out fields at their defaults: unset times, false, empty strings */
    if (!PQgetisnull(res, 0, 10)) json_object_set_new(o, "resolvedTime", proc__time_json(PQgetvalue(res, 0, 10)));
    if (PQgetvalue(res, 0, 11)[0] == 't') json_object_set_new(o, "acknowledged", json_true());
    if (!PQgetisnull(res, 0, 12) && *PQgetvalue(res, 0, 12))
        json_object_set_new(o, "acknowledgedBy", json_string(PQgetvalue(res, 0, 12)));
    if (!PQgetisnull(res, 0, 13)) json_object_set_new(o, "acknowledgedTime", proc__time_json(PQgetvalue(res, 0, 13)));
    if (!PQgetisnull(res, 0, 14) && *PQgetvalue(res, 0, 14)) json_object_set_new(o, "commandId", json_string(PQgetvalue(res, 0, 14)));
    PQclear(res);
    char *s = cm_json_dump(o);
    json_decref(o);
    return s;
}

static void proc__webhook(proc__worker_t *w, const proc__job_t *j) {
    /* Logs and results name scheme, host and port only: the path or query of a webhook URL
     * often carries a secret. */
    char shown[300];
    proc_http_url_t u;
    char uerr[128];
    if (proc_http_url_parse(j->target, &u, uerr, sizeof uerr) == 0)
        snprintf(shown, sizeof shown, "%s://%s%s%s:%s", u.tls ? "https" : "http", u.ipv6 ? "[" : "", u.host, u.ipv6 ? "]" : "",
                 u.port);
    else
        snprintf(shown, sizeof shown, "(malformed URL)");
    int permanent = 0;
    char *body = proc__hook_body(w, j, &permanent);
    if (!body) {
        proc__failed(w, j, permanent, permanent ? "the alert event no longer exists" : "cannot read the alert (Postgres)", shown);
        return;
    }
    char key[64], trace[80];
    snprintf(key, sizeof key, "Idempotency-Key: %s", j->id);
    const cm_trace_t *t = cm_trace_current();
    snprintf(trace, sizeof trace, "traceparent: ");
    if (t) cm_trace_child_header(t, trace + 13, sizeof trace - 13);
    const char *h[4] = {"Content-Type: application/json", "User-Agent: iotsuite-processing", key, trace};
    proc_http_resp_t resp;
    int status = proc_http_post(w->a->http, j->target, h, t ? 4 : 3, body, strlen(body), j->timeout_ms, &resp);
    cm_free(body);
    char result[320];
    if (status > 0)
        snprintf(result, sizeof result, "HTTP %d", status);
    else
        snprintf(result, sizeof result, "%s", resp.errstr);
    proc_http_resp_free(&resp);
    if (status >= 200 && status < 300)
        proc__succeeded(w, j, result, shown);
    else /* every other answer, or none, may be different next time */
        proc__failed(w, j, status == CM_EINVAL, result, shown);
}

/* ---- the workers ------------------------------------------------------------------------- */

static int64_t proc__work(void *arg) {
    proc__worker_t *w = arg;
    proc_actions_t *a = w->a;
    while (!atomic_load(&a->stopping)) {
        proc__job_t j;
        int got = proc__claim(w, &j);
        if (got < 0) return a->cfg->action_poll_ms;
        if (got == 0) break;
        /* One trace per delivery: its log lines, the gRPC call and the webhook's traceparent. */
        cm_trace_t trace;
        cm_trace_new(&trace);
        const cm_trace_t *prev = cm_trace_set_current(&trace);
        if (w->kind == PROC__COMMAND)
            proc__command(w, &j);
        else
            proc__webhook(w, &j);
        cm_trace_set_current(prev);
        proc__job_free(&j);
    }
    return atomic_load(&a->stopping) ? a->cfg->action_poll_ms : proc__next_due(w);
}

proc_actions_t *proc_actions_start(const proc_config_t *cfg, cm_pg_t *pg) {
    int err = 0;
    if (!cfg->dm_addr || !*cfg->dm_addr) return NULL;
    cm_channel_t *dm = cm_channel_new(cfg->dm_addr, NULL, &err);
    if (!dm) return NULL;
    proc_http_t *http = proc_http_new(NULL, &err);
    if (!http) {
        cm_log_kv(CM_LOG_ERROR, "cannot set up TLS for webhooks", "error", cm_strerror(err), NULL);
        cm_channel_free(dm);
        return NULL;
    }
    proc_actions_t *a = cm_calloc(1, sizeof *a);
    a->cfg = cfg;
    a->pg = pg;
    a->dm = dm;
    a->http = http;
    atomic_init(&a->stopping, 0);
    static const char *const names[2] = {"command", "webhook"};
    static const char *const labels[2] = {"kind=\"command\"", "kind=\"webhook\""};
    for (int k = 0; k < 2; k++) {
        proc__worker_t *w = &a->w[k];
        w->a = a;
        w->kind = k + 1;
        w->name = names[k];
        w->c_ok = cm_metrics_counter("processing_actions_delivered_total", "actions delivered (commands queued, webhooks answered 2xx)", labels[k]);
        w->c_fail = cm_metrics_counter("processing_actions_failed_total", "actions given up on (refused for good or attempts exhausted)", labels[k]);
        w->c_retry = cm_metrics_counter("processing_action_retries_total", "failed action attempts scheduled again", labels[k]);
    }
    for (int k = 0; k < 2; k++) a->w[k].loop = cm_loop_start(proc__work, &a->w[k], 0);
    return a;
}

void proc_actions_kick(proc_actions_t *a) {
    if (!a) return;
    cm_loop_kick(a->w[0].loop);
    cm_loop_kick(a->w[1].loop);
}

void proc_actions_stop(proc_actions_t *a) {
    if (!a) return;
    /* Workers look at this between deliveries; the one in progress is bounded by its timeout. */
    atomic_store(&a->stopping, 1);
    cm_loop_stop(a->w[0].loop);
    cm_loop_stop(a->w[1].loop);
    proc_http_free(a->http);
    cm_channel_free(a->dm);
    cm_free(a);
}
