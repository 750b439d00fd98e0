#!/bin/sh
# make images: builds the six service images from docker/Dockerfile (one target each), tagged
# iotsuite/<service>:<version> and :latest, after making sure the engine and the base image exist.
#   sh docker/build.sh [SERVICE...]
# Environment: IOT_IMAGE_REPO (default iotsuite), IOT_IMAGE_VERSION (default `git describe`),
# IOT_BASE_IMAGE (see base-image.sh), JOBS (compile jobs in the build stage, default 2).
set -eu
cd "$(dirname "$0")/.."
. docker/lib.sh

services=${*:-registry device-mgmt ingest processing ota gateway}
repo=${IOT_IMAGE_REPO:-iotsuite}
version=${IOT_IMAGE_VERSION:-$(docker_version)}
base=${IOT_BASE_IMAGE:-localhost/debian:bookworm-slim}

sh docker/base-image.sh
docker_ensure
log=$(mktemp /tmp/iotsuite-images.XXXXXX)
trap 'rm -f "$log"' EXIT
for s in $services; do
    start=$(date +%s)
    echo "images: $repo/$s:$version"
    # The build stage is the same for every target: after the first image it comes from the cache.
    if ! $DOCKER build -f docker/Dockerfile --target "$s" --build-arg BASE="$base" --build-arg JOBS="${JOBS:-2}" \
        --label org.opencontainers.image.version="$version" \
        -t "$repo/$s:$version" -t "$repo/$s:latest" . >"$log" 2>&1; then
        tail -n 40 "$log" >&2
        echo "images: building $s failed" >&2
        exit 1
    fi
    size=$($DOCKER image inspect -f '{{ .Size }}' "$repo/$s:$version")
    echo "images: $repo/$s:$version built in $(( $(date +%s) - start )) s, $((size / 1000000)) MB"
done
