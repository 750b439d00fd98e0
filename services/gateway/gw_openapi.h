/* The OpenAPI 3 document of the REST API, made from the route table (see gw_openapi.c). */
#ifndef GW_OPENAPI_H
#define GW_OPENAPI_H

#include "gw.h"

/* GET /api/v1/openapi.json (no key needed: it describes, it holds no data). */
void gw_openapi(gw_req_t *r);
/* Frees the cached document at exit. */
void gw_openapi_free(void);

#endif
