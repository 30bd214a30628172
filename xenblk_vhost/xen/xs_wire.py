"""The xenstore wire protocol (xen/io/xs_wire.h), sans-I/O.

Shared by our client (`xenblk_vhost.xen.xenstore`) and the simulated
xenstored (`xenblk_vhost.sim.xenstored`). A message is a 16-byte header
{type, req_id, tx_id, len} (native-endian u32s; we only run on little-endian
x86, so "<") then `len` payload bytes; strings in payloads are NUL-terminated,
lists are NUL-separated. Constants here are checked against Debian's
/usr/include/xen/io/xs_wire.h by tests/test_xenstore_wire.py.
"""

from __future__ import annotations

import enum
import errno
import struct
from dataclasses import dataclass

HEADER = struct.Struct("<IIII")
PAYLOAD_MAX = 4096  # XENSTORE_PAYLOAD_MAX: both directions; xenstored drops a client that exceeds it
ABS_PATH_MAX = 3072  # XENSTORE_ABS_PATH_MAX
REL_PATH_MAX = 2048  # XENSTORE_REL_PATH_MAX


class Op(enum.IntEnum):
    """enum xsd_sockmsg_type (XS_*). 20 was XS_RESTRICT, removed upstream."""

    CONTROL = 0
    DIRECTORY = 1
    READ = 2
    GET_PERMS = 3
    WATCH = 4
    UNWATCH = 5
    TRANSACTION_START = 6
    TRANSACTION_END = 7
    INTRODUCE = 8
    RELEASE = 9
    GET_DOMAIN_PATH = 10
    WRITE = 11
    MKDIR = 12
    RM = 13
    SET_PERMS = 14
    WATCH_EVENT = 15
    ERROR = 16
    IS_DOMAIN_INTRODUCED = 17
    RESUME = 18
    SET_TARGET = 19
    RESET_WATCHES = 21
    DIRECTORY_PART = 22
    INVALID = 0xFFFF  # "guaranteed to remain an invalid type"


# XS_TYPE_COUNT in the Xen 4.17 header (Debian 12): types >= this are unknown to that xenstored.
TYPE_COUNT = 23

# Field indices of a WATCH_EVENT payload (enum xs_watch_type).
WATCH_PATH = 0
WATCH_TOKEN = 1

# The error names xenstored sends (xsd_errors[] in xs_wire.h, in that order) and the errno each means.
ERROR_NAMES: dict[str, int] = {
    name: getattr(errno, name)
    for name in (
        "EINVAL", "EACCES", "EEXIST", "EISDIR", "ENOENT", "ENOMEM", "ENOSPC", "EIO",
        "ENOTEMPTY", "ENOSYS", "EROFS", "EBUSY", "EAGAIN", "EISCONN", "E2BIG", "EPERM",
    )
}
ERRNO_NAMES: dict[int, str] = {v: k for k, v in ERROR_NAMES.items()}


class WireError(ValueError):
    """A message that violates the wire format (oversized, truncated)."""


@dataclass(frozen=True, slots=True)
class Message:
    type: int
    req_id: int
    tx_id: int
    payload: bytes

    def encode(self) -> bytes:
        if len(self.payload) > PAYLOAD_MAX:
            raise WireError(f"payload of {len(self.payload)} bytes exceeds {PAYLOAD_MAX}")
        return HEADER.pack(self.type, self.req_id, self.tx_id, len(self.payload)) + self.payload


class Reader:
    """Incremental decoder: feed() bytes as they arrive, then iterate messages().

    A header announcing more than PAYLOAD_MAX bytes raises WireError: the
    stream cannot be resynchronised after that, so the caller drops it (as
    xenstored and libxenstore both do).
    """

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes | bytearray) -> None:
        self._buf += data

    def messages(self) -> list[Message]:
        out = []
        while len(self._buf) >= HEADER.size:
            mtype, req_id, tx_id, length = HEADER.unpack_from(self._buf)
            if length > PAYLOAD_MAX:
                raise WireError(f"message length {length} exceeds {PAYLOAD_MAX}")
            end = HEADER.size + length
            if len(self._buf) < end:
                break
            out.append(Message(mtype, req_id, tx_id, bytes(self._buf[HEADER.size:end])))
            del self._buf[:end]
        return out


def encode_str(text: str | bytes) -> bytes:
    """Paths and tokens as bytes; surrogateescape round-trips whatever split_strings() decoded."""
    return text if isinstance(text, bytes) else text.encode("utf-8", "surrogateescape")


def join_args(*args: str | bytes) -> bytes:
    """Encode request arguments: each NUL-terminated, as libxenstore does."""
    return b"".join(encode_str(a) + b"\0" for a in args)


def split_strings(payload: bytes) -> list[str]:
    """Decode a NUL-separated list (directory, perms, watch event).

    Never raises on odd bytes: they come from another party and are decoded
    with surrogateescape, so encode_str() gives the same bytes back.
    """
    if not payload:
        return []
    if payload.endswith(b"\0"):
        payload = payload[:-1]
    return [p.decode("utf-8", "surrogateescape") for p in payload.split(b"\0")]
