"""Atomic read-modify-write on shared memory, through GCC's libatomic.

A grant entry's flags are written by two parties at once: the guest revokes
a grant with a compare-and-swap that must fail if Xen has just set
GTF_reading, and Xen sets and clears GTF_reading/GTF_writing with
compare-and-swap and atomic and. In the simulation those two parties are
different processes, so the operations must be real CPU atomics on the
shared page; Python has none, libatomic (a gcc runtime library, present
wherever gcc is) exports them as plain functions. The 2- and 4-byte ones
are lock-free on x86, so they are atomic across processes.

Called through cffi's ABI mode (about half the per-call cost of ctypes),
on a base pointer made once per shared table. Still about a microsecond a
call, so they are used where Xen pins and unpins (maps), not on the
grant-copy fast path.
"""

from __future__ import annotations

import cffi

_SEQ_CST = 5

_ffi = cffi.FFI()
_ffi.cdef(
    """
    _Bool __atomic_compare_exchange_4(void *ptr, void *expected, uint32_t desired, int success, int failure);
    uint16_t __atomic_fetch_and_2(void *ptr, uint16_t value, int model);
    uint32_t __atomic_fetch_add_4(void *ptr, uint32_t value, int model);
    uint32_t __atomic_fetch_sub_4(void *ptr, uint32_t value, int model);
    """
)
_lib = _ffi.dlopen("libatomic.so.1")
_cas4 = _lib.__atomic_compare_exchange_4
_and2 = _lib.__atomic_fetch_and_2
_add4 = _lib.__atomic_fetch_add_4
_sub4 = _lib.__atomic_fetch_sub_4


class AtomicMemory:
    """Atomic operations at byte offsets from a base address (of shared memory that outlives us)."""

    __slots__ = ("_base", "_expected")

    def __init__(self, addr: int):
        self._base = _ffi.cast("char *", addr)
        self._expected = _ffi.new("uint32_t *")

    def cas32(self, offset: int, expected: int, desired: int) -> tuple[bool, int]:
        """Compare-and-swap the u32 at offset; return (swapped, value seen)."""
        self._expected[0] = expected
        ok = _cas4(self._base + offset, self._expected, desired, _SEQ_CST, _SEQ_CST)
        return bool(ok), self._expected[0]

    def fetch_and16(self, offset: int, mask: int) -> int:
        return _and2(self._base + offset, mask, _SEQ_CST)

    def fetch_add32(self, offset: int, value: int) -> int:
        return _add4(self._base + offset, value, _SEQ_CST)

    def fetch_sub32(self, offset: int, value: int) -> int:
        return _sub4(self._base + offset, value, _SEQ_CST)
