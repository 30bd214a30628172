"""A verifying block workload for the reference frontend.

The disk region is cut into `depth` disjoint lanes and one task drives each
lane with one request at a time, so every lane's expected content is known
exactly (no two in-flight requests ever touch the same sector) while
`depth` requests are in flight across the device. Writes carry a pattern
derived from the seed and the request number; reads compare every sector
whose content the lane knows; a discard makes its sectors unknown (the
backend may return zeros or the old data). Each workload request is exactly
one ring request: sizes are capped to what one request (indirect, if
negotiated) can carry.

    run_workload(front, Workload(...)) -> WorkloadResult   (.as_dict() for JSON)
    write_pattern(front, sector, n, seed) / check_pattern(...) -> bad sectors
"""

from __future__ import annotations

import os
import random
import time
from dataclasses import asdict, dataclass, field

import trio

from ..blkif.constants import MAX_SEGMENTS_PER_REQUEST, SECTOR_SIZE, SECTORS_PER_PAGE, VDISK_READONLY

OPS = ("write", "read", "flush", "barrier", "discard")
PLAIN_REQUEST_SECTORS = MAX_SEGMENTS_PER_REQUEST * SECTORS_PER_PAGE


@dataclass(frozen=True)
class Workload:
    requests: int = 1000
    depth: int = 16
    # Relative weights; ops the backend did not offer get none.
    mix: tuple[tuple[str, int], ...] = (("write", 45), ("read", 45), ("flush", 4),
                                        ("barrier", 2), ("discard", 4))
    max_sectors: int = 64
    region_sectors: int = 0  # 0: the whole disk
    seed: int = 1
    final_verify: bool = True  # read every lane back at the end
    seconds: float = 0.0  # > 0: stop issuing after this long (or `requests`, whichever comes first)
    stop_file: str = ""  # stop issuing once this file exists (a benchmark's "that will do")
    # > 0: a stretch this long with requests in flight and none answered ends the workload as
    # failed, with what was outstanding (WorkloadResult.stall) instead of hanging until the caller's
    # timeout: which request ids the backend never answered, where they sit on the ring.
    stall_s: float = 0.0

    def __post_init__(self) -> None:
        unknown = {op for op, _ in self.mix} - set(OPS)
        if unknown:
            raise ValueError(f"unknown ops in mix: {sorted(unknown)}")
        if self.requests < 0 or self.depth < 1 or self.max_sectors < 1 or self.seconds < 0 or self.stall_s < 0:
            raise ValueError("requests >= 0, depth >= 1, max_sectors >= 1, seconds >= 0 and stall_s >= 0 "
                             "are needed")


@dataclass
class WorkloadResult:
    ok: bool = True
    requests: int = 0
    by_op: dict = field(default_factory=lambda: {op: 0 for op in OPS})
    failed: dict = field(default_factory=dict)  # op -> count of non-OK answers
    bytes_written: int = 0
    bytes_read: int = 0
    sectors_verified: int = 0
    mismatches: list = field(default_factory=list)  # first few, as dicts
    errors: list = field(default_factory=list)  # exceptions, as strings
    elapsed_s: float = 0.0
    final_verify_sectors: int = 0
    # The guest's view of a backend pause: the longest stretches with requests in flight and
    # none answered, longest first, {"start": wall clock (time.time()), "seconds": ...}.
    pauses: list = field(default_factory=list)
    # Each request's time from issue to answer (the final verify not counted):
    # what a guest sharing the backend with a hostile one is measured by.
    max_latency_s: float = 0.0
    total_latency_s: float = 0.0
    # Workload.stall_s ran out: {"seconds": the stretch, "rings": front.outstanding()} (the requests
    # never answered: id, op, sector, ring position and slot, age), the workload abandoned.
    stall: dict | None = None

    def as_dict(self) -> dict:
        return asdict(self)


_MAX_REPORTED = 10
_PAUSES_REPORTED = 200  # every restart of a benchmark or a test, even among a loaded machine's own stalls


class _PauseMeter:
    """The longest gaps between two answers while the workload runs (every lane has a request
    in flight then, so a gap is a stretch where the backend answered nothing)."""

    def __init__(self) -> None:
        self._last = time.time()
        self.in_flight = 0  # requests issued and not answered (a stall is a gap with some)
        self._quiet_since = time.monotonic()  # the last answer, or the first issue after none in flight
        self.longest: list[tuple[float, float]] = []  # (seconds, start), kept sorted, longest first

    def issuing(self) -> None:
        if not self.in_flight:
            self._quiet_since = time.monotonic()
        self.in_flight += 1

    def quiet_until_now(self) -> None:
        """An answer that is not counted among the pauses (the final read-back's)."""
        self._quiet_since = time.monotonic()

    def answered(self) -> None:
        self._quiet_since = time.monotonic()
        now = time.time()
        gap, start, self._last = now - self._last, self._last, now
        if len(self.longest) < _PAUSES_REPORTED or gap > self.longest[-1][0]:
            self.longest.append((gap, start))
            self.longest.sort(reverse=True)
            del self.longest[_PAUSES_REPORTED:]

    def report(self) -> list[dict]:
        return [{"start": start, "seconds": gap} for gap, start in self.longest]

    def silent_for(self) -> float:
        """How long requests have been in flight with none answered (0 when none is in flight)."""
        return time.monotonic() - self._quiet_since if self.in_flight else 0.0


class _Lane:
    """One lane's region and the content the backend must return for it."""

    def __init__(self, start: int, length: int) -> None:
        self.start = start
        self.length = length
        self.expected = bytearray(length * SECTOR_SIZE)
        self.known = bytearray(length)  # 1 where `expected` is authoritative

    def record_write(self, sector: int, data: bytes) -> None:
        rel = sector - self.start
        self.expected[rel * SECTOR_SIZE:rel * SECTOR_SIZE + len(data)] = data
        n = len(data) // SECTOR_SIZE
        self.known[rel:rel + n] = b"\1" * n

    def forget(self, sector: int, nr_sectors: int) -> None:
        rel = sector - self.start
        self.known[rel:rel + nr_sectors] = bytes(nr_sectors)

    def check(self, sector: int, data: bytes, result: WorkloadResult) -> None:
        rel = sector - self.start
        for i in range(len(data) // SECTOR_SIZE):
            if not self.known[rel + i]:
                continue
            want = self.expected[(rel + i) * SECTOR_SIZE:(rel + i + 1) * SECTOR_SIZE]
            got = data[i * SECTOR_SIZE:(i + 1) * SECTOR_SIZE]
            if got != want:
                result.ok = False
                if len(result.mismatches) < _MAX_REPORTED:
                    result.mismatches.append({"sector": sector + i, "expected": bytes(want[:16]).hex(),
                                              "got": bytes(got[:16]).hex()})
            else:
                result.sectors_verified += 1


def _weights(workload: Workload, front) -> tuple[list[str], list[int]]:
    neg = front.negotiated
    readonly = bool(front.disk.info & VDISK_READONLY)
    allowed = {
        "write": not readonly,
        "read": True,
        "flush": neg.feature_flush,
        "barrier": neg.feature_barrier and not readonly,
        "discard": neg.feature_discard and not readonly,
    }
    ops = [op for op, w in workload.mix if w > 0 and allowed[op]]
    return ops, [w for op, w in workload.mix if w > 0 and allowed[op]]


async def run_workload(front, workload: Workload) -> WorkloadResult:
    """Drive `front` (a connected Blkfront) and verify what it reads back."""
    result = WorkloadResult()
    align = max(1, front.disk.sector_size // SECTOR_SIZE)
    region = workload.region_sectors or front.sectors
    region = min(region, front.sectors)
    lane_len = (region // workload.depth) // align * align
    if lane_len < align:
        raise ValueError(f"a {region}-sector region cannot hold {workload.depth} lanes")
    lanes = [_Lane(i * lane_len, lane_len) for i in range(workload.depth)]
    ops, weights = _weights(workload, front)
    if not ops:
        raise ValueError("the backend offers none of the requested operations")
    # The biggest single request: the negotiated segments, minus a page of
    # slack for a sub-page start, in whole logical blocks.
    per_request = front.negotiated.segments_per_request * SECTORS_PER_PAGE
    max_sectors = max(align, min(workload.max_sectors, per_request - SECTORS_PER_PAGE, lane_len)
                      // align * align)
    counter = iter(range(workload.requests))
    meter = _PauseMeter()
    deadline = time.perf_counter() + workload.seconds if workload.seconds else None

    async def drive(lane_no: int, lane: _Lane) -> None:
        rng = random.Random(workload.seed * 1_000_003 + lane_no)
        for number in counter:
            if deadline is not None and time.perf_counter() >= deadline:
                break
            if workload.stop_file and number % 64 == 0 and os.path.exists(workload.stop_file):
                break
            op = rng.choices(ops, weights)[0]
            nr = rng.randrange(align, max_sectors + 1, align)
            sector = lane.start + rng.randrange(0, lane.length - nr + 1, align)
            # A sub-page start in the first segment when 512-byte blocks allow it.
            first_sect = rng.randrange(0, SECTORS_PER_PAGE) if align == 1 else 0
            # A barrier carries its data in the slot (never indirect).
            limit = PLAIN_REQUEST_SECTORS if op == "barrier" else per_request
            if first_sect + nr > limit:
                first_sect = 0
                nr = min(nr, limit // align * align)
            issued = time.perf_counter()
            meter.issuing()
            try:
                await _one(front, lane, op, sector, nr, first_sect, number, workload.seed, result)
            except Exception as exc:  # a failed request is a result, not a crash
                result.ok = False
                if len(result.errors) < _MAX_REPORTED:
                    result.errors.append(f"{op} sector {sector} x{nr}: {exc!r}")
            finally:
                meter.in_flight -= 1
            meter.answered()
            latency = time.perf_counter() - issued
            result.total_latency_s += latency
            result.max_latency_s = max(result.max_latency_s, latency)
            result.requests += 1
            result.by_op[op] += 1

    async def watch_for_stall(cancel: trio.CancelScope) -> None:
        while True:
            await trio.sleep(min(1.0, workload.stall_s / 4))
            silent = meter.silent_for()
            if silent >= workload.stall_s:
                outstanding: list[dict] = getattr(front, "outstanding", lambda: [])()
                result.stall = {"seconds": round(silent, 3), "rings": outstanding}
                result.ok = False
                result.errors.append(f"stalled: {silent:.1f} s with requests in flight and none answered: "
                                     + "; ".join(f"ring {r['ring']}: ids "
                                                 + ",".join(str(q["id"]) for q in r["requests"])
                                                 for r in outstanding if r["requests"]))
                cancel.cancel()
                return

    start = time.perf_counter()
    work = trio.CancelScope()  # the lanes and the final read-back; a stall cancels it
    async with trio.open_nursery() as watch:
        if workload.stall_s:
            watch.start_soon(watch_for_stall, work)
        with work:
            async with trio.open_nursery() as nursery:
                for lane_no, lane in enumerate(lanes):
                    nursery.start_soon(drive, lane_no, lane)
            result.elapsed_s = time.perf_counter() - start
            result.pauses = meter.report()
            if workload.final_verify:
                await _final_verify(front, lanes, max_sectors, meter, result)
        watch.cancel_scope.cancel()  # done (or abandoned): so is the watch
    if not result.elapsed_s:  # stalled before the lanes were done
        result.elapsed_s = time.perf_counter() - start
        result.pauses = meter.report()
    return result


async def _final_verify(front, lanes: list[_Lane], max_sectors: int, meter: _PauseMeter,
                        result: WorkloadResult) -> None:
    """Read every lane back (one request at a time, watched for a stall as the lanes were)."""
    for lane in lanes:
        for sector in range(lane.start, lane.start + lane.length, max_sectors):
            nr = min(max_sectors, lane.start + lane.length - sector)
            meter.issuing()
            try:
                data = await front.read(sector, nr)
            except Exception as exc:
                result.ok = False
                result.errors.append(f"final read sector {sector} x{nr}: {exc!r}")
                continue
            finally:
                meter.in_flight -= 1
                meter.quiet_until_now()
            before = result.sectors_verified
            lane.check(sector, data, result)
            result.final_verify_sectors += result.sectors_verified - before


def pattern(seed: int, number: int, nbytes: int) -> bytes:
    """Write data no two requests share: a PRNG stream keyed by (seed, number)."""
    return random.Random((seed << 32) ^ number).randbytes(nbytes)


async def write_pattern(front, sector: int, nr_sectors: int, seed: int, **io) -> bytes:
    """Write pattern(seed, sector) over the sectors; return what was written."""
    data = pattern(seed, sector, nr_sectors * SECTOR_SIZE)
    await front.write(sector, data, **io)
    return data


async def check_pattern(front, sector: int, nr_sectors: int, seed: int, **io) -> list[int]:
    """Read the sectors back; the sector numbers that differ from what
    write_pattern(seed) wrote (empty when all is well)."""
    want = pattern(seed, sector, nr_sectors * SECTOR_SIZE)
    got = await front.read(sector, nr_sectors, **io)
    return [sector + i for i in range(nr_sectors)
            if got[i * SECTOR_SIZE:(i + 1) * SECTOR_SIZE] != want[i * SECTOR_SIZE:(i + 1) * SECTOR_SIZE]]


async def _one(front, lane: _Lane, op: str, sector: int, nr: int, first_sect: int,
               number: int, seed: int, result: WorkloadResult) -> None:
    if op == "write":
        data = pattern(seed, number, nr * SECTOR_SIZE)
        await front.write(sector, data, first_sect=first_sect)
        lane.record_write(sector, data)
        result.bytes_written += len(data)
    elif op == "read":
        data = await front.read(sector, nr, first_sect=first_sect)
        result.bytes_read += len(data)
        lane.check(sector, data, result)
    elif op == "flush":
        await front.flush()
    elif op == "barrier":
        data = pattern(seed, number, nr * SECTOR_SIZE)
        await front.write_barrier(sector, data, first_sect=first_sect)
        lane.record_write(sector, data)
        result.bytes_written += len(data)
    elif op == "discard":
        # Forget first: whatever the outcome, the content is no longer known.
        lane.forget(sector, nr)
        await front.discard(sector, nr)
