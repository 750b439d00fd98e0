/* The consumer: shard leases, stream reading, evaluation, flushes and checkpoints (see
 * proc_engine.h for the contract and the recovery argument). */
#include "proc_engine.h"

#include <inttypes.h>
#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#ifdef __GLIBC__
#include <malloc.h> /* malloc_trim */
#endif

#include "cm_alloc.h"
#include "cm_buf.h"
#include "cm_err.h"
#include "cm_log.h"
#include "cm_loop.h"
#include "cm_map.h"
#include "cm_metrics.h"
#include "cm_pg.h"
#include "cm_redis.h"
#include "cm_time.h"
#include "iot/ingest/v1/ingest.pb-c.h"

#define PROC__NONE INT64_MIN
#define PROC__SEV_HIGH IOT__PROCESSING__V1__SEVERITY__SEVERITY_HIGH
#define PROC__CKPT_VERSION 1
#define PROC__CHUNK 500            /* rows per array statement, ids per XACK */
#define PROC__CKPT_CHUNK_BYTES (1u << 20) /* encoded states per checkpoint statement: bounds its transient memory */
#define PROC__TICK_MS 1000         /* absence detectors */
#define PROC__WINSTATS_TTL "3600000"
#define PROC__CMD_ATTEMPTS 20
#define PROC__CMD_TIMEOUT_MS 5000

/* ---- states ------------------------------------------------------------------------------ */

/* One (device, rule) state; the detector's state (proc_stuck_t, proc_rate_t or proc_absence_t)
 * follows the struct in the same allocation, so a z-score state is this header plus its window. */
typedef struct proc__rs_s {
    const proc_rule_t *rule;   /* valid for the shard's current rule set generation */
    proc_rule_stats_t *stats;  /* a reference; bills windows and memory */
    proc_window_t *win;
    int64_t revision;
    int64_t since;             /* threshold: event time the condition began */
    int64_t episode;           /* the firing episode's key */
    int64_t last_t;            /* newest event time evaluated */
    uint32_t mem;
    uint8_t cond, firing, severity, dirty;
} proc__rs_t;
#define PROC__DET(rs) ((void *)((rs) + 1))

typedef struct proc__roll_s {
    int64_t bucket, count, last_ms;
    double min, max, sum, last;
} proc__roll_t;

typedef struct proc__metric_s {
    char *name;
    proc__rs_t **st;
    uint32_t n;
    uint8_t roll_dirty;
    proc__roll_t roll[2]; /* 1 minute, 1 hour: the current buckets not yet handed to a flush */
} proc__metric_t;

typedef struct proc__dev_s {
    char *id;
    uint64_t seq;         /* processed through (the states include it) */
    uint64_t effects_seq; /* effects committed through, as loaded: replays skip rollups up to it */
    uint64_t flushed_seq; /* progress mark written */
    proc__metric_t *m;
    uint32_t nm;
    uint8_t touched, ckpt_dirty;
} proc__dev_t;

static const int64_t proc__res_ms[2] = {60000, 3600000};

typedef enum { PROC__FIRE = 1, PROC__ESCALATE, PROC__RESOLVE } proc__opk_t;

typedef struct proc__op_s {
    int kind;
    const proc_rule_t *rule; /* NULL when the rule is gone (no actions then) */
    char rule_id[PROC_ID_MAX + 1];
    char device[PROC_ID_MAX + 1];
    char metric[PROC_METRIC_MAX + 1];
    int64_t episode, t_ms;
    int severity;
    double value;
    char msg[256];
} proc__op_t;

typedef struct proc__rollref_s {
    proc__dev_t *d;
    uint32_t mi;
} proc__rollref_t;

typedef struct proc__agg_s {
    const char *device, *metric; /* point into a device (alive until the flush ends) */
    int k;
    proc__roll_t r;
} proc__agg_t;

typedef struct proc__shard_s proc__shard_t;

struct proc_engine_s {
    const proc_config_t *cfg;
    proc_rules_t *rules;
    proc_actions_t *actions;
    void (*alerts_changed)(void *arg); /* after a commit with alert operations */
    void *alerts_changed_arg;
    cm_redis_t *redis; /* lease thread */
    cm_loop_t *lease_loop;
    proc__shard_t *shards;
    int n;
    pthread_mutex_t mu;
    int stopping;
    int redis_ok;
    char members_key[160], stats_key[320];
    cm_redis_script_t acquire, release;
    cm_counter_t *c_points, *c_dups, *c_late, *c_skipped, *c_entries, *c_flushes, *c_flush_fail, *c_ckpts, *c_ops,
        *c_resets, *c_claimed;
    cm_gauge_t *g_owned, *g_devices;
};

struct proc__shard_s {
    proc_engine_t *e;
    int idx;
    char key[160], lease_key[200], idx_s[16];
    pthread_t th;
    int started;
    pthread_cond_t cv;
    /* under e->mu */
    int want;
    int64_t until_ns; /* the lease is ours until then (monotonic) */
    /* shard thread only */
    int active;
    cm_redis_t *redis;
    cm_pg_t *pg;
    uint64_t gen;
    char read_id[48]; /* "0"-based paging of our pending entries first, then ">" */
    cm_map_t *devs;   /* id -> proc__dev_t * */
    proc__dev_t **touched;
    size_t n_touched, cap_touched;
    proc__dev_t **dirty;
    size_t n_dirty, cap_dirty;
    proc__rollref_t *rolls;
    size_t n_rolls, cap_rolls;
    cm_map_t *aggs;   /* "device\0metric\0k\0bucket" -> proc__agg_t * */
    proc__op_t *ops;
    size_t n_ops, cap_ops;
    char (*acks)[48];
    size_t n_acks, cap_acks;
    int64_t next_flush, next_ckpt, next_tick, next_stats; /* monotonic ms */
    int caught_up;
};

static int64_t proc__mono_ms(void) { return cm_mono_ns() / 1000000; }

#define PROC__PUSH(arr, n, cap, val)                                   \
    do {                                                               \
        if ((n) == (cap)) {                                            \
            (cap) = (cap) ? (cap) * 2 : 64;                            \
            (arr) = cm_realloc((arr), (cap) * sizeof *(arr));          \
        }                                                              \
        (arr)[(n)++] = (val);                                          \
    } while (0)

static size_t proc__det_size(int cond) {
    switch (cond) {
    case PROC_COND_STUCK: return sizeof(proc_stuck_t);
    case PROC_COND_RATE: return sizeof(proc_rate_t);
    case PROC_COND_ABSENCE: return sizeof(proc_absence_t);
    default: return 0;
    }
}

static proc__rs_t *proc__rs_new(const proc_rule_t *r, int64_t start_ms) {
    size_t size = sizeof(proc__rs_t) + proc__det_size(r->cond);
    proc__rs_t *rs = cm_calloc(1, size);
    rs->rule = r;
    rs->stats = r->stats;
    proc_rule_stats_ref(rs->stats);
    rs->revision = r->revision;
    rs->cond = (uint8_t)r->cond;
    rs->since = rs->episode = rs->last_t = PROC__NONE;
    if (r->has_window) rs->win = proc_window_new(&r->win, NULL); /* the cfg was checked at load */
    switch (r->cond) {
    case PROC_COND_STUCK: proc_stuck_init(PROC__DET(rs)); break;
    case PROC_COND_RATE: proc_rate_init(PROC__DET(rs)); break;
    case PROC_COND_ABSENCE: proc_absence_init(PROC__DET(rs), start_ms); break;
    default: break;
    }
    rs->mem = (uint32_t)(size + (rs->win ? proc_window_memory(rs->win) : 0));
    atomic_fetch_add(&rs->stats->windows, 1);
    atomic_fetch_add(&rs->stats->memory_bytes, rs->mem);
    return rs;
}

static void proc__rs_free(proc__rs_t *rs) {
    atomic_fetch_sub(&rs->stats->windows, 1);
    atomic_fetch_sub(&rs->stats->memory_bytes, rs->mem);
    proc_window_free(rs->win);
    proc_rule_stats_unref(rs->stats);
    cm_free(rs);
}

/* Drops every state of d (it keeps its id and marks). */
static void proc__dev_clear(proc__dev_t *d) {
    for (uint32_t i = 0; i < d->nm; i++) {
        for (uint32_t j = 0; j < d->m[i].n; j++) proc__rs_free(d->m[i].st[j]);
        cm_free(d->m[i].st);
        cm_free(d->m[i].name);
    }
    cm_free(d->m);
    d->m = NULL;
    d->nm = 0;
}

static void proc__dev_free(void *v) {
    proc__dev_t *d = v;
    proc__dev_clear(d);
    cm_free(d->id);
    cm_free(d);
}

/* ---- alert operations -------------------------------------------------------------------- */

static void proc__op(proc__shard_t *s, int kind, const proc_rule_t *r, const char *rule_id, const proc__dev_t *d,
                     const char *metric, int64_t episode, int64_t t_ms, int severity, double value, const char *msg) {
    proc__op_t op;
    memset(&op, 0, sizeof op);
    op.kind = kind;
    op.rule = r;
    snprintf(op.rule_id, sizeof op.rule_id, "%s", rule_id);
    snprintf(op.device, sizeof op.device, "%s", d->id);
    snprintf(op.metric, sizeof op.metric, "%s", metric);
    op.episode = episode;
    op.t_ms = t_ms;
    op.severity = severity;
    op.value = value;
    snprintf(op.msg, sizeof op.msg, "%s", msg ? msg : "");
    PROC__PUSH(s->ops, s->n_ops, s->cap_ops, op);
}

static void proc__fire(proc__shard_t *s, proc__dev_t *d, const char *metric, proc__rs_t *rs, int64_t episode,
                       int64_t t, int sev, double value, const char *msg) {
    rs->firing = 1;
    rs->episode = episode;
    rs->severity = (uint8_t)sev;
    proc__op(s, PROC__FIRE, rs->rule, rs->stats->id, d, metric, episode, t, sev, value, msg);
}

static void proc__resolve(proc__shard_t *s, proc__dev_t *d, const char *metric, proc__rs_t *rs, const proc_rule_t *r,
                          int64_t t) {
    proc__op(s, PROC__RESOLVE, r, rs->stats->id, d, metric, rs->episode, t, rs->severity, 0, NULL);
    rs->firing = 0;
    rs->episode = PROC__NONE;
}

/* ---- evaluation -------------------------------------------------------------------------- */

static double proc__statistic(const proc_stats_t *st, int statistic) {
    switch (statistic) {
    case IOT__PROCESSING__V1__STATISTIC__STATISTIC_MEAN: return st->mean;
    case IOT__PROCESSING__V1__STATISTIC__STATISTIC_MIN: return st->min;
    case IOT__PROCESSING__V1__STATISTIC__STATISTIC_MAX: return st->max;
    case IOT__PROCESSING__V1__STATISTIC__STATISTIC_STDDEV: return st->stddev;
    case IOT__PROCESSING__V1__STATISTIC__STATISTIC_COUNT: return (double)st->count;
    case IOT__PROCESSING__V1__STATISTIC__STATISTIC_P95: return st->p95;
    default: return st->last;
    }
}

static const char *proc__op_text(int op) {
    static const char *t[] = {"?", ">", ">=", "<", "<=", "==", "!="};
    return op >= 1 && op <= 6 ? t[op] : "?";
}

static const char *proc__stat_text(int statistic) {
    static const char *t[] = {"value", "mean", "min", "max", "stddev", "count", "p95"};
    return statistic >= 0 && statistic <= 6 ? t[statistic] : "value";
}

static void proc__eval(proc__shard_t *s, proc__dev_t *d, const char *metric, proc__rs_t *rs, int64_t t, double v) {
    const proc_rule_t *r = rs->rule;
    int64_t t0 = cm_mono_ns();
    int match = 0, evaluated = 1;
    char msg[256];
    switch (r->cond) {
    case PROC_COND_THRESHOLD: {
        double x = v;
        if (r->has_window) {
            int rc = proc_window_add(rs->win, t, v);
            if (rc == PROC_ELATE) {
                cm_counter_add(s->e->c_late, 1);
                evaluated = 0;
                break;
            }
            rs->dirty = 1;
            proc_stats_t st;
            if (proc_window_stats(rs->win, t, &st) != 0) {
                evaluated = 0;
                break;
            }
            x = proc__statistic(&st, r->statistic);
        }
        if (rs->last_t != PROC__NONE && t < rs->last_t) {
            evaluated = 0; /* out of event-time order: it fed the window only */
            break;
        }
        rs->last_t = t;
        match = proc_compare(r->op, x, r->threshold);
        if (match) {
            if (rs->since == PROC__NONE) rs->since = t;
            if (!rs->firing && t - rs->since >= r->for_ms) {
                snprintf(msg, sizeof msg, "%s %s = %.6g %s %.6g for %.3g s", r->metric, proc__stat_text(r->statistic), x,
                         proc__op_text(r->op), r->threshold, (double)(t - rs->since) / 1000.0);
                proc__fire(s, d, metric, rs, rs->since, t, r->severity, x, msg);
            }
        } else {
            rs->since = PROC__NONE;
            if (rs->firing) proc__resolve(s, d, metric, rs, r, t);
        }
        break;
    }
    case PROC_COND_ZSCORE: {
        double score = 0;
        int rc = proc_zscore_update(rs->win, t, v, &score);
        if (rc == PROC_ELATE) cm_counter_add(s->e->c_late, 1);
        if (rc != PROC_ELATE) rs->dirty = 1;
        if (rc != 0 || (rs->last_t != PROC__NONE && t < rs->last_t)) {
            evaluated = rc != PROC_ELATE;
            break;
        }
        rs->last_t = t;
        match = score > r->level;
        int sev = r->severity;
        if (score > PROC_ZSCORE_HIGH && sev < PROC__SEV_HIGH) sev = PROC__SEV_HIGH;
        if (match) snprintf(msg, sizeof msg, "%s = %.6g has z-score %.3f (over %.3g)", r->metric, v, score, r->level);
        if (match && !rs->firing) {
            proc__fire(s, d, metric, rs, t, t, sev, score, msg);
        } else if (match && sev > rs->severity) {
            rs->severity = (uint8_t)sev;
            proc__op(s, PROC__ESCALATE, r, rs->stats->id, d, metric, rs->episode, t, sev, score, msg);
        } else if (!match && rs->firing) {
            proc__resolve(s, d, metric, rs, r, t);
        }
        break;
    }
    case PROC_COND_STUCK: {
        proc_stuck_t *st = PROC__DET(rs);
        match = proc_stuck_update(st, &r->stuck, t, v);
        if (match && !rs->firing) {
            snprintf(msg, sizeof msg, "%s stuck at %.6g for %.3g s", r->metric, st->ref, (double)(st->last_ms - st->since_ms) / 1000.0);
            proc__fire(s, d, metric, rs, st->since_ms, t, r->severity, v, msg);
        } else if (!match && rs->firing) {
            proc__resolve(s, d, metric, rs, r, t);
        }
        break;
    }
    case PROC_COND_RATE: {
        double rate = 0;
        match = proc_rate_update(PROC__DET(rs), &r->rate, t, v, &rate);
        if (match && !rs->firing) {
            snprintf(msg, sizeof msg, "%s changes at %.6g per second (limit %.6g)", r->metric, rate, r->rate.limit_per_s);
            proc__fire(s, d, metric, rs, t, t, r->severity, rate, msg);
        } else if (!match && rs->firing) {
            proc__resolve(s, d, metric, rs, r, t);
        }
        break;
    }
    case PROC_COND_ABSENCE:
        proc_absence_update(PROC__DET(rs), t);
        if (rs->firing) proc__resolve(s, d, metric, rs, r, t);
        break;
    }
    if (evaluated) {
        atomic_fetch_add_explicit(&rs->stats->evaluations, 1, memory_order_relaxed);
        if (match) atomic_fetch_add_explicit(&rs->stats->matches, 1, memory_order_relaxed);
    }
    atomic_fetch_add_explicit(&rs->stats->cpu_ns, (uint64_t)(cm_mono_ns() - t0), memory_order_relaxed);
}

/* ---- reconciling states with the rule set ------------------------------------------------- */

/* Makes m's states exactly those of the rules that select d: keeps states whose rule and revision
 * are unchanged, creates missing ones, drops the rest (resolving an episode they had firing). */
static void proc__reconcile(proc__shard_t *s, const proc_ruleset_t *rs, proc__dev_t *d, proc__metric_t *m, int64_t now_ms) {
    const proc_rule_list_t *l = proc_ruleset_metric(rs, m->name);
    proc__rs_t **nst = l->n ? cm_calloc(l->n, sizeof *nst) : NULL;
    uint32_t nn = 0;
    for (size_t i = 0; i < l->n; i++) {
        const proc_rule_t *r = l->v[i];
        if (!proc_rule_selects(r, d->id)) continue;
        proc__rs_t *keep = NULL;
        for (uint32_t j = 0; j < m->n; j++) {
            if (m->st[j] && m->st[j]->stats == r->stats && m->st[j]->revision == r->revision) {
                keep = m->st[j];
                m->st[j] = NULL;
                break;
            }
        }
        if (!keep) keep = proc__rs_new(r, now_ms);
        keep->rule = r;
        nst[nn++] = keep;
    }
    for (uint32_t j = 0; j < m->n; j++) {
        proc__rs_t *old = m->st[j];
        if (!old) continue;
        if (old->firing) {
            old->rule = NULL;
            proc__op(s, PROC__RESOLVE, NULL, old->stats->id, d, m->name, old->episode, cm_wall_ms(), old->severity, 0,
                     NULL);
        }
        proc__rs_free(old);
    }
    cm_free(m->st);
    m->st = nst;
    m->n = nn;
}

static proc__metric_t *proc__metric(proc__shard_t *s, const proc_ruleset_t *rs, proc__dev_t *d, const char *name,
                                    int64_t t_ms, uint32_t *idx) {
    for (uint32_t i = 0; i < d->nm; i++) {
        if (strcmp(d->m[i].name, name) == 0) {
            *idx = i;
            return &d->m[i];
        }
    }
    d->m = cm_realloc(d->m, (d->nm + 1) * sizeof *d->m);
    proc__metric_t *m = &d->m[d->nm];
    memset(m, 0, sizeof *m);
    m->name = cm_strdup(name);
    *idx = d->nm++;
    proc__reconcile(s, rs, d, m, t_ms);
    return m;
}

static proc__dev_t *proc__dev(proc__shard_t *s, const char *id) {
    int created = 0;
    void **slot = cm_map_slot(s->devs, id, strlen(id), &created);
    if (created) {
        proc__dev_t *d = cm_calloc(1, sizeof *d);
        d->id = cm_strdup(id);
        *slot = d;
    }
    return *slot;
}

static void proc__reconcile_all(proc__shard_t *s, const proc_ruleset_t *rs) {
    size_t iter = 0;
    const void *k;
    size_t kl;
    void *v;
    int64_t now = cm_wall_ms();
    while (cm_map_next(s->devs, &iter, &k, &kl, &v)) {
        proc__dev_t *d = v;
        for (uint32_t i = 0; i < d->nm; i++) proc__reconcile(s, rs, d, &d->m[i], now);
        if (!d->ckpt_dirty) {
            d->ckpt_dirty = 1;
            PROC__PUSH(s->dirty, s->n_dirty, s->cap_dirty, d);
        }
    }
}

/* ---- rollups ----------------------------------------------------------------------------- */

static void proc__agg_emit(proc__shard_t *s, proc__dev_t *d, proc__metric_t *m, int k) {
    proc__roll_t *r = &m->roll[k];
    if (!r->count) return;
    char key[2 * PROC_ID_MAX + 64];
    int n = snprintf(key, sizeof key, "%s%c%s%c%d%c%" PRId64, d->id, 0, m->name, 0, k, 0, r->bucket);
    int created = 0;
    void **slot = cm_map_slot(s->aggs, key, (size_t)n, &created);
    proc__agg_t *a = *slot;
    if (!a) {
        a = cm_calloc(1, sizeof *a);
        a->device = d->id;
        a->metric = m->name;
        a->k = k;
        a->r = *r;
        *slot = a;
    } else {
        a->r.count += r->count;
        if (r->min < a->r.min) a->r.min = r->min;
        if (r->max > a->r.max) a->r.max = r->max;
        a->r.sum += r->sum;
        if (r->last_ms >= a->r.last_ms) {
            a->r.last = r->last;
            a->r.last_ms = r->last_ms;
        }
    }
    r->count = 0;
}

static void proc__roll_add(proc__shard_t *s, proc__dev_t *d, uint32_t mi, int64_t t, double v) {
    proc__metric_t *m = &d->m[mi];
    for (int k = 0; k < 2; k++) {
        int64_t b = t - (((t % proc__res_ms[k]) + proc__res_ms[k]) % proc__res_ms[k]);
        proc__roll_t *r = &m->roll[k];
        if (r->count && r->bucket != b) proc__agg_emit(s, d, m, k);
        if (!r->count) {
            r->bucket = b;
            r->min = r->max = v;
            r->sum = 0;
            r->last_ms = PROC__NONE;
        }
        r->count++;
        if (v < r->min) r->min = v;
        if (v > r->max) r->max = v;
        r->sum += v;
        if (t >= r->last_ms) {
            r->last = v;
            r->last_ms = t;
        }
    }
    if (!m->roll_dirty) {
        m->roll_dirty = 1;
        proc__rollref_t ref = {d, mi};
        PROC__PUSH(s->rolls, s->n_rolls, s->cap_rolls, ref);
    }
}

/* ---- points ------------------------------------------------------------------------------ */

static void proc__point(proc__shard_t *s, const proc_ruleset_t *rs, proc__dev_t *d, const Iot__Ingest__V1__Point *p) {
    if (p->seq <= d->seq) {
        cm_counter_add(s->e->c_dups, 1);
        return;
    }
    d->seq = p->seq;
    if (!d->touched) {
        d->touched = 1;
        PROC__PUSH(s->touched, s->n_touched, s->cap_touched, d);
    }
    if (!d->ckpt_dirty) {
        d->ckpt_dirty = 1;
        PROC__PUSH(s->dirty, s->n_dirty, s->cap_dirty, d);
    }
    double v;
    switch (p->value_case) {
    case IOT__INGEST__V1__POINT__VALUE_DOUBLE_VALUE: v = p->double_value; break;
    case IOT__INGEST__V1__POINT__VALUE_INT_VALUE: v = (double)p->int_value; break;
    case IOT__INGEST__V1__POINT__VALUE_BOOL_VALUE: v = p->bool_value ? 1.0 : 0.0; break;
    default: cm_counter_add(s->e->c_skipped, 1); return;
    }
    if (!isfinite(v) || !p->metric || !*p->metric) {
        cm_counter_add(s->e->c_skipped, 1);
        return;
    }
    cm_counter_add(s->e->c_points, 1);
    uint32_t mi;
    proc__metric_t *m = proc__metric(s, rs, d, p->metric, p->time_ms, &mi);
    if (p->seq > d->effects_seq) proc__roll_add(s, d, mi, p->time_ms, v);
    m = &d->m[mi];
    for (uint32_t i = 0; i < m->n; i++) proc__eval(s, d, m->name, m->st[i], p->time_ms, v);
}

/* ---- checkpoints: encoding --------------------------------------------------------------- */

static void proc__put_u8(cm_buf_t *b, uint8_t v) { cm_buf_append(b, (const char *)&v, 1); }
static void proc__put64(cm_buf_t *b, uint64_t v) {
    uint8_t x[8];
    proc__put_u64(x, v);
    cm_buf_append(b, (const char *)x, 8);
}
static void proc__put32(cm_buf_t *b, uint32_t v) {
    uint8_t x[4] = {(uint8_t)v, (uint8_t)(v >> 8), (uint8_t)(v >> 16), (uint8_t)(v >> 24)};
    cm_buf_append(b, (const char *)x, 4);
}
static void proc__put_blob(cm_buf_t *b, const uint8_t *p, size_t n) {
    proc__put32(b, (uint32_t)n);
    cm_buf_append(b, (const char *)p, n);
}

static size_t proc__det_encode(const proc__rs_t *rs, uint8_t *buf, size_t cap) {
    switch (rs->cond) {
    case PROC_COND_STUCK: return proc_stuck_encode(PROC__DET(rs), buf, cap);
    case PROC_COND_RATE: return proc_rate_encode(PROC__DET(rs), buf, cap);
    case PROC_COND_ABSENCE: return proc_absence_encode(PROC__DET(rs), buf, cap);
    default: return 0;
    }
}

static void proc__encode_dev(const proc__dev_t *d, cm_buf_t *b) {
    uint32_t n = 0;
    for (uint32_t i = 0; i < d->nm; i++) n += d->m[i].n;
    proc__put_u8(b, PROC__CKPT_VERSION);
    proc__put64(b, d->seq);
    proc__put32(b, n);
    uint8_t tmp[256];
    for (uint32_t i = 0; i < d->nm; i++) {
        const proc__metric_t *m = &d->m[i];
        for (uint32_t j = 0; j < m->n; j++) {
            const proc__rs_t *rs = m->st[j];
            size_t il = strlen(rs->stats->id), ml = strlen(m->name);
            proc__put_u8(b, (uint8_t)il);
            cm_buf_append(b, rs->stats->id, il);
            proc__put_u8(b, (uint8_t)ml);
            cm_buf_append(b, m->name, ml);
            proc__put64(b, (uint64_t)rs->revision);
            proc__put_u8(b, rs->cond);
            proc__put_u8(b, rs->firing);
            proc__put_u8(b, rs->severity);
            proc__put64(b, (uint64_t)rs->since);
            proc__put64(b, (uint64_t)rs->episode);
            proc__put64(b, (uint64_t)rs->last_t);
            if (rs->win) {
                size_t wl = proc_window_encode(rs->win, NULL, 0);
                uint8_t *w = cm_malloc(wl);
                proc_window_encode(rs->win, w, wl);
                proc__put_blob(b, w, wl);
                cm_free(w);
            } else {
                proc__put32(b, 0);
            }
            size_t dl = proc__det_encode(rs, tmp, sizeof tmp);
            proc__put_blob(b, tmp, dl <= sizeof tmp ? dl : 0);
        }
    }
}

typedef struct proc__rd_s {
    const uint8_t *p;
    size_t n, off;
    int bad;
} proc__rd_t;

static const uint8_t *proc__take(proc__rd_t *r, size_t n) {
    if (r->bad || r->n - r->off < n) {
        r->bad = 1;
        return NULL;
    }
    const uint8_t *p = r->p + r->off;
    r->off += n;
    return p;
}
static uint8_t proc__get8(proc__rd_t *r) {
    const uint8_t *p = proc__take(r, 1);
    return p ? p[0] : 0;
}
static uint64_t proc__get64(proc__rd_t *r) {
    const uint8_t *p = proc__take(r, 8);
    return p ? proc__get_u64(p) : 0;
}
static uint32_t proc__get32(proc__rd_t *r) {
    const uint8_t *p = proc__take(r, 4);
    return p ? (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24 : 0;
}

static const proc_rule_t *proc__find_rule(const proc_ruleset_t *rs, const char *metric, const char *id) {
    const proc_rule_list_t *l = proc_ruleset_metric(rs, metric);
    for (size_t i = 0; i < l->n; i++)
        if (strcmp(l->v[i]->id, id) == 0) return l->v[i];
    return NULL;
}

/* Restores a device's states from its checkpoint. States of rules that are gone, changed or no
 * longer select the device are dropped (a firing one is resolved). Returns -1 for a checkpoint
 * that does not parse (the device then starts empty from seq 0 and its pending entries rebuild it). */
static int proc__decode_dev(proc__shard_t *s, const proc_ruleset_t *rs, proc__dev_t *d, const uint8_t *p, size_t n) {
    proc__rd_t r = {p, n, 0, 0};
    if (proc__get8(&r) != PROC__CKPT_VERSION) return -1;
    uint64_t seq = proc__get64(&r);
    uint32_t cnt = proc__get32(&r);
    int64_t now = cm_wall_ms();
    for (uint32_t i = 0; i < cnt && !r.bad; i++) {
        char id[PROC_ID_MAX + 1], metric[PROC_METRIC_MAX + 1];
        uint8_t il = proc__get8(&r);
        const uint8_t *ip = proc__take(&r, il);
        uint8_t ml = proc__get8(&r);
        const uint8_t *mp = proc__take(&r, ml);
        int64_t rev = (int64_t)proc__get64(&r);
        uint8_t cond = proc__get8(&r), firing = proc__get8(&r), sev = proc__get8(&r);
        int64_t since = (int64_t)proc__get64(&r), episode = (int64_t)proc__get64(&r), last_t = (int64_t)proc__get64(&r);
        uint32_t wl = proc__get32(&r);
        const uint8_t *wp = proc__take(&r, wl);
        uint32_t dl = proc__get32(&r);
        const uint8_t *dp = proc__take(&r, dl);
        if (r.bad || il > PROC_ID_MAX || ml > PROC_METRIC_MAX || ml == 0) break;
        memcpy(id, ip, il);
        id[il] = 0;
        memcpy(metric, mp, ml);
        metric[ml] = 0;
        const proc_rule_t *rule = proc__find_rule(rs, metric, id);
        int ok = rule && rule->revision == rev && rule->cond == cond && proc_rule_selects(rule, d->id);
        proc__rs_t *st = NULL;
        if (ok) {
            st = proc__rs_new(rule, now);
            if (st->win) {
                int err = 0;
                proc_window_t *w = proc_window_decode(&rule->win, wp, wl, &err);
                if (w) {
                    proc_window_free(st->win);
                    st->win = w;
                } else {
                    ok = 0;
                }
            }
            int drc = 0;
            switch (cond) {
            case PROC_COND_STUCK: drc = proc_stuck_decode(PROC__DET(st), dp, dl); break;
            case PROC_COND_RATE: drc = proc_rate_decode(PROC__DET(st), dp, dl); break;
            case PROC_COND_ABSENCE: drc = proc_absence_decode(PROC__DET(st), dp, dl); break;
            default: break;
            }
            if (drc) ok = 0;
        }
        if (!ok) {
            if (st) proc__rs_free(st);
            if (firing) {
                proc__op(s, PROC__RESOLVE, NULL, id, d, metric, episode, now, sev, 0, NULL);
            }
            continue;
        }
        st->firing = firing;
        st->severity = sev;
        st->since = since;
        st->episode = episode;
        st->last_t = last_t;
        uint32_t mi = d->nm;
        for (uint32_t k = 0; k < d->nm; k++)
            if (strcmp(d->m[k].name, metric) == 0) mi = k;
        if (mi == d->nm) {
            d->m = cm_realloc(d->m, (d->nm + 1) * sizeof *d->m);
            memset(&d->m[d->nm], 0, sizeof d->m[d->nm]);
            d->m[d->nm].name = cm_strdup(metric);
            d->nm++;
        }
        proc__metric_t *m = &d->m[mi];
        m->st = cm_realloc(m->st, (m->n + 1) * sizeof *m->st);
        m->st[m->n++] = st;
    }
    if (r.bad) return -1;
    d->seq = seq;
    /* Rules created since the checkpoint that select the device join here. */
    for (uint32_t i = 0; i < d->nm; i++) proc__reconcile(s, rs, d, &d->m[i], now);
    return 0;
}

/* ---- SQL helpers ------------------------------------------------------------------------- */

/* Appends one element of a Postgres array literal, quoted. */
static void proc__arr_str(cm_buf_t *b, const char *v) {
    cm_buf_puts(b, b->len && b->data[b->len - 1] != '{' ? ",\"" : "\"");
    for (const char *p = v; *p; p++) {
        if (*p == '"' || *p == '\\') cm_buf_append(b, "\\", 1);
        cm_buf_append(b, p, 1);
    }
    cm_buf_puts(b, "\"");
}
static void proc__arr_raw(cm_buf_t *b, const char *fmt_val) {
    cm_buf_puts(b, b->len && b->data[b->len - 1] != '{' ? "," : "");
    cm_buf_puts(b, fmt_val);
}
static void proc__arr_i64(cm_buf_t *b, int64_t v) {
    char t[32];
    snprintf(t, sizeof t, "%" PRId64, v);
    proc__arr_raw(b, t);
}
static void proc__arr_f64(cm_buf_t *b, double v) {
    char t[40];
    snprintf(t, sizeof t, "%.17g", v);
    proc__arr_raw(b, t);
}
static void proc__arr_bytea(cm_buf_t *b, const uint8_t *p, size_t n) {
    cm_buf_puts(b, b->len && b->data[b->len - 1] != '{' ? ",\"\\\\x" : "\"\\\\x");
    char h[3];
    for (size_t i = 0; i < n; i++) {
        cm_hex(h, p + i, 1);
        cm_buf_append(b, h, 2);
    }
    cm_buf_puts(b, "\"");
}

static void proc__bufs_open(cm_buf_t *bufs, int n) {
    for (int i = 0; i < n; i++) {
        cm_buf_reset(&bufs[i]);
        cm_buf_puts(&bufs[i], "{");
    }
}
static void proc__bufs_close(cm_buf_t *bufs, int n, const char **params) {
    for (int i = 0; i < n; i++) {
        cm_buf_puts(&bufs[i], "}");
        params[i] = bufs[i].data;
    }
}

static const char proc__sql_rollups[] =
    "INSERT INTO rollups (device_id, metric, res_ms, bucket_ms, count, min, max, sum, last, last_ms) "
    "SELECT * FROM unnest($1::text[], $2::text[], $3::int[], $4::bigint[], $5::bigint[], $6::float8[], $7::float8[], "
    "$8::float8[], $9::float8[], $10::bigint[]) "
    "ON CONFLICT (device_id, metric, res_ms, bucket_ms) DO UPDATE SET count = rollups.count + excluded.count, "
    "min = LEAST(rollups.min, excluded.min), max = GREATEST(rollups.max, excluded.max), sum = rollups.sum + excluded.sum, "
    "last = CASE WHEN excluded.last_ms >= rollups.last_ms THEN excluded.last ELSE rollups.last END, "
    "last_ms = GREATEST(rollups.last_ms, excluded.last_ms)";

static const char proc__sql_progress[] =
    "INSERT INTO progress (device_id, shard, seq) SELECT u.d, $2::int, u.s FROM unnest($1::text[], $3::bigint[]) AS u(d, s) "
    "ON CONFLICT (device_id) DO UPDATE SET shard = excluded.shard, seq = GREATEST(progress.seq, excluded.seq)";

static const char proc__sql_ckpt[] =
    "INSERT INTO checkpoints (device_id, shard, seq, state, save_time) "
    "SELECT u.d, $2::int, u.s, u.b, now() FROM unnest($1::text[], $3::bigint[], $4::bytea[]) AS u(d, s, b) "
    "ON CONFLICT (device_id) DO UPDATE SET shard = excluded.shard, seq = excluded.seq, state = excluded.state, "
    "save_time = excluded.save_time";

static int proc__sql_rollups_run(proc__shard_t *s, cm_pg_conn_t *c) {
    cm_buf_t b[10];
    memset(b, 0, sizeof b);
    size_t iter = 0, rows = 0;
    const void *k;
    size_t kl;
    void *v;
    int rc = 0;
    proc__bufs_open(b, 10);
    for (;;) {
        int more = cm_map_next(s->aggs, &iter, &k, &kl, &v);
        if (more) {
            const proc__agg_t *a = v;
            proc__arr_str(&b[0], a->device);
            proc__arr_str(&b[1], a->metric);
            proc__arr_i64(&b[2], proc__res_ms[a->k]);
            proc__arr_i64(&b[3], a->r.bucket);
            proc__arr_i64(&b[4], a->r.count);
            proc__arr_f64(&b[5], a->r.min);
            proc__arr_f64(&b[6], a->r.max);
            proc__arr_f64(&b[7], a->r.sum);
            proc__arr_f64(&b[8], a->r.last);
            proc__arr_i64(&b[9], a->r.last_ms);
            rows++;
        }
        if (rows && (!more || rows == PROC__CHUNK)) {
            const char *params[10];
            proc__bufs_close(b, 10, params);
            rc = cm_pg_exec(c, NULL, proc__sql_rollups, 10, params);
            if (rc) break;
            rows = 0;
            proc__bufs_open(b, 10);
        }
        if (!more) break;
    }
    for (int i = 0; i < 10; i++) cm_buf_free(&b[i]);
    return rc;
}

static int proc__sql_progress_run(proc__shard_t *s, cm_pg_conn_t *c) {
    cm_buf_t b[2];
    memset(b, 0, sizeof b);
    int rc = 0;
    size_t rows = 0;
    proc__bufs_open(b, 2);
    for (size_t i = 0; i <= s->n_touched; i++) {
        if (i < s->n_touched && s->touched[i]->seq > s->touched[i]->flushed_seq) {
            proc__arr_str(&b[0], s->touched[i]->id);
            proc__arr_i64(&b[1], (int64_t)s->touched[i]->seq);
            rows++;
        }
        if (rows && (i == s->n_touched || rows == PROC__CHUNK)) {
            const char *params[3];
            cm_buf_puts(&b[0], "}");
            cm_buf_puts(&b[1], "}");
            params[0] = b[0].data;
            params[1] = s->idx_s;
            params[2] = b[1].data;
            rc = cm_pg_exec(c, NULL, proc__sql_progress, 3, params);
            if (rc) break;
            rows = 0;
            proc__bufs_open(b, 2);
        }
    }
    for (int i = 0; i < 2; i++) cm_buf_free(&b[i]);
    return rc;
}

static int proc__sql_ckpt_run(proc__shard_t *s, cm_pg_conn_t *c) {
    cm_buf_t b[3], enc = CM_BUF_INIT;
    memset(b, 0, sizeof b);
    int rc = 0;
    size_t rows = 0, bytes = 0, total = 0;
    proc__bufs_open(b, 3);
    for (size_t i = 0; i <= s->n_dirty; i++) {
        if (i < s->n_dirty) {
            cm_buf_reset(&enc);
            proc__encode_dev(s->dirty[i], &enc);
            proc__arr_str(&b[0], s->dirty[i]->id);
            proc__arr_i64(&b[1], (int64_t)s->dirty[i]->seq);
            proc__arr_bytea(&b[2], (const uint8_t *)enc.data, enc.len);
            rows++;
            bytes += enc.len;
            total += enc.len;
        }
        if (rows && (i == s->n_dirty || rows == PROC__CHUNK || bytes > PROC__CKPT_CHUNK_BYTES)) {
            const char *params[4];
            cm_buf_puts(&b[0], "}");
            cm_buf_puts(&b[1], "}");
            cm_buf_puts(&b[2], "}");
            params[0] = b[0].data;
            params[1] = s->idx_s;
            params[2] = b[1].data;
            params[3] = b[2].data;
            rc = cm_pg_exec(c, NULL, proc__sql_ckpt, 4, params);
            if (rc) break;
            rows = bytes = 0;
            proc__bufs_open(b, 3);
        }
    }
    for (int i = 0; i < 3; i++) cm_buf_free(&b[i]);
    cm_buf_free(&enc);
#ifdef __GLIBC__
    /* A checkpoint of many states leaves megabytes free in this thread's malloc arena, which glibc
     * keeps; hand them back, or every shard's RSS stays at its checkpoint peak. */
    if (total > PROC__CKPT_CHUNK_BYTES) malloc_trim(0);
#endif
    return rc;
}

static int proc__action(cm_pg_conn_t *c, const char *alert_id, const char *event_id, int kind, const char *target,
                        const uint8_t *payload, size_t plen, int attempts, int64_t timeout_ms) {
    char skind[8], satt[16], stmo[24];
    snprintf(skind, sizeof skind, "%d", kind);
    snprintf(satt, sizeof satt, "%d", attempts);
    snprintf(stmo, sizeof stmo, "%" PRId64, timeout_ms);
    char *hex = NULL;
    if (payload) {
        hex = cm_malloc(2 * plen + 3);
        hex[0] = '\\';
        hex[1] = 'x';
        cm_hex(hex + 2, payload, plen);
    }
    const char *p[7] = {alert_id, event_id, skind, target, hex, satt, stmo};
    int rc = cm_pg_exec(c, NULL,
                        "INSERT INTO actions (alert_id, event_id, kind, target, payload, max_attempts, timeout_ms) "
                        "VALUES ($1, $2, $3, $4, $5::bytea, $6, $7)",
                        7, p);
    cm_free(hex);
    return rc;
}

/* Runs one alert operation; *queued counts actions written. */
static int proc__sql_op(cm_pg_conn_t *c, const proc__op_t *op, int *queued) {
    char sev[8], ep[24], t[24], val[40];
    snprintf(sev, sizeof sev, "%d", op->severity);
    snprintf(ep, sizeof ep, "%" PRId64, op->episode);
    snprintf(t, sizeof t, "%" PRId64, op->t_ms);
    snprintf(val, sizeof val, "%.17g", op->value);
    PGresult *res = NULL;
    int rc;
    int old = 0;
    if (op->kind == PROC__FIRE) {
        const char *p[8] = {op->rule_id, op->device, op->metric, ep, sev, val, op->msg, t};
        rc = cm_pg_exec(c, &res, "SELECT o_id, o_event FROM fire_alert($1, $2, $3, $4, $5, $6, $7, $8)", 8, p);
    } else if (op->kind == PROC__ESCALATE) {
        const char *p[6] = {op->rule_id, op->device, ep, sev, val, op->msg};
        rc = cm_pg_exec(c, &res, "SELECT o_id, o_event, o_old FROM escalate_alert($1, $2, $3, $4, $5, $6)", 6, p);
    } else {
        const char *p[4] = {op->rule_id, op->device, ep, t};
        rc = cm_pg_exec(c, &res, "SELECT o_id, o_event FROM resolve_alert($1, $2, $3, $4)", 4, p);
    }
    if (rc) return rc;
    if (PQntuples(res) == 1 && op->rule) {
        const char *aid = PQgetvalue(res, 0, 0), *eid = PQgetvalue(res, 0, 1);
        const proc_rule_t *r = op->rule;
        if (op->kind == PROC__ESCALATE) old = atoi(PQgetvalue(res, 0, 2));
        int cmd = r->cmd_name && op->severity >= r->cmd_min_severity &&
                  (op->kind == PROC__FIRE || (op->kind == PROC__ESCALATE && old < r->cmd_min_severity));
        if (cmd) {
            rc = proc__action(c, aid, eid, 1, r->cmd_name, r->cmd_payload, r->cmd_payload_len, PROC__CMD_ATTEMPTS,
                              PROC__CMD_TIMEOUT_MS);
            if (!rc) ++*queued;
        }
        if (!rc && r->hook_url) {
            rc = proc__action(c, aid, eid, 2, r->hook_url, NULL, 0, r->hook_attempts, r->hook_timeout_ms);
            if (!rc) ++*queued;
        }
    }
    PQclear(res);
    return rc;
}

/* ---- leases ------------------------------------------------------------------------------ */

static int proc__lease_valid(proc__shard_t *s) {
    pthread_mutex_lock(&s->e->mu);
    int ok = s->until_ns > cm_mono_ns();
    pthread_mutex_unlock(&s->e->mu);
    return ok;
}

/* ---- flush and checkpoint ---------------------------------------------------------------- */

static void proc__xack(proc__shard_t *s) {
    for (size_t i = 0; i < s->n_acks; i += PROC__CHUNK) {
        size_t n = s->n_acks - i < PROC__CHUNK ? s->n_acks - i : PROC__CHUNK;
        const char **argv = cm_malloc((n + 3) * sizeof *argv);
        argv[0] = "XACK";
        argv[1] = s->key;
        argv[2] = s->e->cfg->group;
        for (size_t j = 0; j < n; j++) argv[3 + j] = s->acks[i + j];
        redisReply *r = cm_redis_cmd(s->redis, (int)(n + 3), argv, NULL);
        if (r) freeReplyObject(r);
        /* A lost XACK only leaves entries pending: a later owner replays them and skips their
         * points by seq. */
        cm_free(argv);
    }
    s->n_acks = 0;
}

/* Commits rollups, progress marks, alert operations and, with ckpt, the states of dirty devices;
 * then acknowledges the entries a checkpoint covers. 0, or -1 (the shard must be reset). */
static int proc__flush(proc__shard_t *s, int ckpt) {
    for (size_t i = 0; i < s->n_rolls; i++) {
        proc__metric_t *m = &s->rolls[i].d->m[s->rolls[i].mi];
        proc__agg_emit(s, s->rolls[i].d, m, 0);
        proc__agg_emit(s, s->rolls[i].d, m, 1);
        m->roll_dirty = 0;
    }
    s->n_rolls = 0;
    int work = cm_map_len(s->aggs) || s->n_touched || s->n_ops || (ckpt && (s->n_dirty || s->n_acks));
    if (!work) return 0;
    if (!proc__lease_valid(s)) return -1;
    cm_pg_conn_t *c = cm_pg_acquire(s->pg, 5000);
    if (!c) {
        cm_log_kv(CM_LOG_WARN, "flush: no Postgres connection", "shard", s->idx_s, "why", cm_pg_last_error(s->pg), NULL);
        return -1;
    }
    int queued = 0;
    int rc = cm_pg_begin(c);
    if (!rc && cm_map_len(s->aggs)) rc = proc__sql_rollups_run(s, c);
    if (!rc && s->n_touched) rc = proc__sql_progress_run(s, c);
    if (!rc && ckpt && s->n_dirty) rc = proc__sql_ckpt_run(s, c);
    for (size_t i = 0; !rc && i < s->n_ops; i++) rc = proc__sql_op(c, &s->ops[i], &queued);
    if (!rc && !proc__lease_valid(s)) {
        cm_pg_rollback(c);
        cm_pg_release(s->pg, c);
        return -1;
    }
    if (!rc) rc = cm_pg_commit(c);
    if (rc) {
        cm_log_kv(CM_LOG_WARN, "flush failed; the shard is reloaded and its pending entries replayed", "shard", s->idx_s,
                  "error", cm_pg_error(c), NULL);
        cm_pg_rollback(c);
        cm_pg_release(s->pg, c);
        cm_counter_add(s->e->c_flush_fail, 1);
        return -1;
    }
    cm_pg_release(s->pg, c);
    cm_counter_add(s->e->c_flushes, 1);
    cm_counter_add(s->e->c_ops, s->n_ops);
    if (queued) proc_actions_kick(s->e->actions);
    if (s->n_ops && s->e->alerts_changed) s->e->alerts_changed(s->e->alerts_changed_arg);
    /* The aggregates point into devices; clear them before anything can free a device. */
    cm_map_free(s->aggs, cm_free);
    s->aggs = cm_map_new();
    for (size_t i = 0; i < s->n_touched; i++) {
        s->touched[i]->flushed_seq = s->touched[i]->seq;
        s->touched[i]->touched = 0;
    }
    s->n_touched = 0;
    s->n_ops = 0;
    if (ckpt) {
        for (size_t i = 0; i < s->n_dirty; i++) s->dirty[i]->ckpt_dirty = 0;
        s->n_dirty = 0;
        cm_counter_add(s->e->c_ckpts, 1);
        proc__xack(s);
    }
    return 0;
}

/* ---- activation -------------------------------------------------------------------------- */

static void proc__deactivate(proc__shard_t *s) {
    cm_map_free(s->aggs, cm_free);
    s->aggs = NULL;
    cm_map_free(s->devs, proc__dev_free);
    s->devs = NULL;
    s->n_touched = s->n_dirty = s->n_rolls = s->n_ops = s->n_acks = 0;
    s->active = 0;
    s->gen = 0;
}

/* Loads the shard's progress marks and checkpoints, and claims the group's pending entries. */
static int proc__activate(proc__shard_t *s, const proc_ruleset_t *rs) {
    const proc_config_t *cfg = s->e->cfg;
    redisReply *r = cm_redis_cmdv(s->redis, "XGROUP", "CREATE", s->key, cfg->group, "0", "MKSTREAM", NULL);
    if (!r) return -1;
    int busy = r->type == REDIS_REPLY_ERROR && strstr(r->str, "BUSYGROUP");
    int bad = r->type == REDIS_REPLY_ERROR && !busy;
    if (bad) cm_log_kv(CM_LOG_WARN, "XGROUP CREATE failed", "stream", s->key, "error", r->str, NULL);
    freeReplyObject(r);
    if (bad) return -1;

    s->devs = cm_map_new();
    s->aggs = cm_map_new();
    cm_pg_conn_t *c = cm_pg_acquire(s->pg, 5000);
    if (!c) {
        proc__deactivate(s);
        return -1;
    }
    const char *p[1] = {s->idx_s};
    PGresult *res = NULL;
    int rc = cm_pg_exec(c, &res, "SELECT device_id, seq FROM progress WHERE shard = $1", 1, p);
    if (!rc) {
        for (int i = 0; i < PQntuples(res); i++) {
            proc__dev_t *d = proc__dev(s, PQgetvalue(res, i, 0));
            d->effects_seq = d->flushed_seq = strtoull(PQgetvalue(res, i, 1), NULL, 10);
        }
        PQclear(res);
        res = NULL;
        rc = cm_pg_exec(c, &res, "SELECT device_id, seq, state FROM checkpoints WHERE shard = $1", 1, p);
    }
    cm_pg_release(s->pg, c);
    if (rc) {
        proc__deactivate(s);
        return -1;
    }
    int64_t ndev = PQntuples(res);
    for (int i = 0; i < PQntuples(res); i++) {
        proc__dev_t *d = proc__dev(s, PQgetvalue(res, i, 0));
        size_t n = 0;
        unsigned char *b = PQunescapeBytea((const unsigned char *)PQgetvalue(res, i, 2), &n);
        if (!b || proc__decode_dev(s, rs, d, b, n) != 0) {
            cm_log_kv(CM_LOG_WARN, "checkpoint does not parse; the device starts empty", "device", d->id, NULL);
            proc__dev_clear(d);
            d->seq = 0;
        }
        if (d->effects_seq < d->seq) d->effects_seq = d->seq;
        d->flushed_seq = d->effects_seq;
        PQfreemem(b);
    }
    PQclear(res);

    /* Take over what other consumers read and did not acknowledge (a dead or former owner). */
    char cursor[48] = "0-0";
    int64_t claimed = 0;
    for (;;) {
        redisReply *x = cm_redis_cmdv(s->redis, "XAUTOCLAIM", s->key, cfg->group, cfg->member, "0", cursor, "COUNT",
                                      "1000", "JUSTID", NULL);
        if (!x || x->type != REDIS_REPLY_ARRAY || x->elements < 2) {
            if (x) {
                cm_log_kv(CM_LOG_WARN, "XAUTOCLAIM failed", "stream", s->key, "error",
                          x->type == REDIS_REPLY_ERROR ? x->str : "unexpected reply", NULL);
                freeReplyObject(x);
            }
            proc__deactivate(s);
            return -1;
        }
        snprintf(cursor, sizeof cursor, "%s", x->element[0]->str ? x->element[0]->str : "0-0");
        claimed += (int64_t)x->element[1]->elements;
        freeReplyObject(x);
        if (strcmp(cursor, "0-0") == 0) break;
    }
    cm_counter_add(s->e->c_claimed, (uint64_t)claimed);
    snprintf(s->read_id, sizeof s->read_id, "0");
    s->active = 1;
    s->gen = rs->gen;
    int64_t now = proc__mono_ms();
    s->next_flush = now + cfg->flush_ms;
    s->next_ckpt = now + cfg->checkpoint_ms;
    s->next_tick = now + PROC__TICK_MS;
    s->next_stats = now + cfg->stats_ms;
    char sd[24], sc[24];
    snprintf(sd, sizeof sd, "%" PRId64, ndev);
    snprintf(sc, sizeof sc, "%" PRId64, claimed);
    cm_log_kv(CM_LOG_INFO, "shard taken", "shard", s->idx_s, "checkpointed_devices", sd, "claimed_pending", sc, NULL);
    return 0;
}

/* ---- reading ----------------------------------------------------------------------------- */

static void proc__entry(proc__shard_t *s, const proc_ruleset_t *rs, const redisReply *e) {
    if (e->type != REDIS_REPLY_ARRAY || e->elements < 2 || e->element[0]->type != REDIS_REPLY_STRING) return;
    const char *id = e->element[0]->str;
    char idbuf[48];
    snprintf(idbuf, sizeof idbuf, "%s", id);
    if (s->n_acks == s->cap_acks) {
        s->cap_acks = s->cap_acks ? s->cap_acks * 2 : 256;
        s->acks = cm_realloc(s->acks, s->cap_acks * sizeof *s->acks);
    }
    memcpy(s->acks[s->n_acks++], idbuf, sizeof idbuf);
    cm_counter_add(s->e->c_entries, 1);
    const redisReply *f = e->element[1];
    if (f->type != REDIS_REPLY_ARRAY) return; /* trimmed from the stream while pending */
    const redisReply *batch = NULL;
    for (size_t i = 0; i + 1 < f->elements; i += 2)
        if (f->element[i]->type == REDIS_REPLY_STRING && strcmp(f->element[i]->str, "batch") == 0) batch = f->element[i + 1];
    if (!batch || batch->type != REDIS_REPLY_STRING) return;
    Iot__Ingest__V1__PublishedBatch *pb =
        iot__ingest__v1__published_batch__unpack(NULL, batch->len, (const uint8_t *)batch->str);
    if (!pb) {
        cm_log_kv(CM_LOG_WARN, "stream entry does not parse; skipped", "stream", s->key, "id", idbuf, NULL);
        return;
    }
    if (pb->device_id && *pb->device_id && strlen(pb->device_id) <= PROC_ID_MAX) {
        proc__dev_t *d = proc__dev(s, pb->device_id);
        for (size_t i = 0; i < pb->n_points; i++) proc__point(s, rs, d, pb->points[i]);
    }
    protobuf_c_message_free_unpacked(&pb->base, NULL);
}

/* Reads one batch of entries (blocking up to block_ms for new ones); the reply, NULL on a Redis
 * failure. The caller evaluates them with proc__process. */
static redisReply *proc__read(proc__shard_t *s, int64_t block_ms) {
    const proc_config_t *cfg = s->e->cfg;
    char count[16], block[16];
    snprintf(count, sizeof count, "%" PRId64, cfg->read_count);
    snprintf(block, sizeof block, "%" PRId64, block_ms > 0 ? block_ms : 1);
    int pel = strcmp(s->read_id, ">") != 0;
    const char *argv[] = {"XREADGROUP", "GROUP", cfg->group, cfg->member, "COUNT", count, "BLOCK", block, "STREAMS", s->key, s->read_id};
    redisReply *r = pel ? cm_redis_cmdv(s->redis, "XREADGROUP", "GROUP", cfg->group, cfg->member, "COUNT", count, "STREAMS",
                                        s->key, s->read_id, NULL)
                        : cm_redis_cmd(s->redis, 11, argv, NULL);
    if (r && r->type == REDIS_REPLY_ERROR) {
        /* NOGROUP: the stream was deleted under us; re-activation recreates the group. */
        cm_log_kv(CM_LOG_WARN, "XREADGROUP failed", "stream", s->key, "error", r->str, NULL);
        freeReplyObject(r);
        return NULL;
    }
    return r;
}

/* Evaluates the entries of a read with rs (taken after the read returned, so a rule a replica
 * reports loaded applies to every point it evaluates afterwards). Returns how many entries. */
static int proc__process(proc__shard_t *s, const proc_ruleset_t *rs, const redisReply *r) {
    int pel = strcmp(s->read_id, ">") != 0;
    int n = 0;
    if (r->type == REDIS_REPLY_ARRAY && r->elements == 1 && r->element[0]->type == REDIS_REPLY_ARRAY &&
        r->element[0]->elements == 2) {
        const redisReply *entries = r->element[0]->element[1];
        for (size_t i = 0; i < entries->elements; i++) {
            proc__entry(s, rs, entries->element[i]);
            n++;
        }
        if (pel && n) snprintf(s->read_id, sizeof s->read_id, "%s", s->acks[s->n_acks - 1]);
    }
    if (pel && n == 0) snprintf(s->read_id, sizeof s->read_id, ">");
    s->caught_up = !pel && n < s->e->cfg->read_count;
    return n;
}

/* ---- periodic work ----------------------------------------------------------------------- */

static void proc__tick(proc__shard_t *s) {
    size_t iter = 0;
    const void *k;
    size_t kl;
    void *v;
    int64_t now = cm_wall_ms();
    char msg[160];
    while (cm_map_next(s->devs, &iter, &k, &kl, &v)) {
        proc__dev_t *d = v;
        for (uint32_t i = 0; i < d->nm; i++) {
            for (uint32_t j = 0; j < d->m[i].n; j++) {
                proc__rs_t *rs = d->m[i].st[j];
                if (rs->cond != PROC_COND_ABSENCE || rs->firing) continue;
                proc_absence_t *a = PROC__DET(rs);
                if (proc_absence_tick(a, &rs->rule->absence, now)) {
                    snprintf(msg, sizeof msg, "no %s data for %.3g s", d->m[i].name, (double)(now - a->last_ms) / 1000.0);
                    proc__fire(s, d, d->m[i].name, rs, a->last_ms, now, rs->rule->severity, (double)(now - a->last_ms) / 1000.0, msg);
                    atomic_fetch_add_explicit(&rs->stats->matches, 1, memory_order_relaxed);
                    if (!d->ckpt_dirty) {
                        d->ckpt_dirty = 1;
                        PROC__PUSH(s->dirty, s->n_dirty, s->cap_dirty, d);
                    }
                }
            }
        }
    }
}

static void proc__ts(Google__Protobuf__Timestamp *ts, int64_t ms) {
    google__protobuf__timestamp__init(ts);
    int64_t sec = ms >= 0 ? ms / 1000 : -((-ms + 999) / 1000);
    ts->seconds = sec;
    ts->nanos = (int32_t)((ms - sec * 1000) * 1000000);
}

/* Publishes the statistics of windows that changed and hold min_samples points (GetWindowStats). */
static void proc__publish_stats(proc__shard_t *s) {
    size_t iter = 0, queued = 0;
    const void *k;
    size_t kl;
    void *v;
    int64_t now = cm_wall_ms();
    uint8_t buf[512];
    while (cm_map_next(s->devs, &iter, &k, &kl, &v)) {
        proc__dev_t *d = v;
        for (uint32_t i = 0; i < d->nm; i++) {
            for (uint32_t j = 0; j < d->m[i].n; j++) {
                proc__rs_t *rs = d->m[i].st[j];
                if (!rs->win || !rs->dirty) continue;
                rs->dirty = 0;
                proc_stats_t st;
                int64_t at = rs->last_t != PROC__NONE ? rs->last_t : now;
                if (proc_window_stats(rs->win, at, &st) != 0) continue;
                Iot__Processing__V1__WindowStats ws = IOT__PROCESSING__V1__WINDOW_STATS__INIT;
                Google__Protobuf__Timestamp from, to, pub;
                ws.rule_id = rs->stats->id;
                ws.device_id = d->id;
                ws.metric = d->m[i].name;
                ws.count = st.count;
                ws.mean = st.mean;
                ws.min = st.min;
                ws.max = st.max;
                ws.stddev = st.stddev;
                ws.last = st.last;
                ws.p95 = st.p95;
                proc__ts(&from, st.from_ms);
                proc__ts(&to, st.to_ms);
                proc__ts(&pub, now);
                ws.from_time = &from;
                ws.to_time = &to;
                ws.publish_time = &pub;
                ws.dropped_late = st.dropped_late;
                size_t n = protobuf_c_message_get_packed_size(&ws.base);
                if (n > sizeof buf) continue;
                protobuf_c_message_pack(&ws.base, buf);
                char key[512];
                snprintf(key, sizeof key, "%swin:%s:%s", s->e->cfg->redis_prefix, rs->stats->id, d->id);
                const char *argv[] = {"SET", key, (const char *)buf, "PX", PROC__WINSTATS_TTL};
                size_t lens[] = {3, strlen(key), n, 2, strlen(PROC__WINSTATS_TTL)};
                if (cm_redis_append(s->redis, 5, argv, lens) == 0) queued++;
            }
        }
    }
    for (size_t i = 0; i < queued; i++) {
        redisReply *r = NULL;
        if (cm_redis_get_reply(s->redis, &r) != 0) break;
        if (r) freeReplyObject(r);
    }
}

/* One round of an active shard: read, evaluate, flush and checkpoint when due. -1: reset. */
static int proc__round(proc__shard_t *s) {
    const proc_config_t *cfg = s->e->cfg;
    int64_t now = proc__mono_ms();
    int64_t block = s->next_flush - now;
    if (block > 100) block = 100;
    redisReply *reply = proc__read(s, block);
    proc_ruleset_t *rs = proc_rules_get(s->e->rules);
    if (rs->gen != s->gen) {
        proc__reconcile_all(s, rs);
        s->gen = rs->gen;
    }
    int rc = 0;
    if (!reply) {
        rc = -1;
    } else {
        proc__process(s, rs, reply);
        freeReplyObject(reply);
        now = proc__mono_ms();
        if (s->caught_up && now >= s->next_tick) {
            proc__tick(s);
            s->next_tick = now + PROC__TICK_MS;
        }
        int ckpt = now >= s->next_ckpt;
        if (s->n_ops || now >= s->next_flush || ckpt) {
            rc = proc__flush(s, ckpt);
            s->next_flush = now + cfg->flush_ms;
            if (ckpt) s->next_ckpt = now + cfg->checkpoint_ms;
        }
        if (!rc && now >= s->next_stats) {
            proc__publish_stats(s);
            s->next_stats = now + cfg->stats_ms;
        }
    }
    proc_ruleset_unref(rs);
    return rc;
}

static void proc__release_lease(proc__shard_t *s) {
    const char *args[2] = {s->lease_key, s->e->cfg->member};
    redisReply *r = cm_redis_eval(s->redis, &s->e->release, 2, args, NULL);
    if (r) freeReplyObject(r);
}

static void proc__owned_gauge(proc_engine_t *e) {
    int n = 0;
    for (int i = 0; i < e->n; i++) n += e->shards[i].active;
    cm_gauge_set(e->g_owned, n);
}

static void *proc__shard_main(void *arg) {
    proc__shard_t *s = arg;
    proc_engine_t *e = s->e;
    int64_t backoff = 0;
    for (;;) {
        pthread_mutex_lock(&e->mu);
        while (!e->stopping && !s->active && !(s->want && s->until_ns > cm_mono_ns())) {
            struct timespec ts;
            cm_abstime_in(&ts, 500);
            pthread_cond_timedwait(&s->cv, &e->mu, &ts);
        }
        int stop = e->stopping, want = s->want, valid = s->until_ns > cm_mono_ns();
        pthread_mutex_unlock(&e->mu);
        if (s->active && (stop || !want || !valid)) {
            /* Hand over: checkpoint while the lease still holds, then let the next owner in. */
            if (valid && proc__flush(s, 1) == 0) proc__release_lease(s);
            proc__deactivate(s);
            proc__owned_gauge(e);
            cm_log_kv(CM_LOG_INFO, valid ? "shard released" : "shard lease lost", "shard", s->idx_s, NULL);
            if (stop) break;
            continue;
        }
        if (stop) break;
        if (backoff) {
            struct timespec ts = {(time_t)(backoff / 1000), (long)(backoff % 1000) * 1000000L};
            nanosleep(&ts, NULL);
        }
        if (!s->active) {
            proc_ruleset_t *rs = proc_rules_get(e->rules);
            int rc = proc__activate(s, rs);
            proc_ruleset_unref(rs);
            if (rc) {
                backoff = backoff ? (backoff * 2 > 5000 ? 5000 : backoff * 2) : 200;
                continue;
            }
            proc__owned_gauge(e);
        }
        if (proc__round(s) != 0) {
            cm_counter_add(e->c_resets, 1);
            proc__deactivate(s);
            proc__owned_gauge(e);
            backoff = backoff ? (backoff * 2 > 5000 ? 5000 : backoff * 2) : 200;
        } else {
            backoff = 0;
        }
    }
    return NULL;
}

/* ---- the lease thread -------------------------------------------------------------------- */

static const char proc__acquire_lua[] =
    "local v = redis.call('GET', ARGV[1]) "
    "if v == ARGV[2] then redis.call('PEXPIRE', ARGV[1], ARGV[3]) return 1 end "
    "if not v then redis.call('SET', ARGV[1], ARGV[2], 'PX', ARGV[3]) return 1 end "
    "return 0";
static const char proc__release_lua[] =
    "if redis.call('GET', ARGV[1]) == ARGV[2] then return redis.call('DEL', ARGV[1]) end return 0";

static void proc__publish_rule_stats(proc_engine_t *e) {
    proc_ruleset_t *rs = proc_rules_get(e->rules);
    char ttl[24];
    snprintf(ttl, sizeof ttl, "%" PRId64, 3 * e->cfg->lease_ms);
    for (size_t i = 0; i < rs->n; i += PROC__CHUNK) {
        size_t n = rs->n - i < PROC__CHUNK ? rs->n - i : PROC__CHUNK;
        const char **argv = cm_malloc((2 + 2 * n) * sizeof *argv);
        char(*vals)[112] = cm_malloc(n * sizeof *vals);
        argv[0] = "HSET";
        argv[1] = e->stats_key;
        for (size_t j = 0; j < n; j++) {
            proc_rule_stats_t *st = rs->rules[i + j]->stats;
            snprintf(vals[j], sizeof vals[j], "%llu %llu %lld %lld %llu", (unsigned long long)atomic_load(&st->evaluations),
                     (unsigned long long)atomic_load(&st->matches), (long long)atomic_load(&st->windows),
                     (long long)atomic_load(&st->memory_bytes), (unsigned long long)atomic_load(&st->cpu_ns));
            argv[2 + 2 * j] = st->id;
            argv[3 + 2 * j] = vals[j];
        }
        redisReply *r = cm_redis_cmd(e->redis, (int)(2 + 2 * n), argv, NULL);
        if (r) freeReplyObject(r);
        cm_free(vals);
        cm_free(argv);
    }
    if (rs->n) {
        redisReply *r = cm_redis_cmdv(e->redis, "PEXPIRE", e->stats_key, ttl, NULL);
        if (r) freeReplyObject(r);
    }
    proc_ruleset_unref(rs);
}

/* MurmurHash3's 64-bit finalizer over FNV-1a: FNV alone orders "replica-a:<n>" above
 * "replica-b:<n>" for every n (its high bits hardly depend on the last bytes), which would give
 * one member every shard. */
static uint64_t proc__mix(uint64_t k) {
    k ^= k >> 33;
    k *= 0xff51afd7ed558ccdULL;
    k ^= k >> 33;
    k *= 0xc4ceb9fe1a85ec53ULL;
    k ^= k >> 33;
    return k;
}

static int64_t proc__lease_loop(void *arg) {
    proc_engine_t *e = arg;
    const proc_config_t *cfg = e->cfg;
    int64_t period = cfg->lease_ms / 3;
    if (!proc_rules_ready(e->rules)) return 50;
    int64_t now = cm_wall_ms();
    char score[32], snow[32], ttl[24];
    snprintf(score, sizeof score, "%" PRId64, now + cfg->lease_ms);
    snprintf(snow, sizeof snow, "%" PRId64, now);
    snprintf(ttl, sizeof ttl, "%" PRId64, cfg->lease_ms);
    redisReply *r = cm_redis_cmdv(e->redis, "ZADD", e->members_key, score, cfg->member, NULL);
    if (r) freeReplyObject(r);
    r = r ? cm_redis_cmdv(e->redis, "ZREMRANGEBYSCORE", e->members_key, "-inf", snow, NULL) : NULL;
    if (r) freeReplyObject(r);
    redisReply *m = r ? cm_redis_cmdv(e->redis, "ZRANGEBYSCORE", e->members_key, snow, "+inf", NULL) : NULL;
    pthread_mutex_lock(&e->mu);
    e->redis_ok = m && m->type == REDIS_REPLY_ARRAY;
    pthread_mutex_unlock(&e->mu);
    if (!m || m->type != REDIS_REPLY_ARRAY) {
        if (m) freeReplyObject(m);
        return period; /* leases run out on their own: shard threads stop touching anything */
    }
    for (int i = 0; i < e->n; i++) {
        proc__shard_t *s = &e->shards[i];
        const char *best = NULL;
        uint64_t best_h = 0;
        for (size_t j = 0; j < m->elements; j++) {
            char k[256];
            int n = snprintf(k, sizeof k, "%s:%d", m->element[j]->str, i);
            uint64_t h = proc__mix(cm_hash64(k, (size_t)n));
            if (!best || h > best_h || (h == best_h && strcmp(m->element[j]->str, best) < 0)) {
                best = m->element[j]->str;
                best_h = h;
            }
        }
        int mine = best && strcmp(best, cfg->member) == 0;
        pthread_mutex_lock(&e->mu);
        int active_or_wanted = s->want || s->active;
        pthread_mutex_unlock(&e->mu);
        if (!mine && !active_or_wanted) continue;
        int64_t t0 = cm_mono_ns();
        const char *args[3] = {s->lease_key, cfg->member, ttl};
        redisReply *x = cm_redis_eval(e->redis, &e->acquire, 3, args, NULL);
        int got = x && x->type == REDIS_REPLY_INTEGER && x->integer == 1;
        if (x) freeReplyObject(x);
        pthread_mutex_lock(&e->mu);
        if (got) {
            /* Valid for the TTL less a third, counted from before the request went out. */
            s->until_ns = t0 + (cfg->lease_ms - cfg->lease_ms / 3) * 1000000;
            s->want = mine;
        } else {
            s->until_ns = 0;
            s->want = 0;
        }
        int start = got && mine && !s->started;
        if (start) s->started = 1;
        pthread_cond_signal(&s->cv);
        pthread_mutex_unlock(&e->mu);
        if (start) pthread_create(&s->th, NULL, proc__shard_main, s);
    }
    freeReplyObject(m);
    proc__publish_rule_stats(e);
    return period;
}

/* ---- lifecycle --------------------------------------------------------------------------- */

static void proc__metrics_init(proc_engine_t *e) {
    e->c_points = cm_metrics_counter("processing_points_total", "numeric points evaluated", NULL);
    e->c_dups = cm_metrics_counter("processing_points_duplicate_total", "points skipped as already processed (replays, republished batches)", NULL);
    e->c_late = cm_metrics_counter("processing_points_late_total", "points dropped by a window as older than its late tolerance", NULL);
    e->c_skipped = cm_metrics_counter("processing_points_skipped_total", "points with a string value (not evaluated)", NULL);
    e->c_entries = cm_metrics_counter("processing_stream_entries_total", "stream entries read", NULL);
    e->c_flushes = cm_metrics_counter("processing_flushes_total", "transactions committing alerts, rollups and progress", NULL);
    e->c_flush_fail = cm_metrics_counter("processing_flush_failures_total", "flushes that failed (the shard was reloaded and replayed)", NULL);
    e->c_ckpts = cm_metrics_counter("processing_checkpoints_total", "checkpoints committed (entries acknowledged after each)", NULL);
    e->c_ops = cm_metrics_counter("processing_alert_operations_total", "fire, escalate and resolve writes (replays included)", NULL);
    e->c_resets = cm_metrics_counter("processing_shard_resets_total", "times a shard's memory was dropped and rebuilt from its checkpoint", NULL);
    e->c_claimed = cm_metrics_counter("processing_claimed_entries_total", "pending entries taken over from other consumers", NULL);
    e->g_owned = cm_metrics_gauge("processing_shards_owned", "telemetry shards this replica consumes", NULL);
}

proc_engine_t *proc_engine_start(const proc_config_t *cfg, proc_rules_t *rules, proc_actions_t *actions,
                                 void (*alerts_changed)(void *arg), void *arg) {
    int err = 0;
    cm_redis_t *redis = cm_redis_new(cfg->redis_addr, (int)cfg->redis_timeout_ms, &err);
    if (!redis) return NULL;
    proc_engine_t *e = cm_calloc(1, sizeof *e);
    e->cfg = cfg;
    e->rules = rules;
    e->actions = actions;
    e->alerts_changed = alerts_changed;
    e->alerts_changed_arg = arg;
    e->redis = redis;
    pthread_mutex_init(&e->mu, NULL);
    snprintf(e->members_key, sizeof e->members_key, "%smembers", cfg->redis_prefix);
    snprintf(e->stats_key, sizeof e->stats_key, "%sstats:%s", cfg->redis_prefix, cfg->member);
    cm_redis_script_init(&e->acquire, proc__acquire_lua);
    cm_redis_script_init(&e->release, proc__release_lua);
    proc__metrics_init(e);
    e->n = (int)cfg->shards;
    e->shards = cm_calloc((size_t)e->n, sizeof *e->shards);
    for (int i = 0; i < e->n; i++) {
        proc__shard_t *s = &e->shards[i];
        s->e = e;
        s->idx = i;
        snprintf(s->idx_s, sizeof s->idx_s, "%d", i);
        snprintf(s->key, sizeof s->key, "%s{%d}", cfg->stream_prefix, i);
        snprintf(s->lease_key, sizeof s->lease_key, "%slease:%d", cfg->redis_prefix, i);
        cm_cond_init_monotonic(&s->cv);
        s->redis = cm_redis_new(cfg->redis_addr, (int)cfg->redis_timeout_ms, &err);
        s->pg = cm_pg_new(cfg->pg_dsn, cfg->pg_schema, 1, &err);
    }
    e->lease_loop = cm_loop_start(proc__lease_loop, e, 0);
    return e;
}

void proc_engine_stop(proc_engine_t *e) {
    if (!e) return;
    /* No more renewals or acquisitions; the leases held stay valid long enough for a checkpoint. */
    cm_loop_stop(e->lease_loop);
    pthread_mutex_lock(&e->mu);
    e->stopping = 1;
    for (int i = 0; i < e->n; i++) pthread_cond_signal(&e->shards[i].cv);
    pthread_mutex_unlock(&e->mu);
    for (int i = 0; i < e->n; i++)
        if (e->shards[i].started) pthread_join(e->shards[i].th, NULL);
    redisReply *r = cm_redis_cmdv(e->redis, "ZREM", e->members_key, e->cfg->member, NULL);
    if (r) freeReplyObject(r);
    r = cm_redis_cmdv(e->redis, "DEL", e->stats_key, NULL);
    if (r) freeReplyObject(r);
    for (int i = 0; i < e->n; i++) {
        proc__shard_t *s = &e->shards[i];
        proc__deactivate(s);
        cm_free(s->touched);
        cm_free(s->dirty);
        cm_free(s->rolls);
        cm_free(s->ops);
        cm_free(s->acks);
        cm_redis_free(s->redis);
        cm_pg_free(s->pg);
        pthread_cond_destroy(&s->cv);
    }
    cm_free(e->shards);
    cm_redis_free(e->redis);
    pthread_mutex_destroy(&e->mu);
    cm_free(e);
}

int proc_engine_ready(proc_engine_t *e, char *why, size_t len) {
    if (!proc_rules_ready(e->rules)) {
        snprintf(why, len, "rules not loaded yet (Postgres)");
        return 0;
    }
    pthread_mutex_lock(&e->mu);
    int ok = e->redis_ok;
    pthread_mutex_unlock(&e->mu);
    if (!ok) snprintf(why, len, "redis: shard membership cannot be renewed");
    return ok;
}
