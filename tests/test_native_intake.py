"""The compiled intake (native/intake_kernel.c via native/intake.py) makes the reference's decisions.

RequestIntake (blkif/decode.py + blkif/validate.py, pure Python) is the reference. The same private
copies of ring slots, random and hostile (every op byte, segment counts 0..255, segments past the
page or reversed, sectors at the u64 edge and the device's end, indirect headers of every size),
under random device limits, go through both on all three ABIs: the lists of verdicts must be equal
(same types, same fields, same reason strings). So must the indirect segments' second half, and a
whole take() from a ring whose producer index may be bogus (forwards, backwards, overflowing).
"""

from __future__ import annotations

import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from xenblk_vhost.blkif.abi import Abi, layout, ring_entries
from xenblk_vhost.blkif.intake import RequestIntake
from xenblk_vhost.blkif.request import IndirectRequest, Rejection, Request, WireSegments
from xenblk_vhost.blkif.ring import BackRing, RingOverflow, ring_bytes
from xenblk_vhost.blkif.validate import RequestLimits
from xenblk_vhost.native import intake as native_intake
from xenblk_vhost.native.intake import CompiledIntake, make_intake

U64_MAX = (1 << 64) - 1
ABIS = list(Abi)

limits_st = st.builds(
    RequestLimits,
    sectors=st.one_of(st.integers(0, 1 << 24), st.integers(U64_MAX - 100, U64_MAX), st.just(0)),
    logical_block_size=st.sampled_from([512, 1024, 2048, 4096]),
    read_only=st.booleans(),
    max_indirect_segments=st.one_of(st.integers(0, 4096), st.sampled_from([0, 1, 256, 511, 512, 4096])),
    flush_enabled=st.booleans(),
    barrier_enabled=st.booleans(),
    discard_enabled=st.booleans(),
)

_u64 = st.one_of(st.integers(0, 1 << 20), st.integers(U64_MAX - 64, U64_MAX), st.integers(0, U64_MAX))


@st.composite
def slot_st(draw, abi: Abi) -> bytes:
    """One slot: random bytes, or a header built from hostile-but-plausible fields over random bytes."""
    lay = layout(abi)
    entry = lay.entry_size
    buf = bytearray(draw(st.binary(min_size=entry, max_size=entry)))
    if draw(st.integers(0, 4)) == 0:
        return bytes(buf)  # pure noise
    op = draw(st.one_of(st.integers(0, 7), st.integers(0, 255)))
    buf[0] = op
    struct.pack_into("<Q", buf, lay.request.offset("id"), draw(_u64))
    struct.pack_into("<Q", buf, lay.request.offset("sector_number"), draw(_u64))
    if op == 6:
        buf[1] = draw(st.one_of(st.integers(0, 2), st.integers(0, 255)))
        nseg = draw(st.one_of(st.integers(0, 4097), st.sampled_from([0, 1, 511, 512, 513, 4096, 4097, 65535])))
        struct.pack_into("<H", buf, 2, nseg)
    elif op == 5:
        struct.pack_into("<Q", buf, lay.discard.offset("nr_sectors"), draw(_u64))
    else:
        nseg = draw(st.one_of(st.integers(0, 12), st.integers(0, 255)))
        buf[1] = nseg
        seg_off = lay.seg_offset
        for k in range(min(nseg, 11)):
            if draw(st.booleans()):
                first = draw(st.integers(0, 9))
                last = draw(st.integers(0, 9))
                buf[seg_off + 8 * k + 4] = first
                buf[seg_off + 8 * k + 5] = last
    return bytes(buf)


@st.composite
def batch_st(draw):
    abi = draw(st.sampled_from(ABIS))
    slots = draw(st.lists(slot_st(abi), min_size=0, max_size=40))
    return abi, draw(limits_st), slots


def both(abi: Abi, limits: RequestLimits) -> tuple[RequestIntake, CompiledIntake]:
    compiled = CompiledIntake(abi, limits)
    return RequestIntake(abi, limits), compiled


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batch_st())
def test_parse_makes_the_references_decisions(case):
    abi, limits, slots = case
    ref, compiled = both(abi, limits)
    raw = b"".join(slots)
    want = ref.parse(raw, len(slots))
    got = compiled.parse(raw, len(slots))
    assert [type(x) for x in got] == [type(x) for x in want]
    assert got == want


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(abi=st.sampled_from(ABIS), limits=limits_st, iop=st.integers(0, 1), nseg=st.integers(1, 4096),
       sector=_u64, data=st.data())
def test_indirect_segments_make_the_references_decisions(abi, limits, iop, nseg, sector, data):
    ref, compiled = both(abi, limits)
    header = IndirectRequest(6, iop, 77, 3, sector, nseg, tuple(range(1, 1 + -(-nseg // 512))))
    segs = bytearray(data.draw(st.binary(min_size=8 * nseg, max_size=8 * nseg)))
    if data.draw(st.booleans()):  # sane segments (whole blocks or not), then a few hostile ones
        for k in range(nseg):
            segs[8 * k + 4] = 0 if k % 2 else k % 8
            segs[8 * k + 5] = 7
        for k in data.draw(st.lists(st.integers(0, nseg - 1), max_size=3)):
            segs[8 * k + 4] = data.draw(st.integers(0, 9))
            segs[8 * k + 5] = data.draw(st.integers(0, 9))
    pages = bytes(segs) + data.draw(st.binary(max_size=16))
    want = ref.decode_indirect_segments(header, pages)
    got = compiled.decode_indirect_segments(header, pages)
    assert type(got) is type(want)
    if type(got) is Request:  # in wire form, never unpacked to reach its verdict (the reference's are)
        assert type(got.segments) is WireSegments and got.segments._segments is None
    assert got == want
    if type(got) is Request:
        assert got.segments.raw == want.segments.raw  # type: ignore[attr-defined]
        assert tuple(got.segments) == want.segments
    with pytest.raises(ValueError):
        compiled.decode_indirect_segments(header, pages[:8 * nseg - 1])


def _ring(abi: Abi, order: int, rsp_prod: int, req_prod: int, slots: list[bytes]) -> memoryview:
    mem = bytearray(ring_bytes(order))
    size = ring_entries(abi, order)
    entry = layout(abi).entry_size
    struct.pack_into("<IIII", mem, 0, req_prod, 0, rsp_prod, (rsp_prod + 1) & 0xFFFFFFFF)
    for i, s in enumerate(slots[:size]):
        at = 64 + ((rsp_prod + i) & (size - 1)) * entry
        mem[at:at + entry] = s
    return memoryview(mem)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=batch_st(), order=st.integers(0, 4), rsp_prod=st.integers(0, 0xFFFFFFFF),
       ahead=st.one_of(st.integers(0, 70), st.integers(0, 0xFFFFFFFF)), max_count=st.integers(1, 64),
       moved=st.integers(-4, 70))
def test_take_from_a_ring_with_any_indices(case, order, rsp_prod, ahead, max_count, moved):
    abi, limits, slots = case
    req_prod = (rsp_prod + ahead) & 0xFFFFFFFF
    results = []
    for intake in both(abi, limits):
        view = _ring(abi, order, rsp_prod, req_prod, slots)
        try:
            ring = BackRing(view, abi, order)
        except RingOverflow:
            results.append("overflow at attach")
            continue
        seen = []
        for _round in range(2):
            try:
                seen.append(intake.take(ring, max_count))
            except RingOverflow:
                seen.append("overflow")
            seen.append(ring.req_cons)
            struct.pack_into("<I", view, 0, (req_prod + moved) & 0xFFFFFFFF)  # the guest moves req_prod
        results.append(seen)
    assert results[0] == results[1]


def test_every_reason_string_is_the_references():
    from xenblk_vhost.blkif import decode, validate

    names = {v for k, v in vars(decode).items() if k.startswith("R_")}
    names |= {v for k, v in vars(validate).items() if k.startswith("R_")}
    assert set(native_intake.REASONS[1:]) == names


def test_the_engine_switch(monkeypatch):
    lim = RequestLimits(sectors=1 << 20)
    monkeypatch.setenv(native_intake.ENGINE_ENV, "python")
    assert type(make_intake(Abi.NATIVE, lim)) is RequestIntake
    monkeypatch.setenv(native_intake.ENGINE_ENV, "compiled")
    assert type(make_intake(Abi.NATIVE, lim)) is CompiledIntake
    from xenblk_vhost import native

    native.set_enabled(False)
    try:
        assert type(make_intake(Abi.NATIVE, lim)) is RequestIntake
    finally:
        native.set_enabled(True)
    monkeypatch.setenv(native_intake.ENGINE_ENV, "fast")
    with pytest.raises(ValueError):
        make_intake(Abi.NATIVE, lim)


def test_set_limits_reaches_the_kernel():
    """A resize (Vbd.set_limits) must change the compiled verdicts too."""
    lim = RequestLimits(sectors=8)
    compiled = CompiledIntake(Abi.NATIVE, lim)
    from xenblk_vhost.blkif.encode import RequestEncoder

    raw = RequestEncoder(Abi.NATIVE).slot(Request(0, 1, 0, 8, ((5, 0, 7),), 8))
    assert type(compiled.parse(raw, 1)[0]) is Rejection
    compiled.set_limits(RequestLimits(sectors=16))
    assert compiled.parse(raw, 1)[0] == Request(0, 1, 0, 8, ((5, 0, 7),), 8)
