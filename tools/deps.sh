#!/bin/sh
# make deps: installs every Debian and npm package the build, the tests and `make run` need
# (clang and its runtime with libFuzzer: `make fuzz`).
# Idempotent: checks first and installs only what is missing. Needs root (or sudo) on Debian 12.
set -eu

PKGS="build-essential make pkg-config openssl ca-certificates
      libgrpc-dev libgrpc++-dev protobuf-compiler-grpc grpc-proto
      libprotobuf-c-dev protobuf-c-compiler protobuf-compiler libprotobuf-dev
      libpq-dev libhiredis-dev libmicrohttpd-dev libjansson-dev libssl-dev
      postgresql redis-server
      curl wrk chromium
      yamllint unzip
      clang libclang-rt-14-dev"

missing=
for p in $PKGS; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing="$missing $p"
done
# Node.js may come from elsewhere than Debian (and then Debian's npm conflicts with it): only ask
# apt for what is really absent.
command -v node >/dev/null 2>&1 || missing="$missing nodejs"
command -v npm >/dev/null 2>&1 || missing="$missing npm"

if [ -n "$missing" ]; then
    SUDO=
    [ "$(id -u)" = 0 ] || SUDO=sudo
    echo "deps: installing:$missing"
    # The suite runs its own throwaway clusters; do not let the package start a system one.
    if [ ! -e /etc/postgresql-common/createcluster.conf ]; then
        $SUDO mkdir -p /etc/postgresql-common
        echo "create_main_cluster = false" | $SUDO tee /etc/postgresql-common/createcluster.conf >/dev/null
    fi
    $SUDO apt-get update -q
    # shellcheck disable=SC2086
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends $missing
else
    echo "deps: Debian packages present"
fi

# npm packages of the node tests, pinned by their lock files: `npm ci` when a package is missing or
# the lock file changed since the last install.
root=$(cd "$(dirname "$0")/.." && pwd)
npm_deps() { # directory under tests/, a package that must be there
    dir=$root/tests/$1
    if [ ! -d "$dir/node_modules/$2" ] || [ "$dir/package-lock.json" -nt "$dir/node_modules/.package-lock.json" ]; then
        echo "deps: installing npm packages for tests/$1"
        (cd "$dir" && npm ci --no-audit --no-fund --loglevel=error)
    else
        echo "deps: npm packages for tests/$1 present"
    fi
}
npm_deps interop @grpc/grpc-js          # the interop tests' grpc-js client and grpc-health-check
npm_deps gateway playwright-core        # the dashboard's browser test (driving /usr/bin/chromium)
npm_deps deploy kubernetes-models       # the chart checks: kubernetes-models, istio models, yaml, typescript
npm_deps e2e @grpc/grpc-js              # the end-to-end and fault tests: devices as grpc-js clients

# helm for the chart checks (Debian has none): fetched once into a cache outside git by npm pack.
echo "deps: helm at $(sh "$root/tools/helm.sh")"
