/* UploadArtifact's framing (services/ota/ota_framing.c): the state machine that takes a client's
 * stream of messages (header first, then chunks) and cuts the content into stored chunks.
 *
 * Input: a byte choosing the stored chunk size (1..32 bytes, so that chunk edges are everywhere),
 * a byte choosing IOT_OTA_MAX_ARTIFACT_SIZE (1..1021 bytes), then frames, each a kind byte:
 *   0: a message as the client sent it: a 2-byte big-endian length and that many bytes, decoded by
 *      the server's decoder (bytes that do not decode end the stream, as on the server);
 *   1: a chunk message: a length byte and that many bytes of content;
 *   2: a message with neither part;
 *   3: the client half-closes (also at the end of the input).
 * Each decoded message goes to ota_framing_message_or_fail; at the half-close,
 * ota_framing_finish_or_fail. A failure ends the stream, as it ends the call.
 *
 * Properties beyond "no crash, leak or undefined behaviour":
 *   - every failure is a gRPC status with a message, and nothing is accepted before a header;
 *   - the accepted content never passes the maximum, nor the declared size;
 *   - chunks are flushed in order from 0, each exactly the chunk size but the last, and together
 *     they are exactly the accepted content;
 *   - a finished upload has content, its hex is the SHA-256 of that content (computed here), and
 *     it matches what the header declared. */
#include "fuzz.h"

#include <openssl/evp.h>

#include "cm_buf.h"
#include "cm_log.h"
#include "cm_pbdec.h"
#include "cm_rpc.h"
#include "ota_framing.h"

typedef struct fz_store_s {
    size_t chunk;
    int next_idx;
    int short_seen; /* a chunk shorter than the chunk size was flushed: it must be the last */
    cm_buf_t flushed;
} fz_store_t;

static const cm_method_t fz_method = {.name = "UploadArtifact", .kind = CM_RPC_CLIENT_STREAM};
static cm_service_t fz_svc = {.desc = &iot__ota__v1__ota__descriptor, .methods = &fz_method, .n_methods = 1};

int LLVMFuzzerInitialize(int *argc, char ***argv) {
    (void)argc;
    (void)argv;
    cm_log_init("fuzz", CM_LOG_OFF);
    return 0;
}

static int fz_flush(cm_call_t *call, void *arg, int idx, const uint8_t *data, size_t len) {
    (void)call;
    fz_store_t *s = arg;
    FZ_ASSERT(idx == s->next_idx, "chunk %d flushed, %d expected", idx, s->next_idx);
    FZ_ASSERT(!s->short_seen, "chunk %d flushed after a short one", idx);
    FZ_ASSERT(len >= 1 && len <= s->chunk, "chunk %d of %zu bytes (chunk size %zu)", idx, len, s->chunk);
    if (len < s->chunk) s->short_seen = 1;
    s->next_idx++;
    cm_buf_append(&s->flushed, (const char *)data, len);
    return 0;
}

static void fz_failed(cm_call_t *call, int rc, const char *when) {
    FZ_ASSERT(rc > 0 && rc < CM_STATUS_COUNT && cm_call_detached_message(call), "%s: answered %d", when, rc);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    fz_t in = {data, size};
    fz_store_t st = {.chunk = 1 + fz_byte(&in) % 32};
    int64_t max = 1 + 4 * (int64_t)fz_byte(&in);
    ota_framing_t f;
    ota_framing_init(&f, max, (int64_t)st.chunk, fz_flush, &st);
    cm_call_t *call = cm_call_new_detached(&fz_svc, "UploadArtifact");
    cm_buf_t accepted = CM_BUF_INIT;
    cm_arena_t a;
    cm_arena_init(&a, NULL, 0);
    int ended = 0;
    while (!ended && in.n) {
        unsigned kind = fz_byte(&in) % 4;
        if (kind == 3) break;
        Iot__Ota__V1__UploadArtifactRequest built = IOT__OTA__V1__UPLOAD_ARTIFACT_REQUEST__INIT, *m = &built;
        size_t len;
        const uint8_t *p;
        if (kind == 0) {
            unsigned hi = fz_byte(&in);
            p = fz_bytes(&in, hi << 8 | fz_byte(&in), &len);
            m = (void *)cm__pb_decode_server(&iot__ota__v1__upload_artifact_request__descriptor, &a, p, len, NULL, 0);
            if (!m) break; /* the server ends the call: malformed stream message */
        } else if (kind == 1) {
            p = fz_bytes(&in, fz_byte(&in), &len);
            built.part_case = IOT__OTA__V1__UPLOAD_ARTIFACT_REQUEST__PART_CHUNK;
            built.chunk.data = (uint8_t *)p;
            built.chunk.len = len;
        }
        int was_started = f.started;
        int rc = ota_framing_message_or_fail(call, &f, m);
        if (rc == 0) {
            FZ_ASSERT(!was_started && f.started && m->part_case == IOT__OTA__V1__UPLOAD_ARTIFACT_REQUEST__PART_HEADER,
                      "accepted something other than a first header");
        } else if (rc == CM_PENDING) {
            FZ_ASSERT(was_started, "accepted a message before the header");
            if (m->part_case == IOT__OTA__V1__UPLOAD_ARTIFACT_REQUEST__PART_CHUNK && m->chunk.len)
                cm_buf_append(&accepted, (const char *)m->chunk.data, m->chunk.len);
        } else {
            fz_failed(call, rc, "a message");
            ended = 1;
        }
        FZ_ASSERT((int64_t)accepted.len == f.size, "%zu bytes accepted, framing counts %lld", accepted.len, (long long)f.size);
        FZ_ASSERT(f.size <= max && (!f.declared_size || f.size <= f.declared_size), "%lld bytes accepted (maximum %lld, declared %lld)",
                  (long long)f.size, (long long)max, (long long)f.declared_size);
        FZ_ASSERT(st.flushed.len == (size_t)st.next_idx * st.chunk && st.flushed.len + f.buf_len == accepted.len,
                  "flushed %zu + buffered %zu of %zu accepted bytes", st.flushed.len, f.buf_len, accepted.len);
    }
    if (!ended) {
        char hex[65];
        int rc = ota_framing_finish_or_fail(call, &f, hex);
        if (rc) {
            fz_failed(call, rc, "the half-close");
        } else {
            FZ_ASSERT(accepted.len > 0 && st.flushed.len == accepted.len && !memcmp(st.flushed.data, accepted.data, accepted.len),
                      "the stored chunks are not the content");
            uint8_t d[32];
            char want[65];
            EVP_Digest(accepted.data, accepted.len, d, NULL, EVP_sha256(), NULL);
            cm_hex(want, d, 32);
            FZ_ASSERT(!strcmp(hex, want), "sha256 %s, content's %s", hex, want);
            FZ_ASSERT(!*f.declared_sha || !strcmp(f.declared_sha, hex), "finished with a sha256 other than the declared one");
            FZ_ASSERT(!f.declared_size || f.declared_size == f.size, "finished with a size other than the declared one");
        }
    }
    cm_buf_free(&accepted);
    cm_buf_free(&st.flushed);
    cm_arena_free(&a);
    ota_framing_free(&f);
    cm_call_free_detached(call);
    return 0;
}
