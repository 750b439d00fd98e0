/* Semantic versions (see ota_semver.h). */
#include "ota_semver.h"

#include <ctype.h>
#include <stdlib.h>
#include <string.h>

/* A numeric identifier: digits, no leading zero unless it is "0". Advances *p. */
static int ota__num(const char **p, uint64_t *out) {
    const char *s = *p;
    if (!isdigit((unsigned char)*s)) return -1;
    if (s[0] == '0' && isdigit((unsigned char)s[1])) return -1;
    uint64_t v = 0;
    while (isdigit((unsigned char)*s)) {
        if (v > (UINT64_MAX - 9) / 10) return -1;
        v = v * 10 + (uint64_t)(*s++ - '0');
    }
    *out = v;
    *p = s;
    return 0;
}

/* Dot-separated identifiers of [0-9A-Za-z-], none empty; numeric ones without leading zeros
 * (pre-release only). Returns the length consumed, or -1. */
static int ota__idents(const char *s, int numeric_rule) {
    const char *p = s;
    for (;;) {
        const char *start = p;
        int all_digits = 1;
        while (isalnum((unsigned char)*p) || *p == '-') {
            if (!isdigit((unsigned char)*p)) all_digits = 0;
            p++;
        }
        if (p == start) return -1;
        if (numeric_rule && all_digits && p - start > 1 && *start == '0') return -1;
        if (*p != '.') break;
        p++;
    }
    return (int)(p - s);
}

int ota_semver_parse(const char *s, ota_semver_t *v) {
    if (!s || strlen(s) > OTA_VERSION_MAX) return -1;
    memset(v, 0, sizeof *v);
    const char *p = s;
    if (ota__num(&p, &v->major) || *p++ != '.' || ota__num(&p, &v->minor) || *p++ != '.' || ota__num(&p, &v->patch)) return -1;
    if (*p == '-') {
        int n = ota__idents(++p, 1);
        if (n < 0) return -1;
        memcpy(v->pre, p, (size_t)n);
        v->pre[n] = 0;
        p += n;
    }
    if (*p == '+') {
        int n = ota__idents(++p, 0);
        if (n < 0) return -1;
        p += n;
    }
    return *p ? -1 : 0;
}

static int ota__all_digits(const char *s, size_t n) {
    for (size_t i = 0; i < n; i++)
        if (!isdigit((unsigned char)s[i])) return 0;
    return n > 0;
}

/* Pre-release precedence: identifier by identifier; numeric ones compare as numbers and sort
 * before alphanumeric ones; a shorter list that is a prefix sorts first. */
static int ota__pre_cmp(const char *a, const char *b) {
    if (!*a || !*b) return *a ? -1 : *b ? 1 : 0; /* a release outranks its pre-releases */
    for (;;) {
        size_t la = strcspn(a, "."), lb = strcspn(b, ".");
        int na = ota__all_digits(a, la), nb = ota__all_digits(b, lb);
        int c;
        if (na && nb)
            c = la != lb ? (la < lb ? -1 : 1) : memcmp(a, b, la); /* no leading zeros: length orders */
        else if (na != nb)
            c = na ? -1 : 1;
        else {
            c = memcmp(a, b, la < lb ? la : lb);
            if (!c && la != lb) c = la < lb ? -1 : 1;
        }
        if (c) return c < 0 ? -1 : 1;
        a += la;
        b += lb;
        if (!*a || !*b) return *a ? 1 : *b ? -1 : 0;
        a++;
        b++;
    }
}

int ota_semver_cmp(const ota_semver_t *a, const ota_semver_t *b) {
    if (a->major != b->major) return a->major < b->major ? -1 : 1;
    if (a->minor != b->minor) return a->minor < b->minor ? -1 : 1;
    if (a->patch != b->patch) return a->patch < b->patch ? -1 : 1;
    return ota__pre_cmp(a->pre, b->pre);
}

/* Evaluates (v != NULL) or checks one range; 1/0 match, -1 invalid. */
static int ota__range(const ota_semver_t *v, const char *range) {
    if (strlen(range) > 512) return -1;
    int ok = 1;
    const char *p = range;
    for (;;) {
        while (*p == ' ') p++;
        if (!*p) return ok;
        size_t n = strcspn(p, " ");
        char tok[OTA_VERSION_MAX + 3];
        if (n >= sizeof tok) return -1;
        memcpy(tok, p, n);
        tok[n] = 0;
        p += n;
        const char *ver = tok;
        int op; /* 0 =, 1 >, 2 >=, 3 <, 4 <=, 5 != */
        if (strncmp(ver, ">=", 2) == 0) op = 2, ver += 2;
        else if (strncmp(ver, "<=", 2) == 0) op = 4, ver += 2;
        else if (strncmp(ver, "!=", 2) == 0) op = 5, ver += 2;
        else if (*ver == '>') op = 1, ver++;
        else if (*ver == '<') op = 3, ver++;
        else if (*ver == '=') op = 0, ver++;
        else op = 0;
        ota_semver_t b;
        if (ota_semver_parse(ver, &b)) return -1;
        if (!v) continue;
        int c = ota_semver_cmp(v, &b);
        int m = op == 0 ? c == 0 : op == 1 ? c > 0 : op == 2 ? c >= 0 : op == 3 ? c < 0 : op == 4 ? c <= 0 : c != 0;
        ok &= m;
    }
}

int ota_semver_range_check(const char *range) { return ota__range(NULL, range) < 0 ? -1 : 0; }

int ota_semver_in_range(const ota_semver_t *v, const char *range) { return ota__range(v, range); }
