/* Validation of device points and their encoding for the committer (see ing_batch.h). Every
 * check here exists because the committer copies a whole commit group in one COPY: a value that
 * Postgres would refuse (invalid UTF-8, a NUL byte, a timestamp outside every partition) must be
 * caught per batch, or it would fail the other devices' batches of the same group. */
#include "ing_batch.h"

#include <math.h>
#include <stdio.h>
#include <ctype.h>
#include <string.h>

#include "cm_alloc.h"

const char ing_copy_header[19] = "PGCOPY\n\377\r\n\0\0\0\0\0\0\0\0\0";
const char ing_copy_trailer[2] = "\377\377";

#define ING__MAX_STRING 1024
#define ING__MAX_LABELS 16
#define ING__MAX_LABEL_KEY 64
#define ING__MAX_LABEL_VALUE 256
/* Microseconds between the Unix epoch and Postgres' epoch (2000-01-01 UTC). */
#define ING__PG_EPOCH_US 946684800000000LL

int ing_device_id_ok(const char *s) {
    size_t n = strlen(s);
    if (n == 0 || n > ING_MAX_DEVICE_ID || !isalnum((unsigned char)s[0])) return 0;
    for (size_t i = 1; i < n; i++)
        if (!isalnum((unsigned char)s[i]) && !strchr("._:-", s[i])) return 0;
    return 1;
}

int ing_name_ok(const char *s, size_t max) {
    size_t n = 0;
    for (; s[n]; n++) {
        unsigned char ch = (unsigned char)s[n];
        if (n >= max) return 0;
        if (!((ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') || (ch >= '0' && ch <= '9') || ch == '_' ||
              ch == '.' || ch == ':' || ch == '/' || ch == '-'))
            return 0;
    }
    return n > 0;
}

/* Well-formed UTF-8 (no overlongs, surrogates or code points above U+10FFFF) and no NUL: what a
 * Postgres text column in a UTF-8 database accepts. Returns the length, or -1. */
long ing_utf8_len(const char *str, size_t max) {
    const unsigned char *s = (const unsigned char *)str;
    size_t i = 0;
    while (s[i]) {
        if (i >= max) return -1;
        unsigned c = s[i];
        size_t k;
        unsigned cp;
        if (c < 0x80) {
            i++;
            continue;
        } else if (c >= 0xC2 && c <= 0xDF) {
            k = 1, cp = c & 0x1F;
        } else if (c >= 0xE0 && c <= 0xEF) {
            k = 2, cp = c & 0x0F;
        } else if (c >= 0xF0 && c <= 0xF4) {
            k = 3, cp = c & 0x07;
        } else {
            return -1;
        }
        for (size_t j = 1; j <= k; j++) {
            if ((s[i + j] & 0xC0) != 0x80) return -1; /* also stops at the NUL */
            cp = (cp << 6) | (s[i + j] & 0x3F);
        }
        if ((k == 2 && (cp < 0x800 || (cp >= 0xD800 && cp <= 0xDFFF))) || (k == 3 && (cp < 0x10000 || cp > 0x10FFFF)))
            return -1;
        i += k + 1;
    }
    return i > max ? -1 : (long)i;
}

static void ing__be16(cm_buf_t *b, uint16_t v) {
    char x[2] = {(char)(v >> 8), (char)v};
    cm_buf_append(b, x, 2);
}

static void ing__be32(cm_buf_t *b, uint32_t v) {
    char x[4] = {(char)(v >> 24), (char)(v >> 16), (char)(v >> 8), (char)v};
    cm_buf_append(b, x, 4);
}

static void ing__be64(cm_buf_t *b, uint64_t v) {
    ing__be32(b, (uint32_t)(v >> 32));
    ing__be32(b, (uint32_t)v);
}

static void ing__field(cm_buf_t *b, const char *s, size_t n) {
    ing__be32(b, (uint32_t)n);
    cm_buf_append(b, s, n);
}

static void ing__null(cm_buf_t *b) { ing__be32(b, 0xFFFFFFFFu); }

static void ing__json_str(cm_buf_t *b, const char *s) {
    cm_buf_append(b, "\"", 1);
    for (; *s; s++) {
        unsigned char c = (unsigned char)*s;
        if (c == '"' || c == '\\') {
            char e[2] = {'\\', (char)c};
            cm_buf_append(b, e, 2);
        } else if (c < 0x20) {
            cm_buf_printf(b, "\\u%04x", c);
        } else {
            cm_buf_append(b, (const char *)s, 1);
        }
    }
    cm_buf_append(b, "\"", 1);
}

void ing_varint(cm_buf_t *b, uint64_t v) {
    char x[10];
    size_t n = 0;
    do {
        x[n] = (char)(v & 0x7F);
        v >>= 7;
        if (v) x[n] |= (char)0x80;
        n++;
    } while (v);
    cm_buf_append(b, x, n);
}

#define ING__FAIL(...)                          \
    do {                                        \
        snprintf(err, err_cap, __VA_ARGS__);    \
        ing_batch_free(b);                      \
        cm_buf_free(&json);                     \
        return NULL;                            \
    } while (0)

ing_batch_t *ing_batch_new(const char *device_id, Iot__Ingest__V1__Point *const *points, size_t n,
                           const ing_limits_t *lim, int64_t now_ms, char *err, size_t err_cap) {
    cm_buf_t json = CM_BUF_INIT;
    ing_batch_t *b = cm_calloc(1, sizeof *b);
    size_t dlen = strlen(device_id);
    if (dlen > ING_MAX_DEVICE_ID) ING__FAIL("device id longer than %d bytes", ING_MAX_DEVICE_ID);
    memcpy(b->device_id, device_id, dlen + 1);
    if (n > ING_MAX_POINTS) ING__FAIL("points: %zu points in one batch, at most %d", n, ING_MAX_POINTS);
    b->n = n;
    b->seq = cm_malloc((n ? n : 1) * sizeof *b->seq);
    b->row_off = cm_malloc((n + 1) * sizeof *b->row_off);
    b->pb_off = cm_malloc((n + 1) * sizeof *b->pb_off);
    b->min_ms = INT64_MAX;
    b->max_ms = INT64_MIN;
    int64_t lo = now_ms - lim->max_past_ms, hi = now_ms + lim->max_future_ms;
    for (size_t i = 0; i < n; i++) {
        const Iot__Ingest__V1__Point *p = points[i];
        if (p->seq == 0 || p->seq > (uint64_t)INT64_MAX)
            ING__FAIL("points[%zu].seq: %llu is outside 1..9223372036854775807", i, (unsigned long long)p->seq);
        if (i && p->seq <= b->seq[i - 1])
            ING__FAIL("points[%zu].seq: %llu does not increase (points[%zu].seq is %llu); seq must increase within a batch",
                      i, (unsigned long long)p->seq, i - 1, (unsigned long long)b->seq[i - 1]);
        b->seq[i] = p->seq;
        if (!ing_name_ok(p->metric, ING_MAX_METRIC))
            ING__FAIL("points[%zu].metric: must be 1-%d characters of A-Z a-z 0-9 _ . : / -", i, ING_MAX_METRIC);
        if (p->time_ms < lo || p->time_ms > hi)
            ING__FAIL("points[%zu].time_ms: %lld is outside the accepted window %lld..%lld (now %lld; see IOT_INGEST_MAX_PAST and IOT_INGEST_MAX_FUTURE)",
                      i, (long long)p->time_ms, (long long)lo, (long long)hi, (long long)now_ms);
        if (p->time_ms < b->min_ms) b->min_ms = p->time_ms;
        if (p->time_ms > b->max_ms) b->max_ms = p->time_ms;
        long slen = 0;
        switch (p->value_case) {
        case IOT__INGEST__V1__POINT__VALUE_DOUBLE_VALUE:
            if (!isfinite(p->double_value)) ING__FAIL("points[%zu].double_value: must be a finite number", i);
            break;
        case IOT__INGEST__V1__POINT__VALUE_STRING_VALUE:
            slen = ing_utf8_len(p->string_value, ING__MAX_STRING);
            if (slen < 0) ING__FAIL("points[%zu].string_value: must be valid UTF-8 without NUL, at most %d bytes", i, ING__MAX_STRING);
            break;
        case IOT__INGEST__V1__POINT__VALUE_INT_VALUE:
        case IOT__INGEST__V1__POINT__VALUE_BOOL_VALUE:
            break;
        default:
            ING__FAIL("points[%zu]: a value is required (double_value, int_value, bool_value or string_value)", i);
        }
        if (p->n_labels > ING__MAX_LABELS) ING__FAIL("points[%zu].labels: %zu labels, at most %d", i, p->n_labels, ING__MAX_LABELS);
        cm_buf_reset(&json);
        for (size_t j = 0; j < p->n_labels; j++) {
            const char *k = p->labels[j]->key, *v = p->labels[j]->value;
            if (!ing_name_ok(k, ING__MAX_LABEL_KEY))
                ING__FAIL("points[%zu].labels: key \"%.64s\" must be 1-%d characters of A-Z a-z 0-9 _ . : / -", i, k,
                          ING__MAX_LABEL_KEY);
            if (ing_utf8_len(v, ING__MAX_LABEL_VALUE) < 0)
                ING__FAIL("points[%zu].labels[%s]: value must be valid UTF-8 without NUL, at most %d bytes", i, k,
                          ING__MAX_LABEL_VALUE);
            cm_buf_append(&json, j ? "," : "{", 1);
            ing__json_str(&json, k);
            cm_buf_append(&json, ":", 1);
            ing__json_str(&json, v);
        }
        if (p->n_labels) cm_buf_append(&json, "}", 1);

        /* The COPY tuple: columns in table order (see migrations/001_init.sql). */
        b->row_off[i] = (uint32_t)b->rows.len;
        cm_buf_t *r = &b->rows;
        ing__be16(r, 10);
        ing__field(r, device_id, dlen);
        ing__field(r, p->metric, strlen(p->metric));
        ing__be32(r, 8);
        ing__be64(r, (uint64_t)(p->time_ms * 1000 - ING__PG_EPOCH_US));
        ing__be32(r, 8);
        ing__be64(r, p->seq);
        ing__be32(r, 2);
        int kind = p->value_case == IOT__INGEST__V1__POINT__VALUE_DOUBLE_VALUE ? 1
                   : p->value_case == IOT__INGEST__V1__POINT__VALUE_INT_VALUE  ? 2
                   : p->value_case == IOT__INGEST__V1__POINT__VALUE_BOOL_VALUE ? 3
                                                                               : 4;
        ing__be16(r, (uint16_t)kind);
        if (kind == 1) {
            uint64_t bits;
            memcpy(&bits, &p->double_value, 8);
            ing__be32(r, 8);
            ing__be64(r, bits);
        } else {
            ing__null(r);
        }
        if (kind == 2) {
            ing__be32(r, 8);
            ing__be64(r, (uint64_t)p->int_value);
        } else {
            ing__null(r);
        }
        if (kind == 3) {
            char v = p->bool_value ? 1 : 0;
            ing__field(r, &v, 1);
        } else {
            ing__null(r);
        }
        if (kind == 4)
            ing__field(r, p->string_value, (size_t)slen);
        else
            ing__null(r);
        if (p->n_labels) {
            ing__be32(r, (uint32_t)json.len + 1);
            cm_buf_append(r, "\1", 1); /* jsonb binary format version */
            cm_buf_append(r, json.data, json.len);
        } else {
            ing__null(r);
        }

        /* The published form: a `points` field (2, length-delimited) of PublishedBatch. */
        b->pb_off[i] = (uint32_t)b->pb.len;
        size_t sz = protobuf_c_message_get_packed_size(&p->base);
        cm_buf_append(&b->pb, "\x12", 1);
        ing_varint(&b->pb, sz);
        size_t at = b->pb.len;
        if (b->pb.cap < at + sz + 1) {
            b->pb.cap = (at + sz + 1) * 2;
            b->pb.data = cm_realloc(b->pb.data, b->pb.cap);
        }
        protobuf_c_message_pack(&p->base, (uint8_t *)b->pb.data + at);
        b->pb.len = at + sz;
        b->pb.data[b->pb.len] = 0;
    }
    b->row_off[n] = (uint32_t)b->rows.len;
    b->pb_off[n] = (uint32_t)b->pb.len;
    cm_buf_free(&json);
    return b;
}

void ing_batch_free(ing_batch_t *b) {
    if (!b) return;
    cm_free(b->seq);
    cm_free(b->row_off);
    cm_free(b->pb_off);
    cm_buf_free(&b->rows);
    cm_buf_free(&b->pb);
    cm_free(b);
}
