#!/usr/bin/env bash
# make bench: the gRPC layer against grpc++ reference servers, driven by one load generator in the
# same run. Servers: ours (tests/echo_server on libs/common), grpc++ async (CQ per thread) and
# grpc++ callback. Each scenario runs ROUNDS times in the order ours, async, callback, ours, ...
# (A B C A B C) and reports medians and ratios ours/reference. Then memory: idle RSS of a service
# with default settings, and with 10,000 idle client streams open. Then the registry: Discover
# against raw Redis reads, and instance death to watcher event. Then device-mgmt against raw
# COPY/Redis/SQL, and ingest against raw COPY (points/s, ack latency, RSS, 10,000 open streams),
# then ingest's points/s over a range of device counts. Then processing and ota, each against raw
# Redis/TCP references.
# Last the gateway: REST GET of a device (wrk) against the same GetDevice over gRPC directly.
# Every figure also goes into one table, BENCH_RESULTS/latest.md (bench/report.sh), written at exit
# even when a section fails; the ingest sweep over ING_SWEEP devices also goes to
# ingest-devices.tsv and ingest-devices.svg there.
#   BENCH_THREADS (2)  worker threads for ours and the async reference (callback: grpc's pool)
#   ROUNDS (3), SECONDS_PER_RUN (2), IDLE_STREAMS (10000)
#   ING_DEVICES (1000), ING_POINTS (2000 per device and round), ING_STREAMS (10000)
#   ING_SWEEP ("1 10 100 1000 5000" devices), ING_SWEEP_SECONDS (3 per step)
#   BENCH_RESULTS (bench/results)  where latest.md and the sweep's TSV and SVG go
set -uo pipefail
B=${1:?usage: bench/run.sh BUILD_DIR}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
THREADS=${BENCH_THREADS:-2}
ROUNDS=${ROUNDS:-3}
SECS=${SECONDS_PER_RUN:-2}
IDLE=${IDLE_STREAMS:-10000}
BENCH_RESULTS=${BENCH_RESULTS:-$ROOT/bench/results}
LOADGEN=$B/bench/loadgen
tmp=$(mktemp -d)
chmod 755 "$tmp" # the postgres user must reach the harness directory inside
pids=()
. tests/support/harness.sh
. bench/report.sh
harness_init "$tmp/stores"
report_init "$tmp"
# Every knob as this run uses it, for the results header (the defaults are those of each section).
knobs="BENCH_THREADS=$THREADS ROUNDS=$ROUNDS SECONDS_PER_RUN=$SECS IDLE_STREAMS=$IDLE"
knobs+=" ING_DEVICES=${ING_DEVICES:-1000} ING_POINTS=${ING_POINTS:-2000} ING_STREAMS=${ING_STREAMS:-10000}"
knobs+=" ING_SWEEP=\"${ING_SWEEP:-1 10 100 1000 5000}\" ING_SWEEP_SECONDS=${ING_SWEEP_SECONDS:-3}"
knobs+=" PROC_DEVICES=${PROC_DEVICES:-1000} PROC_RULES=${PROC_RULES:-1000} PROC_FEED_POINTS=${PROC_FEED_POINTS:-20000}"
knobs+=" PROC_RATE=${PROC_RATE:-50000} PROC_SECONDS=${PROC_SECONDS:-20} PROC_BATCH=${PROC_BATCH:-50}"
knobs+=" PROC_MEM_RULES=${PROC_MEM_RULES:-100} OTA_MB=${OTA_MB:-16} OTA_DL_ROUNDS=${OTA_DL_ROUNDS:-7}"
knobs+=" OTA_CONCURRENT=${OTA_CONCURRENT:-100}"
cleanup() {
    local rc=$?
    report_render "$rc"
    for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null; done
    # Redis first: it is a child of this shell too, and `wait` would wait for it forever.
    harness_cleanup
    wait 2>/dev/null
    rm -rf "$tmp"
}
trap cleanup EXIT

# start NAME CMD... : starts a server, waits for its "grpc=<port>" line, sets PORT and PID.
start() {
    local name=$1
    shift
    "$@" >"$tmp/$name.out" 2>"$tmp/$name.err" &
    PID=$!
    pids+=("$PID")
    for _ in $(seq 100); do
        PORT=$(sed -n 's/.*grpc=\([0-9]*\).*/\1/p' "$tmp/$name.out" | head -n 1)
        [ -n "$PORT" ] && return 0
        sleep 0.1
    done
    echo "bench: $name did not start"; cat "$tmp/$name.err"; die "$name did not start"
}

section "gRPC layer"
start ours env IOT_LOG_LEVEL=warn IOT_GRPC_THREADS="$THREADS" IOT_ADMIN_LISTEN=127.0.0.1:0 "$B/tests/echo_server"
P_OURS=$PORT
start async env BENCH_THREADS="$THREADS" "$B/bench/ref_async_server"
P_ASYNC=$PORT
start callback "$B/bench/ref_callback_server"
P_CB=$PORT

median() { sort -g | awk '{a[NR]=$1} END {if (NR==0) print 0; else if (NR%2) print a[(NR+1)/2]; else print (a[NR/2]+a[NR/2+1])/2}'; }
field() { sed -n "s/.*$1=\([0-9.]*\).*/\1/p"; }

echo "iotsuite bench: $(nproc) cores, BENCH_THREADS=$THREADS, $ROUNDS rounds x ${SECS}s, order ours/async/callback"
echo
printf '%-26s %12s %12s %12s %10s %10s\n' scenario ours grpc++async grpc++cb ours/async ours/cb

run_scenario() { # label mode extra-args...; fields
    local label=$1 mode=$2
    shift 2
    local args=("$@")
    for r in $(seq "$ROUNDS"); do
        for s in ours async callback; do
            case $s in ours) p=$P_OURS ;; async) p=$P_ASYNC ;; callback) p=$P_CB ;; esac
            "$LOADGEN" --target "127.0.0.1:$p" --mode "$mode" --seconds "$SECS" "${args[@]}" >>"$tmp/$label.$s" 2>&1 ||
                warn "loadgen $label against $s reported errors: $(tail -n 1 "$tmp/$label.$s")"
        done
    done
}

report() { # label key fmt-name [lower]
    local label=$1 key=$2 name=$3 better=${4:-higher}
    local o a c
    o=$(field "$key" <"$tmp/$label.ours" | median)
    a=$(field "$key" <"$tmp/$label.async" | median)
    c=$(field "$key" <"$tmp/$label.callback" | median)
    printf '%-26s %12.1f %12.1f %12.1f %10.2f %10.2f\n' "$label $name" "$o" "$a" "$c" \
        "$(awk -v x="$o" -v y="$a" 'BEGIN{print (y>0)?x/y:0}')" "$(awk -v x="$o" -v y="$c" 'BEGIN{print (y>0)?x/y:0}')"
    row "$label $name" %.1f "$o" "grpc++ async server (CQ per thread, $THREADS threads), same load" "$a" "$better"
    row "$label $name" %.1f "$o" "grpc++ callback server (grpc's pool), same load" "$c" "$better"
}

for c in 1 16 64; do
    run_scenario "unary_c$c" unary --concurrency "$c"
    report "unary_c$c" qps "QPS"
    report "unary_c$c" p50_us "p50 us" lower
    report "unary_c$c" p99_us "p99 us" lower
done
run_scenario stream_single record --streams 2
report stream_single points_per_s "msgs/s"
run_scenario stream_batch100 batch --streams 2
report stream_batch100 points_per_s "points/s"

threads_of() { awk '/^Threads/ {print $2}' "/proc/$1/status"; }

section memory
echo
# Memory: a fresh server with default settings (no environment), idle, then holding idle streams;
# the grpc++ callback reference holds the same streams for comparison.
rss_mb() { awk '/^VmRSS/ {printf "%.1f", $2 / 1024}' "/proc/$1/status"; }
hold_idle() { # pid port label; sets HOLD_MB, HOLD_THREADS
    local pid=$1 port=$2 label=$3
    rm -f "$tmp/hold"
    mkfifo "$tmp/hold"
    "$LOADGEN" --target "127.0.0.1:$port" --mode idle --streams "$IDLE" --channels 10 <"$tmp/hold" >"$tmp/idle.out" 2>&1 &
    local lg=$!
    exec 3>"$tmp/hold"
    for _ in $(seq 600); do grep -q ready "$tmp/idle.out" && break; sleep 0.1; done
    sleep 1
    HOLD_MB=$(rss_mb "$pid")
    HOLD_THREADS=$(threads_of "$pid")
    printf '%-44s %8s MB  (%s threads; %s)\n' "$label with $IDLE idle streams:" "$HOLD_MB" "$HOLD_THREADS" "$(cat "$tmp/idle.out")"
    grep -q 'failed=0' "$tmp/idle.out" || warn "$label: not every idle stream opened: $(cat "$tmp/idle.out")"
    exec 3>&-
    wait "$lg"
}
start idle env -u IOT_GRPC_THREADS IOT_LOG_LEVEL=warn "$B/tests/echo_server"
P_IDLE=$PORT
IDLE_PID=$PID
start idle_ref "$B/bench/ref_callback_server"
P_IDLE_REF=$PORT
IDLE_REF_PID=$PID
sleep 1
pss=$(awk '/^Pss:/ {printf "%.1f", $2 / 1024}' "/proc/$IDLE_PID/smaps_rollup")
anon=$(awk '/^Private_Dirty:/ {printf "%.1f", $2 / 1024}' "/proc/$IDLE_PID/smaps_rollup")
idle_mb=$(rss_mb "$IDLE_PID")
idle_thr=$(threads_of "$IDLE_PID")
ref_mb=$(rss_mb "$IDLE_REF_PID")
ref_thr=$(threads_of "$IDLE_REF_PID")
printf '%-44s %8s MB  (%s threads; PSS %s MB, private dirty %s MB; the rest is shared library pages)\n' \
    "ours idle, default settings:" "$idle_mb" "$idle_thr" "$pss" "$anon"
printf '%-44s %8s MB  (%s threads)\n' "grpc++ callback idle:" "$ref_mb" "$ref_thr"
row "RSS idle, default settings (MB)" %s "$idle_mb" "grpc++ callback server, idle" "$ref_mb" lower
row "threads idle" %s "$idle_thr" "grpc++ callback server, idle" "$ref_thr" lower
row "PSS idle (MB)" %s "$pss" "-" - ""
row "private dirty idle (MB)" %s "$anon" "-" - ""
hold_idle "$IDLE_PID" "$P_IDLE" "ours"
hold_mb=$HOLD_MB hold_thr=$HOLD_THREADS
hold_idle "$IDLE_REF_PID" "$P_IDLE_REF" "grpc++ callback"
row "RSS with $IDLE idle bidi streams (MB)" %s "$hold_mb" "grpc++ callback server holding the same streams" "$HOLD_MB" lower
row "threads with $IDLE idle bidi streams" %s "$hold_thr" "grpc++ callback server holding the same streams" "$HOLD_THREADS" lower

# after FILE LINE_PREFIX WORDS [N]: on the first line of FILE that starts with LINE_PREFIX, the field
# after the Nth run of WORDS, without a trailing "/s" or ",". For the drivers that print text, not
# key=value: the console lines are the figures.
after() {
    awk -v p="$2" -v ws="$3" -v nth="${4:-1}" 'index($0, p) == 1 {
        n = split(ws, w, " ")
        for (i = 1; i + n <= NF; i++) {
            for (j = 1; j <= n && $(i + j - 1) == w[j]; j++) {}
            if (j > n && ++k == nth) { v = $(i + n); sub(/(\/s|,)$/, "", v); print v; exit }
        }
        exit
    }' "$1"
}

section registry
echo
echo "== registry (services/registry against its own Redis)"
harness_start_redis || die "redis-server did not start"
start registry env IOT_LOG_LEVEL=warn IOT_REDIS_ADDR="$IOT_TEST_REDIS" IOT_REGISTRY_PREFIX="{bench}:" \
    IOT_GRPC_LISTEN=127.0.0.1:0 IOT_ADMIN_LISTEN=127.0.0.1:0 "$B/services/registry/registry"
"$B/bench/registry_bench" "127.0.0.1:$PORT" "$IOT_TEST_REDIS" "{bench}:" | tee "$tmp/registry.out"
[ "${PIPESTATUS[0]}" = 0 ] || warn "registry_bench reported errors (exit status ${PIPESTATUS[0]})"
reg_cols() { awk -v p="$1" -v k="$2" 'index($0, p) == 1 {print $(split(p, w, " ") + k); exit}' "$tmp/registry.out"; }
row "registrations/s (1000 instances, one at a time)" %s "$(after "$tmp/registry.out" registered ms:)" "-" - ""
reg_ref="raw Redis SMEMBERS+HMGET of the same keys"
row "Discover QPS (100 instances per answer)" %s "$(reg_cols "registry Discover over gRPC" 1)" "$reg_ref" \
    "$(reg_cols "reference: raw Redis SMEMBERS+HMGET" 1)" higher "$(reg_cols "ratio registry/raw" 1)"
row "Discover p50 (ms)" %s "$(reg_cols "registry Discover over gRPC" 2)" "$reg_ref" \
    "$(reg_cols "reference: raw Redis SMEMBERS+HMGET" 2)" lower "$(reg_cols "ratio registry/raw" 2)"
row "Discover p99 (ms)" %s "$(reg_cols "registry Discover over gRPC" 3)" "$reg_ref" \
    "$(reg_cols "reference: raw Redis SMEMBERS+HMGET" 3)" lower "$(reg_cols "ratio registry/raw" 3)"
reg_death() { sed -n "/$1/s/.*: *\([0-9]*\) ms, *\([0-9]*\) ms.*/\\$2/p" "$tmp/registry.out"; }
row "instance death -> watcher event, failing TCP check, median of 5 (ms)" %s "$(reg_death 'failing TCP check' 1)" \
    "none measured; bound: check interval 500 ms + timeout 200 ms" - lower
row "instance death -> watcher event, failing TCP check, max of 5 (ms)" %s "$(reg_death 'failing TCP check' 2)" \
    "none measured; bound: check interval 500 ms + timeout 200 ms" - lower
row "instance death -> watcher event, lapsed lease, median of 5 (ms)" %s "$(reg_death 'lapsed lease' 1)" \
    "none measured; bound: lease TTL 2 s + sweep interval 1 s" - lower
row "instance death -> watcher event, lapsed lease, max of 5 (ms)" %s "$(reg_death 'lapsed lease' 2)" \
    "none measured; bound: lease TTL 2 s + sweep interval 1 s" - lower

section device-mgmt
echo
echo "== device-mgmt (services/device-mgmt against its own Postgres and Redis)"
harness_start_postgres || die "postgres did not start"
start device_mgmt env IOT_LOG_LEVEL=warn IOT_PG_DSN="$IOT_TEST_PG" IOT_REDIS_ADDR="$IOT_TEST_REDIS" \
    IOT_DM_PG_SCHEMA=bench IOT_DM_REDIS_PREFIX="{dmbench}:" IOT_GRPC_THREADS=8 \
    IOT_GRPC_LISTEN=127.0.0.1:0 IOT_ADMIN_LISTEN=127.0.0.1:0 "$B/services/device-mgmt/device-mgmt"
P_DM=$PORT
"$B/bench/device_bench" "127.0.0.1:$P_DM" "$IOT_TEST_PG" bench "$IOT_TEST_REDIS" "{dmbench}:" | tee "$tmp/device.out"
[ "${PIPESTATUS[0]}" = 0 ] || warn "device_bench reported errors (exit status ${PIPESTATUS[0]})"
line=$(grep '^token=' "$tmp/device.out")
auth_hex=$(echo "$line" | sed -n 's/.*auth_hex=\([0-9a-f]*\).*/\1/p')
get_hex=$(echo "$line" | sed -n 's/.*get_hex=\([0-9a-f]*\).*/\1/p')
# Same load generator, same concurrency: our RPCs against the grpc++ async echo server (the
# reference gRPC server: the ceiling for any unary call on this machine), A B A B.
for r in $(seq "$ROUNDS"); do
    "$LOADGEN" --target "127.0.0.1:$P_DM" --mode unary --concurrency 64 --seconds "$SECS" \
        --method /iot.device.v1.DeviceManager/AuthenticateDevice --request-hex "$auth_hex" >>"$tmp/dm_auth" 2>&1
    "$LOADGEN" --target "127.0.0.1:$P_DM" --mode unary --concurrency 64 --seconds "$SECS" \
        --method /iot.device.v1.DeviceManager/GetDevice --request-hex "$get_hex" >>"$tmp/dm_get" 2>&1
    "$LOADGEN" --target "127.0.0.1:$P_ASYNC" --mode unary --concurrency 64 --seconds "$SECS" >>"$tmp/dm_ref" 2>&1
done
a=$(field qps <"$tmp/dm_auth" | median)
g=$(field qps <"$tmp/dm_get" | median)
e=$(field qps <"$tmp/dm_ref" | median)
grep -h first_error "$tmp/dm_auth" "$tmp/dm_get" | head -n 2
grep -q first_error "$tmp/dm_auth" "$tmp/dm_get" && note "loadgen saw errors from device-mgmt: $(grep -h first_error "$tmp/dm_auth" "$tmp/dm_get" | head -n 1)"
printf '%-40s %8.0f/s  p99 %s us   grpc++ async echo %8.0f/s  (ratio %.2f)\n' "AuthenticateDevice (loadgen, c64)" "$a" \
    "$(field p99_us <"$tmp/dm_auth" | median)" "$e" "$(awk -v x="$a" -v y="$e" 'BEGIN{print (y>0)?x/y:0}')"
printf '%-40s %8.0f/s  p99 %s us   grpc++ async echo %8.0f/s  (ratio %.2f)\n' "GetDevice cached (loadgen, c64)" "$g" \
    "$(field p99_us <"$tmp/dm_get" | median)" "$e" "$(awk -v x="$g" -v y="$e" 'BEGIN{print (y>0)?x/y:0}')"
dv() { after "$tmp/device.out" "$@"; }
bc="BatchCreateDevices 10,000"
dthr=$(sed -n 's/^GetDevice QPS.*(\([0-9]*\) client threads.*/\1/p' "$tmp/device.out")
row "BatchCreateDevices 10,000 devices, median of 10 (ms)" %s "$(dv "$bc" median)" "raw COPY of the same rows, median" \
    "$(dv "$bc" "COPY median")" lower
row "BatchCreateDevices 10,000 devices, first (ms)" %s "$(dv "$bc" first)" "raw COPY of the same rows, median" \
    "$(dv "$bc" "COPY median")" lower
row "BatchCreateDevices 10,000 devices, max (ms)" %s "$(dv "$bc" max)" "raw COPY of the same rows, median" \
    "$(dv "$bc" "COPY median")" lower
row "GetDevice/s cached ($dthr blocking client threads)" %s "$(dv "GetDevice QPS" cached)" "raw Redis HMGET of the same key" \
    "$(dv "GetDevice QPS" HMGET)" higher
row "GetDevice/s uncached ($dthr blocking client threads)" %s "$(dv "GetDevice QPS" uncached)" "raw Postgres SELECT of the same row" \
    "$(dv "GetDevice QPS" SELECT)" higher
for lf in "no filter" "type+label filter"; do
    row "ListDevices page 100, $lf: p50 (ms)" %s "$(dv "ListDevices page 100, $lf" p50)" "raw SQL of the same page" \
        "$(dv "ListDevices page 100, $lf" "SQL p50")" lower
    row "ListDevices page 100, $lf: p99 (ms)" %s "$(dv "ListDevices page 100, $lf" p99)" "raw SQL of the same page" \
        "$(dv "ListDevices page 100, $lf" p99 2)" lower
done
row "AuthenticateDevice/s (loadgen, c64)" %.0f "$a" "grpc++ async echo server, same loadgen and concurrency" "$e" higher
row "AuthenticateDevice p99 (us, loadgen, c64)" %s "$(field p99_us <"$tmp/dm_auth" | median)" "-" - ""
row "GetDevice cached/s (loadgen, c64)" %.0f "$g" "grpc++ async echo server, same loadgen and concurrency" "$e" higher
row "GetDevice cached p99 (us, loadgen, c64)" %s "$(field p99_us <"$tmp/dm_get" | median)" "-" - ""

section ingest
echo
echo "== ingest (services/ingest with device-mgmt, same Postgres and Redis)"
# Reference: raw binary COPY of the same number of rows (encoded by ingest's own encoder before the
# clock starts) into the same table, with 1 connection and with as many as ingest's committers.
# Ours: ING_DEVICES devices, each on its own StreamTelemetry, one batch of 100 in flight per device,
# counting acknowledged (committed) points. Order per round: copy x1, copy xN, ours.
ING_DEVICES=${ING_DEVICES:-1000}
ING_POINTS=${ING_POINTS:-2000}     # per device and round
ING_STREAMS=${ING_STREAMS:-10000}  # concurrent open streams for the memory figure
ING_SWEEP=${ING_SWEEP:-1 10 100 1000 5000} # device counts of the sweep after this section
ING_SWEEP_SECONDS=${ING_SWEEP_SECONDS:-3}  # about this long per step
ING_COMMITTERS=2
# One set of devices for all: the load takes the first ING_DEVICES, the sweep the first N of each
# step, the open streams ING_STREAMS.
# shellcheck disable=SC2086 # ING_SWEEP is a list
ing_need=$(printf '%s\n' "$ING_DEVICES" "$ING_STREAMS" $ING_SWEEP | sort -n | tail -n 1)
# Every loaded device has a batch of 100 in flight, and ingest refuses new batches with
# RESOURCE_EXHAUSTED beyond IOT_INGEST_MAX_PENDING points waiting for Postgres (200,000 by default,
# which 5,000 devices of the sweep exceed; the load client does not retry). The limit is raised to
# twice the most points the load ever has in flight, so these figures measure throughput, not
# backpressure; with 1,000 devices (100,000 in flight) the default never triggers either way.
# shellcheck disable=SC2086 # ING_SWEEP is a list
ing_flight=$(printf '%s\n' "$ING_DEVICES" $ING_SWEEP | sort -n | tail -n 1)
ING_MAX_PENDING=$(( ing_flight * 200 > 200000 ? ing_flight * 200 : 200000 ))
knobs+=" (ingest under load: IOT_INGEST_MAX_PENDING=$ING_MAX_PENDING)"
start ingest env IOT_LOG_LEVEL=warn IOT_PG_DSN="$IOT_TEST_PG" IOT_REDIS_ADDR="$IOT_TEST_REDIS" \
    IOT_INGEST_PG_SCHEMA=ingbench IOT_INGEST_STREAM_PREFIX="ingbench:" IOT_INGEST_DM_ADDR="127.0.0.1:$P_DM" \
    IOT_INGEST_COMMITTERS=$ING_COMMITTERS IOT_INGEST_MAX_PENDING=$ING_MAX_PENDING IOT_GRPC_THREADS=4 \
    IOT_GRPC_LISTEN=127.0.0.1:0 IOT_ADMIN_LISTEN=127.0.0.1:0 "$B/services/ingest/ingest"
P_ING=$PORT
PID_ING=$PID
"$B/bench/ingest_bench" setup "127.0.0.1:$P_DM" "$ing_need" ib "$tmp/tokens" || die "ingest_bench setup failed"
head -n "$ING_DEVICES" "$tmp/tokens" >"$tmp/load_tokens"
n=$((ING_DEVICES * ING_POINTS))
for r in $(seq "$ROUNDS"); do
    "$B/bench/ingest_bench" copy "$IOT_TEST_PG" ingbench "$n" "$ING_DEVICES" 1 >>"$tmp/ing_copy1" || die "ingest_bench copy failed"
    "$B/bench/ingest_bench" copy "$IOT_TEST_PG" ingbench "$n" "$ING_DEVICES" "$ING_COMMITTERS" >>"$tmp/ing_copyn" || die "ingest_bench copy failed"
    "$B/bench/ingest_bench" load "127.0.0.1:$P_ING" "$tmp/load_tokens" "$ING_POINTS" 100 4 >>"$tmp/ing_load" || die "ingest_bench load failed"
done
c1=$(field pps <"$tmp/ing_copy1" | median)
cn=$(field pps <"$tmp/ing_copyn" | median)
l=$(field pps <"$tmp/ing_load" | median)
rss=$(awk '/VmRSS/ {print $2}' "/proc/$PID_ING/status")
hwm=$(awk '/VmHWM/ {print $2}' "/proc/$PID_ING/status")
printf '%-40s %8.0f points/s\n' "raw COPY, 1 connection" "$c1"
printf '%-40s %8.0f points/s\n' "raw COPY, $ING_COMMITTERS connections" "$cn"
printf '%-40s %8.0f points/s  p50 ack %s ms  p99 ack %s ms\n' "ingest, $ING_DEVICES device streams" "$l" \
    "$(field p50_ms <"$tmp/ing_load" | median)" "$(field p99_ms <"$tmp/ing_load" | median)"
printf '%-40s ours/COPYx1 %.2f   ours/COPYx%d %.2f   (targets: >= 100000 points/s, >= 0.6)\n' "ratio" \
    "$(awk -v x="$l" -v y="$c1" 'BEGIN{print (y>0)?x/y:0}')" "$ING_COMMITTERS" "$(awk -v x="$l" -v y="$cn" 'BEGIN{print (y>0)?x/y:0}')"
printf '%-40s %s kB now, %s kB peak\n' "ingest RSS after the load" "$rss" "$hwm"
"$B/bench/ingest_bench" open "127.0.0.1:$P_ING" "$tmp/tokens" "$ING_STREAMS" "$PID_ING" | tee "$tmp/ing_open"
printf '%-40s %s kB with %s streams open (%s kB before; %s bytes per stream)\n' "ingest RSS, open device streams" \
    "$(field rss_open_kb <"$tmp/ing_open")" "$(field streams <"$tmp/ing_open")" "$(field rss_before_kb <"$tmp/ing_open")" \
    "$(field per_stream_bytes <"$tmp/ing_open")"
ing_target="higher (targets: >= 100000 points/s, >= 0.6)"
row "ingest, $ING_DEVICES device streams (points/s)" %.0f "$l" "raw COPY of the same rows, 1 connection" "$c1" "$ing_target"
row "ingest, $ING_DEVICES device streams (points/s)" %.0f "$l" \
    "raw COPY of the same rows, $ING_COMMITTERS connections (as many as ingest's committers)" "$cn" "$ing_target"
row "ingest ack latency p50 (ms)" %s "$(field p50_ms <"$tmp/ing_load" | median)" "-" - ""
row "ingest ack latency p99 (ms)" %s "$(field p99_ms <"$tmp/ing_load" | median)" "-" - ""
row "ingest RSS after the load (kB)" %s "$rss" "-" - ""
row "ingest peak RSS (kB)" %s "$hwm" "-" - ""
row "ingest RSS with $(field streams <"$tmp/ing_open") device streams open (kB)" %s "$(field rss_open_kb <"$tmp/ing_open")" \
    "-" - ""
row "ingest memory per open device stream (bytes)" %s "$(field per_stream_bytes <"$tmp/ing_open")" "-" - ""

section "ingest vs devices"
# Ingest's throughput against the number of devices: at each ING_SWEEP step the same method as the
# figure above (ingest_bench load: a StreamTelemetry per device, one batch of 100 in flight on each,
# acknowledged points only) right after raw COPY of the same rows with ING_COMMITTERS connections,
# one round per step. Points per device are chosen for about ING_SWEEP_SECONDS per step: the
# previous step's rate times the growth in devices (each device waits for its acknowledgement, so
# until ingest saturates the rate grows with them), at most the rate measured above, and at least
# two batches per device; the first step is sized by a short calibration run of its own, not
# reported.
echo
printf '%-40s %10s %12s %14s %14s %8s\n' "ingest vs devices (~${ING_SWEEP_SECONDS} s a step)" "points/dev" "points/s" \
    "p50/p99 ack ms" "COPYx$ING_COMMITTERS pts/s" "ratio"
sweep=$tmp/ingest-devices.tsv
printf 'devices\tpoints_per_device\tpoints\tingest_pps\tack_p50_ms\tack_p99_ms\tcopy_pps\tratio\n' >"$sweep"
sw_rate='' sw_dev=''
sw_load=$(cut -d' ' -f1 /proc/loadavg)
for d in $ING_SWEEP; do
    case $d in '' | *[!0-9]* | 0) warn "ING_SWEEP: '$d' is not a number of devices, skipped"; continue ;; esac
    head -n "$d" "$tmp/tokens" >"$tmp/sweep_tokens"
    if [ -z "$sw_rate" ]; then
        "$B/bench/ingest_bench" load "127.0.0.1:$P_ING" "$tmp/sweep_tokens" "$(( (2000 / d + 99) / 100 * 100 ))" 100 4 \
            >"$tmp/sweep_probe" || { section_failed "ingest_bench load failed (calibration, $d devices)"; break; }
        sw_rate=$(field pps <"$tmp/sweep_probe") sw_dev=$d
    fi
    per=$(awk -v r="$sw_rate" -v p="$sw_dev" -v d="$d" -v cap="${l:-0}" -v t="$ING_SWEEP_SECONDS" 'BEGIN {
        est = r * d / p
        if (cap < r) cap = r
        if (est > cap) est = cap
        k = int(est * t / d / 100 + 0.5)
        print (k < 2 ? 2 : k) * 100
    }')
    "$B/bench/ingest_bench" copy "$IOT_TEST_PG" ingbench "$((d * per))" "$d" "$ING_COMMITTERS" >"$tmp/sweep_copy" ||
        { section_failed "ingest_bench copy failed ($d devices)"; break; }
    "$B/bench/ingest_bench" load "127.0.0.1:$P_ING" "$tmp/sweep_tokens" "$per" 100 4 >"$tmp/sweep_load" ||
        { section_failed "ingest_bench load failed ($d devices)"; break; }
    sw_rate=$(field pps <"$tmp/sweep_load") sw_dev=$d
    sw_copy=$(field pps <"$tmp/sweep_copy")
    sw_p50=$(field p50_ms <"$tmp/sweep_load") sw_p99=$(field p99_ms <"$tmp/sweep_load")
    sw_ratio=$(awk -v x="$sw_rate" -v y="$sw_copy" 'BEGIN{printf "%.2f", (y>0)?x/y:0}')
    sw_label="ingest, $d device$([ "$d" = 1 ] || echo s)"
    printf '%-40s %10s %12.0f %14s %14.0f %8s\n' "$sw_label" "$per" "$sw_rate" "$sw_p50/$sw_p99" "$sw_copy" \
        "$sw_ratio"
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$d" "$per" "$((d * per))" "$sw_rate" "$sw_p50" "$sw_p99" "$sw_copy" \
        "$sw_ratio" >>"$sweep"
    row "$sw_label (points/s; $per points each)" %.0f "$sw_rate" \
        "raw COPY of the same rows, $ING_COMMITTERS connections" "$sw_copy" higher "$sw_ratio"
done
if [ "$(wc -l <"$sweep")" -gt 1 ]; then
    awk -F'\t' -v title="ingest throughput vs number of devices, $rep_start" \
        -v subtitle="acknowledged points/s through gRPC, ingest, Postgres + Redis vs raw COPY of the same rows; $(nproc) cores, load $sw_load" \
        -v xlabel="devices, one StreamTelemetry each, one batch of 100 in flight (log scale)" -v ylabel="points/s" \
        -v xcol=1 -v ycol=4 -v rcol=7 -v ylab="ingest, full path" -v rlab="raw COPY, $ING_COMMITTERS connections" \
        -f bench/plot_svg.awk "$sweep" >"$tmp/ingest-devices.svg"
fi

section processing
echo
echo "== processing (services/processing with its own ingest, same device-mgmt, Postgres and Redis)"
# PROC_DEVICES devices, PROC_RULES rules (a tenth z-score detectors over slices of the devices, the
# rest one threshold per device that normal values never cross; bench/processing_bench.c).
# 1. Alone: a first replica creates the rules and stops; PROC_FEED_POINTS points per device are
#    written to the streams exactly as ingest writes them; then a replica with a fresh consumer group
#    drains them. Reference, same entries, before and after: XREADGROUP + unpack + XACK, one thread
#    per shard (the raw cost of reading the stream); and ingest's rate measured above.
# 2. End to end: every device streams to ingest at PROC_RATE points/s in all for PROC_SECONDS, and
#    every 20 ms one batch carries a value above its device's threshold; latency from that push to
#    the FIRED event on WatchAlerts, next to ingest's own acknowledgement latency of the same pushes.
# 3. Memory: RSS idle, with the rules loaded, after both; each rule's own accounting (GetRuleStats);
#    then bytes per idle window measured by RSS (PROC_MEM_RULES rules over every device).
#   PROC_DEVICES (1000), PROC_RULES (1000), PROC_FEED_POINTS (20000), PROC_RATE (50000),
#   PROC_SECONDS (20), PROC_BATCH (50 points per push), PROC_MEM_RULES (100)
PROC_DEVICES=${PROC_DEVICES:-1000}
PROC_RULES=${PROC_RULES:-1000}
PROC_FEED_POINTS=${PROC_FEED_POINTS:-20000} # per device, in entries of 100 like the ingest load above
PROC_RATE=${PROC_RATE:-50000}
PROC_SECONDS=${PROC_SECONDS:-20}
PROC_BATCH=${PROC_BATCH:-50}
PROC_MEM_RULES=${PROC_MEM_RULES:-100}
PB=$B/bench/processing_bench
admin_of() { sed -n 's/.*admin=\([0-9]*\).*/\1/p' "$tmp/$1.out" | head -n 1; }
kb() { awk '/^VmRSS/ {print $2}' "/proc/$1/status"; }
kv() { sed -n "s/.* $1=\([-0-9.]*\).*/\1/p" "$2" | head -n 1; } # key file (field, but exact keys and signs)
start proc_ingest env IOT_LOG_LEVEL=warn IOT_PG_DSN="$IOT_TEST_PG" IOT_REDIS_ADDR="$IOT_TEST_REDIS" \
    IOT_INGEST_PG_SCHEMA=procing IOT_INGEST_STREAM_PREFIX="procbench:" IOT_INGEST_DM_ADDR="127.0.0.1:$P_DM" \
    IOT_INGEST_COMMITTERS=$ING_COMMITTERS IOT_GRPC_THREADS=4 IOT_GRPC_LISTEN=127.0.0.1:0 IOT_ADMIN_LISTEN=127.0.0.1:0 \
    "$B/services/ingest/ingest"
P_PING=$PORT
"$B/bench/ingest_bench" setup "127.0.0.1:$P_DM" "$PROC_DEVICES" pb "$tmp/proc_tokens" || die "ingest_bench setup failed"
proc_env=(env IOT_LOG_LEVEL=warn IOT_PG_DSN="$IOT_TEST_PG" IOT_REDIS_ADDR="$IOT_TEST_REDIS" IOT_PROC_PG_SCHEMA=procbench
    IOT_INGEST_STREAM_PREFIX="procbench:" IOT_PROC_DM_ADDR="127.0.0.1:$P_DM" IOT_GRPC_LISTEN=127.0.0.1:0
    IOT_ADMIN_LISTEN=127.0.0.1:0)
# The replica that creates the rules reads an empty stream, and stops before the feed, so that the
# next one finds the whole backlog waiting. Its own group and key prefix: nothing of it is left to
# hand over.
start proc_setup "${proc_env[@]}" IOT_PROC_GROUP=pbsetup IOT_PROC_REDIS_PREFIX="{pbsetup}:" "$B/services/processing/processing"
PID_PS=$PID
sleep 1
rss_idle=$(kb "$PID_PS")
"$PB" rules "127.0.0.1:$PORT" "$(admin_of proc_setup)" "$tmp/proc_tokens" "$PROC_RULES" "$tmp/proc_rules" >"$tmp/proc_rules.out" || die "processing_bench rules failed"
sleep 1
rss_rules=$(kb "$PID_PS")
kill -TERM "$PID_PS"
wait "$PID_PS"
"$PB" feed "$IOT_TEST_REDIS" "procbench:" 8 "$tmp/proc_tokens" "$PROC_FEED_POINTS" 100 >"$tmp/proc_feed.out" || die "processing_bench feed failed"
n=$(kv points "$tmp/proc_feed.out")
"$PB" ref "$IOT_TEST_REDIS" "procbench:" 8 ref1 >"$tmp/proc_ref" || die "processing_bench ref failed"
start proc "${proc_env[@]}" IOT_PROC_GROUP=pbrun IOT_PROC_REDIS_PREFIX="{pbrun}:" "$B/services/processing/processing"
P_PROC=$PORT
PID_PROC=$PID
A_PROC=$(admin_of proc)
"$PB" drain "$A_PROC" "$n" >"$tmp/proc_drain" || die "processing_bench drain failed"
"$PB" ref "$IOT_TEST_REDIS" "procbench:" 8 ref2 >>"$tmp/proc_ref" || die "processing_bench ref failed"
d=$(kv pps "$tmp/proc_drain")
rf=$(sed -n 's/.* pps=\([0-9.]*\).*/\1/p' "$tmp/proc_ref" | median)
ing_rate=${l:-0}
printf '%-40s %8.0f points/s  (%s points, %s rules: %s)\n' "processing alone, from the stream" "$d" "$n" \
    "$PROC_RULES" "$(kv threshold "$tmp/proc_rules.out") threshold, $(kv zscore "$tmp/proc_rules.out") z-score"
printf '%-40s %8.0f points/s  (XREADGROUP + unpack + XACK, 1 thread per shard; ours/ref %.2f)\n' "reference: reading the stream" \
    "$rf" "$(awk -v x="$d" -v y="$rf" 'BEGIN{print (y>0)?x/y:0}')"
printf '%-40s %8.0f points/s  (ingest section above; ours/ingest %.2f, target >= 1)\n' "reference: ingest's rate" "$ing_rate" \
    "$(awk -v x="$d" -v y="$ing_rate" 'BEGIN{print (y>0)?x/y:0}')"
row "processing alone, from the stream (points/s; $PROC_RULES rules)" %.0f "$d" \
    "XREADGROUP + unpack + XACK of the same entries, 1 thread per shard" "$rf" higher
row "processing alone, from the stream (points/s; $PROC_RULES rules)" %.0f "$d" "ingest's rate (ingest section)" "$ing_rate" \
    "higher (target >= 1)"
"$PB" e2e "127.0.0.1:$P_PING" "$tmp/proc_tokens" "127.0.0.1:$P_PROC" "$A_PROC" "$tmp/proc_rules" "$PROC_RATE" \
    "$PROC_SECONDS" "$PROC_BATCH" "$PROC_FEED_POINTS" >"$tmp/proc_e2e" || warn "e2e reported errors: $(cat "$tmp/proc_e2e")"
e2e() { kv "$1" "$tmp/proc_e2e"; }
row "end to end, ingest -> processing (points/s)" %.0f "$(e2e pps)" "offered load (PROC_RATE, not a measurement)" \
    "$PROC_RATE" higher
row "end to end: sends skipped while the previous was unacknowledged" %s "$(e2e skipped_sends)" "-" - ""
row "ingest -> alert latency p50 (ms)" %s "$(e2e alert_p50_ms)" "ingest's ack latency of the same pushes, p50" \
    "$(e2e spike_ack_p50_ms)" lower
row "ingest -> alert latency p99 (ms)" %s "$(e2e alert_p99_ms)" "ingest's ack latency of the same pushes, p99" \
    "$(e2e spike_ack_p99_ms)" "lower (target p99 < 50 ms)"
row "ingest -> alert latency max (ms)" %s "$(e2e alert_max_ms)" "-" - ""
row "stored spikes alerted" %s "$([ -n "$(e2e alerts)" ] && echo "$(e2e alerts) of $(e2e spikes_stored)")" "-" - ""
row "ingest ack latency, all pushes p50 (ms)" %s "$(e2e ack_p50_ms)" "-" - ""
row "ingest ack latency, all pushes p99 (ms)" %s "$(e2e ack_p99_ms)" "-" - ""
row "processing's share (alert minus ack) p50 (ms)" %s "$(e2e after_ack_p50_ms)" "-" - ""
row "processing's share (alert minus ack) p99 (ms)" %s "$(e2e after_ack_p99_ms)" "-" - ""
row "processing lag when the load stopped (points)" %s "$(e2e lag_points)" "-" - ""
row "processing caught up after (ms)" %s "$(e2e caught_up_ms)" "-" - ""
printf '%-40s %8.0f points/s  (target %s, %s devices, batches of %s; %s sends skipped while the previous was unacknowledged)\n' \
    "end to end, ingest -> processing" "$(e2e pps)" "$PROC_RATE" "$PROC_DEVICES" "$PROC_BATCH" "$(e2e skipped_sends)"
printf '%-40s p50 %s ms  p99 %s ms  max %s ms  (%s of %s stored spikes alerted; target p99 < 50 ms)\n' \
    "ingest -> alert latency" "$(e2e alert_p50_ms)" "$(e2e alert_p99_ms)" "$(e2e alert_max_ms)" "$(e2e alerts)" "$(e2e spikes_stored)"
printf '%-40s p50 %s ms  p99 %s ms  (all pushes: p50 %s ms, p99 %s ms)\n' "reference: ingest ack, same pushes" \
    "$(e2e spike_ack_p50_ms)" "$(e2e spike_ack_p99_ms)" "$(e2e ack_p50_ms)" "$(e2e ack_p99_ms)"
printf '%-40s p50 %s ms  p99 %s ms  (alert minus ack, per push)\n' "  processing's share" \
    "$(e2e after_ack_p50_ms)" "$(e2e after_ack_p99_ms)"
printf '%-40s %s points behind ingest'"'"'s acks when the load stopped; caught up %s ms later\n' "processing lag" \
    "$(e2e lag_points)" "$(e2e caught_up_ms)"
sleep 2 # GetRuleStats reads what replicas publish every IOT_PROC_STATS_INTERVAL
"$PB" stats "127.0.0.1:$P_PROC" "$tmp/proc_rules" >"$tmp/proc_stats" || die "processing_bench stats failed"
# Idle windows, measured: PROC_MEM_RULES more z-score rules on "pressure" over every device, and
# one point of each metric per device so that every (device, rule) has its window; RSS before and
# after, and after the checkpoint that writes them all. Checkpoints (every 10 s per shard) hold
# transient memory, so the first two samples are taken just after a checkpoint round: a point per
# device makes every shard checkpoint, and the next round is 10 s away.
ctr() { "$PB" counter "$A_PROC" "$@" | sed -n 's/.* value=\([0-9]*\).*/\1/p'; }
mem_round() { # seq base: a point of each metric per device, then wait until processing has them
    local p0
    p0=$(ctr processing_points_total)
    "$PB" feed "$IOT_TEST_REDIS" "procbench:" 8 "$tmp/proc_tokens" 4 4 "$1" >/dev/null &&
        ctr processing_points_total "$((p0 + 4 * PROC_DEVICES))" >/dev/null
}
ck=$(ctr processing_checkpoints_total)
mem_round 1000000000000 || die "processing_bench feed (memory round) failed"
ctr processing_checkpoints_total "$((ck + 8))" >/dev/null # one per shard
rss_w0=$(kb "$PID_PROC")
"$PB" wide "127.0.0.1:$P_PROC" "$A_PROC" "$PROC_MEM_RULES" pressure "$tmp/proc_wide" >/dev/null || die "processing_bench wide failed"
ck=$(ctr processing_checkpoints_total)
mem_round 1000000000004 || die "processing_bench feed (memory round) failed"
sleep 0.5
rss_w1=$(kb "$PID_PROC")
ctr processing_checkpoints_total "$((ck + 8))" >/dev/null
sleep 1
rss_w2=$(kb "$PID_PROC")
hwm=$(awk '/^VmHWM/ {print $2}' "/proc/$PID_PROC/status")
"$PB" stats "127.0.0.1:$P_PROC" "$tmp/proc_wide" >"$tmp/proc_wstats" || die "processing_bench stats failed" # published by now
st() { kv "$1" "$tmp/proc_stats"; }
wst() { kv "$1" "$tmp/proc_wstats"; }
per_w() { awk -v a="$1" -v b="$rss_w0" -v w="$(wst zscore_windows)" 'BEGIN{printf "%.0f", (w>0)?(a-b)*1024/w:0}'; }
# Idle and with rules: the replica that created them; then the one that drained the feed and took the load.
printf '%-40s %s kB idle, %s kB with %s rules loaded, %s kB after the feed and the load\n' "processing RSS" \
    "$rss_idle" "$rss_rules" "$PROC_RULES" "$rss_w0"
printf '%-40s z-score %s bytes per window, threshold %s bytes per state (%s states, %s bytes)\n' \
    "rules' own accounting (GetRuleStats)" "$(st zscore_bytes_per_window)" "$(st threshold_bytes_per_state)" "$(st states)" "$(st bytes)"
printf '%-40s %s bytes per window measured (RSS +%s kB for %s windows; GetRuleStats says %s; target < 1024)\n' \
    "idle z-score windows" "$(per_w "$rss_w1")" "$((rss_w1 - rss_w0))" "$(wst zscore_windows)" "$(wst zscore_bytes_per_window)"
printf '%-40s %s bytes per window (RSS %s kB; peak RSS so far %s kB)\n' "  after the checkpoint that wrote them" \
    "$(per_w "$rss_w2")" "$rss_w2" "$hwm"
row "processing RSS idle (kB)" %s "$rss_idle" "-" - ""
row "processing RSS with $PROC_RULES rules loaded (kB)" %s "$rss_rules" "-" - ""
row "processing RSS after the feed and the load (kB)" %s "$rss_w0" "-" - ""
row "z-score bytes per window (GetRuleStats)" %s "$(st zscore_bytes_per_window)" "-" - ""
row "threshold bytes per state (GetRuleStats; $(st states) states, $(st bytes) bytes)" %s "$(st threshold_bytes_per_state)" "-" - ""
row "idle z-score window, measured by RSS (bytes; $(wst zscore_windows) windows)" %s "$(per_w "$rss_w1")" \
    "the rules' own accounting (GetRuleStats)" "$(wst zscore_bytes_per_window)" "lower (target < 1024 bytes)"
row "idle z-score window after the checkpoint that wrote them (bytes)" %s "$(per_w "$rss_w2")" \
    "the rules' own accounting (GetRuleStats)" "$(wst zscore_bytes_per_window)" "lower (target < 1024 bytes)"
row "processing peak RSS (kB)" %s "$hwm" "-" - ""

section ota
echo
echo "== ota (services/ota with the same device-mgmt and Postgres)"
# bench/ota_bench.c. Content: OTA_MB MiB of pseudo-random bytes, generated before each clock starts.
# 1. Upload: UploadArtifact (header, then 1 MiB chunks; hashed, chunked into Postgres in one
#    transaction, signed) until the stored Artifact arrives, ROUNDS times as versions 1.0.0, 1.0.1,
#    ...; reference, alternating with it: the same bytes written once over a raw loopback TCP
#    connection to a thread that reads and drops them.
# 2. Download: the first artifact whole over one DownloadArtifact stream with a device token, every
#    byte checked, OTA_DL_ROUNDS times; reference, alternating: raw loopback TCP the other way, the
#    same bytes checked. ota sends cached chunks in place (cm_call_send_tail); the client decodes
#    each message in place (cm_stream_recv_view), as a bulk client of libs/common would.
# 3. OTA_CONCURRENT downloads of it at once (a thread and a stream each, over 4 connections), every
#    byte count checked; ota's VmRSS before and at its peak (sampled every 50 ms): ota reads each
#    chunk from Postgres when the client has taken the previous one, so memory stays bounded.
#   OTA_MB (16), OTA_DL_ROUNDS (7), OTA_CONCURRENT (100)
OTA_MB=${OTA_MB:-16}
OTA_DL_ROUNDS=${OTA_DL_ROUNDS:-7}
OTA_CONCURRENT=${OTA_CONCURRENT:-100}
OB=$B/bench/ota_bench
start ota env IOT_LOG_LEVEL=warn IOT_PG_DSN="$IOT_TEST_PG" IOT_OTA_PG_SCHEMA=otabench IOT_OTA_DM_ADDR="127.0.0.1:$P_DM" \
    IOT_OTA_KEYS_DIR="$tmp/ota-keys" IOT_OTA_MIGRATIONS=services/ota/migrations \
    IOT_GRPC_LISTEN=127.0.0.1:0 IOT_ADMIN_LISTEN=127.0.0.1:0 "$B/services/ota/ota"
P_OTA=$PORT
PID_OTA=$PID
"$B/bench/ingest_bench" setup "127.0.0.1:$P_DM" 1 ob "$tmp/ota_tokens" || die "ingest_bench setup failed"
for r in $(seq "$ROUNDS"); do
    "$OB" tcp up "$OTA_MB" >>"$tmp/ota_tcp_up" || die "ota_bench tcp failed"
    "$OB" upload "127.0.0.1:$P_OTA" "$OTA_MB" bench-fw "1.0.$((r - 1))" >>"$tmp/ota_up" || die "ota_bench upload failed"
done
art=$(field id <"$tmp/ota_up" | head -n 1)
for r in $(seq "$OTA_DL_ROUNDS"); do
    "$OB" tcp down "$OTA_MB" >>"$tmp/ota_tcp_down" || die "ota_bench tcp failed"
    "$OB" download "127.0.0.1:$P_OTA" "$tmp/ota_tokens" "$art" "$OTA_MB" >>"$tmp/ota_down" || die "ota_bench download failed"
done
for r in $(seq "$ROUNDS"); do "$OB" echo "127.0.0.1:$P_OURS" "$OTA_MB" >>"$tmp/ota_echo" || die "ota_bench echo failed"; done
echo_mbps=$(field mbps <"$tmp/ota_echo" | median)
"$OB" many "127.0.0.1:$P_OTA" "$tmp/ota_tokens" "$art" "$OTA_MB" "$OTA_CONCURRENT" "$PID_OTA" >"$tmp/ota_many" ||
    warn "concurrent downloads reported errors: $(cat "$tmp/ota_many")"
up=$(field mbps <"$tmp/ota_up" | median)
tup=$(field mbps <"$tmp/ota_tcp_up" | median)
# The first download reads every chunk from Postgres; later ones find them in ota's chunk cache
# (IOT_OTA_CACHE_SIZE), as devices of a rollout after the first do.
cold=$(field mbps <"$tmp/ota_down" | head -n 1)
down=$(field mbps <"$tmp/ota_down" | tail -n +2 | median)
tdown=$(field mbps <"$tmp/ota_tcp_down" | median)
om() { field "$1" <"$tmp/ota_many"; }
printf '%-40s %8.1f MB/s  (%s MiB in 1 MiB chunks, median of %s versions)\n' "ota UploadArtifact" "$up" "$OTA_MB" "$ROUNDS"
printf '%-40s %8.1f MB/s  (ours/TCP %.2f)\n' "reference: raw loopback TCP, same bytes" "$tup" \
    "$(awk -v x="$up" -v y="$tup" 'BEGIN{print (y>0)?x/y:0}')"
printf '%-40s %8.1f MB/s  (%s MiB whole, one stream: chunks from Postgres; ours/TCP %.2f)\n' "ota DownloadArtifact, first" "$cold" \
    "$OTA_MB" "$(awk -v x="$cold" -v y="$tdown" 'BEGIN{print (y>0)?x/y:0}')"
printf '%-40s %8.1f MB/s  (the same again, chunks cached: median of %s; ours/TCP %.2f, target >= 0.5)\n' "ota DownloadArtifact, later" \
    "$down" "$((OTA_DL_ROUNDS - 1))" "$(awk -v x="$down" -v y="$tdown" 'BEGIN{print (y>0)?x/y:0}')"
printf '%-40s %8.1f MB/s  (test Echo server, paced ServerStream of the same bytes from memory)\n' "  our gRPC layer alone" "$echo_mbps"
printf '%-40s %8.1f MB/s  (median of %s)\n' "reference: raw loopback TCP, same bytes" "$tdown" "$OTA_DL_ROUNDS"
printf '%-40s %8.1f MB/s  (%s of %s received exactly %s MiB, in %s s)\n' "ota, $OTA_CONCURRENT downloads at once" \
    "$(om mbps)" "$(om ok)" "$(om downloads)" "$OTA_MB" "$(om seconds)"
printf '%-40s %s kB before, %s kB peak: +%s kB, %s kB per download (the artifacts in full: %s kB)\n' \
    "ota RSS during the downloads" "$(om rss_before_kb)" "$(om rss_peak_kb)" "$(om grew_kb)" "$(om per_download_kb)" \
    "$((OTA_CONCURRENT * OTA_MB * 1024))"
tcp_up="raw loopback TCP, the same bytes, to a thread that drops them"
tcp_down="raw loopback TCP, the same bytes, checked"
row "ota UploadArtifact, $OTA_MB MiB (MB/s)" %.1f "$up" "$tcp_up" "$tup" higher
row "ota DownloadArtifact, first: chunks from Postgres (MB/s)" %.1f "$cold" "$tcp_down" "$tdown" higher
row "ota DownloadArtifact, later: chunks cached (MB/s)" %.1f "$down" "$tcp_down" "$tdown" "higher (target >= 0.5)"
row "our gRPC layer alone: Echo ServerStream of the same bytes (MB/s)" %.1f "$echo_mbps" "$tcp_down" "$tdown" higher
row "ota, $OTA_CONCURRENT downloads at once (MB/s; $(om ok) of $(om downloads) exact)" %.1f "$(om mbps)" "-" - ""
row "ota RSS before the downloads (kB)" %s "$(om rss_before_kb)" "-" - ""
row "ota RSS peak during them (kB)" %s "$(om rss_peak_kb)" "-" - ""
row "ota RSS growth during the $OTA_CONCURRENT downloads (kB)" %s "$(om grew_kb)" \
    "the $OTA_CONCURRENT artifacts in full ($OTA_CONCURRENT x $OTA_MB MiB)" "$((OTA_CONCURRENT * OTA_MB * 1024))" lower
row "ota RSS growth per download (kB)" %s "$(om per_download_kb)" "-" - ""

section gateway
echo
echo "== gateway (services/gateway in front of the same device-mgmt)"
# GET /api/v1/devices/{id} through the gateway (REST/JSON, API key checked from its cache, one
# GetDevice to device-mgmt per request) measured with wrk, against the same GetDevice sent to
# device-mgmt directly with the gRPC load generator, same concurrency, A B per round.
GW_KEY=iotk_00000000be0c_$(printf '%064d' 0 | tr 0 b)
start gateway env IOT_LOG_LEVEL=warn IOT_PG_DSN="$IOT_TEST_PG" IOT_GW_PG_SCHEMA=gwbench IOT_GW_BOOTSTRAP_KEY="$GW_KEY" \
    IOT_GW_DM_ADDR="127.0.0.1:$P_DM" IOT_GW_HTTP_LISTEN=127.0.0.1:0 IOT_GRPC_LISTEN=127.0.0.1:0 IOT_ADMIN_LISTEN=127.0.0.1:0 \
    "$B/services/gateway/gateway"
P_GW_HTTP=$(sed -n 's/^gateway http=\([0-9]*\).*/\1/p' "$tmp/gateway.out" | head -n 1)
for _ in $(seq 50); do [ -n "$P_GW_HTTP" ] && break; sleep 0.1; P_GW_HTTP=$(sed -n 's/^gateway http=\([0-9]*\).*/\1/p' "$tmp/gateway.out" | head -n 1); done
GW_URL=http://127.0.0.1:$P_GW_HTTP
curl -sf -o /dev/null -H "Authorization: Bearer $GW_KEY" -H 'Content-Type: application/json' \
    -d '{"id":"gw-bench-1","name":"gateway bench","type":"meter","labels":{"site":"bench"}}' "$GW_URL/api/v1/devices" ||
    warn "could not create the gateway's bench device"
# GetDeviceRequest{id: "gw-bench-1"}: field 1, length-delimited.
gw_get_hex=0a0a$(printf 'gw-bench-1' | od -An -v -tx1 | tr -d ' \n')
for r in $(seq "$ROUNDS"); do
    wrk -t2 -c64 -d"${SECS}s" --latency -H "Authorization: Bearer $GW_KEY" "$GW_URL/api/v1/devices/gw-bench-1" >>"$tmp/gw_rest" 2>&1
    "$LOADGEN" --target "127.0.0.1:$P_DM" --mode unary --concurrency 64 --seconds "$SECS" \
        --method /iot.device.v1.DeviceManager/GetDevice --request-hex "$gw_get_hex" >>"$tmp/gw_grpc" 2>&1
done
rest=$(sed -n 's/^Requests\/sec: *\([0-9.]*\).*/\1/p' "$tmp/gw_rest" | median)
direct=$(field qps <"$tmp/gw_grpc" | median)
non2xx=$(sed -n 's/.*Non-2xx or 3xx responses: *\([0-9]*\).*/\1/p' "$tmp/gw_rest" | awk '{s+=$1} END {print s+0}')
[ "$non2xx" = 0 ] || warn "wrk saw $non2xx non-2xx answers from the gateway"
gw_p99=$(sed -n 's/^ *99% *\([0-9.]*[a-z]*\).*/\1/p' "$tmp/gw_rest" | head -n 1)
printf '%-40s %8.0f/s  p99 %s   (wrk -t2 -c64, median of %s)\n' "REST GET /api/v1/devices/{id}" "$rest" "$gw_p99" "$ROUNDS"
printf '%-40s %8.0f/s  (loadgen c64, the same device; REST/gRPC %.2f, target >= 0.5)\n' "reference: GetDevice over gRPC directly" \
    "$direct" "$(awk -v x="$rest" -v y="$direct" 'BEGIN{print (y>0)?x/y:0}')"
row "REST GET /api/v1/devices/{id} (requests/s; wrk -t2 -c64)" %.0f "$rest" \
    "GetDevice over gRPC directly (loadgen c64, the same device)" "$direct" "higher (target >= 0.5)"
row "REST GET p99 (wrk, first round)" %s "$gw_p99" "-" - ""
section "" # the last section ended well
