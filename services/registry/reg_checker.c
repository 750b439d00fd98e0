/* Check scheduling and execution. The scheduler only claims as many checks as there are free
 * probe slots, so a slow target delays its own checks, never unbounded memory or threads. */
#include "reg_checker.h"

#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <string.h>

#include "cm_alloc.h"
#include "cm_log.h"
#include "cm_loop.h"
#include "cm_metrics.h"
#include "reg_probe.h"

#define REG__POLL_MS 50

struct reg_checker_s {
    reg_store_t *store;
    reg_prober_t *prober;
    int concurrency;
    cm_loop_t *scheduler;
    pthread_t *workers;
    pthread_mutex_t mu;
    pthread_cond_t work_cv;
    reg_claim_t *queue; /* ring of claimed checks */
    int q_head, q_len;
    int running; /* probes in progress */
    int stop;
    cm_counter_t *passed, *failed, *changed;
};

static void reg__run_check(reg_checker_t *c, reg_claim_t *job) {
    char why[256], err[256];
    const Iot__Registry__V1__Check *chk = job->inst->check;
    int ok = reg_probe(c->prober, job->inst, why, sizeof why);
    cm_counter_add(ok ? c->passed : c->failed, 1);
    int status = 0, changed = 0;
    int rc = reg_store_report(c->store, job->member, ok, chk->failures_before_critical, chk->successes_before_passing,
                              ok ? "" : why, &status, &changed, err, sizeof err);
    if (rc < 0) cm_log_kv(CM_LOG_WARN, "cannot record check result", "instance", job->member, "error", err, NULL);
    if (rc == 0 && changed) {
        cm_counter_add(c->changed, 1);
        cm_log_kv(CM_LOG_INFO, "instance health changed", "instance", job->member, "status",
                  status == 1 ? "passing" : "critical", "last_error", ok ? "" : why, NULL);
    }
}

static void *reg__worker(void *arg) {
    reg_checker_t *c = arg;
    pthread_mutex_lock(&c->mu);
    for (;;) {
        while (!c->stop && c->q_len == 0) pthread_cond_wait(&c->work_cv, &c->mu);
        if (c->stop) break; /* queued claims are dropped: they run again on the next claim */
        reg_claim_t job = c->queue[c->q_head];
        c->q_head = (c->q_head + 1) % c->concurrency;
        c->q_len--;
        c->running++;
        pthread_mutex_unlock(&c->mu);
        reg__run_check(c, &job);
        iot__registry__v1__instance__free_unpacked(job.inst, &cm_pb_allocator);
        pthread_mutex_lock(&c->mu);
        c->running--;
    }
    pthread_mutex_unlock(&c->mu);
    return NULL;
}

/* One scheduling round: claims as many due checks as there are free probe slots. Runs again at
 * once while it keeps filling every slot, else after a short poll. */
static int64_t reg__schedule(void *arg) {
    reg_checker_t *c = arg;
    pthread_mutex_lock(&c->mu);
    int free_slots = c->concurrency - c->q_len - c->running;
    pthread_mutex_unlock(&c->mu);
    if (free_slots <= 0) return REG__POLL_MS;
    reg_claim_t *claims = NULL;
    size_t n = 0;
    char err[256];
    if (reg_store_claim_checks(c->store, free_slots, &claims, &n, err, sizeof err) < 0)
        cm_log_kv(CM_LOG_WARN, "cannot claim checks", "error", err, NULL);
    pthread_mutex_lock(&c->mu);
    for (size_t i = 0; i < n; i++) {
        /* free_slots bounded the claim, so the ring has room. */
        c->queue[(c->q_head + c->q_len) % c->concurrency] = claims[i];
        c->q_len++;
    }
    if (n) pthread_cond_broadcast(&c->work_cv);
    pthread_mutex_unlock(&c->mu);
    cm_free(claims); /* the instances now belong to the queue */
    return n == (size_t)free_slots ? 0 : REG__POLL_MS;
}

reg_checker_t *reg_checker_start(reg_store_t *store, int concurrency) {
    reg_checker_t *c = cm_calloc(1, sizeof *c);
    c->store = store;
    c->prober = reg_prober_new();
    c->concurrency = concurrency;
    c->queue = cm_calloc((size_t)concurrency, sizeof *c->queue);
    c->workers = cm_calloc((size_t)concurrency, sizeof *c->workers);
    c->passed = cm_metrics_counter("registry_checks_total", "Active checks run, by result.", "result=\"pass\"");
    c->failed = cm_metrics_counter("registry_checks_total", "Active checks run, by result.", "result=\"fail\"");
    c->changed = cm_metrics_counter("registry_health_changes_total", "Instances that flipped passing/critical.", NULL);
    pthread_mutex_init(&c->mu, NULL);
    pthread_cond_init(&c->work_cv, NULL);
    for (int i = 0; i < concurrency; i++) pthread_create(&c->workers[i], NULL, reg__worker, c);
    c->scheduler = cm_loop_start(reg__schedule, c, 0);
    return c;
}

void reg_checker_stop(reg_checker_t *c) {
    if (!c) return;
    cm_loop_stop(c->scheduler); /* no new claims */
    pthread_mutex_lock(&c->mu);
    c->stop = 1;
    pthread_cond_broadcast(&c->work_cv);
    pthread_mutex_unlock(&c->mu);
    for (int i = 0; i < c->concurrency; i++) pthread_join(c->workers[i], NULL);
    for (int i = 0; i < c->q_len; i++)
        iot__registry__v1__instance__free_unpacked(c->queue[(c->q_head + i) % c->concurrency].inst, &cm_pb_allocator);
    reg_prober_free(c->prober);
    pthread_mutex_destroy(&c->mu);
    pthread_cond_destroy(&c->work_cv);
    cm_free(c->queue);
    cm_free(c->workers);
    cm_free(c);
}
