"""blkif responses: {u64 id, u8 operation, s16 status}.

The x86_64 response is 16 bytes (1 pad byte after operation, 4 at the end);
the x86_32 one is 12 (1 pad byte). Encoding writes the whole struct through
a Struct whose pad bytes pack as zeros, so no stale byte of ours or of the
slot's previous contents (a request) leaks into the padding.

Public API:
    Response(id, op, status)                         NamedTuple
    encode_response(abi, buf, offset, id, op, status) write into a slot
    decode_response(abi, buf, offset=0) -> Response  read (front side)
BackRing.put_response() is the datapath's way to write one; these are for
the frontend, tools and tests.
"""

from __future__ import annotations

from typing import NamedTuple

from .abi import Abi, layout


class Response(NamedTuple):
    id: int
    op: int
    status: int


def encode_response(abi: Abi, buf, offset: int, id_: int, op: int, status: int) -> None:
    layout(abi).response_struct.pack_into(buf, offset, id_, op, status)


def decode_response(abi: Abi, buf, offset: int = 0) -> Response:
    return Response._make(layout(abi).response_struct.unpack_from(buf, offset))
