"""Grant tables through Linux's /dev/xen/gntdev (include/uapi/xen/gntdev.h).

Two ways to reach a guest's granted pages, both here:

- map: IOCTL_GNTDEV_MAP_GRANT_REF registers the refs and returns a file
  offset ("index"); mmap of that offset maps them (the kernel asks Xen to
  map the grants inside mmap, so a bad ref, a wrong domain or a read-only
  grant mapped writable surfaces as mmap failing with EINVAL). Read-only
  maps are mmapped PROT_READ: that is what makes the kernel request a
  read-only grant map (gntdev_mmap sets GNTMAP_readonly when the vma is not
  writable), so the data pages of a guest's WRITE request, which blkfront
  grants read-only, can be mapped at all. Unmapping is munmap followed by
  IOCTL_GNTDEV_UNMAP_GRANT_REF.
- copy: IOCTL_GNTDEV_GRANT_COPY takes an array of segments, each one guest
  page range and one local address, and writes a GNTST_* status into each
  segment. The kernel splits the array into hypercalls of 16 ops itself, so
  a whole batch goes down in one ioctl. The segment array is preallocated
  and grows, so a batch costs one pack per segment and one ioctl.

Everything here is a short blocking ioctl or mmap; nothing waits.
"""

from __future__ import annotations

import ctypes
import errno
import os
import struct
from collections.abc import Sequence
from typing import Any

from ._libc import IOC_NONE, FixedRegion, ioc, ioctl
from .interfaces import PAGE_SIZE, CopySegment, GrantMapError, GrantStatus

GNTDEV_PATH = "/dev/xen/gntdev"


# ---- the ABI (include/uapi/xen/gntdev.h); tests compare every size and offset with gcc's ----


class GntdevGrantRef(ctypes.Structure):
    _fields_ = [("domid", ctypes.c_uint32), ("ref", ctypes.c_uint32)]


class GntdevMapGrantRef(ctypes.Structure):
    # refs[1] is really refs[count]: the request is this header followed by count refs.
    _fields_ = [
        ("count", ctypes.c_uint32),
        ("pad", ctypes.c_uint32),
        ("index", ctypes.c_uint64),
        ("refs", GntdevGrantRef * 1),
    ]


class GntdevUnmapGrantRef(ctypes.Structure):
    _fields_ = [("index", ctypes.c_uint64), ("count", ctypes.c_uint32), ("pad", ctypes.c_uint32)]


class GntdevSetMaxGrants(ctypes.Structure):
    _fields_ = [("count", ctypes.c_uint32)]


class GntdevUnmapNotify(ctypes.Structure):
    _fields_ = [
        ("index", ctypes.c_uint64),
        ("action", ctypes.c_uint32),
        ("event_channel_port", ctypes.c_uint32),
    ]


class GntdevCopyForeign(ctypes.Structure):
    _fields_ = [("ref", ctypes.c_uint32), ("offset", ctypes.c_uint16), ("domid", ctypes.c_uint16)]


class GntdevCopyPtr(ctypes.Union):
    _fields_ = [("virt", ctypes.c_void_p), ("foreign", GntdevCopyForeign)]


class GntdevGrantCopySegment(ctypes.Structure):
    _fields_ = [
        ("source", GntdevCopyPtr),
        ("dest", GntdevCopyPtr),
        ("len", ctypes.c_uint16),
        ("flags", ctypes.c_uint16),
        ("status", ctypes.c_int16),
    ]


class GntdevGrantCopy(ctypes.Structure):
    _fields_ = [("count", ctypes.c_uint), ("segments", ctypes.c_void_p)]


IOCTL_GNTDEV_MAP_GRANT_REF = ioc(IOC_NONE, "G", 0, ctypes.sizeof(GntdevMapGrantRef))
IOCTL_GNTDEV_UNMAP_GRANT_REF = ioc(IOC_NONE, "G", 1, ctypes.sizeof(GntdevUnmapGrantRef))
IOCTL_GNTDEV_SET_MAX_GRANTS = ioc(IOC_NONE, "G", 3, ctypes.sizeof(GntdevSetMaxGrants))
IOCTL_GNTDEV_SET_UNMAP_NOTIFY = ioc(IOC_NONE, "G", 7, ctypes.sizeof(GntdevUnmapNotify))
IOCTL_GNTDEV_GRANT_COPY = ioc(IOC_NONE, "G", 8, ctypes.sizeof(GntdevGrantCopy))

UNMAP_NOTIFY_CLEAR_BYTE = 0x1
UNMAP_NOTIFY_SEND_EVENT = 0x2

# xen/include/public/grant_table.h
GNTCOPY_SOURCE_GREF = 1 << 0
GNTCOPY_DEST_GREF = 1 << 1

MAP_HEADER_SIZE = GntdevMapGrantRef.refs.offset
SEGMENT_SIZE = ctypes.sizeof(GntdevGrantCopySegment)

# One segment packed in one call. Field order is the C layout: source (8
# bytes), dest (8), len, flags, status, then tail padding to 24.
_SEG_LOCAL_TO_GUEST = struct.Struct("<QIHHHHh2x")  # source.virt, dest.foreign{ref,offset,domid}
_SEG_GUEST_TO_LOCAL = struct.Struct("<IHHQHHh2x")  # source.foreign{ref,offset,domid}, dest.virt
_STATUS_OFFSET = GntdevGrantCopySegment.status.offset
assert _SEG_LOCAL_TO_GUEST.size == _SEG_GUEST_TO_LOCAL.size == SEGMENT_SIZE
assert _STATUS_OFFSET % 2 == 0 and SEGMENT_SIZE % 2 == 0

_BAD_COPY_ARG = int(GrantStatus.BAD_COPY_ARG)


# ---- argument encoding, kept apart from the syscalls so tests can check it against gcc ----


def encode_map_request(domid: int, refs: Sequence[int]) -> ctypes.Array:
    """The IOCTL_GNTDEV_MAP_GRANT_REF argument: the header, then count {domid, ref} pairs."""
    count = len(refs)
    buf = ctypes.create_string_buffer(MAP_HEADER_SIZE + ctypes.sizeof(GntdevGrantRef) * count)
    struct.pack_into("<II", buf, 0, count, 0)
    pairs = struct.Struct(f"<{2 * count}I")
    flat = [0] * (2 * count)
    flat[0::2] = [domid] * count
    flat[1::2] = refs
    pairs.pack_into(buf, MAP_HEADER_SIZE, *flat)
    return buf


def decode_map_index(buf: ctypes.Array) -> int:
    return GntdevMapGrantRef.from_buffer(buf).index


_WIRE_SEGMENT = struct.Struct("<IBB2x")  # blkif_request_segment: gref, first_sect, last_sect
_ffi: Any = None
_lib: Any = None
_packer_tried = False
_native: Any = None


def _packer() -> Any:
    """The compiled kernels' lib (native/pack_segments.c), or None when they cannot be had."""
    global _ffi, _lib, _packer_tried, _native
    if not _packer_tried:
        _packer_tried = True
        from .. import native

        _native = native
        try:
            mod = native.load()
            _ffi, _lib = mod.ffi, mod.lib
        except native.NativeBuildError as e:
            import logging

            logging.getLogger(__name__).warning("grant copy: segments packed in Python (slower, the same): %s", e)
    return _lib if _native.enabled else None


def load_compiled_packing() -> bool:
    """Load the compiled packing now (True if it is there): at start-up, not at the first copy, which
    may fall in a guest's connect or a handover's pause (loading costs ~20 ms with its imports)."""
    return _packer() is not None


class CopyBatch:
    """A preallocated IOCTL_GNTDEV_GRANT_COPY segment array that grows when needed.

    Two ways to fill it:
      * `load(segments)` packs CopySegment objects (Gntdev.grant_copy);
      * `reset()`, then `add_sector_ranges(...)` per request, the datapath's
        way (Gntdev.grant_copy_batch): blkif segments straight from the
        request's (gref, first_sect, last_sect) tuples into the kernel's
        layout, with the owner of each, no object per segment.
    Either leaves out the segments the kernel would refuse with EINVAL for
    the *whole* ioctl (a guest range crossing its page:
    gntdev_grant_copy_seg) and answers them GNTST_bad_copy_arg, the status
    Xen itself gives that mistake. `statuses()` / `results()` read the
    answers back in the caller's order.
    """

    def __init__(self, capacity: int = 64):
        self.buffer = ctypes.create_string_buffer(0)
        self.count = 0  # segments packed for the kernel
        self.owners: list[Any] = []  # the owner of every segment added, refused ones included
        self.refused: dict[int, int] | None = None  # {index among the added: status} of those kept back
        _packer()
        if _lib is not None:  # add_segment_bytes' out-parameters, allocated once (used when native.enabled)
            self._refused_idx = _ffi.new("uint32_t[]", 256)
            self._nrefused = _ffi.new("uint32_t *")
            self._covered = _ffi.new("uint64_t *")
        self._grow(capacity)
        self.reset()

    def _grow(self, capacity: int) -> None:
        old = self.buffer
        self.capacity = capacity
        self.buffer = ctypes.create_string_buffer(capacity * SEGMENT_SIZE)
        ctypes.memmove(self.buffer, old, min(len(old), len(self.buffer)))  # what add() packed so far
        self.address = ctypes.addressof(self.buffer)
        # Pack through a plain byte view: a ctypes array rebuilds its buffer
        # description on every export, which costs more than the pack itself.
        self._bytes = memoryview(self.buffer).cast("B")
        # int16 view for reading the status of each segment with a stride.
        self._halfwords = self._bytes.cast("h")
        if _lib is not None:  # the array as the compiled kernels take it, made once per size, not per call
            self._segs = _ffi.cast("struct xk_copy_seg *", self.address)

    def reserve(self, count: int) -> None:
        """Room for `count` segments in all (what is packed is kept)."""
        if count > self.capacity:
            self._grow(max(count, 2 * self.capacity))

    def load(self, segments: Sequence[CopySegment]) -> tuple[int, dict[int, int] | None]:
        """Pack segments; return (how many go to the kernel, {caller index: status} of refused ones)."""
        if len(segments) > self.capacity:
            self._grow(max(len(segments), 2 * self.capacity))
        buf = self._bytes
        to_guest_pack = _SEG_LOCAL_TO_GUEST.pack_into
        from_guest_pack = _SEG_GUEST_TO_LOCAL.pack_into
        refused: dict[int, int] | None = None
        pos = 0
        for i, seg in enumerate(segments):
            off, length = seg.guest_offset, seg.length
            try:
                if off < 0 or length < 0 or off + length > PAGE_SIZE:
                    raise ValueError
                if seg.to_guest:
                    to_guest_pack(buf, pos, seg.local_addr, seg.gref, off, seg.domid, length, GNTCOPY_DEST_GREF, 0)
                else:
                    from_guest_pack(buf, pos, seg.gref, off, seg.domid, seg.local_addr, length, GNTCOPY_SOURCE_GREF, 0)
            except (ValueError, struct.error):
                if refused is None:
                    refused = {}
                refused[i] = _BAD_COPY_ARG
                continue
            pos += SEGMENT_SIZE
        # as reset() + add would leave it, so grant_copy_batch() can run it too (owners: none)
        self.count = pos // SEGMENT_SIZE
        self.refused = refused
        self.owners = [None] * len(segments)
        return self.count, refused

    def statuses(self, count: int, refused: dict[int, int] | None, total: int) -> list[int]:
        step = SEGMENT_SIZE // 2
        first = _STATUS_OFFSET // 2
        kernel = self._halfwords[first : first + step * count : step].tolist()
        if refused is None:
            return kernel
        out = []
        it = iter(kernel)
        for i in range(total):
            out.append(refused[i] if i in refused else next(it))
        return out

    # ---- the incremental way (Gntdev.grant_copy_batch) ----

    def reset(self) -> None:
        """Empty the batch: `count` segments packed for the kernel, `owners` in step with every added one."""
        self.count = 0
        self.owners = []
        self.refused = None

    def add_sector_ranges(self, to_guest: bool, domid: int, ranges: Sequence[tuple[int, int, int]],
                          local_addr: int, owner: object) -> int:
        """One segment per (gref, first_sect, last_sect): 512-byte sectors first..last of the granted
        page <-> local memory packed back to back from local_addr. Returns the bytes covered."""
        count = self.count
        if count + len(ranges) > self.capacity:
            self._grow(max(count + len(ranges), 2 * self.capacity))
        pack = _SEG_LOCAL_TO_GUEST.pack_into if to_guest else _SEG_GUEST_TO_LOCAL.pack_into
        flags = GNTCOPY_DEST_GREF if to_guest else GNTCOPY_SOURCE_GREF
        buf = self._bytes
        owners = self.owners
        pos = count * SEGMENT_SIZE
        addr = local_addr
        for gref, first, last in ranges:
            off = first << 9
            n = (last - first + 1) << 9
            try:
                if n <= 0 or off + n > PAGE_SIZE:
                    raise ValueError
                if to_guest:
                    pack(buf, pos, addr, gref, off, domid, n, flags, 0)
                else:
                    pack(buf, pos, gref, off, domid, addr, n, flags, 0)
            except (ValueError, struct.error, OverflowError):
                if self.refused is None:
                    self.refused = {}
                self.refused[len(owners)] = _BAD_COPY_ARG
                owners.append(owner)
                continue
            owners.append(owner)
            pos += SEGMENT_SIZE
            addr += n
        self.count = pos // SEGMENT_SIZE
        return addr - local_addr

    def add_range(self, to_guest: bool, domid: int, gref: int, guest_offset: int, local_addr: int, length: int,
                  owner: object) -> None:
        """One segment of any byte range of a granted page (an indirect request's segment list:
        nr_segments * 8 bytes, not whole sectors) <-> local memory at local_addr. Packs and refuses
        as load() does for the same CopySegment."""
        count = self.count
        if count + 1 > self.capacity:
            self._grow(max(count + 1, 2 * self.capacity))
        self.owners.append(owner)
        try:
            if guest_offset < 0 or length < 0 or guest_offset + length > PAGE_SIZE:
                raise ValueError
            pos = count * SEGMENT_SIZE
            if to_guest:
                _SEG_LOCAL_TO_GUEST.pack_into(self._bytes, pos, local_addr, gref, guest_offset, domid, length,
                                              GNTCOPY_DEST_GREF, 0)
            else:
                _SEG_GUEST_TO_LOCAL.pack_into(self._bytes, pos, gref, guest_offset, domid, local_addr, length,
                                              GNTCOPY_SOURCE_GREF, 0)
        except (ValueError, struct.error, OverflowError):
            if self.refused is None:
                self.refused = {}
            self.refused[len(self.owners) - 1] = _BAD_COPY_ARG
            return
        self.count = count + 1

    def add_segment_bytes(self, to_guest: bool, domid: int, raw: bytes, local_addr: int, owner: object) -> int:
        """add_sector_ranges for segments in their 8-byte wire form (a private copy: WireSegments.raw),
        packed by compiled code in one call (native/pack_segments.c); the same result. Without the
        compiled kernels, the same in Python."""
        lib = _packer()
        if lib is None:
            return self.add_sector_ranges(to_guest, domid, tuple(_WIRE_SEGMENT.iter_unpack(raw)), local_addr, owner)
        nseg = len(raw) // 8
        count = self.count
        if count + nseg > self.capacity:
            self._grow(max(count + nseg, 2 * self.capacity))
        if nseg > len(self._refused_idx):
            self._refused_idx = _ffi.new("uint32_t[]", max(nseg, 2 * len(self._refused_idx)))
        packed = lib.xk_pack_sector_ranges(self._segs + count, raw, nseg, to_guest, domid, local_addr,
                                           self._refused_idx, self._nrefused, self._covered)
        if self._nrefused[0]:
            if self.refused is None:
                self.refused = {}
            base = len(self.owners)
            for i in range(self._nrefused[0]):
                self.refused[base + self._refused_idx[i]] = _BAD_COPY_ARG
        self.owners += [owner] * nseg
        self.count = count + packed
        return int(self._covered[0])

    def results(self) -> list[int]:
        """The status of every added segment, in the order added (after the copy ran)."""
        return self.statuses(self.count, self.refused, len(self.owners))

    def failed_owners(self) -> list:
        """The owner of every segment that did not copy (after the copy ran), in order; [] when all did."""
        if self.refused is None:
            lib = _packer()
            if lib is not None:  # compiled: ~1 us for the 2048 statuses of 8 requests of 1 MiB, not 13
                if not lib.xk_copy_failures(self._segs, self.count):
                    return []
            else:
                step = SEGMENT_SIZE // 2
                first = _STATUS_OFFSET // 2
                if not any(self._halfwords[first : first + step * self.count : step]):
                    return []
        return [owner for st, owner in zip(self.results(), self.owners) if st]


# ---- the device ----


class GntdevMapping:
    """Granted pages mapped contiguously through gntdev. Implements GrantMapping."""

    __slots__ = ("_dev", "_region", "_view", "index", "npages", "readonly", "domid", "refs")

    def __init__(self, dev: GntdevDevice, region: FixedRegion, index: int, domid: int, refs: tuple[int, ...]):
        self._dev = dev
        self._region = region
        self._view: memoryview | None = region.view()
        self.index = index
        self.npages = len(refs)
        self.readonly = region.readonly
        self.domid = domid
        self.refs = refs

    @property
    def addr(self) -> int:
        return self._region.addr

    @property
    def buffer(self) -> memoryview:
        if self._view is None:
            raise ValueError("grant mapping is closed")
        return self._view

    def set_unmap_notify(self, *, clear_byte: int | None = None, event_port: int | None = None) -> None:
        """Ask the kernel to act when this mapping goes away, even if we crash.

        clear_byte: offset (from addr) of a byte the kernel zeroes on unmap;
        needs a writable mapping. event_port: a local event channel port
        (bound with our Evtchn) the kernel notifies on unmap.
        """
        if self._view is None:
            raise ValueError("grant mapping is closed")
        action, offset = 0, 0
        if clear_byte is not None:
            if not 0 <= clear_byte < self.npages * PAGE_SIZE:
                raise ValueError("clear_byte outside the mapping")
            action |= UNMAP_NOTIFY_CLEAR_BYTE
            offset = clear_byte
        if event_port is not None:
            action |= UNMAP_NOTIFY_SEND_EVENT
        arg = GntdevUnmapNotify(self.index + offset, action, event_port or 0)
        ioctl(self._dev.fileno(), IOCTL_GNTDEV_SET_UNMAP_NOTIFY, ctypes.addressof(arg))

    def close(self) -> None:
        """munmap, then release the grants. Raises BufferError while views of .buffer are alive."""
        if self._view is None:
            return
        self._view.release()
        try:
            self._region.close()
        except BufferError:
            self._view = self._region.view()
            raise
        self._view = None
        self._dev._forget(self)
        arg = GntdevUnmapGrantRef(self.index, self.npages, 0)
        ioctl(self._dev.fileno(), IOCTL_GNTDEV_UNMAP_GRANT_REF, ctypes.addressof(arg))


class GntdevDevice:
    """An open /dev/xen/gntdev. Implements Gntdev."""

    def __init__(self, path: str = GNTDEV_PATH):
        self._fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        self._maps: dict[int, GntdevMapping] = {}
        self._batch = CopyBatch()
        self._copy_arg = GntdevGrantCopy()
        self._copy_arg_addr = ctypes.addressof(self._copy_arg)

    def fileno(self) -> int:
        if self._fd < 0:
            raise ValueError("gntdev is closed")
        return self._fd

    def map_grants(self, domid: int, refs: Sequence[int], *, readonly: bool) -> GntdevMapping:
        refs = tuple(refs)
        if not refs:
            raise ValueError("no grant refs to map")
        req = encode_map_request(domid, refs)
        try:
            ioctl(self.fileno(), IOCTL_GNTDEV_MAP_GRANT_REF, ctypes.addressof(req))
        except OSError as e:  # EINVAL: more refs than the module's limit; ENOMEM
            raise GrantMapError(
                e.errno, f"registering {len(refs)} grant refs of domain {domid} failed: {e.strerror}"
            ) from e
        index = decode_map_index(req)
        length = len(refs) * PAGE_SIZE
        try:
            region = FixedRegion(length, readonly=readonly)
            try:
                region.place(0, length, self._fd, index)
            except BaseException:
                region.close()
                raise
        except OSError as e:
            self._unmap_index(index, len(refs))
            raise GrantMapError(
                e.errno or errno.EINVAL,
                f"mapping grant refs {list(refs)} of domain {domid} ({'ro' if readonly else 'rw'}) "
                f"failed: {e.strerror}",
            ) from e
        except BaseException:
            self._unmap_index(index, len(refs))
            raise
        mapping = GntdevMapping(self, region, index, domid, refs)
        self._maps[index] = mapping
        return mapping

    def _unmap_index(self, index: int, count: int) -> None:
        arg = GntdevUnmapGrantRef(index, count, 0)
        ioctl(self._fd, IOCTL_GNTDEV_UNMAP_GRANT_REF, ctypes.addressof(arg))

    def _forget(self, mapping: GntdevMapping) -> None:
        self._maps.pop(mapping.index, None)

    def grant_copy(self, segments: Sequence[CopySegment]) -> list[int]:
        total = len(segments)
        if total == 0:
            return []
        batch = self._batch
        count, refused = batch.load(segments)
        if count:
            self._copy_arg.count = count
            self._copy_arg.segments = batch.address
            ioctl(self.fileno(), IOCTL_GNTDEV_GRANT_COPY, self._copy_arg_addr)
        return batch.statuses(count, refused, total)

    def grant_copy_batch(self, batch: CopyBatch) -> None:
        """One ioctl for every segment packed in batch; their statuses land in it (batch.failed_owners())."""
        if batch.count:
            self._copy_arg.count = batch.count
            self._copy_arg.segments = batch.address
            ioctl(self.fileno(), IOCTL_GNTDEV_GRANT_COPY, self._copy_arg_addr)

    def engine_copier(self, domid: int) -> dict[str, int] | None:
        """The ring engine's grant copy (backend/datapath/ring_engine.py): this fd's
        IOCTL_GNTDEV_GRANT_COPY, as grant_copy_batch runs it."""
        return {"kind": 1, "domid": domid, "fd": self.fileno(), "request": IOCTL_GNTDEV_GRANT_COPY}

    def set_max_grants(self, count: int) -> None:
        """Old kernels cap the grants one fd may map; newer ones dropped the ioctl (ENOTTY),
        as libxengnttab tolerates."""
        arg = GntdevSetMaxGrants(count)
        try:
            ioctl(self.fileno(), IOCTL_GNTDEV_SET_MAX_GRANTS, ctypes.addressof(arg))
        except OSError as e:
            if e.errno != errno.ENOTTY:
                raise

    def close(self) -> None:
        """Unmap what can be unmapped and close the device. Idempotent.

        A mapping whose buffer is still viewed stays mapped in this process
        (the kernel keeps its grants until that memory is unmapped).
        """
        if self._fd < 0:
            return
        for mapping in list(self._maps.values()):
            try:
                mapping.close()
            except (BufferError, OSError):
                pass
        self._maps.clear()
        os.close(self._fd)
        self._fd = -1

    def __enter__(self) -> GntdevDevice:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
