/* Replays fuzz inputs as an ordinary test (tests/tests.list): the fuzz target linked with this
 * main instead of libFuzzer runs every file of tests/fuzz/corpus/<name>/ and
 * tests/fuzz/regressions/<name>/ (or the files and directories given as arguments) through
 * LLVMFuzzerTestOneInput, so that every crash ever found keeps being checked, with gcc and under
 * ASan/UBSan. A crash ends the program (tests/run.sh counts it as a failure); a property a target
 * checks aborts the same way. Each input is copied into a buffer of exactly its size, as libFuzzer
 * does, so that a read past its end is caught by ASan. */
#include <dirent.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "fuzz.h"

/* Targets without set-up do not define it. */
__attribute__((weak)) int LLVMFuzzerInitialize(int *argc, char ***argv);

static int fz__run_file(const char *path) {
    FILE *fp = fopen(path, "rb");
    if (!fp) return -1;
    size_t cap = 4096, n = 0;
    uint8_t *buf = malloc(cap);
    size_t r;
    while (buf && (r = fread(buf + n, 1, cap - n, fp)) > 0) {
        n += r;
        if (n == cap) buf = realloc(buf, cap *= 2);
    }
    fclose(fp);
    if (!buf) return -1;
    uint8_t *exact = malloc(n ? n : 1);
    if (!exact) return -1;
    memcpy(exact, buf, n);
    free(buf);
    LLVMFuzzerTestOneInput(exact, n);
    free(exact);
    return 0;
}

static int fz__by_name(const struct dirent **a, const struct dirent **b) { return strcmp((*a)->d_name, (*b)->d_name); }

/* Runs a file, or every regular file of a directory; the number run, or -1 when path cannot be read. */
static long fz__run_path(const char *path) {
    struct stat st;
    if (stat(path, &st) != 0) return -1;
    if (!S_ISDIR(st.st_mode)) return fz__run_file(path) == 0 ? 1 : -1;
    struct dirent **ents;
    int n = scandir(path, &ents, NULL, fz__by_name);
    if (n < 0) return -1;
    long ran = 0;
    for (int i = 0; i < n; i++) {
        char file[4096];
        snprintf(file, sizeof file, "%s/%s", path, ents[i]->d_name);
        if (ents[i]->d_name[0] != '.' && stat(file, &st) == 0 && S_ISREG(st.st_mode)) {
            fflush(stdout);
            if (fz__run_file(file) == 0) ran++;
        }
        free(ents[i]);
    }
    free(ents);
    return ran;
}

int main(int argc, char **argv) {
    const char *prog = strrchr(argv[0], '/');
    prog = prog ? prog + 1 : argv[0];
    const char *name = strncmp(prog, "fuzz_", 5) == 0 ? prog + 5 : prog;
    setvbuf(stdout, NULL, _IOLBF, 0);
    if (LLVMFuzzerInitialize) LLVMFuzzerInitialize(&argc, &argv);
    int passed = 0, failed = 0;
    if (argc > 1) {
        for (int i = 1; i < argc; i++) {
            long ran = fz__run_path(argv[i]);
            printf("%s - %s/%s (%ld inputs)\n", ran < 0 ? "not ok" : "ok", prog, argv[i], ran < 0 ? 0 : ran);
            if (ran < 0) failed++;
            else passed++;
        }
    } else {
        /* The corpus must exist and hold something; a target may have no regressions yet. */
        char corpus[512], regressions[512];
        snprintf(corpus, sizeof corpus, "tests/fuzz/corpus/%s", name);
        snprintf(regressions, sizeof regressions, "tests/fuzz/regressions/%s", name);
        long ran = fz__run_path(corpus);
        printf("%s - %s/corpus (%ld inputs)\n", ran > 0 ? "ok" : "not ok", prog, ran < 0 ? 0 : ran);
        if (ran > 0) passed++;
        else failed++;
        struct stat st;
        ran = stat(regressions, &st) == 0 ? fz__run_path(regressions) : 0;
        printf("%s - %s/regressions (%ld inputs)\n", ran >= 0 ? "ok" : "not ok", prog, ran < 0 ? 0 : ran);
        if (ran >= 0) passed++;
        else failed++;
    }
    printf("%s: %d passed, %d failed\n", prog, passed, failed);
    return failed ? 1 : 0;
}
