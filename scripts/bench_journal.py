#!/usr/bin/env python3
"""What the in-flight journal costs: backend CPU per request with and without it, in one run.

    .venv/bin/python scripts/bench_journal.py [--repeat 3] [--seconds 2] [--workloads qd32,qd128]

Two figures:

  calls    what the journal adds to the ring worker's own calls around one
           batch, timed alone (tmpfs file, a ring in memory): the batch's
           parse by the compiled intake, its answers (record_answers, then
           the responses written) and the push, with the journal minus the
           same without it; CPU per request by batch size. Columns: fused
           (the compiled engine as RingWorker runs it: the intake's parse
           call writes the frame, the push's responses and their answers
           are one C call, the push is one C call with published folded in,
           without a journal too), calls (the journal's calls one
           by one, as before that: record_taken after the parse, Python push
           then published; this tree's compiled journal), python (the same
           with the reference RingJournal). A tree without the fused calls
           prints "-" there: run this script with PYTHONPATH at an older
           checkout for its figures (alternate the runs).
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

try:  # not in a tree from before the fused calls (this script compares with one: see above)
    from xenblk_vhost.backend.datapath.journal_compiled import make_ring_push  # noqa: E402
except ImportError:
    make_ring_push = None  # type: ignore[assignment]
try:  # nor in one from before the compiled answers (the fused column then writes them from Python)
    from xenblk_vhost.backend.datapath.journal_compiled import make_ring_answers  # noqa: E402
except ImportError:
    make_ring_answers = None  # type: ignore[assignment]
from xenblk_vhost.backend.datapath.journal_file import JournalFile  # noqa: E402
from xenblk_vhost.blkif.abi import Abi, layout  # noqa: E402
from xenblk_vhost.blkif.constants import OP_READ  # noqa: E402
from xenblk_vhost.blkif.encode import RequestEncoder  # noqa: E402
from xenblk_vhost.blkif.ring import BackRing, FrontRing, ring_bytes  # noqa: E402
from xenblk_vhost.blkif.validate import RequestLimits  # noqa: E402
from xenblk_vhost.native.intake import make_intake  # noqa: E402

DEFAULT_WORKLOADS = "4k-randread-qd1-o0-r1,4k-randwrite-qd1-o0-r1,-qd32-o0-r1,-qd128-o4-r1"


class _Answer:
    __slots__ = ("jref", "status", "req_id", "op")

    def __init__(self, jref: int) -> None:
        self.jref = jref
        self.status = 0
        self.req_id = jref
        self.op = 0


def _read_slots(batch: int) -> bytes:
    """batch ring slots of 4 KiB reads (one segment each), as a guest posts them."""
    enc = RequestEncoder(Abi.NATIVE)
    buf = bytearray(batch * enc.layout.entry_size)
    for i in range(batch):
        enc.rw(buf, i * enc.layout.entry_size, OP_READ, i, 8 * i, [(i, 0, 7)])
    return bytes(buf)


def calls_per_request(directory: Path, batch: int, way: str, journal: bool, rounds: int = 0) -> float:
    """CPU seconds per request of the worker's calls around a batch of `batch` requests: way "fused",
    "calls" or "python" (see the module docstring), with or without the journal. Rounds: by default
    enough for 32,000 requests and at least 4,000 batches (a small batch's difference is a few tenths
    of a microsecond: 4,000 single requests, 8 ms of CPU, left it to the scheduler's noise)."""
    rounds = rounds or max(4000, 32000 // batch)
    abi = Abi.NATIVE
    entry = layout(abi).entry_size
    g = JournalGeometry.for_ring(128, entry, 256)
    jf = JournalFile.create(directory / f"calls-{batch}-{way}.journal", g.size)
    intake = make_intake(abi, RequestLimits(sectors=1 << 30, max_indirect_segments=256))
    parse = intake.parse
    mem = bytearray(ring_bytes(2))
    FrontRing(memoryview(mem), abi, 2)
    ring = BackRing(memoryview(mem), abi, 2)
    put = ring.put_response
    j = None
    try:
        format_area(jf.buffer, g, b"bench", taken_to=0, published=0)
        if journal:
            j = (RingJournal if way == "python" else CompiledRingJournal)(jf.buffer, g)
        raw = _read_slots(batch)
        pos = 0
        answered = [_Answer(0) for _ in range(batch)]  # the worker's slots: jref, status
        fused = way == "fused"
        if fused:
            if make_ring_push is None or not hasattr(intake, "record_into"):
                return float("nan")  # an older tree
            if j is not None:
                intake.record_into(j.c_state)
            push = make_ring_push(ring, j)
            answers = make_ring_answers(ring, j) if make_ring_answers is not None else None
        t0 = time.process_time()
        for _ in range(rounds):
            ring.req_cons = (ring.req_cons + batch) & 0xFFFFFFFF  # taken (not timed apart: the same both ways)
            if j is None:
                parse(raw, batch)
            else:
                if fused:
                    parse(raw, batch, pos)
                    ref = intake.recorded
                else:
                    parse(raw, batch)
                    ref = j.record_taken(pos, raw, batch)
                if answered[0].jref != ref:  # the worker sets a slot's jref at dispatch: not journal cost
                    for i, a in enumerate(answered):
                        a.jref = ref + i
                if not (fused and answers is not None):
                    j.record_answers(answered, ring.rsp_prod_pvt)
            if fused and answers is not None and (j is not None or batch >= 16):  # as RingWorker._finish
                answers(answered)
            else:
                for a in answered:
                    put(a.req_id, 0, a.status)
            pos += batch
            if fused:
                push()
            else:
                ring.push_responses()
                if j is not None:
                    j.published(ring.rsp_prod_pvt)
        spent = time.process_time() - t0
    finally:
        if j is not None:
            j.release()
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
        print("calls: what the journal adds to the worker's calls around a batch, CPU per request by batch "
              "size, median of 7, interleaved (fused / calls / python; in brackets the fused engine's calls "
              "without a journal)")
        ways = ("fused", "calls", "python")
        for batch in (1, 8, 32, 64):
            runs: dict[tuple[str, bool], list[float]] = {(w, jr): [] for w in ways for jr in (False, True)}
            for _ in range(7):
                for key in runs:
                    runs[key].append(calls_per_request(Path(tmp), batch, *key))
            med = {key: statistics.median(v) for key, v in runs.items()}
            cost = " / ".join("-" if med[(w, True)] != med[(w, True)]
                              else f"{1e6 * (med[(w, True)] - med[(w, False)]):.3f}" for w in ways)
            alone = med[("fused", False)]
            print(f"  batch {batch:>2}: {cost} us/request   [{'-' if alone != alone else f'{1e6 * alone:.3f}'}]")
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
