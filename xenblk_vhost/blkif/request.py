"""Immutable, private copies of guest requests, and the verdict on bad ones.

Everything here is made from bytes the backend already copied out of the
shared ring, so nothing can change under the validator. The types are
NamedTuples: immutable, cheap to build (the decoder calls tuple.__new__
directly, ~0.2 us) and with C-speed attribute access.

Every kind has `id` (echo it in the response) and `op`. The operation to
echo in the response is `op`, except for an IndirectRequest, where Linux
blkback (and blkfront, which checks it) uses `indirect_op`: use
`response_op` on any of them.

A segment is a plain tuple (gref, first_sect, last_sect): exactly what
struct.iter_unpack yields, so decoding builds no extra objects. It covers
sectors first_sect..last_sect (inclusive) of the 4 KiB page granted by gref.
"""

from __future__ import annotations

from typing import NamedTuple

from .constants import DISCARD_SECURE, SECTOR_SIZE, SEGMENTS_PER_INDIRECT_PAGE

Segment = tuple[int, int, int]  # (gref, first_sect, last_sect)


class SegmentTuple(tuple):
    """An indirect request's segments: the tuple of (gref, first_sect, last_sect) every consumer
    reads, and `raw`, the private copy of their 8-byte wire form they were decoded from, so a
    consumer with many of them (the copy path's packing: 256 for 1 MiB) can hand them to
    compiled code in one call. Equal to the plain tuple of the same segments."""

    raw: bytes


class Request(NamedTuple):
    """READ, WRITE, WRITE_BARRIER or FLUSH_DISKCACHE (also a resolved indirect).

    `sector` and `nr_sectors` are in 512-byte units; `nr_sectors` is the sum
    of the segments' lengths (0 for an empty flush or barrier, whose sector
    is meaningless). `indirect` is True when the segments came from indirect
    pages (op is then the indirect_op, READ or WRITE).
    """

    op: int
    id: int
    handle: int
    sector: int
    segments: tuple[Segment, ...]
    nr_sectors: int
    indirect: bool = False

    @property
    def response_op(self) -> int:
        return self.op

    @property
    def nr_bytes(self) -> int:
        return self.nr_sectors * SECTOR_SIZE


class DiscardRequest(NamedTuple):
    """DISCARD of nr_sectors 512-byte sectors from `sector`.

    `flag` is the raw flag byte; only `secure` (BLKIF_DISCARD_SECURE) has a
    meaning, and only if the backend advertised discard-secure. A discard of
    0 sectors is valid and does nothing (blkback answers it OKAY).
    """

    op: int
    id: int
    handle: int
    sector: int
    nr_sectors: int
    flag: int

    @property
    def response_op(self) -> int:
        return self.op

    @property
    def secure(self) -> bool:
        return bool(self.flag & DISCARD_SECURE)


class IndirectRequest(NamedTuple):
    """The ring-slot half of an INDIRECT request: its segments are elsewhere.

    `indirect_grefs` holds exactly the grant refs of the pages that carry
    the nr_segments segments (ceil(nr_segments / 512) of them; the slot's
    unused refs are not even copied). The backend copies those pages out and
    calls decode_indirect_segments(), which returns a Request.
    """

    op: int  # always OP_INDIRECT
    indirect_op: int  # READ or WRITE (anything else is rejected at decode)
    id: int
    handle: int
    sector: int
    nr_segments: int
    indirect_grefs: tuple[int, ...]

    @property
    def response_op(self) -> int:
        return self.indirect_op

    @property
    def nr_indirect_pages(self) -> int:
        return len(self.indirect_grefs)

    @property
    def segments_bytes(self) -> int:
        """How many bytes of the indirect pages hold this request's segments."""
        return self.nr_segments * 8


class Rejection(NamedTuple):
    """A request that must not be executed: answer (id, op, status) at once.

    `op` is the operation to echo (the indirect_op for an indirect request,
    as blkback does), `status` is RSP_ERROR or RSP_EOPNOTSUPP, `reason` a
    short fixed string fit for a rate-limited log line.
    """

    id: int
    op: int
    status: int
    reason: str

    @property
    def response_op(self) -> int:
        return self.op


AnyRequest = Request | DiscardRequest | IndirectRequest
Decoded = Request | DiscardRequest | IndirectRequest | Rejection


def indirect_pages_for(nr_segments: int) -> int:
    """INDIRECT_PAGES(): pages needed to hold nr_segments 8-byte segments."""
    return -(-nr_segments // SEGMENTS_PER_INDIRECT_PAGE)
