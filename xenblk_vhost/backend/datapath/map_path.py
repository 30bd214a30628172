"""The grant-map data path: the storage reads and writes the guest's pages in place.

For drivers that accept any memory (io_uring; never vhost-user). No copy,
but a grant mapping per page, which on real Xen costs a map hypercall and,
on unmap, a TLB shootdown; hence persistent grants.

Without feature-persistent: every batch maps the data pages of all its
writes in ONE map call (read-only: blkfront grants a write's pages
read-only) and those of all its reads in another (writable). A request is
answered only after its pages are unmapped (the frontend then revokes the
grants at once and must succeed), so the responses of a batch wait until
every request sharing its mapping is done: with storage that completes a
batch together (page cache, fast devices) that is free; with slow,
reordering storage it delays the early finishers of a batch, the price of
one map and one unmap per batch instead of per request. If a batch mapping
fails (one bad grant fails the whole call) each request is mapped on its
own so only the bad one fails.

With feature-persistent: pages come from the ring's PersistentGrants cache
(mapped once, kept); the pages of a request the full cache cannot take are
mapped together for the request's duration only, and the cache is trimmed
after each batch at a bounded rate (persistent_grants.py).

A request's data becomes extents: one (address, length) per segment,
adjacent ones merged.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from ...blkif.constants import RSP_ERROR, RSP_OKAY, SECTOR_SIZE, XEN_PAGE_SIZE
from ...blkif.request import Segments, WireSegments
from ...xen.interfaces import Gntdev, GrantMapError, GrantMapping
from .copy_lane import CopyLane
from .persistent_grants import PersistentGrants
from .slots import Slot

log = logging.getLogger(__name__)


class _SharedMapping:
    """One batch mapping and the requests using it; unmapped when the last one is done."""

    __slots__ = ("mapping", "users", "parked")

    def __init__(self, mapping: GrantMapping, users: int) -> None:
        self.mapping = mapping
        self.users = users
        self.parked: list = []


def _extents(segments: Segments, page_addrs: Sequence[int]) -> tuple[tuple[int, int], ...]:
    if len(segments) == 1:  # the common 4 KiB case
        _gref, first, last = segments[0]
        return ((page_addrs[0] + first * SECTOR_SIZE, (last - first + 1) * SECTOR_SIZE),)
    out: list[tuple[int, int]] = []
    end = -1
    for (_gref, first, last), page in zip(segments, page_addrs):
        addr = page + first * SECTOR_SIZE
        n = (last - first + 1) * SECTOR_SIZE
        if addr == end:
            a, m = out[-1]
            out[-1] = (a, m + n)
        else:
            out.append((addr, n))
        end = addr + n
    return tuple(out)


class MapDataPath:
    """A DataPath (data_path.py): the storage reads and writes the guest's pages where they are mapped."""

    uses_iovecs = True  # a request's pages are mapped where they fall: several extents
    lane: CopyLane | None = None  # no compiled lane (copy_lane.py is the copy path's)

    def __init__(self, gntdev: Gntdev, domid: int, persistent: PersistentGrants | None = None) -> None:
        self.gntdev = gntdev
        self.domid = domid
        self.persistent = persistent
        self.keeps_grants = persistent is not None

    def prepare(self, slots: list[Slot]) -> list[Slot]:
        """Map the data pages of every data-carrying slot; failures get RSP_ERROR. Never waits."""
        data = [s for s in slots if s.segments and s.status == RSP_OKAY]
        if not data:
            return []
        for slot in data:
            segments = slot.segments
            if type(segments) is WireSegments:  # read page by page below: unpacked once, as plain tuples
                slot.segments = segments.unpacked
        if self.persistent is not None:
            for slot in data:
                self._map_persistent(slot)
        else:
            self._map_group([s for s in data if s.writes], readonly=True)
            self._map_group([s for s in data if not s.writes], readonly=False)
        return []

    def _map_group(self, slots: list[Slot], readonly: bool) -> None:
        if not slots:
            return
        refs = [seg[0] for s in slots for seg in s.segments]
        try:
            mapping = self.gntdev.map_grants(self.domid, refs, readonly=readonly)
        except GrantMapError:
            if len(slots) > 1:
                for slot in slots:  # find the bad one(s): each request on its own
                    self._map_group([slot], readonly)
            else:
                slots[0].status = RSP_ERROR
            return
        shared = _SharedMapping(mapping, len(slots))
        addr = mapping.addr
        for slot in slots:
            n = len(slot.segments)
            slot.mapping = shared
            slot.extents = _extents(slot.segments, range(addr, addr + n * XEN_PAGE_SIZE, XEN_PAGE_SIZE))
            addr += n * XEN_PAGE_SIZE

    def _map_persistent(self, slot: Slot) -> None:
        """Pages from the cache; those a full cache cannot take are mapped for this request only, all
        in ONE map call (one hypercall, one unmap after), not one each.

        slot.mapping becomes a list of what to give back: grefs (ints) held
        in the cache, and the request's temporary mapping.
        """
        assert self.persistent is not None
        acquire = self.persistent.acquire
        held: list = []
        slot.mapping = held
        pages: list[int] = []
        misses: list[int] = []  # positions in pages of the grefs the cache had no room for
        segments = slot.segments
        try:
            for i, (gref, _first, _last) in enumerate(segments):
                addr = acquire(gref)
                if addr is None:  # cache full
                    misses.append(i)
                    addr = 0
                else:
                    held.append(gref)
                pages.append(addr)
            if misses:
                # read-only for a write (the guest may grant its pages so), writable for a read
                m = self.gntdev.map_grants(self.domid, [segments[i][0] for i in misses], readonly=slot.writes)
                held.append(m)
                addr = m.addr
                for i in misses:
                    pages[i] = addr
                    addr += XEN_PAGE_SIZE
        except GrantMapError as e:
            log.debug("persistent map failed: %s", e)
            slot.status = RSP_ERROR
            return
        slot.extents = _extents(segments, pages)

    def finish_lane(self, slots: list[Slot], completions: int, n: int) -> list[Slot] | None:
        return None  # no lane here

    def prepare_held(self, idx) -> list[int] | None:
        return None  # no lane here, so nothing is ever held

    def finish_held(self, completions: int, n: int) -> list[int] | None:
        return None

    def release_large(self, slots: list[Slot]) -> None:
        """(no bounce buffers)"""

    def attach_held(self, slot: Slot, large: int = -1) -> None:
        raise RuntimeError("the map path has no lane: no slot of its ring is ever held")

    def engine_copier(self) -> dict[str, int] | None:
        return None  # (no lane, no engine)

    def engine_grants(self) -> None:
        return None  # (no engine)

    def finish(self, slots: list[Slot]) -> list[Slot]:
        """Release the slots' mappings; return those whose pages are all unmapped (answer them)."""
        ready: list[Slot] = []
        cache = self.persistent
        now = cache.now() if cache is not None else 0.0
        for slot in slots:
            m = slot.mapping
            if m is None:
                ready.append(slot)
            elif type(m) is _SharedMapping:
                slot.mapping = None
                m.parked.append(slot)
                m.users -= 1
                if m.users == 0:
                    m.mapping.close()
                    ready.extend(m.parked)
            else:  # persistent: grefs held in the cache, temporary mappings
                assert cache is not None
                slot.mapping = None
                for held in m:
                    if type(held) is int:
                        cache.release(held, now)
                    else:
                        held.close()
                ready.append(slot)
        if cache is not None:
            cache.trim(now)
        return ready

    def idle(self) -> None:
        """The ring has nothing to do: unmap persistent grants unused for long."""
        if self.persistent is not None:
            self.persistent.purge_unused()

    @property
    def persistent_grants(self) -> int:
        return len(self.persistent) if self.persistent is not None else 0

    def close(self) -> None:
        if self.persistent is not None:
            self.persistent.close()
