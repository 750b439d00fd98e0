/* One device's batch on its way from a handler to a committer, already validated and encoded.
 *
 * Handlers turn the decoded request into two byte strings while they still run on a gRPC worker
 * (so the work spreads over the workers, and the request arena can be released): `rows`, the
 * points as Postgres binary COPY tuples, and `pb`, the same points as `points` fields of a
 * PublishedBatch. Because seq increases within a batch, the points a device already stored are
 * always a prefix: a committer keeps the suffix above the device's mark with one offset into each.
 *
 * Ownership: ing_batch_new() allocates, the committer calls `done` exactly once, and `done`
 * (the handler's completion) frees the batch with ing_batch_free(). */
#ifndef ING_BATCH_H
#define ING_BATCH_H

#include <stddef.h>
#include <stdint.h>

#include "cm_buf.h"
#include "iot/ingest/v1/ingest.pb-c.h"

#define ING_MAX_POINTS 10000
#define ING_MAX_DEVICE_ID 128
#define ING_MAX_METRIC 128

typedef struct ing_batch_s ing_batch_t;

struct ing_batch_s {
    ing_batch_t *next;
    char device_id[ING_MAX_DEVICE_ID + 1];
    size_t n;          /* points */
    uint64_t *seq;     /* n, strictly increasing */
    uint32_t *row_off; /* n + 1 offsets into rows */
    uint32_t *pb_off;  /* n + 1 offsets into pb */
    cm_buf_t rows;
    cm_buf_t pb;
    int64_t min_ms, max_ms; /* time range of the points (partitions they need) */
    /* Filled by the committer before `done`: */
    uint64_t acked_seq;
    int stored, duplicates;
    /* Called once from a committer thread (or at submit time on refusal) with a gRPC status. */
    void (*done)(ing_batch_t *b, int code, const char *msg);
    void *arg;
    int64_t enqueued_ns; /* for the ack latency histogram */
};

/* Limits of one point, also the documented contract (README). */
typedef struct ing_limits_s {
    int64_t max_past_ms, max_future_ms;
} ing_limits_t;

/* Validates and encodes points[0..n) for device_id. On a bad point returns NULL with a message
 * naming the point and field in err (nothing of the batch is kept); otherwise a new batch. */
ing_batch_t *ing_batch_new(const char *device_id, Iot__Ingest__V1__Point *const *points, size_t n,
                           const ing_limits_t *lim, int64_t now_ms, char *err, size_t err_cap);
void ing_batch_free(ing_batch_t *b);

/* A device id as device-mgmt makes them: [A-Za-z0-9][A-Za-z0-9._:-]{0,127}. */
int ing_device_id_ok(const char *s);
#define ING_DEVICE_ID_RULE "1-128 characters of A-Z, a-z, 0-9, '.', '_', ':', '-', starting with a letter or digit"
/* 1..max characters of A-Z a-z 0-9 _ . : / - (metric names, label keys). */
int ing_name_ok(const char *s, size_t max);
/* Well-formed UTF-8 (no overlongs, surrogates or code points above U+10FFFF) without NUL, at most
 * max bytes: what a Postgres text column in a UTF-8 database accepts. The length, or -1. */
long ing_utf8_len(const char *s, size_t max);

/* Appends v as a protobuf varint (the publisher frames PublishedBatch fields around the points). */
void ing_varint(cm_buf_t *b, uint64_t v);

/* Postgres binary COPY framing for telemetry rows. */
extern const char ing_copy_header[19];
extern const char ing_copy_trailer[2];

#endif
