"""Persistent grants on the copy path (copy_grants.py, native/pgrant_table.c).

The table the ring engine copies with is held to a dict under random puts and deletes (collisions
and backward-shift deletion included); its copy to a plain grant copy's statuses and bytes; and on the
simulated hypervisor a frontend that negotiated feature-persistent on a copy-path vbd gets its pages
mapped once and copied by the engine, evicted within the bound, all unmapped at disconnect, and a
grant that cannot be mapped still copied through Xen.
"""

from __future__ import annotations

import ctypes
import random

import pytest
import trio

from backend_support.frontend import BACKEND_DOMID, Page, TestFrontend
from backend_support.harness import connected, make_disk_file, make_vbd, read_back
from xenblk_vhost import native
from xenblk_vhost.backend.datapath.copy_grants import MISS_ROOM, REFUSED_MAX, CopyGrants, _table_slots
from xenblk_vhost.backend.datapath.persistent_grants import PersistentGrants
from xenblk_vhost.backend.datapath.ring_engine import ENGINE_ENV
from xenblk_vhost.blkif.constants import OP_READ, OP_WRITE, RSP_OKAY
from xenblk_vhost.sim.grant_table import GTF_reading, GTF_writing
from xenblk_vhost.xen.interfaces import PAGE_SIZE, GrantMapError

GNTCOPY_SOURCE_GREF, GNTCOPY_DEST_GREF = 1, 2


@pytest.fixture
def mod():
    return native.load()


class _Mapping:
    def __init__(self, log: list, gref: int) -> None:
        self.buf = ctypes.create_string_buffer(PAGE_SIZE)
        self.addr = ctypes.addressof(self.buf)
        self.gref = gref
        self._log = log

    def close(self) -> None:
        self._log.append(("unmap", self.gref))


class FakeGntdev:
    """Maps each gref to a page of its own (a ctypes buffer); refuses the grefs in `bad`."""

    def __init__(self, bad=()) -> None:
        self.bad = set(bad)
        self.log: list = []
        self.pages: dict[int, _Mapping] = {}

    def map_grants(self, domid, refs, *, readonly):
        [gref] = refs
        assert not readonly
        self.log.append(("map", gref))
        if gref in self.bad:
            raise GrantMapError(22, f"gref {gref}: GNTST_permission_denied")
        m = self.pages[gref] = _Mapping(self.log, gref)
        return m


def make_grants(mod, gntdev, max_grants=8, **kw) -> CopyGrants:
    return CopyGrants(PersistentGrants(gntdev, 7, max_grants=max_grants, **kw), mod)


def test_the_table_agrees_with_a_dict_through_random_puts_and_deletes(mod):
    ffi, lib = mod.ffi, mod.lib
    rng = random.Random(13)
    for max_grants in (3, 40, 1056):
        grants = make_grants(mod, FakeGntdev(), max_grants=max_grants)
        t = grants.t
        cap = t.max  # (the cache's pages and REFUSED_MAX grefs entered without an address)
        assert cap == max_grants + REFUSED_MAX and t.mask + 1 == _table_slots(cap) >= 2 * cap and t.open == 1
        model: dict[int, int] = {}
        # few distinct grefs (many collisions and re-puts), and some that hash alike (multiples of the table)
        pool = [rng.randrange(1 << 32) for _ in range(cap * 2)] + [k * (t.mask + 1) for k in range(8)]
        pool.append(0xFFFFFFFF)  # (its key would be 0: refused)
        for _ in range(20 * cap + 200):
            gref = rng.choice(pool)
            if rng.random() < 0.55:
                addr = rng.randrange(1, 1 << 48)
                rc = lib.xk_pg_put(t, gref, addr)
                if gref == 0xFFFFFFFF or (gref not in model and len(model) >= cap):
                    assert rc == -1
                else:
                    assert rc == (0 if gref in model else 1)
                    model[gref] = addr
            else:
                assert lib.xk_pg_del(t, gref) == (1 if model.pop(gref, None) is not None else 0)
            assert t.count == len(model)
            probe = rng.choice(pool)
            assert lib.xk_pg_find(t, probe) == model.get(probe, 0)
        for gref, addr in model.items():
            assert lib.xk_pg_find(t, gref) == addr
        # the used flags: those found since the last take, each once
        out = ffi.new("uint32_t[]", t.mask + 1)
        lib.xk_pg_take_used(t, out, t.mask + 1)
        some = list(model)[: max(1, len(model) // 2)] if model else []
        for gref in some:
            lib.xk_pg_find(t, gref)
        n = lib.xk_pg_take_used(t, out, t.mask + 1)
        assert sorted(ffi.unpack(out, n)) == sorted(some)
        assert lib.xk_pg_take_used(t, out, t.mask + 1) == 0


def _seg(ffi, segs, i, *, to_guest, gref, offset, local, length, domid=7, flags=None):
    g = segs[i]
    if to_guest:
        g.source.virt = local
        g.dest.foreign.ref, g.dest.foreign.offset, g.dest.foreign.domid = gref, offset, domid
    else:
        g.source.foreign.ref, g.source.foreign.offset, g.source.foreign.domid = gref, offset, domid
        g.dest.virt = local
    g.len = length
    g.flags = flags if flags is not None else (GNTCOPY_DEST_GREF if to_guest else GNTCOPY_SOURCE_GREF)
    g.status = -99


def test_the_copy_does_mapped_segments_itself_and_leaves_the_rest_to_xen(mod):
    ffi, lib = mod.ffi, mod.lib
    gntdev = FakeGntdev()
    grants = make_grants(mod, gntdev)
    for gref in (10, 11):
        lib.xk_pg_put(grants.t, gref, gntdev.map_grants(7, [gref], readonly=False).addr)
    gntdev.pages[10].buf.raw = bytes(range(256)) * 16
    local = ctypes.create_string_buffer(4 * PAGE_SIZE)
    base = ctypes.addressof(local)
    local[2 * PAGE_SIZE:3 * PAGE_SIZE] = b"\x5a" * PAGE_SIZE
    segs = ffi.new("struct xk_copy_seg[]", 8)
    _seg(ffi, segs, 0, to_guest=False, gref=10, offset=512, local=base, length=1024)          # mapped: in
    _seg(ffi, segs, 1, to_guest=True, gref=11, offset=0, local=base + 2 * PAGE_SIZE, length=4096)  # mapped: out
    _seg(ffi, segs, 2, to_guest=False, gref=12, offset=0, local=base, length=512)              # not mapped
    _seg(ffi, segs, 3, to_guest=True, gref=10, offset=3584, local=base, length=1024)           # crosses its page
    _seg(ffi, segs, 4, to_guest=False, gref=10, offset=0, local=base, length=512, domid=8)     # another domain
    _seg(ffi, segs, 5, to_guest=False, gref=10, offset=0, local=base, length=0)                # nothing to copy
    _seg(ffi, segs, 6, to_guest=False, gref=10, offset=0, local=base, length=512, flags=3)     # gref to gref
    _seg(ffi, segs, 7, to_guest=False, gref=11, offset=4095, local=base + 3 * PAGE_SIZE, length=1)  # its last byte
    rest = ffi.new("struct xk_copy_seg[]", 8)
    idx = ffi.new("uint32_t[]", 8)
    m = lib.xk_pg_copy(grants.t, segs, 8, 7, rest, idx)
    assert list(ffi.unpack(idx, m)) == [2, 3, 4, 5, 6]
    assert [rest[k].source.foreign.ref if rest[k].flags != GNTCOPY_DEST_GREF else rest[k].dest.foreign.ref
            for k in range(m)] == [12, 10, 10, 10, 10]
    assert [segs[i].status for i in (0, 1, 7)] == [0, 0, 0]
    assert [segs[i].status for i in (2, 3, 4, 5, 6)] == [-99] * 5  # (Xen's to say)
    assert local.raw[:1024] == (bytes(range(256)) * 16)[512:1536]
    assert gntdev.pages[11].buf.raw == b"\x5a" * PAGE_SIZE
    assert local.raw[3 * PAGE_SIZE:3 * PAGE_SIZE + 1] == b"\x5a"
    assert grants.hits == 3
    # the misses recorded for the owner to map: the unmapped gref and the mapped ones Xen got anyway
    assert sorted(set(ffi.unpack(grants.t.miss, grants.t.nmiss))) == [10, 12]


def test_absorb_maps_each_miss_once_refuses_bad_ones_and_trims_a_full_cache(mod):
    lib = mod.lib
    now = [100.0]
    gntdev = FakeGntdev(bad={66})
    grants = CopyGrants(PersistentGrants(gntdev, 7, max_grants=4, trim_interval=0.1, clock=lambda: now[0]), mod)
    t = grants.t

    def miss(*grefs):
        for g in grefs:
            t.miss[t.nmiss] = g
            t.nmiss += 1

    miss(1, 2, 1, 66, 2)
    assert grants.absorb() == 2
    assert t.nmiss == 0
    assert sorted(g for op, g in gntdev.log if op == "map") == [1, 2, 66]
    assert lib.xk_pg_find(t, 1) == gntdev.pages[1].addr and lib.xk_pg_find(t, 66) == 0
    assert t.count == 3 and t.open == 1  # (66 entered without an address: the engine stops for it no more)
    miss(66, 3, 4)
    assert grants.absorb() == 2  # 66 not tried again
    assert [g for op, g in gntdev.log if op == "map"].count(66) == 1
    assert len(grants) == 4 and t.count == 5
    # full: 5 is not mapped; the cache trims at its interval, least recently used first (the engine's
    # uses count: 1 and 2 were found since, 3 and 4 were not)
    lib.xk_pg_find(t, 1)
    lib.xk_pg_find(t, 2)
    miss(5)
    now[0] += 1.0
    assert grants.absorb() == 0
    unmapped = [g for op, g in gntdev.log if op == "unmap"]
    assert unmapped == [3]  # (5 % of 4: one entry a trim)
    assert lib.xk_pg_find(t, 3) == 0 and len(grants) == 3 and t.count == 4
    assert t.open == 1  # (closed while full, open again after the trim)
    miss(5)
    assert grants.absorb() == 1 and lib.xk_pg_find(t, 5) == gntdev.pages[5].addr
    miss(6)
    now[0] += 0.01  # (within the trim interval: full, closed)
    assert grants.absorb() == 0 and t.open == 0
    # misses beyond the list's room are not recorded (they go to Xen all the same)
    for g in range(MISS_ROOM + 10):
        if t.nmiss < t.miss_room:
            miss(1000 + g)
    assert t.nmiss == MISS_ROOM
    grants.close()
    assert t.count == 1 and len(grants) == 0 and t.open == 0  # (66's entry, without an address, stays)
    assert sorted(g for op, g in gntdev.log if op == "unmap") == [1, 2, 3, 4, 5]


def _mapped(guest, gref) -> bool:
    return bool(guest.grant_entry(gref).flags & (GTF_reading | GTF_writing))


async def _served(front, ring, k: int) -> None:
    with trio.fail_after(10):
        [r] = await front.responses(ring, 1)
    assert (r.id, r.status) == (k, RSP_OKAY), r


def _complete(front, page: Page) -> Page:
    """What Linux blkfront does with a persistent grant when its request completes (since XSA-396): keep it
    if the backend has it mapped, else end the access and grant the page anew for its next use."""
    if not front.end_access(page):
        return page  # still mapped by the backend: kept, reused as it is
    return Page(page.frame, front.guest.grant_access(page.frame, BACKEND_DOMID, readonly=False), False, front.guest)


@pytest.mark.parametrize("max_grants", [64, 4])
async def test_a_persistent_frontend_on_the_copy_path_is_copied_by_the_engine(tmp_path, guest, platform,
                                                                              monkeypatch, max_grants):
    """Writes and reads through 8 reused pages, one at a time, by a frontend that keeps a persistent grant
    only while the backend has it mapped (Linux blkfront): each page is mapped before its first request is
    served (the engine stops for it: XB_ENGINE_MAP), so blkfront keeps every grant and the engine copies
    every request itself; the data lands where it belongs, the pages stay mapped while connected and none
    after. With room for 4 the cache evicts (at every absorb: trim interval 0) and maps again, and the data is
    still right."""
    monkeypatch.setenv(ENGINE_ENV, "1")
    path = make_disk_file(tmp_path / "disk.img")
    vbd = make_vbd(path, queues=1, data_path="copy", persistent_grants=True, max_persistent_grants=max_grants,
                   persistent_trim_interval=0.0)
    front = TestFrontend(guest, persistent=True)
    pages = front.data_pages(8, readonly=False)
    n = 48
    regranted = 0
    try:
        async with connected(vbd, front, platform):
            assert vbd.features.persistent
            grants = vbd._resources[0].datapath.grants
            assert grants is not None
            for phase, op in enumerate((OP_WRITE, OP_READ)):
                for k in range(n):
                    i = k % 8
                    p = pages[i]
                    p.view[:] = bytes([k + 1]) * PAGE_SIZE if op == OP_WRITE else bytes(PAGE_SIZE)
                    first, last = (0, 7) if op == OP_WRITE else (1, 6)  # (a read of a partial page: its sectors)
                    front.rw(0, op, 1000 * phase + k, 8 * k, [(p.gref, first, last)])
                    front.push()
                    await _served(front, 0, 1000 * phase + k)
                    if op == OP_READ:
                        assert p.bytes() == bytes(512) + bytes([k + 1]) * (6 * 512) + bytes(512), k
                    pages[i] = _complete(front, p)
                    regranted += pages[i] is not p
            total = vbd.stats()["total"]
            assert total["persistent_grants"] == len(grants)
            assert total["copy_segs_mapped"] == grants.hits  # (the operator's counters: ctl stats, Prometheus)
            assert total["copy_segs_mapped"] + total["copy_segs_xen"] == 2 * n  # one segment a request
            if max_grants >= 8:
                assert regranted == 0  # every page mapped before its first request completed: kept by the frontend
                assert grants.mapped == len(grants) == 8  # each page once
                assert grants.hits == 2 * n  # every request copied by the engine itself
            else:
                assert 0 < len(grants) <= max_grants
                assert grants.mapped > 4 and 0 < grants.hits <= 2 * n  # (evicted pages mapped again)
            assert sum(_mapped(guest, p.gref) for p in pages) == len(grants)
        assert not any(_mapped(guest, p.gref) for p in pages)
        assert all(front.end_access(p) for p in pages)
    finally:
        front.close()
        vbd.close()
    for k in range(n):
        assert read_back(path, 8 * k * 512, PAGE_SIZE) == bytes([k + 1]) * PAGE_SIZE


async def test_a_grant_the_backend_cannot_map_is_still_copied_through_xen(tmp_path, guest, platform, monkeypatch):
    """A persistent frontend whose page is granted read-only (the backend maps persistent grants
    read-write): the map is refused once, the write's data still arrives (Xen's copy reads it), and the
    page is never mapped."""
    monkeypatch.setenv(ENGINE_ENV, "1")
    path = make_disk_file(tmp_path / "disk.img")
    vbd = make_vbd(path, queues=1, data_path="copy", persistent_grants=True)
    front = TestFrontend(guest, persistent=True)
    try:
        async with connected(vbd, front, platform):
            grants = vbd._resources[0].datapath.grants
            ro = front.data_page(readonly=True, fill=b"\x33" * PAGE_SIZE)
            for k in range(4):
                front.rw(0, OP_WRITE, k, 8 * k, [(ro.gref, 0, 7)])
                front.push()
                await _served(front, 0, k)
                vbd.stats()  # (the ring back from the engine's thread: its misses to be mapped)
            assert ro.gref in grants.refused and len(grants) == 0 and not _mapped(guest, ro.gref)
    finally:
        front.close()
        vbd.close()
    for k in range(4):
        assert read_back(path, 8 * k * 512, PAGE_SIZE) == b"\x33" * PAGE_SIZE
