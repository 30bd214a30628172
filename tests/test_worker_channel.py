"""The service <-> ring worker control channel (backend/datapath/worker_channel.py): frames in order,
whole, written at once from trio's thread when nothing is queued (a ring worker's loop may block in the
ring engine's poll right after sending), queued for run() otherwise."""

from __future__ import annotations

import socket

import trio

from xenblk_vhost.backend.datapath.worker_channel import WorkerChannel


def _pair() -> tuple[WorkerChannel, WorkerChannel]:
    a, b = socket.socketpair()
    return WorkerChannel(a), WorkerChannel(b)


async def test_a_frame_sent_from_trio_is_on_the_socket_before_any_task_runs():
    here, there = _pair()
    try:
        here.send({"op": "stats", "n": 1})  # no run() task: nothing else could write it
        with trio.fail_after(5):
            assert await there.receive() == {"op": "stats", "n": 1}
    finally:
        here.close()
        there.close()


async def test_frames_larger_than_the_socket_takes_arrive_whole_and_in_order():
    here, there = _pair()
    big = b"x" * (8 << 20)  # beyond a socketpair's buffer: a part written at once, the rest by run()
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(here.run)
            here.send({"op": "big", "data": big})
            here.send({"op": "after", "n": 2})  # queued behind the rest of the first
            with trio.fail_after(30):
                first = await there.receive()
                second = await there.receive()
            nursery.cancel_scope.cancel()
        assert first == {"op": "big", "data": big}
        assert second == {"op": "after", "n": 2}
    finally:
        here.close()
        there.close()


async def test_frames_sent_from_another_thread_are_written_by_run():
    here, there = _pair()
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(here.run)
            await trio.to_thread.run_sync(lambda: [here.send({"op": "log", "k": k}) for k in range(50)])
            with trio.fail_after(10):
                got = [await there.receive() for _ in range(50)]
            nursery.cancel_scope.cancel()
        assert got == [{"op": "log", "k": k} for k in range(50)]
    finally:
        here.close()
        there.close()


async def test_a_gone_peer_ends_the_channel_without_raising_from_send():
    here, there = _pair()
    there.close()
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(here.run)
            for k in range(3):
                here.send({"op": "stats", "k": k})  # (EPIPE: left to run(), which closes the channel)
            with trio.fail_after(10):
                while not here.closed:
                    await trio.sleep(0.01)
            nursery.cancel_scope.cancel()
        assert await here.receive() is None
    finally:
        here.close()


class _Steps(trio.abc.Instrument):
    """How many times each task named like `name` ran a step."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.steps = 0

    def before_task_step(self, task) -> None:
        if self.name in task.name:
            self.steps += 1


async def test_an_idle_channel_does_not_wake_its_loop():
    """run() sleeps until there is something to write (the service's loop under TCG pays milliseconds a
    wake-up): over half a second idle, a step or two to start, none after."""
    here, there = _pair()
    steps = _Steps("WorkerChannel.run")
    trio.lowlevel.add_instrument(steps)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(here.run)
            await trio.sleep(0.5)
            idle = steps.steps
            await trio.to_thread.run_sync(here.send, {"op": "log", "k": 1})  # (another thread wakes it)
            with trio.fail_after(10):
                assert await there.receive() == {"op": "log", "k": 1}
            nursery.cancel_scope.cancel()
        assert idle <= 2, idle
    finally:
        trio.lowlevel.remove_instrument(steps)
        here.close()
        there.close()
