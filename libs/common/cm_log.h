/* Structured logging: one JSON object per line on stderr.
 *
 * Every line carries time, level, service and, when the calling thread is serving a request, the
 * W3C trace id of that request. CM_LOG checks the level before any formatting happens, so debug
 * lines cost a load and a compare when disabled. Never pass secrets or tokens to these functions.
 *
 *   CM_LOG(CM_LOG_INFO, "listening on %s", addr);
 *   cm_log_kv(CM_LOG_WARN, "redis reconnect", "addr", addr, "attempt", "3", NULL);
 */
#ifndef CM_LOG_H
#define CM_LOG_H

#include <stdarg.h>
#include <stddef.h>

typedef enum { CM_LOG_DEBUG = 0, CM_LOG_INFO, CM_LOG_WARN, CM_LOG_ERROR, CM_LOG_OFF } cm_log_level_t;

extern int cm__log_level;

#define CM_LOG(level, ...)                                  \
    do {                                                    \
        if ((int)(level) >= cm__log_level) cm__log((level), __VA_ARGS__); \
    } while (0)

/* Sets the service name and level for the process (not thread safe: call once at start). */
void cm_log_init(const char *service, cm_log_level_t level);
/* Parses "debug", "info", "warn", "error", "off"; returns -1 if unknown. */
int cm_log_level_parse(const char *s);
void cm__log(cm_log_level_t level, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
/* msg, then NULL-terminated key/value string pairs emitted as extra JSON fields. */
void cm_log_kv(cm_log_level_t level, const char *msg, ...);

/* ---- trace context (W3C traceparent) --------------------------------------------------- */

typedef struct cm_trace_s {
    char trace_id[33]; /* 32 lowercase hex digits, or "" for none */
    char span_id[17];  /* 16 hex digits */
    unsigned char flags;
} cm_trace_t;

/* Parses a traceparent header ("00-<trace>-<span>-<flags>"); 0 on success, CM_EINVAL otherwise. */
int cm_trace_parse(cm_trace_t *t, const char *value, size_t len);
/* Starts a new trace with random ids. */
void cm_trace_new(cm_trace_t *t);
/* Formats a traceparent for an outgoing call: same trace id, a new span id. buf >= 56 bytes. */
void cm_trace_child_header(const cm_trace_t *t, char *buf, size_t len);
/* The trace of the request the calling thread is serving, or NULL. */
const cm_trace_t *cm_trace_current(void);
/* Sets (or with NULL clears) the calling thread's trace; returns the previous one. */
const cm_trace_t *cm_trace_set_current(const cm_trace_t *t);

/* Appends s as JSON string contents (no quotes) to buf[*pos..cap), truncating safely. */
void cm_json_escape(char *buf, size_t cap, size_t *pos, const char *s, size_t n);

#endif
