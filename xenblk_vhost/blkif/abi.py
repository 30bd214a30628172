"""The three blkif guest ABIs and their byte layouts.

A frontend names its ABI in the `protocol` xenstore key. The layouts differ
only in alignment: an x86_32 guest aligns uint64_t to 4 bytes, so its
requests have no padding before `id` and its response is 12 bytes, where an
x86_64 guest's is 16. NATIVE is the backend's own ABI; our hosts are x86_64,
so NATIVE uses the x86_64 layouts (as Linux blkback's native ring does on an
x86_64 dom0).

Each C struct is described once, as a table of fields (offset, struct
format code) transcribed from xen/include/public/io/blkif.h and ring.h; the
precompiled `struct.Struct` objects the datapath uses are *built from* those
tables, so the tables are the single source of truth that
tests/test_blkif_layout.py compares with gcc's own sizeof/offsetof of
Xen's header, for -m64 and -m32.

Public API:
    Abi                               enum NATIVE / X86_32 / X86_64
    layout(abi) -> Layout             the struct objects and sizes of one ABI
    ring_entries(abi, order) -> int   __RING_SIZE for a 2**order page ring
    abi_for_protocol(name | None) -> Abi
    UnknownProtocol                   ValueError for an unknown `protocol`
    SRING, SEGMENT                    ABI-independent layouts
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from .constants import (
    MAX_RING_PAGE_ORDER,
    MAX_SEGMENTS_PER_REQUEST,
    PROTOCOL_X86_32,
    PROTOCOL_X86_64,
    XEN_PAGE_SIZE,
)


class Abi(enum.Enum):
    NATIVE = "native"
    X86_32 = PROTOCOL_X86_32
    X86_64 = PROTOCOL_X86_64


class UnknownProtocol(ValueError):
    """The frontend wrote a `protocol` we do not speak (e.g. arm-abi)."""


# Linux blkback (common.h BLKIF_PROTOCOL_DEFAULT) assumes x86_32 on x86 when
# the frontend writes no `protocol` key: old 32-bit PV guests predate it.
DEFAULT_ABI_WHEN_UNSPECIFIED = Abi.X86_32


def abi_for_protocol(name: str | None) -> Abi:
    """Map the frontend's `protocol` key to an ABI as blkback's connect_ring does.

    None (key absent) gives blkback's x86 default, x86_32. The native name
    is checked first, so "x86_64-abi" gives NATIVE on our x86_64 hosts (same
    layout as X86_64).
    """
    if name is None:
        return DEFAULT_ABI_WHEN_UNSPECIFIED
    if name == PROTOCOL_X86_64:  # XEN_IO_PROTO_ABI_NATIVE on x86_64
        return Abi.NATIVE
    if name == PROTOCOL_X86_32:
        return Abi.X86_32
    raise UnknownProtocol(f"unknown frontend protocol {name!r}")


@dataclass(frozen=True)
class StructLayout:
    """One C struct: its sizeof and each field's offset and struct format code.

    A code with a count ("8I", "44s") is an array. `struct_for(*names)` builds
    a little-endian Struct unpacking exactly those fields in offset order,
    with the gaps between them as pad bytes, ending at the last field's end
    (or at sizeof when `to_end`): padding is never read and always packs as
    zero bytes.
    """

    name: str
    size: int
    fields: Mapping[str, tuple[int, str]]

    def offset(self, field: str) -> int:
        return self.fields[field][0]

    def field_size(self, field: str) -> int:
        return struct.calcsize("<" + self.fields[field][1])

    def struct_for(self, *names: str, to_end: bool = False) -> struct.Struct:
        chosen = sorted((self.fields[n][0], self.fields[n][1], n) for n in names)
        fmt = ["<"]
        pos = 0
        for off, code, n in chosen:
            if off < pos:
                raise ValueError(f"{self.name}.{n} overlaps the previous field")
            if off > pos:
                fmt.append(f"{off - pos}x")
            fmt.append(code)
            pos = off + struct.calcsize("<" + code)
        if to_end:
            if pos > self.size:
                raise ValueError(f"{self.name} fields run past sizeof")
            if self.size > pos:
                fmt.append(f"{self.size - pos}x")
        return struct.Struct("".join(fmt))


def _layout(name: str, size: int, **fields: tuple[int, str]) -> StructLayout:
    return StructLayout(name, size, MappingProxyType(dict(fields)))


# struct blkif_request_segment { grant_ref_t gref; uint8_t first_sect, last_sect; }
# Same on every ABI (only 4-byte members); also the element of indirect pages.
SEGMENT = _layout(
    "blkif_request_segment", 8,
    gref=(0, "I"), first_sect=(4, "B"), last_sect=(5, "B"),
)

# The shared ring header (DEFINE_RING_TYPES' struct blkif_sring): four free-
# running 32-bit indices, a 4-byte private union and 44 pad bytes, then the
# entries at offset 64. Identical on every ABI.
SRING = _layout(
    "blkif_sring", 64,
    req_prod=(0, "I"), req_event=(4, "I"), rsp_prod=(8, "I"), rsp_event=(12, "I"),
    pvt=(16, "4s"), pad=(20, "44s"),
)
SRING_ENTRIES_OFFSET = SRING.size  # offsetof(struct blkif_sring, ring)

_SEG_ARRAY = f"{SEGMENT.size * MAX_SEGMENTS_PER_REQUEST}s"


@dataclass(frozen=True)
class Layout:
    """Everything the codec needs to know about one ABI."""

    abi: Abi
    request: StructLayout    # struct blkif_request (read/write/barrier/flush)
    discard: StructLayout    # struct blkif_request_discard
    indirect: StructLayout   # struct blkif_request_indirect
    response: StructLayout   # struct blkif_response
    entry_size: int          # sizeof(union blkif_sring_entry): the slot stride

    # Derived in __post_init__ from the tables (not constructor arguments).
    rw_header: struct.Struct = field(init=False, repr=False, compare=False)
    seg_offset: int = field(init=False, repr=False, compare=False)
    discard_struct: struct.Struct = field(init=False, repr=False, compare=False)
    indirect_struct: struct.Struct = field(init=False, repr=False, compare=False)
    id_struct: struct.Struct = field(init=False, repr=False, compare=False)
    response_struct: struct.Struct = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # Precompiled Structs for the datapath, built from the tables above.
        s = object.__setattr__
        s(self, "rw_header", self.request.struct_for(
            "operation", "nr_segments", "handle", "id", "sector_number"))
        s(self, "seg_offset", self.request.offset("seg"))
        s(self, "discard_struct", self.discard.struct_for(
            "operation", "flag", "handle", "id", "sector_number", "nr_sectors"))
        s(self, "indirect_struct", self.indirect.struct_for(
            "operation", "indirect_op", "nr_segments", "id", "sector_number",
            "handle", "indirect_grefs"))
        s(self, "id_struct", self.request.struct_for("id"))  # unpack_from(buf, slot)
        s(self, "response_struct", self.response.struct_for(
            "id", "operation", "status", to_end=True))
        # Every request kind keeps `id` at the same offset: blkback relies on
        # it to answer ops it cannot parse, and so do we.
        assert self.request.offset("id") == self.discard.offset("id") == self.indirect.offset("id")
        assert self.rw_header.size == self.seg_offset
        assert self.response_struct.size == self.response.size


# x86_64: uint64_t is 8-aligned, so 4 pad bytes follow handle.
_X86_64: dict[str, Any] = dict(
    request=_layout(
        "blkif_request", 112,
        operation=(0, "B"), nr_segments=(1, "B"), handle=(2, "H"),
        id=(8, "Q"), sector_number=(16, "Q"), seg=(24, _SEG_ARRAY),
    ),
    discard=_layout(
        "blkif_request_discard", 32,
        operation=(0, "B"), flag=(1, "B"), handle=(2, "H"),
        id=(8, "Q"), sector_number=(16, "Q"), nr_sectors=(24, "Q"),
    ),
    indirect=_layout(
        "blkif_request_indirect", 64,
        operation=(0, "B"), indirect_op=(1, "B"), nr_segments=(2, "H"),
        id=(8, "Q"), sector_number=(16, "Q"), handle=(24, "H"),
        indirect_grefs=(28, "8I"),
    ),
    response=_layout(
        "blkif_response", 16,
        id=(0, "Q"), operation=(8, "B"), status=(10, "h"),
    ),
    entry_size=112,
)

# x86_32: uint64_t is 4-aligned; the indirect request carries an explicit
# uint64_t pad (#ifdef __i386__) so it is 64 bytes like x86_64's.
_X86_32: dict[str, Any] = dict(
    request=_layout(
        "blkif_request", 108,
        operation=(0, "B"), nr_segments=(1, "B"), handle=(2, "H"),
        id=(4, "Q"), sector_number=(12, "Q"), seg=(20, _SEG_ARRAY),
    ),
    discard=_layout(
        "blkif_request_discard", 28,
        operation=(0, "B"), flag=(1, "B"), handle=(2, "H"),
        id=(4, "Q"), sector_number=(12, "Q"), nr_sectors=(20, "Q"),
    ),
    indirect=_layout(
        "blkif_request_indirect", 64,
        operation=(0, "B"), indirect_op=(1, "B"), nr_segments=(2, "H"),
        id=(4, "Q"), sector_number=(12, "Q"), handle=(20, "H"),
        indirect_grefs=(24, "8I"), pad=(56, "Q"),
    ),
    response=_layout(
        "blkif_response", 12,
        id=(0, "Q"), operation=(8, "B"), status=(10, "h"),
    ),
    entry_size=108,
)

_LAYOUTS = {
    Abi.NATIVE: Layout(Abi.NATIVE, **_X86_64),
    Abi.X86_64: Layout(Abi.X86_64, **_X86_64),
    Abi.X86_32: Layout(Abi.X86_32, **_X86_32),
}


def layout(abi: Abi) -> Layout:
    return _LAYOUTS[abi]


def _round_down_pow2(n: int) -> int:
    return 1 << (n.bit_length() - 1) if n > 0 else 0


def ring_entries(abi: Abi, order: int) -> int:
    """__RING_SIZE: entries in a ring of 2**order pages (always a power of 2)."""
    if not 0 <= order <= MAX_RING_PAGE_ORDER:
        raise ValueError(f"ring page order {order} outside 0..{MAX_RING_PAGE_ORDER}")
    usable = (XEN_PAGE_SIZE << order) - SRING_ENTRIES_OFFSET
    return _round_down_pow2(usable // _LAYOUTS[abi].entry_size)
