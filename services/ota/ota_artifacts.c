/* Artifacts: streamed uploads (hashed, chunked into Postgres, signed), reads, deletion, signing
 * keys, and resumable downloads paced by the client (cm_method_t.writable). */
#include <ctype.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cm_alloc.h"
#include "cm_buf.h"
#include "cm_json.h"
#include "cm_log.h"
#include "ota_framing.h"
#include "ota_handlers.h"

/* ---- upload -------------------------------------------------------------------------------- */

/* One upload in progress: its framing (ota_framing.h), and from the header on a transaction that
 * holds the artifact row (so a second upload of the same name and version waits on it, briefly,
 * then is refused) and every chunk written so far. */
typedef struct ota__upload_s {
    ota_ctx_t *ctx;
    ota_framing_t f;
    int slot;              /* holds one of IOT_OTA_MAX_UPLOADS */
    cm_pg_conn_t *c;       /* in a transaction until committed */
    char id[24];
    char *name, *version, *models_json;
} ota__upload_t;

static void ota__upload_free(ota__upload_t *u) {
    if (u->c) {
        cm_pg_rollback(u->c);
        cm_pg_release(u->ctx->pg, u->c);
    }
    if (u->slot) atomic_fetch_sub(&u->ctx->uploads, 1);
    ota_framing_free(&u->f);
    cm_free(u->name);
    cm_free(u->version);
    cm_free(u->models_json);
    cm_free(u);
}

static char *ota__models_json(const Iot__Ota__V1__ArtifactHeader *h) {
    json_t *a = json_array();
    for (size_t i = 0; i < h->n_models; i++) json_array_append_new(a, json_string(h->models[i]));
    char *s = cm_json_dump(a);
    json_decref(a);
    return s;
}

static char *ota__meta_json(const Iot__Ota__V1__ArtifactHeader *h) {
    json_t *o = json_object();
    for (size_t i = 0; i < h->n_metadata; i++) json_object_set_new(o, h->metadata[i]->key, json_string(h->metadata[i]->value));
    char *s = cm_json_dump(o);
    json_decref(o);
    return s;
}

/* A failed statement inside the upload's transaction: roll back, give the connection back, fail. */
static int ota__upload_pg_fail(cm_call_t *call, ota__upload_t *u) {
    cm_pg_rollback(u->c);
    int rc = ota__pg_fail(call, u->ctx, u->c);
    u->c = NULL;
    return rc;
}

/* The framing's flush: writes a chunk in the upload's transaction. */
static int ota__flush_chunk(cm_call_t *call, void *arg, int idx, const uint8_t *data, size_t len) {
    ota__upload_t *u = arg;
    char idx_s[16];
    snprintf(idx_s, sizeof idx_s, "%d", idx);
    const char *p[3] = {u->id, idx_s, (const char *)data};
    int lens[3] = {0, 0, (int)len}, fmt[3] = {0, 0, 1};
    if (cm_pg_exec_bin(u->c, NULL, "INSERT INTO artifact_chunks (artifact_id, idx, data) VALUES ($1, $2, $3)", 3, p, lens, fmt, 0))
        return ota__upload_pg_fail(call, u);
    return 0;
}

/* The header was accepted: take an upload slot and insert the artifact's row. */
static int ota__upload_begin(cm_call_t *call, ota__upload_t *u, const Iot__Ota__V1__ArtifactHeader *h) {
    ota_ctx_t *ctx = u->ctx;
    int rc;
    if (atomic_fetch_add(&ctx->uploads, 1) >= ctx->cfg->max_uploads) {
        atomic_fetch_sub(&ctx->uploads, 1);
        cm_counter_add(ctx->c_upload_rejects, 1);
        return cm_call_fail(call, CM_STATUS_RESOURCE_EXHAUSTED,
                            "%" PRId64 " uploads are in progress (IOT_OTA_MAX_UPLOADS); retry when one has finished",
                            ctx->cfg->max_uploads);
    }
    u->slot = 1;
    u->c = ota__conn_or_fail(call, ctx, &rc);
    if (!u->c) return rc;
    u->name = cm_strdup(h->name);
    u->version = cm_strdup(h->version);
    u->models_json = ota__models_json(h);
    char *meta = ota__meta_json(h), chunk[24];
    snprintf(chunk, sizeof chunk, "%" PRId64, ctx->cfg->chunk_bytes);
    const char *p[6] = {h->name, h->version, u->models_json, h->release_notes, meta, chunk};
    PGresult *r = NULL;
    /* A concurrent upload of the same name and version holds the unique key until it ends: do
     * not wait for it. */
    rc = cm_pg_begin(u->c);
    if (!rc) rc = cm_pg_exec(u->c, NULL, "SET LOCAL lock_timeout = '1s'", 0, NULL);
    if (!rc)
        rc = cm_pg_exec(u->c, &r,
                        "INSERT INTO artifacts (name, version, models, release_notes, metadata, chunk_size) "
                        "VALUES ($1, $2, ARRAY(SELECT jsonb_array_elements_text($3::jsonb)), $4, $5::jsonb, $6::int) RETURNING id",
                        6, p);
    free(meta);
    if (rc) {
        const char *state = cm_pg_sqlstate(u->c);
        if (strcmp(state, "23505") == 0 || strcmp(state, "55P03") == 0) {
            cm_pg_rollback(u->c);
            cm_pg_release(ctx->pg, u->c);
            u->c = NULL;
            return cm_call_fail(call, CM_STATUS_ALREADY_EXISTS, "artifact %s %s %s", h->name, h->version,
                                state[0] == '2' ? "already exists" : "is being uploaded right now");
        }
        return ota__upload_pg_fail(call, u);
    }
    snprintf(u->id, sizeof u->id, "%s", PQgetvalue(r, 0, 0));
    PQclear(r);
    return CM_PENDING;
}

int ota_upload_message(cm_call_t *call, const ProtobufCMessage *msg_) {
    ota_ctx_t *ctx = cm_call_service_ctx(call);
    const Iot__Ota__V1__UploadArtifactRequest *m = (const void *)msg_;
    ota__upload_t *u = cm_call_user(call);
    if (!u) {
        u = cm_calloc(1, sizeof *u);
        u->ctx = ctx;
        ota_framing_init(&u->f, ctx->cfg->max_artifact_bytes, ctx->cfg->chunk_bytes, ota__flush_chunk, u);
        cm_call_set_user(call, u);
    }
    int64_t before = u->f.size;
    int rc = ota_framing_message_or_fail(call, &u->f, m);
    if (u->f.size > before) cm_counter_add(ctx->c_uploaded_bytes, (double)(u->f.size - before));
    return rc == 0 ? ota__upload_begin(call, u, m->header) : rc;
}

/* The signed manifest: compact JSON, keys sorted, so that it is the same bytes every time. */
static char *ota__manifest(const ota__upload_t *u, const char *sha_hex, const char *key_id) {
    json_t *m = json_object(), *models = json_loads(u->models_json, 0, NULL);
    json_object_set_new(m, "artifact_id", json_string(u->id));
    json_object_set_new(m, "name", json_string(u->name));
    json_object_set_new(m, "version", json_string(u->version));
    json_object_set_new(m, "models", models ? models : json_array());
    json_object_set_new(m, "size", json_integer(u->f.size));
    json_object_set_new(m, "sha256", json_string(sha_hex));
    json_object_set_new(m, "key_id", json_string(key_id));
    char *s = cm_json_dump(m);
    json_decref(m);
    return s;
}

int ota_upload_half_close(cm_call_t *call, ProtobufCMessage *resp_) {
    ota_ctx_t *ctx = cm_call_service_ctx(call);
    ota__upload_t *u = cm_call_user(call);
    if (!u || !u->f.started) return cm_call_fail(call, CM_STATUS_INVALID_ARGUMENT, OTA_FRAMING_NO_HEADER);
    if (!u->c) return cm_call_fail(call, CM_STATUS_UNAVAILABLE, "the upload lost its database connection; upload again");
    char hex[65];
    int rc = ota_framing_finish_or_fail(call, &u->f, hex);
    if (rc) return rc;
    const char *key_id = ota_keys_active(ctx->keys);
    char *manifest = ota__manifest(u, hex, key_id);
    uint8_t sig[OTA_SIG_LEN];
    if (ota_keys_sign(ctx->keys, (const uint8_t *)manifest, strlen(manifest), sig)) {
        free(manifest);
        return cm_call_fail(call, CM_STATUS_INTERNAL, "signing failed");
    }
    char size[24];
    snprintf(size, sizeof size, "%" PRId64, u->f.size);
    const char *p[6] = {u->id, size, hex, manifest, (const char *)sig, key_id};
    int len[6] = {0, 0, 0, (int)strlen(manifest), OTA_SIG_LEN, 0}, fmt[6] = {0, 0, 0, 1, 1, 0};
    PGresult *r = NULL;
    rc = cm_pg_exec_bin(u->c, NULL,
                        "UPDATE artifacts SET size = $2, sha256 = $3, manifest = $4, signature = $5, key_id = $6 WHERE id = $1",
                        6, p, len, fmt, 0);
    free(manifest);
    if (!rc) rc = cm_pg_exec(u->c, &r, "SELECT " OTA_ARTIFACT_COLS " FROM artifacts AS a WHERE a.id = $1", 1, p);
    if (!rc) rc = cm_pg_commit(u->c);
    if (rc) {
        PQclear(r);
        return ota__upload_pg_fail(call, u);
    }
    cm_pg_release(ctx->pg, u->c);
    u->c = NULL;
    Iot__Ota__V1__Artifact *a = ota__artifact_row(call, r, 0);
    PQclear(r);
    memcpy(resp_, a, sizeof *a);
    cm_counter_add(ctx->c_uploads, 1);
    cm_log_kv(CM_LOG_INFO, "artifact uploaded", "id", u->id, "name", u->name, "version", u->version, "sha256", hex, NULL);
    return CM_STATUS_OK;
}

void ota_upload_done(cm_call_t *call, int cancelled) {
    (void)cancelled;
    ota__upload_t *u = cm_call_user(call);
    if (u) ota__upload_free(u); /* rolls back what was not committed */
}

/* ---- reads --------------------------------------------------------------------------------- */

/* Loads one complete artifact into *out (call arena). 0, or the status the call was failed with. */
/* The artifact, and the chunk size it was stored with when chunk is not NULL. */
static int ota__load_or_fail(cm_call_t *call, ota_ctx_t *ctx, const char *id, Iot__Ota__V1__Artifact **out, int64_t *chunk) {
    if (!ota__id(id)) return cm_call_fail(call, CM_STATUS_INVALID_ARGUMENT, "id: an artifact id (a positive integer)");
    int rc;
    cm_pg_conn_t *c = ota__conn_or_fail(call, ctx, &rc);
    if (!c) return rc;
    PGresult *r = NULL;
    const char *p[1] = {id};
    if (cm_pg_exec(c, &r, "SELECT " OTA_ARTIFACT_COLS ", a.chunk_size FROM artifacts AS a WHERE a.id = $1::bigint AND a.manifest IS NOT NULL",
                   1, p))
        return ota__pg_fail(call, ctx, c);
    cm_pg_release(ctx->pg, c);
    if (PQntuples(r) == 0) {
        PQclear(r);
        return cm_call_fail(call, CM_STATUS_NOT_FOUND, "no artifact %s", id);
    }
    *out = ota__artifact_row(call, r, 0);
    if (chunk) *chunk = strtoll(PQgetvalue(r, 0, PQnfields(r) - 1), NULL, 10);
    PQclear(r);
    return 0;
}

int ota_get_artifact_check(cm_call_t *call, ProtobufCMessage *req_) {
    const Iot__Ota__V1__GetArtifactRequest *req = (const void *)req_;
    if (!ota__id(req->id)) return cm_call_fail(call, CM_STATUS_INVALID_ARGUMENT, "id: an artifact id (a positive integer)");
    return 0;
}

int ota_get_artifact(cm_call_t *call, const ProtobufCMessage *req_, ProtobufCMessage *resp_) {
    const Iot__Ota__V1__GetArtifactRequest *req = (const void *)req_;
    Iot__Ota__V1__Artifact *a = NULL;
    int rc = ota_get_artifact_check(call, (ProtobufCMessage *)req_);
    if (!rc) rc = ota__load_or_fail(call, cm_call_service_ctx(call), req->id, &a, NULL);
    if (rc) return rc;
    memcpy(resp_, a, sizeof *a);
    return 0;
}

/* Fills in the default page size. */
int ota_list_artifacts_check(cm_call_t *call, ProtobufCMessage *req_) {
    Iot__Ota__V1__ListArtifactsRequest *req = (void *)req_;
    int size, rc = ota__page_size(call, req->page_size, 100, 1000, &size);
    if (rc) return rc;
    int64_t before = 0;
    if ((rc = ota__token_parse(call, req->page_token, 'a', &before))) return rc;
    if (strlen(req->name) > 128 || strlen(req->model) > 64)
        return cm_call_fail(call, CM_STATUS_INVALID_ARGUMENT, "name: up to 128 characters; model: up to 64");
    req->page_size = size;
    return 0;
}

int ota_list_artifacts(cm_call_t *call, const ProtobufCMessage *req_, ProtobufCMessage *resp_) {
    ota_ctx_t *ctx = cm_call_service_ctx(call);
    const Iot__Ota__V1__ListArtifactsRequest *req = (const void *)req_;
    Iot__Ota__V1__ListArtifactsResponse *resp = (void *)resp_;
    int rc = ota_list_artifacts_check(call, (ProtobufCMessage *)req_);
    if (rc) return rc;
    int size = req->page_size;
    int64_t before = 0;
    ota__token_parse(call, req->page_token, 'a', &before); /* checked */
    cm_pg_conn_t *c = ota__conn_or_fail(call, ctx, &rc);
    if (!c) return rc;
    char b[24], lim[16];
    snprintf(b, sizeof b, "%" PRId64, before);
    snprintf(lim, sizeof lim, "%d", size + 1);
    const char *p[4] = {req->name, req->model, b, lim};
    PGresult *r = NULL;
    if (cm_pg_exec(c, &r,
                   "SELECT " OTA_ARTIFACT_COLS " FROM artifacts AS a WHERE a.manifest IS NOT NULL AND ($1 = '' OR a.name = $1) "
                   "AND ($2 = '' OR $2 = ANY (a.models)) AND ($3::bigint = 0 OR a.id < $3::bigint) ORDER BY a.id DESC LIMIT $4::int",
                   4, p))
        return ota__pg_fail(call, ctx, c);
    cm_pg_release(ctx->pg, c);
    int n = PQntuples(r), take = n > size ? size : n;
    resp->artifacts = cm_call_alloc(call, sizeof *resp->artifacts * (size_t)(take + 1));
    for (int i = 0; i < take; i++) resp->artifacts[resp->n_artifacts++] = ota__artifact_row(call, r, i);
    resp->next_page_token = n > size ? ota__token(call, 'a', strtoll(PQgetvalue(r, take - 1, 0), NULL, 10)) : (char *)"";
    PQclear(r);
    return 0;
}

int ota_delete_artifact_check(cm_call_t *call, ProtobufCMessage *req_) {
    const Iot__Ota__V1__DeleteArtifactRequest *req = (const void *)req_;
    if (!ota__id(req->id)) return cm_call_fail(call, CM_STATUS_INVALID_ARGUMENT, "id: an artifact id (a positive integer)");
    return 0;
}

int ota_delete_artifact(cm_call_t *call, const ProtobufCMessage *req_, ProtobufCMessage *resp_) {
    (void)resp_;
    ota_ctx_t *ctx = cm_call_service_ctx(call);
    const Iot__Ota__V1__DeleteArtifactRequest *req = (const void *)req_;
    int rc = ota_delete_artifact_check(call, (ProtobufCMessage *)req_);
    if (rc) return rc;
    cm_pg_conn_t *c = ota__conn_or_fail(call, ctx, &rc);
    if (!c) return rc;
    PGresult *r = NULL;
    const char *p[1] = {req->id};
    /* Refused while an unfinished rollout uses it. The row lock serialises this with CreateRollout
     * (whose foreign key locks the artifact row): a rollout created first is seen below, one created
     * after finds the artifact gone. Finished rollouts keep their history with artifact_id NULL. */
    rc = cm_pg_begin(c);
    if (!rc) rc = cm_pg_exec(c, &r, "SELECT id FROM artifacts WHERE id = $1::bigint AND manifest IS NOT NULL FOR UPDATE", 1, p);
    if (rc) {
        cm_pg_rollback(c);
        return ota__pg_fail(call, ctx, c);
    }
    int found = PQntuples(r) > 0;
    PQclear(r);
    r = NULL;
    if (!found) {
        cm_pg_rollback(c);
        cm_pg_release(ctx->pg, c);
        return cm_call_fail(call, CM_STATUS_NOT_FOUND, "no artifact %s", req->id);
    }
    if (cm_pg_exec(c, &r, "SELECT id, state FROM rollouts WHERE artifact_id = $1::bigint AND state IN (1, 2, 3) ORDER BY id LIMIT 1", 1, p)) {
        cm_pg_rollback(c);
        return ota__pg_fail(call, ctx, c);
    }
    if (PQntuples(r) > 0) {
        static const char *const states[] = {"", "DRAFT", "RUNNING", "PAUSED"};
        int st = atoi(PQgetvalue(r, 0, 1));
        rc = cm_call_fail(call, CM_STATUS_FAILED_PRECONDITION, "artifact %s is used by rollout %s (%s); cancel it first", req->id,
                          PQgetvalue(r, 0, 0), st >= 1 && st <= 3 ? states[st] : "unfinished");
        PQclear(r);
        cm_pg_rollback(c);
        cm_pg_release(ctx->pg, c);
        return rc;
    }
    PQclear(r);
    if (cm_pg_exec(c, NULL, "DELETE FROM artifacts WHERE id = $1::bigint", 1, p) || cm_pg_commit(c)) {
        cm_pg_rollback(c);
        return ota__pg_fail(call, ctx, c);
    }
    cm_pg_release(ctx->pg, c);
    ota_cache_drop(ctx->cache, ota__id(req->id));
    cm_log_kv(CM_LOG_INFO, "artifact deleted", "id", req->id, NULL);
    return 0;
}

int ota_list_signing_keys(cm_call_t *call, const ProtobufCMessage *req_, ProtobufCMessage *resp_) {
    (void)req_;
    ota_ctx_t *ctx = cm_call_service_ctx(call);
    Iot__Ota__V1__ListSigningKeysResponse *resp = (void *)resp_;
    int rc;
    cm_pg_conn_t *c = ota__conn_or_fail(call, ctx, &rc);
    if (!c) return rc;
    PGresult *r = NULL;
    if (cm_pg_exec_bin(c, &r,
                       "SELECT key_id, public_key, ((extract(epoch FROM create_time) * 1000)::bigint)::text FROM signing_keys "
                       "ORDER BY create_time, key_id",
                       0, NULL, NULL, NULL, 1))
        return ota__pg_fail(call, ctx, c);
    cm_pg_release(ctx->pg, c);
    int n = PQntuples(r);
    resp->keys = cm_call_alloc(call, sizeof *resp->keys * (size_t)(n + 1));
    for (int i = 0; i < n; i++) {
        Iot__Ota__V1__SigningKey *k = cm_call_alloc(call, sizeof *k);
        iot__ota__v1__signing_key__init(k);
        k->key_id = cm_call_strdup(call, PQgetvalue(r, i, 0));
        k->public_key.len = (size_t)PQgetlength(r, i, 1);
        k->public_key.data = cm_call_alloc(call, k->public_key.len + 1);
        memcpy(k->public_key.data, PQgetvalue(r, i, 1), k->public_key.len);
        char *pem = ota_keys_pem(k->public_key.data, k->public_key.len);
        k->public_key_pem = cm_call_strdup(call, pem ? pem : "");
        cm_free(pem);
        k->active = strcmp(k->key_id, ota_keys_active(ctx->keys)) == 0;
        k->loaded = ota_keys_loaded(ctx->keys, k->key_id);
        /* Binary results: the text cast keeps this column readable as text. */
        k->create_time = ota__ts(call, PQgetvalue(r, i, 2));
        resp->keys[resp->n_keys++] = k;
    }
    PQclear(r);
    return 0;
}

/* ---- download ------------------------------------------------------------------------------ */

typedef struct ota__download_s {
    ota_ctx_t *ctx;
    char id[24];
    int64_t aid, next, size, chunk;
} ota__download_t;

/* Chunk idx of the download's artifact, referenced (release it): from the shared cache, or read
 * from Postgres and cached. NULL after failing the call (*rc). */
static const ota_chunk_t *ota__chunk_or_fail(cm_call_t *call, ota__download_t *d, int idx, int *rc) {
    ota_ctx_t *ctx = d->ctx;
    const ota_chunk_t *ch = ota_cache_get(ctx->cache, d->aid, idx);
    if (ch) {
        cm_counter_add(ctx->c_cache_hits, 1);
        return ch;
    }
    cm_counter_add(ctx->c_cache_misses, 1);
    cm_pg_conn_t *c = ota__conn_or_fail(call, ctx, rc);
    if (!c) return NULL;
    char idx_s[16];
    snprintf(idx_s, sizeof idx_s, "%d", idx);
    const char *p[2] = {d->id, idx_s};
    PGresult *r = NULL;
    if (cm_pg_exec_bin(c, &r, "SELECT data FROM artifact_chunks WHERE artifact_id = $1::bigint AND idx = $2::int", 2, p, NULL,
                       NULL, 1)) {
        *rc = ota__pg_fail(call, ctx, c);
        return NULL;
    }
    cm_pg_release(ctx->pg, c);
    if (PQntuples(r) == 0) {
        PQclear(r);
        *rc = cm_call_fail(call, CM_STATUS_NOT_FOUND, "artifact %s was deleted during the download", d->id);
        return NULL;
    }
    ch = ota_cache_put(ctx->cache, d->aid, idx, (const uint8_t *)PQgetvalue(r, 0, 0), (size_t)PQgetlength(r, 0, 0));
    PQclear(r);
    size_t bytes;
    uint64_t hits, misses;
    ota_cache_stats(ctx->cache, &bytes, &hits, &misses);
    cm_gauge_set(ctx->g_cache_bytes, (double)bytes);
    return ch;
}

/* Sends the bytes from d->next to the end of their chunk (with the artifact on the first message).
 * CM_PENDING, CM_STATUS_OK at the end, or a failure status. */
static int ota__send_slice(cm_call_t *call, ota__download_t *d, Iot__Ota__V1__Artifact *first) {
    ota_ctx_t *ctx = d->ctx;
    if (d->next >= d->size && !first) return CM_STATUS_OK;
    Iot__Ota__V1__DownloadArtifactResponse m = IOT__OTA__V1__DOWNLOAD_ARTIFACT_RESPONSE__INIT;
    m.artifact = first;
    m.offset = d->next;
    if (d->next >= d->size) return cm_call_send(call, &m.base) ? CM_STATUS_CANCELLED : CM_PENDING; /* empty artifact */
    int rc = 0;
    int64_t within = d->next % d->chunk;
    const ota_chunk_t *ch = ota__chunk_or_fail(call, d, (int)(d->next / d->chunk), &rc);
    if (!ch) return rc;
    if ((size_t)within >= ch->len) {
        ota_cache_release(ctx->cache, ch);
        return cm_call_fail(call, CM_STATUS_DATA_LOSS, "artifact %s: chunk %" PRId64 " is shorter than its offset", d->id,
                            d->next / d->chunk);
    }
    size_t len = ch->len - (size_t)within;
    /* The chunk goes out in place (no copy per device): grpc holds the cache reference until the
     * bytes are written. */
    if (cm_call_send_tail(call, &m.base, 3 /* data */, ch->data + within, len, ota_chunk_release, (void *)ch))
        return CM_STATUS_CANCELLED;
    d->next += (int64_t)len;
    cm_counter_add(ctx->c_download_bytes, (double)len);
    return CM_PENDING;
}

int ota_download_check(cm_call_t *call, ProtobufCMessage *req_) {
    const Iot__Ota__V1__DownloadArtifactRequest *req = (const void *)req_;
    if (req->offset < 0) return cm_call_fail(call, CM_STATUS_INVALID_ARGUMENT, "offset: 0 or more");
    if (!ota__id(req->artifact_id)) return cm_call_fail(call, CM_STATUS_INVALID_ARGUMENT, "id: an artifact id (a positive integer)");
    return 0;
}

int ota_download_start(cm_call_t *call, const ProtobufCMessage *req_) {
    ota_ctx_t *ctx = cm_call_service_ctx(call);
    const Iot__Ota__V1__DownloadArtifactRequest *req = (const void *)req_;
    char device[OTA_MAX_ID + 1];
    int rc = ota__device_or_fail(call, ctx, device);
    if (!rc) rc = ota_download_check(call, (ProtobufCMessage *)req_);
    if (rc) return rc;
    Iot__Ota__V1__Artifact *a = NULL;
    int64_t chunk = 0;
    if ((rc = ota__load_or_fail(call, ctx, req->artifact_id, &a, &chunk))) return rc;
    if (req->offset > a->size)
        return cm_call_fail(call, CM_STATUS_OUT_OF_RANGE, "offset %" PRId64 " is beyond the artifact's %" PRId64 " bytes",
                            req->offset, a->size);
    ota__download_t *d = cm_calloc(1, sizeof *d);
    d->ctx = ctx;
    snprintf(d->id, sizeof d->id, "%s", a->id);
    d->aid = ota__id(a->id);
    d->next = req->offset;
    d->size = a->size;
    d->chunk = chunk; /* what the artifact was stored with (it may differ from today's setting) */
    cm_call_set_user(call, d);
    cm_counter_add(ctx->c_downloads, 1);
    cm_gauge_set(ctx->g_downloads, (double)atomic_fetch_add(&ctx->downloads, 1) + 1);
    if (d->chunk <= 0) return cm_call_fail(call, CM_STATUS_DATA_LOSS, "artifact %s has no chunk size", d->id);
    return ota__send_slice(call, d, a);
}

int ota_download_writable(cm_call_t *call) { return ota__send_slice(call, cm_call_user(call), NULL); }

void ota_download_done(cm_call_t *call, int cancelled) {
    (void)cancelled;
    ota__download_t *d = cm_call_user(call);
    if (!d) return;
    cm_gauge_set(d->ctx->g_downloads, (double)atomic_fetch_sub(&d->ctx->downloads, 1) - 1);
    cm_free(d);
}
