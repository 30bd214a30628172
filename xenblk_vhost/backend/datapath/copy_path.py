"""The grant-copy data path: guest pages <-> one libblkio memory region per ring.

The only path vhost-user drivers can use (their buffers must lie in memory
shared with the server), and the one tapdisk3 and QEMU's qdisk chose. Per
batch: ONE grant copy brings every write's data in, ONE grant copy takes
every read's data out after the storage is done.

Each request's data is packed back to back in one bounce buffer (segment
after segment, whatever their offsets in the guest pages), so the storage
sees one contiguous buffer: one blkioq_read/write, no iovec, never more than
one segment for max-segments. Buffers start on 4 KiB boundaries and every
segment is a multiple of 512 bytes (of the logical block size, once
validated), so O_DIRECT's alignment holds.

Memory (the `memory` limit per ring) is split once at connect:
  * one small buffer per request slot, big enough for a non-indirect request
    (11 pages): such requests never wait for memory;
  * the rest as large buffers of max_request_bytes for big indirect requests;
    one that finds none free waits (the ring keeps serving others) until a
    large buffer is released.
plan_bounce() decides how many slots the memory allows.
"""

from __future__ import annotations

import logging
from array import array

from ...blkif.constants import MAX_SEGMENTS_PER_REQUEST, RSP_OKAY, XEN_PAGE_SIZE
from ...blkif.request import WireSegments
from ...storage import StorageDevice
from ...xen.gntdev import CopyBatch, load_compiled_packing
from ...xen.interfaces import Gntdev
from .copy_grants import CopyGrants
from .copy_lane import MIN_BATCH, CopyLane
from .grant_copy import run_batch
from .ring_engine import EngineCopier
from .slots import Slot

log = logging.getLogger(__name__)

SMALL_BUFFER = MAX_SEGMENTS_PER_REQUEST * XEN_PAGE_SIZE  # 44 KiB

# The compiled kernels loaded with the datapath's modules (the daemon imports them before a
# handover's pause), not in a guest's first grant copy.
load_compiled_packing()


def plan_bounce(memory: int, max_slots: int, max_request_bytes: int) -> tuple[int, int]:
    """(request slots, large buffers) that fit in `memory` bytes.

    Large buffers exist only if requests can exceed a small buffer; then at
    least one is kept (and at most half the memory goes to small buffers
    when that is what keeps one).
    """
    large = max_request_bytes if max_request_bytes > SMALL_BUFFER else 0
    if not large:
        return max(1, min(max_slots, memory // SMALL_BUFFER)), 0
    slots = min(max_slots, max(1, (memory - large) // SMALL_BUFFER))
    nlarge = max(1, (memory - slots * SMALL_BUFFER) // large)
    return slots, nlarge


class LargeBuffers:
    """The free large buffers' offsets in the region: a stack in fixed arrays, so that the ring engine
    (ring_engine.c) pops and pushes them too, in place: `stack` (uint32 offsets, next one last) and
    `depth` (one uint32). Never resized: their addresses are the engine's."""

    __slots__ = ("stack", "depth")

    def __init__(self, offsets: list[int]) -> None:
        self.stack = array("I", offsets or [0])
        self.depth = array("I", [len(offsets)])

    def pop(self) -> int | None:
        n = self.depth[0]
        if not n:
            return None
        n -= 1
        self.depth[0] = n
        return self.stack[n]

    def push(self, offset: int) -> None:
        n = self.depth[0]
        self.stack[n] = offset  # (each buffer is out once: never more than were made)
        self.depth[0] = n + 1

    def __len__(self) -> int:
        return self.depth[0]

    @property
    def addresses(self) -> tuple[int, int]:
        """(the stack's, the depth's) addresses."""
        return self.stack.buffer_info()[0], self.depth.buffer_info()[0]


class CopyDataPath:
    """A DataPath (data_path.py): each request's data in one bounce buffer of the ring's region."""

    uses_iovecs = False  # one contiguous buffer per request

    def __init__(self, storage: StorageDevice, gntdev: Gntdev, domid: int, *, slots: int, large_buffers: int,
                 max_request_bytes: int, grants: CopyGrants | None = None) -> None:
        self.gntdev = gntdev
        self.domid = domid
        # feature-persistent: the frontend's persistent grants mapped for the ring engine's memcpy (copy_grants.py)
        self.grants = grants
        self.keeps_grants = grants is not None
        self._large_size = max_request_bytes if large_buffers else 0
        small_total = slots * SMALL_BUFFER
        self.region = storage.alloc_mem_region(small_total + large_buffers * self._large_size)
        self._storage = storage
        self._base = self.region.addr
        self._batch = CopyBatch()  # reused by every grant copy of this ring
        self._free_large = LargeBuffers([small_total + i * self._large_size
                                         for i in range(large_buffers - 1, -1, -1)])
        # Plain requests' copies packed (and their storage requests queued) a batch at a time in C;
        # their small buffers are at index * SMALL_BUFFER, as _attach gives them. The ring engine also
        # holds indirect requests there (up to max_request_bytes: their segments in its side table).
        self.lane: CopyLane | None = CopyLane.make(slots, SMALL_BUFFER, self._base,
                                                   max_request_bytes // XEN_PAGE_SIZE)
        if self.lane is not None:
            self.lane.set_large(*self._free_large.addresses)

    def prepare(self, slots: list[Slot]) -> list[Slot]:
        """Give each data-carrying slot its buffer, then ONE grant copy of all write data in.

        Returns the slots that must wait for a large buffer (in order); a
        slot whose data could not be copied has status RSP_ERROR.
        """
        waiting: list[Slot] = []
        ready: list[Slot] = []
        base = self._base
        for slot in slots:
            if not slot.segments or slot.status != RSP_OKAY:
                continue
            if slot.lane and not waiting:  # _attach, inline: 1..11 segments always fit its small buffer
                off = slot.index * SMALL_BUFFER
                slot.buffer = off
                slot.large = False
                slot.extents = ((base + off, slot.nr_bytes),)
                ready.append(slot)
                continue
            if waiting or not self._attach(slot):
                waiting.append(slot)  # keep ring order among the waiters
            else:
                ready.append(slot)
        self._copy(ready, False)
        return waiting

    def _attach(self, slot: Slot) -> bool:
        n = slot.nr_bytes
        if n <= SMALL_BUFFER:
            off = slot.index * SMALL_BUFFER
            slot.large = False
        else:
            got = self._free_large.pop()
            if got is None:
                return False
            off = got
            slot.large = True
        slot.buffer = off
        slot.extents = ((self._base + off, n),)
        return True

    def _copy(self, slots: list[Slot], to_guest: bool) -> None:
        batch = self._batch
        batch.reset()
        add = batch.add_sector_ranges
        add_bytes = batch.add_segment_bytes
        domid = self.domid
        base = self._base
        laned: list[Slot] | None = None
        for slot in slots:
            if slot.writes == to_guest or slot.status != RSP_OKAY:
                continue
            if slot.lane:  # packed with the batch's others below, in one call
                if laned is None:
                    laned = []
                laned.append(slot)
                continue
            segments = slot.segments
            if type(segments) is WireSegments:  # an indirect request's: packed from its wire bytes, compiled
                add_bytes(to_guest, domid, segments.raw, base + slot.buffer, slot)
            else:
                add(to_guest, domid, segments, base + slot.buffer, slot)
        if laned is not None and (len(laned) < MIN_BATCH or self.lane is None
                                  or not self.lane.pack(batch, laned, to_guest, domid)):
            for slot in laned:  # a few: cheaper the reference way (the segments are on the slot too)
                add(to_guest, domid, slot.segments, base + slot.buffer, slot)
        run_batch(self.gntdev, batch)

    def finish(self, slots: list[Slot]) -> list[Slot]:
        """ONE grant copy of every successful read out; release buffers. All may be answered now."""
        self._copy(slots, True)  # (a slot that never got a buffer has failed: skipped)
        self.release_large(slots)
        return slots

    def release_large(self, slots: list[Slot]) -> None:
        """Give back the large buffers these slots hold (finish(), or a held batch prepare() redoes)."""
        for slot in slots:
            if slot.large:
                self._free_large.push(slot.buffer)
                slot.large = False

    def finish_lane(self, slots: list[Slot], completions: int, n: int) -> list[Slot] | None:
        """finish() for n storage completions (a queue's completion array at `completions`) when
        all are lane requests' successes (copy_lane.py's complete): ONE grant copy of the reads out;
        their slots, in completion order, may be answered now (a failed copy: RSP_ERROR). None: not
        all are (nothing done: the ring worker completes them the reference way, then finish())."""
        lane = self.lane
        if lane is None:
            return None
        batch = self._batch
        batch.reset()
        ready = lane.complete(batch, slots, completions, n, self.domid)
        if ready is not None:
            run_batch(self.gntdev, batch)  # (lane slots have small buffers: none to give back)
        return ready

    def prepare_held(self, idx) -> list[int] | None:
        """prepare() for a batch the lane holds (slots idx, uint16; copy_lane.py's hold): their small
        buffers are theirs by index, ONE grant copy brings the writes' data in. The slots whose copy
        failed (indices; [] when all copied), or None: the kernel refused to pack them (nothing
        copied: fill their Slots and prepare() them)."""
        lane = self.lane
        batch = self._batch
        batch.reset()
        if lane is None or not lane.pack_op(batch, idx, 1, False, self.domid):
            return None
        return self._run_held(batch)

    def finish_held(self, completions: int, n: int) -> list[int] | None:
        """finish_lane() for n completions that are all held lane requests' successes
        (copy_lane.py's complete_held): ONE grant copy of the reads out; the slots whose copy failed
        (indices; [] when all copied). The slots, in completion order: lane.ready(n). None: not all
        are (nothing done)."""
        lane = self.lane
        if lane is None:
            return None
        batch = self._batch
        batch.reset()
        if not lane.complete_held(batch, completions, n, self.domid):
            return None
        return self._run_held(batch)

    def _run_held(self, batch: CopyBatch) -> list[int]:
        """run_batch for a batch whose owners are slot indices: the failed ones, not marked."""
        if not batch.owners:
            return []
        try:
            self.gntdev.grant_copy_batch(batch)
        except OSError as e:
            log.warning("grant copy of %d segments failed as a whole: %s", len(batch.owners), e)
            return list(batch.owners)
        return batch.failed_owners()

    def attach_held(self, slot: Slot, large: int = -1) -> None:
        """The buffer fields a lane slot gets in prepare(), for a held slot being given its fields; large:
        the offset of the large buffer the ring engine gave it (an indirect request), -1: none."""
        off = slot.index * SMALL_BUFFER if large < 0 else large
        slot.buffer = off
        slot.large = large >= 0
        slot.extents = ((self._base + off, slot.nr_bytes),)

    def engine_buffers(self) -> tuple[int, int, int]:
        """(the free large buffers' stack, its depth, the region) addresses, for the ring engine."""
        stack, depth = self._free_large.addresses
        return stack, depth, self._base

    def engine_copier(self) -> dict[str, int] | None:
        """The gntdev's grant copy for the ring engine (ring_engine.py), when it offers one."""
        gntdev = self.gntdev
        return gntdev.engine_copier(self.domid) if isinstance(gntdev, EngineCopier) else None

    def engine_grants(self) -> CopyGrants | None:
        """The ring's persistently mapped grants, whose table the ring engine copies with, or None."""
        return self.grants

    @property
    def persistent_grants(self) -> int:
        return len(self.grants) if self.grants is not None else 0

    def idle(self) -> None:
        """The ring has nothing to do: unmap persistent grants unused for long (the region is fixed)."""
        if self.grants is not None:
            self.grants.purge()

    def close(self) -> None:
        if self.grants is not None:
            self.grants.close()
        if not self.region.released and not self._storage.closed:
            self._storage.release_mem_region(self.region)
