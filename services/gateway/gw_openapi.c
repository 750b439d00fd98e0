/* GET /api/v1/openapi.json: an OpenAPI 3.0 document made from the route table and the protobuf-c
 * descriptors it names, so it cannot drift from what is served. Schemas follow the proto3 JSON
 * mapping of cm_pbjson (lowerCamelCase, enums as names, 64-bit integers as strings, Timestamp as
 * date-time). Built once, on first request. */
#include <pthread.h>
#include <stdio.h>
#include <string.h>

#include "cm_json.h"
#include "cm_pbjson.h"
#include "gw_openapi.h"

static const char *gw__role(int role) {
    return role == GW_ROLE_ADMIN ? "admin" : role == GW_ROLE_OPERATOR ? "operator" : role == GW_ROLE_VIEWER ? "viewer"
           : role == GW_ROLE_PUBLIC ? "none (no key)" : "device (its token)";
}

static json_t *gw__ref(const ProtobufCMessageDescriptor *d) {
    char ref[256];
    snprintf(ref, sizeof ref, "#/components/schemas/%s", d->name);
    return json_pack("{s:s}", "$ref", ref);
}

static void gw__schema(json_t *schemas, const ProtobufCMessageDescriptor *d);

/* The schema of one value of field f (not the repetition). */
static json_t *gw__value_schema(json_t *schemas, const ProtobufCFieldDescriptor *f) {
    switch (f->type) {
    case PROTOBUF_C_TYPE_INT32:
    case PROTOBUF_C_TYPE_SINT32:
    case PROTOBUF_C_TYPE_SFIXED32: return json_pack("{s:s,s:s}", "type", "integer", "format", "int32");
    case PROTOBUF_C_TYPE_UINT32:
    case PROTOBUF_C_TYPE_FIXED32: return json_pack("{s:s,s:s,s:i}", "type", "integer", "format", "int32", "minimum", 0);
    case PROTOBUF_C_TYPE_INT64:
    case PROTOBUF_C_TYPE_SINT64:
    case PROTOBUF_C_TYPE_SFIXED64:
    case PROTOBUF_C_TYPE_UINT64:
    case PROTOBUF_C_TYPE_FIXED64: return json_pack("{s:s,s:s}", "type", "string", "format", "int64");
    case PROTOBUF_C_TYPE_FLOAT: return json_pack("{s:s,s:s}", "type", "number", "format", "float");
    case PROTOBUF_C_TYPE_DOUBLE: return json_pack("{s:s,s:s}", "type", "number", "format", "double");
    case PROTOBUF_C_TYPE_BOOL: return json_pack("{s:s}", "type", "boolean");
    case PROTOBUF_C_TYPE_STRING: return json_pack("{s:s}", "type", "string");
    case PROTOBUF_C_TYPE_BYTES: return json_pack("{s:s,s:s}", "type", "string", "format", "byte");
    case PROTOBUF_C_TYPE_ENUM: {
        const ProtobufCEnumDescriptor *e = f->descriptor;
        json_t *names = json_array();
        for (unsigned i = 0; i < e->n_values; i++) json_array_append_new(names, json_string(e->values[i].name));
        return json_pack("{s:s,s:o}", "type", "string", "enum", names);
    }
    case PROTOBUF_C_TYPE_MESSAGE: {
        const ProtobufCMessageDescriptor *m = f->descriptor;
        if (strcmp(m->name, "google.protobuf.Timestamp") == 0) return json_pack("{s:s,s:s}", "type", "string", "format", "date-time");
        if (strcmp(m->name, "google.protobuf.FieldMask") == 0)
            return json_pack("{s:s,s:s}", "type", "string", "description", "comma-separated field paths in lowerCamelCase");
        if (strcmp(m->name, "google.protobuf.Struct") == 0) return json_pack("{s:s,s:b}", "type", "object", "additionalProperties", 1);
        if (strcmp(m->name, "google.protobuf.Value") == 0) return json_object();
        gw__schema(schemas, m);
        return gw__ref(m);
    }
    }
    return json_object();
}

static json_t *gw__field_schema(json_t *schemas, const ProtobufCFieldDescriptor *f) {
    if (cm_pbjson_is_map(f)) {
        const ProtobufCMessageDescriptor *m = f->descriptor;
        return json_pack("{s:s,s:o}", "type", "object", "additionalProperties", gw__value_schema(schemas, &m->fields[1]));
    }
    json_t *v = gw__value_schema(schemas, f);
    if (f->label == PROTOBUF_C_LABEL_REPEATED) return json_pack("{s:s,s:o}", "type", "array", "items", v);
    return v;
}

/* Adds d (and what it uses) to schemas, once. */
static void gw__schema(json_t *schemas, const ProtobufCMessageDescriptor *d) {
    if (json_object_get(schemas, d->name)) return;
    json_t *props = json_object();
    json_t *s = json_pack("{s:s,s:O,s:b}", "type", "object", "properties", props, "additionalProperties", 0);
    json_object_set_new(schemas, d->name, s); /* before the fields: recursive messages end here */
    for (unsigned i = 0; i < d->n_fields; i++) {
        char camel[128];
        cm_pbjson_camel(d->fields[i].name, camel, sizeof camel);
        json_object_set_new(props, camel, gw__field_schema(schemas, &d->fields[i]));
    }
    json_decref(props);
}

/* Query parameters: the request's scalar fields (and repeated scalars) not set by the path or the
 * body, one level of sub-message fields as dotted names (filter.type). */
static void gw__query_params(json_t *params, json_t *schemas, const gw_route_t *rt, const ProtobufCMessageDescriptor *d,
                             const char *prefix, int depth) {
    for (unsigned i = 0; i < d->n_fields; i++) {
        const ProtobufCFieldDescriptor *f = &d->fields[i];
        char name[200], camel[128];
        cm_pbjson_camel(f->name, camel, sizeof camel);
        snprintf(name, sizeof name, "%s%s", prefix, camel);
        if (!*prefix && rt->body && (strcmp(rt->body, "*") == 0 || strcmp(rt->body, f->name) == 0)) continue;
        char brace[210];
        snprintf(brace, sizeof brace, "{%s}", f->name);
        if (!*prefix && strstr(rt->pattern, brace)) continue;
        if (f->type == PROTOBUF_C_TYPE_MESSAGE && !cm_pbjson_is_map(f)) {
            const ProtobufCMessageDescriptor *m = f->descriptor;
            if (strcmp(m->name, "google.protobuf.Timestamp") && strcmp(m->name, "google.protobuf.FieldMask")) {
                if (depth == 0 && f->label != PROTOBUF_C_LABEL_REPEATED) {
                    char sub[210];
                    snprintf(sub, sizeof sub, "%s.", name);
                    gw__query_params(params, schemas, rt, m, sub, 1);
                }
                continue;
            }
        }
        if (cm_pbjson_is_map(f)) continue;
        json_t *p = json_pack("{s:s,s:s,s:o}", "name", name, "in", "query", "schema", gw__field_schema(schemas, f));
        if (f->label == PROTOBUF_C_LABEL_REPEATED) json_object_set_new(p, "explode", json_true());
        json_array_append_new(params, p);
    }
}

static json_t *gw__error_response(const char *what) {
    return json_pack("{s:s,s:{s:{s:{s:s}}}}", "description", what, "content", "application/json", "schema", "$ref",
                     "#/components/schemas/Error");
}

static json_t *gw__operation(json_t *schemas, const gw_route_t *rt) {
    json_t *op = json_object();
    json_object_set_new(op, "summary", json_string(rt->summary));
    char desc[300];
    snprintf(desc, sizeof desc, "Role: %s.%s%s", gw__role(rt->role), rt->rpc ? " gRPC: " : "", rt->rpc ? rt->rpc : "");
    json_object_set_new(op, "description", json_string(desc));
    char opid[200];
    snprintf(opid, sizeof opid, "%s %s", rt->method, rt->pattern);
    json_object_set_new(op, "operationId", json_string(opid));
    json_t *params = json_array();
    for (const char *p = strchr(rt->pattern, '{'); p; p = strchr(p + 1, '{')) {
        const char *e = strchr(p, '}');
        char name[64];
        snprintf(name, sizeof name, "%.*s", (int)(e - p - 1), p + 1);
        json_array_append_new(params, json_pack("{s:s,s:s,s:b,s:{s:s}}", "name", name, "in", "path", "required", 1, "schema", "type", "string"));
    }
    if (rt->begin) { /* a streamed body: the query carries the request's fields */
        gw__query_params(params, schemas, rt, rt->req, "", 0);
        json_object_set_new(op, "requestBody",
                            json_pack("{s:b,s:{s:{s:{s:s,s:s}}}}", "required", 1, "content", "application/octet-stream", "schema",
                                      "type", "string", "format", "binary"));
    } else if ((strcmp(rt->method, "GET") == 0 || strcmp(rt->method, "DELETE") == 0 || rt->body) && !strstr(rt->pattern, "/content")) {
        gw__query_params(params, schemas, rt, rt->req, "", 0); /* a download takes Range, no query */
    }
    if (strcmp(rt->pattern, "/api/v1/artifacts/{artifact_id}/content") == 0)
        json_array_append_new(params, json_pack("{s:s,s:s,s:s,s:{s:s}}", "name", "Range", "in", "header", "description",
                                                "bytes=<offset>- resumes", "schema", "type", "string"));
    if (strstr(rt->pattern, "/stream"))
        json_array_append_new(params, json_pack("{s:s,s:s,s:s,s:{s:s}}", "name", "Last-Event-ID", "in", "header", "description",
                                                "resume after this event", "schema", "type", "string"));
    json_object_set_new(op, "parameters", params);
    if (rt->body && !rt->begin) {
        json_t *schema;
        if (strcmp(rt->body, "*") == 0) {
            gw__schema(schemas, rt->req);
            schema = gw__ref(rt->req);
        } else {
            schema = gw__value_schema(schemas, cm_pbjson_field(rt->req, rt->body));
        }
        json_object_set_new(op, "requestBody", json_pack("{s:b,s:{s:{s:o}}}", "required", 1, "content", "application/json", "schema", schema));
    }
    char ok[8];
    snprintf(ok, sizeof ok, "%d", rt->ok_status ? rt->ok_status : 200);
    json_t *resp = json_object();
    if (strstr(rt->pattern, "/stream")) {
        json_object_set_new(resp, ok, json_pack("{s:s,s:{s:{s:{s:s}}}}", "description", "Server-Sent Events; each data line is one message as JSON",
                                                "content", "text/event-stream", "schema", "type", "string"));
        gw__schema(schemas, rt->resp);
    } else if (strstr(rt->pattern, "/content")) {
        json_object_set_new(resp, ok, json_pack("{s:s,s:{s:{s:{s:s,s:s}}}}", "description", "the artifact's bytes", "content",
                                                "application/octet-stream", "schema", "type", "string", "format", "binary"));
        json_object_set_new(resp, "206", json_pack("{s:s}", "description", "the bytes from the Range offset"));
    } else {
        gw__schema(schemas, rt->resp);
        json_object_set_new(resp, ok, json_pack("{s:s,s:{s:{s:o}}}", "description", "OK", "content", "application/json", "schema", gw__ref(rt->resp)));
    }
    json_object_set_new(resp, "400", gw__error_response("invalid argument or malformed JSON"));
    if (rt->role != GW_ROLE_PUBLIC) json_object_set_new(resp, "401", gw__error_response("no key or token, or not valid"));
    if (rt->role > 0) json_object_set_new(resp, "403", gw__error_response("the key's role is not enough"));
    json_object_set_new(resp, "404", gw__error_response("not found"));
    if (strcmp(rt->method, "GET") != 0) {
        json_object_set_new(resp, "409", gw__error_response("already exists, or the etag / expected version does not match"));
        json_object_set_new(resp, "413", gw__error_response("the body is over the limit (IOT_GW_MAX_BODY, IOT_GW_MAX_UPLOAD)"));
    }
    /* Reads answer it too: GetWindowStats for a rule that keeps no window. */
    if (strcmp(rt->method, "GET") != 0 || rt->rpc)
        json_object_set_new(resp, "412", gw__error_response("the resource's state does not allow this (the message names it)"));
    if (rt->rpc) {
        /* A backend's retry-after-ms hint (ingest's rate limit and back-pressure) comes back as
         * Retry-After and details.retryAfterMs; 503 may carry it too. */
        json_t *e = gw__error_response("a limit was reached (a device's rate, a backend's queue); wait Retry-After when given");
        json_object_set_new(e, "headers", json_pack("{s:{s:s,s:{s:s,s:i}}}", "Retry-After", "description",
                                                    "seconds to wait before retrying", "schema", "type", "integer", "minimum", 0));
        json_object_set_new(resp, "429", e);
    }
    json_object_set_new(resp, "503", gw__error_response("a backend is unavailable (details.service names it)"));
    json_object_set_new(resp, "504", gw__error_response("a backend did not answer in time"));
    json_object_set_new(op, "responses", resp);
    json_object_set_new(op, "security", rt->role > 0 ? json_pack("[{s:[]},{s:[]}]", "bearer", "apiKey")
                                        : rt->role == 0 ? json_pack("[{s:[]}]", "deviceToken") : json_array());
    json_object_set_new(op, "tags", json_pack("[s]", rt->backend >= 0 && rt->rpc ? gw_backend_name(rt->backend) : "gateway"));
    return op;
}

static json_t *gw__build(void) {
    json_t *schemas = json_object();
    json_object_set_new(schemas, "Error",
                        json_pack("{s:s,s:{s:{s:s},s:{s:s},s:{s:s},s:{s:s}}}", "type", "object", "properties", "code", "type", "integer",
                                  "status", "type", "string", "message", "type", "string", "details", "type", "object"));
    json_t *paths = json_object();
    for (size_t i = 0; i < gw_n_routes; i++) {
        const gw_route_t *rt = &gw_routes[i];
        json_t *item = json_object_get(paths, rt->pattern);
        if (!item) {
            item = json_object();
            json_object_set_new(paths, rt->pattern, item);
        }
        char m[16];
        size_t k;
        for (k = 0; rt->method[k] && k < sizeof m - 1; k++) m[k] = (char)(rt->method[k] | 0x20);
        m[k] = 0;
        json_object_set_new(item, m, gw__operation(schemas, rt));
    }
    return json_pack("{s:s,s:{s:s,s:s,s:s},s:o,s:{s:o,s:{s:{s:s,s:s,s:s},s:{s:s,s:s,s:s},s:{s:s,s:s,s:s}}}}", "openapi", "3.0.3", "info",
                     "title", "iotsuite REST API", "version", "v1", "description",
                     "The gateway in front of device-mgmt, ingest, processing, ota and registry. JSON follows the proto3 JSON mapping.",
                     "paths", paths, "components", "schemas", schemas, "securitySchemes", "bearer", "type", "http", "scheme", "bearer",
                     "description", "an API key: iotk_<id>_<secret>", "apiKey", "type", "apiKey", "in", "header", "name", "X-API-Key",
                     "deviceToken", "type", "http", "scheme", "bearer", "description", "a device token from device-mgmt");
}

static pthread_once_t gw__once = PTHREAD_ONCE_INIT;
static char *gw__doc;

static void gw__make(void) {
    json_t *j = gw__build();
    gw__doc = cm_json_dump(j);
    json_decref(j);
}

void gw_openapi(gw_req_t *r) {
    if (!gw_build_request_or_reply(r)) return; /* no parameters: an unknown one is a 400, as everywhere */
    pthread_once(&gw__once, gw__make);
    if (!gw__doc) {
        gw_reply_error(r, CM_STATUS_INTERNAL, NULL, "the OpenAPI document could not be built");
        return;
    }
    cm_http_reply(r->http, 200, "application/json", gw__doc, strlen(gw__doc), NULL, 0);
    r->status = 200;
}

void gw_openapi_free(void) {
    cm_free(gw__doc);
    gw__doc = NULL;
}
