"""Raw /dev/xen/gntalloc for the rig: dom0 grants pages to itself (a frontend's part).

Written from the kernel's include/uapi/xen/gntalloc.h, not with our adapters'
encoders, so that a mistake in an adapter cannot cancel itself out; the unit
suite (tests/test_gntdev_abi.py) checks these layouts and numbers against
that header compiled by gcc.

    ga = Gntalloc()
    refs, mem = ga.alloc(4, writable=True)   # grant refs for domid 0, and our mmap of the pages
    ga.close()                               # unmap and deallocate every allocation
"""
from __future__ import annotations

import ctypes
import fcntl
import mmap
import os
import struct

PAGE_SIZE = 4096


def ioc_none(type_: str, nr: int, size: int) -> int:
    # _IOC(_IOC_NONE, type, nr, size) from asm-generic/ioctl.h: dir 0 in bits 30-31.
    return (size << 16) | (ord(type_) << 8) | nr


class GntallocAllocGrefHeader(ctypes.Structure):
    # struct ioctl_gntalloc_alloc_gref without its variable gref_ids[] tail (which starts right after it)
    _fields_ = [("domid", ctypes.c_uint16), ("flags", ctypes.c_uint16), ("count", ctypes.c_uint32),
                ("index", ctypes.c_uint64)]


class GntallocDeallocGref(ctypes.Structure):
    _fields_ = [("index", ctypes.c_uint64), ("count", ctypes.c_uint32)]


# The sizes the kernel's header puts in the numbers include gref_ids[1] (24) and tail padding (16).
IOCTL_GNTALLOC_ALLOC_GREF = ioc_none("G", 5, ctypes.sizeof(GntallocAllocGrefHeader) + 8)
IOCTL_GNTALLOC_DEALLOC_GREF = ioc_none("G", 6, ctypes.sizeof(GntallocDeallocGref))
GNTALLOC_FLAG_WRITABLE = 1


class Gntalloc:
    """Pages of dom0 granted to dom0 itself: the 'guest' side of the gntdev checks."""

    def __init__(self) -> None:
        self.fd = os.open("/dev/xen/gntalloc", os.O_RDWR)
        self.allocs: list[tuple[int, int, mmap.mmap]] = []

    def alloc(self, count: int, *, writable: bool) -> tuple[list[int], mmap.mmap]:
        """`count` pages granted to domain 0: their grant refs, and our mapping of them."""
        header = ctypes.sizeof(GntallocAllocGrefHeader)  # gref_ids[] start right after it
        buf = bytearray(max(header + 8, (header + 4 * count + 7) // 8 * 8))  # refs, padded to 8
        struct.pack_into("<HHIQ", buf, 0, 0, GNTALLOC_FLAG_WRITABLE if writable else 0, count, 0)
        fcntl.ioctl(self.fd, IOCTL_GNTALLOC_ALLOC_GREF, buf)
        index = struct.unpack_from("<Q", buf, GntallocAllocGrefHeader.index.offset)[0]
        refs = list(struct.unpack_from(f"<{count}I", buf, header))
        mem = mmap.mmap(self.fd, count * PAGE_SIZE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE, offset=index)
        self.allocs.append((index, count, mem))
        return refs, mem

    def close(self) -> None:
        for index, count, mem in self.allocs:
            mem.close()
            fcntl.ioctl(self.fd, IOCTL_GNTALLOC_DEALLOC_GREF, struct.pack("<QI4x", index, count))
        os.close(self.fd)
