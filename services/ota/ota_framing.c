/* UploadArtifact's framing (the rules are in ota_framing.h). */
#include "ota_framing.h"

#include <ctype.h>
#include <inttypes.h>
#include <string.h>

#include "cm_alloc.h"
#include "cm_buf.h"
#include "ota_semver.h"

#define OTA__MAX_MODELS 64
#define OTA__MAX_NOTES (64 * 1024)
#define OTA__MAX_META 64

static int ota__name_ok(const char *s) {
    size_t n = strlen(s);
    if (n == 0 || n > 128 || !isalnum((unsigned char)s[0])) return 0;
    for (size_t i = 0; i < n; i++)
        if (!isalnum((unsigned char)s[i]) && s[i] != '.' && s[i] != '_' && s[i] != '-') return 0;
    return 1;
}

static int ota__printable(const char *s, size_t max) {
    size_t n = strlen(s);
    if (n == 0 || n > max) return 0;
    for (size_t i = 0; i < n; i++)
        if ((unsigned char)s[i] < 0x20 || s[i] == 0x7f) return 0;
    return 1;
}

int ota_framing_header_ok_or_fail(cm_call_t *call, int64_t max_bytes, const Iot__Ota__V1__ArtifactHeader *h) {
    if (!ota__name_ok(h->name))
        return cm_call_fail(call, CM_STATUS_INVALID_ARGUMENT, "header.name: 1-128 of [A-Za-z0-9._-], starting with a letter or digit");
    ota_semver_t v;
    if (ota_semver_parse(h->version, &v))
        return cm_call_fail(call, CM_STATUS_INVALID_ARGUMENT,
                            "header.version: \"%.80s\" is not a semantic version (MAJOR.MINOR.PATCH[-pre][+build])", h->version);
    if (h->n_models == 0 || h->n_models > OTA__MAX_MODELS)
        return cm_call_fail(call, CM_STATUS_INVALID_ARGUMENT, "header.models: 1-%d device models", OTA__MAX_MODELS);
    for (size_t i = 0; i < h->n_models; i++)
        if (!ota__printable(h->models[i], 64))
            return cm_call_fail(call, CM_STATUS_INVALID_ARGUMENT, "header.models[%zu]: 1-64 printable characters", i);
    if (strlen(h->release_notes) > OTA__MAX_NOTES)
        return cm_call_fail(call, CM_STATUS_INVALID_ARGUMENT, "header.release_notes: at most %d bytes", OTA__MAX_NOTES);
    if (h->n_metadata > OTA__MAX_META)
        return cm_call_fail(call, CM_STATUS_INVALID_ARGUMENT, "header.metadata: at most %d entries", OTA__MAX_META);
    for (size_t i = 0; i < h->n_metadata; i++)
        if (!ota__printable(h->metadata[i]->key, 128) || strlen(h->metadata[i]->value) > 1024)
            return cm_call_fail(call, CM_STATUS_INVALID_ARGUMENT, "header.metadata: keys 1-128 printable characters, values up to 1024");
    size_t sl = strlen(h->sha256);
    if (sl && (sl != 64 || strspn(h->sha256, "0123456789abcdefABCDEF") != 64))
        return cm_call_fail(call, CM_STATUS_INVALID_ARGUMENT, "header.sha256: 64 hex digits, or empty");
    if (h->size < 0 || h->size > max_bytes)
        return cm_call_fail(call, h->size < 0 ? CM_STATUS_INVALID_ARGUMENT : CM_STATUS_RESOURCE_EXHAUSTED,
                            "header.size: %" PRId64 " is not in 0..%" PRId64 " (IOT_OTA_MAX_ARTIFACT_SIZE)", h->size, max_bytes);
    return 0;
}

void ota_framing_init(ota_framing_t *f, int64_t max_bytes, int64_t chunk_bytes, ota_flush_fn flush, void *arg) {
    memset(f, 0, sizeof *f);
    f->max_bytes = max_bytes;
    f->chunk_bytes = (size_t)chunk_bytes;
    f->flush = flush;
    f->arg = arg;
}

void ota_framing_free(ota_framing_t *f) {
    EVP_MD_CTX_free(f->sha);
    cm_free(f->buf);
    f->sha = NULL;
    f->buf = NULL;
}

static int ota__flush_or_fail(cm_call_t *call, ota_framing_t *f) {
    int rc = f->flush(call, f->arg, f->idx, f->buf, f->buf_len);
    if (rc) return rc;
    f->idx++;
    f->buf_len = 0;
    return 0;
}

int ota_framing_message_or_fail(cm_call_t *call, ota_framing_t *f, const Iot__Ota__V1__UploadArtifactRequest *m) {
    if (m->part_case == IOT__OTA__V1__UPLOAD_ARTIFACT_REQUEST__PART_HEADER) {
        if (f->started) return cm_call_fail(call, CM_STATUS_INVALID_ARGUMENT, "a second header: send it once, first");
        int rc = ota_framing_header_ok_or_fail(call, f->max_bytes, m->header);
        if (rc) return rc;
        const Iot__Ota__V1__ArtifactHeader *h = m->header;
        f->started = 1;
        f->declared_size = h->size;
        for (size_t i = 0; h->sha256[i]; i++) f->declared_sha[i] = (char)tolower((unsigned char)h->sha256[i]);
        f->sha = EVP_MD_CTX_new();
        EVP_DigestInit_ex(f->sha, EVP_sha256(), NULL);
        f->buf = cm_malloc(f->chunk_bytes);
        return 0;
    }
    if (!f->started) return cm_call_fail(call, CM_STATUS_INVALID_ARGUMENT, "the first message must be the header");
    if (m->part_case != IOT__OTA__V1__UPLOAD_ARTIFACT_REQUEST__PART_CHUNK) return CM_PENDING; /* an empty message */
    const uint8_t *d = m->chunk.data;
    size_t n = m->chunk.len;
    if (f->size + (int64_t)n > f->max_bytes)
        return cm_call_fail(call, CM_STATUS_RESOURCE_EXHAUSTED, "the artifact exceeds %" PRId64 " bytes (IOT_OTA_MAX_ARTIFACT_SIZE)",
                            f->max_bytes);
    if (f->declared_size && f->size + (int64_t)n > f->declared_size)
        return cm_call_fail(call, CM_STATUS_DATA_LOSS, "more content than the declared size %" PRId64 "; nothing stored",
                            f->declared_size);
    EVP_DigestUpdate(f->sha, d, n);
    f->size += (int64_t)n;
    while (n) {
        size_t take = f->chunk_bytes - f->buf_len;
        if (take > n) take = n;
        memcpy(f->buf + f->buf_len, d, take);
        f->buf_len += take;
        d += take;
        n -= take;
        if (f->buf_len == f->chunk_bytes) {
            int rc = ota__flush_or_fail(call, f);
            if (rc) return rc;
        }
    }
    return CM_PENDING;
}

int ota_framing_finish_or_fail(cm_call_t *call, ota_framing_t *f, char hex[65]) {
    if (!f->started) return cm_call_fail(call, CM_STATUS_INVALID_ARGUMENT, OTA_FRAMING_NO_HEADER);
    if (f->size == 0) return cm_call_fail(call, CM_STATUS_INVALID_ARGUMENT, "no content: send the artifact in chunk messages");
    int rc;
    if (f->buf_len && (rc = ota__flush_or_fail(call, f))) return rc;
    uint8_t d[32];
    EVP_DigestFinal_ex(f->sha, d, NULL);
    cm_hex(hex, d, 32);
    if (*f->declared_sha && strcmp(hex, f->declared_sha) != 0)
        return cm_call_fail(call, CM_STATUS_DATA_LOSS, "sha256 mismatch: declared %s, received %s; nothing stored", f->declared_sha, hex);
    if (f->declared_size && f->size != f->declared_size)
        return cm_call_fail(call, CM_STATUS_DATA_LOSS, "size mismatch: declared %" PRId64 ", received %" PRId64 "; nothing stored",
                            f->declared_size, f->size);
    return 0;
}
