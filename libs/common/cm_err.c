/* cm_strerror(): the message half of the CM_ERRNO_MAP table. */
#include "cm_err.h"

const char *cm_strerror(int err) {
    switch (err) {
    case 0:
        return "ok";
#define CM__ERR_CASE(name, msg) \
    case CM_E##name:            \
        return msg;
        CM_ERRNO_MAP(CM__ERR_CASE)
#undef CM__ERR_CASE
    default:
        return "unknown error";
    }
}
