/* Prometheus metrics: a process-wide registry rendered in the text exposition format.
 *
 * Counters and gauges are registered once (at start) and updated lock-free. gRPC servers added with
 * cm_metrics_add_server() contribute grpc_server_handled_total{grpc_service,grpc_method,grpc_code}
 * and the grpc_server_handling_seconds histogram; process metrics (RSS, open fds, threads, CPU)
 * are read from /proc at scrape time. Registered handles live until exit. */
#ifndef CM_METRICS_H
#define CM_METRICS_H

#include <stdint.h>

#include "cm_buf.h"
#include "cm_rpc.h"

typedef struct cm_counter_s cm_counter_t;
typedef struct cm_gauge_s cm_gauge_t;

/* labels: preformatted, e.g. "shard=\"3\"", or NULL. Same name+labels returns the same handle. */
cm_counter_t *cm_metrics_counter(const char *name, const char *help, const char *labels);
void cm_counter_add(cm_counter_t *c, uint64_t n);
uint64_t cm_counter_get(const cm_counter_t *c);
cm_gauge_t *cm_metrics_gauge(const char *name, const char *help, const char *labels);
void cm_gauge_set(cm_gauge_t *g, double v);

void cm_metrics_add_server(cm_server_t *srv);
void cm_metrics_remove_server(cm_server_t *srv);
/* A collector appends whole metric families (HELP, TYPE and samples) at render time, for series
 * that come and go (per-rule metrics): fn runs without the registry lock held and must be thread
 * safe. At most 8 collectors; remove one before what arg points at is freed. */
typedef void (*cm_metrics_collector_fn)(cm_buf_t *b, void *arg);
int cm_metrics_add_collector(cm_metrics_collector_fn fn, void *arg);
void cm_metrics_remove_collector(cm_metrics_collector_fn fn, void *arg);
/* Appends the whole exposition to b. */
void cm_metrics_render(cm_buf_t *b);

#endif
