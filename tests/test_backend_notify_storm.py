"""A guest that only notifies (issue 10): the ring's wake-ups that find nothing back off, as
blkback's lateeoi does since XSA-332, and a wake-up that brings a request resets the backoff.
CPU figures under a storm: scripts/bench_notify_storm.py (not timed here)."""

from __future__ import annotations

import time

import pytest
import trio

from backend_support.frontend import TestFrontend
from backend_support.harness import connected, make_disk_file, make_vbd
from xenblk_vhost.backend.datapath.notify_backoff import FIRST_DELAY, FREE_SPURIOUS, MAX_DELAY, SpuriousBackoff
from xenblk_vhost.backend.datapath.ring_engine import SPIN_ENV
from xenblk_vhost.blkif.constants import OP_READ, RSP_OKAY


def test_the_pause_grows_after_the_first_spurious_wakeup_and_resets_on_work():
    b = SpuriousBackoff()
    pauses = [b.spurious() for _ in range(12)]
    assert pauses[0] == 0.0  # one now and then is normal (a race with the final check)
    assert pauses[1:5] == [FIRST_DELAY, 2 * FIRST_DELAY, 4 * FIRST_DELAY, 8 * FIRST_DELAY]
    assert max(pauses) == MAX_DELAY and pauses[-1] == MAX_DELAY
    b.worked()
    assert b.spurious() == 0.0 and b.spurious() == FIRST_DELAY
    assert b.total == 14
    for _ in range(1000):
        assert b.spurious() <= MAX_DELAY


class _CountingChannel:
    """The ring's channel, counting the wake-ups it hands the ring (independently of its stats)."""

    def __init__(self, channel) -> None:
        self._channel = channel
        self.wakeups = 0

    def __getattr__(self, name):
        return getattr(self._channel, name)

    async def wait(self) -> None:
        await self._channel.wait()
        self.wakeups += 1


async def _storm(front, ring: int, stop: trio.Event) -> int:
    kicks = 0
    while not stop.is_set():
        front.kick(ring)
        kicks += 1
        await trio.sleep(0)
    return kicks


@pytest.mark.parametrize("spin_us", [None, "0"])
async def test_a_notify_storm_wakes_the_ring_a_bounded_number_of_times(tmp_path, platform, guest, monkeypatch,
                                                                      spin_us):
    """A frontend kicking its channel non-stop for 1 s, nothing on the ring: without the backoff
    every kick that lands between two waits is a wake-up (hundreds to thousands here, sharing the
    loop with the storm); with it, at most one per pause: about 1 + log2(MAX_DELAY/FIRST_DELAY) +
    1 s / MAX_DELAY. A real request during the storm is still answered, and resets the pause.
    spin_us "0": the engine's poll without its look (the default where a clock read is a syscall),
    which absorbs the first spurious wake-up in a row all the same."""
    if spin_us is not None:
        monkeypatch.setenv(SPIN_ENV, spin_us)
    path = make_disk_file(tmp_path / "disk.img")
    vbd = make_vbd(path, queues=1)
    front = TestFrontend(guest)
    page = front.data_page(readonly=False)
    try:
        async with connected(vbd, front, platform):
            [worker] = vbd._workers
            counting = worker.channel = _CountingChannel(worker.channel)
            stop = trio.Event()
            async with trio.open_nursery() as n:
                n.start_soon(_storm, front, 0, stop)
                await trio.sleep(1.0)
                wakeups = counting.wakeups
                spurious = vbd.stats()["total"]["spurious_wakeups"]
                # in the middle of the storm, a real request
                t0 = time.monotonic()
                front.rw(0, OP_READ, 1, 0, [(page.gref, 0, 7)])
                front.push()
                assert tuple((await front.responses(0, 1))[0]) == (1, OP_READ, RSP_OKAY)
                waited = time.monotonic() - t0
                stop.set()
            bound = 2 + 7 + 1.0 / MAX_DELAY + 5  # free one, the growing pauses, the capped ones, slack
            assert wakeups <= bound, wakeups
            # the operator sees the storm in the stats (two wake-ups came before the counting channel); they
            # count the ring engine's poll's too (the ring sleeps there between trio's waits: it absorbs
            # FREE_SPURIOUS in a row, then the backoff above decides), at most 1 + FREE_SPURIOUS per trio wake-up
            assert wakeups // 2 <= spurious <= (2 + FREE_SPURIOUS) * (wakeups + 2), (wakeups, spurious)
            assert waited < MAX_DELAY + 2.0  # at most one pause (plus a loaded machine's scheduling)
    finally:
        front.close()
        vbd.close()
