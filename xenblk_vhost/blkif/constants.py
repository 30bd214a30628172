"""Numbers the blkif protocol fixes, from xen/include/public/io/blkif.h.

Plain int constants are what the datapath compares against (comparing an int
to an IntEnum member goes through the enum's __eq__ and is slower); the
IntEnums exist for readable logs and reprs. Every value here is checked
against Xen's header by tests/test_blkif_layout.py.
"""

from __future__ import annotations

import enum

# --- Operations (blkif_request.operation) -----------------------------------

OP_READ = 0
OP_WRITE = 1
OP_WRITE_BARRIER = 2
OP_FLUSH_DISKCACHE = 3
OP_RESERVED_1 = 4  # was BLKIF_OP_TRIM in some old trees; never valid on the wire
OP_DISCARD = 5
OP_INDIRECT = 6


class Op(enum.IntEnum):
    READ = OP_READ
    WRITE = OP_WRITE
    WRITE_BARRIER = OP_WRITE_BARRIER
    FLUSH_DISKCACHE = OP_FLUSH_DISKCACHE
    RESERVED_1 = OP_RESERVED_1
    DISCARD = OP_DISCARD
    INDIRECT = OP_INDIRECT


# --- Response statuses (blkif_response.status, an int16) --------------------

RSP_OKAY = 0
RSP_ERROR = -1
RSP_EOPNOTSUPP = -2


class Status(enum.IntEnum):
    OKAY = RSP_OKAY
    ERROR = RSP_ERROR
    EOPNOTSUPP = RSP_EOPNOTSUPP


# --- Limits ------------------------------------------------------------------

# Segments that fit in one ring slot (blkif_request.seg[]).
MAX_SEGMENTS_PER_REQUEST = 11
# Indirect grant refs that fit in one indirect ring slot.
MAX_INDIRECT_PAGES_PER_REQUEST = 8
# A 4 KiB indirect page holds this many 8-byte blkif_request_segment.
SEGMENTS_PER_INDIRECT_PAGE = 512
# The most segments an indirect request can name at all (8 pages of 512):
# the hard ceiling for any advertised feature-max-indirect-segments.
MAX_INDIRECT_SEGMENTS_ABI = MAX_INDIRECT_PAGES_PER_REQUEST * SEGMENTS_PER_INDIRECT_PAGE
# What Linux blkback advertises (common.h MAX_INDIRECT_SEGMENTS) and what we
# advertise unless configured otherwise.
DEFAULT_MAX_INDIRECT_SEGMENTS = 256
# max-ring-page-order we can offer (XENBUS_MAX_RING_GRANT_ORDER: 16 pages).
MAX_RING_PAGE_ORDER = 4

# Xen pages and blkif sectors. Sector numbers, first_sect/last_sect and the
# `sectors` key are always in 512-byte units whatever the device's
# sector-size (Xen 4.20 blkif.h clarification).
XEN_PAGE_SIZE = 4096
SECTOR_SIZE = 512
SECTORS_PER_PAGE = XEN_PAGE_SIZE // SECTOR_SIZE  # last_sect must be below this

# --- Flags -------------------------------------------------------------------

# blkif_request_discard.flag: ask for a secure erase (ignored by a backend
# that did not advertise discard-secure).
DISCARD_SECURE = 1 << 0

# Bits of the `info` xenstore key.
VDISK_CDROM = 0x1
VDISK_REMOVABLE = 0x2
VDISK_READONLY = 0x4

# --- The `protocol` frontend key (xen/include/public/io/protocols.h) --------

PROTOCOL_X86_32 = "x86_32-abi"
PROTOCOL_X86_64 = "x86_64-abi"
PROTOCOL_ARM = "arm-abi"

U64_MAX = (1 << 64) - 1
U32_MASK = (1 << 32) - 1
