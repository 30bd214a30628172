"""The vbd-wide write barrier: drain everything in flight on every ring, then run.

Linux blkback answers BLKIF_OP_WRITE_BARRIER by waiting until the ring has
no request in flight (xen_blk_drain_io), then issuing the write with a
preflush. We do that across all rings of the vbd, since a multi-queue
frontend's barrier orders against its other queues too:

  1. a ring that meets a barrier first dispatches what precedes it in its
     batch, then calls `drain()`: the gate closes, and no ring takes new
     requests from its shared ring until the gate opens again (requests a
     ring had already taken are dispatched and count as in flight);
  2. drain() returns once no request is in flight on any ring;
  3. the ring runs the barrier (flush, write, flush) and answers it;
  4. `reopen()`.
A second barrier (on any ring) waits in drain() for the first to finish.

The operator's pause (Vbd.pause, the snapshot hook) is the same drain
without the barrier: the gate stays closed until resume() reopens it; a
barrier met meanwhile waits in drain() like any second barrier. `close()`
shuts a gate at once, for a paused vbd's new connection (nothing in flight).

Every ring reports its requests with `enter()` when it gives one a request
slot and `leave()` when it has answered it; both are O(1) and never wait.
"""

from __future__ import annotations

from collections.abc import Callable

import trio


class BarrierGate:
    __slots__ = ("in_flight", "_closed", "_opened", "_drained", "_on_close")

    def __init__(self) -> None:
        self.in_flight = 0
        self._on_close: list[Callable[[], None]] = []
        self._closed = False
        self._opened = trio.Event()
        self._opened.set()
        self._drained: trio.Event | None = None

    @property
    def closed(self) -> bool:
        return self._closed

    def enter(self, n: int = 1) -> None:
        self.in_flight += n

    def leave(self, n: int = 1) -> None:
        self.in_flight -= n
        if self._drained is not None and self.in_flight == 0:
            self._drained.set()

    async def wait_open(self) -> None:
        await self._opened.wait()

    def on_close(self, fn: Callable[[], None]) -> None:
        """Call fn as the gate closes, before in_flight is looked at: a ring served from a thread
        (the ring engine's own poll) stops taking requests and brings its counts up to date."""
        self._on_close.append(fn)

    async def drain(self) -> None:
        """Close the gate (after any barrier already running) and wait for in-flight to reach 0."""
        while self._closed:
            await self._opened.wait()
        self._closed = True
        self._opened = trio.Event()
        for fn in self._on_close:
            fn()
        try:
            if self.in_flight:
                self._drained = trio.Event()
                await self._drained.wait()
        except BaseException:
            self.reopen()
            raise
        finally:
            self._drained = None

    def close(self) -> None:
        """Closed from the start (nothing can be in flight yet): a paused vbd's new connection."""
        assert not self.in_flight and not self._closed
        self._closed = True
        self._opened = trio.Event()

    def reopen(self) -> None:
        self._closed = False
        self._opened.set()
