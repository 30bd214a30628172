"""The one exception type of the storage adapter, carrying libblkio's own words."""

from __future__ import annotations

import errno as errno_names
import os

from .cdef import ffi, lib


class BlkioError(OSError):
    """A libblkio call failed.

    .errno     positive errno (libblkio returns -errno)
    .message   libblkio's per-thread error message (blkio_get_error_msg()),
               or ours when the failure is detected on the Python side
    .operation what we were doing, e.g. "blkio_connect(io_uring)"
    """

    def __init__(self, errno: int, message: str, operation: str) -> None:
        super().__init__(errno, message)
        self.message = message
        self.operation = operation

    def __str__(self) -> str:
        code = self.errno or 0  # always set: __init__ takes it
        name = errno_names.errorcode.get(code, str(code))
        return f"{self.operation}: {self.message or os.strerror(code)} [{name}]"

    def __reduce__(self):  # keep pickling (e.g. across trio/pytest reporting) faithful
        return (type(self), (self.errno, self.message, self.operation))


def last_error_message() -> str:
    """libblkio's message for the last failed call on this thread ("" if none)."""
    msg = lib.blkio_get_error_msg()
    return ffi.string(msg).decode(errors="replace") if msg != ffi.NULL else ""


def check(ret: int, operation: str) -> int:
    """Return ret if it is >= 0, else raise BlkioError with libblkio's message.

    Call right after the failing libblkio call: the message is per-thread and
    the next failing call overwrites it.
    """
    if ret < 0:
        raise BlkioError(-ret, last_error_message(), operation)
    return ret
