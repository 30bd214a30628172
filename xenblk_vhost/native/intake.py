"""The request intake with its per-slot decode + validate compiled (intake_kernel.c).

    intake = make_intake(abi, limits)     # CompiledIntake when the engine is "compiled" and the
                                          # kernels load, else blkif's RequestIntake (the reference)

CompiledIntake has RequestIntake's interface and returns the very same objects (equal tuples of
the same types: Request, DiscardRequest, IndirectRequest, Rejection with the same reason
strings): tests/test_native_intake.py runs random and hostile ring contents through both, on all
three ABIs. What it saves: the decoder's and the validator's Python per request (one C call per
batch decides every slot; Python then only builds the objects the datapath consumes).

The private copy is still made once (BackRing.take_slots) and only that copy is read, by C and by
Python alike: nothing here looks at shared memory.

Engine choice: XENBLK_ENGINE=python|compiled in the environment (default compiled), and
native.enabled (scripts/bench.py --engines flips it per case); the Python intake when the
kernels cannot be built.
"""

from __future__ import annotations

import logging
import os
import struct

from ..blkif import decode as _dec
from ..blkif import validate as _val
from ..blkif.abi import SEGMENT, Abi, layout
from ..blkif.constants import MAX_INDIRECT_PAGES_PER_REQUEST
from ..blkif.intake import RequestIntake
from ..blkif.request import (
    DiscardRequest,
    IndirectRequest,
    Rejection,
    Request,
    WireSegments,
    indirect_pages_for,
)
from ..blkif.validate import RequestLimits

log = logging.getLogger(__name__)

ENGINE_ENV = "XENBLK_ENGINE"
ENGINES = ("compiled", "python")

# intake_kernel.c's XK_R_* in order: the reference's reason strings.
REASONS = (
    "", _dec.R_UNKNOWN_OP, _dec.R_BAD_NR_SEGMENTS, _dec.R_BAD_SEGMENT, _dec.R_BAD_INDIRECT_OP,
    _val.R_FLUSH_DISABLED, _val.R_BARRIER_DISABLED, _val.R_DISCARD_DISABLED, _val.R_READ_ONLY,
    _val.R_OVERFLOW, _val.R_BEYOND_END, _val.R_MISALIGNED, _val.R_TOO_MANY_INDIRECT,
)
KIND_RW, KIND_DISCARD, KIND_INDIRECT, KIND_REJECT = range(4)

_REC = struct.Struct("<BBBBhHI4xQQQ")  # struct xk_req
_PLAIN = struct.Struct("<xB6xI4xQQQ")  # its op, nseg, id, sector, nr
_SEG = SEGMENT.struct_for("gref", "first_sect", "last_sect", to_end=True)
_seg_iter = _SEG.iter_unpack
_seg_unpack_from = _SEG.unpack_from
_new = tuple.__new__
# The grant refs of an indirect request's pages, by how many (1..8: the kernel refused more segments),
# each Struct made once rather than from a format string per request.
_GREFS = tuple(struct.Struct(f"<{n}I").unpack_from for n in range(MAX_INDIRECT_PAGES_PER_REQUEST + 1))


def engine_name() -> str:
    """The engine asked for: XENBLK_ENGINE (compiled or python), else compiled."""
    name = os.environ.get(ENGINE_ENV, "compiled").strip().lower() or "compiled"
    if name not in ENGINES:
        raise ValueError(f"{ENGINE_ENV}={name!r}: expected one of {', '.join(ENGINES)}")
    return name


def _lib():
    """(ffi, lib) when the compiled engine is wanted and loads, else None."""
    from . import NativeBuildError, load
    from . import enabled as native_enabled

    if not native_enabled or engine_name() != "compiled":
        return None
    try:
        mod = load()
    except NativeBuildError as e:
        log.warning("compiled intake unavailable, using the Python one: %s", e)
        return None
    return mod.ffi, mod.lib


def make_intake(abi: Abi, limits: RequestLimits) -> RequestIntake:
    """The intake of the engine in force (see the module docstring)."""
    found = _lib()
    if found is None:
        return RequestIntake(abi, limits)
    return CompiledIntake(abi, limits, found)


class CompiledIntake(RequestIntake):
    """RequestIntake with parse() and decode_indirect_segments() decided by intake_kernel.c."""

    __slots__ = ("_ffi", "_lib", "_cfg", "_out", "_outbuf", "_cap", "_seg_off", "_grefs_off",
                 "_parsed", "_journal", "recorded", "_one")

    def __init__(self, abi: Abi, limits: RequestLimits, found=None) -> None:
        super().__init__(abi, limits)
        found = found or _lib()
        if found is None:
            raise RuntimeError("the compiled intake is not available")
        self._ffi, self._lib = found
        lay = layout(abi)
        self._seg_off = lay.seg_offset
        self._grefs_off = lay.indirect.offset("indirect_grefs")
        self._cap = 0
        self._out = None
        self._outbuf: memoryview = memoryview(b"")
        cfg = self._ffi.new("struct xk_intake_cfg *")
        cfg.entry = lay.entry_size
        cfg.id_off = lay.request.offset("id")
        cfg.sector_off = lay.request.offset("sector_number")
        cfg.seg_off = lay.seg_offset
        cfg.discard_nr_off = lay.discard.offset("nr_sectors")
        cfg.indirect_handle_off = lay.indirect.offset("handle")
        self._cfg = cfg
        self._parsed = 0  # slots decoded by the last parse() (its records stay in _out until the next)
        self._journal = None
        self.recorded = -1
        self._one = self._ffi.new("struct xk_req *")  # xk_check_indirect's out-parameter, reused
        self._apply(limits)

    @property
    def cfg_address(self) -> int:
        """Where the struct xk_intake_cfg is (set_limits changes it in place): for the ring engine."""
        return int(self._ffi.cast("uintptr_t", self._cfg))

    def record_into(self, journal_state) -> bool:
        """Write each batch parsed with its ring position into this journal (a CompiledRingJournal's
        c_state: struct xk_journal) in the parse call itself: see parse()."""
        self._journal = journal_state
        return journal_state is not None

    def _apply(self, limits: RequestLimits) -> None:
        cfg = self._cfg
        cfg.sectors = limits.sectors
        cfg.block_mask = limits.block_sectors - 1
        cfg.max_indirect = limits.max_indirect_segments
        cfg.read_only = limits.read_only
        cfg.flush = limits.flush_enabled
        cfg.barrier = limits.barrier_enabled
        cfg.discard = limits.discard_enabled

    def set_limits(self, limits: RequestLimits) -> None:
        super().set_limits(limits)
        self._apply(limits)

    def _records(self, count: int) -> memoryview:
        if count > self._cap:
            self._cap = max(count, 2 * self._cap, 32)
            self._out = self._ffi.new("struct xk_req[]", self._cap)
            self._outbuf = self._ffi.buffer(self._out)
        return self._outbuf

    def parse(self, raw: bytes, count: int, pos: int = -1) -> list:
        """RequestIntake.parse; with `pos` (the batch's ring position) and a journal (record_into),
        the same C call records the batch in the journal unless it holds an indirect request (whose
        frame needs its segments, copied later): `recorded` is then its first request's ref, else
        negative (the caller records it: RingJournal.record_taken)."""
        if count <= 0:
            self.recorded = -1
            return []
        entry = self._entry
        if len(raw) < count * entry:
            raise ValueError(f"{len(raw)} bytes hold fewer than {count} slots")
        buf = self._decode(raw, count, pos)
        return self._build(raw, count, buf)

    def _decode(self, raw: bytes, count: int, pos: int = -1) -> memoryview:
        """The C decisions for count slots of raw, in the records (_out); the journal's record of
        them with `pos` (see parse)."""
        entry = self._entry
        if len(raw) < count * entry:
            raise ValueError(f"{len(raw)} bytes hold fewer than {count} slots")
        buf = self._records(count)
        self._parsed = 0
        if pos >= 0 and self._journal is not None:
            self.recorded = self._lib.xk_parse_record(raw if type(raw) is bytes else self._ffi.from_buffer(raw),
                                                      count, self._cfg, self._out, self._journal, pos)
        else:
            self._lib.xk_parse_slots(raw if type(raw) is bytes else self._ffi.from_buffer(raw),
                                     count, self._cfg, self._out)
            self.recorded = -1
        self._parsed = count
        return buf

    def parse_unless_plain(self, raw: bytes, count: int, pos: int = -1) -> list | None:
        """parse(), or None when every slot is a plain READ/WRITE (1..11 direct segments): then
        nothing is built, the records stay for plain_records() (the copy path's lane takes them).
        `pos`: as parse's (the journal's record)."""
        if count <= 0:
            self.recorded = -1
            return []
        buf = self._decode(raw, count, pos)
        if self._lib.xk_lane_all_plain(self._out, count):
            return None
        return self._build(raw, count, buf)

    def build_last(self, raw: bytes, count: int) -> list:
        """What parse(raw, count) returns, from the records its last decode left (parse_unless_plain's);
        `recorded` stays the last decode's (its journal frame is this batch's)."""
        if self._parsed != count:
            recorded = self.recorded
            out = self.parse(raw, count)
            self.recorded = recorded
            return out
        return self._build(raw, count, self._outbuf)

    def plain_records(self, count: int):
        """(op, nseg, id, sector, nr_sectors) of each record of the last decode (count of them)."""
        return _PLAIN.iter_unpack(self._outbuf[:count * 40])

    def _build(self, raw: bytes, count: int, buf: memoryview) -> list:
        entry = self._entry
        out: list = []
        append = out.append
        seg_off = self._seg_off
        off = 0
        for kind, op, aux, reason, status, handle, nseg, id_, sector, nr in _REC.iter_unpack(buf[:count * 40]):
            if kind == KIND_RW:
                if nseg == 1:
                    segs: tuple = (_seg_unpack_from(raw, off + seg_off),)
                elif nseg:
                    start = off + seg_off
                    segs = tuple(_seg_iter(raw[start:start + nseg * 8]))
                else:
                    segs = ()
                append(_new(Request, (op, id_, handle, sector, segs, nr, False)))
            elif kind == KIND_REJECT:
                append(_new(Rejection, (id_, op, status, REASONS[reason])))
            elif kind == KIND_DISCARD:
                append(_new(DiscardRequest, (op, id_, handle, sector, nr, aux)))
            else:
                grefs = _GREFS[indirect_pages_for(nseg)](raw, off + self._grefs_off)
                append(_new(IndirectRequest, (op, aux, id_, handle, sector, nseg, grefs)))
            off += entry
        return out

    @property
    def entry_size(self) -> int:
        return self._entry

    @property
    def seg_offset(self) -> int:
        return self._seg_off

    @property
    def grefs_offset(self) -> int:
        """Where an indirect request's indirect_grefs lie in its slot (for the ring engine)."""
        return self._grefs_off

    def last_records(self, count: int):
        """The struct xk_req records of the last parse() (for the copy path's lane: copy_lane.py),
        or None unless it decoded `count` slots."""
        return self._out if count and self._parsed == count else None

    def decode_indirect_segments(self, header: IndirectRequest, pages_bytes) -> Request | Rejection:
        """As Validator.decode_indirect_segments, every check in C (xk_check_indirect). The segments stay
        in wire form (WireSegments: nothing on the copy path unpacks them). pages_bytes of exactly the
        segments' bytes, as bytes (immutable: IndirectPages.resolve's), is used as is, not copied again."""
        need = header.nr_segments << 3
        if type(pages_bytes) is bytes and len(pages_bytes) == need:
            raw = pages_bytes
        else:
            if len(pages_bytes) < need:
                raise ValueError(f"indirect pages hold {len(pages_bytes)} bytes, need {need}")
            raw = bytes(memoryview(pages_bytes).cast("B")[:need])
        out = self._one
        iop = header.indirect_op
        why = self._lib.xk_check_indirect(raw, header.nr_segments, iop, header.sector, self._cfg, out)
        if why:
            return _new(Rejection, (header.id, iop, out.status, REASONS[why]))
        return _new(Request, (iop, header.id, header.handle, header.sector, WireSegments(raw), out.nr, True))


__all__ = ["CompiledIntake", "ENGINES", "ENGINE_ENV", "REASONS", "engine_name", "make_intake"]
