#!/bin/bash
# Stage "image": dom0's init and configuration, the boot files QEMU loads, and
# dom0.img (ext4 made with mkfs.ext4 -d: no loop mount, works in containers).
set -euo pipefail
. "$(dirname "$0")/../lib.sh"
SRC=$RIG_HERE/dom0-image
KVER=$(ls "$ROOTFS/lib/modules" | sort -V | tail -1)

install -m 0755 "$SRC/rig-init" "$ROOTFS/sbin/xenblk-rig-init"
echo xenblk-rig > "$ROOTFS/etc/hostname"
printf '/dev/vda / ext4 rw,errors=remount-ro 0 1\n' > "$ROOTFS/etc/fstab"
chroot "$ROOTFS" passwd -d root >/dev/null   # console-only machine
# Never auto-load the kernel block backend: udev is not running here, but a
# later image might run it, and a userspace backend on backend/vbd must not
# race blkback. Scenarios that want blkback modprobe it explicitly.
echo "blacklist xen-blkback" > "$ROOTFS/etc/modprobe.d/xenblk-rig-no-blkback.conf"
# dom0_mem is fixed on Xen's command line: nothing to balloon.
sed -i 's/^#\?autoballoon=.*/autoballoon="off"/' "$ROOTFS/etc/xen/xl.conf"
grep -q '^autoballoon=' "$ROOTFS/etc/xen/xl.conf" || echo 'autoballoon="off"' >> "$ROOTFS/etc/xen/xl.conf"
mkdir -p "$ROOTFS/var/lib/xenblk-rig"   # disk images of scenarios: on ext4, not tmpfs

# Xen as QEMU's multiboot kernel must be the gunzipped 32-bit ELF: no grub.
zcat "$ROOTFS/boot/xen-4.17-amd64.gz" > "$RIG/boot/xen"
cp "$ROOTFS/boot/vmlinuz-$KVER" "$RIG/boot/vmlinuz"
cp "$ROOTFS/boot/initrd.img-$KVER" "$RIG/boot/initrd.img"

rm -f "$RIG/dom0.img.tmp"
truncate -s "${XENBLK_RIG_IMGSIZE:-3G}" "$RIG/dom0.img.tmp"
mkfs.ext4 -q -F -L xenblk-rig -d "$ROOTFS" "$RIG/dom0.img.tmp"
mv "$RIG/dom0.img.tmp" "$RIG/dom0.img"
echo "dom0.img $(du -h --apparent-size "$RIG/dom0.img" | cut -f1) sparse, $(du -h "$RIG/dom0.img" | cut -f1) used; kernel $KVER"
