/* Anomaly detectors for one (device, metric): pure functions over window statistics or over the
 * point stream, with small fixed-size states the caller embeds (no allocation here).
 *
 *  - z-score (the seed): score = min(|x - mean| / stddev / 3, 1) against the window's
 *    statistics BEFORE x is added, and only once the window holds min_samples points. stddev is the
 *    window's population stddev (proc_window.h). When stddev == 0 the ratio is undefined: the score
 *    is 0 if x equals the mean and 1 otherwise, because any change from a perfectly steady signal is
 *    as surprising as a signal can get. score > PROC_ZSCORE_ALERT alerts, > PROC_ZSCORE_HIGH is high
 *    severity (|x - mean| beyond 2.4 and 2.7 standard deviations).
 *  - stuck: the value stays within `epsilon` (0: exactly equal) of the value that began the run for
 *    at least duration_ms of event time -> firing; the first point outside resolves it and starts a
 *    new run. Comparing with the run's first value, not the previous one, keeps a slow drift of
 *    sub-epsilon steps from passing as stuck.
 *  - rate: |dv/dt| per second between consecutive points above limit_per_s -> firing; the next
 *    rate at or below the limit resolves it.
 *  - absence: no point for at least duration_ms -> firing, checked when the caller ticks it with its
 *    clock; the next point resolves it.
 *
 * Stream detectors expect points in event-time order per (device, metric), as the consumer delivers
 * them; a point not newer than the last one seen leaves the state unchanged (replays after a restart
 * are harmless). Every update returns the firing state after the point (1 firing, 0 not); the caller
 * turns a 0 -> 1 change into an alert and 1 -> 0 into a resolution.
 *
 * States are plain structs of fixed size: for the seed they add 72 bytes to the window's 936 (the
 * 1 KB budget per (device, metric)). Their _encode and _decode functions checkpoint them with the
 * window (little-endian, versioned by a leading tag byte); encode returns the length needed and
 * writes nothing when cap is smaller, decode returns 0 or PROC_ECHECKPOINT. */
#ifndef PROC_DETECT_H
#define PROC_DETECT_H

#include <stddef.h>
#include <stdint.h>

#include "proc_window.h"

#define PROC_ZSCORE_ALERT 0.8
#define PROC_ZSCORE_HIGH 0.9

typedef enum proc_level_e {
    PROC_LEVEL_NONE = 0,
    PROC_LEVEL_ALERT = 1,
    PROC_LEVEL_HIGH = 2
} proc_level_t;

/* ---- z-score --------------------------------------------------------------------------------- */

/* The score of x against st (which must not include x yet). */
double proc_zscore(const proc_stats_t *st, double x);
/* NONE, ALERT (score > PROC_ZSCORE_ALERT) or HIGH (score > PROC_ZSCORE_HIGH). */
proc_level_t proc_zscore_level(double score);
/* Scores x against w at t_ms, then adds it to w. 0 with *score set; PROC_ENOTENOUGH when w held fewer
 * than min_samples points (x is still added, *score is 0); PROC_ELATE when w dropped x as too late
 * (not scored); CM_EINVAL for a non-finite x. A late point within tolerance is scored against the
 * window as it stands at its event time, which may already hold later points. */
int proc_zscore_update(proc_window_t *w, int64_t t_ms, double x, double *score);

/* ---- stuck value ----------------------------------------------------------------------------- */

typedef struct proc_stuck_cfg_s {
    int64_t duration_ms;
    double epsilon;
} proc_stuck_cfg_t;

typedef struct proc_stuck_s {
    int64_t since_ms; /* event time of the run's first point */
    int64_t last_ms;
    double ref;       /* the run's first value */
    uint8_t has, firing;
} proc_stuck_t;

void proc_stuck_init(proc_stuck_t *s);
int proc_stuck_update(proc_stuck_t *s, const proc_stuck_cfg_t *cfg, int64_t t_ms, double v);
size_t proc_stuck_encode(const proc_stuck_t *s, uint8_t *buf, size_t cap);
int proc_stuck_decode(proc_stuck_t *s, const uint8_t *buf, size_t n);

/* ---- rate of change -------------------------------------------------------------------------- */

typedef struct proc_rate_cfg_s {
    double limit_per_s;
} proc_rate_cfg_t;

typedef struct proc_rate_s {
    int64_t last_ms;
    double last_v;
    uint8_t has, firing;
} proc_rate_t;

void proc_rate_init(proc_rate_t *s);
/* *rate (may be NULL) gets |dv/dt| per second, or 0 for the first point or an ignored one. */
int proc_rate_update(proc_rate_t *s, const proc_rate_cfg_t *cfg, int64_t t_ms, double v, double *rate);
size_t proc_rate_encode(const proc_rate_t *s, uint8_t *buf, size_t cap);
int proc_rate_decode(proc_rate_t *s, const uint8_t *buf, size_t n);

/* ---- absence --------------------------------------------------------------------------------- */

typedef struct proc_absence_cfg_s {
    int64_t duration_ms;
} proc_absence_cfg_t;

typedef struct proc_absence_s {
    int64_t last_ms; /* newest point, or the start time while none has arrived */
    uint8_t firing;
} proc_absence_t;

/* start_ms counts as the last sign of life, so a device that never reports still goes absent. */
void proc_absence_init(proc_absence_t *s, int64_t start_ms);
/* A point arrived: resolves. Returns 0. */
int proc_absence_update(proc_absence_t *s, int64_t t_ms);
/* Fires once now_ms - last >= duration_ms; returns the firing state. */
int proc_absence_tick(proc_absence_t *s, const proc_absence_cfg_t *cfg, int64_t now_ms);
size_t proc_absence_encode(const proc_absence_t *s, uint8_t *buf, size_t cap);
int proc_absence_decode(proc_absence_t *s, const uint8_t *buf, size_t n);

#endif
