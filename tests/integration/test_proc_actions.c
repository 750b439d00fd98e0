/* processing's action workers (proc_actions.c) driven directly, against the Postgres that
 * tests/run.sh starts, a fake device-mgmt (an in-process gRPC server whose SendCommand can be
 * told to fail) and a local webhook receiver answering a scripted list of statuses. Rows go into
 * the actions outbox by SQL, as the consumer writes them. Each test has its own schema. */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "cm_alloc.h"
#include "cm_buf.h"
#include "cm_err.h"
#include "cm_json.h"
#include "cm_metrics.h"
#include "cm_pg.h"
#include "cm_rpc.h"
#include "cm_time.h"
#include "iot/device/v1/device.pb-c.h"
#include "proc_actions.h"
#include "test.h"

static void sleep_ms(int ms) {
    struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}

/* ---- Postgres ------------------------------------------------------------------------------- */

static cm_pg_t *fresh_schema(const char *name) {
    char schema[64];
    snprintf(schema, sizeof schema, "tpa_%s_%d", name, (int)getpid());
    cm_pg_t *pg = cm_pg_new(test_env("IOT_TEST_PG"), schema, 6, NULL);
    ASSERT(pg);
    int applied = 0;
    ASSERT_INT_EQ(cm_pg_migrate(pg, "services/processing/migrations", &applied), 0);
    return pg;
}

/* The first column of the first row of sql into out ("" when there is no row). */
static void q1(cm_pg_t *pg, char *out, size_t cap, const char *sql, int n, const char *const *p) {
    cm_pg_conn_t *c = cm_pg_acquire(pg, 5000);
    ASSERT(c);
    PGresult *r = NULL;
    int rc = cm_pg_exec(c, &r, sql, n, p);
    if (rc) {
        char e[256];
        snprintf(e, sizeof e, "%s", cm_pg_error(c));
        cm_pg_release(pg, c);
        TEST__FAIL("%s: %s", sql, e);
    }
    cm_pg_release(pg, c);
    snprintf(out, cap, "%s", PQntuples(r) ? PQgetvalue(r, 0, 0) : "");
    PQclear(r);
}

/* Fires an alert (as the consumer does); its id and the fire event's id. */
static void fire(cm_pg_t *pg, const char *device, int severity, char *alert, char *event) {
    char sev[8];
    snprintf(sev, sizeof sev, "%d", severity);
    const char *p[] = {"r-hot", device, "temp", "1000", sev, "101.5", "temp 101.5 >= 100", "1700000000123"};
    char both[64];
    q1(pg, both, sizeof both, "SELECT o_id || ' ' || o_event FROM fire_alert($1, $2, $3, $4::bigint, $5::smallint, $6::float8, $7, $8::bigint)",
       8, p);
    ASSERT(sscanf(both, "%23s %23s", alert, event) == 2);
}

/* Queues an action; its id. */
static void queue(cm_pg_t *pg, const char *alert, const char *event, int kind, const char *target, const char *payload_hex,
                  int max_attempts, int timeout_ms, char *id) {
    char k[4], m[8], t[16];
    snprintf(k, sizeof k, "%d", kind);
    snprintf(m, sizeof m, "%d", max_attempts);
    snprintf(t, sizeof t, "%d", timeout_ms);
    const char *p[] = {alert, event, k, target, payload_hex, m, t};
    q1(pg, id, 24,
       "INSERT INTO actions (alert_id, event_id, kind, target, payload, max_attempts, timeout_ms) "
       "VALUES ($1::bigint, $2::bigint, $3::smallint, $4, $5::bytea, $6::int, $7::int) RETURNING id",
       7, p);
}

/* Waits up to ms for the action to leave state 0; returns its state. */
static int wait_final(cm_pg_t *pg, const char *id, int ms) {
    char st[8];
    const char *p[] = {id};
    for (int waited = 0;; waited += 10) {
        q1(pg, st, sizeof st, "SELECT state FROM actions WHERE id = $1::bigint", 1, p);
        if (strcmp(st, "0") != 0 || waited >= ms) return atoi(st);
        sleep_ms(10);
    }
}

static void action_col(cm_pg_t *pg, const char *id, const char *col_sql, char *out, size_t cap) {
    const char *p[] = {id};
    q1(pg, out, cap, col_sql, 1, p);
}

/* ---- a fake device-mgmt --------------------------------------------------------------------- */

typedef struct fake_dm_s {
    pthread_mutex_t mu;
    int calls, fail_first;
    char rid[8][160], dev[8][64], name[8][64], payload[8][256];
    cm_server_t *srv;
    cm_method_t methods[64];
    cm_service_t svc;
    char target[64];
} fake_dm_t;

static fake_dm_t fake;

static int fake_unary(cm_call_t *call, const ProtobufCMessage *req_, ProtobufCMessage *resp_) {
    if (strcmp(cm_call_method(call), "/iot.device.v1.DeviceManager/SendCommand") != 0)
        return cm_call_fail(call, CM_STATUS_UNIMPLEMENTED, "not faked");
    const Iot__Device__V1__SendCommandRequest *req = (const void *)req_;
    pthread_mutex_lock(&fake.mu);
    int n = fake.calls++;
    if (n < 8) {
        snprintf(fake.rid[n], sizeof fake.rid[n], "%s", req->request_id);
        snprintf(fake.dev[n], sizeof fake.dev[n], "%s", req->device_id);
        snprintf(fake.name[n], sizeof fake.name[n], "%s", req->name);
        json_t *j = req->payload ? cm_json_from_struct(req->payload) : NULL;
        char *s = j ? cm_json_dump(j) : NULL;
        snprintf(fake.payload[n], sizeof fake.payload[n], "%s", s ? s : "");
        free(s);
        json_decref(j);
    }
    int fail = n < fake.fail_first;
    pthread_mutex_unlock(&fake.mu);
    if (strcmp(req->device_id, "gone") == 0) return cm_call_fail(call, CM_STATUS_NOT_FOUND, "device \"gone\" not found");
    /* INTERNAL, not UNAVAILABLE: the channel retries UNAVAILABLE itself within the call. */
    if (fail) return cm_call_fail(call, CM_STATUS_INTERNAL, "try again later");
    Iot__Device__V1__Command *c = (void *)resp_;
    c->id = cm_call_strdup(call, "900");
    c->device_id = cm_call_strdup(call, req->device_id);
    c->name = cm_call_strdup(call, req->name);
    c->status = IOT__DEVICE__V1__COMMAND_STATUS__COMMAND_STATUS_PENDING;
    return CM_STATUS_OK;
}

static int fake_stream(cm_call_t *call, const ProtobufCMessage *req) {
    (void)req;
    return cm_call_fail(call, CM_STATUS_UNIMPLEMENTED, "not faked");
}

static void fake_start(int fail_first) {
    pthread_mutex_init(&fake.mu, NULL);
    fake.calls = 0;
    fake.fail_first = fail_first;
    /* Every method of the service must have a handler: all fail but SendCommand. */
    const ProtobufCServiceDescriptor *d = &iot__device__v1__device_manager__descriptor;
    ASSERT(d->n_methods <= 64);
    for (unsigned i = 0; i < d->n_methods; i++) {
        cm_method_t *m = &fake.methods[i];
        memset(m, 0, sizeof *m);
        m->name = d->methods[i].name;
        if (strcmp(m->name, "WatchCommands") == 0) {
            m->kind = CM_RPC_SERVER_STREAM;
            m->start = fake_stream;
        } else {
            m->kind = CM_RPC_UNARY;
            m->unary = fake_unary;
        }
    }
    fake.svc = (cm_service_t){d, fake.methods, d->n_methods, NULL};
    cm_server_opts_t o = {.name = "fake-dm", .listen = "127.0.0.1:0", .threads = 2, .grace_ms = 1000};
    fake.srv = cm_server_new(&o, NULL);
    ASSERT(fake.srv);
    ASSERT_INT_EQ(cm_server_add_service(fake.srv, &fake.svc), 0);
    ASSERT_INT_EQ(cm_server_start(fake.srv), 0);
    snprintf(fake.target, sizeof fake.target, "127.0.0.1:%d", cm_server_port(fake.srv));
}

static void fake_stop(void) {
    cm_server_free(fake.srv);
    pthread_mutex_destroy(&fake.mu);
}

/* ---- a webhook receiver ------------------------------------------------------------------ */

typedef struct hook_s {
    int fd, port;
    int codes[8]; /* status for request i; 0 (or past the list): 200 */
    pthread_mutex_t mu;
    int n;
    char lines[64][128], keys[64][64], types[64][64];
    char bodies[4][4096];
    int64_t at_ms[64];
    pthread_t th;
} hook_t;

static void *hook_main(void *arg) {
    hook_t *h = arg;
    for (;;) {
        int c = accept(h->fd, NULL, NULL);
        if (c < 0) return NULL;
        char buf[16384];
        size_t len = 0;
        ssize_t r;
        const char *body = NULL;
        while (len < sizeof buf - 1 && (r = read(c, buf + len, sizeof buf - 1 - len)) > 0) {
            len += (size_t)r;
            buf[len] = 0;
            char *end = strstr(buf, "\r\n\r\n");
            if (!end) continue;
            body = end + 4;
            const char *cl = strcasestr(buf, "content-length:");
            if ((long)(len - (size_t)(body - buf)) >= (cl ? atol(cl + 15) : 0)) break;
        }
        pthread_mutex_lock(&h->mu);
        int i = h->n;
        if (body && i < 64) {
            sscanf(buf, "%127[^\r\n]", h->lines[i]);
            const char *k = strcasestr(buf, "\r\nidempotency-key:");
            if (k) sscanf(k + 18, " %63[^\r\n]", h->keys[i]);
            const char *t = strcasestr(buf, "\r\ncontent-type:");
            if (t) sscanf(t + 15, " %63[^\r\n]", h->types[i]);
            if (i < 4) snprintf(h->bodies[i], sizeof h->bodies[i], "%s", body);
            h->at_ms[i] = cm_mono_ns() / 1000000;
            h->n++;
        }
        int code = i < 8 && h->codes[i] ? h->codes[i] : 200;
        pthread_mutex_unlock(&h->mu);
        char ans[128];
        snprintf(ans, sizeof ans, "HTTP/1.1 %d X\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok", code);
        ssize_t w = write(c, ans, strlen(ans));
        (void)w;
        close(c);
    }
}

static void hook_start(hook_t *h, const int *codes, int n_codes) {
    memset(h, 0, sizeof *h);
    for (int i = 0; i < n_codes && i < 8; i++) h->codes[i] = codes[i];
    pthread_mutex_init(&h->mu, NULL);
    h->fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    ASSERT_INT_EQ(bind(h->fd, (struct sockaddr *)&a, sizeof a), 0);
    ASSERT_INT_EQ(listen(h->fd, 64), 0);
    socklen_t al = sizeof a;
    getsockname(h->fd, (struct sockaddr *)&a, &al);
    h->port = ntohs(a.sin_port);
    pthread_create(&h->th, NULL, hook_main, h);
}

static int hook_count(hook_t *h) {
    pthread_mutex_lock(&h->mu);
    int n = h->n;
    pthread_mutex_unlock(&h->mu);
    return n;
}

static void hook_stop(hook_t *h) {
    shutdown(h->fd, SHUT_RDWR);
    close(h->fd);
    pthread_join(h->th, NULL);
    pthread_mutex_destroy(&h->mu);
}

/* ---- helpers ----------------------------------------------------------------------------- */

static proc_config_t config(const char *dm_addr, int64_t backoff_ms) {
    proc_config_t c;
    memset(&c, 0, sizeof c);
    c.dm_addr = dm_addr;
    c.action_poll_ms = 1000;
    c.action_backoff_ms = backoff_ms;
    return c;
}

static uint64_t counter(const char *name, const char *kind) {
    char labels[32];
    snprintf(labels, sizeof labels, "kind=\"%s\"", kind);
    return cm_counter_get(cm_metrics_counter(name, "", labels));
}

/* {"level": 3, "reason": "overheat"} as a packed Struct in bytea hex ("\x..."); caller frees. */
static char *payload_hex(void) {
    char err[128];
    const char *text = "{\"level\": 3, \"reason\": \"overheat\"}";
    json_t *j = cm_json_parse(text, strlen(text), err, sizeof err);
    Google__Protobuf__Struct *s = NULL;
    ASSERT(j && cm_json_to_struct(j, NULL, &s) == 0);
    json_decref(j);
    size_t n = protobuf_c_message_get_packed_size(&s->base);
    uint8_t *b = cm_malloc(n ? n : 1);
    protobuf_c_message_pack(&s->base, b);
    protobuf_c_message_free_unpacked(&s->base, NULL);
    char *hex = cm_malloc(2 * n + 3);
    hex[0] = '\\';
    hex[1] = 'x';
    cm_hex(hex + 2, b, n);
    cm_free(b);
    return hex;
}

/* ---- tests ------------------------------------------------------------------------------- */

static void test_command_retried_then_queued_once(void) {
    cm_pg_t *pg = fresh_schema("cmd");
    fake_start(1);
    proc_config_t cfg = config(fake.target, 50);
    char alert[24], event[24], id[24], v[256];
    fire(pg, "dev-1", 4, alert, event);
    char *hex = payload_hex();
    queue(pg, alert, event, 1, "shutdown", hex, 5, 2000, id);
    cm_free(hex);
    uint64_t ok0 = counter("processing_actions_delivered_total", "command");
    uint64_t retry0 = counter("processing_action_retries_total", "command");

    proc_actions_t *a = proc_actions_start(&cfg, pg);
    ASSERT(a);
    proc_actions_kick(a);
    ASSERT_INT_EQ(wait_final(pg, id, 10000), 1);
    proc_actions_stop(a);

    /* The first call failed (retryable), the second queued the command; both named the alert. */
    ASSERT_INT_EQ(fake.calls, 2);
    char rid[48];
    snprintf(rid, sizeof rid, "alert-%s", alert);
    for (int i = 0; i < 2; i++) {
        ASSERT_STR_EQ(fake.rid[i], rid);
        ASSERT_STR_EQ(fake.dev[i], "dev-1");
        ASSERT_STR_EQ(fake.name[i], "shutdown");
        ASSERT_STR_EQ(fake.payload[i], "{\"level\":3,\"reason\":\"overheat\"}");
    }
    action_col(pg, id, "SELECT result || ' ' || attempts FROM actions WHERE id = $1::bigint", v, sizeof v);
    ASSERT_STR_EQ(v, "900 2");
    /* The alert has the command and one "command queued" event carrying it. */
    const char *p[] = {alert};
    q1(pg, v, sizeof v, "SELECT command_id FROM alerts WHERE id = $1::bigint", 1, p);
    ASSERT_STR_EQ(v, "900");
    q1(pg, v, sizeof v, "SELECT count(*) || ' ' || max(command_id) FROM alert_events WHERE alert_id = $1::bigint AND kind = 5", 1, p);
    ASSERT_STR_EQ(v, "1 900");
    ASSERT_INT_EQ(counter("processing_actions_delivered_total", "command") - ok0, 1);
    ASSERT_INT_EQ(counter("processing_action_retries_total", "command") - retry0, 1);

    /* A redelivery of the same action (a worker died before recording it) changes nothing. */
    const char *pid[] = {id};
    q1(pg, v, sizeof v, "UPDATE actions SET state = 0, next_time = now() WHERE id = $1::bigint RETURNING id", 1, pid);
    a = proc_actions_start(&cfg, pg);
    ASSERT_INT_EQ(wait_final(pg, id, 10000), 1);
    proc_actions_stop(a);
    q1(pg, v, sizeof v, "SELECT count(*) FROM alert_events WHERE alert_id = $1::bigint AND kind = 5", 1, p);
    ASSERT_STR_EQ(v, "1");
    fake_stop();
    cm_pg_free(pg);
}

static void test_command_refused_fails_for_good(void) {
    cm_pg_t *pg = fresh_schema("refused");
    fake_start(0);
    proc_config_t cfg = config(fake.target, 20);
    char alert[24], event[24], id[24], v[600];
    fire(pg, "gone", 4, alert, event);
    queue(pg, alert, event, 1, "shutdown", NULL, 5, 2000, id);
    uint64_t fail0 = counter("processing_actions_failed_total", "command");
    proc_actions_t *a = proc_actions_start(&cfg, pg);
    ASSERT_INT_EQ(wait_final(pg, id, 10000), 2);
    proc_actions_stop(a);
    ASSERT_INT_EQ(fake.calls, 1);
    ASSERT(fake.payload[0][0] == 0); /* no payload stored, none sent */
    action_col(pg, id, "SELECT result || ' | ' || attempts FROM actions WHERE id = $1::bigint", v, sizeof v);
    ASSERT_STR_EQ(v, "NOT_FOUND: device \"gone\" not found | 1");
    ASSERT_INT_EQ(counter("processing_actions_failed_total", "command") - fail0, 1);
    fake_stop();
    cm_pg_free(pg);
}

static void test_webhook_retried_with_the_alert_as_of_its_event(void) {
    cm_pg_t *pg = fresh_schema("hook");
    proc_config_t cfg = config("127.0.0.1:1", 50);
    hook_t h;
    const int codes[] = {503};
    hook_start(&h, codes, 1);
    char alert[24], event[24], id[24], url[128], v[256];
    fire(pg, "dev-2", 3, alert, event);
    /* Escalated before the webhook goes out: the body still describes the fire event. */
    const char *ep[] = {"r-hot", "dev-2"};
    q1(pg, v, sizeof v, "SELECT o_event FROM escalate_alert($1, $2, 1000, 4::smallint, 130::float8, 'temp 130 >= 100')", 2, ep);
    ASSERT(v[0]);
    snprintf(url, sizeof url, "http://127.0.0.1:%d/hooks/x?token=s3cret", h.port);
    queue(pg, alert, event, 2, url, NULL, 5, 2000, id);
    uint64_t ok0 = counter("processing_actions_delivered_total", "webhook");

    proc_actions_t *a = proc_actions_start(&cfg, pg);
    ASSERT_INT_EQ(wait_final(pg, id, 10000), 1);
    proc_actions_stop(a);

    ASSERT_INT_EQ(hook_count(&h), 2);
    ASSERT(h.at_ms[1] - h.at_ms[0] >= 45); /* the backoff */
    for (int i = 0; i < 2; i++) {
        ASSERT_STR_EQ(h.lines[i], "POST /hooks/x?token=s3cret HTTP/1.1");
        ASSERT_STR_EQ(h.keys[i], id);
        ASSERT_STR_EQ(h.types[i], "application/json");
        ASSERT_STR_EQ(h.bodies[i], h.bodies[0]);
    }
    char err[128];
    json_t *b = cm_json_parse(h.bodies[1], strlen(h.bodies[1]), err, sizeof err);
    if (!b) TEST__FAIL("body %s: %s", h.bodies[1], err);
    ASSERT_STR_EQ(json_string_value(json_object_get(b, "id")), alert);
    ASSERT_STR_EQ(json_string_value(json_object_get(b, "ruleId")), "r-hot");
    ASSERT_STR_EQ(json_string_value(json_object_get(b, "deviceId")), "dev-2");
    ASSERT_STR_EQ(json_string_value(json_object_get(b, "metric")), "temp");
    ASSERT_STR_EQ(json_string_value(json_object_get(b, "severity")), "SEVERITY_HIGH");
    ASSERT_STR_EQ(json_string_value(json_object_get(b, "state")), "ALERT_STATE_FIRING");
    ASSERT(json_is_number(json_object_get(b, "value")) && json_number_value(json_object_get(b, "value")) == 101.5);
    ASSERT_STR_EQ(json_string_value(json_object_get(b, "firedTime")), "2023-11-14T22:13:20.123Z");
    ASSERT_STR_EQ(json_string_value(json_object_get(b, "eventId")), event);
    ASSERT_STR_EQ(json_string_value(json_object_get(b, "event")), "fired");
    ASSERT(json_object_get(b, "resolvedTime") == NULL);
    json_decref(b);
    action_col(pg, id, "SELECT result || ' ' || attempts FROM actions WHERE id = $1::bigint", v, sizeof v);
    ASSERT_STR_EQ(v, "HTTP 200 2");
    ASSERT_INT_EQ(counter("processing_actions_delivered_total", "webhook") - ok0, 1);
    hook_stop(&h);
    cm_pg_free(pg);
}

static void test_webhook_gives_up_after_max_attempts(void) {
    cm_pg_t *pg = fresh_schema("giveup");
    proc_config_t cfg = config("127.0.0.1:1", 40);
    hook_t h;
    const int codes[] = {500, 500, 500, 500};
    hook_start(&h, codes, 4);
    char alert[24], event[24], id[24], url[128], v[256];
    fire(pg, "dev-3", 4, alert, event);
    snprintf(url, sizeof url, "http://127.0.0.1:%d/", h.port);
    queue(pg, alert, event, 2, url, NULL, 3, 2000, id);
    uint64_t fail0 = counter("processing_actions_failed_total", "webhook");
    proc_actions_t *a = proc_actions_start(&cfg, pg);
    ASSERT_INT_EQ(wait_final(pg, id, 10000), 2);
    proc_actions_stop(a);
    ASSERT_INT_EQ(hook_count(&h), 3);
    /* Backoff doubles: 40 ms, then 80 ms. */
    ASSERT(h.at_ms[1] - h.at_ms[0] >= 35);
    ASSERT(h.at_ms[2] - h.at_ms[1] >= 75);
    action_col(pg, id, "SELECT result || ' ' || attempts FROM actions WHERE id = $1::bigint", v, sizeof v);
    ASSERT_STR_EQ(v, "HTTP 500 3");
    ASSERT_INT_EQ(counter("processing_actions_failed_total", "webhook") - fail0, 1);

    /* A receiver that is not there: connection refused, retried, the reason recorded without
     * the URL's path. */
    hook_stop(&h);
    queue(pg, alert, event, 2, url, NULL, 1, 500, id);
    a = proc_actions_start(&cfg, pg);
    ASSERT_INT_EQ(wait_final(pg, id, 10000), 2);
    proc_actions_stop(a);
    action_col(pg, id, "SELECT result FROM actions WHERE id = $1::bigint", v, sizeof v);
    ASSERT(strstr(v, "cannot connect to 127.0.0.1:"));
    cm_pg_free(pg);
}

static void test_two_worker_sets_deliver_each_action_once(void) {
    cm_pg_t *pg = fresh_schema("split");
    proc_config_t cfg = config("127.0.0.1:1", 50);
    hook_t h;
    hook_start(&h, NULL, 0);
    char alert[24], event[24], ids[40][24], url[128];
    fire(pg, "dev-4", 2, alert, event);
    snprintf(url, sizeof url, "http://127.0.0.1:%d/", h.port);
    for (int i = 0; i < 40; i++) queue(pg, alert, event, 2, url, NULL, 5, 2000, ids[i]);
    proc_actions_t *a = proc_actions_start(&cfg, pg), *b = proc_actions_start(&cfg, pg);
    for (int i = 0; i < 40; i++) ASSERT_INT_EQ(wait_final(pg, ids[i], 10000), 1);
    proc_actions_stop(a);
    proc_actions_stop(b);
    ASSERT_INT_EQ(hook_count(&h), 40);
    for (int i = 0; i < 40; i++)
        for (int j = i + 1; j < 40; j++)
            if (strcmp(h.keys[i], h.keys[j]) == 0) TEST__FAIL("action %s delivered twice", h.keys[i]);
    hook_stop(&h);
    cm_pg_free(pg);
}

TEST_MAIN(TEST_ENTRY(test_command_retried_then_queued_once), TEST_ENTRY(test_command_refused_fails_for_good),
          TEST_ENTRY(test_webhook_retried_with_the_alert_as_of_its_event), TEST_ENTRY(test_webhook_gives_up_after_max_attempts),
          TEST_ENTRY(test_two_worker_sets_deliver_each_action_once))
