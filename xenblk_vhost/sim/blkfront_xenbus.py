"""The frontend's half of the vbd xenbus handshake: what it reads and writes.

Each function is one step of Linux xen-blkfront (drivers/block/xen-blkfront.c,
6.x) or its xenbus helpers, with the same keys, defaults, order of writes
and transactions. The state machine that strings them together is in
blkfront.py. No grants or rings here: the caller hands in ring refs and
ports.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass

from ..blkif.constants import (
    MAX_SEGMENTS_PER_REQUEST,
    OP_FLUSH_DISKCACHE,
    OP_WRITE_BARRIER,
)
from ..xen.interfaces import XenStore, XenStoreOps, XenStoreTransaction
from ..xen.xenbus import XenbusState
from ..xen.xenstore import read_or_none
from .blkfront_config import BlkfrontOptions, DiskInfo, Negotiated
from .toolstack import in_transaction


class HandshakeError(RuntimeError):
    """The backend published something blkfront would call fatal."""


async def read_str(xs: XenStoreOps, path: str) -> str | None:
    """A node's value, None if it is not there for us: missing, or (for a
    guest) gone along with parents it may not read, which xenstored answers
    EACCES; xenbus treats any read error alike."""
    raw = await read_or_none(xs, path)
    return None if raw is None else raw.decode()


async def read_unsigned(xs: XenStore, directory: str, node: str, default: int) -> int:
    """xenbus_read_unsigned: "%u" or the default if absent or unparsable."""
    text = await read_str(xs, f"{directory}/{node}")
    if text is None:
        return default
    try:
        value = int(text.strip(), 10)
    except ValueError:
        return default
    return value if 0 <= value < 1 << 32 else default


def parse_state(text: str | None) -> int:
    if text is None:
        return XenbusState.UNKNOWN
    try:
        return int(text.strip())
    except ValueError:
        return XenbusState.UNKNOWN


@dataclass(frozen=True)
class FrontendDetails:
    """What blkfront_probe and xenbus read from the frontend's own dir."""

    backend: str
    backend_id: int
    virtual_device: int
    handle: int  # the devid: "Front end dir is a number, which is used as the id"
    trusted: bool


async def read_frontend_details(xs: XenStore, fe_path: str) -> FrontendDetails:
    backend = await read_str(xs, f"{fe_path}/backend")
    backend_id = await read_str(xs, f"{fe_path}/backend-id")
    vdev = await read_str(xs, f"{fe_path}/virtual-device")
    if backend is None or backend_id is None:
        raise HandshakeError(f"{fe_path}: no backend / backend-id")
    if vdev is None:
        raise HandshakeError(f"{fe_path}: reading virtual-device")
    return FrontendDetails(
        backend=backend,
        backend_id=int(backend_id),
        virtual_device=int(vdev, 0),
        handle=int(fe_path.rsplit("/", 1)[1], 0),
        trusted=await read_unsigned(xs, fe_path, "trusted", 1) != 0,
    )


async def switch_state(xs: XenStore, fe_path: str, state: int) -> bool:
    """__xenbus_switch_state: in a transaction, only if `state` still exists
    (the toolstack may have removed the device). False if it did not."""

    async def body(t: XenStoreTransaction) -> bool:
        if await read_str(t, f"{fe_path}/state") is None:
            return False
        await t.write(f"{fe_path}/state", str(state))
        return True

    return await in_transaction(xs, body)


@dataclass(frozen=True)
class RingChoice:
    ring_page_order: int
    nr_rings: int


async def choose_rings(xs: XenStore, be_path: str, options: BlkfrontOptions) -> RingChoice:
    """talk_to_blkback + negotiate_mq: ring order = min(ours, backend's
    max-ring-page-order, default 0); queues = min(backend's
    multi-queue-max-queues (default 1), ours), at least 1."""
    be_order = await read_unsigned(xs, be_path, "max-ring-page-order", 0)
    be_queues = await read_unsigned(xs, be_path, "multi-queue-max-queues", 1)
    return RingChoice(min(options.max_ring_page_order, be_order), max(1, min(be_queues, options.max_queues)))


@dataclass(frozen=True)
class RingNodes:
    refs: Sequence[int]  # grant refs of the ring pages, in order
    event_channel: int


async def write_transport(xs: XenStore, fe_path: str, order: int, rings: Sequence[RingNodes],
                          protocol: str | None, persistent: bool) -> None:
    """talk_to_blkback's transaction, in its order: ring-page-order (only for
    a multi-page ring), then per ring ring-ref (one page) or ring-ref<i>,
    and event-channel, at the top level for one ring or under queue-<n>/
    with multi-queue-num-queues for several; then protocol; then
    feature-persistent. `protocol` None writes no protocol key at all
    (Linux always writes XEN_IO_PROTO_ABI_NATIVE)."""

    async def per_ring(t: XenStoreOps, directory: str, ring: RingNodes) -> None:
        if len(ring.refs) == 1:
            await t.write(f"{directory}/ring-ref", str(ring.refs[0]))
        else:
            for i, ref in enumerate(ring.refs):
                await t.write(f"{directory}/ring-ref{i}", str(ref))
        await t.write(f"{directory}/event-channel", str(ring.event_channel))

    async def body(t: XenStoreTransaction) -> None:
        if 1 << order > 1:
            await t.write(f"{fe_path}/ring-page-order", str(order))
        if len(rings) == 1:
            await per_ring(t, fe_path, rings[0])
        else:
            await t.write(f"{fe_path}/multi-queue-num-queues", str(len(rings)))
            for i, ring in enumerate(rings):
                await per_ring(t, f"{fe_path}/queue-{i}", ring)
        if protocol is not None:
            await t.write(f"{fe_path}/protocol", protocol)
        await t.write(f"{fe_path}/feature-persistent", "1" if persistent else "0")

    await in_transaction(xs, body)


# Every key talk_to_blkback may write, so a reconnect starts clean.
def transport_keys(fe_path: str, nr_rings: int, nr_pages: int) -> list[str]:
    keys = [f"{fe_path}/{k}" for k in ("ring-page-order", "multi-queue-num-queues", "protocol",
                                        "feature-persistent", "ring-ref", "event-channel")]
    keys += [f"{fe_path}/ring-ref{i}" for i in range(nr_pages)]
    keys += [f"{fe_path}/queue-{i}" for i in range(nr_rings)]
    return keys


async def read_disk_info(xs: XenStore, be_path: str) -> DiskInfo:
    """blkfront_connect's xenbus_gather of sectors, info, sector-size (all
    required: missing one is fatal) and physical-sector-size (defaults to
    sector-size for old backends)."""
    values = {}
    for key in ("sectors", "info", "sector-size"):
        text = await read_str(xs, f"{be_path}/{key}")
        if text is None:
            raise HandshakeError(f"reading backend fields at {be_path}: no {key}")
        try:
            values[key] = int(text.strip(), 10)
        except ValueError:
            raise HandshakeError(f"reading backend fields at {be_path}: bad {key} {text!r}") from None
    sector_size = values["sector-size"]
    return DiskInfo(
        sectors=values["sectors"],
        info=values["info"],
        sector_size=sector_size,
        physical_sector_size=await read_unsigned(xs, be_path, "physical-sector-size", sector_size),
    )


async def read_sectors(xs: XenStore, be_path: str) -> int | None:
    """The resize path of blkfront_connect: re-read `sectors` (None if gone)."""
    text = await read_str(xs, f"{be_path}/sectors")
    try:
        return None if text is None else int(text.strip(), 10)
    except ValueError:
        return None


async def gather_features(xs: XenStore, be_path: str, options: BlkfrontOptions, ring: RingChoice,
                          trusted: bool) -> Negotiated:
    """blkfront_gather_backend_features: barrier -> flush+FUA (we issue
    WRITE_BARRIER), flush-cache overrides it (FLUSH_DISKCACHE); discard
    with granularity/alignment/secure; persistent only if both sides want
    it; indirect segments clamped to our maximum, and unused (0) unless
    above the 11 a plain request carries."""
    flush_op = None
    if await read_unsigned(xs, be_path, "feature-barrier", 0):
        flush_op = OP_WRITE_BARRIER
    if await read_unsigned(xs, be_path, "feature-flush-cache", 0):
        flush_op = OP_FLUSH_DISKCACHE
    discard = bool(await read_unsigned(xs, be_path, "feature-discard", 0))
    granularity = alignment = 0
    secure = False
    if discard:
        granularity = await read_unsigned(xs, be_path, "discard-granularity", 0)
        alignment = await read_unsigned(xs, be_path, "discard-alignment", 0)
        secure = bool(await read_unsigned(xs, be_path, "discard-secure", 0))
    persistent = options.feature_persistent and bool(
        await read_unsigned(xs, be_path, "feature-persistent", 0))
    indirect = await read_unsigned(xs, be_path, "feature-max-indirect-segments", 0)
    indirect = min(indirect, max(options.max_indirect_segments, MAX_SEGMENTS_PER_REQUEST))
    if indirect <= MAX_SEGMENTS_PER_REQUEST:
        indirect = 0
    return Negotiated(
        ring_page_order=ring.ring_page_order,
        nr_rings=ring.nr_rings,
        protocol=options.protocol,
        persistent=persistent,
        max_indirect_segments=indirect,
        flush_op=flush_op,
        feature_discard=discard,
        discard_granularity=granularity,
        discard_alignment=alignment,
        discard_secure=secure,
        trusted=trusted,
    )


class BackendStates:
    """Every state the backend's `state` node holds when its watch fires,
    the registration's own fire first (xenbus's otherend watch). Each
    rewrite fires, even of the same value: that is how a resize is told.
    A removed node reads as XenbusState.UNKNOWN."""

    def __init__(self, xs: XenStore, state_path: str, events: AsyncIterator[str]) -> None:
        self._xs = xs
        self._path = state_path
        self._events = events

    def __aiter__(self) -> BackendStates:
        return self

    async def __anext__(self) -> int:
        await self._events.__anext__()
        # xenbus_read_driver_state: unreadable (removed) is Unknown.
        return parse_state(await read_str(self._xs, self._path))


@asynccontextmanager
async def watch_backend_state(xs: XenStore, be_path: str) -> AsyncIterator[BackendStates]:
    path = f"{be_path}/state"
    async with xs.watch(path) as events:
        yield BackendStates(xs, path, events)
