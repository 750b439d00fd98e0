/* Opaque page tokens for List calls whose pages are keyed by one value (an id, a device id): the
 * token is the hex of "<kind>:<value>", so clients cannot mistake it for the value, a token of one
 * list is refused by another (kind), and what comes back is checked before it reaches SQL. */
#ifndef CM_PAGE_H
#define CM_PAGE_H

#include <stddef.h>

#include "cm_rpc.h"

#define CM_PAGE_VALUE_MAX 255

/* The token for value (at most CM_PAGE_VALUE_MAX characters of [A-Za-z0-9._:-]), in the call's
 * arena. */
char *cm_page_token(cm_call_t *call, char kind, const char *value);
/* The value of tok into out (cap bytes); "" for an empty token. 0, or INVALID_ARGUMENT after
 * failing the call for a token of another kind or one this service did not issue. */
int cm_page_token_parse_or_fail(cm_call_t *call, const char *tok, char kind, char *out, size_t cap);

#endif
