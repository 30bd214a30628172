"""The per-ring persistent grant cache (feature-persistent), as Linux blkback keeps it.

A frontend that negotiated feature-persistent reuses a fixed set of granted
pages for all its I/O and never revokes them while connected, so the
backend maps each gref once and keeps it: no map/unmap (and no TLB
shootdown) per request. Each gref is its own mapping, so entries can be
evicted one by one.

Bounds, after blkback (blkback.c):
  * at most `max_grants` (max_persistent_grants, 1056) mapped per ring; a
    request needing a gref beyond that gets a temporary mapping for its
    own duration (blkback: "mapping as non-persistent"). acquire() never
    evicts: a frontend cycling through more grefs than the cache holds
    (QD8 of 1 MiB requests: 2048) would otherwise evict, on every miss,
    exactly the idle entries it is about to reuse, and pay a map, an unmap
    and an LRU scan per page instead of per request (the sequential
    collapse of issue 13: ~40 I/Os per second);
  * once a gref found the cache full, trim() (called after each batch)
    evicts the least recently used entries that no request is using, 5%
    at a time, at most every `trim_interval` (blkback purges from its
    ring thread every LRU_INTERVAL, 100 ms): the cache follows a changing
    working set slowly, at a bounded cost;
  * entries unused for `unused_seconds` (blkback's
    persistent_grant_unused_seconds, 60) are unmapped by purge_unused(),
    which the ring calls when it is idle.
Everything left is unmapped by close() at disconnect.

Mapped read-write: a persistent page serves reads and writes alike (blkback
maps them without GNTMAP_readonly; blkfront grants them writable).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable

from ...xen.interfaces import GrantMapError

DEFAULT_MAX_GRANTS = 1056
DEFAULT_UNUSED_SECONDS = 60.0
DEFAULT_TRIM_INTERVAL = 0.1
PURGE_FRACTION = 0.05


class _Entry:
    __slots__ = ("mapping", "addr", "users", "last_used")

    def __init__(self, mapping) -> None:
        self.mapping = mapping
        self.addr = mapping.addr
        self.users = 0
        self.last_used = 0.0


class PersistentGrants:
    def __init__(self, gntdev, domid: int, *, max_grants: int = DEFAULT_MAX_GRANTS,
                 unused_seconds: float = DEFAULT_UNUSED_SECONDS, trim_interval: float = DEFAULT_TRIM_INTERVAL,
                 clock=time.monotonic, on_unmap: Callable[[int], None] | None = None) -> None:
        self.gntdev = gntdev
        # Told each gref just before its page is unmapped (the copy path's table forgets it: copy_grants.py).
        self.on_unmap = on_unmap
        self.domid = domid
        self.max_grants = max_grants
        self.unused_seconds = unused_seconds
        self.trim_interval = trim_interval
        self._clock = clock
        self._entries: OrderedDict[int, _Entry] = OrderedDict()
        self.overflowed = False  # a gref found the cache full since the last trim
        self._last_trim = clock()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, gref: int) -> bool:
        return gref in self._entries

    def acquire(self, gref: int) -> int | None:
        """Address of gref's page, mapping it if needed; None if the cache is full (map it for the
        request only). Never evicts (see trim()).

        Raises GrantMapError if the page cannot be mapped. Pair with release().
        """
        entry = self._entries.get(gref)
        if entry is None:
            if len(self._entries) >= self.max_grants:
                self.overflowed = True
                return None
            entry = _Entry(self.gntdev.map_grants(self.domid, (gref,), readonly=False))
            self._entries[gref] = entry
        else:
            self._entries.move_to_end(gref)
        entry.users += 1
        return entry.addr

    def now(self) -> float:
        """The cache's clock (read once per batch by callers that release many)."""
        return self._clock()

    def release(self, gref: int, now: float | None = None) -> None:
        entry = self._entries[gref]
        entry.users -= 1
        entry.last_used = self._clock() if now is None else now

    def touch(self, gref: int, now: float) -> None:
        """gref's page was used (by someone that does not acquire: the ring engine's copies) at now."""
        entry = self._entries.get(gref)
        if entry is not None:
            self._entries.move_to_end(gref)
            entry.last_used = now

    def _unmap(self, gref: int) -> None:
        entry = self._entries.pop(gref)
        if self.on_unmap is not None:
            self.on_unmap(gref)
        entry.mapping.close()

    def trim(self, now: float) -> int:
        """If a gref found the cache full and trim_interval has passed since the last trim, unmap up to
        5% of the entries, least recently used first, skipping busy ones; returns how many.

        Cheap when there is nothing to do (the ring calls it after every batch).
        """
        if not self.overflowed or now - self._last_trim < self.trim_interval:
            return 0
        self._last_trim = now
        self.overflowed = False
        want = max(1, int(self.max_grants * PURGE_FRACTION))
        victims = []
        for gref, entry in self._entries.items():
            if entry.users == 0:
                victims.append(gref)
                if len(victims) >= want:
                    break
        for gref in victims:
            self._unmap(gref)
        return len(victims)

    def purge_unused(self) -> int:
        """Unmap entries nobody used for unused_seconds; returns how many."""
        horizon = self._clock() - self.unused_seconds
        stale = [g for g, e in self._entries.items() if e.users == 0 and e.last_used < horizon]
        for gref in stale:
            self._unmap(gref)
        return len(stale)

    def close(self) -> None:
        """Unmap everything (disconnect). Entries still in use are a caller bug but are unmapped too."""
        for gref in list(self._entries):
            self._unmap(gref)


__all__ = ["PersistentGrants", "GrantMapError", "DEFAULT_MAX_GRANTS"]
