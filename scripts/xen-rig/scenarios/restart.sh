# rig-timeout: 1800
# In `all` (CI): 4.5 min on an otherwise idle host (3 hand-overs, 5 kills; 06:18 run); under TCG every daemon
# start costs 6-8 s of Python start-up there, 45-140 s on a host loaded by other work (then 20-40 min).
# Upgrades and crashes under a busy guest (issue 12): a 2-vCPU guest writes and
# verifies xvda continuously (odio, 4 processes, fdatasync each round; every
# I/O slower than 200 ms reported with its start time) on storage that
# completes out of order (qemu-storage-daemon, aio=threads, over vhost-user,
# 2 queues, 16-page rings, indirect descriptors), while dom0 hands the daemon
# over gracefully HANDOVERS times (`xenblk-vhost upgrade`: the new process
# starts while the old one serves) and SIGKILLs it KILLS times at random
# moments, each time starting a new daemon on the same YAML, which takes the
# rings over where they stood. Then:
#   - the guest saw no I/O error and every round verified (odio), blkfront
#     connected xvda once and logged no error (no reconnect, no bad response);
#   - both ends' xenbus states stayed Connected the whole time (sampled);
#   - the longest guest I/O pause of each kind is reported (pauses.json):
#     a hand-over must pause I/O under 1 s (from its start: the old daemon's
#     drain; a stall's part before it is the emulation's, reported too, with
#     the run's longest stall near no event); a crash no longer than the time
#     from the kill to the new daemon serving again (its start-up, exec to its
#     takeover done, read from its own log: "takeover took"; also reported)
#     plus 0.5 s (the stalled I/O's own service time before the kill and after
#     the takeover: the pause is measured from that I/O's start).
# The storage exports the disk twice (path and handover_path): on a hand-over
# the new daemon connects to the export the old one does not use and maps the
# rings while the old one still serves (backend/xenbus/device.py).
# The guest runs rounds until dom0 is done (`xl sysrq DOMAIN m`: however long
# the daemons' start-ups take on a loaded machine), then its checks.
. "$RIG_DOM0/xenblk_lib.sh"

HANDOVERS=${XENBLK_RIG_HANDOVERS:-3}
KILLS=${XENBLK_RIG_KILLS:-5}
lsmod | grep -q '^xen_blkback' && fail "xen-blkback is loaded: this scenario needs our daemon alone on backend/vbd"
NAME=xbv-restart
IMG=$XB_DIR/xbv-restart.img CFG=$XB_DIR/xbv-restart.yaml
SOCK=/run/xenblk-rig/xbv-restart.sock SOCK2=/run/xenblk-rig/xbv-restart-2.sock CTL=/run/xenblk-rig/xbv-restart-control.sock
mkdisk "$IMG" 64
XB_PID="" QSD="" SAMPLER=""
# (set -e holds in traps too: nothing here may fail)
cleanup() { kill "${XB_PID:-none}" "${QSD:-none}" "${SAMPLER:-none}" 2>/dev/null || true; }
trap cleanup EXIT
trap 'exit 143' TERM
XB_QSD_SECOND_SOCK=$SOCK2 xb_start_qsd "$IMG" "$SOCK" 2
xb_yaml "$CFG" $NAME \
  "{vdev: xvda, driver: virtio-blk-vhost-user, path: $SOCK, handover_path: $SOCK2, data_path: copy, queues: 2, ring_page_order: 4, max_indirect_segments: 256}"
EVENTS=$OUT/events.txt; : > "$EVENTS"
event() { echo "$1 $(date +%s.%N)" >> "$EVENTS"; }

DAEMONS=0
# A daemon started after a kill competes with the busy guest for 2 TCG vCPUs: 30-140 s to ready
# (hand-overs' successors measured 123-137 s), far past xb_start_daemon's default 60 s.
XB_READY_TIMEOUT=300
start_daemon() {  # tag
  DAEMONS=$((DAEMONS + 1))
  event exec
  xb_start_daemon "$1" "$CFG" --control "$CTL"
  event ready
}

# When the daemon logging to XB_LOG had taken the device over (its own log line's time, dom0's clock):
# the end of its start-up as the guest sees it, "ready" being printed before the takeover.
takeovers() { grep -c 'vbd-[0-9]*-51712: takeover took' "$XB_LOG" || true; }
serving_event() {  # what takeovers-logged-before (a hand-over's daemons share one log)
  local i=0 line
  until [ "$(takeovers)" -gt "$2" ] && line=$(grep 'vbd-[0-9]*-51712: takeover took' "$XB_LOG" | tail -1); do
    sleep 0.2; i=$((i + 1)); [ $i -lt 900 ] || { tail -30 "$XB_LOG"; fail "$1: no takeover in $XB_LOG after 180 s"; }
  done
  python3 -c 'import sys, time; d, t = sys.argv[1].split()[:2]; hms, ms = t.split(",")
print("serving", time.mktime(time.strptime(d + " " + hms, "%Y-%m-%d %H:%M:%S")) + int(ms) / 1000)' "$line" >> "$EVENTS"
  note "$1: $(echo "$line" | sed 's/.*INFO [a-z_.]*: //')"
}

# Until pid is gone (a zombie counts as gone: its fds, so its event channels, are closed).
gone() {  # pid what
  local i=0
  while [ -e "/proc/$1" ] && ! awk '{exit !($3 == "Z")}' "/proc/$1/stat" 2>/dev/null; do
    sleep 0.05; i=$((i + 1)); [ $i -lt 600 ] || fail "$2: pid $1 still there after 30 s"
  done
  wait "$1" 2>/dev/null || true   # reap it if it is our child
}

# xenblk-vhost upgrade: the new daemon is started by the old one (it logs to the same file) and
# takes over once ready; the guests pause from the old one's drain to the new one's takeover.
handover() {  # n
  xb_assert_alive "before hand-over $1"
  local out=$OUT/upgrade-$1.json rc=0 old=$XB_PID try before
  before=$(takeovers)
  # A new daemon not ready within its 300 s (its start-up competing with the busy guest on a loaded
  # host: measured 123-137 s, and over 300 s once) is refused and the old one serves on (correct,
  # and the guest sees nothing): try once more, and say so.
  for try in 1 2; do
    rc=0
    xenblk-vhost upgrade --control "$CTL" --json > "$out" 2> "$OUT/upgrade-$1.err" || rc=$?
    [ $rc != 0 ] && [ $try = 1 ] && grep -q 'not ready within' "$OUT/upgrade-$1.err" || break
    note "hand-over $1: refused, the old daemon serves on ($(cat "$OUT/upgrade-$1.err")); trying again"
    xb_assert_alive "after a refused hand-over $1"
  done
  [ $rc = 0 ] || { tail -30 "$XB_LOG"; fail "hand-over $1: xenblk-vhost upgrade failed: $(cat "$OUT/upgrade-$1.err")"; }
  # When the old daemon stopped taking requests (its clock: dom0's).
  python3 -c 'import json, sys; print("handover", json.load(open(sys.argv[1]))["handed_over_at"])' "$out" >> "$EVENTS"
  gone "$old" "hand-over $1: the old daemon"
  XB_PID=$(python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))["successor"])' "$out")
  grep -q "upgrade: handed over to pid $XB_PID" "$XB_LOG" || fail "hand-over $1: the old daemon did not log its hand-over"
  note "hand-over $1: $(cat "$out")"
  serving_event "hand-over $1" "$before"
  note "hand-over $1: $(grep -E 'takeover (not )?prepared' "$XB_LOG" | tail -1 | sed 's/.*INFO [a-z_.]*: //')"
}
start_daemon d0

ROUNDS=1000   # at most: dom0 stops the guest once every event is done
xb_create $NAME restart restart \
  "xenblk.stall_ms=200 xenblk.raw_mib=4 xenblk.restart_rounds=$ROUNDS xen_blkfront.max_ring_page_order=4" 2 \
  "$(xb_phy_disk xvda "$CFG")"
DOMID=$XB_DOMID
CON=/var/log/xen/console/guest-$NAME.log
BE=/local/domain/0/backend/vbd/$DOMID/51712 FE=/local/domain/$DOMID/device/vbd/51712
xb_wait_console $NAME 'XENBLK-GUEST-BUSY xvda 1[^0-9]*$' 240 "first verified round on xvda"
( while :; do echo "$(date +%s.%N) $(xenstore-read "$BE/state" 2>/dev/null || echo -) $(xenstore-read "$FE/state" 2>/dev/null || echo -)"
              sleep 0.2; done ) > "$OUT/states.txt" 2>/dev/null &
SAMPLER=$!

# The guest must complete a new round after each event: its I/O went on.
resumed() {  # what
  local n; n=$(xb_busy_round "$CON" xvda)
  xb_wait_console $NAME "XENBLK-GUEST-BUSY xvda $((n + 1))[^0-9]*\$" 180 "$1: the guest's I/O must go on"
}

for h in $(seq 1 "$HANDOVERS"); do
  sleep 1
  handover "$h"
  resumed "hand-over $h"
done
for k in $(seq 1 "$KILLS"); do
  sleep "$(awk -v s="$k" 'BEGIN{srand(s); printf "%.1f", 0.5 + rand() * 2.5}')"
  xb_assert_alive "before kill $k"
  event kill
  kill -KILL "$XB_PID"; gone "$XB_PID" "kill $k"; XB_PID=""
  start_daemon k$k
  serving_event "kill $k" 0
  resumed "kill $k"
done

# The xenbus sampling ends with the last event: after its checks the guest shuts down, and a sample
# taken then sees its Closing (seen once: 4/6 after XENBLK-GUEST-DONE) that no daemon caused.
kill "$SAMPLER" 2>/dev/null || true; wait "$SAMPLER" 2>/dev/null || true; SAMPLER=""
xl sysrq $NAME m   # the guest stops after its current round
xb_wait_console $NAME 'XENBLK-GUEST-DONE' 600 "the guest's last rounds and checks"
cp "$CON" "$OUT/guest-$NAME.log"
# The last daemon may be a hand-over's (not this shell's child: no exit status to wait for).
xb_assert_alive "the last daemon"
kill -TERM "$XB_PID"; gone "$XB_PID" "the last daemon's SIGTERM"; XB_PID=""
for log in "$OUT"/daemon-*.log; do xb_log_clean "$log" "$(basename "$log")"; done
grep -h 'serving .* s after exec' "$OUT"/daemon-*.log | sed 's/.*INFO xenblk_vhost: //' > "$OUT/startups.txt" || true

python3 "$RIG_DOM0/restart_pauses.py" "$EVENTS" "$CON" "$OUT/states.txt" "$OUT/pauses.json" | tee "$OUT/pauses.txt"
grep -E '^(RESULT restart|CHECK restart)' "$OUT/guest-$NAME.log" | tr -d '\r'
grep -q '^CHECK [a-z_]* fail' "$OUT/guest-$NAME.log" \
  && fail "the guest reported failures: $(grep '^CHECK [a-z_]* fail' "$OUT/guest-$NAME.log" | tr -d '\r' | tr '\n' ' ')"
grep -q 'XENBLK-GUEST-DONE status=ok' "$OUT/guest-$NAME.log" || fail "the guest did not finish ok"
python3 - "$OUT/pauses.json" "$EVENTS" <<'PY' || fail "pauses or xenbus states out of bounds (pauses.txt, pauses.json)"
import json, sys
report = json.load(open(sys.argv[1]))
events = [l.split() for l in open(sys.argv[2]) if l.strip()]
bad = []
if report["not_connected_samples"]:
    bad.append(f"xenbus left Connected {report['not_connected_samples']} times: {report['not_connected'][:3]}")
# a kill's allowance: kill -> the next daemon serving (its takeover done, from its own log) + 0.5 s
startup, exec_to_serving = {}, {}
for i, (kind, t) in enumerate(events):
    if kind == "kill":
        later = events[i + 1:]
        serving = next(float(t2) for k2, t2 in later if k2 == "serving")
        execd = next(float(t2) for k2, t2 in later if k2 == "exec")
        startup[float(t)] = serving - float(t)
        exec_to_serving[float(t)] = serving - execd
for e in report["events"]:
    # A hand-over's bound is on what it can have caused: from the old daemon's drain to the guest's
    # stalled I/Os done (after_event_s). Under TCG on a loaded host a guest I/O may have waited most of
    # a second before any hand-over (baseline_longest_s: the longest stall with no event near it).
    if e["kind"] == "handover":
        print(f"hand-over at {e['at']:.1f}: pause {e['after_event_s']} s after it began "
              f"(the longest stalled I/O {e['pause_s']} s from its start)")
    if e["kind"] == "handover" and e["after_event_s"] > 1.0:
        bad.append(f"hand-over at {e['at']:.1f}: guest I/O paused {e['after_event_s']} s after it began (> 1 s)")
    if e["kind"] == "kill":
        allow = startup[e["at"]] + 0.5
        print(f"kill at {e['at']:.1f}: pause {e['pause_s']} s, kill -> serving {startup[e['at']]:.2f} s "
              f"(daemon start-up, exec -> takeover done: {exec_to_serving[e['at']]:.2f} s)")
        if e["pause_s"] > allow:
            bad.append(f"kill at {e['at']:.1f}: guest I/O paused {e['pause_s']} s "
                       f"(> kill -> serving + 0.5 s = {allow:.2f})")
print("\n".join(bad))
sys.exit(1 if bad else 0)
PY
note "ok: $HANDOVERS hand-overs and $KILLS kills under a busy guest: no I/O error, every round verified, no reconnect"
kill -TERM $QSD; wait $QSD || true; QSD=""
