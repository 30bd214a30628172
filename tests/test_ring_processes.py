"""Rings in worker processes (`ring_workers: process`, backend/datapath/process_vbd.py).

Each ring of the connection is served by a process of its own, exec'd by the
service, with its own hypervisor handles and storage instance; the control
plane's calls (serve, pause, resume, stats, disconnect, cancellation) reach
them over a control channel. Checked here on the simulated hypervisor:
a mixed workload on two rings byte for byte, the operator's pause across
processes, a worker SIGKILLed (confined: serve() ends with RingWorkerDied,
no process left, the same vbd serves the next connection), and a
cancellation (unplug, service stop) that leaves no child behind.
"""

from __future__ import annotations

import logging
import os
import signal

import pytest
import trio

from backend_support.frontend import TestFrontend
from backend_support.harness import DISK_SIZE, connected, make_disk_file, make_vbd, read_back
from backend_support.workload import Workload
from xenblk_vhost.backend.datapath import process_vbd as process_vbd_module
from xenblk_vhost.backend.datapath import ring_process
from xenblk_vhost.backend.datapath.process_vbd import ProcessVbd, RingWorkerDied
from xenblk_vhost.backend.datapath.restart_budget import RestartBudget
from xenblk_vhost.blkif.constants import OP_READ, OP_WRITE, OP_WRITE_BARRIER, RSP_OKAY
from xenblk_vhost.config import ConfigError, parse_config
from xenblk_vhost.xen.interfaces import PAGE_SIZE


def children() -> set[int]:
    """This process's live child processes (zombies are reaped by trio when waited for)."""
    out: set[int] = set()
    for task in os.listdir(f"/proc/{os.getpid()}/task"):
        try:
            with open(f"/proc/{os.getpid()}/task/{task}/children") as f:
                out.update(int(x) for x in f.read().split())
        except FileNotFoundError:
            pass
    return out


def process_vbd(path, **kw) -> ProcessVbd:
    vbd = make_vbd(path, ring_workers="process", **kw)
    assert isinstance(vbd, ProcessVbd)
    return vbd


@pytest.mark.parametrize("data_path,persistent", [("copy", False), ("map", True)])
async def test_two_rings_in_processes_serve_a_mixed_workload(tmp_path, platform, guest, data_path, persistent):
    """Reads, writes, flushes, barriers, discards and indirect requests on two rings at once, each in
    its own process: every read matches the model, the file equals it at the end, each ring's
    counters come back to the service, and no worker is left after the disconnect."""
    path = make_disk_file(tmp_path / "disk.img")
    model = bytearray(path.read_bytes())
    before = children()
    vbd = process_vbd(path, queues=2, data_path=data_path, persistent_grants=persistent)
    front = TestFrontend(guest, order=2, nrings=2, persistent=persistent)
    work = Workload(front, model, seed=11, persistent=persistent, indirect_max=20)
    try:
        async with connected(vbd, front, platform):
            pids = vbd.worker_pids()
            assert len(pids) == 2 and set(pids) <= children() and os.getpid() not in pids
            for _round in range(4):
                async with trio.open_nursery() as n:
                    for ring in range(2):
                        n.start_soon(work.round, ring, 8, (ring, 2))
        assert children() == before, "a ring worker outlived the connection"
        stats = vbd.stats()
        assert read_back(path, 0, DISK_SIZE) == model
        assert len(stats["rings"]) == 2
        assert all(r["rd_req"] + r["wr_req"] > 0 for r in stats["rings"]), stats["rings"]
        total = stats["total"]
        assert total["errors"] == 0 and total["in_flight"] == 0
        assert total["rd_req"] + total["wr_req"] + total["f_req"] + total["ds_req"] == 4 * 2 * 8
        for kind in ("read", "write", "barrier", "indirect"):
            assert any(k.startswith(kind) for k in work.counts), f"workload never sent a {kind}"
        work.pool.revoke_all()
        for r in front.rings:
            assert all(guest.end_access(ref) for ref in r.refs), "ring pages still mapped"
    finally:
        front.close()
        vbd.close()


async def test_the_service_gets_each_workers_counters_on_request(tmp_path, platform, guest):
    """The workers report their counters every STATS_INTERVAL (1 s) and sleep in the ring engine's poll
    up to SERVE_SLICE_MS (1 s): refresh_stats (`ctl stats`) asks for them, which wakes the poll, and has
    every request answered so far counted well before either period."""
    path = make_disk_file(tmp_path / "disk.img")
    vbd = process_vbd(path, queues=2)
    front = TestFrontend(guest, nrings=2)
    try:
        async with connected(vbd, front, platform):
            pages = [front.data_page(readonly=True, fill=bytes([0x61 + k]) * PAGE_SIZE) for k in range(6)]
            for rnd in range(3):
                for ring in range(2):
                    for k in range(6):
                        front.rw(ring, OP_WRITE, 10 * rnd + k, 8 * (k + 6 * ring), [(pages[k].gref, 0, 7)])
                    front.push(ring)
                for ring in range(2):
                    with trio.fail_after(20):
                        assert len(await front.responses(ring, 6)) == 6
                t0 = trio.current_time()
                with trio.fail_after(20):
                    await vbd.refresh_stats()
                took = trio.current_time() - t0
                counted = [r["wr_req"] for r in vbd.stats()["rings"]]
                assert counted == [6 * (rnd + 1)] * 2, (rnd, counted)
                # (answered, not waited out: a worker's periodic report would have taken up to a second)
                assert took < min(process_vbd_module.STATS_REFRESH_TIMEOUT, ring_process.STATS_INTERVAL) / 2, took
    finally:
        front.close()
        vbd.close()


async def test_pause_holds_every_worker_and_resume_lets_them_go(tmp_path, platform, guest):
    path = make_disk_file(tmp_path / "disk.img")
    vbd = process_vbd(path, queues=2)
    front = TestFrontend(guest, nrings=2)
    try:
        async with connected(vbd, front, platform):
            with trio.fail_after(20):
                await vbd.pause()
            pages = [front.data_page(readonly=True, fill=bytes([0x41 + ring]) * PAGE_SIZE) for ring in range(2)]
            for ring in range(2):
                front.rw(ring, OP_WRITE, 1, 64 + 8 * ring, [(pages[ring].gref, 0, 7)])
                front.push(ring)
            for ring in range(2):
                assert await front.no_response(ring), f"ring {ring} served a request while paused"
            vbd.resume()
            for ring in range(2):
                with trio.fail_after(20):
                    [rsp] = await front.responses(ring, 1)
                assert tuple(rsp) == (1, OP_WRITE, RSP_OKAY)
        for ring in range(2):
            assert read_back(path, (64 + 8 * ring) * 512, PAGE_SIZE) == bytes([0x41 + ring]) * PAGE_SIZE
    finally:
        front.close()
        vbd.close()


async def test_a_barrier_holds_the_other_rings_worker(tmp_path, platform, guest):
    """A barrier met on ring 0's worker: the service drains and holds ring 1's worker, lets ring 0 run
    it, then releases ring 1, which serves again."""
    path = make_disk_file(tmp_path / "disk.img")
    vbd = process_vbd(path, queues=2)
    front = TestFrontend(guest, nrings=2)
    try:
        async with connected(vbd, front, platform):
            b = front.data_page(readonly=True, fill=b"B" * PAGE_SIZE)
            w = front.data_page(readonly=True, fill=b"W" * PAGE_SIZE)
            front.rw(0, OP_WRITE_BARRIER, 1, 1600, [(b.gref, 0, 7)])
            front.push(0)
            with trio.fail_after(20):
                [rb] = await front.responses(0, 1)
            assert tuple(rb) == (1, OP_WRITE_BARRIER, RSP_OKAY)
            assert vbd.barriers_held == 1
            front.rw(1, OP_WRITE, 2, 2400, [(w.gref, 0, 7)])
            front.push(1)
            with trio.fail_after(20):
                [rw] = await front.responses(1, 1)
            assert tuple(rw) == (2, OP_WRITE, RSP_OKAY)
        assert read_back(path, 1600 * 512, PAGE_SIZE) == b"B" * PAGE_SIZE
        assert read_back(path, 2400 * 512, PAGE_SIZE) == b"W" * PAGE_SIZE
    finally:
        front.close()
        vbd.close()


async def test_each_worker_keeps_its_rings_journal_and_the_next_one_takes_it_over(tmp_path, platform, guest):
    """With journals: one file per ring, written by that ring's worker; the service stopping (serve
    cancelled) leaves them, workers of the next service take them over and serve on; a disconnect in
    order removes them."""
    path = make_disk_file(tmp_path / "disk.img")
    jdir = tmp_path / "journals"
    jdir.mkdir()
    front = TestFrontend(guest, nrings=2)
    pages = [front.data_page(readonly=True, fill=bytes([0x61 + ring]) * PAGE_SIZE) for ring in range(2)]
    names = {f"{front.spec().frontend_domid}-xvda-ring{ring}.journal" for ring in range(2)}
    vbd = process_vbd(path, queues=2, journal_dir=jdir)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(vbd.serve, front.spec(), platform)
            for ring in range(2):
                front.rw(ring, OP_WRITE, 10 + ring, 320 + 8 * ring, [(pages[ring].gref, 0, 7)])
                front.push(ring)
            for ring in range(2):
                with trio.fail_after(20):
                    [rsp] = await front.responses(ring, 1)
                assert tuple(rsp) == (10 + ring, OP_WRITE, RSP_OKAY)
            assert {p.name for p in jdir.iterdir()} == names
            nursery.cancel_scope.cancel()  # the service stops: the frontend stays connected
        assert {p.name for p in jdir.iterdir()} == names
    finally:
        vbd.close()
    vbd = process_vbd(path, queues=2, journal_dir=jdir)
    try:
        async with connected(vbd, front, platform):
            into = [front.data_page(readonly=False) for _ring in range(2)]
            for ring in range(2):
                front.rw(ring, OP_READ, 20 + ring, 320 + 8 * ring, [(into[ring].gref, 0, 7)])
                front.push(ring)
            for ring in range(2):
                with trio.fail_after(20):
                    [rsp] = await front.responses(ring, 1)
                assert tuple(rsp) == (20 + ring, OP_READ, RSP_OKAY)
                assert into[ring].bytes() == bytes([0x61 + ring]) * PAGE_SIZE
        assert not list(jdir.iterdir())
        for ring in range(2):
            assert read_back(path, (320 + 8 * ring) * 512, PAGE_SIZE) == bytes([0x61 + ring]) * PAGE_SIZE
    finally:
        front.close()
        vbd.close()


async def test_a_killed_worker_is_replaced_and_takes_its_ring_over(tmp_path, platform, guest, caplog):
    """SIGKILL ring 1's worker twice in the middle of verified rounds (right after the guest pushed 24
    requests: the kill finds some taken, some answered, some not yet read): each time a new worker
    takes the ring over from its journal, the guest gets every answer exactly once and OKAY, with no
    reconnect (the same connection, serve() never ends), and ring 0 completes rounds all the while
    ring 1's worker is being replaced."""
    caplog.set_level(logging.INFO)  # the workers forward records from this level (their takeover's)
    path = make_disk_file(tmp_path / "disk.img")
    model = bytearray(path.read_bytes())
    jdir = tmp_path / "journals"
    jdir.mkdir()
    before = children()
    vbd = process_vbd(path, queues=2, journal_dir=jdir, drain_timeout=2)
    front = TestFrontend(guest, order=2, nrings=2)
    # no barriers: a barrier on ring 0 rightly waits for ring 1's replacement (every ring drained)
    work = Workload(front, model, seed=23, indirect_max=20, barrier=False)
    work.response_timeout = 60.0  # a replacement is an interpreter's start-up, on a loaded machine
    ring0_done: list[float] = []
    kill_at: list[float] = []
    armed: list[float] = []  # the delay after ring 1's next push at which its worker is killed
    real_push = front.push
    try:
        async with connected(vbd, front, platform):
            async with trio.open_nursery() as nursery:
                async def kill(pid: int, delay: float) -> None:
                    if delay:
                        await trio.sleep(delay)
                    os.kill(pid, signal.SIGKILL)
                    kill_at.append(trio.current_time())

                def push(ring: int = 0) -> None:
                    real_push(ring)
                    if ring == 1 and armed:
                        nursery.start_soon(kill, vbd.worker_pids()[1], armed.pop())

                front.push = push  # type: ignore[method-assign]
                stop = trio.Event()

                async def ring0() -> None:
                    while not stop.is_set():
                        await work.round(0, 8, (0, 2))
                        ring0_done.append(trio.current_time())

                nursery.start_soon(ring0)
                for kills in (1, 2):
                    await work.round(1, 8, (1, 2))
                    pids = vbd.worker_pids()
                    armed.append(0.0)
                    # killed in the middle of this one (on a loaded machine the kill may come only
                    # after it: then the next round meets the replacement)
                    await work.round(1, 24, (1, 2))
                    with trio.fail_after(10):  # a round the worker answered before the kill task ran
                        while len(kill_at) < kills:
                            await trio.sleep(0.01)
                    with trio.fail_after(60):  # the new worker serves before the service reads its `started`
                        while len(vbd.worker_pids()) < 2 or vbd.worker_pids()[1] == pids[1]:
                            await trio.sleep(0.01)
                    back = trio.current_time()
                    now = vbd.worker_pids()
                    assert now[0] == pids[0] and now[1] != pids[1], (pids, now)
                    assert any(kill_at[-1] < t < back for t in ring0_done), \
                        "ring 0 stopped while ring 1's worker was replaced"
                    await work.round(1, 8, (1, 2))
                stop.set()
            assert vbd.serving and vbd.worker_restarts == 2
            for ring in range(2):
                assert await front.no_response(ring), f"ring {ring}: a request was answered twice"
        assert children() == before, "a ring worker outlived the connection"
        assert read_back(path, 0, DISK_SIZE) == model
        stats = vbd.stats()
        assert stats["total"]["errors"] == 0 and stats["total"]["in_flight"] == 0
        counted = [r["rd_req"] + r["wr_req"] + r["f_req"] + r["ds_req"] for r in stats["rings"]]
        # ring 0 counted everything; ring 1 at least its last round (a killed worker's counts since
        # its last stats message, at most STATS_INTERVAL old, die with it)
        assert counted[0] >= 8 * len(ring0_done) and counted[1] >= 8, (counted, len(ring0_done))
        replaced = [r.getMessage() for r in caplog.records if "takes its ring over from the journal" in r.getMessage()]
        assert len(replaced) == 2 and all("ring1" in m and "SIGKILL" in m for m in replaced), replaced
        took = [r.getMessage() for r in caplog.records if "took the ring over from its journal" in r.getMessage()]
        assert len(took) == 2 and all("ring1" in m for m in took), took
    finally:
        front.close()
        vbd.close()


async def test_a_worker_that_keeps_dying_puts_the_device_in_error(tmp_path, platform, guest, monkeypatch):
    """Past the restart budget (here 1 in the window) the next death ends serve() with RingWorkerDied,
    the device's error state, and no process is left."""
    monkeypatch.setattr(process_vbd_module, "MAX_RESTARTS", 1)
    path = make_disk_file(tmp_path / "disk.img")
    jdir = tmp_path / "journals"
    jdir.mkdir()
    before = children()
    vbd = process_vbd(path, queues=2, journal_dir=jdir, drain_timeout=2)
    front = TestFrontend(guest, nrings=2)
    try:
        with pytest.raises(BaseException) as failure:
            async with trio.open_nursery() as nursery:
                await nursery.start(vbd.serve, front.spec(), platform)
                first = vbd.worker_pids()[1]
                os.kill(first, signal.SIGKILL)
                with trio.fail_after(60):
                    while vbd.worker_pids()[1:] in ([], [first]):
                        await trio.sleep(0.05)
                os.kill(vbd.worker_pids()[1], signal.SIGKILL)
                with trio.fail_after(60):
                    await trio.sleep_forever()
        died = [e for e in _leaves(failure.value) if isinstance(e, RingWorkerDied)]
        assert died and "ring1" in str(died[0]) and "not restarted: 1 restarts in 60 s" in str(died[0]), failure.value
        assert vbd.worker_restarts == 1 and not vbd.serving
        assert children() == before, "a ring worker outlived the failure"
    finally:
        front.close()
        vbd.close()


async def test_a_killed_worker_is_confined(tmp_path, platform, guest):
    """Without a journal (run --no-journal) a killed worker cannot be replaced (its ring's state
    cannot be read back): serve() ends with RingWorkerDied naming it, the other worker is stopped,
    no process is left, and the same vbd serves the frontend's next connection."""
    path = make_disk_file(tmp_path / "disk.img")
    before = children()
    vbd = process_vbd(path, queues=2, drain_timeout=2)
    front = TestFrontend(guest, nrings=2)
    try:
        with pytest.raises(BaseException) as failure:
            async with trio.open_nursery() as nursery:
                await nursery.start(vbd.serve, front.spec(), platform)
                os.kill(vbd.worker_pids()[1], signal.SIGKILL)
                with trio.fail_after(30):
                    await trio.sleep_forever()
        died = [e for e in _leaves(failure.value) if isinstance(e, RingWorkerDied)]
        assert died and "ring1" in str(died[0]) and "SIGKILL" in str(died[0]), failure.value
        assert not vbd.serving
        assert children() == before, "a ring worker outlived the failure"
        front.close()
        front = TestFrontend(guest, nrings=2)  # the frontend connects again
        page = front.data_page(readonly=False)
        async with connected(vbd, front, platform):
            front.rw(0, OP_READ, 7, 0, [(page.gref, 0, 7)])
            front.push(0)
            with trio.fail_after(20):
                [rsp] = await front.responses(0, 1)
            assert tuple(rsp) == (7, OP_READ, RSP_OKAY)
        assert children() == before
    finally:
        front.close()
        vbd.close()


async def test_cancelled_serve_leaves_no_worker(tmp_path, platform, guest):
    """Unplug or the service stopping cancel the device's nursery: every worker ends with it."""
    path = make_disk_file(tmp_path / "disk.img")
    before = children()
    vbd = process_vbd(path, queues=2)
    front = TestFrontend(guest, nrings=2)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(vbd.serve, front.spec(), platform)
            assert len(set(vbd.worker_pids()) & children()) == 2
            nursery.cancel_scope.cancel()
        assert not vbd.serving
        assert children() == before
    finally:
        front.close()
        vbd.close()


def _leaves(e: BaseException) -> list[BaseException]:
    if isinstance(e, BaseExceptionGroup):
        return [leaf for inner in e.exceptions for leaf in _leaves(inner)]
    return [e]


def test_config_ring_workers():
    """inline by default; process is opt-in per disk; refused for vhost-user (one server connection
    per worker would be needed)."""
    def disk(extra: str, driver: str = "io_uring"):
        text = f"domain: {{domid: 3}}\ndisks:\n  - {{vdev: xvda, driver: {driver}, path: /x{extra}}}\n"
        return parse_config(text, check_storage=False).disks[0]

    assert disk("").ring_workers == "inline"
    assert disk(", ring_workers: process").ring_workers == "process"
    with pytest.raises(ConfigError, match="ring_workers"):
        disk(", ring_workers: threads")
    with pytest.raises(ConfigError, match="ring_workers: process is not supported"):
        disk(", ring_workers: process", driver="virtio-blk-vhost-user")


def test_restart_budget_counts_restarts_in_a_sliding_window():
    budget = RestartBudget(3, 60.0)
    assert [budget.take(t) for t in (0.0, 1.0, 2.0, 3.0)] == [True, True, True, False]
    assert budget.used == 3
    assert not budget.take(59.9)  # the first restart still inside the window
    assert budget.take(60.0) and budget.used == 3  # it left: room for one
    assert not budget.take(60.5)
    assert budget.take(200.0) and budget.used == 1
