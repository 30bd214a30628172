"""When things go wrong: a hostile ring, failing storage, a vanished vhost-user server,
unplug and cancellation in the middle of heavy I/O, pool and memory exhaustion.

vhost-user tests run a real qemu-storage-daemon (virtio-blk-vhost-user,
copy path): data, EIO completions from a blkdebug node, and the daemon
killed (or stopped) with requests in flight.
"""

from __future__ import annotations

import os
import signal
import time

import pytest
import trio

from backend_support.frontend import TestFrontend
from backend_support.harness import (
    DISK_SIZE,
    connected,
    count_tasks,
    file_digest,
    make_disk_file,
    make_vbd,
    open_fds,
    read_back,
)
from backend_support.qsd_exports import daemon_with_file, failing_sector_export
from backend_support.workload import Workload
from xenblk_vhost.backend.datapath.storage_link import ReconnectPolicy
from xenblk_vhost.backend.datapath.vbd import VbdConnectError
from xenblk_vhost.blkif.constants import OP_READ, OP_WRITE, RSP_ERROR, RSP_OKAY
from xenblk_vhost.xen.interfaces import PAGE_SIZE


async def test_bogus_req_prod_halts_only_that_ring(tmp_path, platform, guest):
    path = make_disk_file(tmp_path / "disk.img")
    vbd = make_vbd(path, queues=2)
    front = TestFrontend(guest, nrings=2)
    try:
        async with connected(vbd, front, platform):
            digest = file_digest(path)
            hostile = front.rings[1]
            w = front.data_page(readonly=True, fill=b"H" * PAGE_SIZE)
            for i in range(3):  # real requests, but the producer index claims far more
                front.rw(1, OP_WRITE, 100 + i, 8 * i, [(w.gref, 0, 7)])
            hostile.ring._set_shared(0, hostile.ring.req_prod_pvt + hostile.ring.size + 7)  # req_prod
            front.kick(1)
            assert await front.no_response(1)
            await trio.sleep(0.05)
            stats = vbd.stats()
            assert stats["rings"][1]["halted"] and not stats["rings"][0]["halted"]
            assert stats["rings"][1]["wr_req"] == 0 and file_digest(path) == digest  # nothing consumed
            # the other ring keeps serving
            model = bytearray(path.read_bytes())
            work = Workload(front, model, seed=3)
            for _ in range(3):
                await work.round(0, 6, (0, 2))
            # a fixed producer index changes nothing: the halted ring answers nothing more
            hostile.ring._set_shared(0, hostile.ring.req_prod_pvt)
            front.kick(1)
            assert await front.no_response(1)
        assert read_back(path, 0, DISK_SIZE) == model
        for r in front.rings:
            assert all(guest.end_access(ref) for ref in r.refs)
    finally:
        front.close()
        vbd.close()


async def test_out_of_requests_waits_for_a_free_slot(tmp_path, platform, guest):
    """More requests than the pool (limits.max_inflight): all answered, oo_req counts the waits."""
    path = make_disk_file(tmp_path / "disk.img")
    vbd = make_vbd(path, max_inflight=2, queues=1)
    front = TestFrontend(guest)
    try:
        async with connected(vbd, front, platform):
            model = bytearray(path.read_bytes())
            work = Workload(front, model, seed=11)
            for _ in range(3):
                await work.round(0, 16)
            stats = vbd.stats()["total"]
            assert stats["oo_req"] >= 1 and stats["errors"] == 0
        assert read_back(path, 0, DISK_SIZE) == model
    finally:
        front.close()
        vbd.close()


async def test_big_indirect_requests_wait_for_bounce_memory(tmp_path, platform, guest):
    """1 MiB of bounce memory per ring holds one 512 KiB indirect request at a time besides the
    small buffers: eight of them in one batch all complete, correctly, in turn."""
    path = make_disk_file(tmp_path / "disk.img")
    vbd = make_vbd(path, memory=1 << 20, max_indirect_segments=128, queues=1)
    front = TestFrontend(guest)
    fills = [bytes([i]) * PAGE_SIZE for i in range(128)]
    try:
        assert vbd.features.max_indirect_segments == 128
        async with connected(vbd, front, platform):
            pages = front.data_pages(128, readonly=True, fills=fills)  # the same pages for every request
            for k in range(2):
                for j in range(4):
                    front.indirect(0, OP_WRITE, 10 * k + j, (4 * k + j) * 1024, [(p.gref, 0, 7) for p in pages])
                front.push()
                got = await front.responses(0, 4)
                assert sorted(tuple(r) for r in got) == [(10 * k + j, OP_WRITE, RSP_OKAY) for j in range(4)]
        for n in range(8):
            assert read_back(path, n * 1024 * 512, 128 * PAGE_SIZE) == b"".join(fills)
    finally:
        front.close()
        vbd.close()


async def test_eio_from_the_storage_fails_that_request_only(tmp_path, platform, guest):
    bad_sector = 2048
    with failing_sector_export(tmp_path / "qsd", DISK_SIZE, bad_sector) as export:
        vbd = make_vbd(export.socket, driver="virtio-blk-vhost-user", queues=1)
        front = TestFrontend(guest)
        try:
            async with connected(vbd, front, platform):
                good = front.data_page(readonly=True, fill=b"g" * PAGE_SIZE)
                rd = front.data_page(readonly=False, fill=b"r" * PAGE_SIZE)
                front.rw(0, OP_WRITE, 1, bad_sector, [(good.gref, 0, 7)])
                front.rw(0, OP_WRITE, 2, 0, [(good.gref, 0, 7)])
                front.rw(0, OP_READ, 3, bad_sector - 4, [(rd.gref, 0, 7)])
                front.push()
                got = {r.id: tuple(r) for r in await front.responses(0, 3)}
                assert got == {1: (1, OP_WRITE, RSP_ERROR), 2: (2, OP_WRITE, RSP_OKAY), 3: (3, OP_READ, RSP_ERROR)}
                assert rd.bytes() == b"r" * PAGE_SIZE  # a failed read copies nothing to the guest
                front.rw(0, OP_READ, 4, 0, [(rd.gref, 0, 7)])
                front.push()
                assert tuple((await front.responses(0, 1))[0]) == (4, OP_READ, RSP_OKAY)
                assert rd.bytes() == b"g" * PAGE_SIZE
            assert read_back(export.image, 0, PAGE_SIZE) == b"g" * PAGE_SIZE
            assert read_back(export.image, bad_sector * 512, PAGE_SIZE) == bytes(PAGE_SIZE)
            assert vbd.stats()["total"]["errors"] == 2
        finally:
            front.close()
            vbd.close()


async def test_workload_over_vhost_user(tmp_path, platform, guest):
    """The copy path into a qemu-storage-daemon: byte for byte, discard included (real unmap)."""
    with daemon_with_file(tmp_path / "qsd", DISK_SIZE) as (daemon, export):
        make_disk_file(export.image)
        model = bytearray(export.image.read_bytes())
        vbd = make_vbd(export.socket, driver="virtio-blk-vhost-user", queues=2)
        front = TestFrontend(guest, order=1, nrings=2)
        try:
            assert vbd.features.discard and not vbd.features.discard_by_write_zeroes
            assert vbd.features.max_indirect_segments <= vbd.storage.limits.max_segments
            work = Workload(front, model, seed=21, indirect_max=40)
            async with connected(vbd, front, platform):
                for _ in range(4):
                    async with trio.open_nursery() as n:
                        n.start_soon(work.round, 0, 6, (0, 2))
                        n.start_soon(work.round, 1, 6, (1, 2))
            assert read_back(export.image, 0, DISK_SIZE) == model
        finally:
            front.close()
            vbd.close()


async def test_vanished_vhost_user_server(tmp_path, platform, guest):
    """qemu-storage-daemon dies with requests in flight and does not come back: once the storage
    timeout passes they are held for the reconnect hold, then every one of them is answered ERROR,
    later requests fail at once (reconnect attempts go on), the ring stays alive; disconnect is clean,
    and the next connection reports that the storage cannot be reopened."""
    with daemon_with_file(tmp_path / "qsd", DISK_SIZE, num_queues=1) as (daemon, export):
        vbd = make_vbd(export.socket, driver="virtio-blk-vhost-user", queues=1, storage_timeout=1.0,
                       reconnect=ReconnectPolicy(hold=0.5))
        front = TestFrontend(guest)
        try:
            async with connected(vbd, front, platform):
                w = front.data_page(readonly=True, fill=b"v" * PAGE_SIZE)
                front.rw(0, OP_WRITE, 1, 0, [(w.gref, 0, 7)])
                front.push()
                assert tuple((await front.responses(0, 1))[0]) == (1, OP_WRITE, RSP_OKAY)
                os.kill(daemon.pid, signal.SIGSTOP)  # it stops answering...
                for i in range(8):
                    front.rw(0, OP_WRITE, 10 + i, 8 * i, [(w.gref, 0, 7)])
                front.push()
                assert await front.no_response(0, 0.3)
                daemon.kill()  # ...and dies (SIGKILL works on a stopped process)
                got = await front.responses(0, 8, timeout=10)
                assert sorted(tuple(r) for r in got) == [(10 + i, OP_WRITE, RSP_ERROR) for i in range(8)]
                link = vbd.stats()["storage"]
                assert link["state"] == "failed" and link["losses"] == 1 and link["attempts"] >= 1
                assert "ECONNREFUSED" in link["last_error"]
                front.rw(0, OP_READ, 30, 0, [(w.gref, 0, 7)])
                front.push()
                assert tuple((await front.responses(0, 1))[0]) == (30, OP_READ, RSP_ERROR)
            assert all(guest.end_access(ref) for ref in front.rings[0].refs)
            front2 = TestFrontend(guest)
            with pytest.raises(VbdConnectError, match="cannot be reopened"):
                await vbd.serve(front2.spec(), platform)
            front2.close()
        finally:
            front.close()
            vbd.close()


def _fd_targets() -> dict[int, str]:
    out = {}
    for fd in open_fds():
        try:
            out[fd] = os.readlink(f"/proc/self/fd/{fd}")
        except FileNotFoundError:
            pass  # the listing's own fd
    return out


async def _keep_ring_busy(front, ring, pages, stop, sent):
    """A frontend that keeps its ring as full as it can with 4 KiB reads and writes."""
    r = front.rings[ring]
    i = 0
    while not stop.is_set():
        while r.ring.free_requests() and not stop.is_set():
            p = pages[i % len(pages)]
            op = OP_WRITE if i % 2 else OP_READ
            front.rw(ring, op, i, (i * 8) % 8000, [(p.gref, 0, 7)])
            sent.append(i)
            i += 1
        front.push(ring)
        r.ring.take_responses(r.ring.size)  # consume whatever was answered, unchecked
        await trio.sleep(0)


@pytest.mark.parametrize("data_path,persistent", [("copy", False), ("map", False), ("map", True)],
                         ids=["copy", "map", "map-persistent"])
async def test_unplug_under_heavy_io_answers_everything_taken_and_leaves_nothing(tmp_path, platform, guest,
                                                                                 data_path, persistent):
    path = make_disk_file(tmp_path / "disk.img")
    vbd = make_vbd(path, data_path=data_path, persistent_grants=persistent, queues=2)
    front = TestFrontend(guest, order=2, nrings=2, persistent=persistent)
    pages = front.data_pages(16, readonly=False)
    tasks = count_tasks()
    regions = len(list(vbd.storage.blkio.mem_regions))
    try:
        # warm-up cycle so the fd baseline includes what outlives a connection
        async with connected(vbd, front, platform):
            pass
        for r in front.rings:
            assert r.revoke_and_regrant(guest)
        fds = open_fds()
        responses_before = [r.ring.rsp_cons for r in front.rings]
        sent: list = []
        stop = trio.Event()
        async with trio.open_nursery() as n:
            await n.start(vbd.serve, front.spec(), platform)
            for ring in range(2):
                n.start_soon(_keep_ring_busy, front, ring, pages, stop, sent)
            with trio.fail_after(30):  # let the load build up (however slow the machine is today)
                while vbd.stats()["total"]["rd_req"] + vbd.stats()["total"]["wr_req"] < 300:
                    await trio.sleep(0.01)
            await vbd.disconnect()  # while the frontend keeps pushing
            stop.set()
        stats = vbd.stats()["total"]
        taken = stats["rd_req"] + stats["wr_req"]
        assert stats["in_flight"] == 0 and stats["errors"] == 0
        # every request the backend took was answered on the shared ring
        answered = sum((r.ring.rsp_prod - before) & 0xFFFFFFFF for r, before in zip(front.rings, responses_before))
        assert answered == taken
        assert count_tasks() == tasks
        assert open_fds() == fds
        assert len(list(vbd.storage.blkio.mem_regions)) == regions
        for p in pages:
            assert front.end_access(p), "a data page is still mapped"
        for r in front.rings:
            assert all(guest.end_access(ref) for ref in r.refs)
    finally:
        front.close()
        vbd.close()


async def test_cancellation_with_io_stuck_in_the_storage_leaves_nothing(tmp_path, platform, guest):
    """The serving task is cancelled while the vhost-user server is frozen with our requests: the
    cleanup waits drain_timeout, destroys the storage instance, then unmaps and unbinds everything."""
    with daemon_with_file(tmp_path / "qsd", DISK_SIZE, num_queues=1) as (daemon, export):
        before_storage = _fd_targets()
        vbd = make_vbd(export.socket, driver="virtio-blk-vhost-user", queues=1, drain_timeout=0.5)
        storage_fds = {fd: t for fd, t in _fd_targets().items() if before_storage.get(fd) != t}
        assert storage_fds  # the vhost-user socket, libblkio's eventfds and memfds
        front = TestFrontend(guest)
        tasks = count_tasks()
        try:
            with trio.CancelScope() as scope:
                async with trio.open_nursery() as n:
                    await n.start(vbd.serve, front.spec(), platform)
                    w = front.data_page(readonly=True, fill=b"c" * PAGE_SIZE)
                    os.kill(daemon.pid, signal.SIGSTOP)
                    for i in range(4):
                        front.rw(0, OP_WRITE, i, 8 * i, [(w.gref, 0, 7)])
                    front.push()
                    assert await front.no_response(0, 0.3)
                    assert vbd.stats()["total"]["in_flight"] == 4
                    scope.cancel()
            assert vbd.storage.closed and not vbd.serving
            assert count_tasks() == tasks
            assert all(guest.end_access(ref) for ref in front.rings[0].refs)
            assert front.end_access(w)
            # the storage's fds (vhost-user socket, queue eventfds, memory regions) are closed too
            now = _fd_targets()
            assert not [fd for fd, t in storage_fds.items() if now.get(fd) == t]
        finally:
            os.kill(daemon.pid, signal.SIGCONT)
            front.close()
            vbd.close()


async def test_cancellation_mid_io_on_io_uring_drains_and_answers(tmp_path, platform, guest):
    path = make_disk_file(tmp_path / "disk.img")
    vbd = make_vbd(path, data_path="map", queues=1)
    front = TestFrontend(guest)
    pages = front.data_pages(8, readonly=False)
    try:
        sent: list = []
        stop = trio.Event()
        with trio.CancelScope() as scope:
            async with trio.open_nursery() as n:
                await n.start(vbd.serve, front.spec(), platform)
                n.start_soon(_keep_ring_busy, front, 0, pages, stop, sent)
                with trio.fail_after(30):
                    while vbd.stats()["total"]["rd_req"] + vbd.stats()["total"]["wr_req"] < 200:
                        await trio.sleep(0.01)
                scope.cancel()
        stats = vbd.stats()["total"]
        assert stats["in_flight"] == 0 and not vbd.storage.closed
        assert (front.rings[0].ring.rsp_prod - 0) & 0xFFFFFFFF == stats["rd_req"] + stats["wr_req"]
        for p in pages:
            assert front.end_access(p)
        assert all(guest.end_access(ref) for ref in front.rings[0].refs)
    finally:
        front.close()
        vbd.close()


def test_shared_index_writes_are_never_seen_half_done():
    """Another process reading rsp_prod while the backend publishes it sees old or new, never 0.

    (Struct.pack_into zeroes its destination before writing: a frontend could read rsp_prod = 0,
    which blkfront takes as an illegal response count, and a backend reading a frontend's req_prod
    = 0 halted the ring under load.)
    """
    import mmap

    from xenblk_vhost.blkif.abi import Abi
    from xenblk_vhost.blkif.ring import BackRing, FrontRing

    shm = mmap.mmap(-1, PAGE_SIZE, mmap.MAP_SHARED | mmap.MAP_ANONYMOUS)
    view = memoryview(shm)
    FrontRing(view, Abi.NATIVE, 0)
    back = BackRing(view, Abi.NATIVE, 0)
    back.rsp_prod_pvt = back.req_cons = 1000
    back.push_responses()
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the reader: a frontend polling rsp_prod for 0.5 s
        os.close(r)
        front = FrontRing(view, Abi.NATIVE, 0, init=False)
        os.write(w, b"go")
        low = reads = 0
        end = time.monotonic() + 0.5
        while time.monotonic() < end:
            for _ in range(1000):
                if front.rsp_prod < 1000:
                    low += 1
            reads += 1000
        os.write(w, f"{low} {reads}".encode())
        os._exit(0)
    os.close(w)
    assert os.read(r, 2) == b"go"
    value = 1000
    while not os.waitpid(pid, os.WNOHANG)[0]:
        for _ in range(1000):
            value += 1
            back.rsp_prod_pvt = back.req_cons = value
            back.push_responses()
    low, reads = map(int, os.read(r, 64).split())
    os.close(r)
    back.view.release()
    view.release()
    shm.close()
    assert reads > 10_000 and value > 10_000
    assert low == 0, f"the reader saw rsp_prod below every value written {low} times in {reads} reads"


async def test_guest_destroyed_with_requests_in_flight(tmp_path, platform, hv_socket):
    """The domain dies while its read is in the storage: the read's data cannot be copied to it any
    more (GNTST_bad_domain), the request is answered ERROR on the still-mapped ring, the backend
    keeps running and disconnects cleanly."""
    from backend_support.gated_queue import gate_queues
    from xenblk_vhost.sim.guest import Guest

    g = Guest.create(hv_socket, pages=256)
    path = make_disk_file(tmp_path / "disk.img")
    vbd = make_vbd(path, queues=1)
    [q] = gate_queues(vbd, [])
    front = TestFrontend(g)
    tasks = count_tasks()
    try:
        async with trio.open_nursery() as n:
            await n.start(vbd.serve, front.spec(), platform)
            rd = front.data_page(readonly=False)
            q.hold("read", 0)
            front.rw(0, OP_READ, 1, 0, [(rd.gref, 0, 7)])
            front.push()
            assert await front.no_response(0)
            front.close()
            g.destroy()
            q.release()
            with trio.fail_after(5):
                while vbd.stats()["total"]["in_flight"]:
                    await trio.sleep(0.01)
            assert vbd.stats()["total"]["errors"] == 1 and vbd.serving
            await vbd.disconnect()
        assert not vbd.serving and count_tasks() == tasks
    finally:
        vbd.close()


async def test_do_io_failing_answers_errors_then_the_storage_is_reopened(tmp_path, platform, guest):
    """blkioq_do_io returning an error (the device is gone): what was queued and what is in flight
    is answered ERROR, later requests fail at once without touching the storage, the ring stays up;
    the next connection gets freshly opened storage and works. (Reconnecting off: with it, see
    tests/test_storage_faults.py.)"""
    import errno as errno_names

    from backend_support.gated_queue import gate_queues

    path = make_disk_file(tmp_path / "disk.img")
    vbd = make_vbd(path, queues=1, reconnect=ReconnectPolicy(enabled=False))
    [q] = gate_queues(vbd, [])
    old_storage = vbd.storage
    front = TestFrontend(guest)
    try:
        async with connected(vbd, front, platform):
            w = front.data_page(readonly=True, fill=b"x" * PAGE_SIZE)
            q.hold("write", 0)
            front.rw(0, OP_WRITE, 1, 0, [(w.gref, 0, 7)])  # in flight (held)
            front.push()
            assert await front.no_response(0)
            q.fail_next_do_io(errno_names.EIO)
            front.rw(0, OP_WRITE, 2, 8, [(w.gref, 0, 7)])  # its submission fails
            front.push()
            got = sorted(tuple(r) for r in await front.responses(0, 2))
            assert got == [(1, OP_WRITE, RSP_ERROR), (2, OP_WRITE, RSP_ERROR)]
            front.rw(0, OP_WRITE, 3, 16, [(w.gref, 0, 7)])
            front.push()
            assert tuple((await front.responses(0, 1))[0]) == (3, OP_WRITE, RSP_ERROR)
            assert vbd.stats()["total"]["wr_req"] == 3
            q.release()  # the held completion surfaces later: nobody takes it for a request any more
        # the failed storage was destroyed before its region was freed (it might still have used it)
        assert old_storage.closed
        # request 3 never reached the storage: its sectors are untouched
        assert (
            read_back(path, 16 * 512, PAGE_SIZE)
            == make_disk_file(tmp_path / "ref.img").read_bytes()[16 * 512 : 16 * 512 + PAGE_SIZE]
        )
        assert all(guest.end_access(ref) for ref in front.rings[0].refs)
        front2 = TestFrontend(guest)
        w2 = front2.data_page(readonly=True, fill=b"y" * PAGE_SIZE)
        async with connected(vbd, front2, platform):
            assert vbd.storage is not old_storage and old_storage.closed
            front2.rw(0, OP_WRITE, 4, 24, [(w2.gref, 0, 7)])
            front2.push()
            assert tuple((await front2.responses(0, 1))[0]) == (4, OP_WRITE, RSP_OKAY)
        assert read_back(path, 24 * 512, PAGE_SIZE) == b"y" * PAGE_SIZE
        front2.close()
    finally:
        front.close()
        vbd.close()


async def test_rings_drain_side_by_side_under_one_deadline(tmp_path, platform, guest, autojump_clock):
    """Two rings stuck on a frozen vhost-user server: the cleanup gives them drain_timeout together,
    not one after the other (libxl waits only 10 s for Closed, whatever the number of queues).
    The autojump clock makes the elapsed time exact: it jumps straight to each deadline."""
    drain_timeout = 4.0
    with daemon_with_file(tmp_path / "qsd", DISK_SIZE, num_queues=2) as (daemon, export):
        vbd = make_vbd(export.socket, driver="virtio-blk-vhost-user", queues=2, drain_timeout=drain_timeout)
        front = TestFrontend(guest, nrings=2)
        try:
            with trio.CancelScope() as scope:
                async with trio.open_nursery() as n:
                    await n.start(vbd.serve, front.spec(), platform)
                    w = front.data_page(readonly=True, fill=b"d" * PAGE_SIZE)
                    os.kill(daemon.pid, signal.SIGSTOP)
                    for ring in (0, 1):
                        front.rw(ring, OP_WRITE, ring, 8 * ring, [(w.gref, 0, 7)])
                        front.push(ring)
                    assert await front.no_response(0, 0.3) and await front.no_response(1, 0.3)
                    # (the ring engine's thread takes them in real time, which the autojump clock
                    # does not wait for: until both are in flight)
                    for _ in range(2000):
                        if [r["in_flight"] for r in vbd.stats()["rings"]] == [1, 1]:
                            break
                        await trio.sleep(0.01)
                    assert [r["in_flight"] for r in vbd.stats()["rings"]] == [1, 1]
                    cancelled_at = trio.current_time()
                    scope.cancel()
            assert trio.current_time() - cancelled_at == pytest.approx(drain_timeout, abs=0.5)
            assert vbd.storage.closed and not vbd.serving
            assert front.end_access(w)
        finally:
            os.kill(daemon.pid, signal.SIGCONT)
            front.close()
            vbd.close()
