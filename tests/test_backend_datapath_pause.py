"""The operator's pause (the snapshot hook): a paused vbd takes nothing from its rings, returns from
pause() only once nothing is in flight, and serves what the frontend queued meanwhile on resume.

Observed at the storage queue (backend_support.gated_queue), as the barrier tests do: a write held
in storage keeps pause() waiting; nothing reaches the storage between pause and resume.
"""

from __future__ import annotations

import pytest
import trio

from backend_support.frontend import TestFrontend
from backend_support.gated_queue import gate_queues
from backend_support.harness import connected, make_disk_file, make_vbd, read_back
from xenblk_vhost.blkif.constants import OP_WRITE, OP_WRITE_BARRIER, RSP_OKAY
from xenblk_vhost.xen.interfaces import PAGE_SIZE


@pytest.mark.parametrize("data_path", ["copy", "map"])
async def test_pause_drains_every_ring_takes_nothing_and_resume_serves_the_backlog(tmp_path, platform, guest,
                                                                                    data_path):
    path = make_disk_file(tmp_path / "disk.img")
    vbd = make_vbd(path, data_path=data_path, queues=2)
    log: list = []
    queues = gate_queues(vbd, log)
    front = TestFrontend(guest, nrings=2)
    try:
        async with connected(vbd, front, platform):
            w1 = front.data_page(readonly=True, fill=b"1" * PAGE_SIZE)
            w2 = front.data_page(readonly=True, fill=b"2" * PAGE_SIZE)
            queues[1].hold("write", 800 * 512)
            front.rw(1, OP_WRITE, 1, 800, [(w1.gref, 0, 7)])
            front.push(1)
            assert await front.no_response(1)
            paused = trio.Event()

            async def pause() -> None:
                await vbd.pause()
                paused.set()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(pause)
                await trio.sleep(0.2)
                assert vbd.paused and not paused.is_set(), "pause() returned with a write still in storage"
                queues[1].release()
                [r1] = await front.responses(1, 1)
                assert tuple(r1) == (1, OP_WRITE, RSP_OKAY)
            assert paused.is_set() and vbd.stats()["total"]["in_flight"] == 0
            # Paused: a request on either ring stays in the ring, nothing reaches the storage.
            mark = len(log)
            front.rw(0, OP_WRITE, 2, 1600, [(w2.gref, 0, 7)])
            front.rw(0, OP_WRITE_BARRIER, 3, 2400, [])
            front.push(0)
            assert await front.no_response(0)
            assert log[mark:] == [], "a paused vbd queued storage work"
            await vbd.pause()  # again: already paused, returns at once
            vbd.resume()
            r2, r3 = await front.responses(0, 2)
            assert (tuple(r2), tuple(r3)) == ((2, OP_WRITE, RSP_OKAY), (3, OP_WRITE_BARRIER, RSP_OKAY))
            assert not vbd.paused
        assert read_back(path, 1600 * 512, PAGE_SIZE) == b"2" * PAGE_SIZE
    finally:
        front.close()
        vbd.close()


async def test_a_pause_cut_short_by_a_deadline_leaves_the_vbd_serving(tmp_path, platform, guest):
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
            front.push()
            assert await front.no_response(0)
            with trio.move_on_after(0.2) as deadline:
                await vbd.pause()
            assert deadline.cancelled_caught and not vbd.paused
            front.rw(0, OP_WRITE, 2, 8, [(w.gref, 0, 7)])  # served while the first is still held
            front.push()
            [r2] = await front.responses(0, 1)
            assert tuple(r2) == (2, OP_WRITE, RSP_OKAY)
            q.release()
            [r1] = await front.responses(0, 1)
            assert tuple(r1) == (1, OP_WRITE, RSP_OKAY)
    finally:
        front.close()
        vbd.close()


async def test_a_paused_vbd_stays_paused_across_a_reconnect(tmp_path, platform, guest):
    path = make_disk_file(tmp_path / "disk.img")
    vbd = make_vbd(path, queues=1)
    front = TestFrontend(guest)
    try:
        await vbd.pause()  # not serving: nothing to drain, the next connection starts paused
        assert vbd.paused
        async with connected(vbd, front, platform):
            w = front.data_page(readonly=True, fill=b"r" * PAGE_SIZE)
            front.rw(0, OP_WRITE, 1, 64, [(w.gref, 0, 7)])
            front.push()
            assert await front.no_response(0)
            vbd.resume()
            [r1] = await front.responses(0, 1)
            assert tuple(r1) == (1, OP_WRITE, RSP_OKAY)
    finally:
        front.close()
        vbd.close()
