"""DataPath: how a request's data gets between the guest's pages and the storage.

Two implementations, chosen per vbd (features.data_path) when a ring is set up:

    CopyDataPath (copy_path.py)  grant copy into one libblkio memory region per ring;
                                 the only one vhost-user storage can use
    MapDataPath  (map_path.py)   grant map per batch, or persistent grants (feature-persistent)

The ring worker calls them on batches of slots (slots.py), never on one
request at a time, and never asks which one it has: what differs between
them, it reads here.
"""

from __future__ import annotations

from typing import Protocol

from .copy_grants import CopyGrants
from .copy_lane import CopyLane
from .slots import Slot


class DataPath(Protocol):
    # A request's data may lie in several extents (grant-mapped pages): its storage
    # requests then need iovec arrays. The copy path packs each request in one buffer.
    uses_iovecs: bool
    # It holds persistent grants, whose count the ring reports after each batch.
    keeps_grants: bool
    # The copy path's compiled lane for plain requests (copy_lane.py), or None.
    lane: CopyLane | None

    def prepare(self, slots: list[Slot]) -> list[Slot]:
        """Give the data-carrying slots their extents (write data brought in); a slot whose
        data cannot be reached gets RSP_ERROR. Returns the slots that must wait for memory,
        in ring order (they are offered again, after some slot finishes)."""
        ...

    def finish(self, slots: list[Slot]) -> list[Slot]:
        """The storage is done with these slots: read data out, buffers and mappings back.
        Returns those that may be answered now (a shared mapping answers its slots together)."""
        ...

    def finish_lane(self, slots: list[Slot], completions: int, n: int) -> list[Slot] | None:
        """finish() for n storage completions left in a queue's completion array (at address
        `completions`; their tags index `slots`) when the compiled lane takes them all; else None
        (nothing done: the caller completes them one by one and calls finish())."""
        ...

    # A batch the lane holds (copy_lane.py's hold: its requests only in the lane's table, slots by
    # index); only a path with a lane is asked (the map path answers as if it had none).
    def prepare_held(self, idx) -> list[int] | None:
        """prepare() for the held slots idx (uint16 array): the writes' data in. The slots whose copy
        failed ([] if none), or None: refused (nothing done; the caller fills the Slots)."""
        ...

    def finish_held(self, completions: int, n: int) -> list[int] | None:
        """finish_lane() for n completions all of held slots: the reads' data out. The slots whose
        copy failed ([] if none), or None: not all are held successes (nothing done)."""
        ...

    def release_large(self, slots: list[Slot]) -> None:
        """Give back the large buffers these slots hold, unused (a held batch that prepare() redoes)."""
        ...

    def attach_held(self, slot: Slot, large: int = -1) -> None:
        """The data fields prepare() gives a lane slot, for a held slot being given its fields (large:
        the large buffer the ring engine gave a held indirect request, -1: none)."""
        ...

    def engine_copier(self) -> dict[str, int] | None:
        """How the ring engine (ring_engine.py) runs this path's grant copies, or None: no engine."""
        ...

    def engine_grants(self) -> CopyGrants | None:
        """The persistently mapped grants the ring engine copies to and from itself (copy_grants.py), or None."""
        ...

    def idle(self) -> None:
        """The ring has nothing to do: drop what is kept only for speed (stale persistent grants)."""
        ...

    @property
    def persistent_grants(self) -> int:
        """Persistent grants mapped now (0 for a path that keeps none)."""
        ...

    def close(self) -> None:
        """Release everything (at disconnect, after every slot was finished)."""
        ...
