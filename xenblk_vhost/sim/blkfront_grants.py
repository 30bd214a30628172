"""Guest pages the frontend grants to the backend, and when it takes them back.

Linux xen-blkfront keeps, per ring, a list of `struct grant` entries (a
page and a grant ref or INVALID_GRANT_REF) and follows one rule at
completion (blkif_completion): try to end foreign access on every grant the
request used.
- If that fails, the backend still maps the page. With feature-persistent
  negotiated that is the backend keeping it as a persistent grant: the
  entry goes to the head of the list, gref kept, to be reused first.
  Without it, it is a backend bug: "backed has not unmapped grant" and the
  device is disabled. GrantPool raises GrantStillMapped.
- If it succeeds, the gref is dropped and the entry goes to the tail; the
  next user grants the page afresh.

GrantPool is that list. Where we differ from Linux (see the report in
blkfront.py's docstring): pages are allocated lazily up to the bound Linux
allocates eagerly, and without persistent grants a page that carries write
data or indirect segments is granted read-only (Linux grants every page
read-write), so a backend that maps them writable is caught.
"""

from __future__ import annotations

from collections import deque
from typing import Protocol


class GuestGrants(Protocol):
    """What the frontend needs from its (simulated) guest kernel."""

    def alloc_pages(self, n: int) -> list[int]:
        """n free guest frames (MemoryError if there are not enough)."""

    def free_pages(self, frames: list[int]) -> None: ...

    def page(self, frame: int) -> memoryview:
        """A writable 4 KiB view of guest frame `frame`."""

    def grant_access(self, frame: int, domid: int, readonly: bool) -> int:
        """Grant `domid` access to `frame`; returns the grant ref."""

    def end_access(self, gref: int) -> bool:
        """Revoke a grant; False (nothing changed) if the grantee still maps it."""


class GrantStillMapped(RuntimeError):
    """The backend kept a grant mapped that it had no business keeping."""

    def __init__(self, gref: int, why: str) -> None:
        super().__init__(f"backend has not unmapped grant {gref}: {why}")
        self.gref = gref


class GrantedPage:
    """One `struct grant`: a guest page and its grant ref (None when not granted)."""

    __slots__ = ("frame", "view", "gref", "readonly")

    def __init__(self, frame: int, view: memoryview) -> None:
        self.frame = frame
        self.view = view
        self.gref: int | None = None
        self.readonly = False


class GrantPool:
    """One ring's grant entries, used as blkfront uses its `rinfo->grants`.

    `limit` is how many entries Linux would allocate for the ring
    ((segments + indirect pages) x ring size); we create them on demand.
    """

    def __init__(self, guest: GuestGrants, backend_domid: int, *, persistent: bool, limit: int) -> None:
        self._guest = guest
        self._domid = backend_domid
        self.persistent = persistent
        self.limit = limit
        self._entries: deque[GrantedPage] = deque()
        self.created = 0
        self.persistent_count = 0  # rinfo->persistent_gnts_c: free entries still granted
        self.grants_issued = 0

    def get(self, *, readonly: bool) -> GrantedPage:
        """get_grant(): an entry whose page is granted to the backend.

        A free entry still granted from before (a persistent grant) is used
        as is: it was granted read-write. Otherwise the page is granted now,
        read-only if asked and persistence is off.
        """
        if self._entries:
            page = self._entries.popleft()
            if page.gref is not None:
                self.persistent_count -= 1
                return page
        elif self.created < self.limit:
            [frame] = self._guest.alloc_pages(1)
            page = GrantedPage(frame, self._guest.page(frame))
            self.created += 1
        else:
            # blkfront BUG_ON(list_empty(&rinfo->grants)): the ring's id pool
            # bounds how many entries can be out at once.
            raise RuntimeError(f"grant pool exhausted ({self.limit} entries)")
        page.readonly = readonly and not self.persistent
        page.gref = self._guest.grant_access(page.frame, self._domid, page.readonly)
        self.grants_issued += 1
        return page

    def put(self, page: GrantedPage) -> None:
        """blkif_completion's rule for one grant the finished request used."""
        assert page.gref is not None
        if not self._guest.end_access(page.gref):
            if not self.persistent:
                # The entry is lost to us: the page stays with the backend.
                page.view.release()
                raise GrantStillMapped(page.gref, "request completed, no persistent grants negotiated")
            self._entries.appendleft(page)
            self.persistent_count += 1
            return
        page.gref = None
        self._entries.append(page)

    def release_all(self) -> list[GrantStillMapped]:
        """blkif_free_ring: revoke every grant of the free entries and give
        the frames back. Called after the backend closed, when it must have
        unmapped everything; each grant it still maps is returned as an
        error (and its frame is not reused)."""
        errors = []
        while self._entries:
            page = self._entries.popleft()
            page.view.release()
            if page.gref is not None:
                if not self._guest.end_access(page.gref):
                    errors.append(GrantStillMapped(page.gref, "still mapped after the backend closed"))
                    continue
                page.gref = None
            self._guest.free_pages([page.frame])
        self.persistent_count = 0
        return errors

    def forget(self, page: GrantedPage) -> GrantStillMapped | None:
        """Take back an entry of a request that never completed (teardown).

        Like release_all, lets go of our view of the page either way: the
        guest's memory must be closable once the device is gone."""
        page.view.release()
        if page.gref is not None and not self._guest.end_access(page.gref):
            return GrantStillMapped(page.gref, "in-flight request's grant still mapped after the backend closed")
        page.gref = None
        self._guest.free_pages([page.frame])
        return None
