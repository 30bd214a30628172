"""Ring index logic against Xen's ring.h macros, plus slot copying.

tests/probes/blkif_ring.c runs RING_PUSH_RESPONSES_AND_CHECK_NOTIFY,
RING_FINAL_CHECK_FOR_REQUESTS, RING_REQUEST_PROD_OVERFLOW,
RING_REQUEST_CONS_OVERFLOW, RING_HAS_UNCONSUMED_REQUESTS (back side) and
RING_PUSH_REQUESTS_AND_CHECK_NOTIFY, RING_FINAL_CHECK_FOR_RESPONSES,
RING_RESPONSE_PROD_OVERFLOW, RING_FREE_REQUESTS (front side) over a few
thousand index states, many straddling the 2**32 wrap, in one process; the
Python rings must decide the same for every state.
"""

from __future__ import annotations

import random

import pytest

from xenblk_vhost.blkif.abi import SRING, Abi, layout, ring_entries
from xenblk_vhost.blkif.constants import OP_READ, OP_WRITE, RSP_ERROR, RSP_OKAY, U32_MASK
from xenblk_vhost.blkif.encode import RequestEncoder
from xenblk_vhost.blkif.intake import RequestIntake
from xenblk_vhost.blkif.request import Request
from xenblk_vhost.blkif.response import Response, decode_response
from xenblk_vhost.blkif.ring import BackRing, FrontRing, RingOverflow, RingStateError, ring_bytes
from xenblk_vhost.blkif.validate import RequestLimits

M = U32_MASK
STATES_PER_SIDE = 2500


def _near(rnd: random.Random, base: int, size: int) -> int:
    """An index near base: mostly within a few ring sizes, sometimes anywhere."""
    pick = rnd.random()
    if pick < 0.8:
        return (base + rnd.randint(-2 * size - 2, 2 * size + 2)) & M
    if pick < 0.9:
        return (base + rnd.choice((size, size + 1, -size, -size - 1, 0, 1, -1))) & M
    return rnd.getrandbits(32)


def _states(seed: int, count: int) -> list[tuple[int, ...]]:
    """(order, req_prod, req_event, rsp_prod, rsp_event, priv_a, priv_b) states."""
    rnd = random.Random(seed)
    out = []
    for i in range(count):
        order = rnd.randint(0, 4)
        size = ring_entries(Abi.NATIVE, order)
        # A third of the states sit right at the 2**32 wrap.
        base = (rnd.randint(-3 * size, 3 * size) & M) if i % 3 == 0 else rnd.getrandbits(32)
        # Private indices: mostly consistent (cons ahead of rsp_prod_pvt by at
        # most a ring), sometimes arbitrary to cover bogus states too.
        a = _near(rnd, base, size)
        b = (a - rnd.randint(0, size)) & M if rnd.random() < 0.8 else _near(rnd, base, size)
        out.append((order, _near(rnd, base, size), _near(rnd, base, size),
                    _near(rnd, base, size), _near(rnd, base, size), a, b))
    return out


def _set_shared(view: memoryview, req_prod: int, req_event: int, rsp_prod: int, rsp_event: int) -> None:
    for name, value in (("req_prod", req_prod), ("req_event", req_event),
                        ("rsp_prod", rsp_prod), ("rsp_event", rsp_event)):
        view[SRING.offset(name):SRING.offset(name) + 4] = value.to_bytes(4, "little")


def _shared(view: memoryview, name: str) -> int:
    return int.from_bytes(view[SRING.offset(name):SRING.offset(name) + 4], "little")


def _back(abi: Abi, order: int, mem: bytearray, req_cons: int, rsp_prod_pvt: int,
          shared: tuple[int, int, int, int]) -> BackRing:
    view = memoryview(mem)
    view[:] = bytes(len(mem))
    ring = BackRing(view, abi, order)  # attaches on an all-zero (empty) ring
    ring.req_cons = req_cons
    ring.rsp_prod_pvt = rsp_prod_pvt
    _set_shared(view, *shared)
    return ring


@pytest.mark.parametrize("abi", [Abi.NATIVE, Abi.X86_32], ids=lambda a: a.name)
def test_back_ring_decides_like_ring_h(xen_ring_probe, abi):
    # The C probe builds an x86_64 ring; our ABIs have the same entry counts
    # (checked against gcc in test_blkif_layout), so its decisions apply.
    assert all(ring_entries(abi, o) == ring_entries(Abi.NATIVE, o) for o in range(5))
    states = _states(seed=0xB10C, count=STATES_PER_SIDE)
    answers = xen_ring_probe(["B " + " ".join(map(str, s)) for s in states])
    mem = bytearray(ring_bytes(4))
    mismatches = []
    n_overflow = n_notify = n_work = 0
    for state, line in zip(states, answers):
        order, rq, rqe, rp, rpe, req_cons, rsp_pvt = state
        c = [int(x) for x in line.split()[1:]]
        c_prod_over, c_cons_over, c_unconsumed, c_drain, c_notify, c_rsp_after, c_work, c_req_event = c

        ring = _back(abi, order, mem, req_cons, rsp_pvt, (rq, rqe, rp, rpe))
        try:
            drain = ring.requests_available()
            prod_over = 0
        except RingOverflow:
            drain, prod_over = -1, 1
        except RingStateError:
            # Our own indices are corrupt (more consumed than the ring holds):
            # we refuse loudly where blkback's loop silently consumes nothing.
            assert (req_cons - rsp_pvt) & M > ring.size
            drain, prod_over = 0, 0
        got = [prod_over, int(ring.request_cons_overflow(req_cons)), ring.nr_unconsumed_requests(), drain]
        got += [int(ring.push_responses()), _shared(ring.view, "rsp_prod")]

        ring = _back(abi, order, mem, req_cons, rsp_pvt, (rq, rqe, rp, rpe))
        got += [int(ring.final_check_for_requests()), _shared(ring.view, "req_event")]
        if got != c:
            mismatches.append((state, c, got))
        n_overflow += c_prod_over
        n_notify += c_notify
        n_work += c_work
    assert not mismatches, mismatches[:5]
    # The states exercised both outcomes of every decision.
    assert 0 < n_overflow < len(states) and 0 < n_notify < len(states) and 0 < n_work < len(states)


@pytest.mark.parametrize("abi", [Abi.NATIVE, Abi.X86_32], ids=lambda a: a.name)
def test_front_ring_decides_like_ring_h(xen_ring_probe, abi):
    states = _states(seed=0xF207, count=STATES_PER_SIDE)
    answers = xen_ring_probe(["F " + " ".join(map(str, s)) for s in states])
    mem = bytearray(ring_bytes(4))
    view = memoryview(mem)
    mismatches = []
    n_overflow = n_notify = n_work = 0
    for state, line in zip(states, answers):
        order, rq, rqe, rp, rpe, req_prod_pvt, rsp_cons = state
        c = [int(x) for x in line.split()[1:]]

        def front(order=order, req_prod_pvt=req_prod_pvt, rsp_cons=rsp_cons, shared=(rq, rqe, rp, rpe)) -> FrontRing:
            ring = FrontRing(view, abi, order)
            ring.req_prod_pvt = req_prod_pvt
            ring.rsp_cons = rsp_cons
            _set_shared(view, *shared)
            return ring

        ring = front()
        try:
            ring.responses_available()
            over = 0
        except RingOverflow:
            over = 1
        got = [over, ring.free_requests() & M, ring.nr_unconsumed_responses()]
        got += [int(ring.push_requests()), _shared(view, "req_prod")]
        ring = front()
        got += [int(ring.final_check_for_responses()), _shared(view, "rsp_event")]
        if got != c:
            mismatches.append((state, c, got))
        n_overflow += c[0]
        n_notify += c[3]
        n_work += c[5]
    assert not mismatches, mismatches[:5]
    assert 0 < n_overflow < len(states) and 0 < n_notify < len(states) and 0 < n_work < len(states)


# --- Slot copying, attach and guards -----------------------------------------------


@pytest.mark.parametrize("abi", list(Abi), ids=lambda a: a.name)
@pytest.mark.parametrize("order", [0, 2])
@pytest.mark.parametrize("start", [0, 29, (1 << 32) - 3, (1 << 32) - 40])
def test_requests_cross_the_ring_end_and_the_index_wrap(abi, order, start):
    """A batch that wraps the slot array (and the 2**32 index) arrives whole, in order."""
    mem = bytearray(ring_bytes(order))
    view = memoryview(mem)
    front = FrontRing(view, abi, order)
    # Start both ends at `start`, as after a long run.
    front.req_prod_pvt = front.rsp_cons = start
    _set_shared(view, start, start + 1, start, start + 1)
    back = BackRing(view, abi, order)
    assert (back.req_cons, back.rsp_prod_pvt) == (start, start)
    enc = RequestEncoder(abi)
    size = front.size
    sent = []
    for i in range(size):
        req = Request(OP_READ if i % 2 else OP_WRITE, 1000 + i, 0, 8 * i, ((i, 0, 7),), 8, False)
        enc.encode(view, front.claim_request_slot(), req)
        sent.append(req)
    assert front.free_requests() == 0
    with pytest.raises(RingStateError):
        front.claim_request_slot()
    assert front.push_requests() is True  # req_event was start + 1
    intake = RequestIntake(abi, RequestLimits(sectors=1 << 20))
    first = intake.take(back, 5)
    rest = intake.take(back, 10 * size)
    assert first + rest == sent
    assert back.req_cons == (start + size) & M
    # Answer all; the frontend reads them back in order.
    for req in sent:
        back.put_response(req.id, req.response_op, RSP_OKAY if req.id % 3 else RSP_ERROR)
    with pytest.raises(RingStateError):
        back.put_response(1, OP_READ, RSP_OKAY)  # nothing left to answer
    assert back.push_responses() is True  # rsp_event was start + 1
    got = front.take_responses(size)
    assert got == [Response(r.id, r.op, RSP_OKAY if r.id % 3 else RSP_ERROR) for r in sent]
    assert front.final_check_for_responses() is False
    assert back.final_check_for_requests() is False


def test_take_copies_out_so_later_guest_writes_change_nothing():
    abi = Abi.NATIVE
    mem = bytearray(ring_bytes(0))
    view = memoryview(mem)
    front = FrontRing(view, abi, 0)
    back = BackRing(view, abi, 0)
    enc = RequestEncoder(abi)
    off = front.claim_request_slot()
    enc.rw(view, off, OP_READ, 7, 0, [(5, 0, 7)])
    front.push_requests()
    raw, n = back.take_slots(32)
    assert n == 1
    mem[off:off + layout(abi).entry_size] = b"\xff" * layout(abi).entry_size  # guest rewrites
    assert RequestIntake(abi, RequestLimits(sectors=8)).parse(raw, n) == [
        Request(OP_READ, 7, 0, 0, ((5, 0, 7),), 8, False)]


def test_bogus_req_prod_halts_without_consuming():
    abi = Abi.NATIVE
    mem = bytearray(ring_bytes(0))
    view = memoryview(mem)
    back = BackRing(view, abi, 0)
    _set_shared(view, 33, 1, 0, 1)  # 33 requests in a 32-slot ring
    with pytest.raises(RingOverflow):
        RequestIntake(abi, RequestLimits(sectors=8)).take(back, 32)
    assert back.req_cons == 0
    # Attaching to such a ring is refused the same way (blkback's xen_blkif_map).
    with pytest.raises(RingOverflow):
        BackRing(view, abi, 0)


def test_attach_resumes_at_the_published_responses():
    """BACK_RING_ATTACH at rsp_prod: a reconnecting backend carries on where responses stop."""
    abi = Abi.X86_32
    mem = bytearray(ring_bytes(1))
    view = memoryview(mem)
    _set_shared(view, 1000, 1, 990, 1)
    back = BackRing(view, abi, 1)
    assert (back.req_cons, back.rsp_prod_pvt, back.requests_available()) == (990, 990, 10)


def test_response_written_by_back_ring_is_read_by_front_ring_and_gcc_layout():
    for abi in (Abi.NATIVE, Abi.X86_32):
        mem = bytearray(b"\xff" * ring_bytes(0))
        view = memoryview(mem)
        front = FrontRing(view, abi, 0)
        back = BackRing(view, abi, 0)
        RequestEncoder(abi).other(view, front.claim_request_slot(), 9, 0xABCDEF)
        front.push_requests()
        assert back.take_slots(1)[1] == 1
        back.put_response(0xABCDEF, 9, -2)
        back.push_responses()
        assert decode_response(abi, view, back.slot_offset(0)) == Response(0xABCDEF, 9, -2)
        assert front.take_responses(32) == [Response(0xABCDEF, 9, -2)]


def test_ring_view_must_fit_and_be_writable():
    with pytest.raises(ValueError):
        BackRing(memoryview(bytearray(ring_bytes(1) - 1)), Abi.NATIVE, 1)
    with pytest.raises(ValueError):
        BackRing(memoryview(bytes(ring_bytes(0))), Abi.NATIVE, 0)
    with pytest.raises(ValueError):
        RequestIntake(Abi.X86_32, RequestLimits(sectors=8)).take(
            BackRing(memoryview(bytearray(ring_bytes(0))), Abi.NATIVE, 0), 1)
