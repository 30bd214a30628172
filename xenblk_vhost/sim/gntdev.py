"""The simulated gntdev: plays Xen's grant-table role inside the backend process.

It implements the Gntdev protocol like `xenblk_vhost.xen.gntdev` does, but
where the kernel would ask Xen, it does Xen's work itself on the guest's
shared memory: reads the guest's grant entry, checks it the way Xen does
(`grant_table.py`), and then either maps the granted frames of the guest's
memory memfd into our address space (`FixedRegion`: one contiguous range,
PROT_READ for read-only maps, a write through it faults) while holding
GTF_reading/GTF_writing set in the entry, or copies bytes between our
address and the guest's frame (ctypes.memmove).

The guest's memory and grant table come from the hypervisor once per
domain (one round trip, then cached: mapped whole for copies, its memfd
kept for placing maps). Whether a domain is still alive is read from the
hypervisor's status page on every call, so a destroyed domain's grants
fail with GNTST_bad_domain from then on, without a round trip.
"""

from __future__ import annotations

import errno
import logging
import mmap
import os
from collections.abc import Sequence
from ctypes import memmove as _memmove
from types import ModuleType

from .. import native
from ..xen._libc import FixedRegion, buffer_address
from ..xen.gntdev import GNTCOPY_DEST_GREF, SEGMENT_SIZE, CopyBatch, GntdevGrantCopySegment
from ..xen.interfaces import PAGE_SIZE, CopySegment, GrantMapError, GrantStatus
from .grant_table import ActiveTable, SharedGrantTable, active_table_bytes, grant_table_bytes
from .hypercall import Hypercalls
from .pin_ledger import PinLedger

log = logging.getLogger(__name__)

_OKAY = int(GrantStatus.OKAY)
_BAD_DOMAIN = int(GrantStatus.BAD_DOMAIN)
_BAD_PAGE = int(GrantStatus.BAD_PAGE)
_BAD_COPY_ARG = int(GrantStatus.BAD_COPY_ARG)


class ForeignDomain:
    """What Xen knows of one guest: its memory, its grant table, the active (pin) table."""

    def __init__(self, domid: int, pages: int, grant_frames: int, memory_fd: int, grant_fd: int, active_fd: int):
        self.domid = domid
        self.pages = pages
        self.memory_fd = memory_fd  # kept: maps place frames straight from it
        # Mappings still using our tables; we are torn down only once the
        # domain is gone from the cache *and* the last of them is closed.
        self.users = 0
        self.retired = False
        try:
            self._memory = mmap.mmap(memory_fd, pages * PAGE_SIZE, mmap.MAP_SHARED)
            self.memory_addr = buffer_address(self._memory)
            self._grants = mmap.mmap(grant_fd, grant_table_bytes(grant_frames), mmap.MAP_SHARED)
            self.table_addr = buffer_address(self._grants)
            self.table = SharedGrantTable(self._grants, self.table_addr, grant_frames)
            self._active = mmap.mmap(active_fd, active_table_bytes(grant_frames), mmap.MAP_SHARED)
            self.active_addr = buffer_address(self._active)
            self.active = ActiveTable(self._active, self.active_addr, self.table.nr_entries)
            # (grant table, active table, memory) as C pointers, for the compiled copy
            self.pointers: tuple | None = None
        finally:
            os.close(grant_fd)
            os.close(active_fd)

    def retire(self) -> None:
        self.retired = True
        if self.users == 0 and self.memory_fd >= 0:
            for m in (self._memory, self._grants, self._active):
                m.close()
            os.close(self.memory_fd)
            self.memory_fd = -1


def _unpin(dom: ForeignDomain, ledger: PinLedger, ref: int, write: bool, entry: int) -> None:
    """Unpin one mapped grant, its ledger entry pending while the unpin runs (pin_ledger.py)."""
    ledger.unpinning(entry)
    dom.table.unpin(ref, write, dom.active)
    ledger.remove(entry)


class SimGrantMapping:
    """Granted frames mapped contiguously, pinned in the guest's entries. Implements GrantMapping."""

    __slots__ = ("_dev", "_dom", "_region", "_view", "refs", "frames", "npages", "readonly", "_notify", "_ledger")

    def __init__(self, dev: SimGntdev, dom: ForeignDomain, region: FixedRegion, refs, frames, readonly: bool,
                 ledger: list[int]):
        self._dev = dev
        self._dom = dom
        self._region = region
        self._view: memoryview | None = region.view()
        self.refs = refs
        self.frames = frames
        self.npages = len(refs)
        self.readonly = readonly
        self._notify: tuple[int, int | None] | None = None  # (token, clear_byte)
        self._ledger = ledger  # our pins' entries in the process's pin ledger

    @property
    def domid(self) -> int:
        return self._dom.domid

    @property
    def addr(self) -> int:
        return self._region.addr

    @property
    def buffer(self) -> memoryview:
        if self._view is None:
            raise ValueError("grant mapping is closed")
        return self._view

    def set_unmap_notify(self, *, clear_byte: int | None = None, event_port: int | None = None) -> None:
        """As IOCTL_GNTDEV_SET_UNMAP_NOTIFY; registered with the hypervisor so it also happens if we die."""
        if self._view is None:
            raise ValueError("grant mapping is closed")
        clear = None
        if clear_byte is not None:
            if not 0 <= clear_byte < self.npages * PAGE_SIZE:
                raise ValueError("clear_byte outside the mapping")
            if self.readonly:
                raise OSError(errno.EINVAL, "UNMAP_NOTIFY_CLEAR_BYTE needs a writable mapping")
            clear = [self.frames[clear_byte // PAGE_SIZE], clear_byte % PAGE_SIZE]
        hc = self._dev._hc
        reply, _ = hc.call(
            "unmap_notify_set", domid=self._dev.domid, foreign_domid=self._dom.domid, clear=clear, event_port=event_port
        )
        if self._notify is not None:  # replacing an earlier request, as the ioctl does
            hc.call("unmap_notify_cancel", token=self._notify[0])
        self._notify = (reply["token"], clear_byte)

    def close(self) -> None:
        """Unmap and unpin. Raises BufferError (nothing changed) while views of .buffer are alive."""
        if self._view is None:
            return
        if self._notify is not None and self._notify[1] is not None:
            self._view[self._notify[1]] = 0  # the kernel clears the byte while the page is still mapped
        self._view.release()
        try:
            self._region.close()
        except BufferError:
            self._view = self._region.view()
            raise
        self._view = None
        dom, write = self._dom, not self.readonly
        ledger = self._dev._pin_ledger()
        for ref, entry in zip(self.refs, self._ledger):
            _unpin(dom, ledger, ref, write, entry)
        self._dev._maps.discard(self)
        dom.users -= 1
        if dom.retired:
            dom.retire()
        if self._notify is not None:
            token, clear_byte = self._notify
            self._notify = None
            if not self._dev._hc.closed:
                self._dev._hc.call("unmap_notify_fire", token=token, clear_done=clear_byte is not None)


class SimGntdev:
    """The backend's gntdev in the simulation. Implements Gntdev."""

    def __init__(self, socket_path: str, *, domid: int = 0):
        self._hc = Hypercalls(socket_path)
        self.domid = domid
        self._domains: dict[int, ForeignDomain] = {}
        self._maps: set[SimGrantMapping] = set()
        self.max_grants: int | None = None
        self._native: ModuleType | None = None
        self._native_failed = False
        self._ledger: PinLedger | None = None

    def _pin_ledger(self) -> PinLedger:
        if self._ledger is None:
            _, fds = self._hc.call("pin_ledger")
            self._ledger = PinLedger(fds[0])
        return self._ledger

    def _foreign(self, domid: int) -> ForeignDomain | None:
        """The live domain `domid` as Xen sees it, or None if there is none (GNTST_bad_domain)."""
        if not self._hc.domain_alive(domid):
            stale = self._domains.pop(domid, None)
            if stale is not None:
                stale.retire()
            return None
        dom = self._domains.get(domid)
        if dom is None:
            try:
                reply, fds = self._hc.call("foreign_domain", domid=domid)
            except OSError:
                return None
            dom = ForeignDomain(domid, reply["pages"], reply["grant_frames"], *fds)
            self._domains[domid] = dom
        return dom

    def map_grants(self, domid: int, refs: Sequence[int], *, readonly: bool) -> SimGrantMapping:
        refs = tuple(refs)
        if not refs:
            raise ValueError("no grant refs to map")
        dom = self._foreign(domid)
        if dom is None:
            raise GrantMapError(errno.EINVAL, f"mapping grant refs of domain {domid}: GNTST_bad_domain")
        write = not readonly
        frames: list[int] = []
        ledger = self._pin_ledger()
        entries: list[int] = []
        try:
            for ref in refs:
                # Listed (pending) before the pin starts: a kill inside it is repaired by the
                # hypervisor, not leaked (pin_ledger.py).
                entry = ledger.add(domid, ref, write)
                status, frame = dom.table.pin(ref, self.domid, write, dom.active)
                if status == _OKAY:
                    ledger.confirm(entry)
                    entries.append(entry)
                else:
                    ledger.remove(entry)
                if status == _OKAY and not 0 <= frame < dom.pages:
                    _unpin(dom, ledger, ref, write, entries.pop())
                    status = _BAD_PAGE
                if status != _OKAY:
                    raise GrantMapError(
                        errno.EINVAL,
                        f"mapping grant ref {ref} of domain {domid} ({'ro' if readonly else 'rw'}): "
                        f"GNTST_{GrantStatus(status).name.lower()}",
                    )
                frames.append(frame)
            region = FixedRegion(len(refs) * PAGE_SIZE, readonly=readonly)
            try:
                start = 0
                while start < len(frames):  # one mmap per run of consecutive frames
                    end = start + 1
                    while end < len(frames) and frames[end] == frames[end - 1] + 1:
                        end += 1
                    region.place(start * PAGE_SIZE, (end - start) * PAGE_SIZE, dom.memory_fd, frames[start] * PAGE_SIZE)
                    start = end
            except BaseException:
                region.close()
                raise
        except BaseException:
            for ref, entry in zip(refs[: len(frames)], entries):
                _unpin(dom, ledger, ref, write, entry)
            raise
        mapping = SimGrantMapping(self, dom, region, refs, tuple(frames), readonly, entries)
        dom.users += 1
        self._maps.add(mapping)
        return mapping

    def grant_copy(self, segments: Sequence[CopySegment]) -> list[int]:
        out: list[int] = []
        append = out.append
        memmove = _memmove
        ldomid = self.domid
        last_domid = -1
        dom: ForeignDomain | None = None
        for seg in segments:
            off, length = seg.guest_offset, seg.length
            # Linux refuses a page-crossing grant range before Xen sees it;
            # the real adapter answers it GNTST_bad_copy_arg, so do we.
            if off < 0 or length < 0 or off + length > PAGE_SIZE:
                append(_BAD_COPY_ARG)
                continue
            if seg.domid != last_domid:  # batches are almost always one domain: look it up once
                last_domid = seg.domid
                dom = self._foreign(last_domid)
                if dom is not None:
                    check, active, pages, base = dom.table.check_for_copy, dom.active, dom.pages, dom.memory_addr
            if dom is None:
                append(_BAD_DOMAIN)
                continue
            if not length:
                append(_OKAY)  # gntdev issues no op for it; Xen would not look either
                continue
            to_guest = seg.to_guest
            status, frame = check(seg.gref, ldomid, to_guest, active)
            if status:
                append(status)
                continue
            if frame >= pages:
                append(_BAD_PAGE)
                continue
            guest = base + frame * PAGE_SIZE + off
            if to_guest:
                memmove(guest, seg.local_addr, length)
            else:
                memmove(seg.local_addr, guest, length)
            append(_OKAY)
        return out

    def grant_copy_batch(self, batch: CopyBatch) -> None:
        """Xen's work for a packed batch, compiled (native/sim_grant_copy.c: the same checks as
        grant_copy above, which tests compare it with); statuses land in the batch."""
        n = batch.count
        if not n:
            return
        mod = self._native or self._load_native()
        if mod is None or not native.enabled:
            self._grant_copy_batch_python(batch)
            return
        ffi, lib = mod.ffi, mod.lib
        segs = ffi.cast("struct xk_copy_seg *", batch.address)
        null = ffi.NULL
        i = 0
        while i < n:  # one run per foreign domain (a batch is almost always one)
            seg = segs[i]
            domid = seg.dest.foreign.domid if seg.flags == GNTCOPY_DEST_GREF else seg.source.foreign.domid
            dom = self._foreign(domid)
            if dom is None:
                j = lib.xk_sim_grant_copy(segs, i, n, domid, self.domid, null, 0, null, null, 0)
            else:
                if dom.pointers is None:
                    dom.pointers = (ffi.cast("uint8_t *", dom.table_addr), ffi.cast("uint32_t *", dom.active_addr),
                                    ffi.cast("uint8_t *", dom.memory_addr))
                table, active, memory = dom.pointers
                j = lib.xk_sim_grant_copy(segs, i, n, domid, self.domid, table, dom.table.nr_entries, active,
                                          memory, dom.pages)
            if j <= i:  # cannot happen: segs[i] is of domid, or C answers it bad_copy_arg and moves on
                raise RuntimeError(f"simulated grant copy stuck at segment {i} of {n}")
            i = j

    def engine_copier(self, domid: int) -> dict[str, int] | None:
        """The ring engine's grant copy with domid's grants (backend/datapath/ring_engine.py): this
        hypervisor's tables of the domain, for xk_sim_grant_copy (the same checks as
        grant_copy_batch), and its state byte (a dead domain's copies fail GNTST_bad_domain, as here).
        The tables stay mapped while a mapping of the domain (the ring's) is open: the engine runs only
        while the ring is mapped. None: no such domain now, or the compiled copy is off."""
        if not native.enabled:
            return None
        dom = self._foreign(domid)
        if dom is None:
            return None
        alive, alive_value = self._hc.alive_flag(domid)
        return {"kind": 2, "domid": domid, "ldomid": self.domid, "table": dom.table_addr,
                "entries": dom.table.nr_entries, "active": dom.active_addr, "memory": dom.memory_addr,
                "pages": dom.pages, "alive": alive, "alive_value": alive_value}

    def _load_native(self) -> ModuleType | None:
        """The compiled kernels (built on first use), or None, said once, when they cannot be had."""
        if self._native_failed:
            return None
        try:
            self._native = native.load()
        except native.NativeBuildError as e:
            self._native_failed = True
            log.warning("simulated grant copy: the compiled copy is unavailable, copying in Python "
                        "(slower, same results): %s", e)
        return self._native

    def _grant_copy_batch_python(self, batch: CopyBatch) -> None:
        """grant_copy_batch through grant_copy, for when the compiled copy cannot be built."""
        segs = [GntdevGrantCopySegment.from_buffer(batch.buffer, i * SEGMENT_SIZE) for i in range(batch.count)]
        copies = []
        for seg in segs:
            if seg.flags == GNTCOPY_DEST_GREF:
                f, local, to_guest = seg.dest.foreign, seg.source.virt, True
            else:  # the batch is packed by CopyBatch: one of the two directions
                f, local, to_guest = seg.source.foreign, seg.dest.virt, False
            copies.append(CopySegment(to_guest, f.domid, f.ref, f.offset, local or 0, seg.len))
        for seg, status in zip(segs, self.grant_copy(copies)):
            seg.status = status

    def set_max_grants(self, count: int) -> None:
        """Recorded, not enforced: current Linux gntdev has no such limit either (the ioctl is gone)."""
        if count <= 0:
            raise ValueError("max grants must be positive")
        self.max_grants = count

    def close(self) -> None:
        for m in list(self._maps):
            try:
                m.close()
            except BufferError:
                pass  # still viewed: stays mapped and pinned, like a kernel vma we did not unmap
        for dom in self._domains.values():
            dom.retire()
        self._domains.clear()
        self._hc.close()

