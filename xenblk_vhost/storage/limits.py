"""What a connected device can do, read once from libblkio properties.

Values as measured with libblkio 1.5.0 (tests/test_storage_limits.py pins
the ones that matter):

                        io_uring file   io_uring file   io_uring loop    vhost-user (qsd 7.2)
                        buffered        direct=true     buffered
  request-alignment     1               512             1                512
  buf-alignment         1               512             1                1
  mem-region-alignment  1               512             1                1
  optimal-io-alignment  4096            4096            512              512
  max-segments          1024            1024            1024             126 (seg_max)
  max-transfer          0 (unspec.)     0               0                0
  needs-mem-regions     false           false           false            true (+ needs fd)
  can-grow              true            true            false            false
  max-discard-len       0               0               0                16 MiB
  max-write-zeroes-len  0 (works)       0 (works)       0 (works)        16 MiB
  max-queues            2**31-1         2**31-1         2**31-1          export's num-queues
  can-add-queues        true            true            true             false

Discard: no property says "supported". libblkio 1.5's io_uring driver
answers every discard with -EOPNOTSUPP (files and block devices alike),
while still reporting discard-alignment; the virtio-blk drivers report
max-discard-len > 0 when the device offers VIRTIO_BLK_F_DISCARD. So
`supports_discard` is false for io_uring and "max-discard-len > 0" for every
other driver. Write zeroes works on both (io_uring: fallocate), so
`supports_write_zeroes` is true unless a driver reports nothing at all.

max-segments: io_uring fails a longer iovec with -EINVAL; libblkio's
vhost-user driver does not check it (qsd 7.2 even served 127 > 126): the
caller must respect it, it is the device's virtio seg_max.

Physical block size: libblkio has none; optimal-io-alignment is the closest
(BLKPBSZGET-like on block devices, st_blksize on files) and is what we
report as physical_block_size.

Logical block size: blkif counts in 512-byte sectors, and buffered io_uring
reports request-alignment 1, so logical_block_size = max(512,
request-alignment).
"""

from __future__ import annotations

from dataclasses import dataclass

from .blkio import Blkio
from .errors import BlkioError

SECTOR_SIZE = 512


def _optional(getter, name: str, default):
    """A property some drivers lack (ENOENT) reads as `default`."""
    try:
        return getter(name)
    except BlkioError:
        return default


@dataclass(frozen=True, slots=True)
class StorageLimits:
    driver: str
    read_only: bool
    request_alignment: int  # every request's start and length are multiples of this
    logical_block_size: int  # max(512, request_alignment)
    physical_block_size: int  # optimal-io-alignment
    optimal_io_size: int  # 0 = unspecified
    buf_alignment: int  # buffer addresses and iovec lengths
    max_transfer: int  # bytes per request, 0 = unspecified
    max_segments: int  # iovcnt per request
    max_segment_len: int  # 0 = unspecified
    needs_mem_regions: bool  # buffers must lie in mapped MemoryRegions
    needs_mem_region_fd: bool  # ... that are fd-backed (memfd)
    mem_region_alignment: int
    max_mem_regions: int
    max_queues: int
    can_add_queues: bool
    can_grow: bool  # io_uring on a file: reads past EOF give zeros, writes extend
    flush_needed: bool
    supports_fua_natively: bool
    supports_discard: bool
    discard_alignment: int
    discard_alignment_offset: int
    max_discard_len: int  # 0 = unspecified
    supports_write_zeroes: bool
    max_write_zeroes_len: int  # 0 = unspecified

    @classmethod
    def read(cls, b: Blkio) -> StorageLimits:
        """Read from a connected (or started) instance."""
        gb, gi, gu = b.get_bool, b.get_int, b.get_uint64
        request_alignment = gi("request-alignment")
        max_discard_len = _optional(gu, "max-discard-len", 0)
        max_write_zeroes_len = _optional(gu, "max-write-zeroes-len", 0)
        return cls(
            driver=b.driver,
            read_only=gb("read-only"),
            request_alignment=request_alignment,
            logical_block_size=max(SECTOR_SIZE, request_alignment),
            physical_block_size=_optional(gi, "optimal-io-alignment", request_alignment),
            optimal_io_size=_optional(gi, "optimal-io-size", 0),
            buf_alignment=gi("buf-alignment"),
            max_transfer=_optional(gi, "max-transfer", 0),
            max_segments=gi("max-segments"),
            max_segment_len=_optional(gi, "max-segment-len", 0),
            needs_mem_regions=gb("needs-mem-regions"),
            needs_mem_region_fd=gb("needs-mem-region-fd"),
            mem_region_alignment=gu("mem-region-alignment"),
            max_mem_regions=gu("max-mem-regions"),
            max_queues=gi("max-queues"),
            can_add_queues=gb("can-add-queues"),
            can_grow=_optional(gb, "can-grow", False),
            flush_needed=_optional(gb, "flush-needed", True),
            supports_fua_natively=_optional(gb, "supports-fua-natively", False),
            supports_discard=b.driver != "io_uring" and max_discard_len > 0,
            discard_alignment=_optional(gi, "discard-alignment", 0),
            discard_alignment_offset=_optional(gi, "discard-alignment-offset", 0),
            max_discard_len=max_discard_len,
            supports_write_zeroes=b.driver == "io_uring" or max_write_zeroes_len > 0,
            max_write_zeroes_len=max_write_zeroes_len,
        )
