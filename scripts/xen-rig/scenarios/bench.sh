# rig-timeout: 1500
# rig-all: no
# Kernel blkback against xenblk-vhost under fio, in one boot (not part of
# `run.sh all`: `scripts/xen-rig/run.sh bench`, 10-15 minutes).
#
# One 512 MiB image in dom0's tmpfs. The same PV guest (1 vCPU, 512 MiB, Linux
# blkfront's defaults: one-page ring, one queue) boots twice:
#   1. xvda = kernel xen-blkback on a loop device over the image (the reference);
#   2. then, blkback unloaded, `xenblk-vhost run` (libxl's phy route, our
#      hotplug script) serves four disks, all over that same image:
#      xvda grant copy without persistent grants (`persistent_grants: false`:
#      every byte copied by Xen's grant copy), xvdb grant copy with them (the
#      default: the ring engine copies to and from the frontend's persistently
#      mapped pages itself), xvdc grant map + persistent grants, xvdd grant
#      copy (with persistent grants) with its ring in a ring worker process
#      (`ring_workers: process`: the ring engine then also sleeps in its own
#      poll, no trio between requests) (io_uring, buffered: tmpfs has no
#      O_DIRECT, and the loop device under blkback is buffered too). Until
#      step 22 xvdb was grant map without persistent grants (`xbv-map`, the
#      slowest in every boot) and xvda and xvdd copied through Xen.
# Each guest runs the fio jobs (libaio, O_DIRECT, 10 s each) on its disks,
# every disk in turn per job: 4K random read QD1, 4K random read QD32, 4K
# random write QD32, 1M sequential read QD8, 1M sequential write QD8.
# dom0/bench_monitor.py reads dom0's CPU counters (and the daemon's) around
# each job and prints, per job and backend: IOPS, MB/s, latency, dom0 CPU per
# I/O, and each backend's ratio to blkback's.
# The daemon's ring counters are read around each job (how each disk's requests
# were served: the summary's second table). `run.sh --profile bench` also runs
# py-spy on the daemon through each of its jobs ($OUT/profiles/LABEL.JOB.txt
# and .top.txt; it costs dom0 CPU: such a run's figures are not for comparing).
# `run.sh --perf JOB,... bench` runs perf on all of dom0 through those jobs of
# every disk, blkback's included ($OUT/perf/LABEL.JOB.txt: perf report by
# process, library and function; the same caveat).
# Results: $OUT/results.json, $OUT/summary.txt (run.sh prints it at the end).
. "$RIG_DOM0/xenblk_lib.sh"

NAME=xbv-bench
FIO_RUNTIME=10
DIR=/run/xenblk-bench   # tmpfs
IMG=$DIR/disk.img CFG=$XB_DIR/xbv-bench.yaml
CON=/var/log/xen/console/guest-$NAME.log   # (xb_create starts it afresh)
[ -s "$RIG_SHARE/guest/initrd-fio.cpio" ] || fail "no fio initramfs on the share (build-image.sh's domu stage makes it)"

LOOP="" XB_PID="" PROFILER="" PERF_JOBS=""
if [ -x "$RIG_SHARE/tools/py-spy" ]; then
  PROFILER=/run/xenblk-rig/py-spy
  cp "$RIG_SHARE/tools/py-spy" "$PROFILER" || fail "cannot copy py-spy from the share"
  note "profiling: py-spy on the daemon through each job ($OUT/profiles)"
fi
if [ -s "$RIG_SHARE/tools/perf-jobs" ]; then
  command -v perf > /dev/null || fail "--perf: no perf in dom0 (build-image.sh's runtime stage installs linux-perf)"
  PERF_JOBS=$(cat "$RIG_SHARE/tools/perf-jobs")
  note "perf: all of dom0 through the jobs $PERF_JOBS of every disk ($OUT/perf)"
fi
# (set -e holds in traps too: nothing here may fail)
cleanup() {
  xl destroy $NAME 2>/dev/null || true
  kill "${XB_PID:-none}" 2>/dev/null || true
  [ -z "$LOOP" ] || losetup -d "$LOOP" 2>/dev/null || true
  rm -rf "$DIR" || true
}
trap cleanup EXIT
trap 'exit 143' TERM

mkdir -p "$DIR"
fallocate -l 512M "$IMG" || fail "cannot allocate the 512 MiB image in tmpfs"
# The guest boots from the usual initramfs with fio's appended.
cat "$RIG_GUEST/initrd.cpio" "$RIG_SHARE/guest/initrd-fio.cpio" > "$RIG_GUEST/initrd-bench.cpio"

# bench_guest TAG VDEV=LABEL... -- DISK...: boot the guest on these disks (xl
# disk specs), follow its jobs into $OUT/TAG.json, wait until it is gone.
bench_guest() {
  local tag=$1 vdevs="" labels=(); shift
  while [ "$1" != -- ]; do vdevs+="${vdevs:+,}${1%%=*}"; labels+=(--disk "$1"); shift; done
  shift
  XB_MEMORY=512 XB_RAMDISK=$RIG_GUEST/initrd-bench.cpio \
    xb_create $NAME "$tag" fio "xenblk.fio_disks=$vdevs xenblk.fio_runtime=$FIO_RUNTIME" 1 "$@"
  note "$tag: guest $NAME domid $XB_DOMID; 5 fio jobs x $# disk(s) x ${FIO_RUNTIME} s"
  local rc=0
  python3 "$RIG_DOM0/bench_monitor.py" follow --console "$CON" --guest $NAME "${labels[@]}" \
    ${XB_PID:+--daemon-pid "$XB_PID"} ${XB_PID:+${PROFILER:+--profiler "$PROFILER" --profile-dir "$OUT/profiles"}} \
    ${PERF_JOBS:+--perf-jobs "$PERF_JOBS" --perf-dir "$OUT/perf"} \
    --out "$OUT/$tag.json" --timeout 1000 || rc=$?
  cp "$CON" "$OUT/guest-$NAME.$tag.log" 2>/dev/null || true
  [ $rc = 0 ] || fail "$tag: the jobs did not all complete (console in guest-$NAME.$tag.log)"
  local i=0
  while xl domid $NAME > /dev/null 2>&1 && [ $i -lt 60 ]; do sleep 0.5; i=$((i + 1)); done
  xl domid $NAME > /dev/null 2>&1 && fail "$tag: the guest did not power off after its jobs"
  note "ok: $tag: every job ran on every disk"
}

# dom0's CPU rate with nothing to serve.
python3 "$RIG_DOM0/bench_monitor.py" idle 5 > "$OUT/idle.json" || fail "measuring dom0's idle CPU failed"
note "dom0 idle: $(cat "$OUT/idle.json")"
note "dom0 clock: $(python3 "$RIG_DOM0/bench_monitor.py" clock || echo unmeasured)"

# ---------------------------------------------------------------- 1. kernel blkback
modprobe xen-blkback || fail "modprobe xen-blkback failed"
LOOP=$(losetup -f --show "$IMG") || fail "losetup failed"
bench_guest blkback xvda=blkback -- "phy:$LOOP,xvda,w"
i=0
until rmmod xen-blkback 2>/dev/null; do
  sleep 0.5; i=$((i + 1)); [ $i -lt 40 ] || fail "xen-blkback still busy 20 s after the guest"
done
losetup -d "$LOOP"; LOOP=""

# ---------------------------------------------------------------- 2. xenblk-vhost, three data paths, two ways
xb_yaml "$CFG" $NAME \
  "{vdev: xvda, driver: io_uring, path: $IMG, direct: false, data_path: copy, persistent_grants: false}" \
  "{vdev: xvdb, driver: io_uring, path: $IMG, direct: false, data_path: copy}" \
  "{vdev: xvdc, driver: io_uring, path: $IMG, direct: false, data_path: map, persistent_grants: true}" \
  "{vdev: xvdd, driver: io_uring, path: $IMG, direct: false, data_path: copy, ring_workers: process}"
# (no CPU timeline: bench_monitor reads the daemon's CPU around each job; the timeline's shell loop forked
# four processes every 2 s, 5-8 % of dom0's samples in perf's reports of the xenblk-vhost jobs and none of
# blkback's: it ran only beside the daemon)
XB_CPU_TIMELINE=0 xb_start_daemon bench "$CFG"
bench_guest xenblk-vhost xvda=xbv-copy xvdb=xbv-copy+persist xvdc=xbv-map+persist xvdd=xbv-copy-proc -- \
  "$(xb_phy_disk xvda "$CFG")" "$(xb_phy_disk xvdb "$CFG")" "$(xb_phy_disk xvdc "$CFG")" \
  "$(xb_phy_disk xvdd "$CFG")"
xb_stop_daemon "bench daemon"
# How each disk's requests were served (the ring engine, its own poll, the Python reference path).
grep "the connection served" "$XB_LOG" | sed 's/.*INFO [^ ]* //' | while read -r line; do note "$line"; done

python3 "$RIG_DOM0/bench_monitor.py" table --idle-json "$OUT/idle.json" --out "$OUT" \
  "$OUT/blkback.json" "$OUT/xenblk-vhost.json" || fail "building the table failed"
