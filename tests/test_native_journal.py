"""The compiled batch record (native/journal_kernel.c, via datapath/journal_compiled.py) writes the same bytes.

RingJournal (backend/datapath/journal.py, pure Python) is the reference. Random call sequences go
through both, each over its own area: batches of random sizes at random ring positions (across the
u32 wrap), indirect segment copies and failed ones, slots longer than the batch, answers one by one
and in whole pushes (record_answers) in any order and with any status, publishes at any point, and
takeovers (read the area back, adopt it in a new writer) in the middle. After every call the two
areas must be byte for byte equal, and so must the refs returned, `room` and the frames in use;
refusals (a full journal, a batch too big) must be the same exceptions. A last check runs the
takeover plan on the compiled writer's area: the frames it wrote are read back as valid.
"""

from __future__ import annotations

import random
import zlib
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from xenblk_vhost.backend.datapath import journal_compiled as native_journal
from xenblk_vhost.backend.datapath.journal import (
    INDIRECT_COPY_FAILED,
    JournalFull,
    JournalGeometry,
    RingJournal,
    format_area,
    read_image,
)
from xenblk_vhost.backend.datapath.journal_compiled import CompiledRingJournal, make_ring_journal
from xenblk_vhost.native.intake import _lib

ENTRY = 112


@dataclass
class _Answer:
    jref: int
    status: int
IDENTITY = b"native-journal-test"


def _pair(geometry: JournalGeometry, taken_to: int):
    a = bytearray(geometry.size)
    b = bytearray(geometry.size)
    format_area(a, geometry, IDENTITY, taken_to=taken_to, published=taken_to)
    format_area(b, geometry, IDENTITY, taken_to=taken_to, published=taken_to)
    return a, b, RingJournal(a, geometry), CompiledRingJournal(b, geometry)


def _same(a, b, ja, jb, where):
    assert a == b, f"areas differ after {where}"
    assert ja.room == jb.room and ja.frames_in_use == jb.frames_in_use, where


def _drive(seed: int, slots: int, per_frame: int, steps: int) -> None:
    rnd = random.Random(seed)
    g = JournalGeometry.for_ring(slots, ENTRY, 16, per_frame=per_frame)
    pos = rnd.choice([0, rnd.randrange(1 << 32), (1 << 32) - 3])
    rsp = pos
    a, b, ja, jb = _pair(g, pos)
    outstanding: list[int] = []
    for step in range(steps):
        r = rnd.random()
        if r < 0.3:
            if len(outstanding) >= slots:
                continue
            n = rnd.randint(1, min(per_frame, slots - len(outstanding)))
            raw = rnd.randbytes(n * ENTRY + rnd.choice([0, 0, 0, ENTRY]))  # the intake may hand a longer copy
            indirect = None
            if rnd.random() < 0.3:
                which = sorted(rnd.sample(range(n), rnd.randint(1, n)))
                indirect = [(i, rnd.choice([INDIRECT_COPY_FAILED, rnd.randbytes(8 * rnd.randint(1, 16))]))
                            for i in which]
            try:
                ra = ja.record_taken(pos, raw, n, indirect)
            except JournalFull:
                with pytest.raises(JournalFull):
                    jb.record_taken(pos, raw, n, indirect)
                continue
            rb = jb.record_taken(pos, raw, n, indirect)
            assert ra == rb, f"refs differ at step {step}"
            outstanding += [ra + i for i in range(n)]
            pos = (pos + n) & 0xFFFFFFFF
        elif r < 0.5 and outstanding:
            ref = outstanding.pop(rnd.randrange(len(outstanding)))
            status = rnd.choice([0, 0, -1, -2])
            ja.record_answered(ref, status, rsp)
            jb.record_answered(ref, status, rsp)
            rsp = (rsp + 1) & 0xFFFFFFFF
        elif r < 0.75 and outstanding:
            # A push's answers at once; some responses are no journaled request's (ref -1).
            k = rnd.randint(1, len(outstanding))
            rnd.shuffle(outstanding)
            refs = outstanding[:k]
            del outstanding[:k]
            for _ in range(rnd.randint(0, 2)):
                refs.insert(rnd.randint(0, len(refs)), -1)
            answered = [_Answer(ref, rnd.choice([0, 0, -1, -2])) for ref in refs]
            ja.record_answers(answered, rsp)
            jb.record_answers(answered, rsp)
            rsp = (rsp + len(refs)) & 0xFFFFFFFF
        elif r < 0.95:
            ja.published(rsp)
            jb.published(rsp)
        else:
            # Takeover: a new writer of each kind continues the area it finds.
            ja.release()
            jb.release()
            ja = RingJournal(a, g)
            jb = CompiledRingJournal(b, g)
            ja.adopt(read_image(a), rsp)
            jb.adopt(read_image(b), rsp)
        _same(a, b, ja, jb, f"step {step}")
    assert read_image(b) == read_image(a)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 1 << 32), slots=st.sampled_from([1, 2, 8, 32, 128]),
       per_frame=st.sampled_from([1, 3, 8, 64]))
def test_compiled_writer_writes_the_references_bytes(seed, slots, per_frame):
    _drive(seed, slots, per_frame, steps=150)


def test_a_full_journal_and_an_oversized_batch_are_refused_alike():
    g = JournalGeometry.for_ring(2, ENTRY, 16, per_frame=2)
    a, b, ja, jb = _pair(g, 0)
    for j in (ja, jb):
        with pytest.raises(ValueError):
            j.record_taken(0, bytes(3 * ENTRY), 3)
        with pytest.raises(ValueError):
            j.record_taken(0, bytes(3 * ENTRY), 0)
        for k in range(g.frames):
            j.record_taken(k, bytes(ENTRY), 1)
        assert j.room == 0
        with pytest.raises(JournalFull):
            j.record_taken(9, bytes(ENTRY), 1)
    assert a == b


def test_the_kernels_crc_is_zlibs():
    found = _lib()
    assert found is not None
    _ffi, lib = found
    for data in (b"", b"a", bytes(range(256)) * 3):
        assert lib.xk_crc32(0, data, len(data)) == zlib.crc32(data)
        assert lib.xk_crc32(7, data, len(data)) == zlib.crc32(data, 7)


def test_the_python_engine_keeps_the_reference(monkeypatch):
    g = JournalGeometry.for_ring(4, ENTRY, 16)
    buf = bytearray(g.size)
    format_area(buf, g, IDENTITY, taken_to=0, published=0)
    assert type(make_ring_journal(buf, g)) is CompiledRingJournal
    monkeypatch.setenv("XENBLK_ENGINE", "python")
    assert type(make_ring_journal(buf, g)) is RingJournal
    assert native_journal.CompiledRingJournal is CompiledRingJournal
