"""RingPolicy: the plain facts one ring is served by.

The Vbd decides them at connect (from the vbd's features, its config, the
frontend's ConnectionSpec and the storage's limits) and hands them to the
RingWorker with the ring's live objects (mapped ring, bound channel,
storage queue, data path). Frozen and plain data, nothing live, so a ring
could be set up by whoever serves it (another thread or process) from the
RingSpec and this alone.
"""

from __future__ import annotations

from dataclasses import dataclass

from ...blkif.abi import Abi
from ...blkif.constants import MAX_SEGMENTS_PER_REQUEST
from ...blkif.validate import RequestLimits
from .storage_ops import StorageShape

DEFAULT_STORAGE_TIMEOUT = 30.0


@dataclass(frozen=True)
class RingPolicy:
    name: str  # for log lines: "<disk>/ring<index>"
    frontend_domid: int
    abi: Abi
    limits: RequestLimits  # what requests are validated against from the start (a resize replaces them)
    slots: int  # request slots: the most requests in flight on this ring
    shape: StorageShape  # the storage's request limits, that requests are split by
    discard_by_write_zeroes: bool  # carry out a discard as write zeroes (io_uring)
    # No completion at all for this long while requests are outstanding: the storage is gone.
    storage_timeout: float = DEFAULT_STORAGE_TIMEOUT

    @property
    def max_request_segments(self) -> int:
        """The most segments one request can carry (indirect ones included)."""
        return max(MAX_SEGMENTS_PER_REQUEST, self.limits.max_indirect_segments)
