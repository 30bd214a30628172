"""The ring journal with its writer compiled (native/journal_kernel.c).

Here, not in native/: it builds on the datapath's RingJournal, and native/ sits below the datapath.

    journal = make_ring_journal(buf, geometry)   # CompiledRingJournal when the engine is "compiled"
                                                 # and the kernels load, else RingJournal (the reference)

CompiledRingJournal is a RingJournal whose state (free frames, seq, unanswered counts, tags, frames
answered but not published) lives in C arrays (struct xk_journal, native.h), so that:
  * the compiled intake writes a batch's frame in the very call that parses it
    (CompiledIntake.record_into(journal.c_state); RingWorker asks for it): the journal's record of
    a batch costs no call of its own, only a memcpy and a crc in C;
  * record_taken (a batch with indirect requests, whose segments come later), record_answered,
    published and record_answers (a push's answers) are one C call each (a push of 1-2 answers:
    one per answer); measured cheaper than the same stores from Python over memoryviews of the
    arrays (bench_journal.py);
  * a compiled ring engine can call xk_journal_answer / xk_journal_published itself on c_state;
  * the ring's push and the journal's published are one C call (make_ring_push, xk_ring_push:
    BackRing.push_responses' stores and verdict, then published), used by RingWorker._push;
  * a push's responses and their answers are one C call (make_ring_answers, xk_ring_answers: per
    answer the journal's store, then BackRing.put_response's bytes), used by RingWorker._finish, with
    or without a journal: the journal then adds a few stores in C to a call the ring makes anyway.
The very same bytes in the same order and the same frames chosen as the reference
(tests/test_native_journal.py runs random call sequences, takeovers and the fused intake included,
through both and compares the areas, the refs and `room` after every call). The format, its crash
consistency and the takeover are the reference's (journal.py, takeover.py).
XENBLK_ENGINE=python (or native.enabled False) keeps the reference, as for the intake.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence
from typing import Literal, Protocol

from ...blkif.abi import layout
from ...blkif.constants import U32_MASK
from ...blkif.ring import BackRing, RingStateError
from ...native.intake import _lib
from .journal import (
    _HAS_INDIRECT,
    _PUBLISHED_WORD,
    _TAG_MOD,
    _TAG_SHIFT,
    HEADER_SIZE,
    Answered,
    JournalFull,
    JournalGeometry,
    JournalImage,
    RingJournal,
    indirect_lengths,
)

_CTL_FREE = 0  # journal_kernel.c's ctl words: frames free, frames in done[]
_CTL_DONE = 1


def make_ring_journal(buf, geometry: JournalGeometry) -> RingJournal:
    """The journal writer of the engine in force (see the module docstring)."""
    found = _lib()
    if found is None:
        return RingJournal(buf, geometry)
    return CompiledRingJournal(buf, geometry, found)


class CompiledRingJournal(RingJournal):
    """RingJournal with its bookkeeping in C arrays and its stores done by journal_kernel.c."""

    def __init__(self, buf, geometry: JournalGeometry, found=None) -> None:
        super().__init__(buf, geometry)
        found = found or _lib()
        if found is None:
            raise RuntimeError("the compiled journal is not available")
        ffi, lib = found
        self._ffi = ffi
        self._null = ffi.NULL
        frames = geometry.frames
        self._area = ffi.from_buffer(self._view)  # released in release(): the mapping can close then
        arrays = {"ctl": ffi.new("uint32_t[]", 2), "free_": ffi.new("uint32_t[]", frames),
                  "pending": ffi.new("uint32_t[]", frames), "tags": ffi.new("uint64_t[]", frames),
                  "done": ffi.new("uint32_t[]", 2 * frames), "seq": ffi.new("uint64_t[]", 1)}
        self._arrays = arrays  # owned here: c_state points into them
        j = ffi.new("struct xk_journal *")
        j.area = ffi.cast("uint8_t *", self._area)
        j.entry = geometry.entry_size
        j.frame_size = geometry.frame_size
        j.raw_off = geometry._raw_offset
        j.lens_off = geometry._lens_offset
        j.ind_off = geometry._ind_offset
        j.per_frame = geometry.per_frame
        j.wpf = self._wpf
        j.ref0 = self._ref0
        for name, arr in arrays.items():
            setattr(j, name, arr)
        self.c_state = j  # for CompiledIntake.record_into and a compiled ring engine
        self.c_state_address = int(ffi.cast("uintptr_t", j))  # (the ring engine's: ring_engine.py)

        def view(name: str, fmt: Literal["I", "Q"]) -> memoryview:
            return memoryview(ffi.buffer(arrays[name])).cast("B").cast(fmt)

        self._ctl = view("ctl", "I")
        self._cfree = view("free_", "I")
        self._cdone = view("done", "I")
        self._cseq = view("seq", "Q")
        # The reference's per-frame lists become views of the C arrays (adopt() writes them as is).
        self._pending = view("pending", "I")  # type: ignore[assignment]
        self._tags = view("tags", "Q")  # type: ignore[assignment]
        self._store_lists(self._free, self._done, self._seq)
        self._take = lib.xk_journal_take
        self._answer = lib.xk_journal_answer
        self._answers = lib.xk_journal_answers
        self._publish = lib.xk_journal_published

    def _store_lists(self, free: list[int], done: list[tuple[int, int]], seq: int) -> None:
        """The reference's free stack, done list and seq into the C arrays."""
        for k, f in enumerate(free):
            self._cfree[k] = f
        for k, (f, last) in enumerate(done):
            self._cdone[2 * k] = f
            self._cdone[2 * k + 1] = last
        self._ctl[_CTL_FREE] = len(free)
        self._ctl[_CTL_DONE] = len(done)
        self._cseq[0] = seq

    @property
    def room(self) -> int:
        return self._per_frame if self._ctl[_CTL_FREE] else 0

    @property
    def frames_in_use(self) -> int:
        return self.geometry.frames - self._ctl[_CTL_FREE]

    def record_taken(self, first_pos: int, raw: bytes, n: int,
                     indirect: list[tuple[int, bytes]] | None = None) -> int:
        if not 0 < n <= self._per_frame:
            raise ValueError(f"{n} requests in one frame (at most {self._per_frame})")
        if not self._ctl[_CTL_FREE]:
            raise JournalFull("no free journal frame")
        nbytes = n * self._entry
        if len(raw) != nbytes:
            if len(raw) < nbytes:
                raise ValueError(f"{len(raw)} bytes of slots for {n} requests")
            raw = raw[:nbytes]
        if indirect:
            lens_list, parts = indirect_lengths(indirect, n)
            ind = b"".join(parts)
            if len(ind) > n * self.geometry.indirect_bytes:
                raise ValueError(f"{len(ind)} bytes of indirect segments for {n} requests")
            lens = struct.pack(f"<{n}H", *lens_list)
            ref = self._take(self.c_state, first_pos & U32_MASK, raw, n, lens, ind, len(ind))
        else:
            ref = self._take(self.c_state, first_pos & U32_MASK, raw, n, self._null, self._null, 0)
        if ref < 0:  # checked above: only a released journal gets here
            raise JournalFull("journal released")
        return ref

    def record_answered(self, ref: int, status: int, rsp_pos: int) -> None:
        self._answer(self.c_state, ref, status, rsp_pos & U32_MASK)

    def record_answers(self, answered: Sequence[Answered], first_rsp_pos: int) -> None:
        # From 3 answers on, one C call with them packed (ref << 8 | status byte; a list cffi turns
        # into an array: ~80 ns an answer here), else one call per answer (~160 ns each, no fixed
        # cost); both beat the same stores from Python over views of the C arrays (a u64 tag read
        # back makes a new int each time). bench_journal.py measures the whole.
        n = len(answered)
        if n > 2:
            self._answers(self.c_state, [a.jref << 8 | (a.status & 0xFF) for a in answered], n,
                          first_rsp_pos & U32_MASK)
            return
        if n == 1:  # QD1's push
            a = answered[0]
            if a.jref >= 0:
                self._answer(self.c_state, a.jref, a.status, first_rsp_pos & U32_MASK)
            return
        answer = self._answer
        state = self.c_state
        pos = first_rsp_pos & U32_MASK
        for a in answered:
            ref = a.jref
            if ref >= 0:
                answer(state, ref, a.status, pos)
            pos = (pos + 1) & U32_MASK

    def published(self, rsp_prod: int) -> None:
        if self._ctl[_CTL_DONE]:
            self._publish(self.c_state, rsp_prod & U32_MASK)
        else:
            self._hwords[_PUBLISHED_WORD] = rsp_prod & U32_MASK

    def adopt(self, image: JournalImage, rsp_prod: int) -> None:
        # The reference's adopt over lists (the per-frame arrays are views already), then into C.
        self._seq = self._cseq[0]
        self._done = [(self._cdone[2 * k], self._cdone[2 * k + 1]) for k in range(self._ctl[_CTL_DONE])]
        super().adopt(image, rsp_prod)
        self._store_lists(self._free, self._done, self._seq)

    def release(self) -> None:
        self.c_state.area = self._null  # the C calls write nothing after this (their mapping may close)
        self._ctl[_CTL_FREE] = 0
        self._ffi.release(self._area)
        super().release()


assert _HAS_INDIRECT == 1 and HEADER_SIZE == 4096 and _TAG_SHIFT == 40 and _TAG_MOD == (1 << 24) - 1


def _page_address(ffi, ring: BackRing):
    """The shared ring page's address as a uint8_t *. The address, not a buffer export: the Vbd
    releases the ring's view before it unmaps (an export would forbid both); so every call through it
    checks the view first (a released view raises, as BackRing's own calls would), and while the view
    is not released the page is mapped."""
    held = ffi.from_buffer(ring.view)
    try:
        return ffi.cast("uint8_t *", ffi.cast("uintptr_t", held))
    finally:
        ffi.release(held)


class CompiledPush:
    """A ring's push (BackRing.push_responses, the reference) with its journal's published() folded
    in: one C call (xk_ring_push) where the ring worker made two Python calls."""

    def __init__(self, ring: BackRing, journal: CompiledRingJournal | None, found) -> None:
        ffi, lib = found
        self._sring = _page_address(ffi, ring)  # push() checks the view first (see _page_address)
        self._ring = ring
        self._view = ring.view
        self._state = journal.c_state if journal is not None else ffi.NULL
        self._push = lib.xk_ring_push

    def push(self) -> bool:
        """Publish the responses written so far (and free what the journal may); whether to notify."""
        self._view.nbytes  # noqa: B018 - raises ValueError once the view is released (the ring unmapped)
        return self._push(self._sring, self._ring.rsp_prod_pvt, self._state) != 0


_LIST_FROM = 4  # CompiledAnswers: a push of this many answers or more goes in one list call


class AnsweredSlot(Answered, Protocol):
    """What CompiledAnswers reads of an answer: the journal's (jref, status) and the response's
    (req_id, op); the ring worker's Slot is one."""

    @property
    def req_id(self) -> int: ...

    @property
    def op(self) -> int: ...


class CompiledAnswers:
    """A push's responses and their journal answers (the reference: journal.record_answers, then
    BackRing.put_response per answer) in one C call (xk_ring_answers; xk_ring_answer for a push of
    one), with or without a journal. The same stores in the same order per answer, the journal's
    first (tests/test_native_journal.py compares the ring and the journal areas)."""

    def __init__(self, ring: BackRing, journal: CompiledRingJournal | None, found) -> None:
        ffi, lib = found
        rsp_size = layout(ring.abi).response.size
        if rsp_size > 16:
            raise ValueError(f"a {rsp_size}-byte response: xk_ring_answers writes at most 16")
        ctx = ffi.new("struct xk_rsp_ring *")
        ctx.sring = _page_address(ffi, ring)
        ctx.mask = ring.size - 1
        ctx.entry = layout(ring.abi).entry_size
        ctx.rsp_size = rsp_size
        ctx.j = journal.c_state if journal is not None else ffi.NULL
        self._ctx = ctx
        self._ffi = ffi
        self._ring = ring
        self._view = ring.view
        self._one = lib.xk_ring_answer
        self._many = lib.xk_ring_answers
        self._journaled = journal is not None

    @property
    def ctx_address(self) -> int:
        """The struct xk_rsp_ring (the ring engine answers through it)."""
        return int(self._ffi.cast("uintptr_t", self._ctx))

    @property
    def sring_address(self) -> int:
        """The shared ring page (see _page_address: check the view before each use)."""
        return int(self._ffi.cast("uintptr_t", self._ctx.sring))

    def answer(self, answered: Sequence[AnsweredSlot]) -> int:
        """Write the responses of these answers at rsp_prod_pvt on (recorded in the journal first);
        how many are not RSP_OKAY. RingStateError (nothing written) if the ring has fewer consumed
        requests left to answer than that: our bug, never the guest's."""
        ring = self._ring
        self._view.nbytes  # noqa: B018 - raises ValueError once the view is released (the ring unmapped)
        pvt = ring.rsp_prod_pvt
        n = len(answered)
        if ((ring.req_cons - pvt) & 0xFFFFFFFF) < n:  # (U32_MASK: a literal saves QD1 a global lookup)
            raise RingStateError("responses without consumed requests to answer")
        # Which way is cheapest by the push's size (per answer at 1 / 2 / 4 / 8 / 64, no journal: the
        # list call 0.62 / 0.53 / 0.53 / 0.26 / 0.17 us, BackRing.put_response 0.53 / 0.41 / 0.36 /
        # 0.23 / 0.22): lists from 4 answers on (with a journal they also replace record_answers'
        # own list call); below, one call per answer with a journal (it saves the journal's call),
        # BackRing's puts without one (nothing to save). RingWorker without a journal calls this
        # only from 16 answers on.
        if n == 1 and self._journaled:  # QD1's push
            a = answered[0]
            ring.rsp_prod_pvt = (pvt + 1) & 0xFFFFFFFF
            return self._one(self._ctx, pvt, a.req_id, a.jref, a.op, a.status)
        if n >= _LIST_FROM:
            errors = self._many(self._ctx, pvt, [a.req_id for a in answered],
                                [(a.jref + 1) << 16 | a.op << 8 | (a.status & 0xFF) for a in answered], n)
        elif self._journaled:
            one = self._one
            ctx = self._ctx
            errors = 0
            pos = pvt
            for a in answered:
                errors += one(ctx, pos, a.req_id, a.jref, a.op, a.status)
                pos = (pos + 1) & U32_MASK
        else:
            put = ring.put_response
            errors = 0
            for a in answered:
                status = a.status
                put(a.req_id, a.op, status)
                if status:
                    errors += 1
            return errors
        ring.rsp_prod_pvt = (pvt + n) & U32_MASK
        return errors

    def answer_held(self, lane, n: int, now: float, latency) -> None:
        """answer() for the n slots a copy lane's complete_held walked (copy_lane.py: their ids, ops
        and journal refs are in its table; all OKAY): the same stores, from one C call
        (lane.answer_held through this ring's context), their latency counted in `latency`."""
        ring = self._ring
        self._view.nbytes  # noqa: B018 - raises ValueError once the view is released (the ring unmapped)
        pvt = ring.rsp_prod_pvt
        if ((ring.req_cons - pvt) & U32_MASK) < n:
            raise RingStateError("responses without consumed requests to answer")
        lane.answer_held(self._ctx, pvt, n, now, latency)
        ring.rsp_prod_pvt = (pvt + n) & U32_MASK


def _compiled_for(journal):
    """(ffi, lib) when the compiled engine serves a ring with this journal (None: no journal), else
    None: the Python engine, or a journal that is not compiled."""
    found = _lib()
    if found is None or (journal is not None and not isinstance(journal, CompiledRingJournal)):
        return None
    return found


def make_compiled_answers(ring: BackRing, journal) -> CompiledAnswers | None:
    """The compiled answers for this ring and its journal (None: no journal), or None where the ring
    worker keeps journal.record_answers + BackRing.put_response (see _compiled_for)."""
    found = _compiled_for(journal)
    return CompiledAnswers(ring, journal, found) if found is not None else None


def make_ring_answers(ring: BackRing, journal) -> Callable[[Sequence[AnsweredSlot]], int] | None:
    """make_compiled_answers' answer(), or None."""
    answers = make_compiled_answers(ring, journal)
    return answers.answer if answers is not None else None


def make_ring_push(ring: BackRing, journal) -> Callable[[], bool] | None:
    """The compiled push for this ring and its journal (None: no journal), or None where the ring
    worker keeps BackRing.push_responses + journal.published (see _compiled_for)."""
    found = _compiled_for(journal)
    return CompiledPush(ring, journal, found).push if found is not None else None
