#!/bin/sh
# make fuzz: runs each libFuzzer target for a bounded time, then prints executions and crashes per
# target and fails when any target crashed (tests/fuzz/README.md).
#   sh tests/fuzz/run.sh BUILD_DIR SECONDS [TARGET...]
# A target starts from its seeds (tests/fuzz/corpus/<t>/), its regressions
# (tests/fuzz/regressions/<t>/) and what earlier runs found (BUILD_DIR/fuzz-corpus/<t>/, where new
# inputs go); a crash, leak or timeout leaves its input in BUILD_DIR/fuzz-crashes/<t>/ and the
# output in BUILD_DIR/fuzz-logs/<t>.log.
set -u
B=${1:?usage: tests/fuzz/run.sh BUILD_DIR SECONDS [TARGET...]}
SECS=${2:?usage: tests/fuzz/run.sh BUILD_DIR SECONDS [TARGET...]}
shift 2
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
cd "$ROOT" || exit 1
targets=$*
[ -n "$targets" ] || targets=$(ls tests/fuzz/fuzz_*.c | sed 's|tests/fuzz/fuzz_||; s|\.c$||')

export ASAN_OPTIONS="detect_leaks=1${ASAN_OPTIONS:+:$ASAN_OPTIONS}"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1${UBSAN_OPTIONS:+:$UBSAN_OPTIONS}"

crashed=0
printf '%-10s %8s %12s %8s %8s %8s  %s\n' target seconds executions exec/s corpus crashes "crash inputs"
for t in $targets; do
    bin=$B/fuzz/fuzz_$t
    if [ ! -x "$bin" ]; then
        echo "$t: no $bin (make VARIANT=fuzz fuzz-bins)"
        crashed=$((crashed + 1))
        continue
    fi
    work=$B/fuzz-corpus/$t
    art=$B/fuzz-crashes/$t
    log=$B/fuzz-logs/$t.log
    rm -rf "$art"
    mkdir -p "$work" "$art" "$B/fuzz-logs"
    set -- "$work" "tests/fuzz/corpus/$t"
    [ -d "tests/fuzz/regressions/$t" ] && set -- "$@" "tests/fuzz/regressions/$t"
    [ -f "tests/fuzz/$t.dict" ] && set -- "-dict=tests/fuzz/$t.dict" "$@"
    start=$(date +%s)
    "$bin" -max_total_time="$SECS" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
        -artifact_prefix="$art/" "$@" >"$log" 2>&1
    rc=$?
    secs=$(($(date +%s) - start))
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n 1)
    rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -n 1)
    corpus=$(sed -n 's/.* corp: \([0-9]*\)\/.*/\1/p' "$log" | tail -n 1)
    n=$(ls "$art" | wc -l)
    if [ "$rc" -ne 0 ] && [ "$n" -eq 0 ]; then n=1; fi # died without leaving an input: still a failure
    [ "$n" -gt 0 ] && crashed=$((crashed + 1))
    printf '%-10s %8s %12s %8s %8s %8s  %s\n' "$t" "$secs" "${execs:-?}" "${rate:-?}" "${corpus:-?}" "$n" \
        "$(ls "$art" 2>/dev/null | sed "s|^|$art/|" | tr '\n' ' ')"
done
[ "$crashed" -eq 0 ] || echo "$crashed target(s) crashed: see $B/fuzz-logs/ and $B/fuzz-crashes/"
[ "$crashed" -eq 0 ]
