/* JSON-lines logger and W3C trace context helpers. */
#include "cm_log.h"
#include "cm_err.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <time.h>
#include <unistd.h>

int cm__log_level = CM_LOG_INFO;
static char cm__service[64] = "iotsuite";
static _Thread_local const cm_trace_t *cm__trace_tls;

static const char *const cm__level_names[] = {"debug", "info", "warn", "error", "off"};

void cm_log_init(const char *service, cm_log_level_t level) {
    snprintf(cm__service, sizeof cm__service, "%s", service);
    cm__log_level = (int)level;
}

int cm_log_level_parse(const char *s) {
    for (int i = 0; i <= CM_LOG_OFF; i++)
        if (strcmp(s, cm__level_names[i]) == 0) return i;
    if (strcmp(s, "warning") == 0) return CM_LOG_WARN;
    return -1;
}

void cm_json_escape(char *buf, size_t cap, size_t *pos, const char *s, size_t n) {
    static const char hex[] = "0123456789abcdef";
    size_t p = *pos;
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)s[i];
        /* Worst case one character becomes six; keep room for the closing of the line. */
        if (p + 7 >= cap) break;
        switch (c) {
        case '"': buf[p++] = '\\'; buf[p++] = '"'; break;
        case '\\': buf[p++] = '\\'; buf[p++] = '\\'; break;
        case '\n': buf[p++] = '\\'; buf[p++] = 'n'; break;
        case '\r': buf[p++] = '\\'; buf[p++] = 'r'; break;
        case '\t': buf[p++] = '\\'; buf[p++] = 't'; break;
        default:
            if (c < 0x20) {
                buf[p++] = '\\'; buf[p++] = 'u'; buf[p++] = '0'; buf[p++] = '0';
                buf[p++] = hex[c >> 4]; buf[p++] = hex[c & 15];
            } else {
                buf[p++] = (char)c;
            }
        }
    }
    *pos = p;
}

static void cm__append(char *buf, size_t cap, size_t *pos, const char *s) {
    size_t n = strlen(s);
    if (*pos + 1 >= cap) return;
    if (*pos + n >= cap) n = cap - *pos - 1;
    memcpy(buf + *pos, s, n);
    *pos += n;
}

/* Writes the common prefix: {"ts":..,"level":..,"service":..,["trace_id":..,]"msg":" */
static size_t cm__log_prefix(char *buf, size_t cap, cm_log_level_t level) {
    struct timespec ts;
    struct tm tm;
    clock_gettime(CLOCK_REALTIME, &ts);
    gmtime_r(&ts.tv_sec, &tm);
    int n = snprintf(buf, cap, "{\"ts\":\"%04d-%02d-%02dT%02d:%02d:%02d.%03ldZ\",\"level\":\"%s\",\"service\":\"%s\"",
                     tm.tm_year + 1900, tm.tm_mon + 1, tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec,
                     ts.tv_nsec / 1000000, cm__level_names[level], cm__service);
    size_t pos = (size_t)n;
    const cm_trace_t *t = cm__trace_tls;
    if (t && t->trace_id[0]) {
        cm__append(buf, cap, &pos, ",\"trace_id\":\"");
        cm__append(buf, cap, &pos, t->trace_id);
        cm__append(buf, cap, &pos, "\"");
    }
    cm__append(buf, cap, &pos, ",\"msg\":\"");
    return pos;
}

static void cm__log_emit(char *buf, size_t cap, size_t pos) {
    if (pos + 3 > cap) pos = cap - 3;
    buf[pos++] = '}';
    buf[pos++] = '\n';
    /* One write per line so that lines from different threads never interleave. */
    ssize_t r = write(STDERR_FILENO, buf, pos);
    (void)r;
}

void cm__log(cm_log_level_t level, const char *fmt, ...) {
    char msg[1024], buf[2048];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    if (n < 0) n = 0;
    if ((size_t)n >= sizeof msg) n = sizeof msg - 1;
    size_t pos = cm__log_prefix(buf, sizeof buf, level);
    cm_json_escape(buf, sizeof buf, &pos, msg, (size_t)n);
    cm__append(buf, sizeof buf, &pos, "\"");
    cm__log_emit(buf, sizeof buf, pos);
}

void cm_log_kv(cm_log_level_t level, const char *msg, ...) {
    if ((int)level < cm__log_level) return;
    char buf[2048];
    size_t pos = cm__log_prefix(buf, sizeof buf, level);
    cm_json_escape(buf, sizeof buf, &pos, msg, strlen(msg));
    cm__append(buf, sizeof buf, &pos, "\"");
    va_list ap;
    va_start(ap, msg);
    for (;;) {
        const char *k = va_arg(ap, const char *);
        if (!k) break;
        const char *v = va_arg(ap, const char *);
        if (!v) v = "";
        cm__append(buf, sizeof buf, &pos, ",\"");
        cm_json_escape(buf, sizeof buf, &pos, k, strlen(k));
        cm__append(buf, sizeof buf, &pos, "\":\"");
        cm_json_escape(buf, sizeof buf, &pos, v, strlen(v));
        cm__append(buf, sizeof buf, &pos, "\"");
    }
    va_end(ap);
    cm__log_emit(buf, sizeof buf, pos);
}

/* ---- trace context --------------------------------------------------------------------- */

static int cm__is_hex(const char *s, size_t n) {
    int nonzero = 0;
    for (size_t i = 0; i < n; i++) {
        char c = s[i];
        if (!((c >= '0' && c <= '9') || (c >= 'a' && c <= 'f'))) return 0;
        if (c != '0') nonzero = 1;
    }
    return nonzero; /* all-zero ids are invalid per the W3C spec */
}

int cm_trace_parse(cm_trace_t *t, const char *v, size_t len) {
    /* version(2) - trace(32) - span(16) - flags(2) = 55 characters; later versions may append. */
    if (len < 55 || v[2] != '-' || v[35] != '-' || v[52] != '-') return CM_EINVAL;
    if (len > 55 && v[55] != '-') return CM_EINVAL;
    if (v[0] == 'f' && v[1] == 'f') return CM_EINVAL; /* version ff is forbidden */
    if (!cm__is_hex(v + 3, 32) || !cm__is_hex(v + 36, 16)) return CM_EINVAL;
    unsigned flags;
    char fl[3] = {v[53], v[54], 0};
    if (sscanf(fl, "%2x", &flags) != 1) return CM_EINVAL;
    memcpy(t->trace_id, v + 3, 32);
    t->trace_id[32] = '\0';
    memcpy(t->span_id, v + 36, 16);
    t->span_id[16] = '\0';
    t->flags = (unsigned char)flags;
    return 0;
}

/* Trace and span ids need to be unique, not secret: a per-thread xorshift generator seeded once
 * from getrandom() keeps a syscall off every request. */
static _Thread_local uint64_t cm__rng_state;

static uint64_t cm__rng_next(void) {
    if (!cm__rng_state) {
        uint64_t seed = 0;
        if (getrandom(&seed, sizeof seed, 0) != (ssize_t)sizeof seed || !seed) {
            struct timespec ts;
            clock_gettime(CLOCK_MONOTONIC, &ts);
            seed = ((uint64_t)ts.tv_sec << 32) ^ (uint64_t)ts.tv_nsec ^ (uint64_t)(uintptr_t)&seed;
        }
        cm__rng_state = seed | 1;
    }
    uint64_t x = cm__rng_state; /* xorshift64* */
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    cm__rng_state = x;
    return x * 0x2545F4914F6CDD1DULL;
}

static void cm__random_hex(char *out, size_t nhex) {
    static const char hex[] = "0123456789abcdef";
    for (size_t i = 0; i < nhex; i += 16) {
        uint64_t v = cm__rng_next();
        for (size_t j = 0; j < 16 && i + j < nhex; j++) out[i + j] = hex[(v >> (4 * j)) & 15];
    }
    out[0] = out[0] == '0' ? '1' : out[0]; /* never all zero (invalid per W3C) */
    out[nhex] = '\0';
}

void cm_trace_new(cm_trace_t *t) {
    cm__random_hex(t->trace_id, 32);
    cm__random_hex(t->span_id, 16);
    t->flags = 1;
}

void cm_trace_child_header(const cm_trace_t *t, char *buf, size_t len) {
    char span[17];
    cm__random_hex(span, 16);
    snprintf(buf, len, "00-%s-%s-%02x", t->trace_id, span, t->flags);
}

const cm_trace_t *cm_trace_current(void) {
    return cm__trace_tls;
}

const cm_trace_t *cm_trace_set_current(const cm_trace_t *t) {
    const cm_trace_t *prev = cm__trace_tls;
    cm__trace_tls = t;
    return prev;
}
