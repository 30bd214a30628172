#!/usr/bin/env bash
# Build xenblk-vhost_<version>-1_<arch>.deb with dpkg-deb (no debhelper), from this checkout.
#
#   scripts/build-deb.sh                 # -> dist/xenblk-vhost_0.1.0-1_amd64.deb
#   scripts/build-deb.sh --output DIR    # somewhere else; prints the .deb's path last
#
# What it installs (dpkg -c shows it all):
#   /usr/lib/xenblk-vhost/               a venv of Debian's /usr/bin/python3 with the package (not
#                                        editable, no test extras) and its journal extra, from PyPI
#                                        wheels, byte-compiled for its final path, without pip
#                                        and with its compiled kernels built (native/_build)
#   /usr/bin/xenblk-vhost                -> the venv's command
#   /etc/xen/scripts/block-xenblk-vhost  the hotplug shim (`install-hotplug`'s, for the venv's Python)
#   /lib/systemd/system/                 xenblk-vhost@.service, qemu-storage-daemon@.service
#   /etc/modprobe.d/xenblk-vhost.conf    xen-blkback's blacklist, COMMENTED OUT: the phy route needs it,
#                                        but it takes blkback from every other guest of the host
#   /usr/share/man/                      xenblk-vhost(8), xenblk-vhost.yaml(5)
#   /usr/share/doc/xenblk-vhost/         copyright, README, examples/ (config/, deploy/storage-node/)
#   /etc/xenblk-vhost/, .../qsd/         empty: one YAML file per domain goes there
# Conffiles: the hotplug shim and the modprobe file. The maintainer scripts reload systemd's
# units and start, enable or restart nothing (see debian/ below in this file).
#
# The venv holds Python 3.N's site-packages, so the package depends on Debian's python3 3.N:
# build it on the release it is for (bookworm: 3.11). Needs python3-venv, gcc, libblkio-dev (the
# compiled kernels are built here, not on the target) and libsystemd-dev (systemd-python
# compiles), and PyPI (or a mirror pip is configured for):
# scripts/install-deps.sh installs the rest. tests/test_deb.py builds it, installs it into a
# scratch root with dpkg and runs what it installed.
set -euo pipefail
HERE=$(cd "$(dirname "$0")/.." && pwd)
OUT=$HERE/dist
while [ $# -gt 0 ]; do
  case "$1" in
    --output) OUT=$2; shift 2;;
    -h|--help) sed -n '2,/^set -e/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0;;
    *) echo "build-deb.sh: unknown argument $1 (see --help)" >&2; exit 2;;
  esac
done
log() { printf '== build-deb: %s\n' "$*"; }

PY=/usr/bin/python3  # Debian's: the one the package depends on, not a pyenv or venv one
PREFIX=/usr/lib/xenblk-vhost
for tool in dpkg-deb gzip "$PY"; do
  command -v "$tool" >/dev/null || { echo "build-deb.sh: missing $tool" >&2; exit 1; }
done
"$PY" -c 'import ensurepip, venv' 2>/dev/null || { echo "build-deb.sh: $PY has no venv module (Debian: python3-venv)" >&2; exit 1; }

VERSION=$("$PY" -c 'import sys, tomllib; print(tomllib.load(open(sys.argv[1], "rb"))["project"]["version"])' "$HERE/pyproject.toml")
DEB_VERSION=$VERSION-1
ARCH=$(dpkg --print-architecture)
PYVER=$("$PY" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
PYNEXT=$("$PY" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1] + 1}")')
MAINTAINER=${DEB_MAINTAINER:-xenblk-vhost developers <xenblk-vhost@localhost>}

WORK=$(mktemp -d /tmp/xenblk-deb.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
ROOT=$WORK/root
VENV=$ROOT$PREFIX

# The sources only (no .venv, build/ or egg-info of the checkout), so pip builds a clean wheel.
log "copying the sources"
mkdir -p "$WORK/src"
tar -C "$HERE" --exclude=__pycache__ --exclude=xenblk_vhost/native/_build -cf - pyproject.toml README.md LICENSE xenblk_vhost | tar -C "$WORK/src" -xf -

log "venv $PREFIX with xenblk-vhost $VERSION[journal] (Python $PYVER)"
"$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --disable-pip-version-check --no-compile "$WORK/src[journal]"
# The compiled kernels (xenblk_vhost/native), built here into the venv's native/_build, where
# native.load() looks first: the packaged unit's daemon could build them nowhere (ProtectSystem=strict,
# ProtectHome=yes) and would serve every disk on the Python engine. dpkg owns them; the shipped C
# sources are what their stamp is checked against. -I: the venv's package, not a checkout in $PWD.
# cffi compiles through setuptools (removed below; Python >= 3.12 venvs come without it).
"$VENV/bin/python" -c 'import setuptools' 2>/dev/null \
  || "$VENV/bin/python" -m pip install -q --disable-pip-version-check setuptools
NATIVE_DIR=$("$VENV/bin/python" -I -c 'import os, xenblk_vhost.native as n; print(os.path.dirname(n.__file__))')
"$VENV/bin/python" -I -m xenblk_vhost.native --dest "$NATIVE_DIR/_build" >/dev/null \
  || { echo "build-deb.sh: building the compiled kernels failed (gcc, libblkio-dev)" >&2; exit 1; }
rm -f "$NATIVE_DIR/_build/.lock"
"$VENV/bin/python" -I -c 'import sys
from pathlib import Path
from xenblk_vhost.native import build
found = [build.find_built(m) for m in (build.NATIVE, build.BLKIO)]
venv = Path(sys.prefix).resolve()
sys.exit(None if all(p and p.is_relative_to(venv) for p in found) else f"not in the venv: {found}")' \
  || { echo "build-deb.sh: the venv does not find its compiled kernels" >&2; exit 1; }
"$VENV/bin/python" -m pip uninstall -q -y pip setuptools 2>/dev/null || "$VENV/bin/python" -m pip uninstall -q -y pip
rm -f "$VENV"/bin/pip* "$VENV"/bin/activate* "$VENV"/bin/Activate.ps1
"$VENV/bin/python" -I -c 'import xenblk_vhost, trio, yaml, cffi, prometheus_client, systemd.journal' \
  || { echo "build-deb.sh: the venv cannot import what the daemon needs" >&2; exit 1; }
# The venv was made at $VENV: its scripts' #! lines and pyvenv.cfg must name $PREFIX.
grep -rlI --null -F "$VENV" "$VENV" | xargs -0 -r sed -i "s|$VENV|$PREFIX|g"
if grep -rlI -F "$WORK" "$VENV" | grep -v '/direct_url.json$'; then
  echo "build-deb.sh: build paths left in the files above" >&2; exit 1
fi
# Byte-compiled here, for the path the files will have: nothing is written under /usr at run time,
# and dpkg owns (and removes) every .pyc.
"$VENV/bin/python" -m compileall -q -j 0 -s "$ROOT" -p / "$VENV/lib" >/dev/null

log "commands, hotplug shim, units, modprobe file, man pages, docs"
install -d "$ROOT/usr/bin" "$ROOT/etc/xen/scripts" "$ROOT/lib/systemd/system" "$ROOT/etc/modprobe.d" \
  "$ROOT/usr/share/man/man8" "$ROOT/usr/share/man/man5" "$ROOT/usr/share/doc/xenblk-vhost/examples/storage-node" \
  "$ROOT/etc/xenblk-vhost/qsd"
ln -s ../lib/xenblk-vhost/bin/xenblk-vhost "$ROOT/usr/bin/xenblk-vhost"
"$VENV/bin/python" -c 'import sys
from xenblk_vhost.hotplug.install import shim_text
sys.stdout.write(shim_text(python=sys.argv[1]))' "$PREFIX/bin/python3" > "$ROOT/etc/xen/scripts/block-xenblk-vhost"
chmod 755 "$ROOT/etc/xen/scripts/block-xenblk-vhost"
for unit in xenblk-vhost@.service qemu-storage-daemon@.service; do
  sed -e 's|/usr/local/bin/xenblk-vhost|/usr/bin/xenblk-vhost|g' \
      -e 's|^#   install -m 644 deploy/systemd/.*|#   (installed by the xenblk-vhost package)|' \
      "$HERE/deploy/systemd/$unit" > "$ROOT/lib/systemd/system/$unit"
done
{
  echo "# Installed by the xenblk-vhost package with its one line commented out: uncomment it"
  echo "# for the phy route (backendtype=phy), then \`modprobe -r xen-blkback\` or reboot. It takes"
  echo "# the kernel's blkback from EVERY guest of this host; the device-model and tap routes do"
  echo "# not need it (README: \"Which route\")."
  echo "#"
  sed -e 's/^blacklist /# blacklist /' "$HERE/deploy/modprobe.d/xenblk-vhost.conf"
} > "$ROOT/etc/modprobe.d/xenblk-vhost.conf"
grep -q '^# blacklist xen-blkback$' "$ROOT/etc/modprobe.d/xenblk-vhost.conf"
gzip -9n < "$HERE/docs/man/xenblk-vhost.8" > "$ROOT/usr/share/man/man8/xenblk-vhost.8.gz"
gzip -9n < "$HERE/docs/man/xenblk-vhost.yaml.5" > "$ROOT/usr/share/man/man5/xenblk-vhost.yaml.5.gz"
DOC=$ROOT/usr/share/doc/xenblk-vhost
gzip -9n < "$HERE/README.md" > "$DOC/README.md.gz"
install -m 644 "$HERE"/config/*.yaml "$DOC/examples/"
install -m 644 "$HERE"/deploy/storage-node/*.args "$DOC/examples/storage-node/"
{
  echo "Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/"
  echo "Upstream-Name: xenblk-vhost"
  echo
  echo "Files: *"
  echo "Copyright: the xenblk-vhost developers"
  echo "License: MIT"
  sed -e 's/^$/./' -e 's/^/ /' "$HERE/LICENSE"
  echo
  echo "Files: usr/lib/xenblk-vhost/lib/*"
  echo "Copyright: the authors of each Python distribution there (trio, PyYAML, cffi,"
  echo " prometheus-client, systemd-python and their dependencies)"
  echo "License: various"
  echo " Each distribution's license is in its *.dist-info directory."
} > "$DOC/copyright"
{
  echo "xenblk-vhost ($DEB_VERSION) unstable; urgency=medium"
  echo
  echo "  * Built from the xenblk-vhost checkout by scripts/build-deb.sh."
  echo
  echo " -- $MAINTAINER  $(date -R -d "@${SOURCE_DATE_EPOCH:-$(git -C "$HERE" log -1 --format=%ct 2>/dev/null || date +%s)}")"
} | gzip -9n > "$DOC/changelog.Debian.gz"

log "maintainer scripts"
mkdir -p "$ROOT/DEBIAN"
printf '%s\n' /etc/xen/scripts/block-xenblk-vhost /etc/modprobe.d/xenblk-vhost.conf > "$ROOT/DEBIAN/conffiles"
# postinst: systemd learns the new units; nothing is enabled or started. On an upgrade, daemons
# still running the previous version are named, not restarted: a restart pauses their guests'
# disks while the new daemon takes them over, which is the operator's call.
cat > "$ROOT/DEBIAN/postinst" <<'EOF'
#!/bin/sh
set -e
# DPKG_ROOT: installed into another root (dpkg --root): this system's systemd is not ours to touch.
if [ "$1" = configure ] && [ -z "${DPKG_ROOT:-}" ] && [ -d /run/systemd/system ]; then
  systemctl daemon-reload || true
  if [ -n "$2" ]; then
    running=$(systemctl list-units --plain --no-legend --state=active 'xenblk-vhost@*.service' | awk '{print $1}')
    if [ -n "$running" ]; then
      echo "xenblk-vhost: these still run version $2:" $running
      echo "xenblk-vhost: restart each when convenient (its guests' disks pause and are taken over): systemctl restart UNIT"
    fi
  fi
fi
exit 0
EOF
# prerm: removing the package under a running backend would take its code from under it while it
# serves guests; refuse, and say what to stop. An upgrade goes ahead (see postinst).
cat > "$ROOT/DEBIAN/prerm" <<'EOF'
#!/bin/sh
set -e
if [ "$1" = remove ] && [ -z "${DPKG_ROOT:-}" ] && [ -d /run/systemd/system ]; then
  running=$(systemctl list-units --plain --no-legend --state=active,activating,reloading \
            'xenblk-vhost@*.service' 'qemu-storage-daemon@*.service' | awk '{print $1}')
  if [ -n "$running" ]; then
    echo "xenblk-vhost: not removing it while these serve guests:" $running >&2
    echo "xenblk-vhost: detach or shut down their guests, then: systemctl disable --now UNIT..." >&2
    exit 1
  fi
fi
exit 0
EOF
# postrm: forget the units; on purge, remove /etc/xenblk-vhost only if no file of the operator's is left.
cat > "$ROOT/DEBIAN/postrm" <<'EOF'
#!/bin/sh
set -e
if [ "$1" = purge ]; then
  rmdir "${DPKG_ROOT:-}/etc/xenblk-vhost/qsd" "${DPKG_ROOT:-}/etc/xenblk-vhost" 2>/dev/null || true
fi
if { [ "$1" = remove ] || [ "$1" = purge ]; } && [ -z "${DPKG_ROOT:-}" ] && [ -d /run/systemd/system ]; then
  systemctl daemon-reload || true
fi
exit 0
EOF
chmod 755 "$ROOT/DEBIAN/postinst" "$ROOT/DEBIAN/prerm" "$ROOT/DEBIAN/postrm"

INSTALLED_SIZE=$(du -sk --exclude=DEBIAN "$ROOT" | cut -f1)
cat > "$ROOT/DEBIAN/control" <<EOF
Package: xenblk-vhost
Version: $DEB_VERSION
Architecture: $ARCH
Maintainer: $MAINTAINER
Installed-Size: $INSTALLED_SIZE
Depends: python3 (>= $PYVER), python3 (<< $PYNEXT), libblkio1, libsystemd0, libatomic1, libc6
Suggests: qemu-system-common, xen-utils-common
Section: admin
Priority: optional
Description: userspace Xen block backend on libblkio
 xenblk-vhost serves Xen guests' disks (the blkif protocol of xen-blkfront)
 from a process in dom0 or a driver domain, with I/O through any libblkio
 driver: io_uring on files and block devices, NVMe, or vhost-user-blk
 sockets of qemu-storage-daemon or SPDK.
 .
 One daemon per domain under systemd (xenblk-vhost@DOMAIN.service, nothing
 enabled by the package), a control command (xenblk-vhost ctl), the hotplug
 script libxl runs for script=block-xenblk-vhost disks, and the device-model
 route for PV guests.
EOF

mkdir -p "$OUT"
DEB=$OUT/xenblk-vhost_${DEB_VERSION}_$ARCH.deb
log "dpkg-deb"
dpkg-deb --root-owner-group -Zxz --build "$ROOT" "$DEB" >/dev/null
log "built $(du -h "$DEB" | cut -f1) $DEB"
echo "$DEB"
