# Helpers for shell scenarios, sourced by main.sh before each scenarios/NAME.sh.
# Environment: OUT (this scenario's output dir on the share), RIG_SHARE,
# RIG_DOM0, RIG_VENV, RIG_GUEST (guest kernel + initramfs, in tmpfs).
# A scenario fails by exiting non-zero; fail() also leaves
# the reason in $OUT/failure, which the host prints in its summary.
set -euo pipefail

fail() {
  echo "FAIL: $*" | tee -a "$OUT/failure" >&2
  exit 1
}
note() { echo "-- $*"; }
uptime_s() { cut -d' ' -f1 /proc/uptime; }

assert_eq() {  # what actual expected
  [ "$2" = "$3" ] || fail "$1: got '$2', expected '$3'"
  note "ok: $1 = '$2'"
}

# A sparse file-backed disk on dom0's ext4 (not tmpfs: loop discard then
# punches real holes, and O_DIRECT works).
mkdisk() {  # path size-MiB
  rm -f "$1"
  truncate -s "${2}M" "$1"
}

# Start a PV guest running the workload (domu/init) on the given disk, wait for
# it to power off, snapshot the frontend/backend xenstore directories while it
# is connected, and check its console output with guest-results.py.
#   run_guest NAME --disk 'xl disk spec' [--vcpus N] [--memory MiB]
#       [--cmdline 'xen_blkfront.max_ring_page_order=4 ...'] [--steps info,raw,discard,fs]
#       [--cfg 'extra xl.cfg line'] [--timeout S] [--expect KEY=VALUE]...
# --expect compares against the parsed results: KEY=V, KEY!=V, KEY>=N, KEY>N
# (keys as in $OUT/results.json: guest RESULT keys, neg.*, xs.fe.*, xs.be.*).
run_guest() {
  local name=$1; shift
  local disk="" vcpus=1 mem=256 cmdline="" steps=info,raw,discard,fs cfg="" tmo=300
  local expects=()
  while [ $# -gt 0 ]; do
    case "$1" in
      --disk) disk=$2;; --vcpus) vcpus=$2;; --memory) mem=$2;; --cmdline) cmdline=$2;;
      --steps) steps=$2;; --cfg) cfg+="$2"$'\n';; --timeout) tmo=$2;;
      --expect) expects+=(--expect "$2");;
      *) fail "run_guest: unknown option $1";;
    esac
    shift 2
  done
  [ -n "$disk" ] || fail "run_guest $name: --disk is required"
  cat > "$OUT/$name.cfg" <<EOF
name="$name"
type="pv"
kernel="$RIG_GUEST/vmlinux"
ramdisk="$RIG_GUEST/initrd.cpio"
extra="console=hvc0 quiet xenblk.steps=$steps $cmdline"
memory=$mem
vcpus=$vcpus
disk=[ '$disk' ]
on_poweroff="destroy"
on_reboot="destroy"
on_crash="destroy"
$cfg
EOF
  note "guest $name: xl create ($vcpus vCPU, disk '$disk', cmdline '$cmdline')"
  local t0; t0=$(uptime_s)
  xl -v create "$OUT/$name.cfg" > "$OUT/$name.xl-create.log" 2>&1 \
    || { tail -20 "$OUT/$name.xl-create.log"; fail "guest $name: xl create failed (rc $?), see $name.xl-create.log"; }
  local domid; domid=$(xl domid "$name") || fail "guest $name: no domid right after xl create"
  note "guest $name: domid $domid, created in $(awk "BEGIN{print $(uptime_s)-$t0}")s"
  local fe=/local/domain/$domid/device/vbd/51712 snap="$OUT/$name.xenstore.txt" n=0 state be=""
  while xl domid "$name" >/dev/null 2>&1; do
    if [ ! -s "$snap" ]; then
      state=$(xenstore-read "$fe/state" 2>/dev/null || true)
      if [ "$state" = 4 ]; then
        # Connected: what both ends wrote is final now.
        be=$(xenstore-read "$fe/backend")
        { xenstore-ls -f "$fe"; xenstore-ls -f "$be"; } > "$snap.tmp" 2>&1 && mv "$snap.tmp" "$snap"
        note "guest $name: vbd connected after $(awk "BEGIN{print $(uptime_s)-$t0}")s"
      fi
    fi
    sleep 0.5; n=$((n + 1))
    if [ $n -ge $((tmo * 2)) ]; then
      xl list; xenstore-ls -f "/local/domain/$domid/device" 2>&1 | head -40
      xl destroy "$name"
      cp "/var/log/xen/console/guest-$name.log" "$OUT/" 2>/dev/null || true
      fail "guest $name: still running after ${tmo}s (destroyed); console in guest-$name.log"
    fi
  done
  local dt; dt=$(awk "BEGIN{print $(uptime_s)-$t0}")
  note "guest $name: gone after ${dt}s"
  # xenconsoled drains the console ring when the domain dies; give it a moment.
  local log=/var/log/xen/console/guest-$name.log i=0
  while ! grep -q XENBLK-GUEST-DONE "$log" 2>/dev/null && [ $i -lt 10 ]; do sleep 0.3; i=$((i + 1)); done
  cp "$log" "$OUT/guest-$name.log" 2>/dev/null || fail "guest $name: no console log $log"
  python3 "$RIG_DOM0/guest-results.py" --name "$name" --console "$OUT/guest-$name.log" \
    --xenstore "$snap" --steps "$steps" --json "$OUT/results.json" --lifetime "$dt" "${expects[@]}" \
    || fail "guest $name: workload or negotiation check failed (above; console in guest-$name.log)"
  # The toolstack and the backend must let go of the device once the guest is
  # gone (libxl removes the backend directory after the backend reaches Closed).
  i=0
  while xenstore-ls "$be" >/dev/null 2>&1 && [ $i -lt 20 ]; do sleep 0.5; i=$((i + 1)); done
  xenstore-ls "$be" >/dev/null 2>&1 && fail "guest $name: $be still in xenstore 10 s after the guest died"
  return 0
}

# A loop device over a fresh sparse file; prints the device (/dev/loopN).
# Kernel blkback needs a block device; the userspace backend's `phy` route
# takes one too. main.sh detaches every loop device between scenarios.
mkloop() {  # path size-MiB
  mkdisk "$1" "$2"
  losetup -f --show "$1"
}
