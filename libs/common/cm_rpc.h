/* The gRPC layer: servers, calls and client channels over the gRPC C core and protobuf-c.
 *
 * Only this layer includes <grpc/grpc.h>; services see protobuf-c messages, cm_call_t and status
 * codes. The threading model and object lifetimes are written down in docs/rpc.md; the short form:
 *
 * - A server runs a fixed number of worker threads that poll one completion queue. Handlers run on
 *   those threads. A handler may block (a Postgres query); the other workers keep serving. Open
 *   streams hold no thread: they are state machines advanced by completion events.
 * - Callbacks of one call never run concurrently with each other. cm_call_send() and
 *   cm_call_finish() may be called from any thread, inside or outside callbacks.
 * - Request messages passed to callbacks, and memory from cm_call_alloc(), live until the callback
 *   returns (for unary and client-stream responses: until the response is sent). Keep copies of what
 *   you need longer.
 * - A call object lives until its `done` callback has returned and every cm_call_ref() has been
 *   matched by cm_call_unref().
 */
#ifndef CM_RPC_H
#define CM_RPC_H

#include <stddef.h>
#include <stdint.h>
#include <protobuf-c/protobuf-c.h>
#include "cm_alloc.h"

/* gRPC status codes, mirrored so that services need not include grpc headers. */
typedef enum {
    CM_STATUS_OK = 0,
    CM_STATUS_CANCELLED = 1,
    CM_STATUS_UNKNOWN = 2,
    CM_STATUS_INVALID_ARGUMENT = 3,
    CM_STATUS_DEADLINE_EXCEEDED = 4,
    CM_STATUS_NOT_FOUND = 5,
    CM_STATUS_ALREADY_EXISTS = 6,
    CM_STATUS_PERMISSION_DENIED = 7,
    CM_STATUS_RESOURCE_EXHAUSTED = 8,
    CM_STATUS_FAILED_PRECONDITION = 9,
    CM_STATUS_ABORTED = 10,
    CM_STATUS_OUT_OF_RANGE = 11,
    CM_STATUS_UNIMPLEMENTED = 12,
    CM_STATUS_INTERNAL = 13,
    CM_STATUS_UNAVAILABLE = 14,
    CM_STATUS_DATA_LOSS = 15,
    CM_STATUS_UNAUTHENTICATED = 16,
} cm_status_t;

#define CM_STATUS_COUNT 17
/* Returned by a stream callback: keep the call open. */
#define CM_PENDING (-1)

/* "OK", "INVALID_ARGUMENT", ...; "UNKNOWN_CODE" for out-of-range values. */
const char *cm_status_name(int code);

typedef struct cm_server_s cm_server_t;
typedef struct cm_call_s cm_call_t;

typedef enum {
    CM_RPC_UNARY = 0,
    CM_RPC_CLIENT_STREAM,
    CM_RPC_SERVER_STREAM,
    CM_RPC_BIDI,
} cm_rpc_kind_t;

/* One entry of a service's method table. Which callbacks apply depends on the kind:
 *
 *   UNARY          unary(call, req, resp)                       -> status
 *   CLIENT_STREAM  [start(call, NULL)] message(call, msg)*  half_close(call, resp) -> status
 *   SERVER_STREAM  start(call, req)                             -> status or CM_PENDING
 *                  [writable(call)]*                            -> status or CM_PENDING
 *   BIDI           [start(call, NULL)] message(call, msg)*  [half_close(call, NULL)]
 *
 * `resp` is an initialised message of the method's output type, allocated in the call's arena:
 * fill it (strings and arrays from cm_call_alloc()/cm_call_strdup()) and return CM_STATUS_OK, or
 * return an error status (usually `return cm_call_fail(call, code, "...")`).
 * Stream callbacks return CM_PENDING to keep the call open, or a status to finish it (queued
 * messages are still delivered first). A call left pending is finished later with cm_call_finish().
 * `done` runs exactly once after the call has ended on the wire, for every kind: release what the
 * handler holds for the call there. `cancelled` is non-zero when the client cancelled, the deadline
 * passed or the connection broke. */
typedef struct cm_method_s {
    const char *name; /* method name as in the .proto: "Check" */
    cm_rpc_kind_t kind;
    int (*unary)(cm_call_t *call, const ProtobufCMessage *req, ProtobufCMessage *resp);
    int (*start)(cm_call_t *call, const ProtobufCMessage *req);
    int (*message)(cm_call_t *call, const ProtobufCMessage *msg);
    int (*half_close)(cm_call_t *call, ProtobufCMessage *resp);
    void (*done)(cm_call_t *call, int cancelled);
    /* Unary only: learn about client cancellation while the handler runs (cm_call_cancelled()
     * turns true). Costs one extra completion event per call, so it is opt-in, like grpc++'s
     * AsyncNotifyWhenDone; without it cm_call_cancelled() still reports a passed deadline.
     * Streaming calls always watch. */
    int watch_cancel;
    /* Server streams only, optional: pull-style sending for large responses. Called (on a worker
     * thread, never concurrently with start or itself) after start returned CM_PENDING whenever
     * fewer than writable_depth messages are queued or in flight (by default: the client has
     * taken everything sent so far). Send the
     * next message(s) and return CM_PENDING, or return a status to finish. Memory then stays at
     * writable_depth messages per call however slowly the client reads; with no message sent and CM_PENDING
     * returned, it is not called again until something is sent (from any thread). */
    int (*writable)(cm_call_t *call);
    /* With writable: how many messages may be queued or in flight before it waits for the
     * client (0 or 1: one; 2-4 let it prepare the next message while one is on the wire). */
    int writable_depth;
    /* Unary only: the handler may return CM_PENDING and answer later, from any thread, with
     * cm_call_respond() (e.g. after a group commit). The request, `resp` and cm_call_alloc() memory
     * then live until cm_call_respond returns; hold a cm_call_ref() while the call is parked. */
    int async;
    /* Unary and server-stream, optional: the method's request check, a function of the request
     * alone (no storage, no other service, no metadata; it may read configuration through
     * cm_call_service_ctx and may fill defaults into the request). 0, or the status the call was
     * failed with. The server never calls it: the handler does, where its ordering requires (after
     * authentication for device calls). It is listed here so that tests and fuzzers can run every
     * method's validation without a server (cm_call_new_detached, tests/fuzz). */
    int (*check)(cm_call_t *call, ProtobufCMessage *req);
} cm_method_t;

typedef struct cm_service_s {
    const ProtobufCServiceDescriptor *desc; /* from protoc-c: pkg__svc__descriptor */
    const cm_method_t *methods;             /* every method of desc must be listed */
    size_t n_methods;
    void *ctx; /* handed to handlers by cm_call_service_ctx() */
} cm_service_t;

typedef struct cm_tls_files_s {
    const char *cert_file;      /* PEM certificate chain */
    const char *key_file;       /* PEM private key */
    const char *ca_file;        /* server: client CA (enables mTLS); client: roots to trust */
    int require_client_cert;    /* server: refuse clients without a certificate signed by ca_file */
} cm_tls_files_t;

typedef struct cm_server_opts_s {
    const char *name;           /* service name for logs and metrics */
    const char *listen;         /* "0.0.0.0:50051", "127.0.0.1:0" (free port), "[::1]:0" */
    int threads;                /* worker threads; 0 = default (4) */
    int max_recv_bytes;         /* 0 = 4 MiB */
    int max_send_queue;         /* per-call queued outgoing messages before cm_call_send says FULL; 0 = 1024 */
    int grace_ms;               /* drain period on shutdown before in-flight calls are cancelled; 0 = 10000 */
    const cm_tls_files_t *tls;  /* NULL: plaintext */
} cm_server_opts_t;

/* Creates a server. On failure returns NULL and sets *err (if given) to a CM_E... code. */
cm_server_t *cm_server_new(const cm_server_opts_t *opts, int *err);
/* Adds a service; before cm_server_start. The table must stay valid while the server lives.
 * Returns CM_EINVAL (with a log line naming it) when a descriptor method has no handler or a
 * handler has no descriptor method. */
int cm_server_add_service(cm_server_t *srv, const cm_service_t *svc);
/* Binds, starts the workers and marks every service SERVING in the health service. */
int cm_server_start(cm_server_t *srv);
/* The bound port (useful with ":0"); 0 before start. */
int cm_server_port(const cm_server_t *srv);
/* Called at the start of cm_server_shutdown, after health went NOT_SERVING and before the drain:
 * end long-lived streams here (cm_call_finish) so they do not hold the drain for the grace period.
 * One hook per server; set before shutdown. */
void cm_server_on_shutdown(cm_server_t *srv, void (*fn)(void *arg), void *arg);
/* Graceful stop: health goes NOT_SERVING, new calls are refused, in-flight calls get up to the
 * grace period to finish, then the rest are cancelled; returns when every call is released and the
 * workers have exited. Idempotent. */
void cm_server_shutdown(cm_server_t *srv);
/* Shuts down if needed and frees. Accepts NULL. */
void cm_server_free(cm_server_t *srv);

/* Health (grpc.health.v1). Status values are those of HealthCheckResponse.ServingStatus:
 * 1 SERVING, 2 NOT_SERVING. "" is the whole server. Watchers see every change. */
enum { CM_HEALTH_SERVING = 1, CM_HEALTH_NOT_SERVING = 2 };
void cm_server_set_health(cm_server_t *srv, const char *service, int status);
/* The current status, 0 (UNKNOWN) for a service never set. */
int cm_server_get_health(cm_server_t *srv, const char *service);
/* Number of calls that have started and not yet been released (for tests and metrics). */
int cm_server_live_calls(cm_server_t *srv);

/* ---- the call, as seen by handlers ----------------------------------------------------- */

void *cm_call_service_ctx(const cm_call_t *call);
const char *cm_call_method(const cm_call_t *call);   /* "/pkg.Service/Method" */
/* Memory that lives until the current callback returns (see the header comment). */
void *cm_call_alloc(cm_call_t *call, size_t n);
char *cm_call_strdup(cm_call_t *call, const char *s);
char *cm_call_strndup(cm_call_t *call, const char *s, size_t n);
/* The same memory as a protobuf-c allocator (free is a no-op), e.g. to unpack stored messages
 * straight into a response. */
ProtobufCAllocator *cm_call_pb_allocator(cm_call_t *call);

/* Request metadata: the first value for key (lowercase), NUL-terminated copy in the call arena;
 * NULL when absent. Binary headers ("-bin") are returned raw with *len set. */
const char *cm_call_metadata(cm_call_t *call, const char *key, size_t *len);
/* Iterates all request metadata: i from 0 while it returns 0. */
int cm_call_metadata_at(cm_call_t *call, size_t i, const char **key, const char **val, size_t *vlen);
/* Response metadata, sent with the first message (initial) or with the status (trailing).
 * Copies key and value (vlen 0: strlen). Returns CM_EINVAL for a header gRPC would refuse
 * (uppercase key; value outside printable ASCII unless the key ends in "-bin"), CM_ESTATE when
 * that metadata already went out. */
int cm_call_add_initial_metadata(cm_call_t *call, const char *key, const char *val, size_t vlen);
int cm_call_add_trailing_metadata(cm_call_t *call, const char *key, const char *val, size_t vlen);

/* "ipv4:127.0.0.1:5555" etc.; valid until the callback returns. */
const char *cm_call_peer(cm_call_t *call);
/* Milliseconds left before the client's deadline; -1 when the client set none. */
int64_t cm_call_deadline_ms(const cm_call_t *call);
/* Non-zero once the client cancelled, the deadline passed or the connection dropped. */
int cm_call_cancelled(const cm_call_t *call);
/* The request's trace (from its traceparent header, or a new one). */
const char *cm_call_trace_id(const cm_call_t *call);

/* Records the status message and returns code, for `return cm_call_fail(call, CODE, "...")`. */
int cm_call_fail(cm_call_t *call, int code, const char *fmt, ...) __attribute__((format(printf, 3, 4)));

/* Queues a message on a streaming call (server-stream or bidi). Serialises msg at once; the caller
 * keeps ownership of msg. Returns 0, CM_EFULL when max_send_queue messages are already waiting (the
 * client is not reading), or CM_ECLOSED when the call has ended or its status is queued. */
int cm_call_send(cm_call_t *call, const ProtobufCMessage *msg);
/* cm_call_send for bulk data, without copying it: msg (left without its bytes field `field`) is
 * serialised at once and data follows it on the wire as that field, read in place by grpc until
 * release(arg), which runs exactly once from any thread: when the message has been written, when
 * the call ends first, or at once when the send is refused (release NULL: data outlives the call).
 * Returns what cm_call_send does, or CM_EINVAL when field is not a singular bytes field of msg. */
int cm_call_send_tail(cm_call_t *call, const ProtobufCMessage *msg, uint32_t field, const void *data, size_t len,
                      void (*release)(void *), void *arg);
/* Finishes a call that a callback left CM_PENDING. msg may be NULL. Returns CM_ECLOSED if the call
 * already ended or was finished. */
int cm_call_finish(cm_call_t *call, int code, const char *msg);

/* Answers an async unary call that returned CM_PENDING: resp (serialised at once; NULL or ignored
 * unless code is OK) and the status, with msg as its message (NULL: none for OK, the code's name
 * otherwise). Returns CM_ECLOSED when the call already ended (the client cancelled or went away). */
int cm_call_respond(cm_call_t *call, int code, const ProtobufCMessage *resp, const char *msg);

/* Ends the call at once with code and msg, dropping messages still queued. For a client that
 * stopped reading (cm_call_send said CM_EFULL): cm_call_finish would queue the status behind
 * messages that flow control never lets out. No callbacks but `done` follow. Returns CM_ECLOSED
 * if the call already ended or its status is on the wire. */
int cm_call_abort(cm_call_t *call, int code, const char *msg);

/* Per-call handler state: set in a callback, read in later ones, release it in `done`. */
void cm_call_set_user(cm_call_t *call, void *user);
void *cm_call_user(const cm_call_t *call);

/* Extra references for code that keeps a call past a callback (e.g. a watcher list). */
void cm_call_ref(cm_call_t *call);
void cm_call_unref(cm_call_t *call);

/* ---- calls without a wire (tests and fuzzers) ------------------------------------------- */

/* A call to svc's method that is on no connection: its arena, cm_call_fail, cm_call_service_ctx
 * (svc->ctx) and cm_call_method work; it has no metadata and no deadline, and sends nothing. For
 * running a method's check (cm_method_t.check) alone. NULL when svc has no such method. Free with
 * cm_call_free_detached. */
cm_call_t *cm_call_new_detached(const cm_service_t *svc, const char *method);
/* The message of the last cm_call_fail on a detached call, or NULL. */
const char *cm_call_detached_message(const cm_call_t *call);
/* Accepts NULL. */
void cm_call_free_detached(cm_call_t *call);

/* ---- client ---------------------------------------------------------------------------- */

typedef struct cm_channel_s cm_channel_t;
typedef struct cm_stream_s cm_stream_t;

typedef struct cm_md_s {
    const char *key;
    const char *val;
    size_t vlen; /* 0: strlen(val) */
} cm_md_t;

typedef struct cm_call_opts_s {
    int64_t timeout_ms;     /* deadline for the whole call, retries included; 0 = 30000 */
    int idempotent;         /* allows retries on UNAVAILABLE */
    int max_attempts;       /* with idempotent; 0 = 3 */
    const cm_md_t *md;      /* request metadata */
    size_t n_md;
    int wait_for_ready;     /* queue until the channel connects instead of failing fast */
} cm_call_opts_t;

/* What the server answered. Metadata arrays are owned by the status; cm_rpc_status_clear() frees. */
typedef struct cm_rpc_status_s {
    int code;
    char message[512];
    cm_md_t *initial_md;
    size_t n_initial_md;
    cm_md_t *trailing_md;
    size_t n_trailing_md;
    int attempts;
} cm_rpc_status_t;

/* First value for key in initial then trailing metadata, or NULL. */
const char *cm_rpc_status_md(const cm_rpc_status_t *st, const char *key);
void cm_rpc_status_clear(cm_rpc_status_t *st);

typedef struct cm_channel_opts_s {
    const cm_tls_files_t *tls;      /* NULL: plaintext */
    const char *authority;          /* TLS: name to verify instead of the target host */
    int max_recv_bytes;             /* 0 = 4 MiB */
    int own_connection;             /* do not share the TCP connection with other channels */
    int flow_window_bytes;          /* fixed HTTP/2 receive window per stream (constrained clients);
                                       0 = grpc's default, grown automatically (BDP probing) */
    int max_reconnect_backoff_ms;   /* cap on reconnect backoff; 0 = grpc's default (120 s) */
} cm_channel_opts_t;

/* target: "127.0.0.1:50051", "dns:///svc.ns:50051", "unix:/path". Channels are thread safe and
 * meant to be kept and reused. Returns NULL and *err on a bad TLS configuration. */
cm_channel_t *cm_channel_new(const char *target, const cm_channel_opts_t *opts, int *err);
void cm_channel_free(cm_channel_t *ch);
/* Waits until the channel is connected or timeout_ms passes; 0 when ready. */
int cm_channel_wait_ready(cm_channel_t *ch, int64_t timeout_ms);

/* A unary call. Illegal request metadata (uppercase key, non-ASCII value without a -bin key) is
 * refused locally with INVALID_ARGUMENT. *resp is set on OK (free with protobuf_c_message_free_unpacked(resp, NULL)).
 * Returns the gRPC status code (also in st->code when st is given). The calling thread's trace
 * (cm_trace_current) is propagated as traceparent, or a new trace is started. */
int cm_channel_unary(cm_channel_t *ch, const char *method, const ProtobufCMessage *req,
                     const ProtobufCMessageDescriptor *resp_desc, ProtobufCMessage **resp,
                     const cm_call_opts_t *opts, cm_rpc_status_t *st);

/* Streaming calls, blocking. One thread may send while another receives.
 * Returns NULL (and logs) only when opts carries metadata gRPC would refuse. */
cm_stream_t *cm_stream_open(cm_channel_t *ch, const char *method, const cm_call_opts_t *opts);
/* 0, or CM_ECLOSED when the call already ended (read the status with cm_stream_finish). */
int cm_stream_send(cm_stream_t *s, const ProtobufCMessage *msg);
/* Like cm_stream_send, but lets the transport coalesce this write with the next ones: it may not
 * leave until a later cm_stream_send or cm_stream_close_send, so never end a burst with it. */
int cm_stream_send_buffered(cm_stream_t *s, const ProtobufCMessage *msg);
int cm_stream_close_send(cm_stream_t *s);
/* 1 with *out set (free with protobuf_c_message_free_unpacked(out, NULL)), 0 at end of stream,
 * negative on error (CM_EDECODE for a message that does not parse). */
int cm_stream_recv(cm_stream_t *s, const ProtobufCMessageDescriptor *desc, ProtobufCMessage **out);
/* cm_stream_recv waiting at most timeout_ms: CM_ETIMEOUT when nothing came by then (the stream is
 * unchanged: call again, or cancel and finish). For a reader that must also notice other things
 * (a client gone, a shutdown) while a stream is quiet. */
int cm_stream_recv_wait(cm_stream_t *s, const ProtobufCMessageDescriptor *desc, int64_t timeout_ms, ProtobufCMessage **out);
/* cm_stream_recv for bulk data, without per-message allocations: *out lives in arena a (reset it
 * between messages; do not free *out) and its bytes fields point into the stream's receive buffer,
 * reused by the next receive: the message is valid until the next cm_stream_recv_view or
 * cm_stream_finish on s, or until a is reset. */
int cm_stream_recv_view(cm_stream_t *s, const ProtobufCMessageDescriptor *desc, cm_arena_t *a, ProtobufCMessage **out);
/* Cancels the call (the server sees cancellation). Then call cm_stream_finish to release it. */
void cm_stream_cancel(cm_stream_t *s);
/* Reads and drops messages the caller left unread, waits for the status, releases the stream and
 * returns the code. To abandon a stream that would not end by itself, cm_stream_cancel first. */
int cm_stream_finish(cm_stream_t *s, cm_rpc_status_t *st);

/* ---- process helpers ------------------------------------------------------------------- */

/* Blocks SIGTERM/SIGINT/SIGHUP in the calling thread (and threads it creates later): call first
 * thing in main, before any thread exists, then cm_wait_for_signal() in main. */
void cm_signals_block(void);
/* Waits for SIGTERM or SIGINT; returns the signal number. */
int cm_wait_for_signal(void);

#endif
