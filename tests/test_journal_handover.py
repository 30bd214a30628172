"""A daemon stopping for an upgrade or a restart hands what its storage has not finished to the next
process through the ring's journal: never answered ERROR because the storage is slow.

Found on the rig (issue 12): with qemu-storage-daemon slow under TCG, the old daemon's drain hit its
drain_timeout during an upgrade and answered the requests still in the storage with an error, which
the guest saw as I/O errors. Now, with a journal, they are left unanswered (buffers and mappings
released after the storage instance is destroyed) and the next process runs them again from the
journal's copy: the guest sees latency, one OKAY each, and the data lands.
"""

from __future__ import annotations

import errno

import pytest
import trio

from backend_support.frontend import TestFrontend
from backend_support.gated_queue import gate_queues
from backend_support.harness import make_disk_file, make_vbd, read_back
from xenblk_vhost.backend.datapath.ring_engine import ENGINE_ENV
from xenblk_vhost.backend.datapath.ring_worker import RingWorker
from xenblk_vhost.blkif.constants import OP_READ, OP_WRITE, RSP_OKAY
from xenblk_vhost.storage import BlkioError
from xenblk_vhost.xen.interfaces import PAGE_SIZE


@pytest.mark.parametrize("data_path", ["copy", "map"])
@pytest.mark.parametrize("wait_times_out_first", [False, True])
async def test_a_request_the_storage_holds_past_the_drain_goes_to_the_next_process(tmp_path, platform, guest,
                                                                                    data_path, wait_times_out_first):
    """wait_times_out_first: the drain's wait_io reaches its own bound (BlkioError ETIME) before the
    drain's scope ends, as happened under load (the land runs' flake): still not a storage failure."""
    path = make_disk_file(tmp_path / "disk.img")
    journals = tmp_path / "journals"
    journals.mkdir()
    old = make_vbd(path, data_path=data_path, queues=1, drain_timeout=0.2, journal_dir=journals)
    [q] = gate_queues(old, [])
    front = TestFrontend(guest)
    held = front.data_page(readonly=True, fill=b"H" * PAGE_SIZE)
    quick = front.data_page(readonly=True, fill=b"q" * PAGE_SIZE)
    new = None
    try:
        with trio.CancelScope() as scope:
            async with trio.open_nursery() as n:
                await n.start(old.serve, front.spec(), platform)
                q.hold("write", 8 * 512)
                front.rw(0, OP_WRITE, 1, 8, [(held.gref, 0, 7)])  # held by the storage
                front.push()
                assert await front.no_response(0)
                # another batch (the map path answers a batch once its one mapping can go) finishes
                front.rw(0, OP_WRITE, 2, 16, [(quick.gref, 0, 7)])
                front.push()
                assert [tuple(r) for r in await front.responses(0, 1)] == [(2, OP_WRITE, RSP_OKAY)]
                assert await front.no_response(0)
                if wait_times_out_first:
                    async def wait_io_timing_out(max_completions=None, timeout=None):
                        await trio.lowlevel.checkpoint()
                        raise BlkioError(errno.ETIME, "no completion", "test")

                    q.wait_io = wait_io_timing_out
                scope.cancel()  # the service stops (upgrade, SIGTERM): the drain times out on id 1
        assert old.storage.closed and not old.serving
        assert await front.no_response(0), "the old process answered a request it had not finished"
        assert old.stats()["total"]["errors"] == 0
        old.close()
        # The next process takes the ring over from the journal and runs id 1 again from its copy.
        new = make_vbd(path, data_path=data_path, queues=1, journal_dir=journals)
        async with trio.open_nursery() as n:
            await n.start(new.serve, front.spec(), platform)
            assert [tuple(r) for r in await front.responses(0, 1)] == [(1, OP_WRITE, RSP_OKAY)]
            assert await front.no_response(0)  # once
            out = front.data_page(readonly=False)
            front.rw(0, OP_READ, 3, 8, [(out.gref, 0, 7)])
            front.push()
            assert [tuple(r) for r in await front.responses(0, 1)] == [(3, OP_READ, RSP_OKAY)]
            assert out.bytes()[:7 * 512 + 512] == b"H" * PAGE_SIZE
            await new.disconnect()
        assert read_back(path, 8 * 512, PAGE_SIZE) == b"H" * PAGE_SIZE
        assert read_back(path, 16 * 512, PAGE_SIZE) == b"q" * PAGE_SIZE
        assert front.end_access(held) and front.end_access(quick)
    finally:
        front.close()
        old.close()
        if new is not None:
            new.close()


@pytest.mark.parametrize("data_path", ["copy", "map"])
async def test_the_next_process_prepares_while_the_old_one_serves_then_takes_the_journal_over(
        tmp_path, platform, guest, data_path):
    """An upgrade's successor maps the ring and makes its data path (Vbd.prepare) while the old process
    still serves it: the old one goes on answering meanwhile, and after its release the prepared
    successor takes over from the journal exactly as a fresh one would (the held request run once);
    every mapping of both goes in the end (the guest can end its grants)."""
    path = make_disk_file(tmp_path / "disk.img")
    journals = tmp_path / "journals"
    journals.mkdir()
    old = make_vbd(path, data_path=data_path, queues=1, drain_timeout=0.2, journal_dir=journals)
    [q] = gate_queues(old, [])
    front = TestFrontend(guest)
    held = front.data_page(readonly=True, fill=b"H" * PAGE_SIZE)
    quick = front.data_page(readonly=True, fill=b"q" * PAGE_SIZE)
    new = make_vbd(path, data_path=data_path, queues=1, journal_dir=journals)
    try:
        with trio.CancelScope() as scope:
            async with trio.open_nursery() as n:
                await n.start(old.serve, front.spec(), platform)
                q.hold("write", 8 * 512)
                front.rw(0, OP_WRITE, 1, 8, [(held.gref, 0, 7)])  # held by the storage
                front.push()
                assert await front.no_response(0)
                new.prepare(front.spec(), platform)  # the ring mapped twice now
                front.rw(0, OP_WRITE, 2, 16, [(quick.gref, 0, 7)])
                front.push()
                assert [tuple(r) for r in await front.responses(0, 1)] == [(2, OP_WRITE, RSP_OKAY)]
                scope.cancel()  # the old one stops for the hand-over: id 1 left to the journal
        old.close()
        assert await front.no_response(0)
        async with trio.open_nursery() as n:
            await n.start(new.serve, front.spec(), platform)
            assert [tuple(r) for r in await front.responses(0, 1)] == [(1, OP_WRITE, RSP_OKAY)]
            assert await front.no_response(0)  # once
            await new.disconnect()
        assert read_back(path, 8 * 512, PAGE_SIZE) == b"H" * PAGE_SIZE
        assert front.end_access(held) and front.end_access(quick)
    finally:
        front.close()
        old.close()
        new.close()


async def test_a_prepared_connection_that_is_not_the_one_served_is_released(tmp_path, platform, guest):
    """prepare() for one spec, serve() with another (the frontend reconnected meanwhile): the prepared
    mapping is let go and the ring set up afresh; unprepare() and close() let go of one never served."""
    path = make_disk_file(tmp_path / "disk.img")
    vbd = make_vbd(path, queues=1)
    first, second = TestFrontend(guest), TestFrontend(guest)
    try:
        vbd.prepare(first.spec(), platform)
        assert not first.rings[0].revoke_and_regrant(guest), "the prepared ring is not mapped"
        async with trio.open_nursery() as n:
            await n.start(vbd.serve, second.spec(), platform)
            assert first.rings[0].revoke_and_regrant(guest), "the prepared mapping of another connection was kept"
            await vbd.disconnect()
        vbd.prepare(second.spec(), platform)
        vbd.unprepare()
        assert second.rings[0].revoke_and_regrant(guest), "unprepare() kept the mapping"
        vbd.prepare(second.spec(), platform)
        vbd.close()
        assert second.rings[0].revoke_and_regrant(guest), "close() kept the prepared mapping"
    finally:
        first.close()
        second.close()
        vbd.close()


async def test_a_takeover_notifies_the_frontend_of_responses_the_dead_process_published_silently(
        tmp_path, platform, guest, monkeypatch):
    # The sim crash campaign's stall (200 kills, seed 1): a daemon killed between publishing a
    # response (rsp_prod moved, the journal's frame freed) and notifying left nothing in the journal
    # for the next one to publish again, so nobody notified: the frontend, which had re-armed
    # rsp_event before the response landed, slept forever with the response in the ring.
    path = make_disk_file(tmp_path / "disk.img")
    journals = tmp_path / "journals"
    journals.mkdir()
    old = make_vbd(path, queues=1, journal_dir=journals)
    front = TestFrontend(guest)
    ring = front.rings[0]
    page = front.data_page(readonly=True, fill=b"w" * PAGE_SIZE)
    new = None
    try:
        with monkeypatch.context() as m:
            # The old process dies right after publishing: its notify never happens (the Python path's
            # notify suppressed: the ring engine, which notifies in C, off for the old process).
            m.setattr(RingWorker, "_notify_frontend", lambda self: None)
            m.setenv(ENGINE_ENV, "0")
            async with trio.open_nursery() as n:
                await n.start(old.serve, front.spec(), platform)
                assert not ring.ring.final_check_for_responses()  # the guest sleeps until an event
                front.rw(0, OP_WRITE, 1, 8, [(page.gref, 0, 7)])
                front.push()
                with trio.fail_after(10):
                    while ring.ring.rsp_prod != 1:  # answered and published
                        await trio.sleep(0.01)
                n.cancel_scope.cancel()
        old.close()
        assert ring.ring.rsp_event == 1 and ring.ring.rsp_cons == 0  # asked to be told of it: never told
        new = make_vbd(path, queues=1, journal_dir=journals)
        async with trio.open_nursery() as n:
            await n.start(new.serve, front.spec(), platform)
            with trio.fail_after(5):
                await ring.port.wait()  # the new process's event
            assert [tuple(r) for r in ring.ring.take_responses(4)] == [(1, OP_WRITE, RSP_OKAY)]
            await new.disconnect()
        assert front.end_access(page)
    finally:
        front.close()
        old.close()
        if new is not None:
            new.close()
