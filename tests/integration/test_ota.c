/* The ota binary with device-mgmt and Postgres from tests/run.sh: a 64 MB artifact uploaded in a
 * stream, downloaded whole and from a mid offset by a device, its sha256 and Ed25519 signature
 * checked here with OpenSSL; upload errors (digest mismatch stores nothing, bad versions, repeats,
 * size limit, header order); and signing keys that rotate while old artifacts keep verifying.
 * Every test has its own schemas, key directory and key prefixes. */
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <jansson.h>
#include <openssl/evp.h>
#include <openssl/pem.h>

#include "cm_rpc.h"
#include "iot/device/v1/device.pb-c.h"
#include "iot/ota/v1/ota.pb-c.h"
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

TEST_MAIN(TEST_ENTRY(test_upload_64mb_download_whole_and_resumed), TEST_ENTRY(test_upload_errors_store_nothing),
          TEST_ENTRY(test_signing_keys_rotate_and_old_artifacts_verify))
