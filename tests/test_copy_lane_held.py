"""Held lane batches (copy_lane.py's hold: no Slot filled) on the rare paths: the storage failing as a
whole with them in it, then parked and run again on a new instance, or abandoned (answered ERROR), or
a halted ring. Each time the ring worker first gives the held slots the fields the reference path
reads (RingWorker._materialise), so the guest sees what it sees without the lane: every request
answered once, with the reference's status, the data where it belongs.

StallQueue keeps requests in the storage deterministically while still reaping by count (as the
held path needs: the tests' GatedQueue filters completions, so it turns the held path off).
"""

from __future__ import annotations

import errno

import pytest
import trio

from backend_support.frontend import TestFrontend
from backend_support.harness import connected, make_disk_file, make_vbd, read_back
from xenblk_vhost.backend.datapath.copy_lane import LANE_ENV
from xenblk_vhost.backend.datapath.ring_worker import RingWorker
from xenblk_vhost.backend.datapath.storage_link import ReconnectPolicy
from xenblk_vhost.blkif.constants import OP_READ, OP_WRITE, RSP_ERROR, RSP_OKAY
from xenblk_vhost.storage import BlkioError
from xenblk_vhost.xen.interfaces import PAGE_SIZE

N = 8  # requests of a batch: at least copy_lane.MIN_BATCH, all plain, so the lane holds them


class StallQueue:
    """A real Queue (reaping by count) that can stall: while stalled, do_io_count neither submits nor
    reaps, so what is queued stays in the storage as far as the ring worker knows; fail_next_do_io
    makes the next call fail as blkioq_do_io does when the device is gone."""

    counted_reaps = True

    def __init__(self, queue) -> None:
        self._q = queue
        self.stalled = False
        self._fail = 0

    def __getattr__(self, name):  # completions_address, completed, read, write, queue_lane...
        return getattr(self._q, name)

    def fail_next_do_io(self, err: int) -> None:
        self._fail = err

    def _raise_injected(self) -> None:
        if self._fail:
            err, self._fail = self._fail, 0
            raise BlkioError(err, "injected", "blkioq_do_io")

    def do_io_count(self, min_completions=0, max_completions=None, timeout=30.0) -> int:
        self._raise_injected()
        if self.stalled:
            return 0
        return self._q.do_io_count(min_completions, max_completions, timeout)

    def do_io(self, min_completions=0, max_completions=None, timeout=30.0) -> list:  # (the lane off)
        self._raise_injected()
        if self.stalled:
            return []
        return self._q.do_io(min_completions, max_completions, timeout)

    async def wait_io(self, max_completions=None, timeout=None, *, count=False):
        deadline = trio.current_time() + (timeout if timeout is not None else 1e9)
        while True:
            n = (self.do_io_count if count else self.do_io)(0, max_completions)
            if n:
                return n
            if trio.current_time() >= deadline:
                raise BlkioError(errno.ETIME, "no completion", "StallQueue.wait_io")
            await trio.sleep(0.002)


def stall_queues(vbd) -> StallQueue:
    [q] = vbd.storage.queues
    stalled = StallQueue(q)
    vbd.storage.queues[:] = [stalled]
    return stalled


async def _wait_for(predicate, timeout: float = 20.0) -> None:
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(0.005)


def _workers(vbd) -> list[RingWorker]:
    return [w for w in vbd._workers if w is not None]  # type: ignore[attr-defined]


def _send_batch(front, pages, reads) -> None:
    """N requests in one push: writes of pages[k] to sector 8k, or reads into them."""
    for k, page in enumerate(pages):
        front.rw(0, OP_READ if reads else OP_WRITE, 100 + k, 8 * k, [(page.gref, 0, 7)])
    front.push()


async def _batch_in_storage(vbd, q: StallQueue, front, pages, reads) -> RingWorker:
    """With the storage stalled, _send_batch and wait until all N are in flight: the ring's worker."""
    q.stalled = True
    _send_batch(front, pages, reads)
    await _wait_for(lambda: vbd.stats()["total"]["in_flight"] == N)
    [worker] = _workers(vbd)
    return worker


@pytest.mark.parametrize("lane", [True, False])
@pytest.mark.parametrize("reads", [False, True])
async def test_held_requests_parked_then_run_again_on_a_new_instance(tmp_path, platform, guest, monkeypatch,
                                                                     lane, reads):
    """The storage fails as a whole while a held batch is in it: the vbd parks it (the held slots get
    their fields first) and runs it again on a new instance; every request answered OKAY once, the
    data on disk or in the guest's pages; the same with the lane off (the reference)."""
    monkeypatch.setenv(LANE_ENV, "1" if lane else "0")
    path = make_disk_file(tmp_path / "disk.img")
    if reads:
        with open(path, "r+b") as f:
            for k in range(N):
                f.seek(8 * k * 512)
                f.write(bytes([k + 1]) * PAGE_SIZE)
    vbd = make_vbd(path, queues=1, data_path="copy",
                   reconnect=ReconnectPolicy(hold=30.0, first_delay=0.02, max_delay=0.2))
    q = stall_queues(vbd)
    front = TestFrontend(guest)
    try:
        async with connected(vbd, front, platform):
            pages = [front.data_page(readonly=not reads, fill=None if reads else bytes([k + 1]) * PAGE_SIZE)
                     for k in range(N)]
            worker = await _batch_in_storage(vbd, q, front, pages, reads)
            assert worker._held == (N if lane else 0)
            assert await front.no_response(0)
            q.fail_next_do_io(errno.EIO)  # the reaper's next poll: the storage is gone
            q.stalled = False
            got = sorted(tuple(r) for r in await front.responses(0, N))
            assert got == [(100 + k, OP_READ if reads else OP_WRITE, RSP_OKAY) for k in range(N)]
            assert vbd.stats()["storage"]["reconnects"] == 1
            assert worker._held == 0
            assert vbd.stats()["total"]["in_flight"] == 0
        for k, page in enumerate(pages):
            if reads:
                assert page.bytes() == bytes([k + 1]) * PAGE_SIZE
            else:
                assert read_back(path, 8 * k * 512, PAGE_SIZE) == bytes([k + 1]) * PAGE_SIZE
    finally:
        front.close()
        vbd.close()


@pytest.mark.parametrize("lane", [True, False])
async def test_held_requests_abandoned_are_answered_error_once(tmp_path, platform, guest, monkeypatch, lane):
    """Without reconnecting, the storage failing as a whole with a held batch in it: destroyed, then
    abandon() answers every request ERROR, once (the held slots got their fields first)."""
    monkeypatch.setenv(LANE_ENV, "1" if lane else "0")
    path = make_disk_file(tmp_path / "disk.img")
    vbd = make_vbd(path, queues=1, data_path="copy", reconnect=ReconnectPolicy(enabled=False))
    q = stall_queues(vbd)
    front = TestFrontend(guest)
    try:
        async with connected(vbd, front, platform):
            pages = [front.data_page(readonly=False) for _ in range(N)]
            worker = await _batch_in_storage(vbd, q, front, pages, reads=True)
            assert worker._held == (N if lane else 0)
            q.fail_next_do_io(errno.EIO)
            got = sorted(tuple(r) for r in await front.responses(0, N))
            assert got == [(100 + k, OP_READ, RSP_ERROR) for k in range(N)]
            assert worker._held == 0 and vbd.stats()["total"]["in_flight"] == 0
            assert await front.no_response(0)  # each once
            assert all(p.bytes() == bytes(PAGE_SIZE) for p in pages)  # a failed read copies nothing
    finally:
        front.close()
        vbd.close()


async def test_a_halted_ring_answers_no_held_request(tmp_path, platform, guest, monkeypatch):
    """A ring halted (bogus req_prod) with a held batch in the storage: the batch completes (its
    buffers freed) but nothing more is answered, as the reference does."""
    monkeypatch.setenv(LANE_ENV, "1")
    path = make_disk_file(tmp_path / "disk.img")
    vbd = make_vbd(path, queues=1, data_path="copy")
    q = stall_queues(vbd)
    front = TestFrontend(guest)
    try:
        async with connected(vbd, front, platform):
            pages = [front.data_page(readonly=False) for _ in range(N)]
            worker = await _batch_in_storage(vbd, q, front, pages, reads=True)
            assert worker._held == N
            ring = front.rings[0].ring
            ring._set_shared(0, ring.req_prod_pvt + ring.size + 7)  # req_prod: a lie
            front.kick()
            await _wait_for(lambda: vbd.stats()["total"]["halted"])
            q.stalled = False
            await _wait_for(lambda: vbd.stats()["total"]["in_flight"] == 0)
            assert worker._held == 0
            assert await front.no_response(0)
    finally:
        front.close()
        vbd.close()
