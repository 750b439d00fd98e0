/* Label selectors (libs/common/cm_selector.c): parsed from DeviceFilter.label_selector (device-mgmt
 * lists, counts and dynamic groups, and through them ota rollout targets) and from processing
 * rules, then matched in memory or turned into SQL.
 *
 * Input: the selector text up to the first '\n', then a label set as lines, alternately a key and
 * its value (at most 16 labels).
 *
 * Properties beyond "no crash or undefined behaviour":
 *   - a refused selector comes with a "label_selector: at byte N: ..." message;
 *   - a parsed one is within its limits (requirements, values per set), every key passes
 *     cm_selector_key_ok and every value cm_selector_value_ok, each operator holds the number of
 *     values it should;
 *   - printed back in canonical form it parses to the same requirements, and matches the same;
 *   - it matches a label set exactly when each of its requirements alone does;
 *   - every label that passes the write-side rules (key_ok, value_ok) can be selected:
 *     "k=v", "k in (v)" and "k" match it, "k!=v", "k notin (v)" and "!k" do not (the sets only
 *     for a non-empty v). */
#include "fuzz.h"

#include "cm_buf.h"
#include "cm_selector.h"

#define FZ_MAX_LABELS 16

static const char *const fz_ops[] = {"=", "!=", " in ", " notin ", "", "!"};

/* The canonical text of requirement r, appended to b. */
static void fz_print_req(cm_buf_t *b, const cm_sel_req_t *r) {
    switch (r->op) {
    case CM_SEL_EQ:
    case CM_SEL_NEQ: cm_buf_printf(b, "%s%s%s", r->key, fz_ops[r->op], r->values[0]); break;
    case CM_SEL_IN:
    case CM_SEL_NOTIN:
        cm_buf_printf(b, "%s%s(", r->key, fz_ops[r->op]);
        for (size_t i = 0; i < r->n_values; i++) cm_buf_printf(b, "%s%s", i ? "," : "", r->values[i]);
        cm_buf_puts(b, ")");
        break;
    case CM_SEL_EXISTS: cm_buf_puts(b, r->key); break;
    case CM_SEL_NOT_EXISTS: cm_buf_printf(b, "!%s", r->key); break;
    }
}

static cm_selector_t *fz_parse_ok(const char *text) {
    char err[256];
    cm_selector_t *s = cm_selector_parse(text, err, sizeof err);
    FZ_ASSERT(s, "\"%s\" (printed by the fuzzer from a parsed selector) does not parse: %s", text, err);
    return s;
}

static void fz_same(const cm_selector_t *a, const cm_selector_t *b, const char *text) {
    FZ_ASSERT(a->n_reqs == b->n_reqs, "\"%s\": %zu requirements, printed back %zu", text, a->n_reqs, b->n_reqs);
    for (size_t i = 0; i < a->n_reqs; i++) {
        const cm_sel_req_t *x = &a->reqs[i], *y = &b->reqs[i];
        FZ_ASSERT(!strcmp(x->key, y->key) && x->op == y->op && x->n_values == y->n_values, "\"%s\": requirement %zu changed", text, i);
        for (size_t k = 0; k < x->n_values; k++) FZ_ASSERT(!strcmp(x->values[k], y->values[k]), "\"%s\": value %zu.%zu", text, i, k);
    }
}

static int fz_matches_text(const char *text, const char *const *keys, const char *const *values, size_t n) {
    cm_selector_t *s = fz_parse_ok(text);
    int m = cm_selector_matches(s, keys, values, n);
    cm_selector_free(s);
    return m;
}

/* A label that passes the write-side rules can be selected by each operator. */
static void fz_selectable(const char *k, const char *v) {
    const char *keys[1] = {k}, *values[1] = {v};
    static const struct {
        const char *fmt;
        int want;
    } forms[] = {{"%s=%s", 1}, {"%s in (%s)", 1}, {"%s%.0s", 1}, {"%s!=%s", 0}, {"%s notin (%s)", 0}, {"!%s%.0s", 0}};
    for (size_t i = 0; i < sizeof forms / sizeof forms[0]; i++) {
        /* "k in ()" is an empty set, refused by the grammar (as in Kubernetes): an empty value is
         * selected with "k=" instead. */
        if (!*v && strchr(forms[i].fmt, '(')) continue;
        char text[160];
        snprintf(text, sizeof text, forms[i].fmt, k, v);
        FZ_ASSERT(fz_matches_text(text, keys, values, 1) == forms[i].want, "\"%s\" against the label %s=%s", text, k, v);
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    fz_t in = {data, size};
    char *text = fz_str(&in, '\n');
    char *kv[2 * FZ_MAX_LABELS];
    size_t n = 0;
    while (in.n && n < 2 * FZ_MAX_LABELS) kv[n++] = fz_str(&in, '\n');
    if (n % 2) kv[n++] = strdup("");
    size_t nl = n / 2;
    const char *keys[FZ_MAX_LABELS], *values[FZ_MAX_LABELS];
    for (size_t i = 0; i < nl; i++) {
        keys[i] = kv[2 * i];
        values[i] = kv[2 * i + 1];
        if (cm_selector_key_ok(keys[i]) && cm_selector_value_ok(values[i])) fz_selectable(keys[i], values[i]);
    }

    char err[256];
    cm_selector_t *s = cm_selector_parse(text, err, sizeof err);
    if (!s) {
        FZ_ASSERT(!strncmp(err, "label_selector: at byte ", 24), "refused without a proper message: \"%s\"", err);
    } else {
        FZ_ASSERT(s->n_reqs <= CM_SEL_MAX_REQS, "%zu requirements", s->n_reqs);
        cm_buf_t canon = CM_BUF_INIT;
        cm_buf_puts(&canon, "");
        int all = 1;
        for (size_t i = 0; i < s->n_reqs; i++) {
            const cm_sel_req_t *r = &s->reqs[i];
            FZ_ASSERT(cm_selector_key_ok(r->key), "key \"%s\" parsed but fails key_ok", r->key);
            switch (r->op) {
            case CM_SEL_EQ:
            case CM_SEL_NEQ: FZ_ASSERT(r->n_values == 1, "%zu values for = or !=", r->n_values); break;
            case CM_SEL_IN:
            case CM_SEL_NOTIN: FZ_ASSERT(r->n_values >= 1 && r->n_values <= CM_SEL_MAX_VALUES, "%zu values in a set", r->n_values); break;
            case CM_SEL_EXISTS:
            case CM_SEL_NOT_EXISTS: FZ_ASSERT(r->n_values == 0 && !r->values, "values for an existence test"); break;
            default: FZ_ASSERT(0, "operator %d", (int)r->op);
            }
            for (size_t k = 0; k < r->n_values; k++)
                FZ_ASSERT(cm_selector_value_ok(r->values[k]), "value \"%s\" parsed but fails value_ok", r->values[k]);
            if (i) cm_buf_puts(&canon, ",");
            cm_buf_t one = CM_BUF_INIT;
            fz_print_req(&one, r);
            cm_buf_puts(&canon, one.data);
            all &= fz_matches_text(one.data, keys, values, nl);
            cm_buf_free(&one);
        }
        int m = cm_selector_matches(s, keys, values, nl);
        FZ_ASSERT(m == all, "\"%s\" matches %d, its requirements one by one %d", text, m, all);
        cm_selector_t *again = fz_parse_ok(canon.data);
        fz_same(s, again, canon.data);
        FZ_ASSERT(cm_selector_matches(again, keys, values, nl) == m, "\"%s\" and its canonical form match differently", text);
        cm_selector_free(again);
        cm_buf_free(&canon);
        cm_selector_free(s);
    }
    free(text);
    for (size_t i = 0; i < n; i++) free(kv[i]);
    return 0;
}
