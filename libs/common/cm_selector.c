/* Label selectors (cm_selector.h): a hand-written recursive-descent parser and the in-memory matcher.
 *
 * Parsing takes two passes. The first walks the text once and records every key and value as an
 * (offset, length) span in fixed tables inside the parser state; it never allocates, so an error
 * path has nothing to release. The second sizes one cm_malloc() block exactly and lays out the
 * selector, its requirement array, the value pointer arrays and NUL-terminated copies of the
 * strings in it, so cm_selector_free() is a single cm_free().
 *
 * This parser is fuzzed: every byte is read through cm__sel_peek(), which checks the position
 * against a length measured with strnlen() bounded by CM_SEL_MAX_LEN + 1, and every table has a
 * fixed capacity that the grammar limits (requirements, values per set) keep us under. */
#include "cm_selector.h"
#include "cm_alloc.h"
#include "cm_err.h"

#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#define CM__SEL_MAX_KEY 63
#define CM__SEL_MAX_VALUE 63
/* Every requirement holds at most CM_SEL_MAX_VALUES values (EQ/NEQ hold one), so this is the most
 * the value table can ever need. */
#define CM__SEL_MAX_ALL_VALUES (CM_SEL_MAX_REQS * CM_SEL_MAX_VALUES)

/* Spans are 16-bit to keep the parser state small enough for the stack (about 9 KB). */
_Static_assert(CM_SEL_MAX_LEN <= UINT16_MAX, "selector offsets must fit in uint16_t");

typedef struct cm__sel_span_s {
    uint16_t off;
    uint16_t len;
} cm__sel_span_t;

typedef struct cm__sel_preq_s {
    cm__sel_span_t key;
    cm_sel_op_t op;
    uint16_t first_value; /* index into cm__sel_parser_t.values */
    uint16_t n_values;
} cm__sel_preq_t;

typedef struct cm__sel_parser_s {
    const char *s;
    size_t len; /* bytes before the NUL; never more than CM_SEL_MAX_LEN */
    size_t pos;
    char *err;
    size_t err_cap;
    cm__sel_preq_t reqs[CM_SEL_MAX_REQS];
    size_t n_reqs;
    cm__sel_span_t values[CM__SEL_MAX_ALL_VALUES];
    size_t n_values;
    size_t str_bytes; /* sum of len + 1 over every key and value: the string area of the block */
} cm__sel_parser_t;

/* ---- character classes ------------------------------------------------------------------------
 * Explicit ranges rather than <ctype.h>: the rules must not change with the locale, and bytes
 * >= 0x80 must never count as letters. */

static int cm__sel_alnum(int c) { return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9'); }
static int cm__sel_value_char(int c) { return cm__sel_alnum(c) || c == '.' || c == '_' || c == '-'; }
static int cm__sel_key_char(int c) { return cm__sel_value_char(c) || c == '/'; }
static int cm__sel_space(int c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\f' || c == '\v'; }

/* ---- scanner ------------------------------------------------------------------------------------ */

/* The byte at pos + ahead, or 0 at (or past) the end. The text has no NUL before len, so 0 is an
 * unambiguous end marker. */
static int cm__sel_peek_at(const cm__sel_parser_t *p, size_t ahead) {
    return ahead < p->len - p->pos ? (unsigned char)p->s[p->pos + ahead] : 0;
}

static int cm__sel_peek(const cm__sel_parser_t *p) { return cm__sel_peek_at(p, 0); }

static void cm__sel_skip_space(cm__sel_parser_t *p) {
    while (cm__sel_space(cm__sel_peek(p))) p->pos++;
}

/* Writes "label_selector: at byte N: <message>" into the caller's buffer and returns CM_EINVAL. */
static int cm__sel_fail(cm__sel_parser_t *p, size_t at, const char *fmt, ...) {
    if (p->err && p->err_cap > 0) {
        int n = snprintf(p->err, p->err_cap, "label_selector: at byte %zu: ", at);
        if (n >= 0 && (size_t)n < p->err_cap) {
            va_list ap;
            va_start(ap, fmt);
            vsnprintf(p->err + n, p->err_cap - (size_t)n, fmt, ap);
            va_end(ap);
        }
    }
    return CM_EINVAL;
}

/* "expected <what>, found <the byte at pos>": the message for every unexpected-token error, so
 * that they all read alike and all show the offending byte. Non-printable bytes are shown in hex
 * because they may be half of a UTF-8 sequence or a control character. */
static int cm__sel_expected(cm__sel_parser_t *p, const char *what) {
    int c = cm__sel_peek(p);
    if (c == 0) return cm__sel_fail(p, p->pos, "expected %s, found end of input", what);
    if (c > 0x20 && c < 0x7f) return cm__sel_fail(p, p->pos, "expected %s, found '%c'", what, c);
    return cm__sel_fail(p, p->pos, "expected %s, found byte 0x%02x", what, c);
}

/* ---- grammar -----------------------------------------------------------------------------------
 *   selector    = blank | requirement { "," requirement }
 *   requirement = "!" key | key [ ("=" | "==" | "!=") value | ("in" | "notin") "(" set ")" ]
 *   set         = value { "," value }     (values may be empty, but "()" is not a set)
 * with blanks allowed around every token. */

static int cm__sel_key(cm__sel_parser_t *p, cm__sel_span_t *out, const char *what) {
    size_t start = p->pos;
    if (!cm__sel_alnum(cm__sel_peek(p))) return cm__sel_expected(p, what);
    while (cm__sel_key_char(cm__sel_peek(p))) p->pos++;
    if (p->pos - start > CM__SEL_MAX_KEY)
        return cm__sel_fail(p, start, "key longer than %d characters", CM__SEL_MAX_KEY);
    out->off = (uint16_t)start;
    out->len = (uint16_t)(p->pos - start);
    p->str_bytes += out->len + 1u;
    return 0;
}

/* Scans a value (possibly empty) at pos and appends it to the value table. */
static int cm__sel_value(cm__sel_parser_t *p) {
    size_t start = p->pos;
    while (cm__sel_value_char(cm__sel_peek(p))) p->pos++;
    if (p->pos - start > CM__SEL_MAX_VALUE)
        return cm__sel_fail(p, start, "value longer than %d characters", CM__SEL_MAX_VALUE);
    /* Unreachable while the per-requirement limits hold; kept so a change to them cannot turn
     * into a write past the table. */
    if (p->n_values >= CM__SEL_MAX_ALL_VALUES) return cm__sel_fail(p, start, "too many values");
    p->values[p->n_values].off = (uint16_t)start;
    p->values[p->n_values].len = (uint16_t)(p->pos - start);
    p->n_values++;
    p->str_bytes += (p->pos - start) + 1u;
    return 0;
}

/* After '=', '==' or '!='. An empty value is allowed (as in Kubernetes: `env=` selects an empty
 * value), but only when the requirement ends there; anything else is a missing value. */
static int cm__sel_single_value(cm__sel_parser_t *p, cm__sel_preq_t *r, const char *op) {
    cm__sel_skip_space(p);
    int c = cm__sel_peek(p);
    if (!cm__sel_value_char(c) && c != 0 && c != ',') {
        char what[32];
        snprintf(what, sizeof what, "a value after '%s'", op);
        return cm__sel_expected(p, what);
    }
    r->first_value = (uint16_t)p->n_values;
    r->n_values = 1;
    return cm__sel_value(p);
}

/* After 'in' or 'notin': "(" set ")". */
static int cm__sel_set(cm__sel_parser_t *p, cm__sel_preq_t *r, const char *op) {
    cm__sel_skip_space(p);
    if (cm__sel_peek(p) != '(') {
        char what[32];
        snprintf(what, sizeof what, "'(' after '%s'", op);
        return cm__sel_expected(p, what);
    }
    p->pos++;
    cm__sel_skip_space(p);
    /* "()" would be a set that nothing is in (or everything is not in); Kubernetes rejects it and
     * so do we, since it is far more likely a mistake than a wish. */
    if (cm__sel_peek(p) == ')') return cm__sel_expected(p, "a value (a set cannot be empty)");
    r->first_value = (uint16_t)p->n_values;
    r->n_values = 0;
    for (;;) {
        cm__sel_skip_space(p);
        if (r->n_values >= CM_SEL_MAX_VALUES)
            return cm__sel_fail(p, p->pos, "more than %d values in one set", CM_SEL_MAX_VALUES);
        size_t before = p->pos;
        int rc = cm__sel_value(p);
        if (rc) return rc;
        r->n_values++;
        cm__sel_skip_space(p);
        int c = cm__sel_peek(p);
        if (c == ',') {
            p->pos++;
        } else if (c == ')') {
            p->pos++;
            return 0;
        } else {
            return cm__sel_expected(p, p->pos == before ? "a value, ',' or ')'" : "',' or ')'");
        }
    }
}

static int cm__sel_requirement(cm__sel_parser_t *p) {
    if (p->n_reqs >= CM_SEL_MAX_REQS)
        return cm__sel_fail(p, p->pos, "more than %d requirements", CM_SEL_MAX_REQS);
    cm__sel_preq_t *r = &p->reqs[p->n_reqs];
    memset(r, 0, sizeof *r);

    if (cm__sel_peek(p) == '!') {
        p->pos++;
        cm__sel_skip_space(p);
        r->op = CM_SEL_NOT_EXISTS;
        int rc = cm__sel_key(p, &r->key, "a key after '!'");
        if (rc) return rc;
        p->n_reqs++;
        return 0;
    }

    int rc = cm__sel_key(p, &r->key, "a key or '!'");
    if (rc) return rc;
    cm__sel_skip_space(p);
    int c = cm__sel_peek(p);
    if (c == 0 || c == ',') {
        r->op = CM_SEL_EXISTS;
    } else if (c == '=') {
        int dbl = cm__sel_peek_at(p, 1) == '=';
        p->pos += dbl ? 2 : 1;
        r->op = CM_SEL_EQ;
        rc = cm__sel_single_value(p, r, dbl ? "==" : "=");
    } else if (c == '!') {
        p->pos++;
        if (cm__sel_peek(p) != '=') return cm__sel_expected(p, "'=' after '!'");
        p->pos++;
        r->op = CM_SEL_NEQ;
        rc = cm__sel_single_value(p, r, "!=");
    } else {
        /* 'in' and 'notin' are words only here, in operator position, so a key may be called
         * "in". The word is scanned with the key alphabet so that "inner" or "in/x" is not
         * mistaken for the keyword followed by junk. */
        size_t start = p->pos, n = 0;
        while (cm__sel_key_char(cm__sel_peek_at(p, n))) n++;
        if (n == 2 && memcmp(p->s + start, "in", 2) == 0) {
            p->pos += n;
            r->op = CM_SEL_IN;
            rc = cm__sel_set(p, r, "in");
        } else if (n == 5 && memcmp(p->s + start, "notin", 5) == 0) {
            p->pos += n;
            r->op = CM_SEL_NOTIN;
            rc = cm__sel_set(p, r, "notin");
        } else {
            return cm__sel_expected(p, "'=', '==', '!=', 'in', 'notin', ',' or end of input after the key");
        }
    }
    if (rc) return rc;
    p->n_reqs++;
    return 0;
}

static int cm__sel_selector(cm__sel_parser_t *p) {
    cm__sel_skip_space(p);
    if (cm__sel_peek(p) == 0) return 0; /* empty or all blank: the empty selector */
    for (;;) {
        int rc = cm__sel_requirement(p);
        if (rc) return rc;
        cm__sel_skip_space(p);
        int c = cm__sel_peek(p);
        if (c == 0) return 0;
        if (c != ',') return cm__sel_expected(p, "',' or end of input");
        p->pos++;
        /* A trailing or doubled comma is an error (the next requirement finds no key) rather than
         * silently ignored: it usually means something was cut out of the selector. */
        cm__sel_skip_space(p);
    }
}

/* ---- building the selector --------------------------------------------------------------------- */

static size_t cm__sel_align(size_t n, size_t a) { return (n + a - 1) / a * a; }

static const char *cm__sel_copy(char **dst, const char *src, cm__sel_span_t sp) {
    char *out = *dst;
    memcpy(out, src + sp.off, sp.len);
    out[sp.len] = '\0';
    *dst = out + sp.len + 1;
    return out;
}

static cm_selector_t *cm__sel_build(const cm__sel_parser_t *p) {
    size_t off_reqs = cm__sel_align(sizeof(cm_selector_t), _Alignof(cm_sel_req_t));
    size_t off_vals = cm__sel_align(off_reqs + p->n_reqs * sizeof(cm_sel_req_t), _Alignof(const char *));
    size_t off_strs = off_vals + p->n_values * sizeof(const char *);
    char *block = cm_malloc(off_strs + p->str_bytes);

    cm_selector_t *sel = (cm_selector_t *)(void *)block;
    cm_sel_req_t *reqs = (cm_sel_req_t *)(void *)(block + off_reqs);
    const char **vals = (const char **)(void *)(block + off_vals);
    char *str = block + off_strs;

    for (size_t i = 0; i < p->n_values; i++) vals[i] = cm__sel_copy(&str, p->s, p->values[i]);
    for (size_t i = 0; i < p->n_reqs; i++) {
        const cm__sel_preq_t *r = &p->reqs[i];
        reqs[i].key = cm__sel_copy(&str, p->s, r->key);
        reqs[i].op = r->op;
        reqs[i].n_values = r->n_values;
        reqs[i].values = r->n_values ? vals + r->first_value : NULL;
    }
    sel->reqs = p->n_reqs ? reqs : NULL;
    sel->n_reqs = p->n_reqs;
    return sel;
}

/* ---- public API -------------------------------------------------------------------------------- */

cm_selector_t *cm_selector_parse(const char *text, char *err, size_t err_cap) {
    if (err && err_cap > 0) err[0] = '\0';
    /* The parser state holds the span tables; ~9 KB, fine on any thread stack we create, and it
     * keeps the error paths allocation-free. */
    cm__sel_parser_t p;
    p.s = text;
    p.len = 0;
    p.pos = 0;
    p.err = err;
    p.err_cap = err_cap;
    p.n_reqs = 0;
    p.n_values = 0;
    p.str_bytes = 0;
    if (!text) {
        if (err && err_cap > 0) snprintf(err, err_cap, "label_selector: no selector text");
        return NULL;
    }
    /* strnlen, not strlen: a fuzzer or a hostile caller may hand us a very long string, and we
     * only need to know whether it is over the limit. */
    size_t len = strnlen(text, CM_SEL_MAX_LEN + 1);
    if (len > CM_SEL_MAX_LEN) {
        cm__sel_fail(&p, CM_SEL_MAX_LEN, "selector longer than %d bytes", CM_SEL_MAX_LEN);
        return NULL;
    }
    p.len = len;
    if (cm__sel_selector(&p) != 0) return NULL;
    return cm__sel_build(&p);
}

void cm_selector_free(cm_selector_t *s) { cm_free(s); }

/* The first entry with this key, or NULL when absent. A NULL value counts as the empty string so
 * that a sparse label array cannot crash the matcher. */
static const char *cm__sel_lookup(const char *const *keys, const char *const *values, size_t n, const char *key) {
    for (size_t i = 0; i < n; i++)
        if (keys[i] && strcmp(keys[i], key) == 0) return values && values[i] ? values[i] : "";
    return NULL;
}

static int cm__sel_in_set(const cm_sel_req_t *r, const char *v) {
    for (size_t i = 0; i < r->n_values; i++)
        if (strcmp(r->values[i], v) == 0) return 1;
    return 0;
}

/* A NULL selector matches like the empty one: "no selector" means "no restriction". */
int cm_selector_matches(const cm_selector_t *s, const char *const *keys, const char *const *values, size_t n) {
    if (!s) return 1;
    if (!keys) n = 0;
    for (size_t i = 0; i < s->n_reqs; i++) {
        const cm_sel_req_t *r = &s->reqs[i];
        const char *v = cm__sel_lookup(keys, values, n, r->key);
        int ok;
        switch (r->op) {
        case CM_SEL_EQ:
            ok = v && strcmp(v, r->values[0]) == 0;
            break;
        case CM_SEL_NEQ:
            ok = !v || strcmp(v, r->values[0]) != 0;
            break;
        case CM_SEL_IN:
            ok = v && cm__sel_in_set(r, v);
            break;
        case CM_SEL_NOTIN:
            ok = !v || !cm__sel_in_set(r, v);
            break;
        case CM_SEL_EXISTS:
            ok = v != NULL;
            break;
        case CM_SEL_NOT_EXISTS:
            ok = v == NULL;
            break;
        default:
            ok = 0; /* a selector we did not build: refuse rather than guess */
            break;
        }
        if (!ok) return 0;
    }
    return 1;
}

/* Both return 1 when the string is acceptable and 0 when not (they are predicates, not
 * operations, so no CM_E code). */
int cm_selector_key_ok(const char *key) {
    if (!key || !cm__sel_alnum((unsigned char)key[0])) return 0;
    size_t n = 0;
    for (; key[n]; n++)
        if (n >= CM__SEL_MAX_KEY || !cm__sel_key_char((unsigned char)key[n])) return 0;
    return 1;
}

int cm_selector_value_ok(const char *value) {
    if (!value) return 0;
    size_t n = 0;
    for (; value[n]; n++)
        if (n >= CM__SEL_MAX_VALUE || !cm__sel_value_char((unsigned char)value[n])) return 0;
    return 1;
}
