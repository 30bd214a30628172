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
A request's `segments` is a tuple of them, except an indirect request's:
WireSegments, the same sequence kept in wire form until something reads it.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import NamedTuple, overload

from .abi import SEGMENT
from .constants import DISCARD_SECURE, SECTOR_SIZE, SEGMENTS_PER_INDIRECT_PAGE

Segment = tuple[int, int, int]  # (gref, first_sect, last_sect)
Segments = Sequence[Segment]  # a tuple of them, or an indirect request's WireSegments

_unpack_segments = SEGMENT.struct_for("gref", "first_sect", "last_sect", to_end=True).iter_unpack


class WireSegments(Sequence[Segment]):
    """An indirect request's segments, kept in their 8-byte wire form and unpacked only when read.

    `raw` is the private copy of the blkif_request_segments the request was decoded from, already
    validated (every first_sect <= last_sect < 8). A consumer with many of them hands `raw` to
    compiled code in one call (the copy path's packing: 256 segments for 1 MiB) and never unpacks
    them; building the 256 (gref, first_sect, last_sect) tuples cost more than the whole compiled
    decode (12-19 us per 1 MiB request, measured), so it happens on the first read of the sequence
    (the map path, the Python validator's block check, tests) and is kept. Reads, len() and ==
    behave as the plain tuple of the same segments (equal and hashing alike).
    """

    __slots__ = ("raw", "_segments")

    def __init__(self, raw: bytes, segments: tuple[Segment, ...] | None = None) -> None:
        self.raw = raw
        self._segments = segments  # the unpacked tuples, once read (or given by a decoder that has them)

    @property
    def unpacked(self) -> tuple[Segment, ...]:
        """The plain tuple of (gref, first_sect, last_sect), unpacked on the first call."""
        segs = self._segments
        if segs is None:
            segs = self._segments = tuple(_unpack_segments(self.raw))
        return segs

    def __len__(self) -> int:
        return len(self.raw) >> 3

    @overload
    def __getitem__(self, index: int) -> Segment: ...

    @overload
    def __getitem__(self, index: slice) -> tuple[Segment, ...]: ...

    def __getitem__(self, index: int | slice) -> Segment | tuple[Segment, ...]:
        return self.unpacked[index]

    def __iter__(self) -> Iterator[Segment]:
        return iter(self.unpacked)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, WireSegments):
            other = other.unpacked
        if isinstance(other, tuple):
            return self.unpacked == other
        return NotImplemented

    def __hash__(self) -> int:
        return hash(self.unpacked)

    def __repr__(self) -> str:
        return f"WireSegments({self.unpacked!r})"


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
    segments: Segments
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
