# Shared settings and helpers for the xen-rig host scripts (sourced, never run).
# The rig's cache lives outside the repository: images and rootfs are build
# outputs, never committed.
RIG_HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
RIG_REPO=$(cd "$RIG_HERE/../.." && pwd)
RIG=${XENBLK_RIG_DIR:-/var/cache/xenblk-vhost/rig}
ROOTFS=$RIG/rootfs
STAMPS=$RIG/stamps
MIRROR=${XENBLK_RIG_MIRROR:-http://deb.debian.org/debian}
SECURITY_MIRROR=${XENBLK_RIG_SECURITY_MIRROR:-http://deb.debian.org/debian-security}

rig_log() { printf '== xen-rig: %s\n' "$*" >&2; }
rig_die() { printf 'xen-rig: ERROR: %s\n' "$*" >&2; exit 1; }

# Seconds (with decimals) since $1, an $EPOCHREALTIME value: every step prints its timing.
rig_since() { awk -v a="$1" -v b="$EPOCHREALTIME" 'BEGIN{printf "%.1f", b-a}'; }

# One rig at a time on this machine: QEMU TCG eats both cores, and two builds
# would fight over the same rootfs. The lock is per cache directory.
rig_lock() {
  mkdir -p "$RIG"
  exec 9>"$RIG/.lock"
  if ! flock -n 9; then
    rig_log "another rig build/run holds $RIG/.lock; waiting (up to ${XENBLK_RIG_LOCK_WAIT:-1800}s)"
    flock -w "${XENBLK_RIG_LOCK_WAIT:-1800}" 9 || rig_die "timed out waiting for $RIG/.lock"
  fi
}

# Python dependencies of the project, read from the checkout's pyproject.toml so
# the dom0 venv follows the project without anyone editing the rig.
rig_python_deps() {
  python3 - "$RIG_REPO/pyproject.toml" <<'EOF'
import sys, tomllib
with open(sys.argv[1], "rb") as f:
    print("\n".join(tomllib.load(f)["project"]["dependencies"]))
EOF
}
