/* Every request of every service, decoded the way a server decodes it and checked the way its
 * handler checks it.
 *
 * Input: one byte choosing the method (an index into the methods of DeviceManager, Ingest, Ota,
 * Processing and Registry, in that order and each in its .proto's order; bytes past the last are
 * ignored), then the request's bytes. The bytes go through cm__pb_decode_request (the server's
 * decoder: the fast decoder, protobuf-c outside its scope); a request that decodes then goes to
 * what the handler runs on it before touching storage or another service:
 *   - the method's check (cm_method_t.check) on a call without a wire;
 *   - PushTelemetry and StreamTelemetry: ing_batch_new, the telemetry batch validator;
 *   - UploadArtifact: one message of the upload framing (ota_framing.c).
 * Three methods have nothing to check (no request fields, or none read unchecked); initialisation
 * aborts when a method is none of these, so a new RPC cannot escape the fuzzer unnoticed.
 *
 * Properties beyond "no crash, leak or undefined behaviour":
 *   - the fast decoder agrees with protobuf-c: what it accepts protobuf-c accepts, with the same
 *     content (compared by packing both, unknown fields aside, which only protobuf-c keeps), with
 *     and without aliasing bytes into the input;
 *   - a check answers 0 or a gRPC status with a message, and answers the same again on the
 *     request as it left it (checks fill in defaults; a default must pass its own check);
 *   - a checked request packs into bytes that decode again. */
#include "fuzz.h"

#include "cm_alloc.h"
#include "cm_log.h"
#include "cm_pbdec.h"
#include "cm_rpc.h"
#include "dm_handlers.h"
#include "ing_batch.h"
#include "ing_handlers.h"
#include "ota_framing.h"
#include "ota_handlers.h"
#include "proc_api.h"
#include "reg_handlers.h"

/* Ingest's default window (IOT_INGEST_MAX_PAST, IOT_INGEST_MAX_FUTURE) and a fixed "now", so that
 * an input means the same on every run. */
#define FZ_NOW_MS 1767225600000LL /* 2026-01-01 */
#define FZ_MAX_PAST_MS (168LL * 3600 * 1000)
#define FZ_MAX_FUTURE_MS (5LL * 60 * 1000)

typedef enum { FZ_CHECK, FZ_BATCH, FZ_UPLOAD, FZ_DECODE } fz_kind_t;

typedef struct fz_method_s {
    const cm_service_t *svc;
    const cm_method_t *m;
    const ProtobufCMessageDescriptor *in;
    fz_kind_t kind;
} fz_method_t;

/* Methods whose handler checks nothing before storage, and why that is right. */
static const char *const fz_nothing_to_check[] = {
    "iot.device.v1.DeviceManager/GetRevocationList", /* an empty request */
    "iot.ota.v1.Ota/ListSigningKeys",                /* an empty request */
    "iot.registry.v1.Registry/ListServices",         /* an empty request */
};

static dm_ctx_t fz_dm;
static ing_ctx_t fz_ing;
static ota_ctx_t fz_ota;
static reg_ctx_t fz_reg;
static cm_service_t fz_svcs[5];
static fz_method_t fz_methods[256];
static size_t fz_n;

static fz_kind_t fz_classify(const cm_service_t *svc, const cm_method_t *m) {
    char path[256];
    snprintf(path, sizeof path, "%s/%s", svc->desc->name, m->name);
    if (m->check) return FZ_CHECK;
    if (!strcmp(path, "iot.ingest.v1.Ingest/PushTelemetry") || !strcmp(path, "iot.ingest.v1.Ingest/StreamTelemetry")) return FZ_BATCH;
    if (!strcmp(path, "iot.ota.v1.Ota/UploadArtifact")) return FZ_UPLOAD;
    for (size_t i = 0; i < sizeof fz_nothing_to_check / sizeof fz_nothing_to_check[0]; i++)
        if (!strcmp(path, fz_nothing_to_check[i])) return FZ_DECODE;
    fprintf(stderr, "fuzz_proto: %s has no request check: give it a cm_method_t.check or list it in fuzz_proto.c\n", path);
    abort();
}

int LLVMFuzzerInitialize(int *argc, char ***argv) {
    (void)argc;
    (void)argv;
    cm_log_init("fuzz", CM_LOG_OFF);
    fz_ing.lim.max_past_ms = FZ_MAX_PAST_MS;
    fz_ing.lim.max_future_ms = FZ_MAX_FUTURE_MS;
    dm_service_init(&fz_svcs[0], &fz_dm);
    ing_service_init(&fz_svcs[1], &fz_ing);
    ota_service_init(&fz_svcs[2], &fz_ota);
    proc_api_service(NULL, &fz_svcs[3]);
    reg_service_init(&fz_svcs[4], &fz_reg);
    for (size_t s = 0; s < sizeof fz_svcs / sizeof fz_svcs[0]; s++) {
        const cm_service_t *svc = &fz_svcs[s];
        for (unsigned i = 0; i < svc->desc->n_methods; i++) {
            const ProtobufCMethodDescriptor *md = &svc->desc->methods[i];
            const cm_method_t *m = NULL;
            for (size_t k = 0; k < svc->n_methods && !m; k++)
                if (!strcmp(svc->methods[k].name, md->name)) m = &svc->methods[k];
            if (!m || fz_n == sizeof fz_methods / sizeof fz_methods[0]) abort();
            fz_methods[fz_n++] = (fz_method_t){svc, m, md->input, fz_classify(svc, m)};
        }
    }
    return 0;
}

/* Drops the unknown fields protobuf-c kept, at every level, so that it packs what the fast decoder
 * (which skips them) produced. */
static void fz_strip_unknown(ProtobufCMessage *m) {
    m->n_unknown_fields = 0;
    m->unknown_fields = NULL;
    const ProtobufCMessageDescriptor *d = m->descriptor;
    char *base = (char *)m;
    for (unsigned i = 0; i < d->n_fields; i++) {
        const ProtobufCFieldDescriptor *f = &d->fields[i];
        if (f->type != PROTOBUF_C_TYPE_MESSAGE) continue;
        if (f->label == PROTOBUF_C_LABEL_REPEATED) {
            size_t count;
            ProtobufCMessage **arr;
            memcpy(&count, base + f->quantifier_offset, sizeof count);
            memcpy(&arr, base + f->offset, sizeof arr);
            for (size_t k = 0; k < count; k++) fz_strip_unknown(arr[k]);
            continue;
        }
        if (f->flags & PROTOBUF_C_FIELD_FLAG_ONEOF) {
            uint32_t which;
            memcpy(&which, base + f->quantifier_offset, sizeof which);
            if (which != f->id) continue;
        }
        ProtobufCMessage *sub;
        memcpy(&sub, base + f->offset, sizeof sub);
        if (sub) fz_strip_unknown(sub);
    }
}

/* m packed, in a's memory; its length in *len. */
static uint8_t *fz_pack(cm_arena_t *a, const ProtobufCMessage *m, size_t *len) {
    *len = protobuf_c_message_get_packed_size(m);
    uint8_t *b = cm_arena_alloc(a, *len + 1);
    size_t n = protobuf_c_message_pack(m, b);
    FZ_ASSERT(n == *len, "%s: packed %zu bytes, predicted %zu", m->descriptor->name, n, *len);
    return b;
}

static void fz_same(cm_arena_t *a, const ProtobufCMessage *x, const ProtobufCMessage *y, const char *what) {
    size_t nx, ny;
    const uint8_t *bx = fz_pack(a, x, &nx), *by = fz_pack(a, y, &ny);
    FZ_ASSERT(nx == ny && memcmp(bx, by, nx) == 0, "%s: %s decodes differently (%zu and %zu bytes packed)", x->descriptor->name,
              what, nx, ny);
}

static void fz_check(const fz_method_t *fm, ProtobufCMessage *req, cm_arena_t *a) {
    /* What a check allocates (defaults it fills in) lives in its call, as on a server, where the
     * request lives in the call too: both calls stay until the request is done with. */
    cm_call_t *call = cm_call_new_detached(fm->svc, fm->m->name), *again_call = cm_call_new_detached(fm->svc, fm->m->name);
    int rc = fm->m->check(call, req);
    FZ_ASSERT(rc >= 0 && rc < CM_STATUS_COUNT, "%s: check returned %d", fm->m->name, rc);
    FZ_ASSERT(!rc || cm_call_detached_message(call), "%s: check failed with %s and no message", fm->m->name, cm_status_name(rc));
    int again = fm->m->check(again_call, req);
    FZ_ASSERT(again == rc, "%s: check said %s, then %s on the request it had filled in (%s)", fm->m->name, cm_status_name(rc),
              cm_status_name(again), again && cm_call_detached_message(again_call) ? cm_call_detached_message(again_call) : "");
    if (!rc) {
        size_t n;
        const uint8_t *b = fz_pack(a, req, &n);
        FZ_ASSERT(cm__pb_decode_server(fm->in, a, b, n, NULL, 0), "%s: a checked request packs into bytes that do not decode", fm->m->name);
    }
    cm_call_free_detached(again_call);
    cm_call_free_detached(call);
}

static void fz_batch(Iot__Ingest__V1__Point *const *points, size_t n) {
    char err[512];
    ing_batch_t *b = ing_batch_new("fuzz-device", points, n, &fz_ing.lim, FZ_NOW_MS, err, sizeof err);
    FZ_ASSERT(b || *err, "ing_batch_new refused a batch without saying why");
    ing_batch_free(b);
}

static int fz_flush_nothing(cm_call_t *call, void *arg, int idx, const uint8_t *data, size_t len) {
    (void)call, (void)arg, (void)idx, (void)data, (void)len;
    return 0;
}

static void fz_upload(const fz_method_t *fm, const ProtobufCMessage *msg) {
    cm_call_t *call = cm_call_new_detached(fm->svc, fm->m->name);
    ota_framing_t f;
    ota_framing_init(&f, 1LL << 30, 4096, fz_flush_nothing, NULL);
    int rc = ota_framing_message_or_fail(call, &f, (const void *)msg);
    FZ_ASSERT(rc == 0 || rc == CM_PENDING || (rc > 0 && rc < CM_STATUS_COUNT && cm_call_detached_message(call)),
              "UploadArtifact: framing answered %d", rc);
    ota_framing_free(&f);
    cm_call_free_detached(call);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (size < 1 || data[0] >= fz_n) return 0;
    const fz_method_t *fm = &fz_methods[data[0]];
    const uint8_t *p = data + 1;
    size_t n = size - 1;
    cm_arena_t a;
    cm_arena_init(&a, NULL, 0);
    ProtobufCMessage *req = cm__pb_decode_server(fm->in, &a, p, n, NULL, 0);
    ProtobufCMessage *ref = protobuf_c_message_unpack(fm->in, &a.pb, n, p);
    FZ_ASSERT(!req || ref, "%s: the server's decoder accepts what protobuf-c refuses", fm->in->name);
    if (req) {
        /* A request outside the fast decoder's scope came from protobuf-c, which keeps unknown
         * fields: no handler reads them, so compare without. */
        fz_strip_unknown(req);
        fz_strip_unknown(ref);
        fz_same(&a, req, ref, "protobuf-c");
        ProtobufCMessage *alias = NULL;
        int rc = cm__pb_decode_alias(fm->in, &a, p, n, &alias);
        if (rc == 0) fz_same(&a, req, alias, "the aliasing decoder");
        switch (fm->kind) {
        case FZ_CHECK: fz_check(fm, req, &a); break;
        case FZ_BATCH: {
            /* PushTelemetryRequest and StreamTelemetryRequest both carry `repeated Point points = 1`. */
            const ProtobufCFieldDescriptor *f = protobuf_c_message_descriptor_get_field_by_name(fm->in, "points");
            size_t count;
            Iot__Ingest__V1__Point **points;
            memcpy(&count, (char *)req + f->quantifier_offset, sizeof count);
            memcpy(&points, (char *)req + f->offset, sizeof points);
            fz_batch(points, count);
            break;
        }
        case FZ_UPLOAD: fz_upload(fm, req); break;
        case FZ_DECODE: break;
        }
    }
    cm_arena_free(&a);
    return 0;
}
