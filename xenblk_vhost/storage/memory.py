"""Memory regions: the memory a libblkio driver may do I/O on.

Drivers with needs-mem-regions=true (virtio-blk-vhost-user, vhost-vdpa) can
only reach buffers inside a mapped region: the vhost-user server mmaps the
region's fd. A buffer outside every region is not detected by libblkio 1.5;
qemu-storage-daemon then drops the connection and the request never
completes (LIBBLKIO-NOTES.md, pitfall 2). So on such drivers every request
buffer must lie in a MemoryRegion.

Two origins:
- allocated by libblkio (blkio_alloc_mem_region: a memfd it creates, mapped
  here, aligned for the driver) -- we free it;
- described by the caller (its own memfd-backed mmap, e.g. the simulator's
  guest memory) -- we only map/unmap it; the caller keeps the memory and fd.
"""

from __future__ import annotations

from .cdef import ffi, lib


def address_of(buffer) -> int:
    """Virtual address of a writable buffer (bytearray, mmap, memoryview...).

    The caller keeps `buffer` alive (and, for mmap, unresized) for as long as
    the address is used: we keep no reference.
    """
    return int(ffi.cast("uintptr_t", ffi.from_buffer(buffer, require_writable=True)))


def _release_view(view: memoryview) -> None:
    # A buffer still exported from the view (e.g. a numpy array over it) makes
    # release() fail; the memory goes away regardless, so that is the
    # holder's bug, not a reason to leak the region.
    try:
        view.release()
    except BufferError:
        pass


class MemoryRegion:
    """One struct blkio_mem_region known to a blkio instance.

    addr, length, fd, fd_offset: the region as libblkio sees it.
    view: a writable memoryview over the region, released with the region.
          Slices taken from it are not tracked: do not keep them past
          release_mem_region()/close() (the memory is unmapped then).
    Created by Blkio.alloc_mem_region() or Blkio.map_mem_region(); released
    by Blkio.release_mem_region() or when the Blkio is closed.
    """

    __slots__ = ("_struct", "addr", "length", "fd", "fd_offset", "owned", "_view")

    def __init__(self, struct, *, owned: bool) -> None:
        self._struct = struct  # the exact struct we mapped with: unmap/free need identical fields
        self.addr = int(ffi.cast("uintptr_t", struct.addr))
        self.length = int(struct.len)
        self.fd = int(struct.fd)
        self.fd_offset = int(struct.fd_offset)
        self.owned = owned  # allocated by libblkio (we free it) vs. caller's memory
        self._view = (
            memoryview(ffi.buffer(ffi.cast("char *", struct.addr), self.length)) if self.length else memoryview(b"")
        )

    @property
    def view(self) -> memoryview:
        if self._struct is None:
            raise ValueError("memory region was released")
        return self._view

    @property
    def released(self) -> bool:
        return self._struct is None

    def address(self, offset: int = 0) -> int:
        """Address of byte `offset` of the region (for requests and iovecs)."""
        if not 0 <= offset <= self.length:
            raise ValueError(f"offset {offset} outside region of {self.length} bytes")
        return self.addr + offset

    def contains(self, addr: int, length: int) -> bool:
        return self.addr <= addr and addr + length <= self.addr + self.length

    def _release(self, handle) -> None:
        """Unmap (and free if ours). Called by Blkio only, while the handle is alive."""
        if self._struct is None:
            return
        _release_view(self._view)
        lib.blkio_unmap_mem_region(handle, self._struct)
        if self.owned:
            lib.blkio_free_mem_region(handle, self._struct)
        self._struct = None

    def _forget(self) -> None:
        """The handle was destroyed (which unmaps and frees everything): drop our view."""
        if self._struct is not None:
            _release_view(self._view)
            self._struct = None

    def __repr__(self) -> str:
        state = "released" if self._struct is None else ("owned" if self.owned else "caller's")
        return f"<MemoryRegion addr={self.addr:#x} len={self.length} fd={self.fd} {state}>"
