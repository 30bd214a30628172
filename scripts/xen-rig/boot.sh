#!/bin/bash
# Boot Xen 4.17 + the Linux PV dom0 in QEMU (TCG) with SHARE_DIR exported as
# the 9p tag "rig"; dom0's init runs SHARE_DIR/dom0/main.sh and powers off.
#   boot.sh [--timeout S] [--interactive] SHARE_DIR SERIAL_LOG
# SERIAL_LOG gets the whole serial console (Xen + dom0), every line stamped
# with seconds since QEMU started. Exit status: QEMU's (124 = timed out).
# Env: XENBLK_RIG_DIR, XENBLK_RIG_MEM (4G), XENBLK_RIG_SMP (2), XENBLK_RIG_CPU,
#      XENBLK_RIG_XEN_APPEND, XENBLK_RIG_DOM0_APPEND (extra command lines).
set -uo pipefail
# The whole script is one brace group: bash parses it completely before running,
# so editing this file while a run is going cannot derail that run.
{
. "$(dirname "$0")/lib.sh"
TIMEOUT=900; INTERACTIVE=0
while [ $# -gt 0 ]; do
  case "$1" in
    --timeout) TIMEOUT=$2; shift 2;;
    --interactive) INTERACTIVE=1; shift;;
    -*) rig_die "boot.sh: unknown option $1";;
    *) break;;
  esac
done
SHARE=$(realpath "${1:?usage: boot.sh [--timeout S] [--interactive] SHARE_DIR SERIAL_LOG}")
SERIAL=${2:-$SHARE/serial.log}
for f in xen vmlinuz initrd.img; do [ -f "$RIG/boot/$f" ] || rig_die "missing $RIG/boot/$f (run build-image.sh)"; done
[ -f "$RIG/dom0.img" ] || rig_die "missing $RIG/dom0.img (run build-image.sh)"

# Every boot writes to a throw-away copy-on-write overlay: the image stays
# pristine and two runs never see each other's leftovers.
OVL=$(mktemp "$RIG/dom0-overlay.XXXXXX.qcow2")
qemu-img create -q -f qcow2 -F raw -b "$RIG/dom0.img" "$OVL" || rig_die "qemu-img create failed"
trap 'rm -f "$OVL"' EXIT

# TCG with -cpu Westmere. Under TCG, -cpu max kills the PV dom0 at once
# ("d0v0 Unhandled: vec 14, #PF[0001]"), and with SMAP/SMEP/PKU hidden it boots
# but processes crash at random under I/O load (likely AVX/XSAVE state under
# TCG); Westmere (no AVX, SMAP, SMEP, PKU) runs the same load clean. KVM here is
# kvm_pvm (no VMX/SVM) and runs Xen far slower than TCG, so it is not offered.
CPU=${XENBLK_RIG_CPU:-Westmere}
SMP=${XENBLK_RIG_SMP:-2}
# xpti=false spec-ctrl=no: this rig tests the block protocol, not side-channel
# hardening, and under TCG XPTI makes every PV kernel entry a CR3 switch (a
# full softmmu TLB flush): measured here, it halves guest boot and `xl create`.
XEN_CMD="dom0_mem=1536M,max:1536M dom0_max_vcpus=$SMP console=com1 com1=115200,8n1 loglvl=all guest_loglvl=all xpti=false spec-ctrl=no ${XENBLK_RIG_XEN_APPEND:-}"
DOM0_CMD="root=/dev/vda rw console=hvc0 earlyprintk=xen init=/sbin/xenblk-rig-init ${XENBLK_RIG_DOM0_APPEND:-}"
QEMU=(qemu-system-x86_64 -machine pc -accel tcg -cpu "$CPU" -m "${XENBLK_RIG_MEM:-4G}" -smp "$SMP"
  -display none -monitor none -no-reboot
  -kernel "$RIG/boot/xen" -append "$XEN_CMD"
  -initrd "$RIG/boot/vmlinuz $DOM0_CMD,$RIG/boot/initrd.img"
  -drive "file=$OVL,if=virtio,format=qcow2,cache=unsafe"
  -virtfs "local,path=$SHARE,mount_tag=rig,security_model=none,id=rig")
if [ $INTERACTIVE = 1 ]; then
  "${QEMU[@]}" -serial mon:stdio
  exit $?
fi
echo "== $(date -Is) qemu tcg cpu=$CPU smp=$SMP timeout=${TIMEOUT}s share=$SHARE" > "$SERIAL"
START=$EPOCHREALTIME
START_US=${START/./}
# The stamping loop reads QEMU's output line by line (bash arithmetic on
# microseconds: no fork per line); printing to stdout too lets whoever runs
# this watch the boot live.
timeout --foreground -k 10 "$TIMEOUT" "${QEMU[@]}" -serial stdio </dev/null 2>&1 | \
  while IFS= read -r line; do
    d=$(( ${EPOCHREALTIME/./} - START_US ))
    printf '[%4d.%02d] %s\n' $((d / 1000000)) $((d % 1000000 / 10000)) "${line%$'\r'}"
  done | tee -a "$SERIAL"
rc=${PIPESTATUS[0]}
echo "== qemu exit rc=$rc after $(rig_since "$START")s" | tee -a "$SERIAL"
exit "$rc"
exit $?
}
