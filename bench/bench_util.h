/* Helpers shared by the C benchmark drivers (each .c file under bench/ is its own program, so these are
 * static and header-only). */
#ifndef BENCH_UTIL_H
#define BENCH_UTIL_H

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cm_rpc.h"
#include "iot/ingest/v1/ingest.pb-c.h"

/* VmRSS of process pid in kB, -1 when it cannot be read. */
static inline long bench_rss_kb(long pid) {
    char path[64], line[256];
    snprintf(path, sizeof path, "/proc/%ld/status", pid);
    FILE *f = fopen(path, "r");
    long kb = -1;
    while (f && fgets(line, sizeof line, f))
        if (strncmp(line, "VmRSS:", 6) == 0) kb = atol(line + 6);
    if (f) fclose(f);
    return kb;
}

/* Opens device `id`'s StreamTelemetry to ingest with its "Bearer <token>" auth, reads the first
 * ack and sets *resume to the seq ingest has; NULL (logged) when ingest refuses. */
static inline cm_stream_t *bench_open_telemetry(cm_channel_t *ch, const char *id, const char *auth, int64_t timeout_ms,
                                                uint64_t *resume) {
    cm_md_t md = {"authorization", auth, 0};
    cm_call_opts_t o = {.timeout_ms = timeout_ms, .md = &md, .n_md = 1};
    cm_stream_t *s = cm_stream_open(ch, "/iot.ingest.v1.Ingest/StreamTelemetry", &o);
    Iot__Ingest__V1__TelemetryAck *ack = NULL;
    if (!s) return NULL;
    if (cm_stream_recv(s, &iot__ingest__v1__telemetry_ack__descriptor, (ProtobufCMessage **)&ack) != 1) {
        cm_rpc_status_t st = {0};
        cm_stream_finish(s, &st);
        fprintf(stderr, "open %s: %s %s\n", id, cm_status_name(st.code), st.message);
        cm_rpc_status_clear(&st);
        return NULL;
    }
    *resume = ack->acked_seq;
    protobuf_c_message_free_unpacked(&ack->base, NULL);
    return s;
}

#endif
