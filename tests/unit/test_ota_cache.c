/* ota's download chunk cache: hits and misses, the byte cap with least-recently-used eviction,
 * chunks in use never evicted (and freed when released after a drop), concurrent puts of one
 * chunk sharing the first copy, a cap of 0 keeping nothing, and chunks grpc still holds (released
 * through ota_chunk_release) keeping a freed cache alive until the last one goes. */
#include <string.h>

#include "ota_cache.h"
#include "test.h"

static void test_hits_eviction_and_refs(void) {
    ota_cache_t *c = ota_cache_new(3000);
    uint8_t buf[1000];
    memset(buf, 7, sizeof buf);
    ASSERT(ota_cache_get(c, 1, 0) == NULL);
    for (int i = 0; i < 3; i++) ota_cache_release(c, ota_cache_put(c, 1, i, buf, sizeof buf));
    const ota_chunk_t *a = ota_cache_get(c, 1, 0); /* now the most recent */
    ASSERT(a && a->len == 1000 && a->data[999] == 7);
    ota_cache_release(c, a);
    /* A fourth chunk pushes out the least recently used: chunk 1. */
    ota_cache_release(c, ota_cache_put(c, 1, 3, buf, sizeof buf));
    const ota_chunk_t *gone = ota_cache_get(c, 1, 1);
    ASSERT(gone == NULL);
    size_t bytes;
    uint64_t hits, misses;
    ota_cache_stats(c, &bytes, &hits, &misses);
    ASSERT_INT_EQ((int)bytes, 3000);
    ASSERT_INT_EQ((int)hits, 1);
    ASSERT_INT_EQ((int)misses, 2);
    /* Held chunks are not evicted: the cache runs over its cap until they are released. */
    const ota_chunk_t *h[3];
    for (int i = 0; i < 3; i++) h[i] = ota_cache_get(c, 1, i == 0 ? 0 : i + 1);
    ASSERT(h[0] && h[1] && h[2]);
    const ota_chunk_t *extra = ota_cache_put(c, 2, 0, buf, sizeof buf);
    ota_cache_stats(c, &bytes, &hits, &misses);
    ASSERT_INT_EQ((int)bytes, 4000);
    for (int i = 0; i < 3; i++) ota_cache_release(c, h[i]);
    ota_cache_stats(c, &bytes, &hits, &misses);
    ASSERT_INT_EQ((int)bytes, 3000);
    /* A second put of the same chunk gets the first copy. */
    const ota_chunk_t *again = ota_cache_put(c, 2, 0, buf, sizeof buf);
    ASSERT(again == extra);
    /* Dropping an artifact while a chunk of it is in use: it stays readable until released. */
    ota_cache_drop(c, 2);
    ASSERT(ota_cache_get(c, 2, 0) == NULL);
    ASSERT(extra->data[0] == 7);
    ota_cache_release(c, extra);
    ota_cache_release(c, again);
    /* A chunk of a dropped artifact read just before the drop is not put back. */
    ota_cache_release(c, ota_cache_put(c, 2, 1, buf, sizeof buf));
    ASSERT(ota_cache_get(c, 2, 1) == NULL);
    ota_cache_free(c);
}

static void test_zero_cap_keeps_nothing(void) {
    ota_cache_t *c = ota_cache_new(0);
    uint8_t buf[10] = {1, 2, 3};
    const ota_chunk_t *p = ota_cache_put(c, 1, 0, buf, sizeof buf);
    ASSERT(p && p->len == 10 && p->data[2] == 3);
    ASSERT(ota_cache_get(c, 1, 0) == NULL);
    ota_cache_release(c, p);
    size_t bytes;
    uint64_t hits, misses;
    ota_cache_stats(c, &bytes, &hits, &misses);
    ASSERT_INT_EQ((int)bytes, 0);
    ota_cache_free(c);
}

/* ota_cache_free while downloads' chunks are still being written: the chunks stay readable and
 * the last release (from grpc's thread, by the chunk alone) frees the cache. ASan and LSan check
 * that nothing is used after free or left behind. */
static void test_free_waits_for_outstanding_chunks(void) {
    ota_cache_t *c = ota_cache_new(1 << 20);
    uint8_t buf[100];
    memset(buf, 9, sizeof buf);
    const ota_chunk_t *kept = ota_cache_put(c, 1, 0, buf, sizeof buf);
    const ota_chunk_t *again = ota_cache_get(c, 1, 0);
    ota_cache_drop(c, 2);
    const ota_chunk_t *priv = ota_cache_put(c, 2, 0, buf, sizeof buf); /* dropped artifact: a private copy */
    ASSERT(kept == again && priv != kept);
    ota_cache_free(c);
    ASSERT(kept->data[99] == 9 && priv->data[0] == 9);
    ota_chunk_release((void *)kept);
    ota_chunk_release((void *)priv);
    ASSERT(again->data[50] == 9);
    ota_chunk_release((void *)again); /* the last: the cache goes with it */
    ota_chunk_release(NULL);
    /* Without outstanding chunks, free is immediate. */
    c = ota_cache_new(0);
    ota_chunk_release((void *)ota_cache_put(c, 3, 0, buf, sizeof buf));
    ota_cache_free(c);
}

TEST_MAIN(TEST_ENTRY(test_hits_eviction_and_refs), TEST_ENTRY(test_zero_cap_keeps_nothing),
          TEST_ENTRY(test_free_waits_for_outstanding_chunks))
