/* Rules: validation and defaults (shared by the API and the consumer), the compiled form the
 * consumer evaluates, and the rule set: an immutable, reference-counted snapshot of every enabled
 * rule with its device selector resolved, reloaded when any replica changes a rule.
 *
 * Selectors: device_ids is kept as a set; group_id, type and label_selector are resolved to a set
 * of device ids through device-mgmt's ListDevices (one DeviceFilter with those three fields) when
 * the rule is loaded and again every IOT_PROC_SELECTOR_REFRESH. A rule whose selector cannot be
 * resolved (device-mgmt unreachable) keeps the set of its previous resolution; a new rule in that
 * state is not applied until it can be resolved. An empty selector selects every device.
 *
 * Per-rule accounting (proc_rule_stats_t) outlives snapshots: it is reference counted by the
 * snapshots that hold the rule and by the consumer states that bill memory to it. */
#ifndef PROC_RULES_H
#define PROC_RULES_H

#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>

#include "cm_buf.h"
#include "cm_map.h"
#include "cm_pg.h"
#include "iot/processing/v1/processing.pb-c.h"
#include "proc_config.h"
#include "proc_detect.h"
#include "proc_window.h"

typedef Iot__Processing__V1__Rule proc_rule_pb_t;

#define PROC_ID_MAX 128          /* rule ids: [A-Za-z0-9][A-Za-z0-9._:-]{0,127} */
#define PROC_NAME_MAX 200
#define PROC_METRIC_MAX 128      /* as ingest: [A-Za-z0-9_.:/-]{1,128} */
#define PROC_SELECTOR_IDS_MAX 1000
#define PROC_URL_MAX 2048
#define PROC_PAYLOAD_MAX 65536   /* command payload, serialized */

/* Fills unset fields with their documented defaults, in place (nested messages that are missing
 * and have defaults are allocated with alloc): severity WARNING; window kind SLIDING, width 5 min,
 * count 64, late 30 s, min_samples 10, range [-50, 150]; z-score level 0.8, window 5 min,
 * min_samples 30; command min_severity CRITICAL; webhook 5 attempts, 5 s. Call before
 * proc_rule_check. */
void proc_rule_normalize(proc_rule_pb_t *r, ProtobufCAllocator *alloc);

/* Validates a normalized rule (the id may be empty: CreateRule generates one). Returns 0, or
 * CM_STATUS_INVALID_ARGUMENT with a message naming the field and what is allowed in why. */
int proc_rule_check(const proc_rule_pb_t *r, char *why, size_t cap);

/* 1 when s is a valid rule id. */
int proc_rule_id_ok(const char *s);
/* 1 when s is a metric name as ingest accepts it. */
int proc_metric_ok(const char *s);

typedef struct proc_rule_stats_s {
    _Atomic int refs;
    char id[PROC_ID_MAX + 1];
    _Atomic uint64_t evaluations, matches, cpu_ns;
    _Atomic int64_t windows, memory_bytes; /* states held now (this process) */
} proc_rule_stats_t;

void proc_rule_stats_ref(proc_rule_stats_t *s);
void proc_rule_stats_unref(proc_rule_stats_t *s);

typedef enum proc_cond_e {
    PROC_COND_THRESHOLD = 0,
    PROC_COND_ZSCORE,
    PROC_COND_STUCK,
    PROC_COND_RATE,
    PROC_COND_ABSENCE,
} proc_cond_t;

typedef struct proc_rule_s {
    char *id, *name, *metric;
    int64_t revision;
    int severity;           /* Iot__Processing__V1__Severity */
    proc_cond_t cond;
    /* threshold */
    int op;                 /* Iot__Processing__V1__Comparison */
    double threshold;
    int64_t for_ms;
    int statistic;          /* Iot__Processing__V1__Statistic; VALUE: no window */
    /* threshold with a statistic, and z-score: the window */
    int has_window;
    proc_window_cfg_t win;
    double level;           /* z-score */
    proc_stuck_cfg_t stuck;
    proc_rate_cfg_t rate;
    proc_absence_cfg_t absence;
    /* actions */
    char *cmd_name;         /* NULL: none */
    uint8_t *cmd_payload;   /* serialized google.protobuf.Struct, or NULL */
    size_t cmd_payload_len;
    int cmd_min_severity;
    char *hook_url;         /* NULL: none */
    int hook_attempts;
    int64_t hook_timeout_ms;
    /* selector */
    cm_map_t *ids;          /* NULL: any id */
    cm_map_t *resolved;     /* NULL: no group/type/label condition */
    void *res_ref;          /* the loader's shared resolution holding `resolved` (a reference) */
    char *sel_key;          /* group/type/labels, for sharing resolutions; NULL when none */
    proc_rule_stats_t *stats;
} proc_rule_t;

/* 1 when the rule applies to device id. */
int proc_rule_selects(const proc_rule_t *r, const char *device_id);
/* 1 when x <op> threshold. */
int proc_compare(int op, double x, double threshold);

typedef struct proc_rule_list_s {
    proc_rule_t **v;
    size_t n;
} proc_rule_list_t;

typedef struct proc_ruleset_s {
    _Atomic int refs;
    int64_t version;        /* rules_version it was loaded at */
    uint64_t gen;           /* increases with every snapshot this process builds */
    proc_rule_t **rules;
    size_t n;
    cm_map_t *by_metric;    /* metric -> proc_rule_list_t * */
} proc_ruleset_t;

void proc_ruleset_unref(proc_ruleset_t *rs);
/* The rules of rs for metric (an empty list when none). */
const proc_rule_list_t *proc_ruleset_metric(const proc_ruleset_t *rs, const char *metric);

/* The loader: a thread that polls rules_version and rebuilds the snapshot. */
typedef struct proc_rules_s proc_rules_t;
/* Starts the loader thread (it loads at once, then polls). NULL when dm_addr is not a usable gRPC
 * target. */
proc_rules_t *proc_rules_start(const proc_config_t *cfg, cm_pg_t *pg);
/* 1 once a rule set has been loaded from Postgres: the consumer reads no point before, so no point
 * is evaluated against a rule set that is merely not loaded yet. */
int proc_rules_ready(proc_rules_t *r);
/* The current snapshot with a reference (release with proc_ruleset_unref); never NULL. */
proc_ruleset_t *proc_rules_get(proc_rules_t *r);
/* Reload now (after a local rule change), without waiting for the poll. */
void proc_rules_kick(proc_rules_t *r);
/* The stats object of a rule this process knows, with a reference, or NULL. */
proc_rule_stats_t *proc_rules_stats(proc_rules_t *r, const char *id);
/* Appends per-rule Prometheus families for the rules of the current snapshot. */
void proc_rules_metrics(cm_buf_t *b, void *rules);
void proc_rules_stop(proc_rules_t *r);

#endif
