#!/bin/sh
# make run: starts the suite locally with its own Postgres and Redis under ./state, then every
# service binary that has been built, each on its own ports, and stays in the foreground.
# Ctrl-C (or SIGTERM) drains the services and stops the databases. Data persists in ./state.
set -u
B=${1:?usage: tools/run.sh BUILD_DIR}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
STATE=${IOT_STATE_DIR:-$ROOT/state}
mkdir -p "$STATE/logs"
chmod 755 "$STATE"
. tests/support/harness.sh
harness_dir=$STATE

pids=
stop_all() {
    for p in $pids; do kill -TERM "$p" 2>/dev/null; done
    for p in $pids; do wait "$p" 2>/dev/null; done
    [ -n "$harness_redis_pid" ] && kill "$harness_redis_pid" 2>/dev/null && wait "$harness_redis_pid" 2>/dev/null
    if [ -f "$STATE/pg/data/postmaster.pid" ]; then
        harness_as_pg "$(harness_pg_bin)/pg_ctl" -D "$STATE/pg/data" -m fast -w stop >/dev/null 2>&1
    fi
    echo "iotsuite stopped (data kept in $STATE)"
}
trap 'stop_all; exit 0' INT TERM

# Postgres: created once, reused on later runs.
bin=$(harness_pg_bin)
harness_pg_data=$STATE/pg
mkdir -p "$harness_pg_data"
[ "$(id -u)" = 0 ] && chown postgres "$harness_pg_data"
if [ ! -f "$harness_pg_data/data/PG_VERSION" ]; then
    harness_as_pg "$bin/initdb" -D "$harness_pg_data/data" -U postgres -A trust >"$STATE/logs/initdb.log" 2>&1 ||
        { cat "$STATE/logs/initdb.log"; exit 1; }
fi
harness_as_pg "$bin/pg_ctl" -D "$harness_pg_data/data" -l "$harness_pg_data/server.log" -w -t 60 \
    -o "-k $harness_pg_data -c listen_addresses=127.0.0.1 -p ${IOT_PG_PORT:-55432}" start >/dev/null ||
    { cat "$harness_pg_data/server.log"; exit 1; }
harness_as_pg "$bin/psql" -h "$harness_pg_data" -p "${IOT_PG_PORT:-55432}" -U postgres -tAc \
    "SELECT 1 FROM pg_database WHERE datname='iotsuite'" | grep -q 1 ||
    harness_as_pg "$bin/createdb" -h "$harness_pg_data" -p "${IOT_PG_PORT:-55432}" -U postgres iotsuite
IOT_PG_DSN="host=$harness_pg_data port=${IOT_PG_PORT:-55432} dbname=iotsuite user=postgres"

# Redis: persisted with AOF in the state directory.
redis-server --port "${IOT_REDIS_PORT:-56379}" --bind 127.0.0.1 --dir "$STATE" --appendonly yes \
    --logfile "$STATE/logs/redis.log" --daemonize no &
harness_redis_pid=$!
IOT_REDIS_ADDR=127.0.0.1:${IOT_REDIS_PORT:-56379}
# ota keeps its signing keys with the rest of the local state (created on first start).
IOT_OTA_KEYS_DIR=${IOT_OTA_KEYS_DIR:-$STATE/ota-keys}
export IOT_PG_DSN IOT_REDIS_ADDR IOT_OTA_KEYS_DIR

echo "postgres: $IOT_PG_DSN"
echo "redis:    $IOT_REDIS_ADDR"
echo "logs:     $STATE/logs"

# Services: each built binary under $B/services/<name>/ starts with its defaults; ports are fixed
# per service in its own config (see services/<name>/README.md).
started=0
for dir in services/*/; do
    name=$(basename "$dir")
    exe=$B/services/$name/$name
    [ -x "$exe" ] || continue
    "$exe" >"$STATE/logs/$name.out" 2>"$STATE/logs/$name.log" &
    pids="$pids $!"
    started=$((started + 1))
done
sleep 1
for f in "$STATE"/logs/*.out; do [ -f "$f" ] && cat "$f"; done
if [ -x "$B/services/gateway/gateway" ]; then
    echo "REST API: http://127.0.0.1:8080/api/v1/ (API key: the bootstrap key above, printed on the first run only)"
fi
if [ "$started" -eq 0 ]; then
    echo "no services are built yet; Postgres and Redis are up for development"
fi
echo "iotsuite running; Ctrl-C to stop"
while :; do sleep 3600 & wait $!; done
