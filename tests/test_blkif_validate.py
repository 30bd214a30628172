"""Decoding + validation against an independent oracle, by property tests.

The oracle below is written from the rules (Linux blkback's checks and the
documented project choices in validate.py), reads fields with the offsets
gcc reported for Xen's headers (not with our Structs), and is deliberately
plain: one field at a time, one rule at a time. Slots are written the same
independent way, over random garbage so padding and unused segments are
hostile. Our decoder must agree with it on every slot, never raise, and
round-trip every valid request.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from blkif_support.fixtures import PROBE_BITS, ProbeOffsets
from xenblk_vhost.blkif import constants as C
from xenblk_vhost.blkif.abi import Abi, layout
from xenblk_vhost.blkif.encode import RequestEncoder, encode_segments
from xenblk_vhost.blkif.intake import RequestIntake
from xenblk_vhost.blkif.request import DiscardRequest, IndirectRequest, Rejection, Request
from xenblk_vhost.blkif.validate import RequestLimits, Validator

ABIS = list(Abi)
U64 = (1 << 64) - 1
# Example counts keep this file to a few seconds on a shared 2-core machine;
# each test draws the ABI, so all three share the examples.
FAST = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
abi_st = st.sampled_from(ABIS)

# --- The oracle -------------------------------------------------------------------


def reject(id_, op, status):
    return ("reject", id_, op, status)


def oracle_io_rules(op, id_, sector, segs, limits):
    """READ/WRITE/BARRIER/FLUSH rules after the segment count was checked."""
    for _gref, first, last in segs:
        if not (first <= last and last < 8):
            return reject(id_, op, C.RSP_ERROR)
    if op == C.OP_FLUSH_DISKCACHE and not limits.flush_enabled:
        return reject(id_, op, C.RSP_EOPNOTSUPP)
    if op == C.OP_WRITE_BARRIER and not limits.barrier_enabled:
        return reject(id_, op, C.RSP_EOPNOTSUPP)
    nr = sum(last - first + 1 for _gref, first, last in segs)
    if limits.read_only:
        if op == C.OP_WRITE:
            return reject(id_, op, C.RSP_ERROR)
        if op == C.OP_WRITE_BARRIER and len(segs) > 0:
            return reject(id_, op, C.RSP_ERROR)
    if len(segs) > 0:
        if sector + nr > U64:
            return reject(id_, op, C.RSP_ERROR)
        if sector + nr > limits.sectors:
            return reject(id_, op, C.RSP_ERROR)
        per_block = limits.logical_block_size // 512
        if sector % per_block != 0:
            return reject(id_, op, C.RSP_ERROR)
        for _gref, first, last in segs:
            if (last - first + 1) % per_block != 0:
                return reject(id_, op, C.RSP_ERROR)
    return nr


def oracle(slot: bytes, p: ProbeOffsets, limits: RequestLimits):
    R, D, IND = "blkif_request", "blkif_request_discard", "blkif_request_indirect"
    op = p.get(slot, R, "operation")
    id_ = p.get(slot, R, "id")
    if op in (C.OP_READ, C.OP_WRITE, C.OP_WRITE_BARRIER, C.OP_FLUSH_DISKCACHE):
        nseg = p.get(slot, R, "nr_segments")
        if nseg > 11:
            return reject(id_, op, C.RSP_ERROR)
        if nseg == 0 and op in (C.OP_READ, C.OP_WRITE):
            return reject(id_, op, C.RSP_ERROR)
        seg_base = p.offset(R, "seg")
        seg_size = p.sizeof("blkif_request_segment")
        segs = []
        for i in range(nseg):
            s = slot[seg_base + i * seg_size:seg_base + (i + 1) * seg_size]
            segs.append((p.get(s, "blkif_request_segment", "gref"),
                         p.get(s, "blkif_request_segment", "first_sect"),
                         p.get(s, "blkif_request_segment", "last_sect")))
        sector = p.get(slot, R, "sector_number")
        verdict = oracle_io_rules(op, id_, sector, segs, limits)
        if isinstance(verdict, tuple):
            return verdict
        return ("rw", op, id_, p.get(slot, R, "handle"), sector, tuple(segs), verdict)
    if op == C.OP_DISCARD:
        sector = p.get(slot, D, "sector_number")
        nr = p.get(slot, D, "nr_sectors")
        if not limits.discard_enabled:
            return reject(id_, op, C.RSP_EOPNOTSUPP)
        if limits.read_only:
            return reject(id_, op, C.RSP_ERROR)
        if nr > 0 and (sector + nr > U64 or sector + nr > limits.sectors):
            return reject(id_, op, C.RSP_ERROR)
        per_block = limits.logical_block_size // 512
        if sector % per_block or nr % per_block:
            return reject(id_, op, C.RSP_ERROR)
        return ("discard", op, id_, p.get(slot, D, "handle"), sector, nr, p.get(slot, D, "flag"))
    if op == C.OP_INDIRECT:
        iop = p.get(slot, IND, "indirect_op")
        nseg = p.get(slot, IND, "nr_segments")
        if iop not in (C.OP_READ, C.OP_WRITE):
            return reject(id_, iop, C.RSP_ERROR)
        if nseg == 0 or nseg > limits.max_indirect_segments:
            return reject(id_, iop, C.RSP_ERROR)
        if limits.read_only and iop == C.OP_WRITE:
            return reject(id_, iop, C.RSP_ERROR)
        pages = (nseg + 511) // 512
        g0 = p.offset(IND, "indirect_grefs")
        grefs = tuple(int.from_bytes(slot[g0 + 4 * i:g0 + 4 * i + 4], "little") for i in range(pages))
        return ("indirect", iop, id_, p.get(slot, IND, "handle"), p.get(slot, IND, "sector_number"), nseg, grefs)
    return reject(id_, op, C.RSP_EOPNOTSUPP)


def canonical(item):
    """Our decoded object in the oracle's vocabulary."""
    if type(item) is Rejection:
        assert isinstance(item.reason, str) and item.reason
        return reject(item.id, item.op, item.status)
    if type(item) is Request:
        return ("rw", item.op, item.id, item.handle, item.sector, item.segments, item.nr_sectors)
    if type(item) is DiscardRequest:
        return ("discard", item.op, item.id, item.handle, item.sector, item.nr_sectors, item.flag)
    if type(item) is IndirectRequest:
        assert item.op == C.OP_INDIRECT
        return ("indirect", item.indirect_op, item.id, item.handle, item.sector, item.nr_segments,
                item.indirect_grefs)
    raise AssertionError(f"unexpected decode result {item!r}")


# --- Strategies --------------------------------------------------------------------

limits_st = st.builds(
    RequestLimits,
    sectors=st.one_of(st.integers(0, 1 << 12), st.integers(0, U64), st.just(U64)),
    logical_block_size=st.sampled_from([512, 1024, 2048, 4096]),
    read_only=st.booleans(),
    max_indirect_segments=st.one_of(st.integers(0, 4096), st.sampled_from([0, 1, 256, 4096])),
    flush_enabled=st.booleans(),
    barrier_enabled=st.booleans(),
    discard_enabled=st.booleans(),
)

# first_sect/last_sect: the boundary values often, anything sometimes.
sect_st = st.one_of(st.sampled_from([0, 1, 3, 6, 7, 8, 9, 255]), st.integers(0, 255))


@st.composite
def sector_for(draw, limits: RequestLimits, nr: int = 8):
    """Sector numbers that probe the device end, the u64 end and alignment.

    `nr` is the request's length if known: sector + nr then lands on the
    device end and on either side of it often.
    """
    at_end = [x for x in (limits.sectors - nr + d for d in (-1, 0, 1)) if 0 <= x <= U64]
    return draw(st.one_of(
        st.integers(0, 64),
        st.sampled_from(at_end or [0]),
        st.integers(max(0, limits.sectors - 100), min(U64, limits.sectors + 8)),
        st.integers(U64 - 100, U64),
        st.integers(0, U64),
    ))


@st.composite
def hostile_slot(draw, abi: Abi, p: ProbeOffsets, limits: RequestLimits) -> bytes:
    """A ring slot written field by field at gcc's offsets, over random bytes."""
    entry = layout(abi).entry_size
    buf = bytearray(draw(st.binary(min_size=entry, max_size=entry)))
    kind = draw(st.sampled_from(["rw", "rw", "rw", "discard", "indirect", "other"]))
    id_ = draw(st.integers(0, U64))
    if kind == "rw":
        R = "blkif_request"
        op = draw(st.sampled_from([C.OP_READ, C.OP_WRITE, C.OP_WRITE_BARRIER, C.OP_FLUSH_DISKCACHE]))
        nseg = draw(st.one_of(st.sampled_from([0, 1, 1, 2, 11, 12]), st.integers(0, 12), st.integers(0, 255)))
        p.put(buf, R, "operation", op)
        p.put(buf, R, "nr_segments", nseg)
        p.put(buf, R, "id", id_)
        seg_base = p.offset(R, "seg")
        aligned = draw(st.booleans())
        nr = 0
        for i in range(min(nseg, 11)):
            if aligned:  # whole pages: valid for every block size
                first, last = 0, 7
            else:
                first, last = draw(sect_st), draw(sect_st)
            nr += last - first + 1
            o = seg_base + 8 * i
            buf[o + p.offset("blkif_request_segment", "first_sect")] = first
            buf[o + p.offset("blkif_request_segment", "last_sect")] = last
        p.put(buf, R, "sector_number", draw(sector_for(limits, nr)))
    elif kind == "discard":
        D = "blkif_request_discard"
        nr = draw(st.one_of(st.integers(0, 4096), st.integers(0, U64)))
        p.put(buf, D, "operation", C.OP_DISCARD)
        p.put(buf, D, "id", id_)
        p.put(buf, D, "sector_number", draw(sector_for(limits, nr)))
        p.put(buf, D, "nr_sectors", nr)
    elif kind == "indirect":
        sector = draw(sector_for(limits))
        IND = "blkif_request_indirect"
        p.put(buf, IND, "operation", C.OP_INDIRECT)
        p.put(buf, IND, "indirect_op", draw(st.one_of(st.integers(0, 3), st.integers(0, 255))))
        p.put(buf, IND, "nr_segments", draw(st.one_of(
            st.integers(0, 4100), st.sampled_from([0, 1, 511, 512, 513, 4096, 4097, 65535]))))
        p.put(buf, IND, "id", id_)
        p.put(buf, IND, "sector_number", sector)
    else:
        R = "blkif_request"
        p.put(buf, R, "operation", draw(st.integers(0, 255)))
        p.put(buf, R, "id", id_)
    return bytes(buf)


# --- Properties -------------------------------------------------------------------


@FAST
@given(data=st.data(), abi=abi_st)
def test_decoder_agrees_with_the_oracle(xen_layouts, abi, data):
    p = ProbeOffsets(xen_layouts[PROBE_BITS[abi]])
    limits = data.draw(limits_st)
    slots = data.draw(st.lists(hostile_slot(abi, p, limits), min_size=1, max_size=4))
    got = RequestIntake(abi, limits).parse(b"".join(slots), len(slots))
    assert [canonical(g) for g in got] == [oracle(s, p, limits) for s in slots]


@FAST
@given(abi=abi_st, limits=limits_st, raw=st.binary(min_size=0, max_size=4 * 112))
def test_decoder_never_raises_on_arbitrary_bytes(xen_layouts, abi, limits, raw):
    p = ProbeOffsets(xen_layouts[PROBE_BITS[abi]])
    entry = layout(abi).entry_size
    count = len(raw) // entry
    got = RequestIntake(abi, limits).parse(raw, count)
    assert [canonical(g) for g in got] == [oracle(raw[i * entry:(i + 1) * entry], p, limits)
                                           for i in range(count)]


# Indirect segments: a pattern segment repeated, with a few overrides, so
# both valid and invalid lists of up to two pages' worth are common.
@st.composite
def indirect_case(draw):
    limits = draw(limits_st)
    nseg = draw(st.one_of(st.integers(1, 16), st.integers(1, 1100)))
    iop = draw(st.sampled_from([C.OP_READ, C.OP_WRITE]))
    base = (draw(st.integers(0, 2**32 - 1)), *draw(st.sampled_from([(0, 7), (0, 0), (1, 2), (0, 3)])))
    segs = [base] * nseg
    for _ in range(draw(st.integers(0, 3))):
        i = draw(st.integers(0, nseg - 1))
        segs[i] = (draw(st.integers(0, 2**32 - 1)), draw(sect_st), draw(sect_st))
    nr = sum(last - first + 1 for _, first, last in segs)
    sector = draw(sector_for(limits, nr))
    tail = draw(st.binary(max_size=16))  # bytes past the segments: must be ignored
    return limits, iop, sector, segs, tail


@FAST
@given(case=indirect_case(), id_=st.integers(0, U64), handle=st.integers(0, 0xFFFF))
def test_indirect_segments_agree_with_the_oracle(case, id_, handle):
    limits, iop, sector, segs, tail = case
    header = IndirectRequest(C.OP_INDIRECT, iop, id_, handle, sector, len(segs),
                             tuple(range((len(segs) + 511) // 512)))
    v = Validator(limits)
    checked = v.check(header)
    if type(checked) is Rejection:
        # Header rules: the advertised limit, then read-only writes.
        assert len(segs) > limits.max_indirect_segments or (limits.read_only and iop == C.OP_WRITE)
        return
    got = v.decode_indirect_segments(header, bytearray(encode_segments(segs) + tail))
    want = oracle_io_rules(iop, id_, sector, segs, limits)
    if isinstance(want, tuple):
        assert (type(got), got.id, got.op, got.status) == (Rejection, *want[1:])
    else:
        assert got == Request(iop, id_, handle, sector, tuple(segs), want, True)


def test_indirect_pages_shorter_than_the_segments_are_our_bug():
    header = IndirectRequest(C.OP_INDIRECT, C.OP_READ, 1, 0, 0, 3, (9,))
    with pytest.raises(ValueError):
        Validator(RequestLimits(sectors=100)).decode_indirect_segments(header, bytes(23))


VALID_PAIRS = [(first, last) for last in range(8) for first in range(last + 1)]


# Valid requests of every kind, for round trips. With `limits`, the sector
# is drawn to probe that device's end and alignment.
@st.composite
def valid_request(draw, limits: RequestLimits | None = None):
    op = draw(st.sampled_from([C.OP_READ, C.OP_WRITE, C.OP_WRITE_BARRIER, C.OP_FLUSH_DISKCACHE,
                               C.OP_DISCARD, C.OP_INDIRECT]))
    id_ = draw(st.integers(0, U64))
    handle = draw(st.integers(0, 0xFFFF))

    def sector(nr):
        return draw(st.integers(0, 1 << 40) if limits is None else sector_for(limits, nr))

    if op == C.OP_DISCARD:
        nr = draw(st.integers(0, 1 << 20))
        return DiscardRequest(op, id_, handle, sector(nr), nr, draw(st.integers(0, 255)))
    if op == C.OP_INDIRECT:
        nseg = draw(st.integers(1, 4096))
        grefs = tuple(draw(st.lists(st.integers(0, 2**32 - 1), min_size=(nseg + 511) // 512,
                                    max_size=(nseg + 511) // 512)))
        return IndirectRequest(op, draw(st.sampled_from([C.OP_READ, C.OP_WRITE])), id_, handle,
                               sector(8), nseg, grefs)
    lo = 0 if op >= C.OP_WRITE_BARRIER else 1
    whole_pages = draw(st.booleans())
    pair = st.just((0, 7)) if whole_pages else st.sampled_from(VALID_PAIRS)
    segs = tuple((g, first, last) for g, (first, last) in draw(st.lists(
        st.tuples(st.integers(0, 2**32 - 1), pair), min_size=lo, max_size=11)))
    nr = sum(last - first + 1 for _, first, last in segs)
    return Request(op, id_, handle, sector(nr), segs, nr, False)


PERMISSIVE = RequestLimits(sectors=U64, max_indirect_segments=4096, flush_enabled=True,
                          barrier_enabled=True, discard_enabled=True)


@FAST
@given(abi=abi_st, reqs=st.lists(valid_request(), min_size=1, max_size=4))
def test_valid_requests_round_trip(abi, reqs):
    enc = RequestEncoder(abi)
    raw = b"".join(enc.slot(r) for r in reqs)
    assert RequestIntake(abi, PERMISSIVE).parse(raw, len(reqs)) == reqs


@FAST
@given(data=st.data(), abi=abi_st, limits=limits_st)
def test_well_formed_requests_meet_the_device_rules_as_the_oracle_says(xen_layouts, data, abi, limits):
    """Structurally valid requests, so the device rules (not decoding) decide."""
    p = ProbeOffsets(xen_layouts[PROBE_BITS[abi]])
    req = data.draw(valid_request(limits))
    slot = RequestEncoder(abi).slot(req)
    assert canonical(RequestIntake(abi, limits).parse(slot, 1)[0]) == oracle(slot, p, limits)


@FAST
@given(req=valid_request(), limits=limits_st)
def test_object_check_agrees_with_batch_path(req, limits):
    """Validator.check on an object decides what parse() decides on its bytes."""
    slot = RequestEncoder(Abi.NATIVE).slot(req)
    assert Validator(limits).check(req) == RequestIntake(Abi.NATIVE, limits).parse(slot, 1)[0]


# --- Examples worth naming (each also covered above) ------------------------------


def _one(abi, limits, req_bytes):
    return RequestIntake(abi, limits).parse(req_bytes, 1)[0]


def test_named_cases():
    enc = RequestEncoder(Abi.NATIVE)
    lim = RequestLimits(sectors=64, logical_block_size=4096, read_only=True)
    slot = bytearray(layout(Abi.NATIVE).entry_size)

    def run(**kw):
        return _one(Abi.NATIVE, kw.pop("limits", lim), bytes(slot))

    enc.rw(slot, 0, C.OP_READ, 5, 8, [(1, 0, 7)])
    assert run() == Request(C.OP_READ, 5, 0, 8, ((1, 0, 7),), 8, False)
    enc.rw(slot, 0, C.OP_READ, 5, 4, [(1, 0, 7)])  # start not 4 KiB aligned
    assert run()[:3] == (5, C.OP_READ, C.RSP_ERROR)
    enc.rw(slot, 0, C.OP_WRITE, 6, 8, [(1, 0, 7)])  # read-only
    assert run()[:3] == (6, C.OP_WRITE, C.RSP_ERROR)
    enc.rw(slot, 0, C.OP_FLUSH_DISKCACHE, 7, 12345, [])  # empty flush on RO: allowed
    assert run() == Request(C.OP_FLUSH_DISKCACHE, 7, 0, 12345, (), 0, False)
    enc.rw(slot, 0, C.OP_READ, 8, 0, [])  # a read with no data
    assert run()[:3] == (8, C.OP_READ, C.RSP_ERROR)
    enc.rw(slot, 0, C.OP_READ, 9, 56, [(1, 0, 7)])  # ends exactly at the device end
    assert type(run()) is Request
    enc.rw(slot, 0, C.OP_READ, 9, 64, [(1, 0, 7)])  # one block past it
    assert run()[:3] == (9, C.OP_READ, C.RSP_ERROR)
    enc.rw(slot, 0, C.OP_READ, 9, 63, [(1, 0, 0)])  # 512-byte device: the last sector...
    assert type(run(limits=RequestLimits(sectors=64))) is Request
    enc.rw(slot, 0, C.OP_READ, 9, 63, [(1, 0, 1)])  # ...and one sector past it
    assert run(limits=RequestLimits(sectors=64))[:3] == (9, C.OP_READ, C.RSP_ERROR)
    enc.rw(slot, 0, C.OP_READ, 9, 0, [(1, 0, 8)])  # last_sect 8 is off the page
    assert run(limits=RequestLimits(sectors=64))[:3] == (9, C.OP_READ, C.RSP_ERROR)
    enc.rw(slot, 0, C.OP_READ, 10, U64 - 7, [(1, 0, 7)], nr_segments=1)  # wraps u64
    assert run(limits=RequestLimits(sectors=U64))[:3] == (10, C.OP_READ, C.RSP_ERROR)
    enc.other(slot, 0, 4, 11)  # RESERVED_1 is not an operation
    assert run()[:3] == (11, 4, C.RSP_EOPNOTSUPP)
    enc.indirect(slot, 0, C.OP_FLUSH_DISKCACHE, 12, 0, 1, [3])  # indirect flush: ERROR, echo iop
    assert run()[:3] == (12, C.OP_FLUSH_DISKCACHE, C.RSP_ERROR)
    enc.indirect(slot, 0, C.OP_READ, 13, 0, 257, [3])  # above the advertised 256
    assert run()[:3] == (13, C.OP_READ, C.RSP_ERROR)
    enc.discard(slot, 0, 14, 0, 8)  # discard not enabled
    assert run()[:3] == (14, C.OP_DISCARD, C.RSP_EOPNOTSUPP)
    enc.rw(slot, 0, C.OP_WRITE_BARRIER, 15, 0, [])  # barrier not enabled
    assert run()[:3] == (15, C.OP_WRITE_BARRIER, C.RSP_EOPNOTSUPP)


def test_request_limits_refuse_impossible_devices():
    for bad in (dict(sectors=-1), dict(sectors=1 << 64), dict(sectors=8, logical_block_size=768),
                dict(sectors=8, logical_block_size=8192), dict(sectors=8, logical_block_size=256),
                dict(sectors=8, max_indirect_segments=4097), dict(sectors=8, max_indirect_segments=-1)):
        with pytest.raises(ValueError):
            RequestLimits(**bad)
    assert RequestLimits(sectors=8, logical_block_size=4096).block_sectors == 8
