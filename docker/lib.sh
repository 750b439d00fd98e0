# Shared by docker/base-image.sh, docker/build.sh and docker/test-images.sh (sourced, POSIX sh).
#
#   docker_ensure      installs docker.io when no engine is available and starts dockerd when it is
#                      not running; sets $DOCKER to the client to use
#   docker_version     the image version: `git describe`, else "dev"
#
# The client is Debian's /usr/bin/docker when present: it matches the engine Debian ships (20.10),
# while a newer client found earlier in PATH may lack the buildx plugin its `docker build` wants.

docker__sudo() {
    if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi
}

docker__apt_install() { # packages
    echo "docker: installing $*"
    docker__sudo apt-get update -q >/dev/null
    DEBIAN_FRONTEND=noninteractive docker__sudo apt-get install -y -q --no-install-recommends "$@" >/dev/null
}

docker_ensure() {
    command -v dockerd >/dev/null 2>&1 || docker__apt_install docker.io
    if [ -z "${DOCKER:-}" ]; then
        if [ -x /usr/bin/docker ]; then DOCKER=/usr/bin/docker; else DOCKER=docker; fi
    fi
    export DOCKER
    $DOCKER info >/dev/null 2>&1 && return 0
    # Not running (containers have no init system to start it): start one for this machine. It
    # outlives this script on purpose, so that the image cache and later runs reuse it.
    echo "docker: starting dockerd (log in /var/log/iotsuite-dockerd.log)"
    docker__sudo sh -c 'nohup dockerd --host unix:///var/run/docker.sock >>/var/log/iotsuite-dockerd.log 2>&1 &'
    i=0
    while [ $i -lt 60 ]; do
        $DOCKER info >/dev/null 2>&1 && return 0
        sleep 1
        i=$((i + 1))
    done
    echo "docker: dockerd did not come up within 60 s; see /var/log/iotsuite-dockerd.log" >&2
    tail -n 20 /var/log/iotsuite-dockerd.log >&2
    return 1
}

docker_version() {
    git describe --tags --always --dirty 2>/dev/null || echo dev
}
