"""Event-driven mode: Queue.wait_io() on the completion fd, under trio, on every target."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
import trio
import trio.testing

from storage_support.patterns import block_pattern, pattern_range, read_file
from storage_support.targets import TARGET_NAMES, Target, open_target
from xenblk_vhost.storage import BlkioError, StorageDevice

BS = 4096
DEADLINE = 20  # seconds for a whole test body: a hang fails instead of wedging the suite


@pytest.fixture(params=TARGET_NAMES)
def target(request, tmp_path: Path):
    yield from open_target(request, tmp_path)


async def _drain(q, tags: set[int]) -> dict[int, int]:
    done: dict[int, int] = {}
    while len(done) < len(tags):
        for tag, ret in await q.wait_io(timeout=DEADLINE):
            assert tag in tags and tag not in done
            done[tag] = ret
    return done


async def test_completion_fd_loop_keeps_queue_depth(target: Target):
    """Random-order reads at QD16 driven only by wait_io(); every block checked."""
    dev, q = target.device, target.device.queues[0]
    nblocks, qd = 256, 16
    fd = os.open(target.backing, os.O_WRONLY)
    os.pwrite(fd, pattern_range(0, nblocks, seed=7), 0)
    os.fsync(fd)
    os.close(fd)
    region = dev.alloc_mem_region(qd * BS)
    order = [(i * 97) % nblocks for i in range(nblocks)]  # a permutation, not sequential
    slot_block: dict[int, int] = {}
    checked = 0
    with trio.fail_after(DEADLINE):
        free_slots = list(range(qd))
        pending = iter(order)
        while checked < nblocks:
            for block in pending:
                slot = free_slots.pop()
                slot_block[slot] = block
                q.read(block * BS, region.address(slot * BS), BS, slot)
                if not free_slots:
                    break
            for slot, ret in await q.wait_io():
                assert ret == 0
                block = slot_block.pop(slot)
                assert bytes(region.view[slot * BS : (slot + 1) * BS]) == block_pattern(block, seed=7)
                free_slots.append(slot)
                checked += 1
    assert checked == nblocks and not slot_block


async def test_other_tasks_run_while_requests_complete_inline(target: Target):
    """Page-cached io_uring completes at submit: wait_io must still let others run."""
    dev, q = target.device, target.device.queues[0]
    region = dev.alloc_mem_region(BS)
    ticks = 0

    async def ticker():
        nonlocal ticks
        while True:
            ticks += 1
            await trio.sleep(0)

    with trio.fail_after(DEADLINE):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(ticker)
            await trio.sleep(0)  # ticker is running (it never blocks, so no wait_all_tasks_blocked)
            before = ticks
            for i in range(50):
                q.read(0, region.addr, BS, i)
                assert await q.wait_io() == [(i, 0)]
            assert ticks > before  # the I/O loop yielded to the ticker
            nursery.cancel_scope.cancel()


async def test_spurious_wakeup_is_tolerated(target: Target):
    dev, q = target.device, target.device.queues[0]
    region = dev.alloc_mem_region(BS)
    result = []

    async def waiter():
        result.extend(await q.wait_io(timeout=DEADLINE))

    with trio.fail_after(DEADLINE):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(waiter)
            await trio.testing.wait_all_tasks_blocked()  # asleep on the completion fd, nothing in flight
            os.write(q.completion_fd, (1).to_bytes(8, "little"))  # an event with no completion behind it
            await trio.testing.wait_all_tasks_blocked()  # woke, found nothing, asleep again
            assert result == []
            q.read(0, region.addr, BS, 42)
            q.submit()  # the sleeping waiter is woken by the real completion
    assert result == [(42, 0)]


async def test_cancelled_wait_leaves_queue_usable(target: Target):
    dev, q = target.device, target.device.queues[0]
    region = dev.alloc_mem_region(BS)
    with trio.fail_after(DEADLINE):
        async with trio.open_nursery() as nursery:
            cancelled = trio.CancelScope()

            async def waiter():
                with cancelled:
                    await q.wait_io()
                    raise AssertionError("nothing was in flight")

            nursery.start_soon(waiter)
            await trio.testing.wait_all_tasks_blocked()
            cancelled.cancel()
        assert cancelled.cancelled_caught
        q.read(0, region.addr, BS, 5)
        assert await q.wait_io() == [(5, 0)]


async def test_wait_io_times_out_with_etime(target: Target, autojump_clock):
    q = target.device.queues[0]
    with trio.fail_after(DEADLINE):
        with pytest.raises(BlkioError) as err:
            await q.wait_io(timeout=3)
    assert err.value.errno == errno.ETIME
    assert "no completion within 3 s" in str(err.value)


async def test_close_wakes_a_waiting_task(target: Target):
    q = target.device.queues[0]
    with trio.fail_after(DEADLINE):
        async with trio.open_nursery() as nursery:
            outcome = []

            async def waiter():
                try:
                    await q.wait_io()
                except trio.ClosedResourceError:
                    outcome.append("closed")

            nursery.start_soon(waiter)
            await trio.testing.wait_all_tasks_blocked()
            target.device.close()
    assert outcome == ["closed"]
    with pytest.raises(BlkioError) as err:
        await q.wait_io()
    assert err.value.errno == errno.EBADF


async def test_two_queues_used_concurrently(vhost_user_disk):
    """Two trio tasks, one queue each, on the 2-queue qsd export; checked in the file."""
    props = {"path": str(vhost_user_disk.socket)}
    with StorageDevice.open("virtio-blk-vhost-user", props, num_queues=2) as dev:
        assert len(dev.queues) == 2
        region = dev.alloc_mem_region(2 * 64 * BS)
        served = {0: 0, 1: 0}

        async def writer(qi: int):
            q = dev.queues[qi]
            first = 1000 + qi * 64  # disjoint ranges
            base = qi * 64 * BS
            region.view[base : base + 64 * BS] = pattern_range(first, 64, seed=qi)
            for chunk in range(0, 64, 8):  # 8 in flight at a time
                for i in range(chunk, chunk + 8):
                    q.write((first + i) * BS, region.address(base + i * BS), BS, i)
                done = await _drain(q, set(range(chunk, chunk + 8)))
                assert set(done.values()) == {0}
                served[qi] += len(done)
                await trio.sleep(0)  # interleave with the other queue
            q.flush(999)
            assert await _drain(q, {999}) == {999: 0}

        with trio.fail_after(DEADLINE):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(writer, 0)
                nursery.start_soon(writer, 1)
        assert served == {0: 64, 1: 64}
    for qi in (0, 1):
        first = 1000 + qi * 64
        assert read_file(vhost_user_disk.image, first * BS, 64 * BS) == pattern_range(first, 64, seed=qi)


async def test_close_with_requests_in_flight(qsd, vhost_user_disk):
    """Requests stuck in a stopped daemon; close() must return and retire everything."""
    dev = StorageDevice.open("virtio-blk-vhost-user", {"path": str(vhost_user_disk.socket)})
    q = dev.queues[0]
    region = dev.alloc_mem_region(32 * BS)
    qsd.freeze()
    try:
        for i in range(32):
            q.read(i * BS, region.address(i * BS), BS, i)
        q.submit()
        assert q.do_io(0) == []  # nothing can complete: the server is stopped
        with trio.fail_after(DEADLINE):
            dev.close()
        assert q.closed and region.released
    finally:
        qsd.thaw()
    # the daemon survives a client that vanished mid-request, and serves a new one
    with StorageDevice.open("virtio-blk-vhost-user", {"path": str(vhost_user_disk.socket)}) as dev2:
        r2 = dev2.alloc_mem_region(BS)
        dev2.queues[0].read(0, r2.addr, BS, 1)
        with trio.fail_after(DEADLINE):
            assert await dev2.queues[0].wait_io() == [(1, 0)]


async def test_close_with_requests_in_flight_io_uring_direct(tmp_path):
    path = tmp_path / "d.img"
    with open(path, "wb") as f:
        f.truncate(8 << 20)
    dev = StorageDevice.open("io_uring", {"path": str(path), "direct": True})
    q = dev.queues[0]
    region = dev.alloc_mem_region(64 * BS)
    for i in range(64):
        q.write(i * BS, region.address(i * BS), BS, i)
    q.submit()
    with trio.fail_after(DEADLINE):
        dev.close()  # io_uring teardown waits for or cancels what is in flight
    assert q.closed and region.released
