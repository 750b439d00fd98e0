/* The read side of ingest: QueryTelemetry (raw points, paged, or time buckets) and LatestValues,
 * both straight from the telemetry table over the query pool.
 *
 * Both functions validate the request themselves and return a gRPC status; on any error they have
 * already called cm_call_fail() with a message naming the field or the cause, so the handler just
 * returns the code. Everything they put in the response comes from cm_call_alloc() /
 * cm_call_strdup(): nothing needs freeing, and nothing may be kept past the call. Postgres results
 * are cleared and the connection released before they return, on every path.
 *
 * Errors: INVALID_ARGUMENT for a bad request; UNAVAILABLE ("telemetry store unavailable: ...")
 * when no connection could be had in min(deadline, 5 s) or the connection dropped;
 * DEADLINE_EXCEEDED when the deadline had already passed or Postgres cancelled the statement;
 * INTERNAL with the Postgres message otherwise. */
#ifndef ING_QUERY_H
#define ING_QUERY_H

#include "cm_pg.h"
#include "cm_rpc.h"
#include "iot/ingest/v1/ingest.pb-c.h"

#define ING_QUERY_PAGE_DEFAULT 1000
#define ING_QUERY_PAGE_MAX 10000
#define ING_QUERY_MAX_BUCKETS 10000
#define ING_LATEST_MAX_METRICS 1000

/* QueryTelemetry. device_id (1..128 bytes of UTF-8) and metric (1..128 bytes of [A-Za-z0-9_.:/-])
 * are required, from_ms < to_ms, page_size 0 (= 1000) or 1..10000. Times outside years 1..9999
 * hold no telemetry, so the range is clipped to them.
 *
 * Raw points (aggregation UNSPECIFIED, step_ms 0): the points with from_ms <= time < to_ms in
 * (time, seq) order, page_size at a time. next_page_token is "" on the last page; otherwise it
 * carries the last (time in microseconds, seq) returned and a check value of (device_id, metric,
 * from_ms, to_ms), so it resumes exactly after that point even while new points arrive, and a
 * token sent with a different query is refused (INVALID_ARGUMENT). page_size may change between
 * pages. time_ms is the stored time rounded down to the millisecond.
 *
 * Aggregated (any other aggregation): step_ms >= 1 and at most 10000 buckets
 * [from_ms + k*step_ms, from_ms + (k+1)*step_ms) in the range; no paging (page_token must be
 * empty, next_page_token is ""). Only non-empty buckets are returned, in time order.
 * - MIN, MAX, AVG, SUM: over numeric points only (double, and int as a double; a SUM of ints
 *   beyond 2^53 loses precision). Bool and string points are ignored: `count` is the number of
 *   numeric points, and a bucket without any numeric point is omitted.
 * - COUNT: every point; value == count.
 * - LAST: the value of the newest point (by time, then seq) of the bucket: double, int as a
 *   double, bool as 0 or 1; a bucket whose newest point is a string is omitted. `count` is every
 *   point of the bucket. */
int ing_query_telemetry(cm_call_t *call, cm_pg_t *pg, const Iot__Ingest__V1__QueryTelemetryRequest *req,
                        Iot__Ingest__V1__QueryTelemetryResponse *resp);
/* Its validation alone (what it does before any query): 0, or INVALID_ARGUMENT set on the call. */
int ing_query_telemetry_check(cm_call_t *call, const Iot__Ingest__V1__QueryTelemetryRequest *req);

/* LatestValues: the newest point (by time, then seq) of each metric of the device, by metric name,
 * for the first 1000 metric names. Reads a few index entries per metric (a loose index scan over
 * the distinct metrics), never the whole history. A device without data (or unknown: ingest does
 * not own devices) gives OK with no points. */
int ing_latest_values(cm_call_t *call, cm_pg_t *pg, const Iot__Ingest__V1__LatestValuesRequest *req,
                      Iot__Ingest__V1__LatestValuesResponse *resp);
int ing_latest_values_check(cm_call_t *call, const Iot__Ingest__V1__LatestValuesRequest *req);

/* The telemetry columns ing_point_from_row() reads, in its order; the table is aliased t. The
 * time comes out as exact integer microseconds (extract(epoch) is numeric). */
#define ING_POINT_COLS                                                                                   \
    "t.seq, (extract(epoch from t.ts) * 1000000)::int8 AS ts_us, t.kind, t.v_double, t.v_int, t.v_bool, " \
    "t.v_text, t.labels::text AS labels"
#define ING_POINT_NCOLS 8

/* One row of ING_POINT_COLS (from column 0) as a Point allocated from a (metric is used as is);
 * *us receives the exact stored time. Also used to republish stored points (ing_commit.c). */
Iot__Ingest__V1__Point *ing_point_from_row(ProtobufCAllocator *a, const PGresult *r, int row, char *metric,
                                           int64_t *us);

#endif
