/* What the fuzz targets share: a reader that carves an input into the pieces a target needs, and
 * FZ_ASSERT for the properties a target checks beyond "does not crash".
 *
 * Every tests/fuzz/fuzz_<name>.c defines LLVMFuzzerTestOneInput (and LLVMFuzzerInitialize when it
 * needs set-up). `make fuzz` links it with libFuzzer; the ordinary build links it with driver.c,
 * which replays tests/fuzz/corpus/<name>/ and tests/fuzz/regressions/<name>/ (README.md). */
#ifndef FUZZ_H
#define FUZZ_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);
int LLVMFuzzerInitialize(int *argc, char ***argv);

/* A property that must hold: on violation, say which and abort (libFuzzer keeps the input). */
#define FZ_ASSERT(cond, ...)                                                        \
    do {                                                                            \
        if (!(cond)) {                                                              \
            fprintf(stderr, "%s:%d: property violated: %s: ", __FILE__, __LINE__, #cond); \
            fprintf(stderr, __VA_ARGS__);                                           \
            fprintf(stderr, "\n");                                                  \
            abort();                                                                \
        }                                                                           \
    } while (0)

typedef struct fz_s {
    const uint8_t *p;
    size_t n;
} fz_t;

/* The next byte, or 0 when the input is used up. */
static inline unsigned fz_byte(fz_t *f) {
    if (!f->n) return 0;
    f->n--;
    return *f->p++;
}

/* The next up-to-len bytes (fewer at the end); *got says how many. */
static inline const uint8_t *fz_bytes(fz_t *f, size_t len, size_t *got) {
    const uint8_t *p = f->p;
    *got = len < f->n ? len : f->n;
    f->p += *got;
    f->n -= *got;
    return p;
}

/* The bytes up to the next `sep` (or the end), as a NUL-terminated copy the caller frees. Inputs
 * split this way keep their pieces readable in a corpus file. */
static inline char *fz_str(fz_t *f, uint8_t sep) {
    const uint8_t *end = memchr(f->p, sep, f->n);
    size_t len = end ? (size_t)(end - f->p) : f->n;
    char *s = malloc(len + 1);
    if (!s) abort();
    memcpy(s, f->p, len);
    s[len] = 0;
    f->p += len + (end != NULL);
    f->n -= len + (end != NULL);
    return s;
}

#endif
