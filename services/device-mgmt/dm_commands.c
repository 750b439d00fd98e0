/* Commands: queue (Postgres), notifications (Redis stream P cmdq) and delivery to the
 * WatchCommands streams of this replica (see dm_commands.h). */
#include "dm_commands.h"

#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "cm_alloc.h"
#include "cm_buf.h"
#include "cm_err.h"
#include "cm_json.h"
#include "cm_log.h"
#include "cm_metrics.h"
#include "cm_time.h"

#define DM__CMD_COLS                                                                                            \
    "c.id, c.device_id, c.name, c.payload::text, c.status, (extract(epoch from c.created_at) * 1000000)::int8, " \
    "(extract(epoch from c.expires_at) * 1000000)::int8, "                                                      \
    "coalesce((extract(epoch from c.delivered_at) * 1000000)::int8, 0), "                                       \
    "coalesce((extract(epoch from c.acked_at) * 1000000)::int8, 0), c.result::text, coalesce(c.error, '')"

#define DM__CMD_NCOLS 11

#define DM__DELIVER_BATCH 100

static Google__Protobuf__Struct *dm__struct_from_text(ProtobufCAllocator *a, const char *text) {
    char err[128];
    json_t *j = cm_json_parse(text, strlen(text), err, sizeof err);
    Google__Protobuf__Struct *s = NULL;
    if (j && json_is_object(j)) cm_json_to_struct(j, a, &s);
    json_decref(j);
    return s;
}

static dm_command_t *dm__cmd_from_row(ProtobufCAllocator *a, const PGresult *r, int row) {
    dm_command_t *c = a->alloc(a->allocator_data, sizeof *c);
    iot__device__v1__command__init(c);
    c->id = dm__strdup(a, PQgetvalue(r, row, 0));
    c->device_id = dm__strdup(a, PQgetvalue(r, row, 1));
    c->name = dm__strdup(a, PQgetvalue(r, row, 2));
    c->payload = dm__struct_from_text(a, PQgetvalue(r, row, 3));
    c->status = (Iot__Device__V1__CommandStatus)dm__int(r, row, 4);
    c->create_time = dm__ts(a, dm__int(r, row, 5), 0);
    c->expire_time = dm__ts(a, dm__int(r, row, 6), 0);
    c->deliver_time = dm__ts(a, dm__int(r, row, 7), 1);
    c->ack_time = dm__ts(a, dm__int(r, row, 8), 1);
    if (!PQgetisnull(r, row, 9)) c->result = dm__struct_from_text(a, PQgetvalue(r, row, 9));
    c->error = dm__strdup(a, PQgetvalue(r, row, 10));
    return c;
}

/* JSON text of a Struct for a jsonb parameter; NULL with INVALID_ARGUMENT set when it is not
 * representable or over 64 KiB. Caller frees. */
static char *dm__struct_text(const Google__Protobuf__Struct *st, const char *field, dm_err_t *e) {
    json_t *j = cm_json_from_struct(st);
    char *text = j ? cm_json_dump(j) : NULL;
    json_decref(j);
    if (!text) {
        snprintf(e->msg, sizeof e->msg, "%s: not representable as JSON (NaN, infinity, or nested deeper than %d)", field,
                 CM_JSON_MAX_DEPTH);
    } else if (strlen(text) > 65536) {
        snprintf(e->msg, sizeof e->msg, "%s: %zu bytes as JSON; the limit is 65536", field, strlen(text));
        cm_free(text);
        text = NULL;
    }
    return text;
}

int dm_store_send_command(dm_store_t *s, const char *device_id, const char *name, const Google__Protobuf__Struct *payload,
                          int ttl_s, const char *request_id, ProtobufCAllocator *a, dm_command_t **out, dm_err_t *e) {
    char *text = dm__struct_text(payload, "payload", e);
    if (!text) return CM_STATUS_INVALID_ARGUMENT;
    cm_pg_conn_t *c = dm__pg(s, e);
    if (!c) {
        cm_free(text);
        return CM_STATUS_UNAVAILABLE;
    }
    char ttl[16];
    snprintf(ttl, sizeof ttl, "%d", ttl_s);
    const char *p[] = {device_id, name, text, ttl, request_id && *request_id ? request_id : NULL};
    PGresult *r = NULL;
    int code = CM_STATUS_OK, created = 1;
    /* With a request_id, a repeat finds the first command: the insert does nothing and the select
     * (a separate statement, so it sees a racing insert that committed meanwhile) returns it. */
    if (cm_pg_exec(c, &r,
                   "INSERT INTO commands AS c (device_id, name, payload, expires_at, request_id) "
                   "VALUES ($1, $2, $3::jsonb, now() + make_interval(secs => $4::int), $5) "
                   "ON CONFLICT (device_id, request_id) WHERE request_id IS NOT NULL DO NOTHING RETURNING " DM__CMD_COLS,
                   5, p)) {
        code = dm__pg_fail(c, "device", e);
        if (code == CM_STATUS_NOT_FOUND) snprintf(e->msg, sizeof e->msg, "device \"%s\" not found", device_id);
    } else if (PQntuples(r) == 0) {
        PQclear(r);
        r = NULL;
        created = 0;
        const char *q[] = {device_id, request_id};
        if (cm_pg_exec(c, &r, "SELECT " DM__CMD_COLS " FROM commands c WHERE c.device_id = $1 AND c.request_id = $2", 2, q))
            code = dm__pg_fail(c, "command", e);
        else if (PQntuples(r) == 1)
            *out = dm__cmd_from_row(a, r, 0);
        else {
            /* Commands are only ever removed with their device (ON DELETE CASCADE), so the row
             * that conflicted vanishing before the select means the device was just deleted. */
            snprintf(e->msg, sizeof e->msg, "device \"%s\" not found", device_id);
            code = CM_STATUS_NOT_FOUND;
        }
    } else {
        *out = dm__cmd_from_row(a, r, 0);
    }
    PQclear(r);
    cm_pg_release(s->pg, c);
    cm_free(text);
    if (code || !created) return code;
    /* Best effort: a lost notification is made up for by the watchers' poll. */
    char key[96];
    snprintf(key, sizeof key, "%scmdq", s->prefix);
    const char *argv[] = {"XADD", key, "MAXLEN", "~", "10000", "*", "device_id", device_id, "command_id", (*out)->id};
    dm_err_t ignored;
    redisReply *rep = dm__redis(s, 10, argv, NULL, &ignored);
    if (rep) freeReplyObject(rep);
    else cm_log_kv(CM_LOG_WARN, "command notification failed; watchers will poll", "error", ignored.msg, NULL);
    return CM_STATUS_OK;
}

int dm_store_get_command(dm_store_t *s, const char *id, ProtobufCAllocator *a, dm_command_t **out, dm_err_t *e) {
    cm_pg_conn_t *c = dm__pg(s, e);
    if (!c) return CM_STATUS_UNAVAILABLE;
    const char *p[] = {id};
    PGresult *r = NULL;
    int code = CM_STATUS_OK;
    if (cm_pg_exec(c, &r, "SELECT " DM__CMD_COLS " FROM commands c WHERE c.id = $1::int8", 1, p)) {
        code = dm__pg_fail(c, "command", e);
    } else if (PQntuples(r) == 0) {
        snprintf(e->msg, sizeof e->msg, "command \"%s\" not found", id);
        code = CM_STATUS_NOT_FOUND;
    } else {
        *out = dm__cmd_from_row(a, r, 0);
    }
    PQclear(r);
    cm_pg_release(s->pg, c);
    return code;
}

int dm_store_list_commands(dm_store_t *s, const char *device_id, const int *statuses, size_t n_statuses, int page_size,
                           const char *page_token, ProtobufCAllocator *a, dm_command_t ***out, size_t *n, char **next,
                           dm_err_t *e) {
    *out = NULL;
    *n = 0;
    *next = dm__strdup(a, "");
    /* Tokens are the last id seen (newest first, so the next page is below it). */
    char *end;
    long long last = *page_token ? strtoll(page_token, &end, 10) : 0;
    if (*page_token && (*end || last <= 0)) {
        snprintf(e->msg, sizeof e->msg, "page_token: not a token this service issued");
        return CM_STATUS_INVALID_ARGUMENT;
    }
    cm_buf_t st = CM_BUF_INIT;
    cm_buf_puts(&st, "{");
    for (size_t i = 0; i < n_statuses; i++) cm_buf_printf(&st, "%s%d", i ? "," : "", statuses[i]);
    cm_buf_puts(&st, "}");
    char lastb[24], lim[16];
    snprintf(lastb, sizeof lastb, "%lld", last ? last : INT64_MAX);
    snprintf(lim, sizeof lim, "%d", page_size + 1);
    const char *p[] = {device_id, st.data, lastb, lim};
    cm_pg_conn_t *c = dm__pg(s, e);
    if (!c) {
        cm_buf_free(&st);
        return CM_STATUS_UNAVAILABLE;
    }
    PGresult *r = NULL;
    int code = CM_STATUS_OK;
    if (cm_pg_exec(c, &r,
                   "SELECT " DM__CMD_COLS " FROM commands c WHERE c.device_id = $1 "
                   "AND (cardinality($2::int2[]) = 0 OR c.status = ANY($2::int2[])) AND c.id < $3::int8 "
                   "ORDER BY c.id DESC LIMIT $4",
                   4, p)) {
        code = dm__pg_fail(c, "commands", e);
    } else {
        int rows = PQntuples(r), take = rows > page_size ? page_size : rows;
        *out = a->alloc(a->allocator_data, sizeof **out * (size_t)(take ? take : 1));
        for (int i = 0; i < take; i++) (*out)[i] = dm__cmd_from_row(a, r, i);
        *n = (size_t)take;
        if (rows > page_size) *next = dm__strdup(a, (*out)[take - 1]->id);
    }
    PQclear(r);
    /* Released before the device check: holding one pooled connection while waiting for another
     * can starve the pool. */
    cm_pg_release(s->pg, c);
    cm_buf_free(&st);
    /* An empty page for an unknown device would hide a typo. */
    if (!code && *n == 0) code = dm_store_get_device(s, device_id, a, &(dm_device_t *){NULL}, e);
    return code;
}

int dm_store_ack_command(dm_store_t *s, const char *device_id, const char *command_id, int success,
                         const Google__Protobuf__Struct *result, const char *error, ProtobufCAllocator *a,
                         dm_command_t **out, dm_err_t *e) {
    char *text = NULL;
    if (result) {
        text = dm__struct_text(result, "result", e);
        if (!text) return CM_STATUS_INVALID_ARGUMENT;
    }
    cm_pg_conn_t *c = dm__pg(s, e);
    if (!c) {
        cm_free(text);
        return CM_STATUS_UNAVAILABLE;
    }
    const char *p[] = {command_id, device_id, success ? "t" : "f", text, success ? NULL : error};
    PGresult *r = NULL;
    int code = CM_STATUS_OK;
    if (cm_pg_exec(c, &r,
                   "UPDATE commands c SET status = CASE WHEN $3::bool THEN 3 ELSE 4 END, acked_at = now(), "
                   "result = $4::jsonb, error = $5 "
                   "WHERE c.id = $1::int8 AND c.device_id = $2 AND c.status IN (1, 2) AND c.expires_at > now() "
                   "RETURNING " DM__CMD_COLS,
                   5, p)) {
        code = dm__pg_fail(c, "command", e);
    } else if (PQntuples(r) == 1) {
        *out = dm__cmd_from_row(a, r, 0);
    } else {
        /* Nothing changed: say why. Repeating the same acknowledgement is fine. */
        PQclear(r);
        r = NULL;
        const char *q[] = {command_id, device_id};
        if (cm_pg_exec(c, &r, "SELECT " DM__CMD_COLS ", c.expires_at <= now() FROM commands c WHERE c.id = $1::int8 AND c.device_id = $2", 2, q)) {
            code = dm__pg_fail(c, "command", e);
        } else if (PQntuples(r) == 0) {
            snprintf(e->msg, sizeof e->msg, "command \"%s\" of device \"%s\" not found", command_id, device_id);
            code = CM_STATUS_NOT_FOUND;
        } else {
            int st = (int)dm__int(r, 0, 4);
            int want = success ? IOT__DEVICE__V1__COMMAND_STATUS__COMMAND_STATUS_SUCCEEDED
                               : IOT__DEVICE__V1__COMMAND_STATUS__COMMAND_STATUS_FAILED;
            if (st == want) {
                *out = dm__cmd_from_row(a, r, 0);
            } else if (st == IOT__DEVICE__V1__COMMAND_STATUS__COMMAND_STATUS_EXPIRED ||
                       strcmp(PQgetvalue(r, 0, 11), "t") == 0) {
                snprintf(e->msg, sizeof e->msg, "command \"%s\" expired before it was acknowledged", command_id);
                code = CM_STATUS_FAILED_PRECONDITION;
            } else {
                snprintf(e->msg, sizeof e->msg, "command \"%s\" was already acknowledged as %s", command_id,
                         st == IOT__DEVICE__V1__COMMAND_STATUS__COMMAND_STATUS_SUCCEEDED ? "succeeded" : "failed");
                code = CM_STATUS_FAILED_PRECONDITION;
            }
        }
    }
    PQclear(r);
    cm_pg_release(s->pg, c);
    cm_free(text);
    return code;
}

void dm_commands_expire(dm_store_t *s) {
    dm_err_t e;
    cm_pg_conn_t *c = dm__pg(s, &e);
    if (!c) return;
    if (cm_pg_exec(c, NULL, "UPDATE commands SET status = 5 WHERE status IN (1, 2) AND expires_at <= now()", 0, NULL))
        cm_log_kv(CM_LOG_WARN, "command expiry failed", "error", cm_pg_error(c), NULL);
    cm_pg_release(s->pg, c);
}

/* ---- the watch hub --------------------------------------------------------------------------- */

/* What a watcher has sent, and why it is not a cursor. Command ids come from one sequence, taken
 * at INSERT and visible at COMMIT, so a command with a lower id can become visible after a higher
 * one was sent (two SendCommands racing, or one in a slow transaction): a cursor "id > last sent"
 * would skip it on this stream for good. Instead a pass asks for the device's open commands
 * (pending or delivered, unexpired) whose ids are not in `sent`, the ids this stream has sent.
 * `sent` only needs the ids of commands that are still open, since a command never reopens once
 * acknowledged or expired, so it is trimmed to those whenever it has doubled: it stays as small as
 * the device's unacknowledged backlog. */
typedef struct dm__watcher_s {
    cm_call_t *call;
    char device_id[132];
    pthread_mutex_t mu; /* serialises delivery to this watcher; guards the fields up to refs */
    int64_t *sent;      /* ids sent on this stream (of commands open when last trimmed) */
    size_t nsent, capsent, trim_at;
    int64_t full_since_ms; /* since when passes find the send queue full, taking nothing; 0: not */
    int backlog;        /* atomic: the last pass stopped at a full send queue; the tailer retries soon */
    int refs;           /* hub list + deliveries in progress; guarded by the hub's mu */
    struct dm_cmd_hub_s *hub;
} dm__watcher_t;

struct dm_cmd_hub_s {
    dm_store_t *store;
    cm_redis_t *tail;
    pthread_t th;
    int stop;
    pthread_mutex_t mu;
    dm__watcher_t **w;
    size_t nw, capw;
    int closing;
    int64_t last_poll_ms, last_backlog_ms;
    cm_gauge_t *gauge;
    cm_counter_t *delivered;
};

#define DM__SENT_TRIM_MIN 256
#define DM__BACKLOG_RETRY_MS 200

static void dm__watcher_unref(dm_cmd_hub_t *h, dm__watcher_t *w) {
    pthread_mutex_lock(&h->mu);
    int last = --w->refs == 0;
    pthread_mutex_unlock(&h->mu);
    if (!last) return;
    cm_call_unref(w->call);
    pthread_mutex_destroy(&w->mu);
    cm_free(w->sent);
    cm_free(w);
}

static int64_t dm__mono_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* Postgres array literal of ids: {1,2,3}. */
static void dm__ids_literal(cm_buf_t *b, const int64_t *ids, size_t n) {
    cm_buf_puts(b, "{");
    for (size_t i = 0; i < n; i++) cm_buf_printf(b, "%s%" PRId64, i ? "," : "", ids[i]);
    cm_buf_puts(b, "}");
}

/* Drops from w->sent the ids of commands no longer open. On failure keeps them all (correct,
 * only larger) and tries again at the next doubling. */
static void dm__trim_sent(cm_pg_conn_t *c, dm__watcher_t *w) {
    cm_buf_t lit = CM_BUF_INIT;
    dm__ids_literal(&lit, w->sent, w->nsent);
    const char *p[] = {lit.data};
    PGresult *r = NULL;
    if (cm_pg_exec(c, &r,
                   "SELECT id FROM commands WHERE id = ANY($1::int8[]) AND status IN (1, 2) AND expires_at > now() "
                   "ORDER BY id",
                   1, p) == 0) {
        int n = PQntuples(r);
        for (int i = 0; i < n; i++) w->sent[i] = dm__int(r, i, 0);
        w->nsent = (size_t)n;
    } else {
        cm_log_kv(CM_LOG_WARN, "command watcher trim failed", "error", cm_pg_error(c), NULL);
    }
    PQclear(r);
    cm_buf_free(&lit);
    w->trim_at = 2 * w->nsent > DM__SENT_TRIM_MIN ? 2 * w->nsent : DM__SENT_TRIM_MIN;
}

static void dm__sent_add(dm__watcher_t *w, int64_t id) {
    if (w->nsent == w->capsent)
        w->sent = cm_realloc(w->sent, (w->capsent = w->capsent ? 2 * w->capsent : 64) * sizeof *w->sent);
    w->sent[w->nsent++] = id;
}

/* The send queue is full (the client has not taken what is queued yet). The pass stops and the
 * commands stay pending; the tailer retries the watcher a few times a second, and notifications
 * and the poll run passes too. A full queue alone is no reason to end the stream (a backlog of
 * more than the queue holds is normal after a device was offline); only a queue found full, with
 * nothing taken, for a whole poll interval means the client stopped reading: it is cut off then
 * rather than buffered for without bound. */
static void dm__send_queue_full(dm_cmd_hub_t *h, dm__watcher_t *w) {
    int64_t now = dm__mono_ms();
    if (w->full_since_ms && now - w->full_since_ms >= h->store->cfg->command_poll_ms) {
        cm_call_abort(w->call, CM_STATUS_RESOURCE_EXHAUSTED,
                      "device is not reading its commands; watch again to get the unacknowledged ones");
        __atomic_store_n(&w->backlog, 0, __ATOMIC_RELAXED);
        return;
    }
    if (!w->full_since_ms) w->full_since_ms = now;
    __atomic_store_n(&w->backlog, 1, __ATOMIC_RELAXED);
}

/* Sends the device's open commands not yet sent on this stream, oldest first, as far as the send
 * queue takes them, and marks those sent as delivered. */
static void dm__deliver(dm_cmd_hub_t *h, dm__watcher_t *w) {
    pthread_mutex_lock(&w->mu);
    __atomic_store_n(&w->backlog, 0, __ATOMIC_RELAXED);
    dm_err_t e;
    cm_pg_conn_t *c = dm__pg(h->store, &e);
    if (!c) {
        /* Postgres is down: the poll tries again. */
        pthread_mutex_unlock(&w->mu);
        return;
    }
    if (w->nsent >= w->trim_at) dm__trim_sent(c, w);
    int full = 0;
    for (int more = 1; more;) {
        more = 0;
        cm_buf_t sent = CM_BUF_INIT;
        dm__ids_literal(&sent, w->sent, w->nsent);
        char lim[16];
        snprintf(lim, sizeof lim, "%d", DM__DELIVER_BATCH);
        const char *p[] = {w->device_id, sent.data, lim};
        PGresult *r = NULL;
        /* Rows as they will be once marked (status delivered, delivered_at this statement's
         * now()), with that time as text in the last column for the UPDATE below. Marked after
         * sending, so that only commands that did go out are marked. */
        int rc = cm_pg_exec(c, &r,
                            "SELECT " DM__CMD_COLS ", now()::text FROM (SELECT id, device_id, name, payload, 2 AS status, "
                            "  created_at, expires_at, now() AS delivered_at, acked_at, result, error FROM commands "
                            "  WHERE device_id = $1 AND status IN (1, 2) AND expires_at > now() AND id <> ALL($2::int8[]) "
                            "  ORDER BY id LIMIT $3) c ORDER BY c.id",
                            3, p);
        cm_buf_free(&sent);
        if (rc) {
            cm_log_kv(CM_LOG_WARN, "command delivery query failed", "error", cm_pg_error(c), NULL);
            break;
        }
        int n = PQntuples(r), nsent = 0, stop = 0;
        cm_arena_t ar;
        cm_arena_init(&ar, NULL, 0);
        for (int i = 0; i < n && !stop; i++) {
            dm_command_t *cmd = dm__cmd_from_row(&ar.pb, r, i);
            int src = cm_call_send(w->call, &cmd->base);
            if (src == CM_EFULL) {
                dm__send_queue_full(h, w);
                full = stop = 1;
            } else if (src) {
                stop = 1; /* the call ended: its done callback forgets the watcher */
            } else {
                w->full_since_ms = 0;
                dm__sent_add(w, dm__int(r, i, 0));
                nsent++;
            }
        }
        cm_arena_free(&ar);
        if (nsent) {
            cm_counter_add(h->delivered, (uint64_t)nsent);
            /* Acknowledged meanwhile (status 3, 4) or expired (5): left as they are. */
            cm_buf_t ids = CM_BUF_INIT;
            dm__ids_literal(&ids, w->sent + w->nsent - nsent, (size_t)nsent);
            const char *q[] = {ids.data, PQgetvalue(r, 0, DM__CMD_NCOLS)};
            if (cm_pg_exec(c, NULL,
                           "UPDATE commands SET status = 2, delivered_at = $2::timestamptz "
                           "WHERE id = ANY($1::int8[]) AND status IN (1, 2)",
                           2, q))
                cm_log_kv(CM_LOG_WARN, "marking commands delivered failed", "error", cm_pg_error(c), NULL);
            cm_buf_free(&ids);
        }
        PQclear(r);
        more = !stop && n == DM__DELIVER_BATCH;
    }
    /* A stall is only a run of passes that all found the queue full. */
    if (!full) w->full_since_ms = 0;
    cm_pg_release(h->store->pg, c);
    pthread_mutex_unlock(&w->mu);
}

/* Delivers to every local watcher of device_id (NULL: every watcher, for the poll); with
 * backlog_only, only to those whose last pass stopped at a full send queue. */
static void dm__notify(dm_cmd_hub_t *h, const char *device_id, int backlog_only) {
    pthread_mutex_lock(&h->mu);
    size_t n = 0;
    dm__watcher_t **todo = cm_malloc(sizeof *todo * (h->nw ? h->nw : 1));
    for (size_t i = 0; i < h->nw; i++)
        if ((!device_id || strcmp(h->w[i]->device_id, device_id) == 0) &&
            (!backlog_only || __atomic_load_n(&h->w[i]->backlog, __ATOMIC_RELAXED))) {
            h->w[i]->refs++;
            todo[n++] = h->w[i];
        }
    pthread_mutex_unlock(&h->mu);
    for (size_t i = 0; i < n; i++) {
        dm__deliver(h, todo[i]);
        dm__watcher_unref(h, todo[i]);
    }
    cm_free(todo);
}

static void *dm__tail_loop(void *arg) {
    dm_cmd_hub_t *h = arg;
    char key[96], last[48] = "$";
    snprintf(key, sizeof key, "%scmdq", h->store->prefix);
    int down = 0;
    h->last_poll_ms = dm__mono_ms();
    while (!__atomic_load_n(&h->stop, __ATOMIC_ACQUIRE)) {
        if (dm__mono_ms() - h->last_poll_ms >= h->store->cfg->command_poll_ms) {
            h->last_poll_ms = dm__mono_ms();
            dm__notify(h, NULL, 0);
        }
        /* Watchers whose backlog did not fit in their send queue go on as the client reads,
         * without waiting for a notification or the poll; a few times a second at most. */
        if (dm__mono_ms() - h->last_backlog_ms >= DM__BACKLOG_RETRY_MS) {
            h->last_backlog_ms = dm__mono_ms();
            dm__notify(h, NULL, 1);
        }
        /* Short blocks so that stop is noticed within half a second. */
        const char *argv[] = {"XREAD", "COUNT", "500", "BLOCK", "500", "STREAMS", key, last};
        redisReply *rep = cm_redis_cmd(h->tail, 8, argv, NULL);
        if (rep && rep->type == REDIS_REPLY_ERROR) {
            freeReplyObject(rep);
            rep = NULL;
        }
        if (!rep) {
            if (!down) cm_log_kv(CM_LOG_WARN, "command notifications lost redis", "error", cm_redis_error(h->tail), NULL);
            down = 1;
            usleep(200000);
            continue;
        }
        if (down) {
            /* Notifications sent while we were away are gone: look for everything once. */
            cm_log_kv(CM_LOG_INFO, "command notifications reconnected to redis", NULL);
            down = 0;
            snprintf(last, sizeof last, "$");
            dm__notify(h, NULL, 0);
        }
        if (rep->type == REDIS_REPLY_ARRAY && rep->elements == 1 && rep->element[0]->elements == 2) {
            redisReply *entries = rep->element[0]->element[1];
            for (size_t i = 0; i < entries->elements; i++) {
                redisReply *en = entries->element[i];
                if (en->elements != 2) continue;
                snprintf(last, sizeof last, "%s", en->element[0]->str);
                redisReply *f = en->element[1];
                for (size_t k = 0; k + 1 < f->elements; k += 2)
                    if (strcmp(f->element[k]->str, "device_id") == 0) dm__notify(h, f->element[k + 1]->str, 0);
            }
        }
        freeReplyObject(rep);
    }
    return NULL;
}

dm_cmd_hub_t *dm_cmd_hub_start(dm_store_t *s) {
    dm_cmd_hub_t *h = cm_calloc(1, sizeof *h);
    h->store = s;
    /* XREAD blocks up to 500 ms: the connection's command timeout must be longer. */
    h->tail = cm_redis_new(s->cfg->redis_addr, s->redis_timeout_ms > 1500 ? s->redis_timeout_ms : 1500, NULL);
    pthread_mutex_init(&h->mu, NULL);
    h->gauge = cm_metrics_gauge("dm_command_watchers", "Open WatchCommands streams on this replica.", NULL);
    h->delivered = cm_metrics_counter("dm_commands_delivered_total", "Commands sent on WatchCommands streams.", NULL);
    pthread_create(&h->th, NULL, dm__tail_loop, h);
    return h;
}

int dm_cmd_hub_watch(dm_cmd_hub_t *h, cm_call_t *call, const char *device_id) {
    dm__watcher_t *w = cm_calloc(1, sizeof *w);
    w->call = call;
    w->hub = h;
    w->refs = 2; /* the list, and this first delivery */
    w->trim_at = DM__SENT_TRIM_MIN;
    snprintf(w->device_id, sizeof w->device_id, "%s", device_id);
    pthread_mutex_init(&w->mu, NULL);
    pthread_mutex_lock(&h->mu);
    if (h->closing) {
        pthread_mutex_unlock(&h->mu);
        pthread_mutex_destroy(&w->mu);
        cm_free(w);
        return cm_call_fail(call, CM_STATUS_UNAVAILABLE, "device-mgmt is shutting down: watch again");
    }
    if (h->nw == h->capw) h->w = cm_realloc(h->w, (h->capw = h->capw ? h->capw * 2 : 16) * sizeof *h->w);
    h->w[h->nw++] = w;
    cm_gauge_set(h->gauge, (double)h->nw);
    cm_call_ref(call);
    cm_call_set_user(call, w);
    pthread_mutex_unlock(&h->mu);
    /* Joined first, delivered second: a command sent in between is found by one or the other,
     * and the sent set keeps it from being sent twice. */
    dm__deliver(h, w);
    dm__watcher_unref(h, w);
    return CM_PENDING;
}

void dm_cmd_hub_done(cm_call_t *call) {
    dm__watcher_t *w = cm_call_user(call);
    if (!w) return; /* failed before joining */
    dm_cmd_hub_t *h = w->hub;
    pthread_mutex_lock(&h->mu);
    for (size_t i = 0; i < h->nw; i++)
        if (h->w[i] == w) {
            h->w[i] = h->w[--h->nw];
            break;
        }
    cm_gauge_set(h->gauge, (double)h->nw);
    pthread_mutex_unlock(&h->mu);
    dm__watcher_unref(h, w);
}

void dm_cmd_hub_end_all(void *arg) {
    dm_cmd_hub_t *h = arg;
    pthread_mutex_lock(&h->mu);
    h->closing = 1;
    for (size_t i = 0; i < h->nw; i++)
        cm_call_abort(h->w[i]->call, CM_STATUS_UNAVAILABLE, "device-mgmt is shutting down: watch again");
    pthread_mutex_unlock(&h->mu);
}

void dm_cmd_hub_stop(dm_cmd_hub_t *h) {
    if (!h) return;
    __atomic_store_n(&h->stop, 1, __ATOMIC_RELEASE);
    pthread_join(h->th, NULL);
    cm_redis_free(h->tail);
    cm_free(h->w);
    pthread_mutex_destroy(&h->mu);
    cm_free(h);
}
