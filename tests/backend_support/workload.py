"""A randomized, checkable blkif workload: the frontend side, a model disk, byte-for-byte checks.

Each round puts a batch of requests with disjoint sector ranges on a ring
(so their completion order cannot matter), waits for every response, checks
each status, checks every read's pages against the model, and updates the
model with every write. The caller compares the backing file with the model
at the end.

Data pages follow blkfront's two habits:
  * without persistent grants, each request grants fresh pages (read-only for
    writes) and revokes them once answered: end_access must succeed then,
    or the backend kept a grant mapped past its response;
  * with persistent grants, a fixed pool of writable pages is granted once
    and reused; revoked only after disconnect.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from xenblk_vhost.blkif.constants import (
    OP_DISCARD,
    OP_FLUSH_DISKCACHE,
    OP_INDIRECT,
    OP_READ,
    OP_WRITE,
    OP_WRITE_BARRIER,
    RSP_OKAY,
    SECTOR_SIZE,
)
from xenblk_vhost.xen.interfaces import PAGE_SIZE

from .frontend import Page, TestFrontend


@dataclass
class Sent:
    id: int
    op: int  # the op echoed in the response (indirect: the indirect op)
    sector: int
    segments: list  # (Page, first, last)
    aux_pages: list  # indirect pages


class PagePool:
    """Where a request's data pages come from, per blkfront's habits (see module doc)."""

    def __init__(self, front: TestFrontend, persistent: bool, size: int = 500) -> None:
        self.front = front
        self.persistent = persistent
        self.free: list[Page] = front.data_pages(size, readonly=False) if persistent else []
        self.all = list(self.free)

    def take(self, writes: bool, fill: bytes) -> Page:
        if self.persistent:
            page = self.free.pop()
            page.view[:] = fill
            return page
        return self.front.data_page(readonly=writes, fill=fill)

    def give_back(self, page: Page) -> None:
        if self.persistent:
            self.free.append(page)
            return
        assert self.front.end_access(page), f"gref {page.gref} still mapped after its response"
        self.front.guest.free_pages([page.frame])

    def revoke_all(self) -> None:
        for page in self.all:
            assert self.front.end_access(page), f"persistent gref {page.gref} still mapped after disconnect"
        self.front.guest.free_pages([p.frame for p in self.all])
        self.all, self.free = [], []


class Workload:
    def __init__(self, front: TestFrontend, model: bytearray, *, seed: int, persistent: bool = False,
                 indirect_max: int = 0, discard: bool = True, barrier: bool = True) -> None:
        self.front = front
        self.model = model
        self.rng = random.Random(seed)
        self.pool = PagePool(front, persistent)
        self.indirect_max = indirect_max
        self.discard = discard
        self.barrier = barrier
        self.next_id = 1000
        self.counts: dict[str, int] = {}
        self._deck: list[str] = []
        self.response_timeout = 10.0  # seconds a round waits for its responses

    @property
    def sectors(self) -> int:
        return len(self.model) // SECTOR_SIZE

    def _segments(self, n: int) -> list[tuple[int, int]]:
        """n (first, last) pairs; inner ones may be partial pages, as Linux bios can be."""
        return [(f, self.rng.randint(f, 7)) for f in (self.rng.randint(0, 7) for _ in range(n))]

    def _next_kind(self) -> str:
        """Kinds are dealt from shuffled decks, so every kind comes up every 8 requests."""
        if not self._deck:
            self._deck = ["read", "write", "read", "write", "flush", "barrier", "discard", "indirect"]
            self.rng.shuffle(self._deck)
        return self._deck.pop()

    def _count(self, kind: str) -> None:
        self.counts[kind] = self.counts.get(kind, 0) + 1

    async def round(self, ring: int, nreq: int, share: tuple[int, int] = (0, 1)) -> None:
        """nreq requests on `ring`, within part share[0] of share[1] equal parts of the disk
        (rings running rounds concurrently must use different parts)."""
        rng = self.rng
        front = self.front
        # disjoint sector windows for this round
        part = self.sectors // share[1]
        window = part // nreq
        sent: list[Sent] = []
        for k in range(nreq):
            base = share[0] * part + k * window
            self.next_id += 1
            id_ = self.next_id
            kind = self._next_kind()
            if kind == "barrier" and not self.barrier:
                kind = "flush"
            if kind == "discard" and not self.discard:
                kind = "write"
            if kind == "indirect" and not self.indirect_max:
                kind = "read"
            if kind in ("read", "write", "indirect"):
                writes = kind == "write" or (kind == "indirect" and rng.random() < 0.5)
                nseg = rng.randint(12, self.indirect_max) if kind == "indirect" else rng.randint(1, 11)
                segs = self._segments(nseg)
                nsect = sum(last - first + 1 for first, last in segs)
                if nsect > window:
                    segs = [(0, 7)]
                    nsect = 8
                sector = base + rng.randint(0, window - nsect)
                pages = []
                pos = sector * SECTOR_SIZE
                for first, last in segs:
                    n = (last - first + 1) * SECTOR_SIZE
                    fill = bytearray(rng.randbytes(PAGE_SIZE))
                    page = self.pool.take(writes, bytes(fill))
                    pages.append((page, first, last))
                    pos += n
                op = OP_WRITE if writes else OP_READ
                wire = [(p.gref, first, last) for p, first, last in pages]
                aux = []
                if kind == "indirect":
                    aux = front.indirect(ring, op, id_, sector, wire)
                else:
                    front.rw(ring, op, id_, sector, wire)
                sent.append(Sent(id_, op, sector, pages, aux))
                self._count(kind + ("-write" if writes and kind == "indirect" else ""))
            elif kind in ("flush", "barrier"):
                op = OP_FLUSH_DISKCACHE if kind == "flush" else OP_WRITE_BARRIER
                pages = []
                sector = 0
                if rng.random() < 0.5:  # with data (what blkfront sends for a FUA write)
                    sector = base
                    fill = rng.randbytes(PAGE_SIZE)
                    pages = [(self.pool.take(True, fill), 0, 7)]
                front.rw(ring, op, id_, sector, [(p.gref, first, last) for p, first, last in pages])
                sent.append(Sent(id_, op, sector, pages, []))
                self._count(kind + ("-data" if pages else ""))
            else:
                nsect = rng.randint(1, min(window, 64))
                sector = base + rng.randint(0, window - nsect)
                front.discard(ring, id_, sector, nsect)
                sent.append(Sent(id_, OP_DISCARD, sector, [(None, 0, nsect - 1)], []))
                self._count("discard")
        front.push(ring)
        responses = await front.responses(ring, len(sent), self.response_timeout)
        by_id = {r.id: r for r in responses}
        assert len(by_id) == len(sent), "duplicate or missing responses"
        for s in sent:
            r = by_id[s.id]
            assert (r.op, r.status) == (s.op, RSP_OKAY), (s, r)
            self._apply(s)

    def _apply(self, s: Sent) -> None:
        model = self.model
        if s.op == OP_DISCARD:
            _page, _f, last = s.segments[0]
            start = s.sector * SECTOR_SIZE
            model[start:start + (last + 1) * SECTOR_SIZE] = bytes((last + 1) * SECTOR_SIZE)
            return
        pos = s.sector * SECTOR_SIZE
        for page, first, last in s.segments:
            n = (last - first + 1) * SECTOR_SIZE
            data = page.view[first * SECTOR_SIZE:first * SECTOR_SIZE + n]
            if s.op == OP_READ:
                assert bytes(data) == bytes(model[pos:pos + n]), f"read id {s.id} got wrong data at byte {pos}"
            else:
                model[pos:pos + n] = data
            pos += n
            self.pool.give_back(page)
        for page in s.aux_pages:
            assert self.front.end_access(page), "indirect page still mapped after the response"
            self.front.guest.free_pages([page.frame])


__all__ = ["Workload", "PagePool", "OP_INDIRECT"]
