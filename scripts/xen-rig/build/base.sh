#!/bin/bash
# Stage "base": a Debian 12 (bookworm) rootfs for dom0 with Xen 4.17, the Debian
# kernel and the toolstack, brought up to bookworm-security (Xen 4.17 gets its
# fixes there). The slow stage (debootstrap, ~3-4 min): everything that changes
# more often is layered by later stages.
set -euo pipefail
. "$(dirname "$0")/../lib.sh"

# xen-utils-4.17: xl, xenstored, xenconsoled, xen-init-dom0. python3-venv: the
# project's venv. e2fsprogs/util-linux: their binaries are also copied into the
# domU initramfs (mke2fs, e2fsck, blkdiscard), so guest and dom0 agree on versions.
PKGS=linux-image-amd64,xen-hypervisor-4.17-amd64,xen-utils-4.17,xen-utils-common,xenstore-utils,python3,python3-venv,ca-certificates,kmod,iproute2,procps,util-linux,e2fsprogs,busybox,strace

for c in debootstrap chroot; do command -v $c >/dev/null || rig_die "missing $c (scripts/install-deps.sh installs it)"; done
rm -rf "$ROOTFS" "$ROOTFS.tmp"
debootstrap --variant=minbase --include="$PKGS" bookworm "$ROOTFS.tmp" "$MIRROR"
cat > "$ROOTFS.tmp/etc/apt/sources.list" <<EOS
deb $MIRROR bookworm main
deb $MIRROR bookworm-updates main
deb $SECURITY_MIRROR bookworm-security main
EOS
cp /etc/resolv.conf "$ROOTFS.tmp/etc/resolv.conf"
# A failed security upgrade must fail the stage: a silently stale Xen would make
# results differ between machines.
chroot "$ROOTFS.tmp" sh -c 'apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get -y -q dist-upgrade && apt-get clean'
# Keep only the newest kernel: the boot files and the domU's blkfront module must
# come from one kernel.
KVER=$(ls "$ROOTFS.tmp/lib/modules" | sort -V | tail -1)
for k in $(ls "$ROOTFS.tmp/lib/modules"); do
  [ "$k" = "$KVER" ] || chroot "$ROOTFS.tmp" sh -c "DEBIAN_FRONTEND=noninteractive apt-get -y -q purge linux-image-$k"
done
mv "$ROOTFS.tmp" "$ROOTFS"
touch "$ROOTFS/.xenblk-base"
