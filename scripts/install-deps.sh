#!/usr/bin/env bash
# Install everything xenblk-vhost and its tests need on Debian 12 (bookworm) or 13 (trixie).
# Idempotent; run as root. Then creates the project venv (.venv) and installs the package
# in editable mode with its test and bench extras, and builds the benchmark's compiled
# load generator into it.
#
#   scripts/install-deps.sh            # system packages + .venv
#   scripts/install-deps.sh --no-venv  # system packages only
#   XENBLK_NO_RIG=1 ...                # skip the packages only the real-Xen rig needs
set -euo pipefail
HERE=$(cd "$(dirname "$0")/.." && pwd)
VENV=${XENBLK_VENV:-$HERE/.venv}
want_venv=1
[ "${1:-}" = "--no-venv" ] && want_venv=0

log() { printf '== install-deps: %s\n' "$*"; }
[ "$(id -u)" = 0 ] || { echo "install-deps.sh: run as root (it installs Debian packages)" >&2; exit 1; }
. /etc/os-release
case "${VERSION_CODENAME:-}" in
  bookworm|trixie) ;;
  *) echo "install-deps.sh: unsupported distribution '${PRETTY_NAME:-unknown}' (need Debian 12 or 13)" >&2; exit 1;;
esac
export DEBIAN_FRONTEND=noninteractive

if [ "$VERSION_CODENAME" = bookworm ]; then
  # libblkio exists only from trixie on. Its binary needs nothing newer than bookworm's libc,
  # so we add trixie at priority 100 (never chosen by default) and pin only libblkio to 500.
  src=/etc/apt/sources.list.d/xenblk-trixie.sources
  pref=/etc/apt/preferences.d/xenblk-trixie-libblkio.pref
  mirror=$(grep -hoE 'https?://[^ ]+/debian/?( |$)' /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources 2>/dev/null | grep -v security | head -1 | tr -d ' ' || true)
  mirror=${mirror:-http://deb.debian.org/debian}
  want_src="Types: deb
URIs: ${mirror%/}
Suites: trixie
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg"
  want_pref="Package: *
Pin: release n=trixie
Pin-Priority: 100

Package: libblkio1 libblkio-dev
Pin: release n=trixie
Pin-Priority: 500"
  if [ "$(cat "$src" 2>/dev/null)" != "$want_src" ] || [ "$(cat "$pref" 2>/dev/null)" != "$want_pref" ]; then
    log "adding trixie source pinned to libblkio only"
    printf '%s\n' "$want_src" > "$src"
    printf '%s\n' "$want_pref" > "$pref"
    rm -f /var/lib/apt/lists/.xenblk-updated
  fi
fi

# Core: what the package and the default test suite use.
PKGS=(libblkio1 libblkio-dev gcc libc6-dev gcc-multilib libatomic1 libxen-dev linux-libc-dev
      xenstore-utils qemu-system-common qemu-utils python3 python3-venv python3-dev
      systemd  # systemd-analyze: the deploy tests verify the unit files; systemd itself: test_systemd_unit
      libsystemd-dev pkg-config  # systemd-python (the journal extra) builds against libsystemd
      groff-base)  # tests/test_manpages.py renders the man pages
# The real-Xen rig (scripts/xen-rig): QEMU to boot Xen, debootstrap to build dom0's image.
if [ -z "${XENBLK_NO_RIG:-}" ]; then
  PKGS+=(qemu-system-x86 debootstrap e2fsprogs cpio busybox-static xz-utils zstd bc
         debian-archive-keyring
         podman runc)  # scripts/build-containers.sh (debootstrap too): not the rig's, skipped with it
fi

missing=()
for p in "${PKGS[@]}"; do
  [[ "$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null)" == *'install ok installed'* ]] || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  log "installing: ${missing[*]}"
  apt-get update -q
  apt-get install -y -q --no-install-recommends "${missing[@]}"
else
  log "all ${#PKGS[@]} Debian packages present"
fi

# podman (scripts/build-containers.sh): runc, and no default ulimits. Its default raises
# RLIMIT_NOFILE to 1048576 in every container, which a host whose own hard limit is lower
# (a container itself, like the project's CI machines) refuses: runc fails with "error setting
# rlimits". A drop-in, so an existing /etc/containers/containers.conf is left as it is.
if [ -z "${XENBLK_NO_RIG:-}" ]; then
  dropin=/etc/containers/containers.conf.d/50-xenblk-vhost.conf
  want_dropin='# Written by xenblk-vhost'"'"'s scripts/install-deps.sh (scripts/build-containers.sh needs it).
[containers]
default_ulimits = []

[engine]
runtime = "runc"'
  if [ "$(cat "$dropin" 2>/dev/null)" != "$want_dropin" ]; then
    log "podman: $dropin (runc, default_ulimits = [])"
    mkdir -p "$(dirname "$dropin")"
    printf '%s\n' "$want_dropin" > "$dropin"
  fi
fi

# qemu-storage-daemon lives in qemu-system-common on both releases.
command -v qemu-storage-daemon >/dev/null || { echo "install-deps.sh: qemu-storage-daemon missing after install" >&2; exit 1; }
# grep reads all of ldconfig's output (not -q: under pipefail its early exit could end ldconfig with
# SIGPIPE and fail the pipeline though the library is there: seen, "libblkio.so.1 missing" with it installed).
ldconfig -p | grep 'libblkio.so.1' >/dev/null || { echo "install-deps.sh: libblkio.so.1 missing after install" >&2; exit 1; }

if [ $want_venv = 1 ]; then
  # Python: a venv beside the checkout, from whatever python3 is first on PATH (>= 3.11).
  PY=${PYTHON:-python3}
  "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))' || { echo "install-deps.sh: need Python >= 3.11" >&2; exit 1; }
  if [ ! -x "$VENV/bin/python" ]; then
    log "creating venv $VENV"
    "$PY" -m venv "$VENV"
  fi
  stamp=$VENV/.xenblk-installed
  if [ ! -f "$stamp" ] || [ "$HERE/pyproject.toml" -nt "$stamp" ]; then
    log "installing xenblk-vhost (editable), test and bench deps into $VENV"
    "$VENV/bin/pip" install -q --upgrade pip
    "$VENV/bin/pip" install -q -e "$HERE[test,bench]"
    touch "$stamp"
  else
    log "venv up to date"
  fi
  # xenblk_vhost's compiled kernels (xenblk_vhost/native: cffi API mode, gcc); the package would
  # also build them on first use, this makes that a step of installing.
  "$VENV/bin/python" -m xenblk_vhost.native | sed 's/^/== install-deps: /'
  [ "${PIPESTATUS[0]}" = 0 ] || { echo "install-deps.sh: building xenblk_vhost's compiled kernels failed" >&2; exit 1; }
  # scripts/bench.py's compiled loops (cffi API mode, against libxen-dev's
  # headers and libblkio-dev): built into the venv, again only when their
  # sources change.
  "$VENV/bin/python" "$HERE/scripts/benchkit/build_loadgen.py" | sed 's/^/== install-deps: /'
  [ "${PIPESTATUS[0]}" = 0 ] || { echo "install-deps.sh: building the benchmark's load generator failed" >&2; exit 1; }
  log "done: run tests with  $VENV/bin/pytest"
fi
