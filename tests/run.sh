#!/bin/sh
# Runs every test listed in tests/tests.list against a throwaway Postgres and Redis.
#   sh tests/run.sh BUILD_DIR [FILTER]
# Each line of the list is "c <binary under BUILD_DIR/tests>" or "node <script>". Each program
# prints its own results and a "<name>: N passed, N failed" line; this script adds them up and
# ends with the total. A program that crashes, leaks (sanitizers) or times out counts as a failure.
set -u
B=${1:?usage: tests/run.sh BUILD_DIR [FILTER]}
FILTER=${2:-}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
. tests/support/harness.sh

tmp=$(mktemp -d)
harness_init "$tmp"
trap 'harness_cleanup' EXIT
trap 'exit 130' INT TERM

harness_start_postgres || { echo "0 passed, 1 failed"; exit 1; }
harness_start_redis || { echo "0 passed, 1 failed"; exit 1; }
IOT_TEST_TMP=$tmp
IOT_BUILD_DIR=$ROOT/$B
export IOT_TEST_TMP IOT_BUILD_DIR
: "${IOT_LOG_LEVEL:=warn}"
export IOT_LOG_LEVEL
# grpc core logs handshake failures and bind errors on stderr; the tests provoke both on purpose.
: "${GRPC_VERBOSITY:=NONE}"
export GRPC_VERBOSITY
export LSAN_OPTIONS="suppressions=$ROOT/tests/lsan.supp:print_suppressions=0${LSAN_OPTIONS:+:$LSAN_OPTIONS}"
export ASAN_OPTIONS="detect_leaks=1:abort_on_error=0${ASAN_OPTIONS:+:$ASAN_OPTIONS}"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1${UBSAN_OPTIONS:+:$UBSAN_OPTIONS}"

total_pass=0
total_fail=0
while read -r kind name timeout_s; do
    case "$kind" in ''|\#*) continue ;; esac
    [ -n "$FILTER" ] && case "$name" in *"$FILTER"*) ;; *) continue ;; esac
    log=$tmp/$(echo "$name" | tr '/' '_').log
    case "$kind" in
    c) cmd="$ROOT/$B/tests/$name" ;;
    node) cmd="node $ROOT/tests/$name" ;;
    *) echo "tests.list: unknown kind '$kind'"; total_fail=$((total_fail + 1)); continue ;;
    esac
    echo "# $name"
    timeout "${timeout_s:-600}" $cmd >"$log" 2>&1
    rc=$?
    cat "$log"
    line=$(grep -E '^[A-Za-z0-9_.-]+: [0-9]+ passed, [0-9]+ failed$' "$log" | tail -n 1)
    p=$(echo "$line" | sed -E 's/.* ([0-9]+) passed.*/\1/')
    f=$(echo "$line" | sed -E 's/.* ([0-9]+) failed.*/\1/')
    [ -n "$line" ] || { p=0; f=0; }
    if [ "$rc" -ne 0 ] && [ "$f" -eq 0 ]; then
        # Crashed, timed out or reported a leak after its tests passed: that is a failure too.
        echo "not ok - $name exited with status $rc"
        f=1
    fi
    total_pass=$((total_pass + p))
    total_fail=$((total_fail + f))
done < tests/tests.list

if [ -z "$FILTER" ]; then
    # A test program that is not in the list would never run: that is a failure too.
    for f in tests/unit/*.c tests/integration/*.c tests/fuzz/fuzz_*.c tests/*/*.test.js; do
        case "$f" in
        *.c) entry="c ${f#tests/}"; entry=${entry%.c} ;;
        *) entry="node ${f#tests/}" ;;
        esac
        if ! grep -q "^$entry " tests/tests.list; then
            echo "not ok - $f is not in tests/tests.list"
            total_fail=$((total_fail + 1))
        fi
    done
fi
echo "$total_pass passed, $total_fail failed"
[ "$total_fail" -eq 0 ]
