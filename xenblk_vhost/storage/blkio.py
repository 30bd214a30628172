"""Blkio: one libblkio instance (struct blkio *), its lifecycle and what it owns.

A thin object over the C API: create -> set properties -> connect -> set
queue properties -> start -> queues and memory regions -> close. It owns its
Queue and MemoryRegion objects so that close() can retire them before
blkio_destroy() frees the memory behind them: afterwards they raise instead
of touching freed memory.

State rules (blkio(3)): path/fd/direct/read-only are writable only while
"created"; num-queues, num-poll-queues, num-entries (io_uring) and
queue-size (virtio-blk) only while "connected"; memory regions and queues
exist only once "started".
"""

from __future__ import annotations

import errno
from collections.abc import Iterable

from . import properties
from .cdef import ffi, lib
from .errors import BlkioError, check, last_error_message
from .memory import MemoryRegion
from .queue import DEFAULT_MAX_COMPLETIONS, Queue

CREATED, CONNECTED, STARTED, CLOSED = "created", "connected", "started", "closed"


class Blkio:
    def __init__(self, driver: str) -> None:
        out = ffi.new("struct blkio **")
        check(lib.blkio_create(driver.encode(), out), f"blkio_create({driver})")
        self._handle = out[0]
        self.driver = driver
        self.state = CREATED
        self._queues: dict[tuple[bool, int], Queue] = {}
        self._regions: list[MemoryRegion] = []

    # ---- properties ----

    def _live(self):
        if self._handle is None:
            raise BlkioError(errno.EBADF, "blkio instance is closed", self.driver)
        return self._handle

    def get_bool(self, name: str) -> bool:
        return properties.get_bool(self._live(), name)

    def get_int(self, name: str) -> int:
        return properties.get_int(self._live(), name)

    def get_uint64(self, name: str) -> int:
        return properties.get_uint64(self._live(), name)

    def get_str(self, name: str) -> str:
        return properties.get_str(self._live(), name)

    def set_bool(self, name: str, value: bool) -> None:
        properties.set_bool(self._live(), name, value)

    def set_int(self, name: str, value: int) -> None:
        properties.set_int(self._live(), name, value)

    def set_uint64(self, name: str, value: int) -> None:
        properties.set_uint64(self._live(), name, value)

    def set_str(self, name: str, value: str) -> None:
        properties.set_str(self._live(), name, value)

    def set(self, name: str, value: str | int | bool) -> None:
        """Set by Python type (see properties.set_any)."""
        properties.set_any(self._live(), name, value)

    # ---- lifecycle ----

    def connect(self) -> None:
        check(lib.blkio_connect(self._live()), f"blkio_connect({self.driver})")
        self.state = CONNECTED

    def start(self) -> None:
        check(lib.blkio_start(self._live()), f"blkio_start({self.driver})")
        self.state = STARTED

    # ---- queues ----

    def queue(self, index: int, *, max_completions: int = DEFAULT_MAX_COMPLETIONS) -> Queue:
        """The started queue `index` (same object on every call)."""
        return self._get_queue(False, index, max_completions)

    def poll_queue(self, index: int, *, max_completions: int = DEFAULT_MAX_COMPLETIONS) -> Queue:
        """A poll queue (num-poll-queues > 0): no completion fd, reap with do_io()."""
        return self._get_queue(True, index, max_completions)

    def _get_queue(self, poll: bool, index: int, max_completions: int) -> Queue:
        q = self._queues.get((poll, index))
        if q is None:
            q = Queue(self._live(), index, poll=poll, max_completions=max_completions)
            self._queues[(poll, index)] = q
        return q

    def add_queue(self, *, max_completions: int = DEFAULT_MAX_COMPLETIONS) -> Queue:
        """Add a queue to a started instance (only if can-add-queues is true)."""
        index = check(lib.blkio_add_queue(self._live()), f"blkio_add_queue({self.driver})")
        return self.queue(index, max_completions=max_completions)

    def remove_queue(self, queue: Queue) -> None:
        """Remove a queue; its requests in flight are abandoned by libblkio."""
        key = (queue.poll, queue.index)
        if self._queues.get(key) is not queue:
            raise ValueError(f"{queue!r} does not belong to this instance")
        remove = lib.blkio_remove_poll_queue if queue.poll else lib.blkio_remove_queue
        queue._close()
        del self._queues[key]
        check(remove(self._live(), queue.index), f"blkio_remove_queue({queue.index})")

    @property
    def queues(self) -> list[Queue]:
        return list(self._queues.values())

    # ---- memory regions ----

    def alloc_mem_region(self, length: int) -> MemoryRegion:
        """Allocate (memfd-backed, driver-aligned) and map a region; freed on release/close.

        length must be a multiple of the mem-region-alignment property.
        """
        handle = self._live()
        region = ffi.new("struct blkio_mem_region *")
        check(lib.blkio_alloc_mem_region(handle, region, length), f"blkio_alloc_mem_region({length})")
        ret = lib.blkio_map_mem_region(handle, region)
        if ret < 0:
            msg = last_error_message()
            lib.blkio_free_mem_region(handle, region)
            raise BlkioError(-ret, msg, "blkio_map_mem_region")
        mr = MemoryRegion(region, owned=True)
        self._regions.append(mr)
        return mr

    def map_mem_region(self, addr: int, length: int, fd: int = -1, fd_offset: int = 0) -> MemoryRegion:
        """Map memory the caller owns: [addr, addr+length) is fd's mmap at fd_offset.

        fd may be -1 unless needs-mem-region-fd is true (vhost-user: the server
        mmaps it; use a memfd). libblkio does not keep the fd; the caller keeps
        the mapping alive until release_mem_region() or close().
        """
        handle = self._live()
        region = ffi.new("struct blkio_mem_region *")
        region.addr = ffi.cast("void *", addr)
        region.len = length
        region.iova = 0
        region.fd_offset = fd_offset
        region.fd = fd
        region.flags = 0
        check(lib.blkio_map_mem_region(handle, region), f"blkio_map_mem_region(len={length}, fd={fd})")
        mr = MemoryRegion(region, owned=False)
        self._regions.append(mr)
        return mr

    def release_mem_region(self, region: MemoryRegion) -> None:
        """Unmap (and free, if libblkio allocated it). No request may be using it."""
        if region not in self._regions:
            raise ValueError(f"{region!r} does not belong to this instance")
        self._regions.remove(region)
        region._release(self._live())

    @property
    def mem_regions(self) -> Iterable[MemoryRegion]:
        return tuple(self._regions)

    # ---- teardown ----

    @property
    def closed(self) -> bool:
        return self._handle is None

    def close(self) -> None:
        """Destroy the instance: retire queues and regions, then blkio_destroy(). Idempotent.

        Requests still in flight are abandoned (their memory must stay valid
        until this returns, which it does: libblkio stops using it on destroy).
        """
        if self._handle is None:
            return
        for q in self._queues.values():
            q._close()
        self._queues.clear()
        for region in self._regions:
            region._forget()  # blkio_destroy unmaps every region and frees the ones it allocated
        self._regions.clear()
        out = ffi.new("struct blkio **", self._handle)
        self._handle = None
        self.state = CLOSED
        lib.blkio_destroy(out)

    def __enter__(self) -> Blkio:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Blkio {self.driver} {self.state}>"
