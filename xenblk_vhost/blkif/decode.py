"""Ring slot bytes -> request objects, with the checks no device fact changes.

The decoder reads from a *private copy* of ring slots (BackRing.take_slots
makes it) and never from shared memory, so each field is read exactly once
from guest-controlled bytes and cannot change while it is checked.

What decoding rejects (the protocol's own rules, as Linux blkback applies
them; status RSP_ERROR unless noted):
  * an op we do not know (4, 7..255)                  -> RSP_EOPNOTSUPP
  * READ/WRITE with nr_segments outside 1..11
  * WRITE_BARRIER/FLUSH_DISKCACHE with nr_segments > 11 (0 is allowed: a
    pure flush/barrier carries no data)
  * a segment with last_sect >= 8 or first_sect > last_sect
  * INDIRECT whose indirect_op is not READ/WRITE (echoing the indirect_op)
  * INDIRECT with nr_segments 0 or more than 8 pages * 512 can hold
Everything that depends on the device (size, read-only, block size,
enabled features, the advertised indirect limit) is validate.py's job.

Public API:
    RequestDecoder(abi).decode(buf, offset=0) -> Request | DiscardRequest
                                                 | IndirectRequest | Rejection
    decode_segments(raw) -> (segments, nr_sectors) | None   (None: a bad segment)
Reasons in rejections are the R_* strings below (fixed, rate-limit friendly).
"""

from __future__ import annotations

from .abi import SEGMENT, Abi, layout
from .constants import (
    MAX_INDIRECT_SEGMENTS_ABI,
    MAX_SEGMENTS_PER_REQUEST,
    OP_DISCARD,
    OP_FLUSH_DISKCACHE,
    OP_INDIRECT,
    OP_WRITE,
    RSP_EOPNOTSUPP,
    RSP_ERROR,
    SECTORS_PER_PAGE,
)
from .request import (
    DiscardRequest,
    IndirectRequest,
    Rejection,
    Request,
    Segment,
    indirect_pages_for,
)

R_UNKNOWN_OP = "unknown operation"
R_BAD_NR_SEGMENTS = "bad number of segments"
R_BAD_SEGMENT = "segment sectors out of page or reversed"
R_BAD_INDIRECT_OP = "indirect operation is not read or write"

_SEG_SIZE = SEGMENT.size
_SEG_STRUCT = SEGMENT.struct_for("gref", "first_sect", "last_sect", to_end=True)
_seg_iter = _SEG_STRUCT.iter_unpack
_seg_unpack_from = _SEG_STRUCT.unpack_from
_new = tuple.__new__


def decode_segments(raw: bytes | memoryview) -> tuple[tuple[Segment, ...], int] | None:
    """Unpack 8-byte blkif_request_segments into (segments, nr_sectors).

    None if any segment breaks first_sect <= last_sect < 8. (A plain loop:
    measured faster than strided-slice or big-int tricks up to 11 segments.)
    """
    segs = tuple(_seg_iter(raw))
    nr = 0
    for _gref, first, last in segs:
        if last >= SECTORS_PER_PAGE or first > last:
            return None
        nr += last - first + 1
    return segs, nr


class RequestDecoder:
    """Decodes ring slots of one ABI. Stateless apart from its layout."""

    __slots__ = ("abi", "layout", "_rw", "_seg_off", "_discard", "_indirect", "_id")

    def __init__(self, abi: Abi) -> None:
        lay = layout(abi)
        self.abi = abi
        self.layout = lay
        self._rw = lay.rw_header.unpack_from
        self._seg_off = lay.seg_offset
        self._discard = lay.discard_struct.unpack_from
        self._indirect = lay.indirect_struct.unpack_from
        self._id = lay.id_struct.unpack_from

    def decode(self, buf, offset: int = 0):
        """Decode the slot at buf[offset:offset+entry_size] (a private copy)."""
        op = buf[offset]
        if op > OP_FLUSH_DISKCACHE:
            return self._decode_other(op, buf, offset)
        # READ / WRITE / WRITE_BARRIER / FLUSH_DISKCACHE: the hot path, inline.
        op, nseg, handle, id_, sector = self._rw(buf, offset)
        if nseg == 1:
            # The common case; one struct call and no loop.
            seg = _seg_unpack_from(buf, offset + self._seg_off)
            first = seg[1]
            last = seg[2]
            if last >= SECTORS_PER_PAGE or first > last:
                return _new(Rejection, (id_, op, RSP_ERROR, R_BAD_SEGMENT))
            return _new(Request, (op, id_, handle, sector, (seg,), last - first + 1, False))
        if nseg == 0:
            # Only a flush or barrier may carry no data (blkback allows
            # nseg == 0 only for its REQ_PREFLUSH operations).
            if op <= OP_WRITE:
                return _new(Rejection, (id_, op, RSP_ERROR, R_BAD_NR_SEGMENTS))
            return _new(Request, (op, id_, handle, sector, (), 0, False))
        if nseg > MAX_SEGMENTS_PER_REQUEST:
            return _new(Rejection, (id_, op, RSP_ERROR, R_BAD_NR_SEGMENTS))
        start = offset + self._seg_off
        decoded = decode_segments(buf[start:start + nseg * _SEG_SIZE])
        if decoded is None:
            return _new(Rejection, (id_, op, RSP_ERROR, R_BAD_SEGMENT))
        return _new(Request, (op, id_, handle, sector, decoded[0], decoded[1], False))

    def _decode_other(self, op: int, buf, offset: int):
        if op == OP_DISCARD:
            op, flag, handle, id_, sector, nr = self._discard(buf, offset)
            return _new(DiscardRequest, (op, id_, handle, sector, nr, flag))
        if op == OP_INDIRECT:
            return self._decode_indirect(buf, offset)
        return _new(Rejection, (self._id(buf, offset)[0], op, RSP_EOPNOTSUPP, R_UNKNOWN_OP))

    def _decode_indirect(self, buf, offset: int):
        fields = self._indirect(buf, offset)
        # operation, indirect_op, nr_segments, id, sector_number, handle, grefs[8]
        iop = fields[1]
        nseg = fields[2]
        id_ = fields[3]
        if iop > OP_WRITE:
            return _new(Rejection, (id_, iop, RSP_ERROR, R_BAD_INDIRECT_OP))
        if nseg == 0 or nseg > MAX_INDIRECT_SEGMENTS_ABI:
            return _new(Rejection, (id_, iop, RSP_ERROR, R_BAD_NR_SEGMENTS))
        grefs = fields[6:6 + indirect_pages_for(nseg)]
        return _new(IndirectRequest, (OP_INDIRECT, iop, id_, fields[5], fields[4], nseg, grefs))
