"""frontend_params: the frontend's transport nodes into a ConnectionSpec, as blkback's connect_ring.

Pure tests over a dict of nodes (what the frontend dir would hold), plus a
property test: whatever bytes a hostile guest writes, the answer is a spec
within what we offered or a FrontendParamError, never anything else.
"""

from __future__ import annotations

import errno

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from xenblk_vhost.backend.contract import RingSpec
from xenblk_vhost.backend.xenbus.frontend_params import (
    MAX_EVENT_CHANNEL_PORT,
    FrontendParamError,
    Offer,
    parse_connection,
    parse_unsigned,
    show,
)
from xenblk_vhost.blkif.abi import Abi

FE = "/local/domain/5/device/vbd/51712"
OFFER = Offer(max_queues=4, max_ring_page_order=4, persistent=True)


def reader(nodes: dict[str, str | bytes]):
    async def read(path: str):
        assert path.startswith(FE + "/")
        value = nodes.get(path[len(FE) + 1:])
        return value.encode() if isinstance(value, str) else value

    return read


async def parse(nodes, offer=OFFER):
    return await parse_connection(reader(nodes), FE, 5, offer)


async def test_single_page_single_queue_as_linux_blkfront_writes_it():
    spec = await parse({"ring-ref": "8", "event-channel": "11", "protocol": "x86_64-abi", "feature-persistent": "1"})
    assert spec.frontend_domid == 5 and spec.abi is Abi.NATIVE and spec.persistent_grants
    assert spec.rings == (RingSpec(0, (8,), 11),)


async def test_multi_page_multi_queue_with_order_at_the_top_level():
    nodes = {"ring-page-order": "2", "multi-queue-num-queues": "2", "protocol": "x86_32-abi"}
    for q in range(2):
        nodes.update({f"queue-{q}/ring-ref{i}": str(100 * q + i) for i in range(4)})
        nodes[f"queue-{q}/event-channel"] = str(20 + q)
    spec = await parse(nodes)
    assert spec.abi is Abi.X86_32 and not spec.persistent_grants
    assert spec.rings == (RingSpec(0, (0, 1, 2, 3), 20), RingSpec(1, (100, 101, 102, 103), 21))
    assert [r.order for r in spec.rings] == [2, 2]


async def test_defaults_no_protocol_is_x86_32_and_persistent_only_if_offered():
    spec = await parse({"ring-ref": "8", "event-channel": "3", "feature-persistent": "1"},
                       Offer(max_queues=1, max_ring_page_order=0, persistent=False))
    assert spec.abi is Abi.X86_32  # blkback's BLKIF_PROTOCOL_DEFAULT on x86
    assert not spec.persistent_grants


async def test_order_zero_written_explicitly_takes_ring_ref0_or_falls_back_to_ring_ref():
    assert (await parse({"ring-page-order": "0", "ring-ref0": "9", "event-channel": "3"})).rings[0].ring_refs == (9,)
    assert (await parse({"ring-page-order": "0", "ring-ref": "9", "event-channel": "3"})).rings[0].ring_refs == (9,)


@pytest.mark.parametrize("nodes, err, message", [
    ({"ring-ref": "8"}, errno.EINVAL, f"reading {FE}/event-channel: missing"),
    ({"event-channel": "3"}, errno.EINVAL, f"reading {FE}/ring-ref: missing"),
    ({"ring-ref": "8", "event-channel": str(MAX_EVENT_CHANNEL_PORT + 1)}, errno.EINVAL,
     f"reading {FE}/event-channel: {MAX_EVENT_CHANNEL_PORT + 1} is out of range (max {MAX_EVENT_CHANNEL_PORT})"),
    ({"ring-ref": " 8", "event-channel": "3"}, errno.EINVAL, f"reading {FE}/ring-ref: ' 8' is not an unsigned integer"),
    ({"ring-ref": "8", "event-channel": "3", "multi-queue-num-queues": "5"}, errno.ENOSYS,
     "guest requested 5 queues, exceeding the maximum of 4."),
    ({"ring-ref": "8", "event-channel": "3", "multi-queue-num-queues": "x"}, errno.EINVAL,
     f"reading {FE}/multi-queue-num-queues: 'x' is not an unsigned integer"),
    ({"ring-page-order": "5", "ring-ref0": "8", "event-channel": "3"}, errno.EINVAL,
     "requested ring page order 5 exceed max:4"),
    ({"ring-page-order": "1", "ring-ref0": "8", "event-channel": "3"}, errno.EINVAL,
     f"reading {FE}/ring-ref1: missing"),
    ({"protocol": "arm-abi", "ring-ref": "8", "event-channel": "3"}, errno.ENOSYS, "unknown fe protocol 'arm-abi'"),
    ({"protocol": "x" * 100, "ring-ref": "8", "event-channel": "3"}, errno.ENOSYS,
     f"unknown fe protocol {show(b'x' * 100)}"),
    ({"protocol": b"\xff\xfe", "ring-ref": "8", "event-channel": "3"}, errno.ENOSYS,
     "unknown fe protocol '\\\\xff\\\\xfe'"),
])
async def test_bad_nodes_give_blkbacks_errors(nodes, err, message):
    with pytest.raises(FrontendParamError) as caught:
        await parse(nodes)
    assert (caught.value.errno, caught.value.message) == (err, message)


async def test_checks_happen_in_blkbacks_order_protocol_before_queues_before_rings():
    with pytest.raises(FrontendParamError, match="unknown fe protocol"):
        await parse({"protocol": "sparc", "multi-queue-num-queues": "99"})
    with pytest.raises(FrontendParamError, match="queues"):
        await parse({"multi-queue-num-queues": "99", "ring-page-order": "99"})


def test_parse_unsigned_accepts_only_plain_decimal_u32():
    assert parse_unsigned(b"4294967295", "k") == (1 << 32) - 1
    assert parse_unsigned(b"7\0", "k") == 7  # a C string's NUL
    for bad in (b"", b"-1", b"+1", b"0x10", b"1e3", b"1 ", b"\xd9\xa3", b"1" * 17):
        with pytest.raises(FrontendParamError):
            parse_unsigned(bad, "k")


def test_show_keeps_a_guests_bytes_on_one_line_and_short():
    shown = show(b"line\nforged: " + b"A" * 100)
    assert "\n" not in shown and shown.endswith("...") and len(shown) < 60


_KEYS = ["protocol", "feature-persistent", "multi-queue-num-queues", "ring-page-order", "ring-ref", "ring-ref0",
         "ring-ref1", "event-channel", "queue-0/ring-ref", "queue-0/event-channel", "queue-1/ring-ref",
         "queue-1/event-channel", "queue-0/ring-ref0", "queue-0/ring-ref1", "queue-1/ring-ref0", "queue-1/ring-ref1"]
_VALUES = st.one_of(
    st.sampled_from(["0", "1", "2", "3", "4", "5", "65535", "4294967295", "4294967296", "x86_64-abi",
                     "x86_32-abi", "arm-abi", "", "-1", " 1"]),
    st.integers(min_value=0, max_value=1 << 40).map(str),
    st.binary(max_size=24),
)


@settings(max_examples=400, deadline=None)
@given(nodes=st.dictionaries(st.sampled_from(_KEYS), _VALUES, max_size=len(_KEYS)),
       queues=st.integers(1, 4), order=st.integers(0, 4), persistent=st.booleans())
def test_any_nodes_give_a_spec_within_the_offer_or_a_clear_error(nodes, queues, order, persistent):
    offer = Offer(max_queues=queues, max_ring_page_order=order, persistent=persistent)
    try:
        spec = trio.run(parse, nodes, offer)
    except FrontendParamError as e:
        assert e.message and e.errno in (errno.EINVAL, errno.ENOSYS)
        return
    assert 1 <= len(spec.rings) <= queues
    assert [r.index for r in spec.rings] == list(range(len(spec.rings)))
    assert len({len(r.ring_refs) for r in spec.rings}) == 1
    assert all(r.order <= order and len(r.ring_refs) == 1 << r.order for r in spec.rings)
    assert all(0 < r.event_channel <= MAX_EVENT_CHANNEL_PORT for r in spec.rings)
    assert all(0 <= ref < 1 << 32 for r in spec.rings for ref in r.ring_refs)
    assert not spec.persistent_grants or persistent
