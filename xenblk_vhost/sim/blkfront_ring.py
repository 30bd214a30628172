"""One frontend ring (a blk-mq hardware queue of xen-blkfront): issue, reap, check.

Issuing follows blkif_queue_rw_req / blkif_queue_discard_req: take a free
id, grant the pages (copying write data in), fill the slot, push, notify
if RING_PUSH_REQUESTS_AND_CHECK_NOTIFY says so. More segments than a slot
holds go INDIRECT (READ/WRITE only) when the backend offered indirect
descriptors; otherwise the caller must split (blkfront sets the block
layer's limits so it never has to).

Reaping follows blkif_interrupt: check rsp_prod for overflow; for each
response the id must name a request in flight (unknown or already answered
ids are a backend error, as is a response whose operation is not the
request's); blkif_completion copies read data out and ends foreign access
on every grant (GrantPool enforces what that means without persistent
grants); then the id is free again. RING_FINAL_CHECK_FOR_RESPONSES before
sleeping on the event channel.

A backend error disables the ring (blkfront: BLKIF_STATE_ERROR, "disabled
for further use"): every request in flight and every later one fails with
RingBroken, and the error is kept in `broken`.
"""

from __future__ import annotations

import struct
import time
from collections import deque
from dataclasses import dataclass
from typing import NamedTuple, Protocol

import trio

from ..blkif.abi import SRING, Abi, layout
from ..blkif.constants import (
    DISCARD_SECURE,
    MAX_SEGMENTS_PER_REQUEST,
    OP_DISCARD,
    OP_READ,
    OP_WRITE,
    SECTOR_SIZE,
    SECTORS_PER_PAGE,
    SEGMENTS_PER_INDIRECT_PAGE,
    U32_MASK,
)
from ..blkif.encode import RequestEncoder, encode_segments
from ..blkif.request import indirect_pages_for
from ..blkif.response import Response
from ..blkif.ring import FrontRing, RingOverflow
from .blkfront_grants import GrantedPage, GrantPool, GrantStillMapped


class Channel(Protocol):
    """The guest's end of the ring's event channel."""

    local_port: int

    def notify(self) -> None: ...

    async def wait(self) -> None: ...


class RingBroken(RuntimeError):
    """The ring was disabled after the backend broke the protocol."""


class BackendProtocolError(RuntimeError):
    """What the backend did wrong (kept as the ring's `broken` cause)."""


@dataclass(frozen=True)
class IoRequest:
    """One blkif request as the frontend means it.

    Data requests cover nr_sectors 512-byte sectors starting at
    `first_sect` inside their first page and filling whole pages after
    it. FLUSH_DISKCACHE and WRITE_BARRIER may carry no data (nr_sectors 0).
    """

    op: int
    sector: int = 0
    nr_sectors: int = 0
    data: bytes | None = None
    first_sect: int = 0
    secure: bool = False  # DISCARD only

    def segments(self) -> list[tuple[int, int]]:
        """(first_sect, last_sect) of each page the data spans."""
        out = []
        left, first = self.nr_sectors, self.first_sect
        while left > 0:
            n = min(SECTORS_PER_PAGE - first, left)
            out.append((first, first + n - 1))
            left -= n
            first = 0
        return out


class Completion(NamedTuple):
    id: int
    op: int
    status: int
    data: bytes | None  # a successful read's data


class _InFlight:
    __slots__ = ("id", "rsp_op", "pages", "segments", "indirect_pages", "read", "event",
                 "completion", "error", "position", "sector", "nr_sectors", "issued")

    def __init__(self, id_: int, rsp_op: int, pages: list[GrantedPage], segments: list[tuple[int, int]],
                 indirect_pages: list[GrantedPage], read: bool) -> None:
        self.id = id_
        # What a stall report names (outstanding()): set by _place.
        self.position = 0  # the request's ring position (req_prod index of its slot)
        self.sector = 0
        self.nr_sectors = 0
        self.issued = 0.0
        self.rsp_op = rsp_op
        self.pages = pages
        self.segments = segments
        self.indirect_pages = indirect_pages
        self.read = read
        self.event = trio.Event()
        self.completion: Completion | None = None
        self.error: BaseException | None = None


_IDX = struct.Struct("<I")


def init_shared_ring(view: memoryview, start: int) -> None:
    """SHARED_RING_INIT with the indices at `start` instead of 0 (a test
    knob; blkfront always starts at 0): producers at start, event indices
    at start + 1, the rest of the header zero."""
    view[:SRING.size] = bytes(SRING.size)
    _IDX.pack_into(view, SRING.offset("req_prod"), start & U32_MASK)
    _IDX.pack_into(view, SRING.offset("rsp_prod"), start & U32_MASK)
    _IDX.pack_into(view, SRING.offset("req_event"), (start + 1) & U32_MASK)
    _IDX.pack_into(view, SRING.offset("rsp_event"), (start + 1) & U32_MASK)


@dataclass
class RingStats:
    requests: int = 0
    indirect: int = 0
    notifies: int = 0
    wakeups: int = 0
    responses: int = 0
    max_in_flight: int = 0


class FrontendRing:
    def __init__(self, index: int, view: memoryview, abi: Abi, order: int, channel: Channel,
                 pool: GrantPool, *, handle: int, max_indirect_segments: int) -> None:
        self.index = index
        # The shared header was initialised (init_shared_ring) before the
        # backend was told about the ring; pick up the indices from it.
        self.ring = FrontRing(view, abi, order, init=False)
        self.abi = abi
        self.channel = channel
        self.pool = pool
        self.handle = handle
        self.max_indirect_segments = max_indirect_segments
        self.encoder = RequestEncoder(abi)
        self.entry_size = layout(abi).entry_size
        self.size = self.ring.size
        self._free_ids: deque[int] = deque(range(self.size))
        self._slots = trio.Semaphore(self.size)
        self._in_flight: dict[int, _InFlight] = {}
        self.broken: BaseException | None = None
        self.stats = RingStats()

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    def summary(self) -> dict:
        """Counters for reports: traffic, where the indices are, grant use."""
        return vars(self.stats) | {
            "size": self.size,
            "req_prod": self.ring.req_prod_pvt,
            "rsp_cons": self.ring.rsp_cons,
            "grants_issued": self.pool.grants_issued,
            "pages": self.pool.created,
            "persistent_grants": self.pool.persistent_count,
        }

    def outstanding(self) -> dict:
        """The requests in flight, oldest first, and the shared indices: what a stalled
        workload reports so that the stall can be traced (by ring position) to the backend."""
        now = time.monotonic()
        ring = self.ring
        return {"ring": self.index, "req_prod_pvt": ring.req_prod_pvt, "req_prod": ring.req_prod,
                "rsp_prod": ring.rsp_prod, "rsp_cons": ring.rsp_cons, "req_event": ring.req_event,
                "rsp_event": ring.rsp_event, "broken": None if self.broken is None else str(self.broken),
                "requests": [{"id": e.id, "op": e.rsp_op, "sector": e.sector, "nr_sectors": e.nr_sectors,
                              "position": e.position, "slot": e.position % self.size,
                              "age_s": round(now - e.issued, 3)}
                             for e in sorted(self._in_flight.values(), key=lambda e: e.issued)]}

    # ---- issuing ----------------------------------------------------------------------

    async def submit(self, req: IoRequest) -> Completion:
        """Issue one request and wait for its answer (or RingBroken)."""
        self._check_usable()
        await self._slots.acquire()
        try:
            self._check_usable()
            entry = self._place(req)
        except BaseException:
            self._slots.release()
            raise
        self.push()
        await entry.event.wait()
        if entry.error is not None:
            raise RingBroken(f"ring {self.index}: {entry.error}") from entry.error
        assert entry.completion is not None
        return entry.completion

    def _check_usable(self) -> None:
        if self.broken is not None:
            raise RingBroken(f"ring {self.index} disabled: {self.broken}") from self.broken

    def push(self) -> None:
        if self.ring.push_requests():
            self.stats.notifies += 1
            self.channel.notify()

    def _place(self, req: IoRequest) -> _InFlight:
        """Grant, fill one slot, remember it: blkif_queue_request, no await inside."""
        segs = req.segments() if req.op != OP_DISCARD else []
        indirect = len(segs) > MAX_SEGMENTS_PER_REQUEST
        if indirect:
            if req.op not in (OP_READ, OP_WRITE):
                raise ValueError(f"op {req.op} with {len(segs)} segments: only READ/WRITE go indirect")
            if len(segs) > self.max_indirect_segments:
                raise ValueError(f"{len(segs)} segments exceed the negotiated "
                                 f"{self.max_indirect_segments or MAX_SEGMENTS_PER_REQUEST}")
        writes_data = req.op != OP_READ
        if writes_data and segs and (req.data is None or len(req.data) != req.nr_sectors * SECTOR_SIZE):
            raise ValueError("write data must be exactly nr_sectors * 512 bytes")
        id_ = self._free_ids.popleft()
        pages: list[GrantedPage] = []
        indirect_pages: list[GrantedPage] = []
        try:
            granted: list[tuple[int, int, int]] = []
            pos = 0
            for first, last in segs:
                page = self.pool.get(readonly=writes_data)
                pages.append(page)
                assert page.gref is not None  # the pool hands out granted pages
                if writes_data:
                    assert req.data is not None  # a write carries its data
                    n = (last - first + 1) * SECTOR_SIZE
                    page.view[first * SECTOR_SIZE:first * SECTOR_SIZE + n] = req.data[pos:pos + n]
                    pos += n
                granted.append((page.gref, first, last))
            view = self.ring.view
            position = self.ring.req_prod_pvt  # the slot claimed below
            if indirect:
                indirect_grefs: list[int] = []
                for i in range(indirect_pages_for(len(granted))):
                    chunk = granted[i * SEGMENTS_PER_INDIRECT_PAGE:(i + 1) * SEGMENTS_PER_INDIRECT_PAGE]
                    page = self.pool.get(readonly=True)  # the backend only reads them
                    raw = encode_segments(chunk)
                    page.view[:len(raw)] = raw
                    indirect_pages.append(page)
                    assert page.gref is not None
                    indirect_grefs.append(page.gref)
                off = self.ring.claim_request_slot()
                self.encoder.indirect(view, off, req.op, id_, req.sector, len(granted),
                                      indirect_grefs, handle=self.handle)
                self.stats.indirect += 1
            elif req.op == OP_DISCARD:
                off = self.ring.claim_request_slot()
                self.encoder.discard(view, off, id_, req.sector, req.nr_sectors,
                                     flag=DISCARD_SECURE if req.secure else 0, handle=self.handle)
            else:
                off = self.ring.claim_request_slot()
                self.encoder.rw(view, off, req.op, id_, req.sector, granted, handle=self.handle)
        except BaseException:
            for page in pages + indirect_pages:
                self.pool.put(page)  # never published: the backend cannot hold them
            self._free_ids.appendleft(id_)
            raise
        entry = _InFlight(id_, req.op, pages, segs, indirect_pages, req.op == OP_READ)
        entry.position, entry.sector, entry.nr_sectors = position, req.sector, req.nr_sectors
        entry.issued = time.monotonic()
        self._in_flight[id_] = entry
        self.stats.requests += 1
        if len(self._in_flight) > self.stats.max_in_flight:
            self.stats.max_in_flight = len(self._in_flight)
        return entry

    # ---- reaping ----------------------------------------------------------------------

    async def serve(self) -> None:
        """The ring's interrupt handler, as a task: wait, drain, until broken."""
        while self.broken is None:
            await self.channel.wait()
            self.stats.wakeups += 1
            self.drain()

    def drain(self) -> None:
        """Consume every response there is, then re-arm rsp_event."""
        ring = self.ring
        while self.broken is None:
            try:
                n = ring.responses_available()
            except RingOverflow as exc:
                self.fail(BackendProtocolError(f"illegal number of responses: {exc}"))
                return
            for rsp in ring.take_responses(n):
                self._complete(rsp)
                if self.broken is not None:
                    return
            if not ring.final_check_for_responses():
                return

    def _complete(self, rsp: Response) -> None:
        self.stats.responses += 1
        if not 0 <= rsp.id < self.size:
            self.fail(BackendProtocolError(f"response has incorrect id ({rsp.id})"))
            return
        entry = self._in_flight.get(rsp.id)
        if entry is None:
            self.fail(BackendProtocolError(f"response id {rsp.id} references no pending request"))
            return
        if rsp.op != entry.rsp_op:
            self.fail(BackendProtocolError(
                f"response has wrong operation ({rsp.op} instead of {entry.rsp_op})"))
            return
        del self._in_flight[rsp.id]
        data = None
        if entry.read and rsp.status == 0:
            data = b"".join(bytes(p.view[first * SECTOR_SIZE:(last + 1) * SECTOR_SIZE])
                            for p, (first, last) in zip(entry.pages, entry.segments))
        try:
            for page in entry.pages + entry.indirect_pages:
                self.pool.put(page)
        except GrantStillMapped as exc:
            entry.error = exc
            entry.event.set()
            self.fail(BackendProtocolError(str(exc)))
            return
        self._free_ids.append(rsp.id)
        self._slots.release()
        entry.completion = Completion(rsp.id, rsp.op, rsp.status, data)
        entry.event.set()

    def fail(self, error: BaseException) -> None:
        """Disable the ring: every request in flight fails with `error`."""
        if self.broken is None:
            self.broken = error
        for entry in self._in_flight.values():
            if not entry.event.is_set():
                entry.error = error
                entry.event.set()

    def abandon_in_flight(self) -> tuple[int, list[GrantStillMapped]]:
        """Teardown: forget the requests never answered; take their pages
        back. Returns how many there were and the grants still mapped."""
        count = len(self._in_flight)
        errors = []
        for entry in list(self._in_flight.values()):
            for page in entry.pages + entry.indirect_pages:
                err = self.pool.forget(page)
                if err is not None:
                    errors.append(err)
        self.fail(RingBroken("the connection closed with the request in flight"))
        self._in_flight.clear()
        return count, errors

    def release(self) -> None:
        """Let go of our view of the ring pages (FrontRing keeps its own
        memoryview), so the guest's memory can be closed after teardown."""
        self.ring.view.release()

    # ---- raw access for hostile tests ---------------------------------------------------

    def resync(self) -> None:
        """After raw use: take the shared indices as they are now."""
        self.ring.req_prod_pvt = self.ring.req_prod
        self.ring.rsp_cons = self.ring.rsp_prod

