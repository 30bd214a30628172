"""Typed access to libblkio properties (blkio_get_*/blkio_set_*) on a raw handle.

libblkio properties are typed (bool, int, uint64, str); a typed getter on a
property of another type fails with ENOTTY, and an unknown name with ENOENT.
blkio_get_str() converts any type to text and returns malloc'd memory that
we free with libc free().
"""

from __future__ import annotations

from .cdef import ffi, lib
from .errors import check

# Reused out-parameters: properties are read on the control path only, from
# one thread, so one scratch cell per type is enough and saves allocations.
_bool_out = ffi.new("bool *")
_int_out = ffi.new("int *")
_u64_out = ffi.new("uint64_t *")
_str_out = ffi.new("char **")


def get_bool(handle, name: str) -> bool:
    check(lib.blkio_get_bool(handle, name.encode(), _bool_out), f"blkio_get_bool({name})")
    return bool(_bool_out[0])


def get_int(handle, name: str) -> int:
    check(lib.blkio_get_int(handle, name.encode(), _int_out), f"blkio_get_int({name})")
    return int(_int_out[0])


def get_uint64(handle, name: str) -> int:
    check(lib.blkio_get_uint64(handle, name.encode(), _u64_out), f"blkio_get_uint64({name})")
    return int(_u64_out[0])


def get_str(handle, name: str) -> str:
    check(lib.blkio_get_str(handle, name.encode(), _str_out), f"blkio_get_str({name})")
    try:
        return ffi.string(_str_out[0]).decode()
    finally:
        lib.free(_str_out[0])
        _str_out[0] = ffi.NULL


def set_bool(handle, name: str, value: bool) -> None:
    check(lib.blkio_set_bool(handle, name.encode(), bool(value)), f"blkio_set_bool({name}={value})")


def set_int(handle, name: str, value: int) -> None:
    check(lib.blkio_set_int(handle, name.encode(), value), f"blkio_set_int({name}={value})")


def set_uint64(handle, name: str, value: int) -> None:
    check(lib.blkio_set_uint64(handle, name.encode(), value), f"blkio_set_uint64({name}={value})")


def set_str(handle, name: str, value: str) -> None:
    check(lib.blkio_set_str(handle, name.encode(), value.encode()), f"blkio_set_str({name}={value})")


def set_any(handle, name: str, value: str | int | bool) -> None:
    """Set by the Python type of value: bool, int (int or uint64 property) or str.

    Ints go through blkio_set_str(): libblkio parses the text into whichever
    integer type the property has, so callers need not know int vs uint64.
    """
    if isinstance(value, bool):
        set_bool(handle, name, value)
    elif isinstance(value, int):
        set_str(handle, name, str(value))
    elif isinstance(value, str):
        set_str(handle, name, value)
    else:
        raise TypeError(f"property {name!r}: expected str, int or bool, got {type(value).__name__}")
