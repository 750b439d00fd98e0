/* The gateway's shared state and the pieces of a REST request: the route it matched, its path
 * parameters, the caller's key, and the helpers every route answers with. */
#ifndef GW_H
#define GW_H

#include <jansson.h>
#include <protobuf-c/protobuf-c.h>
#include <stdint.h>

#include "cm_alloc.h"
#include "cm_http.h"
#include "cm_metrics.h"
#include "cm_pg.h"
#include "cm_rpc.h"
#include "gw_config.h"
#include "gw_keys.h"

typedef struct gw_s {
    const gw_config_t *cfg;
    cm_channel_t *ch[GW_NBACKENDS];
    cm_pg_t *pg;
    gw_keys_t *keys;
    cm_http_t *http;
    cm_counter_t *c_requests[6]; /* by status class: 1xx..5xx, and failures to answer */
    cm_counter_t *c_latency_us;
} gw_t;

struct gw_route_s;
typedef struct gw_req_s gw_req_t;
/* A route's handler: answers r (gw_reply_*) and returns. */
typedef void (*gw_handler_fn)(gw_req_t *r);

#define GW_MAX_PARAMS 4

typedef struct gw_route_s {
    const char *method, *pattern; /* "/api/v1/devices/{id}": a {name} matches one segment */
    int role;                     /* least role (GW_ROLE_*); 0: no API key (it checks a device token) */
    gw_handler_fn handler;        /* NULL: the generic unary proxy below */
    /* The generic proxy: path parameters and query parameters set request fields by name; body is
     * NULL (no body), "*" (the body is the request) or a field the body fills. */
    int backend;
    const char *rpc;
    const ProtobufCMessageDescriptor *req, *resp;
    const char *body;
    int idempotent; /* safe to retry on UNAVAILABLE */
    int ok_status;  /* 0: 200 */
    const char *summary;
    /* Routes that take the body as a stream: runs when the headers are in (after the key check);
     * calls cm_http_req_stream_body, or answers at once. */
    void (*begin)(gw_req_t *r);
} gw_route_t;

struct gw_req_s {
    gw_t *gw;
    cm_http_req_t *http;
    const gw_route_t *route;
    const char *param_name[GW_MAX_PARAMS], *param[GW_MAX_PARAMS];
    int n_params;
    gw_key_t key; /* the caller (role 0 when the route needs no key) */
    cm_arena_t arena;
    int64_t start_ns;
    int status;
    void *ext; /* a route's own state, freed with ext_free when the response is over */
    void (*ext_free)(void *ext);
};

/* The route table (gw_routes.c). */
extern const gw_route_t gw_routes[];
extern const size_t gw_n_routes;

/* A path parameter by name, or NULL. */
const char *gw_param(const gw_req_t *r, const char *name);
/* Answers with the JSON document j (taking the reference). */
void gw_reply_json(gw_req_t *r, int status, json_t *j);
/* Answers with m as proto3 JSON. */
void gw_reply_msg(gw_req_t *r, int status, const ProtobufCMessage *m);
/* The error body {code, status, message, details}: the HTTP status follows the gRPC code. details
 * may be NULL (taken otherwise). */
void gw_reply_error(gw_req_t *r, int grpc_code, json_t *details, const char *fmt, ...) __attribute__((format(printf, 4, 5)));
/* The same with an HTTP status of its own (405, 413, 422 have no gRPC code of their own). */
void gw_reply_error_http(gw_req_t *r, int http_status, int grpc_code, json_t *details, const char *fmt, ...)
    __attribute__((format(printf, 5, 6)));
/* The HTTP status for a gRPC code. */
int gw_http_status(int grpc_code);
/* A backend call failed with st: the error, naming the backend when it is down or slow. */
void gw_reply_backend_error(gw_req_t *r, int backend, const cm_rpc_status_t *st);

/* Calls backend's rpc with req and the gateway's deadline; resp in *out (free with
 * protobuf_c_message_free_unpacked). The gRPC code. */
int gw_call(gw_req_t *r, int backend, const char *rpc, const ProtobufCMessage *req, const ProtobufCMessageDescriptor *resp,
            ProtobufCMessage **out, int idempotent, cm_rpc_status_t *st);
/* The request message of route from the body, path and query parameters, in r's arena; NULL after
 * answering 400. */
ProtobufCMessage *gw_build_request_or_reply(gw_req_t *r);

/* What gw_build_request_or_reply reads of an HTTP request, apart from the HTTP layer. */
typedef struct gw_parts_s {
    const char *body; /* the JSON body; body_len 0: none (an empty message) */
    size_t body_len;
    const char *const *query_name, *const *query; /* query parameters, in their order */
    size_t n_query;
    const char *const *param_name, *const *param; /* path parameters */
    int n_params;
} gw_parts_t;
/* The mapping behind it: rt's request message from the body (when the route takes one), then the
 * query, then the path parameters (the path wins), built in a. 0 with *out set, or CM_EINVAL with
 * the 400's message in err. */
int gw_request_from_parts(const gw_route_t *rt, const gw_parts_t *in, cm_arena_t *a, ProtobufCMessage **out, char *err,
                          size_t cap);
/* The generic unary proxy. */
void gw_proxy(gw_req_t *r);

/* Checks the route table against the descriptors (body fields, path parameters); 0 or CM_EINVAL
 * with why. Run at start, so a mistyped route cannot ship. */
int gw_routes_check(char *why, size_t cap);
/* Serves the dashboard's embedded files (GET/HEAD outside /api/): 1 when it answered r. */
int gw_web_serve(gw_req_t *r);
/* Starts and stops the HTTP side. */
int gw_http_start(gw_t *gw);
void gw_http_stop(gw_t *gw);

#endif
