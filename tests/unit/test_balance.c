/* Distribution properties of the balancing policies (cm_balance.c). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cm_balance.h"
#include "cm_err.h"
#include "test.h"

static void set_n(cm_lb_t *lb, int n, const int *weights) {
    cm_lb_endpoint_t eps[16];
    for (int i = 0; i < n; i++) {
        snprintf(eps[i].id, sizeof eps[i].id, "inst-%d", i);
        snprintf(eps[i].target, sizeof eps[i].target, "10.0.0.%d:7000", i + 1);
        eps[i].weight = weights ? weights[i] : 100;
    }
    cm_lb_set(lb, eps, (size_t)n);
}

static int index_of(const cm_lb_pick_t *p) { return atoi(p->id + 5); }

static void test_round_robin_is_even(void) {
    cm_lb_t *lb = cm_lb_new(CM_LB_ROUND_ROBIN);
    cm_lb_pick_t p;
    ASSERT_INT_EQ(cm_lb_pick(lb, NULL, 0, &p), CM_ENOTFOUND);
    set_n(lb, 4, NULL);
    int counts[4] = {0};
    for (int i = 0; i < 10000; i++) {
        ASSERT_INT_EQ(cm_lb_pick(lb, NULL, 0, &p), 0);
        counts[index_of(&p)]++;
        cm_lb_done(lb, &p);
    }
    for (int i = 0; i < 4; i++) ASSERT_INT_EQ(counts[i], 2500);
    cm_lb_free(lb);
}

static void test_weighted_is_proportional(void) {
    cm_lb_t *lb = cm_lb_new(CM_LB_WEIGHTED);
    int w[3] = {100, 300, 600};
    set_n(lb, 3, w);
    int counts[3] = {0};
    cm_lb_pick_t p;
    for (int i = 0; i < 10000; i++) {
        cm_lb_pick(lb, NULL, 0, &p);
        counts[index_of(&p)]++;
        cm_lb_done(lb, &p);
    }
    for (int i = 0; i < 3; i++) {
        double want = 10000.0 * w[i] / 1000.0, got = counts[i];
        if (got < want * 0.95 || got > want * 1.05) TEST__FAIL("endpoint %d: %d picks, want %.0f +-5%%", i, counts[i], want);
    }
    /* Interleaved, not bursts: the heaviest never takes more than 2 in a row at 60%. */
    int run = 0, max_run = 0, last = -1;
    for (int i = 0; i < 1000; i++) {
        cm_lb_pick(lb, NULL, 0, &p);
        int k = index_of(&p);
        run = k == last ? run + 1 : 1;
        last = k;
        if (run > max_run) max_run = run;
        cm_lb_done(lb, &p);
    }
    ASSERT(max_run <= 2);
    cm_lb_free(lb);
}

static void test_least_outstanding_avoids_busy(void) {
    cm_lb_t *lb = cm_lb_new(CM_LB_LEAST_OUTSTANDING);
    set_n(lb, 3, NULL);
    cm_lb_pick_t held[5], p;
    /* Hold 5 requests: they spread 2/2/1. */
    for (int i = 0; i < 5; i++) cm_lb_pick(lb, NULL, 0, &held[i]);
    int counts[3] = {0};
    for (int i = 0; i < 5; i++) counts[index_of(&held[i])]++;
    for (int i = 0; i < 3; i++) ASSERT(counts[i] >= 1 && counts[i] <= 2);
    /* The next pick goes to the one with a single request in flight. */
    int least = counts[0] == 1 ? 0 : counts[1] == 1 ? 1 : 2;
    cm_lb_pick(lb, NULL, 0, &p);
    ASSERT_INT_EQ(index_of(&p), least);
    cm_lb_done(lb, &p);
    for (int i = 0; i < 5; i++) cm_lb_done(lb, &held[i]);
    /* Outstanding counts survive a set update for ids that stay. */
    cm_lb_pick(lb, NULL, 0, &held[0]);
    cm_lb_pick(lb, NULL, 0, &held[1]);
    set_n(lb, 3, NULL);
    cm_lb_pick(lb, NULL, 0, &p);
    ASSERT(index_of(&p) != index_of(&held[0]) && index_of(&p) != index_of(&held[1]));
    cm_lb_free(lb);
}

static void test_consistent_hash_is_stable_and_moves_little(void) {
    enum { N = 10, KEYS = 10000 };
    cm_lb_t *lb = cm_lb_new(CM_LB_CONSISTENT_HASH);
    set_n(lb, N, NULL);
    static int before[KEYS];
    int per[N] = {0};
    cm_lb_pick_t p;
    for (int k = 0; k < KEYS; k++) {
        char key[32];
        int n = snprintf(key, sizeof key, "device-%d", k);
        cm_lb_pick(lb, key, (size_t)n, &p);
        before[k] = index_of(&p);
        per[before[k]]++;
        cm_lb_done(lb, &p);
        cm_lb_pick(lb, key, (size_t)n, &p); /* the same key, the same endpoint */
        ASSERT_INT_EQ(index_of(&p), before[k]);
        cm_lb_done(lb, &p);
    }
    for (int i = 0; i < N; i++) ASSERT(per[i] > KEYS / N / 2); /* no endpoint starved */
    /* inst-3 leaves: only its keys move, i.e. about 1/N of them. */
    cm_lb_endpoint_t eps[N - 1];
    for (int i = 0, j = 0; i < N; i++) {
        if (i == 3) continue;
        snprintf(eps[j].id, sizeof eps[j].id, "inst-%d", i);
        snprintf(eps[j].target, sizeof eps[j].target, "10.0.0.%d:7000", i + 1);
        eps[j++].weight = 100;
    }
    cm_lb_set(lb, eps, N - 1);
    int moved = 0;
    for (int k = 0; k < KEYS; k++) {
        char key[32];
        int n = snprintf(key, sizeof key, "device-%d", k);
        cm_lb_pick(lb, key, (size_t)n, &p);
        if (index_of(&p) != before[k]) {
            moved++;
            ASSERT_INT_EQ(before[k], 3); /* nobody else's keys move */
        }
        cm_lb_done(lb, &p);
    }
    ASSERT_INT_EQ(moved, per[3]);
    if (moved > KEYS / N * 3 / 2) TEST__FAIL("%d of %d keys moved, want about %d", moved, KEYS, KEYS / N);
    cm_lb_free(lb);
}

static void test_policy_names(void) {
    ASSERT_INT_EQ(cm_lb_policy_parse("round_robin"), CM_LB_ROUND_ROBIN);
    ASSERT_INT_EQ(cm_lb_policy_parse("consistent_hash"), CM_LB_CONSISTENT_HASH);
    ASSERT_INT_EQ(cm_lb_policy_parse("random"), -1);
}

TEST_MAIN(TEST_ENTRY(test_round_robin_is_even), TEST_ENTRY(test_weighted_is_proportional),
          TEST_ENTRY(test_least_outstanding_avoids_busy), TEST_ENTRY(test_consistent_hash_is_stable_and_moves_little),
          TEST_ENTRY(test_policy_names))
