#!/usr/bin/env python3
"""Micro-benchmark of the blkif protocol core's per-request cost.

Measures, for 32-request batches (one full single-page ring):
  * take: BackRing.take_slots (the private copy) + decode + validate, per
    request, for 1 segment, 11 segments and random 1..11 segments;
  * parse: decode + validate only, from an already private copy;
  * response encoding (BackRing.put_response) per response, plus one
    push_responses per batch;
for the 64-bit (native) and 32-bit guest ABIs; and the second half of an
indirect request (decode_indirect_segments) for 32 and 256 segments.

Prints ns/request (thread CPU time): the minimum and median over --repeat
runs of --batches batches each. Figures move with the machine's load (shared VMs): trust the
minimum and the ranking more than the third digit.

    .venv/bin/python scripts/bench_decode.py [--batches 2000] [--repeat 7]
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from xenblk_vhost.blkif.abi import Abi  # noqa: E402
from xenblk_vhost.blkif.constants import OP_READ, OP_WRITE, RSP_OKAY  # noqa: E402
from xenblk_vhost.blkif.encode import RequestEncoder  # noqa: E402
from xenblk_vhost.blkif.intake import RequestIntake  # noqa: E402
from xenblk_vhost.blkif.request import Rejection  # noqa: E402
from xenblk_vhost.blkif.ring import BackRing, FrontRing, ring_bytes  # noqa: E402
from xenblk_vhost.blkif.validate import RequestLimits  # noqa: E402

BATCH = 32
# CPU time of this thread, not wall time: the machine is shared, and time
# spent descheduled is not our cost.
_clock = time.thread_time_ns
LIMITS = RequestLimits(sectors=1 << 30, discard_enabled=True, barrier_enabled=True)


def make_ring(abi: Abi, nsegs_for) -> tuple[bytearray, FrontRing]:
    """A one-page ring holding BATCH valid requests, published by a FrontRing."""
    mem = bytearray(ring_bytes(0))
    front = FrontRing(memoryview(mem), abi, 0)
    enc = RequestEncoder(abi)
    rnd = random.Random(1)
    for i in range(BATCH):
        n = nsegs_for(rnd)
        segs = [(1000 + j, 0, 7) for j in range(n)]
        op = OP_READ if i % 2 else OP_WRITE
        enc.rw(front.view, front.claim_request_slot(), op, i, i * 88, segs)
    front.push_requests()
    return mem, front


def bench_take(abi: Abi, nsegs_for, batches: int, repeat: int) -> list[float]:
    mem, front = make_ring(abi, nsegs_for)
    view = memoryview(mem)
    intake = RequestIntake(abi, LIMITS)
    back = BackRing(view, abi, 0)
    # Check once that the batch really is what we think it is.
    got = intake.take(back, BATCH)
    assert len(got) == BATCH and not any(type(r) is Rejection for r in got), got[:3]
    results = []
    for _ in range(repeat):
        t0 = _clock()
        for _ in range(batches):
            # Re-offer the same 32 requests: rewind the backend's private
            # index and the shared indices (what an endless frontend would do).
            back.req_cons = back.rsp_prod_pvt = 0
            intake.take(back, BATCH)
        t1 = _clock()
        results.append((t1 - t0) / (batches * BATCH))
    return results


def bench_parse(abi: Abi, nsegs_for, batches: int, repeat: int) -> list[float]:
    mem, front = make_ring(abi, nsegs_for)
    back = BackRing(memoryview(mem), abi, 0)
    raw, n = back.take_slots(BATCH)
    intake = RequestIntake(abi, LIMITS)
    parse = intake.parse
    results = []
    for _ in range(repeat):
        t0 = _clock()
        for _ in range(batches):
            parse(raw, n)
        t1 = _clock()
        results.append((t1 - t0) / (batches * BATCH))
    return results


def bench_responses(abi: Abi, batches: int, repeat: int) -> list[float]:
    mem, front = make_ring(abi, lambda r: 1)
    back = BackRing(memoryview(mem), abi, 0)
    results = []
    for _ in range(repeat):
        t0 = _clock()
        for _ in range(batches):
            back.req_cons = BATCH
            back.rsp_prod_pvt = 0
            put = back.put_response
            for i in range(BATCH):
                put(i, OP_READ, RSP_OKAY)
            back.push_responses()
        t1 = _clock()
        results.append((t1 - t0) / (batches * BATCH))
    return results


def bench_indirect(abi: Abi, nseg: int, batches: int, repeat: int) -> list[float]:
    """decode_indirect_segments for one indirect request of nseg segments."""
    from xenblk_vhost.blkif.constants import OP_INDIRECT
    from xenblk_vhost.blkif.encode import encode_segments
    from xenblk_vhost.blkif.request import IndirectRequest

    intake = RequestIntake(abi, LIMITS)
    header = IndirectRequest(OP_INDIRECT, OP_READ, 1, 0, 0, nseg, tuple(range((nseg + 511) // 512)))
    pages = encode_segments([(2000 + i, 0, 7) for i in range(nseg)])
    assert type(intake.decode_indirect_segments(header, pages)) is not Rejection
    decode = intake.decode_indirect_segments
    n = max(1, batches // 8)
    results = []
    for _ in range(repeat):
        t0 = _clock()
        for _ in range(n):
            decode(header, pages)
        t1 = _clock()
        results.append((t1 - t0) / n)
    return results


def calibrate(batches: int, repeat: int) -> list[float]:
    """One precompiled Struct.unpack_from of a 24-byte header: the unit that
    docs/LIBBLKIO-NOTES section 5 quotes (85 ns on a quiet machine), so runs
    on busier machines can be compared."""
    import struct

    hdr = struct.Struct("<BBH4xQQ").unpack_from
    buf = bytes(112 * BATCH)
    results = []
    for _ in range(repeat):
        t0 = _clock()
        for _ in range(batches):
            for off in range(0, 112 * BATCH, 112):
                hdr(buf, off)
        t1 = _clock()
        results.append((t1 - t0) / (batches * BATCH))
    return results


def row(label: str, results: list[float]) -> None:
    print(f"  {label:<34} min {min(results):7.0f}   median {statistics.median(results):7.0f}  ns/request")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    ap.add_argument("--batches", type=int, default=2000)
    ap.add_argument("--repeat", type=int, default=7)
    args = ap.parse_args()
    shapes = [
        ("1 segment", lambda r: 1),
        ("11 segments", lambda r: 11),
        ("random 1..11 segments", lambda r: r.randint(1, 11)),
    ]
    print(f"batch = {BATCH} requests; {args.repeat} runs x {args.batches} batches;"
          f" python {sys.version.split()[0]}")
    row("calibration: Struct.unpack_from + loop", calibrate(args.batches, args.repeat))
    for abi, name in ((Abi.NATIVE, "64-bit (native/x86_64-abi)"), (Abi.X86_32, "32-bit (x86_32-abi)")):
        print(f"{name}:")
        for label, fn in shapes:
            row(f"take+decode+validate, {label}", bench_take(abi, fn, args.batches, args.repeat))
        for label, fn in shapes:
            row(f"decode+validate, {label}", bench_parse(abi, fn, args.batches, args.repeat))
        row("response encode (+1 push/batch)", bench_responses(abi, args.batches, args.repeat))
    for nseg in (32, 256):
        row(f"indirect: {nseg} segments (per request)", bench_indirect(Abi.NATIVE, nseg, args.batches, args.repeat))


if __name__ == "__main__":
    main()
