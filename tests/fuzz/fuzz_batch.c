/* The telemetry batch validator and encoder, ing_batch_new (services/ingest/ing_batch.c): what
 * PushTelemetry and StreamTelemetry run on every batch a device sends, before it reaches a
 * committer and, in one COPY with other devices' batches, Postgres.
 *
 * Input: one byte L, then L bytes of device id (the id authentication produced; any bytes, to test
 * its length check too), then a PushTelemetryRequest as a device sends it, decoded by the server's
 * decoder. "Now" is fixed and the window is ingest's default (168 h back, 5 min ahead).
 *
 * Properties of an accepted batch, beyond "no crash, leak or undefined behaviour":
 *   - seq[] are the points' seqs, strictly increasing from 1; min_ms/max_ms bound every time;
 *   - rows holds exactly n binary COPY tuples of the telemetry table's 10 columns, each field a
 *     length and that many bytes (or NULL), ending where the next row_off starts: device_id,
 *     metric, time, seq, kind as sent, one value column set by kind, labels as jsonb (version 1
 *     and a JSON object holding every label) or NULL without labels;
 *   - pb holds exactly n `points` fields that decode as a PublishedBatch with the same seqs.
 * A refused batch comes with a message. */
#include "fuzz.h"

#include <jansson.h>

#include "cm_alloc.h"
#include "cm_log.h"
#include "cm_pbdec.h"
#include "ing_batch.h"

#define FZ_NOW_MS 1767225600000LL /* 2026-01-01 */
#define FZ_PG_EPOCH_US 946684800000000LL

static const ing_limits_t fz_lim = {.max_past_ms = 168LL * 3600 * 1000, .max_future_ms = 5LL * 60 * 1000};

int LLVMFuzzerInitialize(int *argc, char ***argv) {
    (void)argc;
    (void)argv;
    cm_log_init("fuzz", CM_LOG_OFF);
    return 0;
}

static uint64_t fz_be(const uint8_t *p, int n) {
    uint64_t v = 0;
    for (int i = 0; i < n; i++) v = v << 8 | p[i];
    return v;
}

/* One COPY field at *p (below end): its bytes in *data and length in *len (-1: NULL). */
static void fz_field(const uint8_t **p, const uint8_t *end, const uint8_t **data, long *len) {
    FZ_ASSERT(end - *p >= 4, "a COPY field length runs past its row");
    uint32_t l = (uint32_t)fz_be(*p, 4);
    *p += 4;
    if (l == 0xFFFFFFFFu) {
        *len = -1;
        *data = NULL;
        return;
    }
    FZ_ASSERT((uint64_t)(end - *p) >= l, "a COPY field of %u bytes runs past its row", l);
    *data = *p;
    *len = (long)l;
    *p += l;
}

static void fz_check_row(const ing_batch_t *b, size_t i, const Iot__Ingest__V1__Point *pt) {
    const uint8_t *p = (const uint8_t *)b->rows.data + b->row_off[i], *end = (const uint8_t *)b->rows.data + b->row_off[i + 1];
    FZ_ASSERT(end - p >= 2 && fz_be(p, 2) == 10, "row %zu does not start with 10 columns", i);
    p += 2;
    const uint8_t *f[10];
    long len[10];
    for (int k = 0; k < 10; k++) fz_field(&p, end, &f[k], &len[k]);
    FZ_ASSERT(p == end, "row %zu has %ld bytes after its 10 fields", i, (long)(end - p));
    FZ_ASSERT(len[0] == (long)strlen(b->device_id) && !memcmp(f[0], b->device_id, (size_t)len[0]), "row %zu: device_id", i);
    FZ_ASSERT(len[1] == (long)strlen(pt->metric) && !memcmp(f[1], pt->metric, (size_t)len[1]), "row %zu: metric", i);
    FZ_ASSERT(len[2] == 8 && (int64_t)fz_be(f[2], 8) == pt->time_ms * 1000 - FZ_PG_EPOCH_US, "row %zu: time", i);
    FZ_ASSERT(len[3] == 8 && fz_be(f[3], 8) == pt->seq, "row %zu: seq", i);
    FZ_ASSERT(len[4] == 2, "row %zu: kind", i);
    int kind = (int)fz_be(f[4], 2);
    int want = pt->value_case == IOT__INGEST__V1__POINT__VALUE_DOUBLE_VALUE ? 1
               : pt->value_case == IOT__INGEST__V1__POINT__VALUE_INT_VALUE  ? 2
               : pt->value_case == IOT__INGEST__V1__POINT__VALUE_BOOL_VALUE ? 3
                                                                            : 4;
    FZ_ASSERT(kind == want, "row %zu: kind %d for value case %d", i, kind, (int)pt->value_case);
    for (int k = 1; k <= 4; k++) FZ_ASSERT((len[4 + k] >= 0) == (k == kind), "row %zu: value column %d set for kind %d", i, k, kind);
    if (kind == 4) FZ_ASSERT(len[8] == (long)strlen(pt->string_value), "row %zu: string value", i);
    if (!pt->n_labels) {
        FZ_ASSERT(len[9] == -1, "row %zu: labels without labels", i);
        return;
    }
    FZ_ASSERT(len[9] >= 1 && f[9][0] == 1, "row %zu: labels are not jsonb version 1", i);
    json_error_t je;
    json_t *j = json_loadb((const char *)f[9] + 1, (size_t)len[9] - 1, 0, &je);
    FZ_ASSERT(json_is_object(j), "row %zu: labels are not a JSON object: %s", i, je.text);
    for (size_t k = 0; k < pt->n_labels; k++)
        FZ_ASSERT(json_is_string(json_object_get(j, pt->labels[k]->key)), "row %zu: label %s missing", i, pt->labels[k]->key);
    json_decref(j);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    fz_t in = {data, size};
    size_t idlen;
    const uint8_t *id = fz_bytes(&in, fz_byte(&in), &idlen);
    char device[256];
    memcpy(device, id, idlen);
    device[idlen] = 0;
    cm_arena_t a;
    cm_arena_init(&a, NULL, 0);
    Iot__Ingest__V1__PushTelemetryRequest *req =
        (void *)cm__pb_decode_server(&iot__ingest__v1__push_telemetry_request__descriptor, &a, in.p, in.n, NULL, 0);
    if (!req) {
        cm_arena_free(&a);
        return 0;
    }
    char err[512] = "";
    ing_batch_t *b = ing_batch_new(device, req->points, req->n_points, &fz_lim, FZ_NOW_MS, err, sizeof err);
    if (!b) {
        FZ_ASSERT(*err, "a refused batch without a message");
        cm_arena_free(&a);
        return 0;
    }
    size_t n = req->n_points;
    FZ_ASSERT(b->n == n, "%zu points, batch of %zu", n, b->n);
    FZ_ASSERT(b->row_off[0] == 0 && b->row_off[n] == b->rows.len, "row offsets do not span rows");
    FZ_ASSERT(b->pb_off[0] == 0 && b->pb_off[n] == b->pb.len, "pb offsets do not span pb");
    for (size_t i = 0; i < n; i++) {
        const Iot__Ingest__V1__Point *pt = req->points[i];
        FZ_ASSERT(b->seq[i] == pt->seq && pt->seq >= 1 && (i == 0 || b->seq[i] > b->seq[i - 1]), "seq[%zu]", i);
        FZ_ASSERT(b->min_ms <= pt->time_ms && pt->time_ms <= b->max_ms, "time of point %zu outside min_ms..max_ms", i);
        FZ_ASSERT(b->row_off[i] <= b->row_off[i + 1] && b->pb_off[i] < b->pb_off[i + 1], "offsets of point %zu", i);
        fz_check_row(b, i, pt);
    }
    Iot__Ingest__V1__PublishedBatch *pb =
        iot__ingest__v1__published_batch__unpack(&a.pb, b->pb.len, (const uint8_t *)b->pb.data);
    FZ_ASSERT(pb && pb->n_points == n, "pb is not %zu points of a PublishedBatch", n);
    for (size_t i = 0; i < n; i++) FZ_ASSERT(pb->points[i]->seq == b->seq[i], "published point %zu", i);
    ing_batch_free(b);
    cm_arena_free(&a);
    return 0;
}
