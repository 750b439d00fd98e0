/* Processing's computational core: window statistics against references computed here (sliding,
 * tumbling and count windows, late points, min_samples gating), the p95 sketch against its
 * documented bound, the 1 KB memory budget, checkpoint round trips, and the detectors firing and
 * resolving at the right points (proc_window.c, proc_detect.c). */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cm_alloc.h"
#include "cm_err.h"
#include "proc_detect.h"
#include "proc_window.h"
#include "test.h"

/* ---- helpers ---------------------------------------------------------------------------------- */

/* xorshift64*: a fixed seed gives the same fixtures on every machine. */
static uint64_t rng_state;

static void rng_seed(uint64_t s) {
    rng_state = s ? s : 1;
}

static double rng_uniform(void) {
    rng_state ^= rng_state >> 12;
    rng_state ^= rng_state << 25;
    rng_state ^= rng_state >> 27;
    return (double)((rng_state * 0x2545F4914F6CDD1DULL) >> 11) / 9007199254740992.0;
}

static double rng_normal(double mean, double sd) {
    double u1 = rng_uniform(), u2 = rng_uniform();
    if (u1 < 1e-300) u1 = 1e-300;
    return mean + sd * sqrt(-2 * log(u1)) * cos(2 * M_PI * u2);
}

typedef struct ref_s {
    int64_t n;
    double mean, min, max, stddev, p95;
} ref_t;

static int cmp_d(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

/* Two-pass population statistics and the nearest-rank p95 (rank ceil(0.95 n)), as documented. */
static ref_t reference(const double *v, size_t n) {
    ref_t r = {(int64_t)n, 0, v[0], v[0], 0, 0};
    double *s = cm_malloc(n * sizeof *s);
    for (size_t i = 0; i < n; i++) {
        r.mean += v[i];
        if (v[i] < r.min) r.min = v[i];
        if (v[i] > r.max) r.max = v[i];
        s[i] = v[i];
    }
    r.mean /= (double)n;
    for (size_t i = 0; i < n; i++) r.stddev += (v[i] - r.mean) * (v[i] - r.mean);
    r.stddev = sqrt(r.stddev / (double)n);
    qsort(s, n, sizeof *s, cmp_d);
    r.p95 = s[(n * 95 + 99) / 100 - 1];
    cm_free(s);
    return r;
}

#define ASSERT_NEAR(a, b, tol)                                                                      \
    do {                                                                                            \
        double test__x = (a), test__y = (b), test__t = (tol);                                       \
        if (!(fabs(test__x - test__y) <= test__t))                                                  \
            TEST__FAIL("%s ~ %s: got %.17g, want %.17g (tolerance %g)", #a, #b, test__x, test__y, test__t); \
    } while (0)

/* 1e-9 relative, with a floor so that an exact 0 (constant input) compares too. */
#define ASSERT_REL(a, b) ASSERT_NEAR(a, b, 1e-9 * fabs(b) + 1e-12)

static void expect_stats(const proc_stats_t *st, const ref_t *r) {
    ASSERT_INT_EQ(st->count, r->n);
    ASSERT_REL(st->mean, r->mean);
    ASSERT_REL(st->min, r->min);
    ASSERT_REL(st->max, r->max);
    ASSERT_REL(st->stddev, r->stddev);
}

static void expect_p95(const proc_window_cfg_t *cfg, const proc_stats_t *st, const ref_t *r) {
    /* A hair over the bound absorbs the floating point of cell edges computed through log/exp. */
    double bound = proc_window_p95_bound(cfg, r->p95) * (1 + 1e-9) + 1e-9;
    ASSERT_NEAR(st->p95, r->p95, bound);
    ASSERT(st->p95 >= st->min && st->p95 <= st->max);
}

static proc_window_t *window_ok(const proc_window_cfg_t *cfg) {
    int err = 1;
    proc_window_t *w = proc_window_new(cfg, &err);
    if (!w) TEST__FAIL("proc_window_new: %s", proc_strerror(err));
    ASSERT_INT_EQ(err, 0);
    return w;
}

/* ---- window statistics ------------------------------------------------------------------------ */

typedef enum { FIX_CONSTANT, FIX_RAMP, FIX_RANDOM, FIX_OFFSET } fixture_t;

static void fill_fixture(fixture_t f, double *v, size_t n) {
    rng_seed(42);
    for (size_t i = 0; i < n; i++) {
        switch (f) {
        case FIX_CONSTANT: v[i] = 7.5; break;
        case FIX_RAMP: v[i] = 1 + 0.1 * (double)i; break;
        case FIX_RANDOM: v[i] = 10 + 80 * rng_uniform(); break;
        case FIX_OFFSET: v[i] = 1e6 + rng_normal(0, 1); break; /* large mean, small spread */
        }
    }
}

/* One point a second for five minutes into the seed's sliding window, in both sketch modes. */
static void check_fixture(fixture_t f, double sketch_min, double sketch_max) {
    enum { N = 300 };
    double v[N];
    fill_fixture(f, v, N);
    proc_window_cfg_t cfg;
    proc_window_cfg_seed(&cfg);
    cfg.sketch_min = sketch_min;
    cfg.sketch_max = sketch_max;
    proc_window_t *w = window_ok(&cfg);
    for (int i = 0; i < N; i++) ASSERT_INT_EQ(proc_window_add(w, (int64_t)i * 1000, v[i]), 0);
    proc_stats_t st;
    ASSERT_INT_EQ(proc_window_stats(w, 299999, &st), 0);
    ref_t r = reference(v, N);
    expect_stats(&st, &r);
    ASSERT_INT_EQ(st.from_ms, 0);
    ASSERT_INT_EQ(st.to_ms, 299999);
    ASSERT(st.last == v[N - 1]);
    if (f == FIX_OFFSET) {
        ASSERT(st.p95 >= st.min && st.p95 <= st.max); /* outside the sketch range: no bound */
    } else {
        expect_p95(&cfg, &st, &r);
    }
    proc_window_free(w);
}

static void test_stats_constant(void) {
    check_fixture(FIX_CONSTANT, 0, 100);
    check_fixture(FIX_CONSTANT, 1, 128);
}

static void test_stats_ramp(void) {
    check_fixture(FIX_RAMP, 0, 100);
    check_fixture(FIX_RAMP, 1, 128);
}

static void test_stats_random(void) {
    check_fixture(FIX_RANDOM, 0, 100);
    check_fixture(FIX_RANDOM, 1, 128);
    check_fixture(FIX_OFFSET, 0, 100); /* Welford + Chan merging stays within 1e-9 at 1e6 +- 1 */
}

/* The p95 bound over many random samples, including skewed ones, in log mode. */
static void test_p95_bound_random(void) {
    enum { N = 200 };
    double v[N];
    proc_window_cfg_t cfg;
    proc_window_cfg_seed(&cfg);
    cfg.sketch_min = 0.5;
    cfg.sketch_max = 500;
    rng_seed(7);
    for (int round = 0; round < 50; round++) {
        proc_window_t *w = window_ok(&cfg);
        for (int i = 0; i < N; i++) {
            v[i] = round % 2 ? exp(rng_normal(2, 1)) : 1 + 99 * rng_uniform();
            if (v[i] < 0.5) v[i] = 0.5;
            if (v[i] > 500) v[i] = 500;
            ASSERT_INT_EQ(proc_window_add(w, (int64_t)i * 1000, v[i]), 0);
        }
        proc_stats_t st;
        ASSERT_INT_EQ(proc_window_stats(w, 250000, &st), 0);
        ref_t r = reference(v, N);
        expect_stats(&st, &r);
        expect_p95(&cfg, &st, &r);
        proc_window_free(w);
    }
}

/* Window of 60 s in 4 sub-buckets of 15 s; one point a second, value = its second. */
static void test_sliding_boundaries(void) {
    proc_window_cfg_t cfg;
    proc_window_cfg_seed(&cfg);
    cfg.width_ms = 60000;
    cfg.buckets = 4;
    cfg.late_ms = 0;
    cfg.min_samples = 1;
    proc_window_t *w = window_ok(&cfg);
    double v[200];
    for (int i = 0; i < 120; i++) ASSERT_INT_EQ(proc_window_add(w, (int64_t)i * 1000, i), 0);
    for (int i = 0; i < 200; i++) v[i] = i;

    proc_stats_t st;
    ref_t r;
    /* Sub-bucket 7 is current: buckets 4..7 are the window, [60 s, now]. */
    ASSERT_INT_EQ(proc_window_stats(w, 119999, &st), 0);
    r = reference(v + 60, 60);
    expect_stats(&st, &r);
    ASSERT_INT_EQ(st.from_ms, 60000);
    /* No new points, the clock moves into sub-bucket 8: bucket 4 leaves the window. */
    ASSERT_INT_EQ(proc_window_stats(w, 124999, &st), 0);
    r = reference(v + 75, 45);
    expect_stats(&st, &r);
    ASSERT_INT_EQ(st.from_ms, 75000);
    ASSERT_INT_EQ(proc_window_stats(w, 134999, &st), 0);
    ASSERT_INT_EQ(st.count, 45);
    ASSERT_INT_EQ(proc_window_stats(w, 135000, &st), 0);
    r = reference(v + 90, 30);
    expect_stats(&st, &r);
    /* A point two sub-buckets ahead reuses the slots of buckets 4..6. */
    ASSERT_INT_EQ(proc_window_add(w, 150000, 150), 0);
    ASSERT_INT_EQ(proc_window_stats(w, 150000, &st), 0);
    double tail[16];
    for (int i = 0; i < 15; i++) tail[i] = 105 + i;
    tail[15] = 150;
    r = reference(tail, 16);
    expect_stats(&st, &r);
    ASSERT(st.last == 150);
    /* Much later, everything has slid out. */
    ASSERT_INT_EQ(proc_window_stats(w, 150000 + 60000, &st), PROC_ENOTENOUGH);
    ASSERT_INT_EQ(st.count, 0);
    /* A point far ahead empties the ring at once; the old data never reappears. */
    ASSERT_INT_EQ(proc_window_add(w, 10000000, 1), 0);
    ASSERT_INT_EQ(proc_window_stats(w, 10000000, &st), 0);
    ASSERT_INT_EQ(st.count, 1);
    ASSERT(st.mean == 1 && st.stddev == 0);
    proc_window_free(w);
}

static void test_tumbling(void) {
    proc_window_cfg_t cfg;
    proc_window_cfg_seed(&cfg);
    cfg.kind = PROC_WIN_TUMBLING;
    cfg.width_ms = 10000;
    cfg.buckets = 0; /* default: 2 */
    cfg.late_ms = 5000;
    cfg.min_samples = 1;
    cfg.sketch_min = 0;
    cfg.sketch_max = 100;
    proc_window_t *w = window_ok(&cfg);
    double v[11];
    rng_seed(3);
    for (int i = 0; i < 10; i++) {
        v[i] = 20 + 10 * rng_uniform();
        ASSERT_INT_EQ(proc_window_add(w, (int64_t)i * 1000, v[i]), 0);
    }
    proc_stats_t st;
    /* Still inside [0, 10 s): the last closed window is [-10 s, 0), empty. */
    ASSERT_INT_EQ(proc_window_stats(w, 9999, &st), PROC_ENOTENOUGH);
    ASSERT_INT_EQ(st.count, 0);
    ASSERT_INT_EQ(proc_window_add(w, 10000, 50), 0);
    ASSERT_INT_EQ(proc_window_add(w, 12000, 60), 0);
    ASSERT_INT_EQ(proc_window_stats(w, 12000, &st), 0);
    ref_t r = reference(v, 10);
    expect_stats(&st, &r);
    expect_p95(&cfg, &st, &r); /* a tumbling window is exactly one sketch pane */
    ASSERT_INT_EQ(st.from_ms, 0);
    ASSERT_INT_EQ(st.to_ms, 9999);

    /* 4 s late, within the 5 s tolerance: it belongs to the closed window by its event time. */
    v[10] = 99;
    ASSERT_INT_EQ(proc_window_add(w, 8000, v[10]), 0);
    ASSERT_INT_EQ(proc_window_stats(w, 15000, &st), 0);
    r = reference(v, 11);
    expect_stats(&st, &r);
    expect_p95(&cfg, &st, &r);
    ASSERT(st.last == 60); /* last is by event time: the late point is not the newest */
    ASSERT_INT_EQ(st.dropped_late, 0);

    /* 7 s late: dropped and counted; the closed window is unchanged. */
    ASSERT_INT_EQ(proc_window_add(w, 5000, 1000), PROC_ELATE);
    ASSERT_INT_EQ(proc_window_stats(w, 15000, &st), 0);
    expect_stats(&st, &r);
    ASSERT_INT_EQ(st.dropped_late, 1);

    /* The current window closes in turn. */
    ASSERT_INT_EQ(proc_window_stats(w, 20000, &st), 0);
    ASSERT_INT_EQ(st.count, 2);
    ASSERT(st.mean == 55 && st.min == 50 && st.max == 60);
    proc_window_free(w);
}

/* A point inside late_ms whose sub-bucket already left the ring cannot be in any window: dropped. */
static void test_late_beyond_ring(void) {
    proc_window_cfg_t cfg;
    proc_window_cfg_seed(&cfg);
    cfg.width_ms = 4000;
    cfg.buckets = 4;
    cfg.late_ms = 60000;
    cfg.min_samples = 1;
    proc_window_t *w = window_ok(&cfg);
    ASSERT_INT_EQ(proc_window_add(w, 10000, 1), 0);
    ASSERT_INT_EQ(proc_window_add(w, 7500, 2), 0);             /* sub-bucket 7, in the ring 7..10 */
    ASSERT_INT_EQ(proc_window_add(w, 6999, 3), PROC_ELATE);    /* sub-bucket 6: gone */
    ASSERT_INT_EQ(proc_window_add(w, -60000, 3), PROC_ELATE);  /* beyond the tolerance */
    proc_stats_t st;
    ASSERT_INT_EQ(proc_window_stats(w, 10000, &st), 0);
    ASSERT_INT_EQ(st.count, 2);
    ASSERT_INT_EQ(st.dropped_late, 2);
    ASSERT(st.last == 1);
    ASSERT_INT_EQ(proc_window_add(w, 10000, NAN), CM_EINVAL);
    ASSERT_INT_EQ(proc_window_add(w, 10000, INFINITY), CM_EINVAL);
    proc_window_free(w);
}

static void test_count_window(void) {
    proc_window_cfg_t cfg;
    proc_window_cfg_seed(&cfg);
    cfg.kind = PROC_WIN_COUNT;
    cfg.count = 8;
    cfg.min_samples = 8;
    cfg.late_ms = 1000;
    proc_window_t *w = window_ok(&cfg);
    double v[20];
    proc_stats_t st;
    rng_seed(11);
    for (int i = 0; i < 20; i++) {
        v[i] = rng_normal(5, 2);
        ASSERT_INT_EQ(proc_window_add(w, (int64_t)i * 100, v[i]), 0);
        int rc = proc_window_stats(w, 0, &st);
        ASSERT_INT_EQ(rc, i + 1 < 8 ? PROC_ENOTENOUGH : 0);
        ASSERT_INT_EQ(st.count, i + 1 < 8 ? i + 1 : 8);
    }
    ref_t r = reference(v + 12, 8);
    expect_stats(&st, &r);
    ASSERT(st.p95 == r.p95); /* exact for count windows */
    ASSERT(st.last == v[19]);
    ASSERT_INT_EQ(proc_window_add(w, 1900 - 1001, 0), PROC_ELATE);
    ASSERT_INT_EQ(proc_window_add(w, 1900 - 1000, 42), 0); /* within tolerance: arrival order */
    ASSERT_INT_EQ(proc_window_stats(w, 0, &st), 0);
    ASSERT(st.max == 42);
    ASSERT(st.last == v[19]);
    ASSERT_INT_EQ(st.dropped_late, 1);
    proc_window_free(w);
}

static void test_min_samples(void) {
    proc_window_cfg_t cfg;
    proc_window_cfg_seed(&cfg);
    proc_window_t *w = window_ok(&cfg);
    proc_stats_t st;
    ASSERT_INT_EQ(proc_window_stats(w, 0, &st), PROC_ENOTENOUGH);
    ASSERT_INT_EQ(st.count, 0);
    for (int i = 0; i < cfg.min_samples; i++) {
        ASSERT_INT_EQ(proc_window_stats(w, i * 1000, &st), PROC_ENOTENOUGH);
        ASSERT_INT_EQ(st.count, i); /* filled even when not enough */
        ASSERT_INT_EQ(proc_window_add(w, i * 1000, 3), 0);
    }
    ASSERT_INT_EQ(proc_window_stats(w, cfg.min_samples * 1000, &st), 0);
    ASSERT_INT_EQ(st.count, cfg.min_samples);
    proc_window_free(w);

    cfg.min_samples = 0; /* an empty window is never "enough" */
    w = window_ok(&cfg);
    ASSERT_INT_EQ(proc_window_stats(w, 0, &st), PROC_ENOTENOUGH);
    proc_window_free(w);
}

static void test_bad_config(void) {
    proc_window_cfg_t cfg;
    int err = 0;
    proc_window_cfg_seed(&cfg);
    ASSERT_INT_EQ(proc_window_cfg_check(&cfg), 0);
    cfg.width_ms = 299999; /* not a multiple of 20 buckets */
    ASSERT(proc_window_new(&cfg, &err) == NULL);
    ASSERT_INT_EQ(err, CM_EINVAL);
    proc_window_cfg_seed(&cfg);
    cfg.buckets = PROC_WINDOW_MAX_BUCKETS + 1;
    ASSERT_INT_EQ(proc_window_cfg_check(&cfg), CM_EINVAL);
    proc_window_cfg_seed(&cfg);
    cfg.sketch_min = cfg.sketch_max;
    ASSERT_INT_EQ(proc_window_cfg_check(&cfg), CM_EINVAL);
    proc_window_cfg_seed(&cfg);
    cfg.kind = PROC_WIN_TUMBLING;
    cfg.buckets = 1;
    ASSERT_INT_EQ(proc_window_cfg_check(&cfg), CM_EINVAL);
    proc_window_cfg_seed(&cfg);
    cfg.kind = PROC_WIN_COUNT;
    cfg.count = 0;
    ASSERT_INT_EQ(proc_window_cfg_check(&cfg), CM_EINVAL);
    ASSERT(proc_window_new(&cfg, NULL) == NULL);
    ASSERT_STR_EQ(proc_strerror(PROC_ELATE), "point older than the late tolerance, dropped and counted");
    ASSERT_STR_EQ(proc_strerror(CM_EINVAL), cm_strerror(CM_EINVAL));
}

/* ---- memory budget ---------------------------------------------------------------------------- */

static void test_memory_budget(void) {
    proc_window_cfg_t cfg;
    proc_window_cfg_seed(&cfg); /* 5 min sliding, 20 buckets */
    proc_window_t *w = window_ok(&cfg);
    size_t idle = proc_window_memory(w);
    size_t det = sizeof(proc_stuck_t) + sizeof(proc_rate_t) + sizeof(proc_absence_t);
    printf("    # seed window %zu bytes + detectors %zu = %zu bytes per (device, metric)\n", idle, det, idle + det);
    ASSERT(idle + det < 1024);
    for (int i = 0; i < 1000; i++) ASSERT_INT_EQ(proc_window_add(w, i * 500, i), 0);
    ASSERT_INT_EQ(proc_window_memory(w), idle); /* never grows */
    proc_window_free(w);

    cfg.kind = PROC_WIN_COUNT;
    cfg.count = PROC_WINDOW_MAX_COUNT;
    w = window_ok(&cfg);
    ASSERT(proc_window_memory(w) + det < 1024);
    proc_window_free(w);
}

/* ---- checkpoints ------------------------------------------------------------------------------ */

static void expect_same_stats(const proc_window_t *a, const proc_window_t *b, int64_t now) {
    proc_stats_t sa, sb;
    ASSERT_INT_EQ(proc_window_stats(a, now, &sa), proc_window_stats(b, now, &sb));
    if (memcmp(&sa, &sb, sizeof sa) != 0)
        TEST__FAIL("stats differ at %lld: count %lld/%lld mean %.17g/%.17g p95 %.17g/%.17g", (long long)now,
                   (long long)sa.count, (long long)sb.count, sa.mean, sb.mean, sa.p95, sb.p95);
}

static proc_window_t *round_trip(const proc_window_cfg_t *cfg, const proc_window_t *w) {
    size_t need = proc_window_encode(w, NULL, 0);
    uint8_t *buf = cm_malloc(need);
    ASSERT_INT_EQ(proc_window_encode(w, buf, need), need);
    int err = 1;
    proc_window_t *d = proc_window_decode(cfg, buf, need, &err);
    /* Truncated and corrupted checkpoints are refused, not half-read. */
    int err2 = 0;
    proc_window_t *bad = proc_window_decode(cfg, buf, need - 1, &err2);
    int refused_short = bad == NULL && err2 == PROC_ECHECKPOINT;
    proc_window_free(bad);
    buf[0] ^= 0xff;
    bad = proc_window_decode(cfg, buf, need, &err2);
    int refused_magic = bad == NULL && err2 == PROC_ECHECKPOINT;
    proc_window_free(bad);
    cm_free(buf);
    if (!d) TEST__FAIL("decode: %s", proc_strerror(err));
    if (!refused_short || !refused_magic) {
        proc_window_free(d);
        TEST__FAIL("a damaged checkpoint was accepted");
    }
    return d;
}

static void check_round_trip(proc_window_cfg_t *cfg) {
    proc_window_t *w = window_ok(cfg);
    rng_seed(99);
    int64_t t = 1700000000000LL;
    for (int i = 0; i < 500; i++) {
        t += (int64_t)(rng_uniform() * 2000);
        int64_t jitter = (int64_t)(rng_uniform() * 40000); /* some late, some dropped */
        proc_window_add(w, i % 7 == 0 ? t - jitter : t, rng_normal(40, 5));
    }
    proc_window_t *d = round_trip(cfg, w);
    for (int64_t dt = 0; dt <= 400000; dt += 7000) expect_same_stats(w, d, t + dt);
    /* The restored window goes on exactly as the original would have. */
    for (int i = 0; i < 200; i++) {
        t += (int64_t)(rng_uniform() * 3000);
        double x = rng_normal(40, 5);
        ASSERT_INT_EQ(proc_window_add(w, t, x), proc_window_add(d, t, x));
        expect_same_stats(w, d, t);
    }
    /* A checkpoint from another configuration is refused. */
    size_t need = proc_window_encode(w, NULL, 0);
    uint8_t *buf = cm_malloc(need);
    proc_window_encode(w, buf, need);
    proc_window_cfg_t other = *cfg;
    if (other.kind == PROC_WIN_COUNT) {
        other.count += 1;
    } else {
        other.width_ms *= 2;
    }
    int err = 0;
    proc_window_t *bad = proc_window_decode(&other, buf, need, &err);
    cm_free(buf);
    proc_window_free(w);
    proc_window_free(d);
    ASSERT(bad == NULL);
    ASSERT_INT_EQ(err, PROC_ECHECKPOINT);
}

static void test_encode_round_trip(void) {
    proc_window_cfg_t cfg;
    proc_window_cfg_seed(&cfg);
    check_round_trip(&cfg);
    cfg.sketch_min = 1;
    cfg.sketch_max = 200;
    check_round_trip(&cfg);
    proc_window_cfg_seed(&cfg);
    cfg.kind = PROC_WIN_TUMBLING;
    cfg.width_ms = 60000;
    cfg.buckets = 3;
    check_round_trip(&cfg);
    proc_window_cfg_seed(&cfg);
    cfg.kind = PROC_WIN_COUNT;
    cfg.count = 16;
    check_round_trip(&cfg);
}

static void test_detector_round_trip(void) {
    uint8_t buf[64];
    proc_stuck_t s, s2;
    proc_stuck_cfg_t scfg = {60000, 0};
    proc_stuck_init(&s);
    proc_stuck_update(&s, &scfg, 1000, 4.25);
    proc_stuck_update(&s, &scfg, 70000, 4.25);
    size_t n = proc_stuck_encode(&s, buf, sizeof buf);
    ASSERT(n <= sizeof buf && proc_stuck_encode(&s, buf, n - 1) == n);
    memset(&s2, 0xaa, sizeof s2);
    ASSERT_INT_EQ(proc_stuck_decode(&s2, buf, n), 0);
    ASSERT(s2.since_ms == s.since_ms && s2.last_ms == s.last_ms && s2.ref == s.ref && s2.has == 1 && s2.firing == 1);
    ASSERT_INT_EQ(proc_stuck_decode(&s2, buf, n - 1), PROC_ECHECKPOINT);

    proc_rate_t r, r2;
    proc_rate_cfg_t rcfg = {1};
    proc_rate_init(&r);
    proc_rate_update(&r, &rcfg, 0, 1, NULL);
    proc_rate_update(&r, &rcfg, 1000, 5, NULL);
    n = proc_rate_encode(&r, buf, sizeof buf);
    ASSERT_INT_EQ(proc_rate_decode(&r2, buf, n), 0);
    ASSERT(r2.last_ms == 1000 && r2.last_v == 5 && r2.has == 1 && r2.firing == 1);
    buf[0] = 0;
    ASSERT_INT_EQ(proc_rate_decode(&r2, buf, n), PROC_ECHECKPOINT);

    proc_absence_t a, a2;
    proc_absence_cfg_t acfg = {30000};
    proc_absence_init(&a, 5000);
    proc_absence_tick(&a, &acfg, 40000);
    n = proc_absence_encode(&a, buf, sizeof buf);
    ASSERT_INT_EQ(proc_absence_decode(&a2, buf, n), 0);
    ASSERT(a2.last_ms == 5000 && a2.firing == 1);
}

/* ---- detectors -------------------------------------------------------------------------------- */

/* 100 points of N(20, 1), then 35: only the 35 alerts. The normal points are redrawn beyond 2 sigma
 * so that the fixture itself holds no outlier (the alert level 0.8 is 2.4 sigma, and 1.6% of an
 * untruncated normal lies beyond it). */
static void test_zscore_outlier(void) {
    proc_window_cfg_t cfg;
    proc_window_cfg_seed(&cfg);
    cfg.min_samples = 20;
    proc_window_t *w = window_ok(&cfg);
    rng_seed(2024);
    double score;
    int64_t t = 0;
    for (int i = 0; i < 100; i++, t += 1000) {
        double x;
        do x = rng_normal(20, 1);
        while (fabs(x - 20) > 2);
        int rc = proc_zscore_update(w, t, x, &score);
        if (i < cfg.min_samples) {
            ASSERT_INT_EQ(rc, PROC_ENOTENOUGH); /* no score before min_samples */
            ASSERT(score == 0);
        } else {
            ASSERT_INT_EQ(rc, 0);
            if (proc_zscore_level(score) != PROC_LEVEL_NONE) TEST__FAIL("point %d (%g) alerted early: %g", i, x, score);
        }
    }
    ASSERT_INT_EQ(proc_zscore_update(w, t, 35, &score), 0);
    ASSERT(score == 1);
    ASSERT_INT_EQ(proc_zscore_level(score), PROC_LEVEL_HIGH);
    t += 1000;

    /* mean + 2.5 std of the window as it stands (35 included) scores 2.5 / 3. */
    proc_stats_t st;
    ASSERT_INT_EQ(proc_window_stats(w, t, &st), 0);
    ASSERT_INT_EQ(proc_zscore_update(w, t, st.mean + 2.5 * st.stddev, &score), 0);
    ASSERT_NEAR(score, 2.5 / 3, 1e-9);
    ASSERT_INT_EQ(proc_zscore_level(score), PROC_LEVEL_ALERT);
    ASSERT_INT_EQ(proc_zscore_level(0.8), PROC_LEVEL_NONE); /* strictly above */
    ASSERT_INT_EQ(proc_zscore_level(0.9), PROC_LEVEL_ALERT);
    ASSERT_INT_EQ(proc_zscore_update(w, t - 10 * 60 * 1000, 20, &score), PROC_ELATE);
    proc_window_free(w);
}

static void test_zscore_zero_std(void) {
    proc_stats_t st = {.count = 10, .mean = 5, .min = 5, .max = 5, .stddev = 0, .last = 5, .p95 = 5};
    ASSERT(proc_zscore(&st, 5) == 0);
    ASSERT(proc_zscore(&st, 5.000001) == 1);
    st.stddev = 2;
    ASSERT_NEAR(proc_zscore(&st, 8), 0.5, 1e-15);
    ASSERT(proc_zscore(&st, -100) == 1);
}

static void test_stuck(void) {
    proc_stuck_cfg_t cfg = {60000, 0};
    proc_stuck_t s;
    proc_stuck_init(&s);
    ASSERT_INT_EQ(proc_stuck_update(&s, &cfg, 0, 5), 0);
    for (int64_t t = 10000; t < 60000; t += 10000) ASSERT_INT_EQ(proc_stuck_update(&s, &cfg, t, 5), 0);
    ASSERT_INT_EQ(proc_stuck_update(&s, &cfg, 60000, 5), 1); /* unchanged for exactly 60 s */
    ASSERT_INT_EQ(proc_stuck_update(&s, &cfg, 70000, 5), 1);
    ASSERT_INT_EQ(proc_stuck_update(&s, &cfg, 65000, 9), 1);  /* out of order: ignored */
    ASSERT_INT_EQ(proc_stuck_update(&s, &cfg, 80000, 5.5), 0); /* changed: resolves, new run */
    ASSERT_INT_EQ(proc_stuck_update(&s, &cfg, 139999, 5.5), 0);
    ASSERT_INT_EQ(proc_stuck_update(&s, &cfg, 140000, 5.5), 1);

    /* With epsilon, small noise is still stuck, but a drift away from the run's first value is not. */
    proc_stuck_cfg_t eps = {30000, 0.1};
    proc_stuck_init(&s);
    ASSERT_INT_EQ(proc_stuck_update(&s, &eps, 0, 10), 0);
    ASSERT_INT_EQ(proc_stuck_update(&s, &eps, 10000, 10.05), 0);
    ASSERT_INT_EQ(proc_stuck_update(&s, &eps, 20000, 9.95), 0);
    ASSERT_INT_EQ(proc_stuck_update(&s, &eps, 30000, 10.08), 1);
    proc_stuck_init(&s);
    double v = 10;
    for (int64_t t = 0; t <= 60000; t += 10000, v += 0.06) ASSERT_INT_EQ(proc_stuck_update(&s, &eps, t, v), 0);
}

static void test_rate(void) {
    proc_rate_cfg_t cfg = {1.0}; /* units per second */
    proc_rate_t s;
    double r;
    proc_rate_init(&s);
    ASSERT_INT_EQ(proc_rate_update(&s, &cfg, 0, 0, &r), 0);
    ASSERT(r == 0);
    ASSERT_INT_EQ(proc_rate_update(&s, &cfg, 1000, 0.5, &r), 0);
    ASSERT_NEAR(r, 0.5, 1e-12);
    ASSERT_INT_EQ(proc_rate_update(&s, &cfg, 3000, 2.5, &r), 0); /* exactly the limit: not above */
    ASSERT_NEAR(r, 1.0, 1e-12);
    ASSERT_INT_EQ(proc_rate_update(&s, &cfg, 3500, 4.0, &r), 1); /* 3/s */
    ASSERT_NEAR(r, 3.0, 1e-12);
    ASSERT_INT_EQ(proc_rate_update(&s, &cfg, 3500, 100, &r), 1); /* dt = 0: ignored */
    ASSERT_INT_EQ(proc_rate_update(&s, &cfg, 4500, 1.5, &r), 1); /* falling fast counts too */
    ASSERT_INT_EQ(proc_rate_update(&s, &cfg, 5500, 1.2, &r), 0); /* resolves */
}

static void test_absence(void) {
    proc_absence_cfg_t cfg = {30000};
    proc_absence_t s;
    proc_absence_init(&s, 0);
    ASSERT_INT_EQ(proc_absence_tick(&s, &cfg, 29999), 0);
    ASSERT_INT_EQ(proc_absence_update(&s, 10000), 0);
    ASSERT_INT_EQ(proc_absence_tick(&s, &cfg, 30000), 0); /* the point moved the clock */
    ASSERT_INT_EQ(proc_absence_tick(&s, &cfg, 39999), 0);
    ASSERT_INT_EQ(proc_absence_tick(&s, &cfg, 40000), 1); /* 30 s of silence */
    ASSERT_INT_EQ(proc_absence_tick(&s, &cfg, 50000), 1);
    ASSERT_INT_EQ(proc_absence_update(&s, 45000), 0); /* resolves on the next point */
    ASSERT_INT_EQ(s.firing, 0);
    ASSERT_INT_EQ(proc_absence_tick(&s, &cfg, 74999), 0);
    ASSERT_INT_EQ(proc_absence_update(&s, 1000), 0); /* a replayed old point does not move it back */
    ASSERT_INT_EQ(proc_absence_tick(&s, &cfg, 75000), 1);

    /* A device that never reports goes absent from the start time. */
    proc_absence_init(&s, 100000);
    ASSERT_INT_EQ(proc_absence_tick(&s, &cfg, 129999), 0);
    ASSERT_INT_EQ(proc_absence_tick(&s, &cfg, 130000), 1);
}

TEST_MAIN(TEST_ENTRY(test_stats_constant), TEST_ENTRY(test_stats_ramp), TEST_ENTRY(test_stats_random),
          TEST_ENTRY(test_p95_bound_random), TEST_ENTRY(test_sliding_boundaries), TEST_ENTRY(test_tumbling),
          TEST_ENTRY(test_late_beyond_ring), TEST_ENTRY(test_count_window), TEST_ENTRY(test_min_samples),
          TEST_ENTRY(test_bad_config), TEST_ENTRY(test_memory_budget), TEST_ENTRY(test_encode_round_trip),
          TEST_ENTRY(test_detector_round_trip), TEST_ENTRY(test_zscore_outlier), TEST_ENTRY(test_zscore_zero_std),
          TEST_ENTRY(test_stuck), TEST_ENTRY(test_rate), TEST_ENTRY(test_absence))
