"""The bounded pool of in-flight requests of one ring (blkback's pending_req pool).

A ring owns max_inflight Slot objects, made once; a request taken from the
shared ring borrows one until its response is written, so the hot path
allocates no per-request state. The slot index is the libblkio tag of every
storage request made for it (a request split in parts has several storage
requests with the same tag, counted in `parts`).

The ring worker takes and returns slots inline (`pool.slots[pool.free.pop()]`,
`pool.free.append(index)`: no call per request); Slot.load() sets a
request's own fields (req_id, op, sector, nr_bytes, segments, writes, steps,
taken_at), or, for the copy path's lane, RingWorker._dispatch_plain inline
and RingWorker._materialise (a batch the lane held in C: copy_lane.py, whose
slots keep a free slot's fields until a rare path needs them). A returned
slot has step 0, parts 0,
status OKAY, done None, in_storage False; the data paths keep their own
fields right (extents and buffer are set before every use; large and
mapping are cleared when released).

Fields a data path fills:
  extents   ((address, length), ...): where the data is in our address space
            (one bounce buffer on the copy path; grant-mapped pages on the map path)
  buffer    copy path: offset of its bounce buffer in the region; `large`
            says it came from the shared pool of large buffers
  mapping   map path: what to release when the request is finished
"""

from __future__ import annotations

from typing import Any

import trio

from ...blkif.constants import RSP_OKAY
from ...blkif.request import Segments

# What a slot asks of the storage, in order (a flush/barrier can take several steps).
STEP_READ = 0
STEP_WRITE = 1
STEP_FLUSH = 2
STEP_DISCARD = 3
STEP_WRITE_ZEROES = 4


class Slot:
    __slots__ = (
        "index", "req_id", "op", "sector", "nr_bytes", "segments", "writes",
        "steps", "step", "parts", "status", "extents", "buffer", "large", "mapping",
        "done", "in_storage", "taken_at", "jref", "lane",
    )

    def __init__(self, index: int) -> None:
        self.index = index
        self.req_id = 0
        self.op = 0  # the operation echoed in the response
        self.sector = 0
        self.nr_bytes = 0
        self.segments: Segments = ()  # ((gref, first_sect, last_sect), ...), or an indirect request's WireSegments
        self.writes = False  # data flows guest -> storage
        self.steps: tuple[int, ...] = ()  # STEP_* to run, in order
        self.step = 0  # index into steps
        self.parts = 0  # storage requests of the current step still outstanding
        self.status = RSP_OKAY
        self.extents: tuple[tuple[int, int], ...] = ()
        self.buffer = -1
        self.large = False
        self.mapping: Any = None  # the map path's: a shared batch mapping, or what a persistent slot holds
        self.done: trio.Event | None = None  # set when someone waits for this slot (a barrier)
        self.in_storage = False
        self.taken_at = 0.0  # time.monotonic() of the batch that took it off the ring
        self.jref = -1  # the request's ref in the ring's journal (journal.py), -1 without one
        self.lane = False  # a plain request kept in the copy path's compiled lane too (copy_lane.py)

    def load(self, req_id: int, op: int, sector: int, nr_bytes: int, segments: Segments, writes: bool,
             steps: tuple[int, ...], taken_at: float) -> None:
        """Give this (free) slot a request: the only place a request's fields are set."""
        self.req_id = req_id
        self.op = op
        self.sector = sector
        self.nr_bytes = nr_bytes
        self.segments = segments
        self.writes = writes
        self.steps = steps
        self.taken_at = taken_at
        self.lane = False  # the ring worker puts it on the lane after stashing it


class SlotPool:
    """Free slots as a stack: the most recently freed (cache-warm) slot is reused first."""

    __slots__ = ("slots", "free")

    def __init__(self, size: int) -> None:
        if size < 1:
            raise ValueError("a ring needs at least one request slot")
        self.slots = [Slot(i) for i in range(size)]
        self.free = list(range(size - 1, -1, -1))  # indices of free slots

    @property
    def size(self) -> int:
        return len(self.slots)

    @property
    def available(self) -> int:
        return len(self.free)

    @property
    def busy(self) -> int:
        return len(self.slots) - len(self.free)

    def busy_slots(self) -> list[Slot]:
        free = set(self.free)
        return [s for s in self.slots if s.index not in free]
