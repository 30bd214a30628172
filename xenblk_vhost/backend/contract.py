"""What the xenbus side hands the datapath when a frontend connects.

The device task (backend/device.py) reads the frontend's nodes and builds a
ConnectionSpec; the datapath (backend/vbd.py, backend/ring_worker.py) maps
the rings, binds the channels and serves. Plain data, so a ring can also be
served from another process (more than one core) by shipping its spec.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..blkif.abi import Abi


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
    frontend_domid: int
    abi: Abi
    persistent_grants: bool  # the frontend wrote feature-persistent=1 and we offered it
    rings: tuple[RingSpec, ...]
