# Throwaway Postgres and Redis for one test run. Sourced by tests/run.sh and tools/run.sh.
#
#   harness_init DIR            scratch directory (created; removed by harness_cleanup)
#   harness_start_postgres [PORT]  initdb + start on a Unix socket in DIR; exports IOT_TEST_PG; with
#                               PORT also on 127.0.0.1:PORT (for containers), exports IOT_TEST_PG_TCP
#   harness_free_port           sets $harness_port to a loopback TCP port nothing listens on (and not
#                               handed out before; call it in this shell, not in $(...))
#   harness_start_redis         redis-server on a free loopback port; exports IOT_TEST_REDIS
#   harness_cleanup             stops both and removes DIR (install with trap ... EXIT)
#
# Postgres refuses to run as root, so when we are root the cluster runs as the postgres user.

harness_dir=
harness_pg_data=
harness_redis_pid=

harness_pg_bin() {
    ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1
}

harness_init() {
    harness_dir=$1
    mkdir -p "$harness_dir"
    chmod 755 "$harness_dir"
}

harness_as_pg() {
    if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

harness_start_postgres() {
    bin=$(harness_pg_bin)
    [ -n "$bin" ] || { echo "harness: no PostgreSQL server installed (run make deps)" >&2; return 1; }
    harness_pg_data=$harness_dir/pg
    mkdir -p "$harness_pg_data"
    [ "$(id -u)" = 0 ] && chown postgres "$harness_pg_data"
    harness_as_pg "$bin/initdb" -D "$harness_pg_data/data" -U postgres -A trust --no-sync >"$harness_dir/initdb.log" 2>&1 ||
        { echo "harness: initdb failed, see $harness_dir/initdb.log" >&2; cat "$harness_dir/initdb.log" >&2; return 1; }
    # No TCP at all: the socket lives in the scratch directory, so parallel runs cannot collide.
    # Exported so that a test can stop and restart this same server (tests/support/pg_stop_start.sh).
    IOT_TEST_PG_CTL="$bin/pg_ctl"
    IOT_TEST_PG_DATA="$harness_pg_data/data"
    tcp="-c listen_addresses="
    [ -n "${1:-}" ] && tcp="-c listen_addresses=127.0.0.1 -c port=$1"
    IOT_TEST_PG_OPTS="-k $harness_pg_data $tcp -c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=200"
    export IOT_TEST_PG_CTL IOT_TEST_PG_DATA IOT_TEST_PG_OPTS
    harness_as_pg "$bin/pg_ctl" -D "$harness_pg_data/data" -l "$harness_pg_data/server.log" -w -t 60 \
        -o "$IOT_TEST_PG_OPTS" start >/dev/null ||
        { echo "harness: postgres did not start" >&2; cat "$harness_pg_data/server.log" >&2; return 1; }
    harness_as_pg "$bin/createdb" -h "$harness_pg_data" ${1:+-p "$1"} -U postgres iot_test || return 1
    IOT_TEST_PG="host=$harness_pg_data${1:+ port=$1} dbname=iot_test user=postgres"
    export IOT_TEST_PG
    if [ -n "${1:-}" ]; then
        IOT_TEST_PG_TCP="host=127.0.0.1 port=$1 dbname=iot_test user=postgres"
        export IOT_TEST_PG_TCP
    fi
}

harness_ports_given=
harness_free_port() {
    while :; do
        harness_port=$(shuf -i 30000-49999 -n 1)
        case " $harness_ports_given " in *" $harness_port "*) continue ;; esac
        ss -Htln "sport = :$harness_port" 2>/dev/null | grep -q . && continue
        harness_ports_given="$harness_ports_given $harness_port"
        return 0
    done
}

harness_start_redis() {
    command -v redis-server >/dev/null || { echo "harness: redis-server not installed (run make deps)" >&2; return 1; }
    tries=0
    while [ $tries -lt 20 ]; do
        tries=$((tries + 1))
        port=$(( ($$ * 7 + tries * 7919 + $(date +%N | sed 's/^0*//;s/^$/0/') ) % 20000 + 30000 ))
        redis-server --port "$port" --bind 127.0.0.1 --save '' --appendonly no --dir "$harness_dir" \
            --logfile "$harness_dir/redis.log" --daemonize no &
        harness_redis_pid=$!
        i=0
        while [ $i -lt 50 ]; do
            if redis-cli -p "$port" ping 2>/dev/null | grep -q PONG; then
                IOT_TEST_REDIS="127.0.0.1:$port"
                export IOT_TEST_REDIS
                return 0
            fi
            kill -0 "$harness_redis_pid" 2>/dev/null || break
            sleep 0.1
            i=$((i + 1))
        done
        kill "$harness_redis_pid" 2>/dev/null
        wait "$harness_redis_pid" 2>/dev/null
        harness_redis_pid=
    done
    echo "harness: could not start redis-server on a free port" >&2
    return 1
}

harness_cleanup() {
    if [ -n "$harness_redis_pid" ]; then
        kill "$harness_redis_pid" 2>/dev/null
        wait "$harness_redis_pid" 2>/dev/null
    fi
    if [ -n "$harness_pg_data" ] && [ -f "$harness_pg_data/data/postmaster.pid" ]; then
        harness_as_pg "$(harness_pg_bin)/pg_ctl" -D "$harness_pg_data/data" -m immediate -w stop >/dev/null 2>&1
    fi
    [ -n "$harness_dir" ] && [ -z "${IOT_KEEP_TMP:-}" ] && rm -rf "$harness_dir"
    return 0
}
