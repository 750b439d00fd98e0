/* Label selector parsing, error messages, limits and matching (cm_selector.c), plus a small
 * deterministic fuzz loop that stands in for libFuzzer until the real harness exists. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cm_selector.h"
#include "test.h"

/* ---- helpers ---------------------------------------------------------------------------------- */

static cm_selector_t *parse_ok(const char *text) {
    char err[256] = "untouched";
    cm_selector_t *s = cm_selector_parse(text, err, sizeof err);
    if (!s) TEST__FAIL("parse(\"%s\") failed: %s", text, err);
    ASSERT_STR_EQ(err, "");
    return s;
}

/* The parse must fail with a message that names `offset` and contains `want`. */
static void expect_err(const char *text, size_t offset, const char *want) {
    char err[256] = "";
    cm_selector_t *s = cm_selector_parse(text, err, sizeof err);
    if (s) {
        cm_selector_free(s);
        TEST__FAIL("parse(\"%s\") succeeded, want an error at byte %zu", text, offset);
    }
    char prefix[64];
    snprintf(prefix, sizeof prefix, "label_selector: at byte %zu: ", offset);
    if (strncmp(err, prefix, strlen(prefix)) != 0) TEST__FAIL("parse(\"%s\"): got \"%s\", want prefix \"%s\"", text, err, prefix);
    if (!strstr(err, want)) TEST__FAIL("parse(\"%s\"): got \"%s\", want it to contain \"%s\"", text, err, want);
}

static const char *op_name(cm_sel_op_t op) {
    switch (op) {
    case CM_SEL_EQ: return "=";
    case CM_SEL_NEQ: return "!=";
    case CM_SEL_IN: return " in ";
    case CM_SEL_NOTIN: return " notin ";
    case CM_SEL_EXISTS: return "";
    case CM_SEL_NOT_EXISTS: return "!";
    }
    return "?";
}

/* Canonical text of a parsed selector ("a=b,c in (x,y),!d"); it parses back to itself. */
static void dump(const cm_selector_t *s, char *out, size_t cap) {
    size_t n = 0;
    out[0] = '\0';
#define APPEND(...) (n += (size_t)snprintf(out + n, n < cap ? cap - n : 0, __VA_ARGS__))
    for (size_t i = 0; i < s->n_reqs; i++) {
        const cm_sel_req_t *r = &s->reqs[i];
        if (i) APPEND(",");
        if (r->op == CM_SEL_NOT_EXISTS) {
            APPEND("!%s", r->key);
            continue;
        }
        APPEND("%s%s", r->key, op_name(r->op));
        if (r->op == CM_SEL_EQ || r->op == CM_SEL_NEQ) APPEND("%s", r->values[0]);
        if (r->op == CM_SEL_IN || r->op == CM_SEL_NOTIN) {
            APPEND("(");
            for (size_t j = 0; j < r->n_values; j++) APPEND("%s%s", j ? "," : "", r->values[j]);
            APPEND(")");
        }
    }
#undef APPEND
}

static void expect_canonical(const char *text, const char *want) {
    cm_selector_t *s = parse_ok(text);
    char got[8192];
    dump(s, got, sizeof got);
    cm_selector_free(s);
    if (strcmp(got, want) != 0) TEST__FAIL("parse(\"%s\") -> \"%s\", want \"%s\"", text, got, want);
}

static int matches(const char *sel, const char *const *keys, const char *const *values, size_t n) {
    cm_selector_t *s = parse_ok(sel);
    int m = cm_selector_matches(s, keys, values, n);
    cm_selector_free(s);
    return m;
}

/* ---- parsing ---------------------------------------------------------------------------------- */

static void test_every_operator(void) {
    cm_selector_t *s = parse_ok("env=prod, tier!=cache, zone in (a, b), arch notin (arm), gpu, !legacy, x==y");
    ASSERT_INT_EQ(s->n_reqs, 7);
    const cm_sel_req_t *r = s->reqs;
    ASSERT_STR_EQ(r[0].key, "env");
    ASSERT_INT_EQ(r[0].op, CM_SEL_EQ);
    ASSERT_INT_EQ(r[0].n_values, 1);
    ASSERT_STR_EQ(r[0].values[0], "prod");
    ASSERT_STR_EQ(r[1].key, "tier");
    ASSERT_INT_EQ(r[1].op, CM_SEL_NEQ);
    ASSERT_INT_EQ(r[1].n_values, 1);
    ASSERT_STR_EQ(r[1].values[0], "cache");
    ASSERT_STR_EQ(r[2].key, "zone");
    ASSERT_INT_EQ(r[2].op, CM_SEL_IN);
    ASSERT_INT_EQ(r[2].n_values, 2);
    ASSERT_STR_EQ(r[2].values[0], "a");
    ASSERT_STR_EQ(r[2].values[1], "b");
    ASSERT_STR_EQ(r[3].key, "arch");
    ASSERT_INT_EQ(r[3].op, CM_SEL_NOTIN);
    ASSERT_INT_EQ(r[3].n_values, 1);
    ASSERT_STR_EQ(r[3].values[0], "arm");
    ASSERT_STR_EQ(r[4].key, "gpu");
    ASSERT_INT_EQ(r[4].op, CM_SEL_EXISTS);
    ASSERT_INT_EQ(r[4].n_values, 0);
    ASSERT_STR_EQ(r[5].key, "legacy");
    ASSERT_INT_EQ(r[5].op, CM_SEL_NOT_EXISTS);
    ASSERT_INT_EQ(r[5].n_values, 0);
    ASSERT_STR_EQ(r[6].key, "x");
    ASSERT_INT_EQ(r[6].op, CM_SEL_EQ);
    ASSERT_STR_EQ(r[6].values[0], "y");
    cm_selector_free(s);
}

static void test_key_and_value_alphabets(void) {
    expect_canonical("example.com/role=edge-gw_1.2", "example.com/role=edge-gw_1.2");
    expect_canonical("9lives in (A.b, c_d, -x-, .)", "9lives in (A.b,c_d,-x-,.)");
    expect_canonical("a-/b._c", "a-/b._c");
    expect_canonical("k in (a, a, a)", "k in (a,a,a)"); /* duplicates are kept, harmless */
    expect_canonical("k=v,k=w", "k=v,k=w");               /* so are duplicate keys */
}

static void test_whitespace_variants(void) {
    const char *want = "env=prod,tier!=cache,zone in (a,b),arch notin (arm),gpu,!legacy";
    const char *variants[] = {
        "env=prod,tier!=cache,zone in (a,b),arch notin (arm),gpu,!legacy",
        "env=prod, tier!=cache, zone in (a, b), arch notin (arm), gpu, !legacy",
        "  env = prod ,tier != cache,zone in(a,b),arch notin(arm),gpu,! legacy  ",
        "\tenv\t==\tprod\n,\r\ntier\v!=\fcache , zone  in  (  a  ,  b  ) , arch notin ( arm ) , gpu , !legacy\n",
        "env==prod,tier!=cache,zone in(a ,b ),arch   notin   (arm),gpu ,!legacy",
    };
    for (size_t i = 0; i < sizeof variants / sizeof variants[0]; i++) expect_canonical(variants[i], want);
}

static void test_empty_selector(void) {
    const char *blanks[] = {"", " ", "\t\n\r ", "\v\f"};
    const char *k[] = {"a"}, *v[] = {"b"};
    for (size_t i = 0; i < sizeof blanks / sizeof blanks[0]; i++) {
        cm_selector_t *s = parse_ok(blanks[i]);
        ASSERT_INT_EQ(s->n_reqs, 0);
        ASSERT(cm_selector_matches(s, NULL, NULL, 0));
        ASSERT(cm_selector_matches(s, k, v, 1));
        cm_selector_free(s);
    }
    cm_selector_free(NULL);
}

/* Empty values, as the header allows them: `k=` / `k!=` end the requirement with an empty value;
 * a set may hold empty members between commas, but "()" is not a set. */
static void test_empty_values(void) {
    cm_selector_t *s = parse_ok("env=");
    ASSERT_INT_EQ(s->n_reqs, 1);
    ASSERT_INT_EQ(s->reqs[0].op, CM_SEL_EQ);
    ASSERT_STR_EQ(s->reqs[0].values[0], "");
    cm_selector_free(s);
    expect_canonical("env = , b", "env=,b");
    expect_canonical("env!=", "env!=");
    expect_canonical("env==  ", "env=");
    expect_canonical("k in (a,)", "k in (a,)");
    expect_canonical("k in (, a)", "k in (,a)");
    expect_canonical("k notin ( , )", "k notin (,)");

    const char *k[] = {"env"}, *empty[] = {""}, *prod[] = {"prod"};
    ASSERT(matches("env=", k, empty, 1));
    ASSERT(!matches("env=", k, prod, 1));
    ASSERT(!matches("env=", NULL, NULL, 0));
    ASSERT(matches("env in (a,)", k, empty, 1));
}

static void test_key_named_in(void) {
    expect_canonical("in", "in");
    expect_canonical("in=x", "in=x");
    expect_canonical("in in (in)", "in in (in)");
    expect_canonical("!in", "!in");
    expect_canonical("notin notin (in, notin)", "notin notin (in,notin)");
    expect_canonical("in notin (a), notin", "in notin (a),notin");
    expect_canonical("inner in (x)", "inner in (x)");
    expect_canonical("in.x!=in", "in.x!=in");
    const char *k[] = {"in"}, *v[] = {"in"};
    ASSERT(matches("in in (in)", k, v, 1));
    ASSERT(matches("in", k, v, 1));
    ASSERT(!matches("!in", k, v, 1));
}

/* ---- errors ----------------------------------------------------------------------------------- */

static void test_error_messages(void) {
    static const struct {
        const char *text;
        size_t offset;
        const char *want;
    } cases[] = {
        {"env in (a,", 10, "expected a value, ',' or ')', found end of input"},
        {"env in ()", 8, "a set cannot be empty"},
        {"env in (  )", 10, "a set cannot be empty"},
        {"=x", 0, "expected a key or '!', found '='"},
        {"a,,b", 2, "expected a key or '!', found ','"},
        {"a,", 2, "found end of input"},
        {"a, ", 3, "found end of input"},
        {",a", 0, "found ','"},
        {"env notin a", 10, "expected '(' after 'notin', found 'a'"},
        {"env in a", 7, "expected '(' after 'in', found 'a'"},
        {"env in", 6, "expected '(' after 'in', found end of input"},
        {"env in (a", 9, "expected ',' or ')', found end of input"},
        {"env in (a b)", 10, "expected ',' or ')', found 'b'"},
        {"env in (a))", 10, "expected ',' or end of input, found ')'"},
        {"env in (a/b)", 9, "found '/'"},
        {"env=pr@d", 6, "expected ',' or end of input, found '@'"},
        {"en$v", 2, "found '$'"},
        {"env=\x01", 4, "expected a value after '=', found byte 0x01"},
        {"env=\xc3\xa9t\xc3\xa9", 4, "found byte 0xc3"},
        {"k\xff", 1, "found byte 0xff"},
        {"-env", 0, "expected a key or '!', found '-'"},
        {"/env", 0, "found '/'"},
        {"env!x", 4, "expected '=' after '!', found 'x'"},
        {"env!", 4, "expected '=' after '!', found end of input"},
        {"env!=(", 5, "expected a value after '!=', found '('"},
        {"xy,tier!=@", 9, "expected a value after '!='"},
        {"env===x", 5, "expected a value after '=='"},
        {"env = = x", 6, "expected a value after '='"},
        {"env=a b", 6, "expected ',' or end of input, found 'b'"},
        {"env=a/b", 5, "found '/'"},
        {"!", 1, "expected a key after '!', found end of input"},
        {"! =x", 2, "expected a key after '!', found '='"},
        {"!legacy=x", 7, "expected ',' or end of input, found '='"},
        {"!!a", 1, "expected a key after '!'"},
        {"env prod", 4, "expected '=', '==', '!=', 'in', 'notin', ',' or end of input after the key, found 'p'"},
        {"envin (a)", 6, "found '('"},
        {"env inner (a)", 4, "found 'i'"},
        {"env in/x (a)", 4, "found 'i'"},
        {"env (a)", 4, "found '('"},
        {"a=b;c=d", 3, "found ';'"},
        {"a=\"b\"", 2, "expected a value after '='"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) expect_err(cases[i].text, cases[i].offset, cases[i].want);

    /* The whole message, once, in the header's words. */
    char err[128];
    ASSERT(cm_selector_parse("xy,tier!=@", err, sizeof err) == NULL);
    ASSERT_STR_EQ(err, "label_selector: at byte 9: expected a value after '!=', found '@'");
}

static void test_error_buffer_edge_cases(void) {
    /* No buffer, a zero-sized one, a tiny one: never written out of bounds, always terminated. */
    ASSERT(cm_selector_parse("=", NULL, 0) == NULL);
    char one[1] = {'x'};
    ASSERT(cm_selector_parse("=", one, 0) == NULL);
    ASSERT_INT_EQ(one[0], 'x');
    ASSERT(cm_selector_parse("=", one, 1) == NULL);
    ASSERT_INT_EQ(one[0], '\0');
    char small[20];
    ASSERT(cm_selector_parse("a,,b", small, sizeof small) == NULL);
    ASSERT_INT_EQ(strlen(small), sizeof small - 1);
    char err[64];
    ASSERT(cm_selector_parse(NULL, err, sizeof err) == NULL);
    ASSERT(err[0] != '\0');
    cm_selector_t *s = cm_selector_parse("a", NULL, 0);
    ASSERT(s != NULL);
    cm_selector_free(s);
}

/* ---- limits ----------------------------------------------------------------------------------- */

static void test_key_and_value_length(void) {
    char buf[256];
    memset(buf, 'k', 63);
    strcpy(buf + 63, "=v");
    cm_selector_t *s = parse_ok(buf);
    ASSERT_INT_EQ(strlen(s->reqs[0].key), 63);
    cm_selector_free(s);
    memset(buf, 'k', 64);
    strcpy(buf + 64, "=v");
    expect_err(buf, 0, "key longer than 63 characters");
    snprintf(buf, sizeof buf, "a, !%.64s", "kkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkk");
    expect_err(buf, 4, "key longer than 63 characters");

    memcpy(buf, "k=", 2);
    memset(buf + 2, 'v', 63);
    buf[65] = '\0';
    s = parse_ok(buf);
    ASSERT_INT_EQ(strlen(s->reqs[0].values[0]), 63);
    cm_selector_free(s);
    memset(buf + 2, 'v', 64);
    buf[66] = '\0';
    expect_err(buf, 2, "value longer than 63 characters");
    memcpy(buf, "k in (a, ", 9);
    memset(buf + 9, 'v', 64);
    strcpy(buf + 73, ")");
    expect_err(buf, 9, "value longer than 63 characters");
}

static void test_too_many_requirements(void) {
    char buf[512];
    size_t n = 0, off33 = 0;
    for (int i = 0; i < CM_SEL_MAX_REQS; i++) n += (size_t)snprintf(buf + n, sizeof buf - n, "%sk%d", i ? ", " : "", i);
    cm_selector_t *s = parse_ok(buf);
    ASSERT_INT_EQ(s->n_reqs, CM_SEL_MAX_REQS);
    ASSERT_STR_EQ(s->reqs[CM_SEL_MAX_REQS - 1].key, "k31");
    cm_selector_free(s);
    n += (size_t)snprintf(buf + n, sizeof buf - n, ", ");
    off33 = n;
    snprintf(buf + n, sizeof buf - n, "k32");
    expect_err(buf, off33, "more than 32 requirements");
}

static void test_too_many_values(void) {
    char buf[1024];
    size_t n = (size_t)snprintf(buf, sizeof buf, "zone notin (");
    for (int i = 0; i < CM_SEL_MAX_VALUES; i++) n += (size_t)snprintf(buf + n, sizeof buf - n, "%sv%d", i ? ", " : "", i);
    snprintf(buf + n, sizeof buf - n, ")");
    cm_selector_t *s = parse_ok(buf);
    ASSERT_INT_EQ(s->reqs[0].n_values, CM_SEL_MAX_VALUES);
    ASSERT_STR_EQ(s->reqs[0].values[63], "v63");
    cm_selector_free(s);
    n += (size_t)snprintf(buf + n, sizeof buf - n, ", ");
    size_t off65 = n;
    snprintf(buf + n, sizeof buf - n, "v64)");
    expect_err(buf, off65, "more than 64 values in one set");
    /* A trailing comma after the 64th adds an empty 65th. */
    snprintf(buf + off65 - 2, sizeof buf - (off65 - 2), ",)");
    expect_err(buf, off65 - 1, "more than 64 values in one set");

    /* The most the value table can hold: 32 sets of 64 values, all in 4096 bytes (empty members). */
    char big[CM_SEL_MAX_LEN + 1];
    n = 0;
    for (int r = 0; r < CM_SEL_MAX_REQS; r++) {
        n += (size_t)snprintf(big + n, sizeof big - n, "%sk%d in (", r ? "," : "", r);
        for (int v = 1; v < CM_SEL_MAX_VALUES; v++) big[n++] = ',';
        big[n++] = ')';
    }
    big[n] = '\0';
    ASSERT(n <= CM_SEL_MAX_LEN);
    s = parse_ok(big);
    ASSERT_INT_EQ(s->n_reqs, CM_SEL_MAX_REQS);
    for (size_t r = 0; r < s->n_reqs; r++) {
        ASSERT_INT_EQ(s->reqs[r].n_values, CM_SEL_MAX_VALUES);
        ASSERT_STR_EQ(s->reqs[r].values[CM_SEL_MAX_VALUES - 1], "");
    }
    cm_selector_free(s);
}

static void test_text_length(void) {
    char *buf = malloc(CM_SEL_MAX_LEN + 2);
    ASSERT(buf != NULL);
    /* Exactly 4096 bytes is allowed (blanks are bytes too). */
    buf[0] = 'a';
    memset(buf + 1, ' ', CM_SEL_MAX_LEN - 1);
    buf[CM_SEL_MAX_LEN] = '\0';
    char err[128] = "";
    cm_selector_t *s = cm_selector_parse(buf, err, sizeof err);
    int ok = s != NULL;
    cm_selector_free(s);
    buf[CM_SEL_MAX_LEN] = ' ';
    buf[CM_SEL_MAX_LEN + 1] = '\0';
    cm_selector_t *s2 = cm_selector_parse(buf, err, sizeof err);
    free(buf);
    ASSERT(ok);
    ASSERT(s2 == NULL);
    ASSERT_STR_EQ(err, "label_selector: at byte 4096: selector longer than 4096 bytes");

    /* A far longer string is rejected without reading all of it (strnlen). */
    size_t huge = 1u << 20;
    buf = malloc(huge + 1);
    ASSERT(buf != NULL);
    memset(buf, 'a', huge);
    buf[huge] = '\0';
    s = cm_selector_parse(buf, err, sizeof err);
    free(buf);
    ASSERT(s == NULL);
    ASSERT(strstr(err, "at byte 4096") != NULL);
}

/* ---- matching --------------------------------------------------------------------------------- */

static void test_match_truth_tables(void) {
    /* Label sets: env=prod; env=dev; env=""; no env at all (other labels only); nothing. */
    const char *k_env[] = {"tier", "env"};
    const char *v_prod[] = {"web", "prod"}, *v_dev[] = {"web", "dev"}, *v_empty[] = {"web", ""};
    const char *k_other[] = {"tier"}, *v_other[] = {"web"};
    static const struct {
        const char *sel;
        int prod, dev, empty, absent, none;
    } rows[] = {
        {"env=prod", 1, 0, 0, 0, 0},
        {"env==prod", 1, 0, 0, 0, 0},
        {"env!=prod", 0, 1, 1, 1, 1},
        {"env in (prod, staging)", 1, 0, 0, 0, 0},
        {"env in (dev, prod)", 1, 1, 0, 0, 0},
        {"env notin (prod, staging)", 0, 1, 1, 1, 1},
        {"env notin (dev, prod)", 0, 0, 1, 1, 1},
        {"env", 1, 1, 1, 0, 0},
        {"!env", 0, 0, 0, 1, 1},
        {"env, tier=web", 1, 1, 1, 0, 0},
        {"env=prod, tier!=web", 0, 0, 0, 0, 0},
        {"tier=web, env!=dev", 1, 0, 1, 1, 0},
        {"env in (prod), env notin (dev)", 1, 0, 0, 0, 0},
        {"", 1, 1, 1, 1, 1},
        {"missing!=x, !missing, missing notin (a)", 1, 1, 1, 1, 1},
        {"env=Prod", 0, 0, 0, 0, 0}, /* case-sensitive */
        {"env=pro", 0, 0, 0, 0, 0},  /* whole values, not prefixes */
        {"Env", 0, 0, 0, 0, 0},
    };
    for (size_t i = 0; i < sizeof rows / sizeof rows[0]; i++) {
        cm_selector_t *s = parse_ok(rows[i].sel);
        int got[5] = {
            cm_selector_matches(s, k_env, v_prod, 2), cm_selector_matches(s, k_env, v_dev, 2),
            cm_selector_matches(s, k_env, v_empty, 2), cm_selector_matches(s, k_other, v_other, 1),
            cm_selector_matches(s, NULL, NULL, 0),
        };
        int want[5] = {rows[i].prod, rows[i].dev, rows[i].empty, rows[i].absent, rows[i].none};
        cm_selector_free(s);
        for (int j = 0; j < 5; j++)
            if (!got[j] != !want[j]) TEST__FAIL("\"%s\" on label set %d: got %d, want %d", rows[i].sel, j, got[j], want[j]);
    }
    /* "No selector" restricts nothing. */
    ASSERT(cm_selector_matches(NULL, k_env, v_prod, 2));
}

static void test_label_validation(void) {
    ASSERT(cm_selector_key_ok("env"));
    ASSERT(cm_selector_key_ok("example.com/role"));
    ASSERT(cm_selector_key_ok("0a-_./"));
    ASSERT(cm_selector_key_ok("in"));
    ASSERT(!cm_selector_key_ok(""));
    ASSERT(!cm_selector_key_ok(NULL));
    ASSERT(!cm_selector_key_ok("-env"));
    ASSERT(!cm_selector_key_ok(".env"));
    ASSERT(!cm_selector_key_ok("en v"));
    ASSERT(!cm_selector_key_ok("env="));
    ASSERT(!cm_selector_key_ok("caf\xc3\xa9"));
    ASSERT(cm_selector_value_ok(""));
    ASSERT(cm_selector_value_ok("prod-1.2_x"));
    ASSERT(cm_selector_value_ok("-"));
    ASSERT(!cm_selector_value_ok(NULL));
    ASSERT(!cm_selector_value_ok("a/b"));
    ASSERT(!cm_selector_value_ok("a b"));
    char buf[80];
    memset(buf, 'a', 63);
    buf[63] = '\0';
    ASSERT(cm_selector_key_ok(buf));
    ASSERT(cm_selector_value_ok(buf));
    buf[63] = 'a';
    buf[64] = '\0';
    ASSERT(!cm_selector_key_ok(buf));
    ASSERT(!cm_selector_value_ok(buf));
}

/* ---- fuzz ------------------------------------------------------------------------------------- */

static uint64_t rng_state;
static uint32_t rnd(void) { /* xorshift64*: deterministic, so a failure reproduces */
    rng_state ^= rng_state >> 12;
    rng_state ^= rng_state << 25;
    rng_state ^= rng_state >> 27;
    return (uint32_t)((rng_state * 2685821657736338717ull) >> 32);
}

static const char fuzz_alphabet[] = "abkvin ot=!(),-_./\t\n=!(),in notin \x01\xff@\"";

/* Parses text from an exactly-sized heap copy (so ASan sees any read past the NUL) and checks the
 * invariants every outcome must satisfy. Returns 1 when it parsed. */
static int check_one(const char *text, size_t len) {
    char *copy = malloc(len + 1);
    if (!copy) TEST__FAIL("out of memory");
    memcpy(copy, text, len);
    copy[len] = '\0';
    char err[256];
    memset(err, 'x', sizeof err);
    cm_selector_t *s = cm_selector_parse(copy, err, sizeof err);
    size_t real_len = strlen(copy);
    if (!s) {
        free(copy);
        if (err[0] == '\0' || !memchr(err, '\0', sizeof err)) TEST__FAIL("NULL without a message");
        unsigned long at;
        if (sscanf(err, "label_selector: at byte %lu:", &at) != 1) TEST__FAIL("message without an offset: %s", err);
        if (at > real_len) TEST__FAIL("offset %lu past the end (%zu): %s", at, real_len, err);
        return 0;
    }
    if (err[0] != '\0') TEST__FAIL("parsed but err set: %s", err);
    if (s->n_reqs > CM_SEL_MAX_REQS) TEST__FAIL("%zu requirements", s->n_reqs);
    for (size_t i = 0; i < s->n_reqs; i++) {
        const cm_sel_req_t *r = &s->reqs[i];
        if (!cm_selector_key_ok(r->key)) TEST__FAIL("bad key \"%s\" from \"%s\"", r->key, copy);
        size_t want_min = r->op == CM_SEL_IN || r->op == CM_SEL_NOTIN ? 1 : r->op <= CM_SEL_NEQ ? 1 : 0;
        size_t want_max = r->op == CM_SEL_IN || r->op == CM_SEL_NOTIN ? CM_SEL_MAX_VALUES : want_min;
        if (r->n_values < want_min || r->n_values > want_max) TEST__FAIL("op %d with %zu values", (int)r->op, r->n_values);
        for (size_t j = 0; j < r->n_values; j++)
            if (!cm_selector_value_ok(r->values[j])) TEST__FAIL("bad value \"%s\" from \"%s\"", r->values[j], copy);
    }
    /* The canonical form parses back to the same selector. */
    char canon[8192], again[8192];
    dump(s, canon, sizeof canon);
    cm_selector_t *s2 = cm_selector_parse(canon, err, sizeof err);
    if (!s2) TEST__FAIL("canonical \"%s\" of \"%s\" does not parse: %s", canon, copy, err);
    dump(s2, again, sizeof again);
    if (strcmp(canon, again) != 0) TEST__FAIL("\"%s\" re-dumps as \"%s\"", canon, again);
    /* And matching runs over something. */
    const char *k[] = {"a", "in", "b"}, *v[] = {"", "b", "a"};
    (void)cm_selector_matches(s, k, v, 3);
    cm_selector_free(s2);
    cm_selector_free(s);
    free(copy);
    return 1;
}

static void test_fuzz_random_strings(void) {
    rng_state = 0x5e1ec70f5eedull;
    char buf[128];
    int parsed = 0;
    for (int i = 0; i < 200000; i++) {
        size_t len = rnd() % (i % 8 == 0 ? 96 : 24);
        for (size_t j = 0; j < len; j++) buf[j] = fuzz_alphabet[rnd() % (sizeof fuzz_alphabet - 1)];
        parsed += check_one(buf, len);
    }
    /* Not a correctness bound: just evidence that the loop reaches the success paths too. */
    ASSERT(parsed > 1000);
}

static void test_fuzz_mutations(void) {
    static const char *const seeds[] = {
        "env=prod, tier!=cache, zone in (a, b), arch notin (arm), gpu, !legacy",
        "in in (in, notin), notin notin (in)",
        "a==b,c!=,d in (,),!e",
        "example.com/role=edge, k in (a,a,a)",
        " x ",
    };
    rng_state = 0xfeedface1234ull;
    char buf[512];
    int parsed = 0;
    for (int i = 0; i < 100000; i++) {
        const char *seed = seeds[rnd() % (sizeof seeds / sizeof seeds[0])];
        size_t len = strlen(seed);
        memcpy(buf, seed, len);
        int edits = 1 + (int)(rnd() % 4);
        for (int e = 0; e < edits; e++) {
            char c = fuzz_alphabet[rnd() % (sizeof fuzz_alphabet - 1)];
            size_t at = len ? rnd() % len : 0;
            switch (rnd() % 4) {
            case 0: /* replace */
                if (len) buf[at] = c;
                break;
            case 1: /* insert */
                if (len < sizeof buf / 2) {
                    memmove(buf + at + 1, buf + at, len - at);
                    buf[at] = c;
                    len++;
                }
                break;
            case 2: /* delete */
                if (len) {
                    memmove(buf + at, buf + at + 1, len - at - 1);
                    len--;
                }
                break;
            default: { /* duplicate a chunk: grows requirement and value counts */
                size_t n = len - at < 16 ? len - at : 16;
                if (len + n < sizeof buf) {
                    memmove(buf + at + n, buf + at, len - at);
                    len += n;
                }
                break;
            }
            }
        }
        parsed += check_one(buf, len);
    }
    ASSERT(parsed > 1000);
}

TEST_MAIN(TEST_ENTRY(test_every_operator), TEST_ENTRY(test_key_and_value_alphabets), TEST_ENTRY(test_whitespace_variants),
          TEST_ENTRY(test_empty_selector), TEST_ENTRY(test_empty_values), TEST_ENTRY(test_key_named_in),
          TEST_ENTRY(test_error_messages), TEST_ENTRY(test_error_buffer_edge_cases), TEST_ENTRY(test_key_and_value_length),
          TEST_ENTRY(test_too_many_requirements), TEST_ENTRY(test_too_many_values), TEST_ENTRY(test_text_length),
          TEST_ENTRY(test_match_truth_tables), TEST_ENTRY(test_label_validation), TEST_ENTRY(test_fuzz_random_strings),
          TEST_ENTRY(test_fuzz_mutations))
