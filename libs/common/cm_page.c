/* Opaque page tokens (see cm_page.h). */
#include "cm_page.h"

#include <ctype.h>
#include <stdio.h>
#include <string.h>

#include "cm_buf.h"

char *cm_page_token(cm_call_t *call, char kind, const char *value) {
    char raw[CM_PAGE_VALUE_MAX + 3];
    int n = snprintf(raw, sizeof raw, "%c:%s", kind, value);
    if (n >= (int)sizeof raw) n = (int)sizeof raw - 1;
    char *out = cm_call_alloc(call, (size_t)n * 2 + 1);
    cm_hex(out, raw, (size_t)n);
    return out;
}

int cm_page_token_parse_or_fail(cm_call_t *call, const char *tok, char kind, char *out, size_t cap) {
    out[0] = 0;
    size_t n = strlen(tok);
    if (!n) return 0;
    char raw[CM_PAGE_VALUE_MAX + 3];
    if (n % 2 || n / 2 >= sizeof raw || n < 6) goto bad;
    for (size_t i = 0; i < n / 2; i++) {
        unsigned v;
        if (!isxdigit((unsigned char)tok[2 * i]) || !isxdigit((unsigned char)tok[2 * i + 1]) || sscanf(tok + 2 * i, "%2x", &v) != 1)
            goto bad;
        raw[i] = (char)v;
    }
    raw[n / 2] = 0;
    if (raw[0] != kind || raw[1] != ':' || strlen(raw) != n / 2 || strlen(raw + 2) >= cap) goto bad;
    for (const char *p = raw + 2; *p; p++)
        if (!isalnum((unsigned char)*p) && !strchr("._:-", *p)) goto bad;
    memcpy(out, raw + 2, strlen(raw + 2) + 1);
    return 0;
bad:
    return cm_call_fail(call, CM_STATUS_INVALID_ARGUMENT, "page_token: not a token this call issued; start again without one");
}
