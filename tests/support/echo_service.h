/* iot.testing.v1.Echo on the libs/common framework: the server the framework tests, the grpc-js
 * interop tests and the benchmark all talk to. */
#ifndef ECHO_SERVICE_H
#define ECHO_SERVICE_H

#include <stdatomic.h>

#include "cm_rpc.h"

typedef struct echo_ctx_s {
    atomic_int cancels_seen;   /* WaitForCancel calls that saw cancellation */
    atomic_int stream_cancels; /* streams whose done() reported cancelled */
    atomic_int flaky_calls;    /* Unary calls with message "flaky": every other one is UNAVAILABLE */
    atomic_int paced_sent;     /* responses sent by paced ServerStream calls */
    /* ServerStream with message "tail": payloads sent with cm_call_send_tail, each from its own
     * buffer; released counts the release callbacks (exactly one per buffer made). */
    atomic_int tail_made, tail_released, tail_refused, tail_einval;
} echo_ctx_t;

/* A service table bound to ctx (lives as long as ctx). */
void echo_service_init(cm_service_t *svc, echo_ctx_t *ctx);

#endif
