"""The seam between the xenbus control plane (backend/xenbus/) and the datapath (backend/datapath/).

QEMU's xen-block splits the same way, and its dataplane has four calls:
create, start, stop, destroy. Ours, for one vbd:

    create   open_vbd(disk) -> VbdDataplane          storage opened, features decided (OpenVbd;
                                                     the default is backend/datapath/vbd.py's Vbd.open)
    start    await nursery.start(dp.serve, spec, platform)
                                                     maps the frontend's rings, binds its channels,
                                                     serves; raises VbdConnectError if it cannot
    stop     await dp.disconnect()                   takes nothing more, answers what is in flight,
                                                     releases the connection (serve() returns)
    destroy  dp.close()                              frees the storage

and, for a takeover while the previous process still serves (an upgrade):

    prepare  dp.prepare(spec, platform)              maps the rings' pages, makes the data paths;
                                                     start with the same spec then only binds the
                                                     channels and reads the journals
    unprepare dp.unprepare()                         lets go of what prepare made (no takeover)

and the operator's quiesce, the snapshot hook (tap-ctl pause/unpause):

    pause    await dp.pause()                        takes no new request from any ring, returns once
                                                     every request taken is answered; stays paused
                                                     across reconnects (a new connection starts paused)
    resume   dp.resume()                             takes requests again

plus the size (online resize: current_sectors, sectors, apply_size) and the
counters (stats). What crosses is plain data: the DiskConfig, what the vbd
offers (VbdFeatures, backend/features.py), and what the frontend asked for
(ConnectionSpec, one RingSpec per ring), so a ring can as well be served by
another thread or process that receives its spec.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import trio

from ..blkif.abi import Abi
from ..config import DiskConfig
from ..xen.interfaces import Platform
from .features import VbdFeatures


@dataclass(frozen=True)
class RingSpec:
    index: int  # queue number (0 for a single-queue frontend)
    ring_refs: tuple[int, ...]  # 2**order grant references, in page order
    event_channel: int  # the frontend's port

    @property
    def order(self) -> int:
        return (len(self.ring_refs) - 1).bit_length()


@dataclass(frozen=True)
class ConnectionSpec:
    """What the frontend's nodes say (backend/xenbus/frontend_params.py reads and validates them)."""

    frontend_domid: int
    abi: Abi
    persistent_grants: bool  # the frontend wrote feature-persistent=1 and we offered it
    rings: tuple[RingSpec, ...]


class VbdConnectError(RuntimeError):
    """The frontend's connection cannot be served (bad spec, ring map or bind failed); nothing is left behind."""


class VbdDataplane(Protocol):
    """One vbd's datapath, as the control plane sees it (see the module doc)."""

    @property
    def features(self) -> VbdFeatures:
        """What the vbd offers: decided at create, from the config and the storage."""
        ...

    @property
    def serving(self) -> bool:
        """Between start and the end of stop."""
        ...

    @property
    def sectors(self) -> int:
        """The size requests are validated against (the last applied)."""
        ...

    async def serve(self, spec: ConnectionSpec, platform: Platform, *,
                    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """start: serve the frontend's rings until disconnect() or cancellation."""
        ...

    def prepare(self, spec: ConnectionSpec, platform: Platform) -> None:
        """Before a takeover: map the rings and make the data paths; VbdConnectError if it cannot."""
        ...

    def unprepare(self) -> None:
        """Let go of what prepare() made (close() does too)."""
        ...

    async def disconnect(self) -> None:
        """stop: answer what is in flight and release the connection; returns at once when not serving."""
        ...

    def close(self) -> None:
        """destroy: free the storage (after stop)."""
        ...

    @property
    def paused(self) -> bool:
        """Between pause() and resume()."""
        ...

    async def pause(self) -> None:
        """Quiesce: no new request taken from any ring, return once none is in flight. Cancelling it
        (a deadline) resumes: it never leaves the vbd half paused."""
        ...

    def resume(self) -> None:
        """Take requests again (the requests the frontend queued meanwhile first)."""
        ...

    def current_sectors(self) -> int:
        """The storage's size now, in 512-byte sectors."""
        ...

    def apply_size(self, sectors: int) -> None:
        """Validate requests from now on against this size."""
        ...

    def stats(self) -> dict:
        """{"rings": [per-ring counters], "total": {...}} (backend/datapath/stats.py)."""
        ...

    async def refresh_stats(self) -> None:
        """Bring stats() up to now where its counters live elsewhere (ring worker processes report them
        every second and on this request); returns at once where stats() is always current."""
        ...


OpenVbd = Callable[[DiskConfig], VbdDataplane]
