/* Server-Sent Events over backend server streams: each message of the gRPC stream becomes one
 * event ("id: <event id>\nevent: <name>\ndata: <proto3 JSON on one line>\n\n"). The stream is read
 * in the HTTP connection's own thread, waking each second to notice a shutdown; a comment line
 * goes out after 15 s of quiet so proxies keep the connection and a vanished client is noticed.
 * When the backend ends the stream (or fails) an "error" event says why and the response ends:
 * EventSource-style clients reconnect with Last-Event-ID and miss nothing where the backend can
 * resume (WatchAlerts' after_event_id). */
#include <string.h>

#include "cm_buf.h"
#include "cm_err.h"
#include "cm_json.h"
#include "cm_log.h"
#include "cm_pbjson.h"
#include "cm_time.h"
#include "gw_sse.h"
#include "iot/device/v1/device.pb-c.h"
#include "iot/ingest/v1/ingest.pb-c.h"
#include "iot/processing/v1/processing.pb-c.h"

#define GW__SSE_WAKE_MS 1000
#define GW__SSE_KEEPALIVE_MS 15000
/* How long a backend stream may live before it is renewed (the client reconnects and resumes). */
#define GW__SSE_STREAM_MS (24LL * 3600 * 1000)
/* How long to wait for the backend's first word before answering 200 (a down backend is a 503). */
#define GW__SSE_FIRST_MS 300

typedef struct gw__sse_s {
    gw_t *gw;
    cm_stream_t *st;
    const ProtobufCMessageDescriptor *desc;
    const char *event, *id_field;
    cm_buf_t out;
    size_t off;
    int ended;
    int64_t last_write_ms;
    int backend;
} gw__sse_t;

/* Appends msg as one event. */
static void gw__sse_event(gw__sse_t *s, const ProtobufCMessage *msg) {
    json_t *j = cm_pbjson_from_msg(msg);
    char *data = j ? cm_json_dump(j) : NULL;
    json_decref(j);
    if (!data) return; /* a value JSON cannot carry: nothing a client could read */
    if (s->id_field) {
        const ProtobufCFieldDescriptor *f = protobuf_c_message_descriptor_get_field_by_name(msg->descriptor, s->id_field);
        const char *id = f ? *(const char *const *)((const char *)msg + f->offset) : NULL;
        if (id && *id) cm_buf_printf(&s->out, "id: %s\n", id);
    }
    cm_buf_printf(&s->out, "event: %s\ndata: %s\n\n", s->event, data);
    cm_free(data);
}

/* The backend's stream is over: an "error" event names its status (OK too: "the stream ended"). */
static void gw__sse_end(gw__sse_t *s) {
    cm_rpc_status_t st = {0};
    int code = cm_stream_finish(s->st, &st);
    s->st = NULL;
    json_t *j = json_pack("{s:i,s:s,s:s,s:{s:s}}", "code", code, "status", cm_status_name(code), "message",
                          st.message[0] ? st.message : "the stream ended; reconnect to go on", "details", "service",
                          gw_backend_name(s->backend));
    char *data = j ? cm_json_dump(j) : NULL;
    json_decref(j);
    if (data) cm_buf_printf(&s->out, "event: error\ndata: %s\n\n", data);
    cm_free(data);
    cm_rpc_status_clear(&st);
    s->ended = 1;
}

static ssize_t gw__sse_read(void *arg, char *buf, size_t max) {
    gw__sse_t *s = arg;
    for (;;) {
        if (s->off < s->out.len) {
            size_t n = s->out.len - s->off;
            if (n > max) n = max;
            memcpy(buf, s->out.data + s->off, n);
            s->off += n;
            if (s->off == s->out.len) {
                cm_buf_reset(&s->out);
                s->off = 0;
            }
            s->last_write_ms = (cm_mono_ns() / 1000000);
            return (ssize_t)n;
        }
        if (s->ended) return 0;
        if (cm_http_stopping(s->gw->http)) { /* shutting down: end the response; clients reconnect elsewhere */
            cm_stream_cancel(s->st);
            cm_stream_finish(s->st, NULL);
            s->st = NULL;
            s->ended = 1;
            continue;
        }
        ProtobufCMessage *m = NULL;
        int rc = cm_stream_recv_wait(s->st, s->desc, GW__SSE_WAKE_MS, &m);
        if (rc == 1) {
            gw__sse_event(s, m);
            protobuf_c_message_free_unpacked(m, NULL);
        } else if (rc == CM_ETIMEOUT) {
            if ((cm_mono_ns() / 1000000) - s->last_write_ms >= GW__SSE_KEEPALIVE_MS) cm_buf_puts(&s->out, ": keepalive\n\n");
        } else {
            gw__sse_end(s);
        }
    }
}

static void gw__sse_done(void *arg) {
    gw__sse_t *s = arg;
    if (s->st) {
        cm_stream_cancel(s->st);
        cm_stream_finish(s->st, NULL);
    }
    cm_buf_free(&s->out);
    cm_free(s);
}

void gw_sse_pipe(gw_req_t *r, int backend, const char *rpc, const ProtobufCMessage *req, const ProtobufCMessageDescriptor *desc,
                 const char *event, const char *id_field) {
    cm_call_opts_t o = {.timeout_ms = GW__SSE_STREAM_MS};
    cm_stream_t *st = cm_stream_open(r->gw->ch[backend], rpc, &o);
    if (!st || cm_stream_send(st, req) || cm_stream_close_send(st)) {
        cm_rpc_status_t rs = {0};
        if (st) cm_stream_finish(st, &rs);
        else rs.code = CM_STATUS_INTERNAL;
        gw_reply_backend_error(r, backend, &rs);
        cm_rpc_status_clear(&rs);
        return;
    }
    gw__sse_t *s = cm_calloc(1, sizeof *s);
    s->gw = r->gw;
    s->st = st;
    s->desc = desc;
    s->event = event;
    s->id_field = id_field;
    s->backend = backend;
    s->last_write_ms = (cm_mono_ns() / 1000000);
    cm_buf_puts(&s->out, "retry: 2000\n\n");
    /* The backend's first word: a failure now is an HTTP error, not a stream that ends at once. */
    ProtobufCMessage *m = NULL;
    int rc = cm_stream_recv_wait(st, desc, GW__SSE_FIRST_MS, &m);
    if (rc == 1) {
        gw__sse_event(s, m);
        protobuf_c_message_free_unpacked(m, NULL);
    } else if (rc != CM_ETIMEOUT) {
        cm_rpc_status_t rs = {0};
        cm_stream_finish(st, &rs);
        s->st = NULL;
        gw_reply_backend_error(r, backend, &rs);
        cm_rpc_status_clear(&rs);
        gw__sse_done(s);
        return;
    }
    cm_http_header_t h[] = {{"Cache-Control", "no-cache"}, {"X-Accel-Buffering", "no"}};
    cm_http_reply_stream(r->http, 200, "text/event-stream; charset=utf-8", h, 2, gw__sse_read, gw__sse_done, s);
    r->status = 200;
}

void gw_sse_alerts(gw_req_t *r) {
    Iot__Processing__V1__WatchAlertsRequest *req = (void *)gw_build_request_or_reply(r);
    if (!req) return;
    /* A reconnecting client says where it was: that wins over the query. */
    const char *last = cm_http_header(r->http, "Last-Event-ID");
    if (last && *last) req->after_event_id = cm_arena_strdup(&r->arena, last);
    gw_sse_pipe(r, GW_PROC, r->route->rpc, &req->base, &iot__processing__v1__alert__descriptor, "alert", "event_id");
}

void gw_sse_telemetry(gw_req_t *r) {
    Iot__Ingest__V1__WatchTelemetryRequest *req = (void *)gw_build_request_or_reply(r);
    if (!req) return;
    /* ingest streams whatever device id it is given: an unknown device is a 404 here, not a
     * stream that stays quiet forever. */
    Iot__Device__V1__GetDeviceRequest greq = IOT__DEVICE__V1__GET_DEVICE_REQUEST__INIT;
    greq.id = req->device_id;
    ProtobufCMessage *dev = NULL;
    cm_rpc_status_t st = {0};
    int code = gw_call(r, GW_DM, "/iot.device.v1.DeviceManager/GetDevice", &greq.base, &iot__device__v1__device__descriptor,
                       &dev, 1, &st);
    if (dev) protobuf_c_message_free_unpacked(dev, NULL);
    if (code == CM_STATUS_INVALID_ARGUMENT) { /* device-mgmt names its own field ("id: ..."); the caller gave device_id */
        gw_reply_error(r, code, NULL, "device_id: %s", strncmp(st.message, "id: ", 4) == 0 ? st.message + 4 : st.message);
        cm_rpc_status_clear(&st);
        return;
    }
    if (code) {
        gw_reply_backend_error(r, GW_DM, &st);
        cm_rpc_status_clear(&st);
        return;
    }
    cm_rpc_status_clear(&st);
    gw_sse_pipe(r, GW_INGEST, r->route->rpc, &req->base, &iot__ingest__v1__published_batch__descriptor, "points", NULL);
}
