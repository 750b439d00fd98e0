/* grpc.reflection.v1alpha.ServerReflection on every server, from the descriptor set that the build
 * embeds (build/gen/cm_descriptor_set.c: every project proto plus health and reflection).
 *
 * The set is parsed once, on first use, into a table of files (raw FileDescriptorProto bytes as
 * they appear in the set, plus the decoded form for symbol lookups). It is process-wide, immutable
 * after parsing and lives until exit (reachable from a static, so leak checkers do not count it). */
#include "cm_rpc_internal.h"
#include "cm_err.h"

#include <stdio.h>
#include <string.h>

#include "google/protobuf/descriptor.pb-c.h"
#include "grpc/reflection/v1alpha/reflection.pb-c.h"

extern const unsigned char cm__descriptor_set[];
extern const size_t cm__descriptor_set_len;

typedef struct cm__refl_file_s {
    const uint8_t *raw;
    size_t raw_len;
    Google__Protobuf__FileDescriptorProto *fd;
} cm__refl_file_t;

static pthread_once_t cm__refl_once = PTHREAD_ONCE_INIT;
static cm__refl_file_t *cm__refl_files;
static size_t cm__refl_n;

static int cm__varint(const uint8_t **p, const uint8_t *end, uint64_t *out) {
    uint64_t v = 0;
    for (int shift = 0; shift < 64 && *p < end; shift += 7) {
        uint8_t b = *(*p)++;
        v |= (uint64_t)(b & 0x7f) << shift;
        if (!(b & 0x80)) {
            *out = v;
            return 0;
        }
    }
    return -1;
}

static void cm__refl_parse(void) {
    /* FileDescriptorSet is `repeated FileDescriptorProto file = 1`: walk the length-delimited
     * entries so that each file is served byte for byte as protoc wrote it. */
    const uint8_t *p = cm__descriptor_set, *end = p + cm__descriptor_set_len;
    size_t cap = 16;
    cm__refl_files = cm_calloc(cap, sizeof *cm__refl_files);
    while (p < end) {
        uint64_t key, len;
        if (cm__varint(&p, end, &key) || key != 0x0a || cm__varint(&p, end, &len) || len > (uint64_t)(end - p)) {
            CM_LOG(CM_LOG_ERROR, "embedded descriptor set is malformed; reflection disabled");
            break;
        }
        Google__Protobuf__FileDescriptorProto *fd =
            google__protobuf__file_descriptor_proto__unpack(&cm_pb_allocator, (size_t)len, p);
        if (fd) {
            if (cm__refl_n == cap) cm__refl_files = cm_realloc(cm__refl_files, (cap *= 2) * sizeof *cm__refl_files);
            cm__refl_files[cm__refl_n++] = (cm__refl_file_t){p, (size_t)len, fd};
        }
        p += len;
    }
}

static const cm__refl_file_t *cm__refl_by_name(const char *name) {
    for (size_t i = 0; i < cm__refl_n; i++)
        if (strcmp(cm__refl_files[i].fd->name, name) == 0) return &cm__refl_files[i];
    return NULL;
}

/* Does `sym` equal prefix + "." + name (prefix may be empty)? */
static int cm__sym_is(const char *sym, const char *prefix, const char *name) {
    size_t pl = strlen(prefix);
    if (pl) {
        if (strncmp(sym, prefix, pl) != 0 || sym[pl] != '.') return 0;
        sym += pl + 1;
    }
    return strcmp(sym, name) == 0;
}

static int cm__refl_message_has(const Google__Protobuf__DescriptorProto *m, const char *prefix, const char *sym) {
    char full[512];
    snprintf(full, sizeof full, "%s%s%s", prefix, *prefix ? "." : "", m->name);
    if (strcmp(full, sym) == 0) return 1;
    for (size_t i = 0; i < m->n_nested_type; i++)
        if (cm__refl_message_has(m->nested_type[i], full, sym)) return 1;
    for (size_t i = 0; i < m->n_enum_type; i++)
        if (cm__sym_is(sym, full, m->enum_type[i]->name)) return 1;
    for (size_t i = 0; i < m->n_field; i++)
        if (cm__sym_is(sym, full, m->field[i]->name)) return 1;
    return 0;
}

static const cm__refl_file_t *cm__refl_by_symbol(const char *sym) {
    for (size_t f = 0; f < cm__refl_n; f++) {
        const Google__Protobuf__FileDescriptorProto *fd = cm__refl_files[f].fd;
        const char *pkg = fd->package ? fd->package : "";
        for (size_t i = 0; i < fd->n_message_type; i++)
            if (cm__refl_message_has(fd->message_type[i], pkg, sym)) return &cm__refl_files[f];
        for (size_t i = 0; i < fd->n_enum_type; i++)
            if (cm__sym_is(sym, pkg, fd->enum_type[i]->name)) return &cm__refl_files[f];
        for (size_t i = 0; i < fd->n_service; i++) {
            const Google__Protobuf__ServiceDescriptorProto *s = fd->service[i];
            if (cm__sym_is(sym, pkg, s->name)) return &cm__refl_files[f];
            char full[512];
            snprintf(full, sizeof full, "%s%s%s", pkg, *pkg ? "." : "", s->name);
            for (size_t j = 0; j < s->n_method; j++)
                if (cm__sym_is(sym, full, s->method[j]->name)) return &cm__refl_files[f];
        }
    }
    return NULL;
}

/* Appends f and, depth first, its transitive dependencies (each once) to out. */
static void cm__refl_collect(const cm__refl_file_t *f, const cm__refl_file_t **out, size_t *n, size_t max) {
    for (size_t i = 0; i < *n; i++)
        if (out[i] == f) return;
    if (*n == max) return;
    out[(*n)++] = f;
    for (size_t i = 0; i < f->fd->n_dependency; i++) {
        const cm__refl_file_t *d = cm__refl_by_name(f->fd->dependency[i]);
        if (d) cm__refl_collect(d, out, n, max);
    }
}

static void cm__refl_error(cm_call_t *call, Grpc__Reflection__V1alpha__ServerReflectionResponse *resp, int code,
                           const char *what, const char *name) {
    Grpc__Reflection__V1alpha__ErrorResponse *e = cm_call_alloc(call, sizeof *e);
    grpc__reflection__v1alpha__error_response__init(e);
    e->error_code = code;
    char buf[300];
    snprintf(buf, sizeof buf, "%s not found: %s", what, name);
    e->error_message = cm_call_strdup(call, buf);
    resp->message_response_case = GRPC__REFLECTION__V1ALPHA__SERVER_REFLECTION_RESPONSE__MESSAGE_RESPONSE_ERROR_RESPONSE;
    resp->error_response = e;
}

static void cm__refl_files_response(cm_call_t *call, Grpc__Reflection__V1alpha__ServerReflectionResponse *resp,
                                    const cm__refl_file_t *f) {
    const cm__refl_file_t *files[64];
    size_t n = 0;
    cm__refl_collect(f, files, &n, 64);
    Grpc__Reflection__V1alpha__FileDescriptorResponse *fr = cm_call_alloc(call, sizeof *fr);
    grpc__reflection__v1alpha__file_descriptor_response__init(fr);
    fr->n_file_descriptor_proto = n;
    fr->file_descriptor_proto = cm_call_alloc(call, n * sizeof *fr->file_descriptor_proto);
    for (size_t i = 0; i < n; i++) {
        fr->file_descriptor_proto[i].data = (uint8_t *)files[i]->raw;
        fr->file_descriptor_proto[i].len = files[i]->raw_len;
    }
    resp->message_response_case =
        GRPC__REFLECTION__V1ALPHA__SERVER_REFLECTION_RESPONSE__MESSAGE_RESPONSE_FILE_DESCRIPTOR_RESPONSE;
    resp->file_descriptor_response = fr;
}

static int cm__refl_message(cm_call_t *call, const ProtobufCMessage *msg) {
    cm_server_t *srv = cm_call_service_ctx(call);
    const Grpc__Reflection__V1alpha__ServerReflectionRequest *req = (const void *)msg;
    pthread_once(&cm__refl_once, cm__refl_parse);
    Grpc__Reflection__V1alpha__ServerReflectionResponse resp = GRPC__REFLECTION__V1ALPHA__SERVER_REFLECTION_RESPONSE__INIT;
    resp.valid_host = req->host;
    resp.original_request = (Grpc__Reflection__V1alpha__ServerReflectionRequest *)req;
    const cm__refl_file_t *f;
    switch (req->message_request_case) {
    case GRPC__REFLECTION__V1ALPHA__SERVER_REFLECTION_REQUEST__MESSAGE_REQUEST_LIST_SERVICES: {
        const char *names[32];
        size_t n = cm__server_service_names(srv, names, 32);
        Grpc__Reflection__V1alpha__ListServiceResponse *ls = cm_call_alloc(call, sizeof *ls);
        grpc__reflection__v1alpha__list_service_response__init(ls);
        ls->n_service = n;
        ls->service = cm_call_alloc(call, n * sizeof *ls->service);
        for (size_t i = 0; i < n; i++) {
            ls->service[i] = cm_call_alloc(call, sizeof **ls->service);
            grpc__reflection__v1alpha__service_response__init(ls->service[i]);
            ls->service[i]->name = (char *)names[i];
        }
        resp.message_response_case =
            GRPC__REFLECTION__V1ALPHA__SERVER_REFLECTION_RESPONSE__MESSAGE_RESPONSE_LIST_SERVICES_RESPONSE;
        resp.list_services_response = ls;
        break;
    }
    case GRPC__REFLECTION__V1ALPHA__SERVER_REFLECTION_REQUEST__MESSAGE_REQUEST_FILE_BY_FILENAME:
        if ((f = cm__refl_by_name(req->file_by_filename)))
            cm__refl_files_response(call, &resp, f);
        else
            cm__refl_error(call, &resp, CM_STATUS_NOT_FOUND, "file", req->file_by_filename);
        break;
    case GRPC__REFLECTION__V1ALPHA__SERVER_REFLECTION_REQUEST__MESSAGE_REQUEST_FILE_CONTAINING_SYMBOL:
        if ((f = cm__refl_by_symbol(req->file_containing_symbol)))
            cm__refl_files_response(call, &resp, f);
        else
            cm__refl_error(call, &resp, CM_STATUS_NOT_FOUND, "symbol", req->file_containing_symbol);
        break;
    case GRPC__REFLECTION__V1ALPHA__SERVER_REFLECTION_REQUEST__MESSAGE_REQUEST_FILE_CONTAINING_EXTENSION:
        /* proto3 only: the suite defines no extensions. */
        cm__refl_error(call, &resp, CM_STATUS_NOT_FOUND, "extension of",
                       req->file_containing_extension ? req->file_containing_extension->containing_type : "");
        break;
    case GRPC__REFLECTION__V1ALPHA__SERVER_REFLECTION_REQUEST__MESSAGE_REQUEST_ALL_EXTENSION_NUMBERS_OF_TYPE:
        if (cm__refl_by_symbol(req->all_extension_numbers_of_type)) {
            Grpc__Reflection__V1alpha__ExtensionNumberResponse *en = cm_call_alloc(call, sizeof *en);
            grpc__reflection__v1alpha__extension_number_response__init(en);
            en->base_type_name = req->all_extension_numbers_of_type;
            resp.message_response_case =
                GRPC__REFLECTION__V1ALPHA__SERVER_REFLECTION_RESPONSE__MESSAGE_RESPONSE_ALL_EXTENSION_NUMBERS_RESPONSE;
            resp.all_extension_numbers_response = en;
        } else {
            cm__refl_error(call, &resp, CM_STATUS_NOT_FOUND, "type", req->all_extension_numbers_of_type);
        }
        break;
    default:
        return cm_call_fail(call, CM_STATUS_INVALID_ARGUMENT, "reflection request has no message_request set");
    }
    if (cm_call_send(call, &resp.base) == CM_EFULL)
        cm_call_abort(call, CM_STATUS_RESOURCE_EXHAUSTED, "reflection client is not reading its responses");
    return CM_PENDING;
}

static const cm_method_t cm__refl_methods[] = {
    {.name = "ServerReflectionInfo", .kind = CM_RPC_BIDI, .message = cm__refl_message},
};

/* ctx must point at the server (for list_services), so each server has its own table. */
void cm__reflection_fill(cm_service_t *s, cm_server_t *srv) {
    s->desc = &grpc__reflection__v1alpha__server_reflection__descriptor;
    s->methods = cm__refl_methods;
    s->n_methods = 1;
    s->ctx = srv;
}
