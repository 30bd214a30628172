"""What one vbd offers the frontend, derived from its DiskConfig and its storage.

Pure: a DiskConfig and the storage's libblkio limits in, a frozen
VbdFeatures out. The xenbus side writes these facts to xenstore (the keys
are given by `probe_nodes()` before InitWait and `connect_nodes()` at
Connected, in blkback's spelling); the datapath validates requests against
`request_limits()`, so what we advertise and what we enforce can never
disagree.

Decisions, each as Linux blkback makes it unless noted:
  sectors              capacity in 512-byte units, whatever the sector size
  sector-size          the storage's logical block size (>= 512)
  physical-sector-size max(logical, the storage's optimal I/O alignment)
  feature-flush-cache  always: BLKIF_OP_FLUSH_DISKCACHE goes to blkioq_flush
  feature-barrier      always: we implement the drain (barrier.py)
  feature-discard      config `discard`, a writable disk, and storage that
                       can discard (virtio-blk: max-discard-len > 0) or, for
                       io_uring (whose libblkio 1.5 discard is always
                       EOPNOTSUPP), write zeroes, which punches holes or zero
                       ranges through fallocate: reads after it give zeros,
                       stronger than discard needs
  discard-granularity  the storage's discard alignment, at least a logical block
  discard-alignment    the storage's discard-alignment-offset
  discard-secure       never: libblkio has no secure erase
  feature-max-indirect-segments
                       min(config, max-segments, max-transfer / 4 KiB and,
                       on the copy path, half the per-ring bounce memory in
                       pages, so that at least two such requests fit); values
                       up to 11 mean no indirect at all (0), as a frontend
                       would not use them
  feature-persistent   config persistent_grants (both data paths: the map
                       path maps each page once instead of per request; the
                       copy path's ring engine copies to and from the mapped
                       pages itself instead of asking Xen: copy_grants.py)
  data path            config data_path, except that storage whose buffers
                       must lie in registered memory regions (vhost-user,
                       vDPA: needs-mem-regions) always gets copy: grant-mapped
                       pages are not in any region
  multi-queue-max-queues  the queues the storage actually opened
  max-ring-page-order  config ring_page_order
"""

from __future__ import annotations

from dataclasses import dataclass

from ..blkif.constants import (
    MAX_INDIRECT_SEGMENTS_ABI,
    MAX_SEGMENTS_PER_REQUEST,
    SECTOR_SIZE,
    VDISK_READONLY,
    XEN_PAGE_SIZE,
)
from ..blkif.validate import RequestLimits
from ..config import DiskConfig
from ..storage import StorageLimits

# blkback's default cap on persistently mapped grants per ring (blkback.c
# max_persistent_grants); the LRU in persistent_grants.py enforces it.
MAX_PERSISTENT_GRANTS = 1056


@dataclass(frozen=True)
class VbdFeatures:
    sectors: int
    sector_size: int
    physical_sector_size: int
    read_only: bool
    flush: bool
    barrier: bool
    discard: bool
    discard_granularity: int
    discard_alignment: int
    discard_secure: bool
    discard_by_write_zeroes: bool  # how the datapath carries out a discard
    max_indirect_segments: int
    persistent: bool
    max_queues: int
    max_ring_page_order: int
    data_path: str  # "copy" | "map"

    @property
    def info(self) -> int:
        """The `info` key: VDISK_* bits."""
        return VDISK_READONLY if self.read_only else 0

    def request_limits(self, sectors: int | None = None) -> RequestLimits:
        """The blkif validator's facts (optionally with a new size after a resize)."""
        return RequestLimits(
            sectors=self.sectors if sectors is None else sectors,
            logical_block_size=self.sector_size,
            read_only=self.read_only,
            max_indirect_segments=self.max_indirect_segments,
            flush_enabled=self.flush,
            barrier_enabled=self.barrier,
            discard_enabled=self.discard,
        )

    def probe_nodes(self) -> dict[str, str]:
        """Backend keys that must exist before InitWait (blkback's xen_blkbk_probe)."""
        return {
            "feature-max-indirect-segments": str(self.max_indirect_segments),
            "multi-queue-max-queues": str(self.max_queues),
            "max-ring-page-order": str(self.max_ring_page_order),
        }

    def connect_nodes(self, sectors: int | None = None) -> dict[str, str]:
        """Backend keys written in the Connected transaction (blkback's connect())."""
        nodes = {
            "feature-flush-cache": str(int(self.flush)),
            "feature-barrier": str(int(self.barrier)),
            "feature-discard": str(int(self.discard)),
            "feature-persistent": str(int(self.persistent)),
            "sectors": str(self.sectors if sectors is None else sectors),
            "info": str(self.info),
            "sector-size": str(self.sector_size),
            "physical-sector-size": str(self.physical_sector_size),
        }
        if self.discard:
            nodes["discard-granularity"] = str(self.discard_granularity)
            nodes["discard-alignment"] = str(self.discard_alignment)
            nodes["discard-secure"] = str(int(self.discard_secure))
        return nodes


def derive_features(disk: DiskConfig, storage: StorageLimits, *, capacity: int, num_queues: int) -> VbdFeatures:
    """Decide what the vbd offers. `capacity` in bytes, `num_queues` opened."""
    lbs = storage.logical_block_size
    if lbs > XEN_PAGE_SIZE:
        raise ValueError(f"logical block size {lbs} exceeds a page: no blkif segment could be aligned")
    read_only = disk.readonly or storage.read_only
    data_path = "copy" if storage.needs_mem_regions else disk.data_path
    discard = disk.discard and not read_only and (storage.supports_discard or storage.supports_write_zeroes)
    granularity = max(lbs, storage.discard_alignment or 0)
    return VbdFeatures(
        sectors=capacity // SECTOR_SIZE,
        sector_size=lbs,
        physical_sector_size=max(lbs, storage.physical_block_size or 0),
        read_only=read_only,
        flush=True,
        barrier=True,
        discard=discard,
        discard_granularity=granularity if discard else 0,
        discard_alignment=(storage.discard_alignment_offset or 0) if discard else 0,
        discard_secure=False,
        discard_by_write_zeroes=discard and not storage.supports_discard,
        max_indirect_segments=max_indirect_segments(disk, storage, data_path),
        persistent=disk.persistent_grants,
        max_queues=num_queues,
        max_ring_page_order=disk.ring_page_order,
        data_path=data_path,
    )


def max_indirect_segments(disk: DiskConfig, storage: StorageLimits, data_path: str) -> int:
    """The indirect limit we can honour without splitting an indirect request badly."""
    n = min(disk.max_indirect_segments, MAX_INDIRECT_SEGMENTS_ABI)
    if storage.max_segments:
        n = min(n, storage.max_segments)
    if storage.max_transfer:
        n = min(n, storage.max_transfer // XEN_PAGE_SIZE)
    if data_path == "copy":
        n = min(n, disk.memory // 2 // XEN_PAGE_SIZE)
    return n if n > MAX_SEGMENTS_PER_REQUEST else 0
