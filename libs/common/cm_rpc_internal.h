/* Internals of the gRPC layer shared by cm_server.c, cm_client.c, cm_health.c and
 * cm_reflection.c. This is the only header in the tree that includes <grpc/grpc.h>. */
#ifndef CM_RPC_INTERNAL_H
#define CM_RPC_INTERNAL_H

#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>

#include <grpc/byte_buffer.h>
#include <grpc/byte_buffer_reader.h>
#include <grpc/grpc.h>
#include <grpc/grpc_security.h>
#include <grpc/slice.h>
#include <grpc/support/alloc.h>
#include <grpc/support/time.h>

#include "cm_alloc.h"
#include "cm_log.h"
#include "cm_rpc.h"

/* Every completion-queue tag points at one of these; `kind` says which handler runs. */
typedef enum {
    CM__TAG_REQUEST = 1, /* a posted request slot matched an incoming call */
    CM__TAG_CLOSE,       /* RECV_CLOSE_ON_SERVER: the call ended (cancelled or status sent) */
    CM__TAG_RECV,        /* RECV_MESSAGE completed */
    CM__TAG_SEND,        /* a send batch (message and/or status) completed */
    CM__TAG_GENERIC,     /* a call to a method nobody registered arrived */
    CM__TAG_GENERIC_DONE,
    CM__TAG_SHUTDOWN,    /* grpc_server_shutdown_and_notify finished */
} cm__tag_kind_t;

typedef struct cm__tag_s {
    cm__tag_kind_t kind;
    void *obj;
} cm__tag_t;

/* Per-method latency buckets (seconds) for the Prometheus histogram. */
#define CM__LAT_BUCKETS 12
extern const double cm__lat_bounds[CM__LAT_BUCKETS];

/* Updated with relaxed atomics on every call end; read by the metrics page. */
typedef struct cm__method_stats_s {
    _Atomic uint64_t codes[CM_STATUS_COUNT];
    _Atomic uint64_t lat_buckets[CM__LAT_BUCKETS + 1]; /* last is +Inf */
    _Atomic uint64_t lat_sum_ns;
} cm__method_stats_t;

typedef struct cm__method_reg_s {
    const cm_service_t *svc;
    const cm_method_t *m;
    const ProtobufCMessageDescriptor *in, *out;
    char path[256];        /* "/pkg.Service/Method" */
    const char *svc_name;  /* "pkg.Service" */
    const char *method_name;
    void *handle;          /* grpc_server_register_method */
    cm__method_stats_t stats;
} cm__method_reg_t;

/* Decodes a received byte buffer into a message allocated from `alloc`; NULL if it does not parse. */
ProtobufCMessage *cm__decode(const ProtobufCMessageDescriptor *desc, ProtobufCAllocator *alloc,
                             grpc_byte_buffer *buf);
/* Decodes a request into arena memory with the fast decoder (cm_pbdec.c), or protobuf-c when the
 * message is outside its scope; NULL if it does not parse, or if a string field is not UTF-8 or
 * holds a NUL byte: then why names the field and the reason (else why is ""). */
ProtobufCMessage *cm__decode_arena(const ProtobufCMessageDescriptor *desc, cm_arena_t *a, grpc_byte_buffer *buf, char *why,
                                   size_t cap);
/* Serialises msg into a new byte buffer (destroy with grpc_byte_buffer_destroy). */
grpc_byte_buffer *cm__encode(const ProtobufCMessage *msg);
/* 1 when key/value form a header gRPC accepts (lowercase key; printable ASCII value unless the
 * key ends in "-bin"). */
int cm__md_ok(const char *key, const char *val, size_t vlen);
/* Reads a whole file into a NUL-terminated buffer (cm_free); NULL on error. */
char *cm__read_file(const char *path, size_t *len);

/* Health and reflection are ordinary services on every server. */
void cm__health_init(cm_server_t *srv);
void cm__health_shutdown(cm_server_t *srv); /* everything NOT_SERVING, watchers ended */
void cm__health_free(cm_server_t *srv);
const cm_service_t *cm__health_service(cm_server_t *srv);
void cm__reflection_fill(cm_service_t *s, cm_server_t *srv);
/* Names of the services registered on srv (for reflection's list_services). */
size_t cm__server_service_names(cm_server_t *srv, const char **out, size_t max);
/* The health state lives on the server; these give cm_health.c access to it. */
typedef struct cm__health_s cm__health_t;
cm__health_t *cm__server_health(cm_server_t *srv);
void cm__server_set_health_state(cm_server_t *srv, cm__health_t *h);
/* All methods, for metrics exposition. */
size_t cm__server_methods(cm_server_t *srv, cm__method_reg_t **out);
const char *cm__server_name(const cm_server_t *srv);

#endif
