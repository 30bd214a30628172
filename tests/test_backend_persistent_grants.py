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
    # no trim during the test (it would evict one idle entry per interval: timing-dependent)
    vbd = make_vbd(path, data_path="map", persistent_grants=True, max_persistent_grants=8,
                   persistent_trim_interval=1e9, queues=1)
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
            # the first 8 pages stay mapped after their responses; the later ones (no room) were mapped
            # for their request only
            assert all(mapped(guest, p.gref) for p in pages[:8])
            assert not any(mapped(guest, p.gref) for p in pages[8:])
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


async def test_cache_full_maps_nothing_more_trims_lru_at_its_interval_purges_and_closes(platform, guest):
    now = [1000.0]
    front = TestFrontend(guest)
    pages = front.data_pages(6, readonly=False)
    cache = PersistentGrants(platform.gntdev, guest.domid, max_grants=4, unused_seconds=60, trim_interval=0.1,
                             clock=lambda: now[0])
    try:
        addrs = [cache.acquire(p.gref) for p in pages[:4]]
        assert all(addrs) and len(cache) == 4 and all(mapped(guest, p.gref) for p in pages[:4])
        assert cache.acquire(pages[0].gref) == addrs[0]  # a hit is the same mapping
        # full of busy entries: no room, nothing evicted
        assert cache.acquire(pages[4].gref) is None and len(cache) == 4
        for p in pages[:4]:
            cache.release(p.gref)
        cache.release(pages[0].gref)  # acquired twice
        # full of idle entries: still no room on the request path (never evicts there) ...
        assert cache.acquire(pages[4].gref) is None and len(cache) == 4
        assert cache.overflowed
        # ... until a trim, no sooner than trim_interval after the last one
        assert cache.trim(now[0] + 0.05) == 0 and len(cache) == 4
        now[0] += 0.1
        # the least recently used idle entry goes (pages[1]; pages[0] was used again), 5% of 4 -> 1
        assert cache.trim(now[0]) == 1
        assert pages[1].gref not in cache and pages[0].gref in cache
        assert not mapped(guest, pages[1].gref)
        assert not cache.overflowed and cache.trim(now[0] + 1) == 0  # nothing overflowed since: no trim
        assert cache.acquire(pages[4].gref) is not None
        cache.release(pages[4].gref)
        # a busy LRU entry is skipped: pages[2] busy, pages[3] goes
        assert cache.acquire(pages[5].gref) is None
        assert cache.acquire(pages[2].gref) is not None
        now[0] += 0.1
        assert cache.trim(now[0]) == 1 and pages[3].gref not in cache and pages[2].gref in cache
        cache.release(pages[2].gref)
        assert cache.acquire(pages[5].gref) is not None
        cache.release(pages[5].gref)
        # at t+30 pages[5] is used again
        now[0] += 30
        assert cache.acquire(pages[5].gref) is not None
        cache.release(pages[5].gref)
        assert cache.purge_unused() == 0  # nothing is 60 s old yet
        # at t+61: pages 0, 2, 4 (last used near t) are purged, pages[5] (used at t+30) stays
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


async def test_more_grants_in_flight_than_the_cache_holds_cost_one_map_per_request(tmp_path, platform, guest):
    """A frontend cycling through more grefs than the cache holds (as QD8 of 1 MiB requests does: 2048
    against 1056) is answered OKAY with the right data, and pays at most one map call per request for
    what the full cache cannot take (plus one per request for the bounded trim's refills), never one per
    page. Before: every miss evicted the idle entry about to be reused next, mapped the page alone and
    scanned the LRU: a map call per page, ~40 1 MiB I/Os per second in bench.py."""
    path = make_disk_file(tmp_path / "disk.img")
    cap, nreq, nseg, rounds = 16, 4, 11, 10  # 44 grants in flight against a cache of 16
    # a trim after every batch: the most evictions (and refills) the bound below must allow
    vbd = make_vbd(path, data_path="map", persistent_grants=True, max_persistent_grants=cap,
                   persistent_trim_interval=0.0, queues=1)
    front = TestFrontend(guest, persistent=True)
    pages = [front.data_pages(nseg, readonly=False) for _ in range(nreq)]
    calls = []
    real_map = platform.gntdev.map_grants

    def counting_map(domid, refs, *, readonly):
        calls.append(len(tuple(refs)))
        return real_map(domid, refs, readonly=readonly)

    platform.gntdev.map_grants = counting_map
    sector = lambda k: k * nseg * 8  # noqa: E731
    try:
        async with connected(vbd, front, platform):
            for r in range(rounds):
                op = OP_WRITE if r % 2 == 0 else OP_READ
                for k in range(nreq):
                    for i, p in enumerate(pages[k]):
                        p.view[:] = bytes([r + 1, k, i]) * (PAGE_SIZE // 3) + bytes(PAGE_SIZE % 3) if op == OP_WRITE \
                            else bytes(PAGE_SIZE)
                    front.rw(0, op, 100 * r + k, sector(k), [(p.gref, 0, 7) for p in pages[k]])
                front.push()
                got = sorted(tuple(x) for x in await front.responses(0, nreq))
                assert got == [(100 * r + k, op, RSP_OKAY) for k in range(nreq)]
                if op == OP_READ:  # what the round before wrote
                    for k in range(nreq):
                        for i, p in enumerate(pages[k]):
                            assert p.bytes() == bytes([r, k, i]) * (PAGE_SIZE // 3) + bytes(PAGE_SIZE % 3)
                assert vbd.stats()["total"]["errors"] == 0
        requests = rounds * nreq
        # the cache filled once (one page per call), then at most one temporary mapping per request and
        # one refill per request after a trim (each trim unmaps at most max(1, 5% of 16) = 1 entry)
        assert len(calls) <= cap + 2 * requests, calls
        assert sum(calls) < rounds * nreq * nseg  # not every page mapped every time: the cache hits
        for k in range(nreq):
            for i in range(nseg):
                want = bytes([rounds - 1, k, i]) * (PAGE_SIZE // 3) + bytes(PAGE_SIZE % 3)
                assert read_back(path, (sector(k) + 8 * i) * 512, PAGE_SIZE) == want
        assert not any(mapped(guest, p.gref) for ps in pages for p in ps)
    finally:
        platform.gntdev.map_grants = real_map
        front.close()
        vbd.close()


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
