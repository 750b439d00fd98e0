/* Metric registry and Prometheus text rendering. */
#include "cm_metrics.h"
#include "cm_alloc.h"
#include "cm_rpc_internal.h"

#include <dirent.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

/* Counters and gauges share one registry entry; a gauge keeps its double's bits in `v`. */
typedef struct cm__metric_s {
    char *name, *help, *labels;
    int is_gauge;
    _Atomic uint64_t v;
    struct cm__metric_s *next;
} cm__metric_t;

struct cm_counter_s {
    cm__metric_t m;
};
struct cm_gauge_s {
    cm__metric_t m;
};

static pthread_mutex_t cm__metrics_mu = PTHREAD_MUTEX_INITIALIZER;
static cm__metric_t *cm__metrics;
#define CM__MAX_SERVERS 8
static cm_server_t *cm__servers[CM__MAX_SERVERS];
#define CM__MAX_COLLECTORS 8
typedef struct cm__collector_s {
    cm_metrics_collector_fn fn;
    void *arg;
} cm__collector_t;
static cm__collector_t cm__collectors[CM__MAX_COLLECTORS];
/* Held while a collector runs, so that remove waits for a render in progress. */
static pthread_rwlock_t cm__collect_mu = PTHREAD_RWLOCK_INITIALIZER;

static int cm__same(const char *a, const char *b) {
    return strcmp(a ? a : "", b ? b : "") == 0;
}

/* Finds or registers name{labels} of one kind. */
static cm__metric_t *cm__metric(const char *name, const char *help, const char *labels, int is_gauge) {
    pthread_mutex_lock(&cm__metrics_mu);
    cm__metric_t *m;
    for (m = cm__metrics; m; m = m->next)
        if (m->is_gauge == is_gauge && cm__same(m->name, name) && cm__same(m->labels, labels)) break;
    if (!m) {
        /* Both wrappers are exactly a cm__metric_t, so one allocation size fits either. */
        m = cm_calloc(1, sizeof *m);
        m->name = cm_strdup(name);
        m->help = cm_strdup(help ? help : "");
        m->labels = cm_strdup(labels ? labels : "");
        m->is_gauge = is_gauge;
        /* Keep same-name entries adjacent so HELP/TYPE are printed once per family. */
        cm__metric_t **pp = &cm__metrics;
        while (*pp && !cm__same((*pp)->name, name)) pp = &(*pp)->next;
        while (*pp && cm__same((*pp)->name, name)) pp = &(*pp)->next;
        m->next = *pp;
        *pp = m;
    }
    pthread_mutex_unlock(&cm__metrics_mu);
    return m;
}

cm_counter_t *cm_metrics_counter(const char *name, const char *help, const char *labels) {
    return (cm_counter_t *)cm__metric(name, help, labels, 0);
}

void cm_counter_add(cm_counter_t *c, uint64_t n) { atomic_fetch_add_explicit(&c->m.v, n, memory_order_relaxed); }
uint64_t cm_counter_get(const cm_counter_t *c) {
    return atomic_load_explicit(&((cm_counter_t *)c)->m.v, memory_order_relaxed);
}

cm_gauge_t *cm_metrics_gauge(const char *name, const char *help, const char *labels) {
    return (cm_gauge_t *)cm__metric(name, help, labels, 1);
}

void cm_gauge_set(cm_gauge_t *g, double v) {
    uint64_t bits;
    memcpy(&bits, &v, sizeof bits);
    atomic_store_explicit(&g->m.v, bits, memory_order_relaxed);
}

void cm_metrics_add_server(cm_server_t *srv) {
    pthread_mutex_lock(&cm__metrics_mu);
    for (int i = 0; i < CM__MAX_SERVERS; i++)
        if (!cm__servers[i]) {
            cm__servers[i] = srv;
            break;
        }
    pthread_mutex_unlock(&cm__metrics_mu);
}

void cm_metrics_remove_server(cm_server_t *srv) {
    pthread_mutex_lock(&cm__metrics_mu);
    for (int i = 0; i < CM__MAX_SERVERS; i++)
        if (cm__servers[i] == srv) cm__servers[i] = NULL;
    pthread_mutex_unlock(&cm__metrics_mu);
}

static void cm__render_name(cm_buf_t *b, const char *name, const char *labels) {
    if (labels && *labels)
        cm_buf_printf(b, "%s{%s}", name, labels);
    else
        cm_buf_puts(b, name);
}

static void cm__render_rpc(cm_buf_t *b) {
    int header = 0;
    for (int s = 0; s < CM__MAX_SERVERS; s++) {
        cm_server_t *srv = cm__servers[s];
        if (!srv) continue;
        cm__method_reg_t *m;
        size_t n = cm__server_methods(srv, &m);
        if (!header) {
            cm_buf_puts(b, "# HELP grpc_server_handled_total Completed RPCs by method and status code.\n"
                           "# TYPE grpc_server_handled_total counter\n");
        }
        for (size_t i = 0; i < n; i++)
            for (int c = 0; c < CM_STATUS_COUNT; c++) {
                uint64_t v = atomic_load_explicit(&m[i].stats.codes[c], memory_order_relaxed);
                if (v)
                    cm_buf_printf(b, "grpc_server_handled_total{grpc_service=\"%s\",grpc_method=\"%s\",grpc_code=\"%s\"} %llu\n",
                                  m[i].svc_name, m[i].method_name, cm_status_name(c), (unsigned long long)v);
            }
        if (!header) {
            cm_buf_puts(b, "# HELP grpc_server_handling_seconds Time from call start to end, by method.\n"
                           "# TYPE grpc_server_handling_seconds histogram\n");
            header = 1;
        }
        for (size_t i = 0; i < n; i++) {
            /* One snapshot so that the buckets, the count and the sum agree with each other. */
            uint64_t bk[CM__LAT_BUCKETS + 1], total = 0;
            for (int k = 0; k <= CM__LAT_BUCKETS; k++)
                total += bk[k] = atomic_load_explicit(&m[i].stats.lat_buckets[k], memory_order_relaxed);
            if (!total) continue;
            uint64_t cum = 0;
            for (int k = 0; k <= CM__LAT_BUCKETS; k++) {
                cum += bk[k];
                if (k < CM__LAT_BUCKETS)
                    cm_buf_printf(b, "grpc_server_handling_seconds_bucket{grpc_service=\"%s\",grpc_method=\"%s\",le=\"%g\"} %llu\n",
                                  m[i].svc_name, m[i].method_name, cm__lat_bounds[k], (unsigned long long)cum);
                else
                    cm_buf_printf(b, "grpc_server_handling_seconds_bucket{grpc_service=\"%s\",grpc_method=\"%s\",le=\"+Inf\"} %llu\n",
                                  m[i].svc_name, m[i].method_name, (unsigned long long)cum);
            }
            cm_buf_printf(b, "grpc_server_handling_seconds_sum{grpc_service=\"%s\",grpc_method=\"%s\"} %.6f\n",
                          m[i].svc_name, m[i].method_name,
                          (double)atomic_load_explicit(&m[i].stats.lat_sum_ns, memory_order_relaxed) / 1e9);
            cm_buf_printf(b, "grpc_server_handling_seconds_count{grpc_service=\"%s\",grpc_method=\"%s\"} %llu\n",
                          m[i].svc_name, m[i].method_name, (unsigned long long)total);
        }
    }
}

static void cm__render_process(cm_buf_t *b) {
    long page = sysconf(_SC_PAGESIZE), ticks = sysconf(_SC_CLK_TCK);
    unsigned long utime = 0, stime = 0, vsize = 0;
    long rss = 0, threads = 0;
    FILE *f = fopen("/proc/self/stat", "r");
    if (f) {
        /* Fields after the command name (which may contain spaces) are read from the last ')'. */
        char line[1024];
        if (fgets(line, sizeof line, f)) {
            char *p = strrchr(line, ')');
            if (p)
                sscanf(p + 2, "%*c %*d %*d %*d %*d %*d %*u %*u %*u %*u %*u %lu %lu %*d %*d %*d %*d %ld %*d %*u %lu %ld",
                       &utime, &stime, &threads, &vsize, &rss);
        }
        fclose(f);
    }
    int fds = 0;
    DIR *d = opendir("/proc/self/fd");
    if (d) {
        struct dirent *e;
        while ((e = readdir(d)))
            if (e->d_name[0] != '.') fds++;
        closedir(d);
        fds--; /* the directory handle itself */
    }
    cm_buf_printf(b,
                  "# HELP process_resident_memory_bytes Resident memory size in bytes.\n"
                  "# TYPE process_resident_memory_bytes gauge\nprocess_resident_memory_bytes %ld\n"
                  "# HELP process_virtual_memory_bytes Virtual memory size in bytes.\n"
                  "# TYPE process_virtual_memory_bytes gauge\nprocess_virtual_memory_bytes %lu\n"
                  "# HELP process_open_fds Number of open file descriptors.\n"
                  "# TYPE process_open_fds gauge\nprocess_open_fds %d\n"
                  "# HELP process_threads Number of OS threads.\n"
                  "# TYPE process_threads gauge\nprocess_threads %ld\n"
                  "# HELP process_cpu_seconds_total Total user and system CPU time.\n"
                  "# TYPE process_cpu_seconds_total counter\nprocess_cpu_seconds_total %.2f\n",
                  rss * page, vsize, fds, threads, (double)(utime + stime) / (double)ticks);
}

int cm_metrics_add_collector(cm_metrics_collector_fn fn, void *arg) {
    int rc = -1;
    pthread_rwlock_wrlock(&cm__collect_mu);
    for (int i = 0; i < CM__MAX_COLLECTORS; i++) {
        if (!cm__collectors[i].fn) {
            cm__collectors[i] = (cm__collector_t){fn, arg};
            rc = 0;
            break;
        }
    }
    pthread_rwlock_unlock(&cm__collect_mu);
    return rc;
}

void cm_metrics_remove_collector(cm_metrics_collector_fn fn, void *arg) {
    pthread_rwlock_wrlock(&cm__collect_mu);
    for (int i = 0; i < CM__MAX_COLLECTORS; i++)
        if (cm__collectors[i].fn == fn && cm__collectors[i].arg == arg) cm__collectors[i] = (cm__collector_t){NULL, NULL};
    pthread_rwlock_unlock(&cm__collect_mu);
}

void cm_metrics_render(cm_buf_t *b) {
    pthread_mutex_lock(&cm__metrics_mu);
    const cm__metric_t *prev = NULL;
    for (const cm__metric_t *m = cm__metrics; m; m = m->next) {
        if (!prev || strcmp(prev->name, m->name) != 0)
            cm_buf_printf(b, "# HELP %s %s\n# TYPE %s %s\n", m->name, m->help, m->name, m->is_gauge ? "gauge" : "counter");
        prev = m;
        cm__render_name(b, m->name, m->labels);
        uint64_t v = atomic_load_explicit(&((cm__metric_t *)m)->v, memory_order_relaxed);
        if (m->is_gauge) {
            double d;
            memcpy(&d, &v, sizeof d);
            cm_buf_printf(b, " %.17g\n", d);
        } else {
            cm_buf_printf(b, " %llu\n", (unsigned long long)v);
        }
    }
    cm__render_rpc(b);
    pthread_mutex_unlock(&cm__metrics_mu);
    pthread_rwlock_rdlock(&cm__collect_mu);
    for (int i = 0; i < CM__MAX_COLLECTORS; i++)
        if (cm__collectors[i].fn) cm__collectors[i].fn(b, cm__collectors[i].arg);
    pthread_rwlock_unlock(&cm__collect_mu);
    cm__render_process(b);
}
