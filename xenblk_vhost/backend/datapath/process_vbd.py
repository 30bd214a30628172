"""A vbd whose rings are served by worker processes, one per ring (`ring_workers: process`).

Today's in-process Vbd serves every ring of every disk on one core. Here the
xenbus control plane stays in the service, and serve() starts, per ring of
the connection, a worker process that is an exec of our own entry point
(`python -m xenblk_vhost.daemon.ring_process`, never a fork of a trio
process) and serves that ring with a Vbd of its own (ring_process.py): its
own gntdev and evtchn handles, its own libblkio instance with one queue
(io_uring: its own open of the file), its own journal file (the same name as
in-process: ring i of the vbd), so the rings run on as many cores as there are.

The parent (this class: the VbdDataplane the control plane sees) keeps the
storage it opened at create for what a vbd offers and its size, and over one
control channel per worker (worker_channel.py):
- pause/resume: every worker drains and holds, pause() returns once all did;
- barriers: a worker that meets one asks first; the parent holds every other
  ring (their pause), lets it drain itself and run the barrier, then releases
  them. One such vbd-wide drain at a time (a lock), as BarrierGate does;
- stats: each worker sends its ring's counters every 0.25 s (stats() is the last seen);
- disconnect: every worker answers what is in flight and exits;
- cancellation (the service stopping): each worker sees its channel close and
  hands its ring over as the in-process teardown does (journal), then exits;
  one that does not exit in drain_timeout + WORKER_EXIT_GRACE is killed.
A worker that dies (killed, crashed) or fails ends serve() with RingWorkerDied:
the other workers are stopped, the control plane logs it and puts the device
in its error state, the service goes on. After serve() returns no worker
process is left: each is waited for by the task that started it.

Not with virtio-blk-vhost-user (config.py refuses it): each worker would need
a vhost-user connection, i.e. a server export, of its own.
"""

from __future__ import annotations

import dataclasses
import logging
import signal
import socket
import sys
from typing import Any

import trio

from ..._groups import leaves
from ...xen.interfaces import Platform
from ..contract import ConnectionSpec, RingSpec, VbdConnectError
from .stats import total
from .vbd import Vbd
from .worker_channel import WorkerChannel

log = logging.getLogger(__name__)

WORKER_MODULE = "xenblk_vhost.daemon.ring_process"
WORKER_EXIT_GRACE = 5.0  # beyond drain_timeout, before a worker that does not exit is killed
START_TIMEOUT = 60.0  # exec, imports, storage open, map and bind (a loaded machine is slow)


class RingWorkerDied(RuntimeError):
    """A ring's worker process exited or failed while serving."""


class _Worker:
    """The parent's side of one ring's worker."""

    def __init__(self, name: str, index: int, channel: WorkerChannel, proc: trio.Process) -> None:
        self.name = name
        self.index = index
        self.channel = channel
        self.proc = proc
        self.stopping = False
        self.paused = trio.Event()
        self.barrier_done = trio.Event()


def _exit_text(code: int | None) -> str:
    if code is None:
        return "still running"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit status {code}"


class ProcessVbd(Vbd):
    """Vbd's surface (backend/contract.py's VbdDataplane); serve() runs the rings in workers."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._procs: list[_Worker] = []
        # each ring's last counters and storage link, kept after the connection ends (as Vbd's are)
        self._ring_snaps: dict[int, dict[str, Any]] = {}
        self._storage_snap: dict[str, Any] | None = None
        self._vbd_wide = trio.Lock()  # a barrier's or a pause's drain of every ring: one at a time
        self._resumed = trio.Event()
        self._resumed.set()
        self.barriers_held = 0  # barriers for which every other ring was drained and held (for tests)

    # ------------------------------------------------------------ what the control plane calls

    def stats(self) -> dict:
        rings = [self._ring_snaps[i] for i in sorted(self._ring_snaps)]
        return {"rings": rings, "total": total(rings), "storage": self._storage_snap or self.storage_link.snapshot()}

    def worker_pids(self) -> list[int]:
        """The ring workers' process ids, in ring order (while serving)."""
        return [w.proc.pid for w in sorted(self._procs, key=lambda w: w.index)]

    def apply_size(self, sectors: int) -> None:
        self._sectors = sectors
        for w in self._procs:
            w.channel.send({"op": "size", "sectors": sectors})

    async def pause(self) -> None:
        if self._paused:
            return
        self._paused = True
        self._resumed = trio.Event()
        if not self._serving:
            return
        try:
            async with self._vbd_wide:
                await self._hold(self._procs)
        except BaseException:
            self.resume()
            raise

    def resume(self) -> None:
        if not self._paused:
            return
        self._paused = False
        self._resumed.set()
        for w in self._procs:
            w.channel.send({"op": "resume"})

    async def disconnect(self) -> None:
        if not self._serving:
            return
        self._connection_ending = True
        for w in self._procs:
            w.stopping = True
            w.channel.send({"op": "stop"})
        assert self._stopped is not None
        await self._stopped.wait()

    # ------------------------------------------------------------ serving

    async def serve(self, spec: ConnectionSpec, platform: Platform, *,
                    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        if self._serving:
            raise VbdConnectError("already serving a connection")
        self._check_spec(spec)
        self._serving = True
        self._stopped = trio.Event()
        self._connection_ending = False
        self._procs = []
        self._ring_snaps = {}
        self._storage_snap = None
        started = False
        sim = getattr(platform, "sim_socket", None)
        try:
            async with trio.open_nursery() as nursery:
                for rspec in sorted(spec.rings, key=lambda r: r.index):
                    await nursery.start(self._run_worker, nursery, rspec, spec, sim)
                started = True
                task_status.started()
        except BaseExceptionGroup as group:
            if not started:  # a connect failure is the control plane's VbdConnectError, alone
                for leaf in leaves(group):
                    if isinstance(leaf, VbdConnectError):
                        raise leaf from None
            raise
        finally:
            self._serving = False
            self._stopped.set()

    def _start_message(self, rspec: RingSpec, spec: ConnectionSpec, sim: str | None) -> dict[str, Any]:
        return {
            "op": "start", "sim": sim, "sectors": self._sectors, "paused": self._paused,
            "disk": dataclasses.replace(self.disk, ring_workers="inline"),
            "spec": dataclasses.replace(spec, rings=(rspec,)),
            "log_level": logging.getLogger().getEffectiveLevel(),
            "vbd": {"storage_timeout": self.storage_timeout, "drain_timeout": self.drain_timeout,
                    "max_persistent_grants": self.max_persistent_grants, "shape": self._shape_override,
                    "journal_dir": self.journal_dir, "reconnect": self.reconnect_policy},
        }

    async def _run_worker(self, serving: trio.Nursery, rspec: RingSpec, spec: ConnectionSpec, sim: str | None, *,
                          task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        name = f"{self.disk.name}/ring{rspec.index}"
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            proc = await trio.lowlevel.open_process([sys.executable, "-m", WORKER_MODULE, str(theirs.fileno())],
                                                    pass_fds=(theirs.fileno(),))
        except OSError as e:
            ours.close()
            raise VbdConnectError(f"{name}: cannot start a ring worker: {e}") from e
        finally:
            theirs.close()
        channel = WorkerChannel(ours)
        worker = _Worker(name, rspec.index, channel, proc)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(channel.run)
                channel.send(self._start_message(rspec, spec, sim))
                with trio.move_on_after(START_TIMEOUT) as timeout:
                    first = await self._receive_logs_until_other(worker)
                if timeout.cancelled_caught:
                    raise VbdConnectError(f"{name}: the ring worker did not start in {START_TIMEOUT:g} s")
                if first is None or first["op"] == "failed":
                    why = first["error"] if first else await self._why_gone(worker)
                    raise VbdConnectError(f"{name}: {why}")
                self._note_stats(worker, first)
                self._procs.append(worker)
                log.info("%s: served by ring worker process %d", name, proc.pid)
                task_status.started()
                await self._follow(worker, serving)
                nursery.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True):
                await self._end_worker(worker)
                if worker in self._procs:
                    self._procs.remove(worker)

    async def _receive_logs_until_other(self, worker: _Worker) -> dict[str, Any] | None:
        while True:
            msg = await worker.channel.receive()
            if msg is None or msg["op"] != "log":
                return msg
            self._relog(msg)

    @staticmethod
    def _relog(msg: dict[str, Any]) -> None:
        logger = logging.getLogger(str(msg["name"]))
        level = int(msg["level"])
        if logger.isEnabledFor(level):
            logger.log(level, "%s", msg["text"])

    def _note_stats(self, worker: _Worker, msg: dict[str, Any]) -> None:
        if msg.get("ring") is not None:
            self._ring_snaps[worker.index] = msg["ring"]
        if msg.get("storage") is not None:
            self._storage_snap = msg["storage"]

    async def _follow(self, worker: _Worker, serving: trio.Nursery) -> None:
        """Until the worker stopped in order; raise RingWorkerDied if it failed or vanished."""
        while True:
            msg = await worker.channel.receive()
            if msg is None:
                if worker.stopping:
                    return
                why = await self._why_gone(worker)
                log.error("%s: ring worker process %d died (%s)", worker.name, worker.proc.pid, why)
                raise RingWorkerDied(f"{worker.name}: ring worker process {worker.proc.pid} died ({why})")
            op = msg["op"]
            if op == "log":
                self._relog(msg)
            elif op in ("stats", "stopped"):
                self._note_stats(worker, msg)
                if op == "stopped":
                    return
            elif op == "paused":
                worker.paused.set()
            elif op == "barrier_begin":
                serving.start_soon(self._barrier, worker)
            elif op == "barrier_end":
                worker.barrier_done.set()
            elif op == "failed":
                raise RingWorkerDied(f"{worker.name}: ring worker process {worker.proc.pid} failed: {msg['error']}")

    async def _why_gone(self, worker: _Worker) -> str:
        with trio.move_on_after(2):
            await worker.proc.wait()
        return _exit_text(worker.proc.returncode)

    async def _hold(self, workers: list[_Worker]) -> None:
        """Every worker given drains its ring and holds it; return once all did."""
        for w in workers:
            w.paused = trio.Event()
            w.channel.send({"op": "pause"})
        for w in workers:
            await w.paused.wait()

    async def _barrier(self, worker: _Worker) -> None:
        """A barrier met on worker's ring: the other rings drain and wait while it runs (barrier.py)."""
        async with self._vbd_wide:
            await self._resumed.wait()  # paused by the operator: the barrier waits like its ring
            others = [w for w in self._procs if w is not worker]
            await self._hold(others)
            self.barriers_held += 1
            worker.barrier_done = trio.Event()
            worker.channel.send({"op": "barrier_go"})
            try:
                await worker.barrier_done.wait()
            finally:
                if not self._paused:
                    for w in others:
                        w.channel.send({"op": "resume"})

    async def _end_worker(self, worker: _Worker) -> None:
        """Close the channel (a worker still serving hands its ring over and exits); wait for its exit,
        killing it after drain_timeout + WORKER_EXIT_GRACE. Shielded by the caller."""
        worker.channel.close()
        with trio.move_on_after(self.drain_timeout + WORKER_EXIT_GRACE):
            await worker.proc.wait()
        if worker.proc.returncode is None:
            log.warning("%s: ring worker process %d did not exit; killing it", worker.name, worker.proc.pid)
            worker.proc.kill()
            await worker.proc.wait()
