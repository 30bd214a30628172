#!/bin/bash
# Stage "runtime": install the project's runtime in dom0 the way an operator
# would on a Debian 12 host: libblkio1 from trixie pinned to libblkio only (the
# recipe of scripts/install-deps.sh), qemu-storage-daemon (qemu-system-common)
# for vhost-user scenarios, and a venv at /opt/xenblk-vhost/venv with the
# project's Python dependencies from PyPI. The project itself is not installed
# here: each run puts the current checkout on the venv's path (see dom0/main.sh).
set -euo pipefail
. "$(dirname "$0")/../lib.sh"
VENV=/opt/xenblk-vhost/venv

cleanup() { for m in dev/pts dev sys proc; do umount "$ROOTFS/$m" 2>/dev/null || true; done; }
trap cleanup EXIT
mount -t proc proc "$ROOTFS/proc"; mount -t sysfs sysfs "$ROOTFS/sys"
mount --bind /dev "$ROOTFS/dev"; mount --bind /dev/pts "$ROOTFS/dev/pts"
cp /etc/resolv.conf "$ROOTFS/etc/resolv.conf"
# A clean environment: the host's PIP_*/proxy settings mean nothing inside.
in_root() { chroot "$ROOTFS" env -i HOME=/root LANG=C.UTF-8 DEBIAN_FRONTEND=noninteractive PATH=/usr/sbin:/usr/bin:/sbin:/bin "$@"; }

# libblkio exists only from trixie on; its binary needs nothing newer than
# bookworm's libc. trixie at priority 100 is never chosen unless pinned up.
cat > "$ROOTFS/etc/apt/sources.list.d/xenblk-trixie.sources" <<EOS
Types: deb
URIs: $MIRROR
Suites: trixie
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOS
cat > "$ROOTFS/etc/apt/preferences.d/xenblk-trixie-libblkio.pref" <<EOS
Package: *
Pin: release n=trixie
Pin-Priority: 100

Package: libblkio1 libblkio-dev
Pin: release n=trixie
Pin-Priority: 500
EOS
in_root apt-get update -q
in_root apt-get install -y -q --no-install-recommends libblkio1 qemu-system-common
# Not the project's: linux-perf for `run.sh --perf bench` (where dom0's CPU goes, kernel and Xen's share
# included: a PV dom0 has no PMU, perf samples on its cpu-clock).
in_root apt-get install -y -q --no-install-recommends linux-perf
in_root apt-get clean

# Wheels are fetched by the host's pip, which carries this machine's index and
# certificate configuration; dom0's pip then installs offline from them.
# dom0 runs bookworm's CPython 3.11 on glibc 2.36.
mapfile -t deps < <(rig_python_deps)
WHEELS=$ROOTFS/tmp/xenblk-wheels
rm -rf "$WHEELS"; mkdir -p "$WHEELS"
HOST_PIP=(python3 -m pip)
"${HOST_PIP[@]}" --version >/dev/null 2>&1 || HOST_PIP=("$RIG_REPO/.venv/bin/pip")
"${HOST_PIP[@]}" download -q --only-binary=:all: --python-version 3.11 --implementation cp --abi cp311 \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d "$WHEELS" "${deps[@]}"
echo "wheels: $(ls "$WHEELS" | tr '\n' ' ')"
# A fresh venv every time this stage runs, so a removed dependency really goes.
rm -rf "$ROOTFS$VENV"
in_root python3 -m venv "$VENV"
in_root "$VENV/bin/pip" install -q --no-index --find-links /tmp/xenblk-wheels "${deps[@]}"
rm -rf "$WHEELS"
in_root "$VENV/bin/pip" freeze > "$ROOTFS/opt/xenblk-vhost/requirements.lock"
echo "venv packages: $(tr '\n' ' ' < "$ROOTFS/opt/xenblk-vhost/requirements.lock")"

# Prove the runtime is usable before anyone boots it.
in_root "$VENV/bin/python" -c 'import trio, yaml, cffi, ctypes; ctypes.CDLL("libblkio.so.1")'
in_root sh -c 'command -v qemu-storage-daemon'
in_root dpkg-query -W libblkio1 qemu-system-common
