/* proto3 JSON <-> protobuf-c messages from their descriptors (see cm_pbjson.h). Output walks the
 * descriptor and reads fields at their offsets; input builds the message in an arena, so a
 * request costs no frees and a failed conversion leaves nothing behind. */
#include "cm_pbjson.h"

#include <ctype.h>
#include <errno.h>
#include <inttypes.h>
#include <limits.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "cm_err.h"
#include "cm_json.h"
#include "google/protobuf/field_mask.pb-c.h"
#include "google/protobuf/struct.pb-c.h"
#include "google/protobuf/timestamp.pb-c.h"

#define CM__AT(m, off) ((void *)((char *)(m) + (off)))
#define CM__CAT(m, off) ((const void *)((const char *)(m) + (off)))

/* Timestamps the JSON mapping allows: 0001-01-01T00:00:00Z .. 9999-12-31T23:59:59.999999999Z. */
#define CM__TS_MIN (-62135596800LL)
#define CM__TS_MAX (253402300799LL)

const char *cm_pbjson_camel(const char *name, char *buf, size_t cap) {
    size_t n = 0;
    int up = 0;
    for (const char *p = name; *p && n + 1 < cap; p++) {
        if (*p == '_') {
            up = 1;
            continue;
        }
        buf[n++] = up ? (char)toupper((unsigned char)*p) : *p;
        up = 0;
    }
    if (cap) buf[n] = 0;
    return buf;
}

const ProtobufCFieldDescriptor *cm_pbjson_field(const ProtobufCMessageDescriptor *d, const char *name) {
    const ProtobufCFieldDescriptor *f = protobuf_c_message_descriptor_get_field_by_name(d, name);
    if (f) return f;
    char buf[128];
    for (unsigned i = 0; i < d->n_fields; i++)
        if (strcmp(cm_pbjson_camel(d->fields[i].name, buf, sizeof buf), name) == 0) return &d->fields[i];
    return NULL;
}

/* protobuf-c keeps no map_entry option: a map field is a repeated message field whose type is the
 * nested "<FieldName>Entry" with fields key = 1 and value = 2, which protoc reserves for maps. */
int cm_pbjson_is_map(const ProtobufCFieldDescriptor *f) {
    if (f->label != PROTOBUF_C_LABEL_REPEATED || f->type != PROTOBUF_C_TYPE_MESSAGE) return 0;
    const ProtobufCMessageDescriptor *e = f->descriptor;
    if (e->n_fields != 2 || e->fields[0].id != 1 || e->fields[1].id != 2 || strcmp(e->fields[0].name, "key") ||
        strcmp(e->fields[1].name, "value"))
        return 0;
    char want[160];
    cm_pbjson_camel(f->name, want, sizeof want - 6);
    want[0] = (char)toupper((unsigned char)want[0]);
    strcat(want, "Entry");
    return strcmp(e->short_name, want) == 0;
}

static size_t cm__elem_size(ProtobufCType t) {
    switch (t) {
    case PROTOBUF_C_TYPE_INT64:
    case PROTOBUF_C_TYPE_SINT64:
    case PROTOBUF_C_TYPE_SFIXED64:
    case PROTOBUF_C_TYPE_UINT64:
    case PROTOBUF_C_TYPE_FIXED64: return 8;
    case PROTOBUF_C_TYPE_DOUBLE: return sizeof(double);
    case PROTOBUF_C_TYPE_BOOL: return sizeof(protobuf_c_boolean);
    case PROTOBUF_C_TYPE_STRING: return sizeof(char *);
    case PROTOBUF_C_TYPE_BYTES: return sizeof(ProtobufCBinaryData);
    case PROTOBUF_C_TYPE_MESSAGE: return sizeof(void *);
    default: return 4; /* 32-bit integers, float, enum */
    }
}

/* ---- base64 ------------------------------------------------------------------------------- */

static const char cm__b64[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

void cm_pbjson_base64(char *out, const uint8_t *p, size_t n) {
    size_t k = 0;
    for (size_t i = 0; i < n; i += 3) {
        uint32_t v = (uint32_t)p[i] << 16 | (i + 1 < n ? (uint32_t)p[i + 1] << 8 : 0) | (i + 2 < n ? p[i + 2] : 0);
        out[k++] = cm__b64[v >> 18 & 63];
        out[k++] = cm__b64[v >> 12 & 63];
        out[k++] = i + 1 < n ? cm__b64[v >> 6 & 63] : '=';
        out[k++] = i + 2 < n ? cm__b64[v & 63] : '=';
    }
    out[k] = 0;
}

static json_t *cm__b64_out(const uint8_t *p, size_t n) {
    char *s = cm_malloc(CM_PBJSON_BASE64_LEN(n) + 1);
    cm_pbjson_base64(s, p, n);
    json_t *j = json_stringn(s, CM_PBJSON_BASE64_LEN(n));
    cm_free(s);
    return j;
}

static int cm__b64_val(int c) {
    if (c >= 'A' && c <= 'Z') return c - 'A';
    if (c >= 'a' && c <= 'z') return c - 'a' + 26;
    if (c >= '0' && c <= '9') return c - '0' + 52;
    if (c == '+' || c == '-') return 62;
    if (c == '/' || c == '_') return 63;
    return -1;
}

/* Standard or URL-safe alphabet, padded or not. 0, or -1 for anything else. */
static int cm__b64_in(const char *s, size_t n, cm_arena_t *a, ProtobufCBinaryData *out) {
    while (n && s[n - 1] == '=') n--;
    if (n % 4 == 1) return -1;
    uint8_t *p = cm_arena_alloc(a, n * 3 / 4 + 1);
    size_t k = 0;
    uint32_t acc = 0;
    int bits = 0;
    for (size_t i = 0; i < n; i++) {
        int v = cm__b64_val((unsigned char)s[i]);
        if (v < 0) return -1;
        acc = acc << 6 | (uint32_t)v;
        bits += 6;
        if (bits >= 8) {
            bits -= 8;
            p[k++] = (uint8_t)(acc >> bits);
        }
    }
    out->data = k ? p : NULL;
    out->len = k;
    return 0;
}

/* ---- well-known types --------------------------------------------------------------------- */

static json_t *cm__ts_out(const Google__Protobuf__Timestamp *t) {
    if (t->seconds < CM__TS_MIN || t->seconds > CM__TS_MAX || t->nanos < 0 || t->nanos > 999999999) return NULL;
    time_t secs = (time_t)t->seconds;
    struct tm tm;
    if (!gmtime_r(&secs, &tm)) return NULL;
    char buf[48];
    size_t n = (size_t)snprintf(buf, sizeof buf, "%04d-%02d-%02dT%02d:%02d:%02d", tm.tm_year + 1900, tm.tm_mon + 1, tm.tm_mday,
                                tm.tm_hour, tm.tm_min, tm.tm_sec);
    if (t->nanos % 1000000 == 0 && t->nanos) n += (size_t)snprintf(buf + n, sizeof buf - n, ".%03d", t->nanos / 1000000);
    else if (t->nanos % 1000 == 0 && t->nanos) n += (size_t)snprintf(buf + n, sizeof buf - n, ".%06d", t->nanos / 1000);
    else if (t->nanos) n += (size_t)snprintf(buf + n, sizeof buf - n, ".%09d", t->nanos);
    snprintf(buf + n, sizeof buf - n, "Z");
    return json_string(buf);
}

static int cm__digits(const char *s, int n, int *out) {
    int v = 0;
    for (int i = 0; i < n; i++) {
        if (!isdigit((unsigned char)s[i])) return -1;
        v = v * 10 + (s[i] - '0');
    }
    *out = v;
    return 0;
}

/* RFC 3339: 2026-11-22T10:00:00[.fraction](Z|+hh:mm|-hh:mm). 0, or -1. */
static int cm__ts_parse(const char *s, int64_t *secs, int32_t *nanos) {
    int Y, M, D, h, m, sec;
    if (strlen(s) < 20 || s[4] != '-' || s[7] != '-' || (s[10] != 'T' && s[10] != 't') || s[13] != ':' || s[16] != ':' ||
        cm__digits(s, 4, &Y) || cm__digits(s + 5, 2, &M) || cm__digits(s + 8, 2, &D) || cm__digits(s + 11, 2, &h) ||
        cm__digits(s + 14, 2, &m) || cm__digits(s + 17, 2, &sec))
        return -1;
    const char *p = s + 19;
    int32_t ns = 0;
    if (*p == '.') {
        int nd = 0;
        for (p++; isdigit((unsigned char)*p); p++, nd++) {
            if (nd >= 9) return -1;
            ns = ns * 10 + (*p - '0');
        }
        if (nd == 0) return -1;
        for (; nd < 9; nd++) ns *= 10;
    }
    int off = 0;
    if (*p == 'Z' || *p == 'z') {
        p++;
    } else if (*p == '+' || *p == '-') {
        int oh, om;
        if (strlen(p) != 6 || p[3] != ':' || cm__digits(p + 1, 2, &oh) || cm__digits(p + 4, 2, &om) || oh > 23 || om > 59)
            return -1;
        off = (oh * 60 + om) * 60 * (*p == '-' ? -1 : 1);
        p += 6;
    } else {
        return -1;
    }
    if (*p || M < 1 || M > 12 || D < 1 || D > 31 || h > 23 || m > 59 || sec > 59) return -1;
    struct tm tm = {.tm_year = Y - 1900, .tm_mon = M - 1, .tm_mday = D, .tm_hour = h, .tm_min = m, .tm_sec = sec};
    time_t t = timegm(&tm);
    if (tm.tm_mday != D || tm.tm_mon != M - 1) return -1; /* 2026-02-30 normalised into March */
    int64_t v = (int64_t)t - off;
    if (v < CM__TS_MIN || v > CM__TS_MAX) return -1;
    *secs = v;
    *nanos = ns;
    return 0;
}

static json_t *cm__mask_out(const Google__Protobuf__FieldMask *fm) {
    size_t n = 0;
    for (size_t i = 0; i < fm->n_paths; i++) n += strlen(fm->paths[i]) + 1;
    char *s = cm_malloc(n + 1), *w = s;
    for (size_t i = 0; i < fm->n_paths; i++) {
        if (i) *w++ = ',';
        cm_pbjson_camel(fm->paths[i], w, strlen(fm->paths[i]) + 1);
        w += strlen(w);
    }
    *w = 0;
    json_t *j = json_string(s);
    cm_free(s);
    return j;
}

/* ---- protobuf -> JSON --------------------------------------------------------------------- */

static json_t *cm__msg_out(const ProtobufCMessage *m, int depth);

static json_t *cm__real_out(double v) {
    if (isnan(v)) return json_string("NaN");
    if (isinf(v)) return json_string(v > 0 ? "Infinity" : "-Infinity");
    return json_real(v);
}

/* Strings are not UTF-8 checked by protobuf-c: cm_json_text makes a byte that is not valid UTF-8
 * U+FFFD, so the document stays JSON. */
static json_t *cm__str_out(const char *s) { return cm_json_text(s ? s : ""); }

/* One value of field f stored at p (an element, for repeated fields). */
static json_t *cm__value_out(const ProtobufCFieldDescriptor *f, const void *p, int depth) {
    char buf[32];
    switch (f->type) {
    case PROTOBUF_C_TYPE_INT32:
    case PROTOBUF_C_TYPE_SINT32:
    case PROTOBUF_C_TYPE_SFIXED32: return json_integer(*(const int32_t *)p);
    case PROTOBUF_C_TYPE_UINT32:
    case PROTOBUF_C_TYPE_FIXED32: return json_integer(*(const uint32_t *)p);
    case PROTOBUF_C_TYPE_INT64:
    case PROTOBUF_C_TYPE_SINT64:
    case PROTOBUF_C_TYPE_SFIXED64:
        snprintf(buf, sizeof buf, "%" PRId64, *(const int64_t *)p);
        return json_string(buf);
    case PROTOBUF_C_TYPE_UINT64:
    case PROTOBUF_C_TYPE_FIXED64:
        snprintf(buf, sizeof buf, "%" PRIu64, *(const uint64_t *)p);
        return json_string(buf);
    case PROTOBUF_C_TYPE_FLOAT: {
        float v = *(const float *)p;
        if (!isfinite(v)) return cm__real_out(v);
        /* The float's shortest digits (0.1f prints 0.1, not 0.10000000149011612). */
        for (int prec = 6; prec <= 9; prec++) {
            snprintf(buf, sizeof buf, "%.*g", prec, (double)v);
            if ((float)strtod(buf, NULL) == v) break;
        }
        return json_real(strtod(buf, NULL));
    }
    case PROTOBUF_C_TYPE_DOUBLE: return cm__real_out(*(const double *)p);
    case PROTOBUF_C_TYPE_BOOL: return json_boolean(*(const protobuf_c_boolean *)p);
    case PROTOBUF_C_TYPE_ENUM: {
        int v = *(const int *)p;
        const ProtobufCEnumValue *ev = protobuf_c_enum_descriptor_get_value(f->descriptor, v);
        return ev ? json_string(ev->name) : json_integer(v);
    }
    case PROTOBUF_C_TYPE_STRING: return cm__str_out(*(char *const *)p);
    case PROTOBUF_C_TYPE_BYTES: {
        const ProtobufCBinaryData *b = p;
        return cm__b64_out(b->data, b->len);
    }
    case PROTOBUF_C_TYPE_MESSAGE: {
        const ProtobufCMessage *sub = *(ProtobufCMessage *const *)p;
        if (!sub) return json_object(); /* a map value left unset */
        return cm__msg_out(sub, depth + 1);
    }
    }
    return NULL;
}

/* Set (proto3): members of a oneof by their case, repeated fields when not empty, messages when
 * present, scalars when not their zero value. */
static int cm__present(const ProtobufCMessage *m, const ProtobufCFieldDescriptor *f) {
    const void *p = CM__CAT(m, f->offset);
    if (f->label == PROTOBUF_C_LABEL_REPEATED) return *(const size_t *)CM__CAT(m, f->quantifier_offset) > 0;
    if (f->flags & PROTOBUF_C_FIELD_FLAG_ONEOF) return *(const uint32_t *)CM__CAT(m, f->quantifier_offset) == f->id;
    if (f->label == PROTOBUF_C_LABEL_REQUIRED) return 1;
    if (f->label == PROTOBUF_C_LABEL_OPTIONAL && f->quantifier_offset && f->type != PROTOBUF_C_TYPE_STRING &&
        f->type != PROTOBUF_C_TYPE_MESSAGE)
        return *(const protobuf_c_boolean *)CM__CAT(m, f->quantifier_offset) != 0;
    switch (f->type) {
    case PROTOBUF_C_TYPE_STRING: {
        const char *s = *(char *const *)p;
        return s && (*s || f->label == PROTOBUF_C_LABEL_OPTIONAL);
    }
    case PROTOBUF_C_TYPE_MESSAGE: return *(void *const *)p != NULL;
    case PROTOBUF_C_TYPE_BYTES: return ((const ProtobufCBinaryData *)p)->len > 0;
    case PROTOBUF_C_TYPE_FLOAT: return *(const float *)p != 0;
    case PROTOBUF_C_TYPE_DOUBLE: return *(const double *)p != 0;
    default: {
        size_t n = cm__elem_size(f->type);
        static const uint8_t zero[8];
        return memcmp(p, zero, n) != 0;
    }
    }
}

static json_t *cm__map_key_out(const ProtobufCFieldDescriptor *kf, const void *p) {
    json_t *k = cm__value_out(kf, p, 0);
    if (!k || json_is_string(k)) return k;
    json_t *s = json_is_integer(k) ? json_sprintf("%" JSON_INTEGER_FORMAT, json_integer_value(k))
                                   : json_string(json_is_true(k) ? "true" : "false");
    json_decref(k);
    return s;
}

static json_t *cm__msg_out(const ProtobufCMessage *m, int depth) {
    const ProtobufCMessageDescriptor *d = m->descriptor;
    if (depth > CM_JSON_MAX_DEPTH) return NULL;
    if (d == &google__protobuf__timestamp__descriptor) return cm__ts_out((const void *)m);
    if (d == &google__protobuf__field_mask__descriptor) return cm__mask_out((const void *)m);
    if (d == &google__protobuf__struct__descriptor) return cm_json_from_struct((const void *)m);
    if (d == &google__protobuf__value__descriptor) return cm_json_from_value((const void *)m);
    json_t *o = json_object();
    char key[128];
    for (unsigned i = 0; i < d->n_fields; i++) {
        const ProtobufCFieldDescriptor *f = &d->fields[i];
        if (!cm__present(m, f)) continue;
        cm_pbjson_camel(f->name, key, sizeof key);
        json_t *v;
        if (f->label == PROTOBUF_C_LABEL_REPEATED) {
            size_t n = *(const size_t *)CM__CAT(m, f->quantifier_offset);
            const char *arr = *(char *const *)CM__CAT(m, f->offset);
            size_t es = cm__elem_size(f->type);
            if (cm_pbjson_is_map(f)) {
                const ProtobufCMessageDescriptor *ed = f->descriptor;
                const ProtobufCFieldDescriptor *kf = &ed->fields[0], *vf = &ed->fields[1];
                v = json_object();
                for (size_t k = 0; v && k < n; k++) {
                    const ProtobufCMessage *e = ((ProtobufCMessage *const *)arr)[k];
                    json_t *ks = cm__map_key_out(kf, CM__CAT(e, kf->offset));
                    json_t *vs = cm__value_out(vf, CM__CAT(e, vf->offset), depth);
                    if (!ks || !vs || json_object_set_new(v, json_string_value(ks), vs)) {
                        if (!ks || !json_string_value(ks)) json_decref(vs);
                        json_decref(v);
                        v = NULL;
                    }
                    json_decref(ks);
                }
            } else {
                v = json_array();
                for (size_t k = 0; v && k < n; k++) {
                    json_t *e = cm__value_out(f, arr + k * es, depth);
                    if (!e || json_array_append_new(v, e)) {
                        json_decref(v);
                        v = NULL;
                    }
                }
            }
        } else {
            v = cm__value_out(f, CM__CAT(m, f->offset), depth);
        }
        if (!v || json_object_set_new(o, key, v)) {
            json_decref(o);
            return NULL;
        }
    }
    return o;
}

json_t *cm_pbjson_from_msg(const ProtobufCMessage *m) {
    return m ? cm__msg_out(m, 1) : NULL;
}

/* ---- JSON -> protobuf --------------------------------------------------------------------- */

typedef struct cm__in_s {
    cm_arena_t *a;
    char *err;
    size_t cap;
} cm__in_t;

static int cm__fail(cm__in_t *in, const char *path, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static int cm__fail(cm__in_t *in, const char *path, const char *fmt, ...) {
    if (in->cap) {
        int n = snprintf(in->err, in->cap, "%s%s", path && *path ? path : "", path && *path ? ": " : "");
        if (n < 0) n = 0;
        if ((size_t)n < in->cap) {
            va_list ap;
            va_start(ap, fmt);
            vsnprintf(in->err + n, in->cap - (size_t)n, fmt, ap);
            va_end(ap);
        }
    }
    return CM_EINVAL;
}

/* A path (in snake_case) that lowerCamelCase can carry and give back: dotted non-empty segments of
 * a-z, 0-9 and '_', each '_' followed by a letter. "a_1", "a__b", "a_" or "a b" would come back
 * changed from a response, or mean nothing to a backend (found by tests/fuzz/fuzz_rest.c). */
static int cm__mask_path_ok(const char *p) {
    for (size_t i = 0;; i++) {
        char c = p[i];
        if (c == '.' || c == 0) {
            if (i == 0 || p[i - 1] == '.') return 0; /* an empty segment */
            if (!c) return 1;
        } else if (c == '_') {
            if (!(p[i + 1] >= 'a' && p[i + 1] <= 'z')) return 0;
        } else if (!((c >= 'a' && c <= 'z') || (c >= '0' && c <= '9'))) {
            return 0;
        }
    }
}

/* "path,other.path" in lowerCamelCase (or proto names) into fm; CM_EINVAL for a path that is not one. */
static int cm__mask_in(const char *s, cm_arena_t *a, Google__Protobuf__FieldMask *fm, cm__in_t *in, const char *path) {
    size_t n = *s ? 1 : 0;
    for (const char *p = s; *p; p++) n += *p == ',';
    fm->paths = cm_arena_alloc(a, (n + 1) * sizeof *fm->paths);
    fm->n_paths = 0;
    while (*s) {
        const char *e = strchr(s, ',');
        size_t len = e ? (size_t)(e - s) : strlen(s);
        char *o = cm_arena_alloc(a, 2 * len + 1), *w = o; /* camel -> snake: each capital becomes _x */
        for (size_t i = 0; i < len; i++) {
            if (isupper((unsigned char)s[i])) {
                *w++ = '_';
                *w++ = (char)tolower((unsigned char)s[i]);
            } else {
                *w++ = s[i];
            }
        }
        *w = 0;
        if (!cm__mask_path_ok(o)) return cm__fail(in, path, "\"%.*s\" is not a field path", (int)len, s);
        fm->paths[fm->n_paths++] = o;
        s += len;
        if (*s == ',') s++;
    }
    return 0;
}

static int cm__msg_in(const json_t *j, ProtobufCMessage *m, cm__in_t *in, const char *path, int depth);

/* An integer from a JSON integer, an integral real, or a decimal string. */
static int cm__int_in(const json_t *v, int64_t *out, uint64_t *uout, int is_unsigned) {
    if (json_is_integer(v)) {
        json_int_t x = json_integer_value(v);
        if (is_unsigned) {
            if (x < 0) return -1;
            *uout = (uint64_t)x;
        } else {
            *out = (int64_t)x;
        }
        return 0;
    }
    if (json_is_real(v)) {
        double x = json_real_value(v);
        if (x != floor(x) || fabs(x) >= 9007199254740992.0 || (is_unsigned && x < 0)) return -1;
        if (is_unsigned) *uout = (uint64_t)x;
        else *out = (int64_t)x;
        return 0;
    }
    if (!json_is_string(v)) return -1;
    const char *s = json_string_value(v);
    if (!*s || isspace((unsigned char)*s) || (is_unsigned && *s == '-')) return -1;
    char *end;
    errno = 0;
    if (is_unsigned) *uout = strtoull(s, &end, 10);
    else *out = strtoll(s, &end, 10);
    return errno || *end ? -1 : 0;
}

static int cm__real_in(const json_t *v, double *out) {
    if (json_is_number(v)) {
        *out = json_number_value(v);
        return 0;
    }
    if (!json_is_string(v)) return -1;
    const char *s = json_string_value(v);
    if (strcmp(s, "NaN") == 0) *out = NAN;
    else if (strcmp(s, "Infinity") == 0) *out = INFINITY;
    else if (strcmp(s, "-Infinity") == 0) *out = -INFINITY;
    else {
        char *end;
        if (!*s || isspace((unsigned char)*s)) return -1;
        errno = 0;
        *out = strtod(s, &end);
        if (*end || errno || !isfinite(*out)) return -1;
    }
    return 0;
}

static const char *cm__type_name(ProtobufCType t) {
    switch (t) {
    case PROTOBUF_C_TYPE_INT32:
    case PROTOBUF_C_TYPE_SINT32:
    case PROTOBUF_C_TYPE_SFIXED32: return "a 32-bit integer";
    case PROTOBUF_C_TYPE_UINT32:
    case PROTOBUF_C_TYPE_FIXED32: return "an unsigned 32-bit integer";
    case PROTOBUF_C_TYPE_INT64:
    case PROTOBUF_C_TYPE_SINT64:
    case PROTOBUF_C_TYPE_SFIXED64: return "a 64-bit integer (a number or a decimal string)";
    case PROTOBUF_C_TYPE_UINT64:
    case PROTOBUF_C_TYPE_FIXED64: return "an unsigned 64-bit integer (a number or a decimal string)";
    case PROTOBUF_C_TYPE_FLOAT:
    case PROTOBUF_C_TYPE_DOUBLE: return "a number";
    case PROTOBUF_C_TYPE_BOOL: return "true or false";
    case PROTOBUF_C_TYPE_STRING: return "a string";
    case PROTOBUF_C_TYPE_BYTES: return "base64 text";
    default: return "an object";
    }
}

/* One value of field f from v into the storage at p. */
static int cm__value_in(const ProtobufCFieldDescriptor *f, const json_t *v, void *p, cm__in_t *in, const char *path,
                        int depth) {
    int64_t i = 0;
    uint64_t u = 0;
    double x;
    switch (f->type) {
    case PROTOBUF_C_TYPE_INT32:
    case PROTOBUF_C_TYPE_SINT32:
    case PROTOBUF_C_TYPE_SFIXED32:
        if (cm__int_in(v, &i, &u, 0) || i < INT32_MIN || i > INT32_MAX) break;
        *(int32_t *)p = (int32_t)i;
        return 0;
    case PROTOBUF_C_TYPE_UINT32:
    case PROTOBUF_C_TYPE_FIXED32:
        if (cm__int_in(v, &i, &u, 1) || u > UINT32_MAX) break;
        *(uint32_t *)p = (uint32_t)u;
        return 0;
    case PROTOBUF_C_TYPE_INT64:
    case PROTOBUF_C_TYPE_SINT64:
    case PROTOBUF_C_TYPE_SFIXED64:
        if (cm__int_in(v, &i, &u, 0)) break;
        *(int64_t *)p = i;
        return 0;
    case PROTOBUF_C_TYPE_UINT64:
    case PROTOBUF_C_TYPE_FIXED64:
        if (cm__int_in(v, &i, &u, 1)) break;
        *(uint64_t *)p = u;
        return 0;
    case PROTOBUF_C_TYPE_FLOAT:
        if (cm__real_in(v, &x) || (isfinite(x) && fabs(x) > 3.4028234663852886e38)) break;
        *(float *)p = (float)x;
        return 0;
    case PROTOBUF_C_TYPE_DOUBLE:
        if (cm__real_in(v, &x)) break;
        *(double *)p = x;
        return 0;
    case PROTOBUF_C_TYPE_BOOL:
        if (!json_is_boolean(v)) break;
        *(protobuf_c_boolean *)p = json_is_true(v);
        return 0;
    case PROTOBUF_C_TYPE_ENUM: {
        const ProtobufCEnumDescriptor *ed = f->descriptor;
        if (json_is_string(v)) {
            const ProtobufCEnumValue *ev = protobuf_c_enum_descriptor_get_value_by_name(ed, json_string_value(v));
            if (!ev && cm__int_in(v, &i, &u, 0) == 0 && i >= INT32_MIN && i <= INT32_MAX) { /* "3" from a URL */
                *(int *)p = (int)i;
                return 0;
            }
            if (!ev) return cm__fail(in, path, "\"%s\" is not a value of %s", json_string_value(v), ed->name);
            *(int *)p = ev->value;
            return 0;
        }
        if (cm__int_in(v, &i, &u, 0) || i < INT32_MIN || i > INT32_MAX)
            return cm__fail(in, path, "expected a name of %s", ed->name);
        *(int *)p = (int)i;
        return 0;
    }
    case PROTOBUF_C_TYPE_STRING:
        if (!json_is_string(v)) break;
        *(char **)p = cm_arena_strndup(in->a, json_string_value(v), json_string_length(v));
        return 0;
    case PROTOBUF_C_TYPE_BYTES:
        if (!json_is_string(v) || cm__b64_in(json_string_value(v), json_string_length(v), in->a, p)) break;
        return 0;
    case PROTOBUF_C_TYPE_MESSAGE: {
        const ProtobufCMessageDescriptor *d = f->descriptor;
        if (depth > CM_JSON_MAX_DEPTH) return cm__fail(in, path, "nested deeper than %d levels", CM_JSON_MAX_DEPTH);
        if (d == &google__protobuf__struct__descriptor || d == &google__protobuf__value__descriptor) {
            if (d == &google__protobuf__struct__descriptor && !json_is_object(v)) break;
            int rc = d == &google__protobuf__struct__descriptor ? cm_json_to_struct(v, &in->a->pb, p)
                                                                 : cm_json_to_value(v, &in->a->pb, p);
            return rc ? cm__fail(in, path, "not representable (too deep, or a number JSON cannot hold)") : 0;
        }
        ProtobufCMessage *sub = *(ProtobufCMessage **)p;
        if (!sub) {
            sub = cm_arena_alloc(in->a, d->sizeof_message);
            d->message_init(sub);
        }
        if (d == &google__protobuf__timestamp__descriptor) {
            Google__Protobuf__Timestamp *t = (void *)sub;
            if (!json_is_string(v) || cm__ts_parse(json_string_value(v), &t->seconds, &t->nanos))
                return cm__fail(in, path, "expected an RFC 3339 timestamp such as \"2026-11-22T10:00:00Z\"");
        } else if (d == &google__protobuf__field_mask__descriptor) {
            if (!json_is_string(v)) return cm__fail(in, path, "expected field paths separated by commas");
            int rc = cm__mask_in(json_string_value(v), in->a, (void *)sub, in, path);
            if (rc) return rc;
        } else {
            int rc = cm__msg_in(v, sub, in, path, depth + 1);
            if (rc) return rc;
        }
        *(ProtobufCMessage **)p = sub;
        return 0;
    }
    }
    return cm__fail(in, path, "expected %s", cm__type_name(f->type));
}

static char *cm__subpath(cm__in_t *in, const char *path, const char *key, long idx) {
    size_t n = strlen(path) + (key ? strlen(key) : 0) + 24;
    char *s = cm_arena_alloc(in->a, n);
    if (key) snprintf(s, n, "%s%s%s", path, *path ? "." : "", key);
    else snprintf(s, n, "%s[%ld]", path, idx);
    return s;
}

static int cm__map_key_in(const ProtobufCFieldDescriptor *kf, const char *k, void *p, cm__in_t *in, const char *path) {
    if (kf->type == PROTOBUF_C_TYPE_STRING) {
        *(char **)p = cm_arena_strdup(in->a, k);
        return 0;
    }
    if (kf->type == PROTOBUF_C_TYPE_BOOL) {
        if (strcmp(k, "true") && strcmp(k, "false")) return cm__fail(in, path, "map key must be true or false");
        *(protobuf_c_boolean *)p = strcmp(k, "true") == 0;
        return 0;
    }
    json_t *s = json_string(k);
    int rc = cm__value_in(kf, s, p, in, path, 0);
    json_decref(s);
    return rc;
}

/* Sets field f of m from v; repeated fields take arrays (maps: objects), replacing what was there. */
/* 1 (err set) when another member of f's oneof is set in m. */
static int cm__oneof_taken(const ProtobufCFieldDescriptor *f, const ProtobufCMessage *m, cm__in_t *in, const char *path) {
    uint32_t c = *(const uint32_t *)CM__CAT(m, f->quantifier_offset);
    if (!c || c == f->id) return 0;
    for (unsigned i = 0; i < m->descriptor->n_fields; i++)
        if (m->descriptor->fields[i].id == c)
            cm__fail(in, path, "only one of a set of alternatives may be given; %s is set already", m->descriptor->fields[i].name);
    return 1;
}

static int cm__field_in(const ProtobufCFieldDescriptor *f, const json_t *v, ProtobufCMessage *m, cm__in_t *in,
                        const char *path, int depth) {
    void *p = CM__AT(m, f->offset);
    if (json_is_null(v) && f->type != PROTOBUF_C_TYPE_MESSAGE) return 0; /* null: the default */
    if (json_is_null(v) && f->descriptor != &google__protobuf__value__descriptor) return 0;
    if (f->label != PROTOBUF_C_LABEL_REPEATED) {
        if (f->flags & PROTOBUF_C_FIELD_FLAG_ONEOF) {
            uint32_t *c = CM__AT(m, f->quantifier_offset);
            if (cm__oneof_taken(f, m, in, path)) return CM_EINVAL;
            int rc = cm__value_in(f, v, p, in, path, depth);
            if (rc == 0) *c = f->id;
            return rc;
        }
        int rc = cm__value_in(f, v, p, in, path, depth);
        if (rc == 0 && f->label == PROTOBUF_C_LABEL_OPTIONAL && f->quantifier_offset && f->type != PROTOBUF_C_TYPE_STRING &&
            f->type != PROTOBUF_C_TYPE_MESSAGE)
            *(protobuf_c_boolean *)CM__AT(m, f->quantifier_offset) = 1;
        return rc;
    }
    size_t *count = CM__AT(m, f->quantifier_offset);
    size_t es = cm__elem_size(f->type);
    if (cm_pbjson_is_map(f)) {
        if (!json_is_object(v)) return cm__fail(in, path, "expected an object (a map)");
        const ProtobufCMessageDescriptor *ed = f->descriptor;
        ProtobufCMessage **arr = cm_arena_alloc(in->a, (json_object_size(v) + 1) * sizeof *arr);
        size_t n = 0;
        const char *k;
        json_t *ev;
        json_object_foreach((json_t *)v, k, ev) {
            ProtobufCMessage *e = cm_arena_alloc(in->a, ed->sizeof_message);
            ed->message_init(e);
            const char *sp = cm__subpath(in, path, k, 0);
            int rc = cm__map_key_in(&ed->fields[0], k, CM__AT(e, ed->fields[0].offset), in, sp);
            if (!rc && json_is_null(ev)) rc = cm__fail(in, sp, "map values cannot be null");
            if (!rc) rc = cm__value_in(&ed->fields[1], ev, CM__AT(e, ed->fields[1].offset), in, sp, depth + 1);
            if (rc) return rc;
            arr[n++] = e;
        }
        *(ProtobufCMessage ***)p = arr;
        *count = n;
        return 0;
    }
    if (!json_is_array(v)) return cm__fail(in, path, "expected an array");
    size_t n = json_array_size(v);
    char *arr = cm_arena_alloc(in->a, (n + 1) * es);
    memset(arr, 0, (n + 1) * es);
    for (size_t k = 0; k < n; k++) {
        const json_t *ev = json_array_get(v, k);
        const char *sp = cm__subpath(in, path, NULL, (long)k);
        if (json_is_null(ev)) return cm__fail(in, sp, "array elements cannot be null");
        int rc = cm__value_in(f, ev, arr + k * es, in, sp, depth + 1);
        if (rc) return rc;
    }
    *(void **)p = arr;
    *count = n;
    return 0;
}

static int cm__msg_in(const json_t *j, ProtobufCMessage *m, cm__in_t *in, const char *path, int depth) {
    const ProtobufCMessageDescriptor *d = m->descriptor;
    if (!json_is_object(j)) return cm__fail(in, path, "expected an object (%s)", d->name);
    const char *k;
    json_t *v;
    json_object_foreach((json_t *)j, k, v) {
        const ProtobufCFieldDescriptor *f = cm_pbjson_field(d, k);
        if (!f) return cm__fail(in, path, "unknown field \"%s\" in %s", k, d->name);
        int rc = cm__field_in(f, v, m, in, cm__subpath(in, path, k, 0), depth);
        if (rc) return rc;
    }
    return 0;
}

int cm_pbjson_merge(const json_t *j, ProtobufCMessage *m, cm_arena_t *a, char *err, size_t cap) {
    cm__in_t in = {a, err, cap};
    if (cap) err[0] = 0;
    return cm__msg_in(j, m, &in, "", 1);
}

int cm_pbjson_to_msg(const json_t *j, const ProtobufCMessageDescriptor *d, cm_arena_t *a, ProtobufCMessage **out,
                     char *err, size_t cap) {
    ProtobufCMessage *m = cm_arena_alloc(a, d->sizeof_message);
    d->message_init(m);
    *out = NULL;
    int rc = cm_pbjson_merge(j, m, a, err, cap);
    if (rc == 0) *out = m;
    return rc;
}

int cm_pbjson_set(ProtobufCMessage *m, const char *path, const char *text, cm_arena_t *a, char *err, size_t cap) {
    cm__in_t in = {a, err, cap};
    if (cap) err[0] = 0;
    char name[128];
    const char *p = path;
    for (;;) {
        const char *dot = strchr(p, '.');
        size_t len = dot ? (size_t)(dot - p) : strlen(p);
        if (len == 0 || len >= sizeof name) return cm__fail(&in, path, "not a field path");
        memcpy(name, p, len);
        name[len] = 0;
        const ProtobufCFieldDescriptor *f = cm_pbjson_field(m->descriptor, name);
        if (!f) return cm__fail(&in, path, "unknown field \"%s\" in %s", name, m->descriptor->name);
        int wkt = f->type == PROTOBUF_C_TYPE_MESSAGE && (f->descriptor == &google__protobuf__timestamp__descriptor ||
                                                          f->descriptor == &google__protobuf__field_mask__descriptor);
        if (dot) { /* descend into (or create) the sub-message */
            if (f->type != PROTOBUF_C_TYPE_MESSAGE || f->label == PROTOBUF_C_LABEL_REPEATED || wkt)
                return cm__fail(&in, path, "%s has no fields", name);
            ProtobufCMessage **sub = CM__AT(m, f->offset);
            int fresh = !*sub;
            if (f->flags & PROTOBUF_C_FIELD_FLAG_ONEOF) { /* members share storage: the case tells */
                uint32_t *c = CM__AT(m, f->quantifier_offset);
                if (cm__oneof_taken(f, m, &in, path)) return CM_EINVAL;
                fresh = *c != f->id;
                *c = f->id;
            }
            if (fresh) {
                *sub = cm_arena_alloc(a, ((const ProtobufCMessageDescriptor *)f->descriptor)->sizeof_message);
                ((const ProtobufCMessageDescriptor *)f->descriptor)->message_init(*sub);
            }
            m = *sub;
            p = dot + 1;
            continue;
        }
        if (f->type == PROTOBUF_C_TYPE_MESSAGE && !wkt) return cm__fail(&in, path, "cannot be given as text");
        json_t *v;
        if (f->type == PROTOBUF_C_TYPE_BOOL) {
            if (strcmp(text, "true") && strcmp(text, "false")) return cm__fail(&in, path, "expected true or false");
            v = json_boolean(strcmp(text, "true") == 0);
        } else {
            v = json_string(text);
            if (!v) return cm__fail(&in, path, "not valid UTF-8");
        }
        int rc;
        if (f->label == PROTOBUF_C_LABEL_REPEATED) { /* append */
            size_t *count = CM__AT(m, f->quantifier_offset), es = cm__elem_size(f->type);
            char *arr = cm_arena_alloc(a, (*count + 2) * es);
            memset(arr, 0, (*count + 2) * es);
            if (*count) memcpy(arr, *(void **)CM__AT(m, f->offset), *count * es);
            rc = cm__value_in(f, v, arr + *count * es, &in, path, 1);
            if (rc == 0) {
                *(void **)CM__AT(m, f->offset) = arr;
                (*count)++;
            }
        } else {
            rc = cm__field_in(f, v, m, &in, path, 1);
        }
        json_decref(v);
        return rc;
    }
}
