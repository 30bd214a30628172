"""A guest-side test frontend: the shared rings driven directly, as blkfront would.

It lives in the test process but reaches the backend only through the
simulated hypervisor: its memory is the guest domain's memfd, its grants
are entries in the guest's grant table that the backend's SimGntdev checks,
its event channels are the hypervisor's. So the backend cannot tell it from
a real guest; and unlike the reference blkfront, it sends whatever it is
told to (bad segments, unknown ops, lying indices).

    guest = Guest.create(hv_socket, pages=1024)
    front = TestFrontend(guest, Abi.NATIVE, order=0, nrings=1)
    spec = front.spec()                       # hand to Vbd.serve
    page = front.data_page(readonly=True, fill=b"...")   # (frame, gref)
    front.rw(0, OP_WRITE, id=1, sector=8, segments=[(page.gref, 0, 7)])
    [rsp] = await front.responses(0, 1)
"""

from __future__ import annotations

from dataclasses import dataclass, field

import trio

from xenblk_vhost.backend.contract import ConnectionSpec, RingSpec
from xenblk_vhost.blkif.abi import Abi
from xenblk_vhost.blkif.encode import RequestEncoder, encode_segments
from xenblk_vhost.blkif.response import Response
from xenblk_vhost.blkif.ring import FrontRing
from xenblk_vhost.sim.guest import Guest
from xenblk_vhost.xen.interfaces import PAGE_SIZE

BACKEND_DOMID = 0


@dataclass
class Page:
    frame: int
    gref: int
    readonly: bool
    guest: Guest = field(repr=False)

    @property
    def view(self) -> memoryview:
        return self.guest.page(self.frame)

    def bytes(self) -> bytes:
        return bytes(self.view)


def _contiguous_frames(guest: Guest, n: int) -> list[int]:
    """n frames in a row (the ring's pages are one contiguous view here); the rest go back."""
    want = n
    while True:
        got = guest.alloc_pages(min(want, guest.npages))
        ordered = sorted(got)
        for i in range(len(ordered) - n + 1):
            if ordered[i + n - 1] - ordered[i] == n - 1:
                run = ordered[i:i + n]
                guest.free_pages([f for f in got if f not in run])
                return run
        guest.free_pages(got)
        if want >= guest.npages:
            raise RuntimeError(f"no {n} contiguous free frames in the guest")
        want *= 4


class FrontRingSide:
    """One ring of the frontend: its pages, grants, port and FrontRing."""

    def __init__(self, guest: Guest, abi: Abi, order: int, index: int) -> None:
        npages = 1 << order
        frames = _contiguous_frames(guest, npages)
        self.index = index
        self.frames = frames
        self.refs = tuple(guest.grant_access(f, BACKEND_DOMID, readonly=False) for f in frames)
        self.port = guest.alloc_unbound(BACKEND_DOMID)
        self.view = guest.memory[frames[0] * PAGE_SIZE:(frames[0] + npages) * PAGE_SIZE]
        self.ring = FrontRing(self.view, abi, order)
        self.enc = RequestEncoder(abi)

    def spec(self) -> RingSpec:
        return RingSpec(self.index, self.refs, self.port.local_port)

    def revoke_and_regrant(self, guest: Guest) -> bool:
        """End access to the ring pages (False if the backend still maps them), then grant them anew."""
        if not all(guest.end_access(ref) for ref in self.refs):
            return False
        self.refs = tuple(guest.grant_access(f, BACKEND_DOMID, readonly=False) for f in self.frames)
        return True


class TestFrontend:
    __test__ = False  # not a pytest class

    def __init__(self, guest: Guest, abi: Abi = Abi.NATIVE, *, order: int = 0, nrings: int = 1,
                 persistent: bool = False) -> None:
        self.guest = guest
        self.abi = abi
        self.persistent = persistent
        self.rings = [FrontRingSide(guest, abi, order, i) for i in range(nrings)]

    def spec(self) -> ConnectionSpec:
        return ConnectionSpec(self.guest.domid, self.abi, self.persistent, tuple(r.spec() for r in self.rings))

    # ---- data pages ----

    def data_page(self, *, readonly: bool, fill: bytes | None = None) -> Page:
        [frame] = self.guest.alloc_pages(1)
        page = self.guest.page(frame)
        page[:] = (fill or bytes(PAGE_SIZE)).ljust(PAGE_SIZE, b"\0")[:PAGE_SIZE]
        gref = self.guest.grant_access(frame, BACKEND_DOMID, readonly=readonly)
        return Page(frame, gref, readonly, self.guest)

    def data_pages(self, n: int, *, readonly: bool, fills: list[bytes] | None = None) -> list[Page]:
        return [self.data_page(readonly=readonly, fill=fills[i] if fills else None) for i in range(n)]

    def end_access(self, page: Page) -> bool:
        return self.guest.end_access(page.gref)

    # ---- requests (written into the slot, published by push) ----

    def rw(self, ring: int, op: int, id: int, sector: int, segments, **kw) -> None:
        r = self.rings[ring]
        r.enc.rw(r.ring.view, r.ring.claim_request_slot(), op, id, sector, segments, **kw)

    def discard(self, ring: int, id: int, sector: int, nr_sectors: int, **kw) -> None:
        r = self.rings[ring]
        r.enc.discard(r.ring.view, r.ring.claim_request_slot(), id, sector, nr_sectors, **kw)

    def indirect(self, ring: int, indirect_op: int, id: int, sector: int, segments, *,
                 nr_segments: int | None = None, **kw) -> list[Page]:
        """An indirect request: its segments go in fresh read-only indirect pages (returned)."""
        raw = encode_segments(segments)
        pages = []
        for off in range(0, max(len(raw), 1), PAGE_SIZE):
            pages.append(self.data_page(readonly=True, fill=raw[off:off + PAGE_SIZE]))
        r = self.rings[ring]
        r.enc.indirect(r.ring.view, r.ring.claim_request_slot(), indirect_op, id, sector,
                       len(segments) if nr_segments is None else nr_segments,
                       [p.gref for p in pages], **kw)
        return pages

    def other(self, ring: int, op: int, id: int) -> None:
        r = self.rings[ring]
        r.enc.other(r.ring.view, r.ring.claim_request_slot(), op, id)

    def push(self, ring: int = 0) -> None:
        r = self.rings[ring]
        if r.ring.push_requests():
            r.port.notify()

    def kick(self, ring: int = 0) -> None:
        """Notify regardless of the event index (a frontend may always do that)."""
        self.rings[ring].port.notify()

    # ---- responses ----

    async def responses(self, ring: int, count: int, timeout: float = 10.0) -> list[Response]:
        """Wait for exactly `count` more responses on `ring` (fails on timeout)."""
        r = self.rings[ring]
        out: list[Response] = []
        with trio.fail_after(timeout):
            while len(out) < count:
                out += r.ring.take_responses(count - len(out))
                if len(out) >= count:
                    break
                if r.ring.final_check_for_responses():
                    continue
                await r.port.wait()
        return out

    async def no_response(self, ring: int, within: float = 0.2) -> bool:
        """True if no response arrives on `ring` within `within` seconds."""
        r = self.rings[ring]
        with trio.move_on_after(within):
            while True:
                if r.ring.take_responses(1):
                    return False
                if r.ring.final_check_for_responses():
                    continue
                await r.port.wait()
        return True

    def close(self) -> None:
        for r in self.rings:
            r.view.release()
