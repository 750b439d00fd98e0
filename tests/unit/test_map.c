/* cm_map.c: the FNV-1a 64 vectors that cm_hash64() must keep forever, binary and empty keys, a
 * randomised run checked against a sorted reference, deletion during iteration, and value ownership. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cm_alloc.h"
#include "cm_map.h"
#include "test.h"

/* ---- helpers ---------------------------------------------------------------------------------- */

static uint64_t rng_state;

/* xorshift64*: deterministic, so a failure reproduces. */
static uint64_t rnd(void) {
    rng_state ^= rng_state >> 12;
    rng_state ^= rng_state << 25;
    rng_state ^= rng_state >> 27;
    return rng_state * 0x2545f4914f6cdd1dULL;
}

static void *uval(size_t n) {
    return (void *)(uintptr_t)n;
}

static size_t vidx(void *v) {
    return (size_t)(uintptr_t)v;
}

/* Inserts key (must be new) with value v. */
static void put_new(cm_map_t *m, const void *key, size_t klen, void *v) {
    int created = -1;
    void **slot = cm_map_slot(m, key, klen, &created);
    ASSERT(slot != NULL);
    ASSERT_INT_EQ(created, 1);
    ASSERT(*slot == NULL);
    *slot = v;
}

/* ---- cm_hash64 -------------------------------------------------------------------------------- */

static void test_hash_vectors(void) {
    ASSERT(cm_hash64("", 0) == 0xcbf29ce484222325ULL);
    ASSERT(cm_hash64(NULL, 0) == 0xcbf29ce484222325ULL);
    ASSERT(cm_hash64("a", 1) == 0xaf63dc4c8601ec8cULL);
    ASSERT(cm_hash64("foobar", 6) == 0x85944171f73967e8ULL);
    /* Only n bytes count: neither a terminator nor the bytes after n. */
    ASSERT(cm_hash64("foobarbaz", 6) == 0x85944171f73967e8ULL);
    ASSERT(cm_hash64("a\0", 2) != cm_hash64("a", 1));
}

/* ---- basic operations ------------------------------------------------------------------------- */

static void test_empty_map(void) {
    cm_map_t *m = cm_map_new();
    ASSERT_INT_EQ(cm_map_len(m), 0);
    ASSERT(cm_map_get(m, "x", 1) == NULL);
    ASSERT(cm_map_get(m, NULL, 0) == NULL);
    ASSERT(cm_map_del(m, "x", 1) == NULL);
    size_t it = 0, klen = 99;
    const void *k = NULL;
    void *v = NULL;
    ASSERT_INT_EQ(cm_map_next(m, &it, &k, &klen, &v), 0);
    ASSERT_INT_EQ(cm_map_next(m, &it, &k, &klen, &v), 0);
    cm_map_free(m, NULL);
    cm_map_free(NULL, NULL);
    cm_map_free(NULL, free);
}

static void test_insert_get_overwrite(void) {
    cm_map_t *m = cm_map_new();
    int a = 1, b = 2, c = 3;

    int created = -1;
    void **s = cm_map_slot(m, "alpha", 5, &created);
    ASSERT_INT_EQ(created, 1);
    ASSERT(*s == NULL);
    ASSERT_INT_EQ(cm_map_len(m), 1);
    /* A created slot that is still NULL reads as absent through get, but it is an entry. */
    ASSERT(cm_map_get(m, "alpha", 5) == NULL);
    *s = &a;
    ASSERT(cm_map_get(m, "alpha", 5) == &a);

    s = cm_map_slot(m, "alpha", 5, &created);
    ASSERT_INT_EQ(created, 0);
    ASSERT(*s == &a);
    *s = &b; /* overwrite */
    ASSERT(cm_map_get(m, "alpha", 5) == &b);
    ASSERT_INT_EQ(cm_map_len(m), 1);

    /* created may be NULL, for both a new and an existing key. */
    s = cm_map_slot(m, "beta", 4, NULL);
    *s = &c;
    ASSERT(*cm_map_slot(m, "beta", 4, NULL) == &c);
    ASSERT_INT_EQ(cm_map_len(m), 2);

    /* Prefixes and extensions of a key are different keys. */
    ASSERT(cm_map_get(m, "alph", 4) == NULL);
    ASSERT(cm_map_get(m, "alphaa", 6) == NULL);
    ASSERT(cm_map_get(m, "alphabet", 5) == &b);

    /* The map keeps its own copy of the key. */
    char buf[8];
    memcpy(buf, "gamma", 6);
    put_new(m, buf, 5, &a);
    memcpy(buf, "xxxxx", 6);
    ASSERT(cm_map_get(m, "gamma", 5) == &a);
    ASSERT(cm_map_get(m, "xxxxx", 5) == NULL);

    ASSERT(cm_map_del(m, "alpha", 5) == &b);
    ASSERT(cm_map_del(m, "alpha", 5) == NULL);
    ASSERT(cm_map_get(m, "alpha", 5) == NULL);
    ASSERT_INT_EQ(cm_map_len(m), 2);

    /* Reinsert after delete: a fresh NULL slot. */
    s = cm_map_slot(m, "alpha", 5, &created);
    ASSERT_INT_EQ(created, 1);
    ASSERT(*s == NULL);
    ASSERT_INT_EQ(cm_map_len(m), 3);
    cm_map_free(m, NULL);
}

static void test_binary_and_empty_keys(void) {
    static const struct {
        const char *k;
        size_t n;
    } keys[] = {
        {"", 0},      {"\0", 1},     {"\0\0", 2},   {"a", 1},       {"a\0", 2},
        {"a\0b", 3},  {"a\0c", 3},   {"\0a", 2},    {"\xff\x00\x80", 3}, {"ab", 2},
    };
    size_t nk = sizeof keys / sizeof keys[0];
    cm_map_t *m = cm_map_new();
    for (size_t i = 0; i < nk; i++) put_new(m, keys[i].k, keys[i].n, uval(i + 1));
    ASSERT_INT_EQ(cm_map_len(m), nk);
    for (size_t i = 0; i < nk; i++) ASSERT_INT_EQ(vidx(cm_map_get(m, keys[i].k, keys[i].n)), i + 1);

    /* The empty key is the same whether spelled NULL or "". */
    ASSERT_INT_EQ(vidx(cm_map_get(m, NULL, 0)), 1);
    int created = -1;
    ASSERT_INT_EQ(vidx(*cm_map_slot(m, NULL, 0, &created)), 1);
    ASSERT_INT_EQ(created, 0);

    /* Iteration hands out exact bytes, NUL-terminated after klen. */
    int seen[16] = {0};
    size_t it = 0, klen;
    const void *k;
    void *v;
    while (cm_map_next(m, &it, &k, &klen, &v)) {
        size_t i = vidx(v) - 1;
        ASSERT(i < nk);
        seen[i]++;
        ASSERT_INT_EQ(klen, keys[i].n);
        ASSERT(memcmp(k, keys[i].k, klen) == 0);
        ASSERT_INT_EQ(((const char *)k)[klen], '\0');
    }
    for (size_t i = 0; i < nk; i++) ASSERT_INT_EQ(seen[i], 1);

    ASSERT_INT_EQ(vidx(cm_map_del(m, "", 0)), 1);
    ASSERT(cm_map_get(m, NULL, 0) == NULL);
    ASSERT_INT_EQ(vidx(cm_map_del(m, "a\0b", 3)), 6);
    ASSERT_INT_EQ(vidx(cm_map_get(m, "a\0c", 3)), 7);
    ASSERT_INT_EQ(vidx(cm_map_get(m, "a\0", 2)), 5);
    ASSERT_INT_EQ(cm_map_len(m), nk - 2);
    cm_map_free(m, NULL);
}

/* ---- randomised run against a sorted reference ------------------------------------------------ */

#define RAND_N 100000

typedef struct {
    unsigned char key[16];
    size_t len;
    size_t id;   /* insertion order: the last insert of a key wins */
    int deleted; /* on the first record of each distinct key */
} rec_t;

static int rec_key_cmp(const rec_t *a, const rec_t *b) {
    if (a->len != b->len) return a->len < b->len ? -1 : 1;
    return memcmp(a->key, b->key, a->len);
}

static int rec_cmp(const void *pa, const void *pb) {
    const rec_t *a = pa, *b = pb;
    int c = rec_key_cmp(a, b);
    if (c) return c;
    return a->id < b->id ? -1 : a->id > b->id;
}

/* Distinct keys: the sorted records collapsed to one per key holding the winning id. */
typedef struct {
    rec_t *u;
    size_t n;
} ref_t;

static rec_t *ref_find(const ref_t *r, const void *key, size_t klen) {
    rec_t probe;
    if (klen > sizeof probe.key) return NULL;
    memcpy(probe.key, key, klen);
    probe.len = klen;
    size_t lo = 0, hi = r->n;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        int c = rec_key_cmp(&r->u[mid], &probe);
        if (c == 0) return &r->u[mid];
        if (c < 0) lo = mid + 1;
        else hi = mid;
    }
    return NULL;
}

/* Every reference key reads back as expected, and iteration returns each live key exactly once. */
static void check_against_ref(const cm_map_t *m, const ref_t *r, size_t want_len) {
    ASSERT_INT_EQ(cm_map_len(m), want_len);
    for (size_t i = 0; i < r->n; i++) {
        void *v = cm_map_get(m, r->u[i].key, r->u[i].len);
        if (r->u[i].deleted) ASSERT(v == NULL);
        else ASSERT_INT_EQ(vidx(v), r->u[i].id + 1);
    }
    unsigned char *seen = cm_calloc(r->n, 1);
    size_t it = 0, klen, count = 0;
    const void *k;
    void *v;
    while (cm_map_next(m, &it, &k, &klen, &v)) {
        rec_t *u = ref_find(r, k, klen);
        if (!u || u->deleted || seen[u - r->u] || vidx(v) != u->id + 1) {
            cm_free(seen);
            TEST__FAIL("iteration returned an unexpected or repeated entry (klen %zu)", klen);
        }
        seen[u - r->u] = 1;
        count++;
    }
    cm_free(seen);
    ASSERT_INT_EQ(count, want_len);
}

static void test_random_against_reference(void) {
    rng_state = 0x9e3779b97f4a7c15ULL;
    rec_t *recs = cm_malloc(RAND_N * sizeof *recs);
    cm_map_t *m = cm_map_new();
    for (size_t i = 0; i < RAND_N; i++) {
        rec_t *r = &recs[i];
        memset(r, 0, sizeof *r);
        r->id = i;
        /* Mostly long random bytes (any value, NUL included); one in eight short from a tiny alphabet
         * so that the same key is inserted many times and must overwrite, not duplicate. */
        if (rnd() % 8 == 0) {
            r->len = (size_t)(rnd() % 4);
            for (size_t j = 0; j < r->len; j++) r->key[j] = (unsigned char)("\0ab"[rnd() % 3]);
        } else {
            r->len = 1 + (size_t)(rnd() % sizeof r->key);
            for (size_t j = 0; j < r->len; j++) r->key[j] = (unsigned char)rnd();
        }
        *cm_map_slot(m, r->key, r->len, NULL) = uval(i + 1);
    }

    /* Sort by (key, id) and keep the last record of each key: the value the map must hold. */
    qsort(recs, RAND_N, sizeof *recs, rec_cmp);
    ref_t ref = {recs, 0};
    for (size_t i = 0; i < RAND_N; i++) {
        if (i + 1 < RAND_N && rec_key_cmp(&recs[i], &recs[i + 1]) == 0) continue;
        recs[ref.n++] = recs[i];
    }
    ASSERT(ref.n < RAND_N); /* the short keys did collide */
    ASSERT(ref.n > RAND_N / 2);
    check_against_ref(m, &ref, ref.n);

    /* Delete every other distinct key, in an order unrelated to the table's. */
    size_t live = ref.n;
    for (size_t i = 0; i < ref.n; i += 2) {
        ASSERT_INT_EQ(vidx(cm_map_del(m, ref.u[i].key, ref.u[i].len)), ref.u[i].id + 1);
        ASSERT(cm_map_del(m, ref.u[i].key, ref.u[i].len) == NULL);
        ref.u[i].deleted = 1;
        live--;
    }
    check_against_ref(m, &ref, live);

    /* Put them back: inserts that land on tombstones must not create duplicates. */
    for (size_t i = 0; i < ref.n; i += 2) {
        int created = -1;
        void **s = cm_map_slot(m, ref.u[i].key, ref.u[i].len, &created);
        ASSERT_INT_EQ(created, 1);
        *s = uval(ref.u[i].id + 1);
        ref.u[i].deleted = 0;
        live++;
    }
    check_against_ref(m, &ref, live);

    cm_map_free(m, NULL);
    cm_free(recs);
}

/* A steady state of few live keys and endless distinct inserts and deletes: the table fills with
 * tombstones and must be rebuilt, or a probe would never find an empty slot. */
static void test_tombstone_churn(void) {
    cm_map_t *m = cm_map_new();
    char key[32];
    for (size_t i = 0; i < 200000; i++) {
        int n = snprintf(key, sizeof key, "churn-%zu", i);
        put_new(m, key, (size_t)n, uval(i + 1));
        if (i >= 5) {
            n = snprintf(key, sizeof key, "churn-%zu", i - 5);
            ASSERT_INT_EQ(vidx(cm_map_del(m, key, (size_t)n)), i - 5 + 1);
        }
        ASSERT(cm_map_len(m) <= 6);
    }
    for (size_t i = 200000 - 5; i < 200000; i++) {
        int n = snprintf(key, sizeof key, "churn-%zu", i);
        ASSERT_INT_EQ(vidx(cm_map_get(m, key, (size_t)n)), i + 1);
    }
    ASSERT(cm_map_get(m, "churn-0", 7) == NULL);
    cm_map_free(m, NULL);
}

/* ---- deletion during iteration ---------------------------------------------------------------- */

#define ITER_N 5000

static cm_map_t *numbered_map(void) {
    cm_map_t *m = cm_map_new();
    char key[32];
    for (size_t i = 0; i < ITER_N; i++) {
        int n = snprintf(key, sizeof key, "device-%zu", i);
        put_new(m, key, (size_t)n, uval(i + 1));
    }
    return m;
}

static void test_delete_current_during_iteration(void) {
    cm_map_t *m = numbered_map();
    static int seen[ITER_N];
    memset(seen, 0, sizeof seen);
    size_t it = 0, klen;
    const void *k;
    void *v;
    /* Delete every even entry as it is returned; the odd ones must still each appear exactly once. */
    while (cm_map_next(m, &it, &k, &klen, &v)) {
        size_t i = vidx(v) - 1;
        ASSERT(i < ITER_N);
        seen[i]++;
        if (i % 2 == 0) ASSERT(cm_map_del(m, k, klen) == v); /* k is freed here: not used again */
    }
    for (size_t i = 0; i < ITER_N; i++) ASSERT_INT_EQ(seen[i], 1);
    ASSERT_INT_EQ(cm_map_len(m), ITER_N / 2);

    /* A second pass sees only the odd ones, and deleting all of them empties the map. */
    memset(seen, 0, sizeof seen);
    it = 0;
    while (cm_map_next(m, &it, &k, &klen, &v)) {
        size_t i = vidx(v) - 1;
        ASSERT(i % 2 == 1);
        seen[i]++;
        ASSERT(cm_map_del(m, k, klen) == v);
    }
    for (size_t i = 0; i < ITER_N; i++) ASSERT_INT_EQ(seen[i], i % 2);
    ASSERT_INT_EQ(cm_map_len(m), 0);
    it = 0;
    ASSERT_INT_EQ(cm_map_next(m, &it, &k, &klen, &v), 0);
    cm_map_free(m, NULL);
}

/* Deleting entries other than the current one is allowed too: a deleted entry is never returned
 * afterwards, and every entry never deleted is returned exactly once. */
static void test_delete_others_during_iteration(void) {
    cm_map_t *m = numbered_map();
    static int seen[ITER_N], gone[ITER_N];
    memset(seen, 0, sizeof seen);
    memset(gone, 0, sizeof gone);
    char key[32];
    size_t it = 0, klen, left = ITER_N;
    const void *k;
    void *v;
    while (cm_map_next(m, &it, &k, &klen, &v)) {
        size_t i = vidx(v) - 1;
        ASSERT(!gone[i]);
        seen[i]++;
        /* Delete i's partner i ^ 1 (seen or not) and, now and then, i itself. */
        size_t p = i ^ 1;
        if (p < ITER_N && !gone[p]) {
            int n = snprintf(key, sizeof key, "device-%zu", p);
            ASSERT_INT_EQ(vidx(cm_map_del(m, key, (size_t)n)), p + 1);
            gone[p] = 1;
            left--;
        }
        if (i % 3 == 0) {
            ASSERT(cm_map_del(m, k, klen) == v);
            gone[i] = 1;
            left--;
        }
    }
    for (size_t i = 0; i < ITER_N; i++) {
        ASSERT(seen[i] <= 1);
        if (!gone[i]) ASSERT_INT_EQ(seen[i], 1);
        int n = snprintf(key, sizeof key, "device-%zu", i);
        ASSERT(cm_map_get(m, key, (size_t)n) == (gone[i] ? NULL : uval(i + 1)));
    }
    ASSERT_INT_EQ(cm_map_len(m), left);
    cm_map_free(m, NULL);
}

/* ---- value ownership -------------------------------------------------------------------------- */

#define FREE_N 700

static int free_calls[FREE_N];
static int free_null_calls;

static void count_free(void *val) {
    if (!val) {
        free_null_calls++;
        return;
    }
    int *v = val;
    free_calls[*v]++;
    cm_free(v);
}

static void test_free_val_once_per_value(void) {
    memset(free_calls, 0, sizeof free_calls);
    free_null_calls = 0;
    cm_map_t *m = cm_map_new();
    char key[32];
    for (int i = 0; i < FREE_N; i++) {
        int n = snprintf(key, sizeof key, "v%d", i);
        int *v = cm_malloc(sizeof *v);
        *v = i;
        put_new(m, key, (size_t)n, v);
    }
    /* Deleted values come back to the caller, who frees them; free_val must not see them. */
    for (int i = 0; i < FREE_N; i += 7) {
        int n = snprintf(key, sizeof key, "v%d", i);
        int *v = cm_map_del(m, key, (size_t)n);
        ASSERT(v && *v == i);
        cm_free(v);
    }
    /* An overwritten value is the caller's too: replace v1 after freeing the old one. */
    void **s = cm_map_slot(m, "v1", 2, NULL);
    cm_free(*s);
    int *v1 = cm_malloc(sizeof *v1);
    *v1 = 1;
    *s = v1;
    /* A slot left NULL is still an entry, so free_val sees it (with NULL). */
    cm_map_slot(m, "never-filled", 12, NULL);

    cm_map_free(m, count_free);
    for (int i = 0; i < FREE_N; i++) ASSERT_INT_EQ(free_calls[i], i % 7 == 0 ? 0 : 1);
    ASSERT_INT_EQ(free_null_calls, 1);

    /* free_val NULL: values stay with the caller, key copies are still freed (LeakSanitizer checks). */
    int x = 42;
    m = cm_map_new();
    put_new(m, "k", 1, &x);
    cm_map_slot(m, "", 0, NULL);
    cm_map_free(m, NULL);
    ASSERT_INT_EQ(x, 42);
}

TEST_MAIN(TEST_ENTRY(test_hash_vectors), TEST_ENTRY(test_empty_map), TEST_ENTRY(test_insert_get_overwrite),
          TEST_ENTRY(test_binary_and_empty_keys), TEST_ENTRY(test_random_against_reference),
          TEST_ENTRY(test_tombstone_churn), TEST_ENTRY(test_delete_current_during_iteration),
          TEST_ENTRY(test_delete_others_during_iteration), TEST_ENTRY(test_free_val_once_per_value))
