/* Test runner behind test.h. */
#include "test.h"

#include "cm_log.h"

#include <stdlib.h>
#include <string.h>
#include <time.h>

jmp_buf test__jmp;
int test__failed;

/* Kept apart from the loop so that longjmp cannot clobber the loop's locals. */
static int test__run_one(void (*fn)(void)) {
    test__failed = 0;
    if (setjmp(test__jmp) == 0) fn();
    return test__failed;
}

int test_main(const char *prog, const test_case_t *tests, size_t n, int argc, char **argv) {
    const char *base = strrchr(prog, '/');
    base = base ? base + 1 : prog;
    int passed = 0, failed = 0;
    setvbuf(stdout, NULL, _IOLBF, 0);
    /* Library logs from in-process servers are noise in test output unless asked for. */
    const char *lvl = getenv("IOT_TEST_LOG_LEVEL");
    int level = lvl ? cm_log_level_parse(lvl) : CM_LOG_OFF;
    cm_log_init("test", level < 0 ? CM_LOG_OFF : (cm_log_level_t)level);
    for (size_t i = 0; i < n; i++) {
        if (argc > 1 && !strstr(tests[i].name, argv[1])) continue;
        struct timespec t0, t1;
        clock_gettime(CLOCK_MONOTONIC, &t0);
        int bad = test__run_one(tests[i].fn);
        clock_gettime(CLOCK_MONOTONIC, &t1);
        double ms = (double)(t1.tv_sec - t0.tv_sec) * 1e3 + (double)(t1.tv_nsec - t0.tv_nsec) / 1e6;
        printf("%s - %s/%s (%.0f ms)\n", bad ? "not ok" : "ok", base, tests[i].name, ms);
        if (bad)
            failed++;
        else
            passed++;
    }
    printf("%s: %d passed, %d failed\n", base, passed, failed);
    return failed ? 1 : 0;
}

const char *test_env(const char *name) {
    const char *v = getenv(name);
    if (!v || !*v) TEST__FAIL("%s is not set: run the tests through tests/run.sh (make test)", name);
    return v;
}

const char *test_tmpdir(void) {
    return test_env("IOT_TEST_TMP");
}
