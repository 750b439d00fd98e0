/* hiredis wrapper: connection with lazy reconnect, argv commands, pipelining, a small pool. */
#include "cm_redis.h"
#include "cm_alloc.h"
#include "cm_buf.h"
#include "cm_err.h"
#include "cm_log.h"
#include "cm_time.h"

#include <errno.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <openssl/sha.h>

struct cm_redis_s {
    redisContext *ctx;
    char *host;
    int port;
    char *unix_path;
    int timeout_ms;
    int pending; /* appended commands whose replies were not read */
    int in_use;  /* pool bookkeeping */
    char err[256];
};

cm_redis_t *cm_redis_new(const char *addr, int timeout_ms, int *err) {
    cm_redis_t *r = cm_calloc(1, sizeof *r);
    r->timeout_ms = timeout_ms > 0 ? timeout_ms : 2000;
    if (strncmp(addr, "unix:", 5) == 0) {
        r->unix_path = cm_strdup(addr + 5);
    } else {
        const char *colon = strrchr(addr, ':');
        char *end;
        long port = colon ? strtol(colon + 1, &end, 10) : 0;
        if (!colon || colon == addr || *end || port <= 0 || port > 65535) {
            cm_free(r);
            if (err) *err = CM_EINVAL;
            return NULL;
        }
        r->host = cm_strndup(addr, (size_t)(colon - addr));
        r->port = (int)port;
    }
    if (err) *err = 0;
    return r;
}

void cm_redis_free(cm_redis_t *r) {
    if (!r) return;
    if (r->ctx) redisFree(r->ctx);
    cm_free(r->host);
    cm_free(r->unix_path);
    cm_free(r);
}

static int cm__redis_connect(cm_redis_t *r) {
    if (r->ctx && !r->ctx->err) return 0;
    if (r->ctx) {
        redisFree(r->ctx);
        r->ctx = NULL;
    }
    r->pending = 0;
    struct timeval tv = {r->timeout_ms / 1000, (r->timeout_ms % 1000) * 1000};
    r->ctx = r->unix_path ? redisConnectUnixWithTimeout(r->unix_path, tv) : redisConnectWithTimeout(r->host, r->port, tv);
    if (!r->ctx || r->ctx->err) {
        const char *why = r->ctx ? r->ctx->errstr : "cannot allocate a context";
        if (r->unix_path)
            snprintf(r->err, sizeof r->err, "redis unix:%s: %s", r->unix_path, why);
        else
            snprintf(r->err, sizeof r->err, "redis %s:%d: %s", r->host, r->port, why);
        if (r->ctx) {
            redisFree(r->ctx);
            r->ctx = NULL;
        }
        return CM_EREDIS;
    }
    /* The same timeout bounds every command, so a hung server cannot hang a handler forever. */
    redisSetTimeout(r->ctx, tv);
    return 0;
}

static void cm__redis_io_error(cm_redis_t *r) {
    snprintf(r->err, sizeof r->err, "redis: %s", r->ctx ? r->ctx->errstr : "not connected");
}

/* Drops the connection after an I/O error or timeout: hiredis cannot resume a stream that broke
 * mid-reply, and unread replies would otherwise be taken as answers to later commands. */
static void cm__redis_drop(cm_redis_t *r) {
    if (r->ctx) redisFree(r->ctx);
    r->ctx = NULL;
    r->pending = 0;
}

redisReply *cm_redis_cmd(cm_redis_t *r, int argc, const char **argv, const size_t *argvlen) {
    if (r->pending) {
        snprintf(r->err, sizeof r->err, "redis: %d pipelined replies not read yet", r->pending);
        return NULL;
    }
    if (cm__redis_connect(r)) return NULL;
    redisReply *reply = redisCommandArgv(r->ctx, argc, argv, argvlen);
    if (!reply) {
        cm__redis_io_error(r);
        cm__redis_drop(r);
    }
    return reply;
}

redisReply *cm_redis_cmdv(cm_redis_t *r, const char *first, ...) {
    const char *argv[64];
    int argc = 0;
    va_list ap;
    va_start(ap, first);
    for (const char *a = first; a; a = va_arg(ap, const char *)) {
        if (argc == 64) { /* never send a silently shortened command */
            va_end(ap);
            snprintf(r->err, sizeof r->err, "redis: more than 64 arguments; use cm_redis_cmd");
            return NULL;
        }
        argv[argc++] = a;
    }
    va_end(ap);
    return cm_redis_cmd(r, argc, argv, NULL);
}

int cm_redis_append(cm_redis_t *r, int argc, const char **argv, const size_t *argvlen) {
    if (r->pending == 0 && cm__redis_connect(r)) return CM_EREDIS;
    if (!r->ctx || redisAppendCommandArgv(r->ctx, argc, argv, argvlen) != REDIS_OK) {
        cm__redis_io_error(r);
        cm__redis_drop(r);
        return CM_EREDIS;
    }
    r->pending++;
    return 0;
}

int cm_redis_get_reply(cm_redis_t *r, redisReply **reply) {
    *reply = NULL;
    if (!r->ctx) return CM_EREDIS;
    void *rep = NULL;
    if (redisGetReply(r->ctx, &rep) != REDIS_OK) {
        cm__redis_io_error(r);
        cm__redis_drop(r);
        return CM_EREDIS;
    }
    if (r->pending > 0) r->pending--;
    *reply = rep;
    return 0;
}

const char *cm_redis_error(const cm_redis_t *r) { return r->err; }

int cm_redis_ping(cm_redis_t *r) {
    redisReply *rep = cm_redis_cmdv(r, "PING", NULL);
    int ok = rep && rep->type == REDIS_REPLY_STATUS && strcmp(rep->str, "PONG") == 0;
    if (rep) freeReplyObject(rep);
    return ok ? 0 : CM_EREDIS;
}

/* ---- pool ------------------------------------------------------------------------------ */

struct cm_redis_pool_s {
    cm_redis_t **conns;
    int size;
    pthread_mutex_t mu;
    pthread_cond_t cv;
};

cm_redis_pool_t *cm_redis_pool_new(const char *addr, int size, int timeout_ms, int *err) {
    if (size <= 0) {
        if (err) *err = CM_EINVAL;
        return NULL;
    }
    cm_redis_pool_t *p = cm_calloc(1, sizeof *p);
    p->conns = cm_calloc((size_t)size, sizeof *p->conns);
    p->size = size;
    pthread_mutex_init(&p->mu, NULL);
    cm_cond_init_monotonic(&p->cv);
    for (int i = 0; i < size; i++) {
        p->conns[i] = cm_redis_new(addr, timeout_ms, err);
        if (!p->conns[i]) {
            cm_redis_pool_free(p);
            return NULL;
        }
    }
    return p;
}

void cm_redis_pool_free(cm_redis_pool_t *p) {
    if (!p) return;
    for (int i = 0; i < p->size; i++) cm_redis_free(p->conns[i]);
    cm_free(p->conns);
    pthread_mutex_destroy(&p->mu);
    pthread_cond_destroy(&p->cv);
    cm_free(p);
}

cm_redis_t *cm_redis_pool_acquire(cm_redis_pool_t *p, int timeout_ms) {
    struct timespec until;
    cm_abstime_in(&until, timeout_ms);
    pthread_mutex_lock(&p->mu);
    for (int timed_out = 0;; ) {
        /* Scan once more after a timeout: a release may have landed at the deadline. */
        for (int i = 0; i < p->size; i++)
            if (!p->conns[i]->in_use) {
                p->conns[i]->in_use = 1;
                pthread_mutex_unlock(&p->mu);
                return p->conns[i];
            }
        if (timed_out) break;
        timed_out = pthread_cond_timedwait(&p->cv, &p->mu, &until) == ETIMEDOUT;
    }
    pthread_mutex_unlock(&p->mu);
    return NULL;
}

void cm_redis_pool_release(cm_redis_pool_t *p, cm_redis_t *r) {
    if (!r) return;
    /* Unread pipelined replies would be read by the next user as its own: drop the connection. */
    if (r->pending) cm__redis_drop(r);
    pthread_mutex_lock(&p->mu);
    r->in_use = 0;
    pthread_cond_signal(&p->cv);
    pthread_mutex_unlock(&p->mu);
}

void cm_redis_script_init(cm_redis_script_t *s, const char *text) {
    unsigned char md[SHA_DIGEST_LENGTH];
    SHA1((const unsigned char *)text, strlen(text), md);
    cm_hex(s->sha, md, sizeof md);
    s->text = text;
}

redisReply *cm_redis_eval(cm_redis_t *r, const cm_redis_script_t *s, int nargs, const char *const *args,
                          const size_t *lens) {
    const char *small_v[24];
    size_t small_l[24];
    int argc = 3 + nargs;
    const char **argv = argc <= 24 ? small_v : cm_malloc(sizeof *argv * (size_t)argc);
    size_t *argl = argc <= 24 ? small_l : cm_malloc(sizeof *argl * (size_t)argc);
    argv[0] = "EVALSHA";
    argl[0] = 7;
    argv[1] = s->sha;
    argl[1] = 40;
    argv[2] = "0";
    argl[2] = 1;
    for (int i = 0; i < nargs; i++) {
        argv[3 + i] = args[i];
        argl[3 + i] = lens ? lens[i] : strlen(args[i]);
    }
    redisReply *rep = cm_redis_cmd(r, argc, argv, argl);
    if (rep && rep->type == REDIS_REPLY_ERROR && strncmp(rep->str, "NOSCRIPT", 8) == 0) {
        freeReplyObject(rep);
        argv[0] = "EVAL";
        argl[0] = 4;
        argv[1] = s->text;
        argl[1] = strlen(s->text);
        rep = cm_redis_cmd(r, argc, argv, argl);
    }
    if (argv != small_v) {
        cm_free(argv);
        cm_free(argl);
    }
    return rep;
}

/* cm_redis_pool_cmd and cm_redis_pool_eval: script NULL means a plain command. */
static redisReply *cm__redis_pool_run(cm_redis_pool_t *p, int timeout_ms, const cm_redis_script_t *script, int argc,
                                      const char **argv, const size_t *lens, char *err, size_t err_cap) {
    cm_redis_t *r = cm_redis_pool_acquire(p, timeout_ms);
    if (!r) {
        snprintf(err, err_cap, "no redis connection free within %d ms", timeout_ms);
        return NULL;
    }
    redisReply *rep = script ? cm_redis_eval(r, script, argc, argv, lens) : cm_redis_cmd(r, argc, argv, lens);
    if (!rep) snprintf(err, err_cap, "%s", cm_redis_error(r));
    cm_redis_pool_release(p, r);
    if (rep && rep->type == REDIS_REPLY_ERROR) {
        snprintf(err, err_cap, "%s", rep->str);
        freeReplyObject(rep);
        rep = NULL;
    }
    return rep;
}

redisReply *cm_redis_pool_cmd(cm_redis_pool_t *p, int timeout_ms, int argc, const char **argv, const size_t *lens,
                              char *err, size_t err_cap) {
    return cm__redis_pool_run(p, timeout_ms, NULL, argc, argv, lens, err, err_cap);
}

redisReply *cm_redis_pool_eval(cm_redis_pool_t *p, int timeout_ms, const cm_redis_script_t *s, int nargs,
                               const char *const *args, const size_t *lens, char *err, size_t err_cap) {
    return cm__redis_pool_run(p, timeout_ms, s, nargs, (const char **)args, lens, err, err_cap);
}
