"""The in-flight journal of one ring: what was taken, what was answered, what was published.

A killed backend leaves the shared ring in a state no new process can read
back: responses are written into the slots of requests, in completion
order, so an unanswered request's slot may already hold another request's
response, and a slot past rsp_prod may hold a request that was answered
and published long ago. The journal is what a new process reads instead.
For every ring the worker records, in a memory area that outlives the
process (a file on tmpfs, journal_file.py):

  record_taken(first_pos, raw, n, indirect)   BEFORE any storage I/O of those requests:
        the private copy of n consecutive ring slots from ring position first_pos (the
        bytes the intake decoded) and, per indirect request, the private copy of its
        segments (the bytes decode_indirect_segments read). Returns the first request's
        `ref`; request i of the batch is ref + i.
  record_answered(ref, status, rsp_pos)       BEFORE the response is written into the ring:
        request ref is answered with status at response position rsp_pos.
  record_answers(answered, first_rsp_pos)     the same for the answers of one push at once: the
        objects' .jref answered .status at response positions first_rsp_pos, +1, ... (a jref < 0
        is a response of no journaled request), BEFORE any of them is written.
  published(rsp_prod)                          AFTER rsp_prod is published: the records whose
        answers are all before rsp_prod are dead and their room is reused.

A compiled ring engine calls the same (refs are plain ints). journal_compiled.py writes the same
bytes from C (journal_kernel.c): this class is its reference.

Crash consistency. The area is shared memory (tmpfs page cache): a SIGKILL
loses no store the process made, only the ones it had not made yet; no
fsync is needed, and a record can only be torn by a kill in the middle of
writing it. So:
  * a batch is one frame: [seq, first_pos, n, indirect bytes, crc][answers][raw slots]
    [indirect lengths][indirect bytes]; the crc (over the header fields and every byte of
    the copy) is stored last, by the same pack that writes the header: a frame whose crc
    does not match was being written and is not trusted (its requests were not started:
    the new process takes them from the ring again, where they still are, since nothing
    was answered for them);
  * an answer is ONE aligned 8-byte store (tag of the frame's seq | status | rsp_pos): it
    is there or not, never half; a tag that does not match the frame's seq is not an answer;
  * a frame is freed by one 8-byte store of 0 over its seq, which breaks its crc;
  * the header's taken_to and published words (4-byte stores) are hints the takeover
    checks the ring against, never the only record of anything;
  * the header names the process that writes the journal (pid and start time, two slots
    and a selector word flipped by one store: never half of one and half of the other),
    so that the next one can wait for it to be gone (writer_fence.py). A journal of an
    earlier release has the selector 0 there: no writer named.

This module is sans-I/O: it works on any writable buffer (a bytearray in
unit tests, an mmap in the service). The takeover decisions are takeover.py's.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from ...blkif.constants import U32_MASK

MAGIC = b"XBVJRNL1"
VERSION = 1
HEADER_SIZE = 4096
FRAME_ALIGN = 64
MAX_IDENTITY = 1024

# Header: magic, version, geometry, identity (all covered by hdr_crc, written
# once at creation), then two live words at fixed offsets outside the crc.
_HDR = struct.Struct("<8sIIIIIII")  # magic version frames per_frame entry_size indirect_bytes id_len hdr_crc
_TAKEN_TO = 2048  # u32: ring position after the last request recorded
_PUBLISHED = 2052  # u32: rsp_prod last published
_TAKEN_TO_WORD = _TAKEN_TO // 4
_PUBLISHED_WORD = _PUBLISHED // 4
_WRITER_SLOT = 2056  # u32: 0 no writer named, 1 or 2: which of the two slots below names it
_WRITER_SLOTS = (2064, 2080)  # u64 pid, u64 start time (clock ticks after boot) each
# Frame header: seq, first_pos, n, ind_total, crc (crc last: written last by the same pack).
_FRAME = struct.Struct("<QIHHII")  # seq first_pos n flags ind_total crc
_FRAME_FIELDS = struct.Struct("<QIHHI")  # what the crc covers of the header
_FRAME_PACK_INTO = _FRAME.pack_into
_FRAME_FIELDS_PACK = _FRAME_FIELDS.pack
_crc32 = zlib.crc32
_HAS_INDIRECT = 1  # flags: the frame carries per-request indirect lengths
_ANSWERS = 32  # byte offset of the answer words in a frame
_TAG_SHIFT = 40
_STATUS_SHIFT = 32
_TAG_MOD = (1 << 24) - 1
_HEADER_WORDS = HEADER_SIZE // 8


class Answered(Protocol):
    """What record_answers reads of an answer (the ring worker's Slot is one)."""

    @property
    def jref(self) -> int: ...

    @property
    def status(self) -> int: ...


class InflightJournal(Protocol):
    """What a ring engine (the Python RingWorker, or a compiled one) calls; RingJournal is the one."""

    @property
    def room(self) -> int:
        """How many requests the next record_taken may hold (0: none until the next publish)."""
        ...

    def record_taken(self, first_pos: int, raw: bytes, n: int,
                     indirect: list[tuple[int, bytes]] | None = None) -> int:
        ...

    def record_answered(self, ref: int, status: int, rsp_pos: int) -> None:
        ...

    def record_answers(self, answered: Sequence[Answered], first_rsp_pos: int) -> None:
        ...

    def published(self, rsp_prod: int) -> None:
        ...


class JournalCorrupt(Exception):
    """The area does not hold a journal of ours (bad magic, version, geometry or crc)."""


class JournalFull(Exception):
    """No free frame (the caller takes no more requests than `room` says)."""


def _tag(seq: int) -> int:
    """The 24-bit tag an answer carries of its frame's seq (never 0, so a zero word is no answer)."""
    return seq % _TAG_MOD + 1


def _crc(fields: bytes, raw, lens, ind) -> int:
    c = zlib.crc32(raw)
    if lens is not None and ind is not None:
        c = zlib.crc32(lens, c)
        c = zlib.crc32(ind, c)
    c = zlib.crc32(fields, c)
    return c or 1  # 0 is what a zeroed header holds: never a valid crc


@dataclass(frozen=True)
class JournalGeometry:
    """How the area is cut: `frames` frames of up to `per_frame` requests each."""

    frames: int
    per_frame: int
    entry_size: int  # bytes of one ring slot (the ABI's)
    indirect_bytes: int  # most bytes of indirect segments one request can carry

    @property
    def _lens_offset(self) -> int:
        return _ANSWERS + 8 * self.per_frame

    @property
    def _raw_offset(self) -> int:
        return self._lens_offset + (-(-2 * self.per_frame // 8) * 8)

    @property
    def _ind_offset(self) -> int:
        return self._raw_offset + self.per_frame * self.entry_size

    @property
    def frame_size(self) -> int:
        end = self._ind_offset + self.per_frame * self.indirect_bytes
        return -(-end // FRAME_ALIGN) * FRAME_ALIGN

    @property
    def size(self) -> int:
        return HEADER_SIZE + self.frames * self.frame_size

    @classmethod
    def for_ring(cls, slots: int, entry_size: int, max_indirect_segments: int, per_frame: int = 64
                 ) -> JournalGeometry:
        """Enough frames that a batch always finds room while a slot is free.

        Every request in flight (at most `slots`) can pin a frame of its own
        (out-of-order completion); answered-but-unpublished ones pin theirs
        only until the push that follows in the same step. A batch of up to
        min(free slots, per_frame) requests needs one frame.
        """
        per_frame = max(1, min(per_frame, slots))
        return cls(frames=slots + 1, per_frame=per_frame, entry_size=entry_size,
                   indirect_bytes=max_indirect_segments * 8)


@dataclass(frozen=True)
class FrameImage:
    """One valid frame as read back: a batch taken, with its answers so far."""

    index: int
    seq: int
    first_pos: int
    raw: bytes  # n slots back to back, entry_size apart
    indirect: tuple[bytes | None, ...]  # per request: its segment bytes, b"" if its copy failed, None if not indirect
    answers: tuple[tuple[int, int] | None, ...]  # per request: (status, rsp_pos) or None

    @property
    def n(self) -> int:
        return len(self.answers)

    def position(self, i: int) -> int:
        return (self.first_pos + i) & U32_MASK


@dataclass(frozen=True)
class JournalImage:
    """What a journal area holds, read without changing it."""

    geometry: JournalGeometry
    identity: bytes
    taken_to: int
    published: int
    frames: tuple[FrameImage, ...]  # the valid ones, by seq
    writer: tuple[int, int] | None = None  # (pid, start time) of the process that wrote it last, if named


def _status_of(word: int) -> int:
    s = (word >> _STATUS_SHIFT) & 0xFF
    return s - 0x100 if s & 0x80 else s


def read_header(buf) -> tuple[JournalGeometry, bytes]:
    view = memoryview(buf)
    if len(view) < HEADER_SIZE:
        raise JournalCorrupt(f"{len(view)} bytes: shorter than a journal header")
    magic, version, frames, per_frame, entry_size, indirect_bytes, id_len, crc = _HDR.unpack_from(view, 0)
    if magic != MAGIC:
        raise JournalCorrupt("not a journal (bad magic)")
    if version != VERSION:
        raise JournalCorrupt(f"journal version {version}, this backend reads {VERSION}")
    if id_len > MAX_IDENTITY or not (0 < per_frame <= 4096 and 0 < frames <= 1 << 20 and 0 < entry_size <= 4096):
        raise JournalCorrupt("impossible geometry")
    identity = bytes(view[_HDR.size:_HDR.size + id_len])
    expect = zlib.crc32(identity, zlib.crc32(_HDR.pack(magic, version, frames, per_frame, entry_size,
                                                         indirect_bytes, id_len, 0)))
    if crc != expect:
        raise JournalCorrupt("header checksum mismatch")
    geometry = JournalGeometry(frames, per_frame, entry_size, indirect_bytes)
    if len(view) < geometry.size:
        raise JournalCorrupt(f"{len(view)} bytes, geometry needs {geometry.size}")
    return geometry, identity


def format_area(buf, geometry: JournalGeometry, identity: bytes, *, taken_to: int, published: int) -> None:
    """Write an empty journal into buf (every frame free)."""
    if len(identity) > MAX_IDENTITY:
        raise ValueError("identity too long")
    view = memoryview(buf).cast("B")
    if len(view) < geometry.size:
        raise ValueError(f"buffer of {len(view)} bytes, geometry needs {geometry.size}")
    # Frames first (a zero seq word: free), the header last: a kill in
    # between leaves no valid header, so nothing half-made is read back.
    view[:HEADER_SIZE] = bytes(HEADER_SIZE)
    fs = geometry.frame_size
    zero = bytes(_FRAME.size)
    for f in range(geometry.frames):
        off = HEADER_SIZE + f * fs
        view[off:off + _FRAME.size] = zero
    words = view[:HEADER_SIZE].cast("I")
    words[_TAKEN_TO // 4] = taken_to & U32_MASK
    words[_PUBLISHED // 4] = published & U32_MASK
    fields = (MAGIC, VERSION, geometry.frames, geometry.per_frame, geometry.entry_size, geometry.indirect_bytes,
              len(identity))
    crc = zlib.crc32(identity, zlib.crc32(_HDR.pack(*fields, 0)))
    view[_HDR.size:_HDR.size + len(identity)] = identity
    _HDR.pack_into(view, 0, *fields, crc)


def read_image(buf) -> JournalImage:
    """Every valid frame of the area, with its answers (raises JournalCorrupt on a bad header)."""
    geometry, identity = read_header(buf)
    view = memoryview(buf).cast("B")
    words = view[:HEADER_SIZE].cast("I")
    g = geometry
    fs = g.frame_size
    frames = []
    for f in range(g.frames):
        base = HEADER_SIZE + f * fs
        seq, first_pos, n, flags, ind_total, crc = _FRAME.unpack_from(view, base)
        if not seq or not 0 < n <= g.per_frame or ind_total > g.per_frame * g.indirect_bytes:
            continue
        raw = bytes(view[base + g._raw_offset:base + g._raw_offset + n * g.entry_size])
        lens = ind = None
        if flags & _HAS_INDIRECT:
            lens = bytes(view[base + g._lens_offset:base + g._lens_offset + 2 * n])
            ind = bytes(view[base + g._ind_offset:base + g._ind_offset + ind_total])
        if _crc(_FRAME_FIELDS.pack(seq, first_pos, n, flags, ind_total), raw, lens, ind) != crc:
            continue  # torn (killed while writing it) or freed
        indirect: list[bytes | None] = [None] * n
        if lens is not None and ind is not None:
            off = 0
            for i, ln in enumerate(struct.unpack_from(f"<{n}H", lens)):
                if ln == 0xFFFF:
                    indirect[i] = b""
                elif ln:
                    indirect[i] = ind[off:off + ln]
                    off += ln
        tag = _tag(seq)
        answers: list[tuple[int, int] | None] = []
        for i in range(n):
            (w,) = struct.unpack_from("<Q", view, base + _ANSWERS + 8 * i)
            answers.append((_status_of(w), w & U32_MASK) if w and w >> _TAG_SHIFT == tag else None)
        frames.append(FrameImage(f, seq, first_pos, raw, tuple(indirect), tuple(answers)))
    frames.sort(key=lambda fr: fr.seq)
    writer = None
    slot = words[_WRITER_SLOT // 4]
    if slot in (1, 2):
        writer = struct.unpack_from("<QQ", view, _WRITER_SLOTS[slot - 1])
    return JournalImage(geometry, identity, words[_TAKEN_TO // 4], words[_PUBLISHED // 4], tuple(frames),
                        writer)


INDIRECT_COPY_FAILED = b""  # record_taken's marker for an indirect request whose pages could not be copied


def indirect_lengths(indirect, n: int) -> tuple[list[int], list[bytes]]:
    """A batch's indirect copies as the frame stores them: each request's byte count (0: none,
    0xFFFF: its pages could not be copied, answered ERROR) and the copies to join, in order.
    Shared by RingJournal and the compiled writer (journal_compiled.py)."""
    lens_list = [0] * n
    parts = []
    for i, data in indirect:
        if data:
            lens_list[i] = len(data)
            parts.append(data)
        else:
            lens_list[i] = 0xFFFF
    return lens_list, parts


class RingJournal:
    """The writer over a formatted area (format_area, or adopt() after a takeover)."""

    def __init__(self, buf, geometry: JournalGeometry) -> None:
        view = memoryview(buf).cast("B")
        if len(view) < geometry.size:
            raise ValueError("buffer shorter than the geometry")
        self.geometry = geometry
        self._view = view
        self._words = view.cast("Q")  # answer and seq words: one aligned 8-byte store each
        self._hwords = view[:HEADER_SIZE].cast("I")
        g = geometry
        self._fs = g.frame_size
        self._wpf = g.frame_size // 8  # words per frame
        self._per_frame = g.per_frame
        self._entry = g.entry_size
        self._raw_off = g._raw_offset
        self._lens_off = g._lens_offset
        self._ind_off = g._ind_offset
        self._zeros = [bytes(8 * k) for k in range(g.per_frame + 1)]  # a batch of k clears k answer words
        self._ref0 = _HEADER_WORDS + _ANSWERS // 8  # ref of request 0 of frame 0
        self._free = list(range(g.frames - 1, -1, -1))
        self._pending = [0] * g.frames  # requests of the frame not answered yet
        self._tags = [0] * g.frames  # pre-shifted answer tag of the frame in use
        self._done: list[tuple[int, int]] = []  # (frame, last rsp_pos): all answered, not yet published
        self._last_rsp = [0] * g.frames
        self._seq = 0

    # -------------------------------------------------------------- capacity

    @property
    def room(self) -> int:
        """How many requests the next record_taken may hold (0: wait for a publish)."""
        return self._per_frame if self._free else 0

    @property
    def frames_in_use(self) -> int:
        return self.geometry.frames - len(self._free)

    # -------------------------------------------------------------- the three calls

    def record_taken(self, first_pos: int, raw: bytes, n: int,
                     indirect: list[tuple[int, bytes]] | None = None) -> int:
        """Record n requests copied from ring position first_pos; returns the first one's ref.

        indirect: (i, segment bytes) for request i of the batch that is indirect;
        INDIRECT_COPY_FAILED for one whose pages could not be copied.
        """
        # The hot path of every batch: locals and precomputed offsets only
        # (bench_journal.py measures it), the same stores in the same order.
        if not 0 < n <= self._per_frame:
            raise ValueError(f"{n} requests in one frame (at most {self._per_frame})")
        free = self._free
        if not free:
            raise JournalFull("no free journal frame")
        f = free.pop()
        self._seq = seq = self._seq + 1
        view = self._view
        base = HEADER_SIZE + f * self._fs
        a = base + _ANSWERS
        view[a:a + 8 * n] = self._zeros[n]
        nbytes = n * self._entry
        if len(raw) != nbytes:
            raw = raw[:nbytes]
        r = base + self._raw_off
        view[r:r + nbytes] = raw
        first_pos &= U32_MASK
        if indirect:
            lens_list, parts = indirect_lengths(indirect, n)
            lens = struct.pack(f"<{n}H", *lens_list)
            ind = b"".join(parts)
            ind_total = len(ind)
            lo = base + self._lens_off
            view[lo:lo + 2 * n] = lens
            io = base + self._ind_off
            view[io:io + ind_total] = ind
            crc = _crc(_FRAME_FIELDS.pack(seq, first_pos, n, _HAS_INDIRECT, ind_total), raw, lens, ind)
            _FRAME.pack_into(view, base, seq, first_pos, n, _HAS_INDIRECT, ind_total, crc)
        else:
            crc = _crc32(_FRAME_FIELDS_PACK(seq, first_pos, n, 0, 0), _crc32(raw)) or 1
            _FRAME_PACK_INTO(view, base, seq, first_pos, n, 0, 0, crc)
        self._hwords[_TAKEN_TO_WORD] = (first_pos + n) & U32_MASK
        self._pending[f] = n
        self._tags[f] = (seq % _TAG_MOD + 1) << _TAG_SHIFT  # _tag(seq), inline
        return self._ref0 + f * self._wpf

    def record_answered(self, ref: int, status: int, rsp_pos: int) -> None:
        """Request `ref` is answered `status` at response position rsp_pos (before the response is written)."""
        f = (ref - self._ref0) // self._wpf
        self._words[ref] = self._tags[f] | ((status & 0xFF) << _STATUS_SHIFT) | (rsp_pos & U32_MASK)
        pending = self._pending
        left = pending[f] = pending[f] - 1
        if not left:
            self._done.append((f, rsp_pos & U32_MASK))

    def record_answers(self, answered: Sequence[Answered], first_rsp_pos: int) -> None:
        """The answers of one push, before any of their responses is written: answered[k].jref is
        answered answered[k].status at response position first_rsp_pos + k (a jref < 0: not a
        journaled request). record_answered's stores for each, in this order; one call per push
        (the ring worker's slots go in as they are: no per-answer call, no lists built)."""
        words = self._words
        tags = self._tags
        pending = self._pending
        ref0 = self._ref0
        wpf = self._wpf
        pos = first_rsp_pos & U32_MASK
        for a in answered:
            ref = a.jref
            if ref >= 0:
                f = (ref - ref0) // wpf
                words[ref] = tags[f] | ((a.status & 0xFF) << _STATUS_SHIFT) | pos
                left = pending[f] = pending[f] - 1
                if not left:
                    self._done.append((f, pos))
            pos = (pos + 1) & U32_MASK

    def published(self, rsp_prod: int) -> None:
        """rsp_prod is published: free the frames whose answers all lie before it."""
        self._hwords[_PUBLISHED_WORD] = rsp_prod & U32_MASK
        done = self._done
        if not done:
            return
        keep = []
        words = self._words
        free = self._free
        wpf = self._wpf
        for f, last in done:
            if (rsp_prod - last - 1) & U32_MASK < 0x80000000:  # last < rsp_prod, modulo 2**32
                words[_HEADER_WORDS + f * wpf] = 0  # seq 0: the crc no longer matches, the frame is free
                free.append(f)
            else:
                keep.append((f, last))
        self._done = keep

    # -------------------------------------------------------------- who writes it

    def set_writer(self, pid: int, start: int) -> None:
        """Name this process as the journal's writer (writer_fence.py): the slot not in use is
        written, then the selector flips to it with one store."""
        slot = 2 if self._hwords[_WRITER_SLOT // 4] == 1 else 1
        struct.pack_into("<QQ", self._view, _WRITER_SLOTS[slot - 1], pid, start)
        self._hwords[_WRITER_SLOT // 4] = slot

    # -------------------------------------------------------------- after a takeover

    def adopt(self, image: JournalImage, rsp_prod: int) -> None:
        """Continue a journal read back as `image`, the ring's rsp_prod being rsp_prod.

        Frames with unanswered requests stay (their refs are frame_ref(f) + i);
        frames answered entirely wait for the publish that covers them; the rest
        (and every torn or freed frame) are free.
        """
        used = set()
        for fr in image.frames:
            self._seq = max(self._seq, fr.seq)
            pending = sum(1 for a in fr.answers if a is None)
            unpublished = [a[1] for a in fr.answers if a is not None and (a[1] - rsp_prod) & U32_MASK
                           < 0x80000000]
            if not pending and not unpublished:
                continue
            used.add(fr.index)
            self._pending[fr.index] = pending
            self._tags[fr.index] = _tag(fr.seq) << _TAG_SHIFT
            if not pending:
                self._done.append((fr.index, max(unpublished, key=lambda p: (p - rsp_prod) & U32_MASK)))
        words = self._words
        for f in range(self.geometry.frames):
            if f not in used:
                words[_HEADER_WORDS + f * self._wpf] = 0
        self._free = [f for f in range(self.geometry.frames - 1, -1, -1) if f not in used]

    def release(self) -> None:
        """Let go of the area (its mapping can be closed after this)."""
        for v in (self._words, self._hwords, self._view):
            v.release()

    def frame_ref(self, frame: int) -> int:
        """The ref of request 0 of a frame (request i: + i)."""
        return _HEADER_WORDS + frame * self._wpf + _ANSWERS // 8
