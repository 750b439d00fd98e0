/* The REST gateway's JSON -> protobuf mapping: gw_request_from_parts (services/gateway/gw_routes.c),
 * which builds every route's request message from the JSON body, the query and the path
 * parameters through cm_pbjson (libs/common/cm_pbjson.c), before the gateway calls a backend.
 *
 * Input: a byte choosing the route (an index into gw_routes; bytes past the last are ignored),
 * then lines: one value per path parameter of the route's pattern (non-empty, no '/', as the
 * router cuts them), then query parameters "name=value" up to an empty line, then the body (the
 * rest of the input; sent only to routes that take one).
 *
 * Properties beyond "no crash, leak or undefined behaviour":
 *   - a refused request comes with a message;
 *   - a built request packs into bytes the backend's decoder accepts (what gw_call sends);
 *   - it maps back to JSON (cm_pbjson_from_msg, as responses are mapped), and that JSON maps to
 *     the same message again: the mapping loses nothing it accepted (but the sign of a zero in a
 *     Struct, which it does not carry: fz_unsign_zeros). */
#include "fuzz.h"

#include "cm_alloc.h"
#include "cm_log.h"
#include "cm_pbdec.h"
#include "cm_pbjson.h"
#include "google/protobuf/struct.pb-c.h"
#include "gw.h"

#define FZ_MAX_QUERY 16

int LLVMFuzzerInitialize(int *argc, char ***argv) {
    (void)argc;
    (void)argv;
    cm_log_init("fuzz", CM_LOG_OFF);
    return 0;
}

/* google.protobuf.Value numbers of -0 as +0, everywhere in m. The mapping prints integral numbers
 * as JSON integers, -0 included (tests/unit/test_json.c expects "-0.0" to come back as 0), and
 * Postgres' jsonb, where shadows and payloads are kept, has no -0 either: the sign of a zero is not
 * something the API carries. */
static void fz_unsign_zeros(ProtobufCMessage *m) {
    if (m->descriptor == &google__protobuf__value__descriptor) {
        Google__Protobuf__Value *v = (void *)m;
        if (v->kind_case == GOOGLE__PROTOBUF__VALUE__KIND_NUMBER_VALUE && v->number_value == 0) v->number_value = 0.0;
    }
    const ProtobufCMessageDescriptor *d = m->descriptor;
    for (unsigned i = 0; i < d->n_fields; i++) {
        const ProtobufCFieldDescriptor *f = &d->fields[i];
        if (f->type != PROTOBUF_C_TYPE_MESSAGE) continue;
        char *base = (char *)m;
        if (f->label == PROTOBUF_C_LABEL_REPEATED) {
            size_t count;
            ProtobufCMessage **arr;
            memcpy(&count, base + f->quantifier_offset, sizeof count);
            memcpy(&arr, base + f->offset, sizeof arr);
            for (size_t k = 0; k < count; k++) fz_unsign_zeros(arr[k]);
            continue;
        }
        if (f->flags & PROTOBUF_C_FIELD_FLAG_ONEOF) {
            uint32_t which;
            memcpy(&which, base + f->quantifier_offset, sizeof which);
            if (which != f->id) continue;
        }
        ProtobufCMessage *sub;
        memcpy(&sub, base + f->offset, sizeof sub);
        if (sub) fz_unsign_zeros(sub);
    }
}

static uint8_t *fz_pack(cm_arena_t *a, const ProtobufCMessage *m, size_t *len) {
    *len = protobuf_c_message_get_packed_size(m);
    uint8_t *b = cm_arena_alloc(a, *len + 1);
    FZ_ASSERT(protobuf_c_message_pack(m, b) == *len, "%s: packed size", m->descriptor->name);
    return b;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (size < 1 || data[0] >= gw_n_routes) return 0;
    const gw_route_t *rt = &gw_routes[data[0]];
    fz_t in = {data + 1, size - 1};
    cm_arena_t a;
    cm_arena_init(&a, NULL, 0);
    /* Path parameters, named by the pattern. */
    const char *pname[GW_MAX_PARAMS], *pval[GW_MAX_PARAMS];
    int np = 0, routable = 1;
    for (const char *p = strchr(rt->pattern, '{'); p && np < GW_MAX_PARAMS; p = strchr(p + 1, '{')) {
        const char *e = strchr(p, '}');
        pname[np] = cm_arena_strndup(&a, p + 1, (size_t)(e - p - 1));
        char *v = fz_str(&in, '\n');
        pval[np] = cm_arena_strdup(&a, v);
        routable &= *v && !strchr(v, '/');
        free(v);
        np++;
    }
    const char *qname[FZ_MAX_QUERY], *qval[FZ_MAX_QUERY];
    size_t nq = 0;
    while (in.n && nq < FZ_MAX_QUERY) {
        char *line = fz_str(&in, '\n');
        if (!*line) {
            free(line);
            break;
        }
        char *eq = strchr(line, '=');
        if (eq) *eq = 0;
        qname[nq] = cm_arena_strdup(&a, line);
        qval[nq++] = cm_arena_strdup(&a, eq ? eq + 1 : ""); /* a parameter without '=' has value "" */
        free(line);
    }
    if (!routable) {
        cm_arena_free(&a);
        return 0;
    }
    gw_parts_t parts = {.body = (const char *)in.p, .body_len = in.n, .query_name = qname, .query = qval, .n_query = nq,
                        .param_name = pname, .param = pval, .n_params = np};
    ProtobufCMessage *m = NULL;
    char err[1024] = "";
    if (gw_request_from_parts(rt, &parts, &a, &m, err, sizeof err)) {
        FZ_ASSERT(*err, "%s %s: refused without a message", rt->method, rt->pattern);
        cm_arena_free(&a);
        return 0;
    }
    FZ_ASSERT(m && m->descriptor == rt->req, "%s %s: no request message", rt->method, rt->pattern);
    size_t n;
    const uint8_t *b = fz_pack(&a, m, &n);
    FZ_ASSERT(cm__pb_decode_server(rt->req, &a, b, n, NULL, 0), "%s %s: the request packs into bytes the backend cannot decode", rt->method,
              rt->pattern);
    json_t *j = cm_pbjson_from_msg(m);
    FZ_ASSERT(j, "%s %s: an accepted request does not map back to JSON", rt->method, rt->pattern);
    ProtobufCMessage *m2 = NULL;
    int rc = cm_pbjson_to_msg(j, rt->req, &a, &m2, err, sizeof err);
    char *text = json_dumps(j, JSON_COMPACT | JSON_SORT_KEYS);
    FZ_ASSERT(rc == 0, "%s %s: its own JSON %s is refused: %s", rt->method, rt->pattern, text, err);
    fz_unsign_zeros(m);
    fz_unsign_zeros(m2);
    b = fz_pack(&a, m, &n);
    size_t n2;
    const uint8_t *b2 = fz_pack(&a, m2, &n2);
    FZ_ASSERT(n == n2 && !memcmp(b, b2, n), "%s %s: %s maps to a different message", rt->method, rt->pattern, text);
    free(text);
    json_decref(j);
    cm_arena_free(&a);
    return 0;
}
