"""WireSegments (blkif/request.py): an indirect request's segments kept in wire form.

It must read as the plain tuple of the same (gref, first_sect, last_sect) segments everywhere a
tuple is read (len, iteration, indexing, slices, ==, hash, pickling), and the compiled intake
must hand the copy path its segments without unpacking them (the point of keeping them in wire
form: 256 tuples cost 12-19 us per 1 MiB request).
"""

from __future__ import annotations

import pickle
import struct

from hypothesis import given
from hypothesis import strategies as st

from xenblk_vhost.blkif.abi import Abi
from xenblk_vhost.blkif.constants import OP_INDIRECT, OP_READ, OP_WRITE
from xenblk_vhost.blkif.intake import RequestIntake
from xenblk_vhost.blkif.request import IndirectRequest, Rejection, Request, WireSegments
from xenblk_vhost.blkif.validate import R_MISALIGNED, RequestLimits
from xenblk_vhost.native.intake import CompiledIntake

WIRE = struct.Struct("<IBB2x")
segment_st = st.tuples(st.integers(0, 0xFFFFFFFF), st.integers(0, 7), st.integers(0, 7))


@given(st.lists(segment_st, max_size=40), st.binary(min_size=0, max_size=40))
def test_reads_as_the_plain_tuple(segments, padding):
    plain = tuple(segments)
    # The 2 padding bytes of each segment are never read: any value gives the same segments.
    pad = (padding * 2)[:2].ljust(2, b"\0")
    raw = b"".join(WIRE.pack(*s)[:6] + pad for s in plain)
    lazy = WireSegments(raw)
    assert len(lazy) == len(plain) and bool(lazy) == bool(plain)
    assert lazy == plain and plain == lazy and not (lazy != plain)
    assert hash(lazy) == hash(plain)
    assert list(lazy) == list(plain)
    assert lazy[1:3] == plain[1:3]
    if plain:
        assert lazy[0] == plain[0] and lazy[-1] == plain[-1]
        assert plain[0] in lazy and lazy.index(plain[-1]) == plain.index(plain[-1])
    assert lazy == WireSegments(b"".join(WIRE.pack(*s) for s in plain))
    assert lazy != plain + ((1, 0, 0),)
    assert lazy != list(plain)  # a list is not equal to a tuple either
    copy = pickle.loads(pickle.dumps(lazy))
    assert type(copy) is WireSegments and copy == plain and copy.raw == raw


def test_a_request_with_them_equals_the_request_with_the_tuple():
    segs = ((10, 0, 7), (11, 2, 3))
    lazy = WireSegments(b"".join(WIRE.pack(*s) for s in segs))
    assert Request(OP_READ, 1, 0, 8, lazy, 10, True) == Request(OP_READ, 1, 0, 8, segs, 10, True)
    assert Request(OP_READ, 1, 0, 8, lazy, 10, True) != Request(OP_READ, 1, 0, 8, segs[:1], 10, True)


def _decode(intake, nseg: int, first: int = 0, last: int = 7):
    header = IndirectRequest(OP_INDIRECT, OP_WRITE, 9, 0, 64, nseg, (5,))
    return intake.decode_indirect_segments(header, b"".join(WIRE.pack(100 + k, first, last) for k in range(nseg)))


def test_the_compiled_intake_leaves_them_in_wire_form():
    """Even where the device's block size makes the validator check every segment's length (4 KiB)."""
    for block in (512, 4096):
        limits = RequestLimits(sectors=1 << 30, logical_block_size=block, max_indirect_segments=256)
        req = _decode(CompiledIntake(Abi.NATIVE, limits), 256)
        assert type(req) is Request and type(req.segments) is WireSegments
        assert req.segments._segments is None  # not unpacked
        assert req.nr_sectors == 256 * 8 and req.segments[255] == (355, 0, 7)


def test_a_segment_not_whole_blocks_is_still_refused():
    """The compiled intake checks the lengths in C, from the wire form."""
    limits = RequestLimits(sectors=1 << 30, logical_block_size=4096, max_indirect_segments=256)
    for intake in (CompiledIntake(Abi.NATIVE, limits), RequestIntake(Abi.NATIVE, limits)):
        bad = _decode(intake, 3, first=1, last=7)
        assert type(bad) is Rejection and bad.reason == R_MISALIGNED
