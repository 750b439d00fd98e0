/* The ota binary with device-mgmt and Postgres from tests/run.sh: a 64 MB artifact uploaded in a
 * stream, downloaded whole and from a mid offset by a device, its sha256 and Ed25519 signature
 * checked here with OpenSSL; upload errors (digest mismatch stores nothing, bad versions, repeats,
 * size limit, header order); and signing keys that rotate while old artifacts keep verifying.
 * Every test has its own schemas, key directory and key prefixes. */
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <jansson.h>
#include <openssl/evp.h>
#include <openssl/pem.h>

#include "cm_rpc.h"
#include "iot/device/v1/device.pb-c.h"
#include "iot/ingest/v1/ingest.pb-c.h"
#include "iot/ota/v1/ota.pb-c.h"
#include "iot/processing/v1/processing.pb-c.h"
#include "proc.h"
#include "test.h"

#define OTA "/iot.ota.v1.Ota/"
#define DM "/iot.device.v1.DeviceManager/"
#define MIB (1024 * 1024)

typedef struct svc_s {
    test_proc_t p;
    cm_channel_t *ch;
} svc_t;

static char dm_schema[96], dm_prefix[96], ota_schema[96], keys_dir[600], keys_env[640];

static void fresh_names(const char *name) {
    int pid = (int)getpid();
    snprintf(dm_schema, sizeof dm_schema, "IOT_DM_PG_SCHEMA=to_dm_%s_%d", name, pid);
    snprintf(dm_prefix, sizeof dm_prefix, "IOT_DM_REDIS_PREFIX={to-%s-%d}:", name, pid);
    snprintf(ota_schema, sizeof ota_schema, "IOT_OTA_PG_SCHEMA=to_ota_%s_%d", name, pid);
    snprintf(keys_dir, sizeof keys_dir, "%s/ota-keys-%s-%d", test_tmpdir(), name, pid);
    snprintf(keys_env, sizeof keys_env, "IOT_OTA_KEYS_DIR=%s", keys_dir);
}

static const char *pg_env(void) {
    static char v[1024];
    snprintf(v, sizeof v, "IOT_PG_DSN=%s", test_env("IOT_TEST_PG"));
    return v;
}

static void svc_connect(svc_t *s) {
    char target[64];
    snprintf(target, sizeof target, "127.0.0.1:%d", s->p.grpc_port);
    cm_channel_opts_t o = {.max_recv_bytes = 8 * MIB};
    s->ch = cm_channel_new(target, &o, NULL);
}

static void dm_start(svc_t *d) {
    static char bin[1024], redis[128];
    snprintf(bin, sizeof bin, "%s/services/device-mgmt/device-mgmt", test_env("IOT_BUILD_DIR"));
    snprintf(redis, sizeof redis, "IOT_REDIS_ADDR=%s", test_env("IOT_TEST_REDIS"));
    char *argv[] = {bin, NULL};
    const char *env[] = {pg_env(), redis, "IOT_DM_MIGRATIONS=services/device-mgmt/migrations", dm_schema, dm_prefix,
                         "IOT_GRPC_LISTEN=127.0.0.1:0", "IOT_ADMIN_LISTEN=127.0.0.1:0", NULL};
    ASSERT_INT_EQ(test_proc_start(&d->p, argv, env, 1), 0);
    svc_connect(d);
}

/* Starts ota; extra: up to four more "K=V". With wait 0 the caller waits for the exit itself. */
static int ota_start(svc_t *s, int dm_port, const char *const *extra, int wait) {
    static char bin[1024], dm_env[64];
    snprintf(bin, sizeof bin, "%s/services/ota/ota", test_env("IOT_BUILD_DIR"));
    snprintf(dm_env, sizeof dm_env, "IOT_OTA_DM_ADDR=127.0.0.1:%d", dm_port);
    char *argv[] = {bin, NULL};
    const char *env[16] = {pg_env(), dm_env, "IOT_OTA_MIGRATIONS=services/ota/migrations", ota_schema, keys_env,
                           "IOT_GRPC_LISTEN=127.0.0.1:0", "IOT_ADMIN_LISTEN=127.0.0.1:0"};
    int n = 7;
    for (int i = 0; extra && extra[i] && n < 15; i++) env[n++] = extra[i];
    env[n] = NULL;
    int rc = test_proc_start(&s->p, argv, env, wait);
    if (!rc && wait) svc_connect(s);
    return rc;
}

static void svc_stop(svc_t *s) {
    cm_channel_free(s->ch);
    s->ch = NULL;
    test_proc_kill(&s->p, SIGTERM);
    ASSERT_INT_EQ(test_proc_wait(&s->p, 20000), 0);
}

static void pbfree(void *m) {
    if (m) protobuf_c_message_free_unpacked(m, NULL);
}

static char last_msg[512];

static int unary(cm_channel_t *ch, const char *path, const void *req, const ProtobufCMessageDescriptor *desc, void *resp) {
    cm_rpc_status_t st = {0};
    cm_call_opts_t o = {.timeout_ms = 30000};
    int code = cm_channel_unary(ch, path, req, desc, (ProtobufCMessage **)resp, &o, &st);
    snprintf(last_msg, sizeof last_msg, "%s", st.message);
    cm_rpc_status_clear(&st);
    return code;
}

/* Creates a device and returns its token (free it). */
static char *make_device(svc_t *dm, const char *id) {
    Iot__Device__V1__Device d = IOT__DEVICE__V1__DEVICE__INIT;
    d.id = (char *)id;
    d.name = (char *)id;
    d.model = (char *)"TX-200";
    Iot__Device__V1__CreateDeviceRequest req = IOT__DEVICE__V1__CREATE_DEVICE_REQUEST__INIT;
    req.device = &d;
    Iot__Device__V1__Device *out = NULL;
    ASSERT_INT_EQ(unary(dm->ch, DM "CreateDevice", &req, &iot__device__v1__device__descriptor, &out), 0);
    pbfree(out);
    Iot__Device__V1__IssueTokenRequest treq = IOT__DEVICE__V1__ISSUE_TOKEN_REQUEST__INIT;
    treq.device_id = (char *)id;
    Iot__Device__V1__IssueTokenResponse *tr = NULL;
    ASSERT_INT_EQ(unary(dm->ch, DM "IssueToken", &treq, &iot__device__v1__issue_token_response__descriptor, &tr), 0);
    char *t = strdup(tr->token);
    pbfree(tr);
    return t;
}

/* ---- content ------------------------------------------------------------------------------- */

/* Byte i of the test content: a fixed pseudo-random function of i and a seed, so any slice can be
 * produced (and checked) without holding the whole artifact. */
static uint8_t content_at(uint64_t seed, uint64_t i) {
    uint64_t x = (i / 8 + 1) * 0x9E3779B97F4A7C15ULL ^ seed;
    x ^= x >> 33;
    x *= 0xff51afd7ed558ccdULL;
    x ^= x >> 33;
    return (uint8_t)(x >> ((i % 8) * 8));
}

static void content_fill(uint64_t seed, uint64_t from, uint8_t *buf, size_t n) {
    for (size_t i = 0; i < n; i++) buf[i] = content_at(seed, from + i);
}

static void sha256_hex(EVP_MD_CTX *c, char out[65]) {
    uint8_t d[32];
    EVP_DigestFinal_ex(c, d, NULL);
    for (int i = 0; i < 32; i++) snprintf(out + 2 * i, 3, "%02x", d[i]);
}

static void content_sha(uint64_t seed, uint64_t size, char out[65]) {
    EVP_MD_CTX *c = EVP_MD_CTX_new();
    EVP_DigestInit_ex(c, EVP_sha256(), NULL);
    uint8_t *buf = malloc(MIB);
    for (uint64_t off = 0; off < size; off += MIB) {
        size_t n = size - off < MIB ? (size_t)(size - off) : MIB;
        content_fill(seed, off, buf, n);
        EVP_DigestUpdate(c, buf, n);
    }
    free(buf);
    sha256_hex(c, out);
    EVP_MD_CTX_free(c);
}

/* ---- upload and download ------------------------------------------------------------------- */

typedef struct up_s {
    const char *name, *version, *sha256; /* sha256: declared, or NULL */
    int64_t declared_size;
    uint64_t seed, size;
    int header_last; /* send a chunk before the header */
} up_t;

/* Uploads; returns the status code, the artifact in *out on OK. */
static int upload(svc_t *ota, const up_t *u, Iot__Ota__V1__Artifact **out) {
    cm_call_opts_t o = {.timeout_ms = 300000};
    cm_stream_t *s = cm_stream_open(ota->ch, OTA "UploadArtifact", &o);
    Iot__Ota__V1__ArtifactHeader h = IOT__OTA__V1__ARTIFACT_HEADER__INIT;
    char *models[] = {(char *)"TX-200", (char *)"TX-300"};
    h.name = (char *)u->name;
    h.version = (char *)u->version;
    h.n_models = 2;
    h.models = models;
    h.release_notes = (char *)"fixes the watchdog";
    h.sha256 = (char *)(u->sha256 ? u->sha256 : "");
    h.size = u->declared_size;
    Iot__Ota__V1__UploadArtifactRequest m = IOT__OTA__V1__UPLOAD_ARTIFACT_REQUEST__INIT;
    uint8_t *buf = malloc(MIB);
    if (!u->header_last) {
        m.part_case = IOT__OTA__V1__UPLOAD_ARTIFACT_REQUEST__PART_HEADER;
        m.header = &h;
        cm_stream_send(s, &m.base);
    }
    for (uint64_t off = 0; off < u->size; off += MIB) {
        size_t n = u->size - off < MIB ? (size_t)(u->size - off) : MIB;
        content_fill(u->seed, off, buf, n);
        m.part_case = IOT__OTA__V1__UPLOAD_ARTIFACT_REQUEST__PART_CHUNK;
        m.chunk.data = buf;
        m.chunk.len = n;
        if (cm_stream_send(s, &m.base)) break; /* the server ended the call: read why */
    }
    free(buf);
    cm_stream_close_send(s);
    Iot__Ota__V1__Artifact *a = NULL;
    int got = cm_stream_recv(s, &iot__ota__v1__artifact__descriptor, (ProtobufCMessage **)&a);
    cm_rpc_status_t st = {0};
    int code = cm_stream_finish(s, &st);
    snprintf(last_msg, sizeof last_msg, "%s", st.message);
    cm_rpc_status_clear(&st);
    if (got == 1 && code == 0)
        *out = a;
    else
        pbfree(a);
    return code;
}

/* Downloads from offset with the device's token, checking every byte against the content and the
 * offsets of the messages; returns the status, the byte count in *n and the artifact of the first
 * message in *first. */
static int download(svc_t *ota, const char *token, const char *id, int64_t offset, uint64_t seed, int64_t *n,
                    Iot__Ota__V1__Artifact **first) {
    char auth[256];
    snprintf(auth, sizeof auth, "Bearer %s", token);
    cm_md_t md = {"authorization", auth, 0};
    cm_call_opts_t o = {.timeout_ms = 300000, .md = token ? &md : NULL, .n_md = token ? 1 : 0};
    cm_stream_t *s = cm_stream_open(ota->ch, OTA "DownloadArtifact", &o);
    Iot__Ota__V1__DownloadArtifactRequest req = IOT__OTA__V1__DOWNLOAD_ARTIFACT_REQUEST__INIT;
    req.artifact_id = (char *)id;
    req.offset = offset;
    cm_stream_send(s, &req.base);
    cm_stream_close_send(s);
    Iot__Ota__V1__DownloadArtifactResponse *m = NULL;
    int64_t at = offset, msgs = 0;
    uint8_t *want = malloc(2 * MIB);
    while (cm_stream_recv(s, &iot__ota__v1__download_artifact_response__descriptor, (ProtobufCMessage **)&m) == 1) {
        ASSERT_INT_EQ(m->offset, at);
        ASSERT((m->artifact != NULL) == (msgs == 0));
        if (m->artifact && first) {
            *first = m->artifact;
            m->artifact = NULL; /* kept; the rest is freed below */
        }
        ASSERT(m->data.len <= 2 * MIB);
        content_fill(seed, (uint64_t)at, want, m->data.len);
        ASSERT(m->data.len == 0 || memcmp(m->data.data, want, m->data.len) == 0);
        at += (int64_t)m->data.len;
        msgs++;
        pbfree(m);
        m = NULL;
    }
    free(want);
    cm_rpc_status_t st = {0};
    int code = cm_stream_finish(s, &st);
    snprintf(last_msg, sizeof last_msg, "%s", st.message);
    cm_rpc_status_clear(&st);
    *n = at - offset;
    return code;
}

/* The public key key_id, as ListSigningKeys serves it (PEM, parsed). NULL when absent. */
static EVP_PKEY *public_key(svc_t *ota, const char *key_id, int *loaded) {
    Iot__Ota__V1__ListSigningKeysRequest req = IOT__OTA__V1__LIST_SIGNING_KEYS_REQUEST__INIT;
    Iot__Ota__V1__ListSigningKeysResponse *r = NULL;
    ASSERT_INT_EQ(unary(ota->ch, OTA "ListSigningKeys", &req, &iot__ota__v1__list_signing_keys_response__descriptor, &r), 0);
    EVP_PKEY *p = NULL;
    for (size_t i = 0; i < r->n_keys; i++) {
        if (strcmp(r->keys[i]->key_id, key_id) != 0) continue;
        ASSERT_INT_EQ((int)r->keys[i]->public_key.len, 32);
        BIO *b = BIO_new_mem_buf(r->keys[i]->public_key_pem, -1);
        p = PEM_read_bio_PUBKEY(b, NULL, NULL, NULL);
        BIO_free(b);
        ASSERT(p);
        /* The PEM and the raw key are the same key. */
        uint8_t raw[32];
        size_t len = sizeof raw;
        ASSERT(EVP_PKEY_get_raw_public_key(p, raw, &len) == 1 && len == 32);
        ASSERT(memcmp(raw, r->keys[i]->public_key.data, 32) == 0);
        if (loaded) *loaded = r->keys[i]->loaded;
    }
    pbfree(r);
    return p;
}

/* The artifact's signature verifies with its key (served by ListSigningKeys), and the signed
 * manifest names its id, version, size and digest. */
static void verify_artifact(svc_t *ota, const Iot__Ota__V1__Artifact *a) {
    EVP_PKEY *p = public_key(ota, a->key_id, NULL);
    ASSERT(p);
    EVP_MD_CTX *c = EVP_MD_CTX_new();
    ASSERT(EVP_DigestVerifyInit(c, NULL, NULL, NULL, p) == 1);
    ASSERT_INT_EQ(EVP_DigestVerify(c, a->signature.data, a->signature.len, a->manifest.data, a->manifest.len), 1);
    EVP_MD_CTX_free(c);
    /* One flipped bit in the manifest and it no longer verifies. */
    uint8_t *bad = malloc(a->manifest.len);
    memcpy(bad, a->manifest.data, a->manifest.len);
    bad[a->manifest.len / 2] ^= 1;
    c = EVP_MD_CTX_new();
    ASSERT(EVP_DigestVerifyInit(c, NULL, NULL, NULL, p) == 1);
    ASSERT(EVP_DigestVerify(c, a->signature.data, a->signature.len, bad, a->manifest.len) != 1);
    EVP_MD_CTX_free(c);
    free(bad);
    EVP_PKEY_free(p);
    json_error_t je;
    json_t *m = json_loadb((const char *)a->manifest.data, a->manifest.len, 0, &je);
    ASSERT(m);
    ASSERT_STR_EQ(json_string_value(json_object_get(m, "artifact_id")), a->id);
    ASSERT_STR_EQ(json_string_value(json_object_get(m, "version")), a->version);
    ASSERT_STR_EQ(json_string_value(json_object_get(m, "sha256")), a->sha256);
    ASSERT_STR_EQ(json_string_value(json_object_get(m, "key_id")), a->key_id);
    ASSERT(json_integer_value(json_object_get(m, "size")) == a->size);
    json_decref(m);
}

static void test_upload_64mb_download_whole_and_resumed(void) {
    fresh_names("big");
    svc_t dm, ota;
    dm_start(&dm);
    ota_start(&ota, dm.p.grpc_port, NULL, 1);
    char *token = make_device(&dm, "ota-dev-1");
    const uint64_t size = 64 * MIB + 12345, seed = 7;
    char sha[65];
    content_sha(seed, size, sha);
    up_t u = {.name = "tx-firmware", .version = "2.1.0", .sha256 = sha, .declared_size = (int64_t)size, .seed = seed, .size = size};
    Iot__Ota__V1__Artifact *a = NULL;
    int code = upload(&ota, &u, &a);
    if (code) TEST__FAIL("upload: %s %s", cm_status_name(code), last_msg);
    ASSERT(a->size == (int64_t)size);
    ASSERT_STR_EQ(a->sha256, sha);
    ASSERT_STR_EQ(a->version, "2.1.0");
    ASSERT_INT_EQ((int)a->n_models, 2);
    ASSERT_STR_EQ(a->release_notes, "fixes the watchdog");
    ASSERT_INT_EQ((int)a->signature.len, 64);
    verify_artifact(&ota, a);

    /* Whole: every byte checked as it arrives, and the digest of what arrived. */
    int64_t n = 0;
    Iot__Ota__V1__Artifact *first = NULL;
    code = download(&ota, token, a->id, 0, seed, &n, &first);
    if (code) TEST__FAIL("download: %s %s", cm_status_name(code), last_msg);
    ASSERT(n == (int64_t)size);
    ASSERT(first && strcmp(first->sha256, sha) == 0 && first->signature.len == 64);
    verify_artifact(&ota, first);
    pbfree(first);
    /* Resumed from an offset inside a stored chunk: the rest, byte for byte. */
    int64_t mid = (int64_t)size / 2 + 777;
    ASSERT_INT_EQ(download(&ota, token, a->id, mid, seed, &n, NULL), 0);
    ASSERT(n == (int64_t)size - mid);
    /* At the very end: just the artifact; beyond: OUT_OF_RANGE. */
    ASSERT_INT_EQ(download(&ota, token, a->id, (int64_t)size, seed, &n, NULL), 0);
    ASSERT(n == 0);
    ASSERT_INT_EQ(download(&ota, token, a->id, (int64_t)size + 1, seed, &n, NULL), CM_STATUS_OUT_OF_RANGE);
    /* Devices only, and only what exists. */
    ASSERT_INT_EQ(download(&ota, NULL, a->id, 0, seed, &n, NULL), CM_STATUS_UNAUTHENTICATED);
    ASSERT_INT_EQ(download(&ota, "not-a-token", a->id, 0, seed, &n, NULL), CM_STATUS_UNAUTHENTICATED);
    ASSERT_INT_EQ(download(&ota, token, "999999", 0, seed, &n, NULL), CM_STATUS_NOT_FOUND);
    ASSERT_INT_EQ(download(&ota, token, "x1", 0, seed, &n, NULL), CM_STATUS_INVALID_ARGUMENT);

    /* Get, List (by name, by model) and Delete. */
    Iot__Ota__V1__GetArtifactRequest g = IOT__OTA__V1__GET_ARTIFACT_REQUEST__INIT;
    g.id = a->id;
    Iot__Ota__V1__Artifact *got = NULL;
    ASSERT_INT_EQ(unary(ota.ch, OTA "GetArtifact", &g, &iot__ota__v1__artifact__descriptor, &got), 0);
    ASSERT_STR_EQ(got->sha256, sha);
    pbfree(got);
    Iot__Ota__V1__ListArtifactsRequest l = IOT__OTA__V1__LIST_ARTIFACTS_REQUEST__INIT;
    l.model = (char *)"TX-300";
    Iot__Ota__V1__ListArtifactsResponse *lr = NULL;
    ASSERT_INT_EQ(unary(ota.ch, OTA "ListArtifacts", &l, &iot__ota__v1__list_artifacts_response__descriptor, &lr), 0);
    ASSERT_INT_EQ((int)lr->n_artifacts, 1);
    pbfree(lr);
    l.model = (char *)"OTHER";
    ASSERT_INT_EQ(unary(ota.ch, OTA "ListArtifacts", &l, &iot__ota__v1__list_artifacts_response__descriptor, &lr), 0);
    ASSERT_INT_EQ((int)lr->n_artifacts, 0);
    pbfree(lr);
    Iot__Ota__V1__DeleteArtifactRequest del = IOT__OTA__V1__DELETE_ARTIFACT_REQUEST__INIT;
    del.id = a->id;
    Iot__Ota__V1__DeleteArtifactResponse *dr = NULL;
    ASSERT_INT_EQ(unary(ota.ch, OTA "DeleteArtifact", &del, &iot__ota__v1__delete_artifact_response__descriptor, &dr), 0);
    pbfree(dr);
    ASSERT_INT_EQ(unary(ota.ch, OTA "GetArtifact", &g, &iot__ota__v1__artifact__descriptor, &got), CM_STATUS_NOT_FOUND);
    ASSERT_INT_EQ(unary(ota.ch, OTA "DeleteArtifact", &del, &iot__ota__v1__delete_artifact_response__descriptor, &dr),
                  CM_STATUS_NOT_FOUND);
    pbfree(a);
    free(token);
    svc_stop(&ota);
    svc_stop(&dm);
}

static void test_upload_errors_store_nothing(void) {
    fresh_names("err");
    svc_t dm, ota;
    dm_start(&dm);
    const char *extra[] = {"IOT_OTA_MAX_ARTIFACT_SIZE=3000000", NULL};
    ota_start(&ota, dm.p.grpc_port, extra, 1);
    char wrong[65];
    memset(wrong, 'a', 64);
    wrong[64] = 0;
    Iot__Ota__V1__Artifact *a = NULL;
    /* A digest that does not match: DATA_LOSS, and the name and version are still free. */
    up_t u = {.name = "fw", .version = "1.0.0", .sha256 = wrong, .seed = 1, .size = 2 * MIB + 5};
    ASSERT_INT_EQ(upload(&ota, &u, &a), CM_STATUS_DATA_LOSS);
    ASSERT(strstr(last_msg, "sha256 mismatch") && strstr(last_msg, "nothing stored"));
    u.sha256 = NULL;
    u.declared_size = 2 * MIB;
    ASSERT_INT_EQ(upload(&ota, &u, &a), CM_STATUS_DATA_LOSS);
    ASSERT(strstr(last_msg, "declared size"));
    Iot__Ota__V1__ListArtifactsRequest l = IOT__OTA__V1__LIST_ARTIFACTS_REQUEST__INIT;
    Iot__Ota__V1__ListArtifactsResponse *lr = NULL;
    ASSERT_INT_EQ(unary(ota.ch, OTA "ListArtifacts", &l, &iot__ota__v1__list_artifacts_response__descriptor, &lr), 0);
    ASSERT_INT_EQ((int)lr->n_artifacts, 0);
    pbfree(lr);
    u.declared_size = 0;
    ASSERT_INT_EQ(upload(&ota, &u, &a), 0);
    /* The same name and version again. */
    Iot__Ota__V1__Artifact *b = NULL;
    ASSERT_INT_EQ(upload(&ota, &u, &b), CM_STATUS_ALREADY_EXISTS);
    ASSERT(strstr(last_msg, "fw 1.0.0 already exists"));
    /* Not a semantic version; a chunk before the header; over the size limit. */
    up_t v = {.name = "fw", .version = "1.0", .seed = 1, .size = 100};
    ASSERT_INT_EQ(upload(&ota, &v, &b), CM_STATUS_INVALID_ARGUMENT);
    ASSERT(strstr(last_msg, "semantic version"));
    v.version = "01.0.0";
    ASSERT_INT_EQ(upload(&ota, &v, &b), CM_STATUS_INVALID_ARGUMENT);
    v.version = "1.0.1";
    v.header_last = 1;
    ASSERT_INT_EQ(upload(&ota, &v, &b), CM_STATUS_INVALID_ARGUMENT);
    ASSERT(strstr(last_msg, "first message must be the header"));
    v.header_last = 0;
    v.size = 3 * MIB;
    ASSERT_INT_EQ(upload(&ota, &v, &b), CM_STATUS_RESOURCE_EXHAUSTED);
    ASSERT(strstr(last_msg, "IOT_OTA_MAX_ARTIFACT_SIZE"));
    v.size = 0;
    ASSERT_INT_EQ(upload(&ota, &v, &b), CM_STATUS_INVALID_ARGUMENT);
    ASSERT(strstr(last_msg, "no content"));
    /* Only the good one is there; paging works over two. */
    v.size = 10;
    ASSERT_INT_EQ(upload(&ota, &v, &b), 0);
    l.page_size = 1;
    ASSERT_INT_EQ(unary(ota.ch, OTA "ListArtifacts", &l, &iot__ota__v1__list_artifacts_response__descriptor, &lr), 0);
    ASSERT_INT_EQ((int)lr->n_artifacts, 1);
    ASSERT_STR_EQ(lr->artifacts[0]->id, b->id); /* newest first */
    ASSERT(*lr->next_page_token);
    l.page_token = strdup(lr->next_page_token);
    pbfree(lr);
    ASSERT_INT_EQ(unary(ota.ch, OTA "ListArtifacts", &l, &iot__ota__v1__list_artifacts_response__descriptor, &lr), 0);
    ASSERT_INT_EQ((int)lr->n_artifacts, 1);
    ASSERT_STR_EQ(lr->artifacts[0]->id, a->id);
    ASSERT_STR_EQ(lr->next_page_token, "");
    pbfree(lr);
    free(l.page_token);
    l.page_token = (char *)"zz";
    ASSERT_INT_EQ(unary(ota.ch, OTA "ListArtifacts", &l, &iot__ota__v1__list_artifacts_response__descriptor, &lr),
                  CM_STATUS_INVALID_ARGUMENT);
    pbfree(a);
    pbfree(b);
    svc_stop(&ota);
    svc_stop(&dm);
}

/* Writes a new Ed25519 key to <keys_dir>/<name>.pem. */
static void write_key(const char *name) {
    EVP_PKEY *p = NULL;
    EVP_PKEY_CTX *ctx = EVP_PKEY_CTX_new_id(EVP_PKEY_ED25519, NULL);
    ASSERT(ctx && EVP_PKEY_keygen_init(ctx) == 1 && EVP_PKEY_keygen(ctx, &p) == 1);
    EVP_PKEY_CTX_free(ctx);
    char path[700];
    snprintf(path, sizeof path, "%s/%s.pem", keys_dir, name);
    FILE *f = fopen(path, "w");
    ASSERT(f && PEM_write_PrivateKey(f, p, NULL, NULL, 0, NULL, NULL) == 1);
    fclose(f);
    EVP_PKEY_free(p);
}

static void test_signing_keys_rotate_and_old_artifacts_verify(void) {
    fresh_names("keys");
    svc_t dm, ota;
    dm_start(&dm);
    /* No key and none to be generated: refuses to start, saying why. */
    const char *nogen[] = {"IOT_OTA_GENERATE_KEY=false", NULL};
    ASSERT_INT_EQ(ota_start(&ota, dm.p.grpc_port, nogen, 0), 0);
    ASSERT_INT_EQ(test_proc_wait(&ota.p, 20000), 2);
    char err[4096];
    test_proc_stderr(&ota.p, err, sizeof err);
    ASSERT(strstr(err, "no *.pem key"));
    /* First start generates key A, which signs artifact 1. */
    ota_start(&ota, dm.p.grpc_port, NULL, 1);
    up_t u = {.name = "fw", .version = "1.0.0", .seed = 3, .size = 1000};
    Iot__Ota__V1__Artifact *a1 = NULL, *a2 = NULL;
    ASSERT_INT_EQ(upload(&ota, &u, &a1), 0);
    verify_artifact(&ota, a1);
    svc_stop(&ota);
    /* Key B added: with two keys ota must be told which one signs. */
    write_key("b");
    ASSERT_INT_EQ(ota_start(&ota, dm.p.grpc_port, NULL, 0), 0);
    ASSERT_INT_EQ(test_proc_wait(&ota.p, 20000), 2);
    test_proc_stderr(&ota.p, err, sizeof err);
    ASSERT(strstr(err, "IOT_OTA_SIGNING_KEY"));
    /* B's id, derived the documented way: hex of the first 8 bytes of sha256(public key). */
    char a_file[700], b_id[32] = "";
    snprintf(a_file, sizeof a_file, "%s/%s.pem", keys_dir, a1->key_id);
    ASSERT(access(a_file, R_OK) == 0);
    {
        FILE *f;
        char path[700];
        snprintf(path, sizeof path, "%s/b.pem", keys_dir);
        f = fopen(path, "r");
        EVP_PKEY *p = PEM_read_PrivateKey(f, NULL, NULL, NULL);
        fclose(f);
        uint8_t raw[32], d[32];
        size_t len = 32;
        EVP_PKEY_get_raw_public_key(p, raw, &len);
        EVP_PKEY_free(p);
        EVP_Digest(raw, 32, d, NULL, EVP_sha256(), NULL);
        for (int i = 0; i < 8; i++) snprintf(b_id + 2 * i, 3, "%02x", d[i]);
    }
    char sel[64];
    snprintf(sel, sizeof sel, "IOT_OTA_SIGNING_KEY=%s", b_id);
    const char *use_b[] = {sel, NULL};
    ota_start(&ota, dm.p.grpc_port, use_b, 1);
    u.version = "1.1.0";
    ASSERT_INT_EQ(upload(&ota, &u, &a2), 0);
    ASSERT_STR_EQ(a2->key_id, b_id);
    ASSERT(strcmp(a1->key_id, b_id) != 0);
    verify_artifact(&ota, a2);
    verify_artifact(&ota, a1);
    svc_stop(&ota);
    /* A's private key removed: A is still listed (not loaded), and artifact 1 still verifies. */
    ASSERT_INT_EQ(unlink(a_file), 0);
    const char *only_b[] = {NULL};
    ota_start(&ota, dm.p.grpc_port, only_b, 1);
    int loaded = -1;
    EVP_PKEY *pa = public_key(&ota, a1->key_id, &loaded);
    ASSERT(pa);
    ASSERT_INT_EQ(loaded, 0);
    EVP_PKEY_free(pa);
    Iot__Ota__V1__GetArtifactRequest g = IOT__OTA__V1__GET_ARTIFACT_REQUEST__INIT;
    g.id = a1->id;
    Iot__Ota__V1__Artifact *again = NULL;
    ASSERT_INT_EQ(unary(ota.ch, OTA "GetArtifact", &g, &iot__ota__v1__artifact__descriptor, &again), 0);
    verify_artifact(&ota, again);
    pbfree(again);
    pbfree(a1);
    pbfree(a2);
    svc_stop(&ota);
    svc_stop(&dm);
}


/* ---- rollouts ------------------------------------------------------------------------------ */

typedef struct fleet_s {
    int n;
    char **ids, **tokens;
    char **version; /* what each device runs (as it would report) */
} fleet_t;

/* n devices <tag>-0..n-1, model TX-200, firmware 1.0.0, members of static group <tag>. */
static void fleet_make(svc_t *dm, fleet_t *f, const char *tag, int n, int first) {
    if (!f->ids) {
        f->ids = calloc(1024, sizeof *f->ids);
        f->tokens = calloc(1024, sizeof *f->tokens);
        f->version = calloc(1024, sizeof *f->version);
    }
    if (first == 0) {
        Iot__Device__V1__Group g = IOT__DEVICE__V1__GROUP__INIT;
        g.id = (char *)tag;
        g.kind = IOT__DEVICE__V1__GROUP_KIND__GROUP_KIND_STATIC;
        Iot__Device__V1__CreateGroupRequest gr = IOT__DEVICE__V1__CREATE_GROUP_REQUEST__INIT;
        gr.group = &g;
        Iot__Device__V1__Group *go = NULL;
        ASSERT_INT_EQ(unary(dm->ch, DM "CreateGroup", &gr, &iot__device__v1__group__descriptor, &go), 0);
        pbfree(go);
    }
    for (int i = first; i < first + n; i++) {
        char id[64];
        snprintf(id, sizeof id, "%s-%d", tag, i);
        Iot__Device__V1__Device d = IOT__DEVICE__V1__DEVICE__INIT;
        d.id = id;
        d.name = id;
        d.model = (char *)"TX-200";
        d.firmware_version = (char *)"1.0.0";
        Iot__Device__V1__CreateDeviceRequest req = IOT__DEVICE__V1__CREATE_DEVICE_REQUEST__INIT;
        req.device = &d;
        Iot__Device__V1__Device *out = NULL;
        ASSERT_INT_EQ(unary(dm->ch, DM "CreateDevice", &req, &iot__device__v1__device__descriptor, &out), 0);
        pbfree(out);
        Iot__Device__V1__IssueTokenRequest treq = IOT__DEVICE__V1__ISSUE_TOKEN_REQUEST__INIT;
        treq.device_id = id;
        Iot__Device__V1__IssueTokenResponse *tr = NULL;
        ASSERT_INT_EQ(unary(dm->ch, DM "IssueToken", &treq, &iot__device__v1__issue_token_response__descriptor, &tr), 0);
        f->ids[i] = strdup(id);
        f->tokens[i] = strdup(tr->token);
        f->version[i] = strdup("1.0.0");
        pbfree(tr);
        char *members[] = {id};
        Iot__Device__V1__GroupMembersRequest mr = IOT__DEVICE__V1__GROUP_MEMBERS_REQUEST__INIT;
        mr.group_id = (char *)tag;
        mr.n_device_ids = 1;
        mr.device_ids = members;
        Iot__Device__V1__GroupMembersResponse *mo = NULL;
        ASSERT_INT_EQ(unary(dm->ch, DM "AddGroupMembers", &mr, &iot__device__v1__group_members_response__descriptor, &mo), 0);
        pbfree(mo);
    }
    f->n = first + n;
}

static void fleet_free(fleet_t *f) {
    for (int i = 0; i < f->n; i++) {
        free(f->ids[i]);
        free(f->tokens[i]);
        free(f->version[i]);
    }
    free(f->ids);
    free(f->tokens);
    free(f->version);
}

/* A device-authenticated unary call. */
static int dev_call(svc_t *ota, const char *token, const char *method, const void *req, const ProtobufCMessageDescriptor *desc,
                    void *resp) {
    char auth[256];
    snprintf(auth, sizeof auth, "Bearer %s", token);
    cm_md_t md = {"authorization", auth, 0};
    cm_call_opts_t o = {.timeout_ms = 30000, .md = &md, .n_md = 1};
    cm_rpc_status_t st = {0};
    int code = cm_channel_unary(ota->ch, method, req, desc, (ProtobufCMessage **)resp, &o, &st);
    snprintf(last_msg, sizeof last_msg, "%s", st.message);
    cm_rpc_status_clear(&st);
    return code;
}

static int report(svc_t *ota, const char *token, const char *rollout, int phase, int progress, const char *error) {
    Iot__Ota__V1__ReportStatusRequest r = IOT__OTA__V1__REPORT_STATUS_REQUEST__INIT;
    r.rollout_id = (char *)rollout;
    r.phase = phase;
    r.progress = progress;
    r.error = (char *)(error ? error : "");
    Iot__Ota__V1__DeviceUpdate *u = NULL;
    int code = dev_call(ota, token, OTA "ReportStatus", &r, &iot__ota__v1__device_update__descriptor, &u);
    pbfree(u);
    return code;
}

/* Every device checks for an update and reports DOWNLOADING for an offer (which tells it the
 * stage it is in). Devices of stage `only` (any stage when -1) go on through INSTALLING to
 * SUCCEEDED, or to FAILED while *fails > 0 for devices of stage fail_stage; the others stay
 * downloading. Returns how many finished. */
static int fleet_round(svc_t *ota, fleet_t *f, int only, int fail_stage, int *fails) {
    int done = 0;
    for (int i = 0; i < f->n; i++) {
        Iot__Ota__V1__CheckForUpdateRequest q = IOT__OTA__V1__CHECK_FOR_UPDATE_REQUEST__INIT;
        q.current_version = f->version[i];
        q.model = (char *)"TX-200";
        Iot__Ota__V1__CheckForUpdateResponse *r = NULL;
        ASSERT_INT_EQ(dev_call(ota, f->tokens[i], OTA "CheckForUpdate", &q, &iot__ota__v1__check_for_update_response__descriptor, &r), 0);
        if (!r->offer) {
            pbfree(r);
            continue;
        }
        const char *ro = r->offer->rollout_id;
        Iot__Ota__V1__ReportStatusRequest rq = IOT__OTA__V1__REPORT_STATUS_REQUEST__INIT;
        rq.rollout_id = (char *)ro;
        rq.phase = IOT__OTA__V1__UPDATE_PHASE__UPDATE_PHASE_DOWNLOADING;
        rq.progress = 50;
        Iot__Ota__V1__DeviceUpdate *u = NULL;
        ASSERT_INT_EQ(dev_call(ota, f->tokens[i], OTA "ReportStatus", &rq, &iot__ota__v1__device_update__descriptor, &u), 0);
        int stage = u->stage;
        ASSERT_STR_EQ(u->device_id, f->ids[i]);
        pbfree(u);
        if (only >= 0 && stage != only) {
            pbfree(r);
            continue;
        }
        ASSERT_INT_EQ(report(ota, f->tokens[i], ro, 5, 0, NULL), 0); /* INSTALLING */
        if (stage == fail_stage && fails && *fails > 0) {
            (*fails)--;
            ASSERT_INT_EQ(report(ota, f->tokens[i], ro, 7, 0, "flash write failed"), 0);
        } else {
            ASSERT_INT_EQ(report(ota, f->tokens[i], ro, 6, 100, NULL), 0);
            free(f->version[i]);
            f->version[i] = strdup(r->offer->artifact->version);
        }
        done++;
        pbfree(r);
    }
    return done;
}

static Iot__Ota__V1__Rollout *get_rollout(svc_t *ota, const char *id) {
    Iot__Ota__V1__GetRolloutRequest g = IOT__OTA__V1__GET_ROLLOUT_REQUEST__INIT;
    g.id = (char *)id;
    Iot__Ota__V1__Rollout *r = NULL;
    ASSERT_INT_EQ(unary(ota->ch, OTA "GetRollout", &g, &iot__ota__v1__rollout__descriptor, &r), 0);
    return r;
}

/* Per stage, the phase counts add up to the stage's devices; the stages to the rollout's. */
static int check_counts(const Iot__Ota__V1__Rollout *r) {
    int total = 0;
    for (size_t i = 0; i < r->n_stage_status; i++) {
        const Iot__Ota__V1__StageStatus *s = r->stage_status[i];
        int sum = s->pending + s->offered + s->downloading + s->verifying + s->installing + s->succeeded + s->failed + s->rolled_back;
        ASSERT_INT_EQ(sum, s->devices);
        total += s->devices;
    }
    return total;
}

/* Waits until the rollout is in state and (stage >= 0) at current_stage; returns it. */
static Iot__Ota__V1__Rollout *wait_rollout(svc_t *ota, const char *id, int state, int stage, const char *stage_state) {
    for (int i = 0; i < 300; i++) {
        Iot__Ota__V1__Rollout *r = get_rollout(ota, id);
        check_counts(r);
        if ((int)r->state == state && (stage < 0 || r->current_stage == stage) &&
            (!stage_state || strcmp(r->stage_status[r->current_stage]->state, stage_state) == 0))
            return r;
        pbfree(r);
        usleep(50000);
    }
    Iot__Ota__V1__Rollout *r = get_rollout(ota, id);
    TEST__FAIL("rollout %s: state %d stage %d (%s), want state %d stage %d; reason: %s", id, r->state, r->current_stage,
               r->stage_status[r->current_stage]->state, state, stage, r->pause_reason);
    return NULL;
}

static char *create_rollout(svc_t *ota, const char *artifact, const char *group, const double *pct, int n, int64_t soak_ms,
                            int gate) {
    Iot__Ota__V1__Stage st[8], *sp[8];
    for (int i = 0; i < n; i++) {
        iot__ota__v1__stage__init(&st[i]);
        st[i].percent = pct[i];
        st[i].soak_ms = i < n - 1 ? soak_ms : 0;
        sp[i] = &st[i];
    }
    Iot__Ota__V1__RolloutTarget t = IOT__OTA__V1__ROLLOUT_TARGET__INIT;
    t.group_id = (char *)group;
    t.version_range = (char *)">=1.0.0 <2.0.0";
    Iot__Ota__V1__TelemetryGate g = IOT__OTA__V1__TELEMETRY_GATE__INIT;
    g.enabled = gate;
    Iot__Ota__V1__Rollout r = IOT__OTA__V1__ROLLOUT__INIT;
    r.name = (char *)"staged";
    r.artifact_id = (char *)artifact;
    r.target = &t;
    r.n_stages = (size_t)n;
    r.stages = sp;
    r.gate = &g;
    Iot__Ota__V1__CreateRolloutRequest req = IOT__OTA__V1__CREATE_ROLLOUT_REQUEST__INIT;
    req.rollout = &r;
    Iot__Ota__V1__Rollout *out = NULL;
    int code = unary(ota->ch, OTA "CreateRollout", &req, &iot__ota__v1__rollout__descriptor, &out);
    if (code) TEST__FAIL("CreateRollout: %s %s", cm_status_name(code), last_msg);
    ASSERT_INT_EQ(out->state, IOT__OTA__V1__ROLLOUT_STATE__ROLLOUT_STATE_DRAFT);
    char *id = strdup(out->id);
    pbfree(out);
    return id;
}

static int action(svc_t *ota, const char *method, const char *id) {
    Iot__Ota__V1__RolloutActionRequest a = IOT__OTA__V1__ROLLOUT_ACTION_REQUEST__INIT;
    a.id = (char *)id;
    a.reason = (char *)"test";
    Iot__Ota__V1__Rollout *r = NULL;
    int code = unary(ota->ch, method, &a, &iot__ota__v1__rollout__descriptor, &r);
    pbfree(r);
    return code;
}

static char *small_artifact(svc_t *ota, const char *version) {
    up_t u = {.name = "tx-fw", .version = version, .seed = 11, .size = 4096};
    Iot__Ota__V1__Artifact *a = NULL;
    ASSERT_INT_EQ(upload(ota, &u, &a), 0);
    char *id = strdup(a->id);
    pbfree(a);
    return id;
}

static void test_rollout_stages_thresholds_join_pause_resume_cancel(void) {
    fresh_names("stages");
    svc_t dm, ota;
    dm_start(&dm);
    const char *extra[] = {"IOT_OTA_CONTROLLER_INTERVAL=50ms", "IOT_OTA_PROC_ADDR=127.0.0.1:1", NULL};
    ota_start(&ota, dm.p.grpc_port, extra, 1);
    fleet_t f = {0};
    fleet_make(&dm, &f, "fleet", 200, 0);
    char *art = small_artifact(&ota, "2.0.0");
    const double pct[] = {1, 5, 20, 100};
    char *ro = create_rollout(&ota, art, "fleet", pct, 4, 0, 0);
    /* Nothing is offered before the start. */
    ASSERT_INT_EQ(fleet_round(&ota, &f, -1, -1, NULL), 0);
    ASSERT_INT_EQ(action(&ota, OTA "StartRollout", ro), 0);
    ASSERT_INT_EQ(action(&ota, OTA "StartRollout", ro), CM_STATUS_FAILED_PRECONDITION);
    ASSERT(strstr(last_msg, "RUNNING"));
    /* The artifact cannot go while the rollout runs. */
    Iot__Ota__V1__DeleteArtifactRequest del = IOT__OTA__V1__DELETE_ARTIFACT_REQUEST__INIT;
    del.id = art;
    Iot__Ota__V1__DeleteArtifactResponse *dr = NULL;
    ASSERT_INT_EQ(unary(ota.ch, OTA "DeleteArtifact", &del, &iot__ota__v1__delete_artifact_response__descriptor, &dr),
                  CM_STATUS_FAILED_PRECONDITION);
    ASSERT(strstr(last_msg, "used by rollout"));

    /* Stage 0: 1% of 200 = 2 devices. */
    Iot__Ota__V1__Rollout *r = wait_rollout(&ota, ro, 2, 0, "active");
    ASSERT_INT_EQ(r->stage_status[0]->devices, 2);
    ASSERT_INT_EQ(r->stage_status[0]->pending, 2);
    pbfree(r);
    /* One of the two already runs 2.0.0 (device-mgmt still says 1.0.0): no offer, and its update
     * counts as done rather than holding the stage back. */
    Iot__Ota__V1__ListDeviceUpdatesRequest pq = IOT__OTA__V1__LIST_DEVICE_UPDATES_REQUEST__INIT;
    pq.rollout_id = ro;
    Iot__Ota__V1__ListDeviceUpdatesResponse *pl = NULL;
    ASSERT_INT_EQ(unary(ota.ch, OTA "ListDeviceUpdates", &pq, &iot__ota__v1__list_device_updates_response__descriptor, &pl), 0);
    ASSERT_INT_EQ((int)pl->n_updates, 2);
    int ahead = -1;
    for (int i = 0; i < f.n; i++)
        if (strcmp(f.ids[i], pl->updates[0]->device_id) == 0) ahead = i;
    pbfree(pl);
    free(f.version[ahead]);
    f.version[ahead] = strdup("2.0.0");
    Iot__Ota__V1__CheckForUpdateRequest aq = IOT__OTA__V1__CHECK_FOR_UPDATE_REQUEST__INIT;
    aq.current_version = (char *)"2.0.0";
    Iot__Ota__V1__CheckForUpdateResponse *ar = NULL;
    ASSERT_INT_EQ(dev_call(&ota, f.tokens[ahead], OTA "CheckForUpdate", &aq, &iot__ota__v1__check_for_update_response__descriptor, &ar), 0);
    ASSERT(ar->offer == NULL);
    pbfree(ar);
    pq.phase = IOT__OTA__V1__UPDATE_PHASE__UPDATE_PHASE_SUCCEEDED;
    ASSERT_INT_EQ(unary(ota.ch, OTA "ListDeviceUpdates", &pq, &iot__ota__v1__list_device_updates_response__descriptor, &pl), 0);
    ASSERT_INT_EQ((int)pl->n_updates, 1);
    ASSERT_STR_EQ(pl->updates[0]->device_id, f.ids[ahead]);
    pbfree(pl);
    ASSERT_INT_EQ(fleet_round(&ota, &f, 0, -1, NULL), 1);
    /* Stage 1: 5% = 10 in all, 8 more. */
    r = wait_rollout(&ota, ro, 2, 1, "active");
    ASSERT_INT_EQ(r->stage_status[0]->succeeded, 2);
    ASSERT_INT_EQ(r->stage_status[1]->devices, 8);
    pbfree(r);
    /* A device joins the group now: it is not in this stage but in a later one. */
    fleet_make(&dm, &f, "fleet", 1, 200);
    ASSERT_INT_EQ(fleet_round(&ota, &f, 1, -1, NULL), 8);
    /* Stage 2: 20% of 201 = 41 in all, 31 more; four fail (13% > 10%): paused, reason recorded. */
    r = wait_rollout(&ota, ro, 2, 2, "active");
    ASSERT_INT_EQ(r->stage_status[2]->devices, 31);
    pbfree(r);
    int fails = 4;
    /* The rollout pauses on the fourth failure, in the middle of the round: later devices of the
     * stage get no offer. */
    int first = fleet_round(&ota, &f, 2, 2, &fails);
    ASSERT(first >= 4 && first < 31);
    r = wait_rollout(&ota, ro, 3, 2, NULL);
    ASSERT(strstr(r->pause_reason, "stage 2: 4 of 31 devices failed"));
    ASSERT_INT_EQ(r->stage_status[2]->failed, 4);
    ASSERT_INT_EQ(r->stage_status[2]->succeeded, first - 4);
    ASSERT_INT_EQ(r->stage_status[2]->pending, 31 - first);
    ASSERT_INT_EQ(check_counts(r), 41);
    pbfree(r);
    /* A failed device may report its rollback, but never success afterwards; a stranger is refused. */
    Iot__Ota__V1__ListDeviceUpdatesRequest lq = IOT__OTA__V1__LIST_DEVICE_UPDATES_REQUEST__INIT;
    lq.rollout_id = ro;
    lq.phase = IOT__OTA__V1__UPDATE_PHASE__UPDATE_PHASE_FAILED;
    Iot__Ota__V1__ListDeviceUpdatesResponse *lu = NULL;
    ASSERT_INT_EQ(unary(ota.ch, OTA "ListDeviceUpdates", &lq, &iot__ota__v1__list_device_updates_response__descriptor, &lu), 0);
    ASSERT_INT_EQ((int)lu->n_updates, 4);
    ASSERT_STR_EQ(lu->updates[0]->error, "flash write failed");
    ASSERT_STR_EQ(lu->updates[0]->from_version, "1.0.0");
    int failed_dev = -1;
    for (int i = 0; i < f.n; i++)
        if (strcmp(f.ids[i], lu->updates[0]->device_id) == 0) failed_dev = i;
    pbfree(lu);
    ASSERT(failed_dev >= 0);
    ASSERT_INT_EQ(report(&ota, f.tokens[failed_dev], ro, 8, 0, "back on 1.0.0"), 0);
    ASSERT_INT_EQ(report(&ota, f.tokens[failed_dev], ro, 6, 100, NULL), CM_STATUS_FAILED_PRECONDITION);
    ASSERT(strstr(last_msg, "ROLLED_BACK"));
    char *stranger = make_device(&dm, "stranger");
    ASSERT_INT_EQ(report(&ota, stranger, ro, 3, 0, NULL), CM_STATUS_NOT_FOUND);
    free(stranger);
    /* Paused: no new offers to pending devices (none are in stage 3 yet either). */
    ASSERT_INT_EQ(fleet_round(&ota, &f, -1, -1, NULL), 0);
    /* Resume accepts those failures; the rest of the rollout goes through. */
    ASSERT_INT_EQ(action(&ota, OTA "ResumeRollout", ro), 0);
    ASSERT_INT_EQ(fleet_round(&ota, &f, 2, -1, NULL), 31 - first);
    r = wait_rollout(&ota, ro, 2, 3, "active");
    ASSERT_INT_EQ(r->stage_status[3]->devices, 201 - 41);
    pbfree(r);
    /* The late joiner is in stage 3. */
    lq.phase = 0;
    lq.page_size = 1000;
    ASSERT_INT_EQ(unary(ota.ch, OTA "ListDeviceUpdates", &lq, &iot__ota__v1__list_device_updates_response__descriptor, &lu), 0);
    ASSERT_INT_EQ((int)lu->n_updates, 201);
    int joiner_stage = -1;
    for (size_t i = 0; i < lu->n_updates; i++)
        if (strcmp(lu->updates[i]->device_id, "fleet-200") == 0) joiner_stage = lu->updates[i]->stage;
    pbfree(lu);
    ASSERT_INT_EQ(joiner_stage, 3);
    ASSERT_INT_EQ(fleet_round(&ota, &f, 3, -1, NULL), 201 - 41);
    r = wait_rollout(&ota, ro, 4, -1, NULL);
    ASSERT_INT_EQ(check_counts(r), 201);
    ASSERT_INT_EQ(r->stage_status[3]->succeeded, 160);
    pbfree(r);
    /* device-mgmt knows the new version. */
    Iot__Device__V1__GetDeviceRequest gd = IOT__DEVICE__V1__GET_DEVICE_REQUEST__INIT;
    gd.id = (char *)"fleet-200";
    Iot__Device__V1__Device *dev = NULL;
    ASSERT_INT_EQ(unary(dm.ch, DM "GetDevice", &gd, &iot__device__v1__device__descriptor, &dev), 0);
    ASSERT_STR_EQ(dev->firmware_version, "2.0.0");
    pbfree(dev);
    /* Completed: nothing more to offer. */
    ASSERT_INT_EQ(fleet_round(&ota, &f, -1, -1, NULL), 0);
    ASSERT_INT_EQ(action(&ota, OTA "PauseRollout", ro), CM_STATUS_FAILED_PRECONDITION);
    ASSERT(strstr(last_msg, "COMPLETED"));

    /* Cancel: a second rollout started and cancelled offers nothing. */
    char *art2 = small_artifact(&ota, "2.1.0");
    const double all[] = {100};
    char *ro2 = create_rollout(&ota, art2, "fleet", all, 1, 0, 0);
    ASSERT_INT_EQ(action(&ota, OTA "StartRollout", ro2), 0);
    ASSERT_INT_EQ(action(&ota, OTA "CancelRollout", ro2), 0);
    ASSERT_INT_EQ(fleet_round(&ota, &f, -1, -1, NULL), 0);
    r = get_rollout(&ota, ro2);
    ASSERT_INT_EQ(r->state, IOT__OTA__V1__ROLLOUT_STATE__ROLLOUT_STATE_CANCELLED);
    ASSERT_STR_EQ(r->pause_reason, "cancelled: test");
    pbfree(r);
    ASSERT_INT_EQ(action(&ota, OTA "ResumeRollout", ro2), CM_STATUS_FAILED_PRECONDITION);
    ASSERT(strstr(last_msg, "CANCELLED"));
    ASSERT_INT_EQ(unary(ota.ch, OTA "DeleteArtifact", &del, &iot__ota__v1__delete_artifact_response__descriptor, &dr), 0);
    pbfree(dr);
    /* Bad rollouts. */
    const double shrink[] = {20, 5, 100};
    Iot__Ota__V1__Stage st[3], *sp[3];
    for (int i = 0; i < 3; i++) {
        iot__ota__v1__stage__init(&st[i]);
        st[i].percent = shrink[i];
        sp[i] = &st[i];
    }
    Iot__Ota__V1__Rollout bad = IOT__OTA__V1__ROLLOUT__INIT;
    bad.name = (char *)"bad";
    bad.artifact_id = art2;
    bad.n_stages = 3;
    bad.stages = sp;
    Iot__Ota__V1__CreateRolloutRequest cr = IOT__OTA__V1__CREATE_ROLLOUT_REQUEST__INIT;
    cr.rollout = &bad;
    Iot__Ota__V1__Rollout *out = NULL;
    ASSERT_INT_EQ(unary(ota.ch, OTA "CreateRollout", &cr, &iot__ota__v1__rollout__descriptor, &out), CM_STATUS_INVALID_ARGUMENT);
    ASSERT(strstr(last_msg, "must not shrink"));
    bad.n_stages = 1;
    bad.stages = sp + 1;
    ASSERT_INT_EQ(unary(ota.ch, OTA "CreateRollout", &cr, &iot__ota__v1__rollout__descriptor, &out), CM_STATUS_INVALID_ARGUMENT);
    ASSERT(strstr(last_msg, "last stage must be percent 100"));
    bad.stages = sp + 2;
    bad.artifact_id = (char *)"424242";
    ASSERT_INT_EQ(unary(ota.ch, OTA "CreateRollout", &cr, &iot__ota__v1__rollout__descriptor, &out), CM_STATUS_NOT_FOUND);
    Iot__Ota__V1__RolloutTarget bt = IOT__OTA__V1__ROLLOUT_TARGET__INIT;
    bt.version_range = (char *)"~1.0";
    bad.target = &bt;
    bad.artifact_id = art2;
    ASSERT_INT_EQ(unary(ota.ch, OTA "CreateRollout", &cr, &iot__ota__v1__rollout__descriptor, &out), CM_STATUS_INVALID_ARGUMENT);
    bt.version_range = (char *)"";
    bt.group_id = (char *)"no-such-group";
    ASSERT_INT_EQ(unary(ota.ch, OTA "CreateRollout", &cr, &iot__ota__v1__rollout__descriptor, &out), CM_STATUS_NOT_FOUND);
    ASSERT(strstr(last_msg, "rollout.target"));
    /* Device calls need a version that parses. */
    Iot__Ota__V1__CheckForUpdateRequest q = IOT__OTA__V1__CHECK_FOR_UPDATE_REQUEST__INIT;
    q.current_version = (char *)"one";
    Iot__Ota__V1__CheckForUpdateResponse *cu = NULL;
    ASSERT_INT_EQ(dev_call(&ota, f.tokens[0], OTA "CheckForUpdate", &q, &iot__ota__v1__check_for_update_response__descriptor, &cu),
                  CM_STATUS_INVALID_ARGUMENT);
    free(ro);
    free(ro2);
    free(art);
    free(art2);
    fleet_free(&f);
    svc_stop(&ota);
    svc_stop(&dm);
}

/* ---- the telemetry gate -------------------------------------------------------------------- */

static void start_bin(svc_t *s, const char *name, const char *const *env) {
    static char bin[1024];
    snprintf(bin, sizeof bin, "%s/services/%s/%s", test_env("IOT_BUILD_DIR"), name, name);
    char *argv[] = {bin, NULL};
    ASSERT_INT_EQ(test_proc_start(&s->p, argv, env, 1), 0);
    svc_connect(s);
}

static void push_temp(svc_t *in, const char *token, uint64_t seq, double v) {
    Iot__Ingest__V1__Point p = IOT__INGEST__V1__POINT__INIT, *pp[1] = {&p};
    struct timespec t;
    clock_gettime(CLOCK_REALTIME, &t);
    p.seq = seq;
    p.metric = (char *)"temp";
    p.time_ms = (int64_t)t.tv_sec * 1000 + t.tv_nsec / 1000000;
    p.value_case = IOT__INGEST__V1__POINT__VALUE_DOUBLE_VALUE;
    p.double_value = v;
    Iot__Ingest__V1__PushTelemetryRequest req = IOT__INGEST__V1__PUSH_TELEMETRY_REQUEST__INIT;
    req.n_points = 1;
    req.points = pp;
    char auth[256];
    snprintf(auth, sizeof auth, "Bearer %s", token);
    cm_md_t md = {"authorization", auth, 0};
    cm_call_opts_t o = {.timeout_ms = 30000, .md = &md, .n_md = 1};
    Iot__Ingest__V1__TelemetryAck *ack = NULL;
    ASSERT_INT_EQ(cm_channel_unary(in->ch, "/iot.ingest.v1.Ingest/PushTelemetry", &req.base, &iot__ingest__v1__telemetry_ack__descriptor,
                                   (ProtobufCMessage **)&ack, &o, NULL),
                  0);
    pbfree(ack);
}

/* Updated devices start running hot: processing alerts on them and not on the others, and the
 * rollout, soaking after its first stage, pauses itself with the reason written down. */
static void test_telemetry_gate_pauses_the_rollout(void) {
    fresh_names("gate");
    int pid = (int)getpid();
    char ing_schema[96], ing_prefix[96], proc_schema[96], proc_prefix[96], dm_env[64], ing_dm[64], redis[128], proc_env[64];
    snprintf(ing_schema, sizeof ing_schema, "IOT_INGEST_PG_SCHEMA=to_ing_gate_%d", pid);
    snprintf(ing_prefix, sizeof ing_prefix, "IOT_INGEST_STREAM_PREFIX=to-gate-%d:", pid);
    snprintf(proc_schema, sizeof proc_schema, "IOT_PROC_PG_SCHEMA=to_proc_gate_%d", pid);
    snprintf(proc_prefix, sizeof proc_prefix, "IOT_PROC_REDIS_PREFIX=to-gate-%d:proc:", pid);
    snprintf(redis, sizeof redis, "IOT_REDIS_ADDR=%s", test_env("IOT_TEST_REDIS"));
    svc_t dm, in, pr, ota;
    dm_start(&dm);
    snprintf(ing_dm, sizeof ing_dm, "IOT_INGEST_DM_ADDR=127.0.0.1:%d", dm.p.grpc_port);
    snprintf(dm_env, sizeof dm_env, "IOT_PROC_DM_ADDR=127.0.0.1:%d", dm.p.grpc_port);
    const char *ing_env[] = {pg_env(), redis, ing_dm, "IOT_INGEST_MIGRATIONS=services/ingest/migrations", ing_schema, ing_prefix,
                             "IOT_GRPC_LISTEN=127.0.0.1:0", "IOT_ADMIN_LISTEN=127.0.0.1:0", NULL};
    start_bin(&in, "ingest", ing_env);
    const char *pr_env[] = {pg_env(), redis, dm_env, "IOT_PROC_MIGRATIONS=services/processing/migrations", proc_schema, proc_prefix,
                            ing_prefix, "IOT_GRPC_LISTEN=127.0.0.1:0", "IOT_ADMIN_LISTEN=127.0.0.1:0", "IOT_PROC_RULES_POLL=50ms",
                            "IOT_PROC_FLUSH_INTERVAL=100ms", NULL};
    start_bin(&pr, "processing", pr_env);
    snprintf(proc_env, sizeof proc_env, "IOT_OTA_PROC_ADDR=127.0.0.1:%d", pr.p.grpc_port);
    const char *extra[] = {"IOT_OTA_CONTROLLER_INTERVAL=50ms", proc_env, NULL};
    ota_start(&ota, dm.p.grpc_port, extra, 1);

    /* temp > 80 on any device. */
    Iot__Processing__V1__ThresholdCondition th = IOT__PROCESSING__V1__THRESHOLD_CONDITION__INIT;
    th.op = IOT__PROCESSING__V1__COMPARISON__COMPARISON_GT;
    th.threshold = 80;
    Iot__Processing__V1__Rule rule = IOT__PROCESSING__V1__RULE__INIT;
    rule.name = (char *)"overheat";
    rule.enabled = 1;
    rule.metric = (char *)"temp";
    rule.severity = IOT__PROCESSING__V1__SEVERITY__SEVERITY_WARNING;
    rule.condition_case = IOT__PROCESSING__V1__RULE__CONDITION_THRESHOLD;
    rule.threshold = &th;
    Iot__Processing__V1__CreateRuleRequest rr = IOT__PROCESSING__V1__CREATE_RULE_REQUEST__INIT;
    rr.rule = &rule;
    Iot__Processing__V1__Rule *rout = NULL;
    ASSERT_INT_EQ(unary(pr.ch, "/iot.processing.v1.Processing/CreateRule", &rr, &iot__processing__v1__rule__descriptor, &rout), 0);
    pbfree(rout);
    usleep(500000); /* rules are polled every 50 ms */

    fleet_t f = {0};
    fleet_make(&dm, &f, "gate", 20, 0);
    char *art = small_artifact(&ota, "2.0.0");
    const double pct[] = {50, 100};
    char *ro = create_rollout(&ota, art, "gate", pct, 2, 120000, 1);
    ASSERT_INT_EQ(action(&ota, OTA "StartRollout", ro), 0);
    Iot__Ota__V1__Rollout *r = wait_rollout(&ota, ro, 2, 0, "active");
    ASSERT_INT_EQ(r->stage_status[0]->devices, 10);
    pbfree(r);
    ASSERT_INT_EQ(fleet_round(&ota, &f, 0, -1, NULL), 10);
    r = wait_rollout(&ota, ro, 2, 0, "soaking");
    ASSERT(r->stage_status[0]->soak_until != NULL);
    pbfree(r);
    /* Every device reports; the updated ones run hot. */
    for (int i = 0; i < f.n; i++) push_temp(&in, f.tokens[i], 1, strcmp(f.version[i], "2.0.0") == 0 ? 95.0 : 20.0);
    r = wait_rollout(&ota, ro, 3, 0, NULL);
    /* It trips on the first alerts processing commits (min_alerts 1 against a quiet baseline). */
    ASSERT(strncmp(r->pause_reason, "telemetry gate: ", 16) == 0);
    ASSERT(strstr(r->pause_reason, " alerts on 10 updated devices"));
    ASSERT(strstr(r->pause_reason, "against 0 on 10 not updated"));
    ASSERT_INT_EQ(r->stage_status[1]->devices, 0); /* the second stage never started */
    pbfree(r);
    free(ro);
    free(art);
    fleet_free(&f);
    svc_stop(&ota);
    svc_stop(&pr);
    svc_stop(&in);
    svc_stop(&dm);
}

/* ---- many downloads at once ---------------------------------------------------------------- */

typedef struct dl_s {
    pthread_t th;
    cm_channel_t *ch;
    const char *token, *id;
    uint64_t seed;
    int64_t bytes;
    int code, bad;
} dl_t;

/* Reads a whole download, checking each message's offset and its first 64 bytes. */
static void *dl_main(void *arg) {
    dl_t *d = arg;
    char auth[256];
    snprintf(auth, sizeof auth, "Bearer %s", d->token);
    cm_md_t md = {"authorization", auth, 0};
    cm_call_opts_t o = {.timeout_ms = 300000, .md = &md, .n_md = 1};
    cm_stream_t *s = cm_stream_open(d->ch, OTA "DownloadArtifact", &o);
    Iot__Ota__V1__DownloadArtifactRequest req = IOT__OTA__V1__DOWNLOAD_ARTIFACT_REQUEST__INIT;
    req.artifact_id = (char *)d->id;
    cm_stream_send(s, &req.base);
    cm_stream_close_send(s);
    Iot__Ota__V1__DownloadArtifactResponse *m = NULL;
    uint8_t want[64];
    while (cm_stream_recv(s, &iot__ota__v1__download_artifact_response__descriptor, (ProtobufCMessage **)&m) == 1) {
        size_t n = m->data.len < 64 ? m->data.len : 64;
        content_fill(d->seed, (uint64_t)m->offset, want, n);
        if (m->offset != d->bytes || (n && memcmp(m->data.data, want, n) != 0)) d->bad++;
        d->bytes += (int64_t)m->data.len;
        protobuf_c_message_free_unpacked(&m->base, NULL);
        m = NULL;
    }
    d->code = cm_stream_finish(s, NULL);
    return NULL;
}

/* 100 devices download a 16 MB artifact at once: every byte count is right, and ota's memory grows
 * by far less than the artifact times the downloads (chunks stream from Postgres as each client
 * takes them; nothing holds the whole artifact). */
static void test_concurrent_downloads_keep_memory_bounded(void) {
    fresh_names("many");
    svc_t dm, ota;
    dm_start(&dm);
    /* No chunk cache: every chunk of every download comes from Postgres, which is the bound under
     * test. A small ASan quarantine (ignored by release builds) keeps freed chunks from counting. */
    const char *extra[] = {"IOT_GRPC_THREADS=4", "IOT_OTA_CACHE_SIZE=0", "ASAN_OPTIONS=detect_leaks=1:quarantine_size_mb=16", NULL};
    ota_start(&ota, dm.p.grpc_port, extra, 1);
    char *token = make_device(&dm, "many-dev");
    const uint64_t size = 16 * MIB, seed = 5;
    up_t u = {.name = "fw16", .version = "1.0.0", .seed = seed, .size = size};
    Iot__Ota__V1__Artifact *a = NULL;
    ASSERT_INT_EQ(upload(&ota, &u, &a), 0);
    enum { N = 100, CHANNELS = 4 };
    cm_channel_t *ch[CHANNELS];
    char target[64];
    snprintf(target, sizeof target, "127.0.0.1:%d", ota.p.grpc_port);
    for (int i = 0; i < CHANNELS; i++) {
        cm_channel_opts_t co = {.own_connection = 1, .max_recv_bytes = 8 * MIB};
        ch[i] = cm_channel_new(target, &co, NULL);
    }
    long before = test_proc_rss_kb(ota.p.pid), peak = before;
    dl_t *d = calloc(N, sizeof *d);
    for (int i = 0; i < N; i++) {
        d[i].ch = ch[i % CHANNELS];
        d[i].token = token;
        d[i].id = a->id;
        d[i].seed = seed;
        pthread_create(&d[i].th, NULL, dl_main, &d[i]);
    }
    /* Sample ota's RSS until every download has finished. */
    int joined[N] = {0}, left = N;
    while (left > 0) {
        long kb = test_proc_rss_kb(ota.p.pid);
        if (kb > peak) peak = kb;
        usleep(20000);
        for (int i = 0; i < N; i++)
            if (!joined[i] && pthread_tryjoin_np(d[i].th, NULL) == 0) {
                joined[i] = 1;
                left--;
            }
    }
    for (int i = 0; i < N; i++) {
        ASSERT_INT_EQ(d[i].code, 0);
        ASSERT_INT_EQ(d[i].bad, 0);
        ASSERT(d[i].bytes == (int64_t)size);
    }
    long grew = peak - before, whole = (long)(N * size / 1024);
    printf("# %d downloads of %llu MB: ota RSS %ld kB before, peak %ld kB (+%ld kB; the artifacts in full would be %ld kB)\n", N,
           (unsigned long long)(size / MIB), before, peak, grew, whole);
    /* An eighth of the total leaves room for gRPC's per-stream windows and ASan's bookkeeping. */
    ASSERT(grew < whole / 8);
    free(d);
    for (int i = 0; i < CHANNELS; i++) cm_channel_free(ch[i]);
    pbfree(a);
    free(token);
    svc_stop(&ota);
    svc_stop(&dm);
}

TEST_MAIN(TEST_ENTRY(test_upload_64mb_download_whole_and_resumed), TEST_ENTRY(test_upload_errors_store_nothing),
          TEST_ENTRY(test_signing_keys_rotate_and_old_artifacts_verify),
          TEST_ENTRY(test_rollout_stages_thresholds_join_pause_resume_cancel), TEST_ENTRY(test_telemetry_gate_pauses_the_rollout),
          TEST_ENTRY(test_concurrent_downloads_keep_memory_bounded))
