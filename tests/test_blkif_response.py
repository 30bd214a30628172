"""Response encoding: fields at gcc's offsets, every padding byte zeroed.

The slot is pre-filled with 0xff (stale request bytes, or anything); after
encoding, each byte of the response struct is either part of a field gcc
reported for Xen's struct blkif_response, holding our value, or padding,
holding 0; bytes past sizeof(struct blkif_response) are not touched.
"""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from blkif_support.fixtures import PROBE_BITS, ProbeOffsets
from xenblk_vhost.blkif.abi import Abi, layout
from xenblk_vhost.blkif.encode import RequestEncoder
from xenblk_vhost.blkif.response import Response, decode_response, encode_response
from xenblk_vhost.blkif.ring import BackRing, FrontRing, ring_bytes

RSP = "blkif_response"
SETTINGS = settings(max_examples=150, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])

ids = st.one_of(st.sampled_from([0, 1, (1 << 64) - 1]), st.integers(0, (1 << 64) - 1))
ops = st.integers(0, 255)
statuses = st.one_of(st.sampled_from([0, -1, -2, -32768, 32767]), st.integers(-32768, 32767))


def check_response_bytes(p: ProbeOffsets, buf: bytes, off: int, id_: int, op: int, status: int) -> None:
    struct_bytes = buf[off:off + p.sizeof(RSP)]
    assert p.get(struct_bytes, RSP, "id") == id_
    assert p.get(struct_bytes, RSP, "operation") == op
    assert p.get(struct_bytes, RSP, "status", signed=True) == status
    covered = set()
    for field in p.fields(RSP):
        start = p.offset(RSP, field)
        covered.update(range(start, start + p.size(RSP, field)))
    padding = [i for i in range(p.sizeof(RSP)) if i not in covered]
    assert padding, "both ABIs' responses have padding"
    assert [struct_bytes[i] for i in padding] == [0] * len(padding)
    assert set(buf[:off]) <= {0xFF} and set(buf[off + p.sizeof(RSP):]) <= {0xFF}


@SETTINGS
@given(abi=st.sampled_from(list(Abi)), id_=ids, op=ops, status=statuses, off=st.integers(0, 16))
def test_encode_response_zeroes_padding_at_gcc_offsets(xen_layouts, abi, id_, op, status, off):
    p = ProbeOffsets(xen_layouts[PROBE_BITS[abi]])
    buf = bytearray(b"\xff" * (off + 128))
    encode_response(abi, buf, off, id_, op, status)
    check_response_bytes(p, bytes(buf), off, id_, op, status)
    assert decode_response(abi, buf, off) == Response(id_, op, status)


@SETTINGS
@given(abi=st.sampled_from(list(Abi)),
       answers=st.lists(st.tuples(ids, ops, statuses), min_size=1, max_size=40))
def test_back_ring_responses_zero_padding_in_every_slot(xen_layouts, abi, answers):
    p = ProbeOffsets(xen_layouts[PROBE_BITS[abi]])
    mem = bytearray(b"\xff" * ring_bytes(0))
    view = memoryview(mem)
    front = FrontRing(view, abi, 0)  # zeroes the header only
    back = BackRing(view, abi, 0)
    enc = RequestEncoder(abi)
    entry = layout(abi).entry_size
    done = 0
    while done < len(answers):
        # Responses need consumed requests; go round the ring as often as needed.
        batch = answers[done:done + front.size]
        for _ in batch:
            enc.other(view, front.claim_request_slot(), 200, 0)
        front.push_requests()
        assert back.take_slots(len(batch))[1] == len(batch)
        for id_, op, status in batch:
            slot = back.slot_offset(back.rsp_prod_pvt)
            # Make the slot's leftover request bytes hostile, then answer.
            mem[slot:slot + entry] = b"\xff" * entry
            before = bytes(mem)
            back.put_response(id_, op, status)
            check_response_bytes(p, bytes(mem[slot:slot + entry]), 0, id_, op, status)
            # Nothing outside this response struct changed.
            changed = [i for i in range(len(mem)) if mem[i] != before[i]]
            assert all(slot <= i < slot + p.sizeof(RSP) for i in changed)
        back.push_responses()
        assert front.take_responses(len(batch)) == [Response(*a) for a in batch]
        done += len(batch)
