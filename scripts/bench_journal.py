#!/usr/bin/env python3
"""What the in-flight journal costs: backend CPU per request with and without it, in one run.

    .venv/bin/python scripts/bench_journal.py [--repeat 3] [--seconds 2] [--workloads qd32,qd128]

Two figures:

  calls    the journal's own calls as the ring worker makes them (one
           record_taken per batch, one record_answers per push with the
           push's answers, one published per push) on a tmpfs file, timed
           alone: CPU per request by batch size, for each engine (compiled:
           native/journal_kernel.c; python: the reference RingJournal).
  bridge   the speed issue's benchmark (scripts/benchkit: a compiled guest
           in its own process drives the real Vbd through the simulated
           hypervisor, page-cached file on io_uring, copy path), each
           workload run with and without the journal, alternating, --repeat
           times; backend CPU per request (getrusage of this process over
           the requests it served), medians, and the difference.

The machine's load is printed: the bridge figures move with it (compare
within a run); the calls figure hardly does.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchkit.targets import open_targets  # noqa: E402
from benchkit.workloads import FULL, select  # noqa: E402

from xenblk_vhost.backend.datapath.journal import JournalGeometry, RingJournal, format_area  # noqa: E402
from xenblk_vhost.backend.datapath.journal_compiled import CompiledRingJournal  # noqa: E402
from xenblk_vhost.backend.datapath.journal_file import JournalFile  # noqa: E402
from xenblk_vhost.blkif.abi import Abi, layout  # noqa: E402

DEFAULT_WORKLOADS = "4k-randread-qd1-o0-r1,4k-randwrite-qd1-o0-r1,-qd32-o0-r1,-qd128-o4-r1"


class _Answer:
    __slots__ = ("jref", "status")

    def __init__(self, jref: int) -> None:
        self.jref = jref
        self.status = 0


def calls_per_request(directory: Path, batch: int, engine: type[RingJournal], rounds: int = 4000) -> float:
    """CPU seconds per request of the journal's calls alone, at `batch` requests per batch."""
    entry = layout(Abi.NATIVE).entry_size
    g = JournalGeometry.for_ring(128, entry, 256)
    jf = JournalFile.create(directory / f"calls-{batch}.journal", g.size)
    try:
        format_area(jf.buffer, g, b"bench", taken_to=0, published=0)
        j = engine(jf.buffer, g)
        raw = bytes(range(256)) * (batch * entry // 256 + 1)
        raw = raw[:batch * entry]
        pos = 0
        answered = [_Answer(0) for _ in range(batch)]  # the worker's slots: jref, status
        t0 = time.process_time()
        for _ in range(rounds):
            ref = j.record_taken(pos, raw, batch)
            if answered[0].jref != ref:  # the worker sets a slot's jref at dispatch: not journal cost
                for i, a in enumerate(answered):
                    a.jref = ref + i
            j.record_answers(answered, pos)
            pos += batch
            j.published(pos)
        spent = time.process_time() - t0
        j.release()
    finally:
        jf.remove()
    return spent / (rounds * batch)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=2.0)
    ap.add_argument("--warmup", type=float, default=0.5)
    ap.add_argument("--workloads", default=DEFAULT_WORKLOADS, help="benchkit workload names (comma-separated)")
    ap.add_argument("--no-bridge", action="store_true", help="only the calls figure")
    args = ap.parse_args()
    print(f"machine: {os.cpu_count()} CPUs, load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    with tempfile.TemporaryDirectory(prefix="bench-journal-", dir="/dev/shm") as tmp:
        print("calls alone (tmpfs file): CPU per request by batch size, median of 5 (compiled / python)")
        for batch in (1, 8, 32, 64):
            figs = [statistics.median(calls_per_request(Path(tmp), batch, engine) for _ in range(5))
                    for engine in (CompiledRingJournal, RingJournal)]
            print(f"  batch {batch:>2}: {1e6 * figs[0]:.3f} / {1e6 * figs[1]:.3f} us/request")
        if args.no_bridge:
            return 0
        from benchkit.sim_cases import Timing, run_bridge

        from xenblk_vhost.sim.hypervisor import running_hypervisor

        workloads = select(FULL, args.workloads)
        timing = Timing(args.warmup, args.seconds)
        figures: dict = {(w.name, j): [] for w in workloads for j in (False, True)}
        with open_targets(["file"], Path(tmp), queues=1) as targets, running_hypervisor(str(Path(tmp) / "xen.sock")):
            hv = str(Path(tmp) / "xen.sock")
            for rep in range(args.repeat):
                for w in workloads:
                    for journal in (False, True) if rep % 2 == 0 else (True, False):
                        jdir = Path(tmp) / "journals" if journal else None
                        b = run_bridge(hv, targets["file"], w, "copy", timing, hooks=False, journal_dir=jdir)
                        figures[(w.name, journal)].append(
                            (b["backend_cpu_us_per_io"] / b["requests_per_io"], b["iops"]))
        print(f"bridge (file on io_uring, copy path; {args.repeat} x {args.seconds:g} s each, alternating; "
              f"load average now {' '.join(f'{x:.2f}' for x in os.getloadavg())}): backend CPU per request, medians")
        print("  workload                   without (us)   with (us)   journal (us)   IOPS without / with   "
              "spread without / with (us, max - min of the repeats)")
        for w in workloads:
            off = figures[(w.name, False)]
            on = figures[(w.name, True)]
            cpu_off = statistics.median(c for c, _ in off)
            cpu_on = statistics.median(c for c, _ in on)
            iops_off = statistics.median(i for _, i in off)
            iops_on = statistics.median(i for _, i in on)
            spread_off = max(c for c, _ in off) - min(c for c, _ in off)
            spread_on = max(c for c, _ in on) - min(c for c, _ in on)
            print(f"  {w.name:<26} {cpu_off:>12.2f}   {cpu_on:>9.2f}   {cpu_on - cpu_off:>+12.2f}   "
                  f"{iops_off:>9.0f} / {iops_on:<9.0f}   {spread_off:.2f} / {spread_on:.2f}")
        print("  (a difference smaller than the spreads is not resolved at this load)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
