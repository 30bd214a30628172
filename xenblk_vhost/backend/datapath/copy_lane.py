"""The copy path's compiled lane: a batch's plain requests packed and queued in one C call each.

A plain request is a direct (not indirect) READ or WRITE of 1..11 segments taken off the ring by
the compiled intake: the common case, and the one whose per-request Python was the largest part
of the backend's CPU (one CopyBatch.add_sector_ranges per request for the copy in or out, one
Queue.read/write per request). The ring worker stashes such requests, as the intake decoded them
from the private copy, in a C table indexed by request slot (`stash`, one call per batch); the
copy path then packs their grant copies (`pack`: the write data in at prepare, the read data out
at finish) and the ring worker queues their storage requests (`queue`) for all of them at once.

The completion side (`complete`): the storage requests `queue` makes carry the tag
XK_LANE_TAG | slot (a few queued one by one by the ring worker too), so a completion says by
itself that it is a lane request's, with no state in the table that a park, an abandon or a
takeover would have to clear. When every completion of a reap (the queue's own array, read in
place: Queue.do_io_count) is such a request's success, one C call gives their slots in completion
order and packs the reads' copies back to the guest; any other reap (a storage error, a flush, an
indirect request, a map-path queue) is completed by the ring worker's reference loop, whole, so the
answers keep the reference's order.

Everything else (indirect, flush, barrier, discard, a request re-run by a takeover or re-queued on
a new storage instance, the Python engine, a failed copy) keeps the Python path, which is the
reference: the lane makes the same grant copies and the same storage requests, in the same order
per slot (tests/test_copy_lane.py drives random and hostile batches through both and compares the
guest's memory, the statuses, the storage calls). A slot is on the lane while `slot.lane` is True;
any doubt (a stash or pack the kernel refuses) clears it and the reference path runs.

Held batches (`hold`, `complete_held`, `answer_held`): when a whole batch is plain and the ring can
reap by count, the ring worker fills no Python Slot for it at all. The entry keeps what the rest of
the request's life needs (its id, journal ref and taken time besides the above, `held` set): its
write data comes in by `pack_op`, its storage requests are queued by `queue`, its completion is walked
by `complete_held` and its answer (journal answer, response, latency count) written by `answer_held`,
all from slot indices. Any other way a held request goes (a storage error among its reap, a copy
that failed, a park, an abandon, a halted ring) first gives its Slot the fields the reference path
would have given it (`take_back`, RingWorker._materialise), and then the reference path serves it.

The ring engine (ring_engine.py) holds indirect requests too: an entry of more than 11 segments keeps
in the table where its segments are (the side table, max_ind * 8 bytes per slot, which the engine
copies the indirect pages into) and where its data is (native/lane_entry.h); take_back gives them back.

The table: 128 bytes per request slot (native/lane_slot.h), the side table max_ind * 8 bytes per slot
(2 KiB at the default 256 segments).
"""

from __future__ import annotations

import logging
import os
import struct
from array import array
from typing import Any

from ...blkif.request import WireSegments
from ...native.intake import _SEG
from ...xen.gntdev import SEGMENT_SIZE, CopyBatch
from .stats import LATENCY_BOUNDS

log = logging.getLogger(__name__)

# Fewer requests than this in a batch (or slots in a group to pack or queue) go the reference way: a
# lane call's fixed cost (a few cffi conversions) is more than one or two requests' Python (QD1 lost
# ~5 us per request with the lane on every batch).
MIN_BATCH = 4

XK_LANE_MAX_SEGS = 11  # segments a lane slot holds inline (native/lane_entry.h: XK_LANE_INLINE_SEGS)
SEGMENT_WIRE = 8  # bytes of a blkif segment on the wire
_EXT = struct.Struct("<QQII")  # struct xk_lane_ext (native/lane_entry.h)
NO_LARGE = 0xFFFFFFFF

# XENBLK_COPY_LANE=0: no lane (the reference path for every request), for bench.py --engines no-lane.
LANE_ENV = "XENBLK_COPY_LANE"


def _modules() -> tuple[Any, Any] | None:
    """(the kernels' module, libblkio's calls' module) when both load and native is enabled."""
    from ... import native

    if not native.enabled:
        return None
    try:
        return native.load(), native.load_blkio()
    except native.NativeBuildError as e:
        log.warning("the copy path's compiled lane is unavailable: %s", e)
        return None


class CopyLane:
    """A ring's lane table (one entry per request slot) and its calls."""

    __slots__ = ("nslots", "stride", "base", "tag", "_ffi", "_lib", "_table", "table_addr", "_ready", "_owners",
                 "_room", "_counts", "_bounds", "_buckets", "_total", "_held_out", "max_ind", "_ind", "ind_addr",
                 "_large", "_nlarge")

    def __init__(self, nslots: int, stride: int, base: int, mods: tuple[Any, Any], max_ind: int = 0) -> None:
        mod, blkio = mods
        self._ffi, self._lib = mod.ffi, mod.lib
        if self._lib.xk_lane_slot_size() != blkio.lib.xb_lane_slot_size():
            raise RuntimeError("the two compiled modules disagree on struct xk_lane_slot")
        if self._lib.xk_lane_tag() != blkio.lib.xb_lane_tag():
            raise RuntimeError("the two compiled modules disagree on the lane's tag")
        self.tag = self._lib.xk_lane_tag()  # the tag bit of what queue() queues (slot index | tag)
        self.nslots = nslots
        self.stride = stride
        self.base = base  # slot i's buffer is at base + i * stride
        self._table = self._ffi.new("struct xk_lane_slot[]", nslots)
        self.table_addr = int(self._ffi.cast("uintptr_t", self._table))
        self._room = 0  # completions complete()'s out-arrays hold
        self._grow(256)
        ffi = self._ffi
        self._counts = ffi.new("uint64_t[]", 4)  # hold()'s: rd_req, rd_sect, wr_req, wr_sect
        assert len(LATENCY_BOUNDS) < 63  # (answer_held's bucket mask is an int64)
        self._bounds = ffi.new("double[]", LATENCY_BOUNDS)
        self._buckets = ffi.new("uint64_t[]", len(LATENCY_BOUNDS) + 1)
        self._total = ffi.new("double *")
        self._held_out: Any = None  # held_slots()' out-array, made when first needed
        # The side table of the indirect requests the ring engine holds (native/lane_entry.h): their
        # segments, max_ind per slot (the most a request may have); and where the data path keeps its
        # free large buffers, which an answered one gives back (set_large).
        self.max_ind = max_ind if max_ind > XK_LANE_MAX_SEGS else 0
        self._ind = ffi.new("uint8_t[]", nslots * self.max_ind * SEGMENT_WIRE) if self.max_ind else None
        self.ind_addr = int(ffi.cast("uintptr_t", self._ind)) if self._ind is not None else 0
        self._large = self._nlarge = ffi.NULL

    def _grow(self, n: int) -> None:
        self._room = n
        self._ready = self._ffi.new("uint16_t[]", n)
        self._owners = self._ffi.new("uint16_t[]", XK_LANE_MAX_SEGS * n)

    def _out(self, batch: CopyBatch, n: int) -> tuple[int, Any]:
        """Room for n slots' grant copies at the end of batch (and n in the out-arrays): batch's
        count, and where the kernel writes its segments."""
        if n > self._room:
            self._grow(n)
        count = batch.count
        batch.reserve(count + XK_LANE_MAX_SEGS * n)
        return count, self._ffi.cast("struct xk_copy_seg *", batch.address + count * SEGMENT_SIZE)

    def _took(self, batch: CopyBatch, count: int, packed: int) -> None:
        """The kernel added `packed` segments to batch at count, their owners slot indices (_owners)."""
        if packed:
            batch.owners.extend(self._ffi.unpack(self._owners, packed))
            batch.count = count + packed

    @classmethod
    def make(cls, nslots: int, stride: int, base: int, max_ind: int = 0) -> CopyLane | None:
        """A lane when the compiled kernels load (and native is enabled), else None. max_ind: the most
        segments an indirect request may have (a side table for the ring engine's; 0: none)."""
        if os.environ.get(LANE_ENV, "1").strip() == "0":
            return None
        mods = _modules()
        if mods is None or nslots > 0xFFFF:
            return None
        return cls(nslots, stride, base, mods, max_ind)

    def set_large(self, stack: int, count: int) -> None:
        """The data path's free large buffers (uint32 offsets, a stack at `stack`, its depth at `count`),
        where answer_held puts back a held indirect request's."""
        ffi = self._ffi
        self._large, self._nlarge = ffi.cast("uint32_t *", stack), ffi.cast("uint32_t *", count)

    def stash(self, intake: Any, raw: bytes, count: int, slot_of: array) -> bool:
        """Keep the requests at the batch positions slot_of names (>= 0) in their slots' entries,
        from the intake's last parse (records) and the private copy it parsed. False: not all of
        them are plain requests (the caller takes them off the lane)."""
        records = intake.last_records(count)
        if records is None:
            return False
        ffi = self._ffi
        n = self._lib.xk_lane_stash(self._table, self.nslots, ffi.from_buffer(raw), intake.entry_size,
                                    intake.seg_offset, records, count, ffi.from_buffer("int32_t[]", slot_of))
        return n >= 0

    def hold(self, intake: Any, raw: bytes, count: int, slots: array, first_ref: int,
             taken_at: float) -> list[int] | None:
        """Hold a whole batch of plain requests (the intake's last parse of raw: count records) in the
        entries of slots (uint16, distinct and free), with their ids, journal refs (first_ref + i, or
        -1 when first_ref < 0) and taken_at: [rd_req, rd_sect, wr_req, wr_sect]. None: one is not a
        plain request (or the records are another parse's): nothing held."""
        records = intake.last_records(count)
        if records is None or len(slots) != count:
            return None
        ffi = self._ffi
        got = self._lib.xk_lane_hold(self._table, self.nslots, ffi.from_buffer(raw), intake.entry_size,
                                     intake.seg_offset, records, count, ffi.from_buffer("uint16_t[]", slots),
                                     first_ref, taken_at, self._counts)
        return None if got < 0 else ffi.unpack(self._counts, 4)

    def pack_op(self, batch: CopyBatch, idx: array, op: int, to_guest: bool, domid: int) -> bool:
        """pack() for the entries among the slots idx (uint16) whose op is `op`, the owners slot
        indices. False: the kernel refused one (nothing added)."""
        n = len(idx)
        count, out = self._out(batch, n)
        packed = self._lib.xk_lane_pack_op(out, self._table, self.nslots, self._ffi.from_buffer("uint16_t[]", idx), n,
                                           op, to_guest, domid, self.base, self.stride, self._owners,
                                           XK_LANE_MAX_SEGS * n)
        if packed < 0:
            return False
        self._took(batch, count, packed)
        return True

    def complete_held(self, batch: CopyBatch, completions: int, n: int, domid: int) -> bool:
        """complete() for held requests (each completion a held slot's success, each slot once): the
        reads' copies back added to batch (owners: slot indices), the slots in completion order kept
        for answer_held / ready(), marked walked. False: nothing added, no entry changed."""
        count, out = self._out(batch, n)
        packed = self._lib.xk_lane_complete_held(out, self._table, self.nslots,
                                                 self._ffi.cast("struct xk_completion *", completions), n,
                                                 self._ready, self._owners, domid, self.base, self.stride,
                                                 XK_LANE_MAX_SEGS * n)
        if packed < 0:
            return False
        self._took(batch, count, packed)
        return True

    def ready(self, n: int) -> list[int]:
        """The slots of the last complete_held (n of them), in completion order."""
        return self._ffi.unpack(self._ready, n)

    def answer_held(self, ctx: Any, first_pos: int, n: int, now: float, latency: Any) -> None:
        """Answer the n slots complete_held walked, OKAY, at ring positions first_pos.. through ctx (a
        struct xk_rsp_ring *: CompiledAnswers'), and count their latency in `latency` (a
        LatencyHistogram) as its observe(now, slots) would. The entries are no longer held after."""
        mask = self._lib.xk_lane_answer_held(ctx, first_pos, self._table, self.nslots, self._ready, n, now,
                                             self._bounds, len(LATENCY_BOUNDS), self._buckets, self._total,
                                             self._large, self._nlarge)
        if mask < 0:
            raise RuntimeError("answer_held: an entry is not a walked held one")
        counts = latency.counts
        buckets = self._buckets
        while mask:  # (a batch's requests share their clock read: one or two buckets)
            low = mask & -mask
            b = low.bit_length() - 1
            counts[b] += buckets[b]
            mask ^= low
        latency.sum += self._total[0]

    def held_slots(self) -> list[int]:
        """Every held slot (walked or not), in index order."""
        if self._held_out is None:
            self._held_out = self._ffi.new("uint16_t[]", self.nslots)
        n = self._lib.xk_lane_held_slots(self._table, self.nslots, self._held_out)
        return self._ffi.unpack(self._held_out, n)

    def take_back(self, s: int) -> tuple | None:
        """Slot s's request from its held entry, which is no longer held after: (id, op, sector,
        nr_bytes, segments, taken_at, jref, large), segments as the intake decodes them (tuples of gref,
        first_sect, last_sect; an indirect request of more than 11 segments: its WireSegments), large
        the offset of the large buffer it holds (-1: its slot's small buffer). None: s is not held."""
        t = self._table[s]
        if not t.held:
            return None
        t.held = 0
        ffi = self._ffi
        nseg = t.nseg
        large = -1
        if nseg <= XK_LANE_MAX_SEGS:
            segs: Any = tuple(_SEG.iter_unpack(ffi.buffer(t.segs)[: 8 * nseg]))
        else:  # struct xk_lane_ext (lane_entry.h): where its segments and data are
            where, _buf, big, _pad = _EXT.unpack(ffi.buffer(t.segs)[: _EXT.size])
            segs = WireSegments(ffi.buffer(ffi.cast("uint8_t *", where), nseg * SEGMENT_WIRE)[:])
            large = -1 if big == NO_LARGE else big
        return t.id, t.op, t.sector, t.nbytes, segs, t.taken_at, t.jref, large

    def all_plain(self, intake: Any, raw: bytes, count: int, pos: int = -1) -> list | None:
        """intake.parse(raw, count, pos), or None when every slot is a plain request (nothing built)."""
        return intake.parse_unless_plain(raw, count, pos)

    def pack(self, batch: CopyBatch, slots: list, to_guest: bool, domid: int) -> bool:
        """Add the grant copies of these lane slots to batch, in order (owners in step). False:
        the kernel refused one (nothing added: the caller adds them the reference way)."""
        n = len(slots)
        count = batch.count
        batch.reserve(count + XK_LANE_MAX_SEGS * n)
        # (cffi passes the list as a temporary uint16_t array)
        packed = self._lib.xk_lane_pack(self._ffi.cast("struct xk_copy_seg *", batch.address + count * SEGMENT_SIZE),
                                        self._table, self.nslots, [slot.index for slot in slots], n,
                                        to_guest, domid, self.base, self.stride)
        if packed < 0:
            return False
        owners = batch.owners
        if packed == n:  # every entry has at least one segment: one each
            owners.extend(slots)
        else:
            total = 0
            for slot in slots:
                k = len(slot.segments)
                total += k
                if k == 1:
                    owners.append(slot)
                else:
                    owners.extend([slot] * k)
            if total != packed:  # the table disagrees with the slots: nothing added
                del owners[len(owners) - total:]
                return False
        batch.count = count + packed
        return True

    def queue(self, queue: Any, idx: array) -> bool:
        """Queue the storage request of every lane slot in idx (uint16 slot indices), in order, in
        one compiled call. False: nothing was queued (queue them one by one)."""
        ffi = self._ffi
        buf = ffi.from_buffer("uint16_t[]", idx)  # alive until the call returns
        return queue.queue_lane(self.table_addr, self.nslots, int(ffi.cast("uintptr_t", buf)), len(idx),
                                self.base, self.stride)

    def complete(self, batch: CopyBatch, slots: list, completions: int, n: int, domid: int) -> list | None:
        """The n completions at address `completions` (a queue's struct blkio_completion array),
        when every one is the success of a request queue() queued: their slots, in completion order,
        with the READs' copies back to the guest added to batch (owners in step). None: one is not
        (an error, a request queued another way): nothing added, complete them the reference way."""
        count, out = self._out(batch, n)
        ffi = self._ffi
        packed = self._lib.xk_lane_complete(out, self._table, self.nslots,
                                            ffi.cast("struct xk_completion *", completions), n,
                                            self._ready, self._owners, domid, self.base, self.stride)
        if packed < 0:
            return None
        get = slots.__getitem__
        if packed:
            batch.owners.extend(map(get, ffi.unpack(self._owners, packed)))
            batch.count = count + packed
        return list(map(get, ffi.unpack(self._ready, n)))
