/* Semantic versions and ranges (services/ota/ota_semver.c): what UploadArtifact, CheckForUpdate
 * and CreateRollout parse from clients, and what the rollout controller compares.
 *
 * Input: lines (separated by '\n'): three versions and a range, e.g. "1.2.3-rc.1\n1.2.3\n2.0.0\n>=1.0.0 <2.0.0".
 *
 * Properties beyond "no crash or undefined behaviour":
 *   - a parsed version is at most OTA_VERSION_MAX characters and its canonical form
 *     (MAJOR.MINOR.PATCH[-pre]) parses to the same version;
 *   - precedence is a total order: cmp(a, a) = 0, cmp(a, b) = -cmp(b, a), and transitive;
 *   - ranges: in_range is -1 exactly when range_check refuses; "" matches everything; =v, !=v,
 *     >=b, <b agree with cmp. */
#include "fuzz.h"

#include <inttypes.h>

#include "ota_semver.h"

static int fz_sign(int c) { return (c > 0) - (c < 0); }

/* MAJOR.MINOR.PATCH[-pre] of v; 0 when it does not fit a version (then there is nothing to check). */
static int fz_canon(const ota_semver_t *v, char *out, size_t cap) {
    int n = snprintf(out, cap, "%" PRIu64 ".%" PRIu64 ".%" PRIu64 "%s%s", v->major, v->minor, v->patch, *v->pre ? "-" : "", v->pre);
    return n > 0 && (size_t)n < cap && n <= OTA_VERSION_MAX;
}

static void fz_range_agrees(const ota_semver_t *v, const char *op, const ota_semver_t *b, int want) {
    char canon[OTA_VERSION_MAX + 1], range[OTA_VERSION_MAX + 8];
    if (!fz_canon(b, canon, sizeof canon)) return;
    snprintf(range, sizeof range, "%s%s", op, canon);
    int got = ota_semver_in_range(v, range);
    FZ_ASSERT(got == want, "in_range(v, \"%s\") = %d, precedence says %d", range, got, want);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    fz_t in = {data, size};
    char *s[3], *range = NULL;
    ota_semver_t v[3];
    int ok[3];
    for (int i = 0; i < 3; i++) {
        s[i] = fz_str(&in, '\n');
        ok[i] = ota_semver_parse(s[i], &v[i]) == 0;
        if (!ok[i]) continue;
        FZ_ASSERT(strlen(s[i]) <= OTA_VERSION_MAX, "\"%s\" parsed", s[i]);
        char canon[OTA_VERSION_MAX + 1];
        ota_semver_t again;
        if (fz_canon(&v[i], canon, sizeof canon)) {
            FZ_ASSERT(ota_semver_parse(canon, &again) == 0 && ota_semver_cmp(&again, &v[i]) == 0 && !strcmp(again.pre, v[i].pre),
                      "\"%s\" parsed, its canonical form \"%s\" parses differently", s[i], canon);
        }
        FZ_ASSERT(ota_semver_cmp(&v[i], &v[i]) == 0, "\"%s\" is not equal to itself", s[i]);
    }
    range = fz_str(&in, '\n');
    for (int i = 0; i < 3; i++)
        for (int j = 0; j < 3; j++)
            if (ok[i] && ok[j])
                FZ_ASSERT(fz_sign(ota_semver_cmp(&v[i], &v[j])) == -fz_sign(ota_semver_cmp(&v[j], &v[i])), "\"%s\" and \"%s\" are not antisymmetric",
                          s[i], s[j]);
    if (ok[0] && ok[1] && ok[2]) {
        int ab = ota_semver_cmp(&v[0], &v[1]), bc = ota_semver_cmp(&v[1], &v[2]), ac = ota_semver_cmp(&v[0], &v[2]);
        if (ab <= 0 && bc <= 0) FZ_ASSERT(ac <= 0, "\"%s\" <= \"%s\" <= \"%s\" but not the first <= the last", s[0], s[1], s[2]);
        if (ab >= 0 && bc >= 0) FZ_ASSERT(ac >= 0, "\"%s\" >= \"%s\" >= \"%s\" but not the first >= the last", s[0], s[1], s[2]);
    }
    int valid = ota_semver_range_check(range) == 0;
    for (int i = 0; i < 3; i++) {
        if (!ok[i]) continue;
        int m = ota_semver_in_range(&v[i], range);
        FZ_ASSERT((m >= 0) == valid, "range \"%s\": check says %s, in_range says %d", range, valid ? "valid" : "invalid", m);
        FZ_ASSERT(ota_semver_in_range(&v[i], "") == 1, "\"\" does not match \"%s\"", s[i]);
        fz_range_agrees(&v[i], "=", &v[i], 1);
        fz_range_agrees(&v[i], "!=", &v[i], 0);
        for (int j = 0; j < 3; j++) {
            if (!ok[j]) continue;
            int c = ota_semver_cmp(&v[i], &v[j]);
            fz_range_agrees(&v[i], ">=", &v[j], c >= 0);
            fz_range_agrees(&v[i], "<", &v[j], c < 0);
        }
    }
    for (int i = 0; i < 3; i++) free(s[i]);
    free(range);
    return 0;
}
