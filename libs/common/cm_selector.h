/* Label selectors, in the Kubernetes syntax operators already know, parsed once and then either
 * matched against a label set in memory (processing rules) or turned into SQL by a store
 * (device-mgmt filters). The parser is the one place that decides what a selector means.
 *
 *   env=prod, tier!=cache, zone in (a, b), arch notin (arm), gpu, !legacy
 *
 * Requirements are separated by commas and all must hold (AND). `=` and `==` are equality;
 * `k!=v` and `k notin (...)` also match when k is absent (as in Kubernetes). `k` alone means
 * the key exists, `!k` that it does not. Whitespace around tokens is ignored.
 * Keys: 1-63 characters of [A-Za-z0-9._/-], starting with a letter or digit.
 * Values: 0-63 characters of [A-Za-z0-9._-] (empty allowed in = / != / in sets).
 * At most CM_SEL_MAX_REQS requirements and CM_SEL_MAX_VALUES values per set; the whole
 * selector at most 4096 bytes.
 *
 * Ownership: cm_selector_parse() returns a selector the caller frees with cm_selector_free();
 * the strings inside live as long as it does. */
#ifndef CM_SELECTOR_H
#define CM_SELECTOR_H

#include <stddef.h>

#define CM_SEL_MAX_REQS 32
#define CM_SEL_MAX_VALUES 64
#define CM_SEL_MAX_LEN 4096

typedef enum {
    CM_SEL_EQ,         /* key = value */
    CM_SEL_NEQ,        /* key != value (or key absent) */
    CM_SEL_IN,         /* key in (values) */
    CM_SEL_NOTIN,      /* key notin (values) (or key absent) */
    CM_SEL_EXISTS,     /* key */
    CM_SEL_NOT_EXISTS, /* !key */
} cm_sel_op_t;

typedef struct cm_sel_req_s {
    const char *key;
    cm_sel_op_t op;
    const char *const *values; /* EQ/NEQ: one value; IN/NOTIN: n_values >= 1; EXISTS: none */
    size_t n_values;
} cm_sel_req_t;

typedef struct cm_selector_s {
    const cm_sel_req_t *reqs;
    size_t n_reqs; /* 0: the empty selector, which matches everything */
} cm_selector_t;

/* Parses text (NUL-terminated). Returns NULL on a syntax error and writes into err a message a
 * person can act on, naming the byte offset and what was expected
 * ("label_selector: at byte 9: expected a value after '!='"). An empty or all-blank string parses
 * to the empty selector. */
cm_selector_t *cm_selector_parse(const char *text, char *err, size_t err_cap);
void cm_selector_free(cm_selector_t *s);

/* Does the label set (n parallel keys/values arrays) satisfy every requirement? */
int cm_selector_matches(const cm_selector_t *s, const char *const *keys, const char *const *values, size_t n);

/* The validation rules the parser applies, for code that validates labels on write. */
int cm_selector_key_ok(const char *key);
int cm_selector_value_ok(const char *value);

#endif
