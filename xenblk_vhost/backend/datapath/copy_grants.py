"""Persistent grants on the copy path: the frontend's reused pages mapped once, copied by memcpy.

A frontend that negotiated feature-persistent (Linux blkfront does when we
offer it) bounces all its I/O through a fixed set of granted pages and
revokes none while connected. The copy path then has no need of Xen's
grant copy for them: the ring's PersistentGrants cache maps each page once
(read-write, as blkback maps them) and a table in C (native/pgrant_table.c,
struct xk_pgrants) gives the ring engine its address, so the engine's copy
of a segment whose grant is mapped is a memcpy in this process and a batch
whose grants are all mapped makes no grant-copy hypercall at all (on the
rig that call was one of the six kernel calls a QD1 request cost, and at
1 MiB it had Xen copy every byte). Everything else is unchanged: the
region's bounce buffers, the storage requests, any libblkio driver.

A page is mapped before the first request that uses it is served, as
blkback maps it: Linux blkfront (since XSA-396) ends its access to a
persistent grant the backend has not mapped by the time the request
completes, and grants the page anew for the next one, so a page mapped
after its request would never be seen again (the rig's QD1 job once ran
with none mapped). The engine stops before such a request (XB_ENGINE_MAP,
the grefs in the table's miss list; xk_pg_need), the ring worker maps them
(absorb()) and calls it again. A gref that cannot be mapped is entered
with no address, so the engine does not stop for it again (Xen copies it).
The table changes only between engine calls, never during one, which is
what makes the engine's lookups safe without a lock. The reference path
(no engine) keeps copying through Xen: correct for persistent grants too.

Bounds, as PersistentGrants keeps them (blkback's): at most max_grants
pages mapped per ring; a full cache evicts its least recently used 5 %
at most every trim interval (the engine's hits count as uses: its used
flags are swept into the LRU); pages unused for a minute are unmapped when
the ring is idle; all at disconnect. A gref that cannot be mapped (a
hostile frontend's, or one granted read-only) is not tried again until
`refused` fills up (REFUSED_MAX), so a frontend cannot make us pay a failing
map per request; its segments keep going to Xen's copy, which answers for
them. While the cache is full the table is closed (struct xk_pgrants' open):
the engine stops for no page, copies what is not mapped through Xen.
"""

from __future__ import annotations

import logging
from typing import Any

from ...xen.interfaces import GrantMapError
from .persistent_grants import PersistentGrants

log = logging.getLogger(__name__)

# Grefs one engine call records as misses (the table's miss list): more are not recorded (they are
# copied by Xen all the same, and recorded again at their next use).
MISS_ROOM = 1024
# Grefs that could not be mapped, kept in the table with no address (the engine then copies them through Xen without
# stopping for them); at this many they are all forgotten, and tried once more if they come back.
REFUSED_MAX = 64


def _table_slots(max_grants: int) -> int:
    """A power of two at least twice max_grants (linear probing stays short at half full)."""
    n = 64
    while n < 2 * max_grants:
        n *= 2
    return n


class CopyGrants:
    """One ring's persistently mapped grants: the cache (mapping, LRU, bounds) and the engine's table."""

    def __init__(self, cache: PersistentGrants, native_module: Any) -> None:
        ffi, lib = native_module.ffi, native_module.lib
        self._ffi, self._lib = ffi, lib
        self.cache = cache
        nslots = _table_slots(cache.max_grants + REFUSED_MAX)
        self._slots = ffi.new("struct xk_pgrant_slot[]", nslots)
        self._miss = ffi.new("uint32_t[]", MISS_ROOM)
        self._used = ffi.new("uint32_t[]", nslots)
        t = ffi.new("struct xk_pgrants *")
        t.slots = self._slots
        t.mask = nslots - 1
        t.shift = 32 - (nslots.bit_length() - 1)
        t.max = cache.max_grants + REFUSED_MAX  # (the mapped pages, and the refused ones)
        t.miss = self._miss
        t.miss_room = MISS_ROOM
        t.open = 1
        self.t = t
        self.address = int(ffi.cast("uintptr_t", t))
        self.refused: set[int] = set()
        self.mapped = 0  # cumulative: pages mapped (a figure for the notes and tests)
        cache.on_unmap = self._forget

    @classmethod
    def make(cls, gntdev: Any, domid: int, *, max_grants: int, trim_interval: float) -> CopyGrants | None:
        """A ring's, or None where the compiled kernels cannot be had (the copy path then copies through
        Xen, as without feature-persistent: correct, only slower)."""
        from ... import native

        if not native.enabled:
            return None
        try:
            mod = native.load()
        except native.NativeBuildError as e:
            log.warning("persistent grants on the copy path are unavailable: %s", e)
            return None
        return cls(PersistentGrants(gntdev, domid, max_grants=max_grants, trim_interval=trim_interval), mod)

    def __len__(self) -> int:
        return len(self.cache)

    @property
    def hits(self) -> int:
        """Segments the engine copied itself so far."""
        return int(self.t.hits)

    def _forget(self, gref: int) -> None:
        self._lib.xk_pg_del(self.t, gref)

    def absorb(self) -> int:
        """After an engine call: map the grefs it asked for (XB_ENGINE_MAP) or copied through Xen for want of a
        mapping, each once, and let a full cache trim. Every gref the engine stopped for leaves the table's
        unknowns (mapped, or entered without an address) or the table closes: the engine never stops twice
        for the same one. Returns how many were mapped."""
        t = self.t
        n = t.nmiss
        if not n:
            return 0
        misses = set(self._ffi.unpack(self._miss, n))
        t.nmiss = 0
        cache = self.cache
        put = self._lib.xk_pg_put
        refused = self.refused
        mapped = 0
        for gref in misses:
            if gref in refused or gref in cache:
                continue
            try:
                addr = cache.acquire(gref)
            except GrantMapError as e:
                if len(refused) >= REFUSED_MAX:  # (bounded: a frontend cycling through bad grefs pays a map each)
                    for old in refused:
                        self._lib.xk_pg_del(t, old)
                    refused.clear()
                refused.add(gref)
                if put(t, gref, 0) < 0:
                    t.open = 0  # (cannot happen: the table has room for REFUSED_MAX more than the cache)
                log.debug("persistent grant %d not mapped: %s", gref, e)
                continue
            if addr is None:  # the cache is full: closed until trim() below makes room, at its pace
                t.open = 0
                continue
            cache.release(gref)
            if put(t, gref, addr) < 0:
                t.open = 0  # (cannot happen, as above)
            mapped += 1
        self.mapped += mapped
        if cache.overflowed:
            self._sweep_used()
            cache.trim(cache.now())
            if len(cache) < cache.max_grants and len(refused) < REFUSED_MAX:
                t.open = 1
        return mapped

    def _sweep_used(self) -> None:
        """The engine's uses since the last sweep into the cache's LRU."""
        n = self._lib.xk_pg_take_used(self.t, self._used, len(self._used))
        if n:
            now = self.cache.now()
            touch = self.cache.touch
            for gref in self._ffi.unpack(self._used, n):
                touch(gref, now)

    def purge(self) -> int:
        """The ring is idle: unmap the pages unused for long (PersistentGrants.purge_unused)."""
        self._sweep_used()
        purged = self.cache.purge_unused()
        if purged and len(self.cache) < self.cache.max_grants:
            self.t.open = 1
        return purged

    def close(self) -> None:
        """Unmap everything (disconnect): the frontend may then revoke its grants."""
        self.t.open = 0
        self.cache.close()
