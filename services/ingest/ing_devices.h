/* What ingest keeps per device in memory: checked tokens (a short-lived cache in front of
 * device-mgmt's AuthenticateDevice), the rate-limit budget, and the last-seen time that is
 * reported to device-mgmt in batches. Thread safe; state is striped by device hash so workers and
 * committers rarely contend. */
#ifndef ING_DEVICES_H
#define ING_DEVICES_H

#include <stddef.h>
#include <stdint.h>

#include "ing_config.h"

typedef struct ing_devices_s ing_devices_t;

ing_devices_t *ing_devices_new(const ing_config_t *cfg);
/* Stops the presence loop after one last report. Accepts NULL. */
void ing_devices_free(ing_devices_t *d);

/* Checks `authorization` metadata ("Bearer <token>", may be NULL). Returns CM_STATUS_OK with the
 * device id in device_id (ING_MAX_DEVICE_ID + 1 bytes), or UNAUTHENTICATED / PERMISSION_DENIED /
 * UNAVAILABLE / DEADLINE_EXCEEDED with a message in msg. Blocks on device-mgmt on a cache miss. */
int ing_devices_auth(ing_devices_t *d, const char *authorization, int64_t deadline_ms, char *device_id, char *msg,
                     size_t msg_cap);
/* Spends n points of the device's per-second budget: CM_STATUS_OK, or RESOURCE_EXHAUSTED with
 * *retry_ms set to when the budget allows again. */
int ing_devices_admit(ing_devices_t *d, const char *device_id, size_t n, int64_t *retry_ms);
/* Notes that the device sent data at when_ms (reported to device-mgmt on the next pass). */
void ing_devices_seen(ing_devices_t *d, const char *device_id, int64_t when_ms);
/* Runs one presence report now (tests, shutdown); returns how many sightings were sent. */
int ing_devices_report(ing_devices_t *d);

#endif
