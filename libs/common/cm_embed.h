/* Files embedded into a binary at build time (tools/embed_dir.sh), served without files on disk. */
#ifndef CM_EMBED_H
#define CM_EMBED_H

#include <stddef.h>

typedef struct cm_embedded_file_s {
    const char *path;         /* "/index.html" */
    const char *content_type; /* "text/html; charset=utf-8" */
    const unsigned char *data;
    size_t len;
} cm_embedded_file_t;

#endif
