"""Preallocated struct iovec arrays for readv/writev.

libblkio reads a request's iovec array until the request completes, so the
array must outlive the request; allocating one per request (ffi.new) is the
slowest thing a Python datapath can do. An IovecArray is allocated once and
filled in place: the backend gives each in-flight blkif request a fixed
slice (e.g. 11 entries, or more for indirect requests) and reuses it.

Entries are (address, length) pairs of local memory, both ints, stored as a
flat uint64 array with the layout of struct iovec { void *iov_base; size_t
iov_len; } on 64-bit Linux (16 bytes per entry).
"""

from __future__ import annotations

from collections.abc import Iterable

from .cdef import ffi

IOVEC_SIZE = 16  # sizeof(struct iovec) on LP64


class IovecArray:
    __slots__ = ("_cells", "capacity", "base")

    def __init__(self, capacity: int) -> None:
        if capacity <= 0:
            raise ValueError("capacity must be positive")
        self._cells = ffi.new("uint64_t[]", 2 * capacity)  # zeroed, owned by this object
        self.capacity = capacity
        self.base = int(ffi.cast("uintptr_t", self._cells))  # address of entry 0

    def set(self, index: int, addr: int, length: int) -> None:
        """Entry `index` := (addr, length). Unchecked beyond cffi's bounds check."""
        cells = self._cells
        cells[2 * index] = addr
        cells[2 * index + 1] = length

    def fill(self, index: int, segments: Iterable[tuple[int, int]]) -> int:
        """Write consecutive entries from `index`; return how many were written."""
        cells = self._cells
        i = 2 * index
        for addr, length in segments:
            cells[i] = addr
            cells[i + 1] = length
            i += 2
        return i // 2 - index

    def get(self, index: int) -> tuple[int, int]:
        return int(self._cells[2 * index]), int(self._cells[2 * index + 1])

    def address(self, index: int) -> int:
        """Address of entry `index`, the iovec pointer libblkio takes."""
        if not 0 <= index < self.capacity:
            raise IndexError(index)
        return self.base + IOVEC_SIZE * index

    def total_length(self, index: int, count: int) -> int:
        cells = self._cells
        return sum(int(cells[2 * i + 1]) for i in range(index, index + count))
