/* Minimal test framework: assertion macros and one table of tests per program.
 *
 * Each test prints "ok - <prog>/<test>" or "not ok - <prog>/<test>" plus the failing assertion;
 * the program ends with "<prog>: N passed, N failed" and exits non-zero on any failure.
 * tests/run.sh adds the counts of all programs listed in tests/tests.list. A failing ASSERT ends
 * the current test (longjmp), so later assertions never run on a broken state. Tests should free
 * what they allocate even so: the suite also runs under LeakSanitizer. */
#ifndef TEST_H
#define TEST_H

#include <setjmp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct test_case_s {
    const char *name;
    void (*fn)(void);
} test_case_t;

extern jmp_buf test__jmp;
extern int test__failed;

#define TEST__FAIL(...)                                                   \
    do {                                                                  \
        fprintf(stdout, "    %s:%d: ", __FILE__, __LINE__);               \
        fprintf(stdout, __VA_ARGS__);                                     \
        fprintf(stdout, "\n");                                            \
        fflush(stdout);                                                   \
        test__failed = 1;                                                 \
        longjmp(test__jmp, 1);                                            \
    } while (0)

#define ASSERT(cond)                                  \
    do {                                              \
        if (!(cond)) TEST__FAIL("assertion failed: %s", #cond); \
    } while (0)

#define ASSERT_INT_EQ(a, b)                                                                     \
    do {                                                                                        \
        long long test__a = (long long)(a), test__b = (long long)(b);                           \
        if (test__a != test__b) TEST__FAIL("%s == %s: got %lld, want %lld", #a, #b, test__a, test__b); \
    } while (0)

#define ASSERT_STR_EQ(a, b)                                                                      \
    do {                                                                                         \
        const char *test__a = (a), *test__b = (b);                                               \
        if (!test__a || !test__b || strcmp(test__a, test__b) != 0)                              \
            TEST__FAIL("%s == %s: got \"%s\", want \"%s\"", #a, #b, test__a ? test__a : "(null)", \
                       test__b ? test__b : "(null)");                                            \
    } while (0)

#define TEST_ENTRY(fn) {#fn, fn}

/* Runs the table; with an argument runs only tests whose name contains it. */
int test_main(const char *prog, const test_case_t *tests, size_t n, int argc, char **argv);

#define TEST_MAIN(...)                                                                         \
    int main(int argc, char **argv) {                                                          \
        static const test_case_t tests[] = {__VA_ARGS__};                                      \
        return test_main(argv[0], tests, sizeof tests / sizeof tests[0], argc, argv);          \
    }

/* Environment helpers for integration tests (set by tests/run.sh). */
const char *test_env(const char *name); /* value, or skips nothing: fails the test if unset */
const char *test_tmpdir(void);          /* $IOT_TEST_TMP: a per-run scratch directory */

#endif
