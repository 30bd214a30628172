"""What the reference frontend is told (options) and what it learns (negotiated).

The options mirror Linux xen-blkfront's module parameters (defaults from
drivers/block/xen-blkfront.c: max_indirect_segments=32, max_queues=4,
max_ring_page_order=0, feature_persistent=true) plus the knobs a test needs
that Linux does not have: which `protocol` to write (or none), skipping
InitWait, and where the ring indices start.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from ..blkif.constants import (
    MAX_RING_PAGE_ORDER,
    MAX_SEGMENTS_PER_REQUEST,
    OP_FLUSH_DISKCACHE,
    OP_WRITE_BARRIER,
    PROTOCOL_X86_32,
    PROTOCOL_X86_64,
)

# Protocol choices: write "x86_64-abi", write "x86_32-abi", or write no
# `protocol` key at all (the backend then assumes its default, x86_32 on x86).
PROTOCOLS = (PROTOCOL_X86_64, PROTOCOL_X86_32, None)


@dataclass(frozen=True)
class BlkfrontOptions:
    max_indirect_segments: int = 32
    max_queues: int = 4
    max_ring_page_order: int = 0
    feature_persistent: bool = True
    protocol: str | None = PROTOCOL_X86_64
    # Test-only: go Initialised without waiting for InitWait (blkif.h allows
    # it; the backend's features then take their defaults).
    skip_init_wait: bool = False
    # Test-only: start the ring indices here instead of 0 (blkfront always
    # starts at 0), e.g. 2**32 - 5 to make them wrap early.
    initial_index: int = 0
    # Seconds to wait for each backend state transition.
    state_timeout: float = 10.0

    def __post_init__(self) -> None:
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"protocol must be one of {PROTOCOLS}, not {self.protocol!r}")
        if not 0 <= self.max_ring_page_order <= MAX_RING_PAGE_ORDER:
            raise ValueError(f"max_ring_page_order must be 0..{MAX_RING_PAGE_ORDER}")
        if self.max_queues < 1:
            raise ValueError("max_queues must be at least 1")
        if not 0 <= self.initial_index < 1 << 32:
            raise ValueError("initial_index must be a 32-bit unsigned value")

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class DiskInfo:
    """What the backend published at Connected (blkfront_connect's reads)."""

    sectors: int
    info: int
    sector_size: int
    physical_sector_size: int


@dataclass(frozen=True)
class Negotiated:
    """The outcome of the handshake, as blkfront computes it.

    ring_page_order = min(max_ring_page_order, backend max-ring-page-order);
    nr_rings = min(max_queues, backend multi-queue-max-queues) or 1;
    flush_op: WRITE_BARRIER if feature-barrier (flush+FUA), overridden by
    FLUSH_DISKCACHE if feature-flush-cache, None if neither;
    persistent = our feature_persistent and the backend's;
    max_indirect_segments = min(ours, backend's), 0 if that is <= 11.
    """

    ring_page_order: int
    nr_rings: int
    protocol: str | None
    persistent: bool
    max_indirect_segments: int
    flush_op: int | None
    feature_discard: bool
    discard_granularity: int
    discard_alignment: int
    discard_secure: bool
    trusted: bool

    @property
    def segments_per_request(self) -> int:
        return self.max_indirect_segments or MAX_SEGMENTS_PER_REQUEST

    @property
    def feature_flush(self) -> bool:
        return self.flush_op is not None

    @property
    def feature_barrier(self) -> bool:
        return self.flush_op == OP_WRITE_BARRIER

    @property
    def feature_flush_cache(self) -> bool:
        return self.flush_op == OP_FLUSH_DISKCACHE

    def as_dict(self) -> dict:
        return asdict(self)
