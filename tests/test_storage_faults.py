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
import logging
from pathlib import Path

import pytest
import trio

from backend_support.frontend import TestFrontend
from backend_support.gated_queue import gate_queues
from backend_support.harness import DISK_SIZE, connected, make_disk_file, make_vbd, read_back
from backend_support.qsd_exports import InjectError, blkdebug_export, daemon_with_file
from backend_support.workload import Workload
from storage_support.full_fs import SmallFilesystem
from xenblk_vhost.backend.datapath.storage_link import ReconnectPolicy
from xenblk_vhost.blkif.constants import OP_FLUSH_DISKCACHE, OP_READ, OP_WRITE, RSP_ERROR, RSP_OKAY
from xenblk_vhost.xen.interfaces import PAGE_SIZE


async def _wait_for(predicate, timeout: float = 20.0, step: float = 0.01) -> None:
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(step)


async def test_daemon_killed_with_requests_in_flight_and_restarted(tmp_path, platform, guest):
    """SIGKILL while every request of a batch sits in the (frozen) daemon, restart it: the vbd sees
    the socket hang up (not waiting for storage_timeout), reconnects on its own, the batch is
    executed again on the new daemon and answered OKAY, once each, with the right data; the guest
    never reconnects and the ring goes on."""
    with daemon_with_file(tmp_path / "qsd", DISK_SIZE, num_queues=2) as (daemon, export):
        make_disk_file(export.image)
        model = bytearray(export.image.read_bytes())
        vbd = make_vbd(export.socket, driver="virtio-blk-vhost-user", queues=2, storage_timeout=30.0,
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
                    # the vhost-user socket's hang-up is seen at once, long before storage_timeout
                    await _wait_for(lambda: vbd.storage_link.state == "reconnecting", timeout=10)
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



async def test_daemon_killed_while_idle_backoff_logs_then_reconnect(tmp_path, platform, guest, caplog):
    """Killed with nothing in flight: the hang-up alone starts reconnecting; while the daemon is
    away attempts back off and are logged (1, 2, 4...), the link says reconnecting with the last
    error, a request waits on the ring unanswered; restarted, that request is served."""
    caplog.set_level(logging.WARNING, logger="xenblk_vhost")
    with daemon_with_file(tmp_path / "qsd", DISK_SIZE, num_queues=1) as (daemon, export):
        vbd = make_vbd(export.socket, driver="virtio-blk-vhost-user", queues=1,
                       reconnect=ReconnectPolicy(hold=30.0, first_delay=0.02, max_delay=0.1))
        front = TestFrontend(guest)
        try:
            async with connected(vbd, front, platform):
                w = front.data_page(readonly=True, fill=b"k" * PAGE_SIZE)
                daemon.kill()
                await _wait_for(lambda: vbd.storage_link.state == "reconnecting", timeout=10)
                await _wait_for(lambda: vbd.storage_link.attempts >= 4, timeout=10)
                link = vbd.stats()["storage"]
                assert link["losses"] == 1 and "ECONNREFUSED" in link["last_error"] and link["away_s"] > 0
                logged = [r.getMessage() for r in caplog.records if "storage still away (attempt" in r.getMessage()]
                assert [m.split("attempt ")[1].split(":")[0] for m in logged][:3] == ["1", "2", "4"]
                front.rw(0, OP_WRITE, 1, 64, [(w.gref, 0, 7)])
                front.push()
                assert await front.no_response(0, 0.3)  # held while the daemon is away
                daemon.restart()
                assert tuple((await front.responses(0, 1, timeout=20))[0]) == (1, OP_WRITE, RSP_OKAY)
                assert vbd.stats()["storage"]["state"] == "connected"
                assert any("storage back after" in r.getMessage() for r in caplog.records)
            assert read_back(export.image, 64 * 512, PAGE_SIZE) == b"k" * PAGE_SIZE
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
            # the gated queue's polling reaper may meet the injected failure before write 2 is queued:
            # then write 2 comes after the reconnect, and only write 1 ran again
            assert (link["state"], link["losses"], link["reconnects"]) == ("connected", 1, 1)
            assert link["retried"] in (1, 2)
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


# ---------------------------------------------------------------- blkdebug: EIO on chosen sectors and ops

READ_FAILS, WRITE_FAILS = 2048, 4096  # sectors


async def test_blkdebug_errors_fail_exactly_the_requests_they_target(tmp_path, platform, guest):
    """blkdebug under the export fails reads touching one sector and writes touching another. One
    batch of twelve requests in flight together: exactly the targeted ones are
    answered RSP_ERROR (a read of the write-failing sector and a write of the read-failing one are
    OKAY), each request once; a failed read leaves the guest's page alone; the ring serves on."""
    rules = [InjectError("read", READ_FAILS), InjectError("write", WRITE_FAILS)]
    with blkdebug_export(tmp_path / "qsd", DISK_SIZE, rules) as (_daemon, export):
        vbd = make_vbd(export.socket, driver="virtio-blk-vhost-user", queues=1, max_indirect_segments=32)
        front = TestFrontend(guest)
        try:
            async with connected(vbd, front, platform):
                w = front.data_page(readonly=True, fill=b"w" * PAGE_SIZE)
                big = front.data_pages(16, readonly=True, fills=[b"B" * PAGE_SIZE] * 16)
                reads = {i: front.data_page(readonly=False, fill=b"r" * PAGE_SIZE) for i in (1, 4, 5, 9)}
                seg = [(w.gref, 0, 7)]
                front.rw(0, OP_READ, 1, READ_FAILS, [(reads[1].gref, 0, 7)])  # read of its sector: ERROR
                front.rw(0, OP_WRITE, 2, READ_FAILS, seg)  # write there: OKAY
                front.rw(0, OP_WRITE, 3, WRITE_FAILS, seg)  # write of its sector: ERROR
                front.rw(0, OP_READ, 4, WRITE_FAILS, [(reads[4].gref, 0, 0)])  # read there: OKAY (zeros)
                front.rw(0, OP_READ, 5, READ_FAILS - 4, [(reads[5].gref, 0, 7)])  # overlaps it: ERROR
                front.rw(0, OP_WRITE, 6, READ_FAILS + 8, seg)  # next to it: OKAY
                front.rw(0, OP_WRITE, 7, WRITE_FAILS - 8, seg)  # next to it: OKAY
                # a 64 KiB indirect write whose 9th page holds the failing sector: ERROR as a whole
                front.indirect(0, OP_WRITE, 8, WRITE_FAILS - 64, [(p.gref, 0, 7) for p in big])
                front.rw(0, OP_READ, 9, 0, [(reads[9].gref, 0, 7)])  # OKAY
                front.rw(0, OP_FLUSH_DISKCACHE, 10, 0, [])  # OKAY
                front.rw(0, OP_WRITE, 11, 16, seg)  # OKAY
                front.rw(0, OP_WRITE, 12, WRITE_FAILS + 1, [(w.gref, 0, 0)])  # 512 bytes after it: OKAY
                front.push()
                got = await front.responses(0, 12)
                assert len({r.id for r in got}) == 12, "a request answered twice"
                statuses = {r.id: r.status for r in got}
                failing = {1, 3, 5, 8}
                assert statuses == {i: RSP_ERROR if i in failing else RSP_OKAY for i in range(1, 13)}
                assert await front.no_response(0, 0.3)  # nothing more: each once
                assert reads[1].bytes() == reads[5].bytes() == b"r" * PAGE_SIZE  # failed reads copy nothing
                assert reads[4].bytes() == bytes(512) + b"r" * (PAGE_SIZE - 512)
                assert vbd.stats()["total"]["errors"] == len(failing)
                # the ring goes on, the rules still hold
                front.rw(0, OP_FLUSH_DISKCACHE, 20, 0, [])
                front.rw(0, OP_READ, 21, READ_FAILS, [(reads[1].gref, 0, 7)])
                front.rw(0, OP_READ, 22, READ_FAILS + 8, [(reads[9].gref, 0, 7)])
                front.push()
                got = {r.id: r.status for r in await front.responses(0, 3)}
                assert got == {20: RSP_OKAY, 21: RSP_ERROR, 22: RSP_OKAY}
                assert reads[9].bytes() == b"w" * PAGE_SIZE
            image = export.image
            assert read_back(image, READ_FAILS * 512, PAGE_SIZE) == b"w" * PAGE_SIZE
            assert read_back(image, WRITE_FAILS * 512, PAGE_SIZE) == bytes(512) + b"w" * 512 + bytes(6 * 512)
            # the failed indirect write left nothing; the write just before the sector is there
            assert read_back(image, (WRITE_FAILS - 64) * 512, 32 * 1024) == bytes(28 * 1024) + b"w" * PAGE_SIZE
        finally:
            front.close()
            vbd.close()


# ---------------------------------------------------------------- ENOSPC: a full filesystem

ALLOCATED = 64 * 1024  # bytes at the start of the image written before the filesystem fills up
HOLE = 1024  # a sector in the image's unallocated part


def _image_on(fs: SmallFilesystem) -> Path:
    image = fs.path / "disk.img"
    with open(image, "wb") as f:
        f.write(b"o" * ALLOCATED)
        f.truncate(DISK_SIZE)  # sparse: far bigger than the filesystem
    return image


async def _enospc_round(vbd, front, fs: SmallFilesystem, image: Path) -> None:
    """Full filesystem: overwrites of allocated blocks succeed, writes into holes fail, reads and
    flushes succeed; once space is back, the failed write succeeds when the guest writes again."""
    w = front.data_page(readonly=True, fill=b"n" * PAGE_SIZE)
    rd = front.data_page(readonly=False, fill=b"r" * PAGE_SIZE)
    rd2 = front.data_page(readonly=False, fill=b"r" * PAGE_SIZE)
    assert fs.fill() > 0
    front.rw(0, OP_WRITE, 1, 8, [(w.gref, 0, 7)])  # overwrite: the blocks exist
    front.rw(0, OP_WRITE, 2, HOLE, [(w.gref, 0, 7)])  # into a hole: no space
    front.rw(0, OP_READ, 3, HOLE + 64, [(rd.gref, 0, 7)])  # a hole reads as zeros
    front.rw(0, OP_READ, 4, 0, [(rd2.gref, 0, 7)])
    front.rw(0, OP_FLUSH_DISKCACHE, 5, 0, [])
    front.push()
    got = await front.responses(0, 5)
    assert {r.id: r.status for r in got} == {1: RSP_OKAY, 2: RSP_ERROR, 3: RSP_OKAY, 4: RSP_OKAY, 5: RSP_OKAY}
    assert rd.bytes() == bytes(PAGE_SIZE) and rd2.bytes() == b"o" * PAGE_SIZE
    assert await front.no_response(0, 0.2)
    fs.free()
    front.rw(0, OP_WRITE, 6, HOLE, [(w.gref, 0, 7)])
    front.rw(0, OP_FLUSH_DISKCACHE, 7, 0, [])
    front.push()
    assert {r.id: r.status for r in await front.responses(0, 2)} == {6: RSP_OKAY, 7: RSP_OKAY}
    assert vbd.stats()["total"]["errors"] == 1
    assert read_back(image, 8 * 512, PAGE_SIZE) == b"n" * PAGE_SIZE
    assert read_back(image, HOLE * 512, PAGE_SIZE) == b"n" * PAGE_SIZE


@pytest.mark.parametrize("data_path", ["copy", "map"])
async def test_enospc_on_io_uring(tmp_path, platform, guest, data_path):
    with SmallFilesystem(tmp_path / "mnt", size=1 << 20) as fs:
        image = _image_on(fs)
        vbd = make_vbd(image, queues=1, data_path=data_path)
        front = TestFrontend(guest)
        try:
            async with connected(vbd, front, platform):
                await _enospc_round(vbd, front, fs, image)
            assert vbd.stats()["storage"]["losses"] == 0  # a request's error, not the storage's
        finally:
            front.close()
            vbd.close()


async def test_enospc_through_qemu_storage_daemon(tmp_path, platform, guest):
    """The same full filesystem under qemu-storage-daemon's file node: its ENOSPC reaches us as the
    request's EIO (virtio-blk has one error status), answered RSP_ERROR; space back, writes succeed."""
    with SmallFilesystem(tmp_path / "mnt", size=1 << 20) as fs:
        image = _image_on(fs)
        with blkdebug_export(tmp_path / "qsd", DISK_SIZE, [], image=image) as (_daemon, export):
            vbd = make_vbd(export.socket, driver="virtio-blk-vhost-user", queues=1)
            front = TestFrontend(guest)
            try:
                async with connected(vbd, front, platform):
                    await _enospc_round(vbd, front, fs, image)
                assert vbd.stats()["storage"]["losses"] == 0
            finally:
                front.close()
                vbd.close()
