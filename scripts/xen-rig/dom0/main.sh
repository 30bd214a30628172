#!/bin/bash
# Runs inside dom0, started by the image's init once the Xen toolstack is up.
# Puts the checkout from the share on the dom0 venv's path, then runs each
# scenario named in /mnt/rig/scenarios.txt in order, in this one boot, each
# with its own log, status and timeout, cleaning up between them so one
# scenario's leftovers (domains, loop devices, blkback) cannot fail the next.
set -u
export RIG_SHARE=/mnt/rig
export RIG_DOM0=$RIG_SHARE/dom0
export RIG_VENV=/opt/xenblk-vhost/venv
export PATH=/usr/lib/xen-4.17/bin:$RIG_VENV/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
OUTROOT=$RIG_SHARE/out
mkdir -p "$OUTROOT"
uptime_s() { cut -d' ' -f1 /proc/uptime; }
echo "RIG: main.sh start (uptime $(uptime_s)s)"

# The project's code comes from the checkout copied to the share at this run,
# never from the image: a .pth file is what an editable install amounts to,
# and the console script is generated from pyproject's [project.scripts].
SITE=$("$RIG_VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
echo "$RIG_SHARE/src" > "$SITE/xenblk_vhost_checkout.pth"
"$RIG_VENV/bin/python" - "$RIG_SHARE/src/pyproject.toml" "$RIG_VENV/bin" <<'EOF'
import os, sys, tomllib
scripts = tomllib.load(open(sys.argv[1], "rb"))["project"].get("scripts", {})
for name, target in scripts.items():
    mod, func = target.split(":")
    path = os.path.join(sys.argv[2], name)
    with open(path, "w") as f:
        f.write(f"#!{sys.argv[2]}/python\nimport sys\nfrom {mod} import {func}\nsys.exit({func}())\n")
    os.chmod(path, 0o755)
EOF
"$RIG_VENV/bin/python" -c 'import xenblk_vhost, sys; print("RIG: xenblk_vhost from", xenblk_vhost.__file__)' \
  || echo "RIG: WARNING: the checkout does not import in the dom0 venv"

# Guest kernel and initramfs into tmpfs: xl's domain builder mmaps the kernel
# file, and page faults on a 9p file are 4 KiB round trips (a 64 MiB kernel
# took up to a minute per `xl create` from 9p, ~2 s to copy once). The fio
# initramfs stays on the share until the bench scenario wants it.
export RIG_GUEST=/run/xenblk-rig/guest
mkdir -p "$RIG_GUEST" && cp "$RIG_SHARE"/guest/vmlinux "$RIG_SHARE"/guest/initrd.cpio "$RIG_GUEST/"

cleanup_between() {
  # Domains a scenario left behind, then loop devices, then blkback.
  for d in $(xl list 2>/dev/null | awk 'NR>2 {print $1}'); do
    echo "RIG: cleanup: destroying leftover domain $d"; xl destroy "$d"
  done
  losetup -D 2>/dev/null
  if lsmod | grep -q '^xen_blkback'; then rmmod xen-blkback || echo "RIG: cleanup: rmmod xen-blkback failed"; fi
  rm -f /var/log/xen/console/*.log /var/log/xen/*.log
}

# run.sh --env NAME=VALUE: for every scenario (checked there: a name and a value without quotes).
while IFS= read -r kv; do
  [ -n "$kv" ] || continue
  export "${kv%%=*}=${kv#*=}"; echo "RIG: env ${kv%%=*}=${kv#*=}"
done < <(cat "$RIG_SHARE/env.txt" 2>/dev/null)

for sc in $(cat "$RIG_SHARE/scenarios.txt"); do
  OUT=$OUTROOT/$sc
  mkdir -p "$OUT"
  file=$(ls "$RIG_SHARE/scenarios/$sc".sh "$RIG_SHARE/scenarios/$sc".py 2>/dev/null | head -1)
  tmo=$(sed -n 's/^# rig-timeout: *\([0-9]*\).*/\1/p' "$file" | head -1); tmo=${tmo:-300}
  echo "RIG: scenario $sc start (uptime $(uptime_s)s, timeout ${tmo}s)"
  t0=$(uptime_s)
  case "$file" in
    *.sh) cmd=(bash -c '. "$RIG_DOM0/lib.sh"; . "$0"' "$file");;
    *.py) cmd=(env PYTHONPATH="$RIG_DOM0" "$RIG_VENV/bin/python" "$file");;
  esac
  # Scenario output goes to its log and, prefixed, to the console (serial.log).
  OUT=$OUT timeout -k 10 "$tmo" "${cmd[@]}" > >(tee "$OUT/log" | sed -u "s/^/[$sc] /") 2>&1
  rc=$?
  sleep 0.2   # let the tee catch up before the status line
  dt=$(awk "BEGIN{printf \"%.1f\", $(uptime_s)-$t0}")
  if [ $rc = 0 ]; then
    echo "PASS $dt" > "$OUT/status"
  else
    why=$(cat "$OUT/failure" 2>/dev/null | head -5 | tr '\n' ' ')
    [ $rc = 124 ] && why="timed out after ${tmo}s. $why"
    echo "FAIL $dt ${why:-exit status $rc (see log)}" > "$OUT/status"
  fi
  echo "RIG: scenario $sc $(cut -d' ' -f1 "$OUT/status") in ${dt}s"
  mkdir -p "$OUT/xen-logs"
  cp /var/log/xen/console/*.log /var/log/xen/*.log "$OUT/xen-logs/" 2>/dev/null
  cleanup_between
done

dmesg > "$OUTROOT/dom0-dmesg.log"
xl dmesg > "$OUTROOT/xen-dmesg.log" 2>&1
echo "RIG: all scenarios done (uptime $(uptime_s)s)"
