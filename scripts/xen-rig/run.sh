#!/bin/bash
# Run real-Xen scenarios: build/refresh the image if needed, boot Xen + dom0
# once in QEMU, run the named scenarios in that one boot, collect the logs and
# exit non-zero if any scenario failed or never reported.
#
#   scripts/xen-rig/run.sh smoke                 one scenario
#   scripts/xen-rig/run.sh smoke adapters        several, in this order, one boot
#   scripts/xen-rig/run.sh all                   every scenarios/* file (smoke first) but
#                                                those marked "# rig-all: no" (bench)
#   scripts/xen-rig/run.sh bench                 kernel blkback vs xenblk-vhost under fio
#   scripts/xen-rig/run.sh --list
# Options: --timeout S (whole boot; default: sum of the scenarios' own
#          "# rig-timeout:" + 300 s for boot), --quiet (serial console only to
#          the log, not to stdout), --profile (the bench scenario runs py-spy
#          on the daemon through each job: share/out/bench/profiles/; needs
#          py-spy, which scripts/install-deps.sh puts in .venv), --perf JOB[,JOB]
#          (the bench scenario runs `perf record -a` on all of dom0 through those
#          jobs of every disk, blkback's too: share/out/bench/perf/), --env NAME=VALUE
#          (exported in dom0 before the scenarios: an A/B of a XENBLK_* knob such
#          as XENBLK_RING_SPIN_US; repeatable).
# A scenario is one file, scripts/xen-rig/scenarios/NAME.sh (bash, with
# dom0/lib.sh sourced) or NAME.py (dom0 venv python, dom0/ on sys.path).
# Results: $XENBLK_RIG_DIR/runs/<stamp>-<names>/ (symlink runs/latest):
#   serial.log, share/out/<scenario>/{log,status,results.json,...}; a
#   scenario's summary.txt, if any, is printed at the end.
set -euo pipefail
# The whole script is one brace group: bash parses it completely before running,
# so editing this file while a run is going cannot derail that run.
{
. "$(dirname "$0")/lib.sh"
[ "$(id -u)" = 0 ] || rig_die "run as root"

TIMEOUT=""; QUIET=0; PROFILE=0; PERF_JOBS=""; names=(); envs=()
while [ $# -gt 0 ]; do
  case "$1" in
    --timeout) TIMEOUT=$2; shift 2;;
    --quiet) QUIET=1; shift;;
    --profile) PROFILE=1; shift;;
    --perf) [[ "${2:-}" =~ ^[a-z0-9,-]+$ ]] || rig_die "--perf wants fio job names (randread-4k-qd1,...), not '${2:-}'"
            PERF_JOBS=$2; shift 2;;
    --env) [[ "${2:-}" =~ ^[A-Z][A-Z0-9_]*=[^\'\"]*$ ]] || rig_die "--env wants NAME=VALUE (no quotes), not '${2:-}'"
           envs+=("$2"); shift 2;;
    --list) ls "$RIG_HERE/scenarios" | sed 's/\.\(sh\|py\)$//'; exit 0;;
    -*) rig_die "unknown option $1";;
    *) names+=("$1"); shift;;
  esac
done
[ ${#names[@]} -gt 0 ] || rig_die "usage: run.sh [--timeout S] [--quiet] SCENARIO...|all  (--list to see them)"
scenario_file() { ls "$RIG_HERE/scenarios/$1".sh "$RIG_HERE/scenarios/$1".py 2>/dev/null | head -1 || true; }
if [ "${names[*]}" = all ]; then
  # smoke first: if dom0 itself is broken, that is the failure to read first.
  # Scenarios marked "# rig-all: no" (the bench) run only when named.
  mapfile -t names < <(grep -L '^# rig-all: no' "$RIG_HERE"/scenarios/*.sh "$RIG_HERE"/scenarios/*.py 2>/dev/null \
    | xargs -n1 basename | sed 's/\.\(sh\|py\)$//' | sort | awk '$0=="smoke"{print; next} {rest=rest $0 "\n"} END{printf "%s", rest}')
fi
tmo_sum=300
for n in "${names[@]}"; do
  f=$(scenario_file "$n"); [ -n "$f" ] || rig_die "no scenario '$n' (have: $(ls "$RIG_HERE/scenarios" | sed 's/\.\(sh\|py\)$//' | tr '\n' ' '))"
  t=$(sed -n 's/^# rig-timeout: *\([0-9]*\).*/\1/p' "$f" | head -1)
  tmo_sum=$((tmo_sum + ${t:-300} + 15))
done
TIMEOUT=${TIMEOUT:-$tmo_sum}

rig_lock
T0=$EPOCHREALTIME
RIG_LOCKED=1 "$RIG_HERE/build-image.sh"
T_BUILD=$(rig_since "$T0")

# The run directory: the 9p share (dom0 scripts, scenarios, the checkout, the
# guest's kernel and initramfs) plus the logs. Copies, so editing the tree
# while a run is going does not change what the run sees.
RUN=$RIG/runs/$(date +%Y%m%d-%H%M%S)-$(IFS=+; echo "${names[*]}" | cut -c1-60)
SHARE=$RUN/share
mkdir -p "$SHARE/out" "$SHARE/guest" "$SHARE/src"
cp -a "$RIG_HERE/dom0" "$RIG_HERE/scenarios" "$SHARE/"
cp -a "$RIG_REPO/pyproject.toml" "$SHARE/src/"
(cd "$RIG_REPO" && tar --exclude=__pycache__ -cf - xenblk_vhost) | tar -xf - -C "$SHARE/src"
# Hard links where possible: the ELF guest kernel is 64 MiB.
for f in vmlinux:domu-vmlinux initrd.cpio:domu-initrd.cpio initrd-fio.cpio:domu-fio.cpio; do
  ln "$RIG/boot/${f#*:}" "$SHARE/guest/${f%%:*}" 2>/dev/null || cp "$RIG/boot/${f#*:}" "$SHARE/guest/${f%%:*}"
done
printf '%s\n' "${names[@]}" > "$SHARE/scenarios.txt"
printf '%s\n' "${envs[@]}" > "$SHARE/env.txt"
if [ $PROFILE = 1 ]; then  # (a static binary: it runs in dom0 as it is)
  PYSPY=$(ls "$RIG_REPO/.venv/bin/py-spy" 2>/dev/null || command -v py-spy || true)
  [ -n "$PYSPY" ] || rig_die "--profile needs py-spy: scripts/install-deps.sh installs it into .venv (the bench extra)"
  mkdir -p "$SHARE/tools" && cp "$PYSPY" "$SHARE/tools/py-spy"
fi
if [ -n "$PERF_JOBS" ]; then mkdir -p "$SHARE/tools" && echo "$PERF_JOBS" > "$SHARE/tools/perf-jobs"; fi
git -C "$RIG_REPO" log -1 --format='%H %s' > "$SHARE/src/COMMIT" 2>/dev/null || true
# Byte-compile here: dom0 is CPython 3.11 too, and compiling the package under
# TCG costs tens of seconds at the first import (pyc files are valid across 3.11.x).
if [ "$(python3 -c 'import sys; print(sys.version_info[:2] == (3, 11))' 2>/dev/null)" = True ]; then
  python3 -m compileall -q "$SHARE/src/xenblk_vhost" "$SHARE/dom0" > /dev/null || rig_log "compileall failed; dom0 will compile"
fi
ln -sfn "$RUN" "$RIG/runs/latest"
# Keep the last 20 runs.
ls -1d "$RIG"/runs/2*/ 2>/dev/null | head -n -20 | xargs -r rm -rf

rig_log "run dir $RUN; scenarios: ${names[*]}; boot timeout ${TIMEOUT}s"
T1=$EPOCHREALTIME
# (a failed or timed-out boot still gets its verdict below: no set -e exit here)
qrc=0
if [ $QUIET = 1 ]; then
  "$RIG_HERE/boot.sh" --timeout "$TIMEOUT" "$SHARE" "$RUN/serial.log" > /dev/null || qrc=$?
else
  "$RIG_HERE/boot.sh" --timeout "$TIMEOUT" "$SHARE" "$RUN/serial.log" || qrc=$?
fi
T_BOOT=$(rig_since "$T1")

# Verdict: every scenario must have written PASS. A missing status means dom0
# died, hung or the boot timed out before reaching it.
failed=0
echo
echo "== xen-rig results ($RUN)"
milestone() { sed -n "s/^\[ *\([0-9.]*\)\] .*$1.*/\1/p" "$RUN/serial.log" | head -1; }
printf '   image check/build %ss; QEMU ran %ss (rc %s); dom0 init at %ss, toolstack up at %ss\n' \
  "$T_BUILD" "$T_BOOT" "$qrc" "$(milestone 'RIG: dom0 init start')" "$(milestone 'RIG: xen toolstack up')"
npass=0; nfail=0
for n in "${names[@]}"; do
  st=$(cat "$SHARE/out/$n/status" 2>/dev/null || echo "FAIL - never reported (dom0 crash, hang or boot timeout; see serial.log)")
  set -- $st
  printf '   %-22s %-4s %6ss  %s\n' "$n" "$1" "$2" "$(echo "$st" | cut -d' ' -f3-)"
  if [ "$1" = PASS ]; then npass=$((npass + 1)); else nfail=$((nfail + 1)); failed=1; fi
done
# With --quiet nothing else shows what went wrong: the end of each failed log.
for n in "${names[@]}"; do
  grep -q '^PASS' "$SHARE/out/$n/status" 2>/dev/null && continue
  echo "--- last lines of $n's log:"
  tail -n 25 "$SHARE/out/$n/log" 2>/dev/null | sed 's/^/   | /' || echo "   (no log)"
done
# A scenario's own summary (the bench's table), if it wrote one.
for n in "${names[@]}"; do
  [ -s "$SHARE/out/$n/summary.txt" ] || continue
  echo "--- $n summary ($SHARE/out/$n/summary.txt):"
  sed 's/^/   /' "$SHARE/out/$n/summary.txt"
done
grep -q 'RIG: all scenarios done' "$RUN/serial.log" || { echo "   dom0 did not finish its scenario list"; failed=1; }
grep -E '\(XEN\) .*(FATAL|Panic)|Kernel panic|BUG: |general protection' "$RUN/serial.log" | head -5 | sed 's/^/   console: /' || true
echo "   logs: $RUN/serial.log, $SHARE/out/<scenario>/"
[ $failed = 0 ] && echo "== xen-rig: ALL PASSED" || echo "== xen-rig: FAILED"
echo "xen-rig: $npass passed, $nfail failed"
exit $failed
exit $?
}
