/* cm_json.c: parse errors and limits, canonical dumps, the google.protobuf.Struct mapping (also
 * through the wire format and under failing allocators), RFC 7396 merge patches, shadow deltas. */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cm_alloc.h"
#include "cm_err.h"
#include "cm_json.h"
#include "test.h"

static json_t *parse(const char *s) {
    char err[256];
    json_t *j = cm_json_parse(s, strlen(s), err, sizeof err);
    if (!j) TEST__FAIL("parse %s: %s", s, err);
    return j;
}

/* Parses s, expecting failure; returns the message in err. */
static void parse_fails(const char *s, size_t len, char *err, size_t cap) {
    json_t *j = cm_json_parse(s, len, err, cap);
    if (j) {
        json_decref(j);
        TEST__FAIL("parse %s: accepted", s);
    }
}

/* Asserts cm_json_dump(j) == want, then drops the reference to j. */
#define ASSERT_DUMP(j, want)                                                           \
    do {                                                                               \
        json_t *dj__ = (j);                                                            \
        ASSERT(dj__ != NULL);                                                          \
        char *ds__ = cm_json_dump(dj__);                                               \
        json_decref(dj__);                                                             \
        char got__[1024];                                                              \
        snprintf(got__, sizeof got__, "%s", ds__ ? ds__ : "(null)");                   \
        free(ds__);                                                                    \
        ASSERT_STR_EQ(got__, want);                                                    \
    } while (0)

/* ---- parsing ----------------------------------------------------------------------------- */

/* Text from outside JSON: valid UTF-8 kept, every other byte U+FFFD (the gateway's error messages,
 * which may echo a query parameter's bytes). */
static void test_text_replaces_invalid_bytes(void) {
    json_t *j = cm_json_text("plain \xc3\xa9");
    ASSERT_STR_EQ(json_string_value(j), "plain \xc3\xa9");
    json_decref(j);
    j = cm_json_text("a\xff\xfe b \xe2\x82");
    ASSERT_STR_EQ(json_string_value(j), "a\xef\xbf\xbd\xef\xbf\xbd b \xef\xbf\xbd\xef\xbf\xbd");
    json_decref(j);
}

static void test_parse_error_names_position(void) {
    char err[256];
    parse_fails("{\"a\": }", 7, err, sizeof err);
    ASSERT(strncmp(err, "line 1, column 7 (byte 6): ", 27) == 0);
    ASSERT(strstr(err, "unexpected token") != NULL);

    /* Columns count characters, bytes count bytes: é is two bytes. */
    const char *two = "{\n  \"\xc3\xa9\": x}";
    parse_fails(two, strlen(two), err, sizeof err);
    ASSERT(strncmp(err, "line 2, column 8 (byte 10): ", 28) == 0);

    parse_fails("", 0, err, sizeof err);
    ASSERT(strncmp(err, "line 1, column 0 (byte 0): ", 27) == 0);
    parse_fails("[1, 2,]", 7, err, sizeof err);
    ASSERT(strncmp(err, "line 1, column 7 (byte 6): ", 27) == 0);
    parse_fails("[1] [2]", 7, err, sizeof err);
    ASSERT(strstr(err, "line 1, column 5 (byte 4)") == err);

    /* A small buffer truncates; no buffer is allowed. */
    char tiny[8];
    parse_fails("{", 1, tiny, sizeof tiny);
    ASSERT_INT_EQ(strlen(tiny), sizeof tiny - 1);
    ASSERT(cm_json_parse("{", 1, NULL, 0) == NULL);
}

static void test_parse_accepts_unterminated_buffer_and_scalars(void) {
    char err[128];
    json_t *j = cm_json_parse("[1,2]garbage", 5, err, sizeof err);
    ASSERT_DUMP(j, "[1,2]");
    j = cm_json_parse("  \"x\" ", 6, err, sizeof err);
    ASSERT_DUMP(j, "\"x\"");
    j = cm_json_parse("null", 4, err, sizeof err);
    ASSERT(json_is_null(j));
    json_decref(j);
}

static void test_parse_refuses_duplicate_keys(void) {
    char err[256];
    parse_fails("{\"a\":1,\"a\":2}", 13, err, sizeof err);
    ASSERT(strstr(err, "duplicate") != NULL);
    ASSERT(strncmp(err, "line 1, column 10 (byte 9): ", 28) == 0);
    const char *nested = "{\"x\":[{\"k\":true,\"k\":true}]}";
    parse_fails(nested, strlen(nested), err, sizeof err);
    ASSERT(strstr(err, "duplicate") != NULL);
    /* The same key in different objects is fine. */
    json_decref(parse("{\"a\":{\"a\":1},\"b\":{\"a\":2}}"));
}

static void test_parse_refuses_nul(void) {
    char err[256];
    static const char raw[] = "{\"a\":\"x\0y\"}";
    parse_fails(raw, sizeof raw - 1, err, sizeof err);
    ASSERT(strncmp(err, "line 1, column ", 15) == 0);
    parse_fails("\"\\u0000\"", 8, err, sizeof err);
    static const char trailing[] = "{}\0";
    parse_fails(trailing, sizeof trailing - 1, err, sizeof err);
    parse_fails(NULL, 3, err, sizeof err);
    /* Invalid UTF-8 too. */
    parse_fails("\"\xff\"", 3, err, sizeof err);
}

static char *nested_arrays(int n) {
    char *s = malloc((size_t)n * 2 + 2);
    for (int i = 0; i < n; i++) s[i] = '[';
    s[n] = '1';
    for (int i = 0; i < n; i++) s[n + 1 + i] = ']';
    s[2 * n + 1] = '\0';
    return s;
}

static void test_parse_depth_limit(void) {
    char err[256];
    char *ok = nested_arrays(CM_JSON_MAX_DEPTH);
    json_t *j = cm_json_parse(ok, strlen(ok), err, sizeof err);
    free(ok);
    ASSERT(j != NULL);
    ASSERT_INT_EQ(cm_json_depth(j), CM_JSON_MAX_DEPTH);
    json_decref(j);

    char *deep = nested_arrays(CM_JSON_MAX_DEPTH + 1);
    j = cm_json_parse(deep, strlen(deep), err, sizeof err);
    free(deep);
    ASSERT(j == NULL);
    ASSERT(strncmp(err, "line 1, column 33 (byte 32): nesting deeper than 32", 51) == 0);

    /* Brackets inside strings do not nest; objects count like arrays, across lines. */
    json_decref(parse("{\"s\":\"[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[\\\"[[[[[[[[[[[[[[[[\"}"));
    char text[512];
    size_t n = 0;
    for (int i = 0; i < CM_JSON_MAX_DEPTH; i++) n += (size_t)snprintf(text + n, sizeof text - n, "{\"\xc3\xa9\":\n");
    n += (size_t)snprintf(text + n, sizeof text - n, "{}");
    for (int i = 0; i < CM_JSON_MAX_DEPTH; i++) text[n++] = '}';
    j = cm_json_parse(text, n, err, sizeof err);
    ASSERT(j == NULL);
    /* Line 33 starts at byte 32 * 7 (each earlier line is {"é":\n, seven bytes). */
    char want[64];
    snprintf(want, sizeof want, "line 33, column 1 (byte %d): ", CM_JSON_MAX_DEPTH * 7);
    ASSERT(strncmp(err, want, strlen(want)) == 0);
}

static void test_depth(void) {
    ASSERT_INT_EQ(cm_json_depth(NULL), 0);
    json_t *j = parse("1");
    ASSERT_INT_EQ(cm_json_depth(j), 1);
    json_decref(j);
    j = parse("{}");
    ASSERT_INT_EQ(cm_json_depth(j), 1);
    json_decref(j);
    j = parse("{\"a\":{}}");
    ASSERT_INT_EQ(cm_json_depth(j), 2);
    json_decref(j);
    j = parse("[1,[2,[3]],{\"a\":[{}]}]");
    ASSERT_INT_EQ(cm_json_depth(j), 4);
    json_decref(j);
}

/* ---- dumping ----------------------------------------------------------------------------- */

static void test_dump_is_canonical(void) {
    ASSERT_DUMP(parse("{ \"b\" : [1, 2.5, \"\\u00e9\"], \"a\" : {\"d\": null, \"c\": true} }"),
                "{\"a\":{\"c\":true,\"d\":null},\"b\":[1,2.5,\"\xc3\xa9\"]}");
    /* Reals print as written, not as 17 digits, yet read back exactly. */
    ASSERT_DUMP(parse("[0.1, 0.3, 21.3, 1e300, -2.5e-7, 3.0]"), "[0.1,0.3,21.3,1e300,-2.5e-7,3.0]");
    json_t *r = json_real(0.1 + 0.2);
    char *s = cm_json_dump(r);
    json_decref(r);
    ASSERT(s != NULL);
    json_t *back = parse(s);
    free(s);
    ASSERT(json_real_value(back) == 0.1 + 0.2);
    json_decref(back);
    ASSERT(cm_json_dump(NULL) == NULL);
}

/* ---- Struct / Value ---------------------------------------------------------------------- */

/* JSON text -> Struct (allocator a) -> JSON text. */
static char *via_struct(const char *text, ProtobufCAllocator *a) {
    json_t *j = parse(text);
    Google__Protobuf__Struct *s = NULL;
    int rc = cm_json_to_struct(j, a, &s);
    json_decref(j);
    if (rc != 0) TEST__FAIL("to_struct %s: %s", text, cm_strerror(rc));
    json_t *back = cm_json_from_struct(s);
    protobuf_c_message_free_unpacked(&s->base, a);
    if (!back) TEST__FAIL("from_struct %s failed", text);
    char *out = cm_json_dump(back);
    json_decref(back);
    return out;
}

#define ASSERT_VIA_STRUCT(a, text, want)      \
    do {                                      \
        char *vs__ = via_struct(text, a);     \
        int ok__ = strcmp(vs__, want) == 0;   \
        if (!ok__) fprintf(stdout, "    got %s\n", vs__); \
        free(vs__);                           \
        ASSERT(ok__);                         \
    } while (0)

static const char *const nested_doc =
    "{\"\":\"empty key\",\"a\":{\"b\":[1,2.5,null,true,false,\"\xc3\xa9\xe2\x9c\x93\xf0\x9f\x98\x80\",{\"c\":[]},[[]]],\"d\":{}},"
    "\"e\":-3,\"f\":1.5,\"g\":1e300,\"h\":0.1,\"i\":\"\",\"j\":\"line\\nquote\\\"\"}";

static void test_struct_round_trip(void) {
    ProtobufCAllocator *allocators[] = {NULL, &cm_pb_allocator};
    for (size_t i = 0; i < 2; i++) {
        ProtobufCAllocator *a = allocators[i];
        ASSERT_VIA_STRUCT(a, nested_doc, nested_doc);
        ASSERT_VIA_STRUCT(a, "{}", "{}");
        /* Integral doubles come back as integers, others stay reals. */
        ASSERT_VIA_STRUCT(a, "{\"n\":[3,3.0,1.5,-0.0,-7,1e3,9007199254740991,9007199254740992]}",
                          "{\"n\":[3,3,1.5,0,-7,1000,9007199254740991,9007199254740992.0]}");
    }
    /* Messages from an arena are released with the arena. */
    cm_arena_t arena;
    cm_arena_init(&arena, NULL, 0);
    json_t *j = parse(nested_doc);
    Google__Protobuf__Struct *s = NULL;
    ASSERT_INT_EQ(cm_json_to_struct(j, &arena.pb, &s), 0);
    json_decref(j);
    json_t *back = cm_json_from_struct(s);
    cm_arena_free(&arena);
    ASSERT_DUMP(back, nested_doc);

    ASSERT_DUMP(cm_json_from_struct(NULL), "{}");
}

static void test_struct_refuses_non_objects(void) {
    Google__Protobuf__Struct *s = (Google__Protobuf__Struct *)1;
    json_t *arr = parse("[1]");
    ASSERT_INT_EQ(cm_json_to_struct(arr, NULL, &s), CM_EINVAL);
    ASSERT(s == NULL);
    json_decref(arr);
    ASSERT_INT_EQ(cm_json_to_struct(NULL, NULL, &s), CM_EINVAL);
    /* A NUL inside a string or key cannot be a protobuf string. */
    json_t *o = json_object();
    json_object_set_new(o, "s", json_stringn("a\0b", 3));
    ASSERT_INT_EQ(cm_json_to_struct(o, NULL, &s), CM_EINVAL);
    json_decref(o);
    o = json_object();
    json_object_setn_new(o, "k\0", 2, json_true());
    ASSERT_INT_EQ(cm_json_to_struct(o, NULL, &s), CM_EINVAL);
    json_decref(o);
}

static void test_value_scalars(void) {
    const char *texts[] = {"null", "true", "false", "\"x\"", "42", "-1.25", "[]", "[{}]", "{\"a\":[1]}"};
    for (size_t i = 0; i < sizeof texts / sizeof texts[0]; i++) {
        json_t *j = parse(texts[i]);
        Google__Protobuf__Value *v = NULL;
        ASSERT_INT_EQ(cm_json_to_value(j, NULL, &v), 0);
        json_decref(j);
        json_t *back = cm_json_from_value(v);
        protobuf_c_message_free_unpacked(&v->base, NULL);
        ASSERT_DUMP(back, texts[i]);
    }
    Google__Protobuf__Value *v = NULL;
    ASSERT_INT_EQ(cm_json_to_value(NULL, NULL, &v), CM_EINVAL);
    ASSERT(v == NULL);
    /* A Value with no kind set has no JSON. */
    Google__Protobuf__Value unset = GOOGLE__PROTOBUF__VALUE__INIT;
    ASSERT(cm_json_from_value(&unset) == NULL);
    ASSERT(cm_json_from_value(NULL) == NULL);
}

static void test_non_finite_refused(void) {
    double bad[] = {NAN, INFINITY, -INFINITY};
    for (size_t i = 0; i < 3; i++) {
        Google__Protobuf__Value v = GOOGLE__PROTOBUF__VALUE__INIT;
        v.kind_case = GOOGLE__PROTOBUF__VALUE__KIND_NUMBER_VALUE;
        v.number_value = bad[i];
        ASSERT(cm_json_from_value(&v) == NULL);

        /* Deep inside a Struct the whole conversion fails (and frees what it built). */
        Google__Protobuf__Value ok = GOOGLE__PROTOBUF__VALUE__INIT;
        ok.kind_case = GOOGLE__PROTOBUF__VALUE__KIND_STRING_VALUE;
        ok.string_value = (char *)"fine";
        Google__Protobuf__Value *items[] = {&ok, &v};
        Google__Protobuf__ListValue list = GOOGLE__PROTOBUF__LIST_VALUE__INIT;
        list.n_values = 2;
        list.values = items;
        Google__Protobuf__Value lv = GOOGLE__PROTOBUF__VALUE__INIT;
        lv.kind_case = GOOGLE__PROTOBUF__VALUE__KIND_LIST_VALUE;
        lv.list_value = &list;
        Google__Protobuf__Struct__FieldsEntry e = GOOGLE__PROTOBUF__STRUCT__FIELDS_ENTRY__INIT;
        e.key = (char *)"k";
        e.value = &lv;
        Google__Protobuf__Struct__FieldsEntry *entries[] = {&e};
        Google__Protobuf__Struct s = GOOGLE__PROTOBUF__STRUCT__INIT;
        s.n_fields = 1;
        s.fields = entries;
        ASSERT(cm_json_from_struct(&s) == NULL);
    }
}

/* A Struct nested n deep: {"k":{"k":...{}}}; every message from a. */
static Google__Protobuf__Struct *deep_struct(int n) {
    json_t *j = json_object(), *inner = j;
    for (int i = 1; i < n; i++) {
        json_t *o = json_object();
        json_object_set_new(inner, "k", o);
        inner = o;
    }
    Google__Protobuf__Struct *s = NULL;
    /* Building the Struct by conversion only works up to the limit. */
    int rc = cm_json_to_struct(j, NULL, &s);
    json_decref(j);
    return rc == 0 ? s : NULL;
}

static void test_struct_depth_limit(void) {
    Google__Protobuf__Struct *s = deep_struct(CM_JSON_MAX_DEPTH);
    ASSERT(s != NULL);
    json_t *j = cm_json_from_struct(s);
    ASSERT(j != NULL);
    ASSERT_INT_EQ(cm_json_depth(j), CM_JSON_MAX_DEPTH);
    json_decref(j);
    ASSERT(deep_struct(CM_JSON_MAX_DEPTH + 1) == NULL);

    /* One level more, wrapped by hand around the deepest convertible Struct. */
    Google__Protobuf__Value v = GOOGLE__PROTOBUF__VALUE__INIT;
    v.kind_case = GOOGLE__PROTOBUF__VALUE__KIND_STRUCT_VALUE;
    v.struct_value = s;
    Google__Protobuf__Struct__FieldsEntry e = GOOGLE__PROTOBUF__STRUCT__FIELDS_ENTRY__INIT;
    e.key = (char *)"top";
    e.value = &v;
    Google__Protobuf__Struct__FieldsEntry *entries[] = {&e};
    Google__Protobuf__Struct top = GOOGLE__PROTOBUF__STRUCT__INIT;
    top.n_fields = 1;
    top.fields = entries;
    ASSERT(cm_json_from_struct(&top) == NULL);
    /* v itself is exactly at the limit. */
    json_t *jv = cm_json_from_value(&v);
    ASSERT(jv != NULL);
    ASSERT_INT_EQ(cm_json_depth(jv), CM_JSON_MAX_DEPTH);
    json_decref(jv);
    protobuf_c_message_free_unpacked(&s->base, NULL);
}

static void test_struct_survives_wire(void) {
    json_t *j = parse(nested_doc);
    Google__Protobuf__Struct *s = NULL;
    ASSERT_INT_EQ(cm_json_to_struct(j, NULL, &s), 0);
    json_decref(j);
    size_t len = protobuf_c_message_get_packed_size(&s->base);
    uint8_t *buf = cm_malloc(len);
    ASSERT_INT_EQ(protobuf_c_message_pack(&s->base, buf), len);
    protobuf_c_message_free_unpacked(&s->base, NULL);

    Google__Protobuf__Struct *u = google__protobuf__struct__unpack(NULL, len, buf);
    cm_free(buf);
    ASSERT(u != NULL);
    json_t *back = cm_json_from_struct(u);
    google__protobuf__struct__free_unpacked(u, NULL);
    ASSERT_DUMP(back, nested_doc);
}

/* An allocator that fails once its budget is spent, to walk every failure path. */
typedef struct budget_s {
    int left;
    int live;
} budget_t;

static void *budget_alloc(void *data, size_t n) {
    budget_t *b = data;
    if (b->left-- <= 0) return NULL;
    b->live++;
    return malloc(n);
}

static void budget_free(void *data, void *p) {
    budget_t *b = data;
    b->live--;
    free(p);
}

static void test_to_struct_out_of_memory_frees_everything(void) {
    json_t *j = parse(nested_doc);
    int succeeded = 0;
    for (int budget = 0; budget < 1000 && !succeeded; budget++) {
        budget_t b = {budget, 0};
        ProtobufCAllocator a = {budget_alloc, budget_free, &b};
        Google__Protobuf__Struct *s = (Google__Protobuf__Struct *)1;
        int rc = cm_json_to_struct(j, &a, &s);
        if (rc == 0) {
            succeeded = 1;
            protobuf_c_message_free_unpacked(&s->base, &a);
        } else {
            ASSERT_INT_EQ(rc, CM_ENOMEM);
            ASSERT(s == NULL);
        }
        ASSERT_INT_EQ(b.live, 0);
    }
    json_decref(j);
    ASSERT(succeeded);
}

/* ---- merge patch ------------------------------------------------------------------------- */

static void check_merge(const char *target, const char *patch, const char *want) {
    json_t *t = parse(target), *p = parse(patch);
    char *before = cm_json_dump(t);
    json_t *r = cm_json_merge_patch(t, p);
    char *after = cm_json_dump(t), *got = r ? cm_json_dump(r) : NULL;
    int same_target = strcmp(before, after) == 0, ok = got && strcmp(got, want) == 0;
    if (!ok) fprintf(stdout, "    %s + %s: got %s, want %s\n", target, patch, got ? got : "(null)", want);
    free(before);
    free(after);
    free(got);
    json_decref(t);
    json_decref(p);
    json_decref(r);
    ASSERT(ok);
    ASSERT(same_target);
}

static void test_merge_patch_rfc7396_appendix_a(void) {
    /* RFC 7396 Appendix A, in order (results in canonical form). */
    check_merge("{\"a\":\"b\"}", "{\"a\":\"c\"}", "{\"a\":\"c\"}");
    check_merge("{\"a\":\"b\"}", "{\"b\":\"c\"}", "{\"a\":\"b\",\"b\":\"c\"}");
    check_merge("{\"a\":\"b\"}", "{\"a\":null}", "{}");
    check_merge("{\"a\":\"b\",\"b\":\"c\"}", "{\"a\":null}", "{\"b\":\"c\"}");
    check_merge("{\"a\":[\"b\"]}", "{\"a\":\"c\"}", "{\"a\":\"c\"}");
    check_merge("{\"a\":\"c\"}", "{\"a\":[\"b\"]}", "{\"a\":[\"b\"]}");
    check_merge("{\"a\":{\"b\":\"c\"}}", "{\"a\":{\"b\":\"d\",\"c\":null}}", "{\"a\":{\"b\":\"d\"}}");
    check_merge("{\"a\":[{\"b\":\"c\"}]}", "{\"a\":[1]}", "{\"a\":[1]}");
    check_merge("[\"a\",\"b\"]", "[\"c\",\"d\"]", "[\"c\",\"d\"]");
    check_merge("{\"a\":\"b\"}", "[\"c\"]", "[\"c\"]");
    check_merge("{\"a\":\"foo\"}", "null", "null");
    check_merge("{\"a\":\"foo\"}", "\"bar\"", "\"bar\"");
    check_merge("{\"e\":null}", "{\"a\":1}", "{\"a\":1,\"e\":null}");
    check_merge("[1,2]", "{\"a\":\"b\",\"c\":null}", "{\"a\":\"b\"}");
    check_merge("{}", "{\"a\":{\"bb\":{\"ccc\":null}}}", "{\"a\":{\"bb\":{}}}");
}

static void test_merge_patch_edges(void) {
    /* An absent target starts from {} for an object patch, and is replaced otherwise. */
    json_t *p = parse("{\"a\":{\"b\":null,\"c\":1},\"d\":null}");
    ASSERT_DUMP(cm_json_merge_patch(NULL, p), "{\"a\":{\"c\":1}}");
    json_decref(p);
    p = parse("[1]");
    ASSERT_DUMP(cm_json_merge_patch(NULL, p), "[1]");
    json_decref(p);
    ASSERT(cm_json_merge_patch(NULL, NULL) == NULL);

    /* The result shares nothing with its inputs. */
    json_t *t = parse("{\"keep\":{\"x\":1},\"drop\":2}");
    p = parse("{\"new\":{\"y\":[1]},\"drop\":null,\"keep\":{\"z\":true}}");
    json_t *r = cm_json_merge_patch(t, p);
    ASSERT(r != NULL && r != t);
    json_object_set_new(json_object_get(r, "new"), "mutated", json_true());
    json_array_append_new(json_object_get(json_object_get(r, "new"), "y"), json_integer(2));
    json_object_set_new(json_object_get(r, "keep"), "x", json_integer(9));
    ASSERT_DUMP(json_incref(t), "{\"drop\":2,\"keep\":{\"x\":1}}");
    ASSERT_DUMP(json_incref(p), "{\"drop\":null,\"keep\":{\"z\":true},\"new\":{\"y\":[1]}}");
    ASSERT_DUMP(r, "{\"keep\":{\"x\":9,\"z\":true},\"new\":{\"mutated\":true,\"y\":[1,2]}}");
    json_decref(t);
    json_decref(p);
}

/* ---- delta ------------------------------------------------------------------------------- */

static void check_delta(const char *desired, const char *reported, const char *want) {
    json_t *d = desired ? parse(desired) : NULL, *r = reported ? parse(reported) : NULL;
    json_t *delta = cm_json_delta(d, r);
    char *got = delta ? cm_json_dump(delta) : NULL;
    int ok = got && strcmp(got, want) == 0;
    if (!ok) fprintf(stdout, "    delta(%s, %s): got %s, want %s\n", desired ? desired : "NULL",
                     reported ? reported : "NULL", got ? got : "(null)", want);
    free(got);
    json_decref(delta);
    json_decref(d);
    json_decref(r);
    ASSERT(ok);
}

static void test_delta(void) {
    /* Equal documents: nothing to do. */
    check_delta("{\"a\":1,\"b\":{\"c\":[1,2],\"d\":\"x\"}}", "{\"b\":{\"d\":\"x\",\"c\":[1,2]},\"a\":1}", "{}");
    /* Only the differing leaf of a nested object. */
    check_delta("{\"cfg\":{\"led\":{\"on\":true,\"color\":\"red\"},\"rate\":5}}",
                "{\"cfg\":{\"led\":{\"on\":true,\"color\":\"blue\"},\"rate\":5}}", "{\"cfg\":{\"led\":{\"color\":\"red\"}}}");
    /* Arrays compare whole. */
    check_delta("{\"a\":[1,2,3],\"b\":[1]}", "{\"a\":[1,2,4],\"b\":[1]}", "{\"a\":[1,2,3]}");
    check_delta("{\"a\":[{\"x\":1}]}", "{\"a\":[{\"x\":1,\"y\":2}]}", "{\"a\":[{\"x\":1}]}");
    /* Keys only in reported are ignored; keys only in desired are listed. */
    check_delta("{\"a\":1}", "{\"a\":1,\"extra\":{\"z\":0}}", "{}");
    check_delta("{\"a\":1,\"b\":{\"c\":2}}", "{\"a\":1}", "{\"b\":{\"c\":2}}");
    /* Numbers compare by value, also inside arrays. */
    check_delta("{\"a\":1,\"b\":[2.0,{\"c\":-0.0}],\"c\":2.5}", "{\"a\":1.0,\"b\":[2,{\"c\":0}],\"c\":2.5}", "{}");
    check_delta("{\"a\":1}", "{\"a\":1.5}", "{\"a\":1}");
    check_delta("{\"big\":9007199254740993}", "{\"big\":9007199254740992.0}", "{\"big\":9007199254740993}");
    /* Type changes differ: an object vs a scalar is listed whole, as are 1 vs "1" and null vs absent. */
    check_delta("{\"a\":{\"b\":1},\"n\":1,\"z\":null}", "{\"a\":5,\"n\":\"1\"}", "{\"a\":{\"b\":1},\"n\":1,\"z\":null}");
    /* Objects present on both sides recurse even when empty. */
    check_delta("{\"a\":{}}", "{\"a\":{\"b\":1}}", "{}");
    /* NULL desired, or nothing reported yet. */
    check_delta(NULL, "{\"a\":1}", "{}");
    check_delta(NULL, NULL, "{}");
    check_delta("[1]", "{\"a\":1}", "{}");
    check_delta("{\"a\":{\"b\":1}}", NULL, "{\"a\":{\"b\":1}}");
    check_delta("{\"a\":1}", "[1]", "{\"a\":1}");
}

TEST_MAIN(TEST_ENTRY(test_text_replaces_invalid_bytes), TEST_ENTRY(test_parse_error_names_position), TEST_ENTRY(test_parse_accepts_unterminated_buffer_and_scalars),
          TEST_ENTRY(test_parse_refuses_duplicate_keys), TEST_ENTRY(test_parse_refuses_nul),
          TEST_ENTRY(test_parse_depth_limit), TEST_ENTRY(test_depth), TEST_ENTRY(test_dump_is_canonical),
          TEST_ENTRY(test_struct_round_trip), TEST_ENTRY(test_struct_refuses_non_objects),
          TEST_ENTRY(test_value_scalars), TEST_ENTRY(test_non_finite_refused), TEST_ENTRY(test_struct_depth_limit),
          TEST_ENTRY(test_struct_survives_wire), TEST_ENTRY(test_to_struct_out_of_memory_frees_everything),
          TEST_ENTRY(test_merge_patch_rfc7396_appendix_a), TEST_ENTRY(test_merge_patch_edges), TEST_ENTRY(test_delta))
