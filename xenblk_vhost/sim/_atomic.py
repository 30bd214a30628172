"""Atomic read-modify-write on shared memory, through GCC's libatomic.

A grant entry's flags are written by two parties at once: the guest revokes
a grant with a compare-and-swap that must fail if Xen has just set
GTF_reading, and Xen sets and clears GTF_reading/GTF_writing with
compare-and-swap and atomic and. In the simulation those two parties are
different processes, so the operations must be real CPU atomics on the
shared page; Python has none, libatomic (a gcc runtime library, present
wherever gcc is) exports them as plain functions. The 2-, 4- and 8-byte
ones are lock-free on x86, so they are atomic across processes.

Each call costs about a microsecond through ctypes, so they are used where
Xen pins and unpins (maps), not on the grant-copy fast path.
"""

from __future__ import annotations

import ctypes
import ctypes.util

_SEQ_CST = 5

_lib = ctypes.CDLL(ctypes.util.find_library("atomic") or "libatomic.so.1")

_cas4 = _lib.__atomic_compare_exchange_4
_cas4.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int, ctypes.c_int]
_cas4.restype = ctypes.c_bool

_and2 = _lib.__atomic_fetch_and_2
_and2.argtypes = [ctypes.c_void_p, ctypes.c_uint16, ctypes.c_int]
_and2.restype = ctypes.c_uint16

_add4 = _lib.__atomic_fetch_add_4
_add4.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int]
_add4.restype = ctypes.c_uint32

_sub4 = _lib.__atomic_fetch_sub_4
_sub4.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int]
_sub4.restype = ctypes.c_uint32

_expected = ctypes.c_uint32()
_expected_addr = ctypes.addressof(_expected)


def cas32(addr: int, expected: int, desired: int) -> tuple[bool, int]:
    """Compare-and-swap the u32 at addr; return (swapped, value seen)."""
    _expected.value = expected
    ok = _cas4(addr, _expected_addr, desired, _SEQ_CST, _SEQ_CST)
    return ok, _expected.value


def fetch_and16(addr: int, mask: int) -> int:
    return _and2(addr, mask, _SEQ_CST)


def fetch_add32(addr: int, value: int) -> int:
    return _add4(addr, value, _SEQ_CST)


def fetch_sub32(addr: int, value: int) -> int:
    return _sub4(addr, value, _SEQ_CST)
