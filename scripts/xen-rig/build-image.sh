#!/bin/bash
# Build (or bring up to date) the rig's images under $XENBLK_RIG_DIR
# (default /var/cache/xenblk-vhost/rig). Idempotent: each stage records a hash
# of its inputs (its own script, the files it reads, the stages below it) and
# runs again only when that hash changes or its outputs are gone.
#
#   base     debootstrap bookworm + Xen 4.17 + kernel        -> rootfs/
#   runtime  libblkio1 (trixie, pinned), qemu-storage-daemon,
#            /opt/xenblk-vhost/venv with the project's deps   -> rootfs/
#   domu     the guest's kernel, busybox initramfs + workload,
#            fio for the bench guest                          -> boot/domu-*
#   image    dom0 init and config, boot files, dom0.img      -> dom0.img, boot/
#
# The project's own code is NOT in the image: run.sh puts the checkout on the
# 9p share at every run, so code changes never cost a rebuild.
#   build-image.sh [--force STAGE]...
set -euo pipefail
# The whole script is one brace group: bash parses it completely before running,
# so editing this file while a run is going cannot derail that run.
{
. "$(dirname "$0")/lib.sh"
[ "$(id -u)" = 0 ] || rig_die "run as root (debootstrap, chroot)"

force=" "
while [ $# -gt 0 ]; do
  case "$1" in
    --force) force+="$2 "; shift 2;;
    *) rig_die "usage: build-image.sh [--force base|runtime|domu|image]...";;
  esac
done

# When run.sh calls us it already holds the lock.
[ -n "${RIG_LOCKED:-}" ] || rig_lock
mkdir -p "$STAMPS" "$RIG/boot"

hash_of() {  # files and literal strings (prefixed "str:") -> one sha256
  for x in "$@"; do
    case "$x" in
      str:*) printf '%s\n' "${x#str:}";;
      *) printf '%s\n' "${x#$RIG_HERE/}"; cat "$x";;
    esac
  done | sha256sum | cut -d' ' -f1
}
stamp_of() { cat "$STAMPS/$1" 2>/dev/null || echo none; }

# stage NAME "OUTPUTS" INPUTS... : run build/NAME.sh if its input hash changed.
stage() {
  local name=$1 outputs=$2; shift 2
  local want; want=$(hash_of "$RIG_HERE/build/$name.sh" "$@")
  local missing=0 o
  for o in $outputs; do [ -e "$RIG/$o" ] || missing=1; done
  if [ "$(stamp_of "$name")" = "$want" ] && [ $missing = 0 ] && [[ "$force" != *" $name "* ]]; then
    rig_log "stage $name: up to date"
    return
  fi
  rig_log "stage $name: building"
  local t=$EPOCHREALTIME
  rm -f "$STAMPS/$name"
  "$RIG_HERE/build/$name.sh" 2>&1 | sed -u "s/^/  [$name] /"
  [ "${PIPESTATUS[0]}" = 0 ] || rig_die "stage $name failed"
  echo "$want" > "$STAMPS/$name"
  rig_log "stage $name: done in $(rig_since "$t")s"
}

t0=$EPOCHREALTIME
stage base "rootfs/.xenblk-base" "str:mirror=$MIRROR $SECURITY_MIRROR"
stage runtime "rootfs/opt/xenblk-vhost/venv/bin/python" \
  "str:base=$(stamp_of base)" "str:deps=$(rig_python_deps | tr '\n' ' ')"
stage domu "boot/domu-initrd.cpio boot/domu-vmlinux boot/domu-fio.cpio" \
  "str:base=$(stamp_of base)" "$RIG_HERE/build/extract-vmlinux.py" "$RIG_HERE"/domu/*
stage image "dom0.img boot/xen boot/vmlinuz boot/initrd.img" \
  "str:runtime=$(stamp_of runtime)" "$RIG_HERE"/dom0-image/*
rig_log "image ready in $(rig_since "$t0")s: $RIG/dom0.img"
exit $?
}
