"""Checks that depend on the device: size, read-only, block size, features.

Input is a decoded request (decode.py already enforced the protocol's own
rules); output is the same object when it may run, or a Rejection to answer
at once. A frozen RequestLimits carries the device's facts; after an online
resize the backend makes a new one (and a new Validator).

Rules, in the order they are applied (first failure wins):

READ / WRITE / WRITE_BARRIER / FLUSH_DISKCACHE (and resolved indirect):
  1. flush with flush disabled, barrier with barrier disabled -> RSP_EOPNOTSUPP
     (blkfront then turns the feature off, as it does for blkback)
  2. WRITE, or a WRITE_BARRIER carrying data, on a read-only device
  3. if it carries data: sector + nr_sectors overflows u64, or ends past
     the device (a data-less flush/barrier has no range: its sector is
     ignored, as blkback ignores it)
  4. if it carries data: sector or any segment's length not a multiple of
     the logical block size (blkback's check: start and each segment's
     sector count; a segment's offset in its page is not checked)
DISCARD:
  1. discard disabled -> RSP_EOPNOTSUPP
  2. read-only device
  3. if nr_sectors: overflow or past the end (0 sectors: valid, a no-op)
  4. sector or nr_sectors not a multiple of the logical block size
INDIRECT (the ring-slot header):
  1. nr_segments above the advertised max_indirect_segments
  2. indirect WRITE on a read-only device (rejected before the backend
     spends a grant copy on the indirect pages)
  then decode_indirect_segments() applies the per-segment rules and the
  READ/WRITE rules 2-4 above.
Every rejection is RSP_ERROR unless marked, with the request's own id.

Deliberate difference from Linux blkback: blkback refuses a flush (and an
empty barrier) on a read-only vbd, since it maps them to a write; we allow
them (nothing is written; the project's rule is that only writes, barriers
with data and discards fail on a read-only device).

Public API:
    RequestLimits(sectors, logical_block_size=512, read_only=False,
                 max_indirect_segments=256, flush_enabled=True,
                 barrier_enabled=False, discard_enabled=False)
    Validator(limits).check(decoded) -> decoded | Rejection
    Validator(limits).decode_indirect_segments(header, pages_bytes)
        -> Request | Rejection
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .constants import (
    DEFAULT_MAX_INDIRECT_SEGMENTS,
    MAX_INDIRECT_SEGMENTS_ABI,
    OP_FLUSH_DISKCACHE,
    OP_WRITE,
    OP_WRITE_BARRIER,
    RSP_EOPNOTSUPP,
    RSP_ERROR,
    SECTOR_SIZE,
    U64_MAX,
    XEN_PAGE_SIZE,
)
from .decode import R_BAD_SEGMENT, decode_segments
from .request import Decoded, DiscardRequest, IndirectRequest, Rejection, Request, WireSegments

R_FLUSH_DISABLED = "flush not supported"
R_BARRIER_DISABLED = "barrier not supported"
R_DISCARD_DISABLED = "discard not supported"
R_READ_ONLY = "write to read-only device"
R_OVERFLOW = "sector range overflows"
R_BEYOND_END = "beyond end of device"
R_MISALIGNED = "not aligned to logical block size"
R_TOO_MANY_INDIRECT = "more indirect segments than advertised"

_new = tuple.__new__


@dataclass(frozen=True, slots=True)
class RequestLimits:
    """Facts about one device that decide whether a request may run.

    sectors: size in 512-byte units (the `sectors` key).
    logical_block_size: bytes, a power of two 512..4096 (the `sector-size`
        key); I/O must be aligned to it. Above 4096 no segment (at most 8
        sectors) could ever be aligned.
    max_indirect_segments: what we advertise as
        feature-max-indirect-segments (0: indirect not offered, every
        indirect request fails).
    flush_enabled / barrier_enabled / discard_enabled: what we advertise as
        feature-flush-cache / feature-barrier / feature-discard.
    """

    sectors: int
    logical_block_size: int = SECTOR_SIZE
    read_only: bool = False
    max_indirect_segments: int = DEFAULT_MAX_INDIRECT_SEGMENTS
    flush_enabled: bool = True
    barrier_enabled: bool = False
    discard_enabled: bool = False

    def __post_init__(self) -> None:
        if not 0 <= self.sectors <= U64_MAX:
            raise ValueError(f"sectors {self.sectors} is not a u64")
        lbs = self.logical_block_size
        if lbs < SECTOR_SIZE or lbs > XEN_PAGE_SIZE or lbs & (lbs - 1):
            raise ValueError(f"logical block size {lbs} is not a power of two in 512..4096")
        if not 0 <= self.max_indirect_segments <= MAX_INDIRECT_SEGMENTS_ABI:
            raise ValueError(
                f"max_indirect_segments {self.max_indirect_segments} outside 0..{MAX_INDIRECT_SEGMENTS_ABI}"
            )

    @property
    def block_sectors(self) -> int:
        """Logical block size in 512-byte sectors (1, 2, 4 or 8)."""
        return self.logical_block_size // SECTOR_SIZE


class Validator:
    """Applies one RequestLimits to decoded requests."""

    __slots__ = ("limits", "_sectors", "_mask", "_ro", "_flush", "_barrier", "_discard",
                 "_max_indirect", "check_by_type")

    def __init__(self, limits: RequestLimits) -> None:
        self.limits = limits
        # Copied into slots: the datapath reads them once per request.
        self._sectors = limits.sectors
        self._mask = limits.block_sectors - 1
        self._ro = limits.read_only
        self._flush = limits.flush_enabled
        self._barrier = limits.barrier_enabled
        self._discard = limits.discard_enabled
        self._max_indirect = limits.max_indirect_segments
        # type(decoded) -> its check; the batch loop indexes this directly.
        self.check_by_type: dict[type, Callable[[Any], Decoded]] = {
            Request: self.check_rw,
            DiscardRequest: self.check_discard,
            IndirectRequest: self.check_indirect,
            Rejection: _already_rejected,
        }

    def check(self, req):
        """Validate any decoded object; a Rejection passes through unchanged."""
        return self.check_by_type[type(req)](req)

    def check_rw(self, req: Request):
        op = req.op
        if op >= OP_WRITE_BARRIER:
            if op == OP_FLUSH_DISKCACHE:
                if not self._flush:
                    return _new(Rejection, (req.id, op, RSP_EOPNOTSUPP, R_FLUSH_DISABLED))
            elif not self._barrier:
                return _new(Rejection, (req.id, op, RSP_EOPNOTSUPP, R_BARRIER_DISABLED))
        nr = req.nr_sectors
        if self._ro and (op == OP_WRITE or (op == OP_WRITE_BARRIER and nr)):
            return _new(Rejection, (req.id, op, RSP_ERROR, R_READ_ONLY))
        if nr:
            sector = req.sector
            end = sector + nr
            if end > U64_MAX:
                return _new(Rejection, (req.id, op, RSP_ERROR, R_OVERFLOW))
            if end > self._sectors:
                return _new(Rejection, (req.id, op, RSP_ERROR, R_BEYOND_END))
            mask = self._mask
            if mask:
                if sector & mask:
                    return _new(Rejection, (req.id, op, RSP_ERROR, R_MISALIGNED))
                for _gref, first, last in req.segments:
                    if (last - first + 1) & mask:
                        return _new(Rejection, (req.id, op, RSP_ERROR, R_MISALIGNED))
        return req

    def check_discard(self, req: DiscardRequest):
        op = req.op
        if not self._discard:
            return _new(Rejection, (req.id, op, RSP_EOPNOTSUPP, R_DISCARD_DISABLED))
        if self._ro:
            return _new(Rejection, (req.id, op, RSP_ERROR, R_READ_ONLY))
        sector = req.sector
        nr = req.nr_sectors
        if nr:
            end = sector + nr
            if end > U64_MAX:
                return _new(Rejection, (req.id, op, RSP_ERROR, R_OVERFLOW))
            if end > self._sectors:
                return _new(Rejection, (req.id, op, RSP_ERROR, R_BEYOND_END))
        if (sector | nr) & self._mask:
            return _new(Rejection, (req.id, op, RSP_ERROR, R_MISALIGNED))
        return req

    def check_indirect(self, req: IndirectRequest):
        if req.nr_segments > self._max_indirect:
            return _new(Rejection, (req.id, req.indirect_op, RSP_ERROR, R_TOO_MANY_INDIRECT))
        if self._ro and req.indirect_op == OP_WRITE:
            return _new(Rejection, (req.id, req.indirect_op, RSP_ERROR, R_READ_ONLY))
        return req

    def decode_indirect_segments(self, header: IndirectRequest, pages_bytes) -> Request | Rejection:
        """Second half of an indirect request: its segments, from private memory.

        pages_bytes: the indirect pages named by header.indirect_grefs,
        concatenated in that order, as a bytes-like object at least
        header.segments_bytes long (only that prefix is read: the backend may
        copy just that much). It is copied once more here, so a buffer the
        guest can still write (a grant mapping) is read exactly once.
        """
        need = header.segments_bytes
        if len(pages_bytes) < need:
            # The backend handed us too little: a bug on our side, not the guest's.
            raise ValueError(f"indirect pages hold {len(pages_bytes)} bytes, need {need}")
        raw = bytes(memoryview(pages_bytes).cast("B")[:need])
        decoded = decode_segments(raw)
        iop = header.indirect_op
        if decoded is None:
            return _new(Rejection, (header.id, iop, RSP_ERROR, R_BAD_SEGMENT))
        segments = WireSegments(raw, decoded[0])
        req = _new(Request, (iop, header.id, header.handle, header.sector, segments, decoded[1], True))
        return self.check_rw(req)


def _already_rejected(rej: Rejection) -> Rejection:
    return rej
