/* Semantic versions (semver.org 2.0.0): parsing, precedence, and ranges of comparators. */
#ifndef OTA_SEMVER_H
#define OTA_SEMVER_H

#include <stdint.h>

#define OTA_VERSION_MAX 64

typedef struct ota_semver_s {
    uint64_t major, minor, patch;
    char pre[OTA_VERSION_MAX + 1]; /* dot-separated pre-release identifiers; "" for a release */
} ota_semver_t;

/* 0, or -1 when s is not MAJOR.MINOR.PATCH[-pre][+build] (no leading zeros, up to 64 characters). */
int ota_semver_parse(const char *s, ota_semver_t *v);
/* <0, 0, >0 by precedence (build metadata ignored; 1.0.0-rc.1 < 1.0.0). */
int ota_semver_cmp(const ota_semver_t *a, const ota_semver_t *b);
/* A range is comparators separated by spaces, all of which must hold: ">=1.0.0 <2.0.0", "=1.2.3",
 * "1.2.3" (same as "="), "!=1.1.0". 0 when valid; -1 otherwise. */
int ota_semver_range_check(const char *range);
/* 1 when v satisfies range ("" matches everything), 0 when not, -1 for an invalid range. */
int ota_semver_in_range(const ota_semver_t *v, const char *range);

#endif
