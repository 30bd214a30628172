"""The demo's workload: timed, mixed, and every byte read back checked.

Layout of the disk:

    [0, at_rest)         written once at the start, then only read: a
                         scrubber re-reads it round and round, so data that
                         changes at rest (on the storage, behind everyone's
                         back) is caught while the run goes on
    [at_rest, end)       cut into `depth` lanes, one task each, one request
                         in flight per lane: each lane's expected content is
                         known exactly while `depth` requests are in flight

Each lane picks an operation (read, write, flush, barrier, discard: those
the backend offered) and a request shape: single segment, multi-segment
(2..11 segments) or indirect (more than 11, when negotiated), with a
sub-page start on 512-byte-sector disks. One workload request is exactly
one ring request, so the backend's counters can be compared with ours.
A read is compared with what was written (or, with `zeroed`, a fresh
disk's zeros where nothing was written yet), sector by sector where it
matters; a discard makes its sectors unknown (zeros or old data are both
right); a failed write makes its sectors unknown too.

At the deadline (or when `stop` is set: Ctrl-C) lanes finish the request
they have in flight; then, unless stopped, every sector whose content is
known is read back and checked once more.

    report = await run_demo_workload(front, DemoWorkload(seconds=10), stop=trio.Event(),
                                     on_progress=print_it)
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import trio

from ..blkif.constants import MAX_SEGMENTS_PER_REQUEST, SECTOR_SIZE, SECTORS_PER_PAGE, VDISK_READONLY
from ..sim.blkfront_workload import pattern

OPS = ("read", "write", "flush", "barrier", "discard")
SHAPES = ("single_segment", "multi_segment", "indirect")
OP_WEIGHTS = {"read": 40, "write": 40, "flush": 6, "barrier": 2, "discard": 6}
SHAPE_WEIGHTS = {"single_segment": 40, "multi_segment": 35, "indirect": 25}
MAX_SAMPLES = 10
_AT_REST_SEED = 0x5EED


@dataclass(frozen=True)
class DemoWorkload:
    seconds: float = 10.0
    depth: int = 16
    seed: int = 1
    at_rest_sectors: int = 2048  # 1 MiB
    scrub_pause: float = 0.05  # between two at-rest reads: the scrubber stays light
    progress_interval: float = 0.5
    zeroed: bool = False  # the disk starts all zeros (a fresh sparse file): check never-written sectors too

    def __post_init__(self) -> None:
        if self.seconds <= 0 or self.depth < 1 or self.at_rest_sectors < 0:
            raise ValueError("seconds > 0, depth >= 1 and at_rest_sectors >= 0 are needed")


@dataclass
class WorkloadReport:
    ops: dict = field(default_factory=lambda: dict.fromkeys(OPS, 0))
    shapes: dict = field(default_factory=lambda: dict.fromkeys(SHAPES, 0))
    failed: dict = field(default_factory=lambda: dict.fromkeys(OPS, 0))
    # Every ring request sent, by operation, the at-rest writes, scrub and
    # final reads included: what the backend's counters must agree with.
    ring_requests: dict = field(default_factory=lambda: dict.fromkeys(OPS, 0))
    bytes_read: int = 0
    bytes_written: int = 0
    sectors_verified: int = 0
    mismatches: int = 0
    mismatch_samples: list = field(default_factory=list)
    errors: int = 0
    error_samples: list = field(default_factory=list)
    elapsed_s: float = 0.0  # the timed phase
    # Ring requests and bytes of the timed phase alone (rates are computed
    # from these; the at-rest setup and the final read-back are not in them).
    timed_requests: int = 0
    timed_bytes: int = 0
    final_verify_s: float = 0.0
    final_verify_sectors: int = 0
    scrub_passes: int = 0
    interrupted: bool = False
    at_rest: tuple = (0, 0)  # (first sector, sectors)

    @property
    def requests(self) -> int:
        return sum(self.ops.values())

    @property
    def ok(self) -> bool:
        return not self.mismatches and not self.errors

    def as_dict(self) -> dict:
        out = asdict(self)
        out["requests"] = self.requests
        out["bytes_verified"] = self.sectors_verified * SECTOR_SIZE
        out["ok"] = self.ok
        return out

    def error(self, text: str) -> None:
        self.errors += 1
        if len(self.error_samples) < MAX_SAMPLES:
            self.error_samples.append(text)


class ExpectedContent:
    """What a run of sectors must contain where it is known."""

    def __init__(self, start: int, length: int, where: str) -> None:
        self.start = start
        self.length = length
        self.where = where
        self.expected = bytearray(length * SECTOR_SIZE)
        self.known = bytearray(length)  # 1 where `expected` is authoritative

    def record(self, sector: int, data: bytes) -> None:
        rel = sector - self.start
        self.expected[rel * SECTOR_SIZE:rel * SECTOR_SIZE + len(data)] = data
        n = len(data) // SECTOR_SIZE
        self.known[rel:rel + n] = b"\1" * n

    def know_zeros(self) -> None:
        """A fresh disk: every sector is known to read as zeros."""
        self.known[:] = b"\1" * self.length

    def forget(self, sector: int, nr_sectors: int) -> None:
        rel = sector - self.start
        self.known[rel:rel + nr_sectors] = bytes(nr_sectors)

    def any_known(self, sector: int, nr_sectors: int) -> bool:
        rel = sector - self.start
        return self.known.find(1, rel, rel + nr_sectors) >= 0

    def check(self, sector: int, data: bytes, report: WorkloadReport) -> int:
        """Compare `data` read at `sector`; the sectors verified (mismatches go to the report)."""
        rel = sector - self.start
        n = len(data) // SECTOR_SIZE
        known = self.known[rel:rel + n]
        base = rel * SECTOR_SIZE
        if known.count(1) == n and data == self.expected[base:base + len(data)]:
            report.sectors_verified += n  # the common case: one comparison
            return n
        verified = 0
        for i in range(n):
            if not known[i]:
                continue
            want = self.expected[base + i * SECTOR_SIZE:base + (i + 1) * SECTOR_SIZE]
            got = data[i * SECTOR_SIZE:(i + 1) * SECTOR_SIZE]
            if got == want:
                verified += 1
                continue
            report.mismatches += 1
            if len(report.mismatch_samples) < MAX_SAMPLES:
                report.mismatch_samples.append({"sector": sector + i, "where": self.where,
                                                "expected": bytes(want[:16]).hex(), "got": bytes(got[:16]).hex()})
        report.sectors_verified += verified
        return verified


@dataclass(frozen=True)
class Plan:
    """What the negotiation allows: operations, shapes, sizes, layout."""

    ops: tuple
    op_weights: tuple
    shapes: tuple
    shape_weights: tuple
    max_segments: int  # per request (indirect if > 11)
    align: int  # logical block, in sectors
    at_rest: ExpectedContent
    lanes: tuple


def plan_for(front, workload: DemoWorkload) -> Plan:
    neg = front.negotiated
    readonly = bool(front.disk.info & VDISK_READONLY)
    if readonly:
        raise ValueError("the demo needs a writable disk")
    offered = {"read": True, "write": True, "flush": neg.feature_flush, "barrier": True,
               "discard": neg.feature_discard}
    ops = tuple(op for op in OPS if offered[op])
    max_segments = neg.segments_per_request
    shapes = tuple(s for s in SHAPES if s != "indirect" or max_segments > MAX_SEGMENTS_PER_REQUEST)
    align = max(1, front.disk.sector_size // SECTOR_SIZE)
    page_align = max(align, SECTORS_PER_PAGE)
    at_rest_len = min(workload.at_rest_sectors, front.sectors // 4) // page_align * page_align
    at_rest = ExpectedContent(0, at_rest_len, "at-rest")
    lane_len = (front.sectors - at_rest_len) // workload.depth // page_align * page_align
    if lane_len < max_segments * SECTORS_PER_PAGE:
        raise ValueError(f"a disk of {front.sectors} sectors is too small for {workload.depth} lanes of "
                         f"{max_segments}-segment requests")
    lanes = tuple(ExpectedContent(at_rest_len + i * lane_len, lane_len, f"lane {i}")
                  for i in range(workload.depth))
    return Plan(ops, tuple(OP_WEIGHTS[o] for o in ops), shapes, tuple(SHAPE_WEIGHTS[s] for s in shapes),
                max_segments, align, at_rest, lanes)


def request_shape(rng: random.Random, plan: Plan, shape: str) -> tuple[int, int]:
    """(nr_sectors, first_sect) of a request with exactly this shape's segment count."""
    if shape == "single_segment":
        segments = 1
    elif shape == "multi_segment":
        segments = rng.randint(2, MAX_SEGMENTS_PER_REQUEST)
    else:
        segments = rng.randint(MAX_SEGMENTS_PER_REQUEST + 1, plan.max_segments)
    first_sect = rng.randrange(SECTORS_PER_PAGE) if plan.align == 1 else 0
    # The fewest and most sectors that need exactly `segments` pages from first_sect.
    lo = max(1, (segments - 1) * SECTORS_PER_PAGE - first_sect + 1)
    hi = segments * SECTORS_PER_PAGE - first_sect
    nr = -(-rng.randint(lo, hi) // plan.align) * plan.align
    return nr, first_sect


def segments_of(nr_sectors: int, first_sect: int) -> int:
    return -(-(first_sect + nr_sectors) // SECTORS_PER_PAGE)


def shape_of(nr_sectors: int, first_sect: int) -> str:
    n = segments_of(nr_sectors, first_sect)
    if n == 1:
        return "single_segment"
    return "multi_segment" if n <= MAX_SEGMENTS_PER_REQUEST else "indirect"


async def _write_at_rest(front, plan: Plan, seed: int, report: WorkloadReport) -> None:
    region = plan.at_rest
    chunk = plan.max_segments * SECTORS_PER_PAGE
    for number, sector in enumerate(range(region.start, region.start + region.length, chunk)):
        nr = min(chunk, region.start + region.length - sector)
        data = pattern(seed ^ _AT_REST_SEED, number, nr * SECTOR_SIZE)
        report.ring_requests["write"] += 1
        await front.write(sector, data)
        region.record(sector, data)
        report.bytes_written += len(data)


async def _read_and_check(front, region: ExpectedContent, sector: int, nr: int, report: WorkloadReport,
                          what: str) -> int:
    report.ring_requests["read"] += 1
    try:
        data = await front.read(sector, nr)
    except Exception as exc:  # a failed request is a result, not a crash
        report.error(f"{what} read sector {sector} x{nr}: {exc!r}")
        return 0
    report.bytes_read += len(data)
    return region.check(sector, data, report)


async def run_demo_workload(front, workload: DemoWorkload, *, stop: trio.Event,
                            on_progress: Callable[[WorkloadReport], None] | None = None) -> WorkloadReport:
    report = WorkloadReport()
    plan = plan_for(front, workload)
    report.at_rest = (plan.at_rest.start, plan.at_rest.length)
    if workload.zeroed:
        for region in plan.lanes:
            region.know_zeros()
    if plan.at_rest.length:
        await _write_at_rest(front, plan, workload.seed, report)
    deadline = trio.current_time() + workload.seconds
    numbers = iter(range(1, 1 << 62))

    def running() -> bool:
        return not stop.is_set() and trio.current_time() < deadline

    async def lane(lane_no: int, region: ExpectedContent) -> None:
        rng = random.Random(workload.seed * 1_000_003 + lane_no)
        while running():
            op = rng.choices(plan.ops, plan.op_weights)[0]
            await _one(front, plan, rng, region, op, workload.seed, next(numbers), report)

    async def scrubber() -> None:
        region = plan.at_rest
        chunk = plan.max_segments * SECTORS_PER_PAGE
        while running():
            for sector in range(region.start, region.start + region.length, chunk):
                if not running():
                    return
                nr = min(chunk, region.start + region.length - sector)
                await _read_and_check(front, region, sector, nr, report, "at-rest scrub")
                await trio.sleep(workload.scrub_pause)
            report.scrub_passes += 1

    timed_phase = True
    base_requests = sum(report.ring_requests.values())
    base_bytes = report.bytes_read + report.bytes_written

    def account_timed() -> None:
        report.elapsed_s = time.perf_counter() - start
        report.timed_requests = sum(report.ring_requests.values()) - base_requests
        report.timed_bytes = report.bytes_read + report.bytes_written - base_bytes

    async def ticker(cancel: trio.CancelScope, on_progress: Callable[[WorkloadReport], None]) -> None:
        with cancel:
            while True:
                await trio.sleep(workload.progress_interval)
                if timed_phase:
                    account_timed()
                on_progress(report)

    start = time.perf_counter()
    tick = trio.CancelScope()
    async with trio.open_nursery() as outer:
        if on_progress is not None:
            outer.start_soon(ticker, tick, on_progress)
        async with trio.open_nursery() as nursery:
            for lane_no, region in enumerate(plan.lanes):
                nursery.start_soon(lane, lane_no, region)
            if plan.at_rest.length:
                nursery.start_soon(scrubber)
        account_timed()
        timed_phase = False
        report.interrupted = stop.is_set()
        if not report.interrupted:
            verify_start = time.perf_counter()
            await _final_verify(front, plan, report, stop)
            report.final_verify_s = time.perf_counter() - verify_start
            report.interrupted = stop.is_set()
        tick.cancel()
    if on_progress is not None:
        on_progress(report)
    return report


async def _final_verify(front, plan: Plan, report: WorkloadReport, stop: trio.Event) -> None:
    """Read back every sector whose content is known, each region by its own task."""
    chunk = plan.max_segments * SECTORS_PER_PAGE

    async def verify(region: ExpectedContent) -> None:
        for sector in range(region.start, region.start + region.length, chunk):
            if stop.is_set():
                return
            nr = min(chunk, region.start + region.length - sector)
            if region.any_known(sector, nr):
                report.final_verify_sectors += await _read_and_check(front, region, sector, nr, report,
                                                                     "final verify")

    async with trio.open_nursery() as nursery:
        for region in (plan.at_rest, *plan.lanes):
            if region.length:
                nursery.start_soon(verify, region)


async def _one(front, plan: Plan, rng: random.Random, region: ExpectedContent, op: str, seed: int,
               number: int, report: WorkloadReport) -> None:
    nr = first_sect = 0
    if op in ("read", "write", "barrier"):
        shapes = plan.shapes if op != "barrier" else tuple(s for s in plan.shapes if s != "indirect")
        weights = tuple(SHAPE_WEIGHTS[s] for s in shapes)
        nr, first_sect = request_shape(rng, plan, rng.choices(shapes, weights)[0])
    elif op == "discard":
        nr = rng.randint(1, plan.max_segments * SECTORS_PER_PAGE) // plan.align * plan.align or plan.align
    sector = region.start
    if nr:
        sector += rng.randrange(0, (region.length - nr) // plan.align + 1) * plan.align
    report.ring_requests[op] += 1
    try:
        if op == "read":
            data = await front.read(sector, nr, first_sect=first_sect)
            report.bytes_read += len(data)
            region.check(sector, data, report)
        elif op in ("write", "barrier"):
            data = pattern(seed, number, nr * SECTOR_SIZE)
            # Unknown until answered: a failed write may have written part of it.
            region.forget(sector, nr)
            if op == "write":
                await front.write(sector, data, first_sect=first_sect)
            else:
                await front.write_barrier(sector, data, first_sect=first_sect)
            region.record(sector, data)
            report.bytes_written += len(data)
        elif op == "flush":
            await front.flush()
        else:
            region.forget(sector, nr)  # whatever the outcome, the content is no longer known
            await front.discard(sector, nr)
    except Exception as exc:  # a failed request is a result, not a crash
        report.failed[op] += 1
        report.error(f"{op} sector {sector} x{nr}: {exc!r}")
    report.ops[op] += 1
    if nr and op != "discard":
        report.shapes[shape_of(nr, first_sect)] += 1
