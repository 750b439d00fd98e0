/* Bounded, shared chunk cache with LRU eviction (see ota_cache.h). */
#include "ota_cache.h"

#include <pthread.h>
#include <string.h>

#include "cm_alloc.h"
#include "cm_map.h"

typedef struct ota__entry_s {
    ota_chunk_t chunk; /* first: a chunk pointer is an entry pointer */
    uint8_t key[12];
    int refs;
    int dead; /* dropped while in use: freed on the last release */
    ota_cache_t *owner;
    struct ota__entry_s *prev, *next; /* LRU list, most recent first */
} ota__entry_t;

struct ota_cache_s {
    pthread_mutex_t mu;
    cm_map_t *map;
    cm_map_t *dropped; /* artifact ids deleted: a chunk read just before the delete is not kept */
    ota__entry_t *head, *tail;
    size_t cap, bytes;
    uint64_t hits, misses;
    size_t users; /* references handed out and not released */
    int closed;   /* ota_cache_free was called while users > 0: the last release frees */
};

static void ota__key(uint8_t key[12], int64_t artifact, int idx) {
    memcpy(key, &artifact, 8);
    memcpy(key + 8, &idx, 4);
}

static void ota__unlink(ota_cache_t *c, ota__entry_t *e) {
    if (e->prev) e->prev->next = e->next;
    else c->head = e->next;
    if (e->next) e->next->prev = e->prev;
    else c->tail = e->prev;
    e->prev = e->next = NULL;
}

static void ota__push_front(ota_cache_t *c, ota__entry_t *e) {
    e->prev = NULL;
    e->next = c->head;
    if (c->head) c->head->prev = e;
    c->head = e;
    if (!c->tail) c->tail = e;
}

static void ota__entry_free(ota__entry_t *e) {
    cm_free((void *)e->chunk.data);
    cm_free(e);
}

/* Removes e from the map and list; frees it unless in use (then it dies on release). */
static void ota__remove(ota_cache_t *c, ota__entry_t *e) {
    cm_map_del(c->map, e->key, sizeof e->key);
    ota__unlink(c, e);
    c->bytes -= e->chunk.len;
    if (e->refs)
        e->dead = 1;
    else
        ota__entry_free(e);
}

/* Evicts unused entries from the cold end until the cap holds. */
static void ota__trim(ota_cache_t *c) {
    for (ota__entry_t *e = c->tail; e && c->bytes > c->cap;) {
        ota__entry_t *prev = e->prev;
        if (!e->refs) ota__remove(c, e);
        e = prev;
    }
}

ota_cache_t *ota_cache_new(size_t cap_bytes) {
    ota_cache_t *c = cm_calloc(1, sizeof *c);
    pthread_mutex_init(&c->mu, NULL);
    c->map = cm_map_new();
    c->dropped = cm_map_new();
    c->cap = cap_bytes;
    return c;
}

static void ota__cache_destroy(ota_cache_t *c) {
    for (ota__entry_t *e = c->head; e;) {
        ota__entry_t *next = e->next;
        ota__entry_free(e);
        e = next;
    }
    cm_map_free(c->map, NULL);
    cm_map_free(c->dropped, NULL);
    pthread_mutex_destroy(&c->mu);
    cm_free(c);
}

void ota_cache_free(ota_cache_t *c) {
    if (!c) return;
    pthread_mutex_lock(&c->mu);
    c->closed = 1;
    int now = c->users == 0;
    pthread_mutex_unlock(&c->mu);
    if (now) ota__cache_destroy(c);
}

const ota_chunk_t *ota_cache_get(ota_cache_t *c, int64_t artifact, int idx) {
    uint8_t key[12];
    ota__key(key, artifact, idx);
    pthread_mutex_lock(&c->mu);
    ota__entry_t *e = cm_map_get(c->map, key, sizeof key);
    if (e) {
        e->refs++;
        c->users++;
        ota__unlink(c, e);
        ota__push_front(c, e);
        c->hits++;
    } else {
        c->misses++;
    }
    pthread_mutex_unlock(&c->mu);
    return e ? &e->chunk : NULL;
}

const ota_chunk_t *ota_cache_put(ota_cache_t *c, int64_t artifact, int idx, const uint8_t *data, size_t len) {
    ota__entry_t *e = cm_calloc(1, sizeof *e);
    uint8_t *copy = cm_malloc(len ? len : 1);
    memcpy(copy, data, len);
    e->chunk.data = copy;
    e->chunk.len = len;
    e->refs = 1;
    e->owner = c;
    ota__key(e->key, artifact, idx);
    pthread_mutex_lock(&c->mu);
    c->users++;
    if (c->cap == 0 || cm_map_get(c->dropped, &artifact, sizeof artifact)) { /* not kept: a private copy that dies on release */
        e->dead = 1;
        pthread_mutex_unlock(&c->mu);
        return &e->chunk;
    }
    void **slot = cm_map_slot(c->map, e->key, sizeof e->key, NULL);
    if (*slot) { /* stored by another download meanwhile */
        ota__entry_t *had = *slot;
        had->refs++;
        pthread_mutex_unlock(&c->mu);
        ota__entry_free(e);
        return &had->chunk;
    }
    *slot = e;
    ota__push_front(c, e);
    c->bytes += len;
    ota__trim(c);
    pthread_mutex_unlock(&c->mu);
    return &e->chunk;
}

void ota_cache_release(ota_cache_t *c, const ota_chunk_t *chunk) {
    if (!chunk) return;
    ota__entry_t *e = (ota__entry_t *)chunk;
    pthread_mutex_lock(&c->mu);
    int gone = --e->refs == 0 && e->dead;
    if (!gone && !e->dead) ota__trim(c); /* it may have been what kept the cache over its cap */
    int last = --c->users == 0 && c->closed;
    pthread_mutex_unlock(&c->mu);
    if (gone) ota__entry_free(e);
    if (last) ota__cache_destroy(c);
}

void ota_chunk_release(void *chunk) {
    if (chunk) ota_cache_release(((ota__entry_t *)chunk)->owner, chunk);
}

void ota_cache_drop(ota_cache_t *c, int64_t artifact) {
    pthread_mutex_lock(&c->mu);
    *cm_map_slot(c->dropped, &artifact, sizeof artifact, NULL) = (void *)1;
    for (ota__entry_t *e = c->head; e;) {
        ota__entry_t *next = e->next;
        int64_t a;
        memcpy(&a, e->key, 8);
        if (a == artifact) ota__remove(c, e);
        e = next;
    }
    pthread_mutex_unlock(&c->mu);
}

void ota_cache_stats(ota_cache_t *c, size_t *bytes, uint64_t *hits, uint64_t *misses) {
    pthread_mutex_lock(&c->mu);
    *bytes = c->bytes;
    *hits = c->hits;
    *misses = c->misses;
    pthread_mutex_unlock(&c->mu);
}
