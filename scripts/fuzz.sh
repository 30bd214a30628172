#!/usr/bin/env bash
# Coverage-guided fuzzing (atheris + libFuzzer) of the parsers that read another party's bytes.
#
#   scripts/fuzz.sh TARGET SECONDS      one campaign; TARGET all: each target in turn, SECONDS each
#   scripts/fuzz.sh --merge TARGET      minimise the repo corpus plus what campaigns found into the repo corpus
#   scripts/fuzz.sh --seed TARGET       (re)write the target's hand-made seeds into the repo corpus
#   scripts/fuzz.sh --list              the targets
#
# Targets (tests/fuzz_support/): blkif frontend_params xs_wire config control qmp.
# Corpus: tests/fuzz/corpus/TARGET (read as seeds, never written by a campaign). What a campaign finds
# goes to $XENBLK_FUZZ_WORK/TARGET/new (default /var/tmp/xenblk-vhost-fuzz), crashes (inputs that break
# a property or raise) to .../TARGET/crashes/crash-<sha1>; a crash makes the exit status 1. Replay one:
#   PYTHONPATH=tests .venv/bin/python -c 'import sys; from fuzz_support import blkif_target as t; t.one_input(open(sys.argv[1], "rb").read())' FILE
# Extra libFuzzer options: FUZZ_OPTS="-jobs=2 -workers=2" (default: one process). Run long campaigns
# under nice: they take a whole core.
set -euo pipefail
HERE=$(cd "$(dirname "$0")/.." && pwd)
PY=${XENBLK_PYTHON:-$HERE/.venv/bin/python}
WORK=${XENBLK_FUZZ_WORK:-/var/tmp/xenblk-vhost-fuzz}
CORPUS=$HERE/tests/fuzz/corpus
TARGETS=(blkif frontend_params xs_wire config control qmp)
export PYTHONPATH=$HERE/tests${PYTHONPATH:+:$PYTHONPATH}
usage() { sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }
known() { local t; for t in "${TARGETS[@]}"; do [ "$t" = "$1" ] && return 0; done
          echo "fuzz.sh: unknown target '$1' (targets: ${TARGETS[*]})" >&2; exit 2; }

campaign() {  # TARGET SECONDS -> one summary line; status 1 on a crash
  local target=$1 seconds=$2 log status
  mkdir -p "$WORK/$target/new" "$WORK/$target/crashes" "$CORPUS/$target"
  log=$WORK/$target/last.log
  local before; before=$(find "$WORK/$target/crashes" -type f | wc -l)
  set +e
  # shellcheck disable=SC2086
  "$PY" -m fuzz_support.runner "$target" -max_total_time="$seconds" -timeout=25 -rss_limit_mb=2048 \
      -print_final_stats=1 -artifact_prefix="$WORK/$target/crashes/" ${FUZZ_OPTS:-} \
      "$WORK/$target/new" "$CORPUS/$target" > "$log" 2>&1
  status=$?
  set -e
  local execs cov ft corpus crashes
  execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1 || true)
  cov=$(grep -oE 'cov: [0-9]+ ft: [0-9]+ corp: [0-9]+' "$log" | tail -1 || true)
  crashes=$(( $(find "$WORK/$target/crashes" -type f | wc -l) - before ))
  printf 'fuzz %-16s %6ss  execs %-10s %-32s crashes %s  exit %s  (log %s)\n' \
      "$target" "$seconds" "${execs:-?}" "${cov:-cov: ?}" "$crashes" "$status" "$log"
  if [ "$status" != 0 ] || [ "$crashes" != 0 ]; then
    grep -E 'Uncaught Python exception|Error|Test unit written' "$log" | head -5 >&2 || true
    return 1
  fi
}

[ $# -ge 1 ] || usage
case "$1" in
  -h|--help) usage;;
  --list) printf '%s\n' "${TARGETS[@]}";;
  --seed) known "$2"; "$PY" -m fuzz_support.runner --write-seeds "$2" "$CORPUS/$2";;
  --merge)
    known "$2"; tmp=$(mktemp -d); mkdir -p "$WORK/$2/new"
    "$PY" -m fuzz_support.runner "$2" -merge=1 "$tmp" "$CORPUS/$2" "$WORK/$2/new" > "$WORK/$2/merge.log" 2>&1 \
      || { tail -5 "$WORK/$2/merge.log" >&2; rm -rf "$tmp"; exit 1; }
    rm -rf "${CORPUS:?}/$2"; mkdir -p "$CORPUS/$2"; cp "$tmp"/* "$CORPUS/$2"/ 2>/dev/null || true; rm -rf "$tmp"
    echo "fuzz: $2 corpus minimised: $(find "$CORPUS/$2" -type f | wc -l) files, $(du -sk "$CORPUS/$2" | cut -f1) KiB";;
  *)
    [ $# -eq 2 ] && [[ $2 =~ ^[0-9]+$ ]] || usage
    if [ "$1" = all ]; then
      failed=0
      for t in "${TARGETS[@]}"; do campaign "$t" "$2" || failed=1; done
      exit $failed
    fi
    known "$1"; campaign "$1" "$2";;
esac
