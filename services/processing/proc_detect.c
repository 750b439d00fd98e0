/* Anomaly detectors; see proc_detect.h for their semantics. */
#include "proc_detect.h"

#include <math.h>
#include <string.h>

#include "cm_err.h"

/* Leading tag byte of each detector checkpoint: kind in the high nibble, format version in the low. */
#define TAG_STUCK 0x11
#define TAG_RATE 0x21
#define TAG_ABSENCE 0x31

/* ---- z-score --------------------------------------------------------------------------------- */

double proc_zscore(const proc_stats_t *st, double x) {
    double d = fabs(x - st->mean);
    if (!(st->stddev > 0)) return d == 0 ? 0 : 1;
    double z = d / st->stddev / 3;
    return z < 1 ? z : 1;
}

proc_level_t proc_zscore_level(double score) {
    if (score > PROC_ZSCORE_HIGH) return PROC_LEVEL_HIGH;
    if (score > PROC_ZSCORE_ALERT) return PROC_LEVEL_ALERT;
    return PROC_LEVEL_NONE;
}

int proc_zscore_update(proc_window_t *w, int64_t t_ms, double x, double *score) {
    proc_stats_t st;
    *score = 0;
    if (!isfinite(x)) return CM_EINVAL;
    /* Stats first: a point must not dilute the very baseline it is judged against. */
    int enough = proc_window_stats(w, t_ms, &st);
    int rc = proc_window_add(w, t_ms, x);
    if (rc != 0) return rc;
    if (enough != 0) return enough;
    *score = proc_zscore(&st, x);
    return 0;
}

/* ---- stuck value ----------------------------------------------------------------------------- */

void proc_stuck_init(proc_stuck_t *s) {
    memset(s, 0, sizeof *s);
}

int proc_stuck_update(proc_stuck_t *s, const proc_stuck_cfg_t *cfg, int64_t t_ms, double v) {
    if (s->has && t_ms <= s->last_ms) return s->firing;
    if (!s->has || !(fabs(v - s->ref) <= cfg->epsilon)) {
        s->has = 1;
        s->ref = v;
        s->since_ms = t_ms;
        s->firing = 0;
    } else if (t_ms - s->since_ms >= cfg->duration_ms) {
        s->firing = 1;
    }
    s->last_ms = t_ms;
    return s->firing;
}

size_t proc_stuck_encode(const proc_stuck_t *s, uint8_t *buf, size_t cap) {
    if (cap < 27) return 27;
    buf[0] = TAG_STUCK;
    proc__put_u64(buf + 1, (uint64_t)s->since_ms);
    proc__put_u64(buf + 9, (uint64_t)s->last_ms);
    proc__put_f64(buf + 17, s->ref);
    buf[25] = s->has;
    buf[26] = s->firing;
    return 27;
}

int proc_stuck_decode(proc_stuck_t *s, const uint8_t *buf, size_t n) {
    if (n != 27 || buf[0] != TAG_STUCK || buf[25] > 1 || buf[26] > 1) return PROC_ECHECKPOINT;
    s->since_ms = (int64_t)proc__get_u64(buf + 1);
    s->last_ms = (int64_t)proc__get_u64(buf + 9);
    s->ref = proc__get_f64(buf + 17);
    s->has = buf[25];
    s->firing = buf[26];
    return 0;
}

/* ---- rate of change -------------------------------------------------------------------------- */

void proc_rate_init(proc_rate_t *s) {
    memset(s, 0, sizeof *s);
}

int proc_rate_update(proc_rate_t *s, const proc_rate_cfg_t *cfg, int64_t t_ms, double v, double *rate) {
    if (rate) *rate = 0;
    /* A repeated timestamp has no defined rate (dt = 0); it is ignored like any replayed point. */
    if (s->has && t_ms <= s->last_ms) return s->firing;
    if (s->has) {
        double r = fabs(v - s->last_v) / ((double)(t_ms - s->last_ms) / 1000.0);
        s->firing = r > cfg->limit_per_s;
        if (rate) *rate = r;
    }
    s->has = 1;
    s->last_ms = t_ms;
    s->last_v = v;
    return s->firing;
}

size_t proc_rate_encode(const proc_rate_t *s, uint8_t *buf, size_t cap) {
    if (cap < 19) return 19;
    buf[0] = TAG_RATE;
    proc__put_u64(buf + 1, (uint64_t)s->last_ms);
    proc__put_f64(buf + 9, s->last_v);
    buf[17] = s->has;
    buf[18] = s->firing;
    return 19;
}

int proc_rate_decode(proc_rate_t *s, const uint8_t *buf, size_t n) {
    if (n != 19 || buf[0] != TAG_RATE || buf[17] > 1 || buf[18] > 1) return PROC_ECHECKPOINT;
    s->last_ms = (int64_t)proc__get_u64(buf + 1);
    s->last_v = proc__get_f64(buf + 9);
    s->has = buf[17];
    s->firing = buf[18];
    return 0;
}

/* ---- absence --------------------------------------------------------------------------------- */

void proc_absence_init(proc_absence_t *s, int64_t start_ms) {
    memset(s, 0, sizeof *s);
    s->last_ms = start_ms;
}

int proc_absence_update(proc_absence_t *s, int64_t t_ms) {
    /* Any point is a sign of life, but an old one (a replay) must not move the clock back. */
    if (t_ms > s->last_ms) s->last_ms = t_ms;
    s->firing = 0;
    return 0;
}

int proc_absence_tick(proc_absence_t *s, const proc_absence_cfg_t *cfg, int64_t now_ms) {
    if (now_ms - s->last_ms >= cfg->duration_ms) s->firing = 1;
    return s->firing;
}

size_t proc_absence_encode(const proc_absence_t *s, uint8_t *buf, size_t cap) {
    if (cap < 10) return 10;
    buf[0] = TAG_ABSENCE;
    proc__put_u64(buf + 1, (uint64_t)s->last_ms);
    buf[9] = s->firing;
    return 10;
}

int proc_absence_decode(proc_absence_t *s, const uint8_t *buf, size_t n) {
    if (n != 10 || buf[0] != TAG_ABSENCE || buf[9] > 1) return PROC_ECHECKPOINT;
    s->last_ms = (int64_t)proc__get_u64(buf + 1);
    s->firing = buf[9];
    return 0;
}
