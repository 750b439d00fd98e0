/* Semantic versions for ota: parsing (semver.org 2.0.0 grammar), precedence (the spec's own
 * example chain), and ranges. */
#include <string.h>

#include "ota_semver.h"
#include "test.h"

static int cmp(const char *a, const char *b) {
    ota_semver_t x, y;
    ASSERT_INT_EQ(ota_semver_parse(a, &x), 0);
    ASSERT_INT_EQ(ota_semver_parse(b, &y), 0);
    return ota_semver_cmp(&x, &y);
}

static int in(const char *v, const char *range) {
    ota_semver_t x;
    ASSERT_INT_EQ(ota_semver_parse(v, &x), 0);
    return ota_semver_in_range(&x, range);
}

static void test_parse(void) {
    const char *good[] = {"0.0.0", "1.2.3", "10.20.30", "1.0.0-alpha", "1.0.0-alpha.1", "1.0.0-0.3.7", "1.0.0-x.7.z.92",
                          "1.0.0+20130313144700", "1.0.0-beta+exp.sha.5114f85", "1.0.0-x-y-z.--", "2.0.0-rc.1+build.5"};
    const char *bad[] = {"", "1", "1.2", "1.2.3.4", "01.2.3", "1.02.3", "1.2.03", "1.2.3-", "1.2.3-01", "1.2.3+", "1.2.3-a..b",
                         "v1.2.3", " 1.2.3", "1.2.3 ", "1.2.3-a$", "99999999999999999999.0.0",
                         "1.0.0-aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"};
    ota_semver_t v;
    for (size_t i = 0; i < sizeof good / sizeof *good; i++)
        if (ota_semver_parse(good[i], &v)) TEST__FAIL("refused %s", good[i]);
    for (size_t i = 0; i < sizeof bad / sizeof *bad; i++)
        if (!ota_semver_parse(bad[i], &v)) TEST__FAIL("accepted %s", bad[i]);
    ASSERT_INT_EQ(ota_semver_parse("1.0.0-beta+exp.sha.5114f85", &v), 0);
    ASSERT(v.major == 1 && v.minor == 0 && v.patch == 0);
    ASSERT_STR_EQ(v.pre, "beta");
}

static void test_precedence(void) {
    /* semver.org, item 11. */
    const char *chain[] = {"1.0.0-alpha", "1.0.0-alpha.1", "1.0.0-alpha.beta", "1.0.0-beta", "1.0.0-beta.2",
                           "1.0.0-beta.11", "1.0.0-rc.1", "1.0.0", "2.0.0", "2.1.0", "2.1.1"};
    size_t n = sizeof chain / sizeof *chain;
    for (size_t i = 0; i < n; i++)
        for (size_t j = 0; j < n; j++) {
            int c = cmp(chain[i], chain[j]), want = i < j ? -1 : i > j;
            if (c != want) TEST__FAIL("%s vs %s: %d, want %d", chain[i], chain[j], c, want);
        }
    ASSERT_INT_EQ(cmp("1.0.0+a", "1.0.0+b"), 0); /* build metadata does not count */
    ASSERT_INT_EQ(cmp("1.10.0", "1.9.0"), 1);
}

static void test_ranges(void) {
    ASSERT_INT_EQ(in("1.5.0", ""), 1);
    ASSERT_INT_EQ(in("1.5.0", ">=1.0.0 <2.0.0"), 1);
    ASSERT_INT_EQ(in("2.0.0", ">=1.0.0 <2.0.0"), 0);
    ASSERT_INT_EQ(in("2.0.0-rc.1", "<2.0.0"), 1);
    ASSERT_INT_EQ(in("1.2.3", "1.2.3"), 1);
    ASSERT_INT_EQ(in("1.2.3", "=1.2.4"), 0);
    ASSERT_INT_EQ(in("1.1.0", "!=1.1.0"), 0);
    ASSERT_INT_EQ(in("1.1.0", ">1.0.0  <=1.1.0"), 1);
    ASSERT_INT_EQ(ota_semver_range_check(">=1.0.0 <2.0.0"), 0);
    ASSERT_INT_EQ(ota_semver_range_check(">=1.0 <2"), -1);
    ASSERT_INT_EQ(ota_semver_range_check("~1.0.0"), -1);
    ASSERT_INT_EQ(in("1.0.0", "junk"), -1);
}

TEST_MAIN(TEST_ENTRY(test_parse), TEST_ENTRY(test_precedence), TEST_ENTRY(test_ranges))
