#!/usr/bin/env python3
"""Memory per ring: what a ring costs the backend, measured, beside the bounds the configuration sets.

    .venv/bin/python scripts/bench_memory.py [--seconds 1] [--rings 1,4] [--paths copy,map+persistent]
                                             [--ring-workers inline,process]

Each case runs in a fresh process (Python keeps what it once allocated, so
cases must not share one): the benchmark's simulated guest (scripts/benchkit,
the compiled load generator) drives xenblk-vhost's Vbd on a page-cached file
(io_uring), order-4 rings, the operator's defaults otherwise (limits.memory
64 MiB and max_inflight 256 per ring, the journal on tmpfs). Two workloads,
each in its own process, so that every kind of buffer is touched: 4 KiB
random writes at QD128 (every request slot's small buffer) and 1 MiB
sequential writes at QD8 (the large buffers of indirect requests). Once the
workload is done, before the disconnect, it reads /proc/PID/status of the
process serving the rings (and of each ring worker: ring_workers: process):

  RssAnon    the heap: Python objects (slots, requests, caches), libblkio
  RssShmem   shared memory touched: the copy path's bounce region (a memfd
             libblkio can share with a vhost-user server), the journal (a
             tmpfs file mapped), and in the simulator the guest pages its
             grant copy and grant maps reach (on real Xen those are the
             hypervisor's and gntdev's, not this process's)

and prints, per ring, the growth from 1 ring to N rings divided by N-1, next
to the bounds: limits.memory (the bounce region is allocated once at connect
and never grows), the journal file's size, and for map+persistent the
persistent-grant cache's 1056 mapped pages.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

KIB = 1024


def status_kib(pid: int | str) -> dict[str, int]:
    """VmRSS, RssAnon, RssFile, RssShmem of a process, in KiB."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile", "RssShmem"):
            out[key] = int(rest.split()[0])
    return out


def one_case(args) -> dict:
    """Run one workload once in this process; the memory figures, as a dict."""
    from benchkit.sim_cases import Timing, run_bridge
    from benchkit.targets import open_targets
    from benchkit.workloads import Workload

    from xenblk_vhost.sim.hypervisor import running_hypervisor

    w = (Workload("write", "rand", 4 * KIB, 128, 4, args.case_rings) if args.case_workload == "4k"
         else Workload("write", "seq", 1024 * KIB, 8, 4, args.case_rings))
    with tempfile.TemporaryDirectory(dir="/run" if os.access("/run", os.W_OK) else None) as tmp:
        with open_targets(["file"], Path(tmp), queues=args.case_rings) as targets, \
                running_hypervisor(str(Path(tmp) / "xen.sock")):
            jdir = Path(tmp) / "journals"
            seen: dict = {}

            def probe(pids):
                seen["service"] = status_kib("self")
                seen["workers"] = [status_kib(p) for p in pids]
                files = list(jdir.iterdir()) if jdir.exists() else []
                seen["journal_bytes"] = sum(f.stat().st_size for f in files)  # the file's size, fixed at connect
                seen["journal_held"] = sum(f.stat().st_blocks * 512 for f in files)  # what tmpfs holds for it
                return None

            before = status_kib("self")
            b = run_bridge(str(Path(tmp) / "xen.sock"), targets["file"], w, args.case_path,
                           Timing(0.2, args.seconds), hooks=False, journal_dir=jdir,
                           ring_workers=args.case_workers, probe=probe)
    return {"before": before, **seen, "iops": b["iops"]}


def run_case(path: str, rings: int, workers: str, workload: str, seconds: float) -> dict:
    cmd = [sys.executable, __file__, "--case-path", path, "--case-rings", str(rings), "--case-workers", workers,
           "--case-workload", workload, "--seconds", str(seconds)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def held(r: dict, key: str) -> int:
    """KiB of `key` the rings hold: the service's growth over its start, plus every worker's whole figure."""
    return r["service"][key] - r["before"][key] + sum(w[key] for w in r["workers"])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=1.0, help="per workload (default 1)")
    ap.add_argument("--rings", default="1,4", help="ring counts, the first the base (default 1,4)")
    ap.add_argument("--paths", default="copy,map+persistent")
    ap.add_argument("--ring-workers", default="inline,process")
    for hidden in ("--case-path", "--case-workers", "--case-workload"):
        ap.add_argument(hidden, help=argparse.SUPPRESS)
    ap.add_argument("--case-rings", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.case_path:
        print(json.dumps(one_case(args)))
        return 0

    from xenblk_vhost.backend.features import MAX_PERSISTENT_GRANTS
    from xenblk_vhost.config import DEFAULT_MAX_INFLIGHT, DEFAULT_MEMORY

    rings = [int(r) for r in args.rings.split(",")]
    if len(rings) < 2 or rings[0] >= rings[-1]:
        raise SystemExit("bench_memory.py: --rings needs a base and a larger count, e.g. 1,4")
    base, top = rings[0], rings[-1]
    print(f"bench_memory: page-cached file on io_uring, order-4 rings, limits.memory {DEFAULT_MEMORY >> 20} MiB and "
          f"max_inflight {DEFAULT_MAX_INFLIGHT} per ring (defaults); load average "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}", file=sys.stderr)
    print(f"{'path':16} {'rings in':9} {'workload':9} {'anon/ring':>10} {'shmem/ring':>11} {'journal/ring (held)':>20} "
          f"{'worker RSS':>11}")
    for path in args.paths.split(","):
        for workers in args.ring_workers.split(","):
            for workload in ("4k", "1m"):
                lo = run_case(path, base, workers, workload, args.seconds)
                hi = run_case(path, top, workers, workload, args.seconds)
                n = top - base
                anon = (held(hi, "RssAnon") - held(lo, "RssAnon")) / n
                shmem = (held(hi, "RssShmem") - held(lo, "RssShmem")) / n
                journal = (hi["journal_bytes"] - lo["journal_bytes"]) / n / KIB
                journal_held = (hi["journal_held"] - lo["journal_held"]) / n / KIB
                worker = (f"{sum(w['VmRSS'] for w in hi['workers']) / len(hi['workers']) / KIB:.0f} MiB"
                          if hi["workers"] else "-")
                print(f"{path:16} {workers:9} {workload:9} {anon / KIB:>6.1f} MiB {shmem / KIB:>7.1f} MiB "
                      f"{journal / KIB:>6.1f} ({journal_held / KIB:4.1f}) MiB {worker:>11}", flush=True)
    print(f"bounds per ring: the copy path's bounce region is limits.memory ({DEFAULT_MEMORY >> 20} MiB by default), "
          f"allocated at connect, never grown; map+persistent keeps at most {MAX_PERSISTENT_GRANTS} guest pages "
          f"mapped ({MAX_PERSISTENT_GRANTS * 4 // KIB:.1f} MiB of the guest's memory, not the backend's); the journal "
          "file's size is fixed at connect (column above; tmpfs holds only the pages written, in brackets); a ring "
          "worker process adds its interpreter (worker RSS)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
