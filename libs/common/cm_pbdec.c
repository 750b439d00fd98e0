/* A fast protobuf decoder that fills protobuf-c's generated structs from their descriptors.
 *
 * Why: protobuf_c_message_unpack() is general (scanned-member slabs, required-field bitmaps, merge
 * logic) and was half of a server's CPU on telemetry batches. Requests are decoded into a call
 * arena anyway, so this decoder makes two tight passes per message — count repeated elements, then
 * fill — with every allocation from the arena.
 *
 * Scope: proto3 as the suite writes it. Anything else — proto2 required fields, groups, a singular
 * sub-message that appears twice (which protobuf merges) — returns CM__PB_FALLBACK and the caller
 * uses protobuf-c, so semantics never differ silently. Unknown fields are skipped (protobuf-c keeps
 * them; servers never re-serialise a request). Malformed input returns CM__PB_BAD. Nesting deeper
 * than CM__PB_MAX_DEPTH is malformed (protects the stack from hostile input), and so is field
 * number 0.
 *
 * Requests (cm__pb_decode_request) are also held to proto3's rule for strings: UTF-8, and here
 * without NUL bytes too. protobuf-c checks neither, and a C string cannot carry a NUL: without the
 * check "a\0b" arrived as "a", so a request naming device "a\0b" read, changed or deleted device
 * "a", and invalid UTF-8 reached Postgres, which refused it as an internal error. The failure names
 * the field ("device.metadata[2].value"), so the caller can answer INVALID_ARGUMENT with it. When
 * the message is left to protobuf-c, its strings are checked first by a walk over the same bytes.
 *
 * Memory: everything comes from the arena; nothing is freed individually. */
#include "cm_pbdec.h"

#include <stdio.h>
#include <string.h>

/* Deep enough for the deepest google.protobuf.Struct the JSON side accepts: CM_JSON_MAX_DEPTH (32)
 * objects are three messages each (Struct, its map entry, Value), about 100 in all. At 64, a
 * shadow patch the gateway accepted was refused by device-mgmt as malformed (found by
 * tests/fuzz/fuzz_rest.c). Each level costs well under 2 KiB of stack. */
#define CM__PB_MAX_DEPTH 128

/* How to decode, and where a refused string's field path goes. */
typedef struct cm__pbopt_s {
    int alias;  /* bytes fields point into the input instead of copies */
    int strict; /* strings must be UTF-8 without NUL (CM__PB_BAD_STRING otherwise) */
    char *why;  /* strict: the field path of a refused string, then ": " and the reason */
    size_t cap;
} cm__pbopt_t;

typedef struct cm__pbin_s {
    const uint8_t *p, *end;
    const cm__pbopt_t *o;
} cm__pbin_t;

#define CM__PB_HOT static inline __attribute__((always_inline))

CM__PB_HOT int cm__pb_varint(cm__pbin_t *in, uint64_t *out) {
    const uint8_t *p = in->p;
    if (p < in->end && *p < 0x80) { /* tags and small values: one byte */
        *out = *p;
        in->p = p + 1;
        return 0;
    }
    uint64_t v = 0;
    for (int shift = 0; shift < 64; shift += 7) {
        if (p == in->end) return -1;
        uint8_t b = *p++;
        v |= (uint64_t)(b & 0x7f) << shift;
        if (!(b & 0x80)) {
            in->p = p;
            *out = v;
            return 0;
        }
    }
    return -1; /* more than 10 bytes */
}

/* A key or a length: at most 5 bytes, which is all protobuf-c reads for them. A longer (zero
 * padded) encoding is refused there, so it is here: a request must not be accepted or refused
 * depending on which of the two decoders it falls to (found by tests/fuzz/fuzz_proto.c). */
CM__PB_HOT int cm__pb_varint5(cm__pbin_t *in, uint64_t *out) {
    const uint8_t *p = in->p;
    uint64_t v = 0;
    for (int shift = 0; shift < 35; shift += 7) {
        if (p == in->end) return -1;
        uint8_t b = *p++;
        v |= (uint64_t)(b & 0x7f) << shift;
        if (!(b & 0x80)) {
            in->p = p;
            *out = v;
            return 0;
        }
    }
    return -1;
}

/* Skips one field's payload of the given wire type. */
CM__PB_HOT int cm__pb_skip(cm__pbin_t *in, unsigned wt) {
    uint64_t v;
    switch (wt) {
    case 0: return cm__pb_varint(in, &v);
    case 1:
        if (in->end - in->p < 8) return -1;
        in->p += 8;
        return 0;
    case 2:
        if (cm__pb_varint5(in, &v) || v > (uint64_t)(in->end - in->p)) return -1;
        in->p += v;
        return 0;
    case 5:
        if (in->end - in->p < 4) return -1;
        in->p += 4;
        return 0;
    default: return -2; /* groups (3, 4) and invalid types */
    }
}

CM__PB_HOT const ProtobufCFieldDescriptor *cm__pb_field(const ProtobufCMessageDescriptor *d, uint32_t id) {
    /* Generated descriptors list fields in tag order; most messages number them 1..n. */
    if (id - 1 < d->n_fields && d->fields[id - 1].id == id) return &d->fields[id - 1];
    unsigned lo = 0, hi = d->n_fields;
    while (lo < hi) {
        unsigned mid = (lo + hi) / 2;
        if (d->fields[mid].id < id)
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo < d->n_fields && d->fields[lo].id == id ? &d->fields[lo] : NULL;
}

CM__PB_HOT int cm__pb_wire_type(ProtobufCType t) {
    switch (t) {
    case PROTOBUF_C_TYPE_SFIXED64:
    case PROTOBUF_C_TYPE_FIXED64:
    case PROTOBUF_C_TYPE_DOUBLE: return 1;
    case PROTOBUF_C_TYPE_SFIXED32:
    case PROTOBUF_C_TYPE_FIXED32:
    case PROTOBUF_C_TYPE_FLOAT: return 5;
    case PROTOBUF_C_TYPE_STRING:
    case PROTOBUF_C_TYPE_BYTES:
    case PROTOBUF_C_TYPE_MESSAGE: return 2;
    default: return 0;
    }
}

CM__PB_HOT size_t cm__pb_elem_size(ProtobufCType t) {
    switch (t) {
    case PROTOBUF_C_TYPE_SINT64:
    case PROTOBUF_C_TYPE_INT64:
    case PROTOBUF_C_TYPE_UINT64:
    case PROTOBUF_C_TYPE_SFIXED64:
    case PROTOBUF_C_TYPE_FIXED64:
    case PROTOBUF_C_TYPE_DOUBLE: return 8;
    case PROTOBUF_C_TYPE_STRING:
    case PROTOBUF_C_TYPE_MESSAGE: return sizeof(void *);
    case PROTOBUF_C_TYPE_BYTES: return sizeof(ProtobufCBinaryData);
    case PROTOBUF_C_TYPE_BOOL: return sizeof(protobuf_c_boolean);
    default: return 4; /* int32 kinds, enums */
    }
}

/* Decodes one scalar of type t from in into dst (which has cm__pb_elem_size(t) bytes). */
CM__PB_HOT int cm__pb_scalar(cm__pbin_t *in, ProtobufCType t, void *dst) {
    uint64_t v;
    switch (cm__pb_wire_type(t)) {
    case 1:
        if (in->end - in->p < 8) return -1;
        memcpy(dst, in->p, 8); /* little-endian host, as protobuf-c itself assumes on x86/arm */
        in->p += 8;
        return 0;
    case 5:
        if (in->end - in->p < 4) return -1;
        memcpy(dst, in->p, 4);
        in->p += 4;
        return 0;
    default:
        break;
    }
    if (cm__pb_varint(in, &v)) return -1;
    switch (t) {
    case PROTOBUF_C_TYPE_INT32:
    case PROTOBUF_C_TYPE_UINT32:
    case PROTOBUF_C_TYPE_ENUM: {
        uint32_t u = (uint32_t)v;
        memcpy(dst, &u, 4);
        break;
    }
    case PROTOBUF_C_TYPE_SINT32: {
        uint32_t u = (uint32_t)v;
        int32_t s = (int32_t)((u >> 1) ^ (~(u & 1) + 1));
        memcpy(dst, &s, 4);
        break;
    }
    case PROTOBUF_C_TYPE_SINT64: {
        int64_t s = (int64_t)((v >> 1) ^ (~(v & 1) + 1));
        memcpy(dst, &s, 8);
        break;
    }
    case PROTOBUF_C_TYPE_BOOL: {
        protobuf_c_boolean b = v != 0;
        memcpy(dst, &b, sizeof b);
        break;
    }
    default: /* INT64, UINT64 */
        memcpy(dst, &v, 8);
    }
    return 0;
}

static int cm__pb_message(const ProtobufCMessageDescriptor *d, cm_arena_t *a, const uint8_t *p, size_t n, int depth,
                          const cm__pbopt_t *o, ProtobufCMessage **out);

/* NULL when p[0..n) is well-formed UTF-8 (RFC 3629: no overlong forms, no surrogates, nothing
 * above U+10FFFF) without NUL; else what is wrong with it. */
CM__PB_HOT const char *cm__pb_text_error(const uint8_t *p, size_t n) {
    const uint8_t *end = p + n;
    /* Whole words while they are ASCII without NUL (metric names, ids: nearly every string): a
     * byte of 0 sets its top bit in w - 0x01..01, a byte of 0x80 or more in w. The last word
     * overlaps the one before rather than going byte by byte; anything flagged takes the exact
     * byte loop below. */
    if (n >= 8) {
        uint64_t w;
        for (; end - p > 8; p += 8) {
            memcpy(&w, p, 8);
            if (((w - 0x0101010101010101ULL) | w) & 0x8080808080808080ULL) goto exact;
        }
        memcpy(&w, end - 8, 8);
        if (!(((w - 0x0101010101010101ULL) | w) & 0x8080808080808080ULL)) return NULL;
    } else if (n >= 4) {
        uint32_t a, b;
        memcpy(&a, p, 4);
        memcpy(&b, end - 4, 4);
        if (!((((a - 0x01010101U) | a) | ((b - 0x01010101U) | b)) & 0x80808080U)) return NULL;
    }
exact:
    while (p < end) {
        uint8_t c = *p;
        if (c && c < 0x80) { /* ASCII, the common case */
            p++;
            continue;
        }
        if (!c) return "holds a NUL byte";
        uint32_t cp;
        size_t len;
        if (c >= 0xc2 && c <= 0xdf) len = 2, cp = c & 0x1f;
        else if (c >= 0xe0 && c <= 0xef) len = 3, cp = c & 0x0f;
        else if (c >= 0xf0 && c <= 0xf4) len = 4, cp = c & 0x07;
        else return "is not valid UTF-8";
        if ((size_t)(end - p) < len) return "is not valid UTF-8";
        for (size_t i = 1; i < len; i++) {
            if ((p[i] & 0xc0) != 0x80) return "is not valid UTF-8";
            cp = cp << 6 | (p[i] & 0x3f);
        }
        if ((len == 3 && (cp < 0x800 || (cp >= 0xd800 && cp <= 0xdfff))) || (len == 4 && (cp < 0x10000 || cp > 0x10ffff)))
            return "is not valid UTF-8";
        p += len;
    }
    return NULL;
}

/* A refused string one level up: prefixes o->why with field f ("name", "points[3]", then a dot
 * before what the level below wrote). idx < 0 for a field that is not repeated. */
static void cm__pb_prefix(const cm__pbopt_t *o, const ProtobufCFieldDescriptor *f, long idx) {
    char head[96];
    int k = idx < 0 ? snprintf(head, sizeof head, "%s", f->name) : snprintf(head, sizeof head, "%s[%ld]", f->name, idx);
    if (k < 0 || (size_t)k >= sizeof head) return;
    size_t have = strlen(o->why);
    int sub = o->why[0] != ':'; /* the level below named a field: "field.sub" rather than "field: ..." */
    size_t add = (size_t)k + (size_t)sub;
    if (have + add + 1 > o->cap) return; /* keep what fits: the innermost part */
    memmove(o->why + add, o->why, have + 1);
    memcpy(o->why, head, (size_t)k);
    if (sub) o->why[k] = '.';
}

/* A string's bytes under the strict rule: 0, or CM__PB_BAD_STRING with the reason in o->why (the
 * callers prefix the field path). */
CM__PB_HOT int cm__pb_text_or_fail(const cm__pbopt_t *o, const uint8_t *v, size_t len) {
    if (!o->strict) return 0;
    const char *e = cm__pb_text_error(v, len);
    if (!e) return 0;
    snprintf(o->why, o->cap, ": %s", e);
    return CM__PB_BAD_STRING;
}

/* Reads the next key: its wire type, and the field it names in d (NULL for an unknown field). */
CM__PB_HOT int cm__pb_key(cm__pbin_t *in, const ProtobufCMessageDescriptor *d, unsigned *wt,
                          const ProtobufCFieldDescriptor **f) {
    uint64_t key;
    if (cm__pb_varint5(in, &key)) return CM__PB_BAD;
    /* Field number 0 and keys beyond 32 bits are malformed, not unknown fields: protobuf-c and
     * Google's parsers refuse them, and so must a server (found by tests/fuzz/fuzz_proto.c). */
    if (key >> 3 == 0 || key > UINT32_MAX) return CM__PB_BAD;
    *wt = (unsigned)(key & 7);
    *f = cm__pb_field(d, (uint32_t)(key >> 3));
    return 0;
}

/* Decodes a length-delimited value (string, bytes, message) of field f into dst. */
static int cm__pb_delimited(const ProtobufCFieldDescriptor *f, cm_arena_t *a, cm__pbin_t *in, void *dst, int depth) {
    uint64_t len;
    if (cm__pb_varint5(in, &len) || len > (uint64_t)(in->end - in->p)) return CM__PB_BAD;
    const uint8_t *v = in->p;
    in->p += len;
    switch (f->type) {
    case PROTOBUF_C_TYPE_STRING: {
        int rc = cm__pb_text_or_fail(in->o, v, (size_t)len);
        if (rc) return rc;
        char *s = cm_arena_strndup(a, (const char *)v, (size_t)len);
        memcpy(dst, &s, sizeof s);
        return 0;
    }
    case PROTOBUF_C_TYPE_BYTES: {
        ProtobufCBinaryData b = {(size_t)len, NULL};
        if (len && in->o->alias) {
            b.data = (uint8_t *)v;
        } else if (len) {
            b.data = cm_arena_alloc(a, (size_t)len);
            memcpy(b.data, v, (size_t)len);
        }
        memcpy(dst, &b, sizeof b);
        return 0;
    }
    default: { /* MESSAGE */
        ProtobufCMessage *m;
        int rc = cm__pb_message(f->descriptor, a, v, (size_t)len, depth + 1, in->o, &m);
        if (rc) return rc;
        memcpy(dst, &m, sizeof m);
        return 0;
    }
    }
}

/* Number of scalars in a packed payload of type t; -1 if it does not divide evenly. */
static long cm__pb_packed_count(ProtobufCType t, const uint8_t *p, size_t len) {
    int wt = cm__pb_wire_type(t);
    if (wt == 1) return len % 8 ? -1 : (long)(len / 8);
    if (wt == 5) return len % 4 ? -1 : (long)(len / 4);
    long n = 0;
    for (size_t i = 0; i < len; i++) n += !(p[i] & 0x80);
    return len && (p[len - 1] & 0x80) ? -1 : n;
}

static int cm__pb_message(const ProtobufCMessageDescriptor *d, cm_arena_t *a, const uint8_t *p, size_t n, int depth,
                          const cm__pbopt_t *o, ProtobufCMessage **out) {
    if (depth > CM__PB_MAX_DEPTH) return CM__PB_BAD;
    ProtobufCMessage *m = cm_arena_alloc(a, d->sizeof_message);
    d->message_init(m);
    char *base = (char *)m;

    /* Pass 1: count the elements of repeated fields, so that each array is allocated once. */
    size_t counts_small[32];
    size_t *counts = d->n_fields <= 32 ? counts_small : cm_arena_alloc(a, d->n_fields * sizeof *counts);
    memset(counts, 0, d->n_fields * sizeof *counts);
    int any_repeated = 0;
    for (unsigned i = 0; i < d->n_fields; i++) {
        if (d->fields[i].label == PROTOBUF_C_LABEL_REQUIRED) return CM__PB_FALLBACK;
        any_repeated |= d->fields[i].label == PROTOBUF_C_LABEL_REPEATED;
    }
    cm__pbin_t in = {p, p + n, o};
    if (any_repeated) {
        while (in.p < in.end) {
            unsigned wt;
            const ProtobufCFieldDescriptor *f;
            if (cm__pb_key(&in, d, &wt, &f)) return CM__PB_BAD;
            const uint8_t *payload = in.p;
            int rc = cm__pb_skip(&in, wt); /* CM__PB_BAD, or CM__PB_FALLBACK for groups */
            if (rc) return rc;
            if (!f || f->label != PROTOBUF_C_LABEL_REPEATED) continue;
            size_t idx = (size_t)(f - d->fields);
            if (wt == 2 && cm__pb_wire_type(f->type) != 2) { /* packed scalars */
                cm__pbin_t pl = {payload, in.p, NULL};
                uint64_t len = 0;
                cm__pb_varint5(&pl, &len); /* cannot fail: cm__pb_skip read it already */
                long c = cm__pb_packed_count(f->type, pl.p, (size_t)len);
                if (c < 0) return CM__PB_BAD;
                counts[idx] += (size_t)c;
            } else if ((int)wt == cm__pb_wire_type(f->type)) {
                counts[idx]++;
            } else {
                return CM__PB_BAD;
            }
        }
        for (unsigned i = 0; i < d->n_fields; i++) {
            if (!counts[i]) continue;
            void *arr = cm_arena_alloc(a, counts[i] * cm__pb_elem_size(d->fields[i].type));
            memcpy(base + d->fields[i].offset, &arr, sizeof arr);
        }
    }

    /* Pass 2: decode. `counts` now tracks how many elements each repeated field has so far. */
    size_t filled_small[32];
    size_t *filled = d->n_fields <= 32 ? filled_small : cm_arena_alloc(a, d->n_fields * sizeof *filled);
    memset(filled, 0, d->n_fields * sizeof *filled);
    in.p = p;
    while (in.p < in.end) {
        unsigned wt;
        const ProtobufCFieldDescriptor *f;
        if (cm__pb_key(&in, d, &wt, &f)) return CM__PB_BAD;
        if (!f) { /* unknown field: skipped */
            int rc = cm__pb_skip(&in, wt);
            if (rc) return rc;
            continue;
        }
        size_t idx = (size_t)(f - d->fields);
        int expect = cm__pb_wire_type(f->type);
        if (f->label == PROTOBUF_C_LABEL_REPEATED) {
            char *arr;
            memcpy(&arr, base + f->offset, sizeof arr);
            size_t es = cm__pb_elem_size(f->type);
            if (wt == 2 && expect != 2) { /* packed */
                uint64_t len;
                if (cm__pb_varint5(&in, &len) || len > (uint64_t)(in.end - in.p)) return CM__PB_BAD;
                cm__pbin_t pl = {in.p, in.p + len, NULL};
                in.p += len;
                while (pl.p < pl.end) {
                    if (filled[idx] >= counts[idx] || cm__pb_scalar(&pl, f->type, arr + filled[idx] * es)) return CM__PB_BAD;
                    filled[idx]++;
                }
            } else {
                if ((int)wt != expect || filled[idx] >= counts[idx]) return CM__PB_BAD;
                int rc = expect == 2 ? cm__pb_delimited(f, a, &in, arr + filled[idx] * es, depth)
                                     : cm__pb_scalar(&in, f->type, arr + filled[idx] * es);
                if (rc == CM__PB_BAD_STRING) cm__pb_prefix(o, f, (long)filled[idx]);
                if (rc) return rc;
                filled[idx]++;
            }
            memcpy(base + f->quantifier_offset, &filled[idx], sizeof(size_t));
            continue;
        }
        if ((int)wt != expect) return CM__PB_BAD;
        if (f->type == PROTOBUF_C_TYPE_MESSAGE) {
            void *prev;
            memcpy(&prev, base + f->offset, sizeof prev);
            /* A second occurrence must be merged into the first: protobuf-c knows how. */
            uint32_t which = 0;
            if (f->flags & PROTOBUF_C_FIELD_FLAG_ONEOF) memcpy(&which, base + f->quantifier_offset, sizeof which);
            if (prev && (!(f->flags & PROTOBUF_C_FIELD_FLAG_ONEOF) || which == f->id)) return CM__PB_FALLBACK;
        }
        if (f->flags & PROTOBUF_C_FIELD_FLAG_ONEOF) {
            /* The last member seen wins; members share the union's storage. */
            uint32_t which = f->id;
            memcpy(base + f->quantifier_offset, &which, sizeof which);
        } else if (f->label == PROTOBUF_C_LABEL_OPTIONAL && f->type != PROTOBUF_C_TYPE_STRING &&
                   f->type != PROTOBUF_C_TYPE_MESSAGE) {
            protobuf_c_boolean has = 1;
            memcpy(base + f->quantifier_offset, &has, sizeof has);
        }
        int rc = expect == 2 ? cm__pb_delimited(f, a, &in, base + f->offset, depth)
                             : cm__pb_scalar(&in, f->type, base + f->offset);
        if (rc == CM__PB_BAD_STRING) cm__pb_prefix(o, f, -1);
        if (rc) return rc;
    }
    *out = m;
    return 0;
}

/* The strict rule over a message left to protobuf-c: walks the bytes and checks every string
 * field, at any depth, however often it occurs. 0 when nothing is refused (protobuf-c judges the
 * rest), or CM__PB_BAD_STRING with the field in o->why. */
static int cm__pb_check_strings(const ProtobufCMessageDescriptor *d, const uint8_t *p, size_t n, int depth,
                                const cm__pbopt_t *o) {
    if (depth > CM__PB_MAX_DEPTH) return 0;
    cm__pbin_t in = {p, p + n, o};
    long seen[64] = {0}; /* occurrences of the first 64 fields so far, for the index in the path */
    while (in.p < in.end) {
        unsigned wt;
        const ProtobufCFieldDescriptor *f;
        if (cm__pb_key(&in, d, &wt, &f)) return 0;
        const uint8_t *payload = in.p;
        if (cm__pb_skip(&in, wt)) return 0;
        if (!f || wt != 2 || (f->type != PROTOBUF_C_TYPE_STRING && f->type != PROTOBUF_C_TYPE_MESSAGE)) continue;
        size_t fi = (size_t)(f - d->fields);
        long idx = f->label == PROTOBUF_C_LABEL_REPEATED ? (fi < 64 ? seen[fi]++ : 0) : -1;
        cm__pbin_t pl = {payload, in.p, o};
        uint64_t len = 0;
        cm__pb_varint(&pl, &len); /* cannot fail: cm__pb_skip read it already */
        int rc = f->type == PROTOBUF_C_TYPE_STRING ? cm__pb_text_or_fail(o, pl.p, (size_t)len)
                                                   : cm__pb_check_strings(f->descriptor, pl.p, (size_t)len, depth + 1, o);
        if (rc) {
            cm__pb_prefix(o, f, idx);
            return rc;
        }
    }
    return 0;
}

int cm__pb_decode(const ProtobufCMessageDescriptor *d, cm_arena_t *a, const uint8_t *p, size_t n, ProtobufCMessage **out) {
    cm__pbopt_t o = {0, 0, NULL, 0};
    *out = NULL;
    return cm__pb_message(d, a, p, n, 0, &o, out);
}

int cm__pb_decode_alias(const ProtobufCMessageDescriptor *d, cm_arena_t *a, const uint8_t *p, size_t n,
                        ProtobufCMessage **out) {
    cm__pbopt_t o = {1, 0, NULL, 0};
    *out = NULL;
    return cm__pb_message(d, a, p, n, 0, &o, out);
}

int cm__pb_decode_request(const ProtobufCMessageDescriptor *d, cm_arena_t *a, const uint8_t *p, size_t n,
                          ProtobufCMessage **out, char *why, size_t cap) {
    char none[1];
    cm__pbopt_t o = {0, 1, cap ? why : none, cap ? cap : sizeof none};
    o.why[0] = 0;
    *out = NULL;
    int rc = cm__pb_message(d, a, p, n, 0, &o, out);
    if (rc == CM__PB_FALLBACK) {
        int bad = cm__pb_check_strings(d, p, n, 0, &o);
        if (bad) rc = bad;
    }
    return rc;
}

ProtobufCMessage *cm__pb_decode_server(const ProtobufCMessageDescriptor *d, cm_arena_t *a, const uint8_t *p, size_t n,
                                       char *why, size_t cap) {
    char none[1];
    if (!cap) {
        why = none;
        cap = sizeof none;
    }
    ProtobufCMessage *m = NULL;
    int rc = cm__pb_decode_request(d, a, p, n, &m, why, cap);
    if (rc == CM__PB_FALLBACK) m = protobuf_c_message_unpack(d, &a->pb, n, p);
    else if (rc) m = NULL;
    if (rc != CM__PB_BAD_STRING) why[0] = 0;
    return m;
}
