"""A request's buffer is released, and the request answered, only once the storage can no longer
touch it: issue 10's D1 (a stuck request's batch mapping left mapped after a timed-out drain) and
D2 (a storage timeout answering and unmapping while the storage still owned the I/O).

libblkio has no per-request cancel (blkioq_* queue and reap, nothing more); blkio_destroy() is the
only abort. So a request the storage still holds keeps its slot and its pages until the instance is
destroyed; after that it is answered ERROR and unmapped.
"""

from __future__ import annotations

import trio

from backend_support.frontend import TestFrontend
from backend_support.gated_queue import gate_queues
from backend_support.harness import connected, count_tasks, make_disk_file, make_vbd
from xenblk_vhost.backend.datapath.storage_link import ReconnectPolicy
from xenblk_vhost.blkif.constants import OP_READ, OP_WRITE, RSP_ERROR, RSP_OKAY
from xenblk_vhost.xen.interfaces import PAGE_SIZE


async def test_teardown_unmaps_the_batch_mapping_of_a_request_stuck_in_storage(tmp_path, platform, guest):
    """D1 as the issue reproduced it: map path, no persistent grants, a short drain_timeout, one read
    held in the storage, serve() cancelled. The drain times out and the storage is destroyed; the
    read's batch mapping must be unmapped too (before: end_access failed for its page, and still
    did after another connect/disconnect)."""
    path = make_disk_file(tmp_path / "disk.img")
    vbd = make_vbd(path, data_path="map", queues=1, drain_timeout=0.2)
    [q] = gate_queues(vbd, [])
    front = TestFrontend(guest)
    page = front.data_page(readonly=False)
    tasks = count_tasks()
    try:
        with trio.CancelScope() as scope:
            async with trio.open_nursery() as n:
                await n.start(vbd.serve, front.spec(), platform)
                q.hold("read", 0)
                front.rw(0, OP_READ, 7, 0, [(page.gref, 0, 7)])
                front.push()
                assert await front.no_response(0)
                assert vbd.stats()["total"]["in_flight"] == 1
                scope.cancel()
        assert vbd.storage.closed and not vbd.serving and count_tasks() == tasks
        assert front.end_access(page), "the stuck read's page is still mapped"
        assert vbd.stats()["total"]["in_flight"] == 0
        assert all(guest.end_access(ref) for ref in front.rings[0].refs)
        # and the next connection works on freshly opened storage
        front2 = TestFrontend(guest)
        w = front2.data_page(readonly=True, fill=b"n" * PAGE_SIZE)
        async with connected(vbd, front2, platform):
            front2.rw(0, OP_WRITE, 1, 8, [(w.gref, 0, 7)])
            front2.push()
            assert tuple((await front2.responses(0, 1))[0]) == (1, OP_WRITE, RSP_OKAY)
        assert front2.end_access(w)
        front2.close()
    finally:
        front.close()
        vbd.close()


async def test_storage_timeout_answers_only_after_the_storage_is_destroyed(tmp_path, platform, guest):
    """D2: no completion within storage_timeout. The read still belongs to the storage (io_uring may
    complete it into the page at any time): it is answered ERROR only once the storage instance is
    destroyed, and its page is unmapped by then. Before: answered and unmapped with the storage
    alive (the old storage was not closed when the response arrived). Reconnecting off: with it the
    read is parked and run again on a new instance (tests/test_storage_faults.py)."""
    path = make_disk_file(tmp_path / "disk.img")
    vbd = make_vbd(path, data_path="map", queues=1, storage_timeout=0.3, reconnect=ReconnectPolicy(enabled=False))
    [q] = gate_queues(vbd, [])
    old_storage = vbd.storage
    front = TestFrontend(guest)
    rd = front.data_page(readonly=False)
    w = front.data_page(readonly=True, fill=b"w" * PAGE_SIZE)
    try:
        async with connected(vbd, front, platform):
            q.hold("read", 0)
            front.rw(0, OP_READ, 1, 0, [(rd.gref, 0, 7)])
            front.push()
            got = await front.responses(0, 1, timeout=10)
            assert tuple(got[0]) == (1, OP_READ, RSP_ERROR)
            assert old_storage.closed, "answered while the storage could still write the page"
            assert front.end_access(rd), "answered while the page was still mapped"
            # the ring lives on, answering errors without touching the storage
            front.rw(0, OP_WRITE, 2, 8, [(w.gref, 0, 7)])
            front.push()
            assert tuple((await front.responses(0, 1))[0]) == (2, OP_WRITE, RSP_ERROR)
        assert vbd.stats()["total"]["in_flight"] == 0
        assert all(guest.end_access(ref) for ref in front.rings[0].refs)
    finally:
        front.close()
        vbd.close()
