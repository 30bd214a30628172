#!/usr/bin/env bash
# Build deploy/container/Containerfile's two images with podman, offline from any image registry,
# and run them: the demo inside the xenblk-vhost image, and the qemu-storage-daemon image serving
# a vhost-user-blk socket that xenblk-vhost on this host uses for a guest's I/O.
#
#   scripts/build-containers.sh            # base image (cached), both images, then run them
#   scripts/build-containers.sh --build    # only build
#
# The base image: Debian 12 by debootstrap (minbase), as the real-Xen rig builds dom0's root,
# imported with `podman import` as localhost/xenblk-vhost-base:bookworm. Its tarball is cached
# in /var/cache/xenblk-vhost/containers/ (first time: debootstrap, a few minutes; then the import
# takes seconds, and nothing at all while the image exists). The Containerfile is built FROM it
# (--build-arg DEBIAN=..., --pull=never) with --network host: its apt-get steps reach Debian's
# mirror, nothing reaches a registry.
#
# podman needs, on a host like this one (a container without cgroup delegation, whose hard
# RLIMIT_NOFILE is below podman's default of 1048576): runc, and `default_ulimits = []`.
# scripts/install-deps.sh installs both, the latter as the drop-in
# /etc/containers/containers.conf.d/50-xenblk-vhost.conf (an existing containers.conf is left
# alone). The run step is tests/containers_check.py (pytest): not in the default suite, because
# the first build takes minutes; .ci/run runs this script.
set -euo pipefail
HERE=$(cd "$(dirname "$0")/.." && pwd)
CACHE=${XENBLK_CONTAINER_CACHE:-/var/cache/xenblk-vhost/containers}
MIRROR=${XENBLK_RIG_MIRROR:-http://deb.debian.org/debian}
SECURITY_MIRROR=${XENBLK_RIG_SECURITY_MIRROR:-http://deb.debian.org/debian-security}
BASE=localhost/xenblk-vhost-base:bookworm
VERSION=$(sed -n 's/^version = "\(.*\)"/\1/p' "$HERE/pyproject.toml")
IMAGE=localhost/xenblk-vhost:$VERSION
QSD_IMAGE=localhost/xenblk-vhost-qsd:$VERSION
build_only=0
case "${1:-}" in
  --build) build_only=1;;
  "") ;;
  -h|--help) sed -n '2,/^set -e/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0;;
  *) echo "build-containers.sh: unknown argument $1 (see --help)" >&2; exit 2;;
esac
log() { printf '== build-containers: %s\n' "$*"; }
for tool in podman runc debootstrap; do
  command -v $tool >/dev/null || { echo "build-containers.sh: missing $tool (scripts/install-deps.sh installs it)" >&2; exit 1; }
done
t0=$(date +%s)

# ---------------------------------------------------------------- base image
tarball=$CACHE/debian-bookworm-minbase.tar
if ! podman image exists "$BASE"; then
  if [ ! -s "$tarball" ]; then
    log "debootstrap bookworm (minbase) into $tarball: the first time only"
    mkdir -p "$CACHE"
    rootfs=$(mktemp -d "$CACHE/rootfs.XXXXXX")
    trap 'rm -rf "$rootfs"' EXIT
    debootstrap --variant=minbase bookworm "$rootfs" "$MIRROR" >"$CACHE/debootstrap.log" 2>&1 \
      || { tail -20 "$CACHE/debootstrap.log" >&2; echo "build-containers.sh: debootstrap failed" >&2; exit 1; }
    printf '%s\n' "deb $MIRROR bookworm main" "deb $MIRROR bookworm-updates main" \
      "deb $SECURITY_MIRROR bookworm-security main" > "$rootfs/etc/apt/sources.list"
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
    tar --numeric-owner -C "$rootfs" -cf "$tarball.tmp" .
    mv "$tarball.tmp" "$tarball"
    rm -rf "$rootfs"
    trap - EXIT
  fi
  log "podman import $tarball as $BASE"
  podman import --quiet --change 'CMD ["/bin/bash"]' "$tarball" "$BASE" >/dev/null
fi

# ---------------------------------------------------------------- the Containerfile's images
# The build context: only what the Containerfile copies (never .venv or the rig's images).
context=$(mktemp -d /tmp/xenblk-containers.XXXXXX)
trap 'rm -rf "$context"' EXIT
tar -C "$HERE" --exclude=__pycache__ --exclude=xenblk_vhost/native/_build -cf - pyproject.toml README.md LICENSE xenblk_vhost config \
  deploy/container/Containerfile | tar -C "$context" -xf -
# pip in the RUN steps reaches PyPI as pip on this host does: the host's /etc/pip.conf is lent to
# them (a bind mount, read-only, in no image), and the CA bundle its `cert =` names too, at
# another path (ca-certificates, installed by those steps, replaces its own bundle file): for a
# proxy with its own CA.
lend=()
if [ -f /etc/pip.conf ]; then
  cert=$(sed -n 's/^[[:space:]]*cert[[:space:]]*=[[:space:]]*//p' /etc/pip.conf | tail -1)
  sed 's|^\([[:space:]]*cert[[:space:]]*=\).*|\1 /run/xenblk-build-ca.crt|' /etc/pip.conf > "$context/.pip.conf"
  lend+=(--volume "$context/.pip.conf:/etc/pip.conf:ro")
  if [ -n "$cert" ] && [ -f "$cert" ]; then lend+=(--volume "$cert:/run/xenblk-build-ca.crt:ro"); fi
fi
for target in xenblk-vhost qemu-storage-daemon; do
  tag=$IMAGE; [ $target = qemu-storage-daemon ] && tag=$QSD_IMAGE
  log "podman build --target $target -t $tag"
  podman build --quiet --pull=never --network host --build-arg DEBIAN=$BASE "${lend[@]}" \
    -f "$context/deploy/container/Containerfile" --target $target -t "$tag" "$context" >/dev/null
done
log "built $IMAGE and $QSD_IMAGE in $(( $(date +%s) - t0 )) s"
[ $build_only = 1 ] && exit 0

# ---------------------------------------------------------------- run them
log "tests/containers_check.py: the demo in $IMAGE; $QSD_IMAGE serving the host's backend"
XENBLK_IMAGE=$IMAGE XENBLK_QSD_IMAGE=$QSD_IMAGE \
  "$HERE/.venv/bin/pytest" -q -p no:cacheprovider "$HERE/tests/containers_check.py"
log "done in $(( $(date +%s) - t0 )) s"
