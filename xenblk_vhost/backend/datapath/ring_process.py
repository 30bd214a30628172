"""Inside a ring worker process: one ring of a connection, served by a Vbd of its own.

The service (process_vbd.py) execs `python -m xenblk_vhost.daemon.ring_process FD` and
speaks over the socketpair FD (worker_channel.py). This side:

    <- start   {disk, spec (this ring alone), sim, journal_dir, timeouts, sectors, paused, log_level}
               opens its own Platform (gntdev, evtchn), its own storage instance with one queue
               (io_uring: its own open of the file), then maps, binds and serves the ring
    -> started | failed {error, connect}
    -> stats   {ring, storage}                 every STATS_INTERVAL s if they changed, on request, and last
                                               with `stopped`
    <- stats   (the service wants them now: ProcessVbd.refresh_stats) -> stats
    -> log     {name, level, text}             every record logged here, for the service's log
    <- pause   (operator's quiesce) -> paused  once nothing of this ring is in flight
    <- resume
    <- size    {sectors}                       online resize
    -> barrier_begin, <- barrier_go, -> barrier_end
               a barrier met on this ring: the service first holds every other ring of the vbd
               (their pause), then lets this one drain itself and run it (barrier.py, vbd-wide)
    <- stop    the connection ends in order: answer what is in flight, release it
    -> stopped {ring, storage}
    EOF        the service is stopping (an upgrade) or gone: the serve is cancelled, which
               drains for drain_timeout and leaves the rest to the journal, as in-process.

A failure here ends this process only; the service sees its exit or its `failed`.
"""

from __future__ import annotations

import logging
import socket
import traceback
from collections.abc import Callable
from typing import Any

import trio

from ...xen.interfaces import Platform
from ..contract import VbdConnectError
from .barrier import BarrierGate
from .vbd import Vbd
from .worker_channel import WorkerChannel

log = logging.getLogger(__name__)

# The counters go to the service this often when they changed (its view between requests: Prometheus'
# scrape); `ctl stats` asks for them (the `stats` request). The trio loop runs them only when the ring's
# poll comes back (SERVE_SLICE_MS, or the channel speaking): no shorter than that.
STATS_INTERVAL = 1.0


class CoordinatedGate(BarrierGate):
    """A ring worker's gate. drain()/reopen() are a barrier's (ring_worker.py): the service holds the
    vbd's other rings first; pause_drain()/pause_reopen() are the service's pause of this ring alone."""

    __slots__ = ("_channel", "_go", "_in_barrier")

    def __init__(self, channel: WorkerChannel) -> None:
        super().__init__()
        self._channel = channel
        self._go: trio.Event | None = None
        self._in_barrier = False

    async def drain(self) -> None:
        self._go = trio.Event()
        self._channel.send({"op": "barrier_begin"})
        await self._go.wait()
        self._go = None
        self._in_barrier = True
        await super().drain()  # reopen() on failure: barrier_end goes out there

    def reopen(self) -> None:
        super().reopen()
        if self._in_barrier:
            self._in_barrier = False
            self._channel.send({"op": "barrier_end"})

    def barrier_go(self) -> None:
        if self._go is not None:
            self._go.set()

    async def pause_drain(self) -> None:
        await BarrierGate.drain(self)

    def pause_reopen(self) -> None:
        BarrierGate.reopen(self)


class _ForwardLogs(logging.Handler):
    """Every record goes to the service, which logs it as its own (with the device's fields)."""

    def __init__(self, channel: WorkerChannel) -> None:
        super().__init__()
        self._channel = channel

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = record.getMessage()
            if record.exc_info:
                text += "\n" + "".join(traceback.format_exception(*record.exc_info)).rstrip()
            self._channel.send({"op": "log", "name": record.name, "level": record.levelno, "text": text})
        except Exception:
            self.handleError(record)


def _snapshot(vbd: Vbd) -> dict[str, Any]:
    stats = vbd.stats()
    return {"ring": stats["rings"][0] if stats["rings"] else None, "storage": stats["storage"]}


async def serve_ring_worker(sock: socket.socket, open_platform: Callable[[str | None], Platform]) -> int:
    """The worker's whole life; the exit status (0: stopped or handed over, 1: failed, 2: no start)."""
    channel = WorkerChannel(sock)
    async with trio.open_nursery() as top:
        top.start_soon(channel.run)
        try:
            start = await channel.receive()
            if start is None or start.get("op") != "start":
                return 2
            root = logging.getLogger()
            for h in list(root.handlers):
                root.removeHandler(h)
            root.addHandler(_ForwardLogs(channel))
            root.setLevel(start.get("log_level", logging.INFO))
            return await _serve(channel, start, open_platform)
        finally:
            top.cancel_scope.cancel()  # channel.run() writes what is queued on its way out
    return 1  # not reached (for the type checker)


async def _serve(channel: WorkerChannel, start: dict[str, Any],
                 open_platform: Callable[[str | None], Platform]) -> int:
    gate: list[CoordinatedGate] = []

    def make_gate() -> BarrierGate:
        g = CoordinatedGate(channel)
        gate[:] = [g]
        return g

    try:
        platform = open_platform(start["sim"])
    except Exception as e:
        channel.send({"op": "failed", "error": f"cannot open the hypervisor's devices: {e}", "connect": True})
        return 1
    try:
        try:
            vbd = Vbd.open(start["disk"], queues=1, ring_index=start["spec"].rings[0].index, **start["vbd"],
                           gate_factory=make_gate)
            vbd.serve_wake_fd = channel.fileno()  # (its ring sleeps in the engine's poll: see RingWorker)
        except Exception as e:
            channel.send({"op": "failed", "error": f"cannot open the storage: {e}", "connect": True})
            return 1
        try:
            vbd.apply_size(start["sectors"])
            if start["paused"]:
                await vbd.pause()  # not serving yet: the connection starts with its gate closed
            return await _serve_vbd(channel, vbd, start, platform, gate)
        finally:
            vbd.close()
    finally:
        platform.close()


async def _pause(channel: WorkerChannel, gate: CoordinatedGate) -> None:
    await gate.pause_drain()
    channel.send({"op": "paused"})


async def _serve_vbd(channel: WorkerChannel, vbd: Vbd, start: dict[str, Any], platform: Platform,
                     gate: list[CoordinatedGate]) -> int:
    async def send_stats() -> None:
        last = None
        while True:
            await trio.sleep(STATS_INTERVAL)
            snapshot = _snapshot(vbd)
            if snapshot != last:  # (an idle ring's worker sends nothing: its service decodes nothing)
                channel.send({"op": "stats", **snapshot})
                last = snapshot

    try:
        async with trio.open_nursery() as nursery:
            try:
                await nursery.start(vbd.serve, start["spec"], platform)
            except VbdConnectError as e:
                channel.send({"op": "failed", "error": str(e), "connect": True})
                return 1
            channel.send({"op": "started", **_snapshot(vbd)})
            nursery.start_soon(send_stats)
            while True:
                msg = await channel.receive()
                if msg is None:
                    break  # the service stops (or is gone): the cancelled serve hands the ring over
                op = msg["op"]
                if op == "stop":
                    await vbd.disconnect()
                    break
                if op == "pause":
                    nursery.start_soon(_pause, channel, gate[0])
                elif op == "resume":
                    gate[0].pause_reopen()
                elif op == "barrier_go":
                    gate[0].barrier_go()
                elif op == "size":
                    vbd.apply_size(msg["sectors"])
                elif op == "stats":
                    channel.send({"op": "stats", **_snapshot(vbd)})
            nursery.cancel_scope.cancel()
    except Exception as e:
        log.error("%s: ring worker failed: %s", vbd.disk.name, e, exc_info=e)
        channel.send({"op": "failed", "error": str(e), "connect": False})
        return 1
    channel.send({"op": "stopped", **_snapshot(vbd)})
    return 0
