/* cm_map_t: open addressing with linear probing over a power-of-two table, tombstones for deletion.
 *
 * Tombstones rather than backward-shift deletion because deletion must not move entries: cm_map_next()
 * promises that deleting during iteration neither skips nor repeats an entry, and with backward shift a
 * cluster that wraps past the end of the table moves already-visited entries in front of the iterator.
 * Tombstones are cleared only when an insert rebuilds the table, which iteration forbids anyway. */
#include "cm_map.h"
#include "cm_alloc.h"

#include <string.h>

/* The first table holds 8 slots; the table is rebuilt when live entries plus tombstones would pass
 * 7/10 of it, so a probe always ends at an empty slot before wrapping all the way round. */
#define CM_MAP_MIN_CAP 8
#define CM_MAP_LOAD_NUM 7
#define CM_MAP_LOAD_DEN 10

/* A deleted slot's key points here: it is neither empty (lookups must probe past it) nor live. */
static char tombstone_mark;
#define TOMBSTONE (&tombstone_mark)

typedef struct {
    uint64_t hash; /* cm_hash64 of the key: rebuilds never rehash, and it filters memcmp */
    char *key;     /* NULL: empty; TOMBSTONE: deleted; otherwise our NUL-terminated copy */
    size_t klen;
    void *val;
} cm_map_entry_t;

struct cm_map_s {
    cm_map_entry_t *tab; /* NULL until the first insert */
    size_t cap;          /* 0 or a power of two */
    unsigned shift;      /* 64 - log2(cap): the bucket is the top bits of the mixed hash */
    size_t len;          /* live entries */
    size_t used;         /* live entries plus tombstones: what the load limit counts */
};

uint64_t cm_hash64(const void *p, size_t n) {
    /* FNV-1a 64 exactly as published; this is a public contract, see cm_map.h. */
    const unsigned char *s = p;
    uint64_t h = 0xcbf29ce484222325ULL;
    for (size_t i = 0; i < n; i++) {
        h ^= s[i];
        h *= 0x100000001b3ULL;
    }
    return h;
}

/* FNV-1a's low bits mix poorly for short keys that differ in their last byte, so the bucket comes from
 * the high bits of a Fibonacci multiply. This touches only bucket choice, never cm_hash64() itself. */
static size_t bucket(const cm_map_t *m, uint64_t h) {
    return (size_t)((h * 0x9e3779b97f4a7c15ULL) >> m->shift);
}

static int is_live(const cm_map_entry_t *e) {
    return e->key != NULL && e->key != TOMBSTONE;
}

static int same_key(const cm_map_entry_t *e, uint64_t h, const void *key, size_t klen) {
    /* klen == 0 skips memcmp because key may then be NULL, which memcmp does not allow even for 0 bytes. */
    return is_live(e) && e->hash == h && e->klen == klen && (klen == 0 || memcmp(e->key, key, klen) == 0);
}

/* The live entry for key, or NULL. */
static cm_map_entry_t *find(const cm_map_t *m, uint64_t h, const void *key, size_t klen) {
    if (m->len == 0) return NULL; /* also covers the unallocated table */
    size_t mask = m->cap - 1;
    for (size_t i = bucket(m, h);; i = (i + 1) & mask) {
        cm_map_entry_t *e = &m->tab[i];
        if (e->key == NULL) return NULL;
        if (same_key(e, h, key, klen)) return e;
    }
}

/* Moves every live entry into a fresh table of newcap slots, dropping tombstones. */
static void rebuild(cm_map_t *m, size_t newcap) {
    cm_map_entry_t *old = m->tab;
    size_t oldcap = m->cap;
    unsigned bits = 0;
    while (((size_t)1 << bits) < newcap) bits++;
    m->tab = cm_calloc(newcap, sizeof *m->tab);
    m->cap = newcap;
    m->shift = 64 - bits;
    m->used = m->len;
    size_t mask = newcap - 1;
    for (size_t j = 0; j < oldcap; j++) {
        if (!is_live(&old[j])) continue;
        size_t i = bucket(m, old[j].hash);
        while (m->tab[i].key != NULL) i = (i + 1) & mask;
        m->tab[i] = old[j];
    }
    cm_free(old);
}

static int over_load(size_t n, size_t cap) {
    return n * CM_MAP_LOAD_DEN > cap * CM_MAP_LOAD_NUM;
}

/* Makes room for one more used slot. Doubles when live entries fill more than half the load limit;
 * otherwise the table is mostly tombstones and is rebuilt at the same size, which still leaves at least
 * half the limit free, so rebuilds stay amortised O(1) under any insert/delete mix. */
static void make_room(cm_map_t *m) {
    if (m->cap && !over_load(m->used + 1, m->cap)) return;
    size_t newcap = m->cap ? m->cap : CM_MAP_MIN_CAP;
    if (m->cap && over_load(2 * (m->len + 1), m->cap)) newcap *= 2;
    while (over_load(m->len + 1, newcap)) newcap *= 2;
    rebuild(m, newcap);
}

cm_map_t *cm_map_new(void) {
    return cm_calloc(1, sizeof(cm_map_t));
}

void cm_map_free(cm_map_t *m, void (*free_val)(void *val)) {
    if (!m) return;
    for (size_t i = 0; i < m->cap; i++) {
        cm_map_entry_t *e = &m->tab[i];
        if (!is_live(e)) continue;
        if (free_val) free_val(e->val);
        cm_free(e->key);
    }
    cm_free(m->tab);
    cm_free(m);
}

void *cm_map_get(const cm_map_t *m, const void *key, size_t klen) {
    cm_map_entry_t *e = find(m, cm_hash64(key, klen), key, klen);
    return e ? e->val : NULL;
}

void **cm_map_slot(cm_map_t *m, const void *key, size_t klen, int *created) {
    uint64_t h = cm_hash64(key, klen);
    cm_map_entry_t *e = NULL;
    if (m->cap) {
        /* One probe both looks for the key and remembers the first tombstone on the way: reusing it
         * keeps chains short and needs no room, since the used count does not change. */
        size_t mask = m->cap - 1;
        for (size_t i = bucket(m, h);; i = (i + 1) & mask) {
            cm_map_entry_t *c = &m->tab[i];
            if (c->key == NULL) break;
            if (c->key == TOMBSTONE) {
                if (!e) e = c;
            } else if (same_key(c, h, key, klen)) {
                if (created) *created = 0;
                return &c->val;
            }
        }
    }
    if (!e) {
        /* No tombstone on the key's path, so the first empty slot on it is where the key goes: the
         * same slot the probe above stopped at if make_room() keeps the table, or a slot in the
         * rebuilt table, which has no tombstones at all. */
        make_room(m);
        size_t mask = m->cap - 1;
        size_t i = bucket(m, h);
        while (m->tab[i].key != NULL) i = (i + 1) & mask;
        e = &m->tab[i];
        m->used++;
    }
    e->hash = h;
    e->klen = klen;
    e->key = cm_malloc(klen + 1);
    if (klen) memcpy(e->key, key, klen);
    e->key[klen] = '\0';
    e->val = NULL;
    m->len++;
    if (created) *created = 1;
    return &e->val;
}

void *cm_map_del(cm_map_t *m, const void *key, size_t klen) {
    cm_map_entry_t *e = find(m, cm_hash64(key, klen), key, klen);
    if (!e) return NULL;
    void *val = e->val;
    cm_free(e->key);
    /* A tombstone, not an empty slot: keys further along this probe chain must stay reachable. It still
     * counts in used until the next rebuild. */
    e->key = TOMBSTONE;
    e->val = NULL;
    m->len--;
    return val;
}

size_t cm_map_len(const cm_map_t *m) {
    return m->len;
}

int cm_map_next(const cm_map_t *m, size_t *iter, const void **key, size_t *klen, void **val) {
    /* *iter is the next slot index to look at. Deletion never moves entries, so the slots ahead of the
     * iterator hold exactly the entries not yet returned (minus any deleted meanwhile). */
    for (size_t i = *iter; i < m->cap; i++) {
        const cm_map_entry_t *e = &m->tab[i];
        if (!is_live(e)) continue;
        *key = e->key;
        *klen = e->klen;
        *val = e->val;
        *iter = i + 1;
        return 1;
    }
    *iter = m->cap;
    return 0;
}
