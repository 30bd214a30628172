"""StorageDevice: one opened, started libblkio device with its queues and limits.

    dev = StorageDevice.open("io_uring", {"path": "/srv/disk.img", "direct": True}, num_queues=2)
    dev = StorageDevice.open("virtio-blk-vhost-user", {"path": "/run/qsd/vm1.sock"}, num_queues=2)

`properties` are libblkio property names and values (str, int or bool).
open() applies each at the moment libblkio accepts it: the queue-shaping
properties (num-entries, queue-size, num-poll-queues) between connect and
start, everything else (path, fd, direct, read-only, driver-specific
connection settings) before connect. num_queues is min(requested,
max-queues) unless strict_queues is set.
"""

from __future__ import annotations

import errno
from collections.abc import Mapping

from .blkio import Blkio
from .errors import BlkioError
from .limits import StorageLimits
from .memory import MemoryRegion
from .queue import DEFAULT_MAX_COMPLETIONS, Queue

# Writable only in the "connected" state (blkio(3)); num-queues is the num_queues argument.
CONNECTED_STATE_PROPERTIES = frozenset({"num-entries", "queue-size", "num-poll-queues"})


class StorageDevice:
    def __init__(self, blkio: Blkio, limits: StorageLimits, queues: list[Queue],
                 open_args: tuple | None = None) -> None:
        self.blkio = blkio
        self.limits = limits
        self.queues = queues
        self._open_args = open_args  # what reopen() repeats

    @classmethod
    def open(cls, driver: str, properties: Mapping[str, str | int | bool], num_queues: int = 1, *,
             strict_queues: bool = False, max_completions: int = DEFAULT_MAX_COMPLETIONS) -> StorageDevice:
        """Create, configure, connect and start; on any failure nothing is left open.

        max_completions: completions reaped per do_io()/wait_io() call, i.e.
        the size of each queue's preallocated completion array.
        """
        if num_queues < 1:
            raise ValueError("num_queues must be >= 1")
        if "num-queues" in properties:
            raise ValueError("pass the queue count as num_queues, not as a property")
        b = Blkio(driver)
        try:
            late = {}
            for name, value in properties.items():
                if name in CONNECTED_STATE_PROPERTIES:
                    late[name] = value
                else:
                    b.set(name, value)
            b.connect()
            max_queues = b.get_int("max-queues")
            if num_queues > max_queues:
                if strict_queues:
                    raise BlkioError(errno.EINVAL, f"{num_queues} queues requested, device offers {max_queues}",
                                     f"open({driver})")
                num_queues = max_queues
            b.set_int("num-queues", num_queues)
            for name, value in late.items():
                b.set(name, value)
            b.start()
            limits = StorageLimits.read(b)
            queues = [b.queue(i, max_completions=max_completions) for i in range(num_queues)]
        except BaseException:
            b.close()
            raise
        return cls(b, limits, queues, (driver, dict(properties), num_queues, strict_queues, max_completions))

    def reopen(self) -> StorageDevice:
        """Close this device and open it again with the same arguments.

        The way to see a new size on drivers that read it only at connect
        (virtio-blk-vhost-user). Queues and memory regions are new objects:
        map your regions again.
        """
        if self._open_args is None:
            raise ValueError("device was not made by StorageDevice.open()")
        driver, properties, num_queues, strict_queues, max_completions = self._open_args
        self.close()
        return type(self).open(driver, properties, num_queues, strict_queues=strict_queues,
                               max_completions=max_completions)

    # ---- size ----

    @property
    def capacity(self) -> int:
        """Current size in bytes, read from libblkio each time.

        io_uring re-reads it from the file or block device on every call, so
        a grown file or `losetup -c` shows up at once (poll it). With
        virtio-blk-vhost-user it is the value read at connect: a resize on
        the server side needs reopen() (and, with qemu-storage-daemon 7.2,
        the export re-created too: its config ignores block_resize).
        """
        return self.blkio.get_uint64("capacity")

    # ---- memory ----

    def alloc_mem_region(self, length: int) -> MemoryRegion:
        """A libblkio-allocated, mapped region; length rounded up to mem-region-alignment."""
        align = self.limits.mem_region_alignment
        return self.blkio.alloc_mem_region(-(-length // align) * align)

    def map_mem_region(self, addr: int, length: int, fd: int = -1, fd_offset: int = 0) -> MemoryRegion:
        return self.blkio.map_mem_region(addr, length, fd, fd_offset)

    def release_mem_region(self, region: MemoryRegion) -> None:
        self.blkio.release_mem_region(region)

    def add_queue(self) -> Queue:
        q = self.blkio.add_queue(
            max_completions=self.queues[0].max_completions if self.queues else DEFAULT_MAX_COMPLETIONS
        )
        self.queues.append(q)
        return q

    def remove_queue(self, queue: Queue) -> None:
        self.blkio.remove_queue(queue)
        self.queues.remove(queue)

    # ---- teardown ----

    @property
    def closed(self) -> bool:
        return self.blkio.closed

    def close(self) -> None:
        """Free everything (queues, regions, the instance). Idempotent."""
        self.blkio.close()

    def __enter__(self) -> StorageDevice:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<StorageDevice {self.limits.driver} queues={len(self.queues)}{' closed' if self.closed else ''}>"
