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

struct cm_counter_s {
    char *name, *help, *labels;
    _Atomic uint64_t v;
    cm_counter_t *next;
};

struct cm_gauge_s {
    char *name, *help, *labels;
    _Atomic uint64_t bits; /* double stored as bits for atomic access */
    cm_gauge_t *next;
};

static pthread_mutex_t cm__metrics_mu = PTHREAD_MUTEX_INITIALIZER;
static cm_counter_t *cm__counters;
static cm_gauge_t *cm__gauges;
#define CM__MAX_SERVERS 8
static cm_server_t *cm__servers[CM__MAX_SERVERS];

static int cm__same(const char *a, const char *b) {
    return strcmp(a ? a : "", b ? b : "") == 0;
}

cm_counter_t *cm_metrics_counter(const char *name, const char *help, const char *labels) {
    pthread_mutex_lock(&cm__metrics_mu);
    cm_counter_t *c;
    for (c = cm__counters; c; c = c->next)
        if (cm__same(c->name, name) && cm__same(c->labels, labels)) break;
    if (!c) {
        c = cm_calloc(1, sizeof *c);
        c->name = cm_strdup(name);
        c->help = cm_strdup(help ? help : "");
        c->labels = cm_strdup(labels ? labels : "");
        /* Keep same-name entries adjacent so HELP/TYPE are printed once per family. */
        cm_counter_t **pp = &cm__counters;
        while (*pp && !cm__same((*pp)->name, name)) pp = &(*pp)->next;
        while (*pp && cm__same((*pp)->name, name)) pp = &(*pp)->next;
        c->next = *pp;
        *pp = c;
    }
    pthread_mutex_unlock(&cm__metrics_mu);
    return c;
}

void cm_counter_add(cm_counter_t *c, uint64_t n) { atomic_fetch_add_explicit(&c->v, n, memory_order_relaxed); }
uint64_t cm_counter_get(const cm_counter_t *c) { return atomic_load_explicit(&((cm_counter_t *)c)->v, memory_order_relaxed); }

cm_gauge_t *cm_metrics_gauge(const char *name, const char *help, const char *labels) {
    pthread_mutex_lock(&cm__metrics_mu);
    cm_gauge_t *g;
    for (g = cm__gauges; g; g = g->next)
        if (cm__same(g->name, name) && cm__same(g->labels, labels)) break;
    if (!g) {
        g = cm_calloc(1, sizeof *g);
        g->name = cm_strdup(name);
        g->help = cm_strdup(help ? help : "");
        g->labels = cm_strdup(labels ? labels : "");
        cm_gauge_t **pp = &cm__gauges;
        while (*pp && !cm__same((*pp)->name, name)) pp = &(*pp)->next;
        while (*pp && cm__same((*pp)->name, name)) pp = &(*pp)->next;
        g->next = *pp;
        *pp = g;
    }
    pthread_mutex_unlock(&cm__metrics_mu);
    return g;
}

void cm_gauge_set(cm_gauge_t *g, double v) {
    uint64_t bits;
    memcpy(&bits, &v, sizeof bits);
    atomic_store_explicit(&g->bits, bits, memory_order_relaxed);
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

void cm_metrics_render(cm_buf_t *b) {
    pthread_mutex_lock(&cm__metrics_mu);
    const char *last = NULL;
    for (cm_counter_t *c = cm__counters; c; c = c->next) {
        if (!last || strcmp(last, c->name) != 0)
            cm_buf_printf(b, "# HELP %s %s\n# TYPE %s counter\n", c->name, c->help, c->name);
        last = c->name;
        cm__render_name(b, c->name, c->labels);
        cm_buf_printf(b, " %llu\n", (unsigned long long)cm_counter_get(c));
    }
    last = NULL;
    for (cm_gauge_t *g = cm__gauges; g; g = g->next) {
        if (!last || strcmp(last, g->name) != 0)
            cm_buf_printf(b, "# HELP %s %s\n# TYPE %s gauge\n", g->name, g->help, g->name);
        last = g->name;
        uint64_t bits = atomic_load_explicit(&g->bits, memory_order_relaxed);
        double v;
        memcpy(&v, &bits, sizeof v);
        cm__render_name(b, g->name, g->labels);
        cm_buf_printf(b, " %.17g\n", v);
    }
    cm__render_rpc(b);
    pthread_mutex_unlock(&cm__metrics_mu);
    cm__render_process(b);
}
