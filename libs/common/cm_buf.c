/* cm_buf_t: growable NUL-terminated buffer. */
#include "cm_buf.h"
#include "cm_alloc.h"

#include <stdarg.h>
#include <stdlib.h>
#include <stdio.h>
#include <string.h>
#include <sys/random.h>

static void cm__buf_reserve(cm_buf_t *b, size_t extra) {
    if (b->len + extra + 1 <= b->cap) return;
    size_t cap = b->cap ? b->cap : 256;
    while (cap < b->len + extra + 1) cap *= 2;
    b->data = cm_realloc(b->data, cap);
    b->cap = cap;
}

void cm_buf_append(cm_buf_t *b, const char *s, size_t n) {
    cm__buf_reserve(b, n);
    memcpy(b->data + b->len, s, n);
    b->len += n;
    b->data[b->len] = '\0';
}

void cm_buf_puts(cm_buf_t *b, const char *s) {
    cm_buf_append(b, s, strlen(s));
}

void cm_buf_printf(cm_buf_t *b, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    char small[256];
    int n = vsnprintf(small, sizeof small, fmt, ap);
    va_end(ap);
    if (n < 0) return;
    if ((size_t)n < sizeof small) {
        cm_buf_append(b, small, (size_t)n);
        return;
    }
    cm__buf_reserve(b, (size_t)n);
    va_start(ap, fmt);
    vsnprintf(b->data + b->len, (size_t)n + 1, fmt, ap);
    va_end(ap);
    b->len += (size_t)n;
}

void cm_buf_reset(cm_buf_t *b) {
    b->len = 0;
    if (b->data) b->data[0] = '\0';
}

void cm_buf_free(cm_buf_t *b) {
    cm_free(b->data);
    b->data = NULL;
    b->len = b->cap = 0;
}

void cm_hex(char *out, const void *in, size_t n) {
    static const char hex[] = "0123456789abcdef";
    const unsigned char *p = in;
    for (size_t i = 0; i < n; i++) {
        out[2 * i] = hex[p[i] >> 4];
        out[2 * i + 1] = hex[p[i] & 15];
    }
    out[2 * n] = '\0';
}

void cm_random_hex(char *out, size_t nbytes) {
    unsigned char raw[64];
    if (nbytes > sizeof raw || getrandom(raw, nbytes, 0) != (ssize_t)nbytes) abort();
    cm_hex(out, raw, nbytes);
}
