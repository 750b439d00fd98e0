/* A bounded in-memory cache of artifact chunks, shared by every download of this replica: a
 * rollout sends the same firmware to many devices, and each chunk is then read from Postgres once
 * instead of once per device. Artifacts never change (ids are not reused), so entries never go
 * stale; a deleted artifact's entries are dropped.
 *
 * Memory: at most IOT_OTA_CACHE_SIZE bytes of chunks are kept when nothing uses them; entries in
 * use by a download (between get/put and release) are never evicted, so the total may exceed the
 * cap by what in-flight downloads hold. Thread safe. */
#ifndef OTA_CACHE_H
#define OTA_CACHE_H

#include <stddef.h>
#include <stdint.h>

typedef struct ota_cache_s ota_cache_t;
typedef struct ota_chunk_s {
    const uint8_t *data;
    size_t len;
} ota_chunk_t;

/* cap_bytes 0: nothing is kept (every get misses; put hands back a private copy). */
ota_cache_t *ota_cache_new(size_t cap_bytes);
/* Entries still referenced (by data grpc has yet to write) keep the cache until their release. */
void ota_cache_free(ota_cache_t *c);
/* The chunk, referenced (release it), or NULL. */
const ota_chunk_t *ota_cache_get(ota_cache_t *c, int64_t artifact, int idx);
/* Stores a copy of data and returns it referenced (release it); when another thread stored the
 * same chunk meanwhile, that one is returned. */
const ota_chunk_t *ota_cache_put(ota_cache_t *c, int64_t artifact, int idx, const uint8_t *data, size_t len);
void ota_cache_release(ota_cache_t *c, const ota_chunk_t *chunk);
/* ota_cache_release of the chunk's own cache, for release callbacks (cm_call_send_tail). */
void ota_chunk_release(void *chunk);
/* Forgets every chunk of artifact (entries in use go when released), and keeps none of it again
 * (a download that read a chunk just before the delete does not put it back). */
void ota_cache_drop(ota_cache_t *c, int64_t artifact);
/* Bytes held now, hits and misses so far (metrics). */
void ota_cache_stats(ota_cache_t *c, size_t *bytes, uint64_t *hits, uint64_t *misses);

#endif
