/* Checked allocation and per-call arenas.
 *
 * cm_malloc() and friends never return NULL: on exhaustion they log and abort, because a service
 * that silently continues after a failed allocation corrupts state it then persists. Everything they
 * return is released with cm_free().
 *
 * cm_arena_t is a bump allocator: protobuf-c decodes requests into it (one malloc per message instead
 * of one per field) and handlers build responses in it. Memory from an arena is released all at once
 * by cm_arena_reset() or cm_arena_free(); never cm_free() a pointer that came from an arena. */
#ifndef CM_ALLOC_H
#define CM_ALLOC_H

#include <stddef.h>
#include <protobuf-c/protobuf-c.h>

void *cm_malloc(size_t n);
void *cm_calloc(size_t nmemb, size_t size);
void *cm_realloc(void *p, size_t n);
char *cm_strdup(const char *s);
char *cm_strndup(const char *s, size_t n);
void cm_free(void *p);

/* A ProtobufCAllocator over cm_malloc/cm_free, for messages freed with
 * protobuf_c_message_free_unpacked(msg, &cm_pb_allocator). */
extern ProtobufCAllocator cm_pb_allocator;

typedef struct cm_arena_chunk_s cm_arena_chunk_t;
typedef struct cm_arena_s {
    cm_arena_chunk_t *head;     /* current chunk; older chunks follow ->next */
    char *inline_buf;           /* optional caller-owned first block, never freed */
    size_t inline_size;
    size_t inline_used;
    ProtobufCAllocator pb;      /* allocates from this arena; free is a no-op */
} cm_arena_t;

/* Initialises an arena; buf/size may give an inline first block (NULL, 0 for none). */
void cm_arena_init(cm_arena_t *a, void *buf, size_t size);
void *cm_arena_alloc(cm_arena_t *a, size_t n);
char *cm_arena_strdup(cm_arena_t *a, const char *s);
char *cm_arena_strndup(cm_arena_t *a, const char *s, size_t n);
/* Releases every allocation but keeps the inline block for reuse. */
void cm_arena_reset(cm_arena_t *a);
/* Releases everything; the arena may be initialised again. */
void cm_arena_free(cm_arena_t *a);

#endif
