"""The ring journal (backend/datapath/journal.py) and the takeover plan (takeover.py).

The model test runs a frontend and a backend over one ring and one journal
in memory, the backend's every store a step, answers in random order, and
kills the backend between any two steps (and inside the journal's own
writes: a frame half written, a header pack cut short), then takes over
with a new backend from the journal and the ring alone, several times per
run. Checked at the end: every request the frontend posted got exactly one
response with its own op, and no request whose response had been published
before a kill was run again after it.
"""

from __future__ import annotations

import random
import struct

import pytest

from xenblk_vhost.backend.datapath.journal import (
    HEADER_SIZE,
    JournalCorrupt,
    JournalFull,
    JournalGeometry,
    RingJournal,
    format_area,
    read_image,
)
from xenblk_vhost.backend.datapath.journal_file import JournalFile
from xenblk_vhost.backend.datapath.takeover import JournalMismatch, plan_takeover
from xenblk_vhost.blkif.abi import Abi, layout, ring_entries
from xenblk_vhost.blkif.constants import OP_READ, OP_WRITE, RSP_ERROR, RSP_OKAY, U32_MASK
from xenblk_vhost.blkif.encode import RequestEncoder
from xenblk_vhost.blkif.intake import RequestIntake
from xenblk_vhost.blkif.request import IndirectRequest, Rejection, Request
from xenblk_vhost.blkif.ring import BackRing, FrontRing, ring_bytes
from xenblk_vhost.blkif.validate import RequestLimits

ABI = Abi.NATIVE
ENTRY = layout(ABI).entry_size
IDENTITY = b"test-ring"


def _geometry(slots: int = 8, per_frame: int = 4) -> JournalGeometry:
    return JournalGeometry.for_ring(slots, ENTRY, 32, per_frame=per_frame)


def _raw(ids, op=OP_READ) -> bytes:
    enc = RequestEncoder(ABI)
    return b"".join(enc.slot(Request(op, i, 0, 8 * i, ((i, 0, 7),), 8)) for i in ids)


def _journal(geometry=None, *, taken_to=0, published=0):
    g = geometry or _geometry()
    buf = bytearray(g.size)
    format_area(buf, g, IDENTITY, taken_to=taken_to, published=published)
    return buf, RingJournal(buf, g)


def test_round_trip_records_answers_and_frees_on_publish():
    buf, j = _journal()
    ref = j.record_taken(10, _raw([1, 2, 3]), 3)
    j.record_answered(ref + 1, RSP_ERROR, 10)
    image = read_image(buf)
    assert image.identity == IDENTITY and image.taken_to == 13
    (fr,) = image.frames
    assert (fr.first_pos, fr.n) == (10, 3)
    assert fr.answers == (None, (RSP_ERROR, 10), None)
    assert fr.raw == _raw([1, 2, 3])
    j.record_answered(ref, RSP_OKAY, 11)
    j.record_answered(ref + 2, RSP_OKAY, 12)
    j.published(12)  # the last answer (12) is not published yet: the frame stays
    assert len(read_image(buf).frames) == 1
    j.published(13)
    image = read_image(buf)
    assert image.frames == () and image.published == 13
    assert j.frames_in_use == 0


def test_indirect_segments_and_failed_copies_are_kept():
    buf, j = _journal()
    j.record_taken(0, _raw([1, 2, 3]), 3, indirect=[(0, b"\x01" * 16), (2, b"")])
    (fr,) = read_image(buf).frames
    assert fr.indirect == (b"\x01" * 16, None, b"")


def test_journal_full_and_room():
    g = _geometry(slots=2, per_frame=2)  # 3 frames
    buf, j = _journal(g)
    for k in range(3):
        j.record_taken(2 * k, _raw([k, k]), 2)
    assert j.room == 0
    with pytest.raises(JournalFull):
        j.record_taken(6, _raw([9]), 1)
    with pytest.raises(ValueError):
        _journal(g)[1].record_taken(0, _raw([1, 2, 3]), 3)


def test_header_damage_is_refused():
    buf, _ = _journal()
    read_image(buf)
    bad = bytearray(buf)
    bad[0] ^= 1
    with pytest.raises(JournalCorrupt, match="magic"):
        read_image(bad)
    bad = bytearray(buf)
    bad[40] ^= 1  # in the identity
    with pytest.raises(JournalCorrupt, match="checksum"):
        read_image(bad)
    with pytest.raises(JournalCorrupt):
        read_image(bytes(100))


def test_a_frame_cut_short_anywhere_is_not_trusted():
    """record_taken over a freed frame, cut after any byte it changed: never a valid frame but the finished one."""
    buf, j = _journal(_geometry(slots=2, per_frame=2))
    ref = j.record_taken(0, _raw([1, 2]), 2)
    j.record_answered(ref, RSP_OKAY, 0)
    j.record_answered(ref + 1, RSP_OKAY, 1)
    j.published(2)
    before = bytes(buf)
    j.record_taken(2, _raw([7, 8], OP_WRITE), 2, indirect=[(1, b"\x05" * 24)])
    after = bytes(buf)
    (good,) = read_image(after).frames
    frame0 = ref * 8 - 32  # a ref is the index of its answer word; answers start 32 bytes into the frame
    assert frame0 >= HEADER_SIZE
    header = range(frame0, frame0 + 32)
    body = [i for i in range(len(before)) if before[i] != after[i] and i not in header and i >= HEADER_SIZE]
    # Program order: the body in address order, then the header pack (which
    # zeroes its 32 bytes, then writes them in order).
    states = []
    for cut in range(len(body) + 1):
        s = bytearray(before)
        for i in body[:cut]:
            s[i] = after[i]
        states.append(s)
    full = states[-1]
    for cut in range(33):
        s = bytearray(full)
        s[frame0:frame0 + 32] = after[frame0:frame0 + cut] + bytes(32 - cut)
        states.append(s)
    for s in states:
        frames = read_image(s).frames
        assert frames in ((), (good,)), "a torn frame was read back"
        if frames:
            assert bytes(s[frame0:frame0 + 32]) == after[frame0:frame0 + 32]


def test_file_outlives_its_writer(tmp_path):
    g = _geometry()
    path = tmp_path / "j" / "1-xvda-ring0.journal"
    jf = JournalFile.create(path, g.size)
    format_area(jf.buffer, g, IDENTITY, taken_to=5, published=5)
    j = RingJournal(jf.buffer, g)
    j.record_taken(5, _raw([4]), 1)
    j.release()
    jf.close()
    again = JournalFile.open_existing(path)
    assert again is not None
    (fr,) = read_image(again.buffer).frames
    assert fr.first_pos == 5
    again.remove()
    assert not path.exists()
    assert JournalFile.open_existing(path) is None


# ---------------------------------------------------------------- takeover plans


def _image_with(answers, *, first_pos=100, published=100, rsp_prod=None):
    buf, j = _journal(_geometry(slots=8, per_frame=8), taken_to=first_pos, published=published)
    ref = j.record_taken(first_pos, _raw(range(len(answers))), len(answers))
    for i, a in enumerate(answers):
        if a is not None:
            j.record_answered(ref + i, RSP_OKAY, a)
    if rsp_prod is not None:
        j.published(rsp_prod)
    return read_image(buf)


def test_plan_sorts_published_unpublished_and_unanswered():
    image = _image_with([101, None, 100, 102, None])
    plan = plan_takeover(image, IDENTITY, rsp_prod=101, req_prod=105, ring_size=32)
    assert plan.published == 1  # answered at 100, before rsp_prod
    assert [r.rsp_pos for r in plan.republish] == [101, 102]
    assert [e.position for e in plan.rerun] == [101, 104]
    assert plan.req_cons == 105 and plan.rsp_prod_after == 103


@pytest.mark.parametrize("rsp_prod, req_prod, identity, why", [
    (101, 105, b"other", "another connection"),
    (0, 3, IDENTITY, "rsp_prod 0"),  # a re-initialised ring
    (104, 110, IDENTITY, "make req_cons"),  # more published than the journal answered
    (101, 104, IDENTITY, "behind"),  # the frontend produced fewer than we took
])
def test_plan_refuses_a_journal_that_is_not_this_rings(rsp_prod, req_prod, identity, why):
    image = _image_with([101, None, 100, 102, None])
    with pytest.raises(JournalMismatch, match=why):
        plan_takeover(image, identity, rsp_prod=rsp_prod, req_prod=req_prod, ring_size=32)


def test_plan_across_the_index_wrap():
    first = U32_MASK - 1
    image = _image_with([None, first, U32_MASK, None], first_pos=first, published=first)
    plan = plan_takeover(image, IDENTITY, rsp_prod=first, req_prod=3, ring_size=32)
    assert [r.rsp_pos for r in plan.republish] == [first, U32_MASK]
    assert [e.position for e in plan.rerun] == [first, 1]
    assert plan.req_cons == 2


# ---------------------------------------------------------------- the model: kills anywhere


class Killed(Exception):
    pass


class _Frontend:
    """Posts unique ids (READ or WRITE, some indirect headers), consumes responses."""

    def __init__(self, ring_mem, order, rnd):
        self.ring = FrontRing(memoryview(ring_mem), ABI, order)
        self.enc = RequestEncoder(ABI)
        self.rnd = rnd
        self.next_id = 1
        self.posted: dict[int, int] = {}  # id -> response op expected
        self.got: dict[int, list[int]] = {}  # id -> response ops seen

    def post(self, limit):
        n = min(self.ring.free_requests(), self.rnd.randint(0, 5), limit - self.next_id + 1)
        for _ in range(n):
            i = self.next_id
            self.next_id += 1
            off = self.ring.claim_request_slot()
            if self.rnd.random() < 0.2:
                self.enc.indirect(self.ring.view, off, OP_WRITE, i, 8 * i, 3, (i,))
                self.posted[i] = OP_WRITE
            else:
                op = self.rnd.choice((OP_READ, OP_WRITE))
                self.enc.rw(self.ring.view, off, op, i, 8 * i, ((i, 0, 7),))
                self.posted[i] = op
        self.ring.push_requests()

    def consume(self):
        for rsp in self.ring.take_responses(1 << 20):
            self.got.setdefault(rsp.id, []).append(rsp.op)


class _Backend:
    """One backend life over the ring and the journal; run() yields after every store."""

    def __init__(self, ring_mem, jbuf, order, rnd, log):
        self.ring_mem = ring_mem
        self.jbuf = jbuf
        self.order = order
        self.rnd = rnd
        self.log = log  # shared across lives: published ids, runs
        self.intake = RequestIntake(ABI, RequestLimits(sectors=1 << 30, max_indirect_segments=32))

    def _segments(self, item: IndirectRequest) -> bytes:
        return b"".join(struct.pack("<IBBxx", item.id, 0, 7) for _ in range(item.nr_segments))

    def run(self):
        ring = BackRing(memoryview(self.ring_mem), ABI, self.order)
        size = ring.size
        g = JournalGeometry.for_ring(size, ENTRY, 32, per_frame=4)
        inflight: list[tuple[int, object]] = []  # (ref, item) taken, not answered
        answered: list[int] = []  # ids whose response is written, not published
        image = read_image(self.jbuf) if self.log["started"] else None
        self.log["started"] = True
        if image is None:
            format_area(self.jbuf, g, IDENTITY, taken_to=ring.rsp_prod, published=ring.rsp_prod)
            j = RingJournal(self.jbuf, g)
        else:
            plan = plan_takeover(image, IDENTITY, rsp_prod=ring.rsp_prod, req_prod=ring.req_prod, ring_size=size)
            j = RingJournal(self.jbuf, image.geometry)
            j.adopt(image, plan.rsp_prod)
            ring.req_cons = plan.req_cons
            ring.rsp_prod_pvt = plan.rsp_prod
            yield
            for rp in plan.republish:
                item = self.intake.parse(rp.entry.frame.raw[rp.entry.i * ENTRY:], 1)[0]
                ring.put_response(item.id, item.response_op, rp.status)
                answered.append(item.id)
                yield
            for e in plan.rerun:
                item = self.intake.parse(e.frame.raw[e.i * ENTRY:], 1)[0]
                if type(item) is IndirectRequest:
                    item = self.intake.decode_indirect_segments(item, e.frame.indirect[e.i])
                assert item.id not in self.log["published"], f"id {item.id} run again after its answer was out"
                self.log["reruns"] += 1
                inflight.append((j.frame_ref(e.frame.index) + e.i, item))
        while True:
            action = self.rnd.random()
            if action < 0.4:
                k = min(j.room, self.rnd.randint(1, 4))
                if k:
                    pos = ring.req_cons
                    raw, n = ring.take_slots(k)
                    yield
                    if n:
                        items = self.intake.parse(raw, n)
                        indirect = []
                        for i, item in enumerate(items):
                            if type(item) is IndirectRequest:
                                data = self._segments(item)
                                indirect.append((i, data))
                                items[i] = self.intake.decode_indirect_segments(item, data)
                        ref = j.record_taken(pos, raw, n, indirect or None)
                        yield
                        inflight.extend((ref + i, item) for i, item in enumerate(items))
            elif action < 0.8 and inflight:
                ref, item = inflight.pop(self.rnd.randrange(len(inflight)))  # storage completes out of order
                status = item.status if type(item) is Rejection else RSP_OKAY
                j.record_answered(ref, status, ring.rsp_prod_pvt)
                yield
                ring.put_response(item.id, item.response_op, status)
                answered.append(item.id)
                yield
            elif answered:
                ring.push_responses()
                self.log["published"].update(answered)
                answered.clear()
                yield
                j.published(ring.rsp_prod_pvt)
                yield
            else:
                yield


@pytest.mark.parametrize("seed", range(40))
def test_kills_anywhere_lose_and_repeat_nothing(seed):
    rnd = random.Random(seed)
    order = rnd.choice((0, 1))
    ring_mem = bytearray(ring_bytes(order))
    size = ring_entries(ABI, order)
    g = JournalGeometry.for_ring(size, ENTRY, 32, per_frame=4)
    jbuf = bytearray(g.size)
    front = _Frontend(ring_mem, order, rnd)
    log = {"started": False, "published": set(), "reruns": 0}
    total = 300
    kills = 0
    while True:
        backend = _Backend(ring_mem, jbuf, order, rnd, log).run()
        life = rnd.randint(1, 60)
        for _ in range(life):
            front.post(total)
            next(backend)
            front.consume()
        kills += 1
        if front.next_id > total and len(front.got) == total:
            break
        if kills > 400:
            break
    # A last life to the end, unkilled.
    backend = _Backend(ring_mem, jbuf, order, rnd, log).run()
    for _ in range(100000):
        if len(front.got) == total:
            break
        front.post(total)
        next(backend)
        front.consume()
    assert set(front.got) == set(front.posted) == set(range(1, total + 1))
    for i, ops in front.got.items():
        assert ops == [front.posted[i]], f"id {i}: responses {ops}"
    assert kills >= 5
