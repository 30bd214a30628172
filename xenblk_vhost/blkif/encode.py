"""Writing requests into ring slots: the frontend's half of the codec.

Used by the simulator's reference frontend and by hostile tests, so it
writes whatever it is given as long as it fits the C field: a READ with 0
segments, first_sect > last_sect, op 99, an indirect_op of FLUSH, a
nr_segments that lies about the segments that follow. Only values that do
not fit their field (or more than 11 segments in a slot) raise.

Every encode first zeroes the whole slot (entry_size bytes), so padding and
unused segments are 0, as a C frontend writing a zero-initialised struct
would leave them.

Public API:
    RequestEncoder(abi)
        .encode(buf, offset, req)   any Request/DiscardRequest/IndirectRequest
        .rw(buf, offset, op, id, sector, segments, *, handle=0, nr_segments=None)
        .discard(buf, offset, id, sector, nr_sectors, *, flag=0, handle=0)
        .indirect(buf, offset, indirect_op, id, sector, nr_segments,
                  indirect_grefs, *, handle=0)
        .other(buf, offset, op, id)  only op and id (for unknown ops)
        .slot(req) -> bytes          one encoded slot, for tests
    encode_segments(segments) -> bytes   indirect page contents
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence

from .abi import SEGMENT, Abi, layout
from .constants import MAX_INDIRECT_PAGES_PER_REQUEST, MAX_SEGMENTS_PER_REQUEST, OP_DISCARD, OP_INDIRECT
from .request import DiscardRequest, IndirectRequest, Request, Segment

_SEG = SEGMENT.struct_for("gref", "first_sect", "last_sect", to_end=True)
_U64 = struct.Struct("<Q")


def encode_segments(segments: Iterable[Segment]) -> bytes:
    """Pack segments back to back, 8 bytes each (the indirect page format)."""
    pack = _SEG.pack
    return b"".join(pack(*s) for s in segments)


class RequestEncoder:
    __slots__ = ("abi", "layout", "_zero")

    def __init__(self, abi: Abi) -> None:
        self.abi = abi
        self.layout = layout(abi)
        self._zero = bytes(self.layout.entry_size)

    def _clear(self, buf, offset: int) -> None:
        buf[offset:offset + len(self._zero)] = self._zero

    def rw(self, buf, offset: int, op: int, id_: int, sector: int,
           segments: Sequence[Segment], *, handle: int = 0, nr_segments: int | None = None) -> None:
        """READ/WRITE/WRITE_BARRIER/FLUSH_DISKCACHE (or any op, with this layout)."""
        if len(segments) > MAX_SEGMENTS_PER_REQUEST:
            raise ValueError(f"{len(segments)} segments do not fit in a ring slot")
        lay = self.layout
        self._clear(buf, offset)
        lay.rw_header.pack_into(
            buf, offset, op, len(segments) if nr_segments is None else nr_segments,
            handle, id_, sector)
        pos = offset + lay.seg_offset
        for seg in segments:
            _SEG.pack_into(buf, pos, *seg)
            pos += _SEG.size

    def discard(self, buf, offset: int, id_: int, sector: int, nr_sectors: int, *,
                flag: int = 0, handle: int = 0, op: int = OP_DISCARD) -> None:
        self._clear(buf, offset)
        self.layout.discard_struct.pack_into(buf, offset, op, flag, handle, id_, sector, nr_sectors)

    def indirect(self, buf, offset: int, indirect_op: int, id_: int, sector: int,
                 nr_segments: int, indirect_grefs: Sequence[int], *, handle: int = 0,
                 op: int = OP_INDIRECT) -> None:
        grefs = list(indirect_grefs)
        if len(grefs) > MAX_INDIRECT_PAGES_PER_REQUEST:
            raise ValueError(f"{len(grefs)} indirect grefs do not fit in a ring slot")
        grefs += [0] * (MAX_INDIRECT_PAGES_PER_REQUEST - len(grefs))
        self._clear(buf, offset)
        self.layout.indirect_struct.pack_into(
            buf, offset, op, indirect_op, nr_segments, id_, sector, handle, *grefs)

    def other(self, buf, offset: int, op: int, id_: int) -> None:
        """A slot with only operation and id set (what a backend needs to refuse it)."""
        self._clear(buf, offset)
        buf[offset] = op
        _U64.pack_into(buf, offset + self.layout.request.offset("id"), id_)

    def encode(self, buf, offset: int, req) -> None:
        """Encode a request object as decoding would produce it."""
        if isinstance(req, Request):
            if req.indirect:
                raise ValueError("a resolved indirect Request has no single-slot form")
            self.rw(buf, offset, req.op, req.id, req.sector, req.segments, handle=req.handle)
        elif isinstance(req, DiscardRequest):
            self.discard(buf, offset, req.id, req.sector, req.nr_sectors,
                         flag=req.flag, handle=req.handle, op=req.op)
        elif isinstance(req, IndirectRequest):
            self.indirect(buf, offset, req.indirect_op, req.id, req.sector, req.nr_segments,
                          req.indirect_grefs, handle=req.handle, op=req.op)
        else:
            raise TypeError(f"cannot encode {type(req).__name__}")

    def slot(self, req) -> bytes:
        buf = bytearray(self.layout.entry_size)
        self.encode(buf, 0, req)
        return bytes(buf)
