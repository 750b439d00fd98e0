/* Redis over hiredis: argv-style commands only (never format strings with data in them),
 * pipelining, and reconnection.
 *
 * A cm_redis_t is one connection and is not thread safe; cm_redis_pool_t hands connections to
 * threads. A connection that failed with an I/O error is re-established before the next command;
 * the failed command is NOT retried here (it may have been applied): the caller decides.
 * Replies are hiredis redisReply objects: the caller frees each with freeReplyObject(). */
#ifndef CM_REDIS_H
#define CM_REDIS_H

#include <hiredis.h>
#include <stddef.h>

typedef struct cm_redis_s cm_redis_t;

/* addr: "host:port" or "unix:/path/to/socket". Connects lazily. NULL only on a malformed addr. */
cm_redis_t *cm_redis_new(const char *addr, int timeout_ms, int *err);
void cm_redis_free(cm_redis_t *r);

/* Sends one command and waits for its reply. Returns the reply (a REDIS_REPLY_ERROR reply is still
 * a reply) or NULL on a connection problem (cm_redis_error says which). */
redisReply *cm_redis_cmd(cm_redis_t *r, int argc, const char **argv, const size_t *argvlen);
/* Convenience for NUL-terminated arguments: cm_redis_cmdv(r, "SET", key, val, NULL). */
redisReply *cm_redis_cmdv(cm_redis_t *r, const char *first, ...);

/* Pipelining: append n commands, then read n replies in order. */
int cm_redis_append(cm_redis_t *r, int argc, const char **argv, const size_t *argvlen);
int cm_redis_get_reply(cm_redis_t *r, redisReply **reply);

const char *cm_redis_error(const cm_redis_t *r);
/* Seconds-resolution check that the server answers PING. */
int cm_redis_ping(cm_redis_t *r);

/* A Lua script run with EVALSHA; its text goes out (EVAL) only when Redis answers NOSCRIPT (first
 * use, after a restart or SCRIPT FLUSH), so Redis does not hash the script on every call. Scripts
 * take no KEYS: callers pass a key prefix as the first argument. */
typedef struct cm_redis_script_s {
    const char *text; /* must outlive the script: usually a static string */
    char sha[41];
} cm_redis_script_t;
void cm_redis_script_init(cm_redis_script_t *s, const char *text);
/* Runs the script with nargs arguments (lens NULL: NUL-terminated). Returns the reply (error replies
 * included) or NULL on a connection problem, like cm_redis_cmd. */
redisReply *cm_redis_eval(cm_redis_t *r, const cm_redis_script_t *s, int nargs, const char *const *args,
                          const size_t *lens);

typedef struct cm_redis_pool_s cm_redis_pool_t;
cm_redis_pool_t *cm_redis_pool_new(const char *addr, int size, int timeout_ms, int *err);
void cm_redis_pool_free(cm_redis_pool_t *p);
/* Waits up to timeout_ms for a free connection. */
cm_redis_t *cm_redis_pool_acquire(cm_redis_pool_t *p, int timeout_ms);
void cm_redis_pool_release(cm_redis_pool_t *p, cm_redis_t *r);

/* One command, or one script, on a pooled connection, for stores that treat every failure alike:
 * the reply, or NULL with the reason in err (no connection free within timeout_ms, a connection
 * problem, or an error reply, which is freed here). */
redisReply *cm_redis_pool_cmd(cm_redis_pool_t *p, int timeout_ms, int argc, const char **argv, const size_t *lens,
                              char *err, size_t err_cap);
redisReply *cm_redis_pool_eval(cm_redis_pool_t *p, int timeout_ms, const cm_redis_script_t *s, int nargs,
                               const char *const *args, const size_t *lens, char *err, size_t err_cap);

#endif
