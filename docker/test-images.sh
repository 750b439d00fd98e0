#!/bin/sh
# make test-images: runs every image the way a deployment would and checks it, against a throwaway
# Postgres and Redis on loopback (tests/support/harness.sh, the test suite's own).
#   sh docker/test-images.sh
#
# Containers run with --network host on free loopback ports: test traffic never goes to a container
# bridge address. Each runs as its image's user with --read-only --tmpfs /tmp (ota with its signing
# key mounted read-only, as from a Secret). Per service: HEALTHCHECK healthy (the image's own probe
# command; only its interval is shortened), the named gRPC service SERVING, runs as uid 10001 and
# libraries resolve, root file system read-only and /tmp writable, one real call (grpc-js from
# docker/smoke.js; curl for the gateway's REST API), and SIGTERM ends it with exit code 0.
# Ends with "N passed, N failed".
#
# Environment: IOT_IMAGE_REPO, IOT_IMAGE_VERSION (as docker/build.sh; default :latest).
set -u
cd "$(dirname "$0")/.."
ROOT=$(pwd)
. docker/lib.sh
. tests/support/harness.sh

repo=${IOT_IMAGE_REPO:-iotsuite}
version=${IOT_IMAGE_VERSION:-latest}
services="registry device-mgmt ingest processing ota gateway"
run_id=$$
t0=$(date +%s)

pass=0
fail=0
ok() { pass=$((pass + 1)); echo "ok - $1"; }
not_ok() { fail=$((fail + 1)); echo "not ok - $1"; }
check() { # name, command...: ok when the command succeeds
    name=$1
    shift
    if out=$("$@" 2>&1); then ok "$name"; else not_ok "$name: $(echo "$out" | tail -n 3 | tr '\n' ' ')"; fi
}

docker_ensure || { echo "0 passed, 1 failed"; exit 1; }
[ -d tests/interop/node_modules/@grpc/grpc-js ] ||
    { echo "test-images: tests/interop/node_modules missing: run make deps"; echo "0 passed, 1 failed"; exit 1; }
for s in $services; do
    $DOCKER image inspect "$repo/$s:$version" >/dev/null 2>&1 ||
        { echo "test-images: no image $repo/$s:$version: run make images"; echo "0 passed, 1 failed"; exit 1; }
done

tmp=$(mktemp -d /tmp/iotsuite-test-images.XXXXXX)
harness_init "$tmp"
cleanup() {
    ids=$($DOCKER ps -aq --filter "label=org.iotsuite.test-run=$run_id" 2>/dev/null)
    [ -n "$ids" ] && $DOCKER rm -f $ids >/dev/null 2>&1
    harness_cleanup
}
trap cleanup EXIT
trap 'exit 130' INT TERM

harness_free_port
harness_start_postgres "$harness_port" || { echo "0 passed, 1 failed"; exit 1; }
harness_start_redis || { echo "0 passed, 1 failed"; exit 1; }

# Ports: gRPC and admin per service, plus the gateway's REST port.
for s in $services; do
    v=$(echo "$s" | tr -d '-')
    harness_free_port; eval "grpc_$v=$harness_port"
    harness_free_port; eval "admin_$v=$harness_port"
done
harness_free_port; http_port=$harness_port
port_of() { v=$(echo "$1" | tr -d '-'); eval "echo \$grpc_$v"; }
admin_of() { v=$(echo "$1" | tr -d '-'); eval "echo \$admin_$v"; }

# The OTA signing key as a deployment would mount it (read-only, readable by the image's user).
mkdir -p "$tmp/ota-keys"
openssl genpkey -algorithm ed25519 -out "$tmp/ota-keys/test.pem" 2>/dev/null
chmod 755 "$tmp/ota-keys"
chmod 644 "$tmp/ota-keys/test.pem"
api_key=iotk_$(openssl rand -hex 6)_$(openssl rand -hex 32)
device_id=img-smoke-$run_id

grpc_service_of() {
    case $1 in
    registry) echo iot.registry.v1.Registry ;;
    device-mgmt) echo iot.device.v1.DeviceManager ;;
    ingest) echo iot.ingest.v1.Ingest ;;
    processing) echo iot.processing.v1.Processing ;;
    ota) echo iot.ota.v1.Ota ;;
    gateway) echo "" ;; # the REST gateway serves only health and reflection over gRPC
    esac
}

start() { # service: runs its container detached
    s=$1
    set -- -e IOT_PG_DSN="$IOT_TEST_PG_TCP" -e IOT_REDIS_ADDR="$IOT_TEST_REDIS" \
        -e IOT_GRPC_LISTEN="127.0.0.1:$(port_of "$s")" -e IOT_ADMIN_LISTEN="127.0.0.1:$(admin_of "$s")" \
        -e IOT_LOG_LEVEL=warn -e IOT_SHUTDOWN_GRACE=5s
    [ "$s" = registry ] || set -- "$@" -e IOT_REGISTRY_ADDR="127.0.0.1:$grpc_registry" -e IOT_ADVERTISE_ADDR=127.0.0.1
    dm="127.0.0.1:$grpc_devicemgmt"
    case $s in
    ingest) set -- "$@" -e IOT_INGEST_DM_ADDR="$dm" ;;
    processing) set -- "$@" -e IOT_PROC_DM_ADDR="$dm" ;;
    ota) set -- "$@" -e IOT_OTA_DM_ADDR="$dm" -e IOT_OTA_PROC_ADDR="127.0.0.1:$grpc_processing" \
        -v "$tmp/ota-keys:/etc/iotsuite/ota-keys:ro" ;;
    gateway) set -- "$@" -e IOT_GW_DM_ADDR="$dm" -e IOT_GW_INGEST_ADDR="127.0.0.1:$grpc_ingest" \
        -e IOT_GW_PROC_ADDR="127.0.0.1:$grpc_processing" -e IOT_GW_OTA_ADDR="127.0.0.1:$grpc_ota" \
        -e IOT_GW_REGISTRY_ADDR="127.0.0.1:$grpc_registry" -e IOT_GW_HTTP_LISTEN="127.0.0.1:$http_port" \
        -e IOT_GW_BOOTSTRAP_KEY="$api_key" ;;
    esac
    $DOCKER run -d --name "iotsuite-test-$run_id-$s" --label "org.iotsuite.test-run=$run_id" \
        --network host --read-only --tmpfs /tmp \
        --health-interval 1s --health-retries 3 --health-start-period 60s \
        "$@" "$repo/$s:$version" >/dev/null
}

wait_healthy() { # service
    c=iotsuite-test-$run_id-$1
    i=0
    while [ $i -lt 60 ]; do
        st=$($DOCKER inspect -f '{{ .State.Health.Status }} {{ .State.Running }}' "$c" 2>/dev/null)
        case $st in
        "healthy true") return 0 ;;
        *" false") break ;;
        esac
        sleep 1
        i=$((i + 1))
    done
    echo "health: $st"
    $DOCKER inspect -f '{{ range .State.Health.Log }}{{ .Output }}{{ end }}' "$c" | tail -n 2
    $DOCKER logs "$c" 2>&1 | tail -n 5
    return 1
}

in_container() { # service, command...
    c=iotsuite-test-$run_id-$1
    shift
    $DOCKER exec "$c" "$@"
}

runs_as_10001() { # service
    u=$(in_container "$1" id -u) || return 1
    [ "$u" = 10001 ] || { echo "id -u: $u"; return 1; }
    # Every shared object the binary and the probe need is in the image.
    missing=$(in_container "$1" sh -c "ldd /usr/local/bin/$1 /usr/local/bin/iot-health-probe | grep 'not found'")
    [ -z "$missing" ] || { echo "missing libraries: $missing"; return 1; }
}

read_only_root() { # service
    # The mount itself (uid 10001 could not write to / anyway, so a failed write would prove little).
    opts=$(in_container "$1" sh -c "awk '\$2 == \"/\" { print \$4 }' /proc/mounts") || return 1
    case ,$opts, in *,ro,*) ;; *) echo "/ is mounted ${opts%%,*}"; return 1 ;; esac
    in_container "$1" sh -c 'echo x > /tmp/probe-write && rm /tmp/probe-write'
}

named_service_serving() { # service
    n=$(grpc_service_of "$1")
    if [ -n "$n" ]; then in_container "$1" iot-health-probe -service "$n"; else in_container "$1" iot-health-probe; fi
}

real_call() { # service
    if [ "$1" = gateway ]; then
        body=$(curl -sS --max-time 10 -H "Authorization: Bearer $api_key" "http://127.0.0.1:$http_port/api/v1/devices") ||
            return 1
        # The device created through device-mgmt's container, listed through the gateway's.
        case $body in *"$device_id"*) echo "GET /api/v1/devices lists $device_id" ;; *) echo "$body"; return 1 ;; esac
    else
        node docker/smoke.js "$1" "127.0.0.1:$(port_of "$1")" "$device_id"
    fi
}

graceful_stop() { # service
    c=iotsuite-test-$run_id-$1
    $DOCKER stop -t 30 "$c" >/dev/null || return 1
    code=$($DOCKER inspect -f '{{ .State.ExitCode }}' "$c")
    [ "$code" = 0 ] || { echo "exit code $code"; $DOCKER logs "$c" 2>&1 | tail -n 5; return 1; }
}

# Dependencies first: registry, device-mgmt, then the services that call them.
for s in $services; do
    if start "$s"; then ok "$s: starts (--network host --read-only --tmpfs /tmp)"; else not_ok "$s: docker run failed"; fi
    check "$s: HEALTHCHECK healthy" wait_healthy "$s"
done
for s in $services; do
    n=$(grpc_service_of "$s")
    check "$s: health of ${n:-the server} SERVING (iot-health-probe in the container)" named_service_serving "$s"
    check "$s: runs as uid 10001, libraries resolve" runs_as_10001 "$s"
    check "$s: root read-only, /tmp writable" read_only_root "$s"
done
# device-mgmt first: the others look at the device it creates; registry last, when all registered.
for s in device-mgmt ingest processing ota gateway registry; do
    if out=$(real_call "$s" 2>&1); then ok "$s: $out"; else not_ok "$s: real call: $(echo "$out" | tail -n 3 | tr '\n' ' ')"; fi
done
for s in gateway ota ingest processing device-mgmt registry; do
    check "$s: SIGTERM, exit code 0" graceful_stop "$s"
done

echo "test-images: $(( $(date +%s) - t0 )) s"
echo "$pass passed, $fail failed"
[ "$fail" -eq 0 ]
