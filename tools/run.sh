#!/bin/sh
# make run / make demo / make run-clean: the whole suite on this machine, in the foreground.
#
#   sh tools/run.sh [--demo] BUILD_DIR   Postgres and Redis under the state directory, then registry,
#                                        device-mgmt, ingest, processing, ota and the gateway, each
#                                        waited for (gRPC health) before the services that need it;
#                                        prints the dashboard, REST and gRPC addresses and the admin
#                                        API key; --demo (or IOT_RUN_DEMO=1) adds iot-sim.
#   sh tools/run.sh --clean              wipes the state directory (refused while a run uses it).
#
# Ctrl-C or SIGTERM: the simulator and the services drain (SIGTERM, newest first), then Redis and
# Postgres stop; exit 0 when everything stopped cleanly. A service that exits during start or
# while running stops the rest, with the end of its log, and exit 1.
#
# Environment (docs/operations.md, "make run"):
#   IOT_STATE_DIR        state directory (default ./state): Postgres, Redis, logs, OTA keys, admin key
#   IOT_RUN_HOST         address the services listen on (default 127.0.0.1)
#   IOT_RUN_GRPC_BASE    gRPC ports base+1..base+6 (default 7000); 0: free ports, read back
#   IOT_RUN_ADMIN_BASE   admin ports base+1..base+6 (default 9100); 0: free ports
#   IOT_RUN_HTTP_PORT    gateway REST API and dashboard (default 8080); 0: a free port
#   IOT_PG_PORT, IOT_REDIS_PORT  Postgres and Redis on 127.0.0.1 (defaults 55432, 56379)
#   IOT_RUN_START_TIMEOUT  seconds each service gets to become healthy (default 120)
#   IOT_GW_BOOTSTRAP_KEY   use this admin key instead of the one kept in the state directory
#   IOT_SIM_*            passed to iot-sim with --demo (iot-sim --help)
set -u
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"

usage() {
    echo "usage: sh tools/run.sh [--demo] BUILD_DIR | sh tools/run.sh --clean" >&2
    exit 2
}

demo=0
clean=0
while [ $# -gt 0 ]; do
    case "$1" in
    --demo) demo=1 ;;
    --clean) clean=1 ;;
    -h | --help) sed -n '2,24p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    -*) echo "run.sh: unknown option $1" >&2; usage ;;
    *) break ;;
    esac
    shift
done
case "${IOT_RUN_DEMO:-0}" in 1 | true | yes | on) demo=1 ;; esac

STATE=${IOT_STATE_DIR:-$ROOT/state}
case "$STATE" in /*) ;; *) STATE=$ROOT/$STATE ;; esac
STATE=${STATE%/}

. tests/support/harness.sh

# ---- the state directory's lock and leftovers ------------------------------------------------

# The pid of a run.sh still using $STATE, or nothing. A pid in run.pid that is no longer a run.sh
# (the run was killed, the pid reused) does not count.
running_pid() {
    [ -f "$STATE/run.pid" ] || return 0
    p=$(cat "$STATE/run.pid" 2>/dev/null)
    case "$p" in '' | *[!0-9]*) return 0 ;; esac
    if kill -0 "$p" 2>/dev/null && tr '\0' ' ' <"/proc/$p/cmdline" 2>/dev/null | grep -q 'tools/run.sh'; then
        echo "$p"
    fi
}

# A run that was killed (SIGKILL, a closed terminal) leaves its processes behind: stop those that
# are still the programs run.sh started from this directory, so that ports and data are free.
stop_leftovers() {
    if [ -f "$STATE/run.pids" ]; then
        while read -r p exe; do
            [ -n "$p" ] && [ "$(readlink "/proc/$p/exe" 2>/dev/null)" = "$exe" ] || continue
            echo "run.sh: stopping $exe (pid $p), left over from an earlier run"
            kill -TERM "$p" 2>/dev/null
            i=0
            while kill -0 "$p" 2>/dev/null && [ $i -lt 150 ]; do sleep 0.1; i=$((i + 1)); done
            kill -KILL "$p" 2>/dev/null
        done <"$STATE/run.pids"
        rm -f "$STATE/run.pids"
    fi
    if [ -f "$STATE/redis.pid" ]; then
        p=$(cat "$STATE/redis.pid")
        if [ -n "$p" ] && tr '\0' ' ' <"/proc/$p/cmdline" 2>/dev/null | grep -q redis-server; then
            echo "run.sh: stopping redis-server (pid $p), left over from an earlier run"
            kill -TERM "$p" 2>/dev/null
            i=0
            while kill -0 "$p" 2>/dev/null && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
        fi
        rm -f "$STATE/redis.pid"
    fi
    if [ -f "$STATE/pg/data/postmaster.pid" ] &&
        harness_as_pg "$(harness_pg_bin)/pg_ctl" -D "$STATE/pg/data" status >/dev/null 2>&1; then
        echo "run.sh: stopping Postgres, left over from an earlier run"
        harness_as_pg "$(harness_pg_bin)/pg_ctl" -D "$STATE/pg/data" -m fast -w stop >/dev/null
    fi
}

if [ "$clean" = 1 ]; then
    [ -e "$STATE" ] || { echo "run.sh: nothing to clean: $STATE does not exist"; exit 0; }
    p=$(running_pid)
    if [ -n "$p" ]; then
        echo "run.sh: iotsuite is running from $STATE (tools/run.sh, pid $p); stop it first (Ctrl-C in its terminal, or kill -TERM $p)" >&2
        exit 1
    fi
    # Only ever a directory this script made: refuse anything that does not look like one.
    if [ -n "$(ls -A "$STATE" 2>/dev/null)" ] && [ ! -d "$STATE/logs" ] && [ ! -d "$STATE/pg" ] && [ ! -f "$STATE/admin-key" ]; then
        echo "run.sh: refusing to wipe $STATE: it does not look like an iotsuite state directory (no logs/, pg/ or admin-key)" >&2
        exit 1
    fi
    stop_leftovers
    rm -rf "$STATE" || exit 1
    echo "run.sh: removed $STATE (Postgres and Redis data, logs, OTA signing keys, the admin API key)"
    exit 0
fi

[ $# -eq 1 ] || usage
B=$1
case "$B" in /*) ;; *) B=$ROOT/$B ;; esac
SERVICES="registry device-mgmt ingest processing ota gateway"
for s in $SERVICES; do
    [ -x "$B/services/$s/$s" ] || { echo "run.sh: $B/services/$s/$s is not built (make all)" >&2; exit 1; }
done
PROBE=$B/tools/iot-health-probe
SIM=$B/tools/iot-sim
[ -x "$PROBE" ] || { echo "run.sh: $PROBE is not built (make all)" >&2; exit 1; }
[ "$demo" = 0 ] || [ -x "$SIM" ] || { echo "run.sh: $SIM is not built (make all)" >&2; exit 1; }

mkdir -p "$STATE/logs" || exit 1
chmod 755 "$STATE"
p=$(running_pid)
if [ -n "$p" ]; then
    echo "run.sh: iotsuite is already running from $STATE (tools/run.sh, pid $p); use another IOT_STATE_DIR for a second one" >&2
    exit 1
fi
stop_leftovers
rm -f "$STATE/run.pid"
# noclobber: of two runs starting at the same moment, one gets the lock.
if ! (set -C && echo $$ >"$STATE/run.pid") 2>/dev/null; then
    echo "run.sh: another run took $STATE just now" >&2
    exit 1
fi
: >"$STATE/run.pids"

HOST=${IOT_RUN_HOST:-127.0.0.1}
case "$HOST" in 0.0.0.0 | '[::]' | '') DIAL=127.0.0.1 ;; *) DIAL=$HOST ;; esac
GRPC_BASE=${IOT_RUN_GRPC_BASE:-7000}
ADMIN_BASE=${IOT_RUN_ADMIN_BASE:-9100}
HTTP_PORT=${IOT_RUN_HTTP_PORT:-8080}
PG_PORT=${IOT_PG_PORT:-55432}
REDIS_PORT=${IOT_REDIS_PORT:-56379}
START_TIMEOUT=${IOT_RUN_START_TIMEOUT:-120}
for v in GRPC_BASE ADMIN_BASE HTTP_PORT PG_PORT REDIS_PORT START_TIMEOUT; do
    eval "x=\$$v"
    case "$x" in '' | *[!0-9]*) echo "run.sh: $v=\"$x\" is not a number" >&2; rm -f "$STATE/run.pid"; exit 2 ;; esac
done

# ---- stopping ------------------------------------------------------------------------------

started=      # "name:pid" of the simulator and the services, oldest first
redis_pid=
pg_started=0
rc=0

# Stops pid with SIGTERM, waits up to 30 s (then SIGKILL); returns its exit status.
stop_pid() {
    kill -TERM "$1" 2>/dev/null
    i=0
    while kill -0 "$1" 2>/dev/null && [ $i -lt 300 ]; do sleep 0.1; i=$((i + 1)); done
    if kill -0 "$1" 2>/dev/null; then
        echo "run.sh: pid $1 did not stop within 30 s of SIGTERM; killing it" >&2
        kill -KILL "$1" 2>/dev/null
    fi
    wait "$1" 2>/dev/null
}

sleeper=
stop_all() {
    trap '' INT TERM
    [ -n "$sleeper" ] && kill "$sleeper" 2>/dev/null
    echo "stopping iotsuite..."
    rev=
    for e in $started; do rev="$e $rev"; done
    for e in $rev; do
        name=${e%%:*}
        pid=${e#*:}
        kill -0 "$pid" 2>/dev/null || continue
        stop_pid "$pid"
        st=$?
        if [ "$st" -ne 0 ]; then
            echo "run.sh: $name did not stop cleanly (exit status $st); the end of $STATE/logs/$name.log:" >&2
            tail -n 20 "$STATE/logs/$name.log" >&2
            rc=1
        fi
    done
    if [ -n "$redis_pid" ] && kill -0 "$redis_pid" 2>/dev/null; then
        stop_pid "$redis_pid"
    fi
    if [ "$pg_started" = 1 ]; then
        harness_as_pg "$(harness_pg_bin)/pg_ctl" -D "$STATE/pg/data" -m fast -w stop >/dev/null 2>&1 ||
            { echo "run.sh: Postgres did not stop; see $STATE/pg/server.log" >&2; rc=1; }
    fi
    rm -f "$STATE/run.pid" "$STATE/run.pids" "$STATE/redis.pid"
    echo "iotsuite stopped (data kept in $STATE; make run-clean wipes it)"
    exit $rc
}
trap 'stop_all' INT TERM

fail() {
    echo "run.sh: $*" >&2
    rc=1
    stop_all
}

# ---- Postgres and Redis ----------------------------------------------------------------------

bin=$(harness_pg_bin)
[ -n "$bin" ] || fail "no PostgreSQL server installed (make deps)"
mkdir -p "$STATE/pg"
[ "$(id -u)" = 0 ] && chown postgres "$STATE/pg"
if [ ! -f "$STATE/pg/data/PG_VERSION" ]; then
    echo "creating the Postgres cluster in $STATE/pg (first run)"
    harness_as_pg "$bin/initdb" -D "$STATE/pg/data" -U postgres -A trust >"$STATE/logs/initdb.log" 2>&1 ||
        { cat "$STATE/logs/initdb.log" >&2; fail "initdb failed"; }
fi
# pg_ctl puts the server in its own session, so a Ctrl-C in this terminal reaches it only through
# stop_all, after the services have drained.
harness_as_pg "$bin/pg_ctl" -D "$STATE/pg/data" -l "$STATE/pg/server.log" -w -t 60 \
    -o "-k $STATE/pg -c listen_addresses=127.0.0.1 -p $PG_PORT" start >/dev/null ||
    { tail -n 20 "$STATE/pg/server.log" >&2; fail "Postgres did not start on port $PG_PORT (see above)"; }
pg_started=1
harness_as_pg "$bin/psql" -h "$STATE/pg" -p "$PG_PORT" -U postgres -tAc \
    "SELECT 1 FROM pg_database WHERE datname='iotsuite'" | grep -q 1 ||
    harness_as_pg "$bin/createdb" -h "$STATE/pg" -p "$PG_PORT" -U postgres iotsuite ||
    fail "cannot create the iotsuite database"
IOT_PG_DSN="host=$STATE/pg port=$PG_PORT dbname=iotsuite user=postgres"

# setsid: the services, Redis and the simulator get their own sessions, so that a Ctrl-C reaches
# this script only, which stops them in order.
setsid redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --dir "$STATE" --appendonly yes \
    --logfile "$STATE/logs/redis.log" --pidfile "$STATE/redis.pid" --daemonize no </dev/null >/dev/null 2>&1 &
redis_pid=$!
i=0
until redis-cli -p "$REDIS_PORT" ping 2>/dev/null | grep -q PONG; do
    kill -0 "$redis_pid" 2>/dev/null || { tail -n 20 "$STATE/logs/redis.log" >&2; fail "redis-server exited (port $REDIS_PORT)"; }
    i=$((i + 1))
    [ $i -lt 300 ] || fail "redis-server does not answer on port $REDIS_PORT"
    sleep 0.1
done
IOT_REDIS_ADDR=127.0.0.1:$REDIS_PORT
IOT_OTA_KEYS_DIR=${IOT_OTA_KEYS_DIR:-$STATE/ota-keys}
export IOT_PG_DSN IOT_REDIS_ADDR IOT_OTA_KEYS_DIR

# ---- the admin API key: made once, kept with the data ----------------------------------------

KEYFILE=$STATE/admin-key
if [ -n "${IOT_GW_BOOTSTRAP_KEY:-}" ]; then
    KEY=$IOT_GW_BOOTSTRAP_KEY
    key_from="IOT_GW_BOOTSTRAP_KEY"
else
    if [ ! -s "$KEYFILE" ]; then
        hex() { od -An -N"$1" -tx1 /dev/urandom | tr -d ' \n'; }
        (umask 077 && printf 'iotk_%s_%s\n' "$(hex 6)" "$(hex 32)" >"$KEYFILE.tmp" && mv "$KEYFILE.tmp" "$KEYFILE") ||
            fail "cannot write $KEYFILE"
    fi
    chmod 600 "$KEYFILE"
    KEY=$(cat "$KEYFILE")
    key_from=$KEYFILE
fi
echo "$KEY" | grep -Eq '^iotk_[0-9a-f]{12}_[0-9a-f]{64}$' ||
    fail "the admin key in $key_from is not a key (iotk_<12 hex>_<64 hex>); remove it to have a new one made"

# ---- the services --------------------------------------------------------------------------

port_of() { # base offset
    if [ "$1" = 0 ]; then echo 0; else echo $(($1 + $2)); fi
}

# start NAME OFFSET [VAR=VALUE ...]: one service on its ports, in the background, in its own session.
start() {
    name=$1
    off=$2
    shift 2
    env IOT_GRPC_LISTEN="$HOST:$(port_of "$GRPC_BASE" "$off")" IOT_ADMIN_LISTEN="$HOST:$(port_of "$ADMIN_BASE" "$off")" \
        IOT_ADVERTISE_ADDR="$DIAL" "$@" \
        setsid "$B/services/$name/$name" </dev/null >"$STATE/logs/$name.out" 2>"$STATE/logs/$name.log" &
    pid=$!
    started="$started $name:$pid"
    echo "$pid $B/services/$name/$name" >>"$STATE/run.pids"
}

pid_of() {
    for e in $started; do [ "${e%%:*}" = "$1" ] && echo "${e#*:}"; done
}

# The first "key=N" in a service's stdout (its ports line: "<name> grpc=N admin=N", "gateway http=N").
printed() {
    sed -n "s/.*[ ]$2=\([0-9][0-9]*\).*/\1/p" "$STATE/logs/$1.out" 2>/dev/null | head -n 1
}

# Waits until each named service answers its gRPC health check SERVING (ready: its Postgres,
# Redis and migrations are fine); a service that exits meanwhile fails the start with its log.
wait_healthy() {
    for name in "$@"; do
        pid=$(pid_of "$name")
        t0=$(date +%s)
        while :; do
            if ! kill -0 "$pid" 2>/dev/null; then
                wait "$pid" 2>/dev/null
                st=$?
                echo "run.sh: $name exited during start (status $st); the end of $STATE/logs/$name.log:" >&2
                tail -n 30 "$STATE/logs/$name.log" >&2
                fail "$name did not start"
            fi
            port=$(printed "$name" grpc)
            if [ -n "$port" ] && "$PROBE" -addr "$DIAL:$port" -timeout 1s >/dev/null 2>&1; then
                eval "GRPC_$(echo "$name" | tr -- '-a-z' '_A-Z')=$DIAL:$port"
                eval "ADMIN_$(echo "$name" | tr -- '-a-z' '_A-Z')=$DIAL:$(printed "$name" admin)"
                break
            fi
            if [ $(($(date +%s) - t0)) -ge "$START_TIMEOUT" ]; then
                tail -n 30 "$STATE/logs/$name.log" >&2
                fail "$name is not healthy after ${START_TIMEOUT}s (last lines of its log above)"
            fi
            sleep 0.2
        done
    done
}

echo "starting the services (logs in $STATE/logs)"
start registry 1
wait_healthy registry
REG="IOT_REGISTRY_ADDR=$GRPC_REGISTRY"
start device-mgmt 2 "$REG"
wait_healthy device-mgmt
start ingest 3 "$REG" IOT_INGEST_DM_ADDR="$GRPC_DEVICE_MGMT"
start processing 4 "$REG" IOT_PROC_DM_ADDR="$GRPC_DEVICE_MGMT"
wait_healthy ingest processing
start ota 5 "$REG" IOT_OTA_DM_ADDR="$GRPC_DEVICE_MGMT" IOT_OTA_PROC_ADDR="$GRPC_PROCESSING"
wait_healthy ota
start gateway 6 "$REG" IOT_GW_HTTP_LISTEN="$HOST:$HTTP_PORT" IOT_GW_BOOTSTRAP_KEY="$KEY" \
    IOT_GW_DM_ADDR="$GRPC_DEVICE_MGMT" IOT_GW_INGEST_ADDR="$GRPC_INGEST" IOT_GW_PROC_ADDR="$GRPC_PROCESSING" \
    IOT_GW_OTA_ADDR="$GRPC_OTA" IOT_GW_REGISTRY_ADDR="$GRPC_REGISTRY"
wait_healthy gateway
HTTP=$DIAL:$(printed gateway http)

echo
echo "iotsuite is running (state in $STATE)"
echo
echo "  dashboard:  http://$HTTP/"
echo "  REST API:   http://$HTTP/api/v1/  (OpenAPI: http://$HTTP/api/v1/openapi.json)"
echo "  API key:    $KEY"
echo "              (admin; kept in $key_from)"
echo
printf '  %-12s %-22s %s\n' service gRPC "admin (/metrics /healthz /readyz)"
for s in $SERVICES; do
    v=$(echo "$s" | tr -- '-a-z' '_A-Z')
    eval "g=\$GRPC_$v a=\$ADMIN_$v"
    printf '  %-12s %-22s http://%s/\n' "$s" "$g" "$a"
done
printf '  %-12s %s\n' postgres "$IOT_PG_DSN"
printf '  %-12s %s\n' redis "$IOT_REDIS_ADDR"
echo
echo "  try: curl -H 'Authorization: Bearer $KEY' http://$HTTP/api/v1/devices:count"
echo

if [ "$demo" = 1 ]; then
    # The simulator's summary lines come here; its diagnostics go to logs/iot-sim.log.
    env IOT_SIM_DM_ADDR="$GRPC_DEVICE_MGMT" IOT_SIM_INGEST_ADDR="$GRPC_INGEST" IOT_SIM_PROC_ADDR="$GRPC_PROCESSING" \
        IOT_SIM_OTA_ADDR="$GRPC_OTA" setsid "$SIM" </dev/null 2>"$STATE/logs/iot-sim.log" &
    sim_pid=$!
    started="$started iot-sim:$sim_pid"
    echo "$sim_pid $SIM" >>"$STATE/run.pids"
    echo "demo: iot-sim (pid $sim_pid) simulates devices; the dashboard shows them, their telemetry, alerts and a rollout within a minute"
fi
echo "iotsuite running; Ctrl-C stops it"

# Watch: a service that dies stops the suite (with its log); the simulator only says so.
while :; do
    sleep 1 &
    sleeper=$!
    wait $sleeper
    for e in $started; do
        name=${e%%:*}
        pid=${e#*:}
        kill -0 "$pid" 2>/dev/null && continue
        wait "$pid" 2>/dev/null
        st=$?
        if [ "$name" = iot-sim ]; then
            echo "run.sh: iot-sim exited (status $st); the suite keeps running. The end of $STATE/logs/iot-sim.log:" >&2
            tail -n 10 "$STATE/logs/iot-sim.log" >&2
            started=$(echo "$started" | sed "s/ iot-sim:$pid//")
            continue
        fi
        echo "run.sh: $name exited (status $st) while running; the end of $STATE/logs/$name.log:" >&2
        tail -n 30 "$STATE/logs/$name.log" >&2
        fail "$name died; stopping the rest"
    done
done
