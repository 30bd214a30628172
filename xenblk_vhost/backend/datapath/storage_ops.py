"""Putting one slot's step on a libblkio queue, split to fit the storage's limits.

A request may be bigger than one storage request can be: the driver's
max-transfer (bytes) and max-segments (iovec entries) bound each, and a
discard is bounded by max-discard-len (max-write-zeroes-len when discard is
done as write zeroes). Such a step goes down as several storage requests
with the same tag (the slot index); the slot counts them in `parts` and is
done when all completed. Data is split at logical-block multiples so every
part stays aligned.

StorageShape holds the limits; queue_step() queues (nothing is submitted
before the ring's do_io). The common case, one contiguous buffer within
max-transfer, is one blkioq_read/write and no iovec.
"""

from __future__ import annotations

from dataclasses import dataclass

from ...blkif.constants import SECTOR_SIZE
from .slots import STEP_DISCARD, STEP_FLUSH, STEP_WRITE, STEP_WRITE_ZEROES


@dataclass(frozen=True)
class StorageShape:
    logical_block_size: int = SECTOR_SIZE
    max_transfer: int = 0  # bytes per request, 0 = no limit
    max_segments: int = 0  # iovec entries per request, 0 = no limit
    max_discard: int = 0  # bytes per discard/write-zeroes request, 0 = no limit

    @classmethod
    def of(cls, limits, *, discard_by_write_zeroes: bool) -> StorageShape:
        """From a storage.StorageLimits."""
        lbs = limits.logical_block_size
        md = limits.max_write_zeroes_len if discard_by_write_zeroes else limits.max_discard_len
        return cls(
            logical_block_size=lbs,
            max_transfer=limits.max_transfer // lbs * lbs,
            max_segments=limits.max_segments,
            max_discard=md // lbs * lbs,
        )

    def iovecs_per_request(self, max_extents: int, max_bytes: int) -> int:
        """iovec entries one request can need: its extents plus one per split point."""
        extra = max_bytes // self.max_transfer + 1 if self.max_transfer else 0
        return max_extents + extra + 1


def split_extents(extents, max_transfer: int, max_segments: int) -> list[list[tuple[int, int]]]:
    """Cut extents into parts of at most max_transfer bytes and max_segments entries (0: no limit).

    max_transfer must be a multiple of the logical block size (StorageShape
    makes it so), so every cut falls on a block boundary.
    """
    parts: list[list[tuple[int, int]]] = []
    cur: list[tuple[int, int]] = []
    room = max_transfer or -1
    for addr, n in extents:
        while n:
            if max_segments and len(cur) == max_segments or room == 0:
                parts.append(cur)
                cur, room = [], max_transfer or -1
            take = n if room < 0 else min(n, room)
            cur.append((addr, take))
            addr += take
            n -= take
            if room > 0:
                room -= take
    if cur:
        parts.append(cur)
    return parts


def queue_step(q, slot, shape: StorageShape, iovecs, iov_base: int) -> int:
    """Queue the slot's current step; returns how many storage requests it became."""
    step = slot.steps[slot.step]
    tag = slot.index
    if step <= STEP_WRITE:  # STEP_READ or STEP_WRITE
        start = slot.sector * SECTOR_SIZE
        extents = slot.extents
        writes = step == STEP_WRITE
        if len(extents) == 1:
            addr, n = extents[0]
            if not shape.max_transfer or n <= shape.max_transfer:
                (q.write if writes else q.read)(start, addr, n, tag)
                return 1
        count = 0
        i = iov_base
        for part in split_extents(extents, shape.max_transfer, shape.max_segments):
            nbytes = sum(n for _a, n in part)
            if len(part) == 1:
                (q.write if writes else q.read)(start, part[0][0], nbytes, tag)
            else:
                iovecs.fill(i, part)
                (q.writev if writes else q.readv)(start, iovecs.address(i), len(part), tag)
                i += len(part)
            start += nbytes
            count += 1
        return count
    if step == STEP_FLUSH:
        q.flush(tag)
        return 1
    # discard, or discard carried out as write zeroes (which may unmap: flags 0)
    op = q.discard if step == STEP_DISCARD else q.write_zeroes
    assert step in (STEP_DISCARD, STEP_WRITE_ZEROES)
    start = slot.sector * SECTOR_SIZE
    left = slot.nr_bytes
    chunk = shape.max_discard or left
    count = 0
    while left:
        n = min(chunk, left)
        op(start, n, tag)
        start += n
        left -= n
        count += 1
    return count
