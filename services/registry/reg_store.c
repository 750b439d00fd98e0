/* Redis-backed registry state: one Lua script per operation (see reg_store.h for the keys). */
#include "reg_store.h"

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cm_alloc.h"
#include "cm_buf.h"
#include "cm_err.h"

/* Shared by every script: `now` from Redis's clock, and removal of one instance. */
#define REG__LUA_PRELUDE                                                                      \
    "local P = ARGV[1]\n"                                                                     \
    "local t = redis.call('TIME')\n"                                                          \
    "local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)\n"                 \
    "local function emit(kind, member)\n"                                                     \
    "  if kind == 'removed' then\n"                                                           \
    "    redis.call('XADD', P .. 'ev', 'MAXLEN', '~', 100000, '*', 't', kind, 'm', member)\n"     \
    "    return\n"                                                                            \
    "  end\n"                                                                                 \
    "  local h = redis.call('HMGET', P .. 'i:' .. member, 'pb', 'lease', 'reg', 'status', 'last_check', 'last_error')\n" \
    "  local e = redis.call('ZSCORE', P .. 'exp', member)\n"                                  \
    "  redis.call('XADD', P .. 'ev', 'MAXLEN', '~', 100000, '*', 't', kind, 'm', member, 'pb', h[1], 'lease', h[2],\n" \
    "    'exp', e or '0', 'reg', h[3], 'st', h[4], 'lc', h[5] or '0', 'le', h[6] or '')\n"     \
    "end\n"                                                                                   \
    "local function remove(member)\n"                                                         \
    "  local ik = P .. 'i:' .. member\n"                                                      \
    "  local lease = redis.call('HGET', ik, 'lease')\n"                                       \
    "  redis.call('ZREM', P .. 'exp', member)\n"                                              \
    "  redis.call('ZREM', P .. 'chk', member)\n"                                              \
    "  if not lease then return 0 end\n"                                                      \
    "  local svc, id = string.match(member, '^([^/]+)/(.+)$')\n"                             \
    "  redis.call('DEL', ik, P .. 'l:' .. lease)\n"                                           \
    "  redis.call('SREM', P .. 's:' .. svc, id)\n"                                            \
    "  if redis.call('SCARD', P .. 's:' .. svc) == 0 then redis.call('SREM', P .. 'services', svc) end\n" \
    "  emit('removed', member)\n"                                                             \
    "  return 1\n"                                                                            \
    "end\n"                                                                                   \
    "local function live(member)\n"                                                           \
    "  local e = redis.call('ZSCORE', P .. 'exp', member)\n"                                  \
    "  return e and tonumber(e) > now, e\n"                                                   \
    "end\n"

/* ARGV: P, service, id, pb, ttl_ms, fresh lease, check interval ms (0: no check). A
 * re-registration keeps its lease, health status and streaks unless that lease already lapsed (not
 * yet swept), in which case the instance starts over. With a check, a new instance starts CRITICAL
 * and its first check is due at once. */
static const char reg__lua_register[] = REG__LUA_PRELUDE
    "local svc, id, pb, ttl, fresh, civ = ARGV[2], ARGV[3], ARGV[4], tonumber(ARGV[5]), ARGV[6], tonumber(ARGV[7])\n"
    "local member = svc .. '/' .. id\n"
    "local ik = P .. 'i:' .. member\n"
    "local ok = live(member)\n"
    "local lease, reg = redis.call('HGET', ik, 'lease'), redis.call('HGET', ik, 'reg')\n"
    "local old_pb, old_ttl = redis.call('HGET', ik, 'pb'), redis.call('HGET', ik, 'ttl')\n"
    "local fresh_start = not ok or not lease\n"
    "local changed = fresh_start or old_pb ~= pb or tonumber(old_ttl) ~= ttl\n"
    "if fresh_start then remove(member); lease = fresh; reg = now end\n"
    "redis.call('HSET', ik, 'pb', pb, 'lease', lease, 'reg', reg, 'ttl', ttl)\n"
    "if civ > 0 then\n"
    "  redis.call('HSET', ik, 'chk_int', civ)\n"
    "  if fresh_start or not redis.call('HGET', ik, 'chk_ok') then\n"
    "    redis.call('HSET', ik, 'status', 2, 'chk_ok', 0, 'chk_fail', 0)\n"
    "    redis.call('ZADD', P .. 'chk', now, member)\n"
    "  elseif not redis.call('ZSCORE', P .. 'chk', member) then\n"
    "    redis.call('ZADD', P .. 'chk', now, member)\n"
    "  end\n"
    "else\n"
    "  redis.call('HSET', ik, 'status', 1)\n"
    "  redis.call('HDEL', ik, 'chk_int', 'chk_ok', 'chk_fail', 'last_check', 'last_error')\n"
    "  redis.call('ZREM', P .. 'chk', member)\n"
    "end\n"
    "redis.call('SADD', P .. 's:' .. svc, id)\n"
    "redis.call('SADD', P .. 'services', svc)\n"
    "redis.call('SET', P .. 'l:' .. lease, member)\n"
    "redis.call('ZADD', P .. 'exp', now + ttl, member)\n"
    "redis.call('HSET', ik, 'exp', now + ttl)\n"
    "if fresh_start then emit('added', member) elseif changed then emit('updated', member) end\n"
    "return {lease, tostring(now + ttl)}\n";

/* ARGV: P, lease. A lapsed lease is gone: the instance has to register again. */
static const char reg__lua_heartbeat[] = REG__LUA_PRELUDE
    "local member = redis.call('GET', P .. 'l:' .. ARGV[2])\n"
    "if not member then return false end\n"
    "if not live(member) then remove(member); return false end\n"
    "local ttl = tonumber(redis.call('HGET', P .. 'i:' .. member, 'ttl'))\n"
    "redis.call('ZADD', P .. 'exp', now + ttl, member)\n"
    "redis.call('HSET', P .. 'i:' .. member, 'exp', now + ttl)\n"
    "return {tostring(ttl), tostring(now + ttl)}\n";

/* ARGV: P, lease, service, id. */
static const char reg__lua_deregister[] = REG__LUA_PRELUDE
    "local member\n"
    "if ARGV[2] ~= '' then member = redis.call('GET', P .. 'l:' .. ARGV[2]) else member = ARGV[3] .. '/' .. ARGV[4] end\n"
    "if not member then return 0 end\n"
    "local was_live = live(member)\n"
    "local removed = remove(member)\n"
    "if was_live then return removed end\n"
    "return 0\n";

/* ARGV: P, max. Claims up to max checks that are due: each is pushed one interval ahead before it
 * is handed out, so across replicas a check runs once per interval. Returns member, pb pairs. */
static const char reg__lua_claim[] = REG__LUA_PRELUDE
    "local out = {}\n"
    "for _, m in ipairs(redis.call('ZRANGEBYSCORE', P .. 'chk', '-inf', now, 'LIMIT', 0, tonumber(ARGV[2]))) do\n"
    "  local ik = P .. 'i:' .. m\n"
    "  local h = redis.call('HMGET', ik, 'pb', 'chk_int')\n"
    "  if h[1] and h[2] and live(m) then\n"
    "    redis.call('ZADD', P .. 'chk', now + tonumber(h[2]), m)\n"
    "    table.insert(out, m); table.insert(out, h[1])\n"
    "  else\n"
    "    redis.call('ZREM', P .. 'chk', m)\n"
    "  end\n"
    "end\n"
    "return out\n";

/* ARGV: P, member, passed (1/0), failures_before_critical, successes_before_passing, error.
 * Returns {status, changed} or nil when the instance is gone. */
static const char reg__lua_report[] = REG__LUA_PRELUDE
    "local ik = P .. 'i:' .. ARGV[2]\n"
    /* A result that arrives after the lease lapsed must not revive the instance in events. */
    "if not live(ARGV[2]) then return false end\n"
    "local h = redis.call('HMGET', ik, 'status', 'chk_ok', 'chk_fail', 'chk_int')\n"
    "if not h[1] or not h[4] then return false end\n"
    "local status, okc, failc = tonumber(h[1]), tonumber(h[2] or 0), tonumber(h[3] or 0)\n"
    "local passed = ARGV[3] == '1'\n"
    "if passed then okc = okc + 1; failc = 0 else failc = failc + 1; okc = 0 end\n"
    "local changed = 0\n"
    "if status ~= 1 and passed and okc >= tonumber(ARGV[5]) then status = 1; changed = 1 end\n"
    "if status == 1 and not passed and failc >= tonumber(ARGV[4]) then status = 2; changed = 1 end\n"
    "redis.call('HSET', ik, 'status', status, 'chk_ok', okc, 'chk_fail', failc, 'last_check', now, 'last_error', ARGV[6])\n"
    "if changed == 1 then emit('health', ARGV[2]) end\n"
    "return {status, changed}\n";

/* ARGV: P, service. Returns the event log position, then a flat list per live instance: pb, lease,
 * expiry, registered, status, last check, last error. Taken in one script, so a watcher that
 * follows the log from that position misses nothing and sees nothing twice. */
static const char reg__lua_discover[] = REG__LUA_PRELUDE
    "local last = redis.call('XREVRANGE', P .. 'ev', '+', '-', 'COUNT', 1)\n"
    "local out = {last[1] and last[1][1] or '0-0'}\n"
    "for _, id in ipairs(redis.call('SMEMBERS', P .. 's:' .. ARGV[2])) do\n"
    "  local h = redis.call('HMGET', P .. 'i:' .. ARGV[2] .. '/' .. id, 'pb', 'lease', 'reg', 'status', 'last_check', 'last_error', 'exp')\n"
    /* The hash keeps a copy of the expiry (written with the sorted set) so that one call per
     * instance answers both "what is it" and "is its lease alive". */
    "  if h[1] and h[7] and tonumber(h[7]) > now then\n"
    "    table.insert(out, h[1]); table.insert(out, h[2]); table.insert(out, h[7])\n"
    "    table.insert(out, h[3]); table.insert(out, h[4]); table.insert(out, h[5] or '0'); table.insert(out, h[6] or '')\n"
    "  end\n"
    "end\n"
    "return out\n";

/* ARGV: P. Returns name, live count, passing count per service. */
static const char reg__lua_list[] = REG__LUA_PRELUDE
    "local out = {}\n"
    "for _, svc in ipairs(redis.call('SMEMBERS', P .. 'services')) do\n"
    "  local n, passing = 0, 0\n"
    "  for _, id in ipairs(redis.call('SMEMBERS', P .. 's:' .. svc)) do\n"
    "    if live(svc .. '/' .. id) then\n"
    "      n = n + 1\n"
    "      if redis.call('HGET', P .. 'i:' .. svc .. '/' .. id, 'status') == '1' then passing = passing + 1 end\n"
    "    end\n"
    "  end\n"
    "  if n > 0 then table.insert(out, svc); table.insert(out, n); table.insert(out, passing) end\n"
    "end\n"
    "return out\n";

/* ARGV: P, max. */
static const char reg__lua_sweep[] = REG__LUA_PRELUDE
    "local n = 0\n"
    "for _, member in ipairs(redis.call('ZRANGEBYSCORE', P .. 'exp', '-inf', now, 'LIMIT', 0, tonumber(ARGV[2]))) do\n"
    "  n = n + remove(member)\n"
    "end\n"
    "return n\n";

/* One command on a pooled connection. Returns the reply (caller frees), or NULL with err set for
 * a connection problem or an error reply (whose text starts err, e.g. "NOSCRIPT ..."). */
static redisReply *reg__cmd(reg_store_t *s, int argc, const char **argv, const size_t *argl, char *err, size_t errcap) {
    return cm_redis_pool_cmd(s->pool, s->timeout_ms, argc, argv, argl, err, errcap);
}

static cm_redis_script_t reg__register, reg__heartbeat, reg__deregister, reg__claim, reg__report, reg__discover,
    reg__list, reg__sweep;
static pthread_once_t reg__scripts_once = PTHREAD_ONCE_INIT;

static void reg__scripts_init(void) {
    cm_redis_script_init(&reg__register, reg__lua_register);
    cm_redis_script_init(&reg__heartbeat, reg__lua_heartbeat);
    cm_redis_script_init(&reg__deregister, reg__lua_deregister);
    cm_redis_script_init(&reg__claim, reg__lua_claim);
    cm_redis_script_init(&reg__report, reg__lua_report);
    cm_redis_script_init(&reg__discover, reg__lua_discover);
    cm_redis_script_init(&reg__list, reg__lua_list);
    cm_redis_script_init(&reg__sweep, reg__lua_sweep);
}

/* Runs script with ARGV = prefix + args; returns the reply (caller frees) or NULL with err set. */
static redisReply *reg__eval(reg_store_t *s, const cm_redis_script_t *script, int nargs, const char **args,
                             const size_t *lens, char *err, size_t errcap) {
    const char *argv[12];
    size_t argl[12];
    argv[0] = s->prefix;
    argl[0] = strlen(s->prefix);
    for (int i = 0; i < nargs; i++) {
        argv[1 + i] = args[i];
        argl[1 + i] = lens ? lens[i] : strlen(args[i]);
    }
    return cm_redis_pool_eval(s->pool, s->timeout_ms, script, 1 + nargs, argv, argl, err, errcap);
}

int reg_store_open(reg_store_t *s, const char *addr, const char *prefix, int conns, int timeout_ms) {
    pthread_once(&reg__scripts_once, reg__scripts_init);
    memset(s, 0, sizeof *s);
    int err = 0;
    s->pool = cm_redis_pool_new(addr, conns, timeout_ms, &err);
    if (!s->pool) return err ? err : CM_EINVAL;
    snprintf(s->prefix, sizeof s->prefix, "%s", prefix);
    s->timeout_ms = timeout_ms;
    return 0;
}

void reg_store_close(reg_store_t *s) {
    cm_redis_pool_free(s->pool);
    s->pool = NULL;
}

int reg_store_ready(void *store, char *why, size_t len) {
    reg_store_t *s = store;
    cm_redis_t *r = cm_redis_pool_acquire(s->pool, s->timeout_ms);
    if (!r) {
        snprintf(why, len, "no redis connection free");
        return 0;
    }
    int ok = cm_redis_ping(r) == 0;
    if (!ok) snprintf(why, len, "%s", cm_redis_error(r));
    cm_redis_pool_release(s->pool, r);
    return ok;
}

int reg_store_register(reg_store_t *s, const Iot__Registry__V1__Instance *inst, int64_t ttl_ms, char *lease_out,
                       size_t lease_cap, int64_t *expires_ms, char *err, size_t errcap) {
    size_t n = protobuf_c_message_get_packed_size(&inst->base);
    uint8_t *pb = cm_malloc(n + 1);
    protobuf_c_message_pack(&inst->base, pb);
    char ttl[24], fresh[40], civ[24];
    snprintf(ttl, sizeof ttl, "%lld", (long long)ttl_ms);
    snprintf(civ, sizeof civ, "%d", inst->check ? inst->check->interval_ms : 0);
    cm_random_hex(fresh, 16); /* a lease is a bearer handle */
    const char *args[] = {inst->service, inst->instance_id, (const char *)pb, ttl, fresh, civ};
    size_t lens[] = {strlen(inst->service), strlen(inst->instance_id), n, strlen(ttl), strlen(fresh), strlen(civ)};
    redisReply *rep = reg__eval(s, &reg__register, 6, args, lens, err, errcap);
    cm_free(pb);
    if (!rep) return CM_EREDIS;
    int rc = 0;
    if (rep->type == REDIS_REPLY_ARRAY && rep->elements == 2) {
        snprintf(lease_out, lease_cap, "%s", rep->element[0]->str);
        *expires_ms = strtoll(rep->element[1]->str, NULL, 10);
    } else {
        snprintf(err, errcap, "unexpected reply to register");
        rc = CM_EREDIS;
    }
    freeReplyObject(rep);
    return rc;
}

int reg_store_heartbeat(reg_store_t *s, const char *lease, int64_t *ttl_ms, int64_t *expires_ms, char *err,
                        size_t errcap) {
    const char *args[] = {lease};
    redisReply *rep = reg__eval(s, &reg__heartbeat, 1, args, NULL, err, errcap);
    if (!rep) return CM_EREDIS;
    int rc = REG_NOT_FOUND;
    if (rep->type == REDIS_REPLY_ARRAY && rep->elements == 2) {
        *ttl_ms = strtoll(rep->element[0]->str, NULL, 10);
        *expires_ms = strtoll(rep->element[1]->str, NULL, 10);
        rc = 0;
    }
    freeReplyObject(rep);
    return rc;
}

int reg_store_deregister(reg_store_t *s, const char *lease, const char *service, const char *id, char *err,
                         size_t errcap) {
    const char *args[] = {lease, service, id};
    redisReply *rep = reg__eval(s, &reg__deregister, 3, args, NULL, err, errcap);
    if (!rep) return CM_EREDIS;
    int rc = rep->type == REDIS_REPLY_INTEGER && rep->integer == 1 ? 0 : REG_NOT_FOUND;
    freeReplyObject(rep);
    return rc;
}

int reg_store_discover(reg_store_t *s, const char *service, ProtobufCAllocator *alloc, reg_entry_t **out, size_t *n,
                       char *rev, size_t revcap, char *err, size_t errcap) {
    const char *args[] = {service};
    *out = NULL;
    *n = 0;
    redisReply *rep = reg__eval(s, &reg__discover, 1, args, NULL, err, errcap);
    if (!rep) return CM_EREDIS;
    if (rep->type != REDIS_REPLY_ARRAY || rep->elements < 1) {
        freeReplyObject(rep);
        snprintf(err, errcap, "unexpected reply to discover");
        return CM_EREDIS;
    }
    if (rev) snprintf(rev, revcap, "%s", rep->element[0]->str);
    size_t count = (rep->elements - 1) / 7;
    reg_entry_t *e = alloc->alloc(alloc->allocator_data, (count ? count : 1) * sizeof *e);
    size_t k = 0;
    for (size_t i = 0; i < count; i++) {
        redisReply **f = &rep->element[1 + i * 7];
        Iot__Registry__V1__Instance *inst =
            iot__registry__v1__instance__unpack(alloc, f[0]->len, (const uint8_t *)f[0]->str);
        if (!inst) continue; /* written by us; unreadable only if corrupted by hand */
        e[k].inst = inst;
        snprintf(e[k].lease, sizeof e[k].lease, "%s", f[1]->type == REDIS_REPLY_STRING ? f[1]->str : "");
        e[k].expires_ms = f[2]->type == REDIS_REPLY_STRING ? strtoll(f[2]->str, NULL, 10) : 0;
        e[k].registered_ms = f[3]->type == REDIS_REPLY_STRING ? strtoll(f[3]->str, NULL, 10) : 0;
        e[k].status = f[4]->type == REDIS_REPLY_STRING ? atoi(f[4]->str) : 0;
        e[k].last_check_ms = f[5]->type == REDIS_REPLY_STRING ? strtoll(f[5]->str, NULL, 10) : 0;
        snprintf(e[k].last_error, sizeof e[k].last_error, "%s", f[6]->type == REDIS_REPLY_STRING ? f[6]->str : "");
        k++;
    }
    freeReplyObject(rep);
    *out = e;
    *n = k;
    return 0;
}

int reg_store_list(reg_store_t *s, reg_service_count_t **out, size_t *n, char *err, size_t errcap) {
    *out = NULL;
    *n = 0;
    redisReply *rep = reg__eval(s, &reg__list, 0, NULL, NULL, err, errcap);
    if (!rep) return CM_EREDIS;
    size_t count = rep->type == REDIS_REPLY_ARRAY ? rep->elements / 3 : 0;
    reg_service_count_t *c = cm_calloc(count ? count : 1, sizeof *c);
    for (size_t i = 0; i < count; i++) {
        snprintf(c[i].name, sizeof c[i].name, "%s", rep->element[i * 3]->str);
        c[i].instances = (int)rep->element[i * 3 + 1]->integer;
        c[i].passing = (int)rep->element[i * 3 + 2]->integer;
    }
    freeReplyObject(rep);
    *out = c;
    *n = count;
    return 0;
}

int reg_store_sweep(reg_store_t *s, int max, char *err, size_t errcap) {
    char m[16];
    snprintf(m, sizeof m, "%d", max);
    const char *args[] = {m};
    redisReply *rep = reg__eval(s, &reg__sweep, 1, args, NULL, err, errcap);
    if (!rep) return CM_EREDIS;
    int n = rep->type == REDIS_REPLY_INTEGER ? (int)rep->integer : 0;
    freeReplyObject(rep);
    return n;
}

int reg_store_claim_checks(reg_store_t *s, int max, reg_claim_t **out, size_t *n, char *err, size_t errcap) {
    char m[16];
    snprintf(m, sizeof m, "%d", max);
    const char *args[] = {m};
    *out = NULL;
    *n = 0;
    redisReply *rep = reg__eval(s, &reg__claim, 1, args, NULL, err, errcap);
    if (!rep) return CM_EREDIS;
    size_t count = rep->type == REDIS_REPLY_ARRAY ? rep->elements / 2 : 0;
    reg_claim_t *c = cm_calloc(count ? count : 1, sizeof *c);
    size_t k = 0;
    for (size_t i = 0; i < count; i++) {
        redisReply *mem = rep->element[i * 2], *pb = rep->element[i * 2 + 1];
        c[k].inst = iot__registry__v1__instance__unpack(&cm_pb_allocator, pb->len, (const uint8_t *)pb->str);
        if (!c[k].inst) continue;
        snprintf(c[k].member, sizeof c[k].member, "%s", mem->str);
        k++;
    }
    freeReplyObject(rep);
    *out = c;
    *n = k;
    return 0;
}

void reg_claims_free(reg_claim_t *c, size_t n) {
    for (size_t i = 0; i < n; i++) iot__registry__v1__instance__free_unpacked(c[i].inst, &cm_pb_allocator);
    cm_free(c);
}

int reg_store_report(reg_store_t *s, const char *member, int passed, int fails_needed, int successes_needed,
                     const char *error, int *status, int *changed, char *err, size_t errcap) {
    char f[16], ok[16];
    snprintf(f, sizeof f, "%d", fails_needed);
    snprintf(ok, sizeof ok, "%d", successes_needed);
    const char *args[] = {member, passed ? "1" : "0", f, ok, error};
    redisReply *rep = reg__eval(s, &reg__report, 5, args, NULL, err, errcap);
    if (!rep) return CM_EREDIS;
    int rc = REG_NOT_FOUND;
    if (rep->type == REDIS_REPLY_ARRAY && rep->elements == 2) {
        *status = (int)rep->element[0]->integer;
        *changed = (int)rep->element[1]->integer;
        rc = 0;
    }
    freeReplyObject(rep);
    return rc;
}

/* Finds field `name` in a stream entry's field/value array. */
static redisReply *reg__field(redisReply *fv, const char *name) {
    for (size_t i = 0; i + 1 < fv->elements; i += 2)
        if (fv->element[i]->type == REDIS_REPLY_STRING && strcmp(fv->element[i]->str, name) == 0) return fv->element[i + 1];
    return NULL;
}

static int64_t reg__field_int(redisReply *fv, const char *name) {
    redisReply *v = reg__field(fv, name);
    return v && v->type == REDIS_REPLY_STRING ? strtoll(v->str, NULL, 10) : 0;
}

int reg_store_parse_event(redisReply *entry, ProtobufCAllocator *alloc, reg_event_t *ev) {
    memset(ev, 0, sizeof *ev);
    if (entry->type != REDIS_REPLY_ARRAY || entry->elements != 2) return CM_EINVAL;
    redisReply *fv = entry->element[1];
    snprintf(ev->rev, sizeof ev->rev, "%s", entry->element[0]->str);
    redisReply *t = reg__field(fv, "t"), *m = reg__field(fv, "m");
    if (!t || !m || t->type != REDIS_REPLY_STRING || m->type != REDIS_REPLY_STRING) return CM_EINVAL;
    snprintf(ev->kind, sizeof ev->kind, "%s", t->str);
    const char *slash = strchr(m->str, '/');
    if (!slash || (size_t)(slash - m->str) >= sizeof ev->service) return CM_EINVAL;
    memcpy(ev->service, m->str, (size_t)(slash - m->str));
    ev->service[slash - m->str] = '\0';
    snprintf(ev->instance_id, sizeof ev->instance_id, "%s", slash + 1);
    redisReply *pb = reg__field(fv, "pb");
    if (pb && pb->type == REDIS_REPLY_STRING) {
        ev->entry.inst = iot__registry__v1__instance__unpack(alloc, pb->len, (const uint8_t *)pb->str);
        redisReply *lease = reg__field(fv, "lease"), *le = reg__field(fv, "le");
        snprintf(ev->entry.lease, sizeof ev->entry.lease, "%s", lease && lease->type == REDIS_REPLY_STRING ? lease->str : "");
        snprintf(ev->entry.last_error, sizeof ev->entry.last_error, "%s", le && le->type == REDIS_REPLY_STRING ? le->str : "");
        ev->entry.expires_ms = reg__field_int(fv, "exp");
        ev->entry.registered_ms = reg__field_int(fv, "reg");
        ev->entry.status = (int)reg__field_int(fv, "st");
        ev->entry.last_check_ms = reg__field_int(fv, "lc");
    }
    return 0;
}

int reg_store_events_between(reg_store_t *s, const char *after, const char *upto, redisReply **out, char *err,
                             size_t errcap) {
    char start[48];
    snprintf(start, sizeof start, "(%s", after); /* exclusive start */
    char key[96];
    snprintf(key, sizeof key, "%sev", s->prefix);
    const char *argv[] = {"XRANGE", key, start, upto};
    *out = reg__cmd(s, 4, argv, NULL, err, errcap);
    return *out ? 0 : CM_EREDIS;
}
