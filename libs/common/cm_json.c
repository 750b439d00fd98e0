/* The one wrapper over jansson (see cm_json.h): parsing with positions, canonical dumps, the
 * google.protobuf.Struct mapping, RFC 7396 merge patches and the shadow delta.
 *
 * Depth: the nesting depth of a document is the number of objects and arrays on its deepest path,
 * and at least 1 (a scalar is 1, [1] is 1, [[1]] is 2), so CM_JSON_MAX_DEPTH counts brackets.
 *
 * Ownership: see cm_json.h. Internally, the recursive helpers either hand back a new reference or
 * attach what they built to a parent before they can fail, so one json_decref() or
 * protobuf_c_message_free_unpacked() at the top releases a half-built result. */
#include "cm_json.h"
#include "cm_alloc.h"
#include "cm_err.h"

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Doubles at or beyond 2^53 are not all integers a reader can trust, so they stay reals. */
#define CM__JSON_EXACT_INT 9007199254740992.0

/* Caller-built documents are not depth-checked before dumping; this bound only keeps the
 * real-number walk off a cycle (jansson's dump itself then reports the cycle). It matches
 * jansson's own parser limit. */
#define CM__JSON_WALK_MAX 2048

/* ---- parsing ----------------------------------------------------------------------------- */

static void cm__json_err(char *err, size_t err_cap, int line, int column, size_t byte, const char *msg) {
    if (!err || err_cap == 0) return;
    snprintf(err, err_cap, "line %d, column %d (byte %zu): %s", line, column, byte, msg);
}

/* Finds the bracket that takes valid JSON text beyond CM_JSON_MAX_DEPTH. Returns 0 if none, else
 * 1 with its line, column (1-based, in characters, like jansson's) and byte offset (0-based). Only
 * run on text jansson accepted, so strings are well formed and escapes are two bytes or \u and four hex digits. */
static int cm__json_too_deep(const char *text, size_t len, int *line, int *column, size_t *byte) {
    int depth = 0, in_string = 0, ln = 1, col = 0;
    for (size_t i = 0; i < len; i++) {
        unsigned char c = (unsigned char)text[i];
        if (c == '\n') {
            ln++;
            col = 0;
            continue;
        }
        if ((c & 0xC0) != 0x80) col++; /* continuation bytes belong to the previous character */
        if (in_string) {
            if (c == '\\') {
                i++; /* the escaped byte is ASCII and cannot be a newline (jansson checked) */
                col++;
            } else if (c == '"') {
                in_string = 0;
            }
        } else if (c == '"') {
            in_string = 1;
        } else if (c == '{' || c == '[') {
            if (++depth > CM_JSON_MAX_DEPTH) {
                *line = ln;
                *column = col;
                *byte = i;
                return 1;
            }
        } else if (c == '}' || c == ']') {
            depth--;
        }
    }
    return 0;
}

json_t *cm_json_parse(const char *text, size_t len, char *err, size_t err_cap) {
    if (err && err_cap) err[0] = '\0';
    if (!text) {
        if (len) {
            cm__json_err(err, err_cap, 1, 0, 0, "no text");
            return NULL;
        }
        text = "";
    }
    /* JSON_DECODE_ANY: RFC 8259 allows any value at the top (a merge patch may be a scalar).
     * NUL bytes need no flag: without JSON_ALLOW_NUL jansson refuses both raw NULs and \u0000,
     * and its end-of-input check rejects a NUL after the value. */
    json_error_t je;
    json_t *j = json_loadb(text, len, JSON_REJECT_DUPLICATES | JSON_DECODE_ANY, &je);
    if (!j) {
        /* jansson's position counts the bytes it consumed, the offending one included; report
         * the offset of that byte, so that column 7 on line 1 is byte 6. */
        size_t byte = je.position > 0 ? (size_t)je.position - 1 : 0;
        cm__json_err(err, err_cap, je.line, je.column, byte, je.text);
        return NULL;
    }
    int line, column;
    size_t byte;
    if (cm__json_too_deep(text, len, &line, &column, &byte)) {
        json_decref(j);
        char msg[64];
        snprintf(msg, sizeof msg, "nesting deeper than %d", CM_JSON_MAX_DEPTH);
        cm__json_err(err, err_cap, line, column, byte, msg);
        return NULL;
    }
    return j;
}

/* ---- dumping ----------------------------------------------------------------------------- */

typedef struct cm__json_buf_s {
    char *p;
    size_t len, cap;
} cm__json_buf_t;

static int cm__json_buf_add(const char *s, size_t n, void *data) {
    cm__json_buf_t *b = data;
    if (b->cap - b->len < n + 1) {
        size_t cap = b->cap ? b->cap : 256;
        while (cap - b->len < n + 1) cap *= 2;
        b->p = cm_realloc(b->p, cap);
        b->cap = cap;
    }
    memcpy(b->p + b->len, s, n);
    b->len += n;
    b->p[b->len] = '\0';
    return 0;
}

static int cm__json_real_digits(double x) {
    /* 15 significant digits print every double that came from a decimal of up to 15 digits
     * (DBL_DIG) as that decimal; 17 always read back exactly. */
    char buf[32];
    for (int p = 15; p < 17; p++) {
        snprintf(buf, sizeof buf, "%.*g", p, x);
        if (strtod(buf, NULL) == x) return p;
    }
    return 17;
}

/* The fewest digits that print every real in j exactly. Returns -1 past CM__JSON_WALK_MAX. */
static int cm__json_precision(const json_t *j, int depth) {
    if (depth > CM__JSON_WALK_MAX) return -1;
    int p = 15;
    if (json_is_real(j)) return cm__json_real_digits(json_real_value(j));
    if (json_is_array(j)) {
        for (size_t i = 0; i < json_array_size(j); i++) {
            int q = cm__json_precision(json_array_get(j, i), depth + 1);
            if (q < 0) return -1;
            if (q > p) p = q;
        }
    } else if (json_is_object(j)) {
        const char *k;
        json_t *v;
        /* json_object_foreach wants a mutable object; nothing here writes to it. */
        json_object_foreach((json_t *)j, k, v) {
            int q = cm__json_precision(v, depth + 1);
            if (q < 0) return -1;
            if (q > p) p = q;
        }
    }
    return p;
}

char *cm_json_dump(const json_t *j) {
    if (!j) return NULL;
    /* jansson prints reals with 17 digits by default, so 0.1 would read 0.10000000000000001.
     * One precision serves the whole document (the largest any of its reals needs): every real
     * still reads back exactly, typical documents print as written, and equal documents still
     * dump equal. */
    int precision = cm__json_precision(j, 1);
    if (precision < 0) return NULL;
    size_t flags = JSON_COMPACT | JSON_SORT_KEYS | JSON_ENCODE_ANY | JSON_REAL_PRECISION(precision);
    /* Dumping through a callback keeps the result cm_alloc memory whatever allocator jansson
     * was given. */
    cm__json_buf_t b = {NULL, 0, 0};
    if (json_dump_callback(j, cm__json_buf_add, &b, flags) != 0 || !b.p) {
        cm_free(b.p);
        return NULL;
    }
    return b.p;
}

/* ---- protobuf Struct / Value -> JSON ----------------------------------------------------- */

static json_t *cm__from_value(const Google__Protobuf__Value *v, int depth);

static json_t *cm__from_struct(const Google__Protobuf__Struct *s, int depth) {
    if (depth > CM_JSON_MAX_DEPTH) return NULL;
    json_t *o = json_object();
    if (!o || !s) return o;
    for (size_t i = 0; i < s->n_fields; i++) {
        const Google__Protobuf__Struct__FieldsEntry *e = s->fields[i];
        if (!e || !e->key) goto fail;
        json_t *v = cm__from_value(e->value, depth);
        /* A key repeated on the wire is a protobuf map entry written twice: the last one wins,
         * as in protobuf's own map semantics. */
        if (!v || json_object_set_new(o, e->key, v) != 0) goto fail;
    }
    return o;
fail:
    json_decref(o);
    return NULL;
}

static json_t *cm__from_list(const Google__Protobuf__ListValue *l, int depth) {
    if (depth > CM_JSON_MAX_DEPTH) return NULL;
    json_t *a = json_array();
    if (!a || !l) return a;
    for (size_t i = 0; i < l->n_values; i++) {
        json_t *v = cm__from_value(l->values[i], depth);
        if (!v || json_array_append_new(a, v) != 0) {
            json_decref(a);
            return NULL;
        }
    }
    return a;
}

static json_t *cm__from_number(double x) {
    if (!isfinite(x)) return NULL;
    if (x == trunc(x) && fabs(x) < CM__JSON_EXACT_INT) return json_integer((json_int_t)x);
    return json_real(x);
}

/* depth is the container depth of v's parent. */
static json_t *cm__from_value(const Google__Protobuf__Value *v, int depth) {
    /* proto: "Absence of any variant indicates an error", and there is no JSON for it. */
    if (!v) return NULL;
    switch (v->kind_case) {
    case GOOGLE__PROTOBUF__VALUE__KIND_NULL_VALUE:
        return json_null();
    case GOOGLE__PROTOBUF__VALUE__KIND_NUMBER_VALUE:
        return cm__from_number(v->number_value);
    case GOOGLE__PROTOBUF__VALUE__KIND_STRING_VALUE:
        /* json_string() refuses invalid UTF-8, which protobuf-c does not check on unpack. */
        return json_string(v->string_value ? v->string_value : "");
    case GOOGLE__PROTOBUF__VALUE__KIND_BOOL_VALUE:
        return json_boolean(v->bool_value);
    case GOOGLE__PROTOBUF__VALUE__KIND_STRUCT_VALUE:
        return cm__from_struct(v->struct_value, depth + 1);
    case GOOGLE__PROTOBUF__VALUE__KIND_LIST_VALUE:
        return cm__from_list(v->list_value, depth + 1);
    default:
        return NULL;
    }
}

json_t *cm_json_text(const char *s) {
    json_t *j = json_string(s);
    if (j) return j;
    size_t n = strlen(s);
    char *o = cm_malloc(3 * n + 1), *w = o;
    for (size_t i = 0; i < n;) {
        unsigned char c = (unsigned char)s[i];
        size_t k = c < 0x80 ? 1 : (c >> 5) == 6 ? 2 : (c >> 4) == 14 ? 3 : (c >> 3) == 30 ? 4 : 0;
        json_t *t = k && i + k <= n ? json_stringn(s + i, k) : NULL;
        if (t) {
            memcpy(w, s + i, k);
            w += k;
            i += k;
            json_decref(t);
        } else {
            memcpy(w, "\xEF\xBF\xBD", 3);
            w += 3;
            i++;
        }
    }
    j = json_stringn(o, (size_t)(w - o));
    cm_free(o);
    return j;
}

json_t *cm_json_from_struct(const Google__Protobuf__Struct *s) {
    return cm__from_struct(s, 1);
}

json_t *cm_json_from_value(const Google__Protobuf__Value *v) {
    return cm__from_value(v, 0);
}

/* ---- JSON -> protobuf Struct / Value ----------------------------------------------------- */

static void *cm__pb_new(ProtobufCAllocator *a, size_t n) {
    return a->alloc(a->allocator_data, n);
}

static char *cm__pb_strndup(ProtobufCAllocator *a, const char *s, size_t n) {
    char *p = cm__pb_new(a, n + 1);
    if (!p) return NULL;
    memcpy(p, s, n);
    p[n] = '\0';
    return p;
}

static int cm__to_value(const json_t *j, ProtobufCAllocator *a, int depth, Google__Protobuf__Value **out);

/* Each builder stores its message in *out as soon as it is initialised, so on failure the parent
 * (and finally the caller's free_unpacked) still reaches and frees everything allocated so far. */
static int cm__to_struct(const json_t *obj, ProtobufCAllocator *a, int depth, Google__Protobuf__Struct **out) {
    if (depth > CM_JSON_MAX_DEPTH) return CM_EINVAL;
    Google__Protobuf__Struct *s = cm__pb_new(a, sizeof *s);
    if (!s) return CM_ENOMEM;
    google__protobuf__struct__init(s);
    *out = s;
    size_t n = json_object_size(obj);
    if (n == 0) return 0;
    s->fields = cm__pb_new(a, n * sizeof *s->fields);
    if (!s->fields) return CM_ENOMEM;
    const char *key;
    size_t key_len;
    json_t *val;
    json_object_keylen_foreach((json_t *)obj, key, key_len, val) {
        /* A protobuf string ends at its first NUL; a key that holds one cannot survive. */
        if (memchr(key, '\0', key_len)) return CM_EINVAL;
        Google__Protobuf__Struct__FieldsEntry *e = cm__pb_new(a, sizeof *e);
        if (!e) return CM_ENOMEM;
        google__protobuf__struct__fields_entry__init(e);
        s->fields[s->n_fields++] = e;
        e->key = cm__pb_strndup(a, key, key_len);
        if (!e->key) {
            e->key = (char *)protobuf_c_empty_string; /* what free_unpacked knows not to free */
            return CM_ENOMEM;
        }
        int rc = cm__to_value(val, a, depth, &e->value);
        if (rc) return rc;
    }
    return 0;
}

static int cm__to_list(const json_t *arr, ProtobufCAllocator *a, int depth, Google__Protobuf__ListValue **out) {
    if (depth > CM_JSON_MAX_DEPTH) return CM_EINVAL;
    Google__Protobuf__ListValue *l = cm__pb_new(a, sizeof *l);
    if (!l) return CM_ENOMEM;
    google__protobuf__list_value__init(l);
    *out = l;
    size_t n = json_array_size(arr);
    if (n == 0) return 0;
    l->values = cm__pb_new(a, n * sizeof *l->values);
    if (!l->values) return CM_ENOMEM;
    for (size_t i = 0; i < n; i++) {
        Google__Protobuf__Value *v = NULL;
        int rc = cm__to_value(json_array_get(arr, i), a, depth, &v);
        if (v) l->values[l->n_values++] = v;
        if (rc) return rc;
    }
    return 0;
}

/* depth is the container depth of j's parent. */
static int cm__to_value(const json_t *j, ProtobufCAllocator *a, int depth, Google__Protobuf__Value **out) {
    if (!j) return CM_EINVAL;
    Google__Protobuf__Value *v = cm__pb_new(a, sizeof *v);
    if (!v) return CM_ENOMEM;
    google__protobuf__value__init(v);
    *out = v;
    switch (json_typeof(j)) {
    case JSON_OBJECT:
        v->kind_case = GOOGLE__PROTOBUF__VALUE__KIND_STRUCT_VALUE;
        return cm__to_struct(j, a, depth + 1, &v->struct_value);
    case JSON_ARRAY:
        v->kind_case = GOOGLE__PROTOBUF__VALUE__KIND_LIST_VALUE;
        return cm__to_list(j, a, depth + 1, &v->list_value);
    case JSON_STRING: {
        const char *s = json_string_value(j);
        size_t n = json_string_length(j);
        if (memchr(s, '\0', n)) return CM_EINVAL; /* see the key check above */
        char *copy = cm__pb_strndup(a, s, n);
        if (!copy) return CM_ENOMEM;
        v->kind_case = GOOGLE__PROTOBUF__VALUE__KIND_STRING_VALUE;
        v->string_value = copy;
        return 0;
    }
    case JSON_INTEGER:
        /* Beyond 2^53 this rounds: Value has no integer type. */
        v->kind_case = GOOGLE__PROTOBUF__VALUE__KIND_NUMBER_VALUE;
        v->number_value = (double)json_integer_value(j);
        return 0;
    case JSON_REAL:
        v->kind_case = GOOGLE__PROTOBUF__VALUE__KIND_NUMBER_VALUE;
        v->number_value = json_real_value(j);
        return 0;
    case JSON_TRUE:
    case JSON_FALSE:
        v->kind_case = GOOGLE__PROTOBUF__VALUE__KIND_BOOL_VALUE;
        v->bool_value = json_is_true(j);
        return 0;
    case JSON_NULL:
        v->kind_case = GOOGLE__PROTOBUF__VALUE__KIND_NULL_VALUE;
        v->null_value = GOOGLE__PROTOBUF__NULL_VALUE__NULL_VALUE;
        return 0;
    }
    return CM_EINVAL;
}

int cm_json_to_struct(const json_t *obj, ProtobufCAllocator *a, Google__Protobuf__Struct **out) {
    if (!out) return CM_EINVAL;
    *out = NULL;
    if (!json_is_object(obj)) return CM_EINVAL;
    /* protobuf-c's own default allocator is not exported; free_unpacked(msg, NULL) uses free(),
     * which is what cm_pb_allocator's cm_free() is. */
    if (!a) a = &cm_pb_allocator;
    Google__Protobuf__Struct *s = NULL;
    int rc = cm__to_struct(obj, a, 1, &s);
    if (rc) {
        if (s) protobuf_c_message_free_unpacked(&s->base, a);
        return rc;
    }
    *out = s;
    return 0;
}

int cm_json_to_value(const json_t *j, ProtobufCAllocator *a, Google__Protobuf__Value **out) {
    if (!out) return CM_EINVAL;
    *out = NULL;
    if (!a) a = &cm_pb_allocator;
    Google__Protobuf__Value *v = NULL;
    int rc = cm__to_value(j, a, 0, &v);
    if (rc) {
        if (v) protobuf_c_message_free_unpacked(&v->base, a);
        return rc;
    }
    *out = v;
    return 0;
}

/* ---- merge patch ------------------------------------------------------------------------- */

/* RFC 7396 section 2, MergePatch(Target, Patch), in place: consumes the reference to target (which
 * may be NULL, meaning absent) and returns a new reference, or NULL if jansson ran out of memory. */
static json_t *cm__merge(json_t *target, const json_t *patch) {
    if (!json_is_object(patch)) {
        json_decref(target);
        return json_deep_copy(patch);
    }
    if (!json_is_object(target)) {
        json_decref(target);
        target = json_object();
        if (!target) return NULL;
    }
    const char *key;
    size_t key_len;
    json_t *val;
    json_object_keylen_foreach((json_t *)patch, key, key_len, val) {
        if (json_is_null(val)) {
            json_object_deln(target, key, key_len); /* absent is fine: nothing to remove */
            continue;
        }
        /* The member is merged in place; the extra reference keeps it alive until it is set
         * back (set_new drops the object's reference to the old value, which may be this one). */
        json_t *cur = json_incref(json_object_getn(target, key, key_len));
        json_t *merged = cm__merge(cur, val);
        if (!merged || json_object_setn_new(target, key, key_len, merged) != 0) {
            json_decref(target);
            return NULL;
        }
    }
    return target;
}

json_t *cm_json_merge_patch(const json_t *target, const json_t *patch) {
    if (!patch) return NULL;
    /* A non-object patch replaces the target outright: don't copy a target about to be dropped. */
    json_t *copy = NULL;
    if (json_is_object(target) && json_is_object(patch)) {
        copy = json_deep_copy(target);
        if (!copy) return NULL;
    }
    return cm__merge(copy, patch);
}

/* ---- delta ------------------------------------------------------------------------------- */

/* An integer and a real are equal when they denote the same number; the comparison is exact even
 * beyond 2^53, where converting the integer to double would round. */
static int cm__num_equal(const json_t *x, const json_t *y) {
    if (json_is_integer(x) && json_is_integer(y)) return json_integer_value(x) == json_integer_value(y);
    if (json_is_real(x) && json_is_real(y)) return json_real_value(x) == json_real_value(y);
    if (json_is_real(x)) {
        const json_t *t = x;
        x = y;
        y = t;
    }
    json_int_t i = json_integer_value(x);
    double r = json_real_value(y);
    if (r != trunc(r) || r < -9223372036854775808.0 || r >= 9223372036854775808.0) return 0;
    return (json_int_t)r == i;
}

/* json_equal(), except that numbers compare by value (json_equal says 1 != 1.0). */
static int cm__equal(const json_t *x, const json_t *y) {
    if (json_is_number(x) && json_is_number(y)) return cm__num_equal(x, y);
    if (json_typeof(x) != json_typeof(y)) return 0;
    switch (json_typeof(x)) {
    case JSON_OBJECT: {
        if (json_object_size(x) != json_object_size(y)) return 0;
        const char *key;
        size_t key_len;
        json_t *xv;
        json_object_keylen_foreach((json_t *)x, key, key_len, xv) {
            const json_t *yv = json_object_getn(y, key, key_len);
            if (!yv || !cm__equal(xv, yv)) return 0;
        }
        return 1;
    }
    case JSON_ARRAY:
        if (json_array_size(x) != json_array_size(y)) return 0;
        for (size_t i = 0; i < json_array_size(x); i++)
            if (!cm__equal(json_array_get(x, i), json_array_get(y, i))) return 0;
        return 1;
    case JSON_STRING:
        return json_string_length(x) == json_string_length(y) &&
               memcmp(json_string_value(x), json_string_value(y), json_string_length(x)) == 0;
    default: /* true, false, null: the type is the value */
        return 1;
    }
}

json_t *cm_json_delta(const json_t *desired, const json_t *reported) {
    json_t *out = json_object();
    /* A delta lists members of desired: an absent or non-object desired document has none. */
    if (!out || !json_is_object(desired)) return out;
    const char *key;
    size_t key_len;
    json_t *dv;
    json_object_keylen_foreach((json_t *)desired, key, key_len, dv) {
        const json_t *rv = json_is_object(reported) ? json_object_getn(reported, key, key_len) : NULL;
        json_t *d;
        if (rv && json_is_object(dv) && json_is_object(rv)) {
            d = cm_json_delta(dv, rv);
            if (d && json_object_size(d) == 0) {
                json_decref(d);
                continue;
            }
        } else if (rv && cm__equal(dv, rv)) {
            continue;
        } else {
            d = json_deep_copy(dv);
        }
        if (!d || json_object_setn_new(out, key, key_len, d) != 0) {
            json_decref(out);
            return NULL;
        }
    }
    return out;
}

/* ---- depth ------------------------------------------------------------------------------- */

/* Containers on the deepest path below and including j. */
static int cm__containers(const json_t *j) {
    int deepest = 0;
    if (json_is_array(j)) {
        for (size_t i = 0; i < json_array_size(j); i++) {
            int d = cm__containers(json_array_get(j, i));
            if (d > deepest) deepest = d;
        }
    } else if (json_is_object(j)) {
        const char *k;
        json_t *v;
        json_object_foreach((json_t *)j, k, v) {
            int d = cm__containers(v);
            if (d > deepest) deepest = d;
        }
    } else {
        return 0;
    }
    return deepest + 1;
}

int cm_json_depth(const json_t *j) {
    if (!j) return 0;
    int d = cm__containers(j);
    return d > 0 ? d : 1;
}
