/* cm_map_t: a hash map from byte-string keys to void * values, for per-process indexes (devices by id,
 * streams by name) and cm_hash64(), the stable hash behind shard choices that outlive a release.
 *
 * Ownership: the map copies every key it stores and frees the copies itself; keys handed out by
 * cm_map_next() belong to the map and stay valid until that entry is deleted or the map is freed.
 * Values are the caller's: the map never frees one except through the free_val callback of
 * cm_map_free(). Allocation failure aborts (cm_alloc.h), so no call here reports an error.
 *
 * Not thread safe: callers that share a map across threads hold their own lock around every call,
 * including cm_map_get() and iteration. */
#ifndef CM_MAP_H
#define CM_MAP_H

#include <stddef.h>
#include <stdint.h>

typedef struct cm_map_s cm_map_t;

/* A stable 64-bit hash (FNV-1a 64) of n bytes. Stable across versions and machines: services use it
 * in public contracts (e.g. which Redis stream shard a device's telemetry goes to), so it must never change. */
uint64_t cm_hash64(const void *p, size_t n);

/* An empty map; the table is allocated on the first insert. Free it with cm_map_free(). */
cm_map_t *cm_map_new(void);
/* Frees the map and its key copies; free_val (may be NULL) is called on every value, including values
 * still NULL from a cm_map_slot() that was never filled. Accepts NULL. */
void cm_map_free(cm_map_t *m, void (*free_val)(void *val));

/* In every call below key may be NULL when klen is 0; keys may contain any bytes, including NUL,
 * and the empty key is a key like any other. */

/* The value for key, or NULL when absent. (A present key whose value is NULL also gives NULL.) */
void *cm_map_get(const cm_map_t *m, const void *key, size_t klen);
/* Finds or inserts key and returns the address of its value slot (a new slot holds NULL and *created is set to 1,
   otherwise 0; created may be NULL). The address is valid until the next insert or delete. */
void **cm_map_slot(cm_map_t *m, const void *key, size_t klen, int *created);
/* Removes key; returns its value (so the caller can free it) or NULL when absent. The key copy is freed,
 * so a key pointer obtained from cm_map_next() must not be used after deleting its entry. */
void *cm_map_del(cm_map_t *m, const void *key, size_t klen);
/* The number of entries. */
size_t cm_map_len(const cm_map_t *m);

/* Iteration: start with *iter = 0; returns 1 with *key, *klen and *val set while entries remain, then 0.
 * The order is unspecified. *key is the map's own copy and is NUL-terminated after klen bytes, so
 * string keys can be printed directly.
 *
 * Deleting during iteration is allowed: deletion never moves an entry (it leaves a tombstone, and only
 * inserts rebuild the table), so every entry not deleted is returned exactly once; an entry deleted
 * before the iterator reaches it is not returned. Inserting during iteration (cm_map_slot() with a new
 * key) is not allowed: it may rebuild the table and the iterator would skip or repeat entries. */
int cm_map_next(const cm_map_t *m, size_t *iter, const void **key, size_t *klen, void **val);

#endif
