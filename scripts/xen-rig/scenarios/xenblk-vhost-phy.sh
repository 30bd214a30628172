# rig-timeout: 1200
# Our backend as a standalone daemon (`xenblk-vhost run CONFIG`) on libxl's
# phy route (backend/vbd, kernel xen-blkback not loaded, our hotplug script,
# the YAML as the disk's target), one daemon for three guest lives, all named
# xbv-phy (a guest restarted gets a new domid; the YAML follows the name):
#   1. busy: a 2-vCPU guest doing write/verify rounds on xvda (map path +
#      persistent grants, each of its 2 rings in a ring worker process:
#      ring_workers: process) and xvdb (copy path, in the daemon); `xenblk-vhost ctl list` shows
#      both Connected, `ctl pause xbv-phy/xvda` stops xvda's rounds with
#      nothing in flight, `ctl resume` lets them go on; `xl block-detach xvdb` in the
#      middle of its I/O must close cleanly within libxl's 10 s (after that
#      libxl 4.17 gives up on a vbd, "unable to remove device", and xl exits
#      1: seen with a backend made to stall) while xvda keeps working; xvdc,
#      added to the YAML, `ctl reload`ed and `xl block-attach`ed, is connected
#      by the guest; then `xl destroy` of the still busy guest must leave no zombie domain and
#      no grant mapped in the daemon.
#   2. the same daemon and YAML serve the next xbv-phy guest the full
#      workload (as blkback-reference's ref-mq: 2 vCPUs,
#      xen_blkfront.max_ring_page_order=4), which must negotiate what it did
#      with kernel blkback (persistent grants, indirect, 2 queues, 16-page ring);
#      then dom0 grows the disk file and the guest must see the new size live
#      and do I/O at the new end.
#   3. SIGTERM: the daemon exits 0 with a log free of crashes; dom0 finds
#      the guest's ext4 clean on the file.
. "$RIG_DOM0/xenblk_lib.sh"

lsmod | grep -q '^xen_blkback' && fail "xen-blkback is loaded: this scenario needs our daemon alone on backend/vbd"
NAME=xbv-phy
IMG_A=$XB_DIR/xbv-phy-a.img IMG_B=$XB_DIR/xbv-phy-b.img IMG_C=$XB_DIR/xbv-phy-c.img CFG=$XB_DIR/xbv-phy.yaml
mkdisk "$IMG_A" 64
mkdisk "$IMG_B" 64
mkdisk "$IMG_C" 16
# queues 2: what blkback offers on this 2-vCPU dom0 (num_online_cpus). xvda's two rings are
# served by two ring worker processes (ring_workers: process), xvdb's and xvdc's in the daemon.
DISK_A="{vdev: xvda, driver: io_uring, path: $IMG_A, direct: true, data_path: map, persistent_grants: true, queues: 2, ring_page_order: 4, max_indirect_segments: 256, ring_workers: process}"
DISK_B="{vdev: xvdb, driver: io_uring, path: $IMG_B, direct: true, data_path: copy, queues: 2}"
xb_yaml "$CFG" $NAME "$DISK_A" "$DISK_B"

XB_PID=""
# Python's start-up under TCG on a loaded host took over 60 s (seen at host load 7.6)
XB_READY_TIMEOUT=180
rm -f /run/xenblk-rig/hotplug.log
# (set -e holds in traps too: nothing here may fail)
cleanup() { kill "${XB_PID:-none}" 2>/dev/null || true; cp /run/xenblk-rig/hotplug.log "$OUT/" 2>/dev/null || true; }
trap cleanup EXIT
trap 'exit 143' TERM
xb_start_daemon phy "$CFG"

# ---------------------------------------------------------------- 1. busy guest
xb_create $NAME busy busy "xenblk.busy=xvda,xvdb" 2 "$(xb_phy_disk xvda "$CFG")" "$(xb_phy_disk xvdb "$CFG")"
DOMID=$XB_DOMID
CON=/var/log/xen/console/guest-$NAME.log
BE=/local/domain/0/backend/vbd/$DOMID
# (xvda's two ring workers start when blkfront connects: an interpreter each, a minute or more under TCG)
xb_wait_console $NAME 'XENBLK-GUEST-BUSY xvda 1[^0-9]*$' 480 "first write/verify round on xvda"
xb_wait_console $NAME 'XENBLK-GUEST-BUSY xvdb 1[^0-9]*$' 60 "first write/verify round on xvdb"
note "ok: busy: both disks passed a write/verify round; I/O continues"
maps=$(xb_gnt_maps)
[ "$maps" -gt 0 ] || fail "busy: the daemon maps no grants while two rings are busy (/proc/$XB_PID/maps)"
note "busy: daemon holds $maps gntdev mappings"
workers=$(xb_ring_workers | wc -l)
[ "$workers" = 2 ] || { ps -ef | grep -v grep | grep xenblk; fail "busy: xvda (ring_workers: process, 2 queues) is served by $workers ring worker processes, not 2"; }
grep -q "xvda/ring1: served by ring worker process" "$XB_LOG" || fail "busy: the daemon did not log xvda's ring 1 worker"
note "ok: busy: xvda's 2 rings served by ring worker processes $(xb_ring_workers | tr '\n' ' ')"

# The operator's view (xenblk-vhost ctl, finding the daemon's control socket by
# itself) while both disks are busy, then the snapshot hook: xvda paused (its
# rounds stop, nothing in flight), resumed (its rounds go on).
xenblk-vhost ctl list > "$OUT/ctl-list.txt" 2>&1 || { cat "$OUT/ctl-list.txt"; fail "ctl list failed"; }
cat "$OUT/ctl-list.txt"
for d in xvda xvdb; do
  grep -qE "^$NAME +$DOMID +$d +Connected +2 +(map|copy) " "$OUT/ctl-list.txt" \
    || fail "ctl list: $NAME/$d is not listed Connected with 2 rings (above)"
done
n=$(xb_busy_round "$CON" xvda)
# (ctl pause returns once nothing is in flight: checked by tests/test_ctl_e2e.py; each
# ctl call here costs 15-60 s of Python start-up under TCG, so the scenario makes few)
xenblk-vhost ctl pause $NAME/xvda > "$OUT/ctl-pause.txt" 2>&1 || { cat "$OUT/ctl-pause.txt"; fail "ctl pause failed"; }
cat "$OUT/ctl-pause.txt"
m0=$(xb_busy_round "$CON" xvda)
sleep 8
m=$(xb_busy_round "$CON" xvda)
[ "$m" = "$m0" ] || fail "pause: the guest completed xvda rounds $m0..$m while it was paused"
xenblk-vhost ctl resume $NAME/xvda > "$OUT/ctl-resume.txt" 2>&1 || fail "ctl resume failed"
xb_wait_console $NAME "XENBLK-GUEST-BUSY xvda $((m + 1))[^0-9]*\$" 120 "xvda must go on after ctl resume"
note "ok: ctl: list shows both disks Connected; pause held xvda at round $m for 8 s (round $n before the pause), resume let it go on"

# Detach xvdb (devid 51728) in the middle of its rounds.
before=$(xb_busy_round "$CON" xvdb)
t0=$(uptime_s)
xl -vvv block-detach $NAME xvdb > "$OUT/block-detach.log" 2>&1 \
  || { grep -E 'error|timed out' "$OUT/block-detach.log" | tail -5
       fail "detach: xl block-detach failed after $(awk "BEGIN{print $(uptime_s)-$t0}")s (the backend never reached Closed?)"; }
dt=$(awk "BEGIN{print $(uptime_s)-$t0}")
grep -q 'initiating forced remove' "$OUT/block-detach.log" \
  && fail "detach: libxl had to force the removal (the backend never reached Closed)"
# libxl runs the hotplug script's `remove` once the backend is Closed, so its
# logged start time bounds our Closing -> Closed; xl's own return time also
# includes that script (Python start-up: seconds under TCG, 40 s allowed).
rm_at=$(awk '$2 == "remove" && $3 ~ /\/51728$/ {print $1; exit}' /run/xenblk-rig/hotplug.log)
[ -n "$rm_at" ] || fail "detach: libxl never ran the hotplug script's remove for xvdb"
dclosed=$(awk "BEGIN{print $rm_at - $t0}")
note "detach: backend Closed (remove script started) ${dclosed}s after the detach began; xl block-detach returned after ${dt}s"
awk "BEGIN{exit !($dclosed < 10)}" || fail "detach: the backend reached Closed only after ${dclosed}s (libxl waits at most 10 s)"
xenstore-ls "$BE/51728" > /dev/null 2>&1 && fail "detach: $BE/51728 still in xenstore after xl block-detach"
xenstore-ls -f /local/domain/0/error 2>/dev/null | grep -E "vbd/$DOMID/" > "$OUT/detach-errors.txt" \
  && { cat "$OUT/detach-errors.txt"; fail "detach: an error report was left for the guest's vbds"; }
xb_wait_console $NAME 'RESULT busy.xvdb.end=' 60 "the guest's xvdb loop must end once the disk is gone"
rounds=$(xb_console_result "$CON" busy.xvdb.rounds)
end=$(xb_console_result "$CON" busy.xvdb.end)
note "detach: guest's xvdb loop: $rounds rounds ($before before the detach), then: $end"
case "$end" in
  *MISMATCH*) fail "detach: the guest read back wrong data on xvdb before it went: $end";;
  *pwrite*|*pread*|*open*) ;;
  *) fail "detach: the guest's xvdb loop ended without an I/O error: '$end'";;
esac
[ "$rounds" -ge 1 ] || fail "detach: no complete xvdb round"
assert_eq "detach: xvda backend state" "$(xenstore-read "$BE/51712/state")" 4
xb_assert_alive "after block-detach"
# xvda keeps being served: two more completed rounds after the detach.
n=$(xb_busy_round "$CON" xvda)
xb_wait_console $NAME "XENBLK-GUEST-BUSY xvda $((n + 2))[^0-9]*\$" 120 "xvda must keep working after xvdb's detach"
note "ok: detach: xvdb gone cleanly mid-I/O (Closed in ${dclosed}s), guest saw an I/O error (no bad data), xvda still served"

# A disk added to the YAML while the guest runs (README, "Adding a disk to a
# running guest"): ctl reload reports it, xl block-attach hands it to the guest,
# whose blkfront connects it.
xb_yaml "$CFG" $NAME "$DISK_A" "$DISK_B" "{vdev: xvdc, driver: io_uring, path: $IMG_C, direct: true}"
xenblk-vhost ctl reload > "$OUT/ctl-reload.txt" 2>&1 || { cat "$OUT/ctl-reload.txt"; fail "ctl reload failed"; }
grep -q "$NAME/xvdc: added" "$OUT/ctl-reload.txt" || { cat "$OUT/ctl-reload.txt"; fail "ctl reload did not report xvdc added"; }
xl block-attach $NAME "$(xb_phy_disk xvdc "$CFG")" > "$OUT/block-attach.log" 2>&1 \
  || { cat "$OUT/block-attach.log"; fail "xl block-attach of xvdc failed"; }
i=0
until [ "$(xenstore-read "$BE/51744/state" 2>/dev/null)" = 4 ]; do
  sleep 0.5; i=$((i + 1))
  [ $i -lt 120 ] || fail "block-attach: xvdc's backend not Connected 60 s after xl block-attach"
done
note "ok: block-attach: xvdc added to the YAML, reloaded, attached with xl block-attach, Connected by the guest's blkfront"

# Destroy the guest while xvda is busy (persistent grants mapped).
n=$(xb_busy_round "$CON" xvda)
xb_wait_console $NAME "XENBLK-GUEST-BUSY xvda $((n + 1))[^0-9]*\$" 60 "xvda busy before the destroy"
maps=$(xb_gnt_maps)
t0=$(uptime_s)
xl destroy $NAME || fail "destroy: xl destroy failed"
note "destroy: xl destroy returned after $(awk "BEGIN{print $(uptime_s)-$t0}")s (daemon had $maps gntdev mappings)"
cp "$CON" "$OUT/guest-$NAME.busy.log"
# Xen frees a dead domain only when nobody maps its pages any more: a backend
# that kept a grant mapped leaves a zombie in `xl list`.
i=0
while xl list | awk 'NR>1 {print $2}' | grep -qx "$DOMID"; do
  sleep 0.5; i=$((i + 1))
  [ $i -lt 40 ] || { xl list; fail "destroy: domain $DOMID still listed 20 s after xl destroy (grants held?)"; }
done
i=0
while [ "$(xb_gnt_maps)" != 0 ]; do
  sleep 0.5; i=$((i + 1))
  [ $i -lt 20 ] || fail "destroy: the daemon still has $(xb_gnt_maps) gntdev mappings 10 s after the domain died"
done
xenstore-ls "$BE" > /dev/null 2>&1 && fail "destroy: $BE still in xenstore"
xb_assert_alive "after xl destroy"
i=0
while [ -n "$(xb_ring_workers)" ]; do
  sleep 0.5; i=$((i + 1))
  [ $i -lt 20 ] || fail "destroy: ring worker processes $(xb_ring_workers | tr '\n' ' ') still there 10 s after the domain died"
done
note "ok: destroy: domain $DOMID freed after $(awk "BEGIN{print $(uptime_s)-$t0}")s, daemon alive with 0 grant mappings"

# ---------------------------------------------------------------- 2. the next guest: full workload + online resize
rm -f "$CON"   # the same name: run_guest reads this guest's console only
(
  # Grow the file once the guest waits for it (after the whole workload).
  i=0
  until grep -q 'XENBLK-GUEST-RESIZE-WAIT' "$CON" 2>/dev/null; do
    sleep 0.5; i=$((i + 1)); [ $i -lt 600 ] || exit 1
  done
  truncate -s 80M "$IMG_A" && echo "$(uptime_s)" > "$OUT/resized-at"
) &
RESIZER=$!
CPU0=$(xb_cpu_s $XB_PID)
SAME=(persistent_grants indirect_descriptors bounce_buffer backend_max_indirect_segments segments_per_request
      flush discard ring_order backend_max_ring_order queues backend_max_queues guest_hw_queues sectors
      sector_size protocol backend_persistent frontend_persistent)
run_guest $NAME --disk "$(xb_phy_disk xvda "$CFG")" --vcpus 2 --cmdline "xen_blkfront.max_ring_page_order=4" \
  --timeout 600 --steps info,raw,discard,fs,resize \
  --expect xs.be.type=phy --expect "xs.be.params=$CFG" \
  --expect neg.persistent_grants=enabled --expect neg.backend_persistent=1 --expect neg.frontend_persistent=1 \
  --expect neg.indirect_descriptors=enabled --expect neg.backend_max_indirect_segments=256 \
  --expect neg.segments_per_request=32 --expect "neg.flush=flush diskcache: enabled" \
  --expect neg.discard=supported --expect neg.sectors=131072 --expect ro=0 --expect neg.protocol=x86_64-abi \
  --expect neg.ring_order=4 --expect neg.backend_max_ring_order=4 --expect param.max_ring_page_order=4 \
  --expect neg.queues=2 --expect neg.backend_max_queues=2 --expect neg.guest_hw_queues=2 \
  --expect resize.sectors=163840 --expect "resize.blkfront=Setting capacity to 163840"
note "cpu: the daemon used $(awk "BEGIN{print $(xb_cpu_s $XB_PID)-$CPU0}")s during this guest's life"
wait $RESIZER || fail "resize: the helper failed (the guest never asked for the resize, or truncate failed)"
xb_compare_blkback $NAME ref-mq "${SAME[@]}"
note "resize: file grown at $(cat "$OUT/resized-at")s uptime; guest: $(python3 -c "import json,sys; g=json.load(open(sys.argv[1]))[sys.argv[2]]; print(g['checks']['resize_seen']['detail'], '|', g['guest'].get('resize.blkfront'))" "$OUT/results.json" $NAME)"
DOMID=$(python3 -c "import json,sys; print(json.load(open(sys.argv[1]))[sys.argv[2]]['xenstore_backend']['frontend-id'])" "$OUT/results.json" $NAME)
grep -q "vbd-$DOMID-51712: resized from 131072 to 163840 sectors" "$XB_LOG" || fail "resize: the daemon did not log the online resize"
# Live: the vbd connected once, and never went through the handshake again.
assert_eq "resize: times vbd-$DOMID-51712 connected" "$(grep -c "vbd-$DOMID-51712: InitWait -> Connected" "$XB_LOG")" 1

# ---------------------------------------------------------------- 3. dom0's view, clean stop
e2fsck -f -n "$IMG_A" > "$OUT/dom0-fsck.log" 2>&1 || fail "dom0 e2fsck -fn of the guest's filesystem failed"
debugfs -R 'ls /' "$IMG_A" 2>/dev/null | grep -q file6 || fail "file6 missing in the guest's filesystem, seen from dom0"
note "ok: dom0 sees a clean ext4 with the guest's files"
xb_stop_daemon "phy daemon"
assert_eq "hotplug script 'add' calls (busy guest's xvda+xvdb+xvdc, next guest's xvda)" "$(grep -c ' add ' /run/xenblk-rig/hotplug.log)" 4
