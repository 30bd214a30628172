#!/bin/bash
# Stage "domu": the PV guest's kernel and busybox initramfs with the workload
# (domu/init), xen-blkfront and ext4 modules of the dom0 kernel, the odio
# O_DIRECT helper (domu/odio.c, built static here), and mke2fs, e2fsck and
# blkdiscard copied from the dom0 rootfs with the shared libraries they need;
# fio (Debian 12's, for the bench scenario) in an initramfs of its own.
# Outputs boot/domu-vmlinux (the kernel as a plain ELF: see extract-vmlinux.py),
# boot/domu-initrd.cpio and boot/domu-fio.cpio (uncompressed: the guest
# kernel's gunzip costs seconds under TCG); run.sh hands them to dom0 on the
# 9p share, so a workload change never rebuilds dom0.img.
set -euo pipefail
. "$(dirname "$0")/../lib.sh"
SRC=$RIG_HERE/domu
KVER=$(ls "$ROOTFS/lib/modules" | sort -V | tail -1)
MODDIR=$ROOTFS/lib/modules/$KVER
D=$RIG/domu-initramfs.tmp
[ -x /bin/busybox ] && ! ldd /bin/busybox >/dev/null 2>&1 || rig_die "need a static /bin/busybox (busybox-static)"
command -v gcc >/dev/null || rig_die "need gcc (and libc6-dev for -static)"

rm -rf "$D"; mkdir -p "$D"/{bin,sbin,etc,proc,sys,dev,tmp,mnt,lib/modules}
cp /bin/busybox "$D/bin/busybox"
# The real tools below replace busybox's applets of the same name (busybox
# mke2fs cannot make ext4 and would come first in PATH).
for a in $("$D/bin/busybox" --list); do
  case "$a" in mke2fs|e2fsck|blkdiscard|mkfs.ext2|fsck) continue;; esac
  [ -e "$D/bin/$a" ] || ln -s busybox "$D/bin/$a"
done

# Modules with their dependencies, in load order (modules.dep lists a module's
# dependencies after it, deepest last). crc32c: ext4's metadata checksums ask
# the crypto API for it by name, which needs modprobe; load it up front.
declare -A seen=()
order=()
add_mod() {  # module name, as in modules.dep (dashes and underscores both appear)
  local name=$1 pat line path deps d
  pat=$(echo "$name" | sed 's/[-_]/[-_]/g')
  line=$(grep -E "(^|/)${pat}\.ko(\.xz|\.zst|\.gz)?:" "$MODDIR/modules.dep" || true)
  if [ -z "$line" ]; then
    grep -qE "/${pat}\.ko" "$MODDIR/modules.builtin" && return 0
    rig_die "module $name neither in modules.dep nor built in ($KVER)"
  fi
  path=${line%%:*}; deps=${line#*:}
  [ -n "${seen[$path]:-}" ] && return 0
  seen[$path]=1
  for d in $deps; do add_mod "$(basename "${d%%.ko*}")"; done
  order+=("$path")
}
for m in crc32c_generic ext4 xen-blkfront; do add_mod $m; done
: > "$D/lib/modules/load-order"
for p in "${order[@]}"; do
  base=$(basename "${p%%.ko*}").ko
  case "$p" in
    *.xz) xz -dc "$MODDIR/$p" > "$D/lib/modules/$base";;
    *.zst) zstd -qdc "$MODDIR/$p" > "$D/lib/modules/$base";;
    *.gz) zcat "$MODDIR/$p" > "$D/lib/modules/$base";;
    *) cp "$MODDIR/$p" "$D/lib/modules/$base";;
  esac
  echo "/lib/modules/$base" >> "$D/lib/modules/load-order"
done
echo "modules: $(tr '\n' ' ' < "$D/lib/modules/load-order")"

# Real e2fsprogs/util-linux tools (busybox's mke2fs cannot make ext4), with
# their libraries as the dom0 rootfs's loader resolves them.
for b in /sbin/mke2fs /sbin/e2fsck /sbin/blkdiscard; do
  real=$(chroot "$ROOTFS" sh -c "readlink -f $b")
  install -D -m 0755 "$ROOTFS$real" "$D/sbin/$(basename $b)"
  chroot "$ROOTFS" ldd "$real" | awk '/=> \//{print $3} /^\t\/lib/{print $1}' | while read -r lib; do
    [ -e "$D$lib" ] || install -D -m 0755 "$ROOTFS$(chroot "$ROOTFS" readlink -f "$lib")" "$D$lib"
  done
done
# lib64 loader path: the binaries ask for /lib64/ld-linux-x86-64.so.2.
[ -e "$D/lib64/ld-linux-x86-64.so.2" ] || rig_die "loader missing from initramfs"
cp "$ROOTFS/etc/mke2fs.conf" "$D/etc/mke2fs.conf"

gcc -static -O2 -Wall -Wextra -Werror -o "$D/bin/odio" "$SRC/odio.c"
install -m 0755 "$SRC/init" "$D/init"

# fio for the bench scenario, in a second archive (boot/domu-fio.cpio) that
# only the bench guest loads after the main one (the kernel unpacks
# concatenated cpio archives in order): the other guests keep the small
# initramfs. Debian 12's fio links librados, librbd, glusterfs and rdma, so
# its closure is tens of MB. It is downloaded, not installed: apt in the
# rootfs with its lists and cache in a scratch directory resolves what the
# rootfs lacks, dpkg-deb unpacks it there, ldd (the rootfs's loader) names the
# libraries, and they go flat into /lib/x86_64-linux-gnu, where the loader
# looks by default (RUNPATHs such as ceph's private directory fall back there).
F=$RIG/domu-fio.tmp
APT=/tmp/xenblk-fio-apt   # inside the rootfs
rm -rf "$F" "$ROOTFS$APT"; mkdir -p "$F/usr/bin" "$F/lib/x86_64-linux-gnu"
trap 'rm -rf "${ROOTFS:?}$APT"' EXIT   # the rootfs keeps nothing of this
mkdir -p "$ROOTFS$APT/lists/partial" "$ROOTFS$APT/cache/archives/partial" "$ROOTFS$APT/root"
apt_scratch() {
  chroot "$ROOTFS" env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8 DEBIAN_FRONTEND=noninteractive \
    apt-get -q -o Dir::State::Lists=$APT/lists -o Dir::Cache=$APT/cache -o Debug::NoLocking=1 "$@"
}
apt_scratch update > /dev/null
apt_scratch install -y --download-only --no-install-recommends fio > /dev/null
for deb in "$ROOTFS$APT"/cache/archives/*.deb; do dpkg-deb -x "$deb" "$ROOTFS$APT/root"; done
[ -x "$ROOTFS$APT/root/usr/bin/fio" ] || rig_die "fio: no /usr/bin/fio in the downloaded packages"
install -m 0755 "$ROOTFS$APT/root/usr/bin/fio" "$F/usr/bin/fio"
# every directory of the unpacked packages that holds libraries (ceph keeps its
# own under x86_64-linux-gnu/ceph, named by an absolute RUNPATH)
FIO_LIBS=$(find "$ROOTFS$APT/root" -name '*.so*' -printf '%h\n' | sort -u | sed "s|^$ROOTFS||" | paste -sd:)
chroot "$ROOTFS" env LD_LIBRARY_PATH="$FIO_LIBS" ldd "$APT/root/usr/bin/fio" > "$RIG/domu-fio-ldd.txt"
grep -q 'not found' "$RIG/domu-fio-ldd.txt" && rig_die "fio: libraries not found: $(grep 'not found' "$RIG/domu-fio-ldd.txt" | tr '\n' ' ')"
awk '/=> \//{print $3}' "$RIG/domu-fio-ldd.txt" | while read -r lib; do
  real=$(chroot "$ROOTFS" readlink -f "$lib")
  install -m 0755 "$ROOTFS$real" "$F/lib/x86_64-linux-gnu/$(basename "$lib")"
done
(cd "$F" && find . | LC_ALL=C sort | cpio -o -H newc --quiet) > "$RIG/boot/domu-fio.cpio.tmp"
mv "$RIG/boot/domu-fio.cpio.tmp" "$RIG/boot/domu-fio.cpio"
rm -rf "$RIG/domu-fio"; mv "$F" "$RIG/domu-fio"   # kept for inspection
echo "fio $(du -h "$RIG/boot/domu-fio.cpio" | cut -f1) ($(ls "$RIG/domu-fio/lib/x86_64-linux-gnu" | wc -l) libraries)"

(cd "$D" && find . | LC_ALL=C sort | cpio -o -H newc --quiet) > "$RIG/boot/domu-initrd.cpio.tmp"
mv "$RIG/boot/domu-initrd.cpio.tmp" "$RIG/boot/domu-initrd.cpio"
python3 "$RIG_HERE/build/extract-vmlinux.py" "$ROOTFS/boot/vmlinuz-$KVER" "$RIG/boot/domu-vmlinux"
rm -f "$RIG/boot/domu-initrd.gz" "$RIG/boot/domu-vmlinuz"   # names of older rig versions
rm -rf "$RIG/domu-initramfs"; mv "$D" "$RIG/domu-initramfs"   # kept for inspection
echo "initramfs $(du -h "$RIG/boot/domu-initrd.cpio" | cut -f1), kernel $KVER"
