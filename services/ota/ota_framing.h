/* The framing of an UploadArtifact stream, apart from where its bytes go.
 *
 * The header comes first and once; chunk messages follow (messages with neither part are
 * allowed and ignored); the content may not pass IOT_OTA_MAX_ARTIFACT_SIZE nor the header's
 * declared size, and at the end it must be non-empty and match the declared size and sha256. The
 * content is cut into stored chunks of exactly chunk_bytes (the last one shorter), handed to the
 * flush callback in order, idx 0, 1, ... This file decides all of that without storage, so that the
 * rules can be fuzzed on their own (tests/fuzz/fuzz_upload.c); ota_artifacts.c stores the chunks.
 *
 * Errors are set on the call (the _or_fail convention). Ownership: the framing allocates its
 * chunk buffer and hash when the header is accepted; ota_framing_free releases them. */
#ifndef OTA_FRAMING_H
#define OTA_FRAMING_H

#include <stddef.h>
#include <stdint.h>

#include <openssl/evp.h>

#include "cm_rpc.h"
#include "iot/ota/v1/ota.pb-c.h"

/* Stores chunk idx (len bytes; valid during the call): 0, or the status the call was failed with. */
typedef int (*ota_flush_fn)(cm_call_t *call, void *arg, int idx, const uint8_t *data, size_t len);

typedef struct ota_framing_s {
    int64_t max_bytes;   /* IOT_OTA_MAX_ARTIFACT_SIZE */
    size_t chunk_bytes;  /* IOT_OTA_CHUNK_SIZE: bytes per stored chunk */
    ota_flush_fn flush;
    void *arg;
    int started;           /* a valid header was accepted */
    int64_t declared_size; /* 0: none declared */
    char declared_sha[65]; /* lowercase hex; "" when none declared */
    int64_t size;          /* content bytes accepted so far */
    int idx;               /* chunks flushed so far */
    uint8_t *buf;          /* the chunk being filled (chunk_bytes) */
    size_t buf_len;
    EVP_MD_CTX *sha;
} ota_framing_t;

void ota_framing_init(ota_framing_t *f, int64_t max_bytes, int64_t chunk_bytes, ota_flush_fn flush, void *arg);
void ota_framing_free(ota_framing_t *f);

/* Validates a header (name, semantic version, models, release notes, metadata, sha256, size). */
int ota_framing_header_ok_or_fail(cm_call_t *call, int64_t max_bytes, const Iot__Ota__V1__ArtifactHeader *h);

/* The next message of the stream. 0 when it was the header and it is valid (the caller begins
 * storing the artifact it describes); CM_PENDING after a chunk (full chunks flushed) or an empty
 * message; otherwise the status the call was failed with. */
int ota_framing_message_or_fail(cm_call_t *call, ota_framing_t *f, const Iot__Ota__V1__UploadArtifactRequest *m);

/* The client is done: flushes the last chunk, checks the declared size and sha256, and writes the
 * content's sha256 (lowercase hex) into hex. 0, or the status the call was failed with. */
int ota_framing_finish_or_fail(cm_call_t *call, ota_framing_t *f, char hex[65]);

#define OTA_FRAMING_NO_HEADER "no header: the first message must be the header"

#endif
