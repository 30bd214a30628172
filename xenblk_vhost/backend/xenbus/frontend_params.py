"""The frontend's transport nodes, read and validated into a ConnectionSpec.

This is blkback's connect_ring() + read_per_ring_refs() (Linux
drivers/block/xen-blkback/xenbus.c), with the same keys, defaults, order of
reading and error wording, but stricter about garbage: the frontend is a
guest and every value it wrote is hostile until parsed. A value blkback's
sscanf would half-accept ("12abc", "-1", " 7") is refused here with a clear
message instead of being read as something else.

    offer = Offer(max_queues=4, max_ring_page_order=4, persistent=True)
    spec = await read_connection_spec(xs, "/local/domain/5/device/vbd/51712", 5, offer)
    # or FrontendParamError(errno, message): report it as xenbus_dev_fatal does

Keys (all relative to the frontend dir; per queue under queue-N/ when
multi-queue-num-queues > 1):
    protocol                 absent -> blkback's default ABI (x86_32 on x86)
    feature-persistent       0/1, absent -> 0; honoured only if we offered it
    multi-queue-num-queues   absent -> 1; 0 or more than offered -> error
    ring-page-order          absent -> one page named ring-ref; present ->
                             2**order pages named ring-ref0.. (more than
                             offered -> error)
    ring-ref / ring-refN     grant references (u32)
    event-channel            the frontend's port (1 .. 2**17-1: Xen's FIFO ABI limit)
"""

from __future__ import annotations

import errno
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from ...blkif.abi import UnknownProtocol, abi_for_protocol
from ...xen.interfaces import XenStore
from ...xen.xenstore import read_or_none
from ..contract import ConnectionSpec, RingSpec

# Longest value we even look at: a u32 is 10 digits; "%63s" bounds the protocol.
_MAX_NUMBER_TEXT = 16
_MAX_PROTOCOL_TEXT = 63
# EVTCHN_FIFO_NR_CHANNELS: no port of any Xen event-channel ABI reaches it.
MAX_EVENT_CHANNEL_PORT = (1 << 17) - 1
_U32_MAX = (1 << 32) - 1
_DIGITS = re.compile(rb"[0-9]+")

ReadNode = Callable[[str], Awaitable["bytes | None"]]


class FrontendParamError(Exception):
    """The frontend's nodes do not describe a connection we can make.

    `errno` and `message` are what xenbus_dev_fatal writes ("<errno> <message>").
    """

    def __init__(self, err: int, message: str) -> None:
        super().__init__(message)
        self.errno = err
        self.message = message

    def __str__(self) -> str:
        return self.message


@dataclass(frozen=True)
class Offer:
    """What we advertised before InitWait: the frontend may ask for no more."""

    max_queues: int
    max_ring_page_order: int
    persistent: bool


def show(raw: bytes, limit: int = 32) -> str:
    """A guest's bytes made safe for a log line or the error node: repr, truncated."""
    text = raw[:limit].decode("ascii", "backslashreplace")
    return repr(text) + ("..." if len(raw) > limit else "")


def parse_unsigned(raw: bytes, where: str, *, maximum: int = _U32_MAX) -> int:
    """A decimal unsigned integer, nothing else (a trailing NUL is tolerated)."""
    text = raw.rstrip(b"\0")
    if len(text) > _MAX_NUMBER_TEXT or not _DIGITS.fullmatch(text):
        raise FrontendParamError(errno.EINVAL, f"reading {where}: {show(raw)} is not an unsigned integer")
    value = int(text)
    if value > maximum:
        raise FrontendParamError(errno.EINVAL, f"reading {where}: {value} is out of range (max {maximum})")
    return value


async def _optional_unsigned(read: ReadNode, directory: str, key: str, default: int) -> int:
    raw = await read(f"{directory}/{key}")
    return default if raw is None else parse_unsigned(raw, f"{directory}/{key}")


async def _required_unsigned(read: ReadNode, directory: str, key: str, *, maximum: int = _U32_MAX) -> int:
    raw = await read(f"{directory}/{key}")
    if raw is None:
        raise FrontendParamError(errno.EINVAL, f"reading {directory}/{key}: missing")
    return parse_unsigned(raw, f"{directory}/{key}", maximum=maximum)


def parse_protocol(raw: bytes | None):
    """The ABI the `protocol` key names (absent: blkback's default)."""
    if raw is None:
        return abi_for_protocol(None)
    text = raw.rstrip(b"\0")
    try:
        if len(text) > _MAX_PROTOCOL_TEXT:
            raise UnknownProtocol(text)
        return abi_for_protocol(text.decode("ascii"))
    except (UnknownProtocol, UnicodeDecodeError):
        raise FrontendParamError(errno.ENOSYS, f"unknown fe protocol {show(raw)}") from None


async def _read_ring(read: ReadNode, directory: str, index: int, nr_pages: int, named_pages: bool) -> RingSpec:
    """read_per_ring_refs(): event-channel, then the ring's grant references."""
    port = await _required_unsigned(read, directory, "event-channel", maximum=MAX_EVENT_CHANNEL_PORT)
    if port == 0:
        raise FrontendParamError(errno.EINVAL, f"reading {directory}/event-channel: port 0 is never valid")
    refs = []
    for i in range(nr_pages):
        key = f"ring-ref{i}" if named_pages else "ring-ref"
        raw = await read(f"{directory}/{key}")
        if raw is None and named_pages and nr_pages == 1:
            # Older blkback fell back to the plain name for a one-page ring
            # even when ring-page-order (= 0) was written; so do we.
            key = "ring-ref"
            raw = await read(f"{directory}/{key}")
        if raw is None:
            raise FrontendParamError(errno.EINVAL, f"reading {directory}/{key}: missing")
        refs.append(parse_unsigned(raw, f"{directory}/{key}"))
    return RingSpec(index=index, ring_refs=tuple(refs), event_channel=port)


async def parse_connection(read: ReadNode, fe_path: str, frontend_domid: int, offer: Offer) -> ConnectionSpec:
    """connect_ring() over any node reader (read(path) -> bytes, or None if absent)."""
    abi = parse_protocol(await read(f"{fe_path}/protocol"))
    persistent = offer.persistent and await _optional_unsigned(read, fe_path, "feature-persistent", 0) != 0

    queues = await _optional_unsigned(read, fe_path, "multi-queue-num-queues", 1)
    if queues == 0 or queues > offer.max_queues:
        raise FrontendParamError(
            errno.ENOSYS, f"guest requested {queues} queues, exceeding the maximum of {offer.max_queues}.")

    order_raw = await read(f"{fe_path}/ring-page-order")
    if order_raw is None:
        order, named_pages = 0, False
    else:
        order = parse_unsigned(order_raw, f"{fe_path}/ring-page-order")
        if order > offer.max_ring_page_order:
            raise FrontendParamError(
                errno.EINVAL, f"requested ring page order {order} exceed max:{offer.max_ring_page_order}")
        named_pages = True

    if queues == 1:
        rings = [await _read_ring(read, fe_path, 0, 1 << order, named_pages)]
    else:
        rings = [await _read_ring(read, f"{fe_path}/queue-{i}", i, 1 << order, named_pages) for i in range(queues)]
    return ConnectionSpec(frontend_domid=frontend_domid, abi=abi, persistent_grants=persistent, rings=tuple(rings))


def xenstore_reader(xs: XenStore) -> ReadNode:
    """read(path) -> bytes | None over a xenstore client: absent (ENOENT) is None.

    A node the guest made unreadable to us (EACCES) counts as absent too:
    the frontend dir is the guest's, and hiding a key is just another way
    of not writing it.
    """

    async def read(path: str) -> bytes | None:
        return await read_or_none(xs, path)

    return read


async def read_connection_spec(xs: XenStore, fe_path: str, frontend_domid: int, offer: Offer) -> ConnectionSpec:
    """Read the frontend's nodes (no transaction, as blkback: the frontend
    wrote them all before switching to Initialised) into a ConnectionSpec."""
    return await parse_connection(xenstore_reader(xs), fe_path, frontend_domid, offer)
