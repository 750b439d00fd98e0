/* Error codes shared by every iotsuite library and service.
 *
 * Functions return int: 0 on success, a negative CM_E... code on failure. The codes come from one
 * X-macro table so that the enum and cm_strerror() cannot drift apart. */
#ifndef CM_ERR_H
#define CM_ERR_H

#define CM_ERRNO_MAP(X)                                               \
    X(NOMEM, "out of memory")                                         \
    X(INVAL, "invalid argument")                                      \
    X(CLOSED, "call or connection already closed")                    \
    X(FULL, "send queue full")                                        \
    X(IO, "input/output error")                                       \
    X(TIMEOUT, "timed out")                                           \
    X(NOTFOUND, "not found")                                          \
    X(PG, "postgres error")                                           \
    X(REDIS, "redis error")                                           \
    X(TLS, "TLS configuration error")                                 \
    X(BIND, "could not bind the listen address")                      \
    X(DECODE, "message could not be decoded")                         \
    X(CONFIG, "invalid configuration")                                \
    X(RPC, "rpc failed")                                              \
    X(STATE, "operation not allowed in the current state")

enum {
    CM_OK_ = 0,
#define CM__ERR_ENUM(name, msg) CM_E##name,
    CM__ERR_FIRST = -1000,
    CM_ERRNO_MAP(CM__ERR_ENUM)
#undef CM__ERR_ENUM
    CM__ERR_LAST
};

/* Returns a static string for a CM_E... code (or "unknown error"). */
const char *cm_strerror(int err);

#endif
