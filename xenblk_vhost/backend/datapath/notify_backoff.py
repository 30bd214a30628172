"""Bounding what a guest that only notifies can cost: a backoff on spurious wake-ups.

A frontend may kick its event channel as fast as it likes without putting
anything on the ring. Every kick wakes the ring's intake, which reads the
event, unmasks it, looks at the ring and finds nothing: measured at 9-12k
wake-ups a second, a good part of a core, for nothing. Linux blkback has
the same exposure and, since XSA-332, binds its channel "lateeoi": when the
handler found no work it reports the event as spurious and the kernel
delays re-enabling the channel, longer after each spurious event in a row,
and not at all once an event brought work.

The ring worker does the equivalent before it waits again: after a
wake-up that found nothing, a SpuriousBackoff says how long to pause. While
the ring worker pauses, the guest's further kicks coalesce into one pending
event (Xen's pending bit; the simulator's eventfd counter), so at most one
wake-up per pause reaches us. The first spurious wake-up in a row costs
nothing (a well-behaved frontend has one now and then, racing our final
check); from the second the pause grows 1 ms, 2 ms, 4 ms... up to MAX_DELAY;
a wake-up that found work resets it. A well-behaved ring, which is only
woken for requests, is never paused.
"""

from __future__ import annotations

FREE_SPURIOUS = 1  # spurious wake-ups in a row that cost no pause
FIRST_DELAY = 0.001  # seconds: the pause after the first one that does
MAX_DELAY = 0.1  # seconds: the longest pause (a storming guest's own requests may wait this long)


class SpuriousBackoff:
    """Counts spurious wake-ups in a row; says how long to pause before waiting for the next one."""

    __slots__ = ("in_a_row", "total", "max_delay")

    def __init__(self, max_delay: float | None = None) -> None:
        self.in_a_row = 0
        self.total = 0
        # read at construction: scripts/bench_notify_storm.py sets MAX_DELAY = 0 for "no backoff"
        self.max_delay = MAX_DELAY if max_delay is None else max_delay

    def worked(self) -> None:
        """The last wake-up found requests."""
        self.in_a_row = 0

    def spurious(self) -> float:
        """The last wake-up found nothing: the pause (seconds, 0 for none) before waiting again."""
        self.total += 1
        self.in_a_row += 1
        extra = self.in_a_row - FREE_SPURIOUS
        if extra <= 0:
            return 0.0
        if extra > 16:  # 2**16 ms is far beyond any max_delay; keep the number small
            return self.max_delay
        return min(FIRST_DELAY * (1 << (extra - 1)), self.max_delay)
