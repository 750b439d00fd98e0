/* QueryTelemetry and LatestValues over the telemetry table (contract in ing_query.h).
 *
 * Every query names device_id, metric and a ts range so that the (device_id, metric, ts) index
 * and partition pruning apply. Range bounds travel as timestamptz text formatted here from
 * integers, never through to_timestamp(float): a float bound could move a point on a bucket or page
 * edge to the wrong side. Response memory comes from the call arena; Postgres results are cleared
 * and connections released before returning. */
#include "ing_query.h"

#include <inttypes.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cm_buf.h"
#include "cm_json.h"
#include "cm_log.h"
#include "ing_batch.h"

#define ING__ACQUIRE_MS 5000
/* Telemetry only exists within ingest's skew window of "now", so clipping query ranges to years
 * 1..9999 loses nothing and keeps every bound printable as a 4-digit-year timestamp. */
#define ING__MIN_MS (-62135596800000LL) /* 0001-01-01 00:00:00 UTC */
#define ING__MAX_MS 253402300800000LL   /* 10000-01-01 00:00:00 UTC, exclusive */
/* Room for ing__ts_text of any int64 (the compiler checks the worst case, not our range). */
#define ING__TS_CAP 80

/* Page token: version, last ts (Unix microseconds), last seq, query check; hex-encoded. */
#define ING__TOKEN_VERSION 1
#define ING__TOKEN_BYTES 25


/* ---- small helpers ------------------------------------------------------------------------- */

static int64_t ing__floor_div(int64_t a, int64_t b) {
    int64_t q = a / b;
    return (a % b != 0 && (a < 0) != (b < 0)) ? q - 1 : q;
}

/* Unix microseconds (within years 1..9999) as timestamptz input text, exact to the microsecond.
 * Days to a civil date by Howard Hinnant's algorithm, so no time_t or time zone is involved. */
static void ing__ts_text(char *out, size_t cap, int64_t us) {
    int64_t secs = ing__floor_div(us, 1000000), frac = us - secs * 1000000;
    int64_t days = ing__floor_div(secs, 86400), sod = secs - days * 86400;
    int64_t z = days + 719468;
    int64_t era = ing__floor_div(z, 146097), doe = z - era * 146097;
    int64_t yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
    int64_t doy = doe - (365 * yoe + yoe / 4 - yoe / 100), mp = (5 * doy + 2) / 153;
    int64_t d = doy - (153 * mp + 2) / 5 + 1, m = mp < 10 ? mp + 3 : mp - 9, y = yoe + era * 400 + (m <= 2);
    snprintf(out, cap, "%04" PRId64 "-%02" PRId64 "-%02" PRId64 " %02" PRId64 ":%02" PRId64 ":%02" PRId64 ".%06" PRId64 "+00",
             y, m, d, sod / 3600, sod / 60 % 60, sod % 60, frac);
}

static int ing__device_or_fail(cm_call_t *call, const char *device_id) {
    if (!*device_id) return cm_call_fail(call, CM_STATUS_INVALID_ARGUMENT, "device_id: required");
    /* Telemetry is stored only under ids device-mgmt issued: anything else is a mistake, not a
     * device without data. */
    if (!ing_device_id_ok(device_id)) return cm_call_fail(call, CM_STATUS_INVALID_ARGUMENT, "device_id: " ING_DEVICE_ID_RULE);
    return 0;
}

/* The first line of a libpq message without its severity: the status message stays one line, and
 * the full text (with LINE/caret context) goes to the log instead. */
static void ing__pg_msg(char *out, size_t cap, const char *msg) {
    static const char *const sev[] = {"ERROR:  ", "FATAL:  ", "PANIC:  "};
    for (size_t i = 0; i < sizeof sev / sizeof sev[0]; i++)
        if (strncmp(msg, sev[i], strlen(sev[i])) == 0) msg += strlen(sev[i]);
    snprintf(out, cap, "%.*s", (int)strcspn(msg, "\n"), msg);
}

/* No connection to be had and a connection lost mid-query read the same to the client: both are
 * worth retrying, unlike INTERNAL. */
static int ing__unavailable(cm_call_t *call, const char *msg) {
    char m[512];
    ing__pg_msg(m, sizeof m, msg);
    return cm_call_fail(call, CM_STATUS_UNAVAILABLE, "telemetry store unavailable: %s", m);
}

/* A pooled connection, waiting no longer than the caller will (nor than 5 s: a pool that stays
 * busy that long is overloaded, and the client should back off rather than queue). */
static cm_pg_conn_t *ing__conn_or_fail(cm_call_t *call, cm_pg_t *pg, int *code) {
    int64_t left = cm_call_deadline_ms(call);
    if (left == 0) {
        *code = cm_call_fail(call, CM_STATUS_DEADLINE_EXCEEDED, "deadline passed before the telemetry store was queried");
        return NULL;
    }
    cm_pg_conn_t *c = cm_pg_acquire(pg, left < 0 || left > ING__ACQUIRE_MS ? ING__ACQUIRE_MS : (int)left);
    if (!c) *code = ing__unavailable(call, cm_pg_last_error(pg));
    return c;
}

static int ing__pg_fail(cm_call_t *call, cm_pg_conn_t *c, const char *what) {
    if (cm_pg_conn_lost(c)) return ing__unavailable(call, cm_pg_error(c));
    char m[512];
    ing__pg_msg(m, sizeof m, cm_pg_error(c));
    /* query_canceled: a statement_timeout configured on the server, or an operator's cancel. */
    if (strcmp(cm_pg_sqlstate(c), "57014") == 0)
        return cm_call_fail(call, CM_STATUS_DEADLINE_EXCEEDED, "%s took too long: %s", what, m);
    cm_log_kv(CM_LOG_ERROR, "telemetry query failed", "what", what, "sqlstate", cm_pg_sqlstate(c), "error",
              cm_pg_error(c), NULL);
    return cm_call_fail(call, CM_STATUS_INTERNAL, "%s failed: %s", what, m);
}

/* ---- rows to points ------------------------------------------------------------------------ */

/* The stored labels (a jsonb object of strings, NULL when none) as map entries. ing_batch.c wrote
 * them, so an unreadable value is a bug: the point is still returned, without labels. */
static void *ing__alloc(ProtobufCAllocator *a, size_t n) { return a->alloc(a->allocator_data, n); }

static char *ing__strndup(ProtobufCAllocator *a, const char *s, size_t n) {
    char *d = ing__alloc(a, n + 1);
    memcpy(d, s, n);
    d[n] = 0;
    return d;
}

static void ing__labels_from_json(ProtobufCAllocator *a, const char *text, Iot__Ingest__V1__Point *p) {
    char err[128];
    json_t *j = cm_json_parse(text, strlen(text), err, sizeof err);
    if (!j || !json_is_object(j)) {
        CM_LOG(CM_LOG_WARN, "telemetry row with unreadable labels: %s", j ? "not an object" : err);
        json_decref(j);
        return;
    }
    size_t n = json_object_size(j), i = 0;
    if (n) p->labels = ing__alloc(a, n * sizeof *p->labels);
    const char *k;
    json_t *v;
    json_object_foreach(j, k, v) {
        Iot__Ingest__V1__Point__LabelsEntry *en = ing__alloc(a, sizeof *en);
        iot__ingest__v1__point__labels_entry__init(en);
        en->key = ing__strndup(a, k, strlen(k));
        const char *sv = json_is_string(v) ? json_string_value(v) : "";
        en->value = ing__strndup(a, sv, strlen(sv));
        p->labels[i++] = en;
    }
    p->n_labels = i;
    json_decref(j);
}

Iot__Ingest__V1__Point *ing_point_from_row(ProtobufCAllocator *a, const PGresult *r, int row, char *metric,
                                           int64_t *us) {
    Iot__Ingest__V1__Point *p = ing__alloc(a, sizeof *p);
    iot__ingest__v1__point__init(p);
    p->seq = strtoull(PQgetvalue(r, row, 0), NULL, 10);
    p->metric = metric;
    *us = strtoll(PQgetvalue(r, row, 1), NULL, 10);
    p->time_ms = ing__floor_div(*us, 1000);
    /* An unknown kind (a newer writer) leaves the value unset rather than guessing. */
    switch (atoi(PQgetvalue(r, row, 2))) {
    case 1:
        p->value_case = IOT__INGEST__V1__POINT__VALUE_DOUBLE_VALUE;
        p->double_value = strtod(PQgetvalue(r, row, 3), NULL);
        break;
    case 2:
        p->value_case = IOT__INGEST__V1__POINT__VALUE_INT_VALUE;
        p->int_value = strtoll(PQgetvalue(r, row, 4), NULL, 10);
        break;
    case 3:
        p->value_case = IOT__INGEST__V1__POINT__VALUE_BOOL_VALUE;
        p->bool_value = PQgetvalue(r, row, 5)[0] == 't';
        break;
    case 4:
        p->value_case = IOT__INGEST__V1__POINT__VALUE_STRING_VALUE;
        p->string_value = ing__strndup(a, PQgetvalue(r, row, 6), (size_t)PQgetlength(r, row, 6));
        break;
    default:
        break;
    }
    if (!PQgetisnull(r, row, 7)) ing__labels_from_json(a, PQgetvalue(r, row, 7), p);
    return p;
}

/* ---- page tokens --------------------------------------------------------------------------- */

static void ing__put64(unsigned char *b, uint64_t v) {
    for (int i = 7; i >= 0; i--, v >>= 8) b[i] = (unsigned char)v;
}

static uint64_t ing__get64(const unsigned char *b) {
    uint64_t v = 0;
    for (int i = 0; i < 8; i++) v = v << 8 | b[i];
    return v;
}

/* FNV-1a over the fields that define the result set. Not a secret: a forged token can only move
 * the caller's own cursor; the check exists so that a stale token is refused, not misapplied. */
static uint64_t ing__query_check(const Iot__Ingest__V1__QueryTelemetryRequest *req) {
    unsigned char range[16];
    ing__put64(range, (uint64_t)req->from_ms);
    ing__put64(range + 8, (uint64_t)req->to_ms);
    const unsigned char *parts[] = {(const unsigned char *)req->device_id, (const unsigned char *)req->metric, range};
    size_t lens[] = {strlen(req->device_id) + 1, strlen(req->metric) + 1, sizeof range}; /* NULs separate fields */
    uint64_t h = 14695981039346656037ULL;
    for (size_t i = 0; i < 3; i++)
        for (size_t j = 0; j < lens[i]; j++) h = (h ^ parts[i][j]) * 1099511628211ULL;
    return h;
}

static char *ing__token(cm_call_t *call, const Iot__Ingest__V1__QueryTelemetryRequest *req, int64_t us, uint64_t seq) {
    unsigned char b[ING__TOKEN_BYTES];
    b[0] = ING__TOKEN_VERSION;
    ing__put64(b + 1, (uint64_t)us);
    ing__put64(b + 9, seq);
    ing__put64(b + 17, ing__query_check(req));
    char *out = cm_call_alloc(call, 2 * ING__TOKEN_BYTES + 1);
    cm_hex(out, b, sizeof b);
    return out;
}

static int ing__hexval(char ch) {
    if (ch >= '0' && ch <= '9') return ch - '0';
    if (ch >= 'a' && ch <= 'f') return ch - 'a' + 10;
    if (ch >= 'A' && ch <= 'F') return ch - 'A' + 10;
    return -1;
}

/* Decodes req->page_token into the last (us, seq) returned; "" leaves *have 0. */
static int ing__cursor_or_fail(cm_call_t *call, const Iot__Ingest__V1__QueryTelemetryRequest *req, int *have,
                               int64_t *us, int64_t *seq) {
    *have = 0;
    const char *tok = req->page_token;
    if (!*tok) return 0;
    unsigned char b[ING__TOKEN_BYTES];
    if (strlen(tok) != 2 * ING__TOKEN_BYTES) goto bad;
    for (size_t i = 0; i < ING__TOKEN_BYTES; i++) {
        int hi = ing__hexval(tok[2 * i]), lo = ing__hexval(tok[2 * i + 1]);
        if (hi < 0 || lo < 0) goto bad;
        b[i] = (unsigned char)(hi << 4 | lo);
    }
    if (b[0] != ING__TOKEN_VERSION) goto bad;
    if (ing__get64(b + 17) != ing__query_check(req))
        return cm_call_fail(call, CM_STATUS_INVALID_ARGUMENT,
                            "page_token does not belong to this query (device_id, metric, from_ms and to_ms must stay "
                            "the same while paging); start again without a page_token");
    *us = (int64_t)ing__get64(b + 1);
    *seq = (int64_t)ing__get64(b + 9);
    /* Only values this service could have written: the bound must stay printable (ing__ts_text). */
    if (*us < ING__MIN_MS * 1000 || *us >= ING__MAX_MS * 1000 || *seq < 0) goto bad;
    *have = 1;
    return 0;
bad:
    return cm_call_fail(call, CM_STATUS_INVALID_ARGUMENT,
                        "page_token: not a token this service issued; pass the next_page_token of the previous page, "
                        "or none for the first page");
}

/* ---- QueryTelemetry ------------------------------------------------------------------------ */

#define ING__RANGE "t.device_id = $1 AND t.metric = $2 AND t.ts >= $3::timestamptz AND t.ts < $4::timestamptz"

/* $5 seq: rows at exactly ts = $3 must have a larger seq (the cursor's tie-break; INT64_MIN on a
 * first page). Spelled out rather than as a row comparison so the index condition stays on ts. */
static const char ing__raw_sql[] = "SELECT " ING_POINT_COLS " FROM telemetry t WHERE " ING__RANGE
                                   " AND (t.ts > $3::timestamptz OR t.seq > $5::int8) ORDER BY t.ts, t.seq LIMIT $6::int4";

/* Bucket number of a row: floor((ms - from_ms) / step_ms) in exact numeric arithmetic: ms is never
 * below from_ms here (the range starts there), so div()'s truncation is the floor, and numeric
 * cannot overflow however far apart from_ms and the data are (int8 could) nor round a point
 * into the neighbouring bucket (float8 could). */
#define ING__BUCKET "div(floor(extract(epoch from t.ts) * 1000) - $5::numeric, $6::numeric)::int8"
#define ING__NUMERIC "CASE t.kind WHEN 1 THEN t.v_double WHEN 2 THEN t.v_int::float8 END"
#define ING__AGG_NUMERIC(fn)                                                                                      \
    "SELECT " ING__BUCKET ", count(*), " fn "(" ING__NUMERIC ") FROM telemetry t WHERE " ING__RANGE \
    " AND t.kind IN (1, 2) GROUP BY 1 ORDER BY 1"

/* Every aggregation's query yields (bucket number, count, value) in bucket order. */
static const char *const ing__agg_sql[] = {
    [IOT__INGEST__V1__AGGREGATION__AGGREGATION_MIN] = ING__AGG_NUMERIC("min"),
    [IOT__INGEST__V1__AGGREGATION__AGGREGATION_MAX] = ING__AGG_NUMERIC("max"),
    [IOT__INGEST__V1__AGGREGATION__AGGREGATION_AVG] = ING__AGG_NUMERIC("avg"),
    [IOT__INGEST__V1__AGGREGATION__AGGREGATION_SUM] = ING__AGG_NUMERIC("sum"),
    [IOT__INGEST__V1__AGGREGATION__AGGREGATION_COUNT] =
        "SELECT " ING__BUCKET ", count(*), count(*)::float8 FROM telemetry t WHERE " ING__RANGE " GROUP BY 1 ORDER BY 1",
    /* Newest point of each bucket: the buckets' max(ts) first, then one index probe per bucket for
     * the row with the highest seq at that ts, instead of sorting every row of the range. */
    [IOT__INGEST__V1__AGGREGATION__AGGREGATION_LAST] =
        "WITH b AS (SELECT " ING__BUCKET " AS k, count(*) AS n, max(t.ts) AS last_ts FROM telemetry t WHERE " ING__RANGE
        " GROUP BY 1) "
        "SELECT b.k, b.n, l.v FROM b CROSS JOIN LATERAL ("
        "SELECT CASE t.kind WHEN 1 THEN t.v_double WHEN 2 THEN t.v_int::float8 WHEN 3 THEN t.v_bool::int4::float8 END AS v "
        "FROM telemetry t WHERE " ING__RANGE " AND t.ts = b.last_ts ORDER BY t.seq DESC LIMIT 1) l "
        "WHERE l.v IS NOT NULL ORDER BY b.k",
};

static int ing__query_raw(cm_call_t *call, cm_pg_t *pg, const Iot__Ingest__V1__QueryTelemetryRequest *req,
                          int page_size, int64_t lo_us, int64_t hi_us, Iot__Ingest__V1__QueryTelemetryResponse *resp) {
    int have;
    int64_t cur_us = 0, cur_seq = 0;
    int code = ing__cursor_or_fail(call, req, &have, &cur_us, &cur_seq);
    if (code) return code;
    /* A cursor moves the lower bound up to the last point returned; rows at that exact time are
     * then told apart by seq. */
    int64_t seq_after = INT64_MIN;
    if (have && cur_us >= lo_us) {
        lo_us = cur_us;
        seq_after = cur_seq;
    }
    if (lo_us >= hi_us) return CM_STATUS_OK;
    char lo[ING__TS_CAP], hi[ING__TS_CAP], seq[24], lim[16];
    ing__ts_text(lo, sizeof lo, lo_us);
    ing__ts_text(hi, sizeof hi, hi_us);
    snprintf(seq, sizeof seq, "%" PRId64, seq_after);
    /* One row more than asked tells whether another page exists. */
    snprintf(lim, sizeof lim, "%d", page_size + 1);
    const char *p[] = {req->device_id, req->metric, lo, hi, seq, lim};
    cm_pg_conn_t *c = ing__conn_or_fail(call, pg, &code);
    if (!c) return code;
    PGresult *r = NULL;
    if (cm_pg_exec(c, &r, ing__raw_sql, 6, p)) {
        code = ing__pg_fail(call, c, "telemetry query");
    } else {
        int rows = PQntuples(r), take = rows > page_size ? page_size : rows;
        char *metric = cm_call_strdup(call, req->metric);
        int64_t last_us = 0;
        resp->points = cm_call_alloc(call, sizeof *resp->points * (size_t)(take ? take : 1));
        for (int i = 0; i < take; i++) resp->points[i] = ing_point_from_row(cm_call_pb_allocator(call), r, i, metric, &last_us);
        resp->n_points = (size_t)take;
        if (rows > page_size) resp->next_page_token = ing__token(call, req, last_us, resp->points[take - 1]->seq);
    }
    PQclear(r);
    cm_pg_release(pg, c);
    return code;
}

static int ing__query_buckets(cm_call_t *call, cm_pg_t *pg, const Iot__Ingest__V1__QueryTelemetryRequest *req,
                              uint64_t n_buckets, int64_t lo_us, int64_t hi_us,
                              Iot__Ingest__V1__QueryTelemetryResponse *resp) {
    if (lo_us >= hi_us) return CM_STATUS_OK;
    char lo[ING__TS_CAP], hi[ING__TS_CAP], from[24], step[24];
    ing__ts_text(lo, sizeof lo, lo_us);
    ing__ts_text(hi, sizeof hi, hi_us);
    snprintf(from, sizeof from, "%" PRId64, req->from_ms);
    snprintf(step, sizeof step, "%" PRId64, req->step_ms);
    const char *p[] = {req->device_id, req->metric, lo, hi, from, step};
    int code;
    cm_pg_conn_t *c = ing__conn_or_fail(call, pg, &code);
    if (!c) return code;
    code = CM_STATUS_OK;
    PGresult *r = NULL;
    if (cm_pg_exec(c, &r, ing__agg_sql[req->aggregation], 6, p)) {
        code = ing__pg_fail(call, c, "telemetry aggregation");
    } else {
        int rows = PQntuples(r);
        resp->buckets = cm_call_alloc(call, sizeof *resp->buckets * (size_t)(rows ? rows : 1));
        size_t n = 0;
        for (int i = 0; i < rows; i++) {
            int64_t k = strtoll(PQgetvalue(r, i, 0), NULL, 10);
            if (k < 0 || (uint64_t)k >= n_buckets) continue; /* cannot happen: the range is inside the buckets */
            Iot__Ingest__V1__Bucket *b = cm_call_alloc(call, sizeof *b);
            iot__ingest__v1__bucket__init(b);
            /* Unsigned arithmetic: the sum is inside [from_ms, to_ms) but k * step_ms alone may not
             * fit an int64 when from_ms is far below zero. */
            b->start_ms = (int64_t)((uint64_t)req->from_ms + (uint64_t)k * (uint64_t)req->step_ms);
            b->count = strtoll(PQgetvalue(r, i, 1), NULL, 10);
            b->value = strtod(PQgetvalue(r, i, 2), NULL);
            resp->buckets[n++] = b;
        }
        resp->n_buckets = n;
    }
    PQclear(r);
    cm_pg_release(pg, c);
    return code;
}

/* The number of step_ms buckets from from_ms to to_ms, the last one possibly partial. Unsigned:
 * to_ms - from_ms can exceed INT64_MAX. */
static uint64_t ing__n_buckets(const Iot__Ingest__V1__QueryTelemetryRequest *req) {
    uint64_t span = (uint64_t)req->to_ms - (uint64_t)req->from_ms, step = (uint64_t)req->step_ms;
    return span / step + (span % step != 0);
}

int ing_query_telemetry_check(cm_call_t *call, const Iot__Ingest__V1__QueryTelemetryRequest *req) {
    int code = ing__device_or_fail(call, req->device_id);
    if (code) return code;
    if (!*req->metric) return cm_call_fail(call, CM_STATUS_INVALID_ARGUMENT, "metric: required");
    if (!ing_name_ok(req->metric, ING_MAX_METRIC))
        return cm_call_fail(call, CM_STATUS_INVALID_ARGUMENT, "metric: must be 1-%d characters of A-Z a-z 0-9 _ . : / -",
                            ING_MAX_METRIC);
    if (req->from_ms >= req->to_ms)
        return cm_call_fail(call, CM_STATUS_INVALID_ARGUMENT,
                            "to_ms: must be greater than from_ms (from_ms %" PRId64 ", to_ms %" PRId64 "; to_ms is exclusive)",
                            req->from_ms, req->to_ms);
    if (req->page_size < 0 || req->page_size > ING_QUERY_PAGE_MAX)
        return cm_call_fail(call, CM_STATUS_INVALID_ARGUMENT, "page_size: %d is not in 0..%d (0 means %d)", req->page_size,
                            ING_QUERY_PAGE_MAX, ING_QUERY_PAGE_DEFAULT);
    int agg = (int)req->aggregation;
    if (agg < 0 || agg > IOT__INGEST__V1__AGGREGATION__AGGREGATION_LAST)
        return cm_call_fail(call, CM_STATUS_INVALID_ARGUMENT, "aggregation: %d is not a known Aggregation", agg);
    if (agg == IOT__INGEST__V1__AGGREGATION__AGGREGATION_UNSPECIFIED) {
        if (req->step_ms != 0)
            return cm_call_fail(call, CM_STATUS_INVALID_ARGUMENT,
                                "step_ms: must be 0 for raw points (got %" PRId64 "); set aggregation to get buckets",
                                req->step_ms);
        int have;
        int64_t us, seq;
        return ing__cursor_or_fail(call, req, &have, &us, &seq);
    }
    if (req->step_ms < 1)
        return cm_call_fail(call, CM_STATUS_INVALID_ARGUMENT, "step_ms: required with an aggregation (at least 1, got %" PRId64 ")",
                            req->step_ms);
    /* Buckets are counted rounding up, since a partial last bucket is still a bucket in the
     * response. */
    uint64_t n_buckets = ing__n_buckets(req);
    if (n_buckets > ING_QUERY_MAX_BUCKETS) {
        uint64_t span = (uint64_t)req->to_ms - (uint64_t)req->from_ms;
        return cm_call_fail(call, CM_STATUS_INVALID_ARGUMENT,
                            "step_ms: %" PRId64 " ms over %" PRIu64 " ms makes %" PRIu64
                            " buckets, at most %d; use a step_ms of at least %" PRIu64 " or a shorter range",
                            req->step_ms, span, n_buckets, ING_QUERY_MAX_BUCKETS,
                            span / ING_QUERY_MAX_BUCKETS + (span % ING_QUERY_MAX_BUCKETS != 0));
    }
    if (*req->page_token)
        return cm_call_fail(call, CM_STATUS_INVALID_ARGUMENT,
                            "page_token: aggregated queries are not paged; send it empty");
    return 0;
}

int ing_query_telemetry(cm_call_t *call, cm_pg_t *pg, const Iot__Ingest__V1__QueryTelemetryRequest *req,
                        Iot__Ingest__V1__QueryTelemetryResponse *resp) {
    int code = ing_query_telemetry_check(call, req);
    if (code) return code;
    int page_size = req->page_size ? req->page_size : ING_QUERY_PAGE_DEFAULT;
    int agg = (int)req->aggregation;

    int64_t lo_ms = req->from_ms > ING__MIN_MS ? req->from_ms : ING__MIN_MS;
    int64_t hi_ms = req->to_ms < ING__MAX_MS ? req->to_ms : ING__MAX_MS;
    /* When the clip leaves nothing, lo >= hi and the queries answer empty without Postgres. */
    int64_t lo_us = lo_ms < hi_ms ? lo_ms * 1000 : 0, hi_us = lo_ms < hi_ms ? hi_ms * 1000 : 0;

    if (agg == IOT__INGEST__V1__AGGREGATION__AGGREGATION_UNSPECIFIED)
        return ing__query_raw(call, pg, req, page_size, lo_us, hi_us, resp);
    return ing__query_buckets(call, pg, req, ing__n_buckets(req), lo_us, hi_us, resp);
}

/* ---- LatestValues -------------------------------------------------------------------------- */

/* A loose index scan: m walks the device's distinct metrics, each step one probe of the
 * (device_id, metric, ts) index for the next larger name, stopping after $2 names; then per metric
 * one backward index probe for its newest row. The ORDER BY ts DESC, seq DESC only has to sort the
 * rows of the newest ts. The limit sits inside the recursion because an outer LIMIT behind
 * ORDER BY would still walk every metric. */
static const char ing__latest_sql[] =
    "WITH RECURSIVE m (metric, n) AS ("
    "(SELECT t.metric, 1 FROM telemetry t WHERE t.device_id = $1 ORDER BY t.metric LIMIT 1) "
    "UNION ALL "
    "SELECT (SELECT t.metric FROM telemetry t WHERE t.device_id = $1 AND t.metric > m.metric ORDER BY t.metric LIMIT 1), "
    "m.n + 1 FROM m WHERE m.metric IS NOT NULL AND m.n < $2::int4) "
    "SELECT p.*, m.metric FROM m CROSS JOIN LATERAL ("
    "SELECT " ING_POINT_COLS " FROM telemetry t WHERE t.device_id = $1 AND t.metric = m.metric "
    "ORDER BY t.ts DESC, t.seq DESC LIMIT 1) p "
    "WHERE m.metric IS NOT NULL ORDER BY m.metric";

int ing_latest_values_check(cm_call_t *call, const Iot__Ingest__V1__LatestValuesRequest *req) {
    return ing__device_or_fail(call, req->device_id);
}

int ing_latest_values(cm_call_t *call, cm_pg_t *pg, const Iot__Ingest__V1__LatestValuesRequest *req,
                      Iot__Ingest__V1__LatestValuesResponse *resp) {
    int code = ing_latest_values_check(call, req);
    if (code) return code;
    char lim[16];
    snprintf(lim, sizeof lim, "%d", ING_LATEST_MAX_METRICS);
    const char *p[] = {req->device_id, lim};
    cm_pg_conn_t *c = ing__conn_or_fail(call, pg, &code);
    if (!c) return code;
    PGresult *r = NULL;
    if (cm_pg_exec(c, &r, ing__latest_sql, 2, p)) {
        code = ing__pg_fail(call, c, "latest values query");
    } else {
        int rows = PQntuples(r);
        resp->points = cm_call_alloc(call, sizeof *resp->points * (size_t)(rows ? rows : 1));
        for (int i = 0; i < rows; i++) {
            int64_t us;
            char *metric = cm_call_strndup(call, PQgetvalue(r, i, ING_POINT_NCOLS),
                                           (size_t)PQgetlength(r, i, ING_POINT_NCOLS));
            resp->points[i] = ing_point_from_row(cm_call_pb_allocator(call), r, i, metric, &us);
        }
        resp->n_points = (size_t)rows;
    }
    PQclear(r);
    cm_pg_release(pg, c);
    return code;
}
