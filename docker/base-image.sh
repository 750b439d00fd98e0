#!/bin/sh
# Makes the base image every iotsuite image starts FROM, once per machine:
#   sh docker/base-image.sh [--force]
#
# Docker Hub is not reachable from these machines, so instead of pulling debian:bookworm-slim we
# build the same thing: `debootstrap --variant=minbase bookworm` from the Debian mirror the host's
# apt uses, slimmed the way the official Debian images are (dpkg excludes documentation, man pages
# and translations, also for packages installed later; no apt lists or caches), upgraded from
# bookworm-updates and bookworm-security, then `docker import`ed. The image carries a recipe label:
# when this script's recipe changes, bump IOT_BASE_RECIPE and the image is rebuilt.
#
# Environment: IOT_BASE_IMAGE (default localhost/debian:bookworm-slim), IOT_DEBIAN_MIRROR (default:
# the first Debian URI in /etc/apt/sources.list*), IOT_DEBIAN_SECURITY (default: the host's
# debian-security URI, if any).
set -eu
# debootstrap and chroot need root.
[ "$(id -u)" = 0 ] || exec sudo -E sh "$0" "$@"
cd "$(dirname "$0")/.."
. docker/lib.sh

IMAGE=${IOT_BASE_IMAGE:-localhost/debian:bookworm-slim}
IOT_BASE_RECIPE=1
force=
[ "${1:-}" = --force ] && force=1

docker_ensure
have=$($DOCKER image inspect -f '{{ index .Config.Labels "org.iotsuite.base-recipe" }}' "$IMAGE" 2>/dev/null || true)
if [ -z "$force" ] && [ "$have" = "$IOT_BASE_RECIPE" ]; then
    echo "base-image: $IMAGE present (recipe $have)"
    exit 0
fi

command -v debootstrap >/dev/null 2>&1 || docker__apt_install debootstrap

# The host's mirrors, from one-line (.list) or deb822 (.sources) files.
apt_uris() {
    cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources 2>/dev/null |
        sed -n -e 's/^[[:space:]]*deb[[:space:]]\{1,\}\(\[[^]]*\][[:space:]]\{1,\}\)\{0,1\}\([a-z]*:[^[:space:]]*\).*/\2/p' \
               -e 's/^URIs:[[:space:]]*//p' | tr ' ' '\n' | sed '/^$/d'
}
mirror=${IOT_DEBIAN_MIRROR:-$(apt_uris | grep -E '/debian/?$' | head -n 1)}
mirror=${mirror:-http://deb.debian.org/debian}
security=${IOT_DEBIAN_SECURITY-$(apt_uris | grep -E '/debian-security/?$' | head -n 1)}

tmp=$(mktemp -d /tmp/iotsuite-rootfs.XXXXXX)
trap 'rm -rf "$tmp"' EXIT
rootfs=$tmp/rootfs
echo "base-image: debootstrap --variant=minbase bookworm from $mirror"
start=$(date +%s)
debootstrap --variant=minbase bookworm "$rootfs" "$mirror" >"$tmp/debootstrap.log" 2>&1 ||
    { tail -n 30 "$tmp/debootstrap.log" >&2; exit 1; }

# Slim like the official images: these paths are never unpacked again (copyright files stay).
cat >"$rootfs/etc/dpkg/dpkg.cfg.d/docker-slim" <<'EOF'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/groff/*
path-exclude /usr/share/lintian/*
path-exclude /usr/share/linda/*
path-exclude /usr/share/locale/*
EOF
cat >"$rootfs/etc/apt/apt.conf.d/docker-slim" <<'EOF'
APT::Install-Recommends "false";
APT::Install-Suggests "false";
Acquire::Languages "none";
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
EOF
{
    echo "deb $mirror bookworm main"
    echo "deb $mirror bookworm-updates main"
    [ -n "$security" ] && echo "deb $security bookworm-security main"
} >"$rootfs/etc/apt/sources.list"

# Security and point updates now, so that every image starts patched.
chroot "$rootfs" sh -c 'apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get -y -q upgrade' \
    >"$tmp/upgrade.log" 2>&1 || { tail -n 30 "$tmp/upgrade.log" >&2; exit 1; }

find "$rootfs/usr/share/doc" -mindepth 1 ! -name copyright ! -type d -delete 2>/dev/null || true
find "$rootfs/usr/share/doc" -mindepth 1 -type d -empty -delete 2>/dev/null || true
rm -rf "$rootfs"/usr/share/man/* "$rootfs"/usr/share/info/* "$rootfs"/usr/share/locale/* \
       "$rootfs"/usr/share/groff/* "$rootfs"/usr/share/lintian/*
rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/* "$rootfs"/var/cache/debconf/*-old \
       "$rootfs"/var/log/*.log "$rootfs"/var/log/apt/* "$rootfs"/tmp/* "$rootfs"/root/.bash_history
# Machine identity is made per container, not baked into the image.
: >"$rootfs/etc/machine-id"

tar -C "$rootfs" --numeric-owner -c . |
    $DOCKER import \
        --change "LABEL org.iotsuite.base-recipe=$IOT_BASE_RECIPE" \
        --change 'ENV LANG=C.UTF-8' \
        --change 'CMD ["bash"]' \
        - "$IMAGE" >/dev/null
size=$($DOCKER image inspect -f '{{ .Size }}' "$IMAGE")
echo "base-image: $IMAGE built in $(( $(date +%s) - start )) s, $((size / 1000000)) MB"
