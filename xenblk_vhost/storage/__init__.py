"""The storage adapter: a thin, batch-oriented binding over libblkio (libblkio.so.1, 1.5.0).

Layers, each its own module:
- cdef:       the C declarations (from blkio.h) and the loaded library
- errors:     BlkioError(errno, message, operation)
- properties: typed get/set of libblkio properties
- memory:     MemoryRegion (libblkio-allocated or the caller's memfd mapping), address_of()
- iovec:      IovecArray, preallocated struct iovec arrays for readv/writev
- queue:      Queue, the datapath: queue requests, do_io(), await wait_io()
- blkio:      Blkio, one libblkio instance and its lifecycle
- limits:     StorageLimits, what a connected device can do
- device:     StorageDevice.open(driver, properties, num_queues), the usual entry point

Drivers: io_uring (files, block devices) and virtio-blk-vhost-user
(qemu-storage-daemon) are tested here. nvme-io_uring and
virtio-blk-vhost-vdpa are accepted -- the binding is driver-agnostic and
passes properties through -- but untested: this machine has neither an NVMe
character device nor a vDPA device.
"""

from .blkio import Blkio
from .cdef import REQ_FUA, REQ_NO_FALLBACK, REQ_NO_UNMAP
from .device import StorageDevice
from .errors import BlkioError
from .iovec import IovecArray
from .limits import StorageLimits
from .memory import MemoryRegion, address_of
from .queue import Queue

__all__ = [
    "Blkio",
    "BlkioError",
    "StorageLimits",
    "IovecArray",
    "MemoryRegion",
    "Queue",
    "REQ_FUA",
    "REQ_NO_FALLBACK",
    "REQ_NO_UNMAP",
    "StorageDevice",
    "address_of",
]
