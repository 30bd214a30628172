"""Storage faults with the real tools: qemu-storage-daemon (vhost-user) and io_uring on files.

  * blkdebug injecting EIO on chosen sectors and operations: exactly those
    requests are answered BLKIF_RSP_ERROR, every other one OKAY, each once;
  * ENOSPC on a full filesystem (a size-limited tmpfs in a mount namespace
    of its own): errors answered, nothing else lost, writes succeed again
    once space is freed;
  * qemu-storage-daemon killed (SIGKILL) with requests in flight and
    restarted: the vbd reconnects to it with a new libblkio instance on the
    same socket, the requests that were in flight are executed again there,
    the guest sees only latency (storage_link.py).
"""

from __future__ import annotations

import errno

import pytest
import trio

from backend_support.frontend import TestFrontend
from backend_support.gated_queue import gate_queues
from backend_support.harness import DISK_SIZE, connected, make_disk_file, make_vbd, read_back
from backend_support.qsd_exports import daemon_with_file
from backend_support.workload import Workload
from xenblk_vhost.backend.datapath.storage_link import ReconnectPolicy
from xenblk_vhost.blkif.constants import OP_READ, OP_WRITE, RSP_ERROR, RSP_OKAY
from xenblk_vhost.xen.interfaces import PAGE_SIZE


async def _wait_for(predicate, timeout: float = 20.0, step: float = 0.01) -> None:
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(step)


async def test_daemon_killed_with_requests_in_flight_and_restarted(tmp_path, platform, guest):
    """SIGKILL while every request of a batch sits in the (frozen) daemon, restart it: the vbd
    reconnects on its own, the batch is executed again on the new daemon and answered OKAY, once
    each, with the right data; the guest never reconnects and the ring goes on."""
    with daemon_with_file(tmp_path / "qsd", DISK_SIZE, num_queues=2) as (daemon, export):
        make_disk_file(export.image)
        model = bytearray(export.image.read_bytes())
        vbd = make_vbd(export.socket, driver="virtio-blk-vhost-user", queues=2, storage_timeout=3.0,
                       reconnect=ReconnectPolicy(hold=30.0, first_delay=0.02, max_delay=0.2))
        front = TestFrontend(guest, nrings=2)
        try:
            # no barriers: a barrier holds the whole vbd's intake, and this wants many requests in flight
            work = Workload(front, model, seed=5, indirect_max=20, barrier=False)
            async with connected(vbd, front, platform):
                await work.round(0, 8, (0, 2))
                daemon.freeze()
                async with trio.open_nursery() as n:
                    # a round on each ring; their requests reach the frozen daemon and stay there
                    n.start_soon(work.round, 0, 8, (0, 2))
                    n.start_soon(work.round, 1, 8, (1, 2))
                    await _wait_for(lambda: vbd.stats()["total"]["in_flight"] >= 16)
                    daemon.kill()
                    t0 = trio.current_time()
                    await _wait_for(lambda: vbd.storage_link.state == "reconnecting")
                    print("detected after", trio.current_time() - t0)
                    assert vbd.stats()["total"]["in_flight"] >= 16  # held, not answered
                    daemon.restart()
                # both rounds completed: every response OKAY, once, data checked against the model
                link = vbd.stats()["storage"]
                assert link["state"] == "connected" and link["losses"] == 1 and link["reconnects"] == 1
                assert link["retried"] >= 16
                for _ in range(2):  # and the rings go on
                    await work.round(0, 8, (0, 2))
                    await work.round(1, 8, (1, 2))
            assert vbd.stats()["total"]["errors"] == 0
            assert read_back(export.image, 0, DISK_SIZE) == model
        finally:
            front.close()
            vbd.close()


@pytest.mark.parametrize("data_path", ["copy", "map"])
async def test_storage_failing_as_a_whole_is_replaced_and_its_requests_run_again(tmp_path, platform, guest,
                                                                                  data_path):
    """blkioq_do_io failing (the instance is gone) with one write held in the storage and one being
    submitted: the vbd opens a new instance at once, both writes run again on it and are answered
    OKAY, once each, with their data on disk (the copy path copies it again from the guest's pages
    into the new instance's memory; the map path keeps its mappings); later requests are served."""
    path = make_disk_file(tmp_path / "disk.img")
    vbd = make_vbd(path, queues=1, data_path=data_path, persistent_grants=False)
    [q] = gate_queues(vbd, [])
    old_storage = vbd.storage
    front = TestFrontend(guest)
    try:
        async with connected(vbd, front, platform):
            a = front.data_page(readonly=True, fill=b"a" * PAGE_SIZE)
            b = front.data_page(readonly=True, fill=b"b" * PAGE_SIZE)
            q.hold("write", 0)
            front.rw(0, OP_WRITE, 1, 0, [(a.gref, 0, 7)])  # in flight (held in the old instance)
            front.push()
            await _wait_for(lambda: vbd.stats()["total"]["in_flight"] == 1)
            assert await front.no_response(0)
            q.fail_next_do_io(errno.EIO)
            front.rw(0, OP_WRITE, 2, 8, [(b.gref, 0, 7)])  # its submission fails
            front.push()
            got = sorted(tuple(r) for r in await front.responses(0, 2))
            assert got == [(1, OP_WRITE, RSP_OKAY), (2, OP_WRITE, RSP_OKAY)]
            assert old_storage.closed and vbd.storage is not old_storage
            link = vbd.stats()["storage"]
            assert (link["state"], link["losses"], link["reconnects"], link["retried"]) == ("connected", 1, 1, 2)
            q.release()  # the old instance's held completion: nobody takes it for a request any more
            front.rw(0, OP_READ, 3, 0, [(b.gref, 0, 7)])
            front.push()
            assert tuple((await front.responses(0, 1))[0]) == (3, OP_READ, RSP_ERROR)  # b is read-only
            rd = front.data_page(readonly=False)
            front.rw(0, OP_READ, 4, 0, [(rd.gref, 0, 7)])
            front.push()
            assert tuple((await front.responses(0, 1))[0]) == (4, OP_READ, RSP_OKAY)
            assert rd.bytes() == b"a" * PAGE_SIZE
            assert vbd.stats()["total"]["wr_req"] == 2  # counted once each, when first dispatched
        assert read_back(path, 0, 2 * PAGE_SIZE) == b"a" * PAGE_SIZE + b"b" * PAGE_SIZE
        assert all(guest.end_access(ref) for ref in front.rings[0].refs)
        assert front.end_access(a) and front.end_access(b) and front.end_access(rd)
    finally:
        front.close()
        vbd.close()
