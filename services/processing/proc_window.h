/* Window statistics for one (device, metric): the pure computational core of processing (no I/O,
 * no locks, no clock: every call takes the time it should use).
 *
 * Three kinds of window:
 *  - sliding by time: a ring of `buckets` sub-buckets of width_ms / buckets each. A point lands in
 *    the sub-bucket of its event time; statistics at `now` merge the sub-buckets of the last
 *    `buckets` sub-bucket periods, so the window slides by one sub-bucket and covers between
 *    width_ms - sub and width_ms of history (the current sub-bucket is partial). Seed: 5 min, 20 x 15 s.
 *  - tumbling by time: windows [k*width, (k+1)*width); statistics at `now` are those of the last
 *    window that ended at or before `now`. `buckets` is how many windows the ring keeps (>= 2), so
 *    late points can still reach a closed window. The caller publishes a closed window once
 *    now >= end + late_ms, after which it can no longer change.
 *  - count: the last `count` points in arrival order (<= PROC_WINDOW_MAX_COUNT), kept as doubles;
 *    every statistic, p95 included, is exact.
 *
 * Statistics: count, mean, min, max, stddev, last, p95. stddev is the POPULATION standard deviation
 * (divide by n): the window is the whole set being described, it is defined for n = 1 (0), and the
 * z-score detector compares a point against exactly this set. Sub-buckets keep count, mean, M2
 * (Welford) and min/max and are merged with Chan's pairwise formula, which stays accurate where
 * sum / sum-of-squares would cancel catastrophically (large mean, small spread).
 *
 * Late points: a point with t < newest - late_ms is dropped and counted (PROC_ELATE); a later one is
 * placed by its event time. Time windows also drop (and count) points whose sub-bucket has already
 * left the ring, since no future window could include them: the effective tolerance is
 * min(late_ms, ring span). Count windows apply the same tolerance but keep arrival order.
 *
 * p95 (time windows): a histogram of PROC_SKETCH_CELLS uint16 counters over [sketch_min, sketch_max],
 * log-spaced when sketch_min > 0 and linear otherwise, in two panes of width_ms aligned to multiples
 * of width_ms (the current pane and the previous one). Tumbling windows coincide with a pane, so
 * their p95 covers exactly the window. A sliding window's p95 covers the panes that overlap it,
 * i.e. between 1 and 2 widths of history: that is the price of the memory budget (a sketch per
 * sub-bucket would not fit in 1 KB). The estimate is the middle of the cell holding the
 * nearest-rank p95 (rank ceil(0.95 n)), narrowed to the window's exact [min, max]. Error bound, for
 * values within [sketch_min, sketch_max] and a pane holding the same points as the window:
 *    log mode:    |est - p95| <= p95 * (sqrt(g) - 1),   g = (sketch_max / sketch_min)^(1/32)
 *    linear mode: |est - p95| <= (sketch_max - sketch_min) / 64
 * proc_window_p95_bound() computes it. A cell that would pass 65535 halves every counter (ranks
 * then become approximate; it takes > 65535 points in one cell in one pane).
 *
 * Memory: one allocation per window, sized at creation and never grown, so an idle window costs
 * what a busy one does: for the seed (sliding, 20 buckets) 88 + 20 * 36 + 2 * 32 * 2 = 936 bytes.
 * proc_window_memory() reports it for per-rule accounting.
 *
 * Ownership: proc_window_new() and proc_window_decode() return a window the caller frees with
 * proc_window_free(). The cfg passed in is copied; the caller keeps its own. Not thread safe: a
 * window belongs to the one consumer that owns its device's shard. */
#ifndef PROC_WINDOW_H
#define PROC_WINDOW_H

#include <stddef.h>
#include <stdint.h>

/* Results that are not failures of the call but of the point or the window; negative like CM_E...
 * codes (cm_err.h, which processing also returns for bad arguments) and in a range of their own. */
#define PROC_ERRNO_MAP(X)                                                   \
    X(LATE, "point older than the late tolerance, dropped and counted")     \
    X(NOTENOUGH, "window holds fewer points than min_samples")              \
    X(CHECKPOINT, "checkpoint does not match this window configuration")

enum {
#define PROC__ERR_ENUM(name, msg) PROC_E##name,
    PROC__ERR_FIRST = -2000,
    PROC_ERRNO_MAP(PROC__ERR_ENUM)
#undef PROC__ERR_ENUM
    PROC__ERR_LAST
};

/* A static string for a PROC_E... code, or cm_strerror()'s text for any other code. */
const char *proc_strerror(int err);

#define PROC_WINDOW_MAX_BUCKETS 64
#define PROC_WINDOW_MAX_COUNT 64
#define PROC_SKETCH_CELLS 32

typedef enum proc_win_kind_e {
    PROC_WIN_SLIDING = 0,
    PROC_WIN_TUMBLING = 1,
    PROC_WIN_COUNT = 2
} proc_win_kind_t;

typedef struct proc_window_cfg_s {
    proc_win_kind_t kind;
    int64_t width_ms;  /* time windows: > 0; sliding: a multiple of buckets */
    int buckets;       /* sliding: sub-buckets per width (1..64); tumbling: windows kept (0 means 2, 2..64) */
    int count;         /* count windows: points kept (1..64) */
    int64_t late_ms;   /* >= 0 */
    int min_samples;   /* stats report PROC_ENOTENOUGH below this (and always on an empty window) */
    double sketch_min; /* p95 histogram range: sketch_min < sketch_max, both finite */
    double sketch_max;
} proc_window_cfg_t;

typedef struct proc_stats_s {
    int64_t count;
    double mean, min, max, stddev, last, p95; /* all 0 when count == 0 */
    int64_t from_ms, to_ms;  /* time windows: [from, to] covered; count windows: both the newest point's time */
    int64_t dropped_late;    /* since the window was created (checkpoints carry it over) */
} proc_stats_t;

typedef struct proc_window_s proc_window_t;

/* The seed's window: sliding 5 minutes in 20 sub-buckets, 30 s late tolerance, 10 samples before
 * stats are published, and a linear p95 range of [-50, 150] (a rule should set its metric's range). */
void proc_window_cfg_seed(proc_window_cfg_t *cfg);
/* 0, or CM_EINVAL when cfg breaks a constraint above. */
int proc_window_cfg_check(const proc_window_cfg_t *cfg);

/* A new, empty window, or NULL with *err (may be NULL) set to CM_EINVAL for a bad cfg. */
proc_window_t *proc_window_new(const proc_window_cfg_t *cfg, int *err);
/* Accepts NULL. */
void proc_window_free(proc_window_t *w);

/* Adds a point. 0; PROC_ELATE when dropped as too late (counted in dropped_late); CM_EINVAL for a
 * value that is not finite (it would poison every sum in the window). */
int proc_window_add(proc_window_t *w, int64_t t_ms, double v);

/* Fills *out with the window as seen at now_ms (see the kinds above). 0, or PROC_ENOTENOUGH when
 * count < min_samples or count == 0; *out is filled either way. now_ms is ignored by count windows. */
int proc_window_stats(const proc_window_t *w, int64_t now_ms, proc_stats_t *out);

/* Bytes held by the window (its struct and its storage), for per-rule accounting. */
size_t proc_window_memory(const proc_window_t *w);

/* The p95 error bound documented above for a true p95 of `p95` (time windows; 0 for count windows). */
double proc_window_p95_bound(const proc_window_cfg_t *cfg, double p95);

/* Checkpointing, so a restart resumes the window exactly. encode writes the state to buf and
 * returns its length; when that exceeds cap it writes nothing and still returns the length needed
 * (call with cap 0 to size the buffer). The format is little-endian and versioned. decode builds a
 * new window for cfg from a checkpoint, or returns NULL with *err set: PROC_ECHECKPOINT when the
 * bytes are malformed or were written for a different kind, width, bucket/count number or sketch
 * range (the caller then starts an empty window); CM_EINVAL for a bad cfg. min_samples and late_ms
 * may change between encode and decode. */
size_t proc_window_encode(const proc_window_t *w, uint8_t *buf, size_t cap);
proc_window_t *proc_window_decode(const proc_window_cfg_t *cfg, const uint8_t *buf, size_t n, int *err);

/* Internal to services/processing (proc_detect.c encodes its states with them): little-endian
 * fixed-width fields, so checkpoints move between machines. */
void proc__put_u64(uint8_t *p, uint64_t v);
uint64_t proc__get_u64(const uint8_t *p);
void proc__put_f64(uint8_t *p, double v);
double proc__get_f64(const uint8_t *p);

#endif
