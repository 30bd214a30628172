"""A ring handed to a hostile test: any bytes in any slot, any index published.

Obtained from a connected frontend with `async with front.raw_ring(q) as raw:`
(blkfront.py), which stops the ring's normal reaper for the duration and
resynchronises the ring afterwards. Nothing here checks anything: the
point is to send the backend what a buggy or malicious guest would.

    off = raw.write_slot(index, b"...")          raw bytes at the slot for `index`
    raw.encoder.rw(raw.view, raw.slot_offset(i), op, id, sector, segs)  (any field values)
    first = raw.queue(slots)                     write slots at req_prod_pvt onwards
    raw.publish(); raw.set_req_prod(2**32 - 1)   publish honestly, or anything at all
    raw.notify()
    page = raw.grant_page(readonly=True, data=b"...")   a page to name in segments
    rsps = await raw.responses(count=3, timeout=2)       whatever arrives (maybe fewer)
"""

from __future__ import annotations

import struct

import trio

from ..blkif.abi import SRING
from ..blkif.constants import U32_MASK
from ..blkif.response import Response
from ..blkif.ring import FrontRing
from .blkfront_grants import GrantedPage, GuestGrants
from .blkfront_ring import FrontendRing

_IDX = struct.Struct("<I")


class RawRing:
    def __init__(self, ring: FrontendRing, guest: GuestGrants, backend_domid: int) -> None:
        self.frontend_ring = ring
        self.ring: FrontRing = ring.ring
        self.view = self.ring.view
        self.encoder = ring.encoder
        self.abi = ring.abi
        self.size = ring.size
        self.entry_size = ring.entry_size
        self.channel = ring.channel
        self._guest = guest
        self._backend = backend_domid
        self._pages: list[GrantedPage] = []

    @property
    def backend_domid(self) -> int:
        return self._backend

    # ---- slots and indices ----------------------------------------------------------------

    def slot_offset(self, index: int) -> int:
        return self.ring.slot_offset(index)

    def write_slot(self, index: int, raw: bytes) -> int:
        """Write raw bytes at the start of the slot `index` names; returns its offset."""
        if len(raw) > self.entry_size:
            raise ValueError(f"{len(raw)} bytes do not fit a {self.entry_size}-byte slot")
        off = self.slot_offset(index)
        self.view[off:off + len(raw)] = raw
        return off

    def queue(self, slots: list[bytes]) -> int:
        """Write whole slots at req_prod_pvt onwards (not yet published); returns the first index."""
        first = self.ring.req_prod_pvt
        for i, raw in enumerate(slots):
            self.write_slot(first + i, raw.ljust(self.entry_size, b"\0"))
        self.ring.req_prod_pvt = (first + len(slots)) & U32_MASK
        return first

    @property
    def req_prod(self) -> int:
        return self.ring.req_prod

    @property
    def rsp_prod(self) -> int:
        return self.ring.rsp_prod

    @property
    def req_event(self) -> int:
        return self.ring.req_event

    @property
    def rsp_event(self) -> int:
        return self.ring.rsp_event

    def set_req_prod(self, value: int) -> None:
        """Publish any req_prod at all (the private index follows it)."""
        _IDX.pack_into(self.view, SRING.offset("req_prod"), value & U32_MASK)
        self.ring.req_prod_pvt = value & U32_MASK

    def set_rsp_event(self, value: int) -> None:
        _IDX.pack_into(self.view, SRING.offset("rsp_event"), value & U32_MASK)

    def publish(self) -> bool:
        """RING_PUSH_REQUESTS_AND_CHECK_NOTIFY; True if the backend asked for a kick."""
        return self.ring.push_requests()

    def notify(self) -> None:
        self.channel.notify()

    # ---- pages ----------------------------------------------------------------------------

    def grant_page(self, *, readonly: bool = False, data: bytes = b"") -> GrantedPage:
        """A fresh guest page granted to the backend, optionally filled."""
        [frame] = self._guest.alloc_pages(1)
        page = GrantedPage(frame, self._guest.page(frame))
        page.view[:] = bytes(len(page.view))
        page.view[:len(data)] = data
        page.readonly = readonly
        page.gref = self._guest.grant_access(frame, self._backend, readonly)
        self._pages.append(page)
        return page

    def end_access(self, page: GrantedPage) -> bool:
        assert page.gref is not None
        return self._guest.end_access(page.gref)

    def release(self) -> list[int]:
        """Revoke every page granted here; returns the grefs the backend still maps."""
        still = []
        for page in self._pages:
            page.view.release()
            if page.gref is not None and not self._guest.end_access(page.gref):
                still.append(page.gref)
                continue
            self._guest.free_pages([page.frame])
        self._pages.clear()
        return still

    # ---- responses ------------------------------------------------------------------------

    def take_responses(self) -> list[Response]:
        """Whatever responses are published now (RingOverflow if rsp_prod is bogus)."""
        out = self.ring.take_responses(self.size)
        self.ring.final_check_for_responses()
        return out

    async def responses(self, *, count: int = 1, timeout: float = 5.0) -> list[Response]:
        """Collect responses until `count` arrived or `timeout` passed."""
        out: list[Response] = self.take_responses()
        with trio.move_on_after(timeout):
            while len(out) < count:
                await self.channel.wait()
                out += self.take_responses()
        return out
