"""The blkif ABI tables against Xen's public headers, as gcc lays them out.

tests/probes/blkif_layout.c is compiled with -m64 (x86_64-abi, and native
on our x86_64 hosts) and -m32 (x86_32-abi) against /usr/include/xen and
prints sizeof/offsetof of every field; every Python table must match it.
Beyond the tables, the Structs built from them are checked by behaviour:
bytes they pack are read back at gcc's offsets, and vice versa.
"""

from __future__ import annotations

import struct

import pytest

from blkif_support.fixtures import PROBE_BITS, ProbeOffsets
from xenblk_vhost.blkif import constants as C
from xenblk_vhost.blkif.abi import (
    SEGMENT,
    SRING,
    SRING_ENTRIES_OFFSET,
    Abi,
    UnknownProtocol,
    abi_for_protocol,
    layout,
    ring_entries,
)
from xenblk_vhost.blkif.decode import RequestDecoder
from xenblk_vhost.blkif.encode import RequestEncoder
from xenblk_vhost.blkif.request import DiscardRequest, IndirectRequest, Request

ABIS = list(Abi)

# (C struct name, attribute of Layout holding our table)
REQUEST_STRUCTS = [
    ("blkif_request", "request"),
    ("blkif_request_discard", "discard"),
    ("blkif_request_indirect", "indirect"),
    ("blkif_response", "response"),
]


def offsets(xen_layouts, abi) -> ProbeOffsets:
    return ProbeOffsets(xen_layouts[PROBE_BITS[abi]])


@pytest.mark.parametrize("abi", ABIS, ids=lambda a: a.name)
@pytest.mark.parametrize("c_name,attr", REQUEST_STRUCTS, ids=[s[0] for s in REQUEST_STRUCTS])
def test_struct_table_matches_gcc(xen_layouts, abi, c_name, attr):
    probe = offsets(xen_layouts, abi)
    table = getattr(layout(abi), attr)
    assert table.size == probe.sizeof(c_name)
    # Same set of fields: nothing of Xen's is missing, nothing invented.
    assert sorted(table.fields) == probe.fields(c_name)
    for field in table.fields:
        assert (field, table.offset(field)) == (field, probe.offset(c_name, field))
        assert (field, table.field_size(field)) == (field, probe.size(c_name, field))


@pytest.mark.parametrize("abi", ABIS, ids=lambda a: a.name)
def test_segment_and_ring_header_match_gcc(xen_layouts, abi):
    probe = offsets(xen_layouts, abi)
    assert SEGMENT.size == probe.sizeof("blkif_request_segment")
    assert sorted(SEGMENT.fields) == probe.fields("blkif_request_segment")
    for field in SEGMENT.fields:
        assert SEGMENT.offset(field) == probe.offset("blkif_request_segment", field)
        assert SEGMENT.field_size(field) == probe.size("blkif_request_segment", field)
    # Ring header: our "pad" is ring.h's "__pad"; entries start after it.
    c_names = {"pad": "__pad"}
    for field in SRING.fields:
        c_field = c_names.get(field, field)
        assert SRING.offset(field) == probe.offset("blkif_sring", c_field), field
        assert SRING.field_size(field) == probe.size("blkif_sring", c_field), field
    assert sorted([c_names.get(f, f) for f in SRING.fields] + ["ring"]) == probe.fields("blkif_sring")
    assert SRING_ENTRIES_OFFSET == probe.offset("blkif_sring", "ring")
    assert layout(abi).entry_size == int(probe.kv["blkif_sring.entry_size"])


@pytest.mark.parametrize("abi", ABIS, ids=lambda a: a.name)
@pytest.mark.parametrize("order", range(C.MAX_RING_PAGE_ORDER + 1))
def test_ring_entries_match_RING_SIZE(xen_layouts, abi, order):
    assert ring_entries(abi, order) == int(xen_layouts[PROBE_BITS[abi]][f"ring_entries.{order}"])


def test_ring_entries_refuses_orders_we_do_not_offer():
    with pytest.raises(ValueError):
        ring_entries(Abi.NATIVE, C.MAX_RING_PAGE_ORDER + 1)
    with pytest.raises(ValueError):
        ring_entries(Abi.NATIVE, -1)


def test_constants_match_blkif_h(xen_layouts):
    kv = xen_layouts["64"]
    consts64 = {k: v for k, v in kv.items() if k.startswith("const.")}
    consts32 = {k: v for k, v in xen_layouts["32"].items() if k.startswith("const.")}
    assert consts64 == consts32  # ABI-independent, as they should be
    ours = {
        "BLKIF_OP_READ": C.OP_READ,
        "BLKIF_OP_WRITE": C.OP_WRITE,
        "BLKIF_OP_WRITE_BARRIER": C.OP_WRITE_BARRIER,
        "BLKIF_OP_FLUSH_DISKCACHE": C.OP_FLUSH_DISKCACHE,
        "BLKIF_OP_RESERVED_1": C.OP_RESERVED_1,
        "BLKIF_OP_DISCARD": C.OP_DISCARD,
        "BLKIF_OP_INDIRECT": C.OP_INDIRECT,
        "BLKIF_MAX_SEGMENTS_PER_REQUEST": C.MAX_SEGMENTS_PER_REQUEST,
        "BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST": C.MAX_INDIRECT_PAGES_PER_REQUEST,
        "BLKIF_RSP_OKAY": C.RSP_OKAY,
        "BLKIF_RSP_ERROR": C.RSP_ERROR,
        "BLKIF_RSP_EOPNOTSUPP": C.RSP_EOPNOTSUPP,
        "BLKIF_DISCARD_SECURE": C.DISCARD_SECURE,
        "VDISK_CDROM": C.VDISK_CDROM,
        "VDISK_REMOVABLE": C.VDISK_REMOVABLE,
        "VDISK_READONLY": C.VDISK_READONLY,
    }
    assert {k: int(kv["const." + k]) for k in ours} == ours
    # Enums agree with the plain constants.
    assert [int(op) for op in C.Op] == [0, 1, 2, 3, 4, 5, 6]
    assert {s.name: int(s) for s in C.Status} == {"OKAY": 0, "ERROR": -1, "EOPNOTSUPP": -2}
    # 512 segments per indirect page = a page of 8-byte segments.
    assert C.SEGMENTS_PER_INDIRECT_PAGE * int(kv["blkif_request_segment.sizeof"]) == C.XEN_PAGE_SIZE


def test_protocol_names_match_protocols_h(xen_layouts):
    kv = xen_layouts["64"]
    assert (C.PROTOCOL_X86_32, C.PROTOCOL_X86_64, C.PROTOCOL_ARM) == (
        kv["proto.x86_32"], kv["proto.x86_64"], kv["proto.arm"])
    # On the x86_64 build the native protocol is x86_64-abi: it maps to NATIVE.
    assert abi_for_protocol(kv["proto.native"]) is Abi.NATIVE
    native, x86_64 = layout(Abi.NATIVE), layout(Abi.X86_64)
    for attr in ("request", "discard", "indirect", "response", "entry_size"):
        assert getattr(native, attr) == getattr(x86_64, attr), attr
    assert abi_for_protocol(kv["proto.x86_32"]) is Abi.X86_32
    # blkback's x86 default when the frontend writes no protocol key.
    assert abi_for_protocol(None) is Abi.X86_32
    for bad in (kv["proto.arm"], "", "x86_64", "X86_64-ABI"):
        with pytest.raises(UnknownProtocol):
            abi_for_protocol(bad)


# --- Behaviour at gcc's offsets ---------------------------------------------------


@pytest.mark.parametrize("abi", ABIS, ids=lambda a: a.name)
def test_encoded_fields_sit_at_gcc_offsets(xen_layouts, abi):
    """Our encoder's bytes, read with gcc's offsets, give back every field."""
    p = offsets(xen_layouts, abi)
    enc = RequestEncoder(abi)
    segs = [(0x11223344 + i, i % 8, 7) for i in range(C.MAX_SEGMENTS_PER_REQUEST)]
    rw = enc.slot(Request(C.OP_WRITE, 0x0102030405060708, 0xA1B2, 0x1122334455667788,
                          tuple(segs), 0, False))
    s = "blkif_request"
    assert [p.get(rw, s, f) for f in ("operation", "nr_segments", "handle", "id", "sector_number")] == [
        C.OP_WRITE, 11, 0xA1B2, 0x0102030405060708, 0x1122334455667788]
    seg0 = p.offset(s, "seg")
    seg_size = p.sizeof("blkif_request_segment")
    for i, (gref, first, last) in enumerate(segs):
        base = seg0 + i * seg_size
        assert struct.unpack_from("<I", rw, base + p.offset("blkif_request_segment", "gref"))[0] == gref
        assert rw[base + p.offset("blkif_request_segment", "first_sect")] == first
        assert rw[base + p.offset("blkif_request_segment", "last_sect")] == last

    d = enc.slot(DiscardRequest(C.OP_DISCARD, 0xDEADBEEFCAFEF00D, 7, 0x0A0B0C0D0E0F1011, 0x123456789, 1))
    s = "blkif_request_discard"
    assert [p.get(d, s, f) for f in ("operation", "flag", "handle", "id", "sector_number", "nr_sectors")] == [
        C.OP_DISCARD, 1, 7, 0xDEADBEEFCAFEF00D, 0x0A0B0C0D0E0F1011, 0x123456789]

    grefs = tuple(0x51000000 + i for i in range(C.MAX_INDIRECT_PAGES_PER_REQUEST))
    ind = enc.slot(IndirectRequest(C.OP_INDIRECT, C.OP_READ, 0xFEEDFACE12345678, 0x4321, 0x77, 4096, grefs))
    s = "blkif_request_indirect"
    names = ("operation", "indirect_op", "nr_segments", "id", "sector_number", "handle")
    assert [p.get(ind, s, f) for f in names] == [
        C.OP_INDIRECT, C.OP_READ, 4096, 0xFEEDFACE12345678, 0x77, 0x4321]
    g0 = p.offset(s, "indirect_grefs")
    assert struct.unpack_from("<8I", ind, g0) == grefs


@pytest.mark.parametrize("abi", ABIS, ids=lambda a: a.name)
def test_decoder_reads_fields_from_gcc_offsets(xen_layouts, abi):
    """Bytes written at gcc's offsets (not by our encoder) decode to those values."""
    p = offsets(xen_layouts, abi)
    dec = RequestDecoder(abi)
    entry = layout(abi).entry_size

    buf = bytearray(b"\xa5" * entry)  # hostile filler in every pad byte
    s = "blkif_request"
    for f, v in (("operation", C.OP_READ), ("nr_segments", 2), ("handle", 0x5A5A),
                 ("id", 0x8877665544332211), ("sector_number", 0xF0E0D0C0B0A09080)):
        p.put(buf, s, f, v)
    seg0 = p.offset(s, "seg")
    for i, (gref, first, last) in enumerate([(0xCAFE0001, 1, 3), (0xCAFE0002, 0, 7)]):
        base = seg0 + i * p.sizeof("blkif_request_segment")
        struct.pack_into("<I", buf, base + p.offset("blkif_request_segment", "gref"), gref)
        buf[base + p.offset("blkif_request_segment", "first_sect")] = first
        buf[base + p.offset("blkif_request_segment", "last_sect")] = last
    assert dec.decode(bytes(buf)) == Request(
        C.OP_READ, 0x8877665544332211, 0x5A5A, 0xF0E0D0C0B0A09080,
        ((0xCAFE0001, 1, 3), (0xCAFE0002, 0, 7)), 3 + 8, False)

    buf = bytearray(b"\x5a" * entry)
    s = "blkif_request_discard"
    for f, v in (("operation", C.OP_DISCARD), ("flag", 3), ("handle", 9), ("id", 42),
                 ("sector_number", 1 << 40), ("nr_sectors", 1 << 33)):
        p.put(buf, s, f, v)
    assert dec.decode(bytes(buf)) == DiscardRequest(C.OP_DISCARD, 42, 9, 1 << 40, 1 << 33, 3)

    buf = bytearray(b"\xff" * entry)
    s = "blkif_request_indirect"
    for f, v in (("operation", C.OP_INDIRECT), ("indirect_op", C.OP_WRITE), ("nr_segments", 1025),
                 ("id", 77), ("sector_number", 1 << 20), ("handle", 3)):
        p.put(buf, s, f, v)
    g0 = p.offset(s, "indirect_grefs")
    struct.pack_into("<8I", buf, g0, *range(100, 108))
    # 1025 segments need 3 indirect pages: only their grefs are taken.
    assert dec.decode(bytes(buf)) == IndirectRequest(C.OP_INDIRECT, C.OP_WRITE, 77, 3, 1 << 20, 1025,
                                                     (100, 101, 102))
