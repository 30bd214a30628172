#!/usr/bin/env python3
"""xenblk-vhost's datapath against raw libblkio, on the simulated hypervisor.

    .venv/bin/python scripts/bench.py --quick                 # < 1 minute: every dimension once
    .venv/bin/python scripts/bench.py                         # the full matrix, ~5 minutes
    .venv/bin/python scripts/bench.py --targets file --paths copy --workloads qd1,qd128 --profile

For every workload (4 KiB random read and write at QD 1, 32, 128 on ring
order 0 or 4, with 1 and 2 rings; 128 KiB and 1 MiB sequential) and target
(a page-cached file on io_uring; qemu-storage-daemon null-co over
vhost-user), in one run:

  raw     the workload straight on libblkio (compiled loop, one thread per
          queue): what the storage itself does;
  bridge  a simulated guest (compiled load generator, its own process)
          drives xenblk-vhost's Vbd (the real datapath, in this process)
          through the simulated hypervisor, for each data path: copy,
          and on io_uring also map and map+persistent;
  ceiling the same guest against a null responder (compiled, answers
          without I/O): the most the load generator can drive. A bridge
          figure near it would measure the generator, not the backend.

Output: one JSON line per (target, data path, workload) on stdout and in
OUT/results.jsonl (OUT/machine.json: the machine, its load, the settings);
progress and a summary table on stderr; the chart (OUT/bench.png, bridge
vs raw) path at the end. Fields:
  workload, target, data_path, engine, op, pattern, bs, qd, ring_order, rings,
  ring_workers                        inline, or process (--ring-workers: each ring
                                      in a worker process; backend CPU adds theirs)
  bridge_iops, raw_iops, ratio        I/Os per second; ratio = bridge/raw
  bridge_MBps, raw_MBps
  p50_us, p99_us                      per I/O, as the guest measured it
  raw_p50_us, raw_p99_us              the same on raw libblkio
  backend_cpu_us_per_io               this process's CPU time (getrusage: its
                                      io_uring workers included) over the I/Os
                                      it served: what the backend costs,
                                      whatever the machine's load
  sim_copy_share, sim_copy_us_per_io  the part of it spent in the simulated
                                      hypervisor's grant copy, which runs in the
                                      backend's process where real Xen does it
                                      in a hypercall (sampled, see --profile)
  backend_cpu_us_per_io_without_sim_copy
  loadgen_ceiling_iops                the generator against the null responder
  loadgen_cpu_us_per_io               the guest's CPU per I/O
  backend_wakeups_per_io, backend_reaps_per_io, backend_notifies_per_io
                                      event-channel wake-ups, completion-fd
                                      reaps, notifications sent
  storage_cpu_us_per_io               qemu-storage-daemon's CPU (null for
                                      io_uring: that work is the backend's own)
  raw_cpu_us_per_io, raw_storage_cpu_us_per_io
  requests_per_io                     blkif requests per I/O (a big I/O split as
                                      the backend's segment limit demands)
  oo_req                              times the ring was full of requests
  profile, profile_samples            CPU share per category (profile.py)

Machines are noisy: compare ratios within one run; the load average is
printed at the start and the end. A SIGPROF sampler runs through every
bridge run (at most ~250 samples per CPU-second here: the kernel's tick);
--profile prints its breakdown: where the backend's CPU goes, by category
and by function (longer --seconds, more samples).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchkit import goals  # noqa: E402
from benchkit import workloads as wl  # noqa: E402
from benchkit.targets import open_targets  # noqa: E402

DEFAULT_OUT = ROOT / "bench-results"


def log(msg: str = "") -> None:
    print(msg, file=sys.stderr, flush=True)


def machine() -> dict:
    model = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
                 platform.processor())
    return {"cpu": model, "cpus": os.cpu_count(), "kernel": platform.release(),
            "python": platform.python_version(), "load": [round(x, 2) for x in os.getloadavg()]}


def check_built() -> None:
    try:
        import _xenblk_bench  # noqa: F401
    except ImportError:
        sys.exit("bench.py: the compiled load generator (_xenblk_bench) is not built: run scripts/install-deps.sh "
                 "(or .venv/bin/python scripts/benchkit/build_loadgen.py)")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__.split("\n", 2)[2],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="every dimension once, short runs (< 1 minute)")
    ap.add_argument("--seconds", type=float, help="measured seconds per run (default 2; --quick 0.5)")
    ap.add_argument("--warmup", type=float, help="seconds run before measuring (default 0.5; --quick 0.2)")
    ap.add_argument("--targets", default="file,null", help="file,null")
    ap.add_argument("--paths", help=f"data paths (default {','.join(wl.PATHS)}; --quick: copy); "
                                    "map ones run only where the driver can use them")
    ap.add_argument("--workloads", help="only workloads whose name contains one of these (comma-separated), "
                                        "e.g. qd1,128k")
    ap.add_argument("--engines", default="compiled",
                    help="compiled,python: run every bridge case with the compiled kernels (xenblk_vhost/native) "
                         "and again with their Python references, in one run (default: compiled); py-intake: "
                         "the compiled kernels but the Python request intake (XENBLK_ENGINE=python); no-lane: "
                         "the compiled kernels without the copy path's compiled lane (XENBLK_COPY_LANE=0); "
                         "no-engine: the lane without the ring engine, the held path driven from Python "
                         "(XENBLK_RING_ENGINE=0)")
    ap.add_argument("--ring-workers", default="inline",
                    help="inline,process: run every bridge case with the rings in the backend's process "
                         "and again with each ring in a worker process of its own (ring_workers: process; "
                         "io_uring targets only), in one run (default: inline)")
    ap.add_argument("--no-raw", action="store_true", help="skip the raw libblkio baseline")
    ap.add_argument("--no-ceiling", action="store_true", help="skip the load generator's ceiling runs")
    ap.add_argument("--no-hooks", action="store_true",
                    help="no CPU sampler nor wake-up counters in the backend (to measure what they cost)")
    ap.add_argument("--profile", action="store_true",
                    help="print where the backend's CPU goes in each bridge run (more --seconds: more samples)")
    ap.add_argument("--gc-threshold", type=int, default=0,
                    help="gc.set_threshold(N) in the backend (default: Python's)")
    ap.add_argument("--out", type=Path, help=f"results directory (default {DEFAULT_OUT.name}/<date-time>)")
    ap.add_argument("--no-chart", action="store_true")
    ap.add_argument("--list", action="store_true", help="print the workloads and exit")
    args = ap.parse_args(argv)
    args.seconds = args.seconds or (0.5 if args.quick else 2.0)
    args.warmup = args.warmup if args.warmup is not None else (0.2 if args.quick else 0.5)
    if args.paths is None:
        args.paths = "copy" if args.quick else ",".join(wl.PATHS)
    return args


def plan(args) -> list[tuple[str, str, wl.Workload, str, str]]:
    """(target, path, workload, engine, ring_workers) in run order: a target's workloads together, every path,
    engine and ring_workers of a workload in a row."""
    workloads = wl.select(wl.QUICK if args.quick else wl.FULL, args.workloads)
    targets = [t for t in args.targets.split(",") if t]
    paths = [p for p in args.paths.split(",") if p]
    for p in paths:
        wl.parse_path(p)
    engines = [e for e in args.engines.split(",") if e]
    if not engines or set(engines) - {"compiled", "python", "py-intake", "no-lane", "no-engine"}:
        raise SystemExit(f"bench.py: --engines takes compiled, python, py-intake, no-lane and/or no-engine, "
                         f"not {args.engines!r}")
    modes = [m for m in args.ring_workers.split(",") if m]
    if not modes or set(modes) - {"inline", "process"}:
        raise SystemExit(f"bench.py: --ring-workers takes inline and/or process, not {args.ring_workers!r}")
    drivers = {"file": "io_uring", "null": "virtio-blk-vhost-user"}
    cases = []
    for t in targets:
        if t not in drivers:
            raise SystemExit(f"bench.py: unknown target {t!r} (file, null)")
        for w in workloads:
            for p in paths:
                if wl.parse_path(p)[0] == "map" and drivers[t] not in wl.MAP_CAPABLE_DRIVERS:
                    continue
                cases.extend((t, p, w, e, m) for e in engines for m in modes
                             if m == "inline" or drivers[t] == "io_uring")
    if not cases:
        raise SystemExit("bench.py: nothing to run with these --targets/--paths/--workloads")
    return cases


def summary_line(r: dict) -> str:
    if r.get("engine") == "py-intake":  # the compiled kernels, the Python request intake
        r = {**r, "data_path": r["data_path"] + "/pyin"}
    if r.get("engine") == "no-lane":  # the compiled kernels, without the copy path's lane
        r = {**r, "data_path": r["data_path"] + "/nolane"}
    if r.get("engine") == "no-engine":  # the lane's held path driven from Python, without the ring engine
        r = {**r, "data_path": r["data_path"] + "/noeng"}
    def f(x, fmt):
        return "-" if x is None else format(x, fmt)

    path = (r["data_path"] + ("/py" if r.get("engine") == "python" else "")
            + ("/proc" if r.get("ring_workers") == "process" else ""))
    return (f"{r['target']:4} {path:14} {r['workload']:26} {r['bridge_iops'] / 1e3:8.1f}k "
            f"{f(r['raw_iops'] and r['raw_iops'] / 1e3, '8.1f')}k {f(r['ratio'], '6.3f')} "
            f"{r['p50_us']:8.1f} {r['p99_us']:9.1f} {f(r['raw_p50_us'], '8.1f')} "
            f"{r['backend_cpu_us_per_io']:8.2f} {f(r['sim_copy_share'] and 100 * r['sim_copy_share'], '5.1f')}% "
            f"{f(r['raw_cpu_us_per_io'], '8.2f')} "
            f"{f(r['loadgen_ceiling_iops'] and r['loadgen_ceiling_iops'] / 1e3, '8.0f')}k")


SUMMARY_HEADER = (f"{'tgt':4} {'path':14} {'workload':26} {'bridge':>9} {'raw':>9} {'ratio':>6} {'p50us':>8} "
                  f"{'p99us':>9} {'raw_p50':>8} {'cpu/IO':>8} {'copy%':>6} {'raw_cpu':>8} {'ceiling':>9}")


def ring_scaling(rows: list[dict]) -> list[str]:
    """Rings on their own cores (issue 13: 2 rings >= 1.5x one ring at saturation): each 2-ring row's
    aggregate IOPS over the same workload's 1-ring rows of this run, inline and in a worker, and the
    backend's cores in use (IOPS x CPU per I/O: 2 rings on their own cores can use up to 2)."""
    def key(r: dict) -> tuple:
        return (r["target"], r["data_path"], r["engine"], r["op"], r["pattern"], r["bs"], r["qd"], r["ring_order"])

    one = {(key(r), r["ring_workers"]): r for r in rows if r["rings"] == 1 and r.get("bridge_iops")}
    out = []
    for r in rows:
        if r["rings"] < 2 or not r.get("bridge_iops"):
            continue
        bases = [(mode, one[(key(r), mode)]) for mode in ("inline", "process") if (key(r), mode) in one]
        if not bases:
            continue
        ceiling = r["loadgen_ceiling_iops"]
        vs = ", ".join(f"{r['bridge_iops'] / b['bridge_iops']:.2f} x one ring "
                       f"{'inline' if mode == 'inline' else 'in a worker'} ({b['bridge_iops'] / 1e3:.1f}k)"
                       for mode, b in bases)
        cores = "" if r.get("backend_cpu_us_per_io") is None else \
            f"; backend {r['bridge_iops'] * r['backend_cpu_us_per_io'] / 1e6:.2f} cores"
        out.append(f"  {r['target']} {r['data_path']} {r['workload']} {r['ring_workers']:7}: "
                   f"{r['bridge_iops'] / 1e3:8.1f}k = {vs}{cores}; generator ceiling "
                   + ("-" if ceiling is None else f"{ceiling / 1e3:.0f}k") + " (target >= 1.50 x)")
    return ["rings on their own cores (2 rings vs 1, aggregate IOPS, same run):"] + out if out else []


def case_figures(w, b: dict, raw: dict | None, ceiling: dict | None, sampler) -> dict:
    """A JSON line's figures, from the bridge run b, the raw baseline and the generator's ceiling."""
    row = {
        "bridge_iops": b["iops"], "raw_iops": raw and raw["iops"],
        "ratio": raw and b["iops"] / raw["iops"],
        "p50_us": b["p50_us"], "p99_us": b["p99_us"],
        "raw_p50_us": raw and raw["p50_us"], "raw_p99_us": raw and raw["p99_us"],
        "backend_cpu_us_per_io": b["backend_cpu_us_per_io"],
        "sim_copy_us_per_io": b["sim_copy_us_per_io"], "sim_copy_share": b["sim_copy_share"],
        "backend_cpu_us_per_io_without_sim_copy":
            None if b["sim_copy_us_per_io"] is None else b["backend_cpu_us_per_io"] - b["sim_copy_us_per_io"],
        "bridge_MBps": b["iops"] * w.bs / 1e6, "raw_MBps": raw and raw["iops"] * w.bs / 1e6,
        "loadgen_ceiling_iops": ceiling and ceiling["iops"],
        "loadgen_cpu_us_per_io": b["loadgen_cpu_us_per_io"],
        "backend_wakeups_per_io": b["backend_wakeups_per_io"],
        "backend_reaps_per_io": b["backend_reaps_per_io"],
        "backend_notifies_per_io": b["backend_notifies_per_io"],
        "storage_cpu_us_per_io": b["storage_cpu_us_per_io"],
        "raw_cpu_us_per_io": raw and raw["cpu_us_per_io"],
        "raw_storage_cpu_us_per_io": raw and raw["storage_cpu_us_per_io"],
        "requests_per_io": b["requests_per_io"], "oo_req": b["oo_req"],
        "engine_share": b["engine_share"], "poll_share": b["poll_share"],
        "poll_returns_per_io": b["poll_returns_per_io"], "spurious_per_io": b["spurious_per_io"],
        "engine_syscalls_per_req": b["engine_syscalls_per_req"],
    }
    if sampler is not None:
        row["profile"] = {k: round(v, 4) for k, v in sampler.shares().items()}
        row["profile_samples"] = sampler.samples
        if sampler.trio is not None:
            ios = max(b["ios_served"], 1)
            row["trio_steps_per_io"] = sampler.trio.steps / ios
            row["trio_epoll_waits_per_io"] = sampler.trio.io_waits / ios
    return row


def main(argv=None) -> int:
    args = parse_args(argv)
    cases = plan(args)
    if args.list:
        for t, p, w, e, m in cases:
            print(f"{t:5} {p:15} {w.name:26} {e} {m}")
        return 0
    check_built()
    from benchkit.profile import Sampler
    from benchkit.raw import run_raw
    from benchkit.sim_cases import Timing, run_bridge, run_null

    from xenblk_vhost import native
    from xenblk_vhost.backend.datapath.copy_lane import LANE_ENV
    from xenblk_vhost.backend.datapath.ring_engine import ENGINE_ENV as RING_ENGINE_ENV
    from xenblk_vhost.native.intake import ENGINE_ENV
    from xenblk_vhost.sim.hypervisor import running_hypervisor

    if args.gc_threshold:
        import gc

        gc.set_threshold(args.gc_threshold)
    timing = Timing(args.warmup, args.seconds)
    out_dir = args.out or DEFAULT_OUT / time.strftime("%Y%m%d-%H%M%S")
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = machine()
    meta.update(started=time.strftime("%Y-%m-%d %H:%M:%S"), quick=args.quick, warmup_s=args.warmup,
                seconds=args.seconds, hooks=not args.no_hooks, gc_threshold=args.gc_threshold or None)
    log(f"bench: {len(cases)} bridge runs, {timing.warmup:g}+{timing.seconds:g} s each; {meta['cpus']} x "
        f"{meta['cpu']}; load average {' '.join(map(str, meta['load']))}")
    log(f"bench: results in {out_dir}")
    rings = max(w.rings for _, _, w, _, _ in cases)
    rows: list[dict] = []
    failed: list[dict] = []
    raw_cache: dict = {}
    ceiling_cache: dict = {}
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="xenblk-bench-") as tmp, \
            open_targets(sorted({t for t, _, _, _, _ in cases}, key=["file", "null"].index), Path(tmp),
                         queues=rings) as targets, \
            running_hypervisor(str(Path(tmp) / "xen.sock")), \
            open(out_dir / "results.jsonl", "w") as jsonl:
        hv = str(Path(tmp) / "xen.sock")
        for i, (tname, path, w, engine, mode) in enumerate(cases, 1):
            target = targets[tname]
            head = {"workload": w.name, "target": tname, "target_label": target.label, "data_path": path,
                    "engine": engine, "op": w.op, "pattern": w.pattern, "bs": w.bs, "qd": w.qd,
                    "ring_order": w.order, "rings": w.rings, "ring_workers": mode}
            native.set_enabled(engine != "python")
            os.environ[ENGINE_ENV] = "python" if engine == "py-intake" else "compiled"
            os.environ[LANE_ENV] = "0" if engine == "no-lane" else "1"
            os.environ[RING_ENGINE_ENV] = "0" if engine == "no-engine" else "1"
            try:
                if not args.no_raw and (tname, w) not in raw_cache:
                    raw_cache[(tname, w)] = run_raw(target, w, timing)
                raw = raw_cache.get((tname, w))
                sampler = None if args.no_hooks else Sampler(count_trio=args.profile)
                b = run_bridge(hv, target, w, path, timing, sampler=sampler, hooks=not args.no_hooks,
                               ring_workers=mode)
                key = (w.shape, b["requests_per_io"])
                if not args.no_ceiling and key not in ceiling_cache:
                    ceiling_cache[key] = run_null(hv, w, timing, target.size, b["requests_per_io"])
                ceiling = ceiling_cache.get(key)
            except (RuntimeError, OSError) as e:
                # One broken case (the backend answering errors, say) must not cost the others.
                row = dict(head, error=str(e))
                failed.append(row)
                log(f"[{i:3}/{len(cases)}] {tname} {path} {engine} {mode} {w.name}: FAILED: {e}")
            else:
                row = dict(head, **case_figures(w, b, raw, ceiling, sampler))
                rows.append(row)
                elapsed = time.monotonic() - t0
                eta = elapsed / i * (len(cases) - i)
                log(f"[{i:3}/{len(cases)} {elapsed:5.0f}s, ~{eta:4.0f}s left] {tname} {path} {engine} {mode} {w.name}: "
                    f"{b['iops'] / 1e3:.1f}k IOPS"
                    + (f" = {row['ratio']:.3f} x raw {raw['iops'] / 1e3:.1f}k" if raw else "")
                    + f", p50 {b['p50_us']:.1f} us, backend {b['backend_cpu_us_per_io']:.2f} us/IO"
                    + (f" ({100 * b['sim_copy_share']:.0f}% sim copy)" if b["sim_copy_share"] is not None else "")
                    + (f", ceiling {ceiling['iops'] / 1e3:.0f}k" if ceiling else ""))
                if args.profile:
                    for text in sampler.report(b["backend_cpu_us_per_io"], b["ios_served"]):
                        log("    " + text)
            line = json.dumps(row)
            print(line, flush=True)
            jsonl.write(line + "\n")
            jsonl.flush()
    meta["load_end"] = [round(x, 2) for x in os.getloadavg()]
    meta["seconds_total"] = round(time.monotonic() - t0, 1)
    (out_dir / "machine.json").write_text(json.dumps(meta, indent=1) + "\n")
    log("")
    log(SUMMARY_HEADER)
    for r in rows:
        log(summary_line(r))
    if ceiling_cache:
        log("load generator ceiling (compiled guest vs null responder; its CPU per I/O):")
        for (shape, parts), c in ceiling_cache.items():
            pattern, bs, qd, order, nrings = shape
            log(f"  {pattern} {bs // 1024:5} KiB qd{qd:<3} o{order} r{nrings} x{parts}: {c['iops'] / 1e3:8.0f}k IOPS, "
                f"guest {c['loadgen_cpu_us_per_io']:.3f} us/IO, responder {c['responder_cpu_us_per_io']:.3f} us/IO")
    log("issue 13's simulator targets (backend CPU includes the sim grant copy):")
    for text in goals.check([r for r in rows if r["engine"] == cases[0][3] and r["ring_workers"] == cases[0][4]]):
        log(text)
    for text in ring_scaling(rows):
        log(text)
    log(f"load average: start {' '.join(map(str, meta['load']))}, end {' '.join(map(str, meta['load_end']))}; "
        f"{meta['seconds_total']:.0f} s")
    log(f"results: {out_dir / 'results.jsonl'}")
    if not args.no_chart and rows:
        from benchkit.chart import draw

        title = (f"xenblk-vhost (simulated Xen) vs raw libblkio - {meta['cpus']} x {meta['cpu']}, load "
                 f"{meta['load'][0]}-{meta['load_end'][0]}, {meta['started']}")
        log(f"chart: {draw(rows, title, out_dir / 'bench.png')}")
    for row in failed:
        log(f"FAILED: {row['target']} {row['data_path']} {row['workload']}: {row['error']}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
