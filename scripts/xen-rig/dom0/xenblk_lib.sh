# Helpers for the xenblk-vhost-* scenarios (sourced after lib.sh): our backend
# as a standalone daemon, guests not run to completion (lifecycle), online
# resize from dom0, and the comparison with kernel blkback's results.
XB_DIR=/var/lib/xenblk-rig
XB_HOTPLUG=$RIG_DOM0/xenblk_hotplug.sh
mkdir -p "$XB_DIR"
# The packaged hotplug script, as an operator installs it (xenblk_hotplug.sh
# logs each call and execs it).
[ -x /etc/xen/scripts/block-xenblk-vhost ] || xenblk-vhost install-hotplug >/dev/null \
  || fail "xenblk-vhost install-hotplug failed"

# A one-domain YAML for our backend. Disk lines are YAML flow mappings, e.g.
#   xb_yaml FILE NAME '{vdev: xvda, driver: io_uring, path: /x.img, data_path: map}' ...
xb_yaml() {  # file domain-name disk...
  local f=$1 name=$2; shift 2
  { echo "domain: {name: $name}"; echo "disks:"; for d in "$@"; do echo "  - $d"; done; } > "$f"
  cp "$f" "$OUT/$(basename "$f")"
  # (not `xenblk-vhost check`: 10-20 s of Python start-up under TCG, and
  # `run` and the device model refuse a bad file themselves, exit 2)
}

# The xl disk line of the standalone-daemon route: backendtype=phy, our
# hotplug script, and the YAML as the target (libxl writes it to `params`).
xb_phy_disk() { echo "vdev=$1,access=rw,backendtype=phy,script=$XB_HOTPLUG,target=$2"; }

# Start `xenblk-vhost run CONFIG...` in the background; wait for "ready"
# (XB_READY_TIMEOUT seconds, default 60: a scenario that starts daemons while
# a guest is busy sets more; under TCG such a start-up takes 30-140 s).
# Sets XB_PID and XB_LOG.
xb_start_daemon() {  # tag config...
  local tag=$1; shift
  XB_LOG=$OUT/daemon-$tag.log
  local t0; t0=$(uptime_s)
  xenblk-vhost run --log-level info "$@" > "$XB_LOG" 2>&1 &
  XB_PID=$!
  local limit=${XB_READY_TIMEOUT:-60} since=$SECONDS
  until grep -q '^ready$' "$XB_LOG"; do
    kill -0 "$XB_PID" 2>/dev/null || { cat "$XB_LOG"; fail "xenblk-vhost run exited before ready (log above)"; }
    sleep 0.2
    [ $((SECONDS - since)) -lt "$limit" ] || { cat "$XB_LOG"; fail "xenblk-vhost run not ready after $limit s"; }
  done
  note "daemon $tag: pid $XB_PID ready after $(awk "BEGIN{print $(uptime_s)-$t0}")s"
  # (XB_CPU_TIMELINE=0: none. Its shell loop forks four processes every 2 s, which a PV dom0 under TCG pays
  # dearly for (page tables through Xen): the bench's jobs would count it as the daemon's dom0 CPU.)
  [ "${XB_CPU_TIMELINE:-1}" = 0 ] || xb_cpu_timeline "$XB_PID" "$OUT/cpu-daemon-$tag.txt"
}

# qemu-storage-daemon exporting an image over vhost-user-blk (aio=threads:
# completions in any order), in the background; waits for its socket. Sets QSD.
# XB_QSD_SECOND_SOCK: the same node exported on a second socket as well (a disk's
# handover_path: the daemon taking over connects there while the old one serves).
xb_start_qsd() {  # image socket queues blockdev-extra
  local img=$1 sock=$2 queues=$3 extra=${4:-} second=()
  mkdir -p "$(dirname "$sock")"; rm -f "$sock"
  if [ -n "${XB_QSD_SECOND_SOCK:-}" ]; then
    rm -f "$XB_QSD_SECOND_SOCK"
    second=(--export "type=vhost-user-blk,id=qsd2,node-name=qsd-file,addr.type=unix,addr.path=$XB_QSD_SECOND_SOCK,writable=on,num-queues=$queues")
  fi
  qemu-storage-daemon \
    --blockdev "driver=file,node-name=qsd-file,filename=$img,cache.direct=on,aio=threads$extra" \
    --export "type=vhost-user-blk,id=qsd,node-name=qsd-file,addr.type=unix,addr.path=$sock,writable=on,num-queues=$queues" \
    "${second[@]}" > "$OUT/qsd.log" 2>&1 &
  QSD=$!
  local i=0
  until [ -S "$sock" ] && { [ -z "${XB_QSD_SECOND_SOCK:-}" ] || [ -S "$XB_QSD_SECOND_SOCK" ]; }; do
    kill -0 $QSD 2>/dev/null || { cat "$OUT/qsd.log"; fail "qemu-storage-daemon exited"; }
    sleep 0.2; i=$((i + 1)); [ $i -lt 100 ] || fail "no vhost-user socket $sock after 20 s"
  done
  xb_cpu_timeline $QSD "$OUT/cpu-qsd.txt"
  note "qemu-storage-daemon pid $QSD exports $img on $sock ($queues queues)"
}

# Every 2 s until the process is gone: "uptime cpu-seconds" lines (where a
# process spends CPU while guests boot, idle or work).
xb_cpu_timeline() {  # pid file
  ( while kill -0 "$1" 2>/dev/null; do echo "$(uptime_s) $(xb_cpu_s "$1")"; sleep 2; done ) > "$2" 2>/dev/null &
}

xb_assert_alive() {  # what
  kill -0 "$XB_PID" 2>/dev/null || { tail -30 "$XB_LOG"; fail "$1: the xenblk-vhost daemon (pid $XB_PID) died"; }
}

# CPU seconds (user+system) a process has used so far, with its children's once they were
# waited for (the daemon's ring worker processes, ring_workers: process, after their connection).
xb_cpu_s() {  # pid
  awk -v t="$(getconf CLK_TCK)" '{print ($14 + $15 + $16 + $17) / t}' "/proc/$1/stat" 2>/dev/null || echo "?"
}

# Grant mappings the daemon and its ring worker processes (ring_workers: process) hold
# (gntdev VMAs): 0 once no guest is connected.
xb_gnt_maps() {
  local p c n=0
  for p in "$XB_PID" $(pgrep -P "$XB_PID" 2>/dev/null || true); do
    c=$(grep -c '/dev/xen/gntdev' "/proc/$p/maps" 2>/dev/null || true)
    n=$((n + ${c:-0}))
  done
  echo "$n"
}

# The daemon's ring worker processes (children running xenblk_vhost.daemon.ring_process).
xb_ring_workers() { pgrep -P "$XB_PID" -f xenblk_vhost.daemon.ring_process 2>/dev/null || true; }

# Problems in a daemon log that no scenario may leave behind.
xb_log_clean() {  # log what
  if grep -nE 'Traceback|device task failed|datapath failed|CRITICAL' "$1" > "$OUT/bad-lines.txt"; then
    head -20 "$OUT/bad-lines.txt"; fail "$2: $(basename "$1") has crash lines (above)"
  fi
}

# SIGTERM: the daemon must drain and exit 0 within 30 s, with a clean log.
xb_stop_daemon() {  # what
  xb_assert_alive "$1"
  kill -TERM "$XB_PID"
  local i=0
  while kill -0 "$XB_PID" 2>/dev/null && [ $i -lt 150 ]; do sleep 0.2; i=$((i + 1)); done
  kill -0 "$XB_PID" 2>/dev/null && { kill -KILL "$XB_PID"; fail "$1: daemon still running 30 s after SIGTERM"; }
  local rc=0; wait "$XB_PID" || rc=$?
  [ $rc = 0 ] || { tail -20 "$XB_LOG"; fail "$1: daemon exited with status $rc after SIGTERM"; }
  XB_PID=""   # reaped: its pid may be reused
  xb_log_clean "$XB_LOG" "$1"
  note "ok: $1: daemon exited 0 on SIGTERM, log clean"
}

# Wait for a line matching an ERE in a guest's live console log.
xb_wait_console() {  # name ere timeout-s what
  local log=/var/log/xen/console/guest-$1.log i=0
  until grep -qE "$2" "$log" 2>/dev/null; do
    sleep 0.5; i=$((i + 1))
    if [ $i -ge $(($3 * 2)) ]; then
      cp "$log" "$OUT/guest-$1.timeout.log" 2>/dev/null || true
      fail "guest $1: no '$2' on its console after $3 s ($4)"
    fi
    xl domid "$1" > /dev/null 2>&1 || { cp "$log" "$OUT/guest-$1.died.log" 2>/dev/null || true
                                         fail "guest $1 died before '$2' ($4)"; }
  done
}

# The last completed round of the guest's busy step on a disk (0: none yet).
xb_busy_round() {  # console-log disk
  local r; r=$(sed -n "s/.*XENBLK-GUEST-BUSY $2 \([0-9][0-9]*\).*/\1/p" "$1" | tail -1)
  echo "${r:-0}"
}

# The last value of a RESULT key in a console log.
xb_console_result() { sed -n "s/^RESULT $2=//p" "$1" | tr -d '\r' | tail -1; }

# A guest outside run_guest (the lifecycle cases, the bench): started, left
# running. XB_MEMORY (MiB, default 256) and XB_RAMDISK (default the workload's
# initramfs) change what it boots with.
xb_create() {  # name cfg-tag steps cmdline vcpus disk...
  local name=$1 tag=$2 steps=$3 cmdline=$4 vcpus=$5; shift 5
  local disks="" d
  for d in "$@"; do disks+="'$d', "; done
  cat > "$OUT/$name.$tag.cfg" <<CFG
name="$name"
type="pv"
kernel="$RIG_GUEST/vmlinux"
ramdisk="${XB_RAMDISK:-$RIG_GUEST/initrd.cpio}"
extra="console=hvc0 quiet xenblk.steps=$steps $cmdline"
memory=${XB_MEMORY:-256}
vcpus=$vcpus
disk=[ ${disks%, } ]
on_poweroff="destroy"
on_reboot="destroy"
on_crash="destroy"
CFG
  rm -f "/var/log/xen/console/guest-$name.log"
  xl -v create "$OUT/$name.$tag.cfg" > "$OUT/$name.$tag.xl-create.log" 2>&1 \
    || { tail -20 "$OUT/$name.$tag.xl-create.log"; fail "guest $name ($tag): xl create failed"; }
  XB_DOMID=$(xl domid "$name") || fail "guest $name ($tag): no domid after xl create"
  note "guest $name ($tag): domid $XB_DOMID"
}

# Compare what a guest negotiated with kernel blkback's reference guest, if the
# blkback-reference scenario ran in this boot (run.sh all runs it first).
xb_compare_blkback() {  # our-guest ref-guest keys...
  local ours=$1 ref=$2; shift 2
  local refjson=$RIG_SHARE/out/blkback-reference/results.json
  if [ ! -s "$refjson" ]; then
    note "blkback-reference did not run in this boot: no side-by-side comparison (the --expect values stand)"
    return 0
  fi
  python3 "$RIG_DOM0/xenblk_compare.py" "$OUT/results.json" "$ours" "$refjson" "$ref" "$@" \
    | tee "$OUT/compare-$ours-vs-$ref.txt"
  [ "${PIPESTATUS[0]}" = 0 ] || fail "$ours: negotiated differently from kernel blkback's $ref (table above)"
}
