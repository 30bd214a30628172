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
A worker that dies (killed, crashed) is replaced by a new one that takes its ring
over from the ring's journal (the takeover a daemon restart does: exactly once,
no reconnect), at most MAX_RESTARTS times per ring in RESTART_WINDOW seconds.
Past that, without a journal, or for a worker that reported a failure, serve()
ends with RingWorkerDied: the other workers are stopped, the control plane logs
it and puts the device in its error state, the service goes on. After serve() returns no worker
process is left: each is waited for by the task that started it.

Not with virtio-blk-vhost-user (config.py refuses it): each worker would need
a vhost-user connection, i.e. a server export, of its own.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import signal
import socket
import sys
from typing import Any

import trio

from ..._groups import leaves
from ...xen.interfaces import Platform
from ..contract import ConnectionSpec, RingSpec, VbdConnectError
from .restart_budget import RestartBudget
from .stats import COUNTERS, total
from .vbd import Vbd
from .worker_channel import WorkerChannel

log = logging.getLogger(__name__)

WORKER_MODULE = "xenblk_vhost.daemon.ring_process"
# A dead worker is replaced at most MAX_RESTARTS times in RESTART_WINDOW seconds per ring; one
# more death in that window is the device's error state (a worker that dies at once every time,
# e.g. on its storage, must not spin).
MAX_RESTARTS = 3
RESTART_WINDOW = 60.0
WORKER_EXIT_GRACE = 5.0  # beyond drain_timeout, before a worker that does not exit is killed
START_TIMEOUT = 300.0  # exec, imports, storage open, map and bind (QEMU TCG on a loaded host: over 60 s)
# How long `ctl stats` waits for the ring workers' fresh counters (refresh_stats): a worker's Python turn
# under QEMU TCG takes milliseconds; one that does not answer within this is left at its last report.
STATS_REFRESH_TIMEOUT = 1.0


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
        self.stats_came = trio.Event()  # set by its next stats message (refresh_stats waits for it)


def _exit_text(code: int | None) -> str:
    if code is None:
        return "still running"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit status {code}"


def _with_carried(snap: dict[str, Any], carried: dict[str, Any] | None) -> dict[str, Any]:
    """A ring's snapshot with the counters of the workers it had before added in."""
    if not carried:
        return snap
    out = dict(snap)
    for name, value in carried.items():
        if name == "latency":
            lat = dict(out["latency"])
            lat["counts"] = [a + b for a, b in zip(lat["counts"], value["counts"])]
            lat["sum"] = lat["sum"] + value["sum"]
            out["latency"] = lat
        else:
            out[name] = out.get(name, 0) + value
    return out


class ProcessVbd(Vbd):
    """Vbd's surface (backend/contract.py's VbdDataplane); serve() runs the rings in workers."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._procs: list[_Worker] = []
        # each ring's last counters and storage link, kept after the connection ends (as Vbd's are)
        self._ring_snaps: dict[int, dict[str, Any]] = {}
        self._storage_snap: dict[str, Any] | None = None
        self._ring_carried: dict[int, dict[str, Any]] = {}  # dead workers' counters, per ring
        self.worker_restarts = 0  # dead ring workers replaced (this vbd's life)
        self._vbd_wide = trio.Lock()  # a barrier's or a pause's drain of every ring: one at a time
        self._resumed = trio.Event()
        self._resumed.set()
        self.barriers_held = 0  # barriers for which every other ring was drained and held (for tests)

    # ------------------------------------------------------------ what the control plane calls

    def stats(self) -> dict:
        rings = [self._ring_snaps[i] for i in sorted(self._ring_snaps)]
        return {"rings": rings, "total": total(rings), "storage": self._storage_snap or self.storage_link.snapshot()}

    async def refresh_stats(self) -> None:
        """Ask every worker for its counters now and wait for them (at most STATS_REFRESH_TIMEOUT: a worker
        busy elsewhere or dying is left at its last report). Its ring's poll wakes for the request."""
        workers = [w for w in self._procs if not w.stopping]
        for w in workers:
            if w.stats_came.is_set():
                w.stats_came = trio.Event()
            w.channel.send({"op": "stats"})
        with trio.move_on_after(STATS_REFRESH_TIMEOUT):
            for w in workers:
                await w.stats_came.wait()

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
        self.let_go = trio.Event()  # the workers hold the channels and journals until they end
        self._stopped = trio.Event()
        self._connection_ending = False
        self._procs = []
        self._ring_snaps = {}
        self._ring_carried = {}
        self._storage_snap = None
        started = False
        sim = getattr(platform, "sim_socket", None)
        try:
            async with trio.open_nursery() as nursery:
                # All the workers start at once: a worker's start-up is an interpreter's (seconds
                # under QEMU TCG), and the connection waits for the slowest one, not for their sum.
                async with trio.open_nursery() as starting:
                    for rspec in sorted(spec.rings, key=lambda r: r.index):
                        starting.start_soon(functools.partial(
                            nursery.start, self._run_worker, nursery, rspec, spec, sim))
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
            self.let_go.set()
            self._stopped.set()

    def prepare(self, spec: ConnectionSpec, platform: Platform) -> None:
        """Nothing mapped ahead here: each ring worker maps its own ring when it starts."""

    def unprepare(self) -> None:
        pass

    def _start_message(self, rspec: RingSpec, spec: ConnectionSpec, sim: str | None) -> dict[str, Any]:
        return {
            "op": "start", "sim": sim, "sectors": self._sectors, "paused": self._paused,
            "disk": dataclasses.replace(self.disk, ring_workers="inline"),
            "spec": dataclasses.replace(spec, rings=(rspec,)),
            "log_level": logging.getLogger().getEffectiveLevel(),
            "vbd": {"storage_timeout": self.storage_timeout, "drain_timeout": self.drain_timeout,
                    "max_persistent_grants": self.max_persistent_grants,
                    "persistent_trim_interval": self.persistent_trim_interval, "shape": self._shape_override,
                    "journal_dir": self.journal_dir, "reconnect": self.reconnect_policy},
        }

    async def _run_worker(self, serving: trio.Nursery, rspec: RingSpec, spec: ConnectionSpec, sim: str | None, *,
                          task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """One ring's worker for the whole connection: started (a failure is the connect's), followed,
        and replaced when it dies (restart_budget.py), until the connection ends."""
        name = f"{self.disk.name}/ring{rspec.index}"
        budget = RestartBudget(MAX_RESTARTS, RESTART_WINDOW)
        replacing: _Worker | None = None  # the dead worker this one replaces
        while True:
            holder: list[_Worker] = []
            try:
                async with trio.open_nursery() as nursery:
                    if replacing is None:
                        await self._launch(nursery, holder, name, rspec, spec, sim)
                        task_status.started()
                    else:
                        await self._replace(nursery, holder, replacing, rspec, spec, sim)
                    worker = holder[0]
                    died = await self._follow(worker, serving)
                    nursery.cancel_scope.cancel()
            finally:
                with trio.CancelScope(shield=True):
                    for w in holder:
                        await self._end_worker(w)
                        if w in self._procs:
                            self._procs.remove(w)
                        w.paused.set()  # nothing waits for a gone worker's drain (a pause, a barrier)
                        w.stats_came.set()  # nor for its counters
                        w.barrier_done.set()
            if died is None or self._connection_ending:
                return
            why = f"{name}: ring worker process {worker.proc.pid} died ({died})"
            refused = self._no_restart(budget)
            if refused:
                log.error("%s; %s", why, refused)
                raise RingWorkerDied(f"{why}; {refused}")
            self._carry_stats(worker.index)
            log.warning("%s; a new worker takes its ring over from the journal (restart %d in %g s)",
                        why, budget.used, budget.window)
            replacing = worker

    def _no_restart(self, budget: RestartBudget) -> str | None:
        """Why a dead worker is not replaced, or None (and the restart counted)."""
        if self.journal_dir is None:
            # Without the journal the ring's state after a kill cannot be read back (responses
            # overwrite requests in completion order): a new worker could lose or repeat requests.
            return "no journal to take its ring over from (run without --no-journal)"
        if not budget.take(trio.current_time()):
            return f"not restarted: {budget.limit} restarts in {budget.window:g} s already"
        self.worker_restarts += 1
        return None

    async def _launch(self, nursery: trio.Nursery, holder: list[_Worker], name: str, rspec: RingSpec,
                      spec: ConnectionSpec, sim: str | None) -> dict[str, Any]:
        """Exec a worker for the ring and wait for its `started`; the worker goes into holder as soon as
        it exists (the caller ends it, whatever happens). Raises VbdConnectError. The start message."""
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
        holder.append(worker)
        nursery.start_soon(channel.run)
        start = self._start_message(rspec, spec, sim)
        channel.send(start)
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
        return start

    async def _replace(self, nursery: trio.Nursery, holder: list[_Worker], dead: _Worker, rspec: RingSpec,
                       spec: ConnectionSpec, sim: str | None) -> None:
        """Start a worker in a dead one's place: it takes the ring over from the journal at connect (as
        the next daemon does after a kill: what was answered and published is dropped, answered but not
        published is written again, not answered is run again from the journal's copy), the frontend
        sees no reconnect. The old process is gone (waited for) before the new one maps the ring."""
        # No barrier's or pause's drain of the vbd while the replacement starts: the drain would not
        # know of it, and a barrier must find every other ring held.
        async with self._vbd_wide:
            try:
                start = await self._launch(nursery, holder, dead.name, rspec, spec, sim)
            except VbdConnectError as e:
                raise RingWorkerDied(f"{dead.name}: ring worker process {dead.proc.pid} died and could "
                                     f"not be replaced: {e}") from e
        worker = holder[0]
        # What changed while it started (it was not in _procs yet): the operator's resume, a resize,
        # the connection ending.
        if start["paused"] and not self._paused:
            worker.channel.send({"op": "resume"})
        if start["sectors"] != self._sectors:
            worker.channel.send({"op": "size", "sectors": self._sectors})
        if self._connection_ending:
            worker.stopping = True
            worker.channel.send({"op": "stop"})

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
            self._ring_snaps[worker.index] = _with_carried(msg["ring"], self._ring_carried.get(worker.index))
        if msg.get("storage") is not None:
            self._storage_snap = msg["storage"]

    def _carry_stats(self, index: int) -> None:
        """A dead worker's counters stay counted: its replacement's are added to them (a request run
        again from the journal is counted by both)."""
        last = self._ring_snaps.get(index)
        if last is not None:
            self._ring_carried[index] = {name: last[name] for name in COUNTERS + ("latency",) if name in last}

    async def _follow(self, worker: _Worker, serving: trio.Nursery) -> str | None:
        """Until the worker stopped in order (None) or vanished (how it ended: killed, crashed); raise
        RingWorkerDied if it failed in order (it reported the failure: its ring went the in-process
        failure's way, requests answered ERROR, so there is nothing for a successor to take over)."""
        while True:
            msg = await worker.channel.receive()
            if msg is None:
                if worker.stopping:
                    return None
                return await self._why_gone(worker)
            op = msg["op"]
            if op == "log":
                self._relog(msg)
            elif op in ("stats", "stopped"):
                self._note_stats(worker, msg)
                worker.stats_came.set()
                if op == "stopped":
                    return None
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
        """Every worker given drains its ring and holds it; return once all did (or died: a dead
        worker's `paused` is set when it is removed)."""
        workers = list(workers)  # pause() passes self._procs, which a dying worker leaves meanwhile
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
