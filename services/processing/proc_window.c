/* Window statistics for one (device, metric); see proc_window.h for the model and its error bounds. */
#include "proc_window.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "cm_alloc.h"
#include "cm_err.h"

/* The header stays small on purpose: it is paid once per (device, metric), and the 1 KB budget is
 * shared with the detectors' states. The ring's arrays live in `store`, laid out by the accessors
 * below: doubles first (mean, M2, min, max per bucket, or the count window's values), then the
 * uint32 bucket counts, then the two sketch panes' uint16 cells. */
struct proc_window_s {
    int64_t width_ms;
    int64_t sub_ms;      /* one ring slot: width/buckets (sliding) or width (tumbling) */
    int64_t late_ms;
    int64_t newest_ms;   /* greatest event time accepted; meaningful when has_data */
    int64_t pane;        /* sketch pane (width-aligned) of newest_ms */
    int64_t dropped_late;
    double last;         /* value of the point at newest_ms (the later arrival on a tie) */
    double sk_lo;        /* sketch origin: sketch_min, or log(sketch_min) in log mode */
    double sk_scale;     /* cells per unit (or per log unit) */
    int32_t min_samples;
    uint16_t n;          /* ring slots, or points kept by a count window */
    uint16_t head, fill; /* count windows: next slot to write, points held */
    uint8_t kind, has_data, sk_log;
    double store[];
};

#define PROC__MAGIC0 'P'
#define PROC__MAGIC1 'W'
#define PROC__VERSION 1

/* ---- errors, little-endian fields ------------------------------------------------------------ */

const char *proc_strerror(int err) {
    switch (err) {
#define PROC__ERR_CASE(name, msg) \
    case PROC_E##name: return msg;
        PROC_ERRNO_MAP(PROC__ERR_CASE)
#undef PROC__ERR_CASE
    }
    return cm_strerror(err);
}

void proc__put_u64(uint8_t *p, uint64_t v) {
    for (int i = 0; i < 8; i++) p[i] = (uint8_t)(v >> (8 * i));
}

uint64_t proc__get_u64(const uint8_t *p) {
    uint64_t v = 0;
    for (int i = 0; i < 8; i++) v |= (uint64_t)p[i] << (8 * i);
    return v;
}

void proc__put_f64(uint8_t *p, double v) {
    uint64_t u;
    memcpy(&u, &v, sizeof u);
    proc__put_u64(p, u);
}

double proc__get_f64(const uint8_t *p) {
    uint64_t u = proc__get_u64(p);
    double v;
    memcpy(&v, &u, sizeof v);
    return v;
}

/* ---- layout helpers -------------------------------------------------------------------------- */

static int is_time(const proc_window_t *w) {
    return w->kind != PROC_WIN_COUNT;
}

static double *b_mean(proc_window_t *w) { return w->store; }
static double *b_m2(proc_window_t *w) { return w->store + w->n; }
static double *b_min(proc_window_t *w) { return w->store + 2 * w->n; }
static double *b_max(proc_window_t *w) { return w->store + 3 * w->n; }
static uint32_t *b_cnt(proc_window_t *w) { return (uint32_t *)(void *)(w->store + 4 * w->n); }
static uint16_t *sk_cells(proc_window_t *w) { return (uint16_t *)(void *)(b_cnt(w) + w->n); }

/* The const twins keep proc_window_stats() honest about not touching the window. */
#define CW(w) ((proc_window_t *)(uintptr_t)(w))

static size_t store_bytes(proc_win_kind_t kind, int n) {
    if (kind == PROC_WIN_COUNT) return (size_t)n * sizeof(double);
    return (size_t)n * (4 * sizeof(double) + sizeof(uint32_t)) + 2 * PROC_SKETCH_CELLS * sizeof(uint16_t);
}

/* Floor division and modulo, so event times before 1970 (or test fixtures at 0) land right. */
static int64_t floor_div(int64_t a, int64_t b) {
    int64_t q = a / b;
    if ((a % b != 0) && (a < 0)) q--;
    return q;
}

static int slot_of(const proc_window_t *w, int64_t epoch) {
    int64_t m = epoch % w->n;
    return (int)(m < 0 ? m + w->n : m);
}

/* ---- configuration --------------------------------------------------------------------------- */

void proc_window_cfg_seed(proc_window_cfg_t *cfg) {
    memset(cfg, 0, sizeof *cfg);
    cfg->kind = PROC_WIN_SLIDING;
    cfg->width_ms = 5 * 60 * 1000;
    cfg->buckets = 20;
    cfg->late_ms = 30 * 1000;
    cfg->min_samples = 10;
    cfg->sketch_min = -50;
    cfg->sketch_max = 150;
}

static int ring_slots(const proc_window_cfg_t *cfg) {
    if (cfg->kind == PROC_WIN_COUNT) return cfg->count;
    if (cfg->kind == PROC_WIN_TUMBLING && cfg->buckets == 0) return 2;
    return cfg->buckets;
}

int proc_window_cfg_check(const proc_window_cfg_t *cfg) {
    if (!cfg || cfg->late_ms < 0 || cfg->min_samples < 0) return CM_EINVAL;
    switch (cfg->kind) {
    case PROC_WIN_COUNT:
        return cfg->count >= 1 && cfg->count <= PROC_WINDOW_MAX_COUNT ? 0 : CM_EINVAL;
    case PROC_WIN_SLIDING:
    case PROC_WIN_TUMBLING: {
        int n = ring_slots(cfg);
        int min_n = cfg->kind == PROC_WIN_SLIDING ? 1 : 2;
        if (cfg->width_ms <= 0 || n < min_n || n > PROC_WINDOW_MAX_BUCKETS) return CM_EINVAL;
        if (cfg->kind == PROC_WIN_SLIDING && cfg->width_ms % n != 0) return CM_EINVAL;
        if (!isfinite(cfg->sketch_min) || !isfinite(cfg->sketch_max) || !(cfg->sketch_min < cfg->sketch_max))
            return CM_EINVAL;
        return 0;
    }
    }
    return CM_EINVAL;
}

double proc_window_p95_bound(const proc_window_cfg_t *cfg, double p95) {
    if (cfg->kind == PROC_WIN_COUNT) return 0;
    if (cfg->sketch_min > 0) {
        double g = pow(cfg->sketch_max / cfg->sketch_min, 1.0 / PROC_SKETCH_CELLS);
        return fabs(p95) * (sqrt(g) - 1);
    }
    return (cfg->sketch_max - cfg->sketch_min) / (2.0 * PROC_SKETCH_CELLS);
}

/* ---- lifecycle ------------------------------------------------------------------------------- */

proc_window_t *proc_window_new(const proc_window_cfg_t *cfg, int *err) {
    int rc = proc_window_cfg_check(cfg);
    if (rc != 0) {
        if (err) *err = rc;
        return NULL;
    }
    int n = ring_slots(cfg);
    /* calloc: an all-zero ring is an empty ring (count 0 in every bucket and cell). */
    proc_window_t *w = cm_calloc(1, sizeof *w + store_bytes(cfg->kind, n));
    w->kind = (uint8_t)cfg->kind;
    w->n = (uint16_t)n;
    w->late_ms = cfg->late_ms;
    w->min_samples = cfg->min_samples;
    if (cfg->kind != PROC_WIN_COUNT) {
        w->width_ms = cfg->width_ms;
        w->sub_ms = cfg->kind == PROC_WIN_SLIDING ? cfg->width_ms / n : cfg->width_ms;
        w->sk_log = cfg->sketch_min > 0;
        if (w->sk_log) {
            w->sk_lo = log(cfg->sketch_min);
            w->sk_scale = PROC_SKETCH_CELLS / (log(cfg->sketch_max) - w->sk_lo);
        } else {
            w->sk_lo = cfg->sketch_min;
            w->sk_scale = PROC_SKETCH_CELLS / (cfg->sketch_max - cfg->sketch_min);
        }
    }
    if (err) *err = 0;
    return w;
}

void proc_window_free(proc_window_t *w) {
    cm_free(w);
}

size_t proc_window_memory(const proc_window_t *w) {
    return sizeof *w + store_bytes((proc_win_kind_t)w->kind, w->n);
}

/* ---- adding points --------------------------------------------------------------------------- */

static void bucket_clear(proc_window_t *w, int s) {
    b_cnt(w)[s] = 0;
    b_mean(w)[s] = b_m2(w)[s] = b_min(w)[s] = b_max(w)[s] = 0;
}

/* Welford's update: stable where sum / sum-of-squares would cancel. */
static void bucket_add(proc_window_t *w, int s, double v) {
    uint32_t *cnt = b_cnt(w);
    double *mean = b_mean(w), *m2 = b_m2(w);
    if (cnt[s] == 0) {
        b_min(w)[s] = b_max(w)[s] = v;
    } else {
        if (v < b_min(w)[s]) b_min(w)[s] = v;
        if (v > b_max(w)[s]) b_max(w)[s] = v;
    }
    cnt[s]++;
    double d = v - mean[s];
    mean[s] += d / cnt[s];
    m2[s] += d * (v - mean[s]);
}

static int sk_cell(const proc_window_t *w, double v) {
    double x;
    if (w->sk_log) {
        if (v <= 0) return 0;
        x = (log(v) - w->sk_lo) * w->sk_scale;
    } else {
        x = (v - w->sk_lo) * w->sk_scale;
    }
    if (!(x >= 0)) return 0;
    if (x >= PROC_SKETCH_CELLS) return PROC_SKETCH_CELLS - 1;
    return (int)x;
}

/* Lower edge of cell i (i may be PROC_SKETCH_CELLS: the upper edge of the range). */
static double sk_edge(const proc_window_t *w, int i) {
    double x = w->sk_lo + i / w->sk_scale;
    return w->sk_log ? exp(x) : x;
}

static void sk_add(proc_window_t *w, int64_t pane, double v) {
    uint16_t *cells = sk_cells(w);
    uint16_t *c = &cells[(pane & 1) * PROC_SKETCH_CELLS + sk_cell(w, v)];
    if (*c == UINT16_MAX) {
        /* Halve both panes alike so their relative weights, and thus the ranks, stay comparable;
         * rounding up keeps rare tail values from vanishing. */
        for (int i = 0; i < 2 * PROC_SKETCH_CELLS; i++) cells[i] = (uint16_t)((cells[i] + 1) / 2);
    }
    (*c)++;
}

/* Moves the newest time to t (> newest_ms): ring slots whose period is passing are emptied for
 * reuse, and so is a sketch pane. Doing it here, not lazily, keeps the invariant that the ring
 * holds exactly the `n` periods ending at newest_ms, so slots need no stored timestamps. */
static void advance(proc_window_t *w, int64_t t) {
    int64_t ne = floor_div(w->newest_ms, w->sub_ms), e = floor_div(t, w->sub_ms);
    if (e - ne >= w->n) {
        for (int s = 0; s < w->n; s++) bucket_clear(w, s);
    } else {
        for (int64_t k = ne + 1; k <= e; k++) bucket_clear(w, slot_of(w, k));
    }
    int64_t p = floor_div(t, w->width_ms);
    uint16_t *cells = sk_cells(w);
    if (p - w->pane >= 2) {
        memset(cells, 0, 2 * PROC_SKETCH_CELLS * sizeof *cells);
    } else if (p > w->pane) {
        memset(cells + (p & 1) * PROC_SKETCH_CELLS, 0, PROC_SKETCH_CELLS * sizeof *cells);
    }
    w->pane = p;
    w->newest_ms = t;
}

static int drop_late(proc_window_t *w) {
    w->dropped_late++;
    return PROC_ELATE;
}

int proc_window_add(proc_window_t *w, int64_t t, double v) {
    if (!isfinite(v)) return CM_EINVAL;
    /* Unsigned difference: newest - late_ms must not overflow for extreme timestamps. */
    if (w->has_data && t < w->newest_ms && (uint64_t)w->newest_ms - (uint64_t)t > (uint64_t)w->late_ms)
        return drop_late(w);

    if (!is_time(w)) {
        w->store[w->head] = v;
        w->head = (uint16_t)((w->head + 1) % w->n);
        if (w->fill < w->n) w->fill++;
        if (!w->has_data || t >= w->newest_ms) {
            w->newest_ms = t;
            w->last = v;
        }
        w->has_data = 1;
        return 0;
    }

    if (!w->has_data) {
        w->newest_ms = t;
        w->pane = floor_div(t, w->width_ms);
        w->has_data = 1;
    } else if (t > w->newest_ms) {
        advance(w, t);
    }
    int64_t e = floor_div(t, w->sub_ms), ne = floor_div(w->newest_ms, w->sub_ms);
    if (e <= ne - w->n) return drop_late(w); /* its period already left the ring */
    bucket_add(w, slot_of(w, e), v);
    int64_t p = floor_div(t, w->width_ms);
    if (p >= w->pane - 1) sk_add(w, p, v); /* older panes are gone; the ring still counts it */
    if (t == w->newest_ms) w->last = v;
    return 0;
}

/* ---- statistics ------------------------------------------------------------------------------ */

typedef struct acc_s {
    int64_t n;
    double mean, m2, min, max;
} acc_t;

/* Chan et al.'s pairwise merge of (n, mean, M2): exact in exact arithmetic, stable in floating point. */
static void acc_merge(acc_t *a, int64_t n, double mean, double m2, double mn, double mx) {
    if (n == 0) return;
    if (a->n == 0) {
        *a = (acc_t){n, mean, m2, mn, mx};
        return;
    }
    int64_t tot = a->n + n;
    double d = mean - a->mean;
    a->mean += d * (double)n / (double)tot;
    a->m2 += m2 + d * d * (double)a->n * (double)n / (double)tot;
    if (mn < a->min) a->min = mn;
    if (mx > a->max) a->max = mx;
    a->n = tot;
}

static int64_t nearest_rank(int64_t n) {
    return (n * 95 + 99) / 100; /* ceil(0.95 n), 1-based */
}

static double sketch_p95(const proc_window_t *w, int64_t from, int64_t to, double mn, double mx) {
    uint32_t sum[PROC_SKETCH_CELLS] = {0};
    uint64_t total = 0;
    const uint16_t *cells = sk_cells(CW(w));
    for (int64_t p = w->pane - 1; p <= w->pane; p++) {
        int64_t p_from = p * w->width_ms, p_to = p_from + w->width_ms - 1;
        if (p_to < from || p_from > to) continue;
        for (int i = 0; i < PROC_SKETCH_CELLS; i++) {
            sum[i] += cells[(p & 1) * PROC_SKETCH_CELLS + i];
            total += cells[(p & 1) * PROC_SKETCH_CELLS + i];
        }
    }
    if (total == 0) return mx;
    uint64_t r = (uint64_t)nearest_rank((int64_t)total), cum = 0;
    int i = 0;
    for (; i < PROC_SKETCH_CELLS - 1; i++) {
        cum += sum[i];
        if (cum >= r) break;
    }
    /* The end cells also hold the values clamped into them, so they are open-ended; the window's
     * exact min and max then bound them, and narrow every other cell too. */
    double a = i == 0 ? mn : sk_edge(w, i), b = i == PROC_SKETCH_CELLS - 1 ? mx : sk_edge(w, i + 1);
    if (a < mn) a = mn;
    if (b > mx) b = mx;
    if (a > b) return a > mx ? mx : mn; /* sketch panes saw other points than the window */
    if (w->sk_log && a > 0) return sqrt(a * b);
    return a + (b - a) / 2;
}

static int cmp_double(const void *pa, const void *pb) {
    double a = *(const double *)pa, b = *(const double *)pb;
    return (a > b) - (a < b);
}

static void count_stats(const proc_window_t *w, proc_stats_t *out) {
    double v[PROC_WINDOW_MAX_COUNT];
    int n = w->fill;
    for (int i = 0; i < n; i++) v[i] = w->store[(w->head - n + i + w->n) % w->n];
    if (n == 0) return;
    double sum = 0, mn = v[0], mx = v[0];
    for (int i = 0; i < n; i++) {
        sum += v[i];
        if (v[i] < mn) mn = v[i];
        if (v[i] > mx) mx = v[i];
    }
    double mean = sum / n, m2 = 0;
    for (int i = 0; i < n; i++) m2 += (v[i] - mean) * (v[i] - mean);
    qsort(v, (size_t)n, sizeof v[0], cmp_double);
    out->count = n;
    out->mean = mean;
    out->min = mn;
    out->max = mx;
    out->stddev = sqrt(m2 / n);
    out->p95 = v[nearest_rank(n) - 1];
    out->last = w->last;
    out->from_ms = out->to_ms = w->newest_ms;
}

int proc_window_stats(const proc_window_t *w, int64_t now, proc_stats_t *out) {
    memset(out, 0, sizeof *out);
    out->dropped_late = w->dropped_late;
    if (!is_time(w)) {
        count_stats(w, out);
    } else {
        int64_t first, last;
        if (w->kind == PROC_WIN_SLIDING) {
            last = floor_div(now, w->sub_ms);
            first = last - w->n + 1;
            out->from_ms = first * w->sub_ms;
            out->to_ms = now;
        } else {
            first = last = floor_div(now, w->sub_ms) - 1; /* the last closed window */
            out->from_ms = first * w->sub_ms;
            out->to_ms = out->from_ms + w->sub_ms - 1;
        }
        acc_t a = {0, 0, 0, 0, 0};
        if (w->has_data) {
            int64_t ne = floor_div(w->newest_ms, w->sub_ms);
            if (first < ne - w->n + 1) first = ne - w->n + 1;
            if (last > ne) last = ne;
            proc_window_t *m = CW(w);
            for (int64_t e = first; e <= last; e++) {
                int s = slot_of(w, e);
                acc_merge(&a, b_cnt(m)[s], b_mean(m)[s], b_m2(m)[s], b_min(m)[s], b_max(m)[s]);
            }
        }
        if (a.n > 0) {
            out->count = a.n;
            out->mean = a.mean;
            out->min = a.min;
            out->max = a.max;
            out->stddev = sqrt(a.m2 / (double)a.n);
            out->last = w->last;
            out->p95 = sketch_p95(w, out->from_ms, out->to_ms, a.min, a.max);
        }
    }
    return out->count == 0 || out->count < w->min_samples ? PROC_ENOTENOUGH : 0;
}

/* ---- checkpoints ----------------------------------------------------------------------------- */

#define HDR_BYTES 32  /* magic, version, kind, n, width, sketch origin and scale */
#define STATE_BYTES 56 /* has_data, newest, pane, last, dropped, head, fill */

static size_t encoded_size(proc_win_kind_t kind, int n) {
    size_t body = kind == PROC_WIN_COUNT ? (size_t)n * 8
                                         : (size_t)n * (4 * 8 + 4) + 2 * PROC_SKETCH_CELLS * 2;
    return HDR_BYTES + STATE_BYTES + body;
}

size_t proc_window_encode(const proc_window_t *w, uint8_t *buf, size_t cap) {
    size_t need = encoded_size((proc_win_kind_t)w->kind, w->n);
    if (cap < need) return need;
    proc_window_t *m = CW(w);
    uint8_t *p = buf;
    memset(p, 0, 8);
    p[0] = PROC__MAGIC0;
    p[1] = PROC__MAGIC1;
    p[2] = PROC__VERSION;
    p[3] = w->kind;
    p[4] = (uint8_t)(w->n & 0xff);
    p[5] = (uint8_t)(w->n >> 8);
    proc__put_u64(p + 8, (uint64_t)w->width_ms);
    proc__put_f64(p + 16, w->sk_lo);
    proc__put_f64(p + 24, w->sk_scale);
    p += HDR_BYTES;
    proc__put_u64(p, w->has_data);
    proc__put_u64(p + 8, (uint64_t)w->newest_ms);
    proc__put_u64(p + 16, (uint64_t)w->pane);
    proc__put_f64(p + 24, w->last);
    proc__put_u64(p + 32, (uint64_t)w->dropped_late);
    proc__put_u64(p + 40, w->head);
    proc__put_u64(p + 48, w->fill);
    p += STATE_BYTES;
    if (!is_time(w)) {
        for (int i = 0; i < w->n; i++, p += 8) proc__put_f64(p, w->store[i]);
        return need;
    }
    for (int i = 0; i < 4 * w->n; i++, p += 8) proc__put_f64(p, w->store[i]);
    for (int i = 0; i < w->n; i++, p += 4) {
        uint32_t c = b_cnt(m)[i];
        for (int k = 0; k < 4; k++) p[k] = (uint8_t)(c >> (8 * k));
    }
    for (int i = 0; i < 2 * PROC_SKETCH_CELLS; i++, p += 2) {
        uint16_t c = sk_cells(m)[i];
        p[0] = (uint8_t)(c & 0xff);
        p[1] = (uint8_t)(c >> 8);
    }
    return need;
}

static proc_window_t *decode_fail(proc_window_t *w, int *err) {
    proc_window_free(w);
    if (err) *err = PROC_ECHECKPOINT;
    return NULL;
}

proc_window_t *proc_window_decode(const proc_window_cfg_t *cfg, const uint8_t *buf, size_t n, int *err) {
    proc_window_t *w = proc_window_new(cfg, err);
    if (!w) return NULL;
    const uint8_t *p = buf;
    if (n != encoded_size((proc_win_kind_t)w->kind, w->n)) return decode_fail(w, err);
    /* Bitwise comparison of the sketch parameters: both sides computed them from the same cfg
     * values the same way, and any other range would misread every cell. */
    uint64_t lo_bits, scale_bits;
    memcpy(&lo_bits, &w->sk_lo, 8);
    memcpy(&scale_bits, &w->sk_scale, 8);
    if (p[0] != PROC__MAGIC0 || p[1] != PROC__MAGIC1 || p[2] != PROC__VERSION || p[3] != w->kind ||
        (p[4] | (p[5] << 8)) != w->n || proc__get_u64(p + 8) != (uint64_t)w->width_ms ||
        proc__get_u64(p + 16) != lo_bits || proc__get_u64(p + 24) != scale_bits)
        return decode_fail(w, err);
    p += HDR_BYTES;
    uint64_t has = proc__get_u64(p), head = proc__get_u64(p + 40), fill = proc__get_u64(p + 48);
    if (has > 1 || head >= w->n || fill > w->n) return decode_fail(w, err);
    w->has_data = (uint8_t)has;
    w->newest_ms = (int64_t)proc__get_u64(p + 8);
    w->pane = (int64_t)proc__get_u64(p + 16);
    w->last = proc__get_f64(p + 24);
    w->dropped_late = (int64_t)proc__get_u64(p + 32);
    w->head = (uint16_t)head;
    w->fill = (uint16_t)fill;
    p += STATE_BYTES;
    if (!is_time(w)) {
        for (int i = 0; i < w->n; i++, p += 8) w->store[i] = proc__get_f64(p);
        return w;
    }
    for (int i = 0; i < 4 * w->n; i++, p += 8) w->store[i] = proc__get_f64(p);
    for (int i = 0; i < w->n; i++, p += 4)
        b_cnt(w)[i] = (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
    for (int i = 0; i < 2 * PROC_SKETCH_CELLS; i++, p += 2) sk_cells(w)[i] = (uint16_t)(p[0] | p[1] << 8);
    return w;
}
