"""Write barriers, flushes and request splitting, observed at the storage queue.

The storage queues are wrapped (backend_support.gated_queue) so the test
sees the exact sequence of storage requests and completions, and can keep a
chosen write in flight for as long as it wants: the barrier's ordering is
then checked deterministically, without timing.
"""

from __future__ import annotations

import pytest

from backend_support.frontend import TestFrontend
from backend_support.gated_queue import gate_queues
from backend_support.harness import connected, make_disk_file, make_vbd, read_back
from xenblk_vhost.backend.datapath.storage_ops import StorageShape
from xenblk_vhost.blkif.constants import OP_FLUSH_DISKCACHE, OP_READ, OP_WRITE, OP_WRITE_BARRIER, RSP_OKAY
from xenblk_vhost.xen.interfaces import PAGE_SIZE


def _index(log, pred, start=0) -> int:
    for i in range(start, len(log)):
        if pred(log[i]):
            return i
    raise AssertionError(f"no matching storage event after {start}: {log[start:]}")


def _queued(kind, start=None, queue=None):
    return lambda e: (
        e[0] == "queue" and e[2] == kind and (start is None or e[3] == start) and (queue is None or e[1] == queue)
    )


def _completed(queue, tag):
    return lambda e: e[0] == "complete" and e[1] == queue and e[2] == tag


@pytest.mark.parametrize("data_path", ["copy", "map"])
async def test_barrier_drains_every_ring_then_flushes_writes_and_flushes(tmp_path, platform, guest, data_path):
    path = make_disk_file(tmp_path / "disk.img")
    vbd = make_vbd(path, data_path=data_path, queues=2)
    log: list = []
    queues = gate_queues(vbd, log)
    front = TestFrontend(guest, nrings=2)
    try:
        async with connected(vbd, front, platform):
            w1 = front.data_page(readonly=True, fill=b"1" * PAGE_SIZE)
            b = front.data_page(readonly=True, fill=b"B" * PAGE_SIZE)
            w2 = front.data_page(readonly=True, fill=b"2" * PAGE_SIZE)
            # W1 on ring 1, kept in flight by the storage
            queues[1].hold("write", 800 * 512)
            front.rw(1, OP_WRITE, 1, 800, [(w1.gref, 0, 7)])
            front.push(1)
            assert await front.no_response(1)
            assert queues[1].holding == 1
            # a barrier with data on ring 0, and a write queued behind it
            front.rw(0, OP_WRITE_BARRIER, 2, 1600, [(b.gref, 0, 7)])
            front.rw(0, OP_WRITE, 3, 2400, [(w2.gref, 0, 7)])
            front.push(0)
            assert await front.no_response(0), "the barrier must wait for W1 on the other ring"
            assert not any(e[0] == "queue" and e[1] == 0 for e in log), "ring 0 sent storage work before the drain"
            mark = len(log)
            queues[1].release()
            [r1] = await front.responses(1, 1)
            rb, r3 = await front.responses(0, 2)
            assert (tuple(r1), tuple(rb), tuple(r3)) == (
                (1, OP_WRITE, RSP_OKAY), (2, OP_WRITE_BARRIER, RSP_OKAY), (3, OP_WRITE, RSP_OKAY))
            # storage order: W1 done < flush < barrier write < its completion < flush < flush done < W2 queued
            w1_tag = next(e[5] for e in log if e[0] == "queue" and e[1] == 1)
            i_w1 = _index(log, _completed(1, w1_tag), mark)
            i_f1 = _index(log, _queued("flush", queue=0), i_w1)
            i_wb = _index(log, _queued("write", 1600 * 512, 0), i_f1)
            tag_b = log[i_wb][5]
            i_wbd = _index(log, _completed(0, tag_b), i_wb)
            i_f2 = _index(log, _queued("flush", queue=0), i_wbd)
            i_f2d = _index(log, _completed(0, tag_b), i_f2)
            i_w2 = _index(log, _queued("write", 2400 * 512, 0), i_f2d)
            assert i_w1 < i_f1 < i_wb < i_wbd < i_f2 < i_f2d < i_w2
        for sector, fill in ((800, b"1"), (1600, b"B"), (2400, b"2")):
            assert read_back(path, sector * 512, PAGE_SIZE) == fill * PAGE_SIZE
        assert vbd.stats()["total"]["f_req"] == 1
    finally:
        front.close()
        vbd.close()


async def test_barrier_waits_for_in_flight_on_its_own_ring_and_flush_does_not_drain(tmp_path, platform, guest):
    path = make_disk_file(tmp_path / "disk.img")
    vbd = make_vbd(path, queues=1)
    log: list = []
    [q] = gate_queues(vbd, log)
    front = TestFrontend(guest)
    try:
        async with connected(vbd, front, platform):
            w = front.data_page(readonly=True, fill=b"w" * PAGE_SIZE)
            q.hold("write", 0)
            front.rw(0, OP_WRITE, 1, 0, [(w.gref, 0, 7)])
            front.rw(0, OP_FLUSH_DISKCACHE, 2, 0, [])  # a flush is not ordered: it runs at once
            front.push()
            [rf] = await front.responses(0, 1)
            assert tuple(rf) == (2, OP_FLUSH_DISKCACHE, RSP_OKAY)
            front.rw(0, OP_WRITE_BARRIER, 3, 0, [])  # an empty barrier: drain + flush
            front.push()
            assert await front.no_response(0)
            assert sum(1 for e in log if e[0] == "queue" and e[2] == "flush") == 1  # only the flush's
            q.release()
            r1, r3 = await front.responses(0, 2)
            assert (tuple(r1), tuple(r3)) == ((1, OP_WRITE, RSP_OKAY), (3, OP_WRITE_BARRIER, RSP_OKAY))
            i_done = _index(log, lambda e: e[0] == "complete" and e[2] == log[0][5])
            _index(log, _queued("flush"), i_done)  # the barrier's flush comes after W completed
    finally:
        front.close()
        vbd.close()


async def test_flush_with_data_writes_then_flushes(tmp_path, platform, guest):
    """What blkfront sends for a FUA write: durable when answered, so the flush follows the write."""
    path = make_disk_file(tmp_path / "disk.img")
    vbd = make_vbd(path, queues=1)
    log: list = []
    gate_queues(vbd, log)
    front = TestFrontend(guest)
    try:
        async with connected(vbd, front, platform):
            p = front.data_page(readonly=True, fill=b"F" * PAGE_SIZE)
            front.rw(0, OP_FLUSH_DISKCACHE, 9, 64, [(p.gref, 0, 7)])
            front.push()
            [r] = await front.responses(0, 1)
            assert tuple(r) == (9, OP_FLUSH_DISKCACHE, RSP_OKAY)
            kinds = [(e[0], e[2]) for e in log if e[0] == "queue"]
            assert kinds == [("queue", "write"), ("queue", "flush")]
            i_w = _index(log, _queued("write"))
            i_wd = _index(log, lambda e: e[0] == "complete", i_w)
            assert i_wd < _index(log, _queued("flush"))
        assert read_back(path, 64 * 512, PAGE_SIZE) == b"F" * PAGE_SIZE
    finally:
        front.close()
        vbd.close()


@pytest.mark.parametrize("data_path", ["copy", "map"])
async def test_requests_are_split_to_the_storage_limits(tmp_path, platform, guest, data_path):
    """With max-transfer 8 KiB and 2 segments per request, an 11-page write is 6 storage requests
    (copy: one contiguous bounce buffer cut at 8 KiB) or more (map: pages are separate iovecs)."""
    path = make_disk_file(tmp_path / "disk.img")
    shape = StorageShape(logical_block_size=512, max_transfer=8192, max_segments=2, max_discard=16384)
    vbd = make_vbd(path, data_path=data_path, queues=1, shape=shape, max_indirect_segments=32)
    log: list = []
    gate_queues(vbd, log)
    front = TestFrontend(guest)
    fills = [bytes([65 + i]) * PAGE_SIZE for i in range(20)]
    try:
        async with connected(vbd, front, platform):
            pages = front.data_pages(11, readonly=True, fills=fills)
            front.rw(0, OP_WRITE, 1, 0, [(p.gref, 0, 7) for p in pages])
            front.push()
            assert tuple((await front.responses(0, 1))[0]) == (1, OP_WRITE, RSP_OKAY)
            parts = [e for e in log if e[0] == "queue"]
            assert len(parts) >= 6 and {e[5] for e in parts} == {parts[0][5]}  # one slot, many requests
            sizes = [e[4] for e in parts if e[2] == "write"]
            assert all(s <= 8192 for s in sizes)
            assert all(e[4] <= 2 for e in parts if e[2] == "writev")
            # read it back with an indirect read of 20 segments (a partial first and last page)
            rpages = front.data_pages(20, readonly=False)
            segs = [(p.gref, 0, 7) for p in rpages]
            segs[0] = (rpages[0].gref, 4, 7)
            segs[-1] = (rpages[-1].gref, 0, 2)
            front.indirect(0, OP_READ, 2, 4, segs)
            front.push()
            assert tuple((await front.responses(0, 1))[0]) == (2, OP_READ, RSP_OKAY)
            want = read_back(path, 4 * 512, (4 + 18 * 8 + 3) * 512)
            got = (
                bytes(rpages[0].view[4 * 512 :])
                + b"".join(p.bytes() for p in rpages[1:-1])
                + bytes(rpages[-1].view[: 3 * 512])
            )
            assert got == want
            # a discard of 40 KiB is 3 requests of at most 16 KiB
            mark = len(log)
            front.discard(0, 3, 2048, 80)
            front.push()
            assert tuple((await front.responses(0, 1))[0]) == (3, 5, RSP_OKAY)
            zs = [e for e in log[mark:] if e[0] == "queue"]
            assert [e[4] for e in zs] == [16384, 16384, 8192]
        assert read_back(path, 0, 11 * PAGE_SIZE) == b"".join(fills[:11])
        assert read_back(path, 2048 * 512, 80 * 512) == bytes(80 * 512)
    finally:
        front.close()
        vbd.close()
