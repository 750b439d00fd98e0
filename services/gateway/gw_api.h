/* The gateway's own REST resources: API keys and whoami. */
#ifndef GW_API_H
#define GW_API_H

#include "gw.h"

void gw_api_whoami(gw_req_t *r);
void gw_api_list_keys(gw_req_t *r);
void gw_api_create_key(gw_req_t *r);
void gw_api_get_key(gw_req_t *r);
void gw_api_revoke_key(gw_req_t *r);

#endif
