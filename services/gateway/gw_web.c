/* The dashboard's static files, embedded at build time (services/gateway/web, tools/embed_dir.sh):
 * GET / is index.html; every other path outside /api/ names a file. No key is needed for these
 * files (they hold no data; the pages ask the API with the key the user logs in with). */
#include <stdio.h>
#include <string.h>

#include "cm_embed.h"
#include "cm_map.h"
#include "gw.h"

extern const cm_embedded_file_t gw_web_files[];
extern const size_t gw_web_n_files;

static const cm_embedded_file_t *gw__web_find(const char *path) {
    if (strcmp(path, "/") == 0) path = "/index.html";
    for (size_t i = 0; i < gw_web_n_files; i++)
        if (strcmp(gw_web_files[i].path, path) == 0) return &gw_web_files[i];
    return NULL;
}

int gw_web_serve(gw_req_t *r) {
    const char *path = cm_http_path(r->http), *method = cm_http_method(r->http);
    if (strncmp(path, "/api/", 5) == 0 || strcmp(path, "/api") == 0) return 0;
    if (strcmp(method, "GET") && strcmp(method, "HEAD")) return 0;
    const cm_embedded_file_t *f = gw__web_find(path);
    if (!f) {
        static const char msg[] = "not found\n";
        cm_http_reply(r->http, 404, "text/plain; charset=utf-8", msg, sizeof msg - 1, NULL, 0);
        r->status = 404;
        return 1;
    }
    char etag[40];
    snprintf(etag, sizeof etag, "\"%016llx\"", (unsigned long long)cm_hash64(f->data, f->len));
    const char *inm = cm_http_header(r->http, "If-None-Match");
    cm_http_header_t h[] = {
        {"ETag", etag},
        {"Cache-Control", "no-cache"},
        {"X-Content-Type-Options", "nosniff"},
        {"Content-Security-Policy", "default-src 'self'; img-src 'self' data:; style-src 'self'; frame-ancestors 'none'"},
    };
    if (inm && strcmp(inm, etag) == 0) {
        cm_http_reply(r->http, 304, NULL, "", 0, h, sizeof h / sizeof h[0]);
        r->status = 304;
        return 1;
    }
    cm_http_reply(r->http, 200, f->content_type, (const char *)f->data, f->len, h, sizeof h / sizeof h[0]);
    r->status = 200;
    return 1;
}
