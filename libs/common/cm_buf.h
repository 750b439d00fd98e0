/* A growable byte buffer for building text (metrics pages, JSON, SQL COPY rows).
 * Always NUL-terminated; cm_buf_free() releases it. Allocation failure aborts (cm_alloc.h). */
#ifndef CM_BUF_H
#define CM_BUF_H

#include <stddef.h>

typedef struct cm_buf_s {
    char *data;
    size_t len, cap;
} cm_buf_t;

#define CM_BUF_INIT {NULL, 0, 0}

void cm_buf_append(cm_buf_t *b, const char *s, size_t n);
void cm_buf_puts(cm_buf_t *b, const char *s);
void cm_buf_printf(cm_buf_t *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
void cm_buf_reset(cm_buf_t *b);
void cm_buf_free(cm_buf_t *b);

/* Bytes as lowercase hex: out receives 2n characters and a NUL. */
void cm_hex(char *out, const void *in, size_t n);
/* nbytes (at most 64) from the kernel's random source as hex (2*nbytes + NUL into out), for ids
 * and handles that must not be guessable: aborts rather than fall back to anything weaker. */
void cm_random_hex(char *out, size_t nbytes);

#endif
