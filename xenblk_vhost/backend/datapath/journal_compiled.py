"""The ring journal with its batch record compiled (native/journal_kernel.c).

Here, not in native/: it builds on the datapath's RingJournal, and native/ sits below the datapath.

    journal = make_ring_journal(buf, geometry)   # CompiledRingJournal when the engine is "compiled"
                                                 # and the kernels load, else RingJournal (the reference)

CompiledRingJournal is a RingJournal whose record_taken writes its frame with one C call: the very
same bytes in the same order (tests/test_native_journal.py runs random call sequences, takeovers
included, through both and compares the areas, the refs and `room` after every call). The format,
its crash consistency and the takeover are the reference's (journal.py, takeover.py); only who
writes a batch's stores changes (the crc of the slots' copy is still zlib's, called from Python:
faster on kilobytes than a table loop in C). The bookkeeping (which frame, the seq, the unanswered counts) and
record_answered / published stay in Python: an answer is one word, and a C call costs as much as
the interpreter's few operations for it (measured: scripts/bench_journal.py prints both engines).
XENBLK_ENGINE=python (or native.enabled False) keeps the reference, as for the intake.
"""

from __future__ import annotations

import struct
import zlib

from ...native.intake import _lib
from .journal import (
    _HAS_INDIRECT,
    _TAG_MOD,
    _TAG_SHIFT,
    HEADER_SIZE,
    JournalFull,
    JournalGeometry,
    RingJournal,
    indirect_lengths,
)

_crc32 = zlib.crc32


def make_ring_journal(buf, geometry: JournalGeometry) -> RingJournal:
    """The journal writer of the engine in force (see the module docstring)."""
    found = _lib()
    if found is None:
        return RingJournal(buf, geometry)
    return CompiledRingJournal(buf, geometry, found)


class CompiledRingJournal(RingJournal):
    """RingJournal with record_taken's stores done by journal_kernel.c."""

    def __init__(self, buf, geometry: JournalGeometry, found=None) -> None:
        super().__init__(buf, geometry)
        found = found or _lib()
        if found is None:
            raise RuntimeError("the compiled journal is not available")
        ffi, lib = found
        self._ffi = ffi
        self._null = ffi.NULL
        self._area = ffi.from_buffer(self._view)  # released in release(): the mapping can close then
        g = ffi.new("struct xk_journal_geom *")
        g.area = ffi.cast("uint8_t *", self._area)
        g.entry = geometry.entry_size
        g.frame_size = geometry.frame_size
        g.raw_off = geometry._raw_offset
        g.lens_off = geometry._lens_offset
        g.ind_off = geometry._ind_offset
        self._geom = g
        self._frame = lib.xk_journal_frame

    def record_taken(self, first_pos: int, raw: bytes, n: int,
                     indirect: list[tuple[int, bytes]] | None = None) -> int:
        if not 0 < n <= self._per_frame:
            raise ValueError(f"{n} requests in one frame (at most {self._per_frame})")
        free = self._free
        if not free:
            raise JournalFull("no free journal frame")
        nbytes = n * self._entry
        if len(raw) != nbytes:
            if len(raw) < nbytes:
                raise ValueError(f"{len(raw)} bytes of slots for {n} requests")
            raw = raw[:nbytes]
        crc = _crc32(raw)  # zlib's, on the kilobytes; the kernel finishes it over the header
        f = free.pop()
        self._seq = seq = self._seq + 1
        if indirect:
            lens_list, parts = indirect_lengths(indirect, n)
            ind = b"".join(parts)
            if len(ind) > n * self.geometry.indirect_bytes:
                free.append(f)
                self._seq -= 1
                raise ValueError(f"{len(ind)} bytes of indirect segments for {n} requests")
            lens = struct.pack(f"<{n}H", *lens_list)
            self._frame(self._geom, f, seq, first_pos, raw, n, lens, ind, len(ind),
                        _crc32(ind, _crc32(lens, crc)))
        else:
            self._frame(self._geom, f, seq, first_pos, raw, n, self._null, self._null, 0, crc)
        self._pending[f] = n
        self._tags[f] = (seq % _TAG_MOD + 1) << _TAG_SHIFT  # journal._tag(seq)
        return self._ref0 + f * self._wpf

    def release(self) -> None:
        self._ffi.release(self._area)
        super().release()


assert _HAS_INDIRECT == 1 and HEADER_SIZE == 4096  # journal_kernel.c's constants
