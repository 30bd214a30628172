"""Indirect requests: their segment pages copied into private memory, then decoded.

An INDIRECT request names up to 8 guest pages holding its segments. The
guest can rewrite those pages at any time, so (as the blkif core does for
ring slots) we copy them out once and decode only the private copy: ONE
grant copy per batch brings in the segment bytes of every indirect request
of the batch (only nr_segments * 8 bytes, not whole pages), then
RequestIntake.decode_indirect_segments validates each. A request whose
pages cannot be copied (bad grant) becomes a Rejection (RSP_ERROR) on its
own; the others go on.

The private buffer is allocated once per ring: room for the most segments
allowed (the advertised max_indirect_segments, already enforced on the ring
slot) for every request slot.
"""

from __future__ import annotations

from ...blkif.constants import RSP_ERROR, RSP_OKAY, XEN_PAGE_SIZE
from ...blkif.request import IndirectRequest, Rejection
from ...storage.memory import address_of
from ...xen.gntdev import CopyBatch
from .grant_copy import run_batch

R_INDIRECT_COPY = "indirect page copy failed"


class _PagesOf:
    """One indirect request's share of the batch's grant copy (status set by run_batch)."""

    __slots__ = ("position", "header", "offset", "status")

    def __init__(self, position: int, header: IndirectRequest, offset: int) -> None:
        self.position = position
        self.header = header
        self.offset = offset
        self.status = RSP_OKAY


class IndirectPages:
    def __init__(self, gntdev, domid: int, intake, max_requests: int) -> None:
        self.gntdev = gntdev
        self.domid = domid
        self.intake = intake
        max_segments = intake.limits.max_indirect_segments
        self._buf = bytearray(max(1, max_requests * max_segments * 8))
        self._addr = address_of(self._buf)
        self._view = memoryview(self._buf)
        self._batch = CopyBatch()  # reused: packed for the kernel as it is built, no object per page

    def resolve(self, batch: list, kept: list | None = None) -> list:
        """The batch with every IndirectRequest replaced by its Request (or a Rejection).

        kept: gets (position in the batch, the segment bytes decoded; b"" if the
        copy failed) for each, what the ring's journal records.
        """
        out = list(batch)
        records = []
        copy = self._batch
        copy.reset()
        add = copy.add_range
        domid = self.domid
        base = self._addr
        pos = 0
        for i, item in enumerate(batch):
            if type(item) is not IndirectRequest:
                continue
            rec = _PagesOf(i, item, pos)
            records.append(rec)
            need = item.nr_segments << 3
            if need <= XEN_PAGE_SIZE:  # 512 segments or fewer (up to 2 MiB): one page, the usual case
                add(False, domid, item.indirect_grefs[0], 0, base + pos, need, rec)
                pos += need
                continue
            for gref in item.indirect_grefs:
                n = need if need < XEN_PAGE_SIZE else XEN_PAGE_SIZE
                add(False, domid, gref, 0, base + pos, n, rec)
                pos += n
                need -= n
        run_batch(self.gntdev, copy)
        view = self._view
        decode = self.intake.decode_indirect_segments
        for rec in records:
            h = rec.header
            if rec.status != RSP_OKAY:
                out[rec.position] = Rejection(h.id, h.indirect_op, RSP_ERROR, R_INDIRECT_COPY)
                if kept is not None:
                    kept.append((rec.position, b""))
            else:
                # One private copy of exactly the segments' bytes, decoded as is and kept for the journal.
                segments = bytes(view[rec.offset:rec.offset + (h.nr_segments << 3)])
                out[rec.position] = decode(h, segments)
                if kept is not None:
                    kept.append((rec.position, segments))
        return out
