/* The REST request pipeline: route matching, API key checks and roles, errors as JSON with the
 * HTTP status of their gRPC code, one log line per request, request metrics. */
#include <errno.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cm_err.h"
#include "cm_json.h"
#include "cm_log.h"
#include "cm_pbjson.h"
#include "cm_time.h"
#include "gw.h"

static void gw__done(void *p);

int gw_http_status(int code) {
    switch (code) {
    case CM_STATUS_OK: return 200;
    case CM_STATUS_CANCELLED: return 499;
    case CM_STATUS_INVALID_ARGUMENT:
    case CM_STATUS_OUT_OF_RANGE: return 400;
    case CM_STATUS_DEADLINE_EXCEEDED: return 504;
    case CM_STATUS_NOT_FOUND: return 404;
    case CM_STATUS_ALREADY_EXISTS:
    case CM_STATUS_ABORTED: return 409;
    case CM_STATUS_PERMISSION_DENIED: return 403;
    case CM_STATUS_UNAUTHENTICATED: return 401;
    case CM_STATUS_RESOURCE_EXHAUSTED: return 429;
    case CM_STATUS_FAILED_PRECONDITION: return 412;
    case CM_STATUS_UNIMPLEMENTED: return 501;
    case CM_STATUS_UNAVAILABLE: return 503;
    default: return 500; /* UNKNOWN, INTERNAL, DATA_LOSS */
    }
}

const char *gw_param(const gw_req_t *r, const char *name) {
    for (int i = 0; i < r->n_params; i++)
        if (strcmp(r->param_name[i], name) == 0) return r->param[i];
    return NULL;
}

void gw_reply_json(gw_req_t *r, int status, json_t *j) {
    char *s = cm_json_dump(j);
    json_decref(j);
    if (!s) {
        static const char msg[] = "{\"code\":13,\"status\":\"INTERNAL\",\"message\":\"the answer could not be written as JSON\"}";
        cm_http_reply(r->http, 500, "application/json", msg, sizeof msg - 1, NULL, 0);
        r->status = 500;
        return;
    }
    cm_http_reply(r->http, status, "application/json", s, strlen(s), NULL, 0);
    cm_free(s);
    r->status = status;
}

void gw_reply_msg(gw_req_t *r, int status, const ProtobufCMessage *m) {
    json_t *j = cm_pbjson_from_msg(m);
    if (!j) {
        gw_reply_error(r, CM_STATUS_INTERNAL, NULL, "the answer holds a value JSON cannot carry");
        return;
    }
    gw_reply_json(r, status, j);
}

/* The error body with an explicit HTTP status (405 and 413 have no gRPC code of their own), and
 * extra, when not NULL, as one more header. */
static void gw__verror(gw_req_t *r, int status, int code, json_t *details, const cm_http_header_t *extra, const char *fmt,
                       va_list ap) {
    char msg[1024];
    vsnprintf(msg, sizeof msg, fmt, ap);
    json_t *j = json_object();
    json_object_set_new(j, "code", json_integer(code));
    json_object_set_new(j, "status", json_string(cm_status_name(code)));
    /* A message may echo bytes of the request (a query parameter's name) or come from a backend cut
     * at its length limit in the middle of a character: keep it readable rather than drop it. */
    json_object_set_new(j, "message", cm_json_text(msg));
    json_object_set_new(j, "details", details ? details : json_object());
    char *s = cm_json_dump(j);
    json_decref(j);
    cm_http_header_t h[2];
    size_t n = 0;
    if (code == CM_STATUS_UNAUTHENTICATED) h[n++] = (cm_http_header_t){"WWW-Authenticate", "Bearer realm=\"iotsuite\""};
    if (extra) h[n++] = *extra;
    cm_http_reply(r->http, status, "application/json", s, strlen(s), h, n);
    cm_free(s);
    r->status = status;
}

void gw_reply_error_http(gw_req_t *r, int status, int code, json_t *details, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    gw__verror(r, status, code, details, NULL, fmt, ap);
    va_end(ap);
}

void gw_reply_error(gw_req_t *r, int code, json_t *details, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    gw__verror(r, gw_http_status(code), code, details, NULL, fmt, ap);
    va_end(ap);
}

/* gw_reply_error with one more header. */
static void gw__error_with(gw_req_t *r, int code, json_t *details, const cm_http_header_t *extra, const char *fmt, ...)
    __attribute__((format(printf, 5, 6)));
static void gw__error_with(gw_req_t *r, int code, json_t *details, const cm_http_header_t *extra, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    gw__verror(r, gw_http_status(code), code, details, extra, fmt, ap);
    va_end(ap);
}

void gw_reply_backend_error(gw_req_t *r, int backend, const cm_rpc_status_t *st) {
    const char *name = gw_backend_name(backend);
    json_t *d = json_object();
    if (st->code == CM_STATUS_UNAVAILABLE || st->code == CM_STATUS_DEADLINE_EXCEEDED) json_object_set_new(d, "service", json_string(name));
    /* A backend that says when to come back (ingest's "retry-after-ms" trailer with
     * RESOURCE_EXHAUSTED and UNAVAILABLE) is passed on as Retry-After, whole seconds rounded up,
     * and as details.retryAfterMs: a REST client sees no trailers, and without the hint a device
     * pushing over its rate limit can only guess how long to back off. */
    const char *hint = cm_rpc_status_md(st, "retry-after-ms");
    char secs[24];
    cm_http_header_t ra = {"Retry-After", secs}, *extra = NULL;
    if (hint) {
        char *end;
        errno = 0;
        long long ms = strtoll(hint, &end, 10);
        if (end != hint && !*end && !errno && ms >= 0) {
            json_object_set_new(d, "retryAfterMs", json_integer(ms));
            snprintf(secs, sizeof secs, "%lld", ms / 1000 + (ms % 1000 != 0));
            extra = &ra;
        }
    }
    if (st->code == CM_STATUS_UNAVAILABLE || st->code == CM_STATUS_DEADLINE_EXCEEDED) {
        gw__error_with(r, st->code, d, extra, "%s %s: %s", name,
                       st->code == CM_STATUS_UNAVAILABLE ? "is unavailable" : "did not answer in time", st->message);
        return;
    }
    gw__error_with(r, st->code, d, extra, "%s", st->message[0] ? st->message : cm_status_name(st->code));
}

int gw_call(gw_req_t *r, int backend, const char *rpc, const ProtobufCMessage *req, const ProtobufCMessageDescriptor *resp,
            ProtobufCMessage **out, int idempotent, cm_rpc_status_t *st) {
    cm_call_opts_t o = {.timeout_ms = r->gw->cfg->timeout_ms, .idempotent = idempotent};
    *out = NULL;
    return cm_channel_unary(r->gw->ch[backend], rpc, req, resp, out, &o, st);
}

typedef struct gw__params_s {
    const char *name[GW_MAX_PARAMS], *value[GW_MAX_PARAMS];
    int n;
} gw__params_t;

/* Matches path against pattern, filling out's parameters (strings in a); 1 on a match. */
static int gw__match(const char *pattern, const char *path, cm_arena_t *a, gw__params_t *out) {
    int n = 0;
    const char *p = pattern, *s = path;
    while (*p && *s) {
        if (*p == '{') {
            const char *pe = strchr(p, '}');
            const char *se = strchr(s, '/');
            size_t sl = se ? (size_t)(se - s) : strlen(s);
            if (pe && pe[1] == ':') { /* "{id}:pause": the parameter ends at the segment's last ':' */
                const char *colon = NULL;
                for (const char *c = s; c < s + sl; c++)
                    if (*c == ':') colon = c;
                if (!colon) return 0;
                sl = (size_t)(colon - s);
            }
            if (!pe || sl == 0 || n == GW_MAX_PARAMS) return 0;
            out->name[n] = cm_arena_strndup(a, p + 1, (size_t)(pe - p - 1));
            out->value[n++] = cm_arena_strndup(a, s, sl);
            p = pe + 1;
            s += sl;
            continue;
        }
        if (*p != *s) return 0;
        p++;
        s++;
    }
    if (*p || *s) return 0;
    out->n = n;
    return 1;
}

static const char *gw__role_name(int role) {
    return role == GW_ROLE_ADMIN ? "admin" : role == GW_ROLE_OPERATOR ? "operator" : role == GW_ROLE_VIEWER ? "viewer" : "none";
}

/* The key from "Authorization: Bearer <key>" or "X-API-Key: <key>". */
static const char *gw__presented(gw_req_t *r) {
    const char *h = cm_http_header(r->http, "Authorization");
    if (h && strncasecmp(h, "Bearer ", 7) == 0) return h + 7;
    return cm_http_header(r->http, "X-API-Key");
}

/* Headers are in: find the route, check the key, tell how much body to take. Answers at once
 * (and the body is never read) for unknown routes and refused keys. */
static size_t gw__begin(cm_http_req_t *h, void *arg) {
    gw_t *gw = arg;
    gw_req_t *r = cm_calloc(1, sizeof *r);
    r->gw = gw;
    r->http = h;
    r->start_ns = cm_mono_ns();
    cm_arena_init(&r->arena, NULL, 0);
    cm_http_req_set_user(h, r, gw__done);
    const char *method = cm_http_method(h), *path = cm_http_path(h);
    if (cm_http_has_nul(h)) { /* the decoded path would name something else: "/devices/a%00b" is "/devices/a" */
        gw_reply_error(r, CM_STATUS_INVALID_ARGUMENT, NULL, "the path or the query holds an encoded NUL byte (%%00), which no parameter may contain");
        return 0;
    }
    if (gw_web_serve(r)) return 0;
    /* A route with an action ("/rules/{id}:setEnabled") wins over a bare parameter ("/rules/{id}"):
     * GET /rules/x:setEnabled is a 405, not a rule named "x:setEnabled". */
    int path_known = 0, best = -1;
    for (size_t i = 0; i < gw_n_routes; i++) {
        gw__params_t probe;
        if (!gw__match(gw_routes[i].pattern, path, &r->arena, &probe)) continue;
        int action = strstr(gw_routes[i].pattern, "}:") != NULL;
        if (action + 1 > path_known) {
            path_known = action + 1;
            best = -1;
        } else if (action + 1 < path_known) {
            continue;
        }
        if (best < 0 && (strcmp(gw_routes[i].method, method) == 0 ||
                         (strcmp(method, "HEAD") == 0 && strcmp(gw_routes[i].method, "GET") == 0))) {
            best = (int)i;
            memcpy(r->param_name, probe.name, sizeof r->param_name);
            memcpy(r->param, probe.value, sizeof r->param);
            r->n_params = probe.n;
        }
    }
    if (best >= 0) r->route = &gw_routes[best];
    if (!r->route) {
        if (path_known) gw_reply_error_http(r, 405, CM_STATUS_UNIMPLEMENTED, NULL, "%s is not served on %s", method, path);
        else gw_reply_error(r, CM_STATUS_NOT_FOUND, NULL, "no such route: %s %s (see /api/v1/openapi.json)", method, path);
        return 0;
    }
    if (r->route->role == 0 && !cm_http_header(h, "Authorization")) { /* refused before the body is read */
        gw_reply_error(r, CM_STATUS_UNAUTHENTICATED, NULL, "a device token is required: send \"Authorization: Bearer <token>\"");
        return 0;
    }
    if (r->route->role > 0) {
        const char *key = gw__presented(r);
        if (!key || !*key) {
            gw_reply_error(r, CM_STATUS_UNAUTHENTICATED, NULL, "an API key is required: send \"Authorization: Bearer <key>\" or \"X-API-Key: <key>\"");
            return 0;
        }
        int rc = gw_keys_check(gw->keys, key, &r->key);
        if (rc == CM_EPG) {
            gw_reply_error(r, CM_STATUS_UNAVAILABLE, json_pack("{s:s}", "service", "postgres"), "API keys cannot be checked right now (Postgres)");
            return 0;
        }
        if (rc) {
            gw_reply_error(r, CM_STATUS_UNAUTHENTICATED, NULL, "the API key is not valid (unknown, revoked or mistyped)");
            return 0;
        }
        if (r->key.role < r->route->role) {
            gw_reply_error(r, CM_STATUS_PERMISSION_DENIED, NULL, "%s %s needs the %s role; key %s is %s %s", method,
                           r->route->pattern, gw__role_name(r->route->role), r->key.id,
                           r->key.role == GW_ROLE_ADMIN ? "an" : "a", gw__role_name(r->key.role));
            return 0;
        }
    }
    if (r->route->begin) {
        r->route->begin(r);
        return 0; /* streamed (or answered): nothing is buffered */
    }
    return (size_t)gw->cfg->max_body;
}

static void gw__handle(cm_http_req_t *h, void *arg) {
    (void)arg;
    gw_req_t *r = cm_http_req_user(h);
    if (cm_http_body_too_big(h)) {
        gw_reply_error_http(r, 413, CM_STATUS_RESOURCE_EXHAUSTED, NULL, "the request body is over the limit of %" PRId64 " bytes (IOT_GW_MAX_BODY)",
                  r->gw->cfg->max_body);
        return;
    }
    if (r->route->handler) r->route->handler(r);
    else gw_proxy(r);
}

/* One line per request, when the response is over (so streams log their whole duration). */
static void gw__done(void *p) {
    gw_req_t *r = p;
    gw_t *gw = r->gw;
    double ms = (double)(cm_mono_ns() - r->start_ns) / 1e6;
    int cls = r->status >= 100 && r->status < 600 ? r->status / 100 : 0;
    cm_counter_add(gw->c_requests[cls], 1);
    cm_counter_add(gw->c_latency_us, (uint64_t)(ms * 1000));
    if (CM_LOG_INFO >= cm__log_level) { /* formats nothing when info is off */
        char st[8], lat[32];
        snprintf(st, sizeof st, "%d", r->status);
        snprintf(lat, sizeof lat, "%.3f", ms);
        cm_log_kv(CM_LOG_INFO, "request", "key_id", r->key.id[0] ? r->key.id : "-", "method", cm_http_method(r->http), "path",
                  cm_http_path(r->http), "status", st, "latency_ms", lat, "peer", cm_http_peer(r->http), NULL);
    }
    if (r->ext_free) r->ext_free(r->ext);
    cm_arena_free(&r->arena);
    cm_free(r);
}

int gw_http_start(gw_t *gw) {
    static const char *const classes[6] = {"class=\"other\"", "class=\"1xx\"", "class=\"2xx\"", "class=\"3xx\"",
                                           "class=\"4xx\"", "class=\"5xx\""};
    for (int i = 0; i < 6; i++)
        gw->c_requests[i] = cm_metrics_counter("gateway_http_requests_total", "REST requests answered, by status class", classes[i]);
    gw->c_latency_us = cm_metrics_counter("gateway_http_request_microseconds_total",
                                          "time from request headers to the end of the response, summed (divide by requests for the mean)", NULL);
    cm_http_opts_t o = {.listen = gw->cfg->http_listen, .max_connections = (unsigned)gw->cfg->max_connections,
                        .name = "gateway", .begin = gw__begin, .handle = gw__handle, .arg = gw};
    int err = 0;
    gw->http = cm_http_start(&o, &err);
    if (!gw->http) {
        cm_log_kv(CM_LOG_ERROR, "cannot listen for HTTP", "listen", gw->cfg->http_listen, "error", cm_strerror(err), NULL);
        return err;
    }
    return 0;
}

void gw_http_stop(gw_t *gw) {
    cm_http_stop(gw->http);
    gw->http = NULL;
}
