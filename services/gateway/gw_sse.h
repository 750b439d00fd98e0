/* Server-Sent Event routes over backend server streams (see gw_sse.c). */
#ifndef GW_SSE_H
#define GW_SSE_H

#include "gw.h"

/* Answers r with an event stream of rpc's messages (type desc) on backend: event name event, the
 * "id:" from the string field id_field (NULL: none). A backend that fails at once is an HTTP error. */
void gw_sse_pipe(gw_req_t *r, int backend, const char *rpc, const ProtobufCMessage *req, const ProtobufCMessageDescriptor *desc,
                 const char *event, const char *id_field);
/* GET /api/v1/alerts/stream: WatchAlerts; Last-Event-ID resumes. */
void gw_sse_alerts(gw_req_t *r);
/* GET /api/v1/devices/{device_id}/telemetry/stream: WatchTelemetry of a device that exists. */
void gw_sse_telemetry(gw_req_t *r);

#endif
