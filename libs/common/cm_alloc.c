/* Checked allocation wrappers and the bump arena used for protobuf-c messages. */
#include "cm_alloc.h"

#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static void cm__oom(size_t n) {
    /* No logger here: it may itself need memory. A raw write is the best we can do. */
    fprintf(stderr, "{\"level\":\"fatal\",\"msg\":\"out of memory allocating %zu bytes\"}\n", n);
    abort();
}

void *cm_malloc(size_t n) {
    void *p = malloc(n ? n : 1);
    if (!p) cm__oom(n);
    return p;
}

void *cm_calloc(size_t nmemb, size_t size) {
    void *p = calloc(nmemb ? nmemb : 1, size ? size : 1);
    if (!p) cm__oom(nmemb * size);
    return p;
}

void *cm_realloc(void *p, size_t n) {
    void *q = realloc(p, n ? n : 1);
    if (!q) cm__oom(n);
    return q;
}

char *cm_strdup(const char *s) {
    return cm_strndup(s, strlen(s));
}

char *cm_strndup(const char *s, size_t n) {
    char *p = cm_malloc(n + 1);
    memcpy(p, s, n);
    p[n] = '\0';
    return p;
}

void cm_free(void *p) {
    free(p);
}

static void *cm__pb_alloc(void *data, size_t n) {
    (void)data;
    return cm_malloc(n);
}

static void cm__pb_free(void *data, void *p) {
    (void)data;
    cm_free(p);
}

ProtobufCAllocator cm_pb_allocator = {cm__pb_alloc, cm__pb_free, NULL};

/* ---- arena ----------------------------------------------------------------------------- */

struct cm_arena_chunk_s {
    cm_arena_chunk_t *next;
    size_t size;
    size_t used;
    max_align_t data[]; /* aligned storage follows */
};

#define CM__ARENA_ALIGN (_Alignof(max_align_t))
#define CM__ARENA_CHUNK 16384

static size_t cm__align(size_t n) {
    return (n + CM__ARENA_ALIGN - 1) & ~(CM__ARENA_ALIGN - 1);
}

/* Standard chunks are recycled through a tiny per-thread cache: a stream decoding message after
 * message on a worker thread reuses the same chunk without malloc/free, yet memory held back is
 * bounded by the number of threads, not by the number of open streams. */
#define CM__CHUNK_CACHE 2
typedef struct cm__chunk_cache_s {
    cm_arena_chunk_t *c[CM__CHUNK_CACHE];
    int n;
} cm__chunk_cache_t;

static _Thread_local cm__chunk_cache_t *cm__cache;
static pthread_key_t cm__cache_key;
static pthread_once_t cm__cache_once = PTHREAD_ONCE_INIT;

static void cm__cache_destroy(void *p) {
    cm__chunk_cache_t *cc = p;
    for (int i = 0; i < cc->n; i++) free(cc->c[i]);
    free(cc);
}

static void cm__cache_key_init(void) {
    pthread_key_create(&cm__cache_key, cm__cache_destroy);
}

static cm_arena_chunk_t *cm__chunk_get(size_t sz) {
    if (sz == CM__ARENA_CHUNK && cm__cache && cm__cache->n > 0) return cm__cache->c[--cm__cache->n];
    cm_arena_chunk_t *c = cm_malloc(sizeof *c + sz);
    c->size = sz;
    return c;
}

static void cm__chunk_put(cm_arena_chunk_t *c) {
    if (c->size == CM__ARENA_CHUNK) {
        if (!cm__cache) {
            pthread_once(&cm__cache_once, cm__cache_key_init);
            cm__cache = cm_calloc(1, sizeof *cm__cache);
            /* The destructor frees the cache when the thread exits. */
            pthread_setspecific(cm__cache_key, cm__cache);
        }
        if (cm__cache->n < CM__CHUNK_CACHE) {
            cm__cache->c[cm__cache->n++] = c;
            return;
        }
    }
    cm_free(c);
}

static void *cm__arena_pb_alloc(void *data, size_t n) {
    return cm_arena_alloc(data, n);
}

static void cm__arena_pb_free(void *data, void *p) {
    /* Arena memory goes away with the arena. */
    (void)data;
    (void)p;
}

void cm_arena_init(cm_arena_t *a, void *buf, size_t size) {
    a->head = NULL;
    /* The inline block must be aligned like everything we hand out. */
    uintptr_t start = (uintptr_t)buf, aligned = (start + CM__ARENA_ALIGN - 1) & ~(uintptr_t)(CM__ARENA_ALIGN - 1);
    if (buf && size > aligned - start) {
        a->inline_buf = (char *)aligned;
        a->inline_size = size - (aligned - start);
    } else {
        a->inline_buf = NULL;
        a->inline_size = 0;
    }
    a->inline_used = 0;
    a->pb.alloc = cm__arena_pb_alloc;
    a->pb.free = cm__arena_pb_free;
    a->pb.allocator_data = a;
}

void *cm_arena_alloc(cm_arena_t *a, size_t n) {
    n = cm__align(n ? n : 1);
    if (a->inline_buf && a->inline_size - a->inline_used >= n) {
        void *p = a->inline_buf + a->inline_used;
        a->inline_used += n;
        return p;
    }
    cm_arena_chunk_t *c = a->head;
    if (!c || c->size - c->used < n) {
        size_t sz = n > CM__ARENA_CHUNK / 2 ? n : CM__ARENA_CHUNK;
        c = cm__chunk_get(sz);
        c->used = 0;
        if (n > CM__ARENA_CHUNK / 2 && a->head) {
            /* A large one-off block goes behind the current chunk so its free space stays usable. */
            c->next = a->head->next;
            a->head->next = c;
        } else {
            c->next = a->head;
            a->head = c;
        }
    }
    void *p = (char *)c->data + c->used;
    c->used += n;
    return p;
}

char *cm_arena_strndup(cm_arena_t *a, const char *s, size_t n) {
    char *p = cm_arena_alloc(a, n + 1);
    memcpy(p, s, n);
    p[n] = '\0';
    return p;
}

char *cm_arena_strdup(cm_arena_t *a, const char *s) {
    return cm_arena_strndup(a, s, strlen(s));
}

void cm_arena_reset(cm_arena_t *a) {
    cm_arena_chunk_t *c = a->head;
    while (c) {
        cm_arena_chunk_t *n = c->next;
        cm__chunk_put(c);
        c = n;
    }
    a->head = NULL;
    a->inline_used = 0;
}

void cm_arena_free(cm_arena_t *a) {
    cm_arena_reset(a);
}
