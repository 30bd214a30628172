"""Persistent grants: kept mapped across requests, LRU-bounded per ring, purged when unused, all
unmapped at disconnect (checked through the guest's own grant entries: GTF_reading/GTF_writing are
set exactly while the backend maps a page)."""

from __future__ import annotations

from backend_support.frontend import TestFrontend
from backend_support.harness import connected, make_disk_file, make_vbd, read_back
from xenblk_vhost.backend.datapath.persistent_grants import PersistentGrants
from xenblk_vhost.blkif.constants import OP_READ, OP_WRITE, RSP_OKAY
from xenblk_vhost.sim.grant_table import GTF_reading, GTF_writing
from xenblk_vhost.xen.interfaces import PAGE_SIZE


def mapped(guest, gref) -> bool:
    return bool(guest.grant_entry(gref).flags & (GTF_reading | GTF_writing))


async def test_grants_stay_mapped_up_to_the_bound_and_are_released_at_disconnect(tmp_path, platform, guest):
    path = make_disk_file(tmp_path / "disk.img")
    vbd = make_vbd(path, data_path="map", persistent_grants=True, max_persistent_grants=8, queues=1)
    front = TestFrontend(guest, persistent=True)
    pages = front.data_pages(20, readonly=False)
    try:
        async with connected(vbd, front, platform):
            for i in range(40):
                p = pages[i % 20]
                p.view[:] = bytes([i]) * PAGE_SIZE
                front.rw(0, OP_WRITE, i, 8 * i, [(p.gref, 0, 7)])
                front.push()
                assert tuple((await front.responses(0, 1))[0]) == (i, OP_WRITE, RSP_OKAY)
                assert vbd.stats()["total"]["persistent_grants"] == min(i + 1, 8)
            # the most recent page is still mapped: it was not unmapped after its response
            assert mapped(guest, pages[39 % 20].gref)
            assert sum(mapped(guest, p.gref) for p in pages) == 8
            # reads through persistent grants see the data
            p = pages[0]
            front.rw(0, OP_READ, 100, 8 * 25, [(p.gref, 0, 7)])
            front.push()
            assert tuple((await front.responses(0, 1))[0]) == (100, OP_READ, RSP_OKAY)
            assert p.bytes() == bytes([25]) * PAGE_SIZE
        for i in range(40):
            assert read_back(path, 8 * i * 512, PAGE_SIZE) == bytes([i]) * PAGE_SIZE
        assert not any(mapped(guest, p.gref) for p in pages)
        assert all(front.end_access(p) for p in pages)
    finally:
        front.close()
        vbd.close()


async def test_cache_lru_busy_entries_purge_and_close(platform, guest):
    now = [1000.0]
    front = TestFrontend(guest)
    pages = front.data_pages(6, readonly=False)
    cache = PersistentGrants(platform.gntdev, guest.domid, max_grants=4, unused_seconds=60, clock=lambda: now[0])
    try:
        addrs = [cache.acquire(p.gref) for p in pages[:4]]
        assert all(addrs) and len(cache) == 4 and all(mapped(guest, p.gref) for p in pages[:4])
        assert cache.acquire(pages[0].gref) == addrs[0]  # a hit is the same mapping
        # full of busy entries: no room, nothing evicted
        assert cache.acquire(pages[4].gref) is None and len(cache) == 4
        for p in pages[:4]:
            cache.release(p.gref)
        cache.release(pages[0].gref)  # acquired twice
        # full of idle entries: the least recently used one (pages[1]; pages[0] was used again) goes
        assert cache.acquire(pages[4].gref) is not None
        assert pages[1].gref not in cache and pages[0].gref in cache
        assert not mapped(guest, pages[1].gref)
        cache.release(pages[4].gref)
        # at t+30 a new gref evicts the next LRU entry (pages[2]) and is used briefly
        now[0] += 30
        assert cache.acquire(pages[5].gref) is not None
        cache.release(pages[5].gref)
        assert pages[2].gref not in cache and len(cache) == 4
        assert cache.purge_unused() == 0  # nothing is 60 s old yet
        # at t+61: pages 0, 3, 4 (last used at t) are purged, pages[5] (used at t+30) stays
        now[0] += 31
        assert cache.purge_unused() == 3
        assert len(cache) == 1 and pages[5].gref in cache
        assert mapped(guest, pages[5].gref) and not mapped(guest, pages[3].gref)
        cache.close()
        assert len(cache) == 0
        assert not any(mapped(guest, p.gref) for p in pages)
        assert all(front.end_access(p) for p in pages)
    finally:
        cache.close()
        front.close()


async def test_pages_a_full_cache_cannot_take_are_mapped_for_their_direction(tmp_path, platform, guest):
    """With the cache full of busy entries a request's page is mapped for that request only: read-only
    for a write (the guest may grant it read-only), writable for a read (the storage fills it).
    The flag was once inverted: the write's read-only grant could not be mapped (ERROR) and the read
    landed in a read-only mapping (ERROR, EFAULT from io_uring)."""
    path = make_disk_file(tmp_path / "disk.img")
    with open(path, "r+b") as f:
        f.seek(8 * 7 * 512)
        f.write(b"R" * PAGE_SIZE)
    vbd = make_vbd(path, data_path="map", persistent_grants=True, max_persistent_grants=1, queues=1)
    front = TestFrontend(guest, persistent=True)
    busy = front.data_page(readonly=False, fill=b"b" * PAGE_SIZE)
    ro = front.data_page(readonly=True, fill=b"W" * PAGE_SIZE)
    rw = front.data_page(readonly=False, fill=b"x" * PAGE_SIZE)
    try:
        async with connected(vbd, front, platform):
            # one batch: the first request takes the only cache entry, the next two map their own
            front.rw(0, OP_WRITE, 1, 0, [(busy.gref, 0, 7)])
            front.rw(0, OP_WRITE, 2, 8 * 3, [(ro.gref, 0, 7)])
            front.rw(0, OP_READ, 3, 8 * 7, [(rw.gref, 0, 7)])
            front.push()
            got = sorted(tuple(r) for r in await front.responses(0, 3))
            assert got == [(1, OP_WRITE, RSP_OKAY), (2, OP_WRITE, RSP_OKAY), (3, OP_READ, RSP_OKAY)]
            assert rw.bytes() == b"R" * PAGE_SIZE
        assert read_back(path, 8 * 3 * 512, PAGE_SIZE) == b"W" * PAGE_SIZE
        assert all(front.end_access(p) for p in (busy, ro, rw))
    finally:
        front.close()
        vbd.close()
