"""The compiled batch record (native/journal_kernel.c, via datapath/journal_compiled.py) writes the same bytes.

RingJournal (backend/datapath/journal.py, pure Python) is the reference. Random call sequences go
through both, each over its own area: batches of random sizes at random ring positions (across the
u32 wrap), indirect segment copies and failed ones, slots longer than the batch, answers one by one
and in whole pushes (record_answers) in any order and with any status, publishes at any point, and
takeovers (read the area back, adopt it in a new writer) in the middle. After every call the two
areas must be byte for byte equal, and so must the refs returned, `room` and the frames in use;
refusals (a full journal, a batch too big) must be the same exceptions. A last check runs the
takeover plan on the compiled writer's area: the frames it wrote are read back as valid.
The compiled side takes each step one of its ways at random, as the ring worker or a compiled
engine would: a batch recorded by the compiled intake's parse call (xk_parse_record, falling back
to record_taken for a batch with an indirect request, as RingWorker does) or by record_taken; a
push's answers through record_answers (Python over the C arrays) or xk_journal_answer per answer;
a publish through published() or xk_journal_published.
"""

from __future__ import annotations

import random
import struct
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
from xenblk_vhost.blkif.abi import Abi, layout
from xenblk_vhost.blkif.validate import RequestLimits
from xenblk_vhost.native.intake import CompiledIntake, _lib

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


def _indirect_slot() -> bytes:
    """A slot the intake parses as an indirect request (a read of one segment)."""
    slot = bytearray(ENTRY)
    slot[0], slot[1] = 6, 0
    slot[2:4] = (1).to_bytes(2, "little")
    return bytes(slot)


def _taken_compiled(rnd, intake, jb, pos, raw, n, indirect):
    """jb records the batch as the ring worker would: by the intake's parse call, or record_taken."""
    if rnd.random() < 0.5:
        return jb.record_taken(pos, raw, n, indirect)
    intake.record_into(jb.c_state)
    batch = intake.parse(raw[:n * ENTRY], n, pos)
    assert len(batch) == n
    if intake.recorded >= 0:
        assert indirect is None, "recorded by the parse although the batch holds an indirect request"
        return intake.recorded
    return jb.record_taken(pos, raw, n, indirect)  # an indirect request in it (or no room): RingWorker's way


def _drive(seed: int, slots: int, per_frame: int, steps: int) -> None:
    rnd = random.Random(seed)
    g = JournalGeometry.for_ring(slots, ENTRY, 16, per_frame=per_frame)
    pos = rnd.choice([0, rnd.randrange(1 << 32), (1 << 32) - 3])
    rsp = pos
    a, b, ja, jb = _pair(g, pos)
    _ffi, lib = _lib()
    intake = CompiledIntake(Abi.X86_64, RequestLimits(sectors=1 << 20, max_indirect_segments=16))
    assert layout(Abi.X86_64).entry_size == ENTRY
    outstanding: list[int] = []
    for step in range(steps):
        r = rnd.random()
        if r < 0.3:
            if len(outstanding) >= slots:
                continue
            n = rnd.randint(1, min(per_frame, slots - len(outstanding)))
            raw = rnd.randbytes(n * ENTRY + rnd.choice([0, 0, 0, ENTRY]))  # the intake may hand a longer copy
            raw = bytes(b if b != 6 else 7 for b in raw[:1]) + raw[1:]  # slot 0 no indirect request by chance
            indirect = None
            if rnd.random() < 0.3:
                which = sorted(rnd.sample(range(n), rnd.randint(1, n)))
                indirect = [(i, rnd.choice([INDIRECT_COPY_FAILED, rnd.randbytes(8 * rnd.randint(1, 16))]))
                            for i in which]
                i = which[0]  # the worker has such a list only for a batch with an indirect request in it
                raw = raw[:i * ENTRY] + _indirect_slot() + raw[(i + 1) * ENTRY:]
            else:  # and none without one
                raw = b"".join(raw[k:k + ENTRY] if raw[k] != 6 else b"\x07" + raw[k + 1:k + ENTRY]
                               for k in range(0, len(raw), ENTRY))
            try:
                ra = ja.record_taken(pos, raw, n, indirect)
            except JournalFull:
                with pytest.raises(JournalFull):
                    _taken_compiled(rnd, intake, jb, pos, raw, n, indirect)
                continue
            rb = _taken_compiled(rnd, intake, jb, pos, raw, n, indirect)
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
            if rnd.random() < 0.5:
                jb.record_answers(answered, rsp)
            else:  # a compiled engine's way: one C call per answer
                for k, ans in enumerate(answered):
                    if ans.jref >= 0:
                        lib.xk_journal_answer(jb.c_state, ans.jref, ans.status, (rsp + k) & 0xFFFFFFFF)
            rsp = (rsp + len(refs)) & 0xFFFFFFFF
        elif r < 0.95:
            pub = (rsp - rnd.choice([0, 0, 0, 1, 2])) & 0xFFFFFFFF  # now and then not every answer yet
            ja.published(pub)
            if rnd.random() < 0.5:
                jb.published(pub)
            else:
                lib.xk_journal_published(jb.c_state, pub)
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


@settings(max_examples=200, deadline=None)
@given(rsp_prod=st.integers(0, (1 << 32) - 1), rsp_event=st.integers(0, (1 << 32) - 1),
       pushed=st.integers(0, 32), near=st.integers(-3, 34), journal=st.booleans())
def test_the_compiled_push_is_backrings(rsp_prod, rsp_event, pushed, near, journal):
    """xk_ring_push (make_ring_push) publishes as BackRing.push_responses does and says the same about
    notifying, for rsp_event anywhere (near the published range too); with a journal, the publish
    frees what the reference's published() frees."""
    from xenblk_vhost.backend.datapath.journal_compiled import make_ring_push
    from xenblk_vhost.blkif.abi import SRING
    from xenblk_vhost.blkif.ring import BackRing, ring_bytes

    if near <= 32:
        rsp_event = (rsp_prod + near) & 0xFFFFFFFF
    rings = []
    for _ in range(2):
        mem = bytearray(ring_bytes(0))
        for name, value in (("req_prod", rsp_prod + pushed), ("rsp_prod", rsp_prod), ("rsp_event", rsp_event)):
            struct.pack_into("<I", mem, SRING.offset(name), value & 0xFFFFFFFF)
        ring = BackRing(memoryview(mem), Abi.X86_64, 0)
        ring.req_cons = (rsp_prod + pushed) & 0xFFFFFFFF
        for k in range(pushed):
            ring.put_response(k, 0, 0)
        rings.append((mem, ring))
    g = JournalGeometry.for_ring(64, ENTRY, 16)
    a, b, ja, jb = _pair(g, rsp_prod)
    if pushed and journal:
        for j in (ja, jb):
            ref = j.record_taken(rsp_prod, bytes(pushed * ENTRY), pushed)
            j.record_answers([_Answer(ref + k, 0) for k in range(pushed)], rsp_prod)
    (mem_a, ring_a), (mem_b, ring_b) = rings
    want = ring_a.push_responses()
    if journal:
        ja.published(ring_a.rsp_prod_pvt)
    push = make_ring_push(ring_b, jb if journal else None)
    assert push is not None
    assert push() is want
    assert mem_a == mem_b
    _same(a, b, ja, jb, "the push")
    ring_b.view.release()
    with pytest.raises(ValueError):
        push()  # the ring let go of: refused, nothing written


@dataclass
class _Reply:
    req_id: int
    op: int
    jref: int
    status: int


@settings(max_examples=200, deadline=None)
@given(abi=st.sampled_from([Abi.X86_64, Abi.X86_32]), order=st.integers(0, 2),
       start=st.integers(0, (1 << 32) - 1), pushes=st.lists(st.integers(1, 20), min_size=1, max_size=6),
       journal=st.booleans(), seed=st.integers(0, 1 << 32))
def test_the_compiled_answers_are_the_references(abi, order, start, pushes, journal, seed):
    """make_ring_answers (xk_ring_answers / xk_ring_answer) writes the responses BackRing.put_response
    writes and the journal answers record_answers records: the ring pages (pad bytes included) and
    the journal areas byte for byte, for any id (all 64 bits), operation, status, a reply with no
    journaled request among them, across the ring's and the u32 wrap; and counts the errors."""
    from xenblk_vhost.backend.datapath.journal_compiled import make_ring_answers
    from xenblk_vhost.blkif.ring import BackRing, ring_bytes

    rnd = random.Random(seed)
    entry = layout(abi).entry_size
    slots = 32 << order
    pushes = [min(n, slots) for n in pushes]
    mems = [bytearray(ring_bytes(order)) for _ in range(2)]
    left = rnd.randbytes(len(mems[0]) - 64)  # what a guest left in the slots: overwritten alike
    for mem in mems:
        mem[64:] = left
        struct.pack_into("<IxxxxI", mem, 0, start, start)  # req_prod, rsp_prod: an empty ring at start
    ring_a, ring_b = (BackRing(memoryview(m), abi, order) for m in mems)
    g = JournalGeometry.for_ring(slots, entry, 16)
    a, b, ja, jb = _pair(g, start)
    answers = make_ring_answers(ring_b, jb if journal else None)
    assert answers is not None
    pos = start
    for n in pushes:
        for ring in (ring_a, ring_b):
            ring.req_cons = (pos + n) & 0xFFFFFFFF
            ring.rsp_prod_pvt = pos
        ref = -1
        if journal:
            raw = bytes(n * entry)
            ref = ja.record_taken(pos, raw, n)
            assert jb.record_taken(pos, raw, n) == ref
        replies = [_Reply(rnd.choice([0, (1 << 64) - 1, rnd.getrandbits(64)]), rnd.getrandbits(8),
                          ref + k if ref >= 0 and rnd.random() < 0.9 else -1, rnd.choice([0, 0, -1, -2]))
                   for k in range(n)]
        if journal:
            ja.record_answers(replies, ring_a.rsp_prod_pvt)
        for r in replies:
            ring_a.put_response(r.req_id, r.op, r.status)
        assert answers(replies) == sum(1 for r in replies if r.status)
        assert ring_b.rsp_prod_pvt == ring_a.rsp_prod_pvt
        assert mems[0] == mems[1], "ring pages differ"
        if journal:
            ja.published(ring_a.rsp_prod_pvt)
            jb.published(ring_b.rsp_prod_pvt)
            _same(a, b, ja, jb, f"a push of {n}")
        pos = (pos + n) & 0xFFFFFFFF


def test_the_compiled_answers_refuse_more_than_was_consumed_and_a_released_ring():
    from xenblk_vhost.backend.datapath.journal_compiled import make_ring_answers
    from xenblk_vhost.blkif.ring import BackRing, RingStateError, ring_bytes

    mem = bytearray(ring_bytes(0))
    ring = BackRing(memoryview(mem), Abi.X86_64, 0)
    ring.req_cons = 2
    answers = make_ring_answers(ring, None)
    assert answers is not None
    before = bytes(mem)
    with pytest.raises(RingStateError):
        answers([_Reply(k, 0, -1, 0) for k in range(3)])
    assert bytes(mem) == before and ring.rsp_prod_pvt == 0  # nothing written
    assert answers([_Reply(7, 1, -1, -1)]) == 1 and ring.rsp_prod_pvt == 1
    ring.view.release()
    with pytest.raises(ValueError):
        answers([_Reply(8, 0, -1, 0)])
