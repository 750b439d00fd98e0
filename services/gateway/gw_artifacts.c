/* Artifacts over HTTP: uploads stream the request body into ota's UploadArtifact (never the whole
 * file in memory: 256 KiB chunks go out as they fill), downloads stream DownloadArtifact's chunks
 * as the response body, resumable with "Range: bytes=N-" (206). Downloads are device-facing like
 * the gRPC call: the device's token goes through as its credential. */
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cm_buf.h"
#include "cm_err.h"
#include "cm_pbjson.h"
#include "gw_artifacts.h"
#include "iot/ota/v1/ota.pb-c.h"

#define GW__CHUNK (256 * 1024)
#define GW__UPLOAD_MS (30LL * 60 * 1000) /* the deadline of one upload or download */
#define GW__WAKE_MS 1000

/* ---- upload ----------------------------------------------------------------------------------- */

typedef struct gw__upload_s {
    cm_stream_t *st;
    cm_buf_t chunk;
    int64_t total, max;
    int refused; /* a send failed: the backend ended the call (its status says why) */
    int too_big;
} gw__upload_t;

static void gw__upload_free(void *p) {
    gw__upload_t *u = p;
    if (u->st) {
        cm_stream_cancel(u->st);
        cm_stream_finish(u->st, NULL);
    }
    cm_buf_free(&u->chunk);
    cm_free(u);
}

static int gw__upload_flush(gw__upload_t *u) {
    if (!u->chunk.len) return 0;
    Iot__Ota__V1__UploadArtifactRequest m = IOT__OTA__V1__UPLOAD_ARTIFACT_REQUEST__INIT;
    m.part_case = IOT__OTA__V1__UPLOAD_ARTIFACT_REQUEST__PART_CHUNK;
    m.chunk.data = (uint8_t *)u->chunk.data;
    m.chunk.len = u->chunk.len;
    int rc = cm_stream_send(u->st, &m.base);
    cm_buf_reset(&u->chunk);
    return rc;
}

static int gw__upload_body(cm_http_req_t *h, const char *data, size_t len, void *arg) {
    (void)h;
    gw__upload_t *u = arg;
    u->total += (int64_t)len;
    if (u->total > u->max) {
        u->too_big = 1;
        return 1;
    }
    while (len) {
        size_t take = GW__CHUNK - u->chunk.len;
        if (take > len) take = len;
        cm_buf_append(&u->chunk, data, take);
        data += take;
        len -= take;
        if (u->chunk.len == GW__CHUNK && gw__upload_flush(u)) {
            u->refused = 1;
            return 1;
        }
    }
    return 0;
}

void gw_artifacts_upload_begin(gw_req_t *r) {
    int64_t max = r->gw->cfg->max_upload;
    const char *cl = cm_http_header(r->http, "Content-Length");
    if (cl && strtoll(cl, NULL, 10) > max) {
        gw_reply_error_http(r, 413, CM_STATUS_RESOURCE_EXHAUSTED, NULL, "the artifact is over the gateway's upload limit of %" PRId64 " bytes (IOT_GW_MAX_UPLOAD)", max);
        return;
    }
    /* The header from the query: name, version, models (repeated), releaseNotes, sha256, size. */
    Iot__Ota__V1__ArtifactHeader *hd = cm_arena_alloc(&r->arena, sizeof *hd);
    iot__ota__v1__artifact_header__init(hd);
    char err[512];
    for (size_t i = 0;; i++) {
        const char *k, *v;
        if (cm_http_query_at(r->http, i, &k, &v)) break;
        if (cm_pbjson_set(&hd->base, k, v, &r->arena, err, sizeof err)) {
            gw_reply_error(r, CM_STATUS_INVALID_ARGUMENT, NULL, "query parameter %s", err);
            return;
        }
    }
    if (hd->size == 0 && cl) hd->size = strtoll(cl, NULL, 10); /* ota checks what arrived against it */
    gw__upload_t *u = cm_calloc(1, sizeof *u);
    u->max = max;
    cm_call_opts_t o = {.timeout_ms = GW__UPLOAD_MS};
    u->st = cm_stream_open(r->gw->ch[GW_OTA], r->route->rpc, &o);
    r->ext = u;
    r->ext_free = gw__upload_free;
    Iot__Ota__V1__UploadArtifactRequest m = IOT__OTA__V1__UPLOAD_ARTIFACT_REQUEST__INIT;
    m.part_case = IOT__OTA__V1__UPLOAD_ARTIFACT_REQUEST__PART_HEADER;
    m.header = hd;
    if (!u->st || cm_stream_send(u->st, &m.base)) u->refused = 1; /* handle() reads the status */
    if (!u->refused) cm_http_req_stream_body(r->http, gw__upload_body, u);
}

void gw_artifacts_upload(gw_req_t *r) {
    gw__upload_t *u = r->ext;
    if (!u) return; /* begin answered */
    if (u->too_big) {
        gw_reply_error_http(r, 413, CM_STATUS_RESOURCE_EXHAUSTED, NULL, "the artifact is over the gateway's upload limit of %" PRId64 " bytes (IOT_GW_MAX_UPLOAD)", u->max);
        return;
    }
    if (!u->st) {
        gw_reply_error(r, CM_STATUS_INTERNAL, NULL, "the upload could not be started");
        return;
    }
    if (!u->refused && (gw__upload_flush(u) || cm_stream_close_send(u->st))) u->refused = 1;
    ProtobufCMessage *resp = NULL;
    if (!u->refused) cm_stream_recv(u->st, &iot__ota__v1__artifact__descriptor, &resp);
    cm_rpc_status_t st = {0};
    int code = cm_stream_finish(u->st, &st);
    u->st = NULL;
    if (code == CM_STATUS_OK && resp) {
        gw_reply_msg(r, 201, resp);
    } else if (code == CM_STATUS_DATA_LOSS) { /* the content does not match the declared sha256/size: nothing stored */
        gw_reply_error_http(r, 422, code, NULL, "%s", st.message);
    } else {
        if (code == CM_STATUS_OK) st.code = code = CM_STATUS_INTERNAL;
        gw_reply_backend_error(r, GW_OTA, &st);
    }
    if (resp) protobuf_c_message_free_unpacked(resp, NULL);
    cm_rpc_status_clear(&st);
}

/* ---- download --------------------------------------------------------------------------------- */

typedef struct gw__download_s {
    gw_t *gw;
    cm_stream_t *st;
    Iot__Ota__V1__DownloadArtifactResponse *m; /* the message being sent */
    size_t off;
} gw__download_t;

static ssize_t gw__download_read(void *arg, char *buf, size_t max) {
    gw__download_t *d = arg;
    for (;;) {
        if (d->m && d->off < d->m->data.len) {
            size_t n = d->m->data.len - d->off;
            if (n > max) n = max;
            memcpy(buf, d->m->data.data + d->off, n);
            d->off += n;
            return (ssize_t)n;
        }
        if (d->m) protobuf_c_message_free_unpacked(&d->m->base, NULL);
        d->m = NULL;
        d->off = 0;
        if (cm_http_stopping(d->gw->http)) return -1;
        int rc = cm_stream_recv_wait(d->st, &iot__ota__v1__download_artifact_response__descriptor, GW__WAKE_MS, (ProtobufCMessage **)&d->m);
        if (rc == CM_ETIMEOUT) continue;
        if (rc == 1) continue;
        /* The end: complete only when ota says OK; otherwise cut, so the client sees a short body. */
        int code = cm_stream_finish(d->st, NULL);
        d->st = NULL;
        return code == CM_STATUS_OK ? 0 : -1;
    }
}

static void gw__download_done(void *arg) {
    gw__download_t *d = arg;
    if (d->m) protobuf_c_message_free_unpacked(&d->m->base, NULL);
    if (d->st) {
        cm_stream_cancel(d->st);
        cm_stream_finish(d->st, NULL);
    }
    cm_free(d);
}

/* "bytes=N-": the offset, 0 without a Range, -1 for a range this cannot serve. */
static int64_t gw__range(const char *h) {
    if (!h) return 0;
    if (strncmp(h, "bytes=", 6)) return -1;
    char *end;
    long long v = strtoll(h + 6, &end, 10);
    if (end == h + 6 || v < 0 || strcmp(end, "-") != 0) return -1;
    return v;
}

static char *gw__b64(cm_arena_t *a, const uint8_t *p, size_t n) {
    char *out = cm_arena_alloc(a, CM_PBJSON_BASE64_LEN(n) + 1);
    cm_pbjson_base64(out, p, n);
    return out;
}

void gw_artifacts_download(gw_req_t *r) {
    const char *id = gw_param(r, "artifact_id");
    /* The offset comes from Range only. A query is refused rather than ignored: a device resuming
     * with ?offset=N would otherwise get the whole artifact again and append it. */
    const char *qk, *qv;
    if (cm_http_query_at(r->http, 0, &qk, &qv) == 0) {
        gw_reply_error(r, CM_STATUS_INVALID_ARGUMENT, NULL, "query parameter %s: this route takes none (resume with \"Range: bytes=<offset>-\")", qk);
        return;
    }
    int64_t offset = gw__range(cm_http_header(r->http, "Range"));
    if (offset < 0) {
        gw_reply_error(r, CM_STATUS_OUT_OF_RANGE, NULL, "Range: only \"bytes=<offset>-\" is served (resume from an offset)");
        return;
    }
    Iot__Ota__V1__DownloadArtifactRequest req = IOT__OTA__V1__DOWNLOAD_ARTIFACT_REQUEST__INIT;
    req.artifact_id = (char *)id;
    req.offset = offset;
    cm_md_t md[1] = {{"authorization", cm_http_header(r->http, "Authorization"), 0}};
    cm_call_opts_t o = {.timeout_ms = GW__UPLOAD_MS, .md = md, .n_md = 1};
    cm_stream_t *st = cm_stream_open(r->gw->ch[GW_OTA], r->route->rpc, &o);
    Iot__Ota__V1__DownloadArtifactResponse *first = NULL;
    int rc = st && !cm_stream_send(st, &req.base) && !cm_stream_close_send(st)
                 ? cm_stream_recv_wait(st, &iot__ota__v1__download_artifact_response__descriptor, r->gw->cfg->timeout_ms, (ProtobufCMessage **)&first)
                 : CM_ECLOSED;
    if (rc != 1 || !first->artifact) {
        cm_rpc_status_t rs = {0};
        if (rc == CM_ETIMEOUT) cm_stream_cancel(st);
        int code = st ? cm_stream_finish(st, &rs) : CM_STATUS_INTERNAL;
        if (first) protobuf_c_message_free_unpacked(&first->base, NULL);
        if (rc == CM_ETIMEOUT) rs.code = CM_STATUS_DEADLINE_EXCEEDED;
        else if (code == CM_STATUS_OK) rs.code = CM_STATUS_INTERNAL;
        else rs.code = code;
        gw_reply_backend_error(r, GW_OTA, &rs);
        cm_rpc_status_clear(&rs);
        return;
    }
    const Iot__Ota__V1__Artifact *a = first->artifact;
    char size[24], range[80], disp[300];
    snprintf(size, sizeof size, "%" PRId64, a->size);
    snprintf(range, sizeof range, "bytes %" PRId64 "-%" PRId64 "/%" PRId64, offset, a->size - 1, a->size);
    snprintf(disp, sizeof disp, "attachment; filename=\"%s-%s.bin\"", a->name, a->version);
    cm_http_header_t h[] = {
        {"X-Artifact-Id", a->id},
        {"X-Artifact-Size", size},
        {"X-Artifact-Sha256", a->sha256},
        {"X-Artifact-Key-Id", a->key_id},
        {"X-Artifact-Signature", gw__b64(&r->arena, a->signature.data, a->signature.len)},
        {"X-Artifact-Manifest", gw__b64(&r->arena, a->manifest.data, a->manifest.len)},
        {"Content-Disposition", disp},
        {"Accept-Ranges", "bytes"},
        {"Content-Range", range},
    };
    gw__download_t *d = cm_calloc(1, sizeof *d);
    d->gw = r->gw;
    d->st = st;
    d->m = first; /* it may carry data too */
    int status = offset > 0 ? 206 : 200;
    cm_http_reply_stream(r->http, status, "application/octet-stream", h, offset > 0 ? 9 : 8, gw__download_read, gw__download_done, d);
    r->status = status;
}
